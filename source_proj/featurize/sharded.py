"""Sharded parameters: featurize a model larger than one device by keeping 1/W of it on each rank.

Every module that holds parameters keeps them as one flat vector cut into W equal slices; rank r
holds slice r on its device, and the module's parameters are shape-only placeholders (the ``meta``
device: using one outside the module's own forward fails loudly instead of computing with
garbage). Just before a module runs, the ranks all-gather its slices into the full tensors
(``torch.distributed.all_gather``); right after, the module drops them. Autograd would keep the
gathered weights alive until the backward pass (a linear layer saves its weight to compute its
input gradient), so saved tensors that live in a gathered buffer are packed as a reference and
gathered again when the backward pass needs them (``torch.autograd.graph.saved_tensors_hooks``), as
FSDP does. Peak memory is the rank's slices, one layer's full parameters and the activations.

The ranks process different examples (each its own row chunks) but must gather the same module at
the same moment: featurize runs them in lock step, one feature point (checkpoint) at a time, and a
rank with fewer batches of that point runs batches it discards (see ``featurize.py``). Per-example
gradients come out per example exactly as in one process: the gathered values are bit-identical to
the unsharded ones. The factored and eigen projections need no parameter gradient at all (only layer
inputs and output gradients), which is why they are the projections this mode supports; the eigen
projection's basis pass runs on every rank, over the same examples, before the store is prepared.
The ranks agree before each gather (``Ranks.agree``, one integer): a rank that fails (an example it
cannot read, an error in its forward) would otherwise leave the others waiting in a gather it never
joins; it meets them at their next agreement instead, and every rank stops with the error.

Checkpoints are loaded through ``load_state_dict`` as usual: a hook keeps the rank's slice of
every parameter (each process reads the checkpoint file on the host).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from source_proj.distributed import ranks
from source_proj.errors import TaskError

_READS_SUBMODULES = (nn.MultiheadAttention,)
"""Modules whose forward uses their submodules' parameters without calling the submodules."""


@dataclass
class _Unit:
    """The parameters one module holds first, flattened into one vector of ``padded`` entries, and every
    place (``(module, local name, index)``, tied uses included) that refers to them."""

    names: list[str]  # in the model (the first of a tied parameter's names)
    shapes: list[torch.Size]
    trainable: list[bool]  # requires_grad, kept by the placeholders (parameter selections read it)
    dtype: torch.dtype
    numel: int
    padded: int
    local: Tensor  # this rank's slice [padded / world]
    slots: list[tuple[nn.Module, str, int]]


class ShardedParameters:
    """Shard ``model``'s parameters over the ranks of the initialised process group (in place).

    Args:
        model: the network (on the host; its parameters become placeholders, its buffers move to ``device``).
        device: where this rank keeps its slices and computes.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.group = ranks()
        self.device = device
        self.units: list[_Unit] = []
        names = {id(p): n for n, p in model.named_parameters()}
        owner: dict[int, tuple[int, int]] = {}  # id(parameter) → (unit, index in the unit)
        for module in model.modules():
            held = list(module.named_parameters(recurse=False))
            own = [p for _, p in held if id(p) not in owner]
            if own:
                owner.update({id(p): (len(self.units), i) for i, p in enumerate(own)})
                self.units.append(self._unit([names[id(p)] for p in own], own))
            for local, parameter in held:
                unit, index = owner[id(parameter)]
                self.units[unit].slots.append((module, local, index))
        for module in model.modules():
            # A module that reads its submodules' weights in its own forward gathers them too (never called, their
            # hooks never run): nn.MultiheadAttention uses its out_proj's as tensors.
            read = module.parameters(recurse=isinstance(module, _READS_SUBMODULES))
            needed = sorted({owner[id(p)][0] for p in read})
            if needed:
                module.register_forward_pre_hook(self._pre(needed))
                module.register_forward_hook(self._post(needed))
        for index in range(len(self.units)):
            self._drop(index)
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
        self._gathered: dict[int, int] = {}  # storage of a gathered buffer → its unit
        model.register_load_state_dict_pre_hook(self._load)
        # load_state_dict then copies into the placeholders (a no-op), warning about each: that is the intent.
        warnings.filterwarnings("ignore", message=r"for .*: copying from a non-meta parameter in the checkpoint")

    def _unit(self, names: list[str], own: list[nn.Parameter]) -> _Unit:
        dtypes = {p.dtype for p in own}
        if len(dtypes) != 1:
            raise TaskError(
                f"{names[0]} shares its module with parameters of other dtypes ({sorted(map(str, dtypes))}); sharded "
                "parameters need one dtype per module (convert the model with .to(dtype) first)."
            )
        numel = sum(p.numel() for p in own)
        padded = math.ceil(numel / self.world) * self.world
        flat = torch.nn.functional.pad(torch.cat([p.detach().reshape(-1) for p in own]), (0, padded - numel))
        size = padded // self.world
        local = flat[self.rank * size : (self.rank + 1) * size].to(self.device).clone()
        shapes, trainable = [p.shape for p in own], [p.requires_grad for p in own]
        return _Unit(names, shapes, trainable, own[0].dtype, numel, padded, local, [])

    def gather(self, index: int) -> Tensor:
        """The full flat parameters of unit ``index`` (a collective: every rank calls it in the same order).
        The ranks agree first: a rank that failed since the last gather stops the others here (``Ranks.agree``)."""
        self.group.agree(None)
        unit = self.units[index]
        parts = [torch.empty_like(unit.local) for _ in range(self.world)]
        dist.all_gather(parts, unit.local)
        return torch.cat(parts)[: unit.numel]

    def _install(self, index: int, flat: Tensor) -> None:
        unit = self.units[index]
        offsets = [0]
        for shape in unit.shapes:
            offsets.append(offsets[-1] + math.prod(shape))
        for module, local, i in unit.slots:
            module._parameters[local] = flat[offsets[i] : offsets[i + 1]].view(unit.shapes[i])  # type: ignore[assignment]

    def _drop(self, index: int) -> None:
        unit = self.units[index]
        for module, local, i in unit.slots:
            module._parameters[local] = nn.Parameter(
                torch.empty(unit.shapes[i], dtype=unit.dtype, device="meta"), requires_grad=unit.trainable[i]
            )

    def _pre(self, indices: list[int]) -> Any:
        def gather_before(module: nn.Module, args: Any) -> None:
            for index in indices:
                flat = self.gather(index)
                self._gathered[flat.untyped_storage().data_ptr()] = index
                self._install(index, flat)

        return gather_before

    def _post(self, indices: list[int]) -> Any:
        def drop_after(module: nn.Module, args: Any, output: Any) -> None:
            for index in indices:
                self._drop(index)
            self._gathered = {ptr: i for ptr, i in self._gathered.items() if i not in indices}

        return drop_after

    @contextmanager
    def saving(self) -> Iterator[None]:
        """Within this block, tensors autograd saves from a gathered buffer are gathered again in backward."""

        def pack(tensor: Tensor) -> Any:
            if tensor.device.type == "meta":
                return tensor
            index = self._gathered.get(tensor.untyped_storage().data_ptr())
            if index is None:
                return tensor
            return (index, tuple(tensor.shape), tensor.stride(), tensor.storage_offset())

        def unpack(packed: Any) -> Tensor:
            if isinstance(packed, Tensor):
                return packed
            index, shape, stride, offset = packed
            return self.gather(index).as_strided(shape, stride, offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def _load(self, module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        """Keep this rank's slice of every parameter of a state dict being loaded (a mismatch is left to
        ``load_state_dict`` to report)."""
        for unit in self.units:
            keys = [prefix + n for n in unit.names]
            shapes = zip(keys, unit.shapes, strict=True)
            if not all(k in state and tuple(state[k].shape) == tuple(shape) for k, shape in shapes):
                continue
            flat = torch.cat([state[k].detach().reshape(-1).to(unit.dtype) for k in keys])
            flat = torch.nn.functional.pad(flat, (0, unit.padded - unit.numel))
            size = unit.padded // self.world
            unit.local.copy_(flat[self.rank * size : (self.rank + 1) * size])
