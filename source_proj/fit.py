"""fit: per-segment curvature, SOURCE operators, and the cached training-feature matrix.

Reads only the store (no model, no data): the projected Fisher factors give each checkpoint's
curvature H̃_c = (1/N) Σ_i ũ_i ũ_iᵀ, segments average them (+ λI) and are eigendecomposed once,
and one pass over the stored gradients folds every operator into T(z) (see source.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import NumericalError, StoreError, TaskError
from .featurize import default_device
from .segments import Segment, make_segments
from .source import SegmentOperator, fold
from .store import Store, ckpt_key
from .trajectory import Stage


@dataclass(frozen=True)
class FitArguments:
    """How the trajectory is segmented and which data are attributed.

    Attributes:
        segments_per_stage: equal parts (by step) each stage is cut into (the paper uses 3).
        boundaries: explicit global steps to cut at instead (stage boundaries are always cut).
        stages: attribute to these stages' examples only (e.g. the pre-training data); default all.
        method: name under which the result is stored (``methods/<method>``).
    """

    segments_per_stage: int = 3
    boundaries: tuple[int, ...] | None = None
    stages: tuple[str, ...] | None = None
    method: str = "source"


def trajectory_stages(meta: dict[str, Any]) -> list[Stage]:
    """The stages recorded in a store's metadata."""
    return [Stage(**s) for s in meta["trajectory"]["stages"]]


def param_sizes(meta: dict[str, Any]) -> dict[str, int]:
    """Number of attributed parameters per parameter name, from a store's metadata."""
    return {name: int(np.prod(shape)) for name, shape in meta["params"]}


def store_segments(store: Store, args: FitArguments) -> list[Segment]:
    """The segments a fit with ``args`` uses on this store."""
    meta = store.meta
    return make_segments(
        trajectory_stages(meta),
        meta["trajectory"]["checkpoints"],
        store.read("trajectory/lr"),
        param_sizes(meta),
        per_stage=args.segments_per_stage,
        boundaries=args.boundaries,
    )


def checkpoint_curvature(store: Store, stage: str, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """H̃_c = (1/N) Σ_i ũ_i ũ_iᵀ for checkpoint ``step`` on ``stage``'s data, float64 ``[k, k]`` on ``device``."""
    meta = store.meta
    directions = meta["featurize"]["fisher_directions"]
    source = "grads" if directions == 0 else "fisher"
    name = f"{source}/{stage}/{ckpt_key(step)}"
    total: torch.Tensor | None = None
    for _, rows in store.iter_chunks(name):
        x = torch.from_numpy(rows).to(device).double()
        total = x.T @ x if total is None else total.addmm_(x.T, x)
    assert total is not None
    size = next(s["dataset_size"] for s in meta["trajectory"]["stages"] if s["name"] == stage)
    curvature = total / size
    if not torch.isfinite(curvature).all():
        raise NumericalError(
            f"The curvature of checkpoint {ckpt_key(step)} on stage {stage!r} is not finite; "
            "re-run featurize --force on that store."
        )
    return curvature


def segment_operators(
    store: Store, segments: Sequence[Segment], device: torch.device | str = "cpu"
) -> list[SegmentOperator]:
    """One eigendecomposition of H̄_ℓ = mean_c H̃_c + λI per segment.

    The mean is accumulated checkpoint by checkpoint: memory is two k × k matrices whatever the
    number of checkpoints.
    """
    operators = []
    for seg in segments:
        total = checkpoint_curvature(store, seg.stage, seg.checkpoints[0], device)
        for step in seg.checkpoints[1:]:
            total += checkpoint_curvature(store, seg.stage, step, device)
        operators.append(SegmentOperator.from_curvature(total / len(seg.checkpoints), seg.time, seg.weight_decay))
    return operators


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
    with other arguments over an existing method needs ``overwrite``. ``device`` runs the k × k
    products and eigendecompositions there (default: CUDA when available); memory is bounded by one
    row chunk and a few k × k matrices, not by N or the number of checkpoints.
    """
    if not isinstance(store, Store):
        store = Store.open(store, writable=True)
    meta = store.meta
    stage_names = [s["name"] for s in meta["trajectory"]["stages"]]
    attributed = list(args.stages) if args.stages is not None else stage_names
    unknown = [s for s in attributed if s not in stage_names]
    if unknown:
        raise TaskError(f"Unknown stage(s) {unknown}; the trajectory's stages are {stage_names}.")
    segments = store_segments(store, args)
    description = {
        "kind": "source",
        "arguments": asdict(args),
        "segments": [s.describe() for s in segments],
        "stages": attributed,
        "dim": meta["projection"]["dim"],
        "query": {"checkpoints": [meta["trajectory"]["checkpoints"][-1]], "weights": [1.0]},
    }
    _claim_method(store, args.method, description, overwrite)

    operators = segment_operators(store, segments, default_device(device))
    folded = fold(operators)
    for index, op in enumerate(operators):
        name = f"methods/{args.method}/operators/{index}/eigvals"
        if not store.is_complete(name):
            store.write_whole(name, op.eigvals.cpu().numpy())

    work = []
    for stage in attributed:
        size = next(s["dataset_size"] for s in meta["trajectory"]["stages"] if s["name"] == stage)
        name = f"methods/{args.method}/train/{stage}"
        store.require_array(name, (size, description["dim"]), meta["featurize"]["chunk_rows"], "float32")
        work.extend((stage, chunk) for chunk in store.pending_chunks(name))
    for stage, chunk in tqdm(work, desc="fit", unit="chunk", disable=not progress):
        size = next(s["dataset_size"] for s in meta["trajectory"]["stages"] if s["name"] == stage)
        store.write_chunk(
            f"methods/{args.method}/train/{stage}", chunk, _fold_chunk(store, stage, chunk, size, segments, folded)
        )
    _finish_method(store, args.method)
    return store


def _fold_chunk(
    store: Store, stage: str, chunk: int, size: int, segments: Sequence[Segment], folded: Sequence[torch.Tensor]
) -> np.ndarray:
    total: torch.Tensor | None = None
    for seg, a in zip(segments, folded, strict=True):
        if seg.stage != stage:
            continue
        mean = None
        for step in seg.checkpoints:
            arr = store.array(f"grads/{stage}/{ckpt_key(step)}")
            rows = arr.chunks[0]
            g = torch.from_numpy(np.asarray(arr[chunk * rows : (chunk + 1) * rows])).to(a.device).double()
            mean = g if mean is None else mean + g
        assert mean is not None
        mean /= len(seg.checkpoints)
        contribution = mean @ a.T
        total = contribution if total is None else total + contribution
    if total is None:
        raise TaskError(f"Stage {stage!r} has no segment with checkpoints, so its examples cannot be attributed.")
    return (-total / size).float().cpu().numpy()


def _claim_method(store: Store, method: str, description: dict[str, Any], overwrite: bool) -> None:
    methods = dict(store.meta.get("methods") or {})
    existing = methods.get(method)
    if existing is not None:
        same = {k: v for k, v in existing.items() if k != "complete"} == description
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


def _finish_method(store: Store, method: str) -> None:
    methods = dict(store.meta["methods"])
    methods[method] = {**methods[method], "complete": True}
    store.update_meta(methods=methods)
