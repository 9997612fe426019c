"""What the fingerprints of a captured store cost: the reference batch taken and written at the first
captured batch, the model fingerprint at close (one eval-mode forward of 8 examples), and, with
``datasets=``, the data fingerprint taken as the stage starts; against the median training step.

    python benchmarks/capture_fingerprint.py --steps 40 --threads 1

The model is the SOURCE paper's MNIST MLP (784-512-256-128-10, batch 64, SGD with momentum) on random
MNIST-shaped data of --examples examples, captured at k = --dim with the sampled Fisher on every 4th
batch, a checkpoint every 20 steps. Each fingerprint step is timed inside the captured run itself (the
capture's own methods, wrapped with a clock); the run is repeated --repeats times and medians reported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.featurize.capture import GradientCapture

capture_module = importlib.import_module(GradientCapture.__module__)  # the module whose data_fingerprint is timed


def _timed(times: dict[str, list[float]], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            times[name].append(time.perf_counter() - start)

    return wrapper


def run(folder: Path, data: TensorDataset, steps: int, dim: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"reference batch": [], "model fingerprint": [], "data fingerprint": []}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128),
                          nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    recorder = sp.TrajectoryRecorder(folder / "run", model, optimizer, save_every=20, overwrite=True)
    capture = GradientCapture(recorder, folder / "store.sp", sp.ClassificationTask(),
                              projection=sp.ProjectionArguments(dim=dim, kind="factored"),
                              options=sp.CaptureArguments(fisher_every=4), overwrite=True, datasets={"main": data})
    capture._keep_reference = _timed(times, "reference batch", capture._keep_reference)  # type: ignore[method-assign]
    capture._fingerprint = _timed(times, "model fingerprint", capture._fingerprint)  # type: ignore[method-assign]
    data_fingerprint = capture_module.data_fingerprint
    capture_module.data_fingerprint = _timed(times, "data fingerprint", data_fingerprint)
    try:
        recorder.begin_stage("main", dataset_size=len(data))
        x, y = data.tensors
        step_times = []
        for step in range(steps):
            rows = torch.randint(0, len(y), (64,), generator=torch.Generator().manual_seed(step))
            start = time.perf_counter()
            with capture.batch((x[rows], y[rows]), indices=rows) as (bx, by):
                optimizer.zero_grad()
                F.cross_entropy(model(bx), by).backward()
            optimizer.step()
            recorder.step()
            if step % 20 not in (0, 19):  # neither the first batch nor a checkpoint's
                step_times.append(time.perf_counter() - start)
        recorder.close()
    finally:
        capture_module.data_fingerprint = data_fingerprint
    out = {name: sum(values) for name, values in times.items()}
    out["training step (median)"] = statistics.median(step_times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--examples", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.examples, 784, generator=g)
    data = TensorDataset(x, torch.randint(0, 10, (args.examples,), generator=g))
    results = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            results.append(run(Path(folder), data, args.steps, args.dim))
    medians = {name: statistics.median(r[name] for r in results) for name in results[0]}
    print(json.dumps({name: round(value * 1e3, 2) for name, value in medians.items()}, indent=1), "(ms)")


if __name__ == "__main__":
    main()
