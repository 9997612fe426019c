"""The linear datamodeling score (Park et al. 2023, as in the SOURCE paper).

1. Sample M subsets S_m of the attributed training rows, each of ⌊αN⌉ examples drawn uniformly.
2. Retrain on each subset R times with fresh randomness; record the measurement of every query;
   the ground truth is its mean over the R runs, ``[M, Q]``.
3. For each query, the Spearman correlation over the M subsets between the group prediction
   Σ_{z∈S_m} score(q, z) and the ground truth; the LDS is its mean over queries, with a 95%
   bootstrap interval that resamples the subsets (or the queries, or both).

Two methods are compared on one ground truth by ``lds_difference``: the per-query difference of their correlations,
with a paired interval (the same resampled subsets and queries for both).

The ground truth does not depend on the attribution method: compute it once and score every
method (and ensemble) against it. Retrains are cached (see retrain.py), so an interrupted run resumes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from source_proj.errors import TaskError, check_choice, check_real, check_whole, first_line
from source_proj.evaluation.batched import BatchedRetrain
from source_proj.evaluation.metrics import (
    Correlation,
    bootstrap_ci,
    check_bootstrap,
    correlate,
    group_predictions,
    pearson,
    per_query_spearman,
    rank,
    real_array,
    spearman,
)
from source_proj.evaluation.retrain import Job, RetrainCache, RetrainFunction, keep_from_mask, run_retrains
from source_proj.figures import pyplot, save_figure
from source_proj.query.attributor import StageRows
from source_proj.store.durable import atomic_write_bytes

MIN_SUBSETS = 3
"""The fewest subsets the LDS ranks its predictions over."""


@dataclass(frozen=True)
class LDSArguments:
    """How the LDS ground truth is built and summarised.

    Attributes:
        alpha: fraction of the training rows kept in each subset (the paper reports α = 0.5).
        num_subsets: M, the number of subsets (the paper uses 100).
        repeats: R ≥ 1, trainings per subset with different seeds, averaged (the paper: 5–100).
        seed: seed of the subset sampling and of the retrain seeds.
        workers: parallel worker processes for retraining (1 = in this process).
        threads_per_worker: torch threads per worker process.
        resamples: bootstrap resamples of the confidence interval (at least 1).
        confidence: coverage of the interval.
        resample: what the bootstrap resamples: ``"subsets"`` (the SOURCE paper's interval), ``"queries"`` (how
            much the LDS depends on which queries were drawn) or ``"both"`` (subsets and queries drawn independently
            in every resample: both sources of variance, a slightly conservative interval).

    A field outside its range (a bootstrap setting the LDS cannot use, an α outside (0, 1), fewer than 3 subsets) is
    refused when the arguments are built, before any retrain.
    """

    alpha: float = 0.5
    num_subsets: int = 100
    repeats: int = 5
    seed: int = 0
    workers: int = 1
    threads_per_worker: int = 1
    resamples: int = 1000
    confidence: float = 0.95
    resample: Literal["subsets", "queries", "both"] = "subsets"

    def __post_init__(self) -> None:
        # Refused here, not in lds(): the same arguments usually run the retrains first, for hours.
        check_real("LDSArguments.alpha", self.alpha, 0.0, 1.0, closed=False)
        check_whole("LDSArguments.num_subsets", self.num_subsets, MIN_SUBSETS)
        for field, minimum in (("repeats", 1), ("seed", 0), ("workers", 1), ("threads_per_worker", 1)):
            check_whole(f"LDSArguments.{field}", getattr(self, field), minimum)
        check_choice("LDSArguments.resample", self.resample, ("subsets", "queries", "both"))
        check_bootstrap(self.resamples, self.confidence, "LDSArguments.")


def sample_subsets(num_rows: int, num_subsets: int, alpha: float, seed: int = 0) -> np.ndarray:
    """M random subsets of ⌊α·N⌉ rows each, as a boolean mask ``[M, N]`` (reproducible from the seed).

    α·N is rounded to the nearest integer, a half to the even one (Python's ``round``: α = 0.25 of 10 rows keeps
    2, of 14 rows 4). Subsets are drawn independently, so the same subset may be drawn twice when α·N is near 0
    or N.
    """
    check_whole("num_rows", num_rows)
    check_whole("num_subsets", num_subsets, MIN_SUBSETS)
    check_real("alpha", alpha, 0.0, 1.0, closed=False)
    check_whole("seed", seed, 0)
    size = round(alpha * num_rows)
    if not 0 < size < num_rows:
        raise TaskError(f"alpha={alpha} keeps {size} of {num_rows} rows; choose alpha so that 0 < αN < N.")
    rng = np.random.default_rng(np.random.SeedSequence([seed, round(alpha * 1e6)]))
    masks = np.zeros((num_subsets, num_rows), dtype=bool)
    for m in range(num_subsets):
        masks[m, rng.choice(num_rows, size=size, replace=False)] = True
    return masks


def retrain_seed(seed: int, subset: int, repeat: int) -> int:
    """The training seed of repeat r on subset m: independent across subsets and repeats."""
    return int(np.random.SeedSequence([seed, 7919, subset, repeat]).generate_state(1)[0] >> 1)


@dataclass(frozen=True)
class Counterfactuals:
    """The LDS ground truth at one α.

    Attributes:
        alpha: the kept fraction.
        masks: boolean ``[M, N]`` kept rows of each subset.
        measurements: ``[M, R, Q]`` finite measurement of each query after each retrain.

    A ground truth of another layout is refused when built.
    """

    alpha: float
    masks: np.ndarray
    measurements: np.ndarray

    def __post_init__(self) -> None:
        check_real("Counterfactuals.alpha", self.alpha, 0.0, 1.0, closed=False)
        masks, measurements = np.asarray(self.masks), real_array(self.measurements, "measurements")
        if measurements.ndim != 3:
            raise TaskError(
                f"Measurements of shape {measurements.shape} are not [M, R, Q] (subsets, repeats, queries); with one "
                "retrain per subset pass measurements[:, None, :]."
            )
        if measurements.shape[1] == 0:
            raise TaskError(
                f"The measurements of shape {measurements.shape} hold no retrain of any subset (R = 0 in [M, R, Q]); "
                "the ground truth is their mean over at least one retrain."
            )
        if masks.ndim != 2 or not (masks.dtype == bool or np.isin(masks, (0, 1)).all()):
            raise TaskError(
                f"Subset masks must be boolean [M, N] (True where a row is kept), not {masks.dtype} of shape "
                f"{masks.shape}."
            )
        if masks.shape[0] != measurements.shape[0]:
            raise TaskError(
                f"The masks describe {masks.shape[0]} subsets but the measurements {measurements.shape[0]} subsets; "
                "give one mask per retrained subset."
            )
        if not np.isfinite(measurements).all():
            raise TaskError("The measurements contain NaN or infinite values; drop or retrain those subsets.")
        if masks.shape[0] < MIN_SUBSETS:
            raise TaskError(
                f"The ground truth holds {masks.shape[0]} subsets; a rank correlation over subsets needs at least "
                f"{MIN_SUBSETS} (the SOURCE paper uses 100)."
            )
        object.__setattr__(self, "masks", masks)
        object.__setattr__(self, "measurements", measurements)

    @property
    def mean(self) -> np.ndarray:
        """``[M, Q]`` measurements averaged over the repeats."""
        return self.measurements.mean(axis=1)

    def save(self, path: str | Path) -> Path:
        """Write the ground truth to an ``.npz`` file (``alpha``, ``masks``, ``measurements``), whole or not at all,
        creating its folder as the library's other writers do; ``Counterfactuals.load`` reads it back, and so does
        numpy. Returns the path. A path that cannot be written (a folder there, a file where a folder should be, no
        permission) is one sentence."""
        path = Path(path)
        if path.suffix != ".npz":
            raise TaskError(f"{path.name} does not end in .npz; a ground truth is saved as a numpy .npz archive.")
        buffer = io.BytesIO()
        np.savez(buffer, alpha=np.float64(self.alpha), masks=self.masks, measurements=self.measurements)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as err:
            raise TaskError(f"Writing {path} failed ({err.strerror or err}); choose a path you can write to.") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> Counterfactuals:
        """A ground truth from an ``.npz`` file: ``masks`` ``[M, N]`` (True where a training row was kept),
        ``measurements`` ``[M, R, Q]`` (or ``[M, Q]``: one retrain per subset) and, optionally, ``alpha`` (the mean
        kept fraction of the masks where absent). ``save`` writes one; so may your own retraining code, with
        ``np.savez``. A file without these arrays is refused in one sentence, and their contents as ``__init__``
        refuses them."""
        try:
            archive = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise TaskError(f"{path} does not exist; give the .npz file of your ground truth.") from None
        except (OSError, ValueError):  # not a file numpy wrote (numpy's own message speaks of pickles)
            raise TaskError(f"{path} is not a numpy .npz archive; save one with np.savez.") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise TaskError(f"{path} holds one array, not an .npz archive of masks and measurements; use np.savez.")
        with archive:
            missing = sorted({"masks", "measurements"} - set(archive.files))
            if missing:
                raise TaskError(
                    f"{path} holds {sorted(archive.files) or 'no arrays'}, not {' and '.join(missing)}; a ground truth "
                    "file holds masks [M, N] and measurements [M, R, Q] (np.savez(path, masks=…, measurements=…))."
                )
            try:
                masks, measurements = archive["masks"], archive["measurements"]
                alpha = archive["alpha"] if "alpha" in archive.files else None
            except ValueError as err:  # an array of Python objects, which only a pickle could read
                raise TaskError(f"{path} holds arrays numpy cannot read without pickle ({first_line(err)}); save "
                                "numbers and booleans.") from None  # fmt: skip
        if measurements.ndim == 2:
            measurements = measurements[:, None, :]
        if alpha is None:  # a label: the mean kept fraction (masks that are not numbers are refused below)
            alpha = np.float64(masks.mean() if masks.dtype.kind in "biuf" and masks.size else 0.5)
        if alpha.shape != () or alpha.dtype.kind not in "iuf":
            raise TaskError(f"{path} holds an alpha of shape {alpha.shape} ({alpha.dtype}); save a single number.")
        return cls(float(alpha), masks, measurements)

    def select(self, queries: Sequence[int]) -> Counterfactuals:
        """The same ground truth restricted to some queries (columns), each named once."""
        chosen = [int(q) for q in queries]
        count = self.measurements.shape[2]
        outside = [q for q in chosen if not 0 <= q < count]
        if outside:
            raise TaskError(f"The ground truth measures queries 0 to {count - 1}; select among them, not {outside[0]}.")
        if len(set(chosen)) != len(chosen):
            raise TaskError("The selection names a query more than once, which the LDS mean would count twice.")
        return Counterfactuals(self.alpha, self.masks, self.measurements[:, :, chosen])


def lds_ground_truth(
    retrain: RetrainFunction,
    rows: Sequence[StageRows],
    cache_dir: str | Path,
    args: LDSArguments = LDSArguments(),
    *,
    progress: bool = True,
) -> Counterfactuals:
    """Retrain on M subsets × R seeds (cached, resumable, in parallel) and collect the measurements.

    Args:
        retrain: ``retrain(keep, seed) -> [Q]`` (see retrain.py).
        rows: the attributed training rows (``Attributor.rows``): subsets are drawn over them.
        cache_dir: where finished retrains are kept (one directory per training function).
        args: α, M, R, seeds, workers.
    """
    if isinstance(retrain, BatchedRetrain):
        retrain.check_rows(rows)
    total = sum(r.size for r in rows)
    masks = sample_subsets(total, args.num_subsets, args.alpha, args.seed)
    jobs = [
        Job(keep_from_mask(rows, masks[m]), retrain_seed(args.seed, m, r))
        for m in range(args.num_subsets)
        for r in range(args.repeats)
    ]
    values = run_retrains(
        retrain,
        jobs,
        RetrainCache(cache_dir),
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        progress=progress,
        desc=f"LDS retrain α={args.alpha:g}",
    )
    return Counterfactuals(args.alpha, masks, values.reshape(args.num_subsets, args.repeats, -1))


def _checked_scores(scores: object, truth: Counterfactuals) -> np.ndarray:
    """``scores`` as a float64 ``[Q, N]`` matrix of the ground truth's queries, or one sentence saying what to pass."""
    scores = real_array(scores, "scores")
    if scores.ndim != 2:
        raise TaskError(
            f"Scores of shape {scores.shape} are not [queries, training rows]; for a single query pass scores[None]."
        )
    if scores.shape[0] != truth.measurements.shape[2]:
        if scores.shape == (truth.masks.shape[1], truth.measurements.shape[2]):
            raise TaskError(
                f"The scores of shape {scores.shape} are [training rows, queries], the transpose of the [Q, N] the "
                "ground truth needs; pass scores.T."
            )
        raise TaskError(
            f"The scores cover {scores.shape[0]} queries but the ground truth measures {truth.measurements.shape[2]}; "
            "score the same queries the retrain function measures."
        )
    return scores


def lds(scores: np.ndarray, truth: Counterfactuals, args: LDSArguments = LDSArguments()) -> Correlation:
    """The LDS of a score matrix ``[Q, N]`` (score = −Δf: positive = z raised the query's measurement) against a
    ground truth.

    Returns the mean per-query Spearman correlation with its bootstrap interval (over subsets, over queries or over
    both, as ``args.resample`` says) and the per-query values.
    """
    predicted = group_predictions(_checked_scores(scores, truth), truth.masks)
    actual = truth.mean
    if args.resample == "subsets":
        return correlate(predicted, actual, resamples=args.resamples, confidence=args.confidence, seed=args.seed)
    per_query = per_query_spearman(predicted, actual)
    if args.resample == "queries":
        interval = query_interval(per_query, args)
    else:
        interval = _two_way_interval(
            lambda idx: spearman(predicted[idx], actual[idx], axis=1), per_query, actual.shape[0], args
        )
    return Correlation(float(np.nanmean(per_query)), *interval, per_query, actual.shape[0], args.confidence)


@dataclass(frozen=True)
class Difference:
    """LDS(a) − LDS(b) on one ground truth, with a paired bootstrap interval.

    Attributes:
        mean: mean over queries of the per-query difference of the two Spearman correlations (over the queries
            where both are defined; equal to the difference of the two LDS when no query is left out).
        low: lower end of the paired bootstrap interval: each resample draws the same subsets (and queries) for
            both methods, so what they share (a query's difficulty, a subset's noise) cancels.
        high: upper end of that interval.
        per_query: ``[Q]`` difference of each query's correlations (NaN where either is undefined).
        units: number of subsets M.

    The difference is significant at the interval's confidence where the interval excludes 0 (``significant``).
    """

    mean: float
    low: float
    high: float
    per_query: np.ndarray
    units: int

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return self.low > 0.0 or self.high < 0.0

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


Comparison = tuple[tuple[float, float] | None, str, dict[str, Difference]]
"""One ground truth's noise ceiling ``(r, √ρ)`` (``None`` without one), best method, and each other method's paired
difference from the best (``paired_comparison``)."""


def lds_difference(
    a: np.ndarray, b: np.ndarray, truth: Counterfactuals, args: LDSArguments = LDSArguments()
) -> Difference:
    """LDS(a) − LDS(b) of two score matrices ``[Q, N]`` (score = −Δf) on the same ground truth and queries, with a
    paired bootstrap interval over what ``args.resample`` names (subsets, queries or both).

    Unlike two separate intervals, the paired one answers whether a beats b on these subsets and queries: two
    methods' LDS intervals may overlap while their difference is significant, or be disjoint while it is not.
    """
    actual = truth.mean
    first = group_predictions(_checked_scores(a, truth), truth.masks)
    second = group_predictions(_checked_scores(b, truth), truth.masks)

    def per_resample(idx: np.ndarray) -> np.ndarray:
        truth_ranks = rank(actual[idx], axis=1)  # ranked once for both methods: Spearman is Pearson of the ranks
        return pearson(rank(first[idx], axis=1), truth_ranks, axis=1) - pearson(
            rank(second[idx], axis=1), truth_ranks, axis=1
        )

    per_query = spearman(first, actual, axis=0) - spearman(second, actual, axis=0)
    if not np.isfinite(per_query).any():
        raise TaskError(
            "No query has a defined correlation under both methods (a constant prediction or ground truth), so "
            "there is no difference to measure."
        )
    undefined = int(np.isnan(per_query).sum())
    if undefined:
        warnings.warn(
            f"{undefined} of {per_query.size} queries have a constant prediction under one method or a constant "
            f"ground truth, so no difference (NaN in per_query); the mean is over the other "
            f"{per_query.size - undefined}.",
            stacklevel=2,
        )
    if args.resample == "queries":
        interval = query_interval(per_query, args)
    elif args.resample == "both":
        interval = _two_way_interval(per_resample, per_query, actual.shape[0], args)
    else:
        interval = bootstrap_ci(
            lambda idx: _row_means(per_resample(idx)),
            actual.shape[0],
            resamples=args.resamples,
            confidence=args.confidence,
            seed=args.seed,
        )
    return Difference(float(np.nanmean(per_query)), *interval, per_query, actual.shape[0])


def _row_means(values: np.ndarray) -> np.ndarray:
    """The mean of each row of ``[B, Q]`` over its finite entries (NaN for a row without one, no warning)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=1)


def _two_way_interval(
    per_resample: Callable[[np.ndarray], np.ndarray], per_query: np.ndarray, subsets: int, args: LDSArguments
) -> tuple[float, float]:
    """Bootstrap interval of a mean over queries that resamples the subsets and, independently, the queries.

    ``per_resample`` maps resampled subset indices ``[B, M]`` (M = ``subsets``) to per-query values ``[B, Q]``;
    ``per_query`` is its value on all subsets, whose undefined (NaN) queries are left out before the queries are
    drawn. Each resample draws the subsets with the stream of ``args.seed`` (as the subsets-only interval does) and
    the queries with another stream of it.
    """
    defined = np.flatnonzero(np.isfinite(per_query))
    if defined.size < 2:
        raise TaskError("A bootstrap over queries needs at least two queries with a defined correlation.")
    queries = np.random.default_rng(np.random.SeedSequence([args.seed, 1]))

    def statistic(idx: np.ndarray) -> np.ndarray:
        drawn = queries.integers(0, defined.size, size=(idx.shape[0], defined.size))
        return _row_means(np.take_along_axis(per_resample(idx)[:, defined], drawn, axis=1))

    return bootstrap_ci(statistic, subsets, resamples=args.resamples, confidence=args.confidence, seed=args.seed)


def query_interval(per_query: np.ndarray, args: LDSArguments = LDSArguments()) -> tuple[float, float]:
    """Bootstrap interval of the mean of per-query values ``[Q]`` (NaNs left out), resampling the queries.

    Given the difference of two methods' per-query correlations it is a paired interval: the LDS
    difference on the same queries, with their shared difficulty cancelled.
    """
    values = np.asarray(per_query, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 2:
        raise TaskError("A bootstrap over queries needs at least two queries with a defined correlation.")
    return bootstrap_ci(
        lambda idx: values[idx].mean(axis=1),
        values.size,
        resamples=args.resamples,
        confidence=args.confidence,
        seed=args.seed,
    )


def split_half_reliability(truth: Counterfactuals) -> tuple[float, float]:
    """How reproducible a ground truth is, and the LDS ceiling that implies: ``(r, √ρ)``.

    r is the split-half reliability: the Spearman correlation over the subsets between the mean of the first
    h = ⌊R/2⌋ retrains and the mean of the next h, averaged over the queries where it is defined. Spearman–Brown
    extrapolates it from h retrains to the mean of all R, ρ = k·r / (1 + (k − 1)·r) with k = R/h (2r/(1 + r) for
    an even R), and a perfect predictor of the expected measurement correlates with that noisy mean at about
    √ρ (0 where r ≤ 0): quote it beside an LDS as its ceiling. Needs R ≥ 2 retrains per subset.
    """
    repeats = truth.measurements.shape[1]
    if repeats < 2:
        raise TaskError(
            f"A split-half reliability needs at least two retrains per subset to split, not {repeats}; retrain each "
            "subset more than once (LDSArguments.repeats)."
        )
    half = repeats // 2
    first = truth.measurements[:, :half].mean(axis=1)
    second = truth.measurements[:, half : 2 * half].mean(axis=1)
    per_query = spearman(first, second, axis=0)
    if not np.isfinite(per_query).any():
        raise TaskError("Every query's measurement is constant over the subsets, so no reliability is defined.")
    r = float(np.nanmean(per_query))
    k = repeats / half
    return r, (float(np.sqrt(k * r / (1.0 + (k - 1.0) * r))) if r > 0 else 0.0)


def compare(
    scores: Mapping[str, np.ndarray], truths: Sequence[Counterfactuals], args: LDSArguments = LDSArguments()
) -> dict[str, list[Correlation]]:
    """LDS of every method (name → ``[Q, N]`` scores, score = −Δf) at every α of ``truths``: name → one
    ``Correlation`` per ground truth, in their order."""
    if not isinstance(scores, Mapping):
        raise TaskError(
            f"compare takes the scores as a mapping {{method name: [Q, N] scores}}, not a {type(scores).__name__}; "
            "pass {'source': scores}, or call lds for one method."
        )
    if isinstance(truths, Counterfactuals) or not isinstance(truths, Sequence):
        raise TaskError(
            f"compare takes a sequence of ground truths (one per α), not a {type(truths).__name__}; pass [truth]."
        )
    return {name: [lds(s, t, args) for t in truths] for name, s in scores.items()}


def _check_alphas(results: Mapping[str, Sequence[Correlation]], alphas: Sequence[float]) -> None:
    for name, rs in results.items():
        if len(rs) != len(alphas):
            raise TaskError(
                f"{name!r} has {len(rs)} LDS results for {len(alphas)} values of α; give one result per α, in the "
                "order of the ground truths passed to compare()."
            )


def _coverage(results: Mapping[str, Sequence[Correlation]]) -> str:
    """``"95%"``: the intervals' coverage, or each one where the results were drawn at several (``"90%/95%"``)."""
    levels = sorted({r.confidence for rs in results.values() for r in rs})
    return "/".join(f"{c:.0%}" for c in levels) if levels else "95%"


def format_table(results: Mapping[str, Sequence[Correlation]], alphas: Sequence[float]) -> str:
    """A plain-text table: one row per method, one column per α, ``LDS [95% CI]`` (the results' coverage)."""
    _check_alphas(results, alphas)
    head = ["method", *(f"LDS α={a:g} [{_coverage(results)} CI]" for a in alphas)]
    body = [[name, *(str(r) for r in rs)] for name, rs in results.items()]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_comparison(
    scores: Mapping[str, np.ndarray],
    truths: Sequence[Counterfactuals],
    results: Mapping[str, Sequence[Correlation]],
    args: LDSArguments = LDSArguments(),
    comparison: Sequence[Comparison] | None = None,
) -> str:
    """What a reviewer asks beside ``format_table``, one block per ground truth: its split-half noise ceiling (or why
    there is none) and, for several methods, each one's paired LDS difference from the best (``lds_difference``),
    marked ``*`` where its interval excludes 0.

    Args:
        scores: method name → ``[Q, N]`` scores, as given to ``compare``.
        truths: the ground truths, one per α, as given to ``compare``.
        results: what ``compare`` returned for them (the best method is the one of highest LDS).
        args: the bootstrap settings of the paired intervals (``args.resample``: what they resample).
        comparison: what ``paired_comparison`` returned for the same arguments (default: computed here), so a
            caller that also writes ``lds_report`` bootstraps the differences once.
    """
    comparison = paired_comparison(scores, truths, results, args) if comparison is None else comparison
    blocks = []
    for truth, (ceiling, best, differences) in zip(truths, comparison, strict=True):
        if ceiling is None:
            lines = [f"α={truth.alpha:g}: no noise ceiling with one retrain per subset (retrain each subset twice "
                     "or more for one)."]  # fmt: skip
        else:
            lines = [f"α={truth.alpha:g}: ground truth split-half reliability r = {ceiling[0]:.3f}, so no method's LDS "
                     f"is expected above about {ceiling[1]:.3f} (the noise ceiling √ρ)."]  # fmt: skip
        if differences:
            width = max(len(name) for name in results)
            lines.append(f"paired difference from the best, {best!r} ({args.confidence:.0%} CI; * where it excludes "
                         "0):")  # fmt: skip
            for name, difference in differences.items():
                mark = " *" if difference.significant else ""
                lines.append(f"  {best} − {name.ljust(width)}  {difference}{mark}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def paired_comparison(
    scores: Mapping[str, np.ndarray],
    truths: Sequence[Counterfactuals],
    results: Mapping[str, Sequence[Correlation]],
    args: LDSArguments = LDSArguments(),
) -> list[Comparison]:
    """What ``format_comparison`` prints, as values: per ground truth, its ``split_half_reliability`` ``(r, √ρ)``
    (``None`` with one retrain per subset), the best method (highest LDS) and every other method's paired difference
    from it (``lds_difference(best, other)``; empty for one method). Arguments as ``format_comparison``'s."""
    _check_alphas(results, [t.alpha for t in truths])
    out = []
    for column, truth in enumerate(truths):
        ceiling = split_half_reliability(truth) if truth.measurements.shape[1] >= 2 else None
        best = max(results, key=lambda name: results[name][column].mean)
        differences = {name: lds_difference(scores[best], scores[name], truth, args)
                       for name in results if name != best} if len(results) > 1 else {}  # fmt: skip
        out.append((ceiling, best, differences))
    return out


def plot_lds(
    results: Mapping[str, Sequence[Correlation]], alphas: Sequence[float], path: str | Path, title: str = ""
) -> Path:
    """Save a PNG of LDS against α for each method, with the bootstrap intervals as error bars."""
    _check_alphas(results, alphas)
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, rs in results.items():
        mean = np.array([r.mean for r in rs])
        err = np.array([[r.mean - r.low for r in rs], [r.high - r.mean for r in rs]])
        ax.errorbar(alphas, mean, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xlabel("α (fraction of training data kept)")
    ax.set_ylabel(f"LDS (mean Spearman, {_coverage(results)} CI)")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, path, dpi=120)
