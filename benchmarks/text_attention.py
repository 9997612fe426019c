"""Per-example gradient throughput of the text example's GPT-2 under each vmap-able attention implementation.

    python benchmarks/text_attention.py [--examples 256] [--repeats 3] [--threads 2]

Builds the tiny GPT-2 of ``examples/text/lm.py`` (random weights: the cost does not depend on them)
with attention ``eager`` and ``sdpa``, and times the projected per-example training-loss gradients
(k = 512, dense Rademacher, batches of 32) of the first ``--examples`` pre-training sequences, as
featurize computes them. Prints the median over ``--repeats`` runs. Both implementations give the
same gradients (tests/test_text.py); ``sdpa`` has no vmap batching rule for its CPU kernel, so vmap
loops over the examples there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "text"))
import lm

from source_proj.projection.factory import make_projector
from source_proj.tasks.gradients import PerExampleGradients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop")
    data = lm.corpus().train["pretrain"]
    batches = [
        {"input_ids": data.input_ids[i : i + 32], "attention_mask": data.attention_mask[i : i + 32]}
        for i in range(0, args.examples, 32)
    ]
    print(f"{'attention':<10} {'examples/s':>10} {'s per 32':>9}   ({args.examples} examples, k=512, "
          f"{args.threads} threads, median of {args.repeats})")  # fmt: skip
    for implementation in ("eager", "sdpa"):
        model = lm.build_model()
        model.set_attn_implementation(implementation)
        task = lm.build_task()
        names = task.select_parameters(model)
        params = dict(model.named_parameters())
        projector = make_projector("rademacher", [(n, tuple(params[n].shape)) for n in names], 512, 0)
        grads = PerExampleGradients(model, task, names)
        projector.project_batch(grads, batches[0], "loss")  # warm-up (and the mask check)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for batch in batches:
                projector.project_batch(grads, batch, "loss")
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        print(f"{implementation:<10} {args.examples / seconds:>10.0f} {32 * seconds / args.examples:>9.3f}")


if __name__ == "__main__":
    main()
