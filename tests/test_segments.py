"""Segments: equal cuts per stage, stage boundaries always cut, checkpoints placed where their steps start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import source_proj as sp
from source_proj.trajectory.recorder import Stage
from source_proj.trajectory.segments import step_average

from .conftest import mlp, step_weights_by_hand


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
    after the last step, closes the last segment: its steps after 20 lie between 20 and 30)."""
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
    averaged = store.meta["methods"]["source"]["points"]
    assert [[key for key, _ in own] for own in averaged] == [["step-00000010", "step-00000020"],
                                                            ["step-00000010", "step-00000020", "step-00000030"]]
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


def _weights(segment: sp.Segment, knots: list[int], lr: np.ndarray) -> dict[int, float]:
    return dict(step_average(segment, knots, lr))


def test_the_step_average_of_a_small_run_by_hand() -> None:
    """Checkpoints at 0, 2, 4, a constant rate, steps 0 … 3: steps 0 and 2 start at a checkpoint, steps 1 and 3
    halfway between two, so the weights are (1 + ½)/4, (½ + 1 + ½)/4 and ½/4."""
    segment = sp.Segment("main", 0, 4, (0, 2), 0.1, 0.0)
    assert _weights(segment, [0, 2, 4], np.full(4, 0.1)) == pytest.approx({0: 0.375, 2: 0.5, 4: 0.125})
    # the mean over the checkpoints the steps start from would be {0: ½, 2: ½}: the closing checkpoint missing


def test_a_checkpoint_at_every_step_gives_each_step_its_rate() -> None:
    """Exact case: with every θ_t saved, the average is Σ_t η_t g(θ_t) / Σ_t η_t, what the steps apply."""
    lr = np.linspace(0.0, 1.0, 12) ** 2  # a warm-up from zero
    segment = sp.Segment("main", 3, 9, tuple(range(3, 9)), 0.1, 0.0)
    weights = _weights(segment, list(range(13)), lr)
    assert weights == pytest.approx({t: lr[t] / lr[3:9].sum() for t in range(3, 9)})


@pytest.mark.parametrize("seed", range(6))
def test_the_step_average_equals_its_step_by_step_oracle(seed: int) -> None:
    """Random rates (some zero, as a recorder's skipped steps), checkpoints and segments, against the loop."""
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(5, 60))
    lr = rng.uniform(0.0, 1.0, steps) * (rng.uniform(size=steps) > 0.2)
    knots = sorted(set(rng.integers(0, steps + 1, size=int(rng.integers(1, 8))).tolist()))
    start = int(rng.integers(0, steps - 1))
    end = int(rng.integers(start + 1, steps + 1))
    segment = sp.Segment("main", start, end, (start,), 0.1, 0.0)
    ours = _weights(segment, knots, lr)
    assert ours == pytest.approx(step_weights_by_hand(start, end, knots, lr), abs=1e-12)
    assert sum(ours.values()) == pytest.approx(1.0)


def test_rates_of_zero_throughout_count_the_steps_alike() -> None:
    segment = sp.Segment("main", 0, 4, (0,), 0.0, 0.0)
    # τ never moves: every step is at the latest checkpoint of its τ, here θ_4 (= θ_0: nothing moved)
    assert _weights(segment, [0, 4], np.zeros(4)) == pytest.approx({4: 1.0})


def test_fit_averages_each_segment_over_its_steps_and_the_paper_rule_on_request(fitted_mlp_store: Path) -> None:
    """SGD checkpoints at 0, 5, …, 30, two segments: the first takes checkpoint 15 of the second for its last
    steps, the second the closing θ_30; ``average="checkpoints"`` is the plain mean of each one's own."""
    store = sp.fit(fitted_mlp_store, sp.FitArguments(segments_per_stage=2, method="steps"), progress=False)
    lr = store.read("trajectory/lr")
    steps = list(range(0, 31, 5))
    described = store.meta["methods"]["steps"]
    assert described["average"] == "steps"
    for seg, points in zip(described["segments"], described["points"], strict=True):
        by_hand = step_weights_by_hand(seg["start_step"], seg["end_step"], steps, lr)
        assert {int(key.split("-")[1]): w for key, w in points} == pytest.approx(by_hand)
    taken = [sorted(int(key.split("-")[1]) for key, _ in points) for points in described["points"]]
    assert taken == [[0, 5, 10, 15], [15, 20, 25, 30]]
    plain = sp.fit(fitted_mlp_store, sp.FitArguments(segments_per_stage=2, method="plain", average="checkpoints"),
                   progress=False).meta["methods"]["plain"]  # fmt: skip
    assert [[(k, w) for k, w in p] for p in plain["points"]] == [
        [(f"step-{s:08d}", pytest.approx(1 / 3)) for s in own] for own in ([0, 5, 10], [15, 20, 25])
    ]
    with pytest.raises(sp.TaskError, match="average is 'trapezoid'; use one of steps, checkpoints"):
        sp.FitArguments(average="trapezoid")


def test_a_method_fitted_before_the_step_average_is_refused_with_the_rule_named(fitted_mlp_store: Path) -> None:
    """A description without ``points`` was fitted with the plain mean: refitting at the default says so, and
    ``average="checkpoints"`` is the same method (nothing to refit)."""
    store = sp.fit(fitted_mlp_store, sp.FitArguments(method="old", average="checkpoints"), progress=False)
    methods = dict(store.meta["methods"])
    methods["old"] = {k: v for k, v in methods["old"].items() if k not in ("average", "points")}
    store.update_meta(methods=methods)
    with pytest.raises(sp.StoreError, match=r"fitted with other settings \(average: checkpoints → steps\)"):
        sp.fit(fitted_mlp_store, sp.FitArguments(method="old"), progress=False)
    sp.fit(fitted_mlp_store, sp.FitArguments(method="old", average="checkpoints"), progress=False)
