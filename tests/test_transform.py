"""Gradient transforms (``projection/transform.py``): Kronecker terms per layer and elementwise scales,
applied identically by the factored hooks and on materialised gradients; Adam's D^{-1/2} as a rank-R
approximation whose error shrinks with R."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

import source_proj as sp
from source_proj.projection.factored import FactoredProjector
from source_proj.projection.factory import make_projector
from source_proj.projection.layers import FactoredLayer
from source_proj.projection.transform import GradientTransform, LayerTransform, low_rank, scaling_transform
from source_proj.tasks.gradients import PerExampleGradients


class _Net(nn.Module):
    """Every factorable kind but Conv1D (the GPT-2 case covers it): embedding, conv, linear; a norm left dense."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(13, 6)
        self.conv = nn.Conv1d(6, 5, 3, padding=1)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(self.embed(x).transpose(1, 2))).transpose(1, 2)
        return self.head(self.norm(h)).mean(dim=1)


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=19, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _case(name: str) -> tuple[nn.Module, sp.Task, object]:
    g = torch.Generator().manual_seed(1)
    if name == "net":
        torch.manual_seed(0)
        return _Net(), sp.ClassificationTask(), (torch.randint(0, 13, (4, 7), generator=g), torch.tensor([0, 1, 2, 1]))
    ids = torch.randint(0, 19, (4, 8), generator=g)
    task = sp.LanguageModelingTask(tokens_per_sequence=7, parameters=sp.ParameterSelection())
    return _gpt2(), task, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _random_transform(projector: FactoredProjector, rank: int, g: torch.Generator) -> GradientTransform:
    """R terms per layer, alternately dense and diagonal on each side; elementwise scales on the rest."""
    terms = []
    for index, layer in enumerate(projector.layers):
        dense_left, dense_right = index % 2 == 0, index % 3 == 0
        rows, cols = layer.out_features, layer.in_rows
        left = torch.randn((rank, rows, rows) if dense_left else (rank, rows), generator=g)
        right = torch.randn((rank, cols, cols) if dense_right else (rank, cols), generator=g)
        terms.append(LayerTransform(layer, left, right))
    shapes = dict(projector.shapes)
    scales = {name: torch.rand(shapes[name], generator=g) + 0.5 for name in projector.rest_names}
    return GradientTransform(tuple(terms), scales)


def test_layer_transform_is_the_sum_of_kronecker_products() -> None:
    g = torch.Generator().manual_seed(0)
    layer = FactoredLayer("fc", "fc.weight", "fc.bias", 4, 3)
    for left_shape, right_shape in [((2, 4), (2, 4)), ((2, 4, 4), (2, 4)), ((2, 4), (2, 4, 4)), ((2, 4, 4), (2, 4, 4))]:
        lt = LayerTransform(layer, torch.randn(left_shape, generator=g), torch.randn(right_shape, generator=g))
        full = sum(  # vec(L G Rᵀ) = (L ⊗ R) vec(G) for row-major vec
            torch.kron(torch.diag(a) if a.dim() == 1 else a, torch.diag(b) if b.dim() == 1 else b)
            for a, b in zip(lt.left, lt.right, strict=True)
        )
        grads = torch.randn(5, 4, 4, generator=g)
        assert torch.allclose(lt.apply(grads).reshape(5, -1), grads.reshape(5, -1) @ full.T, atol=1e-5)
    with pytest.raises(sp.TaskError, match=r"give \[R, 4\]"):
        LayerTransform(layer, torch.ones(1, 5), torch.ones(1, 4))


@pytest.mark.parametrize("case", ["net", "gpt2"])
def test_factored_hooks_apply_a_transform_exactly_as_on_materialised_gradients(case: str) -> None:
    model, task, batch = _case(case)
    names = task.select_parameters(model)
    params = dict(model.named_parameters())
    shapes = [(n, tuple(params[n].shape)) for n in names]
    projector = make_projector("factored", shapes, 64, 0, model=model)
    assert isinstance(projector, FactoredProjector) and projector.rest_names  # a dense part, transformed too
    transform = _random_transform(projector, 2, torch.Generator().manual_seed(2))
    grads_fn = PerExampleGradients(model, task, names)
    for quantity in ("loss", "measurement"):
        expected = projector.project(transform.apply(grads_fn(batch, quantity)))
        got = projector.project_batch(grads_fn, batch, quantity, transform=transform)
        assert float((got - expected).norm() / expected.norm()) < 1e-5, quantity
    dense = make_projector("rademacher", shapes, 64, 0)  # the materialising projections take the same transform
    expected = dense.project(transform.apply(grads_fn(batch)))
    assert torch.allclose(dense.project_batch(grads_fn, batch, transform=transform), expected)


def test_low_rank_is_the_truncated_svd_and_exact_at_full_rank() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(9, 4), (4, 9)]:
        grid = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1
        u_full, s_full, vh_full = torch.linalg.svd(grid)
        for rank in (1, 2, 4):
            u, v = low_rank(grid, rank)
            assert u.shape == (rank, shape[0]) and v.shape == (rank, shape[1])
            truncated = u_full[:, :rank] @ torch.diag(s_full[:rank]) @ vh_full[:rank]
            assert torch.allclose(u.T @ v, truncated, atol=1e-10)
            uniform = low_rank(grid, rank, weights=torch.full(shape, 3.0))  # equal weights: the same optimum
            assert torch.allclose(uniform[0].T @ uniform[1], truncated, atol=1e-8)
        assert torch.allclose(u.T @ v, grid, atol=1e-10)  # rank 4 = min(shape): exact
        assert (low_rank(grid, 1)[0] > 0).all() and (low_rank(grid, 1)[1] > 0).all()  # Perron: a positive pair


@pytest.mark.parametrize("shape", [(600, 1100), (1100, 600)])
def test_wide_layers_start_from_a_randomized_svd_and_reach_the_same_fit(shape: tuple[int, int]) -> None:
    """Above 512 on the smaller side the weighted fit starts from a randomized SVD (no min(m, n)³
    eigendecomposition); with Adam's weights it ends where the exact start ends, and the randomized SVD alone
    finds the leading singular pair of a grid with a spectral gap."""
    from source_proj.projection import transform

    g = torch.Generator().manual_seed(2)
    second_moment = torch.outer(torch.rand(shape[0], generator=g), torch.rand(shape[1], generator=g)).double()
    second_moment = second_moment * (0.5 + torch.rand(shape, generator=g, dtype=torch.float64))  # not rank one
    grid = (second_moment.sqrt() + 1e-8) ** -0.5
    weights = grid**-4
    w = weights / weights.max()

    def error(pair: tuple[torch.Tensor, torch.Tensor]) -> float:
        return float((w * (grid - pair[0].T @ pair[1]) ** 2).sum() / (w * grid**2).sum())

    for rank in (1, 2):
        randomized = low_rank(grid, rank, weights=weights)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(transform, "_EXACT_START", 10**9)
            exact = low_rank(grid, rank, weights=weights)
        if rank == 1:  # Adam's default: the same fit
            assert float((randomized[0].T @ randomized[1] - exact[0].T @ exact[1]).norm() / grid.norm()) < 1e-12
        else:  # a second pair that fits noise: another fit as good
            assert abs(error(randomized) / error(exact) - 1) < 1e-4, (error(randomized), error(exact))
    with pytest.MonkeyPatch.context() as patch:  # the wide grid never reaches the exact SVD's eigendecomposition
        patch.setattr(transform, "_svd", lambda *a: pytest.fail("the exact SVD was computed"))
        low_rank(grid, 1, weights=weights)
    u, v = transform._randomized_svd(grid, 1)
    _, values, right = torch.linalg.svd(grid, full_matrices=False)
    assert abs(float(v[0] @ right[0])) / float(v[0].norm()) > 1 - 1e-9
    assert torch.allclose(u[0].norm(), values[0], rtol=1e-9)


def test_weighted_low_rank_ignores_what_carries_no_weight() -> None:
    """A rank-one grid with one huge entry of weight 0 (Adam: a coordinate it never moved, D^{-1/2} = ε^{-1/2}):
    the weighted approximation recovers the grid elsewhere exactly, the plain SVD is pulled towards the entry."""
    g = torch.Generator().manual_seed(1)
    grid = torch.outer(torch.rand(7, generator=g) + 0.5, torch.rand(5, generator=g) + 0.5).double()
    weights = torch.ones_like(grid)
    grid[2, 3], weights[2, 3] = 1e4, 0.0
    u, v = low_rank(grid, 1, weights=weights)
    mask = weights > 0
    assert torch.allclose((u.T @ v)[mask], grid[mask], rtol=1e-6)
    plain = low_rank(grid, 1)
    assert float(((plain[0].T @ plain[1] - grid)[mask]).abs().max()) > 1.0


def test_scaling_at_full_rank_is_the_exact_elementwise_scaling_on_every_layer_kind() -> None:
    model, task, batch = _case("gpt2")  # Conv1D (stored transposed), biases, the tied embedding, norms
    names = task.select_parameters(model)
    params = dict(model.named_parameters())
    shapes = [(n, tuple(params[n].shape)) for n in names]
    g = torch.Generator().manual_seed(3)
    scale = {n: torch.rand(shape, generator=g) + 0.2 for n, shape in shapes}
    projector = make_projector("factored", shapes, 64, 0, model=model, adam_rank=64)
    assert isinstance(projector, FactoredProjector)
    grads_fn = PerExampleGradients(model, task, names)
    expected = projector.project({n: gr * scale[n] for n, gr in grads_fn(batch).items()})
    got = projector.project_batch(grads_fn, batch, transform=projector.scaling(scale))
    assert float((got - expected).norm() / expected.norm()) < 1e-4


def _adam_trained() -> tuple[nn.Module, dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A small MLP trained 60 AdamW steps on a noisy task; its D^{-1/2} and 64 examples."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g)
    y = (x[:, :3].sum(1) + 0.5 * torch.randn(256, generator=g) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for step in range(60):
        rows = torch.arange(step * 32, step * 32 + 32) % 256
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    scale = {}
    for name, p in model.named_parameters():
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        scale[name] = (v_hat.sqrt() + 1e-8).rsqrt()
    return model, scale, (x[:64], y[:64])


def test_adams_rank_r_scaling_error_is_bounded_and_shrinks_with_r() -> None:
    """Inner products of D^{-1/2}-scaled gradients (what scores are made of), rank-R against exact."""
    model, scale, batch = _adam_trained()
    names = [n for n, _ in model.named_parameters()]
    grads = PerExampleGradients(model, sp.ClassificationTask(), names)(batch)
    layers = make_projector("factored", [(n, tuple(scale[n].shape)) for n in names], 64, 0, model=model).layers

    def gram(transform: GradientTransform) -> torch.Tensor:
        scaled = transform.apply(grads)
        flat = torch.cat([scaled[n].reshape(64, -1).double() for n in names], dim=1)
        return flat @ flat.T

    exact = gram(scaling_transform(scale))
    errors = {}
    for rank in (1, 2, 4, 16):
        approx = gram(scaling_transform(scale, layers, rank))
        errors[rank] = float((approx - exact).norm() / exact.norm())
    assert errors[16] < 1e-6  # rank 16 covers every layer here (min(d_out, d_in + 1) ≤ 16): exact
    assert errors[1] < 0.1 and errors[4] < 0.03, errors  # measured: 0.061, 0.029, 0.015 for R = 1, 2, 4
    assert errors[1] > errors[2] > errors[4], errors
    assert float((gram(GradientTransform()) - exact).norm() / exact.norm()) > 3 * errors[1]  # far better than none


def test_a_parameter_mapped_twice_is_refused() -> None:
    layer = FactoredLayer("fc", "fc.weight", None, 2, 2)
    with pytest.raises(sp.TaskError, match="maps parameters"):
        GradientTransform((LayerTransform(layer, torch.ones(1, 2), torch.ones(1, 2)),), {"fc.weight": torch.ones(2, 2)})
