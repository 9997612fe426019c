"""The eigen projection's basis pass: the Kronecker factors of the Fisher at every checkpoint, averaged
(``projection/eigen.py`` says what the basis is and why)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from source_proj.errors import NumericalError, TaskError, TrajectoryError
from source_proj.featurize.arguments import ProjectionArguments, checkpoint_stages
from source_proj.featurize.factors import FactorCollector, kronecker_layers
from source_proj.projection.eigen import EigenBasis, _has_rest, basis_budget
from source_proj.projection.layers import FactoredLayer, factorable_layers, layer_input
from source_proj.projection.transform import scaling_transform
from source_proj.tasks.data import RandomStateKept, collate_of
from source_proj.tasks.draws import FisherDraws
from source_proj.tasks.gradients import PerExampleGradients, move_batch
from source_proj.tasks.task import Task
from source_proj.trajectory.optimizers import optimizer_rule
from source_proj.trajectory.preconditioner import checkpoint_preconditioner, steps_preconditioner
from source_proj.trajectory.recorder import Checkpoint, Stage, Trajectory


class NoBasis(TaskError):
    """The model has no layer the eigen projection can take a basis for (featurize falls back to 'rademacher')."""


_BASIS_LABELS = 0xBA515
"""A word of the basis pass's label key (with the seed, the visit and the stage): not featurize's draws."""

LAYER_WIDTHS = 2
"""With a budget of positions per layer (``BasisPass``), a layer also wants this many positions per unit of its
widest factor's side: a factor estimated from fewer positions than its side is rank-deficient."""

PROBE_EXAMPLES = 8
"""The examples of a stage's subset whose forward pass counts each layer's positions per example."""


def estimate_basis(
    trajectory: Trajectory,
    checkpoints: Sequence[Checkpoint],
    pass_: BasisPass,
    *,
    inputs: str = "",
    progress: bool = False,
    per_stage: int | None = None,
) -> EigenBasis:
    """The eigen projection's basis of ``pass_``'s arguments: one sampled-label Fisher pass over its subset of each
    stage at each of ``checkpoints`` (on the stages featurize visits it on; ``per_stage``: at most that many of each
    stage's, ``spread``), each visit's factors normalised, then averaged. The pass's model is loaded with each
    checkpoint in turn."""
    model: nn.Module = pass_.model
    names = pass_.names
    params = dict(model.named_parameters())
    rules = {st.name: optimizer_rule(st, {n: params[n].numel() for n in names}) for st in trajectory.stages}
    stages = {st.name: st for st in trajectory.stages}
    visits = [(c, stage) for c in checkpoints for stage in checkpoint_stages(trajectory, c)]
    if per_stage is not None:
        kept = {st: {c.step for c in spread([c for c, s in visits if s == st], per_stage)} for st in stages}
        visits = [(c, stage) for c, stage in visits if c.step in kept[stage]]
    loaded = None
    with pass_.bar(visits_per_stage=[stage for _, stage in visits], progress=progress) as bar:
        for checkpoint, stage in visits:
            if loaded is not checkpoint:
                trajectory.load_into(model, checkpoint)
                loaded = checkpoint
            adam = rules[stage].preconditioned
            sides = _adam_sides(trajectory, checkpoint, stages[stage], names, pass_.layers) if adam else None
            pass_.visit(stage, f"checkpoint {checkpoint.file}", bar, sides)
    return pass_.basis(sorted({c.step for c, _ in visits}), inputs)


def spread(checkpoints: Sequence[Checkpoint], count: int) -> list[Checkpoint]:
    """At most ``count`` of ``checkpoints`` (in order), evenly spaced: the first and the last among them."""
    if len(checkpoints) <= count:
        return list(checkpoints)
    if count == 1:
        return [checkpoints[-1]]
    indices = sorted({round(i * (len(checkpoints) - 1) / (count - 1)) for i in range(count)})
    return [checkpoints[i] for i in indices]


class BasisPass:
    """The factors' sums of a basis: ``visit`` adds one Fisher pass over a stage's subset at the model's current
    weights (each visit normalised, every visit weighing the same), ``basis`` eigendecomposes their mean.
    featurize visits every checkpoint; in-run capture (``capture.py``) visits each window's start as training
    reaches it, and the final weights. The labels of example i of a stage at the n-th visit are drawn from the key of
    (``seed``, n, the stage) and i (``FisherDraws``): the batch size changes none.

    Args:
        grads_fn: gradients of the model whose weights are visited.
        datasets: stage name → its training data; each stage's subset of at most ``examples`` rows is drawn
            once, from ``seed``, so a later visit (or a resumed run's) uses the same examples.
        positions: at most this many positions of each example enter the factors (``FactorCollector``),
            drawn with the labels' key (below), each example's own: the visits of a run, taken in the same order
            (a resumed capture's), draw the same positions, in batches of any size. ``None``: every position.
        layer_positions: the positions every layer's factors need (``ProjectionArguments.basis_layer_positions``):
            a stage's subset keeps only the first examples of its seeded order that give each layer that many, or
            ``LAYER_WIDTHS`` times its widest factor's side where that is more. The positions an example gives a
            layer are counted on a forward pass of the subset's first ``PROBE_EXAMPLES`` (after the draw of
            ``positions``). A model with one position an example (an MLP) keeps all ``examples`` at the default;
            a language model's sequences give many each, and keep tens. ``None``: all ``examples``.
        collate_fn: how the data's items batch (default: a ``CollatedDataset``'s own, else ``data.default_collate``).
    """

    def __init__(
        self,
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
        positions: int | None = None,
        layer_positions: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        model: nn.Module = grads_fn.model
        self.model, self.grads_fn, self.names = model, grads_fn, list(names)
        layers, _ = kronecker_layers(model, names)
        if not layers:
            raise NoBasis(
                "The eigen projection found no layer with Kronecker factors (nn.Linear, nn.Conv1d/2d/3d, GPT-2 "
                "Conv1D) among the selected parameters."
            )
        factorable, _ = factorable_layers(model, names)
        shares = len(layers) < len(factorable) or _has_rest([(n, ()) for n in names], factorable)
        self.budget = basis_budget(dim, shares)
        self.layers, self.task, self.datasets = layers, task, datasets
        self.examples, self.batch_size, self.device, self.collate_fn = examples, batch_size, device, collate_fn
        self.keep_random_state = False
        """Call the collate function with the random state put back (``RandomStateKept``): in-run capture's passes."""
        self.drawn = examples
        self.positions = positions
        self.collector = FactorCollector(grads_fn, layers, [], positions)
        self.a_mean = [np.zeros((layer.in_rows, layer.in_rows)) for layer in layers]
        self.b_mean = [np.zeros((layer.out_features, layer.out_features)) for layer in layers]
        self.visits = 0
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.subsets, self.orders = {}, {}
        for stage, data in datasets.items():
            size = len(data)  # type: ignore[arg-type]
            self.orders[stage] = rng.choice(size, min(size, examples), replace=False)  # a random order
            self.subsets[stage] = np.sort(self.orders[stage]).tolist()
        self.layer_positions = layer_positions
        self.cut: dict[str, int] = {}
        """Stage → the examples its subset kept, where the layers' budget took fewer than the subset drawn."""
        self._counted: set[str] = set()

    def _collate(self, stage: str) -> Callable[[list[Any]], Any]:
        collate = self.collate_fn or collate_of(self.datasets[stage])
        return RandomStateKept(collate) if self.keep_random_state else collate

    @classmethod
    def of(
        cls,
        projection: ProjectionArguments,
        grads_fn: PerExampleGradients,
        task: Task,
        datasets: Mapping[str, Dataset],
        names: Sequence[str],
        *,
        batch_size: int,
        device: torch.device,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> BasisPass:
        """The pass ``projection``'s basis arguments describe."""
        return cls(grads_fn, task, datasets, names, projection.dim, examples=projection.basis_examples,
                   seed=projection.seed, batch_size=batch_size, device=device, positions=projection.basis_positions,
                   layer_positions=projection.basis_layer_positions, collate_fn=collate_fn)  # fmt: skip

    def inputs_cut(self) -> list[Any]:
        """What the basis inputs' digest adds for the subsets cut by the layers' budget (nothing where none was:
        the basis is that of all ``examples``). Counts every stage's positions first (``count``)."""
        for stage in self.datasets:
            self.count(stage)
        return [["layer examples", sorted(self.cut.items())]] if self.cut else []

    def count(self, stage: str) -> None:
        """Cut ``stage``'s subset to the layers' budget (once; a forward pass of a few of its examples, which raises
        what the model raises on them). Every visit and progress bar counts first."""
        if self.layer_positions is None or stage in self._counted:
            return
        needed = self._examples_needed(stage, self.layer_positions)
        if needed < len(self.orders[stage]):
            self.orders[stage] = self.orders[stage][:needed]
            self.subsets[stage] = np.sort(self.orders[stage]).tolist()
            self.cut[stage] = needed
            drawn = [] if all(s in self.cut for s in self.datasets) else [self.drawn]  # at most: an uncut stage's
            self.examples = max([*self.cut.values(), *drawn])
        self._counted.add(stage)

    def _examples_needed(self, stage: str, layer_positions: int) -> int:
        """The fewest examples whose positions (``positions`` of each at most) give every layer ``layer_positions``,
        or ``LAYER_WIDTHS`` times its widest side: counted on the first ``PROBE_EXAMPLES`` of the stage's order; all
        of the order where a layer's count is unknown (not batch-first, or unused)."""
        rows = self.orders[stage][: min(PROBE_EXAMPLES, self.batch_size)].tolist()
        if not rows:
            return 0
        batch = next(iter(DataLoader(Subset(self.datasets[stage], rows), batch_size=len(rows),
                                     collate_fn=self._collate(stage), generator=torch.Generator())))  # fmt: skip
        per = _positions_per_example(self.grads_fn, self.layers, move_batch(batch, self.device), len(rows))
        needed = 1
        for layer, count in zip(self.layers, per, strict=True):
            if not count:
                return len(self.orders[stage])
            taken = count if self.positions is None else min(count, self.positions)
            target = max(layer_positions, LAYER_WIDTHS * max(layer.in_rows, layer.out_features))
            needed = max(needed, math.ceil(target / taken))
        return needed

    def bar(self, visits_per_stage: Sequence[str], progress: bool) -> tqdm:
        for stage in set(visits_per_stage):
            self.count(stage)
        total = sum(-(-len(self.subsets[stage]) // self.batch_size) for stage in visits_per_stage)
        return tqdm(total=total, desc="eigen basis", unit="batch", disable=not progress)

    def visit(
        self,
        stage: str,
        where: str,
        bar: tqdm,
        sides: list[tuple[np.ndarray, np.ndarray]] | None = None,
        limit: int | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One pass over ``stage``'s subset, added to the sums; returns its own normalised factors (A, B per
        layer). ``sides``: an Adam stage's rank-one D^{-1/2} factors per layer. ``limit``: visit only that many
        of the subset's examples, a random part of it (the first ``limit`` of its seeded random order)."""
        self.count(stage)
        sums = self.collector.empty()
        done = 0
        subset = self.subsets[stage]
        if limit is not None and limit < len(subset):
            subset = np.sort(self.orders[stage][: max(limit, 1)]).tolist()
        # Its own generator: a loader without one draws its base seed from the global random state, which
        # in-run capture must leave as training would find it.
        loader = DataLoader(Subset(self.datasets[stage], subset), batch_size=self.batch_size,
                            collate_fn=self._collate(stage), generator=torch.Generator())  # fmt: skip
        stage_word = zlib.crc32(stage.encode())  # the stage by name: the datasets' order changes no draw
        for batch in loader:
            batch = move_batch(batch, self.device)
            rows = subset[done : done + self.batch_size]
            draws = FisherDraws.of([self.seed, _BASIS_LABELS, self.visits, stage_word], rows, self.device)
            draw = _drawer(self.task, batch, draws, rows, where)
            try:
                self.collector.add_shared(sums, batch, draw, draws)
            except _Refused as refused:  # the inputs' fault, not the layers'
                raise refused.error from None
            except TaskError as err:  # the layers' structure (inputs not batch-first, unused layers)
                reason = str(err).split(";")[0].rstrip(".")  # the cause, without the advice for curvature='kfac'
                why = f"The eigen projection cannot take this model's Kronecker factors ({reason})."
                raise NoBasis(why) from err
            done += self.batch_size
            bar.update()
        a_visit, b_visit = [], []
        for i in range(len(self.layers)):
            # once per visit: off the device, divided in place (on the CPU, in the sums' own memory: no copy)
            a, b = sums.a[i].cpu().numpy(), sums.b[i].cpu().numpy()
            a /= max(sums.positions[i], 1)
            b /= max(sums.examples, 1)
            if sides is not None:
                row, col = sides[i]
                a, b = a * np.outer(col, col), b * np.outer(row, row)
            self.a_mean[i] += a
            self.b_mean[i] += b
            a_visit.append(a)
            b_visit.append(b)
        self.visits += 1
        return a_visit, b_visit

    def quiet(self) -> tqdm:
        """A progress bar that shows nothing (in-run capture's passes)."""
        return tqdm(total=0, disable=True)

    def of_factors(self, a: Sequence[np.ndarray], b: Sequence[np.ndarray], steps: Sequence[int], inputs: str
                   ) -> EigenBasis:  # fmt: skip
        """The basis of given factors (one visit's: in-run capture's window bases)."""
        self._check_finite(a, b)
        modules = [layer.module for layer in self.layers]
        return EigenBasis.from_factors(modules, a, b, self.budget, list(steps), self.examples, inputs, self.device,
                                       positions=self.positions if self.collector.sampled else None)  # fmt: skip

    def basis(self, steps: Sequence[int], inputs: str) -> EigenBasis:
        """The basis of every visit's factors, averaged."""
        return self.of_factors([a / self.visits for a in self.a_mean], [b / self.visits for b in self.b_mean],
                               steps, inputs)  # fmt: skip

    def _check_finite(self, a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> None:
        for i, layer in enumerate(self.layers):
            if not (np.isfinite(a[i]).all() and np.isfinite(b[i]).all()):
                raise TaskError(
                    f"The Kronecker factors of layer {layer.module!r} are not finite at some checkpoint; the eigen "
                    "projection cannot be estimated (featurize with the 'factored' projection to find the example)."
                )


def _adam_sides(
    trajectory: Trajectory, checkpoint: Checkpoint, stage: Stage, names: Sequence[str], layers: Sequence[FactoredLayer]
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Per layer the rank-one factors (row r, column c) of D^{-1/2} ≈ r cᵀ for the steps after ``checkpoint``
    (the stage's last checkpoint: its own state); ``None`` where no state says (the raw factors are used). D is
    Adam's over the groups' rate ratios, or 1/r on an SGD stage whose groups train at different rates (exactly rank
    one: ``checkpoint_preconditioner``)."""
    try:
        d = steps_preconditioner(trajectory, stage, checkpoint.step, checkpoint.step + 1, names)
    except TrajectoryError:
        try:
            d = checkpoint_preconditioner(trajectory, checkpoint, stage, names)
        except TrajectoryError:
            return None
    return rank_one_sides(d, layers)


def rank_one_sides(
    d: Mapping[str, torch.Tensor], layers: Sequence[FactoredLayer]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer the rank-one factors (row r, column c) of Adam's D^{-1/2} ≈ r cᵀ (``d``: D per parameter name)."""
    scale = {n: v.detach().double().cpu().rsqrt() for n, v in d.items()}
    sides = []
    for layer in layers:
        terms = scaling_transform(scale, [layer], rank=1).layer(layer.weight)
        assert terms is not None
        sides.append((terms.left[0].double().numpy(), terms.right[0].double().numpy()))
    return sides


def _positions_per_example(
    grads_fn: PerExampleGradients, layers: Sequence[FactoredLayer], batch: object, size: int
) -> list[int | None]:
    """Each layer's positions per example in a forward pass of ``batch`` (its output's rows over the batch: tokens, or
    a convolution's output pixels, which are its input patches); ``None`` for a layer the pass did not call, or
    called without the examples along its input's first dimension. The model runs in eval mode, without gradients,
    and leaves the global random state as it found it (in-run capture's training must find it unchanged)."""
    modules = dict(grads_fn.model.named_modules())
    counts: list[int | None] = [None] * len(layers)

    def hook(index: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], torch.Tensor], None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> None:
            x = layer_input(args, kwargs)
            if isinstance(x, torch.Tensor) and x.shape[0] == size:
                counts[index] = output.numel() // (size * layers[index].out_features)

        return record

    handles = [modules[layer.module].register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with _evaluating(grads_fn.model), grads_fn.autocast():
            grads_fn.outputs(batch)
    finally:
        for handle in handles:
            handle.remove()
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == size:
        # A layer with a position per token takes its real tokens only into its factors (FactorCollector).
        real = max(1, math.ceil(float(mask.sum()) / size))
        counts = [real if c == mask.shape[1] else c for c in counts]
    return counts


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Put every module of ``model`` back in the train/eval mode it had on entry; inside, the model's own forward.

    accelerate runs a mixed-precision Trainer's model under an autocast by replacing its ``forward`` (the original
    kept as ``_original_forward``). The passes run in here (capture's own: its checks, Fisher, basis and end passes)
    take the original back, so that they run at their own precision (``CaptureArguments.precision``), not silently
    at the training step's.
    """
    modes = [(m, m.training) for m in model.modules()]
    own = model.__dict__.get("_original_forward")
    wrapped = model.__dict__.get("forward") if own is not None else None
    if wrapped is not None:
        model.forward = own  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        if wrapped is not None:
            model.forward = wrapped  # type: ignore[method-assign]


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode, with the global random state (CPU and the model's GPU) and every module's train/eval
    mode restored on exit."""
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices), modes_kept(model):
        model.eval()
        yield


class _Refused(Exception):
    """An error of the inputs raised while drawing the Fisher's labels, passed through the layers' TaskErrors."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def finite_rows(outputs: torch.Tensor) -> torch.Tensor:
    """Whether each example's outputs ``[B, ...]`` are all finite, ``[B]``: from their largest and smallest value
    (NaN and ±inf reach one of them), where ``isfinite`` would make a boolean the size of the outputs (a language
    model's logits: 412 MB for 8 sequences of 1,024 tokens over GPT-2's vocabulary)."""
    flat = outputs.reshape(outputs.shape[0], -1)
    return torch.isfinite(flat.amax(dim=1)) & torch.isfinite(flat.amin(dim=1))


def _drawer(
    task: Task, batch: object, draws: FisherDraws, rows: Sequence[int], where: str
) -> Callable[[torch.Tensor], Sequence[tuple[torch.Tensor, object]]]:
    """The Fisher's targets from a batch's outputs, after checking its labels and that the outputs are finite
    (``rows``: the examples' indices in their stage's data, for the error)."""

    def draw(outputs: torch.Tensor) -> Sequence[tuple[torch.Tensor, object]]:
        try:
            task.loss(outputs, batch)  # validates the targets
            bad = ~finite_rows(outputs)
            if bad.any():  # before labels are drawn from them
                row = rows[int(torch.nonzero(bad)[0, 0])]
                raise NumericalError(
                    f"The output of training example {row} at {where} is NaN or infinite; check that example's "
                    "input and label, and the checkpoint's weights."
                )
            return task.fisher_targets(outputs, batch, draws)
        except Exception as err:
            raise _Refused(err) from err

    return draw
