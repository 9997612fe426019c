"""Datasets that say how their examples batch.

featurize, fit's baselines, the basis and end passes and queries read examples by index and batch them with
PyTorch's default collate, which stacks examples of one shape. A tokenized Hugging Face dataset whose sequences
have their own lengths was trained with a collator that pads each batch (``DataCollatorWithPadding``,
``DataCollatorForSeq2Seq``): ``CollatedDataset(dataset, collator)`` carries that collator, and every loader the
library builds batches the dataset with it. Padding a batch changes no example's gradient (the tasks mask padded
positions; tested against each example alone), so a store is the same whatever the batches' lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch.utils.data import DataLoader, Dataset, Subset


class CollatedDataset(Dataset):
    """``dataset``, batched by ``collate_fn`` wherever the library batches it.

    Usage::

        from transformers import DataCollatorWithPadding

        train = sp.CollatedDataset(tokenized.remove_columns(["text"]), DataCollatorWithPadding(tokenizer))
        sp.featurize("runs/bert", model, task, train, "runs/bert.sp")

    Args:
        dataset: the examples, in training order (indexable, with a length).
        collate_fn: a list of examples → a batch, as the run's training batches were made (the Trainer's
            ``data_collator``). A batch that is a mapping (a ``BatchEncoding``) is made a plain dict.
    """

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any]) -> None:
        if not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable (a list of examples → a batch), not {type(collate_fn)}")
        self.dataset, self.collate = dataset, collate_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def collate_fn(self, examples: list[Any]) -> Any:
        batch = self.collate(examples)
        return dict(batch) if isinstance(batch, Mapping) and not isinstance(batch, dict) else batch


def collate_of(dataset: Any) -> Callable[[list[Any]], Any] | None:
    """How ``dataset``'s examples batch: a ``CollatedDataset``'s ``collate_fn`` (also under ``Subset``s of it);
    ``None`` (the default collate) otherwise."""
    while True:
        if isinstance(dataset, CollatedDataset):
            return dataset.collate_fn
        if not isinstance(dataset, Subset):
            return None
        dataset = dataset.dataset


def loader(dataset: Any, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` that batches it as it says (``collate_of``)."""
    return DataLoader(dataset, collate_fn=collate_of(dataset), **kwargs)
