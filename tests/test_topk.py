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


def test_torch_faiss_and_streamed_backends_agree_through_search() -> None:
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    rows = [StageRows("a", 0, 200), StageRows("b", 200, 300)]

    def blocks():  # store-like chunks of 64 rows
        for start in range(0, 500, 64):
            yield start, feats[start : start + 64]

    results = {
        backend: search(build_index(lambda: feats, blocks, 500, 16, torch.device("cpu"), backend), queries, 10, rows)
        for backend in ("faiss", "torch", "stream")
    }
    for backend in ("torch", "stream"):
        assert np.array_equal(results[backend].helpful_ids, results["faiss"].helpful_ids), backend
        assert np.array_equal(results[backend].harmful_ids, results["faiss"].harmful_ids), backend
        assert np.allclose(results[backend].harmful_scores, results["faiss"].harmful_scores, rtol=1e-5)
    assert isinstance(build_index(lambda: feats, blocks, 500, 16, torch.device("cpu"), "auto"), faiss.Index)
    with pytest.raises(sp.TaskError, match="Unknown search backend"):
        build_index(lambda: feats, blocks, 500, 16, torch.device("cpu"), "gpu")  # type: ignore[arg-type]


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
        result = search(build_index(lambda: feats, blocks, 2000, 16, torch.device("cpu"), "ivf", ivf=ivf), queries, 20,
                        rows)  # fmt: skip
        recall[nprobe] = (_recall(result.helpful_ids, expected_help), _recall(result.harmful_ids, expected_harm))
    assert recall[16] == (1.0, 1.0)  # every cell scanned: exactly the brute-force top-k
    assert recall[1][0] < recall[4][0] <= 1.0 and recall[1][1] < 1.0
    fp16 = build_index(lambda: feats, blocks, 2000, 16, torch.device("cpu"), "ivf",
                       ivf=sp.IVFArguments(nlist=16, nprobe=16, fp16=True, train_rows=800))  # fmt: skip
    scores, ids = fp16.search(queries, 20)
    exact = np.take_along_axis(queries.astype(np.float64) @ feats.astype(np.float64).T, ids, 1)
    assert np.allclose(scores, exact, rtol=2e-3, atol=2e-3) and _recall(ids, expected_help) > 0.95
    assert sp.IVFArguments().cells(10_000) == 256 and sp.IVFArguments().cells(1000) == 25
    with pytest.raises(sp.TaskError, match="needs 1 ≤ nlist ≤ 2000"):
        build_index(lambda: feats, blocks, 2000, 16, torch.device("cpu"), "ivf", ivf=sp.IVFArguments(nlist=5000))


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
    index = build_index(lambda: feats, lambda: [(0, feats)], 200, 8, torch.device("cpu"), "ivf",
                        ivf=sp.IVFArguments(nlist=4, nprobe=1))  # fmt: skip
    assert (index.search(queries, 60)[1] < 0).any()  # the case: FAISS alone pads
    result = search(index, queries, 60, [StageRows("main", 0, 200)])
    for got_ids, got_scores, sign in ((result.helpful_ids, result.helpful_scores, 1),
                                      (result.harmful_ids, result.harmful_scores, -1)):  # fmt: skip
        expected_scores, expected_ids = _brute(sign * queries, feats, 60)
        assert np.array_equal(np.sort(got_ids, axis=1), np.sort(expected_ids, axis=1))
        assert np.allclose(got_scores, sign * expected_scores, rtol=1e-5)
    assert index.nprobe == 1  # the index keeps its setting for the next search
