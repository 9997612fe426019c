"""The eigen projection's basis pass: the Kronecker factors of the Fisher at every checkpoint, averaged
(``projection/eigen.py`` says what the basis is and why)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from source_proj.errors import TaskError
from source_proj.featurize.arguments import checkpoint_stages
from source_proj.featurize.factors import FactorCollector, kronecker_layers
from source_proj.projection.eigen import EigenBasis, _has_rest, basis_budget
from source_proj.projection.layers import factorable_layers
from source_proj.tasks.gradients import PerExampleGradients, move_batch
from source_proj.tasks.task import Task
from source_proj.trajectory.recorder import Checkpoint, Trajectory


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
        raise TaskError(
            "The eigen projection found no layer with Kronecker factors (nn.Linear, nn.Conv1d/2d, GPT-2 Conv1D) "
            "among the selected parameters; use the 'rademacher' projection for this model."
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
    visits = [(c, stage) for c in checkpoints for stage in checkpoint_stages(trajectory, c)]
    total = sum(-(-len(subsets[stage]) // batch_size) for _, stage in visits)
    loaded = None
    with tqdm(total=total, desc="eigen basis", unit="batch", disable=not progress) as bar:
        for checkpoint, stage in visits:
            if loaded is not checkpoint:
                trajectory.load_into(model, checkpoint)
                loaded = checkpoint
            sums = collector.empty()
            for batch in DataLoader(Subset(datasets[stage], subsets[stage]), batch_size=batch_size):
                batch = move_batch(batch, device)
                outputs = grads_fn.outputs(batch).detach()
                task.loss(outputs, batch)  # validates the targets outside the hooks
                collector.add(sums, task.fisher_targets(outputs, batch, generator))
                bar.update()
            for i in range(len(layers)):
                a_mean[i] += sums.a[i].numpy() / max(sums.positions[i], 1)
                b_mean[i] += sums.b[i].numpy() / max(sums.examples, 1)
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
