"""fit: per-segment curvature, SOURCE operators, and the cached training-feature matrix.

Reads only the store (no model, no data): the projected Fisher factors give each checkpoint's
curvature H̃_c = (1/N) Σ_i ũ_i ũ_iᵀ, segments average them (+ λI) and are eigendecomposed once,
and one pass over the stored gradients folds every operator into T(z) (see source.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from source_proj.distributed import Ranks, Shard, rank_device, ranks, run_sharded
from source_proj.errors import (
    NumericalError,
    StoreError,
    TaskError,
    check_choice,
    check_names,
    check_real,
    check_whole,
    check_wholes,
    mention,
    refusal,
)
from source_proj.featurize.arguments import default_device
from source_proj.featurize.factors import layers_from_description
from source_proj.featurize.windows import (
    WindowGradients,
    expected_windows,
    is_captured,
    segment_denominator,
    window_curvature,
    window_cuts,
)
from source_proj.methods.kronecker import KroneckerCurvature, LayerFactors
from source_proj.methods.source import SegmentOperator, fold
from source_proj.projection.transform import scaling_transform
from source_proj.store.store import Store, ckpt_key, is_store, key_step, refuse_foreign_directory
from source_proj.store.verify import featurize_command
from source_proj.trajectory.autosegment import TrajectoryView, trajectory_view
from source_proj.trajectory.optimizers import optimizer_rule
from source_proj.trajectory.preconditioner import coupled_decay, unflatten
from source_proj.trajectory.recorder import Stage
from source_proj.trajectory.segments import (
    Segment,
    SegmentationArguments,
    check_boundaries,
    make_segments,
    segment_average,
    segment_for,
)

DAMPING_FACTORS = {"projected": 1.0, "kfac": 0.0, "eigen": 0.3}
"""SOURCE's default damping factor per curvature (`FitArguments.damping_factor`); ``"eigen"``: the projected
curvature of a store featurized with the ``eigen`` projection."""

CURVATURES = ("kfac", "projected")
"""The curvatures fit computes SOURCE's operators from (`FitArguments.curvature`)."""

AVERAGES = ("steps", "checkpoints")
"""How a segment's ḡ_ℓ and H̄_ℓ weigh its checkpoints (`FitArguments.average`)."""

Points = list[list[tuple[str, float]]]
"""Per segment, the stored feature points it averages (store keys) and their weights, which sum to 1."""


@dataclass(frozen=True)
class FitArguments:
    """How the trajectory is segmented and which data are attributed.

    With none of ``segments_per_stage``, ``boundaries``, ``auto_segments`` given, fit uses the
    segmentation recorded by featurize, else one segment per stage (the evidence of BENCHMARKS.md,
    issue 12: never below three per stage on the settings measured). A store whose features
    depend on the segmentation (Adam/AdamW runs, Fast-SOURCE) refuses any other.

    Attributes:
        segments_per_stage: equal parts (by step) each stage is cut into (default 1; the paper uses 3).
        boundaries: explicit global steps to cut at instead (stage boundaries are always cut); give at most one
            of ``segments_per_stage``, ``boundaries`` and ``auto_segments``.
        auto_segments: L, a budget of segments placed automatically where the projected curvature
            and gradients change most (``autosegment.py``); ``0``: their number is chosen too.
        stages: attribute to these stages' examples only (e.g. the pre-training data); default all.
            An example of stage s is credited through the segments that trained on it and carried
            to θ_T by every later segment's survival S (docs/concepts/source.md §3).
        fast: Fast-SOURCE: gradients and curvature at each segment's averaged parameters (needs
            featurize with ``segment_means=True``).
        method: name under which the result is stored (``methods/<method>``); default
            ``"fast-source"`` with ``fast``, else ``"source"``.
        curvature: ``"kfac"``: per-layer Kronecker factors in the full parameter space, SOURCE's
            operators applied to the query gradient before projection (``methods/kronecker.py``);
            ``"projected"``: the k × k projected Gauss–Newton, operators folded into the training
            features (``methods/source.py``). Default: ``"kfac"`` when featurize stored only Kronecker
            factors, else ``"projected"``.
        damping_factor: each segment's curvature gets λ = its weight decay + ``damping_factor`` × the mean
            eigenvalue of that segment's curvature (over k for ``"projected"``, over every parameter for
            ``"kfac"``). ``0`` is the paper's SOURCE, damped only by the weight decay and the horizon
            (1/(η̄K)). Default (``DAMPING_FACTORS``, the evidence of BENCHMARKS.md, issue 12, "SOURCE's
            damping"): 1 for the projected curvature, whose small eigenvalues are mostly estimation and
            projection noise; 0.3 for it on the ``eigen`` projection, which adds no projection noise
            ("The eigen projection"); 0 for the Kronecker one, which damping did not help.
        average: how a segment's gradients ḡ_ℓ(z) and curvature H̄_ℓ weigh its checkpoints. ``"steps"``
            (default): the mean over the segment's steps, each step's value interpolated linearly between
            the checkpoints around it, so the checkpoint that closes a stage counts and a segment's first
            checkpoint weighs only its share of the steps (``segments.step_average``; BENCHMARKS.md, "A
            segment's average over its steps"). ``"checkpoints"``: the plain mean over
            the checkpoints its own steps start from, as the paper writes it (this library's rule before
            2026-12-02). Fast-SOURCE's features are taken at each segment's parameters averaged this way (by
            featurize, so only ``"steps"``); captured stores average their windows' visits (and refuse
            ``"checkpoints"``).
    """

    segments_per_stage: int | None = None
    boundaries: tuple[int, ...] | None = None
    stages: tuple[str, ...] | None = None
    method: str | None = None
    auto_segments: int | None = None
    fast: bool = False
    curvature: str | None = None
    damping_factor: float | None = None
    average: str = "steps"

    def __post_init__(self) -> None:
        check_choice("FitArguments.average", self.average, AVERAGES)
        if self.fast and self.average != "steps":
            raise refusal(
                TaskError,
                "FitArguments.average",
                f" is {self.average!r}, which Fast-SOURCE does not take: featurize computed its features at each "
                "segment's step-averaged parameters; drop it, or fit SOURCE (without "
                f"{mention('FitArguments.fast', True)}).",
                [("FitArguments.fast", True)],
            )
        check_choice("FitArguments.fast", self.fast, (True, False))
        if self.stages is not None:
            check_names("FitArguments.stages", self.stages)
        if self.damping_factor is not None:
            check_real("FitArguments.damping_factor", self.damping_factor)
        if self.curvature is not None:
            check_choice("FitArguments.curvature", self.curvature, CURVATURES)
        for field, minimum in (("segments_per_stage", 1), ("auto_segments", 0)):
            if getattr(self, field) is not None:
                check_whole(f"FitArguments.{field}", getattr(self, field), minimum)
        given = [f for f in ("segments_per_stage", "boundaries", "auto_segments") if getattr(self, f) is not None]
        if len(given) > 1:  # one would silently win over the others
            raise TaskError(
                f"FitArguments gives {' and '.join(given)}, each a way to segment the run; give one of them."
            )
        steps = self.boundaries  # refused here, not where fit cuts at them (naming SegmentationArguments)
        if steps is not None:  # any iterable of steps (an array) is taken as their tuple
            listed = steps if isinstance(steps, str | bytes) or not isinstance(steps, Iterable) else tuple(steps)
            check_wholes("FitArguments.boundaries", listed)

    def resolve_damping(self, curvature: str, projection: str | None = None) -> float:
        """The damping factor this fit uses with ``curvature`` on a store of ``projection``'s kind (see
        ``damping_factor``)."""
        if self.damping_factor is not None:
            return float(self.damping_factor)
        return DAMPING_FACTORS["eigen" if curvature == "projected" and projection == "eigen" else curvature]

    @property
    def name(self) -> str:
        """The method name the result is stored under."""
        return self.method or ("fast-source" if self.fast else "source")

    def resolve_curvature(self, meta: dict[str, Any]) -> str:
        """The curvature this fit uses on a store with metadata ``meta`` (see ``curvature``)."""
        stored = meta["featurize"].get("curvature", "projected")
        curvature = self.curvature or ("kfac" if stored == "kfac" else "projected")
        available = {"kfac": ("kfac", "both"), "projected": ("projected", "both")}[curvature]
        field = "FitArguments.curvature"
        if stored not in available:
            raise refusal(
                StoreError,
                None,
                f"This store was featurized with curvature={stored!r}, so it has no {curvature!r} curvature; fit "
                f"with {mention(field, stored)}, or re-run featurize with FeaturizeArguments(curvature={curvature!r}) "
                "(--curvature) into another store.",
                [(field, stored)],
            )
        if curvature == "projected" and not meta["featurize"].get("fisher_directions") and stored == "kfac":
            raise refusal(StoreError, None, "This store holds no projected Fisher factors; fit with "
                          f"{mention(field, 'kfac')}.", [(field, "kfac")])  # fmt: skip
        return curvature

    def segmentation(self) -> SegmentationArguments | None:
        """The segmentation asked for, or ``None`` (the store's, else the default)."""
        if self.auto_segments is not None:
            return SegmentationArguments(auto=self.auto_segments)
        if self.boundaries is not None:
            return SegmentationArguments(boundaries=tuple(self.boundaries))
        if self.segments_per_stage is not None:
            return SegmentationArguments(per_stage=self.segments_per_stage)
        return None


def trajectory_stages(meta: dict[str, Any]) -> list[Stage]:
    """The stages recorded in a store's metadata."""
    return [Stage(**s) for s in meta["trajectory"]["stages"]]


def param_sizes(meta: dict[str, Any]) -> dict[str, int]:
    """Number of attributed parameters per parameter name, from a store's metadata."""
    return {name: int(np.prod(shape)) for name, shape in meta["params"]}


def store_segments(store: Store, args: FitArguments) -> list[Segment]:
    """The segments a fit with ``args`` uses on this store (see [`FitArguments`][])."""
    return resolve_segments(store, args)[0]


def resolve_segments(store: Store, args: FitArguments) -> tuple[list[Segment], TrajectoryView | None]:
    """The segments a fit with ``args`` uses, and the trajectory view when they were placed automatically."""
    meta = store.meta
    recorded = meta.get("segmentation")
    requested = args.segmentation()
    if recorded is not None and (requested is None or requested.describe() == recorded["arguments"]):
        view = TrajectoryView.from_description(recorded["view"]) if recorded.get("view") else None
        return [Segment.from_description(d) for d in recorded["segments"]], view
    requested = requested or SegmentationArguments()
    stages = trajectory_stages(meta)
    steps = meta["trajectory"]["checkpoints"]
    lr = store.read("trajectory/lr")
    bound = args.fast or any(s.get("preconditioner") for s in (recorded or {}).get("segments", []))
    if requested.auto is not None and is_captured(meta):
        raise StoreError(
            f"The store at {store.path} was captured during training, and automatic segments need per-checkpoint "
            "features; fit it with --segments N (equal parts per stage) or explicit boundaries."
        )
    if is_captured(meta):
        check_boundaries(stages, requested.boundaries)
        cuts = window_cuts(meta, requested.per_stage, requested.boundaries)
        segments = make_segments(stages, steps, lr, param_sizes(meta), boundaries=cuts)
        return captured_preconditioners(store, segments, args.name), None
    if requested.auto is not None and not bound:
        view = store_view(store, requested.auto)
        return make_segments(stages, steps, lr, param_sizes(meta), boundaries=view.cuts), view
    segments = make_segments(
        stages, steps, lr, param_sizes(meta), per_stage=requested.per_stage, boundaries=requested.boundaries
    )
    if recorded is None or not bound:
        return segments, None
    extent = [(s.stage, s.start_step, s.end_step, s.checkpoints) for s in segments]
    if requested.auto is None and extent == [
        (d["stage"], d["start_step"], d["end_step"], tuple(d["checkpoints"])) for d in recorded["segments"]
    ]:
        return [Segment.from_description(d) for d in recorded["segments"]], None
    why = "Fast-SOURCE features" if args.fast else "preconditioned features (Adam, or groups at different rates)"
    raise StoreError(
        f"The store at {store.path} holds {why} computed for the segmentation {recorded['arguments']}, so it cannot be "
        f"fitted with {requested.describe()}; fit without --segments/--boundaries, or re-run featurize with the new "
        "segmentation into another store (or with --force)."
    )


def captured_preconditioners(store: Store, segments: Sequence[Segment], method: str) -> list[Segment]:
    """The segments of a captured store with each preconditioned segment's (Adam, or groups at different rates)
    D_ℓ^{-1/2} named (``methods/<method>/preconditioner/<ℓ>``, written by `prepare`) and, for Adam's coupled L2, its
    decay λ·mean(1/D_ℓ) (``windows.py``; featurize does the same from the saved optimizer states, ``plan.py``)."""
    meta = store.meta
    stages = {s.name: s for s in trajectory_stages(meta)}
    names = [n for n, _ in meta["params"]]
    out = []
    for index, seg in enumerate(segments):
        rule = optimizer_rule(stages[seg.stage], param_sizes(meta))
        if rule.preconditioned:
            decay = seg.weight_decay
            if rule.kind == "adam":
                d = unflatten(segment_denominator(store, seg), meta["params"])
                decay = coupled_decay(rule.decay, d, names)
            seg = replace(seg, preconditioner=f"methods/{method}/preconditioner/{index}", weight_decay=decay)
        out.append(seg)
    return out


def store_view(store: Store, budget: int) -> TrajectoryView:
    """The automatic segmentation of a featurized store into ``budget`` segments, from its stored
    per-checkpoint gradients and Fisher factors (see ``autosegment.py``)."""
    meta = store.meta
    if not (meta.get("products") or {}).get("checkpoints", True):
        raise StoreError(
            f"The store at {store.path} holds only the segments' averaged parameters' features (--fast-only), but "
            "the change between checkpoints reads every checkpoint's; featurize it again without --fast-only, which "
            "adds them."
        )
    return trajectory_view(
        store,
        trajectory_stages(meta),
        meta["trajectory"]["checkpoints"],
        store.read("trajectory/lr"),
        param_sizes(meta),
        budget,
    )


def checkpoint_curvature(
    store: Store, stage: str, step: int | str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """H̃_c = (1/N) Σ_i ũ_i ũ_iᵀ for checkpoint ``step`` (or a feature key such as a segment mean's)
    on ``stage``'s data, float64 ``[k, k]`` on ``device``; N: the examples the array holds (a stage's
    examples, or those ``FeaturizeArguments.fisher_examples`` took)."""
    meta = store.meta
    directions = meta["featurize"]["fisher_directions"]
    source = "grads" if directions == 0 else "fisher"
    key = ckpt_key(step) if isinstance(step, int) else step
    name = f"{source}/{stage}/{key}"
    total: torch.Tensor | None = None
    for _, rows in store.iter_chunks(name):
        x = torch.from_numpy(rows).to(device).double()
        total = x.T @ x if total is None else total.addmm_(x.T, x)
    assert total is not None
    size = store.array(name).shape[0] // max(directions, 1)
    curvature = total / size
    if not torch.isfinite(curvature).all():
        raise NumericalError(
            f"The curvature of checkpoint {key} on stage {stage!r} is not finite; "
            "re-run featurize --force on that store."
        )
    return curvature


def feature_points(store: Store, segments: Sequence[Segment], fast: bool = False, average: str = "steps") -> Points:
    """The stored feature points each segment averages, with their weights (see `FitArguments.average`):
    Fast-SOURCE's segment mean; else its checkpoints, by ``average``. With ``"steps"`` a segment may take the
    checkpoints of its stage around its ends, the stage's closing one included; on Adam stages only those
    featurized in its own coordinates (scaled by its D_ℓ, ``plan.segment_for``)."""
    if fast:
        return [[(seg.mean_key, 1.0)] for seg in segments]
    if average == "checkpoints":
        return [[(ckpt_key(s), 1.0 / len(seg.checkpoints)) for s in seg.checkpoints] for seg in segments]
    return [[(ckpt_key(step), weight) for step, weight in own] for own in step_averages(store, segments)]


def step_averages(store: Store, segments: Sequence[Segment]) -> list[list[tuple[int, float]]]:
    """Each segment's checkpoints and weights in its step average ([`segment_average`][]), on a store's run."""
    meta = store.meta
    stages = {s.name: s for s in trajectory_stages(meta)}
    steps, lr = meta["trajectory"]["checkpoints"], store.read("trajectory/lr")
    return [segment_average(segments, seg, stages[seg.stage], steps, lr) for seg in segments]


def point_keys(points: Points) -> list[list[str]]:
    """The store keys of ``feature_points``, without their weights."""
    return [[key for key, _ in own] for own in points]


def segment_operators(
    store: Store,
    segments: Sequence[Segment],
    points: Points | None = None,
    device: torch.device | str = "cpu",
    curvature: Callable[[str, str], torch.Tensor] | None = None,
    damping_factor: float = 0.0,
) -> list[SegmentOperator]:
    """One eigendecomposition of H̄_ℓ = Σ_c w_c H̃_c + λI per segment (``points``: its feature points and
    weights, default [`feature_points`][] at the default average; ``curvature(stage, key)``: H̃ of one point, default
    [`checkpoint_curvature`][]; λ = the weight decay + ``damping_factor`` × the mean eigenvalue of H̄_ℓ).

    The mean is accumulated point by point: memory is two k × k matrices whatever the number of
    checkpoints.
    """
    if curvature is None:
        curvature = partial(checkpoint_curvature, store, device=device)
    operators = []
    for seg, own in zip(segments, points or feature_points(store, segments), strict=True):
        total = curvature(seg.stage, own[0][0]) * own[0][1]
        for key, weight in own[1:]:
            total.add_(curvature(seg.stage, key), alpha=weight)
        operators.append(SegmentOperator.from_curvature(total, seg.time, seg.weight_decay, damping_factor))
    return operators


def fit(
    store: Store | str | Path,
    args: FitArguments = FitArguments(),
    *,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    shard: Shard | None = None,
) -> Store:
    """Compute SOURCE's operators and cache the training features ``methods/<method>/train/<stage>``.

    The cached feature of training example z is T(z) = −Σ_{ℓ: z∈D_ℓ} (1/N_ℓ) A_ℓ ḡ̃_ℓ(z), so
    score(q, z) = ⟨P ∇f(q; θ_T), T(z)⟩ ≈ −Δf(q, z) (positive = z raised the query's measurement: helped it for a
    margin, harmed it for a loss or an error, see the task's ``positive_helps``). An interrupted fit resumes; a fit
    with other arguments over an existing method needs ``overwrite``. The store is locked while
    fit runs, and a resumed fit recomputes cached chunks whose crc no longer matches. ``device``
    runs the k × k products and eigendecompositions there (default: CUDA when available); memory is
    bounded by one row chunk and a few k × k matrices, not by N or the number of checkpoints.

    Sharded (``shard``, or the ranks of an initialised ``torch.distributed`` process group, see
    ``distributed.py``), every rank writes its block of the cached chunks. With a process group,
    the checkpoints' curvatures are split between the ranks and broadcast in a fixed order, so
    every rank (and a one-process fit) sums exactly the same matrices in the same order: the
    result is bit-identical to a one-process fit. Independent shards each compute every curvature.
    Every rank of the process group calls fit, with the same arguments; the ranks agree before each cached chunk, so
    a rank that fails stops the others within a chunk (docs/howto/distributed.md, "When a rank fails").
    """
    if not isinstance(args, FitArguments):
        raise TaskError(f"fit's args is {args!r}; pass a FitArguments (or leave it out for the defaults).")
    path = store.path if isinstance(store, Store) else str(store)
    try:
        refuse_foreign_directory(path)
    except StoreError:
        Store.open(path)  # fit creates no store: a file or a folder of other files holds none, and is named so
        raise
    group = ranks(shard)
    job = _Fit(path, args, progress, default_device(device), group)
    run_sharded(path, job, group, overwrite=overwrite, keep_new=is_store)
    if isinstance(store, Store):
        store.refresh()
        return store
    return Store.open(path, writable=True)


class _Fit:
    """fit as a sharded job (``distributed.ShardedJob``)."""

    def __init__(self, path: str, args: FitArguments, progress: bool, device: torch.device, group: Ranks) -> None:
        self.path, self.args, self.progress = path, args, progress
        self.device = rank_device(device, group)
        self.method = args.name
        self._operators: list[SegmentOperator] | None = None
        self._curvatures: list[KroneckerCurvature] | None = None

    def _describe(self, store: Store) -> tuple[dict[str, Any], list[Segment]]:
        """The method's description (what ``_claim_method`` records) and its segments; refuses bad arguments."""
        meta = store.meta
        stage_names = [s["name"] for s in meta["trajectory"]["stages"]]
        attributed = list(self.args.stages) if self.args.stages is not None else stage_names
        unknown = [s for s in attributed if s not in stage_names]
        if unknown:
            raise TaskError(f"Unknown stage(s) {unknown}; the trajectory's stages are {stage_names}.")
        captured = is_captured(meta)
        if captured and not meta.get("captured"):  # before the segments, which read what the close writes
            raise StoreError(
                f"The store at {store.path} is still being captured (its training run has not closed its recorder); "
                "finish or resume training, then fit."
            )
        if not captured and not store.is_complete("trajectory/lr"):  # written as featurize starts, dropped as it grows
            command = featurize_command(store)
            how = f"run `{command}`" if command.startswith("source-proj") else command
            raise StoreError(
                f"The store at {store.path} lacks its learning rates ('trajectory/lr'): a featurize or a growth was "
                f"interrupted; {how} to finish it, then fit."
            )
        segments, view = resolve_segments(store, self.args)
        if captured and self.args.fast:
            raise StoreError(f"The store at {store.path} was captured during training; Fast-SOURCE needs featurize.")
        if captured and self.args.average == "checkpoints":
            raise StoreError(
                f"The store at {store.path} was captured during training, so each segment averages its examples' "
                "visits; average='checkpoints' applies to a featurized store's checkpoints only."
            )
        points = [] if captured else feature_points(store, segments, self.args.fast, self.args.average)
        keys = point_keys(points)
        if captured:
            needed = sorted(expected_windows(meta))
        else:
            needed = sorted({f"grads/{seg.stage}/{k}" for seg, ks in zip(segments, keys, strict=True) for k in ks})
        missing = [name for name in needed if not store.has(name)]
        if missing:
            products = meta.get("products") or {}
            if self.args.fast:
                hint = "featurize with segment_means=True (--fast)"
            elif not products.get("checkpoints", True):
                hint = "run featurize with checkpoints=True (without --fast-only)"
            else:
                command = featurize_command(store)
                hint = f"run `{command}` to write them" if command.startswith("source-proj") else command
            raise StoreError(
                f"The store at {store.path} lacks the features {missing[:2]} this fit needs; {hint} first."
            )
        if not captured:  # before the method is recorded: a refused fit leaves none unfinished behind it
            names = [name.split("/", 1)[1] for name in needed]
            arrays = [f"{kind}/{name}" for name in names for kind in ("grads", "fisher")]
            unfinished = [name for name in arrays if store.has(name) and not store.is_complete(name)]
            if unfinished:
                command = featurize_command(store)
                finish = (f"finish it with `{command}` (each missing shard with its --shard), then fit"
                          if command.startswith("source-proj") else f"finish it, then fit: {command} (each missing "
                          "shard with its shard=source_proj.distributed.Shard(i, n))")  # fmt: skip
                raise StoreError(
                    f"The store at {store.path} is not fully featurized ({unfinished[:2]} unfinished): a featurize "
                    f"was interrupted, or not every shard of a split one (--shard i/n) has run; {finish}."
                )
        curvature = self.args.resolve_curvature(meta)
        if curvature == "kfac":
            pairs = {(seg.stage, k) for seg, ks in zip(segments, keys, strict=True) for k in ks}
            needed = sorted(f"kfac/{stage}/{k}/counts" for stage, k in pairs)
            missing = [name for name in needed if not store.has(name)]
            if missing:
                raise StoreError(
                    f"The store at {store.path} lacks the Kronecker factors {missing[:2]} this fit needs; re-run "
                    "featurize on it to finish them."
                )
        query: dict[str, Any] = {"checkpoints": [meta["trajectory"]["checkpoints"][-1]], "weights": [1.0]}
        if segments[-1].preconditioner is not None:
            query["scales"] = [segments[-1].preconditioner]
        blocks = [i for i, seg in enumerate(segments) if seg.stage in attributed]
        dim = meta["projection"]["dim"]
        if curvature == "kfac":
            query["operators"] = {"kind": "kfac", "prefix": f"methods/{self.method}/operators", "blocks": blocks}
            dim *= len(blocks)
        means = step_averages(store, segments) if self.args.fast else None  # Fast-SOURCE's parameter averages
        description = {
            "kind": "fast-source" if self.args.fast else "source",
            "arguments": asdict(self.args),
            "curvature": curvature,
            "damping_factor": self.args.resolve_damping(curvature, meta["projection"]["kind"]),
            "segments": [s.describe() for s in segments],
            "average": None if captured else self.args.average,
            "points": None if captured else [[[key, weight] for key, weight in own] for own in points],
            "means": None if means is None else [[[step, weight] for step, weight in own] for own in means],
            "stages": attributed,
            "dim": dim,
            "query": query,
            "train": self._train_recipe(meta, segments, points, attributed, curvature == "kfac", means),
        }
        if view is not None:
            description["view"] = view.describe()
        if captured:
            description["features"] = "captured"
        return description, segments

    def _train_recipe(
        self,
        meta: dict[str, Any],
        segments: Sequence[Segment],
        points: Points,
        stages: Sequence[str],
        kronecker: bool = False,
        means: Sequence[Sequence[tuple[int, float]]] | None = None,
    ) -> dict[str, Any]:
        """How T(z) is made of gradients at feature points (``query.per_token`` recomputes them per token):
        T(z) = Σ_terms weight · operator · Σ_points w_point · P(s ⊙ ∇ℓ(z; θ_point)), here one term per segment
        with operator A_ℓ (stored by `finish`), weight −1/N and each point's weight from [`feature_points`][]
        (captured stores: its checkpoints alike; Fast-SOURCE: its segment's parameters averaged by ``means``). With
        Kronecker curvature the operators act on the query side: each attributed segment's term fills its own block
        of k columns, without an operator."""
        recorded = [Segment.from_description(d) for d in (meta.get("segmentation") or {}).get("segments", [])]
        sizes = {s["name"]: s["dataset_size"] for s in meta["trajectory"]["stages"]}
        terms = []
        for index, seg in enumerate(segments):
            if seg.stage not in stages:
                continue
            if self.args.fast:
                assert means is not None
                mean = ["mean", [step for step, _ in means[index]], [weight for _, weight in means[index]]]
                terms_points = [{"point": mean, "scale": seg.preconditioner, "weight": 1.0}]
            else:
                own = (
                    [(key_step(key), weight) for key, weight in points[index]] if points
                    else [(step, 1.0 / len(seg.checkpoints)) for step in seg.checkpoints]
                )  # fmt: skip
                terms_points = [
                    {"point": ["checkpoint", step],
                     "scale": segment_for(recorded, seg.stage, step).preconditioner if recorded else seg.preconditioner,
                     "weight": weight}
                    for step, weight in own
                ]  # fmt: skip
            k = meta["projection"]["dim"]
            block = len([s for s in segments[:index] if s.stage in stages]) if kronecker else 0
            terms.append({
                "stage": seg.stage,
                "columns": [block * k, (block + 1) * k],
                "weight": -1.0 / sizes[seg.stage],
                "operator": None if kronecker else f"methods/{self.method}/operators/{index}/folded",
                "points": terms_points,
            })  # fmt: skip
        return {"terms": terms}

    def _items(self, store: Store, description: dict[str, Any], create: bool = False) -> list[tuple[str, int]]:
        """Every (stage, row chunk) of the cached features in a fixed order (``create``: create the arrays)."""
        sizes = {s["name"]: s["dataset_size"] for s in store.meta["trajectory"]["stages"]}
        rows = store.meta["featurize"]["chunk_rows"]
        items = []
        for stage in description["stages"]:
            if create:
                name = f"methods/{self.method}/train/{stage}"
                store.require_array(name, (sizes[stage], description["dim"]), rows, "float32")
                store.pending_chunks(name)
            items.extend((stage, chunk) for chunk in range(-(-sizes[stage] // rows)))
        return items

    def prepare(self, overwrite: bool) -> None:
        store = Store.open(self.path, writable=True)
        description, segments = self._describe(store)
        _claim_method(store, self.method, description, overwrite)
        if is_captured(store.meta):  # a preconditioned segment's D_ℓ^{-1/2}, from its windows
            for seg in segments:
                if seg.preconditioner is not None and not store.is_complete(seg.preconditioner):
                    store.write_whole(seg.preconditioner, segment_denominator(store, seg).rsqrt().float().numpy())
        store.heal(f"methods/{self.method}/operators/")
        self._items(store, description, create=True)

    def ready(self) -> bool:
        if not is_store(self.path):
            return False
        store = Store.open(self.path)
        existing = (store.meta.get("methods") or {}).get(self.method)
        if existing is None or _identity(existing) != _identity(self._describe(store)[0]):
            return False
        names = [f"methods/{self.method}/train/{stage}" for stage in existing["stages"]]
        return all(store.has(name) and store.has(f"progress/{name}") for name in names)

    def work(self, group: Ranks) -> None:
        store = Store.open(self.path, writable=True)
        description = store.meta["methods"][self.method]
        per_shard = store.shard_chunks  # a shard file is written by one process: split at shard boundaries
        mine = group.shard.take_groups(self._items(store, description), lambda item: (item[0], item[1] // per_shard))
        names = {stage: f"methods/{self.method}/train/{stage}" for stage in description["stages"]}
        store.heal_chunks([(names[stage], chunk) for stage, chunk in mine])
        pending = {stage: set(store.pending_chunks(name)) for stage, name in names.items()}
        work = [(stage, chunk) for stage, chunk in mine if chunk in pending[stage]]
        # Ranks of a process group show one progress bar: the busiest rank's (rank 0 may have nothing to compute).
        progress = (group.busiest(len(work)) if group.coordinated else True) and self.progress
        segments = [Segment.from_description(d) for d in description["segments"]]
        sizes = {s["name"]: s["dataset_size"] for s in store.meta["trajectory"]["stages"]}
        if not work and group.single and self._refit_unchanged(store, description, segments):
            return

        def chunks() -> Iterator[tuple[str, int]]:  # under a process group the ranks agree before each (``paced``)
            return tqdm(group.paced(work), desc="fit", unit="chunk", total=len(work), disable=not progress)

        if description.get("curvature") == "kfac":
            points = described_points(description)
            self._curvatures = [
                kronecker_curvature(store, seg, own, description["damping_factor"])
                for seg, own in zip(segments, points, strict=True)
            ]
            blocks = description["query"]["operators"]["blocks"]
            for stage, chunk in chunks():
                values = _segment_blocks(store, stage, chunk, sizes[stage], segments, points, blocks)
                store.write_chunk(names[stage], chunk, values)
            return
        means: Callable[[str, int, Sequence[Segment]], list[torch.Tensor]]
        windows = None
        if is_captured(store.meta):
            windows = WindowGradients(store, segments)
            self._operators = [
                SegmentOperator.from_curvature(
                    window_curvature(store, seg, self.device), seg.time, seg.weight_decay, description["damping_factor"]
                )
                for seg in segments
            ]
            means = windows
        else:
            points = described_points(description)
            self._operators = segment_operators(
                store,
                segments,
                points,
                self.device,
                _shared_curvature(store, segments, point_keys(points), self.device, group),
                description["damping_factor"],
            )
            means = partial(_checkpoint_means, store, dict(zip(segments, points, strict=True)))
        folded = dict(zip(segments, fold(self._operators), strict=True))
        for stage, chunk in chunks():
            own = [seg for seg in segments if seg.stage == stage]
            if not own:
                raise TaskError(
                    f"Stage {stage!r} has no segment with checkpoints, so its examples cannot be attributed."
                )
            total = sum(g.to(self.device) @ folded[seg].T for seg, g in zip(own, means(stage, chunk, own), strict=True))
            assert isinstance(total, torch.Tensor)
            store.write_chunk(names[stage], chunk, (-total / sizes[stage]).float().cpu().numpy())
        if windows is not None:
            windows.warn()

    def _refit_unchanged(self, store: Store, description: dict[str, Any], segments: Sequence[Segment]) -> bool:
        """A finished projected fit run again with the same arguments: every cached chunk passed its crc check
        and every operator is stored, so nothing is recomputed. The curvature's inputs are still read
        (crc-checked), so a damaged one is named as a fresh fit would name it."""
        if description.get("curvature") == "kfac" or is_captured(store.meta):
            return False
        prefix = f"methods/{self.method}/operators"
        parts = [f"{prefix}/{i}/{part}" for i in range(len(segments)) for part in ("eigvals", "folded")]
        if not all(store.is_complete(name) for name in parts):
            return False
        source = "grads" if store.meta["featurize"]["fisher_directions"] == 0 else "fisher"
        for seg, keys in zip(segments, point_keys(described_points(description)), strict=True):
            for key in keys:
                store.check_readable(f"{source}/{seg.stage}/{key}")
        return True

    def finish(self) -> bool:
        store = Store.open(self.path, writable=True)
        description = store.meta["methods"][self.method]
        if any(store.pending_chunks(f"methods/{self.method}/train/{stage}") for stage in description["stages"]):
            return False
        operators = self._operators or []
        for index, (op, folded) in enumerate(zip(operators, fold(operators), strict=True)):
            name = f"methods/{self.method}/operators/{index}"
            if not store.is_complete(f"{name}/eigvals"):
                store.write_whole(f"{name}/eigvals", op.eigvals.cpu().numpy())
            if not store.is_complete(f"{name}/folded"):  # A_ℓ, for per-token scores (the train recipe)
                store.write_whole(f"{name}/folded", folded.float().cpu().numpy())
        if description.get("curvature") == "kfac":
            curvatures = self._curvatures
            if curvatures is None:  # another process did the work
                segments = [Segment.from_description(d) for d in description["segments"]]
                curvatures = [
                    kronecker_curvature(store, seg, own, description["damping_factor"])
                    for seg, own in zip(segments, described_points(description), strict=True)
                ]
            for index, curvature in enumerate(curvatures):
                write_curvature(store, f"methods/{self.method}/operators/{index}", curvature)
        _finish_method(store, self.method)
        return True


def _shared_curvature(
    store: Store, segments: Sequence[Segment], keys: Sequence[Sequence[str]], device: torch.device, group: Ranks
) -> Callable[[str, str], torch.Tensor] | None:
    """H̃ of each feature point with the points split between the ranks of a process group: each
    rank computes its block (in parallel), then every point is broadcast from its rank in the fixed
    order of ``segment_operators``. ``None`` (every point computed here) without a process group."""
    if not group.coordinated:
        return None
    points = list(dict.fromkeys((seg.stage, key) for seg, ks in zip(segments, keys, strict=True) for key in ks))
    owner = {p: rank for rank in range(group.shard.world) for p in Shard(rank, group.shard.world).take(points)}
    own: dict[tuple[str, str], torch.Tensor] = {}
    error = None
    try:
        own = {p: checkpoint_curvature(store, *p, device=device) for p in group.shard.take(points)}
    except Exception as err:
        error = err
    group.agree(error)
    dim = int(store.meta["projection"]["dim"])

    def curvature(stage: str, key: str) -> torch.Tensor:
        point = (stage, key)
        held = own.get(point, torch.empty((dim, dim), dtype=torch.float64, device=device))
        return group.broadcast(held, owner[point]).clone()

    return curvature


def _checkpoint_means(
    store: Store,
    points: dict[Segment, Sequence[tuple[str, float]]],
    stage: str,
    chunk: int,
    segments: Sequence[Segment],
) -> list[torch.Tensor]:
    """ḡ_ℓ(z) = Σ_c w_c g̃_c(z) over the segment's feature points and weights, float64 ``[rows, k]`` per segment."""
    out = []
    for seg in segments:
        total = sum(
            torch.from_numpy(store.read_chunk(f"grads/{stage}/{key}", chunk)).double() * weight
            for key, weight in points[seg]
        )
        assert isinstance(total, torch.Tensor)
        out.append(total)
    return out


def described_points(description: dict[str, Any]) -> Points:
    """The feature points and weights a fitted method's description records (see [`feature_points`][]); a
    description written before they were recorded averaged each segment's checkpoints (or its mean) alike."""
    if description.get("points") is None:
        segments = [Segment.from_description(d) for d in description["segments"]]
        return [[(key, 1.0 / len(keys)) for key in keys] for keys in
                ([s.mean_key] if description["kind"] == "fast-source" else [ckpt_key(c) for c in s.checkpoints]
                 for s in segments)]  # fmt: skip
    return [[(str(key), float(weight)) for key, weight in own] for own in description["points"]]


def _claim_method(
    store: Store, method: str, description: dict[str, Any], overwrite: bool, arguments: str = "FitArguments"
) -> None:
    """Record ``method`` as being fitted with ``description``; refuse one fitted with other settings unless
    ``overwrite`` (``arguments``: the class whose ``method=`` names another, for the refusal's advice)."""
    methods = dict(store.meta.get("methods") or {})
    existing = methods.get(method)
    if existing is not None:
        same = _identity(existing) == _identity(description)
        if same and not overwrite:
            return
        if not same and not overwrite:
            differing = _differences(existing, description)
            raise StoreError(
                f"Method {method!r} in {store.path} was fitted with other settings ({differing}); pass --force "
                f"(overwrite=True) to replace it, or fit under another --method name ({arguments}(method=...))."
            )
        store.delete(f"methods/{method}")
    methods[method] = {**description, "complete": False}
    store.update_meta(methods=methods)


def _identity(description: dict[str, Any]) -> Any:
    """What determines a fitted method's result: its description without the raw arguments (two
    spellings of the same request, e.g. a default left out or given, fit the same method) and
    without its completion flag, normalised through JSON (tuples and lists compare equal)."""
    described = {k: v for k, v in description.items() if k not in ("arguments", "complete", "train", "points", "means")}
    if described.get("average") is None:  # captured stores: the rule does not apply
        described.pop("average", None)
    if "points" not in description and description.get("kind") in ("source", "fast-source") and (
        "features" not in description
    ):
        described["average"] = "checkpoints"  # fitted before `FitArguments.average`: the plain mean was the rule
    return json.loads(json.dumps(described))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between a fitted method and a fit asked for, in a few words: ``"segments: 1 → 3, damping
    factor: 0.3 → 1"`` (a segmentation that featurize fixed is one such difference)."""
    before, after = _identity(old), _identity(new)
    parts = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key):
            continue
        if key == "segments":
            parts.append(f"segments: {len(before.get(key) or [])} → {len(after.get(key) or [])}"
                         if len(before.get(key) or []) != len(after.get(key) or []) else "segment boundaries")
        elif isinstance(before.get(key), (str, int, float)) and isinstance(after.get(key), (str, int, float)):
            parts.append(f"{key.replace('_', ' ')}: {before[key]} → {after[key]}")
        else:
            parts.append(key.replace("_", " "))
    return ", ".join(parts) or "its description"


def _finish_method(store: Store, method: str) -> None:
    methods = dict(store.meta["methods"])
    for stage in methods[method]["stages"]:
        store.pack(f"methods/{method}/train/{stage}")
    methods[method] = {**methods[method], "complete": True}
    store.update_meta(methods=methods)


def kronecker_curvature(
    store: Store, segment: Segment, points: Sequence[tuple[str, float]], damping_factor: float = 0.0
) -> KroneckerCurvature:
    """One segment's Kronecker curvature from the factor sums featurize stored for its feature points
    (``kfac/<stage>/<key>/…``): A and B averaged over the points' positions and examples, each point's sums
    counted with its weight ([`feature_points`][]), eigendecomposed,
    damped by λ = the weight decay + ``damping_factor`` × its mean eigenvalue;
    in Adam's coordinates (docs/concepts/source.md §6) when the segment has a preconditioner: the factors of
    D^{-1/2} ⊙ G with D^{-1/2} ≈ r cᵀ per layer (its rank-one fit weighted by Adam's second moment, as the
    factored projection's ``adam_rank=1``), and D^{-1} times the diagonal."""
    meta = store.meta
    layers, diagonal = layers_from_description(meta["featurize"]["kronecker"])
    a_sum = [np.zeros((layer.in_rows, layer.in_rows)) for layer in layers]
    b_sum = [np.zeros((layer.out_features, layer.out_features)) for layer in layers]
    positions = np.zeros(len(layers))
    examples = 0.0
    diag_sum: dict[str, np.ndarray] = {}
    for key, weight in points:
        base = f"kfac/{segment.stage}/{key}"
        counts = store.read(f"{base}/counts").sum(0)
        positions += weight * counts[:-1]
        examples += weight * counts[-1]
        for i in range(len(layers)):
            a_sum[i] += weight * store.read(f"{base}/{i}/a").sum(0)
            b_sum[i] += weight * store.read(f"{base}/{i}/b").sum(0)
        for name in diagonal:
            values = weight * store.read(f"{base}/diagonal/{name}").sum(0)
            diag_sum[name] = values if name not in diag_sum else diag_sum[name] + values
    scale = None
    if segment.preconditioner is not None:
        scale = unflatten(torch.from_numpy(store.read(segment.preconditioner)).double(), meta["params"])
    factors = []
    for i, layer in enumerate(layers):
        a = torch.from_numpy(a_sum[i] / max(positions[i], 1.0))
        b = torch.from_numpy(b_sum[i] / max(examples, 1.0))
        if scale is not None:
            terms = scaling_transform(scale, [layer], rank=1).layer(layer.weight)
            assert terms is not None
            row, col = terms.left[0].double(), terms.right[0].double()
            a = a * torch.outer(col, col)
            b = b * torch.outer(row, row)
        factors.append(LayerFactors.from_factors(a, b))
    diag = {}
    for name in diagonal:
        d = torch.from_numpy(diag_sum[name] / max(examples, 1.0))
        diag[name] = d * scale[name] ** 2 if scale is not None else d
    if not all(bool(torch.isfinite(f.a_values).all() and torch.isfinite(f.b_values).all()) for f in factors):
        raise NumericalError(
            f"The Kronecker factors of segment {segment.start_step}–{segment.end_step} are not finite; re-run "
            "featurize --force on that store."
        )
    curvature = KroneckerCurvature(tuple(layers), tuple(factors), diag, segment.weight_decay)
    if damping_factor:
        curvature = replace(curvature, damping=segment.weight_decay + damping_factor * curvature.mean_eigenvalue())
    return curvature


def write_curvature(store: Store, prefix: str, curvature: KroneckerCurvature) -> None:
    """Store a segment's eigendecomposed factors and its λ under ``prefix`` (what queries apply)."""
    if not store.is_complete(f"{prefix}/damping"):
        store.write_whole(f"{prefix}/damping", np.array([curvature.damping]))
    for i, f in enumerate(curvature.factors):
        for part, values in (("qa", f.a_vectors), ("la", f.a_values), ("qb", f.b_vectors), ("lb", f.b_values)):
            name = f"{prefix}/{i}/{part}"
            if not store.is_complete(name):
                store.write_whole(name, values.numpy())
    for param, values in curvature.diagonal.items():
        name = f"{prefix}/diagonal/{param}"
        if not store.is_complete(name):
            store.write_whole(name, values.numpy().reshape(1, -1) if values.dim() == 0 else values.numpy())


def read_curvature(store: Store, prefix: str, damping: float) -> KroneckerCurvature:
    """Inverse of :func:`write_curvature` (the layers come from the store's featurize metadata); ``damping``
    is the λ of a method fitted before λ was stored (its weight decay)."""
    if store.has(f"{prefix}/damping"):
        damping = float(store.read(f"{prefix}/damping")[0])
    layers, diagonal = layers_from_description(store.meta["featurize"]["kronecker"])
    shapes = {name: tuple(shape) for name, shape in store.meta["params"]}
    factors = []
    for i in range(len(layers)):
        parts = {part: torch.from_numpy(store.read(f"{prefix}/{i}/{part}")) for part in ("qa", "la", "qb", "lb")}
        factors.append(LayerFactors(parts["qa"], parts["la"], parts["qb"], parts["lb"]))
    diag = {name: torch.from_numpy(store.read(f"{prefix}/diagonal/{name}")).reshape(shapes[name]) for name in diagonal}
    return KroneckerCurvature(tuple(layers), tuple(factors), diag, damping)


def _segment_blocks(
    store: Store,
    stage: str,
    chunk: int,
    size: int,
    segments: Sequence[Segment],
    points: Points,
    blocks: Sequence[int],
) -> np.ndarray:
    """Cached features of one chunk for the Kronecker path: per attributed segment ℓ the block −ḡ̃_ℓ(z)/N
    (zero where z is not in D_ℓ), concatenated in segment order."""
    own = [segments[i] for i in blocks if segments[i].stage == stage]
    if not own:
        raise TaskError(f"Stage {stage!r} has no segment with checkpoints, so its examples cannot be attributed.")
    means = dict(zip(own, _checkpoint_means(store, dict(zip(segments, points, strict=True)), stage, chunk, own),
                     strict=True))  # fmt: skip
    rows, k = next(iter(means.values())).shape
    zero = torch.zeros(rows, k, dtype=torch.float64)
    parts = [-means[segments[i]] / size if segments[i] in means else zero for i in blocks]
    return torch.cat(parts, dim=1).float().numpy()
