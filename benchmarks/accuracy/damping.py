"""SOURCE's damping (issue 12): LDS of SOURCE fitted with ``FitArguments.damping_factor`` f over a grid, on
the harness's cached stores and ground truths, and f chosen on half of the queries, scored on the other.

    python benchmarks/accuracy/damping.py --setting converged --store ablation-sampled-k1024.sp --repeats 10
        [--factors 0,0.1,0.3,1,3,10] [--segments 1] [--curvature projected] [--mnist DIR] [--subsets 100]
        [--out runs/accuracy/damping-converged.json]

Each segment's curvature gets λ = its weight decay + f × its mean eigenvalue (f = 0: the paper's SOURCE).
The store must exist (``run.py`` or ``ablation.py`` featurizes it); every f is fitted under its own method
name (``damping-<segments>-<curvature>-<f>``), so the features are computed once.

Selection without peeking: the queries are split into even and odd positions; f is chosen on one half by
its LDS there and scored on the other, both ways round ("cross-fitted"); the printed "f = 0 there" is the
undamped SOURCE on the same half. Each f > 0 is also compared with f = 0 query by query (paired bootstrap
interval; list 0 first). Printed per query set, and written as JSON with ``--out``. Re-running over the
same store reuses the projected fits (fit re-reads the features, but skips the eigendecompositions);
Kronecker fits are recomputed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import source_proj as sp
from source_proj.store.store import is_store


def cross_fitted(per_query: dict[float, np.ndarray]) -> list[tuple[float, float, float]]:
    """Per half h of the queries: (f chosen on the other half, its LDS on h, f = 0's LDS on h)."""
    count = len(next(iter(per_query.values())))
    even = np.arange(count) % 2 == 0
    out = []
    for chosen_on, scored_on in ((even, ~even), (~even, even)):
        best = max(per_query, key=lambda f: float(np.nanmean(per_query[f][chosen_on])))
        undamped = float(np.nanmean(per_query[0.0][scored_on])) if 0.0 in per_query else float("nan")
        out.append((best, float(np.nanmean(per_query[best][scored_on])), undamped))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_setting_arguments(parser)
    parser.add_argument("--store", required=True, help="the store's file name in the setting's folder")
    parser.add_argument("--factors", default="0,0.1,0.3,1,3,10")
    parser.add_argument("--segments", default="1", help="segments per stage, or 'auto'")
    parser.add_argument("--curvature", default="projected", choices=["projected", "kfac"])
    args = parser.parse_args()
    h = harness.prepare_model_0(args)
    store = h.folder / args.store
    if not is_store(store):
        sys.exit(f"No store at {store}: featurize it first (run.py or ablation.py).")
    segmentation = {"auto_segments": 0} if args.segments == "auto" else {"segments_per_stage": int(args.segments)}
    per_query: dict[str, dict[float, np.ndarray]] = {}
    results: dict[str, dict] = {}
    undamped: dict[str, dict[float, np.ndarray]] = {}  # f = 0's scores, for paired differences
    for factor in (float(f) for f in args.factors.split(",")):
        method = f"damping-{args.segments}-{args.curvature}-{factor:g}"
        start = time.perf_counter()
        fit_args = sp.FitArguments(
            stages=(h.setting.attributed,), method=method, curvature=args.curvature, damping_factor=factor,
            **segmentation,
        )  # fmt: skip
        sp.fit(store, fit_args, progress=False)
        seconds = time.perf_counter() - start
        attributor = sp.Attributor(store, h.build_model(), h.task, method=method, batch_size=256)
        for queries in h.query_sets:
            scores = np.asarray(attributor.scores(h.query_data(queries)))
            lds = h.lds(scores, queries)
            per_query.setdefault(queries, {})[factor] = lds.per_query
            results.setdefault(queries, {})[f"{factor:g}"] = [lds.mean, lds.low, lds.high]
            paired = ""
            if factor and 0.0 in undamped.get(queries, {}):
                delta = h.difference(scores, undamped[queries][0.0], queries)
                results[queries][f"{factor:g} - 0"] = list(delta)
                paired = f", minus f=0: {delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]"
            elif not factor:
                undamped.setdefault(queries, {})[0.0] = scores
            print(f"{args.setting} {queries} f={factor:g}: {lds}{paired} (fit {seconds:.0f} s)", flush=True)
    for queries, per in per_query.items():
        halves = cross_fitted(per)
        for half, (best, score, undamped) in zip(("odd", "even"), halves, strict=True):
            line = f"f={best:g} (chosen on the other half) on the {half} queries: {score:.3f}, f=0: {undamped:.3f}"
            print(f"  {queries}: {line}")
        mean = float(np.mean([s for _, s, _ in halves]))
        print(f"  {queries}: cross-fitted LDS {mean:.3f}")
        results[queries]["cross-fitted"] = {"mean": mean, "halves": halves}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
