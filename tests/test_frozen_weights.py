"""Runs whose most weights are frozen (a LoRA fine-tune): ``weights="trainable"`` saves the trained weights only,
digests the frozen rest once, and featurize and resume check the model they are given holds it. The store is the
one a run saving every weight gives."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp


def _model(seed: int = 0) -> nn.Module:
    """A 4-16-16-3 MLP whose first layer is frozen (``seed`` draws its weights)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    model[0].requires_grad_(False)
    return model


def _train(run: Path, data: TensorDataset, weights: str, *, steps: int = 12, stop: int | None = None,
           resume: bool = False, model: nn.Module | None = None) -> nn.Module:  # fmt: skip
    x, y = data.tensors
    model = model if model is not None else _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    if resume:
        rec = sp.TrajectoryRecorder.resume(run, model, opt, save_every=4)
    else:
        rec = sp.TrajectoryRecorder(run, model, opt, save_every=4, weights=weights)  # type: ignore[arg-type]
        rec.begin_stage("main", dataset_size=len(y))
    for step in range(rec.global_step, steps):
        rows = torch.arange(step * 10, step * 10 + 10) % len(y)
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        rec.step()
        if stop is not None and rec.global_step == stop:
            return model  # killed after the checkpoint at `stop`
    rec.close()
    return model


def _store(run: Path, path: Path, data: TensorDataset, model: nn.Module | None = None) -> sp.Store:
    return sp.featurize(run, model if model is not None else _model(), sp.ClassificationTask(), data, path,
                        projection=sp.ProjectionArguments(dim=16, kind="rademacher"), progress=False)  # fmt: skip


def test_trainable_weights_save_the_adapters_only_and_give_the_store_of_every_weight(
    tmp_path: Path, classification_data
) -> None:
    _train(tmp_path / "all", classification_data, "all")
    _train(tmp_path / "trainable", classification_data, "trainable")
    trajectory = sp.Trajectory.load(tmp_path / "trainable")
    saved = trajectory.load_state(trajectory.final_checkpoint)["model"]
    assert set(saved) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    assert trajectory.frozen is not None and trajectory.frozen["tensors"] == 2 and trajectory.frozen["numel"] == 80
    assert sp.Trajectory.load(tmp_path / "all").frozen is None
    full = _store(tmp_path / "all", tmp_path / "all.sp", classification_data)
    lean = _store(tmp_path / "trainable", tmp_path / "trainable.sp", classification_data)
    for name in full.progress_arrays():
        if name.startswith(("grads/", "fisher/")):
            assert np.array_equal(full.read(name), lean.read(name)), name
    sp.fit(lean.path, progress=False)
    queries = TensorDataset(*(t[:4] for t in classification_data.tensors))
    assert np.isfinite(sp.Attributor(lean.path, _model(), sp.ClassificationTask()).scores(queries)).all()
    # A model whose frozen layer is not the run's is refused, in featurize and in queries alike.
    with pytest.raises(sp.TrajectoryError, match=r"recorded with weights='trainable'.*same base weights"):
        _store(tmp_path / "trainable", tmp_path / "other.sp", classification_data, _model(seed=1))
    with pytest.raises(sp.TrajectoryError, match="recorded with weights='trainable'"):
        sp.Attributor(lean.path, _model(seed=1), sp.ClassificationTask()).scores(queries)
    fingerprints = {name: sp.Trajectory.load(tmp_path / name).fingerprint() for name in ("all", "trainable")}
    assert fingerprints["all"] != fingerprints["trainable"]


def test_the_frozen_digest_takes_values_whatever_the_precision_that_holds_them() -> None:
    from source_proj.trajectory.recorder import frozen_digest

    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).bfloat16()
    steps = torch.arange(5)
    digest = frozen_digest({"w": weight, "s": steps}, ["w", "s"])
    assert frozen_digest({"w": weight.float(), "s": steps}, ["w", "s"]) == digest  # loaded in fp32: the same
    assert frozen_digest({"w": weight.float() * 1.001, "s": steps}, ["w", "s"]) != digest
    assert frozen_digest({"w": weight.half(), "s": steps}, ["w", "s"]) == digest  # fp16 holds these bf16 values
    assert frozen_digest({"w": weight, "s": steps.int()}, ["w", "s"]) != digest


def test_a_frozen_weight_that_moves_is_refused_and_a_killed_run_resumes_with_its_frozen_weights(
    tmp_path: Path, classification_data
) -> None:
    x, y = classification_data.tensors
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    rec = sp.TrajectoryRecorder(tmp_path / "moved", model, opt, save_every=2, weights="trainable")
    rec.begin_stage("main", dataset_size=len(y))
    with torch.no_grad():
        model[0].weight.add_(0.1)  # trained by something the recorder does not see
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    rec.step()
    opt.step()
    with pytest.raises(sp.TrajectoryError, match=r"did not require grad when the recorder started .* has changed"):
        rec.step()
    # Killed after its checkpoint at step 8, resumed: the run of the uninterrupted one.
    _train(tmp_path / "whole", classification_data, "trainable")
    _train(tmp_path / "killed", classification_data, "trainable", stop=8)
    with pytest.raises(sp.TrajectoryError, match=r"frozen weights .* are not those it was recorded with"):
        _train(tmp_path / "killed", classification_data, "trainable", resume=True, model=_model(seed=1))
    _train(tmp_path / "killed", classification_data, "trainable", resume=True)
    assert sp.Trajectory.load(tmp_path / "killed").fingerprint() == sp.Trajectory.load(tmp_path / "whole").fingerprint()
    # A malformed "frozen" entry is the file's fault, said so.
    index = json.loads((tmp_path / "whole" / "trajectory.json").read_text())
    index["frozen"]["tensors"] = 0
    (tmp_path / "whole" / "trajectory.json").write_text(json.dumps(index))
    with pytest.raises(sp.TrajectoryError, match="'frozen' must hold the sha256, tensors and numel"):
        sp.Trajectory.load(tmp_path / "whole")


def test_a_lora_fine_tune_by_the_trainer_saves_its_adapters_and_is_attributed(tmp_path: Path) -> None:
    """A LoRA fine-tune of a GPT-2 by the Hugging Face Trainer (peft): the recorder saves the adapters only (its
    default for a peft model), and featurize attributes through them on the model rebuilt from the same base."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceRecorder
    from source_proj.tasks.text import mean_predicted_tokens

    def build() -> nn.Module:
        torch.manual_seed(0)
        base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32,
                                                                     n_layer=2, n_head=2, bos_token_id=0,
                                                                     eos_token_id=0))  # fmt: skip
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                                 fan_in_fan_out=True)  # fmt: skip
        return peft.get_peft_model(base, config)

    ids = torch.randint(0, 64, (24, 12), generator=torch.Generator().manual_seed(0))
    data = sp.TextDataset(ids.tolist())

    class Labelled(torch.utils.data.Dataset):  # the Trainer's causal-LM loss predicts the sequence itself
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {**data[i], "labels": data[i]["input_ids"]}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=2,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             logging_strategy="no", seed=0)  # fmt: skip
    model = build()
    Trainer(model=model, args=args, train_dataset=Labelled(),
            callbacks=[HuggingFaceRecorder(tmp_path / "run", save_every=3)]).train()  # weights="auto"  # fmt: skip
    trajectory = sp.Trajectory.load(tmp_path / "run")
    saved = trajectory.load_state(trajectory.final_checkpoint)["model"]
    assert saved and all("lora_" in name for name in saved)
    assert trajectory.frozen is not None and trajectory.frozen["numel"] > 10 * sum(t.numel() for t in saved.values())
    task = sp.LanguageModelingTask(tokens_per_sequence=mean_predicted_tokens(data))
    names = task.select_parameters(build())
    assert names and all("lora_" in name for name in names)
    store = sp.featurize(tmp_path / "run", build(), task, data, tmp_path / "lora.sp",
                         projection=sp.ProjectionArguments(dim=32), progress=False)  # fmt: skip
    sp.fit(store.path, progress=False)
    scores = sp.Attributor(store.path, build(), task).scores(torch.utils.data.Subset(data, [0, 1]))
    assert scores.shape == (2, 24) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    # The trained model's weights, the adapters from the final checkpoint on the rebuilt base, are the Trainer's.
    rebuilt = trajectory.load_into(build(), trajectory.final_checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values(),
                                                   strict=True))  # fmt: skip


def test_a_mostly_frozen_large_model_saved_whole_is_advised_to_save_its_trained_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from source_proj.trajectory import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "_FROZEN_BULK", 1000)  # bytes: this MLP stands in for a 7B model
    model = _model()
    model[2].requires_grad_(False)  # 352 of 403 weights frozen: 1,408 bytes
    for weights, advised in (("all", 1), ("trainable", 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sp.TrajectoryRecorder(tmp_path / weights, model, torch.optim.SGD(model[4].parameters(), lr=0.1),
                                  save_every=2, weights=weights)  # type: ignore[arg-type]  # fmt: skip
        said = [str(w.message) for w in caught if "pass weights='trainable'" in str(w.message)]
        assert len(said) == advised
        assert not advised or said[0].startswith("87% of the model's weights (0.0 GiB) do not require grad")


def test_the_lightning_callback_saves_the_trained_weights_when_told(tmp_path: Path, classification_data) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from source_proj.integrations import LightningRecorder

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, _):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    loader = torch.utils.data.DataLoader(classification_data, batch_size=10)
    recorder = LightningRecorder(tmp_path / "run", save_every=1, weights="trainable")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])  # fmt: skip
    trainer.fit(Module(), loader)
    trajectory = sp.Trajectory.load(tmp_path / "run")
    assert set(trajectory.load_state(trajectory.final_checkpoint)["model"]) == {
        "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"
    }
    store = sp.featurize(tmp_path / "run", Module(), sp.ClassificationTask(), classification_data, tmp_path / "s.sp",
                         projection=sp.ProjectionArguments(dim=16, kind="rademacher"), progress=False)  # fmt: skip
    assert np.abs(store.read(f"grads/main/step-{trajectory.final_checkpoint.step:08d}")).max() > 0
