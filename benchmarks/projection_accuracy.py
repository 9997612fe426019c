"""How close the factored projection's SOURCE scores are to the dense projection's, on digits.

    python benchmarks/projection_accuracy.py [--dims 256,1024] [--seeds 2] [--reference 2048]

Trains the digits MLP (examples/digits, 26,122 parameters, 8 checkpoints), then featurizes and
fits it with the dense Rademacher and the factored projection at each k and seed, and compares
each score matrix (100 test digits × 1,437 training digits) with a reference: the dense
projection at ``--reference`` (another seed). Columns: Spearman correlation of all scores with the
reference, the mean per-query Spearman, and the mean overlap of the top-10 helpful sets.
(The LDS comparison needs the LDS evaluation of issue 4; re-run it there after the merge.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
import digits

import source_proj as sp


def scores(run: Path, store: Path, train_set, queries, kind: str, dim: int, seed: int) -> np.ndarray:
    sp.featurize(
        run,
        digits.build_model(),
        digits.build_task(),
        train_set,
        store,
        projection=sp.ProjectionArguments(dim=dim, seed=seed, kind=kind),
        options=sp.FeaturizeArguments(batch_size=256),
        progress=False,
    )
    sp.fit(store, progress=False)
    return sp.Attributor(store, digits.build_model(), digits.build_task(), batch_size=256).scores(queries)


def compare(s: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    overall = spearmanr(s.ravel(), ref.ravel())[0]
    per_query = np.mean([spearmanr(a, b)[0] for a, b in zip(s, ref, strict=True)])
    top = np.argsort(-s, axis=1)[:, :10]
    top_ref = np.argsort(-ref, axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, top_ref, strict=True)])
    return float(overall), float(per_query), float(overlap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="256,1024")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--reference", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_set, test_set = digits.load_split()
    queries = torch.utils.data.Subset(test_set, range(100))
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        digits.train(train_set, run_dir=tmp / "run")
        ref = scores(tmp / "run", tmp / "ref.sp", train_set, queries, "rademacher", args.reference, 1000)
        for dim in (int(d) for d in args.dims.split(",")):
            for kind in ("rademacher", "factored"):
                found = [
                    compare(scores(tmp / "run", tmp / f"{kind}{dim}-{s}.sp", train_set, queries, kind, dim, s), ref)
                    for s in range(args.seeds)
                ]
                rows.append((kind, dim, *np.mean(found, axis=0)))
                print(rows[-1], file=sys.stderr)
    print(
        f"# digits MLP, 100 queries × 1,437 training digits; reference: dense Rademacher k={args.reference}; "
        f"mean over {args.seeds} seeds"
    )
    print("| projection | k | Spearman (all scores) | mean per-query Spearman | top-10 overlap |")
    print("|---|---|---|---|---|")
    for kind, dim, overall, per_query, overlap in rows:
        print(f"| {kind} | {dim} | {overall:.3f} | {per_query:.3f} | {overlap:.2f} |")


if __name__ == "__main__":
    main()
