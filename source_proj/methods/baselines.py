"""Baselines fitted into the same store as SOURCE, with the same score sign.

Every baseline is a fitted method like SOURCE: cached training features ``methods/<name>/train/<stage>``
and a query recipe in ``meta["methods"][name]`` (see query.py), so that score(q, z) = ⟨q̃, T(z)⟩,
positive = z raised the query's measurement (as SOURCE's: helped q for a margin, harmed it for a loss or an error),
and the [`Attributor`][], its FAISS top-k and the
evaluation serve them unchanged. With g̃_c(z) = P ∇ℓ(z; θ_c) and Φ̃ = [P ∇f(z_i; θ_T)]_i (stored by
featurize), q̃_c = P ∇f(q; θ_c), T the final checkpoint and N the attributed stage's size::

    grad-dot  T(z) = −g̃_T(z)                       q̃ = q̃_T             score = −∇f(q)·∇ℓ(z)
    grad-cos  T(z) = −g̃_T(z)/‖g̃_T(z)‖               q̃ = q̃_T/‖q̃_T‖       score = −cos(∇f(q), ∇ℓ(z))
    tracin    T(z) = concat_c −(√w_c/N) g̃_c(z)      q̃ = concat_c √w_c q̃_c
              score = −(1/N) Σ_c w_c ∇f(q; θ_c)·∇ℓ(z; θ_c)   (TracIn-CP, Pruthi et al. 2020)
    if        T(z) = −(1/N)(H̃ + δI)⁻¹ g̃_T(z)        H̃ = Fisher at θ_T, δ = damping_factor · mean eig(H̃)
    trak      T(z) = −R(RᵀΦ̃ᵀΦ̃R)⁺Rᵀ g̃_T(z)          (Park et al. 2023, Gauss–Newton of the margin; R [k, d])
    repsim    T(z) = h(z)/‖h(z)‖                    q̃ = h(q)/‖h(q)‖      h = Task.representation at θ_T

**TRAK.** Its estimator is φ(q)ᵀ(ΦᵀΦ)⁻¹ φ(z)(1 − p_z), φ the margin gradient and p_z the probability
of z's label. For cross-entropy ℓ = log(1 + e^{−f}) of the margin f, so ∇ℓ(z) = −(1 − p_z) ∇f(z)
exactly: the reweighted feature φ(z)(1 − p_z) *is* −∇ℓ(z), which featurize already stores, and
which keeps full precision where p_z → 1. (For a task whose loss is not a function of its
measurement this is TRAK with the loss gradient as the reweighted feature.) No damping, as in TRAK,
but a pseudo-inverse: eigenvalues below ``rcond``·σ_max (default 1e-6, the float32 rounding level of
the stored gradients) count as zero. ΦᵀΦ is exactly singular whenever k exceeds its rank (k ≥ N, or
the identity projection: the margin ignores a common shift of all logits), and every gradient is
orthogonal to that null space. Well before that, as d approaches N, the kernel is near-singular and
TRAK's attributions collapse: on the digits settings of issue 12 (N = 1,297) its LDS fell from 0.43 at
d = 32 to 0.08 at d = 1,024 (BENCHMARKS.md, "Issue 12: peers and baselines at best practice"). So
the kernel is fitted on d = ``trak_dim`` coordinates, by default min(k, N/10): R is a seeded Gaussian
sub-projection ``[k, d]`` of the stored features (R = I when d = k), whose composition with P is
again a JL projection; TRAK's estimator is unchanged by the scale of R. This mirrors traker's
practice of a projection dimension well below N (its default ``proj_dim`` 2,048 for CIFAR-10's
N = 50,000, ≈ N/25); a ``trak_dim`` above N/2 draws a warning.

**TracIn-CP** mirrors dattri's ``TracInAttributor`` (``weight_list`` = learning rates, no
normalisation; our TracIn-CP and dattri's agreed to 0.001 in LDS on issue 12's ``early``).
Checkpoints c saved during a stage (start < c ≤ end, so the last is the stage's final parameters);
w_c is the sum of the effective learning rates of the steps since the previous such
checkpoint (or the stage start), i.e. η_c times the steps c stands for: w_c ∝ η_c for evenly spaced
checkpoints, as in Pruthi et al. The effective rate is SOURCE's (``optimizers.optimizer_rule``): η/(1−β) under
heavy-ball momentum β, which moves the weights that much per step, so that TracIn-CP, like SOURCE, predicts the
change of the measurement in its units (with the recorded η alone it was (1−β) times it: a tenth at β = 0.9).

**IF and TRAK with several stages** cannot separate them: their curvature uses the data of all
``curvature_stages`` combined (default: every stage, as in the SOURCE paper) and N is their total size.

**Captured stores** (gradients taken during training, ``featurize/capture.py``) hold no gradient at a
checkpoint, only sums over each window's visits. TracIn there is the original TracIn over the visits:
score = Σ_w (η̄_w/B_w) ∇f(q; θ_{c_w})·Σ_{visits of z in w} ∇ℓ(z; θ_t), with c_w the window's first checkpoint,
η̄_w its mean rate and B_w its mean batch size (its visits over its steps), in expectation the post-hoc
TracIn-CP. Grad-Dot, Grad-Cos and IF use each attributed stage's last window (its per-visit mean
gradients and its Fisher) in place of θ_T's: a stand-in, exact only as the window shrinks to a
step. A store captured with ``CaptureArguments.end_pass`` holds every example's gradient at the end of its
stage, which they use instead (θ_T's own for the last stage; the Fisher stays the window's). TRAK needs
the measurement gradients of the training examples, which capture does not take. On an Adam stage (or one whose
parameter groups train at different rates) the captured gradients are in Adam's coordinates (u = R^{-1/2}θ), so the
query is too: scaled by D^{-1/2} of the window it is taken for (``capture/denominator``, the D of the checkpoint
closing it; θ_T's is the last window's).

**Influence-function damping**: δ = ``damping_factor`` × the mean eigenvalue of the projected Fisher,
the form of kronfluence's heuristic (``damping_factor=None``: 0.1 × the mean eigenvalue, per module,
of the full-parameter curvature) and bergson's default (``damped_inverse``, 0.1 × the mean), applied in
the space where the inverse is taken, but with the factor 3 that the LDS of issue 12's digits settings
chose: over 1e-4 … 30 the factor 3 was best on ``early`` (0.748 against 0.480 at 0.1) and on
``two-stage``'s upright queries (0.112 against 0.098), inside a plateau from 1 to 10
(BENCHMARKS.md, "Issue 12: peers and baselines at best practice"; chosen on the reported queries).
The projected Fisher's mean eigenvalue is trace/k where the full one's is trace/p, so the same
factor damps harder here than in kronfluence: factors are not portable between the two. ``damping``
sets an absolute δ instead (kronfluence's ``damping_factor``).

**Grad-Dot and Grad-Cos** are the plain final-checkpoint gradient products of dattri's and the SOURCE
paper's baselines; **RepSim** the cosine of last-layer representations as in the SOURCE paper.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from source_proj.errors import StoreError, TaskError, check_choice, check_names, check_real, check_whole
from source_proj.featurize.arguments import PROJECTED_MAX, as_stage_datasets, default_device
from source_proj.featurize.plan import segment_for
from source_proj.featurize.windows import (
    DENOMINATOR,
    END,
    WindowGradients,
    is_captured,
    stage_windows,
    window_array,
    window_curvature,
    window_maps,
)
from source_proj.methods.fit import _claim_method, _finish_method, checkpoint_curvature, param_sizes, trajectory_stages
from source_proj.methods.kinds import BASELINES
from source_proj.query.attributor import store_trajectory
from source_proj.store.provenance import check_data, other_selection, task_differences
from source_proj.store.store import Store, ckpt_key
from source_proj.tasks.data import loader
from source_proj.tasks.gradients import move_batch
from source_proj.tasks.task import Task, score_meaning
from source_proj.trajectory.optimizers import optimizer_rule
from source_proj.trajectory.recorder import unwrap_model
from source_proj.trajectory.segments import Segment


@dataclass(frozen=True)
class BaselineArguments:
    """Which baseline to fit and how.

    Attributes:
        kind: one of ``BASELINES``.
        method: name it is stored under (``methods/<method>``); default: the kind.
        stages: attribute to these stages' examples only; default all.
        curvature_stages: IF and TRAK: the stages whose data form the curvature; default all (the
            SOURCE paper's choice for baselines that cannot separate stages).
        damping_factor: IF: δ = damping_factor × mean eigenvalue of the projected Fisher (default 3:
            see the module's notes).
        damping: IF: an absolute δ instead (kronfluence's ``damping_factor``); overrides damping_factor.
        trak_dim: TRAK: the number of coordinates d its kernel Φ̃ᵀΦ̃ is fitted on (a seeded Gaussian
            sub-projection of the stored k; min(d, k) is used); default min(k, N/10), N the size of
            the curvature stages. Above N/2 the kernel is near-singular and a warning is raised.
        rcond: IF and TRAK: eigenvalues below rcond × the largest count as zero (pseudo-inverse); 1e-6 is
            the float32 rounding level of the stored gradients.
    """

    kind: str
    method: str | None = None
    stages: tuple[str, ...] | None = None
    curvature_stages: tuple[str, ...] | None = None
    damping_factor: float = 3.0
    damping: float | None = None
    trak_dim: int | None = None
    rcond: float = 1e-6

    def __post_init__(self) -> None:
        check_choice("BaselineArguments.kind", self.kind, BASELINES)
        for field in ("stages", "curvature_stages"):
            if getattr(self, field) is not None:
                check_names(f"BaselineArguments.{field}", getattr(self, field))
        check_real("BaselineArguments.damping_factor", self.damping_factor)
        if self.damping is not None:
            check_real("BaselineArguments.damping", self.damping)
        if self.trak_dim is not None:
            check_whole("BaselineArguments.trak_dim", self.trak_dim)
        check_real("BaselineArguments.rcond", self.rcond, 0.0, 1.0)


ChunkFn = Callable[[str, int, int], Any]
"""(stage, first row, stop row) → training features (or gradients) of those rows, ``[rows, d]``."""


def _query_scales(meta: dict[str, Any], steps: Sequence[int]) -> list[str | None] | None:
    """D^{-1/2} names for query gradients at ``steps`` on an Adam store, or one whose groups train at different rates
    (``None`` when nothing is scaled).

    featurize scaled checkpoint c's training gradients on stage s by the preconditioner of the stage-s
    segment holding c; the query at c takes that of the stage c was saved in (start < c ≤ end: the stage
    whose TracIn-CP term c is), so that each term is −w_c ∇fᵀ D_c⁻¹ ∇ℓ. The final checkpoint's is the last
    stage's, also for the training rows of an earlier stage there (the same approximation SOURCE makes for
    its query, docs/howto/adam.md).
    """
    described = (meta.get("segmentation") or {}).get("segments") or []
    segments = [Segment.from_description(d) for d in described]
    if not any(seg.preconditioner for seg in segments):
        return None
    stages = meta["trajectory"]["stages"]

    def saved_in(step: int) -> str:
        return next((s["name"] for s in stages if s["start_step"] < step <= s["end_step"]), stages[0]["name"])

    return [segment_for(segments, saved_in(step), step).preconditioner for step in steps]


def _captured_denominators(store: Store, steps: Sequence[int]) -> list[str | None]:
    """The D (``capture/denominator/…``) a query at each of ``steps`` is scaled by on a captured store: a window's
    start takes its window's, whose visits were scaled by the optimizer state of their steps (TracIn); the final
    checkpoint the last stage's last window's, which holds the D of the final state (Grad-Dot, Grad-Cos, IF: the
    end pass is in those coordinates). ``None`` on a stage that is not preconditioned (neither Adam's nor one of
    groups at different rates: no denominator)."""
    stages = [s["name"] for s in store.meta["trajectory"]["stages"]]
    owner = {window: stage for stage in stages for window in stage_windows(store.meta, stage)}
    out: list[str | None] = []
    for step in steps:
        window = step if step in owner else max(owner)  # θ_T: the run's last window
        array = window_array(DENOMINATOR, owner[window], window)
        out.append(array if store.is_complete(array) else None)
    return out


def fit_baseline(
    store: Store | str | Path,
    args: BaselineArguments,
    *,
    model: nn.Module | None = None,
    task: Task | None = None,
    train_data: Dataset | Mapping[str, Dataset] | None = None,
    device: str | None = None,
    batch_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
) -> Store:
    """Fit a baseline into a featurized store: ``methods/<name>/train/<stage>`` and its query recipe.

    Every baseline but RepSim reads only the store. RepSim computes the training examples' last hidden
    representations at the final checkpoint, so it needs ``model``, ``task`` and ``train_data`` (the
    dataset, or a dict ``stage → dataset``, as given to featurize). An interrupted fit resumes; a fit
    with other arguments over an existing method needs ``overwrite``.

    Returns:
        The store; score(q, z) = ⟨q̃, T(z)⟩ with the method's recipe (positive = z raised the query's
        measurement: helped it for a margin, harmed it for a loss or an error).
    """
    if not isinstance(args, BaselineArguments):
        kind = f"kind={args!r}" if isinstance(args, str) else "kind=..."
        raise TaskError(f"fit_baseline's args is {args!r}; pass a BaselineArguments({kind}).")
    default_device(device)  # a device this machine lacks is refused before the store is touched
    if not isinstance(store, Store):
        store = Store.open(store, writable=True)
    given = store
    if store.group.store.read_only:  # opened for reading (Store.open's default): fit takes such a store too
        store = Store.open(store.path, writable=True)
    meta = store.meta
    sizes = {s["name"]: s["dataset_size"] for s in meta["trajectory"]["stages"]}
    attributed = _stages(args.stages, sizes)
    final = meta["trajectory"]["checkpoints"][-1]
    name = args.method or args.kind
    if is_captured(meta) and not meta.get("captured"):
        raise StoreError(f"The store at {store.path} is still being captured; finish or resume training first.")
    if is_captured(meta) and args.kind == "trak":
        raise TaskError(
            "TRAK needs the training examples' measurement gradients at the final checkpoint, which in-run capture "
            "does not take; featurize the run after training for TRAK."
        )
    if args.kind == "repsim":
        dim, recipe, chunk_fn, extra = _repsim(store, unwrap_model(model), task, train_data, device, batch_size)
    elif args.kind == "tracin":
        dim, recipe, chunk_fn, extra = (_captured_tracin if is_captured(meta) else _tracin)(store, attributed, sizes)
    else:
        dim, recipe, chunk_fn, extra = _final_checkpoint(store, args, attributed, sizes, final)
    denominators: list[str | None] = []
    if recipe.get("features", "gradient") == "gradient":
        if is_captured(meta):
            denominators = _captured_denominators(store, recipe["checkpoints"])
            scales = [d and f"methods/{name}/preconditioner/{i}" for i, d in enumerate(denominators)]
            scales = scales if any(scales) else None
        else:
            scales = _query_scales(meta, recipe["checkpoints"])
        if scales is not None:
            recipe = {**recipe, "scales": scales}
    description = json.loads(
        json.dumps(
            {
                "kind": args.kind,
                "arguments": asdict(args),
                "stages": attributed,
                "dim": dim,
                "query": recipe,
                **extra,
            }
        )
    )
    _claim_method(store, name, description, overwrite, arguments="BaselineArguments")
    for index, denominator in enumerate(denominators):  # the query's D^{-1/2} on a captured Adam store
        scale = f"methods/{name}/preconditioner/{index}"
        if denominator is not None and not store.is_complete(scale):
            store.write_whole(scale, (1.0 / np.sqrt(store.read(denominator).astype(np.float64))).astype(np.float32))
    chunk_rows = meta["featurize"]["chunk_rows"]
    work = []
    for stage in attributed:
        array = f"methods/{name}/train/{stage}"
        store.require_array(array, (sizes[stage], dim), chunk_rows, "float32")
        work.extend((stage, chunk) for chunk in store.pending_chunks(array))
    for stage, chunk in tqdm(work, desc=f"fit {name}", unit="chunk", disable=not progress):
        start = chunk * chunk_rows
        stop = min(sizes[stage], start + chunk_rows)
        store.write_chunk(f"methods/{name}/train/{stage}", chunk, chunk_fn(stage, start, stop))
    _finish_method(store, name)
    if given is not store:  # the caller's store object sees the method, as after fit
        given.refresh()
        return given
    return store


def _stages(requested: tuple[str, ...] | None, sizes: Mapping[str, int]) -> list[str]:
    chosen = list(requested) if requested is not None else list(sizes)
    unknown = [s for s in chosen if s not in sizes]
    if unknown or not chosen:
        raise TaskError(f"Unknown or no stage(s) {unknown or chosen}; the trajectory's stages are {list(sizes)}.")
    return chosen


def _rows(store: Store, array: str, start: int, stop: int) -> torch.Tensor:
    return torch.from_numpy(store.read_rows(array, start, stop)).double()


def _require_complete(store: Store, arrays: list[str], why: str) -> None:
    missing = [a for a in arrays if not store.is_complete(a)]
    if missing:
        raise StoreError(
            f"The store at {store.path} lacks {missing[0]!r} ({why}); re-run featurize on it (with the "
            "measurement product enabled for TRAK) to finish or add it."
        )


def _inverse(curvature: torch.Tensor, damping: float, rcond: float) -> torch.Tensor:
    """(H + δI)⁻¹ of a symmetric PSD ``[k, k]`` matrix; eigenvalues below rcond·max count as zero."""
    sigma, u = torch.linalg.eigh(0.5 * (curvature + curvature.T))
    sigma = sigma.clamp_min(0.0) + damping
    keep = sigma > rcond * float(sigma.max())
    inv = torch.where(keep, 1.0 / torch.where(keep, sigma, torch.ones_like(sigma)), torch.zeros_like(sigma))
    return (u * inv) @ u.T


def _trak_operator(gram: torch.Tensor, args: BaselineArguments, size: int) -> tuple[torch.Tensor, int]:
    """R (Rᵀ Φ̃ᵀΦ̃ R)⁺ Rᵀ ``[k, k]`` and d, with R ``[k, d]`` a seeded Gaussian sub-projection (R = I when
    d = k) and d = min(k, trak_dim or N/10) for N = ``size`` examples in the kernel."""
    k = len(gram)
    dim = min(k, args.trak_dim if args.trak_dim is not None else max(1, size // 10))
    if dim < 1:
        raise TaskError(f"trak_dim must be a positive number of coordinates, not {args.trak_dim}.")
    if 2 * dim > size:
        warnings.warn(
            f"TRAK's kernel is fitted on d = {dim} coordinates for N = {size} examples: with d above N/2 "
            "the kernel Φ̃ᵀΦ̃ is near-singular and TRAK's attributions collapse (LDS 0.08 at d ≈ N on "
            "digits). Pass a trak_dim of at most N/10, or leave it unset.",
            UserWarning,
            stacklevel=4,
        )
    if dim == k:
        return _inverse(gram, 0.0, args.rcond), k
    r = torch.randn(k, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / dim**0.5
    return r @ _inverse(r.T @ gram @ r, 0.0, args.rcond) @ r.T, dim


def _final_checkpoint(
    store: Store, args: BaselineArguments, attributed: list[str], sizes: Mapping[str, int], final: int
) -> tuple[int, dict[str, Any], ChunkFn, dict[str, Any]]:
    """Grad-Dot, Grad-Cos, IF and TRAK: a k×k operator applied to the final checkpoint's gradients."""
    key = ckpt_key(final)
    meta = store.meta
    k = meta["projection"]["dim"]
    gradients: ChunkFn
    if is_captured(meta):
        last = {s: _last_window(meta, s) for s in sizes}
        rows = meta["featurize"]["chunk_rows"]

        maps = window_maps(store)

        def gradients(stage: str, start: int, stop: int) -> torch.Tensor:
            seg = last[stage]
            end = window_array(END, stage, seg.start_step)
            if store.is_complete(end):  # the end pass: each example's gradient at the stage's final weights
                g = torch.from_numpy(store.read_chunk(end, start // rows)).double()
                to_final = maps.get((stage, seg.start_step))
                return g if to_final is None else to_final(g)
            return WindowGradients(store, [seg])(stage, start // rows, [seg])[0]

        def curvature(stage: str) -> torch.Tensor:
            return window_curvature(store, last[stage])

    else:
        _require_complete(store, [f"grads/{s}/{key}" for s in attributed], "training gradients at the final checkpoint")

        def gradients(stage: str, start: int, stop: int) -> torch.Tensor:
            return _rows(store, f"grads/{stage}/{key}", start, stop)

        def curvature(stage: str) -> torch.Tensor:
            return checkpoint_curvature(store, stage, final)

    extra: dict[str, Any] = {}
    operator: torch.Tensor | None = None
    if args.kind in ("if", "trak"):
        if k > PROJECTED_MAX:
            raise TaskError(
                f"{args.kind.upper()} inverts a k × k curvature, too large at k = {k:,} (at most {PROJECTED_MAX:,}); "
                "fit it on a store featurized with a projection (--projection rademacher --dim 4096, say)."
            )
        curv = _stages(args.curvature_stages, sizes)
        total = sum(sizes[s] for s in curv)
        extra["curvature_stages"] = curv
        if args.kind == "if":
            fisher = sum(sizes[s] * curvature(s) for s in curv) / total
            eigvals = torch.linalg.eigvalsh(fisher).clamp_min(0.0)
            damping = args.damping if args.damping is not None else args.damping_factor * float(eigvals.mean())
            operator = _inverse(fisher, damping, args.rcond) / total
            extra["damping"] = damping
        else:
            arrays = [f"measurement/{s}/{key}" for s in curv]
            _require_complete(store, arrays, "measurement gradients of the training examples for TRAK")
            gram = torch.zeros(k, k, dtype=torch.float64)
            for array in arrays:
                for _, rows in store.iter_chunks(array):
                    x = torch.from_numpy(rows).double()
                    gram.addmm_(x.T, x)
            operator, extra["trak_dim"] = _trak_operator(gram, args, total)
    normalize = args.kind == "grad-cos"

    def chunk(stage: str, start: int, stop: int) -> np.ndarray:
        g = gradients(stage, start, stop)
        if operator is not None:
            g = g @ operator
        elif normalize:
            g = torch.nn.functional.normalize(g, dim=1)
        return (-g).float().numpy()

    recipe = {"checkpoints": [final], "weights": [1.0], "features": "gradient", "normalize": normalize}
    if args.kind == "grad-dot":
        extra["train"] = {"terms": [_term(store.meta, s, [final], [0, k], -1.0) for s in attributed]}
    return k, recipe, chunk, extra


def _tracin(
    store: Store, attributed: list[str], sizes: Mapping[str, int]
) -> tuple[int, dict[str, Any], ChunkFn, dict[str, Any]]:
    """TracIn-CP: √w_c-scaled gradients of the checkpoints saved during each attributed stage."""
    meta = store.meta
    k = meta["projection"]["dim"]
    lr = store.read("trajectory/lr")
    stages = {s["name"]: s for s in meta["trajectory"]["stages"]}
    factors = _rate_factors(meta)
    used: dict[str, list[tuple[int, float]]] = {}
    for stage in attributed:
        start, end = stages[stage]["start_step"], stages[stage]["end_step"]
        steps = [c for c in meta["trajectory"]["checkpoints"] if start < c <= end]
        if not steps:
            raise TaskError(
                f"Stage {stage!r} has no checkpoint saved after its first step, so TracIn-CP has nothing to sum; "
                "save checkpoints during the stage."
            )
        bounds = [start, *steps]
        used[stage] = [(c, factors[stage] * float(lr[a:c].sum())) for a, c in zip(bounds[:-1], steps, strict=True)]
    order = sorted((c, w) for pairs in used.values() for c, w in pairs)
    slot = {c: i for i, (c, _) in enumerate(order)}
    _require_complete(
        store,
        [f"grads/{s}/{ckpt_key(c)}" for s, pairs in used.items() for c, _ in pairs],
        "training gradients at the checkpoints TracIn-CP sums over",
    )

    def chunk(stage: str, start: int, stop: int) -> np.ndarray:
        out = torch.zeros(stop - start, k * len(order), dtype=torch.float64)
        for c, w in used[stage]:
            g = _rows(store, f"grads/{stage}/{ckpt_key(c)}", start, stop)
            out[:, slot[c] * k : (slot[c] + 1) * k] = -(w**0.5 / sizes[stage]) * g
        return out.float().numpy()

    recipe = {
        "checkpoints": [c for c, _ in order],
        "weights": [w**0.5 for _, w in order],
        "features": "gradient",
        "normalize": False,
    }
    train = {
        "terms": [
            _term(meta, stage, [c], [slot[c] * k, (slot[c] + 1) * k], -(w**0.5) / sizes[stage])
            for stage, pairs in used.items()
            for c, w in pairs
        ]
    }
    return k * len(order), recipe, chunk, {"checkpoint_weights": [w for _, w in order], "train": train}


def _rate_factors(meta: dict[str, Any]) -> dict[str, float]:
    """Each stage's recorded rate → effective rate (``OptimizerRule.lr_factor``: 1/(1−β) under heavy-ball SGD)."""
    return {stage.name: optimizer_rule(stage, param_sizes(meta)).lr_factor for stage in trajectory_stages(meta)}


def _term(meta: dict[str, Any], stage: str, steps: list[int], columns: list[int], weight: float) -> dict[str, Any]:
    """One term of a method's training recipe (see ``fit._Fit._train_recipe``): the stored gradients of
    ``stage`` at ``steps`` (scaled as featurize scaled them), times ``weight``, in feature ``columns``."""
    segments = [Segment.from_description(d) for d in (meta.get("segmentation") or {}).get("segments", [])]
    scales = [segment_for(segments, stage, step).preconditioner if segments else None for step in steps]
    points = [{"point": ["checkpoint", step], "scale": scale} for step, scale in zip(steps, scales, strict=True)]
    return {"stage": stage, "columns": columns, "weight": weight, "operator": None, "points": points}


def _last_window(meta: dict[str, Any], stage: str) -> Segment:
    """A stage's last captured window, as a one-window segment (what stands in for θ_T on a captured store)."""
    start = stage_windows(meta, stage)[-1]
    end = next(s["end_step"] for s in meta["trajectory"]["stages"] if s["name"] == stage)
    return Segment(stage, start, end, (start,), 0.0, 0.0)


def _captured_tracin(
    store: Store, attributed: list[str], sizes: Mapping[str, int]
) -> tuple[int, dict[str, Any], ChunkFn, dict[str, Any]]:
    """TracIn over the captured visits: √(η̄_w/B_w)-scaled window sums, queried at each window's first checkpoint."""
    meta = store.meta
    k = meta["projection"]["dim"]
    lr = store.read("trajectory/lr")
    ends = {s["name"]: s["end_step"] for s in meta["trajectory"]["stages"]}
    factors = _rate_factors(meta)
    used: list[tuple[int, str, float]] = []
    for stage in attributed:
        starts = stage_windows(meta, stage)
        for start, end in zip(starts, [*starts[1:], ends[stage]], strict=True):
            visits = float(store.read(window_array("visits", stage, start)).sum())
            weight = factors[stage] * float(lr[start:end].mean()) * (end - start) / visits if visits else 0.0
            used.append((start, stage, weight))
    used.sort()
    rows = meta["featurize"]["chunk_rows"]
    maps = window_maps(store)  # an eigen capture's windows, each in a basis of its own: into the queries' final one

    def chunk(stage: str, start: int, stop: int) -> np.ndarray:
        out = torch.zeros(stop - start, k * len(used), dtype=torch.float64)
        for slot, (window, owner, weight) in enumerate(used):
            if owner == stage:
                g = torch.from_numpy(store.read_chunk(window_array("grads", stage, window), start // rows)).double()
                to_final = maps.get((stage, window))
                out[:, slot * k : (slot + 1) * k] = -(weight**0.5) * (g if to_final is None else to_final(g))
        return out.float().numpy()

    recipe = {
        "checkpoints": [window for window, _, _ in used],
        "weights": [weight**0.5 for _, _, weight in used],
        "features": "gradient",
        "normalize": False,
    }
    return k * len(used), recipe, chunk, {"window_weights": [weight for _, _, weight in used]}


def _repsim(
    store: Store,
    model: nn.Module | None,
    task: Task | None,
    train_data: Dataset | Mapping[str, Dataset] | None,
    device: str | None,
    batch_size: int,
) -> tuple[int, dict[str, Any], ChunkFn, dict[str, Any]]:
    """RepSim: unit-normalised last hidden representations at the final checkpoint, negated for a task whose
    measurement is a loss or an error (``positive_helps`` False), where the similar examples that RepSim takes to
    help lower the measurement, so score −cos (score = −Δf, docs/concepts/scores.md)."""
    if model is None or task is None or train_data is None:
        raise TaskError(
            "RepSim compares representations computed by the model, so fit_baseline needs model=, task= and "
            "train_data= for kind 'repsim'."
        )
    meta = store.meta
    selection = other_selection(meta["task"], task.describe())
    if selection is not None:
        raise TaskError(f"{selection[0].upper()}{selection[1:]}.")
    if task.describe() != meta["task"]:
        differing = task_differences(meta["task"], task.describe())
        raise TaskError(f"The task is not the store's ({differing}); use the task the store was featurized with.")
    trajectory = store_trajectory(store)
    datasets = as_stage_datasets(train_data, trajectory)
    check_data(str(store.path), meta, datasets)  # other examples would be scored as the store's rows, silently
    where = default_device(device)
    net = copy.deepcopy(model).to(where)
    trajectory.load_into(net, trajectory.final_checkpoint)
    net.eval()
    sign = 1.0 if score_meaning(task, net)[0] else -1.0

    def chunk(stage: str, start: int, stop: int) -> np.ndarray:
        batches = loader(Subset(datasets[stage], range(start, stop)), batch_size=batch_size, shuffle=False)
        reps = [task.representation(net, move_batch(b, where)).cpu() for b in batches]
        return (sign * torch.nn.functional.normalize(torch.cat(reps).double(), dim=1)).float().numpy()

    first = next(iter(loader(Subset(next(iter(datasets.values())), [0]), batch_size=1)))
    dim = int(task.representation(net, move_batch(first, where)).shape[1])
    recipe = {
        "checkpoints": [meta["trajectory"]["checkpoints"][-1]],
        "weights": [1.0],
        "features": "representation",
        "normalize": True,
    }
    return dim, recipe, chunk, {} if sign > 0 else {"sign": -1}
