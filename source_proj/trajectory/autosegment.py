"""Automatic segmentation: cut where the projected curvature and gradients change (the paper's future work).

SOURCE replaces, inside a segment, every checkpoint's curvature H̃_c and per-example gradients
G̃_c = [P∇ℓ(z_i; θ_c)]_i by their segment means; its error grows with how far the checkpoints
stray from those means. Each checkpoint c gets a signature

    x_c = ( η_c H̃_c / s_H ,  η_c G̃_c / s_G )

where η_c is the mean (effective) learning rate of the steps the checkpoint stands for (from it
to the next one: a step's Jacobian is I − η_k H_k and its data term η_k g_k, so what must stay
stationary is η·H and η·g), and s_H, s_G are the root-mean-square norms of the two parts within
the stage, so that curvature and gradients weigh equally and the criterion is scale-free. The
segmentation into L contiguous groups minimises the within-segment dispersion

    W = Σ_ℓ Σ_{c ∈ ℓ} ‖x_c − x̄_ℓ‖²

i.e. the total squared residual of SOURCE's stationarity approximation. This is the classic
optimal 1-D partition problem: exact by dynamic programming in O(L·C²) over the C checkpoints,
from the C×C Gram matrix of the signatures (one pass over the stored features; no k×k product
per pair beyond ⟨H̃_c, H̃_c'⟩). Segments never straddle stages (stage boundaries always cut), a
group's boundary is the step of its first checkpoint (so every segment starts at the parameters
its first step starts from), and ties (e.g. an exactly stationary stretch) are broken towards
equal parts by a vanishing penalty on squared segment sizes.

A planted change of learning rate shows up at once (η_c jumps); a change of data or of the
optimisation regime shows up in H̃ and G̃. [`TrajectoryView`][] shows the user the change
between consecutive checkpoints and the chosen cuts, as a table and as a PNG.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from source_proj.errors import TrajectoryError
from source_proj.figures import pyplot, save_figure
from source_proj.store.store import Store, ckpt_key
from source_proj.trajectory.optimizers import optimizer_rule
from source_proj.trajectory.recorder import Stage


@dataclass(frozen=True)
class TrajectoryView:
    """The trajectory as automatic segmentation sees it (one entry per checkpoint unit, in step order).

    Attributes:
        stages: stage of each checkpoint.
        steps: step of each checkpoint.
        rates: η_c, the mean effective learning rate of the steps the checkpoint stands for.
        curvature_change: ‖x^H_{c+1} − x^H_c‖ (relative to the stage's RMS signature norm); NaN at a stage's last.
        gradient_change: the same for the gradient part.
        cuts: the chosen boundary steps (stage starts excluded; they always cut).
        budget: L, the number of segments asked for.
        dispersion: the minimised within-segment dispersion W.
    """

    stages: list[str]
    steps: list[int]
    rates: list[float]
    curvature_change: list[float]
    gradient_change: list[float]
    cuts: list[int]
    budget: int
    dispersion: float

    def describe(self) -> dict[str, Any]:
        """JSON form (stored in a store's metadata)."""
        return {
            "stages": self.stages,
            "steps": self.steps,
            "rates": self.rates,
            "curvature_change": [None if np.isnan(v) else v for v in self.curvature_change],
            "gradient_change": [None if np.isnan(v) else v for v in self.gradient_change],
            "cuts": self.cuts,
            "budget": self.budget,
            "dispersion": self.dispersion,
        }

    @classmethod
    def from_description(cls, desc: Mapping[str, Any]) -> TrajectoryView:
        nan = float("nan")
        return cls(
            stages=list(desc["stages"]),
            steps=list(desc["steps"]),
            rates=list(desc["rates"]),
            curvature_change=[nan if v is None else v for v in desc["curvature_change"]],
            gradient_change=[nan if v is None else v for v in desc["gradient_change"]],
            cuts=list(desc["cuts"]),
            budget=int(desc["budget"]),
            dispersion=float(desc["dispersion"]),
        )

    def table(self) -> str:
        """A terminal table: each checkpoint, its rate, the change to the next one, and the cuts."""
        lines = [f"{'stage':<12} {'step':>8} {'η (eff.)':>10} {'Δcurv':>8} {'Δgrad':>8}  change"]
        peak = np.nanmax([*self.curvature_change, *self.gradient_change, 1e-12])
        for i, step in enumerate(self.steps):
            starts = i == 0 or self.stages[i] != self.stages[i - 1]
            if starts and i > 0:
                lines.append(f"{'─' * 12} stage boundary {'─' * 30}")
            elif step in self.cuts:
                lines.append(f"{'-' * 12} cut at step {step} {'-' * 28}")
            dh, dg = self.curvature_change[i], self.gradient_change[i]
            bar = "" if np.isnan(dh) else "█" * int(0.5 + 20 * np.hypot(dh, dg) / (np.sqrt(2) * peak))
            cells = "" if np.isnan(dh) else f"{dh:>8.3f} {dg:>8.3f}"
            lines.append(f"{self.stages[i]:<12} {step:>8} {self.rates[i]:>10.3g} {cells:>17}  {bar}")
        lines.append(
            f"{self.budget} segments, cuts at steps {self.cuts}; within-segment dispersion {self.dispersion:.4g}"
        )
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Save a PNG: change between consecutive checkpoints, the learning rate, and the cuts."""
        plt = pyplot()

        steps = np.asarray(self.steps, dtype=float)
        fig, ax = plt.subplots(figsize=(8, 3.6))
        mids, dh, dg = [], [], []
        for i in range(len(steps) - 1):
            if not np.isnan(self.curvature_change[i]):
                mids.append(0.5 * (steps[i] + steps[i + 1]))
                dh.append(self.curvature_change[i])
                dg.append(self.gradient_change[i])
        ax.plot(mids, dh, "o-", color="tab:blue", label="Δ curvature  η·H̃")
        ax.plot(mids, dg, "s-", color="tab:orange", label="Δ gradients  η·G̃")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("change between consecutive checkpoints")
        for i in range(1, len(steps)):
            if self.stages[i] != self.stages[i - 1]:
                ax.axvline(steps[i], color="black", lw=2)
        for cut in self.cuts:
            ax.axvline(cut, color="tab:red", ls="--", lw=1.5)
        ax.plot([], [], color="tab:red", ls="--", label="chosen cut")
        twin = ax.twinx()
        twin.step(steps, self.rates, where="post", color="tab:green", alpha=0.6)
        twin.set_ylabel("learning rate η", color="tab:green")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title(f"trajectory: {self.budget} automatic segments", fontsize=10)
        return save_figure(fig, path, dpi=110)


def checkpoint_units(stages: Sequence[Stage], checkpoint_steps: Sequence[int]) -> list[tuple[Stage, int]]:
    """The checkpoints segments are built from: those a stage's steps start from (``start ≤ s < end``),
    or its closing checkpoint when it has none of its own (the rule of ``make_segments``)."""
    units = []
    for stage in stages:
        if stage.end_step == stage.start_step:
            continue
        own = [s for s in checkpoint_steps if stage.start_step <= s < stage.end_step]
        if not own and stage.end_step in checkpoint_steps:
            own = [stage.end_step]
        if not own:
            raise TrajectoryError(
                f"Stage {stage.name!r} has no checkpoint inside its steps; save checkpoints during the stage."
            )
        units.extend((stage, s) for s in own)
    return units


def unit_rates(units: Sequence[tuple[Stage, int]], lr: np.ndarray, param_sizes: Mapping[str, int]) -> list[float]:
    """η_c: mean effective rate of the steps from each checkpoint to the next one of its stage (or the stage end)."""
    rates = []
    for i, (stage, step) in enumerate(units):
        nxt = units[i + 1][1] if i + 1 < len(units) and units[i + 1][0] == stage else stage.end_step
        lo, hi = (step, nxt) if nxt > step else (stage.start_step, stage.end_step)
        rates.append(optimizer_rule(stage, param_sizes).lr_factor * float(np.mean(lr[lo:hi])))
    return rates


SKETCH_DIM = 1024
"""Above this k, a curvature signature XᵀX is taken of the rows sketched to this many dimensions."""


def _sketch(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two independent seeded Rademacher maps S₁, S₂ ``[k, SKETCH_DIM]`` (entries ±1/√SKETCH_DIM, E[S Sᵀ] = I)
    that the curvature signatures of a wide store are taken through, or ``None`` when k is narrow enough
    to keep XᵀX itself. ⟨S₁ᵀXᵀXS₂, S₁ᵀYᵀYS₂⟩ estimates ⟨XᵀX, YᵀY⟩ without bias (the maps are independent)
    and without a k × k matrix per checkpoint (an identity store of p = 26,000 parameters needed 5 GB
    per checkpoint)."""
    if k <= SKETCH_DIM:
        return None
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (2, k, SKETCH_DIM), generator=generator, dtype=torch.int8)
    maps = (signs.double() * 2 - 1) / SKETCH_DIM**0.5
    return maps[0], maps[1]


def _gram(store: Store, names: Sequence[str], fisher: bool) -> np.ndarray:
    """⟨X_c, X_c'⟩ for the listed arrays: gradients (Frobenius of [N, k]) or curvatures (Frobenius of
    XᵀX, through ``_sketch`` when k is wide)."""
    if fisher:
        sketch = _sketch(store.array(names[0]).shape[1])
        mats = []
        for name in names:
            total = None
            for _, rows in store.iter_chunks(name):
                x = torch.from_numpy(rows).double()
                left, right = (x, x) if sketch is None else (x @ sketch[0], x @ sketch[1])
                total = left.T @ right if total is None else total.addmm_(left.T, right)
            mats.append(total.reshape(-1))
        flat = torch.stack(mats)
        return (flat @ flat.T).numpy()
    gram = np.zeros((len(names), len(names)))
    for n in names:
        if store.pending_chunks(n):
            raise TrajectoryError(f"{n!r} is incomplete; finish featurize before segmenting automatically.")
    for chunk in range(store.num_chunks(names[0])):
        block = torch.stack([torch.from_numpy(store.read_chunk(n, chunk)).double().reshape(-1) for n in names])
        gram += (block @ block.T).numpy()
    return gram


def trajectory_view(
    store: Store,
    stages: Sequence[Stage],
    checkpoint_steps: Sequence[int],
    lr: np.ndarray,
    param_sizes: Mapping[str, int],
    budget: int,
    *,
    prefix: str = "",
) -> TrajectoryView:
    """Signatures of every checkpoint unit from the store's arrays ``{prefix}grads/<stage>/<ckpt>`` and
    ``{prefix}fisher/…`` (the gradients themselves when the store keeps no projected Fisher factors), and the
    optimal partition into ``budget`` segments (``budget=0``: into the number ``choose_budget`` picks)."""
    units = checkpoint_units(stages, checkpoint_steps)
    active = sorted({stage.name for stage, _ in units}, key=[s.name for s in stages].index)
    if budget != 0 and not len(active) <= budget <= len(units):
        raise TrajectoryError(
            f"auto:{budget} asks for {budget} segments, but this trajectory allows between {len(active)} (one per "
            f"stage) and {len(units)} (one per checkpoint); choose a budget in that range."
        )
    rates = np.asarray(unit_rates(units, lr, param_sizes))
    first = units[0]
    fisher = bool(store.meta["featurize"].get("fisher_directions", 0)) and store.has(
        f"{prefix}fisher/{first[0].name}/{ckpt_key(first[1])}"
    )
    gram = np.zeros((len(units), len(units)))
    parts: dict[str, np.ndarray] = {}
    for stage_name in active:
        idx = [i for i, (s, _) in enumerate(units) if s.name == stage_name]
        scale = np.outer(rates[idx], rates[idx])
        grads = [f"{prefix}grads/{stage_name}/{ckpt_key(units[i][1])}" for i in idx]
        curv = [f"{prefix}{'fisher' if fisher else 'grads'}/{stage_name}/{ckpt_key(units[i][1])}" for i in idx]
        for part, names, is_curv in (("curvature", curv, True), ("gradients", grads, False)):
            g = _gram(store, names, is_curv) * scale
            g /= max(float(np.mean(np.diag(g))), 1e-300)
            full = parts.setdefault(part, np.zeros_like(gram))
            full[np.ix_(idx, idx)] = g
            gram[np.ix_(idx, idx)] += g
    labels = [s.name for s, _ in units]
    if budget == 0:
        budget = choose_budget(gram, labels)
    groups, dispersion = optimal_partition(gram, labels, budget)
    change = {}
    for part, g in parts.items():
        d = np.full(len(units), np.nan)
        for i in range(len(units) - 1):
            if units[i][0] == units[i + 1][0]:
                d[i] = float(np.sqrt(max(g[i, i] + g[i + 1, i + 1] - 2 * g[i, i + 1], 0.0)))
        change[part] = d
    cuts = [units[first][1] for first, _ in groups[1:] if units[first][0] == units[first - 1][0]]
    return TrajectoryView(
        stages=[s.name for s, _ in units],
        steps=[s for _, s in units],
        rates=[float(r) for r in rates],
        curvature_change=[float(v) for v in change["curvature"]],
        gradient_change=[float(v) for v in change["gradients"]],
        cuts=cuts,
        budget=budget,
        dispersion=dispersion,
    )


AUTO_KEEP = 0.25
"""``auto`` without a budget takes the fewest segments whose dispersion W(L) is at most this fraction of
W at one segment per stage: a planted change (a learning-rate drop, new data) is cut at once, a run
that drifts evenly gets two segments per stage (W falls as 1/L² under a linear drift), and a stationary
stretch is left whole. On the issue-12 digits settings SOURCE's LDS moved by at most 0.01 between one
and three segments per stage (BENCHMARKS.md), so the rule stays at few segments."""


def choose_budget(gram: np.ndarray, labels: Sequence[str]) -> int:
    """The number of segments of ``auto`` without a budget (see ``AUTO_KEEP``)."""
    runs = 1 + sum(int(a != b) for a, b in itertools.pairwise(labels))
    floor = optimal_partition(gram, labels, runs)[1]
    for budget in range(runs, len(labels) + 1):
        if optimal_partition(gram, labels, budget)[1] <= AUTO_KEEP * floor + 1e-12 * max(float(np.trace(gram)), 1e-300):
            return budget
    return len(labels)


def optimal_partition(gram: np.ndarray, labels: Sequence[str], budget: int) -> tuple[list[tuple[int, int]], float]:
    """Split items 0..C−1 into ``budget`` contiguous groups, none spanning two labels, minimising
    Σ_groups Σ_{c∈group} ‖x_c − x̄‖² given the Gram matrix ``gram`` [C, C] of the x_c.

    Returns the groups as ``(first, last)`` index pairs (inclusive) and the minimal dispersion.
    Exact dynamic programming, O(budget·C²).
    """
    n = len(labels)
    prefix = np.zeros((n + 1, n + 1))
    prefix[1:, 1:] = gram.cumsum(0).cumsum(1)
    diag = np.concatenate([[0.0], np.cumsum(np.diag(gram))])
    tie = 1e-9 * max(float(np.trace(gram)), 1e-300) / n**2

    runs = np.cumsum([0] + [int(a != b) for a, b in itertools.pairwise(labels)])

    def cost(i: int, j: int) -> float:
        if runs[i] != runs[j]:
            return np.inf
        block = prefix[j + 1, j + 1] - prefix[i, j + 1] - prefix[j + 1, i] + prefix[i, i]
        size = j - i + 1
        return diag[j + 1] - diag[i] - block / size + tie * size**2

    best = np.full((budget + 1, n + 1), np.inf)
    choice = np.zeros((budget + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for groups in range(1, budget + 1):
        for end in range(1, n + 1):
            for start in range(groups - 1, end):
                value = best[groups - 1, start] + cost(start, end - 1)
                if value < best[groups, end]:
                    best[groups, end], choice[groups, end] = value, start
    if not np.isfinite(best[budget, n]):
        raise TrajectoryError(f"The trajectory cannot be cut into {budget} segments without straddling a stage.")
    bounds, end = [], n
    for groups in range(budget, 0, -1):
        start = choice[groups, end]
        bounds.append((int(start), end - 1))
        end = start
    tie_total = sum(tie * (b - a + 1) ** 2 for a, b in bounds)
    return bounds[::-1], float(best[budget, n] - tie_total)
