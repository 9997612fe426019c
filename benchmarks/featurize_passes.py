"""Featurize with the factored projection: one forward per batch against a forward per quantity.

    python benchmarks/featurize_passes.py [--dim 512] [--repeats 3] [--threads 2] [--run runs/adam-rank/run]

Featurize needs three per-example quantities per batch: the training loss's gradient, the Fisher's
(sampled labels) and, at the final checkpoint, the measurement's. With a factored projection it takes
them from one forward and a backward each (``FactoredProjector.forward_once``); before, each had its
own forward, and the Fisher's labels yet another (no-grad) one. Both are run here on the same recorded
run of the text example (``examples/text/lm.py``: the tiny GPT-2, two AdamW stages; trained into --run
unless it is there), the same model, projection (k = --dim, the blocks' Conv1D layers, Adam's rank-1
D^{-1/2}) and options, alternately --repeats times; "a forward per quantity" switches the shared
forward off (``FactoredProjector.shares_forward``). Prints each variant's median seconds, and checks
that the two stores hold the same features.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "text"))
import lm  # noqa: E402

import source_proj as sp  # noqa: E402
from source_proj.projection.factored import FactoredProjector  # noqa: E402


def task() -> sp.LanguageModelingTask:
    selection = sp.ParameterSelection(skip_norm=True, skip_embedding=True)
    return sp.LanguageModelingTask(tokens_per_sequence=lm.CONFIG.length - 1, parameters=selection)


def featurize(run: Path, store: Path, dim: int) -> float:
    start = time.perf_counter()
    sp.featurize(run, lm.build_model(), task(), lm.corpus().train, store,
                 projection=sp.ProjectionArguments(dim=dim, kind="factored"),
                 options=sp.FeaturizeArguments(batch_size=32, chunk_rows=128), overwrite=True,
                 progress=False)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", type=Path, default=Path("runs/adam-rank/run"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.run / "trajectory.json").exists():
        lm.train(seed=0, run_dir=args.run)
    seconds: dict[str, list[float]] = {"one forward per batch": [], "a forward per quantity": []}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {name: Path(tmp) / f"{i}.sp" for i, name in enumerate(seconds)}
        for _ in range(args.repeats):
            seconds["one forward per batch"].append(featurize(args.run, stores["one forward per batch"], args.dim))
            with mock.patch.object(FactoredProjector, "shares_forward", lambda self: False):
                seconds["a forward per quantity"].append(
                    featurize(args.run, stores["a forward per quantity"], args.dim)
                )
        a, b = (sp.Store.open(path) for path in stores.values())
        arrays = [name for name in a.progress_arrays("") if name.startswith(("grads/", "fisher/", "measurement/"))]
        worst = max(
            float(np.abs(a.read(n) - b.read(n)).max() / max(np.abs(b.read(n)).max(), 1e-30)) for n in arrays
        )
    trajectory = sp.Trajectory.load(args.run)
    sequences = sum(len(d) for d in lm.corpus().train.values())
    print(f"text example: {len(trajectory.checkpoints)} checkpoints, {sequences} sequences, k = {args.dim}, "
          f"{args.threads} threads, {args.repeats} repeats; the stores' {len(arrays)} arrays differ by at most "
          f"{worst:.1e} of their largest value")  # fmt: skip
    base = statistics.median(seconds["a forward per quantity"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:24s} median {median:6.1f} s  ({', '.join(f'{v:.1f}' for v in values)})  {base / median:.2f}×")


if __name__ == "__main__":
    main()
