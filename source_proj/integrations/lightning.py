"""Lightning callbacks: record the trajectory SOURCE needs, and capture gradients in-run.

Usage::

    from source_proj.integrations import LightningRecorder
    trainer = lightning.Trainer(max_epochs=3, callbacks=[LightningRecorder("runs/pl", save_every=50)])
    trainer.fit(module, train_loader)

The LightningModule itself is the recorded model (its ``state_dict`` keys are what featurize loads).
One optimizer only; the stage's dataset size is ``len(train_dataloader.dataset)`` unless given. In a
multi-process run (``strategy="ddp"``) the process of global rank 0 records: every process holds the same weights,
learning rates and averaged gradients.
``trainer.fit(..., ckpt_path=...)`` continues the recorded run under the rule of the Hugging Face callbacks
(``huggingface.py``): only from the recorder's last checkpoint (from an earlier one of the run with
``rewind=True``), never with ``overwrite=True``.

Weight averaging (``StochasticWeightAveraging``, ``EMAWeightAveraging``) copies its average into the module as
training ends: the recorder, listed before it, saves the run's last checkpoint first, with the weights training
reached, which SOURCE attributes (a warning says so). On a model with batch norm, SWA then runs one more epoch
that recomputes the averaged weights' batch-norm statistics and steps the optimizer without gradients: the run is
closed as that epoch begins, so that epoch is not recorded as a training step.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from lightning.pytorch import Callback, callbacks, strategies

from source_proj.errors import TaskError, TrajectoryError
from source_proj.featurize.arguments import ProjectionArguments
from source_proj.featurize.capture import INDEX_KEY, CaptureArguments, split_indices
from source_proj.integrations._hook import (
    CaptureSettings,
    RecorderSettings,
    clip_factor,
    dataset_size,
    gradient_norm,
    start_recording,
    warn_weighted_sampler,
)
from source_proj.tasks.task import Task


class LightningRecorder(RecorderSettings, Callback):
    """Records checkpoints, every optimizer step's learning rate and the optimizer of a Lightning run.

    Args:
        run_dir: the run directory to write (see ``TrajectoryRecorder``).
        save_every: save a checkpoint every this many optimizer steps (and at the start and end).
        stage: the stage name.
        dataset_size: the training set size (default: ``len`` of the training dataloader's dataset).
        overwrite: replace an existing trajectory in ``run_dir``.
        rewind: a trainer resumed from an earlier checkpoint than the recorded run's last (one the run also
            saved) rewinds the run to it: the steps recorded after it are forgotten (default: refused).
        label_smoothing: ε of a training loss that smooths its labels, recorded with the stage (featurize then
            takes a task with the same ``label_smoothing``). Default: none (the LightningModule's loss is its
            own, which the callback cannot read).
        weights: what each checkpoint saves: ``"auto"`` (the adapters only for a peft model, else every weight),
            ``"all"`` or ``"trainable"`` (see ``TrajectoryRecorder``).
    """

    _closed = False  # the recorded run was closed (before SWA's batch-norm epoch, or as training ended)
    _module: Any = None  # in a multi-process run, the module whose averaged gradients give each step's clipping
    _unclipped: float | None = None  # their norm before clipping, at the step being taken
    _warned_size = False  # a training set of another size was warned of
    _trainer: Any = None
    _automatic = True  # the LightningModule's automatic optimization, which divides the loss by the batches accumulated
    _batches = 0  # batches since the last optimizer step
    _step_at_batch = 0  # the trainer's global step as the current batch began

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._closed, self._module, self._unclipped, self._warned_size = False, None, None, False
        sharded = next((type(trainer.strategy).__name__ for kind in _SHARDED
                        if isinstance(trainer.strategy, getattr(strategies, kind, ()))), None)  # fmt: skip
        if sharded is not None:
            raise TrajectoryError(
                f"The Trainer's {sharded} shards the module's weights and optimizer state between processes, and "
                f"{type(self).__name__} saves them whole from one process; record the run with strategy='ddp' or on "
                "one device."
            )
        averaging = _averaging(trainer)
        if averaging and trainer.callbacks.index(averaging[0]) < trainer.callbacks.index(self):
            raise TrajectoryError(
                f"{type(averaging[0]).__name__} is listed before {type(self).__name__} in the Trainer's callbacks, so "
                "it would copy its averaged weights into the module before the recorder saves the run's last "
                f"checkpoint as the trained weights; list {type(self).__name__} before it."
            )
        finetuning = next((c for c in trainer.callbacks if isinstance(c, callbacks.BaseFinetuning)), None)
        if finetuning is not None:
            raise TrajectoryError(
                f"{type(finetuning).__name__} freezes part of the module and trains it later in a parameter group of "
                "its own learning rate, but SOURCE takes every parameter as trained, at fixed rate ratios, throughout; "
                f"record the run without {type(finetuning).__name__}."
            )
        if len(trainer.optimizers) != 1:
            raise TrajectoryError(
                f"The LightningModule configures {len(trainer.optimizers)} optimizers; SOURCE follows one optimizer, "
                "so record runs with a single optimizer."
            )
        self._trainer, self._automatic, self._batches = trainer, bool(pl_module.automatic_optimization), 0
        size = dataset_size(self.dataset_size, trainer.train_dataloader, "LightningRecorder")
        warn_weighted_sampler(trainer.train_dataloader, type(self).__name__)
        if int(trainer.world_size) > 1:
            if int(trainer.global_rank) != 0:
                return
            self._module = pl_module
        self.recorder, self._handle = start_recording(
            self.run_dir,
            pl_module,
            trainer.optimizers[0],
            stage=self.stage,
            dataset_size=size,
            save_every=self.save_every,
            overwrite=self.overwrite,
            rewind=self.rewind,
            grad_scaler=getattr(trainer.precision_plugin, "scaler", None),  # fp16 mixed precision's loss scaler
            start_step=int(trainer.global_step),  # above 0: fit(ckpt_path=...) (see _hook.resume_recording)
            trainer="The Lightning Trainer",
            label_smoothing=self.label_smoothing or 0.0,
            weights=self.weights,
            clip=self._clip_factor if self._module is not None else None,
            scale=self._accumulated,
        )
        if averaging:
            warnings.warn(
                f"{type(averaging[0]).__name__} leaves its averaged weights in the module when training ends; SOURCE "
                "attributes the weights training reached, which the recorded run's final checkpoint holds (load them "
                "from it to query), not the average.",
                stacklevel=2,
            )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batches += 1
        self._step_at_batch = int(trainer.global_step)

    def _accumulated(self) -> float:
        """The step's gradient against its examples' mean loss: Lightning divides each batch's loss by
        ``accumulate_grad_batches`` = n, also in an epoch's last step, which accumulates the m < n batches left."""
        batches, self._batches = self._batches, 0
        n = int(self._trainer.accumulate_grad_batches) if self._trainer is not None else 1
        return batches / n if self._automatic and 0 < batches < n else 1.0

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """A multi-process run: the averaged gradients' norm before clipping (the hooks of the recorder's own measure
        see each process's local gradients, before they are averaged)."""
        if self._module is not None:
            self._unclipped = gradient_norm(pl_module)

    def _clip_factor(self) -> float | None:
        """The factor clipping scaled the step's averaged gradients by: their norm as the step leaves them over their
        norm before clipping."""
        unclipped, self._unclipped = self._unclipped, None
        return clip_factor(self._module, unclipped)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """SWA's batch-norm epoch (one past its last, added for a model with batch norm): the run ends before it. A
        training dataloader reloaded with a training set of another size is warned of, once."""
        if self.recorder is not None and not self._closed and self.dataset_size is None and not self._warned_size:
            recorded = self.recorder.stage[1]
            size = getattr(trainer.train_dataloader, "dataset", None)
            size = len(size) if hasattr(size, "__len__") else recorded
            if size != recorded:
                self._warned_size = True
                warnings.warn(
                    f"{type(self).__name__}: the training dataloader of epoch {trainer.current_epoch} holds {size} "
                    f"examples, but the stage was recorded on the {recorded} its first one held, and SOURCE attributes "
                    "one training set per stage; keep the training set fixed (reload_dataloaders_every_n_epochs with "
                    "the same dataset), or train each training set as a stage of its own.",
                    stacklevel=2,
                )
        if any(isinstance(c, callbacks.StochasticWeightAveraging) and trainer.current_epoch == c.swa_end + 1
               for c in _averaging(trainer)):  # fmt: skip
            self._finish()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A step the fp16 loss scaler skipped ran no ``optimizer.step`` (no post-hook), while Lightning's global step
        counts it: it is recorded here, at rate 0 (the weights did not move), so the two stay in step."""
        if self.recorder is not None and not self._closed:
            while self.recorder.global_step < int(trainer.global_step):
                self.recorder.step()
        if int(trainer.global_step) > self._step_at_batch:  # a step, taken or skipped: the next accumulation begins
            self._batches = 0

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Training failed: the callback's hooks come off, and the recorder's and capture's (``detach``), so a later
        fit of the module, in this process too, starts clean; the recorded run (and store) stays as its last
        checkpoint left it, to resume from (``fit(ckpt_path=...)``)."""
        self._unhook()
        if self.recorder is not None:
            self.recorder.detach()

    def _unhook(self) -> None:
        """Remove the hook that steps the recorder from the optimizer."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _finish(self) -> None:
        """Close the recorded run (once)."""
        if self.recorder is None or self._closed:
            return
        self._closed = True
        self._unhook()
        self.recorder.close()


_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
"""Lightning's strategies that shard the module's weights between processes."""


def _averaging(trainer: Any) -> list[Callback]:
    """The trainer's callbacks that copy averaged weights into the module as training ends (SWA, EMA)."""
    kinds = tuple(getattr(callbacks, name) for name in ("StochasticWeightAveraging", "WeightAveraging")
                  if hasattr(callbacks, name))  # fmt: skip
    return [c for c in trainer.callbacks if isinstance(c, kinds)]


class LightningCapture(LightningRecorder):
    """Records the run (as ``LightningRecorder``) and captures projected per-example gradients in-run.

    Usage::

        loader = DataLoader(sp.IndexedDataset(train), batch_size=64, shuffle=True)
        capture = LightningCapture("runs/pl", "runs/pl.sp", sp.ClassificationTask(), save_every=50,
                                   projection=sp.ProjectionArguments(dim=1024))
        lightning.Trainer(max_epochs=3, callbacks=[capture]).fit(module, loader)
        sp.fit("runs/pl.sp")

    The training set must be wrapped in ``source_proj.IndexedDataset``: the callback takes each
    batch's row indices out of the batch (in place: batches must be lists or dicts, as the default
    collate makes them) before ``training_step`` sees it. ``task`` computes with the LightningModule
    on those batches; ``training_step`` must minimise the batch mean of its per-example loss (with
    ``accumulate_grad_batches`` = n, Lightning divides it by n, which capture undoes; manual optimization that
    steps after several batches is warned of, as its division cannot be seen). One process only: a
    multi-process run (``strategy="ddp"``), whose processes train on shares of each step's examples, is refused.
    The store records the model fingerprint and, from the training dataloader's dataset, the stage's
    data fingerprint (``source_proj.GradientCapture``).

    Args: as ``source_proj.integrations.HuggingFaceCapture``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        store_path: str | os.PathLike[str],
        task: Task,
        *,
        save_every: int,
        projection: ProjectionArguments | None = None,
        options: CaptureArguments = CaptureArguments(),
        stage: str = "main",
        dataset_size: int | None = None,
        overwrite: bool = False,
        rewind: bool = False,
        label_smoothing: float | None = None,
        weights: str = "auto",
    ) -> None:
        if label_smoothing is None:  # the module's loss is its own: the task says what it is
            label_smoothing = float(getattr(task, "label_smoothing", 0.0))
        super().__init__(run_dir, save_every=save_every, stage=stage, dataset_size=dataset_size, overwrite=overwrite,
                         rewind=rewind, label_smoothing=label_smoothing, weights=weights)
        self.settings = CaptureSettings(store_path, task, projection=projection, options=options)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if int(trainer.world_size) > 1:
            raise TaskError(
                f"LightningCapture captures the batches of one process, and this run trains {trainer.world_size} "
                "processes on shares of each step's examples; capture with one process, or record the run with "
                "LightningRecorder and featurize it after training."
            )
        super().on_train_start(trainer, pl_module)
        assert self.recorder is not None
        self._since_step, self._warned_manual = 0, False
        bf16 = str(getattr(trainer, "precision", "")).startswith("bf16")
        self.settings.start_capture(self.recorder, self.overwrite, trainer.train_dataloader, trains_bf16=bf16)

    _backward = False  # the begun batch's backward has run (a training_step that returns None has none)
    _since_step = 0  # batches begun since the last optimizer step
    _warned_manual = False  # manual optimization that accumulates batches was warned of

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        assert self.settings.capture is not None
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._forget_untrained()
        indices, rest = split_indices(batch)
        if isinstance(batch, dict):
            del batch[INDEX_KEY]
        elif isinstance(batch, list) and isinstance(rest, (list, tuple)):
            batch[:] = rest
        else:
            raise TaskError(
                f"LightningCapture takes the row indices out of each batch in place, which a {type(batch).__name__} "
                "batch does not allow; return dicts or tuples from the dataset (the default collate makes lists)."
            )
        if self._closed:  # SWA's batch-norm epoch, after the run ended: not training
            return
        count = int(indices.numel())
        self.settings.capture.begin(batch, indices, scale=float(count * trainer.accumulate_grad_batches))
        self._backward, self._since_step = False, self._since_step + 1

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.settings.capture is not None and not self._closed:
            self.settings.capture.end_forward()
            self._backward = True

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._forget_untrained()
        batches, self._since_step = self._since_step, 0
        if batches > 1 and not pl_module.automatic_optimization and not self._warned_manual:
            self._warned_manual = True
            warnings.warn(
                f"LightningCapture: the LightningModule's own optimization stepped after {batches} batches, and "
                "capture takes each batch's loss as the batch mean of the task's loss: a loss divided by the batches "
                "it accumulates is captured that many times too small; accumulate with the Trainer's "
                "accumulate_grad_batches, which capture scales for.",
                stacklevel=2,
            )

    def _forget_untrained(self) -> None:
        """A batch whose training_step returned None (Lightning skips its backward) was not trained on: not captured.
        One whose backward ran outside Lightning's (``loss.backward()`` in a training_step of its own) reached the
        layers, and is kept."""
        capture = self.settings.capture
        if capture is not None and not self._closed and not self._backward and not capture.reached:
            capture.discard()
