"""Recorder integrations: a transformers.Trainer callback and a Lightning callback record runs that SOURCE
attributes; without those packages, source_proj and its integrations module still import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import source_proj as sp
from source_proj.store.provenance import check_data, check_model, data_fingerprint

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models are built from configs: nothing may be downloaded


def _tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30, (n, 6), generator=g)
    return ids, (ids[:, 0] > 15).long()


class _Dicts(Dataset):
    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class _SequenceClassification(sp.ClassificationTask):
    def forward(self, model, batch):
        return model(input_ids=batch[0]).logits


def _tiny_bert(hidden_act: str = "gelu", num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=8,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        hidden_act=hidden_act,
    )
    return BertForSequenceClassification(config)


def test_transformers_trainer_callback_records_an_attributable_run(tmp_path: Path) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments, get_linear_schedule_with_warmup

    from source_proj.integrations import HuggingFaceRecorder

    ids, labels = _tokens(24, 0)
    model = _tiny_bert()
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=8,
        num_train_epochs=3,
        learning_rate=1e-3,
        warmup_steps=2,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="steps",
        logging_steps=1,
        max_grad_norm=0.1,
        seed=0,
    )

    norms: list[float] = []

    class Norms(TrainerCallback):  # the Trainer logs each step's pre-clipping gradient norm
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "grad_norm" in logs:
                norms.append(float(logs["grad_norm"]))

    callback = HuggingFaceRecorder(tmp_path / "run", save_every=3)
    Trainer(model=model, args=args, train_dataset=_Dicts(ids, labels), callbacks=[callback, Norms()]).train()

    traj = sp.Trajectory.load(tmp_path / "run")
    assert traj.complete and traj.num_steps == 9 and traj.stages[0].dataset_size == 24
    assert [c.step for c in traj.checkpoints] == [0, 3, 6, 9]
    opt = traj.stages[0].optimizer
    assert opt["kind"] == "adamw" and {g["weight_decay"] for g in opt["groups"]} == {0.0, 0.01}
    dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_linear_schedule_with_warmup(dummy, 2, 9)
    expected = []
    for _ in range(9):
        expected.append(dummy.param_groups[0]["lr"])
        dummy.step()
        schedule.step()
    assert np.allclose(traj.rates, expected)  # the rate each step used, not the scheduler's next one
    clip = np.minimum(1.0, 0.1 / (np.asarray(norms) + 1e-6))  # the Trainer clips at max_grad_norm
    assert len(norms) == 9 and clip.min() < 0.6 and clip.max() == 1.0
    assert np.allclose(traj.clip, clip, rtol=2e-3)  # the logged norms have 4 significant digits
    assert np.allclose(traj.lr, traj.rates * clip)
    final = traj.load_state(traj.final_checkpoint)["model"]
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())

    task = _SequenceClassification(parameters=sp.ParameterSelection(include=("classifier.*", "bert.pooler.*")))
    store = sp.featurize(
        tmp_path / "run",
        _tiny_bert(),
        task,
        TensorDataset(ids, labels),
        tmp_path / "s.sp",
        projection=sp.ProjectionArguments(dim=32),
        options=sp.FeaturizeArguments(batch_size=8, chunk_rows=8),
        progress=False,
    )
    sp.fit(store, progress=False)
    scores = sp.Attributor(store, _tiny_bert(), task).scores(TensorDataset(*_tokens(3, 1)))
    assert scores.shape == (3, 24) and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_a_trainer_with_the_head_at_ten_times_the_backbones_rate_is_recorded_and_attributed(tmp_path: Path) -> None:
    """The fine-tuning recipe: AdamW with the classifier at 10× the rest's rate, the Trainer's linear warm-up
    schedule over both groups. The recorder keeps the classifier's rate (the largest: the reference) per step and
    each group's ratio; featurize scales the other group's gradients by √0.1 and attributes the run."""
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    from source_proj.integrations import HuggingFaceRecorder

    ids, labels = _tokens(24, 0)
    model = _tiny_bert()
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": 1e-3}, {"params": head, "lr": 1e-2}])
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=2, warmup_steps=2,
        lr_scheduler_type="linear", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", seed=0,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=_Dicts(ids, labels), optimizers=(optimizer, None),
            callbacks=[HuggingFaceRecorder(tmp_path / "run", save_every=3)]).train()  # fmt: skip
    traj = sp.Trajectory.load(tmp_path / "run")
    assert [g["lr_ratio"] for g in traj.stages[0].optimizer["groups"]] == pytest.approx([0.1, 1.0])
    dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2)
    schedule = get_linear_schedule_with_warmup(dummy, 2, 6)
    expected = []
    for _ in range(6):
        expected.append(dummy.param_groups[0]["lr"])
        dummy.step()
        schedule.step()
    assert np.allclose(traj.rates, expected)
    task = _SequenceClassification(parameters=sp.ParameterSelection(include=("classifier.*", "bert.pooler.*")))
    store = sp.featurize(tmp_path / "run", _tiny_bert(), task, TensorDataset(ids, labels), tmp_path / "s.sp",
                         projection=sp.ProjectionArguments(kind="identity"),
                         options=sp.FeaturizeArguments(batch_size=8, chunk_rows=8), progress=False)  # fmt: skip
    # D_ℓ^{-1/2} of the one segment: √(r/D), D = √v̂ + ε averaged over the states saved at steps 3 and 6
    order = [n for n, _ in model.named_parameters() if not n.startswith("classifier.")]
    order += [n for n, _ in model.named_parameters() if n.startswith("classifier.")]
    states = {c.step: traj.load_state(c)["optimizer"]["state"] for c in traj.checkpoints if c.step > 0}

    def expected(name: str) -> torch.Tensor:
        d = sum((s[order.index(name)]["exp_avg_sq"].double() / (1 - 0.999**t)).sqrt() + 1e-8 for t, s in states.items())
        return ((1.0 if name.startswith("classifier.") else 0.1) * len(states) / d).sqrt().reshape(-1)

    scale = torch.from_numpy(store.read(store.meta["segmentation"]["segments"][0]["preconditioner"])).double()
    assert torch.allclose(scale, torch.cat([expected(n) for n, _ in store.meta["params"]]), rtol=1e-5)
    sp.fit(store, progress=False)
    scores = sp.Attributor(store, _tiny_bert(), task).scores(TensorDataset(*_tokens(3, 1)))
    assert scores.shape == (3, 24) and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_a_step_the_loss_scaler_skips_keeps_the_recorded_run_in_step_with_the_trainer(tmp_path: Path) -> None:
    """An fp16 loss scaler that finds an inf gradient skips ``optimizer.step`` (no step hooks run), and the Trainer
    counts the step all the same. The callback records it at rate 0, so its checkpoints stay at the Trainer's steps
    and hold the weights the Trainer saved there (what a resume needs). Simulated on the CPU: the optimizer's
    second step does nothing, as the scaler's would."""
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceRecorder

    ids, labels = _tokens(24, 0)
    model = _tiny_bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    step, calls = optimizer.step, []

    def skipping(closure=None):
        calls.append(len(calls))
        return None if len(calls) == 2 else step(closure)

    optimizer.step = skipping  # type: ignore[method-assign]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=2,
        lr_scheduler_type="constant",
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
        seed=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recorder's "no optimizer step" warning: given no scaler, it cannot tell
        Trainer(model=model, args=args, train_dataset=_Dicts(ids, labels), optimizers=(optimizer, None),
                callbacks=[HuggingFaceRecorder(tmp_path / "run", save_every=2)]).train()  # fmt: skip
    trajectory = sp.Trajectory.load(tmp_path / "run")
    assert len(calls) == 6
    assert trajectory.rates.tolist() == pytest.approx([0.05, 0.0, 0.05, 0.05, 0.05, 0.05])
    assert [c.step for c in trajectory.checkpoints] == [0, 2, 4, 6]
    for checkpoint in trajectory.checkpoints[1:]:
        saved = load_file(str(tmp_path / "hf" / f"checkpoint-{checkpoint.step}" / "model.safetensors"))
        ours = trajectory.load_state(checkpoint)["model"]
        assert all(torch.equal(ours[k], v) for k, v in saved.items() if k in ours) and len(saved) > 10


def test_a_trainer_without_on_optimizer_step_is_recorded_through_the_optimizers_post_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older transformers never calls ``on_optimizer_step``: the callback then steps the recorder from the
    optimizer's post-hook, once a step (not twice where both exist)."""
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceRecorder
    from source_proj.integrations import huggingface as hf

    ids, labels = _tokens(24, 0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, logging_strategy="no", seed=0,
    )  # fmt: skip
    for calls, run in ((False, "old"), (True, "new")):
        monkeypatch.setattr(hf, "_CALLS_OPTIMIZER_STEP", calls)
        Trainer(model=_tiny_bert(), args=args, train_dataset=_Dicts(ids, labels),
                callbacks=[HuggingFaceRecorder(tmp_path / run, save_every=1)]).train()  # fmt: skip
        assert sp.Trajectory.load(tmp_path / run).rates.tolist() == pytest.approx([0.05] * 3)


def _lightning_mlp(configure: Callable[[Any], Any]) -> type:
    """The tests' LightningModule: a seeded 4-8-3 MLP (``Module(activation)``, Tanh by default), the batch's mean
    cross-entropy on ``(x, y)`` batches (capture takes the indices out first), ``configure(parameters)`` as its
    ``configure_optimizers``."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self, activation: type[nn.Module] = nn.Tanh) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), activation(), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return configure(self.parameters())

    return Module


def test_lightning_callback_records_an_attributable_run(tmp_path: Path, classification_data) -> None:
    import lightning.pytorch as pl

    from source_proj.integrations import LightningRecorder

    def sgd_steps(params):
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    Module = _lightning_mlp(sgd_steps)

    module = Module()
    loader = torch.utils.data.DataLoader(classification_data, batch_size=10, shuffle=True)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LightningRecorder(tmp_path / "run", save_every=2)],
    )
    trainer.fit(module, loader)

    traj = sp.Trajectory.load(tmp_path / "run")
    assert traj.num_steps == 6 and traj.stages[0].dataset_size == 30
    assert np.allclose(traj.lr, [0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert traj.stages[0].optimizer["groups"][0]["momentum"] == 0.9
    final = traj.load_state(traj.final_checkpoint)["model"]
    assert all(torch.equal(final[k], v) for k, v in module.state_dict().items())
    store = sp.featurize(
        tmp_path / "run",
        Module(),
        sp.ClassificationTask(),
        classification_data,
        tmp_path / "s.sp",
        projection=sp.ProjectionArguments(dim=16),
        progress=False,
    )
    sp.fit(store, sp.FitArguments(segments_per_stage=3), progress=False)
    assert store.meta["methods"]["source"]["segments"][0]["mean_lr"] == pytest.approx(0.1 / (1 - 0.9))


def test_integrations_import_without_the_frameworks_and_say_what_to_install() -> None:
    """Simulate both packages missing (an import of them fails) in a fresh interpreter."""
    script = """
import sys
sys.modules["transformers"] = None
sys.modules["lightning"] = None
import source_proj, source_proj.integrations as integrations
for name, package in (("HuggingFaceRecorder", "transformers"), ("LightningRecorder", "lightning")):
    try:
        getattr(integrations, name)
    except integrations.MissingIntegrationError as err:
        assert isinstance(err, (ImportError, source_proj.SourceProjError))
        assert "pip install source-proj[integrations]" in str(err) and repr(package) in str(err), str(err)
    else:
        raise SystemExit(f"{name} imported without {package}")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _matches_posthoc_at_every_step(run: Path, store: Path, posthoc: sp.Store) -> int:
    """With a checkpoint per step, window t holds the gradients at checkpoint t of the rows step t visited:
    they must equal post-hoc featurize's there (zero elsewhere). Returns how many rows were compared."""
    from source_proj.featurize.windows import window_array

    captured = sp.Store.open(store)
    steps = [c.step for c in sp.Trajectory.load(run).checkpoints][:-1]
    compared = 0
    for step in steps:
        visits = captured.read(window_array("visits", "main", step))
        got = captured.read(window_array("grads", "main", step))
        want = posthoc.read(f"grads/main/step-{step:08d}")
        seen = visits == 1
        assert set(np.unique(visits)) <= {0, 1} and seen.any()
        assert np.allclose(got[seen], want[seen], rtol=1e-3, atol=1e-5 * np.abs(want).max())
        assert not got[~seen].any()
        compared += int(seen.sum())
    return compared


_PROJECTION = sp.ProjectionArguments(dim=16, kind="factored")
_EMPIRICAL = sp.FeaturizeArguments(batch_size=8, fisher="empirical", measurement=False)


def _captured_and_posthoc(tmp_path: Path, build: Callable[[], nn.Module], data: Dataset, task: sp.Task,
                          callbacks: tuple[Any, ...] = (), **training: Any) -> sp.Store:  # fmt: skip
    """One epoch of SGD by the Trainer (batches of 8, a checkpoint per step, ``training``: more of its arguments,
    ``callbacks``: more of its callbacks), captured in-run (the empirical Fisher) into ``tmp_path / "cap.sp"``; then
    post-hoc featurize of the run, which must equal the captured gradients at every step. Returns the post-hoc
    store."""
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceCapture

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), num_train_epochs=1, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", seed=0, **{"per_device_train_batch_size": 8, **training},
    )  # fmt: skip
    callback = HuggingFaceCapture(tmp_path / "run", tmp_path / "cap.sp", task, save_every=1, projection=_PROJECTION,
                                  options=sp.CaptureArguments(fisher="empirical"))  # fmt: skip
    Trainer(model=build(), args=args, train_dataset=sp.IndexedDataset(data), callbacks=[callback, *callbacks]).train()
    posthoc = sp.featurize(tmp_path / "run", build(), task, data, tmp_path / "post.sp", projection=_PROJECTION,
                           options=_EMPIRICAL, progress=False)  # fmt: skip
    assert _matches_posthoc_at_every_step(tmp_path / "run", tmp_path / "cap.sp", posthoc) == len(data)  # type: ignore[arg-type]
    return posthoc


def test_transformers_capture_of_a_head_at_five_times_the_backbones_rate_is_what_featurize_computes(
    tmp_path: Path,
) -> None:
    """SGD with the classifier at 5× the rest's rate under the Trainer's linear warm-up (one schedule over both
    groups, from rate 0): the callback captures every step in u = R^{-1/2}θ, as featurize computes it at each
    checkpoint."""
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceCapture

    ids, labels = _tokens(24, 0)
    task = sp.SequenceClassificationTask(attention="bidirectional")
    model = _tiny_bert()
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    optimizer = torch.optim.SGD([{"params": rest, "lr": 0.02}, {"params": head, "lr": 0.1}], momentum=0.9)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=1, warmup_steps=1,
        lr_scheduler_type="linear", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", seed=0,
    )  # fmt: skip
    callback = HuggingFaceCapture(tmp_path / "run", tmp_path / "cap.sp", task, save_every=1, projection=_PROJECTION,
                                  options=sp.CaptureArguments(fisher="empirical"))  # fmt: skip
    Trainer(model=model, args=args, train_dataset=sp.IndexedDataset(_Dicts(ids, labels)),
            optimizers=(optimizer, None), callbacks=[callback]).train()  # fmt: skip
    stage = sp.Trajectory.load(tmp_path / "run").stages[0]
    assert [g["lr_ratio"] for g in stage.optimizer["groups"]] == pytest.approx([0.2, 1.0])
    posthoc = sp.featurize(tmp_path / "run", _tiny_bert(), task, _Dicts(ids, labels), tmp_path / "post.sp",
                           projection=_PROJECTION, options=_EMPIRICAL, progress=False)  # fmt: skip
    assert _matches_posthoc_at_every_step(tmp_path / "run", tmp_path / "cap.sp", posthoc) == 24


def test_a_trainer_that_pads_each_batch_is_captured_as_featurize_computes_through_its_collator(tmp_path: Path) -> None:
    """Sentences of their own lengths, padded per batch by the Trainer's ``DataCollatorWithPadding`` (a real tokenizer,
    built offline): capture at every step equals post-hoc featurize of ``sp.CollatedDataset(sentences, collator)``,
    and queries of their own lengths are scored through the same collator."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast, Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceCapture

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 30)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
                                        pad_token="[PAD]", unk_token="[UNK]")  # fmt: skip
    collator = DataCollatorWithPadding(tokenizer)
    g = torch.Generator().manual_seed(0)

    def sentences(n: int) -> list[dict]:
        lengths = torch.randint(2, 7, (n,), generator=g).tolist()
        ids = [torch.randint(2, 30, (t,), generator=g).tolist() for t in lengths]
        return [{"input_ids": s, "labels": int(s[0] > 15)} for s in ids]

    train, queries = sentences(24), sentences(3)
    task = sp.SequenceClassificationTask(attention="bidirectional")
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, logging_strategy="no", seed=0,
    )  # fmt: skip
    callback = HuggingFaceCapture(tmp_path / "run", tmp_path / "cap.sp", task, save_every=1, projection=_PROJECTION,
                                  options=sp.CaptureArguments(fisher="empirical"))  # fmt: skip
    trainer = Trainer(model=_tiny_bert(), args=args, train_dataset=sp.IndexedDataset(train), data_collator=collator,
                      callbacks=[callback])  # fmt: skip
    trainer.train()
    data = sp.CollatedDataset(train, trainer.data_collator)
    posthoc = sp.featurize(tmp_path / "run", _tiny_bert(), task, data, tmp_path / "post.sp", projection=_PROJECTION,
                           options=_EMPIRICAL, progress=False)  # fmt: skip
    assert _matches_posthoc_at_every_step(tmp_path / "run", tmp_path / "cap.sp", posthoc) == len(train)
    sp.fit(tmp_path / "post.sp", sp.FitArguments(segments_per_stage=1), progress=False)
    scores = sp.Attributor(tmp_path / "post.sp", _tiny_bert(), task).scores(sp.CollatedDataset(queries, collator))
    assert scores.shape == (3, 24) and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_transformers_capture_callback_captures_what_featurize_computes_at_each_step(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceCapture

    ids, labels = _tokens(24, 0)
    task = sp.SequenceClassificationTask(attention="bidirectional")
    projection = sp.ProjectionArguments(dim=16, kind="factored")
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, logging_strategy="no", seed=0,
    )
    callback = HuggingFaceCapture(tmp_path / "run", tmp_path / "cap.sp", task, save_every=1, projection=projection,
                                  options=sp.CaptureArguments(fisher="empirical", end_pass=True))
    Trainer(model=_tiny_bert(), args=args, train_dataset=sp.IndexedDataset(_Dicts(ids, labels)),
            callbacks=[callback]).train()
    posthoc = sp.featurize(
        tmp_path / "run", _tiny_bert(), task, _Dicts(ids, labels), tmp_path / "post.sp", projection=projection,
        options=sp.FeaturizeArguments(batch_size=8, fisher="empirical", measurement=False), progress=False,
    )
    assert _matches_posthoc_at_every_step(tmp_path / "run", tmp_path / "cap.sp", posthoc) == 48
    # The end pass, batched by the Trainer's collator: every example's gradient at the final checkpoint.
    end = sp.Store.open(tmp_path / "cap.sp").read("capture/end/main/step-00000005")
    want = posthoc.read("grads/main/step-00000006")
    assert np.abs(want).max() > 0 and np.allclose(end, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
    sp.fit(tmp_path / "cap.sp", sp.FitArguments(segments_per_stage=1), progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        scores = sp.Attributor(tmp_path / "cap.sp", _tiny_bert(), task).scores(_Dicts(*_tokens(3, 1)))
    assert scores.shape == (3, 24) and np.isfinite(scores).all()
    assert not [w for w in seen if "cannot be detected" in str(w.message)]  # the fingerprints are recorded
    # The Trainer's train_dataset is the stage's data; the model is checked at θ_T on the first batch's examples.
    store = sp.Store.open(tmp_path / "cap.sp")
    assert check_data(store.path, store.meta, {"main": _Dicts(ids, labels)})
    with pytest.raises(sp.TaskError, match=r"are not those the store .* was captured with"):
        check_data(store.path, store.meta, {"main": _Dicts(ids.flip(0), labels.flip(0))})
    # Sigmoid for GELU: this barely trained BERT's outputs hardly depend on its feed-forward layer (ReLU or tanh
    # for GELU move them by 0.3 % of their scale, within provenance.MODEL_RTOL), a sigmoid by 4 %.
    with pytest.raises(sp.TaskError, match="was captured from"):
        sp.Attributor(tmp_path / "cap.sp", _tiny_bert(hidden_act="sigmoid"), task)


def test_transformers_capture_defaults_to_the_eigen_projection_with_the_bases_featurize_takes(tmp_path: Path) -> None:
    """Under the Trainer with no projection given, capture takes the eigen one: each window's basis from the
    Trainer's dataset batched by its own collator; the store's final basis averages the visits post-hoc featurize
    averages, over the same seeded examples, so the two bases agree, and the store fits and answers queries."""
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceCapture
    from source_proj.projection.eigen import EigenBasis

    ids, labels = _tokens(24, 0)
    task = sp.SequenceClassificationTask(attention="bidirectional")
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, logging_strategy="no", seed=0,
    )  # fmt: skip
    callback = HuggingFaceCapture(tmp_path / "run", tmp_path / "cap.sp", task, save_every=2,
                                  options=sp.CaptureArguments(basis_batch=8))  # fmt: skip
    Trainer(model=_tiny_bert(), args=args, train_dataset=sp.IndexedDataset(_Dicts(ids, labels)),
            callbacks=[callback]).train()  # fmt: skip
    store = sp.Store.open(tmp_path / "cap.sp")
    assert store.meta["projection"]["kind"] == "eigen" and len(store.meta["capture_bases"]) == 3
    posthoc = sp.featurize(
        tmp_path / "run", _tiny_bert(), task, _Dicts(ids, labels), tmp_path / "post.sp",
        projection=sp.ProjectionArguments(), options=sp.FeaturizeArguments(batch_size=8, measurement=False),
        progress=False,
    )  # fmt: skip
    ours = EigenBasis.read(store, store.meta["projection"]["basis"])
    theirs = EigenBasis.read(posthoc, posthoc.meta["projection"]["basis"])
    assert ours.checkpoints == theirs.checkpoints == [0, 2, 4, 6] and ours.blocks == theirs.blocks
    for a, b in zip([*ours.out, *ours.inp], [*theirs.out, *theirs.inp], strict=True):
        assert torch.allclose(a.abs(), b.abs(), atol=1e-4)  # up to each eigenvector's sign
    sp.fit(store.path, sp.FitArguments(segments_per_stage=1), progress=False)
    scores = sp.Attributor(store.path, _tiny_bert(), task).scores(_Dicts(*_tokens(3, 1)))
    assert scores.shape == (3, 24) and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_transformers_capture_takes_the_sampled_fisher_from_the_trainers_own_forward(tmp_path: Path) -> None:
    """The default sampled Fisher (``fisher_forward="training"``) under the Trainer: one backward through the
    training forward's graph, so the model runs one forward per batch (and a few in eval mode, once, to check
    its outputs and the first batch's gradient scale), where the separate pass runs two per batch; and the window
    Fisher sums are those of the separate eval-mode pass, whose brute force is in test_capture (the tiny BERT has
    no dropout: the two modes agree)."""
    from transformers import Trainer, TrainingArguments

    from source_proj.featurize.windows import window_array
    from source_proj.integrations import HuggingFaceCapture

    ids, labels = _tokens(24, 0)
    task = sp.SequenceClassificationTask(attention="bidirectional")
    stores, forwards = {}, {}
    for mode in ("training", "separate"):
        args = TrainingArguments(
            output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=0.05,
            optim="sgd", lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, logging_strategy="no", seed=0,
        )  # fmt: skip
        callback = HuggingFaceCapture(tmp_path / mode, tmp_path / f"{mode}.sp", task, save_every=2,
                                      projection=sp.ProjectionArguments(dim=16, kind="factored"),
                                      options=sp.CaptureArguments(fisher_forward=mode))  # fmt: skip
        model = _tiny_bert()
        calls: list[bool] = []
        model.register_forward_hook(lambda module, args, output, calls=calls: calls.append(module.training))
        Trainer(model=model, args=args, train_dataset=sp.IndexedDataset(_Dicts(ids, labels)),
                callbacks=[callback]).train()  # fmt: skip
        stores[mode], forwards[mode] = sp.Store.open(tmp_path / f"{mode}.sp"), calls
    batches = 6  # in eval mode: set-up checks, the outputs' check (once), the final fingerprints, separate passes
    runs = {m: "".join("T" if training else "e" for training in f) for m, f in forwards.items()}
    assert runs["training"].count("T") == runs["separate"].count("T") == batches
    assert "T" * (batches - 1) in runs["training"]  # after the first batch: no forward but training's
    # an eval-mode forward before every training forward (after the first's, the check of its gradients' scale)
    assert "eT" * (batches - 1) in runs["separate"] and runs["separate"].count("eT") == batches
    for start in (0, 2, 4):
        a, b = (stores[m].read(window_array("fisher", "main", start)) for m in ("training", "separate"))
        assert np.abs(a).max() > 0 and np.allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
        assert stores["training"].read(window_array("fisher-count", "main", start))[0] == 16
        assert np.allclose(*(stores[m].read(window_array("grads", "main", start)) for m in ("training", "separate")),
                           rtol=1e-4, atol=1e-6)


def test_transformers_capture_under_gradient_checkpointing_equals_capture_without(tmp_path: Path) -> None:
    """A GPT-2 trained by the Trainer with gradient checkpointing recomputes its blocks' forwards in every
    backward (the training one and the Fisher's): the captured gradients and Fisher sums are those of the
    same run without checkpointing, bit for bit."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from source_proj.featurize.windows import window_array
    from source_proj.integrations import HuggingFaceCapture

    ids = torch.randint(0, 40, (16, 8), generator=torch.Generator().manual_seed(0))
    selection = sp.ParameterSelection(skip_norm=True, skip_embedding=True)
    task = sp.LanguageModelingTask(tokens_per_sequence=7, parameters=selection)
    stores, forwards = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        model = GPT2LMHeadModel(config)
        calls: list[int] = []
        model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        args = TrainingArguments(
            output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=0.05,
            optim="sgd", lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, logging_strategy="no", seed=0, gradient_checkpointing=checkpointing,
        )  # fmt: skip
        callback = HuggingFaceCapture(tmp_path / f"run-{checkpointing}", tmp_path / f"{checkpointing}.sp", task,
                                      save_every=2, projection=sp.ProjectionArguments(dim=16, kind="factored"))
        Trainer(model=model, args=args, train_dataset=sp.IndexedDataset(_Dicts(ids, ids)), callbacks=[callback]).train()
        assert model.is_gradient_checkpointing == checkpointing
        stores[checkpointing], forwards[checkpointing] = sp.Store.open(tmp_path / f"{checkpointing}.sp"), len(calls)
    assert forwards[True] > forwards[False]  # the blocks' forwards were recomputed
    for kind in ("grads", "fisher"):
        a, b = (stores[c].read(window_array(kind, "main", 0)) for c in (False, True))
        assert np.abs(a).max() > 0 and np.array_equal(a, b), kind
    # Reentrant checkpointing runs the blocks' forward without autograd: the hooks cannot see it, and say so as the
    # first block runs (test_capture.py: a layer outside the blocks would otherwise have hidden it).
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=0.05,
        optim="sgd", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
    )  # fmt: skip
    callback = HuggingFaceCapture(tmp_path / "run-reentrant", tmp_path / "reentrant.sp", task, save_every=2,
                                  projection=sp.ProjectionArguments(dim=16, kind="factored"))  # fmt: skip
    with pytest.raises(sp.TaskError, match=r"reentrant gradient checkpointing.*use_reentrant=False"):
        Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=sp.IndexedDataset(_Dicts(ids, ids)),
                callbacks=[callback]).train()  # fmt: skip


def test_transformers_capture_callback_captures_the_default_adamw_run_in_adams_coordinates(tmp_path: Path) -> None:
    """The Trainer's default optimizer (AdamW, gradients clipped at norm 1), a checkpoint per step: window t ≥ 1
    holds P(S_1(D_t) ⊙ ∇ℓ(z; θ_t)) of the rows step t visited, with D_t the Adam state saved at checkpoint t (the
    state step t began with) in its rank-1 form; the first step, before any state exists, is not captured."""
    from transformers import Trainer, TrainingArguments

    from source_proj.featurize.windows import window_array
    from source_proj.integrations import HuggingFaceCapture
    from source_proj.projection.factory import make_projector
    from source_proj.tasks.gradients import PerExampleGradients
    from source_proj.trajectory.preconditioner import checkpoint_preconditioner

    ids, labels = _tokens(24, 0)
    task = sp.SequenceClassificationTask(attention="bidirectional")
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=1e-2,
        lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", seed=0,
    )  # fmt: skip
    callback = HuggingFaceCapture(tmp_path / "run", tmp_path / "cap.sp", task, save_every=1,
                                  projection=sp.ProjectionArguments(dim=16, kind="factored"),
                                  options=sp.CaptureArguments(fisher="empirical"))  # fmt: skip
    Trainer(model=_tiny_bert(), args=args, train_dataset=sp.IndexedDataset(_Dicts(ids, labels)),
            callbacks=[callback]).train()  # fmt: skip
    trajectory = sp.Trajectory.load(tmp_path / "run")
    assert trajectory.stage("main").optimizer["kind"] == "adamw"
    store = sp.Store.open(tmp_path / "cap.sp")
    names = [name for name, _ in store.meta["params"]]
    projector = make_projector("factored", store.meta["params"], 16, 0, model=_tiny_bert())
    checkpoints = trajectory.checkpoints[:-1]
    assert not store.read(window_array("visits", "main", checkpoints[0].step)).any()  # the first step
    for ckpt in checkpoints[1:]:
        visits = store.read(window_array("visits", "main", ckpt.step))
        rows = torch.from_numpy(np.nonzero(visits)[0])
        d = checkpoint_preconditioner(trajectory, ckpt, trajectory.stage("main"), names)
        transform = projector.scaling({name: t.rsqrt() for name, t in d.items()})
        model = trajectory.load_into(_tiny_bert(), ckpt)
        grads = PerExampleGradients(model, task, names)
        want = projector.project_batch(grads, {"input_ids": ids[rows], "labels": labels[rows]}, transform=transform)
        got = store.read(window_array("grads", "main", ckpt.step))
        assert len(rows) == 8 and np.allclose(got[rows], want.numpy(), rtol=1e-3, atol=1e-5 * float(want.abs().max()))
    sp.fit(store.path, sp.FitArguments(segments_per_stage=1), progress=False)
    scores = sp.Attributor(store.path, _tiny_bert(), task).scores(_Dicts(*_tokens(3, 1)))
    assert scores.shape == (3, 24) and np.isfinite(scores).all()


def test_a_step_the_loss_scaler_skips_keeps_the_recorded_lightning_run_in_step(
    tmp_path: Path, classification_data
) -> None:
    """As with the Trainer: Lightning's fp16 precision runs the closure, then its scaler skips ``optimizer.step``,
    and the global step counts the step; the callback records it at rate 0 at the batch's end. Simulated on the
    CPU: the second step runs the closure and does not update."""
    import lightning.pytorch as pl

    from source_proj.integrations import LightningRecorder

    calls: list[int] = []

    def configure(params):
        optimizer = torch.optim.SGD(params, lr=0.1)
        step = optimizer.step

        def skipping(closure=None):
            calls.append(len(calls))
            if len(calls) == 2:
                closure()  # the forward and backward run; the scaler finds an inf and skips the update
                return None
            return step(closure)

        optimizer.step = skipping  # type: ignore[method-assign]
        return optimizer

    loader = torch.utils.data.DataLoader(classification_data, batch_size=10)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LightningRecorder(tmp_path / "run", save_every=2)])  # fmt: skip
    module = _lightning_mlp(configure)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recorder's "no optimizer step" warning: given no scaler, it cannot tell
        trainer.fit(module, loader)
    trajectory = sp.Trajectory.load(tmp_path / "run")
    assert len(calls) == 6 and trainer.global_step == 6
    assert trajectory.rates.tolist() == pytest.approx([0.1, 0.0, 0.1, 0.1, 0.1, 0.1])
    assert [c.step for c in trajectory.checkpoints] == [0, 2, 4, 6]
    final = trajectory.load_state(trajectory.final_checkpoint)["model"]
    assert all(torch.equal(final[k], v) for k, v in module.state_dict().items())


def test_lightning_callback_records_a_cycled_momentum_step_by_step(tmp_path: Path, classification_data) -> None:
    """OneCycleLR stepped by Lightning after every optimizer step: the callback's recorder keeps each step's rate
    and momentum as the step used them, those the same schedule gives on its own."""
    import lightning.pytorch as pl

    from source_proj.integrations import LightningRecorder

    def one_cycle(params):
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=6)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    loader = torch.utils.data.DataLoader(classification_data, batch_size=10, shuffle=True)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LightningRecorder(tmp_path / "run", save_every=2)])  # fmt: skip
    trainer.fit(_lightning_mlp(one_cycle)(), loader)

    alone = one_cycle([nn.Parameter(torch.zeros(1))])
    rates, betas = [], []
    for _ in range(6):
        rates.append(alone["optimizer"].param_groups[0]["lr"])
        betas.append(alone["optimizer"].param_groups[0]["momentum"])
        alone["optimizer"].step()
        alone["lr_scheduler"]["scheduler"].step()
    index = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert index["lr"] == pytest.approx(rates) and index["momentum"] == pytest.approx(betas)
    assert min(betas) < 0.9 < max(betas)


def test_lightning_accumulation_short_of_its_batches_is_recorded_at_the_step_it_took(
    tmp_path: Path, classification_data
) -> None:
    """accumulate_grad_batches=2 over an epoch of 3 batches: Lightning divides each batch's loss by 2, also in the
    epoch's last step, which holds one batch, so that step moved the weights by half the rate times its batch's mean
    gradient. Each recorded step size η·α·scale times the mean gradient of the step's examples is the step taken."""
    import lightning.pytorch as pl

    from source_proj.integrations import LightningRecorder

    Module = _lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                         callbacks=[LightningRecorder(tmp_path / "run", save_every=1)])  # fmt: skip
    trainer.fit(Module(), torch.utils.data.DataLoader(classification_data, batch_size=10))
    trajectory = sp.Trajectory.load(tmp_path / "run")
    assert trajectory.lr.tolist() == pytest.approx([0.1, 0.05])
    x, y = classification_data.tensors
    for step, rows in enumerate([slice(0, 20), slice(20, 30)]):
        module = trajectory.load_into(Module(), trajectory.checkpoints[step])
        F.cross_entropy(module(x[rows]), y[rows]).backward()
        after = trajectory.load_state(trajectory.checkpoints[step + 1])["model"]
        for name, param in module.named_parameters():
            taken = param.detach() - trajectory.lr[step] * param.grad
            assert torch.allclose(after[name], taken, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_lightning_gradient_clipping_is_recorded_at_the_step_it_clipped(
    tmp_path: Path, classification_data, algorithm: str
) -> None:
    """Lightning runs backward and ``gradient_clip_val``'s clipping inside ``optimizer.step(closure)``: each step's
    recorded factor is the one its own gradient was clipped by (value clipping: its change of norm)."""
    import lightning.pytorch as pl

    from source_proj.integrations import LightningRecorder

    def norm(module: nn.Module) -> float:
        return float(torch.cat([p.grad.reshape(-1) for p in module.parameters()]).norm())

    factors: list[float] = []

    class Clipped(_lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1))):  # type: ignore[misc]
        def on_before_optimizer_step(self, optimizer) -> None:
            self.unclipped = norm(self)

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            factors.append(norm(self) / self.unclipped)

    loader = torch.utils.data.DataLoader(classification_data, batch_size=10)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val={"norm": 0.3, "value": 0.05}[algorithm], gradient_clip_algorithm=algorithm,
                         callbacks=[LightningRecorder(tmp_path / "run", save_every=3)])  # fmt: skip
    trainer.fit(Clipped(), loader)
    assert len(factors) == 6 and min(factors) < 0.95 and max(factors) > min(factors) + 0.05
    assert np.allclose(sp.Trajectory.load(tmp_path / "run").clip, factors, rtol=1e-4)


@pytest.mark.parametrize("averaging", ["ema", "swa_batch_norm"])
def test_lightning_weight_averaging_leaves_the_trained_weights_in_the_recorded_run(
    tmp_path: Path, classification_data, averaging: str
) -> None:
    """EMA and SWA copy their average into the module as training ends, and SWA on a batch-norm model first runs one
    more epoch that steps the optimizer without gradients: the recorded (and captured) run ends with the weights and
    the steps training took, and the average left in the module is warned of. A callback listed before the
    recorder, which would average the weights first, is refused."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, StochasticWeightAveraging

    from source_proj.integrations import LightningCapture, LightningRecorder

    weights: dict[int, dict[str, torch.Tensor]] = {}  # after each optimizer step, as training left them

    class Trained(Callback):
        def on_train_batch_end(self, trainer, pl_module, *_: Any) -> None:
            weights.setdefault(trainer.global_step, {k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    class Normed(_lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1))):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    def trainer(*callbacks: Callback) -> pl.Trainer:
        return pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))  # fmt: skip

    loader = torch.utils.data.DataLoader(sp.IndexedDataset(classification_data), batch_size=10)
    if averaging == "ema":
        module, average = _lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1))(), EMAWeightAveraging()
        recorder: Callback = LightningRecorder(tmp_path / "run", save_every=4)
        loader = torch.utils.data.DataLoader(classification_data, batch_size=10)
    else:
        module, average = Normed(), StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
        task = sp.ClassificationTask(parameters=sp.ParameterSelection(skip_norm=True))
        recorder = LightningCapture(tmp_path / "run", tmp_path / "cap.sp", task, save_every=4,
                                    projection=sp.ProjectionArguments(dim=8, kind="factored"),
                                    options=sp.CaptureArguments(fisher="empirical"))  # fmt: skip
    with pytest.raises(sp.TrajectoryError, match=f"{type(average).__name__} is listed before"):
        trainer(average, recorder).fit(module, loader)
    with pytest.warns(UserWarning, match="leaves its averaged weights in the module"):
        trainer(recorder, average, Trained()).fit(module, loader)
    trajectory = sp.Trajectory.load(tmp_path / "run")
    assert trajectory.num_steps == 6 and trajectory.complete
    final = trajectory.load_state(trajectory.final_checkpoint)["model"]
    assert all(torch.equal(final[k], v) for k, v in weights[6].items())
    assert not all(torch.equal(final[k], v) for k, v in module.state_dict().items())  # the module holds the average
    if averaging == "swa_batch_norm":
        assert trajectory.rates.min() > 0
        assert sp.Store.open(tmp_path / "cap.sp").meta["trajectory"]["fingerprint"] == trajectory.fingerprint()


_DDP_RUN = """
import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

import source_proj.integrations.lightning as recording
from source_proj.integrations import LightningRecorder

_start_recording = recording.start_recording


def start_recording(run_dir, module, *args, **kwargs):  # leaves a mark of each process that starts recording
    open(f"recorded-by-rank-{module.global_rank}", "w").close()
    return _start_recording(run_dir, module, *args, **kwargs)


recording.start_recording = start_recording


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.factors = []

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def norm(self):
        return float(torch.cat([p.grad.reshape(-1) for p in self.parameters()]).norm())

    def on_before_optimizer_step(self, optimizer):
        self.unclipped = self.norm()  # the gradients averaged over the processes

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.factors.append(self.norm() / self.unclipped)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self):
        if self.global_rank == 0:
            state = {k: v.tolist() for k, v in self.state_dict().items()}
            print(json.dumps({"factors": self.factors, "state": state}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=0.3, callbacks=[LightningRecorder(sys.argv[1], save_every=2)])
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=10))
    sys.stdout.flush()
    os._exit(0)  # the processes have joined and the run is recorded: past the interpreter's teardown (seconds)
"""


@pytest.mark.slow
def test_a_lightning_ddp_run_is_recorded_by_rank_zero_with_its_averaged_gradients_clipping(tmp_path: Path) -> None:
    """DDP on two gloo processes: one process records the run (not two into one directory), and each step's clipping
    factor is that of the gradients averaged over the processes, not of one process's own. strategy="ddp_fork": the
    DDPStrategy of strategy="ddp", every process running the callback's hooks at its own rank, its processes forked
    from the script rather than started by running it again (which imported Lightning once more, half the test's
    time)."""
    trajectory, told, _ = _recorded_on_two_processes(tmp_path, _DDP_RUN, [])
    assert [p.name for p in tmp_path.glob("recorded-by-rank-*")] == ["recorded-by-rank-0"]
    assert trajectory.num_steps == 4 and [c.step for c in trajectory.checkpoints] == [0, 2, 4]
    assert min(told["factors"]) < 0.95 and np.allclose(trajectory.clip, told["factors"], rtol=1e-4)


def _recorded_on_two_processes(tmp_path: Path, source: str, launcher: list[str]) -> tuple[sp.Trajectory, Any, str]:
    """Run the script ``source`` (started by ``launcher``, none where it starts its own processes) with the run
    directory ``tmp_path / "run"`` as its argument: the trajectory recorded there, which must end with the weights
    its rank 0 printed, what it printed, and its standard error."""
    script = tmp_path / "two_processes.py"
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, *launcher, str(script), str(tmp_path / "run")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    told = json.loads(done.stdout.strip().splitlines()[-1])
    trajectory = sp.Trajectory.load(tmp_path / "run")
    final = trajectory.load_state(trajectory.final_checkpoint)["model"]
    assert all(np.allclose(final[k].numpy(), v) for k, v in told["state"].items())
    return trajectory, told, done.stderr


_HF_DDP_RUN = """
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from source_proj.integrations import HuggingFaceRecorder


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        return {"logits": self.net(x)}


def mean_loss(outputs, labels, num_items_in_batch=None):  # the model's mean loss, which the callbacks warn of once
    return F.cross_entropy(outputs["logits"], labels)


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


norms = []


class Norms(TrainerCallback):  # each step's norm before clipping, of the gradients averaged over the processes
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "grad_norm" in logs:
            norms.append(float(logs["grad_norm"]))


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=sys.argv[1] + "-out", per_device_train_batch_size=5, num_train_epochs=2,
                             learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.3,
                             report_to=[], use_cpu=True, ddp_backend="gloo", disable_tqdm=True, save_strategy="no",
                             logging_strategy="steps", logging_steps=1, seed=0)
    model = Net()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), compute_loss_func=mean_loss,
                      callbacks=[HuggingFaceRecorder(sys.argv[1], save_every=4), Norms()])
    trainer.train()
    if args.process_index == 0:
        state = {k: v.tolist() for k, v in model.state_dict().items()}
        print(json.dumps({"world": args.world_size, "norms": norms, "state": state}))
    sys.stdout.flush()
    os._exit(0)  # past torch's gloo teardown, which aborts now and then on a loaded CPU, with or without a recorder
"""


@pytest.mark.slow
def test_a_trainer_run_under_torchrun_is_recorded_by_rank_zero_with_its_averaged_gradients_clipping(
    tmp_path: Path,
) -> None:
    """torchrun with two gloo processes: the first records the run (two wrote into one directory and crashed), and
    each step's clipping factor is that of the gradients averaged over the processes, which the Trainer clips and
    logs, not one process's own as its hooks see them before DDP averages them."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    trajectory, told, warned = _recorded_on_two_processes(tmp_path, _HF_DDP_RUN, torchrun)
    assert told["world"] == 2 and len(told["norms"]) == 8
    assert warned.count("The Trainer computes its loss with") == 1  # the first process checks and warns, alone
    assert trajectory.num_steps == 8 and [c.step for c in trajectory.checkpoints] == [0, 4, 8]
    clip = np.minimum(1.0, 0.3 / (np.asarray(told["norms"]) + 1e-6))
    assert clip.max() < 0.95 and np.allclose(trajectory.clip, clip, rtol=1e-4)


def test_a_capture_callback_training_on_a_stream_says_what_gives_the_eigen_projection(tmp_path: Path) -> None:
    """A training dataloader over a stream (no len()) gives capture no data to estimate eigen bases from: the
    callback captures with the 'factored' projection and says how to get the 'eigen' one in terms of the callback,
    which takes no datasets= (GradientCapture's own sentence asked for them)."""
    from source_proj.integrations._hook import CaptureSettings

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.zeros(4), 0)] * 4)

    model = nn.Linear(4, 3)
    recorder = sp.TrajectoryRecorder(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1), save_every=1)
    recorder.begin_stage("main", dataset_size=4)
    settings = CaptureSettings(tmp_path / "s.sp", sp.ClassificationTask(), projection=None,
                               options=sp.CaptureArguments())  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        capture = settings.start_capture(recorder, False, torch.utils.data.DataLoader(Stream(), batch_size=2))
    assert capture.projection.kind == "factored"
    told = [str(w.message) for w in seen]
    assert [m for m in told if m.startswith("The training dataloader's dataset is not a map-style dataset of the "
                                            "stage's 4 examples, so capture projects with the random 'factored'")]
    assert not [m for m in told if "datasets=" in m]
    capture.close()


def test_huggingface_capture_refuses_a_run_of_several_processes(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from source_proj.integrations import HuggingFaceCapture

    capture = HuggingFaceCapture(tmp_path / "run", tmp_path / "s.sp", sp.SequenceClassificationTask(), save_every=2)
    with pytest.raises(sp.TrajectoryError, match="captures the batches of one process, and this run trains on 2"):
        capture.on_train_begin(SimpleNamespace(world_size=2, process_index=0), None, None)
    assert not (tmp_path / "run").exists()
    # One process on two GPUs: the Trainer's torch.nn.DataParallel runs each GPU's share of a batch through a replica.
    with pytest.raises(sp.TrajectoryError, match=r"captures the batches of one device, and this Trainer splits each "
                                                 r"batch over 2 GPUs \(torch.nn.DataParallel\)"):  # fmt: skip
        capture.on_train_begin(SimpleNamespace(world_size=1, n_gpu=2, process_index=0), None, None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, name", [("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")])
def test_huggingface_recorder_refuses_a_trainer_that_shards_the_weights(tmp_path: Path, flag: str, name: str) -> None:
    """A Trainer with FSDP or DeepSpeed: refused as training begins, before anything is written (the recorder
    saves whole weights from one process)."""
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceRecorder

    class Beginning(Trainer):  # the callbacks find the Trainer calling them up the stack
        def begin(self):
            self.create_optimizer_and_scheduler(num_training_steps=3)
            return self.callback_handler.on_train_begin(self.args, self.state, self.control)

    ids, labels = _tokens(24, 0)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Beginning(model=_tiny_bert(), args=args, train_dataset=_Dicts(ids, labels),
                        callbacks=[HuggingFaceRecorder(tmp_path / "run", save_every=2, dataset_size=24)])  # fmt: skip
    setattr(trainer, flag, True)
    with pytest.raises(sp.TrajectoryError, match=f"The Trainer trains with {name}, which shards"):
        trainer.begin()
    assert not (tmp_path / "run").exists()


def test_lightning_backbone_finetuning_is_refused_as_training_starts(tmp_path: Path, classification_data) -> None:
    """BackboneFinetuning trains the backbone from a later epoch, in a group at a tenth of the rate: refused before
    any step, not when the group appears mid-run."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import BackboneFinetuning

    from source_proj.integrations import LightningRecorder

    class Backboned(_lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1))):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.backbone = self.net[0]

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1),
                                    LightningRecorder(tmp_path / "run", save_every=2)])  # fmt: skip
    with pytest.raises(sp.TrajectoryError, match="BackboneFinetuning freezes part of the module"):
        trainer.fit(Backboned(), torch.utils.data.DataLoader(classification_data, batch_size=10))
    assert trainer.global_step == 0


def test_a_lightning_run_drawing_examples_by_weight_is_warned_of(tmp_path: Path, classification_data) -> None:
    import lightning.pytorch as pl

    from source_proj.integrations import LightningRecorder

    weights = torch.linspace(0.1, 1.0, len(classification_data))
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=len(classification_data))
    loader = torch.utils.data.DataLoader(classification_data, batch_size=10, sampler=sampler)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LightningRecorder(tmp_path / "run", save_every=2)])  # fmt: skip
    with pytest.warns(UserWarning, match="draws examples by a WeightedRandomSampler, but SOURCE weights every"):
        trainer.fit(_lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1))(), loader)


def test_a_lightning_training_set_reloaded_at_another_size_is_warned_of(tmp_path: Path) -> None:
    """reload_dataloaders_every_n_epochs with a data module whose training set grows: the stage records the first
    one's size, which the later epochs' examples do not fit: warned of, once."""
    import lightning.pytorch as pl

    from source_proj.integrations import LightningRecorder

    class Growing(pl.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            n = 20 + 10 * self.trainer.current_epoch
            data = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
            return torch.utils.data.DataLoader(data, batch_size=10)

    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, reload_dataloaders_every_n_epochs=1,
                         callbacks=[LightningRecorder(tmp_path / "run", save_every=2)])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1))(), datamodule=Growing())
    said = [str(w.message) for w in caught if "examples, but the stage was recorded on the" in str(w.message)]
    assert len(said) == 1 and "epoch 1 holds 30 examples" in said[0] and "the 20 its first" in said[0]


def test_a_lightning_batch_whose_training_step_returns_none_is_recorded_as_moving_nothing(
    tmp_path: Path, classification_data
) -> None:
    """Lightning skips the backward of a batch whose training_step returns None, but still steps the optimizer (on no
    gradient: nothing moves) and counts the step: recorded at rate 0, and its examples not captured as visited."""
    import lightning.pytorch as pl

    from source_proj.featurize.windows import window_array
    from source_proj.integrations import LightningCapture

    class Skipping(_lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))):  # type: ignore[misc]
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    projection = sp.ProjectionArguments(dim=16, kind="factored")
    callback = LightningCapture(tmp_path / "run", tmp_path / "cap.sp", sp.ClassificationTask(), save_every=1,
                                projection=projection, options=sp.CaptureArguments(fisher="empirical", end_pass=False))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    loader = torch.utils.data.DataLoader(sp.IndexedDataset(classification_data), batch_size=10, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's "training_step returned None"
        trainer.fit(Skipping(), loader)
    trajectory = sp.Trajectory.load(tmp_path / "run")
    assert trajectory.rates.tolist() == pytest.approx([0.1, 0.0, 0.1, 0.1, 0.0, 0.1])
    posthoc = sp.featurize(tmp_path / "run", Skipping(), sp.ClassificationTask(), classification_data,
                           tmp_path / "post.sp", projection=projection,
                           options=sp.FeaturizeArguments(fisher="empirical", measurement=False), progress=False)
    captured = sp.Store.open(tmp_path / "cap.sp")
    for step, rate in enumerate(trajectory.rates):
        visits = captured.read(window_array("visits", "main", step))
        got, want = captured.read(window_array("grads", "main", step)), posthoc.read(f"grads/main/step-{step:08d}")
        assert visits.sum() == (10 if rate else 0)
        assert np.allclose(got[visits == 1], want[visits == 1], rtol=1e-3, atol=1e-5 * np.abs(want).max())
    sp.fit(captured, progress=False)


@pytest.mark.parametrize("every", [1, 2])
def test_lightning_capture_warns_of_manual_optimization_that_accumulates_batches(
    tmp_path: Path, classification_data, every: int
) -> None:
    """A training_step of its own that steps after every second batch divides its loss in a way capture cannot see:
    warned of; one that steps after every batch is captured as it is, without a word."""
    import lightning.pytorch as pl

    from source_proj.integrations import LightningCapture

    class Manual(_lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1))):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.manual_backward(F.cross_entropy(self(x), y) / every)
            if (batch_idx + 1) % every == 0:
                self.optimizers().step()
                self.optimizers().zero_grad()

    callback = LightningCapture(tmp_path / "run", tmp_path / "cap.sp", sp.ClassificationTask(), save_every=2,
                                projection=sp.ProjectionArguments(dim=8, kind="factored"),
                                options=sp.CaptureArguments(end_pass=False))  # fmt: skip
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    loader = torch.utils.data.DataLoader(sp.IndexedDataset(classification_data), batch_size=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Manual(), loader)
    said = [str(w.message) for w in caught if "own optimization stepped after" in str(w.message)]
    assert said == ([] if every == 1 else [said[0]]) and (every == 1 or "after 2 batches" in said[0])


def test_lightning_capture_keeps_a_manual_training_step_that_calls_backward_itself(
    tmp_path: Path, classification_data
) -> None:
    """``loss.backward()`` in a training_step of its own runs outside Lightning's backward hooks: the batch reached
    the layers, and is captured as featurize computes it (not taken for a batch whose training_step returned None)."""
    import lightning.pytorch as pl

    from source_proj.integrations import LightningCapture

    class Manual(_lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1))):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.optimizers().zero_grad()
            F.cross_entropy(self(x), y).backward()
            self.optimizers().step()

    projection = sp.ProjectionArguments(dim=16, kind="factored")
    callback = LightningCapture(tmp_path / "run", tmp_path / "cap.sp", sp.ClassificationTask(), save_every=1,
                                projection=projection, options=sp.CaptureArguments(fisher="empirical", end_pass=False))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(Manual(), torch.utils.data.DataLoader(sp.IndexedDataset(classification_data), batch_size=10))
    posthoc = sp.featurize(tmp_path / "run", Manual(), sp.ClassificationTask(), classification_data,
                           tmp_path / "post.sp", projection=projection,
                           options=sp.FeaturizeArguments(fisher="empirical", measurement=False), progress=False)
    assert _matches_posthoc_at_every_step(tmp_path / "run", tmp_path / "cap.sp", posthoc) == 30


def test_lightning_capture_of_groups_at_a_ratio_of_rates_is_what_featurize_computes_at_every_step(
    tmp_path: Path, classification_data
) -> None:
    """SGD with momentum, the first layer at 1/5 of the last one's rate: the callback captures every step in
    u = R^{-1/2}θ, as featurize computes it at each checkpoint, and each window keeps D = 1/r."""
    import lightning.pytorch as pl

    from source_proj.featurize.windows import window_array
    from source_proj.integrations import LightningCapture

    class Grouped(_lightning_mlp(lambda params: None)):  # type: ignore[misc]
        def configure_optimizers(self):
            groups = [{"params": self.net[0].parameters(), "lr": 0.02}, {"params": self.net[2].parameters()}]
            return torch.optim.SGD(groups, lr=0.1, momentum=0.9)

    projection = sp.ProjectionArguments(dim=16, kind="factored")
    callback = LightningCapture(tmp_path / "run", tmp_path / "cap.sp", sp.ClassificationTask(), save_every=1,
                                projection=projection, options=sp.CaptureArguments(fisher="empirical", end_pass=False))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(Grouped(), torch.utils.data.DataLoader(sp.IndexedDataset(classification_data), batch_size=10))
    posthoc = sp.featurize(tmp_path / "run", Grouped(), sp.ClassificationTask(), classification_data,
                           tmp_path / "post.sp", projection=projection,
                           options=sp.FeaturizeArguments(fisher="empirical", measurement=False), progress=False)
    assert _matches_posthoc_at_every_step(tmp_path / "run", tmp_path / "cap.sp", posthoc) == 30
    sizes = [p.numel() for p in Grouped().parameters()]  # net.0 weight and bias (r = 0.2), then net.2's (r = 1)
    want = np.repeat([5.0, 5.0, 1.0, 1.0], sizes)
    for step in range(3):
        assert np.allclose(sp.Store.open(tmp_path / "cap.sp").read(window_array("denominator", "main", step)), want)


def test_lightning_capture_refuses_a_multi_process_run(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from source_proj.integrations import LightningCapture

    capture = LightningCapture(tmp_path / "run", tmp_path / "cap.sp", sp.ClassificationTask(), save_every=1)
    with pytest.raises(sp.TaskError, match="captures the batches of one process"):
        capture.on_train_start(SimpleNamespace(world_size=2), None)
    assert not (tmp_path / "run").exists()


def test_lightning_recorder_refuses_a_strategy_that_shards_the_weights(tmp_path: Path) -> None:
    """FSDP shards the weights and optimizer state: one process's state_dict would not be the model (and gathering it
    from one process alone would wait for the others forever)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from source_proj.integrations import LightningRecorder

    recorder = LightningRecorder(tmp_path / "run", save_every=1)
    with pytest.raises(sp.TrajectoryError, match="FSDPStrategy shards the module's weights"):
        recorder.on_train_start(SimpleNamespace(strategy=FSDPStrategy(), world_size=2, callbacks=[recorder]), None)
    assert not (tmp_path / "run").exists()


def test_lightning_capture_callback_captures_what_featurize_computes_at_each_step(
    tmp_path: Path, classification_data
) -> None:
    import lightning.pytorch as pl

    from source_proj.integrations import LightningCapture

    Module = _lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))

    projection = sp.ProjectionArguments(dim=16, kind="factored")
    loader = torch.utils.data.DataLoader(sp.IndexedDataset(classification_data), batch_size=10, shuffle=True)
    callback = LightningCapture(tmp_path / "run", tmp_path / "cap.sp", sp.ClassificationTask(), save_every=1,
                                projection=projection, options=sp.CaptureArguments(fisher="empirical", end_pass=True))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(Module(), loader)
    posthoc = sp.featurize(
        tmp_path / "run", Module(), sp.ClassificationTask(), classification_data, tmp_path / "post.sp",
        projection=projection, options=sp.FeaturizeArguments(fisher="empirical", measurement=False), progress=False,
    )
    assert _matches_posthoc_at_every_step(tmp_path / "run", tmp_path / "cap.sp", posthoc) == 60
    end = sp.Store.open(tmp_path / "cap.sp").read("capture/end/main/step-00000005")  # the end pass: θ_T's gradients
    want = posthoc.read("grads/main/step-00000006")
    assert np.abs(want).max() > 0 and np.allclose(end, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # The training dataloader's data are fingerprinted (unwrapped), and a module with ReLU for Tanh is refused.
    store = sp.Store.open(tmp_path / "cap.sp")
    assert store.meta["fingerprint"]["data"] == data_fingerprint({"main": classification_data})
    relu = Module(nn.ReLU)
    trajectory = sp.Trajectory.load(tmp_path / "run")
    trajectory.load_into(relu, trajectory.final_checkpoint)
    with pytest.raises(sp.TaskError, match="was captured from"):
        check_model(store, relu, sp.ClassificationTask(), torch.device("cpu"))


@pytest.mark.parametrize("problem", ["multi_label_classification", "regression"])
def test_trainer_runs_of_multi_label_and_regression_heads_are_captured_as_featurize_computes_them(
    tmp_path: Path, problem: str
) -> None:
    """A BERT trained by the Trainer with a multi-label head (float 0/1 rows, sigmoid cross-entropy) or a regression
    head (one output, squared error): capture taps the Trainer's own gradients, and post-hoc featurize with the plain
    ``SequenceClassificationTask()`` (the problem found from the model and the labels) computes them at every
    step; the scores are finite and the exact Fisher runs."""
    ids, _ = _tokens(16, 0)
    g = torch.Generator().manual_seed(1)
    outputs = 3 if problem.startswith("multi") else 1
    labels = (torch.rand(16, 3, generator=g) > 0.5).float() if outputs == 3 else torch.randn(16, generator=g)
    task = sp.SequenceClassificationTask(attention="bidirectional")
    _captured_and_posthoc(tmp_path, lambda: _tiny_bert(num_labels=outputs), _Dicts(ids, labels), task)
    exact = sp.featurize(tmp_path / "run", _tiny_bert(num_labels=outputs), task, _Dicts(ids, labels),
                         tmp_path / "exact.sp", projection=_PROJECTION, progress=False,
                         options=sp.FeaturizeArguments(batch_size=8, fisher="exact"))  # fmt: skip
    sp.fit(exact.path, sp.FitArguments(segments_per_stage=1), progress=False)
    scores = sp.Attributor(exact.path, _tiny_bert(num_labels=outputs), task).scores(_Dicts(ids[:3], labels[:3]))
    assert scores.shape == (3, 16) and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_a_trainer_run_of_a_token_classifier_is_captured_as_featurize_computes_it(tmp_path: Path) -> None:
    """A BERT token classifier trained by the Trainer (a tag per token, −100 on every third: the loss is the mean
    over the batch's tagged tokens): capture taps the Trainer's own gradients and post-hoc featurize with
    ``TokenClassificationTask(tokens_per_sequence=n̄)`` computes them at every step (every batch tags as many tokens,
    so the batch mean of s/n̄ is the Trainer's loss exactly); the fitted store answers queries."""
    from transformers import BertConfig, BertForTokenClassification

    from source_proj.tasks.text import mean_labelled_tokens

    def tagger() -> nn.Module:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=8, num_labels=4, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)  # fmt: skip
        return BertForTokenClassification(config)

    ids, _ = _tokens(16, 0)
    tags = (ids * 7 + 3) % 4
    tags[:, 2::3] = -100

    class Tagged(Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "labels": tags[i]}

    n = mean_labelled_tokens(Tagged())
    assert n == 4.0
    task = sp.TokenClassificationTask(tokens_per_sequence=n, attention="bidirectional")
    posthoc = _captured_and_posthoc(tmp_path, tagger, Tagged(), task)
    sp.fit(posthoc.path, sp.FitArguments(segments_per_stage=1), progress=False)
    attributor = sp.Attributor(posthoc.path, tagger(), task)
    scores = attributor.scores(torch.utils.data.Subset(Tagged(), [0, 1, 2]))
    assert scores.shape == (3, 16) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    # Per-token scores: which tokens of a training sentence carry its score (a mis-tagged token's would).
    split = sp.token_scores(attributor, torch.utils.data.Subset(Tagged(), [0, 1]), Tagged(), [3, 4, 5], progress=False)
    assert split.tokens.shape == (2, 3, 6) and np.abs(split.tokens).max() > 0
    assert np.allclose(split.tokens.sum(-1) + split.unplaced, split.scores, rtol=1e-4, atol=1e-6 * np.abs(scores).max())
    assert np.allclose(split.scores, scores[:2, [3, 4, 5]], rtol=1e-5)


def test_lightning_callbacks_record_the_label_smoothing_they_are_told(tmp_path: Path, classification_data) -> None:
    """Lightning's module computes its own loss: the recorder records the ε it is given, capture its task's, and
    captures the module's smoothed gradients as featurize computes them through that task."""
    import lightning.pytorch as pl

    from source_proj.integrations import LightningCapture, LightningRecorder

    class Smoothed(_lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1))):  # type: ignore[misc]
        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self(x), y, label_smoothing=0.1)

    task = sp.ClassificationTask(label_smoothing=0.1)
    projection = sp.ProjectionArguments(dim=16, kind="factored")
    callbacks = {"rec": LightningRecorder(tmp_path / "rec", save_every=1, label_smoothing=0.1),
                 "cap": LightningCapture(tmp_path / "cap", tmp_path / "cap.sp", task, save_every=1,
                                         projection=projection, options=sp.CaptureArguments(fisher="empirical"))}
    for name, callback in callbacks.items():
        loader = torch.utils.data.DataLoader(sp.IndexedDataset(classification_data) if name == "cap"
                                             else classification_data, batch_size=10, shuffle=True)  # fmt: skip
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
        trainer.fit(Smoothed(), loader)
        assert [s.label_smoothing for s in sp.Trajectory.load(tmp_path / name).stages] == [0.1]
    posthoc = sp.featurize(tmp_path / "cap", Smoothed(), task, classification_data, tmp_path / "post.sp",
                           projection=projection, options=sp.FeaturizeArguments(fisher="empirical", measurement=False),
                           progress=False)  # fmt: skip
    assert _matches_posthoc_at_every_step(tmp_path / "cap", tmp_path / "cap.sp", posthoc) == 30
    with pytest.raises(sp.TaskError, match=r"smoothed by 0\.1"):
        sp.featurize(tmp_path / "rec", Smoothed(), sp.ClassificationTask(), classification_data, tmp_path / "x.sp",
                     progress=False)


class _Killed(Exception):
    pass


def _hf_run(
    tmp_path: Path, name: str, callback, *, kill_at: int | None = None, resume: bool | Path = False,
    again: bool = False,
) -> None:
    """A tiny BERT trained 12 AdamW steps (4 epochs of 3) by a Trainer that saves its checkpoints every 4 steps
    into ``tmp_path / name``; ``kill_at``: raise at that step (a killed run), once; ``resume``:
    ``train(resume_from_checkpoint=True)`` (from step 4: mid-epoch, the Trainer skips the epoch's first batch), or
    from the checkpoint directory given; ``again``: after the raise, the same Trainer in the same process does so."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    killed: list[int] = []

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at and not killed:
                killed.append(kill_at)
                raise _Killed

    args = TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=8, num_train_epochs=4, learning_rate=1e-3,
        save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
        seed=0,
    )
    ids, labels = _tokens(24, 0)
    trainer = Trainer(model=_tiny_bert(), args=args, train_dataset=sp.IndexedDataset(_Dicts(ids, labels)),
                      callbacks=[callback, Kill()])  # fmt: skip
    try:
        trainer.train(resume_from_checkpoint=str(resume) if isinstance(resume, Path) else (True if resume else None))
    except _Killed:
        if not again:
            raise
        trainer.train(resume_from_checkpoint=True)


def _hf_capture(tmp_path: Path, run: str, **kwargs):
    """The resume tests' capture callback: run ``tmp_path / run``, store ``tmp_path / f"{run}.sp"``, a checkpoint
    every 4 steps."""
    from source_proj.integrations import HuggingFaceCapture

    task = sp.SequenceClassificationTask(attention="bidirectional")
    return HuggingFaceCapture(tmp_path / run, tmp_path / f"{run}.sp", task, save_every=4,
                              options=sp.CaptureArguments(chunk_rows=8), **kwargs)  # fmt: skip


def _same_captured_runs(a_run: Path, b_run: Path) -> None:
    """Two finished captured runs of ``_hf_run`` (12 steps): the same trajectory, and stores equal array for array
    (the end pass included) with the same fingerprints."""
    a, b = sp.Trajectory.load(a_run), sp.Trajectory.load(b_run)
    assert b.complete and [c.step for c in b.checkpoints] == [0, 4, 8, 12] and a.fingerprint() == b.fingerprint()
    sa, sb = sp.Store.open(f"{a_run}.sp"), sp.Store.open(f"{b_run}.sp")
    names = sorted(sa.progress_arrays())
    assert names == sorted(sb.progress_arrays()) and "capture/end/main/step-00000008" in names
    for name in names:
        assert np.array_equal(sa.read(name), sb.read(name)), name
    assert sb.meta["captured"] and sa.meta["fingerprint"] == sb.meta["fingerprint"]


@pytest.fixture(scope="module")
def uninterrupted_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The resume tests' oracle, trained once for the module: ``_hf_run`` uninterrupted, captured by ``_hf_capture``
    (eigen projection) into the run directory returned (its store beside it, with ``.sp`` appended). Tests only read
    it."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    _hf_run(folder, "hf-a", _hf_capture(folder, "a"))
    return folder / "a"


def test_a_killed_trainer_resumes_its_captured_run_exactly_where_the_recorder_has_its_checkpoint(
    tmp_path: Path, uninterrupted_capture: Path
) -> None:
    """A Trainer killed at step 6 and resumed from its checkpoint at step 4 resumes the recorded run and its store
    at step 4 (the recorder's last checkpoint): the trajectory and store are the uninterrupted run's. Resuming where
    the recorder has no last checkpoint, into a directory without a run, or with overwrite=True (which recorded the
    resumed steps as steps from 0) is refused in one sentence."""
    from source_proj.integrations import HuggingFaceCapture, HuggingFaceRecorder

    def capture(run: str, **kwargs) -> HuggingFaceCapture:
        return _hf_capture(tmp_path, run, **kwargs)

    with pytest.raises(_Killed):
        _hf_run(tmp_path, "hf-b", capture("b"), kill_at=6)
    with pytest.raises(sp.TrajectoryError) as err:
        _hf_run(tmp_path, "hf-b", capture("b", overwrite=True), resume=True)
    assert str(err.value) == (
        "The Trainer resumes at step 4, but a recorded run starts at step 0 and overwrite=True would record it from "
        "there; train from the start, or resume without overwrite=True to continue the run recorded in "
        f"{tmp_path / 'b'}."
    )
    _hf_run(tmp_path, "hf-b", capture("b"), resume=True)
    _same_captured_runs(uninterrupted_capture, tmp_path / "b")

    with pytest.raises(sp.TrajectoryError) as err:
        _hf_run(tmp_path, "hf-b", HuggingFaceRecorder(tmp_path / "none", save_every=4), resume=True)
    assert str(err.value) == (
        f"The Trainer resumes at step 12, but {tmp_path / 'none'} holds no recorded run to resume; record a new run "
        "from the start (train without resuming from a checkpoint)."
    )
    with pytest.raises(_Killed):
        _hf_run(tmp_path, "hf-c", HuggingFaceRecorder(tmp_path / "c", save_every=3), kill_at=7)
    with pytest.raises(sp.TrajectoryError) as err:
        _hf_run(tmp_path, "hf-c", HuggingFaceRecorder(tmp_path / "c", save_every=3), resume=True)
    assert str(err.value) == (
        f"The Trainer resumes at step 4, but the run recorded in {tmp_path / 'c'} has its last checkpoint at step 6; "
        "resume the trainer from its checkpoint at step 6 (save trainer checkpoints at multiples of save_every), or "
        "record a new run from the start."
    )


def test_a_trainer_resumed_in_the_process_its_training_failed_in_captures_the_uninterrupted_run(
    tmp_path: Path, uninterrupted_capture: Path
) -> None:
    """A Trainer whose training raised at step 6 (a notebook's interrupt) calls no callback's on_train_end, so the
    capture's hooks stay on its model; resumed in the same process from its checkpoint at step 4, with the same
    callback, the run and store are the uninterrupted run's (the hooks left behind once took the row indices out of
    every batch first, and the training was refused as lacking them)."""
    _hf_run(tmp_path, "hf-b", _hf_capture(tmp_path, "b"), kill_at=6, again=True)
    _same_captured_runs(uninterrupted_capture, tmp_path / "b")


def test_a_trainer_without_on_optimizer_step_resumed_in_the_process_its_training_failed_in_records_the_run_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted_capture: Path
) -> None:
    """An older transformers (no ``on_optimizer_step``): the callback steps the recorder from an optimizer post-hook,
    and the Trainer keeps its optimizer from one ``train`` to the next. A training that raised at step 6 and is
    resumed in the same process from step 4 records the uninterrupted run (the failed training's post-hook, left on
    the optimizer, once went on stepping its own recorder into the same run directory)."""
    from source_proj.integrations import HuggingFaceRecorder
    from source_proj.integrations import huggingface as hf

    monkeypatch.setattr(hf, "_CALLS_OPTIMIZER_STEP", False)
    _hf_run(tmp_path, "hf-b", HuggingFaceRecorder(tmp_path / "b", save_every=4), kill_at=6, again=True)
    a, b = sp.Trajectory.load(uninterrupted_capture), sp.Trajectory.load(tmp_path / "b")
    assert b.complete and [c.step for c in b.checkpoints] == [0, 4, 8, 12] and a.fingerprint() == b.fingerprint()


def test_a_trainer_resumed_from_an_earlier_checkpoint_rewinds_the_captured_run_when_asked(
    tmp_path: Path, uninterrupted_capture: Path
) -> None:
    """A Trainer killed at step 10 and resumed from its checkpoint at step 4, not its last (8): refused in one sentence
    that offers rewind=True; with it, the recorded run is rewound to step 4 and the store drops its windows from there,
    so run and store end as the uninterrupted ones."""
    from source_proj.integrations import HuggingFaceCapture

    def capture(run: str, **kwargs) -> HuggingFaceCapture:
        return _hf_capture(tmp_path, run, **kwargs)

    with pytest.raises(_Killed):
        _hf_run(tmp_path, "hf-b", capture("b"), kill_at=10)
    earlier = tmp_path / "hf-b" / "checkpoint-4"
    with pytest.raises(sp.TrajectoryError) as err:
        _hf_run(tmp_path, "hf-b", capture("b"), resume=earlier)
    assert str(err.value) == (
        f"The Trainer resumes at step 4, but the run recorded in {tmp_path / 'b'} has its last checkpoint at step 8; "
        "resume the trainer from its checkpoint at step 8 (save trainer checkpoints at multiples of save_every), or "
        "pass rewind=True to the callback to rewind the recorded run to its checkpoint at step 4 (the steps after it "
        "are forgotten), or record a new run from the start."
    )
    _hf_run(tmp_path, "hf-b", capture("b", rewind=True), resume=earlier)
    _same_captured_runs(uninterrupted_capture, tmp_path / "b")


def test_a_killed_lightning_trainer_resumes_its_recorded_run_where_the_recorder_has_its_checkpoint(
    tmp_path: Path, classification_data
) -> None:
    """Lightning as the Trainer: resumed from its checkpoint at step 3 (fit(ckpt_path=...)) the recorded run goes on
    from the recorder's checkpoint there into the uninterrupted trajectory; with overwrite=True it is refused."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from source_proj.integrations import LightningRecorder

    def adamw(params):
        opt = torch.optim.AdamW(params, lr=0.01)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)]

    Module = _lightning_mlp(adamw)

    class Kill(Callback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == self.step:
                raise _Killed

    def fit(name: str, *, kill: int | None = None, resume: bool = False, overwrite: bool = False,
            rewind: bool = False) -> None:  # fmt: skip
        saves = ModelCheckpoint(dirpath=tmp_path / f"pl-{name}", every_n_train_steps=3, save_top_k=-1)
        callbacks = [LightningRecorder(tmp_path / name, save_every=3, overwrite=overwrite, rewind=rewind), saves]
        callbacks += [Kill(kill)] if kill else []
        trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks)  # fmt: skip
        loader = torch.utils.data.DataLoader(classification_data, batch_size=10)
        ckpt = next((tmp_path / f"pl-{name}").glob("*step=3.ckpt")) if resume else None
        trainer.fit(Module(), loader, ckpt_path=ckpt)

    fit("a")
    with pytest.raises(_Killed):
        fit("b", kill=4)
    with pytest.raises(sp.TrajectoryError, match=r"^The Lightning Trainer resumes at step 3, but a recorded run starts "
                                                 r"at step 0 and overwrite=True would record it from there; "):
        fit("b", resume=True, overwrite=True)
    fit("b", resume=True)
    a, b = sp.Trajectory.load(tmp_path / "a"), sp.Trajectory.load(tmp_path / "b")
    assert b.complete and [c.step for c in b.checkpoints] == [0, 3, 6, 9] and a.fingerprint() == b.fingerprint()
    # Killed at step 7 (the recorder's last checkpoint at 6), resumed from the checkpoint at 3 with rewind=True.
    with pytest.raises(_Killed):
        fit("c", kill=7)
    with pytest.raises(sp.TrajectoryError, match=r"or pass rewind=True to the callback to rewind the recorded run to "
                                                 r"its checkpoint at step 3 \(the steps after it are forgotten\)"):
        fit("c", resume=True)
    fit("c", resume=True, rewind=True)
    c = sp.Trajectory.load(tmp_path / "c")
    assert c.complete and [s.step for s in c.checkpoints] == [0, 3, 6, 9] and a.fingerprint() == c.fingerprint()


def test_a_lightning_capture_killed_mid_epoch_resumes_into_the_training_that_happened(
    tmp_path: Path, classification_data
) -> None:
    """Lightning resumed mid-epoch (from its checkpoint at step 6 of an 8-batch epoch) restarts the epoch's
    dataloader, so it trains other batches than the uninterrupted run would (Lightning warns): the store must
    describe the run that happened. Every window (a checkpoint per step) holds exactly the rows trained at its step,
    the killed session's before the checkpoint and the resumed session's after it, each once, with the gradients
    post-hoc featurize computes at that step's checkpoint."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from source_proj.featurize.windows import window_array
    from source_proj.integrations import LightningCapture

    Module = _lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))

    trained: dict[int, list[int]] = {}  # step -> the rows trained there, the last session's word

    class Rows(Callback):
        def on_train_batch_start(self, trainer, module, batch, _) -> None:
            trained[trainer.global_step] = batch[0].tolist()  # IndexedDataset's indices, before capture takes them

    class Kill(Callback):  # as step 6 begins: Lightning saves its checkpoints after the other callbacks' hooks
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == 6:
                raise _Killed

    projection = sp.ProjectionArguments(dim=16, kind="factored")

    def fit(*, kill: bool = False, resume: bool = False) -> None:
        saves = ModelCheckpoint(dirpath=tmp_path / "pl", every_n_train_steps=1, save_top_k=-1)
        capture = LightningCapture(tmp_path / "run", tmp_path / "cap.sp", sp.ClassificationTask(), save_every=1,
                                   projection=projection, options=sp.CaptureArguments(fisher="empirical"))
        callbacks = [Rows(), capture, saves] + ([Kill()] if kill else [])
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks)  # fmt: skip
        loader = torch.utils.data.DataLoader(sp.IndexedDataset(classification_data), batch_size=4, shuffle=True,
                                             generator=torch.Generator().manual_seed(1))  # fmt: skip
        trainer.fit(Module(), loader, ckpt_path=next((tmp_path / "pl").glob("*step=6.ckpt")) if resume else None)

    with pytest.raises(_Killed):
        fit(kill=True)  # killed as step 6 began, its batch taken by capture
    killed = trained[6]
    with pytest.warns(UserWarning, match="dataloader is not resumable"):
        fit(resume=True)
    assert trained[6] != killed  # the resumed epoch's loader started again: step 6 trained other rows
    store = sp.Store.open(tmp_path / "cap.sp")
    steps = [c.step for c in sp.Trajectory.load(tmp_path / "run").checkpoints][:-1]
    assert steps == sorted(trained) == list(range(16))
    for step in steps:
        want = np.zeros(len(classification_data), dtype=np.uint32)
        want[trained[step]] = 1
        np.testing.assert_array_equal(store.read(window_array("visits", "main", step)), want, err_msg=str(step))
    posthoc = sp.featurize(
        tmp_path / "run", Module(), sp.ClassificationTask(), classification_data, tmp_path / "post.sp",
        projection=projection, options=sp.FeaturizeArguments(fisher="empirical", measurement=False), progress=False,
    )  # fmt: skip
    assert _matches_posthoc_at_every_step(tmp_path / "run", tmp_path / "cap.sp", posthoc) == sum(
        len(rows) for rows in trained.values()
    )


def test_a_lightning_capture_refitted_in_the_process_its_training_failed_in_captures_the_uninterrupted_run(
    tmp_path: Path, classification_data
) -> None:
    """A training_step that raises at step 4, after capture began its batch (a NaN refused, a notebook's interrupt):
    no hook of the recorder's or capture's stays on the module, and the same module and callback fitted again in the
    same process from Lightning's checkpoint at step 3 give the uninterrupted run's store (the failed capture's layer
    hooks, left on the module with its begun batch, once fired in the new capture's first check and refused the run
    as a model the projection cannot take; the recorder's clipping hooks stayed until the next fit's recorder)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from source_proj.integrations import LightningCapture

    Module = _lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))

    class Failing(Module):  # type: ignore[misc, valid-type]
        fail_at: int | None = 4

        def training_step(self, batch, index):
            loss = super().training_step(batch, index)
            if self.global_step == self.fail_at:
                self.fail_at = None
                raise _Killed
            return loss

    def fit(name: str, module: nn.Module, capture: Any, ckpt: Path | None = None) -> None:
        saves = ModelCheckpoint(dirpath=tmp_path / f"pl-{name}", every_n_train_steps=3, save_top_k=-1)
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[capture, saves])  # fmt: skip
        trainer.fit(module, torch.utils.data.DataLoader(sp.IndexedDataset(classification_data), batch_size=10),
                    ckpt_path=ckpt)  # fmt: skip

    def capture(name: str) -> LightningCapture:
        return LightningCapture(tmp_path / name, tmp_path / f"{name}.sp", sp.ClassificationTask(), save_every=3,
                                projection=_PROJECTION, options=sp.CaptureArguments(chunk_rows=8))  # fmt: skip

    fit("a", Module(), capture("a"))
    module, callback = Failing(), capture("b")
    with pytest.raises(_Killed):
        fit("b", module, callback)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    assert hooks + sum(len(p._post_accumulate_grad_hooks or {}) for p in module.parameters()) == 0  # nor clipping's
    fit("b", module, callback, next((tmp_path / "pl-b").glob("*step=3.ckpt")))
    a, b = sp.Store.open(tmp_path / "a.sp"), sp.Store.open(tmp_path / "b.sp")
    assert b.meta["captured"] and a.meta["fingerprint"] == b.meta["fingerprint"]
    assert sorted(a.progress_arrays()) == sorted(b.progress_arrays())
    for name in a.progress_arrays():
        np.testing.assert_allclose(a.read(name), b.read(name), rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_trainer_with_torch_compile_captures_what_the_eager_trainer_captures(tmp_path: Path) -> None:
    """``TrainingArguments(torch_compile=True)``: dynamo traced the callback's forward hooks and capture's, and
    failed; they run eagerly now, and the compiled run's store (eigen projection, the sampled Fisher from the
    training forward) is the eager run's. aot_eager: dynamo and AOT autograd as inductor, without a C++ compiler."""
    from transformers import Trainer, TrainingArguments
    from transformers.modeling_outputs import SequenceClassifierOutput

    from source_proj.featurize.windows import window_array
    from source_proj.integrations import HuggingFaceCapture

    class Bag(nn.Module):  # a model the Trainer takes, small enough that dynamo traces it in a moment
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.hidden, self.head = nn.Embedding(32, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask=None, labels=None):
            logits = self.head(torch.tanh(self.hidden(self.embed(input_ids))).mean(1))
            loss = None if labels is None else F.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    ids, labels = _tokens(16, 0)
    task = sp.SequenceClassificationTask()
    stores = []
    for compiled in (False, True):
        folder = tmp_path / ("compiled" if compiled else "eager")
        args = TrainingArguments(
            output_dir=str(folder / "hf"), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=1e-3,
            lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
            logging_strategy="no", seed=0, torch_compile=compiled, torch_compile_backend="aot_eager",
        )  # fmt: skip
        callback = HuggingFaceCapture(folder / "run", folder / "cap.sp", task, save_every=2,
                                      options=sp.CaptureArguments(basis_batch=8))  # fmt: skip
        torch._dynamo.reset()
        Trainer(model=Bag(), args=args, train_dataset=sp.IndexedDataset(_Dicts(ids, labels)),
                callbacks=[callback]).train()  # fmt: skip
        stores.append(sp.Store.open(folder / "cap.sp"))
    torch._dynamo.reset()
    eager, compiled = stores
    for kind in ("grads", "visits", "fisher"):
        for start in (0, 2):
            want, got = eager.read(window_array(kind, "main", start)), compiled.read(window_array(kind, "main", start))
            assert np.abs(want).max() > 0 and np.allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_a_bf16_trainer_is_told_to_capture_in_bf16_and_captures_there_when_asked(tmp_path: Path) -> None:
    """A Trainer with ``bf16=True`` whose capture keeps its own passes in fp32 is warned in one sentence; with
    ``CaptureArguments(precision="bf16")`` it is not, the store records bf16, and it fits and answers queries."""
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceCapture

    ids, labels = _tokens(8, 0)
    task = sp.SequenceClassificationTask(attention="bidirectional")
    told: dict[str, list[str]] = {}
    for precision in ("fp32", "bf16"):
        args = TrainingArguments(
            output_dir=str(tmp_path / precision), per_device_train_batch_size=4, num_train_epochs=1,
            learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", save_strategy="no", report_to=[],
            use_cpu=True, bf16=True, disable_tqdm=True, logging_strategy="no", seed=0,
        )  # fmt: skip
        callback = HuggingFaceCapture(tmp_path / f"run-{precision}", tmp_path / f"{precision}.sp", task, save_every=1,
                                      options=sp.CaptureArguments(basis_batch=8, precision=precision))  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(model=_tiny_bert(), args=args, train_dataset=sp.IndexedDataset(_Dicts(ids, labels)),
                    callbacks=[callback]).train()  # fmt: skip
        told[precision] = [str(w.message) for w in caught if "trains in bf16" in str(w.message)]
    assert told["bf16"] == [] and len(told["fp32"]) == 1
    assert "options=sp.CaptureArguments(precision='bf16')" in told["fp32"][0]
    store = sp.Store.open(tmp_path / "bf16.sp")
    assert store.meta["featurize"]["precision"] == "bf16"
    sp.fit(store.path, sp.FitArguments(segments_per_stage=1), progress=False)
    scores = sp.Attributor(store.path, _tiny_bert(), task).scores(_Dicts(*_tokens(3, 1)))
    assert scores.shape == (3, 8) and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_a_trainer_that_accumulates_gradients_steps_on_the_mean_loss_or_is_refused(tmp_path: Path) -> None:
    """Gradient accumulation over 2 batches of 8, 24 examples: the epoch's last step accumulates 1 batch. The Trainer
    leaves the losses undivided where it trusts the model's loss to divide by ``num_items_in_batch``: BERT's
    classifier ignores it, so its steps are twice the mean loss's (the oracle: the first step against one batch of 16)
    and both callbacks refuse the run in one sentence before recording anything. With
    ``trainer.loss_is_scaled_for_ga = False`` the Trainer divides by the batches each step accumulates, 1 in the last,
    and capture taps gradients equal to post-hoc featurize's at every step; a GPT-2, whose loss divides by it, is
    recorded as it is."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceCapture, HuggingFaceRecorder

    def args(accumulate: int, batch: int = 8, steps: int = -1) -> TrainingArguments:
        return TrainingArguments(
            output_dir=str(tmp_path / "hf"), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
            num_train_epochs=1, max_steps=steps, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
            max_grad_norm=0.0, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
            logging_strategy="no", seed=0,
        )  # fmt: skip

    ids, labels = _tokens(24, 0)
    data = _Dicts(ids, labels)

    def first_step(trainer_args: TrainingArguments, divides: bool | None) -> torch.Tensor:
        model = _tiny_bert()
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        trainer = Trainer(model=model, args=trainer_args, train_dataset=data)
        trainer.loss_is_scaled_for_ga = None if divides is None else not divides
        trainer.train()
        return start - torch.cat([p.detach().flatten() for p in model.parameters()])

    one = first_step(args(1, batch=16, steps=1), None)
    assert float((first_step(args(2, steps=1), None) - 2 * one).norm()) < 1e-3 * float(one.norm())  # refused
    assert float((first_step(args(2, steps=1), True) - one).norm()) < 1e-3 * float(one.norm())  # what the setting mends

    task = sp.SequenceClassificationTask(attention="bidirectional")
    for name, callback in (("rec", HuggingFaceRecorder(tmp_path / "rec", save_every=1)),
                           ("cap", HuggingFaceCapture(tmp_path / "cap", tmp_path / "cap.sp", task, save_every=1,
                                                      projection=_PROJECTION))):  # fmt: skip
        trainer = Trainer(model=_tiny_bert(), args=args(2), train_dataset=sp.IndexedDataset(data), callbacks=[callback])
        with pytest.raises(sp.TrajectoryError) as err:
            trainer.train()
        assert str(err.value) == (
            "The Trainer accumulates gradients over 2 batches without dividing their losses by 2, because it trusts "
            "BertForSequenceClassification's loss to divide by the num_items_in_batch it passes, which that loss "
            "ignores, so each step is up to 2 times the mean loss's step that SOURCE models; set "
            "trainer.loss_is_scaled_for_ga = False before trainer.train() (the Trainer then divides them), or train "
            "without gradient accumulation."
        )
        assert not (tmp_path / name).exists()

    callback = HuggingFaceCapture(tmp_path / "run", tmp_path / "cap.sp", task, save_every=1, projection=_PROJECTION,
                                  options=sp.CaptureArguments(fisher="empirical"))  # fmt: skip
    trainer = Trainer(model=_tiny_bert(), args=args(2), train_dataset=sp.IndexedDataset(data), callbacks=[callback])
    trainer.loss_is_scaled_for_ga = False
    trainer.train()
    assert sp.Trajectory.load(tmp_path / "run").num_steps == 2
    posthoc = sp.featurize(tmp_path / "run", _tiny_bert(), task, data, tmp_path / "post.sp", projection=_PROJECTION,
                           options=_EMPIRICAL, progress=False)  # fmt: skip
    assert _matches_posthoc_at_every_step(tmp_path / "run", tmp_path / "cap.sp", posthoc) == 24

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    Trainer(model=gpt, args=args(2), train_dataset=_Dicts(ids, ids),
            callbacks=[HuggingFaceRecorder(tmp_path / "gpt", save_every=2)]).train()  # fmt: skip
    assert sp.Trajectory.load(tmp_path / "gpt").complete


def test_an_accumulated_step_of_uneven_batches_whose_loss_divides_by_its_items_is_captured_at_its_gradients(
    tmp_path: Path,
) -> None:
    """14 examples in batches of 4, 2 accumulated per step: the second step accumulates a batch of 4 and one of 2. The
    Trainer's ``LabelSmoother`` divides each batch's summed loss by the ``num_items_in_batch`` of the whole step (6),
    not by the batches times their own size (8, then 4): capture taps the gradients post-hoc featurize computes at
    every step."""
    ids, labels = _tokens(14, 0)
    task = sp.SequenceClassificationTask(attention="bidirectional", label_smoothing=0.1)
    _captured_and_posthoc(tmp_path, _tiny_bert, _Dicts(ids, labels), task, label_smoothing_factor=0.1,
                          per_device_train_batch_size=4, gradient_accumulation_steps=2)  # fmt: skip
    assert sp.Trajectory.load(tmp_path / "run").num_steps == 2


def test_a_trainer_that_finds_its_batch_size_records_and_captures_the_training_it_retried(tmp_path: Path) -> None:
    """``auto_find_batch_size``: out of memory at its first step, the Trainer trains again from step 0 at 90 % of
    the batch size and calls on_train_begin again, without a word of the failure. The callback records the retry
    over the run it had begun (refused before, as a directory that already holds files), and captures the
    gradients post-hoc featurize computes at every step of it."""
    from transformers import TrainerCallback

    class OutOfMemory(TrainerCallback):
        failed = False

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.failed:
                self.failed = True
                raise RuntimeError("CUDA out of memory.")  # what accelerate's find_executable_batch_size retries on

    ids, labels = _tokens(24, 0)
    task = sp.SequenceClassificationTask(attention="bidirectional")
    _captured_and_posthoc(tmp_path, _tiny_bert, _Dicts(ids, labels), task, callbacks=(OutOfMemory(),),
                          auto_find_batch_size=True)  # fmt: skip
    assert sp.Trajectory.load(tmp_path / "run").num_steps == 4  # batches of 7


@pytest.mark.parametrize("seed", [None, 3])
def test_a_masked_lm_trainer_whose_collator_masks_at_random_trains_the_same_captured_or_not(
    tmp_path: Path, seed: int | None
) -> None:
    """A BERT masked LM trained by the Trainer with ``DataCollatorForLanguageModeling(mlm=True)``, which draws each
    batch's masks from torch's global random state (or, given a seed, from a generator of its own). Capture's eigen
    basis passes and end pass batch the training data with that collator; they draw masks too, and must leave both
    random streams as training finds them: the captured run's weights equal the uncaptured run's bit for bit."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
    )

    from source_proj.integrations import HuggingFaceCapture, HuggingFaceRecorder

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, **{f"w{i}": i for i in range(3, 32)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
                                        pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 32, (int(torch.randint(4, 8, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(16)]  # fmt: skip
    task = sp.TokenClassificationTask(tokens_per_sequence=1.65, attention="bidirectional")
    weights = {}
    for name in ("recorded", "captured"):
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32, max_position_embeddings=8, hidden_dropout_prob=0.0,
                                           attention_probs_dropout_prob=0.0))  # fmt: skip
        args = TrainingArguments(
            output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=0.05,
            optim="sgd", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
            seed=0,
        )  # fmt: skip
        callback = (HuggingFaceRecorder(tmp_path / name, save_every=1) if name == "recorded" else
                    HuggingFaceCapture(tmp_path / name, tmp_path / "cap.sp", task, save_every=1,
                                       options=sp.CaptureArguments(basis_batch=8)))  # fmt: skip
        Trainer(model=model, args=args, train_dataset=rows if name == "recorded" else sp.IndexedDataset(rows),
                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3, seed=seed),
                callbacks=[callback]).train()  # fmt: skip
        weights[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    store = sp.Store.open(tmp_path / "cap.sp")
    assert store.meta["projection"]["kind"] == "eigen" and len(store.meta["capture_bases"]) == 4
    assert torch.equal(weights["recorded"], weights["captured"])


def test_a_gpt2_trainer_that_counts_position_zeros_label_is_told_and_mended_by_its_loss_type(tmp_path: Path) -> None:
    """transformers counts the predicted labels for its causal-LM loss only where it knows the model's loss_type, and
    GPT2LMHeadModel has none: the Trainer's loss is then the summed token loss over every label, s/(n+1) a sequence
    (the oracle: the model's own loss on a batch times n/(n+1)). The recorder says so in one sentence; with
    ``model.loss_type = "ForCausalLM"`` it says nothing and capture taps gradients equal to post-hoc featurize's with
    ``tokens_per_sequence=mean_predicted_tokens``."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceCapture
    from source_proj.tasks.text import mean_predicted_tokens

    def gpt() -> nn.Module:
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0))

    ids = torch.randint(0, 40, (16, 8), generator=torch.Generator().manual_seed(0))
    data = _Dicts(ids, ids)
    n = mean_predicted_tokens(data)
    task = sp.LanguageModelingTask(tokens_per_sequence=n)
    assert n == 7.0
    told = {}
    for mended in (False, True):
        model = gpt()
        if mended:
            model.loss_type = "ForCausalLM"
        args = TrainingArguments(
            output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=0.05,
            optim="sgd", lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, logging_strategy="no", seed=0,
        )  # fmt: skip
        callback = HuggingFaceCapture(tmp_path / f"run-{mended}", tmp_path / f"{mended}.sp", task, save_every=1,
                                      projection=_PROJECTION, options=sp.CaptureArguments(fisher="empirical"))
        trainer = Trainer(model=model, args=args, train_dataset=sp.IndexedDataset(data), callbacks=[callback])
        batch = {"input_ids": ids[:8], "labels": ids[:8]}
        with torch.no_grad():
            items = trainer._get_num_items_in_batch([batch], "cpu")  # the Trainer's count of the batch's labels
            counted = trainer.compute_loss(model, batch, num_items_in_batch=items)
            ratio = float(counted / model(**batch).loss)
        assert ratio == pytest.approx(1.0 if mended else n / (n + 1), rel=1e-5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        told[mended] = [str(w.message) for w in caught if "summed token loss" in str(w.message)]
    assert told[True] == [] and told[False] == [
        "The Trainer divides GPT2LMHeadModel's summed token loss by every label of its batches, position 0's too "
        "(transformers counts the predicted ones only for a model whose loss_type it knows), so the mean loss per "
        "sequence is s/(n+1), n its predicted tokens; set model.loss_type = 'ForCausalLM' before building the Trainer "
        "(the loss is then the model's own), or give featurize LanguageModelingTask(tokens_per_sequence="
        "mean_predicted_tokens(train) + 1)."
    ]
    posthoc = sp.featurize(tmp_path / "run-True", gpt(), task, data, tmp_path / "post.sp", projection=_PROJECTION,
                           options=_EMPIRICAL, progress=False)  # fmt: skip
    assert _matches_posthoc_at_every_step(tmp_path / "run-True", tmp_path / "True.sp", posthoc) == 16


def test_a_trainer_that_loads_its_best_checkpoint_at_the_end_is_recorded_with_its_last_steps_weights(
    tmp_path: Path,
) -> None:
    """``load_best_model_at_end=True``: after the last step the Trainer loads its best checkpoint (here the first
    evaluation's, step 3 of 10) into the model, before ``on_train_end``. The recorded run's final checkpoint holds the
    weights of step 10 as the last step left them (the oracle: a callback's copy), captured or not, and the captured
    store, whose end pass and fingerprints are taken at those weights, answers for the model rebuilt from the run; a
    warning says the best checkpoint is not what is attributed."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from source_proj.integrations import HuggingFaceCapture, HuggingFaceRecorder

    class Last(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    ids, labels = _tokens(36, 0)
    task = sp.SequenceClassificationTask(attention="bidirectional")
    for name in ("rec", "cap"):
        evaluations = iter(range(100))
        args = TrainingArguments(
            output_dir=str(tmp_path / f"hf-{name}"), per_device_train_batch_size=8, num_train_epochs=2,
            learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", eval_strategy="steps", eval_steps=3,
            save_strategy="steps", save_steps=3, load_best_model_at_end=True, metric_for_best_model="rank",
            greater_is_better=False, report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0,
        )  # fmt: skip
        callback = (HuggingFaceRecorder(tmp_path / name, save_every=4) if name == "rec" else
                    HuggingFaceCapture(tmp_path / name, tmp_path / "cap.sp", task, save_every=4,
                                       projection=_PROJECTION))  # fmt: skip
        last, model = Last(), _tiny_bert()
        trainer = Trainer(model=model, args=args, train_dataset=sp.IndexedDataset(_Dicts(ids, labels)),
                          eval_dataset=_Dicts(ids[:8], labels[:8]), callbacks=[last, callback],
                          compute_metrics=lambda _, e=evaluations: {"rank": next(e)})  # the first evaluation is best
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        assert trainer.state.best_model_checkpoint == str(tmp_path / f"hf-{name}" / "checkpoint-3")
        trajectory = sp.Trajectory.load(tmp_path / name)
        assert trajectory.complete and [c.step for c in trajectory.checkpoints] == [0, 4, 8, 10]
        final = trajectory.load_state(trajectory.final_checkpoint)["model"]
        assert all(torch.equal(final[k], v) for k, v in last.weights.items())
        assert not all(torch.equal(final[k], v) for k, v in model.state_dict().items())  # the best checkpoint's
        told = [str(w.message) for w in caught if "best checkpoint" in str(w.message)]
        assert told == [
            f"The Trainer loaded its best checkpoint ({tmp_path / f'hf-{name}' / 'checkpoint-3'}) into the model after "
            "step 10; SOURCE attributes the recorded run, whose final checkpoint holds the weights of step 10, not the "
            "best checkpoint's."
        ]
    sp.fit(tmp_path / "cap.sp", sp.FitArguments(segments_per_stage=1), progress=False)
    scores = sp.Attributor(tmp_path / "cap.sp", _tiny_bert(), task).scores(_Dicts(*_tokens(3, 1)))
    assert scores.shape == (3, 36) and np.isfinite(scores).all()


def test_a_trainer_with_neftune_noise_or_a_loss_function_of_its_own_is_told_in_one_sentence(tmp_path: Path) -> None:
    """NEFTune adds noise to the input embeddings in training only; featurize's gradients are noise-free. A
    ``compute_loss_func`` (here class weights), or a Trainer subclass's own ``compute_loss``, trains a loss featurize
    does not see. The recorder says so once each, naming the setting or the class; a Trainer with none of them, a
    subclass that keeps the Trainer's ``compute_loss`` among them, is told nothing."""
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceRecorder

    def weighted(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits, labels, weight=torch.tensor([1.0, 3.0]))

    class Logging(Trainer):  # a subclass that leaves the loss alone
        pass

    class Weighted(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = weighted(outputs, labels)
            return (loss, outputs) if return_outputs else loss

    class Derived(Weighted):  # the override is named where it is defined
        pass

    ids, labels = _tokens(8, 0)
    told = {}
    cases = (("plain", Trainer, None, None), ("subclass", Logging, None, None), ("neftune", Trainer, 5.0, None),
             ("own loss", Trainer, None, weighted), ("own compute_loss", Derived, None, None))  # fmt: skip
    for name, trainer, alpha, loss in cases:
        args = TrainingArguments(
            output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=0.05,
            optim="sgd", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
            seed=0, neftune_noise_alpha=alpha,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(model=_tiny_bert(), args=args, train_dataset=_Dicts(ids, labels), compute_loss_func=loss,
                    callbacks=[HuggingFaceRecorder(tmp_path / f"run-{name}", save_every=1)]).train()  # fmt: skip
        told[name] = [str(w.message) for w in caught if "NEFTune" in str(w.message) or "compute_loss" in str(w.message)]
    assert told["plain"] == [] and told["subclass"] == []
    assert len(told["neftune"]) == 1 and "neftune_noise_alpha=5" in told["neftune"][0]
    assert "noise-free loss" in told["neftune"][0]
    assert len(told["own loss"]) == 1 and "compute_loss_func of your own" in told["own loss"][0]
    assert len(told["own compute_loss"]) == 1
    assert "with the compute_loss of its subclass Weighted, which" in told["own compute_loss"][0]
    assert told["own compute_loss"][0].endswith("(where it returns the model's own loss, nothing is amiss).")


def test_a_trainer_that_smooths_its_labels_is_attributed_through_its_smoothed_loss(tmp_path: Path) -> None:
    """The Trainer's ``label_smoothing_factor`` is recorded with the stage. Capture taps the gradients the Trainer's
    own ``LabelSmoother`` took: post-hoc featurize with ``SequenceClassificationTask(label_smoothing=0.1)`` computes
    them at every step, the unsmoothed task's are not them, and featurize refuses that task in one sentence."""
    ids, labels = _tokens(16, 0)
    task = sp.SequenceClassificationTask(attention="bidirectional", label_smoothing=0.1)
    _captured_and_posthoc(tmp_path, _tiny_bert, _Dicts(ids, labels), task, label_smoothing_factor=0.1)
    assert [s.label_smoothing for s in sp.Trajectory.load(tmp_path / "run").stages] == [0.1]
    projection, options = _PROJECTION, _EMPIRICAL
    plain = sp.SequenceClassificationTask(attention="bidirectional")
    with pytest.raises(sp.TaskError, match=r"smoothed by 0.1 .*SequenceClassificationTask\(..., label_smoothing=0.1\)"):
        sp.featurize(tmp_path / "run", _tiny_bert(), plain, _Dicts(ids, labels), tmp_path / "plain.sp",
                     projection=projection, options=options, progress=False)  # fmt: skip
    # The collate function that keeps the labels travels to dataloader workers (pickled where they are spawned).
    import pickle

    from source_proj.integrations.huggingface import LABELS_KEY, _KeepLabels

    kept = pickle.loads(pickle.dumps(_KeepLabels(torch.utils.data.default_collate)))
    batch = kept([{"labels": torch.tensor(1)}, {"labels": torch.tensor(0)}])
    assert torch.equal(batch[LABELS_KEY], torch.tensor([1, 0]))
    # A callback told another ε than the Trainer's is refused; told none, or the same, it records the Trainer's.
    from types import SimpleNamespace

    from source_proj.integrations import HuggingFaceRecorder

    args = SimpleNamespace(label_smoothing_factor=0.1)  # what the callback reads of the Trainer's arguments
    assert HuggingFaceRecorder(tmp_path / "r", save_every=1)._smoothing(args) == 0.1
    assert HuggingFaceRecorder(tmp_path / "r", save_every=1, label_smoothing=0.1)._smoothing(args) == 0.1
    with pytest.raises(sp.TrajectoryError, match=r"smooths its labels by 0.1 .*given label_smoothing=0.2"):
        HuggingFaceRecorder(tmp_path / "r", save_every=1, label_smoothing=0.2)._smoothing(args)
    # The negative control: the same checkpoints featurized through the plain loss miss the Trainer's gradients.
    index = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    del index["stages"][0]["label_smoothing"]
    (tmp_path / "run" / "trajectory.json").write_text(json.dumps(index))
    unsmoothed = sp.featurize(tmp_path / "run", _tiny_bert(), plain, _Dicts(ids, labels), tmp_path / "plain.sp",
                              projection=projection, options=options, progress=False)  # fmt: skip
    with pytest.raises(AssertionError):
        _matches_posthoc_at_every_step(tmp_path / "run", tmp_path / "cap.sp", unsmoothed)


def test_a_bf16_lightning_trainer_is_told_to_capture_in_bf16(tmp_path: Path, classification_data) -> None:
    """Lightning with ``precision="bf16-mixed"`` and capture's own passes left in fp32: one warning, naming the
    option; with ``precision="bf16"`` none, and the store records bf16."""
    import lightning.pytorch as pl

    from source_proj.integrations import LightningCapture

    Module = _lightning_mlp(lambda params: torch.optim.SGD(params, lr=0.1))

    told = {}
    for precision in ("fp32", "bf16"):
        loader = torch.utils.data.DataLoader(sp.IndexedDataset(classification_data), batch_size=10)
        callback = LightningCapture(tmp_path / f"run-{precision}", tmp_path / f"{precision}.sp",
                                    sp.ClassificationTask(), save_every=2,
                                    projection=sp.ProjectionArguments(dim=16, kind="factored"),
                                    options=sp.CaptureArguments(precision=precision))  # fmt: skip
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", precision="bf16-mixed", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback])  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(Module(), loader)
        told[precision] = [str(w.message) for w in caught if "trains in bf16" in str(w.message)]
    assert told["bf16"] == [] and len(told["fp32"]) == 1 and "precision='bf16'" in told["fp32"][0]
    assert sp.Store.open(tmp_path / "bf16.sp").meta["featurize"]["precision"] == "bf16"
