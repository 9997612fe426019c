"""Cutting a trajectory into SOURCE segments (SOURCE_MATH.md §2).

A segment covers optimiser steps ``start_step ≤ t < end_step`` of one stage. Its checkpoints are
the parameters its own steps start from: those saved after ``s`` steps with
``start_step ≤ s < end_step``. A stage's closing checkpoint (``s = end_step``) joins the stage's
last segment only when that segment has no checkpoint of its own. A segment with no checkpoint
is merged into the next segment of its stage (the previous one for the last), with a warning.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import TrajectoryError
from .trajectory import Stage


@dataclass(frozen=True)
class Segment:
    """One segment ℓ: its steps, checkpoints and optimiser quantities.

    Attributes:
        stage: the stage (dataset D_ℓ) the segment trains on.
        start_step, end_step: global optimiser steps ``[start_step, end_step)``.
        checkpoints: steps of the checkpoints averaged in the segment (C_ℓ).
        mean_lr: η̄_ℓ, the mean effective learning rate (momentum folded in: η(1−d)/(1−β)).
        weight_decay: λ, added as λ·I to the segment's curvature.
    """

    stage: str
    start_step: int
    end_step: int
    checkpoints: tuple[int, ...]
    mean_lr: float
    weight_decay: float

    @property
    def num_steps(self) -> int:
        """K_ℓ."""
        return self.end_step - self.start_step

    @property
    def time(self) -> float:
        """η̄_ℓ·K_ℓ: the segment's training time, which sets SOURCE's implied damping 1/(η̄K)."""
        return self.mean_lr * self.num_steps

    def describe(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "checkpoints": list(self.checkpoints),
            "mean_lr": self.mean_lr,
            "weight_decay": self.weight_decay,
        }


def sgd_settings(stage: Stage, param_sizes: Mapping[str, int]) -> tuple[float, float]:
    """(learning-rate factor, weight decay) of a stage's SGD optimiser.

    The factor turns the recorded rate into the effective rate of heavy-ball momentum,
    (1 − dampening)/(1 − momentum); both are averaged over parameter groups, weighted by the
    number of attributed parameters in each group.
    """
    kind = stage.optimizer.get("kind")
    if kind != "sgd":
        raise TrajectoryError(
            f"Stage {stage.name!r} was trained with {kind!r}; this version attributes SGD (with momentum and "
            "weight decay) only, so re-train with torch.optim.SGD or wait for Adam support."
        )
    groups = stage.optimizer["groups"]
    weights = np.array([sum(param_sizes.get(n, 0) for n in g.get("params", [])) for g in groups], dtype=float)
    if weights.sum() == 0:
        weights = np.ones(len(groups))
    weights /= weights.sum()
    factors, decays = [], []
    for g in groups:
        momentum = float(g.get("momentum", 0.0))
        dampening = float(g.get("dampening", 0.0)) if momentum else 0.0
        if not 0.0 <= momentum < 1.0:
            raise TrajectoryError(f"Stage {stage.name!r} has momentum {momentum}; SOURCE needs 0 ≤ momentum < 1.")
        factors.append((1.0 - dampening) / (1.0 - momentum))
        decays.append(float(g.get("weight_decay", 0.0)))
    return float(weights @ factors), float(weights @ decays)


def make_segments(
    stages: Sequence[Stage],
    checkpoint_steps: Sequence[int],
    lr: np.ndarray,
    param_sizes: Mapping[str, int],
    *,
    per_stage: int = 3,
    boundaries: Sequence[int] | None = None,
) -> list[Segment]:
    """Cut every stage into segments.

    Args:
        stages: the trajectory's stages, in order.
        checkpoint_steps: steps of the available checkpoints, increasing.
        lr: the recorded learning rate of every step.
        param_sizes: number of attributed parameters per name (weights optimiser groups).
        per_stage: equal parts (by step) per stage when ``boundaries`` is not given.
        boundaries: explicit global steps to cut at (stage boundaries are always cut).
    """
    if boundaries is None and per_stage < 1:
        raise TrajectoryError(f"Each stage needs at least one segment, not {per_stage}.")
    segments: list[Segment] = []
    for stage in stages:
        start, end = stage.start_step, stage.end_step
        if end == start:
            continue
        if boundaries is not None:
            cuts = sorted({int(b) for b in boundaries if start < b < end})
        else:
            parts = min(per_stage, end - start)
            cuts = sorted({start + round(i * (end - start) / parts) for i in range(1, parts)})
        edges = [start, *cuts, end]
        ranges = [(a, b) for a, b in itertools.pairwise(edges) if b > a]
        members = [[s for s in checkpoint_steps if a <= s < b] for a, b in ranges]
        if not members[-1] and end in checkpoint_steps:
            members[-1].append(end)
        ranges, members = _merge_empty(stage.name, ranges, members)
        factor, decay = sgd_settings(stage, param_sizes)
        for (a, b), ckpts in zip(ranges, members, strict=True):
            segments.append(
                Segment(
                    stage=stage.name,
                    start_step=a,
                    end_step=b,
                    checkpoints=tuple(ckpts),
                    mean_lr=factor * float(np.mean(lr[a:b])),
                    weight_decay=decay,
                )
            )
    if not segments:
        raise TrajectoryError("The trajectory has no optimiser steps to attribute through.")
    return segments


def _merge_empty(
    stage: str, ranges: list[tuple[int, int]], members: list[list[int]]
) -> tuple[list[tuple[int, int]], list[list[int]]]:
    if not any(members):
        raise TrajectoryError(
            f"Stage {stage!r} has no checkpoint inside its steps; save checkpoints during the stage "
            "(TrajectoryRecorder saves one at every stage start)."
        )
    merged_r: list[tuple[int, int]] = []
    merged_m: list[list[int]] = []
    pending: tuple[int, int] | None = None
    for (a, b), ckpts in zip(ranges, members, strict=True):
        if pending is not None:
            a = pending[0]
            pending = None
        if not ckpts:
            pending = (a, b)
            continue
        merged_r.append((a, b))
        merged_m.append(list(ckpts))
    if pending is not None:
        merged_r[-1] = (merged_r[-1][0], pending[1])
    if len(merged_r) < len(ranges):
        warnings.warn(
            f"Stage {stage!r}: {len(ranges) - len(merged_r)} segment(s) held no checkpoint and were merged into a "
            "neighbour; save checkpoints more often for finer segments.",
            stacklevel=3,
        )
    return merged_r, merged_m
