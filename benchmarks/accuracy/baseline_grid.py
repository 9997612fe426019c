"""IF's damping and TRAK's kernel dimension swept on the harness: what the baselines' defaults rest on.

    python benchmarks/accuracy/baseline_grid.py [--settings early,two-stage] [--root runs/accuracy] [--kind rademacher]

For each setting, model 0's featurized store (``run.py --kind KIND`` writes it; default the dense Rademacher one,
``run.py --kind rademacher``, on which the recorded figures were taken; k = 1024) gets
IF fitted at every damping of the grid (relative: δ = factor × mean eigenvalue of the projected
Fisher; absolute: δ as given, kronfluence's ``damping_factor``) and TRAK at every kernel dimension
of the grid, each as its own method (``if@…``, ``trak@…``; ``@default``: the library's defaults);
each is scored by the harness's LDS on every query set (95 % bootstrap interval over queries).
Prints a Markdown table per setting. Nothing is recomputed that the store already holds unless
``--refit``; ``--methods if@default,trak@default`` restricts the run to those methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from run import tag

import source_proj as sp
from source_proj.store.store import is_store

RELATIVE = (1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
ABSOLUTE = (1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0)
TRAK_DIMS = (16, 32, 64, 128, 256, 384, 512, 768, 1024)


def variants(store: sp.Store) -> dict[str, sp.BaselineArguments]:
    """Method name → the baseline arguments of every point of the grids."""
    out = {"if@default": sp.BaselineArguments(kind="if"), "trak@default": sp.BaselineArguments(kind="trak")}
    for factor in RELATIVE:
        out[f"if@rel{factor:g}"] = sp.BaselineArguments(kind="if", damping_factor=factor)
    for damping in ABSOLUTE:
        out[f"if@abs{damping:g}"] = sp.BaselineArguments(kind="if", damping=damping)
    for dim in TRAK_DIMS:
        if dim <= store.meta["projection"]["dim"]:
            out[f"trak@{dim}"] = sp.BaselineArguments(kind="trak", trak_dim=dim)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="early,two-stage")
    parser.add_argument("--root", default=str(harness.ROOT))
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--refit", action="store_true")
    parser.add_argument("--methods", default=None, help="comma-separated methods of the grid (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kind", default="rademacher", help="the projection of run.py's store (rademacher: the "
                        "store the recorded figures used; run.py's default is eigen)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.settings.split(","):
        path = harness.locate(name, root=args.root, models=0)[1] / f"model-0-{tag(args.dim, args.kind)}.sp"
        if not is_store(path):  # before the ground truth is built: it would be retrained for nothing
            raise SystemExit(
                f"No store at {path}; write it first with `python benchmarks/accuracy/run.py --settings {name} "
                f"--root {args.root} --dim {args.dim} --kind {args.kind}`."
            )
        repeats = 10 if name == "two-stage" else 20
        h = harness.prepare(name, root=args.root, repeats=repeats, progress=False)
        store = sp.Store.open(path, writable=True)
        stages = (h.setting.attributed,)
        rows = []
        chosen = variants(store)
        if args.methods:
            chosen = {m: chosen[m] for m in args.methods.split(",")}
        for method, base in chosen.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                sp.fit_baseline(
                    store,
                    dataclasses.replace(base, method=method, stages=stages),
                    overwrite=args.refit,
                    progress=False,
                )
            attributor = sp.Attributor(store.path, h.build_model(), h.task, method=method, batch_size=256)
            cells = [str(h.lds(attributor.scores(h.query_data(q)), q)) for q in h.query_sets]
            extra = sp.Store.open(store.path).meta["methods"][method]
            detail = f"δ = {extra['damping']:.3g}" if "damping" in extra else f"d = {extra.get('trak_dim')}"
            rows.append(f"| {method} | {detail} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
        print(f"\n**{name}** (model 0, N = {h.size}, k = {args.dim})\n")
        print("| method | parameter | " + " | ".join(h.query_sets) + " |")
        print("|---|---|" + "---|" * len(h.query_sets))
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
