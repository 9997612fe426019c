"""Batched retraining: M copies of one model trained at once with ``torch.func``.

An LDS ground truth retrains the same small model thousands of times on different kept subsets.
Training the copies one after another (or one per worker process) leaves a CPU or GPU mostly idle;
here the M copies' parameters are stacked ``[M, ...]`` and every step is one ``vmap`` over them
(``torch.func.functional_call`` + ``grad``), so each layer becomes one batched matrix product.

The update is exactly ``torch.optim.SGD``'s (heavy-ball momentum, no dampening, coupled weight
decay), and the data order is exactly that of the plain sequential loop it replaces::

    model = build_model(seed)                    # initialisation from the seed
    gen = torch.Generator().manual_seed(seed)    # one shuffle generator through all stages
    for stage in stages:                         # a fresh optimiser per stage
        opt = SGD(model.parameters(), lr, momentum, weight_decay)
        for epoch in range(stage.epochs):
            order = torch.randperm(n, generator=gen)
            for each batch of `batch_size` positions of `order`:
                keep only the kept examples of the batch; skip the step if none is left
                mean task loss over the kept examples; opt.step()

so a copy trained here equals that loop with the same (kept subset, seed) up to float rounding
(``tests/test_batched.py``); a parameter the model builds with ``requires_grad=False`` stays frozen, as
``torch.optim.SGD`` leaves it. ``lr_ratio`` (parameter name → r) steps a parameter at r·lr, as
``torch.optim.SGD`` steps a parameter group whose rate is r times the stage's (a head at 5× the body's rate).
A batch whose examples are all dropped makes no step and leaves the momentum untouched, as in the loop.
Models with buffers (BatchNorm) or dropout are refused: their per-copy state or randomness is not modelled.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from source_proj.errors import TaskError
from source_proj.evaluation.retrain import Keep
from source_proj.query.attributor import StageRows
from source_proj.tasks.task import Task

ModelBuilder = Callable[[int], nn.Module]
"""``build_model(seed) -> nn.Module``: a freshly initialised model, its initialisation drawn from ``seed``."""


@dataclass(frozen=True)
class SGDStage:
    """One training stage: its data and its SGD recipe (``torch.optim.SGD`` semantics).

    Attributes:
        name: the stage name (the key of ``keep``; the trajectory recorder's stage name).
        inputs: ``[n, ...]`` training inputs.
        targets: ``[n, ...]`` training targets (class labels for a classification task).
        epochs: passes over the data.
        lr: learning rate (constant within the stage).
        batch_size: examples per step before dropping the examples a subset does not keep.
        momentum: heavy-ball momentum β (no dampening, not Nesterov).
        weight_decay: coupled L2 decay λ: the gradient gets ``+ λ θ``.
    """

    name: str
    inputs: Tensor
    targets: Tensor
    epochs: int
    lr: float
    batch_size: int
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets) or len(self.inputs) == 0:
            raise TaskError(
                f"Stage {self.name!r} has {len(self.inputs)} inputs and {len(self.targets)} targets; give the same "
                "positive number of each."
            )
        if self.epochs < 1 or self.batch_size < 1 or self.lr < 0:
            raise TaskError(
                f"Stage {self.name!r} needs epochs ≥ 1, batch_size ≥ 1 and lr ≥ 0, not epochs={self.epochs}, "
                f"batch_size={self.batch_size}, lr={self.lr}."
            )

    @property
    def size(self) -> int:
        """n, the number of training examples."""
        return len(self.targets)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, ⌈n / batch_size⌉ (a batch may lose all its examples to a subset)."""
        return -(-self.size // self.batch_size)


@dataclass
class BatchedSGD:
    """Train M copies of one model at once, each with its own kept subset and seed.

    Args:
        build_model: ``seed -> nn.Module`` (its initialisation must depend only on the seed).
        task: the per-example training loss (``task.loss``) and the measurement (``task.measurement``).
        stages: the training stages, in order.
        device: where to train (default: the CPU).
        lr_ratio: parameter name (as ``named_parameters`` names it) → r ≥ 0: that parameter steps at r × the stage's
            rate in every stage, as in a ``torch.optim.SGD`` parameter group of rate r·lr (momentum and weight
            decay unchanged); a parameter it does not name steps at the stage's rate.
    """

    build_model: ModelBuilder
    task: Task
    stages: Sequence[SGDStage]
    device: str | torch.device = "cpu"
    lr_ratio: Mapping[str, float] = field(default_factory=dict)
    _template: nn.Module = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise TaskError(f"Batched training needs at least one stage and distinct stage names, not {names}.")
        _check_takes_seed(self.build_model)
        template = self.build_model(0)
        if any(True for _ in template.buffers()) or any(
            isinstance(m, nn.modules.dropout._DropoutNd) for m in template.modules()
        ):
            raise TaskError(
                "Batched retraining handles models without buffers or dropout (no BatchNorm, no Dropout); "
                "retrain such a model with a plain retrain(keep, seed) function instead."
            )
        unknown = sorted(set(self.lr_ratio) - {name for name, _ in template.named_parameters()})
        if unknown:
            raise TaskError(
                f"lr_ratio names {unknown[0]!r}, which is not a parameter of the model; name parameters as "
                "model.named_parameters() does."
            )
        bad = {name: r for name, r in self.lr_ratio.items() if not (np.isfinite(r) and r >= 0)}
        if bad:
            name, r = next(iter(bad.items()))
            raise TaskError(f"lr_ratio gives parameter {name!r} the ratio {r}; give each a finite ratio ≥ 0.")
        self._template = template.to(self.device)

    def train(self, keeps: Sequence[Keep], seeds: Sequence[int]) -> dict[str, Tensor]:
        """Train one copy per (kept subset, seed); returns the stacked final parameters ``name -> [M, ...]``.

        Args:
            keeps: per copy, stage name → sorted kept indices (a stage it does not name is kept whole; a name
                that is not one of ``stages`` is refused).
            seeds: per copy, the seed of its initialisation and of its shuffles.
        """
        if len(keeps) != len(seeds) or not seeds:
            raise TaskError(f"Give one kept subset per seed (got {len(keeps)} subsets and {len(seeds)} seeds).")
        names = [s.name for s in self.stages]
        unknown = sorted({stage for keep in keeps for stage in keep} - set(names))
        if unknown:
            raise TaskError(
                f"The kept subsets name stage {unknown[0]!r}, which is not among the trainer's stages {names}; name "
                "each SGDStage as the trajectory recorder named its stage (see Attributor.rows)."
            )
        models = [self.build_model(int(s)) for s in seeds]
        params = {
            name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).to(self.device)
            for name, _ in self._template.named_parameters()
        }
        # torch.optim.SGD skips a parameter without a gradient: a frozen one (requires_grad=False) is not trained.
        trainable = {name: params[name] for name, p in models[0].named_parameters() if p.requires_grad}
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        dtype = next(iter(params.values())).dtype
        step = vmap(grad(self._mean_loss), in_dims=(0, 0, 0, 0), randomness="error")
        for stage in self.stages:
            kept = torch.from_numpy(np.stack([_mask(k, stage) for k in keeps])).to(self.device)
            x, y = stage.inputs.to(self.device), stage.targets.to(self.device)
            momentum = {name: torch.zeros_like(p) for name, p in params.items()}
            for _ in range(stage.epochs):
                orders = torch.stack([torch.randperm(stage.size, generator=g) for g in generators]).to(self.device)
                for b in range(stage.steps_per_epoch):
                    idx = orders[:, b * stage.batch_size : (b + 1) * stage.batch_size]
                    weight = torch.gather(kept, 1, idx).to(dtype)
                    active = weight.sum(1) > 0
                    _sgd(trainable, momentum, step(params, x[idx], y[idx], weight), active, stage, self.lr_ratio)
        return params

    def measure(self, params: Mapping[str, Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
        """The task's measurement of every query under every copy, ``[M, Q]``."""
        x, y = inputs.to(self.device), targets.to(self.device)

        def one(p: Mapping[str, Tensor]) -> Tensor:
            return self.task.measurement(functional_call(self._template, dict(p), (x,)), (x, y))

        with torch.no_grad():
            return vmap(one)(dict(params))

    def _mean_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor, weight: Tensor) -> Tensor:
        losses = self.task.loss(functional_call(self._template, params, (x,)), (x, y))
        return (losses * weight).sum() / weight.sum().clamp_min(1.0)


def _check_takes_seed(build_model: ModelBuilder) -> None:
    """Refuse a model builder that cannot be called as ``build_model(seed)`` (the other guides' zero-argument
    ``build_model()``), which would end in a TypeError from inside the trainer."""
    try:
        signature = inspect.signature(build_model)
    except ValueError:  # a builtin without a readable signature: let the call say what it takes
        return
    try:
        signature.bind(0)
    except TypeError:
        raise TaskError(
            "BatchedSGD calls build_model(seed) for each copy (its initialisation drawn from the seed), but this "
            "build_model takes no seed; give it one parameter, e.g. def build_model(seed): torch.manual_seed(seed); ..."
        ) from None


def _mask(keep: Keep, stage: SGDStage) -> np.ndarray:
    mask = np.ones(stage.size, dtype=bool)
    if stage.name in keep:
        chosen = np.asarray(keep[stage.name], dtype=np.int64)
        if chosen.size and (chosen.min() < 0 or chosen.max() >= stage.size):
            raise TaskError(
                f"A kept subset of stage {stage.name!r} names examples outside 0..{stage.size - 1}; "
                "keep indices within the stage's dataset."
            )
        mask[:] = False
        mask[chosen] = True
    return mask


def _sgd(
    params: dict[str, Tensor],
    momentum: dict[str, Tensor],
    grads: dict[str, Tensor],
    active: Tensor,
    stage: SGDStage,
    lr_ratio: Mapping[str, float],
) -> None:
    """One ``torch.optim.SGD`` step, in place, for the active copies; the others keep parameters and momentum.
    A parameter named in ``lr_ratio`` steps at its ratio × the stage's rate (its group's rate in torch)."""
    everyone = bool(active.all())
    for name, p in params.items():
        d = grads[name]
        if stage.weight_decay:
            d.add_(p, alpha=stage.weight_decay)
        if stage.momentum:
            # torch's first step sets buf = d; with buf starting at zero, β·0 + d is the same value.
            buf = momentum[name]
            if everyone:
                d = buf.mul_(stage.momentum).add_(d)
            else:
                on = active.view(-1, *([1] * (p.dim() - 1)))
                buf.copy_(torch.where(on, buf * stage.momentum + d, buf))
                d = torch.where(on, buf, 0.0)
        elif not everyone:
            d = torch.where(active.view(-1, *([1] * (p.dim() - 1))), d, 0.0)
        p.add_(d, alpha=-(stage.lr * lr_ratio[name]) if name in lr_ratio else -stage.lr)


@dataclass
class BatchedRetrain:
    """A retrain function for the LDS that trains ``models_per_call`` copies at once.

    ``retrain_many(keeps, seeds) -> [M, Q]`` trains with ``BatchedSGD`` and measures the queries;
    ``run_retrains`` (hence ``lds_ground_truth``) calls it in
    groups and caches every model's measurements as it would a plain retrain's. Called as
    ``retrain(keep, seed) -> [Q]`` it trains one copy, so it also serves wherever a plain retrain
    function does.

    Args:
        trainer: the model, task and recipe.
        query_inputs: ``[Q, ...]`` the queries measured after training.
        query_targets: ``[Q, ...]`` their targets (labels).
        models_per_call: copies trained together (bounded by memory; a few hundred for a small MLP).
    """

    trainer: BatchedSGD
    query_inputs: Tensor
    query_targets: Tensor
    models_per_call: int = 100

    def __post_init__(self) -> None:
        if len(self.query_inputs) != len(self.query_targets) or len(self.query_inputs) == 0:
            raise TaskError(
                f"A batched retrain got {len(self.query_inputs)} query inputs and {len(self.query_targets)} targets; "
                "give the same positive number of each."
            )
        if self.models_per_call < 1:
            raise TaskError(f"A batched retrain must train at least one model per call, not {self.models_per_call}.")

    def check_rows(self, rows: Sequence[StageRows]) -> None:
        """Refuse attributed rows (``Attributor.rows``) whose stage the trainer holds with another number of
        examples: its extra examples would be kept in every copy, a ground truth of other data than the scores'."""
        sizes = {stage.name: stage.size for stage in self.trainer.stages}
        for row in rows:
            if row.stage in sizes and sizes[row.stage] != row.size:
                raise TaskError(
                    f"SGDStage {row.stage!r} holds {sizes[row.stage]} examples but the attributed stage has "
                    f"{row.size} rows; give it the examples the stage was featurized with, in the same order."
                )

    def retrain_many(self, keeps: Sequence[Keep], seeds: Sequence[int]) -> np.ndarray:
        """Measurements ``[len(seeds), Q]`` after training one copy per (kept subset, seed)."""
        params = self.trainer.train(keeps, seeds)
        return self.trainer.measure(params, self.query_inputs, self.query_targets).cpu().double().numpy()

    def __call__(self, keep: Keep, seed: int) -> np.ndarray:
        return self.retrain_many([keep], [seed])[0]
