"""LDS of SOURCE and the baselines on a run whose parameter groups step at a constant ratio of learning rates.

The digits setting of ``accuracy/settings.py`` (``early`` by default: its data, MLP 64-128-128-10 and SGD recipe)
is trained with the last layer in a parameter group at R × the rest's rate (``--ratio``, default 5) and recorded
with ``TrajectoryRecorder`` (which writes each group's ``lr_ratio``); R = 1 is the same run in one rate, the
control. The ground truth retrains every (half-subset, seed) with the same per-group rates
(``BatchedSGD(lr_ratio=…)``, exact against ``torch.optim.SGD`` with those groups). SOURCE (default fit), TracIn-CP
and TRAK are fitted on each run and scored on the first ``--queries`` test digits (``methods_lds.compare_methods``).

"Ratio ignored": the R run's trajectory copied with every group's ``lr_ratio`` removed and its ``lr`` set to the
reference (head) rate, as a recorder that knew nothing of groups would describe it, featurized and scored against
the R run's ground truth (all three refitted: the baselines read the ratios too, where a store records them): the
paired per-query difference says what modelling the ratio is worth.

    python benchmarks/group_rates_lds.py --setting early --ratio 5 --subsets 100 --repeats 8 --queries 100 \\
        --out runs/group_rates/results.json

Prints a markdown table and writes the numbers as JSON (``--out``); everything else is cached under ``--root``
(a rerun reads the retrains back and refits).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent / "accuracy"))
import methods_lds
import settings as settings_module

import source_proj as sp
from source_proj import evaluation as ev

METHODS = ("source", "tracin", "trak")


def head_names(model: nn.Module) -> list[str]:
    """The parameter names of the model's last ``nn.Linear`` (the classifier head)."""
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return [f"{last}.{p}" for p, _ in model.get_submodule(last).named_parameters()]


def ignore_ratio(run: Path, copy: Path) -> None:
    """``run`` copied to ``copy`` with every group's ``lr_ratio`` removed and its ``lr`` set to the stage's largest
    (the reference's): the description of a run whose groups all stepped at the reference rate."""
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy)
    index = json.loads((copy / "trajectory.json").read_text())
    for stage in index["stages"]:
        groups = stage["optimizer"]["groups"]
        top = max(float(g["lr"]) for g in groups)
        for g in groups:
            g.pop("lr_ratio", None)
            g["lr"] = top
    (copy / "trajectory.json").write_text(json.dumps(index, indent=1))


def featurized(run: Path, store: Path, s: settings_module.Setting, task: sp.Task) -> Path:
    """``run`` featurized afresh into ``store`` (default projection): the fits then start from nothing."""
    sp.featurize(run, s.build_model(0), task, s.train_data, store, overwrite=True, progress=False)
    return store


def score(
    args: argparse.Namespace, s: settings_module.Setting, ratio: float, lds_args: ev.LDSArguments
) -> dict[str, Any]:
    """Train (once) the run at head ratio ``ratio``, build its ground truth (cached), fit and score the methods; at
    ratio ≠ 1 also the ratio-ignored copy against the same ground truth."""
    task = sp.ClassificationTask()
    ratios = dict.fromkeys(head_names(s.build_model(0)), ratio)
    folder = Path(args.root) / f"{s.name}-{s.key}-head{ratio:g}"
    folder.mkdir(parents=True, exist_ok=True)
    run = folder / "run"
    if not (run / "trajectory.json").exists() or not sp.Trajectory.load(run).complete:
        s.train_recorded(0, run, lr_ratio=ratios)
    qx, qy = (t[: args.queries] for t in s.queries[next(iter(s.queries))])
    queries = TensorDataset(qx, qy)
    trainer = ev.BatchedSGD(s.build_model, task, s.stages, lr_ratio=ratios)
    retrain = ev.BatchedRetrain(trainer, qx, qy, models_per_call=args.models_per_call)
    out: dict[str, Any] = {}
    started = time.perf_counter()
    store = featurized(run, folder / "run.sp", s, task)
    print(f"\n## head at {ratio:g}× ({time.perf_counter() - started:.0f} s to featurize)")
    out["modelled"] = methods_lds.compare_methods(store, lambda: s.build_model(0), task, queries, retrain,
                                                  folder / "truth", lds_args, methods=METHODS)  # fmt: skip
    if ratio != 1:
        print(f"\n## head at {ratio:g}×, ratio ignored (every group described at the head's rate)")
        ignore_ratio(run, folder / "run-ignored")
        try:
            store = featurized(folder / "run-ignored", folder / "run-ignored.sp", s, task)
        except sp.SourceProjError as err:  # the library refuses the description: that is the answer
            out["ignored"] = {"refused": str(err)}
        else:
            out["ignored"] = methods_lds.compare_methods(store, lambda: s.build_model(0), task, queries, retrain,
                                                         folder / "truth", lds_args, methods=METHODS)  # fmt: skip
            for method in METHODS:
                modelled, ignored = (np.asarray(out[part][method]["per_query"]) for part in ("modelled", "ignored"))
                delta = modelled - ignored
                low, high = ev.query_interval(delta, lds_args)
                out[f"{method}: modelled - ignored"] = {"mean": float(np.nanmean(delta)), "ci": [low, high]}
    out["seconds"] = time.perf_counter() - started
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| run | ground truth reliability (ceiling) | method | LDS [95 % CI] |", "|---|---|---|---|"]
    for label, report in results.items():
        for part, name in (("modelled", label), ("ignored", f"{label}, ratio ignored")):
            r = report.get(part)
            if r is None:
                continue
            if "refused" in r:
                rows.append(f"| {name} | | all | refused: {r['refused']} |")
                continue
            truth = f"{r['reliability']:.3f} ({r['ceiling']:.3f})"
            for method in (m for m in METHODS if m in r):
                low, high = r[method]["ci"]
                rows.append(f"| {name} | {truth} | {method} | {r[method]['lds']:.3f} [{low:.3f}, {high:.3f}] |")
        for method in METHODS:
            d = report.get(f"{method}: modelled - ignored")
            if d is not None:
                rows.append(f"| {label}: modelled − ignored, paired per query | | {method} | "
                            f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="early", choices=("early", "converged", "early-fast"))
    parser.add_argument("--ratio", type=float, default=5.0, help="the head's rate over the rest's (R = 1 also runs)")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--queries", type=int, default=100, help="the first test digits of the setting's queries")
    parser.add_argument("--models-per-call", type=int, default=100)
    parser.add_argument("--root", default="runs/group_rates")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here too")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    args = methods_lds.parse_args(parser)
    if args.ratio <= 0:
        parser.error(f"argument --ratio: {args.ratio} is not a positive ratio")
    torch.set_num_threads(args.threads)
    s = settings_module.setting(args.setting)
    available = len(next(iter(s.queries.values()))[1])
    if not 1 <= args.queries <= available:
        parser.error(f"argument --queries: {args.setting} has {available} test queries, not {args.queries}")
    lds_args = ev.LDSArguments(alpha=0.5, num_subsets=args.subsets, repeats=args.repeats, resample="queries")
    started = time.perf_counter()
    results = {f"head at {r:g}×": score(args, s, r, lds_args) for r in dict.fromkeys([args.ratio, 1.0])}
    print("\n" + table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"setting": args.setting, "ratio": args.ratio, "subsets": args.subsets,
                                              "repeats": args.repeats, "queries": args.queries, "results": results,
                                              "seconds": time.perf_counter() - started}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
