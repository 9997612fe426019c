"""fit: per-segment curvature, SOURCE operators, and the cached training-feature matrix.

Reads only the store (no model, no data): the projected Fisher factors give each checkpoint's
curvature H̃_c = (1/N) Σ_i ũ_i ũ_iᵀ, segments average them (+ λI) and are eigendecomposed once,
and one pass over the stored gradients folds every operator into T(z) (see source.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .autosegment import TrajectoryView, trajectory_view
from .errors import NumericalError, StoreError, TaskError
from .featurize import default_device
from .locking import writes_store
from .segments import Segment, SegmentationArguments, make_segments
from .source import SegmentOperator, fold
from .store import Store, ckpt_key
from .trajectory import Stage


@dataclass(frozen=True)
class FitArguments:
    """How the trajectory is segmented and which data are attributed.

    With none of ``segments_per_stage``, ``boundaries``, ``auto_segments`` given, fit uses the
    segmentation recorded by featurize, else 3 equal parts per stage. A store whose features
    depend on the segmentation (Adam/AdamW runs, Fast-SOURCE) refuses any other.

    Attributes:
        segments_per_stage: equal parts (by step) each stage is cut into (the paper uses 3).
        boundaries: explicit global steps to cut at instead (stage boundaries are always cut).
        auto_segments: L, a budget of segments placed automatically where the projected curvature
            and gradients change most (``autosegment.py``).
        stages: attribute to these stages' examples only (e.g. the pre-training data); default all.
            An example of stage s is credited through the segments that trained on it and carried
            to θ_T by every later segment's survival S (SOURCE_MATH.md §3).
        fast: Fast-SOURCE: gradients and curvature at each segment's averaged parameters (needs
            featurize with ``segment_means=True``).
        method: name under which the result is stored (``methods/<method>``); default
            ``"fast-source"`` with ``fast``, else ``"source"``.
    """

    segments_per_stage: int | None = None
    boundaries: tuple[int, ...] | None = None
    stages: tuple[str, ...] | None = None
    method: str | None = None
    auto_segments: int | None = None
    fast: bool = False

    @property
    def name(self) -> str:
        """The method name the result is stored under."""
        return self.method or ("fast-source" if self.fast else "source")

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
    """The segments a fit with ``args`` uses on this store (see :class:`FitArguments`)."""
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
    why = "Fast-SOURCE features" if args.fast else "Adam-preconditioned features"
    raise StoreError(
        f"The store at {store.path} holds {why} computed for the segmentation {recorded['arguments']}, so it cannot be "
        f"fitted with {requested.describe()}; fit without --segments/--boundaries, or re-run featurize with the new "
        "segmentation into another store (or with --force)."
    )


def store_view(store: Store, budget: int) -> TrajectoryView:
    """The automatic segmentation of a featurized store into ``budget`` segments, from its stored
    per-checkpoint gradients and Fisher factors (see ``autosegment.py``)."""
    meta = store.meta
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
    on ``stage``'s data, float64 ``[k, k]`` on ``device``."""
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
    size = next(s["dataset_size"] for s in meta["trajectory"]["stages"] if s["name"] == stage)
    curvature = total / size
    if not torch.isfinite(curvature).all():
        raise NumericalError(
            f"The curvature of checkpoint {key} on stage {stage!r} is not finite; "
            "re-run featurize --force on that store."
        )
    return curvature


def feature_keys(segments: Sequence[Segment], fast: bool = False) -> list[list[str]]:
    """The stored feature points averaged in each segment: its checkpoints, or (Fast-SOURCE) its mean."""
    return [[seg.mean_key] if fast else [ckpt_key(s) for s in seg.checkpoints] for seg in segments]


def segment_operators(
    store: Store,
    segments: Sequence[Segment],
    keys: Sequence[Sequence[str]] | None = None,
    device: torch.device | str = "cpu",
) -> list[SegmentOperator]:
    """One eigendecomposition of H̄_ℓ = mean_c H̃_c + λI per segment (``keys``: its feature points,
    default its checkpoints).

    The mean is accumulated point by point: memory is two k × k matrices whatever the number of
    checkpoints.
    """
    operators = []
    for seg, points in zip(segments, keys or feature_keys(segments), strict=True):
        total = checkpoint_curvature(store, seg.stage, points[0], device)
        for key in points[1:]:
            total += checkpoint_curvature(store, seg.stage, key, device)
        operators.append(SegmentOperator.from_curvature(total / len(points), seg.time, seg.weight_decay))
    return operators


@writes_store("store")
def fit(
    store: Store | str | Path,
    args: FitArguments = FitArguments(),
    *,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> Store:
    """Compute SOURCE's operators and cache the training features ``methods/<method>/train/<stage>``.

    The cached feature of training example z is T(z) = −Σ_{ℓ: z∈D_ℓ} (1/N_ℓ) A_ℓ ḡ̃_ℓ(z), so
    score(q, z) = ⟨P ∇f(q; θ_T), T(z)⟩ (positive = helpful). An interrupted fit resumes; a fit
    with other arguments over an existing method needs ``overwrite``. The store is locked while
    fit runs, and a resumed fit recomputes cached chunks whose crc no longer matches. ``device``
    runs the k × k products and eigendecompositions there (default: CUDA when available); memory is
    bounded by one row chunk and a few k × k matrices, not by N or the number of checkpoints.
    """
    if not isinstance(store, Store):
        store = Store.open(store, writable=True)
    meta = store.meta
    stage_names = [s["name"] for s in meta["trajectory"]["stages"]]
    attributed = list(args.stages) if args.stages is not None else stage_names
    unknown = [s for s in attributed if s not in stage_names]
    if unknown:
        raise TaskError(f"Unknown stage(s) {unknown}; the trajectory's stages are {stage_names}.")
    segments, view = resolve_segments(store, args)
    keys = feature_keys(segments, args.fast)
    needed = sorted({f"grads/{seg.stage}/{k}" for seg, ks in zip(segments, keys, strict=True) for k in ks})
    missing = [name for name in needed if not store.has(name)]
    if missing:
        hint = "featurize with segment_means=True (--fast)" if args.fast else "run featurize with checkpoints=True"
        raise StoreError(f"The store at {store.path} lacks the features {missing[:2]} this fit needs; {hint} first.")
    query = {"checkpoints": [meta["trajectory"]["checkpoints"][-1]], "weights": [1.0]}
    if segments[-1].preconditioner is not None:
        query["scales"] = [segments[-1].preconditioner]
    description = {
        "kind": "fast-source" if args.fast else "source",
        "arguments": asdict(args),
        "segments": [s.describe() for s in segments],
        "stages": attributed,
        "dim": meta["projection"]["dim"],
        "query": query,
    }
    if view is not None:
        description["view"] = view.describe()
    method = args.name
    _claim_method(store, method, description, overwrite)
    store.heal(f"methods/{method}/")

    operators = segment_operators(store, segments, keys, default_device(device))
    folded = fold(operators)
    for index, op in enumerate(operators):
        name = f"methods/{method}/operators/{index}/eigvals"
        if not store.is_complete(name):
            store.write_whole(name, op.eigvals.cpu().numpy())

    work = []
    for stage in attributed:
        size = next(s["dataset_size"] for s in meta["trajectory"]["stages"] if s["name"] == stage)
        name = f"methods/{method}/train/{stage}"
        store.require_array(name, (size, description["dim"]), meta["featurize"]["chunk_rows"], "float32")
        work.extend((stage, chunk) for chunk in store.pending_chunks(name))
    for stage, chunk in tqdm(work, desc="fit", unit="chunk", disable=not progress):
        size = next(s["dataset_size"] for s in meta["trajectory"]["stages"] if s["name"] == stage)
        store.write_chunk(
            f"methods/{method}/train/{stage}", chunk, _fold_chunk(store, stage, chunk, size, segments, keys, folded)
        )
    _finish_method(store, method)
    return store


def _fold_chunk(
    store: Store,
    stage: str,
    chunk: int,
    size: int,
    segments: Sequence[Segment],
    keys: Sequence[Sequence[str]],
    folded: Sequence[torch.Tensor],
) -> np.ndarray:
    total: torch.Tensor | None = None
    for seg, points, a in zip(segments, keys, folded, strict=True):
        if seg.stage != stage:
            continue
        mean = None
        for key in points:
            g = torch.from_numpy(store.read_chunk(f"grads/{stage}/{key}", chunk)).to(a.device).double()
            mean = g if mean is None else mean + g
        assert mean is not None
        mean /= len(points)
        contribution = mean @ a.T
        total = contribution if total is None else total + contribution
    if total is None:
        raise TaskError(f"Stage {stage!r} has no segment with checkpoints, so its examples cannot be attributed.")
    return (-total / size).float().cpu().numpy()


def _claim_method(store: Store, method: str, description: dict[str, Any], overwrite: bool) -> None:
    methods = dict(store.meta.get("methods") or {})
    existing = methods.get(method)
    if existing is not None:
        same = _identity(existing) == _identity(description)
        if same and not overwrite:
            return
        if not same and not overwrite:
            raise StoreError(
                f"Method {method!r} in {store.path} was fitted with other settings; pass --force (overwrite=True) "
                "to replace it, or fit under another --method name."
            )
        store.delete(f"methods/{method}")
    methods[method] = {**description, "complete": False}
    store.update_meta(methods=methods)


def _identity(description: dict[str, Any]) -> Any:
    """What determines a fitted method's result: its description without the raw arguments (two
    spellings of the same request, e.g. a default left out or given, fit the same method) and
    without its completion flag, normalised through JSON (tuples and lists compare equal)."""
    return json.loads(json.dumps({k: v for k, v in description.items() if k not in ("arguments", "complete")}))


def _finish_method(store: Store, method: str) -> None:
    methods = dict(store.meta["methods"])
    methods[method] = {**methods[method], "complete": True}
    store.update_meta(methods=methods)
