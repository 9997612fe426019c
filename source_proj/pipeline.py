"""The whole spine in one call: featurize → fit → top-k."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from source_proj.featurize.arguments import FeaturizeArguments, ProjectionArguments
from source_proj.featurize.featurize import featurize
from source_proj.methods.fit import FitArguments, fit
from source_proj.query.attributor import Attributor, QueryResult
from source_proj.store.store import Store
from source_proj.tasks.task import Task
from source_proj.trajectory.recorder import Trajectory


def attribute(
    trajectory: Trajectory | str | Path,
    model: nn.Module,
    task: Task,
    train_data: Dataset | Mapping[str, Dataset],
    queries: Dataset | Sequence[Any],
    store_path: str | Path,
    *,
    top_k: int = 10,
    projection: ProjectionArguments = ProjectionArguments(),
    options: FeaturizeArguments = FeaturizeArguments(),
    fit_args: FitArguments = FitArguments(),
    progress: bool = True,
) -> QueryResult:
    """Featurize (or resume), fit and return the top-k helpful and harmful training examples.

    A finished store at ``store_path`` with the same settings is reused as it is.
    """
    store: Store = featurize(
        trajectory, model, task, train_data, store_path, projection=projection, options=options, progress=progress
    )
    fit(store, fit_args, progress=progress, device=options.device)
    attributor = Attributor(store, model, task, method=fit_args.name, trajectory=trajectory, device=options.device)
    return attributor.top_k(queries, top_k)
