"""LDS of SOURCE on digits with the dense Rademacher and the factored (per-layer Kronecker) projection.

    python benchmarks/projection_lds.py [--settings converged,noisy] [--dims 512,2048]
        [--kinds rademacher,factored] [--baselines if,trak] [--subsets 100] [--repeats 5] [--workers 2]
        [--out runs/projection_lds]

Model 0 of each setting of examples/digits/settings.py (the LDS example's settings, queries and
ground-truth retrains, cached in OUT/<setting>/retrains so a re-run resumes); the same SOURCE fit
(the setting's segments) on stores that differ only in the projection. Prints a table of LDS
(α = 0.5, mean Spearman over the 100 queries, 95% bootstrap CI over subsets). ``--baselines`` fits
those baselines on the same stores, so every method is compared at every k.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
import digits
import settings

import source_proj as sp
from source_proj import evaluation as ev


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="converged,noisy")
    parser.add_argument("--dims", default="512,2048")
    parser.add_argument("--kinds", default="rademacher,factored")
    parser.add_argument("--baselines", default="", help="baselines to fit on the same stores, e.g. if,trak")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/projection_lds")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows_out = []
    for name in args.settings.split(","):
        s = settings.setting(name)
        out = Path(args.out) / name
        run = out / "run-0"
        if not (run / "trajectory.json").exists() or not sp.Trajectory.load(run).complete:
            s.train(0, run_dir=str(run))
        data = {st.name: st.data for st in s.stages}
        scores, rows = {}, None
        for kind in args.kinds.split(","):
            for dim in (int(d) for d in args.dims.split(",")):
                store = out / f"{kind}-{dim}.sp"
                t0 = time.perf_counter()
                sp.featurize(run, digits.build_model(), digits.build_task(), data, store,
                             projection=sp.ProjectionArguments(kind=kind, dim=dim),
                             options=sp.FeaturizeArguments(batch_size=256), progress=False)
                featurize_s = time.perf_counter() - t0
                sp.fit(store, sp.FitArguments(segments_per_stage=s.segments_per_stage, stages=(s.attributed,)),
                       progress=False)
                methods = ["source", *(b for b in args.baselines.split(",") if b)]
                for method in methods[1:]:
                    sp.fit_baseline(store, sp.BaselineArguments(kind=method, stages=(s.attributed,)), progress=False)
                for method in methods:
                    attributor = sp.Attributor(store, digits.build_model(), digits.build_task(), method=method,
                                               batch_size=256)
                    rows = attributor.rows
                    scores[(method, kind, dim)] = (attributor.scores(s.queries), featurize_s)
        assert rows is not None
        lds_args = ev.LDSArguments(alpha=0.5, num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
        truth = ev.lds_ground_truth(settings.Retrain(name), rows, out / "retrains", lds_args)
        for (method, kind, dim), (matrix, featurize_s) in scores.items():
            rows_out.append((name, method, kind, dim, ev.lds(matrix, truth, lds_args), featurize_s))
    print("| setting | method | projection | k | LDS (α = 0.5) [95% CI] | featurize (s) |")
    print("|---|---|---|---|---|---|")
    for name, method, kind, dim, result, featurize_s in rows_out:
        lds = f"{result.mean:.3f} [{result.low:.3f}, {result.high:.3f}]"
        print(f"| {name} | {method} | {kind} | {dim} | {lds} | {featurize_s:.1f} |")


if __name__ == "__main__":
    main()
