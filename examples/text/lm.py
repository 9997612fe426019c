"""A tiny GPT-2 pre-trained on Python docstrings, then fine-tuned on scikit-learn's dataset descriptions.

Both stages train from scratch on text that ships with the installed packages (``corpus.py``): a
Hugging Face ``GPT2LMHeadModel`` built from a config (nothing downloaded), AdamW with a linear
warm-up and decay in each stage, Hugging Face's own causal-LM loss, and the trajectory recorder.
Sequences are fixed-length blocks, so the task's per-sequence loss s(z)/n̄ with n̄ = length − 1
averages to exactly the loss the optimiser minimised.

This file is also the experiment *spec* the CLI reads (``--spec examples/text/lm.py``): it defines
``build_model``, ``build_task``, ``train_data(stage)``, ``query_data()``, ``describe(stage, index)``,
``describe_query(index)`` and ``retrain(keep, seed)``, for the run recorded by ``run.py`` in
``runs/text/run``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from corpus import WordTokenizer, blocks, dataset_descriptions, docstrings
from torch import nn

import source_proj as sp

RUN = Path("runs/text/run")
"""Where ``run.py`` records the attributed run (relative to the working directory)."""
STAGES = ("pretrain", "finetune")


@dataclass(frozen=True)
class Config:
    """Sizes and recipe; the defaults are the benchmark's (BENCHMARKS.md), fixed before any result."""

    length: int = 32  # tokens per sequence
    pretrain_size: int = 320  # docstring blocks
    finetune_size: int = 240  # dataset-description blocks
    queries: int = 40  # held-out dataset-description blocks
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    batch_size: int = 16
    pretrain_epochs: int = 8
    pretrain_lr: float = 3e-3
    finetune_epochs: int = 6
    finetune_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of each stage's steps
    checkpoints: int = 6  # saved per stage (the shorter stage decides the spacing)
    tied: bool = True  # the output head shares the token embedding (GPT-2's); False: a head of its own (Llama's)


CONFIG = Config()


@dataclass(frozen=True)
class Corpus:
    """The tokenized sequences of both stages and the queries."""

    tokenizer: WordTokenizer
    train: dict[str, sp.TextDataset]
    queries: sp.TextDataset


@functools.cache
def corpus(config: Config = CONFIG) -> Corpus:
    """Pre-training blocks (a fixed random sample of the docstrings), fine-tuning blocks and held-out queries
    (a fixed random split of the dataset descriptions). The vocabulary comes from the training blocks only."""
    pre = blocks(docstrings(), config.length)
    fine = blocks(dataset_descriptions(), config.length)
    need = config.finetune_size + config.queries
    if len(pre) < config.pretrain_size or len(fine) < need:
        raise ValueError(f"only {len(pre)} docstring and {len(fine)} description blocks of {config.length} tokens")
    pre = [pre[i] for i in np.random.default_rng(0).permutation(len(pre))[: config.pretrain_size]]
    order = np.random.default_rng(1).permutation(len(fine))
    queries = [fine[i] for i in order[: config.queries]]
    fine = [fine[i] for i in order[config.queries : need]]
    tokenizer = WordTokenizer(pre + fine)

    def dataset(part: Sequence) -> sp.TextDataset:
        return sp.TextDataset([tokenizer.encode(b.tokens) for b in part], texts=[b.text for b in part])

    return Corpus(tokenizer, {"pretrain": dataset(pre), "finetune": dataset(fine)}, dataset(queries))


def build_model(seed: int = 0, config: Config = CONFIG) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    vocab = len(corpus(config).tokenizer)
    gpt2 = GPT2Config(
        vocab_size=vocab, n_positions=config.length, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",  # "sdpa" works too; eager featurizes 1.7× faster on CPU (BENCHMARKS.md)
        tie_word_embeddings=config.tied,
    )  # fmt: skip
    model = GPT2LMHeadModel(gpt2)
    model.loss_type = "ForCausalLM"  # the loss transformers falls back to for GPT-2, named so that it does not warn
    return model


def build_task(config: Config = CONFIG) -> sp.LanguageModelingTask:
    return sp.LanguageModelingTask(tokens_per_sequence=config.length - 1)


def train_data(stage: str) -> sp.TextDataset:
    return corpus().train[stage]


def query_data() -> sp.TextDataset:
    return corpus().queries


def describe(stage: str, index: int) -> str:
    return corpus().train[stage].text(index)


def describe_query(index: int) -> str:
    return corpus().queries.text(index)


def train(
    config: Config = CONFIG,
    *,
    seed: int = 0,
    run_dir: str | Path | None = None,
    keep: dict[str, np.ndarray] | None = None,
    pretrained: nn.Module | None = None,
    init: int | None = None,
    capture: Callable[[sp.TrajectoryRecorder], sp.GradientCapture] | None = None,
) -> nn.Module:
    """Pre-train, then fine-tune (only fine-tune when a ``pretrained`` model is given).

    Each stage has a fresh AdamW with a linear warm-up over ``warmup`` of its steps and a linear
    decay to zero; the batches are a shuffle from a generator seeded by ``seed``, and so is the
    initialisation unless ``init`` gives its seed. ``keep`` maps a stage to the examples kept (the
    same shuffle with the others dropped from every batch), for counterfactual retraining. A
    recorded run saves checkpoints evenly and at the stage boundary; ``capture(recorder)``, given with
    ``run_dir``, starts an in-run gradient capture of it (``GradientCapture``), which sees every batch
    and leaves training as it would be without it.
    """
    model = build_model(seed if init is None else init, config) if pretrained is None else pretrained
    data = corpus(config).train
    stages = [s for s in STAGES if pretrained is None or s == "finetune"]
    gen = torch.Generator().manual_seed(seed)
    recorder = None
    if run_dir is not None:
        every = min(max(1, _steps(config, s) // config.checkpoints) for s in stages)
        recorder = sp.TrajectoryRecorder(run_dir, model, torch.optim.AdamW(model.parameters()), save_every=every,
                                         overwrite=True)  # fmt: skip
    captured = capture(recorder) if capture is not None and recorder is not None else None
    for stage in stages:
        lr, epochs = (
            (config.pretrain_lr, config.pretrain_epochs) if stage == "pretrain"
            else (config.finetune_lr, config.finetune_epochs)
        )  # fmt: skip
        steps = _steps(config, stage)
        warmup = max(1, round(config.warmup * steps))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t, w=warmup, n=steps: (t + 1) / w if t < w else max(0.0, (n - t) / (n - w))
        )
        ids, mask = data[stage].input_ids, data[stage].attention_mask
        kept = torch.ones(len(ids), dtype=torch.bool)
        if keep is not None and stage in keep:
            kept[:] = False
            kept[torch.as_tensor(keep[stage], dtype=torch.long)] = True
        if recorder is not None:
            recorder.begin_stage(stage, dataset_size=len(ids), optimizer=opt)
        model.train()
        per_epoch = math.ceil(len(ids) / config.batch_size)
        for _ in range(epochs):
            order = torch.randperm(len(ids), generator=gen)
            for b in range(per_epoch):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                idx = idx[kept[idx]]
                if len(idx) > 0:
                    batch = {"input_ids": ids[idx], "attention_mask": mask[idx]}
                    with captured.batch(batch, indices=idx) if captured else contextlib.nullcontext():
                        loss = model(**batch, labels=batch["input_ids"]).loss
                        opt.zero_grad()
                        loss.backward()
                    opt.step()
                    if recorder is not None:
                        recorder.step()
                schedule.step()
    if recorder is not None:
        recorder.close()
    return model.eval()


def _steps(config: Config, stage: str) -> int:
    size, epochs = (
        (config.pretrain_size, config.pretrain_epochs) if stage == "pretrain"
        else (config.finetune_size, config.finetune_epochs)
    )  # fmt: skip
    return math.ceil(size / config.batch_size) * epochs


def losses(model: nn.Module, data: sp.TextDataset, config: Config = CONFIG) -> np.ndarray:
    """The task's measurement of every example: its summed next-token loss, float ``[N]``."""
    task = build_task(config)
    batch = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
    with torch.no_grad():
        return task.measurement(task.forward(model.eval(), batch), batch).numpy()


def pretrained_model(run: str | Path = RUN, config: Config = CONFIG) -> nn.Module:
    """The recorded run's model at the end of pre-training."""
    trajectory = sp.Trajectory.load(run)
    end = trajectory.stage("pretrain").end_step
    checkpoint = next(c for c in trajectory.checkpoints if c.step == end)
    return trajectory.load_into(build_model(0, config), checkpoint)


@dataclass(frozen=True)
class Retrain:
    """``retrain(keep, seed)`` for the evaluation: the query losses after training on the kept examples.

    Attributing the pre-training stage retrains both stages from scratch: initialisation and shuffles
    seeded by ``seed``, or with ``fixed_init`` the recorded run's initialisation (seed 0) and seeded
    shuffles. Attributing the fine-tuning stage alone keeps the recorded run's pre-trained model, as a
    fine-tuning pipeline does, and re-runs fine-tuning with fresh shuffles.
    """

    run: str = str(RUN)
    config: Config = CONFIG
    fixed_init: bool = False

    def __call__(self, keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        pretrained = None if "pretrain" in keep else pretrained_model(self.run, self.config)
        init = 0 if self.fixed_init else None
        model = train(self.config, seed=seed, keep=keep, pretrained=pretrained, init=init)
        return losses(model, corpus(self.config).queries, self.config)


def retrain(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """Spec hook for `source-proj lds/compare` (see :class:`Retrain`)."""
    return Retrain()(keep, seed)
