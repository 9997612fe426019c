"""Crash safety figures: SIGKILL featurize/fit at random moments and resume; the cost of durable writes.

    python benchmarks/kill_resume.py [--kills 100] [--fit-kills 20]

Part 1 runs ``tests/crash_driver.py`` (the loop the test suite runs with 20 + 5 kills) on a RAM
disk (/dev/shm, as the test does) and on the ordinary disk, and prints kills that landed while
the child was writing, trials, resumed stores bit-identical to the uninterrupted reference, and
the wall time. Part 2 times writing row chunks of float32 ``[rows, k]`` through zarr's plain
``LocalStore`` and through ``DurableLocalStore`` (fsync of each chunk and its directories) on the
ordinary disk: the price of surviving power loss.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from source_proj.store.durable import DurableLocalStore

DRIVER = Path(__file__).resolve().parents[1] / "tests" / "crash_driver.py"


def kill_loop(base: Path | None, kills: int, fit_kills: int) -> dict:
    work = Path(tempfile.mkdtemp(dir=base, prefix="kill-resume-"))
    try:
        out = subprocess.run(
            [sys.executable, str(DRIVER), str(work), "--kills", str(kills), "--fit-kills", str(fit_kills)],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return json.loads(out.stdout.splitlines()[-1])


def chunk_writes(store_class: type, rows: int, k: int, chunks: int) -> float:
    """Seconds per row chunk written (data, then its progress entry, as Store.write_chunk does)."""
    work = Path(tempfile.mkdtemp(prefix="chunk-writes-"))
    try:
        group = zarr.open_group(store=store_class(work / "s"), mode="w")
        data = group.create_array("a", shape=(rows * chunks, k), chunks=(rows, k), dtype="float32", compressors=None)
        progress = group.create_array("p", shape=(chunks, 2), chunks=(1, 2), dtype="uint32", compressors=None)
        values = np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32)
        start = time.perf_counter()
        for c in range(chunks):
            data[c * rows : (c + 1) * rows] = values
            progress[c] = np.array([1, c + 1], dtype=np.uint32)
        return (time.perf_counter() - start) / chunks
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--fit-kills", type=int, default=20)
    args = parser.parse_args()

    print("| where | command | kills landed | trials | resumed identical | one uninterrupted run (s) | loop (s) |")
    print("|---|---|---|---|---|---|---|")
    shm = Path("/dev/shm")
    for label, base in (("RAM disk", shm if shm.is_dir() else None), ("disk (ext4)", None)):
        result = kill_loop(base, args.kills, args.fit_kills)
        for what in ("featurize", "fit"):
            r = result[what]
            print(
                f"| {label} | {what} | {r['kills']} | {r['trials']} | {r['identical']}/{r['trials']} | "
                f"{result[f'{what}_seconds']:.2f} | {result['seconds']:.1f} |"
            )

    print("\n| chunk [rows × k] float32 | MiB | LocalStore (ms/chunk) | DurableLocalStore (ms/chunk) |")
    print("|---|---|---|---|")
    for rows, k, chunks in ((4, 12, 200), (1024, 1024, 20), (1024, 4096, 8)):
        plain = chunk_writes(LocalStore, rows, k, chunks)
        durable = chunk_writes(DurableLocalStore, rows, k, chunks)
        print(f"| {rows} × {k} | {rows * k * 4 / 2**20:.2f} | {plain * 1e3:.1f} | {durable * 1e3:.1f} |")


if __name__ == "__main__":
    main()
