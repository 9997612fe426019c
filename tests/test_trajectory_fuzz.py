"""Property: whatever trajectory.json holds, the loader either returns a trajectory that keeps the
format's invariants or raises TrajectoryError, never another exception."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import source_proj as sp

VALID: dict[str, Any] = {
    "format": "source-proj-trajectory",
    "version": 1,
    "complete": True,
    "lr": [0.1, 0.1, 0.05, 0.05],
    "stages": [
        {
            "name": "a",
            "start_step": 0,
            "end_step": 2,
            "dataset_size": 8,
            "optimizer": {"kind": "sgd", "groups": [{"params": ["w"], "lr": 0.1, "momentum": 0.9, "lr_ratio": 1.0},
                                                    {"params": ["b"], "lr": 0.02, "momentum": 0.9, "lr_ratio": 0.2}]},
        },
        {
            "name": "b",
            "start_step": 2,
            "end_step": 4,
            "dataset_size": 5,
            "optimizer": {"kind": "adamw", "groups": [{"params": ["w"], "lr": 0.05, "betas": [0.9, 0.999]}]},
        },
    ],
    "checkpoints": [
        {"step": 0, "file": "checkpoints/step-00000000.pt", "sha256": "00", "optimizer_state": False},
        {"step": 2, "file": "checkpoints/step-00000002.pt", "sha256": "11", "optimizer_state": True},
        {"step": 4, "file": "checkpoints/step-00000004.pt", "sha256": "22", "optimizer_state": True},
    ],
}

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run directory whose trajectory.json every example overwrites."""
    return tmp_path_factory.mktemp("fuzz")


def _load(run: Path, text: bytes) -> None:
    (run / "trajectory.json").write_bytes(text)
    try:
        trajectory = sp.Trajectory.load(run)
    except sp.TrajectoryError as err:
        assert "\n" not in str(err)
        return
    # Loaded: the invariants later steps rely on hold.
    assert trajectory.lr.dtype.kind == "f" and all(math.isfinite(v) and v >= 0 for v in trajectory.lr)
    assert trajectory.stages[0].start_step == 0 and trajectory.stages[-1].end_step == trajectory.num_steps
    assert all(a.end_step == b.start_step for a, b in zip(trajectory.stages, trajectory.stages[1:], strict=False))
    steps = [c.step for c in trajectory.checkpoints]
    assert steps == sorted(set(steps)) and 0 <= steps[0] and steps[-1] <= trajectory.num_steps
    assert len(trajectory.fingerprint()) == 64
    assert all(0 <= r <= 1 for stage in trajectory.stages for r in stage.lr_ratios.values())


def _mutate(index: Any, data: st.DataObject) -> Any:
    """Replace, delete or add one entry somewhere inside the index."""
    if not isinstance(index, (dict, list)) or not index or data.draw(st.integers(0, 3)) == 0:
        return data.draw(JSON)
    keys = list(index) if isinstance(index, dict) else list(range(len(index)))
    key = data.draw(st.sampled_from(keys))
    action = data.draw(st.sampled_from(["descend", "delete", "add"]))
    if action == "delete":
        del index[key]
    elif action == "add" and isinstance(index, dict):
        index[data.draw(st.text(max_size=6))] = data.draw(JSON)
    elif action == "add":
        index.insert(key, data.draw(JSON))
    else:
        index[key] = _mutate(index[key], data)
    return index


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_valid_index_loads(run: Path) -> None:
    _load(run, json.dumps(VALID).encode())
    assert sp.Trajectory.load(run).num_steps == 4


@pytest.mark.parametrize("where", ["lr", "momentum"])
def test_a_number_too_large_for_a_float_is_refused(run: Path, where: str) -> None:
    index = copy.deepcopy(VALID)
    if where == "lr":
        index["lr"][1] = 10**400
    else:
        index["stages"][0]["optimizer"]["groups"][0]["momentum"] = -(10**400)
    (run / "trajectory.json").write_text(json.dumps(index))
    with pytest.raises(sp.TrajectoryError, match="malformed"):
        sp.Trajectory.load(run)


@FUZZ
@given(st.data())
def test_a_mutated_index_loads_or_raises_trajectory_error(run: Path, data: st.DataObject) -> None:
    index = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 3))):
        index = _mutate(index, data)
    _load(run, json.dumps(index).encode())


@FUZZ
@given(JSON)
def test_any_json_loads_or_raises_trajectory_error(run: Path, value: Any) -> None:
    _load(run, json.dumps(value).encode())


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=80) | st.integers(1, 50_000).map(lambda n: b"[" * n))
@example(b"[" * 20_000)
def test_any_bytes_load_or_raise_trajectory_error(run: Path, raw: bytes) -> None:
    _load(run, raw)
