"""Random projections P ∈ R^{k×p} of per-example gradients (docs/concepts/source.md §4).

The Rademacher projection has i.i.d. entries ±1/√k, so E[PᵀP] = I_p and inner products are
preserved in expectation. P is never held whole: it is cut into fixed blocks of ``block_rows``
parameters (rows of Pᵀ), and block ``b`` is drawn from a counter-based generator (numpy's
Philox) keyed by ``(seed, b)``. Any block can therefore be regenerated on its own, on any
machine, in any order, and the same seed gives bit-identical projections on CPU and GPU (the
signs are drawn on the CPU, then moved). A bounded cache keeps recently used blocks on the
compute device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from source_proj.errors import TaskError
from source_proj.projection.transform import GradientTransform, scaling_transform

if TYPE_CHECKING:
    from source_proj.tasks.gradients import PerExampleGradients, Quantity
    from source_proj.tasks.task import Batch

_GENERATOR_ID = "numpy-philox-4x64-v1"

def rademacher_signs(seed: int, block: int, rows: int, dim: int) -> np.ndarray:
    """±1 signs as int8 ``[rows, dim]`` from numpy's Philox keyed by ``(seed, block)``.

    The little-endian bits of ``ceil(rows·dim / 64)`` raw 64-bit words, in row-major order, 1 → +1
    and 0 → −1. Every stored projection is defined by this function: never change it.
    """
    bitgen = np.random.Philox(key=np.array([seed, block], dtype=np.uint64))
    words = bitgen.random_raw(-(-rows * dim // 64))
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: rows * dim]
    return (bits.astype(np.int8) * 2 - 1).reshape(rows, dim)


class Projector(ABC):
    """Maps per-example gradients (a dict of ``[B, *param_shape]`` tensors) to ``[B, k]``."""

    dim: int

    @abstractmethod
    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        """Project a batch of per-example gradients; returns float32 ``[B, k]``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable identity; two projectors with equal descriptions are the same map."""

    def project_batch(
        self,
        grads_fn: PerExampleGradients,
        batch: Batch,
        quantity: Quantity = "loss",
        *,
        transform: GradientTransform | None = None,
    ) -> Tensor:
        """P T(∇quantity(z; θ)) for every example z of a batch: float32 ``[B, k]``.

        ``transform`` (``transform.py``) is a linear map applied to every per-example gradient
        before projection (Adam's D^{-1/2}, docs/concepts/source.md §6: build it with ``scaling``); ``None``
        is the identity. This default materialises the per-example gradients; projectors that need
        not (the factored one) override it.
        """
        grads = grads_fn(batch, quantity)
        return self.project(grads if transform is None else transform.apply(grads))

    def scaling(self, scale: Mapping[str, Tensor]) -> GradientTransform:
        """An elementwise gradient scaling (Adam's D^{-1/2}, ``name → multiplier`` of the parameter's
        shape) as the transform this projection applies: exactly, on materialised gradients."""
        return scaling_transform(scale)


def _flat_spans(shapes: Sequence[tuple[str, Sequence[int]]]) -> list[tuple[str, int, int]]:
    spans, offset = [], 0
    for name, shape in shapes:
        size = math.prod(shape)
        spans.append((name, offset, size))
        offset += size
    return spans


class RademacherProjector(Projector):
    """Normalised Rademacher JL projection generated block-wise from a seed.

    Args:
        shapes: ``(name, shape)`` of every projected parameter, in a fixed order; the order
            defines the row index of each coordinate.
        dim: projection dimension k.
        seed: the projection's seed; every checkpoint, model and query must use the same one.
        block_rows: parameters per generated block (part of the projection's identity).
        cache_bytes: at most this many bytes of generated blocks kept on the device.
        allow_wide: accept ``dim`` above the number of parameters (the factored projection's
            dense part for the few parameters it cannot factor, projected into its k coordinates).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[str, Sequence[int]]],
        dim: int,
        seed: int = 0,
        *,
        block_rows: int = 4096,
        cache_bytes: int = 512 * 2**20,
        allow_wide: bool = False,
    ) -> None:
        self.spans = _flat_spans(shapes)
        self.num_params = sum(size for _, _, size in self.spans)
        if dim < 1:
            raise TaskError(f"The projection dimension must be at least 1, not {dim}.")
        if dim > self.num_params and not allow_wide:
            raise TaskError(
                f"The projection dimension {dim} is larger than the {self.num_params} selected "
                f"parameters; use a dimension of at most {self.num_params} or the exact "
                "'identity' projection."
            )
        if not 0 <= seed < 2**63:
            raise TaskError(f"The projection seed must be a non-negative 63-bit integer, not {seed}.")
        self.dim = dim
        self.seed = seed
        self.block_rows = block_rows
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[int, str], Tensor] = OrderedDict()
        self._cached_bytes = 0

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "rademacher",
            "dim": self.dim,
            "seed": self.seed,
            "block_rows": self.block_rows,
            "generator": _GENERATOR_ID,
        }

    def redraws_every_batch(self) -> bool:
        """Whether the whole float32 matrix (p × k) is larger than the block cache, so that every batch draws
        its signs again (on a CPU that dominates featurize for large models)."""
        return self.num_params * self.dim * 4 > self.cache_bytes

    def signs(self, block: int) -> np.ndarray:
        """The ±1 signs of block ``block`` as int8 ``[rows, k]`` (rows of Pᵀ, before 1/√k)."""
        rows = min(self.block_rows, self.num_params - block * self.block_rows)
        if rows <= 0:
            raise IndexError(f"block {block} is past the last parameter")
        return rademacher_signs(self.seed, block, rows, self.dim)

    def block(self, block: int, device: torch.device | str = "cpu") -> Tensor:
        """Block ``block`` of Pᵀ as float32 ``[rows, k]`` with entries ±1/√k, on ``device``."""
        device = torch.device(device)
        key = (block, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        values = torch.from_numpy(self.signs(block)).to(device=device, dtype=torch.float32)
        values.mul_(1.0 / math.sqrt(self.dim))
        nbytes = values.numel() * values.element_size()
        if nbytes <= self.cache_bytes:
            while self._cached_bytes + nbytes > self.cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.numel() * evicted.element_size()
            self._cache[key] = values
            self._cached_bytes += nbytes
        return values

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        first = next(iter(grads.values()))
        batch, device = first.shape[0], first.device
        out = torch.zeros(batch, self.dim, dtype=torch.float32, device=device)
        for name, offset, size in self.spans:
            flat = grads[name].reshape(batch, size).float()
            start = offset
            while start < offset + size:
                b = start // self.block_rows
                block_start = b * self.block_rows
                stop = min(offset + size, block_start + self.block_rows)
                rows = self.block(b, device)[start - block_start : stop - block_start]
                out.addmm_(flat[:, start - offset : stop - offset], rows)
                start = stop
        return out

    def dense(self) -> Tensor:
        """The whole matrix P as float32 ``[k, p]``: for tests and tiny models only."""
        blocks = [self.block(b) for b in range(-(-self.num_params // self.block_rows))]
        return torch.cat(blocks, dim=0).T.contiguous()


class IdentityProjector(Projector):
    """No projection (k = p): exact attribution for small models and for the test oracles."""

    def __init__(self, shapes: Sequence[tuple[str, Sequence[int]]]) -> None:
        self.spans = _flat_spans(shapes)
        self.dim = sum(size for _, _, size in self.spans)

    def describe(self) -> dict[str, Any]:
        return {"kind": "identity", "dim": self.dim}

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        batch = next(iter(grads.values())).shape[0]
        return torch.cat([grads[name].reshape(batch, size).float() for name, _, size in self.spans], dim=1)


