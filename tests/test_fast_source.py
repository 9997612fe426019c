"""Fast-SOURCE (docs/concepts/source.md §7): gradients and curvature once per segment, at its averaged parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp

from .conftest import full_batch_run, step_weights_by_hand


def _featurize(run: Path, model: nn.Module, task: sp.Task, data, store: Path, **options) -> sp.Store:
    return sp.featurize(
        run,
        model,
        task,
        data,
        store,
        projection=sp.ProjectionArguments(kind="identity"),
        options=sp.FeaturizeArguments(batch_size=16, chunk_rows=16, fisher="exact", **options),
        progress=False,
    )


def test_fast_source_equals_source_when_gradients_are_affine_in_the_parameters(tmp_path: Path, regression_data) -> None:
    """Linear regression: ∇ℓ(z; θ) is affine in θ and the Gauss–Newton matrix constant, so averaging parameters
    (Fast-SOURCE) and averaging gradients and curvatures (SOURCE) with the same weights, each segment's step
    average, coincide; SOURCE's plain mean of the checkpoints (``average="checkpoints"``) differs."""
    torch.manual_seed(0)
    full_batch_run(
        tmp_path / "run",
        nn.Linear(3, 1),
        regression_data,
        lambda o, y: (o.squeeze(-1) - y) ** 2,
        lr=0.05,
        steps=30,
        save_every=3,
    )
    queries = TensorDataset(torch.randn(4, 3, generator=torch.Generator().manual_seed(5)), torch.zeros(4))
    task = sp.RegressionTask()
    store = _featurize(tmp_path / "run", nn.Linear(3, 1), task, regression_data, tmp_path / "s.sp", segment_means=True)
    assert store.meta["segmentation"]["arguments"] == {"per_stage": 1}  # the default: one segment per stage
    assert [len(s["checkpoints"]) for s in store.meta["segmentation"]["segments"]] == [10]
    sp.fit(store, progress=False)
    sp.fit(store, sp.FitArguments(fast=True), progress=False)
    sp.fit(store, sp.FitArguments(method="plain", average="checkpoints"), progress=False)
    assert store.meta["methods"]["fast-source"]["kind"] == "fast-source"
    source = sp.Attributor(store, nn.Linear(3, 1), task).scores(queries)
    fast = sp.Attributor(store, nn.Linear(3, 1), task, method="fast-source").scores(queries)
    assert np.allclose(fast, source, rtol=1e-4, atol=1e-6 * np.abs(source).max())
    plain = sp.Attributor(store, nn.Linear(3, 1), task, method="plain").scores(queries)
    assert not np.allclose(plain, source, rtol=1e-2)
    with pytest.raises(sp.TaskError, match="which Fast-SOURCE does not take: featurize computed its features at each"):
        sp.FitArguments(fast=True, average="checkpoints")


def test_fast_only_mode_featurizes_the_averaged_parameters_and_nothing_else(
    tmp_path: Path, classification_data
) -> None:
    torch.manual_seed(0)
    arch = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    full_batch_run(
        tmp_path / "run",
        arch,
        classification_data,
        lambda o, t: F.cross_entropy(o, t, reduction="none"),
        lr=0.5,
        steps=20,
        save_every=5,
    )
    task = sp.ClassificationTask()
    store = _featurize(
        tmp_path / "run",
        arch,
        task,
        classification_data,
        tmp_path / "s.sp",
        checkpoints=False,
        segment_means=True,
        segmentation=sp.SegmentationArguments(per_stage=2),
    )
    assert not store.has("grads/main/step-00000000")
    segments = store.meta["segmentation"]["segments"]
    assert [s["checkpoints"] for s in segments] == [[0, 5], [10, 15]]

    # brute force: the parameters of the segment's step average (checkpoints 10, 15 and the closing 20), one
    # example at a time
    traj = sp.Trajectory.load(tmp_path / "run")
    weights = step_weights_by_hand(10, 20, [0, 5, 10, 15, 20], traj.lr)
    assert sorted(weights) == [10, 15, 20]
    states = {c.step: traj.load_state(c)["model"] for c in traj.checkpoints}
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    net.load_state_dict({k: sum(w * states[step][k] for step, w in weights.items()) for k in states[0]})
    x, y = classification_data.tensors
    expected = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(
                        F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), list(net.parameters())
                    )
                ]
            )
            for i in range(len(y))
        ]
    )
    assert torch.allclose(torch.from_numpy(store.read("grads/main/steps-mean-00000010-00000020")), expected, atol=1e-5)

    sp.fit(store, sp.FitArguments(fast=True), progress=False)
    result = sp.Attributor(store, arch, task, method="fast-source").top_k(classification_data, 3)
    assert result.helpful_ids.shape == (30, 3)
    with pytest.raises(sp.StoreError, match="lacks the features"):
        sp.fit(store, progress=False)
    with pytest.raises(sp.StoreError, match="Fast-SOURCE features computed for the segmentation"):
        sp.fit(store, sp.FitArguments(fast=True, segments_per_stage=1, method="one"), progress=False)


def test_fast_source_on_a_store_without_segment_means_is_refused(tmp_path: Path, regression_data) -> None:
    torch.manual_seed(0)
    full_batch_run(
        tmp_path / "run",
        nn.Linear(3, 1),
        regression_data,
        lambda o, y: (o.squeeze(-1) - y) ** 2,
        lr=0.05,
        steps=6,
        save_every=2,
    )
    store = _featurize(tmp_path / "run", nn.Linear(3, 1), sp.RegressionTask(), regression_data, tmp_path / "s.sp")
    with pytest.raises(sp.StoreError, match=r"lacks the features .* featurize with segment_means=True"):
        sp.fit(store, sp.FitArguments(fast=True), progress=False)


def test_a_mean_point_weighs_its_checkpoints_and_an_older_recipe_weighs_them_alike(tmp_path: Path,
                                                                                   regression_data) -> None:
    """Featurize and per-token scores load a Fast-SOURCE point from its recipe: ``("mean", steps, weights)`` is the
    weighted sum of the checkpoints' parameters; a recipe written before the weights, ``("mean", steps)``, their
    plain mean."""
    from source_proj.featurize.plan import mean_state
    from source_proj.query.per_token import _point

    torch.manual_seed(0)
    full_batch_run(tmp_path / "run", nn.Linear(3, 1), regression_data, lambda o, y: (o.squeeze(-1) - y) ** 2,
                   lr=0.05, steps=6, save_every=2)  # fmt: skip
    traj = sp.Trajectory.load(tmp_path / "run")
    by_step = {c.step: c for c in traj.checkpoints}
    states = {c.step: traj.load_state(c)["model"] for c in traj.checkpoints}
    weighted = mean_state(traj, by_step, _point(["mean", [2, 4, 6], [0.25, 0.5, 0.25]]))
    plain = mean_state(traj, by_step, _point(["mean", [2, 4]]))
    for name in states[0]:
        expected = 0.25 * states[2][name] + 0.5 * states[4][name] + 0.25 * states[6][name]
        torch.testing.assert_close(weighted[name], expected)
        torch.testing.assert_close(plain[name], (states[2][name] + states[4][name]) / 2)
    assert not torch.equal(weighted["weight"], plain["weight"])


def test_a_store_with_the_plain_mean_features_is_asked_to_featurize_again_and_then_fits(
    tmp_path: Path, regression_data
) -> None:
    """A Fast-SOURCE store featurized before the step average holds ``mean-A-B`` arrays (the plain mean): fit
    --fast must not read them as the step average. It names the missing features and the command; featurize
    --fast on the same store then adds them, and the fit equals a fresh store's."""
    import shutil

    torch.manual_seed(0)
    full_batch_run(tmp_path / "run", nn.Linear(3, 1), regression_data, lambda o, y: (o.squeeze(-1) - y) ** 2,
                   lr=0.05, steps=6, save_every=2)  # fmt: skip
    fresh = _featurize(tmp_path / "run", nn.Linear(3, 1), sp.RegressionTask(), regression_data, tmp_path / "fresh.sp",
                       segment_means=True)  # fmt: skip
    old = tmp_path / "old.sp"
    shutil.copytree(fresh.path, old)
    for kind in ("grads", "fisher"):  # the arrays as the plain-mean code named them
        for folder in (old / kind / "main", old / "progress" / kind / "main"):
            (folder / "steps-mean-00000000-00000006").rename(folder / "mean-00000000-00000006")
    with pytest.raises(sp.StoreError, match=r"lacks the features \['grads/main/steps-mean-00000000-00000006'\].*"
                                            r"featurize with segment_means=True \(--fast\)"):
        sp.fit(old, sp.FitArguments(fast=True), progress=False)
    _featurize(tmp_path / "run", nn.Linear(3, 1), sp.RegressionTask(), regression_data, old, segment_means=True)
    sp.fit(old, sp.FitArguments(fast=True), progress=False)
    sp.fit(fresh.path, sp.FitArguments(fast=True), progress=False)
    queries = TensorDataset(torch.randn(4, 3, generator=torch.Generator().manual_seed(5)), torch.zeros(4))
    scores = [sp.Attributor(s, nn.Linear(3, 1), sp.RegressionTask(), method="fast-source").scores(queries)
              for s in (old, fresh.path)]  # fmt: skip
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-6, atol=1e-9)
