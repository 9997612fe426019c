"""Growing a store by one checkpoint against featurizing the longer run from scratch.

    python benchmarks/grow_store.py [--dim 1024] [--repeats 3] [--threads 2]

sklearn's digits (1,437 training images), the examples' MLP 64-128-128-10, SGD (lr 0.03, momentum 0.9,
batch 64): a run of 230 steps with a checkpoint every 23 (11 checkpoints) is featurized (k = --dim,
Rademacher, sampled Fisher, measurement gradients at θ_T); the run is then resumed and trains 23 steps
more (one more checkpoint, the new θ_T). Timed, --repeats times each (median): featurize of the
short run, featurize --grow of the store by the new checkpoint, featurize of the new checkpoint alone
into a new store (``checkpoint_steps``: what "one checkpoint's featurize" costs, with its measurement
pass and fixed costs), and featurize of the longer run from scratch; the work units (checkpoint ×
stage) each computes are counted from the stores.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
import digits

import source_proj as sp

EVERY = 23


def train(run: Path, steps: int, resume: bool) -> None:
    model = digits.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    if resume:
        rec = sp.TrajectoryRecorder.resume(run, model, opt, save_every=EVERY)
    else:
        rec = sp.TrajectoryRecorder(run, model, opt, save_every=EVERY, save_optimizer_state=True)
        rec.begin_stage("main", dataset_size=1437)
    x, y = digits.train_data("main").tensors
    while rec.global_step < steps:
        rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(rec.global_step))[:64]
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        rec.step()
    rec.close()


def units(store: Path) -> set[str]:
    """The store's finished work units: its gradient arrays ``grads/<stage>/<checkpoint>``."""
    if not store.exists():
        return set()
    s = sp.Store.open(store)
    return {name for name in s.nodes("grads/") if name.count("/") == 2 and s.is_complete(name)}


def featurize(
    run: Path, store: Path, dim: int, grow: bool = False, steps: tuple[int, ...] | None = None
) -> tuple[float, int]:
    """Seconds taken, and the work units (checkpoint × stage) this call added to ``store``."""
    before = units(store)
    t0 = time.perf_counter()
    options = sp.FeaturizeArguments(batch_size=256, checkpoint_steps=steps)
    sp.featurize(
        run,
        digits.build_model(),
        digits.build_task(),
        digits.train_data("main"),
        store,
        projection=sp.ProjectionArguments(dim=dim),
        options=options,
        progress=False,
        grow=grow,
    )
    seconds = time.perf_counter() - t0
    return seconds, len(units(store) - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["short run", "grow by one checkpoint", "new checkpoint alone", "longer run from scratch"]
    times: dict[str, list[float]] = {name: [] for name in names}
    done: dict[str, set[int]] = {name: set() for name in times}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        short, longer = root / "short", root / "longer"
        train(short, 10 * EVERY, resume=False)
        shutil.copytree(short, longer)
        train(longer, 11 * EVERY, resume=True)
        for r in range(args.repeats):
            calls = {
                "short run": (short, f"grown-{r}.sp", False, None),
                "grow by one checkpoint": (longer, f"grown-{r}.sp", True, None),
                "new checkpoint alone": (longer, f"alone-{r}.sp", False, (11 * EVERY,)),
                "longer run from scratch": (longer, f"scratch-{r}.sp", False, None),
            }
            for name, (run, store, grow, steps) in calls.items():
                seconds, added = featurize(run, root / store, args.dim, grow=grow, steps=steps)
                times[name].append(seconds)
                done[name].add(added)
    print(f"digits MLP, N=1437, k={args.dim}, median of {args.repeats}, {args.threads} torch threads")
    for name, values in times.items():
        seconds = statistics.median(values)
        (count,) = done[name]  # the same in every repeat
        print(f"{name:26s} {count:3d} work units  {seconds:6.2f} s  ({seconds / count:.2f} s per unit)")


if __name__ == "__main__":
    main()
