"""In-run capture: the captured sums are the per-example gradients training used, SOURCE fitted on them
equals post-hoc SOURCE where the two must agree, capture leaves training unchanged, and a killed run
resumes into the store an uninterrupted run writes."""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import json
import shutil
import threading
import time
import warnings
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import source_proj as sp
from source_proj.cli.main import main
from source_proj.featurize.windows import window_array
from source_proj.store.provenance import (
    REFERENCE_BATCH,
    check_data,
    check_model,
    data_fingerprint,
    load_reference_batch,
    model_fingerprint,
)
from source_proj.store.store import ckpt_key
from source_proj.tasks.draws import FisherDraws
from source_proj.tasks.gradients import PerExampleGradients
from source_proj.trajectory.preconditioner import checkpoint_preconditioner

from .conftest import TokenModel, _classification_data

DIM = 16


def _mlp(seed: int = 0, dropout: float = 0.0, activation: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), activation(), nn.Dropout(dropout), nn.Linear(8, 3))


def _projection() -> sp.ProjectionArguments:
    return sp.ProjectionArguments(dim=DIM, kind="factored")


def _order(epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch))


def _train(
    run: Path,
    store: Path | None,
    data: TensorDataset,
    *,
    steps: int,
    batch: int,
    save_every: int,
    options: sp.CaptureArguments | None = None,
    model: nn.Module | None = None,
    crash_after: int | None = None,
    resume: bool = False,
    on_batch=None,
    task: sp.Task | None = None,
    datasets: dict[str, TensorDataset] | None = None,
    projection: sp.ProjectionArguments | None = None,
    optimizer=None,
    at_step: int | None = None,
    on_start=None,
    fail_at: int | None = None,
    within: bool = False,
) -> nn.Module:
    """SGD (momentum 0.9, weight decay) over epochs of a fixed per-epoch order; captured into ``store`` if given.
    ``crash_after``: raise after that many optimiser steps (a killed run); ``resume``: continue ``run``;
    ``on_batch(model, rows, optimizer)``: called after each backward, before the optimiser step; ``datasets``: for
    capture; ``optimizer(parameters)``: another optimiser; ``at_step``: resume rewound to that checkpoint;
    ``on_start()``: called once capture has begun, before the first step; ``fail_at``: the loop's own loss raises
    ``KeyboardInterrupt`` at that step, after the forward (nothing is closed); ``within``: the loop runs inside
    ``with rec:``."""
    model = model if model is not None else _mlp()
    if optimizer is not None:
        opt = optimizer(model.parameters())
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if resume:
        rec = sp.TrajectoryRecorder.resume(run, model, opt, save_every=save_every, at_step=at_step)
    else:
        rec = sp.TrajectoryRecorder(run, model, opt, save_every=save_every, save_optimizer_state=True, overwrite=True)
    task = task or sp.ClassificationTask()
    options = options or sp.CaptureArguments()
    cap = None
    if store is not None:
        projection = projection or _projection()
        cap = sp.GradientCapture(rec, store, task, projection=projection, options=options, datasets=datasets)
    if not resume:
        rec.begin_stage("main", dataset_size=len(data))
    if on_start is not None:
        on_start()
    x, y = data.tensors
    per_epoch = -(-len(y) // batch)

    def loss_of(inputs: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        outputs = model(inputs)
        if step == fail_at:
            raise KeyboardInterrupt
        return F.cross_entropy(outputs, labels)

    with rec if within else contextlib.nullcontext():
        for step in range(rec.global_step, steps):
            epoch, b = divmod(step, per_epoch)
            rows = _order(epoch, len(y))[b * batch : (b + 1) * batch]
            if cap is not None:
                with cap.batch((rows, (x[rows], y[rows]))) as (bx, by):
                    loss = loss_of(bx, by, step)
                    opt.zero_grad()
                    loss.backward()
            else:
                loss = loss_of(x[rows], y[rows], step)
                opt.zero_grad()
                loss.backward()
            if on_batch is not None:
                on_batch(model, rows, opt)
            opt.step()
            rec.step()
            if crash_after is not None and rec.global_step == crash_after:
                if cap is not None:
                    cap.close()
                raise _Killed
    if not within:
        rec.close()
    return model


class _Killed(Exception):
    pass


def _uninterrupted_and_resumed(tmp_path: Path, data: TensorDataset, **kwargs: object) -> tuple[sp.Store, sp.Store]:
    """The stores of one run trained through (``a.sp``) and of the same run killed at step 6 (mid-window, where a
    checkpoint every 4 steps) and resumed (``b.sp``)."""
    _train(tmp_path / "a", tmp_path / "a.sp", data, **kwargs)
    with pytest.raises(_Killed):
        _train(tmp_path / "b", tmp_path / "b.sp", data, crash_after=6, **kwargs)
    _train(tmp_path / "b", tmp_path / "b.sp", data, resume=True, **kwargs)
    return sp.Store.open(tmp_path / "a.sp"), sp.Store.open(tmp_path / "b.sp")


def _fourteen_steps(kind: str) -> dict:
    """``_train``'s arguments for 14 steps (3.5 epochs of the classification data in batches of 8, a checkpoint every
    4 steps: windows from 0, 4, 8 and 12, the end pass at 14) captured with datasets= and the ``kind`` projection:
    factored (k = 16) or eigen (k = 24)."""
    data = _classification_data()
    return {"steps": 14, "batch": 8, "save_every": 4, "options": sp.CaptureArguments(chunk_rows=8),
            "datasets": {"main": data}, "projection": _eigen_capture(24) if kind == "eigen" else _projection()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made once for the module and only read: ``factored``/``factored.sp`` and ``eigen``/``eigen.sp``, the run and
    store of ``_fourteen_steps(kind)`` trained through, which the runs killed and resumed must end as."""
    root = tmp_path_factory.mktemp("uninterrupted")
    for kind in ("factored", "eigen"):
        _train(root / kind, root / f"{kind}.sp", _classification_data(), **_fourteen_steps(kind))
    return root


def _killed_while_writing(monkeypatch: pytest.MonkeyPatch, store: Path, array: str, run) -> None:
    """``run()`` killed while it writes chunk 2 of ``array`` into ``store``, which it leaves pending."""
    original = sp.Store.write_chunk

    def failing(self, name, chunk, values):
        if name == array and chunk == 2:
            raise _Killed
        return original(self, name, chunk, values)

    monkeypatch.setattr(sp.Store, "write_chunk", failing)
    with pytest.raises(_Killed):
        run()
    monkeypatch.setattr(sp.Store, "write_chunk", original)
    assert sp.Store.open(store).pending_chunks(array)


def test_full_batch_capture_with_a_checkpoint_per_step_equals_posthoc_source(
    tmp_path: Path, classification_data
) -> None:
    """Full-batch GD with a checkpoint every step: every window is one step at a checkpoint's parameters, so
    the captured gradients, the empirical Fisher and SOURCE all equal post-hoc featurize's."""
    n = len(classification_data)
    options = sp.CaptureArguments(fisher="empirical", chunk_rows=8)
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=6, batch=n, save_every=1, options=options)
    posthoc = sp.featurize(
        tmp_path / "run", _mlp(), sp.ClassificationTask(), classification_data, tmp_path / "post.sp",
        projection=_projection(),
        options=sp.FeaturizeArguments(fisher="empirical", chunk_rows=8, measurement=False),
        progress=False,
    )
    captured = sp.Store.open(tmp_path / "cap.sp")
    for step in range(6):
        got = captured.read(window_array("grads", "main", step))
        assert np.allclose(got, posthoc.read(f"grads/main/{ckpt_key(step)}"), rtol=1e-4, atol=1e-6)
        assert (captured.read(window_array("visits", "main", step)) == 1).all()
    args = sp.FitArguments(segments_per_stage=2)
    a = sp.fit(posthoc, args, progress=False).read("methods/source/train/main")
    b = sp.fit(captured.path, args, progress=False).read("methods/source/train/main")
    assert np.abs(a).max() > 0
    assert np.allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(a).max())

    # Baselines on the captured store: TracIn over the visits (each step's full batch at the effective rate
    # 0.1/(1 − 0.9), queried at the window's checkpoint), Grad-Dot at the last window; TRAK needs what capture does
    # not take.
    grads = {step: posthoc.read(f"grads/main/{ckpt_key(step)}").astype(np.float64) for step in range(6)}
    tracin = sp.fit_baseline(captured.path, sp.BaselineArguments(kind="tracin"), progress=False)
    expected = np.concatenate([-np.sqrt(1.0 / n) * grads[step] for step in range(6)], axis=1)
    assert np.allclose(tracin.read("methods/tracin/train/main"), expected, rtol=1e-4, atol=1e-6)
    recipe = tracin.meta["methods"]["tracin"]["query"]
    assert recipe["checkpoints"] == list(range(6)) and np.allclose(recipe["weights"], np.sqrt(1.0 / n))
    dot = sp.fit_baseline(captured.path, sp.BaselineArguments(kind="grad-dot"), progress=False)
    assert np.allclose(dot.read("methods/grad-dot/train/main"), -grads[5], rtol=1e-4, atol=1e-6)
    sp.fit_baseline(captured.path, sp.BaselineArguments(kind="if"), progress=False)
    with pytest.raises(sp.TaskError, match="featurize the run after training for TRAK"):
        sp.fit_baseline(captured.path, sp.BaselineArguments(kind="trak"), progress=False)


RATIOS = {"0.weight": 0.2, "0.bias": 0.2, "3.weight": 1.0, "3.bias": 0.2}
"""``_two_rates``: each parameter's rate over the reference group's (1:5)."""


def _two_rates(parameters, lr: float) -> list[dict]:
    """Groups at 1:5 of ``_mlp``'s parameters (in its order): the first layer and the last one's bias at lr/5, the
    last one's weight at lr (the reference): a layer inside one group, and one whose weight and bias straddle two."""
    first_weight, first_bias, last_weight, last_bias = parameters
    slow = [first_weight, first_bias, last_bias]
    return [{"params": slow, "lr": lr * RATIOS["0.weight"]}, {"params": [last_weight], "lr": lr}]


def test_captured_tracin_weighs_a_window_of_several_steps_by_its_rate_over_its_batch(
    tmp_path: Path, classification_data
) -> None:
    """TracIn over the visits: a window w of K_w = 3 full-batch steps weighs the sum of its 3 N visits' gradients by
    η̄_w K_w / visits_w = η̄_w / N (η̄ the effective rate 0.1/(1 − 0.9) = 1), not by η̄_w K_w / N or η̄_w K_w (a window
    of one step, as the test above has, cannot tell these apart)."""
    n = len(classification_data)
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=6, batch=n, save_every=3,
           options=sp.CaptureArguments(fisher="empirical", chunk_rows=8))  # fmt: skip
    store = sp.fit_baseline(tmp_path / "cap.sp", sp.BaselineArguments(kind="tracin"), progress=False)
    recipe = store.meta["methods"]["tracin"]["query"]
    assert recipe["checkpoints"] == [0, 3]
    np.testing.assert_allclose(recipe["weights"], np.sqrt(1.0 / n), rtol=1e-6)
    sums = [store.read(window_array("grads", "main", window)).astype(np.float64) for window in (0, 3)]
    assert all((store.read(window_array("visits", "main", window)) == 3).all() for window in (0, 3))
    expected = np.concatenate([-np.sqrt(1.0 / n) * s for s in sums], axis=1)
    np.testing.assert_allclose(store.read("methods/tracin/train/main"), expected, rtol=1e-4, atol=1e-6)

@pytest.mark.parametrize("kind", ["sgd", "sgd-eigen", "adamw"])
def test_full_batch_capture_of_groups_at_a_ratio_of_rates_equals_posthoc_featurize(
    tmp_path: Path, classification_data, kind: str
) -> None:
    """Groups at 1:5 (SGD with momentum; AdamW), full-batch steps and a checkpoint every step: every window is one
    step at a checkpoint's parameters, so its captured gradients are post-hoc featurize's in u = R^{-1/2}θ
    (D = 1/r; AdamW D/r), on the factored projection (rank one: exact where a layer's weight and bias straddle two
    groups) and on the eigen one at k ≥ p (whose basis passes scale alike). Each window keeps featurize's D of the
    checkpoint closing it; SOURCE and its scores, whose query is scaled by the last segment's D, equal post-hoc's;
    TracIn over the visits is −√w times those gradients, its query at each window's checkpoint scaled by the window's
    D (materialised). AdamW is captured from its second step (no state before it) and at eps = 10⁶, where D barely
    moves: in-run takes each step's own D, featurize its segment's mean, which agree only where D is constant."""
    from source_proj.featurize.windows import window_maps

    x, y = classification_data.tensors
    n, steps = len(y), 4  # two segments of two windows (AdamW: three windows captured)
    names = list(RATIOS)
    task = sp.ClassificationTask()
    if kind == "adamw":  # a step of lr·m̂/D ≈ 0.1·m̂, as SGD's
        lr, first = 1e5, 1
        optimizer = lambda params: torch.optim.AdamW(_two_rates(params, lr), eps=1e6, weight_decay=0.0)  # noqa: E731
    else:
        lr, first = 0.1, 0
        optimizer = lambda params: torch.optim.SGD(_two_rates(params, lr), momentum=0.9)  # noqa: E731
    eigen = kind == "sgd-eigen"
    projection = _eigen_capture(128) if eigen else _projection()
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=steps, batch=n, save_every=1,
           options=sp.CaptureArguments(fisher="empirical", chunk_rows=8, end_pass=False),
           optimizer=optimizer, projection=projection,
           datasets={"main": classification_data} if eigen else None)  # fmt: skip
    posthoc = sp.featurize(
        tmp_path / "run", _mlp(), task, classification_data, tmp_path / "post.sp", projection=projection,
        options=sp.FeaturizeArguments(fisher="empirical", chunk_rows=8, measurement=False,
                                      segmentation=sp.SegmentationArguments(per_stage=2)),
        progress=False,
    )  # fmt: skip
    captured = sp.Store.open(tmp_path / "cap.sp")
    trajectory = sp.Trajectory.load(tmp_path / "run")
    stage = trajectory.stage("main")
    maps = window_maps(captured)
    grads = {}
    for step in range(first, steps):
        got = torch.from_numpy(captured.read(window_array("grads", "main", step))).double()
        got = maps[("main", step)](got).numpy() if eigen else got.numpy()
        grads[step] = posthoc.read(f"grads/main/{ckpt_key(step)}").astype(np.float64)
        assert np.allclose(got, grads[step], rtol=1e-4, atol=1e-5 * np.abs(grads[step]).max()), step
        assert (captured.read(window_array("visits", "main", step)) == 1).all()
        closing = next(c for c in trajectory.checkpoints if c.step == step + 1)
        d = checkpoint_preconditioner(trajectory, closing, stage, names)
        if kind != "adamw":
            assert all(torch.allclose(d[name], torch.full_like(d[name], 1 / RATIOS[name])) for name in names)
        flat = torch.cat([d[name].reshape(-1) for name in names]).float().numpy()
        assert np.allclose(captured.read(window_array("denominator", "main", step)), flat, rtol=1e-6)
    assert (captured.read(window_array("visits", "main", 0)) == 1 - first).all()

    queries = (x[:3], y[:3])
    if kind != "adamw":  # AdamW's first window is not captured: its SOURCE lacks a step featurize has
        args = sp.FitArguments(segments_per_stage=2)
        a = sp.fit(posthoc, args, progress=False).read("methods/source/train/main")
        b = sp.fit(captured.path, args, progress=False).read("methods/source/train/main")
        assert np.abs(a).max() > 0
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())
        theirs = sp.Attributor(posthoc.path, _mlp(), task, progress=False).scores(queries)
        ours = sp.Attributor(captured.path, _mlp(), task, progress=False).scores(queries)
        assert np.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())

    tracin = sp.fit_baseline(captured.path, sp.BaselineArguments(kind="tracin"), progress=False)
    effective = lr / (1 - 0.9) if kind != "adamw" else lr  # heavy-ball momentum's terminal rate
    recipe = tracin.meta["methods"]["tracin"]["query"]
    assert recipe["checkpoints"] == list(range(steps))
    assert np.allclose(recipe["weights"][first:], np.sqrt(effective / n))
    train = tracin.read("methods/tracin/train/main").reshape(n, steps, -1)[:, first:]
    want = np.stack([-np.sqrt(effective / n) * grads[step] for step in range(first, steps)], axis=1)
    assert np.allclose(train, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    projector = sp.projection.factory.projector_from_meta(captured.meta, _mlp(), captured)
    exact = np.zeros((len(queries[0]), n))
    for step in range(first, steps):
        model = trajectory.load_into(_mlp(), next(c for c in trajectory.checkpoints if c.step == step)).eval()
        d = checkpoint_preconditioner(trajectory, next(c for c in trajectory.checkpoints if c.step == step + 1), stage,
                                      names)  # fmt: skip
        q = PerExampleGradients(model, task, names)(queries, "measurement")
        q = projector.project({name: q[name] * d[name].rsqrt().float() for name in names}).double().numpy()
        exact -= effective / n * q @ grads[step].T
    ours = sp.Attributor(tracin.path, _mlp(), task, method="tracin", progress=False).scores(queries)
    assert np.abs(exact).max() > 0
    np.testing.assert_allclose(ours, exact, rtol=1e-3, atol=1e-5 * np.abs(exact).max())
    report = sp.verify_store(captured.path, progress=False)
    assert report.status == "ok" and not report.notes, report.notes


class _ArgmaxFisher(sp.ClassificationTask):
    """Fisher pseudo-labels = the model's own argmax, weight 2: deterministic, so a brute force can repeat them."""

    def fisher_targets(self, outputs, batch, draws):
        return [(torch.full_like(outputs[:, 0], 2.0), (batch[0], outputs.argmax(-1), *batch[2:]))]


class _DrawsSeen(sp.ClassificationTask):
    """Records the draws each sampled Fisher is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, list[int]]] = []

    def fisher_targets(self, outputs, batch, draws):
        if draws is not None:
            self.seen.append((draws.key, draws.rows.tolist()))
        return super().fisher_targets(outputs, batch, draws)


@pytest.mark.parametrize("fisher_forward", ["separate", "training"])
def test_captured_sampled_labels_are_keyed_on_the_seed_the_step_and_each_examples_row(
    tmp_path: Path, classification_data, fisher_forward: str
) -> None:
    """In-run capture draws an example's label from (seed, step) and its row in the stage's data, as featurize does
    from (seed, checkpoint, stage) and its row: not from the batch's position in its window."""
    task, steps = _DrawsSeen(), []
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=5, batch=8, save_every=3, task=task,
           options=sp.CaptureArguments(fisher_forward=fisher_forward, seed=4),
           on_batch=lambda model, rows, opt: steps.append(rows.tolist()))  # fmt: skip
    assert [rows for _, rows in task.seen] == steps
    assert [key for key, _ in task.seen] == [FisherDraws.key_of([4, step]) for step in range(5)]


@pytest.mark.parametrize(("fisher_every", "fisher_forward"), [(1, "separate"), (2, "separate"), (1, "training"),
                                                               (2, "training")])
def test_captured_windows_sum_each_visits_materialised_gradient_and_fisher(
    tmp_path: Path, classification_data, fisher_every: int, fisher_forward: str
) -> None:
    """Mini-batch SGD with momentum, 3 steps per window, dropout in the model: each window holds, per example,
    the sum over its visits of P ∇ℓ(z; θ_t) of the training-mode step, its visit count, and the sum of
    2·P∇ℓ(x, argmax)P∇ℓ(x, argmax)ᵀ on every ``fisher_every``-th batch of the window: in eval mode from a
    separate forward, or from the training forward itself (its dropout mask, its outputs' argmax), as
    ``fisher_forward`` says (brute force: materialised per-example gradients)."""
    x, y = classification_data.tensors
    n, batch, save_every, steps = len(y), 8, 3, 10
    projector = sp.FactoredProjector(
        [(name, tuple(p.shape)) for name, p in _mlp().named_parameters()],
        sp.projection.layers.factorable_layers(_mlp(), [n for n, _ in _mlp().named_parameters()])[0],
        DIM,
    )
    expected: dict[int, list] = {}

    def brute_force(model: nn.Module, rows: torch.Tensor, _) -> None:
        window = len(expected_steps) // save_every * save_every
        fisher_batch = (len(expected_steps) - window) % fisher_every == 0
        expected_steps.append(rows)
        sums, visits, fisher, count = expected.setdefault(window, [torch.zeros(n, DIM), torch.zeros(n), 0.0, 0])
        drop = masks.pop()
        g = torch.stack([_projected_gradient(projector, model, x[r], y[r], drop[i]) for i, r in enumerate(rows)])
        sums.index_add_(0, rows, g)
        visits.index_add_(0, rows, torch.ones(len(rows)))
        if not fisher_batch:
            return
        if fisher_forward == "training":
            first, last = model[0], model[3]
            labels = [last(torch.tanh(first(x[r][None])) * drop[i])[0].argmax() for i, r in enumerate(rows)]
            u = torch.stack([_projected_gradient(projector, model, x[r], label, drop[i])
                             for i, (r, label) in enumerate(zip(rows, labels, strict=True))])
            expected[window][2] = fisher + 2.0 * (u.T.double() @ u.double())
            expected[window][3] = count + len(rows)
            return
        eval_net = copy.deepcopy(model).eval()
        labels = eval_net(x[rows]).argmax(-1)
        names = [name for name, _ in model.named_parameters()]
        u = projector.project(PerExampleGradients(eval_net, sp.ClassificationTask(), names)((x[rows], labels)))
        expected[window][2] = fisher + 2.0 * (u.T.double() @ u.double())
        expected[window][3] = count + len(rows)

    expected_steps: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    model = _mlp(dropout=0.5)
    model[2].register_forward_hook(lambda m, _, out: masks.append((out != 0).float() / 0.5) if m.training else None)
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=steps, batch=batch, save_every=save_every,
           options=sp.CaptureArguments(chunk_rows=64, fisher_every=fisher_every, fisher_forward=fisher_forward),
           model=model, on_batch=brute_force,
           task=_ArgmaxFisher())
    store = sp.Store.open(tmp_path / "cap.sp")
    assert sorted(expected) == [0, 3, 6, 9]
    for start, (sums, visits, fisher, count) in expected.items():
        assert np.array_equal(store.read(window_array("visits", "main", start)), visits.numpy())
        assert np.allclose(store.read(window_array("grads", "main", start)), sums.numpy(), rtol=1e-4, atol=1e-5)
        assert np.allclose(store.read(window_array("fisher", "main", start)), fisher.numpy(), rtol=1e-4, atol=1e-6)
        assert store.read(window_array("fisher-count", "main", start))[0] == count


def _adam_scale(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """D^{-1/2} = ((√v̂ + ε)/r)^{-1/2} of every parameter, written out from Adam's state (bias-corrected v), r its
    group's rate over the largest group rate."""
    out = {}
    top = max(g["lr"] for g in optimizer.param_groups)
    for name, param in model.named_parameters():
        group = next(g for g in optimizer.param_groups if any(q is param for q in g["params"]))
        state = optimizer.state[param]
        v_hat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** float(state["step"]))
        out[name] = ((v_hat.sqrt() + group["eps"]) * top / group["lr"]).rsqrt().float()
    return out


@pytest.mark.parametrize("kind", ["adam", "adamw", "adamw 1:5"])
def test_adam_capture_takes_each_visit_in_the_coordinates_of_its_step(
    tmp_path: Path, classification_data, kind: str
) -> None:
    """Adam (coupled L2) and AdamW, also with groups at 1:5 (``_two_rates``), 3 steps per window, D^{-1/2} in its
    exact form on the layers (``adam_rank`` at least each layer's rank): each window holds the sum over visits of
    P(D_t^{-1/2} ⊙ ∇ℓ(z; θ_t)) with D_t the optimiser state the step began with (over each group's rate ratio r),
    the Fisher in the same coordinates, and D at the checkpoint closing it, as featurize reads it; the stage's first
    step (no state yet) is not captured. fit scales the query by the mean of a segment's windows' D, and turns
    Adam's coupled decay into λ·mean(1/D) (brute force: materialised gradients)."""
    x, y = classification_data.tensors
    n, batch, save_every, steps = len(y), 8, 3, 10
    names = [name for name, _ in _mlp().named_parameters()]
    projector = sp.FactoredProjector(
        [(name, tuple(p.shape)) for name, p in _mlp().named_parameters()],
        sp.projection.layers.factorable_layers(_mlp(), names)[0],
        DIM,
    )
    expected: dict[int, list] = {}
    seen: list[torch.Tensor] = []

    def brute_force(model: nn.Module, rows: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        window = len(seen) // save_every * save_every
        seen.append(rows)
        sums, visits, fisher, count = expected.setdefault(window, [torch.zeros(n, DIM), torch.zeros(n), 0.0, 0])
        if not opt.state:  # the first step: not captured
            return
        scale = _adam_scale(opt, model)
        grads = PerExampleGradients(model, sp.ClassificationTask(), names)((x[rows], y[rows]))
        sums.index_add_(0, rows, projector.project({name: grads[name] * scale[name] for name in names}))
        visits.index_add_(0, rows, torch.ones(len(rows)))
        eval_net = copy.deepcopy(model).eval()
        pseudo = PerExampleGradients(eval_net, sp.ClassificationTask(), names)((x[rows], eval_net(x[rows]).argmax(-1)))
        u = projector.project({name: pseudo[name] * scale[name] for name in names}).double()
        expected[window][2] = fisher + 2.0 * (u.T @ u)
        expected[window][3] = count + len(rows)

    decay = 1e-3 if kind == "adam" else 1e-2
    optimizer = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    groups = (lambda params: _two_rates(params, 0.01)) if kind == "adamw 1:5" else list
    projection = sp.ProjectionArguments(dim=DIM, kind="factored", adam_rank=8)  # ≥ min(d_out, d_in + 1): exact
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=steps, batch=batch,
           save_every=save_every, options=sp.CaptureArguments(chunk_rows=64, scale_every=1), on_batch=brute_force,
           task=_ArgmaxFisher(), projection=projection,
           optimizer=lambda params: optimizer(groups(params), lr=0.01, weight_decay=decay))  # fmt: skip
    store = sp.Store.open(tmp_path / "cap.sp")
    trajectory = sp.Trajectory.load(tmp_path / "run")
    stage = trajectory.stage("main")
    assert sorted(expected) == [0, 3, 6, 9]
    denominators = {}
    for start, (sums, visits, fisher, count) in expected.items():
        assert np.array_equal(store.read(window_array("visits", "main", start)), visits.numpy())
        assert np.allclose(store.read(window_array("grads", "main", start)), sums.numpy(), rtol=1e-4, atol=1e-5)
        assert np.allclose(store.read(window_array("fisher", "main", start)), fisher.numpy(), rtol=1e-4, atol=1e-6)
        assert store.read(window_array("fisher-count", "main", start))[0] == count
        closing = next(c for c in trajectory.checkpoints if c.step == min(start + save_every, steps))
        saved = checkpoint_preconditioner(trajectory, closing, stage, names)
        denominators[start] = torch.cat([saved[name].reshape(-1) for name in names])
        assert np.allclose(store.read(window_array("denominator", "main", start)), denominators[start].numpy())
    assert expected[0][1][seen[0]].sum() == 0 and expected[0][1].sum() == 2 * batch

    with pytest.warns(UserWarning, match="had no visit inside their segment"):  # segments shorter than an epoch
        sp.fit(store.path, sp.FitArguments(segments_per_stage=2), progress=False)
    method = sp.Store.open(store.path).meta["methods"]["source"]
    segments = method["segments"]
    assert [s["checkpoints"] for s in segments] == [[0, 3], [6, 9]]
    for index, (seg, windows) in enumerate(zip(segments, [(0, 3), (6, 9)], strict=True)):
        mean = (denominators[windows[0]] + denominators[windows[1]]) / 2
        assert seg["preconditioner"] == f"methods/source/preconditioner/{index}"
        assert np.allclose(store.read(seg["preconditioner"]), mean.rsqrt().numpy(), rtol=1e-5)
        # AdamW: r·λ per coordinate, added as its mean
        ratio = torch.cat([torch.full((p.numel(),), RATIOS[name] if kind == "adamw 1:5" else 1.0)
                           for name, p in _mlp().named_parameters()])  # fmt: skip
        coupled = decay * float(mean.reciprocal().mean()) if kind == "adam" else decay * float(ratio.mean())
        assert seg["weight_decay"] == pytest.approx(coupled, rel=1e-5)
    assert method["query"]["scales"] == [segments[-1]["preconditioner"]]
    scores = sp.Attributor(store.path, _mlp(), _ArgmaxFisher(), progress=False).scores(classification_data)
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    report = sp.verify_store(store.path, progress=False)
    assert report.status == "ok" and not report.notes, report.notes


def test_baselines_on_a_captured_adam_store_scale_the_query_as_the_training_side(
    tmp_path: Path, classification_data
) -> None:
    """Captured AdamW windows and end pass hold D^{-1/2}-scaled gradients, so the baselines' queries must be in the
    same coordinates: Grad-Dot −⟨P D_T^{-1/2} ∇f(q; θ_T), P D_T^{-1/2} ∇ℓ(z; θ_T)⟩ with D_T from the final state,
    and TracIn's query at a window's checkpoint scaled by the D of the checkpoint closing that window (brute force:
    materialised gradients, the optimizer states read from the checkpoints, D^{-1/2} exact at adam_rank 8)."""
    x, y = classification_data.tensors
    names = [name for name, _ in _mlp().named_parameters()]
    projector = sp.FactoredProjector(
        [(name, tuple(p.shape)) for name, p in _mlp().named_parameters()],
        sp.projection.layers.factorable_layers(_mlp(), names)[0],
        DIM,
    )
    projection = sp.ProjectionArguments(dim=DIM, kind="factored", adam_rank=8)
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=7, batch=8, save_every=3,
           options=sp.CaptureArguments(chunk_rows=64, scale_every=1), projection=projection,
           datasets={"main": classification_data},
           optimizer=lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.01))  # fmt: skip
    trajectory = sp.Trajectory.load(tmp_path / "run")
    stage = trajectory.stage("main")
    queries = (x[:3], y[:3])

    def projected(step: int, closing: int, batch, quantity: str) -> torch.Tensor:
        model = trajectory.load_into(_mlp(), next(c for c in trajectory.checkpoints if c.step == step)).eval()
        d = checkpoint_preconditioner(trajectory, next(c for c in trajectory.checkpoints if c.step == closing), stage,
                                      names)  # fmt: skip
        grads = PerExampleGradients(model, sp.ClassificationTask(), names)(batch, quantity)
        return projector.project({n: grads[n] * d[n].rsqrt().float() for n in names}).double()

    store = sp.fit_baseline(tmp_path / "cap.sp", sp.BaselineArguments(kind="grad-dot"), progress=False)
    ours = sp.Attributor(store.path, _mlp(), sp.ClassificationTask(), method="grad-dot").scores(queries)
    exact = -(projected(7, 7, queries, "measurement") @ projected(7, 7, (x, y), "loss").T).numpy()
    np.testing.assert_allclose(ours, exact, rtol=1e-3, atol=1e-5 * np.abs(exact).max())

    store = sp.fit_baseline(tmp_path / "cap.sp", sp.BaselineArguments(kind="tracin"), progress=False)
    ours = sp.Attributor(store.path, _mlp(), sp.ClassificationTask(), method="tracin").scores(queries)
    recipe = store.meta["methods"]["tracin"]["query"]
    assert recipe["checkpoints"] == [0, 3, 6]
    exact = np.zeros_like(ours)
    for window, weight in zip(recipe["checkpoints"], recipe["weights"], strict=True):
        sums = store.read(window_array("grads", "main", window)).astype(np.float64)
        q = projected(window, min(window + 3, 7), queries, "measurement").numpy()
        exact -= weight**2 * q @ sums.T
    np.testing.assert_allclose(ours, exact, rtol=1e-3, atol=1e-5 * np.abs(exact).max())
    report = sp.verify_store(store.path, progress=False)
    assert report.status == "ok" and not report.notes, report.notes


def _projected_gradient(
    projector: sp.FactoredProjector, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """P ∇ℓ of one example through the MLP with a given dropout mask (materialised, plain autograd)."""
    first, last = model[0], model[3]
    loss = F.cross_entropy(last(torch.tanh(first(x[None])) * mask)[0], y)
    names = ["0.weight", "0.bias", "3.weight", "3.bias"]
    grads = torch.autograd.grad(loss, [first.weight, first.bias, last.weight, last.bias])
    return projector.project({n: g[None] for n, g in zip(names, grads, strict=True)})[0]


def test_capture_leaves_training_and_the_random_state_unchanged(tmp_path: Path, classification_data) -> None:
    """The sampled Fisher's extra pass runs in eval mode with its own generator: a captured run with dropout
    ends with bit-identical weights and global random state to an uncaptured one."""
    torch.manual_seed(5)
    plain = _train(tmp_path / "a", None, classification_data, steps=7, batch=8, save_every=3, model=_mlp(dropout=0.3))
    plain_state = torch.get_rng_state()
    torch.manual_seed(5)
    captured = _train(tmp_path / "b", tmp_path / "b.sp", classification_data, steps=7, batch=8, save_every=3,
                      model=_mlp(dropout=0.3), options=sp.CaptureArguments(chunk_rows=64))
    assert torch.equal(torch.get_rng_state(), plain_state)
    for (name, a), (_, b) in zip(plain.state_dict().items(), captured.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not any(m._forward_hooks for m in captured.modules())  # close() removed the layer hooks


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    store = sp.Store.open(path)
    return {name: store.read(name) for name in store.progress_arrays("capture/")}


@pytest.mark.parametrize("crash", ["mid-window", "while-writing"])
def test_killed_captured_run_resumes_into_the_store_of_an_uninterrupted_run(
    tmp_path: Path, classification_data, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch, crash: str
) -> None:
    """Killed between checkpoints, or while a window's chunks are being written: the resumed run (recorder
    and capture on the same directories) ends with the run, windows (and the end pass of its 3.7 epochs) and
    trajectory of an uninterrupted one. Before it trains, the resumed capture holds the windows before its
    checkpoint only: the one cut short from that checkpoint (while-writing) is dropped, not left to be overwritten."""
    kwargs = _fourteen_steps("factored")
    if crash == "mid-window":
        with pytest.raises(_Killed):
            _train(tmp_path / "b", tmp_path / "b.sp", classification_data, crash_after=10, **kwargs)
    else:
        _killed_while_writing(monkeypatch, tmp_path / "b.sp", "capture/grads/main/step-00000004",
                              lambda: _train(tmp_path / "b", tmp_path / "b.sp", classification_data, **kwargs))
    resumed_at = max(int(p.stem.removeprefix("step-")) for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert resumed_at == (8 if crash == "mid-window" else 4)

    def windows_before_the_resume() -> None:
        names = sp.Store.open(tmp_path / "b.sp").progress_arrays("capture/grads/")
        assert [int(n.rsplit("-", 1)[1]) for n in names] == list(range(0, resumed_at, 4))

    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, on_start=windows_before_the_resume,
           **kwargs)  # fmt: skip
    a, b = sp.Trajectory.load(uninterrupted / "factored"), sp.Trajectory.load(tmp_path / "b")
    assert a.fingerprint() == b.fingerprint() and [c.step for c in b.checkpoints] == [0, 4, 8, 12, 14]
    expected, got = _store_arrays(uninterrupted / "factored.sp"), _store_arrays(tmp_path / "b.sp")
    assert sorted(expected) == sorted(got) and len(expected) == 17 and window_array("end", "main", 12) in got
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    meta = sp.Store.open(tmp_path / "b.sp").meta
    assert meta["captured"] and meta["trajectory"]["fingerprint"] == a.fingerprint()
    # The reference batch was written when the killed run took it: the resumed store fingerprints the same examples.
    through = sp.Store.open(uninterrupted / "factored.sp")
    assert np.array_equal(through.read(REFERENCE_BATCH), sp.Store.open(tmp_path / "b.sp").read(REFERENCE_BATCH))
    assert meta["fingerprint"] == through.meta["fingerprint"] and meta["fingerprint"]["data"] is not None
    _refuses_another_activation(tmp_path / "b", tmp_path / "b.sp")


def _hooks_on(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The hooks on ``model``'s modules and parameters and on ``optimizer``'s steps."""
    on_modules = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     + len(m._backward_pre_hooks) for m in model.modules())  # fmt: skip
    on_params = sum(len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {}) for p in model.parameters())
    return on_modules + on_params + len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)


@pytest.mark.parametrize("within", [True, False], ids=["with-recorder", "plain-loop"])
def test_a_captured_loop_that_raised_resumes_in_the_same_process_on_the_same_model_into_the_uninterrupted_store(
    tmp_path: Path, classification_data, uninterrupted: Path, within: bool
) -> None:
    """The loop's loss raises (a KeyboardInterrupt) at step 10, inside the capture block. Inside ``with rec:`` the
    recorder's and capture's hooks come off as it leaves the block (``detach``); a plain loop leaves them, and
    ``TrajectoryRecorder.resume`` on the same model takes them off. Resumed in the same process with the same model
    and optimizer, run and store are the uninterrupted run's, and no hook is left (the stale layer taps once fired
    in the new capture's first check and refused the run)."""
    kwargs = _fourteen_steps("factored")
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    same = {"model": model, "optimizer": lambda _: opt, "within": within}
    assert _hooks_on(model, opt) == 0
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, fail_at=10, **same, **kwargs)
    assert (_hooks_on(model, opt) == 0) is within
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, **same, **kwargs)
    assert _hooks_on(model, opt) == 0
    a = uninterrupted / "factored"
    assert sp.Trajectory.load(a).fingerprint() == sp.Trajectory.load(tmp_path / "b").fingerprint()
    expected, got = _store_arrays(uninterrupted / "factored.sp"), _store_arrays(tmp_path / "b.sp")
    assert sorted(expected) == sorted(got) and len(expected) == 17
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    assert sp.Store.open(tmp_path / "b.sp").meta["fingerprint"] == sp.Store.open(f"{a}.sp").meta["fingerprint"]


def test_a_batch_whose_capture_block_raised_is_forgotten_so_a_loop_that_skips_it_captures_as_one_that_never_took_it(
    tmp_path: Path, classification_data
) -> None:
    """A loop whose own check refuses a batch after its backward (raising inside the capture block) and goes on
    without stepping: the batch is forgotten, so run and store equal those of a loop that never took it (it was
    once committed by the next batch's begin, its examples counted as visited and its gradients summed though no
    step trained on them). The empirical Fisher, from the committed gradients, makes every array comparable."""
    x, y = classification_data.tensors

    def run(name: str, raising: bool) -> None:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rec = sp.TrajectoryRecorder(tmp_path / name, model, opt, save_every=3)
        cap = sp.GradientCapture(rec, tmp_path / f"{name}.sp", sp.ClassificationTask(), projection=_projection(),
                                 options=sp.CaptureArguments(fisher="empirical", chunk_rows=8))  # fmt: skip
        rec.begin_stage("main", dataset_size=len(y))
        for b in range(8):
            rows = _order(b // 5, len(y))[6 * (b % 5) : 6 * (b % 5) + 6]
            if b == 4 and not raising:
                continue
            try:
                with cap.batch((rows, (x[rows], y[rows]))) as (bx, by):
                    loss = F.cross_entropy(model(bx), by)
                    opt.zero_grad()
                    loss.backward()
                    if b == 4:
                        raise FloatingPointError  # the loop's own check refuses the step
            except FloatingPointError:
                continue
            opt.step()
            rec.step()
        rec.close()

    run("skipped", raising=False)
    run("raised", raising=True)
    skipped, raised = sp.Trajectory.load(tmp_path / "skipped"), sp.Trajectory.load(tmp_path / "raised")
    assert skipped.fingerprint() == raised.fingerprint()
    expected, got = _store_arrays(tmp_path / "skipped.sp"), _store_arrays(tmp_path / "raised.sp")
    assert sorted(expected) == sorted(got) and expected
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name


def test_a_copy_of_a_run_that_trained_on_into_the_same_store_is_refused_where_its_windows_differ(
    tmp_path: Path, classification_data
) -> None:
    """Two copies of one run (``cp -r``) share the run's name, so either resumes into its store. Copy A trained on to
    step 12 into the store; copy B, resumed into it at step 8, dropped A's window from step 8 and wrote its own (a
    run of its own from there); A, resumed at its checkpoint 12, took B's window from step 8 as its own and ended with
    a store mixing the two runs. Each window records the checkpoint that closed it: A is refused, the store kept."""
    kwargs = {"steps": 14, "batch": 8, "save_every": 4, "options": sp.CaptureArguments(chunk_rows=8)}
    store = tmp_path / "s.sp"
    with pytest.raises(_Killed):
        _train(tmp_path / "a", store, classification_data, crash_after=10, **kwargs)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with pytest.raises(_Killed):
        _train(tmp_path / "a", store, classification_data, resume=True, crash_after=13, **kwargs)

    def halved(model: nn.Module, rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        for p in model.parameters():
            p.grad.mul_(0.5)

    with pytest.raises(_Killed):  # B trains otherwise from step 8 on
        _train(tmp_path / "b", store, classification_data, resume=True, crash_after=13, on_batch=halved, **kwargs)
    before = _files(store)
    with pytest.raises(sp.StoreError, match=r"window of stage 'main' from step 8 closed by another checkpoint at "
                                            r"step 12 than this run's"):  # fmt: skip
        _train(tmp_path / "a", store, classification_data, resume=True, **kwargs)
    assert _files(store) == before
    _train(tmp_path / "b", store, classification_data, resume=True, on_batch=halved, **kwargs)  # B goes on with it
    assert sp.Store.open(store).meta["trajectory"]["fingerprint"] == sp.Trajectory.load(tmp_path / "b").fingerprint()


def test_a_captured_store_whose_run_moved_is_queried_with_the_runs_new_place(
    tmp_path: Path, classification_data
) -> None:
    """The query of a captured store whose run moved names the run's new place as the way out (not featurize, which
    does not take a captured store), and answers as before with it."""
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=6, batch=10, save_every=3,
           options=sp.CaptureArguments(chunk_rows=64))  # fmt: skip
    sp.fit(tmp_path / "cap.sp", progress=False)
    expected = sp.Attributor(tmp_path / "cap.sp", _mlp(), sp.ClassificationTask(), progress=False).scores(
        classification_data
    )
    (tmp_path / "run").rename(tmp_path / "moved")
    with pytest.raises(sp.StoreError, match=r"where there is no run now .*\(Attributor's trajectory=\)\.$"):
        sp.Attributor(tmp_path / "cap.sp", _mlp(), sp.ClassificationTask(), progress=False)
    moved = sp.Attributor(tmp_path / "cap.sp", _mlp(), sp.ClassificationTask(), trajectory=tmp_path / "moved",
                          progress=False)  # fmt: skip
    assert np.array_equal(moved.scores(classification_data), expected)


@pytest.mark.parametrize("kind", ["factored", "eigen"])
def test_a_finished_captured_run_rewound_to_an_earlier_checkpoint_trains_into_the_uninterrupted_store(
    tmp_path: Path, classification_data, uninterrupted: Path, kind: str
) -> None:
    """``TrajectoryRecorder.resume(at_step=8)`` on a finished captured run (checkpoints 0, 4, 8, 12, 14; the end pass
    at 14): the recorder forgets steps 9-14 and deletes their checkpoints at once, capture drops the windows from
    step 8 (and the end pass) and its eigen basis sums are those of the windows before; trained again over the same
    batches, run and store equal the uninterrupted ones, array for array. A step without a checkpoint is refused."""
    kwargs = _fourteen_steps(kind)
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, **kwargs)
    with pytest.raises(sp.TrajectoryError, match=r"has no checkpoint at step 9 to rewind to \(its checkpoints: steps "
                                                 r"0, 4, 8, 12, 14\); resume from one of those steps\.$"):
        sp.TrajectoryRecorder.resume(tmp_path / "b", _mlp(), torch.optim.SGD(_mlp().parameters()), save_every=4,
                                     at_step=9)  # fmt: skip
    rewound = sp.TrajectoryRecorder.resume(tmp_path / "b", _mlp(), torch.optim.SGD(_mlp().parameters()),
                                           save_every=4, at_step=8)  # fmt: skip
    assert rewound.global_step == 8 and rewound.checkpoint_steps == [0, 4, 8]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == [
        f"step-{s:08d}.pt" for s in (0, 4, 8)
    ]
    sp.GradientCapture(rewound, tmp_path / "b.sp", sp.ClassificationTask(), projection=kwargs["projection"],
                       options=kwargs["options"], datasets=kwargs["datasets"]).close()  # fmt: skip
    windows = {int(n.rsplit("-", 1)[1]) for n in sp.Store.open(tmp_path / "b.sp").progress_arrays("capture/grads/")}
    assert windows == {0, 4}  # the windows from step 8 on, and the end pass, are gone
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, at_step=8, **kwargs)
    a, b = sp.Trajectory.load(uninterrupted / kind), sp.Trajectory.load(tmp_path / "b")
    assert a.fingerprint() == b.fingerprint() and [c.step for c in b.checkpoints] == [0, 4, 8, 12, 14]
    expected, got = _store_arrays(uninterrupted / f"{kind}.sp"), _store_arrays(tmp_path / "b.sp")
    assert sorted(expected) == sorted(got) and window_array("end", "main", 12) in got
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    meta = sp.Store.open(tmp_path / "b.sp").meta
    assert meta["captured"] and meta["trajectory"]["fingerprint"] == a.fingerprint()
    assert meta.get("capture_bases") == sp.Store.open(uninterrupted / f"{kind}.sp").meta.get("capture_bases")
    # Its history: the finished run it was, and the rewind (`source-proj info` prints it).
    assert [(g["checkpoints"], g.get("rewound_to")) for g in meta["growth"]] == [([0, 4, 8, 12, 14], 8)]
    shown = CliRunner().invoke(main, ["info", str(tmp_path / "b.sp")])
    assert "grown from the run with checkpoints [0, 4, 8, 12, 14], rewound to step 8" in shown.output


def test_a_store_captured_before_fisher_forward_existed_resumes_with_the_separate_pass(
    tmp_path: Path, classification_data
) -> None:
    """Stores written before ``CaptureArguments.fisher_forward`` existed took the Fisher by the separate pass: a
    killed run of one resumes with ``fisher_forward="separate"``, and is refused in one sentence by the new default."""
    separate = sp.CaptureArguments(chunk_rows=8, fisher_forward="separate")
    kwargs = {"steps": 10, "batch": 8, "save_every": 4, "datasets": {"main": classification_data}}
    with pytest.raises(_Killed):
        _train(tmp_path / "run", tmp_path / "s.sp", classification_data, crash_after=6, options=separate, **kwargs)
    store = sp.Store.open(tmp_path / "s.sp", writable=True)
    store.update_meta(capture={k: v for k, v in store.meta["capture"].items() if k != "fisher_forward"})
    with pytest.raises(sp.StoreError, match=r"other settings or another run \(fisher_forward='separate' there, "
                       r"fisher_forward='training' here\); capture with the settings it was made with"):
        _train(tmp_path / "run", tmp_path / "s.sp", classification_data, resume=True,
               options=sp.CaptureArguments(chunk_rows=8), **kwargs)  # fmt: skip
    _train(tmp_path / "run", tmp_path / "s.sp", classification_data, resume=True, options=separate, **kwargs)
    assert sp.Store.open(tmp_path / "s.sp").meta["captured"]


def _refuses_another_activation(run: Path, store: Path) -> None:
    """The store's model with ReLU for Tanh, holding the run's final checkpoint, is refused by ``check_model``."""
    relu = _mlp(activation=nn.ReLU)
    trajectory = sp.Trajectory.load(run)
    trajectory.load_into(relu, trajectory.final_checkpoint)
    with pytest.raises(sp.TaskError, match=f"the store at {store} was captured from"):
        check_model(sp.Store.open(store), relu, sp.ClassificationTask(), torch.device("cpu"))


def test_verify_checks_a_captured_store_and_a_damaged_window_stops_fit(tmp_path: Path, classification_data) -> None:
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=8, batch=10, save_every=4,
           options=sp.CaptureArguments(chunk_rows=16))
    report = sp.verify_store(tmp_path / "cap.sp", progress=False)
    assert report.status == "ok" and report.arrays == 10 and not report.notes  # 2 windows × 4 arrays, lr, reference
    grads = tmp_path / "cap.sp" / "capture" / "grads" / "main" / "step-00000004" / "c" / "1" / "0"
    grads.write_bytes(bytes(len(grads.read_bytes())))
    report = sp.verify_store(tmp_path / "cap.sp", repair=True, progress=False)
    assert [d[:2] for d in report.damaged] == [("capture/grads/main/step-00000004", 1)]
    assert "capture the run again" in report.next_steps[0]
    with pytest.raises(sp.StoreError, match="still being captured"):
        sp.fit(tmp_path / "cap.sp", progress=False)


@pytest.mark.slow
def test_a_captured_adamw_run_at_a_ratio_of_rates_trained_further_is_the_store_of_the_longer_run(
    tmp_path: Path, classification_data
) -> None:
    """AdamW with groups at 1:5, captured to step 4 and fitted, then resumed and trained on to step 10 (its store
    grows by two windows): its windows, denominators and SOURCE are those of a run captured to step 10 at once."""
    kwargs = {"batch": 8, "save_every": 4, "options": sp.CaptureArguments(chunk_rows=8, end_pass=False),
              "optimizer": lambda params: torch.optim.AdamW(_two_rates(params, 0.01))}
    _train(tmp_path / "a", tmp_path / "a.sp", classification_data, steps=10, **kwargs)
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, steps=4, **kwargs)
    sp.fit(tmp_path / "b.sp", progress=False)
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, steps=10, resume=True, **kwargs)
    expected, got = _store_arrays(tmp_path / "a.sp"), _store_arrays(tmp_path / "b.sp")
    assert sorted(expected) == sorted(got) and sum(n.startswith("capture/denominator/") for n in got) == 3
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    assert sp.verify_store(tmp_path / "b.sp", progress=False).status == "ok"
    a, b = (sp.fit(tmp_path / f"{n}.sp", progress=False).read("methods/source/train/main") for n in "ab")
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_a_captured_sgd_run_grown_by_an_adamw_stage_at_a_ratio_is_the_run_captured_at_once(
    tmp_path: Path, classification_data
) -> None:
    """An SGD stage captured and fitted, then resumed into a new AdamW stage with groups at 1:5 on new examples: the
    grown store is the one capture writes for the two stages in one go, and so are SOURCE's, TracIn's and IF's
    scores."""
    y = classification_data.tensors[1]
    more = TensorDataset(torch.randn(12, 4, generator=torch.Generator().manual_seed(3)), torch.arange(12) % 3)
    options = sp.CaptureArguments(chunk_rows=8)

    def steps(rec, cap, model, opt, data, n: int, batch: int) -> None:
        inputs, labels = data.tensors
        for i in range(n):
            rows = _order(rec.global_step + i, len(labels))[:batch]
            with cap.batch((rows, (inputs[rows], labels[rows]))) as (bx, by):
                opt.zero_grad()
                F.cross_entropy(model(bx), by).backward()
            opt.step()
            rec.step()

    def run(name: str, at_once: bool) -> sp.Store:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rec = sp.TrajectoryRecorder(tmp_path / name, model, opt, save_every=3, save_optimizer_state=True)
        datasets = {"main": classification_data, **({"more": more} if at_once else {})}
        cap = sp.GradientCapture(rec, tmp_path / f"{name}.sp", sp.ClassificationTask(), projection=_projection(),
                                 options=options, datasets=datasets)  # fmt: skip
        rec.begin_stage("main", dataset_size=len(y))
        steps(rec, cap, model, opt, classification_data, 6, 8)
        if not at_once:
            rec.close()
            sp.fit(tmp_path / f"{name}.sp", progress=False)
            model = _mlp()
            rec = sp.TrajectoryRecorder.resume(tmp_path / name, model, torch.optim.SGD(model.parameters(), lr=0.1),
                                               save_every=3)  # fmt: skip
            cap = sp.GradientCapture(rec, tmp_path / f"{name}.sp", sp.ClassificationTask(), projection=_projection(),
                                     options=options, datasets={"more": more})  # fmt: skip
        adamw = torch.optim.AdamW(_two_rates(list(model.parameters()), 0.01))
        rec.begin_stage("more", dataset_size=len(more), optimizer=adamw)
        steps(rec, cap, model, adamw, more, 6, 4)
        rec.close()
        store = sp.fit(tmp_path / f"{name}.sp", progress=False)
        for kind in ("tracin", "if"):
            sp.fit_baseline(store, sp.BaselineArguments(kind=kind), progress=False)
        return store

    once, grown = run("once", True), run("grown", False)
    expected, got = _store_arrays(once.path), _store_arrays(grown.path)
    assert sorted(expected) == sorted(got) and any(n.startswith("capture/denominator/more/") for n in got)
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    assert grown.meta["fingerprint"] == once.meta["fingerprint"] and len(grown.meta["growth"]) == 1
    assert sp.verify_store(grown.path, progress=False).status == "ok"
    for method in ("source", "tracin", "if"):
        a, b = (sp.Attributor(s, _mlp(), sp.ClassificationTask(), method=method).scores(more) for s in (once, grown))
        assert np.array_equal(a, b), method


def test_featurize_grow_of_a_captured_store_says_it_grows_by_training_not_to_repeat_options(
    tmp_path: Path, classification_data
) -> None:
    """A captured run trained further without capture, then featurize(grow=True) into its captured store: it said to
    repeat the options of the store's "first featurize" with --grow, which none can; it says how a captured store
    grows, and leaves it as it was."""
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=2, batch=8, save_every=2,
           options=sp.CaptureArguments(chunk_rows=8, end_pass=False))  # fmt: skip
    _train(tmp_path / "run", None, classification_data, steps=4, batch=8, save_every=2, resume=True)
    before = _files(tmp_path / "cap.sp")
    with pytest.raises(sp.StoreError, match="was captured during training, so it grows only as its run trains further"):
        sp.featurize(tmp_path / "run", _mlp(), sp.ClassificationTask(), classification_data, tmp_path / "cap.sp",
                     projection=_projection(), progress=False, grow=True)  # fmt: skip
    assert _files(tmp_path / "cap.sp") == before


def test_a_captured_store_refuses_the_checkpoints_average_which_it_has_no_checkpoints_features_for(
    tmp_path: Path, classification_data
) -> None:
    """fit with average="checkpoints" on a captured store once fitted its windows' visit average silently, recording
    no average: asked for the paper's plain mean of the checkpoints, it is refused in one sentence, as --fast is."""
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=8, batch=10, save_every=4,
           options=sp.CaptureArguments(chunk_rows=16))  # fmt: skip
    with pytest.raises(sp.StoreError, match="captured during training, so each segment averages its examples' visits"):
        sp.fit(tmp_path / "cap.sp", sp.FitArguments(average="checkpoints"), progress=False)
    assert not sp.Store.open(tmp_path / "cap.sp").meta.get("methods")
    sp.fit(tmp_path / "cap.sp", progress=False)  # the default, "steps", is the visits' average


@pytest.mark.parametrize("end_pass", [False, True])
def test_a_captured_store_grows_with_a_run_that_trains_a_new_stage_on_new_examples(
    tmp_path: Path, classification_data, end_pass: bool
) -> None:
    """A finished captured run is resumed and trains a second stage on more data: the store keeps the first
    stage's windows as they were, adds the new ones, drops the fitted method and records the growth; its model
    fingerprint is the new θ_T's, its data fingerprint the first stage's and the new one's."""
    options = sp.CaptureArguments(chunk_rows=64, end_pass=end_pass)
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=6, batch=10, save_every=3, options=options,
           datasets={"main": classification_data})
    before = _store_arrays(tmp_path / "cap.sp")
    first = sp.Store.open(tmp_path / "cap.sp").meta["fingerprint"]
    sp.fit(tmp_path / "cap.sp", progress=False)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    rec = sp.TrajectoryRecorder.resume(tmp_path / "run", model, opt, save_every=3)
    more = TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,)))
    cap = sp.GradientCapture(rec, tmp_path / "cap.sp", sp.ClassificationTask(), projection=_projection(),
                             options=options, datasets={"more": more})
    rec.begin_stage("more", dataset_size=len(more))
    for batch in DataLoader(sp.IndexedDataset(more), batch_size=4, shuffle=True):
        with cap.batch(batch) as (x, y):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step()
    rec.close()
    store = sp.Store.open(tmp_path / "cap.sp")
    after = _store_arrays(tmp_path / "cap.sp")
    assert all(np.array_equal(before[name], after[name]) for name in before)
    kinds = ("fisher", "fisher-count", "grads", "visits") + (("end",) if end_pass else ())
    added = {window_array(kind, "more", 6) for kind in kinds}  # the first stage's end pass is kept, not taken again
    assert set(after) - set(before) == added
    assert (after[window_array("visits", "more", 6)] == 1).all()
    assert store.meta["growth"][0] == {"checkpoints": [0, 3, 6], "fingerprint": store.meta["growth"][0]["fingerprint"],
                                       "dropped_methods": ["source"], "finished": True}
    assert store.meta["trajectory"]["checkpoints"] == [0, 3, 6, 9] and not store.meta["methods"]
    fingerprint = store.meta["fingerprint"]
    values = model_fingerprint(model, sp.ClassificationTask(), load_reference_batch(store), torch.device("cpu"))
    assert fingerprint["model"] == {"step": 9, "values": values} and values != first["model"]["values"]
    assert fingerprint["data"] == {"main": first["data"]["main"], **data_fingerprint({"more": more})}
    fitted = sp.fit(store, sp.FitArguments(segments_per_stage=1), progress=False)
    assert fitted.read("methods/source/train/more").shape == (12, DIM)
    assert sp.verify_store(store.path, progress=False).status == "ok"


def test_a_captured_growth_refused_on_a_bad_new_example_resumes_with_it_fixed_keeping_the_earlier_windows(
    tmp_path: Path, classification_data
) -> None:
    """A finished captured run resumed into a new stage with an example of infinite input: its training step diverges
    and capture refuses the next batch, keeping the earlier windows (capture marks no store as stopped: nothing after
    the last checkpoint is written). Resumed from that checkpoint with the example fixed, the new stage's data were
    refused as not those the run trained on (recorded as the stage began), though no kept window read them: the
    earlier windows were lost to a capture from the start. The run now grows with the fixed data, its store that of a
    growth with them from the start."""
    options = sp.CaptureArguments(chunk_rows=64)
    g = torch.Generator().manual_seed(5)
    more = TensorDataset(torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g))
    x, y = (t.clone() for t in more.tensors)
    x[3, 1] = float("inf")  # a finite loss (tanh saturates), a NaN gradient

    def grow(name: str, data: TensorDataset, begin: bool = True) -> None:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        rec = sp.TrajectoryRecorder.resume(tmp_path / name, model, opt, save_every=3)
        cap = sp.GradientCapture(rec, tmp_path / f"{name}.sp", sp.ClassificationTask(), projection=_projection(),
                                 options=options, datasets={"more": data})  # fmt: skip
        if begin:
            rec.begin_stage("more", dataset_size=len(data))
        for batch in DataLoader(sp.IndexedDataset(data), batch_size=4):
            with cap.batch(batch) as (inputs, targets):
                opt.zero_grad()
                F.cross_entropy(model(inputs), targets).backward()
            opt.step()
            rec.step()
        rec.close()

    for name in ("run", "clean"):
        _train(tmp_path / name, tmp_path / f"{name}.sp", classification_data, steps=6, batch=10, save_every=3,
               options=options, datasets={"main": classification_data})  # fmt: skip
    before = _store_arrays(tmp_path / "run.sp")
    with pytest.raises(sp.NumericalError, match="outputs on the training batch at step 7 are NaN or infinite"):
        grow("run", TensorDataset(x, y))
    stopped = _store_arrays(tmp_path / "run.sp")
    assert set(stopped) == set(before) and all(np.array_equal(before[name], stopped[name]) for name in before)
    grow("run", more, begin=False)  # the run goes on with its stage "more" from its checkpoint at step 6
    grow("clean", more)
    grown, clean = _store_arrays(tmp_path / "run.sp"), _store_arrays(tmp_path / "clean.sp")
    assert all(np.array_equal(before[name], grown[name]) for name in before)
    assert set(grown) == set(clean) > set(before)
    for name, values in clean.items():
        assert np.array_equal(grown[name], values), name
    meta, reference = sp.Store.open(tmp_path / "run.sp").meta, sp.Store.open(tmp_path / "clean.sp").meta
    assert meta["fingerprint"] == reference["fingerprint"] and meta["captured"]
    assert [g["checkpoints"] for g in meta["growth"]] == [[0, 3, 6]]


def test_a_captured_growth_killed_after_noting_itself_is_noted_once(
    tmp_path: Path, classification_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished captured run resumed to train further notes its growth, then marks the store unfinished; killed in
    between, the next resume noted the growth again (a second entry, dropping no fit)."""
    options = sp.CaptureArguments(chunk_rows=64)
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=6, batch=10, save_every=3, options=options)
    sp.fit(tmp_path / "cap.sp", progress=False)
    update = sp.Store.update_meta

    def killed(store: sp.Store, **fields: object) -> None:
        if fields.get("captured") is False:
            raise _Killed
        update(store, **fields)

    def resume() -> None:
        model = _mlp()
        rec = sp.TrajectoryRecorder.resume(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1),
                                           save_every=3)  # fmt: skip
        sp.GradientCapture(rec, tmp_path / "cap.sp", sp.ClassificationTask(), projection=_projection(),
                           options=options).close()  # fmt: skip

    monkeypatch.setattr(sp.Store, "update_meta", killed)
    with pytest.raises(_Killed):
        resume()
    monkeypatch.undo()
    resume()
    meta = sp.Store.open(tmp_path / "cap.sp").meta
    assert [(g["checkpoints"], g["dropped_methods"]) for g in meta["growth"]] == [([0, 3, 6], ["source"])]
    assert not meta["captured"] and not meta["methods"]


def test_capture_refuses_what_it_cannot_capture_with_a_sentence(tmp_path: Path, classification_data) -> None:
    x, y = classification_data.tensors
    task = sp.ClassificationTask()

    def recorder(model: nn.Module, name: str, optimizer: torch.optim.Optimizer | None = None) -> sp.TrajectoryRecorder:
        return sp.TrajectoryRecorder(tmp_path / name, model, optimizer or torch.optim.SGD(model.parameters(), lr=0.1),
                                     save_every=2)

    model = _mlp()
    with pytest.raises(sp.TaskError, match="kind='factored'"):
        sp.GradientCapture(recorder(model, "a"), tmp_path / "a.sp", task, projection=sp.ProjectionArguments(dim=16))
    with pytest.raises(sp.TaskError, match=r"^CaptureArguments.end_pass is 'yes'; use one of True, False, auto\.$"):
        sp.GradientCapture(recorder(model, "a"), tmp_path / "a.sp", task, projection=_projection(),
                           options=sp.CaptureArguments(end_pass="yes"))  # type: ignore[arg-type]
    streamed = {"main": _Stream()}  # no len(): the end pass cannot read every example
    with pytest.raises(sp.TaskError, match=r"datasets= of \['main'\] have no len\(\); pass map-style datasets"):
        sp.GradientCapture(recorder(model, "a"), tmp_path / "a.sp", task, projection=_projection(),
                           options=sp.CaptureArguments(end_pass=True), datasets=streamed)  # fmt: skip
    assert not (tmp_path / "a.sp").exists()
    normed = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with pytest.raises(sp.TaskError, match=r"Linear and Conv layers only.*skip_norm=True"):
        sp.GradientCapture(recorder(normed, "b"), tmp_path / "b.sp", task, projection=_projection())
    other = recorder(model, "c", torch.optim.RMSprop(model.parameters()))
    cap = sp.GradientCapture(other, tmp_path / "c.sp", task, projection=_projection())
    other.begin_stage("main", dataset_size=len(y))
    with pytest.raises(sp.TaskError, match="'RMSprop'; capture supports SGD, Adam and AdamW stages"):
        cap.begin((x[:4], y[:4]), indices=range(4))
    # refused as the stage begins, not by fit after training: groups of different momentum by the recorder itself
    groups = [{"params": list(model[0].parameters()), "momentum": 0.9}, {"params": list(model[3].parameters())}]
    other = recorder(model, "m0", torch.optim.SGD(groups, lr=0.1))
    cap = sp.GradientCapture(other, tmp_path / "m0.sp", task, projection=_projection())
    with pytest.raises(sp.TrajectoryError, match="different momentum or dampening"):
        other.begin_stage("main", dataset_size=len(y))
    other = recorder(model, "m1", torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))
    cap = sp.GradientCapture(other, tmp_path / "m1.sp", task, projection=_projection())
    other.begin_stage("main", dataset_size=len(y))
    with pytest.raises(sp.TrajectoryError, match=r"maximize=True"):
        cap.begin((x[:4], y[:4]), indices=range(4))
    smoothed = recorder(model, "e")
    cap = sp.GradientCapture(smoothed, tmp_path / "e.sp", task, projection=_projection())
    smoothed.begin_stage("main", dataset_size=len(y), label_smoothing=0.1)
    with pytest.raises(sp.TaskError, match=r"smoothed by 0.1 .*ClassificationTask\(..., label_smoothing=0.1\)"):
        cap.begin((x[:4], y[:4]), indices=range(4))
    rec = recorder(model, "d")
    cap = sp.GradientCapture(rec, tmp_path / "d.sp", task, projection=_projection())
    rec.begin_stage("main", dataset_size=len(y))
    with pytest.raises(sp.TaskError, match=r"wrap the training set in sp\.IndexedDataset"):
        cap.begin((x[:4], y[:4]))
    with pytest.raises(sp.TaskError, match=r"must lie in \[0, 29\]"):
        cap.begin((x[:4], y[:4]), indices=[0, 1, 2, 30])
    for i, (datasets, what) in enumerate([({"other": classification_data}, "names no such stage"),
                                          ({"main": TensorDataset(x[:5])}, "holds 5 examples")]):
        named = recorder(_mlp(), f"g{i}")
        named_cap = sp.GradientCapture(named, tmp_path / f"g{i}.sp", task, projection=_projection(), datasets=datasets)
        named.begin_stage("main", dataset_size=len(y))
        with pytest.raises(sp.TaskError, match=f"trains on 30 examples, but GradientCapture's datasets= {what}"):
            named_cap.begin((x[:4], y[:4]), indices=range(4))
    rec.optimizer.step()  # no gradients: nothing moves, but the recorder sees the step it records
    rec.step()
    rec.optimizer.step()
    with pytest.raises(sp.TaskError, match="recorded without a captured batch"):
        rec.step()  # the checkpoint at step 2 closes a window no batch was captured in
    with pytest.raises(sp.TaskError, match="steps since its last checkpoint"):
        sp.GradientCapture(rec, tmp_path / "e.sp", task, projection=_projection())
    with pytest.raises(sp.StoreError, match="holds captured windows of an earlier run"):
        _train(tmp_path / "f", tmp_path / "f.sp", classification_data, steps=4, batch=10, save_every=2)
        _train(tmp_path / "f", tmp_path / "f.sp", classification_data, steps=4, batch=10, save_every=2)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([])


class _Tempered(sp.ClassificationTask):
    """A task whose outputs are not the model's own: the logits at temperature 2."""

    def forward(self, model, batch):
        return model(batch[0]) / 2


class _Holder(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_the_training_forwards_fisher_checks_its_outputs_and_falls_back_where_it_sees_no_forward(
    tmp_path: Path, classification_data
) -> None:
    """The Fisher from the training forward: refused in one sentence where the task's outputs are not the model's
    (``Task.outputs_of``); where the loop never calls the recorded model's forward (it calls a submodule), the
    separate pass takes the Fisher, as ``fisher_forward="separate"`` does."""
    with pytest.raises(sp.TaskError, match=r"outputs_of of the model's forward differs from _Tempered\.forward.*"
                                           r"fisher_forward='separate'"):
        _train(tmp_path / "a", tmp_path / "a.sp", classification_data, steps=2, batch=8, save_every=2, task=_Tempered())
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, steps=2, batch=8, save_every=2, task=_Tempered(),
           options=sp.CaptureArguments(fisher_forward="separate"))
    x, y = classification_data.tensors
    fishers = []
    for mode in ("training", "separate"):
        holder = _Holder(_mlp())
        opt = torch.optim.SGD(holder.parameters(), lr=0.1)
        rec = sp.TrajectoryRecorder(tmp_path / mode, holder, opt, save_every=3, overwrite=True)
        cap = sp.GradientCapture(rec, tmp_path / f"{mode}.sp", sp.ClassificationTask(), projection=_projection(),
                                 options=sp.CaptureArguments(fisher_forward=mode))
        rec.begin_stage("main", dataset_size=len(y))
        for step in range(3):
            rows = torch.arange(step * 8, step * 8 + 8)
            with cap.batch((rows, (x[rows], y[rows]))) as (bx, by):
                loss = F.cross_entropy(holder.net(bx) if mode == "training" else holder(bx), by)
                opt.zero_grad()
                loss.backward()
            opt.step()
            rec.step()
        rec.close()
        fishers.append(sp.Store.open(tmp_path / f"{mode}.sp").read(window_array("fisher", "main", 0)))
    assert np.abs(fishers[1]).max() > 0 and np.allclose(fishers[0], fishers[1], rtol=1e-5, atol=1e-7)


class _Checkpointed(nn.Module):
    """``_mlp``'s layers with the hidden layer under gradient checkpointing (reentrant or not) in training mode,
    as Hugging Face models checkpoint after ``gradient_checkpointing_enable``."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.net, self.reentrant = _mlp(), reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.net(x)
        hidden = torch.utils.checkpoint.checkpoint(self.net[:2], x.requires_grad_(), use_reentrant=self.reentrant)
        return self.net[3](hidden)


def test_non_reentrant_checkpointing_is_captured_as_without_it_and_reentrant_refused(
    tmp_path: Path, classification_data
) -> None:
    """A checkpointed layer runs again in the backward. Non-reentrant checkpointing keeps the first forward's taps:
    its captured gradients and training-forward Fisher equal those of the same model not checkpointed. Reentrant
    checkpointing runs the first forward without autograd, so the Fisher from the training forward would miss the
    layer (it came out zero) and the callbacks' taps end before the recomputation: refused in one sentence."""
    stores = []
    for name, model in (("plain", _Holder(_mlp())), ("checkpointed", _Checkpointed(reentrant=False))):
        _train(tmp_path / name, tmp_path / f"{name}.sp", classification_data, steps=2, batch=8, save_every=2,
               model=model)  # fmt: skip
        stores.append(sp.Store.open(tmp_path / f"{name}.sp"))
    for array in (window_array("grads", "main", 0), window_array("fisher", "main", 0)):
        expected = np.asarray(stores[0].read(array))
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(np.asarray(stores[1].read(array)), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(sp.TaskError, match=r"reentrant gradient checkpointing.*use_reentrant=False"):
        _train(tmp_path / "r", tmp_path / "r.sp", classification_data, steps=2, batch=8, save_every=2,
               model=_Checkpointed(reentrant=True))  # fmt: skip


def test_segment_gradients_average_visits_and_stand_in_for_unvisited_examples(
    tmp_path: Path, classification_data
) -> None:
    """A window per step of 10 of 30 examples: a segment of two windows misses some examples, which take their
    mean over the stage's visits; visited ones average their own visits in the segment (one or two)."""
    from source_proj.featurize.windows import WindowGradients
    from source_proj.methods.fit import store_segments

    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=6, batch=10, save_every=1,
           options=sp.CaptureArguments(fisher="empirical", chunk_rows=64))
    store = sp.Store.open(tmp_path / "cap.sp")
    segments = store_segments(store, sp.FitArguments(segments_per_stage=3))
    assert [seg.checkpoints for seg in segments] == [(0, 1), (2, 3), (4, 5)]
    sums = {t: store.read(window_array("grads", "main", t)).astype(np.float64) for t in range(6)}
    visits = {t: store.read(window_array("visits", "main", t)).astype(np.float64) for t in range(6)}
    overall = sum(sums.values()) / np.maximum(sum(visits.values()), 1)[:, None]
    reader = WindowGradients(store, segments)
    with pytest.warns(UserWarning, match="pairs had no visit inside their segment"):
        got = reader("main", 0, segments)
        reader.warn()
    counts = []
    for seg, mean in zip(segments, got, strict=True):
        total = sum(sums[t] for t in seg.checkpoints)
        count = sum(visits[t] for t in seg.checkpoints)
        expected = np.where((count > 0)[:, None], total / np.maximum(count, 1)[:, None], overall)
        assert np.allclose(mean.numpy(), expected)
        counts.append(count)
    assert {0, 1, 2} <= set(np.concatenate(counts).tolist())


def test_a_captured_store_refuses_a_model_that_computes_otherwise_and_changed_data_in_one_sentence(
    tmp_path: Path, classification_data
) -> None:
    """Capture records featurize's fingerprints: the store's own model scores without a word about them; the same
    layers with ReLU for Tanh, and training data changed since capture (given as ``datasets=``), are refused with
    one sentence that does not advise featurize. Without ``datasets=`` only the data go unchecked, said once; a store
    captured before fingerprints says that nothing is checked."""
    x, y = classification_data.tensors
    task = sp.ClassificationTask()
    store_path = tmp_path / "cap.sp"
    _train(tmp_path / "run", store_path, classification_data, steps=4, batch=10, save_every=4,
           datasets={"main": sp.IndexedDataset(classification_data)})  # unwrapped: the data featurize would take
    sp.fit(store_path, sp.FitArguments(segments_per_stage=1), progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        scores = sp.Attributor(store_path, _mlp(), task, progress=False).scores(TensorDataset(x[:3], y[:3]))
    assert scores.shape == (3, 30) and np.isfinite(scores).all()
    assert not [w for w in seen if "cannot be detected" in str(w.message)]
    with pytest.raises(sp.TaskError) as err:
        sp.Attributor(store_path, _mlp(activation=nn.ReLU), task, progress=False)
    message = str(err.value)
    assert message.startswith(
        f"The model computes other outputs at the final checkpoint than the one the store at {store_path} was captured "
        "from ("
    )
    assert message.endswith(
        "although its parameters have the same names and shapes; build the model exactly as it was trained (same "
        "layers, activations and forward)."
    )
    store = sp.Store.open(store_path)
    assert check_data(store.path, store.meta, {"main": classification_data})
    changed = y.clone()
    changed[7] = (changed[7] + 1) % 3
    with pytest.raises(sp.TaskError) as err:
        check_data(store.path, store.meta, {"main": TensorDataset(x, changed)})
    assert str(err.value) == (
        f"The training data of stage 'main' are not those the store at {store.path} was captured with (other contents "
        "or order); pass the training set the run trained on, in its original order."
    )

    _train(tmp_path / "bare", tmp_path / "bare.sp", classification_data, steps=4, batch=10, save_every=4)
    bare = sp.Store.open(tmp_path / "bare.sp")
    assert bare.meta["fingerprint"]["data"] is None
    _refuses_another_activation(tmp_path / "bare", tmp_path / "bare.sp")
    with pytest.warns(UserWarning) as seen:
        assert not check_data(bare.path, bare.meta, {"main": classification_data})
        assert not check_data(bare.path, bare.meta, {"main": classification_data})
    assert [str(w.message) for w in seen] == [
        f"The store at {bare.path} was captured without its training datasets (GradientCapture's datasets=), so "
        "training data changed since cannot be detected (its model is checked)."
    ]

    # A store captured before capture recorded fingerprints: the warning says so, and does not advise
    # ``featurize --force``, which would replace the captured store by a post-hoc one.
    shutil.copytree(tmp_path / "bare.sp", tmp_path / "old.sp")
    old = sp.Store.open(tmp_path / "old.sp", writable=True)
    old.delete(REFERENCE_BATCH)
    old.update_meta(fingerprint=None)
    with pytest.warns(UserWarning) as seen:
        check_model(old, _mlp(activation=nn.ReLU), task, torch.device("cpu"))
    assert [str(w.message) for w in seen] == [
        f"The store at {old.path} was captured during training before source-proj fingerprinted captured runs, so a "
        "model or training data changed since cannot be detected."
    ]


# -- the eigen projection in-run: a basis per window, mapped into the run's final basis ------------------------


def _orthonormal_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:, :rows].T.float().contiguous()


def test_change_basis_projects_onto_the_source_basis_then_expresses_it_in_the_target() -> None:
    """Per layer U_dst U_srcᵀ (U_src G V_srcᵀ) V_src V_dstᵀ, brute force on random bases and gradients of two
    layers after a shared block of 3 coordinates, which is kept as it is."""
    from source_proj.projection.eigen import EigenBasis, change_basis

    shapes = [(5, 4), (3, 6)]  # (d_out, d_in) per layer
    src = EigenBasis(["a", "b"], [_orthonormal_rows(3, 5, 0), _orthonormal_rows(2, 3, 1)],
                     [_orthonormal_rows(2, 4, 2), _orthonormal_rows(4, 6, 3)], [0], 8, 1.0)
    dst = EigenBasis(["a", "b"], [_orthonormal_rows(4, 5, 4), _orthonormal_rows(1, 3, 5)],
                     [_orthonormal_rows(3, 4, 6), _orthonormal_rows(2, 6, 7)], [0], 8, 1.0)
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(7, o, i, generator=g, dtype=torch.float64) for o, i in shapes]
    shared = torch.randn(7, 3, generator=g, dtype=torch.float64)

    def features(basis: EigenBasis, gs: list[torch.Tensor]) -> torch.Tensor:
        blocks = [(basis.out[j].double() @ gs[j] @ basis.inp[j].double().T).reshape(7, -1) for j in range(2)]
        return torch.cat([shared, *blocks], dim=1)

    projected = [src.inp[j].double().T @ src.inp[j].double() for j in range(2)]
    kept = [src.out[j].double().T @ src.out[j].double() @ grads[j] @ projected[j] for j in range(2)]
    padded = torch.cat([features(src, grads), torch.zeros(7, 5, dtype=torch.float64)], dim=1)  # a window pads to k
    got = change_basis(padded, src, dst, shared=3)
    assert got.shape == (7, 3 + 12 + 2)
    assert torch.allclose(got, features(dst, kept), atol=1e-10)


def _eigen_capture(dim: int) -> sp.ProjectionArguments:
    return sp.ProjectionArguments(dim=dim, kind="eigen")


def test_eigen_capture_maps_every_window_into_the_final_basis_which_is_post_hoc_featurizes(
    tmp_path: Path, classification_data
) -> None:
    """Capture with the eigen projection at k ≥ p (every basis keeps all of its layers: orthogonal maps): each
    window was projected with its own basis (the factors of every window start so far), and fit reads it, mapped
    into the store's final basis, as the final projection of the sum of every visit's materialised gradient
    (Fisher: M F Mᵀ, as that projection of the Σ 2 u uᵀ brute force). The final basis averages the factors of
    every window's start and the final weights: the checkpoints post-hoc featurize averages, over the same seeded
    examples, so it equals featurize's basis; SOURCE on the two stores agrees where full-batch windows make
    in-run and post-hoc gradients one and the same."""
    from source_proj.featurize.windows import window_maps
    from source_proj.projection.eigen import EigenBasis

    x, y = classification_data.tensors
    n, batch, save_every, steps = len(y), 8, 3, 10
    names = [name for name, _ in _mlp().named_parameters()]
    expected: dict[int, list] = {}
    done: list[int] = []

    def brute_force(model: nn.Module, rows: torch.Tensor, _) -> None:
        window = len(done) // save_every * save_every
        done.append(1)
        grads, visits, fisher = expected.setdefault(window, [{}, torch.zeros(n), {}])
        per_example = PerExampleGradients(model, sp.ClassificationTask(), names)((x[rows], y[rows]))
        for name, values in per_example.items():
            full = grads.setdefault(name, torch.zeros(n, *values.shape[1:], dtype=torch.float64))
            full.index_add_(0, rows, values.double())
        visits.index_add_(0, rows, torch.ones(len(rows)))
        eval_net = copy.deepcopy(model).eval()
        labels = eval_net(x[rows]).argmax(-1)
        u = PerExampleGradients(eval_net, sp.ClassificationTask(), names)((x[rows], labels))
        for name, values in u.items():
            fisher.setdefault(name, []).append(values.double() * np.sqrt(2.0))

    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=steps, batch=batch, save_every=save_every,
           options=sp.CaptureArguments(chunk_rows=64, fisher_forward="separate"), on_batch=brute_force,
           task=_ArgmaxFisher(), projection=_eigen_capture(128), datasets={"main": classification_data})
    store = sp.Store.open(tmp_path / "cap.sp")
    meta = store.meta
    assert meta["projection"]["kind"] == "eigen" and meta["projection"]["basis"]["checkpoints"] == [0, 3, 6, 9, 10]
    assert sorted(meta["capture_bases"]) == ["main/0", "main/3", "main/6", "main/9"]
    assert len({d["digest"] for d in meta["capture_bases"].values()}) == 4  # a basis of its own per window
    final = sp.projection.factory.projector_from_meta(meta, _mlp(), store)
    assert final.dim == 67  # every layer whole: (8 × 5) + (3 × 9)
    maps = window_maps(store)
    for start, (grads, visits, fisher) in expected.items():
        assert np.array_equal(store.read(window_array("visits", "main", start)), visits.numpy())
        got = maps[("main", start)](torch.from_numpy(store.read(window_array("grads", "main", start))).double())
        want = final.project({k: v.float() for k, v in grads.items()}).double()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        u = final.project({k: torch.cat(v).float() for k, v in fisher.items()}).double()
        m = maps[("main", start)]
        got_f = m(m(torch.from_numpy(store.read(window_array("fisher", "main", start)))).T.contiguous())
        assert torch.allclose(got_f, u.T @ u, rtol=1e-4, atol=1e-4 * float((u.T @ u).abs().max()))

    posthoc = sp.featurize(
        tmp_path / "run", _mlp(), _ArgmaxFisher(), classification_data, tmp_path / "post.sp",
        projection=_eigen_capture(128), options=sp.FeaturizeArguments(batch_size=64, measurement=False),
        progress=False,
    )
    theirs = EigenBasis.read(posthoc, posthoc.meta["projection"]["basis"])
    ours = EigenBasis.read(store, meta["projection"]["basis"])
    assert theirs.checkpoints == ours.checkpoints and theirs.blocks == ours.blocks
    for a, b in zip([*theirs.out, *theirs.inp], [*ours.out, *ours.inp], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_tracin_on_an_eigen_capture_reads_every_window_in_the_final_basis_its_queries_are_projected_with(
    tmp_path: Path, classification_data
) -> None:
    """Each window of an eigen capture is projected with a basis of its own and the query with the final one, so
    TracIn over the visits must map the windows' sums into the final basis (exact at k ≥ p), as fit does: score =
    −Σ_w (η̄_w/B_w) ⟨P ∇f(q; θ_{c_w}), P Σ_{visits} ∇ℓ(z; θ_t)⟩ with P the final projection (brute force:
    materialised gradients)."""
    x, y = classification_data.tensors
    names = [name for name, _ in _mlp().named_parameters()]
    sums: dict[int, dict[str, torch.Tensor]] = {}
    done: list[int] = []

    def brute_force(model: nn.Module, rows: torch.Tensor, _) -> None:
        window = len(done) // 3 * 3
        done.append(1)
        for name, values in PerExampleGradients(model, sp.ClassificationTask(), names)((x[rows], y[rows])).items():
            total = sums.setdefault(window, {}).setdefault(name, torch.zeros(len(y), *values.shape[1:]))
            total.index_add_(0, rows, values)

    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=10, batch=8, save_every=3,
           options=sp.CaptureArguments(chunk_rows=64, end_pass=False), on_batch=brute_force,
           projection=_eigen_capture(128), datasets={"main": classification_data})  # fmt: skip
    store = sp.fit_baseline(tmp_path / "cap.sp", sp.BaselineArguments(kind="tracin"), progress=False)
    queries = (x[:3], y[:3])
    ours = sp.Attributor(store.path, _mlp(), sp.ClassificationTask(), method="tracin").scores(queries)
    final = sp.projection.factory.projector_from_meta(store.meta, _mlp(), store)
    trajectory = sp.Trajectory.load(tmp_path / "run")
    recipe = store.meta["methods"]["tracin"]["query"]
    assert recipe["checkpoints"] == sorted(sums)
    exact = np.zeros_like(ours, dtype=np.float64)
    for window, weight in zip(recipe["checkpoints"], recipe["weights"], strict=True):
        model = trajectory.load_into(_mlp(), next(c for c in trajectory.checkpoints if c.step == window)).eval()
        q = final.project(PerExampleGradients(model, sp.ClassificationTask(), names)(queries, "measurement"))
        exact -= weight**2 * (q.double() @ final.project(sums[window]).double().T).numpy()
    np.testing.assert_allclose(ours, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())


def test_eigen_capture_leaves_training_unchanged_and_a_killed_run_resumes_into_the_uninterrupted_store(
    tmp_path: Path, classification_data, uninterrupted: Path
) -> None:
    """The basis passes (eval mode, their own generators) leave a run with dropout bit-identical to an uncaptured
    one, global random state included; a run killed mid-window resumes (the sums of the windows before it are
    visited again at their checkpoints) into the windows, window bases and final basis of an uninterrupted run,
    and the store grows with a run trained further (a new final basis)."""
    kwargs = _fourteen_steps("eigen")
    # 6 steps with dropout: the basis passes of windows 0 and 4 and the end pass at 6 run between training's steps.
    torch.manual_seed(5)
    plain = _train(tmp_path / "p", None, classification_data, steps=6, batch=8, save_every=4, model=_mlp(dropout=0.3))
    plain_state = torch.get_rng_state()
    torch.manual_seed(5)
    captured = _train(tmp_path / "d", tmp_path / "d.sp", classification_data, model=_mlp(dropout=0.3),
                      **dict(kwargs, steps=6))  # fmt: skip
    assert torch.equal(torch.get_rng_state(), plain_state)
    for (name, a), (_, b) in zip(plain.state_dict().items(), captured.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not any(m._forward_hooks for m in captured.modules())
    # Without dropout from here: a resumed loop does not restore the global random state of the killed one.
    with pytest.raises(_Killed):
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, crash_after=10, **kwargs)
    info = CliRunner().invoke(main, ["info", str(tmp_path / "b.sp")])
    assert info.exit_code == 0 and "a basis per captured window" in info.output
    with pytest.raises(sp.StoreError, match=r"is still being captured .* finish or resume training, then fit"):
        sp.fit(tmp_path / "b.sp", progress=False)
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, **kwargs)
    info = CliRunner().invoke(main, ["info", str(tmp_path / "b.sp")])
    assert info.exit_code == 0 and "basis of 2 layers from checkpoints [0, 4, 8, 12, 14]" in info.output

    def arrays(path: Path) -> dict[str, np.ndarray]:
        store = sp.Store.open(path)
        return {name: store.read(name) for name in store.progress_arrays() if name.startswith(("capture/", "proj"))}

    expected, got = arrays(uninterrupted / "eigen.sp"), arrays(tmp_path / "b.sp")
    assert sorted(expected) == sorted(got)
    assert sum(name.startswith("projection/windows/") for name in got) == 4  # one array per window
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    a_meta, b_meta = sp.Store.open(uninterrupted / "eigen.sp").meta, sp.Store.open(tmp_path / "b.sp").meta
    assert a_meta["projection"] == b_meta["projection"] and a_meta["capture_bases"] == b_meta["capture_bases"]
    fitted = sp.fit(tmp_path / "b.sp", progress=False)
    assert fitted.read("methods/source/train/main").shape == (30, b_meta["projection"]["dim"])
    assert sp.verify_store(tmp_path / "b.sp", progress=False).status == "ok"

    with pytest.raises(sp.TaskError, match=r"resuming this run needs the data of the stages it trained before too: "
                                            r"add \['main'\] to datasets="):
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True,
               **dict(kwargs, steps=16, datasets={"other": classification_data}))
    assert sp.Store.open(tmp_path / "b.sp").meta["captured"]  # refused before the store was taken up
    longer = dict(kwargs, steps=16)
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, **longer)
    grown = sp.Store.open(tmp_path / "b.sp").meta
    assert grown["projection"]["basis"]["checkpoints"] == [0, 4, 8, 12, 14, 16]
    assert grown["projection"]["basis"]["digest"] != b_meta["projection"]["basis"]["digest"]
    assert sorted(grown["capture_bases"]) == ["main/0", "main/12", "main/14", "main/4", "main/8"]
    assert sp.fit(tmp_path / "b.sp", progress=False).read("methods/source/train/main").shape[0] == 30


def test_eigen_capture_of_sgd_groups_at_a_ratio_of_rates_resumes_into_the_uninterrupted_store(
    tmp_path: Path, classification_data
) -> None:
    """SGD with groups at 1:5 on the eigen projection: a run killed mid-window resumes, the basis passes of the windows
    before it re-taken in u = R^{-1/2}θ (the stage's ratios, whatever optimizer state the checkpoint holds), into the
    windows, window bases, denominators and final basis of an uninterrupted run."""
    kwargs = {"steps": 10, "batch": 8, "save_every": 4, "options": sp.CaptureArguments(chunk_rows=8),
              "datasets": {"main": classification_data}, "projection": _eigen_capture(24),
              "optimizer": lambda params: torch.optim.SGD(_two_rates(params, 0.1), momentum=0.9)}
    a, b = _uninterrupted_and_resumed(tmp_path, classification_data, **kwargs)
    assert a.meta["projection"] == b.meta["projection"] and a.meta["capture_bases"] == b.meta["capture_bases"]
    names = a.progress_arrays("capture/")
    assert sum(name.startswith("capture/denominator/") for name in names) == 3  # windows 0, 4 and 8
    for name in names:
        assert np.array_equal(a.read(name), b.read(name)), name


def _files(path: Path) -> dict[str, bytes]:
    """Every file of a store, but its writer's lock (which says when it was last taken)."""
    files = (f for f in sorted(path.rglob("*")) if f.is_file() and f.name != ".source-proj.lock")
    return {str(f.relative_to(path)): f.read_bytes() for f in files}


def test_a_killed_run_resumed_with_other_training_data_is_refused_and_its_store_kept(
    tmp_path: Path, classification_data, uninterrupted: Path
) -> None:
    """The data fingerprint of a stage is recorded in the store as the stage starts: a killed eigen run (with its end
    pass) resumed with other examples of the same size is refused in one sentence before the store is taken up (it is
    left byte for byte as the killed run left it); resumed with its own data it ends as the uninterrupted run."""
    kwargs = _fourteen_steps("eigen")
    with pytest.raises(_Killed):
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, crash_after=10, **kwargs)
    killed = _files(tmp_path / "b.sp")
    x, y = classification_data.tensors
    other = TensorDataset(x.flip(0), y.flip(0))  # the same examples in another order
    with pytest.raises(sp.TaskError) as err:
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True,
               **dict(kwargs, datasets={"main": other}))  # fmt: skip
    assert str(err.value) == (
        "The training data of stage 'main' given as datasets= differ from those the captured run trained on (other "
        "contents or order); pass the same data, in the same order."
    )
    assert _files(tmp_path / "b.sp") == killed
    with pytest.raises(sp.TaskError, match=r"^The training data of stage 'main' given as datasets= differ from those "
                                           r"the captured run trained on \(20 examples, not 30\); pass the same"):
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True,
               **dict(kwargs, datasets={"main": TensorDataset(x[:20], y[:20])}))  # fmt: skip
    assert _files(tmp_path / "b.sp") == killed
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, **kwargs)
    a, b = sp.Store.open(uninterrupted / "eigen.sp"), sp.Store.open(tmp_path / "b.sp")
    assert sorted(a.progress_arrays()) == sorted(b.progress_arrays())
    for name in a.progress_arrays():
        assert np.array_equal(a.read(name), b.read(name)), name
    assert a.meta["fingerprint"] == b.meta["fingerprint"] == {**a.meta["fingerprint"],
                                                             "data": data_fingerprint({"main": classification_data})}
    assert b.meta["captured"] and window_array("end", "main", 14) not in b.progress_arrays()  # the last window: 12
    assert window_array("end", "main", 12) in b.progress_arrays()


def test_capture_takes_the_eigen_projection_when_it_has_the_data_and_says_what_it_needs(
    tmp_path: Path, classification_data
) -> None:
    model = _mlp()
    task = sp.ClassificationTask()

    def recorder(name: str) -> sp.TrajectoryRecorder:
        return sp.TrajectoryRecorder(tmp_path / name, model, torch.optim.SGD(model.parameters(), lr=0.1), save_every=2)

    cap = sp.GradientCapture(recorder("a"), tmp_path / "a.sp", task, datasets={"main": classification_data})
    assert cap.projection.kind == "eigen"
    cap.close()
    with pytest.warns(UserWarning, match="pass each stage's training dataset as datasets= for the more accurate"):
        cap = sp.GradientCapture(recorder("b"), tmp_path / "b.sp", task)
    assert cap.projection.kind == "factored"
    cap.close()
    with pytest.raises(sp.TaskError, match=r"bases are estimated from the training data.*pass datasets="):
        sp.GradientCapture(recorder("c"), tmp_path / "c.sp", task, projection=_eigen_capture(16))
    y = classification_data.tensors[1]

    class Unreadable(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, i: int):
            raise OSError("disk gone")

    wrong = TensorDataset(torch.randn(len(y), 5), y)  # 5 features, not 4
    for i, (data, message) in enumerate([
        (wrong, r"cannot run on the training data of stage 'main' given as datasets="),
        (Unreadable(), r"^The dataset raised an error of its own reading training example \d+ of stage 'main' "
                      r"\(OSError: disk gone\)"),
    ]):
        with pytest.raises(sp.TaskError, match=message):  # before training: the basis pass counts positions
            sp.GradientCapture(recorder(f"bad{i}"), tmp_path / f"bad{i}.sp", task, projection=_eigen_capture(16),
                               datasets={"main": data})  # fmt: skip
        assert not (tmp_path / f"bad{i}.sp").exists()
    with pytest.raises(sp.TaskError, match="'eigen' or 'factored' projection, not 'rademacher'"):
        sp.GradientCapture(recorder("d"), tmp_path / "d.sp", task,
                           projection=sp.ProjectionArguments(dim=16, kind="rademacher"))


def test_a_killed_run_resumed_with_datasets_that_read_differently_twice_says_so_once(
    tmp_path: Path, classification_data
) -> None:
    """A resumed run checks the stage it goes on with as it takes the store up and again as the stage begins: data that
    read differently twice (random augmentation) cannot be checked, which is said once for the stage, not at each
    check."""

    class Augmented(torch.utils.data.Dataset):
        reads = 0  # each read shifts the examples anew, whatever the random state the runs seed

        def __len__(self) -> int:
            return len(classification_data)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = classification_data[i]
            self.reads += 1
            return x + 1e-3 * self.reads, y

    kwargs = dict(_fourteen_steps("factored"), datasets={"main": Augmented()})
    with pytest.raises(_Killed):
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, crash_after=6, **kwargs)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, **kwargs)
    said = [str(w.message) for w in seen if "read differently twice" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("The training data of stage 'main' given as datasets= read")
    assert sp.Store.open(tmp_path / "b.sp").meta["captured"]


def test_eigen_capture_of_adamw_takes_each_windows_factors_in_adams_coordinates_and_resumes_exactly(
    tmp_path: Path, classification_data
) -> None:
    """On an AdamW run each window's basis averages the factors of D^{-1/2}-scaled gradients at every window start
    so far, D the optimizer's state as that window started (rank-one sides, as featurize): rebuilt here from the
    checkpoints that open the windows; the first window has no state yet (raw factors). A run killed mid-window
    resumes, its earlier windows' factors re-taken with the optimizer states saved with their checkpoints, into the
    uninterrupted store."""
    from source_proj.featurize.basis import BasisPass, rank_one_sides
    from source_proj.trajectory.preconditioner import live_preconditioner

    def adamw(params):
        return torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)

    kwargs = {"steps": 10, "batch": 8, "save_every": 4, "options": sp.CaptureArguments(chunk_rows=8),
              "datasets": {"main": classification_data}, "projection": _eigen_capture(24), "optimizer": adamw}
    a, b = _uninterrupted_and_resumed(tmp_path, classification_data, **kwargs)
    assert a.meta["projection"] == b.meta["projection"] and a.meta["capture_bases"] == b.meta["capture_bases"]
    for name in a.progress_arrays("capture/"):
        assert np.array_equal(a.read(name), b.read(name)), name

    trajectory = sp.Trajectory.load(tmp_path / "a")
    names = [name for name, _ in _mlp().named_parameters()]
    model = _mlp()
    optimizer = adamw(model.parameters())
    grads_fn = PerExampleGradients(model, sp.ClassificationTask(), names)
    basis_pass, raw_pass = (
        BasisPass(grads_fn, sp.ClassificationTask(), {"main": classification_data}, names, 24, examples=2048, seed=0,
                  batch_size=8, device=torch.device("cpu"))  # basis_batch="auto": the first training batch
        for _ in range(2)
    )  # fmt: skip
    for i, start in enumerate((0, 4, 8)):  # in order: each window's basis averages the factors so far
        state = trajectory.load_state(next(c for c in trajectory.checkpoints if c.step == start))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        d = live_preconditioner(optimizer, dict(model.named_parameters()), {})
        assert (d is None) == (start == 0)
        basis_pass.visit("main", "test", basis_pass.quiet(), rank_one_sides(d, basis_pass.layers) if d else None)
        raw_pass.visit("main", "test", raw_pass.quiet())
        want = basis_pass.basis([0, 4, 8][: i + 1], "")
        assert a.meta["capture_bases"][f"main/{start}"]["digest"] == want.digest(), start
        if d is not None:  # the raw factors give another basis: the scaling is what made it
            assert raw_pass.basis([0, 4, 8][: i + 1], "").digest() != want.digest()


def test_eigen_capture_bounds_each_windows_basis_pass_by_a_share_of_the_window_before_and_resumes_exactly(
    tmp_path: Path, classification_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``basis_share`` s, the basis pass of every window but the run's first visits ⌈s·E⌉ examples (E: those
    the window before it trained on), a random part of the seeded subset, and the final pass the whole subset: the
    window bases and the final basis equal a replay of exactly those passes at the run's checkpoints, and a run
    killed mid-window resumes into the uninterrupted store."""
    from source_proj.featurize import capture as capture_module
    from source_proj.featurize.basis import BasisPass
    from source_proj.projection.eigen import EigenBasis

    monkeypatch.setattr(capture_module, "MIN_BASIS_PASS", 4)
    x, _ = classification_data.tensors
    kwargs = {"steps": 14, "batch": 8, "save_every": 4, "datasets": {"main": classification_data},
              "options": sp.CaptureArguments(chunk_rows=8, basis_share=0.5), "projection": _eigen_capture(24)}
    _train(tmp_path / "a", tmp_path / "a.sp", classification_data, **kwargs)  # 30 examples per window (an epoch)
    with pytest.raises(_Killed):
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, crash_after=10, **kwargs)
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, **kwargs)
    a, b = sp.Store.open(tmp_path / "a.sp"), sp.Store.open(tmp_path / "b.sp")
    bases = a.meta["capture_bases"]
    assert [(bases[f"main/{s}"]["pass"], bases[f"main/{s}"]["trained"]) for s in (0, 4, 8, 12)] == [
        (None, 30), (15, 30), (15, 30), (15, 16)]  # fmt: skip: the last window trains 2 batches of 8
    assert a.meta["projection"] == b.meta["projection"] and bases == b.meta["capture_bases"]
    for name in [*a.progress_arrays("capture/"), *a.progress_arrays("projection/")]:
        assert np.array_equal(a.read(name), b.read(name)), name

    trajectory = sp.Trajectory.load(tmp_path / "a")
    names = [name for name, _ in _mlp().named_parameters()]
    model = _mlp()
    replay = BasisPass(PerExampleGradients(model, sp.ClassificationTask(), names), sp.ClassificationTask(),
                       {"main": classification_data}, names, 24, examples=2048, seed=0, batch_size=8,
                       device=torch.device("cpu"))  # fmt: skip
    for i, (start, limit) in enumerate([(0, None), (4, 15), (8, 15), (12, 15), (14, None)]):
        checkpoint = next(c for c in trajectory.checkpoints if c.step == start)
        model.load_state_dict(trajectory.load_state(checkpoint)["model"])
        factors, _ = replay.visit("main", "test", replay.quiet(), None, limit)
        if limit is not None:  # a random 15 of the 30: the first layer's input factor is theirs exactly
            rows = np.sort(replay.orders["main"][:limit])
            assert len(set(rows.tolist())) == 15 and rows.tolist() != list(range(15))
            inputs = torch.cat([x[rows], torch.ones(15, 1)], 1).double()
            assert np.allclose(factors[0], (inputs.T @ inputs / 15).numpy(), atol=1e-6)
        want = replay.basis([0, 4, 8, 12, 14][: i + 1], "")
        if start < 14:
            assert bases[f"main/{start}"]["digest"] == want.digest(), start
    final = EigenBasis.read(a, a.meta["projection"]["basis"])
    assert all(torch.equal(p, q) for p, q in zip([*final.out, *final.inp], [*want.out, *want.inp], strict=True))
    with pytest.raises(sp.TaskError, match=r"^CaptureArguments.basis_share is .*; pass a finite number > 0\.$"):
        sp.GradientCapture(sp.TrajectoryRecorder(tmp_path / "c", model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                  save_every=2),
                           tmp_path / "c.sp", sp.ClassificationTask(), datasets={"main": classification_data},
                           options=sp.CaptureArguments(basis_share=0.0))  # fmt: skip


def test_the_end_pass_adds_each_examples_gradient_at_the_stages_final_weights_as_one_more_visit(
    tmp_path: Path, classification_data
) -> None:
    """``end_pass``: as the stage ends, every example's gradient at its final weights (eval mode, as featurize takes
    it at the final checkpoint) is kept with the last window, training and the random state stay untouched, and fit
    reads it as one more visit of every example there: the same SOURCE as the store without it with the pass added
    to that window's sums by hand. A store whose end pass is missing is refused by fit and flagged by verify."""
    kwargs = {"steps": 8, "batch": 8, "save_every": 4, "datasets": {"main": classification_data}}
    torch.manual_seed(5)
    plain = _train(tmp_path / "p", None, classification_data, steps=8, batch=8, save_every=4, model=_mlp(dropout=0.3))
    plain_state = torch.get_rng_state()
    torch.manual_seed(5)
    end = sp.CaptureArguments(chunk_rows=8, end_pass=True, basis_batch=7)  # batches straddle the chunks
    captured = _train(tmp_path / "e", tmp_path / "e.sp", classification_data, model=_mlp(dropout=0.3), options=end,
                      **kwargs)  # fmt: skip
    assert torch.equal(torch.get_rng_state(), plain_state)
    for (name, a), (_, b) in zip(plain.state_dict().items(), captured.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    torch.manual_seed(5)
    _train(tmp_path / "e", tmp_path / "n.sp", classification_data, model=_mlp(dropout=0.3), resume=False,
           options=sp.CaptureArguments(chunk_rows=8, end_pass=False), **kwargs)  # fmt: skip  (the same run, without it)
    posthoc = sp.featurize(
        tmp_path / "e", _mlp(dropout=0.3), sp.ClassificationTask(), classification_data, tmp_path / "post.sp",
        projection=_projection(), options=sp.FeaturizeArguments(chunk_rows=8, measurement=False), progress=False,
    )  # fmt: skip
    with_end, without = sp.Store.open(tmp_path / "e.sp"), sp.Store.open(tmp_path / "n.sp", writable=True)
    last = window_array("end", "main", 4)  # the stage's last window starts at step 4 and closes at 8
    assert [n for n in with_end.progress_arrays("capture/end/")] == [last]
    want = posthoc.read(f"grads/main/{ckpt_key(8)}")
    assert np.abs(want).max() > 0
    assert np.allclose(with_end.read(last), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

    for kind in ("grads", "visits"):  # by hand: the pass as one more visit of the last window
        name = window_array(kind, "main", 4)
        values = without.read(name)
        added = values + (with_end.read(last) if kind == "grads" else 1)
        for chunk in range(-(-len(values) // 8)):
            without.write_chunk(name, chunk, added[chunk * 8 : (chunk + 1) * 8].astype(values.dtype))
    for segments in (1, 2):
        args = sp.FitArguments(segments_per_stage=segments)
        a = sp.fit(tmp_path / "e.sp", args, overwrite=True, progress=False).read("methods/source/train/main")
        b = sp.fit(tmp_path / "n.sp", args, overwrite=True, progress=False).read("methods/source/train/main")
        assert np.abs(a).max() > 0 and np.allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max()), segments
    assert sp.verify_store(tmp_path / "e.sp", progress=False).status == "ok"
    dot = sp.fit_baseline(tmp_path / "e.sp", sp.BaselineArguments(kind="grad-dot"), progress=False)  # θ_T's gradient
    assert np.allclose(dot.read("methods/grad-dot/train/main"), -want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

    shutil.rmtree(tmp_path / "e.sp" / last)
    assert sp.verify_store(tmp_path / "e.sp", progress=False).status != "ok"
    with pytest.raises(sp.StoreError, match=r"lacks the features \['capture/end/main/step-00000004'\]"):
        sp.fit(tmp_path / "e.sp", overwrite=True, progress=False)
    with pytest.raises(sp.TaskError, match=r"^The end pass reads each stage's examples .* pass datasets="):
        _train(tmp_path / "x", tmp_path / "x.sp", classification_data, steps=4, batch=8, save_every=4, options=end)


def test_the_end_pass_is_written_behind_the_pass_and_equals_it_written_in_line(
    tmp_path: Path, classification_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end pass hands its chunks to the store's writer thread (``ChunkWriter``): slow writes (each held 50 ms)
    still receive each chunk's own rows, not a later chunk's reusing its buffer, so the pass equals the one whose
    chunks are written in line (``WRITE_BEHIND = 0``)."""
    original, threads = sp.Store.write_chunk, {}

    def slow(store: sp.Store, name: str, chunk: int, values: np.ndarray) -> None:
        if name.startswith("capture/end/"):
            time.sleep(0.05)
            threads.setdefault(name.split("/")[-1], set()).add(threading.current_thread().name)
        original(store, name, chunk, values)

    monkeypatch.setattr(sp.Store, "write_chunk", slow)
    kwargs = {"steps": 8, "batch": 8, "save_every": 4, "datasets": {"main": classification_data},
              "options": sp.CaptureArguments(chunk_rows=8, end_pass=True)}  # fmt: skip
    stores = {}
    for depth in (2, 0):
        monkeypatch.setattr("source_proj.store.writer.WRITE_BEHIND", depth)
        torch.manual_seed(5)
        _train(tmp_path / f"r{depth}", tmp_path / f"s{depth}.sp", classification_data, **kwargs)
        stores[depth] = sp.Store.open(tmp_path / f"s{depth}.sp")
    (name,) = stores[2].progress_arrays("capture/end/")
    assert stores[2].num_chunks(name) > 2
    assert threads == {name.split("/")[-1]: {"source-proj-writer", threading.current_thread().name}}
    np.testing.assert_array_equal(stores[2].read(name), stores[0].read(name))
    assert np.abs(stores[2].read(name)).max() > 0


def test_the_eigen_end_pass_of_adamw_projects_with_the_last_windows_basis_and_a_run_killed_during_it_resumes(
    tmp_path: Path, classification_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an AdamW run with the eigen projection the end pass is every example's gradient at the final checkpoint in
    Adam's coordinates (D^{-1/2} from the state saved with it; exact at ``adam_rank`` ≥ the layers' ranks), projected
    with the basis of the stage's last window, as its visits are (brute force: materialised gradients). A run killed
    while the pass is being written resumes (its stage ends again at the saved checkpoint) into the uninterrupted
    store."""
    from source_proj.featurize.windows import window_basis_array
    from source_proj.projection.eigen import EigenBasis

    def adamw(params):
        return torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)

    projection = sp.ProjectionArguments(dim=24, kind="eigen", adam_rank=8)
    kwargs = {"steps": 8, "batch": 8, "save_every": 4, "options": sp.CaptureArguments(chunk_rows=8, end_pass=True),
              "datasets": {"main": classification_data}, "projection": projection, "optimizer": adamw}
    _train(tmp_path / "a", tmp_path / "a.sp", classification_data, **kwargs)
    store = sp.Store.open(tmp_path / "a.sp")
    last = window_array("end", "main", 4)  # the last window: steps 4 to 8
    trajectory = sp.Trajectory.load(tmp_path / "a")
    model = _mlp()
    optimizer = adamw(model.parameters())
    state = trajectory.load_state(trajectory.final_checkpoint)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    names = [name for name, _ in model.named_parameters()]
    scale = _adam_scale(optimizer, model)
    grads = PerExampleGradients(model, sp.ClassificationTask(), names)(classification_data.tensors)
    name = window_basis_array("main", 4)
    basis = EigenBasis.unpack(store.read(name), store.meta["capture_bases"]["main/4"], name)
    projector = projection.projector([(n, tuple(p.shape)) for n, p in model.named_parameters()], model, basis)
    want = projector.project({n: grads[n] * scale[n] for n in names}).numpy()
    got = store.read(last)
    assert got.shape == (len(classification_data), 24) and np.abs(want).max() > 0
    assert np.allclose(got[:, : want.shape[1]], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert not got[:, want.shape[1] :].any()

    _killed_while_writing(monkeypatch, tmp_path / "b.sp", last,
                          lambda: _train(tmp_path / "b", tmp_path / "b.sp", classification_data, **kwargs))
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, **kwargs)
    expected, got = _store_arrays(tmp_path / "a.sp"), _store_arrays(tmp_path / "b.sp")
    assert sorted(expected) == sorted(got) and last in got
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    assert sp.Store.open(tmp_path / "b.sp").meta["projection"] == store.meta["projection"]


def test_a_stage_that_ended_and_trains_further_keeps_its_earlier_end_pass_as_one_more_visit(
    tmp_path: Path, classification_data
) -> None:
    """A finished run with ``end_pass`` resumed to train its stage further: the pass taken where the stage first
    ended stays (a gradient at a checkpoint like any other) and a new one is taken at the new end; the store names
    both, verify finds nothing out of place, and fit averages both as visits with the windows' own."""
    from source_proj.featurize.windows import WindowGradients
    from source_proj.trajectory.segments import Segment

    options = sp.CaptureArguments(chunk_rows=8, end_pass=True)
    kwargs = {"batch": 10, "save_every": 3, "options": options, "datasets": {"main": classification_data}}
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=6, **kwargs)
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=12, resume=True, **kwargs)
    store = sp.Store.open(tmp_path / "cap.sp")
    assert store.meta["capture_ends"] == ["main/3", "main/9"]
    info = CliRunner().invoke(main, ["info", str(store.path)])
    assert info.exit_code == 0 and "end pass at main step 6, main step 12" in info.output
    report = sp.verify_store(store.path, progress=False)
    assert report.status == "ok" and not report.notes, report.notes
    fitted = sp.fit(store.path, sp.FitArguments(segments_per_stage=1), progress=False)
    (segment,) = [Segment.from_description(d) for d in fitted.meta["methods"]["source"]["segments"]]
    got = torch.cat([WindowGradients(fitted, [segment])("main", chunk, [segment])[0] for chunk in range(4)])
    total = sum(store.read(window_array("grads", "main", w)).astype(np.float64) for w in (0, 3, 6, 9))
    total = total + store.read(window_array("end", "main", 3)) + store.read(window_array("end", "main", 9))
    visits = sum(store.read(window_array("visits", "main", w)).astype(np.float64) for w in (0, 3, 6, 9)) + 2
    assert np.allclose(got.numpy(), total / visits[:, None], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("steps, given", [(7, True), (14, True), (7, False)])
def test_the_automatic_end_pass_is_taken_where_the_datasets_hold_the_stage(
    tmp_path: Path, classification_data, steps: int, given: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """``end_pass="auto"`` (the default): 30 examples in batches of 8 (4 steps an epoch). With ``datasets=`` the pass
    is taken after under two epochs (7 steps) as after 3.5 (14), with its progress bar: the store of
    ``end_pass=True``; without them none is: the store of ``end_pass=False``; bit for bit, the same passes named."""
    kwargs = {"steps": steps, "batch": 8, "save_every": 4,
              "datasets": {"main": classification_data} if given else None}  # fmt: skip
    stores = {}
    for end in ("auto", given):
        store = tmp_path / f"{end}.sp"
        capsys.readouterr()
        _train(tmp_path / f"{end}", store, classification_data, options=sp.CaptureArguments(chunk_rows=8, end_pass=end),
               **kwargs)  # fmt: skip
        stores[end] = store
        assert ("end pass (main)" in capsys.readouterr().err) == given
    auto, want = sp.Store.open(stores["auto"]), sp.Store.open(stores[given])
    assert auto.meta["capture_ends"] if given else not auto.meta.get("capture_ends")
    assert auto.meta.get("capture_ends") == want.meta.get("capture_ends")
    expected, got = _store_arrays(stores[given]), _store_arrays(stores["auto"])
    assert sorted(expected) == sorted(got)
    assert any(name.startswith("capture/end/") for name in got) == given
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    assert sp.verify_store(stores["auto"], progress=False).status == "ok"
    info = CliRunner().invoke(main, ["info", str(stores["auto"])])
    said = "end pass at main step" if given else "no end pass (end_pass='auto' takes it where datasets= holds"
    assert info.exit_code == 0 and said in info.output, info.output


@pytest.mark.parametrize("steps", [7, 8])
def test_an_adam_stage_counts_the_examples_it_trained_on_captured_or_not(
    tmp_path: Path, classification_data, steps: int
) -> None:
    """An AdamW stage's first batch is trained on but not captured (its D^{-1/2} is not known before it): 8 steps of
    at most 8 over 30 examples train on 60 examples of which 52 were captured, 7 steps on 54. The store counts each
    window's trained examples (``meta["capture_visits"]``), and takes the end pass either way."""
    store = tmp_path / "adam.sp"
    _train(tmp_path / "run", store, classification_data, steps=steps, batch=8, save_every=4,
           options=sp.CaptureArguments(chunk_rows=8), datasets={"main": classification_data},
           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))  # fmt: skip
    meta = sp.Store.open(store).meta
    assert sum(meta["capture_visits"].values()) == (60 if steps == 8 else 54)
    assert int(sp.Store.open(store).read(window_array("visits", "main", 0)).sum()) == 22  # 30 trained, 8 skipped
    assert meta["capture_ends"] == ["main/4"]


def test_the_automatic_end_pass_of_a_resumed_stage_is_the_explicit_one(tmp_path: Path, classification_data) -> None:
    """A stage that ended at 6 steps (its end pass taken) and trains further to 12 steps takes the pass again at its
    new end, keeping the first: the store equals that of the same interrupted run with ``end_pass=True``."""
    kwargs = {"batch": 8, "save_every": 3, "datasets": {"main": classification_data}}
    for name, end in (("a", "auto"), ("c", True)):
        options = sp.CaptureArguments(chunk_rows=8, end_pass=end)
        _train(tmp_path / name, tmp_path / f"{name}.sp", classification_data, steps=6, options=options, **kwargs)
        assert sp.Store.open(tmp_path / f"{name}.sp").meta["capture_ends"] == ["main/3"]
        _train(tmp_path / name, tmp_path / f"{name}.sp", classification_data, steps=12, resume=True, options=options,
               **kwargs)  # fmt: skip
    want, got = _store_arrays(tmp_path / "c.sp"), _store_arrays(tmp_path / "a.sp")
    assert window_array("end", "main", 3) in want and window_array("end", "main", 9) in want
    assert sp.Store.open(tmp_path / "a.sp").meta["capture_ends"] == ["main/3", "main/9"]
    assert sorted(got) == sorted(want)
    for array in want:
        assert np.array_equal(want[array], got[array]), array


def test_eigen_capture_takes_any_k_its_blocks_allow(tmp_path: Path, classification_data) -> None:
    """k = p = 67 (prime): the random factored projection cannot split it, but the eigen blocks do not need to,
    so an eigen capture at that k works as featurize does (it was refused with the factored projection's
    message)."""
    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=8, batch=10, save_every=4,
           datasets={"main": classification_data}, projection=_eigen_capture(67))  # fmt: skip
    store = sp.fit(tmp_path / "cap.sp", progress=False)
    assert store.meta["projection"]["kind"] == "eigen" and store.meta["projection"]["dim"] == 67
    assert store.read("methods/source/train/main").shape == (30, 67)
    with pytest.raises(sp.TaskError, match="has no near-square factorisation"):
        _train(tmp_path / "run2", tmp_path / "f.sp", classification_data, steps=4, batch=10, save_every=4,
               projection=sp.ProjectionArguments(dim=67, kind="factored"))  # fmt: skip


def test_eigen_capture_cuts_its_basis_passes_to_the_layers_budget_and_resumes_an_uncut_store_only_uncut(
    tmp_path: Path,
) -> None:
    """Each basis pass of an eigen capture visits the examples ``basis_layer_positions`` keeps (20 positions at 6
    an example: 4 of the 32 drawn; featurize's count); a store captured with every example drawn (as every store
    before the option) is refused with the budget, in one sentence naming the setting that resumes it, and kept;
    resumed with that setting it grows."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, 3, generator=g), torch.randint(0, 4, (32,), generator=g))

    def train(name: str, budget: int | None, steps: int = 8, resume: bool = False) -> None:
        _train(tmp_path / name, tmp_path / f"{name}.sp", data, steps=steps, batch=8, save_every=4, model=TokenModel(),
               options=sp.CaptureArguments(chunk_rows=8), datasets={"main": data}, resume=resume,
               projection=sp.ProjectionArguments(dim=12, kind="eigen", basis_layer_positions=budget))  # fmt: skip

    train("cut", 20)
    train("whole", None)
    cut, whole = sp.Store.open(tmp_path / "cut.sp").meta, sp.Store.open(tmp_path / "whole.sp").meta
    assert cut["projection"]["basis"]["examples"] == 4 and whole["projection"]["basis"]["examples"] == 2048
    assert cut["projection"]["basis"]["inputs"] != whole["projection"]["basis"]["inputs"]
    with pytest.raises(sp.StoreError, match=r"resume it with ProjectionArguments\(basis_layer_positions=None\)"):
        train("whole", 20, steps=12, resume=True)
    assert sp.Store.open(tmp_path / "whole.sp").meta["projection"] == whole["projection"]
    train("whole", None, steps=12, resume=True)
    assert sp.Store.open(tmp_path / "whole.sp").meta["projection"]["basis"]["checkpoints"] == [0, 4, 8, 12]


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
def test_a_training_loss_other_than_the_batch_mean_is_refused_at_the_first_batch(
    tmp_path: Path, classification_data: TensorDataset, loss_reduction: str
) -> None:
    """The first batch's captured gradients are checked against the task's per-example gradients: a loss summed
    over the batch, captured as a mean (the default), used to be accepted with every gradient B times too large
    (and the end pass, which capture computes itself, at the right scale)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=4)
    cap = sp.GradientCapture(rec, tmp_path / "cap.sp", sp.ClassificationTask(), projection=_projection())
    rec.begin_stage("main", dataset_size=len(classification_data))
    x, y = classification_data.tensors
    rows = torch.arange(8)

    def first_batch() -> None:
        with cap.batch((rows, (x[rows], y[rows]))) as (bx, by):
            loss = F.cross_entropy(model(bx), by, reduction=loss_reduction)
            opt.zero_grad()
            loss.backward()

    if loss_reduction == "sum":
        with pytest.raises(sp.TaskError, match=r"first batch are 8 times the task's per-example gradients.*A loss "
                           r"summed over the batch steps B times as far as the recorded rate.*train on the batch mean"):
            first_batch()
    else:
        first_batch()


def test_a_loss_summed_over_the_batch_is_refused_by_capture_as_the_recorded_rate_is_b_times_its_step(
    tmp_path: Path, classification_data: TensorDataset
) -> None:
    """A loss summed over batches of 6 at learning rate η trains exactly as their mean at 6η: the same weights at
    every checkpoint. The recorder records η for the one and 6η for the other, and SOURCE takes a step as the
    recorded rate times the mean's gradient, so the summed run would be modelled with steps 6 times too short
    (capture once took ``CaptureArguments(reduction='sum')``, and its SOURCE scores of such a run were 0.79 times
    the mean run's, correlated at 0.98): it is refused in one sentence as capture starts."""
    x, y = classification_data.tensors

    def record(name: str, reduction: str, lr: float) -> sp.Trajectory:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        rec = sp.TrajectoryRecorder(tmp_path / name, model, opt, save_every=2)
        rec.begin_stage("main", dataset_size=len(y))
        for step in range(5):
            rows = _order(0, len(y))[6 * step : 6 * step + 6]
            opt.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows], reduction=reduction).backward()
            opt.step()
            rec.step()
        rec.close()
        return sp.Trajectory.load(tmp_path / name)

    summed, mean = record("sum", "sum", 0.05), record("mean", "mean", 0.3)
    for a, b in zip(summed.checkpoints, mean.checkpoints, strict=True):
        for name, value in summed.load_state(a)["model"].items():
            torch.testing.assert_close(value, mean.load_state(b)["model"][name], rtol=0, atol=1e-6)
    assert np.allclose(mean.lr, 6 * summed.lr)
    model = _mlp()
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.05), save_every=2)
    with pytest.raises(sp.TaskError, match=r"^A training loss summed over the batch \(reduction='sum'\) steps the "
                       r"weights B times as far as the learning rate the recorder records.*reduction='mean'\.$"):
        sp.GradientCapture(rec, tmp_path / "cap.sp", sp.ClassificationTask(), projection=_projection(),
                           options=sp.CaptureArguments(reduction="sum"))  # fmt: skip
    assert not (tmp_path / "cap.sp").exists()


def test_capture_passes_take_batches_no_larger_than_training_and_a_resumed_run_keeps_their_size(
    tmp_path: Path, classification_data
) -> None:
    """``basis_batch="auto"``: capture's own passes (the eigen basis passes, the end pass) run in batches of the
    run's first training batch (7 here), never more, so they hold no more activations than a training step; the
    store records the size, and a run killed and resumed into it takes the same batches (the same bits). An
    explicit size is taken as given, and changes the numbers by rounding only; anything but "auto" or a positive
    count is refused in one sentence."""
    seen: dict[str, list[int]] = {}
    kwargs = {"steps": 10, "batch": 7, "save_every": 4, "datasets": {"main": classification_data},
              "projection": _eigen_capture(DIM)}  # fmt: skip: 30 examples, batches of 7, 7, 7, 7 and 2

    def watched(name: str) -> nn.Module:
        model = _mlp()
        seen[name] = []
        model[0].register_forward_hook(lambda m, a, o: None if m.training else seen[name].append(a[0].shape[0]))
        return model

    for name, options in (("auto", sp.CaptureArguments(chunk_rows=8)),
                          ("five", sp.CaptureArguments(chunk_rows=8, basis_batch=5))):  # fmt: skip
        _train(tmp_path / name, tmp_path / f"{name}.sp", classification_data, model=watched(name), options=options,
               **kwargs)  # fmt: skip
    # first the layers' position count on at most PROBE_EXAMPLES (8) examples, before any training batch; then the
    # basis passes (the first window's, three more, the final one) and the end pass in such batches, beside
    # capture's checks of the first training batch (of 7 and fewer examples)
    from source_proj.featurize.basis import PROBE_EXAMPLES

    probe, *passes = seen["auto"]
    assert probe == PROBE_EXAMPLES and max(passes) == 7 and passes.count(7) > 20
    assert seen["five"].count(5) > 20 and max(seen["five"]) == 7
    assert sp.Store.open(tmp_path / "auto.sp").meta["capture_batch"] == 7
    auto, five = _store_arrays(tmp_path / "auto.sp"), _store_arrays(tmp_path / "five.sp")
    assert auto.keys() == five.keys() and any(name.startswith("capture/end/") for name in auto)
    for name in auto:  # the batches change the rounding only
        assert np.abs(auto[name] - five[name]).max() <= 1e-5 * np.abs(auto[name]).max(), name

    with pytest.raises(_Killed):
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, crash_after=6, options=sp.CaptureArguments(
            chunk_rows=8), **kwargs)  # fmt: skip
    # resumed at step 4, whose batch is an epoch's last (2 examples): its passes still take the run's first batch's
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, model=watched("resumed"),
           options=sp.CaptureArguments(chunk_rows=8), **kwargs)  # fmt: skip
    assert max(seen["resumed"][1:]) == 7
    a, b = sp.Store.open(tmp_path / "auto.sp"), sp.Store.open(tmp_path / "b.sp")
    for name in a.progress_arrays("capture/"):
        assert np.array_equal(a.read(name), b.read(name)), name
    for bad in (0, -3, "big", True, 2.5):
        refused = r"^CaptureArguments\.basis_batch is .*; pass a whole number ≥ 1 or 'auto'\.$"
        with pytest.raises(sp.TaskError, match=refused):
            _train(tmp_path / "bad", tmp_path / "bad.sp", classification_data, options=sp.CaptureArguments(
                basis_batch=bad), **kwargs)  # fmt: skip


def test_capture_in_bf16_runs_its_own_passes_under_autocast_and_stays_close_to_fp32(
    tmp_path: Path, classification_data
) -> None:
    """``precision="bf16"``: the end pass and the eigen basis passes (capture's own forwards, in eval mode) run under
    bfloat16 autocast, none does in fp32; the layer hooks project in bf16, so the captured windows and the end pass
    differ from fp32's, by bf16's rounding only; the store says bf16, and resuming it in fp32 is refused."""
    data = {"main": classification_data}
    kwargs = {"steps": 8, "batch": 8, "save_every": 4, "datasets": data}
    seen: dict[str, list[bool]] = {}
    arrays = {}
    for precision in ("fp32", "bf16"):
        seen[precision] = []
        options = sp.CaptureArguments(chunk_rows=8, precision=precision)
        for kind, projection in (("factored", _projection()), ("eigen", _eigen_capture(DIM))):
            model = _mlp()
            model[0].register_forward_hook(  # the eval-mode forwards: capture's own passes and checks
                lambda m, a, o, p=precision: None if m.training else seen[p].append(torch.is_autocast_enabled("cpu"))
            )
            store = tmp_path / f"{precision}-{kind}.sp"
            _train(tmp_path / f"{precision}-{kind}", store, classification_data, model=model, options=options,
                   projection=projection, **kwargs)  # fmt: skip
            arrays[precision, kind] = _store_arrays(store)
        assert sp.Store.open(tmp_path / f"{precision}-eigen.sp").meta["featurize"]["precision"] == precision
    assert seen["fp32"] and not any(seen["fp32"])
    # the two end passes and the eigen run's basis passes (its first window's, its second's and the final one)
    assert sum(seen["bf16"]) >= 5
    fp32, bf16 = arrays["fp32", "factored"], arrays["bf16", "factored"]
    compared = [name for name in fp32 if name.startswith(("capture/end/", "capture/grads/"))]
    assert any(n.startswith("capture/end/") for n in compared) and any(n.startswith("capture/grads/") for n in compared)
    for name in compared:
        scale = np.abs(fp32[name]).max()
        assert scale > 0 and not np.array_equal(fp32[name], bf16[name]), name
        assert np.abs(fp32[name] - bf16[name]).max() <= 0.05 * scale, name
    with pytest.raises(sp.StoreError, match=r"precision='bf16' there, precision='fp32' here"):
        _train(tmp_path / "bf16-factored", tmp_path / "bf16-factored.sp", classification_data, resume=True,
               options=sp.CaptureArguments(chunk_rows=8), **kwargs)  # fmt: skip


def _compiler_backend() -> str:
    """inductor where a C++ compiler is at hand (it compiles the graphs to C++ on the CPU), else aot_eager:
    both trace the model with dynamo and run its backward through AOT autograd."""
    return "inductor" if any(shutil.which(c) for c in ("g++", "c++", "clang++")) else "aot_eager"


def test_a_capture_a_failed_run_never_closed_gives_the_compiler_its_settings_back_once_collected(
    tmp_path: Path, classification_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capture holds two compiler settings off while it listens. A run that raised leaves its capture unclosed; once
    nothing refers to it (the traceback gone), the settings are as they were, and a capture still open keeps them."""
    monkeypatch.setattr("source_proj.compiled._owners", weakref.WeakSet())
    monkeypatch.setattr("source_proj.compiled._restore", {})
    aot, dynamo = importlib.import_module("torch._functorch.config"), importlib.import_module("torch._dynamo.config")
    seen = []

    def fail_at_the_second_batch(*_) -> None:
        seen.append((aot.donated_buffer, dynamo.skip_nnmodule_hook_guards))
        if len(seen) % 2 == 0:
            raise RuntimeError("the training loop failed")

    with aot.patch(donated_buffer=True), dynamo.patch(skip_nnmodule_hook_guards=True):  # as torch has them
        for name in ("a", "b"):
            with pytest.raises(RuntimeError, match="training loop failed") as failed:
                _train(tmp_path / f"run-{name}", tmp_path / f"{name}.sp", classification_data, steps=8, batch=8,
                       save_every=4, on_batch=fail_at_the_second_batch)  # fmt: skip
            if name == "a":
                first = failed  # run a's capture stays referenced by its traceback
        assert seen == [(False, False)] * 4
        del failed
        gc.collect()
        assert (aot.donated_buffer, dynamo.skip_nnmodule_hook_guards) == (False, False)  # a is still open
        del first
        gc.collect()
        assert (aot.donated_buffer, dynamo.skip_nnmodule_hook_guards) == (True, True)


def test_a_compiled_model_is_captured_as_the_eager_one_also_where_it_was_compiled_before_capture_began(
    tmp_path: Path, classification_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile: capture's hooks run eagerly (dynamo traced them and failed); the sampled Fisher's backward
    keeps the training forward's graph, which a graph with donated buffers refuses (seen with inductor on the
    Trainer's BERT); and dynamo shares a class's graphs between instances without guarding on hooks. The compiled
    run's store is the eager run's (eigen projection, sampled Fisher from the training forward, end pass), also
    where graphs of the model's class were compiled before capture began and beside it."""
    backend = _compiler_backend()
    torch._dynamo.reset()  # a worker's earlier compilations must not push these past dynamo's recompile limit
    data = classification_data
    common = dict(steps=8, batch=8, save_every=4, options=sp.CaptureArguments(), datasets={"main": data},
                  projection=sp.ProjectionArguments(dim=DIM, kind="eigen"))  # fmt: skip
    _train(tmp_path / "run", tmp_path / "eager.sp", data, model=_mlp(), **common)
    # The compiler's settings at each step: while capture listens no graph donates its buffers, and graphs are
    # guarded on their modules' hooks. The captures earlier tests left open (killed runs) must not hold them.
    monkeypatch.setattr("source_proj.compiled._owners", weakref.WeakSet())
    monkeypatch.setattr("source_proj.compiled._restore", {})
    aot, dynamo = importlib.import_module("torch._functorch.config"), importlib.import_module("torch._dynamo.config")
    settings = []
    with aot.patch(donated_buffer=True), dynamo.patch(skip_nnmodule_hook_guards=True):  # as torch has them
        _train(tmp_path / "run-c", tmp_path / "compiled.sp", data, model=torch.compile(_mlp(), backend=backend),
               on_batch=lambda *_: settings.append((aot.donated_buffer, dynamo.skip_nnmodule_hook_guards)),
               **common)  # fmt: skip
        assert settings == [(False, False)] * 8  # and restored when the run closed:
        assert aot.donated_buffer and dynamo.skip_nnmodule_hook_guards
    eager, compiled = sp.Store.open(tmp_path / "eager.sp"), sp.Store.open(tmp_path / "compiled.sp")
    for kind in ("grads", "visits", "fisher"):
        for start in (0, 4):
            want, got = eager.read(window_array(kind, "main", start)), compiled.read(window_array(kind, "main", start))
            assert np.abs(want).max() > 0 and np.allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    args = sp.FitArguments(segments_per_stage=1)
    want = sp.fit(eager.path, args, progress=False).read("methods/source/train/main")
    got = sp.fit(compiled.path, args, progress=False).read("methods/source/train/main")
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

    # Dynamo shares a class's graphs between its instances. Graphs compiled before capture began (this model's, an
    # earlier run's) are dropped as it starts; one compiled after, for an instance without hooks (another model of
    # the class trained beside it), is guarded on the hooks it saw, so neither runs the captured model without them.
    torch._dynamo.reset()
    x, y = data.tensors
    earlier, beside, warm = (torch.compile(_mlp(seed=seed), backend=backend) for seed in (1, 2, 0))
    for model in (earlier, warm):
        F.cross_entropy(model(x[:8]), y[:8]).backward()
    _train(tmp_path / "run-w", tmp_path / "warm.sp", data, model=warm, **common,
           on_start=lambda: F.cross_entropy(beside(x[:8]), y[:8]).backward())  # fmt: skip
    warmed = sp.Store.open(tmp_path / "warm.sp")
    for start in (0, 4):
        want, got = eager.read(window_array("grads", "main", start)), warmed.read(window_array("grads", "main", start))
        assert np.allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    torch._dynamo.reset()


class _Unreadable(torch.utils.data.Dataset):
    """``data``, whose example 7 cannot be read once ``broken`` (a file truncated while the run trains)."""

    def __init__(self, data: TensorDataset, broken: bool) -> None:
        self.data, self.broken = data, broken

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if self.broken and index == 7:
            raise ValueError("image 7 is truncated")
        return self.data[index]


@pytest.mark.parametrize("projection", ["factored", "eigen"])
def test_an_example_capture_cannot_read_is_named_as_the_datasets_error_and_the_run_resumes_once_it_is_fixed(
    tmp_path: Path, classification_data, projection: str
) -> None:
    """An example of datasets= that raises as it is read is named, by index and stage, as the dataset's own error (not
    a model that cannot run, nor a traceback): at the stage's start (the data fingerprint, the eigen basis) and in the
    end pass, where it broke during training; the run then resumes with the example fixed into the store of an
    uninterrupted run."""
    said = ("The dataset raised an error of its own reading training example 7 of stage 'main' (ValueError: image 7 "
            "is truncated); fix that example in the dataset and run again (the captured run resumes from its last "
            "checkpoint, its store with it).")  # fmt: skip
    kwargs = {"steps": 8, "batch": 8, "save_every": 4, "options": sp.CaptureArguments(chunk_rows=8),
              "projection": _eigen_capture(24) if projection == "eigen" else _projection()}  # fmt: skip
    data = _Unreadable(classification_data, True)
    with pytest.raises(sp.TaskError) as err:
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, datasets={"main": data}, **kwargs)
    assert str(err.value) == said
    data.broken = False

    def breaks(model, rows, optimizer) -> None:
        data.broken = True  # read whole as the stage began; unreadable by its end

    _train(tmp_path / "a", tmp_path / "a.sp", classification_data, datasets={"main": classification_data}, **kwargs)
    with pytest.raises(sp.TaskError) as err:
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, datasets={"main": data}, on_batch=breaks,
               **kwargs)  # fmt: skip
    assert str(err.value) == said
    data.broken = False
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, datasets={"main": data}, resume=True, **kwargs)
    expected, got = _store_arrays(tmp_path / "a.sp"), _store_arrays(tmp_path / "b.sp")
    assert sorted(expected) == sorted(got) and window_array("end", "main", 4) in got
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name


@pytest.mark.parametrize("kind", ["factored", "eigen"])
def test_a_killed_run_moved_to_another_directory_resumes_into_the_uninterrupted_store(
    tmp_path: Path, classification_data, uninterrupted: Path, kind: str
) -> None:
    """A capture knows its run by the name the run records (``trajectory.json``'s ``run``), not by its directory: a run
    killed mid-window and then moved (or copied) resumes from its new directory into the windows, end pass and
    fingerprints of an uninterrupted run, and the store follows the run there. A run recorded anew in the same
    directory is another run: its resume is refused in one sentence, the store left as it was."""
    kwargs = _fourteen_steps(kind)
    with pytest.raises(_Killed):
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, crash_after=10, **kwargs)
    shutil.move(tmp_path / "b", tmp_path / "moved")
    _train(tmp_path / "moved", tmp_path / "b.sp", classification_data, resume=True, **kwargs)
    expected, got = _store_arrays(uninterrupted / f"{kind}.sp"), _store_arrays(tmp_path / "b.sp")
    assert sorted(expected) == sorted(got) and window_array("end", "main", 12) in got
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    a, b = sp.Store.open(uninterrupted / f"{kind}.sp").meta, sp.Store.open(tmp_path / "b.sp").meta
    assert a["fingerprint"] == b["fingerprint"] and a["trajectory"]["fingerprint"] == b["trajectory"]["fingerprint"]
    assert b["trajectory"]["path"] == str((tmp_path / "moved").resolve()) and b["captured"]

    with pytest.raises(_Killed):  # another run recorded where the first one lay
        _train(tmp_path / "moved", None, classification_data, crash_after=10, **kwargs)
    kept = _files(tmp_path / "b.sp")
    with pytest.raises(sp.StoreError) as err:
        _train(tmp_path / "moved", tmp_path / "b.sp", classification_data, resume=True, **dict(kwargs, steps=20))
    assert str(err.value) == (
        f"The store at {tmp_path / 'b.sp'} holds features of other settings or another run (trajectory); capture with "
        "the settings it was made with, pass overwrite=True to replace it, or use another store path."
    )
    assert _files(tmp_path / "b.sp") == kept


def test_a_store_captured_before_runs_were_named_resumes_in_its_runs_directory_and_learns_its_name(
    tmp_path: Path, classification_data
) -> None:
    """A killed run and its store that name no run (written before ``run`` was recorded) resume where the run lies, as
    they did, and the store takes the name the resumed run is given; moved, they are known by directory only."""
    kwargs = {"steps": 10, "batch": 8, "save_every": 4, "options": sp.CaptureArguments(chunk_rows=8)}
    with pytest.raises(_Killed):
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, crash_after=6, **kwargs)
    index = json.loads((tmp_path / "b" / "trajectory.json").read_text())
    del index["run"]
    (tmp_path / "b" / "trajectory.json").write_text(json.dumps(index))
    store = sp.Store.open(tmp_path / "b.sp", writable=True)
    store.update_meta(trajectory={k: v for k, v in store.meta["trajectory"].items() if k != "run"})
    shutil.copytree(tmp_path / "b", tmp_path / "moved")
    with pytest.raises(sp.StoreError, match=r"holds features of other settings or another run \(trajectory\)"):
        _train(tmp_path / "moved", tmp_path / "b.sp", classification_data, resume=True, **kwargs)
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, **kwargs)
    name = json.loads((tmp_path / "b" / "trajectory.json").read_text())["run"]
    assert sp.Store.open(tmp_path / "b.sp").meta["trajectory"]["run"] == name


def test_a_killed_run_given_its_data_is_not_resumed_without_them(
    tmp_path: Path, classification_data, uninterrupted: Path
) -> None:
    """A killed run captured with datasets= (its data fingerprint, its end pass) resumed without them would end with
    neither, and fit and verify would take the store: refused in one sentence, the store left as it was; given them,
    the run ends as the uninterrupted one."""
    kwargs = _fourteen_steps("factored")
    with pytest.raises(_Killed):
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, crash_after=10, **kwargs)
    killed = _files(tmp_path / "b.sp")
    with pytest.raises(sp.TaskError) as err:
        _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, **dict(kwargs, datasets=None))
    assert str(err.value) == (
        "The captured run was given the training data of stage 'main' as datasets= (its data fingerprint and end "
        "pass are taken from them); resume it with the same datasets=."
    )
    assert _files(tmp_path / "b.sp") == killed
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, resume=True, **kwargs)
    a = uninterrupted / "factored.sp"
    expected, got = _store_arrays(a), _store_arrays(tmp_path / "b.sp")
    assert sorted(expected) == sorted(got) and window_array("end", "main", 12) in got
    assert sp.Store.open(tmp_path / "b.sp").meta["fingerprint"] == sp.Store.open(a).meta["fingerprint"]


def test_a_loop_that_trains_a_first_window_without_capturing_it_is_refused_at_its_checkpoint(
    tmp_path: Path, classification_data
) -> None:
    """Steps recorded before any batch was captured close a window capture never saw: refused at the checkpoint that
    closes it, as a later window without a captured batch is, not by fit after training (the store lacking it)."""
    x, y = classification_data.tensors
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, optimizer, save_every=2)
    sp.GradientCapture(rec, tmp_path / "run.sp", sp.ClassificationTask(), projection=_projection())
    rec.begin_stage("main", dataset_size=len(y))
    F.cross_entropy(model(x[:8]), y[:8]).backward()  # the loop forgot GradientCapture.batch
    optimizer.step()
    rec.step()
    optimizer.step()
    with pytest.raises(sp.TaskError) as err:
        rec.step()
    assert str(err.value) == (
        "Steps 0–1 were recorded without a captured batch; wrap every training batch in GradientCapture.batch (or use "
        "the framework's capture callback)."
    )


@pytest.mark.parametrize("forward", ["training", "separate"])
def test_a_training_batch_whose_outputs_are_nan_is_refused_in_one_sentence_and_the_store_keeps_its_windows(
    tmp_path: Path, classification_data, forward: str
) -> None:
    """A batch whose outputs are NaN (here: step 4's gradient was, so the weights are from step 5 on) cannot have its
    sampled Fisher labels drawn: refused in one sentence (not torch's multinomial error), the windows written before it
    kept and none written after."""
    steps = []

    def diverges(model, rows, optimizer) -> None:
        steps.append(len(steps))
        if len(steps) == 5:
            model[0].weight.grad[0, 0] = float("nan")

    options = sp.CaptureArguments(chunk_rows=8, fisher_forward=forward)
    with pytest.raises(sp.NumericalError) as err:
        _train(tmp_path / "run", tmp_path / "run.sp", classification_data, steps=8, batch=8, save_every=4,
               options=options, on_batch=diverges)  # fmt: skip
    assert str(err.value) == (
        "The model's outputs on the training batch at step 5 are NaN or infinite, so capture cannot draw its Fisher "
        "labels; check that batch's examples and the training loss, and resume the run from its last checkpoint."
    )
    stored = _store_arrays(tmp_path / "run.sp")
    assert window_array("grads", "main", 0) in stored and window_array("grads", "main", 4) not in stored
    assert np.isfinite(stored[window_array("grads", "main", 0)]).all()


@pytest.mark.parametrize("where", ["row 3 infinite", "every row finite, their total not"])
def test_a_window_is_refused_where_a_row_of_its_gradient_sums_is_not_finite_and_only_there(
    tmp_path: Path, classification_data, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The second window's sums, made here to hold an infinite entry in example 3's row, are refused naming that
    example; sums whose rows are all finite but whose total overflows float32 (the check's first, cheap look) are
    written as they are."""
    write = sp.GradientCapture._write_window

    def altered(self, stage, start, sums, *args, **kwargs) -> None:
        if start == 4:
            sums = sums.clone()
            if where == "row 3 infinite":
                sums[3, 1] = float("inf")
            else:
                sums[:2, 0] = 3e38
        write(self, stage, start, sums, *args, **kwargs)

    monkeypatch.setattr(sp.GradientCapture, "_write_window", altered)
    options = sp.CaptureArguments(chunk_rows=8, end_pass=False)

    def run() -> None:
        _train(tmp_path / "run", tmp_path / "run.sp", classification_data, steps=8, batch=8, save_every=4,
               options=options)  # fmt: skip

    if where == "row 3 infinite":
        with pytest.raises(sp.NumericalError, match="gradient of training example 3 of stage 'main' in the window from "
                           "step 4 is NaN or infinite"):  # fmt: skip
            run()
        assert window_array("grads", "main", 4) not in _store_arrays(tmp_path / "run.sp")
    else:
        run()
        assert (_store_arrays(tmp_path / "run.sp")[window_array("grads", "main", 4)][:2, 0] == np.float32(3e38)).all()


def test_row_indices_that_are_not_whole_numbers_or_no_rows_at_all_are_refused_in_one_sentence(
    tmp_path: Path, classification_data
) -> None:
    """Fractional indices would be truncated to other rows, booleans read as rows 0 and 1, and text fails in torch:
    each is refused with a sentence, as is a batch without examples."""
    x, y = classification_data.tensors
    model = _mlp()
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1), save_every=2)
    cap = sp.GradientCapture(rec, tmp_path / "run.sp", sp.ClassificationTask(), projection=_projection())
    rec.begin_stage("main", dataset_size=len(y))
    for indices, what in ([0.5, 1.5, 2.5, 3.5], "float32"), (torch.ones(4, dtype=torch.bool), "bool"),\
                         (["a", "b", "c", "d"], "list"):  # fmt: skip
        with pytest.raises(sp.TaskError) as err:
            cap.begin((x[:4], y[:4]), indices=indices)
        assert str(err.value) == (
            f"The batch's row indices must be whole numbers (each example's row in its stage's dataset), not {what}; "
            "pass integers, as sp.IndexedDataset gives them."
        )
    with pytest.raises(sp.TaskError) as err:
        cap.begin((x[:0], y[:0]), indices=[])
    assert str(err.value) == "The batch holds no examples; capture a batch of one example or more."


def test_a_killed_run_resumed_with_other_settings_is_refused_naming_the_setting(
    tmp_path: Path, classification_data
) -> None:
    """A resume whose projection, capture options or task differ from the killed run's is refused in one sentence
    that names each argument that differs as typed, with both values (the eigen basis's arguments too, where it
    named the digest of the basis inputs, and the Fisher once, where it also named 'featurize'), before training
    resumes, the store left as it was."""
    options = sp.CaptureArguments(chunk_rows=8)
    kwargs = {"steps": 14, "batch": 8, "save_every": 4, "options": options, "datasets": {"main": classification_data}}
    empirical = {"options": replace(options, fisher="empirical")}
    fisher = "fisher='sampled' there, fisher='empirical' here"
    cases = {
        "factored": (_projection(), [
            ({"projection": sp.ProjectionArguments(dim=32, kind="factored")}, "dim=16 there, dim=32 here"),
            ({"projection": replace(_projection(), seed=5)}, "seed=0 there, seed=5 here"),
            ({"projection": _eigen_capture(24)}, "kind='factored' there, kind='eigen' here"),
            ({"task": sp.ClassificationTask(label_smoothing=0.1)}, "task: label_smoothing=None there, 0.1 here"),
            (empirical, fisher),
            ({**empirical, "projection": replace(_projection(), seed=5)}, f"seed=0 there, seed=5 here; {fisher}"),
        ]),
        "eigen": (_eigen_capture(24), [
            ({"projection": _eigen_capture(32)}, "dim=24 there, dim=32 here"),
            ({"projection": replace(_eigen_capture(24), basis_examples=16)},
             "basis_examples=2048 there, basis_examples=16 here"),
            ({"projection": replace(_eigen_capture(24), basis_positions=None, basis_layer_positions=8)},
             "basis_positions=64 there, basis_positions=None here; basis_layer_positions=2048 there, "
             "basis_layer_positions=8 here"),
            ({**empirical, "projection": replace(_eigen_capture(24), basis_examples=16)},
             f"basis_examples=2048 there, basis_examples=16 here; {fisher}"),
        ]),
    }  # fmt: skip
    for kind, (projection, resumes) in cases.items():
        run, store = tmp_path / kind, tmp_path / f"{kind}.sp"
        with pytest.raises(_Killed):
            _train(run, store, classification_data, crash_after=10, projection=projection, **kwargs)
        killed = _files(store)
        for changed, said in resumes:
            with pytest.raises(sp.StoreError) as err:
                _train(run, store, classification_data, resume=True, on_start=_no_step,
                       **{"projection": projection, **kwargs, **changed})  # fmt: skip
            assert str(err.value) == (
                f"The store at {store} holds features of other settings or another run ({said}); capture with the "
                "settings it was made with, pass overwrite=True to replace it, or use another store path."
            )
            assert _files(store) == killed


def _no_step() -> None:
    raise AssertionError("the capture was taken up, where the store should have been refused")


class _Streamed(torch.utils.data.IterableDataset):
    """``data`` as a stream: no len(), no indexing."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        return iter(self.data)


def test_an_iterable_dataset_given_as_datasets_is_captured_unfingerprinted_and_refused_by_the_eigen_projection(
    tmp_path: Path, classification_data
) -> None:
    """A stream given as datasets= (no len()) is trained on and captured as without it (no data fingerprint, no end
    pass with end_pass='auto'), not failed with len()'s TypeError; the eigen projection, which reads examples by
    index, refuses it in one sentence."""
    kwargs = {"steps": 8, "batch": 8, "save_every": 4, "options": sp.CaptureArguments(chunk_rows=8)}
    streamed = {"main": _Streamed(classification_data)}
    _train(tmp_path / "a", tmp_path / "a.sp", classification_data, **kwargs)
    _train(tmp_path / "b", tmp_path / "b.sp", classification_data, datasets=streamed, **kwargs)
    expected, got = _store_arrays(tmp_path / "a.sp"), _store_arrays(tmp_path / "b.sp")
    assert sorted(expected) == sorted(got) and not any(name.startswith("capture/end/") for name in got)
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    assert sp.Store.open(tmp_path / "b.sp").meta["fingerprint"]["data"] is None
    with pytest.raises(sp.TaskError) as err:
        _train(tmp_path / "c", tmp_path / "c.sp", classification_data, datasets=streamed, projection=_eigen_capture(24),
               **kwargs)  # fmt: skip
    assert str(err.value) == (
        "The 'eigen' projection's bases are estimated from examples of the training data read by index, but the "
        "datasets= of ['main'] have no len(); pass map-style datasets, or capture with "
        "ProjectionArguments(kind='factored')."
    )


def test_a_closed_capture_refuses_a_batch_saying_it_was_closed(tmp_path: Path, classification_data) -> None:
    """After ``close`` (or the recorder's close) the layer hooks are gone: a batch begun then is refused as a batch of
    a closed capture, not as one whose backward never reached the layers."""
    x, y = classification_data.tensors
    model = _mlp()
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1), save_every=2)
    cap = sp.GradientCapture(rec, tmp_path / "run.sp", sp.ClassificationTask(), projection=_projection())
    rec.begin_stage("main", dataset_size=len(y))
    cap.close()
    with pytest.raises(sp.TaskError) as err:
        cap.begin((x[:4], y[:4]), indices=range(4))
    assert str(err.value) == (
        "This GradientCapture was closed; to capture further, resume the run (TrajectoryRecorder.resume) and capture "
        "it with a new GradientCapture."
    )


def test_a_left_padded_training_batch_is_refused_since_the_training_forward_shifts_its_positions(
    tmp_path: Path,
) -> None:
    """GPT-2's own forward numbers a left-padded row's positions from its padding; the task reads each sequence from
    position 0 (it rolls the row), so the gradients capture taps from the training step would not be featurize's."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=11, n_positions=6, n_embd=8, n_layer=1, n_head=2,
                                     attn_implementation="eager")  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    task = sp.LanguageModelingTask(tokens_per_sequence="own")
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1), save_every=2)
    cap = sp.GradientCapture(rec, tmp_path / "cap.sp", task, projection=_projection())
    rec.begin_stage("main", dataset_size=2)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    left = {"input_ids": torch.tensor([[3, 4, 5, 6], [0, 0, 7, 8]]), "attention_mask": mask}
    with pytest.raises(sp.TaskError, match=r"^The training batch is padded on the left .* pad the training batches on "
                                           r"the right, or featurize the run after training\.$"):
        cap.begin(left, indices=range(2))
    cap.begin({**left, "input_ids": left["input_ids"].roll(-2, 1), "attention_mask": mask.roll(-2, 1)}, range(2))
