"""The eigen basis on padded sequences: faithfulness against exact gradients, and whether padding moves it.

    python benchmarks/padded_basis.py [--models gpt2,bert] [--dim 512] [--json runs/padded-basis.json]

Sequences of the standard library's sources (word-level, vocabulary 4,096) of random lengths from 16 to 128
tokens, right-padded to 128 (``sp.TextDataset``): 1,024 for training, each model trained one epoch by AdamW
(lr 1e-3, batches of 32) under ``TrajectoryRecorder``:

- ``gpt2``: a GPT-2 language model, 4 layers × 128, ``LanguageModelingTask`` (every real token but the last
  predicts the next);
- ``bert``: a BERT classifier, 4 layers × 128, ``SequenceClassificationTask`` (bidirectional), labelled by whether
  the sequence holds more of the most frequent token than of the second; its head reads the first token only.

For each, the exact per-example loss gradients of 64 training sequences (materialised, float64) give the exact
inner products of every pair; the eigen projection at k = ``--dim``, its basis estimated at the final checkpoint
(the library's defaults: 64 sampled positions a sequence, the budget of 2,048 a layer), gives the projected ones.
Printed: Spearman over all pairs, the share of the Fisher trace the basis keeps, and the largest difference
between the features of the sequences padded to 128 and padded to 160 (``--pad-to``), relative to their scale.
Run it at two revisions of the library to compare them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from basis_size import spearman
from transformer_cpu import stdlib_tokens

import source_proj as sp
from source_proj.featurize.basis import BasisPass, estimate_basis
from source_proj.projection.factory import make_projector
from source_proj.tasks.gradients import PerExampleGradients
from source_proj.tasks.text import mean_predicted_tokens

VOCAB, LENGTH = 4096, 128


def sequences(count: int, seed: int) -> list[list[int]]:
    tokens = stdlib_tokens(count * LENGTH, VOCAB).tolist()
    lengths = np.random.default_rng(seed).integers(16, LENGTH + 1, count)
    starts = np.arange(count) * LENGTH
    return [tokens[s : s + n] for s, n in zip(starts, lengths, strict=True)]


def build(kind: str, positions: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=positions, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=512, max_position_embeddings=positions, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def dataset(kind: str, seqs: list[list[int]], length: int) -> sp.TextDataset:
    if kind == "gpt2":
        return sp.TextDataset(seqs, length=length)
    labels = [int(s.count(1) > s.count(2)) for s in seqs]  # the two most frequent tokens
    return sp.TextDataset(seqs, labels=labels, length=length)


def task_of(kind: str, data: sp.TextDataset) -> sp.Task:
    if kind == "gpt2":
        return sp.LanguageModelingTask(tokens_per_sequence=mean_predicted_tokens(data))
    return sp.SequenceClassificationTask(attention="bidirectional")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,bert")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--pairs-of", type=int, default=64)
    parser.add_argument("--pad-to", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seqs = sequences(1024, 0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            data = dataset(kind, seqs, LENGTH)
            task = task_of(kind, data)
            model = build(kind, args.pad_to)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            recorder = sp.TrajectoryRecorder(Path(tmp) / kind, model, optimizer, save_every=16, overwrite=True)
            recorder.begin_stage("main", dataset_size=len(data))
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1)).tolist()
            for start in range(0, len(order), 32):
                rows = [data[i] for i in order[start : start + 32]]
                batch = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
                loss = task.loss(task.forward(model, batch), batch).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                recorder.step()
            recorder.close()
            model.eval()
            trajectory = sp.Trajectory.load(Path(tmp) / kind)
            names = task.select_parameters(model)
            params = dict(model.named_parameters())
            grads_fn = PerExampleGradients(model, task, names)
            features = {}
            for length in (LENGTH, args.pad_to):
                padded = dataset(kind, seqs, length)
                few = {key: torch.stack([padded[i][key] for i in range(args.pairs_of)]) for key in padded[0]}
                pass_ = BasisPass.of(sp.ProjectionArguments(dim=args.dim), grads_fn, task, {"main": padded}, names,
                                     batch_size=32, device=torch.device("cpu"))  # fmt: skip
                basis = estimate_basis(trajectory, [trajectory.final_checkpoint], pass_)
                model.eval()
                projector = make_projector("eigen", [(n, tuple(params[n].shape)) for n in names], args.dim, 0,
                                           model=model, basis=basis)  # fmt: skip
                features[length] = projector.project_batch(grads_fn, few).double()
                if length == LENGTH:
                    exact = grads_fn(few)
                    flat = torch.cat([exact[n].reshape(args.pairs_of, -1).double() for n in names], 1)
                    truth = (flat @ flat.T).numpy()
                    got = features[length]
                    row = {"spearman": spearman((got @ got.T).numpy(), truth), "captured": basis.captured}
            scale = float(features[LENGTH].abs().max())
            row["padding_moves"] = float((features[args.pad_to] - features[LENGTH]).abs().max()) / scale
            results[kind] = row
            print(f"{kind}: Spearman {row['spearman']:.4f}, Fisher trace kept {row['captured']:.3f}, padded to "
                  f"{args.pad_to} the features move by {row['padding_moves']:.2e} of their scale", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
