"""LDS of SOURCE on the text example's fine-tuning stage for each projection kind and k, at a chosen width.

    python benchmarks/projection_width_lds.py [--width 256] [--reference runs/text-w256]
        [--variants eigen:512,factored:512,rademacher:512,factored:2048,eigen:512:64] [--subsets 50]
        [--repeats 4] [--workers 2] [--threads 2] [--out runs/projection-width]
    python benchmarks/projection_width_lds.py --draw runs/projection-width-64,runs/projection-width \
        --figure docs/projection_width.png

The random projections' error grows with the parameters per projected dimension (p / k), the eigen
projection's does not need to: it keeps each layer's top Kronecker-factor directions. This measures that on
one model: the example's GPT-2 (two AdamW stages) widened to ``--width``, the Conv1D layers attributed (the task
of ``capture_text_lds.py``), one store per ``kind:k`` featurized from the same recorded run and fitted with the
same SOURCE. The recorded run and the ground truth (the pre-trained model fine-tuned again on random halves,
α = 0.5) are ``capture_text_lds.py``'s, under REFERENCE (``run``, ``finetune/retrains``): made there when missing,
reused when present. Prints LDS [95 % CI], each store's per-query difference to the first variant with a 95 %
bootstrap interval, and featurize seconds; writes OUT/results.json and OUT/lds.png (LDS against k, a line per
kind). A variant ``kind:k:M`` takes the projected Fisher of about M examples of each stage
(``FeaturizeArguments.fisher_examples``: whole batches, drawn in every row chunk), ``kind:k:b=n`` the eigen basis
from at most n checkpoints of each stage (``ProjectionArguments.basis_checkpoints``), ``kind:k:partial=n`` the eigen
basis with every factor wider than n decomposed for its leading eigenpairs only (``projection/eigen.py:
PARTIAL_ABOVE``, 2,048 in the library, above every factor of this model). ``--draw`` draws earlier runs'
results side by side, a panel each, into ``--figure``. The dense ``rademacher`` kind redraws a p × k matrix for
every batch: about 10 minutes at width 256 and k = 512 on 2 threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "text"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import capture_text_lds as ctl  # noqa: E402
import lm  # noqa: E402
from capture_lds import paired  # noqa: E402

import source_proj as sp  # noqa: E402
from source_proj import evaluation as ev  # noqa: E402
from source_proj.figures import pyplot, save_figure  # noqa: E402
from source_proj.projection import eigen  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256, help="the model's n_embd (the example's is 64)")
    parser.add_argument("--reference", type=Path, default=Path("runs/text-w256"))
    parser.add_argument("--variants", default="eigen:512,factored:512,rademacher:512,factored:2048")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("runs/projection-width"))
    parser.add_argument("--draw", default=None, help="comma-separated OUT folders of earlier runs: draw them only")
    parser.add_argument("--figure", type=Path, default=Path("runs/projection-width.png"), help="with --draw")
    args = parser.parse_args()
    if args.draw:
        draw([json.loads((Path(d) / "results.json").read_text()) for d in args.draw.split(",")], args.figure)
        return
    torch.set_num_threads(args.threads)
    config = ctl.CONFIG[0] = replace(lm.CONFIG, n_embd=args.width)
    run = args.reference / "run"
    if not (run / "trajectory.json").exists() or not sp.Trajectory.load(run).complete:
        lm.train(config, seed=0, run_dir=run)
    variants = {}
    for item in args.variants.split(","):  # kind:k, kind:k:M (the Fisher of about M examples a stage), kind:k:b=n
        kind, dim, *extra = item.split(":")
        label, examples, basis, partial = kind, None, None, None
        for part in extra:
            if part.startswith("b="):  # the eigen basis from at most n checkpoints a stage
                basis = int(part.removeprefix("b="))
                label += f" basis of {basis} checkpoints"
            elif part.startswith("partial="):  # factors wider than n decomposed for their leading eigenpairs
                partial = int(part.removeprefix("partial="))
                label += f" leading eigenpairs above {partial}"
            else:
                examples = int(part)
                label += f" Fisher of {examples}"
        projection = sp.ProjectionArguments(dim=int(dim), kind=kind, basis_checkpoints=basis)
        variants[f"{label}, k = {dim}"] = (projection, examples, partial)
    scores, seconds, rows = {}, {}, None
    for name, (projection, examples, partial) in variants.items():
        store = args.out / f"{name.replace(', k = ', '-k').replace(' ', '-')}.sp"
        options = sp.FeaturizeArguments(batch_size=32, chunk_rows=128, fisher_examples=examples)
        start = time.perf_counter()
        default = eigen.PARTIAL_ABOVE
        eigen.PARTIAL_ABOVE = default if partial is None else partial
        try:
            sp.featurize(run, lm.build_model(config=config), ctl.task(), lm.corpus(config).train, store,
                         projection=projection, options=options, overwrite=True, progress=False)  # fmt: skip
        finally:
            eigen.PARTIAL_ABOVE = default
        seconds[name] = time.perf_counter() - start
        sp.fit(store, sp.FitArguments(stages=("finetune",), method=ctl.METHOD), overwrite=True, progress=False)
        attributor = sp.Attributor(store, lm.build_model(config=config), ctl.task(), method=ctl.METHOD)
        scores[name], rows = attributor.scores(lm.corpus(config).queries), attributor.rows
        print(f"{name}: featurized in {seconds[name]:.1f} s", flush=True)
    assert rows is not None
    lds_args = ev.LDSArguments(alpha=0.5, num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    truth = ev.lds_ground_truth(lm.Retrain(str(run), config=config, fixed_init=False), rows,
                                args.reference / "finetune" / "retrains", lds_args)  # fmt: skip
    results = {name: ev.lds(s, truth, lds_args) for name, s in scores.items()}
    first = next(iter(results))
    model = lm.build_model(config=config)
    chosen = set(ctl.task().select_parameters(model))
    params = sum(p.numel() for name, p in model.named_parameters() if name in chosen)
    lines = [f"width {args.width} ({params:,} parameters attributed), M = {args.subsets}, R = {args.repeats}, "
             f"{len(lm.corpus(config).queries)} queries", "",
             f"| projection | LDS [95 % CI] | − {first}, per query [95 % CI] | featurize s |",
             "|---|---|---|---|"]  # fmt: skip
    for name, result in results.items():
        diff = "" if name == first else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*paired(result, results[first]))
        lines.append(f"| {name} | {result.mean:.3f} [{result.low:.3f}, {result.high:.3f}] | {diff} | "
                     f"{seconds[name]:.1f} |")  # fmt: skip
    print("\n".join(lines))
    record = {"width": args.width, "parameters": params, "queries": len(lm.corpus(config).queries),
              "results": {n: {"lds": r.mean, "low": r.low, "high": r.high, "featurize_s": seconds[n]}
                          for n, r in results.items()}}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    draw([record], args.out / "lds.png")


COLORS = {"eigen": "tab:blue", "factored": "tab:orange", "rademacher": "tab:green"}


def draw(records: list[dict], path: Path) -> None:
    """LDS against k (log scale), a line per projection kind with its 95 % interval, a panel per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(records), figsize=(4.6 * len(records), 3.6), sharey=True, squeeze=False)
    for ax, record in zip(axes[0], records, strict=True):
        kinds: dict[str, list[tuple[int, dict]]] = {}
        for name, r in record["results"].items():
            kind, _, dim = name.partition(", k = ")
            kinds.setdefault(kind, []).append((int(dim), r))
        for kind, points in kinds.items():
            points.sort(key=lambda p: p[0])
            ks, mid = [k for k, _ in points], [r["lds"] for _, r in points]
            err = [[r["lds"] - r["low"] for _, r in points], [r["high"] - r["lds"] for _, r in points]]
            ax.errorbar(ks, mid, yerr=err, marker="o", capsize=3, label=kind, color=COLORS.get(kind))
        ax.set_xscale("log", base=2)
        ticks = sorted({int(name.partition(", k = ")[2]) for name in record["results"]})
        ax.set_xticks(ticks, [f"{k:,}" for k in ticks])
        ax.minorticks_off()
        ax.set_xlabel("projection dimension k")
        ax.set_title(f"width {record['width']}: {record['parameters']:,} parameters")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("LDS (SOURCE, fine-tuning stage)")
    axes[0][-1].legend(loc="lower right")
    save_figure(fig, path)
    print(f"picture: {path}")


if __name__ == "__main__":
    main()
