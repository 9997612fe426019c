"""The pure metric functions agree with scipy on fixed data (ties included)."""

from __future__ import annotations

import itertools
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from source_proj import TaskError
from source_proj.evaluation import (
    Counterfactuals,
    LDSArguments,
    bootstrap_ci,
    compare,
    correlate,
    cosine,
    format_table,
    group_predictions,
    lds,
    lds_difference,
    plot_lds,
    query_interval,
    rank,
    sample_subsets,
    spearman,
    split_half_reliability,
)


def _tied(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 6, size=shape).astype(float)  # many ties


def test_rank_matches_scipy_rankdata_with_ties_along_any_axis() -> None:
    x = _tied(np.random.default_rng(0), (7, 9, 4))
    for axis in range(3):
        np.testing.assert_array_equal(rank(x, axis), stats.rankdata(x, method="average", axis=axis))


def test_spearman_matches_scipy_per_column_with_and_without_ties() -> None:
    rng = np.random.default_rng(1)
    for x, y in ((rng.normal(size=(50, 6)), rng.normal(size=(50, 6))), (_tied(rng, (40, 5)), _tied(rng, (40, 5)))):
        y = y + 0.5 * x
        ours = spearman(x, y, axis=0)
        expected = [stats.spearmanr(x[:, j], y[:, j]).statistic for j in range(x.shape[1])]
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(spearman(x.T, y.T, axis=1), expected, rtol=1e-12, atol=1e-12)


def test_spearman_of_a_constant_side_is_nan_not_an_error() -> None:
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_cosine_and_group_predictions_match_direct_computation() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    expected = [a[:, j] @ b[:, j] / np.linalg.norm(a[:, j]) / np.linalg.norm(b[:, j]) for j in range(3)]
    np.testing.assert_allclose(cosine(a, b, axis=0), expected, rtol=1e-12)
    scores, masks = rng.normal(size=(4, 10)), rng.random((6, 10)) < 0.5
    scores[2] = 0.7  # a query scoring every row alike: its prediction is still the count kept times the score
    assert len(set(masks.sum(axis=1))) > 1
    loop = np.array([[scores[q, masks[m]].sum() for q in range(4)] for m in range(6)])
    np.testing.assert_allclose(group_predictions(scores, masks), loop, rtol=1e-12)
    with pytest.raises(TaskError, match="do not match"):
        group_predictions(scores, masks[:, :9])


def test_percentile_bootstrap_interval_agrees_with_scipy() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    y = 0.6 * x + rng.normal(size=60)

    def ours_statistic(idx: np.ndarray) -> np.ndarray:
        return spearman(x[idx], y[idx], axis=1)

    low, high = bootstrap_ci(ours_statistic, len(x), resamples=20000, confidence=0.95, seed=0)
    ref = stats.bootstrap(
        (x, y),
        lambda a, b, axis: spearman(a, b, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=20000,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(1),
    ).confidence_interval
    # Two independent Monte Carlo estimates of the same percentiles: equal up to resampling noise.
    assert abs(low - ref.low) < 0.02 and abs(high - ref.high) < 0.02, (low, high, ref)
    assert low < stats.spearmanr(x, y).statistic < high


def test_correlate_reports_the_mean_per_query_spearman_and_an_interval_around_it() -> None:
    rng = np.random.default_rng(4)
    actual = rng.normal(size=(80, 12))
    predicted = actual + rng.normal(scale=1.0, size=actual.shape)
    result = correlate(predicted, actual, resamples=500)
    per_query = [stats.spearmanr(predicted[:, q], actual[:, q]).statistic for q in range(12)]
    np.testing.assert_allclose(result.per_query, per_query, rtol=1e-12)
    assert result.mean == pytest.approx(np.mean(per_query))
    assert result.low < result.mean < result.high
    assert result.units == 80
    # the interval is the percentile bootstrap of that mean (resampling the units, paired), with the same draws

    def mean_of_resample(idx: np.ndarray) -> np.ndarray:  # scipy's average ranks, Pearson of them, mean over queries
        a, b = stats.rankdata(predicted[idx], axis=1), stats.rankdata(actual[idx], axis=1)
        a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
        return ((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))).mean(axis=1)

    assert (result.low, result.high) == pytest.approx(bootstrap_ci(mean_of_resample, 80, resamples=500), abs=1e-12)


def test_query_interval_is_scipys_percentile_bootstrap_of_the_mean_over_queries_without_nans() -> None:
    rng = np.random.default_rng(5)
    per_query = rng.normal(0.5, 0.2, size=40)
    args = LDSArguments(resamples=20000)
    low, high = query_interval(np.concatenate([per_query, [np.nan, np.nan]]), args)
    ref = stats.bootstrap(
        (per_query,),
        np.mean,
        n_resamples=20000,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(1),
    ).confidence_interval
    assert abs(low - ref.low) < 0.01 and abs(high - ref.high) < 0.01, (low, high, ref)
    assert query_interval(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))
    # NaNs (queries without a correlation) are left out before resampling: the interval is the finite values' own
    finite = np.array([0.2, 0.4, 0.9, 0.5])
    assert query_interval(np.concatenate([finite, np.full(30, np.nan)])) == query_interval(finite)
    with pytest.raises(TaskError, match="at least two queries with a defined correlation"):
        query_interval(np.array([0.3, np.nan, np.nan]))


def test_lds_bootstraps_over_queries_when_asked_with_the_same_mean() -> None:
    rng = np.random.default_rng(6)
    masks = rng.random((30, 20)) < 0.5
    scores = rng.normal(size=(8, 20))
    measurements = (masks @ scores.T + rng.normal(scale=2.0, size=(30, 8)))[:, None, :]
    truth = Counterfactuals(0.5, masks, measurements)
    by_subsets = lds(scores, truth, LDSArguments())
    by_queries = lds(scores, truth, LDSArguments(resample="queries"))
    assert by_queries.mean == by_subsets.mean
    assert (by_queries.low, by_queries.high) == query_interval(by_subsets.per_query)
    # the interval takes the arguments' own coverage and resamples, not the defaults
    narrow = LDSArguments(resample="queries", confidence=0.5, resamples=300, seed=4)
    assert (lds(scores, truth, narrow).low, lds(scores, truth, narrow).high) == query_interval(by_subsets.per_query,
                                                                                               narrow)  # fmt: skip
    assert query_interval(by_subsets.per_query, narrow) != query_interval(by_subsets.per_query)
    with pytest.raises(TaskError, match="resample is 'models'; use one of subsets, queries"):
        lds(scores, truth, LDSArguments(resample="models"))  # type: ignore[arg-type]


def test_few_units_give_an_interval_without_warnings() -> None:
    """With 3 units a ninth of the bootstrap resamples repeat one unit, whose correlations are all undefined:
    the interval leaves them out without a RuntimeWarning reaching the user."""
    rng = np.random.default_rng(0)
    predicted, actual = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = correlate(predicted, actual, resamples=200)
    assert np.isfinite(result.low) and np.isfinite(result.high) and result.low <= result.mean <= result.high


def test_a_bootstrap_without_resamples_or_without_a_defined_value_is_refused_in_one_sentence() -> None:
    rng = np.random.default_rng(7)
    predicted, actual = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    with pytest.raises(TaskError, match=r"^resamples is 0; pass a whole number ≥ 1\.$"):
        correlate(predicted, actual, resamples=0)
    with pytest.raises(TaskError, match="undefined on every one"):
        bootstrap_ci(lambda idx: np.full(len(idx), np.nan), 5, resamples=10)


def test_queries_without_a_defined_correlation_are_left_out_of_the_mean_with_a_warning_that_counts_them() -> None:
    """A constant prediction or ground truth has no Spearman correlation: the mean is over the other queries, and
    the user is told how many were left out (a method is otherwise judged on fewer queries without knowing it)."""
    rng = np.random.default_rng(8)
    predicted, actual = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    predicted[:, 1] = 0.0  # e.g. a method whose scores for query 1 are all zero
    actual[:, 3] = 2.0  # a query the retrains do not move
    with pytest.warns(UserWarning, match=r"2 of 5 queries .* mean is over the other 3"):
        result = correlate(predicted, actual, resamples=50)
    defined = [q for q in range(5) if q not in (1, 3)]
    expected = [stats.spearmanr(predicted[:, q], actual[:, q]).statistic for q in defined]
    assert np.isnan(result.per_query[[1, 3]]).all()
    assert result.mean == pytest.approx(np.mean(expected), rel=1e-12)
    with pytest.raises(TaskError, match="no query"):
        correlate(predicted[:, :0], actual[:, :0])


def test_group_predictions_name_non_finite_scores_as_the_problem() -> None:
    """An infinite score became NaN in the sums (0 · inf) and was reported as NaN in 'scores and measurements'."""
    scores, masks = np.ones((2, 6)), np.eye(6, dtype=bool)[:4]
    for bad in (np.inf, -np.inf, np.nan):
        scores[1, 2] = bad
        with pytest.raises(TaskError, match=r"query 1 .* NaN or infinite"):
            group_predictions(scores, masks)


def test_the_table_and_plot_refuse_results_that_do_not_match_the_alphas(tmp_path) -> None:
    rng = np.random.default_rng(9)
    masks = rng.random((10, 8)) < 0.5
    scores = rng.normal(size=(3, 8))
    result = lds(scores, Counterfactuals(0.5, masks, (masks @ scores.T)[:, None, :]), LDSArguments(resamples=20))
    for results in ({"a": [result]}, {"a": [result, result], "b": [result]}):
        with pytest.raises(TaskError, match="one result per α"):
            format_table(results, [0.25, 0.5])
        with pytest.raises(TaskError, match="one result per α"):
            plot_lds(results, [0.25, 0.5], tmp_path / "lds.png")
    assert "0.25" in format_table({"a": [result, result]}, [0.25, 0.5])


def test_lds_takes_any_array_like_and_names_a_one_dimensional_score_vector() -> None:
    """One query's scores [N] were reported as 'the scores cover N queries'; a list raised AttributeError."""
    rng = np.random.default_rng(10)
    masks = rng.random((10, 8)) < 0.5
    scores = rng.normal(size=(1, 8))
    truth = Counterfactuals(0.5, masks, (masks @ scores.T + rng.normal(size=(10, 1)))[:, None, :])
    args = LDSArguments(resamples=20)
    with pytest.raises(TaskError, match=r"\[queries, training rows\]"):
        lds(scores[0], truth, args)
    assert lds(scores.tolist(), truth, args).mean == lds(scores, truth, args).mean


def test_selecting_queries_of_a_ground_truth_refuses_indices_it_does_not_have_or_repeats() -> None:
    truth = Counterfactuals(0.5, np.eye(4, dtype=bool), np.arange(24.0).reshape(4, 2, 3))
    np.testing.assert_array_equal(truth.select([2, 0]).measurements, truth.measurements[:, :, [2, 0]])
    for wrong, match in (([3], "0 to 2"), ([-1], "0 to 2"), ([1, 1], "more than once")):
        with pytest.raises(TaskError, match=match):
            truth.select(wrong)


def test_a_hand_built_ground_truth_of_the_wrong_layout_is_refused_when_built() -> None:
    """Measurements [M, Q] without the repeats axis raised 'tuple index out of range' inside lds()."""
    rng = np.random.default_rng(11)
    masks, measurements = rng.random((6, 5)) < 0.5, rng.normal(size=(6, 2, 3))
    for wrong_masks, wrong_measurements, match in (
        (masks, measurements[:, 0, :], r"\[M, R, Q\]"),
        (masks[:4], measurements, "6 subsets"),
        (masks[0], measurements, r"boolean \[M, N\]"),
        (masks * 2, measurements, r"boolean \[M, N\]"),
        (masks, np.where(measurements > 1, np.nan, measurements), "NaN or infinite"),
        (masks, measurements[:, :0], "no retrain"),  # its mean was NaN: "check the scores for NaNs" in lds()
    ):
        with pytest.raises(TaskError, match=match):
            Counterfactuals(0.5, wrong_masks, wrong_measurements)
    Counterfactuals(0.5, masks.astype(np.uint8), measurements)  # 0/1 masks are masks


def test_a_brought_ground_truth_or_scores_not_of_real_numbers_or_too_few_subsets_are_refused_in_one_sentence() -> None:
    """Measurements read from a text file as strings, or a ragged list, raised numpy's TypeError/ValueError; complex
    scores lost their imaginary part with only a ComplexWarning; a ground truth of two subsets, or one labelled
    alpha='half', was accepted and failed (or mislabelled) later."""
    rng = np.random.default_rng(15)
    masks, measurements = rng.random((6, 5)) < 0.5, rng.normal(size=(6, 2, 3))
    for alpha, wrong_masks, wrong_measurements, match in (
        (0.5, masks, measurements.astype(str), r"not a rectangular array of real numbers \(numpy reads them as <U"),
        (0.5, masks, measurements.astype(object), "reads them as object entries"),
        (0.5, masks[:1], [[[1.0, 2.0], [3.0]]], "reads them as a ragged nesting"),
        (0.5, masks[:2], measurements[:2], "holds 2 subsets; a rank correlation over subsets needs at least 3"),
        ("half", masks, measurements, "Counterfactuals.alpha is 'half'"),
        (1.0, masks, measurements, "Counterfactuals.alpha is 1.0"),
    ):
        with pytest.raises(TaskError, match=match):
            Counterfactuals(alpha, wrong_masks, wrong_measurements)
    truth = Counterfactuals(0.5, masks, measurements.tolist())  # a nested list of numbers is an array
    for scores, match in ((rng.normal(size=(3, 5)) + 1j, "complex128 entries"), (np.full((3, 5), "0.1"), "<U")):
        with pytest.raises(TaskError, match=match):
            lds(scores, truth, LDSArguments(resamples=20))


def test_group_predictions_equal_in_exact_arithmetic_are_exactly_equal_so_their_ranks_tie() -> None:
    """A matrix product rounds a row differently depending on where it falls in its blocks: the same subset drawn
    twice, or a query scoring every row alike, got predictions a bit apart, and Spearman ranked rounding noise
    (a spurious correlation for a constant prediction, which has none)."""
    rng = np.random.default_rng(12)
    for queries, seed in itertools.product((1, 4, 8), range(5)):  # the blocking depends on the shapes
        masks = sample_subsets(10, 13, 0.9, seed=seed)  # 9 of 10 rows: 10 possible subsets, so repeats
        scores = np.vstack([rng.normal(size=(queries - 1, 10)), np.full((1, 10), 0.7)])
        exact = np.array([[math.fsum(scores[q, masks[m]]) for q in range(queries)] for m in range(13)])
        ours = group_predictions(scores, masks)
        np.testing.assert_array_equal(rank(ours), rank(exact))
        assert (ours[:, -1] == ours[0, -1]).all()
        actual = rng.normal(size=(13, queries))
        if queries > 1:
            with pytest.warns(UserWarning, match=f"1 of {queries} queries"):
                result = correlate(ours, actual, resamples=20)
            expected = [stats.spearmanr(exact[:, q], actual[:, q]).statistic for q in range(queries - 1)]
            np.testing.assert_allclose(result.per_query[:-1], expected, rtol=1e-12)
            assert np.isnan(result.per_query[-1])


def test_split_half_reliability_is_scipys_spearman_of_the_half_means_extrapolated_to_all_r_retrains() -> None:
    """The benchmarks' copies extrapolated to 2·⌊R/2⌋ retrains whatever R was (ρ = 2r/(1+r) for R = 5 or 3), and for
    R = 1 correlated two empty means: NaN, reported as an LDS ceiling of 0."""
    rng = np.random.default_rng(13)
    signal = rng.normal(size=(12, 1, 4))
    for repeats in (2, 3, 4, 5):
        measurements = signal + rng.normal(size=(12, repeats, 4))
        measurements[:, :, 1] = _tied(rng, (12, repeats))  # ties: average ranks, as scipy
        half = repeats // 2
        first, second = measurements[:, :half].mean(1), measurements[:, half : 2 * half].mean(1)
        r = np.mean([stats.spearmanr(first[:, q], second[:, q]).statistic for q in range(4)])
        k = repeats / half  # Spearman–Brown from ⌊R/2⌋ retrains to all R
        rho = k * r / (1 + (k - 1) * r)
        got = split_half_reliability(Counterfactuals(0.5, sample_subsets(10, 12, 0.5), measurements))
        assert got == pytest.approx((r, math.sqrt(max(rho, 0.0))), abs=1e-12)
    with pytest.raises(TaskError, match="at least two retrains"):
        split_half_reliability(Counterfactuals(0.5, sample_subsets(10, 12, 0.5), signal))


def test_compare_and_lds_name_scores_and_ground_truths_given_in_another_form() -> None:
    """compare(scores_array, …) raised AttributeError ('no attribute items'), compare(…, truth) TypeError ('not
    iterable'), and lds of [N, Q] scores said they 'cover N queries'. Each is one sentence saying what to pass; the
    forms asked for give lds's own values."""
    rng = np.random.default_rng(11)
    masks = rng.random((10, 8)) < 0.5
    scores = rng.normal(size=(3, 8))
    truth = Counterfactuals(0.5, masks, (masks @ scores.T + rng.normal(size=(10, 3)))[:, None, :])
    args = LDSArguments(resamples=20)
    with pytest.raises(TaskError) as err:
        compare(scores, [truth], args)  # type: ignore[arg-type]
    assert str(err.value) == ("compare takes the scores as a mapping {method name: [Q, N] scores}, not a ndarray; "
                              "pass {'source': scores}, or call lds for one method.")
    with pytest.raises(TaskError) as err:
        compare({"source": scores}, truth, args)  # type: ignore[arg-type]
    assert str(err.value) == (
        "compare takes a sequence of ground truths (one per α), not a Counterfactuals; pass [truth]."
    )
    with pytest.raises(TaskError) as err:
        lds(scores.T, truth, args)
    assert str(err.value) == (
        "The scores of shape (8, 3) are [training rows, queries], the transpose of the [Q, N] the ground truth needs; "
        "pass scores.T."
    )
    (result,) = compare({"source": scores}, (truth,), args)["source"]
    assert result.mean == lds(scores, truth, args).mean


def test_the_lds_correlates_the_group_predictions_with_the_mean_over_the_repeats() -> None:
    """The ground truth of a subset is its measurement averaged over the R retrains (``Counterfactuals.mean``), not
    one retrain's nor another summary. Oracle: scipy's Spearman of Σ_{z∈S} score against the mean, with repeats
    noisy enough that the first retrain, or the largest, ranks the subsets otherwise."""
    rng = np.random.default_rng(14)
    masks = rng.random((25, 12)) < 0.5
    scores = rng.normal(size=(3, 12))
    measurements = (masks @ scores.T)[:, None, :] + rng.normal(scale=3.0, size=(25, 4, 3))
    truth = Counterfactuals(0.5, masks, measurements)
    np.testing.assert_array_equal(truth.mean, measurements.mean(axis=1))
    predicted = np.array([[scores[q, m].sum() for q in range(3)] for m in masks])
    expected = [stats.spearmanr(predicted[:, q], measurements[:, :, q].mean(axis=1)).statistic for q in range(3)]
    first = [stats.spearmanr(predicted[:, q], measurements[:, 0, q]).statistic for q in range(3)]
    assert not np.allclose(expected, first)  # the case: one retrain is not the mean
    result = lds(scores, truth, LDSArguments(resamples=20))
    np.testing.assert_allclose(result.per_query, expected, rtol=1e-12)


def _paired_truth(seed: int) -> tuple[np.ndarray, np.ndarray, Counterfactuals]:
    """Two methods' scores [6, 15] and a ground truth of 12 subsets × 2 repeats with many tied measurements: a the
    scores the measurements follow, b those scores blurred."""
    rng = np.random.default_rng(seed)
    masks = rng.random((12, 15)) < 0.5
    a = rng.normal(size=(6, 15))
    b = a + rng.normal(scale=1.5, size=a.shape)
    measurements = np.round((masks @ a.T)[:, None, :] + rng.normal(scale=2.0, size=(12, 2, 6)))  # ties
    return a, b, Counterfactuals(0.5, masks, measurements)


def _scipy_mean_rho(predicted: np.ndarray, actual: np.ndarray, subsets: np.ndarray, queries: np.ndarray) -> float:
    """Brute force: mean over the drawn queries of scipy's Spearman over the drawn subsets (undefined ones left out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns of a constant input, whose correlation is NaN
        rho = [stats.spearmanr(predicted[subsets, q], actual[subsets, q]).statistic for q in queries]
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else np.nan


def _percentiles(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    finite = np.array([v for v in values if np.isfinite(v)])
    tail = (1 - confidence) / 2
    return float(np.quantile(finite, tail)), float(np.quantile(finite, 1 - tail))


def test_the_paired_lds_difference_is_a_brute_force_paired_bootstrap_over_subsets_or_queries() -> None:
    """Oracle: each resample draws one set of subsets (the generator of the seed, as every interval here) and scores
    both methods on it with scipy; the interval is the percentiles of the differences."""
    a, b, truth = _paired_truth(16)
    args = LDSArguments(resamples=100, seed=3)  # one batch of draws
    got = lds_difference(a, b, truth, args)
    pa, pb = group_predictions(a, truth.masks), group_predictions(b, truth.masks)
    everything, queries = np.arange(12), np.arange(6)
    deltas = []
    for subsets in np.random.default_rng(3).integers(0, 12, size=(100, 12)):
        rho_a = [_scipy_mean_rho(pa, truth.mean, subsets, [q]) for q in queries]
        rho_b = [_scipy_mean_rho(pb, truth.mean, subsets, [q]) for q in queries]
        deltas.append(np.nanmean(np.subtract(rho_a, rho_b)) if np.isfinite(np.subtract(rho_a, rho_b)).any() else np.nan)
    assert (got.low, got.high) == pytest.approx(_percentiles(deltas), abs=1e-12)
    expected = [_scipy_mean_rho(pa, truth.mean, everything, [q]) - _scipy_mean_rho(pb, truth.mean, everything, [q])
                for q in queries]  # fmt: skip
    np.testing.assert_allclose(got.per_query, expected, rtol=1e-12)
    assert got.mean == pytest.approx(lds(a, truth, args).mean - lds(b, truth, args).mean, abs=1e-12)
    assert got.units == 12 and got.significant == (got.low > 0 or got.high < 0)
    # over queries: the paired interval of the per-query differences
    by_queries = lds_difference(a, b, truth, LDSArguments(resample="queries", resamples=100, seed=3))
    assert (by_queries.low, by_queries.high) == query_interval(got.per_query, LDSArguments(resamples=100, seed=3))
    # the order of the methods flips the sign of every value
    flipped = lds_difference(b, a, truth, args)
    assert (flipped.mean, flipped.low, flipped.high) == pytest.approx((-got.mean, -got.high, -got.low), abs=1e-12)


def test_the_two_way_interval_resamples_subsets_and_queries_together_as_a_brute_force_bootstrap() -> None:
    """Oracle: resample b draws subsets from the seed's generator and, independently, queries (among those with a
    defined correlation) from the stream (seed, 1); the statistic is the mean of scipy's Spearman over both."""
    a, b, truth = _paired_truth(17)
    measurements = truth.measurements.copy()
    measurements[:, :, 4] = 7.0  # a query without a correlation: left out before the queries are drawn
    truth = Counterfactuals(0.5, truth.masks, measurements)
    args = LDSArguments(resamples=100, seed=5, resample="both", confidence=0.9)
    with pytest.warns(UserWarning, match="1 of 6 queries"):
        got = lds(a, truth, args)
    with pytest.warns(UserWarning, match="1 of 6 queries"):
        difference = lds_difference(a, b, truth, args)
    pa, pb = group_predictions(a, truth.masks), group_predictions(b, truth.masks)
    defined = np.array([0, 1, 2, 3, 5])
    subset_draws = np.random.default_rng(5).integers(0, 12, size=(100, 12))
    query_draws = np.random.default_rng(np.random.SeedSequence([5, 1])).integers(0, 5, size=(100, 5))
    draws = zip(subset_draws, query_draws, strict=True)
    values, deltas = [], []
    for subsets, picks in draws:
        values.append(_scipy_mean_rho(pa, truth.mean, subsets, defined[picks]))
        rho_a = [_scipy_mean_rho(pa, truth.mean, subsets, [q]) for q in defined[picks]]
        rho_b = [_scipy_mean_rho(pb, truth.mean, subsets, [q]) for q in defined[picks]]
        delta = np.subtract(rho_a, rho_b)
        deltas.append(np.nanmean(delta) if np.isfinite(delta).any() else np.nan)
    assert (got.low, got.high) == pytest.approx(_percentiles(values, 0.9), abs=1e-12)
    assert (difference.low, difference.high) == pytest.approx(_percentiles(deltas, 0.9), abs=1e-12)
    with pytest.warns(UserWarning, match="1 of 6 queries"):
        assert got.mean == lds(a, truth, LDSArguments(resamples=20)).mean  # the interval changes, not the LDS


def test_a_paired_difference_names_what_it_cannot_compare() -> None:
    a, b, truth = _paired_truth(18)
    with pytest.raises(TaskError, match=r"pass scores\.T"):
        lds_difference(a, b.T, truth)
    # b scores every row alike: on subsets of one size its every prediction is constant, so no query compares
    same_size = Counterfactuals(0.5, sample_subsets(15, 12, 0.5), truth.measurements)
    with pytest.raises(TaskError, match="No query has a defined correlation under both methods"):
        lds_difference(a, np.ones_like(a), same_size, LDSArguments(resamples=20))


def test_a_ground_truth_saved_to_a_file_loads_back_exactly_and_a_file_it_cannot_use_is_named(tmp_path) -> None:
    """Ground truths made by one's own retraining code travel as .npz files: a save and a load give the same
    arrays, a file with [M, Q] measurements and no alpha is one retrain per subset at the masks' mean kept fraction,
    and a file without the arrays (or of something else) is one sentence, not numpy's KeyError or pickle advice."""
    rng = np.random.default_rng(19)
    masks, measurements = rng.random((5, 8)) < 0.5, rng.normal(size=(5, 2, 3))
    truth = Counterfactuals(0.25, masks, measurements)
    back = Counterfactuals.load(truth.save(tmp_path / "truth.npz"))
    assert back.alpha == 0.25
    np.testing.assert_array_equal(back.masks, masks)
    np.testing.assert_array_equal(back.measurements, measurements)
    np.savez(tmp_path / "own.npz", masks=masks.astype(np.uint8), measurements=measurements[:, 0])
    own = Counterfactuals.load(tmp_path / "own.npz")
    assert own.alpha == masks.mean() and own.measurements.shape == (5, 1, 3)
    np.testing.assert_array_equal(own.mean, measurements[:, 0])

    np.save(tmp_path / "one.npy", measurements)
    np.savez(tmp_path / "keys.npz", m=masks, y=measurements)
    np.savez(tmp_path / "objects.npz", masks=masks, measurements=np.array([None, 1.0], dtype=object))
    np.savez(tmp_path / "alphas.npz", masks=masks, measurements=measurements, alpha=np.array([0.5, 0.5]))
    np.savez(tmp_path / "nan.npz", masks=masks, measurements=np.full((5, 2, 3), np.nan))
    (tmp_path / "text.npz").write_text("not numpy")
    for name, match in (
        ("one.npy", "holds one array, not an .npz archive of masks and measurements"),
        ("keys.npz", r"holds \['m', 'y'\], not masks and measurements"),
        ("objects.npz", "holds arrays numpy cannot read without pickle"),
        ("alphas.npz", r"holds an alpha of shape \(2,\)"),
        ("nan.npz", "NaN or infinite"),
        ("text.npz", "is not a numpy .npz archive; save one with np.savez"),
        ("missing.npz", "does not exist"),
    ):
        with pytest.raises(TaskError, match=match):
            Counterfactuals.load(tmp_path / name)
    with pytest.raises(TaskError, match=r"does not end in \.npz"):
        truth.save(tmp_path / "truth.npy")


@pytest.mark.parametrize("resample", ["subsets", "queries", "both"])
def test_the_table_names_the_coverage_the_intervals_were_drawn_at(resample: str) -> None:
    """The table's header said "95% CI" whatever LDSArguments.confidence was."""
    rng = np.random.default_rng(4)
    masks = rng.random((12, 8)) < 0.5
    scores = rng.normal(size=(5, 8))
    truth = Counterfactuals(0.5, masks, (masks @ scores.T + rng.normal(size=(12, 5)))[:, None, :])
    narrow = lds(scores, truth, LDSArguments(resamples=50, confidence=0.8, resample=resample))
    wide = lds(scores, truth, LDSArguments(resamples=50, resample=resample))
    assert narrow.confidence == 0.8 and wide.confidence == 0.95
    assert narrow.high - narrow.low < wide.high - wide.low
    assert "[80% CI]" in format_table({"a": [narrow]}, [0.5]) and "95%" not in format_table({"a": [narrow]}, [0.5])
    assert "[95% CI]" in format_table({"a": [wide]}, [0.5])
    assert "[80%/95% CI]" in format_table({"a": [narrow], "b": [wide]}, [0.5])


def test_a_ground_truth_is_saved_into_a_new_folder_and_an_unwritable_path_is_one_sentence(tmp_path: Path) -> None:
    """save creates the folders it is asked to write into (as the library's other writers do, through
    atomic_write_bytes), and a path it cannot write (a folder of that name, a file where a folder should be) is a
    TaskError naming the path, not NotADirectoryError or IsADirectoryError, with nothing left beside it."""
    rng = np.random.default_rng(7)
    truth = Counterfactuals(0.5, rng.random((4, 6)) < 0.5, rng.normal(size=(4, 1, 2)))
    deep = tmp_path / "new" / "deeper" / "truth.npz"
    assert truth.save(deep) == deep
    np.testing.assert_array_equal(Counterfactuals.load(deep).measurements, truth.measurements)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder.npz").mkdir()
    for path, reason in ((tmp_path / "a-file" / "truth.npz", "Not a directory"),
                         (tmp_path / "a-folder.npz", "Is a directory")):  # fmt: skip
        with pytest.raises(TaskError, match=rf"^Writing {re.escape(str(path))} failed \({reason}\); choose a path"):
            truth.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder.npz", "new"]
    assert list((tmp_path / "a-folder.npz").iterdir()) == []
