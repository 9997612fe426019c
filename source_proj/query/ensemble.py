"""Ensembles: one method's scores averaged over M independently trained models (docs/concepts/source.md §5).

Each model has its own store (its own trajectory, featurized and fitted as usual). The ensemble
concatenates the per-model query features q̃_m and training features T_m(z)/M, so that one inner
product averages the scores, score(q, z) = (1/M) Σ_m ⟨q̃_m, T_m(z)⟩ (score = −Δf as everywhere: positive = z
raised the query's measurement, which helped it for a margin and harmed it for a loss or an error; see the task's
``positive_helps``), and one inner-product index over the concatenated rows serves the top-k, built by
``topk.build_index`` with the Attributor's search backends: the stores are read together, chunk by chunk, so the
``"stream"`` backend holds one chunk of each model at a time. Any fitted method name works, SOURCE's and every
baseline's alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from source_proj.errors import StoreError, TaskError
from source_proj.featurize.arguments import default_device
from source_proj.query.attributor import Attributor, QueryResult, check_k, search, train_features
from source_proj.query.topk import IVFArguments, SearchBackend, TorchIndex, build_index, check_search
from source_proj.store.objectstore import is_remote
from source_proj.store.store import Store, local_path
from source_proj.tasks.task import Task

if TYPE_CHECKING:
    import faiss


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


def aligned_blocks(
    members: Sequence[Iterable[tuple[int, np.ndarray]]], scale: float
) -> Iterator[tuple[int, np.ndarray]]:
    """The members' row blocks side by side: ``(first_row, float32 [rows, Σ_m d_m])`` of ``scale`` · the
    concatenated rows, in row order, cut where any member's chunk ends (members may chunk differently), holding one
    chunk of each member at a time. Every member must give the same number of rows."""
    readers = [iter(m) for m in members]
    pending = [np.empty((0, 0), np.float32) for _ in readers]
    first = 0
    while True:
        pending = [p if len(p) else next(reader, (first, p))[1] for p, reader in zip(pending, readers, strict=True)]
        rows = min(len(p) for p in pending)
        if rows == 0:
            if any(len(p) for p in pending):
                raise TaskError(
                    f"The ensemble's members hold different numbers of training rows (one ends at row {first})."
                )
            return
        yield first, np.concatenate([p[:rows] for p in pending], axis=1, dtype=np.float32) * np.float32(scale)
        pending = [p[rows:] for p in pending]
        first += rows


class Ensemble:
    """A method's scores averaged over several models; the same interface as [`Attributor`][].

    Args:
        attributors: one per model, all for the same method and the same training rows, and tasks that agree on
            what a score's sign means (``positive_helps``, ``score_labels``). The same store given twice, or two
            stores featurized from the same training run (same trajectory fingerprint), are refused: they would
            be one model counted twice. Their own search settings are not used: the ensemble searches its
            concatenated rows with the settings below.
        search_backend: the top-k search over the concatenated rows, as the Attributor's (see
            ``topk.build_index``): ``"auto"`` (FAISS-GPU, else torch on a CUDA device, else FAISS on the CPU
            where it is installed, else torch), ``"faiss"``, ``"torch"`` (resident on the first model's device),
            ``"stream"`` (the models' stores read together chunk by chunk at every search: memory bounded by one
            chunk of each), or ``"ivf"`` (approximate: FAISS inverted file, see ``search_ivf``). ``"faiss"`` and
            ``"ivf"`` need the optional ``faiss`` extra (``pip install "source-proj[faiss]"``) and are refused here
            without it.
        search_devices: devices the index is sharded over; default the first model's device, or every GPU when
            the features do not fit on it.
        search_ivf: the approximate index's settings (``search_backend="ivf"``; refused with another backend,
            which would ignore them).
        progress: show progress bars while the index is built and searched for longer than two seconds.
    """

    def __init__(
        self,
        attributors: Sequence[Attributor],
        *,
        search_backend: SearchBackend = "auto",
        search_devices: Sequence[str] | None = None,
        search_ivf: IVFArguments = IVFArguments(),
        progress: bool = True,
    ) -> None:
        check_search(search_backend, search_devices, search_ivf)
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
        self.search_backend = search_backend
        self.search_devices = [default_device(d) for d in search_devices] if search_devices else None
        self.search_ivf = search_ivf
        self.progress = progress
        self._index: faiss.Index | TorchIndex | None = None

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
        search_backend: SearchBackend = "auto",
        search_devices: Sequence[str] | None = None,
        search_ivf: IVFArguments = IVFArguments(),
        progress: bool = True,
    ) -> Ensemble:
        """An ensemble over stores (one per trained model) of the same architecture; a store given twice, or
        search settings the ensemble would refuse, are refused before any store is opened. ``search_*`` and
        ``progress``: as the constructor's (``progress`` also shows the query features' bars)."""
        if isinstance(stores, (str, Path, Store)):
            raise TaskError(
                f"Ensemble.open takes a list of stores, one per trained model, not the one store {stores}; pass "
                "[store, …], or query a single model's store with sp.Attributor."
            )
        _refuse_repeated_paths([s.path if isinstance(s, Store) else str(s) for s in stores])
        check_search(search_backend, search_devices, search_ivf)
        return cls(
            [
                Attributor(s, model, task, method=method, device=device, batch_size=batch_size, progress=progress)
                for s in stores
            ],
            search_backend=search_backend,
            search_devices=search_devices,
            search_ivf=search_ivf,
            progress=progress,
        )

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

    def index(self) -> faiss.Index | TorchIndex:
        """Inner-product index over the concatenated training features, exact unless ``search_backend="ivf"``
        (built once, from the stores read together chunk by chunk; refused once a store changed since)."""
        for attributor in self.attributors:
            attributor.check_unchanged()
        if self._index is None:
            names = [[f"methods/{a.method}/train/{r.stage}" for r in self.rows] for a in self.attributors]
            scale = 1.0 / len(self.attributors)

            def blocks() -> Iterator[tuple[int, np.ndarray]]:
                for i, r in enumerate(self.rows):
                    members = [a.store.iter_chunks(n[i]) for a, n in zip(self.attributors, names, strict=True)]
                    for start, rows in aligned_blocks(members, scale):
                        yield r.offset + start, rows

            dim = sum(int(a.store.array(n[0]).shape[1]) for a, n in zip(self.attributors, names, strict=True))
            self._index = build_index(
                blocks,
                sum(r.size for r in self.rows),
                dim,
                self.attributors[0].device,
                self.search_backend,
                self.search_devices,
                self.search_ivf,
                progress=self.progress,
            )
        return self._index

    def top_k(self, queries: Dataset | Sequence[Any], k: int = 10) -> QueryResult:
        """The k largest and k most negative averaged scores of each query, named by what the sign means for the
        task (see [`QueryResult`][])."""
        ntotal = sum(r.size for r in self.rows)
        k = check_k(k, ntotal)  # the arguments before the query gradients
        if self.search_backend == "ivf":
            self.search_ivf.cells(ntotal)
        q = np.ascontiguousarray(self.query_features(queries), dtype=np.float32)
        return search(self.index(), q, k, self.rows, positive_helps=self.positive_helps, score_labels=self.score_labels,
                      progress=self.progress)  # fmt: skip
