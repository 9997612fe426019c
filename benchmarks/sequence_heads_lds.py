"""How well SOURCE and the baselines attribute a sequence classifier's multi-label or regression head.

A synthetic task, fixed before any result: sentences of 12 tokens over 47 ids. ``--head multi``: 4 labels, label
c on where the sentence holds a token of group c (ids ≡ c mod 4) among its first six (a 0/1 row, sigmoid
cross-entropy); ``--head regression``: the target is the share of the sentence's tokens above 24, minus a half,
plus noise of scale 0.1 (squared error). In both, ``--noise`` of the training sentences get a random target (a
random row, or a uniform number in [−0.5, 0.5]). A BERT classifier (2 layers × 32, 2 heads, no dropout, its
``problem_type`` left unset: the task finds it as the model does) trained by AdamW at 3e-3 (``--optimizer sgd``:
SGD at 0.1 with momentum 0.9), batches of 16,
``--epochs``, a checkpoint every half epoch; ``--queries`` held-out sentences with clean targets, measured by
``SequenceClassificationTask`` (the labels' summed log-odds, or the absolute error). Ground truth: ``--subsets``
random halves × ``--repeats`` retrains; SOURCE (eigen projection, one segment), TRAK, TracIn-CP and grad-dot in
one store at k = ``--dim``, through the task's default parameters (the blocks' linear layers and the head;
``--blocks-only``: without the head, the default before 2026-12-02). ``--damping-factors``: SOURCE again at
these damping factors; ``--averages checkpoints``: SOURCE again with the plain mean of each segment's checkpoints
(the rule before 2026-12-02); ``--ensemble M``: every method also averaged over M models (seeds 0 … M − 1, each
recorded, featurized and fitted into its own store), against the same ground truth.

    python benchmarks/sequence_heads_lds.py --head multi --out runs/multi-label-lds
    python benchmarks/sequence_heads_lds.py --head regression --out runs/regression-lds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import source_proj as sp
from source_proj.evaluation.lds import LDSArguments, lds, lds_ground_truth

try:
    from methods_lds import METHODS, compare_methods, measurements, parse_args, recorded_store, selection, train_kept
except ImportError:  # imported as benchmarks.sequence_heads_lds
    from benchmarks.methods_lds import (
        METHODS,
        compare_methods,
        measurements,
        parse_args,
        recorded_store,
        selection,
        train_kept,
    )

VOCAB, LENGTH, BATCH = 48, 12, 16


def sentences(head: str, count: int, seed: int, noise: float, min_length: int = LENGTH) -> tuple[list, torch.Tensor]:
    """``count`` sentences (token id lists) and their targets. With ``min_length`` below ``LENGTH`` each sentence
    keeps its first L tokens, L drawn from ``min_length`` … ``LENGTH`` after everything else (so the tokens and
    the targets' draws are those of the fixed-length task), and its targets are of those tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (count, LENGTH), generator=g)
    wrong = torch.rand(count, generator=g) < noise
    noise_draw = torch.randn(count, generator=g) if head != "multi" else None
    if head == "multi":
        random = (torch.rand(count, 4, generator=g) < 0.5).float()
    else:
        random = torch.rand(count, generator=g) - 0.5
    lengths = torch.randint(min_length, LENGTH + 1, (count,), generator=g) if min_length < LENGTH else None
    kept = torch.ones_like(ids, dtype=torch.bool) if lengths is None else torch.arange(LENGTH) < lengths[:, None]
    if head == "multi":
        targets = torch.stack([((ids[:, :6] % 4 == c) & kept[:, :6]).any(1) for c in range(4)], 1).float()
    else:
        share = ((ids > 24) & kept).float().sum(1) / kept.sum(1)
        targets = share - 0.5 + 0.1 * noise_draw
    seqs = [row[: int(k.sum())].tolist() for row, k in zip(ids, kept, strict=True)]
    return seqs, torch.where(wrong.view(-1, *[1] * (targets.dim() - 1)), random, targets)


def build_model(head: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=LENGTH,
                                     num_labels=4 if head == "multi" else 1, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.BertForSequenceClassification(config)


class Training:
    """The recipe, for the recorded run (``run`` given) and for the retrains (picklable)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.head, self.epochs, self.optimizer = args.head, args.epochs, args.optimizer
        seqs, targets = sentences(args.head, args.train, 0, args.noise, args.min_length)
        self.train_data = sp.TextDataset(seqs, labels=targets.tolist(), length=LENGTH)
        seqs, targets = sentences(args.head, args.queries, 1, 0.0, args.min_length)
        self.queries = sp.TextDataset(seqs, labels=targets.tolist(), length=LENGTH)
        self.task = sp.SequenceClassificationTask(**selection(args))

    def model(self) -> torch.nn.Module:
        return build_model(self.head)

    def train(self, seed: int, keep: np.ndarray | None = None, run: Path | None = None) -> torch.nn.Module:
        model = build_model(self.head, seed)
        if self.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        n = len(self.train_data)
        rec = None
        if run is not None:
            rec = sp.TrajectoryRecorder(run, model, opt, save_every=max(1, n // BATCH // 2), overwrite=True)
            rec.begin_stage("main", dataset_size=n)
        data, padded = self.train_data, not bool(self.train_data.attention_mask.all())

        def loss(rows: torch.Tensor) -> torch.Tensor:  # a mask only where there is padding: the fixed-length runs
            mask = {"attention_mask": data.attention_mask[rows]} if padded else {}  # stay as they were recorded
            return model(input_ids=data.input_ids[rows], labels=data.labels[rows], **mask).loss

        train_kept(loss, opt, n, BATCH, self.epochs, seed, keep, rec)
        return model

    def __call__(self, keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        return measurements(self.task, self.train(seed, keep["main"]).eval(), self.queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", choices=("multi", "regression"), default="multi")
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--min-length", type=int, default=LENGTH,
                        help="sentences of random lengths from this to 12 tokens, padded to 12 (default: all 12)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--damping-factors", type=float, nargs="*", default=(),
                        help="SOURCE again at each of these damping factors, scored beside the others")
    parser.add_argument("--ensemble", type=int, default=1,
                        help="also score each method averaged over this many models (seeds 0, 1, …)")
    parser.add_argument("--blocks-only", action="store_true",
                        help="the blocks' linear layers only, without the head (the default before 2026-12-02)")
    parser.add_argument("--averages", nargs="*", default=(), choices=("steps", "checkpoints"),
                        help="SOURCE again with each of these segment averages (FitArguments.average)")
    parser.add_argument("--out", type=Path, default=Path("runs/multi-label-lds"))
    args = parse_args(parser)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    training = Training(args)
    store_path, featurizing = recorded_store(args.out, training, training.model, args.dim)
    lds_args = LDSArguments(num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    report = compare_methods(store_path, training.model, training.task, training.queries, training,
                             args.out / "retrains", lds_args, damping_factors=args.damping_factors,
                             averages=args.averages)  # fmt: skip
    report["featurize_and_fit_s"] = featurizing + report["fit_s"]
    if args.ensemble > 1:
        report["ensemble"] = ensemble_lds(args, training, store_path, lds_args)
    (args.out / "result.json").write_text(json.dumps(report, indent=1))


def ensemble_lds(args: argparse.Namespace, training: Training, first: Path, lds_args: LDSArguments) -> dict:
    """Each method averaged over ``--ensemble`` models (the recorded run and runs of seeds 1, 2, …, each
    recorded, featurized and fitted into its own store), scored against the same ground truth."""
    stores = [first]
    for seed in range(1, args.ensemble):
        store, _ = recorded_store(args.out, training, training.model, args.dim, seed, f"run-seed{seed}")
        sp.fit(store, progress=False)
        for kind in METHODS[1:]:
            sp.fit_baseline(store, sp.BaselineArguments(kind=kind), progress=False)
        stores.append(store)
    out = {}
    truth = None
    for method in METHODS:
        ensemble = sp.Ensemble.open(stores, training.model(), training.task, method=method)
        if truth is None:
            truth = lds_ground_truth(training, ensemble.rows, args.out / "retrains", lds_args)
        result = lds(ensemble.scores(training.queries), truth, lds_args)
        out[method] = {"lds": result.mean, "ci": [result.low, result.high]}
        print(f"ensemble of {args.ensemble}, {method}: LDS {result.mean:.3f} [{result.low:.3f}, {result.high:.3f}]")
    return out


if __name__ == "__main__":
    main()
