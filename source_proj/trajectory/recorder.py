"""Training trajectories: a recorder called from an ordinary training loop, and its loader.

On-disk format (a directory; ``trajectory.json`` is rewritten atomically after every checkpoint,
so an interrupted training run leaves a readable, incomplete trajectory)::

    RUN_DIR/
      trajectory.json
      checkpoints/step-00000000.pt      torch.save({"model": state_dict, "optimizer": state_dict?})

``trajectory.json``::

    {"format": "source-proj-trajectory", "version": 1, "complete": true,
     "run": "3f0c…",                               optional: drawn as the run starts and kept as it is resumed; a store
                                                   captured from the run finds it by this (moved, it is the same run)
     "lr": [η_0, η_1, ...],                        one learning rate per optimiser step: the reference group's
     "clip": [α_0, α_1, ...],                      optional: the factor gradient clipping scaled each
                                                   step's gradient by (1 = not clipped)
     "stages": [{"name": "main", "start_step": 0, "end_step": 300, "dataset_size": 1437,
                 "optimizer": {"kind": "sgd", "groups": [{"params": [...], "lr": .., "momentum": ..,
                               "dampening": .., "nesterov": .., "weight_decay": .., "lr_ratio": ..}]},
                 "label_smoothing": 0.1}],               optional: the stage trained on smoothed labels
     "checkpoints": [{"step": 0, "file": "checkpoints/step-00000000.pt", "sha256": "..",
                      "optimizer_state": false}, ...],
     "gradient_norms": [{"step": 0, "examples": 32,      optional: the step taken at each checkpoint's weights, the
                         "squared": {"0.weight": ..}}],   examples its forwards saw (0: not seen) and each parameter's
                                                   squared gradient norm before clipping, as of the mean loss
                                                   (over step's scale); featurize checks the loss's scale with them
     "frozen": {"sha256": "..", "tensors": 292, "numel": 6738415616}}   optional (weights="trainable"): the
                                                   checkpoints hold the trained parameters and the buffers only;
                                                   this digests the frozen rest, which the model featurize is
                                                   given must hold

``step`` counts optimiser steps taken before the checkpoint was saved (global across stages);
stage ``s`` owns steps ``start_step ≤ t < end_step``.

**Parameter groups at different learning rates** keep the ratio of their base rates (the scheduler's
``initial_lr``, else their rates as the stage begins): group g steps at r_g·η_k. The *reference* group is
the one with the largest base rate (the first of them), r = 1; ``lr`` records its rate, and each group
its ``lr_ratio`` r_g ∈ [0, 1], written only where some r_g ≠ 1 (a file without them: every r_g = 1). A
group whose base rate is 0 (r = 0, frozen by its rate) must stay at 0. ``step`` refuses a step whose
rates leave these ratios (a scheduler that treats groups differently).

**Gradient clipping** (``clip_grad_norm_``, the Hugging Face Trainer's ``max_grad_norm``, 1.0 by
default) multiplies step k's gradient by α_k = min(1, c/‖g_k‖), so the step an example's gradient
takes is η_k α_k: SOURCE's step sizes are ``Trajectory.lr`` = η_k·α_k. (The dependence of α_k on the
example itself, through ‖g_k‖, is second order and ignored.) The recorder measures α_k itself: it
keeps the norm of every parameter's gradient as backward accumulates it (a post-accumulate-grad
hook, so gradient accumulation is covered) and compares it with the norm the optimiser stepped with
(a step post-hook, so that a backward and clipping run inside ``optimizer.step(closure)``, as
Lightning runs them, count for the step they belong to). Anything that rescales all gradients
between backward and the step is thus recorded, whatever clipped them; a loss scaler's unscaling is
taken out when the scaler is given (``grad_scaler``). Value clipping (``clip_grad_value_``) changes
the gradient's direction and is recorded only as its change of norm. In a multi-process run each
process sees its local gradients, so pass the factor to ``TrajectoryRecorder.step`` instead.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import numbers
import os
import tempfile
import time
import uuid
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from source_proj.errors import TrajectoryError, first_line, not_an_instance
from source_proj.store.durable import atomic_write_bytes
from source_proj.trajectory.optimizers import MODELLED_OPTIMIZERS, optimizer_rule

FORMAT = "source-proj-trajectory"
VERSION = 1


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_HASHED: dict[tuple[str, int, int, int, int], str] = {}
"""sha256 of the checkpoint files this process has read, by (path, device, inode, size, mtime in ns)."""


def _checkpoint_sha256(file: Path) -> str:
    """sha256 of ``file``, hashed once per process while the file stays as it was. Featurize loads each checkpoint
    up to seven times (the check, the basis pass, each chunk's gradients, Adam's state); a 1B-parameter AdamW
    checkpoint is 12 GB, whose hash takes about 10 s. A checkpoint saved again, restored or edited gets a new
    inode, size or mtime and is hashed again. As git does with its index, a file modified in the last seconds is
    not remembered: file times move at the kernel's tick, so an edit that soon after could leave the mtime as it
    was."""
    stat = file.stat()
    key = (str(file.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _HASHED:
        return _HASHED[key]
    started = time.time_ns()
    digest = _sha256_file(file)
    if stat.st_mtime_ns < started - 2_000_000_000:
        _HASHED[key] = digest
    return digest


WRAPPER_PREFIXES = {
    "module.": "DataParallel or DistributedDataParallel",
    "_orig_mod.": "torch.compile",
}
"""What a wrapper puts before every parameter's name, and the wrappers that do."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DataParallel``, ``DistributedDataParallel`` and ``torch.compile``'s wrapper (nested ones
    too): the same parameters, under the names the model has when it is built again for featurize."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model



def _store_run(store: Path) -> str:
    """The run directory a store at ``store`` records, in words for a message (its metadata read as plain JSON)."""
    try:
        recorded = json.loads((store / "zarr.json").read_text())["attributes"]["source_proj"]["trajectory"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return "the run directory written by TrajectoryRecorder"
    return f"the run directory it was featurized from ({recorded}, as the store records it)"


def describe_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """What SOURCE needs to know of an optimiser: its kind and each parameter group's settings."""
    names = {id(p): n for n, p in model.named_parameters()}
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        kind = _adam_kind(optimizer)
    elif isinstance(optimizer, torch.optim.SGD):
        kind = "sgd"
    else:
        kind = type(optimizer).__name__
    keys = ("momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "amsgrad", "maximize")
    ratios = lr_ratios(optimizer)
    groups = []
    for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
        entry: dict[str, Any] = {"params": [names.get(id(p), "?") for p in group["params"]], "lr": float(group["lr"])}
        if any(r != 1.0 for r in ratios):  # written only where the groups' rates differ: other runs are unchanged
            entry["lr_ratio"] = ratio
        for key in keys:
            if key in group:
                value = group[key]
                entry[key] = [float(v) for v in value] if isinstance(value, tuple) else value
        if kind not in ("sgd", "adam", "adamw"):  # settings of another meaning (Adafactor's eps is a pair): left out,
            entry = {k: v for k, v in entry.items() if _group_problem({k: v}) is None}  # featurize refuses the kind
        groups.append(entry)
    return {"kind": kind, "groups": groups}


def lr_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each parameter group's base learning rate over the reference's, the largest base rate (so 1 for the reference
    and 0 ≤ r ≤ 1 for the others). The base rates are the scheduler's (``initial_lr``) where every group has one: a
    warm-up from 0 starts every group at rate 0. All 1 where every base rate is 0."""
    groups = optimizer.param_groups
    key = "initial_lr" if all("initial_lr" in g for g in groups) else "lr"
    base = [float(g[key]) for g in groups]
    top = max(base, default=0.0)
    return [b / top if top > 0 else 1.0 for b in base]


def group_ratios(described: Mapping[str, Any]) -> dict[str, float]:
    """r_g of every parameter an optimizer description (``describe_optimizer``) names: its group's ``lr_ratio`` (1 where
    the groups share one rate)."""
    return {n: float(g.get("lr_ratio", 1.0)) for g in described.get("groups", []) for n in g.get("params", [])}


def _adam_kind(optimizer: torch.optim.Optimizer) -> str:
    """``"adamw"`` where the groups that decay their weights decouple the decay, ``"adam"`` where they couple it:
    torch's Adam reads ``decoupled_weight_decay`` per parameter group (AdamW is Adam with it on by default). Groups
    that mix the two are named as an optimizer SOURCE cannot model."""
    default = bool(optimizer.defaults.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
    groups = optimizer.param_groups
    decoupled = {bool(g.get("decoupled_weight_decay", default)) for g in groups if g.get("weight_decay")}
    if len(decoupled) > 1:
        return "Adam with decoupled_weight_decay in some of its decaying parameter groups only"
    return "adamw" if (decoupled.pop() if decoupled else default) else "adam"


@dataclass(frozen=True)
class Checkpoint:
    """One saved checkpoint: parameters after ``step`` optimiser steps."""

    step: int
    file: str
    sha256: str
    optimizer_state: bool


@dataclass(frozen=True)
class Stage:
    """A training stage: its own dataset of ``dataset_size`` examples and optimiser."""

    name: str
    start_step: int
    end_step: int
    dataset_size: int
    optimizer: dict[str, Any]
    label_smoothing: float = 0.0
    """ε of the labels the stage trained on (0: not smoothed); the task's ``label_smoothing`` must equal it."""

    @property
    def lr_ratios(self) -> dict[str, float]:
        """r_g of every parameter its optimizer's groups name: its group's learning rate over the reference group's,
        the rate recorded per step (1 for every parameter of a run whose groups share one rate)."""
        return group_ratios(self.optimizer)

    def describe(self) -> dict[str, Any]:
        """The stage as a store's metadata records it (``label_smoothing`` only where the labels were smoothed, so
        that stores of other runs describe their stages as they always did)."""
        described = asdict(self)
        if not self.label_smoothing:
            del described["label_smoothing"]
        return described


class RecorderListener(Protocol):
    """Kept in step with a recorder (in-run gradient capture, ``featurize/capture.py``, listens)."""

    def before_checkpoint(self, step: int, sha256: str) -> None:
        """A new checkpoint is about to be saved after ``step`` optimiser steps; ``sha256``: its file's."""

    def after_stage_end(self, stage: str, step: int) -> None:
        """Stage ``stage`` has ended at ``step``; its final checkpoint is saved."""

    def after_close(self) -> None:
        """The trajectory has been marked complete."""

    def after_detach(self) -> None:
        """The recorder took its hooks off without finishing the run (``TrajectoryRecorder.detach``)."""


_RECORDING: weakref.WeakKeyDictionary[nn.Module, weakref.ref[TrajectoryRecorder]] = weakref.WeakKeyDictionary()
"""The recorder whose hooks are on a model, until it closes or detaches. A loop that raised leaves its recorder open
(nothing tells it), so the model's next recorder (a ``resume`` in the same process) detaches it first."""


class TrajectoryRecorder:
    """Records what SOURCE needs from an ordinary training loop.

    Usage:

    ```python
    rec = TrajectoryRecorder("runs/mlp", model, optimizer, save_every=50)
    rec.begin_stage("main", dataset_size=len(train_set))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)      # mean of the task's per-example loss
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        rec.step()                               # after optimizer.step(), before scheduler.step()
    rec.close()
    ```

    SOURCE takes each step as the recorded learning rate times the gradient of the batch *mean* of the task's
    per-example loss. A loss summed over the batch (``reduction="sum"``) steps B times as far and would be
    modelled B times too short: train on the mean. In-run capture refuses a summed loss at its first batch. For
    featurize after training, the recorder keeps, for the step taken at each checkpoint's weights, the squared norm
    of each parameter's gradient before clipping (over ``scale``², its loss scaler's scale taken out) and the
    examples its forwards saw (``gradient_norms`` in ``trajectory.json``; not with ``watch_clipping=False``):
    featurize compares them with the task's per-example gradients at that checkpoint and warns of a summed loss
    (``featurize/loss_scale.py``).

    The recorder counts its optimiser's steps: a ``step()`` after none (a loss scaler's skipped step, or a call
    after every batch of a gradient accumulation) is recorded at learning rate 0, and warned of unless a loss
    scaler is given. An optimiser other than the recorder's that trains the model is warned of too.

    A checkpoint is saved at the start of every stage, every ``save_every`` steps and at the end
    of every stage. ``begin_stage`` may be called again (with a new optimiser) for a
    multi-stage pipeline. ``resume`` continues a run that was interrupted, or one that
    finished and now trains further.

    The recorder hooks the model's parameters and the optimizer (and an in-run capture the model's layers). A loop
    that raises leaves them on: ``with TrajectoryRecorder(...) as rec:`` takes them off as the exception leaves the
    block (``detach``), and closes the run where the block ends without one; the model's next recorder (a ``resume``
    in the same process: a notebook's rerun) takes off those a recorder left, either way.

    Args:
        run_dir: directory to create; an existing non-empty one is refused unless ``overwrite``.
        model: the model being trained.
        optimizer: its optimiser (SGD, Adam or AdamW for attribution).
        save_every: save a checkpoint every this many optimiser steps.
        save_optimizer_state: save the optimiser state with each checkpoint (default: for Adam
            and AdamW, whose preconditioner SOURCE reads).
        overwrite: replace an existing trajectory in ``run_dir``.
        grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision run (anything with
            ``get_scale()``), so that its unscaling is not mistaken for clipping.
        watch_clipping: measure each step's clipping factor (see the module docstring); ``False``
            in a multi-process run, where the factor is passed to ``step`` instead.
        weights: what each checkpoint saves: ``"all"`` (the whole state dict) or ``"trainable"`` (the
            parameters that require grad when the recorder starts, and the buffers): for a model whose most
            weights are frozen, such as a LoRA fine-tune of a large model, whose checkpoints then hold the
            adapters only. The frozen weights are digested (sha256) once; featurize checks the model it is given
            holds them, and every checkpoint checks that none of them moved. ``"auto"`` (the default):
            ``"trainable"`` for a peft model (one with a ``peft_config``: LoRA and the other adapters), else
            ``"all"``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        save_every: int,
        save_optimizer_state: bool | None = None,
        overwrite: bool = False,
        grad_scaler: Any | None = None,
        watch_clipping: bool = True,
        weights: Literal["auto", "all", "trainable"] = "auto",
    ) -> None:
        run = Path(run_dir)
        blocked = next((p for p in (run, *run.parents) if p.exists() and not p.is_dir()), None)
        if blocked is not None:  # even with overwrite: a file is not a run to replace
            raise TrajectoryError(f"{blocked} is a file, so the run cannot be recorded in {run}; choose a directory.")
        if run.exists() and any(run.iterdir()) and not overwrite:
            raise TrajectoryError(
                f"{run} already holds files; choose a new directory or pass overwrite=True to replace it."
            )
        if overwrite and (run / "trajectory.json").exists():
            for old in (run / "checkpoints").glob("*.pt"):
                old.unlink()
            (run / "trajectory.json").unlink()
        self._start(run, model, optimizer, save_every, save_optimizer_state, grad_scaler, watch_clipping, weights)

    def _start(
        self,
        run_dir: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        save_every: int,
        save_optimizer_state: bool | None,
        grad_scaler: Any | None = None,
        watch_clipping: bool = True,
        weights: str = "auto",
    ) -> None:
        refusal = not_an_instance(
            model, nn.Module, "model", "torch.nn.Module", "pass the model being trained."
        ) or not_an_instance(optimizer, torch.optim.Optimizer, "optimizer", "torch.optim.Optimizer", "pass the "
                             "optimizer that steps the model.")
        if refusal is not None:
            raise TrajectoryError(refusal)
        if save_every < 1:
            raise TrajectoryError(f"save_every must be a positive number of steps, not {save_every}.")
        if weights not in ("auto", "all", "trainable"):
            raise TrajectoryError(f"weights must be 'auto', 'all' or 'trainable', not {weights!r}.")
        averaged = _averages_gradients(model)
        if watch_clipping and averaged:
            warnings.warn(
                "TrajectoryRecorder: the model is wrapped in DistributedDataParallel over several processes, and the "
                "recorder's measure of gradient clipping compares each process's own gradients, before they are "
                "averaged, with the averaged ones; record in one process with watch_clipping=False and pass "
                "step(clip=min(1, max_norm / total_norm)) (clip_grad_norm_ returns the total norm), or clip=1.",
                stacklevel=3,
            )
        model = unwrap_model(model)
        ref = _RECORDING.get(model)
        left = ref() if ref is not None else None
        if left is not None:  # a recorder a loop that raised left on the model (see above)
            left.detach()
        _RECORDING[model] = weakref.ref(self)
        self._detached = False
        if weights == "auto":  # a peft model's base is frozen by construction: its checkpoints are its adapters
            weights = "trainable" if hasattr(model, "peft_config") else "all"
        self.run_dir = run_dir
        self.run_id = uuid.uuid4().hex
        """What names this run wherever its directory lies (``trajectory.json``'s ``run``; kept by ``resume``)."""
        self.model = model
        self.optimizer = optimizer
        self.save_every = save_every
        self._save_optimizer_state = save_optimizer_state
        self.global_step = 0
        self._lr: list[float] = []
        self._clip: list[float | torch.Tensor] = []
        self._momentum: list[float | None] = []  # each SGD step's momentum β, where all groups share one
        self._momentum_moved = False  # some SGD step's momentum differs from its stage's (a schedule moves it)
        self._stages: list[dict[str, Any]] = []
        self._checkpoints: list[dict[str, Any]] = []
        self._complete = False
        self._clipping = _ClipWatch(model, optimizer, grad_scaler) if watch_clipping else None
        if self._clipping is not None and averaged:  # warned of above: each process's factors part from the others'
            self._clipping.warned = True
        # The squared gradient norms per parameter of the step at each checkpoint's weights (``gradient_norms``);
        # not kept where each process sees its own gradients, before they are averaged.
        self._gradient_norms: list[dict[str, Any]] = []
        self._keep_norms = self._clipping is not None and not averaged
        self._scaler = grad_scaler
        self._taken = 0  # optimizer steps since the last step() call
        self._used: list[float] = []  # the learning rates of the last of them, per parameter group
        self._used_momentum: list[float] = []  # and their momenta
        self._taken_handle: Any = None
        self._gradless = 0  # of those steps, the ones no parameter had a gradient for (they moved nothing)
        self._gradless_handle: Any = None
        self._count_steps(optimizer)
        self._warned_untaken = False
        self._warned_momentum = False
        self._trained: tuple[bool, ...] | None = None  # which parameters required grad as the open stage began
        self._warned_trained = False
        self._zeroed = 0  # steps since the last checkpoint recorded at learning rate 0 for want of an optimizer step
        self._listeners: list[RecorderListener] = []
        # (step, sample, the parameters' sample) of the last checkpoint's weights
        self._weights: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._warned_shrink = False  # a measured clipping factor below 1e-3 was warned of
        # weights="trainable": the state-dict entries not saved (frozen parameters), their digest and a sample
        self._frozen: frozenset[str] = frozenset()
        self._frozen_info: dict[str, Any] | None = None
        self._frozen_sample: torch.Tensor | None = None
        state = model.state_dict()
        frozen = frozen_names(model)
        if weights == "trainable" and frozen:
            self._frozen = frozenset(frozen)
            self._frozen_info = {"sha256": frozen_digest(state, frozen), "tensors": len(frozen),
                                 "numel": int(sum(state[n].numel() for n in frozen))}  # fmt: skip
            self._frozen_sample = _weights_sample({n: state[n] for n in frozen})
        elif weights == "all":
            _warn_frozen_bulk(state, frozen)

    @classmethod
    def resume(
        cls,
        run_dir: str | os.PathLike[str],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        save_every: int,
        save_optimizer_state: bool | None = None,
        grad_scaler: Any | None = None,
        watch_clipping: bool = True,
        restore: bool = True,
        at_step: int | None = None,
    ) -> TrajectoryRecorder:
        """Continue the run in ``run_dir`` from its last checkpoint (or the one saved at ``at_step``).

        An interrupted run forgets the steps recorded after its last checkpoint; a finished run is
        reopened to train further (more steps of its last stage, or a new stage with
        ``begin_stage``). The last checkpoint's weights are loaded into ``model``, and its optimiser
        state into ``optimizer`` when it was saved (record an SGD run with momentum with
        ``save_optimizer_state=True`` if it may need resuming exactly; the resumed recorder keeps
        saving the state when the run did). The training loop continues from ``global_step``:
        it must visit the batches it would have visited from that step on. ``restore=False``: neither is loaded, for
        a trainer that restored both from its own checkpoint at that step (its optimizer's learning rate is the one
        its scheduler set after the step, the recorder's the one the step used).

        ``at_step``: rewind the run to its checkpoint at that step and continue from there, as from a run killed
        just after saving it: the steps recorded after it are forgotten and the later checkpoints' files deleted
        (the index is rewritten first, so a kill in between leaves a consistent run). A store captured from the
        run and resumed with this recorder drops its windows after that step alike (``GradientCapture``).
        """
        run = Path(run_dir)
        index_file = run / "trajectory.json"
        try:
            index = json.loads(index_file.read_text())
            checkpoints, stages, lr = index["checkpoints"], index["stages"], index["lr"]
            last = checkpoints[-1]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
            raise TrajectoryError(
                f"{run} holds no readable trajectory with a checkpoint to resume from ({type(err).__name__}); "
                "start the run afresh with TrajectoryRecorder."
            ) from err
        dropped: list[dict[str, Any]] = []
        if at_step is not None:
            kept = [c for c in checkpoints if int(c["step"]) <= at_step]
            if not kept or int(kept[-1]["step"]) != at_step:
                steps = ", ".join(str(c["step"]) for c in checkpoints)
                raise TrajectoryError(
                    f"The run recorded in {run} has no checkpoint at step {at_step} to rewind to (its checkpoints: "
                    f"steps {steps}); resume from one of those steps."
                )
            checkpoints, dropped, last = kept, checkpoints[len(kept) :], kept[-1]
        if save_optimizer_state is None and last.get("optimizer_state"):
            save_optimizer_state = True  # as the run did
        recorded_frozen = index.get("frozen")
        recorder = cls.__new__(cls)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the run's own choice of weights is kept, not advised on again
            recorder._start(run, model, optimizer, save_every, save_optimizer_state, grad_scaler, watch_clipping,
                            "trainable" if recorded_frozen else "all")  # fmt: skip
        if recorded_frozen and recorder._frozen_info != recorded_frozen:
            raise TrajectoryError(
                f"The run in {run} was recorded with weights='trainable', and the model's frozen weights (those that "
                "do not require grad) are not those it was recorded with; build the model from the same base weights, "
                "with the same parameters frozen."
            )
        if restore:
            state = load_checkpoint(run, Checkpoint(**last))
            load_weights(recorder.model, state["model"], partial=bool(recorded_frozen))  # inside a wrapper, as saved
            if "optimizer" in state:
                try:
                    optimizer.load_state_dict(state["optimizer"])
                except ValueError as err:  # torch's check of the groups, before it changes anything
                    recorder.detach()
                    raise TrajectoryError(
                        f"The optimizer's parameter groups are not those whose state {last['file']} of the run in "
                        f"{run} holds ({err}); resume with the optimizer the run was trained with, and begin a new "
                        "stage (begin_stage(optimizer=...)) to train other groups or groups at other rates."
                    ) from err
        if isinstance(index.get("run"), str):  # a run recorded before it was named gets its name now
            recorder.run_id = index["run"]
        step = int(last["step"])
        recorder.global_step = step
        recorder._lr = [float(v) for v in lr[:step]]
        recorder._clip = [float(v) for v in (index.get("clip") or [1.0] * len(lr))[:step]]
        momentum = index.get("momentum")
        recorder._momentum = list(momentum[:step]) if momentum is not None else [None] * step
        recorder._momentum_moved = momentum is not None
        recorder._stages = [dict(s) for s in stages if s["start_step"] <= step]
        recorder._stages[-1]["end_step"] = None
        recorder._checkpoints = list(checkpoints)
        recorder._gradient_norms = [e for e in index.get("gradient_norms") or [] if e["step"] < step]
        if recorder._keep_norms and recorder._clipping is not None:
            recorder._clipping.arm(recorder.model)  # the next step is taken at the checkpoint's weights
        recorder._write_index()
        for checkpoint in dropped:  # after the index, which no longer names them
            if checkpoint["file"] not in {c["file"] for c in checkpoints}:
                (run / checkpoint["file"]).unlink(missing_ok=True)
        return recorder

    @property
    def stage(self) -> tuple[str, int]:
        """``(name, dataset size)`` of the open stage."""
        if not self._stages or self._stages[-1]["end_step"] is not None:
            raise TrajectoryError("Call begin_stage(name, dataset_size) before recording steps.")
        return self._stages[-1]["name"], self._stages[-1]["dataset_size"]

    @property
    def stages(self) -> list[tuple[str, int, int | None]]:
        """``(name, first step, end step)`` of every stage so far (``None`` for the open one)."""
        return [(s["name"], s["start_step"], s["end_step"]) for s in self._stages]

    @property
    def saves_trainable_only(self) -> bool:
        """Whether checkpoints hold the trained weights only (``weights="trainable"``, with something frozen)."""
        return self._frozen_info is not None

    @property
    def stage_label_smoothing(self) -> list[tuple[str, float]]:
        """``(name, ε)`` of every stage so far: the label smoothing it trained with (0: none)."""
        return [(s["name"], float(s.get("label_smoothing", 0.0))) for s in self._stages]

    @property
    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoints saved so far."""
        return [c["step"] for c in self._checkpoints]

    @property
    def checkpoint_digests(self) -> dict[int, str]:
        """The sha256 of every checkpoint saved so far, by step."""
        return {c["step"]: c["sha256"] for c in self._checkpoints}

    def stage_optimizers(self) -> dict[str, dict[str, Any]]:
        """Each stage's optimizer as ``describe_optimizer`` described it as the stage began (its ``"kind"``:
        ``"sgd"``, ``"adamw"``…, and its parameter groups with their ``lr_ratio``)."""
        return {s["name"]: s["optimizer"] for s in self._stages}

    def saved_checkpoint(self, step: int) -> Checkpoint:
        """The checkpoint saved at ``step`` (its file and sha256, for ``load_checkpoint``)."""
        found = [c for c in self._checkpoints if c["step"] == step]
        if not found:
            raise TrajectoryError(f"The run at {self.run_dir} saved no checkpoint at step {step}.")
        return Checkpoint(**found[-1])

    def listen(self, listener: RecorderListener) -> None:
        """Tell ``listener`` before every new checkpoint, after each stage ends, and after ``close``."""
        self._listeners.append(listener)

    def begin_stage(
        self,
        name: str,
        dataset_size: int,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        label_smoothing: float = 0.0,
    ) -> None:
        """Start a stage trained on ``dataset_size`` examples; ends the previous one. A refused call (a name already
        recorded, no examples) changes nothing: the running stage goes on.

        ``label_smoothing``: ε of a stage whose loss smooths its labels (``F.cross_entropy(...,
        label_smoothing=ε)``); featurize then refuses a task that does not smooth them by the same ε."""
        self._check_attached()
        running = bool(self._stages) and self._stages[-1]["end_step"] is None
        if any(s["name"] == name for s in self._stages):
            again = running and self._stages[-1]["name"] == name
            hint = " (it is the stage being recorded: a resumed run goes on with it without begin_stage)"
            hint = hint if again else ""
            raise TrajectoryError(f"A stage named {name!r} was already recorded{hint}; give each stage its own name.")
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, numbers.Integral) or dataset_size < 1:
            raise TrajectoryError(
                f"Stage {name!r} needs a positive dataset size, a whole number of examples, not {dataset_size!r}."
            )
        if isinstance(label_smoothing, bool) or not (isinstance(label_smoothing, (int, float))
                                                    and 0.0 <= label_smoothing <= 1.0):
            raise TrajectoryError(
                f"Stage {name!r} needs a label_smoothing from 0 to 1 (the ε its loss used), not {label_smoothing!r}."
            )
        _check_effective_rates(optimizer or self.optimizer, name)
        if running:
            self.end_stage()
        if optimizer is not None:
            self.optimizer = optimizer
            self._count_steps(optimizer)
            if self._clipping is not None:
                self._clipping.watch(optimizer)
        self._stages.append(
            {
                "name": name,
                "start_step": self.global_step,
                "end_step": None,
                "dataset_size": int(dataset_size),
                "optimizer": describe_optimizer(self.optimizer, self.model),
                # Written only where the labels were smoothed: other runs' files and fingerprints are unchanged.
                **({"label_smoothing": float(label_smoothing)} if label_smoothing else {}),
            }
        )
        self._check_trained_parameters(f"as stage {name!r} begins")
        kind = self._stages[-1]["optimizer"]["kind"]
        if kind not in ("sgd", "adam", "adamw"):  # told now, not after training, when featurize refuses the run
            warnings.warn(
                f"Stage {name!r} trains with {kind!r}, whose update SOURCE cannot model: featurize will refuse this "
                f"run; train with {MODELLED_OPTIMIZERS} to attribute it.",
                stacklevel=2,
            )
        else:
            self._warn_unmodelled(self._stages[-1])
        if kind in ("adam", "adamw") and self._save_optimizer_state is False:
            warnings.warn(
                f"Stage {name!r} trains with {kind} but the recorder was made with save_optimizer_state=False: SOURCE "
                "reads Adam's preconditioner from each checkpoint's optimizer state, so featurize will refuse this "
                "run; leave save_optimizer_state at its default.",
                stacklevel=2,
            )
        self._save()

    def _warn_unmodelled(self, stage: dict[str, Any]) -> None:
        """Warn, as a stage begins, of a setting of a modelled optimizer that featurize refuses (``maximize=True``,
        Adam groups that couple and decouple their decay): told now, not after the training run."""
        described = Stage(stage["name"], stage["start_step"], stage["start_step"], stage["dataset_size"],
                          stage["optimizer"])  # fmt: skip
        try:
            optimizer_rule(described, {n: p.numel() for n, p in self.model.named_parameters()})
        except TrajectoryError as err:
            warnings.warn(f"{err} Featurize will refuse this run.", stacklevel=3)

    def step(self, clip: float | None = None, *, scale: float = 1.0) -> None:
        """Record one optimiser step (call right after ``optimizer.step()``). The learning rate recorded is the one
        that step used, read as it began, so a scheduler stepped before this call does not shift it.

        ``clip``: the factor α = min(1, max_norm/‖g‖) gradient clipping scaled this step's gradient by
        (``clip_grad_norm_`` returns ‖g‖); by default the factor the recorder measured (1 if nothing
        rescaled the gradients).

        ``scale``: what the step's gradient was, before clipping, against the mean of the task's loss over the
        examples it accumulated: m/n for an epoch's last accumulation of m batches whose loss was divided by n, as
        Lightning divides it (``accumulate_grad_batches``); 1 otherwise. SOURCE's step size is η·α·scale.
        """
        self._check_attached()
        if not self._stages or self._stages[-1]["end_step"] is not None:
            raise TrajectoryError("Call begin_stage(name, dataset_size) before recording steps.")
        groups = self.optimizer.param_groups
        used = self._used if self._taken else [float(g["lr"]) for g in groups]
        momenta = self._used_momentum if self._taken else [float(g.get("momentum", 0.0)) for g in groups]
        lr = self._reference_rate(used)
        if not math.isfinite(lr) or lr < 0:
            raise TrajectoryError(
                f"Step {self.global_step} used learning rate {lr}; it must be finite and non-negative."
            )
        measured = self._clipping.take(self._taken > 0) if self._clipping is not None else None
        sampled = self._clipping.take_sampled() if self._clipping is not None else None
        if clip is not None and not (math.isfinite(clip) and 0 <= clip <= 1):
            raise TrajectoryError(f"Step {self.global_step}'s clipping factor {clip} must lie in [0, 1].")
        if not (math.isfinite(scale) and 0 < scale <= 1):
            raise TrajectoryError(f"Step {self.global_step}'s gradient scale {scale} must lie in (0, 1].")
        if sampled is not None and (self._taken_handle is None or self._taken == 1) and self._keep_norms:
            self._keep_gradient_norms(*sampled, scale)
        taken, self._taken = self._taken, 0
        gradless, self._gradless = self._gradless, 0
        if self._taken_handle is not None and taken != 1:
            lr = self._untaken(taken, lr)
        elif gradless:  # no parameter had a gradient (Lightning's training_step returned None): nothing moved
            lr = 0.0
        self._lr.append(lr)
        self._clip.append((clip if clip is not None else 1.0 if measured is None else measured) * scale)
        self._momentum.append(self._step_momentum(momenta))
        self._check_trained_parameters(f"at step {self.global_step}")
        self.global_step += 1
        if self.global_step % self.save_every == 0:
            self._save()

    def _keep_gradient_norms(self, examples: int, squared: dict[str, torch.Tensor], scale: float) -> None:
        """Keep the squared norm of each parameter's gradient of this step, taken at the last checkpoint's weights
        before clipping, as the gradient of the mean loss (over ``scale``): featurize compares them with the task's
        per-example gradients there (``featurize/loss_scale.py``). Left out where one is not finite (an fp16 loss
        scaler's skipped step)."""
        values = {name: float(value) / scale**2 for name, value in squared.items()}
        if all(math.isfinite(v) for v in values.values()):
            self._gradient_norms.append({"step": self.global_step, "examples": examples, "squared": values})

    def _reference_rate(self, used: list[float]) -> float:
        """The rate to record for a step whose groups used ``used``: the reference group's, refused where another
        group's rate left the ratio to it that the stage began with (``lr_ratio``)."""
        groups = self._stages[-1]["optimizer"]["groups"]
        ratios = [float(g.get("lr_ratio", 1.0)) for g in groups]
        if len(ratios) != len(used):
            if any(r != 1.0 for r in ratios):
                raise TrajectoryError(
                    f"Step {self.global_step}: the optimiser has {len(used)} parameter groups, not the {len(ratios)} "
                    "whose ratios of learning rates its stage began with; begin a new stage (begin_stage) after "
                    "adding a parameter group."
                )
            ratios = [1.0] * len(used)  # a group added to a stage of one rate: it must share that rate
        lr = used[ratios.index(1.0)]
        off = [(i, rate) for i, (rate, r) in enumerate(zip(used, ratios, strict=True))
               if abs(rate - r * lr) > 1e-6 * max(abs(rate), abs(lr))]  # fmt: skip
        if off:
            i, rate = off[0]
            raise TrajectoryError(
                f"Step {self.global_step}: parameter group {i} used learning rate {rate:g}, not {ratios[i]:g} times "
                f"the reference group's {lr:g} (the ratio of their base rates as stage "
                f"{self._stages[-1]['name']!r} began); SOURCE follows groups whose rates keep one ratio, so scale "
                "every group's rate by the same schedule (LambdaLR, get_linear_schedule_with_warmup)."
            )
        return lr

    def _count_steps(self, optimizer: torch.optim.Optimizer) -> None:
        """Count ``optimizer``'s steps, so that ``step`` can tell a call without one. A step pre-hook: it runs before
        any post-hook, such as the integrations' that call ``step``, whatever the order they were registered in. A
        step post-hook, registered before theirs, counts the steps taken without any gradient, which move nothing
        (torch's optimizers skip a parameter whose gradient is None, its momentum and weight decay too)."""
        for handle in (self._taken_handle, self._gradless_handle):
            if handle is not None:
                handle.remove()
        self._taken, self._taken_handle, self._gradless, self._gradless_handle = 0, None, 0, None
        if callable(getattr(optimizer, "register_step_pre_hook", None)):
            self._taken_handle = optimizer.register_step_pre_hook(lambda opt, *_: self._counted(opt))
            self._gradless_handle = optimizer.register_step_post_hook(lambda opt, *_: self._count_gradless(opt))

    def _count_gradless(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer built on another model's parameters has none either: left to ``_check_trained``'s warning."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ours = {id(p) for p in self.model.parameters()}
        self._gradless += any(id(p) in ours for p in params) and all(p.grad is None for p in params)

    def _counted(self, optimizer: torch.optim.Optimizer) -> None:
        self._taken += 1
        self._used = [float(g["lr"]) for g in optimizer.param_groups]  # the rates this step uses
        self._used_momentum = [float(g.get("momentum", 0.0)) for g in optimizer.param_groups]

    def _step_momentum(self, momenta: list[float]) -> float | None:
        """The momentum β an SGD step used, where every group used the same and the stage began with one too (a
        schedule such as ``OneCycleLR`` cycles it: SOURCE's step size η/(1−β) follows it); else ``None``."""
        stage = self._stages[-1]
        if stage["optimizer"]["kind"] != "sgd":
            return None
        began = {float(g.get("momentum", 0.0)) for g in stage["optimizer"]["groups"]}
        if len(set(momenta)) == 1 and len(began) == 1:
            if momenta[0] != next(iter(began)):
                self._momentum_moved = True
            return momenta[0]
        if set(momenta) != began and not self._warned_momentum:
            self._warned_momentum = True
            warnings.warn(
                f"TrajectoryRecorder.step() at step {self.global_step}: the parameter groups' momenta "
                f"{sorted(set(momenta))} differ from those stage {stage['name']!r} began with ({sorted(began)}), and "
                "SOURCE follows a moving momentum only where all groups share one, so it takes the stage's first; "
                "give every group the same momentum.",
                stacklevel=3,
            )
        return None

    def _check_trained_parameters(self, when: str) -> None:
        """Warn, once, where the parameters that require grad are not those the run trained before (a parameter frozen
        or unfrozen within the run): SOURCE takes every attributed parameter as trained at every step."""
        params = list(self.model.named_parameters())
        trained = tuple(p.requires_grad for _, p in params)
        before, self._trained = self._trained, trained
        if before is None or before == trained or self._warned_trained:
            return
        self._warned_trained = True
        moved = [name for (name, _), was, now in zip(params, before, trained, strict=False) if was != now]
        warnings.warn(
            f"TrajectoryRecorder: {len(moved)} parameters ({', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''}) "
            f"were frozen or unfrozen {when}; SOURCE takes every attributed parameter as trained at every step of the "
            "run, so leave these out of the attribution (sp.ParameterSelection(exclude=[...]) in the task).",
            stacklevel=3,
        )

    def _untaken(self, taken: int, lr: float) -> float:
        """The learning rate to record for a ``step`` call after ``taken`` ≠ 1 optimizer steps, warning once of a
        loop that calls it out of step with the optimizer. No step: the weights did not move, so the step is
        recorded at learning rate 0, which is also right for a loss scaler's skipped step (an inf or nan gradient),
        and for a loop that calls ``step`` after every batch of a gradient accumulation. More than one step: the
        steps between were not recorded, and SOURCE cannot know them."""
        if not self._warned_untaken and (taken > 1 or self._scaler is None):
            self._warned_untaken = True
            if taken == 0:
                what = (
                    "the optimizer it records took no step since the last call, so SOURCE counts it at learning rate "
                    "0; call step() once after each optimizer.step() (with gradient accumulation, only after the "
                    "batches the optimizer steps on), and give the recorder the optimizer that trains (a new one "
                    "through begin_stage)"
                )
            else:
                what = (
                    f"the optimizer it records took {taken} steps since the last call, so SOURCE misses {taken - 1} "
                    "of them; call step() after every optimizer.step()"
                )
            warnings.warn(f"TrajectoryRecorder.step() at step {self.global_step}: {what}.", stacklevel=3)
        self._zeroed += taken == 0
        return 0.0 if taken == 0 else lr

    def end_stage(self) -> None:
        """End the current stage, saving its final checkpoint."""
        self._check_attached()
        if not self._stages or self._stages[-1]["end_step"] is not None:
            raise TrajectoryError("There is no open stage to end; call begin_stage first.")
        self._stages[-1]["end_step"] = self.global_step
        self._save()
        for listener in self._listeners:
            listener.after_stage_end(self._stages[-1]["name"], self.global_step)

    def close(self) -> None:
        """End the last stage and mark the trajectory complete."""
        self._check_attached()
        if self._stages and self._stages[-1]["end_step"] is None:
            self.end_stage()
        if not self._stages:
            raise TrajectoryError("Nothing was recorded; call begin_stage and step before close.")
        self._complete = True
        self._unhook()
        self._write_index()
        for listener in self._listeners:
            listener.after_close()

    def detach(self) -> None:
        """Take the recorder's hooks off the model and optimizer, and an in-run capture's off the model's layers,
        without finishing the run: for a training loop that stopped by an exception. The run (and a captured store)
        stays as its last checkpoint left it, to resume with ``resume`` (in this process too, on the same model).
        A detached recorder records nothing more; detaching it again, or a closed one, does nothing."""
        if self._detached or self._complete:
            return
        self._detached = True
        self._unhook()
        for listener in self._listeners:
            listener.after_detach()

    def _unhook(self) -> None:
        """Remove the hooks on the parameters (clipping's) and on the optimizer (the step counts)."""
        if self._clipping is not None:
            self._clipping.remove()
        for handle in (self._taken_handle, self._gradless_handle):
            if handle is not None:
                handle.remove()
        self._taken_handle = self._gradless_handle = None
        ref = _RECORDING.get(self.model)
        if ref is not None and ref() is self:
            del _RECORDING[self.model]

    def _check_attached(self) -> None:
        if self._detached:
            raise TrajectoryError(
                f"This recorder of {self.run_dir} was detached (its training loop raised, or another recorder started "
                "on its model) and records nothing more; resume the run with TrajectoryRecorder.resume."
            )

    def __enter__(self) -> TrajectoryRecorder:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        """Close the run where the block ends normally; where an exception leaves it, ``detach``."""
        if exc_type is None:
            self.close()
        else:
            self.detach()

    def _save(self) -> None:
        if self._clipping is not None and self._clipping.uneven_since():
            warnings.warn(
                f"TrajectoryRecorder: by step {self.global_step} something rescaled parts of the gradient by different "
                "factors between backward and the optimizer step (clip_grad_norm_ on some of the parameters, "
                "clip_grad_value_, or a change of the gradients of your own); SOURCE models one factor per step for "
                "the whole gradient, and records the whole gradient's (its norm after over its norm before), so the "
                "steps of the parts rescaled otherwise are modelled at that factor; clip the whole model's gradient "
                "with clip_grad_norm_ to record its steps exactly.",
                stacklevel=3,
            )
        if self._keep_norms and self._clipping is not None:
            self._clipping.arm(self.model)  # the next step is taken at this checkpoint's weights
        if self._checkpoints and self._checkpoints[-1]["step"] == self.global_step:
            self._write_index()
            return
        save_opt = self._save_optimizer_state
        if save_opt is None:
            save_opt = self._stages[-1]["optimizer"]["kind"] in ("adam", "adamw")
        state = self.model.state_dict()
        if self._frozen:
            sample = _weights_sample({n: state[n] for n in sorted(self._frozen)})
            assert self._frozen_sample is not None
            if not torch.equal(sample.cpu(), self._frozen_sample.cpu()):
                raise TrajectoryError(
                    "A parameter that did not require grad when the recorder started (weights='trainable' does not "
                    "save it) has changed; freeze what stays frozen before creating the recorder, or record with "
                    "weights='all'."
                )
        payload: dict[str, Any] = {"model": {k: v.detach().cpu().clone() for k, v in state.items()
                                             if k not in self._frozen}}  # fmt: skip
        self._check_trained(payload["model"])
        if save_opt:
            payload["optimizer"] = self.optimizer.state_dict()
        rel = f"checkpoints/step-{self.global_step:08d}.pt"
        path = self.run_dir / rel
        with tempfile.SpooledTemporaryFile() as buffer:
            torch.save(payload, buffer)
            buffer.seek(0)
            data = buffer.read()
        digest = hashlib.sha256(data).hexdigest()
        for listener in self._listeners:  # before the file: a checkpoint on disk has its window written
            listener.before_checkpoint(self.global_step, digest)
        atomic_write_bytes(path, data)
        self._checkpoints.append(
            {
                "step": self.global_step,
                "file": rel,
                "sha256": digest,
                "optimizer_state": save_opt,
            }
        )
        self._write_index()

    def _check_trained(self, state: dict[str, torch.Tensor]) -> None:
        """Warn where the weights did not move since the last checkpoint though a learning rate was positive: an
        optimizer built on another model's parameters trains nothing here, and the run would be attributed as if
        it had trained (a few values of every floating-point tensor are compared: cheap at any size)."""
        sample = _weights_sample(state)
        params = {name for name, _ in self.model.named_parameters()}
        moved = _weights_sample({k: v for k, v in state.items() if k in params})
        before, self._weights = self._weights, (self.global_step, sample, moved)
        zeroed, self._zeroed = self._zeroed, 0
        if before is None or sample.numel() == 0:
            return
        step, previous, previous_moved = before
        rates = self._lr[step : self.global_step]
        if rates and zeroed == len(rates) and not self._warned_untaken and not torch.equal(previous_moved, moved):
            # Every step since the last checkpoint was recorded at learning rate 0, as the optimizer the recorder
            # was given took none, yet the parameters moved: another optimizer trains (with a loss scaler given, a
            # step not taken is no warning by itself: the scaler skips steps).
            self._warned_untaken = True
            warnings.warn(
                f"The model's parameters changed from step {step} to step {self.global_step} though the optimizer "
                "the recorder was given took none of those steps, so SOURCE counts them at learning rate 0: give "
                "the recorder the optimizer that trains (a new one through begin_stage).",
                stacklevel=4,
            )
        if rates and max(rates) > 0 and torch.equal(previous, sample):
            warnings.warn(
                f"The model's weights did not change from step {step} to step {self.global_step} though the learning "
                f"rate was up to {max(rates):g}: if the optimizer was built on another model's parameters, build it "
                "on this model's (torch.optim.SGD(model.parameters(), ...)); else every gradient was zero and this "
                "part of the run did not train.",
                stacklevel=4,
            )

    def _write_index(self) -> None:
        index = {
            "format": FORMAT,
            "version": VERSION,
            "complete": self._complete,
            "run": self.run_id,
            "lr": self._lr,
            "clip": self._clip_factors(),
            **({"momentum": self._momentum} if self._momentum_moved else {}),
            **({"gradient_norms": self._gradient_norms} if self._gradient_norms else {}),
            "stages": self._stages,
            "checkpoints": self._checkpoints,
            **({"frozen": self._frozen_info} if self._frozen_info is not None else {}),
        }
        atomic_write_bytes(self.run_dir / "trajectory.json", json.dumps(index, indent=1).encode())

    def _clip_factors(self) -> list[float]:
        """The factors recorded so far as numbers (measured ones are tensors until written: no device sync per step)."""
        factors = [float(c) for c in self._clip]
        measured = [isinstance(c, torch.Tensor) for c in self._clip]
        for step, factor in enumerate(factors):
            if not (math.isfinite(factor) and factor <= 1 + 1e-4):
                raise TrajectoryError(
                    f"Between backward and optimizer step {step} the gradients grew by {factor:.3g}× (or became "
                    "non-finite): a loss scaler whose scale the recorder does not know? Pass grad_scaler=… to the "
                    "recorder, or the clipping factor to step(clip=…)."
                )
            if 0 < factor < 1e-3 and abs(math.log2(factor) - round(math.log2(factor))) < 1e-6:
                raise TrajectoryError(
                    f"Between backward and optimizer step {step} the gradients shrank by exactly 2^"
                    f"{round(math.log2(factor))}: a loss scaler unscaling them? Pass grad_scaler=… to the recorder, "
                    "or the clipping factor to step(clip=…)."
                )
            if measured[step] and 0 < factor < 1e-3 and not self._warned_shrink:
                # Clipping after an unknown scaler's unscaling hides its 2^n. A warning, not a refusal: a real spike
                # can be clipped that hard too, and a refusal here would stop the training run.
                self._warned_shrink = True
                warnings.warn(
                    f"Between backward and optimizer step {step} the gradients shrank by {factor:.3g}×, far more than "
                    "clipping usually shrinks them: a loss scaler unscaling them? Pass grad_scaler=… to the recorder "
                    "(else SOURCE takes steps that small), or, if clipping did scale them by that much, nothing.",
                    stacklevel=5,
                )
        self._clip = list(factors)
        return [min(factor, 1.0) for factor in factors]


class _ClipWatch:
    """Measures the factor by which something (gradient clipping) rescaled the gradients between
    backward and the optimiser step: ‖g as the step leaves it‖ / ‖g as backward accumulated it‖ (× the loss scale).

    Measured after the step (a step post-hook), not before it: an ``optimizer.step(closure)`` (Lightning's automatic
    optimization) runs backward and clipping inside the step, after its pre-hooks."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_scaler: Any | None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}  # no reference to the model:
        # the parameters' hooks hold this watch where the garbage collector does not look, and a run that raised
        # must leave its model (and a capture listening) to be collected
        self.scaler = grad_scaler
        # Armed as a checkpoint is saved: the next step's gradient, taken at the checkpoint's weights, is kept per
        # parameter (``sampled``), with the examples its forwards saw (``examples``), for featurize's loss-scale check.
        self.armed = False
        self.examples = 0
        self.sampled: tuple[int, dict[str, torch.Tensor]] | None = None
        self.count_handles: list[Any] = []
        self.depth = 0
        self.accumulated: dict[int, torch.Tensor] = {}
        self.factor: torch.Tensor | None = None
        # Whether a step rescaled parameters by different factors (clipping part of the model, clip_grad_value_):
        # kept on the gradients' device and read as checkpoints are saved, so that no step waits on it.
        self.uneven: torch.Tensor | None = None
        self.warned = False
        self.handles = [p.register_post_accumulate_grad_hook(self._accumulated) for p in self.params]
        self.step_handle: Any = None
        self.watch(optimizer)

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        if self.step_handle is not None:
            self.step_handle.remove()
        self.step_handle = optimizer.register_step_post_hook(lambda *_: self._measure())

    def _accumulated(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self.accumulated[id(param)] = _squared_norm(param.grad)

    def arm(self, model: nn.Module) -> None:
        """Keep the next step's gradient per parameter (``sampled``) and count the examples of the forwards it takes:
        the outermost calls of the model's modules made with gradients on, outside a backward (the first dimension of
        the first tensor they are given), so that a loop calling a submodule (a LightningModule's network) is counted
        too, and an evaluation under ``no_grad`` is not."""
        self.disarm()
        self.armed, self.examples, self.depth = True, 0, 0
        for module in model.modules():
            self.count_handles.append(module.register_forward_pre_hook(self._entered, with_kwargs=True))
            self.count_handles.append(module.register_forward_hook(self._left, always_call=True))

    def disarm(self) -> None:
        for handle in self.count_handles:
            handle.remove()
        self.count_handles, self.armed = [], False

    def _entered(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Not inside a backward: gradient checkpointing's recomputation forwards the same examples again.
        if self.depth == 0 and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.examples += int(leaves[0].shape[0]) if leaves and leaves[0].dim() else 0
        self.depth += 1

    def _left(self, *_: Any) -> None:
        self.depth = max(self.depth - 1, 0)

    def take_sampled(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The examples and the per-parameter squared gradient norms of the step after the last checkpoint (once;
        ``None`` where no step was measured since it was armed); disarms."""
        sampled, self.sampled = self.sampled, None
        self.disarm()
        return sampled

    def _measure(self) -> None:
        """The factor of the gradients backward accumulated since the last measure (none: the factor stays)."""
        pairs = [(self.accumulated.pop(id(p)), _squared_norm(p.grad), p) for p in self.params
                 if p.grad is not None and id(p) in self.accumulated]
        if not pairs:
            return
        each_before = torch.stack([b.to(pairs[0][0].device) for b, _, _ in pairs])
        each_after = torch.stack([a.to(pairs[0][0].device) for _, a, _ in pairs])
        before, after = each_before.sum(), each_after.sum()
        self._compare(each_before, each_after)
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        if self.armed:  # the gradient backward left, the loss scaler's scale taken out
            self.sampled = (self.examples, {self.names[id(p)]: b / scale**2 for b, _, p in pairs})
            self.disarm()
        self.factor = torch.where(before > 0, (after / before).sqrt() * scale, torch.ones_like(before))
        if self.scaler is not None:  # a fused optimizer is stepped on an inf gradient and skips the update itself
            finite = torch.isfinite(before) & torch.isfinite(after)
            self.factor = torch.where(finite, self.factor, torch.zeros_like(self.factor))

    def _compare(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Note whether the parameters' gradients were rescaled by different factors (their squared norms' ratios
        part by more than rounding), among those with a finite, non-zero gradient before the step."""
        live = (before > 0) & torch.isfinite(before) & torch.isfinite(after)
        ratio = after / torch.where(live, before, torch.ones_like(before))
        high = torch.where(live, ratio, torch.full_like(ratio, -math.inf)).max()
        low = torch.where(live, ratio, torch.full_like(ratio, math.inf)).min()
        uneven = (live.sum() > 1) & (high - low > 1e-3 * high.abs())
        self.uneven = uneven if self.uneven is None else self.uneven | uneven

    def uneven_since(self) -> bool:
        """Whether some step since the last call rescaled parts of the gradient by different factors (once: False
        after it has been told)."""
        uneven, self.uneven = self.uneven, None
        if self.warned or uneven is None or not bool(uneven):
            return False
        self.warned = True
        return True

    def take(self, stepped: bool) -> torch.Tensor | None:
        """The factor of the step just taken (``None`` if no gradient reached the optimiser). ``stepped``: the
        optimiser stepped since the last call, so a measure its post-hook has not made yet (a post-hook registered
        before the recorder's that records the step) is made now, while the step's gradients are still there."""
        if stepped:
            self._measure()
        factor, self.factor = self.factor, None
        return factor

    def remove(self) -> None:
        self.disarm()
        for handle in [*self.handles, self.step_handle]:
            handle.remove()


def _check_effective_rates(optimizer: torch.optim.Optimizer, stage: str) -> None:
    """Refuse, as a stage begins, SGD groups whose momentum or dampening differ (featurize would refuse the run):
    refused now, not at featurize, which would waste the training run. (Groups at different learning rates keep the
    ratio of their base rates: ``lr_ratios``.)"""
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SGD):  # momentum and dampening scale the rate: η(1 − dampening)/(1 − momentum)
        trained = [g for g in groups if any(p.requires_grad for p in g["params"])]
        momenta = [float(g.get("momentum", 0.0)) for g in trained]
        factors = {
            (1.0 - (float(g.get("dampening", 0.0)) if m else 0.0)) / (1.0 - m)
            for g, m in zip(trained, momenta, strict=True) if 0.0 <= m < 1.0
        }
        if len(factors) > 1:
            raise TrajectoryError(
                f"Stage {stage!r}: the optimiser's parameter groups use different momentum or dampening, so their "
                f"effective learning rates differ ({min(factors):g}η to {max(factors):g}η); SOURCE needs one rate per "
                "step, so give every group the same momentum and dampening."
            )


def _averages_gradients(model: nn.Module) -> bool:
    """Whether ``model`` is a DistributedDataParallel (perhaps compiled) whose process group has several processes."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return False
    return torch.distributed.is_initialized() and torch.distributed.get_world_size(model.process_group) > 1


def frozen_names(model: nn.Module) -> list[str]:
    """The state-dict entries of ``model``'s parameters that do not require grad (buffers are not among them)."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return sorted(k for k in model.state_dict() if k in frozen)


def frozen_digest(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> str:
    """sha256 of the named tensors of a state dict: each one's name, shape and values, in the given order.

    Floating-point values are taken in float32, so a model loaded in another precision that holds the same values
    (bf16 or fp16 weights upcast to float32) has the same digest; other values are taken as they are."""
    digest = hashlib.sha256()
    for name in names:
        tensor = state[name].detach()
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        kind = "float" if tensor.is_floating_point() else str(tensor.dtype)
        digest.update(f"{name}|{tuple(tensor.shape)}|{kind};".encode())
        digest.update(tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()


_FROZEN_BULK = 2**30  # bytes of frozen weights above which saving them at every checkpoint is advised against


def _warn_frozen_bulk(state: Mapping[str, torch.Tensor], frozen: Sequence[str]) -> None:
    """Advise weights='trainable' where most of a large model is frozen (a LoRA fine-tune): every checkpoint
    would save GBs that never change."""
    frozen_bytes = sum(state[n].numel() * state[n].element_size() for n in frozen)
    total = sum(t.numel() * t.element_size() for t in state.values())
    if frozen_bytes > _FROZEN_BULK and frozen_bytes > total / 2:
        warnings.warn(
            f"{frozen_bytes / total:.0%} of the model's weights ({frozen_bytes / 2**30:.1f} GiB) do not require grad, "
            "and every checkpoint saves them; pass weights='trainable' to save the trained ones only (featurize "
            "then checks that the model it is given holds the frozen ones).",
            stacklevel=4,
        )


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, partial: bool) -> None:
    """``model.load_state_dict(state)``; ``partial``: ``state`` holds the trained entries only (weights="trainable"),
    the others stay as they are (the caller checks them). Raises torch's RuntimeError where they do not fit."""
    if not partial:
        model.load_state_dict(state)
        return
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise RuntimeError(f"Unexpected key(s) in state_dict: {', '.join(repr(k) for k in unexpected[:3])}.")
    model.load_state_dict(state, strict=False)


def _weights_sample(state: dict[str, torch.Tensor], per_tensor: int = 64) -> torch.Tensor:
    """At most ``per_tensor`` evenly spaced values of every floating-point tensor of a (CPU) state dict, as float64."""
    parts = []
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            flat = value.reshape(-1)
            parts.append(flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].double())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _squared_norm(grad: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(grad.detach(), dtype=torch.float32) ** 2
def load_checkpoint(
    run_dir: Path, checkpoint: Checkpoint, *, verify: bool = True, mmap: bool = False
) -> dict[str, Any]:
    """The saved payload (``{"model": state_dict, "optimizer"?: state_dict}``) of a checkpoint of the run in
    ``run_dir``, checked against its sha256 unless ``verify`` is false. ``mmap``: the tensors map the file
    (copy-on-write), so only what the caller reads is read; for readers that copy what they use (featurize reads
    the weights of an AdamW checkpoint, a third of it, at every load but one)."""
    file = run_dir / checkpoint.file
    if not file.is_file():
        raise TrajectoryError(f"Checkpoint {file} is missing; restore it or re-run training.")
    try:
        if verify and _checkpoint_sha256(file) != checkpoint.sha256:
            raise TrajectoryError(
                f"Checkpoint {file} does not match the sha256 recorded in trajectory.json (changed or "
                "corrupted after training); restore the original file."
            )
    except OSError as err:
        raise _unreadable(file, err) from err
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:  # not a zip archive (an old format, or not torch's): read, and reported, whole
            if not mmap or "mmap can only be used" not in str(err):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports a truncated archive as OSError (EINVAL) or RuntimeError
        if isinstance(err, OSError) and err.errno != errno.EINVAL:
            raise _unreadable(file, err) from err
        raise TrajectoryError(
            f"Checkpoint {file} cannot be read by torch.load ({type(err).__name__}: {first_line(err)}), so it is "
            "truncated or not a torch checkpoint; restore it from training."
        ) from err
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise TrajectoryError(
            f"Checkpoint {file} holds no {{'model': state_dict}}; save checkpoints with TrajectoryRecorder."
        )
    return state


class Trajectory:
    """A recorded training run, read back from its directory (format: docs/reference/store-format.md)."""

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = path
        self.complete: bool = bool(index.get("complete", False))
        self.rates = np.asarray(index["lr"], dtype=np.float64)
        self.clip = np.asarray(index.get("clip") or [1.0] * len(self.rates), dtype=np.float64)
        self.stages = tuple(Stage(**s) for s in index["stages"])
        scale = _momentum_scale(index, self.stages)
        self._momentum_moved = bool(np.any(scale != 1.0))
        self.lr = self.rates * self.clip * scale
        """SOURCE's step sizes η_k·α_k: each step's learning rate times its clipping factor (and, where an SGD
        stage's momentum moved, times (1−β)/(1−β_k), β the momentum the stage began with: its optimizer's factor
        (1−d)/(1−β) applies to every step, so the product is the step's own (1−d)/(1−β_k))."""
        self.checkpoints = tuple(Checkpoint(**c) for c in index["checkpoints"])
        self.gradient_norms: tuple[dict[str, Any], ...] = tuple(index.get("gradient_norms") or ())
        """For the step taken at each checkpoint's weights (``step``), where the recorder kept it: the examples its
        forwards saw (``examples``, 0: not seen) and the squared norm of each parameter's gradient of the mean loss,
        before clipping (``squared``); featurize's loss-scale check reads them (``featurize/loss_scale.py``)."""
        self.frozen: dict[str, Any] | None = index.get("frozen")
        """Recorded with weights="trainable": the digest of the frozen weights the checkpoints do not hold."""
        self._index = index
        self._frozen_checked: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Trajectory:
        """Read and validate ``path/trajectory.json``."""
        path = Path(path)
        index_file = path / "trajectory.json"
        if not path.is_dir():
            raise TrajectoryError(f"{path} is not a directory; pass the run directory written by TrajectoryRecorder.")
        if not index_file.is_file() and (path / "zarr.json").is_file():
            raise TrajectoryError(f"{path} is a source-proj store, not a training run; pass {_store_run(path)}.")
        if not index_file.is_file():
            raise TrajectoryError(
                f"{path} has no trajectory.json; record the run with TrajectoryRecorder or write the file "
                "as docs/reference/store-format.md describes."
            )
        try:
            index = json.loads(index_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise TrajectoryError(
                f"{index_file} is not readable JSON ({err}); restore it from the training run."
            ) from err
        _validate_index(index, index_file)
        return cls(path, index)

    @property
    def final_checkpoint(self) -> Checkpoint:
        """θ_T: the checkpoint saved last."""
        return self.checkpoints[-1]

    @property
    def num_steps(self) -> int:
        return len(self.lr)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise TrajectoryError(f"The trajectory has no stage {name!r}; its stages are {[s.name for s in self.stages]}.")

    def select(self, steps: Sequence[int]) -> Trajectory:
        """The same run with only the checkpoints at ``steps`` (and the final one, θ_T, always).

        Everything else is shared, the fingerprint included: a store featurized from the selection
        belongs to this run. Refuses a step at which no checkpoint was saved.
        """
        saved = [c.step for c in self.checkpoints]
        missing = sorted(set(steps) - set(saved))
        if missing:
            raise TrajectoryError(
                f"The run saved no checkpoint at step(s) {missing}; choose among the saved steps {saved}."
            )
        keep = {*steps, self.final_checkpoint.step}
        selected = copy.copy(self)
        selected.checkpoints = tuple(c for c in self.checkpoints if c.step in keep)
        return selected
    def truncated(self, steps: int) -> Trajectory:
        """The run as it stood after ``steps`` optimiser steps: its learning rates, the stages (and parts of
        stages) trained by then and the checkpoints saved by then (a finished run that later trained
        further had exactly this trajectory, fingerprint included)."""
        stages = [
            {**s, "end_step": min(s["end_step"], steps)}
            for s in self._index["stages"]
            if s["start_step"] < steps
        ]
        checkpoints = [c for c in self._index["checkpoints"] if c["step"] <= steps]
        index = {**self._index, "complete": True, "lr": self._index["lr"][:steps], "stages": stages,
                 "checkpoints": checkpoints}
        for key in ("clip", "momentum"):
            if index.get(key) is not None:
                index[key] = index[key][:steps]
        if index.get("gradient_norms") is not None:
            index["gradient_norms"] = [e for e in index["gradient_norms"] if e["step"] < steps]
        return Trajectory(self.path, index)

    def fingerprint(self) -> str:
        """sha256 of the run's learning rates (and clipping factors and moving momenta), stages and checkpoint
        contents."""
        # The momenta count where they moved within these steps: a run cut before its momentum first moved (as a
        # grown store's earlier run was) has the fingerprint it had before.
        moved = ("momentum",) if self._momentum_moved else ()
        keys = ["lr", *(k for k in ("clip",) if self._index.get(k)), *moved, "stages", "checkpoints",
                *(k for k in ("frozen",) if self.frozen is not None)]
        canonical = json.dumps({k: self._index[k] for k in keys}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def load_state(self, checkpoint: Checkpoint, *, verify: bool = True) -> dict[str, Any]:
        """The saved payload (``{"model": state_dict, "optimizer"?: state_dict}``) of a checkpoint, its tensors mapping
        the file (read as used; copy before changing them in place)."""
        return load_checkpoint(self.path, checkpoint, verify=verify, mmap=True)

    def load_into(self, model: nn.Module, checkpoint: Checkpoint) -> nn.Module:
        """Load a checkpoint's weights into ``model`` (in place); refuses a mismatched architecture, and, for a run
        recorded with weights="trainable", a model whose frozen weights are not the run's."""
        return self.load_weights(model, self.load_state(checkpoint)["model"], checkpoint.file)

    def load_weights(self, model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> nn.Module:
        """Load ``state`` (a checkpoint's weights, or a mean of several; ``where`` names it) into ``model``, as
        ``load_into`` does."""
        try:
            if self.frozen is not None and set(state) <= set(model.state_dict()):  # else: it does not fit, below
                self._check_frozen(model, state)
            load_weights(model, state, partial=self.frozen is not None)
        except RuntimeError as err:
            first = " ".join(" ".join(str(err).strip().splitlines()[:2]).split())  # torch's first lines, untabbed
            wrapper = next((p for p in WRAPPER_PREFIXES if state and all(k.startswith(p) for k in state)), None)
            if wrapper is not None and not all(k.startswith(wrapper) for k in model.state_dict()):
                raise TrajectoryError(
                    f"Checkpoint {where} holds the weights of a wrapped model (every name begins with "
                    f"{wrapper!r}: {WRAPPER_PREFIXES[wrapper]}), so it does not fit the model; record the run again "
                    "with this version of TrajectoryRecorder, which saves the model inside the wrapper."
                ) from err
            raise TrajectoryError(
                f"Checkpoint {where} does not fit the model ({first}); "
                "build the model exactly as in training."
            ) from err
        return model

    def _check_frozen(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """The model's weights the checkpoints do not hold must be the frozen ones the run was recorded with (once
        per model and digest: a model's frozen weights are digested once, a few seconds per 10 GB)."""
        assert self.frozen is not None
        expected = self.frozen["sha256"]
        if self._frozen_checked.get(model) == expected:
            return
        own = model.state_dict()
        rest = sorted(set(own) - set(state))
        if len(rest) != self.frozen["tensors"] or frozen_digest(own, rest) != expected:
            raise TrajectoryError(
                f"The run in {self.path} was recorded with weights='trainable': its checkpoints hold the trained "
                f"weights only, and the model's other {len(rest)} tensors are not the {self.frozen['tensors']} frozen "
                "ones it was trained with; build the model from the same base weights (and adapters' "
                "configuration) as in training."
            )
        self._frozen_checked[model] = expected

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __repr__(self) -> str:
        return (
            f"Trajectory({str(self.path)!r}, steps={self.num_steps}, stages={[s.name for s in self.stages]}, "
            f"checkpoints={len(self.checkpoints)}, complete={self.complete})"
        )


def _unreadable(file: Path, err: OSError) -> TrajectoryError:
    return TrajectoryError(
        f"Checkpoint {file} cannot be read ({err.strerror or err}); check its permissions and the disk."
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number that fits a float64."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _momentum_scale(index: Mapping[str, Any], stages: Sequence[Stage]) -> np.ndarray:
    """(1−β)/(1−β_k) per step where an SGD stage that began with momentum β (all groups) stepped at β_k; else 1."""
    scale = np.ones(len(index["lr"]))
    momentum = index.get("momentum")
    if momentum is None:
        return scale
    for stage in stages:
        began = {float(g.get("momentum", 0.0)) for g in stage.optimizer.get("groups", [])}
        if stage.optimizer.get("kind") != "sgd" or len(began) != 1:
            continue
        beta = began.pop()
        for k in range(stage.start_step, len(momentum) if stage.end_step is None else stage.end_step):
            if momentum[k] is not None:
                scale[k] = (1.0 - beta) / (1.0 - float(momentum[k]))
    return scale


_GROUP_NUMBERS = ("lr", "momentum", "dampening", "weight_decay", "eps")
_GROUP_FLAGS = ("nesterov", "amsgrad")


def _group_problem(group: Any) -> str | None:
    """What is wrong with an optimiser parameter group's description, if anything."""
    if not isinstance(group, dict):
        return "is not an object"
    params = group.get("params", [])
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        return "has 'params' that are not a list of parameter names"
    for key in _GROUP_NUMBERS:
        if key in group and not _is_number(group[key]):
            return f"has a non-numeric {key!r}"
    for key in _GROUP_FLAGS:
        if key in group and not isinstance(group[key], bool):
            return f"has a non-boolean {key!r}"
    betas = group.get("betas", [0.0, 0.0])
    if not isinstance(betas, list) or len(betas) != 2 or not all(_is_number(b) for b in betas):
        return "has 'betas' that are not two numbers"
    return None


def incomplete_run(run: Path) -> TrajectoryError:
    """The refusal of a run whose recorder has not closed: it is still training, or was interrupted."""
    return TrajectoryError(
        f"The trajectory at {run} is incomplete (training was interrupted or close() was not called); finish "
        "training (TrajectoryRecorder.resume continues an interrupted run) and call TrajectoryRecorder.close()."
    )


def _validate_index(index: Any, where: Path) -> None:
    def bad(reason: str) -> TrajectoryError:
        return TrajectoryError(f"{where} is malformed: {reason}; re-record the run or fix the file.")

    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise bad(f"it is not a {FORMAT} file")
    if not _is_int(index.get("version")) or index.get("version") != VERSION:
        raise bad(f"version {index.get('version')!r} is not {VERSION}, the version this library reads")
    if not isinstance(index.get("complete", False), bool):
        raise bad("'complete' must be true or false")
    stages = index.get("stages")
    if index.get("complete") is False and (
        not index.get("lr") or (isinstance(stages, list) and stages and isinstance(stages[-1], dict)
                                and "end_step" in stages[-1] and stages[-1]["end_step"] is None)
    ):  # the recorder's own index of a run still training, or interrupted: no step yet, or a stage still open
        raise incomplete_run(where.parent)
    lr = index.get("lr")
    if not isinstance(lr, list) or not lr:
        raise TrajectoryError(
            f"{where} records no learning rates; SOURCE needs the rate of every step, so record "
            "the run with TrajectoryRecorder.step() after each optimizer.step()."
        )
    if not all(_is_number(v) and v >= 0 for v in lr):
        raise bad("'lr' must hold finite, non-negative numbers")
    clip = index.get("clip")
    if clip is not None and (
        not isinstance(clip, list) or len(clip) != len(lr) or not all(_is_number(v) and 0 <= v <= 1 for v in clip)
    ):
        raise bad("'clip' must hold one clipping factor in [0, 1] per learning rate")
    momentum = index.get("momentum")
    if momentum is not None and (
        not isinstance(momentum, list)
        or len(momentum) != len(lr)
        or not all(v is None or (_is_number(v) and 0 <= v < 1) for v in momentum)
    ):
        raise bad("'momentum' must hold one momentum in [0, 1) or null per learning rate")
    norms = index.get("gradient_norms")
    if norms is not None and not (
        isinstance(norms, list) and all(
            isinstance(e, dict) and set(e) == {"step", "examples", "squared"} and _is_int(e["step"])
            and 0 <= e["step"] < len(lr) and _is_int(e["examples"]) and e["examples"] >= 0
            and isinstance(e["squared"], dict) and all(isinstance(k, str) and _is_number(v) and v >= 0
                                                       for k, v in e["squared"].items())
            for e in norms)
    ):  # fmt: skip
        raise bad("'gradient_norms' must list the step, the examples and the squared norm of each parameter's gradient")
    frozen = index.get("frozen")
    if frozen is not None and not (
        isinstance(frozen, dict) and set(frozen) == {"sha256", "tensors", "numel"} and isinstance(frozen["sha256"], str)
        and _is_int(frozen["tensors"]) and frozen["tensors"] >= 1 and _is_int(frozen["numel"]) and frozen["numel"] >= 0
    ):  # fmt: skip
        raise bad("'frozen' must hold the sha256, tensors and numel of the weights the checkpoints leave out")
    if not isinstance(stages, list) or not stages:
        raise bad("'stages' must be a non-empty list")
    expected_start = 0
    names = set()
    for s in stages:
        keys = {"name", "start_step", "end_step", "dataset_size", "optimizer"}
        if not isinstance(s, dict) or not keys <= set(s) <= keys | {"label_smoothing"}:
            raise bad("each stage needs exactly name, start_step, end_step, dataset_size and optimizer "
                      "(and may give label_smoothing)")
        smoothing = s.get("label_smoothing", 0.0)
        if not (_is_number(smoothing) and 0 <= smoothing <= 1):
            raise bad(f"stage {s.get('name')!r} has a label_smoothing outside [0, 1]")
        if not isinstance(s["name"], str) or s["name"] in names:
            raise bad("stage names must be distinct strings")
        names.add(s["name"])
        for key in ("start_step", "end_step", "dataset_size"):
            if not _is_int(s[key]):
                raise bad(f"stage {s['name']!r} has a non-integer {key}")
        if s["start_step"] != expected_start or s["end_step"] < s["start_step"]:
            raise bad(f"stage {s['name']!r} does not start where the previous one ended")
        if s["dataset_size"] < 1:
            raise bad(f"stage {s['name']!r} has no examples")
        opt = s["optimizer"]
        if not isinstance(opt, dict) or not isinstance(opt.get("kind"), str) or not isinstance(opt.get("groups"), list):
            raise bad(f"stage {s['name']!r} has no optimizer description")
        for group in opt["groups"]:
            problem = _group_problem(group)
            if problem is not None:
                raise bad(f"an optimizer parameter group of stage {s['name']!r} {problem}")
        ratios = [g.get("lr_ratio") for g in opt["groups"]]
        if any(r is not None for r in ratios) and not (
            all(_is_number(r) and 0 <= r <= 1 for r in ratios) and max(ratios) == 1
        ):
            raise bad(f"stage {s['name']!r} must give every optimizer parameter group an lr_ratio in [0, 1], and the "
                      "reference group 1, or none")
        expected_start = s["end_step"]
    if expected_start != len(lr):
        raise bad(f"the stages cover {expected_start} steps but {len(lr)} learning rates are recorded")
    checkpoints = index.get("checkpoints")
    if not isinstance(checkpoints, list) or not checkpoints:
        raise bad("it lists no checkpoints")
    last = -1
    for c in checkpoints:
        if not isinstance(c, dict) or set(c) != {"step", "file", "sha256", "optimizer_state"}:
            raise bad("each checkpoint needs exactly step, file, sha256 and optimizer_state")
        if not _is_int(c["step"]) or not last < c["step"] <= len(lr):
            raise bad("checkpoint steps must increase and lie within the recorded steps")
        if not isinstance(c["file"], str) or not isinstance(c["sha256"], str) or ".." in Path(c["file"]).parts:
            raise bad("checkpoint file and sha256 must be strings inside the run directory")
        if Path(c["file"]).is_absolute() or "\0" in c["file"] or not isinstance(c["optimizer_state"], bool):
            raise bad("checkpoint files must be relative paths and optimizer_state true or false")
        last = c["step"]
