"""In-run SOURCE against post-hoc SOURCE on the text example (two AdamW stages), by LDS on the fine-tuning stage.

    python benchmarks/capture_text_lds.py [--dim 512] [--reference runs/adam-rank] [--out runs/capture-text]
        [--subsets 50] [--repeats 4] [--workers 2] [--threads 2] [--variants eigen,factored] [--basis-examples E]
        [--uncut]

The tiny GPT-2 of ``examples/text/lm.py`` is trained again with the recorder and ``GradientCapture`` (k =
--dim, Adam's D^{-1/2} in its rank-1 form, the sampled Fisher): with the eigen projection (capture's default:
a basis per window), also with the Fisher on every 2nd and every 4th batch, and with the factored one at the
defaults (D^{-1/2} refreshed on every 16th batch, the Fisher from the training forward on every batch), and with
the factored one once each with the Fisher on every 2nd and every 4th batch, D^{-1/2} on every batch, and the
Fisher from a separate eval-mode pass (``fisher_forward="separate"``, the default before 2026-11-30);
each projection also with the end pass (``CaptureArguments.end_pass``; every other variant is ``end_pass=False``
but ``eigen+auto``, the library's defaults: the pass on every stage); ``--variants`` picks some by
their short names (``eigen``, ``eigen+end``, ``eigen+auto``, ``eigen-fisher/2``, ``eigen-fisher/4``, ``factored``,
``factored+end``, ``fisher/2``, ``fisher/4``, ``d/1``, ``separate``). Capture leaves
training unchanged, so each captured run must end bit-identical to the reference run
(``benchmarks/adam_rank_lds.py``'s, trained by the same code without capture), which is checked; the
reference's ``finetune`` ground truth (its pre-trained model fine-tuned again on random halves, α = 0.5,
retrains cached under REFERENCE/finetune/retrains) then scores every store. Post-hoc: the first captured run
featurized afterwards with the eigen and the factored projections, and the same parameters. The parameters are
the transformer blocks' Conv1D layers (norms and the tied embedding left out: capture projects factorable
layers only), the same in every store. Prints LDS [95 % CI], the per-query difference in-run − post-hoc with a
95 % bootstrap interval, for every other variant also its difference to the same projection's in-run store at
the defaults (the Fisher on every batch, no end pass; when that was trained too), and the seconds of training with
and without capture; writes OUT/results.json."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "text"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import lm  # noqa: E402
from capture_lds import paired  # noqa: E402

import source_proj as sp  # noqa: E402
from source_proj import evaluation as ev  # noqa: E402

METHOD = "source-finetune"
NO_END = sp.CaptureArguments(end_pass=False)  # the variants below were measured without the end pass
VARIANTS = {  # short name: (store name, options, projection kind)
    "eigen": ("in-run (eigen)", NO_END, "eigen"),
    "eigen+auto": ("in-run (eigen), defaults (end pass on every stage)", sp.CaptureArguments(), "eigen"),
    "eigen+end": ("in-run (eigen), end pass", sp.CaptureArguments(end_pass=True), "eigen"),
    "eigen-fisher/2": ("in-run (eigen), Fisher every 2nd batch", replace(NO_END, fisher_every=2), "eigen"),
    "eigen-fisher/4": ("in-run (eigen), Fisher every 4th batch", replace(NO_END, fisher_every=4), "eigen"),
    "factored": ("in-run (factored), Fisher every batch, D every 16th", NO_END, "factored"),
    "fisher/2": ("in-run (factored), Fisher every 2nd batch", replace(NO_END, fisher_every=2), "factored"),
    "fisher/4": ("in-run (factored), Fisher every 4th batch", replace(NO_END, fisher_every=4), "factored"),
    "d/1": ("in-run (factored), D every batch", replace(NO_END, scale_every=1), "factored"),
    "factored+end": ("in-run (factored), end pass", sp.CaptureArguments(end_pass=True), "factored"),
    "separate": ("in-run (factored), Fisher from a separate pass", replace(NO_END, fisher_forward="separate"),
                 "factored"),
}  # fmt: skip


CONFIG = [lm.CONFIG]  # the example's sizes; --width replaces its n_embd


def task() -> sp.LanguageModelingTask:
    """The example's task on the Conv1D layers only (what capture can project)."""
    selection = sp.ParameterSelection(skip_norm=True, skip_embedding=True)
    return sp.LanguageModelingTask(tokens_per_sequence=lm.CONFIG.length - 1, parameters=selection)


def train(run: Path, store: Path | None, projection: sp.ProjectionArguments, options: sp.CaptureArguments) -> float:
    """Train the example's two stages into ``run`` (captured into ``store`` when given); returns the seconds."""

    def capture(recorder: sp.TrajectoryRecorder) -> sp.GradientCapture:
        return sp.GradientCapture(recorder, store, task(), projection=projection, options=options, overwrite=True,
                                  datasets=lm.corpus(CONFIG[0]).train)  # fmt: skip

    start = time.perf_counter()
    lm.train(CONFIG[0], seed=0, run_dir=run, capture=capture if store is not None else None)
    return time.perf_counter() - start


def same_run(a: Path, b: Path) -> bool:
    """Whether two recorded runs saved bit-identical checkpoints."""
    return [c.sha256 for c in sp.Trajectory.load(a).checkpoints] == [
        c.sha256 for c in sp.Trajectory.load(b).checkpoints
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reference", type=Path, default=Path("runs/adam-rank"))
    parser.add_argument("--out", type=Path, default=Path("runs/capture-text"))
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="in-run variants to train (see above)")
    parser.add_argument("--basis-examples", type=int, default=None, help="eigen: examples per basis pass, the "
                        "layers' budget off, in-run and post-hoc too, beside post-hoc at the default")  # fmt: skip
    parser.add_argument("--uncut", action="store_true", help="also post-hoc with basis_layer_positions=None (every "
                        "one of basis_examples, the default before the layers' budget), paired with the default")
    parser.add_argument("--width", type=int, default=None, help="the model's width (n_embd) in place of the "
                        "example's 64; give it a --reference of its own (its run and ground truth)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.width is not None:
        CONFIG[0] = replace(lm.CONFIG, n_embd=args.width)
    config = CONFIG[0]
    out, reference = args.out, args.reference / "run"
    if not (reference / "trajectory.json").exists():
        lm.train(config, seed=0, run_dir=reference)
    # --basis-examples E: a basis from E examples, the layers' budget off; else the library's default basis
    basis = {"basis_examples": args.basis_examples, "basis_layer_positions": None} if args.basis_examples else {}
    kinds, every_batch = {}, {}  # every_batch: the store with the Fisher on every batch, per kind
    seconds = {"training": train(out / "plain", None, sp.ProjectionArguments(dim=args.dim), sp.CaptureArguments())}
    stores = {}
    for index, short in enumerate(args.variants.split(",")):
        name, options, kind = VARIANTS[short]
        run, stores[name], kinds[name] = out / f"run-{index}", out / f"in-run-{index}.sp", kind
        if options == NO_END:
            every_batch[kind] = name
        projection = sp.ProjectionArguments(dim=args.dim, kind=kind, **basis)
        seconds[name] = train(run, stores[name], projection, options)
        if not same_run(run, reference):
            raise SystemExit(
                f"The captured run {run} differs from the reference run {reference}: capture changed training."
            )
    shutil.rmtree(out / "plain")
    post_hoc = {"post-hoc (eigen)": sp.ProjectionArguments(dim=args.dim, kind="eigen"),
                "post-hoc (factored)": sp.ProjectionArguments(dim=args.dim, kind="factored")}  # fmt: skip
    if basis:  # also post-hoc at that basis, paired
        name = f"post-hoc (eigen), basis of {args.basis_examples}"
        post_hoc[name], kinds[name] = replace(post_hoc["post-hoc (eigen)"], **basis), "eigen"
    if args.uncut:
        name = "post-hoc (eigen), every example drawn (basis_layer_positions=None)"
        post_hoc[name], kinds[name] = replace(post_hoc["post-hoc (eigen)"], basis_layer_positions=None), "eigen"
    for index, (name, projection) in enumerate(post_hoc.items()):
        stores[name] = out / f"post-hoc-{index}.sp"
        start = time.perf_counter()
        options = sp.FeaturizeArguments(batch_size=32, chunk_rows=128)
        sp.featurize(out / "run-0", lm.build_model(config=config), task(), lm.corpus(config).train, stores[name],
                     projection=projection, options=options, overwrite=True, progress=False)  # fmt: skip
        seconds[f"{name} featurize"] = time.perf_counter() - start
    scores, rows = {}, None
    for name, store in stores.items():
        sp.fit(store, sp.FitArguments(stages=("finetune",), method=METHOD), overwrite=True, progress=False)
        attributor = sp.Attributor(store, lm.build_model(config=config), task(), method=METHOD)
        scores[name], rows = attributor.scores(lm.corpus(config).queries), attributor.rows
    assert rows is not None
    lds_args = ev.LDSArguments(alpha=0.5, num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    truth = ev.lds_ground_truth(lm.Retrain(str(reference), config=config, fixed_init=False), rows,
                                args.reference / "finetune" / "retrains", lds_args)  # fmt: skip
    results = {name: ev.lds(s, truth, lds_args) for name, s in scores.items()}
    lines = [f"k = {args.dim}, width {config.n_embd}, M = {args.subsets}, R = {args.repeats}, "
             f"{len(lm.corpus(config).queries)} queries", "",
             "| store | LDS [95 % CI] | in-run − post-hoc (same projection), per query [95 % CI] "
             "| − in-run, Fisher every batch [95 % CI] |",
             "|---|---|---|---|"]  # fmt: skip
    record = {"seconds": seconds, "lds": {}}
    for name, result in results.items():
        against = results.get(f"post-hoc ({kinds.get(name)})")
        diff = "" if against is None else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*paired(result, against))
        base = every_batch.get(kinds.get(name))
        every = ""
        if base not in (None, name) and name.startswith("in-run"):
            every = "{:+.3f} [{:+.3f}, {:+.3f}]".format(*paired(result, results[base]))
        lines.append(f"| {name} | {result.mean:.3f} [{result.low:.3f}, {result.high:.3f}] | {diff} | {every} |")
        record["lds"][name] = {"lds": result.mean, "low": result.low, "high": result.high,
                               "per_query": result.per_query.tolist()}  # fmt: skip
    lines.append("")
    lines.append(", ".join(f"{name}: {s:.1f} s" for name, s in seconds.items()))
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
