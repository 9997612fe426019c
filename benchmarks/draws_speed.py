"""The sampled Fisher's draws (``FisherDraws``) of this tree against another checkout's, interleaved in one process so
that a shared machine's load slows both alike; and capture's two ways of checking a window's sums are finite.

    python benchmarks/draws_speed.py OTHER_TREE      # OTHER_TREE: a checkout's root (e.g. made with git archive)

Each round times both trees' ``per_example`` in turn (the same bits are checked first); reported: the medians over
rounds and the per-round ratio (median, [min, max]). BENCHMARKS.md, "Capture's fixed costs at its windows".
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROUNDS = 15


def _draws_module(tree: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, tree / "source_proj" / "tasks" / "draws.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _per_call(f: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - start) / calls


def _compare(label: str, other: Callable[[], object], this: Callable[[], object], calls: int) -> None:
    a, b = [], []
    for _ in range(ROUNDS):
        a.append(_per_call(other, calls))
        b.append(_per_call(this, calls))
    ratio = [x / y for x, y in zip(a, b, strict=True)]
    print(f"{label}: other {1e3 * statistics.median(a):.3f} ms, this {1e3 * statistics.median(b):.3f} ms, "
          f"ratio {statistics.median(ratio):.2f} [{min(ratio):.2f}, {max(ratio):.2f}]")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout's root")
    args = parser.parse_args()
    torch.set_num_threads(1)
    other = _draws_module(args.other, "other_draws")
    this = _draws_module(Path(__file__).resolve().parents[1], "this_draws")
    for label, rows, count, calls in [("64 examples × 1 label", 64, 1, 50), ("8 sequences × 63 tokens", 8, 63, 50),
                                      ("8 sequences × 8,192 tokens", 8, 8192, 3)]:  # fmt: skip
        a, b = other.FisherDraws.of([0, 7], range(rows)), this.FisherDraws.of([0, 7], range(rows))
        if not torch.equal(a.per_example(count), b.per_example(count)):
            raise SystemExit(f"the two trees draw different numbers for {label}")
        _compare(f"FisherDraws.per_example, {label}", lambda a=a, c=count: a.per_example(c),
                 lambda b=b, c=count: b.per_example(c), calls)  # fmt: skip
    sums = torch.randn(4096, 1024)
    _compare("a window's 4,096 × 1,024 sums finite: the [n, k] mask (other) or the total (this)",
             lambda: bool((~torch.isfinite(sums).all(dim=1)).any()), lambda: bool(torch.isfinite(sums.sum())), 5)


if __name__ == "__main__":
    main()
