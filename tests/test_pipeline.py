"""`attribute`, the one-call pipeline: what its refusals tell a caller to pass, it takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import TensorDataset

import source_proj as sp

from .crash_driver import build_model, data


def _attribute(run: Path, store: Path, segments: int, **kwargs: object) -> sp.QueryResult:
    queries = TensorDataset(*(t[:3] for t in data().tensors))
    return sp.attribute(run, build_model(), sp.ClassificationTask(), data(), queries, store, top_k=4,
                        projection=sp.ProjectionArguments(dim=12, seed=3, kind="rademacher"),
                        fit_args=sp.FitArguments(segments_per_stage=segments), progress=False, **kwargs)  # fmt: skip


def test_attribute_with_other_fit_settings_is_refused_and_overwrite_replaces_the_method(
    tiny_run: Path, tmp_path: Path
) -> None:
    _attribute(tiny_run, tmp_path / "s.sp", segments=2)
    refused = r"fitted with other settings \(segments: 2 → 1\); pass --force \(overwrite=True\)"
    with pytest.raises(sp.StoreError, match=refused):
        _attribute(tiny_run, tmp_path / "s.sp", segments=1)
    replaced = _attribute(tiny_run, tmp_path / "s.sp", segments=1, overwrite=True)
    fresh = _attribute(tiny_run, tmp_path / "fresh.sp", segments=1)
    np.testing.assert_array_equal(replaced.helpful_ids, fresh.helpful_ids)
    np.testing.assert_allclose(replaced.helpful_scores, fresh.helpful_scores, rtol=1e-6)
    assert sp.Store.open(tmp_path / "s.sp").meta["methods"]["source"]["arguments"]["segments_per_stage"] == 1
