"""The demo's scores have the right sign: retraining without a query's top-10 helpful training
digits lowers its margin, and without its top-10 harmful ones raises it (mean over seeds).

The demo's recipe cut to 5 of its 20 epochs and 3 checkpoints, projected to 256 dimensions, with 2 seeds: every
one of the 16 retrainings still moves its margin the right way, by 0.09 to 1.64 (1,437 digits, 4 queries)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import source_proj as sp

digits = pytest.importorskip("digits", reason="examples/digits must be importable (tests/conftest.py adds it)")


@pytest.mark.slow
def test_removing_top_helpful_lowers_and_top_harmful_raises_the_margin(tmp_path: Path) -> None:
    train_set, test_set = digits.load_split()
    config = digits.TrainConfig(epochs=5, checkpoints=3)
    model = digits.train(train_set, config=config, run_dir=tmp_path / "run")
    correct = (model(test_set.tensors[0]).argmax(1) == test_set.tensors[1]).nonzero().squeeze(1)[:4]
    queries = torch.utils.data.TensorDataset(*(t[correct] for t in test_set.tensors))
    result = sp.attribute(
        tmp_path / "run",
        digits.build_model(),
        digits.build_task(),
        train_set,
        queries,
        tmp_path / "s.sp",
        top_k=10,
        projection=sp.ProjectionArguments(dim=256),
        options=sp.FeaturizeArguments(batch_size=256),
        progress=False,
    )
    everyone = np.arange(len(train_set))
    seeds = (1, 2)
    full = np.stack([digits.margins(digits.train(train_set, seed=s, config=config), queries) for s in seeds])
    helpful_delta, harmful_delta = [], []
    for q in range(len(queries)):
        for ids, out in ((result.helpful_ids[q], helpful_delta), (result.harmful_ids[q], harmful_delta)):
            keep = np.setdiff1d(everyone, ids)
            out.append(
                np.mean(
                    [
                        digits.margins(digits.train(train_set, seed=s, config=config, keep=keep), queries)[q]
                        - full[i, q]
                        for i, s in enumerate(seeds)
                    ]
                )
            )
    assert np.mean(helpful_delta) < 0, helpful_delta
    assert np.mean(harmful_delta) > 0, harmful_delta
    assert sum(d < 0 for d in helpful_delta) >= 3, helpful_delta
