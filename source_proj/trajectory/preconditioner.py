"""Adam and AdamW as gradient descent in preconditioned coordinates (docs/concepts/source.md §6).

With D = diag(√v̂ + ε), v̂ = exp_avg_sq / (1 − β₂ᵗ) (``max_exp_avg_sq`` with amsgrad), Adam's step
θ ← θ − η D⁻¹ m̂ is, in the coordinates u = D^{1/2} θ, plain gradient descent u ← u − η ∇_u L
with ∇_u = D^{-1/2} ∇_θ and curvature D^{-1/2} H D^{-1/2}. Holding D fixed within a segment
(its mean D_ℓ), SOURCE applies unchanged in those coordinates: every per-example gradient —
training, Fisher pseudo-label and query — is multiplied elementwise by D_ℓ^{-1/2} *before*
projection. The projection applies it as a gradient transform (``projection/transform.py``, built by
`Projector.scaling`): exactly on materialised gradients (the dense projections), as its rank-R
approximation on each layer of the factored projection (``ProjectionArguments.adam_rank``).

Which optimizer state gives D_ℓ: a checkpoint saved after ``s`` steps holds the second moment of
the step ``s − 1`` has just taken, so the preconditioners *used by* a segment's steps
``[a, b)`` are those saved at checkpoints ``a < s ≤ b``; D_ℓ is their mean. Where no checkpoint
lies in ``(a, b]`` the first later checkpoint of the same stage stands in (the recorder always
saves one at a stage's end).

Weight decay in those coordinates (both added as an isotropic λ·I, the mean over attributed
coordinates of a diagonal term, as SGD's per-group decay is):

- AdamW (decoupled): θ ← (1 − ηλ)θ is u ← (1 − ηλ)u: exactly λ per coordinate.
- Adam (coupled L2, ``weight_decay`` added to the gradient): the step is u ← u − η(∇_u L + λD⁻¹u),
  a diagonal λ/D_i; it is represented by λ·mean(1/D) over the attributed coordinates (exact when
  D is uniform; an approximation otherwise, documented in docs/howto/adam.md).

The query is scaled with the last segment's D_L: the final model is read in the coordinates of
the last segment (a documented approximation where D changes between segments).

Parameter groups at a constant ratio r_g of learning rates (``Stage.lr_ratios``) enter the same way: group g steps
at r_g·η, so Adam's D becomes D/r_g, and an SGD stage gets D = 1/r_g (its step θ ← θ − η r g is gradient descent in
u = r^{-1/2}θ; a group at rate 0 gets D = ∞, scale 0: it did not move). A per-group scalar is rank one on a layer,
so the factored projection applies it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from source_proj.errors import TrajectoryError
from source_proj.store.store import Store
from source_proj.trajectory.recorder import Checkpoint, Stage, Trajectory


def checkpoint_preconditioner(
    trajectory: Trajectory, checkpoint: Checkpoint, stage: Stage, names: Sequence[str]
) -> dict[str, Tensor]:
    """D = (√v̂ + ε)/r of every parameter in ``names`` from the Adam state saved with ``checkpoint``, r its group's
    rate ratio (``Stage.lr_ratios``); on an SGD stage D = 1/r (the checkpoint's shapes only).

    Returns float64 tensors shaped like the parameters. A parameter that has no state yet (it
    never received a gradient, so Adam never moved it), or whose group's rate is 0, gets D = ∞ (scale 0).
    """
    payload = trajectory.load_state(checkpoint)
    if stage.optimizer.get("kind") == "sgd":
        ratios = stage.lr_ratios
        _check_held(stage, [n for n in names if n not in ratios])
        return ratio_denominator({n: payload["model"][n] for n in names}, ratios)
    state = payload.get("optimizer")
    if not checkpoint.optimizer_state or not isinstance(state, Mapping):
        raise TrajectoryError(
            f"Checkpoint {checkpoint.file} of Adam stage {stage.name!r} has no optimizer state, which SOURCE reads "
            "the preconditioner from; record the run with TrajectoryRecorder without save_optimizer_state=False (it "
            "saves the state for Adam by default)."
        )
    groups = state["param_groups"]
    described = stage.optimizer["groups"]
    if len(groups) != len(described) or any(
        len(g["params"]) != len(d.get("params", [])) for g, d in zip(groups, described, strict=False)
    ):
        raise TrajectoryError(
            f"The optimizer state in {checkpoint.file} does not have the parameter groups stage {stage.name!r} "
            "describes; record the stage with the optimizer it was trained with."
        )
    model = payload["model"]
    out: dict[str, Tensor] = {}
    wanted = set(names)
    for group, desc in zip(groups, described, strict=True):
        for index, name in zip(group["params"], desc["params"], strict=True):
            if name not in wanted:
                continue
            entry = state["state"].get(index)
            if not entry:
                out[name] = torch.full(tuple(model[name].shape), float("inf"), dtype=torch.float64)
                continue
            out[name] = _over(adam_denominator(entry, group), float(desc.get("lr_ratio", 1.0)))
    _check_held(stage, [n for n in names if n not in out])
    return out


def ratio_denominator(params: Mapping[str, Tensor], ratios: Mapping[str, float]) -> dict[str, Tensor]:
    """D = 1/r of every parameter of ``params`` (name → a tensor of its shape and device) on an SGD stage, r its
    group's rate ratio (``ratios``, name → r): float64 tensors of the parameters' shapes (r = 0: D = ∞, scale 0)."""
    return {
        name: _over(torch.ones(tuple(param.shape), dtype=torch.float64, device=param.device), float(ratios[name]))
        for name, param in params.items()
    }


def _over(d: Tensor, ratio: float) -> Tensor:
    """D/r: the denominator of a parameter whose group steps at r times the recorded rate (r = 0: ∞, scale 0)."""
    return d / ratio if ratio > 0 else torch.full_like(d, float("inf"))


def _check_held(stage: Stage, missing: Sequence[str]) -> None:
    if missing:
        raise TrajectoryError(
            f"Parameters {missing[:3]} are attributed but not optimised in stage {stage.name!r}; exclude them with "
            "ParameterSelection or add them to the optimizer."
        )


def adam_denominator(entry: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor:
    """D = √v̂ + ε (float64, the parameter's shape) from one parameter's Adam state and its group's settings."""
    beta2, eps = float(group["betas"][1]), float(group["eps"])
    second = entry["max_exp_avg_sq"] if group.get("amsgrad") else entry["exp_avg_sq"]
    v_hat = second.detach().double() / (1.0 - beta2 ** float(entry["step"]))
    return v_hat.sqrt() + eps


def live_preconditioner(
    optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], ratios: Mapping[str, float]
) -> dict[str, Tensor] | None:
    """D = (√v̂ + ε)/r of the parameters ``params`` (name → the optimised tensor) from a running Adam's state,
    on the parameters' device, r the rate ratio of each one's group (``ratios``, name → r: ``Stage.lr_ratios``; 1
    where absent): the preconditioner of the step just taken, which in-run capture applies to the next step's
    gradients. ``None`` while none of them has a state yet (before the first step); one without a state among
    others, or whose group's rate is 0, gets D = ∞, as in ``checkpoint_preconditioner``."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out: dict[str, Tensor] = {}
    unoptimised = [name for name, param in params.items() if id(param) not in groups]
    if unoptimised:
        raise TrajectoryError(
            f"Parameters {unoptimised[:3]} are attributed but not optimised; exclude them with ParameterSelection or "
            "add them to the optimizer."
        )
    stepped = False
    for name, param in params.items():
        entry = optimizer.state.get(param)
        if entry:
            out[name] = _over(adam_denominator(entry, groups[id(param)]), float(ratios.get(name, 1.0)))
            stepped = True
        else:  # never stepped (no gradient yet): D = ∞, scale 0, as checkpoint_preconditioner
            out[name] = torch.full(tuple(param.shape), float("inf"), dtype=torch.float64, device=param.device)
    return out if stepped else None


def steps_preconditioner(
    trajectory: Trajectory, stage: Stage, start: int, end: int, names: Sequence[str]
) -> dict[str, Tensor]:
    """D used by the steps ``[start, end)`` of ``stage``: the mean of the states saved at ``start < s ≤ end``
    (or the first later checkpoint of the stage), float64, per parameter name."""
    later = [c for c in trajectory.checkpoints if start < c.step <= stage.end_step]
    chosen = [c for c in later if c.step <= end] or later[:1]
    if not chosen:
        raise TrajectoryError(
            f"Adam stage {stage.name!r} has no checkpoint after step {start}, so the preconditioner of its steps "
            "is unknown; save a checkpoint at the stage's end (TrajectoryRecorder does)."
        )
    total: dict[str, Tensor] = {}
    for ckpt in chosen:
        for name, d in checkpoint_preconditioner(trajectory, ckpt, stage, names).items():
            total[name] = d if name not in total else total[name] + d
    return {name: d / len(chosen) for name, d in total.items()}


def flat_inverse_sqrt(d: Mapping[str, Tensor], names: Sequence[str]) -> np.ndarray:
    """D^{-1/2} of the parameters ``names``, flattened in that (projection) order: float32 ``[p]``."""
    return torch.cat([d[n].reshape(-1).rsqrt() for n in names]).float().numpy()


def coupled_decay(decay: Mapping[str, float], d: Mapping[str, Tensor], names: Sequence[str]) -> float:
    """λ·mean(1/D) over the attributed coordinates: Adam's coupled L2 decay as an isotropic term (with D over the
    groups' rate ratios, ``checkpoint_preconditioner``: r·λ/D)."""
    total = sum(float(decay.get(n, 0.0)) * float(d[n].reciprocal().sum()) for n in names)
    return total / sum(d[n].numel() for n in names)


def unflatten(flat: Tensor, shapes: Sequence[tuple[str, Sequence[int]]]) -> dict[str, Tensor]:
    """Split a flat ``[p]`` vector into tensors shaped like the parameters (in ``shapes`` order)."""
    out, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        out[name] = flat[offset : offset + size].reshape(tuple(shape))
        offset += size
    return out


def read_scale(
    store: Store, name: str | None, shapes: Sequence[tuple[str, Sequence[int]]], device: torch.device | str = "cpu"
) -> dict[str, Tensor] | None:
    """A stored D^{-1/2} (``preconditioner/<ℓ>``) as tensors shaped like the parameters; ``None`` → ``None``."""
    if name is None:
        return None
    return {n: t.to(device) for n, t in unflatten(torch.from_numpy(store.read(name)), shapes).items()}
