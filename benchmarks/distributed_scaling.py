"""Scaling of featurize with processes (torchrun ranks) and with DataLoader workers; prints a table.

    python benchmarks/distributed_scaling.py                      # CPU: gloo ranks, digits MLP
    python benchmarks/distributed_scaling.py --device cuda --procs 1,2,4,8 --workers 0,2,4,8 --threads 1
    python benchmarks/distributed_scaling.py --procs 1,2 --workers 0 \
        --featurize-args "--projection factored --shard-parameters"    # sharded parameters

Trains the digits MLP once (1,437 examples, 8 checkpoints), then runs the same
``source-proj featurize`` command (k = ``--dim``, row chunks of ``--chunk-rows``) as ``torchrun
--nproc-per-node P -m source_proj.cli featurize ...`` for each P of ``--procs`` (``OMP_NUM_THREADS``
= ``--threads`` per process), and as one process with each number of ``--workers`` DataLoader
workers. Wall time is that of the whole command, process start included (importing the CLI is
measured once as "start"; each process then also builds the model, data and projector). Every
store is compared byte for byte with the one-process store.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import devices
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
import digits

from source_proj.store.durable import LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]


def files(store: Path) -> dict[str, bytes]:
    """Every file of a store but its lock file, by relative path."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()
            and p.name != LOCK_FILE}


def run(command: list[str], threads: int) -> float:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2,4")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--featurize-args", default="", help="more featurize options, e.g. --shard-parameters")
    args = parser.parse_args()
    devices.device(args.device)
    spec = ROOT / "examples" / "digits" / "digits.py"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        digits.train(digits.load_split()[0], run_dir=run_dir)
        featurize = ["-m", "source_proj.cli", "featurize", "--ckpts", str(run_dir), "--spec", str(spec),
                     "--dim", str(args.dim), "--chunk-rows", str(args.chunk_rows), "--batch-size",
                     str(args.batch_size), "--device", args.device, *args.featurize_args.split()]
        start = run([sys.executable, "-m", "source_proj.cli", "--help"], args.threads)
        reference = None
        for procs in (int(p) for p in args.procs.split(",")):
            store = Path(tmp) / f"p{procs}.sp"
            launcher = [sys.executable]
            if procs > 1:
                launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
            wall = run([*launcher, *featurize, "--out", str(store)], args.threads)
            written = files(store)
            reference = reference or written
            rows.append((f"{procs} process(es)", procs, 0, wall, written == reference))
        for workers in (int(w) for w in args.workers.split(",")):
            store = Path(tmp) / f"w{workers}.sp"
            wall = run([sys.executable, *featurize, "--out", str(store), "--workers", str(workers)], args.threads)
            rows.append((f"{workers} loader worker(s)", 1, workers, wall, files(store) == reference))
    base = rows[0][3]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"device {args.device}, {args.threads} thread(s) per process, k={args.dim}, chunk rows {args.chunk_rows}, "
          f"options {args.featurize_args or 'none'}; process start ≈ {start:.1f} s")
    print("| run | processes | loader workers | wall (s) | speed-up | store identical to 1 process |")
    print("|---|---|---|---|---|---|")
    for name, procs, workers, wall, same in rows:
        print(f"| {name} | {procs} | {workers} | {wall:.1f} | {base / wall:.2f}× | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
