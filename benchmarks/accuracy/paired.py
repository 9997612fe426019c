"""Paired per-query LDS differences of one of our methods against peers or other methods of ours, on model 0
of a harness setting (``harness.Prepared.difference``: mean per-query difference, 95 % bootstrap over queries).

    python benchmarks/accuracy/paired.py --setting early --store model-0-k1024.sp --method source \
        --against bergson-source,ours:if [--mnist DIR] [--subsets 100] [--repeats 20]

``--against`` names peer score folders under ``<setting folder>/peers`` (``peers.py`` writes them), as
``ours:METHOD`` another method fitted in the same store, or as ``store:FILE`` / ``store:FILE:METHOD`` a
method (default ``source``) of another store in the setting's folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import source_proj as sp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_setting_arguments(parser)
    parser.add_argument("--store", required=True, help="the store's file name in the setting's folder")
    parser.add_argument("--method", default="source")
    parser.add_argument("--against", required=True, help="comma-separated peers, or ours:METHOD")
    args = parser.parse_args()
    h = harness.prepare_model_0(args)
    for queries in h.query_sets:
        data = h.query_data(queries)

        def ours(method: str, data=data, store: str = args.store) -> np.ndarray:
            attributor = sp.Attributor(h.folder / store, h.build_model(), h.task, method=method, batch_size=256)
            return np.asarray(attributor.scores(data))

        mine = ours(args.method)
        print(f"{args.setting} {queries} {args.store} {args.method}: {h.lds(mine, queries)}")
        for other in args.against.split(","):
            if other.startswith("ours:"):
                theirs = ours(other.removeprefix("ours:"))
            elif other.startswith("store:"):
                store, _, method = other.removeprefix("store:").partition(":")
                theirs = ours(method or "source", store=store)
            else:
                theirs = np.load(h.folder / "peers" / other / f"seed-0-{queries}.npy")
            mean, low, high = h.difference(mine, theirs, queries)
            print(f"  {queries} minus {other}: {mean:+.3f} [{low:+.3f}, {high:+.3f}]", flush=True)


if __name__ == "__main__":
    main()
