"""Datasets that say how their examples batch.

featurize, fit's baselines, the basis and end passes and queries read examples by index and batch them with
PyTorch's default collate, which stacks examples of one shape. A tokenized Hugging Face dataset whose sequences
have their own lengths was trained with a collator that pads each batch (``DataCollatorWithPadding``,
``DataCollatorForSeq2Seq``): ``CollatedDataset(dataset, collator)`` carries that collator, and every loader the
library builds batches the dataset with it. Padding a batch changes no example's gradient (the tasks mask padded
positions; tested against each example alone), so a store is the same whatever the batches' lengths.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from source_proj.errors import SourceProjError, TaskError, first_line, out_of_memory

IGNORE_INDEX = -100
"""Label of a position that is not predicted (Hugging Face's convention)."""


class ChosenLabels(dict):
    """An example (a dict) whose ``labels`` choose what its measurement predicts, which a ``CollatedDataset`` keeps as
    they are: ``single_token_query``'s, −100 but at one token. A language model's collator labels every token anew
    (``DataCollatorForLanguageModeling`` overwrites any ``labels``), so the collate function batches the example
    without them, and its labels ``[T]`` (an encoder–decoder pair's ``[S]``, with the keys in ``with_labels``) are
    then right-padded with −100 to the batch's width."""

    def __init__(self, example: Mapping[str, Any], with_labels: tuple[str, ...] = ()) -> None:
        super().__init__(example)
        self.with_labels = with_labels  # other keys batched as the labels are: a pair's observed target


class ExampleError(TaskError):
    """The user's data fail on their own: a dataset reading an example (a broken file, a missing key), a collate
    function batching examples."""

    def __init__(self, message: str) -> None:
        # A DataLoader's worker hands its error back as this type made from the worker's traceback, whose last line
        # ends with the sentence: keep the sentence.
        super().__init__(message.strip().splitlines()[-1].split(": ", 1)[-1] if "\n" in message.strip() else message)


class CollatedDataset(Dataset):
    """``dataset``, batched by ``collate_fn`` wherever the library batches it.

    Usage::

        from transformers import DataCollatorWithPadding

        train = sp.CollatedDataset(tokenized.remove_columns(["text"]), DataCollatorWithPadding(tokenizer))
        sp.featurize("runs/bert", model, task, train, "runs/bert.sp")

    Args:
        dataset: the examples, in training order (indexable, with a length).
        collate_fn: a list of examples → a batch, as the run's training batches were made (the Trainer's
            ``data_collator``). A batch that is a mapping (a ``BatchEncoding``) is made a plain dict. One that draws at
            random (``DataCollatorForLanguageModeling(mlm=True)`` masks each batch anew) is warned of as the first
            batch is made: every pass and query then sees other masks, and scores do not repeat. It must return every
            example it is given: a batch of fewer is refused, as each example's score is kept at its place.
    """

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any]) -> None:
        if not callable(collate_fn):
            raise TaskError(
                f"CollatedDataset takes the function that batches the examples (a list of examples → a batch, as a "
                f"Trainer's data_collator), not a {type(collate_fn).__name__}."
            )
        self.dataset, self.collate = dataset, collate_fn
        self._checked = False  # whether collating the same examples twice was tried (once)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def collate_fn(self, examples: list[Any]) -> Any:
        chosen = [isinstance(e, ChosenLabels) for e in examples]
        if any(chosen):
            if not all(chosen):
                raise TaskError(
                    "A batch mixes single-token queries (sp.single_token_query) with other examples, whose labels its "
                    "collate function makes itself; make every query of the dataset a single-token query, or score "
                    "the others in a dataset of their own."
                )
            return _with_chosen_labels(self._collated, examples)
        return self._collated(examples)

    def _collated(self, examples: list[Any]) -> Any:
        try:
            batch = self.collate(examples)
        except SourceProjError:
            raise
        except Exception as err:  # a collator's own error, about examples it cannot take: say which
            keys = f" with keys {sorted(examples[0])}" if examples and isinstance(examples[0], Mapping) else ""
            raise ExampleError(
                f"The collate function could not batch {len(examples)} examples{keys} ({type(err).__name__}: "
                f"{first_line(err)}); give it the examples it batched in training (a Trainer's collator takes the "
                "model's input columns only: drop the others, e.g. dataset.remove_columns(['text']))."
            ) from err
        made = _examples_in(batch)
        if made is not None and made != len(examples):
            raise ExampleError(
                f"The collate function made a batch of {made} examples from {len(examples)}; each example's score is "
                "kept at its place in the dataset, so the collate function must return every example it is given "
                "(leave bad examples out of the dataset itself, not out of its batches)."
            )
        if not self._checked:
            self._checked = True
            if not _same(batch, RandomStateKept(self.collate)(examples)):  # the draws of the second put back
                warnings.warn(
                    f"sp.CollatedDataset's collate function ({type(self.collate).__name__}) batches the same examples "
                    "differently at each call (it draws at random, as DataCollatorForLanguageModeling(mlm=True) masks "
                    "them), so every pass of featurize and every query sees other masks and scores do not repeat; "
                    "collate the examples once and give their rows (masked input_ids and labels) with a collator that "
                    "only pads.",
                    stacklevel=2,
                )
        return dict(batch) if isinstance(batch, Mapping) and not isinstance(batch, dict) else batch


def _with_chosen_labels(collate: Callable[[list[Any]], Any], examples: list[Any]) -> dict[str, Any]:
    """``ChosenLabels`` examples batched by ``collate`` without their labels, which are then put in the batch as they
    were chosen, padded with −100: a language model's to the batch's ``input_ids`` width (a collator may pad beyond
    the longest sequence), on the side the collator padded each row's tokens (a left-padding tokenizer's: the label
    stays on its token), a target (labels of another length than the example's input) on the right, to the
    longest."""
    keys = ("labels", *examples[0].with_labels)
    batch = dict(collate([{k: v for k, v in e.items() if k not in keys} for e in examples]))
    rows = {key: [torch.as_tensor(e[key]).reshape(-1) for e in examples] for key in keys if key in examples[0]}
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    aligned = all(len(label) == len(e["input_ids"]) for label, e in zip(rows["labels"], examples, strict=True))
    for key, values in rows.items():
        width = ids.shape[-1] if aligned and isinstance(ids, torch.Tensor) else max(len(v) for v in values)
        padded = torch.full((len(values), width), IGNORE_INDEX, dtype=torch.long)
        for i, value in enumerate(values):
            start = 0
            if aligned and isinstance(mask, torch.Tensor) and mask.dim() == 2:  # the padding the collator put before
                own = examples[i].get("attention_mask")
                start = _leading_padding(mask[i]) - (0 if own is None else _leading_padding(torch.as_tensor(own)))
            padded[i, start : start + len(value)] = value
        batch[key] = padded
    return batch


def _leading_padding(mask: torch.Tensor) -> int:
    """How many padding positions (0) open a ``[T]`` attention mask."""
    return int((mask.reshape(-1).cumsum(0) == 0).sum())


def _examples_in(batch: Any) -> int | None:
    """How many examples a batch holds (its first tensor's first dimension, as ``gradients.batch_size`` counts), or
    ``None`` if it holds no tensor of one dimension or more."""
    leaves, _ = tree_flatten(dict(batch) if isinstance(batch, Mapping) else batch)
    first = next((t for t in leaves if isinstance(t, torch.Tensor)), None)
    return None if first is None or first.dim() == 0 else int(first.shape[0])


def _same(a: Any, b: Any) -> bool:
    """Whether two batches hold the same tensors and values."""
    (xs, spec_a), (ys, spec_b) = tree_flatten(dict(a) if isinstance(a, Mapping) else a), tree_flatten(
        dict(b) if isinstance(b, Mapping) else b
    )
    if spec_a != spec_b:
        return False
    for x, y in zip(xs, ys, strict=True):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return False
    return True


def check_indexed(data: Any, what: str) -> None:
    """Refuse ``data`` (``what``: "The queries") that cannot be read by index, in one fixed order: a DataLoader, an
    ``IterableDataset``, a generator."""
    if isinstance(data, DataLoader):
        raise TaskError(
            f"{what} are a DataLoader; pass the dataset it reads (loader.dataset), whose examples are read by their "
            "index and batched by the library (a shuffled loader's order is not theirs)."
        )
    if isinstance(data, IterableDataset) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TaskError(
            f"{what} (a {type(data).__name__}) cannot be read by index; pass a dataset with __len__ and __getitem__ "
            "(a map-style Dataset, or a list of the examples)."
        )


FEATURIZE_RESUMES = " (a store featurize was writing resumes where it stopped)"
"""What ``Examples``' sentence ends with where featurize reads them."""


class Examples(Dataset):
    """``dataset`` read as it is, an error it raises reading an example named with the example (``what`` and its
    index) as the dataset's own: ``Examples(train, "training example {} of stage 'main'")``; ``resumes``: what the
    sentence ends with, what resumes once the example is fixed (``FEATURIZE_RESUMES``), or nothing."""

    def __init__(self, dataset: Any, what: str, resumes: str = "") -> None:
        self.dataset, self.what, self.resumes = dataset, what, resumes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except SourceProjError:
            raise
        except Exception as err:
            if out_of_memory(err):
                raise
            raise ExampleError(
                f"The dataset raised an error of its own reading {self.name(index)} ({type(err).__name__}: "
                f"{first_line(err)}); fix that example in the dataset and run again{self.resumes}."
            ) from err

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """A batch's examples (what a DataLoader collates), with their names: ``default_collate`` names one that is
        shaped unlike the others. The dataset's own batched read (a Hugging Face dataset's ``__getitems__``) is used
        where it has one; where it fails, the examples are read one by one, which names the one the dataset fails on."""
        batched = getattr(self.dataset, "__getitems__", None)
        items = None
        if batched is not None:
            try:
                items = list(batched(list(indices)))
            except SourceProjError:
                raise
            except Exception as err:
                if out_of_memory(err):
                    raise
        if items is None or len(items) != len(indices):
            items = [self[index] for index in indices]
        read = _Read(items)
        read.resumes = self.resumes
        read.names = [self.name(index) for index in indices]
        return read

    def name(self, index: int) -> str:
        """``what`` of the example at ``index``, by its index in the data given (under any ``Subset`` of them)."""
        data = self.dataset
        while isinstance(data, Subset):
            index, data = data.indices[index], data.dataset
        return self.what.format(index)


class _Read(list):
    """The examples of a batch, and their names (``Examples.name``)."""

    names: list[str]
    resumes: str


def training_examples(dataset: Any, stage: str, resumes: str = FEATURIZE_RESUMES) -> Examples:
    """A stage's training data, read as ``Examples`` that name an example the dataset fails on by index and stage;
    ``resumes``: what the sentence ends with (featurize's store resuming, by default)."""
    return Examples(dataset, f"training example {{}} of stage {stage!r}", resumes)


def collate_of(dataset: Any) -> Callable[[list[Any]], Any]:
    """How ``dataset``'s examples batch: a ``CollatedDataset``'s ``collate_fn`` (also under ``Subset``s of it, or
    ``Examples``); ``default_collate`` otherwise."""
    while True:
        if isinstance(dataset, CollatedDataset):
            return dataset.collate_fn
        if not isinstance(dataset, (Subset, Examples)):
            return default_collate
        dataset = dataset.dataset


class RandomStateKept:
    """``collate`` called with torch's random state put back after each call: the global CPU state, and a
    ``torch.Generator`` the collator keeps as ``generator`` (``DataCollatorForLanguageModeling(seed=...)``; found
    through the wrappers' ``collate`` and ``data_collator``). A collator that draws (random masking) then leaves the
    training's random stream as it found it, for in-run capture's own passes over the training data."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, examples: list[Any]) -> Any:
        owners, seen = [], self.collate
        for _ in range(4):
            if hasattr(seen, "generator"):
                owners.append(seen)
            seen = getattr(seen, "collate", None) or getattr(seen, "data_collator", None)
            if seen is None:
                break
        kept = [(o, o.generator, o.generator.get_state() if isinstance(o.generator, torch.Generator) else None)
                for o in owners]  # fmt: skip
        try:
            with torch.random.fork_rng(devices=[]):
                return self.collate(examples)
        finally:
            for owner, generator, state in kept:
                if state is not None:
                    generator.set_state(state)
                owner.generator = generator  # one made by this call (a lazy collator's first) is made again later


def default_collate(examples: list[Any]) -> Any:
    """torch's default collate, once a dict example's lists of numbers (the columns of a tokenized Hugging Face
    dataset) are tensors: examples of one length stack into ``[B, T]``, where torch's would transpose them into T
    tensors of ``[B]``; examples of different lengths are refused as such (featurize then asks for the collator). One
    example shaped unlike the others of its batch (``Examples`` names them) is named."""
    try:
        return torch.utils.data.default_collate([_with_tensors(e) for e in examples])
    except Exception as err:
        odd = _odd_one(examples) if isinstance(examples, _Read) else None
        if odd is None:
            raise
        raise ExampleError(
            f"The dataset's {examples.names[odd]} differs in shape or structure from the other examples of its batch "
            f"({type(err).__name__}: {first_line(err)}); fix that example in the dataset and run again"
            f"{examples.resumes}."
        ) from err


def _odd_one(examples: list[Any]) -> int | None:
    """The place of the one example whose structure, tensor shapes and types differ from what all the others of a
    batch share, or ``None`` where there is no such one."""

    def signature(example: Any) -> tuple[Any, ...]:
        leaves, spec = tree_flatten(_with_tensors(example))
        return str(spec), *((*t.shape, t.dtype) if isinstance(t, torch.Tensor) else type(t) for t in leaves)

    signatures = [signature(e) for e in examples]
    odd = [i for i, s in enumerate(signatures) if s != signatures[i - 1] and s != signatures[(i + 1) % len(examples)]]
    return odd[0] if len(examples) > 2 and len(odd) == 1 else None


def _with_tensors(example: Any) -> Any:
    if not isinstance(example, Mapping):
        return example
    return {key: _as_tensor(value) for key, value in example.items()}


def _as_tensor(value: Any) -> Any:
    """A list (or tuple) of numbers, or of such lists of one length, as a tensor; anything else as it is."""
    if not isinstance(value, (list, tuple)) or not value:
        return value
    leaves = value[0] if isinstance(value[0], (list, tuple)) else value
    if not all(isinstance(v, (int, float)) for v in leaves):  # bool is an int
        return value
    try:
        return torch.tensor(value)
    except (TypeError, ValueError):  # nested lists of different lengths
        return value


def loader(dataset: Any, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` that batches it as it says (``collate_of``)."""
    return DataLoader(dataset, collate_fn=collate_of(dataset), **kwargs)
