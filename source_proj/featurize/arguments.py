"""What featurize is asked to do: projection and featurize arguments, devices, and which stage's
data each checkpoint is featurized on."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from source_proj.errors import (
    StoreError,
    TaskError,
    check_choice,
    check_whole,
    check_wholes,
    mention,
    not_an_instance,
    refusal,
)
from source_proj.projection.base import Projector
from source_proj.projection.eigen import EigenBasis
from source_proj.projection.factory import PROJECTION_KINDS, make_projector
from source_proj.tasks.data import check_indexed, training_examples
from source_proj.tasks.gradients import Precision
from source_proj.trajectory.recorder import Checkpoint, Trajectory
from source_proj.trajectory.segments import SegmentationArguments

FisherMode = Literal["sampled", "exact", "empirical"]
FISHER_MODES = get_args(FisherMode)
CurvatureKind = Literal["auto", "kfac", "projected", "both"]
CURVATURE_KINDS = get_args(CurvatureKind)
PRECISIONS = get_args(Precision)


@dataclass(frozen=True)
class ProjectionArguments:
    """How gradients are projected.

    Attributes:
        dim: k, the projection dimension (ignored by ``"identity"``).
        seed: the projection's seed; the same seed gives the same P everywhere.
        kind: ``"eigen"`` (the default, below), ``"rademacher"`` (±1/√k entries), ``"factored"`` (per-layer Kronecker
            P_out ⊗ P_in of Linear, Conv, GPT-2 Conv1D and Embedding layers, no per-example gradients
            materialised; see ``factored.py``), ``"eigen"`` (the factored projection onto each layer's
            leading Kronecker-factor eigenvectors, estimated from the run by featurize: no projection
            noise, the most accurate SOURCE measured at equal k (BENCHMARKS.md, "The eigen
            projection"); a model without such layers falls back to ``"rademacher"`` with a warning;
            see ``eigen.py``), ``"fast_jl"`` (TRAK's CUDA kernel, its own matrix),
            ``"auto"`` (fast_jl where CUDA and fast_jl are present, else rademacher) or
            ``"identity"`` (no projection, k = p). The store records the kind used; queries rebuild it.
        module_dims: ``"factored"`` only: glob pattern on module names → k_m; each matching layer is
            projected into its own k_m coordinates (appended after the ``dim`` shared ones, which
            the other layers and the unfactored parameters use). The store's k is the total.
        adam_rank: ``"factored"`` and ``"eigen"``: on a run trained with Adam/AdamW, each layer's elementwise
            D^{-1/2} is replaced by its best rank-R approximation (Adafactor-like for R = 1), at R
            times the projection cost; the dense ``"rademacher"`` kind applies it exactly.
        basis_examples: ``"eigen"`` only: at most this many examples per stage and checkpoint (a seeded random
            subset) whose sampled-label Fisher estimates the basis; ``basis_layer_positions`` keeps fewer where they
            give each layer enough positions. Against all of their 512–560 sequences, 32 sequences kept a 4 × 256
            GPT-2's faithfulness and 16–64 the text example's LDS, where an MLP lost 0.037 LDS with 64 examples
            and a CNN's last linear layer (one position an image) needed more than 32 (BENCHMARKS.md, "how few
            sequences a language model's basis needs").
        basis_layer_positions: ``"eigen"`` only: the sampled positions each layer's factors need. Of the
            ``basis_examples`` drawn, the pass keeps the fewest (the first of the seeded draw) that give every layer
            this many, or twice its widest factor's side where that is more (a factor from fewer positions than its
            side is rank-deficient). An MLP (one position an example) or a CNN's last linear layer counts one per
            example and keeps all ``basis_examples`` at the defaults, bit for bit; a language model's sequences give
            up to ``basis_positions`` each, so a 4 × 256 GPT-2 of 128-token sequences keeps 33. ``None``: every one
            of ``basis_examples``.
        basis_positions: ``"eigen"`` only: at most this many positions of each of those examples (tokens of a
            sequence, patches of an image; drawn at random) enter each layer's Kronecker factors; ``None``: every
            position. The factor products are a large part of a transformer's basis pass (d_in'² + d_out² per
            position and layer); the factors stay unbiased. On the text example 4 of 32 positions lost no LDS
            (BENCHMARKS.md, "The eigen basis from sampled positions"). Models with at most that many positions
            per example (an MLP has one) are unaffected, bit for bit.
        basis_checkpoints: ``"eigen"`` only: the basis averages the factors of at most this many checkpoints of each
            stage, evenly spaced over it (its first and last included), not of every checkpoint featurized; each
            left out saves a basis pass. ``None``: every checkpoint. In-run capture takes a basis per window
            whatever this says.
    """

    dim: int = 1024
    seed: int = 0
    kind: str = "eigen"
    module_dims: Mapping[str, int] = field(default_factory=dict)
    adam_rank: int = 1
    basis_examples: int = 2048
    basis_positions: int | None = 64
    basis_layer_positions: int | None = 2048
    basis_checkpoints: int | None = None

    def __post_init__(self) -> None:
        check_choice("ProjectionArguments.kind", self.kind, (*PROJECTION_KINDS, "auto"))
        _positive(self, "adam_rank")
        if not isinstance(self.module_dims, Mapping):
            raise TaskError(
                f"ProjectionArguments.module_dims is {self.module_dims!r}; pass a dict of module-name patterns to "
                "dimensions, e.g. {'fc*': 64}."
            )
        for pattern, dim in self.module_dims.items():
            check_whole(f"ProjectionArguments.module_dims[{pattern!r}]", dim)
        self._check_layer_fields()
        if self.kind != "identity":  # k = p there, whatever dim says
            _positive(self, "dim")
        _positive(self, "seed", minimum=0)
        _positive(self, "basis_examples")
        if self.basis_positions is not None:
            _positive(self, "basis_positions")
        if self.basis_layer_positions is not None:
            _positive(self, "basis_layer_positions")
        if self.basis_checkpoints is not None:
            _positive(self, "basis_checkpoints")
            if self.kind != "eigen":
                kind = "ProjectionArguments.kind"
                raise refusal(
                    TaskError,
                    "ProjectionArguments.basis_checkpoints",
                    f" sets the eigen projection's basis; {mention(kind, self.kind)} has none, so drop it (or use "
                    f"{mention(kind, 'eigen')}).",
                    [(kind, self.kind), (kind, "eigen")],
                )

    def _check_layer_fields(self) -> None:
        """Refuse ``module_dims`` on a kind other than ``"factored"`` and ``adam_rank`` on one without layers (they
        would be ignored, or refused only once the run and the model are read)."""
        kind = "ProjectionArguments.kind"
        if self.module_dims and self.kind != "factored":
            why = "shares k between the layers itself" if self.kind == "eigen" else "has no per-layer blocks"
            raise refusal(
                TaskError,
                "ProjectionArguments.module_dims",
                f" sets the 'factored' projection's per-layer blocks; {mention(kind, self.kind)} {why}, so drop it "
                f"(or use {mention(kind, 'factored')}).",
                [(kind, self.kind), (kind, "factored")],
            )
        if self.adam_rank != 1 and self.kind not in ("factored", "eigen"):
            raise refusal(
                TaskError,
                "ProjectionArguments.adam_rank",
                f" sets the rank of the per-layer projections' Adam scaling; {mention(kind, self.kind)} has no layers "
                f"(the dense one scales exactly), so drop it (or use {mention(kind, 'eigen')}).",
                [(kind, self.kind), (kind, "eigen")],
            )

    def basis_inputs(self, *more: object) -> str:
        """The digest of what an eigen basis is estimated from (with ``more``: the parameters' names, ...): a store
        whose basis has it is resumed with that basis. ``basis_positions`` and ``basis_checkpoints`` enter only when
        set, so bases estimated before they existed (every position, every checkpoint) keep their digest."""
        positions = [] if self.basis_positions is None else [["positions", self.basis_positions]]
        checkpoints = [] if self.basis_checkpoints is None else [["checkpoints", self.basis_checkpoints]]
        values = [self.dim, self.seed, self.basis_examples, *more, *positions, *checkpoints]
        return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]

    def projector(
        self, shapes: Sequence[tuple[str, Sequence[int]]], model: nn.Module, basis: EigenBasis | None = None
    ) -> Projector:
        """The projector these arguments describe for ``model``'s parameters ``shapes`` (every field used;
        ``basis``: the ``"eigen"`` kind's, from ``featurize/basis.py``)."""
        return make_projector(
            self.kind,
            shapes,
            self.dim,
            self.seed,
            model=model,
            module_dims=self.module_dims,
            adam_rank=self.adam_rank,
            basis=basis,
        )


BASIS_FIELDS = ("basis_examples", "basis_positions", "basis_layer_positions", "basis_checkpoints")
"""The ``ProjectionArguments`` of the eigen basis pass, recorded as given in a store's ``meta["basis_arguments"]``:
the basis records only what they estimated (its inputs' digest, the examples and checkpoints it took)."""


def basis_arguments(projection: ProjectionArguments) -> dict[str, int | None]:
    """What a store records of the eigen basis's arguments (``BASIS_FIELDS``), as given."""
    return {name: getattr(projection, name) for name in BASIS_FIELDS}


def projection_differences(projection: ProjectionArguments, old: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The projection arguments asked for (``projection``) that differ from those a store (metadata ``old``) was
    made with, each ``(field, the store's value, the value asked)``, the field as ``"ProjectionArguments.dim"``
    (``mention`` writes it as typed in Python, the CLI as its option): another kind alone; else k and the seed, the
    Adam rank and the layers' own k of the factored and eigen projections, the eigen basis's arguments as recorded
    (none where they were not), or the k and seed of a store of the eigen projection's 'rademacher' fallback."""
    desc = old.get("projection") or {}
    kind = desc.get("kind")
    if kind is None:
        return []
    if kind == "rademacher" and projection.kind == "eigen":  # the fallback of a model without Kronecker layers
        pairs = [("dim", desc.get("dim"), projection.dim), ("seed", desc.get("seed"), projection.seed)]
    elif kind != projection.kind or kind not in ("eigen", "factored"):
        pairs = [("kind", kind, projection.kind)]
    else:
        dim = desc.get("k") if kind == "eigen" else desc.get("shared_dim", desc.get("dim"))
        pairs = [("dim", dim, projection.dim), ("seed", desc.get("seed"), projection.seed),
                 ("adam_rank", desc.get("adam_rank", 1), projection.adam_rank),
                 ("module_dims", dict(desc.get("module_dims") or []), dict(projection.module_dims))]  # fmt: skip
        recorded = old.get("basis_arguments") or {}  # none: a store made before they were recorded
        pairs += [(name, recorded[name], getattr(projection, name)) for name in BASIS_FIELDS if name in recorded]
    return [(f"ProjectionArguments.{name}", was, now) for name, was, now in pairs if was != now]


def typed_text(typed: Sequence[tuple[str, Any, Any]]) -> tuple[str, list[tuple[str, object]]]:
    """``"basis_examples=2048 there, basis_examples=16 here"``: arguments that differ from a store's (each ``(field,
    the store's value, the value asked)``) as typed in Python, and the sentence's mentions, which the CLI writes as
    its options (``--basis-examples 2048 there, …``)."""
    parts = [f"{mention(field, was)} there, {mention(field, now)} here" for field, was, now in typed]
    return "; ".join(parts), [pair for field, was, now in typed for pair in ((field, was), (field, now))]


@dataclass(frozen=True)
class FeaturizeArguments:
    """How featurize computes and stores gradients.

    Attributes:
        batch_size: examples per forward/backward batch.
        chunk_rows: examples per store chunk (the unit of resumption); a multiple of ``batch_size`` is best.
        fisher: ``"sampled"`` true Fisher with labels drawn from the model (default, docs/concepts/source.md §4);
            ``"exact"`` the Gauss–Newton expectation enumerated (one gradient per class: small tasks);
            ``"empirical"`` the observed-label gradients (no extra storage, cheaper, biased).
        seed: seed of the Fisher's label sampling.
        device: ``"cuda"``, ``"cpu"``…; default: CUDA when available.
        num_workers: DataLoader workers overlapping data loading with compute.
        vmap_chunk: examples per vectorised gradient chunk (bounds memory); ``None`` = the batch.
        segmentation: fix the segmentation now (recorded in the store; fit then uses it and refuses
            another). Needed when a stage was trained with Adam/AdamW (the preconditioner D_ℓ is a
            segment mean) or with ``segment_means``; ``None`` there means one segment per stage.
            Plain SGD stores leave the choice to fit.
        checkpoints: featurize every checkpoint (SOURCE; the baselines use them too).
        checkpoint_steps: featurize only the checkpoints saved at these steps (the final one is
            always added): SOURCE then averages each segment over the chosen checkpoints inside it,
            and an Adam segment's D_ℓ over their optimizer states. ``None``: every checkpoint.
        segment_means: featurize each segment's averaged parameters (Fast-SOURCE, docs/concepts/source.md §7);
            with ``checkpoints=False`` this is the cheap mode: L instead of C gradient passes.
        measurement: also store ``measurement/<stage>/<final ckpt>`` = P ∇f(z; θ_T) for every training
            example (TRAK's curvature, see baselines.py): one more gradient per example at one checkpoint.
        precision: ``"fp32"`` (default) or ``"bf16"``: forward and backward under bfloat16
            autocast, projections accumulated in fp32 (faster on GPUs; see docs/howto/gpu.md).
        curvature: what featurize stores for fit's curvature. ``"projected"``: the pseudo-label
            gradients projected to k dimensions (the k × k projected Gauss–Newton); ``"kfac"``: per-layer
            Kronecker factors of the Fisher in the full parameter space (``featurize/factors.py``, one
            ordinary forward and backward per batch; the projected factors only at the final checkpoint,
            for the influence-function baseline); ``"both"``: both (to compare them on one store);
            ``"auto"`` (default): ``"projected"``, except on the ``"identity"`` projection of more than
            ``EXACT_PROJECTED_MAX`` parameters, where the k × k matrix would be p × p: ``"kfac"``. The
            default follows issue 12's ablation (BENCHMARKS.md): at k = 1024 the Kronecker operators,
            applied to the query before both sides are projected, lose more to the projection's noise
            than the projected curvature does; without a projection they beat every random
            projection at k ≤ 4096, not the eigen projection at k = 1024. The store records the
            curvature used. ``"projected"`` and ``"both"`` are refused above k = ``PROJECTED_MAX``.
        shard_chunks: row chunks kept in one file (a zarr v3 shard) when a new store is created;
            ``None``: as many as fit in 256 MiB (``store.SHARD_BYTES``), 1: a file per chunk. An
            existing store keeps the layout it was created with.
        shard_parameters: under torchrun, keep 1/W of the model's parameters on each of the W ranks and
            gather a layer's only while it runs (``sharded.py``): featurize models larger than one
            device. Needs the ``eigen`` or ``factored`` projection covering every attributed parameter, the
            sampled or empirical Fisher and a segmentation not placed automatically; one process
            ignores it.
        fisher_examples: take the projected Fisher (``"sampled"`` or ``"exact"``) of about this many examples of
            each stage at each checkpoint, not of all N: in every row chunk the same share of its batches, drawn
            at random from ``seed`` (the same batches at every checkpoint), and at least one batch a chunk.
            Featurize then skips the Fisher's backward (and its label draws) on the other batches (one of its two
            backward passes a batch; 15 % of featurize in a CPU profile of the text example, where the eigen basis
            pass took 29 %), and the store's Fisher arrays, half of it, hold those rows only. The Fisher is a mean:
            fit divides by the rows taken. An explicit number needs a ``chunk_rows`` that is a multiple of
            ``batch_size``; a store resumes with a ``batch_size`` that divides the one it was begun with (the
            batches its share is drawn in, ``fisher_block``). ``None``: every example. ``"auto"`` (default):
            ``max(AUTO_FISHER_PER_K × k, AUTO_FISHER_MIN)`` examples (65,536 up to k = 2,048, 262,144 at
            k = 8,192), so every example of a stage no larger, and every example wherever a share cannot be taken
            (sharded parameters, the empirical Fisher, a ``chunk_rows`` not a multiple of ``batch_size``); an
            existing store resumes or grows with what it recorded. Its accuracy cost is in BENCHMARKS.md ("The
            Fisher of a share of the examples").
    """

    batch_size: int = 64
    chunk_rows: int = 1024
    fisher: FisherMode = "sampled"
    seed: int = 0
    device: str | None = None
    num_workers: int = 0
    vmap_chunk: int | None = None
    segmentation: SegmentationArguments | None = None
    checkpoints: bool = True
    checkpoint_steps: tuple[int, ...] | None = None
    segment_means: bool = False
    measurement: bool = True
    precision: Precision = "fp32"
    curvature: CurvatureKind = "auto"
    shard_chunks: int | None = None
    shard_parameters: bool = False
    fisher_examples: int | Literal["auto"] | None = "auto"

    def __post_init__(self) -> None:
        check_choice("FeaturizeArguments.fisher", self.fisher, FISHER_MODES)
        check_choice("FeaturizeArguments.precision", self.precision, PRECISIONS)
        check_choice("FeaturizeArguments.curvature", self.curvature, CURVATURE_KINDS)
        for flag in ("checkpoints", "segment_means", "measurement", "shard_parameters"):
            check_choice(f"FeaturizeArguments.{flag}", getattr(self, flag), (True, False))
        if self.checkpoint_steps is not None:
            check_wholes("FeaturizeArguments.checkpoint_steps", self.checkpoint_steps)
        what, hint = "FeaturizeArguments.segmentation", "pass SegmentationArguments.parse('3') or None."
        message = not_an_instance(self.segmentation, SegmentationArguments | None, what, "SegmentationArguments", hint)
        if message:
            raise TaskError(message)
        _positive(self, "batch_size")
        _positive(self, "chunk_rows")
        _positive(self, "seed", minimum=0)
        _positive(self, "num_workers", minimum=0)
        for optional in ("vmap_chunk", "shard_chunks"):
            if getattr(self, optional) is not None:
                _positive(self, optional)
        if self.fisher_examples is not None and self.fisher_examples != "auto":
            _positive(self, "fisher_examples")
            if self.chunk_rows % self.batch_size:
                raise TaskError(
                    f"A Fisher of a share of the examples (fisher_examples, --fisher-examples) takes whole batches "
                    f"from every row chunk, so chunk_rows (--chunk-rows, {self.chunk_rows}) must be a multiple of "
                    f"batch_size (--batch-size, {self.batch_size})."
                )

    def fisher_meta(self, block: int | None = None) -> dict[str, int]:
        """What the store's ``meta["featurize"]`` records of ``fisher_examples`` (nothing where it is off: a store
        featurized before the option resumes as it was): the share, and the batches it is drawn in, ``block``
        (``fisher_block``; default: ``batch_size``). ``"auto"`` must be resolved first (``resolve_fisher_examples``)."""
        assert self.fisher_examples != "auto", "resolve fisher_examples='auto' before the store's metadata"
        if self.fisher_examples is None:
            return {}
        return {"fisher_examples": self.fisher_examples, "batch_size": block or self.batch_size}


def fisher_block(path: str, options: FeaturizeArguments, recorded: Mapping[str, Any] | None) -> int:
    """The batches a Fisher share is drawn in (``FisherRows``): ``options.batch_size`` for a new store; for a store
    featurize resumes or grows with the same share, the batches it recorded. A smaller batch that divides them
    computes the same rows (each of its batches lies inside one of them), so a featurize that ran out of memory
    resumes with half its batch size; any other batch size is refused. ``options.fisher_examples`` is resolved."""
    if options.fisher_examples is None or not recorded or recorded.get("fisher_examples") != options.fisher_examples:
        return options.batch_size
    block = int(recorded.get("batch_size", options.batch_size))
    if block % options.batch_size:
        divisors = [d for d in range(block - 1, 0, -1) if block % d == 0][:2]
        raise StoreError(
            f"The store at {path} takes the Fisher of a share of its examples in batches of {block}; resume it with a "
            f"batch size that divides {block} ({' or '.join(map(str, divisors)) or block}), or pass --force "
            "(overwrite=True) to featurize it anew."
        )
    return block


AUTO_FISHER_PER_K = 32
"""``fisher_examples="auto"`` takes the Fisher of this many examples per dimension of the projection (k)..."""

AUTO_FISHER_MIN = 65_536
"""... and at least this many. The k × k Fisher is a mean: on all 60,000 MNIST images at k = 1,024, 33 rows per
dimension scored within 0.004 LDS of every example's in three draws (BENCHMARKS.md, "The Fisher of a share of 60,000
examples"); kronfluence caps its covariances at 100,000 examples by default."""


def resolve_fisher_examples(
    options: FeaturizeArguments, dim: int, sizes: Sequence[int], recorded: Mapping[str, Any] | None = None
) -> int | None:
    """The ``fisher_examples`` featurize uses for ``options`` on a projection of ``dim`` dimensions, stages of
    ``sizes`` examples and, where a store is resumed or grown, the ``meta["featurize"]`` it ``recorded``:
    ``"auto"`` resolves to what that store took (every example where it recorded none), else to
    ``max(AUTO_FISHER_PER_K × dim, AUTO_FISHER_MIN)`` where a share can be taken and some stage is larger, else
    ``None`` (every example). Explicit values stay as they are."""
    examples = options.fisher_examples
    if examples != "auto":
        return examples
    if recorded is not None:
        return recorded.get("fisher_examples")
    examples = max(AUTO_FISHER_PER_K * dim, AUTO_FISHER_MIN)
    shareable = (
        options.fisher != "empirical" and not options.shard_parameters and options.chunk_rows % options.batch_size == 0
    )
    return examples if shareable and any(size > examples for size in sizes) else None


EXACT_PROJECTED_MAX = 4096
"""``curvature="auto"`` keeps the projected Gauss–Newton on an identity projection up to this many parameters."""

PROJECTED_MAX = 16384
"""The largest k of the projected Gauss–Newton (a k × k float64 matrix of 2 GiB and its eigendecomposition)."""


def resolve_curvature(curvature: str, kind: str, dim: int) -> str:
    """The curvature featurize stores for ``curvature`` (``FeaturizeArguments.curvature``) on a projection of
    kind ``kind`` and dimension ``dim`` (k; p for ``"identity"``); refuses a projected one that cannot fit."""
    if curvature == "auto":
        return "kfac" if kind == "identity" and dim > EXACT_PROJECTED_MAX else "projected"
    if curvature not in ("kfac", "projected", "both"):
        raise TaskError(f"Unknown curvature {curvature!r}; use 'auto', 'projected', 'kfac' or 'both'.")
    if curvature != "kfac" and dim > PROJECTED_MAX:
        what = f"{dim:,} parameters unprojected" if kind == "identity" else f"k = {dim:,}"
        raise TaskError(
            f"The projected Gauss–Newton is a k × k matrix per checkpoint, too large with {what} (at most "
            f"{PROJECTED_MAX:,}); use curvature='kfac' (--curvature kfac) or 'auto', or a smaller k."
        )
    return curvature


def projected_fisher_at(curvature: str, prefix: str, key: str, final: str) -> bool:
    """Whether featurize stores the projected Fisher factors of the feature point ``prefix + key``: always
    for the projected curvature and the automatic segmentation's probe; with Kronecker factors only at
    the final checkpoint ``final`` (the influence-function baseline's curvature, one checkpoint's cost)."""
    return curvature != "kfac" or bool(prefix) or key == final


@dataclass(frozen=True)
class FisherRows:
    """The rows of one stage whose projected Fisher featurize takes (``FeaturizeArguments.fisher_examples``).

    In each row chunk, ``ceil(share × its batches)`` of its batches (at least one), drawn from ``seed``, the
    stage's index and the chunk's: the same rows at every checkpoint, whichever process computes the chunk.
    The store's ``fisher/<stage>/<key>`` holds their rows, chunk by chunk (``per_chunk`` rows of each full
    chunk). ``share`` ``None``: every row (and the array the layout of ``grads``)."""

    size: int
    chunk_rows: int
    batch_size: int
    share: float | None
    seed: int
    stage_index: int

    @classmethod
    def of(cls, featurize: Mapping[str, Any], size: int, stage_index: int) -> FisherRows:
        """The rows of a stage of ``size`` examples under a store's ``meta["featurize"]``."""
        examples = featurize.get("fisher_examples")
        share = None if examples is None or examples >= size else examples / size
        return cls(size, int(featurize["chunk_rows"]), int(featurize.get("batch_size", 1)), share,
                   int(featurize.get("seed", 0)), stage_index)  # fmt: skip

    def _taken(self, batches: int) -> int:
        assert self.share is not None
        return min(batches, max(1, math.ceil(self.share * batches - 1e-9)))

    @property
    def per_chunk(self) -> int:
        """Rows of a full chunk's Fisher (of the array's chunks)."""
        if self.share is None:
            return self.chunk_rows
        return self._taken(self.chunk_rows // self.batch_size) * self.batch_size

    def batches(self, chunk: int, of: int | None = None) -> list[int] | None:
        """The batches of row chunk ``chunk`` (their order in it) whose Fisher is taken; ``None``: all. ``of``: in
        batches of that many rows, a divisor of ``batch_size`` (a featurize resumed with a smaller batch)."""
        if self.share is None:
            return None
        rows = min(self.size, (chunk + 1) * self.chunk_rows) - chunk * self.chunk_rows
        count = -(-rows // self.batch_size)
        rng = np.random.default_rng([self.seed, 0xF15, self.stage_index, chunk])
        taken = sorted(rng.choice(count, self._taken(count), replace=False).tolist())
        if of is None or of == self.batch_size:
            return taken
        assert self.batch_size % of == 0, "a featurize batch divides the share's batches (fisher_block)"
        ratio = self.batch_size // of
        return [batch * ratio + i for batch in taken for i in range(ratio)]

    def rows(self, chunk: int) -> int:
        """Rows of chunk ``chunk``'s Fisher."""
        start, stop = chunk * self.chunk_rows, min(self.size, (chunk + 1) * self.chunk_rows)
        taken = self.batches(chunk)
        if taken is None:
            return stop - start
        return sum(min(self.batch_size, stop - start - b * self.batch_size) for b in taken)

    @functools.cached_property
    def total(self) -> int:
        """Rows of the stage's Fisher (the count fit divides the sum of ũũᵀ by)."""
        if self.share is None:
            return self.size
        chunks = -(-self.size // self.chunk_rows)
        return (chunks - 1) * self.per_chunk + self.rows(chunks - 1)


def _positive(arguments: object, field: str, minimum: int = 1) -> None:
    """Refuse a field of ``arguments`` that is not an integer ≥ ``minimum``."""
    check_whole(f"{type(arguments).__name__}.{field}", getattr(arguments, field), minimum)


def default_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available, else the CPU. A name torch does not know, or a CUDA or MPS device this
    machine lacks, is refused in one sentence (before any command changes a store)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise TaskError(f"{str(device)!r} is not a device; pass cpu, cuda or cuda:N.") from err
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
            raise TaskError(f"Device {str(device)!r} is CUDA, but {why}; pass cpu.")
        if where.index is not None and where.index >= count:
            raise TaskError(
                f"Device {str(device)!r} does not exist: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}."
            )
    elif where.type == "mps" and not torch.backends.mps.is_available():
        raise TaskError(f"Device {str(device)!r} is Apple's MPS, which this machine lacks; pass cpu.")
    return where


def as_stage_datasets(data: Dataset | Mapping[str, Dataset], trajectory: Trajectory) -> dict[str, Dataset]:
    """Map each stage name to its dataset; a single dataset serves a single-stage trajectory."""
    names = [s.name for s in trajectory.stages]
    if not isinstance(data, Mapping):
        if len(names) != 1:
            raise TaskError(
                f"The trajectory has stages {names}; pass a dict mapping each stage name to its training dataset."
            )
        data = {names[0]: data}
    missing = [n for n in names if n not in data]
    if missing:
        raise TaskError(f"No training dataset was given for stage(s) {missing}; pass one per stage.")
    extra = [n for n in data if n not in names]
    if extra:  # e.g. a new stage's data before the run recorded it: silently left out otherwise
        raise TaskError(
            f"Training data was given for stage(s) {extra}, which the trajectory does not have (its stages are "
            f"{names}); pass one dataset per recorded stage, under its recorded name."
        )
    for stage in trajectory.stages:
        check_indexed(data[stage.name], f"The training data of stage {stage.name!r}")
        size = len(data[stage.name])  # type: ignore[arg-type]
        if size == 0:
            raise TaskError(
                f"The training dataset of stage {stage.name!r} is empty; pass the data the stage was trained on."
            )
        given = data[stage.name]
        if size != stage.dataset_size and isinstance(given, tuple) and given and all(
            isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == stage.dataset_size for t in given
        ):
            raise TaskError(
                f"The training data of stage {stage.name!r} are a tuple of {size} tensors of {stage.dataset_size} rows "
                "(inputs, labels, …), not a dataset of examples; pass TensorDataset(*tensors)."
            )
        if size != stage.dataset_size:
            raise TaskError(
                f"Stage {stage.name!r} was trained on {stage.dataset_size} examples but its dataset has {size}; "
                "pass the same training set, in the same order."
            )
    return {n: training_examples(data[n], n) for n in names}


def checkpoint_stages(trajectory: Trajectory, checkpoint: Checkpoint) -> list[str]:
    """Stages whose data a checkpoint is featurized on: the stage it lies in, the stage it closes,
    and every stage for the final checkpoint."""
    if checkpoint == trajectory.final_checkpoint:
        return [s.name for s in trajectory.stages]
    return [s.name for s in trajectory.stages if s.start_step <= checkpoint.step <= s.end_step]
