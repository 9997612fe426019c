"""The language-model loss's forward and backward through the logits: ``token_nll`` against ``F.cross_entropy``.

    python benchmarks/lm_loss.py [--tokens 4096] [--vocab 50257] [--threads 1] [--repeats 7]

Each loss runs in its own process (so that its peak resident memory is its own): logits = h Wᵀ for
``--tokens`` positions of width 64 over ``--vocab`` words (every 50th position ignored), the loss summed, and
its gradient taken with respect to h, ``--repeats`` times. Printed: the median time of one forward and
backward, and the process's peak resident memory (VmHWM) beside the logits' own size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def worker(loss: str, tokens: int, vocab: int, threads: int, repeats: int) -> dict:
    from source_proj.tasks.text import IGNORE_INDEX, token_nll

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, 64, generator=g).requires_grad_()
    weight = torch.randn(vocab, 64, generator=g) / 8
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[::50] = IGNORE_INDEX
    fn = token_nll if loss == "token_nll" else (lambda z, t: F.cross_entropy(z, t, reduction="none"))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits = h @ weight.T
        (grad,) = torch.autograd.grad(fn(logits, targets).sum(), h)
        times.append(time.perf_counter() - start)
        del logits, grad
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM")) / 2**20  # fmt: skip
    size = tokens * vocab * 4 / 2**30
    return {"loss": loss, "median_s": statistics.median(times), "peak_gib": peak, "logits_gib": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.vocab, args.threads, args.repeats)))
        return
    print(f"{args.tokens} positions × {args.vocab} words, {args.threads} thread(s), median of {args.repeats}")
    print("| loss | forward + backward | peak RSS | logits |\n|---|---|---|---|")
    for loss in ("cross_entropy", "token_nll"):
        command = [sys.executable, __file__, "--worker", loss, "--tokens", str(args.tokens), "--vocab",
                   str(args.vocab), "--threads", str(args.threads), "--repeats", str(args.repeats)]  # fmt: skip
        r = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"| {loss} | {r['median_s'] * 1000:.0f} ms | {r['peak_gib']:.2f} GiB | {r['logits_gib']:.2f} GiB |")


if __name__ == "__main__":
    main()
