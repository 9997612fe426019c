"""Query at scale: indexes sharded over several devices (torch) or FAISS shards, filled from store
chunks read once, give exactly the brute-force top-k (devices are CPUs here; on GPUs the same code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import source_proj as sp
from source_proj.query.topk import TorchIndex, build_index, faiss_shards

from .crash_driver import build_model, data


def _brute(queries: np.ndarray, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ feats.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.fixture
def chunks() -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """611 rows of dimension 16 in store-like chunks of 50 (the last one short)."""
    feats = np.random.default_rng(3).standard_normal((611, 16)).astype(np.float32)
    return feats, [(start, feats[start : start + 50]) for start in range(0, 611, 50)]


def test_shards_filled_from_chunks_give_the_exact_top_k(chunks) -> None:
    feats, blocks = chunks
    reads: list[int] = []

    def read() -> list[tuple[int, np.ndarray]]:
        reads.append(1)
        return blocks

    queries = np.random.default_rng(4).standard_normal((9, 16)).astype(np.float32)
    expected_scores, expected_ids = _brute(queries, feats, 20)
    for count in (1, 2, 3, 7):  # shard boundaries fall inside chunks
        index = TorchIndex.sharded(read, 611, 16, ["cpu"] * count, block_rows=64)
        scores, ids = index.search(queries, 20)
        assert np.array_equal(ids, expected_ids), count
        assert np.allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert len(reads) == 4  # each index reads the store once, when it is built
    for index in (faiss_shards(read, 611, 16), TorchIndex(read, 611, 16, ["cpu", "cpu"], query_batch=4)):
        scores, ids = index.search(queries, 20)
        assert np.array_equal(ids, expected_ids), type(index).__name__
        assert np.allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_explicit_search_devices_reach_the_index(chunks) -> None:
    _, blocks = chunks
    index = build_index(lambda: blocks, 611, 16, torch.device("cpu"), "torch", ["cpu", "cpu"])
    assert isinstance(index, TorchIndex) and index.devices == [torch.device("cpu")] * 2
    streamed = build_index(lambda: blocks, 611, 16, torch.device("cpu"), "stream")
    assert streamed.devices == [torch.device("cpu")]


def test_attributor_over_sharded_devices_equals_faiss(tiny_reference: Path) -> None:
    results = {}
    for backend, devices in (("faiss", None), ("torch", ["cpu", "cpu", "cpu"]), ("stream", ["cpu", "cpu"])):
        attributor = sp.Attributor(
            tiny_reference, build_model(), sp.ClassificationTask(), search_backend=backend, search_devices=devices
        )
        results[backend] = attributor.top_k(data(), 5)
    for backend in ("torch", "stream"):
        assert np.array_equal(results[backend].helpful_ids, results["faiss"].helpful_ids), backend
        assert np.array_equal(results[backend].harmful_ids, results["faiss"].harmful_ids), backend


@pytest.mark.parametrize("backend", ["faiss", "ivf"])
def test_search_devices_for_an_index_that_runs_on_one_device_are_refused(tiny_reference: Path, backend: str) -> None:
    """The FAISS flat (CPU) and IVF indexes are built on one device: devices to shard them over were dropped
    without a word, and the search ran on one."""
    with pytest.raises(sp.TaskError, match=rf"^search_devices shard .*; the {backend} backend runs on one device"):
        sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask(), search_backend=backend,
                      search_devices=["cpu", "cpu"])  # fmt: skip
    with pytest.raises(sp.TaskError, match=r"^Unknown search backend 'gpu'; use one of auto, faiss"):  # not at top_k
        sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask(), search_backend="gpu")  # type: ignore[arg-type]
