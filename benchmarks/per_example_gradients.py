"""Per-example gradients from layer hooks against torch.func's vmap(grad), in one process, interleaved.

    python benchmarks/per_example_gradients.py [--batch 256] [--repeats 7] [--threads 1]

Models: the digits MLP (64-128-128-10, what featurize and query differentiate on the demo) and a
one-layer GPT-2 (d = 64, 128 tokens, the Conv1D and tied-embedding parameters only: the hook path's
selection). Convolutions are not timed: they keep torch.func (see tasks/gradients.py). Prints the
median seconds per batch of each path, their ratio, and the largest relative difference of their
gradients. The first call of each path (its one-off check or torch._dynamo import) is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from torch import nn

import source_proj as sp
from source_proj.projection.layers import factorable_layers
from source_proj.tasks.gradients import PerExampleGradients
from source_proj.tasks.task import Batch


def _mlp(batch: int) -> tuple[nn.Module, sp.Task, Batch]:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    return model, sp.ClassificationTask(), (torch.randn(batch, 64), torch.randint(0, 10, (batch,)))


def _gpt2(batch: int) -> tuple[nn.Module, sp.Task, Batch]:
    config = transformers.GPT2Config(
        vocab_size=512, n_positions=128, n_embd=64, n_layer=1, n_head=4, attn_implementation="eager"
    )
    ids = torch.randint(0, 512, (batch, 128))
    task = sp.LanguageModelingTask(tokens_per_sequence=127, parameters=sp.ParameterSelection())
    return transformers.GPT2LMHeadModel(config), task, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


MODELS: dict[str, Callable[[int], tuple[nn.Module, sp.Task, Batch]]] = {"mlp": _mlp, "gpt2": _gpt2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'model':6s} {'batch':>5s} {'hooks (s)':>10s} {'torch.func (s)':>15s} {'ratio':>6s} {'max rel. diff':>14s}")
    for name, build in MODELS.items():
        torch.manual_seed(0)
        batch_size = args.batch if name == "mlp" else max(1, args.batch // 8)
        model, task, batch = build(batch_size)
        layers, _ = factorable_layers(model, [n for n, _ in model.named_parameters()])
        names = [n for layer in layers for n in (layer.weight, layer.bias) if n]
        paths = {hooks: PerExampleGradients(model, task, names, hooks=hooks) for hooks in (True, False)}
        grads = {hooks: fn(batch, "loss") for hooks, fn in paths.items()}  # untimed: the check, the imports
        assert paths[True]._hooked_layers[tuple(names)] is not None, "the hook path was not taken"
        diff = max(float((grads[True][n] - grads[False][n]).norm() / grads[False][n].norm()) for n in names)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for hooks, fn in paths.items():
                start = time.perf_counter()
                fn(batch, "loss")
                times[hooks].append(time.perf_counter() - start)
        hooked, func = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name:6s} {batch_size:5d} {hooked:10.4f} {func:15.4f} {func / hooked:6.2f} {diff:14.1e}")


if __name__ == "__main__":
    main()
