"""The further-training gold standard for the final-model-only setting (Wei et al.; REFERENCES.md).

Start from the final model θ_f. For each seed ξ, continue training on the full data D and on D∖{i}
(the same shuffle with i dropped from every batch) and measure the queries. The gold-standard
attribution of example i is the mean over seeds of the difference,

    score_gold(q, i) = −mean_ξ [ f(q; θ_ξ(D∖{i})) − f(q; θ_ξ(D)) ]

(the minus sign gives the project's convention: positive = i raised f(q), which helped q for a margin and
harmed it for a loss). Methods are compared with it
per query, over the left-out examples, by Spearman correlation (with a bootstrap interval over the
examples) and cosine similarity. The user's ``further_train(keep, seed) -> [Q]`` continues training
the final model on the kept examples (see retrain.py for ``keep``); its length and learning rate
(e.g. a tenth of the original rate, a few epochs) are part of the gold standard's definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from source_proj.errors import TaskError, check_whole, check_wholes
from source_proj.evaluation.metrics import Correlation, check_bootstrap, correlate, cosine, real_array
from source_proj.evaluation.retrain import Job, RetrainCache, RetrainFunction, keep_from_mask, run_retrains
from source_proj.query.attributor import StageRows


@dataclass(frozen=True)
class FurtherTrainingArguments:
    """How the further-training gold standard is computed.

    Attributes:
        seeds: further-training seeds averaged (Wei et al. used 100; 10–20 give most of the benefit).
        workers: parallel worker processes.
        threads_per_worker: torch threads per worker process.
        resamples: bootstrap resamples for the interval of the mean Spearman correlation.
        confidence: the level of that interval.
    """

    seeds: tuple[int, ...] = tuple(range(10))
    workers: int = 1
    threads_per_worker: int = 1
    resamples: int = 1000
    confidence: float = 0.95

    def __post_init__(self) -> None:
        # Refused here, not in agreement(): the same arguments run the gold standard's retrains first.
        check_wholes("FurtherTrainingArguments.seeds", self.seeds)
        check_whole("FurtherTrainingArguments.workers", self.workers)
        check_whole("FurtherTrainingArguments.threads_per_worker", self.threads_per_worker)
        check_bootstrap(self.resamples, self.confidence, "FurtherTrainingArguments.")


@dataclass(frozen=True)
class FurtherTraining:
    """Attributes:
    examples: ``[E]`` training rows left out one at a time.
    scores: ``[Q, E]`` gold-standard scores (score = −Δf: positive = z raised the query's measurement).
    num_rows: N, the number of attributed training rows the examples index (a method's scores are ``[Q, N]``).
    """

    examples: np.ndarray
    scores: np.ndarray
    num_rows: int


def further_training_ground_truth(
    further_train: RetrainFunction,
    rows: Sequence[StageRows],
    examples: Sequence[int],
    cache_dir: str | Path,
    args: FurtherTrainingArguments = FurtherTrainingArguments(),
    *,
    progress: bool = True,
) -> FurtherTraining:
    """Continue training without each example, per seed (cached, resumable); average the differences.

    ``examples`` are distinct integer training-row indices ``[E]``.
    """
    total = sum(r.size for r in rows)
    given = np.asarray(examples)
    if given.dtype == bool or given.ndim != 1 or not np.issubdtype(given.dtype, np.integer):
        raise TaskError(
            f"Left-out examples must be a list of training-row indices, not an array of {given.dtype} with shape "
            f"{given.shape} (for a boolean mask, pass np.flatnonzero(mask))."
        )
    examples = given.astype(int)
    if examples.size == 0 or examples.min() < 0 or examples.max() >= total:
        raise TaskError(f"Left-out examples must be training rows in [0, {total}); got {examples.size} of them.")
    if np.unique(examples).size != examples.size:
        raise TaskError("Left-out examples repeat a training row; give each row once.")
    everyone = np.ones(total, dtype=bool)
    jobs = [Job(keep_from_mask(rows, everyone), s) for s in args.seeds]
    for i in examples:
        mask = everyone.copy()
        mask[i] = False
        jobs.extend(Job(keep_from_mask(rows, mask), s) for s in args.seeds)
    values = run_retrains(
        further_train,
        jobs,
        RetrainCache(cache_dir),
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        progress=progress,
        desc="further training",
    )
    seeds = len(args.seeds)
    full = values[:seeds]
    left_out = values[seeds:].reshape(len(examples), seeds, -1)
    return FurtherTraining(examples, -(left_out - full[None]).mean(axis=1).T, total)


@dataclass(frozen=True)
class Agreement:
    """How well a method's scores match the further-training gold standard.

    Attributes:
        spearman: mean per-query Spearman correlation over the left-out examples, with bootstrap CI.
        cosine: mean per-query cosine similarity.
        cosine_per_query: ``[Q]``.
    """

    spearman: Correlation
    cosine: float
    cosine_per_query: np.ndarray


def agreement(
    scores: np.ndarray, truth: FurtherTraining, args: FurtherTrainingArguments = FurtherTrainingArguments()
) -> Agreement:
    """Compare a score matrix ``[Q, N]`` (finite at the left-out examples; N the gold standard's ``num_rows``) with
    the gold standard on them."""
    scores = real_array(scores, "scores")
    if scores.ndim != 2 or scores.shape[1] <= truth.examples.max():
        raise TaskError(
            f"Scores of shape {scores.shape} are not [queries, training rows] reaching row {truth.examples.max()}, "
            "a left-out example; give the method's score matrix [Q, N]."
        )
    if scores.shape[1] != truth.num_rows:
        raise TaskError(
            f"The scores cover {scores.shape[1]} training rows but the gold standard {truth.num_rows}; score the "
            "training rows the gold standard left examples out of (a method fitted on the same stages)."
        )
    predicted = scores[:, truth.examples]
    if predicted.shape != truth.scores.shape:
        raise TaskError(f"Scores cover {scores.shape[0]} queries but the gold standard {truth.scores.shape[0]}.")
    bad = np.flatnonzero(~np.isfinite(predicted).all(axis=1))
    if bad.size:
        raise TaskError(
            f"The scores of query {bad[0]} ({bad.size} queries in all) are NaN or infinite at left-out examples; "
            "fix the method's scores first."
        )
    cos = cosine(predicted, truth.scores, axis=1)
    return Agreement(
        correlate(predicted.T, truth.scores.T, resamples=args.resamples, confidence=args.confidence),
        float(np.nanmean(cos)),
        cos,
    )
