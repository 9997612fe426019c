"""The eigen projection's basis pass: the Kronecker factors of the Fisher at every checkpoint, averaged
(``projection/eigen.py`` says what the basis is and why)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from source_proj.errors import NumericalError, TaskError, TrajectoryError
from source_proj.featurize.arguments import checkpoint_stages
from source_proj.featurize.factors import FactorCollector, kronecker_layers
from source_proj.projection.eigen import EigenBasis, _has_rest, basis_budget
from source_proj.projection.layers import FactoredLayer, factorable_layers
from source_proj.projection.transform import scaling_transform
from source_proj.tasks.gradients import PerExampleGradients, move_batch
from source_proj.tasks.task import Task
from source_proj.trajectory.preconditioner import checkpoint_preconditioner, steps_preconditioner
from source_proj.trajectory.recorder import Checkpoint, Stage, Trajectory
from source_proj.trajectory.segments import optimizer_rule


class NoBasis(TaskError):
    """The model has no layer the eigen projection can take a basis for (featurize falls back to 'rademacher')."""


def estimate_basis(
    trajectory: Trajectory,
    checkpoints: Sequence[Checkpoint],
    grads_fn: PerExampleGradients,
    task: Task,
    datasets: Mapping[str, Dataset],
    names: Sequence[str],
    dim: int,
    *,
    examples: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    inputs: str = "",
    progress: bool = False,
) -> EigenBasis:
    """The eigen projection's basis for k = ``dim``: one sampled-label Fisher pass over at most ``examples``
    examples (a seeded random subset) of each stage at each of ``checkpoints`` (on the stages featurize
    visits it on), each visit's factors normalised, then averaged. ``grads_fn``'s model is loaded with
    each checkpoint in turn."""
    model: nn.Module = grads_fn.model
    layers, _ = kronecker_layers(model, names)
    if not layers:
        raise NoBasis(
            "The eigen projection found no layer with Kronecker factors (nn.Linear, nn.Conv1d/2d, GPT-2 Conv1D) "
            "among the selected parameters."
        )
    factorable, _ = factorable_layers(model, names)
    shares = len(layers) < len(factorable) or _has_rest([(n, ()) for n in names], factorable)
    budget = basis_budget(dim, shares)
    collector = FactorCollector(grads_fn, layers, [])
    a_mean = [np.zeros((layer.in_rows, layer.in_rows)) for layer in layers]
    b_mean = [np.zeros((layer.out_features, layer.out_features)) for layer in layers]
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    subsets = {}
    for stage, data in datasets.items():
        size = len(data)  # type: ignore[arg-type]
        subsets[stage] = np.sort(rng.choice(size, min(size, examples), replace=False)).tolist()
    params = dict(model.named_parameters())
    rules = {st.name: optimizer_rule(st, {n: params[n].numel() for n in names}) for st in trajectory.stages}
    stages = {st.name: st for st in trajectory.stages}
    visits = [(c, stage) for c in checkpoints for stage in checkpoint_stages(trajectory, c)]
    total = sum(-(-len(subsets[stage]) // batch_size) for _, stage in visits)
    loaded = None
    with tqdm(total=total, desc="eigen basis", unit="batch", disable=not progress) as bar:
        for checkpoint, stage in visits:
            if loaded is not checkpoint:
                trajectory.load_into(model, checkpoint)
                loaded = checkpoint
            sums = collector.empty()
            done = 0
            for batch in DataLoader(Subset(datasets[stage], subsets[stage]), batch_size=batch_size):
                batch = move_batch(batch, device)
                rows = subsets[stage][done : done + batch_size]
                draw = _drawer(task, batch, generator, rows, f"checkpoint {checkpoint.file}")
                try:
                    collector.add_shared(sums, batch, draw)
                except _Refused as refused:  # the inputs' fault, not the layers'
                    raise refused.error from None
                except TaskError as err:  # the layers' structure (inputs not batch-first, unused layers)
                    reason = str(err).split(";")[0].rstrip(".")  # the cause, without the advice for curvature='kfac'
                    why = f"The eigen projection cannot take this model's Kronecker factors ({reason})."
                    raise NoBasis(why) from err
                done += batch_size
                bar.update()
            adam = rules[stage].preconditioned
            sides = _adam_sides(trajectory, checkpoint, stages[stage], names, layers) if adam else None
            for i in range(len(layers)):
                a, b = sums.a[i].numpy() / max(sums.positions[i], 1), sums.b[i].numpy() / max(sums.examples, 1)
                if sides is not None:
                    row, col = sides[i]
                    a, b = a * np.outer(col, col), b * np.outer(row, row)
                a_mean[i] += a
                b_mean[i] += b
    for i, layer in enumerate(layers):
        if not (np.isfinite(a_mean[i]).all() and np.isfinite(b_mean[i]).all()):
            raise TaskError(
                f"The Kronecker factors of layer {layer.module!r} are not finite at some checkpoint; the eigen "
                "projection cannot be estimated (featurize with the 'factored' projection to find the example)."
            )
    return EigenBasis.from_factors(
        [layer.module for layer in layers],
        [a / len(visits) for a in a_mean],
        [b / len(visits) for b in b_mean],
        budget,
        sorted({c.step for c, _ in visits}),
        examples,
        inputs,
    )


def _adam_sides(
    trajectory: Trajectory, checkpoint: Checkpoint, stage: Stage, names: Sequence[str], layers: Sequence[FactoredLayer]
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Per layer the rank-one factors (row r, column c) of D^{-1/2} ≈ r cᵀ for the steps after ``checkpoint``
    (the stage's last checkpoint: its own state); ``None`` where no state says (the raw factors are used)."""
    try:
        d = steps_preconditioner(trajectory, stage, checkpoint.step, checkpoint.step + 1, names)
    except TrajectoryError:
        try:
            d = checkpoint_preconditioner(trajectory, checkpoint, stage, names)
        except TrajectoryError:
            return None
    scale = {n: v.rsqrt() for n, v in d.items()}
    sides = []
    for layer in layers:
        terms = scaling_transform(scale, [layer], rank=1).layer(layer.weight)
        assert terms is not None
        sides.append((terms.left[0].double().numpy(), terms.right[0].double().numpy()))
    return sides


class _Refused(Exception):
    """An error of the inputs raised while drawing the Fisher's labels, passed through the layers' TaskErrors."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _drawer(
    task: Task, batch: object, generator: torch.Generator, rows: Sequence[int], where: str
) -> Callable[[torch.Tensor], Sequence[tuple[torch.Tensor, object]]]:
    """The Fisher's targets from a batch's outputs, after checking its labels and that the outputs are finite
    (``rows``: the examples' indices in their stage's data, for the error)."""

    def draw(outputs: torch.Tensor) -> Sequence[tuple[torch.Tensor, object]]:
        try:
            task.loss(outputs, batch)  # validates the targets
            bad = ~torch.isfinite(outputs.reshape(outputs.shape[0], -1)).all(dim=1)
            if bad.any():  # before labels are drawn from them
                row = rows[int(torch.nonzero(bad)[0, 0])]
                raise NumericalError(
                    f"The output of training example {row} at {where} is NaN or infinite; check that example's "
                    "input and label, and the checkpoint's weights."
                )
            return task.fisher_targets(outputs, batch, generator)
        except Exception as err:
            raise _Refused(err) from err

    return draw
