"""The per-token pull-back u = s ⊙ Pᵀ w equals the projection matrix's transpose for every projector kind
that per-token scores accept (the sum identity itself is tested on the text example's store)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import source_proj as sp
from source_proj.projection.eigen import EigenBasis
from source_proj.projection.factory import make_projector
from source_proj.query.per_token import adjoint
from source_proj.tasks.gradients import PerExampleGradients


@pytest.mark.parametrize("kind", ["rademacher", "identity"])
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


@pytest.mark.parametrize("kind", ["factored", "eigen"])
def test_the_pull_back_of_a_factored_projection_matches_its_hooks_features(kind: str) -> None:
    """A factored projection applies Adam's s = D^{-1/2} in its rank-R form through its layer hooks; the
    pull-back must be the adjoint of that map: ⟨u, g_i⟩ = ⟨w, features_i⟩ for every example's gradient
    g_i, the features computed by the hooks (``project_batch``) without materialising g."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    names = [n for n, _ in model.named_parameters()]
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    basis = None
    if kind == "eigen":
        gen = torch.Generator().manual_seed(1)
        a = [torch.randn(7, 7, generator=gen), torch.randn(6, 6, generator=gen)]
        b = [torch.randn(5, 5, generator=gen), torch.randn(4, 4, generator=gen)]
        basis = EigenBasis.from_factors(["0", "2"], [(m @ m.T).numpy() for m in a], [(m @ m.T).numpy() for m in b],
                                        30, [0], 1)  # fmt: skip
    projector = make_projector(kind, shapes, 16 if kind == "factored" else 30, 3, model=model, basis=basis)
    scale = {n: torch.rand(p.shape) + 0.5 for n, p in model.named_parameters()}
    w = torch.randn(3, projector.dim)
    u = adjoint(projector, shapes, w, scale)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    grads_fn = PerExampleGradients(model, sp.ClassificationTask(), names)
    g = grads_fn((x, y), "loss")
    features = projector.project_batch(grads_fn, (x, y), "loss", transform=projector.scaling(scale))
    pulled = sum(torch.einsum("q...,b...->qb", u[n], g[n]) for n in names)
    torch.testing.assert_close(pulled, w @ features.T, rtol=1e-4, atol=1e-5)
    exact = torch.cat([(u[n] / scale[n]).reshape(3, -1) for n in names], dim=1)
    assert not torch.allclose(exact, w @ projector.dense(), rtol=1e-3, atol=1e-4)  # the rank-1 form, not s itself
