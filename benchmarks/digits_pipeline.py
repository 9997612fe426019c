"""Time each step of the digits pipeline on this machine and print a table.

    python benchmarks/digits_pipeline.py [--dims 256,1024] [--threads 2]

Steps: training with the recorder (460 SGD steps, 8 checkpoints), featurize (1437 examples × 8
checkpoints, gradients + sampled-label Fisher), fit (3 segments), query (360 test digits, top-10).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
import digits

import source_proj as sp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="256,1024")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_set, test_set = digits.load_split()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        digits.train(train_set, run_dir=Path(tmp) / "run")
        train_s = time.perf_counter() - t0
        for dim in (int(d) for d in args.dims.split(",")):
            store_path = Path(tmp) / f"s{dim}.sp"
            t0 = time.perf_counter()
            sp.featurize(Path(tmp) / "run", digits.build_model(), digits.build_task(), train_set, store_path,
                         projection=sp.ProjectionArguments(dim=dim), options=sp.FeaturizeArguments(batch_size=256),
                         progress=False)
            featurize_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            sp.fit(store_path, progress=False)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            sp.Attributor(store_path, digits.build_model(), digits.build_task(), batch_size=360).top_k(test_set, 10)
            query_s = time.perf_counter() - t0
            examples = 1437 * 8
            rows.append((dim, train_s, featurize_s, examples / featurize_s, fit_s, query_s))
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    print("| k | train (s) | featurize (s) | featurize (ex·ckpt/s) | fit (s) | query 360 (s) |")
    print("|---|---|---|---|---|---|")
    for dim, tr, fe, rate, fi, qu in rows:
        print(f"| {dim} | {tr:.1f} | {fe:.1f} | {rate:,.0f} | {fi:.2f} | {qu:.2f} |")


if __name__ == "__main__":
    main()
