"""How far apart are a mean and a summed training loss in featurize's loss-scale check (``featurize/loss_scale.py``)?

For each setting a small run is recorded with ``TrajectoryRecorder`` and, at every checkpoint the recorder kept the
step's gradient norms for, the ratio r = ‖recorded gradient‖² / mean_i ‖task's per-example gradient‖² is printed (the
check reads the first ``CHECKED`` of them per stage and warns where their median exceeds ``BOUND``). Under the batch
mean of the task's loss E[r] ≤ 1; under the sum over B examples E[r] ≥ B.

Settings, fixed before any result: sklearn's digits (1,437 training images), the ReLU MLP 64-128-128-10 (with a
dropout layer of p = 0.5 after each hidden layer where named), SGD momentum 0.9, weight decay 1e-3, learning rate
0.03 for the mean (0.03/B for the sum, the same steps), 3 epochs, a checkpoint every half epoch; clipping at
``clip_grad_norm_(…, 1.0)``, label smoothing 0.1 (the task smooths alike) where named. "aligned": examples whose
gradients agree (squared error towards y ≈ 5 from positive inputs, 128 examples, a 6-32-1 ReLU network, dropout
where named, SGD 1e-3, 12 steps), where the mean's r comes closest to its bound of 1. The language model: a 2-layer
GPT-2 (embedding 16, vocabulary 32) on 512 sequences of 4 to 16 tokens from a fixed random bigram table, padded,
batches of 16, AdamW 1e-3, 3 epochs, GPT-2's default dropout of 0.1, the loss Hugging Face's mean over every
predicted token of the batch (the sum: times the batch's predicted tokens), the task
``LanguageModelingTask(tokens_per_sequence=mean_predicted_tokens(data))``.

    python benchmarks/loss_scale_ratios.py --out runs/loss-scale
    python benchmarks/loss_scale_ratios.py --out runs/loss-scale --featurize-rounds 3       # featurize's time
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import source_proj as sp
from source_proj.featurize import featurize as featurize_module
from source_proj.featurize import loss_scale
from source_proj.tasks.text import mean_predicted_tokens
from source_proj.trajectory.recorder import Trajectory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
from digits import load_split


def mlp(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), *drop, nn.Linear(128, 128), nn.ReLU(), *drop,
                         nn.Linear(128, 10))  # fmt: skip


def digits_run(run: Path, *, batch: int, summed: bool, dropout: float = 0.0, clip: float | None = None,
               smoothing: float = 0.0, epochs: int = 3) -> tuple[nn.Module, TensorDataset, sp.Task]:  # fmt: skip
    data = load_split()[0]
    model = mlp(dropout)
    lr = 0.03 / batch if summed else 0.03
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3 * (batch if summed else 1))
    steps = math.ceil(len(data) / batch)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=max(1, steps // 2), overwrite=True)
    rec.begin_stage("main", dataset_size=len(data), label_smoothing=smoothing)
    shuffle = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=batch, shuffle=True, generator=shuffle):
            loss = F.cross_entropy(model(x), y, label_smoothing=smoothing, reduction="sum" if summed else "mean")
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            rec.step()
    rec.close()
    return mlp(dropout), data, sp.ClassificationTask(label_smoothing=smoothing)


def aligned_run(run: Path, *, batch: int, summed: bool, dropout: float) -> tuple[nn.Module, TensorDataset, sp.Task]:
    """Examples whose gradients agree: squared error towards y ≈ 5 from positive inputs (128 examples), 12 steps."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(128, 6, generator=g) + 1, 5 + 0.1 * torch.randn(128, generator=g)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 1))

    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3 / batch if summed else 1e-3)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=4, overwrite=True)
    rec.begin_stage("main", dataset_size=len(y))
    for step in range(12):
        rows = slice((batch * step) % len(y), (batch * step) % len(y) + batch)
        opt.zero_grad()
        F.mse_loss(model(x[rows]).squeeze(-1), y[rows], reduction="sum" if summed else "mean").backward()
        opt.step()
        rec.step()
    rec.close()
    return build(), TensorDataset(x, y), sp.RegressionTask()


def lm_run(
    run: Path, *, batch: int = 16, epochs: int = 3, summed: bool = False
) -> tuple[nn.Module, torch.utils.data.Dataset, sp.Task]:
    import transformers

    g = torch.Generator().manual_seed(0)
    table = torch.softmax(3 * torch.randn(32, 32, generator=g), 1)
    sequences = []
    for _ in range(512):
        length = int(torch.randint(4, 17, (1,), generator=g))
        seq = [int(torch.randint(1, 32, (1,), generator=g))]
        for _ in range(length - 1):
            seq.append(int(torch.multinomial(table[seq[-1]], 1, generator=g)))
        sequences.append(seq)
    data = sp.TextDataset(sequences, length=16)

    def build() -> nn.Module:
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
        return transformers.GPT2LMHeadModel(config)

    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=len(data) // batch // 2, overwrite=True)
    rec.begin_stage("main", dataset_size=len(data))
    shuffle = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for b in DataLoader(data, batch_size=batch, shuffle=True, generator=shuffle):
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
            opt.zero_grad()
            (loss * int(labels[:, 1:].ne(-100).sum()) if summed else loss).backward()  # summed: over every token
            opt.step()
            rec.step()
    rec.close()
    return build(), data, sp.LanguageModelingTask(tokens_per_sequence=mean_predicted_tokens(data))


SETTINGS = {
    "mean, B=64": lambda run: digits_run(run, batch=64, summed=False),
    "mean, B=8": lambda run: digits_run(run, batch=8, summed=False, epochs=1),
    "mean, B=64, dropout 0.5": lambda run: digits_run(run, batch=64, summed=False, dropout=0.5),
    "mean, B=8, dropout 0.5": lambda run: digits_run(run, batch=8, summed=False, dropout=0.5, epochs=1),
    "mean, B=64, clip 1.0": lambda run: digits_run(run, batch=64, summed=False, clip=1.0),
    "mean, B=64, smoothing 0.1": lambda run: digits_run(run, batch=64, summed=False, smoothing=0.1),
    "mean, B=64, 20 epochs": lambda run: digits_run(run, batch=64, summed=False, epochs=20),
    "aligned, mean, B=8": lambda run: aligned_run(run, batch=8, summed=False, dropout=0.0),
    "aligned, mean, B=8, dropout 0.9": lambda run: aligned_run(run, batch=8, summed=False, dropout=0.9),
    "LM token mean, B=16, AdamW": lm_run,
    "sum, B=8": lambda run: digits_run(run, batch=8, summed=True, epochs=1),
    "sum, B=64": lambda run: digits_run(run, batch=64, summed=True),
    "sum, B=64, dropout 0.5": lambda run: digits_run(run, batch=64, summed=True, dropout=0.5),
    "aligned, sum, B=8, dropout 0.9": lambda run: aligned_run(run, batch=8, summed=True, dropout=0.9),
    "LM token sum, B=16, AdamW": lambda run: lm_run(run, summed=True),
}


def time_featurize(out: Path, rounds: int) -> None:
    """Featurize of the "mean, B=64" run (7 checkpoints, library defaults) with and without the check, interleaved."""
    run = out / "mean-B64"
    model, data, task = digits_run(run, batch=64, summed=False)
    own = featurize_module._Featurize._warn_loss_scale
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for checked in (True, False):
            featurize_module._Featurize._warn_loss_scale = own if checked else (lambda self: None)
            shutil.rmtree(out / "timed.sp", ignore_errors=True)
            started = time.perf_counter()
            sp.featurize(run, model, task, data, out / "timed.sp", progress=False)
            times[checked].append(time.perf_counter() - started)
    featurize_module._Featurize._warn_loss_scale = own
    for checked, each in times.items():
        print(f"featurize {'with' if checked else 'without'} the check: median {statistics.median(each):.1f} s "
              f"({' '.join(f'{t:.1f}' for t in each)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/loss-scale"))
    parser.add_argument("--featurize-rounds", type=int, default=0,
                        help="instead: time featurize with and without the check, this many interleaved rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.featurize_rounds:
        time_featurize(args.out, args.featurize_rounds)
        return
    loss_scale_checked, loss_scale.CHECKED = loss_scale.CHECKED, 1000  # every checkpoint: how r moves along the run
    for name, make in SETTINGS.items():
        started = time.perf_counter()
        run = args.out / name.replace(" ", "").replace(",", "-").replace("=", "")
        shutil.rmtree(run, ignore_errors=True)
        model, data, task = make(run)
        trajectory = Trajectory.load(run)
        names = task.select_parameters(model)
        loss_scale.CHECKED, checking = loss_scale_checked, time.perf_counter()  # what featurize runs: its cost
        loss_scale.loss_scale_ratios(trajectory, model, task, names, {"main": data}, torch.device("cpu"))
        checked, loss_scale.CHECKED = time.perf_counter() - checking, 1000
        found = loss_scale.loss_scale_ratios(trajectory, model, task, names, {"main": data}, torch.device("cpu"))
        steps = [s for s, _, _ in found["main"]]
        ratios = [r for _, _, r in found["main"]]
        warned = loss_scale.loss_scale_warning({"main": found["main"][: loss_scale_checked]}) is not None
        evaluated = loss_scale.loss_scale_ratios(trajectory, model, task, names, {"main": data}, torch.device("cpu"),
                                                 training=False)["main"]  # fmt: skip
        print(f"{name:31s} median of the first 3: {statistics.median(ratios[:3]):8.3g} (eval-mode reference: "
              f"{statistics.median(r for _, _, r in evaluated[:3]):.3g})  warned: {warned!s:5s}  "
              f"r at steps {steps}: {' '.join(f'{r:.3g}' for r in ratios)}  (the check {checked:.2f} s; all "
              f"{time.perf_counter() - started:.0f} s)",
              flush=True)

if __name__ == "__main__":
    main()
