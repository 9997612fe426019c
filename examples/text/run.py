"""Demo: attribute a fine-tuned tiny GPT-2's loss on held-out dataset descriptions to both training stages.

    python examples/text/run.py [--out runs/text] [--dim 512] [--queries 5] [--top-k 5]

Trains (once) the two-stage model of ``lm.py`` with the trajectory recorder, featurizes every
checkpoint (k = ``--dim``), fits SOURCE over both stages, and for the first ``--queries`` held-out
sequences prints the training sequences with the most negative scores (they lowered the query's
loss: removing them would raise it) and the most positive ones, with their stage, and writes the
HTML report OUT/report.html (query tokens shaded by their next-token loss). With ``--per-token``
it also writes OUT/tokens.html: each query's top training sequences with every token shaded by the
share of the score its position carries (``sp.token_scores``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm

import source_proj as sp
from source_proj.query.text_report import ShadedText, text_report, token_report


def prepare(out: Path, dim: int, config: lm.Config = lm.CONFIG) -> Path:
    """Train (unless recorded already), featurize and fit SOURCE on both stages; returns the store."""
    run, store = out / "run", out / "model.sp"
    if not (run / "trajectory.json").exists() or not sp.Trajectory.load(run).complete:
        lm.train(config, seed=0, run_dir=run)
    sp.featurize(
        run,
        lm.build_model(0, config),
        lm.build_task(config),
        lm.corpus(config).train,
        store,
        projection=sp.ProjectionArguments(dim=dim),
        options=sp.FeaturizeArguments(batch_size=32, chunk_rows=128),
        spec=str(Path(lm.__file__).resolve()),
    )
    sp.fit(store)
    return store


def shaded_queries(model: torch.nn.Module, indices: list[int], config: lm.Config = lm.CONFIG) -> list[ShadedText]:
    """Each query's tokens, shaded by the next-token loss the measurement sums (the first token: none)."""
    data, task, tokenizer = lm.corpus(config).queries, lm.build_task(config), lm.corpus(config).tokenizer
    batch = {"input_ids": data.input_ids[indices], "attention_mask": data.attention_mask[indices]}
    with torch.no_grad():
        per_token = task.token_losses(task.forward(model.eval(), batch), batch)
    return [
        ShadedText(tokenizer.decode(batch["input_ids"][q].tolist()), [0.0, *per_token[q].tolist()])
        for q in range(len(indices))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/text")
    parser.add_argument("--dim", type=int, default=512, help="projection dimension k")
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--per-token", action="store_true", help="also write OUT/tokens.html (per-token scores)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(args.out)
    t0 = time.perf_counter()
    store = prepare(out, args.dim)
    task = lm.build_task()
    attributor = sp.Attributor(store, lm.build_model(), task)
    indices = list(range(args.queries))
    queries = torch.utils.data.Subset(lm.query_data(), indices)
    result = attributor.top_k(queries, args.top_k)
    print(f"prepared and scored in {time.perf_counter() - t0:.0f}s\n")
    for q, qi in enumerate(indices):
        print(f"query {qi}: {lm.describe_query(qi)[:110]}")
        for label, ids, vals in (  # by meaning: for a loss the helpful examples have the most negative scores
            ("lowered its loss", result.helpful_ids[q], result.helpful_scores[q]),
            ("raised its loss ", result.harmful_ids[q], result.harmful_scores[q]),
        ):
            for row, score in zip(ids[:3], vals[:3], strict=True):
                stage, index = result.locate(int(row))
                print(f"  {label} {score:+.2e} {stage}[{index}]: {lm.describe(stage, index)[:80]}")
        print()
    trajectory = sp.Trajectory.load(out / "run")
    final = trajectory.load_into(lm.build_model(), trajectory.final_checkpoint)
    shaded = shaded_queries(final, indices)
    path = text_report(
        result,
        shaded,
        lm.describe,
        out / "report.html",
        title="Tiny GPT-2 (docstrings → dataset descriptions): held-out queries",
        query_names=[f"query {i}: summed loss {sum(s.values):.1f}" for i, s in zip(indices, shaded, strict=True)],
        shading="next-token loss",
    )
    print("report:", path)
    if args.per_token:
        rows = sorted({int(r) for r in [*result.helpful_ids[:, :3].ravel(), *result.harmful_ids[:, :3].ravel()]})
        scores = sp.token_scores(attributor, queries, lm.corpus().train, rows)
        tokenizer = lm.corpus().tokenizer
        names = [f"query {i}" for i in indices]
        page = token_report(scores, shaded, lambda t: tokenizer.decode([t])[0], out / "tokens.html",
                            title="Tiny GPT-2: which tokens carry each training sequence's score",
                            query_names=names)  # fmt: skip
        print("per-token report:", page)


if __name__ == "__main__":
    main()
