"""featurize: per-checkpoint projected training gradients and Fisher factors into a store.

For every checkpoint c and every example z_i of the stage the checkpoint belongs to, the store
receives G̃_c[i] = P ∇ℓ(z_i; θ_c) and the Fisher factors ũ_i = P ∇ℓ(x_i, ŷ_i; θ_c) with ŷ_i drawn
from the model's predictive distribution (docs/concepts/source.md §4). The final checkpoint is featurized
on every stage's data (baselines such as TRAK use it), and there the measurement gradients
P ∇f(z_i; θ_T) of the training examples are stored too (TRAK's Gauss–Newton of the margin). Work is
done in row chunks that are
written whole and then marked complete, so an interrupted run resumes where it stopped and ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from source_proj import __version__
from source_proj.distributed import Ranks, Shard, rank_device, ranks, run_sharded, together
from source_proj.errors import NumericalError, StoreError, TaskError, first_line
from source_proj.featurize.arguments import (
    FeaturizeArguments,
    FisherRows,
    ProjectionArguments,
    as_stage_datasets,
    basis_arguments,
    default_device,
    fisher_block,
    projected_fisher_at,
    projection_differences,
    resolve_curvature,
    resolve_fisher_examples,
    typed_text,
)
from source_proj.featurize.basis import BasisPass, NoBasis, estimate_basis
from source_proj.featurize.factors import (
    ChunkFactors,
    FactorCollector,
    chunk_values,
    describe_layers,
    factor_arrays,
    kronecker_layers,
)
from source_proj.featurize.grow import finished_before_growth, growth_refusal, record_growth
from source_proj.featurize.loss_scale import loss_scale_ratios, loss_scale_warning
from source_proj.featurize.plan import PROBE, FeaturizePlan, NotPrepared, Unit, featurize_plan
from source_proj.featurize.sharded import ShardedParameters
from source_proj.featurize.windows import is_captured
from source_proj.projection.base import Projector, RademacherProjector
from source_proj.projection.eigen import EigenBasis
from source_proj.projection.factored import FactoredProjector
from source_proj.projection.transform import GradientTransform
from source_proj.store.provenance import (
    REFERENCE_BATCH,
    check_checkpoints,
    check_data,
    check_model_values,
    data_digest,
    data_fingerprint,
    describe_provenance,
    load_reference_batch,
    model_errors,
    model_fingerprint,
    other_selection,
    reference_batch,
    save_reference_batch,
)
from source_proj.store.store import Store, ckpt_key, is_store, shard_chunks_for
from source_proj.store.writer import ChunkWriter
from source_proj.tasks.data import loader
from source_proj.tasks.draws import DRAWS_ID, FisherDraws
from source_proj.tasks.gradients import PerExampleGradients, batch_size, move_batch
from source_proj.tasks.task import Task, check_model_and_task, check_task_smoothing
from source_proj.trajectory.optimizers import check_optimised
from source_proj.trajectory.recorder import Checkpoint, Trajectory, incomplete_run, unwrap_model


def _has_features(path: str) -> bool:
    """Whether the store at ``path`` holds a finished work unit (kept when a new store's run fails)."""
    try:
        store = Store.open(path)
        return any(len(store.pending_chunks(n)) < store.num_chunks(n) for n in store.progress_arrays("grads/"))
    except Exception:
        return is_store(path)


def featurize(
    trajectory: Trajectory | str | Path,
    model: nn.Module,
    task: Task,
    train_data: Dataset | Mapping[str, Dataset],
    store_path: str | Path,
    *,
    projection: ProjectionArguments = ProjectionArguments(),
    options: FeaturizeArguments = FeaturizeArguments(),
    overwrite: bool = False,
    spec: str | None = None,
    progress: bool = True,
    shard: Shard | None = None,
    grow: bool = False,
    command: str | None = None,
) -> Store:
    """Project every checkpoint's per-example training gradients into a store.

    Args:
        trajectory: the recorded run (or its directory).
        model: the architecture; each checkpoint's weights are loaded into a copy of it.
        task: loss, measurement and parameter selection.
        train_data: the training set (or a dict ``stage → dataset``), in training order.
        store_path: where the store is written (a directory, or a URL such as ``s3://bucket/run.sp``);
            an unfinished store there is resumed.
        projection: projection kind, dimension and seed.
        options: batch sizes, chunking, Fisher mode, device.
        overwrite: replace an existing store of other settings, or a finished one.
        spec: path of the experiment spec file that built the inputs (lets the CLI re-create them).
        progress: show a progress bar.
        shard: compute only this shard of the work, as one of several independent processes
            (a SLURM array task). Under an initialised ``torch.distributed`` process group with
            several ranks (torchrun) the ranks split the work without it; every rank calls featurize,
            with the same arguments. See ``distributed.py``.
        grow: the store holds an earlier part of this run (it trained further: more checkpoints, new
            stages): add what is new, computing only the new checkpoints' work (see ``grow.py``). The
            fitted methods are dropped; fit again.
        command: the command line that featurizes this store, its paths left out (the CLI records its own options),
            kept so that ``verify --repair`` and fit's messages print it to resume or recompute what is missing.

    Returns:
        The store, with ``grads/<stage>/<ckpt>`` of shape ``[N_stage, k]`` for every checkpoint
        (``options.checkpoint_steps``: every chosen one; once every shard has finished).

    Every checkpoint is checked (present, intact, fitting the model, finite) before anything is
    written. The store is locked while featurize runs; a resumed run first re-checks the crc of the
    chunks already written and recomputes damaged ones. If the call fails before it finishes a
    work unit of a new store, the store is removed.
    """

    def set_up() -> _Featurize:
        check_model_and_task(model, task)
        run = trajectory if isinstance(trajectory, Trajectory) else Trajectory.load(trajectory)
        if options.checkpoint_steps is not None:
            run = run.select(options.checkpoint_steps)
        if not run.complete:
            raise incomplete_run(run.path)
        bare = unwrap_model(model)  # the recorder saved the model inside DataParallel, DDP or torch.compile's wrapper
        path = str(store_path)
        return _Featurize(run, bare, task, train_data, path, projection, options, spec, progress, group, grow)

    group = ranks(shard)
    job = together(set_up)  # a rank whose run, model or device is refused stops every rank, not only itself
    job.overwrite, job.command = overwrite, command
    if job.lockstep is not None:
        job.set_up_together(group)
    run_sharded(job.path, job, group, overwrite=overwrite, keep_new=_has_features)
    return Store.open(job.path, writable=True)


class _Featurize:
    """featurize as a sharded job (``distributed.ShardedJob``): everything but the store is built here."""

    def __init__(
        self,
        trajectory: Trajectory,
        model: nn.Module,
        task: Task,
        train_data: Dataset | Mapping[str, Dataset],
        path: str,
        projection: ProjectionArguments,
        options: FeaturizeArguments,
        spec: str | None,
        progress: bool,
        group: Ranks,
        grow: bool,
    ) -> None:
        self.trajectory, self.model, self.task, self.options, self.path = trajectory, model, task, options, path
        self.asked = options  # as given: ``self.options`` resolves "auto" (``_setup``), refusals name what was typed
        self.grow = grow
        self.projection, self.spec = projection, spec
        self.datasets = as_stage_datasets(train_data, trajectory)
        check_task_smoothing(task, [(stage.name, stage.label_smoothing) for stage in trajectory.stages])
        self.device = rank_device(default_device(options.device), group)
        self.lockstep = group if options.shard_parameters and not group.single else None
        self.shards: ShardedParameters | None = None
        if self.lockstep is not None:
            _check_shardable(group, projection, options)
            self.work_model = copy.deepcopy(model).cpu()
            self.shards = ShardedParameters(self.work_model, self.device)
        else:
            self.work_model = copy.deepcopy(model).to(self.device)
        # Ranks of a process group show one progress bar: rank 0's, but for the chunks (the busiest rank's: see
        # ``_compute``); independent shards each show theirs.
        self.progress = progress and (group.leader or not group.coordinated)
        self.show_work = progress
        self._meta: dict[str, Any] | None = None
        self._fisher_layouts: dict[tuple[str, int], FisherRows] = {}  # (stage, rows) → the rows its Fisher keeps
        self.overwrite = False  # the eigen basis of a store being replaced is estimated again
        self.command: str | None = None  # the command line that featurizes the store (meta["command"])
        self._checkpoints_checked = False
        self._data_fingerprint: dict[str, dict[str, Any]] | None = None
        self._unsteady: set[str] = set()  # stages whose data read differently twice: warned of once per featurize

    @property
    def meta(self) -> dict[str, Any]:
        """The store's metadata for these inputs."""
        return self._setup()

    def _setup(self) -> dict[str, Any]:
        """Build the projector and gradients (once; after ``prepare`` has checked the checkpoints,
        so a bad checkpoint is reported before a setting the checkpoints do not fit) and the metadata."""
        if self._meta is None:
            options, trajectory = self.options, self.trajectory
            self.names = self.task.select_parameters(self.work_model)
            for stage in trajectory.stages:
                check_optimised(stage.name, stage.optimizer.get("groups", []), self.names)
            params = dict(self.work_model.named_parameters())
            shapes = [(n, tuple(params[n].shape)) for n in self.names]
            self.grads_fn = PerExampleGradients(
                self.work_model, self.task, self.names, vmap_chunk=options.vmap_chunk, precision=options.precision
            )
            if self.shards is not None:
                self.grads_fn.device = self.device  # the parameters are placeholders between layers
            data_print = self._data_print()
            # What θ_T computes on a fixed reference batch, and what the data hold (see provenance.py).
            with model_errors("the training data"):
                self.reference = reference_batch(self.datasets)
            # The other stages' examples are run too: one the model cannot run is refused before anything is written.
            batches = [("the training examples", self.reference)]
            for stage in list(self.datasets)[1:]:
                with model_errors(f"the training data of stage {stage!r}"):
                    batches.append((f"the training data of stage {stage!r}", reference_batch(self.datasets, stage)))
            fingerprint = {
                "model": {
                    "step": trajectory.final_checkpoint.step,
                    "values": self._model_values(trajectory.final_checkpoint, batches)[0],
                },
                "data": data_print,
            }
            self.basis = None
            if self.projection.kind == "eigen":
                try:
                    with model_errors("the training data"):
                        self.basis = self._eigen_basis()
                except NoBasis as err:
                    if self.shards is not None:  # the dense fallback would need whole weights
                        raise TaskError(f"{err} Sharded parameters need the eigen or factored projection: featurize "
                                        "this model unsharded.") from err  # fmt: skip
                    warnings.warn(
                        f"{err} Featurize uses the dense 'rademacher' projection instead; the store records it.",
                        stacklevel=4,
                    )
                    self.projection = replace(self.projection, kind="rademacher", adam_rank=1)  # D exactly there
            self.projector = self.projection.projector(shapes, self.work_model, self.basis)
            _warn_dense_on_cpu(self.projector, self.device)
            if self.shards is not None:
                _check_factored(self.projector)
                # The once-per-projector check materialises every layer's per-example gradients, which sharded
                # parameters never hold; a weight used outside its layer fails on its placeholder instead.
                self.projector._checked = True  # type: ignore[attr-defined]
            curvature = resolve_curvature(options.curvature, self.projector.describe()["kind"], self.projector.dim)
            recorded = self._recorded_featurize()
            examples = resolve_fisher_examples(options, self.projector.dim, [len(d) for d in self.datasets.values()],
                                               recorded)  # fmt: skip
            if self.shards is not None and examples is not None:  # "auto" resumes the share the store took
                raise TaskError(
                    f"The store at {self.path} takes the Fisher of {examples} examples per stage (fisher_examples, as "
                    "it was featurized), which sharded parameters cannot (the ranks take each Fisher batch together): "
                    "resume it without --shard-parameters, or featurize a new store with them."
                )
            self.options = options = replace(options, curvature=curvature, fisher_examples=examples)  # type: ignore[arg-type]
            self.fisher_block = fisher_block(self.path, options, recorded)
            self.directions = _fisher_directions(self.grads_fn, self.task, self.datasets, options, self.device)
            self.collector = None
            kronecker = None
            if options.curvature in ("kfac", "both"):
                layers, diagonal = kronecker_layers(self.work_model, self.names)
                # The empirical Fisher's factors are of the training loss at the observed labels (smoothed or not).
                quantity = "loss" if options.fisher == "empirical" else "fisher"
                self.collector = FactorCollector(self.grads_fn, layers, diagonal, quantity=quantity)
                kronecker = describe_layers(layers, diagonal)
            k = self.projector.dim
            self._meta = {
                "library_version": __version__,
                "params": [[n, list(s)] for n, s in shapes],
                "projection": self.projector.describe(),
                "task": self.task.describe(),
                "featurize": {
                    "chunk_rows": options.chunk_rows,
                    "fisher": options.fisher,
                    **({"fisher_draws": DRAWS_ID} if options.fisher == "sampled" else {}),
                    "seed": options.seed,
                    "precision": options.precision,
                    "fisher_directions": self.directions,
                    "measurement": options.measurement,
                    "curvature": options.curvature,
                    "kronecker": kronecker,
                    **options.fisher_meta(self.fisher_block),
                },
                "trajectory": {
                    "path": str(Path(trajectory.path).resolve()),
                    "fingerprint": trajectory.fingerprint(),
                    "stages": [s.describe() for s in trajectory.stages],
                    "checkpoints": [c.step for c in trajectory.checkpoints],
                },
                **({} if self.basis is None else {"basis_arguments": basis_arguments(self.projection)}),
                "spec": self.spec,
                **({} if self.command is None else {"command": self.command}),
                "provenance": describe_provenance(self.model, trajectory, self.device, options.batch_size),
                "layout": {"shard_chunks": options.shard_chunks or shard_chunks_for(4 * options.chunk_rows * k)},
                "fingerprint": fingerprint,
            }
        return self._meta

    def _data_print(self) -> dict[str, dict[str, Any]]:
        """The training data's fingerprint (``data_fingerprint``), computed once."""
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self.datasets)
        return self._data_fingerprint

    def _after_stop(self, old: Mapping[str, Any]) -> str | None:
        """What featurize does with a store (metadata ``old``) whose featurize stopped on a gradient that was not
        finite (``meta["nonfinite"]``, written by ``_compute``), now that some of these training data are not those it
        was featurized with (``_changed_stages``): the data were fixed, so what they may have changed is done again.
        ``"afresh"``: the whole store starts afresh, nothing in it trusted to match the fixed data. ``"growth"``: a
        grown store of this very run whose changed stages are none that the work it had finished before its latest
        growth read (``finished_before_growth``; a new stage's data, say): that work is kept and only what the growth
        took on is done again (``_redo_changed``). ``"stages"``: a store of this very run with no work finished before
        a growth, whose features read no stage's data but their own (a random projection: no eigen basis, no
        segmentation cut where a probe of the data said), where the fix left the first stage alone (its examples
        fingerprint the model): the unchanged stages' work is kept, the changed stages' done again (``_redo_changed``).
        ``None``: not stopped so, or the same data (it
        resumes, and stops at the same example again)."""
        mark = old.get("nonfinite")
        if not mark:
            return None
        changed = self._changed_stages(old, mark)
        if not changed:
            return None
        if not self._same_run(old):
            return "afresh"  # another run (or one grown further): not the growth the store stopped in
        kept = {stage for stage, _ in finished_before_growth(old, self.trajectory)}
        if kept:
            return "growth" if not changed & kept else "afresh"
        stages = [stage["name"] for stage in old["trajectory"]["stages"]]
        # The eigen basis, and a probed segmentation (by the preconditioners or segment means it scales), read every
        # stage's data, a random projection none; the first stage's examples fingerprint the model (its reference
        # batch, which the store keeps).
        read_all = (old.get("projection") or {}).get("kind") == "eigen" or (old.get("segmentation") or {}).get("view")
        return "afresh" if read_all or stages[0] in changed else "stages"

    def _changed_stages(self, old: Mapping[str, Any], mark: Mapping[str, Any]) -> set[str]:
        """The stages whose training data are not those the store (metadata ``old``) recorded: by their fingerprint,
        or by the digest of the example featurize stopped at (``mark``), which a large set's sampled fingerprint may
        not read."""
        changed = set()
        stage, row = mark.get("stage"), mark.get("row")
        data = self.datasets.get(stage)
        if data is not None and row is not None and row < len(data):  # type: ignore[arg-type]
            if data_digest(data, [row]) != mark.get("sha256"):
                changed.add(stage)
        printed = self._data_print()
        for name, entry in printed.items():
            try:
                check_data(self.path, old, {name: self.datasets[name]}, fingerprint={name: entry},
                           warned=self._unsteady)
            except TaskError:
                changed.add(name)
        return changed

    def _model_values(
        self, checkpoint: Checkpoint, batches: Sequence[tuple[str, Any]]
    ) -> list[dict[str, list[float | None]]]:
        """What the model computes at ``checkpoint`` on each of ``batches`` (``(what, batch)``: what names the batch if
        the model cannot run it), by ``model_fingerprint``."""
        whole, device = self._whole_at(checkpoint)
        return [model_fingerprint(whole, self.task, batch, device, what) for what, batch in batches]

    def _whole_at(self, checkpoint: Checkpoint) -> tuple[nn.Module, torch.device]:
        """The model holding ``checkpoint``'s weights, and the device it runs on (sharded parameters are placeholders
        between layers: then a whole copy, on the CPU)."""
        whole = self.work_model if self.shards is None else copy.deepcopy(self.model).cpu()
        self.trajectory.load_into(whole, checkpoint)
        return whole, self.device if self.shards is None else torch.device("cpu")

    def _check_new_examples(self, stages: Sequence[str]) -> None:
        """Refuse, before a store grows, an example of a new stage whose training loss at the grown run's final
        checkpoint is not finite (a NaN input) or cannot be taken (a label out of range): found in its gradients
        only after the store had switched to the grown run, it left the store's fit dropped and its data fingerprint
        that of the bad examples, so that the mended data were refused. One forward pass over each new stage."""
        if not stages:
            return
        final = self.trajectory.final_checkpoint
        whole, device = self._whole_at(final)
        whole.eval()
        bound = self.task.bind(whole)
        for stage in stages:
            row = 0
            what = f"the training data of stage {stage!r}"
            for batch in loader(self.datasets[stage], batch_size=self.options.batch_size):
                batch = move_batch(batch, device)
                with torch.no_grad(), model_errors(what):
                    losses = bound.loss(bound.forward(whole, batch), batch).reshape(-1)
                bad = ~torch.isfinite(losses)
                if bad.any():
                    raise NumericalError(
                        f"The training loss of example {row + int(torch.nonzero(bad)[0, 0])} of the new stage "
                        f"{stage!r} is NaN or infinite at the run's final checkpoint {final.file}, so the store at "
                        f"{self.path} does not grow (it is left as it was); check that example's input and label."
                    )
                row += losses.shape[0]

    def set_up_together(self, group: Ranks) -> None:
        """Sharded parameters: every rank sets up (``_setup``) before rank 0 prepares the store, since the eigen
        projection's basis pass gathers each layer on every rank. Each runs the same pass over the same seeded
        draw, so each holds the basis one process estimates; a failure on any rank stops them all. Rank 0 checks the
        checkpoints first, as it would in ``prepare``; the other ranks take part in that step's agreement only."""
        nothing: Callable[[], None] = lambda: None  # noqa: E731
        for step in (self._check_checkpoints if group.leader else nothing, self._setup):  # as many agreements each
            error = None
            try:
                step()
            except BaseException as err:  # every rank learns of it (``Ranks.agree``), none waits in a gather
                error = err
            group.agree(error)

    def _check_checkpoints(self) -> None:
        """Every checkpoint loads and is finite (``check_checkpoints``), once: a bad one is reported before any
        setting the checkpoints do not fit."""
        if not self._checkpoints_checked:
            whole = self.work_model if self.shards is None else copy.deepcopy(self.model).cpu()
            check_checkpoints(self.trajectory, whole, self.progress)
            self._checkpoints_checked = True

    def _warn_loss_scale(self) -> None:
        """Warn where the recorded steps' gradients were far larger than the batch mean of the task's loss gives
        (``loss_scale.py``): a loss summed over the batch. Once per store: not where featurize resumes one (the
        featurize that began it checked), nor with sharded parameters (placeholders between layers)."""
        if self.shards is not None or not self.trajectory.gradient_norms:
            return
        if not self.grow:
            with contextlib.suppress(StoreError):
                if self._kept() is not None:
                    return  # a store this job resumes: the featurize that began it checked the run
        try:
            ratios = loss_scale_ratios(self.trajectory, self.work_model, self.task, self.names, self.datasets,
                                       self.device)  # fmt: skip
        except Exception as err:  # a check, not featurize's work: a model its training-mode pass cannot run (reentrant
            # gradient checkpointing there refuses autograd.grad) is featurized unchecked, and featurize's own passes
            # report what is wrong with the examples
            warnings.warn(
                f"Featurize could not check that the run trained on the batch mean of the task's loss "
                f"({type(err).__name__}: {first_line(err)}), and goes on without the check.",
                stacklevel=4,
            )
            return
        message = loss_scale_warning(ratios)
        if message is not None:
            warnings.warn(message, stacklevel=4)

    def _kept(self) -> Store | None:
        """The store this job resumes or grows, or ``None`` where it writes a new one: none there, ``overwrite``, or
        one that starts afresh (``_after_stop``)."""
        if self.overwrite or not is_store(self.path):
            return None
        store = Store.open(self.path)
        return None if self._after_stop(store.meta) == "afresh" else store

    def _recorded_featurize(self) -> dict[str, Any] | None:
        """The ``meta["featurize"]`` of the store this job resumes or grows (``None``: it writes a new one)."""
        with contextlib.suppress(StoreError):
            store = self._kept()
            return None if store is None else store.meta.get("featurize")
        return None

    def _eigen_basis(self) -> EigenBasis:
        """The eigen projection's basis: the store's own when it was estimated with the same projection
        arguments (a resumed featurize, a grown store, or inputs that changed otherwise, which the store's
        fingerprints then name), else estimated from the run (``basis.py``)."""
        projection, trajectory = self.projection, self.trajectory
        pass_ = BasisPass.of(projection, self.grads_fn, self.task, self.datasets, self.names,
                             batch_size=self.options.batch_size, device=self.device)  # fmt: skip
        inputs = projection.basis_inputs(self.names, *pass_.inputs_cut())
        stored: EigenBasis | None = None
        store = self._kept()
        if store is not None:
            desc = store.meta.get("projection") or {}
            basis = desc.get("basis") or {}
            # A store's basis estimated from more than asked for estimates what this one would, and its rows were
            # projected with it, so it keeps it: one of every position where none was sampled (``positions``
            # unrecorded), or of every example drawn where the layers' budget would cut the subsets (a store
            # featurized before ``basis_layer_positions``, or with it off).
            whole = replace(projection, basis_layer_positions=None).basis_inputs(self.names)
            every = replace(projection, basis_positions=None, basis_layer_positions=None).basis_inputs(self.names)
            if desc.get("kind") == "eigen" and (
                basis.get("inputs") in (inputs, whole) or (basis.get("inputs") == every and "positions" not in basis)
            ):
                with contextlib.suppress(StoreError):  # half-written: estimate it again
                    stored = EigenBasis.read(store, basis)
            else:
                # The basis estimated below cannot be the store's, so ``_refuse_other_settings`` would refuse the
                # store (its projection differs) after the pass (minutes on a large model): what it would name that
                # needs no projector, it names now.
                self._refuse_before_basis(store.meta)
        # Sharded parameters: every rank runs the same pass over the same seeded draw, so the ranks gather each
        # layer together, and each estimates the basis one process would (the gathered weights are the same). The
        # ranks agree first: where one rank finds no basis to read (its path holds no store), every rank estimates it,
        # else the others would leave it alone in its gathers.
        if self.lockstep is not None and self.lockstep.most(int(stored is None)):
            stored = None
        if stored is not None:
            return stored
        with self.shards.saving() if self.shards is not None else contextlib.nullcontext():
            return estimate_basis(trajectory, trajectory.checkpoints, pass_, inputs=inputs, progress=self.progress,
                                  per_stage=projection.basis_checkpoints)  # fmt: skip

    def _refuse_before_basis(self, old: dict[str, Any]) -> None:
        """``_refuse_other_settings``' refusals of a store (metadata ``old``) whose eigen basis cannot be the one about
        to be estimated, made before the basis pass where they need no projector: another run's store with arguments
        other than it was featurized with, the store's inputs (``_refuse_other_inputs``), and the arguments asked for
        that differ from its own (``_typed_differences``), in the same sentences. Where none of these is found (a
        store featurized before its basis arguments were recorded, other data or another model), the pass runs and
        the refusal follows it."""
        same_run = self._same_run(old)
        if same_run or self.grow:
            self._refuse_other_inputs(old)
        typed = self._typed_differences(old, ("projection", "featurize"))
        if not typed:
            return
        details, mentions = typed_text(typed)
        if not same_run and not self.grow:
            raise self._from_another_run(old, details, mentions)
        raise self._other_settings(details, grow=self.grow, mentions=mentions)

    def _typed_differences(self, old: Mapping[str, Any], keys: Sequence[str]) -> list[tuple[str, Any, Any]]:
        """The arguments asked for that differ from those the store (metadata ``old``) was featurized with, among the
        settings ``keys`` (``"projection"``, ``"featurize"``): each ``(field, the store's value, the value asked)``,
        the field as ``"ProjectionArguments.dim"`` (``mention`` writes it as typed in Python, the CLI as its option).
        The eigen projection's where it is asked for (``projection_differences``: its k, seed, Adam rank and basis
        arguments as recorded, or the k and seed of a store of its 'rademacher' fallback, or another kind), and the
        featurize options the store
        records as given (``curvature`` and ``fisher_examples`` where they resolve to one value without the
        projector). Needs no projector: ``_refuse_before_basis`` names them before the basis pass."""
        projection = self.projection
        eigen = "projection" in keys and projection.kind == "eigen"
        differing = projection_differences(projection, old) if eigen else []
        recorded = old.get("featurize")
        if "featurize" not in keys or not recorded:
            return differing
        asked = self.asked
        resolved = {name: getattr(asked, name) for name in ("chunk_rows", "fisher", "seed", "precision", "measurement")}
        if asked.fisher_examples != "auto":  # "auto" resolves to a kept store's own share
            resolved["fisher_examples"] = asked.fisher_examples
        curvature = self.options.curvature  # resolved once the projector is (``_setup``)
        if curvature == "auto" and projection.kind == "eigen":
            curvature = resolve_curvature("auto", "eigen", projection.dim)
        if curvature != "auto":
            resolved["curvature"] = curvature
        defaults = {"precision": "fp32", "curvature": "projected", "fisher_examples": None}
        for name, value in resolved.items():
            was = recorded.get(name, defaults.get(name))
            if was != value:
                differing.append((f"FeaturizeArguments.{name}", was, getattr(asked, name)))
        return differing

    def _from_another_run(self, old: Mapping[str, Any], settings: str, mentions: Sequence[tuple[str, object]] = ()
                          ) -> StoreError:  # fmt: skip
        """The refusal of a store featurized from another run with other settings (``settings``, in words)."""
        where = (old.get("trajectory") or {}).get("path")
        return _mentioning(StoreError(
            f"The store at {self.path} was featurized from another run ({where}) with other settings ({settings}); "
            "pass --force (overwrite=True) to replace it, or use another store path."
        ), mentions)  # fmt: skip

    def _other_settings(self, details: str, *, grow: bool = False, mentions: Sequence[tuple[str, object]] = ()
                        ) -> StoreError:  # fmt: skip
        """The refusal of a store featurized with other settings than asked (``details``: as ``_detail`` or
        ``typed_text`` name them, the latter with the arguments it ``mentions``), to be grown (``grow``) or
        resumed."""
        if grow:
            return _mentioning(StoreError(
                f"The store at {self.path} cannot grow with other settings than it was featurized with ({details}); "
                "repeat the options of its first featurize (`source-proj info` shows them) with --grow."
            ), mentions)  # fmt: skip
        return _mentioning(StoreError(
            f"The store at {self.path} was featurized with other settings ({details}); pass --force (overwrite=True) "
            "to replace it, or use another store path."
        ), mentions)  # fmt: skip

    def _plan(self, store: Store, overwrite: bool = False, record: bool = False) -> FeaturizePlan:
        self._setup()
        return featurize_plan(self.trajectory, store, self.datasets, self.names, self.options, overwrite, record=record)

    def prepare(self, overwrite: bool) -> None:
        self._check_checkpoints()
        self._setup()
        self._warn_loss_scale()
        store = self._open_or_create(overwrite)
        if self.basis is not None:
            for name, values in self.basis.arrays():
                if not store.is_complete(name):
                    store.write_whole(name, values)
        plan = self._plan(store, overwrite, record=True)
        if not plan.store.is_complete("trajectory/lr"):
            plan.store.write_whole("trajectory/lr", self.trajectory.lr.astype(np.float64))
        if "model" in (plan.store.meta.get("fingerprint") or {}) and not plan.store.is_complete(REFERENCE_BATCH):
            save_reference_batch(plan.store, self.reference)
        if plan.probe:  # the automatic segmentation's probe (a few hundred rows): computed here, whole
            self._compute(plan, self._items(plan, create=True), heal=True)
            plan = self._plan(plan.store, overwrite, record=True)
        self._items(plan, create=True)

    def ready(self) -> bool:
        # Asked before a rank's work, of a store another process prepares (replaced, if asked to): a rank that sets
        # up only now (not rank 0 of a process group) reads its eigen basis and settings, never estimates them again.
        self.overwrite = False
        if not is_store(self.path):
            return False
        store = Store.open(self.path)
        if self._after_stop(store.meta):
            return False  # the store (or its growth) starts afresh when it is prepared
        if self.grow and _differing(store.meta, self.meta) == ["trajectory"]:
            return False  # the store grows when it is prepared
        self._refuse_other_settings(store.meta)
        try:
            plan = self._plan(store)
        except NotPrepared:
            return False
        return all(
            store.has(name) and store.has(f"progress/{name}")
            for unit in plan.units
            for name, _, _ in self._arrays(unit)
        )

    def work(self, group: Ranks) -> None:
        store = Store.open(self.path, writable=True)
        self._refuse_other_settings(store.meta)
        plan = self._plan(store)
        per_shard = store.shard_chunks  # a shard file is written by one process: split at shard boundaries

        def file(item: tuple[Unit, int]) -> tuple[int, int]:
            return id(item[0]), item[1] // per_shard

        items = self._items(plan)
        if self.lockstep is None:
            mine = group.shard.take_groups(items, file)
        else:  # the ranks go through the units together: each takes its part of every unit
            runs = [list(run) for _, run in itertools.groupby(items, key=lambda item: id(item[0]))]
            mine = [item for run in runs for item in group.shard.take_groups(run, file)]
        self._compute(plan, mine, heal=not store.meta.get("featurized"), group=group)

    def finish(self) -> bool:
        store = Store.open(self.path, writable=True)
        plan = self._plan(store)
        if any(store.pending_chunks(name) for unit in _open_units(plan) for name, _, _ in self._arrays(unit)):
            return False
        staged = store.staged_arrays()
        for name in store.progress_arrays():
            if name in staged and not name.startswith("methods/"):
                store.pack(name, drop_staging=False)  # shards a kill left unpacked, then the staged chunks go
        store.drop_empty_staging()  # once: it reads every node still staged
        old = store.meta.get("products") or {}
        products = {"checkpoints": bool(old.get("checkpoints")) or self.options.checkpoints,
                    "segment_means": bool(old.get("segment_means")) or self.options.segment_means}
        if not store.meta.get("featurized") or old != products or store.meta.get("nonfinite"):
            store.update_meta(featurized=True, products=products, nonfinite=None)
        return True

    def _open_or_create(self, overwrite: bool) -> Store:
        """The store to write: created (replacing any store there with ``overwrite``), or the existing
        one if it was featurized with these settings, this model and these data."""
        if overwrite:
            return Store.create(self.path, self.meta, overwrite=True)
        try:
            existing = Store.open(self.path, writable=True)
        except StoreError:
            return Store.create(self.path, self.meta)
        after = self._after_stop(existing.meta)
        if after == "afresh":
            warnings.warn(
                f"The store at {self.path} stopped on a NaN or infinite gradient and its training data have changed "
                "since, so nothing in it matches them: featurizing it afresh.",
                stacklevel=2,
            )
            return Store.create(self.path, self.meta, overwrite=True)  # nothing of it read (``_kept``): not its basis
        if after in ("growth", "stages"):
            self._redo_changed(existing, after)
        if self.grow and _differing(existing.meta, self.meta) == ["trajectory"]:
            why = growth_refusal(existing.meta, self.trajectory)
            if why is not None:
                raise StoreError(
                    f"The store at {self.path} cannot grow into the run at {self.trajectory.path}: {why}; featurize "
                    "that run into a new store (or pass --force to replace this one)."
                )
            self._check_grown_inputs(existing)
            old_stages = {stage["name"] for stage in existing.meta["trajectory"]["stages"]}
            self._check_new_examples([s.name for s in self.trajectory.stages if s.name not in old_stages])
            record_growth(existing)
            existing.delete("trajectory/lr")
            old_final = ckpt_key(existing.meta["trajectory"]["checkpoints"][-1])
            for stage in existing.meta["trajectory"]["stages"]:  # the old θ_T's: the grown run's final one replaces it
                existing.delete(f"measurement/{stage['name']}/{old_final}")
            meta = self.meta  # θ_T moved, and a new stage brings new data: the fingerprints follow the grown run
            existing.update_meta(
                trajectory=meta["trajectory"], provenance=meta["provenance"], fingerprint=meta["fingerprint"],
                featurized=False,
            )
            return existing
        self._refuse_other_settings(existing.meta)
        if existing.meta["trajectory"]["path"] != self.meta["trajectory"]["path"]:  # the run moved: the store follows
            existing.update_meta(trajectory=self.meta["trajectory"])
        return existing

    def _redo_changed(self, store: Store, after: str) -> None:
        """Drop the work of a store (``_after_stop``: its featurize stopped on a gradient that was not finite, and the
        data were fixed) that read the changed data, keeping the rest: ``after`` ``"growth"``, what the grown store
        took on since its latest growth (every array of the units it had not finished before, the segmentation probe's,
        and a segmentation that probe chose, ``plan.py``); ``"stages"``, the arrays of the changed stages' units (and
        of a probe that had not cut yet). Then the store records the fixed data, and what was dropped is done again
        on them. The store must be of these settings and this model (``_refuse_other_settings``) before anything is
        dropped."""
        fixed = {**store.meta, "fingerprint": {**store.meta["fingerprint"], "data": self._data_print()}}
        self._refuse_other_settings(fixed)
        try:
            units = _open_units(self._plan(store))
        except NotPrepared:  # the segmentation probe had not finished: it began no unit
            units = []
        changed = sorted(self._changed_stages(store.meta, store.meta["nonfinite"]))
        if after == "stages":
            units = [unit for unit in units if unit.stage in changed]
            warnings.warn(
                f"The store at {self.path} stopped on a NaN or infinite gradient, and the training data of stage(s) "
                f"{changed} have changed since; its projection read no data, so it keeps the work of the other stages "
                "and featurizes those stages afresh.",
                stacklevel=3,
            )
        else:
            warnings.warn(
                f"The store at {self.path} stopped on a NaN or infinite gradient in what it took on as it grew, and "
                f"the training data of stage(s) {changed} have changed since, which the work it had finished before it "
                "grew did not read: keeping that work and featurizing the rest afresh.",
                stacklevel=3,
            )
        names = {name for unit in units for name, _, _ in self._arrays(unit)} | set(store.progress_arrays(PROBE))
        probed = (store.meta.get("segmentation") or {}).get("view") is not None  # cut where the probe's data said
        if probed:
            names |= set(store.progress_arrays("preconditioner/"))
        for name in sorted(names):
            store.delete(name)
        # Last: a rerun killed before this line finds the mark and drops the same again.
        dropped = {"segmentation": None} if probed else {}
        store.update_meta(fingerprint=fixed["fingerprint"], nonfinite=None, **dropped)

    def _check_grown_inputs(self, store: Store) -> None:
        """Refuse to grow a store with other data for its stages, or a model that computes something else at its final
        checkpoint (the grown run's θ_T is a later one): the store's features were taken with its own."""
        recorded = store.meta
        if not check_data(self.path, recorded, self.datasets, fingerprint=self.meta["fingerprint"]["data"],
                          warned=self._unsteady):
            return
        model = (recorded.get("fingerprint") or {}).get("model")
        batch = load_reference_batch(store)
        if model is not None and batch is not None:
            # The store's θ_T, whether or not the checkpoints chosen now (``checkpoint_steps``) hold it.
            final = self.trajectory.truncated(model["step"]).final_checkpoint
            (values,) = self._model_values(final, [("the training examples", batch)])
            check_model_values(self.path, recorded, values)

    def _refuse_other_settings(self, old: dict[str, Any]) -> None:
        """Refuse to resume or reuse a store written with other settings, another library version, a model
        that computes something else, or other training data. The arguments asked for that differ are named as typed
        (``_typed_differences``), the other settings by their fields (``_detail``)."""
        meta = self.meta
        differing = _differing(old, meta)
        same_run = self._same_run(old)
        if differing == ["trajectory"] and not same_run:
            raise StoreError(
                f"The store at {self.path} was featurized from another run (or an earlier part of this one); pass "
                "--grow (grow=True) if this run continued the store's, --force (overwrite=True) to replace it, or use "
                "another store path."
            )
        others = [key for key in differing if key != "trajectory"]
        if not same_run and not self.grow:  # the run's own differences would bury the one that matters
            raise self._from_another_run(old, *self._settings_named(old, others, detailed=False))
        self._refuse_other_inputs(old)
        if self.grow and "trajectory" in differing and others:
            # Growing changes the run; anything else must be as the store was featurized (its projection above all,
            # which a --grow without the first featurize's --dim changes), and replacing the store is not the answer.
            details, mentions = self._settings_named(old, others)
            raise self._other_settings(details, grow=True, mentions=mentions)
        if differing:
            details, mentions = self._settings_named(old, differing)
            raise self._other_settings(details, mentions=mentions)
        # The data first: the model's fingerprint is computed on a batch of them.
        if check_data(self.path, old, self.datasets, fingerprint=meta["fingerprint"]["data"], warned=self._unsteady):
            check_model_values(self.path, old, meta["fingerprint"]["model"]["values"])

    def _settings_named(self, old: Mapping[str, Any], keys: Sequence[str], detailed: bool = True
                        ) -> tuple[str, list[tuple[str, object]]]:  # fmt: skip
        """The settings ``keys`` in which the store (metadata ``old``) differs, in words, and the arguments the words
        mention: each by the arguments asked for that differ in it, as typed (``_typed_differences``), else by its
        differing fields (``_detail``) where ``detailed``, else by its name."""
        typed = self._typed_differences(old, keys)
        parts, mentions = [], []
        for key in keys:  # in the metadata's order
            own = [difference for difference in typed if _SETTING_OF[difference[0].partition(".")[0]] == key]
            if own:
                text, said = typed_text(own)
                parts.append(text)
                mentions += said
            else:
                parts.append(_detail(key, old.get(key), self.meta[key]) if detailed else key)
        separator = "; " if detailed or typed else ", "
        return separator.join(parts), mentions

    def _same_run(self, old: Mapping[str, Any]) -> bool:
        """Whether the store (metadata ``old``) was featurized from this run (or this very part of a grown one): by
        the run's fingerprint, a digest of its index, which holds each checkpoint file's sha256 as recorded (no file is
        read for it)."""
        return (old.get("trajectory") or {}).get("fingerprint") == self.trajectory.fingerprint()

    def _refuse_other_inputs(self, old: dict[str, Any]) -> None:
        """``_refuse_other_settings``' refusals of a store (metadata ``old``) of this run or one it grows that need no
        projector: another library version, another parameter selection, a captured store to grow. ``_eigen_basis``
        makes them before its pass where the store's basis cannot be this one's."""
        if old.get("library_version") != __version__:
            raise StoreError(
                f"The store at {self.path} was featurized by source-proj {old.get('library_version')}, this is "
                f"{__version__}, whose numbers may differ; pass --force (overwrite=True) to featurize it anew, or use "
                "another store path."
            )
        selection = other_selection(old.get("task") or {}, self.task.describe())
        if selection is not None:
            raise StoreError(
                f"The store at {self.path} was featurized with another parameter selection: {selection}, pass --force "
                "(overwrite=True) to replace it, or use another store path."
            )
        if self.grow and is_captured(old):
            raise StoreError(
                f"The store at {self.path} was captured during training, so it grows only as its run trains further: "
                "resume the recorder with a GradientCapture on this store, or featurize the run into another store."
            )

    def _arrays(self, unit: Unit) -> list[tuple[str, tuple[int, int], int]]:
        """``(name, shape, chunk rows)`` of the arrays a unit writes (row chunk i of each belongs to chunk i)."""
        n, k, rows = len(unit.dataset), self.projector.dim, self.options.chunk_rows  # type: ignore[arg-type]
        arrays = [(f"{unit.prefix}grads/{unit.stage}/{unit.key}", (n, k), rows)]
        final = ckpt_key(self.trajectory.final_checkpoint.step)
        projected = projected_fisher_at(self.options.curvature, unit.prefix, unit.key, final)
        if self.options.fisher != "empirical" and projected:
            fisher = f"{unit.prefix}fisher/{unit.stage}/{unit.key}"
            taken = self._fisher_rows(unit)
            arrays.append((fisher, (taken.total * self.directions, k), taken.per_chunk * self.directions))
        if self.collector is not None and not unit.prefix:
            chunks = -(-n // rows)
            shapes = dict(self.collector.shapes)
            for suffix, shape in factor_arrays(self.collector.layers, self.collector.diagonal, shapes):
                arrays.append((f"kfac/{unit.stage}/{unit.key}/{suffix}", (chunks, *shape), 1))
        if _measures(unit, ckpt_key(self.trajectory.final_checkpoint.step), self.options):
            arrays.append((f"measurement/{unit.stage}/{unit.key}", (n, k), rows))
        return arrays

    def _fisher_rows(self, unit: Unit) -> FisherRows:
        """The rows of ``unit``'s data (a stage's, or the segmentation probe's) whose Fisher it stores (kept:
        ``_arrays`` runs for every row chunk of every unit)."""
        key = (unit.stage, len(unit.dataset))  # type: ignore[arg-type]
        if key not in self._fisher_layouts:
            index = [s.name for s in self.trajectory.stages].index(unit.stage)
            self._fisher_layouts[key] = FisherRows.of(self.meta["featurize"], key[1], index)
        return self._fisher_layouts[key]

    def _items(self, plan: FeaturizePlan, create: bool = False) -> list[tuple[Unit, int]]:
        """Every (unit, row chunk) of the plan in a fixed order; ``create``: also create the arrays and
        progress entries still missing."""
        items = []
        for unit in _open_units(plan):
            for name, shape, rows in self._arrays(unit) if create else ():
                plan.store.require_array(name, shape, rows, "float32")
                plan.store.pending_chunks(name)
            chunks = -(-len(unit.dataset) // self.options.chunk_rows)  # type: ignore[arg-type]
            items.extend((unit, chunk) for chunk in range(chunks))
        return items

    def _compute(
        self, plan: FeaturizePlan, items: Sequence[tuple[Unit, int]], heal: bool, group: Ranks | None = None
    ) -> None:
        """Compute and write the unfinished chunks among ``items`` (after re-checking the finished
        ones' crc when ``heal``). Of the ranks of a process group (``group``), the one with the most chunks to compute
        shows its progress (a collective)."""
        store = plan.store
        if heal:
            store.heal_chunks([(name, chunk) for unit, chunk in items for name, _, _ in self._arrays(unit)])
        units = {id(unit): unit for unit, _ in items}.values()
        pending = {name: set(store.pending_chunks(name)) for unit in units for name, _, _ in self._arrays(unit)}
        work = [(unit, chunk) for unit, chunk in items if any(chunk in pending[n] for n, _, _ in self._arrays(unit))]
        progress, pace = self.progress, None
        if group is not None and group.coordinated:
            progress = group.busiest(len(work)) and self.show_work
            if self.lockstep is None:  # (in lock step the ranks agree before each gather)
                pace = (group, group.most(len(work)))
        try:
            _featurize_units(plan, work, self.grads_fn, self.projector, self.task, self.options, self.device,
                             self.work_model, progress, collector=self.collector, lockstep=self.lockstep,
                             shards=self.shards, pace=pace)
        except NumericalError as err:  # a rerun with fixed data starts afresh (``_after_stop``)
            mark: dict[str, Any] = {"error": str(err)}
            if isinstance(err, NonFiniteExample) and err.stage is not None:
                data = self.datasets[err.stage]
                mark.update(stage=err.stage, row=err.row, sha256=data_digest(data, [err.row]))
            store.update_meta(nonfinite=mark)
            raise


def _open_units(plan: FeaturizePlan) -> list[Unit]:
    """The plan's units less those a grown store had finished (durably) before it grew: growing reads
    and re-checks only what is new (``grow.finished_before_growth``)."""
    finished = finished_before_growth(plan.store.meta, plan.trajectory)
    return [unit for unit in plan.units if unit.prefix or (unit.stage, unit.key) not in finished]


def _featurize_units(
    plan: FeaturizePlan,
    work: Sequence[tuple[Unit, int]],
    grads_fn: PerExampleGradients,
    projector: Projector,
    task: Task,
    options: FeaturizeArguments,
    device: torch.device,
    work_model: nn.Module,
    progress: bool,
    *,
    collector: FactorCollector | None = None,
    lockstep: Ranks | None = None,
    shards: ShardedParameters | None = None,
    pace: tuple[Ranks, int] | None = None,
) -> None:
    """Compute and write the row chunks ``work`` of the plan's units (and their Kronecker factors when a
    ``collector`` is given).

    With ``lockstep`` (sharded parameters) every rank visits every unit and runs as many batches of it
    as the busiest rank, discarding the ones it has no rows for: the ranks gather each layer together.
    With ``pace`` (the ranks of a process group, and the most chunks any of them computes) the ranks agree before
    each chunk, and a rank with fewer chunks as often once it is done: a rank that fails stops the others within a
    chunk, where they would otherwise compute the rest of their shards (hours) before they learnt of it.
    """
    store = plan.store
    final = ckpt_key(plan.trajectory.final_checkpoint.step)
    loaded: tuple[Any, ...] | None = None
    transform: GradientTransform | None = None
    scale_name: str | None = None
    stage_index = {s.name: i for i, s in enumerate(plan.trajectory.stages)}
    desc = "featurize (segmentation probe)" if plan.probe else "featurize"
    rows = options.chunk_rows
    runs = [(unit, [chunk for u, chunk in work if u is unit]) for unit in _open_units(plan)]
    saving = shards.saving if shards is not None else contextlib.nullcontext
    # Each chunk is written by a thread of its own while the next is computed (``ChunkWriter``).
    bar = tqdm(total=len(work), desc=desc, unit="chunk", disable=not progress or not work)  # none for no work
    with bar, ChunkWriter(store) as writer:
        # One DataLoader per run of consecutive chunks of a unit: its workers start once and read ahead
        # across the run's chunks (a loader per chunk would restart them every chunk).
        for unit, chunks in runs:
            if not chunks and lockstep is None:
                continue
            if loaded != unit.point:
                plan.load(work_model, unit.point)
                loaded = unit.point
            if scale_name != unit.scale:
                scale = plan.scale(unit.scale, device)
                transform = None if scale is None else projector.scaling(scale)
                scale_name = unit.scale
            size = len(unit.dataset)  # type: ignore[arg-type]
            spans = [(c * rows, min(size, (c + 1) * rows)) for c in chunks]
            own = sum(-(-(stop - start) // options.batch_size) for start, stop in spans)
            idle = lockstep.most(own) - own if lockstep is not None else 0
            batches = iter(_chunk_loader(unit.dataset, spans, options, device))
            where = f"{unit.where}, stage {unit.stage!r}"
            taken = FisherRows.of(plan.store.meta["featurize"], size, stage_index[unit.stage])
            # The sampled labels' key: example i's draws are those of (seed, point, stage, i) whatever its batch.
            key = FisherDraws.key_of([options.seed, *unit.seed, stage_index[unit.stage]])
            for chunk, (start, stop) in zip(chunks, spans, strict=True):
                if pace is not None:
                    pace[0].agree(None)
                factors = collector if collector is not None and not unit.prefix else None
                with saving():
                    try:
                        feats, fisher, measured, sums = _featurize_rows(
                            grads_fn,
                            projector,
                            task,
                            itertools.islice(batches, -(-(stop - start) // options.batch_size)),
                            start,
                            options,
                            key,
                            device,
                            where=where,
                            transform=transform,
                            measure=_measures(unit, final, options),
                            collector=factors,
                            projected_fisher=projected_fisher_at(options.curvature, unit.prefix, unit.key, final),
                            shared_forward=shards is None,
                            fisher_batches=taken.batches(chunk, of=options.batch_size),
                        )
                    except NonFiniteExample as err:  # its row in the stage's data (a probe's rows are a subset's)
                        probe = unit.prefix == PROBE and isinstance(unit.dataset, Subset)
                        err.stage, err.row = unit.stage, int(unit.dataset.indices[err.row]) if probe else err.row
                        raise
                if fisher is not None:
                    writer.write(f"{unit.prefix}fisher/{unit.stage}/{unit.key}", chunk, fisher)
                if sums is not None and factors is not None:
                    for suffix, values in chunk_values(sums, factors.layers, factors.diagonal).items():
                        writer.write(f"kfac/{unit.stage}/{unit.key}/{suffix}", chunk, values)
                if measured is not None:
                    writer.write(f"measurement/{unit.stage}/{unit.key}", chunk, measured)
                writer.write(f"{unit.prefix}grads/{unit.stage}/{unit.key}", chunk, feats)
                bar.update()
            if idle:  # the other ranks' batches gather every layer with this rank: take part, keep nothing
                spare = _chunk_loader(unit.dataset, [(0, min(size, options.batch_size))], options, device)
                with saving():
                    _featurize_rows(
                        grads_fn, projector, task, list(spare) * idle, 0, options, 0, device,
                        where=where, transform=transform, measure=_measures(unit, final, options),
                        collector=collector if not unit.prefix else None,
                        projected_fisher=projected_fisher_at(options.curvature, unit.prefix, unit.key, final),
                        shared_forward=False,
                    )
    if pace is not None:
        for _ in range(pace[1] - len(work)):
            pace[0].agree(None)


class _ChunkBatches(Sampler[list[int]]):
    """Batches of ``batch_size`` consecutive rows that never straddle a chunk: each chunk's rows are
    batched exactly as a loader over that chunk alone would batch them."""

    def __init__(self, spans: Sequence[tuple[int, int]], batch_size: int) -> None:
        self.batches = [
            list(range(i, min(i + batch_size, stop))) for start, stop in spans for i in range(start, stop, batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _chunk_loader(
    dataset: Dataset, spans: Sequence[tuple[int, int]], options: FeaturizeArguments, device: torch.device
) -> DataLoader:
    return loader(
        dataset,
        batch_sampler=_ChunkBatches(spans, options.batch_size),
        num_workers=options.num_workers,
        pin_memory=device.type == "cuda",
    )


def _check_shardable(group: Ranks, projection: ProjectionArguments, options: FeaturizeArguments) -> None:
    """Refuse sharded parameters where the ranks cannot gather layers together, or the work needs whole weights."""
    if not group.coordinated:
        raise TaskError(
            "Sharded parameters need the ranks of one torchrun process group (they gather each layer together); run "
            "featurize under torchrun without --shard, or without --shard-parameters."
        )
    reasons = {
        "the 'eigen' or 'factored' projection (they need no parameter gradient)": projection.kind
        not in ("eigen", "factored"),
        "the sampled or empirical Fisher": options.fisher == "exact",
        "a segmentation not placed automatically (its probe runs on one process)": bool(
            options.segmentation is not None and options.segmentation.auto is not None
        ),
        "the Fisher of every example (fisher_examples=None: the ranks take each Fisher batch together)": (
            options.fisher_examples not in (None, "auto")
        ),
    }
    missing = [need for need, lacking in reasons.items() if lacking]
    if missing:
        raise TaskError(f"Sharded parameters need {' and '.join(missing)}; change these options or drop sharding.")


def _check_factored(projector: Projector) -> None:
    rest = getattr(projector, "rest_names", None)
    if rest:
        raise TaskError(
            f"Sharded parameters need every attributed parameter on a factored layer, but {rest[:3]} are not; select "
            "the linear layers only (sp.ModuleSelection), or featurize unsharded."
        )


def _measures(unit: Unit, final: str, options: FeaturizeArguments) -> bool:
    """Whether a unit also stores P ∇f(z; θ_T): the final checkpoint's own unit, when asked."""
    return options.measurement and not unit.prefix and unit.key == final


def _differing(old: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """The settings (metadata fields compared exactly) in which ``meta`` differs from a store's ``old``."""
    # Not compared: how the store was made and named, where its run lies (moved, it has the same fingerprint); a store
    # keeps the layout it was created with; the eigen basis's arguments are compared by what they estimate (the basis's
    # inputs), and a basis of more than asked is kept (``_Featurize._eigen_basis``).
    informative = ("spec", "command", "provenance", "fingerprint", "layout", "basis_arguments")

    def setting(key: str, value: Any) -> Any:
        return {**value, "path": None} if key == "trajectory" and isinstance(value, dict) else value

    return [key for key in meta if key not in informative and setting(key, old.get(key)) != setting(key, meta[key])]


_SETTING_OF = {"ProjectionArguments": "projection", "FeaturizeArguments": "featurize"}
"""The store's setting (``meta`` key) each class of arguments is recorded in."""


def _mentioning(error: StoreError, mentions: Sequence[tuple[str, object]]) -> StoreError:
    """``error``, naming the arguments ``mentions`` (``errors.refusal``: the CLI names its options instead)."""
    error.mentions = tuple(mentions)
    return error


def _detail(key: str, old: Any, new: Any) -> str:
    """``"projection: dim 64 → 32"``: a differing setting with up to three of its differing fields as stored and as
    asked, a nested map's fields named ``basis.positions`` (just the key where there are none)."""

    def short(value: Any) -> str:
        text = json.dumps(value) if not isinstance(value, str) else value
        return text if len(text) <= 40 else text[:37] + "…"

    def fields(a: Any, b: Any, prefix: str, depth: int) -> list[tuple[str, Any, Any]]:
        if not isinstance(a, dict) or not isinstance(b, dict):
            return [(prefix, a, b)] if prefix else []
        out = []
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k) and (depth < 2 or not isinstance(a.get(k), dict)):
                out += fields(a.get(k), b.get(k), f"{prefix}{k}" if not prefix else f"{prefix}.{k}", depth + 1)
        return out

    differing = fields(old, new, "", 1)
    own = [f for f in differing if "." not in f[0]]
    differing = own or differing  # a nested map (the eigen basis) differs as a consequence where the setting does
    # the setting's own fields before a nested map's (derived ones, such as the eigen basis), scalars before lists
    differing.sort(key=lambda f: (f[0].count("."), isinstance(f[1], (list, dict)) or isinstance(f[2], (list, dict))))
    parts = [f"{name} {short(a)} → {short(b)}" for name, a, b in differing[:3]]
    return f"{key}: {', '.join(parts)}" + (", …" if len(differing) > 3 else "") if parts else key


def _fisher_directions(
    grads_fn: PerExampleGradients,
    task: Task,
    datasets: Mapping[str, Dataset],
    options: FeaturizeArguments,
    device: torch.device,
) -> int:
    if options.fisher == "empirical":
        return 0
    if options.fisher not in ("sampled", "exact"):
        raise TaskError(f"Unknown Fisher mode {options.fisher!r}; use 'sampled', 'exact' or 'empirical'.")
    if options.fisher == "sampled":
        return 1
    first = next(iter(datasets.values()))
    batch = move_batch(next(iter(loader(Subset(first, [0]), batch_size=1))), device)
    return len(task.fisher_targets(grads_fn.outputs(batch), batch, None))


def _featurize_rows(
    grads_fn: PerExampleGradients,
    projector: Projector,
    task: Task,
    batches: Iterable[Any],
    start: int,
    options: FeaturizeArguments,
    key: int,
    device: torch.device,
    where: str,
    transform: GradientTransform | None = None,
    measure: bool = False,
    collector: FactorCollector | None = None,
    projected_fisher: bool = True,
    shared_forward: bool = True,
    fisher_batches: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, ChunkFactors | None]:
    """Projected gradients (and projected Fisher factors, Kronecker factor sums, measurement gradients)
    of one chunk's ``batches``, whose first row is ``start``; ``key``: the sampled labels' (``FisherDraws``, with
    each batch's rows). ``shared_forward``: a factored projection takes them all from one forward per batch
    (sharded parameters gather every layer at each forward and backward in lockstep, so they keep a pass per
    quantity). ``fisher_batches``: the batches (their order in the chunk) whose projected Fisher is taken
    (``FisherRows``); ``None``: every batch."""
    feats, fisher, measured = [], [], []
    spans: list[tuple[int, int]] = []  # (first row, examples) of each batch whose Fisher is taken
    sums = collector.empty() if collector is not None else None
    row = start
    once = shared_forward and isinstance(projector, FactoredProjector) and projector.shares_forward()
    taken = None if fisher_batches is None else set(fisher_batches)
    for index, batch in enumerate(batches):
        batch = move_batch(batch, device)
        draws = FisherDraws(key, torch.arange(row, row + batch_size(batch), device=device))
        take = projected_fisher and options.fisher != "empirical" and (taken is None or index in taken)
        if once:
            # One forward, a backward per quantity (loss, each Fisher direction, measurement): the same
            # numbers as the path below, which runs a forward per quantity and one more to draw the labels.
            assert isinstance(projector, FactoredProjector)
            outputs, project = projector.forward_once(grads_fn, batch, transform=transform)
            with torch.enable_grad(), grads_fn.autocast():
                projected = project(task.loss(outputs, batch))
            check_finite(projected, row, where, "training-loss gradient", then=_FIX)
            feats.append(projected)
            if take:
                spans.append((row, projected.shape[0]))
            row += projected.shape[0]
            if not take and collector is None:  # nothing needs this batch's labels
                targets = []
            else:
                targets = _targets(task, outputs.detach(), batch, options, draws, device)
            if take:
                with torch.enable_grad(), grads_fn.autocast():
                    per_direction = [project(task.fisher_loss(outputs, tb)) * w.sqrt().unsqueeze(-1).float()
                                     for w, tb in targets]  # fmt: skip
                fisher.append(torch.stack(per_direction, dim=1).reshape(-1, projector.dim))
            if collector is not None and sums is not None:
                collector.add(sums, targets)
            if measure:
                with torch.enable_grad(), grads_fn.autocast():
                    measured.append(project(task.measurement(outputs, batch)))
            del outputs, project  # the graph goes with them
            continue
        outputs = grads_fn.outputs(batch)
        task.loss(outputs, batch)  # validates targets (label ranges) outside vmap
        projected = projector.project_batch(grads_fn, batch, "loss", transform=transform)
        # Checked per batch, before labels are sampled from outputs a non-finite example would poison.
        check_finite(projected, row, where, "training-loss gradient", then=_FIX)
        feats.append(projected)
        if take:
            spans.append((row, projected.shape[0]))
        row += projected.shape[0]
        if not take and collector is None:
            targets = []
        else:
            targets = _targets(task, outputs.detach(), batch, options, draws, device)
        if take:
            per_direction = []
            for weight, target_batch in targets:
                u = projector.project_batch(grads_fn, target_batch, "fisher", transform=transform)
                per_direction.append(u * weight.sqrt().unsqueeze(-1).float())
            fisher.append(torch.stack(per_direction, dim=1).reshape(-1, projector.dim))
        if collector is not None and sums is not None:
            collector.add(sums, targets)
        if measure:
            measured.append(projector.project_batch(grads_fn, batch, "measurement", transform=transform))
    # Features stay on the device until the chunk is done: one copy per chunk.
    all_feats = torch.cat(feats)
    out_fisher = out_measured = None
    if fisher:
        all_fisher = torch.cat(fisher)
        per_example = all_fisher.reshape(sum(n for _, n in spans), -1)
        at = 0
        for first, n in spans:  # each taken batch's examples, named by their rows
            check_finite(per_example[at : at + n], first, where, "Fisher (sampled-label) gradient", then=_FIX)
            at += n
        out_fisher = all_fisher.cpu().numpy()
    if measured:
        all_measured = torch.cat(measured)
        check_finite(all_measured, start, where, "measurement gradient", then=_FIX)
        out_measured = all_measured.cpu().numpy()
    if sums is not None:
        _check_factors(sums, start, where)
    return all_feats.cpu().numpy(), out_fisher, out_measured, sums


def _targets(
    task: Task, outputs: torch.Tensor, batch: Any, options: FeaturizeArguments, draws: FisherDraws,
    device: torch.device,
) -> list[tuple[torch.Tensor, Any]]:
    """The Fisher's ``(weight, batch)`` directions of a batch: its own labels (empirical), one sampled label
    per example, or the exact expectation."""
    if options.fisher == "empirical":
        return [(torch.ones(batch_size(batch), device=device), batch)]
    return task.fisher_targets(outputs, batch, draws if options.fisher == "sampled" else None)


def _check_factors(sums: ChunkFactors, first_row: int, where: str) -> None:
    """Refuse non-finite Kronecker factor sums (a NaN example poisons its whole chunk's factors)."""
    finite = all(bool(torch.isfinite(m).all()) for m in (*sums.a, *sums.b, *sums.diagonal.values()))
    if not finite:
        raise NonFiniteExample(
            f"The Fisher factors of the chunk starting at training example {first_row} at {where} are NaN or "
            f"infinite; fix those examples' inputs or labels (or the checkpoint's weights) {_FIX}.",
            first_row,
        )


# What featurize's refusal of a gradient that is not finite advises, after what to fix: a store whose featurize stopped
# so is marked (``_Featurize._compute``), and on other data does again what read them: all of it, but the work a grown
# store finished before its growth, or a random projection's stages they left alone (``_Featurize._after_stop``).
_FIX = "and run featurize again, which does afresh what in this store read training data that changed since"


class NonFiniteExample(NumericalError):
    """A training example's gradient (or its chunk's Fisher factors) is not finite: ``row`` is its index in the data
    featurize iterated, ``stage`` (set by featurize) the stage whose data those are."""

    def __init__(self, message: str, row: int) -> None:
        super().__init__(message)
        self.row = row
        self.stage: str | None = None


def check_finite(
    values: torch.Tensor,
    first_row: int,
    where: str,
    what: str,
    example: str = "training example",
    then: str = "",
) -> None:
    """Raise a ``NonFiniteExample`` naming the first row of ``values`` (``[rows, k]``) that is not finite; ``then``:
    what to do once the example's input and label (or the checkpoint's weights) are fixed."""
    bad = ~torch.isfinite(values).all(dim=1)
    if bad.any():
        row = first_row + int(torch.nonzero(bad)[0, 0])
        fix = (f"fix that example's input or label (or the checkpoint's weights) {then}" if then
               else "check that example's input and label, and the checkpoint's weights")  # fmt: skip
        raise NonFiniteExample(f"The {what} of {example} {row} at {where} is NaN or infinite; {fix}.", row)


def _warn_dense_on_cpu(projector: Projector, device: torch.device) -> None:
    """One sentence when the dense projection will redraw its sign matrix for every batch on a CPU."""
    if type(projector) is RademacherProjector and device.type == "cpu" and projector.redraws_every_batch():
        size = projector.num_params * projector.dim * 4 / 2**30
        warnings.warn(
            f"The dense 'rademacher' projection of {projector.num_params:,} parameters at k = {projector.dim} "
            f"multiplies every gradient by a {size:.1f} GiB matrix it redraws for every batch on the CPU, hours on a "
            "large run; the 'eigen' projection (the default, also the most accurate at equal k) or the 'factored' one "
            "(ProjectionArguments(kind='factored'), --projection factored) is far faster (65 s against about 5 h "
            "for the 567k-parameter MLP in BENCHMARKS.md).",
            stacklevel=4,
        )
