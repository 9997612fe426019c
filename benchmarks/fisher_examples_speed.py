"""Featurize's time and store size with the projected Fisher of every example against that of a share of them
(``FeaturizeArguments.fisher_examples``), on the text example's recorded run at a chosen width.

    python benchmarks/fisher_examples_speed.py [--width 256] [--reference runs/text-w256] [--dim 512]
        [--examples all,64,32] [--rounds 3] [--threads 2] [--out runs/fisher-examples-speed]

The run is ``projection_width_lds.py``'s (the example's GPT-2 widened to ``--width``, two AdamW stages; trained
into REFERENCE/run when missing). Each variant (``all``: every example) featurizes it with the eigen projection
at k = ``--dim`` into a fresh store, the variants in turn ``--rounds`` times, so that a load which changes over
time slows them alike. Prints each variant's median seconds (and every round's), the Fisher rows of a checkpoint,
and the bytes of its Fisher and gradient arrays on disk; writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "text"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import capture_text_lds as ctl  # noqa: E402
import lm  # noqa: E402

import source_proj as sp  # noqa: E402
from source_proj.store.store import Store, ckpt_key  # noqa: E402


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--reference", type=Path, default=Path("runs/text-w256"))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--examples", default="all,64,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/fisher-examples-speed"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ctl.CONFIG[0] = replace(lm.CONFIG, n_embd=args.width)
    run = args.reference / "run"
    if not (run / "trajectory.json").exists() or not sp.Trajectory.load(run).complete:
        lm.train(config, seed=0, run_dir=run)
    variants = {v: None if v == "all" else int(v) for v in args.examples.split(",")}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for value, examples in variants.items():
            store = args.out / f"fisher-{value}.sp"
            start = time.perf_counter()
            sp.featurize(run, lm.build_model(config=config), ctl.task(), lm.corpus(config).train, store,
                         projection=sp.ProjectionArguments(dim=args.dim),
                         options=sp.FeaturizeArguments(batch_size=32, chunk_rows=128, fisher_examples=examples),
                         overwrite=True, progress=False)  # fmt: skip
            seconds[value].append(time.perf_counter() - start)
            print(f"Fisher of {value}: {seconds[value][-1]:.1f} s", flush=True)
    record = {}
    for value in variants:
        store = args.out / f"fisher-{value}.sp"
        meta = Store.open(store).meta
        final = ckpt_key(meta["trajectory"]["checkpoints"][-1])
        rows = {s["name"]: Store.open(store).array(f"fisher/{s['name']}/{final}").shape[0]
                for s in meta["trajectory"]["stages"]}  # fmt: skip
        record[value] = {"seconds": seconds[value], "median_s": statistics.median(seconds[value]),
                         "fisher_rows": rows, "fisher_bytes": _bytes(store / "fisher"),
                         "grads_bytes": _bytes(store / "grads")}  # fmt: skip
    first = next(iter(variants))
    print(f"\n| Fisher of | featurize s (median of {args.rounds}) | rounds | × {first} | Fisher rows a checkpoint "
          "| Fisher MiB | gradients MiB |\n|---|---|---|---|---|---|---|")
    for value, r in record.items():
        print(f"| {value} | {r['median_s']:.1f} | {', '.join(f'{s:.1f}' for s in r['seconds'])} | "
              f"{record[first]['median_s'] / r['median_s']:.2f} | "
              f"{', '.join(f'{k} {v}' for k, v in r['fisher_rows'].items())} | {r['fisher_bytes'] / 2**20:.1f} | "
              f"{r['grads_bytes'] / 2**20:.1f} |")
    (args.out / "results.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
