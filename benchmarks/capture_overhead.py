"""Training-step overhead of in-run gradient capture (GradientCapture) against the same loop without it.

    python benchmarks/capture_overhead.py --model mlp --dim 1024 --steps 60            # CPU, MNIST-sized MLP
    python benchmarks/capture_overhead.py --model gpt --dim 4096 --device cuda --steps 100   # the GPU check
    python benchmarks/capture_overhead.py --model gpt --optimizer adamw ...   # AdamW: D refitted every 16 batches
    python benchmarks/capture_overhead.py ... --basis-examples 256   # the eigen projection's basis passes, smaller

Models: ``mlp`` = 784-512-256-128-10 on random MNIST-shaped inputs (the SOURCE paper's MNIST MLP, batch
64); ``gpt`` = a decoder-only transformer built from nn.Linear layers (every attributed weight is
factorable: attention and MLP projections; embeddings and norms are left out), random tokens, batch
--batch × --seq tokens, next-token loss. Every variant runs the same loop with a TrajectoryRecorder
(SGD with momentum 0.9, or AdamW with ``--optimizer adamw``; a checkpoint every --save-every steps) and
differs only in capture (every variant but ``defaults`` with ``end_pass=False``: the end pass runs after a stage's
last step, and costs one forward and backward per example, not a share of each step):

- ``recorder only``            the baseline;
- ``capture, empirical Fisher``  the projected gradients from the training backward, nothing else;
- ``capture, sampled Fisher / 4`` plus the true Fisher on every 4th batch: one extra backward of
                                 labels drawn from the training forward's outputs, through its graph;
- ``capture, sampled Fisher``   that backward on every batch, with the random factored projection;
- ``capture (eigen), sampled Fisher`` the same with the eigen projection (capture's default where the
                                 training data are given): a basis per window, from one Fisher pass as the
                                 window's first step begins, over at most a quarter of the examples the
                                 window before trained on (the run's first: the default basis, the examples
                                 that give each layer 2,048 positions; ``--basis-examples E``: E examples);
- ``capture (eigen), sampled Fisher / 2`` and ``/ 4``: the eigen projection with the Fisher on every 2nd or
                                 4th batch only;
- ``capture, sampled Fisher, separate pass`` its own eval-mode forward and backward on every batch
                                 (``fisher_forward="separate"``, the default before 2026-11-30);
- ``capture at the defaults``   ``CaptureArguments()``: the eigen projection, the Fisher on every batch, and the
                                 end pass on every stage;
- ``capture at the defaults, bf16`` the same with ``precision="bf16"``: capture's own passes (the end pass, the
                                 basis passes) under bfloat16 autocast, the hooks projecting in bf16.

``--precision bf16`` trains under bfloat16 autocast (the forward and the loss; the user's mixed-precision loop), the
run the ``bf16`` variant is for.

``--variants`` picks some by their short names (``empirical``, ``factored/4``, ``factored``, ``separate``,
``eigen``, ``eigen/2``, ``eigen/4``, ``defaults``, ``defaults-bf16``); the recorder alone always runs.

The variants take their steps in turn (round robin), so that a load which changes over time (a
shared machine) slows all of them alike.

Reported: the median time of a training step that saves no checkpoint (forward, backward, optimiser step,
recorder; CUDA-synchronised), the overhead against the baseline, the mean of those steps (with the Fisher
on every n-th batch only, the median is a step without it, and the mean counts both), the mean time of a
step that saves a checkpoint (for capture: and writes the window it closes), the mean time of a window's
first step (for the eigen projection: its basis pass) and the mean over every timed step (the amortised
cost, whose overhead is the one a whole run pays between its start and its close). The first --warmup steps are
not timed. Then the whole run: every timed step plus the recorder's close, where capture takes its final basis
pass (eigen), the end pass where due (``defaults``: ``CaptureArguments()``, the pass on stages of two epochs or more,
``--examples`` / ``--batch`` steps an epoch) and its last writes; with ``--warmup 0`` it includes the run's first
basis pass too, so it is what capture adds to a run of ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import devices
import torch
import torch.nn.functional as F
from torch import nn

import source_proj as sp


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + self.out(a.transpose(1, 2).reshape(b, t, w))
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids) + self.position(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def build(args: argparse.Namespace) -> tuple[nn.Module, sp.Task, torch.utils.data.Dataset, callable]:
    """The model, its task, the dataset and ``batch(rows) -> (task batch, loss function)``."""
    torch.manual_seed(0)
    n = args.examples
    if args.model == "mlp":
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128),
                              nn.ReLU(), nn.Linear(128, 10))
        x, y = torch.rand(n, 784), torch.randint(0, 10, (n,))
        task: sp.Task = sp.ClassificationTask()

        def batch(rows):
            b = (x[rows].to(args.device), y[rows].to(args.device))
            return b, lambda m: F.cross_entropy(m(b[0]), b[1])

        return model, task, torch.utils.data.TensorDataset(x, y), batch
    model = TinyGPT(args.vocab, args.width, args.layers, args.heads, args.seq)
    tokens = torch.randint(0, args.vocab, (n, args.seq))
    selection = sp.ParameterSelection(exclude=("head.*",), skip_norm=True, skip_embedding=True)
    task = sp.LanguageModelingTask(tokens_per_sequence=args.seq - 1, parameters=selection)

    def batch(rows):
        ids = tokens[rows].to(args.device)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def loss(m):
            return task.loss(m(ids), b).mean()

        return b, loss

    return model, task, Tokens(tokens), batch


class Tokens(torch.utils.data.Dataset):
    """The token sequences as the task's dict items (what the eigen projection's basis passes read)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "attention_mask": torch.ones_like(self.tokens[i])}


class Variant:
    """One training loop (its own model, optimiser, recorder and capture), stepped by :meth:`step`."""

    def __init__(
        self, args: argparse.Namespace, options: sp.CaptureArguments | None, folder: Path, kind: str = "factored"
    ) -> None:
        self.args = args
        self.model, task, data, self.batch = build(args)
        self.n = len(data)
        self.model.to(args.device)
        # --compile: the training step runs the model compiled (capture hooks the modules inside the wrapper)
        self.trained = torch.compile(self.model, backend=args.compile) if args.compile else self.model
        if args.optimizer == "adamw":
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.rec = sp.TrajectoryRecorder(folder / "run", self.model, self.opt, save_every=args.save_every)
        self.cap = None
        if options is not None:
            # --basis-examples E: every pass over E examples (the layers' budget off); else the library's default
            basis = {}
            if args.basis_examples:
                basis = {"basis_examples": args.basis_examples, "basis_layer_positions": None}
            projection = sp.ProjectionArguments(dim=args.dim, kind=kind, **basis)
            self.cap = sp.GradientCapture(
                self.rec, folder / "store.sp", task, projection=projection, options=options, datasets={"main": data}
            )
        self.rec.begin_stage("main", dataset_size=self.n)
        self.order = torch.randperm(self.n, generator=torch.Generator().manual_seed(0))
        self.step_times: list[float] = []
        self.checkpoint_times: list[float] = []
        self.first_times: list[float] = []

    def step(self, step: int) -> None:
        rows = self.order[(step * self.args.batch) % self.n :][: self.args.batch]
        first = self.rec.global_step % self.args.save_every == 0  # a window's first step
        b, loss_fn = self.batch(rows)
        sync(self.args.device)
        t0 = time.perf_counter()
        with self.cap.batch(b, rows) if self.cap is not None else contextlib.nullcontext():
            device = torch.device(self.args.device).type
            with torch.autocast(device, dtype=torch.bfloat16, enabled=self.args.precision == "bf16"):
                loss = loss_fn(self.trained)
            self.opt.zero_grad()
            loss.backward()
        self.opt.step()
        self.rec.step()
        sync(self.args.device)
        if step >= self.args.warmup:
            saved = self.rec.global_step % self.args.save_every == 0
            times = self.checkpoint_times if saved else self.first_times if first else self.step_times
            times.append(time.perf_counter() - t0)

    def result(self) -> dict[str, float]:
        sync(self.args.device)
        start = time.perf_counter()
        self.rec.close()  # capture's close: the final basis pass (eigen), the end pass where due, the last writes
        sync(self.args.device)
        closing = time.perf_counter() - start
        return {
            "close_s": closing,
            "whole_s": sum(self.step_times + self.checkpoint_times + self.first_times) + closing,
            "step_ms": 1000 * statistics.median(self.step_times),
            "between_ms": 1000 * statistics.mean(self.step_times),
            "checkpoint_step_ms": 1000 * statistics.mean(self.checkpoint_times) if self.checkpoint_times else 0.0,
            "first_step_ms": 1000 * statistics.mean(self.first_times) if self.first_times else 0.0,
            "mean_step_ms": 1000 * statistics.mean(self.step_times + self.checkpoint_times + self.first_times),
        }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


VARIANTS = {  # short name: (the printed name, the capture's options; None: no capture)
    "recorder": ("recorder only", None),
    "empirical": ("capture, empirical Fisher", sp.CaptureArguments(fisher="empirical", end_pass=False)),
    "factored/4": ("capture, sampled Fisher / 4", sp.CaptureArguments(fisher_every=4, end_pass=False)),
    "factored": ("capture, sampled Fisher", sp.CaptureArguments(end_pass=False)),
    "separate": ("capture, sampled Fisher, separate pass",
                 sp.CaptureArguments(fisher_forward="separate", end_pass=False)),
    "eigen": ("capture (eigen), sampled Fisher", sp.CaptureArguments(end_pass=False)),
    "eigen/2": ("capture (eigen), sampled Fisher / 2", sp.CaptureArguments(fisher_every=2, end_pass=False)),
    "eigen/4": ("capture (eigen), sampled Fisher / 4", sp.CaptureArguments(fisher_every=4, end_pass=False)),
    "defaults": ("capture at the defaults (eigen, end pass on every stage)", sp.CaptureArguments()),
    "defaults-bf16": ("capture at the defaults (eigen), bf16 passes", sp.CaptureArguments(precision="bf16")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "gpt"], default="mlp")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: train under autocast")
    parser.add_argument("--compile", default=None, help="train the model compiled with this torch.compile backend "
                        "(inductor, aot_eager); the first --warmup steps, which compile, are not timed")
    parser.add_argument("--basis-examples", type=int, default=None, help="the eigen projection's, per basis pass "
                        "(the layers' budget off; default: the library's default basis)")  # fmt: skip
    parser.add_argument("--examples", type=int, default=4096, help="training examples (an epoch: examples/batch steps)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--variants", default=None, help=f"comma-separated, of {', '.join(VARIANTS)} (default: all; "
                        "the recorder alone always runs)")  # fmt: skip
    args = parser.parse_args()
    devices.device(args.device)
    torch.set_num_threads(args.threads)
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    variants = {VARIANTS[short][0]: VARIANTS[short][1] for short in ["recorder", *chosen] if short in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        loops = {
            name: Variant(args, options, Path(tmp) / str(i), "eigen" if "eigen" in name else "factored")
            for i, (name, options) in enumerate(variants.items())
        }
        for step in range(args.warmup + args.steps):
            for loop in loops.values():  # round robin: a load that changes over time hits every variant alike
                loop.step(step)
        results = {name: loop.result() for name, loop in loops.items()}
    base, mean = results["recorder only"]["step_ms"], results["recorder only"]["mean_step_ms"]
    params = sum(p.numel() for p in build(args)[0].parameters())
    print(f"{args.model} ({params:,} parameters), {args.optimizer}, {args.precision} training, k={args.dim}, "
          f"batch {args.batch}, {args.device}, "
          f"{args.steps} timed steps, a window every {args.save_every} steps")
    for name, r in results.items():
        overhead = "" if name == "recorder only" else f"  overhead {100 * (r['step_ms'] / base - 1):+.0f}%"
        amortised = "" if name == "recorder only" else f" ({100 * (r['mean_step_ms'] / mean - 1):+.0f}%)"
        plain = results["recorder only"]["between_ms"]
        between = f", mean {r['between_ms']:.2f} ms ({100 * (r['between_ms'] / plain - 1):+.0f}%)"
        print(f"{name:40s} {r['step_ms']:8.2f} ms/step{overhead}{between}   a step that saves a checkpoint "
              f"(and writes the window): {r['checkpoint_step_ms']:.0f} ms, a window's first: "
              f"{r['first_step_ms']:.0f} ms, mean of all: {r['mean_step_ms']:.2f} ms{amortised}")
        whole = results["recorder only"]["whole_s"]
        print(f"{'':40s} the whole run (every timed step, then the close): {r['whole_s']:.1f} s "
              f"({100 * (r['whole_s'] / whole - 1):+.0f}%), of which the close {r['close_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
