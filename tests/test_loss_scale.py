"""Featurize's check of the training loss's scale (``featurize/loss_scale.py``) and what the recorder keeps for it."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import source_proj as sp
from source_proj.errors import TrajectoryError
from source_proj.featurize import featurize as featurize_module
from source_proj.featurize.loss_scale import BOUND, loss_scale_ratios, loss_scale_warning
from source_proj.tasks.text import mean_predicted_tokens
from source_proj.trajectory.recorder import Trajectory

from .test_integrations import _Dicts, _SequenceClassification, _tiny_bert, _tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the language model is built from a config: nothing is downloaded

SUMMED = "its training loss was larger than that mean"


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 6, generator=g)
    return TensorDataset(x, (x[:, :3].argmax(1) + (torch.rand(128, generator=g) < 0.2)) % 3)


def _mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def _train(run: Path, *, batch: int, summed: bool = False, dropout: float = 0.0, clip: float | None = None,
           smoothing: float = 0.0, steps: int = 12) -> TensorDataset:  # fmt: skip
    """SGD on ``_data`` in batches of ``batch``, the loss the batch mean (``summed``: the sum, at the learning rate
    over B: the same steps); checkpoints every 4 steps."""
    data = _data()
    model = _mlp(dropout)
    opt = torch.optim.SGD(model.parameters(), lr=0.1 / batch if summed else 0.1, momentum=0.9)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=4)
    rec.begin_stage("main", dataset_size=len(data), label_smoothing=smoothing)
    batches = iter(())
    shuffle = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = next(batches, (None, None))
        if x is None:
            batches = iter(DataLoader(data, batch_size=batch, shuffle=True, generator=shuffle))
            x, y = next(batches)
        opt.zero_grad()
        F.cross_entropy(model(x), y, label_smoothing=smoothing, reduction="sum" if summed else "mean").backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        rec.step()
    rec.close()
    return data


def _featurize_warnings(run: Path, data: TensorDataset, store: Path, smoothing: float = 0.0) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp.featurize(run, _mlp(), sp.ClassificationTask(label_smoothing=smoothing), data, store,
                     projection=sp.ProjectionArguments(dim=16, kind="rademacher"), progress=False)  # fmt: skip
    return [str(w.message) for w in caught if SUMMED in str(w.message)]


@pytest.mark.parametrize("batch", [8, 64])
def test_a_run_trained_on_the_summed_loss_is_warned_of_at_featurize(tmp_path: Path, batch: int) -> None:
    data = _train(tmp_path / "run", batch=batch, summed=True)
    found = _featurize_warnings(tmp_path / "run", data, tmp_path / "s.sp")
    assert len(found) == 1 and "Stage 'main'" in found[0] and f"batch size, {batch}," in found[0]
    assert _featurized(tmp_path / "s.sp")  # a warning: the store is featurized all the same


def test_the_check_runs_once_per_store_not_again_where_featurize_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _train(tmp_path / "run", batch=8, summed=True)
    calls = []
    real = featurize_module.loss_scale_ratios
    monkeypatch.setattr(featurize_module, "loss_scale_ratios", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert len(_featurize_warnings(tmp_path / "run", data, tmp_path / "s.sp")) == 1
    assert len(_featurize_warnings(tmp_path / "run", data, tmp_path / "s.sp")) == 0  # the finished store, resumed
    assert len(calls) == 1


def _featurized(path: Path) -> bool:
    return sp.Store.open(path).meta.get("featurized") is True


@pytest.mark.parametrize(
    ("batch", "dropout", "clip", "smoothing"),
    [(8, 0.5, 1.0, 0.1), (64, 0.5, 1.0, 0.1), (8, 0.0, None, 0.0), (64, 0.0, 1.0, 0.0)],
)
def test_a_run_trained_on_the_mean_is_not_warned_of(
    tmp_path: Path, batch: int, dropout: float, clip: float | None, smoothing: float
) -> None:
    data = _train(tmp_path / "run", batch=batch, dropout=dropout, clip=clip, smoothing=smoothing)
    assert Trajectory.load(tmp_path / "run").gradient_norms  # checked, not skipped
    assert _featurize_warnings(tmp_path / "run", data, tmp_path / "s.sp", smoothing) == []


def test_the_ratios_lie_within_their_bounds_for_the_mean_and_the_sum(tmp_path: Path) -> None:
    """E[r] ≤ 1 for the batch mean and ≥ B for the sum over B examples: the same run's ratios, B² apart."""
    ratios = {}
    for summed in (False, True):
        data = _train(tmp_path / str(summed), batch=16, summed=summed, dropout=0.5)
        trajectory = Trajectory.load(tmp_path / str(summed))
        task = sp.ClassificationTask()
        model = _mlp(0.5)
        found = loss_scale_ratios(trajectory, model, task, task.select_parameters(model), {"main": data},
                                  torch.device("cpu"))  # fmt: skip
        ratios[summed] = [r for _, _, r in found["main"]]
        assert [(s, b) for s, b, _ in found["main"]] == [(0, 16), (4, 16), (8, 16)]
    assert max(ratios[False]) < 1 and min(ratios[True]) > 16
    assert ratios[True][0] == pytest.approx(16**2 * ratios[False][0], rel=1e-4)  # step 0: the same weights and batch


def test_a_token_level_language_model_mean_is_not_warned_of(tmp_path: Path) -> None:
    """Hugging Face's causal-LM loss, the mean over every predicted token of the batch (padding left out), with its
    default dropout of 0.1, against ``LanguageModelingTask(tokens_per_sequence=n̄)``."""
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(1, 16, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(48)]  # fmt: skip
    data = sp.TextDataset(sequences, length=8)

    def build() -> nn.Module:
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                                         eos_token_id=0, pad_token_id=0)  # fmt: skip
        return transformers.GPT2LMHeadModel(config)

    def train(run: Path, summed: bool) -> None:
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rec = sp.TrajectoryRecorder(run, model, opt, save_every=3)
        rec.begin_stage("main", dataset_size=len(data))
        for b in DataLoader(data, batch_size=8):
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
            opt.zero_grad()
            (loss * int(labels[:, 1:].ne(-100).sum()) if summed else loss).backward()  # summed over every token
            opt.step()
            rec.step()
        rec.close()

    task = sp.LanguageModelingTask(tokens_per_sequence=mean_predicted_tokens(data))
    for summed in (False, True):
        train(tmp_path / str(summed), summed)
        trajectory = Trajectory.load(tmp_path / str(summed))
        model = build()
        found = loss_scale_ratios(trajectory, model, task, task.select_parameters(model), {"main": data},
                                  torch.device("cpu"))  # fmt: skip
        assert [b for _, b, _ in found["main"]] == [8, 8]
        assert (loss_scale_warning(found) is not None) == summed


def test_small_batches_and_old_runs_are_not_checked(tmp_path: Path) -> None:
    """A sum over fewer than 8 examples is not told from the mean; a run recorded before the recorder kept the
    gradient norms (no ``gradient_norms`` in its index) featurizes as it did, unchecked."""
    data = _train(tmp_path / "small", batch=4, summed=True)
    assert Trajectory.load(tmp_path / "small").gradient_norms  # recorded, but not checked
    assert _featurize_warnings(tmp_path / "small", data, tmp_path / "small.sp") == []
    _train(tmp_path / "old", batch=16, summed=True)
    index_file = tmp_path / "old" / "trajectory.json"
    index = json.loads(index_file.read_text())
    del index["gradient_norms"]
    index_file.write_text(json.dumps(index))
    assert _featurize_warnings(tmp_path / "old", data, tmp_path / "old.sp") == []
    assert _featurized(tmp_path / "old.sp")


def test_the_recorder_keeps_the_gradient_at_each_checkpoint_before_clipping(tmp_path: Path) -> None:
    """The squared norm of each parameter's gradient of the step taken at a checkpoint's weights, before clipping,
    over ``scale``²; the examples of the forwards with gradients on (neither an evaluation under no_grad nor gradient
    checkpointing's recomputation in the backward is counted)."""
    data = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2)
    rec.begin_stage("main", dataset_size=len(data))
    x, y = data.tensors
    expected = {}
    for step in range(5):
        opt.zero_grad()
        rows = slice(10 * step, 10 * step + 12)
        out = checkpoint(model, x[rows], use_reentrant=False) if step == 2 else model(x[rows])
        F.cross_entropy(out, y[rows]).backward()  # at step 2 the backward forwards the batch again
        with torch.no_grad():
            model(x)  # an evaluation between backward and the step
        squared = {n: float(p.grad.pow(2).sum()) for n, p in model.named_parameters()}
        nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        rec.step(scale=0.5 if step == 2 else 1.0)
        expected[step] = {n: v / (0.25 if step == 2 else 1.0) for n, v in squared.items()}
    rec.close()
    kept = Trajectory.load(tmp_path / "run").gradient_norms
    assert [(e["step"], e["examples"]) for e in kept] == [(0, 12), (2, 12), (4, 12)]
    for entry in kept:
        assert entry["squared"] == pytest.approx(expected[entry["step"]], rel=1e-5)
    assert Trajectory.load(tmp_path / "run").truncated(3).gradient_norms == tuple(kept[:2])


def test_a_resumed_run_keeps_the_gradient_norms_before_its_checkpoint(tmp_path: Path) -> None:
    _train(tmp_path / "run", batch=16, steps=12)
    whole = Trajectory.load(tmp_path / "run").gradient_norms
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = sp.TrajectoryRecorder.resume(tmp_path / "run", model, opt, save_every=4, at_step=4)
    x, y = _data().tensors
    opt.zero_grad()
    F.cross_entropy(model(x[:16]), y[:16]).backward()
    opt.step()
    rec.step()
    rec.close()
    resumed = Trajectory.load(tmp_path / "run").gradient_norms
    assert [e["step"] for e in whole] == [0, 4, 8] and [e["step"] for e in resumed] == [0, 4]
    assert resumed[0] == whole[0] and resumed[1]["examples"] == 16


@pytest.mark.parametrize(
    "entry",
    [{"step": 0, "examples": 8}, {"step": 99, "examples": 8, "squared": {}}, {"step": 0, "examples": -1, "squared": {}},
     {"step": 0, "examples": 8, "squared": {"0.weight": "x"}}, "entry"],
)
def test_malformed_gradient_norms_are_refused_in_one_sentence(tmp_path: Path, entry: object) -> None:
    _train(tmp_path / "run", batch=16, steps=4)
    index_file = tmp_path / "run" / "trajectory.json"
    index = json.loads(index_file.read_text())
    index["gradient_norms"] = [entry]
    index_file.write_text(json.dumps(index))
    with pytest.raises(TrajectoryError, match="'gradient_norms' must list the step, the examples and the squared"):
        Trajectory.load(tmp_path / "run")


def test_the_reference_is_taken_in_training_mode_as_the_run_trained(tmp_path: Path) -> None:
    """Dropout 0.9 inflates the per-example gradients a training step averages about tenfold: against eval mode's
    (no dropout) a mean-loss step whose examples' gradients agree (a regression towards a far offset, positive
    inputs) looks several times too large; against training mode's it stays below 1, as the mean's bound says."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(128, 6, generator=g) + 1, 5 + 0.1 * torch.randn(128, generator=g)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.9), nn.Linear(32, 1))

    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=4)
    rec.begin_stage("main", dataset_size=len(y))
    for step in range(12):
        rows = slice(8 * step, 8 * step + 8)
        opt.zero_grad()
        F.mse_loss(model(x[rows]).squeeze(-1), y[rows]).backward()
        opt.step()
        rec.step()
    rec.close()
    task, trajectory = sp.RegressionTask(), Trajectory.load(tmp_path / "run")
    ratios = {
        training: [r for _, _, r in loss_scale_ratios(trajectory, build(), task, task.select_parameters(model),
                                                      {"main": TensorDataset(x, y)}, torch.device("cpu"),
                                                      training=training)["main"]]
        for training in (True, False)
    }  # fmt: skip
    assert max(ratios[True]) < 1 < BOUND < max(ratios[False])


def _featurized_warnings_of(run: Path, model: nn.Module, task: sp.Task, data: TensorDataset, store: Path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp.featurize(run, model, task, data, store, projection=sp.ProjectionArguments(dim=16, kind="rademacher"),
                     options=sp.FeaturizeArguments(batch_size=8), progress=False)  # fmt: skip
    return [str(w.message) for w in caught if SUMMED in str(w.message)]


@pytest.mark.parametrize("summed", [False, True])
def test_a_hugging_face_trainer_run_is_checked_through_its_callback(tmp_path: Path, summed: bool) -> None:
    """The Trainer's steps at each checkpoint (batches of 8, clipped at 0.1) are recorded with their 8 examples;
    its mean loss is not warned of, a ``compute_loss`` that sums over the batch is. One label in six is positive:
    the untrained BERT's per-example gradients differ mostly by their label's sign, and a batch of both labels in
    equal numbers cancels them (then even the sum's ratio stays below the bound: docs/limitations.md)."""
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceRecorder

    class Summed(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch) * len(inputs["labels"])

    ids, _ = _tokens(24, 0)
    labels = (ids[:, 0] > 24).long()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=3,
                             learning_rate=1e-3 / (8 if summed else 1), save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, max_grad_norm=0.1, seed=0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the callbacks' advice on the tiny model's loss, not what is tested
        (Summed if summed else Trainer)(model=_tiny_bert(), args=args, train_dataset=_Dicts(ids, labels),
                                        callbacks=[HuggingFaceRecorder(tmp_path / "run", save_every=3)]).train()
    kept = Trajectory.load(tmp_path / "run").gradient_norms
    assert [(e["step"], e["examples"]) for e in kept] == [(0, 8), (3, 8), (6, 8)]
    found = _featurized_warnings_of(tmp_path / "run", _tiny_bert(), _SequenceClassification(),
                                    TensorDataset(ids, labels), tmp_path / "s.sp")  # fmt: skip
    assert len(found) == summed


@pytest.mark.parametrize("summed", [False, True])
def test_a_lightning_run_is_checked_through_its_callback(tmp_path: Path, summed: bool) -> None:
    """The LightningModule's ``training_step`` calls its network (not ``forward``) inside ``optimizer.step(closure)``:
    the examples are counted all the same; its mean loss is not warned of, a summed one is."""
    import lightning.pytorch as pl

    from source_proj.integrations import LightningRecorder

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # featurize's
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y, reduction="sum" if summed else "mean")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1 / (16 if summed else 1))

    data = _data()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LightningRecorder(tmp_path / "run", save_every=3)])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging
        trainer.fit(Module(), DataLoader(data, batch_size=16))
    kept = Trajectory.load(tmp_path / "run").gradient_norms
    assert [(e["step"], e["examples"]) for e in kept] == [(0, 16), (3, 16), (6, 16)]
    found = _featurized_warnings_of(tmp_path / "run", Module(), sp.ClassificationTask(), data, tmp_path / "s.sp")
    assert len(found) == summed


def test_a_model_the_check_cannot_run_is_featurized_unchecked_with_a_warning(tmp_path: Path) -> None:
    """A model that checkpoints its forward reentrantly in training mode (where the check's pass runs; attribution's
    own run in eval mode) gives ``autograd.grad`` no gradient of its parameters: featurize says it cannot check in
    one sentence, not a ratio over part of the gradient, and writes the store."""

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return self.net(x)
            return checkpoint(self.net, x.detach().requires_grad_(), use_reentrant=True)  # an input that requires grad

    data = _data()
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2)
    rec.begin_stage("main", dataset_size=len(data))
    x, y = data.tensors
    for step in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x[16 * step : 16 * step + 16]), y[16 * step : 16 * step + 16]).backward()
        opt.step()
        rec.step()
    rec.close()
    assert Trajectory.load(tmp_path / "run").gradient_norms
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp.featurize(tmp_path / "run", Checkpointed(), sp.ClassificationTask(), data, tmp_path / "s.sp",
                     projection=sp.ProjectionArguments(dim=16, kind="rademacher"), progress=False)  # fmt: skip
    assert [str(w.message) for w in caught if "could not check" in str(w.message)] == [
        "Featurize could not check that the run trained on the batch mean of the task's loss (RuntimeError: no "
        "example's gradient of the task's loss reaches 'net.0.weight', which the training step's did (a forward that "
        "checkpoints reentrantly in training mode?)), and goes on without the check."
    ]
    assert _featurized(tmp_path / "s.sp")
