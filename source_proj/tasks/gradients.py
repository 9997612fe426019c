"""Per-example gradients of a task's loss or measurement: from layer hooks where they can, else ``torch.func``.

**Hooks.** When every selected parameter sits in a factorable layer other than a convolution
(``projection/layers.py``: linear layers, GPT-2's ``Conv1D``, embeddings, a tied embedding and LM
head, with their biases), one ordinary forward and backward pass of the batch gives them all: a
forward hook on each use of a layer records its input a_t, a tap on its output receives the output
gradient δ_t, and example b's gradient is G_b = Σ_t δ_bt a_btᵀ (its bias's Σ_t δ_bt; an embedding's
rows are the one-hot tokens). Convolutions stay with ``torch.func``, whose grouped-convolution
gradients beat im2col patches on a CPU (``benchmarks/per_example_gradients.py``). The weights stay
constants of the graph, so autograd computes no weight gradient of its own. Before a parameter
selection first takes this path, its gradients on two examples are compared with plain autograd run
one example at a time; a model the hooks cannot see whole (a weight also used outside its layers,
examples mixed along the batch, inputs that are not batch-first) fails the comparison and keeps
``torch.func``.

**torch.func** (``vmap(grad(...))``) serves every other selection. Its first call imports torch's
compiler package (about 2 s), which the hook path never does.

**One example at a time.** ``torch.func.vmap`` cannot run torch's recurrent modules (``nn.LSTM``, ``nn.GRU``,
``nn.RNN``: their fused kernels fail on a batched input), so a model holding one takes plain autograd one example
after another instead: the same gradients, B backward passes a batch (with cuDNN off, whose recurrent backward
refuses a model in ``eval()`` mode). So does a model with an embedding given ``max_norm``, whose in-place
renormalisation of the rows it looks up ``vmap`` cannot batch, and a model whose forward calls an
``autograd.Function`` without ``setup_context``, which ``torch.func`` refuses (BLOOM's GELU), once ``vmap`` has
refused it. A batch of one example is its own plain autograd gradient (where the hooks have not been checked yet,
or do not apply). Reentrant ``torch.utils.checkpoint`` refuses plain autograd's ``grad`` too, and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from source_proj.compiled import eager_if_compiling
from source_proj.errors import TaskError
from source_proj.projection.layers import (
    FactoredLayer,
    LayerKind,
    embedding_scale,
    examples_first,
    factorable_layers,
)
from source_proj.tasks.task import Batch, Task

Quantity = Literal["loss", "fisher", "measurement"]  # "fisher": Task.fisher_loss, the Fisher targets' loss
Precision = Literal["fp32", "bf16"]


def quantity_of(task: Task, quantity: Quantity) -> Callable[[Tensor, Batch], Tensor]:
    """The task's per-example function of its outputs that ``quantity`` names."""
    return {"loss": task.loss, "fisher": task.fisher_loss, "measurement": task.measurement}[quantity]


def move_batch(batch: Batch, device: torch.device) -> Batch:
    """The batch with every tensor moved to ``device``; a mapping that is not a dict (the ``BatchEncoding`` of a
    Hugging Face collator, which pytrees take for a leaf) becomes one."""
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        batch = dict(batch)
    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, Tensor) else t, batch)


def batch_size(batch: Batch) -> int:
    """Number of examples in a batch (the first dimension of its first tensor)."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError("a batch must contain at least one tensor")
    return int(leaves[0].shape[0])


def batch_rows(batch: Batch, rows: slice) -> Batch:
    """The examples ``rows`` of a batch: every tensor sliced along its first dimension (views, not copies)."""
    return tree_map(lambda t: t[rows] if isinstance(t, Tensor) else t, batch)


class OutputTap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient δ to a callback.

    The output is cloned so that in-place operations after the layer (``ReLU(inplace=True)``)
    cannot change the value whose gradient the callback receives. ``probe`` (a scalar with
    ``requires_grad``) puts the output in the graph even when nothing before it requires a gradient.
    """

    @staticmethod
    def forward(ctx: Any, output: Tensor, probe: Tensor, callback: Callable[[Tensor], None]) -> Tensor:
        ctx.callback = callback
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        ctx.callback(grad)
        return grad, grad.new_zeros(()), None


# What torch says when per-example gradients meet torch.utils.checkpoint in eval mode: the non-reentrant form's
# CheckpointError under the hooks (its recomputation sees the module's own parameters, not the functional call's),
# and torch.func's refusal of its saved-tensor hooks; the reentrant form's refusal of autograd.grad.
_CHECKPOINT_ERRORS = ("torch.utils.checkpoint", "don't yet support saved tensor hooks")
# torch.func's refusal of an autograd.Function without setup_context: the reentrant checkpoint's, or the model's own.
_OLD_FUNCTION = "In order to use an autograd.Function with functorch transforms"


def checkpointing_error(err: BaseException) -> TaskError | None:
    """The ``TaskError`` saying what to do where ``err`` is torch's at a forward that runs gradient checkpointing
    (or an autograd.Function torch.func cannot run); ``None`` for any other error."""
    if not isinstance(err, RuntimeError):
        return None
    if _OLD_FUNCTION in str(err):
        return TaskError(
            "The model's forward calls an autograd.Function that torch.func cannot take per-example gradients "
            "through (one without a setup_context staticmethod, such as reentrant torch.utils.checkpoint); give it "
            "setup_context, or checkpoint only in training mode (`if self.training:`, as Hugging Face models do)."
        )
    if any(sign in str(err) for sign in _CHECKPOINT_ERRORS):
        return checkpointing_refusal()
    return None


def checkpointing_refusal() -> TaskError:
    """What to do about a forward that runs gradient checkpointing."""
    return TaskError(
        "The model's forward runs torch.utils.checkpoint (gradient checkpointing), which per-example gradients "
        "cannot be taken through; checkpoint only in training mode (`if self.training:`, as Hugging Face models "
        "do), since attribution runs the model in eval() mode."
    )


class UntrackedLayers:
    """While open: tells whether a hooked layer runs without autograd inside a forward of ``model`` that began with
    it: a reentrant checkpoint's first forward, whose layers the hooks would give a gradient of zero (its
    recomputation differentiates the module's own parameters, not the ones the pass differentiates), or a layer
    the forward runs under ``torch.no_grad``, whose hooked gradient would be right. The gradient hooks leave both
    to ``torch.func``, which refuses the first and takes the second exactly; the factored projection's self-check
    compares with those gradients. A whole forward without autograd (a text task comparing its mask with the
    model's own) does not count."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._tracked: list[bool] = []  # per forward of the model now running: whether it began with autograd
        self._handles: list[Any] = []

    def __enter__(self) -> UntrackedLayers:
        self._handles = [
            self.model.register_forward_pre_hook(eager_if_compiling(self._began)),
            self.model.register_forward_hook(eager_if_compiling(self._ended)),
        ]
        return self

    def _began(self, *_: Any) -> None:
        self._tracked.append(torch.is_grad_enabled())

    def _ended(self, *_: Any) -> None:
        if self._tracked:
            self._tracked.pop()

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._tracked.clear()

    def now(self) -> bool:
        """Whether a layer running now runs without autograd inside a forward of the model that began with it."""
        return bool(self._tracked) and self._tracked[-1] and not torch.is_grad_enabled()


@contextmanager
def checkpointing_refused() -> Iterator[None]:
    """Raise torch's error at a forward that runs gradient checkpointing as ``checkpointing_error``'s."""
    try:
        yield
    except RuntimeError as err:
        refusal = checkpointing_error(err)
        if refusal is None:
            raise
        raise refusal from err


class _HooksBlind(Exception):
    """A hooked layer saw inputs whose first dimension is not the batch, or ran without autograd inside a forward
    with it (``UntrackedLayers``): torch.func takes the gradients."""


_HOOK_CHECK_EXAMPLES = 2
_HOOK_CHECK_TOLERANCE = 1e-3


def check_tolerance(params: Iterable[Tensor]) -> float:
    """The relative error allowed between two computations of the same per-example gradients: 10⁻³, or four
    roundings of the parameters' least precise dtype where that is more (bf16 weights: 0.031). Two summation orders
    of bf16 weights differ by about 10⁻³, where a layer the hooks miss moves a gradient by its whole share."""
    eps = max((torch.finfo(p.dtype).eps for p in params if p.is_floating_point()), default=0.0)
    return max(_HOOK_CHECK_TOLERANCE, 4 * eps)


class PerExampleGradients:
    """Per-example gradients ∇_θ loss(z; θ) or ∇_θ f(q; θ) for the selected parameters θ.

    The model is put in ``eval()`` mode (per-example gradients must not mix examples through
    batch statistics or dropout). Parameters outside ``param_names`` and buffers are held fixed.

    Args:
        model: the network, already holding the checkpoint's weights and on its device.
        task: defines forward, loss and measurement.
        param_names: the parameters θ, in projection order.
        vmap_chunk: examples per vectorised chunk of the ``torch.func`` path (bounds its memory);
            ``None`` = whole batch.
        precision: ``"fp32"``, or ``"bf16"`` to run forward and backward under bfloat16 autocast
            (gradients still come out in the parameters' dtype; projections accumulate in fp32).
        hooks: take the hook path where it applies (see the module docstring); ``False``: always
            ``torch.func`` (the same gradients; for comparisons).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        param_names: Sequence[str],
        *,
        vmap_chunk: int | None = None,
        precision: Precision = "fp32",
        hooks: bool = True,
    ) -> None:
        _refuse_batch_statistics(model)
        self.model = model.eval()
        self.task = task.bind(model)
        self.param_names = list(param_names)
        named = dict(model.named_parameters())
        self.params = {n: named[n].detach() for n in self.param_names}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in self.params}
        self.frozen.update({n: b for n, b in model.named_buffers()})
        self.vmap_chunk = vmap_chunk
        if precision not in ("fp32", "bf16"):
            raise TaskError(f"Unknown precision {precision!r}; use 'fp32' or 'bf16'.")
        self.precision = precision
        self.device = next(iter(self.params.values())).device
        self._fns = {q: self._vectorised(q) for q in ("loss", "fisher", "measurement")}
        self._shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self.hooks = hooks
        self._hooked_layers: dict[tuple[str, ...], list[FactoredLayer] | None] = {}
        self._looped = any(_unbatchable(m) for m in model.modules())  # see the module docstring

    def autocast(self) -> torch.autocast:
        """The autocast context of this precision (a no-op for fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _call(self, params: Mapping[str, Tensor]) -> Callable[..., Any]:
        # ``params`` may be a subset of θ (the one differentiated); the rest of θ stays constant.
        merged = params if len(params) == len(self.params) else {**self.params, **params}

        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, (merged, self.frozen), args, kwargs, strict=False)

        return call

    def outputs(self, batch: Batch) -> Tensor:
        """Model outputs for the batch, without gradients."""
        with torch.no_grad():
            return self.task.forward(self._call(self.params), batch)

    def _vectorised(self, quantity: Quantity) -> Callable[[dict[str, Tensor], Batch], dict[str, Tensor]]:
        task = self.task
        value = quantity_of(task, quantity)

        def single(params: dict[str, Tensor], example: Batch) -> Tensor:
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
            return value(task.forward(self._call(params), one), one).sum()

        return vmap(grad(single), in_dims=(None, 0), chunk_size=self.vmap_chunk)

    def values(self, batch: Batch, quantity: Quantity = "loss") -> Tensor:
        """Per-example ``quantity`` ``[B]`` from one ordinary (not vectorised) forward pass.

        Autograd stays on, but the parameters θ are constants of the graph: the caller
        differentiates with respect to intermediate values (see ``factored.py``).
        """
        value = quantity_of(self.task, quantity)
        with torch.enable_grad(), self.autocast():
            return value(self.task.forward(self._call(self.params), batch), batch)

    def __call__(
        self, batch: Batch, quantity: Quantity = "loss", names: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Per-example gradients of ``quantity``: a dict ``name → [B, *param.shape]``.

        ``names`` restricts the gradients to a subset of the parameters (the others stay fixed).
        """
        with checkpointing_refused():
            return self._gradients(batch, quantity, names)

    def _gradients(self, batch: Batch, quantity: Quantity, names: Sequence[str] | None) -> dict[str, Tensor]:
        selected = tuple(self.param_names if names is None else names)
        layers = self._layers_for(selected, batch, quantity) if self.hooks else None
        if layers is not None:
            try:
                return self._hooked(layers, selected, batch, quantity, self.precision == "bf16")
            except _HooksBlind:
                self._hooked_layers[selected] = None
        if self._looped:
            with self.autocast(), torch.backends.cudnn.flags(enabled=False):
                return self._one_by_one(selected, batch, quantity)
        if self.hooks and batch_size(batch) == 1:  # its gradient is plain autograd's, whatever vmap can run
            with self.autocast():
                return self._one_by_one(selected, batch, quantity)
        params = self.params if names is None else {n: self.params[n] for n in names}
        try:
            with self.autocast():
                return self._fns[quantity](params, batch)
        except RuntimeError as err:
            if _OLD_FUNCTION not in str(err):
                raise
            self._looped = True  # an autograd.Function torch.func cannot run: plain autograd can (see the docstring)
            return self._gradients(batch, quantity, names)

    def _layers_for(self, selected: tuple[str, ...], batch: Batch, quantity: Quantity) -> list[FactoredLayer] | None:
        """The factorable layers holding every selected parameter, or ``None`` (use ``torch.func``).

        Decided once per selection, on its first batch of at least two examples: the hook path must
        match plain per-example autograd there (fp32) on the first two (see the module docstring).
        """
        if selected in self._hooked_layers:
            return self._hooked_layers[selected]
        layers, rest = factorable_layers(self.model, selected)
        if rest or any(kind == "conv" for layer in layers for _, kind in layer.uses):
            self._hooked_layers[selected] = None
            return None
        if batch_size(batch) < _HOOK_CHECK_EXAMPLES:  # one example cannot show examples mixing
            return None
        few = batch_rows(batch, slice(0, _HOOK_CHECK_EXAMPLES))
        try:
            hooked = self._hooked(layers, selected, few, quantity, False)
        except _HooksBlind:
            hooked = None
        exact = self._one_by_one(selected, few, quantity)
        tolerance = check_tolerance(self.params[n] for n in selected)
        agree = hooked is not None and all(
            float((hooked[n] - exact[n]).norm()) <= tolerance * float(exact[n].norm()) for n in selected
        )
        self._hooked_layers[selected] = layers if agree else None
        return self._hooked_layers[selected]

    def _hooked(
        self, layers: Sequence[FactoredLayer], selected: Sequence[str], batch: Batch, quantity: Quantity, bf16: bool
    ) -> dict[str, Tensor]:
        """Per-example gradients of the layers' parameters from one forward and one backward pass."""
        size = batch_size(batch)
        probe = torch.zeros((), device=self.device, requires_grad=True)
        value = quantity_of(self.task, quantity)
        with _LayerGradients(self.model, layers, size, probe, self._shapes) as taps:
            with torch.enable_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                total = value(self.task.forward(self._call(self.params), batch), batch).sum()
            if total.requires_grad:
                torch.autograd.grad(total, probe, allow_unused=True)
        grads = {}
        for n in selected:
            g = taps.grads.get(n)  # None: the layer took no part in the quantity
            grads[n] = torch.zeros(size, *self._shapes[n], device=self.device) if g is None else g
        return {n: g.to(self.params[n].dtype) for n, g in grads.items()}

    def _one_by_one(self, selected: Sequence[str], batch: Batch, quantity: Quantity) -> dict[str, Tensor]:
        """Per-example gradients from plain autograd, one example at a time: the hook path's oracle (fp32), and the
        path of a model ``torch.func.vmap`` cannot run (see the module docstring)."""
        value = quantity_of(self.task, quantity)
        leaves = {n: self.params[n].clone().requires_grad_() for n in selected}
        rows = []
        for i in range(batch_size(batch)):
            one = batch_rows(batch, slice(i, i + 1))
            with torch.enable_grad():
                total = value(self.task.forward(self._call(leaves), one), one).sum()
                row = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
            rows.append([torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(selected, row, strict=True)])
        return {n: torch.stack([row[j] for row in rows]) for j, n in enumerate(selected)}


class _LayerGradients:
    """While open: hooks on every use of the layers, adding each example's gradients of the layer's weight
    and bias (``[B, *shape]``) to ``grads[name]`` in the backward."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[FactoredLayer],
        size: int,
        probe: Tensor,
        shapes: Mapping[str, tuple[int, ...]],
    ) -> None:
        self.modules = dict(model.named_modules())
        self.layers, self.size, self.probe, self.shapes = layers, size, probe, shapes
        self.grads: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _LayerGradients:
        self._untracked = UntrackedLayers(self.modules[""]).__enter__()
        for layer in self.layers:
            for name, kind in layer.uses:
                hook = eager_if_compiling(self._hook(layer, kind))
                self._handles.append(self.modules[name].register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._untracked.__exit__()

    def _hook(self, layer: FactoredLayer, kind: LayerKind) -> Callable[[nn.Module, tuple[Any, ...], Tensor], Tensor]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
            if self._untracked.now() or not inputs or not isinstance(inputs[0], Tensor):  # keywords: torch.func's
                raise _HooksBlind
            x = inputs[0]
            if kind == "embedding" and x.shape[0] == 1 < self.size:  # positions shared by the batch ([1, T])
                x, output = x.expand(self.size, *x.shape[1:]), output.expand(self.size, *output.shape[1:])
            if not examples_first(kind, x.shape, self.size):
                raise _HooksBlind
            with torch.no_grad(), _no_autocast(x.device):
                side = _input_side(layer, kind, x.detach(), self.size)
            return OutputTap.apply(output, self.probe, lambda grad: self._add(module, layer, kind, side, grad))

        return hook

    def _add(self, module: nn.Module, layer: FactoredLayer, kind: LayerKind, side: Tensor, grad: Tensor) -> None:
        with torch.no_grad(), _no_autocast(grad.device):
            weight, bias = _gradient_matrix(module, layer, kind, side, grad.to(_compute_dtype(grad)), self.size)
            if kind == "hf_conv1d":  # its weight is stored [d_in, d_out]
                weight = weight.transpose(1, 2)
            self._add_to(layer.weight, weight)
            if layer.bias:
                self._add_to(layer.bias, bias)

    def _add_to(self, name: str, g: Tensor) -> None:
        g = g.reshape(self.size, *self.shapes[name])
        previous = self.grads.get(name)
        self.grads[name] = g if previous is None else previous + g


def _refuse_batch_statistics(model: nn.Module) -> None:
    """A batch norm without running statistics normalises by the batch's even in ``eval()`` mode: an example's
    gradient would depend on the rest of its batch (or, taken alone, be that of another function)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            raise TaskError(
                f"Layer {name!r} ({type(module).__name__}) keeps no running statistics (track_running_stats=False), "
                "so it normalises every batch by the batch's own, even in eval() mode, and an example's gradient "
                "depends on the rest of its batch; attribute a model whose batch norms track running statistics, or "
                "that normalises each example alone (GroupNorm, LayerNorm, InstanceNorm)."
            )


def _unbatchable(module: nn.Module) -> bool:
    """A module whose forward ``torch.func.vmap`` cannot run per example: torch's recurrent modules, and an embedding
    with ``max_norm``, which renormalises the rows it looks up in place (a batched index into an unbatched weight)."""
    return isinstance(module, nn.RNNBase) or (
        isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None
    )


@contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    with torch.autocast(device.type, enabled=False):
        yield


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half-precision tensors, else the tensor's own (float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _input_side(layer: FactoredLayer, kind: LayerKind, x: Tensor, size: int) -> Tensor:
    """What the forward pass contributes to G: the inputs a_t ``[B, T, d_in]``, or an embedding's token
    ids ``[B, T]``."""
    if kind == "embedding":
        return x.reshape(size, -1)
    return x.to(_compute_dtype(x)).reshape(size, -1, layer.in_features)


def _gradient_matrix(
    module: nn.Module, layer: FactoredLayer, kind: LayerKind, side: Tensor, grad: Tensor, size: int
) -> tuple[Tensor, Tensor | None]:
    """One use of a layer: G_b = Σ_t δ_bt a_btᵀ ``[B, out_features, in_features]`` (embeddings:
    Σ_t e_{x_t} δ_tᵀ) and, with a bias, Σ_t δ_bt ``[B, out_features]``."""
    if kind == "embedding":
        width = layer.in_features
        delta = grad.reshape(size, -1, width) * embedding_scale(module)
        if module.padding_idx is not None:  # torch gives the padding row no gradient
            delta = delta.masked_fill((side == module.padding_idx).unsqueeze(-1), 0)
        rows = side + layer.out_features * torch.arange(size, device=side.device).unsqueeze(1)
        g = torch.zeros(size * layer.out_features, width, dtype=delta.dtype, device=delta.device)
        g.index_add_(0, rows.reshape(-1), delta.reshape(-1, width))
        return g.reshape(size, layer.out_features, width), None
    delta = grad.reshape(size, -1, layer.out_features).transpose(1, 2).to(side.dtype)  # [B, d_out, T]
    # One position (an MLP): the outer product broadcast, several times faster than a bmm over length 1.
    weight = delta * side if delta.shape[2] == 1 else torch.bmm(delta, side)
    return weight, delta.sum(2) if layer.bias else None
