"""Exact top-k inner-product search on any torch device (the GPU query path), and index choice.

``TorchIndex`` searches row blocks of the cached feature matrix with one matmul and one
``torch.topk`` per (query batch, block) and merges the per-block winners exactly: the global
top-k of a row is always among the union of the blocks' top-k. It has the two members
``query.search`` uses of a FAISS index (``ntotal`` and ``search``), so either serves.
Memory: resident, the N × d features live on the device, or split into shards over several
devices (``TorchIndex.sharded``) when they do not fit one; streamed, only one store chunk at a
time (plus ``query_batch × block`` scores and ``Q × k`` winners), scored on one or several devices.
``faiss_shards`` is the FAISS counterpart (``IndexShards`` of GPU flat indexes).

**FAISS is optional** (``pip install "source-proj[faiss]"``) and imported only where an index needs it
(``require_faiss``): without it ``"auto"`` searches with the torch index (the same exact top-k), and the ``"faiss"``
and ``"ivf"`` backends are refused in one sentence naming the extra.

**Approximate search** (``"ivf"``, ``IVFArguments``): a FAISS inverted-file index clusters the
rows into ``nlist`` cells (k-means on a sample) and each query scans only the ``nprobe`` cells whose
centroids have the largest inner product with it, optionally holding the rows in float16
(``IndexIVFScalarQuantizer``, half the memory). It misses a true top-k row when that row sits in a
cell the query does not scan: its recall@k against the exact search is measured in
``benchmarks/query_scale.py`` (BENCHMARKS.md), and rises with ``nprobe``. The torch index can hold its
rows in half precision too (``dtype``): exact search over rounded rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from source_proj.errors import TaskError, check_choice, check_whole

if TYPE_CHECKING:
    import faiss

SearchBackend = Literal["auto", "faiss", "torch", "stream", "ivf"]
SEARCH_BACKENDS = ("auto", "faiss", "torch", "stream", "ivf")


_WITHOUT_FAISS = {
    "faiss": ("needs FAISS", "search with the torch backend (the same exact top-k)"),
    "ivf": (
        "is FAISS's approximate inverted-file index and needs FAISS",
        "search exactly with the auto, torch or stream backend",
    ),
}
"""What each FAISS backend is, and what to use instead, in the sentence refusing it where FAISS is missing."""


def require_faiss(backend: Literal["faiss", "ivf"] = "faiss") -> ModuleType:
    """The ``faiss`` module, imported on first use (the optional ``faiss`` extra); where it cannot be imported, the
    ``backend`` that needs it is refused in one sentence naming the extra."""
    try:
        import faiss
    except ImportError as err:
        needs, instead = _WITHOUT_FAISS[backend]
        raise TaskError(
            f"The {backend} search backend {needs}, which cannot be imported ({err}); install it with "
            f'`pip install "source-proj[faiss]"`, or {instead}.'
        ) from err
    return faiss


def faiss_available() -> bool:
    """True when FAISS (the optional ``faiss`` extra) can be imported."""
    try:
        require_faiss()
    except TaskError:
        return False
    return True


def check_search(backend: object, devices: Sequence[object] | None, ivf: object = None) -> None:
    """Refuse an unknown search backend, devices to shard one that runs on a single device, approximate-search
    settings ``ivf`` (``search_ivf``; ``None``: none given) that are not ``IVFArguments``, or not its defaults where
    the backend is not ``"ivf"`` (they would be ignored), or a FAISS backend (``"faiss"``, ``"ivf"``) where FAISS is
    not installed, before any work."""
    if backend not in SEARCH_BACKENDS:
        raise TaskError(f"Unknown search backend {backend!r}; use one of {', '.join(SEARCH_BACKENDS)}.")
    if ivf is not None and not isinstance(ivf, IVFArguments):
        raise TaskError(f"search_ivf is a {type(ivf).__name__}; pass sp.IVFArguments(nlist=..., nprobe=...).")
    if ivf is not None and backend != "ivf" and ivf != IVFArguments():
        raise TaskError(
            f"search_ivf sets the approximate (ivf) search, which search_backend={backend!r} does not use, so it "
            "would be ignored; pass search_backend='ivf', or drop search_ivf."
        )
    if devices and backend in ("faiss", "ivf"):
        raise TaskError(
            f"search_devices shard the torch, stream and auto (GPU) indexes; the {backend} backend runs on "
            "one device, so drop search_devices or use search_backend='torch'."
        )
    if backend in ("faiss", "ivf"):
        require_faiss(backend)


def rows_bar(desc: str, total: int, progress: bool) -> tqdm:
    """A progress bar over ``total`` feature rows, shown once the work takes longer than two seconds."""
    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, delay=2.0, disable=not progress)


@dataclass(frozen=True)
class IVFArguments:
    """Approximate top-k search by a FAISS inverted-file (IVF) index (see the module docstring).

    Attributes:
        nlist: cells the rows are clustered into; ``None``: 4·√N (FAISS's rule of thumb), at most N/39
            (k-means needs about 39 training rows per cell).
        nprobe: cells scanned per query: recall and time both rise with it.
        fp16: hold the rows in float16 (half the memory; each score carries a relative rounding error of
            about 1e-3), else float32.
        train_rows: rows sampled (seeded, without replacement) to train the clustering; ``None``: 64 per cell.
        seed: seed of that sample.
    """

    nlist: int | None = None
    nprobe: int = 32
    fp16: bool = False
    train_rows: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("nlist", "nprobe", "train_rows"):
            if getattr(self, name) is not None:
                check_whole(f"IVFArguments.{name}", getattr(self, name))
        check_whole("IVFArguments.seed", self.seed, 0)
        check_choice("IVFArguments.fp16", self.fp16, (True, False))

    def cells(self, ntotal: int) -> int:
        """The number of cells for ``ntotal`` rows; refuses more cells than rows, or than training rows (k-means
        needs one per cell)."""
        if self.nlist is not None and not 1 <= self.nlist <= ntotal:
            raise TaskError(f"An IVF index of {ntotal} rows needs 1 ≤ nlist ≤ {ntotal}, not {self.nlist}.")
        cells = self.nlist if self.nlist is not None else max(1, min(ntotal // 39, int(4 * math.sqrt(ntotal))))
        if self.train_rows is not None and self.train_rows < cells:
            raise TaskError(
                f"IVFArguments.train_rows {self.train_rows} is fewer than the {cells} cells its k-means trains; pass "
                f"train_rows ≥ {cells} (default: 64 per cell), or fewer cells (nlist)."
            )
        return cells


HOST_QUERY_BATCH = 256
"""``TorchIndex``'s queries per product on the CPU: a 65,536-row block's scores take 64 MB, not 1 GiB, at the same
speed."""
DEVICE_QUERY_BATCH = 4096
"""``TorchIndex``'s queries per product on a GPU."""


class TorchIndex:
    """Exact maximum-inner-product search by blocked matmul + top-k on one or several devices.

    Args:
        blocks: returns the feature rows as ``(first_row, float32 [rows, d])`` blocks, in order;
            called once per search.
        ntotal: number of rows N.
        dim: feature dimension d.
        device: where the products run: a device, or several. A block already on one of them is
            scored there; another block (a host chunk read from the store) is sent to the devices in
            turn. The per-block winners are merged exactly on the first device.
        query_batch: queries per product (bounds the ``query_batch × rows`` score block); default 4,096 on a GPU,
            256 on the CPU (a 65,536-row block's scores then take 64 MB, not 1 GiB, at the same speed there).
        dtype: the precision of the products: ``torch.float32`` (exact), or ``torch.float16`` /
            ``torch.bfloat16`` with rows held rounded to it (half the memory; its speed on a GPU is unmeasured; the
            order of rows whose scores differ by less than the rounding may swap). float16 searches unit queries
            (scores scaled back in float32) and refuses rows beyond its range (65504).
        progress: show a progress bar over the rows while a search takes longer than two seconds.
    """

    def __init__(
        self,
        blocks: Callable[[], Iterable[tuple[int, np.ndarray | Tensor]]],
        ntotal: int,
        dim: int,
        device: torch.device | str | Sequence[torch.device | str],
        *,
        query_batch: int | None = None,
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
    ) -> None:
        self._blocks = blocks
        self.ntotal = ntotal
        self.d = dim
        self.devices = [torch.device(d) for d in ([device] if isinstance(device, (str, torch.device)) else device)]
        self.device = self.devices[0]
        default = HOST_QUERY_BATCH if self.device.type == "cpu" else DEVICE_QUERY_BATCH
        self.query_batch = query_batch if query_batch is not None else default
        self.dtype = dtype
        self.progress = progress

    @classmethod
    def resident(
        cls,
        features: np.ndarray | Tensor,
        device: torch.device | str,
        *,
        block_rows: int = 65536,
        dtype: torch.dtype = torch.float32,
    ) -> TorchIndex:
        """An index holding ``features`` ``[N, d]`` on ``device`` (copied once, in ``dtype``)."""
        rows, dim = features.shape
        return cls.sharded(lambda: [(0, features)], rows, dim, [device], block_rows=block_rows, dtype=dtype)

    @classmethod
    def sharded(
        cls,
        blocks: Callable[[], Iterable[tuple[int, np.ndarray | Tensor]]],
        ntotal: int,
        dim: int,
        devices: Sequence[torch.device | str],
        *,
        block_rows: int = 65536,
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
    ) -> TorchIndex:
        """An index whose rows are split into ``len(devices)`` contiguous shards, one held on each
        device (in ``dtype``), filled from ``blocks`` read once (the host holds one block at a time):
        for feature matrices larger than one GPU. Searches score every shard on its own device. ``progress``: bars
        over the rows while filling and searching take longer than two seconds."""
        places = [torch.device(d) for d in devices]
        bounds = [i * ntotal // len(places) for i in range(len(places) + 1)]
        shards = [
            torch.empty((hi - lo, dim), dtype=dtype, device=place)
            for lo, hi, place in zip(bounds, bounds[1:], places, strict=False)
        ]
        with rows_bar("top-k index", ntotal, progress) as bar:
            for first, rows in blocks():
                rows = torch.as_tensor(rows, dtype=torch.float32)
                for shard, lo, hi in zip(shards, bounds, bounds[1:], strict=False):
                    start, stop = max(first, lo), min(first + rows.shape[0], hi)
                    if start < stop:
                        shard[start - lo : stop - lo] = rows[start - first : stop - first].to(shard.device)
                bar.update(rows.shape[0])

        def held() -> Iterator[tuple[int, Tensor]]:
            for shard, lo in zip(shards, bounds, strict=False):
                for start in range(0, shard.shape[0], block_rows):
                    yield lo + start, shard[start : start + block_rows]

        return cls(held, ntotal, dim, places, dtype=dtype, progress=progress)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest ⟨q, row⟩ of every query: (scores float32 ``[Q, k]`` decreasing, ids int64 ``[Q, k]``)."""
        if not 1 <= k <= self.ntotal:
            raise TaskError(f"top-k needs 1 ≤ k ≤ {self.ntotal} (the number of training rows), not {k}.")
        q = torch.as_tensor(np.ascontiguousarray(queries), dtype=torch.float32)
        norms = torch.ones(q.shape[0], 1)
        if self.dtype == torch.float16:  # its range ends at 65504: unit queries keep each score within |row|
            norms = q.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        q_on = {place: (q / norms).to(place, self.dtype) for place in self.devices}
        best_scores = torch.full((q.shape[0], 0), float("-inf"), device=self.device)
        best_ids = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=self.device)
        bar = rows_bar("top-k search", self.ntotal, self.progress)
        for index, (first, rows) in enumerate(self._blocks()):
            rows = torch.as_tensor(rows)
            place = rows.device if rows.device in q_on else self.devices[index % len(self.devices)]
            rows = rows.to(place, self.dtype, non_blocking=True)
            merged_scores, merged_ids = [], []
            for start in range(0, q.shape[0], self.query_batch):
                stop = start + self.query_batch
                scores = (q_on[place][start:stop] @ rows.T).float()
                if self.dtype == torch.float16 and not bool(torch.isfinite(scores).all()):
                    raise TaskError(
                        "The torch index's float16 rows overflow (a row or its length beyond 65504); hold them in "
                        "bfloat16 or float32 (dtype=)."
                    )
                top, where = scores.topk(min(k, rows.shape[0]), dim=1)
                candidates = torch.cat([best_scores[start:stop], top.to(self.device)], dim=1)
                ids = torch.cat([best_ids[start:stop], where.to(self.device) + first], dim=1)
                top, where = candidates.topk(min(k, candidates.shape[1]), dim=1)
                merged_scores.append(top)
                merged_ids.append(ids.gather(1, where))
            best_scores, best_ids = torch.cat(merged_scores), torch.cat(merged_ids)
            bar.update(rows.shape[0])
        bar.close()
        return (best_scores.cpu() * norms).numpy(), best_ids.cpu().numpy()


def faiss_gpu_available() -> bool:
    """True when FAISS is installed, this build has GPU support and it sees a GPU."""
    try:
        faiss = require_faiss()
    except TaskError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def search_devices(device: torch.device, nbytes: int) -> list[torch.device]:
    """Where a resident index of ``nbytes`` goes: ``device``, or every visible GPU when the features
    do not fit in 80 % of ``device``'s free memory and there are several."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return [device]
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes <= 0.8 * free:
        return [device]
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def faiss_shards(
    blocks: Callable[[], Iterable[tuple[int, np.ndarray]]],
    ntotal: int,
    dim: int,
    gpus: Sequence[int] | None = None,
    *,
    progress: bool = False,
) -> faiss.Index:
    """One exact FAISS inner-product index over ``ntotal`` rows split into contiguous shards
    (``faiss.IndexShards``, searched in parallel, ids continuing from shard to shard), filled from
    ``blocks`` read once: one shard per GPU of ``gpus`` (FAISS with GPU support), or ``gpus=None``:
    two CPU shards (the same code, testable without a GPU)."""
    faiss = require_faiss()
    count = len(gpus) if gpus else 2
    bounds = [i * ntotal // count for i in range(count + 1)]
    index = faiss.IndexShards(dim, True, True)
    parts: list[faiss.Index] = []
    kept: list[object] = []
    for i in range(count):
        if gpus:
            resources = faiss.StandardGpuResources()
            config = faiss.GpuIndexFlatConfig()
            config.device = int(gpus[i])
            parts.append(faiss.GpuIndexFlatIP(resources, dim, config))
            kept.append(resources)
        else:
            parts.append(faiss.IndexFlatIP(dim))
    with rows_bar("top-k index", ntotal, progress) as bar:
        for first, rows in blocks():
            for part, lo, hi in zip(parts, bounds, bounds[1:], strict=False):
                start, stop = max(first, lo), min(first + rows.shape[0], hi)
                if start < stop:
                    part.add(np.ascontiguousarray(rows[start - first : stop - first], dtype=np.float32))
            bar.update(rows.shape[0])
    for part in parts:
        index.add_shard(part)
    index.referenced_objects = parts + kept  # the shards (and GPU resources) must live as long as the index
    return index


def ivf_index(
    blocks: Callable[[], Iterable[tuple[int, np.ndarray]]],
    ntotal: int,
    dim: int,
    args: IVFArguments = IVFArguments(),
    gpu: int | None = None,
    *,
    progress: bool = False,
) -> faiss.Index:
    """An approximate inner-product index (FAISS IVF, see ``IVFArguments``) over ``ntotal`` rows
    from ``blocks``, read twice (the training sample, then every row), one block in memory at a time;
    on GPU ``gpu`` where this FAISS build has GPU support, else on the CPU. ``progress``: a bar over both
    reads (and naming the k-means between them) once they take longer than two seconds."""
    faiss = require_faiss("ivf")
    cells = args.cells(ntotal)
    wanted = min(ntotal, args.train_rows or 64 * cells)
    picked = np.sort(np.random.default_rng(args.seed).choice(ntotal, size=wanted, replace=False))
    sample, added = [], 0
    bar = rows_bar("IVF index: sample", 2 * ntotal, progress)
    for first, rows in blocks():
        inside = picked[(picked >= first) & (picked < first + rows.shape[0])] - first
        sample.append(np.asarray(rows, dtype=np.float32)[inside])
        bar.update(rows.shape[0])
    quantizer = faiss.IndexFlatIP(dim)
    if args.fp16:
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, cells, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
    kept: list[object] = [quantizer]
    if gpu is not None:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, gpu, index)
        kept.append(resources)
    bar.set_description(f"IVF index: k-means of {wanted} rows into {cells} cells")
    index.train(np.ascontiguousarray(np.concatenate(sample)))
    bar.set_description("IVF index: add")
    for first, rows in blocks():
        if first != added:
            raise TaskError(f"The feature blocks must come in row order; got row {first} after {added} rows.")
        index.add(np.ascontiguousarray(rows, dtype=np.float32))  # ids continue from row to row
        added += rows.shape[0]
        bar.update(rows.shape[0])
    bar.close()
    index.nprobe = min(args.nprobe, cells)
    index.referenced_objects = kept  # the quantizer (and GPU resources) must live as long as the index
    return index


def build_index(
    blocks: Callable[[], Iterable[tuple[int, np.ndarray]]],
    ntotal: int,
    dim: int,
    device: torch.device,
    backend: SearchBackend = "auto",
    devices: Sequence[torch.device | str] | None = None,
    ivf: IVFArguments = IVFArguments(),
    *,
    progress: bool = False,
) -> faiss.Index | TorchIndex:
    """An inner-product index over the training features: exact, or approximate with ``"ivf"``.

    ``"auto"``: FAISS on the GPU where this FAISS build has GPU support, else the torch index
    resident on a CUDA ``device``; on the CPU, FAISS where it is installed (the optional ``faiss`` extra), else
    the torch index (the same exact search, all features in memory too). ``"faiss"``: FAISS (CPU, all features in
    memory). ``"torch"``: the torch index resident on ``device``. ``"stream"``: the torch index
    reading ``blocks`` (store chunks) at every search, so memory stays bounded by one chunk.
    ``devices``: several devices to shard the GPU index over (torch or FAISS-GPU: contiguous
    shards filled from ``blocks``; ``stream``: chunks scored on the devices in turn); default
    ``device``, or every GPU when the features do not fit on ``device`` (``search_devices``).
    ``"ivf"``: FAISS's approximate inverted-file index with ``ivf``'s settings (``ivf_index``), on
    ``device``'s GPU where this FAISS build has GPU support. ``"faiss"`` and ``"ivf"`` need FAISS
    (``pip install "source-proj[faiss]"``) and are refused in one sentence without it.

    ``blocks`` returns the feature rows as ``(first_row, float32 [rows, d])`` in row order (store chunks);
    ``progress``: bars over the rows while building (and, for the torch index, searching) take longer than two
    seconds.
    """
    if backend not in SEARCH_BACKENDS:
        raise TaskError(f"Unknown search backend {backend!r}; use one of {', '.join(SEARCH_BACKENDS)}.")
    if backend == "ivf":
        gpu = (device.index or 0) if device.type == "cuda" and faiss_gpu_available() else None
        return ivf_index(blocks, ntotal, dim, ivf, gpu, progress=progress)
    places = [torch.device(d) for d in devices] if devices else search_devices(device, ntotal * dim * 4)
    if backend == "stream":
        return TorchIndex(blocks, ntotal, dim, places, progress=progress)
    on_gpu = device.type == "cuda"
    if backend == "torch" or (backend == "auto" and not (faiss_gpu_available() if on_gpu else faiss_available())):
        return TorchIndex.sharded(blocks, ntotal, dim, places, progress=progress)
    if backend == "auto" and on_gpu and len(places) > 1:
        return faiss_shards(blocks, ntotal, dim, [p.index or 0 for p in places], progress=progress)
    faiss = require_faiss()
    index = faiss.IndexFlatIP(dim)
    with rows_bar("top-k index", ntotal, progress) as bar:
        for _, rows in blocks():  # ids continue from block to block
            index.add(np.ascontiguousarray(rows, dtype=np.float32))
            bar.update(rows.shape[0])
    if backend == "auto" and on_gpu:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, places[0].index or 0, index)
        gpu_index.referenced_objects = [resources]  # the GPU index must not outlive its resources
        return gpu_index
    return index
