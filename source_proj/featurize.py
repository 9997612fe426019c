"""featurize: per-checkpoint projected training gradients and Fisher factors into a store.

For every checkpoint c and every example z_i of the stage the checkpoint belongs to, the store
receives G̃_c[i] = P ∇ℓ(z_i; θ_c) and the Fisher factors ũ_i = P ∇ℓ(x_i, ŷ_i; θ_c) with ŷ_i drawn
from the model's predictive distribution (SOURCE_MATH.md §4). The final checkpoint is featurized
on every stage's data (baselines such as TRAK use it). Work is done in row chunks that are
written whole and then marked complete, so an interrupted run resumes where it stopped and ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from . import __version__
from .errors import NumericalError, StoreError, TaskError
from .gradients import PerExampleGradients, Precision, move_batch
from .projection import Projector, make_projector
from .store import Store, ckpt_key
from .task import Task
from .trajectory import Checkpoint, Trajectory

FisherMode = Literal["sampled", "exact", "empirical"]


@dataclass(frozen=True)
class ProjectionArguments:
    """How gradients are projected.

    Attributes:
        dim: k, the projection dimension (ignored by ``"identity"``).
        seed: the projection's seed; the same seed gives the same P everywhere.
        kind: ``"rademacher"`` (±1/√k entries, the default), ``"factored"`` (per-layer Kronecker
            P_out ⊗ P_in of Linear/Conv layers, no per-example gradients materialised; see
            ``factored.py``), ``"fast_jl"`` (TRAK's CUDA kernel, its own matrix), ``"auto"``
            (fast_jl where CUDA and fast_jl are present, else rademacher) or ``"identity"``
            (no projection, k = p). The store records the kind used; queries rebuild it.
    """

    dim: int = 1024
    seed: int = 0
    kind: str = "rademacher"


@dataclass(frozen=True)
class FeaturizeArguments:
    """How featurize computes and stores gradients.

    Attributes:
        batch_size: examples per forward/backward batch.
        chunk_rows: examples per store chunk (the unit of resumption); a multiple of ``batch_size`` is best.
        fisher: ``"sampled"`` true Fisher with labels drawn from the model (default, SOURCE_MATH §4);
            ``"exact"`` the Gauss–Newton expectation enumerated (one gradient per class: small tasks);
            ``"empirical"`` the observed-label gradients (no extra storage, cheaper, biased).
        seed: seed of the Fisher's label sampling.
        device: ``"cuda"``, ``"cpu"``…; default: CUDA when available.
        num_workers: DataLoader workers overlapping data loading with compute.
        vmap_chunk: examples per vectorised gradient chunk (bounds memory); ``None`` = the batch.
        precision: ``"fp32"`` (default) or ``"bf16"``: forward and backward under bfloat16
            autocast, projections accumulated in fp32 (faster on GPUs; see README "GPU and speed").
    """

    batch_size: int = 64
    chunk_rows: int = 1024
    fisher: FisherMode = "sampled"
    seed: int = 0
    device: str | None = None
    num_workers: int = 0
    vmap_chunk: int | None = None
    precision: Precision = "fp32"


def default_device(device: str | None) -> torch.device:
    """``device``, or CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_stage_datasets(data: Dataset | Mapping[str, Dataset], trajectory: Trajectory) -> dict[str, Dataset]:
    """Map each stage name to its dataset; a single dataset serves a single-stage trajectory."""
    names = [s.name for s in trajectory.stages]
    if not isinstance(data, Mapping):
        if len(names) != 1:
            raise TaskError(
                f"The trajectory has stages {names}; pass a dict mapping each stage name to its training dataset."
            )
        data = {names[0]: data}
    missing = [n for n in names if n not in data]
    if missing:
        raise TaskError(f"No training dataset was given for stage(s) {missing}; pass one per stage.")
    for stage in trajectory.stages:
        size = len(data[stage.name])  # type: ignore[arg-type]
        if size == 0:
            raise TaskError(
                f"The training dataset of stage {stage.name!r} is empty; pass the data the stage was trained on."
            )
        if size != stage.dataset_size:
            raise TaskError(
                f"Stage {stage.name!r} was trained on {stage.dataset_size} examples but its dataset has {size}; "
                "pass the same training set, in the same order."
            )
    return {n: data[n] for n in names}


def checkpoint_stages(trajectory: Trajectory, checkpoint: Checkpoint) -> list[str]:
    """Stages whose data a checkpoint is featurized on: the stage it lies in, the stage it closes,
    and every stage for the final checkpoint."""
    if checkpoint == trajectory.final_checkpoint:
        return [s.name for s in trajectory.stages]
    return [s.name for s in trajectory.stages if s.start_step <= checkpoint.step <= s.end_step]


def featurize(
    trajectory: Trajectory | str | Path,
    model: nn.Module,
    task: Task,
    train_data: Dataset | Mapping[str, Dataset],
    store_path: str | Path,
    *,
    projection: ProjectionArguments = ProjectionArguments(),
    options: FeaturizeArguments = FeaturizeArguments(),
    overwrite: bool = False,
    spec: str | None = None,
    progress: bool = True,
) -> Store:
    """Project every checkpoint's per-example training gradients into a store.

    Args:
        trajectory: the recorded run (or its directory).
        model: the architecture; each checkpoint's weights are loaded into a copy of it.
        task: loss, measurement and parameter selection.
        train_data: the training set (or a dict ``stage → dataset``), in training order.
        store_path: where the store is written; an unfinished store there is resumed.
        projection: projection kind, dimension and seed.
        options: batch sizes, chunking, Fisher mode, device.
        overwrite: replace an existing store of other settings, or a finished one.
        spec: path of the experiment spec file that built the inputs (lets the CLI re-create them).
        progress: show a progress bar.

    Returns:
        The store, with ``grads/<stage>/<ckpt>`` of shape ``[N_stage, k]`` for every checkpoint.
    """
    if not isinstance(trajectory, Trajectory):
        trajectory = Trajectory.load(trajectory)
    if not trajectory.complete:
        raise StoreError(
            f"The trajectory at {trajectory.path} is incomplete (training was interrupted or close() was not called); "
            "finish training or call TrajectoryRecorder.close()."
        )
    datasets = as_stage_datasets(train_data, trajectory)
    device = default_device(options.device)
    work_model = copy.deepcopy(model).to(device)
    trajectory.load_into(work_model, trajectory.final_checkpoint)
    names = task.select_parameters(work_model)
    params = dict(work_model.named_parameters())
    shapes = [(n, tuple(params[n].shape)) for n in names]
    projector = make_projector(projection.kind, shapes, projection.dim, projection.seed, model=work_model)
    grads_fn = PerExampleGradients(
        work_model, task, names, vmap_chunk=options.vmap_chunk, precision=options.precision
    )
    directions = _fisher_directions(grads_fn, task, datasets, options, device)

    meta = {
        "library_version": __version__,
        "params": [[n, list(s)] for n, s in shapes],
        "projection": projector.describe(),
        "task": task.describe(),
        "featurize": {
            "chunk_rows": options.chunk_rows,
            "fisher": options.fisher,
            "seed": options.seed,
            "precision": options.precision,
            "fisher_directions": directions,
        },
        "trajectory": {
            "path": str(Path(trajectory.path).resolve()),
            "fingerprint": trajectory.fingerprint(),
            "stages": [asdict(s) for s in trajectory.stages],
            "checkpoints": [c.step for c in trajectory.checkpoints],
        },
        "spec": spec,
    }
    store = _open_or_create(store_path, meta, overwrite)
    if not store.has("trajectory/lr"):
        store.write_whole("trajectory/lr", trajectory.lr.astype(np.float64))

    k = projector.dim
    work = []
    for ckpt in trajectory.checkpoints:
        for stage in checkpoint_stages(trajectory, ckpt):
            n = len(datasets[stage])  # type: ignore[arg-type]
            gname = f"grads/{stage}/{ckpt_key(ckpt.step)}"
            store.require_array(gname, (n, k), options.chunk_rows, "float32")
            if options.fisher != "empirical":
                store.require_array(
                    f"fisher/{stage}/{ckpt_key(ckpt.step)}",
                    (n * directions, k),
                    options.chunk_rows * directions,
                    "float32",
                )
            pending = store.pending_chunks(gname)
            if options.fisher != "empirical":
                pending = sorted(set(pending) | set(store.pending_chunks(f"fisher/{stage}/{ckpt_key(ckpt.step)}")))
            work.extend((ckpt, stage, chunk) for chunk in pending)

    loaded: Checkpoint | None = None
    stage_index = {s.name: i for i, s in enumerate(trajectory.stages)}
    ckpt_index = {c.step: i for i, c in enumerate(trajectory.checkpoints)}
    for ckpt, stage, chunk in tqdm(work, desc="featurize", unit="chunk", disable=not progress):
        if loaded != ckpt:
            trajectory.load_into(work_model, ckpt)
            loaded = ckpt
        seed = np.random.SeedSequence([options.seed, ckpt_index[ckpt.step], stage_index[stage], chunk])
        generator = torch.Generator().manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0] >> 1))
        start = chunk * options.chunk_rows
        stop = min(len(datasets[stage]), start + options.chunk_rows)  # type: ignore[arg-type]
        feats, fisher = _featurize_rows(
            grads_fn,
            projector,
            task,
            datasets[stage],
            start,
            stop,
            options,
            generator,
            device,
            where=f"checkpoint {ckpt.file}, stage {stage!r}",
        )
        key = ckpt_key(ckpt.step)
        if fisher is not None:
            store.write_chunk(f"fisher/{stage}/{key}", chunk, fisher)
        store.write_chunk(f"grads/{stage}/{key}", chunk, feats)
    return store


def _open_or_create(path: str | Path, meta: dict[str, Any], overwrite: bool) -> Store:
    try:
        existing = Store.open(path, writable=True)
    except StoreError:
        return Store.create(path, meta, overwrite=overwrite)
    old = existing.meta
    differing = [key for key in meta if key not in ("library_version", "spec") and old.get(key) != meta[key]]
    if not differing:
        return existing
    if overwrite:
        return Store.create(path, meta, overwrite=True)
    raise StoreError(
        f"The store at {path} was featurized with other settings ({', '.join(differing)}); pass --force "
        "(overwrite=True) to replace it, or use another store path."
    )


def _fisher_directions(
    grads_fn: PerExampleGradients,
    task: Task,
    datasets: Mapping[str, Dataset],
    options: FeaturizeArguments,
    device: torch.device,
) -> int:
    if options.fisher == "empirical":
        return 0
    if options.fisher not in ("sampled", "exact"):
        raise TaskError(f"Unknown Fisher mode {options.fisher!r}; use 'sampled', 'exact' or 'empirical'.")
    if options.fisher == "sampled":
        return 1
    first = next(iter(datasets.values()))
    batch = move_batch(next(iter(DataLoader(Subset(first, [0]), batch_size=1))), device)
    return len(task.fisher_targets(grads_fn.outputs(batch), batch, None))


def _featurize_rows(
    grads_fn: PerExampleGradients,
    projector: Projector,
    task: Task,
    dataset: Dataset,
    start: int,
    stop: int,
    options: FeaturizeArguments,
    generator: torch.Generator,
    device: torch.device,
    where: str,
) -> tuple[np.ndarray, np.ndarray | None]:
    loader = DataLoader(
        Subset(dataset, range(start, stop)),
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.num_workers,
        pin_memory=device.type == "cuda",
    )
    feats, fisher = [], []
    for batch in loader:
        batch = move_batch(batch, device)
        outputs = grads_fn.outputs(batch)
        task.loss(outputs, batch)  # validates targets (label ranges) outside vmap
        projected = projector.project_batch(grads_fn, batch, "loss")
        feats.append(projected)
        if options.fisher != "empirical":
            gen = generator if options.fisher == "sampled" else None
            per_direction = []
            for weight, target_batch in task.fisher_targets(outputs.detach(), batch, gen):
                u = projector.project_batch(grads_fn, target_batch, "loss") * weight.sqrt().unsqueeze(-1).float()
                per_direction.append(u)
            fisher.append(torch.stack(per_direction, dim=1).reshape(-1, projector.dim))
    # Features stay on the device until the chunk is done: one copy and one check per chunk.
    all_feats = torch.cat(feats)
    _check_finite(all_feats, start, where, "training-loss gradient")
    if not fisher:
        return all_feats.cpu().numpy(), None
    all_fisher = torch.cat(fisher)
    _check_finite(all_fisher.reshape(all_feats.shape[0], -1), start, where, "Fisher (sampled-label) gradient")
    return all_feats.cpu().numpy(), all_fisher.cpu().numpy()


def _check_finite(values: torch.Tensor, first_row: int, where: str, what: str) -> None:
    bad = ~torch.isfinite(values).all(dim=1)
    if bad.any():
        example = first_row + int(torch.nonzero(bad)[0, 0])
        raise NumericalError(
            f"The {what} of training example {example} at {where} is NaN or infinite; check that example's "
            "input and label, and the checkpoint's weights."
        )
