"""The torch top-k search (the GPU query path, run here on the CPU) equals FAISS and brute force."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.query.attributor import StageRows, search
from source_proj.query.topk import TorchIndex, build_index

from .conftest import mlp


def _brute(queries: np.ndarray, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ feats.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize(("block_rows", "query_batch"), [(1000, 4096), (37, 5), (1, 64)])
def test_blocked_search_with_exact_merge_equals_brute_force(block_rows: int, query_batch: int) -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((600, 24)).astype(np.float32)
    queries = rng.standard_normal((13, 24)).astype(np.float32)
    index = TorchIndex.resident(feats, "cpu", block_rows=block_rows)
    index.query_batch = query_batch
    for k in (1, 10, 50):
        scores, ids = index.search(queries, k)
        expected_scores, expected_ids = _brute(queries, feats, k)
        assert np.array_equal(ids, expected_ids)
        assert np.allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_a_cpu_torch_index_scores_at_most_256_queries_per_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch index is what ``auto`` searches with on a CPU without FAISS. There 4,096 queries per product made a
    4,096 × 65,536-row score block (1 GiB; FAISS's flat index scores 16 MB blocks) no faster than 256 queries (64 MB),
    so the CPU default is 256; oracle: brute force."""
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((600, 8)).astype(np.float32)
    queries = rng.standard_normal((300, 8)).astype(np.float32)
    scored: list[int] = []
    topk = torch.Tensor.topk

    def counted(self: torch.Tensor, *args: object, **kwargs: object) -> object:
        scored.append(self.shape[0])  # queries in this score block (or merge)
        return topk(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", counted)
    scores, ids = TorchIndex.resident(feats, "cpu").search(queries, 5)
    expected_scores, expected_ids = _brute(queries, feats, 5)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert max(scored) == 256


def test_torch_faiss_and_streamed_backends_agree_through_search() -> None:
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    rows = [StageRows("a", 0, 200), StageRows("b", 200, 300)]

    def blocks():  # store-like chunks of 64 rows
        for start in range(0, 500, 64):
            yield start, feats[start : start + 64]

    results = {
        backend: search(build_index(blocks, 500, 16, torch.device("cpu"), backend), queries, 10, rows)
        for backend in ("faiss", "torch", "stream")
    }
    for backend in ("torch", "stream"):
        assert np.array_equal(results[backend].helpful_ids, results["faiss"].helpful_ids), backend
        assert np.array_equal(results[backend].harmful_ids, results["faiss"].harmful_ids), backend
        assert np.allclose(results[backend].harmful_scores, results["faiss"].harmful_scores, rtol=1e-5)
    assert isinstance(build_index(blocks, 500, 16, torch.device("cpu"), "auto"), faiss.Index)
    with pytest.raises(sp.TaskError, match="Unknown search backend"):
        build_index(blocks, 500, 16, torch.device("cpu"), "gpu")  # type: ignore[arg-type]


def test_streamed_search_reads_one_chunk_at_a_time() -> None:
    feats = np.random.default_rng(2).standard_normal((300, 8)).astype(np.float32)
    seen: list[int] = []

    def blocks():
        for start in range(0, 300, 50):
            seen.append(start)
            yield start, feats[start : start + 50]

    index = TorchIndex(blocks, 300, 8, "cpu")
    _, ids = index.search(feats[:3], 1)
    assert seen == list(range(0, 300, 50))
    assert list(ids[:, 0]) == [int(np.argmax(feats[i] @ feats.T)) for i in range(3)]


def test_attributor_search_backends_give_the_same_top_k(fitted_mlp_store: Path) -> None:
    queries = TensorDataset(
        torch.randn(5, 4, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 0, 1])
    )
    results = {
        b: sp.Attributor(fitted_mlp_store, mlp(), sp.ClassificationTask(), search_backend=b).top_k(queries, 6)
        for b in ("faiss", "torch", "stream")
    }
    for b in ("torch", "stream"):
        assert np.array_equal(results[b].helpful_ids, results["faiss"].helpful_ids)
        assert np.array_equal(results[b].harmful_ids, results["faiss"].harmful_ids)


def _clustered(rows: int, dim: int, seed: int) -> np.ndarray:
    """Rows around 20 random centres: the structure an inverted-file index exploits."""
    rng = np.random.default_rng(seed)
    centres = 3 * rng.standard_normal((20, dim))
    return (centres[rng.integers(0, 20, rows)] + rng.standard_normal((rows, dim))).astype(np.float32)


def _recall(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(e)) / len(e) for g, e in zip(got, expected, strict=True)]))


def test_ivf_probing_every_cell_is_exact_and_fewer_cells_trade_recall() -> None:
    feats = _clustered(2000, 16, 4)
    queries = _clustered(30, 16, 5)
    rows = [StageRows("main", 0, 2000)]

    def blocks():  # store-like chunks, the last one short
        for start in range(0, 2000, 300):
            yield start, feats[start : start + 300]

    _, expected_help = _brute(queries, feats, 20)
    _, expected_harm = _brute(-queries, feats, 20)
    recall = {}
    for nprobe in (1, 4, 16):
        ivf = sp.IVFArguments(nlist=16, nprobe=nprobe, train_rows=800)
        result = search(build_index(blocks, 2000, 16, torch.device("cpu"), "ivf", ivf=ivf), queries, 20,
                        rows)  # fmt: skip
        recall[nprobe] = (_recall(result.helpful_ids, expected_help), _recall(result.harmful_ids, expected_harm))
    assert recall[16] == (1.0, 1.0)  # every cell scanned: exactly the brute-force top-k
    assert recall[1][0] < recall[4][0] <= 1.0 and recall[1][1] < 1.0
    fp16 = build_index(blocks, 2000, 16, torch.device("cpu"), "ivf",
                       ivf=sp.IVFArguments(nlist=16, nprobe=16, fp16=True, train_rows=800))  # fmt: skip
    scores, ids = fp16.search(queries, 20)
    exact = np.take_along_axis(queries.astype(np.float64) @ feats.astype(np.float64).T, ids, 1)
    assert np.allclose(scores, exact, rtol=2e-3, atol=2e-3) and _recall(ids, expected_help) > 0.95
    assert sp.IVFArguments().cells(10_000) == 256 and sp.IVFArguments().cells(1000) == 25
    with pytest.raises(sp.TaskError, match="needs 1 ≤ nlist ≤ 2000"):
        build_index(blocks, 2000, 16, torch.device("cpu"), "ivf", ivf=sp.IVFArguments(nlist=5000))


def test_a_half_precision_torch_index_ranks_by_the_rounded_rows() -> None:
    rng = np.random.default_rng(6)
    feats = rng.standard_normal((700, 32)).astype(np.float32)
    queries = rng.standard_normal((9, 32)).astype(np.float32)
    index = TorchIndex.resident(feats, "cpu", block_rows=256, dtype=torch.bfloat16)
    scores, ids = index.search(queries, 10)
    rounded = torch.from_numpy(feats).bfloat16().double().numpy()
    rounded_queries = torch.from_numpy(queries).bfloat16().double().numpy()
    expected_scores, expected_ids = _brute(rounded_queries, rounded, 10)
    assert _recall(ids, expected_ids) > 0.97  # ties within bfloat16's product rounding may swap
    assert np.allclose(scores, expected_scores, rtol=2e-2, atol=2e-2)
    assert _recall(ids, _brute(queries, feats, 10)[1]) > 0.9


def test_a_query_whose_probed_cells_hold_fewer_than_k_rows_is_searched_over_every_cell_not_padded() -> None:
    # Four tight clusters of 50 rows, one IVF cell each: a query probing one cell sees 50 rows, not the 60 asked,
    # and FAISS pads its list with row -1 (read by numpy as the last row) and score -3.4e38.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 10
    feats = np.concatenate([c + 0.01 * rng.normal(size=(50, 8)) for c in centres]).astype(np.float32)
    queries = centres[:2].astype(np.float32)
    index = build_index(lambda: [(0, feats)], 200, 8, torch.device("cpu"), "ivf",
                        ivf=sp.IVFArguments(nlist=4, nprobe=1))  # fmt: skip
    assert (index.search(queries, 60)[1] < 0).any()  # the case: FAISS alone pads
    result = search(index, queries, 60, [StageRows("main", 0, 200)])
    for got_ids, got_scores, sign in ((result.helpful_ids, result.helpful_scores, 1),
                                      (result.harmful_ids, result.harmful_scores, -1)):  # fmt: skip
        expected_scores, expected_ids = _brute(sign * queries, feats, 60)
        assert np.array_equal(np.sort(got_ids, axis=1), np.sort(expected_ids, axis=1))
        assert np.allclose(got_scores, sign * expected_scores, rtol=1e-5)
    assert index.nprobe == 1  # the index keeps its setting for the next search


def test_an_ivf_sample_smaller_than_its_cells_is_refused_in_one_sentence_not_by_faiss() -> None:
    """FAISS's k-means needs a training row per cell; fewer raised its C++ RuntimeError after the sample was read."""
    feats = _clustered(200, 8, 7)
    with pytest.raises(sp.TaskError, match=r"^IVFArguments\.train_rows 3 is fewer than the 10 cells .*train_rows ≥ 10"):
        build_index(lambda: [(0, feats)], 200, 8, torch.device("cpu"), "ivf",
                    ivf=sp.IVFArguments(nlist=10, train_rows=3))  # fmt: skip
    index = build_index(lambda: [(0, feats)], 200, 8, torch.device("cpu"), "ivf",
                        ivf=sp.IVFArguments(nlist=10, nprobe=10, train_rows=10))  # fmt: skip
    assert np.array_equal(index.search(feats[:3], 5)[1], _brute(feats[:3], feats, 5)[1])  # every cell: exact


@pytest.mark.parametrize(
    ("k", "backend", "ivf", "message"),
    [
        (10_000, "torch", sp.IVFArguments(), r"^top-k 10000 is not between 1 and the \d+ training examples"),
        (0, "stream", sp.IVFArguments(), r"^top-k 0 is not between 1"),
        (2.5, "faiss", sp.IVFArguments(), r"^top-k must be a whole number"),
        (3, "ivf", sp.IVFArguments(nlist=10_000), r"^An IVF index of \d+ rows needs 1 ≤ nlist ≤ \d+, not 10000\."),
        (3, "ivf", sp.IVFArguments(nlist=4, train_rows=2), r"^IVFArguments\.train_rows 2 is fewer than the 4 cells"),
    ],
)
def test_a_bad_k_or_ivf_setting_is_refused_before_the_query_gradients(
    fitted_mlp_store: Path, monkeypatch: pytest.MonkeyPatch, k: object, backend: str, ivf: sp.IVFArguments,
    message: str
) -> None:
    """top_k checks k and the approximate index's settings against the store's rows first: they were refused only
    once every query's gradient had been computed (minutes for many queries), by the search or the index build."""
    attributor = sp.Attributor(fitted_mlp_store, mlp(), sp.ClassificationTask(), search_backend=backend,
                               search_ivf=ivf, progress=False)  # fmt: skip

    def no_gradients(queries: object) -> None:
        raise AssertionError("query gradients computed before the arguments were checked")

    monkeypatch.setattr(attributor, "query_features", no_gradients)
    queries = TensorDataset(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(sp.TaskError, match=message):
        attributor.top_k(queries, k)  # type: ignore[arg-type]


class _Bars:
    """Records the progress bars made (as tqdm's stand-in): description, total and count reached."""

    def __init__(self) -> None:
        self.made: list[_Bars.Bar] = []

    class Bar:
        def __init__(self, iterable: object = None, *, total: int | None = None, desc: str = "", disable: bool = False,
                     **_: object) -> None:  # fmt: skip
            self.iterable, self.total, self.desc, self.disable, self.n = iterable, total, desc, disable, 0

        def __iter__(self):
            for item in self.iterable:  # type: ignore[union-attr]
                yield item
                self.n += 1

        def __enter__(self) -> _Bars.Bar:
            return self

        def __exit__(self, *_: object) -> None:
            pass

        def update(self, n: int = 1) -> None:
            self.n += n

        def set_description(self, desc: str) -> None:
            self.desc = desc

        def close(self) -> None:
            pass

    def __call__(self, *args: object, **kwargs: object) -> _Bars.Bar:
        self.made.append(_Bars.Bar(*args, **kwargs))  # type: ignore[arg-type]
        return self.made[-1]

    def reached(self, desc: str) -> list[tuple[int, int | None]]:
        return [(b.n, b.total) for b in self.made if desc in b.desc and not b.disable]


@pytest.mark.parametrize("backend", ["faiss", "torch", "stream", "ivf"])
def test_building_and_searching_an_index_show_progress(
    fitted_mlp_store: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """The index build (reading every row; IVF: twice, with its k-means between) and the search (a torch index over
    its rows, FAISS over the queries, both signs in one pass) are counted by progress bars: the IVF build of 2·10⁵
    rows took minutes, the exact search of 10³ queries tens of seconds, with nothing shown."""
    bars = _Bars()
    monkeypatch.setattr("source_proj.query.topk.tqdm", bars)
    monkeypatch.setattr("source_proj.query.attributor.tqdm", bars)
    attributor = sp.Attributor(fitted_mlp_store, mlp(), sp.ClassificationTask(), search_backend=backend,
                               search_ivf=sp.IVFArguments(nlist=2, nprobe=2) if backend == "ivf" else sp.IVFArguments())
    rows = sum(r.size for r in attributor.rows)
    labels = torch.tensor([0, 1, 2, 0, 1])
    queries = TensorDataset(torch.randn(5, 4, generator=torch.Generator().manual_seed(3)), labels)
    result = attributor.top_k(queries, 4)
    scores = attributor.scores(queries)
    np.testing.assert_allclose(result.positive_scores, -np.sort(-scores, axis=1)[:, :4], rtol=1e-5)
    np.testing.assert_allclose(result.negative_scores, np.sort(scores, axis=1)[:, :4], rtol=1e-5)
    built = bars.reached("IVF index") if backend == "ivf" else bars.reached("top-k index")
    assert built == ([(2 * rows, 2 * rows)] if backend == "ivf" else [] if backend == "stream" else [(rows, rows)])
    searched = {"faiss": [(10, 10)], "ivf": [(10, 10)], "torch": [(rows, rows)], "stream": [(rows, rows)]}[backend]
    assert bars.reached("top-k search") == searched  # one pass for both signs: 2 × 5 queries, or the rows once
    shown = len(bars.reached(""))
    attributor.progress = False
    attributor._index = None
    attributor.top_k(queries, 4)
    assert len(bars.reached("")) == shown  # progress=False: no bar shown


def test_a_float16_torch_index_ranks_large_scores_instead_of_overflowing_and_refuses_rows_beyond_its_range() -> None:
    """float16 ends at 65504: scores of features ×60 at d = 64 (about 10⁵) came back as inf, the top-k ids among
    them in arbitrary order. The queries are searched as unit vectors (their order per query is the same) and the
    scores scaled back in float32; rows float16 cannot hold are refused, not searched as inf."""
    rng = np.random.default_rng(8)
    feats = (60 * rng.standard_normal((500, 64))).astype(np.float32)
    queries = (60 * rng.standard_normal((6, 64))).astype(np.float32)
    index = TorchIndex.resident(feats, "cpu", block_rows=128, dtype=torch.float16)
    scores, ids = index.search(queries, 10)
    expected_scores, expected_ids = _brute(queries, feats, 10)
    assert np.abs(expected_scores).max() > 65504  # the case: scores beyond float16's range
    assert np.isfinite(scores).all() and _recall(ids, expected_ids) > 0.95
    np.testing.assert_allclose(scores, np.take_along_axis(queries.astype(np.float64) @ feats.T.astype(np.float64),
                                                          ids, 1), rtol=3e-3)  # fmt: skip
    huge = feats.copy()
    huge[7, 3] = 1e5
    with pytest.raises(sp.TaskError, match=r"^The torch index's float16 rows overflow .*; hold them in bfloat16"):
        TorchIndex.resident(huge, "cpu", dtype=torch.float16).search(queries, 10)


@pytest.mark.parametrize("block_rows", [1000, 7])
def test_a_torch_index_asked_for_every_row_returns_them_all_in_order(block_rows: int) -> None:
    """k = N is a valid top-k (``check_k`` takes it, FAISS answers it): every row, sorted. Oracle: brute force."""
    rng = np.random.default_rng(10)
    feats, queries = rng.standard_normal((30, 5)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
    scores, ids = TorchIndex.resident(feats, "cpu", block_rows=block_rows).search(queries, 30)
    expected_scores, expected_ids = _brute(queries, feats, 30)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
