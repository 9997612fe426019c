"""What ``--html`` adds to ``compare``: the time of ``ev.lds_report`` (the per-query picture and the page) beside
printing the text table, on a synthetic ground truth, and the page's size.

    python benchmarks/lds_report_cost.py --queries 360 --subsets 100 --repeats 5 --methods 4 --rounds 3

The paired differences (``ev.paired_comparison``) are computed once and given to both, as the CLI does; they are
bootstrapped over the queries here (the cheapest resampling) since neither the text nor the page depends on how.
Rounds alternate the text and the page; medians are printed. ``--comparison`` also times one ``paired_comparison``
over the subsets (the CLI's default resampling): what the report would add if it bootstrapped the differences again.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from source_proj import evaluation as ev


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=360)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--methods", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--comparison", action="store_true", help="Also time one paired_comparison over subsets.")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    masks = rng.random((args.subsets, args.rows)) < 0.5
    weights = rng.normal(size=(args.queries, args.rows))
    noise = rng.normal(scale=20.0, size=(args.subsets, args.repeats, args.queries))
    truths = [ev.Counterfactuals(0.5, masks, (masks @ weights.T)[:, None, :] + noise)]
    scores = {f"method{i}": weights + rng.normal(scale=0.5 + i, size=weights.shape) for i in range(args.methods)}
    settings = ev.LDSArguments(resample="queries")
    results = ev.compare(scores, truths, settings)
    comparison = ev.paired_comparison(scores, truths, results, settings)
    text, page = [], []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lds.html"
        for _ in range(args.rounds):
            start = time.perf_counter()
            ev.format_table(results, [0.5])
            ev.format_comparison(scores, truths, results, settings, comparison)
            text.append(time.perf_counter() - start)
            start = time.perf_counter()
            ev.lds_report(scores, truths, results, path, args=settings, comparison=comparison)
            page.append(time.perf_counter() - start)
        size = path.stat().st_size
    print(f"{args.queries} queries, {args.methods} methods, M={args.subsets}, R={args.repeats}: text table "
          f"{statistics.median(text) * 1e3:.1f} ms, HTML report {statistics.median(page) * 1e3:.0f} ms (medians of "
          f"{args.rounds}), page {size / 1024:.0f} KiB")  # fmt: skip
    if args.comparison:
        over_subsets = ev.compare(scores, truths)
        start = time.perf_counter()
        ev.paired_comparison(scores, truths, over_subsets, ev.LDSArguments())
        print(f"paired_comparison over subsets: {time.perf_counter() - start:.1f} s (once)")


if __name__ == "__main__":
    main()
