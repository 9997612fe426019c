"""SOURCE's segment average by LDS: the mean over each segment's steps (``FitArguments.average="steps"``, the
default since 2026-12-02) against the plain mean of its checkpoints (``"checkpoints"``, the paper's rule),
with one and three segments per stage, on the harness's settings (model 0, cached ground truths).

    python benchmarks/accuracy/average.py --setting early [--mnist DIR] [--repeats 20] [--segments 1,3]
        [--dim 1024] [--out runs/accuracy/average-early.json]

Both rules are fitted from one store (the default eigen projection, k = ``--dim``); the paired difference per
query has its 95 % bootstrap interval. TracIn-CP and grad-dot on the same store for context.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import source_proj as sp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_setting_arguments(parser)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--segments", default="1,3", help="segments per stage to compare the rules at")
    args = parser.parse_args()
    h = harness.prepare_model_0(args)
    store = h.folder / f"model-0-eigen-k{args.dim}.sp"
    if not store.is_dir() or not sp.Store.open(store).meta.get("featurized"):
        sp.featurize(h.runs[0], h.build_model(), h.task, h.train_data, store,
                     projection=sp.ProjectionArguments(dim=args.dim, kind="eigen"), progress=False)  # fmt: skip
    stages = (h.setting.attributed,)
    results: dict[str, dict[str, float]] = {}
    for count in (int(c) for c in args.segments.split(",")):
        scores = {}
        for average in ("checkpoints", "steps"):
            method = f"average-{average}-{count}"
            sp.fit(store, sp.FitArguments(segments_per_stage=count, stages=stages, method=method, average=average),
                   overwrite=True, progress=False)  # fmt: skip
            attributor = sp.Attributor(store, h.build_model(), h.task, method=method)
            scores[average] = {q: attributor.scores(h.query_data(q)) for q in h.query_sets}
        for q in h.query_sets:
            row = f"{args.setting} ({q}), {count} per stage"
            old, new = h.lds(scores["checkpoints"][q], q), h.lds(scores["steps"][q], q)
            delta = h.difference(scores["steps"][q], scores["checkpoints"][q], q)
            results[row] = {"checkpoints": old.mean, "steps": new.mean, "steps_low": new.low, "steps_high": new.high,
                            "delta": delta[0], "delta_low": delta[1], "delta_high": delta[2]}  # fmt: skip
            print(f"| {row} | {old.mean:.3f} | **{new.mean:.3f}** [{new.low:.3f}, {new.high:.3f}] | "
                  f"{delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}] |", flush=True)  # fmt: skip
    for kind in ("tracin", "grad-dot"):
        sp.fit_baseline(store, sp.BaselineArguments(kind=kind, stages=stages), model=h.build_model(), task=h.task,
                        train_data=h.train_data, overwrite=True, progress=False)  # fmt: skip
        attributor = sp.Attributor(store, h.build_model(), h.task, method=kind)
        for q in h.query_sets:
            result = h.lds(attributor.scores(h.query_data(q)), q)
            results[f"{args.setting} ({q}), {kind}"] = {"lds": result.mean}
            print(f"{args.setting} ({q}) {kind}: {result.mean:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
