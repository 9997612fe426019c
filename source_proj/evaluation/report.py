"""An HTML report of an LDS comparison: the table ``format_table`` and ``format_comparison`` print (each method's LDS
with its interval, the ground truth's noise ceiling, each method's paired difference from the best, marked where
significant), the settings it was computed with, and a picture of every query's correlation under each method with
the ceiling marked. The page is self-contained (the picture an inline PNG; no scripts, no external files)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from source_proj.evaluation.lds import Comparison, Counterfactuals, LDSArguments, paired_comparison
from source_proj.evaluation.metrics import Correlation
from source_proj.figures import pyplot
from source_proj.store.durable import atomic_write_bytes

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 80em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: .9em; } th { text-align: left; border-bottom: 1px solid #ccc; }
td, th { padding: .3em .8em .3em .3em; } td { border-top: 1px solid #eee; }
td.num { white-space: nowrap; font-family: monospace; } .sig { font-weight: bold; color: #b42318; }
.legend { color: #555; font-size: .9em; } img { max-width: 100%; }
"""
_OVER = {"subsets": "the subsets", "queries": "the queries", "both": "subsets and queries"}


def lds_report(
    scores: Mapping[str, np.ndarray],
    truths: Sequence[Counterfactuals],
    results: Mapping[str, Sequence[Correlation]],
    path: str | Path,
    *,
    args: LDSArguments = LDSArguments(),
    settings: Mapping[str, str] | None = None,
    comparison: Sequence[Comparison] | None = None,
    title: str = "LDS comparison",
) -> Path:
    """Write the HTML report of an LDS comparison (replaced atomically); returns its path.

    Args:
        scores: method name → ``[Q, N]`` scores (score = −Δf), as given to ``compare``.
        truths: the ground truths, one per α, as given to ``compare``.
        results: what ``compare`` returned for them; each LDS is shown as ``format_table`` prints it.
        path: the ``.html`` file to write.
        args: the bootstrap settings of the intervals (``args.resample``: what they resample).
        settings: what else to record, label → value in the order given (the store, the queries…); the subsets,
            retrains, α and the date written are recorded always.
        comparison: what ``paired_comparison`` returned for the same arguments (default: computed here).
        title: the page's heading.
    """
    comparison = paired_comparison(scores, truths, results, args) if comparison is None else comparison
    over = _OVER[args.resample]
    head = "".join(f"<th>LDS α={t.alpha:g} [{args.confidence:.0%} CI]</th><th>best − method</th>" for t in truths)
    rows = []
    for name, rs in results.items():
        cells = []
        for r, (_, best, differences) in zip(rs, comparison, strict=True):
            difference = differences.get(name)
            if difference is None:  # the best method, or the only one
                shown = "best" if differences and name == best else ""
            elif difference.significant:
                shown = f"<span class='sig'>{difference} *</span>"
            else:
                shown = str(difference)
            cells.append(f"<td class='num'>{r}</td><td class='num'>{shown}</td>")
        rows.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    ceilings = "".join(
        "<td class='num' colspan='2'>"
        + ("none: one retrain per subset" if c is None else f"√ρ = {c[1]:.3f} (split-half r = {c[0]:.3f})")
        + "</td>"
        for c, _, _ in comparison
    )
    rows.append(f"<tr><td>noise ceiling</td>{ceilings}</tr>")
    legend = [
        f"LDS: the mean over queries of the Spearman correlation, over the subsets, between each query's predicted and "
        f"retrained measurement; intervals are {args.confidence:.0%} bootstrap intervals that resample {over}.",
        "best − method: the paired difference of the LDS from the best method's on the same resamples; "
        "<span class='sig'>bold and *</span> where its interval excludes 0.",
        "Noise ceiling: the LDS a perfect predictor of the expected measurement would reach against the noisy mean "
        "of the retrains (from the ground truth's split-half reliability r); no method is expected above it.",
    ]
    recorded = {
        "subsets M": str(truths[0].masks.shape[0]),
        "retrains per subset R": str(truths[0].measurements.shape[1]),
        "α (fraction kept)": ", ".join(f"{t.alpha:g}" for t in truths),
        "queries": str(truths[0].measurements.shape[2]),
        "intervals resample": over,
        "bootstrap seed": str(args.seed),
        **(settings or {}),
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    facts = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in recorded.items())
    picture = base64.b64encode(_per_query_png(results, truths, comparison)).decode("ascii")
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<table><tr><th>method</th>{head}</tr>{''.join(rows)}</table>",
        *(f"<p class='legend'>{line}</p>" for line in legend),
        "<h2>Each query's correlation</h2>",
        f"<img alt='per-query Spearman correlation of each method' src='data:image/png;base64,{picture}'>",
        "<p class='legend'>Each point is one query's Spearman correlation (a query whose correlation is undefined is "
        "left out); the box spans their quartiles, the diamond is the LDS (their mean), the dashed line the noise "
        "ceiling.</p>",
        f"<h2>Settings</h2><table>{facts}</table>",
    ]
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    atomic_write_bytes(path, page.encode("utf-8"))
    return Path(path)


def _per_query_png(
    results: Mapping[str, Sequence[Correlation]], truths: Sequence[Counterfactuals], comparison: Sequence[Comparison]
) -> bytes:
    """PNG bytes: one panel per α, a box and the points of each method's per-query correlations (undefined ones left
    out), its LDS as a diamond and the noise ceiling as a dashed line."""
    plt = pyplot()
    names = list(results)
    fig, axes = plt.subplots(1, len(truths), figsize=(1.2 + 1.1 * len(names) * len(truths), 3.8), squeeze=False,
                             sharey=True)  # fmt: skip
    jitter = np.random.default_rng(0)
    try:
        for column, (ax, truth, (ceiling, _, _)) in enumerate(zip(axes[0], truths, comparison, strict=True)):
            values = [results[n][column].per_query[np.isfinite(results[n][column].per_query)] for n in names]
            ax.boxplot(values, positions=range(len(names)), widths=0.5, showfliers=False)
            for i, v in enumerate(values):
                ax.scatter(i + jitter.uniform(-0.15, 0.15, v.size), v, s=8, alpha=0.5)
                ax.scatter([i], [results[names[i]][column].mean], marker="D", color="black", zorder=3)
            if ceiling is not None:
                ax.axhline(ceiling[1], color="#b42318", ls="--", lw=1, label=f"noise ceiling {ceiling[1]:.3f}")
                ax.legend(fontsize=7, loc="lower right")
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"α={truth.alpha:g}", fontsize=9)
        axes[0][0].set_ylabel("per-query Spearman correlation")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buffer.getvalue()
