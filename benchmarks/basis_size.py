"""How many examples the eigen projection's basis needs, by kind of model: faithfulness against exact gradients.

    python benchmarks/basis_size.py --mnist ../shared/data/mnist [--examples 2048,512,128,32] [--dim 1024]

The basis pass visits ``basis_examples`` examples, and each gives the factors at most ``basis_positions`` (64)
positions: an MLP's example one, a convolution's 64 of its output pixels (each its input patch). Is what the
factors need examples, or sampled positions? Two models on the same 6,144 MNIST training images, each trained
one epoch with SGD (momentum 0.9, lr 0.03, batches of 64) under ``TrajectoryRecorder``:

- ``mlp``: 784-512-256-128-10 (the SOURCE paper's MNIST MLP; factors up to 785 wide, one position an example);
- ``cnn``: conv 1→32 (3 × 3, stride 2, 13 × 13 outputs) → conv 32→64 (3 × 3, stride 2, 6 × 6) → linear 2,304→10
  (factors up to 2,305 wide; 169 and 36 positions an example, 64 and 36 of them sampled).

For each, the exact per-example loss gradients of the first ``--pairs-of`` training images (materialised,
float64) give the exact inner products of every pair; the eigen projection at k = ``--dim`` with its basis
estimated at the final checkpoint from E of the training images (a seeded subset; each E of ``--examples``)
gives the projected ones; printed: Spearman correlation over all pairs, the basis's sampled positions, and the
basis pass's seconds. The same measure as ``transformer_cpu.py``'s faithfulness column (there: a GPT-2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent / "accuracy"))
import settings as accuracy_settings

import source_proj as sp
from source_proj.featurize.basis import BasisPass, estimate_basis
from source_proj.projection.factory import make_projector
from source_proj.tasks.gradients import PerExampleGradients


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                             nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))  # fmt: skip
    return nn.Sequential(nn.Conv2d(1, 32, 3, stride=2), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64 * 6 * 6, 10))  # fmt: skip


def train(kind: str, data: TensorDataset, run: Path) -> nn.Module:
    model = build(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    recorder = sp.TrajectoryRecorder(run, model, optimizer, save_every=48, overwrite=True)
    recorder.begin_stage("main", dataset_size=len(data))
    x, y = data.tensors
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    for start in range(0, len(y), 64):
        rows = order[start : start + 64]
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recorder.step()
    recorder.close()
    return model


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    upper = np.triu_indices(a.shape[0], 1)
    return float(spearmanr(a[upper], b[upper]).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", required=True, help="folder of the MNIST IDX files")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--examples", default="2048,512,128,32", help="basis_examples values to compare")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--pairs-of", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y, _, _ = accuracy_settings._mnist(Path(args.mnist))
    data = TensorDataset(x.reshape(-1, 1, 28, 28), y)
    task = sp.ClassificationTask()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            model = train(kind, data, Path(tmp) / kind)
            model.eval()
            trajectory = sp.Trajectory.load(Path(tmp) / kind)
            names = task.select_parameters(model)
            params = dict(model.named_parameters())
            grads_fn = PerExampleGradients(model, task, names)
            few = (data.tensors[0][: args.pairs_of], data.tensors[1][: args.pairs_of])
            exact = grads_fn(few)
            flat = torch.cat([exact[n].reshape(args.pairs_of, -1).double() for n in names], 1)
            truth = (flat @ flat.T).numpy()
            results[kind] = []
            for examples in (int(e) for e in args.examples.split(",")):
                start = time.perf_counter()
                pass_ = BasisPass(grads_fn, task, {"main": data}, names, args.dim, examples=examples, seed=0,
                                  batch_size=64, device=torch.device("cpu"), positions=64)  # fmt: skip
                basis = estimate_basis(trajectory, [trajectory.final_checkpoint], pass_)
                seconds = time.perf_counter() - start
                model.eval()
                projector = make_projector("eigen", [(n, tuple(params[n].shape)) for n in names], args.dim, 0,
                                           model=model, basis=basis)  # fmt: skip
                features = projector.project_batch(grads_fn, few).double()
                row = {"examples": examples, "spearman": spearman((features @ features.T).numpy(), truth),
                       "captured": basis.captured, "seconds": seconds}  # fmt: skip
                results[kind].append(row)
                print(f"{kind}: basis from {examples} examples: Spearman {row['spearman']:.4f}, Fisher trace kept "
                      f"{basis.captured:.3f}, basis pass {seconds:.1f} s", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
