"""The SOURCE formulas in projected space (docs/concepts/source.md §3–§5).

For segment ℓ with averaged curvature H̄_ℓ = U diag(σ) Uᵀ (projected, + λI) and training time
t_ℓ = η̄_ℓ K_ℓ::

    S_ℓ = exp(−t_ℓ H̄_ℓ)                      = U diag(e^{−t σ}) Uᵀ     survival of earlier perturbations
    F_ℓ = (I − exp(−t_ℓ H̄_ℓ)) H̄_ℓ⁻¹          = U diag(φ(σ)) Uᵀ         response inside the segment
    φ(σ) = (1 − e^{−tσ})/σ  → t as σ → 0 (barely trained),  → 1/σ as tσ → ∞ (influence function)
    A_ℓ  = S_L S_{L−1} ⋯ S_{ℓ+1} F_ℓ
    Δθ_T(z) ≈ Σ_{ℓ: z ∈ D_ℓ} (1/N_ℓ) A_ℓ ḡ_ℓ(z)
    score(q, z) = −q̃ᵀ Δθ_T(z),   q̃ = P ∇f(q; θ_T)

The cached training feature is therefore T(z) = −Σ_ℓ (1/N_ℓ) A_ℓ ḡ_ℓ(z), and score = ⟨q̃, T(z)⟩.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def phi(sigma: Tensor, time: float) -> Tensor:
    """φ(σ) = (1 − e^{−tσ})/σ, evaluated stably (−expm1, and t(1 − tσ/2) for tiny tσ)."""
    x = sigma * time
    small = x.abs() < 1e-8
    safe = torch.where(small, torch.ones_like(sigma), sigma)
    return torch.where(small, time * (1.0 - 0.5 * x), -torch.expm1(-x) / safe)


def survival(sigma: Tensor, time: float) -> Tensor:
    """e^{−tσ}: how much of an earlier perturbation along eigenvalue σ survives the segment."""
    return torch.exp(-sigma * time)


@dataclass(frozen=True)
class SegmentOperator:
    """Eigendecomposition of one segment's curvature and its training time.

    Attributes:
        eigvals: σ, float64 ``[k]`` (clamped at 0: the Gauss–Newton matrix is PSD, negatives are rounding).
        eigvecs: U, float64 ``[k, k]``.
        time: t = η̄K.
    """

    eigvals: Tensor
    eigvecs: Tensor
    time: float

    @classmethod
    def from_curvature(
        cls, curvature: Tensor, time: float, damping: float = 0.0, damping_factor: float = 0.0
    ) -> SegmentOperator:
        """Decompose H̄ + λI (``curvature`` symmetric ``[k, k]``), λ = ``damping`` + ``damping_factor`` × the
        mean eigenvalue of H̄ (its trace over k)."""
        h = curvature.double()
        h = 0.5 * (h + h.T)
        sigma, u = torch.linalg.eigh(h)
        sigma = sigma.clamp_min(0.0)
        return cls(eigvals=sigma + damping + damping_factor * float(sigma.mean()), eigvecs=u, time=time)

    def _apply(self, diag: Tensor) -> Tensor:
        return (self.eigvecs * diag) @ self.eigvecs.T

    def survival(self) -> Tensor:
        """S = exp(−tH̄), ``[k, k]``."""
        return self._apply(survival(self.eigvals, self.time))

    def response(self) -> Tensor:
        """F = (I − exp(−tH̄)) H̄⁻¹, ``[k, k]``."""
        return self._apply(phi(self.eigvals, self.time))


def fold(operators: Sequence[SegmentOperator]) -> list[Tensor]:
    """A_ℓ = S_L ⋯ S_{ℓ+1} F_ℓ for every segment ℓ (float64 ``[k, k]`` each)."""
    folded: list[Tensor] = []
    later: Tensor | None = None
    for op in reversed(operators):
        response = op.response()
        folded.append(response if later is None else later @ response)
        later = op.survival() if later is None else later @ op.survival()
    return folded[::-1]
