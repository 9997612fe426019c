"""Per-token attribution: which positions of a training sequence carry its score for a query.

The store holds one projected gradient per training sequence. A fitted method whose training
features are sums of projected gradients records how (its ``train`` recipe, see
``fit._Fit._train_recipe``)::

    T(z)[columns] += weight · O · Σ_points P(s ⊙ ∇ℓ(z; θ_point))      for every term (O = I when absent)

so score(q, z) = ⟨q̃, T(z)⟩ = Σ_points ⟨u_point(q), ∇ℓ(z; θ_point)⟩ with u = s ⊙ Pᵀ w and
w = Σ_terms weight · Oᵀ q̃[columns] (the query's feature pulled back to the parameters; Pᵀ by
autograd through the projector's own map). The gradient of a sequence's loss splits over the
module outputs it flows through: for each module m owning attributed parameters, with output
y_m = f_m(x_m; θ_m) and output gradient δ_m,

    ⟨u, ∇_θ ℓ(z)⟩ = Σ_m ⟨δ_m, J_θm f_m · u_m⟩ = Σ_m Σ_t ⟨δ_m[t], (J_θm f_m · u_m)[t]⟩,

one forward-mode product (``torch.func.jvp``) per module and query, split by the position t of the
module's output (a token for a transformer's layers, whose outputs are ``[B, T, …]``): position t's
share is what the gradient of the sequence carries through the activations at t (the token as input
and context, and its own next-token loss), the decomposition kronfluence's per-token scores use. The
shares of a sequence sum to its score (``TokenScores.scores``, read from the cached features; the
difference is float rounding, or a parameter used outside its module's forward). A module output
without a position axis (a classifier head) goes to ``unplaced``; one whose positions are flattened into its rows
(OPT's MLP takes ``[B·T, d]``) is read as ``[B, T, …]``.

An encoder–decoder model (``Seq2SeqTask``) has two position axes: its encoder's module outputs, and its decoder's
cross-attention keys and values (which read the encoder's output), lie on the source's positions
(``TokenScores.tokens``); its decoder's other module outputs on the target's (``TokenScores.target_tokens``).

For a query's *per-token* loss, score the query with one predicted token (``single_token_query``):
its measurement, the summed token loss, is then that token's loss.

Cost: per feature point, one pass of Pᵀ over the queries' features, then a forward and a backward
of the chosen training sequences, and one module forward per module and query.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from source_proj.errors import TaskError
from source_proj.featurize.arguments import as_stage_datasets
from source_proj.featurize.plan import mean_state
from source_proj.featurize.windows import is_captured
from source_proj.projection.base import Projector
from source_proj.projection.factored import FactoredProjector
from source_proj.query.attributor import Attributor, check_batch_size, method_meta
from source_proj.store.provenance import model_errors
from source_proj.tasks.data import ChosenLabels, collate_of
from source_proj.tasks.gradients import move_batch
from source_proj.tasks.task import Batch, output_tensor
from source_proj.tasks.text import IGNORE_INDEX, OBSERVED_TARGET_KEY, Seq2SeqTask, right_padded
from source_proj.trajectory.preconditioner import read_scale


@dataclass
class TokenScores:
    """Per-token scores of training sequences for queries (score = −Δf as everywhere: positive = the sequence raised
    the query's measurement, which helped it for a margin and harmed it for a loss; ``score_labels`` say which).

    Attributes:
        rows: the sequences' rows in the method's feature matrix (as in ``QueryResult`` ids) ``[n]``.
        where: ``(stage, index)`` of each sequence in its stage's dataset.
        input_ids: the sequences' token ids ``[n, T]``; ``attention_mask`` ``[n, T]`` (0 = padding), each row
            right-padded (a left-padded one rolled to the right, as the task ran it).
        tokens: float32 ``[Q, n, T]``: the score carried by each position of each sequence (an encoder–decoder
            model's: of its source).
        unplaced: float32 ``[Q, n]``: the part through module outputs without a position axis.
        scores: float32 ``[Q, n]``: each sequence's score from the store's cached features;
            ``tokens.sum(-1) + unplaced`` (``+ target_tokens.sum(-1)``) equals it up to float rounding.
        target_ids: an encoder–decoder model's targets ``[n, S]`` (−100 at their padding), else ``None``.
        target_tokens: float32 ``[Q, n, S]``: the score carried by each target position (the decoder's activations
            there: reading the target before it, predicting its token), else ``None``.
        score_labels: what a positive and a negative score mean, in words (the task's ``score_labels``).
    """

    rows: np.ndarray
    where: list[tuple[str, int]]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    tokens: np.ndarray
    unplaced: np.ndarray
    scores: np.ndarray
    target_ids: np.ndarray | None = None
    target_tokens: np.ndarray | None = None
    score_labels: tuple[str, str] = ("helpful", "harmful")


def single_token_query(example: Mapping[str, Tensor], position: int, *, target: bool = False) -> dict[str, Tensor]:
    """A language-model query whose measurement is the loss of predicting token ``position`` only
    (labels −100 elsewhere); ``example`` is one ``{"input_ids": [T], ...}`` as ``TextDataset`` gives.

    ``target=True``: an encoder–decoder pair's (``Seq2SeqTask``), whose ``labels`` ``[S]`` are the target;
    ``position`` is then the target's, 0 ≤ position < S, and the decoder still reads the whole target (kept
    under ``OBSERVED_TARGET_KEY``).

    A ``sp.CollatedDataset`` of such queries keeps their labels whatever its collate function makes of labels
    (``DataCollatorForLanguageModeling`` labels every token anew): see ``ChosenLabels``."""
    if isinstance(position, Tensor) and position.dim() == 0 and not position.is_floating_point():
        position = position.item()  # a position read from a tensor
    if isinstance(position, (bool, np.bool_)) or not isinstance(position, numbers.Integral):
        raise TaskError(f"The token position must be a whole number, not {position!r}.")
    position = int(position)  # a bool index would predict every token, a float one fail in torch's indexing
    ids = torch.as_tensor(example["input_ids"])
    if target:
        if "labels" not in example:
            raise TaskError("target=True asks for a token of the example's target, but it has no 'labels'.")
        labels = torch.as_tensor(example["labels"])
        if not 0 <= position < labels.shape[0] or int(labels[position]) == IGNORE_INDEX:
            count = int((labels != IGNORE_INDEX).sum())
            raise TaskError(f"Target token {position} is not predicted: the target has {count} tokens, from 0.")
        single = torch.full_like(labels, IGNORE_INDEX)
        single[position] = labels[position]
        # the decoder still reads the whole target
        return ChosenLabels({OBSERVED_TARGET_KEY: labels, **example, "labels": single}, (OBSERVED_TARGET_KEY,))
    if "labels" in example:
        # A language model's labels are its input tokens (−100 where not predicted). Labels of another shape, or
        # of this shape but other tokens, are a target: an encoder–decoder pair's, whose source and target can
        # have one length, and whose reading as a language-model sequence would silently score the wrong loss.
        given = torch.as_tensor(example["labels"])
        if given.shape != ids.shape or bool(((given != IGNORE_INDEX) & (given != ids)).any()):
            what = "not one per input token" if given.shape != ids.shape else "not the input tokens"
            raise TaskError(
                f"This example's labels are {what}, so it is not a language model's sequence; for an encoder–decoder "
                "pair's target, pass target=True to predict one token of it."
            )
    # Padding (TextDataset's on the right, a left-padding tokenizer's before the tokens) is never predicted, nor the
    # first token: such a position would measure nothing, silently.
    mask = example.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(-1)
    first, length = int((mask.cumsum(0) == 0).sum()), int(mask.sum())
    if not first + 1 <= position < first + length:
        raise TaskError(
            f"Token {position} is not predicted in this sequence of {length} tokens; use {first + 1} ≤ position < "
            f"{first + length}."
        )
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[position] = ids[position]
    return ChosenLabels({**example, "labels": labels})


def token_scores(
    attributor: Attributor,
    queries: Dataset | Sequence[Any],
    train_data: Dataset | Mapping[str, Dataset],
    rows: Sequence[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> TokenScores:
    """Per-token scores of the training sequences at feature ``rows`` (e.g. a query's top-k ids) for
    every query, from the method's training recipe (see the module docstring).

    Args:
        attributor: the fitted store, model, task and method (its query features are used as they are).
        queries: the queries (as for ``Attributor.top_k``).
        train_data: the training set (or a dict ``stage → dataset``) as given to featurize.
        rows: rows of the method's feature matrix, a flat list of whole numbers (one query's ids:
            ``result.helpful_ids[q]``).
        batch_size: training sequences per forward/backward.
        progress: show a progress bar (one step per feature point and stage).

    Returns:
        ``TokenScores`` with ``tokens`` ``[Q, len(rows), T]``.
    """
    check_batch_size(batch_size, "token_scores's batch_size")
    store = attributor.store
    described = method_meta(store, attributor.method)
    recipe = described.get("train")
    if recipe is None:
        splittable = ("source", "fast-source", "grad-dot", "tracin")
        older = " (fitted by an earlier version: re-fit it with --force)" if described.get("kind") in splittable else ""
        raise TaskError(
            f"Method {attributor.method!r}{older} records no training recipe, so its scores cannot be split by token; "
            f"use {', '.join(splittable[:-1])} or {splittable[-1]}."
        )
    if is_captured(store.meta):
        raise TaskError(
            f"The store at {store.path} was captured during training, where each sequence's gradients were taken at "
            "the steps that visited it, which per-token scores cannot recompute (they would not add up to its "
            "scores); featurize the run into another store (sp.featurize) for per-token scores."
        )
    if store.meta["projection"]["kind"] == "fast_jl":
        raise TaskError(
            "Per-token scores pull the query back through the projection, which TRAK's fast_jl kernel cannot do; "
            "featurize with the 'eigen' (the default), 'rademacher' or 'factored' projection."
        )
    datasets = as_stage_datasets(train_data, attributor.trajectory)
    rows = _whole_rows(rows)
    places = [_locate(attributor, row) for row in rows]
    if not places:
        raise TaskError("Give token_scores at least one row of the method's features (e.g. a query's top-k ids).")
    query = attributor.query_features(queries).double()
    # Each stage's sequences batched by that stage's own collate (stages may pad differently), each row rolled to
    # right padding as the task runs it (a left-padding collator's), right-padded to one length in what is returned.
    batches = {stage: right_padded(_stack([datasets[stage][places[i][1]] for i in chosen], collate_of(datasets[stage])),
                                   attributor.task)
               for stage, chosen in _by_stage(places).items()}  # fmt: skip
    seq2seq = isinstance(attributor.task, Seq2SeqTask)
    input_ids, attention_mask = _padded(batches, places, "input_ids", 0), _padded(batches, places, "attention_mask", 0)
    target_ids = _padded(batches, places, "labels", IGNORE_INDEX) if seq2seq else None
    size, length = input_ids.shape
    tokens = torch.zeros(query.shape[0], size, length, dtype=torch.float64)
    span = target_ids.shape[1] if target_ids is not None else 0
    targets = torch.zeros(query.shape[0], size, span, dtype=torch.float64)
    unplaced = torch.zeros(query.shape[0], size, dtype=torch.float64)
    by_step = {c.step: c for c in attributor.trajectory.checkpoints}
    loaded = None
    pullbacks = sorted(_pullbacks(attributor, recipe, query).items(), key=str)
    chosen_by_stage = _by_stage(places)
    for (point, scale_name, stage), w in tqdm(pullbacks, desc="per-token scores", unit="point", disable=not progress):
        chosen = chosen_by_stage.get(stage)
        if not chosen:
            continue
        if loaded != point:
            _load_point(attributor, point, by_step)
            loaded = point
        scale = read_scale(store, scale_name, store.meta["params"], attributor.device)
        u = adjoint(attributor.projector, store.meta["params"], w.to(attributor.device), scale)
        for start in range(0, len(chosen), batch_size):
            part = chosen[start : start + batch_size]
            sub = {key: value[start : start + batch_size] for key, value in batches[stage].items()}
            placed, target, rest = _split(attributor, move_batch(sub, attributor.device), u)
            tokens[:, part, : placed.shape[2]] += placed.cpu()
            targets[:, part, : target.shape[2]] += target.cpu()
            unplaced[:, part] += rest.cpu()
    scores = _cached_scores(attributor, query, places)
    _refuse_other_data(tokens.sum(-1) + targets.sum(-1) + unplaced, scores, rows, places)
    return TokenScores(
        rows=np.asarray(rows, dtype=np.int64),
        where=places,
        input_ids=input_ids.numpy(),
        attention_mask=attention_mask.numpy(),
        tokens=tokens.float().numpy(),
        unplaced=unplaced.float().numpy(),
        scores=scores.astype(np.float32),
        target_ids=target_ids.numpy() if target_ids is not None else None,
        target_tokens=targets.float().numpy() if seq2seq else None,
        score_labels=attributor.score_labels,
    )


def _whole_rows(rows: Sequence[int]) -> list[int]:
    """``rows`` as ints; refuses a nested list (a result's ``[Q, k]`` ids), fractions and booleans."""
    given = np.asarray(rows, dtype=object)
    if given.ndim != 1:
        raise TaskError(
            f"token_scores takes rows as a flat list of feature rows (one query's ids, e.g. result.helpful_ids[0]); "
            f"got rows of shape {list(given.shape)}."
        )
    for row in given:
        if isinstance(row, (bool, np.bool_)) or not isinstance(row, numbers.Integral):
            raise TaskError(f"token_scores takes rows as a flat list of whole numbers (feature rows); got {row!r}.")
    return [int(row) for row in given]


def _by_stage(places: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
    """The positions in ``places`` of each stage's sequences, stages in their first appearance's order."""
    out: dict[str, list[int]] = {}
    for i, (stage, _) in enumerate(places):
        out.setdefault(stage, []).append(i)
    return out


def _padded(
    batches: Mapping[str, Mapping[str, Tensor]], places: Sequence[tuple[str, int]], key: str, fill: int
) -> Tensor:
    """``key`` of every stage's batch ``[n_stage, T_stage]`` as one ``[len(places), max T]`` in the order of
    ``places``, right-padded with ``fill`` (an attention mask missing from a batch: ones over its length)."""
    rows = _by_stage(places)
    parts = {stage: b[key] if key in b else torch.ones_like(b["input_ids"]) for stage, b in batches.items()}
    out = torch.full((len(places), max(p.shape[1] for p in parts.values())), fill, dtype=torch.long)
    for stage, part in parts.items():
        out[rows[stage], : part.shape[1]] = part.to(torch.long)
    return out


def _locate(attributor: Attributor, row: int) -> tuple[str, int]:
    for r in attributor.rows:
        if r.offset <= row < r.offset + r.size:
            return r.stage, row - r.offset
    total = sum(r.size for r in attributor.rows)
    raise TaskError(f"Row {row} is not a row of method {attributor.method!r}, whose rows are 0 to {total - 1}.")


def _stack(examples: Sequence[Any], collate: Callable[[list[Any]], Any]) -> dict[str, Tensor]:
    """The examples as one batch, by their dataset's collate (``collate_of``); examples it cannot batch as they are (of
    different lengths) are refused as featurize refuses them."""
    with model_errors("the training data"):
        batch = collate(list(examples)) if examples else None
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise TaskError(
            "Per-token scores need text examples: batches that are dicts with 'input_ids' [B, T] (as sp.TextDataset "
            "or a tokenizer's collator gives)."
        )
    return batch


def _pullbacks(
    attributor: Attributor, recipe: Mapping[str, Any], query: Tensor
) -> dict[tuple[tuple[Any, ...], str | None, str], Tensor]:
    """w = Σ_terms weight · Oᵀ q̃[columns] (float64 ``[Q, k]``) per (feature point, scale, stage)."""
    out: dict[tuple[tuple[Any, ...], str | None, str], Tensor] = {}
    for term in recipe["terms"]:
        lo, hi = term["columns"]
        w = query[:, lo:hi] * float(term["weight"])
        if term.get("operator"):
            w = w @ torch.from_numpy(attributor.store.read(term["operator"])).double()
        for point in term["points"]:
            key = (_point(point["point"]), point.get("scale"), term["stage"])
            share = w * float(point.get("weight", 1.0))  # recipes before 2026-12-02 fold 1/points into the term
            out[key] = out[key] + share if key in out else share
    return out


def _point(desc: Sequence[Any]) -> tuple[Any, ...]:
    kind, value, *weights = desc  # a mean's weights: its segment's step average (none in older recipes: equal)
    return (kind, tuple(value), *(tuple(w) for w in weights)) if kind == "mean" else (kind, int(value))


def _load_point(attributor: Attributor, point: tuple[Any, ...], by_step: Mapping[int, Any]) -> None:
    """Load a feature point's parameters into the attributor's model: a checkpoint, or the mean of several."""
    model, trajectory = attributor.model, attributor.trajectory
    if point[0] == "checkpoint":
        attributor._load(int(point[1]))  # through the attributor, which remembers what its model holds
        return
    trajectory.load_weights(model, mean_state(trajectory, by_step, point),
                            f"the mean of the checkpoints at steps {list(point[1])}")  # fmt: skip
    attributor._loaded = None  # an average of checkpoints: the next query reloads its own


def adjoint(
    projector: Projector, shapes: Sequence[tuple[str, Sequence[int]]], w: Tensor, scale: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """u = s ⊙ Pᵀ w for every row of ``w`` ``[Q, k]``: ``name → [Q, *shape]`` for the parameters ``shapes``
    (autograd through the projector's own map, so any projector whose ``project`` is differentiable serves;
    a factored projection's s is its rank-R form, as its features used)."""
    grads = {name: torch.zeros(w.shape[0], *shape, device=w.device, requires_grad=True) for name, shape in shapes}
    projected = projector.project(grads)
    pulled = torch.autograd.grad(projected, list(grads.values()), grad_outputs=w.to(projected.dtype))
    u = dict(zip(grads, pulled, strict=True))
    if scale is not None and isinstance(projector, FactoredProjector):
        # The features were projected with the projection's own form of s ⊙ (rank R on each layer), a sum of
        # diagonal Kronecker terms and so its own adjoint.
        u = projector.scaling({n: t.to(w.device) for n, t in scale.items()}).to(w.device).apply(u)
    elif scale is not None:
        u = {name: g * scale[name].to(g) if name in scale else g for name, g in u.items()}
    return u


def _split(attributor: Attributor, batch: Batch, u: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """⟨u, ∇ℓ(z)⟩ of every sequence of ``batch``, split by output position: (``[Q, B, T]``, ``[Q, B, S]``, ``[Q, B]``).

    An encoder–decoder model's module outputs lie on the source's positions (the encoder's modules, and the
    decoder's cross-attention keys and values, which read the encoder's output) or on the target's (the decoder's
    other modules); S = 0 for other models."""
    model, task = attributor.model.eval(), attributor.task.bind(attributor.model)
    owners = _owners(model, set(attributor.param_names))
    captured: list[tuple[str, nn.Module, tuple[Any, ...], dict[str, Any], Tensor]] = []
    source_side = _source_side(model, task)

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if _first(output).requires_grad:  # not the task's own checks, which run without gradients
                captured.append((name, module, args, kwargs, _first(output)))

        return record

    # The attributed parameters require grad, so that every module output does; they receive none.
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters() if n in attributor.param_names}

    def call(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, params, args, kwargs, strict=False)

    handles = [module.register_forward_hook(hook(name), with_kwargs=True) for name, (module, _) in owners.items()]
    if source_side is not None:
        handles.append(source_side.encoder.register_forward_hook(source_side.record))
    try:
        with torch.enable_grad():
            losses = task.loss(task.forward(call, batch), batch)
            deltas = torch.autograd.grad(losses.sum(), [c[4] for c in captured], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    size, length = batch["input_ids"].shape
    span = batch["labels"].shape[1] if source_side is not None else 0
    queries = next(iter(u.values())).shape[0]
    placed = torch.zeros(queries, size, length, dtype=torch.float64, device=losses.device)
    target = torch.zeros(queries, size, span, dtype=torch.float64, device=losses.device)
    rest = torch.zeros(queries, size, dtype=torch.float64, device=losses.device)
    for (name, module, args, kwargs, out), delta in zip(captured, deltas, strict=True):
        if delta is None:
            continue
        on_target = source_side is not None and not source_side.holds(name, args)
        axis, positions = (target, span) if on_target else (placed, length)
        own = owners[name][1]
        held = dict(module.named_parameters())
        primals = {local: held[local].detach() for local in own}
        inputs = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        forward = partial(_module_output, module, inputs, kwargs)
        for q in range(queries):
            tangents = {local: u[full][q].to(primals[local]) for local, full in own.items()}
            with sdpa_kernel(SDPBackend.MATH):  # the fused kernels (nn.MultiheadAttention's) have no forward mode
                _, tangent = jvp(forward, (primals,), (tangents,))
            product = delta.double() * tangent.detach().double()
            if (out.dim() >= 2 and tuple(out.shape[:2]) == (size, positions)) or (
                out.dim() == 2 and out.shape[0] == size * positions  # OPT's MLP: [B·T, d], example by example
            ):
                axis[q] += product.reshape(size, positions, -1).sum(-1)
            elif out.shape[0] == size:
                rest[q] += product.reshape(size, -1).sum(-1)
            else:
                raise TaskError(
                    f"Module {name!r} mixes the examples of a batch (output {list(out.shape)}); per-token scores need "
                    "examples along the first dimension of every attributed module's output."
                )
    return placed, target, rest


class _SourceSide:
    """Which module outputs of an encoder–decoder model lie on its source's positions: the encoder's modules', and
    those of decoder modules that read the encoder's output (cross-attention keys and values)."""

    def __init__(self, model: nn.Module, encoder: nn.Module) -> None:
        self.encoder = encoder
        inside = {id(m) for m in encoder.modules()}
        self.names = {name for name, m in model.named_modules() if id(m) in inside}
        self.output: Tensor | None = None

    def record(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        encoded = getattr(output, "last_hidden_state", None)  # a Hugging Face encoder's output
        encoded = output_tensor(output) if encoded is None else encoded
        if encoded is not None and encoded.requires_grad:  # the attributed forward, not the task's own checks
            self.output = encoded

    def holds(self, name: str, args: tuple[Any, ...]) -> bool:
        if name in self.names:
            return True
        first = args[0] if args and isinstance(args[0], Tensor) else None
        encoded = self.output
        return (first is not None and encoded is not None and first.shape == encoded.shape
                and first.data_ptr() == encoded.data_ptr())  # fmt: skip


def _source_side(model: nn.Module, task: Any) -> _SourceSide | None:
    if not isinstance(task, Seq2SeqTask):
        return None
    encoder = model.get_encoder() if callable(getattr(model, "get_encoder", None)) else None
    if not isinstance(encoder, nn.Module):
        raise TaskError(
            f"Per-token scores of an encoder–decoder model need its encoder, which {type(model).__name__} does not "
            "give (get_encoder()); use the sequences' scores."
        )
    return _SourceSide(model, encoder)


def _module_output(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], params: dict[str, Tensor]
) -> Tensor:
    return _first(functional_call(module, params, args, kwargs, strict=False))


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _owners(model: nn.Module, names: set[str]) -> dict[str, tuple[nn.Module, dict[str, str]]]:
    """Modules that hold attributed parameters directly: module name → (module, local name → parameter name). An
    ``nn.MultiheadAttention`` owns its ``out_proj``'s too: its forward uses them as tensors, never calling
    ``out_proj``, whose own hook would not see them."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    inside = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules() if m is not a}
    owners: dict[str, tuple[nn.Module, dict[str, str]]] = {}
    for module_name, module in model.named_modules():
        if id(module) in inside:
            continue
        held = module.named_parameters(recurse=isinstance(module, nn.MultiheadAttention))
        own = {local: canonical[id(p)] for local, p in held if canonical.get(id(p)) in names}
        if own:
            owners[module_name] = (module, own)
    return owners


SHARES_RTOL = 0.02
"""How far a sequence's shares may sum from its score read from the store, relative to the query's largest score:
float rounding (a bf16 featurize's included) stays far below; another example's gradient lands anywhere."""


def _refuse_other_data(
    shares: Tensor, scores: np.ndarray, rows: Sequence[int], places: Sequence[tuple[str, int]]
) -> None:
    """Refuse ``train_data`` whose chosen sequences are not the store's: their shares (summed, ``[Q, n]``) must add up
    to the scores of the store's cached features (``[Q, n]``), which they do for the same examples however they are
    held (raw token lists and their collate, other padding) and do not for other examples or another order."""
    total = shares.numpy()
    tolerance = SHARES_RTOL * np.abs(scores).max(axis=1, keepdims=True) + 1e-6 * np.abs(total).max()
    off = np.argwhere(np.abs(total - scores) > tolerance)
    if off.size:
        q, i = (int(v) for v in off[0])
        stage, example = places[i]
        raise TaskError(
            f"The per-token shares of training row {rows[i]} (stage {stage!r}, example {example}) sum to "
            f"{total[q, i]:.4g} where the store's features score it {scores[q, i]:.4g}, so train_data are not the "
            "examples the store was featurized with (other examples, or another order); pass those, in their order."
        )


def _cached_scores(attributor: Attributor, query: Tensor, places: Sequence[tuple[str, int]]) -> np.ndarray:
    """⟨q̃, T(z)⟩ of every query and sequence from the store's cached features: ``[Q, n]``."""
    name = f"methods/{attributor.method}/train"
    features = [attributor.store.read_rows(f"{name}/{stage}", index, index + 1)[0] for stage, index in places]
    return query.numpy() @ np.stack(features).astype(np.float64).T
