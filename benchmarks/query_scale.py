"""Top-50 helpful + harmful for Q queries against N cached features of dimension k; prints a table.

    python benchmarks/query_scale.py                                  # N=1,000,000, k=4096, Q=10,000 (GPU)
    python benchmarks/query_scale.py --n 100000 --dim 256 --queries 1000 --backends torch,faiss   # CPU
    python benchmarks/query_scale.py --n 200000 --dim 256 --queries 2000 --data clustered \
        --backends torch,ivf,torch-bf16 --nprobe 8,32                 # approximate search: recall and speed-up

Features and queries are standard normal (``--data gaussian``, never zeros) or drawn around 1,000
random centres (``--data clustered``: the structure real feature stores have and an inverted-file
index exploits), made on the device. Backends: ``torch`` (``TorchIndex`` with the features resident
on the device: blocked matmul + top-k, exact merge), ``torch-bf16`` / ``torch-fp16`` (the same with
rows held in half precision), ``faiss`` (FAISS flat inner product on the CPU, or on the GPU where
FAISS has GPU support), ``stream`` (``TorchIndex`` reading host blocks one at a time: memory bounded
by a block), ``ivf`` (FAISS inverted file, one row per ``--nprobe`` value; build time, i.e. k-means
training and adding, reported apart). Recall@k of every backend is measured against the first
exact one, over helpful and harmful ids. On CUDA each backend is warmed up once, then timed
``--repeats`` times with CUDA events (median); peak GPU memory is ``torch.cuda.max_memory_allocated``.
``--check`` compares the torch index's ids with a float64 brute force on the first 20 queries.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import devices
import numpy as np
import torch

from source_proj.errors import TaskError
from source_proj.query.attributor import StageRows, search
from source_proj.query.topk import IVFArguments, TorchIndex, build_index, faiss_gpu_available, require_faiss


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def features(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """N rows (made in blocks, in ``dtype``) and the queries, float32 on the host."""
    g = torch.Generator(device=device).manual_seed(0)
    centres = 2 * torch.randn(1000, args.dim, generator=g, device=device) if args.data == "clustered" else None

    def draw(count: int) -> torch.Tensor:
        rows = torch.randn(count, args.dim, generator=g, device=device)
        if centres is not None:
            rows += centres[torch.randint(0, 1000, (count,), generator=g, device=device)]
        return rows

    feats = torch.empty(args.n, args.dim, dtype=dtype, device=device)
    for start in range(0, args.n, 1 << 20):
        feats[start : start + (1 << 20)] = draw(min(1 << 20, args.n - start)).to(dtype)
    return feats, draw(args.queries).cpu().numpy()


def recall(result, reference) -> float:
    """Mean fraction of the reference's top-k ids found, over helpful and harmful lists."""
    found = [
        len(set(a) & set(b)) / len(b)
        for got, want in ((result.helpful_ids, reference.helpful_ids), (result.harmful_ids, reference.harmful_ids))
        for a, b in zip(got, want, strict=True)
    ]
    return float(np.mean(found))


BACKENDS = ("torch", "torch-bf16", "torch-fp16", "stream", "faiss", "ivf")
"""What ``--backends`` takes: the torch index resident (in fp32 or half precision) or streamed from host blocks,
FAISS's exact flat index, FAISS's IVF."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--backends", default="torch,faiss")
    parser.add_argument("--data", choices=("gaussian", "clustered"), default="gaussian")
    parser.add_argument("--nlist", type=int, default=None, help="ivf: cells (default 4·√N)")
    parser.add_argument("--nprobe", default="32", help="ivf: cells scanned per query, comma-separated values")
    parser.add_argument("--ivf-fp16", action="store_true", help="ivf: rows held in float16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-rows", type=int, default=65536)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend {unknown[0]!r} in --backends; choose from {', '.join(BACKENDS)}")
    torch.set_num_threads(args.threads)
    device = devices.device(args.device)
    for backend in sorted({"faiss", "ivf"} & set(backends)):  # the optional extra, before any feature is made
        try:
            require_faiss(backend).omp_set_num_threads(args.threads)
        except TaskError as err:
            raise SystemExit(str(err)) from err
    half = {"torch-bf16": torch.bfloat16, "torch-fp16": torch.float16}
    only_half = all(b in half for b in backends)  # 10⁷ × 4096 rows fit one H200 only in half precision
    feats, queries = features(args, device, half[backends[0]] if only_half else torch.float32)
    rows = [StageRows("main", 0, args.n)]
    table = []
    reference = None
    for backend in backends:
        build = 0.0
        runs = [(backend, None)]
        if backend == "torch":
            index = TorchIndex.resident(feats, device, block_rows=args.block_rows)
        elif backend in half:
            index = TorchIndex.resident(feats, device, block_rows=args.block_rows, dtype=half[backend])
        elif backend == "stream":
            host = feats.cpu()

            def blocks(host=host):
                for start in range(0, args.n, args.block_rows):
                    yield start, host[start : start + args.block_rows]

            index = TorchIndex(blocks, args.n, args.dim, device)
        elif backend == "ivf":
            host = feats.float().cpu().numpy()
            t0 = time.perf_counter()
            index = build_index(
                lambda host=host: ((s, host[s : s + args.block_rows]) for s in range(0, args.n, args.block_rows)),
                args.n, args.dim, device, "ivf", ivf=IVFArguments(nlist=args.nlist, fp16=args.ivf_fp16),
            )  # fmt: skip
            build = time.perf_counter() - t0
            runs = [(f"ivf nprobe={p}{' fp16' if args.ivf_fp16 else ''}", int(p)) for p in args.nprobe.split(",")]
        else:  # "faiss"
            faiss = require_faiss()
            index = faiss.IndexFlatIP(args.dim)
            index.add(feats.float().cpu().numpy())
            if device.type == "cuda" and faiss_gpu_available():
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
        for name, nprobe in runs:
            if nprobe is not None:
                index.nprobe = nprobe
            if device.type == "cuda":
                search(index, queries[: min(100, args.queries)], args.top_k, rows)  # warm-up
                torch.cuda.reset_peak_memory_stats()
            times = [
                timed(lambda index=index: search(index, queries, args.top_k, rows), device) for _ in range(args.repeats)
            ]
            result = search(index, queries, args.top_k, rows)
            exact = backend in ("torch", "faiss", "stream")
            if reference is None and exact:
                reference = result
            found = f"{recall(result, reference):.4f}" if reference is not None else "n/a"
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "n/a (CPU)"
            table.append((name, statistics.median(times), min(times), max(times), build, found, peak))
        if args.check and backend == "torch":
            result = search(index, queries[:20], args.top_k, rows)
            exact = queries[:20].astype(np.float64) @ feats.cpu().numpy().astype(np.float64).T
            expected = np.argsort(-exact, axis=1)[:, : args.top_k]
            same = np.array_equal(result.helpful_ids, expected)
            print(f"check: torch ids equal a float64 brute force on 20 queries: {same}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(
        f"# {platform.processor() or platform.machine()}, GPU {gpu}, torch {torch.__version__}, {args.threads} threads"
    )
    print(f"# N={args.n:,} cached features ({args.data}), k={args.dim}, {args.queries:,} queries, "
          f"top-{args.top_k} helpful + harmful")  # fmt: skip
    print(f"| backend | median s | min s | max s | build s | recall@{args.top_k} | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|")
    for backend, med, lo, hi, build, found, peak in table:
        print(f"| {backend} | {med:.2f} | {lo:.2f} | {hi:.2f} | {build:.1f} | {found} | {peak} |")


if __name__ == "__main__":
    main()
