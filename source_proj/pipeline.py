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
from source_proj.query.attributor import Attributor, QueryResult, check_k, check_queries
from source_proj.store.store import Store
from source_proj.tasks.task import Task, check_model_and_task
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
    overwrite: bool = False,
    grow: bool = False,
    progress: bool = True,
) -> QueryResult:
    """Featurize (or resume), fit and return the top-k training examples of each sign.

    A finished store at ``store_path`` with the same settings is reused as it is; an interrupted one
    is resumed. Scores follow score(q, z) = −Δf(q, z): positive = z raised the query's measurement, which helped
    it for a margin and harmed it for a loss or an error; the result carries which (see [`QueryResult`][]).

    Args:
        trajectory: the run recorded by [`TrajectoryRecorder`][] (or its directory).
        model: the architecture (its weights are replaced by each checkpoint's).
        task: what the model computes, its per-example loss and the measurement.
        train_data: the data the run was trained on (``dataset_size`` examples); a mapping
            ``{stage: dataset}`` for several stages. Example i of a stage is its row i in the results.
        queries: the examples to explain (a dataset, or a tuple of batched tensors).
        store_path: where the features go (a directory, or a URL such as ``s3://…``).
        top_k: how many examples of each sign to return per query.
        projection: the projection's kind, dimension k and seed.
        options: featurize's options (batch size, device, Fisher mode, …).
        fit_args: fit's options (segments, stages attributed, Fast-SOURCE).
        overwrite: replace a store featurized with other settings, and a method fitted with other settings:
            both are computed again. To fit other settings on the same features, name another method
            (``FitArguments(method=...)``), or call [`fit`][] with ``overwrite=True``.
        grow: the run at ``trajectory`` continued the store's (more checkpoints, a new stage): featurize only
            what is new (see [`featurize`][source_proj.featurize]).
        progress: show progress bars.

    Returns:
        ``[Q, top_k]`` ids and scores of the largest and most negative scores of each query, also named by what
        they mean for the task (``helpful_ids``, ``harmful_ids``, ``records()``).
    """
    # top_k and the queries are checked before the run is featurized (the attributed stages' size again at the query)
    check_model_and_task(model, task)
    check_queries(queries)
    if not isinstance(trajectory, Trajectory):
        trajectory = Trajectory.load(trajectory)
    check_k(top_k, sum(stage.dataset_size for stage in trajectory.stages))
    store: Store = featurize(
        trajectory, model, task, train_data, store_path, projection=projection, options=options, progress=progress,
        overwrite=overwrite, grow=grow,
    )  # fmt: skip
    fit(store, fit_args, progress=progress, device=options.device, overwrite=overwrite)
    attributor = Attributor(store, model, task, method=fit_args.name, trajectory=trajectory, device=options.device)
    return attributor.top_k(queries, top_k)
