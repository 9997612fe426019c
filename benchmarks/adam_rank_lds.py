"""LDS of SOURCE on the text example's AdamW fine-tuning stage: Adam's exact D^{-1/2} (dense projection) against
its rank-R form on the factored projection.

    python benchmarks/adam_rank_lds.py [--dim 512] [--ranks 1,4] [--subsets 50] [--repeats 4] [--threads 2]
        [--out runs/adam-rank]

The tiny GPT-2 of ``examples/text/lm.py`` (two AdamW stages, recorded), the fine-tuned model's loss on its
40 held-out descriptions attributed to the fine-tuning sequences, and the ``finetune`` ground truth of
``examples/text/lds.py`` (the recorded pre-trained model fine-tuned again on random halves, α = 0.5;
retrains cached in OUT/finetune/retrains, shared by every store). One store per setting, the same k:
``rademacher`` (D^{-1/2} applied exactly to materialised gradients, today's default), ``factored-exact``
(rank min(d_out, d_in + 1) on every layer: exact too, a check of the factored path itself) and
``factored-rR`` for each R of ``--ranks``, and ``eigen`` (each layer's Kronecker eigenbasis, rank 1).
Prints a Markdown table (LDS with 95 % bootstrap interval,
featurize seconds) and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "text"))
import lm  # noqa: E402

import source_proj as sp  # noqa: E402
from source_proj import evaluation as ev  # noqa: E402


def store_for(out: Path, name: str, projection: sp.ProjectionArguments) -> tuple[Path, float]:
    """Featurize the recorded run with ``projection`` and fit SOURCE on the fine-tuning stage."""
    store = out / f"{name}.sp"
    start = time.perf_counter()
    sp.featurize(out / "run", lm.build_model(), lm.build_task(), lm.corpus().train, store, projection=projection,
                 options=sp.FeaturizeArguments(batch_size=32, chunk_rows=128), progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    methods = sp.Store.open(store).meta.get("methods") or {}
    if not methods.get("source-finetune", {}).get("complete"):
        sp.fit(store, sp.FitArguments(stages=("finetune",), method="source-finetune"), progress=False)
    return store, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ranks", default="1,4")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/adam-rank"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is fastest on a busy CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out
    if not (out / "run" / "trajectory.json").exists() or not sp.Trajectory.load(out / "run").complete:
        lm.train(seed=0, run_dir=out / "run")
    settings = {"rademacher": sp.ProjectionArguments(dim=args.dim),
                "factored-exact": sp.ProjectionArguments(dim=args.dim, kind="factored", adam_rank=10**6)}  # fmt: skip
    for rank in (int(r) for r in args.ranks.split(",")):
        settings[f"factored-r{rank}"] = sp.ProjectionArguments(dim=args.dim, kind="factored", adam_rank=rank)
    settings["eigen"] = sp.ProjectionArguments(dim=args.dim, kind="eigen")
    scores, seconds, rows = {}, {}, None
    queries = lm.query_data()
    for name, projection in settings.items():
        store, seconds[name] = store_for(out, name, projection)
        attributor = sp.Attributor(store, lm.build_model(), lm.build_task(), method="source-finetune")
        scores[name], rows = attributor.scores(queries), attributor.rows
    assert rows is not None
    lds_args = ev.LDSArguments(alpha=0.5, num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    truth = ev.lds_ground_truth(lm.Retrain(str(out / "run"), fixed_init=False), rows, out / "finetune" / "retrains",
                                lds_args)  # fmt: skip
    table = ev.compare(scores, [truth])
    lines = [f"k = {args.dim}, M = {args.subsets}, R = {args.repeats}, {len(queries)} queries", "",
             "| projection | Adam's D^{-1/2} | LDS [95 % CI] | featurize s |", "|---|---|---|---|"]  # fmt: skip
    for name, (result, *_) in table.items():
        how = "exact (materialised)" if name == "rademacher" else "rank 1 per layer" if name == "eigen" \
            else "exact (every layer's full rank)" if "exact" in name \
            else f"rank {name.rsplit('r', 1)[1]} per layer"  # fmt: skip
        lines.append(f"| {name.split('-')[0]} | {how} | {result.mean:.3f} [{result.low:.3f}, {result.high:.3f}] | "
                     f"{seconds[name]:.1f} |")  # fmt: skip
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps(
        {n: {"lds": r[0].mean, "low": r[0].low, "high": r[0].high, "featurize_s": seconds[n]}
         for n, r in table.items()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
