"""What both framework callbacks share: unwrap the torch optimizer and record each of its steps."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import IterableDataset

from source_proj.errors import TrajectoryError
from source_proj.featurize.arguments import ProjectionArguments
from source_proj.featurize.capture import CaptureArguments, GradientCapture
from source_proj.tasks.task import Task
from source_proj.trajectory.recorder import TrajectoryRecorder


class RecorderSettings:
    """The settings both framework callbacks take (see their docstrings), and the recorder they start."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        save_every: int,
        stage: str = "main",
        dataset_size: int | None = None,
        overwrite: bool = False,
    ) -> None:
        self.run_dir = run_dir
        self.save_every = save_every
        self.stage = stage
        self.dataset_size = dataset_size
        self.overwrite = overwrite
        self.recorder: TrajectoryRecorder | None = None
        self._handle: Any = None


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a framework's wrapper (accelerate, Lightning)."""
    seen = 0  # wrappers (accelerate's AcceleratedOptimizer subclasses Optimizer) keep the real one in .optimizer
    while getattr(optimizer, "optimizer", None) is not None and optimizer.optimizer is not optimizer and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TrajectoryError(
            f"The trainer's optimizer {type(optimizer).__name__} is not a torch.optim optimizer; SOURCE reads the "
            "learning rate and Adam state from one, so train with torch.optim.SGD, Adam or AdamW."
        )
    return optimizer


def start_recording(
    run_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Any,
    *,
    stage: str,
    dataset_size: int,
    save_every: int,
    overwrite: bool,
    grad_scaler: Any | None = None,
) -> tuple[TrajectoryRecorder, Any]:
    """A recorder with its first stage begun, stepping after every optimizer step; returns it and the hook handle.

    The recorder measures each step's gradient-clipping factor (``recorder.py``); ``grad_scaler`` is the
    framework's loss scaler of an fp16 run, whose unscaling is not clipping.
    """
    inner = torch_optimizer(optimizer)
    recorder = TrajectoryRecorder(
        run_dir, model, inner, save_every=save_every, overwrite=overwrite, grad_scaler=grad_scaler
    )
    recorder.begin_stage(stage, dataset_size=dataset_size)
    handle = inner.register_step_post_hook(lambda *_: recorder.step())
    return recorder, handle


def dataset_size(given: int | None, dataloader: Any, where: str) -> int:
    """The training set size: given, or the length of the dataloader's dataset."""
    if given is not None:
        return given
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError) as err:
        raise TrajectoryError(
            f"{where} cannot tell the training set size from its dataloader; pass dataset_size=N to the callback."
        ) from err


class CaptureSettings:
    """What both capture callbacks take beyond the recorder's settings (see ``GradientCapture``)."""

    def __init__(
        self,
        store_path: str | os.PathLike[str],
        task: Task,
        *,
        projection: ProjectionArguments | None,
        options: CaptureArguments,
    ) -> None:
        self.store_path = store_path
        self.task = task
        self.projection = projection
        self.capture_options = options
        self.capture: GradientCapture | None = None

    def start_capture(self, recorder: TrajectoryRecorder, overwrite: bool, dataloader: Any) -> GradientCapture:
        """The capture of ``recorder``'s run into the store (overwriting it when the run is overwritten); the
        training dataloader's dataset is fingerprinted as the stage's data when it is a map-style dataset of
        the stage's size (otherwise the store's data go unchecked, which a check of them says)."""
        stage, size = recorder.stage
        dataset = getattr(dataloader, "dataset", None)
        try:
            sized = not isinstance(dataset, IterableDataset) and hasattr(dataset, "__getitem__")
            sized = sized and len(dataset) == size  # type: ignore[arg-type]
        except TypeError:  # no len()
            sized = False
        self.capture = GradientCapture(
            recorder,
            self.store_path,
            self.task,
            projection=self.projection,
            options=self.capture_options,
            overwrite=overwrite,
            datasets={stage: dataset} if sized else None,
            collate_fn=getattr(dataloader, "collate_fn", None),
        )
        return self.capture
