"""Post-hoc SOURCE with the projected Fisher of a share of the examples (``FeaturizeArguments.fisher_examples``),
or the eigen basis from some checkpoints (``ProjectionArguments.basis_checkpoints``), against every example's and
every checkpoint's, by LDS on a harness setting, with featurize's time and the store's size.

    python benchmarks/accuracy/fisher_examples.py --setting mnist-noisy --mnist ../shared/data/mnist \
        --subsets 50 --repeats 3 [--dim 1024] [--kind eigen] [--examples all,2048,1024,512]
        [--basis-checkpoints all,4,2] [--seeds 0,1] [--rounds 2] [--out runs/accuracy/fisher-examples-mnist-noisy.json]

Model 0 of the setting (trained and its ground truth built by the harness when missing) is featurized once per
value of ``--examples`` (``all``: every example, the default) and of ``--basis-checkpoints`` (``all``: every
checkpoint, the default) and of featurize's ``--seeds`` (0, the default: the Fisher's labels and batches are drawn
from it, so a second seed measures the draw's own noise), each combination, into
``model-0-<kind>-k<dim>-fisher-<M>[-basis-<n>][-seed-<s>].sp`` in the setting's cache folder, ``--rounds`` times in
turn (the median featurize seconds are reported: a shared machine slows every variant alike), then fitted with the
library's defaults and scored on the setting's queries. Printed and written to ``--out``: each store's LDS [95 %
CI], its difference to the first store per query (paired 95 % bootstrap interval), the Fisher rows it holds per
checkpoint, its Fisher arrays' bytes on disk and featurize's median seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import source_proj as sp
from source_proj.store.store import Store, ckpt_key


def _bytes(store: Path, prefix: str) -> int:
    return sum(f.stat().st_size for f in (store / prefix).rglob("*") if f.is_file()) if (store / prefix).exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_setting_arguments(parser)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--kind", default="eigen")
    parser.add_argument("--examples", default="all,2048,1024,512", help="fisher_examples values ('all': None)")
    parser.add_argument("--basis-checkpoints", default="all", help="basis_checkpoints values ('all': None)")
    parser.add_argument("--seeds", default="0", help="featurize seeds (FeaturizeArguments.seed)")
    parser.add_argument("--rounds", type=int, default=2, help="featurize each variant this many times, in turn")
    args = parser.parse_args()
    h = harness.prepare_model_0(args)
    fit = sp.FitArguments(stages=(h.setting.attributed,))
    variants = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for fisher in args.examples.split(","):
            for basis in args.basis_checkpoints.split(","):
                name = (fisher + ("" if basis == "all" else f", basis of {basis} checkpoints a stage")
                        + ("" if seed == 0 else f", seed {seed}"))  # fmt: skip
                variants[name] = (fisher, None if fisher == "all" else int(fisher), basis,
                                  None if basis == "all" else int(basis), seed)  # fmt: skip
    stores = {v: h.folder / (f"model-0-{args.kind}-k{args.dim}-fisher-{f}{'' if b == 'all' else f'-basis-{b}'}"
                             f"{'' if seed == 0 else f'-seed-{seed}'}.sp")
              for v, (f, _, b, _, seed) in variants.items()}  # fmt: skip
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for value, (_, examples, _, checkpoints, seed) in variants.items():
            start = time.perf_counter()
            sp.featurize(h.runs[0], h.build_model(), h.task, h.train_data, stores[value],
                         projection=sp.ProjectionArguments(dim=args.dim, kind=args.kind, basis_checkpoints=checkpoints),
                         options=sp.FeaturizeArguments(fisher_examples=examples, seed=seed), overwrite=True,
                         progress=False)  # fmt: skip
            seconds[value].append(time.perf_counter() - start)
    for store in stores.values():
        sp.fit(store, fit, overwrite=True, progress=False)
    first = next(iter(variants))
    results: dict[str, dict] = {}
    for queries in h.query_sets:
        data = h.query_data(queries)
        scores = {v: np.asarray(sp.Attributor(s, h.build_model(), h.task, batch_size=256).scores(data))
                  for v, s in stores.items()}  # fmt: skip
        for value, values in scores.items():
            lds = h.lds(values, queries)
            store = Store.open(stores[value])
            final = store.meta["trajectory"]["checkpoints"][-1]
            rows = store.array(f"fisher/{h.setting.attributed}/{ckpt_key(final)}").shape[0]
            entry = {"lds": [lds.mean, lds.low, lds.high], "fisher_rows": rows,
                     "fisher_bytes": _bytes(stores[value], "fisher"), "grads_bytes": _bytes(stores[value], "grads"),
                     "featurize_s": statistics.median(seconds[value]), "featurize_rounds": seconds[value]}  # fmt: skip
            line = (f"{args.setting} {queries} Fisher of {value}: {lds}, {rows} Fisher rows a checkpoint, "
                    f"Fisher {entry['fisher_bytes'] / 2**20:.1f} MiB, featurize {entry['featurize_s']:.1f} s")
            if value != first:
                delta = h.difference(values, scores[first], queries)
                entry["minus all"] = list(delta)
                line += f", minus {first} {delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]"
            results.setdefault(queries, {})[value] = entry
            print(line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
