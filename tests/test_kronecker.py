"""Kronecker-factored curvature (K-FAC) in the full parameter space: the factors featurize collects, the
matrix functions fit builds from them, and SOURCE's query-side operators, against brute force."""

from __future__ import annotations

import shutil
import sys
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.cli.main import main
from source_proj.featurize import arguments
from source_proj.featurize.factors import (
    FactorCollector,
    _output_positions,
    _positions,
    kronecker_layers,
    layers_from_description,
)
from source_proj.methods.fit import read_curvature
from source_proj.methods.kronecker import KroneckerCurvature, LayerFactors, layer_matrix, source_query_directions
from source_proj.methods.source import phi, survival
from source_proj.projection.factored import FactoredLayer
from source_proj.projection.transform import scaling_transform
from source_proj.store.store import key_step
from source_proj.tasks.draws import FisherDraws
from source_proj.tasks.gradients import PerExampleGradients
from source_proj.trajectory.preconditioner import unflatten
from source_proj.trajectory.recorder import TrajectoryRecorder

from .conftest import _classification_data, conv_patches, full_batch_run, step_weights_by_hand


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
        self.conv1d = nn.Conv1d(3, 2, kernel_size=2, dilation=2, bias=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # [B, 3, 3, 3]
        h = torch.relu(self.conv1d(h.flatten(2)))  # [B, 2, 7]
        h = h.flatten(1)[:, :8]
        return self.head(self.norm(h))


class _Conv3dNet(nn.Module):
    """Two 3-d convolutions (zero padding with stride and dilation; circular 'same' with an even kernel, no bias)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), dilation=(2, 1, 1), padding=(1, 1, 0))
        self.conv3d = nn.Conv3d(3, 2, 2, padding="same", padding_mode="circular", bias=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # [B, 3, 4, 3, 2]
        h = torch.relu(self.conv3d(h))  # [B, 2, 4, 3, 2]
        h = h.flatten(1)[:, :8]
        return self.head(self.norm(h))


_CONV_NETS = {
    "conv2d-conv1d": (_ConvNet, (2, 6, 6), ["conv", "conv1d", "head"]),
    "conv3d": (_Conv3dNet, (2, 4, 5, 3), ["conv", "conv3d", "head"]),
}


def _conv_batch(shape: tuple[int, ...] = (2, 6, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, *shape, generator=g), torch.randint(0, 4, (5,), generator=g)


@pytest.mark.parametrize("net", sorted(_CONV_NETS))
def test_positions_rebuild_every_layers_per_example_gradient(net: str) -> None:
    """Σ_t δ_t ā_tᵀ from the collector's per-position inputs and output gradients equals the per-example
    weight (and bias) gradient from autodiff, for Linear, Conv1d, Conv2d and Conv3d layers."""
    build, shape, kronecker = _CONV_NETS[net]
    model = build().eval()
    task = sp.ClassificationTask()
    x, y = _conv_batch(shape)
    names = [n for n, _ in model.named_parameters()]
    layers, diagonal = kronecker_layers(model, names)
    assert [layer.module for layer in layers] == kronecker
    assert diagonal == ["norm.weight", "norm.bias"]
    grads_fn = PerExampleGradients(model, task, names)
    exact = grads_fn((x, y), "loss")
    modules = dict(model.named_modules())
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def fn(module: nn.Module, args, output: torch.Tensor) -> None:
            output.register_hook(lambda g: captured.__setitem__(name, (args[0].detach(), g.detach())))

        return fn

    handles = [modules[layer.module].register_forward_hook(hook(layer.module)) for layer in layers]
    F.cross_entropy(model(x), y, reduction="sum").backward()
    for handle in handles:
        handle.remove()
    for layer in layers:
        inputs, out_grad = captured[layer.module]
        a = _positions(modules[layer.module], inputs, layer).reshape(len(x), -1, layer.in_rows)
        d = _output_positions(modules[layer.module], out_grad, layer).reshape(len(x), -1, layer.out_features)
        rebuilt = torch.einsum("bto,bti->boi", d, a)
        torch.testing.assert_close(rebuilt, layer_matrix(exact, layer), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("net", sorted(_CONV_NETS))
def test_collected_factors_equal_brute_force_sums(net: str) -> None:
    """A = Σ ā āᵀ, B = Σ w δ δᵀ over examples and positions, and the Fisher diagonal Σ w g², for weighted
    pseudo-targets, against per-example autodiff (a convolution's positions are its patches, from ``conv_patches``)."""
    build, shape, kronecker = _CONV_NETS[net]
    model = build().eval()
    task = sp.ClassificationTask()
    x, y = _conv_batch(shape)
    names = [n for n, _ in model.named_parameters()]
    layers, diagonal = kronecker_layers(model, names)
    assert [layer.module for layer in layers] == kronecker and diagonal == ["norm.weight", "norm.bias"]
    grads_fn = PerExampleGradients(model, task, names)
    collector = FactorCollector(grads_fn, layers, diagonal)
    sums = collector.empty()
    weight = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5])
    collector.add(sums, [(weight, (x, y))])
    modules = dict(model.named_modules())
    for i, layer in enumerate(layers):
        # brute force: run each example alone, capture its layer input and output gradient
        a_total = torch.zeros(layer.in_rows, layer.in_rows, dtype=torch.float64)
        b_total = torch.zeros(layer.out_features, layer.out_features, dtype=torch.float64)
        for n in range(len(x)):
            seen = {}

            def fn(module, args, output, seen=seen):
                seen["a"] = args[0].detach()
                output.register_hook(lambda g: seen.__setitem__("d", g.detach()))

            handle = modules[layer.module].register_forward_hook(fn)
            F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]).backward()
            handle.remove()
            module = modules[layer.module]
            a = conv_patches(module, seen["a"]) if layer.kind == "conv" else seen["a"].reshape(-1, layer.in_features)
            if layer.bias:
                a = torch.cat([a, torch.ones(len(a), 1)], 1)
            a = a.double()
            d = seen["d"].movedim(1, -1).reshape(-1, layer.out_features).double()  # channels last: [positions, C_out]
            a_total += a.T @ a
            b_total += weight[n].double() * d.T @ d
        # float32 forwards on both sides: entries near zero differ by float32 rounding of the matrix's scale
        torch.testing.assert_close(sums.a[i], a_total, rtol=1e-5, atol=1e-6 * float(a_total.abs().max()))
        torch.testing.assert_close(sums.b[i], b_total, rtol=1e-5, atol=1e-6 * float(b_total.abs().max()))
    per_example = grads_fn((x, y), "loss", names=diagonal)
    for name in diagonal:
        w = weight.view(-1, *[1] * (per_example[name].dim() - 1))
        torch.testing.assert_close(
            sums.diagonal[name], (w * per_example[name] ** 2).sum(0).double(), rtol=1e-5, atol=1e-9
        )
    assert sums.examples == len(x)


class _Pooled(nn.Module):
    """A Linear layer over T positions, mean-pooled, then a classifier: the first layer sees T positions per
    example, the head one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(3, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x)).mean(1))


def _factor_sums(collector: FactorCollector, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, key: int = 0):
    sums = collector.empty()
    collector.add(sums, [(weight, (x, y))], FisherDraws(key, torch.arange(x.shape[0])))
    return sums


def test_sampled_positions_are_exact_where_an_examples_positions_repeat_and_unbiased_otherwise() -> None:
    """With P of an example's T positions in the factors: where every position of an example carries the same
    input (so the same δ), A's mean over positions and B (each example's terms scaled by T/P) equal the
    factors of every position exactly, so the draw takes P positions of each example, not of the batch; where
    they differ a draw does not equal them, but the mean of many draws does. A layer with at most P positions
    (the head) and P ≥ T are untouched, bit for bit."""
    model = _Pooled().eval()
    task = sp.ClassificationTask()
    names = [n for n, _ in model.named_parameters()]
    layers, diagonal = kronecker_layers(model, names)
    grads_fn = PerExampleGradients(model, task, names)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 3, generator=g).expand(8, 6, 3).contiguous()
    y, weight = torch.randint(0, 4, (8,), generator=g), torch.rand(8, generator=g) + 0.5
    full = _factor_sums(FactorCollector(grads_fn, layers, diagonal), x, y, weight)
    sampler = FactorCollector(grads_fn, layers, diagonal, positions=2)
    part = _factor_sums(sampler, x, y, weight)
    assert sampler.sampled and full.positions == [48, 8] and part.positions == [16, 8]
    for i in range(2):  # float32 products: sums of 16 and of 48 terms round apart
        torch.testing.assert_close(part.a[i] / part.positions[i], full.a[i] / full.positions[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(part.b[i], full.b[i], rtol=1e-5, atol=1e-6 * float(full.b[i].abs().max()))
    assert torch.equal(part.a[1], full.a[1]) and torch.equal(part.b[1], full.b[1])
    whole = FactorCollector(grads_fn, layers, diagonal, positions=6)
    same = _factor_sums(whole, x, y, weight)
    assert not whole.sampled and all(torch.equal(s, f) for s, f in zip(same.a + same.b, full.a + full.b, strict=True))

    x = torch.randn(8, 6, 3, generator=g)  # every position its own
    full = _factor_sums(FactorCollector(grads_fn, layers, diagonal), x, y, weight)

    def gap(estimate: torch.Tensor, exact: torch.Tensor) -> float:
        return float((estimate - exact).norm() / exact.norm())

    a_full, b_full = full.a[0] / full.positions[0], full.b[0]
    single = [_factor_sums(sampler, x, y, weight, key) for key in range(20)]  # each key its own draw
    single_gaps = [(gap(d.a[0] / 16, a_full), gap(d.b[0], b_full)) for d in single]  # a draw is not the factors
    assert np.median([a for a, _ in single_gaps]) > 0.05 and np.median([b for _, b in single_gaps]) > 0.05
    # 1,500 draws: 5 keys, each over 300 copies of the 8 examples (a copy's rows are its own, so its own draw).
    # A draw's gap is 0.46 (A) and 0.12 (B) in root mean square: the mean of 1,500 independent ones, 0.012 and 0.003.
    copies = 300
    xs, ys, ws = x.repeat(copies, 1, 1), y.repeat(copies), weight.repeat(copies)
    draws = [_factor_sums(sampler, xs, ys, ws, key) for key in range(5)]
    assert all(d.positions[0] == 16 * copies for d in draws)
    assert gap(sum(d.a[0] for d in draws) / (16 * copies * len(draws)), a_full) < 0.02
    assert gap(sum(d.b[0] for d in draws) / (copies * len(draws)), b_full) < 0.02


def test_sampled_positions_are_each_examples_own_whatever_its_batch() -> None:
    """An example's positions are drawn from its key and index: batches of 3 and 5 take the factors batches of 8
    take (before, one generator ran through the batch's positions, position-major, so the split moved them)."""
    model = _Pooled().eval()
    names = [n for n, _ in model.named_parameters()]
    layers, diagonal = kronecker_layers(model, names)
    grads_fn = PerExampleGradients(model, sp.ClassificationTask(), names)
    g = torch.Generator().manual_seed(3)
    x, y, weight = torch.randn(8, 6, 3, generator=g), torch.randint(0, 4, (8,), generator=g), torch.ones(8)
    collector = FactorCollector(grads_fn, layers, diagonal, positions=2)
    whole = _factor_sums(collector, x, y, weight)
    split = collector.empty()
    for rows in (torch.arange(3), torch.arange(3, 8)):
        collector.add(split, [(weight[rows], (x[rows], y[rows]))], FisherDraws(0, rows))
    assert collector.sampled and split.positions == whole.positions == [16, 8]
    for i in range(2):
        torch.testing.assert_close(split.a[i], whole.a[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split.b[i], whole.b[i], rtol=1e-5, atol=1e-6)


class _FirstFour(_Pooled):
    """``_Pooled`` whose head reads the first four positions only: those after them take no part in the loss, as
    padding does in a text model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x))[:, :4].mean(1))


def test_positions_that_take_no_part_in_the_loss_enter_no_factor() -> None:
    """A token whose δ is 0 adds nothing to any gradient: the factors of a batch padded with such positions equal
    those of the batch without them, with every position and with P drawn of each example's, and A is the
    brute-force sum over the read positions. An example of weight 0 (all its δ are 0) keeps all its positions."""
    model = _FirstFour().eval()
    task = sp.ClassificationTask()
    names = [n for n, _ in model.named_parameters()]
    layers, diagonal = kronecker_layers(model, names)
    grads_fn = PerExampleGradients(model, task, names)
    g = torch.Generator().manual_seed(2)
    read = torch.randn(8, 4, 3, generator=g)
    padded = torch.cat([read, torch.randn(8, 3, 3, generator=g)], dim=1)
    y, weight = torch.randint(0, 4, (8,), generator=g), torch.rand(8, generator=g) + 0.5
    for positions in (None, 2):
        sums = []
        for x in (read, padded):
            collector = FactorCollector(grads_fn, layers, diagonal, positions=positions)
            sums.append(_factor_sums(collector, x, y, weight))
        assert sums[0].positions == sums[1].positions == [32 if positions is None else 16, 8]
        for i in range(2):
            torch.testing.assert_close(sums[1].a[i], sums[0].a[i], rtol=1e-6, atol=0.0)
            torch.testing.assert_close(sums[1].b[i], sums[0].b[i], rtol=1e-6, atol=0.0)
    inner = _positions(model.inner, padded[:, :4].reshape(-1, 3), layers[0]).double()
    every = _factor_sums(FactorCollector(grads_fn, layers, diagonal), padded, y, weight)
    torch.testing.assert_close(every.a[0], inner.T @ inner, rtol=1e-5, atol=1e-6 * float(every.a[0].abs().max()))
    silent = _factor_sums(FactorCollector(grads_fn, layers, diagonal), padded, y, weight * (torch.arange(8) > 0))
    assert silent.positions == [7 + 7 * 4, 8]


def test_fitted_kronecker_factors_of_a_layer_over_positions_are_the_mean_over_positions_and_over_examples(
    tmp_path: Path,
) -> None:
    """fit's Kronecker curvature of a layer that sees T = 6 positions per example (``_Pooled``) is B̄ ⊗ Ā with
    Ā = Σ_n Σ_t ā āᵀ / (N·T) (a mean over positions) and B̄ = Σ_n Σ_c p_c Σ_t δ δᵀ / N (a mean over examples),
    each averaged over the segment's checkpoints with fit's weights, against explicit per-example loops (the
    MLP oracles have one position per example, where the two means coincide)."""
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(8, 6, 3, generator=g), torch.randint(0, 4, (8,), generator=g))
    ce = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    full_batch_run(tmp_path / "run", _Pooled(), data, ce, lr=0.5, steps=2, save_every=2)
    store = sp.featurize(
        tmp_path / "run",
        _Pooled(),
        sp.ClassificationTask(),
        data,
        tmp_path / "s.sp",
        projection=sp.ProjectionArguments(kind="identity"),
        options=sp.FeaturizeArguments(batch_size=8, chunk_rows=8, fisher="exact", curvature="kfac"),
        progress=False,
    )
    sp.fit(store, sp.FitArguments(curvature="kfac"), progress=False)
    store = sp.Store.open(tmp_path / "s.sp")
    fitted = read_curvature(store, "methods/source/operators/0", 0.0)
    traj, model = sp.Trajectory.load(tmp_path / "run"), _Pooled()
    expected = [[0.0, 0.0], [0.0, 0.0]]  # [layer][A, B]
    for key, weight in store.meta["methods"]["source"]["points"][0]:
        traj.load_into(model, next(c for c in traj.checkpoints if c.step == key_step(key)))
        for i, module in enumerate((model.inner, model.head)):
            a_total, b_total, positions = 0.0, 0.0, 0
            for n in range(len(data)):
                x = data.tensors[0][n : n + 1]
                probs = torch.softmax(model(x), -1).detach()[0]
                for c in range(len(probs)):
                    seen: dict[str, torch.Tensor] = {}

                    def hook(module, args, output, seen=seen):
                        seen["a"] = args[0].detach()
                        output.register_hook(lambda out_grad: seen.__setitem__("d", out_grad.detach()))

                    handle = module.register_forward_hook(hook)
                    F.cross_entropy(model(x), torch.tensor([c])).backward()
                    handle.remove()
                    a = seen["a"].reshape(-1, module.in_features).double()
                    a = torch.cat([a, torch.ones(len(a), 1, dtype=torch.float64)], 1)
                    d = seen["d"].reshape(-1, module.out_features).double()
                    if c == 0:
                        a_total, positions = a_total + a.T @ a, positions + len(a)
                    b_total = b_total + probs[c].double() * d.T @ d
            assert positions == len(data) * (6 if i == 0 else 1)
            expected[i][0] = expected[i][0] + weight * a_total / positions
            expected[i][1] = expected[i][1] + weight * b_total / len(data)
    for factors, (a, b) in zip(fitted.factors, expected, strict=True):
        ours_a = (factors.a_vectors * factors.a_values) @ factors.a_vectors.T
        ours_b = (factors.b_vectors * factors.b_values) @ factors.b_vectors.T
        product = torch.kron(b, a)  # only B ⊗ A is defined: a scale may move between its factors
        scale = float(product.abs().max())
        torch.testing.assert_close(torch.kron(ours_b, ours_a), product, rtol=1e-4, atol=1e-6 * scale)


def test_layer_matrix_function_equals_the_explicit_kronecker_matrix_function() -> None:
    """g(B ⊗ A + λI) vec(G) computed in the factors' eigenbasis equals the dense 24 × 24 matrix function."""
    g = torch.Generator().manual_seed(3)
    a_root, b_root = (
        torch.randn(6, 6, generator=g, dtype=torch.float64),
        torch.randn(4, 4, generator=g, dtype=torch.float64),
    )
    a, b = a_root @ a_root.T / 6, b_root @ b_root.T / 4
    mats = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    factors = LayerFactors.from_factors(a, b)
    dense = torch.kron(b, a) + 0.05 * torch.eye(24, dtype=torch.float64)  # row-major vec(G): (B ⊗ A) vec G = vec(B G A)
    sigma, u = torch.linalg.eigh(dense)
    for fn in (lambda s: phi(s, 2.5), lambda s: survival(s, 2.5), lambda s: 1.0 / s):
        expected = ((mats.reshape(3, 24) @ u) * fn(sigma)) @ u.T
        torch.testing.assert_close(factors.apply(mats, fn, 0.05).reshape(3, 24), expected, rtol=1e-9, atol=1e-10)


def test_query_directions_of_three_segments_with_a_diagonal_equal_the_dense_matrix_functions() -> None:
    """A_ℓᵀ ∇f = F_ℓ S_{ℓ+1} ⋯ S_L ∇f for three segments (the survival is carried through every later segment, not
    just the last), each H_ℓ = (B_ℓ ⊗ A_ℓ) ⊕ diag(d_ℓ) + λ_ℓ I on a non-square layer with a bias and a parameter no
    layer factors, against dense 14 × 14 matrix exponentials and inverses; and its mean eigenvalue is tr(H_ℓ)/p."""
    g = torch.Generator().manual_seed(11)
    lin = FactoredLayer("fc", "fc.weight", "fc.bias", 4, 2)  # G is 4 × (2 + 1)
    shapes = {"fc.weight": (4, 2), "fc.bias": (4,), "norm.weight": (2,)}
    p = 4 * 3 + 2
    curvatures, dense = [], []
    for damping in (0.05, 0.2, 0.1):
        a_root = torch.randn(3, 3, generator=g, dtype=torch.float64)
        b_root = torch.randn(4, 4, generator=g, dtype=torch.float64)
        a, b = a_root @ a_root.T / 3, b_root @ b_root.T / 4
        diag = torch.rand(2, generator=g, dtype=torch.float64) * 2
        curvature = KroneckerCurvature((lin,), (LayerFactors.from_factors(a, b),), {"norm.weight": diag}, damping)
        h = torch.block_diag(torch.kron(b, a), torch.diag(diag))  # row-major vec([W | b]), then the diagonal's
        assert curvature.mean_eigenvalue() == pytest.approx(float(torch.trace(h)) / p, rel=1e-12)
        curvatures.append(curvature)
        dense.append(h + damping * torch.eye(p, dtype=torch.float64))
    times = [0.7, 1.5, 0.4]
    grads = {name: torch.randn(2, *shape, generator=g, dtype=torch.float64) for name, shape in shapes.items()}

    def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
        mat = torch.cat([d["fc.weight"], d["fc.bias"][:, :, None]], dim=2)
        return torch.cat([mat.reshape(2, -1), d["norm.weight"]], dim=1)

    eye = torch.eye(p, dtype=torch.float64)
    survive = [torch.linalg.matrix_exp(-t * h) for h, t in zip(dense, times, strict=True)]
    response = [(eye - s) @ torch.linalg.inv(h) for s, h in zip(survive, dense, strict=True)]
    ours = source_query_directions(grads, curvatures, times, shapes)
    q = flat(grads)
    for index in range(3):
        carried = q
        for later in reversed(survive[index + 1 :]):
            carried = carried @ later  # q S_L ⋯ S_{ℓ+1}
        torch.testing.assert_close(flat(ours[index]), carried @ response[index], rtol=1e-9, atol=1e-12)


def _two_layer_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _kfac_by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact-Fisher K-FAC factors (A, B) of every Linear layer of ``model`` on ``x`` (all classes weighted by
    their probability), by explicit loops: A = mean ā āᵀ, B = mean Σ_c p_c δ_c δ_cᵀ."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    out = []
    for lin in lins:
        a_total = torch.zeros(lin.in_features + 1, lin.in_features + 1, dtype=torch.float64)
        b_total = torch.zeros(lin.out_features, lin.out_features, dtype=torch.float64)
        for n in range(len(x)):
            probs = torch.softmax(model(x[n : n + 1]), -1).detach()[0]
            for c in range(probs.shape[0]):
                seen = {}

                def fn(module, args, output, seen=seen):
                    seen["a"] = args[0].detach()
                    output.register_hook(lambda g: seen.__setitem__("d", g.detach()))

                handle = lin.register_forward_hook(fn)
                F.cross_entropy(model(x[n : n + 1]), torch.tensor([c])).backward()
                handle.remove()
                a = torch.cat([seen["a"], torch.ones(1, 1)], 1).double()
                d = seen["d"].double()
                if c == 0:
                    a_total += a.T @ a
                b_total += probs[c].double() * d.T @ d
        out.append((a_total / len(x), b_total / len(x)))
    return out


@dataclass(frozen=True)
class _KfacRun:
    """A run featurized with exact-Fisher Kronecker factors (not fitted), and SOURCE's pieces by hand: per segment
    the undamped block-diagonal ``B̄ ⊗ Ā`` and the averaged training gradients ``ḡ`` ``[N, p]``, and the queries'
    measurement gradients ``[Q, p]`` at the final checkpoint (float64, every layer's ``vec(G)`` in turn)."""

    store: Path
    queries: TensorDataset
    segments: list[sp.Segment]
    kronecker: list[torch.Tensor]
    gbars: list[torch.Tensor]
    query_grads: torch.Tensor


@pytest.fixture(scope="module")
def kfac_run(tmp_path_factory: pytest.TempPathFactory) -> _KfacRun:
    """Featurized once for both dampings of ``test_source_with_kronecker_curvature_equals_brute_force`` (only fit
    takes the damping; each test fits its own copy of the store)."""
    classification_data = _classification_data()
    data = TensorDataset(classification_data.tensors[0][:24], classification_data.tensors[1][:24] % 3)
    model = _two_layer_classifier()
    task = sp.ClassificationTask()
    root = tmp_path_factory.mktemp("kfac")
    run = root / "run"
    full_batch_run(
        run,
        model,
        data,
        lambda out, y: F.cross_entropy(out, y, reduction="none"),
        lr=0.5,
        steps=8,
        weight_decay=0.01,
        save_every=2,
    )
    store = root / "s.sp"
    sp.featurize(
        run,
        _two_layer_classifier(),
        task,
        data,
        store,
        projection=sp.ProjectionArguments(kind="identity"),
        options=sp.FeaturizeArguments(batch_size=8, chunk_rows=16, fisher="exact", curvature="kfac"),
        progress=False,
    )
    queries = TensorDataset(classification_data.tensors[0][24:28], classification_data.tensors[1][24:28] % 3)

    traj = sp.Trajectory.load(run)
    work = _two_layer_classifier()
    names = [n for n, _ in work.named_parameters()]
    steps = [c.step for c in traj.checkpoints]
    segments = sp.make_segments(traj.stages, steps, traj.lr, {n: 1 for n in names}, boundaries=(2,))
    x, y = data.tensors

    def flat_grads(quantity: str, xs, ys) -> torch.Tensor:
        grads_fn = PerExampleGradients(work, task, names)
        g = grads_fn((xs, ys), quantity)
        layers, _ = kronecker_layers(work, names)
        return torch.cat([layer_matrix(g, layer).reshape(len(xs), -1) for layer in layers], 1).double()

    by_step = {c.step: c for c in traj.checkpoints}
    kronecker, gbars = [], []
    for seg in segments:
        factor_sums, gsum = None, 0
        # the segment's average over its steps: every checkpoint of the stage may take a share (SGD)
        weights = step_weights_by_hand(seg.start_step, seg.end_step, steps, traj.lr)
        for s, w in weights.items():
            traj.load_into(work, by_step[s])
            factors = [(w * a, w * b) for a, b in _kfac_by_hand(work, x, y)]
            factor_sums = factors if factor_sums is None else [
                (a0 + a1, b0 + b1) for (a0, b0), (a1, b1) in zip(factor_sums, factors, strict=True)
            ]
            gsum = gsum + w * flat_grads("loss", x, y)
        kronecker.append(torch.block_diag(*[torch.kron(b, a) for a, b in factor_sums]))
        gbars.append(gsum)
    traj.load_into(work, traj.final_checkpoint)
    return _KfacRun(store, queries, segments, kronecker, gbars, flat_grads("measurement", *queries.tensors))


@pytest.mark.parametrize("damping_factor", [None, 1.0])  # None: the default, undamped for kfac
def test_source_with_kronecker_curvature_equals_brute_force(
    tmp_path: Path, kfac_run: _KfacRun, damping_factor: float | None
) -> None:
    """The whole pipeline (featurize with Kronecker factors → fit → query, identity projection, two
    segments of unequal length, steps 0–2 and 2–8, so each has its own η̄K) equals SOURCE computed by hand with
    dense Kronecker matrices: score = −Σ_ℓ (1/N) ∇fᵀ A_ℓ ḡ_ℓ,
    A_ℓ = S_L ⋯ S_{ℓ+1} F_ℓ, H_ℓ = B̄ ⊗ Ā + λI per layer with the factors, and ḡ_ℓ, averaged over the segment's
    steps from the checkpoints around them (K-FAC's pooled statistics; `step_weights_by_hand`),
    λ = weight decay + damping_factor × tr(B̄ ⊗ Ā)/p."""
    store = tmp_path / "s.sp"
    shutil.copytree(kfac_run.store, store)
    sp.fit(store, sp.FitArguments(boundaries=(2,), damping_factor=damping_factor), progress=False)
    ours = sp.Attributor(store, _two_layer_classifier(), sp.ClassificationTask()).scores(kfac_run.queries)

    def fn_of(h: torch.Tensor, f) -> torch.Tensor:
        sigma, u = torch.linalg.eigh(h)
        return (u * f(sigma.clamp_min(0))) @ u.T

    q = kfac_run.query_grads
    expected = torch.zeros(len(q), kfac_run.gbars[0].shape[0], dtype=torch.float64)
    carried = q
    for k, gbar, seg in reversed(list(zip(kfac_run.kronecker, kfac_run.gbars, kfac_run.segments, strict=True))):
        damping = seg.weight_decay + (damping_factor or 0.0) * float(torch.trace(k)) / k.shape[0]
        h = k + damping * torch.eye(k.shape[0], dtype=torch.float64)
        direction = carried @ fn_of(h, lambda s, t=seg.time: phi(s, t))
        expected += -(direction @ gbar.T) / gbar.shape[0]
        carried = carried @ fn_of(h, lambda s, t=seg.time: survival(s, t))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=2e-3, atol=1e-6 * float(expected.abs().max()))


def test_a_store_of_kronecker_factors_only_refuses_the_projected_curvature_naming_what_to_fit_with(
    tmp_path: Path, kfac_run: _KfacRun
) -> None:
    """featurize(curvature="kfac") keeps no projected Fisher; fit asked for the projected curvature says to fit with
    the Kronecker one, as ``curvature='kfac'`` in Python and as ``--curvature kfac`` on the command line."""
    # featurize packed each of its many arrays and then dropped the staging group once, at its end
    assert not (kfac_run.store / "staging").exists()
    store = tmp_path / "s.sp"
    shutil.copytree(kfac_run.store, store)
    with pytest.raises(sp.StoreError) as err:
        sp.fit(store, sp.FitArguments(curvature="projected"), progress=False)
    assert str(err.value) == (
        "This store was featurized with curvature='kfac', so it has no 'projected' curvature; fit with "
        "curvature='kfac', or re-run featurize with FeaturizeArguments(curvature='projected') (--curvature) into "
        "another store."
    )
    out = CliRunner().invoke(main, ["fit", str(store), "--curvature", "projected"])
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    assert out.output.splitlines()[-1] == (
        "Error: This store was featurized with --curvature kfac, so it has no 'projected' curvature; fit with "
        "--curvature kfac, or re-run featurize with FeaturizeArguments(curvature='projected') (--curvature) into "
        "another store."
    )
    assert "methods" not in sp.Store.open(store).meta or not sp.Store.open(store).meta["methods"]


def test_query_directions_reduce_to_the_influence_function_and_to_grad_dot() -> None:
    """docs/concepts/source.md §7: one segment with η̄K·σ ≫ 1 gives (H + λI)⁻¹∇f (an influence function); η̄K·σ ≪ 1
    gives η̄K·∇f (gradient-dot)."""
    g = torch.Generator().manual_seed(7)
    root_a, root_b = (
        torch.randn(4, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 3, generator=g, dtype=torch.float64),
    )
    factors = LayerFactors.from_factors(
        root_a @ root_a.T + torch.eye(4, dtype=torch.float64), root_b @ root_b.T + torch.eye(3, dtype=torch.float64)
    )
    lin = FactoredLayer("fc", "fc.weight", "fc.bias", 3, 3)
    curvature = KroneckerCurvature((lin,), (factors,), {}, 0.1)
    shapes = {"fc.weight": (3, 3), "fc.bias": (3,)}
    grads = {
        "fc.weight": torch.randn(2, 3, 3, generator=g, dtype=torch.float64),
        "fc.bias": torch.randn(2, 3, generator=g, dtype=torch.float64),
    }
    long = source_query_directions(grads, [curvature], [1e6], shapes)[0]
    inverse = curvature.apply(grads, lambda s: 1.0 / s, shapes)
    for name in grads:
        torch.testing.assert_close(long[name], inverse[name], rtol=1e-9, atol=1e-12)
    short = source_query_directions(grads, [curvature], [1e-7], shapes)[0]
    for name in grads:
        torch.testing.assert_close(short[name], 1e-7 * grads[name], rtol=1e-4, atol=1e-12)


def test_adam_scaling_enters_the_factors_exactly_when_it_is_a_row_column_product() -> None:
    """Adam's D^{-1/2} enters the Kronecker factors through its weighted rank-one fit r cᵀ: for a scaling that
    is such a product, (r cᵀ) ⊙ G = diag(r) G diag(c), so the factors of the scaled gradients are
    diag(c) A diag(c) and diag(r) B diag(r) exactly (checked against factors of explicitly scaled gradients)."""
    from source_proj.projection.transform import scaling_transform

    torch.manual_seed(0)
    layer = FactoredLayer("fc", "fc.weight", "fc.bias", 3, 4)
    row, col = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.3, 1.0, 4.0, 2.0, 0.7])
    scale = {"fc.weight": torch.outer(row, col[:4]), "fc.bias": row * col[4]}
    terms = scaling_transform(scale, [layer], rank=1).layer("fc.weight")
    r, c = terms.left[0].double(), terms.right[0].double()
    # Per-example gradients of a linear layer at one position: G = δ āᵀ.
    a_bar = torch.cat([torch.randn(50, 4), torch.ones(50, 1)], 1).double()
    delta = torch.randn(50, 3).double()
    scaled_a, scaled_d = a_bar * (col.double()), delta * row.double()
    torch.testing.assert_close(torch.outer(r, c), torch.outer(row, col).double(), rtol=1e-6, atol=1e-8)
    a, b = a_bar.T @ a_bar / 50, delta.T @ delta / 50
    torch.testing.assert_close(a * torch.outer(c, c) * (b * torch.outer(r, r))[0, 0],
                               (scaled_a.T @ scaled_a / 50) * (scaled_d.T @ scaled_d / 50)[0, 0], rtol=1e-6, atol=1e-8)


def test_auto_curvature_is_kronecker_for_exact_gradients_of_a_wide_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``curvature="auto"``: the projected Gauss–Newton on a projection, and on the identity of a small model
    (where it is the exact one); Kronecker factors on the identity of more than EXACT_PROJECTED_MAX
    parameters, where the projected one would be p × p. A projected curvature too large to fit is refused
    before anything is written."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 80, generator=g), torch.randint(0, 60, (16,), generator=g))
    torch.manual_seed(0)
    wide = nn.Linear(80, 60)  # 4,860 parameters
    full_batch_run(tmp_path / "wide", wide, data, F.cross_entropy, lr=0.1, steps=2)
    small_data = TensorDataset(data.tensors[0][:, :4], data.tensors[1] % 3)
    small = nn.Linear(4, 3)
    full_batch_run(tmp_path / "small", small, small_data, F.cross_entropy, lr=0.1, steps=2)
    options = sp.FeaturizeArguments(batch_size=16, chunk_rows=16, measurement=False)

    def curvature(run: str, model: nn.Module, train: TensorDataset, kind: str, **changes: str) -> str:
        store = sp.featurize(
            tmp_path / run,
            model,
            sp.ClassificationTask(),
            train,
            tmp_path / "-".join([run, kind, *changes.values()]),
            projection=sp.ProjectionArguments(dim=8, kind=kind),
            options=replace(options, **changes),
            progress=False,
        )
        return store.meta["featurize"]["curvature"]

    assert sp.FeaturizeArguments().curvature == "auto"
    assert curvature("wide", wide, data, "identity") == "kfac"
    assert curvature("wide", wide, data, "rademacher") == "projected"
    assert curvature("small", small, small_data, "identity") == "projected"
    monkeypatch.setattr(arguments, "PROJECTED_MAX", 4096)
    with pytest.raises(sp.TaskError, match="k × k matrix per checkpoint, too large with 4,860 parameters unprojected"):
        curvature("wide", wide, data, "identity", curvature="both")
    assert not (tmp_path / "wide-identity-both").exists()


class _TwoUses(nn.Module):
    """One Linear applied to two inputs of each example, separately (a shared block) or as two positions of one
    call: the same outputs and the same gradients."""

    def __init__(self, stacked: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared, self.head, self.stacked = nn.Linear(3, 4), nn.Linear(4, 3), stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 2, 3]
        if self.stacked:
            return self.head(torch.tanh(self.shared(x)).sum(1))
        return self.head(torch.tanh(self.shared(x[:, 0])) + torch.tanh(self.shared(x[:, 1])))


def test_a_layer_used_twice_enters_its_factors_with_both_uses_as_positions() -> None:
    """A shared layer's Kronecker factors took one use's inputs and another's output gradients. Each use now adds
    its positions to A and its δ to B, as the same layer called once on both inputs as two positions does."""
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1))
    y, weight = torch.tensor([0, 1, 2, 1, 0]), torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5])
    sums = []
    for stacked in (False, True):
        model = _TwoUses(stacked).eval()
        names = [n for n, _ in model.named_parameters()]
        layers, diagonal = kronecker_layers(model, names)
        grads_fn = PerExampleGradients(model, sp.ClassificationTask(), names)
        sums.append(_factor_sums(FactorCollector(grads_fn, layers, diagonal), x, y, weight))
    for i in range(2):
        torch.testing.assert_close(sums[0].a[i], sums[1].a[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sums[0].b[i], sums[1].b[i], rtol=1e-5, atol=1e-6)
        assert sums[0].positions[i] == sums[1].positions[i]


class _ConvTwice(nn.Module):
    """A Conv2d applied twice with gradients and once more under ``torch.no_grad`` (that use has no δ: it adds nothing),
    then a Conv1d over its output, and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, kernel_size=3, padding=1)
        self.conv1d = nn.Conv1d(2, 3, kernel_size=3, bias=False)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 2, 6, 6]
        with torch.no_grad():
            self.conv(x)
        h = self.conv(torch.tanh(self.conv(x)))  # [B, 2, 6, 6]
        h = torch.tanh(self.conv1d(h.flatten(2)))  # [B, 3, 34]
        return self.head(h[:, :, :4].flatten(1))


_SAMPLED_NETS = {**_CONV_NETS, "conv2d-twice": (_ConvTwice, (2, 6, 6), ["conv", "conv1d", "head"])}


def _brute_force_factors(model: nn.Module, layers, x, y, weight, positions: int | None, key: int):
    """A, B and the positions of each layer from one example at a time: each use's im2col patches (``conv_patches``)
    and output gradients, the ``positions`` of each example of largest key (the example's own uniforms at its T
    positions, stream 3) where it has more, B's terms scaled by T over those taken."""
    modules = dict(model.named_modules())
    a_total = [torch.zeros(layer.in_rows, layer.in_rows, dtype=torch.float64) for layer in layers]
    b_total = [torch.zeros(layer.out_features, layer.out_features, dtype=torch.float64) for layer in layers]
    counts = [0] * len(layers)
    for n in range(len(x)):
        seen: list[list[dict[str, torch.Tensor]]] = [[] for _ in layers]

        def hook(uses: list[dict[str, torch.Tensor]]):
            def fn(module, args, output):
                if output.requires_grad:  # a use under torch.no_grad has no δ
                    use = {"a": args[0].detach()}
                    output.register_hook(lambda g, use=use: use.__setitem__("d", g.detach()))
                    uses.append(use)

            return fn

        handles = [modules[layer.module].register_forward_hook(hook(seen[i])) for i, layer in enumerate(layers)]
        F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]).backward()
        for handle in handles:
            handle.remove()
        for i, layer in enumerate(layers):
            module = modules[layer.module]
            for use in seen[i]:
                a = conv_patches(module, use["a"]) if layer.kind == "conv" else use["a"].reshape(-1, layer.in_features)
                if layer.bias:
                    a = torch.cat([a, torch.ones(len(a), 1)], 1)
                d = use["d"].movedim(1, -1).reshape(-1, layer.out_features)
                rows, scale = torch.arange(len(a)), 1.0
                if positions is not None and len(a) > positions:
                    keys = FisherDraws(key, torch.tensor([n])).at(torch.ones(1, len(a), dtype=torch.bool), stream=3)
                    rows, scale = keys[0].topk(positions).indices, len(a) / positions
                a, d = a[rows].double(), d[rows].double()
                a_total[i] += a.T @ a
                b_total[i] += weight[n].double() * scale * d.T @ d
                counts[i] += len(rows)
    return a_total, b_total, counts


@pytest.mark.parametrize("shared", [False, True], ids=["add", "add_shared"])
@pytest.mark.parametrize("positions", [None, 2])
@pytest.mark.parametrize("net", sorted(_SAMPLED_NETS))
def test_convolution_factors_equal_brute_force_with_drawn_positions_and_layers_used_twice(
    net: str, positions: int | None, shared: bool
) -> None:
    """A convolution's A is taken in the forward (its product, or its drawn rows), not from patches held until
    the backward: A, B and the positions counted equal one example at a time by brute force, for Conv1d/2d/3d and
    Linear layers, with every position and with 2 drawn of each example's, from ``add`` (a forward per target batch)
    and ``add_shared`` (the outputs' forward), and for a convolution used twice (and once more without a δ)."""
    build, shape, kronecker = _SAMPLED_NETS[net]
    model = build().eval()
    task = sp.ClassificationTask()
    x, y = _conv_batch(shape)
    names = [n for n, _ in model.named_parameters()]
    layers, _ = kronecker_layers(model, names)
    assert [layer.module for layer in layers] == kronecker
    collector = FactorCollector(PerExampleGradients(model, task, names), layers, [], positions=positions)
    sums = collector.empty()
    weight, draws = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5]), FisherDraws(4, torch.arange(5))
    if shared:
        collector.add_shared(sums, (x, y), lambda outputs: [(weight, (x, y))], draws)
    else:
        collector.add(sums, [(weight, (x, y))], draws)
    a_total, b_total, counts = _brute_force_factors(model, layers, x, y, weight, positions, key=4)
    assert sums.positions == counts and collector.sampled == (positions is not None)
    for i in range(len(layers)):
        torch.testing.assert_close(sums.a[i], a_total[i], rtol=1e-5, atol=1e-6 * float(a_total[i].abs().max()))
        torch.testing.assert_close(sums.b[i], b_total[i], rtol=1e-5, atol=1e-6 * float(b_total[i].abs().max()))


class _SilentOnNegativeLabels(sp.ClassificationTask):
    """A task whose Fisher loss does not depend on the outputs for a target batch of labels −1 (a custom task's
    "this batch carries no loss"): its backward reaches no layer."""

    def fisher_loss(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        if bool((batch[1] < 0).all()):
            return outputs.detach().sum(1) * 0
        return super().fisher_loss(outputs, batch)


def test_add_shared_adds_each_target_batchs_own_deltas_as_a_forward_per_target_does() -> None:
    """Several target batches through one forward (``add_shared``) give the A, B and positions of a forward per
    target batch (``add``), and a target batch whose loss reaches no layer is refused as ``add`` refuses it: the
    previous target's δ, recorded in the same lists, is not added to B a second time."""
    model = _ConvTwice().eval()
    names = [n for n, _ in model.named_parameters()]
    layers, _ = kronecker_layers(model, names)
    x, y = _conv_batch()
    first, second = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5]), torch.tensor([1.0, 0.5, 0.75, 2.0, 1.0])
    targets = [(first, (x, y)), (second, (x, (y + 1) % 4))]
    sums = []
    for shared in (False, True):
        collector = FactorCollector(PerExampleGradients(model, _SilentOnNegativeLabels(), names), layers, [])
        sums.append(collector.empty())
        if shared:
            collector.add_shared(sums[-1], (x, y), lambda outputs: targets)
        else:
            collector.add(sums[-1], targets)
    assert sums[0].positions == sums[1].positions
    for i in range(len(layers)):
        torch.testing.assert_close(sums[1].a[i], sums[0].a[i], rtol=1e-5, atol=1e-6 * float(sums[0].a[i].abs().max()))
        torch.testing.assert_close(sums[1].b[i], sums[0].b[i], rtol=1e-5, atol=1e-6 * float(sums[0].b[i].abs().max()))
    silent = [(first, (x, y)), (second, (x, torch.full_like(y, -1)))]
    collector = FactorCollector(PerExampleGradients(model, _SilentOnNegativeLabels(), names), layers, [])
    with pytest.raises(sp.TaskError, match="Layer 'conv' took no part in the loss of a Fisher pseudo-target batch"):
        collector.add(collector.empty(), silent)
    with pytest.raises(sp.TaskError, match="Layer 'conv' took no part in the loss of a Fisher pseudo-target batch"):
        collector.add_shared(collector.empty(), (x, y), lambda outputs: silent)


def test_a_convolutions_patches_are_not_held_until_the_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The im2col patches of a convolution with more patches in the batch than floats in one (9 times its input
    for a 3 × 3 kernel, every layer's at once) are released by the end of the forward, before the labels are drawn
    and the backward runs; a token layer's inputs wait for δ. A target batch whose A is not wanted (``add``'s
    second) takes no inputs at all."""
    model = _ConvTwice().eval()
    names = [n for n, _ in model.named_parameters()]
    layers, _ = kronecker_layers(model, names)
    collector = FactorCollector(PerExampleGradients(model, sp.ClassificationTask(), names), layers, [])
    made: list[tuple[str, weakref.ref[torch.Tensor]]] = []

    def recorded(module: nn.Module, x: torch.Tensor, layer: FactoredLayer, rows=None) -> torch.Tensor:
        a = _positions(module, x, layer, rows)
        made.append((layer.kind, weakref.ref(a)))
        return a

    monkeypatch.setattr(sys.modules[FactorCollector.__module__], "_positions", recorded)
    x, y = _conv_batch()
    alive: list[tuple[str, bool]] = []

    def draw(outputs: torch.Tensor):
        alive.extend((kind, ref() is not None) for kind, ref in made)
        return [(torch.ones(5), (x, y))]

    collector.add_shared(collector.empty(), (x, y), draw)
    assert sorted(alive) == [("conv", False)] * 4 + [("linear", True)]  # conv's three uses, conv1d; the head
    made.clear()
    collector.add(collector.empty(), [(torch.ones(5), (x, y)), (torch.ones(5), (x, (y + 1) % 4))])
    assert len(made) == 5  # the first target batch's forward only


def _normed_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))


def test_an_adam_segments_kronecker_curvature_is_taken_in_adams_coordinates(tmp_path: Path) -> None:
    """On an Adam run, fit's Kronecker curvature is that of the gradients in Adam's coordinates, D^{-1/2} ⊙ ∇ℓ,
    averaged over the segment's checkpoints with fit's weights, against per-example per-class autodiff (D^{-1/2}:
    the segment's stored preconditioner): the parameters no layer factors (a LayerNorm's) get the Fisher diagonal
    mean Σ_c p_c (D^{-1/2} ⊙ ∇ℓ_c)² = D^{-1} times the plain one; a layer, whose D^{-1/2} enters as its rank-one fit
    r cᵀ (checked on its own above), the factors of (r cᵀ) ⊙ G = diag(r) G diag(c): B ⊗ A with ā → c ⊙ ā, δ → r ⊙ δ."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    model = _normed_classifier()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    rec = TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2)
    rec.begin_stage("main", dataset_size=len(y))
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step()
    rec.close()
    options = sp.FeaturizeArguments(batch_size=12, chunk_rows=12, fisher="exact", curvature="kfac")
    store = sp.featurize(tmp_path / "run", _normed_classifier(), sp.ClassificationTask(), TensorDataset(x, y),
                         tmp_path / "s.sp", projection=sp.ProjectionArguments(kind="identity"), options=options,
                         progress=False)  # fmt: skip
    sp.fit(store, sp.FitArguments(curvature="kfac"), progress=False)
    store = sp.Store.open(tmp_path / "s.sp")
    method = store.meta["methods"]["source"]
    fitted = read_curvature(store, "methods/source/operators/0", 0.0)
    assert set(fitted.diagonal) == {"1.weight", "1.bias"}
    preconditioner = method["segments"][0]["preconditioner"]
    assert preconditioner is not None
    scale = unflatten(torch.from_numpy(store.read(preconditioner)).double(), store.meta["params"])
    traj, net = sp.Trajectory.load(tmp_path / "run"), _normed_classifier().double()
    expected = dict.fromkeys(fitted.diagonal, 0.0)
    layers = layers_from_description(store.meta["featurize"]["kronecker"])[0]
    assert [layer.weight for layer in layers] == ["0.weight", "3.weight"]
    factors: list = [[0.0, 0.0], [0.0, 0.0]]  # A and B per layer, each averaged over the points
    for key, weight in method["points"][0]:
        traj.load_into(net, next(c for c in traj.checkpoints if c.step == key_step(key)))
        params = {n: p.detach() for n, p in net.named_parameters()}
        probs = torch.softmax(net(x.double()), -1).detach()

        def loss(p, xi, c):
            return F.cross_entropy(functional_call(net, p, (xi[None],)), c[None])

        for c in range(3):
            grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), torch.full((12,), c))
            for name in expected:
                w = probs[:, c].reshape(-1, *[1] * (grads[name].dim() - 1))
                expected[name] = expected[name] + weight * (w * (scale[name] * grads[name]) ** 2).mean(0)
        for i, (layer, module) in enumerate(zip(layers, (net[0], net[3]), strict=True)):
            terms = scaling_transform(scale, [layer], rank=1).layer(layer.weight)
            row, col = terms.left[0].double(), terms.right[0].double()
            a_total, b_total = 0.0, 0.0
            for n in range(len(y)):
                for c in range(3):
                    seen: dict[str, torch.Tensor] = {}

                    def hook(module, args, output, seen=seen):
                        seen["a"] = args[0].detach()
                        output.register_hook(lambda out_grad: seen.__setitem__("d", out_grad.detach()))

                    handle = module.register_forward_hook(hook)
                    F.cross_entropy(net(x[n : n + 1].double()), torch.tensor([c])).backward()
                    handle.remove()
                    a = torch.cat([seen["a"], torch.ones(1, 1, dtype=torch.float64)], 1) * col
                    d = seen["d"] * row
                    a_total = a_total + (a.T @ a if c == 0 else 0.0)
                    b_total = b_total + probs[n, c] * d.T @ d
            factors[i] = [factors[i][0] + weight * a_total / len(y), factors[i][1] + weight * b_total / len(y)]
    for name, diagonal in fitted.diagonal.items():
        atol = 1e-7 * float(expected[name].max())
        torch.testing.assert_close(diagonal.double(), expected[name], rtol=1e-4, atol=atol)
    for f, (a, b) in zip(fitted.factors, factors, strict=True):
        product = torch.kron(b, a)  # only B ⊗ A is defined: a scale may move between its factors
        ours = torch.kron((f.b_vectors * f.b_values) @ f.b_vectors.T, (f.a_vectors * f.a_values) @ f.a_vectors.T)
        torch.testing.assert_close(ours, product, rtol=1e-4, atol=1e-6 * float(product.abs().max()))
