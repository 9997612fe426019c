"""The recorder writes what SOURCE needs; the loader reads it back and refuses what it cannot use."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.trajectory.recorder import Stage


def _record(run: Path, steps_per_stage=(5, 3), save_every: int = 2, momentum: float = 0.9) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=save_every)
    for i, steps in enumerate(steps_per_stage):
        rec.begin_stage(f"s{i}", dataset_size=10 + i)
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            rec.step()
            sched.step()
    rec.close()
    return model


def test_recorder_round_trip(tmp_path: Path) -> None:
    model = _record(tmp_path / "run")
    traj = sp.Trajectory.load(tmp_path / "run")
    assert traj.complete and traj.num_steps == 8
    assert np.allclose(traj.lr, [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125])
    assert [(s.name, s.start_step, s.end_step, s.dataset_size) for s in traj.stages] == [
        ("s0", 0, 5, 10),
        ("s1", 5, 8, 11),
    ]
    # stage starts and ends, and every second step
    assert [c.step for c in traj.checkpoints] == [0, 2, 4, 5, 6, 8]
    assert traj.stages[0].optimizer["kind"] == "sgd"
    assert traj.stages[0].optimizer["groups"][0]["momentum"] == 0.9
    assert traj.stages[0].optimizer["groups"][0]["params"] == ["weight", "bias"]
    restored = traj.load_into(nn.Linear(3, 2), traj.final_checkpoint)
    assert all(
        torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_recorder_refuses_to_overwrite_an_existing_run(tmp_path: Path) -> None:
    _record(tmp_path / "run")
    with pytest.raises(sp.TrajectoryError, match="already holds files"):
        sp.TrajectoryRecorder(
            tmp_path / "run", nn.Linear(1, 1), torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1), save_every=1
        )


@pytest.mark.parametrize("where", ["run", "run/sub"])
def test_a_run_directory_that_is_a_file_is_refused(tmp_path: Path, where: str) -> None:
    (tmp_path / "run").write_text("notes")
    model = nn.Linear(1, 1)
    for overwrite in (False, True):
        with pytest.raises(sp.TrajectoryError, match=rf"{tmp_path / 'run'} is a file, so the run cannot be recorded"):
            sp.TrajectoryRecorder(tmp_path / where, model, torch.optim.SGD(model.parameters(), lr=1), save_every=1,
                                  overwrite=overwrite)  # fmt: skip
    assert (tmp_path / "run").read_text() == "notes"


def test_a_refused_begin_stage_leaves_the_running_stage_as_it_was(tmp_path: Path) -> None:
    """begin_stage ends the running stage only once the new one is accepted: a resumed run that calls
    begin_stage("main") again (as a fresh run's script does) used to end main there, then refuse the name."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2)
    rec.begin_stage("main", dataset_size=10)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        rec.step()
    with pytest.raises(sp.TrajectoryError, match=r"'main' was already recorded \(it is the stage being recorded"):
        rec.begin_stage("main", dataset_size=10)
    with pytest.raises(sp.TrajectoryError, match="needs a positive dataset size"):
        rec.begin_stage("next", dataset_size=0)
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    rec.step()  # main is still running
    rec.close()
    traj = sp.Trajectory.load(tmp_path / "run")
    assert [(s.name, s.start_step, s.end_step) for s in traj.stages] == [("main", 0, 4)]


def _recorder_hooks(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """The hooks on ``model``'s parameters and on ``opt``'s steps."""
    on_params = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    return on_params + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def test_a_loop_that_raised_leaves_no_recorder_hook_on_its_model_and_the_recorder_refuses_more(tmp_path: Path) -> None:
    """A loop inside ``with rec:`` that raises (a KeyboardInterrupt) at step 3: the recorder's hooks come off
    (``detach``), the run stays resumable at its last checkpoint, and the detached recorder refuses a further step
    in one sentence. A plain loop's recorder left open is detached by the model's next recorder (a resume in the
    same process), so the model carries one recorder's hooks, not two."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train(rec: sp.TrajectoryRecorder, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            rec.step()

    with pytest.raises(KeyboardInterrupt), sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2) as rec:
        rec.begin_stage("main", dataset_size=10)
        one = _recorder_hooks(model, opt)
        train(rec, 3)
        raise KeyboardInterrupt
    assert one > 0 and _recorder_hooks(model, opt) == 0
    with pytest.raises(sp.TrajectoryError, match=r"was detached \(its training loop raised.*TrajectoryRecorder.resume"):
        rec.step()
    rec.detach()  # again: nothing
    index = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert not index["complete"] and [c["step"] for c in index["checkpoints"]] == [0, 2]
    left = sp.TrajectoryRecorder.resume(tmp_path / "run", model, opt, save_every=2)
    train(left, 1)  # and raised, outside any with: nothing detached it
    again = sp.TrajectoryRecorder.resume(tmp_path / "run", model, opt, save_every=2)
    assert _recorder_hooks(model, opt) == one
    with pytest.raises(sp.TrajectoryError, match="was detached"):
        left.step()
    train(again, 2)
    again.close()
    assert _recorder_hooks(model, opt) == 0 and sp.Trajectory.load(tmp_path / "run").num_steps == 4


def test_fingerprint_changes_with_any_checkpoint(tmp_path: Path) -> None:
    _record(tmp_path / "a")
    _record(tmp_path / "b", steps_per_stage=(5, 4))
    assert sp.Trajectory.load(tmp_path / "a").fingerprint() != sp.Trajectory.load(tmp_path / "b").fingerprint()


def test_changed_checkpoint_file_is_detected(tmp_path: Path) -> None:
    _record(tmp_path / "run")
    traj = sp.Trajectory.load(tmp_path / "run")
    path = tmp_path / "run" / traj.checkpoints[1].file
    torch.save({"model": nn.Linear(3, 2).state_dict()}, path)
    with pytest.raises(sp.TrajectoryError, match="does not match the sha256"):
        traj.load_state(traj.checkpoints[1])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _age(path: Path, seconds: float) -> None:
    """Set ``path``'s modification time ``seconds`` into the past (a checkpoint saved that long ago)."""
    past = path.stat().st_mtime_ns - int(seconds * 1e9)
    os.utime(path, ns=(past, past))


def test_a_checkpoint_is_hashed_once_per_process_until_it_changes(tmp_path: Path, monkeypatch) -> None:
    """Featurize loads a checkpoint several times; its sha256 is taken once while the file stays as it was, and
    again (and the change refused) once it is edited."""
    from source_proj.trajectory import recorder

    _record(tmp_path / "run")
    traj = sp.Trajectory.load(tmp_path / "run")
    path = tmp_path / "run" / traj.checkpoints[1].file
    _age(path, 60)
    hashed: list[Path] = []
    monkeypatch.setattr(recorder, "_sha256_file", lambda p: hashed.append(p) or _sha256(p))
    first = traj.load_state(traj.checkpoints[1])
    second = traj.load_state(traj.checkpoints[1])
    assert hashed == [path]
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    raw = bytearray(path.read_bytes())  # edited in place: same inode and size, a flipped byte in a weight
    raw[-30] ^= 0xFF
    path.write_bytes(bytes(raw))
    _age(path, 30)
    with pytest.raises(sp.TrajectoryError, match="does not match the sha256"):
        traj.load_state(traj.checkpoints[1])
    assert hashed == [path, path]


def test_a_checkpoint_written_seconds_ago_is_hashed_at_every_load(tmp_path: Path, monkeypatch) -> None:
    """An edit within the kernel's timestamp tick could leave size and mtime unchanged, so a file this recent is not
    remembered (git's racy-clean rule)."""
    from source_proj.trajectory import recorder

    _record(tmp_path / "run")
    traj = sp.Trajectory.load(tmp_path / "run")
    calls: list[Path] = []
    monkeypatch.setattr(recorder, "_sha256_file", lambda p: calls.append(p) or _sha256(p))
    traj.load_state(traj.checkpoints[2])
    traj.load_state(traj.checkpoints[2])
    assert len(calls) == 2


def test_a_mapped_checkpoint_reads_as_a_loaded_one_and_an_old_format_file_still_loads(tmp_path: Path) -> None:
    """``load_state`` maps the file (read as used, copy-on-write); a checkpoint torch saved in its pre-zip format
    cannot be mapped and is read whole, and a mapped tensor changed in place leaves the file as it was."""
    from source_proj.trajectory.recorder import Checkpoint, load_checkpoint

    _record(tmp_path / "run")
    traj = sp.Trajectory.load(tmp_path / "run")
    checkpoint = traj.checkpoints[1]
    plain = load_checkpoint(traj.path, checkpoint)
    mapped = traj.load_state(checkpoint)
    assert plain["model"].keys() == mapped["model"].keys()
    assert all(torch.equal(plain["model"][k], mapped["model"][k]) for k in plain["model"])
    mapped["model"]["weight"].add_(1.0)
    assert torch.equal(traj.load_state(checkpoint)["model"]["weight"], plain["model"]["weight"])
    old = tmp_path / "run" / "old-format.pt"
    torch.save({"model": plain["model"]}, old, _use_new_zipfile_serialization=False)
    legacy = Checkpoint(step=checkpoint.step, file=old.name, sha256=_sha256(old),
                        optimizer_state=False)  # fmt: skip
    assert torch.equal(load_checkpoint(traj.path, legacy, mmap=True)["model"]["bias"], plain["model"]["bias"])


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    _record(tmp_path / "run")
    traj = sp.Trajectory.load(tmp_path / "run")
    with pytest.raises(sp.TrajectoryError, match="does not fit the model"):
        traj.load_into(nn.Linear(4, 2), traj.final_checkpoint)


def test_trajectory_without_learning_rates_is_refused(tmp_path: Path) -> None:
    _record(tmp_path / "run")
    index = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    index["lr"] = []
    (tmp_path / "run" / "trajectory.json").write_text(json.dumps(index))
    with pytest.raises(sp.TrajectoryError, match="records no learning rates"):
        sp.Trajectory.load(tmp_path / "run")


def test_missing_directory_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(sp.TrajectoryError, match="not a directory"):
        sp.Trajectory.load(tmp_path / "nowhere")


def _two_groups(lr: tuple[float, float], **settings) -> tuple[nn.Module, torch.optim.SGD]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    groups = [{"params": model[i].parameters(), "lr": rate} for i, rate in enumerate(lr)]
    return model, torch.optim.SGD(groups, **settings)


def _train_steps(rec: sp.TrajectoryRecorder, model: nn.Module, opt: torch.optim.Optimizer, sched, steps: int) -> None:
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        rec.step()
        sched.step()


@pytest.mark.parametrize("warmup", [False, True])
def test_groups_at_a_constant_ratio_record_the_reference_rate_and_each_groups_ratio(
    tmp_path: Path, warmup: bool
) -> None:
    """A backbone at 0.1 and a head at 0.5 under one LambdaLR: every step records the head's rate (the largest base
    rate: the reference), 0.5·λ(k), and the stage's groups their ratios 0.2 and 1, also where a warm-up from 0 gives
    every group rate 0 as the stage begins (the ratio is then the scheduler's base rates')."""
    model, opt = _two_groups((0.1, 0.5))
    schedule = (lambda k: (k + 1) / 4) if warmup else (lambda k: 0.9**k)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.0 if warmup and k == 0 else schedule(k))
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2)
    rec.begin_stage("main", dataset_size=3)
    _train_steps(rec, model, opt, sched, 4)
    rec.close()
    traj = sp.Trajectory.load(tmp_path / "run")
    expected = [0.5 * (0.0 if warmup and k == 0 else schedule(k)) for k in range(4)]
    np.testing.assert_allclose(traj.lr, expected, rtol=1e-12)
    assert [g["lr_ratio"] for g in traj.stages[0].optimizer["groups"]] == pytest.approx([0.2, 1.0], rel=1e-12)
    assert traj.stages[0].lr_ratios == pytest.approx({"0.weight": 0.2, "0.bias": 0.2, "1.weight": 1.0, "1.bias": 1.0})


def test_a_step_whose_groups_leave_their_ratio_is_refused_at_that_step(tmp_path: Path) -> None:
    """A scheduler that treats the groups differently (a lambda per group) keeps their ratio at the first step and
    leaves it at the second: that step is refused, naming the group and the rates."""
    model, opt = _two_groups((0.1, 0.5))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda k: 1.0, lambda k: 0.5**k])
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=10)
    rec.begin_stage("main", dataset_size=3)
    _train_steps(rec, model, opt, sched, 1)
    with pytest.raises(sp.TrajectoryError, match=r"^Step 1: parameter group 0 used learning rate 0\.1, not 0\.2 times "
                                                 r"the reference group's 0\.25 .*stage 'main' began"):  # fmt: skip
        _train_steps(rec, model, opt, sched, 1)


def test_a_group_added_to_a_stage_of_rate_ratios_is_refused_at_the_next_step(tmp_path: Path) -> None:
    """The stage recorded the ratios of its groups; a group added later has none, so its step is refused (a stage
    of one rate takes the new group at that rate, as before)."""
    model, opt = _two_groups((0.1, 0.5))
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=10)
    rec.begin_stage("main", dataset_size=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    _train_steps(rec, model, opt, sched, 1)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.5})
    with pytest.raises(sp.TrajectoryError, match=r"^Step 1: the optimiser has 3 parameter groups, not the 2 whose "):
        _train_steps(rec, model, opt, sched, 1)


def test_a_group_at_rate_0_is_recorded_as_frozen_and_a_step_that_moves_it_refused(tmp_path: Path) -> None:
    """A group whose base rate is 0 has ratio 0 (SOURCE scales its gradients by 0: it did not move); a rate given to it
    later leaves the ratio, and is refused."""
    model, opt = _two_groups((0.0, 0.3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=10)
    rec.begin_stage("main", dataset_size=3)
    _train_steps(rec, model, opt, sched, 2)
    index = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert [g["lr_ratio"] for g in index["stages"][0]["optimizer"]["groups"]] == [0.0, 1.0]
    opt.param_groups[0]["lr"] = 0.1
    with pytest.raises(sp.TrajectoryError, match=r"parameter group 0 used learning rate 0\.1, not 0 times"):
        _train_steps(rec, model, opt, sched, 1)


def test_groups_that_share_a_rate_record_no_ratio(tmp_path: Path) -> None:
    """A run whose groups share one rate writes its stages as before (no lr_ratio), and so keeps its fingerprint."""
    model, opt = _two_groups((0.1, 0.1), weight_decay=0.01)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2)
    rec.begin_stage("main", dataset_size=3)
    _train_steps(rec, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0), 2)
    rec.close()
    groups = json.loads((tmp_path / "run" / "trajectory.json").read_text())["stages"][0]["optimizer"]["groups"]
    assert all("lr_ratio" not in g for g in groups)
    assert set(sp.Trajectory.load(tmp_path / "run").stages[0].lr_ratios.values()) == {1.0}


def test_a_hand_written_group_that_names_no_parameters_has_no_ratios() -> None:
    """The format lets a hand-written group leave out its parameter names: it gives no parameter a ratio."""
    stage = Stage("main", 0, 2, 3, {"kind": "sgd", "groups": [{"lr": 0.1}]})
    assert stage.lr_ratios == {}


@pytest.mark.parametrize("ratios", [[0.2, None], [0.2, 0.5], [-0.1, 1.0], [0.2, 1.5]])
def test_malformed_lr_ratios_are_refused_as_the_trajectory_loads(tmp_path: Path, ratios: list) -> None:
    model, opt = _two_groups((0.1, 0.5))
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2)
    rec.begin_stage("main", dataset_size=3)
    _train_steps(rec, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0), 2)
    rec.close()
    index = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    for group, ratio in zip(index["stages"][0]["optimizer"]["groups"], ratios, strict=True):
        group.pop("lr_ratio")
        if ratio is not None:
            group["lr_ratio"] = ratio
    (tmp_path / "run" / "trajectory.json").write_text(json.dumps(index))
    with pytest.raises(sp.TrajectoryError, match="lr_ratio in \\[0, 1\\]"):
        sp.Trajectory.load(tmp_path / "run")


@pytest.mark.parametrize("where", ["mid_stage", "new_stage"])
def test_a_parameter_frozen_for_part_of_the_run_is_warned_of(tmp_path: Path, where: str) -> None:
    """SOURCE takes every attributed parameter as trained at every step: a layer unfrozen after some steps (within a
    stage, or as a new stage begins) is warned of, once, by name; a run that freezes nothing is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2)
        rec.begin_stage("head", dataset_size=4)
        for step in range(6):
            if step == 3:
                model[0].requires_grad_(True)
                if where == "new_stage":
                    rec.begin_stage("all", dataset_size=4)
            opt.zero_grad()
            model(torch.randn(4, 2)).pow(2).mean().backward()
            opt.step()
            rec.step()
        rec.close()
    said = [str(w.message) for w in caught if "frozen or unfrozen" in str(w.message)]
    when = "at step 3" if where == "mid_stage" else "as stage 'all' begins"
    assert len(said) == 1 and f"2 parameters (0.weight, 0.bias) were frozen or unfrozen {when}" in said[0]


def test_a_model_averaging_gradients_over_processes_is_told_to_pass_its_clipping(tmp_path: Path, monkeypatch) -> None:
    """DistributedDataParallel averages the gradients after the hooks that measure clipping have seen each process's
    own: the factor would compare the two. A one-process gloo group stands in for several (its size patched)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.warns(UserWarning, match="wrapped in DistributedDataParallel over several processes"):
            sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sp.TrajectoryRecorder(tmp_path / "quiet", model, opt, save_every=1, watch_clipping=False)
    finally:
        dist.destroy_process_group()


def test_attributed_parameters_another_optimizer_trained_are_refused(tmp_path: Path) -> None:
    """A loop with an optimizer per layer gives the recorder one of them: the other layer trained at another rule, which
    SOURCE would model as the recorded one's. Featurize and capture refuse it, naming the parameters; attributing the
    recorded optimizer's layer alone is accepted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    head, body = torch.optim.SGD(model[2].parameters(), lr=0.1), torch.optim.Adam(model[0].parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g))
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, head, save_every=2)
    rec.begin_stage("main", dataset_size=8)
    for step in range(4):
        x, y = data[2 * step : 2 * step + 2]
        head.zero_grad(), body.zero_grad()
        F.cross_entropy(model(x), y).backward()
        head.step(), body.step()
        rec.step()
    rec.close()
    refused = r"Parameters \['0.weight', '0.bias'\] are attributed but not optimised in stage 'main'"
    with pytest.raises(sp.TrajectoryError, match=refused):
        sp.featurize(tmp_path / "run", model, sp.ClassificationTask(), data, tmp_path / "s.sp",
                     projection=sp.ProjectionArguments(dim=4, kind="rademacher"), progress=False)
    head_only = sp.ClassificationTask(parameters=sp.ParameterSelection(include=("2.*",)))
    sp.featurize(tmp_path / "run", model, head_only, data, tmp_path / "head.sp",
                 projection=sp.ProjectionArguments(dim=4, kind="rademacher"), progress=False)
    rec = sp.TrajectoryRecorder(tmp_path / "captured", model, head, save_every=2)
    capture = sp.GradientCapture(rec, tmp_path / "cap.sp", sp.ClassificationTask(),
                                 projection=sp.ProjectionArguments(dim=4, kind="factored"))
    rec.begin_stage("main", dataset_size=8)
    with pytest.raises(sp.TrajectoryError, match="are attributed but not optimised in stage 'main'"):
        capture.begin(data[0:2], indices=[0, 1])


def _clipped_run(run: Path, max_norm: float, scaler: torch.amp.GradScaler | None, pass_scaler: bool) -> list[float]:
    """12 SGD steps of 2 accumulated micro-batches each, clipped at ``max_norm``; returns min(1, c/‖g‖) per step."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=g), torch.randn(48, generator=g) * 3
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=4, grad_scaler=scaler if pass_scaler else None)
    rec.begin_stage("main", dataset_size=48)
    expected = []
    for step in range(12):
        opt.zero_grad()
        for half in range(2):
            rows = slice(4 * step + 2 * half, 4 * step + 2 * half + 2)
            loss = ((model(x[rows]).squeeze(-1) - y[rows]) ** 2).mean() / 2
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        expected.append(min(1.0, max_norm / (norm + 1e-6)))
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        rec.step()
    rec.close()
    return expected


@pytest.mark.parametrize("scaled", [False, True])
def test_gradient_clipping_factor_is_measured_every_step(tmp_path: Path, scaled: bool) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    expected = _clipped_run(tmp_path / "run", 4.0, scaler, pass_scaler=True)
    traj = sp.Trajectory.load(tmp_path / "run")
    assert 0 < min(expected) < 0.6 and max(expected) == 1.0  # some steps clipped hard, some not at all
    assert np.allclose(traj.clip, expected, rtol=1e-4)
    assert np.allclose(traj.lr, 0.05 * np.asarray(expected))  # SOURCE's step sizes: η_k·α_k
    assert np.array_equal(traj.rates, np.full(12, 0.05))
    assert traj.clip[np.asarray(expected) == 1.0].tolist() == [1.0] * int(sum(e == 1.0 for e in expected))


@pytest.mark.parametrize("clipping", ["whole", "whole_scaled", "part", "value"])
def test_rescaling_parts_of_the_gradient_by_different_factors_is_warned_of_once(tmp_path: Path, clipping: str) -> None:
    """SOURCE takes one factor per step: clipping some of the parameters, or each element by value, is recorded as
    the whole gradient's factor, and warned of once; clipping the whole gradient (loss-scaled or not) is not."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=g), torch.randn(48, generator=g) * 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if clipping == "whole_scaled" else None
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=4, grad_scaler=scaler)
    rec.begin_stage("main", dataset_size=48)
    factors = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(12):
            opt.zero_grad()
            loss = ((model(x[4 * step:4 * step + 4]).squeeze(-1) - y[4 * step:4 * step + 4]) ** 2).mean()
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            before = float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
            if clipping == "part":
                torch.nn.utils.clip_grad_norm_(model[0].parameters(), 0.05)
            elif clipping == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), 0.05)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            factors.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()) / before)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            rec.step()
        rec.close()
    said = [str(w.message) for w in caught if "rescaled parts of the gradient by different factors" in str(w.message)]
    assert len(said) == (0 if clipping.startswith("whole") else 1)
    assert min(factors) < 0.9 and np.allclose(sp.Trajectory.load(tmp_path / "run").clip, factors, rtol=1e-4)


@pytest.mark.parametrize("recorded_by", ["loop", "earlier_post_hook"])
def test_clipping_inside_a_closure_step_is_measured_for_that_step(tmp_path: Path, recorded_by: str) -> None:
    """``optimizer.step(closure)`` (Lightning's automatic optimization) runs backward and clipping inside the step,
    after its pre-hooks: each factor is the step's own, not the one before it. Also where the step is recorded by
    a post-hook registered before the recorder's own."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 4, generator=g), torch.randn(24, generator=g) * 3
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    recorders: list[sp.TrajectoryRecorder] = []
    if recorded_by == "earlier_post_hook":
        opt.register_step_post_hook(lambda *_: recorders[0].step())
    recorders.append(sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=3))
    recorders[0].begin_stage("main", dataset_size=24)
    expected = []

    def closure(rows: slice) -> torch.Tensor:
        opt.zero_grad()
        loss = ((model(x[rows]).squeeze(-1) - y[rows]) ** 2).mean()
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 6.0))
        expected.append(min(1.0, 6.0 / (norm + 1e-6)))
        return loss

    for step in range(6):
        opt.step(lambda: closure(slice(4 * step, 4 * step + 4)))  # noqa: B023 (called at once)
        if recorded_by == "loop":
            recorders[0].step()
    recorders[0].close()
    traj = sp.Trajectory.load(tmp_path / "run")
    assert 0 < min(expected) < 0.6 and max(expected) == 1.0
    assert np.allclose(traj.clip, expected, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_a_loss_scalers_skipped_step_moves_nothing_with_a_fused_optimizer_too(tmp_path: Path, fused: bool) -> None:
    """A fused AdamW unscales the gradients itself, and the scaler calls its step even on an inf gradient, whose
    update it skips inside: the step is recorded as moving nothing (rate × factor 0), and the others as unclipped
    (the scaler's own unscaling, done inside the step, is not taken for clipping)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=3, grad_scaler=scaler)
    rec.begin_stage("main", dataset_size=30)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    moved = []
    for step in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[5 * step : 5 * step + 5]), y[5 * step : 5 * step + 5])
        before = model.weight.detach().clone()
        scaler.scale(loss * (float("inf") if step == 2 else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        rec.step()
        moved.append(not torch.equal(before, model.weight))
    rec.close()
    assert moved == [True, True, False, True, True, True]
    assert sp.Trajectory.load(tmp_path / "run").lr.tolist() == pytest.approx([0.01, 0.01, 0.0, 0.01, 0.01, 0.01])


def test_a_loss_scaler_the_recorder_does_not_know_is_refused(tmp_path: Path) -> None:
    with pytest.raises(sp.TrajectoryError, match="loss scaler"):
        _clipped_run(tmp_path / "run", 1e6, torch.amp.GradScaler("cpu", init_scale=2.0**12), pass_scaler=False)


def test_a_loss_scaler_the_recorder_does_not_know_is_warned_of_when_every_step_is_clipped(tmp_path: Path) -> None:
    """Clipping after the unscaling hides the exact power of two; the factor is still far below usual clipping, so
    the recorder warns, once (a real spike may be clipped that hard: a refusal would stop the training run)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _clipped_run(tmp_path / "run", 1e-2, torch.amp.GradScaler("cpu", init_scale=2.0**12), pass_scaler=False)
    said = [str(w.message) for w in caught if "loss scaler unscaling them" in str(w.message)]
    assert len(said) == 1 and "shrank by" in said[0]
    assert max(sp.Trajectory.load(tmp_path / "run").clip) < 1e-3  # recorded as measured


def test_clipping_factors_outside_zero_one_are_refused(tmp_path: Path) -> None:
    _clipped_run(tmp_path / "run", 0.8, None, pass_scaler=False)
    index = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    index["clip"][3] = 1.5
    (tmp_path / "run" / "trajectory.json").write_text(json.dumps(index))
    with pytest.raises(sp.TrajectoryError, match="one clipping factor in"):
        sp.Trajectory.load(tmp_path / "run")


@pytest.mark.parametrize("case", ["other model's optimizer", "this model's", "learning rate 0"])
def test_weights_that_do_not_move_under_a_positive_learning_rate_are_warned_of(tmp_path: Path, case: str) -> None:
    """An optimizer built on another model's parameters trains nothing the recorder sees: the checkpoints all hold
    the same weights while the recorded learning rates say the run trained. The first checkpoint after such steps
    warns; a run that trains, or steps at learning rate 0, does not."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    params = nn.Linear(3, 2).parameters() if case == "other model's optimizer" else model.parameters()
    opt = torch.optim.SGD(params, lr=0.0 if case == "learning rate 0" else 0.1)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2)
    rec.begin_stage("main", dataset_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            rec.step()
        rec.close()
    said = [str(w.message) for w in caught if "did not change" in str(w.message)]
    if case == "other model's optimizer":
        assert said[0].startswith("The model's weights did not change from step 0 to step 2 though the learning rate")
        assert len(said) == 2  # at steps 2 and 4
    else:
        assert said == []


def _accumulated_run(run: Path, *, step_each_batch: bool, save_every: int) -> None:
    """A 3-4 linear classifier under SGD, 8 optimizer steps of 2 accumulated batches of 5; ``step_each_batch``: the
    recorder's step() after every batch (the misuse), else after each optimizer step."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g), torch.randint(0, 4, (20,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=save_every)
    rec.begin_stage("main", dataset_size=20)
    for step in range(8):
        for half in range(2):
            rows = torch.arange(5) + 10 * (step % 2) + 5 * half
            (nn.functional.cross_entropy(model(x[rows]), y[rows]) / 2).backward()
            if half == 1:
                opt.step()
                opt.zero_grad()
            if step_each_batch or half == 1:
                rec.step()
    rec.close()


def test_step_calls_without_an_optimizer_step_are_recorded_at_learning_rate_zero_and_give_the_same_scores(
    tmp_path: Path,
) -> None:
    """A loop that calls the recorder's step() after every batch of a gradient accumulation records twice the steps
    the optimizer took. The recorder counts the optimizer's steps: a call after none is recorded at learning rate 0
    (the weights did not move) and warned of, once, so SOURCE's scores are those of the loop done right."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _accumulated_run(tmp_path / "right", step_each_batch=False, save_every=2)
    assert not [w for w in caught if "TrajectoryRecorder.step()" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _accumulated_run(tmp_path / "each", step_each_batch=True, save_every=4)
    said = [str(w.message) for w in caught if "TrajectoryRecorder.step()" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("TrajectoryRecorder.step() at step 0: the optimizer it records took")
    right, each = sp.Trajectory.load(tmp_path / "right"), sp.Trajectory.load(tmp_path / "each")
    assert np.array_equal(each.lr, np.tile([0.0, 0.3], 8)) and np.array_equal(right.lr, np.full(8, 0.3))

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(20, 3, generator=g), torch.randint(0, 4, (20,), generator=g))
    scores = []
    for name in ("right", "each"):
        store = tmp_path / f"{name}.sp"
        projection = sp.ProjectionArguments(dim=8, kind="rademacher")
        sp.featurize(tmp_path / name, nn.Linear(3, 4), sp.ClassificationTask(), data, store, projection=projection,
                     progress=False)  # fmt: skip
        sp.fit(store, progress=False)
        scores.append(sp.Attributor(store, nn.Linear(3, 4), sp.ClassificationTask()).scores(data))
    assert np.abs(scores[0]).max() > 0
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-4, atol=1e-6 * np.abs(scores[0]).max())


@pytest.mark.parametrize("case", ["skipped by the loss scaler", "two optimizer steps", "another optimizer"])
def test_a_recorder_out_of_step_with_its_optimizer_is_told_once(tmp_path: Path, case: str) -> None:
    """The loss scaler's skipped step (an inf gradient) is recorded at learning rate 0 without a word; two optimizer
    steps to one step() call, or an optimizer the recorder was not given, are warned of once."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2, grad_scaler=scaler)
    rec.begin_stage("main", dataset_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            opt.zero_grad()
            scaler.scale(model(torch.randn(4, 3)).sum()).backward()
            if case == "skipped by the loss scaler" and step == 1:
                model.weight.grad[0, 0] = float("inf")
            before = model.weight.detach().clone()
            scaler.step(other if case == "another optimizer" else opt)
            scaler.update()
            if case == "two optimizer steps":
                opt.step()
            rec.step()
            if case == "skipped by the loss scaler":
                assert torch.equal(model.weight, before) == (step == 1)
        rec.close()
    said = [str(w.message) for w in caught if "TrajectoryRecorder.step()" in str(w.message)]
    lr = sp.Trajectory.load(tmp_path / "run").lr
    if case == "skipped by the loss scaler":
        assert said == [] and lr.tolist() == [0.1, 0.0, 0.1, 0.1]
    elif case == "two optimizer steps":
        assert len(said) == 1 and "took 2 steps since the last call, so SOURCE misses 1 of them" in said[0]
        assert lr.tolist() == [0.1] * 4
    else:  # with a loss scaler, a step not taken may be its skip: told at the checkpoint, as the parameters moved
        assert lr.tolist() == [0.0] * 4
        moved = [str(w.message) for w in caught if "the recorder was given took none" in str(w.message)]
        assert said == [] and len(moved) == 1
        assert moved[0].startswith("The model's parameters changed from step 0 to step 2 though the optimizer")


def test_the_rate_recorded_is_the_one_the_step_used_whether_the_scheduler_moved_before_or_after_step(
    tmp_path: Path,
) -> None:
    """rec.step() reads the learning rate its optimizer step used (as the step began), so a loop that moves the
    scheduler first records the same rates as one that moves it after."""
    rates = {}
    for order in ("recorder first", "scheduler first"):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
        rec = sp.TrajectoryRecorder(tmp_path / order, model, opt, save_every=3)
        rec.begin_stage("main", dataset_size=4)
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            if order == "scheduler first":
                sched.step()
            rec.step()
            if order == "recorder first":
                sched.step()
        rec.close()
        rates[order] = sp.Trajectory.load(tmp_path / order).lr.tolist()
    assert rates["scheduler first"] == rates["recorder first"] == pytest.approx([0.1 / (1 + k) for k in range(6)])


def test_a_step_post_hook_registered_before_the_recorder_records_every_step(tmp_path: Path) -> None:
    """The integrations call step() from the optimizer's step post-hook; one registered before the recorder was made
    (and so run before any post-hook of the recorder's own) still finds the step counted, at the rate it used."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)
    made: list[sp.TrajectoryRecorder] = []
    opt.register_step_post_hook(lambda *_: made[0].step())
    made.append(sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2))
    made[0].begin_stage("main", dataset_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            sched.step()
        made[0].close()
    assert not [w for w in caught if "TrajectoryRecorder.step()" in str(w.message)]
    assert sp.Trajectory.load(tmp_path / "run").lr.tolist() == pytest.approx([0.1 * 0.5**k for k in range(4)])


def test_a_cycled_momentum_is_recorded_per_step_and_sets_each_steps_size(tmp_path: Path) -> None:
    """OneCycleLR cycles SGD's momentum (0.95 → 0.85 → 0.95) with the rate. The recorder keeps each step's β, and a
    step's size in SOURCE is then η_k/(1−β_k), not η_k/(1−β) at the momentum the stage began with: the segment's
    mean rate is the mean of the steps' own. A run whose momentum stays put writes no momenta."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=8, base_momentum=0.85, max_momentum=0.95)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=4)
    rec.begin_stage("main", dataset_size=4)
    rates, betas = [], []
    for _ in range(8):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        rates.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0]["momentum"])
        opt.step()
        rec.step()
        sched.step()
    rec.close()
    assert betas[0] == 0.95 and min(betas) < 0.86  # the schedule moved it
    index = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert index["momentum"] == pytest.approx(betas)
    traj = sp.Trajectory.load(tmp_path / "run")
    own = np.asarray(rates) / (1 - np.asarray(betas))  # each step's own effective rate
    assert np.allclose(traj.lr / (1 - 0.95), own)
    (segment,) = sp.make_segments(traj.stages, [c.step for c in traj.checkpoints], traj.lr, {"weight": 6, "bias": 2})
    assert segment.mean_lr == pytest.approx(own.mean())
    assert segment.mean_lr < 0.75 * np.mean(rates) / (1 - 0.95)  # what the stage's first momentum alone gave

    _record(tmp_path / "steady")
    assert "momentum" not in json.loads((tmp_path / "steady" / "trajectory.json").read_text())
    index["momentum"][3] = 1.0
    (tmp_path / "run" / "trajectory.json").write_text(json.dumps(index))
    with pytest.raises(sp.TrajectoryError, match=r"'momentum' must hold one momentum in \[0, 1\) or null"):
        sp.Trajectory.load(tmp_path / "run")


def test_a_run_cut_before_its_momentum_moved_keeps_the_fingerprint_it_had(tmp_path: Path) -> None:
    """A run whose momentum a schedule starts moving only later: cut before that (``truncated``, as growing a store
    compares the run it was built from), it has the fingerprint of the run recorded up to there."""
    def run(folder: Path, steps: int) -> sp.Trajectory:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rec = sp.TrajectoryRecorder(folder, model, opt, save_every=2)
        rec.begin_stage("main", dataset_size=4)
        g = torch.Generator().manual_seed(1)
        for step in range(steps):
            opt.param_groups[0]["momentum"] = 0.9 if step < 4 else 0.8
            opt.zero_grad()
            model(torch.randn(4, 3, generator=g)).sum().backward()
            opt.step()
            rec.step()
        rec.close()
        return sp.Trajectory.load(folder)

    short, long = run(tmp_path / "short", 4), run(tmp_path / "long", 6)
    assert "momentum" not in short._index and long._index["momentum"][3:] == [0.9, 0.8, 0.8]
    assert long.truncated(4).fingerprint() == short.fingerprint() != long.fingerprint()
    assert long.truncated(5).fingerprint() != short.fingerprint()


def _cycled(run: Path, steps: range, *, resume: bool = False, groups: int = 1) -> list[str]:
    """SGD steps ``steps`` of an 8-step OneCycleLR run (momentum cycled) on a fixed stream of batches, recorded in
    ``run`` (resumed from its last checkpoint when ``resume``); returns the warnings' texts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    params = [{"params": m.parameters()} for m in model] if groups == 2 else model.parameters()
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if resume:  # the weights and the optimizer's state first, then the schedule brought to the step
            rec = sp.TrajectoryRecorder.resume(run, model, opt, save_every=2, save_optimizer_state=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=8, base_momentum=0.85,
                                                    max_momentum=0.95)  # fmt: skip
        for _ in range(steps.start):
            sched.step()
        if not resume:
            rec = sp.TrajectoryRecorder(run, model, opt, save_every=2, save_optimizer_state=True)  # resumes exactly
            rec.begin_stage("main", dataset_size=4)
        if groups == 2:  # the groups part ways after the stage began
            opt.param_groups[1]["base_momentum"], opt.param_groups[1]["max_momentum"] = 0.8, 0.9
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(4, 3, generator=g) for _ in range(8)]
        for step in steps:
            opt.zero_grad()
            model(batches[step]).sum().backward()
            opt.step()
            rec.step()
            sched.step()
        if steps.stop == 8:
            rec.close()
    return [str(w.message) for w in caught]


def test_a_resumed_run_keeps_the_momenta_recorded_before_its_last_checkpoint(tmp_path: Path) -> None:
    _cycled(tmp_path / "whole", range(8))
    _cycled(tmp_path / "resumed", range(5))  # killed after step 5: the checkpoint at step 4 is the last
    _cycled(tmp_path / "resumed", range(4, 8), resume=True)
    whole = json.loads((tmp_path / "whole" / "trajectory.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "trajectory.json").read_text())
    assert len(set(whole["momentum"])) > 2 and resumed["momentum"] == whole["momentum"]
    fingerprints = [sp.Trajectory.load(tmp_path / name).fingerprint() for name in ("resumed", "whole")]
    assert fingerprints[0] == fingerprints[1]


def test_groups_whose_momenta_part_ways_are_warned_of_and_keep_the_stages_first(tmp_path: Path) -> None:
    said = [m for m in _cycled(tmp_path / "run", range(8), groups=2) if "momenta" in m]
    assert len(said) == 1 and "SOURCE follows a moving momentum only where all groups share one" in said[0]
    assert "momentum" not in json.loads((tmp_path / "run" / "trajectory.json").read_text())  # never shared a new one
    traj = sp.Trajectory.load(tmp_path / "run")
    assert np.array_equal(traj.lr, traj.rates * traj.clip)


@pytest.mark.parametrize("wrapper", ["DataParallel", "torch.compile"])
def test_a_wrapped_model_is_recorded_as_the_model_inside(tmp_path: Path, wrapper: str, monkeypatch) -> None:
    """DataParallel/DDP prefix every name with ``module.``, torch.compile with ``_orig_mod.``: recorded as such, no
    model built again for featurize fitted the checkpoints. The recorder saves the model inside, so the run is the
    plain model's, fingerprint included; a run recorded wrapped before is refused with a sentence naming why."""
    def record(folder: Path, wrap: bool) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        trained = model
        if wrap:
            trained = nn.DataParallel(model) if wrapper == "DataParallel" else torch.compile(model, backend="eager")
        opt = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
        rec = sp.TrajectoryRecorder(folder, trained, opt, save_every=2)
        rec.begin_stage("main", dataset_size=4)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            opt.zero_grad()
            trained(torch.randn(4, 3, generator=g)).sum().backward()
            opt.step()
            rec.step()
        rec.close()

    record(tmp_path / "plain", wrap=False)
    record(tmp_path / "wrapped", wrap=True)
    plain, wrapped = sp.Trajectory.load(tmp_path / "plain"), sp.Trajectory.load(tmp_path / "wrapped")
    assert wrapped.fingerprint() == plain.fingerprint()
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    wrapped.load_into(model, wrapped.final_checkpoint)
    (group,) = wrapped.stages[0].optimizer["groups"]
    assert group["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]

    def wrap(model: nn.Module) -> nn.Module:  # featurize and queries take the wrapped model too
        return nn.DataParallel(model) if wrapper == "DataParallel" else torch.compile(model, backend="eager")

    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g))
    scores = []
    for name, build in (("plain", lambda: model), ("wrapped", lambda: wrap(model))):
        store = tmp_path / f"{name}.sp"
        sp.featurize(tmp_path / name, build(), sp.ClassificationTask(), data, store,
                     projection=sp.ProjectionArguments(dim=8, kind="rademacher"), progress=False)  # fmt: skip
        sp.fit(store, progress=False)
        scores.append(sp.Attributor(store, build(), sp.ClassificationTask(), progress=False).scores(data))
    np.testing.assert_array_equal(scores[1], scores[0])

    monkeypatch.setattr("source_proj.trajectory.recorder.unwrap_model", lambda m: m)  # as runs were recorded before
    record(tmp_path / "before", wrap=True)
    before = sp.Trajectory.load(tmp_path / "before")
    prefix = "module." if wrapper == "DataParallel" else "_orig_mod."
    with pytest.raises(sp.TrajectoryError, match=rf"every name begins with '{prefix}'.*record the run again"):
        before.load_into(model, before.final_checkpoint)


def test_a_model_optimizer_or_dataset_size_of_another_kind_is_refused_by_the_recorder(tmp_path: Path) -> None:
    """A model builder or an optimizer class raised AttributeError / TypeError from the recorder's hooks, and a
    dataset_size of 12.5 was recorded (featurize then refused every dataset as not of 12.5 examples)."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(sp.TrajectoryError) as err:
        sp.TrajectoryRecorder(tmp_path / "a", lambda: model, optimizer, save_every=1)
    assert str(err.value) == (
        "The model given is the function <lambda>, not a torch.nn.Module; pass what it returns: <lambda>()."
    )
    with pytest.raises(sp.TrajectoryError) as err:
        sp.TrajectoryRecorder(tmp_path / "b", model, torch.optim.SGD, save_every=1)
    assert str(err.value) == (
        "The optimizer given is the class SGD, not a torch.optim.Optimizer; pass an instance of it: SGD(...)."
    )
    with pytest.raises(sp.TrajectoryError) as err:
        sp.TrajectoryRecorder(tmp_path / "c", model, "sgd", save_every=1)  # type: ignore[arg-type]
    assert str(err.value) == (
        "The optimizer given is a str, not a torch.optim.Optimizer; pass the optimizer that steps the model."
    )
    recorder = sp.TrajectoryRecorder(tmp_path / "d", model, optimizer, save_every=1)
    with pytest.raises(sp.TrajectoryError) as err:
        recorder.begin_stage("main", dataset_size=12.5)  # type: ignore[arg-type]
    assert str(err.value) == "Stage 'main' needs a positive dataset size, a whole number of examples, not 12.5."
    recorder.begin_stage("main", dataset_size=np.int64(12))  # a NumPy integer is a whole number
