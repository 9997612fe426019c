"""Write and read a feature store of N rows × k through ``Store.write_chunk``: one file per chunk (format 1's
layout) against zarr v3 shards; prints rows/s written and read, and the files per array, measured and
extrapolated to 10⁷ rows.

    python benchmarks/store_scale.py --rows 200000 --dim 256 --chunk-rows 1024 --shard-chunks 64

Rows are standard normal float32 (incompressible, as projected gradients are); every write is durable
(fsync), every read crc-checked, as featurize and fit do. Run it on the disk the stores will live on.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from source_proj.store.store import Store

NAME = "grads/main/step-00000001"


def files(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*") if p.is_file())


def run(root: Path, rows: int, dim: int, chunk_rows: int, shard_chunks: int) -> dict[str, float]:
    store = Store.create(root, {"layout": {"shard_chunks": shard_chunks}})
    store.require_array(NAME, (rows, dim), chunk_rows, "float32")
    store.pending_chunks(NAME)
    block = np.random.default_rng(0).standard_normal((chunk_rows, dim)).astype(np.float32)
    start = time.perf_counter()
    for chunk in range(store.num_chunks(NAME)):
        first, stop = store.chunk_rows(NAME, chunk)
        store.write_chunk(NAME, chunk, block[: stop - first])
    store.pack(NAME)
    written = time.perf_counter() - start
    start = time.perf_counter()
    total = sum(values.shape[0] for _, values in Store.open(root).iter_chunks(NAME))
    read = time.perf_counter() - start
    assert total == rows
    return {
        "write rows/s": rows / written,
        "read rows/s": rows / read,
        "data files": files(root / NAME),
        "progress files": files(root / "progress" / NAME),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--shard-chunks", type=int, default=64)
    parser.add_argument("--dir", default=None, help="where the stores are written (default: a temporary directory)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        results = {
            layout: run(base / f"{layout}.sp", args.rows, args.dim, args.chunk_rows, per)
            for layout, per in (("a file per chunk", 1), (f"shards of {args.shard_chunks} chunks", args.shard_chunks))
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    chunks = -(-10_000_000 // args.chunk_rows)
    print(f"# {platform.processor() or platform.machine()}; N={args.rows:,} rows × k={args.dim}, "
          f"{args.chunk_rows} rows per chunk")  # fmt: skip
    print("| layout | write rows/s | read rows/s | files per array (data + progress) | at 10⁷ rows |")
    print("|---|---|---|---|---|")
    for (layout, r), per in zip(results.items(), (1, args.shard_chunks), strict=True):
        at_scale = 2 * -(-chunks // per)
        print(f"| {layout} | {r['write rows/s']:,.0f} | {r['read rows/s']:,.0f} | "
              f"{r['data files']:.0f} + {r['progress files']:.0f} | {at_scale:,} |")  # fmt: skip


if __name__ == "__main__":
    main()
