"""The accuracy settings of issue 12: data, model and SGD recipe of each, nothing cached.

Digits settings replicate the held-out benchmark as closely as its description allows: sklearn's
1,797 digits, inputs /16 (not standardised), train 1,297 / test 500 by a permutation seeded with 0,
queries = the first 200 test images, ReLU MLP 64-128-128-10 (PyTorch's default initialisation from
the seed), SGD momentum 0.9, batch 32, weight decay 1e-3, measurement = margin.

- ``early``: 30 % of the training labels flipped to a different random class, 3 epochs at lr 0.03,
  a checkpoint every half epoch (every 21 of the 41 steps of an epoch).
- ``converged``: clean labels, 20 epochs at lr 0.03, a checkpoint per epoch.
- ``two-stage``: stage ``stage1`` = the first 800 training digits for 10 epochs, then ``stage2`` = the
  other 497 transposed for 10 epochs (a fresh SGD each stage, same recipe), a checkpoint every 25
  steps (an epoch of stage 1); only stage 1 is attributed (and subsampled); two query sets,
  ``upright`` and ``transposed`` test digits.
- ``early-fast`` (ours): ``early`` at lr 0.05 (effective rate η/(1−β) = 0.5), a checkpoint every
  quarter epoch (every 11 steps).

MNIST settings (the folder of the IDX files is an argument; see docs/howto/evaluate.md):

- ``mnist``: the SOURCE paper's MNIST/FashionMNIST setting: 6,144 training images (the first of a
  permutation of the 60,000, seeded with 0), inputs /255, MLP 784-512-256-128-10, SGD momentum 0.9,
  lr 0.03, weight decay 1e-3, batch 64, 20 epochs, 6 checkpoints; 100 test queries.
- ``mnist-noisy``: the paper's noisy-label variant: 30 % of the labels flipped, lr 0.01, weight decay
  3e-5, 3 epochs, a checkpoint every half epoch (48 steps).
- ``mnist-one-epoch``: the same for one epoch, a checkpoint every 16 steps: every example is seen once, as
  in a language model's pre-training.
- ``mnist-full``: ``mnist-one-epoch``'s recipe on all 60,000 training images (the same permutation), a
  checkpoint every 188 steps (a fifth of the epoch): N well above the k of the projection and the examples
  of the basis, where a share of the examples' Fisher (``fisher_examples``) can be measured.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.evaluation.batched import SGDStage

DIGITS = ("early", "converged", "two-stage", "early-fast")
MNIST = ("mnist", "mnist-noisy", "mnist-one-epoch", "mnist-full")
SETTINGS = DIGITS + MNIST


@dataclass(frozen=True)
class Setting:
    """One benchmark setting.

    Attributes:
        name: one of SETTINGS.
        widths: layer widths of the ReLU MLP, input to output.
        stages: the training stages, in order (all examples kept).
        attributed: the stage whose examples are attributed and subsampled by the LDS.
        queries: query set name → (inputs ``[Q, d]``, labels ``[Q]``).
        save_every: the trajectory recorder's checkpoint interval (optimizer steps).
        description: what defines the setting (data, recipe, checkpoints): the cache key.
    """

    name: str
    widths: tuple[int, ...]
    stages: tuple[SGDStage, ...]
    attributed: str
    queries: dict[str, tuple[Tensor, Tensor]]
    save_every: int
    description: dict[str, Any]

    def build_model(self, seed: int) -> nn.Module:
        """The ReLU MLP with PyTorch's default initialisation drawn from ``seed``."""
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(self.widths[:-1], self.widths[1:], strict=True)):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(self.widths) - 2 else [])
        return nn.Sequential(*layers)

    @property
    def key(self) -> str:
        """A short hash of the description: the cache folder's suffix."""
        return hashlib.sha256(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def train_data(self) -> dict[str, TensorDataset]:
        """Stage name → training dataset (as given to ``sp.featurize``)."""
        return {st.name: TensorDataset(st.inputs, st.targets) for st in self.stages}

    def query_data(self, name: str) -> TensorDataset:
        return TensorDataset(*self.queries[name])

    def all_queries(self) -> tuple[Tensor, Tensor]:
        """Every query set concatenated in the order of ``queries`` (what a retrain measures)."""
        return (torch.cat([x for x, _ in self.queries.values()]), torch.cat([y for _, y in self.queries.values()]))

    def query_slices(self) -> dict[str, slice]:
        """Query set name → its columns in ``all_queries``."""
        out, start = {}, 0
        for name, (_, y) in self.queries.items():
            out[name] = slice(start, start + len(y))
            start += len(y)
        return out

    def train_recorded(
        self,
        seed: int,
        run_dir: str | Path,
        capture: Callable[[sp.TrajectoryRecorder], sp.GradientCapture] | None = None,
        lr_ratio: Mapping[str, float] | None = None,
    ) -> nn.Module:
        """Train on all data with ``torch.optim.SGD``, recording the trajectory (the attributed models);
        ``capture(recorder)`` starts in-run gradient capture, which sees every batch (it does not change
        training: the trajectory is bit-identical); ``lr_ratio`` (parameter name → r) puts those parameters in
        parameter groups at r × the stage's rate, as ``BatchedSGD(lr_ratio=…)`` retrains them."""
        model = self.build_model(seed)
        gen = torch.Generator().manual_seed(seed)
        recorder = sp.TrajectoryRecorder(
            run_dir, model, torch.optim.SGD(model.parameters()), save_every=self.save_every, overwrite=True
        )
        captured = capture(recorder) if capture is not None else None
        for st in self.stages:
            opt = torch.optim.SGD(_groups(model, st.lr, lr_ratio or {}), lr=st.lr, momentum=st.momentum,
                                  weight_decay=st.weight_decay)  # fmt: skip
            recorder.begin_stage(st.name, dataset_size=st.size, optimizer=opt)
            for _ in range(st.epochs):
                order = torch.randperm(st.size, generator=gen)
                for b in range(st.steps_per_epoch):
                    idx = order[b * st.batch_size : (b + 1) * st.batch_size]
                    batch = (st.inputs[idx], st.targets[idx])
                    with captured.batch((idx, batch)) if captured else contextlib.nullcontext():
                        loss = F.cross_entropy(model(batch[0]), batch[1])
                        opt.zero_grad()
                        loss.backward()
                    opt.step()
                    recorder.step()
        recorder.close()
        return model.eval()


def _groups(model: nn.Module, lr: float, lr_ratio: Mapping[str, float]) -> list[dict[str, Any]]:
    """SGD parameter groups: the parameters ``lr_ratio`` does not name at ``lr``, then one group per ratio."""
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n not in lr_ratio]}]
    for r in sorted(set(lr_ratio.values())):
        groups.append({"params": [p for n, p in named if lr_ratio.get(n) == r], "lr": lr * r})
    return [g for g in groups if g["params"]]


def flip_labels(labels: Tensor, fraction: float, seed: int, classes: int = 10) -> Tensor:
    """A copy with ``fraction`` of the labels replaced by a different class chosen at random."""
    g = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    flip = torch.randperm(len(labels), generator=g)[: round(fraction * len(labels))]
    noisy[flip] = (labels[flip] + torch.randint(1, classes, (len(flip),), generator=g)) % classes
    return noisy


def transpose(x: Tensor, side: int = 8) -> Tensor:
    """Flattened square images ``[B, side²]`` transposed (rows become columns)."""
    return x.reshape(-1, side, side).transpose(1, 2).reshape(len(x), side * side).contiguous()


def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1297], y[:1297], x[1297:], y[1297:]


def _read_idx(folder: Path, stem: str) -> np.ndarray:
    for name in (f"{stem}.gz", stem):
        path = folder / name
        if path.exists():
            raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
            dims = raw[3]
            shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
            return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
    raise sp.TaskError(
        f"{folder} holds no {stem}[.gz]; pass the folder of the MNIST IDX files (train-images-idx3-ubyte.gz, ...)."
    )


def _mnist(folder: Path, examples: int = 6144) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    images = _read_idx(folder, "train-images-idx3-ubyte")
    labels = _read_idx(folder, "train-labels-idx1-ubyte")
    test_images = _read_idx(folder, "t10k-images-idx3-ubyte")
    test_labels = _read_idx(folder, "t10k-labels-idx1-ubyte")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:examples]
    test = torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(0))[:100]
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    tx = torch.from_numpy(test_images.reshape(len(test_images), -1).astype(np.float32) / 255.0)
    return (
        x[order],
        torch.from_numpy(labels.astype(np.int64))[order],
        tx[test],
        torch.from_numpy(test_labels.astype(np.int64))[test],
    )


def setting(name: str, mnist: str | Path | None = None) -> Setting:
    """The setting called ``name``; the MNIST ones need ``mnist``, the folder of the IDX files."""
    recipe: dict[str, Any] = {"momentum": 0.9, "weight_decay": 1e-3, "batch_size": 32}
    if name in DIGITS:
        x, y, tx, ty = _digits()
        queries = {"test": (tx[:200], ty[:200])}
        widths = (64, 128, 128, 10)
        if name in ("early", "early-fast"):
            lr, save_every = (0.03, 21) if name == "early" else (0.05, 11)
            stages = (SGDStage("main", x, flip_labels(y, 0.3, seed=0), epochs=3, lr=lr, **recipe),)
            return _setting(name, widths, stages, "main", queries, save_every, noisy=0.3)
        if name == "converged":
            stages = (SGDStage("main", x, y, epochs=20, lr=0.03, **recipe),)
            return _setting(name, widths, stages, "main", queries, 41)
        if name == "two-stage":
            stages = (
                SGDStage("stage1", x[:800], y[:800], epochs=10, lr=0.03, **recipe),
                SGDStage("stage2", transpose(x[800:]), y[800:], epochs=10, lr=0.03, **recipe),
            )
            queries = {"upright": queries["test"], "transposed": (transpose(tx[:200]), ty[:200])}
            return _setting(name, widths, stages, "stage1", queries, 25)
    if name in MNIST:
        if mnist is None:
            raise sp.TaskError(f"Setting {name!r} needs the MNIST folder (--mnist DIR with the IDX files).")
        x, y, tx, ty = _mnist(Path(mnist), 60_000 if name == "mnist-full" else 6144)
        widths = (784, 512, 256, 128, 10)
        recipe["batch_size"] = 64
        if name == "mnist":
            stages = (SGDStage("main", x, y, epochs=20, lr=0.03, **recipe),)
            return _setting(name, widths, stages, "main", {"test": (tx, ty)}, 320)
        recipe["weight_decay"] = 3e-5
        epochs, save_every = {"mnist-noisy": (3, 48), "mnist-one-epoch": (1, 16), "mnist-full": (1, 188)}[name]
        stages = (SGDStage("main", x, flip_labels(y, 0.3, seed=0), epochs=epochs, lr=0.01, **recipe),)
        return _setting(name, widths, stages, "main", {"test": (tx, ty)}, save_every, noisy=0.3)
    raise sp.TaskError(f"Unknown setting {name!r}; choose one of {', '.join(SETTINGS)}.")


def _setting(
    name: str,
    widths: tuple[int, ...],
    stages: Sequence[SGDStage],
    attributed: str,
    queries: dict[str, tuple[Tensor, Tensor]],
    save_every: int,
    noisy: float = 0.0,
) -> Setting:
    def digest(t: Tensor) -> str:
        return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:12]

    description = {
        "widths": list(widths),
        "stages": [
            {
                "name": s.name,
                "data": digest(s.inputs),
                "labels": digest(s.targets),
                "epochs": s.epochs,
                "lr": s.lr,
                "batch_size": s.batch_size,
                "momentum": s.momentum,
                "weight_decay": s.weight_decay,
            }
            for s in stages
        ],
        "attributed": attributed,
        "queries": {q: [digest(x), digest(y)] for q, (x, y) in queries.items()},
        "save_every": save_every,
        "noisy": noisy,
    }
    return Setting(name, widths, tuple(stages), attributed, queries, save_every, description)
