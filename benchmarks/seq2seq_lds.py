"""How well SOURCE and the baselines attribute an encoder–decoder model (BART), trained as seq2seq models are.

A synthetic translation task, fixed before any result: sources of 10 tokens over a vocabulary of 40 (ids 3–39),
translated word by word through a fixed random dictionary, except that a word after an odd source word repeats the
previous word's translation, so the decoder needs the source's context; ``--noise`` of the training pairs get a
random target instead (mistranslations). A BART (2 encoder and 2 decoder layers × 32, 2 heads, no dropout) trained
by AdamW (rate ``--lr``, batches of 16, ``--epochs``) on ``--train`` pairs with the recorder (a checkpoint every half
epoch); queries: ``--queries`` held-out clean pairs, measured by ``Seq2SeqTask``'s summed target-token loss. Ground
truth: ``--subsets`` random halves × ``--repeats`` retrains with the same recipe (a retrain drops the pairs it does
not keep from each batch of the full run's order). Methods: SOURCE (the library's defaults: eigen projection, one
segment), TRAK, TracIn-CP and grad-dot, all fitted in the same store at k = ``--dim``, through the task's default
parameters (the encoder's and decoder's layers' linear layers).

A T5 of the same size was tried first and not kept: its cross-attention carries no position, and it did not learn
the aligned task (query token accuracy at most 0.29 after 3–20 epochs, against BART's 0.59 after 10).

    python benchmarks/seq2seq_lds.py --epochs 4 --out runs/seq2seq-lds-4
    python benchmarks/seq2seq_lds.py --epochs 10 --out runs/seq2seq-lds-10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import source_proj as sp
from source_proj.evaluation.lds import LDSArguments

try:
    from methods_lds import compare_methods, measurements, parse_args, recorded_store, train_kept
except ImportError:  # imported as benchmarks.seq2seq_lds
    from benchmarks.methods_lds import compare_methods, measurements, parse_args, recorded_store, train_kept

VOCAB, LENGTH, BATCH, FIRST = 40, 10, 16, 3


def pairs(count: int, seed: int, noise: float) -> sp.TextDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(FIRST, VOCAB, (count, LENGTH), generator=g)
    words = torch.arange(VOCAB)
    words[FIRST:] = torch.randperm(VOCAB - FIRST, generator=torch.Generator().manual_seed(7)) + FIRST
    y = words[x]  # word by word through a fixed dictionary, but after an odd word its translation again
    y[:, 1:] = torch.where(x[:, :-1] % 2 == 0, y[:, 1:], y[:, :-1])
    wrong = torch.rand(count, generator=g) < noise
    y = torch.where(wrong[:, None], torch.randint(FIRST, VOCAB, (count, LENGTH), generator=g), y)
    return sp.TextDataset(x.tolist(), targets=y.tolist())


def build_model(seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=LENGTH + 2, dropout=0.0,
                                     attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                                     eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
                                     attn_implementation="eager")  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


class Training:
    """The recipe, for the recorded run (``run`` given) and for the retrains (picklable)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.epochs, self.lr = args.epochs, args.lr
        self.train_data = pairs(args.train, 0, args.noise)
        self.queries = pairs(args.queries, 1, 0.0)
        self.task = sp.Seq2SeqTask(tokens_per_sequence=float(LENGTH))

    def train(self, seed: int, keep: np.ndarray | None = None, run: Path | None = None) -> torch.nn.Module:
        model = build_model(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr)
        data = self.train_data
        n = len(data)
        rec = None
        if run is not None:
            rec = sp.TrajectoryRecorder(run, model, opt, save_every=max(1, n // BATCH // 2), overwrite=True)
            rec.begin_stage("main", dataset_size=n)
        train_kept(lambda rows: model(input_ids=data.input_ids[rows], labels=data.labels[rows]).loss, opt, n, BATCH,
                   self.epochs, seed, keep, rec)  # fmt: skip
        return model

    def __call__(self, keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        return measurements(self.task, self.train(seed, keep["main"]).eval(), self.queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/seq2seq-lds-4"))
    args = parse_args(parser)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    training = Training(args)
    store_path, featurizing = recorded_store(args.out, training, build_model, args.dim)
    lds_args = LDSArguments(num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    report = compare_methods(store_path, build_model, training.task, training.queries, training,
                             args.out / "retrains", lds_args)  # fmt: skip
    report["featurize_and_fit_s"] = featurizing + report["fit_s"]
    (args.out / "result.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
