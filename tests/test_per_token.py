"""The per-token pull-back u = s ⊙ Pᵀ w equals the projection matrix's transpose for every projector kind
that per-token scores accept (the sum identity itself is tested on the text example's store)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from source_proj.projection.factory import make_projector
from source_proj.query.per_token import adjoint


@pytest.mark.parametrize("kind", ["rademacher", "factored", "identity"])
def test_the_pull_back_is_the_transpose_of_the_projection(kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    projector = make_projector(kind, shapes, 16, 3, model=model)
    w = torch.randn(3, projector.dim)
    scale = {"0.weight": torch.rand(5, 6) + 0.5}
    u = adjoint(projector, shapes, w, scale)
    dense = projector.dense() if kind != "identity" else torch.eye(projector.dim)
    flat = torch.cat([u[n].reshape(3, -1) for n, _ in shapes], dim=1)
    expected = w @ dense
    expected[:, :30] *= scale["0.weight"].reshape(-1)
    torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-6)
