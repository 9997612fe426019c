"""What produced a store, and the checks that refuse inputs which do not belong with it.

A store's metadata (``Store.meta``) identifies everything its numbers depend on: the attributed
parameters (names and shapes), the projection (kind, seed, dimension, generator), the task
(class and parameter selection), the trajectory (path, fingerprint over learning rates, stages and
every checkpoint's sha256), the featurize settings, the store format and library version. This
module adds how it was produced (``provenance``: model class, final checkpoint, software versions)
and holds the checks made before anything is written or scored:

- [`check_checkpoints`][]: every checkpoint exists, is intact (sha256), loads, fits the model
  and holds finite weights: featurize refuses a bad one before it writes anything.
- [`check_query_model`][]: the model, task and run given to the [`Attributor`][]
  are the store's. Queries are always scored at the store's final checkpoint θ_T: the model
  passed in supplies the architecture, and its weights are replaced by θ_T's, which must still be
  the file featurize used (same run fingerprint, same sha256).
"""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from source_proj import __version__
from source_proj.errors import StoreError, TaskError, TrajectoryError
from source_proj.tasks.task import Task
from source_proj.trajectory.recorder import Trajectory


def describe_provenance(
    model: nn.Module, trajectory: Trajectory, device: torch.device, batch_size: int
) -> dict[str, Any]:
    """How a store is produced (informative: not compared when a store is resumed). The device and
    batch size matter for bit-identical recomputation (``verify --repair`` prints them back)."""
    final = trajectory.final_checkpoint
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_parameters": int(sum(p.numel() for p in model.parameters())),
        "final_checkpoint": {"step": final.step, "file": final.file, "sha256": final.sha256},
        "software": {
            "source_proj": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "zarr": zarr.__version__,
        },
        "device": device.type,
        "batch_size": batch_size,
    }


def check_checkpoints(trajectory: Trajectory, model: nn.Module) -> None:
    """Load every checkpoint of ``trajectory`` into ``model`` (left holding the last one) and refuse
    a missing, changed, unreadable, mismatched or non-finite one with a one-sentence reason."""
    for checkpoint in trajectory.checkpoints:
        trajectory.load_into(model, checkpoint)
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise TrajectoryError(
                    f"Checkpoint {trajectory.path / checkpoint.file} holds NaN or infinite values in {name!r} "
                    "(training diverged before it was saved?); attribute a run whose checkpoints are finite."
                )


def _parameter_mismatch(stored: list[tuple[str, list[int]]], actual: list[tuple[str, list[int]]]) -> str:
    stored_shapes, actual_shapes = dict(stored), dict(actual)
    parts = []
    missing = [n for n in stored_shapes if n not in actual_shapes]
    extra = [n for n in actual_shapes if n not in stored_shapes]
    reshaped = [
        f"{n} {actual_shapes[n]} vs {stored_shapes[n]}"
        for n in stored_shapes
        if n in actual_shapes and actual_shapes[n] != stored_shapes[n]
    ]
    if missing:
        parts.append(f"missing {missing[:3]}")
    if extra:
        parts.append(f"not in the store {extra[:3]}")
    if reshaped:
        parts.append(f"other shapes: {', '.join(reshaped[:3])}")
    if not parts:
        parts.append("same parameters in another order")
    return "; ".join(parts)


def check_run(meta: dict[str, Any], trajectory: Trajectory) -> None:
    """Refuse a run that is not the one the store was featurized from (its final checkpoint is the query model)."""
    recorded = meta["trajectory"]
    if trajectory.fingerprint() != recorded["fingerprint"]:
        steps = [c.step for c in trajectory.checkpoints]
        if steps != recorded["checkpoints"]:
            why = f"it has checkpoints at steps {steps}, the store's run at {recorded['checkpoints']}"
        else:
            why = "its learning rates, stages or checkpoint files differ"
        raise StoreError(
            f"The run at {trajectory.path} is not the one the store was featurized from ({why}), so its final "
            "checkpoint is not the store's query model; pass the original run, or featurize this one into a new store."
        )


def check_query_model(meta: dict[str, Any], model: nn.Module, task: Task, trajectory: Trajectory) -> None:
    """Refuse a query model, task or run that is not the store's (see the module docstring)."""
    check_run(meta, trajectory)
    if task.describe() != meta["task"]:
        raise TaskError(
            f"The task {task.describe()} is not the store's {meta['task']}; query with the task the store was "
            "featurized with."
        )
    names = task.select_parameters(model)
    params = dict(model.named_parameters())
    actual = [(n, list(params[n].shape)) for n in names]
    stored = [(n, list(shape)) for n, shape in meta["params"]]
    if actual != stored:
        why = _parameter_mismatch(stored, actual)
        raise TaskError(
            f"The query model's attributed parameters do not match the store's ({why}); build the model and "
            "parameter selection used for featurize."
        )
