"""LDS, subset removal and further training on training functions whose counterfactuals are known.

``ridge_retrain`` fits ridge regression on the kept rows (a real, cheap training procedure whose
answer moves smoothly with the data); ``linear_retrain`` measures a sum of known per-example
effects, so the exact attribution is known in closed form.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from source_proj import NumericalError, TaskError
from source_proj import evaluation as ev
from source_proj.evaluation.lds import retrain_seed
from source_proj.query.attributor import StageRows

N, Q = 40, 20
ROWS = [StageRows("main", 0, N)]
_rng = np.random.default_rng(0)
X = _rng.normal(size=(N, 3))
Y = X @ np.array([1.0, -2.0, 0.5]) + 0.5 * _rng.normal(size=N)
XQ = _rng.normal(size=(Q, 3))
EFFECTS = _rng.normal(size=(Q, N))


def ridge_retrain(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """Ridge fit on the kept rows; the query predictions, plus a little seed-dependent 'training noise'."""
    idx = keep["main"]
    theta = np.linalg.solve(X[idx].T @ X[idx] + 1.0 * np.eye(3), X[idx].T @ Y[idx])
    return XQ @ theta + 1e-3 * np.random.default_rng(seed).normal(size=Q)


def linear_retrain(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """Measurement = 1 + Σ_{removed z} (−EFFECTS[q, z]), plus seed noise that cancels in differences."""
    removed = np.setdiff1d(np.arange(N), keep["main"])
    return 1.0 - EFFECTS[:, removed].sum(axis=1) + 0.1 * np.random.default_rng(seed).normal(size=Q)


def _datamodel_scores(cache: Path) -> np.ndarray:
    """The retrained measurements' own linear fit: least squares of measurements on subset masks."""
    fit = ev.lds_ground_truth(
        ridge_retrain, ROWS, cache, ev.LDSArguments(num_subsets=400, repeats=1, seed=99), progress=False
    )
    design = np.hstack([fit.masks.astype(float), np.ones((len(fit.masks), 1))])
    coef, *_ = np.linalg.lstsq(design, fit.mean, rcond=None)
    return coef[:N].T  # [Q, N]


def test_lds_of_the_linear_datamodel_fit_is_near_one_and_of_random_scores_near_zero(tmp_path: Path) -> None:
    args = ev.LDSArguments(num_subsets=60, repeats=2, seed=0, resamples=500)
    truth = ev.lds_ground_truth(ridge_retrain, ROWS, tmp_path / "cache", args, progress=False)
    assert truth.measurements.shape == (60, 2, Q)
    perfect = ev.lds(_datamodel_scores(tmp_path / "cache"), truth, args)
    assert perfect.mean > 0.9, perfect
    assert perfect.low <= perfect.mean <= perfect.high
    # A fixed random score matrix correlates with the truth by chance; over draws the LDS averages 0.
    rng = np.random.default_rng(5)
    random = [ev.lds(rng.normal(size=(Q, N)), truth, args).mean for _ in range(10)]
    assert max(abs(r) for r in random) < 0.15 and abs(np.mean(random)) < 0.05, random
    flipped = ev.lds(-_datamodel_scores(tmp_path / "cache"), truth, args)
    assert flipped.mean < -0.9  # the sign convention matters: helpful must be positive


def test_subsets_have_the_requested_size_and_are_reproducible() -> None:
    masks = ev.sample_subsets(N, 7, 0.25, seed=3)
    assert masks.shape == (7, N) and (masks.sum(axis=1) == 10).all()
    np.testing.assert_array_equal(masks, ev.sample_subsets(N, 7, 0.25, seed=3))
    assert not np.array_equal(masks, ev.sample_subsets(N, 7, 0.25, seed=4))
    with pytest.raises(TaskError, match="alpha"):
        ev.sample_subsets(N, 7, 1.0)
    # α·N = 2.5 and 3.5: a half rounds to the even size, as the docstring says
    assert (ev.sample_subsets(10, 3, 0.25).sum(axis=1) == 2).all()
    assert (ev.sample_subsets(14, 3, 0.25).sum(axis=1) == 4).all()


class _Interrupted(Exception):
    pass


def test_an_interrupted_lds_resumes_without_retraining_finished_models(tmp_path: Path) -> None:
    args = ev.LDSArguments(num_subsets=6, repeats=3, seed=1)
    finished: list[tuple[bytes, int]] = []

    def dies_after_seven(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        if len(finished) == 7:
            raise _Interrupted
        finished.append((keep["main"].tobytes(), seed))
        return ridge_retrain(keep, seed)

    with pytest.raises(_Interrupted):
        ev.lds_ground_truth(dies_after_seven, ROWS, tmp_path / "cache", args, progress=False)
    assert len(list((tmp_path / "cache" / "retrains").glob("*.npy"))) == 7
    assert not list((tmp_path / "cache" / "retrains").glob(".*"))  # no half-written file left behind

    resumed: list[tuple[bytes, int]] = []

    def counting(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        resumed.append((keep["main"].tobytes(), seed))
        return ridge_retrain(keep, seed)

    truth = ev.lds_ground_truth(counting, ROWS, tmp_path / "cache", args, progress=False)
    assert len(resumed) == 6 * 3 - 7
    assert not set(resumed) & set(finished)
    fresh = ev.lds_ground_truth(ridge_retrain, ROWS, tmp_path / "fresh", args, progress=False)
    np.testing.assert_array_equal(truth.measurements, fresh.measurements)
    resumed.clear()
    ev.lds_ground_truth(counting, ROWS, tmp_path / "cache", args, progress=False)
    assert resumed == []  # everything is cached now


@pytest.mark.slow
def test_parallel_workers_give_the_same_ground_truth_as_one_process(tmp_path: Path) -> None:
    one = ev.LDSArguments(num_subsets=5, repeats=2, seed=2, workers=1)
    two = ev.LDSArguments(num_subsets=5, repeats=2, seed=2, workers=2)
    a = ev.lds_ground_truth(ridge_retrain, ROWS, tmp_path / "a", one, progress=False)
    b = ev.lds_ground_truth(ridge_retrain, ROWS, tmp_path / "b", two, progress=False)
    np.testing.assert_array_equal(a.measurements, b.measurements)
    with pytest.raises(TaskError, match="module level"):
        ev.lds_ground_truth(lambda keep, seed: ridge_retrain(keep, seed), ROWS, tmp_path / "c", two, progress=False)


def test_subset_removal_flips_a_query_at_the_first_k_whose_top_effects_exceed_its_margin(tmp_path: Path) -> None:
    ks = (2, 4, 8)
    args = ev.RemovalArguments(ks=ks, seeds=(0, 1, 2), threshold=0.0)
    exact = ev.subset_removal(
        {"exact": EFFECTS, "reversed": -EFFECTS}, linear_retrain, ROWS, tmp_path / "cache", args, progress=False
    )
    # The full-data margin is 1 + seed noise; queries correct under all seeds are evaluated.
    full = np.stack([linear_retrain({"main": np.arange(N)}, s) for s in args.seeds])
    eligible = np.flatnonzero((full > 0).all(axis=0))
    np.testing.assert_array_equal(exact["exact"].queries, eligible)
    noise = full.mean(axis=0) - 1.0
    expected = []
    for q in eligible:
        drops = np.cumsum(np.sort(EFFECTS[q])[::-1])
        expected.append(next((k for k in ks if 1.0 + noise[q] - drops[k - 1] <= 0), 0))
    np.testing.assert_array_equal(exact["exact"].flipped_at, expected)
    np.testing.assert_allclose(exact["exact"].fraction, [np.mean([0 < e <= k for e in expected]) for k in ks])
    assert exact["exact"].fraction[-1] > 0.5
    assert (exact["reversed"].fraction == 0).all()  # removing harmful examples never flips


def test_further_training_gold_standard_recovers_known_effects(tmp_path: Path) -> None:
    examples = [3, 17, 25, 31, 8]
    args = ev.FurtherTrainingArguments(seeds=(0, 1, 2), resamples=200)
    gold = ev.further_training_ground_truth(linear_retrain, ROWS, examples, tmp_path / "cache", args, progress=False)
    np.testing.assert_allclose(gold.scores, EFFECTS[:, examples], atol=1e-12)
    perfect = ev.agreement(EFFECTS, gold, args)
    assert perfect.spearman.mean == pytest.approx(1.0) and perfect.cosine == pytest.approx(1.0)
    opposite = ev.agreement(-EFFECTS, gold, args)
    assert opposite.spearman.mean == pytest.approx(-1.0) and opposite.cosine == pytest.approx(-1.0)


def test_a_retrain_that_returns_the_wrong_shape_or_nan_is_refused(tmp_path: Path) -> None:
    args = ev.LDSArguments(num_subsets=3, repeats=1)
    with pytest.raises(TaskError, match="one measurement per query"):
        ev.lds_ground_truth(lambda k, s: np.zeros((2, 2)), ROWS, tmp_path / "a", args, progress=False)
    with pytest.raises(NumericalError, match="non-finite"):
        ev.lds_ground_truth(lambda k, s: np.full(Q, np.nan), ROWS, tmp_path / "b", args, progress=False)


def test_zero_repeats_or_no_seeds_is_refused_when_the_arguments_are_built() -> None:
    with pytest.raises(TaskError, match=r"^LDSArguments\.repeats is 0; pass a whole number ≥ 1\.$"):
        ev.LDSArguments(num_subsets=3, repeats=0)
    with pytest.raises(TaskError, match=r"^RemovalArguments\.seeds is \(\); pass a non-empty tuple of whole numbers"):
        ev.RemovalArguments((2,), seeds=())
    with pytest.raises(TaskError, match=r"^FurtherTrainingArguments\.seeds is \(\); pass a non-empty tuple of whole"):
        ev.FurtherTrainingArguments(seeds=())


def test_subset_removal_refuses_scores_it_cannot_rank_before_training_anything(tmp_path: Path) -> None:
    """A NaN sorts last, so a NaN score was never removed: the method silently flipped fewer queries."""
    trained: list[int] = []

    def counting(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        trained.append(seed)
        return linear_retrain(keep, seed)

    args = ev.RemovalArguments(ks=(2, 4), seeds=(0,))
    nan = np.where(EFFECTS > 0.5, np.nan, EFFECTS)
    with pytest.raises(TaskError, match="NaN or infinite"):
        ev.subset_removal({"nan": nan}, counting, ROWS, tmp_path, args, progress=False)
    with pytest.raises(TaskError, match="training rows"):
        ev.subset_removal({"narrow": EFFECTS[:, :-1]}, counting, ROWS, tmp_path, args, progress=False)
    # another library's scores read as text, or complex ones, raised numpy's ValueError or lost their imaginary part
    for name, wrong in (("text", EFFECTS.astype(str)), ("complex", EFFECTS + 1j)):
        with pytest.raises(TaskError, match=f"The scores of '{name}' are not a rectangular array of real numbers"):
            ev.subset_removal({name: wrong}, counting, ROWS, tmp_path, args, progress=False)
    assert trained == []
    listed = ev.subset_removal({"list": EFFECTS.tolist()}, linear_retrain, ROWS, tmp_path, args, progress=False)
    exact = ev.subset_removal({"exact": EFFECTS}, linear_retrain, ROWS, tmp_path, args, progress=False)
    np.testing.assert_array_equal(listed["list"].flipped_at, exact["exact"].flipped_at)


def test_subset_removal_refuses_a_k_that_removes_every_training_row(tmp_path: Path) -> None:
    """k ≥ N used to train on nothing (or crash in the user's function) and report it as a removal of k."""
    with pytest.raises(TaskError, match="leaves none to train on"):
        ev.subset_removal(
            {"a": EFFECTS}, linear_retrain, ROWS, tmp_path, ev.RemovalArguments(ks=(2, N)), progress=False
        )


def test_subset_removal_without_a_correct_query_says_so_instead_of_a_nan_curve(tmp_path: Path) -> None:
    args = ev.RemovalArguments(ks=(2,), seeds=(0,), threshold=100.0)
    with pytest.raises(TaskError, match="no correctly classified query"):
        ev.subset_removal({"a": EFFECTS}, linear_retrain, ROWS, tmp_path, args, progress=False)


def test_agreement_refuses_scores_that_are_not_a_query_by_training_row_matrix(tmp_path: Path) -> None:
    args = ev.FurtherTrainingArguments(seeds=(0,), resamples=50)
    gold = ev.further_training_ground_truth(linear_retrain, ROWS, [3, 17, 25], tmp_path, args, progress=False)
    for wrong in (EFFECTS.T, EFFECTS[0], EFFECTS[:, :20]):
        with pytest.raises(TaskError, match=r"not \[queries, training rows\]"):
            ev.agreement(wrong, gold, args)
    for wrong in (EFFECTS.astype(str), EFFECTS + 1j, [[1.0, 2.0], [3.0]]):  # numpy's ValueError, or a silent cast
        with pytest.raises(TaskError, match="The scores are not a rectangular array of real numbers"):
            ev.agreement(wrong, gold, args)
    assert ev.agreement(EFFECTS.tolist(), gold, args).cosine == pytest.approx(1.0)


def test_further_training_refuses_left_out_examples_that_are_not_distinct_row_indices(tmp_path: Path) -> None:
    """A boolean mask became rows 0 and 1 repeated, floats were truncated and duplicates counted twice."""
    args = ev.FurtherTrainingArguments(seeds=(0,))
    mask = np.zeros(N, dtype=bool)
    mask[[3, 17, 25]] = True
    for wrong, match in ((mask, "boolean mask"), ([0.5, 3.7, 5.0], "indices"), ([[3, 4], [5, 6]], "indices"),
                         ([3, 3, 17], "repeat")):
        with pytest.raises(TaskError, match=match):
            ev.further_training_ground_truth(linear_retrain, ROWS, wrong, tmp_path, args, progress=False)
    gold = ev.further_training_ground_truth(linear_retrain, ROWS, np.flatnonzero(mask), tmp_path, args, progress=False)
    np.testing.assert_allclose(gold.scores, EFFECTS[:, [3, 17, 25]], atol=1e-12)


def test_a_retrain_that_returns_something_other_than_numbers_is_refused_in_one_sentence(tmp_path: Path) -> None:
    args = ev.LDSArguments(num_subsets=3, repeats=1)
    with pytest.raises(TaskError, match="not numbers"):
        ev.lds_ground_truth(lambda k, s: ["margin"] * Q, ROWS, tmp_path, args, progress=False)


def test_agreement_over_too_few_left_out_examples_asks_for_more_examples(tmp_path: Path) -> None:
    args = ev.FurtherTrainingArguments(seeds=(0,))
    gold = ev.further_training_ground_truth(linear_retrain, ROWS, [3, 17], tmp_path, args, progress=False)
    with pytest.raises(TaskError, match=r"at least 3 units.* left-out examples"):
        ev.agreement(EFFECTS, gold, args)


def test_agreement_refuses_non_finite_scores_at_the_left_out_examples(tmp_path: Path) -> None:
    """An infinite score ranked first in the Spearman and made the query's cosine NaN, dropped from the mean."""
    args = ev.FurtherTrainingArguments(seeds=(0,), resamples=50)
    gold = ev.further_training_ground_truth(linear_retrain, ROWS, [3, 17, 25], tmp_path, args, progress=False)
    for bad in (np.inf, np.nan):
        scores = EFFECTS.copy()
        scores[1, 17] = bad
        with pytest.raises(TaskError, match=r"query 1 .*NaN or infinite"):
            ev.agreement(scores, gold, args)
    scores = EFFECTS.copy()
    scores[1, 0] = np.inf  # not a left-out example: not compared, so not refused
    assert ev.agreement(scores, gold, args).cosine == pytest.approx(1.0)


def test_subset_removal_of_a_loss_task_removes_its_most_negative_scores_the_helpful_ones(tmp_path: Path) -> None:
    """For a loss or an error (``positive_helps`` False) a positive score means z raised the query's loss, so the
    most helpful examples are the most negative scores; removal used to take the largest, the most harmful ones."""
    ks = (2, 4, 8)
    args = ev.RemovalArguments(ks=ks, seeds=(0, 1, 2), positive_helps=False)
    # A loss-measuring method's scores of the same examples: removing z moves the loss against the margin.
    loss = ev.subset_removal({"loss": -EFFECTS}, linear_retrain, ROWS, tmp_path / "cache", args, progress=False)
    full = np.stack([linear_retrain({"main": np.arange(N)}, s) for s in args.seeds])
    eligible = np.flatnonzero((full > 0).all(axis=0))
    noise = full.mean(axis=0) - 1.0
    expected = []
    for q in eligible:  # brute force: remove the k examples whose removal lowers the margin most
        drops = np.cumsum(np.sort(EFFECTS[q])[::-1])
        expected.append(next((k for k in ks if 1.0 + noise[q] - drops[k - 1] <= 0), 0))
    np.testing.assert_array_equal(loss["loss"].queries, eligible)
    np.testing.assert_array_equal(loss["loss"].flipped_at, expected)
    assert loss["loss"].fraction[-1] > 0.5


def test_agreement_refuses_scores_over_other_training_rows_than_the_gold_standard(tmp_path: Path) -> None:
    """Scores of a method fitted on other rows (more, or fewer but past the left-out examples) used to be compared
    column by column as if their row i were the gold standard's."""
    args = ev.FurtherTrainingArguments(seeds=(0,), resamples=50)
    gold = ev.further_training_ground_truth(linear_retrain, ROWS, [3, 17, 25], tmp_path, args, progress=False)
    for wrong in (np.hstack([EFFECTS[:, :7], EFFECTS]), EFFECTS[:, :30]):
        with pytest.raises(TaskError, match=f"{wrong.shape[1]} training rows but the gold standard {N}"):
            ev.agreement(wrong, gold, args)
    assert ev.agreement(EFFECTS, gold, args).cosine == pytest.approx(1.0)


def test_the_exact_scores_of_a_loss_measuring_task_have_lds_one(tmp_path: Path) -> None:
    """The LDS correlates Σ_{z∈S} score with the measurement itself, whatever it measures: for a loss, where a
    positive score means z raised it, the exact scores −Δf still have LDS +1 (and their negation −1)."""
    raises = np.random.default_rng(21).normal(size=(Q, N))  # how much each kept example raises each query's loss

    def loss_retrain(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        return 2.0 + raises[:, keep["main"]].sum(axis=1)

    args = ev.LDSArguments(num_subsets=20, repeats=1, resamples=50)
    truth = ev.lds_ground_truth(loss_retrain, ROWS, tmp_path, args, progress=False)
    removed = {z: loss_retrain({"main": np.delete(np.arange(N), z)}, 0) - loss_retrain({"main": np.arange(N)}, 0)
               for z in range(N)}  # fmt: skip
    exact = -np.stack([removed[z] for z in range(N)], axis=1)  # score = −Δf, [Q, N]
    np.testing.assert_allclose(exact, raises, atol=1e-12)
    assert ev.lds(exact, truth, args).mean == pytest.approx(1.0)
    assert ev.lds(-exact, truth, args).mean == pytest.approx(-1.0)


def test_subset_removal_trains_a_removal_two_methods_share_once(tmp_path: Path) -> None:
    """Retrains are shared between methods that remove the same examples; within one k every method's job was
    trained again, so two methods that agree doubled the work."""
    trained: list[tuple[bytes, int]] = []

    def counting(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        trained.append((keep["main"].tobytes(), seed))
        return linear_retrain(keep, seed)

    args = ev.RemovalArguments(ks=(2, 4), seeds=(0, 1))
    both = ev.subset_removal({"a": EFFECTS, "b": EFFECTS.copy()}, counting, ROWS, tmp_path, args, progress=False)
    assert len(trained) == len(set(trained))  # every (kept subset, seed) trained once
    np.testing.assert_array_equal(both["a"].flipped_at, both["b"].flipped_at)
    alone = ev.subset_removal({"a": EFFECTS}, linear_retrain, ROWS, tmp_path / "alone", args, progress=False)
    np.testing.assert_array_equal(both["a"].flipped_at, alone["a"].flipped_at)


def test_lds_arguments_the_lds_would_refuse_are_refused_when_built_not_after_the_retrains(tmp_path: Path) -> None:
    """A bootstrap setting the LDS refuses (a misspelt resample, no resample, a confidence of 95) was refused by
    lds(), after lds_ground_truth had run every retrain with the same arguments."""
    for wrong, match in (({"resample": "query"}, "use one of subsets, queries"), ({"resamples": 0}, "≥ 1"),
                         ({"confidence": 95.0}, r"\(0, 1\)")):  # fmt: skip
        with pytest.raises(TaskError, match=match):
            ev.LDSArguments(**wrong)  # type: ignore[arg-type]


def test_further_training_arguments_the_agreement_would_refuse_are_refused_when_built() -> None:
    """As with LDSArguments: a bad bootstrap setting was refused by agreement(), after the gold standard's retrains."""
    for wrong, match in (({"resamples": 0}, "≥ 1"), ({"confidence": 95.0}, r"\(0, 1\)")):
        with pytest.raises(TaskError, match=match):
            ev.FurtherTrainingArguments(**wrong)  # type: ignore[arg-type]


def test_every_subset_and_repeat_is_retrained_with_its_own_seed(tmp_path: Path) -> None:
    """Retrain seeds are independent across subsets and repeats (``retrain_seed``): a seed shared between subsets
    would give their retrains the same noise. Oracle: the seeds the training function saw, one per (subset, repeat)."""
    seen: list[tuple[bytes, int]] = []

    def recording(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        seen.append((keep["main"].tobytes(), seed))
        return linear_retrain(keep, seed)

    args = ev.LDSArguments(num_subsets=5, repeats=3, seed=2)
    truth = ev.lds_ground_truth(recording, ROWS, tmp_path, args, progress=False)
    assert len(seen) == 15 and len({seed for _, seed in seen}) == 15
    expected = {(np.flatnonzero(truth.masks[m]).tobytes(), retrain_seed(2, m, r)) for m in range(5) for r in range(3)}
    assert set(seen) == expected


# Query 0 is wrong on the full data, query 3 under seed 1 (0.1 − 0.25): only queries 1 and 2 are evaluated.
_BASE = np.array([-1.0, 3.0, 2.0, 0.1])
_EFFECTS = np.array([[0, 0, 0, 0, 0, 5.0], [2, 1, 0, 0, 0, 0], [0, 0, 0, 1.5, 1, 0], [0, 0, 0, 0, 0, 0]])


def _exact_retrain(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """Margin = base − Σ_{removed z} effect, ± 0.25 by seed (0: +, 1: −), so the mean over both seeds is exact."""
    removed = np.setdiff1d(np.arange(6), keep["main"])
    return _BASE - _EFFECTS[:, removed].sum(axis=1) + (0.25 if seed == 0 else -0.25)


def test_subset_removal_of_an_exact_case_flips_at_the_threshold_and_reads_each_evaluated_querys_own_scores(
    tmp_path: Path,
) -> None:
    """Worked by hand: query 1 loses 2 then 1 (margin 3 → 0, flipped: ≤ the threshold), query 2 loses 1.5 then 1
    (2 → −0.5); both flip at k = 2. A query must be right under every seed to be evaluated, the evaluated queries
    (1, 2) are not their positions (0, 1) among the evaluated, and the mean is over every seed (the first alone is
    0.25 above it)."""
    args = ev.RemovalArguments(ks=(1, 2, 3), seeds=(0, 1))
    result = ev.subset_removal({"exact": _EFFECTS}, _exact_retrain, [StageRows("main", 0, 6)], tmp_path, args,
                               progress=False)["exact"]  # fmt: skip
    np.testing.assert_array_equal(result.queries, [1, 2])
    np.testing.assert_array_equal(result.flipped_at, [2, 2])
    np.testing.assert_array_equal(result.fraction, [0.0, 1.0, 1.0])


def test_the_lds_report_of_one_method_at_two_alphas_has_a_column_each_and_no_ceiling_from_one_retrain(
    tmp_path: Path,
) -> None:
    """Each α's column holds that α's LDS as format_table prints it; with one retrain per subset there is no ceiling
    and, with one method, no best and no difference."""
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(6, 30))
    truths = []
    for alpha in (0.3, 0.7):
        masks = rng.random((9, 30)) < alpha
        truths.append(ev.Counterfactuals(alpha, masks, (masks @ weights.T)[:, None, :] + rng.normal(size=(9, 1, 6))))
    scores = {"noisy": weights + rng.normal(size=weights.shape)}
    results = ev.compare(scores, truths)
    page = ev.lds_report(scores, truths, results, tmp_path / "r.html").read_text()
    row = re.search(r"<tr><td>noisy</td>(.*?)</tr>", page).group(1)
    first, second = (str(r) for r in results["noisy"])
    assert re.findall(r"<td class='num'>(.*?)</td>", row) == [first, "", second, ""]
    assert page.count("none: one retrain per subset") == 2 and ">best<" not in page
    assert re.search(r"<td>α \(fraction kept\)</td><td>0.3, 0.7</td>", page)
