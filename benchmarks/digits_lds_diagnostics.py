"""Why does a method win or lose a digits setting? LDS of SOURCE and IF variants on *validation* queries.

    python benchmarks/digits_lds_diagnostics.py --setting converged [--out runs/lds] [--workers 2]

Run after ``examples/digits/lds.py`` (it reuses that run's models and stores). The ground truth here
measures the next 100 test digits (settings.setting(..., validation=True)), never the reported
queries, so these variants inform without tuning on the test queries. Variants, single model 0 and
the 5-model ensemble:

- SOURCE with 1, 2, 3 (default) and 6 segments;
- SOURCE (3 segments) with every segment's training time η̄K scaled by 0.1 … 10 (the implied
  damping 1/(η̄K) scales inversely);
- IF with damping factor 0.01, 0.1 (the default before issue 12) and 1 (× the Fisher's mean eigenvalue).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
import digits
import settings

import source_proj as sp
from source_proj import evaluation as ev
from source_proj.methods.fit import _fold_chunk, segment_operators, store_segments
from source_proj.methods.source import fold


def scaled_source_features(store: sp.Store, args: sp.FitArguments, scale: float) -> np.ndarray:
    """SOURCE's T(z) ``[N, k]`` with every segment's time η̄K multiplied by ``scale``."""
    segments = store_segments(store, args)
    operators = [dataclasses.replace(op, time=op.time * scale) for op in segment_operators(store, segments)]
    folded = fold(operators)
    meta = store.meta
    rows = meta["featurize"]["chunk_rows"]
    out = []
    for stage in args.stages or [s["name"] for s in meta["trajectory"]["stages"]]:
        size = next(s["dataset_size"] for s in meta["trajectory"]["stages"] if s["name"] == stage)
        out += [_fold_chunk(store, stage, c, size, segments, folded) for c in range(-(-size // rows))]
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="converged", choices=settings.SETTINGS)
    parser.add_argument("--out", default="runs/lds")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    s = settings.setting(args.setting, validation=True)
    out = Path(args.out) / args.setting
    stores = sorted(out.glob("model-*.sp"))
    if not stores:
        raise SystemExit(f"no stores in {out}; run examples/digits/lds.py --settings {args.setting} first")
    model, task = digits.build_model(), digits.build_task()
    stages = (s.attributed,)
    variants: dict[str, list[np.ndarray]] = {}
    for path in stores:
        store = sp.Store.open(path, writable=True)
        for segs in (1, 2, 3, 6):
            name = f"source-L{segs}"
            sp.fit(store, sp.FitArguments(segments_per_stage=segs, stages=stages, method=name), progress=False)
            variants.setdefault(name, []).append(sp.Attributor(store, model, task, method=name).scores(s.queries))
        query = sp.Attributor(store, model, task, method="source").query_features(s.queries).numpy()
        base = sp.FitArguments(segments_per_stage=s.segments_per_stage, stages=stages)
        for scale in (0.1, 0.3, 1.0, 3.0, 10.0):
            feats = scaled_source_features(store, base, scale)
            variants.setdefault(f"source η̄K×{scale:g}", []).append(query @ feats.T)
        for factor in (0.01, 0.1, 1.0):
            name = f"if-damping{factor:g}"
            fit_args = sp.BaselineArguments(kind="if", method=name, stages=stages, damping_factor=factor)
            sp.fit_baseline(store, fit_args, progress=False)
            variants.setdefault(name, []).append(sp.Attributor(store, model, task, method=name).scores(s.queries))
        rows = sp.Attributor(store, model, task, method="source").rows
    lds_args = ev.LDSArguments(num_subsets=args.subsets, repeats=args.repeats, workers=args.workers, seed=1)
    truth = ev.lds_ground_truth(settings.Retrain(args.setting, validation=True), rows, out / "retrains-val", lds_args)
    scores = {}
    for name, per_model in variants.items():
        scores[name] = per_model[0]
        scores[f"{name} ×{len(per_model)}"] = np.mean(per_model, axis=0)
    print(f"## {args.setting}: validation queries (test digits 100-199), M={args.subsets}, R={args.repeats}")
    print(ev.format_table(ev.compare(scores, [truth], lds_args), [0.5]))


if __name__ == "__main__":
    main()
