"""A Lightning callback that records the trajectory SOURCE needs.

Usage::

    from source_proj.integrations import LightningRecorder
    trainer = lightning.Trainer(max_epochs=3, callbacks=[LightningRecorder("runs/pl", save_every=50)])
    trainer.fit(module, train_loader)

The LightningModule itself is the recorded model (its ``state_dict`` keys are what featurize loads).
One optimizer only; the stage's dataset size is ``len(train_dataloader.dataset)`` unless given.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from source_proj.errors import TrajectoryError
from source_proj.integrations._hook import RecorderSettings, dataset_size, start_recording


class LightningRecorder(RecorderSettings, Callback):
    """Records checkpoints, every optimizer step's learning rate and the optimizer of a Lightning run.

    Args:
        run_dir: the run directory to write (see ``TrajectoryRecorder``).
        save_every: save a checkpoint every this many optimizer steps (and at the start and end).
        stage: the stage name.
        dataset_size: the training set size (default: ``len`` of the training dataloader's dataset).
        overwrite: replace an existing trajectory in ``run_dir``.
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise TrajectoryError(
                f"The LightningModule configures {len(trainer.optimizers)} optimizers; SOURCE follows one optimizer, "
                "so record runs with a single optimizer."
            )
        size = dataset_size(self.dataset_size, trainer.train_dataloader, "LightningRecorder")
        self.recorder, self._handle = start_recording(
            self.run_dir,
            pl_module,
            trainer.optimizers[0],
            stage=self.stage,
            dataset_size=size,
            save_every=self.save_every,
            overwrite=self.overwrite,
            grad_scaler=getattr(trainer.precision_plugin, "scaler", None),  # fp16 mixed precision's loss scaler
        )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.recorder is not None:
            self._handle.remove()
            self.recorder.close()
