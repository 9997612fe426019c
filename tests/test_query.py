"""Query: FAISS top-k agrees with brute force on the score matrix; results locate the right rows."""

from __future__ import annotations

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

from .conftest import full_batch_run, mlp


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
    with pytest.raises(sp.StoreError, match="no fitted method 'source'"):
        sp.Attributor(tmp_path / "s.sp", nn.Linear(4, 3), sp.ClassificationTask())
