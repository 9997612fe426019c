"""Top-50 helpful + harmful for Q queries against N cached features of dimension k; prints a table.

    python benchmarks/query_scale.py                                  # N=1,000,000, k=4096, Q=10,000 (GPU)
    python benchmarks/query_scale.py --n 100000 --dim 256 --queries 1000 --backends torch,faiss   # CPU

Features and queries are standard normal (never zeros), made on the device. Backends: ``torch``
(``TorchIndex`` with the features resident on the device: blocked matmul + top-k, exact merge),
``faiss`` (FAISS flat inner product on the CPU, or on the GPU where FAISS has GPU support),
``stream`` (``TorchIndex`` reading host blocks one at a time: memory bounded by a block). On CUDA
each backend is warmed up once, then timed ``--repeats`` times with CUDA events (median);
peak GPU memory is ``torch.cuda.max_memory_allocated``. ``--check`` compares the torch index's
ids with a float64 brute force on the first 20 queries.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import faiss
import numpy as np
import torch

from source_proj.query.attributor import StageRows, search
from source_proj.query.topk import TorchIndex, faiss_gpu_available


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--backends", default="torch,faiss")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-rows", type=int, default=65536)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator(device=device).manual_seed(0)
    feats = torch.randn(args.n, args.dim, generator=g, device=device)
    queries = torch.randn(args.queries, args.dim, generator=g, device=device).cpu().numpy()
    rows = [StageRows("main", 0, args.n)]
    table = []
    for backend in args.backends.split(","):
        if backend == "torch":
            index = TorchIndex.resident(feats, device, block_rows=args.block_rows)
        elif backend == "stream":
            host = feats.cpu()

            def blocks(host=host):
                for start in range(0, args.n, args.block_rows):
                    yield start, host[start : start + args.block_rows]

            index = TorchIndex(blocks, args.n, args.dim, device)
        else:
            index = faiss.IndexFlatIP(args.dim)
            index.add(feats.cpu().numpy())
            if device.type == "cuda" and faiss_gpu_available():
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
        if device.type == "cuda":
            search(index, queries[: min(100, args.queries)], args.top_k, rows)  # warm-up
            torch.cuda.reset_peak_memory_stats()
        times = [
            timed(lambda index=index: search(index, queries, args.top_k, rows), device) for _ in range(args.repeats)
        ]
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "n/a (CPU)"
        table.append((backend, statistics.median(times), min(times), max(times), peak))
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
    print(f"# N={args.n:,} cached features, k={args.dim}, {args.queries:,} queries, top-{args.top_k} helpful + harmful")
    print("| backend | median s | min s | max s | peak GPU GiB |")
    print("|---|---|---|---|---|")
    for backend, med, lo, hi, peak in table:
        print(f"| {backend} | {med:.2f} | {lo:.2f} | {hi:.2f} | {peak} |")


if __name__ == "__main__":
    main()
