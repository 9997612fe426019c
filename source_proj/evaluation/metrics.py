"""Pure metric functions: ranks, Spearman correlation, group predictions, bootstrap intervals.

No retraining, no I/O: every function maps arrays to arrays, so each is tested against scipy on
fixed data. Score convention: ``scores[q, z] = −Δf(q, z)``, positive = z raised f(q) (helped q for a margin,
harmed it for a loss); the prediction for a kept subset S is Σ_{z∈S} scores[q, z].
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from source_proj.errors import TaskError, check_real, check_whole, first_line


def rank(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Ranks 1..n along ``axis``; tied values share their average rank (as ``scipy.stats.rankdata``)."""
    x = np.asarray(values, dtype=np.float64)
    _check_axis(x, axis)
    x = np.moveaxis(x, axis, -1)
    if np.isnan(x).any():
        raise TaskError("Cannot rank values that contain NaN; check the scores and measurements for NaNs.")
    n = x.shape[-1]
    order = np.argsort(x, axis=-1, kind="stable")
    ordered = np.take_along_axis(x, order, axis=-1)
    position = np.broadcast_to(np.arange(n), x.shape)
    differs = ordered[..., 1:] != ordered[..., :-1]
    first = np.concatenate([np.ones((*x.shape[:-1], 1), bool), differs], axis=-1)
    last = np.concatenate([differs, np.ones((*x.shape[:-1], 1), bool)], axis=-1)
    start = np.maximum.accumulate(np.where(first, position, 0), axis=-1)
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, position, n), axis=-1), axis=-1), axis=-1)
    ranks = np.empty_like(ordered)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=-1)
    return np.moveaxis(ranks, -1, axis)


def pearson(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Pearson correlation along ``axis``; NaN where either side is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    _same_shape(x, y, axis)
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    num = (xc * yc).sum(axis=axis)
    den = np.sqrt((xc**2).sum(axis=axis) * (yc**2).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Spearman rank correlation along ``axis`` (Pearson of average ranks); NaN where a side is constant."""
    _same_shape(np.asarray(x), np.asarray(y), axis)
    return pearson(rank(x, axis), rank(y, axis), axis)


def cosine(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Cosine similarity along ``axis``; NaN where a side is zero."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    _same_shape(x, y, axis)
    den = np.linalg.norm(x, axis=axis) * np.linalg.norm(y, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (x * y).sum(axis=axis) / np.where(den > 0, den, 1.0), np.nan)


def group_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Predicted measurement of each kept subset, up to a constant: Σ_{z∈S_m} scores[q, z].

    Args:
        scores: ``[Q, N]`` finite attribution scores (score = −Δf: positive = z raised the query's measurement).
        masks: boolean ``[M, N]``, True where a training row is kept in subset m.

    Returns:
        ``[M, Q]``; predictions equal in exact arithmetic for a repeated subset, or for a query with one score
        for every row, are exactly equal (their ranks tie; a constant prediction has no correlation).
    """
    scores = real_array(scores, "scores")
    masks = np.asarray(masks)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1] or scores.shape[1] == 0:
        raise TaskError(
            f"Scores {scores.shape} and subset masks {masks.shape} do not match: both need one column per training row."
        )
    bad = np.flatnonzero(~np.isfinite(scores).all(axis=1))
    if bad.size:
        raise TaskError(
            f"The scores of query {bad[0]} ({bad.size} queries in all) contain NaN or infinite values; a group "
            "prediction sums them, so fix the method's scores first."
        )
    # A matrix product rounds each row as its place in the blocks falls, so predictions equal in exact arithmetic
    # could differ in the last bits, and Spearman would rank that noise: the same subset drawn twice is summed once,
    # and a query scoring every row alike is predicted count × score, both exactly equal where they should be.
    unique, inverse = np.unique(masks, axis=0, return_inverse=True)
    kept = unique.astype(np.float64)
    inverse = inverse.reshape(-1)
    predictions = (kept @ scores.T)[inverse]
    constant = (scores == scores[:, :1]).all(axis=1)
    predictions[:, constant] = kept.sum(axis=1, keepdims=True)[inverse] * scores[constant, 0]
    return predictions


def real_array(values: object, what: str) -> np.ndarray:
    """``values`` as a float64 array, or one sentence where they are not real numbers in a rectangular layout (a
    ragged list, strings, objects, complex numbers whose imaginary part a cast would drop)."""
    try:
        array = np.asarray(values)
    except ValueError:  # a ragged nesting
        array = None
    except TypeError as err:  # e.g. a tensor on a GPU
        raise TaskError(f"numpy cannot read the {what} ({first_line(err)}); pass a float array (of a tensor: "
                        ".cpu().numpy()).") from None  # fmt: skip
    if array is None or array.dtype.kind not in "biuf":
        read = "a ragged nesting" if array is None else f"{array.dtype} entries"
        raise TaskError(
            f"The {what} are not a rectangular array of real numbers (numpy reads them as {read}); pass a float array."
        )
    return array.astype(np.float64)


def check_bootstrap(resamples: int, confidence: float, owner: str = "") -> None:
    """Refuse, in one sentence, bootstrap settings no interval can be drawn with (checked where the settings are
    given, before the retrains they summarise); ``owner`` prefixes the fields' names (``"LDSArguments."``)."""
    check_whole(f"{owner}resamples", resamples)
    check_real(f"{owner}confidence", confidence, 0.0, 1.0, closed=False)


def _same_shape(x: np.ndarray, y: np.ndarray, axis: int) -> None:
    """Refuse two arrays compared element by element whose shapes differ, or an ``axis`` they lack, in one
    sentence."""
    if x.shape != y.shape:
        raise TaskError(f"The arrays compared have shapes {x.shape} and {y.shape}; pass two arrays of one shape.")
    _check_axis(x, axis)


def _check_axis(x: np.ndarray, axis: int) -> None:
    """Refuse an ``axis`` the array ``x`` lacks, in one sentence."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -x.ndim <= axis < x.ndim:
        raise TaskError(f"axis is {axis!r}; pass an axis of the {x.ndim}-dimensional arrays, from {-x.ndim} to "
                        f"{x.ndim - 1}.")  # fmt: skip


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    batch: int = 100,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of n resampled units.

    Args:
        statistic: maps resampled unit indices ``[B, n]`` (drawn with replacement) to ``[B]`` values.
        n: number of units (e.g. LDS subsets).
        resamples: bootstrap resamples.
        confidence: coverage of the interval (0.95 → 2.5th and 97.5th percentiles).
        seed: seed of the resampling.
        batch: resamples evaluated per call of ``statistic`` (bounds memory).

    Resamples on which the statistic is not finite (e.g. every unit drawn the same) are left out.
    """
    check_whole("n", n)
    check_bootstrap(resamples, confidence)
    check_whole("batch", batch)
    check_whole("seed", seed, 0)
    rng = np.random.default_rng(seed)
    values = []
    for begin in range(0, resamples, batch):
        idx = rng.integers(0, n, size=(min(batch, resamples - begin), n))
        values.append(np.asarray(statistic(idx), dtype=np.float64))
    stats = np.concatenate(values)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        raise TaskError(
            f"The statistic was undefined on every one of {resamples} bootstrap resamples, so there is no interval; "
            "use more resamples or more units."
        )
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1.0 - tail))


@dataclass(frozen=True)
class Correlation:
    """Mean per-query rank correlation between predictions and ground truth, with its bootstrap interval.

    Attributes:
        mean: mean over queries of the per-query Spearman correlation (queries whose ground truth or
            prediction is constant are left out, with a warning that counts them).
        low: lower end of the bootstrap confidence interval of ``mean`` (resampling the units: subsets for LDS).
        high: upper end of that interval.
        per_query: ``[Q]`` Spearman correlation of each query (NaN where undefined).
        units: number of units correlated over (subsets M, or left-out examples).
        confidence: the interval's coverage (tables and plots name it).
    """

    mean: float
    low: float
    high: float
    per_query: np.ndarray
    units: int
    confidence: float = 0.95

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def per_query_spearman(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``[Q]`` Spearman correlation of each query's ``predicted`` and ``actual`` (both ``[units, Q]``), NaN where
    either is constant (counted in a ``UserWarning``); arrays no correlation can be drawn from are refused."""
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if predicted.shape != actual.shape or predicted.ndim != 2:
        raise TaskError(f"Predictions {predicted.shape} and ground truth {actual.shape} must both be [units, queries].")
    if predicted.shape[0] < 3:
        raise TaskError(
            f"A rank correlation needs at least 3 units, not {predicted.shape[0]}; use more subsets (LDS) or more "
            "left-out examples (further training)."
        )
    if predicted.shape[1] == 0:
        raise TaskError("There is no query to correlate; give predictions and ground truth for at least one query.")
    per_query = spearman(predicted, actual, axis=0)
    if not np.isfinite(per_query).any():
        raise TaskError("Every query's prediction or ground truth is constant, so no correlation is defined.")
    undefined = int(np.isnan(per_query).sum())
    if undefined:
        warnings.warn(
            f"{undefined} of {per_query.size} queries have a constant prediction or ground truth over the "
            f"{predicted.shape[0]} units, so no rank correlation (NaN in per_query); the mean is over the other "
            f"{per_query.size - undefined}.",
            stacklevel=3,
        )
    return per_query


def correlate(
    predicted: np.ndarray,
    actual: np.ndarray,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Correlation:
    """Per-query Spearman of ``predicted`` vs ``actual`` (both ``[units, Q]``), averaged, with a bootstrap CI.

    The interval resamples the units (rows) with replacement, as the SOURCE paper's LDS does with
    its data subsets. A query whose prediction or ground truth is constant has no correlation: it is
    NaN in ``per_query``, left out of the mean, and counted in a ``UserWarning``.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    per_query = per_query_spearman(predicted, actual)

    def statistic(idx: np.ndarray) -> np.ndarray:
        rho = spearman(predicted[idx], actual[idx], axis=1)
        # A resample whose every query is constant has no correlation (NaN), not a warning for the user.
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.where(np.isfinite(rho), rho, np.nan), axis=1)

    low, high = bootstrap_ci(statistic, predicted.shape[0], resamples=resamples, confidence=confidence, seed=seed)
    return Correlation(float(np.nanmean(per_query)), low, high, per_query, predicted.shape[0], confidence)
