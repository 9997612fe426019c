"""What featurize computes: the feature points, their data, and the segmentation fixed up front.

A *unit* is one parameter point (a checkpoint, or a segment's averaged parameters for
Fast-SOURCE) featurized on one stage's data, optionally preconditioned. SGD runs of one rate for all groups need no
segmentation here: fit may cut the trajectory as it likes. Two things tie the features to the
segmentation, and then it is chosen once, recorded in the store's metadata
(``meta["segmentation"]``) and enforced by fit:

- a stage trained with Adam/AdamW, or whose parameter groups train at different learning rates: gradients
  are scaled by the segment's D_ℓ^{-1/2} (``preconditioner.py``), stored as ``preconditioner/<ℓ>`` (float32 ``[p]``);
- Fast-SOURCE (``segment_means``): gradients at the mean of each segment's checkpoint parameters,
  stored as ``grads/<stage>/mean-<start>-<end>``.

An automatic segmentation (``auto:L``) chosen before featurize is decided from a *probe*: the
gradients of ``probe_rows`` seeded-random examples per stage at every checkpoint (each scaled by
the preconditioner of the steps it stands for), stored under ``probe/`` and kept for the
trajectory view.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from source_proj.errors import StoreError
from source_proj.featurize.arguments import checkpoint_stages
from source_proj.store.store import Store, ckpt_key
from source_proj.trajectory.autosegment import checkpoint_units, trajectory_view
from source_proj.trajectory.optimizers import optimizer_rule
from source_proj.trajectory.preconditioner import (
    coupled_decay,
    flat_inverse_sqrt,
    read_scale,
    steps_preconditioner,
    unflatten,
)
from source_proj.trajectory.recorder import Stage, Trajectory
from source_proj.trajectory.segments import (
    Segment,
    SegmentationArguments,
    make_segments,
    segment_average,
    segment_for,
)

if TYPE_CHECKING:
    from source_proj.featurize.arguments import FeaturizeArguments

PROBE = "probe/"


class NotPrepared(StoreError):
    """The store's segmentation is not recorded yet (a sharded featurize's first process records it)."""


@dataclass(frozen=True)
class Unit:
    """One parameter point on one stage's data (the arrays ``{prefix}grads|fisher/<stage>/<key>``)."""

    prefix: str
    key: str
    stage: str
    dataset: Dataset
    point: tuple[Any, ...]
    scale: str | None
    seed: tuple[int, ...]
    where: str


@dataclass
class FeaturizePlan:
    """The units to featurize, how to load their parameters and their preconditioner scales."""

    store: Store
    trajectory: Trajectory
    shapes: list[tuple[str, list[int]]]
    units: list[Unit]
    segments: list[Segment] | None
    probe: bool = False
    _memory_scales: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)

    def load(self, model: nn.Module, point: tuple[Any, ...]) -> None:
        """Load a point's parameters into ``model``: a checkpoint, or a weighted mean of checkpoints
        (``("mean", steps, weights)``, a segment's step average)."""
        by_step = {c.step: c for c in self.trajectory.checkpoints}
        if point[0] == "checkpoint":
            self.trajectory.load_into(model, by_step[point[1]])
            return
        self.trajectory.load_weights(model, mean_state(self.trajectory, by_step, point),
                                     f"the mean of the checkpoints at steps {list(point[1])}")  # fmt: skip

    def scale(self, name: str | None, device: torch.device) -> dict[str, torch.Tensor] | None:
        """D^{-1/2} per parameter (shaped like it) for a scale name; ``None`` for unscaled (SGD)."""
        if name in self._memory_scales:
            flat = torch.from_numpy(self._memory_scales[name]())
            return {n: t.to(device) for n, t in unflatten(flat, self.shapes).items()}
        return read_scale(self.store, name, self.shapes, device)


def mean_state(trajectory: Trajectory, by_step: Mapping[int, Any], point: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The parameters of a ``("mean", steps[, weights])`` point: the checkpoints' floating-point tensors weighted
    (equally where no weights are given: a recipe from before 2026-12-02), the others from the last checkpoint."""
    steps = list(point[1])
    weights = list(point[2]) if len(point) > 2 else [1.0 / len(steps)] * len(steps)
    states = [trajectory.load_state(by_step[s])["model"] for s in steps]
    return {
        name: (sum(w * st[name].double() for w, st in zip(weights, states, strict=True)).to(value.dtype)
               if value.is_floating_point() else states[-1][name])
        for name, value in states[0].items()
    }  # fmt: skip


def featurize_plan(
    trajectory: Trajectory,
    store: Store,
    datasets: Mapping[str, Dataset],
    names: Sequence[str],
    options: FeaturizeArguments,
    overwrite: bool,
    *,
    record: bool = True,
) -> FeaturizePlan:
    """Settle the segmentation (recording it) and list the units; when an automatic segmentation
    still needs its probe, return the probe's units only (``plan.probe``) — call again once they are done.
    With ``record=False`` nothing is written: a segmentation still to be recorded raises [`NotPrepared`][]."""
    meta = store.meta
    shapes = [(n, list(s)) for n, s in meta["params"]]
    sizes = {n: int(np.prod(s)) for n, s in shapes}
    rules = {s.name: optimizer_rule(s, sizes) for s in trajectory.stages}
    preconditioned = any(r.preconditioned for r in rules.values())
    segments: list[Segment] | None = None
    if preconditioned or options.segment_means or options.segmentation is not None or meta.get("segmentation"):
        requested = options.segmentation
        recorded = meta.get("segmentation")
        if recorded is not None and not _same(recorded, requested, trajectory, sizes):
            if not overwrite:
                raise StoreError(
                    f"The store at {store.path} was featurized for the segmentation {recorded['arguments']}, not "
                    f"{requested.describe() if requested else None}; featurize with the same --segments, pass --force "
                    "(overwrite=True) to start again, or use another store path."
                )
            store = Store.create(store.path, {k: v for k, v in meta.items() if k != "segmentation"}, overwrite=True)
            recorded = None
        if recorded is None:
            if not record:
                raise NotPrepared(f"The store at {store.path} has no segmentation recorded yet.")
            requested = requested or SegmentationArguments()
            if requested.auto is not None and not _probe_done(store, trajectory):
                return FeaturizePlan(
                    store,
                    trajectory,
                    shapes,
                    _probe_units(trajectory, datasets, requested, rules),
                    None,
                    probe=True,
                    _memory_scales=_probe_scales(trajectory, rules, names),
                )
            _record_segmentation(store, trajectory, requested, rules, names, sizes)
        segments = [Segment.from_description(d) for d in store.meta["segmentation"]["segments"]]

    units: list[Unit] = []
    if options.checkpoints:
        for index, ckpt in enumerate(trajectory.checkpoints):
            for stage in checkpoint_stages(trajectory, ckpt):
                scale = None
                if rules[stage].preconditioned:
                    assert segments is not None
                    scale = segment_for(segments, stage, ckpt.step).preconditioner
                units.append(
                    Unit(
                        "",
                        ckpt_key(ckpt.step),
                        stage,
                        datasets[stage],
                        ("checkpoint", ckpt.step),
                        scale,
                        (index,),
                        f"checkpoint {ckpt.file}",
                    )
                )
    if options.segment_means:
        assert segments is not None
        stages = {s.name: s for s in trajectory.stages}
        steps = [c.step for c in trajectory.checkpoints]
        for index, seg in enumerate(segments):
            averaged = segment_average(segments, seg, stages[seg.stage], steps, trajectory.lr)
            units.append(
                Unit(
                    "",
                    seg.mean_key,
                    seg.stage,
                    datasets[seg.stage],
                    ("mean", tuple(s for s, _ in averaged), tuple(w for _, w in averaged)),
                    seg.preconditioner,
                    (index, 1),
                    f"the step average of checkpoints {[s for s, _ in averaged]}",
                )
            )
    return FeaturizePlan(store, trajectory, shapes, units, segments)


def _same(
    recorded: Mapping[str, Any],
    requested: SegmentationArguments | None,
    trajectory: Trajectory,
    sizes: Mapping[str, int],
) -> bool:
    if requested is None or requested.describe() == recorded["arguments"]:
        return True
    if requested.auto is not None:
        return False
    ours = make_segments(
        trajectory.stages,
        [c.step for c in trajectory.checkpoints],
        trajectory.lr,
        sizes,
        per_stage=requested.per_stage,
        boundaries=requested.boundaries,
    )
    return [_extent(s.describe()) for s in ours] == [_extent(d) for d in recorded["segments"]]


def _extent(desc: Mapping[str, Any]) -> tuple[Any, ...]:
    return desc["stage"], desc["start_step"], desc["end_step"], tuple(desc["checkpoints"])


def _probe_done(store: Store, trajectory: Trajectory) -> bool:
    units = checkpoint_units(trajectory.stages, [c.step for c in trajectory.checkpoints])
    return all(store.is_complete(f"{PROBE}grads/{stage.name}/{ckpt_key(step)}") for stage, step in units)


def _probe_rows(size: int, rows: int, stage_index: int) -> list[int]:
    generator = np.random.default_rng([rows, stage_index])
    return sorted(generator.choice(size, size=min(size, rows), replace=False).tolist())


def _probe_units(
    trajectory: Trajectory, datasets: Mapping[str, Dataset], requested: SegmentationArguments, rules: Mapping[str, Any]
) -> list[Unit]:
    order = {s.name: i for i, s in enumerate(trajectory.stages)}
    index = {c.step: i for i, c in enumerate(trajectory.checkpoints)}
    subsets = {
        name: Subset(data, _probe_rows(len(data), requested.probe_rows, order[name]))  # type: ignore[arg-type]
        for name, data in datasets.items()
    }
    units = []
    for stage, step in checkpoint_units(trajectory.stages, [c.step for c in trajectory.checkpoints]):
        scale = f"probe:{stage.name}:{step}" if rules[stage.name].preconditioned else None
        units.append(
            Unit(
                PROBE,
                ckpt_key(step),
                stage.name,
                subsets[stage.name],
                ("checkpoint", step),
                scale,
                (index[step], 2),
                f"checkpoint step {step} (segmentation probe)",
            )
        )
    return units


def _probe_scales(
    trajectory: Trajectory, rules: Mapping[str, Any], names: Sequence[str]
) -> dict[str, Callable[[], np.ndarray]]:
    units = checkpoint_units(trajectory.stages, [c.step for c in trajectory.checkpoints])
    scales: dict[str, Callable[[], np.ndarray]] = {}
    for i, (stage, step) in enumerate(units):
        if not rules[stage.name].preconditioned:
            continue
        nxt = units[i + 1][1] if i + 1 < len(units) and units[i + 1][0] == stage else stage.end_step
        scales[f"probe:{stage.name}:{step}"] = partial(_steps_scale, trajectory, stage, step, max(nxt, step + 1), names)
    return scales


def _steps_scale(trajectory: Trajectory, stage: Stage, start: int, end: int, names: Sequence[str]) -> np.ndarray:
    return flat_inverse_sqrt(steps_preconditioner(trajectory, stage, start, end, names), names)


def _record_segmentation(
    store: Store,
    trajectory: Trajectory,
    requested: SegmentationArguments,
    rules: Mapping[str, Any],
    names: Sequence[str],
    sizes: Mapping[str, int],
) -> None:
    """Cut the trajectory, write each preconditioned segment's D^{-1/2} (Adam's, or the groups' rate ratios'), then
    record everything in the metadata."""
    steps = [c.step for c in trajectory.checkpoints]
    view = None
    boundaries = requested.boundaries
    if requested.auto is not None:
        view = trajectory_view(store, trajectory.stages, steps, trajectory.lr, sizes, requested.auto, prefix=PROBE)
        boundaries = tuple(view.cuts)
    segments = make_segments(
        trajectory.stages, steps, trajectory.lr, sizes, per_stage=requested.per_stage, boundaries=boundaries
    )
    stages = {s.name: s for s in trajectory.stages}
    final = []
    for index, seg in enumerate(segments):
        rule = rules[seg.stage]
        if rule.preconditioned:
            d = steps_preconditioner(trajectory, stages[seg.stage], seg.start_step, seg.end_step, names)
            name = f"preconditioner/{index}"
            store.write_whole(name, flat_inverse_sqrt(d, names))
            decay = coupled_decay(rule.decay, d, names) if rule.kind == "adam" else seg.weight_decay
            seg = replace(seg, preconditioner=name, weight_decay=decay)
        final.append(seg)
    store.update_meta(
        segmentation={
            "arguments": requested.describe(),
            "segments": [s.describe() for s in final],
            "view": view.describe() if view is not None else None,
        }
    )
