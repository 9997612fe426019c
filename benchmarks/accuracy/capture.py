"""In-run SOURCE (gradients captured during training) against post-hoc SOURCE (featurized afterwards), by LDS
on a harness setting (issue 16; ``benchmarks/capture_lds.py`` does the same on the digits example's settings).

    python benchmarks/accuracy/capture.py --setting mnist-noisy --mnist ../shared/data/mnist --repeats 10
        [--dim 1024] [--fisher-every 1,4] [--kinds eigen,factored] [--end-pass off,on] [--subsets 100]
        [--out runs/accuracy/capture-mnist-noisy.json] [--folder capture]

Model 0 of the setting is trained again with the recorder and ``GradientCapture`` (for each projection of
``--kinds``: k = ``--dim``, sampled Fisher on every ``n``-th batch for each n of ``--fisher-every``).
Capture does not change training, so the captured trajectory must be bit-identical to the harness's
``run-0``; this is checked, and the run is refused otherwise. The post-hoc stores are the harness's own
``model-0-<kind>-k<dim>.sp`` (featurized from ``run-0``; made here if missing), one per projection, and
each in-run store is compared with the post-hoc store of its projection. Every store is fitted
with the library's defaults and scored on the setting's queries against its cached ground truth.
Printed and written to ``--out``: LDS [95 % CI] of each store, and each in-run variant minus post-hoc per
query (paired 95 % bootstrap interval), a variant with the Fisher on every n-th batch also minus the same
projection's in-run store with the Fisher on every batch (when n = 1 is among ``--fisher-every``), a variant with
``CaptureArguments(end_pass=True)`` (``--end-pass on``) also minus the same variant without it, plus the wall
time of the captured training against training alone. The captured runs and stores go to the setting's cache
folder's ``--folder`` (``capture``), overwritten there; another name keeps an earlier measurement's stores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import source_proj as sp


def capturer(store: Path, dim: int, options: sp.CaptureArguments, h: harness.Prepared, kind: str):
    """``capture(recorder)`` for ``Setting.train_recorded``: a GradientCapture into ``store``."""

    def start(recorder: sp.TrajectoryRecorder) -> sp.GradientCapture:
        projection = sp.ProjectionArguments(dim=dim, kind=kind)
        return sp.GradientCapture(
            recorder, store, h.task, projection=projection, options=options, datasets=h.train_data, overwrite=True
        )

    return start


END_PASS: dict[str, bool | str] = {"off": False, "on": True, "auto": "auto"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_setting_arguments(parser)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--fisher-every", default="1", help="in-run variants: the sampled Fisher on every n-th batch")
    parser.add_argument("--kinds", default="eigen,factored", help="the projections, in-run and post-hoc")
    parser.add_argument("--folder", default="capture", help="the captured runs and stores, in the setting's folder")
    parser.add_argument("--end-pass", default="off", help="in-run variants without (off) and with (on) the end pass, "
                        "and at the default (auto: the pass on every stage datasets= holds)")  # fmt: skip
    args = parser.parse_args()
    h = harness.prepare_model_0(args)
    fit = sp.FitArguments(stages=(h.setting.attributed,))
    folder = h.folder / args.folder
    kinds = args.kinds.split(",")
    stores, kind_of, every_batch = {}, {}, {}  # every_batch: the in-run store with the Fisher on every batch
    without_end: dict[str, str] = {}  # an end-pass variant → the same variant without it
    for kind in kinds:
        post_hoc = h.folder / f"model-0-{kind}-k{args.dim}.sp"
        sp.featurize(h.runs[0], h.build_model(), h.task, h.train_data, post_hoc,
                     projection=sp.ProjectionArguments(dim=args.dim, kind=kind), progress=False)  # fmt: skip
        sp.fit(post_hoc, fit, progress=False)
        stores[f"post-hoc ({kind})"] = post_hoc
    seconds = {}
    start = time.perf_counter()
    h.setting.train_recorded(0, folder / "plain")
    seconds["training alone"] = time.perf_counter() - start
    reference = sp.Trajectory.load(h.runs[0]).fingerprint()
    for kind in kinds:
        for every, end in itertools.product(
            (int(n) for n in args.fisher_every.split(",")), (END_PASS[e] for e in args.end_pass.split(","))
        ):
            nth = f"{every}" + {2: "nd", 3: "rd"}.get(every, "th")
            plain = f"in-run ({kind})" + ("" if every == 1 else f", Fisher every {nth} batch")
            name = plain + {False: "", True: ", end pass", "auto": ", end pass at the default"}[end]
            tag = {False: "", True: "-end", "auto": "-auto"}[end]
            if end:
                without_end[name] = plain
            run = folder / f"run-{kind}-fisher-{every}{tag}"
            store = folder / f"in-run-{kind}-fisher-{every}{tag}-k{args.dim}.sp"
            options = sp.CaptureArguments(fisher_every=every, end_pass=end)
            start = time.perf_counter()
            h.setting.train_recorded(0, run, capture=capturer(store, args.dim, options, h, kind))
            seconds[name] = time.perf_counter() - start
            if sp.Trajectory.load(run).fingerprint() != reference:
                sys.exit(f"{name}: the captured run differs from the harness's run-0; nothing to compare.")
            sp.fit(store, fit, overwrite=True, progress=False)
            stores[name], kind_of[name] = store, kind
            if every == 1 and not end:
                every_batch[kind] = name
    results: dict[str, dict] = {"seconds": seconds}
    for queries in h.query_sets:
        data = h.query_data(queries)
        scores = {
            name: np.asarray(sp.Attributor(store, h.build_model(), h.task, batch_size=256).scores(data))
            for name, store in stores.items()
        }
        for name, values in scores.items():
            lds = h.lds(values, queries)
            entry = {"lds": [lds.mean, lds.low, lds.high]}
            line = f"{args.setting} {queries} {name}: {lds}"
            if name in kind_of:
                delta = h.difference(values, scores[f"post-hoc ({kind_of[name]})"], queries)
                entry["minus post-hoc"] = list(delta)
                line += f", minus post-hoc {delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]"
                base = every_batch.get(kind_of[name])
                if name in without_end and without_end[name] in scores:
                    delta = h.difference(values, scores[without_end[name]], queries)
                    entry["minus no end pass"] = list(delta)
                    line += f", minus no end pass {delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]"
                elif base not in (None, name):
                    delta = h.difference(values, scores[base], queries)
                    entry["minus every batch"] = list(delta)
                    line += f", minus every batch {delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]"
            results.setdefault(queries, {})[name] = entry
            print(line, flush=True)
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
