"""TRAK's ``fast_jl`` CUDA projection kernel as a projector (``pip install source-proj[cuda]``).

fast_jl draws its ±1 matrix inside the kernel from its own CUDA Philox stream keyed by the seed:
it is *not* the matrix of [`RademacherProjector`][] (numpy Philox),
so it is a distinct projector kind, ``"fast_jl"``, recorded in the store; queries of such a store
need fast_jl on a CUDA GPU too. Its outputs are scaled by 1/√k here, so that E[PᵀP] = I as
docs/concepts/source.md §4 requires (fast_jl itself returns the unnormalised ±1 projection).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from source_proj.errors import TaskError
from source_proj.projection.base import Projector, _flat_spans

_MULTIPLE = 512


def fast_jl_available() -> bool:
    """True when a CUDA device is visible and the ``fast_jl`` extension is installed."""
    return torch.cuda.is_available() and importlib.util.find_spec("fast_jl") is not None


class FastJLProjector(Projector):
    """Rademacher JL projection by the fast_jl CUDA kernel, entries ±1/√k.

    Args:
        shapes: ``(name, shape)`` of every projected parameter, in a fixed order.
        dim: k, a multiple of 512 (the kernel's tile).
        seed: a 32-bit seed of the kernel's generator.
        feature_tiles: the kernel's feature tiling (default: the GPU's multiprocessor count);
            recorded with the projection and reused when a store is queried.
    """

    def __init__(
        self, shapes: Sequence[tuple[str, Sequence[int]]], dim: int, seed: int = 0, *, feature_tiles: int | None = None
    ) -> None:
        if not torch.cuda.is_available():
            raise TaskError(
                "The 'fast_jl' projection runs only on a CUDA GPU and none is visible; use the 'rademacher' or "
                "'factored' projection on this machine."
            )
        if importlib.util.find_spec("fast_jl") is None:
            raise TaskError(
                "The 'fast_jl' projection needs TRAK's fast_jl CUDA extension; install it with "
                "`pip install source-proj[cuda]` (it compiles against your CUDA toolkit), or use 'factored'."
            )
        if dim % _MULTIPLE:
            raise TaskError(f"The 'fast_jl' projection needs a dimension that is a multiple of 512, not {dim}.")
        if not 0 <= seed < 2**32:
            raise TaskError(f"The 'fast_jl' projection needs a 32-bit seed (0 ≤ seed < 2**32), not {seed}.")
        self.spans = _flat_spans(shapes)
        self.dim = dim
        self.seed = seed
        self.feature_tiles = feature_tiles or torch.cuda.get_device_properties(0).multi_processor_count
        try:
            self.version = importlib.metadata.version("fast_jl")
        except importlib.metadata.PackageNotFoundError:
            self.version = "unknown"
        self._kernel = importlib.import_module("fast_jl")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "fast_jl",
            "dim": self.dim,
            "seed": self.seed,
            "feature_tiles": self.feature_tiles,
            "fast_jl_version": self.version,
        }

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        batch = next(iter(grads.values())).shape[0]
        flat = torch.cat([grads[name].reshape(batch, size).float() for name, _, size in self.spans], dim=1)
        tile = 8 if batch <= 8 else 16 if batch <= 16 else 32
        kernel = getattr(self._kernel, f"project_rademacher_{tile}")
        out = kernel(flat.contiguous(), self.dim, self.seed, self.feature_tiles)
        return out.float() / math.sqrt(self.dim)
