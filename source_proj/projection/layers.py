"""Which layers factor, and how each one's per-example gradient is laid out as a matrix.

A *factorable layer* is a weight whose per-example gradient is a sum of outer products
G = Σ_t δ_t a_tᵀ (``d_out × d_in``) that forward and backward hooks on its module(s) can see, with a
bias as the column of an extra constant input 1 (G is then ``d_out × (d_in + 1)``). The kinds:

- ``linear``: ``nn.Linear``; a_t the input at position t, δ_t the output gradient there.
- ``conv``: ``nn.Conv1d/2d/3d`` with ``groups=1``; a_t an im2col patch (``d_in = C_in·∏kernel``).
- ``hf_conv1d``: transformers' GPT-2 ``Conv1D`` (``y = x W + b`` with W stored ``d_in × d_out``);
  G is the gradient of Wᵀ, so the layer reads like an ``nn.Linear``.
- ``embedding``: ``nn.Embedding`` (W stored ``V × d``); the one-hot e_{x_t} of the token is the row
  side and the output gradient δ_t the column side: G = Σ_t e_{x_t} δ_tᵀ (``V × d``). A transformers scaled
  word embedding (rows times a scale s, Gemma's √d) takes s·δ_t (``embedding_scale``).

A weight held by several modules (GPT-2's token embedding tied to its LM head, both ``V × d``) is
one layer with several *uses*: each adds its outer products to the same G. Its bias, if any, is
left to the dense part. Everything else (norms, packed attention projections used functionally, the
``out_proj`` of an ``nn.MultiheadAttention``, whose forward never runs, grouped convolutions, subclasses that
override ``forward``, but for transformers' ``FalconLinear``, whose forward is ``nn.Linear``'s as a matmul) is not a
factorable layer: it is projected densely.

``FactoredLayer.matrix`` and ``FactoredLayer.split`` convert between the parameters'
materialised per-example gradients and G: the projections and gradient transforms use them on the
materialising path, and the tests use them as the oracle of the hook path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

LayerKind = Literal["linear", "conv", "hf_conv1d", "embedding"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FORWARDS = tuple(conv.forward for conv in _CONVS)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The factorable kind of a module, or ``None``.

    A subclass of ``nn.Linear``, a convolution or ``nn.Embedding`` that overrides ``forward`` is none: its hooks
    would see the subclass's input and output, not the weight's (BART's learned positions look up ids they build
    from the input's shape). The exception is transformers' scaled word embedding (Gemma's, BART's: the rows times
    its ``embed_scale``), whose hooks scale the output gradient back (``embedding_scale``); the self-checks of the
    hook paths confirm it."""
    forward = type(module).forward
    if isinstance(module, nn.Linear) and (forward is nn.Linear.forward or _is_transformers(module, "FalconLinear")):
        return "linear"  # FalconLinear computes x Wᵀ + b as a matmul and an addition: nn.Linear's own
    if isinstance(module, _CONVS) and module.groups == 1 and forward in _CONV_FORWARDS:
        return "conv"
    if (
        isinstance(module, nn.Embedding)
        and (forward is nn.Embedding.forward or _scale_of(module) is not None)
        and module.max_norm is None
        and not module.scale_grad_by_freq
    ):
        return "embedding"
    if _is_transformers(module, "Conv1D") and hasattr(module, "nf"):
        return "hf_conv1d"
    return None


def _is_transformers(module: nn.Module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith("transformers")


def embedding_scale(module: nn.Module) -> float | Tensor:
    """What an embedding's forward multiplies its rows by: 1, or a scaled word embedding's ``embed_scale`` (its 0-d
    tensor as it is, so that a backward hook multiplying by it never waits on the GPU to read it)."""
    if type(module).forward is nn.Embedding.forward:
        return 1.0
    scale = _scale_of(module)
    return 1.0 if scale is None else scale


def _scale_of(module: nn.Module) -> float | Tensor | None:
    """The ``embed_scale`` of a transformers scaled word embedding (a number or a 0-d tensor), else ``None``."""
    cls = type(module)
    scale = getattr(module, "embed_scale", None)
    if not cls.__name__.endswith("ScaledWordEmbedding") or not cls.__module__.startswith("transformers"):
        return None
    if isinstance(scale, Tensor) and scale.dim() == 0 and not scale.is_meta:
        return scale.detach()
    return float(scale) if isinstance(scale, (int, float)) else None


def layer_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The one input a factorable layer's forward takes, from a forward hook's positional ``args`` or, for a layer
    called with it by keyword (``layer(input=x)``), its ``kwargs`` (hooks registered ``with_kwargs=True``)."""
    return args[0] if args else next(iter(kwargs.values()), None)


def examples_first(kind: LayerKind, shape: Sequence[int], batch: int) -> bool:
    """Whether a layer's input of ``shape`` holds ``batch`` examples along its first dimension: as many, or for a
    linear layer's matrix of rows a multiple, its positions flattened into the rows example by example (OPT's MLP
    reshapes ``[B, T, d]`` to ``[B·T, d]``; a sequence-first ``[T, B, d]`` is not). The hook paths' self-checks
    confirm that the rows group so."""
    rows = shape[0]
    flattened = kind in ("linear", "hf_conv1d") and len(shape) == 2 and batch > 0
    return rows == batch or (flattened and rows > 0 and rows % batch == 0)


@dataclass(frozen=True)
class FactoredLayer:
    """A weight whose per-example gradient matrix G (``out_features × in_rows``) is seen by hooks.

    Attributes:
        module: the name of the (first) module using the weight in ``model.named_modules()``.
        weight: the weight's parameter name.
        bias: the bias's parameter name when it is projected as an extra input column, else ``None``.
        out_features: d_out, the rows of G (output features or channels; the vocabulary of an embedding).
        in_features: d_in without the bias column (input features, C_in·∏kernel, an embedding's width).
        kind: how the module uses the weight (see the module docstring).
        tied: ``(module name, kind)`` of further modules using the same weight (a tied LM head).
    """

    module: str
    weight: str
    bias: str | None
    out_features: int
    in_features: int
    kind: LayerKind = "linear"
    tied: tuple[tuple[str, LayerKind], ...] = ()

    @property
    def in_rows(self) -> int:
        """Columns of G: d_in, plus one for the bias."""
        return self.in_features + (self.bias is not None)

    @property
    def uses(self) -> tuple[tuple[str, LayerKind], ...]:
        """``(module name, kind)`` of every module whose forward uses the weight."""
        return ((self.module, self.kind), *self.tied)

    def describe(self) -> list[Any]:
        """JSON identity; plain Linear and convolution layers keep the five fields older stores recorded."""
        base: list[Any] = [self.module, self.weight, self.bias, self.out_features, self.in_features]
        if self.kind in ("linear", "conv") and not self.tied:
            return base
        return [*base, self.kind, [list(use) for use in self.tied]]

    @classmethod
    def from_description(cls, desc: Sequence[Any], model: nn.Module | None = None) -> FactoredLayer:
        """Rebuild a layer from ``describe`` (the kind of a five-field entry is read from ``model``)."""
        module, weight, bias, out_features, in_features = desc[:5]
        if len(desc) > 5:
            tied = tuple((str(name), kind) for name, kind in desc[6])
            return cls(module, weight, bias, int(out_features), int(in_features), desc[5], tied)
        kind = layer_kind(model.get_submodule(module)) if model is not None else "linear"
        return cls(module, weight, bias, int(out_features), int(in_features), kind or "linear")

    def matrix(self, grads: Mapping[str, Tensor]) -> Tensor:
        """G of every example, ``[B, out_features, in_rows]``, from materialised per-example gradients."""
        w = grads[self.weight]
        batch = w.shape[0]
        if self.kind == "hf_conv1d":
            g = w.transpose(1, 2)
        else:
            g = w.reshape(batch, self.out_features, self.in_features)
        if self.bias is not None:
            g = torch.cat([g, grads[self.bias].reshape(batch, self.out_features, 1).to(g.dtype)], dim=2)
        return g

    def split(self, g: Tensor, shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
        """The inverse of ``matrix``: ``[B, out_features, in_rows]`` back to parameter-shaped gradients."""
        batch = g.shape[0]
        weight = g[:, :, : self.in_features]
        if self.kind == "hf_conv1d":
            weight = weight.transpose(1, 2)
        out = {self.weight: weight.reshape(batch, *shapes[self.weight])}
        if self.bias is not None:
            out[self.bias] = g[:, :, self.in_features].reshape(batch, *shapes[self.bias])
        return out


def factorable_layers(model: nn.Module, names: Sequence[str]) -> tuple[list[FactoredLayer], list[str]]:
    """Split the selected parameters into factorable layers and the rest (in ``names`` order).

    A weight factors when it is selected and every module holding it is of a factorable kind (see
    the module docstring) with the same row × column layout: one module, or embeddings and linear
    layers sharing a ``V × d`` weight (tied). A bias joins as an input column when it is selected,
    held by its layer's only module and the weight is not tied. Everything else is projected densely.
    """
    selected = set(names)
    canonical = {id(p): n for n, p in model.named_parameters()}
    # nn.MultiheadAttention hands its out_proj's weight to F.multi_head_attention_forward: the Linear never runs.
    functional = {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append((module_name, module))
    layers: list[FactoredLayer] = []
    for module_name, module in model.named_modules():
        kind = None if module_name in functional else layer_kind(module)
        weight = getattr(module, "weight", None)
        if kind is None or not isinstance(weight, nn.Parameter) or canonical.get(id(weight)) not in selected:
            continue
        uses = holders[id(weight)]
        if uses[0][0] != module_name:  # a tied weight is one layer, found at its first module
            continue
        kinds = [None if name in functional else layer_kind(m) for name, m in uses]
        if len(uses) > 1 and not all(k in ("linear", "embedding") for k in kinds):
            continue
        bias = getattr(module, "bias", None)
        bias_name = canonical.get(id(bias)) if isinstance(bias, nn.Parameter) else None
        with_bias = len(uses) == 1 and bias_name in selected and len(holders[id(bias)]) == 1
        out_features, in_features = _layout(module, kind)
        layers.append(
            FactoredLayer(
                module_name,
                canonical[id(weight)],
                bias_name if with_bias else None,
                out_features,
                in_features,
                kind,
                tuple((name, k) for (name, _), k in zip(uses[1:], kinds[1:], strict=True)),  # type: ignore[misc]
            )
        )
    factored = {layer.weight for layer in layers} | {layer.bias for layer in layers if layer.bias}
    return layers, [n for n in names if n not in factored]


def _layout(module: nn.Module, kind: LayerKind) -> tuple[int, int]:
    weight = module.weight
    if kind == "hf_conv1d":
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[0]), int(math.prod(weight.shape[1:]))
