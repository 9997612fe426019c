"""Growing a store by one checkpoint against featurizing the longer run from scratch.

    python benchmarks/grow_store.py [--dim 1024] [--repeats 3]

sklearn's digits (1,437 training images), the examples' MLP 64-128-128-10, SGD (lr 0.03, momentum 0.9,
batch 64): a run of 230 steps with a checkpoint every 23 (11 checkpoints) is featurized (k = --dim,
Rademacher, sampled Fisher, measurement gradients at θ_T); the run is then resumed and trains 23 steps
more (one more checkpoint, the new θ_T). Timed, --repeats times each (median): featurize of the
short run, featurize --grow of the store by the new checkpoint, and featurize of the longer run from
scratch; the work units (checkpoint × stage) each computes are counted from the stores.
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


def featurize(run: Path, store: Path, dim: int, grow: bool = False) -> float:
    t0 = time.perf_counter()
    sp.featurize(run, digits.build_model(), digits.build_task(), digits.train_data("main"), store,
                 projection=sp.ProjectionArguments(dim=dim), options=sp.FeaturizeArguments(batch_size=256),
                 progress=False, grow=grow)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    times: dict[str, list[float]] = {"short run": [], "grow by one checkpoint": [], "longer run from scratch": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        short, longer = root / "short", root / "longer"
        train(short, 10 * EVERY, resume=False)
        shutil.copytree(short, longer)
        train(longer, 11 * EVERY, resume=True)
        for r in range(args.repeats):
            times["short run"].append(featurize(short, root / f"grown-{r}.sp", args.dim))
            times["grow by one checkpoint"].append(featurize(longer, root / f"grown-{r}.sp", args.dim, grow=True))
            times["longer run from scratch"].append(featurize(longer, root / f"scratch-{r}.sp", args.dim))
        units = {
            "short run": len(sp.Trajectory.load(short).checkpoints),
            "grow by one checkpoint": 1,
            "longer run from scratch": len(sp.Trajectory.load(longer).checkpoints),
        }
    print(f"digits MLP, N=1437, k={args.dim}, median of {args.repeats}")
    for name, values in times.items():
        seconds = statistics.median(values)
        per = seconds / units[name]
        print(f"{name:26s} {units[name]:3d} checkpoints  {seconds:6.2f} s  ({per:.2f} s per checkpoint)")


if __name__ == "__main__":
    main()
