"""Featurize with each chunk's store writes in the computing thread against in a writer thread of their own
(``store/writer.py``: write-behind), on the digits demo's run, in one process, the variants in turn.

    python benchmarks/write_behind.py [--dims 1024,4096] [--depths 0,2] [--rounds 3] [--device cpu]
        [--threads 2] [--out runs/write-behind]

The run is the demo's (the digits MLP, 1,437 training digits; trained into OUT/run when missing). Each variant
featurizes it with the default (eigen) projection at k = each of ``--dims`` into a fresh store, all variants
in turn ``--rounds`` times, so that a load that changes over time slows them alike. Depth 0 writes every chunk
before computing the next (as featurize did before write-behind); depth n lets n chunks wait for the writer
thread. Prints each variant's median seconds, every round, and the seconds spent inside ``Store.write_chunk``
(summed over threads: with write-behind they overlap the computation); writes OUT/results.json. The stores of
the variants are compared byte for byte (they must be equal).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import devices
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))
import digits  # noqa: E402

import source_proj as sp  # noqa: E402
import source_proj.store.writer as writer_module  # noqa: E402
from source_proj.store.durable import LOCK_FILE  # noqa: E402
from source_proj.store.store import Store  # noqa: E402


class _WriteClock:
    """Seconds spent inside ``Store.write_chunk`` (every thread), while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._original = Store.write_chunk

    def __enter__(self) -> _WriteClock:
        original, clock = self._original, self

        def timed(store: Store, name: str, chunk: int, values: object) -> None:
            start = time.perf_counter()
            try:
                original(store, name, chunk, values)  # type: ignore[arg-type]
            finally:
                with clock._lock:
                    clock.seconds += time.perf_counter() - start

        Store.write_chunk = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Store.write_chunk = self._original  # type: ignore[method-assign]


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="1024,4096")
    parser.add_argument("--depths", default="0,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("runs/write-behind"))
    args = parser.parse_args()
    devices.device(args.device)
    torch.set_num_threads(args.threads)
    train_set, _ = digits.load_split()
    run = args.out / "run"
    if not (run / "trajectory.json").exists() or not sp.Trajectory.load(run).complete:
        digits.train(train_set, run_dir=run)
    dims = [int(d) for d in args.dims.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for dim in dims:
            for depth in depths:
                name = f"k{dim}-depth{depth}"
                store = args.out / f"{name}.sp"
                writer_module.WRITE_BEHIND = depth
                with _WriteClock() as clock:
                    start = time.perf_counter()
                    sp.featurize(run, digits.build_model(), digits.build_task(), train_set, store,
                                 projection=sp.ProjectionArguments(dim=dim),
                                 options=sp.FeaturizeArguments(batch_size=args.batch_size, device=args.device),
                                 overwrite=True, progress=False)  # fmt: skip
                    seconds = time.perf_counter() - start
                entry = results.setdefault(name, {"dim": dim, "depth": depth, "seconds": [], "write_seconds": []})
                entry["seconds"].append(seconds)
                entry["write_seconds"].append(clock.seconds)
                print(f"k={dim} depth {depth}: {seconds:.2f} s ({clock.seconds:.2f} s writing)", flush=True)
    for dim in dims:
        stores = [_files(args.out / f"k{dim}-depth{depth}.sp") for depth in depths]
        assert all(s == stores[0] for s in stores), f"k={dim}: the stores differ between depths"
    print(f"\n# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} threads, device {args.device}; stores equal byte for byte")
    print(f"| k | depth | featurize s (median of {args.rounds}) | rounds | in write_chunk s (median) | "
          "× depth 0 |\n|---|---|---|---|---|---|")
    for dim in dims:
        base = statistics.median(results[f"k{dim}-depth{depths[0]}"]["seconds"])
        for depth in depths:
            r = results[f"k{dim}-depth{depth}"]
            median = statistics.median(r["seconds"])
            print(f"| {dim} | {depth} | {median:.2f} | {', '.join(f'{s:.2f}' for s in r['seconds'])} | "
                  f"{statistics.median(r['write_seconds']):.2f} | {base / median:.2f} |")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
