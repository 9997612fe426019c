"""Running a user's training function on many kept subsets, in parallel, with every result cached.

A *retrain function* ``retrain(keep, seed) -> measurements`` trains a model on the kept training
examples with the randomness of ``seed`` and returns the measurement of every query, ``[Q]``.
``keep`` maps each attributed stage to the sorted indices (within that stage's dataset) of its
kept examples; stages it does not name are kept whole.

A *batched* retrain function (``BatchedRetrainFunction``, e.g. ``batched.BatchedRetrain``) also
has ``retrain_many(keeps, seeds) -> [M, Q]``: ``run_retrains`` then hands it the unfinished jobs
in groups of ``models_per_call``, in this process (its parallelism is the group, not worker processes).

Every finished retrain is written at once, atomically (a temporary file renamed into place), to
``CACHE/retrains/<key>.npy``, the key being a hash of the kept sets and the seed. An interrupted
evaluation therefore resumes without retraining any finished model, and evaluations that share a
cache directory share their retrains. Use one cache directory per training function.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from source_proj.errors import NumericalError, TaskError, check_whole
from source_proj.query.attributor import StageRows
from source_proj.store.durable import atomic_write_bytes

Keep = Mapping[str, np.ndarray]
"""Stage name → sorted indices (within that stage's dataset) of the kept training examples."""

RetrainFunction = Callable[[Keep, int], np.ndarray]
"""``retrain(keep, seed) -> [Q]``: train on the kept examples with ``seed``; measure every query."""


@runtime_checkable
class BatchedRetrainFunction(Protocol):
    """A retrain function that also trains many models in one call (see ``batched.py``)."""

    models_per_call: int

    def retrain_many(self, keeps: Sequence[Keep], seeds: Sequence[int]) -> np.ndarray:
        """``[len(seeds), Q]``: one row of measurements per (kept subset, seed)."""
        ...

    def __call__(self, keep: Keep, seed: int) -> np.ndarray:
        """``[Q]``: train one model on ``keep`` with ``seed`` and measure every query."""
        ...


@dataclass(frozen=True)
class Job:
    """One training run: which examples are kept, and the seed."""

    keep: dict[str, np.ndarray]
    seed: int

    def key(self) -> str:
        """Content hash of the kept sets and the seed (the cache file name)."""
        digest = hashlib.sha256(f"seed={self.seed}".encode())
        for stage in sorted(self.keep):
            digest.update(f";{stage}:".encode())
            digest.update(np.ascontiguousarray(self.keep[stage], dtype=np.int64).tobytes())
        return digest.hexdigest()[:32]


def keep_from_mask(rows: Sequence[StageRows], mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per-stage kept indices from a boolean mask over a method's training rows ``[N]``."""
    mask = np.asarray(mask, dtype=bool)
    total = sum(r.size for r in rows)
    if mask.shape != (total,):
        raise TaskError(f"A subset mask needs one entry per training row ({total}), not shape {mask.shape}.")
    return {r.stage: np.flatnonzero(mask[r.offset : r.offset + r.size]) for r in rows}


class RetrainCache:
    """Finished retrains on disk: ``DIRECTORY/retrains/<job key>.npy`` (float64 measurements)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        (self.directory / "retrains").mkdir(parents=True, exist_ok=True)

    def path(self, job: Job) -> Path:
        return self.directory / "retrains" / f"{job.key()}.npy"

    def get(self, job: Job) -> np.ndarray | None:
        """The cached measurements of a job, or None if it has not finished."""
        path = self.path(job)
        return np.load(path) if path.exists() else None

    def put(self, job: Job, values: np.ndarray) -> None:
        """Write a job's measurements atomically (never a half-written file)."""
        _save(self.path(job), values)


def _save(path: Path, values: np.ndarray) -> None:
    """Write measurements as .npy durably: the file is whole or absent, even after a crash."""
    buffer = io.BytesIO()
    np.save(buffer, values)
    atomic_write_bytes(path, buffer.getvalue())


def _checked(values: object, job: Job) -> np.ndarray:
    try:
        out = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TaskError(
            f"The retrain function returned {type(values).__name__} values that are not numbers for seed {job.seed} "
            f"({err}); it must return one measurement per query, shape [Q]."
        ) from err
    if out.ndim != 1:
        raise TaskError(
            f"The retrain function returned an array of shape {out.shape} for seed {job.seed}; it must return one "
            "measurement per query, shape [Q]."
        )
    if not np.isfinite(out).all():
        raise NumericalError(
            f"The retrain function returned non-finite measurements for seed {job.seed} (training diverged?); "
            "check its learning rate and data."
        )
    return out


def _run(retrain: RetrainFunction, job: Job, path: str) -> np.ndarray:
    values = _checked(retrain(job.keep, job.seed), job)
    _save(Path(path), values)
    return values


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_retrains(
    retrain: RetrainFunction,
    jobs: Sequence[Job],
    cache: RetrainCache,
    *,
    workers: int = 1,
    threads_per_worker: int = 1,
    progress: bool = True,
    desc: str = "retrain",
) -> np.ndarray:
    """Measurements of every job, ``[len(jobs), Q]``: cached ones are read, the others trained (a job listed twice,
    once).

    Args:
        retrain: the training function (module-level, so that worker processes can import it).
        jobs: the runs to do (at least one).
        cache: where finished runs are (and are written as soon as each one ends).
        workers: parallel worker processes (started with ``spawn``); 1 trains in this process. A batched
            retrain function always trains in this process, ``models_per_call`` models at a time.
        threads_per_worker: torch threads in each worker process.
        progress: show a progress bar.
    """
    check_whole("workers", workers)
    check_whole("threads_per_worker", threads_per_worker)
    if not jobs:
        raise TaskError(
            "There is no retrain to run: give at least one seed (LDS repeats ≥ 1; removal and further-training "
            "seeds not empty)."
        )
    results: dict[int, np.ndarray] = {}
    todo: list[int] = []
    first: dict[str, int] = {}  # a job given twice (two methods removing the same examples) is trained once
    for i, job in enumerate(jobs):
        if first.setdefault(job.key(), i) != i:
            continue
        cached = cache.get(job)
        if cached is None:
            todo.append(i)
        else:
            results[i] = cached
    bar = tqdm(total=len(first), initial=len(results), desc=desc, unit="model", disable=not progress)
    try:
        if isinstance(retrain, BatchedRetrainFunction):
            _run_batched(retrain, jobs, todo, cache, results, bar)
        elif workers <= 1:
            for i in todo:
                results[i] = _run(retrain, jobs[i], str(cache.path(jobs[i])))
                bar.update()
        elif todo:
            _run_parallel(retrain, jobs, todo, cache, workers, threads_per_worker, results, bar)
    finally:
        bar.close()
    lengths = {r.shape[0] for r in results.values()}
    if len(lengths) > 1:
        raise TaskError(
            f"The retrains return different numbers of measurements {sorted(lengths)}; the cache at "
            f"{cache.directory} mixes training functions or query sets, so use a fresh cache directory."
        )
    return np.stack([results[first[job.key()]] for job in jobs])


def _run_batched(
    retrain: BatchedRetrainFunction,
    jobs: Sequence[Job],
    todo: list[int],
    cache: RetrainCache,
    results: dict[int, np.ndarray],
    bar: tqdm,
) -> None:
    if retrain.models_per_call < 1:
        raise TaskError(f"A batched retrain must train at least one model per call, not {retrain.models_per_call}.")
    for begin in range(0, len(todo), retrain.models_per_call):
        group = todo[begin : begin + retrain.models_per_call]
        values = np.asarray(retrain.retrain_many([jobs[i].keep for i in group], [jobs[i].seed for i in group]))
        if values.ndim != 2 or values.shape[0] != len(group):
            raise TaskError(
                f"retrain_many returned shape {values.shape} for {len(group)} models; it must return one row of "
                "measurements per model, [models, Q]."
            )
        failure: Exception | None = None
        for i, row in zip(group, values, strict=True):
            try:
                results[i] = _checked(row, jobs[i])
            except NumericalError as err:
                failure = failure or err
                continue
            cache.put(jobs[i], results[i])
        bar.update(len(group))
        if failure is not None:
            raise failure


def _run_parallel(
    retrain: RetrainFunction,
    jobs: Sequence[Job],
    todo: list[int],
    cache: RetrainCache,
    workers: int,
    threads: int,
    results: dict[int, np.ndarray],
    bar: tqdm,
) -> None:
    try:
        pickle.dumps(retrain)
    except Exception as err:
        raise TaskError(
            f"The retrain function cannot be sent to worker processes ({err}); define it at module level "
            "(not a lambda or closure) or use workers=1."
        ) from err
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,)
    )
    running: dict[Future[np.ndarray], int] = {}
    try:
        for i in todo:
            running[pool.submit(_run, retrain, jobs[i], str(cache.path(jobs[i])))] = i
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = future.result()
                bar.update()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
