"""SOURCE against every baseline by LDS on sklearn's digits, in three settings (see settings.py).

    python examples/digits/lds.py [--settings converged,noisy,two-stage] [--models 5] [--subsets 100]
        [--repeats 10] [--alphas 0.5] [--dim 512] [--workers 2] [--removal] [--further] [--out runs/lds]

For each setting: train ``--models`` models (seeds 0, 1, …) with the trajectory recorder, featurize
each (k = ``--dim``), fit SOURCE and every baseline, and score the 100 query digits with model 0
alone (single model) and with all models (ensemble: scores averaged). The LDS ground truth retrains
on ``--subsets`` random halves of the attributed training data, ``--repeats`` times each with fresh
seeds (cached in OUT/<setting>/retrains: an interrupted run resumes). Prints and writes
OUT/<setting>/lds.md; with several ``--alphas`` also OUT/<setting>/lds_alpha.png. ``--removal`` adds
the subset-removal curve (OUT/<setting>/removal.png) and ``--further`` the further-training gold
standard for model 0. Nothing is tuned: every setting, size and query set is fixed in advance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits
import settings

import source_proj as sp
from source_proj import evaluation as ev
from source_proj.query.attributor import StageRows

BASELINES = ("trak", "if", "tracin", "grad-dot", "grad-cos", "repsim")


def prepare(s: settings.Setting, out: Path, models: int, dim: int) -> list[Path]:
    """Train, featurize and fit every method for each model; returns the stores (reused when present)."""
    stores = []
    data = {st.name: st.data for st in s.stages}
    for seed in range(models):
        run, store = out / f"run-{seed}", out / f"model-{seed}.sp"
        if not (run / "trajectory.json").exists() or not sp.Trajectory.load(run).complete:
            s.train(seed, run_dir=str(run))
        sp.featurize(
            run,
            digits.build_model(),
            digits.build_task(),
            data,
            store,
            projection=sp.ProjectionArguments(dim=dim),
            options=sp.FeaturizeArguments(batch_size=256),
            progress=False,
        )
        stages = (s.attributed,)
        sp.fit(store, sp.FitArguments(segments_per_stage=s.segments_per_stage, stages=stages), progress=False)
        if s.segments_per_stage > 1:
            sp.fit(store, sp.FitArguments(segments_per_stage=1, stages=stages, method="source-L1"), progress=False)
        for kind in BASELINES:
            sp.fit_baseline(
                store,
                sp.BaselineArguments(kind=kind, stages=stages),
                model=digits.build_model(),
                task=digits.build_task(),
                train_data=data,
                progress=False,
            )
        stores.append(store)
    return stores


def all_scores(s: settings.Setting, stores: list[Path]) -> tuple[dict[str, np.ndarray], list[StageRows]]:
    """Single-model (model 0) and ensemble scores ``[Q, N]`` of every fitted method."""
    fitted = sp.Store.open(stores[0]).meta["methods"]
    methods = [m for m in ("source", "source-L1", *BASELINES) if m in fitted]
    scores: dict[str, np.ndarray] = {}
    rows = None
    for method in methods:
        ensemble = sp.Ensemble.open(stores, digits.build_model(), digits.build_task(), method=method, batch_size=256)
        rows = ensemble.rows
        scores[method] = ensemble.attributors[0].scores(s.queries)
        if len(stores) > 1:
            scores[f"{method} ×{len(stores)}"] = ensemble.scores(s.queries)
    assert rows is not None
    return scores, rows


@dataclass(frozen=True)
class FurtherTrain:
    """Continue training model 0 of a setting on the kept examples (picklable for worker processes)."""

    name: str
    run: str
    epochs: int

    def __call__(self, keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        s = settings.setting(self.name)
        model = digits.build_model()
        trajectory = sp.Trajectory.load(self.run)
        trajectory.load_into(model, trajectory.final_checkpoint)
        stage = next(st for st in s.stages if st.name == s.attributed)
        recipe = digits.TrainConfig(
            epochs=self.epochs,
            lr=stage.config.lr / 10,
            momentum=stage.config.momentum,
            weight_decay=stage.config.weight_decay,
        )
        tuned = digits.train_stages(
            [digits.Stage(stage.name, stage.data, recipe, keep[s.attributed])], seed=seed, model=model
        )
        return digits.margins(tuned, s.queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(settings.SETTINGS))
    parser.add_argument("--models", type=int, default=5, help="models in the ensemble (model 0 = single model)")
    parser.add_argument("--subsets", type=int, default=100, help="M, LDS subsets")
    parser.add_argument("--repeats", type=int, default=10, help="R, retrains per subset")
    parser.add_argument("--alphas", default="0.5", help="kept fractions, e.g. 0.25,0.5,0.75")
    parser.add_argument("--dim", type=int, default=512, help="projection dimension k")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--removal", action="store_true", help="also the subset-removal curve")
    parser.add_argument("--further", action="store_true", help="also the further-training gold standard")
    parser.add_argument("--out", default="runs/lds")
    args = parser.parse_args()
    if args.repeats < 2:  # checked before any training: the report's split-half reliability needs two halves
        parser.error(f"argument --repeats: {args.repeats} leaves no second half for the ground truth's split-half "
                     "reliability; ask for 2 or more")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    alphas = [float(a) for a in args.alphas.split(",")]
    for name in args.settings.split(","):
        s = settings.setting(name)
        out = Path(args.out) / name
        t0 = time.perf_counter()
        stores = prepare(s, out, args.models, args.dim)
        scores, rows = all_scores(s, stores)
        prep_s = time.perf_counter() - t0
        truths = []
        for alpha in alphas:
            lds_args = ev.LDSArguments(
                alpha=alpha, num_subsets=args.subsets, repeats=args.repeats, workers=args.workers
            )
            truths.append(ev.lds_ground_truth(settings.Retrain(name), rows, out / "retrains", lds_args))
        results = ev.compare(scores, truths)
        # Below the table: each ground truth's noise ceiling, each method's paired difference from the best.
        table = ev.format_table(results, alphas) + "\n" + ev.format_comparison(scores, truths, results)
        header = (
            f"## {name}: N={sum(r.size for r in rows)} attributed, {len(s.queries)} queries, k={args.dim}, "
            f"M={args.subsets}, R={args.repeats}, models={args.models}\n"
            f"(prepare: {prep_s:.0f}s, total {time.perf_counter() - t0:.0f}s)\n"
        )
        print(header + table + "\n", flush=True)
        (out / "lds.md").write_text(header + "\n```\n" + table + "\n```\n")
        (out / "lds.json").write_text(
            json.dumps(
                {
                    m: [
                        {"alpha": a, "lds": r.mean, "low": r.low, "high": r.high}
                        for a, r in zip(alphas, rs, strict=True)
                    ]
                    for m, rs in results.items()
                },
                indent=1,
            )
        )
        if len(alphas) > 1:
            shown = {m: rs for m, rs in results.items() if "×" not in m}
            print("plot:", ev.plot_lds(shown, alphas, out / "lds_alpha.png", title=f"digits, {name}, single model"))
        if args.removal:
            single = {m: v for m, v in scores.items() if "×" not in m and m != "source-L1"}
            removal = ev.subset_removal(
                single,
                settings.Retrain(name, decision=True),
                rows,
                out / "retrains-decision",
                ev.RemovalArguments(workers=args.workers),
            )
            for m, r in removal.items():
                print(
                    f"removal {m:10s} "
                    + "  ".join(f"k={k}: {f:.2f}" for k, f in zip(r.ks, r.fraction, strict=True))
                    + f"  ({len(r.queries)} queries)"
                )
            print("plot:", ev.plot_removal(removal, out / "removal.png", title=f"digits, {name}, single model"))
        if args.further:
            examples = np.random.default_rng(0).choice(sum(r.size for r in rows), 50, replace=False)
            for epochs in (1, 4):
                gold = ev.further_training_ground_truth(
                    FurtherTrain(name, str(out / "run-0"), epochs),
                    rows,
                    examples,
                    out / f"further-{epochs}",
                    ev.FurtherTrainingArguments(workers=args.workers),
                )
                for m, v in scores.items():
                    if "×" in m:
                        continue
                    agree = ev.agreement(v, gold)
                    print(
                        f"further training {epochs} epoch(s)  {m:10s} spearman {agree.spearman}  "
                        f"cosine {agree.cosine:.3f}"
                    )


if __name__ == "__main__":
    main()
