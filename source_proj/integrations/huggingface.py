"""A ``transformers.Trainer`` callback that records the trajectory SOURCE needs.

Usage::

    from source_proj.integrations import HuggingFaceRecorder
    trainer = Trainer(model, args, train_dataset=train, callbacks=[HuggingFaceRecorder("runs/hf", save_every=50)])
    trainer.train()            # runs/hf now holds trajectory.json and the checkpoints

The stage's dataset size is ``len(train_dataset)`` unless given; the loss the Trainer minimises must
be the batch mean of the task's per-example loss (the default for HF models' ``labels`` loss). The
Trainer clips gradients at ``max_grad_norm`` (1.0 by default): the recorder measures each step's
clipping factor and SOURCE's step sizes include it (fp16's loss scaling is taken out).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from source_proj.integrations._hook import RecorderSettings, dataset_size, start_recording


class HuggingFaceRecorder(RecorderSettings, TrainerCallback):
    """Records checkpoints, every optimizer step's learning rate and the optimizer of a ``Trainer`` run.

    Args:
        run_dir: the run directory to write (see ``TrajectoryRecorder``).
        save_every: save a checkpoint every this many optimizer steps (and at the start and end).
        stage: the stage name.
        dataset_size: the training set size (default: ``len`` of the trainer's training dataset).
        overwrite: replace an existing trajectory in ``run_dir``.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        size = dataset_size(self.dataset_size, kwargs.get("train_dataloader"), "HuggingFaceRecorder")
        self.recorder, self._handle = start_recording(
            self.run_dir,
            kwargs["model"],
            kwargs["optimizer"],
            stage=self.stage,
            dataset_size=size,
            save_every=self.save_every,
            overwrite=self.overwrite,
            grad_scaler=getattr(kwargs["optimizer"], "scaler", None),  # accelerate's optimizer holds the fp16 scaler
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self._handle.remove()
            self.recorder.close()
