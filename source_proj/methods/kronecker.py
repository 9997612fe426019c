"""Per-layer Kronecker-factored curvature in the full parameter space (K-FAC), and SOURCE's matrix
functions applied in its eigenbasis.

For a layer whose per-example gradient is the matrix G = Σ_t δ_t ā_tᵀ (``d_out × d_in'``; ā_t the
layer's input at position t with a constant 1 appended when the bias is attributed, δ_t the gradient
of the loss with respect to the layer's output there), the Gauss–Newton (true Fisher, labels drawn
from the model) restricted to the layer is approximated by a Kronecker product::

    H_layer ≈ B ⊗ A,    A = mean over positions of ā ā ᵀ,    B = mean over examples of Σ_t δ_t δ_tᵀ

(Martens & Grosse 2015; for one position per example — an MLP — A and B are the plain means).
With A = Q_A diag(λ_A) Q_Aᵀ and B = Q_B diag(λ_B) Q_Bᵀ, any function g of H_layer + λI acts on a
gradient matrix as::

    g(H + λI) G = Q_B [ g(λ_B λ_Aᵀ + λ) ⊙ (Q_Bᵀ G Q_A) ] Q_Aᵀ

Parameters that no layer factors (normalisation weights, leftovers) get the diagonal of the Fisher,
Σ_examples g², so g acts elementwise there. The curvature never passes through the k-dimensional
projection: the projection folds the bulk of the spectrum into fewer directions (see
``docs/concepts/source.md``), which over-damps SOURCE's exponentials.

This module holds the factors of one segment and applies SOURCE's operators (docs/concepts/source.md §3) to
materialised gradients; ``featurize/factors.py`` collects the factors, ``methods/fit.py`` averages them
per segment and ``query/attributor.py`` applies the operators to query gradients before projecting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from source_proj.methods.source import phi, survival
from source_proj.projection.layers import FactoredLayer

SpectralFunction = Callable[[Tensor], Tensor]
"""σ ↦ g(σ), applied elementwise to eigenvalues (float64)."""


def layer_matrix(grads: Mapping[str, Tensor], layer: FactoredLayer) -> Tensor:
    """A layer's per-example gradients as matrices ``[B, d_out, d_in']`` (bias as the last column)."""
    return layer.matrix(grads)


def split_layer_matrix(mat: Tensor, layer: FactoredLayer, shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Inverse of [`layer_matrix`][source_proj.methods.kronecker.layer_matrix]: ``name → [B, *param_shape]``."""
    return layer.split(mat, shapes)


@dataclass(frozen=True)
class LayerFactors:
    """The eigendecomposed Kronecker factors of one layer (float64).

    Attributes:
        a_vectors, a_values: Q_A ``[d_in', d_in']`` and λ_A ``[d_in']`` of A (input side).
        b_vectors, b_values: Q_B ``[d_out, d_out]`` and λ_B ``[d_out]`` of B (output side).
    """

    a_vectors: Tensor
    a_values: Tensor
    b_vectors: Tensor
    b_values: Tensor

    @classmethod
    def from_factors(cls, a: Tensor, b: Tensor) -> LayerFactors:
        """Eigendecompose symmetric ``A [d_in', d_in']`` and ``B [d_out, d_out]`` (negatives from rounding → 0)."""
        la, qa = torch.linalg.eigh(_symmetric(a))
        lb, qb = torch.linalg.eigh(_symmetric(b))
        return cls(qa, la.clamp_min(0.0), qb, lb.clamp_min(0.0))

    def eigenvalues(self) -> Tensor:
        """The K-FAC eigenvalue grid λ_B λ_Aᵀ, ``[d_out, d_in']``."""
        return torch.outer(self.b_values, self.a_values)

    def apply(self, mats: Tensor, fn: SpectralFunction, damping: float) -> Tensor:
        """g(B ⊗ A + λI) applied to gradient matrices ``[Q, d_out, d_in']`` (any float dtype)."""
        qa = self.a_vectors.to(mats.device, torch.float64)
        qb = self.b_vectors.to(mats.device, torch.float64)
        scale = fn(self.eigenvalues().to(mats.device) + damping)
        rotated = qb.T @ mats.double() @ qa
        return (qb @ (rotated * scale) @ qa.T).to(mats.dtype)


@dataclass(frozen=True)
class KroneckerCurvature:
    """One segment's curvature: Kronecker factors per layer, a diagonal for the other parameters.

    Attributes:
        layers: the factored layers, in projection order.
        factors: their eigendecomposed factors (same order).
        diagonal: ``name → [*param_shape]`` Fisher diagonal of every parameter no layer factors.
        damping: λ added to every eigenvalue (weight decay; in Adam's coordinates for Adam runs).
    """

    layers: tuple[FactoredLayer, ...]
    factors: tuple[LayerFactors, ...]
    diagonal: Mapping[str, Tensor]
    damping: float

    def mean_eigenvalue(self) -> float:
        """The mean eigenvalue of H (without λ) over every parameter: its trace over p, with
        tr(B ⊗ A) = tr(B) tr(A) per layer."""
        trace = sum(float(f.a_values.sum() * f.b_values.sum()) for f in self.factors)
        size = sum(len(f.a_values) * len(f.b_values) for f in self.factors)
        trace += sum(float(d.sum()) for d in self.diagonal.values())
        size += sum(d.numel() for d in self.diagonal.values())
        return trace / max(size, 1)

    def apply(
        self, grads: Mapping[str, Tensor], fn: SpectralFunction, shapes: Mapping[str, Sequence[int]]
    ) -> dict[str, Tensor]:
        """g(H + λI) applied to materialised per-example gradients ``name → [Q, *shape]``."""
        out: dict[str, Tensor] = {}
        for layer, factors in zip(self.layers, self.factors, strict=True):
            mats = factors.apply(layer_matrix(grads, layer), fn, self.damping)
            out.update(split_layer_matrix(mats, layer, shapes))
        for name, diag in self.diagonal.items():
            g = grads[name]
            scale = fn(diag.to(g.device, torch.float64) + self.damping)
            out[name] = (g.double() * scale).to(g.dtype)
        return out


def source_query_directions(
    grads: Mapping[str, Tensor],
    curvatures: Sequence[KroneckerCurvature],
    times: Sequence[float],
    shapes: Mapping[str, Sequence[int]],
) -> list[dict[str, Tensor]]:
    """A_ℓᵀ ∇f for every segment ℓ (docs/concepts/source.md §3 with the operators moved to the query side,
    as §4's "The option: Kronecker factors in the full parameter space" writes it).

    A_ℓ = S_L ⋯ S_{ℓ+1} F_ℓ is a product of symmetric matrix functions, so A_ℓᵀ ∇f = F_ℓ S_{ℓ+1} ⋯ S_L ∇f:
    one pass from the last segment backwards applies each survival once. Returns one gradient dict per
    segment, in segment order.
    """
    directions: list[dict[str, Tensor]] = []
    carried = dict(grads)
    for index in range(len(curvatures) - 1, -1, -1):
        curvature, time = curvatures[index], times[index]
        directions.append(curvature.apply(carried, lambda s, t=time: phi(s, t), shapes))
        if index:
            carried = curvature.apply(carried, lambda s, t=time: survival(s, t), shapes)
    return directions[::-1]


def _symmetric(m: Tensor) -> Tensor:
    m = m.double()
    return 0.5 * (m + m.T)
