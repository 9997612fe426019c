"""Captured windows: where in-run capture (``capture.py``) puts its sums in a store, and how fit reads them.

A *window* is the stretch of a stage's training from one of its checkpoints c to the next one (or
to the stage's end): the steps ``c ≤ t < c'``. Capture writes, per window, under the key of its
first checkpoint (``step-<c>``, as post-hoc features are keyed by checkpoint)::

    capture/grads/<stage>/<c>         float32 [N_s, k]  Σ over the visits of z_i in the window of P ∇ℓ(z_i; θ_t)
    capture/visits/<stage>/<c>        uint32  [N_s]     visits of z_i in the window
    capture/fisher/<stage>/<c>        float64 [k, k]    Σ over the window's Fisher vectors of ũ ũᵀ
    capture/fisher-count/<stage>/<c>  float64 [1]       how many Fisher vectors (examples) that sum holds

θ_t are the parameters the visit's step started from (the gradient the step used); ũ = P ∇ℓ(x, ŷ; θ_t)
with ŷ drawn from the model (sampled Fisher), or the captured gradient itself (empirical Fisher).

On an Adam or AdamW stage every gradient (and Fisher vector) is taken in Adam's coordinates
(docs/concepts/source.md §6), P (D_t^{-1/2} ⊙ ∇ℓ), with D_t read from the optimizer as the step begins (the
preconditioner of the step just taken, refreshed every ``CaptureArguments.scale_every`` batches; on
the eigen or factored projection its rank-``adam_rank`` form), and each window also holds

    capture/denominator/<stage>/<c>   float32 [p]       D at the checkpoint closing the window

so a segment's D_ℓ is the mean of its windows' D, as featurize takes the mean of the states saved
at the segment's checkpoints: fit writes D_ℓ^{-1/2} as ``methods/<name>/preconditioner/<ℓ>`` (the
query's scale) and derives Adam's coupled decay from it. A stage's first step, before the optimizer
holds any state, is not captured (its preconditioner is only known after the step). Parameter groups at a
constant ratio r of learning rates (``lr_ratio``) enter the same way (``preconditioner.py``): an Adam stage's D is
(√v̂ + ε)/r, and an SGD stage whose groups' rates differ is preconditioned by D = 1/r (every step captured; a
per-group constant is rank one on a layer, so its rank-``adam_rank`` form is exact), kept per window as Adam's.

With ``CaptureArguments.end_pass`` (by default on every stage whose examples ``datasets=`` holds), as each stage
ends one more pass takes every example's gradient at the stage's final weights (eval mode, as featurize), in the
basis of the stage's last window, and keeps it as

    capture/end/<stage>/<c>           float32 [N_s, k]  P ∇ℓ(z_i; θ_end) of every example, c the last window's start

which fit counts as one more visit of every example in that window (``meta["capture_ends"]`` names every
``<stage>/<c>`` holding one: a stage that ended, was resumed and trained further keeps its earlier pass,
a gradient at a checkpoint like any other). In-run visits fall at a different
step for each example (one per epoch); this pass gives every example a gradient at the same weights,
as post-hoc featurize's checkpoints do (BENCHMARKS.md, issue 16: the end pass).

fit cuts a captured run at window boundaries only (``window_cuts``: the requested cuts moved to the
nearest checkpoint), so each segment ℓ of stage s is a run of whole windows, those starting at its
checkpoints C_ℓ, and uses

    ḡ_ℓ(z) = Σ_w grads_w(z) / Σ_w visits_w(z)     the example's gradients averaged over its visits in ℓ
    H̃_ℓ    = Σ_w fisher_w / Σ_w fisher-count_w    the Fisher averaged over the segment's visits

An example never visited inside a segment (a segment shorter than an epoch) takes the average of
its gradients over every window of its stage; one never visited at all has ḡ = 0 (no influence).

With the eigen projection every window is projected with a basis of its own (estimated as it starts,
``capture.py``), kept as ``projection/windows/<stage>/<c>``; the store's ``projection/basis`` is the final
one, which queries project with. fit reads each window through ``window_maps``: its gradients mapped
into the final basis (``change_basis``) and its Fisher sum as M F Mᵀ, before averaging as above.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from source_proj.errors import NumericalError, StoreError
from source_proj.projection.eigen import EigenBasis, change_basis
from source_proj.store.store import Store, ckpt_key
from source_proj.trajectory.recorder import group_ratios
from source_proj.trajectory.segments import Segment

PREFIX = "capture/"
WINDOW_ARRAYS = ("grads", "visits", "fisher", "fisher-count")
DENOMINATOR = "denominator"
"""A preconditioned stage's windows also hold D at the checkpoint closing them (float32 ``[p]``): Adam's (√v̂ + ε)/r,
or 1/r on an SGD stage whose groups train at different rates (r: each group's ``lr_ratio``)."""
ADAM_KINDS = ("adam", "adamw")
END = "end"
"""``CaptureArguments.end_pass``: every example's gradient at the stage's final weights, keyed by its last window."""
WINDOW_BASES = "projection/windows"
"""An eigen capture's window bases: ``projection/windows/<stage>/<c>``, each one array (``EigenBasis.packed``),
described in ``meta["capture_bases"]["<stage>/<c>"]``."""


def window_array(kind: str, stage: str, start: int) -> str:
    """Store name of one of a window's arrays (``kind`` in ``WINDOW_ARRAYS``)."""
    return f"{PREFIX}{kind}/{stage}/{ckpt_key(start)}"


def window_basis_array(stage: str, start: int) -> str:
    """Where an eigen capture keeps the basis of the window of ``stage`` from step ``start``."""
    return f"{WINDOW_BASES}/{stage}/{ckpt_key(start)}"


def window_maps(store: Store) -> dict[tuple[str, int], Callable[[torch.Tensor], torch.Tensor]]:
    """An eigen capture's windows, each projected with its own basis: ``(stage, start) →`` the map of its
    features ``[n, k]`` into the store's final basis (``change_basis``); empty for any other store."""
    meta = store.meta
    bases = meta.get("capture_bases")
    if not bases:
        return {}
    desc = meta["projection"]
    final = EigenBasis.read(store, desc["basis"])
    shared = desc["dim"] - final.dim
    maps = {}
    for key, window in bases.items():
        stage, _, start = key.rpartition("/")
        name = window_basis_array(stage, int(start))
        src = EigenBasis.unpack(store.read(name), window, f"{store.path}/{name}")
        maps[(stage, int(start))] = partial(change_basis, src=src, dst=final, shared=shared)
    return maps


def is_captured(meta: dict[str, Any]) -> bool:
    """Whether a store's features were captured during training (instead of featurized afterwards)."""
    return meta.get("capture") is not None


def stage_windows(meta: dict[str, Any], stage: str) -> list[int]:
    """First steps of a stage's windows: its checkpoints ``start ≤ c < end``."""
    desc = next(s for s in meta["trajectory"]["stages"] if s["name"] == stage)
    return [c for c in meta["trajectory"]["checkpoints"] if desc["start_step"] <= c < desc["end_step"]]


def is_preconditioned_stage(stage: dict[str, Any]) -> bool:
    """Whether a described stage (``meta["trajectory"]["stages"]``) was trained with Adam or AdamW, or with parameter
    groups at different learning rates (``OptimizerRule.preconditioned``): its windows hold D."""
    optimizer = stage.get("optimizer") or {}
    return optimizer.get("kind") in ADAM_KINDS or any(r != 1.0 for r in group_ratios(optimizer).values())


def expected_windows(meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every window array a complete captured store holds: ``name → (shape, dtype)``."""
    desc = meta["projection"]
    k = desc["k"] if desc.get("kind") == "eigen" else desc["dim"]  # eigen: every window's own basis, padded to k
    p = sum(int(np.prod(shape)) for _, shape in meta["params"])
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for stage in meta["trajectory"]["stages"]:
        n = stage["dataset_size"]
        for start in stage_windows(meta, stage["name"]):
            out[window_array("grads", stage["name"], start)] = ((n, k), "float32")
            out[window_array("visits", stage["name"], start)] = ((n,), "uint32")
            out[window_array("fisher", stage["name"], start)] = ((k, k), "float64")
            out[window_array("fisher-count", stage["name"], start)] = ((1,), "float64")
            if is_preconditioned_stage(stage):
                out[window_array(DENOMINATOR, stage["name"], start)] = ((p,), "float32")
        windows = stage_windows(meta, stage["name"])
        named = (key.rpartition("/") for key in meta.get("capture_ends") or [])
        ends = {int(start) for owner, _, start in named if owner == stage["name"]}
        if (meta.get("capture") or {}).get("end_pass") is True and windows:  # "auto": the passes it named
            ends.add(windows[-1])  # every stage's last window, and where a stage ended before it trained further
        for start in sorted(ends):
            out[window_array(END, stage["name"], start)] = ((n, k), "float32")
    return out


def segment_denominator(store: Store, segment: Segment) -> torch.Tensor:
    """D_ℓ of a preconditioned segment (Adam, or groups at different rates): the mean of its windows' D, float64
    ``[p]`` (module docstring)."""
    windows = segment_windows(store.meta, segment)
    total = sum(torch.from_numpy(store.read(window_array(DENOMINATOR, segment.stage, w))).double() for w in windows)
    assert isinstance(total, torch.Tensor)
    return total / len(windows)


def window_cuts(meta: dict[str, Any], per_stage: int, boundaries: Sequence[int] | None = None) -> tuple[int, ...]:
    """Segment boundaries of a captured run: the equal cuts of every stage (or ``boundaries``) moved to the
    nearest checkpoint inside the stage, so that every segment is made of whole windows."""
    cuts = set()
    for stage in meta["trajectory"]["stages"]:
        start, end = stage["start_step"], stage["end_step"]
        inner = [c for c in stage_windows(meta, stage["name"]) if c > start]
        if boundaries is not None:
            wanted = [b for b in boundaries if start < b < end]
        else:
            parts = max(1, min(per_stage, end - start))
            wanted = [start + round(i * (end - start) / parts) for i in range(1, parts)]
        cuts.update(min(inner, key=lambda c: (abs(c - w), c)) for w in wanted if inner)
    return tuple(sorted(cuts))


def segment_windows(meta: dict[str, Any], segment: Segment) -> list[int]:
    """The windows a segment averages: those of its stage starting at one of its checkpoints."""
    windows = [c for c in stage_windows(meta, segment.stage) if c in segment.checkpoints]
    if not windows:
        raise StoreError(
            f"Segment [{segment.start_step}, {segment.end_step}) of stage {segment.stage!r} holds no captured window "
            "(its only checkpoint closes the stage); fit with fewer segments per stage, or save checkpoints more often."
        )
    return windows


def window_curvature(store: Store, segment: Segment, device: torch.device | str = "cpu") -> torch.Tensor:
    """H̃_ℓ of a segment from its windows' Fisher sums: float64 ``[k, k]`` on ``device``."""
    total: torch.Tensor | None = None
    count = 0.0
    maps = window_maps(store)
    for start in segment_windows(store.meta, segment):
        fisher = torch.from_numpy(store.read(window_array("fisher", segment.stage, start))).to(device)
        to_final = maps.get((segment.stage, start))
        if to_final is not None:  # M F Mᵀ
            fisher = to_final(to_final(fisher).T.contiguous())
        total = fisher if total is None else total + fisher
        count += float(store.read(window_array("fisher-count", segment.stage, start))[0])
    assert total is not None
    if count == 0 or not torch.isfinite(total).all():
        raise NumericalError(
            f"The captured curvature of segment [{segment.start_step}, {segment.end_step}) of stage {segment.stage!r} "
            "is empty or not finite; capture the run again (check the training loss for NaN)."
        )
    return total / count


class WindowGradients:
    """ḡ_ℓ(z) of every segment for one row chunk of a stage, from the captured windows (see module docstring).

    Args:
        store: a captured store.
        segments: the fit's segments.
    """

    def __init__(self, store: Store, segments: Sequence[Segment]) -> None:
        self.store = store
        meta = store.meta
        self.windows = {seg: segment_windows(meta, seg) for seg in segments}
        self.stage_windows = {s["name"]: stage_windows(meta, s["name"]) for s in meta["trajectory"]["stages"]}
        self.maps = window_maps(store)
        self.ends = {
            (stage, start)
            for stage, starts in self.stage_windows.items()
            for start in starts
            if store.is_complete(window_array(END, stage, start))
        }
        self.stood_in = 0

    def __call__(self, stage: str, chunk: int, segments: Sequence[Segment]) -> list[torch.Tensor]:
        """float64 ``[rows, k]`` per segment of ``segments`` (all of stage ``stage``)."""
        sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for start in self.stage_windows[stage]:
            grads = torch.from_numpy(self.store.read_chunk(window_array("grads", stage, start), chunk)).double()
            to_final = self.maps.get((stage, start))
            if to_final is not None:
                grads = to_final(grads)
            visits = self.store.read_chunk(window_array("visits", stage, start), chunk).astype(np.float64)
            visits = torch.from_numpy(visits)
            if (stage, start) in self.ends:  # the end pass: one more visit of every example (module docstring)
                end = torch.from_numpy(self.store.read_chunk(window_array(END, stage, start), chunk)).double()
                grads = grads + (end if to_final is None else to_final(end))
                visits = visits + 1.0
            sums[start] = (grads, visits)
        everything = sum(g for g, _ in sums.values())
        visited = sum(v for _, v in sums.values())
        assert isinstance(everything, torch.Tensor) and isinstance(visited, torch.Tensor)
        overall = everything / visited.clamp_min(1.0)[:, None]
        out = []
        for seg in segments:
            total = sum(sums[start][0] for start in self.windows[seg])
            count = sum(sums[start][1] for start in self.windows[seg])
            assert isinstance(total, torch.Tensor) and isinstance(count, torch.Tensor)
            missing = (count == 0) & (visited > 0)
            self.stood_in += int(missing.sum())
            mean = total / count.clamp_min(1.0)[:, None]
            out.append(torch.where(missing[:, None], overall, mean))
        return out

    def warn(self) -> None:
        """Say how many (example, segment) pairs had no visit (after every chunk was read)."""
        if self.stood_in:
            warnings.warn(
                f"{self.stood_in} (example, segment) pairs had no visit inside their segment; each took the example's "
                "gradient averaged over its whole stage. Fit with fewer segments (each at least an epoch) to avoid it.",
                stacklevel=2,
            )
