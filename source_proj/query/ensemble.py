"""Ensembles: one method's scores averaged over M independently trained models (docs/concepts/source.md §5).

Each model has its own store (its own trajectory, featurized and fitted as usual). The ensemble
concatenates the per-model query features q̃_m and training features T_m(z)/M, so that one inner
product averages the scores, score(q, z) = (1/M) Σ_m ⟨q̃_m, T_m(z)⟩ (score = −Δf as everywhere: positive = z
raised the query's measurement, which helped it for a margin and harmed it for a loss or an error; see the task's
``positive_helps``), and one FAISS index serves the top-k. Any fitted method name works, SOURCE's and every
baseline's alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from torch import nn
from torch.utils.data import Dataset

from source_proj.errors import StoreError, TaskError
from source_proj.query.attributor import Attributor, QueryResult, check_k, search, train_features
from source_proj.store.objectstore import is_remote
from source_proj.store.store import Store, local_path
from source_proj.tasks.task import Task


def _store_key(store: Store | str | Path) -> str:
    """Where a store lives, one spelling per place: a local path resolved (links, ``..``), a URL as written."""
    path = store.path if isinstance(store, Store) else str(store)
    return path.rstrip("/") if is_remote(path) else str(local_path(path).resolve())


def _refuse_repeated_paths(paths: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for path in paths:
        key = _store_key(path)
        if key in seen:
            raise StoreError(
                f"The ensemble is given the store {path} twice"
                + (f" (as {seen[key]} and {path})" if seen[key] != path else "")
                + "; an ensemble averages independently trained models, so pass each model's store once."
            )
        seen[key] = path


class Ensemble:
    """A method's scores averaged over several models; the same interface as [`Attributor`][].

    Args:
        attributors: one per model, all for the same method and the same training rows, and tasks that agree on
            what a score's sign means (``positive_helps``, ``score_labels``). The same store given twice, or two
            stores featurized from the same training run (same trajectory fingerprint), are refused: they would
            be one model counted twice.
    """

    def __init__(self, attributors: Sequence[Attributor]) -> None:
        if not attributors:
            raise TaskError("An ensemble needs at least one model's store.")
        _refuse_repeated_paths([a.store.path for a in attributors])
        runs: dict[str, str] = {}
        for a in attributors:
            fingerprint = a.store.meta["trajectory"]["fingerprint"]
            if fingerprint in runs:
                raise StoreError(
                    f"The ensemble's stores {runs[fingerprint]} and {a.store.path} were featurized from the same "
                    "training run (same trajectory fingerprint), so they are one model; an ensemble averages "
                    "independently trained models, so give it one store per training run."
                )
            runs[fingerprint] = a.store.path
        layouts = {tuple((r.stage, r.size) for r in a.rows) for a in attributors}
        if len(layouts) != 1:
            raise TaskError(
                f"The ensemble's stores attribute different training rows {sorted(layouts)}; fit the same method "
                "on the same stages and datasets in every store."
            )
        meanings = {(a.positive_helps, a.score_labels) for a in attributors}
        if len(meanings) != 1:
            raise TaskError(
                f"The ensemble's tasks disagree on what a score's sign means ({sorted(meanings)}); give every model "
                "the same task."
            )
        self.attributors = list(attributors)
        self.rows = self.attributors[0].rows
        self.positive_helps, self.score_labels = meanings.pop()
        self._index: faiss.Index | None = None

    @classmethod
    def open(
        cls,
        stores: Sequence[Store | str | Path],
        model: nn.Module,
        task: Task,
        *,
        method: str = "source",
        device: str | None = None,
        batch_size: int = 64,
    ) -> Ensemble:
        """An ensemble over stores (one per trained model) of the same architecture; a store given twice
        is refused before any is opened."""
        if isinstance(stores, (str, Path, Store)):
            raise TaskError(
                f"Ensemble.open takes a list of stores, one per trained model, not the one store {stores}; pass "
                "[store, …], or query a single model's store with sp.Attributor."
            )
        _refuse_repeated_paths([s.path if isinstance(s, Store) else str(s) for s in stores])
        return cls([Attributor(s, model, task, method=method, device=device, batch_size=batch_size) for s in stores])

    def query_features(self, queries: Dataset | Sequence[Any]) -> np.ndarray:
        """Concatenated q̃_m of every model: float32 ``[Q, Σ_m d_m]``."""
        return np.concatenate([a.query_features(queries).numpy() for a in self.attributors], axis=1)

    def train_features(self) -> np.ndarray:
        """Concatenated T_m(z)/M of every model: float32 ``[N, Σ_m d_m]``; refuses once a store changed since."""
        for attributor in self.attributors:
            attributor.check_unchanged()
        scale = 1.0 / len(self.attributors)
        return np.concatenate([train_features(a.store, a.method) * scale for a in self.attributors], axis=1)

    def scores(self, queries: Dataset | Sequence[Any]) -> np.ndarray:
        """The averaged score matrix, float32 ``[Q, N]`` (score = −Δf: positive = z raised the query's measurement)."""
        return self.query_features(queries) @ self.train_features().T

    def index(self) -> faiss.Index:
        """Exact inner-product FAISS index over the concatenated training features (built once; refused once a store
        changed since)."""
        for attributor in self.attributors:
            attributor.check_unchanged()
        if self._index is None:
            feats = np.ascontiguousarray(self.train_features(), dtype=np.float32)
            self._index = faiss.IndexFlatIP(feats.shape[1])
            self._index.add(feats)
        return self._index

    def top_k(self, queries: Dataset | Sequence[Any], k: int = 10) -> QueryResult:
        """The k largest and k most negative averaged scores of each query, named by what the sign means for the
        task (see [`QueryResult`][])."""
        k = check_k(k, sum(r.size for r in self.rows))  # before the query gradients
        q = np.ascontiguousarray(self.query_features(queries), dtype=np.float32)
        return search(self.index(), q, k, self.rows, positive_helps=self.positive_helps, score_labels=self.score_labels)
