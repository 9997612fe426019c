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
from source_proj.methods.fit import _checkpoint_means, feature_points, segment_operators, store_segments
from source_proj.methods.source import fold


def scaled_source_features(store: sp.Store, args: sp.FitArguments, scale: float) -> np.ndarray:
    """SOURCE's T(z) ``[N, k]`` with every segment's time η̄K multiplied by ``scale`` (``scale=1``: the features
    ``sp.fit(store, args)`` stores: the same feature points and damping)."""
    segments = store_segments(store, args)
    points = feature_points(store, segments, args.fast, args.average)
    damping = args.resolve_damping("projected", store.meta["projection"]["kind"])
    operators = segment_operators(store, segments, points, damping_factor=damping)
    folded = dict(zip(segments, fold([dataclasses.replace(op, time=op.time * scale) for op in operators]),
                      strict=True))  # fmt: skip
    means = dict(zip(segments, points, strict=True))
    rows = store.meta["featurize"]["chunk_rows"]
    out = []
    for stage in args.stages or [s["name"] for s in store.meta["trajectory"]["stages"]]:
        size = next(s["dataset_size"] for s in store.meta["trajectory"]["stages"] if s["name"] == stage)
        own = [seg for seg in segments if seg.stage == stage]
        for chunk in range(-(-size // rows)):
            total = sum(g @ folded[seg].T for seg, g in zip(own, _checkpoint_means(store, means, stage, chunk, own),
                                                            strict=True))  # fmt: skip
            out.append((-total / size).float().numpy())
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
