"""query: query features at the final checkpoint, scores, and top-k through a FAISS index.

score(q, z) = ⟨q̃, T(z)⟩ with q̃ = P ∇f(q; θ_T) (for SOURCE), an estimate of −Δf(q, z): positive = z raised the
query's measurement, which helped the query for a margin and harmed it for a loss or an error (the task's
``positive_helps``). The largest scores are the top-k of the inner product; the most negative the top-k for −q̃.

A fitted method's ``query`` recipe says how q̃ is built::

    {"checkpoints": [steps], "weights": [w_c],        q̃ = concat_c w_c · x_c(q)   (TracIn-CP: several)
     "features": "gradient" | "representation",       x_c = P ∇f(q; θ_c) (default) or Task.representation
     "normalize": false | true,                       x_c / ‖x_c‖ (Grad-Cos, RepSim)
     "scales": [name | null]}                         stored D^{-1/2} multiplying θ_c's gradients before
                                                      projection (Adam runs); absent = none
"""

from __future__ import annotations

import copy
import numbers
import shlex
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from source_proj.errors import StoreError, TaskError
from source_proj.featurize.arguments import default_device
from source_proj.featurize.featurize import check_finite
from source_proj.featurize.windows import is_captured
from source_proj.methods.fit import read_curvature
from source_proj.methods.kinds import BASELINES
from source_proj.methods.kronecker import KroneckerCurvature, source_query_directions
from source_proj.projection.factory import projector_from_meta
from source_proj.projection.transform import scaling_transform
from source_proj.query.topk import (
    IVFArguments,
    SearchBackend,
    TorchIndex,
    build_index,
    check_search,
    faiss_gpu_available,
)
from source_proj.store.provenance import check_model, check_query_model, check_run, model_errors, run_difference
from source_proj.store.store import Store
from source_proj.store.verify import featurize_command, method_command
from source_proj.store.writing import current_writer
from source_proj.tasks.data import Examples, check_indexed, loader
from source_proj.tasks.gradients import PerExampleGradients, move_batch
from source_proj.tasks.task import Task, check_model_and_task, score_meaning
from source_proj.trajectory.preconditioner import read_scale
from source_proj.trajectory.recorder import Trajectory, unwrap_model
from source_proj.trajectory.segments import Segment

if TYPE_CHECKING:
    import faiss


def store_trajectory(store: Store, trajectory: Trajectory | str | Path | None = None) -> Trajectory:
    """The run a store was featurized from (default: the directory it records), checked by fingerprint. A recorded
    directory that no longer holds a run, or holds another one (the run trained on, or moved and another took its
    place), is refused with how to name where the store's run lies now."""
    meta = store.meta
    if trajectory is not None:
        loaded = trajectory if isinstance(trajectory, Trajectory) else Trajectory.load(trajectory)
        check_run(meta, loaded)
        return loaded
    recorded = meta["trajectory"]["path"]
    if not (Path(recorded) / "trajectory.json").is_file():
        # A captured store records where its run lies when the run is next resumed (``capture.py``), not by featurize.
        records = (
            "" if meta.get("capture") is not None else ", or re-run the featurize that made the store with it "
            "(--ckpts; nothing is recomputed), which records it in the store"
        )
        raise StoreError(
            f"The store at {store.path} records its run at {recorded}, where there is no run now (moved or deleted?); "
            f"pass the run's directory as it is now (Attributor's trajectory=){records}."
        )
    loaded = Trajectory.load(recorded)
    why = run_difference(meta, loaded)
    if why is not None:
        raise StoreError(
            f"The run at {recorded}, where the store at {store.path} records its run, is not the store's run ({why}: "
            "it trained on since, or another run took its place); pass the store's run where it lies now (Attributor's "
            "trajectory=), or grow the store into this run (featurize --grow) or featurize it into a new store."
        )
    return loaded


@dataclass(frozen=True)
class StageRows:
    """Where a stage's examples sit among the rows of a method's feature matrix."""

    stage: str
    offset: int
    size: int


def method_meta(store: Store, method: str) -> dict[str, Any]:
    """A fitted method's description; refuses a missing or unfinished one."""
    methods = store.meta.get("methods") or {}
    if not methods.get(method, {}).get("complete"):
        writer = current_writer(store.path)
        if writer is not None:
            raise StoreError(
                f"Method {method!r} in {store.path} is not ready: the store is being written {writer}; wait for "
                "that to finish, then query again."
            )
    if method not in methods:
        path = shlex.quote(store.path)
        if method in BASELINES:
            hint = f"`source-proj baseline {path} --kind {method}` (in Python: sp.fit_baseline(store, " \
                f"sp.BaselineArguments({method!r})))"
        elif method == "source":
            hint = f"`source-proj fit {path}` (in Python: sp.fit(store))"
        else:
            hint = f"`source-proj fit {path} --method {shlex.quote(method)}` (SOURCE; in Python: sp.fit(store, " \
                f"sp.FitArguments(method={method!r})))"
        if not store.meta.get("featurized") and not is_captured(store.meta):  # a fit would refuse it: say so first
            resume = featurize_command(store)
            how = f"with `{resume}`" if resume.startswith("source-proj") else f"({resume})"
            raise StoreError(
                f"The store at {store.path} is not fully featurized, so it has no fitted method {method!r}; finish it "
                f"{how}, then run {hint}."
            )
        raise StoreError(
            f"The store at {store.path} has no fitted method {method!r} (it has {sorted(methods)}); run {hint} first."
        )
    if not methods[method].get("complete"):
        command = method_command(store, method)
        how = f"with `{command}`" if command.startswith("source-proj") else f"({command})"
        raise StoreError(
            f"Method {method!r} in {store.path} is unfinished (an interrupted or failed fit); complete it {how}, or "
            "replace it with --force (overwrite=True)."
        )
    return methods[method]


def method_rows(store: Store, method: str) -> list[StageRows]:
    """Row layout (stage, offset, size) of a method's training features, in stage order."""
    rows, offset = [], 0
    sizes = {s["name"]: s["dataset_size"] for s in store.meta["trajectory"]["stages"]}
    for stage in method_meta(store, method)["stages"]:
        rows.append(StageRows(stage, offset, sizes[stage]))
        offset += sizes[stage]
    return rows


_FEATURIZED_WITH = ("params", "projection", "task", "featurize", "fingerprint", "segmentation")
"""The store metadata that says what its features are, besides its run: a store featurized again in its place
(``featurize --force``) with another projection, task or data, and fitted with the same settings, differs here."""


def _fitted(meta: dict[str, Any], method: str) -> tuple[Any, ...]:
    """What an Attributor's answers depend on: the store's run, how its features were taken, and the method's fit."""
    featurized = tuple(meta.get(key) for key in _FEATURIZED_WITH)
    return meta["trajectory"]["fingerprint"], (meta.get("methods") or {}).get(method), featurized


def train_features(store: Store, method: str = "source") -> np.ndarray:
    """The cached training features of a method, all attributed stages stacked: float32 ``[N, d]``."""
    return np.concatenate([store.read(f"methods/{method}/train/{r.stage}") for r in method_rows(store, method)])


def check_batch_size(value: object, name: str) -> None:
    """Refuse a batch size that is not a whole number ≥ 1 (before the work it would fail in)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise TaskError(f"{name} is {value!r}; pass a whole number ≥ 1.")


def _as_dataset(queries: Dataset | Sequence[Any]) -> Dataset | Sequence[Any]:
    """Queries given as a tuple of tensors (inputs, labels, …) become a dataset of their rows."""
    if isinstance(queries, (tuple, list)) and queries and all(isinstance(t, torch.Tensor) for t in queries):
        return TensorDataset(*queries)
    return queries


def check_queries(queries: Dataset | Sequence[Any]) -> None:
    """Refuse queries that cannot be read by index (a DataLoader) or that hold no example, before any work."""
    check_indexed(_as_dataset(queries), "The queries")
    if len(_as_dataset(queries)) == 0:  # type: ignore[arg-type]
        raise TaskError("There are no queries to score; pass at least one query example.")


def _warn_of_zero_queries(features: torch.Tensor) -> None:
    """Say which queries (rows of ``features`` ``[Q, d]``) have a measurement gradient of zero at every checkpoint:
    every score of theirs is 0, most likely because they measure nothing."""
    zero = torch.nonzero(~features.any(dim=1)).flatten().tolist()
    if zero:
        which = f"Query {zero[0]} has" if len(zero) == 1 else f"Queries {zero[:10]}{'…' if len(zero) > 10 else ''} have"
        warnings.warn(
            f"{which} a measurement gradient of zero at every checkpoint, so every score is 0: a language-model query "
            "of one token, or whose labels are all -100, predicts no token; give each query a token to predict.",
            stacklevel=3,
        )


def _batches(queries: Dataset | Sequence[Any], batch_size: int) -> Iterator[Any]:
    """The queries in batches; examples that cannot be batched as they are (of different lengths) are refused as
    featurize refuses training data."""
    batches = iter(loader(Examples(_as_dataset(queries), "query {}"), batch_size=batch_size, shuffle=False))
    end = object()
    while True:
        with model_errors("the queries"):
            batch = next(batches, end)
        if batch is end:
            return
        yield batch


class Attributor:
    """Scores queries against a fitted store; keeps the query model and the index between calls.

    Queries are scored at the store's final checkpoint θ_T, never at the weights ``model`` holds;
    a model, task or run that is not the store's is refused (see ``provenance.check_query_model``),
    and so is a model that computes something else at θ_T (``provenance.check_model``).

    Args:
        store: a featurized and fitted store (or its path).
        model: the architecture; the store's final checkpoint is loaded into a copy of it.
        task: the task the store was featurized with.
        method: which fitted method to use (``"source"`` by default).
        trajectory: the run (default: the directory recorded in the store).
        device: where query gradients are computed.
        batch_size: queries per gradient batch.
        search_backend: top-k search (see ``topk.build_index``): ``"auto"`` (FAISS-GPU, else torch on
            a CUDA device, else FAISS where it is installed, else torch), ``"faiss"``, ``"torch"`` (resident on
            ``device``), ``"stream"`` (store chunk by chunk: memory bounded by the chunk size), or ``"ivf"``
            (approximate: FAISS inverted file, see ``search_ivf``). ``"faiss"`` and ``"ivf"`` need the optional
            ``faiss`` extra (``pip install "source-proj[faiss]"``) and are refused here without it.
        search_devices: devices the index is sharded over (e.g. ``["cuda:0", "cuda:1"]``); default
            ``device``, or every GPU when the features do not fit on it. A device this machine lacks is
            refused as ``device`` is.
        search_ivf: the approximate index's settings (``search_backend="ivf"``; refused with another backend,
            which would ignore them).
        progress: show a progress bar while query features take longer than two seconds.

    Attributes:
        positive_helps: whether a positive score means the example helped the query (the task's, bound to the
            model: True for a margin, False for a loss or an error); ``top_k`` records it on its result.
        score_labels: what a positive and a negative score mean, in words (the task's).
    """

    def __init__(
        self,
        store: Store | str | Path,
        model: nn.Module,
        task: Task,
        *,
        method: str = "source",
        trajectory: Trajectory | str | Path | None = None,
        device: str | None = None,
        batch_size: int = 64,
        search_backend: SearchBackend = "auto",
        search_devices: Sequence[str] | None = None,
        search_ivf: IVFArguments = IVFArguments(),
        progress: bool = True,
    ) -> None:
        check_model_and_task(model, task)
        check_batch_size(batch_size, "Attributor's batch_size")
        check_search(search_backend, search_devices, search_ivf)  # before any work, as the device
        self.batch_size = int(batch_size)
        self.store = store if isinstance(store, Store) else Store.open(store)
        meta = self.store.meta
        self.method = method
        self._fitted = _fitted(meta, method)
        self.recipe = method_meta(self.store, method)["query"]
        self.rows = method_rows(self.store, method)
        self.trajectory = store_trajectory(self.store, trajectory)
        model = unwrap_model(model)  # as the recorder saved it: the model inside a wrapper
        check_query_model(meta, model, task, self.trajectory, self.store.path)
        self.device = default_device(device)
        self.model = copy.deepcopy(model).to(self.device)
        self.task = task
        self._loaded: int | None = None
        self._load(self.trajectory.final_checkpoint.step)
        check_model(self.store, self.model, task, self.device)
        names = [name for name, _ in meta["params"]]
        self.projector = projector_from_meta(meta, self.model, self.store)
        self.param_names = names
        self.search_backend = search_backend
        # Checked here, as ``device`` is: not after every query's gradient, where the index is built.
        self.search_devices = [default_device(d) for d in search_devices] if search_devices else None
        self.search_ivf = search_ivf
        self.progress = progress
        self.positive_helps, self.score_labels = score_meaning(task, self.model)
        self._index: faiss.Index | TorchIndex | None = None
        self._curvatures: list[KroneckerCurvature] | None = None
        self._times: list[float] = []

    def _load(self, step: int) -> None:
        """Hold checkpoint ``step``'s weights in the query model (loaded once while unchanged)."""
        if self._loaded != step:
            by_step = {c.step: c for c in self.trajectory.checkpoints}
            self.trajectory.load_into(self.model, by_step[step])
            self._loaded = step

    def check_unchanged(self) -> None:
        """Refuse to answer once the store changed on disk (it grew, was featurized again, or the method was fitted
        again): the recipe, rows and index held here are those of the store as it was."""
        if _fitted(Store.open(self.store.path).meta, self.method) != self._fitted:
            raise StoreError(
                f"The store at {self.store.path} changed since this Attributor was made (it grew, was featurized "
                f"again, or method {self.method!r} was fitted again); make a new Attributor to query it."
            )

    def query_features(self, queries: Dataset | Sequence[Any]) -> torch.Tensor:
        """q̃ for every query: float32 ``[Q, d]`` (concatenated over the recipe's checkpoints)."""
        check_queries(queries)
        self.check_unchanged()
        steps, weights = self.recipe["checkpoints"], self.recipe["weights"]
        scales = self.recipe.get("scales") or [None] * len(steps)
        representation = self.recipe.get("features", "gradient") == "representation"
        shapes = self.store.meta["params"]
        if "operators" in self.recipe:
            return self._operator_features(queries, steps[0], scales[0])
        parts = []
        batches = len(steps) * -(-len(_as_dataset(queries)) // self.batch_size)  # type: ignore[arg-type]
        bar = tqdm(total=batches, desc="query", unit="batch", delay=2.0, disable=not self.progress)
        for step, weight, scale_name in zip(steps, weights, scales, strict=True):
            self._load(step)
            feats = []
            grads_fn = None if representation else PerExampleGradients(self.model, self.task, self.param_names)
            scale = None if representation else read_scale(self.store, scale_name, shapes, self.device)
            transform = None if scale is None else self.projector.scaling(scale)
            for b in _batches(queries, self.batch_size):
                batch = move_batch(b, self.device)
                with model_errors(f"the query batch starting at example {len(feats) * self.batch_size}"):
                    if grads_fn is None:
                        feats.append(self.task.representation(self.model.eval(), batch).cpu())
                    else:
                        grads_fn.task.measurement(grads_fn.outputs(batch), batch)  # checks labels outside vmap
                        feats.append(
                            self.projector.project_batch(grads_fn, batch, "measurement", transform=transform).cpu()
                        )
                bar.update()
            part = torch.cat(feats)
            what = "representation" if representation else "measurement gradient"
            check_finite(part, 0, f"checkpoint step {step}", what, example="query")
            if self.recipe.get("normalize", False):
                part = torch.nn.functional.normalize(part, dim=1)
            parts.append(part * weight)
        bar.close()
        features = torch.cat(parts, dim=1)
        if not representation:
            _warn_of_zero_queries(features)
        return features

    def _operator_features(self, queries: Dataset | Sequence[Any], step: int, scale_name: str | None) -> torch.Tensor:
        """Query features of a method whose operators act on the query gradient (``curvature="kfac"``):
        [P A_ℓᵀ ∇f(q; θ_T)]_ℓ over the method's blocks (``methods/kronecker.py``), float32 ``[Q, blocks·k]``."""
        operators = self.recipe["operators"]
        if self._curvatures is None:
            described = method_meta(self.store, self.method)["segments"]
            self._times = [Segment.from_description(d).time for d in described]
            self._curvatures = [
                read_curvature(self.store, f"{operators['prefix']}/{i}", d["weight_decay"])
                for i, d in enumerate(described)
            ]
        shapes = {name: tuple(shape) for name, shape in self.store.meta["params"]}
        self._load(step)
        grads_fn = PerExampleGradients(self.model, self.task, self.param_names)
        scale = read_scale(self.store, scale_name, self.store.meta["params"], self.device)
        feats = []
        batches = -(-len(_as_dataset(queries)) // self.batch_size)  # type: ignore[arg-type]
        for b in tqdm(_batches(queries, self.batch_size), total=batches, desc="query", unit="batch", delay=2.0,
                      disable=not self.progress):
            batch = move_batch(b, self.device)
            with model_errors(f"the query batch starting at example {len(feats) * self.batch_size}"):
                grads_fn.task.measurement(grads_fn.outputs(batch), batch)  # checks labels outside vmap
                grads = grads_fn(batch, "measurement")
            if scale is not None:  # exactly, elementwise: the operators act on materialised gradients
                grads = scaling_transform(scale).apply(grads)
            directions = source_query_directions(grads, self._curvatures, self._times, shapes)
            feats.append(torch.cat([self.projector.project(directions[i]) for i in operators["blocks"]], dim=1).cpu())
        part = torch.cat(feats)
        check_finite(part, 0, f"checkpoint step {step}", "measurement gradient", example="query")
        return part

    def index(self) -> faiss.Index | TorchIndex:
        """Exact inner-product index over the training features (built once; see ``search_backend``)."""
        self.check_unchanged()
        if self._index is None:
            names = [f"methods/{self.method}/train/{r.stage}" for r in self.rows]

            def blocks() -> Iterator[tuple[int, np.ndarray]]:
                for r, name in zip(self.rows, names, strict=True):
                    for start, rows in self.store.iter_chunks(name):
                        yield r.offset + start, rows

            self._index = build_index(
                blocks,
                sum(r.size for r in self.rows),
                int(self.store.array(names[0]).shape[1]),
                self.device,
                self.search_backend,
                self.search_devices,
                self.search_ivf,
                progress=self.progress,
            )
        return self._index

    def scores(self, queries: Dataset | Sequence[Any]) -> np.ndarray:
        """The full score matrix, float32 ``[Q, N]`` (rows: queries; columns: training rows, see ``rows``).
        score = −Δf: positive = the training row raised the query's measurement (helped it where
        ``positive_helps``, a margin; harmed it for a loss or an error)."""
        q = self.query_features(queries).numpy()
        return q @ train_features(self.store, self.method).T

    def top_k(self, queries: Dataset | Sequence[Any], k: int = 10) -> QueryResult:
        """The k largest and k most negative scores of each query: its k most helpful and k most harmful training
        examples, named by what the sign means for the task (see [`QueryResult`][])."""
        k = check_k(k, sum(r.size for r in self.rows))  # the arguments before the query gradients
        if self.search_backend == "ivf":
            self.search_ivf.cells(sum(r.size for r in self.rows))
        q = np.ascontiguousarray(self.query_features(queries).numpy(), dtype=np.float32)
        return search(self.index(), q, k, self.rows, positive_helps=self.positive_helps, score_labels=self.score_labels,
                      progress=self.progress)  # fmt: skip


def check_k(k: object, ntotal: int) -> int:
    """``k`` as an ``int``; refuses anything but a whole number (a NumPy integer too) from 1 to ``ntotal``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TaskError(f"top-k must be a whole number of training examples, not {k!r}.")
    if not 1 <= int(k) <= ntotal:
        raise TaskError(
            f"top-k {k} is not between 1 and the {ntotal} training examples the method scores; ask for 1 to {ntotal}."
        )
    return int(k)  # FAISS takes a Python int only (a NumPy one fails in its C++ bindings)


def search(
    index: faiss.Index | TorchIndex,
    query_features: np.ndarray,
    k: int,
    rows: Sequence[StageRows],
    *,
    positive_helps: bool = True,
    score_labels: tuple[str, str] = ("helpful", "harmful"),
    progress: bool = False,
) -> QueryResult:
    """Top-k largest ⟨q, T⟩ and most negative rows of an inner-product index, as a ``QueryResult`` whose sign
    means what ``positive_helps`` and ``score_labels`` say (the task's, see ``score_meaning``).

    ``k`` is a whole number (a NumPy integer too); refuses ``k`` < 1 and ``k`` larger than the number of
    training rows (which would return every row in both lists). When fewer than ``k`` rows score above zero
    for a query, its positive list ends in rows scoring ≤ 0; :meth:`QueryResult.records` leaves those out, and
    likewise negative rows scoring ≥ 0. A query whose ``nprobe`` cells of an approximate (IVF) index hold fewer
    than ``k`` rows is searched again over every cell (FAISS would pad its lists with row −1).

    Both lists come from one search of ``[q; −q]`` (a streamed index reads the store once); ``progress``: a bar over
    the queries (a FAISS index) or the rows (a torch index) while it takes longer than two seconds.
    """
    k = check_k(k, index.ntotal)
    count = query_features.shape[0]
    scores, ids = _search(index, np.concatenate([query_features, -query_features]), k, progress)
    pos_scores, pos_ids, neg_scores, neg_ids = scores[:count], ids[:count], scores[count:], ids[count:]
    short = (pos_ids < 0).any(axis=1) | (neg_ids < 0).any(axis=1)
    if short.any():
        found = int(min((pos_ids >= 0).sum(axis=1).min(), (neg_ids >= 0).sum(axis=1).min()))
        raise TaskError(
            f"The approximate search found fewer than k = {k} training examples for {int(short.sum())} of the "
            f"{len(short)} queries (as few as {found}), even scanning every cell it may; ask for a smaller k, or "
            "use an exact search."
        )
    return QueryResult(pos_ids, pos_scores, neg_ids, -neg_scores, list(rows), positive_helps, score_labels)


_FAISS_QUERY_BATCH = 4096
"""Queries per FAISS search call when a progress bar counts them (FAISS's own block of queries)."""


def _search(
    index: faiss.Index | TorchIndex, queries: np.ndarray, k: int, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search``; an IVF index whose ``nprobe`` scanned cells hold fewer than ``k`` rows for a query (FAISS
    pads its list with row −1) searches that query again scanning every cell (at most 2,048 on a GPU). A FAISS index
    is searched in batches of queries counted by a progress bar (a torch index counts its rows itself)."""
    if isinstance(index, TorchIndex):
        scores, ids = index.search(queries, k)
    else:
        found = []
        with tqdm(total=len(queries), desc="top-k search", unit="query", delay=2.0, disable=not progress) as bar:
            for start in range(0, len(queries), _FAISS_QUERY_BATCH):
                found.append(index.search(np.ascontiguousarray(queries[start : start + _FAISS_QUERY_BATCH]), k))
                bar.update(len(found[-1][0]))
        scores, ids = np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
    short = np.flatnonzero((ids < 0).any(axis=1))
    if short.size and getattr(index, "nlist", 0) > getattr(index, "nprobe", 0):
        nprobe = index.nprobe
        index.nprobe = min(index.nlist, 2048 if faiss_gpu_available() else index.nlist)
        try:
            scores[short], ids[short] = index.search(np.ascontiguousarray(queries[short]), k)
        finally:
            index.nprobe = nprobe
    return scores, ids


@dataclass
class QueryResult:
    """Top-k results of each query. ids are rows of the method's feature matrix; ``locate`` maps them to (stage,
    index).

    score(q, z) = −Δf(q, z), the predicted change of the query's measurement f if z were left out
    (docs/concepts/scores.md): a positive score says z *raised* f. For a margin (classification) that helped the
    query; for a loss or an error (language modelling, seq2seq, regression) it harmed the query, and the examples
    that helped it (lowered its loss) have the most *negative* scores. The result carries its task's meaning
    (``positive_helps``, ``score_labels``) and has two sets of names:

    - by sign, as searched: ``positive_ids`` / ``positive_scores`` (the largest scores) and ``negative_ids`` /
      ``negative_scores`` (the most negative);
    - by meaning: ``helpful_ids`` / ``helpful_scores`` and ``harmful_ids`` / ``harmful_scores``. Where a positive
      score helps these are the positive and the negative lists; where it harms (``positive_helps`` False: a
      language model's loss) ``helpful_*`` are the **negative** lists and ``harmful_*`` the positive ones.

    ``records()`` names its rows by meaning too, and the reports (``text_report``, ``topk_figure``) word and colour
    the lists by ``score_labels`` and ``positive_helps``.

    Attributes:
        positive_ids: ``[Q, k]`` feature rows of the largest scores, largest first.
        positive_scores: ``[Q, k]`` their scores, decreasing.
        negative_ids: ``[Q, k]`` feature rows of the most negative scores, most negative first.
        negative_scores: ``[Q, k]`` their scores, increasing.
        rows: stage layout of the feature rows.
        positive_helps: whether a positive score means z helped the query (the task's: True for a margin, False
            for a loss or an error).
        score_labels: what a positive and a negative score mean, in words (the task's ``score_labels``).
    """

    positive_ids: np.ndarray
    positive_scores: np.ndarray
    negative_ids: np.ndarray
    negative_scores: np.ndarray
    rows: list[StageRows]
    positive_helps: bool = True
    score_labels: tuple[str, str] = ("helpful", "harmful")

    @property
    def helpful_ids(self) -> np.ndarray:
        """``[Q, k]`` feature rows of the examples that helped each query most, most helpful first: the positive
        list where a positive score helps, the negative one where it harms (a loss's)."""
        return self.positive_ids if self.positive_helps else self.negative_ids

    @property
    def helpful_scores(self) -> np.ndarray:
        """``[Q, k]`` the scores of ``helpful_ids``: decreasing and positive where a positive score helps,
        increasing and negative where it harms."""
        return self.positive_scores if self.positive_helps else self.negative_scores

    @property
    def harmful_ids(self) -> np.ndarray:
        """``[Q, k]`` feature rows of the examples that harmed each query most, most harmful first: the negative
        list where a positive score helps, the positive one where it harms (a loss's)."""
        return self.negative_ids if self.positive_helps else self.positive_ids

    @property
    def harmful_scores(self) -> np.ndarray:
        """``[Q, k]`` the scores of ``harmful_ids``: increasing and negative where a positive score helps,
        decreasing and positive where it harms."""
        return self.negative_scores if self.positive_helps else self.positive_scores

    def locate(self, row: int) -> tuple[str, int]:
        """(stage, index within the stage's dataset) of a feature row; a row outside the method's is refused."""
        for r in self.rows:
            if r.offset <= row < r.offset + r.size:
                return r.stage, row - r.offset
        total = sum(r.size for r in self.rows)
        raise TaskError(f"Row {row} is not a feature row of this result, whose rows are 0 to {total - 1}.")

    def short_lists(self) -> tuple[int, int]:
        """How many queries have fewer than k training examples with a score > 0, and how many fewer than k with a
        score < 0 (by sign, in the order of ``score_labels``): their lists end in rows of the other sign or zero."""
        positive = (~(self.positive_scores > 0)).any(axis=1).sum()
        return int(positive), int((~(self.negative_scores < 0)).any(axis=1).sum())

    def records(self) -> list[dict[str, Any]]:
        """One dict per (query, kind, rank): query, kind, rank, stage, index, score; the helpful rows
        (``helpful_ids``) first, then the harmful ones, ``kind`` naming what each did to the query for this task
        (``positive_helps``: for a loss, a "helpful" row has a negative score). A row is kept only if its score
        has its list's sign (see :meth:`short_lists`)."""
        out = []
        helps = 1.0 if self.positive_helps else -1.0
        for kind, sign, ids, scores in (
            ("helpful", helps, self.helpful_ids, self.helpful_scores),
            ("harmful", -helps, self.harmful_ids, self.harmful_scores),
        ):
            for q in range(ids.shape[0]):
                for rank in range(ids.shape[1]):
                    if not sign * scores[q, rank] > 0:
                        continue
                    stage, index = self.locate(int(ids[q, rank]))
                    out.append(
                        {
                            "query": q,
                            "kind": kind,
                            "rank": rank + 1,
                            "stage": stage,
                            "index": index,
                            "score": float(scores[q, rank]),
                        }
                    )
        return out
