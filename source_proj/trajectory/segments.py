"""Cutting a trajectory into SOURCE segments (docs/concepts/source.md §2).

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

from source_proj.errors import TrajectoryError, check_whole, check_wholes
from source_proj.trajectory.optimizers import optimizer_rule
from source_proj.trajectory.recorder import Stage


@dataclass(frozen=True)
class SegmentationArguments:
    """How a trajectory is cut into segments (stage boundaries always cut).

    Attributes:
        per_stage: equal parts (by step) each stage is cut into (default 1, by the evidence in BENCHMARKS.md;
            the paper uses 3).
        boundaries: explicit global steps to cut at (overrides ``per_stage``).
        auto: a budget of L segments in all, placed where the projected curvature and gradients
            change most between checkpoints (see ``autosegment.py``; overrides both); ``0``: no budget,
            the number of segments is chosen too (``AUTO_KEEP``: the fewest that leave at most a
            quarter of the dispersion one segment per stage leaves).
        probe_rows: examples per stage whose gradients decide ``auto`` cuts when they must be
            chosen before featurize (Adam runs, Fast-SOURCE); fit-time cuts use every stored row.
    """

    per_stage: int = 1
    boundaries: tuple[int, ...] | None = None
    auto: int | None = None
    probe_rows: int = 256

    def __post_init__(self) -> None:
        check_whole("SegmentationArguments.per_stage", self.per_stage, error=TrajectoryError)
        if self.auto is not None:
            check_whole("SegmentationArguments.auto", self.auto, 0, error=TrajectoryError)
        check_whole("SegmentationArguments.probe_rows", self.probe_rows, error=TrajectoryError)
        if self.boundaries is not None:
            check_wholes("SegmentationArguments.boundaries", self.boundaries, error=TrajectoryError)

    @classmethod
    def parse(cls, text: str) -> SegmentationArguments:
        """``"3"`` (equal parts per stage), ``"auto:4"`` (4 automatic segments), ``"auto"`` (automatic
        segments, their number chosen too) or ``"at:100,200"``."""
        text = text.strip()
        try:
            if text == "auto":
                return cls(auto=0)
            if text.startswith("auto:"):
                count = int(text[5:])
                if count < 1:  # auto=0 is how "auto" is kept: it would choose L silently
                    raise TrajectoryError(
                        f"The segmentation {text!r} asks for {count} segments; write auto:L with L ≥ 1, or auto to "
                        "have L chosen."
                    )
                return cls(auto=count)
            if text.startswith("at:"):
                return cls(boundaries=tuple(int(v) for v in text[3:].split(",") if v.strip()))
            return cls(per_stage=int(text))
        except ValueError as err:
            raise TrajectoryError(
                f"Cannot read the segmentation {text!r}; write a number per stage (3), auto, auto:L (auto:4) "
                "or at:STEP,STEP (at:100,200)."
            ) from err

    def describe(self) -> dict[str, Any]:
        """JSON form (what a store records); ``probe_rows`` only matters for ``auto``."""
        if self.auto is not None:
            return {"auto": self.auto, "probe_rows": self.probe_rows}
        if self.boundaries is not None:
            return {"boundaries": sorted(int(b) for b in self.boundaries)}
        return {"per_stage": self.per_stage}


@dataclass(frozen=True)
class Segment:
    """One segment ℓ: its steps, checkpoints and optimiser quantities.

    Attributes:
        stage: the stage (dataset D_ℓ) the segment trains on.
        start_step: the first global optimiser step of the segment.
        end_step: the step after its last one (the segment is ``[start_step, end_step)``).
        checkpoints: steps of the checkpoints averaged in the segment (C_ℓ).
        mean_lr: η̄_ℓ, the mean effective learning rate (momentum folded in: η(1−d)/(1−β)).
        weight_decay: λ, added as λ·I to the segment's curvature (for Adam, in its preconditioned
            coordinates; see ``preconditioner.py``).
        preconditioner: store array holding D_ℓ^{-1/2} (flat, float32 ``[p]``) for Adam/AdamW
            stages and stages whose groups train at different rates (``OptimizerRule.preconditioned``),
            ``None`` for other SGD stages.
    """

    stage: str
    start_step: int
    end_step: int
    checkpoints: tuple[int, ...]
    mean_lr: float
    weight_decay: float
    preconditioner: str | None = None

    @property
    def num_steps(self) -> int:
        """K_ℓ."""
        return self.end_step - self.start_step

    @property
    def time(self) -> float:
        """η̄_ℓ·K_ℓ: the segment's training time, which sets SOURCE's implied damping 1/(η̄K)."""
        return self.mean_lr * self.num_steps

    @property
    def mean_key(self) -> str:
        """Store key of the features at the segment's averaged parameters (Fast-SOURCE: the step average of
        `segment_average`; stores of the plain mean, before 2026-12-02, named them ``mean-…``)."""
        return f"steps-mean-{self.start_step:08d}-{self.end_step:08d}"

    def describe(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "checkpoints": list(self.checkpoints),
            "mean_lr": self.mean_lr,
            "weight_decay": self.weight_decay,
            "preconditioner": self.preconditioner,
        }

    @classmethod
    def from_description(cls, desc: Mapping[str, Any]) -> Segment:
        """Inverse of ``describe``."""
        return cls(**{**desc, "checkpoints": tuple(desc["checkpoints"])})


def step_average(segment: Segment, knots: Sequence[int], lr: np.ndarray) -> list[tuple[int, float]]:
    """Weights that average a quantity over the segment's steps from its values at the checkpoints ``knots``.

    SOURCE's segment gradient and curvature stand for what the segment's steps apply: step t moves the
    weights by η_t times the gradient at θ_t, so the segment's sum is Σ_t η_t g(θ_t) = η̄K · ḡ with
    ḡ = Σ_t η_t g(θ_t) / Σ_t η_t (likewise H̄, which the exponent exp(−η̄K H̄) sums). Known at the checkpoints
    only, g(θ_t) is interpolated linearly between the checkpoints around step t, in the run's own time
    τ_t = Σ_{s<t} η_s (held constant before the first and after the last). Exact when a checkpoint is saved at
    every step; a stage's closing checkpoint gets its share of the steps before it, and a first checkpoint
    (e.g. a random initialisation) only its own share, less under a warm-up. Where the segment's rates are
    all zero its steps count alike.

    Args:
        segment: the segment, ``[start_step, end_step)``.
        knots: steps of the checkpoints that may be used.
        lr: the recorded learning rate of every step of the run.

    Returns ``(step, weight)`` for every knot with a non-zero weight, in step order; the weights sum to 1.
    """
    points = np.asarray(sorted({int(k) for k in knots}), dtype=np.int64)
    if points.size == 0:
        raise TrajectoryError(f"Segment [{segment.start_step}, {segment.end_step}) has no checkpoint to average.")
    rates = np.asarray(lr, dtype=np.float64)
    time = np.concatenate([[0.0], np.cumsum(rates)])
    steps = np.arange(segment.start_step, segment.end_step)
    mass = rates[steps] if rates[steps].sum() > 0 else np.ones(steps.size)
    at, knot_time = time[steps], time[points]
    right = np.searchsorted(knot_time, at, side="right")  # the first knot later in τ than each step
    weights = np.zeros(points.size)
    below, above = right == 0, right == points.size
    np.add.at(weights, np.zeros(int(below.sum()), dtype=np.int64), mass[below])
    np.add.at(weights, np.full(int(above.sum()), points.size - 1, dtype=np.int64), mass[above])
    inside = ~(below | above)
    lo = right[inside] - 1
    t = (at[inside] - knot_time[lo]) / (knot_time[lo + 1] - knot_time[lo])
    np.add.at(weights, lo, mass[inside] * (1.0 - t))
    np.add.at(weights, lo + 1, mass[inside] * t)
    weights /= mass.sum()
    return [(int(step), float(w)) for step, w in zip(points, weights, strict=True) if w > 0.0]


def segment_for(segments: Sequence[Segment], stage: str, step: int) -> Segment:
    """The segment of ``stage`` that averages checkpoint ``step``, else the one nearest to it (whose D_ℓ featurize
    scales that checkpoint's gradients by, on Adam stages)."""
    own = [s for s in segments if s.stage == stage]
    for seg in own:
        if step in seg.checkpoints:
            return seg
    return min(own, key=lambda s: min(abs(step - s.start_step), abs(step - s.end_step)))


def segment_average(
    segments: Sequence[Segment], segment: Segment, stage: Stage, checkpoint_steps: Sequence[int], lr: np.ndarray
) -> list[tuple[int, float]]:
    """The checkpoints and weights of ``segment``'s step average ([`step_average`][]) among ``checkpoint_steps``:
    those of its stage (its start to its closing checkpoint), on Adam stages only those featurized in the
    segment's own coordinates ([`segment_for`][] gives it), else the segment's own checkpoints."""
    knots = [s for s in checkpoint_steps if stage.start_step <= s <= stage.end_step]
    if segment.preconditioner is not None:
        knots = [s for s in knots if segment_for(segments, segment.stage, s).preconditioner == segment.preconditioner]
    return step_average(segment, knots or segment.checkpoints, lr)


def check_boundaries(stages: Sequence[Stage], boundaries: Sequence[int] | None) -> None:
    """Refuse cuts outside the run's steps: a typo there would otherwise leave the segments silently uncut."""
    if boundaries is None or not stages:
        return
    first, last = stages[0].start_step, stages[-1].end_step
    outside = sorted({int(b) for b in boundaries if not first <= b <= last})
    if outside:
        raise TrajectoryError(
            f"Segment boundaries {outside} lie outside the run's steps {first} to {last}; cut at steps inside it."
        )


def make_segments(
    stages: Sequence[Stage],
    checkpoint_steps: Sequence[int],
    lr: np.ndarray,
    param_sizes: Mapping[str, int],
    *,
    per_stage: int = 1,
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
    check_boundaries(stages, boundaries)
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
        rule = optimizer_rule(stage, param_sizes)
        for (a, b), ckpts in zip(ranges, members, strict=True):
            segments.append(
                Segment(
                    stage=stage.name,
                    start_step=a,
                    end_step=b,
                    checkpoints=tuple(ckpts),
                    mean_lr=rule.lr_factor * float(np.mean(lr[a:b])),
                    weight_decay=rule.weight_decay,
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
