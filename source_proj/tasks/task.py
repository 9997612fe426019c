"""The one place where a user says what the model computes, what it is trained on and what we measure.

A [`Task`][] works on *batches*: pytrees (tuples, lists or dicts) of tensors whose first
dimension is the example. Per-example gradients are taken with ``torch.func.vmap`` over that
dimension, so every method must treat a batch of one like any other batch and must not mix
examples (no batch statistics: models run in ``eval()`` mode).

Score convention (docs/concepts/source.md §1): ``score(q, z) = -Δf(q, z)``; positive means the training
example ``z`` helps the query ``q`` (removing ``z`` lowers the measurement ``f``).
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from source_proj.errors import TaskError, not_an_instance
from source_proj.tasks.draws import FisherDraws, inverse_cdf

Batch = Any
"""A pytree (tuple, list or dict) of tensors whose first dimension indexes examples."""

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class ParameterSelection:
    """Which parameters of the model form θ (the others are held fixed).

    Attributes:
        include: glob patterns on parameter names (``"fc*.weight"``); ``None`` keeps all.
        exclude: glob patterns removed after ``include``.
        skip_norm: drop parameters of normalisation layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm).
        skip_embedding: drop parameters of ``nn.Embedding`` / ``nn.EmbeddingBag`` layers.
    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    skip_norm: bool = False
    skip_embedding: bool = False

    def select(self, model: nn.Module) -> list[str]:
        """Names of the selected trainable parameters, in ``model.named_parameters()`` order."""
        skipped: set[str] = set()
        for module_name, module in model.named_modules():
            if (self.skip_norm and isinstance(module, _NORM_TYPES)) or (
                self.skip_embedding and isinstance(module, _EMBEDDING_TYPES)
            ):
                prefix = f"{module_name}." if module_name else ""
                skipped.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        names = []
        for name, param in model.named_parameters():
            if not param.requires_grad or name in skipped:
                continue
            if self.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                continue
            names.append(name)
        if not names:
            raise TaskError(
                "The parameter selection keeps no trainable parameter of the model; "
                "loosen `include`/`exclude` or the skip flags."
            )
        return names

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description, stored in the store's metadata."""
        return {
            "include": list(self.include) if self.include is not None else None,
            "exclude": list(self.exclude),
            "skip_norm": self.skip_norm,
            "skip_embedding": self.skip_embedding,
        }


class Task(ABC):
    """What the model, its per-example training loss and the measurement are.

    Subclass it for your own model; the built-ins are [`ClassificationTask`][] and
    [`RegressionTask`][]. The training objective must be the *mean* of [`loss`][] over the
    batch (the scale of the loss sets the scale of the curvature, which SOURCE's matrix
    functions depend on).
    """

    name: str = "task"
    parameters: ParameterSelection = ParameterSelection()

    def forward(self, model: Callable[..., Tensor], batch: Batch) -> Tensor:
        """Model outputs for a batch. The default calls ``model(batch[0])`` and takes [`outputs_of`][] what it
        returns: a tensor as it is, a Hugging Face output's ``logits`` (``ViTForImageClassification``)."""
        if isinstance(batch, Mapping):  # batch[0] would be a KeyError that blames the model
            raise TaskError(
                f"{type(self).__name__} takes examples (input, label, …), not dicts (keys {sorted(map(str, batch))}); "
                "give tuples, as TensorDataset(inputs, labels) does, or a task whose forward reads the keys (a Task "
                "subclass's own, or sp.SequenceClassificationTask for tokenized text)."
            )
        return self.outputs_of(model(batch[0]))

    def outputs_of(self, output: Any) -> Tensor:
        """What [`forward`][] returns, from what the model's own ``forward`` returned.

        In-run capture takes its sampled Fisher from the training step's forward (the model called as
        the training loop calls it), so it maps that output the way [`forward`][] would. The default
        takes a tensor as it is, else its ``logits`` (Hugging Face outputs), else its first element.
        A task whose [`forward`][] does more than call the model overrides this; capture checks the
        two agree once, on the first batch, and says so when they do not.
        """
        tensor = output_tensor(output)
        if tensor is not None:
            return tensor
        raise TaskError(
            f"The model returned {type(output).__name__}, which {type(self).__name__}.outputs_of cannot map to "
            "outputs; override it, or capture with CaptureArguments(fisher_forward='separate')."
        )

    @abstractmethod
    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Per-example training loss, shape ``[B]``; the optimiser minimised its mean."""

    @abstractmethod
    def measurement(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Per-example measurement f(q; θ) whose change we predict, shape ``[B]``."""

    def fisher_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """The per-example loss of [`fisher_targets`][]' batches, shape ``[B]`` (default: [`loss`][]).

        Its gradients at the pseudo-targets give the Gauss–Newton matrix, which is the one of the
        *unregularised* likelihood: a task whose [`loss`][] smooths its labels returns the plain
        cross-entropy here (label smoothing leaves the Gauss–Newton of cross-entropy unchanged, since
        its Hessian in the logits, diag p − ppᵀ, does not depend on the target).
        """
        return self.loss(outputs, batch)

    @abstractmethod
    def fisher_targets(
        self, outputs: Tensor, batch: Batch, draws: FisherDraws | None
    ) -> list[tuple[Tensor, Batch]]:
        """Pseudo-targets whose loss gradients give the Gauss–Newton (true Fisher) matrix.

        Returns a list of ``(weight [B], batch with replaced targets)`` such that
        ``Σ_s weight_s · ∇fisher_loss_s ∇fisher_loss_sᵀ`` has expectation equal to the Gauss–Newton
        matrix of [`loss`][] for each example (see [`fisher_loss`][]). With ``draws`` the targets are
        sampled from the model's predictive distribution (one sample, weight 1), each example's from its own
        uniforms (``draws.per_example``, ``draws.at``, ``draws.normal``: keyed on the example, so the batch it
        is in changes nothing); with ``None`` the expectation is enumerated exactly where the task can (used by
        the ``"exact"`` Fisher mode). ``outputs`` are detached.
        """

    def bind(self, model: nn.Module) -> Task:
        """The task to compute with on ``model`` (default: this task itself). A task whose forward depends
        on the model's structure returns a copy that knows it (the text tasks build attention masks);
        the gradient engine binds its task to the module it differentiates."""
        return self

    def select_parameters(self, model: nn.Module) -> list[str]:
        """Names of the parameters attributed through (see [`ParameterSelection`][])."""
        return self.parameters.select(model)

    def representation(self, model: nn.Module, batch: Batch) -> Tensor:
        """The last hidden representation h of each example, float ``[B, h]`` (RepSim compares these).

        The default runs [`forward`][] and returns the input of the model's last ``nn.Linear``
        module (the activations before the output layer), flattened per example. Override it for
        models whose output layer is not the last ``nn.Linear``.
        """
        hidden = self._last_linear_input(model, batch)
        if hidden is None:
            raise TaskError(
                f"{type(model).__name__} has no nn.Linear layer, so its last hidden representation is unknown; "
                "override Task.representation for this model."
            )
        return hidden.reshape(hidden.shape[0], -1)

    def _last_linear_input(self, model: nn.Module, batch: Batch) -> Tensor | None:
        """The float input of the model's last ``nn.Linear`` in [`forward`][] (None: the model has none)."""
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            return None
        captured: list[Tensor] = []
        handle = linears[-1].register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
        try:
            with torch.no_grad():
                self.forward(model, batch)
        finally:
            handle.remove()
        return captured[-1].float()

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable identity of the task, stored in the store's metadata."""
        return {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "parameters": self.parameters.describe(),
        }


def output_tensor(output: Any) -> Tensor | None:
    """The tensor a model's forward returned: the output itself, its ``logits`` (Hugging Face outputs) or
    its first element; ``None`` when it holds none of these."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _replace_target(batch: Batch, target: Tensor) -> Batch:
    """The batch ``(inputs, targets, *rest)`` with ``targets`` replaced."""
    return (batch[0], target, *batch[2:])


def _targets(task: Task, batch: Batch, kind: str) -> Tensor:
    """``batch[1]`` of a batch ``(inputs, targets, …)``; refuses any other batch, such as a bare tensor of
    inputs, whose rows would otherwise be taken for an input and its targets."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    got = "inputs alone" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
    raise TaskError(
        f"{type(task).__name__} takes examples (input, {kind}, …), not {got}; pass a dataset of pairs such as "
        f"TensorDataset(inputs, {kind}s)."
    )


def _check_labels(logits: Tensor, labels: Tensor) -> None:
    # vmap hands us batched tensors whose values cannot be inspected; the data loader checks
    # ranges up front (see featurize), so only plain tensors are checked here.
    if torch._C._functorch.is_functorch_wrapped_tensor(labels) or labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= logits.shape[-1]:
        raise TaskError(
            f"Labels must lie in [0, {logits.shape[-1] - 1}] for a model with {logits.shape[-1]} "
            f"outputs, but the data hold labels from {lo} to {hi}; fix the labels or the model's output size."
        )


def _class_ids(task: Task, outputs: Tensor, batch: Batch) -> Tensor:
    """A batch's labels as class ids ``torch.long``, from any integer type (the uint8 labels cross-entropy trains on
    too), checked against the logits' classes; other labels are refused in a sentence."""
    labels = _targets(task, batch, "label")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TaskError(
            f"{type(task).__name__} takes integer class ids as labels, but a batch of the data holds "
            f"{str(labels.dtype).removeprefix('torch.')} labels of shape {list(labels.shape)}; give each example its "
            "class id (of one-hot rows, their argmax)."
        )
    _check_labels(outputs, labels)
    return labels.long()


@dataclass
class ClassificationTask(Task):
    """Multi-class classification trained with cross-entropy; measurement = margin.

    Batches are ``(inputs, labels, ...)``; the model maps inputs to logits ``[B, C]``.
    margin(q) = logit_y − logsumexp_{c≠y} logit_c.

    Attributes:
        label_smoothing: ε of a run trained on smoothed labels (``F.cross_entropy(..., label_smoothing=ε)``,
            the Hugging Face Trainer's ``label_smoothing_factor``): the training loss is then
            (1 − ε)·CE(y) + ε·mean_c CE(c). The measurement and the Fisher stay those of the plain labels.
    """

    parameters: ParameterSelection = field(default_factory=ParameterSelection)
    name: str = "classification"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        self.label_smoothing = check_label_smoothing(self.label_smoothing)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return self._cross_entropy(outputs, batch, self.label_smoothing)

    def fisher_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return self._cross_entropy(outputs, batch, 0.0)

    def _cross_entropy(self, outputs: Tensor, batch: Batch, smoothing: float) -> Tensor:
        labels = _class_ids(self, outputs, batch)
        return F.cross_entropy(outputs, labels, reduction="none", label_smoothing=smoothing)

    def measurement(self, outputs: Tensor, batch: Batch) -> Tensor:
        labels = _class_ids(self, outputs, batch)
        correct = outputs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        others = outputs.scatter(-1, labels.unsqueeze(-1), float("-inf"))
        return correct - torch.logsumexp(others, dim=-1)

    def fisher_targets(
        self, outputs: Tensor, batch: Batch, draws: FisherDraws | None
    ) -> list[tuple[Tensor, Batch]]:
        probs = torch.softmax(outputs.float(), dim=-1)
        if draws is not None:
            sampled = inverse_cdf(probs, draws.per_example(1)[:, 0]).to(outputs.device)
            return [(torch.ones_like(probs[:, 0]), _replace_target(batch, sampled))]
        classes = probs.shape[-1]
        return [(probs[:, c], _replace_target(batch, torch.full_like(batch[1], c))) for c in range(classes)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **smoothing_described(self.label_smoothing)}


def check_label_smoothing(value: Any) -> float:
    """ε of a task's ``label_smoothing`` as a float in [0, 1], or a sentence saying why not."""
    try:
        smoothing = float(value)
    except (TypeError, ValueError):
        smoothing = math.nan
    if not 0.0 <= smoothing <= 1.0:
        raise TaskError(f"label_smoothing must be a number from 0 to 1 (the ε the run trained with), not {value!r}.")
    return smoothing


def check_task_smoothing(task: Task, stages: Sequence[tuple[str, float]]) -> None:
    """Refuse a task whose training loss does not smooth its labels as the run's stages did.

    ``stages``: each stage's name and the ε it trained with (``Stage.label_smoothing``). A task with a
    ``label_smoothing`` attribute (the built-ins) must have each stage's ε; one without it is warned of when some
    stage smoothed its labels (its own loss may smooth them: the library cannot tell).
    """
    smoothed = [(name, eps) for name, eps in stages if eps]
    if not smoothed:
        if getattr(task, "label_smoothing", 0.0):
            raise TaskError(
                f"The task smooths its labels by {task.label_smoothing:g} (label_smoothing), but the run recorded "  # type: ignore[attr-defined]
                "no label smoothing; pass label_smoothing=0, or record the stage with begin_stage(..., "
                "label_smoothing=ε) if its loss did smooth them."
            )
        return
    if len({eps for _, eps in stages}) > 1:
        described = ", ".join(f"{name!r} by {eps:g}" for name, eps in stages)
        raise TaskError(
            f"The run's stages smoothed their labels differently ({described}), but one task computes one training "
            "loss for all of them; featurize cannot follow this run (record its stages with one label smoothing)."
        )
    eps = smoothed[0][1]
    if not hasattr(task, "label_smoothing"):
        warnings.warn(
            f"The run trained on labels smoothed by {eps:g}, and {type(task).__name__} has no label_smoothing: "
            "its loss must be the smoothed one and its fisher_loss the plain one, or SOURCE attributes through a "
            "loss the run did not train on.",
            stacklevel=3,
        )
    elif task.label_smoothing != eps:  # type: ignore[attr-defined]
        raise TaskError(
            f"The run trained on labels smoothed by {eps:g} (stage {smoothed[0][0]!r}), but the task smooths them by "
            f"{task.label_smoothing:g}; pass {type(task).__name__}(..., label_smoothing={eps:g}) so that SOURCE "  # type: ignore[attr-defined]
            "attributes through the loss the run trained on."
        )


def smoothing_described(smoothing: float) -> dict[str, float]:
    """The task description's ``label_smoothing`` entry: none at 0, so that stores of unsmoothed runs describe
    their task as they always did."""
    return {"label_smoothing": smoothing} if smoothing else {}


@dataclass
class MultiLabelClassificationTask(Task):
    """Independent yes/no labels trained with sigmoid cross-entropy; measurement = the summed log-odds of every
    label's side.

    Batches are ``(inputs, labels [B, C], ...)`` with labels 0 or 1 (or in between: soft labels); the model maps
    inputs to logits ``[B, C]``. The loss is ``F.binary_cross_entropy_with_logits`` averaged over the C labels (the
    mean over the batch's B·C entries is then the batch mean of it: Hugging Face's ``multi_label_classification``
    loss). The measurement is Σ_c (2y_c − 1)·z_c, each label's log-odds towards the side it is on: a positive
    score means z raised it (helped). The Fisher samples every label from its own Bernoulli.
    """

    parameters: ParameterSelection = field(default_factory=ParameterSelection)
    name: str = "multi-label-classification"

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        labels = _multi_labels(self, outputs, batch)
        return F.binary_cross_entropy_with_logits(outputs, labels, reduction="none").mean(-1)

    def measurement(self, outputs: Tensor, batch: Batch) -> Tensor:
        labels = _multi_labels(self, outputs, batch)
        return ((2.0 * labels - 1.0) * outputs).sum(-1)

    def fisher_targets(
        self, outputs: Tensor, batch: Batch, draws: FisherDraws | None
    ) -> list[tuple[Tensor, Batch]]:
        # ℓ = (1/C) Σ_c BCE(z_c, y_c): ∂ℓ/∂z_c = (σ_c − y_c)/C and the Gauss–Newton in the logits is diag σ(1 − σ)/C.
        # Sampled: every label drawn from Bernoulli(σ_c), weight C (E[C·(σ − y)(σ − y)ᵀ/C²] = diag σ(1 − σ)/C).
        # Exact: for each label c and side t, the soft targets σ on every other label (whose gradients then
        # vanish) and t on c, weight C·P(t): Σ_t C·P(t)(σ_c − t)²/C² = σ_c(1 − σ_c)/C.
        probs = torch.sigmoid(outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs)
        classes = probs.shape[-1]
        weight = torch.full_like(probs[:, 0], float(classes))
        if draws is not None:
            drawn = (draws.per_example(classes).to(probs.device) < probs).to(probs.dtype)
            return [(weight, _replace_target(batch, drawn))]
        directions = []
        for c in range(classes):
            for side in (0.0, 1.0):
                targets = probs.clone()
                targets[:, c] = side
                chance = probs[:, c] if side else 1.0 - probs[:, c]
                directions.append((weight * chance, _replace_target(batch, targets)))
        return directions


def _multi_labels(task: Task, outputs: Tensor, batch: Batch) -> Tensor:
    """The ``[B, C]`` float labels of a multi-label batch, or a sentence saying what is wrong with them."""
    labels = _targets(task, batch, "label")
    if labels.shape != outputs.shape:
        raise TaskError(
            f"{type(task).__name__} takes one 0/1 label per output, labels of shape {list(outputs.shape)}, but the "
            f"data hold labels of shape {list(labels.shape)}; give each example a row of C labels."
        )
    return labels.to(outputs.dtype)


@dataclass
class RegressionTask(Task):
    """Scalar regression trained with squared error ``(ŷ − y)²``; measurement = |ŷ − y|.

    Batches are ``(inputs, targets, ...)``; the model returns ``[B]`` or ``[B, 1]``. The measurement is an error,
    so a positive score means z raised it: harmed the query (``score_labels`` word it so for reports).
    """

    parameters: ParameterSelection = field(default_factory=ParameterSelection)
    name: str = "regression"
    score_labels: ClassVar[tuple[str, str]] = (
        "raised the query's error (removing it lowers the error)",
        "lowered the query's error (removing it raises the error)",
    )
    positive_helps: ClassVar[bool] = False

    @staticmethod
    def _prediction(outputs: Tensor) -> Tensor:
        return outputs.squeeze(-1) if outputs.dim() > 1 else outputs

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return (self._prediction(outputs) - _targets(self, batch, "target").to(outputs.dtype)) ** 2

    def measurement(self, outputs: Tensor, batch: Batch) -> Tensor:
        return (self._prediction(outputs) - _targets(self, batch, "target").to(outputs.dtype)).abs()

    def fisher_targets(
        self, outputs: Tensor, batch: Batch, draws: FisherDraws | None
    ) -> list[tuple[Tensor, Batch]]:
        # Gauss–Newton of (ŷ − y)² is 2·JᵀJ. A target y' = ŷ − s gives gradient 2s·J, so
        # E[(2s)²] must be 2: s ~ N(0, 1/2) when sampling, or the fixed s = 1/√2 exactly.
        pred = self._prediction(outputs).detach()
        if draws is not None:
            noise = draws.normal(1)[:, 0].to(device=pred.device, dtype=pred.dtype)
            shift = noise / math.sqrt(2.0)
        else:
            shift = torch.full_like(pred, 1.0 / math.sqrt(2.0))
        return [(torch.ones_like(pred), _replace_target(batch, pred - shift))]


def score_meaning(task: Task, model: nn.Module) -> tuple[bool, tuple[str, str]]:
    """What a score's sign means for ``task`` bound to ``model``: (``positive_helps``, ``score_labels``).

    A task says it with the attributes ``positive_helps`` (whether a positive score, z raising the measurement,
    helped the query: True for a margin, False for a loss or an error) and ``score_labels`` (the words for a
    positive and a negative score). A task without them measures a margin; one with ``positive_helps`` alone gets
    the plain words in its order."""
    bound = task.bind(model)
    positive_helps = bool(getattr(bound, "positive_helps", True))
    plain = ("helpful", "harmful") if positive_helps else ("harmful", "helpful")
    labels = getattr(bound, "score_labels", plain)
    return positive_helps, (str(labels[0]), str(labels[1]))


def check_model_and_task(model: object, task: object) -> None:
    """Refuse, before any work, a ``model`` that is not a ``torch.nn.Module`` and a ``task`` that is not a
    [`Task`][source_proj.Task] (a class or a function given for the object it builds: ``Net`` for ``Net()``)."""
    refusal = not_an_instance(
        model, nn.Module, "model", "torch.nn.Module", "pass the model whose run was recorded."
    ) or not_an_instance(task, Task, "task", "Task", "pass one such as sp.ClassificationTask().")
    if refusal is not None:
        raise TaskError(refusal)
