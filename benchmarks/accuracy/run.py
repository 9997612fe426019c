"""This library's methods at their defaults (and the peers' scores, where computed) by LDS on the
issue-12 settings: a markdown table for BENCHMARKS.md.

    python benchmarks/accuracy/run.py [--settings early,converged,two-stage,early-fast] [--root runs/accuracy]
        [--dim 1024] [--kind eigen] [--models 3] [--refit] [--mnist DIR] [--out runs/accuracy/table.md]

For each setting (``harness.prepare``: models and ground truth, cached): featurize every attributed
model at the library's defaults (dense Rademacher, k = 1024, sampled Fisher), fit ``source`` with the
default segmentation (1 segment per stage since issue 12; it was 3), ``source-L1`` (1 segment per
stage) and every baseline of ``source_proj/methods/baselines.py`` at its defaults, all attributing the
attributed stage only.
Single model = model 0; ``×3`` = the mean of the 3 models' scores (what ``sp.Ensemble`` computes).
Peers' scores written by ``peers.py`` into ``<setting folder>/peers/<method>/seed-<i>-<query set>.npy``
are scored by the same LDS code. ``--refit`` refits every method (after a change to the methods'
code); the features are reused while the store matches its inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import source_proj as sp
from source_proj import evaluation as sp_ev

OURS = ("source", "source-L1", *sp.BASELINES)


def fit_ours(h: harness.Prepared, dim: int, refit: bool, kind: str = "eigen") -> tuple[list[Path], float]:
    """Featurize (projection ``kind``, k = ``dim``) and fit every method of ours on each attributed model;
    returns the stores and seconds."""
    start = time.perf_counter()
    stores = []
    stages = (h.setting.attributed,)
    for seed, run in enumerate(h.runs):
        store = h.folder / f"model-{seed}-{tag(dim, kind)}.sp"
        sp.featurize(
            run,
            h.build_model(),
            h.task,
            h.train_data,
            store,
            projection=sp.ProjectionArguments(dim=dim, kind=kind),
            progress=False,
        )
        sp.fit(store, sp.FitArguments(stages=stages), overwrite=refit, progress=False)
        sp.fit(
            store,
            sp.FitArguments(segments_per_stage=1, stages=stages, method="source-L1"),
            overwrite=refit,
            progress=False,
        )
        for baseline in sp.BASELINES:
            sp.fit_baseline(
                store,
                sp.BaselineArguments(kind=baseline, stages=stages),
                model=h.build_model(),
                task=h.task,
                train_data=h.train_data,
                overwrite=refit,
                progress=False,
            )
        stores.append(store)
    return stores, time.perf_counter() - start


def tag(dim: int, kind: str) -> str:
    """The store and results name of a projection: ``k1024`` for the dense Rademacher kind (the default until
    2026-11-30, whose cached stores keep that name), ``eigen-k1024`` etc. else."""
    return f"k{dim}" if kind == "rademacher" else f"{kind}-k{dim}"


def our_scores(h: harness.Prepared, stores: list[Path], queries: str) -> dict[str, list[np.ndarray]]:
    """Method → per-model score matrices ``[Q, N]`` on one query set."""
    data = h.query_data(queries)
    out = {}
    for method in OURS:
        ensemble = sp.Ensemble.open(stores, h.build_model(), h.task, method=method, batch_size=256)
        out[method] = [a.scores(data) for a in ensemble.attributors]
    return out


def peer_scores(h: harness.Prepared, queries: str, models: int) -> dict[str, list[np.ndarray]]:
    """Peer method → per-model score matrices of the models 0, 1, … whose peer scores exist."""
    out = {}
    for folder in sorted(p for p in (h.folder / "peers").glob("*") if p.is_dir()):
        found = []
        for i in range(models):
            if not (folder / f"seed-{i}-{queries}.npy").exists():
                break
            found.append(np.load(folder / f"seed-{i}-{queries}.npy"))
        if found:
            out[folder.name] = found
    return out


def summarise(
    h: harness.Prepared, queries: str, scores: dict[str, list[np.ndarray]], models: int
) -> dict[str, tuple[sp_ev.Correlation, sp_ev.Correlation | None]]:
    """Row name → (single-model LDS, ensemble LDS or None where fewer than ``models`` models were
    scored). Peers' damping variants ``method@λ`` become
    ``method (default)`` (kronfluence's 1e-8), ``method (heuristic)`` (0.1 × mean eigenvalue) and
    ``method (best of 5: λ)``, λ of the grid with the best single-model LDS."""
    out: dict[str, tuple[sp_ev.Correlation, sp_ev.Correlation | None]] = {}
    grids: dict[str, list[tuple[str, tuple[sp_ev.Correlation, sp_ev.Correlation | None]]]] = {}
    for method, per_model in scores.items():
        ensemble = h.lds(np.mean(per_model, axis=0), queries) if len(per_model) == models else None
        pair = (h.lds(per_model[0], queries), ensemble)
        base, _, damping = method.partition("@")
        if not damping:
            out[method] = pair
        elif damping == "1e-08":
            out[f"{base} (default)"] = pair
        elif damping == "heuristic":
            out[f"{base} (heuristic)"] = pair
        else:
            grids.setdefault(base, []).append((damping, pair))
    for base, candidates in grids.items():
        damping, pair = max(candidates, key=lambda c: c[1][0].mean)
        out[f"{base} (best of {len(candidates)}: {damping})"] = pair
    return out


def table(rows: dict[str, dict[str, str]], columns: list[str]) -> str:
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(cells.get(c, "") for c in columns) + " |" for m, cells in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="early,converged,two-stage,early-fast")
    parser.add_argument("--root", default=str(harness.ROOT))
    parser.add_argument("--dim", type=int, default=1024, help="projection dimension k (the library's default)")
    parser.add_argument(
        "--kind",
        default="eigen",
        help="projection kind (the library's default, eigen; rademacher was the default until 2026-11-30)",
    )
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--mnist", default=None, help="folder of the MNIST IDX files (MNIST settings)")
    parser.add_argument("--refit", action="store_true", help="refit every method (after a change to its code)")
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, str]] = {}
    columns, notes = [], []
    for name in args.settings.split(","):
        h = harness.prepare(
            name, root=args.root, mnist=args.mnist, models=args.models, subsets=args.subsets, repeats=args.repeats
        )
        stores, seconds = fit_ours(h, args.dim, args.refit, args.kind)
        results: dict[str, dict[str, float]] = {}
        for queries in h.query_sets:
            column = name if len(h.query_sets) == 1 else f"{name} ({queries})"
            columns.append(column)
            r, ceiling = h.reliability(queries)
            notes.append(
                f"{column}: ground truth {h.lds_args.num_subsets} subsets × {h.lds_args.repeats} retrains, split-half "
                f"reliability {r:.3f}, LDS ceiling ≈ {ceiling:.3f} (√ of its Spearman–Brown reliability)"
            )
            scores = {**our_scores(h, stores, queries), **peer_scores(h, queries, args.models)}
            for method, (single, ensemble) in summarise(h, queries, scores, args.models).items():
                row, _, chosen = method.partition(" (best of ")
                cell = f"{single} / " + ("–" if ensemble is None else f"{ensemble.mean:.3f}")
                if chosen:
                    row, cell = f"{row} (best λ)", f"{cell} (λ={chosen.split(': ')[1].rstrip(')')})"
                rows.setdefault(row, {})[column] = cell
                results[f"{method}|{queries}"] = {
                    "single": [single.mean, single.low, single.high],
                    "ensemble": None if ensemble is None else [ensemble.mean, ensemble.low, ensemble.high],
                }
                print(f"{column:28s} {method:36s} single {single}  ensemble {ensemble or '–'}", flush=True)
        (h.folder / f"results-{tag(args.dim, args.kind)}.json").write_text(json.dumps(results, indent=1))
        print(f"{name}: featurize + fit of {len(stores)} models {seconds:.0f} s; folder {h.folder}", flush=True)
    text = table(rows, columns) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
