"""Kronecker factors of the Fisher, collected per row chunk while featurize runs (see
``methods/kronecker.py`` for what they mean and how SOURCE uses them).

For every factored layer and every batch of Fisher pseudo-targets (labels drawn from the model,
weight w per example), one ordinary forward and backward pass accumulates::

    A += Σ_{examples, positions} ā ā ᵀ            (inputs, a constant 1 appended for an attributed bias)
    B += Σ_{examples, positions} w δ δᵀ          (output gradients of each example's own loss)

and, for the parameters no layer factors, the Fisher diagonal Σ_examples w g ⊙ g from their
materialised per-example gradients. The model runs in ``eval()`` mode, so the examples of a batch do
not interact and the summed loss's output gradients are exactly the per-example δ.

A convolution's ā (its im2col patches, C_in·∏kernel floats per output position: 9 times its input for a 3 × 3
kernel) enter A whatever the backward gives, so its product is taken in the forward hook and the patches dropped
there; a token layer's rows wait for δ, which says which of them enter (``FactorCollector._accumulate``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from source_proj.compiled import eager_if_compiling
from source_proj.errors import TaskError
from source_proj.projection.layers import FactoredLayer, examples_first, factorable_layers, layer_input
from source_proj.tasks.draws import FisherDraws
from source_proj.tasks.gradients import OutputTap, PerExampleGradients, Quantity, batch_size, quantity_of
from source_proj.tasks.task import Batch

MAX_FACTOR_SIDE = 8192
"""The largest side of a Kronecker factor (a 8192² float64 factor is 512 MiB); larger layers take the diagonal."""


def kronecker_layers(model: nn.Module, names: Sequence[str]) -> tuple[list[FactoredLayer], list[str]]:
    """The layers whose curvature is Kronecker-factored (``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Conv1d/2d/3d``
    with groups=1) and the parameters that get a diagonal instead, in ``names`` order. Embeddings and tied
    weights take the diagonal: an embedding's input factor is the V × V diagonal of token counts, which
    the diagonal of the Fisher holds exactly and at O(V·d). So does a layer with a side above
    ``MAX_FACTOR_SIDE`` (an untied LM head's V × V output factor would not fit in memory)."""
    layers, rest = factorable_layers(model, names)
    kept = [
        layer
        for layer in layers
        if layer.kind in ("linear", "hf_conv1d", "conv")
        and not layer.tied
        and max(layer.out_features, layer.in_rows) <= MAX_FACTOR_SIDE
    ]
    dropped = [n for layer in layers if layer not in kept for n in (layer.weight, layer.bias) if n]
    return kept, [n for n in names if n in set(rest) | set(dropped)]


def describe_layers(layers: Sequence[FactoredLayer], diagonal: Sequence[str]) -> dict[str, Any]:
    """JSON form recorded in the store (fit and query rebuild the curvature from it, without the model)."""
    return {"layers": [layer.describe() for layer in layers], "diagonal": list(diagonal)}


def layers_from_description(desc: Mapping[str, Any]) -> tuple[list[FactoredLayer], list[str]]:
    """Inverse of :func:`describe_layers`."""
    return [FactoredLayer.from_description(d) for d in desc["layers"]], list(desc["diagonal"])


_POSITIONS = 3
"""The stream of ``FisherDraws`` the sampled positions come from (the labels' are 0, 1 and 2)."""

@dataclass
class ChunkFactors:
    """Sums over one row chunk, float64 on the model's device: per layer A ``[d_in', d_in']``, B ``[d_out, d_out]``
    and the number of positions; per diagonal parameter Σ w g²; the number of examples."""

    a: list[Tensor]
    b: list[Tensor]
    positions: list[int]
    diagonal: dict[str, Tensor]
    examples: int = 0


TOKEN_LAYERS = ("linear", "hf_conv1d")
"""Layer kinds whose positions are tokens (``_accumulate`` keeps those that take part in the loss)."""


@dataclass
class _Taken:
    """The ā of one use of a layer whose positions all enter A (a convolution's), taken in the forward hook: the
    rows ``[count, d_in']`` the draw of positions kept, or their product āᵀā ``[d_in', d_in']`` (float32, as
    ``_accumulate`` takes it) where that is smaller: a batch's patches are held as one factor, not until δ."""

    value: Tensor
    product: bool
    count: int

    @classmethod
    def rows(cls, rows: Tensor) -> _Taken:
        return cls(rows, False, int(rows.shape[0]))

    @classmethod
    def smaller(cls, rows: Tensor) -> _Taken:
        """``rows``, or their product where it holds fewer floats."""
        if rows.shape[0] <= rows.shape[1]:
            return cls.rows(rows)
        with torch.autocast(rows.device.type, enabled=False):  # the hook runs under the forward's autocast
            return cls(rows.T @ rows, True, int(rows.shape[0]))

    def gram(self) -> Tensor:
        return self.value if self.product else self.value.T @ self.value


class FactorCollector:
    """Accumulates the Kronecker factors of a model's layers over Fisher pseudo-target batches.

    Args:
        grads_fn: the per-example gradient engine (its model holds the checkpoint's weights).
        layers: the Kronecker layers (from :func:`kronecker_layers`).
        diagonal: parameters that get a Fisher diagonal.
        positions: at most this many positions (tokens, or a convolution's patches) per example enter a layer's
            factors, of those that take part in the loss (see ``_accumulate``), drawn at random without
            replacement for each example from the batch's ``draws`` (shared by the batch's layers with as many
            positions): each example's own, whatever its batch; ``None``: every position. The sums stay unbiased:
            A averages the positions it took, and each example's B terms are scaled by its positions over those
            taken. The factor products
            (d_in'² + d_out² per position, more than a transformer block's forward and input backward together)
            shrink by that ratio.
        quantity: what the target batches' gradients are of: ``"fisher"`` (``Task.fisher_loss``, at sampled or
            enumerated labels) or ``"loss"`` (the training loss at the observed labels: the empirical Fisher).
    """

    def __init__(
        self,
        grads_fn: PerExampleGradients,
        layers: Sequence[FactoredLayer],
        diagonal: Sequence[str],
        positions: int | None = None,
        quantity: Quantity = "fisher",
    ):
        if positions is not None and positions < 1:
            raise ValueError("positions must be at least 1")
        self.grads_fn = grads_fn
        self.layers = list(layers)
        self.diagonal = list(diagonal)
        self.positions = positions
        self.quantity = quantity
        self.sampled = False
        """Whether some example had more than ``positions`` positions (the factors then took a sample)."""
        modules = dict(grads_fn.model.named_modules())
        self.modules = [modules[layer.module] for layer in self.layers]
        self.shapes = {n: tuple(p.shape) for n, p in grads_fn.model.named_parameters()}

    def empty(self) -> ChunkFactors:
        """Zero sums on the model's device. They stay there while batches are added: a language model's
        factors are GBs per batch (a 1B model's ≈ 25 GB), which copying to the host at every batch would move
        over the bus and add on the host, at several times the cost of the batch's forward and backward."""
        device = self.grads_fn.device
        a = [torch.zeros(layer.in_rows, layer.in_rows, dtype=torch.float64, device=device) for layer in self.layers]
        b = [torch.zeros(layer.out_features, layer.out_features, dtype=torch.float64, device=device)
             for layer in self.layers]  # fmt: skip
        diag = {n: torch.zeros(self.shapes[n], dtype=torch.float64, device=device) for n in self.diagonal}
        return ChunkFactors(a, b, [0] * len(self.layers), diag)

    def add(
        self, sums: ChunkFactors, targets: Sequence[tuple[Tensor, Batch]], draws: FisherDraws | None = None
    ) -> None:
        """Add one batch of examples to ``sums``: ``targets`` are its Fisher pseudo-target batches with
        their per-example weights (``Task.fisher_targets``: one sampled batch, or every class weighted by
        its probability). The inputs (A) do not depend on the targets and are counted once. ``draws``: the
        batch's (required with ``positions``), whose uniforms pick each example's positions."""
        for index, (weight, target_batch) in enumerate(targets):
            self._add_targets(sums, target_batch, weight, inputs_too=index == 0, draws=draws)
        sums.examples += int(targets[0][0].shape[0])

    def add_shared(
        self,
        sums: ChunkFactors,
        batch: Batch,
        draw: Callable[[Tensor], Sequence[tuple[Tensor, Batch]]],
        draws: FisherDraws | None = None,
    ) -> None:
        """``add`` from one forward pass: ``draw(outputs)`` returns the Fisher targets from the detached
        outputs (labels drawn from the model), and each target batch's loss is differentiated through
        that forward's graph, where ``add`` runs a forward per target batch and the caller one more for
        the outputs."""
        size, device = batch_size(batch), self.grads_fn.device
        with self._hooked(size, True, draws) as (inputs, deltas, probe, known):
            with torch.enable_grad(), self.grads_fn.autocast():
                outputs = self.grads_fn.task.forward(self.grads_fn._call(self.grads_fn.params), batch)
        targets = draw(outputs.detach())
        for index, (weight, target_batch) in enumerate(targets):
            for uses in deltas:  # this target's δ only: a loss that never reaches a use (one not of the outputs)
                uses[:] = [None] * len(uses)  # would leave the previous target's there, added to B again
            w = weight.to(device=device, dtype=torch.float32)
            with torch.enable_grad(), self.grads_fn.autocast():
                total = (quantity_of(self.grads_fn.task, self.quantity)(outputs, target_batch).float() * w.sqrt()).sum()
            if total.requires_grad:
                torch.autograd.grad(total, probe, retain_graph=index < len(targets) - 1, allow_unused=True)
            self._accumulate(sums, inputs, deltas, index == 0, size, w, draws, known)
            if self.diagonal:
                self._add_diagonal(sums, target_batch, w)
        sums.examples += size

    def _add_targets(
        self, sums: ChunkFactors, target_batch: Batch, weight: Tensor, inputs_too: bool, draws: FisherDraws | None
    ) -> None:
        w = weight.to(device=self.grads_fn.device, dtype=torch.float32)
        with self._hooked(int(weight.shape[0]), inputs_too, draws) as (inputs, deltas, probe, known):
            values = self.grads_fn.values(target_batch, self.quantity)
            total = (values.float() * w.sqrt()).sum()  # δ scaled by √w: B collects w δ δᵀ
            if total.requires_grad:
                torch.autograd.grad(total, probe, allow_unused=True)
        self._accumulate(sums, inputs, deltas, inputs_too, int(weight.shape[0]), w, draws, known)
        del inputs, deltas  # not held through the diagonal's per-example gradients
        if self.diagonal:
            self._add_diagonal(sums, target_batch, w)

    @contextmanager
    def _hooked(
        self, size: int, inputs_too: bool, draws: FisherDraws | None
    ) -> Iterator[
        tuple[list[list[Tensor | _Taken | None]], list[list[Tensor | None]], Tensor, dict[int, Tensor | None]]
    ]:
        """Forward hooks on every layer while the block runs: ``(inputs, deltas, probe, known)``, the lists the hooks
        fill, per layer one entry per use (a layer the forward applies twice, a shared block, has two): in the
        forward its ā at every position (a token layer's), the ā that enter A (a convolution's, ``_Taken``) or
        ``None`` (not ``inputs_too``: A is not wanted), its δ in every backward through ``probe``; and the keys the
        forward drew for every position of a length T (``_drawn``: a convolution's), which ``_keys`` reuses."""
        inputs: list[list[Tensor | _Taken | None]] = [[] for _ in self.layers]
        deltas: list[list[Tensor | None]] = [[] for _ in self.layers]
        known: dict[int, Tensor | None] = {}
        probe = torch.zeros((), device=self.grads_fn.device, requires_grad=True)
        handles = [
            module.register_forward_hook(
                eager_if_compiling(self._hook(i, size, inputs, deltas, probe, inputs_too, draws, known)),
                with_kwargs=True,
            )
            for i, module in enumerate(self.modules)
        ]
        try:
            yield inputs, deltas, probe, known
        finally:
            for handle in handles:
                handle.remove()

    def _accumulate(
        self,
        sums: ChunkFactors,
        inputs: Sequence[Sequence[Tensor | _Taken | None]],
        deltas: Sequence[Sequence[Tensor | None]],
        inputs_too: bool,
        size: int,
        weight: Tensor | None = None,
        draws: FisherDraws | None = None,
        known: Mapping[int, Tensor | None] | None = None,
    ) -> None:
        """Add a target batch's layer products. Of a token layer (``TOKEN_LAYERS``), only positions that take part
        in the loss enter them: where a token's δ is 0 (padding, a causal language model's last token, the tokens
        a classifier's head never reads past its last layer's attention) it adds nothing to any example's gradient
        Σ_t δ_t ā_tᵀ, so its ā would only bend A toward what no gradient holds, and make the factors depend on how
        far a batch was padded. A convolution's patches all enter, as K-FAC takes them: there a patch's δ is 0
        where max pooling passed it over, which depends on the input, not on the batch's layout. An example whose
        weight is 0 (an exact Fisher's class of probability 0) has δ = 0 everywhere: its positions all enter.
        Each use of a layer (a shared block applied twice) adds its positions, as a sequence's tokens do; a use
        without a δ (run under ``torch.no_grad``) adds nothing. A convolution's rows, which do not depend on δ, were
        taken in the forward (``_Taken``: the same rows, and the same float32 product, as taken here)."""
        silent = None if weight is None else (weight == 0).view(-1, 1)
        lives, pairs = [], []
        for i, layer in enumerate(self.layers):
            used = [(i, a, d) for a, d in zip(inputs[i], deltas[i], strict=True) if d is not None]
            if not used:
                raise TaskError(
                    f"Layer {layer.module!r} took no part in the loss of a Fisher pseudo-target batch; exclude its "
                    "parameters from the selection, or use FeaturizeArguments(curvature='projected')."
                )
            pairs.extend(used)
        for i, _, d in pairs:
            layer = self.layers[i]
            if layer.kind not in TOKEN_LAYERS:
                live = _every(size, d.shape[0] // size, d.device)
            else:
                low, high = torch.aminmax(d, dim=1)  # a row is 0 where both are: no [rows, d_out] temporary
                live = ((low != 0) | (high != 0)).view(size, d.shape[0] // size)
                if silent is not None:
                    live = live | silent.to(live.device)
            lives.append(live)
        keys = self._keys(lives, draws, known or {})
        for (i, a, d), live in zip(pairs, lives, strict=True):
            take, scale = self._take(live, keys.get(live.shape[1]))
            if inputs_too:
                assert a is not None  # the hooks keep inputs whenever they are wanted
                if not isinstance(a, _Taken):  # a token layer's: its live rows, or those drawn
                    a = _Taken.rows(a if take is None else a[take])
                sums.a[i] += a.gram().double()
                sums.positions[i] += a.count
            if take is not None:
                d = d[take]
            if scale is not None:  # each example's live positions over those taken: B's sum stays unbiased
                d = d * scale.to(d).sqrt().unsqueeze(1)
            sums.b[i] += (d.T @ d).double()

    def _keys(
        self, lives: Sequence[Tensor], draws: FisherDraws | None, known: Mapping[int, Tensor | None]
    ) -> dict[int, Tensor]:
        """The draw's keys ``[size, T]`` per length T whose live positions exceed ``positions`` in some example: one
        uniform draw at each position live in some layer of that length (-1 elsewhere), shared by those layers.
        Drawn from each example's ``draws`` at its live positions, numbered among them: a batch padded further, or
        the example in another batch, draws the same keys."""
        if self.positions is None:
            return {}
        unions: dict[int, Tensor] = {}
        for live in lives:
            per = live.shape[1]
            unions[per] = live if per not in unions else unions[per] | live
        keys = {}
        for per, union in unions.items():
            # every position live (a convolution's length): the forward's draw, whatever the token layers of this T
            drawn = known[per] if per in known and bool(union.all()) else self._drawn(union, draws)
            if drawn is not None:
                keys[per] = drawn
                self.sampled = True
        return keys

    def _drawn(self, union: Tensor, draws: FisherDraws | None) -> Tensor | None:
        """The keys ``[size, T]`` of the positions ``union`` marks where an example has more than ``positions`` of
        them (``_keys``); ``None`` where none has."""
        if self.positions is None or int(union.sum(1).max()) <= self.positions:
            return None
        if draws is None:
            raise ValueError("positions are drawn from the batch's draws; pass them")
        return torch.where(union, draws.at(union, stream=_POSITIONS).to(union.device), -1.0)

    def _take(self, live: Tensor, keys: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The rows (of ``[size·T]``, example-major) that enter the factors: each example's live positions, at most
        ``positions`` of them, those of the largest ``keys``; with each taken row's weight (its example's live
        positions over those taken) where a draw took fewer. ``(None, None)``: every row, weight 1."""
        if keys is None:
            return (None, None) if bool(live.all()) else (live.reshape(-1).nonzero().squeeze(1), None)
        assert self.positions is not None
        size, per = live.shape
        top = keys.masked_fill(~live, -1.0).topk(self.positions, dim=1)
        chosen = top.values >= 0  # an example with fewer live positions: the dead ones drawn are dropped
        rows = (top.indices + torch.arange(size, device=live.device).unsqueeze(1) * per)[chosen]
        counts = live.sum(1)
        weight = (counts / counts.clamp(max=self.positions).clamp_min(1)).to(torch.float32)
        return rows, weight.unsqueeze(1).expand(size, self.positions)[chosen]

    def _add_diagonal(self, sums: ChunkFactors, target_batch: Batch, w: Tensor) -> None:
        grads = self.grads_fn(target_batch, self.quantity, names=self.diagonal)
        for name, g in grads.items():
            g = g.float()
            sums.diagonal[name] += (g * g * w.view(-1, *[1] * (g.dim() - 1))).sum(0).double()

    def _hook(
        self,
        index: int,
        size: int,
        inputs: list[list[Tensor | _Taken | None]],
        deltas: list[list[Tensor | None]],
        probe: Tensor,
        inputs_too: bool,
        draws: FisherDraws | None,
        known: dict[int, Tensor | None],
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Tensor], Tensor]:
        layer = self.layers[index]

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor:
            x = layer_input(args, kwargs)
            if not examples_first(layer.kind, x.shape, size):
                raise TaskError(
                    f"Layer {layer.module!r} sees inputs of first dimension {x.shape[0]}, not the batch size {size}: "
                    "Kronecker factors need examples along the first dimension of every layer's input; use "
                    "FeaturizeArguments(curvature='projected') for this model."
                )
            inputs[index].append(self._inputs(module, x, output, layer, size, draws, known) if inputs_too else None)
            deltas[index].append(None)
            use = len(deltas[index]) - 1

            def record(grad: Tensor) -> None:
                deltas[index][use] = _output_positions(module, grad.detach().float(), layer)

            return OutputTap.apply(output, probe, record)

        return hook

    def _inputs(
        self,
        module: nn.Module,
        x: Tensor,
        output: Tensor,
        layer: FactoredLayer,
        size: int,
        draws: FisherDraws | None,
        known: dict[int, Tensor | None],
    ) -> Tensor | _Taken:
        """What a use's forward keeps for A: a token layer's ā at every position (δ says which enter); a
        convolution's that enter, taken now, as ``_accumulate`` would take them (every patch live, so the keys of its
        T positions are those of every position, whichever layers share T), and only those made."""
        if layer.kind in TOKEN_LAYERS:
            return _positions(module, x.detach().float(), layer)
        per = output.shape[2:].numel()
        live = _every(size, per, x.device)
        if per not in known:  # drawn once for the layers (and uses) of this length
            known[per] = self._drawn(live, draws)
        take, _ = self._take(live, known[per])
        return _Taken.smaller(_positions(module, x.detach().float(), layer, take))


def _every(size: int, per: int, device: torch.device) -> Tensor:
    """Every position live, bool ``[size, per]``: a convolution's (``_accumulate``)."""
    return torch.ones(size, per, dtype=torch.bool, device=device)


def _positions(module: nn.Module, x: Tensor, layer: FactoredLayer, rows: Tensor | None = None) -> Tensor:
    """ā at every position, ``[B·T, d_in']`` (convolutions: their im2col patches); ``rows``: at those of the B·T
    (example-major) only."""
    if layer.kind not in TOKEN_LAYERS:
        return _patches(module, x, rows, ones=layer.bias)
    a = x.reshape(-1, layer.in_features)
    a = a if rows is None else a[rows]
    return torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1) if layer.bias else a


def _patches(conv: nn.Module, x: Tensor, rows: Tensor | None = None, ones: bool = False) -> Tensor:
    """The im2col patches of a convolution's input ``x`` ``[B, C_in, *spatial]`` (1, 2 or 3 spatial dimensions):
    ``[B·T, C_in·∏kernel]``, T the output positions in the order of the output's flattened spatial dimensions, each
    patch in the order of ``weight.reshape(C_out, -1)``: the inputs the weight multiplies, padded as the layer pads.
    ``rows``: only those of the B·T (the drawn positions of a batch, not all of its patches). ``ones``: with a last
    column of ones (a bias's input). Copied once, from a strided view of ``x``'s windows into the patches' own
    buffer (``F.unfold`` and a transpose, then the column of ones, made two or three copies of the patches)."""
    padding = tuple(conv.padding)
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        # Padded as the layer pads ('same' may pad one side more; reflect, replicate, circular), then cut without
        # padding.
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), (0,) * (x.dim() - 2)
    if any(padding):
        x = F.pad(x, [side for size in reversed(padding) for side in (size, size)])
    spatial, width = x.dim() - 2, conv.weight[0].numel()
    for dim, (kernel, dilation, stride) in enumerate(zip(conv.kernel_size, conv.dilation, conv.stride, strict=True)):
        x = x.unfold(2 + dim, dilation * (kernel - 1) + 1, stride)[..., ::dilation]  # [B, C_in, *T, *kernel]
    if rows is None:
        windows = x.permute(0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial))  # [B, *T, C_in, *k]
    else:  # at (example, *position) of each row: [rows, C_in, *kernel], a copy of the drawn windows only
        at = torch.unravel_index(rows, (x.shape[0], *x.shape[2 : 2 + spatial]))
        windows = x[(at[0], slice(None), *at[1:])]
    count = windows.shape[: 1 + spatial].numel() if rows is None else rows.shape[0]
    if not ones:
        return windows.reshape(count, width)
    patches = x.new_empty(count, width + 1)
    patches[:, :width].view(windows.shape).copy_(windows)
    patches[:, width] = 1
    return patches


def _output_positions(module: nn.Module, grad: Tensor, layer: FactoredLayer) -> Tensor:
    """δ at every position, ``[B·T, d_out]``."""
    if layer.kind in ("linear", "hf_conv1d"):
        return grad.reshape(-1, grad.shape[-1])
    return grad.flatten(2).transpose(1, 2).reshape(-1, grad.shape[1])


def factor_arrays(layers: Sequence[FactoredLayer], diagonal: Sequence[str], shapes: Mapping[str, Sequence[int]]):
    """``(suffix, per-chunk shape)`` of every factor array of a unit (one row per featurize chunk)."""
    arrays = []
    for i, layer in enumerate(layers):
        arrays.append((f"{i}/a", (layer.in_rows, layer.in_rows)))
        arrays.append((f"{i}/b", (layer.out_features, layer.out_features)))
    arrays.append(("counts", (len(layers) + 1,)))
    for name in diagonal:
        arrays.append((f"diagonal/{name}", tuple(shapes[name])))
    return arrays


def chunk_values(sums: ChunkFactors, layers: Sequence[FactoredLayer], diagonal: Sequence[str]) -> dict[str, np.ndarray]:
    """The rows (``[1, *shape]``) a chunk writes into each factor array."""
    out: dict[str, np.ndarray] = {}
    for i in range(len(layers)):
        out[f"{i}/a"] = sums.a[i].cpu().numpy()[None]
        out[f"{i}/b"] = sums.b[i].cpu().numpy()[None]
    out["counts"] = np.array([[*sums.positions, sums.examples]], dtype=np.float64)
    for name in diagonal:
        out[f"diagonal/{name}"] = sums.diagonal[name].cpu().numpy()[None]
    return out
