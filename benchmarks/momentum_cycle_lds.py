"""Does SOURCE following a cycled momentum step by step change its LDS? (OneCycleLR's ``cycle_momentum``)

``OneCycleLR`` moves SGD's momentum against the rate, 0.95 → 0.85 → 0.95 by default, so a step's effective rate
η_k/(1−β_k) varies by 3× in β alone. The recorder keeps every step's β_k (``trajectory.json``'s ``"momentum"``)
and SOURCE's step sizes follow it; before, every step took the β the stage began with (0.95: the schedule's
start), which overstates the segment's time η̄K about twofold. This measures both on the same checkpoints.

The setting, fixed before any result: sklearn's digits as in ``accuracy/settings.py`` (1,297 training images,
inputs /16, the first 200 test images as queries, margin), the ReLU MLP 64-128-128-10, SGD momentum 0.9, weight
decay 1e-3, batches of 32, ``OneCycleLR(max_lr, total_steps, base_momentum=0.85, max_momentum=0.95)`` (its other
defaults: 30 % warm-up, cosine), a checkpoint every half epoch. Ground truth: random halves of the training set,
``--subsets`` × ``--repeats`` retrains with the same recipe (a retrain drops the examples it does not keep from
each batch of the full run's order, as the accuracy settings' retrainer does). Both stores: the library's
defaults (eigen projection, one segment) at k = ``--dim``; "first β" is the same run with ``"momentum"`` taken
out of its ``trajectory.json``, so SOURCE takes the stage's first momentum for every step, as before.

    python benchmarks/momentum_cycle_lds.py --epochs 3 --out runs/momentum-cycle-3
    python benchmarks/momentum_cycle_lds.py --epochs 10 --out runs/momentum-cycle-10
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.evaluation.lds import LDSArguments, lds, lds_ground_truth

try:
    from methods_lds import train_kept
except ImportError:  # imported as benchmarks.momentum_cycle_lds
    from benchmarks.methods_lds import train_kept

BATCH, SAVE_PER_EPOCH = 32, 2


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1297], y[:1297], x[1297:1497], y[1297:1497]


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


class Training:
    """The recipe, for the recorded run (``keep`` None, a recorder) and for the retrains (picklable)."""

    def __init__(self, epochs: int, max_lr: float) -> None:
        self.epochs, self.max_lr = epochs, max_lr
        self.x, self.y, self.qx, self.qy = digits()

    def steps_per_epoch(self) -> int:
        return -(-len(self.y) // BATCH)

    def train(self, seed: int, keep: np.ndarray | None = None, run: Path | None = None) -> nn.Module:
        model = build_model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=self.max_lr, momentum=0.9, weight_decay=1e-3)
        total = self.epochs * self.steps_per_epoch()
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.max_lr, total_steps=total,
                                                    base_momentum=0.85, max_momentum=0.95)  # fmt: skip
        rec = None
        if run is not None:
            rec = sp.TrajectoryRecorder(run, model, opt, save_every=self.steps_per_epoch() // SAVE_PER_EPOCH,
                                        overwrite=True)  # fmt: skip
            rec.begin_stage("main", dataset_size=len(self.y))
        train_kept(lambda rows: F.cross_entropy(model(self.x[rows]), self.y[rows]), opt, len(self.y), BATCH,
                   self.epochs, seed, keep, rec, sched.step)  # fmt: skip
        return model

    def __call__(self, keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        model = self.train(seed, keep["main"]).eval()
        with torch.no_grad():
            return margins(model(self.qx), self.qy).numpy().astype(np.float64)


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    right = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return right - others.logsumexp(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-lr", type=float, default=0.05)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/momentum-cycle"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    training = Training(args.epochs, args.max_lr)
    run = out / "run"
    if not (run / "trajectory.json").is_file() or not json.loads((run / "trajectory.json").read_text())["complete"]:
        training.train(0, run=run)
    index = json.loads((run / "trajectory.json").read_text())
    betas = [b for b in index.get("momentum", []) if b is not None]
    print(f"recorded {len(index['lr'])} steps; momentum from {min(betas):.3f} to {max(betas):.3f}" if betas
          else "recorded no moving momentum")  # fmt: skip
    first = out / "run-first-beta"
    if not first.is_dir():
        shutil.copytree(run, first)
        stripped = {k: v for k, v in index.items() if k != "momentum"}
        (first / "trajectory.json").write_text(json.dumps(stripped, indent=1))

    data = TensorDataset(training.x, training.y)
    queries = TensorDataset(training.qx, training.qy)
    task = sp.ClassificationTask()
    scores, seconds = {}, {}
    for name, folder in (("per-step β", run), ("first β", first)):
        store = out / f"{folder.name}.sp"
        started = time.perf_counter()
        if not store.is_dir() or not sp.Store.open(store).meta.get("featurized"):  # new, or resumed
            sp.featurize(folder, build_model(0), task, data, store, projection=sp.ProjectionArguments(dim=args.dim),
                         progress=False)  # fmt: skip
            sp.fit(store, progress=False)
        seconds[name] = time.perf_counter() - started
        attributor = sp.Attributor(store, build_model(0), task)
        scores[name] = attributor.scores(queries)
        rows = attributor.rows
        traj = sp.Trajectory.load(folder)
        sizes = {n: p.numel() for n, p in build_model(0).named_parameters()}
        (segment,) = sp.make_segments(traj.stages, [c.step for c in traj.checkpoints], traj.lr, sizes)
        print(f"{name}: the segment's time η̄K = {segment.time:.2f}")

    lds_args = LDSArguments(num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    truth = lds_ground_truth(training, rows, out / "retrains", lds_args)
    results = {name: lds(s, truth, lds_args) for name, s in scores.items()}
    diff = results["per-step β"].per_query - results["first β"].per_query
    diff = diff[np.isfinite(diff)]
    rng = np.random.default_rng(0)
    boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
    low, high = np.percentile(boot, [2.5, 97.5])
    report = {name: {"lds": r.mean, "ci": [r.low, r.high], "seconds": seconds[name]} for name, r in results.items()}
    report["difference"] = {"mean": float(diff.mean()), "ci": [float(low), float(high)]}
    for name, r in results.items():
        print(f"{name}: LDS {r.mean:.3f} [{r.low:.3f}, {r.high:.3f}]")
    print(f"per-step − first, per query: {diff.mean():+.3f} [{low:+.3f}, {high:+.3f}]")
    (out / "result.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
