"""Where in-run SOURCE loses to post-hoc SOURCE: its gradients or its curvature (issue 16).

    python benchmarks/accuracy/capture_gap.py --setting mnist-noisy --mnist ../shared/data/mnist --subsets 100 \
        --repeats 5 [--dim 1024] [--out runs/accuracy/capture-gap-mnist-noisy.json]

Model 0 of the setting is captured once more with the eigen projection and every basis pass whole
(``CaptureArguments(basis_share=None)``): its final basis is then post-hoc featurize's (tested), so the two
stores' features share coordinates and one store's parts can stand in for the other's. The in-run store is
fitted (one segment per stage, the default) with parts swapped in, each scored against post-hoc SOURCE on the
cached ground truth, paired per query:

- in-run as captured;
- in-run gradients, post-hoc curvature (the mean of the checkpoints' Fisher, as post-hoc fit takes it);
- post-hoc gradients (each example's mean over the segment's checkpoints), in-run curvature;
- post-hoc gradients at one checkpoint per epoch drawn at random for each example (one "visit" per epoch at a
  time of its own, as in-run capture takes them; seeded);
- in-run gradients plus the post-hoc gradient at one checkpoint (the first, the middle, the final) counted as one
  more visit of every example: what ``CaptureArguments(end_pass=True)`` does at the final one.

The swaps patch ``WindowGradients`` and ``window_curvature`` for one fit each (a diagnostic, not library
behaviour). Single-stage settings with one segment only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import source_proj as sp
import source_proj.methods.fit as fit_module
from source_proj.featurize import windows
from source_proj.store.store import Store, ckpt_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_setting_arguments(parser)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    h = harness.prepare_model_0(args)
    stage = h.setting.attributed
    fit = sp.FitArguments(stages=(stage,))
    post_hoc = h.folder / f"model-0-eigen-k{args.dim}.sp"
    projection = sp.ProjectionArguments(dim=args.dim, kind="eigen")
    sp.featurize(h.runs[0], h.build_model(), h.task, h.train_data, post_hoc, projection=projection, progress=False)
    in_run = h.folder / "capture-gap" / f"in-run-eigen-k{args.dim}.sp"

    def capture(recorder: sp.TrajectoryRecorder) -> sp.GradientCapture:
        options = sp.CaptureArguments(basis_share=None, end_pass=False)
        return sp.GradientCapture(recorder, in_run, h.task, projection=projection, options=options,
                                  datasets=h.train_data, overwrite=True)  # fmt: skip

    h.setting.train_recorded(0, h.folder / "capture-gap" / "run", capture=capture)
    ps, cs = Store.open(str(post_hoc)), Store.open(str(in_run))
    for name in ps.progress_arrays("projection/basis/"):
        if not np.allclose(ps.read(name), cs.read(name), atol=1e-5):
            sys.exit(f"The in-run store's final basis differs from post-hoc's ({name}): nothing to swap.")
    checkpoints = ps.meta["trajectory"]["checkpoints"]
    grads = {c: ps.read(f"grads/{stage}/{ckpt_key(c)}").astype(np.float64) for c in checkpoints}
    original_means, original_curvature = windows.WindowGradients.__call__, fit_module.window_curvature

    def post_hoc_curvature(store, seg, device="cpu") -> torch.Tensor:
        mats = [fit_module.checkpoint_curvature(ps, seg.stage, c, device) for c in seg.checkpoints]
        return sum(mats) / len(mats)

    def rows_of(self, stage_name: str, chunk: int) -> slice:
        start = self.stage_windows[stage_name][0]
        return slice(*self.store.chunk_rows(windows.window_array("grads", stage_name, start), chunk))

    def post_hoc_means(self, stage_name, chunk, segments):
        at = rows_of(self, stage_name, chunk)
        return [torch.from_numpy(sum(grads[c][at] for c in seg.checkpoints) / len(seg.checkpoints)) for seg in segments]

    def random_checkpoints(per_epoch: list[tuple[int, ...]]) -> Callable:
        def means(self, stage_name, chunk, segments):
            at = rows_of(self, stage_name, chunk)
            rng = np.random.default_rng(chunk)
            total = 0.0
            for options in per_epoch:
                pick = rng.integers(0, len(options), at.stop - at.start)
                total = total + np.choose(pick[:, None], [grads[c][at] for c in options])
            return [torch.from_numpy(total / len(per_epoch))]

        return means

    def plus_visit(checkpoint: int) -> Callable:
        def means(self, stage_name, chunk, segments):
            at = rows_of(self, stage_name, chunk)
            (mean,) = original_means(self, stage_name, chunk, segments)
            visits = sum(
                self.store.read_chunk(windows.window_array("visits", stage_name, w), chunk).astype(np.float64)
                for w in self.stage_windows[stage_name]
            )
            visits = torch.from_numpy(visits)[:, None]
            return [(mean * visits + torch.from_numpy(grads[checkpoint][at])) / (visits + 1)]

        return means

    epochs = h.setting.stages[0].epochs
    windows_per_epoch = (len(checkpoints) - 1) // epochs
    per_epoch = [tuple(checkpoints[e * windows_per_epoch : (e + 1) * windows_per_epoch]) for e in range(epochs)]
    variants: dict[str, tuple[Callable, Callable]] = {
        "in-run": (original_means, original_curvature),
        "in-run gradients, post-hoc curvature": (original_means, post_hoc_curvature),
        "post-hoc gradients, in-run curvature": (post_hoc_means, original_curvature),
        "post-hoc gradients at a random checkpoint per epoch": (random_checkpoints(per_epoch), original_curvature),
        f"in-run + checkpoint {checkpoints[0]} as a visit": (plus_visit(checkpoints[0]), original_curvature),
        f"in-run + checkpoint {checkpoints[len(checkpoints) // 2]} as a visit": (
            plus_visit(checkpoints[len(checkpoints) // 2]),
            original_curvature,
        ),
        f"in-run + checkpoint {checkpoints[-1]} as a visit (the end pass)": (
            plus_visit(checkpoints[-1]),
            original_curvature,
        ),
    }
    queries = h.query_sets[0]
    data = h.query_data(queries)

    def scores(store: Path) -> np.ndarray:
        return np.asarray(sp.Attributor(store, h.build_model(), h.task, batch_size=256).scores(data))

    sp.fit(post_hoc, fit, progress=False)
    base = scores(post_hoc)
    lds = h.lds(base, queries)
    results: dict[str, dict] = {"post-hoc": {"lds": [lds.mean, lds.low, lds.high]}}
    print(f"{args.setting} post-hoc (eigen): {lds}", flush=True)
    try:
        for name, (means, curvature) in variants.items():
            windows.WindowGradients.__call__, fit_module.window_curvature = means, curvature
            sp.fit(in_run, fit, overwrite=True, progress=False)
            values = scores(in_run)
            lds, delta = h.lds(values, queries), h.difference(values, base, queries)
            results[name] = {"lds": [lds.mean, lds.low, lds.high], "minus post-hoc": list(delta)}
            print(f"{name}: {lds}, minus post-hoc {delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]", flush=True)
    finally:
        windows.WindowGradients.__call__, fit_module.window_curvature = original_means, original_curvature
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
