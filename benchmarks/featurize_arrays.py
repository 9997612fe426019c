"""Featurize's time on a store of many small arrays: Kronecker factors (``curvature="kfac"``) of a tiny two-stage run.

    python benchmarks/featurize_arrays.py                        # three featurizes, kfac and projected, medians
    PYTHONPATH=OTHER_TREE python benchmarks/featurize_arrays.py  # the same against another checkout

Such a store holds an array per layer, stage and checkpoint, so the store's per-array work (creating, packing,
dropping the staging group) weighs more than its gradients; BENCHMARKS.md, "Featurize's end".
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _record(run: Path, stages: dict[str, TensorDataset], steps: int) -> None:
    """Full-batch SGD over each stage in turn, a checkpoint every step."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    recorder = sp.TrajectoryRecorder(run, model, optimizer, save_every=1)
    for name, data in stages.items():
        recorder.begin_stage(name, dataset_size=len(data))
        x, y = data.tensors
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            recorder.step()
    recorder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="featurizes per curvature (the median is printed)")
    parser.add_argument("--steps", type=int, default=7, help="steps per stage, each one checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stages = {"pre": _data(20, 0), "fine": _data(12, 1)}
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        _record(run, stages, args.steps)
        for curvature in ("kfac", "projected"):
            seconds = []
            for i in range(args.rounds):
                store = Path(folder) / f"{curvature}-{i}.sp"
                start = time.perf_counter()
                sp.featurize(run, _model(), sp.ClassificationTask(), stages, store,
                             projection=sp.ProjectionArguments(kind="identity"),
                             options=sp.FeaturizeArguments(batch_size=5, chunk_rows=10, fisher="exact",
                                                           curvature=curvature), progress=False)  # fmt: skip
                seconds.append(time.perf_counter() - start)
                arrays = len(sp.Store.open(store).progress_arrays())
                shutil.rmtree(store)
            print(f"{curvature}: {arrays} arrays, median {statistics.median(seconds):.2f} s of "
                  f"{', '.join(f'{s:.2f}' for s in seconds)} ({sp.__file__})")  # fmt: skip


if __name__ == "__main__":
    main()
