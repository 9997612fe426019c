"""Which optimizers SOURCE models, and how a stage's optimiser maps onto its gradient descent
(docs/concepts/source.md §6): read from the description ``recorder.describe_optimizer`` writes, by the recorder as a
stage begins (to warn), by featurize and capture (to refuse) and by fit (to scale).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from source_proj.errors import TrajectoryError

MODELLED_OPTIMIZERS = "SGD (heavy-ball or Nesterov momentum, dampening, weight decay), Adam, AdamW"
"""The optimizers whose update SOURCE models (``optimizer_rule``), in words."""


class StageDescription(Protocol):
    """What ``optimizer_rule`` reads of a stage (``recorder.Stage`` is one): its name and optimiser description."""

    name: str
    optimizer: dict[str, Any]


@dataclass(frozen=True)
class OptimizerRule:
    """How one stage's optimiser maps onto SOURCE's gradient descent (docs/concepts/source.md §6).

    Attributes:
        kind: ``"sgd"``, ``"adam"`` (L2 decay coupled into the gradient) or ``"adamw"`` (decoupled).
        lr_factor: recorded rate → effective rate. Heavy-ball SGD: (1 − dampening)/(1 − β), its
            terminal velocity under a steady gradient; Nesterov SGD reaches the same terminal step
            η·g/(1 − β) (g + β·g/(1 − β)); Adam: 1 (its first moment is an average, m̂ → g).
        decay: λ of every parameter named in the optimiser's groups.
        weight_decay: the isotropic λ·I added to the curvature: the mean of r·``decay`` over the
            attributed coordinates (a group without decay, e.g. biases and norms, counts as 0; r its
            ``ratio``: the decay a group at rate r·η applies in the coordinates u = r^{-1/2}θ, SGD's coupled
            and AdamW's decoupled alike; Adam's coupled decay is r·λ/D, ``preconditioner.coupled_decay``).
            A diagonal term is represented by its mean because the projected engine adds damping
            as λ·I_k (docs/concepts/source.md §4); exact when every group has the same r·λ.
        ratio: r of every parameter named in the groups: its group's learning rate over the rate recorded per
            step (``Stage.lr_ratios``; 1 where the groups share one rate).
    """

    kind: str
    lr_factor: float
    decay: Mapping[str, float]
    weight_decay: float
    ratio: Mapping[str, float]

    @property
    def preconditioned(self) -> bool:
        """Adam and AdamW, and groups at different learning rates: gradients are scaled by D^{-1/2}, with D = Adam's
        denominator over r, or 1/r under SGD (``preconditioner.py``)."""
        return self.kind in ("adam", "adamw") or any(r != 1.0 for r in self.ratio.values())


def optimizer_rule(stage: StageDescription, param_sizes: Mapping[str, int]) -> OptimizerRule:
    """Read a stage's optimiser description; refuse, with a reason, what SOURCE cannot model.

    Group decays are averaged with weights = attributed parameters in each group; the groups holding attributed
    parameters must share one momentum factor (momentum and dampening). Groups at different learning rates are
    read from their recorded ratios (``lr_ratio``); a description whose groups' rates differ without them is refused.
    """
    opt = stage.optimizer
    kind = opt.get("kind")
    where = f"Stage {stage.name!r}"
    if kind not in ("sgd", "adam", "adamw"):
        raise TrajectoryError(
            f"{where} was trained with {kind!r}, whose update SOURCE cannot model; it attributes {MODELLED_OPTIMIZERS} "
            "runs, so re-train with one of them."
        )
    groups = opt["groups"]
    rates = {float(g["lr"]) for g in groups if "lr" in g}
    if len(rates) > 1 and not any("lr_ratio" in g for g in groups):
        raise TrajectoryError(
            f"{where}'s parameter groups use different learning rates {sorted(rates)} but record no ratio between "
            "them (lr_ratio); record the run with TrajectoryRecorder, which records each group's."
        )
    if any(g.get("maximize") for g in groups):
        raise TrajectoryError(f"{where} maximised its objective (maximize=True); SOURCE attributes minimisation only.")
    weights = np.array([sum(param_sizes.get(n, 0) for n in g.get("params", [])) for g in groups], dtype=float)
    if weights.sum() == 0:
        weights = np.ones(len(groups))
    weights /= weights.sum()
    factors, decays, decay, ratio = [], [], {}, {}
    ratios = np.array([float(g.get("lr_ratio", 1.0)) for g in groups])
    for g, r in zip(groups, ratios, strict=True):
        if kind == "sgd":
            factors.append(_sgd_factor(g, where))
        else:
            _check_adam_group(g, where)
            factors.append(1.0)
        decays.append(float(g.get("weight_decay", 0.0)))
        decay.update({name: decays[-1] for name in g.get("params", [])})
        ratio.update({name: float(r) for name in g.get("params", [])})
    used = sorted({f for f, w in zip(factors, weights, strict=True) if w > 0})
    if used and used[-1] - used[0] > 1e-9 * used[-1]:
        raise TrajectoryError(
            f"{where}'s parameter groups use different momentum or dampening, so their effective learning rates "
            f"η(1 − dampening)/(1 − momentum) differ ({used[0]:g}η to {used[-1]:g}η); SOURCE needs one rate per step, "
            "so give every group the same momentum and dampening."
        )
    return OptimizerRule(kind, float(weights @ factors), decay, float(weights @ (ratios * decays)), ratio)


def check_optimised(stage: str, groups: Sequence[Mapping[str, Any]], names: Sequence[str]) -> None:
    """Refuse attributed parameters that stage ``stage``'s optimizer (its parameter ``groups``, as
    ``describe_optimizer`` names them) did not hold: SOURCE would model them as trained by it, where another optimizer
    trained them, or none did. A description that names no parameters (a trajectory written by hand) is not checked."""
    held = {name for group in groups for name in group.get("params", [])}
    missing = [name for name in names if name not in held]
    if held and missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise TrajectoryError(
            f"Parameters {missing[:3]}{more} are attributed but not optimised in stage {stage!r} (its optimizer did "
            "not hold them: another optimizer trained them, or none did), so SOURCE would model them as trained by "
            "it; exclude them with ParameterSelection(exclude=...), or record the stage with the optimizer that "
            "trains every attributed parameter."
        )


def _sgd_factor(group: Mapping[str, Any], where: str) -> float:
    momentum = float(group.get("momentum", 0.0))
    dampening = float(group.get("dampening", 0.0)) if momentum else 0.0
    if not 0.0 <= momentum < 1.0:
        raise TrajectoryError(f"{where} has momentum {momentum}; SOURCE needs 0 ≤ momentum < 1.")
    if group.get("nesterov") and dampening:
        raise TrajectoryError(f"{where} uses Nesterov momentum with dampening {dampening}; use dampening 0.")
    return (1.0 - dampening) / (1.0 - momentum)


def _check_adam_group(group: Mapping[str, Any], where: str) -> None:
    betas = group.get("betas")
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or "eps" not in group:
        raise TrajectoryError(
            f"{where} is described as Adam without its betas and eps; record the run with TrajectoryRecorder."
        )
    if not all(0.0 <= float(b) < 1.0 for b in betas):
        raise TrajectoryError(f"{where} has Adam betas {list(betas)}; SOURCE needs 0 ≤ β < 1.")
