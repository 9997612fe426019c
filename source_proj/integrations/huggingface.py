"""``transformers.Trainer`` callbacks: record the trajectory SOURCE needs, and capture gradients in-run.

Usage::

    from source_proj.integrations import HuggingFaceRecorder
    trainer = Trainer(model, args, train_dataset=train, callbacks=[HuggingFaceRecorder("runs/hf", save_every=50)])
    trainer.train()            # runs/hf now holds trajectory.json and the checkpoints

The stage's dataset size is ``len(train_dataset)`` unless given; the loss the Trainer minimises must
be the batch mean of the task's per-example loss (the default for HF models' ``labels`` loss). The
Trainer clips gradients at ``max_grad_norm`` (1.0 by default): the recorder measures each step's
clipping factor and SOURCE's step sizes include it (fp16's loss scaling is taken out). Under ``torchrun`` the process
of ``process_index`` 0 records, with the clipping of the gradients averaged over the processes; FSDP and DeepSpeed are
refused, and so is ``HuggingFaceCapture`` on several processes.

With ``gradient_accumulation_steps`` above 1 the Trainer of transformers 5 leaves the loss undivided where the model
takes loss keyword arguments (every Hugging Face model does) and trusts its loss to divide by the ``num_items_in_batch``
it passes; a model whose loss ignores it (BERT's heads) then steps n times too far. The callbacks try the model's loss
on two training examples as training begins and refuse such a run in one sentence
(``trainer.loss_is_scaled_for_ga = False`` makes the Trainer divide).

``trainer.train(resume_from_checkpoint=...)`` continues the recorded run (and its capture store) where the
recorder's last checkpoint is at the step the Trainer resumes from and holds the weights it loaded (save the
Trainer's checkpoints at multiples of ``save_every``); from an earlier checkpoint of the run only with
``rewind=True`` (the run and its store are rewound to it). Any other resume is refused in one sentence, and so is
``overwrite=True`` on a resumed Trainer (a recorded run starts at step 0).
"""

from __future__ import annotations

import inspect
import os
import warnings
import weakref
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from source_proj.compiled import eager
from source_proj.errors import TaskError, TrajectoryError
from source_proj.featurize.arguments import ProjectionArguments
from source_proj.featurize.basis import modes_kept
from source_proj.featurize.capture import INDEX_KEY, CaptureArguments
from source_proj.integrations._hook import (
    CaptureSettings,
    RecorderSettings,
    clip_factor,
    dataset_size,
    start_recording,
)
from source_proj.tasks.data import RandomStateKept
from source_proj.tasks.task import Task

_CALLS_OPTIMIZER_STEP = hasattr(CallbackHandler, "on_optimizer_step")
"""Whether this transformers' Trainer tells its callbacks of every optimizer step (``on_optimizer_step``)."""

LABELS_KEY = "source_proj_labels"
"""A training batch's labels, kept under this key too: the Trainer pops ``labels`` from the model's inputs when a
label smoother or ``compute_loss_func`` computes its loss, and capture needs them for its batch."""


class _KeepLabels:
    """A collate function that also keeps each batch's ``labels`` under ``LABELS_KEY`` (taken out again before the
    model sees it)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __getattr__(self, name: str) -> Any:  # the wrapped collator's own attributes (signature_columns)
        collate = self.__dict__.get("collate")  # absent while unpickling (a worker process's copy)
        if collate is None:
            raise AttributeError(name)
        return getattr(collate, name)

    def __call__(self, features: Any) -> Any:
        batch = self.collate(features)
        if isinstance(batch, MutableMapping) and isinstance(batch.get("labels"), Tensor):
            batch[LABELS_KEY] = batch["labels"]  # a batch just made (a dict, or a BatchEncoding)
        return batch


def _calling_trainer() -> Any:
    """The Trainer whose callback handler is calling (a callback is not given it): the first ``self`` up the
    stack that is one; None where there is none."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(16):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def _sharded(trainer: Any) -> str:
    """The sharding a Trainer trains with ("FSDP", "DeepSpeed"), "" where none."""
    for flag, name in (("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")):
        if getattr(trainer, flag, False) is True:
            return name
    return ""


def _own_loss(trainer: Any) -> str:
    """What computes a Trainer's loss where it is not the model's own: its ``compute_loss_func``, or the
    ``compute_loss`` of a subclass (TRL's trainers among them); "" where it is the model's."""
    if trainer is None:
        return ""
    if getattr(trainer, "compute_loss_func", None) is not None:
        return "a compute_loss_func of your own"
    from transformers import Trainer

    owner = next(k for k in type(trainer).__mro__ if "compute_loss" in vars(k))
    if owner is not Trainer:
        return f"the compute_loss of its subclass {owner.__name__}"
    return ""


def _steps_too_far(trainer: Any, model: Any, args: Any, dataloader: Any) -> str:
    """Why the Trainer's steps would be larger than the mean loss's: with gradient accumulation over n batches the
    Trainer leaves each batch's loss undivided where it trusts the model to divide by the ``num_items_in_batch`` it
    passes (a model that takes loss keyword arguments), and a model whose loss ignores it (BERT's heads compute their
    own mean) sums n batch means. Tried on the model's loss of two training examples (eval mode, no gradients, the
    random state kept); "" where the steps are those of the mean loss or it cannot be told."""
    accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    if accumulation <= 1 or trainer is None or getattr(trainer, "label_smoother", None) is not None:
        return ""  # a label smoother divides by num_items_in_batch itself
    trusted = getattr(trainer, "loss_is_scaled_for_ga", None)
    if trusted is None:
        trusted = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
    dataset, collate = getattr(dataloader, "dataset", None), getattr(dataloader, "collate_fn", None)
    if not trusted or collate is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return ""
    try:
        rows = [dataset[i] for i in range(min(2, len(dataset)))]  # type: ignore[arg-type, index]
    except (TypeError, IndexError, KeyError, AttributeError):
        return ""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    losses = []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), modes_kept(model):  # a random collator's draws too
        model.eval()
        try:
            batch = RandomStateKept(collate)(rows)  # a collator's own generator (a seeded masking) is kept too
            if not isinstance(batch, MutableMapping) or not isinstance(batch.get("labels"), Tensor):
                return ""
            inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()
                      if k not in (INDEX_KEY, LABELS_KEY)}  # fmt: skip
            count = max(float(inputs["labels"].ne(-100).sum()), 1.0)
            for items in (count, 2 * count):
                output = model(**inputs, num_items_in_batch=torch.tensor(items, device=device))
                loss = output.get("loss") if isinstance(output, MutableMapping) else getattr(output, "loss", None)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    return ""
                losses.append(float(loss))
        except Exception:  # a model or collator this try does not suit: training will say what is wrong, not this
            return ""
    if losses[0] == 0.0 or abs(losses[1] / losses[0] - 1.0) > 1e-3:
        return ""  # the loss divides by num_items_in_batch
    return (
        f"The Trainer accumulates gradients over {accumulation} batches without dividing their losses by "
        f"{accumulation}, because it trusts {type(model).__name__}'s loss to divide by the num_items_in_batch it "
        f"passes, which that loss ignores, so each step is up to {accumulation} times the mean loss's step that "
        "SOURCE models; set trainer.loss_is_scaled_for_ga = False before trainer.train() (the Trainer then divides "
        "them), or train without gradient accumulation."
    )


def _counts_every_label(trainer: Any) -> str:
    """The class of a causal language model whose loss the Trainer divides by every label of the batch, position 0's
    too, though none predicts it: transformers counts the shifted labels only for a ``loss_type`` it knows, and a
    model whose class name does not say it (GPT-2's ``GPT2LMHeadModel``) has none. "" where it counts the predicted
    tokens, or cannot be told."""
    if trainer is None or getattr(trainer, "_loss_shifts_labels", None) is not False:
        return ""
    if not getattr(trainer, "model_accepts_loss_kwargs", False):
        return ""  # the model's own loss, divided by its own count
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
        from transformers.trainer_utils import unwrap_peft_model
    except ImportError:
        return ""
    model = unwrap_peft_model(getattr(trainer, "model", None))
    config = getattr(model, "config", None)
    if getattr(model, "loss_type", "") is not None or config is None or getattr(config, "is_encoder_decoder", False):
        return ""
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()) or getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return ""
    return type(model).__name__


class HuggingFaceRecorder(RecorderSettings, TrainerCallback):
    """Records checkpoints, every optimizer step's learning rate and the optimizer of a ``Trainer`` run.

    Args:
        run_dir: the run directory to write (see ``TrajectoryRecorder``).
        save_every: save a checkpoint every this many optimizer steps (and at the start and end).
        stage: the stage name.
        dataset_size: the training set size (default: ``len`` of the trainer's training dataset).
        overwrite: replace an existing trajectory in ``run_dir``.
        rewind: a trainer resumed from an earlier checkpoint than the recorded run's last (one the run also
            saved) rewinds the run to it: the steps recorded after it are forgotten (default: refused).
        label_smoothing: ε of a training loss that smooths its labels, recorded with the stage (featurize then
            takes a task with the same ``label_smoothing``). Default: the Trainer's ``label_smoothing_factor``
            (give it only for a loss of your own, a ``compute_loss_func``, that smooths them).
        weights: what each checkpoint saves: ``"auto"`` (the adapters only for a peft model, else every weight),
            ``"all"`` or ``"trainable"`` (see ``TrajectoryRecorder``).
    """

    _trainer: Any = None  # the Trainer training, while it trains
    _accelerator: Any = None  # in a multi-process run, the Trainer's accelerator, whose clipping norm is kept
    _model: Any = None  # and the model whose averaged gradients give each step's clipping factor
    _unclipped: float | None = None  # their norm before clipping, at the step being taken
    _closed = False  # the recorded run was closed (before the Trainer loaded its best checkpoint, or as it ended)
    _retried = False  # this training restarts one of this callback's that failed before its first step

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._unclipped = None
        if self._handle is not None:  # the post-hook of a training that raised, on the optimizer the Trainer keeps
            self._handle.remove()
            self._handle = None
        # auto_find_batch_size: the Trainer trains again from step 0, at a smaller batch size, after running out of
        # memory, and tells its callbacks nothing of the failure; where it failed before the first step (or the
        # training is restarted after such a failure) the run recorded only its start, which is recorded again.
        self._retried = (self.recorder is not None and not self._closed and self.recorder.global_step == 0
                         and int(state.global_step) == 0)  # fmt: skip
        processes = int(getattr(args, "world_size", 1) or 1)
        if processes > 1 and int(getattr(args, "process_index", 0)) != 0:
            # Every process holds the same weights and averaged gradients: the first records, checks and warns
            # (torchrun stops the others where it refuses the run).
            self.recorder, self._handle, self._trainer = None, None, None
            return
        alpha = getattr(args, "neftune_noise_alpha", None)
        if alpha:
            warnings.warn(
                f"The Trainer adds NEFTune noise to the input embeddings (neftune_noise_alpha={alpha:g}), which SOURCE "
                "does not model: featurize takes each example's gradient without the noise (capture, at the training "
                "step, with that step's own), so the scores are those of the noise-free loss.",
                stacklevel=2,
            )
        trainer = _calling_trainer()
        own_loss = _own_loss(trainer)
        if not own_loss:
            too_far = _steps_too_far(trainer, kwargs["model"], args, kwargs.get("train_dataloader"))
            if too_far:
                raise TrajectoryError(too_far)
        self._trainer = trainer
        counted = "" if own_loss else _counts_every_label(trainer)
        if counted:
            warnings.warn(
                f"The Trainer divides {counted}'s summed token loss by every label of its batches, position 0's too "
                "(transformers counts the predicted ones only for a model whose loss_type it knows), so the mean loss "
                "per sequence is s/(n+1), n its predicted tokens; set model.loss_type = 'ForCausalLM' before building "
                "the Trainer (the loss is then the model's own), or give featurize LanguageModelingTask("
                "tokens_per_sequence=mean_predicted_tokens(train) + 1).",
                stacklevel=2,
            )
        if own_loss:
            warnings.warn(
                f"The Trainer computes its loss with {own_loss}, which SOURCE does not see: "
                "featurize takes each example's gradient of the task's loss (capture, the training step's own, but its "
                "Fisher and end pass the task's), so give featurize a task whose loss is the one it computes "
                "(class weights included), or the scores are those of another loss"
                + (" (where it returns the model's own loss, nothing is amiss)." if "subclass" in own_loss else "."),
                stacklevel=2,
            )
        size = dataset_size(self.dataset_size, kwargs.get("train_dataloader"), "HuggingFaceRecorder")
        sharded = _sharded(trainer)
        if sharded:
            raise TrajectoryError(
                f"The Trainer trains with {sharded}, which shards the model's weights or optimizer state between "
                f"processes, and {type(self).__name__} saves them whole from one process; record the run under "
                "torchrun's plain data parallelism (DDP) or on one device."
            )
        if processes > 1:
            self._watch_clip(trainer)
        self.recorder, self._handle = start_recording(
            self.run_dir,
            kwargs["model"],
            kwargs["optimizer"],
            stage=self.stage,
            dataset_size=size,
            save_every=self.save_every,
            overwrite=self.overwrite or self._retried,
            rewind=self.rewind,
            grad_scaler=getattr(kwargs["optimizer"], "scaler", None),  # accelerate's optimizer holds the fp16 scaler
            start_step=int(state.global_step),  # above 0: resume_from_checkpoint (see _hook.resume_recording)
            trainer="The Trainer",
            # The Trainer's loss then smooths its labels (its LabelSmoother): featurize holds the task to it.
            label_smoothing=self._smoothing(args),
            # on_optimizer_step steps it, also at a step the fp16 loss scaler skipped; a Trainer too old to call it
            # (an older transformers) gets the optimizer's post-hook, which such a step does not reach.
            step_hook=not _CALLS_OPTIMIZER_STEP,
            weights=self.weights,
            clip=self._clip_factor if processes > 1 else None,
        )
        self._closed = False
        self._watch_best(trainer, args)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After every optimizer step of the Trainer, before its scheduler moves and the gradients are zeroed; also
        after a step the loss scaler skipped (``optimizer.step`` was not called), which the Trainer's global step
        counts too: the recorder takes it at rate 0 (its weights did not move), so the two stay in step."""
        if self.recorder is not None and _CALLS_OPTIMIZER_STEP:
            self.recorder.step(clip=self._clip_factor() if self._accelerator is not None else None)

    def _watch_clip(self, trainer: Any) -> None:
        """In a multi-process run each process's hooks see its own gradients before DDP averages them, so the
        recorder cannot measure the clipping: the norm the Trainer clips (its accelerator's ``clip_grad_norm_``,
        on the averaged gradients) is kept instead, and each step's factor is their norm after it over that one."""
        accelerator = getattr(trainer, "accelerator", None)
        clip = getattr(accelerator, "clip_grad_norm_", None)
        if not callable(clip):
            raise TrajectoryError(
                f"{type(self).__name__} cannot see the gradient norm this Trainer clips in a run of several "
                "processes (it has no accelerator's clip_grad_norm_); record the run on one process."
            )

        def kept(*clip_args: Any, **clip_kwargs: Any) -> Any:
            norm = clip(*clip_args, **clip_kwargs)
            self._unclipped = float(norm)
            return norm

        accelerator.clip_grad_norm_ = kept  # the instance's, removed again in on_train_end
        self._accelerator = accelerator
        self._model = getattr(trainer, "model", None)

    def _clip_factor(self) -> float | None:
        """This step's clipping factor, from the norm the Trainer clipped (``_hook.clip_factor``)."""
        unclipped, self._unclipped = self._unclipped, None
        return clip_factor(self._model, unclipped)

    def _smoothing(self, args: Any) -> float:
        """The ε the run's loss smooths its labels by: the Trainer's own, or the one the callback was given."""
        trainers = float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)
        if self.label_smoothing is None or self.label_smoothing == trainers:
            return trainers
        if trainers:
            raise TrajectoryError(
                f"The Trainer smooths its labels by {trainers:g} (label_smoothing_factor), but the callback was given "
                f"label_smoothing={self.label_smoothing:g}; leave it out, the Trainer's is recorded."
            )
        return float(self.label_smoothing)

    def _watch_best(self, trainer: Any, args: Any) -> None:
        """With ``load_best_model_at_end`` the Trainer loads its best checkpoint into the model after the last step and
        before ``on_train_end``: the run is closed first, so that its final checkpoint (and capture's end pass and
        fingerprints) hold the last step's weights, not the best checkpoint's."""
        load = getattr(type(trainer), "_load_best_model", None)  # the class's: never a callback's left by a failed run
        if not getattr(args, "load_best_model_at_end", False) or not callable(load):
            return

        def close_first(*load_args: Any, **load_kwargs: Any) -> Any:
            self._finish()
            return load(trainer, *load_args, **load_kwargs)

        trainer._load_best_model = close_first  # the instance's, removed again in on_train_end

    def _finish(self) -> None:
        """Close the recorded run (once)."""
        if self.recorder is None or self._closed:
            return
        self._closed = True
        if self._handle is not None:  # the post-hook of a Trainer without on_optimizer_step
            self._handle.remove()
        self.recorder.close()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish()
        if int(getattr(args, "world_size", 1) or 1) > 1 and torch.distributed.is_initialized():
            # The other processes wait for the first to have closed the recorded run: the Trainer does not wait after
            # on_train_end, and a process that exits may abort in torch's teardown (seen with gloo on a loaded CPU,
            # with or without a recorder), whereupon torchrun kills the others, the first half-way through its writes.
            torch.distributed.barrier()
        if self._trainer is not None:
            vars(self._trainer).pop("_load_best_model", None)
        if self._accelerator is not None:
            vars(self._accelerator).pop("clip_grad_norm_", None)
        self._accelerator, self._model = None, None
        self._trainer = None
        best = getattr(state, "best_model_checkpoint", None)
        if self.recorder is not None and getattr(args, "load_best_model_at_end", False) and best is not None:
            warnings.warn(
                f"The Trainer loaded its best checkpoint ({best}) into the model after step {state.global_step}; "
                f"SOURCE attributes the recorded run, whose final checkpoint holds the weights of step "
                f"{self.recorder.global_step}, not the best checkpoint's.",
                stacklevel=2,
            )


_CAPTURING: weakref.WeakKeyDictionary[Any, HuggingFaceCapture] = weakref.WeakKeyDictionary()
"""The capture callback whose hooks are on a model, while it trains. A training that fails tells its callbacks nothing
(no ``on_train_end``), so its hooks stay: the model's next capture removes them, and closes that capture."""


class HuggingFaceCapture(HuggingFaceRecorder):
    """Records the run (as ``HuggingFaceRecorder``) and captures projected per-example gradients in-run.

    Usage::

        capture = HuggingFaceCapture("runs/hf", "runs/hf.sp", task, save_every=50,
                                     projection=sp.ProjectionArguments(dim=1024))
        Trainer(model, args, train_dataset=sp.IndexedDataset(train), callbacks=[capture]).train()
        sp.fit("runs/hf.sp")

    The training set must be wrapped in ``source_proj.IndexedDataset`` (dict items gain a
    ``"source_proj_index"`` column; the callback keeps the Trainer from dropping it and takes it out of
    the model's inputs). The model's loss must be the batch mean of ``task``'s per-example loss (HF's
    default); with gradient accumulation each batch's gradients are scaled by the examples of the step where the
    Trainer's loss divides by its ``num_items_in_batch``, else by B times the batches it accumulates. One process
    only, on one device (a Trainer that splits batches over GPUs by DataParallel is refused). The store records
    the model fingerprint and, from the Trainer's ``train_dataset``, the stage's data fingerprint
    (``source_proj.GradientCapture``), so a model or data that changed are refused.

    Args:
        run_dir: the run directory to write (see ``TrajectoryRecorder``).
        store_path: the store to capture into (see ``source_proj.GradientCapture``).
        task: the task; its batches are the model's keyword inputs (e.g. ``SequenceClassificationTask``).
        save_every: save a checkpoint every this many optimizer steps (a window between checkpoints).
        projection: the projection: ``"eigen"`` (the default where the training dataloader's dataset is
            map-style and of the stage's size: each window's basis is estimated from it, batched by the
            dataloader's ``collate_fn``) or ``"factored"`` (the default otherwise); its dimension and seed.
        options: the Fisher, chunking (see ``source_proj.CaptureArguments``).
        stage: the stage name.
        dataset_size: the training set size (default: ``len`` of the trainer's training dataset).
        overwrite: replace an existing trajectory in ``run_dir`` and store at ``store_path``.
        rewind: a trainer resumed from an earlier checkpoint than the recorded run's last (one the run also
            saved) rewinds the run to it, and the store drops the windows captured after it (default: refused).
        label_smoothing: as ``HuggingFaceRecorder`` (default: the Trainer's ``label_smoothing_factor``;
            ``LightningCapture``: the task's ``label_smoothing``). The task must smooth by the same ε.
        weights: as ``HuggingFaceRecorder``.
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
        super().__init__(run_dir, save_every=save_every, stage=stage, dataset_size=dataset_size, overwrite=overwrite,
                         rewind=rewind, label_smoothing=label_smoothing, weights=weights)
        self.settings = CaptureSettings(store_path, task, projection=projection, options=options)
        self._model_hooks: list[Any] = []
        self._accumulation = 1
        self._step_rows: int | None = None  # the examples of the batches the Trainer accumulates into this step

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        processes = int(getattr(args, "world_size", 1) or 1)
        if processes > 1:
            raise TrajectoryError(
                f"HuggingFaceCapture captures the batches of one process, and this run trains on {processes}; record "
                "it with HuggingFaceRecorder and featurize after training, or capture on one process."
            )
        gpus = int(getattr(args, "n_gpu", 1) or 1)
        if gpus > 1:  # torch.nn.DataParallel: every GPU's replica would run the capture's hooks on its share, at once
            raise TrajectoryError(
                f"HuggingFaceCapture captures the batches of one device, and this Trainer splits each batch over "
                f"{gpus} GPUs (torch.nn.DataParallel); capture on one GPU (CUDA_VISIBLE_DEVICES=0), or record the run "
                "with HuggingFaceRecorder and featurize after training."
            )
        left = _CAPTURING.pop(kwargs["model"], None)
        if left is not None:  # of a training that failed (this callback's, or another's): its store stays resumable
            left._unhook()
            if left.settings.capture is not None:
                left.settings.capture.close()
        super().on_train_begin(args, state, control, **kwargs)
        assert self.recorder is not None
        self.settings.start_capture(self.recorder, self.overwrite or self._retried, kwargs.get("train_dataloader"),
                                    trains_bf16=bool(getattr(args, "bf16", False)))  # fmt: skip
        self._accumulation = int(args.gradient_accumulation_steps)
        loader = kwargs.get("train_dataloader")
        collate = getattr(loader, "collate_fn", None)
        columns = getattr(collate, "signature_columns", None)
        if isinstance(columns, list) and INDEX_KEY not in columns:
            columns.append(INDEX_KEY)  # the Trainer's RemoveColumnsCollator would drop the row indices
        if collate is not None:  # the Trainer takes the labels out of the model's inputs when it smooths them
            while getattr(loader, "base_dataloader", None) is not None:  # accelerate's adapters iterate their base
                loader = loader.base_dataloader
            loader.collate_fn = _KeepLabels(collate)
        self._count_step_rows(self._trainer)
        model = kwargs["model"]
        self._model_hooks = [
            # eager under the Trainer's torch_compile: dynamo runs the hooks as Python, never traces them
            model.register_forward_pre_hook(eager(self._before_forward), with_kwargs=True),
            model.register_forward_hook(eager(self._after_forward)),
        ]
        _CAPTURING[model] = self

    def _before_forward(self, module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        if INDEX_KEY not in kwargs:
            if module.training:
                raise TaskError(
                    "HuggingFaceCapture needs each training batch's row indices; pass "
                    "train_dataset=sp.IndexedDataset(your_dataset) to the Trainer."
                )
            return None
        inputs = dict(kwargs)
        indices = torch.as_tensor(inputs.pop(INDEX_KEY))
        labels = inputs.pop(LABELS_KEY, None)
        if module.training and self.settings.capture is not None:
            count = int(indices.numel())
            batch = {k: v for k, v in inputs.items() if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == count}
            if "labels" not in batch and isinstance(labels, Tensor):  # the Trainer's loss took them out
                batch["labels"] = labels
            self.settings.capture.begin(batch, indices, scale=self._scale(count, kwargs))
        return args, inputs

    def _scale(self, count: int, kwargs: dict[str, Any]) -> float:
        """What the batch's tapped gradients are multiplied by to give each example's own (``GradientCapture.begin``):
        where the Trainer's loss divides by the ``num_items_in_batch`` of the step (its label smoother, a model's loss
        that takes it), the examples of the batches the step accumulates, of whatever sizes (an epoch's last batch is
        short); where the Trainer divides each batch's mean loss by the batches it accumulates, the batch's size times
        those batches (fewer in an epoch's last step where its batches are not a multiple of
        gradient_accumulation_steps)."""
        trainer = self._trainer
        by_items = getattr(trainer, "loss_is_scaled_for_ga", None)  # the Trainer's own rule (``training_step``)
        if by_items is None:
            by_items = kwargs.get("num_items_in_batch") is not None or (
                getattr(trainer, "compute_loss_func", None) is not None
            )
        if by_items and self._step_rows is not None:
            return float(self._step_rows)
        batches = int(getattr(trainer, "current_gradient_accumulation_steps", 0) or self._accumulation)
        return float(count * batches)

    def _count_step_rows(self, trainer: Any) -> None:
        """Count the examples of the batches the Trainer takes for each step (its ``get_batch_samples``, the class's:
        never a wrapper a failed run left), removed again in ``_finish``."""
        take = getattr(type(trainer), "get_batch_samples", None)
        self._step_rows = None
        if trainer is None or not callable(take):
            return

        def counted(*take_args: Any, **take_kwargs: Any) -> Any:
            samples, items = take(trainer, *take_args, **take_kwargs)
            rows = [b.get(INDEX_KEY) if isinstance(b, MutableMapping) else None for b in samples]
            self._step_rows = None if any(r is None for r in rows) else sum(len(r) for r in rows)
            return samples, items

        trainer.get_batch_samples = counted

    def _after_forward(self, module: Any, args: Any, output: Any) -> None:
        if module.training and self.settings.capture is not None:
            self.settings.capture.end_forward()

    def _unhook(self) -> None:
        """Remove this callback's hooks from the model and the Trainer."""
        for handle in self._model_hooks:
            handle.remove()
        self._model_hooks = []
        for model, capturing in list(_CAPTURING.items()):
            if capturing is self:
                del _CAPTURING[model]
        if self._trainer is not None:
            vars(self._trainer).pop("get_batch_samples", None)

    def _finish(self) -> None:
        self._unhook()
        super()._finish()
