"""The three digits settings of the LDS comparison (SOURCE paper §5.2–5.3, scaled to sklearn's digits).

- ``converged``: the paper's MNIST recipe (SGD momentum 0.9, lr 0.03, weight decay 1e-3, batch 64,
  20 epochs), 6 checkpoints, SOURCE with 3 segments.
- ``noisy``: the paper's FashionMNIST-N recipe: 30% of the training labels replaced by a different
  random label, lr 0.01, weight decay 3e-5, only 3 epochs; a checkpoint at every epoch end,
  SOURCE with 3 segments (one per epoch).
- ``two-stage``: stage ``upright`` on 1,000 upright training digits (the converged recipe), then
  stage ``rotated`` on the other 437 training digits rotated by 45° (5 epochs, same optimiser
  settings); queries are test digits rotated by 45°; attribution (and every LDS subset) is to the
  first stage only, SOURCE with one segment per stage (the paper's L = 2).

Queries are the first 100 test digits of each setting, fixed before any result was seen; the next
100 (``validation=True``) serve diagnostics, so that nothing is ever chosen on the reported queries.
Everything here is importable by worker processes: :class:`Retrain` is the picklable training
function handed to the LDS.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from digits import Stage, TrainConfig, load_split, margins, train_stages
from torch import nn
from torch.utils.data import TensorDataset

from source_proj import GradientCapture, TrajectoryRecorder

SETTINGS = ("converged", "noisy", "two-stage")
QUERIES = 100


@dataclass(frozen=True)
class Setting:
    """Attributes:
    name: one of SETTINGS.
    stages: the training stages (all examples kept).
    attributed: the stage whose examples are attributed and subsampled.
    queries: the query examples measured after every retrain.
    segments_per_stage: SOURCE's segments per stage.
    """

    name: str
    stages: tuple[Stage, ...]
    attributed: str
    queries: TensorDataset
    segments_per_stage: int

    def train(
        self,
        seed: int,
        keep: np.ndarray | None = None,
        run_dir: str | None = None,
        capture: Callable[[TrajectoryRecorder], GradientCapture] | None = None,
    ) -> nn.Module:
        """Train through the stages from scratch; ``keep`` subsamples the attributed stage; ``capture``
        captures gradients in-run (see ``digits.train_stages``)."""
        stages = [
            Stage(st.name, st.data, st.config, keep if st.name == self.attributed else None) for st in self.stages
        ]
        return train_stages(stages, seed=seed, run_dir=run_dir, capture=capture)


def _noisy_labels(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A copy with ``fraction`` of the labels replaced by a different class, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    flip = torch.randperm(len(labels), generator=g)[: round(fraction * len(labels))]
    noisy[flip] = (labels[flip] + torch.randint(1, 10, (len(flip),), generator=g)) % 10
    return noisy


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Standardised 8×8 digits ``[B, 64]`` rotated about their centre (bilinear)."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]).expand(len(x), 2, 3)
    images = x.reshape(-1, 1, 8, 8)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    fill = images.amin(dim=(2, 3), keepdim=True)  # the background value after standardisation
    rotated = F.grid_sample(images - fill, grid, align_corners=False, padding_mode="zeros") + fill
    return rotated.reshape(len(x), 64)


@functools.cache
def setting(name: str, validation: bool = False) -> Setting:
    """The setting called ``name`` (built once per process); ``validation`` swaps in the next 100 queries."""
    train_set, test_set = load_split()
    x, y = train_set.tensors
    picked = slice(QUERIES, 2 * QUERIES) if validation else slice(0, QUERIES)
    tx, ty = test_set.tensors[0][picked], test_set.tensors[1][picked]
    queries = TensorDataset(tx, ty)
    if name == "converged":
        return Setting(name, (Stage("main", train_set, TrainConfig()),), "main", queries, 3)
    if name == "noisy":
        noisy = TensorDataset(x, _noisy_labels(y, 0.3, seed=0))
        recipe = TrainConfig(epochs=3, lr=0.01, weight_decay=3e-5, checkpoints=3)
        return Setting(name, (Stage("main", noisy, recipe),), "main", queries, 3)
    if name == "two-stage":
        first = TensorDataset(x[:1000], y[:1000])
        second = TensorDataset(_rotate(x[1000:], 45.0), y[1000:])
        rotated_queries = TensorDataset(_rotate(tx, 45.0), ty)
        stages = (Stage("upright", first, TrainConfig()), Stage("rotated", second, TrainConfig(epochs=5)))
        return Setting(name, stages, "upright", rotated_queries, 1)
    raise ValueError(f"unknown setting {name!r}; choose one of {SETTINGS}")


def decision_margins(model: nn.Module, data: TensorDataset) -> np.ndarray:
    """logit_y − max_{c≠y} logit_c of every example: positive exactly when it is classified correctly."""
    x, y = data.tensors
    with torch.no_grad():
        logits = model(x)
    correct = logits.gather(1, y[:, None]).squeeze(1)
    return (correct - logits.scatter(1, y[:, None], float("-inf")).amax(1)).numpy()


@dataclass(frozen=True)
class Retrain:
    """``retrain(keep, seed) -> [Q]`` for one setting (picklable for worker processes).

    Returns the task's margins (the LDS measurement), or with ``decision=True`` the decision margins
    whose sign is correctness (for subset removal, which counts misclassifications).
    """

    name: str
    validation: bool = False
    decision: bool = False

    def __call__(self, keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        s = setting(self.name, self.validation)
        model = s.train(seed, keep[s.attributed])
        return (decision_margins if self.decision else margins)(model, s.queries)
