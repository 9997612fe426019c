"""Every common torch layer under the factored and eigen projections: the projected gradient equals the same
projection matrix applied to brute-force per-example gradients (one float64 backward pass per example), whether the
layer is factored by hooks or falls back to the dense part (torch.func, or plain autograd example by example).

test_factored.py covers Linear, HF Conv1D, groups=1 Conv1d/2d (stride, dilation, reflect and 'same' padding), a
grouped Conv2d, Embedding with a padding row, tied embeddings and transformers' models; these are the rest."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.featurize.basis import BasisPass
from source_proj.featurize.factors import _positions, kronecker_layers
from source_proj.projection.eigen import EigenBasis
from source_proj.projection.factory import make_projector
from source_proj.projection.layers import factorable_layers
from source_proj.tasks.gradients import PerExampleGradients

from .conftest import conv_patches

_B = 5
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap of EmbeddingBag


class _Net(nn.Module):
    """``body`` (the layer under test, or a small model around it), tanh, then a linear head to 3 classes."""

    def __init__(self, body: nn.Module, pool: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.body, self.pool, self.head = body, pool, nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        h = torch.tanh(h[0] if isinstance(h, tuple) else h)
        return self.head(self.pool(h) if self.pool else h.flatten(1))


def _over_time(h: torch.Tensor) -> torch.Tensor:
    return h.mean(1)


class _Twice(nn.Module):
    """One module called twice in a forward: on its own output, or on two different inputs."""

    def __init__(self, layer: nn.Module, chained: bool) -> None:
        super().__init__()
        self.layer, self.chained = layer, chained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = torch.tanh(self.layer(x))
        return self.layer(first) if self.chained else torch.cat([first, self.layer(x * x - 1)], 1)


class _Tied(nn.Module):
    """Two modules holding one weight (``second.weight = first.weight``), called one after the other."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


class _Frozen(nn.Module):
    """A Linear with one of its parameters frozen (``requires_grad=False``: no parameter selection keeps it)."""

    def __init__(self, frozen: str) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        getattr(self.layer, frozen).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _Keyword(nn.Module):
    """A Linear called with its input as a keyword (``layer(input=x)``): a forward hook's positional args are empty."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(input=x)


class _Bag(nn.Module):
    """An nn.EmbeddingBag of [B, L] ids, with per-sample weights or flattened ids and offsets."""

    def __init__(self, mode: str, weighted: bool = False, offsets: bool = False, **kwargs: float) -> None:
        super().__init__()
        self.bag, self.weighted, self.offsets = nn.EmbeddingBag(9, 4, mode=mode, **kwargs), weighted, offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = x.to(self.bag.weight.dtype) / 9 + 0.5 if self.weighted else None
        if not self.offsets:
            return self.bag(x, per_sample_weights=weights)
        starts = torch.arange(0, x.numel(), x.shape[1])
        return self.bag(x.reshape(-1), starts, per_sample_weights=None if weights is None else weights.reshape(-1))


class _Recurrent(nn.Module):
    def __init__(self, cls: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cls(4, 3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0].mean(1)


class _Attention(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x)[0].mean(1)


def _inputs(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(_B, *shape, generator=g)


def _ids(vocabulary: int, length: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randint(0, vocabulary, (_B, length), generator=g)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor], list[str]]] = {
    # name: (body, inputs, the body's modules factored by hooks; the rest is dense)
    "linear-4d-input": (lambda: nn.Linear(4, 4), _inputs(2, 3, 4), ["body"]),
    "linear-keyword-input": (_Keyword, _inputs(4), ["body.layer"]),
    "linear-called-twice-chained": (lambda: _Twice(nn.Linear(4, 4), True), _inputs(4), ["body.layer"]),
    "linear-called-twice-different-inputs": (lambda: _Twice(nn.Linear(4, 4), False), _inputs(4), ["body.layer"]),
    "conv1d-called-twice": (lambda: _Twice(nn.Conv1d(2, 2, 3, padding=1), True), _inputs(2, 6), ["body.layer"]),
    "linear-tied-to-linear": (lambda: _Tied(nn.Linear(4, 4), nn.Linear(4, 4)), _inputs(4), ["body.first"]),
    "embedding-tied-to-biased-head": (
        lambda: nn.Sequential(_Tied(nn.Embedding(7, 4, padding_idx=1), nn.Linear(4, 7))), _ids(7, 5), ["body.0.first"]),
    "conv-tied-to-conv": (
        lambda: _Tied(nn.Conv1d(2, 2, 3, padding=1), nn.Conv1d(2, 2, 3, padding=1)), _inputs(2, 6), []),
    "linear-frozen-weight": (lambda: _Frozen("weight"), _inputs(4), []),
    "linear-frozen-bias": (lambda: _Frozen("bias"), _inputs(4), ["body.layer"]),
    "conv1d-circular-stride-dilation": (
        lambda: nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2, padding_mode="circular"), _inputs(2, 7), ["body"]),
    "conv2d-replicate-no-bias": (
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate", bias=False), _inputs(2, 4, 4), ["body"]),
    "conv2d-depthwise": (lambda: nn.Conv2d(3, 6, 3, groups=3), _inputs(3, 4, 4), []),
    "conv3d": (lambda: nn.Conv3d(2, 2, 2, stride=(1, 2, 1)), _inputs(2, 3, 3, 3), ["body"]),
    "conv-transpose1d": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2), _inputs(2, 4), []),
    "conv-transpose2d": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), _inputs(2, 3, 3), []),
    "embedding-max-norm": (lambda: nn.Embedding(9, 4, max_norm=1.0), _ids(9, 5), []),
    "embedding-scale-grad-by-freq": (lambda: nn.Embedding(9, 4, scale_grad_by_freq=True), _ids(4, 6), []),
    "embedding-sparse": (lambda: nn.Embedding(9, 4, sparse=True), _ids(9, 5), ["body"]),
    "embedding-bag-sum-padding": (lambda: _Bag("sum", padding_idx=0), _ids(3, 5), []),
    "embedding-bag-mean-offsets": (lambda: _Bag("mean", offsets=True), _ids(9, 5), []),
    "embedding-bag-max": (lambda: _Bag("max"), _ids(9, 5), []),
    "embedding-bag-weighted-max-norm": (lambda: _Bag("sum", weighted=True, max_norm=1.0), _ids(9, 5), []),
    "layer-norm": (lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), _inputs(4), ["body.0"]),
    "rms-norm": (lambda: nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4)), _inputs(4), ["body.0"]),
    "group-norm": (lambda: nn.Sequential(nn.Conv1d(2, 4, 1), nn.GroupNorm(2, 4)), _inputs(2, 3), ["body.0"]),
    "batch-norm": (lambda: nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), _inputs(2, 3, 3), ["body.0"]),
    "prelu": (lambda: nn.Sequential(nn.Linear(4, 4), nn.PReLU(4)), _inputs(4), ["body.0"]),
    "multihead-attention": (lambda: _Attention(), _inputs(3, 4), []),
    "multihead-attention-bias-kv": (lambda: _Attention(bias=False, add_bias_kv=True), _inputs(3, 4), []),
    "lstm": (lambda: _Recurrent(nn.LSTM), _inputs(3, 4), []),
    "gru": (lambda: _Recurrent(nn.GRU), _inputs(3, 4), []),
}
_POOLED = {"embedding-max-norm", "embedding-scale-grad-by-freq", "embedding-sparse"}


def _case(name: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    body, inputs, _ = CASES[name]
    torch.manual_seed(0)
    model = _Net(body(), _over_time if name in _POOLED else None)
    g = torch.Generator().manual_seed(1)
    batch = (inputs(g), torch.randint(0, 3, (_B,), generator=g))
    with torch.no_grad():
        model.eval()(batch[0][:2])  # sizes the lazy head
    return model, batch


def _brute_force(name: str, names: list[str], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[B, p]``: each example's gradient from its own backward pass, in float64 (a fresh copy of the model)."""
    model = _case(name)[0].double()
    params = dict(model.named_parameters())
    task = sp.ClassificationTask()
    rows = []
    for i in range(_B):
        x = batch[0][i : i + 1]
        one = (x.double() if x.is_floating_point() else x, batch[1][i : i + 1])
        grads = torch.autograd.grad(task.loss(model(one[0]), one).sum(), [params[n] for n in names])
        rows.append(torch.cat([(g.to_dense() if g.is_sparse else g).reshape(-1) for g in grads]))
    return torch.stack(rows)


def _random_basis(model: nn.Module, names: list[str]) -> EigenBasis:
    """Orthonormal rows for every layer the eigen basis pass covers: any basis gives a map to check against."""
    g = torch.Generator().manual_seed(5)
    layers, _ = kronecker_layers(model, names)
    out = [torch.linalg.qr(torch.randn(la.out_features, 2, generator=g))[0].T.contiguous() for la in layers]
    inp = [torch.linalg.qr(torch.randn(la.in_rows, 3, generator=g))[0].T.contiguous() for la in layers]
    return EigenBasis([la.module for la in layers], out, inp, [0], _B, 1.0)


@pytest.mark.parametrize("kind", ["factored", "eigen"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_projected_gradients_equal_the_projection_of_brute_force_per_example_gradients(name: str, kind: str) -> None:
    model, batch = _case(name)
    task = sp.ClassificationTask()
    names = task.select_parameters(model)
    layers, _ = factorable_layers(model, names)
    assert sorted(la.module for la in layers if la.module != "head") == sorted(CASES[name][2])
    params = dict(model.named_parameters())
    shapes = [(n, tuple(params[n].shape)) for n in names]
    basis = {"basis": _random_basis(model, names)} if kind == "eigen" else {}
    projector = make_projector(kind, shapes, 128 if kind == "eigen" else 64, 3, model=model, **basis)
    got = projector.project_batch(PerExampleGradients(model, task, names), batch).double()
    expected = _brute_force(name, names, batch) @ projector.dense().double().T
    assert float((got - expected).norm() / expected.norm()) < 1e-5


class _Positional(_Keyword):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_the_eigen_basis_pass_takes_a_layer_called_by_keyword_as_one_called_positionally() -> None:
    """The basis pass counts each layer's positions and takes its Kronecker factors from forward hooks: a layer
    called as ``layer(input=x)`` gives the factors of the same layer called ``layer(x)`` (it was an IndexError)."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(20, 3, 4, generator=g), torch.randint(0, 3, (20,), generator=g))
    factors = []
    for body in (_Keyword, _Positional):
        torch.manual_seed(0)
        model = _Net(body(), _over_time)
        model.eval()(data.tensors[0][:2])
        task = sp.ClassificationTask()
        names = task.select_parameters(model)
        basis = BasisPass(PerExampleGradients(model, task, names), task, {"main": data}, names, 12, examples=16,
                          seed=0, batch_size=8, device=torch.device("cpu"), layer_positions=12)  # fmt: skip
        a, b = basis.visit("main", "test", basis.quiet())  # counts the layers' positions first
        factors.append((len(basis.subsets["main"]), a, b))
    (kept, a, b), (kept_positional, a_positional, b_positional) = factors
    assert (kept, kept_positional) == (12, 12)  # the head sees one position an example: 12 examples for 12
    for mine, theirs in zip([*a, *b], [*a_positional, *b_positional], strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), padding_mode="circular"),
        nn.Conv2d(2, 3, (2, 3), dilation=(2, 1), padding="same", padding_mode="replicate"),
        nn.Conv2d(2, 3, 4, padding="same"),  # even kernel: torch pads 'same' unevenly
        nn.Conv2d(2, 3, 3, padding="valid", bias=False),
        nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=3, padding_mode="reflect"),
        nn.Conv1d(2, 3, 4, padding="same", padding_mode="circular"),
        nn.Conv1d(2, 3, 3, stride=2, padding=2),
        nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 2), dilation=(2, 1, 1), padding=(1, 0, 2)),
        nn.Conv3d(2, 3, 3, padding=1, padding_mode="reflect"),
        nn.Conv3d(2, 3, (3, 2, 2), stride=2, dilation=(1, 2, 1), padding=(1, 1, 0), padding_mode="circular"),
        nn.Conv3d(2, 3, (2, 3, 4), dilation=(1, 2, 1), padding="same"),  # even kernels: uneven 'same'
        nn.Conv3d(2, 3, 2, padding="same", padding_mode="replicate", bias=False),
        nn.Conv3d(2, 3, (1, 3, 2), stride=(3, 1, 2), padding="valid"),
    ],
    ids=["reflect", "circular-stride", "same-replicate", "same-even", "valid", "conv1d-reflect", "conv1d-same",
         "conv1d-zeros-stride", "conv3d-zeros-stride-dilation", "conv3d-reflect", "conv3d-circular-stride",
         "conv3d-same-even", "conv3d-same-replicate", "conv3d-valid-stride"],
)
def test_kronecker_factors_take_the_patches_a_convolution_sees_whatever_its_padding(conv: nn.Module) -> None:
    """The eigen basis pass (and K-FAC) take a convolution's input factor from its im2col patches: they are the
    inputs its weight multiplies, padded as the layer pads (reflect, replicate, circular, 'same'), in the order of
    ``weight.reshape(C_out, -1)``. So a convolution whose weight is the identity (C_out = C_in·∏kernel) outputs them
    entry for entry, the layer's output is patches @ [W | b]ᵀ, and Σ_patches δ āᵀ is the weight's gradient. Such
    layers were refused, and featurize fell back to the dense Rademacher projection for the whole model; a Conv3d
    took the Fisher diagonal. The patches of some positions only (those drawn) are those rows of them."""
    torch.manual_seed(0)
    model = nn.Sequential(conv)
    names = [n for n, _ in model.named_parameters()]
    (layer,), _ = kronecker_layers(model, names)
    spatial = {nn.Conv1d: [7], nn.Conv2d: [7, 6], nn.Conv3d: [5, 6, 4]}[type(conv)]
    x = torch.randn(3, 2, *spatial)
    patches = _positions(conv, x, layer)  # [B·positions, d_in']
    torch.testing.assert_close(patches[:, : layer.in_features], conv_patches(conv, x))
    rows = torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))[: len(patches) // 3]
    assert torch.equal(_positions(conv, x, layer, rows), patches[rows])  # drawn positions: those patches only
    output = conv(x)
    weight = conv.weight.reshape(conv.out_channels, -1)
    if conv.bias is not None:
        weight = torch.cat([weight, conv.bias[:, None]], 1)
    torch.testing.assert_close(patches @ weight.T, output.flatten(2).transpose(1, 2).reshape(-1, conv.out_channels))
    delta = torch.randn_like(output)
    weight_grad = torch.autograd.grad(output, conv.weight, delta)[0]
    deltas = delta.flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
    g = deltas.T @ patches  # Σ over examples and positions of δ āᵀ: the summed gradient, with the bias column
    torch.testing.assert_close(g[:, : layer.in_features], weight_grad.reshape(conv.out_channels, -1))
    if conv.bias is not None:
        torch.testing.assert_close(g[:, -1], deltas.sum(0))


def test_the_eigen_basis_covers_a_reflect_padded_convolution() -> None:
    """The basis pass over a CNN whose convolution pads 'same' by reflection takes its factors (it raised NoBasis,
    and featurize projected the whole model with the dense Rademacher projection instead)."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 2, 5, 5, generator=g), torch.randint(0, 3, (12,), generator=g))
    torch.manual_seed(0)
    model = _Net(nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"))
    model.eval()(data.tensors[0][:2])
    task = sp.ClassificationTask()
    names = task.select_parameters(model)
    basis = BasisPass(PerExampleGradients(model, task, names), task, {"main": data}, names, 12, examples=12, seed=0,
                      batch_size=6, device=torch.device("cpu"))  # fmt: skip
    a, b = basis.visit("main", "test", basis.quiet())
    assert [layer.module for layer in basis.layers] == ["body", "head"]
    assert a[0].shape == (2 * 9 + 1, 2 * 9 + 1) and b[0].shape == (3, 3)
    assert np.trace(a[0]) > 0 and np.trace(b[0]) > 0


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, nn.BatchNorm2d])
def test_a_batch_norm_without_running_statistics_is_refused_in_one_sentence(norm: type[nn.Module]) -> None:
    """Without running statistics a batch norm normalises by the batch's even in eval() mode, so an example's
    gradient depends on the rest of its batch: BatchNorm1d stopped with torch's 'Expected more than 1 value per channel
    when training', BatchNorm2d silently normalised each example by its own pixels (not the model's function)."""
    model = nn.Sequential(nn.Linear(4, 4), norm(4, track_running_stats=False))
    task = sp.ClassificationTask()
    with pytest.raises(sp.TaskError, match=r"^Layer '1' \(BatchNorm.d\) keeps no running statistics.*GroupNorm"):
        PerExampleGradients(model, task, task.select_parameters(model))


def test_the_layer_check_names_the_layer_whose_weight_is_used_outside_its_forward() -> None:
    """The factored and eigen projections' self-check compares the hook path with materialised gradients; when they
    differ, the refusal names the layer that differs (here the second of three, whose weight is also applied
    functionally), so that it can be left out of the selection."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.third = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.first(x))
            h = torch.tanh(self.second(h) + nn.functional.linear(h, self.second.weight))
            return self.third(h)

    torch.manual_seed(0)
    model, task = Functional(), sp.ClassificationTask()
    names = task.select_parameters(model)
    params = dict(model.named_parameters())
    shapes = [(n, tuple(params[n].shape)) for n in names]
    batch = (torch.randn(3, 4), torch.tensor([0, 1, 2]))
    for kind, basis in (("factored", {}), ("eigen", {"basis": _random_basis(model, names)})):
        projector = make_projector(kind, shapes, 16 if kind == "factored" else 64, 0, model=model, **basis)
        with pytest.raises(sp.TaskError, match=r"on this model, at layer 'second': a layer's weight is used outside"):
            projector.project_batch(PerExampleGradients(model, task, names), batch)
