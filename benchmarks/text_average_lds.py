"""SOURCE's segment average on the text example, by LDS: the mean over each segment's steps (the default since
2026-12-02) against the plain mean of its checkpoints (the paper's rule, ``FitArguments(average="checkpoints")``).

The text example's two-stage GPT-2 (``examples/text/lm.py``; AdamW with warm-up and decay, pre-trained from a
random initialisation) recorded once, one store at k = ``--dim`` (eigen projection); SOURCE with each rule and
TracIn-CP per stage, against ``examples/text/lds.py``'s ground truths: ``pretrain-fixed-init`` (both stages
retrained from the recorded initialisation, pre-training data attributed) and ``finetune`` (the recorded
pre-trained model fine-tuned again), ``--subsets`` halves × ``--repeats`` retrains each; paired per-query
difference with its 95 % bootstrap interval.

    python benchmarks/text_average_lds.py --out runs/text-average
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "text"))
import lm

import source_proj as sp
from source_proj import evaluation as ev

SETTINGS = (("pretrain-fixed-init", "pretrain", True), ("finetune", "finetune", False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--settings", default=",".join(s for s, _, _ in SETTINGS))
    parser.add_argument("--out", type=Path, default=Path("runs/text-average"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    run, store = args.out / "run", args.out / "model.sp"
    if not (run / "trajectory.json").exists() or not sp.Trajectory.load(run).complete:
        lm.train(seed=0, run_dir=run)
    data, queries, task = lm.corpus().train, lm.query_data(), lm.build_task()
    if not store.is_dir() or not sp.Store.open(store).meta.get("featurized"):  # new, or resumed
        sp.featurize(run, lm.build_model(), task, data, store, projection=sp.ProjectionArguments(dim=args.dim),
                     options=sp.FeaturizeArguments(batch_size=32, chunk_rows=128), progress=False)  # fmt: skip
    lds_args = ev.LDSArguments(alpha=0.5, num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    report = {}
    for setting, stage, fixed_init in SETTINGS:
        if setting not in args.settings.split(","):
            continue
        scores, rows = {}, None
        for average in ("checkpoints", "steps"):
            method = f"source-{stage}-{average}"
            sp.fit(store, sp.FitArguments(stages=(stage,), method=method, average=average), overwrite=True,
                   progress=False)  # fmt: skip
            attributor = sp.Attributor(store, lm.build_model(), task, method=method)
            scores[average], rows = attributor.scores(queries), attributor.rows
        sp.fit_baseline(store, sp.BaselineArguments(kind="tracin", stages=(stage,), method=f"tracin-{stage}"),
                        model=lm.build_model(), task=task, train_data=data, overwrite=True, progress=False)  # fmt: skip
        scores["tracin"] = sp.Attributor(store, lm.build_model(), task, method=f"tracin-{stage}").scores(queries)
        retrain = lm.Retrain(str(run), fixed_init=fixed_init)
        truth = ev.lds_ground_truth(retrain, rows, args.out / setting / "retrains", lds_args)
        results = {name: ev.lds(matrix, truth, lds_args) for name, matrix in scores.items()}
        delta = results["steps"].per_query - results["checkpoints"].per_query
        delta = delta[np.isfinite(delta)]
        boot = np.random.default_rng(0).choice(delta, (2000, len(delta))).mean(1)
        low, high = np.percentile(boot, [2.5, 97.5])
        report[setting] = {**{n: {"lds": r.mean, "ci": [r.low, r.high], "per_query": r.per_query.tolist()}
                              for n, r in results.items()},
                           "steps - checkpoints": {"mean": float(delta.mean()), "ci": [float(low), float(high)]}}
        line = ", ".join(f"{n} {r.mean:.3f} [{r.low:.3f}, {r.high:.3f}]" for n, r in results.items())
        print(f"{setting}: {line}; steps − checkpoints {delta.mean():+.3f} [{low:+.3f}, {high:+.3f}]", flush=True)
    (args.out / "result.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
