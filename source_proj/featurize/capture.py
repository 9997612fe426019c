"""In-run capture: the projected gradient of every training example at every visit, taken from the
training step's own backward, summed per window into a store as training goes (layout: ``windows.py``).

Usage (a plain loop; the Hugging Face Trainer and Lightning callbacks in ``integrations`` do the same)::

    rec = sp.TrajectoryRecorder("runs/mlp", model, optimizer, save_every=50)
    cap = sp.GradientCapture(rec, "runs/mlp.sp", task, projection=sp.ProjectionArguments(dim=1024, kind="factored"))
    rec.begin_stage("main", dataset_size=len(train))
    for batch in DataLoader(sp.IndexedDataset(train), batch_size=64, shuffle=True):
        with cap.batch(batch) as (x, y):            # the batch without its row indices
            loss = F.cross_entropy(model(x), y)     # the batch mean of the task's per-example loss
            optimizer.zero_grad(); loss.backward()
        optimizer.step(); rec.step()
    rec.close()                                     # the store is complete: sp.fit(store) as usual

**Gradients.** The projection's forward hooks (``FactoredProjector.tapped``; eigen or factored) record
P_in a_t at every Linear/Conv layer and tap the output gradient δ_t of the training backward, so each
example's P ∇ℓ(z; θ_t) is summed from small outer products, never materialised.

**The eigen projection** (the default when ``datasets=`` are given): as each window starts, one sampled-label
Fisher pass over at most ``basis_examples`` examples of the stage (as few as give every layer
``basis_layer_positions`` positions) at the current weights (``BasisPass``; Adam stages: the factors of
D^{-1/2}-scaled gradients) joins the run's factor sums, and the window is projected with the basis of their
average so far; at close the sums plus a pass at the final weights give the store's basis (post-hoc
featurize's, for the same checkpoints and examples, where no pass was shortened), into which fit maps every
window (``windows.py``). After the run's first window a pass visits at most ``basis_share`` of the examples
the window before it trained on (at least ``MIN_BASIS_PASS``), so short windows do not pay more for their
basis than for their training. A resumed run re-takes the closed windows' passes at their checkpoints, each as
long as it was (recorded with the window's basis). With the loss the batch mean, δ_t is (1/B)·∇ of the
example's own loss: it is multiplied by B. The model is in training mode: this is
the gradient training used (dropout masks, batch-norm batch statistics), where post-hoc featurize takes
eval-mode gradients at the saved checkpoints.

**Curvature.** ``fisher="sampled"`` (default): labels drawn from the model (the true Fisher, as
featurize), their gradients projected on every ``fisher_every``-th batch. With ``fisher_forward="training"``
(default) they come from the training step's own forward: as the model's forward returns, one extra
backward of the sampled labels' loss runs through its graph (kept for the training backward that
follows), so the Fisher costs a backward and no forward, in the mode the model trains in (dropout
included). ``fisher_forward="separate"`` runs its own forward in eval mode, as featurize does (for models
whose dropout or batch statistics should not enter the curvature). Either touches neither the
parameters' gradients, nor batch-norm statistics, nor the global random state, so training is exactly
what it would be without capture. ``fisher="empirical"``: the captured gradients themselves (no extra
pass; biased). Only the k × k sum of ũũᵀ per window is kept (B·k² multiply-adds per Fisher batch).

**Adam and AdamW.** Gradients and Fisher vectors are taken in Adam's coordinates, P (D_t^{-1/2} ⊙ ∇ℓ),
with D_t read from the optimizer's state as each batch begins and applied through the layer hooks as
its rank-``adam_rank`` form (``projection/transform.py``); each window also keeps D at its closing
checkpoint, from which fit takes each segment's D_ℓ (``windows.py``). A stage's first step is not
captured: before it the optimizer holds no state, so its preconditioner is unknown (``skipped``).

**Parameter groups at a constant ratio of learning rates** (``lr_ratio``, r per group, as the recorder records
them; ``preconditioner.py``) are captured in u = R^{-1/2}θ, as featurize takes them: an Adam stage's D is
(√v̂ + ε)/r, and an SGD stage whose groups' rates differ gets D = 1/r, built once per stage (every step captured)
and kept per window as Adam's. A per-group constant is constant over a parameter, so on a layer its grid of
multipliers is rank one even where the weight and the bias lie in groups of different rates (the bias is a column):
the rank-``adam_rank`` form applies an SGD stage's scaling exactly; under Adam it approximates the grid of D/r as
featurize's does.

**Crash safety.** A window is written (chunks, then progress entries) just before the checkpoint that
closes it is saved. A killed run resumed with ``TrajectoryRecorder.resume`` and the same store
drops what was written after the last checkpoint and recomputes it; a finished run resumed to train
further grows its store (fitted methods are dropped: re-fit).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from source_proj import __version__
from source_proj.compiled import eager, hold_compiler_settings, release_compiler_settings
from source_proj.errors import NumericalError, StoreError, TaskError, check_choice, check_real, check_whole
from source_proj.featurize.arguments import ProjectionArguments, basis_arguments, projection_differences, typed_text
from source_proj.featurize.basis import BasisPass, NoBasis, modes_kept, rank_one_sides
from source_proj.featurize.grow import record_growth
from source_proj.featurize.windows import (
    ADAM_KINDS,
    DENOMINATOR,
    END,
    PREFIX,
    WINDOW_ARRAYS,
    window_array,
    window_basis_array,
)
from source_proj.projection.eigen import BASIS_PREFIX, EigenBasis
from source_proj.projection.factored import FactoredProjector
from source_proj.projection.transform import GradientTransform
from source_proj.store.provenance import (
    REFERENCE_ROWS,
    data_fingerprint,
    describe_provenance,
    load_reference_batch,
    model_errors,
    model_fingerprint,
    save_reference_batch,
)
from source_proj.store.store import Store, is_store
from source_proj.store.writer import ChunkWriter
from source_proj.store.writing import store_lock, writing
from source_proj.tasks.data import RandomStateKept, collate_of, training_examples
from source_proj.tasks.draws import DRAWS_ID, FisherDraws
from source_proj.tasks.gradients import PerExampleGradients, batch_rows, batch_size, move_batch
from source_proj.tasks.task import Batch, Task, check_task_smoothing
from source_proj.tasks.text import right_padded
from source_proj.trajectory.optimizers import check_optimised, optimizer_rule
from source_proj.trajectory.preconditioner import live_preconditioner, ratio_denominator
from source_proj.trajectory.recorder import (
    Stage,
    Trajectory,
    TrajectoryRecorder,
    describe_optimizer,
    group_ratios,
    load_checkpoint,
    load_weights,
)

_FOLD_EVERY = 64
MIN_BASIS_PASS = 64
"""The fewest examples a window's basis pass visits under ``CaptureArguments.basis_share`` (or all the stage's)."""
SCALE_ROWS = 8
"""The first batch's examples whose captured gradients are checked against the task's (``_check_scale``)."""
MIN_SCALE_BATCH = 4
"""Batches smaller than this are not checked: a summed loss differs from the mean by too little to tell from noise."""
AUTO_BASIS_BATCH = 64
"""``basis_batch="auto"`` where the run never captured a training batch."""
INDEX_KEY = "source_proj_index"
"""The key ``IndexedDataset`` adds to dict items (a batch's dataset row indices)."""

CAPTURE_RESUMES = " (the captured run resumes from its last checkpoint, its store with it)"
"""What the sentence naming an example of ``datasets=`` the dataset cannot read ends with."""


@dataclass(frozen=True)
class CaptureArguments:
    """How gradients are captured during training.

    Attributes:
        fisher: ``"sampled"`` (labels drawn from the model: the true Fisher, one extra backward per Fisher
            batch) or ``"empirical"`` (the captured gradients: no extra pass).
        fisher_forward: where the sampled Fisher's outputs come from: ``"training"`` (the training step's
            own forward, in training mode; one extra backward through its graph) or ``"separate"`` (an
            extra eval-mode forward and backward, as featurize; for models with dropout or batch norm whose
            curvature should be taken without them). Where the training forward is not seen (the model's
            forward is never called on the batch), the separate pass is taken instead.
        fisher_every: the Fisher on every n-th batch of a window only: its cost divided by n, at a cost in
            accuracy (n = 2 lost 0.036 LDS on digits `converged`, 0.002 on the text example; BENCHMARKS.md).
        seed: seed of the Fisher's label sampling.
        reduction: ``"mean"``: the training loss is the batch mean of the task's per-example loss, the step
            SOURCE models (the recorded rate times the mean's gradient). ``"sum"`` is refused: a loss summed over
            the batch steps B times as far as the recorded rate, which SOURCE would model B times too short.
        chunk_rows: examples per store chunk.
        scale_every: Adam and AdamW stages: Adam's D^{-1/2} is read from the optimizer, and its rank-R
            form built, on every n-th batch of a window (and at each window's start); between, the last
            one is used. Adam's second moment moves slowly (β₂ = 0.999: a time constant of 1,000 steps);
            on the text example n = 16 (the default) scores as n = 1 at a fraction of the cost
            (BENCHMARKS.md, issue 16).
        buffer: where a window's sums wait to be written: ``"device"`` (the model's; fastest) or
            ``"cpu"`` (host memory, for N·k·4 bytes that do not fit on the device).
        basis_batch: examples per batch of capture's own passes: the eigen projection's basis passes and the end
            pass. ``"auto"`` (the default): as many as the run's first captured training batch held, so that these
            passes (a forward and a backward without the parameters' gradients) hold no more activations than a
            training step does (a language model's logits alone are sequences × tokens × vocabulary numbers). The
            store records it, so a resumed run's passes take the same batches (and give the same bits);
            ``AUTO_BASIS_BATCH`` (64) where no batch was ever captured.
        basis_share: the eigen projection: each window's basis pass (but the run's first and the final one, which
            take ``basis_examples``) visits at most this share of the examples the window before it trained on,
            and at least ``MIN_BASIS_PASS`` (64): the passes then cost at most that share of training's
            forwards and backwards, however short the windows. ``None``: ``basis_examples`` at every window, which
            with windows shorter than ``basis_examples`` costs more than training itself.
        end_pass: as each stage ends, one more pass over its examples (``datasets=``) at its final weights, counted
            as one more visit of each: in-run visits fall at a different step for each example, and where the
            gradients move between them that costs accuracy (BENCHMARKS.md: MNIST's 3-epoch early-training run 0.036
            LDS below post-hoc SOURCE without it, 0.013 with it; a one-epoch run on all 60,000 images 0.081 below
            without it, 0.012 above with it). Costs one forward and backward per example per stage. ``"auto"`` (the
            default): every stage whose examples ``datasets=`` holds as a map-style dataset (with ``len()``); none
            without them. ``True``: every stage (``datasets=`` required, with ``len()``); ``False``: none.
        precision: ``"fp32"`` (default) or ``"bf16"``: capture's own passes (the end pass, the eigen basis passes,
            the separate Fisher pass) run forward and backward under bfloat16 autocast, and the layer hooks project
            in bf16 (their sums in fp32), as featurize's ``precision="bf16"``. For a run trained under bf16
            autocast: in fp32 those passes cost several training steps' time each on a GPU. The visits themselves
            are taken from the training step in whatever precision it runs.
    """

    fisher: Literal["sampled", "empirical"] = "sampled"
    fisher_forward: Literal["training", "separate"] = "training"
    fisher_every: int = 1
    seed: int = 0
    reduction: Literal["mean", "sum"] = "mean"
    chunk_rows: int = 1024
    scale_every: int = 16
    buffer: Literal["device", "cpu"] = "device"
    basis_batch: int | Literal["auto"] = "auto"
    basis_share: float | None = 0.25
    end_pass: bool | Literal["auto"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        name = "CaptureArguments"
        for field, allowed in (("fisher", ("sampled", "empirical")), ("fisher_forward", ("training", "separate")),
                               ("buffer", ("device", "cpu")), ("end_pass", (True, False, "auto")),
                               ("precision", ("fp32", "bf16"))):  # fmt: skip
            check_choice(f"{name}.{field}", getattr(self, field), allowed)
        if self.reduction == "sum":
            raise TaskError(
                "A training loss summed over the batch (reduction='sum') steps the weights B times as far as the "
                "learning rate the recorder records, and SOURCE takes each step as that rate times the batch mean's "
                "gradient, so it would model every step B times too short; train on the batch mean (plain SGD takes "
                "the same steps with the learning rate times B and the weight decay over B) and capture with the "
                "default reduction='mean'."
            )
        check_choice(f"{name}.reduction", self.reduction, ("mean",))
        for field in ("fisher_every", "chunk_rows", "scale_every"):
            check_whole(f"{name}.{field}", getattr(self, field))
        check_whole(f"{name}.seed", self.seed, 0)
        if self.basis_batch != "auto":
            check_whole(f"{name}.basis_batch", self.basis_batch, also=" or 'auto'")
        if self.basis_share is not None:
            check_real(f"{name}.basis_share", self.basis_share, closed=False)

    def identity(self) -> dict[str, Any]:
        """What the captured numbers depend on (``buffer`` and ``basis_batch`` do not)."""
        return {k: v for k, v in asdict(self).items() if k not in ("buffer", "basis_batch")}


class IndexedDataset(Dataset):
    """A dataset whose items carry their row index, so each batch says which examples it holds.

    Dict items get the key ``"source_proj_index"``; any other item ``x`` becomes ``(index, x)``.
    ``GradientCapture.batch`` takes the indices out again before the model sees the batch.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            return {**item, INDEX_KEY: index}
        return index, item


def split_indices(batch: Any, indices: Tensor | Sequence[int] | None = None) -> tuple[Tensor, Batch]:
    """``(row indices [B] int64, the batch without them)`` of a batch of ``IndexedDataset`` (or
    of any batch whose ``indices`` are given)."""
    if indices is not None:
        return _row_indices(indices), batch
    if isinstance(batch, Mapping) and INDEX_KEY in batch:
        rest = {k: v for k, v in batch.items() if k != INDEX_KEY}
        return _row_indices(batch[INDEX_KEY]), rest
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[0], Tensor)
        and batch[0].dim() == 1
        and not batch[0].is_floating_point()
    ):
        return batch[0].long().cpu(), batch[1]
    raise TaskError(
        "Capture needs each batch's dataset row indices; wrap the training set in sp.IndexedDataset, or pass "
        "indices= to GradientCapture.batch."
    )


def _row_indices(values: Any) -> Tensor:
    """A batch's row indices as int64 ``[B]``: whole numbers only (a float would be truncated to another row)."""
    try:
        rows = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        rows = None
    if rows is not None and rows.numel() == 0:  # [] is a float tensor: no rows, refused as such (``begin``)
        return torch.zeros(0, dtype=torch.long)
    if rows is None or rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
        raise TaskError(
            "The batch's row indices must be whole numbers (each example's row in its stage's dataset), not "
            f"{type(values).__name__ if rows is None else str(rows.dtype).removeprefix('torch.')}; pass integers, as "
            "sp.IndexedDataset gives them."
        )
    return rows.long().reshape(-1).cpu()


class GradientCapture:
    """Captures projected per-example gradients and Fisher sums during training into a store.

    Args:
        recorder: the run's recorder (fresh, or ``resume``-d); its model is captured.
        store_path: the store to write (a directory or a URL).
        task: the task (loss, parameters attributed); batches handed to ``batch`` are its batches.
        projection: dimension and seed; the kind is ``"eigen"`` (the default with ``datasets``) or ``"factored"``
            (the layer hooks either way), and the attributed parameters must all belong to layers the hooks
            factor (Linear, Conv, GPT-2 Conv1D, Embedding).
        options: the Fisher, the loss reduction, chunking, the end pass (``CaptureArguments``).
        overwrite: replace a store of other settings, or of another run.
        spec: the experiment spec file (recorded, as featurize does).
        datasets: stage name → that stage's training dataset (as featurize takes them; an
            ``IndexedDataset`` is unwrapped), for the data fingerprint, the eigen projection's basis passes and
            the end pass; every stage this capture trains must be named, with the size given to ``begin_stage``.
        collate_fn: how the datasets' items batch in those passes (default: a ``CollatedDataset``'s own, else
            ``data.default_collate``).
        progress: show a progress bar during the end pass (a forward and backward of every example, after
            the stage's last step).

    The store holds, per window between checkpoints, the sum of every example's projected gradients
    and its visit count, and the window's Fisher sum (``windows.py``); ``sp.fit`` turns them into
    SOURCE once the recorder is closed. Scores keep the library's sign, score = −Δf: positive = z raised the
    query's measurement (helped it for a margin, harmed it for a loss or an error: the task's ``positive_helps``).

    **Fingerprints.** The first captured batch's first ``REFERENCE_ROWS`` examples become the store's
    reference batch, written at once: a resumed run finds it in the store and fingerprints on the
    same examples as an uninterrupted run would (a store that grows keeps it too). When the recorder
    closes, ``meta["fingerprint"]`` records what θ_T (the final checkpoint) computes on it, in
    eval mode, and, when ``datasets`` cover every stage of the run (stages an earlier session
    recorded keep their entry unless trained again), the data fingerprint, taken as each stage's
    first batch is captured (a dataset that cannot be read fails then, not at the end of training);
    both as featurize records them, so a query refuses a model that computes something else, and
    ``check_data`` data that changed.
    """

    def __init__(
        self,
        recorder: TrajectoryRecorder,
        store_path: str | Path,
        task: Task,
        *,
        projection: ProjectionArguments | None = None,
        options: CaptureArguments = CaptureArguments(),
        overwrite: bool = False,
        spec: str | None = None,
        datasets: Mapping[str, Dataset] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        progress: bool = True,
    ) -> None:
        if options.end_pass is True and datasets is None:
            raise TaskError(
                "The end pass reads each stage's examples at the stage's final weights; pass datasets= (each stage's "
                "training dataset under its name), or capture without end_pass."
            )
        unsized = sorted(name for name, data in (datasets or {}).items() if _rows(data) is None)
        if options.end_pass is True and unsized:
            raise TaskError(
                f"The end pass reads every example of each stage, but the datasets= of {unsized} have no len(); pass "
                "map-style datasets, or capture with end_pass='auto' or False."
            )
        if projection is None:
            projection = ProjectionArguments(kind="eigen" if datasets is not None else "factored")
            if datasets is None:
                warnings.warn(
                    "Capture projects with the random 'factored' projection and takes no end pass because no datasets= "
                    "were given; pass each stage's training dataset as datasets= for the more accurate 'eigen' "
                    "projection and the end pass.",
                    stacklevel=2,
                )
        if projection.kind not in ("factored", "eigen"):
            raise TaskError(
                f"Capture projects through the layer hooks of the 'eigen' or 'factored' projection, not "
                f"{projection.kind!r}."
            )
        if projection.kind == "eigen" and datasets is None:
            raise TaskError(
                "The 'eigen' projection's bases are estimated from the training data as training reaches each "
                "checkpoint; pass datasets= (each stage's training dataset under its name), or capture with "
                "ProjectionArguments(kind='factored')."
            )
        if projection.kind == "eigen" and unsized:
            raise TaskError(
                f"The 'eigen' projection's bases are estimated from examples of the training data read by index, but "
                f"the datasets= of {unsized} have no len(); pass map-style datasets, or capture with "
                "ProjectionArguments(kind='factored')."
            )
        self.recorder, self.task, self.options = recorder, task, options
        self._own: int | None = None  # basis_batch="auto": the run's first captured batch's size (the store's)
        self._collate, self._progress = collate_fn, progress
        self.path = str(store_path)
        self.model = recorder.model
        self.device = next(self.model.parameters()).device
        self.buffer_device = self.device if options.buffer == "device" else torch.device("cpu")
        self.datasets = (  # read as Examples: an example the dataset fails on is named as the dataset's error
            None
            if datasets is None
            else {
                name: training_examples(d.dataset if isinstance(d, IndexedDataset) else d, name, CAPTURE_RESUMES)
                for name, d in datasets.items()
            }
        )
        names = task.select_parameters(self.model)
        params = dict(self.model.named_parameters())
        shapes = [(n, tuple(params[n].shape)) for n in names]
        self._pass: BasisPass | None = None
        if projection.kind == "eigen":
            assert self.datasets is not None
            try:
                with modes_kept(self.model):  # PerExampleGradients puts its model in eval mode
                    grads_fn = PerExampleGradients(self.model, task, names, precision=options.precision)
                self._pass = BasisPass.of(projection, grads_fn, task, self.datasets, names,
                                          batch_size=self._own_batch(), device=self.device,
                                          collate_fn=collate_fn)  # fmt: skip
                self._pass.keep_random_state = True  # a collator that draws (random masking) leaves training's draws
                for stage in self.datasets:  # the layers' budget, from a forward pass of a few examples
                    with self._basis_data(stage, "the eigen projection's basis pass"):
                        self._pass.count(stage)
            except NoBasis as err:
                warnings.warn(f"{err} Capture uses the 'factored' projection instead.", stacklevel=2)
                projection = replace(projection, kind="factored")
        self.projection, self._shapes = projection, shapes
        if self._pass is not None:  # before the store is taken up: a refused resume leaves it as it was
            assert self.datasets is not None
            missing = sorted({stage for stage, _ in _closed_windows(recorder) if stage not in self.datasets})
            if missing:
                raise TaskError(
                    f"The eigen projection's final basis averages every window's, so resuming this run needs the data "
                    f"of the stages it trained before too: add {missing} to datasets=."
                )
        # The eigen projection's own projector comes with each window's basis; this one checks the layers (and at k
        # without a near-square split, which the eigen blocks do not need, at a k that has one).
        helper = projection.dim if self._pass is None else 64
        projector = replace(projection, kind="factored", dim=helper).projector(shapes, self.model)
        assert isinstance(projector, FactoredProjector)
        if projector.rest is not None:
            raise TaskError(
                f"Capture projects Linear and Conv layers only, but the parameters {projector.rest_names[:3]} belong "
                "to none; leave them out (ParameterSelection(exclude=..., skip_norm=True, skip_embedding=True)), or "
                "featurize after training."
            )
        self.projector, self.names = projector, names
        self.params = {n: params[n] for n in names}
        self.dim = projector.dim if self._pass is None else projection.dim
        share = [] if options.basis_share is None else [options.basis_share]
        cut = [] if self._pass is None else self._pass.inputs_cut()
        self._inputs = projection.basis_inputs(names, "in-run", *share, *cut)
        # A store captured before the layers' budget (``basis_layer_positions``) cut the subsets: its digest.
        self._inputs_whole = replace(projection, basis_layer_positions=None).basis_inputs(names, "in-run", *share)
        description = projector.describe() if self._pass is None else _in_run_eigen(projection, self._inputs)
        self._meta = {
            "library_version": __version__,
            "params": [[n, list(s)] for n, s in shapes],
            "projection": description,
            "task": task.describe(),
            "featurize": {
                "chunk_rows": options.chunk_rows,
                "fisher": options.fisher,
                **({"fisher_draws": DRAWS_ID} if options.fisher == "sampled" else {}),
                "seed": options.seed,
                "precision": options.precision,
                "fisher_directions": 0,
                "measurement": False,
            },
            "capture": options.identity(),
            "trajectory": {
                "path": str(recorder.run_dir.resolve()),
                "run": recorder.run_id,
                "fingerprint": None,
                "stages": [],
                "checkpoints": [],
            },
            **({} if self._pass is None else {"basis_arguments": basis_arguments(projection)}),
            "spec": spec,
        }
        steps = recorder.checkpoint_steps
        if steps and recorder.global_step != steps[-1]:
            raise TaskError(
                f"The recorder has taken {recorder.global_step - steps[-1]} steps since its last checkpoint; start "
                "capture before training, or right after TrajectoryRecorder.resume."
            )
        self._reference: Any = None
        self._trained: set[str] = set()
        self._data: dict[str, dict[str, Any]] = {}  # the data fingerprints of the stages this session trains
        self._fingerprints: dict[str, dict[str, Any]] = {}  # those of datasets= taken so far
        self._unsteady: set[str] = set()  # stages whose datasets= read differently twice: warned of once
        self._open_store(overwrite)
        self._stage: tuple[str, int] | None = None
        self._closed = False
        self._window_start: int | None = steps[-1] if steps else None
        self._pending: tuple[Tensor, Tensor, float] | None = None
        self._fisher_batch = False
        self._fisher_due: Batch | None = None  # a batch whose sampled Fisher is still to be taken
        self._fisher_rows = torch.zeros(0, dtype=torch.long)  # its examples' row indices
        self._outputs_checked = False
        self._inside_check = False
        self._bound: Task | None = None
        self._target: Tensor | None = None
        self._checked = False
        self._scale_batch: Batch | None = None  # the first captured batch, until its gradients' scale is checked
        self._scale_checked = False
        self._probe = torch.zeros((), device=self.device, requires_grad=True)
        self._adam = False
        self._scaled = False  # Adam, or groups at different rates (``_open_stage``)
        self._transform: GradientTransform | None = None  # an Adam stage's current D^{-1/2}, on the layers
        self.skipped = 0
        """Batches not captured: a stage's first Adam step, whose preconditioner is not known before it."""
        # Every hook below runs eagerly under a model compiled now or later, and is guarded on (compiled.py).
        hold_compiler_settings(self)
        self._hooks = contextlib.ExitStack()
        self._hooks.callback(release_compiler_settings, self)
        self._taps = contextlib.ExitStack()  # the current projector's layer hooks
        self._hooks.callback(lambda: self._taps.close())
        self._basis_due = self._pass is not None  # the eigen projection: a basis at each window's start
        self._window_basis: EigenBasis | None = None
        self._visited: list[int] = []  # the steps whose factors the basis sums hold
        self._window_examples = 0  # examples the current window has trained on (captured or not)
        self._examples_before: int | None = None  # those of the window before it (None: none yet)
        self._pass_size: int | None = None  # examples the current window's basis pass visited (None: all)
        if self._pass is None:
            self._install(projector)
        else:
            self._rebuild_sums()
        if options.fisher == "sampled" and options.fisher_forward == "training":
            # A function, not a bound method: a deep copy of the model (an EMA, an evaluation copy) must not copy
            # the capture with it; the hook ignores forwards of any module but this model.
            # Its backward keeps the training forward's graph for the training backward (compiled.py: no
            # compiled graph donates its buffers while capture listens).
            handle = self.model.register_forward_hook(
                eager(lambda module, args, kwargs, output: self._after_model_forward(module, args, kwargs, output)),
                with_kwargs=True,
            )
            self._hooks.callback(handle.remove)
        recorder.listen(self)

    # -- the store --------------------------------------------------------------------------

    def _open_store(self, overwrite: bool) -> None:
        """Create the store, or take up the one this run was captured into (dropping what no checkpoint closed)."""
        with writing(self.path):
            if not is_store(self.path) or overwrite:
                if _closed_windows(self.recorder):
                    raise StoreError(
                        f"The run at {self.recorder.run_dir} has trained through checkpoints no store captured; "
                        "capture a run from its start (or resume it with the store it was captured into)."
                    )
                Store.create(self.path, self._meta, overwrite=overwrite)
                return
            store = Store.open(self.path, writable=True)
            old = dict(store.meta)
            self._own = old.get("capture_batch")
            if old.get("capture") is not None and "fisher_forward" not in old["capture"]:
                old["capture"] = {**old["capture"], "fisher_forward": "separate"}  # the only pass before the option
            if old.get("capture") is not None and "basis_share" not in old["capture"]:  # every pass whole before it
                share = None if (old.get("projection") or {}).get("kind") == "eigen" else self.options.basis_share
                old["capture"] = {**old["capture"], "basis_share": share}
            if old.get("capture") is not None and "end_pass" not in old["capture"]:  # no end pass before the option
                old["capture"] = {**old["capture"], "end_pass": False}
            if old.get("capture") is not None and "precision" not in old["capture"]:  # fp32 before the option
                old["capture"] = {**old["capture"], "precision": "fp32"}
            keys = ("params", "projection", "task", "featurize", "capture")
            differing = [k for k in keys if _identity(k, old.get(k)) != _identity(k, self._meta[k])]
            typed: list[tuple[str, Any, Any]] = []  # the arguments that differ, as typed (errors.mention)
            if "capture" in differing and old.get("capture") is not None:  # which option, and how to match it
                was, now = old["capture"], self._meta["capture"]
                typed += [(f"CaptureArguments.{k}", was.get(k), now[k]) for k in now if was.get(k) != now[k]]
                if typed:
                    differing.remove("capture")
                # featurize's settings are options of CaptureArguments: not named again where those name them all
                ran_with, runs_with = old.get("featurize") or {}, self._meta["featurize"]
                fields = {k for k in {*ran_with, *runs_with} if ran_with.get(k) != runs_with.get(k)} - {"fisher_draws"}
                if "featurize" in differing and fields <= {field.partition(".")[2] for field, _, _ in typed}:
                    differing.remove("featurize")
            if old.get("capture") is None:
                differing.insert(0, "not captured")
            basis = ((old.get("projection") or {}).get("basis") or {}).get("inputs")
            if "projection" in differing and basis == self._inputs_whole != self._inputs:
                differing[differing.index("projection")] = (
                    "its eigen basis passes visit every one of basis_examples: resume it with "
                    "ProjectionArguments(basis_layer_positions=None)"
                )
            elif "projection" in differing and (own := projection_differences(self.projection, old)):
                typed = own + typed  # none found (the basis arguments of a store captured before they were recorded):
                differing.remove("projection")  # named by its settings below
            for key in ("projection", "task"):  # say which of their settings
                if key in differing:
                    differing[differing.index(key)] = _setting_differs(key, old.get(key), self._meta[key])
            details, mentions = typed_text(typed)
            ran, here = old.get("trajectory") or {}, self._meta["trajectory"]
            if self.recorder.checkpoint_steps and ran.get("run") is not None:  # a resumed run, wherever it lies now
                other = ran["run"] != here["run"]
            else:  # a new run, or a store captured before runs were named: by its directory
                other = ran.get("path") != here["path"]
            if other:
                differing.append("trajectory")
            if differing or typed:
                error = StoreError(
                    f"The store at {self.path} holds features of other settings or another run "
                    f"({'; '.join(filter(None, [details, ', '.join(differing)]))}); "
                    "capture with the settings it was made with, pass overwrite=True to replace it, or use another "
                    "store path."
                )
                error.mentions = tuple(mentions)
                raise error
            steps = self.recorder.checkpoint_steps
            windows = _stored_windows(store)
            if not steps and windows:
                raise StoreError(
                    f"The store at {self.path} holds captured windows of an earlier run while the recorder starts a "
                    "new one; resume the run with TrajectoryRecorder.resume, or pass overwrite=True to start the store "
                    "again."
                )
            if steps:  # before anything is dropped: a refused resume leaves the store as it was
                stage = self.recorder.stages[-1][0]  # the stage a killed run goes on with
                given = store.meta.get("capture_data") or {}
                if not old.get("captured") and stage in given and stage not in (self.datasets or {}):
                    raise TaskError(
                        f"The captured run was given the training data of stage {stage!r} as datasets= (its data "
                        "fingerprint and end pass are taken from them); resume it with the same datasets=."
                    )
                kept = [w for w in windows if w[1] < steps[-1]]
                # A stage no kept window read (it began at the last checkpoint; what it trained since is dropped below)
                # takes its data as it goes on: a resume with its bad example fixed is not refused. Where no window is
                # kept, the reference batch (the run's first batch) holds examples of the data recorded: they bind.
                read = {stage for stage, _ in kept}
                free = {stage for stage in given if stage not in read} if kept else set()
                self._check_resumed_data({k: v for k, v in _recorded_data(store.meta).items() if k not in free})
                self._check_closers(store, kept)
                if free:
                    store.update_meta(capture_data={k: v for k, v in given.items() if k not in free})
            elif store.meta.get("capture_data"):  # a new run into a store no window was written to: its data anew
                store.update_meta(capture_data={})
            last = steps[-1] if steps else 0
            for stage, start in windows:
                if start >= last:
                    for kind in (*WINDOW_ARRAYS, DENOMINATOR, END):
                        store.delete(window_array(kind, stage, start))
                    _drop_window_basis(store, stage, start)
                elif store.has(end := window_array(END, stage, start)) and not store.is_complete(end):
                    store.delete(end)  # an end pass cut short: taken again as the stage ends
            missing = [w for w in _closed_windows(self.recorder) if not _window_complete(store, *w)]
            if missing:
                stage, start = missing[0]
                raise StoreError(
                    f"The store at {self.path} lacks the captured window of stage {stage!r} from step {start} that the "
                    "resumed run has already trained through; capture the run from its start into a new store."
                )
            if (ran.get("path"), ran.get("run")) != (here["path"], here["run"]):  # the store follows its run (moved)
                store.update_meta(trajectory={**ran, "path": here["path"], "run": here["run"]})
            if old.get("captured"):  # a finished run trains further (rewound first, maybe): the store grows with it
                finished = max((old.get("trajectory") or {}).get("checkpoints") or [0])
                record_growth(store, rewound_to=last if last < finished else None)
                store.update_meta(captured=False)
            self._reference = load_reference_batch(store)

    def _check_closers(self, store: Store, kept: Sequence[tuple[str, int]]) -> None:
        """Refuse to resume into a store whose ``kept`` windows ``(stage, first step)`` were closed by other checkpoints
        than this run's: two copies of one run share its name, and one that trained on otherwise wrote them. A store
        captured before windows named their checkpoints is taken as it is."""
        closers = store.meta.get("capture_closers") or {}
        digests = self.recorder.checkpoint_digests
        for stage, start in kept:
            closer = closers.get(f"{stage}/{start}")
            if closer is not None and digests.get(closer["step"]) != closer["sha256"]:
                raise StoreError(
                    f"The store at {self.path} holds the captured window of stage {stage!r} from step {start} closed "
                    f"by another checkpoint at step {closer['step']} than this run's (a copy of the run that trained "
                    "on from there was captured into it?); capture this run into a new store, or resume the copy the "
                    "store was captured from."
                )

    def _write_window(
        self,
        stage: str,
        start: int,
        sums: Tensor,
        visits: Tensor,
        fisher: Tensor,
        count: float,
        denominator: Tensor | None,
        closer: dict[str, Any],
    ) -> None:
        """``closer``: the step and sha256 of the checkpoint that closes the window (``meta["capture_closers"]``)."""
        # A finite total has no NaN or infinite term (they stay non-finite in any sum): one pass without a mask of
        # [n, k] booleans; the rows are looked at only where it is not (a total that overflows finds no bad row).
        bad = ~torch.isfinite(sums).all(dim=1) if not bool(torch.isfinite(sums.sum())) else None
        if bad is not None and bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise NumericalError(
                f"The captured gradient of training example {row} of stage {stage!r} in the window from step {start} "
                "is NaN or infinite; check that example and the training loss."
            )
        rows = self.options.chunk_rows
        with store_lock(self.path):
            store = Store.open(self.path, writable=True)
            for kind in (*WINDOW_ARRAYS, DENOMINATOR):
                store.delete(window_array(kind, stage, start))
            # First: a complete window names the checkpoint that closed it (a copy of the run resumed into the store
            # is refused where its own checkpoint closes that window otherwise, ``_check_closers``).
            store.update_meta(capture_closers={**(store.meta.get("capture_closers") or {}), f"{stage}/{start}": closer})
            if self._window_basis is not None:  # first, as the denominator: a complete window has its basis
                _drop_window_basis(store, stage, start)
                values, shapes = self._window_basis.packed()
                store.write_whole(window_basis_array(stage, start), values)
                bases = dict(store.meta.get("capture_bases") or {})
                desc = {**self._window_basis.describe(), "shapes": shapes, "pass": self._pass_size,
                        "trained": self._window_examples}  # fmt: skip
                store.update_meta(capture_bases={**bases, f"{stage}/{start}": desc})
            if denominator is not None:  # first: a window whose other arrays are complete has it too
                store.write_whole(window_array(DENOMINATOR, stage, start), denominator.cpu().numpy())
            grads, counts = window_array("grads", stage, start), window_array("visits", stage, start)
            store.require_array(grads, tuple(sums.shape), rows, "float32")
            store.require_array(counts, tuple(visits.shape), rows, "uint32")
            for chunk in range(-(-sums.shape[0] // rows)):
                part = slice(chunk * rows, (chunk + 1) * rows)
                store.write_chunk(grads, chunk, sums[part].cpu().numpy())
                store.write_chunk(counts, chunk, visits[part].cpu().numpy().astype(np.uint32))
            store.write_whole(window_array("fisher", stage, start), fisher.cpu().numpy())
            store.write_whole(window_array("fisher-count", stage, start), np.array([count], dtype=np.float64))
            # The examples the window trained on, captured or not (an Adam stage's first batch is not): the visits
            # arrays count only those captured.
            totals = dict(store.meta.get("capture_visits") or {})
            own = {"capture_batch": self._own} if self._own is not None else {}  # basis_batch="auto", for resumes
            store.update_meta(capture_visits={**totals, f"{stage}/{start}": int(self._window_examples)}, **own)

    # -- batches ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(
        self, batch: Any, indices: Tensor | Sequence[int] | None = None, *, scale: float | None = None
    ) -> Iterator[Batch]:
        """Capture one training batch: run its forward and backward inside the block.

        Args:
            batch: a batch of ``IndexedDataset`` (its indices are taken out), or any batch with ``indices``.
            indices: the batch's dataset row indices ``[B]`` in the current stage's dataset.
            scale: what the tapped δ is multiplied by to give ∇ℓ (default: B, the loss being the batch mean;
                with gradient accumulation over n batches, n·B).

        Yields the batch without its indices. Call ``optimizer.step()`` after the block. A block that raises
        (a loop's own check of the loss, an interrupt) leaves a batch no step trained on: it is forgotten
        (``discard``), so a loop that skips it and goes on captures what one that never took it does (its sampled
        Fisher, taken at its forward, stays: a curvature sample at the same weights).
        """
        rest = self.begin(batch, indices, scale=scale)
        try:
            yield rest
        except BaseException:
            self.discard()
            raise
        self.commit()

    def begin(self, batch: Any, indices: Tensor | Sequence[int] | None = None, *, scale: float | None = None) -> Batch:
        """Start capturing a batch (the forward and backward that follow are captured); returns the batch
        without its indices. ``commit`` (or the next ``begin``, or the next checkpoint) ends it."""
        if self._closed:  # its layer hooks are gone
            raise TaskError(
                "This GradientCapture was closed; to capture further, resume the run (TrajectoryRecorder.resume) and "
                "capture it with a new GradientCapture."
            )
        self.commit()
        rows, rest = split_indices(batch, indices)
        name, size = self.recorder.stage
        if self._stage != (name, size):
            self._open_stage(name, size)
        if rows.numel() == 0:
            raise TaskError("The batch holds no examples; capture a batch of one example or more.")
        if int(rows.min()) < 0 or int(rows.max()) >= size:
            raise TaskError(
                f"The batch's row indices must lie in [0, {size - 1}] (stage {name!r} has {size} examples), not "
                f"[{int(rows.min())}, {int(rows.max())}]."
            )
        count = rows.numel()
        if batch_size(rest) != count:
            raise TaskError(
                f"The batch holds {batch_size(rest)} examples but {count} row indices; pass one index per example."
            )
        if right_padded(rest, self.task) is not rest:  # some row of a text task's batch is padded on the left
            raise TaskError(
                "The training batch is padded on the left (tokenizer.padding_side = 'left'): capture taps the training "
                "forward, which runs it as the model does (GPT-2's numbers positions from the padding), where "
                "attribution reads each sequence from position 0; pad the training batches on the right, or featurize "
                "the run after training."
            )
        if self._own is None:
            self._own = count
        if self._basis_due:
            self._rebase(name)
        self._window_examples += count
        if not self._checked:
            self._check(rest)
        if self._reference is None:
            self._keep_reference(rest)
        if self._scaled and not self._precondition():
            self.skipped += 1
            self._skipped_in_window += 1
            return rest
        self._fisher_batch = self._batches % self.options.fisher_every == 0
        if self.options.fisher == "sampled" and self._fisher_batch:
            if self.options.fisher_forward == "separate":
                self._fisher_pass(rest, rows)
            else:
                self._fisher_due, self._fisher_rows = rest, rows  # taken from the training forward
        factor = float(scale) if scale is not None else float(count)
        out = torch.zeros(count, self.dim, dtype=torch.float32, device=self.device)
        self._pending = (rows, out, factor)
        if not self._scale_checked:
            self._scale_batch = rest
        self._target = out
        self._probe.grad = None
        return rest

    @property
    def reached(self) -> bool:
        """Whether a backward has reached the begun batch's attributed layers yet."""
        return self._probe.grad is not None

    def discard(self) -> None:
        """Forget the begun batch, which training did not train on (a Lightning ``training_step`` that returned
        None: no backward, and the step moved nothing): its examples are not counted as visited."""
        if self._pending is None:
            return
        rows, _, _ = self._pending
        self._pending = self._target = self._fisher_due = self._scale_batch = None
        self._window_examples -= int(rows.numel())
        self._skipped_in_window += 1  # a window of such batches only is not a loop that forgot to capture

    def _install(self, projector: FactoredProjector) -> None:
        """Tap the model's layers with ``projector`` (in place of the last one's hooks)."""
        self._taps.close()
        self._taps = contextlib.ExitStack()
        taps = projector.tapped(
            self.model, self._tap_target, self._probe, dtype=self._dtype, transform=lambda: self._transform
        )
        self._taps.enter_context(taps)
        self.projector = projector

    def _tap_target(self) -> Tensor | None:
        """Where a tapped layer's forward adds its features: the begun batch's buffer (``None``: untapped).

        A layer of the model training without autograd inside a begun batch is a reentrant checkpoint's first
        forward: its tap keeps no graph, and the backward runs the layer again after ``end_forward`` (the
        callbacks) or for the gradients alone (a sampled Fisher from the training forward never reaches it)."""
        if self._target is not None and self.model.training and not torch.is_grad_enabled():
            raise TaskError(
                "A captured layer ran without autograd inside the training step (reentrant gradient checkpointing, "
                "use_reentrant=True, or torch.no_grad around it), which capture cannot take gradients through; "
                "checkpoint with use_reentrant=False (gradient_checkpointing_kwargs={'use_reentrant': False}), or "
                "featurize after training."
            )
        return self._target

    def _own_batch(self) -> int:
        """Examples per batch of capture's own passes (``basis_batch``)."""
        if self.options.basis_batch != "auto":
            return int(self.options.basis_batch)
        return self._own or AUTO_BASIS_BATCH

    def _visit(
        self, stage: str, where: str, scaled: bool, limit: int | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One pass of the eigen basis over ``stage``'s subset at the model's current weights, in eval mode;
        untapped (no batch is begun), and the global random state is not touched (``BasisPass``). Where ``scaled``,
        on a preconditioned stage the factors are those of D^{-1/2}-scaled gradients, as featurize takes them, with
        D as ``_denominator`` gives it (none before an Adam stage's first step: the raw factors). ``limit``: at most
        that many of the subset's examples (``BasisPass.visit``)."""
        assert self._pass is not None
        self._pass.batch_size = self._own_batch()
        d = self._denominator(stage) if scaled else None
        sides = None if d is None else rank_one_sides(d, self._pass.layers)
        with modes_kept(self.model), self._basis_data(stage, f"the eigen projection's basis pass, {where}"):
            self.model.eval()
            return self._pass.visit(stage, where, self._pass.quiet(), sides, limit)

    @contextlib.contextmanager
    def _basis_data(self, stage: str, why: str) -> Iterator[None]:
        """The model failing on, or failing to read, ``stage``'s data given as datasets= as one ``TaskError``."""
        what = f"the training data of stage {stage!r} given as datasets= ({why})"
        try:
            with model_errors(what):
                yield
        except OSError as err:
            raise TaskError(f"Capture cannot read {what}: {type(err).__name__}: {err}.") from err

    def _rebase(self, stage: str) -> None:
        """The eigen projection of the window that starts here: one Fisher pass over at most ``basis_examples``
        examples of the stage at the weights it starts from (after the run's first window, at most ``basis_share``
        of those the window before trained on: ``_pass_limit``), added to the factors of every window before it; the
        window's basis is their average so far (the final basis, ``after_close``, adds the final weights').

        The average so far, not this window's factors alone: each window is later mapped into the final basis and
        keeps only what its own basis kept, so a basis nearer the final one loses less. On the text example
        (AdamW) the running average scored 0.392 against post-hoc's 0.393, the window's own factors 0.371; on
        digits `converged` 0.629 against 0.641, both far above post-hoc's 0.569 (BENCHMARKS.md, issue 16)."""
        assert self._pass is not None
        step = self.recorder.global_step
        self._pass_size = self._pass_limit(self._examples_before)
        self._visit(stage, f"step {step}", True, self._pass_size)
        self._visited.append(step)
        basis = self._pass.basis(self._visited, self._inputs)
        projector = self.projection.projector(self._shapes, self.model, basis)
        assert isinstance(projector, FactoredProjector)
        self._install(projector)
        self._window_basis, self._basis_due = basis, False

    def _pass_limit(self, examples_before: int | None) -> int | None:
        """How many examples the basis pass of a window visits, given those the window before it trained on
        (``CaptureArguments.basis_share``); ``None``: the whole subset (``basis_examples``)."""
        share = self.options.basis_share
        if share is None or examples_before is None:
            return None
        return max(MIN_BASIS_PASS, int(np.ceil(share * examples_before)))

    def _rebuild_sums(self) -> None:
        """A resumed run: the factor sums of the windows an earlier session captured, visited again at their
        checkpoints (the same examples, and on Adam stages the optimizer state saved with the checkpoint: the
        sums are those the uninterrupted run holds)."""
        closed = _closed_windows(self.recorder)
        if not closed:
            return
        optimizer = self.recorder.optimizer
        adam = {name for name, desc in self.recorder.stage_optimizers().items() if desc["kind"] in ADAM_KINDS}
        recorded = Store.open(self.path).meta.get("capture_bases") or {}
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optimizer_state = copy.deepcopy(optimizer.state_dict())
        try:
            for stage, start in closed:
                payload = load_checkpoint(self.recorder.run_dir, self.recorder.saved_checkpoint(start))
                load_weights(self.model, payload["model"], partial=self.recorder.saves_trainable_only)
                with_state = stage in adam and "optimizer" in payload
                if with_state:
                    try:
                        optimizer.load_state_dict(payload["optimizer"])
                    except ValueError:  # another stage's optimizer, shaped otherwise: the raw factors
                        with_state = False
                window = recorded.get(f"{stage}/{start}") or {}
                # an Adam stage's D from the state saved with the checkpoint; an SGD stage's (rate ratios) is fixed
                self._visit(stage, f"step {start}", with_state or stage not in adam, window.get("pass"))
                self._visited.append(start)
                self._examples_before = window.get("trained")
        finally:
            self.model.load_state_dict(state)
            optimizer.load_state_dict(optimizer_state)

    def _precondition(self) -> bool:
        """A preconditioned stage: refresh D^{-1/2} when due (Adam's from the optimizer; an SGD stage's 1/r once);
        ``False`` before an Adam stage's first step."""
        if self._transform is not None and (not self._adam or self._batches % self.options.scale_every):
            return True
        assert self._stage is not None
        d = self._denominator(self._stage[0])
        if d is None:
            return False
        self._transform = self.projector.scaling({n: t.rsqrt() for n, t in d.items()})
        return True

    def _denominator(self, stage: str) -> dict[str, Tensor] | None:
        """D of ``stage``'s next step, its optimizer the recorder's current one (docs/concepts/source.md §6): on an
        Adam stage (√v̂ + ε)/r from the optimizer's state (``None`` before its first step), on an SGD stage whose groups
        train at different rates 1/r, r each parameter's group's rate ratio as the stage recorded it; ``None`` on an
        SGD stage of one rate (nothing is scaled)."""
        described = self.recorder.stage_optimizers()[stage]
        ratios = group_ratios(described)
        if described["kind"] in ADAM_KINDS:
            return live_preconditioner(self.recorder.optimizer, self.params, ratios)
        if any(r != 1.0 for r in ratios.values()):
            return ratio_denominator(self.params, ratios)
        return None

    def end_forward(self) -> None:
        """The begun batch's forward is over: later forwards (evaluation) are not tapped; its backward still is.

        A sampled Fisher the training forward did not give (the callback's model is not the one whose
        forward ran) is taken here by a separate pass: the parameters have not moved yet."""
        self._target = None
        self._separate_if_due()

    def _separate_if_due(self) -> None:
        if self._fisher_due is not None:
            batch, self._fisher_due = self._fisher_due, None
            self._fisher_pass(batch, self._fisher_rows)

    def commit(self) -> None:
        """Add the begun batch's captured gradients to the current window (its backward must have run)."""
        if self._pending is None:
            return
        rows, out, factor = self._pending
        self._pending = self._target = None
        self._separate_if_due()
        if self._probe.grad is None:
            raise TaskError(
                "A captured batch ended before its backward pass reached the attributed layers; call loss.backward() "
                "inside the capture block (or between begin() and commit()), and with activation checkpointing use its "
                "non-reentrant kind (use_reentrant=False), whose forward the layer hooks see."
            )
        grads = out * factor
        if self._scale_batch is not None:
            batch, self._scale_batch, self._scale_checked = self._scale_batch, None, True
            self._check_scale(batch, grads)
        where = rows.to(self.buffer_device)
        self._sums.index_add_(0, where, grads.to(self.buffer_device))
        self._visits.index_add_(0, where, torch.ones_like(where, dtype=torch.int32))
        if self.options.fisher == "empirical" and self._fisher_batch:
            self._add_fisher(grads)
        self._batches += 1

    def _open_stage(self, name: str, size: int) -> None:
        check_task_smoothing(self.task, self.recorder.stage_label_smoothing)
        described = describe_optimizer(self.recorder.optimizer, self.model)
        kind = described["kind"]
        if kind not in ("sgd", *ADAM_KINDS):
            raise TaskError(
                f"Stage {name!r} is trained with {kind!r}; capture supports SGD, Adam and AdamW stages, whose updates "
                "SOURCE models: train with one of them."
            )
        sizes = {n: p.numel() for n, p in self.params.items()}
        rule = optimizer_rule(Stage(name, 0, 0, size, described), sizes)  # maximize=True, different momentum factors
        check_optimised(name, described["groups"], self.names)
        if self.datasets is not None and name not in self._data:  # fingerprinted as the stage starts: errors come early
            given = self.datasets.get(name)
            rows = None if given is None else _rows(given)
            if given is None or rows not in (None, size):
                what = "names no such stage" if given is None else f"holds {rows} examples"
                raise TaskError(
                    f"Stage {name!r} trains on {size} examples, but GradientCapture's datasets= {what}; pass each "
                    "stage's training dataset under its name."
                )
            if rows is not None:  # a stream (no len()) goes unfingerprinted, and without the end pass
                entry = self._data_fingerprint(name)
                # Kept in the store before any window of the stage is: a killed run resumed with other data is refused
                # (``_check_resumed_data``), and the finished store's fingerprint covers stages of every session.
                with store_lock(self.path):
                    store = Store.open(self.path, writable=True)
                    recorded = store.meta.get("capture_data") or {}
                    if name in recorded:
                        self._same_data(name, recorded[name], entry)
                    else:
                        store.update_meta(capture_data={**recorded, name: entry})
                self._data[name] = entry
        self._trained.add(name)
        if self._stage is None or self._stage[0] != name:
            self._transform = None  # a new stage: its optimizer's state, not the last stage's
        self._adam = kind in ADAM_KINDS
        self._scaled = rule.preconditioned  # Adam, or groups at different rates: gradients scaled by D^{-1/2}
        self._stage = (name, size)
        self._sums = torch.zeros(size, self.dim, dtype=torch.float32, device=self.buffer_device)
        self._visits = torch.zeros(size, dtype=torch.int32, device=self.buffer_device)
        self._fisher = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        self._fisher32 = torch.zeros(self.dim, self.dim, dtype=torch.float32, device=self.device)
        self._pending_fisher = 0
        self._count = 0
        self._batches = 0
        self._skipped_in_window = 0

    def _data_fingerprint(self, stage: str) -> dict[str, Any]:
        """The data fingerprint of ``stage``'s dataset given as datasets= (``data_fingerprint``), taken once."""
        assert self.datasets is not None
        if stage not in self._fingerprints:
            try:
                self._fingerprints.update(data_fingerprint({stage: self.datasets[stage]}))
            except OSError as err:
                raise TaskError(
                    f"Capture cannot read the training data of stage {stage!r} given as datasets= "
                    f"({type(err).__name__}: {err}); pass a dataset whose examples can be read."
                ) from err
        return self._fingerprints[stage]

    def _check_resumed_data(self, recorded: Mapping[str, Mapping[str, Any]]) -> None:
        """A resumed run: every stage's dataset given as datasets= must be the one the store recorded for it."""
        for stage in sorted(set(recorded) & set(self.datasets or {})):
            self._same_data(stage, recorded[stage], self._data_fingerprint(stage))

    def _same_data(self, stage: str, recorded: Mapping[str, Any], entry: Mapping[str, Any]) -> None:
        """Refuse ``stage``'s datasets= whose fingerprint ``entry`` is not the ``recorded`` one, unless they read
        differently every time (random augmentation: let through with a warning, as ``check_data`` does)."""
        if (recorded.get("size"), recorded.get("sha256")) == (entry.get("size"), entry.get("sha256")):
            return
        assert self.datasets is not None
        try:
            again = data_fingerprint({stage: self.datasets[stage]})[stage]
        except OSError:
            again = None
        if again is None or again.get("sha256") != entry.get("sha256"):
            if stage not in self._unsteady:
                warnings.warn(
                    f"The training data of stage {stage!r} given as datasets= read differently twice (random "
                    "augmentation?), so they cannot be checked against those the captured run trained on; capture "
                    "with deterministic examples.",
                    stacklevel=4,
                )
            self._unsteady.add(stage)
            return
        same_size = recorded.get("size") == entry.get("size")
        what = "other contents or order" if same_size else f"{entry.get('size')} examples, not {recorded.get('size')}"
        raise TaskError(
            f"The training data of stage {stage!r} given as datasets= differ from those the captured run trained on "
            f"({what}); pass the same data, in the same order."
        )

    def _check(self, batch: Batch) -> None:
        """Once: the layer hooks must reproduce the materialised per-example gradients (tied weights…)."""
        with modes_kept(self.model):
            grads_fn = PerExampleGradients(self.model, self.task, self.names)
            self.projector.check_layers(grads_fn, batch)
        self._checked = True

    def _keep_reference(self, batch: Batch) -> None:
        """A CPU copy of the batch's first ``REFERENCE_ROWS`` examples (copied: the loop may reuse its
        buffers), written to the store at once (see the class docstring)."""
        rows = batch_rows(batch, slice(0, REFERENCE_ROWS))
        self._reference = tree_map(lambda t: t.detach().to("cpu", copy=True) if isinstance(t, Tensor) else t, rows)
        with store_lock(self.path):
            save_reference_batch(Store.open(self.path, writable=True), self._reference)

    def _after_model_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """The model's forward hook: the begun batch's sampled Fisher, from the training forward's graph.

        ũ = P ∇ℓ(x, ŷ; θ_t), ŷ drawn from these outputs: one backward of the sampled labels' loss to the
        probe, into the batch's own buffer (its layer hooks were set at this forward), which is then
        copied out and cleared for the training backward; the graph is kept for that backward."""
        batch, target = self._fisher_due, self._target
        if batch is None or target is None or self._inside_check or module is not self.model:
            return
        if not torch.is_grad_enabled():
            return
        outputs = self.task.outputs_of(output)
        if not outputs.requires_grad or outputs.shape[0] != target.shape[0]:
            return  # not the training forward of this batch: the separate pass takes it
        if not self._outputs_checked:
            self._check_outputs(module, args, kwargs, batch)
        self._fisher_due = None
        task = self._bound_task()
        ((weight, pseudo),) = self._fisher_labels(task, outputs.detach(), batch, self._fisher_draws(self._fisher_rows))
        total = task.fisher_loss(outputs, pseudo).sum()
        torch.autograd.grad(total, self._probe, retain_graph=True, allow_unused=True)
        fisher = target * weight.to(target).sqrt()[:, None]
        target.zero_()
        self._add_fisher(fisher)

    def _check_scale(self, batch: Batch, grads: Tensor) -> None:
        """Once, at the first captured batch: its captured gradients (the tapped δ times ``scale``) against the
        task's per-example gradients of its first ``SCALE_ROWS`` examples, projected alike (eval mode, the random
        state untouched). They agree up to dropout's and batch norm's noise where the training loss is the batch
        mean (times what ``scale`` says); a loss summed over the batch gives B times, an fp16 loss scaler its scale.
        A mean over tokens with padding or ignored labels weighs each sequence by its share of the tokens, far
        inside the bounds (B/2 and 2/B)."""
        count = grads.shape[0]
        if count < MIN_SCALE_BATCH:
            return
        rows = min(SCALE_ROWS, count)
        self._inside_check = True
        try:
            devices = []
            if self.device.type == "cuda":
                devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            with modes_kept(self.model), torch.random.fork_rng(devices=devices):
                self.model.eval()
                grads_fn = PerExampleGradients(self.model, self.task, self.names)
                expected = self.projector.project_batch(grads_fn, batch_rows(batch, slice(0, rows)),
                                                        transform=self._transform)  # fmt: skip
        finally:
            self._inside_check = False
        reference = float(expected.norm())
        if reference == 0.0:
            return
        ratio = float(grads[:rows].norm()) / reference
        if ratio > count / 2 or ratio < 2 / count:
            raise TaskError(
                f"The captured gradients of the first batch are {ratio:.3g} times the task's per-example gradients of "
                f"the same examples (batches of {count}): the training loss is not the batch mean of the task's loss. "
                "A loss summed over the batch steps B times as far as the recorded rate, which SOURCE cannot follow: "
                "train on the batch mean (plain SGD takes the same steps with the learning rate times B and the weight "
                "decay over B); fp16 loss scaling inflates the gradients capture taps (train in bf16 or fp32); with "
                "gradient accumulation pass scale= (batch size times the batches accumulated)."
            )

    def _check_outputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch: Batch) -> None:
        """Once: the model's forward, mapped by ``Task.outputs_of``, must give what ``Task.forward`` gives
        (both in eval mode, untapped), or the Fisher would be taken from other outputs than featurize's."""
        target, self._target = self._target, None
        self._inside_check = True
        try:
            with modes_kept(self.model), torch.no_grad():
                self.model.eval()
                own = self.task.outputs_of(module(*args, **kwargs)).float()
                expected = self._bound_task().forward(self.model, batch).float()
        finally:
            self._target, self._inside_check = target, False
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if own.shape != expected.shape or float((own - expected).abs().max()) > 1e-4 * max(scale, 1e-6):
            raise TaskError(
                f"{type(self.task).__name__}.outputs_of of the model's forward differs from {type(self.task).__name__}"
                ".forward on this batch, so the Fisher cannot be taken from the training forward; override outputs_of, "
                "or capture with CaptureArguments(fisher_forward='separate')."
            )
        self._outputs_checked = True

    @property
    def _dtype(self) -> torch.dtype:
        """What the layer hooks project in (``CaptureArguments.precision``)."""
        return torch.bfloat16 if self.options.precision == "bf16" else torch.float32

    def _autocast(self) -> torch.autocast:
        """Capture's own forward passes under bfloat16 autocast where ``precision="bf16"`` (a no-op for fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.options.precision == "bf16")

    def _bound_task(self) -> Task:
        """The task bound to the model, once: a text task checks its attention mask at its first forward only."""
        if self._bound is None:
            self._bound = self.task.bind(self.model)
        return self._bound

    def _fisher_draws(self, rows: Tensor) -> FisherDraws:
        """The sampled labels of the current batch's examples ``rows`` (their indices in the stage's data): keyed on
        (seed, step) and each row, whichever pass takes them and however the step's examples are batched."""
        return FisherDraws.of([self.options.seed, self.recorder.global_step], rows, self.device)

    def _fisher_labels(self, task: Task, outputs: Tensor, batch: Batch, draws: FisherDraws) -> list[tuple[Tensor, Any]]:
        """The current batch's sampled Fisher labels (``Task.fisher_targets``), drawn from finite outputs only. Checked
        on the CPU only, where it costs no wait: on a GPU the step's NaN gradients are refused at its checkpoint."""
        if outputs.device.type == "cpu" and not bool(torch.isfinite(outputs).all()):
            raise NumericalError(
                f"The model's outputs on the training batch at step {self.recorder.global_step} are NaN or infinite, "
                "so capture cannot draw its Fisher labels; check that batch's examples and the training loss, and "
                "resume the run from its last checkpoint."
            )
        return task.fisher_targets(outputs, batch, draws)

    def _fisher_pass(self, batch: Batch, rows: Tensor) -> None:
        """ũ = P ∇ℓ(x, ŷ; θ_t) with ŷ drawn from the model, in eval mode: add ũũᵀ to the window's Fisher sum."""
        draws, count = self._fisher_draws(rows), rows.numel()
        out = torch.zeros(count, self.dim, dtype=torch.float32, device=self.device)
        try:
            with modes_kept(self.model), torch.enable_grad():
                self.model.eval()
                self._target = out
                task = self._bound_task()
                with self._autocast():
                    outputs = task.forward(self.model, batch)
                ((weight, pseudo),) = self._fisher_labels(task, outputs.detach(), batch, draws)  # as featurize: outside
                with self._autocast():
                    total = task.fisher_loss(outputs, pseudo).sum()
                torch.autograd.grad(total, self._probe, allow_unused=True)
        finally:
            self._target = None
        self._add_fisher(out * weight.to(out).sqrt()[:, None])

    def _add_fisher(self, u: Tensor) -> None:
        """Add ũũᵀ of a batch's Fisher vectors ``[B, k]``: fp32 products, folded into fp64 every 64 batches."""
        self._fisher32.addmm_(u.T, u)
        self._count += u.shape[0]
        self._pending_fisher += 1
        if self._pending_fisher == _FOLD_EVERY:
            self._fold_fisher()

    def _fold_fisher(self) -> None:
        self._fisher += self._fisher32
        self._fisher32.zero_()
        self._pending_fisher = 0

    # -- the recorder's events ----------------------------------------------------------------

    def before_checkpoint(self, step: int, sha256: str) -> None:
        """Write the window this checkpoint (its file's ``sha256``) closes (called by the recorder before it saves
        the checkpoint)."""
        if self._closed:
            return
        self.commit()
        start, self._window_start = self._window_start, step
        if start is None or start >= step:
            return
        if self._stage is None or (self._batches == 0 and not self._skipped_in_window):
            raise TaskError(
                f"Steps {start}–{step - 1} were recorded without a captured batch; wrap every training batch in "
                "GradientCapture.batch (or use the framework's capture callback)."
            )
        self._fold_fisher()
        denominator = None
        if self._scaled:
            d = self._denominator(self._stage[0])
            if d is None:
                raise TaskError(
                    f"The Adam optimizer of stage {self._stage[0]!r} holds no state after steps {start}–{step - 1}; "
                    "call optimizer.step() after every captured batch."
                )
            denominator = torch.cat([d[n].reshape(-1) for n in self.names]).float()
        self._write_window(
            self._stage[0], start, self._sums, self._visits, self._fisher, float(self._count), denominator,
            closer={"step": step, "sha256": sha256},
        )
        self._examples_before, self._window_examples = self._window_examples, 0
        self._open_stage(*self._stage)
        self._basis_due = self._pass is not None

    def after_stage_end(self, stage: str, step: int) -> None:
        """``end_pass``: the stage has ended at ``step`` (its final checkpoint is saved), so every example's gradient
        at these weights joins the stage's last window as one more visit (``windows.py``). A run killed during the
        pass takes it again when the resumed stage ends. ``"auto"``: where ``datasets=`` holds the stage's examples
        with a ``len()``."""
        auto = self.options.end_pass == "auto"
        if self._closed or not self.options.end_pass or (auto and stage not in (self.datasets or {})):
            return
        self.commit()
        starts = [start for name, start in _closed_windows(self.recorder) if name == stage and start < step]
        if not starts:
            return
        store = Store.open(self.path)
        if not store.is_complete(window_array(END, stage, starts[-1])):  # else taken as it ended before
            assert self.datasets is not None  # a finished run resumed into a new stage, or killed after the pass
            if stage not in self.datasets:
                raise TaskError(
                    f"The end pass of stage {stage!r} reads its examples at the stage's final weights; add {stage!r} "
                    "to datasets=."
                )
            if auto and _rows(self.datasets[stage]) is None:
                return
            self._end_pass(stage, starts[-1])
        with store_lock(self.path):  # after the array: a store whose meta names an end pass holds all of it
            store = Store.open(self.path, writable=True)
            ends = set(store.meta.get("capture_ends") or [])
            store.update_meta(capture_ends=sorted(ends | {f"{stage}/{starts[-1]}"}))

    def _end_pass(self, stage: str, start: int) -> None:
        """P ∇ℓ(z; θ) of every example of ``stage`` at the current weights, in eval mode (as featurize takes it), with
        the projection of its window from ``start`` (Adam stages: in Adam's coordinates, D from the optimizer's
        state); written as ``capture/end/<stage>/<start>`` chunk by chunk as the pass goes (memory: one store chunk).
        Neither the parameters' gradients, nor batch-norm statistics, nor the global random state are touched."""
        assert self.datasets is not None
        dataset = self.datasets[stage]
        projector = self.projector
        if self._pass is not None:  # the eigen projection: that window's own basis, as the store keeps it
            store = Store.open(self.path)
            where = window_basis_array(stage, start)
            basis = EigenBasis.unpack(store.read(where), store.meta["capture_bases"][f"{stage}/{start}"], where)
            projector = self.projection.projector(self._shapes, self.model, basis)  # type: ignore[assignment]
            assert isinstance(projector, FactoredProjector)
            self._install(projector)
        rows, name = self.options.chunk_rows, window_array(END, stage, start)
        size = len(dataset)  # type: ignore[arg-type]
        loader = DataLoader(dataset, batch_size=self._own_batch(), generator=torch.Generator(),
                            collate_fn=RandomStateKept(self._collate or collate_of(dataset)))  # fmt: skip
        what = f"the training data of stage {stage!r} given as datasets= (the end pass)"
        task, chunk, filled = self._bound_task(), 0, 0
        pending = torch.zeros(min(rows, size), self.dim, dtype=torch.float32)  # one store chunk at a time, on the host
        transform = self._transform
        with store_lock(self.path):  # held for the pass: this capture is the store's writer
            store = Store.open(self.path, writable=True)
            store.delete(name)
            store.require_array(name, (size, self.dim), rows, "float32")
            try:
                with ChunkWriter(store) as writer:  # each chunk written while the next is computed
                    d = self._denominator(stage)
                    self._transform = None if d is None else projector.scaling({n: t.rsqrt() for n, t in d.items()})
                    with modes_kept(self.model), model_errors(what), torch.enable_grad():
                        self.model.eval()
                        for batch in tqdm(loader, desc=f"end pass ({stage})", unit="batch", disable=not self._progress):
                            batch = move_batch(batch, self.device)
                            out = torch.zeros(batch_size(batch), self.dim, dtype=torch.float32, device=self.device)
                            self._target = out
                            with self._autocast():
                                total = task.loss(task.forward(self.model, batch), batch).sum()
                            torch.autograd.grad(total, self._probe, allow_unused=True)
                            self._target = None
                            values, at = out.cpu(), 0
                            while at < values.shape[0]:  # a batch may straddle two chunks
                                take = min(values.shape[0] - at, pending.shape[0] - filled)
                                pending[filled : filled + take] = values[at : at + take]
                                filled, at = filled + take, at + take
                                if filled == min(rows, size - chunk * rows):
                                    self._write_end_chunk(writer, name, stage, chunk, pending[:filled])
                                    chunk, filled = chunk + 1, 0
                                    pending = torch.zeros_like(pending)  # the writer holds the last one
            except OSError as err:
                raise TaskError(f"Capture cannot read {what}: {type(err).__name__}: {err}.") from err
            finally:
                self._target, self._transform = None, transform

    def _write_end_chunk(self, writer: ChunkWriter, name: str, stage: str, chunk: int, values: Tensor) -> None:
        if not bool(torch.isfinite(values).all()):
            raise NumericalError(
                f"The end pass's gradients of stage {stage!r} are NaN or infinite at step {self.recorder.global_step}; "
                "check the training loss."
            )
        try:
            writer.write(name, chunk, values.numpy())
        except OSError as err:  # the store's fault, not the data's (``_end_pass`` names those)
            raise StoreError(f"Capture cannot write its end pass into {self.path}: {err}.") from err

    def after_close(self) -> None:
        """Finish the store: the run's learning rates, description and fingerprints (called by the recorder's close)."""
        if self._closed:
            return
        self.commit()
        final = None
        if self._pass is not None and self.recorder.stages:  # the final weights join the average
            # the recorder's last stage: a run resumed at its final checkpoint captures no batch before it closes
            stage = self.recorder.stages[-1][0]
            self._visit(stage, f"step {self.recorder.global_step}", True)
            final = self._pass.basis([*self._visited, self.recorder.global_step], self._inputs)
        self.close()
        trajectory = Trajectory.load(self.recorder.run_dir)
        with store_lock(self.path):
            store = Store.open(self.path, writable=True)
            if final is not None:  # the store's basis, which queries project with and fit maps every window into
                old = (store.meta.get("projection") or {}).get("basis") or {}
                for i in range(len(old.get("modules") or [])):
                    store.delete(f"{BASIS_PREFIX}/{i}/out")
                    store.delete(f"{BASIS_PREFIX}/{i}/in")
                for name, values in final.arrays():
                    store.write_whole(name, values)
                store.update_meta(projection=self.projection.projector(self._shapes, self.model, final).describe())
            store.write_whole("trajectory/lr", trajectory.lr.astype(np.float64))
            store.update_meta(
                fingerprint=self._fingerprint(trajectory, _recorded_data(store.meta)),
                trajectory={
                    "path": str(Path(trajectory.path).resolve()),
                    "run": self.recorder.run_id,
                    "fingerprint": trajectory.fingerprint(),
                    "stages": [s.describe() for s in trajectory.stages],
                    "checkpoints": [c.step for c in trajectory.checkpoints],
                },
                provenance=describe_provenance(self.model, trajectory, self.device, 0),
                captured=True,
            )

    def _fingerprint(self, trajectory: Trajectory, recorded: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """The model and data fingerprints of the finished run (see the class docstring); ``recorded``: the
        data fingerprints earlier sessions of the run wrote (``_recorded_data``)."""
        if self._reference is None:  # no batch was ever captured
            return None
        with modes_kept(self.model):
            values = model_fingerprint(self.model, self.task, self._reference, self.device)
        data = {stage: entry for stage, entry in (recorded or {}).items() if stage not in self._trained}
        data.update(self._data)
        covered = all(stage.name in data for stage in trajectory.stages)
        return {
            "model": {"step": trajectory.final_checkpoint.step, "values": values},
            "data": data if covered else None,
        }

    def close(self) -> None:
        """Remove the layer hooks and stop listening, without finishing the store (training stopped early:
        resume it later); the recorder's own close finishes the store instead."""
        self._pending = self._target = self._fisher_due = None
        self._closed = True
        self._hooks.close()

    def after_detach(self) -> None:
        """The recorder was detached (its training loop raised): ``close``, the store left to resume."""
        self.close()


def _in_run_eigen(projection: ProjectionArguments, inputs: str) -> dict[str, Any]:
    """The store's projection while an eigen capture trains: what fixes it (each window's basis is in
    ``capture_bases``; the final one replaces this description when the run closes)."""
    return {"kind": "eigen", "k": projection.dim, "dim": projection.dim, "seed": projection.seed,
            "adam_rank": projection.adam_rank, "basis": {"inputs": inputs}}  # fmt: skip


def _identity(key: str, value: Any) -> Any:
    """What of a store's metadata entry must match for a capture to take the store up (an eigen projection's
    bases change as the run trains: its arguments must match)."""
    if key != "projection" or not value or value.get("kind") != "eigen":
        return value
    return [value.get("k"), value.get("seed"), value.get("adam_rank", 1), (value.get("basis") or {}).get("inputs")]


def _setting_differs(key: str, was: Any, now: Any) -> str:
    """``key``, with those of its settings that differ between a store's ``was`` and the capture's ``now`` (``"task:
    label_smoothing=None there, 0.1 here"``); only ``key`` where none of its plain values tells them apart."""
    if key == "projection" and (was or {}).get("kind") == (now or {}).get("kind") == "eigen":
        was, now = _identity(key, was), _identity(key, now)
        told = 3 if was[:3] != now[:3] else 4  # the digest of the basis inputs follows k, seed and adam_rank
        names = ("k", "seed", "adam_rank", "basis inputs")[:told]
        was, now = (dict(zip(names, value[:told], strict=True)) for value in (was, now))

    def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(value, Mapping):
            return {prefix[:-1]: value}
        return {k: v for name, inner in value.items() for k, v in leaves(inner, f"{prefix}{name}.").items()}

    old, new = leaves(was or {}), leaves(now or {})
    names = ["kind"] if old.get("kind") != new.get("kind") else dict.fromkeys([*old, *new])  # the rest follows the kind
    told = [(name, repr(old.get(name)), repr(new.get(name))) for name in names]
    parts = [f"{name}={a} there, {b} here" for name, a, b in told if a != b and len(a) + len(b) <= 80]
    return f"{key}: {'; '.join(parts)}" if parts else key


def _recorded_data(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The data fingerprints a store holds for its run's stages: those written as each stage started
    (``capture_data``), over a finished run's (stores captured before ``capture_data`` hold only those)."""
    finished = (meta.get("fingerprint") or {}).get("data") or {}
    return {**finished, **(meta.get("capture_data") or {})}


def _rows(dataset: Dataset) -> int | None:
    """A dataset's size; ``None`` for one without ``len()`` (an iterable dataset: no end pass)."""
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def _drop_window_basis(store: Store, stage: str, start: int) -> None:
    bases = dict(store.meta.get("capture_bases") or {})
    if bases.pop(f"{stage}/{start}", None) is None:
        return
    store.delete(window_basis_array(stage, start))
    store.update_meta(capture_bases=bases)


def _stored_windows(store: Store) -> list[tuple[str, int]]:
    """``(stage, first step)`` of every window with any array in the store."""
    found = set()
    for name in store.progress_arrays(PREFIX):
        kind, stage, key = name[len(PREFIX) :].split("/")
        if kind in (*WINDOW_ARRAYS, DENOMINATOR):
            found.add((stage, int(key.removeprefix("step-"))))
    return sorted(found, key=lambda w: w[1])


def _window_complete(store: Store, stage: str, start: int) -> bool:
    return all(store.is_complete(window_array(kind, stage, start)) for kind in WINDOW_ARRAYS)


def _closed_windows(recorder: TrajectoryRecorder) -> list[tuple[str, int]]:
    """``(stage, first step)`` of the windows the recorder's checkpoints have closed."""
    stages = recorder.stages
    steps = recorder.checkpoint_steps
    closed = []
    for start, end in itertools.pairwise(steps):
        owner = [name for name, first, last in stages if first <= start and (last is None or start < last)]
        if owner and end > start:
            closed.append((owner[-1], start))
    return closed
