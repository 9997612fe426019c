"""Linear maps applied to every per-example gradient before projection (Adam's D^{-1/2}, curvature bases).

On a factorable layer (``layers.py``) whose per-example gradient is the matrix G (``d_out × d_in'``,
a bias as the last column) a transform is a sum of R Kronecker terms

    G ↦ Σ_r L_r G R_rᵀ        (L_r: d_out × d_out, R_r: d_in' × d_in')

where each factor is a diagonal (stored as its vector) or a dense matrix; on every other parameter
it is an elementwise scale. The factored projection applies it without materialising G, because

    P_out (Σ_r L_r G R_rᵀ) P_inᵀ = Σ_r Σ_t (P_out L_r δ_t)(P_in R_r a_t)ᵀ:

it projects with the R factor pairs (P_out L_r, P_in R_r), precomputed once per transform
(``LayerTransform.project_factors``), at R times the cost of the plain factored projection. The
projections that materialise gradients apply the same map to them (``GradientTransform.apply``).

**Adam and AdamW** (docs/concepts/source.md §6): D^{-1/2} is an elementwise grid S (``d_out × d_in'``) on a layer.
``scaling_transform`` replaces it by a rank-R approximation S ≈ S_R = Σ_r u_r v_rᵀ, i.e.
L_r = diag(u_r), R_r = diag(v_r): the transformed gradient is S_R ⊙ G instead of S ⊙ G. R = 1 is
Adafactor's row × column factorisation; R = min(d_out, d_in') is exact. What matters is the error of
the scaled gradients, E‖(S − S_R) ⊙ g‖² = Σ_ij (S − S_R)_ij² E[g_ij²], and Adam's own second moment
is that E[g²]: v̂ = (D − ε)² ≈ S⁻⁴. So S_R minimises Σ_ij S_ij⁻⁴ (S − S_R)_ij², not the plain Frobenius
error, which coordinates Adam barely moved (v̂ ≈ 0, S ≈ ε^{-1/2}: dead units, unused rows) would
dominate although their gradients are ≈ 0. The error is measured in BENCHMARKS.md ("Adam on the
factored projection").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from source_proj.errors import TaskError
from source_proj.projection.layers import FactoredLayer


@dataclass(frozen=True)
class LayerTransform:
    """G ↦ Σ_r L_r G R_rᵀ on one layer's gradient matrix G (``[d_out, d_in']``, see ``layers.py``).

    Attributes:
        layer: the layer (its weight, bias column and layout).
        left: the L_r, ``[R, d_out]`` (diagonals) or ``[R, d_out, d_out]`` (dense matrices).
        right: the R_r, ``[R, d_in']`` (diagonals) or ``[R, d_in', d_in']`` (dense matrices).
    """

    layer: FactoredLayer
    left: Tensor
    right: Tensor

    def __post_init__(self) -> None:
        sides = (("left", self.left, self.layer.out_features), ("right", self.right, self.layer.in_rows))
        for side, factors, size in sides:
            if factors.dim() not in (2, 3) or factors.shape[1:] not in ((size,), (size, size)):
                raise TaskError(
                    f"The {side} factors of the transform of layer {self.layer.module!r} have shape "
                    f"{tuple(factors.shape)}; give [R, {size}] (diagonals) or [R, {size}, {size}] (matrices)."
                )
        if self.left.shape[0] != self.right.shape[0] or self.left.shape[0] < 1:
            raise TaskError(
                f"The transform of layer {self.layer.module!r} has {self.left.shape[0]} left and "
                f"{self.right.shape[0]} right factors; give the same positive number R of each."
            )

    @property
    def rank(self) -> int:
        """R, the number of Kronecker terms."""
        return int(self.left.shape[0])

    def apply(self, g: Tensor) -> Tensor:
        """Σ_r L_r G R_rᵀ for every example: ``[B, d_out, d_in']`` → ``[B, d_out, d_in']``."""
        left, right = self.left.to(g), self.right.to(g)
        if left.dim() == 2 and right.dim() == 2:
            return g * (left.T @ right)  # Σ_r diag(u_r) G diag(v_r) = (Σ_r u_r v_rᵀ) ⊙ G
        out = torch.zeros_like(g)
        for l_r, r_r in zip(left, right, strict=True):
            term = l_r.unsqueeze(-1) * g if l_r.dim() == 1 else l_r @ g
            out += term * r_r if r_r.dim() == 1 else term @ r_r.T
        return out

    def project_factors(self, p_out: Tensor, p_in: Tensor) -> tuple[Tensor, Tensor]:
        """``(P_out L_r, P_in R_r)`` stacked over r: ``[R, k_out, d_out]`` and ``[R, k_in, d_in']``."""
        left, right = self.left.to(p_out), self.right.to(p_in)
        return _times(p_out, left), _times(p_in, right)

    def to(self, device: torch.device | str) -> LayerTransform:
        return LayerTransform(self.layer, self.left.to(device), self.right.to(device))


def _times(p: Tensor, factors: Tensor) -> Tensor:
    """p F_r for every r: diagonal F_r scale p's columns, dense ones multiply."""
    if factors.dim() == 2:
        return p.unsqueeze(0) * factors.unsqueeze(1)
    return torch.einsum("kd,rde->rke", p, factors)


@dataclass(frozen=True)
class GradientTransform:
    """A linear map on per-example gradients: Kronecker terms on layers, elementwise scales elsewhere.

    Attributes:
        layers: one ``LayerTransform`` per transformed layer (identity on layers not listed).
        elementwise: parameter name → multiplier of the parameter's shape (1 where absent).
    """

    layers: tuple[LayerTransform, ...] = ()
    elementwise: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        covered = [n for lt in self.layers for n in (lt.layer.weight, lt.layer.bias) if n]
        both = sorted(set(covered) & set(self.elementwise))
        if both or len(covered) != len(set(covered)):
            raise TaskError(
                f"The gradient transform maps parameters {both or covered} twice; give each parameter one "
                "layer transform or one elementwise scale."
            )

    def layer(self, weight: str) -> LayerTransform | None:
        """The Kronecker terms of the layer whose weight is ``weight``, if any."""
        return next((lt for lt in self.layers if lt.layer.weight == weight), None)

    def apply(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The transformed per-example gradients (``name → [B, *shape]``, materialised)."""
        out = dict(grads)
        shapes = {name: tuple(g.shape[1:]) for name, g in grads.items()}
        for lt in self.layers:
            names = [n for n in (lt.layer.weight, lt.layer.bias) if n]
            present = [n in grads for n in names]
            if not any(present):
                continue
            if not all(present):
                raise TaskError(
                    f"The transform of layer {lt.layer.module!r} needs the gradients of {names} together; "
                    "attribute the layer's weight and bias together or neither."
                )
            g = lt.layer.matrix(grads)
            out.update(lt.layer.split(lt.apply(g), shapes))
        for name, scale in self.elementwise.items():
            if name in out:
                out[name] = out[name] * scale.to(device=out[name].device, dtype=out[name].dtype)
        return out

    def to(self, device: torch.device | str) -> GradientTransform:
        """The transform with every tensor on ``device``."""
        return GradientTransform(
            tuple(lt.to(device) for lt in self.layers), {n: s.to(device) for n, s in self.elementwise.items()}
        )


def low_rank(grid: Tensor, rank: int, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(u [R, m], v [R, n])`` with Σ_r u_r v_rᵀ a rank-R approximation of ``grid`` ``[m, n]``.

    Without ``weights`` the best one in the Frobenius norm: the truncated SVD, computed in float64
    through the eigendecomposition of the smaller Gram matrix (fast for a tall embedding grid), on the
    grid's device: on a CPU deterministic on every machine, on a GPU fast enough for in-run capture to
    refit Adam's scaling as training goes. With ``weights`` (``[m, n]``, non-negative) it minimises
    Σ w_ij (grid_ij − Σ_r u_ir v_jr)² by alternating least squares started from the truncated SVD of
    √w ⊙ grid (each half-step solves an R × R system per row or column, so the error never grows).
    A rank of at least min(m, n) is exact either way.
    """
    s = grid.double()
    rank = min(rank, *s.shape)
    if weights is None or rank == min(s.shape):
        return _svd(s, rank)
    w = weights.double().to(s.device)
    w = w / w.max().clamp_min(1e-300)
    start = w.sqrt() * s
    _, v = _svd(start, rank) if min(s.shape) <= _EXACT_START else _randomized_svd(start, rank)
    ridge, ws = 1e-12, w * s  # w ⊙ s once, not at every half-step
    u = torch.zeros(rank, s.shape[0], dtype=s.dtype, device=s.device)
    for _ in range(_ALS_STEPS):
        before = u
        u = _weighted_solve(w, ws, v, ridge)
        v = _weighted_solve(w.T, ws.T, u, ridge)
        if float((u - before).norm()) <= _ALS_TOLERANCE * float(u.norm()):  # converged: float64 rounding is left
            break
    sign = torch.where(v.sum(1, keepdim=True) < 0, -1.0, 1.0).to(v)
    return (u * sign).contiguous(), (v * sign).contiguous()


_ALS_STEPS = 30
_ALS_TOLERANCE = 1e-13
"""ALS stops once a step moves u by less than this, relatively: Adam's rank-one fits of GPT-2-sized and wider layers
settle there within 5 to 15 steps (``benchmarks/adam_low_rank_start.py``), far below the float32 the fit is kept in."""
_EXACT_START = 512
"""Above this smaller side the ALS starts from a randomized SVD: the exact one's eigendecomposition of the
min(m, n)² Gram matrix took 2.9 s of 3.1 s for a 2,048 × 8,192 layer (a 1B Llama's MLP) on 2 CPU cores."""


def _randomized_svd(s: Tensor, rank: int, oversample: int = 10, power: int = 6) -> tuple[Tensor, Tensor]:
    """A truncated SVD as ``_svd`` returns it, by subspace iteration from a seeded Gaussian start (Halko,
    Martinsson & Tropp 2011, algorithm 4.4): ``power`` passes over ``s`` with ``rank + oversample`` vectors,
    O(m·n·(rank + oversample)) each, instead of an O(min(m, n)³) eigendecomposition. Seeded on the CPU, so a
    CPU run gives the same start on every machine."""
    m, n = s.shape
    width = min(rank + oversample, m, n)
    omega = torch.randn(n, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(s.device)
    q = torch.linalg.qr(s @ omega).Q
    for _ in range(power):
        q = torch.linalg.qr(s @ torch.linalg.qr(s.T @ q).Q).Q
    small = q.T @ s  # [width, n]: s ≈ q small
    left, values, right = torch.linalg.svd(small, full_matrices=False)
    u = (q @ left[:, :rank]) * values[:rank]
    v = right[:rank].T
    sign = torch.where(v.sum(0) < 0, -1.0, 1.0).to(v)  # a positive grid gets positive first factors
    return (u * sign).T.contiguous(), (v * sign).T.contiguous()


def _weighted_solve(w: Tensor, ws: Tensor, v: Tensor, ridge: float) -> Tensor:
    """Rows u_i = argmin Σ_j w_ij (s_ij − u_iᵀ v_j)² for fixed ``v`` ``[R, n]``: ``[R, m]`` (``ws``: w ⊙ s)."""
    if v.shape[0] == 1:  # R = 1 (the default): the same solve as scalars, without the batched R × R systems
        gram1, target1 = w @ (v[0] * v[0]), ws @ v[0]
        return (target1 / (gram1 + ridge * gram1.clamp_min(1e-300))).unsqueeze(0)
    gram = torch.einsum("ij,rj,qj->irq", w, v, v)  # [m, R, R]
    target = torch.einsum("ij,rj->ir", ws, v)  # [m, R]
    scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)  # rows without weight get u_i = 0
    gram = gram + ridge * scale[:, None, None] * torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
    return torch.linalg.solve(gram, target).T


def _svd(s: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The truncated SVD as ``(u [R, m], v [R, n])`` (singular values folded into u), float64."""
    m, n = s.shape
    wide = m < n
    _, vectors = torch.linalg.eigh(s @ s.T if wide else s.T @ s)
    basis = vectors[:, -rank:].flip(1)  # top-R singular vectors of the smaller side
    u, v = (basis, s.T @ basis) if wide else (s @ basis, basis)
    sign = torch.where(v.sum(0) < 0, -1.0, 1.0).to(v)  # a positive grid gets positive first factors
    return (u * sign).T.contiguous(), (v * sign).T.contiguous()


def scaling_transform(
    scale: Mapping[str, Tensor], layers: Sequence[FactoredLayer] = (), rank: int | None = None
) -> GradientTransform:
    """An elementwise gradient scaling (Adam's D^{-1/2}: ``name → multiplier`` of the parameter's shape).

    On each of ``layers`` the [weight | bias] grid S of multipliers is replaced by its rank-``rank``
    approximation weighted by S⁻⁴ (Adam's second moment; ``low_rank``, module docstring) as
    diagonal Kronecker terms; ``rank=None`` keeps the exact elementwise scaling on every parameter
    (for projections that materialise gradients). A parameter absent from ``scale`` is multiplied by 1.
    """
    if rank is None or not layers:
        return GradientTransform(elementwise=dict(scale))
    if rank < 1:
        raise TaskError(f"The rank of the scaling's approximation must be at least 1, not {rank}.")
    terms, done = [], set()
    for layer in layers:
        names = [n for n in (layer.weight, layer.bias) if n]
        if not any(n in scale for n in names):
            continue
        grid = _grid(layer, scale)
        u, v = low_rank(grid, rank, weights=torch.where(grid > 0, grid, torch.inf) ** -4)
        terms.append(LayerTransform(layer, u.float(), v.float()))
        done.update(names)
    return GradientTransform(tuple(terms), {n: s for n, s in scale.items() if n not in done})


def _grid(layer: FactoredLayer, scale: Mapping[str, Tensor]) -> Tensor:
    """The layer's [weight | bias] grid of multipliers, float64 ``[d_out, d_in']`` on the device of ``scale``'s
    tensors (1 where ``scale`` has none)."""
    device = next((t.device for t in scale.values()), torch.device("cpu"))
    stored = (layer.out_features, layer.in_features)
    if layer.kind == "hf_conv1d":  # GPT-2's Conv1D stores its weight as [in, out]
        stored = stored[::-1]
    parts = {layer.weight: scale.get(layer.weight, torch.ones(stored, device=device))}
    if layer.bias:
        parts[layer.bias] = scale.get(layer.bias, torch.ones(layer.out_features, device=device))
    return layer.matrix({n: t.to(device, torch.float64).unsqueeze(0) for n, t in parts.items()})[0]
