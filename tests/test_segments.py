"""Segments: equal cuts per stage, stage boundaries always cut, checkpoints placed where their steps start."""

from __future__ import annotations

import numpy as np
import pytest

import source_proj as sp
from source_proj.trajectory.recorder import Stage


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
    segs = sp.make_segments([_stage("main", 0, 300)], [0, 50, 100, 150, 200, 250, 300], lr, {"w": 4})
    assert [(s.start_step, s.end_step) for s in segs] == [(0, 100), (100, 200), (200, 300)]
    assert [s.checkpoints for s in segs] == [(0, 50), (100, 150), (200, 250)]
    assert np.isclose(segs[1].mean_lr, lr[100:200].mean())
    assert segs[0].num_steps == 100 and np.isclose(segs[0].time, 100 * lr[:100].mean())


def test_stage_end_checkpoint_fills_an_otherwise_empty_last_segment() -> None:
    segs = sp.make_segments([_stage("main", 0, 30)], [5, 15, 30], np.ones(30), {"w": 1})
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
