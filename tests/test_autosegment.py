"""Automatic segmentation: the optimal partition is exact, and cuts land on planted changes."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.cli.main import main
from source_proj.store.store import ckpt_key
from source_proj.trajectory import autosegment
from source_proj.trajectory.autosegment import AUTO_KEEP, choose_budget, optimal_partition


def test_optimal_partition_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(9, 4)) + np.repeat(rng.normal(size=(3, 4)) * 3, 3, axis=0)
    labels = ["a"] * 4 + ["b"] * 5
    gram = points @ points.T

    def dispersion(groups: list[tuple[int, int]]) -> float:
        return sum(((points[a : b + 1] - points[a : b + 1].mean(0)) ** 2).sum() for a, b in groups)

    for budget in (2, 3, 5):
        best = None
        for cuts in itertools.combinations(range(1, 9), budget - 1):
            edges = [0, *cuts, 9]
            groups = [(a, b - 1) for a, b in itertools.pairwise(edges)]
            if any(labels[a] != labels[b] for a, b in groups):
                continue
            value = dispersion(groups)
            if best is None or value < best[0]:
                best = (value, groups)
        groups, value = optimal_partition(gram, labels, budget)
        assert groups == best[1] and np.isclose(value, best[0])
    with pytest.raises(sp.TrajectoryError, match="without straddling"):
        optimal_partition(gram, ["a", "b", "a"] + ["b"] * 6, 2)


PLANT = 140
"""The step of the planted change in the 200-step runs: off the midpoint, so that a segmenter cutting a run into
equal parts does not land on it by chance (a checkpoint every 10 or 20 steps falls on it)."""


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 5, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def _run(
    run: Path,
    *,
    lr_after: float = 0.2,
    classes_before: tuple[int, ...] | None = None,
    adam: bool = False,
    save_every: int = 10,
):
    """200 mini-batch steps, checkpoints every ``save_every``; at step ``PLANT`` the rate or the data change."""
    data = _data()
    x, y = data.tensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01) if adam else torch.optim.SGD(model.parameters(), lr=0.2)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=save_every)
    rec.begin_stage("main", dataset_size=len(y))
    g = torch.Generator().manual_seed(1)
    pool = torch.arange(len(y))
    early = pool if classes_before is None else pool[torch.isin(y, torch.tensor(classes_before))]
    for step in range(200):
        if step == PLANT:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * lr_after / 0.2
        source = early if step < PLANT else pool
        idx = source[torch.randint(len(source), (16,), generator=g)]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        rec.step()
    rec.close()
    return model


def _store(run: Path, store: Path, **options) -> sp.Store:
    torch.manual_seed(0)
    arch = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    return sp.featurize(
        run,
        arch,
        sp.ClassificationTask(),
        _data(),
        store,
        projection=sp.ProjectionArguments(dim=64),
        options=sp.FeaturizeArguments(batch_size=120, chunk_rows=120, **options),
        progress=False,
    )


@pytest.fixture(scope="module")
def featurized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SGD runs featurized once for the module (``copy`` one before fitting it): ``"lr drop"`` (the rate falls
    tenfold at step ``PLANT``), ``"data change"`` (classes 0 and 1 only before it) and ``"plain"``."""
    root = tmp_path_factory.mktemp("autosegment")
    runs = {"lr drop": {"lr_after": 0.02}, "data change": {"classes_before": (0, 1)}, "plain": {}}
    for i, kwargs in enumerate(runs.values()):
        _run(root / f"run{i}", **kwargs)
        _store(root / f"run{i}", root / f"{i}.sp")
    return {name: root / f"{i}.sp" for i, name in enumerate(runs)}


def _copy(store: Path, tmp_path: Path, name: str = "s.sp") -> sp.Store:
    shutil.copytree(store, tmp_path / name)
    return sp.Store.open(tmp_path / name)


def test_automatic_cut_lands_on_a_planted_learning_rate_drop(tmp_path: Path, featurized: dict[str, Path]) -> None:
    store = _copy(featurized["lr drop"], tmp_path)
    sp.fit(store, sp.FitArguments(auto_segments=2), progress=False)
    method = store.meta["methods"]["source"]
    assert [(s["start_step"], s["end_step"]) for s in method["segments"]] == [(0, PLANT), (PLANT, 200)]
    assert method["view"]["cuts"] == [PLANT]


def test_automatic_cut_lands_on_a_planted_change_of_data(tmp_path: Path, featurized: dict[str, Path]) -> None:
    store = sp.fit(_copy(featurized["data change"], tmp_path), sp.FitArguments(auto_segments=2), progress=False)
    # the checkpoint at the plant still holds the parameters trained on the old data: the change shows from the next
    [cut] = store.meta["methods"]["source"]["view"]["cuts"]
    assert cut in (PLANT, PLANT + 10), cut
    # a stationary run gives no reason to cut there: the same budget goes elsewhere
    plain = sp.fit(_copy(featurized["plain"], tmp_path, "p.sp"), sp.FitArguments(auto_segments=2), progress=False)
    assert plain.meta["methods"]["source"]["view"]["cuts"][0] not in (PLANT, PLANT + 10)


def test_adam_run_chooses_automatic_cuts_before_featurize_and_keeps_them(tmp_path: Path) -> None:
    _run(tmp_path / "run", lr_after=0.02, adam=True, save_every=20)  # 11 checkpoints: the cut at PLANT is one of 9
    store = _store(tmp_path / "run", tmp_path / "s.sp", segmentation=sp.SegmentationArguments(auto=2, probe_rows=40))
    recorded = store.meta["segmentation"]
    assert recorded["arguments"] == {"auto": 2, "probe_rows": 40} and recorded["view"]["cuts"] == [PLANT]
    assert store.array("probe/grads/main/step-00000000").shape == (40, 64)
    sp.fit(store, progress=False)
    assert [s["end_step"] for s in store.meta["methods"]["source"]["segments"]] == [PLANT, 200]
    with pytest.raises(sp.StoreError, match="preconditioned features"):
        sp.fit(store, sp.FitArguments(auto_segments=3, method="other"), progress=False)

    out = CliRunner().invoke(main, ["trajectory", str(tmp_path / "s.sp"), "--plot", str(tmp_path / "t.png")])
    assert out.exit_code == 0, out.output
    assert f"cut at step {PLANT}" in out.output and (tmp_path / "t.png").stat().st_size > 10_000


def test_budget_outside_the_checkpoints_is_refused(tmp_path: Path, featurized: dict[str, Path]) -> None:
    store = _copy(featurized["plain"], tmp_path)
    with pytest.raises(sp.TrajectoryError, match=r"between 1 .* and 20"):
        sp.fit(store, sp.FitArguments(auto_segments=25), progress=False)
    out = CliRunner().invoke(
        main, ["fit", str(tmp_path / "s.sp"), "--segments", "auto:3", "--plot", str(tmp_path / "fit.png")]
    )
    assert out.exit_code == 0, out.output
    assert "3 segments, cuts at steps" in out.output and (tmp_path / "fit.png").exists()
    out = CliRunner().invoke(main, ["trajectory", str(tmp_path / "s.sp"), "--segments", "3"])
    assert out.exit_code != 0 and "auto:L" in out.output


def test_trajectory_refuses_to_pick_one_of_several_methods_different_cuts(
    tmp_path: Path, featurized: dict[str, Path]
) -> None:
    """It showed the first method's cuts without saying whose, so `fit --segments auto:3 --method a3` after auto:2
    showed auto:2's."""
    store = _copy(featurized["plain"], tmp_path).path
    two = sp.fit(store, sp.FitArguments(auto_segments=2, method="a2"), progress=False).meta["methods"]["a2"]["view"]
    sp.fit(store, sp.FitArguments(auto_segments=2, method="again"), progress=False)
    out = CliRunner().invoke(main, ["trajectory", str(store)])  # the same cuts twice: shown
    assert out.exit_code == 0 and f"cuts at steps {two['cuts']}" in out.output, out.output
    three = sp.fit(store, sp.FitArguments(auto_segments=3, method="a3"), progress=False).meta["methods"]["a3"]["view"]
    out = CliRunner().invoke(main, ["trajectory", str(store)])
    assert out.exit_code == 2, out.output
    assert (
        f"The store holds automatic cuts that differ (method 'a2' at {two['cuts']}, method 'again' at {two['cuts']}, "
        f"method 'a3' at {three['cuts']}); pass --segments auto:L for the L to show."
    ) in " ".join(out.output.split())


def test_auto_without_a_budget_chooses_the_number_of_segments() -> None:
    """A stationary stage stays whole, a planted jump is cut once, an even drift gets the fewest segments
    that remove ``1 − AUTO_KEEP`` of one segment's dispersion (brute force over the budgets)."""
    labels = ["a"] * 8
    still = np.ones((8, 3))
    assert choose_budget(still @ still.T, labels) == 1
    jump = np.concatenate([np.zeros((4, 3)), np.full((4, 3), 5.0)]) + 0.01 * np.arange(8)[:, None]
    assert choose_budget(jump @ jump.T, labels) == 2
    drift = np.arange(8, dtype=float)[:, None] * np.ones((1, 3))
    gram = drift @ drift.T
    floor = optimal_partition(gram, labels, 1)[1]
    chosen = choose_budget(gram, labels)
    assert optimal_partition(gram, labels, chosen)[1] <= AUTO_KEEP * floor
    assert optimal_partition(gram, labels, chosen - 1)[1] > AUTO_KEEP * floor
    # two stages: at least one segment each, whatever the signatures
    assert choose_budget(still @ still.T, ["a"] * 4 + ["b"] * 4) == 2
    assert sp.SegmentationArguments.parse("auto") == sp.SegmentationArguments(auto=0)


def test_auto_without_a_budget_cuts_a_planted_learning_rate_drop(tmp_path: Path, featurized: dict[str, Path]) -> None:
    store = _copy(featurized["lr drop"], tmp_path)
    sp.fit(store, sp.FitArguments(auto_segments=0), progress=False)
    assert PLANT in store.meta["methods"]["source"]["view"]["cuts"]


def test_wide_curvature_signatures_are_sketched_and_keep_their_gram(
    tmp_path: Path, featurized: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _copy(featurized["lr drop"], tmp_path)
    names = [f"fisher/main/{ckpt_key(step)}" for step in range(0, 200, 10)]
    exact = autosegment._gram(store, names, True)
    monkeypatch.setattr(autosegment, "SKETCH_DIM", 32)  # k = 64 is then "wide"
    real = autosegment._sketch
    draws = []
    for seed in range(10):
        monkeypatch.setattr(autosegment, "_sketch", lambda k, seed=seed: real(k, seed))
        draws.append(autosegment._gram(store, names, True))
    error = [np.abs(d - exact).max() / exact.max() for d in draws]
    assert min(error) > 0  # the sketch was taken
    assert max(error) < 0.5  # one draw: noisy at 32 dimensions (the checkpoints' Fishers are of low rank)
    assert np.abs(np.mean(draws, axis=0) - exact).max() / exact.max() < 0.1  # unbiased


def test_auto_segments_a_store_of_exact_gradients_without_a_parameter_square_matrix(
    tmp_path: Path, featurized: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An identity store with Kronecker curvature (k = p, no projected Fisher) takes its curvature signatures
    from the gradients; above SKETCH_DIM they are sketched instead of a p × p matrix per checkpoint, which
    exhausted memory at p = 26,000. Two row chunks per array: the signatures sum over chunks."""
    run = sp.Store.open(featurized["lr drop"]).meta["trajectory"]["path"]
    torch.manual_seed(0)
    arch = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    store = sp.featurize(
        run,
        arch,
        sp.ClassificationTask(),
        _data(),
        tmp_path / "exact.sp",
        projection=sp.ProjectionArguments(kind="identity"),
        options=sp.FeaturizeArguments(
            batch_size=60, chunk_rows=60, curvature="kfac", checkpoint_steps=(0, 40, 80, 100, PLANT, 180)
        ),
        progress=False,
    )
    assert store.meta["projection"]["dim"] == 147
    monkeypatch.setattr(autosegment, "SKETCH_DIM", 64)
    sketched: list[int] = []
    real = autosegment._sketch
    monkeypatch.setattr(autosegment, "_sketch", lambda k: sketched.append(k) or real(k))
    sp.fit(store, sp.FitArguments(auto_segments=2, curvature="kfac"), progress=False)
    assert sketched == [147]
    assert store.meta["methods"]["source"]["view"]["cuts"] == [PLANT]


def test_the_trajectory_view_of_a_fast_only_store_says_what_it_lacks(tmp_path: Path, tiny_run: Path) -> None:
    """A --fast-only store has no checkpoint's features: `source-proj trajectory` stopped on "no array
    'grads/main/step-00000000'; run the step that writes it first", naming no step."""
    from dataclasses import replace

    from source_proj.methods.fit import store_view

    from .crash_driver import OPTIONS, featurize

    store = tmp_path / "fast.sp"
    segments = sp.SegmentationArguments(per_stage=2)
    options = replace(OPTIONS, segment_means=True, checkpoints=False, segmentation=segments)
    featurize(tiny_run, store, options=options)
    with pytest.raises(sp.StoreError, match=r"--fast-only\), but the change between checkpoints reads every "
                                            r"checkpoint's; featurize it again without --fast-only"):
        store_view(sp.Store.open(store), 2)
    out = CliRunner().invoke(main, ["trajectory", str(store), "--segments", "auto:2"])
    assert out.exit_code == 1 and "Traceback" not in out.output and "without --fast-only" in out.output
