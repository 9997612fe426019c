"""Per-layer factored (Kronecker) projection: per-example gradients are never materialised.

For a factorable layer (``layers.py``: ``nn.Linear``, a ``groups=1`` convolution, transformers'
GPT-2 ``Conv1D``, an ``nn.Embedding``, and a token embedding tied to its LM head) the per-example
gradient is a matrix G = Σ_t δ_t a_tᵀ (``d_out × d_in'``; a bias is the column of an extra constant
input 1). With independent Rademacher factors P_in (``k_in × d_in'``, entries ±1/√k_in) and P_out
(``k_out × d_out``, entries ±1/√k_out), k = k_out·k_in,

    (P_out ⊗ P_in) vec(G) = vec(P_out G P_inᵀ) = vec(Σ_t (P_out δ_t)(P_in a_t)ᵀ),

so each example costs two small projections per position and one ``k_out × k_in`` outer-product
sum (LoGra-style): hooks record P_in a_t in the forward pass (for an embedding the column of P_out
at the token) and P_out δ_t in the backward pass, which computes no weight gradient at all.
P_out ⊗ P_in has entries ±1/√k and E[PᵀP] = E[P_outᵀP_out] ⊗ E[P_inᵀP_in] = I: it is a projection in
the sense of docs/concepts/source.md §4.

**Where the layers go.** By default every factorable layer is projected into the *same* k
coordinates and the layers are summed (each keeps the full k = k_out·k_in; the cross-layer terms
have mean zero). With ``module_dims`` (glob pattern on the module name → k_m) a matching layer gets
its own block of k_m coordinates instead (bergson/LoGra's per-module layout: no cross-layer terms,
but each layer sees only k_m): the features are the concatenation [shared k | block 1 | block 2 …],
and scores can be split by module. The parameters no layer factors (norms, unfactorable
leftovers) are added to the shared coordinates through a dense Rademacher projection of their
materialised per-example gradients. The whole map is one matrix with E[PᵀP] = I.

**Gradient transforms** (``transform.py``: Adam's D^{-1/2}, curvature bases) enter as R factor pairs
(P_out L_r, P_in R_r) per layer, at R times the plain cost. Adam's elementwise D^{-1/2} is replaced
on each layer by its rank-``adam_rank`` approximation (:meth:`FactoredProjector.scaling`).

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
See docs/howto/gpu.md; the measured error is in BENCHMARKS.md.

The factor matrices come from the same seeded block generator as the dense projection
(``projection.rademacher_signs``), keyed by ``(seed, 2**63 + 2·layer + side)``, so CPU and GPU
build bit-identical factors; the dense part uses the ordinary blocks ``(seed, b)``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from source_proj.compiled import eager_if_compiling
from source_proj.errors import TaskError
from source_proj.projection.base import _GENERATOR_ID, Projector, RademacherProjector, rademacher_signs
from source_proj.projection.layers import FactoredLayer, LayerKind, embedding_scale, examples_first, layer_input
from source_proj.projection.transform import GradientTransform, LayerTransform, scaling_transform
from source_proj.tasks.gradients import (
    OutputTap,
    PerExampleGradients,
    batch_size,
    check_tolerance,
    checkpointing_refused,
)

if TYPE_CHECKING:
    from source_proj.tasks.gradients import Quantity
    from source_proj.tasks.task import Batch

_FACTOR_KEY = 2**63
_CHECK_EXAMPLES = 2
_APART_DIM = 16
"""k of each layer's own block where a failed self-check looks for the layers that differ."""


def factor_split(dim: int) -> tuple[int, int]:
    """``(k_out, k_in)`` with k_out·k_in = dim: k_in the largest divisor of dim not above √dim."""
    k_in = next(d for d in range(math.isqrt(dim), 0, -1) if dim % d == 0)
    if 16 * k_in * k_in < dim:  # k_in < √k / 4
        raise TaskError(
            f"The factored projection splits k into k_out × k_in, but {dim} has no near-square factorisation "
            f"(best {dim // k_in} × {k_in}); use a dimension such as 64, 1024, 2048 or 4096."
        )
    return dim // k_in, k_in


@dataclass(frozen=True)
class _Block:
    """Where a layer's features go: columns ``[offset, offset + k_out·k_in)`` of the features."""

    offset: int
    k_out: int
    k_in: int

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.k_out * self.k_in)


class FactoredProjector(Projector):
    """Layer-wise Kronecker projection P = Σ_layers P_out ⊗ P_in, plus a dense part for the rest.

    Args:
        shapes: ``(name, shape)`` of every projected parameter, in projection order.
        layers: the factorable layers (from ``factorable_layers``).
        dim: k = k_out·k_in of the coordinates the layers share (see ``factor_split``).
        seed: the projection's seed.
        module_dims: glob pattern on module names → k_m: a matching layer (first pattern that
            matches) is projected into its own k_m coordinates, appended after the shared ones.
            ``None``: every layer shares the ``dim`` coordinates.
        adam_rank: R of the rank-R approximation of an elementwise gradient scaling (Adam's
            D^{-1/2}) on each layer (:meth:`scaling`); R times the plain cost.

    ``project`` maps materialised per-example gradients (any code path); ``project_batch``
    computes the same map from each layer's inputs and output gradients without materialising
    them. Features are float32 ``[B, dim]`` with ``dim`` = shared k + Σ k_m; inner products of
    features approximate inner products of gradients (unbiased), so the score sign is that of the
    gradients' inner product.
    """

    def __init__(
        self,
        shapes: Sequence[tuple[str, Sequence[int]]],
        layers: Sequence[FactoredLayer],
        dim: int,
        seed: int = 0,
        *,
        module_dims: Mapping[str, int] | None = None,
        adam_rank: int = 1,
    ) -> None:
        if not layers:
            raise TaskError(
                "The factored projection found no factorable layer (nn.Linear, nn.Conv, GPT-2 Conv1D, nn.Embedding) "
                "among the selected parameters; use the 'rademacher' projection for this model."
            )
        if not 0 <= seed < 2**63:
            raise TaskError(f"The projection seed must be a non-negative 63-bit integer, not {seed}.")
        if adam_rank < 1:
            raise TaskError(f"adam_rank must be at least 1, not {adam_rank}.")
        self.seed = seed
        self.shared_dim = dim
        self.module_dims = dict(module_dims or {})
        self.adam_rank = adam_rank
        self.k_out, self.k_in = factor_split(dim)
        self.layers = list(layers)
        self.shapes = [(name, tuple(shape)) for name, shape in shapes]
        factored = {layer.weight for layer in self.layers} | {layer.bias for layer in self.layers if layer.bias}
        rest = [(name, shape) for name, shape in self.shapes if name not in factored]
        self.rest_names = [name for name, _ in rest]
        unmatched = [p for p in self.module_dims if not any(fnmatch.fnmatchcase(la.module, p) for la in self.layers)]
        if unmatched:  # a typo would leave k as it was without a word
            names = ", ".join(layer.module for layer in self.layers[:6]) + (", …" if len(self.layers) > 6 else "")
            raise TaskError(
                f"The module_dims pattern(s) {unmatched} match no factored layer (the layers are {names}); fix the "
                "pattern (a glob on the module name) or drop it."
            )
        self.blocks, self.dim = self._layout(bool(rest))
        self.rest = RademacherProjector(rest, dim, seed, allow_wide=True) if rest else None
        self._factors: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        self._stacked: tuple[GradientTransform | None, str, list[tuple[Tensor, Tensor]]] | None = None
        self._checked = False

    def _layout(self, has_rest: bool) -> tuple[list[_Block], int]:
        """Each layer's block, and the total dimension: [shared k (if anything shares it) | own blocks]."""
        own = [self._own_dim(layer) for layer in self.layers]
        shares = has_rest or any(k is None for k in own)
        offset = self.shared_dim if shares else 0
        blocks = []
        for k in own:
            if k is None:
                blocks.append(_Block(0, self.k_out, self.k_in))
                continue
            k_out, k_in = factor_split(k)
            blocks.append(_Block(offset, k_out, k_in))
            offset += k
        return blocks, offset

    def _own_dim(self, layer: FactoredLayer) -> int | None:
        return next((k for p, k in self.module_dims.items() if fnmatch.fnmatchcase(layer.module, p)), None)

    def describe(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "kind": "factored",
            "dim": self.dim,
            "seed": self.seed,
            "factors": [self.k_out, self.k_in],
            "generator": _GENERATOR_ID,
            "layers": [layer.describe() for layer in self.layers],
            "dense": self.rest.describe() | {"params": self.rest_names} if self.rest else None,
        }
        if self.module_dims:  # absent from the stores of the shared layout (as before module_dims existed)
            desc |= {"shared_dim": self.shared_dim, "module_dims": [[p, k] for p, k in self.module_dims.items()]}
        if self.adam_rank != 1:
            desc["adam_rank"] = self.adam_rank
        return desc

    def factors(self, index: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(P_out [k_out, d_out], P_in [k_in, d_in(+1)])`` of layer ``index``, float32 on ``device``."""
        key = (index, str(device))
        if key not in self._factors:
            layer, block = self.layers[index], self.blocks[index]
            p_in = rademacher_signs(self.seed, _FACTOR_KEY + 2 * index, layer.in_rows, block.k_in)
            p_out = rademacher_signs(self.seed, _FACTOR_KEY + 2 * index + 1, layer.out_features, block.k_out)
            self._factors[key] = (
                torch.from_numpy(p_out.T.copy()).to(device=device, dtype=torch.float32) / math.sqrt(block.k_out),
                torch.from_numpy(p_in.T.copy()).to(device=device, dtype=torch.float32) / math.sqrt(block.k_in),
            )
        return self._factors[key]

    def dense(self) -> Tensor:
        """The whole matrix P as float32 ``[dim, p]`` (columns in ``shapes`` order): for tests only."""
        shapes = dict(self.shapes)
        columns: dict[str, Tensor] = {}
        for index, (layer, block) in enumerate(zip(self.layers, self.blocks, strict=True)):
            p_out, p_in = self.factors(index)
            kron = torch.zeros(self.dim, layer.out_features, layer.in_rows)
            kron[block.columns] = torch.kron(p_out, p_in).reshape(-1, layer.out_features, layer.in_rows)
            columns |= {n: c.reshape(self.dim, -1) for n, c in layer.split(kron, shapes).items()}
        if self.rest is not None:
            rest = self.rest.dense()
            for name, offset, size in self.rest.spans:
                columns[name] = torch.zeros(self.dim, size)
                columns[name][: self.shared_dim] = rest[:, offset : offset + size]
        return torch.cat([columns[name] for name, _ in self.shapes], dim=1)

    def scaling(self, scale: Mapping[str, Tensor]) -> GradientTransform:
        """Adam's elementwise D^{-1/2} as a transform this projection applies: on every layer its
        rank-``adam_rank`` approximation (``transform.scaling_transform``), exact on the dense part."""
        return scaling_transform(scale, self.layers, self.adam_rank)

    # -- the map on materialised per-example gradients -----------------------------------------

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        return self._project_layers(grads) + self._project_rest(grads)

    def _project_layers(self, grads: Mapping[str, Tensor]) -> Tensor:
        first = next(iter(grads.values()))
        batch, device = first.shape[0], first.device
        out = torch.zeros(batch, self.dim, dtype=torch.float32, device=device)
        for index, (layer, block) in enumerate(zip(self.layers, self.blocks, strict=True)):
            p_out, p_in = self.factors(index, device)
            out[:, block.columns] += (p_out @ layer.matrix(grads).float() @ p_in.T).reshape(batch, -1)
        return out

    def _project_rest(self, grads: Mapping[str, Tensor]) -> Tensor:
        first = next(iter(grads.values()))
        out = torch.zeros(first.shape[0], self.dim, dtype=torch.float32, device=first.device)
        if self.rest is not None:
            out[:, : self.shared_dim] = self.rest.project({name: grads[name] for name in self.rest_names})
        return out

    # -- the map from layer inputs and output gradients ----------------------------------------

    def project_batch(
        self,
        grads_fn: PerExampleGradients,
        batch: Batch,
        quantity: Quantity = "loss",
        *,
        transform: GradientTransform | None = None,
    ) -> Tensor:
        """P T(∇quantity) per example, float32 ``[B, dim]``, without per-example gradients of the layers.

        One forward pass records P_in R_r a_t at every factorable layer, one backward pass P_out L_r δ_t,
        and their outer products are summed in fp32. The dense part (parameters no layer factors) is
        projected from its materialised per-example gradients, transformed by ``transform``. A
        transform's elementwise scale on a factored layer cannot be applied without materialising
        its gradient and is refused: build the transform with :meth:`scaling`.
        """
        self.check_layers(grads_fn, batch, quantity)
        features = self._layer_features(grads_fn, batch, quantity, transform)
        if self.rest is not None:
            rest = grads_fn(batch, quantity, names=self.rest_names)
            if transform is not None:
                rest = transform.apply(rest)
            features[:, : self.shared_dim] += self.rest.project(rest)
        return features

    def _stacks(self, transform: GradientTransform | None, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(Σ-stacked P_out L_r [R·k_out, d_out], P_in R_r [R·k_in, d_in'])``, for the last transform."""
        if self._stacked is not None and self._stacked[0] is transform and self._stacked[1] == str(device):
            return self._stacked[2]
        stacks = []
        for index, layer in enumerate(self.layers):
            p_out, p_in = self.factors(index, device)
            terms = _layer_terms(layer, transform)
            if terms is None:
                stacks.append((p_out, p_in))
                continue
            left, right = terms.to(device).project_factors(p_out, p_in)
            stacks.append((left.reshape(-1, layer.out_features), right.reshape(-1, layer.in_rows)))
        self._stacked = (transform, str(device), stacks)
        return stacks

    def _layer_features(
        self,
        grads_fn: PerExampleGradients,
        batch: Batch,
        quantity: Quantity,
        transform: GradientTransform | None,
    ) -> Tensor:
        size = batch_size(batch)
        device = grads_fn.device
        dtype = torch.bfloat16 if grads_fn.precision == "bf16" else torch.float32
        out = torch.zeros(size, self.dim, dtype=torch.float32, device=device)
        probe = torch.zeros((), device=device, requires_grad=True)
        with self.tapped(grads_fn.model, lambda: out, probe, dtype=dtype, transform=transform), checkpointing_refused():
            total = grads_fn.values(batch, quantity).sum()
            if total.requires_grad:
                torch.autograd.grad(total, probe, allow_unused=True)
        return out

    def shares_forward(self) -> bool:
        """Whether `forward_once` applies: every attributed parameter lies on a factored layer."""
        return self.rest is None

    def forward_once(
        self,
        grads_fn: PerExampleGradients,
        batch: Batch,
        *,
        transform: GradientTransform | None = None,
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """One tapped forward of the batch, and a function that projects the per-example gradients of any
        per-example quantity ``[B]`` computed from its outputs: one backward through the kept graph each.

        Featurize takes the training loss, the Fisher's sampled-label losses and the measurement from one
        forward this way, where `project_batch` runs a forward for each. Returns ``(outputs, project)``;
        ``project(values)`` gives float32 ``[B, dim]``, P T(∇ values_i) per example i. The quantities are
        computed by the caller (under ``grads_fn.autocast()`` for bf16, as `project_batch` does)."""
        if self.rest is not None:
            raise TaskError("forward_once needs every attributed parameter on a factored layer.")
        self.check_layers(grads_fn, batch, "loss")
        dtype = torch.bfloat16 if grads_fn.precision == "bf16" else torch.float32
        out = torch.zeros(batch_size(batch), self.dim, dtype=torch.float32, device=grads_fn.device)
        probe = torch.zeros((), device=grads_fn.device, requires_grad=True)
        with self.tapped(grads_fn.model, lambda: out, probe, dtype=dtype, transform=transform):
            with torch.enable_grad(), grads_fn.autocast():
                outputs = grads_fn.task.forward(grads_fn._call(grads_fn.params), batch)

        def project(values: Tensor) -> Tensor:
            out.zero_()
            total = values.sum()
            if total.requires_grad:
                with checkpointing_refused():
                    torch.autograd.grad(total, probe, retain_graph=True, allow_unused=True)
            return out.clone()

        return outputs, project

    @contextmanager
    def tapped(
        self,
        model: nn.Module,
        target: Callable[[], Tensor | None],
        probe: Tensor,
        *,
        dtype: torch.dtype = torch.float32,
        transform: GradientTransform | Callable[[], GradientTransform | None] | None = None,
    ) -> Iterator[None]:
        """Forward hooks on every use of every factored layer of ``model`` while the context is open.

        At each forward of a layer, ``target()`` names where its backward adds each example's
        Σ_r P_out L_r G R_rᵀ P_inᵀ: a float32 ``[B, dim]`` tensor (B the batch size the layer sees), or
        ``None`` to leave that forward untapped. The layer path of `project_batch`, and in-run capture
        (``featurize/capture.py``) where the backward is the training step's own. ``probe`` (a scalar
        with ``requires_grad``) makes every tapped output part of the graph even when the parameters
        are constants; differentiate with respect to it to run the taps alone. ``transform`` may be a
        function: each forward then applies the transform it returns at that moment (in-run capture
        of an Adam run, whose D^{-1/2} changes as training goes), and the backward the same one.
        """
        modules = dict(model.named_modules())
        device = probe.device
        handles = []
        current = transform if callable(transform) else lambda: transform
        cast: list[Any] = [None, []]  # the stacks last cast to dtype, and their cast

        def sides(index: int) -> tuple[Tensor, Tensor]:
            stacks = self._stacks(current(), device)
            if cast[0] is not stacks:
                cast[:] = [stacks, [(left.to(dtype), right.to(dtype)) for left, right in stacks]]
            return cast[1][index]

        try:
            if self.layers:
                sides(0)  # a transform the hooks cannot apply is refused here, not in the middle of a step
            for index, (layer, block) in enumerate(zip(self.layers, self.blocks, strict=True)):
                for name, kind in layer.uses:
                    hook = _LayerHook(layer, block, kind, modules[name], partial(sides, index), probe, target)
                    handles.append(modules[name].register_forward_hook(eager_if_compiling(hook), with_kwargs=True))
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

        This catches a weight that the model also uses outside its modules' forward (a functional
        use), which the layer path cannot see.
        """
        exact = PerExampleGradients(grads_fn.model, grads_fn.task, grads_fn.param_names)
        few = tree_map(lambda t: t[:_CHECK_EXAMPLES] if isinstance(t, Tensor) else t, batch)
        layer_names = [layer.weight for layer in self.layers] + [layer.bias for layer in self.layers if layer.bias]
        # In fp32 even where it is called under an autocast (capture checks in a mixed-precision loop's forward):
        # half precision alone differs by about the tolerance.
        tolerance = check_tolerance(exact.params[name] for name in layer_names)
        with torch.autocast(exact.device.type, enabled=False):
            grads = exact(few, quantity, names=layer_names)
            expected = self._project_layers(grads)
            got = self._layer_features(exact, few, quantity, None)
            error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
            differing = self._differing_layers(exact, few, quantity, grads, tolerance) if error > tolerance else []
        if error > tolerance:
            more = f" (and {len(differing) - 3} more)" if len(differing) > 3 else ""
            where = ", at layer" + "s" * (len(differing) > 1) + " " + ", ".join(map(repr, differing[:3])) + more
            raise TaskError(
                f"The factored projection differs from the per-example gradients by {error:.1e} (relative) on this "
                f"model{where if differing else ''}: a layer's weight is used outside that layer's forward (tied or "
                "functional use), or a layer sees the examples mixed in its input's first dimension; select "
                "parameters without it (ParameterSelection(exclude=...)), or use the 'rademacher' projection."
            )
        self._checked = True

    def _differing_layers(
        self,
        grads_fn: PerExampleGradients,
        batch: Batch,
        quantity: Quantity,
        grads: Mapping[str, Tensor],
        tolerance: float,
    ) -> list[str]:
        """The layers whose hook path differs from their materialised gradients (``grads``), each projected into a
        block of its own (shared coordinates mix every layer's difference into one)."""
        shapes = [(name, tuple(g.shape[1:])) for name, g in grads.items()]
        apart = FactoredProjector(shapes, self.layers, _APART_DIM, self.seed, module_dims={"*": _APART_DIM})
        expected = apart._project_layers(grads)
        got = apart._layer_features(grads_fn, batch, quantity, None)
        return [
            layer.module
            for layer, block in zip(apart.layers, apart.blocks, strict=True)
            if float((got[:, block.columns] - expected[:, block.columns]).norm())
            > tolerance * float(expected[:, block.columns].norm())
        ]


def _layer_terms(layer: FactoredLayer, transform: GradientTransform | None) -> LayerTransform | None:
    """The layer's Kronecker terms in ``transform``; refuses what the hooks cannot apply."""
    if transform is None:
        return None
    terms = transform.layer(layer.weight)
    if terms is None:
        scaled = [n for n in (layer.weight, layer.bias) if n and n in transform.elementwise]
        if scaled:
            raise TaskError(
                f"The factored projection cannot apply an elementwise scaling to layer {layer.module!r} without "
                "materialising its gradients; build the transform with FactoredProjector.scaling (a rank-R "
                "approximation), or use the dense 'rademacher' projection for the exact scaling."
            )
        return None
    if (terms.layer.bias, terms.layer.out_features, terms.layer.in_rows) != (
        layer.bias,
        layer.out_features,
        layer.in_rows,
    ):
        raise TaskError(
            f"The transform of layer {layer.module!r} was built for another layout ({terms.layer.describe()}, not "
            f"{layer.describe()}); build it from this projector's layers."
        )
    return terms


class _LayerHook:
    """Forward hook of one use of a factored layer: records its forward side, taps the backward side,
    and accumulates Σ_t Σ_r (P_out L_r δ_t)(P_in R_r a_t)ᵀ into the layer's feature columns.

    ``left`` ``[R·k_out, d_out]`` and ``right`` ``[R·k_in, d_in']`` are the stacked factor pairs. For
    linear layers and convolutions the input gives the right side and the output gradient the left
    one; for an embedding the token gives the left side (a column of ``left``) and the output
    gradient the right one. The features go into the tensor ``target()`` names at the forward (its
    rows are the examples; ``None``: this forward is not tapped).
    """

    def __init__(
        self,
        layer: FactoredLayer,
        block: _Block,
        kind: LayerKind,
        module: nn.Module,
        sides: Callable[[], tuple[Tensor, Tensor]],
        probe: Tensor,
        target: Callable[[], Tensor | None],
    ) -> None:
        self.layer, self.block, self.kind, self.module, self.sides = layer, block, kind, module, sides
        self.scale = embedding_scale(module) if kind == "embedding" else 1.0  # a scaled word embedding's rows
        self.probe, self.target = probe, target

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor
    ) -> Tensor | None:
        target = self.target()
        if target is None:
            return None
        left, right = self.sides()  # this forward's transform; its backward uses the same
        batch = target.shape[0]
        x = layer_input(args, kwargs)
        if self.kind == "embedding" and x.shape[0] == 1 < batch:
            # Positions shared by the batch ([1, T]): one row per example, so the tap sees per-example gradients.
            x, output = x.expand(batch, *x.shape[1:]), output.expand(batch, *output.shape[1:])
        if not examples_first(self.kind, x.shape, batch):
            raise TaskError(
                f"Layer {self.layer.module!r} sees inputs of first dimension {x.shape[0]}, not the batch size "
                f"{batch}: the factored projection needs examples along the first dimension of every layer's "
                "input; leave the layer out of the selection (ParameterSelection(exclude=...)), or use the "
                "'rademacher' projection for this model."
            )
        out = target[:, self.block.columns]
        with torch.no_grad():
            recorded = self._forward_side(x.detach(), batch, left, right)
        return OutputTap.apply(output, self.probe, lambda grad: self._accumulate(out, recorded, grad, left, right))

    def _forward_side(self, x: Tensor, batch: int, left: Tensor, right: Tensor) -> Tensor:
        """``[B, T, R·k]``: P_in R_r a_t (layers) or the column of P_out L_r at token x_t (embeddings)."""
        layer = self.layer
        if self.kind == "embedding":
            side = left.T[x.reshape(batch, -1)]
            padding = self.module.padding_idx
            if padding is not None:  # torch gives the padding row no gradient
                side = side.masked_fill((x.reshape(batch, -1) == padding).unsqueeze(-1), 0)
            return side
        x = x.to(right.dtype)
        weight = right[:, : layer.in_features]
        if self.kind == "conv":
            kernel = weight.reshape(-1, *self.module.weight.shape[1:])
            a = self.module._conv_forward(x, kernel, None).flatten(2).transpose(1, 2)
        else:
            a = x.reshape(batch, -1, layer.in_features) @ weight.T
        if layer.bias:
            a = a + right[:, layer.in_features]
        return a

    def _backward_side(self, grad: Tensor, batch: int, left: Tensor, right: Tensor) -> Tensor:
        """``[B, T, R·k]``: P_out L_r δ_t (layers) or P_in R_r δ_t (embeddings)."""
        if self.kind == "embedding":
            return (grad.reshape(batch, -1, self.layer.in_features) * self.scale) @ right.T
        if self.kind == "conv":
            return torch.einsum("bct,kc->btk", grad.flatten(2), left)
        return grad.reshape(batch, -1, self.layer.out_features) @ left.T

    def _accumulate(self, out: Tensor, recorded: Tensor, grad: Tensor, left: Tensor, right: Tensor) -> None:
        batch = out.shape[0]
        with torch.no_grad():
            other = self._backward_side(grad.to(left.dtype), batch, left, right)
            d, a = (recorded, other) if self.kind == "embedding" else (other, recorded)
            # [B, T, R·k] → [B, T·R, k]: the sum over positions and terms is one batched product.
            d = d.reshape(batch, -1, self.block.k_out).float()
            a = a.reshape(batch, -1, self.block.k_in).float()
            out += torch.bmm(d.transpose(1, 2), a).reshape(batch, -1)
