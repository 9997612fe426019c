"""Subset-removal counterfactuals (SOURCE paper §5.4, App. B.3).

Train on the full data with each seed and keep the queries that every model classifies correctly
(returned value > threshold). For each method and each k in increasing order, remove the k training
examples it scores most helpful for a query, retrain with each seed, and count the query as
*flipped* when its mean retrained value falls to the threshold or below (misclassified on average).

The training function must return a value whose sign is correctness, e.g. the decision margin
logit_y − max_{c≠y} logit_c. The task's margin logit_y − logsumexp_{c≠y} logit_c = log(p_y/(1 − p_y))
is not one for more than two classes: it is negative whenever p_y < ½, even for a correct argmax.

A query that flips at k is not retried at larger k, so the reported curve is the fraction
of queries flipped by removing at most k examples. Retrains are cached and shared between methods
that remove the same examples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from source_proj.errors import TaskError, check_choice, check_real, check_whole, check_wholes
from source_proj.evaluation.batched import BatchedRetrain
from source_proj.evaluation.metrics import real_array
from source_proj.evaluation.retrain import Job, RetrainCache, RetrainFunction, keep_from_mask, run_retrains
from source_proj.figures import pyplot, save_figure
from source_proj.query.attributor import StageRows


@dataclass(frozen=True)
class RemovalArguments:
    """Subset-removal settings.

    Attributes:
        ks: removal sizes, increasing, each below the number of training rows.
        seeds: training seeds; a query must be correct under all of them to be evaluated.
        threshold: a query counts as flipped when its mean returned value is ≤ this (0 for a decision margin).
        positive_helps: what a positive score means for the task the scores were computed for (the attributor's
            ``positive_helps``): True for a margin, so the most helpful examples are the largest scores; False for
            a loss or an error (a positive score raised it), so the most helpful are the most negative scores.
        workers: parallel worker processes for retraining.
        threads_per_worker: torch threads per worker process.
    """

    ks: tuple[int, ...] = (10, 20, 40)
    seeds: tuple[int, ...] = (1000, 1001, 1002)
    threshold: float = 0.0
    positive_helps: bool = True
    workers: int = 1
    threads_per_worker: int = 1

    def __post_init__(self) -> None:
        check_wholes("RemovalArguments.ks", self.ks, 1, increasing=True)
        check_wholes("RemovalArguments.seeds", self.seeds)
        check_real("RemovalArguments.threshold", self.threshold, -math.inf)
        check_choice("RemovalArguments.positive_helps", self.positive_helps, (True, False))
        check_whole("RemovalArguments.workers", self.workers)
        check_whole("RemovalArguments.threads_per_worker", self.threads_per_worker)


@dataclass(frozen=True)
class RemovalResult:
    """Attributes:
    ks: the removal sizes.
    fraction: ``[len(ks)]`` fraction of the evaluated queries flipped by removing at most k examples.
    flipped_at: ``[len(queries)]`` smallest k that flipped each evaluated query (0 = never).
    queries: indices of the evaluated (always correctly classified) queries.
    """

    ks: tuple[int, ...]
    fraction: np.ndarray
    flipped_at: np.ndarray
    queries: np.ndarray


def subset_removal(
    scores: Mapping[str, np.ndarray],
    retrain: RetrainFunction,
    rows: Sequence[StageRows],
    cache_dir: str | Path,
    args: RemovalArguments = RemovalArguments(),
    *,
    progress: bool = True,
) -> dict[str, RemovalResult]:
    """Fraction of queries flipped against k for every method (name → finite scores ``[Q, N]``, score = −Δf:
    positive = z raised the task's measurement: helped the query for a margin, harmed it for a loss or an error).

    The k removed for a query are its k most helpful examples: the largest scores, or the most negative ones with
    ``args.positive_helps`` False. ``retrain`` returns a value whose sign is correctness whatever the task measured.

    Raises ``TaskError`` when no query is correct under every seed of the full-data models (nothing to flip).
    """
    if isinstance(retrain, BatchedRetrain):
        retrain.check_rows(rows)
    ks = tuple(args.ks)
    total = sum(r.size for r in rows)
    if ks[-1] >= total:
        raise TaskError(
            f"Removing k={ks[-1]} of {total} training rows leaves none to train on; keep every k below {total}."
        )
    scores = {name: real_array(s, f"scores of {name!r}") for name, s in scores.items()}
    for name, s in scores.items():
        if s.ndim != 2 or s.shape[1] != total:
            raise TaskError(f"Scores of {name!r} have shape {s.shape}; expected [queries, {total} training rows].")
        if not np.isfinite(s).all():
            raise TaskError(
                f"Scores of {name!r} contain NaN or infinite values, which cannot be ranked to choose the examples "
                "to remove; fix the method's scores first."
            )
    cache = RetrainCache(cache_dir)
    run = dict(workers=args.workers, threads_per_worker=args.threads_per_worker, progress=progress)
    everyone = np.ones(total, dtype=bool)
    full = run_retrains(retrain, [Job(keep_from_mask(rows, everyone), s) for s in args.seeds], cache, **run)
    eligible = np.flatnonzero((full > args.threshold).all(axis=0))
    if eligible.size == 0:
        raise TaskError(
            f"No query's value is above the threshold {args.threshold:g} under every seed of the full-data models, "
            "so there is no correctly classified query to flip; check the sign of what the training function returns."
        )
    flipped = {name: np.zeros(len(eligible), dtype=int) for name in scores}
    for name, s in scores.items():
        if s.shape != (full.shape[1], total):
            raise TaskError(f"Scores of {name!r} have shape {s.shape}; expected {(full.shape[1], total)}.")
    sign = -1.0 if args.positive_helps else 1.0  # ascending sign·score: the most helpful first
    for k in ks:
        jobs, owners = [], []
        for name, s in scores.items():
            for j, q in enumerate(eligible):
                if flipped[name][j]:
                    continue
                mask = everyone.copy()
                mask[np.argsort(sign * s[q], kind="stable")[:k]] = False
                owners.append((name, j, q, len(jobs)))
                jobs.extend(Job(keep_from_mask(rows, mask), seed) for seed in args.seeds)
        if not jobs:
            break
        values = run_retrains(retrain, jobs, cache, desc=f"removal k={k}", **run)
        per = len(args.seeds)
        for name, j, q, first in owners:
            if values[first : first + per, q].mean() <= args.threshold:
                flipped[name][j] = k
    return {
        name: RemovalResult(
            ks,
            np.array([float(np.mean((f > 0) & (f <= k))) for k in ks]),
            f,
            eligible,
        )
        for name, f in flipped.items()
    }


def plot_removal(results: Mapping[str, RemovalResult], path: str | Path, title: str = "") -> Path:
    """Save a PNG of the fraction of flipped queries against k for each method."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, r in results.items():
        ax.plot(r.ks, r.fraction, marker="o", label=name)
    ax.set_xlabel("k (most helpful training examples removed)")
    ax.set_ylabel("fraction of queries misclassified")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, path, dpi=120)
