"""The language-model loss and the Fisher's token draws over a batch's logits: whole against in blocks of rows.

    python benchmarks/loss_blocks.py                       # CPU: time, the shapes below
    python benchmarks/loss_blocks.py --memory              # CPU: peak memory, each in a process of its own
    python benchmarks/loss_blocks.py --device cuda         # the accelerator's blocks (64 MiB) against whole

A language model's logits are its largest tensors (B·T·V floats), and three of the library's passes over them
make V-wide temporaries: the loss's log-sum-exp (`token_nll`), its backward (softmax(z) − onehot(y)), and the
sampled Fisher's draws (`sample_tokens`). Each is timed over the whole tensor at once and in the library's
blocks of rows (`tasks/text.py`, `_block_rows`), in turn, median of --repeats after a warm-up. The two give the
same values (checked here: the draws equal, the losses and gradients within 1e-6 relative).

``--dtype bf16``: bfloat16 logits (a bf16 forward), through ``token_nll(logits.float())`` (the language-model
task's path before, its log-sum-exp whole) against ``token_nll(logits)`` (float32 a block at a time, no float32
copy kept). ``--memory``: the peak memory of the loss and its gradient beyond the logits themselves (CPU: the
process's peak resident set, each variant in a fresh process; CUDA: ``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable

import devices
import torch

from source_proj.tasks import text

SHAPES = {  # name: (sequences, tokens, vocabulary)
    "16×128, V = 4,096 (issue 13's CPU workload)": (16, 128, 4096),
    "16×128, V = 8,192 (capture_overhead.py's GPT)": (16, 128, 8192),
    "64×128, V = 8,192 (its end pass and basis batches)": (64, 128, 8192),
    "8×1,024, V = 50,257 (GPT-2)": (8, 1024, 50257),
}
WHOLE = 2**62


def inputs(shape: tuple[int, int, int], dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    b, t, v = shape
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(b * t, v, dtype=dtype).normal_(generator=g).to(device)  # no float32 copy on the way
    targets = torch.randint(0, v, (b * t,), generator=g).to(device)
    uniform = torch.rand(b * t, generator=g, dtype=torch.float64)
    seeds = torch.randn(b * t, generator=g).to(device)
    return logits, targets, uniform, seeds


def works(logits: torch.Tensor, targets: torch.Tensor, uniform: torch.Tensor, seeds: torch.Tensor, upcast: bool
          ) -> dict[str, Callable[[], torch.Tensor]]:  # fmt: skip
    """What is timed: ``upcast`` takes the loss of ``logits.float()``."""

    def loss() -> torch.Tensor:
        return text.token_nll(logits.float() if upcast else logits, targets)

    def both() -> torch.Tensor:
        z = logits.detach().requires_grad_()
        (grad,) = torch.autograd.grad((text.token_nll(z.float() if upcast else z, targets) * seeds).sum(), z)
        return grad

    def draws() -> torch.Tensor:
        return text.sample_tokens(logits, uniform)

    return {"loss": loss, "loss and its gradient": both, "Fisher's draws": draws}


def timed(fn: Callable[[], torch.Tensor], device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak(shape: tuple[int, int, int], dtype: torch.dtype, device: str, block: int, upcast: bool) -> float:
    """MiB the loss and its gradient take beyond the logits at their peak (run in a process of its own)."""
    text._HOST_BLOCK = text._DEVICE_BLOCK = block
    logits, targets, uniform, seeds = inputs(shape, dtype, device)
    both = works(logits, targets, uniform, seeds, upcast)["loss and its gradient"]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        both()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    both()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--memory", action="store_true", help="peak memory instead of time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    devices.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    library = (text._HOST_BLOCK, text._DEVICE_BLOCK)
    before, after = ("float32 copy", "library") if args.dtype == "bf16" else ("whole", "in blocks")
    # (blocks, upcast) of the path before and of the library's
    variants = {before: (WHOLE, args.dtype == "bf16"), after: (None, False)}
    if args.memory:
        print(f"| logits ({args.dtype}) | {before}: MiB beyond the logits | {after}: MiB | ratio |")
        print("|---|---|---|---|")
        context = multiprocessing.get_context("spawn")
        for label, shape in SHAPES.items():
            mib = {}
            for name, (block, upcast) in variants.items():
                size = block or (library[0] if args.device == "cpu" else library[1])
                with context.Pool(1) as pool:
                    mib[name] = pool.apply(peak, (shape, dtype, args.device, size, upcast))
            print(f"| {label} | {mib[before]:.0f} | {mib[after]:.0f} | {mib[before] / max(mib[after], 1):.2f}× |")
        return
    print(f"| logits ({args.dtype}) | work | {before}, ms | {after}, ms | speed-up |")
    print("|---|---|---|---|---|")
    for label, shape in SHAPES.items():
        data = inputs(shape, dtype, args.device)
        results: dict[str, dict[str, float]] = {}
        values = {}
        for name, (block, upcast) in variants.items():
            text._HOST_BLOCK, text._DEVICE_BLOCK = (block, block) if block else library
            timed_works = works(*data, upcast)
            results[name] = {work: timed(fn, args.device, args.repeats) for work, fn in timed_works.items()}
            values[name] = [fn() for fn in timed_works.values()]
        text._HOST_BLOCK, text._DEVICE_BLOCK = library
        (lw, gw, dw), (lb, gb, db) = values[before], values[after]
        assert torch.equal(dw, db), "the draws differ"
        assert torch.allclose(lw, lb, rtol=1e-6, atol=0)
        assert torch.allclose(gw.float(), gb.float(), rtol=1e-6, atol=1e-12)
        for work in results[before]:
            old, new = results[before][work], results[after][work]
            print(f"| {label} | {work} | {old:.1f} | {new:.1f} | {old / new:.2f}× |")


if __name__ == "__main__":
    main()
