"""Text: tasks for transformers (sequence and token classification, language modelling, seq2seq) and their
parameters.

**Batches** are dicts of tensors, as Hugging Face models take them: ``input_ids`` ``[B, T]``,
``attention_mask`` ``[B, T]`` (1 = token, 0 = padding, on either side of each sequence's tokens), ``labels``
(``[B]`` class ids for classification; ``[B, T]`` token ids for language modelling, −100 = not
predicted, default ``input_ids``; ``[B, S]`` the target of an encoder–decoder model), and any other model
input (``token_type_ids``…), passed on as it is. [`TextDataset`][] builds such examples from token ids.

**Left padding** (``tokenizer.padding_side = "left"``, decoder models' default) would shift every token's position,
and an ALiBi model, called without a mask, would attend to it: the tasks roll each left-padded row to the right
before the model runs, in every tensor ``[B, T, …]`` on the tokens' positions ([`right_padded`][]), and read their
labels there, so a row's score, gradient and per-token scores are those of its sequence alone. Padding inside a
sequence (a 0 between two 1s of its mask) is refused.

**Masks.** Per-example gradients run the model under ``torch.func.vmap``, where Hugging Face's own
mask code fails: it branches on the mask's values (``padding_mask.all()``, to skip the mask when
nothing is padded). The tasks therefore build the 4-D additive mask ``[B, 1, T, T]`` themselves
(0 where a query position may attend to a key, the dtype's minimum elsewhere; causal for causal
models), which transformers passes through untouched. That runs under vmap with the ``"eager"`` and
``"sdpa"`` attention implementations; others (flash attention, flex attention) are refused with
the one-line fix. An encoder–decoder model gets a padding row ``[B, 1, 1, T]`` that its encoder and
its cross-attention broadcast, and a causal ``[B, 1, S, S]`` for its decoder ([`Seq2SeqTask`][]).
Whether a model is causal is read from its attention modules' ``is_causal`` flags (what transformers
itself dispatches on) unless the task says so, and the first batch a task sees outside vmap checks that
the mask reproduces the model's own masking exactly. Plain
``torch.nn`` models receive the 2-D ``attention_mask`` and build what they need (vmap-safe ops
only: ``masked_fill``/``where``, never ``if mask.any():``).

**Parameters** ([`ModuleSelection`][], kronfluence-style): linear layers only (``nn.Linear``,
transformers' GPT-2 ``Conv1D``, ``nn.MultiheadAttention``); embeddings, position tables and layer norms
are left out. The classifiers' tasks (sequence and token classification) take every linear layer: each
transformer layer's attention and MLP projections, and the head (its pooler, its classifier). A
classifier's head is where a fine-tune moves most, and leaving it out measurably loses the attribution
(BENCHMARKS.md, "The classifier's head in the default selection"). The language-model task takes only
the layers inside the numbered blocks: its output head is tied to the embeddings or as large as the
vocabulary.

Score convention (docs/concepts/source.md §1): score(q, z) = −Δf(q, z). For classification f is the margin,
so a positive score means z raised the margin (helped). For language modelling f is the query's
summed token *loss*, so a positive score means removing z would lower the query's loss: z raised
it. ``score_labels`` on each task names the two signs in these terms for reports.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from source_proj.errors import TaskError
from source_proj.tasks.data import IGNORE_INDEX, collate_of
from source_proj.tasks.draws import FisherDraws
from source_proj.tasks.task import (
    Batch,
    ClassificationTask,
    MultiLabelClassificationTask,
    ParameterSelection,
    RegressionTask,
    Task,
    check_label_smoothing,
    output_tensor,
    smoothing_described,
)

VMAP_ATTENTION = ("eager", "sdpa")
"""Hugging Face attention implementations that run under ``torch.func.vmap`` with the tasks' masks."""

AttentionKind = Literal["auto", "causal", "bidirectional"]
ProblemType = Literal["auto", "single_label_classification", "multi_label_classification", "regression"]
"""What a sequence classifier's head is trained for: Hugging Face's ``config.problem_type`` names."""
_PROBLEMS = ("single_label_classification", "multi_label_classification", "regression")


# ---------------------------------------------------------------------------------------------
# Parameter selection by module name


@dataclass(frozen=True)
class ModuleSelection:
    """θ = the parameters of linear layers chosen by module name (kronfluence's tracked modules).

    A linear layer is an ``nn.Linear`` (and subclasses), transformers' ``Conv1D`` (GPT-2) or an
    ``nn.MultiheadAttention`` (its packed input projection; its ``out_proj`` is an ``nn.Linear`` of
    its own). Nothing else is ever selected: embeddings, norms and position tables are excluded by
    construction, and so is a layer whose weight is another module's by its first name (an LM head tied to the token
    embedding: ``lm_head.weight`` is ``transformer.wte.weight``), left out with the embeddings.

    Attributes:
        include: glob patterns on module names (``"*.mlp.*"``, ``"transformer.h.1.*"``).
        exclude: glob patterns removed after ``include``.
        blocks_only: keep only modules inside a numbered block (a name component that is an integer,
            ``transformer.h.0.attn.c_attn``, ``encoder.layer.3.output.dense``): the attention and MLP
            projections of every transformer layer, without poolers and output heads.
        bias: also the layers' biases.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    blocks_only: bool = True
    bias: bool = True

    def modules(self, model: nn.Module) -> list[str]:
        """Names of the selected linear modules, in ``model.named_modules()`` order."""
        return [name for name, module in model.named_modules() if _is_linear(module) and self._keeps(name)]

    def _keeps(self, name: str) -> bool:
        if self.blocks_only and not any(part.isdigit() for part in name.split(".")[:-1]):
            return False
        if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def select(self, model: nn.Module) -> list[str]:
        """Names of the selected trainable parameters, in ``model.named_parameters()`` order."""
        canonical = {id(param): name for name, param in model.named_parameters()}  # a tied weight's first name
        wanted: set[str] = set()
        tied: list[str] = []
        for module_name in self.modules(model):
            module = model.get_submodule(module_name)
            for local, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{local}"
                if canonical.get(id(param)) != full:  # another module's weight (an LM head's tied to the embedding)
                    tied.append(f"{full} is {canonical.get(id(param))}")
                elif param.requires_grad and (self.bias or not _is_bias(local)):
                    wanted.add(full)
        names = [name for name, _ in model.named_parameters() if name in wanted]
        if not names:
            shared = (f" ({'; '.join(tied)}: a weight tied to an embedding is left out with the embeddings, select it "
                      "by name with sp.ParameterSelection)" if tied else "")  # fmt: skip
            raise TaskError(
                f"The module selection {self.describe()} keeps no trainable linear layer of {type(model).__name__}"
                f"{shared}; loosen include/exclude, set blocks_only=False, or select by parameter name with "
                "sp.ParameterSelection."
            )
        return names

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description, stored in the store's metadata."""
        return {
            "kind": "modules",
            "include": list(self.include),
            "exclude": list(self.exclude),
            "blocks_only": self.blocks_only,
            "bias": self.bias,
        }


def _with_head() -> ModuleSelection:
    """The classifiers' default selection: every linear layer, the blocks' and the head's (a pooler, the classifier).

    ``ModuleSelection(blocks_only=False)``. A sequence or token classifier's head is a few small linear layers,
    freshly initialised in a fine-tune and moved the most by it; attributing without it scores a part of the
    parameters' change, which early in an AdamW run can even rank the examples backwards (BENCHMARKS.md,
    "The classifier's head in the default selection"). ``ModuleSelection()`` leaves it out.
    """
    return ModuleSelection(blocks_only=False)


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, nn.MultiheadAttention)):
        return True
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _is_bias(local_name: str) -> bool:
    return local_name == "bias" or local_name.endswith("_bias") or local_name in ("bias_k", "bias_v")


# ---------------------------------------------------------------------------------------------
# The model: Hugging Face or plain, causal or not, and the attention mask it gets


@dataclass(frozen=True)
class ModelKind:
    """What a text task needs to know about its model.

    Attributes:
        hugging_face: a transformers ``PreTrainedModel`` (gets the task's 4-D mask); else a plain
            module (gets the 2-D ``attention_mask``).
        causal: whether its self-attention is causal (``None`` for plain modules: their own business).
        dtype: the dtype of its parameters (the additive mask's dtype).
        name: the model's class name, for messages.
        positions: a causal Hugging Face model whose forward takes ``position_ids``: the task passes them (see
            [`inspect_model`][]).
        window: the sliding window of a causal model whose every layer attends through one (Mistral's
            ``sliding_window``): a query attends to the ``window`` keys up to itself; ``None``: no window.
        unbuilt_window: a sliding window the task's mask cannot build (on some layers only, as Gemma 2 alternates
            them, or a bidirectional model's): sequences longer than it are refused; ``None``: none.
        max_positions: the positions its learned position table holds (GPT-2's ``wpe``, OPT's ``embed_positions``):
            a batch padded to more is refused, where the model would index past the table; ``None``: no such table.
        alibi: its attention biases are ALiBi's, which it builds from the 2-D padding mask (BLOOM, Falcon with
            ``alibi=True``): it is called without a mask (see [`inspect_model`][]).
    """

    hugging_face: bool
    causal: bool | None
    dtype: torch.dtype
    name: str
    positions: bool = False
    window: int | None = None
    unbuilt_window: int | None = None
    max_positions: int | None = None
    alibi: bool = False


def inspect_model(model: nn.Module, attention: AttentionKind = "auto") -> ModelKind:
    """Classify ``model`` for the text tasks; refuses what cannot run under ``torch.func.vmap``.

    A Hugging Face model must use an attention implementation of ``VMAP_ATTENTION``; its
    causality is ``attention`` when given, else read from its attention modules' ``is_causal``. A causal one
    whose forward takes ``position_ids`` is given them (0 … T − 1, what right-padded tokens get from every causal
    model; the tasks roll left-padded rows to the right first, see [`right_padded`][]): some derive them from the
    attention mask (OPT's cumulative sum), which the task replaces by its 4-D additive mask.

    An ALiBi model (BLOOM, Falcon with ``alibi=True``) reads the 2-D mask itself, to place its linear biases, and
    cannot take the 4-D one; it is called without a mask, which is exact for what the tasks predict: its attention
    is causal, so over right-padded sequences a token never reaches the padding after it, and its biases, a slope
    times each key's position, are those of the padded mask at every token. (A bidirectional one is refused.)
    """
    params = list(model.parameters())
    dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if config is None or implementation is None:
        return ModelKind(False, None, dtype, type(model).__name__)
    name = type(model).__name__
    if implementation not in VMAP_ATTENTION:
        raise TaskError(
            f"{name} uses the attention implementation {implementation!r}, which cannot compute per-example "
            "gradients under torch.func.vmap; switch it (the weights stay as they are) with "
            '`model.set_attn_implementation("eager")`, or build it with attn_implementation="eager".'
        )
    positions = "position_ids" in inspect.signature(model.forward).parameters
    alibi = _alibi(config)
    if attention != "auto":
        causal = attention == "causal"
    elif alibi:  # BLOOM's attention modules carry no flag; every ALiBi model transformers holds is causal
        causal = True
    else:
        flags = {m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)}
        if not flags:
            raise TaskError(
                f"Cannot tell whether {name} attends causally (none of its modules has an is_causal flag); "
                "pass attention='causal' or attention='bidirectional' to the task."
            )
        causal = True in flags and getattr(config, "is_causal", True) is not False
    window, everywhere = _sliding_window(config)
    built = window if causal and everywhere else None
    if alibi and not causal:
        raise TaskError(
            f"{name} places its ALiBi position biases from the 2-D attention mask, which the task can only leave out "
            "for causal attention; attribute it with attention='causal' (or 'auto'), as it was trained."
        )
    return ModelKind(True, causal, dtype, name, positions and causal, built, window if built is None else None,
                     _position_table(model), alibi)  # fmt: skip


def _alibi(config: Any) -> bool:
    """Whether a Hugging Face model builds ALiBi biases from its 2-D mask: BLOOM always, Falcon and MPT when set."""
    attn_config = getattr(config, "attn_config", None)  # MPT's
    return (getattr(config, "model_type", None) == "bloom" or getattr(config, "alibi", None) is True
            or getattr(attn_config, "alibi", None) is True)  # fmt: skip


def _position_table(model: nn.Module) -> int | None:
    """How many positions a model's learned position tables hold (the fewest, if several), else ``None``: the
    embeddings named as transformers names them (``wpe``, ``*position_embeddings``, ``embed_positions``), less the
    rows before position 0 (OPT's and BART's ``offset`` of 2, RoBERTa's ``padding_idx`` + 1)."""
    sizes = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and (leaf == "wpe" or "position" in leaf):
            offset = getattr(module, "offset", 0)
            start = int(offset) if isinstance(offset, int) else 0
            if module.padding_idx is not None:
                start = max(start, int(module.padding_idx) + 1)
            sizes.append(module.num_embeddings - start)
    return min(sizes) if sizes else None


def _sliding_window(config: Any) -> tuple[int | None, bool]:
    """The sliding window of a Hugging Face model (``sliding_window``, where enabled and some layer attends through
    it), else ``None``, and whether every layer attends through it (Mistral's) or only some (``layer_types``: Gemma 2
    alternates windowed and full layers), which one mask cannot serve."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or getattr(config, "use_sliding_window", True) is False:
        return None, False
    types = getattr(config, "layer_types", None)
    if types and "sliding_attention" not in types:
        return None, False
    return window, not types or all(kind == "sliding_attention" for kind in types)


def attention_bias(
    attention_mask: Tensor, causal: bool, dtype: torch.dtype = torch.float32, window: int | None = None
) -> Tensor:
    """The additive 4-D mask ``[B, 1, T, T]`` of a ``[B, T]`` padding mask (1 = token, 0 = padding).

    Entry ``[b, 0, i, j]`` is 0 where position i may attend to key j (j is a token, and j ≤ i when
    ``causal``, and i − j < ``window`` with a sliding window) and the minimum of ``dtype`` elsewhere (float32's for
    float64: finite where models take their softmax, so a fully masked row stays finite). Pure tensor operations:
    safe under ``torch.func.vmap``.
    """
    length = attention_mask.shape[-1]
    allowed = attention_mask[:, None, None, :].bool()
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    if window is not None:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).triu(1 - window)
    allowed = allowed.expand(attention_mask.shape[0], 1, length, length)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, _masked(dtype))


def _masked(dtype: torch.dtype) -> float:
    """The additive mask's value at a masked key: the minimum of ``dtype``, but float32's for float64, since models
    take their softmax in float32 (Llama's, Mistral's), where float64's minimum is -inf: a row masked whole (a
    padding row past a sliding window) would be NaN, and its backward (0 · NaN) would make every gradient NaN."""
    return torch.finfo(torch.float32 if dtype == torch.float64 else dtype).min


def _plain(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds values we may inspect (not a functorch-batched tensor under vmap)."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _padding_mask(batch: Mapping[str, Tensor]) -> Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"]) if mask is None else mask


def _check_batch(batch: Batch) -> None:
    """Refuse, outside vmap, a batch that is not a dict with 0/1 attention masks, each row's tokens in one run."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TaskError(
            "Text tasks take batches as dicts with 'input_ids' (and 'attention_mask', 'labels'); got "
            f"{type(batch).__name__}: return dicts of tensors from the dataset (see sp.TextDataset)."
        )
    _check_unpacked(batch)
    mask = batch.get("attention_mask")
    if mask is None or not _plain(mask) or mask.numel() == 0:
        return
    if mask.dim() != 2:
        raise TaskError(f"'attention_mask' must have shape [B, T] (1 = token, 0 = padding), not {list(mask.shape)}.")
    if ((mask != 0) & (mask != 1)).any():
        raise TaskError("'attention_mask' must hold only 0 (padding) and 1 (token); pass the tokenizer's mask.")
    runs = (mask[:, 1:] > mask[:, :-1]).sum(dim=1) + (mask[:, 0] > 0).long()  # where each run of tokens starts
    if (runs > 1).any():
        row = int(torch.nonzero(runs > 1)[0, 0])
        raise TaskError(
            f"Example {row} of the batch has padding between two of its tokens; the text tasks take each sequence as "
            "one run of tokens, padded on the left or the right (tokenizer.padding_side), not inside it."
        )


def _leading_padding(mask: Tensor) -> Tensor:
    """How many padding positions open each row of a ``[B, T]`` padding mask: ``[B]`` (0 for right padding)."""
    return (mask.cumsum(-1) == 0).sum(-1)


def _roll_left(value: Tensor, shift: Tensor) -> Tensor:
    """Each row of ``value`` ``[B, T, …]`` rolled ``shift[b]`` positions to the left (a gather: vmap-safe)."""
    length = value.shape[1]
    index = (torch.arange(length, device=value.device) + shift.to(value.device)[:, None]) % length
    return value.gather(1, index.view(*index.shape, *[1] * (value.dim() - 2)).expand_as(value))


def right_padded(batch: Batch, task: Task) -> Batch:
    """``batch`` as a text ``task`` runs it: each left-padded row rolled to the right (its tokens from position 0,
    then its padding) in every tensor ``[B, T, …]`` aligned with ``input_ids`` ``[B, T]`` but the task's targets on
    another axis (a sequence classifier's labels, a seq2seq target). A right-padded batch, and any batch of another
    task, is returned as it is. Tensor operations only: safe under ``torch.func.vmap``."""
    return task._right_padded(batch) if isinstance(task, _TextTask) else batch


def _check_unpacked(batch: Mapping[str, Tensor]) -> None:
    """Refuse, outside vmap, a row that packs several sequences: its ``position_ids`` restart between two tokens
    (``DataCollatorWithFlattening``, padding-free packing). Trained with flash attention, or without a cache, the
    model attends within each packed sequence; the task's mask, built from the padding alone, would let them attend
    to each other, and each row's score would be that of several sequences."""
    positions = batch.get("position_ids")
    if positions is None or not _plain(positions) or positions.dim() != 2 or positions.shape[-1] < 2:
        return
    tokens = _padding_mask(batch).bool()
    restart = (positions[:, 1:] - positions[:, :-1] != 1) & tokens[:, 1:] & tokens[:, :-1]
    if restart.any():
        row, col = (int(i) for i in torch.nonzero(restart)[0])
        raise TaskError(
            f"Example {row} of the batch packs several sequences (its position_ids restart at position {col + 1}); "
            "attribution scores one sequence per example: give each sequence as an example of its own, padded per "
            "batch (sp.CollatedDataset with DataCollatorForLanguageModeling), not packed by DataCollatorWithFlattening."
        )


def _check_within_window(batch: Mapping[str, Tensor], kind: ModelKind) -> None:
    """Refuse, outside vmap, a sequence longer than a sliding window the task's mask does not build: up to the window
    every key is in reach, so the mask is exact; beyond it the windowed layers would silently attend to all. (The
    check of the first batch against the model's own masking cannot see this where that batch is short.)"""
    window = kind.unbuilt_window
    lengths = _padding_mask(batch).sum(-1)
    if window is not None and lengths.numel() and int(lengths.max()) > window:
        row = int(lengths.argmax())
        raise TaskError(
            f"Example {row} of the batch has {int(lengths[row])} tokens, more than the sliding window of {window} that "
            f"some of {kind.name}'s layers attend through, which one attention mask cannot build; split the "
            f"sequences into pieces of at most {window} tokens, or subclass the task and override forward."
        )


def _check_positions(width: int, kind: ModelKind, mask: Tensor | None, what: str = "") -> None:
    """Refuse a batch whose sequences are padded to more positions (``width``) than the model's position table
    holds: its lookup would fail, an index error on the CPU and a device-side assert on a GPU. The width is the
    batch's shape, known on the host; only a refused batch reads ``mask`` ``[B, width]`` (1 = token), to name its
    longest sequence. ``what``: which sequences (``" target"``, a decoder's)."""
    limit = kind.max_positions
    if limit is None or width <= limit:
        return
    said = f"The batch's{what} sequences are padded to {width} positions"
    if mask is not None and _plain(mask) and mask.numel():
        lengths = mask.reshape(-1, mask.shape[-1]).sum(-1)
        row = int(lengths.argmax())
        if int(lengths[row]) > limit:
            said = f"Example {row} of the batch has {int(lengths[row])}{what} tokens"
    raise TaskError(
        f"{said}, more than the {limit} positions of {kind.name}'s position table; truncate or split the sequences "
        f"to at most {limit} tokens, and pad them to at most {limit}."
    )


def _logits(output: Any) -> Tensor:
    logits = output_tensor(output)
    if logits is not None:
        return logits
    raise TaskError(
        f"The model returned {type(output).__name__}; a text task needs logits: a tensor, a tuple starting with "
        "one, or an object with .logits."
    )


# torch.func.vmap's messages for a forward that branches on tensor values or calls .item().
_VMAP_BRANCH_ERRORS = ("data-dependent control flow", "calling .item() on a Tensor")


def _call_model(model: Callable[..., Any], inputs: dict[str, Tensor], kind: ModelKind) -> Tensor:
    try:
        return _logits(model(**inputs))
    except RuntimeError as err:
        if not any(sign in str(err) for sign in _VMAP_BRANCH_ERRORS):
            raise
        raise TaskError(
            f"{kind.name} branches on the values of its inputs (`if mask.any():`, `.item()`), which "
            "torch.func.vmap cannot run per example; replace the branch by tensor operations (torch.where, "
            "masked_fill). For a Hugging Face model, use an attention implementation of "
            f"{list(VMAP_ATTENTION)} and let the task build the mask (do not pass your own)."
        ) from err


# ---------------------------------------------------------------------------------------------
# Tasks


class _TextTask(Task):
    """Forward, masks and binding shared by the text tasks (they are dataclasses with ``attention``)."""

    attention: AttentionKind
    _kind: ModelKind | None
    _mask_checked: bool
    score_labels: ClassVar[tuple[str, str]] = ("helpful", "harmful")
    # Whether a positive score means the example helped (a margin it raised), not that it raised a loss or an error:
    # reports colour the lists by it.
    positive_helps: ClassVar[bool] = True

    def bind(self, model: nn.Module) -> _TextTask:
        """A copy of the task that knows ``model``'s kind (Hugging Face or plain, causal or not)."""
        bound = copy.copy(self)
        bound._kind = self._resolve(model)
        bound._mask_checked = False
        return bound

    def _resolve(self, model: nn.Module) -> ModelKind:
        return inspect_model(model, self.attention)

    def _token_aligned(self, key: str) -> bool:
        """Whether the batch's ``key``, where it is ``[B, T, …]``, lies on the positions of ``input_ids``."""
        return True

    def _right_padded(self, batch: Batch) -> Batch:
        """See [`right_padded`][]: outside vmap a batch without left padding is returned itself."""
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if mask is None or mask.dim() != 2:
            return batch
        shift = _leading_padding(mask)
        if _plain(shift) and not bool(shift.any()):
            return batch
        width = tuple(batch["input_ids"].shape[:2])
        return {key: _roll_left(value, shift) if isinstance(value, Tensor) and value.dim() >= 2
                and tuple(value.shape[:2]) == width and self._token_aligned(key) else value
                for key, value in batch.items()}  # fmt: skip

    def forward(self, model: Callable[..., Any], batch: Batch) -> Tensor:
        """Logits of the batch: ``[B, C]`` (classification) or ``[B, T, V]`` (language modelling), per-position
        logits on the positions of the batch rolled to right padding ([`right_padded`][]), as the task's losses
        read them.

        ``model`` is the module itself, or (inside the gradient engine) a functional call of the
        module the task was bound to (see [`bind`][]).
        """
        _check_batch(batch)
        batch = self._right_padded(batch)
        bound = self._kind is not None
        if isinstance(model, nn.Module):
            kind = self._resolve(model)
        elif self._kind is not None:
            kind = self._kind
        else:
            raise TaskError(
                f"This {type(self).__name__} has not seen its model; call task.bind(model) before calling forward "
                "with a functional model (featurize, Attributor and PerExampleGradients do this)."
            )
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        _check_positions(batch["input_ids"].shape[-1], kind, _padding_mask(batch))
        if kind.alibi:  # causal over right padding: no token reaches the padding (see inspect_model)
            inputs.pop("attention_mask", None)
        elif kind.hugging_face:
            inputs["attention_mask"] = attention_bias(_padding_mask(batch), bool(kind.causal), kind.dtype, kind.window)
        if kind.positions and "position_ids" not in inputs:
            ids = batch["input_ids"]
            inputs["position_ids"] = torch.arange(ids.shape[-1], device=ids.device).expand(ids.shape[0], -1)
        if kind.unbuilt_window is not None and _plain(batch["input_ids"]):
            _check_within_window(batch, kind)
        logits = _call_model(model, inputs, kind)
        if bound and kind.hugging_face and not self._mask_checked and _plain(batch["input_ids"]):
            self._check_mask(model, batch, logits, kind)
        return logits

    def _check_mask(self, model: Callable[..., Any], batch: Batch, logits: Tensor, kind: ModelKind) -> None:
        """Refuse a mask that does not reproduce the model's own masking (compared once, outside vmap)."""
        own_inputs = {key: value for key, value in batch.items() if key != "labels"}
        own_inputs["attention_mask"] = _padding_mask(batch)
        with torch.no_grad():
            own = _logits(model(**own_inputs)).float()
        ours = logits.detach().float()
        if own.shape != ours.shape:
            raise TaskError(f"{kind.name} returned logits of shape {list(own.shape)} with its own mask and "
                            f"{list(ours.shape)} with the task's; subclass the task and override forward.")
        if own.dim() == 3:  # compare token positions only: what padding positions compute is never used
            keep = _padding_mask(batch).bool()
            own, ours = own[keep], ours[keep]
        scale = float(own.abs().max()) if own.numel() else 0.0
        error = float((own - ours).abs().max()) if own.numel() else 0.0
        # Relative to the logits' own scale: a random-initialised model's logits can be ~1e-3 in all, and a
        # wrong mask then moves them by ~1e-4; rounding alone moves them by ~1e-7 of the scale.
        if error > 1e-3 * scale + 1e-6:
            style = "causal" if kind.causal else "bidirectional"
            raise TaskError(
                f"The {style} attention mask the task builds does not reproduce {kind.name}'s own masking "
                f"(logits differ by {error:.3g}); if the model attends the other way pass attention="
                f"{'bidirectional' if kind.causal else 'causal'!r}, and for other patterns (sliding windows, "
                "prefixes) subclass the task and override forward."
            )
        self._mask_checked = True

    def representation(self, model: nn.Module, batch: Batch) -> Tensor:
        """The input of the model's last ``nn.Linear`` (its last hidden states), averaged over the tokens of
        each sequence when it is per position: float ``[B, h]`` (RepSim compares these)."""
        batch = self._right_padded(batch)  # the hidden states lie on the positions the model ran
        hidden = self._last_linear_input(model, batch)
        if hidden is None:
            return super().representation(model, batch)
        if hidden.dim() == 3:
            weights = _padding_mask(batch).to(hidden)[..., None]
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return hidden.reshape(hidden.shape[0], -1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "attention": self.attention}


@dataclass
class SequenceClassificationTask(_TextTask, ClassificationTask):
    """A sequence classifier's head, trained as Hugging Face's ``*ForSequenceClassification`` trains it (the mean
    over the batch of the per-example loss); the problem decides the loss and the measurement:

    | problem | labels | loss | measurement f |
    |---|---|---|---|
    | single-label | class ids ``[B]`` | cross-entropy | margin logit_y − logsumexp_{c≠y} logit_c |
    | multi-label | 0/1 rows ``[B, C]`` | sigmoid cross-entropy, mean over the C labels | Σ_c (2y_c − 1)·logit_c |
    | regression | numbers ``[B]`` (one output) | (ŷ − y)² | the error abs(ŷ − y) |

    ``problem_type="auto"`` decides as the model does: the model config's ``problem_type`` where it is set, else
    regression for a single output, multi-label for float labels and single-label for integer labels. Reports
    word the scores by the problem the task knows before it sees labels: say ``problem_type`` (or set it in the
    model's config, as Hugging Face does when it first trains the head) for a multi-label head's words.

    Batches: ``{"input_ids", "attention_mask", "labels", ...}``; the model returns logits ``[B, C]``.
    A positive score means z raised the query's measurement: helped it, except for regression, whose
    measurement is an error (see [`score_labels`][]).

    Attributes:
        parameters: which parameters are attributed (default: every linear layer, the head's
            too: ``ModuleSelection(blocks_only=False)``).
        attention: for Hugging Face models, how the mask is built: ``"auto"`` (from the model),
            ``"causal"`` (GPT-2-style classifiers) or ``"bidirectional"`` (BERT-style).
        label_smoothing: ε of a run trained on smoothed labels (the Trainer's ``label_smoothing_factor``),
            see [`ClassificationTask`][]; single-label classification only.
        problem_type: ``"auto"``, or the problem, in Hugging Face's names.
    """

    parameters: ModuleSelection | ParameterSelection = field(default_factory=_with_head)
    name: str = "sequence-classification"
    attention: AttentionKind = "auto"
    problem_type: ProblemType = "auto"
    _kind: ModelKind | None = field(default=None, init=False, repr=False, compare=False)
    _mask_checked: bool = field(default=False, init=False, repr=False, compare=False)
    _config_problem: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.problem_type not in ("auto", *_PROBLEMS):
            raise TaskError(f"problem_type must be 'auto' or one of {list(_PROBLEMS)}, not {self.problem_type!r}.")
        if self.label_smoothing and self.problem_type not in ("auto", "single_label_classification"):
            raise TaskError(f"Label smoothing applies to single-label classification, not to {self.problem_type}; "
                            "leave label_smoothing at 0.")  # fmt: skip

    @property
    def score_labels(self) -> tuple[str, str]:  # type: ignore[override]
        """What a positive and a negative score mean, in words (reports print them)."""
        problem = self.problem_type if self.problem_type != "auto" else self._config_problem
        if problem == "regression":
            return ("raised the query's error (removing it lowers the error)",
                    "lowered the query's error (removing it raises the error)")  # fmt: skip
        if problem == "multi_label_classification":
            return "raised the labels' log-odds (helpful)", "lowered the labels' log-odds (harmful)"
        return "raised the margin (helpful)", "lowered the margin (harmful)"

    @property
    def positive_helps(self) -> bool:  # type: ignore[override]
        """A regression head's measurement is its error: there a positive score means the example raised it."""
        problem = self.problem_type if self.problem_type != "auto" else self._config_problem
        return problem != "regression"

    def _token_aligned(self, key: str) -> bool:
        return key != "labels"  # one label (or row of them) per sequence

    def bind(self, model: nn.Module) -> SequenceClassificationTask:
        bound = super().bind(model)
        assert isinstance(bound, SequenceClassificationTask)
        config = getattr(model, "config", None)
        problem = getattr(config, "problem_type", None)
        if problem not in _PROBLEMS:  # as the model decides: one output is a regression; else the labels' type says
            problem = "regression" if getattr(config, "num_labels", None) == 1 else None
        bound._config_problem = problem
        return bound

    def _problem(self, outputs: Tensor, labels: Tensor) -> str:
        """The problem this batch is trained as (see the class docstring)."""
        if self.problem_type != "auto":
            problem = self.problem_type
        elif self._config_problem is not None:
            problem = self._config_problem
        elif outputs.shape[-1] == 1:
            problem = "regression"
        else:
            problem = "multi_label_classification" if labels.is_floating_point() else "single_label_classification"
        if problem == "multi_label_classification" and labels.dim() != outputs.dim():
            raise TaskError(
                f"The labels are floats of shape {list(labels.shape)}, which train a multi-label head (one 0/1 label "
                f"per output, shape {list(outputs.shape)}); give class ids as integers, or pass problem_type."
            )
        if self.label_smoothing and problem != "single_label_classification":
            raise TaskError(f"Label smoothing applies to single-label classification, but this model's head is "
                            f"trained for {problem}; leave label_smoothing at 0.")  # fmt: skip
        return problem

    def _as(self, outputs: Tensor, batch: Batch) -> tuple[Task | None, Batch]:
        """The task the problem is (``None``: single-label, this task's own) and the batch in its form."""
        labels = _labels(batch)
        problem = self._problem(outputs, labels)
        if problem == "regression":
            return _REGRESSION, (None, labels.reshape(outputs.shape[:1]))
        if problem == "multi_label_classification":
            return _MULTI_LABEL, (None, labels)
        return None, (None, labels)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        task, plain = self._as(outputs, batch)
        return super().loss(outputs, plain) if task is None else task.loss(outputs, plain)

    def fisher_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        task, plain = self._as(outputs, batch)
        return super().fisher_loss(outputs, plain) if task is None else task.fisher_loss(outputs, plain)

    def measurement(self, outputs: Tensor, batch: Batch) -> Tensor:
        task, plain = self._as(outputs, batch)
        return super().measurement(outputs, plain) if task is None else task.measurement(outputs, plain)

    def fisher_targets(
        self, outputs: Tensor, batch: Batch, draws: FisherDraws | None
    ) -> list[tuple[Tensor, Batch]]:
        task, plain = self._as(outputs, batch)
        pairs = (super().fisher_targets(outputs, plain, draws) if task is None
                 else task.fisher_targets(outputs, plain, draws))  # fmt: skip
        labels = _labels(batch)
        return [(weight, {**batch, "labels": targets[1].to(labels.dtype) if labels.is_floating_point()
                          else targets[1]}) for weight, targets in pairs]  # fmt: skip

    def describe(self) -> dict[str, Any]:
        problem = {"problem_type": self.problem_type} if self.problem_type != "auto" else {}
        return {**super().describe(), **problem}


_REGRESSION = RegressionTask()
_MULTI_LABEL = MultiLabelClassificationTask()


def _labels(batch: Batch) -> Tensor:
    _check_batch(batch)
    if "labels" not in batch:
        raise TaskError("A sequence-classification batch needs 'labels' [B] (class ids); add them to the examples.")
    return batch["labels"]


def loss_positions(batch: Batch) -> Tensor:
    """Which next-token predictions carry loss: bool ``[B, T−1]``, entry t for predicting token t+1.

    Token t+1 is predicted from position t when both are tokens (attention mask 1) and its label is
    not −100. Labels default to ``input_ids``.
    """
    mask = _padding_mask(batch).bool()
    labels = batch.get("labels", batch["input_ids"])
    return mask[:, 1:] & mask[:, :-1] & (labels[:, 1:] != IGNORE_INDEX)


@dataclass
class LanguageModelingTask(_TextTask):
    """Next-token prediction with a causal model.

    measurement f(q) = s(q), the summed token loss of the query sequence (as in the SOURCE paper):
    Σ_t −log p(x_{t+1} | x_{≤t}) over the positions of ``loss_positions``. A positive score
    means removing z would lower the query's loss (z raised it); the sequences that taught the model
    the query have the most negative scores.

    The per-example training loss is ℓ(z) = s(z)/n. SOURCE's operators depend on the absolute scale
    of the curvature, so ℓ must be the loss whose batch mean the optimiser minimised:

    * Hugging Face's causal-LM loss (``model(..., labels=...).loss``, the Trainer) is the mean over
      every predicted token of the batch, Σ_b s(z_b) / Σ_b n(z_b). Pass ``tokens_per_sequence`` =
      n̄, the mean number of predicted tokens per training sequence ([`mean_predicted_tokens`][]):
      the batch mean of ℓ is then Σ s / (B·n̄), *equal* to the model's loss whenever every batch
      predicts the same number of tokens (fixed-length blocks, the ``run_clm`` recipe), and its
      first-order approximation otherwise (relative error of the order of the squared coefficient of
      variation of the batch token count).
    * ``tokens_per_sequence=1``: the summed loss (a loop minimising the mean of s).
    * ``tokens_per_sequence="own"``: each sequence's own count, ℓ = s(z)/n(z) (a loop averaging the
      sequences' mean token losses).

    Batches: ``{"input_ids", "attention_mask", "labels" [B, T] (optional, −100 = not predicted), ...}``,
    padded on either side; the model returns logits ``[B, T, V]``. Fisher targets sample a token from the
    model's predictive distribution at every position that carries loss.

    A run trained on smoothed labels (the Trainer's ``label_smoothing_factor`` ε) minimised the token loss
    (1 − ε)·(−log p(x_{t+1})) + ε·mean_v(−log p(v)): pass ``label_smoothing=ε`` and ℓ is made of it. The
    measurement stays the plain summed loss, and the Fisher that of the plain token likelihood.

    Attributes:
        tokens_per_sequence: n̄ (a number) or ``"own"``, see above; required (no default fits every training loop).
        parameters: which parameters are attributed (default: the blocks' attention and MLP
            linear layers, [`ModuleSelection`][]).
        label_smoothing: ε of a run trained on smoothed labels (default 0: none).
    """

    tokens_per_sequence: float | Literal["own"] | None = None  # required: None is refused in one sentence
    parameters: ModuleSelection | ParameterSelection = field(default_factory=ModuleSelection)
    name: str = "language-modeling"
    label_smoothing: float = 0.0
    attention: ClassVar[AttentionKind] = "causal"
    _kind: ModelKind | None = field(default=None, init=False, repr=False, compare=False)
    _mask_checked: bool = field(default=False, init=False, repr=False, compare=False)
    score_labels: ClassVar[tuple[str, str]] = (
        "raised the query's loss (removing it lowers the loss)",
        "lowered the query's loss (removing it raises the loss)",
    )
    positive_helps: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_tokens_per_sequence(self.tokens_per_sequence, "predicted", "mean_predicted_tokens", type(self).__name__)
        self.label_smoothing = check_label_smoothing(self.label_smoothing)

    def _resolve(self, model: nn.Module) -> ModelKind:
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True:
            raise TaskError(
                f"{type(model).__name__} is an encoder–decoder model, which predicts a target from a source: use "
                "sp.Seq2SeqTask, with the target as the batches' 'labels'."
            )
        kind = inspect_model(model, "auto") if _has_causal_flags(model) else inspect_model(model, "causal")
        if kind.hugging_face and not kind.causal:
            raise TaskError(
                f"{kind.name} attends bidirectionally, so it cannot be attributed as a next-token language model; "
                "use a causal model (e.g. *ForCausalLM), or SequenceClassificationTask."
            )
        return kind

    def token_losses(self, outputs: Tensor, batch: Batch, smoothing: float = 0.0) -> Tensor:
        """Per-position next-token loss ``[B, T−1]`` (0 where no loss is carried): entry t is
        −log p(token t+1 | tokens ≤ t), or with ``smoothing`` ε the smoothed loss
        (1 − ε)·(−log p(token t+1)) − ε·mean_v log p(v)."""
        _check_batch(batch)
        if "labels" in batch:  # the model's loss predicts every label that is not −100, padding's too
            _check_no_labelled_padding(batch["labels"], _padding_mask(batch), "attention_mask", first=1)
        batch = self._right_padded(batch)  # as forward ran it
        labels = batch.get("labels", batch["input_ids"])
        keep = loss_positions(batch)
        logits = outputs  # half precision stays: token_nll computes in float32 a block at a time
        vocab = logits.shape[-1]
        _check_tokens(torch.where(keep, labels[:, 1:], torch.zeros_like(labels[:, 1:])), vocab)
        targets = torch.where(keep, labels[:, 1:], torch.full_like(labels[:, 1:], IGNORE_INDEX))
        # Position t's logits predict token t+1: the targets move left and the last position (which predicts
        # nothing) is ignored, so the logits are read where they lie. Slicing off their last position instead
        # copied all B·T·V of them, and its backward zero-filled as many (a language model's largest tensors).
        targets = F.pad(targets, (0, 1), value=IGNORE_INDEX)
        return token_nll(logits.reshape(-1, vocab), targets.reshape(-1), smoothing).view(targets.shape)[:, :-1]

    def _scale(self, batch: Batch) -> Tensor | float:
        """n of ℓ = s/n: the constant n̄ or each sequence's own count ``[B]``."""
        if self.tokens_per_sequence == "own":
            return loss_positions(batch).sum(-1).clamp_min(1).float()
        return float(self.tokens_per_sequence)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return self.token_losses(outputs, batch, self.label_smoothing).sum(-1) / self._scale(batch)

    def fisher_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return self.token_losses(outputs, batch).sum(-1) / self._scale(batch)

    def measurement(self, outputs: Tensor, batch: Batch) -> Tensor:
        return self.token_losses(outputs, batch).sum(-1)

    def fisher_targets(
        self, outputs: Tensor, batch: Batch, draws: FisherDraws | None
    ) -> list[tuple[Tensor, Batch]]:
        """Sampled: one token per loss-carrying position from the model's predictive distribution,
        weight n (ℓ = s/n, so E[n·∇ℓ∇ℓᵀ] = (1/n)Σ_t J_tᵀ(diag p_t − p_t p_tᵀ)J_t, the Gauss–Newton of ℓ;
        cross-position terms vanish in expectation). Exact (``draws=None``): one direction per
        (position, token), (T−1)·V of them (tiny vocabularies only), weight p·n'²/n where n' is the
        direction's own normaliser (1 with ``"own"``: a single position carries its loss). The batches are
        rolled to right padding ([`right_padded`][]), as the outputs are."""
        batch = self._right_padded(batch)
        keep = loss_positions(batch)
        observed = self._normalizers(batch).to(_upcast(outputs[:1, :1]))
        ignored = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        if draws is not None:
            uniform = draws.at(keep)
            # Drawn at every position where the logits lie (the last one's draw is dropped): a slice of the
            # logits would copy all B·T·V of them.
            drawn = sample_tokens(outputs, F.pad(uniform, (0, 1)))[:, :-1]
            labels = ignored.clone()
            labels[:, 1:] = torch.where(keep, drawn.to(labels.device), IGNORE_INDEX)
            return [(observed, {**batch, "labels": labels})]
        probs = torch.softmax(_upcast(outputs[:, :-1]), dim=-1)
        directions = []
        for t in range(keep.shape[1]):
            labels = ignored.clone()
            labels[:, t + 1] = torch.where(keep[:, t], 0, IGNORE_INDEX)
            own = self._normalizers({**batch, "labels": labels}).to(probs)
            for token in range(probs.shape[-1]):
                labels = ignored.clone()
                labels[:, t + 1] = torch.where(keep[:, t], token, IGNORE_INDEX)
                weight = probs[:, t, token] * keep[:, t] * own**2 / observed
                directions.append((weight, {**batch, "labels": labels}))
        return directions

    def _normalizers(self, batch: Batch) -> Tensor:
        """n of ℓ = s/n for every example ``[B]``."""
        scale = self._scale(batch)
        return scale if isinstance(scale, Tensor) else torch.full((batch["input_ids"].shape[0],), scale)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tokens_per_sequence": self.tokens_per_sequence,
                **smoothing_described(self.label_smoothing)}


@dataclass
class Seq2SeqTask(_TextTask):
    """Encoder–decoder generation: Hugging Face's ``*ForConditionalGeneration`` (T5, BART, Marian, Pegasus…).

    Batches: ``{"input_ids", "attention_mask"}`` ``[B, T]`` (the source, padded on either side) and ``"labels"``
    ``[B, S]`` (the target, −100 where nothing is predicted: padding), as ``DataCollatorForSeq2Seq`` builds them, or
    [`TextDataset`][] with ``targets=``. The target is read as given: a left-padded one (``DataCollatorForSeq2Seq``
    pads it on the tokenizer's side) has its −100s before its tokens, which the decoder reads as pad tokens, as the
    model itself does when given those labels. The decoder reads the target shifted right by one, starting from the
    model's ``decoder_start_token_id`` (−100 read as ``pad_token_id``), as the model does itself when given
    ``labels``; a batch's own ``decoder_input_ids`` are taken as they are. The model returns logits ``[B, S, V]``.

    measurement f(q) = s(q), the summed token loss of the query's target, Σ_t −log p(y_t | y_{<t}, x), as for
    [`LanguageModelingTask`][]: a positive score means removing z would lower the query's loss (z raised it);
    the pairs that taught the model the query's answer have the most negative scores.

    The per-example training loss is ℓ(z) = s(z)/n. Hugging Face's seq2seq loss (the Trainer's, the
    ``Seq2SeqTrainer``'s) is the mean over every target token of the batch, so ``tokens_per_sequence`` = n̄, the
    mean number of target tokens per training pair ([`mean_target_tokens`][]), makes the batch mean of ℓ that loss
    (exactly where every batch holds as many target tokens, to first order otherwise); ``"own"`` takes each pair's
    own count. ``label_smoothing``: ε of the Trainer's ``label_smoothing_factor``.

    Fisher targets draw a token for every predicted position from the model, weight n, with the decoder still
    reading the observed target (teacher forcing: the Gauss–Newton matrix of the loss as trained).

    **Masks.** Hugging Face builds an encoder–decoder model's masks with code that branches on their values, which
    ``torch.func.vmap`` cannot run. The task passes the encoder's padding as an additive mask ``[B, 1, 1, T]``
    (one row, which the encoder's self-attention and the decoder's cross-attention both broadcast over their
    queries) and the decoder's causal mask ``[B, 1, S, S]``; the first batch outside vmap checks that the logits
    equal the model's own, and that the shifted target is the model's own ``decoder_input_ids``. A plain
    ``torch.nn`` model is called with ``input_ids``, the 2-D ``attention_mask`` and ``decoder_input_ids`` (give
    ``decoder_start_token_id`` and ``pad_token_id``, which only a Hugging Face config holds).

    Attributes:
        tokens_per_sequence: n̄ (a number) or ``"own"``, see above; required (no default fits every training loop).
        parameters: which parameters are attributed (default: the encoder's and decoder's blocks' linear layers:
            their self-attention, cross-attention and MLP projections, without the output head,
            [`ModuleSelection`][]).
        label_smoothing: ε of a run trained on smoothed labels (default 0: none).
        decoder_start_token_id: the decoder's first input (default: the model config's).
        pad_token_id: the id read for −100 in the shifted target (default: the model config's).
    """

    tokens_per_sequence: float | Literal["own"] | None = None  # required: None is refused in one sentence
    parameters: ModuleSelection | ParameterSelection = field(default_factory=ModuleSelection)
    name: str = "seq2seq"
    label_smoothing: float = 0.0
    decoder_start_token_id: int | None = None
    pad_token_id: int | None = None
    attention: ClassVar[AttentionKind] = "bidirectional"  # the encoder's; the decoder's is causal
    _kind: ModelKind | None = field(default=None, init=False, repr=False, compare=False)
    _mask_checked: bool = field(default=False, init=False, repr=False, compare=False)
    _shift: tuple[int, int] | None = field(default=None, init=False, repr=False, compare=False)
    score_labels: ClassVar[tuple[str, str]] = LanguageModelingTask.score_labels
    positive_helps: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_tokens_per_sequence(self.tokens_per_sequence, "target", "mean_target_tokens", type(self).__name__)
        self.label_smoothing = check_label_smoothing(self.label_smoothing)

    def bind(self, model: nn.Module) -> Seq2SeqTask:
        bound = super().bind(model)
        assert isinstance(bound, Seq2SeqTask)
        bound._shift = self._shift_ids(model)
        return bound

    def _resolve(self, model: nn.Module) -> ModelKind:
        kind = inspect_model(model, "bidirectional")
        if kind.hugging_face and not getattr(model.config, "is_encoder_decoder", False):  # type: ignore[union-attr]
            raise TaskError(
                f"{kind.name} is not an encoder–decoder model (its config's is_encoder_decoder is False); use "
                "LanguageModelingTask for a decoder-only language model, or a classification task."
            )
        return kind

    def _token_aligned(self, key: str) -> bool:
        return key not in ("labels", OBSERVED_TARGET_KEY) and not key.startswith("decoder_")  # the target's axis

    def _shift_ids(self, model: nn.Module | None) -> tuple[int, int] | None:
        """(decoder_start_token_id, pad_token_id): the task's, else the model config's; None where neither is."""
        config = getattr(model, "config", None)
        start = self.decoder_start_token_id
        pad = self.pad_token_id
        start = getattr(config, "decoder_start_token_id", None) if start is None else start
        pad = getattr(config, "pad_token_id", None) if pad is None else pad
        return None if start is None or pad is None else (int(start), int(pad))

    def _decoder_inputs(self, batch: Batch, shift: tuple[int, int] | None, name: str) -> Tensor:
        """The decoder's input ids ``[B, S]``: the batch's own, or its target shifted right by one."""
        if "decoder_input_ids" in batch:
            return batch["decoder_input_ids"]
        if shift is None:
            raise TaskError(
                f"Cannot build {name}'s decoder inputs: neither the batch's 'decoder_input_ids', nor a "
                "decoder_start_token_id and pad_token_id (give them to the task, or to the model's config)."
            )
        return shift_right(batch.get(OBSERVED_TARGET_KEY, _targets(batch)), *shift)

    def forward(self, model: Callable[..., Any], batch: Batch) -> Tensor:
        """Logits ``[B, S, V]`` of the target given the source (teacher forcing; a left-padded source is rolled to
        the right, [`right_padded`][])."""
        _check_batch(batch)
        batch = self._right_padded(batch)
        bound = self._kind is not None
        if isinstance(model, nn.Module):
            kind, shift = self._resolve(model), self._shift_ids(model)
        elif self._kind is not None:
            kind, shift = self._kind, self._shift
        else:
            raise TaskError(
                f"This {type(self).__name__} has not seen its model; call task.bind(model) before calling forward "
                "with a functional model (featurize, Attributor and PerExampleGradients do this)."
            )
        _check_positions(batch["input_ids"].shape[-1], kind, _padding_mask(batch))
        decoder_ids = self._decoder_inputs(batch, shift, kind.name)
        _check_positions(decoder_ids.shape[-1], kind, target_positions(batch) if "labels" in batch else None, " target")
        inputs = {key: value for key, value in batch.items() if key not in ("labels", OBSERVED_TARGET_KEY)}
        inputs["decoder_input_ids"] = decoder_ids
        if kind.hugging_face:
            padding = _padding_mask(batch)[:, None, None, :].bool()
            zero = torch.zeros((), dtype=kind.dtype, device=padding.device)
            inputs["attention_mask"] = torch.where(padding, zero, _masked(kind.dtype))
            target = batch.get("decoder_attention_mask")
            target = torch.ones_like(decoder_ids) if target is None else target
            inputs["decoder_attention_mask"] = attention_bias(target, True, kind.dtype)
        logits = _call_model(model, inputs, kind)
        if bound and kind.hugging_face and not self._mask_checked and _plain(batch["input_ids"]):
            self._check_seq2seq(model, batch, decoder_ids, logits, kind)
        return logits

    def _check_seq2seq(self, model: Callable[..., Any], batch: Batch, decoder_ids: Tensor, logits: Tensor,
                       kind: ModelKind) -> None:  # fmt: skip
        """Refuse masks or a shifted target that do not reproduce the model's own (compared once, outside vmap)."""
        labels = _targets(batch)
        own_inputs = {key: value for key, value in batch.items() if key != OBSERVED_TARGET_KEY}
        own_inputs["labels"] = batch.get(OBSERVED_TARGET_KEY, labels)  # without decoder_input_ids the model shifts it
        own_inputs["attention_mask"] = _padding_mask(batch)
        with torch.no_grad():
            own = _logits(model(**own_inputs)).float()
        keep = labels != IGNORE_INDEX
        ours = logits.detach().float()
        if own.shape != ours.shape:
            raise TaskError(f"{kind.name} returned logits of shape {list(own.shape)} with its own masks and "
                            f"{list(ours.shape)} with the task's; subclass the task and override forward.")
        own, ours = own[keep], ours[keep]
        scale = float(own.abs().max()) if own.numel() else 0.0
        error = float((own - ours).abs().max()) if own.numel() else 0.0
        if error > 1e-3 * scale + 1e-6:
            raise TaskError(
                f"The decoder inputs and masks the task builds do not reproduce {kind.name}'s own logits (they "
                f"differ by {error:.3g}); if the model starts its decoder from another token, give the task "
                "decoder_start_token_id and pad_token_id, or put 'decoder_input_ids' in the batches."
            )
        self._mask_checked = True

    def token_losses(self, outputs: Tensor, batch: Batch, smoothing: float = 0.0) -> Tensor:
        """Each target token's loss ``[B, S]`` (0 where nothing is predicted); with ``smoothing`` ε the smoothed
        one, (1 − ε)·(−log p(y_t)) − ε·mean_v log p(v)."""
        labels, keep = self._predicted(outputs, batch)
        targets = torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))
        vocab = outputs.shape[-1]
        return token_nll(outputs.reshape(-1, vocab), targets.reshape(-1), smoothing).view(targets.shape)

    def _predicted(self, outputs: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """The target ``[B, S]`` and which of its positions are predicted (bool), checked against the logits."""
        labels = _targets(batch)
        if outputs.dim() != 3 or outputs.shape[:2] != labels.shape:
            raise TaskError(
                f"Seq2SeqTask takes the target as 'labels' [B, S] beside logits [B, S, V], but the batch holds labels "
                f"of shape {list(labels.shape)} for logits of shape {list(outputs.shape)}."
            )
        if "decoder_attention_mask" in batch:
            _check_no_labelled_padding(labels, batch["decoder_attention_mask"], "decoder_attention_mask")
        keep = target_positions(batch)
        _check_tokens(torch.where(keep, labels, torch.zeros_like(labels)), outputs.shape[-1])
        return labels, keep

    def _scale(self, keep: Tensor) -> Tensor | float:
        if self.tokens_per_sequence == "own":
            return keep.sum(-1).clamp_min(1).float()
        return float(self.tokens_per_sequence)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return self.token_losses(outputs, batch, self.label_smoothing).sum(-1) / self._scale(target_positions(batch))

    def fisher_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return self.token_losses(outputs, batch).sum(-1) / self._scale(target_positions(batch))

    def measurement(self, outputs: Tensor, batch: Batch) -> Tensor:
        return self.token_losses(outputs, batch).sum(-1)

    def fisher_targets(
        self, outputs: Tensor, batch: Batch, draws: FisherDraws | None
    ) -> list[tuple[Tensor, Batch]]:
        """Sampled: a token for every predicted position from the model, weight n (E[n·∇ℓ∇ℓᵀ] is the Gauss–Newton
        of ℓ = s/n, as for [`LanguageModelingTask`][]). Exact (``draws=None``): one direction per (position,
        token), weight p·n'²/n, n' the direction's own normaliser (1 with ``"own"``). Every direction's decoder
        reads the observed target (kept under ``OBSERVED_TARGET_KEY`` where the batch has no ``decoder_input_ids``):
        only what is predicted changes."""
        labels, keep = self._predicted(outputs, batch)
        reads = batch if "decoder_input_ids" in batch else {**batch, OBSERVED_TARGET_KEY: labels}
        return _aligned_fisher_targets(outputs, labels, keep, self._scale(keep), self.tokens_per_sequence == "own",
                                       reads, draws)  # fmt: skip

    def representation(self, model: nn.Module, batch: Batch) -> Tensor:
        """The decoder's last hidden states (the input of the output head), averaged over the target's predicted
        positions: float ``[B, h]`` (RepSim compares these)."""
        hidden = self._last_linear_input(model, batch)
        if hidden is None or hidden.dim() != 3:
            return super().representation(model, batch)
        weights = target_positions(batch).to(hidden)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def describe(self) -> dict[str, Any]:
        ids = {key: value for key, value in (("decoder_start_token_id", self.decoder_start_token_id),
                                             ("pad_token_id", self.pad_token_id)) if value is not None}  # fmt: skip
        return {**super().describe(), "tokens_per_sequence": self.tokens_per_sequence, **ids,
                **smoothing_described(self.label_smoothing)}


OBSERVED_TARGET_KEY = "source_proj_observed_target"
"""Where a Fisher direction's batch keeps the observed target its decoder reads (its ``labels`` are sampled)."""


def shift_right(labels: Tensor, start: int, pad: int) -> Tensor:
    """A seq2seq model's decoder inputs ``[B, S]`` from its target ``labels``: ``start``, then the target up to its
    last position, −100 read as ``pad`` (tensor operations only: safe under ``torch.func.vmap``)."""
    before = labels[..., :-1]
    before = torch.where(before == IGNORE_INDEX, torch.full_like(before, pad), before)
    return torch.cat([torch.full_like(labels[..., :1], start), before], dim=-1)


def _targets(batch: Batch) -> Tensor:
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if labels is None or labels.dim() != 2:
        got = "none" if labels is None else f"labels of shape {list(labels.shape)}"
        raise TaskError(
            f"A seq2seq batch needs its target as 'labels' [B, S] (token ids, −100 where nothing is predicted), but "
            f"it holds {got}; build the examples with sp.TextDataset(sources, targets=...) or DataCollatorForSeq2Seq."
        )
    return labels


def target_positions(batch: Batch) -> Tensor:
    """Which target positions of a seq2seq batch are predicted: bool ``[B, S]`` (a label that is not −100, and a
    decoder attention mask of 1 where the batch holds one)."""
    labels = _targets(batch)
    keep = labels != IGNORE_INDEX
    mask = batch.get("decoder_attention_mask")
    return keep if mask is None else keep & mask.bool()


def _aligned_fisher_targets(
    outputs: Tensor, labels: Tensor, keep: Tensor, scale: Tensor | float, own: bool, batch: Batch,
    draws: FisherDraws | None,
) -> list[tuple[Tensor, Batch]]:
    """Fisher targets of a loss s/n over positions whose logits ``outputs`` ``[B, P, C]`` are aligned with their
    ``labels`` ``[B, P]`` (token classification's tags, a seq2seq target), ``keep`` marking those carrying loss.

    Sampled: a class drawn from the model at every kept position, weight n. Exact (``draws=None``): one
    direction per (position, class), weight p·n'²/n, n' the direction's own normaliser (1 with ``own``: a single
    position carries its loss). Each direction is ``batch`` with its ``labels`` replaced."""
    observed = scale if isinstance(scale, Tensor) else torch.full((labels.shape[0],), scale)
    observed = observed.to(device=outputs.device, dtype=_upcast(outputs[:1, :1]).dtype)
    ignored = torch.full_like(labels, IGNORE_INDEX)
    if draws is not None:
        uniform = draws.at(keep)
        drawn = sample_tokens(outputs, uniform).to(labels.device)
        return [(observed, {**batch, "labels": torch.where(keep, drawn, IGNORE_INDEX)})]
    probs = torch.softmax(_upcast(outputs), dim=-1)
    weight_of_own = 1.0 if own else observed
    directions = []
    for t in range(keep.shape[1]):
        for c in range(probs.shape[-1]):
            target = ignored.clone()
            target[:, t] = torch.where(keep[:, t], c, IGNORE_INDEX)
            weight = probs[:, t, c] * keep[:, t] * weight_of_own**2 / observed
            directions.append((weight, {**batch, "labels": target}))
    return directions


def _check_tokens_per_sequence(n: Any, what: str, helper: str, task: str) -> None:
    """Refuse a ``tokens_per_sequence`` that is neither a positive number nor ``"own"``, or none at all (it has no
    default: the loss scale depends on how the training loop averaged its token losses)."""
    if n is None:
        raise TaskError(
            f"{task} needs tokens_per_sequence: the mean number of {what} tokens per training sequence (a run trained "
            f"on Hugging Face's token-mean loss: source_proj.tasks.text.{helper}(train)), 1 for a loop that summed "
            "its token losses, or 'own' for one that averaged each sequence's mean (docs/howto/language-models.md, "
            "'The loss scale')."
        )
    if n == "own":
        return
    try:
        positive = not isinstance(n, str) and float(n) > 0
    except (TypeError, ValueError):
        positive = False
    if not positive:
        raise TaskError(
            f"tokens_per_sequence must be a positive number (the mean {what} tokens per training sequence, "
            f"see {helper}) or 'own', not {n!r}."
        )


@dataclass
class TokenClassificationTask(_TextTask):
    """A label for every token (named entities, part-of-speech tags): Hugging Face's ``*ForTokenClassification``.

    Labels ``[B, T]`` hold each token's class, −100 where a token carries none (padding, a word's later sub-word
    pieces: ``DataCollatorForTokenClassification`` pads with it). The model returns logits ``[B, T, C]``.

    measurement f(q) = Σ_t margin_t, the summed margin logit_y − logsumexp_{c≠y} logit_c of the query's labelled
    tokens: a positive score means z raised them (helped).

    The per-example training loss is ℓ(z) = s(z)/n, s the summed cross-entropy of its labelled tokens. Hugging
    Face's loss (the Trainer) is the mean over every labelled token of the batch, so, as for
    [`LanguageModelingTask`][], ``tokens_per_sequence`` = n̄, the mean number of labelled tokens per training
    sequence ([`mean_labelled_tokens`][]), makes the batch mean of ℓ that loss (exactly where every batch labels
    as many tokens, to first order otherwise); ``"own"`` takes each sequence's own count (a loop averaging the
    sequences' mean token losses). ``label_smoothing``: ε of the Trainer's ``label_smoothing_factor``.

    Fisher targets draw a class for every labelled token from the model, weight n.

    Attributes:
        tokens_per_sequence: n̄ (a number) or ``"own"``, see above; required (no default fits every training loop).
        parameters: which parameters are attributed (default: every linear layer, the head's
            too: ``ModuleSelection(blocks_only=False)``).
        attention: for Hugging Face models, how the mask is built (see [`SequenceClassificationTask`][]).
        label_smoothing: ε of a run trained on smoothed labels (default 0: none).
    """

    tokens_per_sequence: float | Literal["own"] | None = None  # required: None is refused in one sentence
    parameters: ModuleSelection | ParameterSelection = field(default_factory=_with_head)
    name: str = "token-classification"
    attention: AttentionKind = "auto"
    label_smoothing: float = 0.0
    _kind: ModelKind | None = field(default=None, init=False, repr=False, compare=False)
    _mask_checked: bool = field(default=False, init=False, repr=False, compare=False)
    score_labels: ClassVar[tuple[str, str]] = (
        "raised the tokens' margins (helpful)",
        "lowered the tokens' margins (harmful)",
    )

    def __post_init__(self) -> None:
        _check_tokens_per_sequence(self.tokens_per_sequence, "labelled", "mean_labelled_tokens", type(self).__name__)
        self.label_smoothing = check_label_smoothing(self.label_smoothing)

    def _labelled(self, outputs: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """The labels ``[B, T]`` and which tokens carry one (bool ``[B, T]``), checked against the logits."""
        _check_batch(batch)
        labels = batch.get("labels")
        if labels is None or labels.dim() != 2 or outputs.dim() != 3 or outputs.shape[:2] != labels.shape:
            got = "none" if labels is None else f"labels of shape {list(labels.shape)}"
            raise TaskError(
                f"TokenClassificationTask takes a label per token, 'labels' [B, T] beside logits [B, T, C] (−100 where "
                f"a token has none), but the batch holds {got} for logits of shape {list(outputs.shape)}."
            )
        _check_no_labelled_padding(labels, _padding_mask(batch), "attention_mask")
        batch = self._right_padded(batch)  # as forward ran it
        labels = batch["labels"]
        keep = _padding_mask(batch).bool() & (labels != IGNORE_INDEX)
        classes = outputs.shape[-1]
        if _plain(labels) and keep.any():
            lo, hi = int(labels[keep].min()), int(labels[keep].max())
            if lo < 0 or hi >= classes:
                raise TaskError(
                    f"Token labels must lie in [0, {classes - 1}] (or be -100, no label) for a model with {classes} "
                    f"classes, but they hold {lo} to {hi}; fix the labels or the model's number of labels."
                )
        return labels, keep

    def token_losses(self, outputs: Tensor, batch: Batch, smoothing: float = 0.0) -> Tensor:
        """Each token's cross-entropy ``[B, T]`` (0 where it has no label); with ``smoothing`` ε the smoothed one."""
        return self._token_losses(outputs, batch, smoothing)[0]

    def _token_losses(self, outputs: Tensor, batch: Batch, smoothing: float) -> tuple[Tensor, Tensor]:
        labels, keep = self._labelled(outputs, batch)
        targets = torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))
        classes = outputs.shape[-1]
        return token_nll(outputs.reshape(-1, classes), targets.reshape(-1), smoothing).view(targets.shape), keep

    def _scale(self, keep: Tensor) -> Tensor | float:
        if self.tokens_per_sequence == "own":
            return keep.sum(-1).clamp_min(1).float()
        return float(self.tokens_per_sequence)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        losses, keep = self._token_losses(outputs, batch, self.label_smoothing)
        return losses.sum(-1) / self._scale(keep)

    def fisher_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        losses, keep = self._token_losses(outputs, batch, 0.0)
        return losses.sum(-1) / self._scale(keep)

    def measurement(self, outputs: Tensor, batch: Batch) -> Tensor:
        labels, keep = self._labelled(outputs, batch)
        index = torch.where(keep, labels, 0).unsqueeze(-1)
        logits = _upcast(outputs)
        correct = logits.gather(-1, index).squeeze(-1)
        others = torch.logsumexp(logits.scatter(-1, index, float("-inf")), dim=-1)
        return torch.where(keep, correct - others, 0.0).sum(-1)

    def fisher_targets(
        self, outputs: Tensor, batch: Batch, draws: FisherDraws | None
    ) -> list[tuple[Tensor, Batch]]:
        """Sampled: a class for every labelled token from the model, weight n (E[n·∇ℓ∇ℓᵀ] is the Gauss–Newton of
        ℓ = s/n, as for [`LanguageModelingTask`][]). Exact (``draws=None``): one direction per (token, class),
        weight p·n'²/n, n' the direction's own normaliser (1 with ``"own"``). The batches are rolled to right
        padding ([`right_padded`][]), as the outputs are."""
        labels, keep = self._labelled(outputs, batch)
        return _aligned_fisher_targets(outputs, labels, keep, self._scale(keep), self.tokens_per_sequence == "own",
                                       self._right_padded(batch), draws)  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tokens_per_sequence": self.tokens_per_sequence,
                **smoothing_described(self.label_smoothing)}


def token_nll(logits: Tensor, targets: Tensor, smoothing: float = 0.0) -> Tensor:
    """−log softmax(z)[y] of every row z of ``logits`` ``[n, V]`` (0 where y = ``IGNORE_INDEX``): the values and
    gradients of ``F.cross_entropy(logits, targets, reduction="none")`` (to rounding), with half its memory.
    With ``smoothing`` ε, those of ``F.cross_entropy(..., label_smoothing=ε)``: (1 − ε)·(−log p_y) − ε·mean log p.

    cross_entropy keeps the n × V log-probabilities for its backward, and its backward zero-fills an n × V
    gradient, scatters into it and passes it through log-softmax's backward: with the logits themselves,
    four V-sized tensors at the backward's peak. This keeps the logits and n log-sum-exps, and its backward
    writes one n × V tensor, softmax(z) − onehot(y), in place: two at the peak, the fewest a backward through
    the logits can hold (a language model's logits are its largest tensors). It runs under ``torch.func``
    transforms (per-example gradients); its backward is not differentiable again.

    Half-precision logits (a bf16 or fp16 forward) are taken in float32 a block of rows at a time
    (``_block_rows``), as ``token_nll(logits.float(), targets)`` computes them, to the same bits: the loss is
    float32 and the gradient the half-precision one that ``.float()``'s backward would round it to. Nothing
    n × V is held in float32: the graph keeps the half-precision logits, and the backward writes its gradient
    into one half-precision tensor. The float32 path holds a float32 copy and a float32 gradient, four times
    the logits' bytes: 3.1 GiB beyond the logits against 0.8 GiB for 8 sequences of 1,024 tokens over GPT-2's
    vocabulary (``benchmarks/loss_blocks.py --memory --dtype bf16``)."""
    return _TokenNLL.apply(logits, targets, float(smoothing))[0]


class _TokenNLL(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, targets: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        keep = targets != IGNORE_INDEX
        blocks = logits.split(_block_rows(logits))
        lse = torch.cat([torch.logsumexp(_upcast(block), dim=-1) for block in blocks])
        picked = _upcast(logits.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1))
        if not smoothing:
            return torch.where(keep, lse - picked, 0.0), lse
        mean = torch.cat([_upcast(block).mean(-1) for block in blocks])  # −mean log p = lse − mean z
        return torch.where(keep, lse - (1.0 - smoothing) * picked - smoothing * mean, 0.0), lse

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, float], output: tuple[Tensor, Tensor]) -> None:
        logits, targets, ctx.smoothing = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor, _: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        # g·(softmax(z) − (1 − ε)·onehot(y) − ε/V): the smoothed targets' share ε/V is taken from every entry.
        logits, targets, lse = ctx.saved_tensors
        smoothing = ctx.smoothing
        keep = targets != IGNORE_INDEX
        g = torch.where(keep, grad, 0.0).unsqueeze(-1)
        index = torch.where(keep, targets, 0).unsqueeze(-1)
        picked, spread = -g * (1.0 - smoothing), g * (smoothing / logits.shape[-1])
        if logits.dtype == lse.dtype:  # float32 or float64: one n × V tensor, written in place
            out = torch.sub(logits, lse.unsqueeze(-1)).exp_().mul_(g)  # g · softmax(z)
            if smoothing:
                out.sub_(spread)
            return out.scatter_add_(-1, index, picked), None, None
        out, rows = torch.empty_like(logits), _block_rows(logits)  # half precision, each block made in float32
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            block = torch.sub(logits[start:end].float(), lse[start:end].unsqueeze(-1)).exp_().mul_(g[start:end])
            if smoothing:
                block.sub_(spread[start:end])
            out[start:end] = block.scatter_add_(-1, index[start:end], picked[start:end])
        return out, None, None


_SAMPLE_BLOCK = 256
# Logits per block of rows where a V-sized temporary is made (the log-sum-exp, the sampling weights). On the CPU
# 4 MiB of float32 stay in cache and reuse the allocator's memory: a log-sum-exp over 8 sequences of 1,024 tokens
# of GPT-2's vocabulary takes 0.32 s in such blocks against 1.0 s whole, whose temporaries are fresh pages
# (`benchmarks/loss_blocks.py`). On an accelerator a block of 64 MiB bounds the temporaries in a few launches.
_HOST_BLOCK = 2**20
_DEVICE_BLOCK = 2**24


def _block_rows(logits: Tensor) -> int:
    """Rows of ``logits`` ``[n, V]`` per block of the V-wide work."""
    return max(1, (_HOST_BLOCK if logits.device.type == "cpu" else _DEVICE_BLOCK) // max(1, logits.shape[-1]))


def sample_tokens(logits: Tensor, uniform: Tensor) -> Tensor:
    """Tokens drawn from softmax(``logits``) ``[..., V]`` by inverse CDF, one ``uniform`` in [0, 1) per row.

    On the logits' device, in blocks of rows (``_block_rows``): the unnormalised weights exp(z − max z) in float32,
    their sums over blocks of 256 tokens, accumulated in float64 across blocks, pick the block, and that
    block's own float64 cumulative sum picks the token. Nothing V-sized is copied to the host or to
    float64 (a language model's logits are B·T·V numbers: 1.6 GB for 8 sequences of 1,024 tokens over
    GPT-2's vocabulary); the draw is the same inverse CDF whatever the device. Returns int64 ``[...]``.
    """
    shape, vocab = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    uniform = uniform.reshape(-1).to(device=rows.device, dtype=torch.float64)
    out = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
    pad = -vocab % _SAMPLE_BLOCK
    step = _block_rows(rows)
    for start in range(0, rows.shape[0], step):
        z = rows[start : start + step].float()
        weights = torch.sub(z, z.amax(-1, keepdim=True)).exp_()
        weights = (F.pad(weights, (0, pad)) if pad else weights).view(z.shape[0], -1, _SAMPLE_BLOCK)
        cdf = weights.sum(-1).double().cumsum(-1)  # [n, blocks]: 256-term float32 sums, then float64
        target = uniform[start : start + step] * cdf[:, -1]
        block = _inverse_cdf(cdf, target)
        before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp_min(0)[:, None]).squeeze(-1), 0.0)
        inner = weights[torch.arange(z.shape[0], device=z.device), block].double().cumsum(-1)  # [n, 256]
        token = block * _SAMPLE_BLOCK + _inverse_cdf(inner, target - before)
        out[start : start + step] = token.clamp_max(vocab - 1)  # NaN logits: a token all the same
    return out.view(shape)


def _inverse_cdf(cdf: Tensor, target: Tensor) -> Tensor:
    """The first index of each row of ``cdf`` ``[n, m]`` (non-decreasing) whose value exceeds ``target`` ``[n]``, or,
    where rounding put ``target`` at or past the row's total (a block's float32 sum can exceed the float64 sum of
    its terms), the last index that raised the sum to that total: never an entry of weight zero (a −inf logit,
    the padding of a vocabulary to whole blocks)."""
    total = cdf[:, -1]
    below = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))  # the last value under the total
    found = torch.searchsorted(cdf, below[:, None], right=True).squeeze(-1)
    return found.clamp_max(cdf.shape[1] - 1)  # NaN weights: an index all the same


def _upcast(logits: Tensor) -> Tensor:
    """Half-precision logits in float32 for the softmax; float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _has_causal_flags(model: nn.Module) -> bool:
    return any(isinstance(getattr(m, "is_causal", None), bool) for m in model.modules())


def _check_no_labelled_padding(labels: Tensor, mask: Tensor, mask_name: str, first: int = 0) -> None:
    """Refuse, outside vmap, a label (not −100) at a padded position (``mask`` 0) from position ``first`` on (a causal
    model's loss never reads the label of position 0): the model's own loss counts every such label, whatever the
    mask, so a run trained on such batches minimised a loss over padding that the tasks, which never predict
    padding, would silently leave out of every gradient."""
    if not (_plain(labels) and _plain(mask)) or labels.shape != mask.shape:
        return
    padded = (labels[:, first:] != IGNORE_INDEX) & (mask[:, first:] == 0)
    if padded.any():
        row, col = (int(i) for i in torch.nonzero(padded)[0])
        col += first
        raise TaskError(
            f"Example {row} of the batch has a label at padded position {col} ({mask_name} 0, label not -100): the "
            "model's own loss counts it, but attribution never predicts padding, so the gradients would not be "
            "those of the loss the run minimised. Set the labels to -100 at padding (DataCollatorForLanguageModeling "
            "and DataCollatorForSeq2Seq do); where the run trained on them, that leaves the padding's loss out."
        )


def _check_tokens(targets: Tensor, vocab: int) -> None:
    if not _plain(targets) or targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= vocab:
        raise TaskError(
            f"Token labels must lie in [0, {vocab - 1}] (or be -100, not predicted) for a model with {vocab} "
            f"outputs, but they hold {lo} to {hi}; check the tokenizer against the model's vocabulary."
        )


# ---------------------------------------------------------------------------------------------
# Data


class TextDataset(Dataset):
    """Token sequences right-padded to one length, as dict examples the text tasks take.

    ``dataset[i]`` is ``{"input_ids": [T], "attention_mask": [T]}`` plus ``"labels"``: the class id
    for classification (a row of 0/1 labels for multi-label classification, a number for regression), a tag per
    token for token classification ``[T]``, the target sequence of an encoder–decoder model ``[S]`` (−100 at its
    padding), or nothing for language modelling (the task predicts the input ids).

    Args:
        sequences: token ids of each example (at least one token each).
        labels: one label per sequence (sequence classification): class ids, rows of 0/1 labels (multi-label,
            kept as floats) or numbers (regression, kept as floats), or ``None``.
        token_labels: a tag per token of each sequence (token classification, −100 for a token without one),
            padded with −100; instead of ``labels``.
        targets: a target token sequence per source sequence (encoder–decoder models, [`Seq2SeqTask`][]): the
            examples' ``labels`` ``[S]``, padded with −100; instead of ``labels``.
        target_length: S; default the longest target. Longer targets are refused, not cut.
        length: T; default the longest sequence. Longer sequences are refused, not cut.
        pad_id: the id written at padded positions (never attended to, never predicted).
        texts: the text of each example, kept for reports ([`text`][]).
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        labels: Sequence[Any] | None = None,
        token_labels: Sequence[Sequence[int]] | None = None,
        targets: Sequence[Sequence[int]] | None = None,
        length: int | None = None,
        target_length: int | None = None,
        pad_id: int = 0,
        texts: Sequence[str] | None = None,
    ) -> None:
        if not sequences:
            raise TaskError("A TextDataset needs at least one sequence.")
        lengths = [len(s) for s in sequences]
        if min(lengths) == 0:
            raise TaskError(f"Sequence {lengths.index(0)} is empty; drop it or give it at least one token.")
        length = max(lengths) if length is None else length
        if max(lengths) > length:
            raise TaskError(
                f"Sequence {int(np.argmax(lengths))} has {max(lengths)} tokens, more than length={length}; "
                "split it or raise length."
            )
        if sum(given is not None for given in (labels, token_labels, targets)) > 1:
            raise TaskError("Give one of labels (one per sequence), token_labels (one per token) or targets (a target "
                            "sequence per sequence), not several.")  # fmt: skip
        for what, values in (("labels", labels), ("token_labels", token_labels), ("targets", targets),
                             ("texts", texts)):  # fmt: skip
            if values is not None and len(values) != len(sequences):
                raise TaskError(f"{len(values)} {what} were given for {len(sequences)} sequences; give one each.")
        self.input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        self.attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, seq in enumerate(sequences):
            self.input_ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            self.attention_mask[i, : len(seq)] = 1
        self.labels = None if labels is None else _sequence_labels(labels)
        if token_labels is not None:
            self.labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
            for i, (seq, tags) in enumerate(zip(sequences, token_labels, strict=True)):
                if len(tags) != len(seq):
                    raise TaskError(f"Sequence {i} has {len(seq)} tokens but {len(tags)} token labels; give one "
                                    "per token (-100 for a token without one).")  # fmt: skip
                self.labels[i, : len(tags)] = torch.as_tensor(list(tags), dtype=torch.long)
        self.targets = targets is not None
        if targets is not None:
            self.labels = _padded_targets(targets, target_length)
        self.texts = None if texts is None else list(texts)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        example = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}
        if self.labels is not None:
            example["labels"] = self.labels[index]
        return example

    def text(self, index: int) -> str:
        """The text of example ``index`` (as given), or its token ids when no texts were given (a seq2seq pair's:
        ``source → target``)."""
        if self.texts is not None:
            return self.texts[index]
        ids = " ".join(str(int(t)) for t in self.input_ids[index][self.attention_mask[index].bool()])
        if not self.targets:
            return ids
        assert self.labels is not None
        target = self.labels[index]
        return f"{ids} → " + " ".join(str(int(t)) for t in target[target != IGNORE_INDEX])


def _padded_targets(targets: Sequence[Sequence[int]], length: int | None) -> Tensor:
    """Seq2seq targets as labels ``[N, S]``, right-padded with −100 (nothing predicted there)."""
    lengths = [len(t) for t in targets]
    if min(lengths) == 0:
        raise TaskError(f"Target {lengths.index(0)} is empty; give every source a target of at least one token.")
    length = max(lengths) if length is None else length
    if max(lengths) > length:
        raise TaskError(f"Target {int(np.argmax(lengths))} has {max(lengths)} tokens, more than "
                        f"target_length={length}; split it or raise target_length.")  # fmt: skip
    labels = torch.full((len(targets), length), IGNORE_INDEX, dtype=torch.long)
    for i, target in enumerate(targets):
        labels[i, : len(target)] = torch.as_tensor(list(target), dtype=torch.long)
    if ((labels < 0) & (labels != IGNORE_INDEX)).any():
        raise TaskError("Target token ids must be non-negative; −100 marks padding and is added by the dataset.")
    return labels


def _sequence_labels(labels: Sequence[Any]) -> Tensor:
    """One label per sequence as a tensor: class ids as int64; numbers (regression) and 0/1 rows (multi-label) as
    float32, which is what makes the task train them as such."""
    try:
        values = torch.as_tensor(np.asarray(list(labels)))
    except (TypeError, ValueError) as err:
        raise TaskError(
            f"labels must be one class id, number or row of 0/1 labels per sequence, all alike ({err})."
        ) from err
    if values.is_floating_point() or values.dtype == torch.bool or values.dim() > 1:  # rows: multi-label, as floats
        return values.float()
    return values.long()


def predicted_tokens(dataset: Dataset) -> np.ndarray:
    """Number of next-token predictions carrying loss in each example (``loss_positions``), each batched as featurize
    batches it (a ``CollatedDataset`` through its collator, whose labels may leave tokens out): int ``[N]``."""
    counts = [int(loss_positions(_batched(dataset, i)).sum()) for i in range(len(dataset))]  # type: ignore[arg-type]
    return np.asarray(counts, dtype=np.int64)


def mean_predicted_tokens(dataset: Dataset) -> float:
    """n̄ for [`LanguageModelingTask`][]: the mean number of predicted tokens per training sequence."""
    return float(predicted_tokens(dataset).mean())


def target_tokens(dataset: Dataset) -> np.ndarray:
    """Number of predicted target tokens (``target_positions``) in each seq2seq example: int ``[N]``."""
    counts = [int(target_positions(_batched(dataset, i)).sum()) for i in range(len(dataset))]  # type: ignore[arg-type]
    return np.asarray(counts, dtype=np.int64)


def mean_target_tokens(dataset: Dataset) -> float:
    """n̄ for [`Seq2SeqTask`][]: the mean number of predicted target tokens per training pair."""
    return float(target_tokens(dataset).mean())


def labelled_tokens(dataset: Dataset) -> np.ndarray:
    """Number of tokens carrying a label (not −100, not padding) in each example: int ``[N]``."""
    counts = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        example = _batched(dataset, i)
        if "labels" not in example:
            raise TaskError(f"Example {i} has no 'labels'; token classification needs a label per token.")
        counts.append(int((_padding_mask(example).bool() & (example["labels"] != IGNORE_INDEX)).sum()))
    return np.asarray(counts, dtype=np.int64)


def mean_labelled_tokens(dataset: Dataset) -> float:
    """n̄ for [`TokenClassificationTask`][]: the mean number of labelled tokens per training sequence."""
    return float(labelled_tokens(dataset).mean())


def _batched(dataset: Dataset, index: int) -> dict[str, Tensor]:
    """Example ``index`` of ``dataset`` as a batch of one, batched as featurize batches it (``collate_of``): a
    ``CollatedDataset``'s collator may set the labels the run trained on (``DataCollatorForLanguageModeling`` puts
    −100 at every token equal to the pad token, each EOS where the pad token is the EOS)."""
    return dict(collate_of(dataset)([dataset[index]]))
