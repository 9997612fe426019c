"""Per-layer factored (Kronecker) projection: per-example gradients are never materialised.

For an ``nn.Linear`` or a convolution (``groups=1``) the per-example gradient of the weight is
G = Σ_t δ_t a_tᵀ (``d_out × d_in``): a_t is the layer's input at position t (a token, or an
im2col patch of a convolution) and δ_t the gradient of the example's loss with respect to the
layer's output there. A bias is the column of an extra constant input 1. With independent
Rademacher factors P_in (``k_in × d_in``, entries ±1/√k_in) and P_out (``k_out × d_out``,
entries ±1/√k_out), k = k_out·k_in,

    (P_out ⊗ P_in) vec(G) = vec(P_out G P_inᵀ) = vec(Σ_t (P_out δ_t)(P_in a_t)ᵀ),

so each example costs two small projections per position and one ``k_out × k_in`` outer-product
sum (LoGra-style). P_out ⊗ P_in has entries ±1/√k and E[PᵀP] = E[P_outᵀP_out] ⊗ E[P_inᵀP_in] = I:
it is a projection in the sense of SOURCE_MATH §4. Every factorable layer is projected into the
*same* k coordinates and the layers are summed (each layer keeps the full k = k_out·k_in; the
cross-layer terms have mean zero), and the parameters no layer factors (norm layers, embeddings,
tied weights) are added through a dense Rademacher projection of their materialised per-example
gradients. The whole map is one k × p matrix with E[PᵀP] = I.

Error against the dense Rademacher projection (Rademacher entries; u = vec U, v = vec V two
gradients of one layer, A = P_inᵀP_in, B = P_outᵀP_out, X = ⟨Pu, Pv⟩ = tr(Uᵀ B V A)):

    dense:     Var X = (‖u‖²‖v‖² + ⟨u,v⟩² − 2Σ_j u_j²v_j²) / k
    factored:  Var X = Var_B tr(B VUᵀ) + E_B Var_A(X | B)
                     ≤ ‖u‖²‖v‖² · (2/k_out + 2/k_in + 4/(k_in k_out))

(using Var tr(AM) = (‖M‖_F² + tr M² − 2Σ_j M_jj²)/k_in for A = P_inᵀP_in, and
E[B M B] = M + (Mᵀ + tr(M)·I − 2 diag M)/k_out). For one position (an MLP layer: U = δ aᵀ,
V = δ' a'ᵀ) the two factors are independent and the variance is exact:

    Var X = (m_a² + s_a²)(m_δ² + s_δ²) − m_a² m_δ²,
    m_a = ⟨a, a'⟩,  s_a² = (‖a‖²‖a'‖² + m_a² − 2Σ_j a_j² a'_j²)/k_in   (likewise δ with k_out).

Relative to ‖u‖‖v‖ that is ≈ ρ_a²(1+ρ_δ²)/k_out + ρ_δ²(1+ρ_a²)/k_in + (1+ρ_a²)(1+ρ_δ²)/k with ρ the
cosines of the inputs and of the output gradients: for nearly orthogonal gradients the factored
projection is as accurate as the dense one, for aligned ones (norms, ρ = 1) its relative variance
is 2/k_in + 2/k_out instead of 2/k. Post-ReLU inputs are positively aligned (large ρ_a), so the
output side gets the larger factor: k_in is the largest divisor of k not above √k and k_out = k/k_in.
See README "GPU and speed"; the measured error is in BENCHMARKS.md.

The factor matrices come from the same seeded block generator as the dense projection
(``projection.rademacher_signs``), keyed by ``(seed, 2**63 + 2·layer + side)``, so CPU and GPU
build bit-identical factors; the dense part uses the ordinary blocks ``(seed, b)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from source_proj.errors import TaskError
from source_proj.projection.base import _GENERATOR_ID, Projector, RademacherProjector, rademacher_signs
from source_proj.tasks.gradients import PerExampleGradients, batch_size

if TYPE_CHECKING:
    from source_proj.tasks.gradients import Quantity
    from source_proj.tasks.task import Batch

_FACTOR_KEY = 2**63
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHECK_EXAMPLES = 2
_CHECK_TOLERANCE = 1e-3


def factor_split(dim: int) -> tuple[int, int]:
    """``(k_out, k_in)`` with k_out·k_in = dim: k_in the largest divisor of dim not above √dim."""
    k_in = next(d for d in range(math.isqrt(dim), 0, -1) if dim % d == 0)
    if 16 * k_in * k_in < dim:  # k_in < √k / 4
        raise TaskError(
            f"The factored projection splits k into k_out × k_in, but {dim} has no near-square factorisation "
            f"(best {dim // k_in} × {k_in}); use a dimension such as 1024, 2048 or 4096."
        )
    return dim // k_in, k_in


@dataclass(frozen=True)
class FactoredLayer:
    """A layer whose weight gradient is projected as P_out G P_inᵀ.

    Attributes:
        module: the module's name in ``model.named_modules()``.
        weight: the weight's parameter name.
        bias: the bias's parameter name when it is projected as an extra input column, else ``None``.
        out_features: d_out (output features or channels).
        in_features: d_in without the bias column (input features, or C_in·∏kernel for a convolution).
    """

    module: str
    weight: str
    bias: str | None
    out_features: int
    in_features: int

    @property
    def in_rows(self) -> int:
        """Columns of G: d_in, plus one for the bias."""
        return self.in_features + (self.bias is not None)

    def describe(self) -> list[Any]:
        return [self.module, self.weight, self.bias, self.out_features, self.in_features]


def factorable_layers(model: nn.Module, names: Sequence[str]) -> tuple[list[FactoredLayer], list[str]]:
    """Split the selected parameters into factorable layers and the rest (in ``names`` order).

    A layer factors when it is an ``nn.Linear`` or a ``groups=1`` ``nn.Conv1d/2d/3d`` whose weight
    is selected and held by no other module; its bias joins as an input column when it is selected
    and held by no other module too. Everything else is projected densely.
    """
    selected = set(names)
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    layers: list[FactoredLayer] = []
    for module_name, module in model.named_modules():
        is_conv = isinstance(module, _CONVS) and module.groups == 1
        if not (isinstance(module, nn.Linear) or is_conv):
            continue
        prefix = f"{module_name}." if module_name else ""
        weight = module.weight
        if prefix + "weight" not in selected or len(owners[id(weight)]) != 1:
            continue
        bias = module.bias
        with_bias = bias is not None and prefix + "bias" in selected and len(owners[id(bias)]) == 1
        layers.append(
            FactoredLayer(
                module_name,
                prefix + "weight",
                prefix + "bias" if with_bias else None,
                int(weight.shape[0]),
                int(math.prod(weight.shape[1:])),
            )
        )
    factored = {layer.weight for layer in layers} | {layer.bias for layer in layers if layer.bias}
    return layers, [n for n in names if n not in factored]


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient δ to a callback.

    The output is cloned so that in-place operations after the layer (``ReLU(inplace=True)``)
    cannot change the value whose gradient the callback receives.
    """

    @staticmethod
    def forward(ctx: Any, output: Tensor, probe: Tensor, callback: Callable[[Tensor], None]) -> Tensor:
        ctx.callback = callback
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        ctx.callback(grad)
        return grad, grad.new_zeros(()), None


class FactoredProjector(Projector):
    """Layer-wise Kronecker projection P = Σ_layers P_out ⊗ P_in, plus a dense part for the rest.

    Args:
        shapes: ``(name, shape)`` of every projected parameter, in projection order.
        layers: the factorable layers (from :func:`factorable_layers`).
        dim: k = k_out·k_in, the same for every layer (see :func:`factor_split`).
        seed: the projection's seed.

    ``project`` maps materialised per-example gradients (any code path); ``project_batch``
    computes the same map from each layer's inputs and output gradients without materialising
    them. Features are float32 ``[B, k]``; inner products of features approximate inner products
    of gradients (unbiased), so the score sign is that of the gradients' inner product.
    """

    def __init__(
        self, shapes: Sequence[tuple[str, Sequence[int]]], layers: Sequence[FactoredLayer], dim: int, seed: int = 0
    ) -> None:
        if not layers:
            raise TaskError(
                "The factored projection found no nn.Linear or nn.Conv layer among the selected parameters; "
                "use the 'rademacher' projection for this model."
            )
        if not 0 <= seed < 2**63:
            raise TaskError(f"The projection seed must be a non-negative 63-bit integer, not {seed}.")
        self.dim = dim
        self.seed = seed
        self.k_out, self.k_in = factor_split(dim)
        self.layers = list(layers)
        self.shapes = [(name, tuple(shape)) for name, shape in shapes]
        factored = {layer.weight for layer in self.layers} | {layer.bias for layer in self.layers if layer.bias}
        rest = [(name, shape) for name, shape in self.shapes if name not in factored]
        self.rest_names = [name for name, _ in rest]
        self.rest = RademacherProjector(rest, dim, seed, allow_wide=True) if rest else None
        self._factors: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        self._checked = False

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "factored",
            "dim": self.dim,
            "seed": self.seed,
            "factors": [self.k_out, self.k_in],
            "generator": _GENERATOR_ID,
            "layers": [layer.describe() for layer in self.layers],
            "dense": self.rest.describe() | {"params": self.rest_names} if self.rest else None,
        }

    def factors(self, index: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(P_out [k_out, d_out], P_in [k_in, d_in(+1)])`` of layer ``index``, float32 on ``device``."""
        key = (index, str(device))
        if key not in self._factors:
            layer = self.layers[index]
            p_in = rademacher_signs(self.seed, _FACTOR_KEY + 2 * index, layer.in_rows, self.k_in)
            p_out = rademacher_signs(self.seed, _FACTOR_KEY + 2 * index + 1, layer.out_features, self.k_out)
            self._factors[key] = (
                torch.from_numpy(p_out.T.copy()).to(device=device, dtype=torch.float32) / math.sqrt(self.k_out),
                torch.from_numpy(p_in.T.copy()).to(device=device, dtype=torch.float32) / math.sqrt(self.k_in),
            )
        return self._factors[key]

    def dense(self) -> Tensor:
        """The whole matrix P as float32 ``[k, p]`` (columns in ``shapes`` order): for tests only."""
        columns: dict[str, Tensor] = {}
        for index, layer in enumerate(self.layers):
            p_out, p_in = self.factors(index)
            kron = torch.kron(p_out, p_in).reshape(self.dim, layer.out_features, layer.in_rows)
            columns[layer.weight] = kron[:, :, : layer.in_features].reshape(self.dim, -1)
            if layer.bias:
                columns[layer.bias] = kron[:, :, layer.in_features]
        if self.rest is not None:
            rest = self.rest.dense()
            for name, offset, size in self.rest.spans:
                columns[name] = rest[:, offset : offset + size]
        return torch.cat([columns[name] for name, _ in self.shapes], dim=1)

    # -- the map on materialised per-example gradients -----------------------------------------

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        return self._project_layers(grads) + self._project_rest(grads)

    def _project_layers(self, grads: Mapping[str, Tensor]) -> Tensor:
        first = next(iter(grads.values()))
        batch, device = first.shape[0], first.device
        out = torch.zeros(batch, self.dim, dtype=torch.float32, device=device)
        for index, layer in enumerate(self.layers):
            p_out, p_in = self.factors(index, device)
            g = grads[layer.weight].reshape(batch, layer.out_features, layer.in_features).float()
            if layer.bias:
                g = torch.cat([g, grads[layer.bias].reshape(batch, layer.out_features, 1).float()], dim=2)
            out += (p_out @ g @ p_in.T).reshape(batch, self.dim)
        return out

    def _project_rest(self, grads: Mapping[str, Tensor]) -> Tensor | float:
        if self.rest is None:
            return 0.0
        return self.rest.project({name: grads[name] for name in self.rest_names})

    # -- the map from layer inputs and output gradients ----------------------------------------

    def project_batch(
        self,
        grads_fn: PerExampleGradients,
        batch: Batch,
        quantity: Quantity = "loss",
        *,
        scale: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """P (s ⊙ ∇quantity) per example, float32 ``[B, k]``, without per-example gradients of the layers.

        One forward pass records P_in a_t at every factorable layer, one backward pass P_out δ_t,
        and their outer products are summed in fp32. The dense part (parameters no layer factors)
        is projected from its materialised per-example gradients. ``scale`` (Adam's D^{-1/2}) must
        be a rank-one outer product r cᵀ on each factored layer's [weight | bias] matrix (then
        P_out diag(r) and P_in diag(c) are used); Adam's own elementwise preconditioner is not,
        and is refused: use the dense ``rademacher`` projection for Adam-trained runs.
        """
        self.check_layers(grads_fn, batch, quantity)
        features = self._layer_features(grads_fn, batch, quantity, scale)
        if self.rest is not None:
            rest = grads_fn(batch, quantity, names=self.rest_names)
            if scale is not None:
                rest = {name: g * scale[name] if name in scale else g for name, g in rest.items()}
            features += self.rest.project(rest)
        return features

    def _layer_features(
        self,
        grads_fn: PerExampleGradients,
        batch: Batch,
        quantity: Quantity,
        scale: Mapping[str, Tensor] | None,
    ) -> Tensor:
        size = batch_size(batch)
        device = grads_fn.device
        dtype = torch.bfloat16 if grads_fn.precision == "bf16" else torch.float32
        out = torch.zeros(size, self.dim, dtype=torch.float32, device=device)
        probe = torch.zeros((), device=device, requires_grad=True)
        with self.tapped(grads_fn.model, lambda: out, probe, dtype=dtype, scale=scale):
            total = grads_fn.values(batch, quantity).sum()
            if total.requires_grad:
                torch.autograd.grad(total, probe, allow_unused=True)
        return out

    @contextmanager
    def tapped(
        self,
        model: nn.Module,
        target: Callable[[], Tensor | None],
        probe: Tensor,
        *,
        dtype: torch.dtype = torch.float32,
        scale: Mapping[str, Tensor] | None = None,
    ) -> Iterator[None]:
        """Forward hooks on every factored layer of ``model`` while the context is open.

        At each forward of a layer, ``target()`` names where its backward adds each example's
        P_out G P_inᵀ: a float32 ``[B, k]`` tensor (B the batch size the layer sees), or ``None``
        to leave that forward untapped. The layer path of :meth:`project_batch`, and in-run capture
        (``featurize/capture.py``) where the backward is the training step's own. ``probe`` (a
        scalar with ``requires_grad``) makes every tapped output part of the graph even when the
        parameters are constants; differentiate with respect to it to run the taps alone.
        """
        modules = dict(model.named_modules())
        device = probe.device
        handles = []
        try:
            for index, layer in enumerate(self.layers):
                p_out, p_in = self.factors(index, device)
                if scale is not None:
                    row, col = _rank_one(layer, scale)
                    p_out, p_in = p_out * row.to(device), p_in * col.to(device)
                hook = _LayerHook(layer, modules[layer.module], p_out.to(dtype), p_in.to(dtype), probe, target)
                handles.append(modules[layer.module].register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def check_layers(self, grads_fn: PerExampleGradients, batch: Batch, quantity: Quantity = "loss") -> None:
        """Refuse a model whose layer path differs from the materialised map (run once per projector)."""
        if not self._checked:
            self._check_against_materialised(grads_fn, batch, quantity)

    def _check_against_materialised(self, grads_fn: PerExampleGradients, batch: Batch, quantity: Quantity) -> None:
        """Once per projector: the layer path must equal the materialised map on two examples (fp32).

        This catches a weight that the model also uses outside its module's forward (a tied or
        functional use), which the layer path cannot see.
        """
        exact = PerExampleGradients(grads_fn.model, grads_fn.task, grads_fn.param_names)
        few = tree_map(lambda t: t[:_CHECK_EXAMPLES] if isinstance(t, Tensor) else t, batch)
        layer_names = [layer.weight for layer in self.layers] + [layer.bias for layer in self.layers if layer.bias]
        expected = self._project_layers(exact(few, quantity, names=layer_names))
        got = self._layer_features(exact, few, quantity, None)
        error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
        if error > _CHECK_TOLERANCE:
            raise TaskError(
                f"The factored projection differs from the per-example gradients by {error:.1e} (relative) on this "
                "model: a layer's weight is used outside that layer's forward (tied or functional use); select "
                "parameters without it, or use the 'rademacher' projection."
            )
        self._checked = True


class _LayerHook:
    """Forward hook of one factored layer: records P_in a_t, taps δ_t, accumulates the outer products
    into the tensor ``target()`` names at the forward (none: the forward is not tapped)."""

    def __init__(
        self,
        layer: FactoredLayer,
        module: nn.Module,
        p_out: Tensor,
        p_in: Tensor,
        probe: Tensor,
        target: Callable[[], Tensor | None],
    ) -> None:
        self.layer, self.module, self.p_out, self.p_in = layer, module, p_out, p_in
        self.probe, self.target = probe, target

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
        out = self.target()
        if out is None:
            return None
        x = inputs[0]
        if x.shape[0] != out.shape[0]:
            raise TaskError(
                f"Layer {self.layer.module!r} sees inputs of first dimension {x.shape[0]}, not the batch size "
                f"{out.shape[0]}: the factored projection needs examples along the first dimension of every layer's "
                "input; use the 'rademacher' projection for this model."
            )
        with torch.no_grad():
            projected_inputs = self._inputs(x.detach())
        return _Tap.apply(output, self.probe, lambda grad: self._accumulate(out, projected_inputs, grad))

    def _inputs(self, x: Tensor) -> Tensor:
        """P_in a_t for every position: ``[B, T, k_in]``."""
        layer, p_in = self.layer, self.p_in
        x = x.to(p_in.dtype)
        weight = p_in[:, : layer.in_features]
        if isinstance(self.module, nn.Linear):
            a = x.reshape(x.shape[0], -1, layer.in_features) @ weight.T
        else:
            kernel = weight.reshape(-1, *self.module.weight.shape[1:])
            a = self.module._conv_forward(x, kernel, None).flatten(2).transpose(1, 2)
        if layer.bias:
            a = a + p_in[:, layer.in_features]
        return a

    def _accumulate(self, out: Tensor, projected_inputs: Tensor, grad: Tensor) -> None:
        with torch.no_grad():
            grad = grad.to(self.p_out.dtype)
            if isinstance(self.module, nn.Linear):
                d = (grad.reshape(out.shape[0], -1, self.layer.out_features) @ self.p_out.T).transpose(1, 2)
            else:
                d = torch.einsum("bct,kc->bkt", grad.flatten(2), self.p_out)
            out += torch.bmm(d.float(), projected_inputs.float()).reshape(out.shape[0], -1)


def _rank_one(layer: FactoredLayer, scale: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(r [d_out], c [d_in(+1)])`` with r cᵀ equal to the layer's [weight | bias] scale matrix."""
    s = torch.ones(layer.out_features, layer.in_rows)
    if layer.weight in scale:
        s[:, : layer.in_features] = scale[layer.weight].reshape(layer.out_features, -1).cpu().float()
    if layer.bias and layer.bias in scale:
        s[:, layer.in_features] = scale[layer.bias].reshape(-1).cpu().float()
    i, j = divmod(int(s.abs().argmax()), s.shape[1])
    row, col = s[:, j].clone(), s[i] / s[i, j]
    if not torch.allclose(torch.outer(row, col), s, rtol=1e-5, atol=1e-12 * float(s.abs().max())):
        raise TaskError(
            f"The factored projection cannot apply an elementwise gradient scaling (e.g. Adam's preconditioner) to "
            f"layer {layer.module!r}: it is not a rank-one outer product over the layer's rows and columns; use the "
            "dense 'rademacher' projection for this run."
        )
    return row, col
