"""Exact top-k inner-product search on any torch device (the GPU query path), and index choice.

``TorchIndex`` searches row blocks of the cached feature matrix with one matmul and one
``torch.topk`` per (query batch, block) and merges the per-block winners exactly: the global
top-k of a row is always among the union of the blocks' top-k. It has the two members
``query.search`` uses of a FAISS index (``ntotal`` and ``search``), so either serves.
Memory: resident, the N × d features live on the device; streamed, only one store chunk at a
time (plus ``query_batch × block`` scores and ``Q × k`` winners).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import faiss
import numpy as np
import torch
from torch import Tensor

from .errors import TaskError

SearchBackend = Literal["auto", "faiss", "torch", "stream"]
SEARCH_BACKENDS = ("auto", "faiss", "torch", "stream")


class TorchIndex:
    """Exact maximum-inner-product search by blocked matmul + top-k on ``device``.

    Args:
        blocks: returns the feature rows as ``(first_row, float32 [rows, d])`` blocks, in order;
            called once per search.
        ntotal: number of rows N.
        dim: feature dimension d.
        device: where the products run.
        query_batch: queries per product (bounds the ``query_batch × rows`` score block).
    """

    def __init__(
        self,
        blocks: Callable[[], Iterable[tuple[int, np.ndarray | Tensor]]],
        ntotal: int,
        dim: int,
        device: torch.device | str,
        *,
        query_batch: int = 4096,
    ) -> None:
        self._blocks = blocks
        self.ntotal = ntotal
        self.d = dim
        self.device = torch.device(device)
        self.query_batch = query_batch

    @classmethod
    def resident(
        cls, features: np.ndarray | Tensor, device: torch.device | str, *, block_rows: int = 65536
    ) -> TorchIndex:
        """An index holding ``features`` ``[N, d]`` on ``device`` (copied once)."""
        held = torch.as_tensor(features, dtype=torch.float32).to(device)

        def blocks() -> Iterator[tuple[int, Tensor]]:
            for start in range(0, held.shape[0], block_rows):
                yield start, held[start : start + block_rows]

        return cls(blocks, held.shape[0], held.shape[1], device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest ⟨q, row⟩ of every query: (scores float32 ``[Q, k]`` decreasing, ids int64 ``[Q, k]``)."""
        if not 1 <= k <= self.ntotal:
            raise TaskError(f"top-k needs 1 ≤ k ≤ {self.ntotal} (the number of training rows), not {k}.")
        q = torch.as_tensor(np.ascontiguousarray(queries), dtype=torch.float32).to(self.device)
        best_scores = torch.full((q.shape[0], 0), float("-inf"), device=self.device)
        best_ids = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=self.device)
        for first, rows in self._blocks():
            rows = torch.as_tensor(rows, dtype=torch.float32).to(self.device, non_blocking=True)
            merged_scores, merged_ids = [], []
            for start in range(0, q.shape[0], self.query_batch):
                stop = start + self.query_batch
                scores = q[start:stop] @ rows.T
                top, where = scores.topk(min(k, rows.shape[0]), dim=1)
                candidates = torch.cat([best_scores[start:stop], top], dim=1)
                ids = torch.cat([best_ids[start:stop], where + first], dim=1)
                top, where = candidates.topk(min(k, candidates.shape[1]), dim=1)
                merged_scores.append(top)
                merged_ids.append(ids.gather(1, where))
            best_scores, best_ids = torch.cat(merged_scores), torch.cat(merged_ids)
        return best_scores.cpu().numpy(), best_ids.cpu().numpy()


def faiss_gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(
    features: Callable[[], np.ndarray],
    blocks: Callable[[], Iterable[tuple[int, np.ndarray]]],
    ntotal: int,
    dim: int,
    device: torch.device,
    backend: SearchBackend = "auto",
) -> faiss.Index | TorchIndex:
    """An exact inner-product index over the training features.

    ``"auto"``: FAISS on the GPU where this FAISS build has GPU support, else the torch index
    resident on a CUDA ``device``, else FAISS on the CPU. ``"faiss"``: FAISS (CPU, all features in
    memory). ``"torch"``: the torch index resident on ``device``. ``"stream"``: the torch index
    reading ``blocks`` (store chunks) at every search, so memory stays bounded by one chunk.
    """
    if backend not in SEARCH_BACKENDS:
        raise TaskError(f"Unknown search backend {backend!r}; use one of {', '.join(SEARCH_BACKENDS)}.")
    if backend == "stream":
        return TorchIndex(blocks, ntotal, dim, device)
    on_gpu = device.type == "cuda"
    if backend == "torch" or (backend == "auto" and on_gpu and not faiss_gpu_available()):
        return TorchIndex.resident(features(), device)
    index = faiss.IndexFlatIP(dim)
    index.add(np.ascontiguousarray(features(), dtype=np.float32))
    if backend == "auto" and on_gpu:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, device.index or 0, index)
        gpu_index.referenced_objects = [resources]  # the GPU index must not outlive its resources
        return gpu_index
    return index
