"""Digits demo, end to end: train with checkpoints → featurize → fit → top-k helpful/harmful.

    python examples/digits/run.py [--out runs/digits] [--queries 5] [--top-k 5]

Prints, for a few test digits, the most helpful and most harmful training digits with their
labels and SOURCE scores, and writes a picture of them (``OUT/topk.png``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits

import source_proj as sp
from source_proj.query.report import topk_figure


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/digits", help="directory for the run, the store and the picture")
    parser.add_argument("--queries", type=_positive, default=5, help="number of test digits to explain")
    parser.add_argument("--top-k", type=_positive, default=5)
    parser.add_argument("--dim", type=_positive, default=1024, help="projection dimension k")
    args = parser.parse_args()
    train_set, test_set = digits.load_split()
    for option, value, limit, what in (
        ("--queries", args.queries, len(test_set), "test digits"),
        ("--top-k", args.top_k, len(train_set), "training digits"),
    ):
        if value > limit:
            parser.error(f"argument {option}: {value} is more than the {limit} {what}; ask for 1 to {limit}")
    try:
        demo(args, train_set, test_set)
    except sp.SourceProjError as err:  # a one-line message, as the source-proj command gives, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def demo(
    args: argparse.Namespace, train_set: torch.utils.data.TensorDataset, test_set: torch.utils.data.TensorDataset
) -> None:
    """Train, attribute and show the top-k of the first ``args.queries`` test digits."""
    torch.set_num_threads(min(4, torch.get_num_threads()))
    out = Path(args.out)
    t0 = time.perf_counter()
    model = digits.train(train_set, run_dir=out / "run")
    acc = (model(test_set.tensors[0]).argmax(1) == test_set.tensors[1]).float().mean()
    print(f"trained MLP on {len(train_set)} digits: test accuracy {acc:.3f} ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    queries = torch.utils.data.Subset(test_set, range(args.queries))
    result = sp.attribute(
        out / "run",
        digits.build_model(),
        digits.build_task(),
        train_set,
        queries,
        out / "digits.sp",
        top_k=args.top_k,
        projection=sp.ProjectionArguments(dim=args.dim),
        options=sp.FeaturizeArguments(batch_size=256),
    )
    print(f"featurize + fit + query: {time.perf_counter() - t0:.1f}s (store: {out / 'digits.sp'})\n")

    labels = train_set.tensors[1].numpy()
    for q in range(args.queries):
        label = int(test_set.tensors[1][q])
        pred = int(model(test_set.tensors[0][q : q + 1]).argmax())
        print(f"query {q}: a test '{label}' (predicted {pred})")
        for kind, ids, scores in (
            ("helpful", result.helpful_ids[q], result.helpful_scores[q]),
            ("harmful", result.harmful_ids[q], result.harmful_scores[q]),
        ):
            cells = "  ".join(f"#{i}:'{labels[i]}' {s:+.2e}" for i, s in zip(ids, scores, strict=True))
            print(f"  {kind:8s} {cells}")
    train_images, test_images = digits.raw_images()
    picture = topk_figure(
        list(test_images[: args.queries]),
        [f"test '{int(y)}'" for y in test_set.tensors[1][: args.queries]],
        lambda i: train_images[i],
        lambda i: f"'{labels[i]}'",
        result,
        out / "topk.png",
    )
    print(f"\npicture of the top-{args.top_k}: {picture}")
    print(
        f"share of helpful examples with the query's label: "
        f"{np.mean(labels[result.helpful_ids] == test_set.tensors[1][: args.queries, None].numpy()):.2f}"
    )


if __name__ == "__main__":
    main()
