"""How well SOURCE and the baselines attribute a token classifier (a tag per token, as NER taggers are trained).

A synthetic tagging task, fixed before any result: sentences of 12 tokens over a vocabulary of 47, each token's
tag (of 4) a function of the token and its left neighbour, (x_t + x_{t−1}) mod 4, so the tagger needs context;
``--noise`` of the training tags replaced at random (as annotators err). A BERT token classifier (2 layers × 32,
2 heads, no dropout) trained by AdamW (rate 3e-3, batches of 16, ``--epochs``) on ``--train`` sentences with the
recorder (a checkpoint every half epoch); queries: ``--queries`` held-out sentences with clean tags, measured by
``TokenClassificationTask``'s summed token margins. Ground truth: ``--subsets`` random halves × ``--repeats``
retrains with the same recipe (a retrain drops the examples it does not keep from each batch of the full run's
order). Methods: SOURCE (the library's defaults: eigen projection, one segment), TRAK, TracIn-CP and grad-dot, all
fitted in the same store at k = ``--dim``, through the task's default parameters (the blocks' linear layers and
the head; ``--blocks-only``: without the head, the default before 2026-12-02).

    python benchmarks/token_classification_lds.py --out runs/token-classification-lds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import source_proj as sp
from source_proj.evaluation.lds import LDSArguments

try:
    from methods_lds import compare_methods, measurements, parse_args, recorded_store, selection, train_kept
except ImportError:  # imported as benchmarks.token_classification_lds
    from benchmarks.methods_lds import compare_methods, measurements, parse_args, recorded_store, selection, train_kept

VOCAB, LENGTH, TAGS, BATCH = 48, 12, 4, 16


def sentences(count: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (count, LENGTH), generator=g)
    tags = (ids + torch.roll(ids, 1, dims=1)) % TAGS
    tags[:, 0] = ids[:, 0] % TAGS
    flip = torch.rand(count, LENGTH, generator=g) < noise
    return ids, torch.where(flip, torch.randint(0, TAGS, (count, LENGTH), generator=g), tags)


class Tagged(Dataset):
    def __init__(self, ids: torch.Tensor, tags: torch.Tensor) -> None:
        self.ids, self.tags = ids, tags

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(LENGTH, dtype=torch.long)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.tags[i]}


def build_model(seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=LENGTH, num_labels=TAGS,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.BertForTokenClassification(config)


class Training:
    """The recipe, for the recorded run (``run`` given) and for the retrains (picklable)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.epochs = args.epochs
        self.train_data = Tagged(*sentences(args.train, 0, args.noise))
        self.queries = Tagged(*sentences(args.queries, 1, 0.0))
        self.task = sp.TokenClassificationTask(tokens_per_sequence=float(LENGTH), **selection(args))

    def train(self, seed: int, keep: np.ndarray | None = None, run: Path | None = None) -> torch.nn.Module:
        model = build_model(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        n = len(self.train_data)
        rec = None
        if run is not None:
            rec = sp.TrajectoryRecorder(run, model, opt, save_every=max(1, n // BATCH // 2), overwrite=True)
            rec.begin_stage("main", dataset_size=n)
        data = self.train_data
        train_kept(lambda rows: model(input_ids=data.ids[rows], labels=data.tags[rows]).loss, opt, n, BATCH,
                   self.epochs, seed, keep, rec)  # fmt: skip
        return model

    def __call__(self, keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        return measurements(self.task, self.train(seed, keep["main"]).eval(), self.queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--blocks-only", action="store_true",
                        help="the blocks' linear layers only, without the head (the default before 2026-12-02)")
    parser.add_argument("--averages", nargs="*", default=(), choices=("steps", "checkpoints"),
                        help="SOURCE again with each of these segment averages (FitArguments.average)")
    parser.add_argument("--out", type=Path, default=Path("runs/token-classification-lds"))
    args = parse_args(parser)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    training = Training(args)
    store_path, featurizing = recorded_store(args.out, training, build_model, args.dim)
    lds_args = LDSArguments(num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    report = compare_methods(store_path, build_model, training.task, training.queries, training,
                             args.out / "retrains", lds_args, averages=args.averages)  # fmt: skip
    report["featurize_and_fit_s"] = featurizing + report["fit_s"]
    (args.out / "result.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
