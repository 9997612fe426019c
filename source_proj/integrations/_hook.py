"""What both framework callbacks share: unwrap the torch optimizer and record each of its steps."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import IterableDataset, WeightedRandomSampler

from source_proj.errors import TrajectoryError
from source_proj.featurize.arguments import ProjectionArguments
from source_proj.featurize.capture import CaptureArguments, GradientCapture
from source_proj.tasks.task import Task
from source_proj.trajectory.recorder import Checkpoint, TrajectoryRecorder, load_checkpoint


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
        rewind: bool = False,
        label_smoothing: float | None = None,
        weights: str = "auto",
    ) -> None:
        self.run_dir = run_dir
        self.label_smoothing = label_smoothing
        self.weights = weights
        self.save_every = save_every
        self.stage = stage
        self.dataset_size = dataset_size
        self.overwrite = overwrite
        self.rewind = rewind
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
    start_step: int = 0,
    trainer: str = "The Trainer",
    rewind: bool = False,
    label_smoothing: float = 0.0,
    step_hook: bool = True,
    weights: str = "auto",
    clip: Callable[[], float | None] | None = None,
    scale: Callable[[], float] | None = None,
) -> tuple[TrajectoryRecorder, Any]:
    """A recorder with its first stage begun, stepping after every optimizer step; returns it and the hook handle.

    ``step_hook``: step the recorder from an optimizer step post-hook. A caller that steps it itself once per
    training step (the Trainer's ``on_optimizer_step``) passes False and gets no handle; it also records a step a
    loss scaler skipped (``optimizer.step`` not called, no post-hook), at rate 0, as the trainer counts it.

    The recorder measures each step's gradient-clipping factor (``recorder.py``); ``grad_scaler`` is the
    framework's loss scaler of an fp16 run, whose unscaling is not clipping. ``start_step``: the trainer's
    global step as training begins; above 0 it resumes from its own checkpoint, and so does the recorded run
    (``resume_recording``; ``rewind``: also from an earlier checkpoint of the run than its last).
    ``label_smoothing``: the ε the trainer smooths its labels by, recorded with the stage. ``clip``: in a
    multi-process run, where each process's hooks see its local gradients before they are averaged, the step's
    clipping factor as the caller measured it (the recorder's own measure is then off). ``scale``: the step's
    gradient against the mean loss of the examples it accumulated (``TrajectoryRecorder.step``).
    """
    inner = torch_optimizer(optimizer)
    watch = clip is None
    if start_step > 0:
        recorder = resume_recording(run_dir, model, inner, stage=stage, dataset_size=dataset_size,
                                    save_every=save_every, overwrite=overwrite, grad_scaler=grad_scaler,
                                    start_step=start_step, trainer=trainer, rewind=rewind,
                                    label_smoothing=label_smoothing, watch_clipping=watch)  # fmt: skip
    else:
        recorder = TrajectoryRecorder(
            run_dir, model, inner, save_every=save_every, overwrite=overwrite, grad_scaler=grad_scaler,
            watch_clipping=watch, weights=weights,  # type: ignore[arg-type]
        )
        recorder.begin_stage(stage, dataset_size=dataset_size, label_smoothing=label_smoothing)
    measured, scaled = clip or (lambda: None), scale or (lambda: 1.0)
    handle = None
    if step_hook:
        handle = inner.register_step_post_hook(lambda *_: recorder.step(clip=measured(), scale=scaled()))
    return recorder, handle


def resume_recording(
    run_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    stage: str,
    dataset_size: int,
    save_every: int,
    overwrite: bool,
    grad_scaler: Any | None,
    start_step: int,
    trainer: str,
    rewind: bool = False,
    label_smoothing: float = 0.0,
    watch_clipping: bool = True,
) -> TrajectoryRecorder:
    """The recorded run resumed where a resumed trainer starts (``TrajectoryRecorder.resume``), so that it goes on
    as the uninterrupted run would: only where its last checkpoint is at that step and holds the weights the trainer
    loaded there (its stage the callback's); anything else is refused, never recorded from the wrong step. With
    ``rewind``, an earlier checkpoint of the run at that step will do too: the run is rewound to it (the steps
    after it forgotten, ``TrajectoryRecorder.resume(at_step=...)``)."""
    run = Path(run_dir)
    if overwrite:
        raise TrajectoryError(
            f"{trainer} resumes at step {start_step}, but a recorded run starts at step 0 and overwrite=True would "
            f"record it from there; train from the start, or resume without overwrite=True to continue the run "
            f"recorded in {run}."
        )
    if not (run / "trajectory.json").is_file():
        raise TrajectoryError(
            f"{trainer} resumes at step {start_step}, but {run} holds no recorded run to resume; record a new run "
            "from the start (train without resuming from a checkpoint)."
        )
    try:  # as TrajectoryRecorder.resume reads it (an unfinished run's index is not a Trajectory yet)
        index = json.loads((run / "trajectory.json").read_text())
        checkpoints = [Checkpoint(**c) for c in index["checkpoints"]]
        last = checkpoints[-1]
        stages = [s for s in index["stages"] if s["start_step"] <= start_step]
        name, size = stages[-1]["name"], stages[-1]["dataset_size"]
        smoothing = float(stages[-1].get("label_smoothing", 0.0))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise TrajectoryError(
            f"{run} holds no readable trajectory with a checkpoint to resume from ({type(err).__name__}); record a new "
            "run from the start (train without resuming from a checkpoint)."
        ) from err
    earlier = next((c for c in checkpoints[:-1] if c.step == start_step), None)
    if last.step != start_step and not (rewind and earlier is not None):
        also = (f", or pass rewind=True to the callback to rewind the recorded run to its checkpoint at step "
                f"{start_step} (the steps after it are forgotten)") if earlier is not None else ""  # fmt: skip
        raise TrajectoryError(
            f"{trainer} resumes at step {start_step}, but the run recorded in {run} has its last checkpoint at step "
            f"{last.step}; resume the trainer from its checkpoint at step {last.step} (save trainer checkpoints at "
            f"multiples of save_every){also}, or record a new run from the start."
        )
    at_step = None
    if last.step != start_step:
        assert earlier is not None
        last, at_step = earlier, start_step
    if (name, size) != (stage, dataset_size):
        raise TrajectoryError(
            f"The run recorded in {run} trains stage {name!r} on {size} examples at step {start_step}, but the resumed "
            f"trainer's callback names stage {stage!r} on {dataset_size}; resume with the callback's stage and "
            "training set of that run."
        )
    if smoothing != label_smoothing:
        raise TrajectoryError(
            f"The run recorded in {run} trains stage {name!r} with labels smoothed by {smoothing:g}, but the resumed "
            f"trainer smooths them by {label_smoothing:g}; resume with the label smoothing of that run."
        )
    weights = load_checkpoint(run, last, mmap=True)["model"]
    state = model.state_dict()
    fits = set(weights) <= set(state) if index.get("frozen") else set(weights) == set(state)  # trainable ones only
    if not fits or any(not torch.equal(state[k].detach().cpu(), v) for k, v in weights.items()):
        raise TrajectoryError(
            f"{trainer} resumes at step {start_step} with other weights than the run recorded in {run} saved at that "
            "step; resume the trainer from the checkpoint of this run, or record a new run from the start."
        )
    # The trainer restored the weights (those checked) and its optimizer's state, whose learning rate its scheduler
    # has moved on from the step's: the recorder's own would put back the rate the last step used.
    recorder = TrajectoryRecorder.resume(run, model, optimizer, save_every=save_every, grad_scaler=grad_scaler,
                                         watch_clipping=watch_clipping, restore=False, at_step=at_step)
    return recorder


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


def gradient_norm(model: Any) -> float:
    """The norm of ``model``'s gradients, all parameters together (0 where none has one)."""
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def clip_factor(model: Any, unclipped: float | None) -> float | None:
    """The factor clipping scaled a multi-process step's averaged gradients by: their norm as the step leaves them
    over ``unclipped``, their norm before clipping; ``None`` where that was not taken (nothing clipped), is 0, or is
    not finite (a step the fp16 loss scaler skipped, recorded at rate 0)."""
    if unclipped is None or not math.isfinite(unclipped) or unclipped == 0 or model is None:
        return None
    return min(1.0, gradient_norm(model) / unclipped)


def warn_weighted_sampler(dataloader: Any, where: str) -> None:
    """Warn where the training dataloader draws examples by weight: SOURCE weights every example of a stage alike."""
    sampler = getattr(dataloader, "sampler", None)
    if isinstance(sampler, WeightedRandomSampler):
        warnings.warn(
            f"{where}: the training dataloader draws examples by a WeightedRandomSampler, but SOURCE weights every "
            "example of a stage alike (1/N), so the scores of examples drawn more often than others are understated "
            "by their weight; train with a uniform sampler (shuffle=True) to attribute the run as trained.",
            stacklevel=3,
        )


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

    def start_capture(
        self, recorder: TrajectoryRecorder, overwrite: bool, dataloader: Any, *, trains_bf16: bool = False
    ) -> GradientCapture:
        """The capture of ``recorder``'s run into the store (overwriting it when the run is overwritten); the
        training dataloader's dataset is fingerprinted as the stage's data when it is a map-style dataset of
        the stage's size (otherwise the store's data go unchecked, which a check of them says). ``trains_bf16``:
        the trainer runs in bf16 mixed precision, which capture's own passes in fp32 would not (a warning says so)."""
        if trains_bf16 and self.capture_options.precision == "fp32":
            warnings.warn(
                "The trainer trains in bf16, but capture's own passes (the end pass, the eigen basis passes) run in "
                "fp32, at several times a bf16 pass's cost on a GPU; pass options=sp.CaptureArguments("
                "precision='bf16').",
                stacklevel=3,
            )
        stage, size = recorder.stage
        dataset = getattr(dataloader, "dataset", None)
        try:
            sized = not isinstance(dataset, IterableDataset) and hasattr(dataset, "__getitem__")
            sized = sized and len(dataset) == size  # type: ignore[arg-type]
        except TypeError:  # no len()
            sized = False
        projection = self.projection
        if projection is None and not sized:  # GradientCapture's warning asks for datasets=, which callbacks lack
            warnings.warn(
                f"The training dataloader's dataset is not a map-style dataset of the stage's {size} examples, so "
                "capture projects with the random 'factored' projection and takes no end pass; train on a map-style "
                "dataset of them (sp.IndexedDataset of one with a len()) for the more accurate 'eigen' projection and "
                "the end pass, or pass projection=sp.ProjectionArguments(kind='factored') to the callback.",
                stacklevel=3,
            )
            projection = ProjectionArguments(kind="factored")
        self.capture = GradientCapture(
            recorder,
            self.store_path,
            self.task,
            projection=projection,
            options=self.capture_options,
            overwrite=overwrite,
            datasets={stage: dataset} if sized else None,
            collate_fn=getattr(dataloader, "collate_fn", None),
        )
        return self.capture
