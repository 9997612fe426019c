"""Does SOURCE through the smoothed loss of a run trained on smoothed labels change its LDS?

A run trained with label smoothing ε (``F.cross_entropy(..., label_smoothing=ε)``, the Hugging Face Trainer's
``label_smoothing_factor``) takes each example's gradient of (1 − ε)·CE(y) + ε·mean_c CE(c). Before, the library's
tasks had plain cross-entropy only, so SOURCE attributed through the gradients of a loss the run did not train on
(the Trainer's callback warned, a plain loop heard nothing). The tasks now take ``label_smoothing=ε`` and the
recorder keeps each stage's ε; this measures both on the same checkpoints.

The setting, fixed before any result: sklearn's digits as in ``momentum_cycle_lds.py`` (1,297 training images,
inputs /16, the first 200 test images as queries, margin), the ReLU MLP 64-128-128-10, SGD momentum 0.9, weight
decay 1e-3, a constant rate, batches of 32, a checkpoint every half epoch, labels smoothed by ``--smoothing``.
Ground truth: random halves of the training set, ``--subsets`` × ``--repeats`` retrains with the same recipe (a
retrain drops the examples it does not keep from each batch of the full run's order). Both stores: the library's
defaults (eigen projection, one segment) at k = ``--dim``; "plain loss" is the same run with its ``label_smoothing``
taken out of ``trajectory.json``, attributed with ``ClassificationTask()``, as before.

    python benchmarks/label_smoothing_lds.py --epochs 3 --smoothing 0.1 --out runs/smoothing-3-0.1
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
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.evaluation.lds import LDSArguments, lds, lds_ground_truth

try:
    from methods_lds import train_kept
    from momentum_cycle_lds import BATCH, SAVE_PER_EPOCH, build_model, digits, margins
except ImportError:  # imported as benchmarks.label_smoothing_lds
    from benchmarks.methods_lds import train_kept
    from benchmarks.momentum_cycle_lds import BATCH, SAVE_PER_EPOCH, build_model, digits, margins


class Training:
    """The recipe, for the recorded run (``keep`` None, a recorder) and for the retrains (picklable)."""

    def __init__(self, epochs: int, lr: float, smoothing: float) -> None:
        self.epochs, self.lr, self.smoothing = epochs, lr, smoothing
        self.x, self.y, self.qx, self.qy = digits()

    def train(self, seed: int, keep: np.ndarray | None = None, run: Path | None = None) -> torch.nn.Module:
        model = build_model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)
        rec = None
        if run is not None:
            per_epoch = -(-len(self.y) // BATCH)
            rec = sp.TrajectoryRecorder(run, model, opt, save_every=per_epoch // SAVE_PER_EPOCH, overwrite=True)
            rec.begin_stage("main", dataset_size=len(self.y), label_smoothing=self.smoothing)
        train_kept(lambda rows: F.cross_entropy(model(self.x[rows]), self.y[rows], label_smoothing=self.smoothing),
                   opt, len(self.y), BATCH, self.epochs, seed, keep, rec)  # fmt: skip
        return model

    def __call__(self, keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        model = self.train(seed, keep["main"]).eval()
        with torch.no_grad():
            return margins(model(self.qx), self.qy).numpy().astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/label-smoothing"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    training = Training(args.epochs, args.lr, args.smoothing)
    run = out / "run"
    if not (run / "trajectory.json").is_file() or not json.loads((run / "trajectory.json").read_text())["complete"]:
        training.train(0, run=run)
    plain_run = out / "run-plain-loss"
    if not plain_run.is_dir():
        shutil.copytree(run, plain_run)
        index = json.loads((run / "trajectory.json").read_text())
        for stage in index["stages"]:
            stage.pop("label_smoothing", None)
        (plain_run / "trajectory.json").write_text(json.dumps(index, indent=1))

    data = TensorDataset(training.x, training.y)
    queries = TensorDataset(training.qx, training.qy)
    settings = {"smoothed loss": (run, sp.ClassificationTask(label_smoothing=args.smoothing)),
                "plain loss": (plain_run, sp.ClassificationTask())}  # fmt: skip
    scores, seconds = {}, {}
    for name, (folder, task) in settings.items():
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

    lds_args = LDSArguments(num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    truth = lds_ground_truth(training, rows, out / "retrains", lds_args)
    results = {name: lds(s, truth, lds_args) for name, s in scores.items()}
    diff = results["smoothed loss"].per_query - results["plain loss"].per_query
    diff = diff[np.isfinite(diff)]
    rng = np.random.default_rng(0)
    boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
    low, high = np.percentile(boot, [2.5, 97.5])
    a, b = (scores[name].ravel() for name in settings)
    report = {name: {"lds": r.mean, "ci": [r.low, r.high], "seconds": seconds[name]} for name, r in results.items()}
    report["difference"] = {"mean": float(diff.mean()), "ci": [float(low), float(high)]}
    report["score_correlation"] = float(np.corrcoef(a, b)[0, 1])
    for name, r in results.items():
        print(f"{name}: LDS {r.mean:.3f} [{r.low:.3f}, {r.high:.3f}]")
    print(f"smoothed − plain, per query: {diff.mean():+.3f} [{low:+.3f}, {high:+.3f}]; "
          f"score correlation {report['score_correlation']:.3f}")  # fmt: skip
    (out / "result.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
