"""LDS of SOURCE against TRAK, IF and other baselines on the two-stage tiny GPT-2 of ``lm.py``.

    python examples/text/lds.py [--subsets 50] [--repeats 4] [--dim 512] [--workers 2] [--out runs/text-lds]
    python examples/text/lds.py --replot OUT/lds.json OUT/lds.png [--note TEXT]

Trains the model once (seed 0, recorded), featurizes every checkpoint (k = ``--dim``) and, for each
stage separately, fits SOURCE and the baselines attributing the fine-tuned model's loss on the 40
held-out queries to that stage's sequences. The ground truth retrains on ``--subsets`` random
halves (α = 0.5) of the stage, ``--repeats`` times each, in three settings: ``pretrain`` retrains
both stages from scratch (seeded initialisation and shuffles); ``pretrain-fixed-init`` retrains both
stages from the recorded run's initialisation (seeded shuffles); ``finetune`` fine-tunes the
recorded pre-trained model again (fresh shuffles). Retrains are cached in OUT/<setting>/retrains,
so an interrupted run resumes. Prints the table, writes OUT/lds.md and OUT/lds.json and draws
OUT/lds.png. Every size and setting is fixed in advance; nothing is tuned on the queries. ``--replot``
only redraws the figure from the numbers of an ``lds.json`` (``--note``: a line under it), training nothing:
docs/text_lds.png is drawn so from docs/text_lds.json.
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
import lm

import source_proj as sp
from source_proj import evaluation as ev
from source_proj.figures import pyplot, save_figure

BASELINES = ("trak", "if", "tracin", "grad-dot", "repsim")
SETTINGS = (  # (name, attributed stage, retrain from the recorded initialisation)
    ("pretrain", "pretrain", False),
    ("pretrain-fixed-init", "pretrain", True),
    ("finetune", "finetune", False),
)


def prepare(out: Path, dim: int) -> Path:
    """Train (once), featurize, and fit SOURCE and every baseline for each stage (``<method>-<stage>``)."""
    run, store = out / "run", out / "model.sp"
    if not (run / "trajectory.json").exists() or not sp.Trajectory.load(run).complete:
        lm.train(seed=0, run_dir=run)
    data = lm.corpus().train
    sp.featurize(run, lm.build_model(), lm.build_task(), data, store, projection=sp.ProjectionArguments(dim=dim),
                 options=sp.FeaturizeArguments(batch_size=32, chunk_rows=128))  # fmt: skip
    fitted = sp.Store.open(store).meta.get("methods") or {}
    for stage in lm.STAGES:
        if not fitted.get(f"source-{stage}", {}).get("complete"):
            sp.fit(store, sp.FitArguments(stages=(stage,), method=f"source-{stage}"))
        for kind in BASELINES:
            if not fitted.get(f"{kind}-{stage}", {}).get("complete"):
                args = sp.BaselineArguments(kind=kind, stages=(stage,), method=f"{kind}-{stage}")
                sp.fit_baseline(store, args, model=lm.build_model(), task=lm.build_task(), train_data=data)
    return store


def plot(results: dict[str, dict[str, ev.Correlation]], path: Path, note: str = "") -> Path:
    """Grouped bars: LDS with its 95% interval per method, one group per setting; ``note``, a line under them."""
    plt = pyplot()
    stages = list(results)
    methods = list(results[stages[0]])
    fig, ax = plt.subplots(figsize=(8, 3.4 + 0.25 * bool(note)))
    width = 0.8 / len(methods)
    others = iter(["C0", "C1", "C2", "C4", "C5", "C6", "C7"])
    colours = {method: "C3" if method == "source" else next(others) for method in methods}
    for m, method in enumerate(methods):
        xs = np.arange(len(stages)) + (m - (len(methods) - 1) / 2) * width
        means = [results[s][method].mean for s in stages]
        errs = np.array([[results[s][method].mean - results[s][method].low, results[s][method].high
                          - results[s][method].mean] for s in stages]).T  # fmt: skip
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=method, color=colours[method])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(np.arange(len(stages)), stages)
    ax.set_ylabel("LDS (α = 0.5), 95% CI")
    ax.set_title("tiny GPT-2: docstrings → dataset descriptions, loss on 40 held-out queries", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    ax.set_xlabel(note, fontsize=7, loc="left")  # under the settings' names, inside the layout
    return save_figure(fig, path, dpi=120)


def replot(numbers: Path, path: Path, note: str) -> Path:
    """The figure of an ``lds.json`` (setting → method → lds, low, high), without training anything."""
    recorded = json.loads(numbers.read_text())
    results = {setting: {method: ev.Correlation(r["lds"], r["low"], r["high"], np.array([]), 0)
                         for method, r in methods.items()} for setting, methods in recorded.items()}  # fmt: skip
    return plot(results, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subsets", type=int, default=50, help="M, LDS subsets per stage")
    parser.add_argument("--repeats", type=int, default=4, help="R, retrains per subset")
    parser.add_argument("--dim", type=int, default=512, help="projection dimension k")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/text-lds")
    parser.add_argument("--replot", nargs=2, type=Path, metavar=("JSON", "PNG"),
                        help="only draw PNG from the numbers of an lds.json this script wrote (no training)")
    parser.add_argument("--note", default="", help="with --replot: a line of text under the figure")
    args = parser.parse_args()
    if args.replot:
        print("plot:", replot(*args.replot, args.note))
        return
    if args.repeats < 2:  # checked before any training: the report's split-half reliability needs two halves
        parser.error(f"argument --repeats: {args.repeats} leaves no second half for the ground truth's split-half "
                     "reliability; ask for 2 or more")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(args.out)
    t0 = time.perf_counter()
    store = prepare(out, args.dim)
    queries = lm.query_data()
    prep_s = time.perf_counter() - t0
    lds_args = ev.LDSArguments(alpha=0.5, num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    results: dict[str, dict[str, ev.Correlation]] = {}
    report = []
    for setting, stage, fixed_init in SETTINGS:
        scores, rows = {}, None
        for method in ("source", *BASELINES):
            attributor = sp.Attributor(store, lm.build_model(), lm.build_task(), method=f"{method}-{stage}")
            scores[method], rows = attributor.scores(queries), attributor.rows
        assert rows is not None
        t1 = time.perf_counter()
        retrain = lm.Retrain(str(out / "run"), fixed_init=fixed_init)
        truth = ev.lds_ground_truth(retrain, rows, out / setting / "retrains", lds_args)
        table = ev.compare(scores, [truth])
        results[setting] = {m: r[0] for m, r in table.items()}
        text = (
            f"## {setting}: N={rows[0].size} sequences, {len(queries)} queries, k={args.dim}, "
            f"M={args.subsets}, R={args.repeats}\n"
            f"(retrains: {time.perf_counter() - t1:.0f}s)\n\n" + ev.format_table(table, [0.5]) + "\n"
            + ev.format_comparison(scores, [truth], table) + "\n"
        )
        print(text, flush=True)
        report.append(text)
    total = time.perf_counter() - t0
    summary = f"(prepare: {prep_s:.0f}s, total {total:.0f}s)\n"
    print(summary)
    (out / "lds.md").write_text("\n".join(report) + summary)
    (out / "lds.json").write_text(json.dumps(
        {s: {m: {"lds": r.mean, "low": r.low, "high": r.high} for m, r in rs.items()} for s, rs in results.items()},
        indent=1))  # fmt: skip
    print("plot:", plot(results, out / "lds.png"))


if __name__ == "__main__":
    main()
