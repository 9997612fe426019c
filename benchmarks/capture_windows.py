"""What a captured run pays at its window boundaries: each window's write, the eigen projection's basis passes, the
close, and a step between them, with counts that do not depend on the machine's load.

    python benchmarks/capture_windows.py --model mlp                  # factored projection, a window every 10 steps
    python benchmarks/capture_windows.py --model gpt --kind eigen     # a small transformer, a basis pass per window
    PYTHONPATH=OTHER_TREE python benchmarks/capture_windows.py ...    # the same against another checkout

One captured run (``capture_overhead.py``'s models and loop, ``CaptureArguments(end_pass=False)``, one thread) into
``--out`` (kept, so that two trees' stores can be compared file by file). Reported, each summed over the run: the
window writes (``GradientCapture.before_checkpoint``), the basis passes (``_rebase``) and the close (``after_close``),
each in wall-clock and in this process's CPU seconds (less moved by other processes on a shared machine; an fsync's
wait is not in it), with the ``os.fsync`` calls made during it, their time, and the thread round trips into zarr's
event loop (``asyncio.run_coroutine_threadsafe``); and the median of the steps that neither write a window nor open
one, in both clocks.
BENCHMARKS.md, "Capture's fixed costs at its windows".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import capture_overhead
import torch

import source_proj as sp
from source_proj.featurize.capture import GradientCapture

COUNTS = {"fsync": 0, "fsync_s": 0.0, "round_trips": 0}


def _counted() -> None:
    """Count every ``os.fsync`` (and its time) and every round trip into zarr's loop from now on."""
    fsync, round_trip = os.fsync, asyncio.run_coroutine_threadsafe

    def counted_fsync(fd: int) -> None:
        start = time.perf_counter()
        try:
            fsync(fd)
        finally:
            COUNTS["fsync"] += 1
            COUNTS["fsync_s"] += time.perf_counter() - start

    def counted_round_trip(*args, **kwargs):
        COUNTS["round_trips"] += 1
        return round_trip(*args, **kwargs)

    os.fsync, asyncio.run_coroutine_threadsafe = counted_fsync, counted_round_trip


def _phase(phases: dict[str, dict[str, float]], name: str, method: Callable) -> Callable:
    """``method`` timed into ``phases[name]``: its calls, seconds and the counts made during it."""

    def timed(*args, **kwargs):
        before, start, cpu = dict(COUNTS), time.perf_counter(), time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            phase = phases.setdefault(name, {"calls": 0, "s": 0.0, "cpu_s": 0.0, **{c: 0 for c in COUNTS}})
            phase["calls"] += 1
            phase["s"] += time.perf_counter() - start
            phase["cpu_s"] += time.process_time() - cpu
            for count in COUNTS:
                phase[count] += COUNTS[count] - before[count]

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "gpt"], default="mlp")
    parser.add_argument("--kind", choices=["factored", "eigen"], default="factored")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--basis-examples", type=int, default=None)
    parser.add_argument("--out", default="/tmp/capture_windows", help="the run and its store (replaced)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loop_args = argparse.Namespace(
        model=args.model, dim=args.dim, optimizer="sgd", device="cpu", batch=args.batch, seq=args.seq,
        width=args.width, layers=args.layers, heads=4, vocab=8192, steps=args.steps, warmup=0,
        save_every=args.save_every, threads=1, precision="fp32", compile=None, basis_examples=args.basis_examples,
        examples=args.examples,
    )  # fmt: skip
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    phases: dict[str, dict[str, float]] = {}
    for name, method in [("windows", "before_checkpoint"), ("basis passes", "_rebase"), ("close", "after_close")]:
        setattr(GradientCapture, method, _phase(phases, name, getattr(GradientCapture, method)))
    _counted()
    loop = capture_overhead.Variant(loop_args, sp.CaptureArguments(end_pass=False), out, args.kind)
    start, cpu_steps = time.perf_counter(), []
    for step in range(args.steps):
        first, cpu = loop.rec.global_step % args.save_every == 0, time.process_time()
        loop.step(step)
        if not first and loop.rec.global_step % args.save_every != 0:  # the steps loop.step_times holds
            cpu_steps.append(time.process_time() - cpu)
    loop.rec.close()
    total = time.perf_counter() - start
    windows = phases["windows"]["calls"] - 1  # the first checkpoint (step 0) closes no window
    print(f"{args.model}, {args.kind}, k={args.dim}, {args.steps} steps, a window every {args.save_every}: "
          f"{total:.2f} s in all; a step between windows: median {1000 * statistics.median(loop.step_times):.2f} ms, "
          f"CPU {1000 * statistics.median(cpu_steps):.2f} ms ({sp.__file__})")  # fmt: skip
    for name, phase in phases.items():
        each = windows if name == "windows" else phase["calls"]
        print(f"  {name}: {phase['calls']} calls, {1000 * phase['s'] / each:.0f} ms each, CPU "
              f"{1000 * phase['cpu_s'] / each:.0f} ms; per each "
              f"{phase['fsync'] / each:.0f} fsyncs ({1000 * phase['fsync_s'] / each:.0f} ms of it), "
              f"{phase['round_trips'] / each:.1f} round trips")  # fmt: skip
    steps = {"step_ms": [1000 * s for s in loop.step_times], "step_cpu_ms": [1000 * s for s in cpu_steps]}
    print(json.dumps({"total_s": total, **steps, "phases": phases}))


if __name__ == "__main__":
    main()
