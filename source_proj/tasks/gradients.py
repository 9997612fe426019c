"""Per-example gradients of a task's loss or measurement, batched with ``torch.func``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from source_proj.errors import TaskError
from source_proj.tasks.task import Batch, Task

Quantity = Literal["loss", "measurement"]
Precision = Literal["fp32", "bf16"]


def move_batch(batch: Batch, device: torch.device) -> Batch:
    """The batch with every tensor moved to ``device``."""
    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, Tensor) else t, batch)


def batch_size(batch: Batch) -> int:
    """Number of examples in a batch (the first dimension of its first tensor)."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError("a batch must contain at least one tensor")
    return int(leaves[0].shape[0])


class PerExampleGradients:
    """Per-example gradients ∇_θ loss(z; θ) or ∇_θ f(q; θ) for the selected parameters θ.

    The model is put in ``eval()`` mode (per-example gradients must not mix examples through
    batch statistics or dropout). Parameters outside ``param_names`` and buffers are held fixed.

    Args:
        model: the network, already holding the checkpoint's weights and on its device.
        task: defines forward, loss and measurement.
        param_names: the parameters θ, in projection order.
        vmap_chunk: examples per vectorised chunk (bounds memory); ``None`` = whole batch.
        precision: ``"fp32"``, or ``"bf16"`` to run forward and backward under bfloat16 autocast
            (gradients still come out in the parameters' dtype; projections accumulate in fp32).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        param_names: Sequence[str],
        *,
        vmap_chunk: int | None = None,
        precision: Precision = "fp32",
    ) -> None:
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
        self._fns = {q: self._vectorised(q) for q in ("loss", "measurement")}

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
        value = task.loss if quantity == "loss" else task.measurement

        def single(params: dict[str, Tensor], example: Batch) -> Tensor:
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
            return value(task.forward(self._call(params), one), one).sum()

        return vmap(grad(single), in_dims=(None, 0), chunk_size=self.vmap_chunk)

    def values(self, batch: Batch, quantity: Quantity = "loss") -> Tensor:
        """Per-example ``quantity`` ``[B]`` from one ordinary (not vectorised) forward pass.

        Autograd stays on, but the parameters θ are constants of the graph: the caller
        differentiates with respect to intermediate values (see ``factored.py``).
        """
        value = self.task.loss if quantity == "loss" else self.task.measurement
        with torch.enable_grad(), self.autocast():
            return value(self.task.forward(self._call(self.params), batch), batch)

    def __call__(
        self, batch: Batch, quantity: Quantity = "loss", names: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Per-example gradients of ``quantity``: a dict ``name → [B, *param.shape]``.

        ``names`` restricts the gradients to a subset of the parameters (the others stay fixed).
        """
        params = self.params if names is None else {n: self.params[n] for n in names}
        with self.autocast():
            return self._fns[quantity](params, batch)
