"""The projection is a normalised JL map, reproducible from its seed alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from source_proj import IdentityProjector, RademacherProjector, TaskError

SHAPES = [("a.weight", (30, 40)), ("a.bias", (30,)), ("b.weight", (7, 30))]
P = 30 * 40 + 30 + 7 * 30


def _grads(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, *shape, generator=g) for name, shape in SHAPES}


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n, _ in SHAPES], dim=1)


def test_entries_are_plus_minus_one_over_sqrt_k() -> None:
    proj = RademacherProjector(SHAPES, 64, seed=3, block_rows=100)
    dense = proj.dense()
    assert dense.shape == (64, P)
    assert torch.allclose(dense.abs(), torch.full_like(dense, 1 / math.sqrt(64)))
    assert abs(float((dense > 0).float().mean()) - 0.5) < 0.02


def test_project_equals_dense_matrix_product() -> None:
    proj = RademacherProjector(SHAPES, 48, seed=1, block_rows=257)
    grads = _grads(5)
    expected = _flat(grads) @ proj.dense().T
    assert torch.allclose(proj.project(grads), expected, atol=1e-4)


def test_projection_is_defined_by_seed_not_by_cache_or_call_order() -> None:
    a = RademacherProjector(SHAPES, 32, seed=7, block_rows=64)
    b = RademacherProjector(SHAPES, 32, seed=7, block_rows=64, cache_bytes=0)
    for block in reversed(range(5)):
        b.block(block)
    grads = _grads(4)
    assert torch.equal(a.project(grads), b.project(grads))
    other = RademacherProjector(SHAPES, 32, seed=8, block_rows=64)
    assert not torch.equal(a.dense(), other.dense())


def test_signs_do_not_depend_on_the_device_they_are_moved_to() -> None:
    # Signs are drawn on the CPU from (seed, block) and only then moved: the values on any
    # device are the CPU values. Check the generator is a pure function of (seed, block).
    proj = RademacherProjector(SHAPES, 16, seed=11, block_rows=50)
    first = proj.signs(3).copy()
    proj.signs(0)
    assert np.array_equal(first, RademacherProjector(SHAPES, 16, seed=11, block_rows=50).signs(3))
    if torch.cuda.is_available():
        assert torch.equal(proj.block(3, "cuda").cpu(), proj.block(3, "cpu"))


def test_inner_products_are_preserved_within_jl_bounds() -> None:
    k = 512
    proj = RademacherProjector(SHAPES, k, seed=0)
    u, v = _grads(200, seed=1), _grads(200, seed=2)
    pu, pv = proj.project(u), proj.project(v)
    fu, fv = _flat(u), _flat(v)
    # Var(<Pu,Pv>) ≤ (|u|²|v|² + <u,v>²)/k for Rademacher entries; allow 5 standard deviations.
    bound = 5 * torch.sqrt((fu.norm(dim=1) ** 2 * fv.norm(dim=1) ** 2 + (fu * fv).sum(1) ** 2) / k)
    err = ((pu * pv).sum(1) - (fu * fv).sum(1)).abs()
    assert bool((err <= bound).all())
    ratio = pu.norm(dim=1) ** 2 / fu.norm(dim=1) ** 2
    assert float((ratio - 1).abs().max()) < 5 * math.sqrt(2 / k)
    # and unbiased: averaged over the 200 pairs, the relative error shrinks like 1/sqrt(200 k).
    rel = ((pu * pv).sum(1) - (fu * fv).sum(1)) / (fu.norm(dim=1) * fv.norm(dim=1))
    assert abs(float(rel.mean())) < 5 / math.sqrt(200 * k)


def test_expected_gram_is_identity_over_seeds() -> None:
    shapes = [("w", (6,))]
    mean = (
        sum(
            RademacherProjector(shapes, 4, seed=s).dense().T @ RademacherProjector(shapes, 4, seed=s).dense()
            for s in range(400)
        )
        / 400
    )
    assert torch.allclose(mean, torch.eye(6), atol=0.15)


def test_dimension_larger_than_parameters_is_refused() -> None:
    with pytest.raises(TaskError, match="larger than the 10 selected parameters"):
        RademacherProjector([("w", (10,))], 11)


def test_identity_projection_is_the_flattened_gradient() -> None:
    grads = _grads(3)
    assert torch.equal(IdentityProjector(SHAPES).project(grads), _flat(grads))


def test_the_dense_projection_knows_when_it_redraws_every_batch() -> None:
    """p × k float32 above the block cache: every batch draws the signs again (what featurize warns about)."""
    big = RademacherProjector([("w", (567_434,))], dim=1024)  # the MNIST MLP: 2.2 GiB
    assert big.redraws_every_batch()
    assert not RademacherProjector([("w", (26_122,))], dim=1024).redraws_every_batch()  # digits: 102 MiB
    edge = 512 * 2**20 // (4 * 1024)  # exactly the default 512 MiB cache at k = 1024
    assert not RademacherProjector([("w", (edge,))], dim=1024).redraws_every_batch()
    assert RademacherProjector([("w", (edge + 1,))], dim=1024).redraws_every_batch()
