"""Query: FAISS top-k agrees with brute force on the score matrix; results locate the right rows."""

from __future__ import annotations

import shlex
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.query.attributor import StageRows, search

from .conftest import _classification_data, _regression_data, full_batch_run, mlp


def test_faiss_top_k_equals_a_brute_force_sort() -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    index = faiss.IndexFlatIP(16)
    index.add(feats)
    result = search(index, queries, 10, [StageRows("a", 0, 200), StageRows("b", 200, 300)])
    scores = queries @ feats.T
    order = np.argsort(-scores, axis=1)
    assert np.array_equal(result.helpful_ids, order[:, :10])
    assert np.array_equal(result.harmful_ids, order[:, ::-1][:, :10])
    assert np.allclose(result.helpful_scores, np.take_along_axis(scores, order[:, :10], 1), rtol=1e-5)
    assert np.allclose(result.harmful_scores, np.take_along_axis(scores, order[:, ::-1][:, :10], 1), rtol=1e-5)
    assert result.locate(199) == ("a", 199) and result.locate(200) == ("b", 0)
    records = result.records()
    assert len(records) == 2 * 7 * 10
    assert records[0]["kind"] == "helpful" and records[0]["rank"] == 1


def test_top_k_through_the_pipeline_matches_the_score_matrix(fitted_mlp_store: Path) -> None:
    queries = TensorDataset(
        torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0, 1, 2])
    )
    attributor = sp.Attributor(fitted_mlp_store, mlp(), sp.ClassificationTask())
    scores = attributor.scores(queries)
    result = attributor.top_k(queries, 5)
    assert scores.shape == (6, 30)
    assert np.array_equal(result.helpful_ids, np.argsort(-scores, axis=1)[:, :5])
    assert np.array_equal(result.harmful_ids, np.argsort(scores, axis=1)[:, :5])
    # a query batch given as tensors gives the same features as the dataset
    assert torch.allclose(attributor.query_features(queries.tensors), attributor.query_features(queries))


def test_top_k_beyond_the_training_set_is_refused_and_lists_keep_their_sign() -> None:
    index = faiss.IndexFlatIP(2)
    index.add(np.array([[1, 0], [-1, 0], [0, 1]], dtype=np.float32))
    rows = [StageRows("a", 0, 3)]
    query = np.array([[1.0, 0.5]], dtype=np.float32)  # scores 1, -1, 0.5
    for k in (0, 4, 5000):
        with pytest.raises(sp.TaskError, match=rf"top-k {k} is not between 1 and the 3 training examples"):
            search(index, query, k, rows)
    for k in (2.5, "2", True):
        with pytest.raises(sp.TaskError, match=r"top-k must be a whole number of training examples, not"):
            search(index, query, k, rows)
    result = search(index, query, np.int64(3), rows)  # a NumPy count (e.g. min(10, len(a)) of arrays) as an int
    assert result.helpful_ids.tolist() == [[0, 2, 1]] and result.harmful_ids.tolist() == [[1, 2, 0]]
    # Only one example harms the query: neither list may present an example of the other sign.
    assert result.short_lists() == (1, 1)
    assert [(r["kind"], r["index"], r["score"]) for r in result.records()] == [
        ("helpful", 0, 1.0),
        ("helpful", 2, 0.5),
        ("harmful", 1, -1.0),
    ]


def test_a_store_without_a_fitted_method_is_refused(tmp_path: Path, classification_data) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    full_batch_run(
        tmp_path / "run",
        model,
        classification_data,
        lambda o, t: F.cross_entropy(o, t, reduction="none"),
        lr=0.1,
        steps=4,
        save_every=2,
    )
    sp.featurize(
        tmp_path / "run",
        nn.Linear(4, 3),
        sp.ClassificationTask(),
        classification_data,
        tmp_path / "s.sp",
        projection=sp.ProjectionArguments(dim=8),
        progress=False,
    )
    with pytest.raises(sp.StoreError) as err:
        sp.Attributor(tmp_path / "s.sp", nn.Linear(4, 3), sp.ClassificationTask())
    path = sp.Store.open(tmp_path / "s.sp").path
    assert str(err.value) == (
        f"The store at {path} has no fitted method 'source' (it has []); run `source-proj fit {shlex.quote(path)}` "
        "(in Python: sp.fit(store)) first."
    )


def _regression_store(root: Path, data: TensorDataset, seed: int) -> Path:
    """A fitted store (identity projection) of a linear regression trained full-batch from initialisation ``seed``."""
    torch.manual_seed(seed)
    full_batch_run(root / "run", nn.Linear(3, 1), data, lambda o, t: (o.squeeze(-1) - t) ** 2, lr=0.05, steps=6,
                   save_every=3)  # fmt: skip
    store = sp.featurize(root / "run", nn.Linear(3, 1), sp.RegressionTask(), data, root / "s.sp",
                         projection=sp.ProjectionArguments(kind="identity"), progress=False)  # fmt: skip
    sp.fit(store, progress=False)
    return root / "s.sp"


def _check_named_by_meaning(result: sp.QueryResult, scores: np.ndarray, k: int) -> None:
    """A regression's measurement is its error and score = −Δerror: an example helped the query (removing it would
    raise the error) exactly where its score is negative. Oracle: the full score matrix ``scores``."""
    records = result.records()
    assert {r["kind"] for r in records} == {"helpful", "harmful"}
    for r in records:
        assert r["kind"] == ("helpful" if scores[r["query"], r["index"]] < 0 else "harmful"), r
        if r["rank"] == 1:  # the most helpful lowers the error most: the most negative score
            best = np.argmin if r["kind"] == "helpful" else np.argmax
            assert r["index"] == int(best(scores[r["query"]])), r
    np.testing.assert_array_equal(result.helpful_ids, np.argsort(scores, axis=1, kind="stable")[:, :k])
    # the scores by meaning are the scores of those rows: the most negative first for the helpful ones
    np.testing.assert_allclose(result.helpful_scores, np.take_along_axis(scores, result.helpful_ids, 1), rtol=1e-5)
    np.testing.assert_allclose(result.harmful_scores, np.take_along_axis(scores, result.harmful_ids, 1), rtol=1e-5)
    assert (result.helpful_scores[:, 0] < 0).all() and (np.diff(result.helpful_scores, axis=1) >= 0).all()
    assert result.positive_helps is False and result.score_labels == sp.RegressionTask.score_labels
    np.testing.assert_array_equal(result.positive_ids, np.argsort(-scores, axis=1, kind="stable")[:, :k])
    assert (result.helpful_ids == result.negative_ids).all() and (result.harmful_ids == result.positive_ids).all()


def test_a_regression_result_names_the_examples_that_lowered_the_error_helpful(
    tmp_path: Path, regression_data: TensorDataset
) -> None:
    """``records()`` named every positive score "helpful", and the reports headed it so, also where a positive score
    means the example raised the query's error (a regression's, a language model's loss): a silent wrong answer for
    a library user. The result now carries its task's meaning."""
    from source_proj.query.text_report import text_report

    store = _regression_store(tmp_path, regression_data, 0)
    queries = TensorDataset(*(t[:4] for t in regression_data.tensors))
    attributor = sp.Attributor(store, nn.Linear(3, 1), sp.RegressionTask())
    scores = attributor.scores(queries)
    result = attributor.top_k(queries, 3)
    _check_named_by_meaning(result, scores, 3)
    page = text_report(result, ["q"] * 4, lambda stage, i: f"example {i}", tmp_path / "r.html").read_text()
    raised, lowered = sp.RegressionTask.score_labels
    assert f"<h3 class='neg'>{raised}</h3>" in page.replace("&#x27;", "'")  # a positive score: in red
    assert f"<h3 class='pos'>{lowered}</h3>" in page.replace("&#x27;", "'")
    assert "helpful" not in page


def test_an_ensemble_result_carries_its_tasks_meaning(tmp_path: Path, regression_data: TensorDataset) -> None:
    stores = [_regression_store(tmp_path / str(seed), regression_data, seed) for seed in (0, 1)]
    queries = TensorDataset(*(t[:4] for t in regression_data.tensors))
    ensemble = sp.Ensemble.open(stores, nn.Linear(3, 1), sp.RegressionTask())
    _check_named_by_meaning(ensemble.top_k(queries, 3), ensemble.scores(queries), 3)
    attributors = [sp.Attributor(s, nn.Linear(3, 1), sp.RegressionTask()) for s in stores]
    attributors[1].positive_helps = True  # as a task that says otherwise would
    with pytest.raises(sp.TaskError, match="disagree on what a score's sign means"):
        sp.Ensemble(attributors)


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_a_batch_size_that_is_not_a_count_is_refused_before_any_work(fitted_mlp_store: Path, size: object) -> None:
    """0 raised ZeroDivisionError at the first query, −1 and 2.5 the data loader's ValueError; token_scores' 0 was
    reported as text examples missing."""
    with pytest.raises(sp.TaskError, match=rf"^Attributor's batch_size is {size!r}; pass a whole number ≥ 1\.$"):
        sp.Attributor(fitted_mlp_store, mlp(), sp.ClassificationTask(), batch_size=size)  # type: ignore[arg-type]
    attributor = sp.Attributor(fitted_mlp_store, mlp(), sp.ClassificationTask(), progress=False)
    data = _classification_data()
    with pytest.raises(sp.TaskError, match=rf"^token_scores's batch_size is {size!r}; pass a whole number ≥ 1\.$"):
        sp.token_scores(attributor, [data[0]], data, [0], batch_size=size, progress=False)  # type: ignore[arg-type]


def test_aligned_blocks_set_members_chunked_differently_side_by_side() -> None:
    """The ensemble's index reads its models' stores together; their chunks need not end at the same rows."""
    from source_proj.query.ensemble import aligned_blocks

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((10, 2)).astype(np.float32), rng.standard_normal((10, 3)).astype(np.float32)

    def chunks(x: np.ndarray, size: int) -> list[tuple[int, np.ndarray]]:
        return [(i, x[i : i + size]) for i in range(0, len(x), size)]

    blocks = list(aligned_blocks([chunks(a, 4), chunks(b, 3)], 0.5))
    assert [first for first, _ in blocks] == [0, 3, 4, 6, 8, 9]  # cut where either member's chunk ends
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in blocks]), np.concatenate([a, b], axis=1) * 0.5)
    with pytest.raises(sp.TaskError, match=r"^The ensemble's members hold different numbers of training rows"):
        list(aligned_blocks([chunks(a, 4), chunks(b[:7], 3)], 0.5))


@pytest.fixture(scope="module")
def ensemble_stores(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two fitted regression stores whose feature chunks end at different rows (5 and 4 rows a chunk)."""
    root = tmp_path_factory.mktemp("ensemble")
    regression_data = _regression_data()
    stores = []
    for seed, chunk in ((0, 5), (1, 4)):
        torch.manual_seed(seed)
        full_batch_run(root / f"run{seed}", nn.Linear(3, 1), regression_data,
                       lambda o, t: (o.squeeze(-1) - t) ** 2, lr=0.05, steps=6, save_every=3)  # fmt: skip
        store = sp.featurize(root / f"run{seed}", nn.Linear(3, 1), sp.RegressionTask(), regression_data,
                             root / f"s{seed}.sp", projection=sp.ProjectionArguments(kind="identity"),
                             options=sp.FeaturizeArguments(batch_size=1, chunk_rows=chunk), progress=False)  # fmt: skip
        sp.fit(store, progress=False)
        (stage,) = store.meta["methods"]["source"]["stages"]
        assert store.num_chunks(f"methods/source/train/{stage}") == -(-12 // chunk)  # as the fixture says
        stores.append(root / f"s{seed}.sp")
    return stores


@pytest.mark.parametrize("backend", ["auto", "faiss", "torch", "stream", "ivf"])
def test_an_ensemble_top_k_equals_the_brute_force_top_k_with_each_search_backend(
    ensemble_stores: list[Path], regression_data: TensorDataset, backend: str
) -> None:
    """An ensemble always built a CPU FAISS flat index of every averaged row and took no search settings. Now it
    builds its index as the Attributor does; oracle: a sort of the averaged score matrix (its scores distinct).
    The IVF index has one cell here (12 rows), so it scans every row and is exact."""
    queries = TensorDataset(*(t[:5] for t in regression_data.tensors))
    ensemble = sp.Ensemble.open(ensemble_stores, nn.Linear(3, 1), sp.RegressionTask(), search_backend=backend,
                                progress=False)  # type: ignore[arg-type]  # fmt: skip
    scores = ensemble.scores(queries)
    assert all(len(np.unique(row)) == row.size for row in scores)  # no ties: one right answer
    result = ensemble.top_k(queries, 4)
    np.testing.assert_array_equal(result.positive_ids, np.argsort(-scores, axis=1)[:, :4])
    np.testing.assert_array_equal(result.negative_ids, np.argsort(scores, axis=1)[:, :4])
    np.testing.assert_allclose(result.positive_scores, np.sort(scores, axis=1)[:, ::-1][:, :4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.negative_scores, np.sort(scores, axis=1)[:, :4], rtol=1e-5, atol=1e-6)


def test_an_ensemble_refuses_search_settings_it_cannot_use_before_opening_a_store(
    ensemble_stores: list[Path], tmp_path: Path
) -> None:
    """Refused in one sentence at construction, before any store is opened (the paths here hold none)."""
    missing = [tmp_path / "a.sp", tmp_path / "b.sp"]
    with pytest.raises(sp.TaskError, match=r"^Unknown search backend 'annoy'; use one of auto, faiss, torch, stream, "
                                           r"ivf\.$"):  # fmt: skip
        sp.Ensemble.open(missing, nn.Linear(3, 1), sp.RegressionTask(), search_backend="annoy")  # type: ignore[arg-type]
    with pytest.raises(sp.TaskError, match=r"^search_devices shard the torch, stream and auto \(GPU\) indexes; the "
                                           r"faiss backend runs on one device"):  # fmt: skip
        sp.Ensemble.open(missing, nn.Linear(3, 1), sp.RegressionTask(), search_backend="faiss", search_devices=["cpu"])
    attributors = [sp.Attributor(s, nn.Linear(3, 1), sp.RegressionTask(), progress=False) for s in ensemble_stores]
    with pytest.raises(sp.TaskError, match=r"^Unknown search backend 'flat'"):
        sp.Ensemble(attributors, search_backend="flat")  # type: ignore[arg-type]
    ignored = r"^search_ivf sets the approximate \(ivf\) search, which search_backend='(auto|torch)' does not use"
    with pytest.raises(sp.TaskError, match=ignored):  # an approximate search asked for, an exact one given silently
        sp.Ensemble(attributors, search_ivf=sp.IVFArguments(nprobe=4))
    with pytest.raises(sp.TaskError, match=ignored):
        sp.Attributor(missing[0], nn.Linear(3, 1), sp.RegressionTask(), search_backend="torch",
                      search_ivf=sp.IVFArguments(fp16=True))  # fmt: skip
    with pytest.raises(sp.TaskError, match=r"^search_ivf is a dict; pass sp.IVFArguments\("):
        sp.Ensemble.open(missing, nn.Linear(3, 1), sp.RegressionTask(), search_backend="ivf",
                         search_ivf={"nlist": 4})  # type: ignore[arg-type]  # fmt: skip
    ivf = sp.Ensemble(attributors, search_backend="ivf", search_ivf=sp.IVFArguments(nlist=13), progress=False)
    with pytest.raises(sp.TaskError, match=r"^An IVF index of 12 rows needs 1 ≤ nlist ≤ 12, not 13\.$"):
        ivf.top_k([], 3)  # before the queries (none here, refused on their own) are read


@pytest.mark.parametrize("row", [-1, 50])
def test_locate_maps_rows_to_stages_and_refuses_a_row_outside_them(row: int) -> None:
    """A row past the last stage's (or negative) raised a bare IndexError."""
    empty = np.zeros((1, 1))
    result = sp.QueryResult(empty, empty, empty, empty, [StageRows("pre", 0, 30), StageRows("fine", 30, 20)])
    assert result.locate(0) == ("pre", 0) and result.locate(29) == ("pre", 29) and result.locate(49) == ("fine", 19)
    expected = rf"^Row {row} is not a feature row of this result, whose rows are 0 to 49\.$"
    with pytest.raises(sp.TaskError, match=expected):
        result.locate(row)


def test_rows_scoring_zero_are_in_neither_list_of_records_nor_counted_as_full_lists() -> None:
    """A row scoring exactly 0 neither helped nor harmed the query: ``records()`` leaves it out of both lists and
    ``short_lists()`` counts a list ending in it as short (mutants: ``≥ 0`` kept it as helpful and harmful, ``< 0``
    counted a positive list ending in it as full). Oracle: scores 1, 0, −1."""
    index = faiss.IndexFlatIP(2)
    index.add(np.array([[1, 0], [0, 0], [-1, 0]], dtype=np.float32))
    result = search(index, np.array([[1.0, 0.5]], dtype=np.float32), 2, [StageRows("a", 0, 3)])
    assert result.positive_scores.tolist() == [[1.0, 0.0]] and result.negative_scores.tolist() == [[-1.0, 0.0]]
    assert result.short_lists() == (1, 1)
    records = [(r["kind"], r["index"], r["score"]) for r in result.records()]
    assert records == [("helpful", 0, 1.0), ("harmful", 2, -1.0)]


def test_a_faiss_search_of_more_queries_than_one_batch_keeps_every_querys_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A FAISS index is searched in batches of queries (``[q; −q]``, 4,096 rows a call); a batch that dropped or
    repeated a row would shift every later query's lists, the harmful ones into another query's. The batch is
    made 4 rows here so that 7 queries (14 rows) take four; oracle: a sort of the score matrix."""
    from source_proj.query import attributor as attributor_module

    monkeypatch.setattr(attributor_module, "_FAISS_QUERY_BATCH", 4)
    rng = np.random.default_rng(9)
    feats, queries = rng.standard_normal((40, 6)).astype(np.float32), rng.standard_normal((7, 6)).astype(np.float32)
    index = faiss.IndexFlatIP(6)
    index.add(feats)
    result = search(index, queries, 5, [StageRows("a", 0, 40)])
    scores = queries.astype(np.float64) @ feats.T.astype(np.float64)
    np.testing.assert_array_equal(result.positive_ids, np.argsort(-scores, axis=1)[:, :5])
    np.testing.assert_array_equal(result.negative_ids, np.argsort(scores, axis=1)[:, :5])
    np.testing.assert_allclose(result.negative_scores, np.sort(scores, axis=1)[:, :5], rtol=1e-5)


@pytest.fixture(scope="module")
def two_stage_stores(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two fitted stores (identity projection) of two-stage runs ("pre": 6 rows, then "fine": 5 rows) of a linear
    regression from two initialisations; chunks of 4 rows, so stage and chunk ends differ."""
    root = tmp_path_factory.mktemp("two-stage")
    g = torch.Generator().manual_seed(0)
    data = {"pre": TensorDataset(torch.randn(6, 3, generator=g), torch.randn(6, generator=g)),
            "fine": TensorDataset(torch.randn(5, 3, generator=g), torch.randn(5, generator=g))}  # fmt: skip
    stores = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        rec = sp.TrajectoryRecorder(root / f"run{seed}", model, opt, save_every=3)
        for name, stage in data.items():
            x, y = stage.tensors
            rec.begin_stage(name, dataset_size=len(y))
            for _ in range(3):
                opt.zero_grad()
                ((model(x).squeeze(-1) - y) ** 2).mean().backward()
                opt.step()
                rec.step()
        rec.close()
        store = sp.featurize(root / f"run{seed}", nn.Linear(3, 1), sp.RegressionTask(), data, root / f"s{seed}.sp",
                             projection=sp.ProjectionArguments(kind="identity"),
                             options=sp.FeaturizeArguments(chunk_rows=4), progress=False)  # fmt: skip
        sp.fit(store, progress=False)
        stores.append(root / f"s{seed}.sp")
    return stores


@pytest.mark.parametrize("backend", ["faiss", "torch", "stream"])
def test_a_two_stage_top_k_finds_and_locates_each_stages_rows_with_each_backend(
    two_stage_stores: list[Path], backend: str
) -> None:
    """The rows of a method attributing two stages are the first stage's, then the second's (offset 6): the index
    must place each stage's chunks at their offset and ``locate`` must name the stage. The tests' stores had one
    stage, where a lost offset (0 for every stage, or each stage's chunks written over the first's) goes unseen.
    Oracle: a sort of the score matrix, and the stage sizes."""
    queries = TensorDataset(torch.randn(4, 3, generator=torch.Generator().manual_seed(5)), torch.zeros(4))
    attributor = sp.Attributor(two_stage_stores[0], nn.Linear(3, 1), sp.RegressionTask(), search_backend=backend,
                               progress=False)  # type: ignore[arg-type]  # fmt: skip
    ensemble = sp.Ensemble.open(two_stage_stores, nn.Linear(3, 1), sp.RegressionTask(), search_backend=backend,
                                progress=False)  # type: ignore[arg-type]  # fmt: skip
    assert attributor.rows == [StageRows("pre", 0, 6), StageRows("fine", 6, 5)] == ensemble.rows
    for source in (attributor, ensemble):
        scores = source.scores(queries)
        assert scores.shape == (4, 11) and all(len(np.unique(row)) == 11 for row in scores)
        result = source.top_k(queries, 11)  # every row: each must come back once, in score order
        np.testing.assert_array_equal(result.positive_ids, np.argsort(-scores, axis=1))
        np.testing.assert_allclose(result.positive_scores, -np.sort(-scores, axis=1), rtol=1e-5, atol=1e-7)
        located = [result.locate(row) for row in range(11)]
        assert located == [("pre", i) for i in range(6)] + [("fine", i) for i in range(5)]
