"""The accuracy harness of issue 12: a setting's trajectories and exact LDS ground truth, cached, and
the LDS of any score matrix against it.

    import harness                                   # benchmarks/accuracy on sys.path
    h = harness.prepare("early")                     # trains/retrains once, then reads runs/accuracy/
    h.runs                                           # run dirs of the attributed models (seeds 0, 1, 2)
    h.build_model(), h.task, h.train_data            # what sp.featurize needs
    h.query_data("test")                             # a query set (two-stage: "upright", "transposed")
    r = h.lds(scores, "test")                        # scores [Q, N] of the attributed stage, positive = helpful
    print(r, h.reliability("test"))

Ground truth: ``subsets`` random half-subsets (α = 0.5) of the attributed stage × ``repeats`` retrains
each (fresh seeds for initialisation and shuffle; the other stages always kept), trained
``models_per_call`` at a time with :class:`source_proj.evaluation.BatchedRetrain`; the margins of
every query averaged over the retrains. LDS = mean over queries of the Spearman correlation between
Σ_{z∈S} score(q, z) and those margins, with a bootstrap 95 % interval over queries. Everything lives
in ``ROOT/<setting>-<hash of its definition>/``: change the data, recipe or checkpoints and a new
folder is used; an interrupted preparation resumes (every finished retrain is cached).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import settings as settings_module

import source_proj as sp
from source_proj import evaluation as ev
from source_proj.query.attributor import StageRows

ROOT = Path("runs/accuracy")


@dataclass
class Prepared:
    """A setting with its recorded models and its ground truth.

    Attributes:
        setting: the definition (data, model, recipe).
        folder: its cache folder.
        runs: trajectory folders of the attributed models, seeds 0, 1, … (model 0 = the single model).
        truth: the ground truth over every query set, measurements ``[M, R, Q_all]``.
        lds_args: how the ground truth was built and how the LDS is summarised.
        seconds: wall time of the ground truth's retraining in this call (0 when all were cached).
    """

    setting: settings_module.Setting
    folder: Path
    runs: list[Path]
    truth: ev.Counterfactuals
    lds_args: ev.LDSArguments
    seconds: float = 0.0
    task: sp.ClassificationTask = field(default_factory=sp.ClassificationTask)

    @property
    def rows(self) -> list[StageRows]:
        """The attributed rows (one stage): the columns of a score matrix."""
        return [StageRows(self.setting.attributed, 0, self.size)]

    @property
    def size(self) -> int:
        """N, the number of attributed training examples."""
        return next(st.size for st in self.setting.stages if st.name == self.setting.attributed)

    @property
    def train_data(self) -> dict[str, TensorDataset]:
        return self.setting.train_data

    @property
    def query_sets(self) -> list[str]:
        return list(self.setting.queries)

    def build_model(self, seed: int = 0) -> torch.nn.Module:
        return self.setting.build_model(seed)

    def query_data(self, name: str) -> TensorDataset:
        return self.setting.query_data(name)

    def truth_for(self, queries: str) -> ev.Counterfactuals:
        """The ground truth restricted to one query set."""
        cols = self.setting.query_slices()[queries]
        return self.truth.select(range(cols.start, cols.stop))

    def lds(self, scores: np.ndarray, queries: str | None = None) -> ev.Correlation:
        """LDS of ``scores [Q, N]`` (positive = helpful) on a query set, bootstrap 95 % CI over queries."""
        queries = queries or self.query_sets[0]
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(self.setting.queries[queries][1]), self.size):
            raise sp.TaskError(
                f"Scores of shape {scores.shape} do not match {queries!r}: they must be "
                f"[{len(self.setting.queries[queries][1])} queries, {self.size} attributed examples]."
            )
        return ev.lds(scores, self.truth_for(queries), self.lds_args)

    def reliability(self, queries: str | None = None) -> tuple[float, float]:
        """Split-half reliability of the ground truth and the LDS ceiling it implies.

        Returns (r, √ρ), ``ev.split_half_reliability`` of the ground truth: r the Spearman correlation of the
        half means of the retrains, √ρ the ceiling of any method's LDS.
        """
        return ev.split_half_reliability(self.truth_for(queries or self.query_sets[0]))

    def difference(self, a: np.ndarray, b: np.ndarray, queries: str | None = None) -> tuple[float, float, float]:
        """LDS(a) − LDS(b) on the same queries with its paired bootstrap 95 % interval over queries."""
        delta = self.lds(a, queries).per_query - self.lds(b, queries).per_query
        low, high = ev.query_interval(delta, self.lds_args)
        return float(np.nanmean(delta)), low, high


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a script that scores model 0 of one setting on its cached ground truth:
    ``--setting``, ``--mnist``, ``--subsets``, ``--repeats``, ``--root``, ``--out``, ``--threads``."""
    parser.add_argument("--setting", required=True)
    parser.add_argument("--mnist", default=None, help="folder of the MNIST IDX files (MNIST settings)")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--out", default=None, help="write the results as JSON here too")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")


def prepare_model_0(args: argparse.Namespace) -> Prepared:
    """``prepare`` for the options of ``add_setting_arguments`` (model 0 only), with ``--threads`` set."""
    torch.set_num_threads(args.threads)
    return prepare(
        args.setting, root=args.root, mnist=args.mnist, models=1, subsets=args.subsets, repeats=args.repeats,
        progress=False,
    )  # fmt: skip


def locate(
    name: str, *, root: str | Path = ROOT, mnist: str | Path | None = None, models: int = 3
) -> tuple[settings_module.Setting, Path, list[Path]]:
    """A setting, its cache folder and its attributed models' trajectories (trained once, then reused)."""
    s = settings_module.setting(name, mnist)
    folder = Path(root) / f"{name}-{s.key}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "setting.json").write_text(json.dumps({"name": name, **s.description}, indent=1))
    runs = []
    for seed in range(models):
        run = folder / f"run-{seed}"
        if not (run / "trajectory.json").exists() or not sp.Trajectory.load(run).complete:
            s.train_recorded(seed, run)
        runs.append(run)
    return s, folder, runs


def prepare(
    name: str,
    *,
    root: str | Path = ROOT,
    mnist: str | Path | None = None,
    models: int = 3,
    subsets: int = 100,
    repeats: int = 20,
    models_per_call: int = 200,
    device: str = "cpu",
    progress: bool = True,
) -> Prepared:
    """Train the attributed models and build the ground truth of a setting (or read them from the cache).

    Args:
        name: a setting of ``settings.SETTINGS``.
        root: the cache root.
        mnist: the folder of the MNIST IDX files (MNIST settings only).
        models: attributed models trained on all data with the recorder (seeds 0 … models−1).
        subsets, repeats: the LDS ground truth's M half-subsets and R retrains per subset.
        models_per_call: copies trained at once by the batched retraining.
        device: where the batched retraining runs (``"cuda"`` on a GPU machine).
    """
    s, folder, runs = locate(name, root=root, mnist=mnist, models=models)
    args = ev.LDSArguments(alpha=0.5, num_subsets=subsets, repeats=repeats, resample="queries")
    retrain = ev.BatchedRetrain(
        ev.BatchedSGD(s.build_model, sp.ClassificationTask(), s.stages, device=device),
        *s.all_queries(),
        models_per_call=models_per_call,
    )
    size = next(st.size for st in s.stages if st.name == s.attributed)
    start = time.perf_counter()
    truth = ev.lds_ground_truth(retrain, [StageRows(s.attributed, 0, size)], folder, args, progress=progress)
    return Prepared(s, folder, runs, truth, args, time.perf_counter() - start)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train the attributed models and build the LDS ground truths.")
    parser.add_argument("--settings", default="early,early-fast,converged,two-stage")
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--mnist", default=None, help="folder of the MNIST IDX files (MNIST settings)")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models-per-call", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.settings.split(","):
        h = prepare(
            name,
            root=args.root,
            mnist=args.mnist,
            models=args.models,
            subsets=args.subsets,
            repeats=args.repeats,
            models_per_call=args.models_per_call,
            device=args.device,
        )
        for queries in h.query_sets:
            r, ceiling = h.reliability(queries)
            print(
                f"{name} ({queries}): {h.truth.measurements.shape[0]} subsets × {h.truth.measurements.shape[1]} "
                f"retrains, split-half reliability {r:.3f}, LDS ceiling {ceiling:.3f}; "
                f"retraining took {h.seconds:.0f} s in this call; {h.folder}",
                flush=True,
            )


if __name__ == "__main__":
    main()
