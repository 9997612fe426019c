"""Issue 12's ablation through the public API: which curvature, Fisher estimate and segmentation SOURCE
should use by default, scored by LDS on the harness's settings (model 0, cached ground truths).

    python benchmarks/accuracy/ablation.py [--settings early,two-stage] [--root runs/accuracy] [--dim 1024]
        [--out runs/accuracy/ablation.md]

Per setting, one store of model 0 per Fisher estimate in ``--fishers`` (k = ``--dim``, dense Rademacher):
the sampled Fisher (one label drawn from the model per example), the exact expectation over classes, and
the empirical Fisher (the observed labels' gradients, i.e. the training gradients themselves),
each with ``curvature="both"`` (Kronecker factors in the full parameter space *and* the projected
pseudo-label gradients), so every variant below is fitted from the same gradients:

- curvature: ``kfac`` (per-layer Kronecker factors, full parameter space) vs ``projected`` (k × k
  Gauss–Newton in the projected space);
- segmentation: 1 and 3 segments per stage, and ``auto`` without a budget;
- Fisher: sampled vs exact vs empirical.

Printed and written as a markdown table: LDS with its 95 % bootstrap interval over queries per query set,
and the seconds featurize and fit took.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import source_proj as sp

REPEATS = {"two-stage": 10, "converged": 10}
VARIANTS = {
    # name: (fisher store, FitArguments keywords)
    "kfac, 3/stage": ("sampled", {"curvature": "kfac", "segments_per_stage": 3}),
    "kfac, 1/stage": ("sampled", {"curvature": "kfac", "segments_per_stage": 1}),
    "kfac, auto": ("sampled", {"curvature": "kfac", "auto_segments": 0}),
    "projected, 3/stage": ("sampled", {"curvature": "projected", "segments_per_stage": 3}),
    "projected, 1/stage": ("sampled", {"curvature": "projected", "segments_per_stage": 1}),
    "kfac, 3/stage, exact Fisher": ("exact", {"curvature": "kfac", "segments_per_stage": 3}),
    "kfac, 1/stage, exact Fisher": ("exact", {"curvature": "kfac", "segments_per_stage": 1}),
    "projected, 3/stage, exact Fisher": ("exact", {"curvature": "projected", "segments_per_stage": 3}),
    "projected, 1/stage, empirical Fisher": ("empirical", {"curvature": "projected", "segments_per_stage": 1}),
    "projected, 3/stage, empirical Fisher": ("empirical", {"curvature": "projected", "segments_per_stage": 3}),
    "kfac, 1/stage, empirical Fisher": ("empirical", {"curvature": "kfac", "segments_per_stage": 1}),
    "kfac, 3/stage, empirical Fisher": ("empirical", {"curvature": "kfac", "segments_per_stage": 3}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="early,two-stage")
    parser.add_argument("--root", default=str(harness.ROOT))
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fishers", default="sampled,exact", help="the Fisher estimates to featurize and compare")
    parser.add_argument(
        "--kind",
        default="rademacher",
        help="projection kind; 'identity' stores the full gradients (k = p, Kronecker curvature only)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["| setting | query set | variant | LDS [95 % CI] |", "|---|---|---|---|"]
    for name in args.settings.split(","):
        h = harness.prepare(name, root=args.root, repeats=REPEATS.get(name, 20), progress=False)
        stages = (h.setting.attributed,)
        stores = {}
        fishers = args.fishers.split(",")
        exact = args.kind == "identity"
        for fisher in fishers:
            start = time.perf_counter()
            stores[fisher] = sp.featurize(
                h.runs[0],
                h.build_model(),
                h.task,
                h.train_data,
                h.folder / (f"ablation-{fisher}-full.sp" if exact else f"ablation-{fisher}-k{args.dim}.sp"),
                projection=sp.ProjectionArguments(dim=args.dim, kind=args.kind),
                options=sp.FeaturizeArguments(fisher=fisher, curvature="kfac" if exact else "both"),
                progress=False,
            )
            seconds = time.perf_counter() - start
            curvatures = "Kronecker curvature" if exact else "both curvatures"
            print(f"{name}: featurize ({fisher} Fisher, {curvatures}) {seconds:.0f} s", flush=True)
        for variant, (fisher, keywords) in VARIANTS.items():
            if fisher not in fishers or (exact and keywords["curvature"] != "kfac"):
                continue
            method = "v-" + "".join(c if c.isalnum() else "-" for c in variant)
            start = time.perf_counter()
            arguments = sp.FitArguments(stages=stages, method=method, **keywords)
            sp.fit(stores[fisher], arguments, overwrite=True, progress=False)
            seconds = time.perf_counter() - start
            attributor = sp.Attributor(stores[fisher], h.build_model(), h.task, method=method, batch_size=256)
            for queries in h.query_sets:
                scores = attributor.scores(h.query_data(queries))
                r = h.lds(np.asarray(scores), queries)
                line = f"| {name} | {queries} | {variant} | {r.mean:.3f} [{r.low:.3f}, {r.high:.3f}] |"
                print(line, f"(fit {seconds:.1f} s)", flush=True)
                lines.append(line)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
