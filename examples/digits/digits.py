"""Digits: an MLP on scikit-learn's bundled 8×8 digits, trained with the trajectory recorder.

This file is also the experiment *spec* the CLI reads (``--spec examples/digits/digits.py``):
it defines ``build_model``, ``build_task``, ``train_data(stage)``, ``query_data()``,
``describe(stage, index)`` and ``retrain(keep, seed)`` (for ``source-proj lds`` / ``compare``).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from source_proj import ClassificationTask, GradientCapture, TrajectoryRecorder


@dataclass(frozen=True)
class TrainConfig:
    """The paper's MNIST recipe (SGD, momentum 0.9, weight decay 1e-3, batch 64), 20 epochs."""

    epochs: int = 20
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-3
    batch_size: int = 64
    checkpoints: int = 6


@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as ``load_digits()`` returns them: (data float64 ``[1797, 64]``, target
    int ``[1797]``), read from the file scikit-learn ships without importing scikit-learn (a 2 s import)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("The digits example reads the digits scikit-learn ships; `pip install scikit-learn`.")
    with gzip.open(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", "rt") as file:
        table = np.loadtxt(file, delimiter=",")
    data, target = table[:, :-1], table[:, -1].astype(int)
    data.flags.writeable = target.flags.writeable = False  # cached: shared by every caller
    return data, target


def load_split(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Standardised digits, split 80/20 with a fixed permutation: (train 1437, test 360)."""
    data, target = load_digits()
    x = torch.tensor(data, dtype=torch.float32) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 0.1
    x = (x - mean) / std
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def raw_images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The unstandardised 8×8 images in the order of ``load_split``: (train, test)."""
    data, target = load_digits()
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed)).numpy()
    images = data.reshape(-1, 8, 8)[order]
    cut = int(0.8 * len(order))
    return images[:cut], images[cut:]


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def build_task() -> ClassificationTask:
    return ClassificationTask()


def train_data(stage: str) -> TensorDataset:
    return load_split()[0]


def query_data() -> TensorDataset:
    return load_split()[1]


@functools.cache
def _train_labels() -> np.ndarray:
    return load_split()[0].tensors[1].numpy()


def describe(stage: str, index: int) -> str:
    return f"digit {int(_train_labels()[index])}"


def train(
    data: TensorDataset,
    *,
    seed: int = 0,
    config: TrainConfig = TrainConfig(),
    run_dir: str | Path | None = None,
    keep: Sequence[int] | None = None,
) -> nn.Module:
    """Train the MLP with mini-batch SGD; record the trajectory in ``run_dir`` if given.

    ``keep`` trains on a subset (the same shuffle with the other examples dropped from every
    batch), for counterfactual retraining.
    """
    return train_stages([Stage("main", data, config, keep)], seed=seed, run_dir=run_dir)


@dataclass(frozen=True)
class Stage:
    """One training stage: its data, recipe, and the kept examples (None = all)."""

    name: str
    data: TensorDataset
    config: TrainConfig = TrainConfig()
    keep: Sequence[int] | None = None


def train_stages(
    stages: Sequence[Stage],
    *,
    seed: int = 0,
    run_dir: str | Path | None = None,
    model: nn.Module | None = None,
    capture: Callable[[TrajectoryRecorder], GradientCapture] | None = None,
) -> nn.Module:
    """Train through the stages in turn (a fresh SGD optimiser each), from ``model`` or a new MLP.

    The shuffles come from one generator seeded by ``seed``; a recorded run saves checkpoints evenly
    (``config.checkpoints`` per stage, the shortest stage deciding) and at every stage boundary.
    ``capture(recorder)`` (with ``run_dir``) starts in-run gradient capture, which sees every batch.
    """
    model = build_model(seed) if model is None else model
    gen = torch.Generator().manual_seed(seed)
    recorder = None
    if run_dir is not None:
        every = min(max(1, _steps(st) * st.config.epochs // st.config.checkpoints) for st in stages)
        recorder = TrajectoryRecorder(
            run_dir, model, torch.optim.SGD(model.parameters()), save_every=every, overwrite=True
        )
    captured = capture(recorder) if capture is not None and recorder is not None else None
    for st in stages:
        x, y = st.data.tensors
        cfg = st.config
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        n = len(y)
        mask = torch.ones(n, dtype=torch.bool)
        if st.keep is not None:
            mask[:] = False
            mask[torch.as_tensor(st.keep, dtype=torch.long)] = True
        if recorder is not None:
            recorder.begin_stage(st.name, dataset_size=n, optimizer=opt)
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for b in range(_steps(st)):
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                idx = idx[mask[idx]]
                if len(idx) == 0:
                    continue
                with captured.batch((idx, (x[idx], y[idx]))) if captured else contextlib.nullcontext():
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                opt.step()
                if recorder is not None:
                    recorder.step()
    if recorder is not None:
        recorder.close()
    return model.eval()


def _steps(stage: Stage) -> int:
    return -(-len(stage.data) // stage.config.batch_size)


def retrain(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """Spec hook for `source-proj lds/compare`: retrain on the kept digits, margins of every query."""
    train_set, test_set = load_split()
    return margins(train(train_set, seed=seed, keep=keep["main"]), test_set)


def margins(model: nn.Module, data: TensorDataset) -> np.ndarray:
    """The task's measurement (margin) of every example."""
    x, y = data.tensors
    with torch.no_grad():
        return build_task().measurement(model(x), (x, y)).numpy()
