"""Runs trained on smoothed labels: the tasks' training loss smooths them as the run did, the Fisher stays that of
the plain labels (cross-entropy's Gauss–Newton does not depend on the target), the recorder keeps each stage's ε
and featurize refuses a task that does not smooth by it."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.projection.factory import projector_from_meta
from source_proj.tasks.gradients import PerExampleGradients
from source_proj.tasks.text import mean_predicted_tokens, token_nll

from .conftest import full_batch_run


def _arch() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def test_classification_task_smooths_the_training_loss_and_nothing_else(classification_data) -> None:
    x, y = classification_data.tensors
    logits = torch.randn(len(y), 3, generator=torch.Generator().manual_seed(0))
    task, plain = sp.ClassificationTask(label_smoothing=0.1), sp.ClassificationTask()
    batch = (x, y)
    assert torch.allclose(task.loss(logits, batch), F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1))
    assert not torch.allclose(task.loss(logits, batch), plain.loss(logits, batch))
    assert torch.equal(task.fisher_loss(logits, batch), plain.loss(logits, batch))
    assert torch.equal(task.measurement(logits, batch), plain.measurement(logits, batch))
    # The store's description names ε only where there is one: stores of unsmoothed runs describe their task as
    # they always did (a changed description would refuse to reuse them).
    assert task.describe()["label_smoothing"] == 0.1 and "label_smoothing" not in plain.describe()
    for bad in (-0.1, 1.5, "much"):
        with pytest.raises(sp.TaskError, match="label_smoothing must be a number from 0 to 1"):
            sp.ClassificationTask(label_smoothing=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.4])
def test_token_nll_has_the_smoothed_cross_entropys_values_and_gradients(smoothing) -> None:
    """Against ``F.cross_entropy(label_smoothing=ε)`` in float64, under vmap too; in bf16 the values of the
    float32 path and its gradient to bf16's rounding."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 13, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 4, 12, 0, 7])
    weights = torch.randn(7, generator=g, dtype=torch.float64)
    ours = token_nll(logits, targets, smoothing)
    want = F.cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing)
    assert torch.allclose(ours, want, rtol=0, atol=1e-12)
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), logits)
    assert torch.allclose(ours_grad, want_grad, rtol=0, atol=1e-12)
    per_row = vmap(grad(lambda z, t: token_nll(z[None], t[None], smoothing).sum()))(logits.detach(), targets)
    assert torch.allclose(per_row, want_grad / weights[:, None], rtol=1e-9, atol=1e-12)
    half = logits.detach().bfloat16().requires_grad_()
    single = half.detach().float().requires_grad_()
    values = [token_nll(z, targets, smoothing) for z in (half, single)]
    assert torch.equal(values[0], values[1])
    grads = [torch.autograd.grad(v.sum(), z)[0] for v, z in zip(values, (half, single), strict=True)]
    assert torch.equal(grads[0], grads[1].bfloat16())


def test_language_modeling_task_trains_on_the_trainers_label_smoother() -> None:
    """The Hugging Face Trainer's ``LabelSmoother`` (causal LM: labels shifted) is the batch mean of the task's
    smoothed loss with ``tokens_per_sequence`` = n̄ on fixed-length blocks, in value and gradient."""
    transformers = pytest.importorskip("transformers")
    from transformers.trainer_pt_utils import LabelSmoother

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=31, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 31, (3, 9), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    n = mean_predicted_tokens(sp.TextDataset(ids.tolist()))
    task = sp.LanguageModelingTask(tokens_per_sequence=n, label_smoothing=0.1).bind(model)
    logits = task.forward(model, batch).detach().requires_grad_()
    theirs = LabelSmoother(epsilon=0.1)({"logits": logits}, ids, shift_labels=True)
    ours = task.loss(logits, batch).mean()
    assert torch.allclose(ours, theirs, rtol=1e-6)
    (want,) = torch.autograd.grad(theirs, logits)
    (got,) = torch.autograd.grad(ours, logits)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-8)
    plain = sp.LanguageModelingTask(tokens_per_sequence=n).bind(model)
    assert torch.equal(task.fisher_loss(logits, batch), plain.loss(logits, batch))
    assert torch.equal(task.measurement(logits, batch), plain.measurement(logits, batch))


def _smoothed_run(run: Path, data: TensorDataset, smoothing: float = 0.1) -> None:
    torch.manual_seed(0)
    full_batch_run(run, _arch(), data, lambda o, t: F.cross_entropy(o, t, reduction="none", label_smoothing=smoothing),
                   lr=0.5, steps=20, save_every=10, label_smoothing=smoothing)  # fmt: skip


def _unsmoothed_copy(run: Path, copy: Path) -> None:
    """The same run with its label smoothing taken out of ``trajectory.json`` (the checkpoints are the same)."""
    shutil.copytree(run, copy)
    index = json.loads((copy / "trajectory.json").read_text())
    for stage in index["stages"]:
        stage.pop("label_smoothing", None)
    (copy / "trajectory.json").write_text(json.dumps(index))


def test_featurize_takes_the_smoothed_gradients_and_the_plain_fisher(tmp_path: Path, classification_data) -> None:
    """A run recorded with ε = 0.1: its store's training features are the projected gradients of the smoothed loss;
    its sampled Fisher and Kronecker factors are those of the same checkpoints attributed without smoothing (the
    same labels drawn); a task smoothing by another ε is refused in one sentence."""
    _smoothed_run(tmp_path / "run", classification_data)
    _unsmoothed_copy(tmp_path / "run", tmp_path / "plain-run")
    projection = sp.ProjectionArguments(dim=24, kind="factored")
    options = sp.FeaturizeArguments(batch_size=10, chunk_rows=30, curvature="both", measurement=False)
    task = sp.ClassificationTask(label_smoothing=0.1)
    store = sp.featurize(tmp_path / "run", _arch(), task, classification_data, tmp_path / "s.sp",
                         projection=projection, options=options, progress=False)  # fmt: skip
    plain = sp.featurize(tmp_path / "plain-run", _arch(), sp.ClassificationTask(), classification_data,
                         tmp_path / "p.sp", projection=projection, options=options, progress=False)  # fmt: skip
    assert store.meta["task"]["label_smoothing"] == 0.1
    # The stores of runs without smoothing describe their run as they always did (an older store stays reusable).
    assert store.meta["trajectory"]["stages"][0]["label_smoothing"] == 0.1
    assert "label_smoothing" not in plain.meta["trajectory"]["stages"][0]
    assert "label_smoothing" not in plain.meta["task"]
    model = _arch()
    trajectory = sp.Trajectory.load(tmp_path / "run")
    trajectory.load_into(model, trajectory.checkpoints[1])
    projector = projector_from_meta(store.meta, model)
    names = task.select_parameters(model)

    def projected(t: sp.ClassificationTask) -> np.ndarray:
        return projector.project(PerExampleGradients(model, t, names)(classification_data.tensors)).numpy()

    smoothed, unsmoothed = projected(task), projected(sp.ClassificationTask())
    features = store.read("grads/main/step-00000010")
    assert np.linalg.norm(features - smoothed) < 1e-4 * np.linalg.norm(smoothed)
    assert np.linalg.norm(features - unsmoothed) > 0.05 * np.linalg.norm(smoothed)
    assert np.linalg.norm(plain.read("grads/main/step-00000010") - unsmoothed) < 1e-4 * np.linalg.norm(unsmoothed)
    for step in (0, 10, 20):
        fisher = store.read(f"fisher/main/step-{step:08d}")
        assert np.abs(fisher).max() > 0
        assert np.allclose(fisher, plain.read(f"fisher/main/step-{step:08d}"), rtol=1e-5, atol=1e-7)
        for side in ("a", "b"):
            factor = f"kfac/main/step-{step:08d}/1/{side}"
            assert np.abs(store.read(factor)).max() > 0
            assert np.allclose(store.read(factor), plain.read(factor), rtol=1e-6, atol=1e-9)
    for wrong, said in ((sp.ClassificationTask(), "smooths them by 0;"), (sp.ClassificationTask(label_smoothing=0.2),
                                                                       "smooths them by 0.2;")):  # fmt: skip
        with pytest.raises(sp.TaskError, match=f"trained on labels smoothed by 0.1 .*{said}"):
            sp.featurize(tmp_path / "run", _arch(), wrong, classification_data, tmp_path / "w.sp",
                         projection=projection, options=options, progress=False)  # fmt: skip
    with pytest.raises(sp.TaskError, match="the run recorded no label smoothing"):
        sp.featurize(tmp_path / "plain-run", _arch(), task, classification_data, tmp_path / "w.sp",
                     projection=projection, options=options, progress=False)  # fmt: skip
    assert not (tmp_path / "w.sp").exists()


def test_the_recorder_keeps_each_stages_smoothing_and_featurize_refuses_what_one_task_cannot_follow(
    tmp_path: Path, classification_data
) -> None:
    x, y = classification_data.tensors
    model = _arch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2)
    for bad in (-0.5, 2.0, True):
        with pytest.raises(sp.TrajectoryError, match="needs a label_smoothing from 0 to 1"):
            rec.begin_stage("pre", dataset_size=len(y), label_smoothing=bad)
    for name, smoothing in (("pre", 0.0), ("fine", 0.1)):
        rec.begin_stage(name, dataset_size=len(y), label_smoothing=smoothing)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y, label_smoothing=smoothing).backward()
            opt.step()
            rec.step()
    rec.close()
    stages = json.loads((tmp_path / "run" / "trajectory.json").read_text())["stages"]
    assert "label_smoothing" not in stages[0] and stages[1]["label_smoothing"] == 0.1
    trajectory = sp.Trajectory.load(tmp_path / "run")
    assert [s.label_smoothing for s in trajectory.stages] == [0.0, 0.1]
    data = {"pre": classification_data, "fine": classification_data}
    with pytest.raises(sp.TaskError, match=r"stages smoothed their labels differently \('pre' by 0, 'fine' by 0.1\)"):
        sp.featurize(tmp_path / "run", _arch(), sp.ClassificationTask(label_smoothing=0.1), data, tmp_path / "s.sp",
                     progress=False)  # fmt: skip
    # A task of the user's own has no label_smoothing to compare: it is told what its loss must be.
    from source_proj.tasks.task import check_task_smoothing

    class Own(sp.Task):
        def loss(self, outputs, batch):
            return F.cross_entropy(outputs, batch[1], reduction="none", label_smoothing=0.1)

        def measurement(self, outputs, batch):
            return sp.ClassificationTask().measurement(outputs, batch)

        def fisher_targets(self, outputs, batch, generator):
            return sp.ClassificationTask().fisher_targets(outputs, batch, generator)

    for stages, told in (([("fine", 0.1)], 1), ([("fine", 0.0)], 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_task_smoothing(Own(), stages)
        said = [w for w in caught if "has no label_smoothing: its loss must be the smoothed one" in str(w.message)]
        assert len(said) == told
    # A malformed ε in the file is refused as the file's fault.
    index = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    index["stages"][1]["label_smoothing"] = 3
    (tmp_path / "run" / "trajectory.json").write_text(json.dumps(index))
    with pytest.raises(sp.TrajectoryError, match="has a label_smoothing outside"):
        sp.Trajectory.load(tmp_path / "run")
