"""Segments: equal cuts per stage, stage boundaries always cut, checkpoints placed where their steps start."""

from __future__ import annotations

import numpy as np
import pytest

import source_proj as sp
from source_proj.trajectory.recorder import Stage

from .conftest import mlp


def _stage(name: str, start: int, end: int, momentum: float = 0.0, decay: float = 0.0) -> Stage:
    return Stage(
        name,
        start,
        end,
        10,
        {
            "kind": "sgd",
            "groups": [{"params": ["w"], "lr": 0.1, "momentum": momentum, "dampening": 0.0, "weight_decay": decay}],
        },
    )


def test_three_equal_parts_and_left_closed_checkpoints() -> None:
    lr = np.linspace(1.0, 0.1, 300)
    segs = sp.make_segments([_stage("main", 0, 300)], [0, 50, 100, 150, 200, 250, 300], lr, {"w": 4}, per_stage=3)
    assert [(s.start_step, s.end_step) for s in segs] == [(0, 100), (100, 200), (200, 300)]
    assert [s.checkpoints for s in segs] == [(0, 50), (100, 150), (200, 250)]
    assert np.isclose(segs[1].mean_lr, lr[100:200].mean())
    assert segs[0].num_steps == 100 and np.isclose(segs[0].time, 100 * lr[:100].mean())


def test_stage_end_checkpoint_fills_an_otherwise_empty_last_segment() -> None:
    segs = sp.make_segments([_stage("main", 0, 30)], [5, 15, 30], np.ones(30), {"w": 1}, per_stage=3)
    assert [s.checkpoints for s in segs] == [(5,), (15,), (30,)]


def test_stage_boundaries_always_cut_and_momentum_scales_the_rate() -> None:
    stages = [_stage("pre", 0, 10, momentum=0.9, decay=1e-2), _stage("fine", 10, 16)]
    segs = sp.make_segments(stages, [0, 5, 10, 14], np.full(16, 0.1), {"w": 1}, per_stage=2)
    assert [(s.stage, s.start_step, s.end_step) for s in segs] == [
        ("pre", 0, 5),
        ("pre", 5, 10),
        ("fine", 10, 13),
        ("fine", 13, 16),
    ]
    assert [s.checkpoints for s in segs] == [(0,), (5,), (10,), (14,)]
    assert np.isclose(segs[0].mean_lr, 0.1 / (1 - 0.9)) and segs[0].weight_decay == 1e-2
    assert np.isclose(segs[2].mean_lr, 0.1) and segs[2].weight_decay == 0.0


def test_explicit_boundaries_and_merging_of_empty_segments() -> None:
    with pytest.warns(UserWarning, match="merged"):
        segs = sp.make_segments([_stage("main", 0, 40)], [0, 25], np.ones(40), {"w": 1}, boundaries=[10, 20, 30])
    # [10,20) holds no checkpoint and joins [20,30); [30,40) joins the previous one
    assert [(s.start_step, s.end_step, s.checkpoints) for s in segs] == [(0, 10, (0,)), (10, 40, (25,))]


def test_optimizer_it_cannot_handle_is_refused() -> None:
    stage = Stage("main", 0, 5, 10, {"kind": "RMSprop", "groups": [{"params": ["w"], "lr": 0.1}]})
    with pytest.raises(sp.TrajectoryError, match="RMSprop"):
        sp.make_segments([stage], [0], np.ones(5), {"w": 1})


def test_featurize_of_chosen_checkpoints_averages_only_them(tmp_path, fitted_mlp_store, classification_data) -> None:
    """Checkpoints at 0, 5, …, 30: featurizing steps 10 and 20 (θ_T = 30 is always added) writes exactly
    the full store's features of those checkpoints, and SOURCE's segments average only them (θ_T, saved
    after the last step, is in no segment, as with every checkpoint featurized)."""
    full = sp.Store.open(fitted_mlp_store)
    run = full.meta["trajectory"]["path"]
    options = sp.FeaturizeArguments(batch_size=7, chunk_rows=9, checkpoint_steps=(10, 20))
    store = sp.featurize(
        run, mlp(), sp.ClassificationTask(), classification_data, tmp_path / "chosen.sp",
        projection=sp.ProjectionArguments(dim=32, kind="rademacher"), options=options, progress=False,
    )  # fmt: skip
    assert store.meta["trajectory"]["checkpoints"] == [10, 20, 30]
    assert store.meta["trajectory"]["fingerprint"] == full.meta["trajectory"]["fingerprint"]
    for step in (10, 20, 30):
        name = f"grads/main/step-{step:08d}"
        assert np.array_equal(store.read(name), full.read(name))
    assert not store.has("grads/main/step-00000005")
    sp.fit(store, sp.FitArguments(segments_per_stage=2), progress=False)
    segments = store.meta["methods"]["source"]["segments"]
    full_segments = sp.fit(fitted_mlp_store, sp.FitArguments(segments_per_stage=2, method="two"), progress=False)
    averaged = sorted(s for seg in full_segments.meta["methods"]["two"]["segments"] for s in seg["checkpoints"])
    assert averaged == [0, 5, 10, 15, 20, 25]  # every checkpoint before θ_T, when all are featurized
    assert sorted(s for seg in segments for s in seg["checkpoints"]) == [10, 20]
    scores = sp.Attributor(store, mlp(), sp.ClassificationTask()).scores(classification_data)
    assert scores.shape == (30, 30) and np.isfinite(scores).all()
    with pytest.raises(sp.TrajectoryError, match=r"no checkpoint at step\(s\) \[7\]"):
        sp.featurize(run, mlp(), sp.ClassificationTask(), classification_data, tmp_path / "bad.sp",
                     options=sp.FeaturizeArguments(checkpoint_steps=(7,)), progress=False)  # fmt: skip
    other = sp.FeaturizeArguments(batch_size=7, chunk_rows=9, checkpoint_steps=(10,))
    with pytest.raises(sp.StoreError, match="other settings"):  # another choice is another store
        sp.featurize(run, mlp(), sp.ClassificationTask(), classification_data, tmp_path / "chosen.sp",
                     projection=sp.ProjectionArguments(dim=32, kind="rademacher"), options=other,
                     progress=False)  # fmt: skip
