"""SOURCE and the baselines fitted in one store, and their LDS against one ground truth (shared by the LDS
benchmarks that compare methods: ``token_classification_lds.py``, ``lora_lds.py``)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import source_proj as sp
from source_proj.evaluation.lds import LDSArguments, lds, lds_ground_truth, split_half_reliability

METHODS = ("source", "trak", "tracin", "grad-dot")


def train_kept(
    loss: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    size: int,
    batch: int,
    epochs: int,
    seed: int,
    keep: np.ndarray | None = None,
    recorder: sp.TrajectoryRecorder | None = None,
    after_step: Callable[[], Any] | None = None,
) -> None:
    """The LDS benchmarks' training loop, for the recorded run and its retrains alike: ``epochs`` passes over a
    seeded random order of the ``size`` examples in batches of ``batch``, each step minimising ``loss(rows)`` (the
    batch mean over those rows). A retrain (``keep`` given) drops from each batch the rows it does not keep, so it
    follows the full run's order; a batch left empty still steps. ``recorder`` records every step and is closed at
    the end; ``after_step`` (a scheduler's ``step``) runs after it."""
    kept = torch.ones(size, dtype=torch.bool)
    if keep is not None:
        kept[:] = False
        kept[torch.as_tensor(keep)] = True
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(size, generator=g)
        for start in range(0, size, batch):
            rows = order[start : start + batch]
            rows = rows[kept[rows]]
            optimizer.zero_grad()
            if len(rows):
                loss(rows).backward()
            optimizer.step()
            if recorder is not None:
                recorder.step()
            if after_step is not None:
                after_step()
    if recorder is not None:
        recorder.close()


def recorded_store(
    out: Path, training: Any, build_model: Callable[[], nn.Module], dim: int, seed: int = 0, name: str = "run"
) -> tuple[Path, float]:
    """The recorded run ``out/name`` (``training.train(seed, run=…)`` unless it is complete) and its store
    ``out/name.sp`` (featurized at k = ``dim`` with the default projection unless done; an interrupted one
    resumes). Returns the store and featurize's seconds (0 for a store already done)."""
    run = out / name
    if not (run / "trajectory.json").is_file() or not json.loads((run / "trajectory.json").read_text())["complete"]:
        training.train(seed, run=run)
    store = out / f"{name}.sp"
    started = time.perf_counter()
    if not store.is_dir() or not sp.Store.open(store).meta.get("featurized"):  # new, or resumed
        sp.featurize(run, build_model(), training.task, training.train_data, store,
                     projection=sp.ProjectionArguments(dim=dim), progress=False)  # fmt: skip
    return store, time.perf_counter() - started


def measurements(task: sp.Task, model: nn.Module, data: Any) -> np.ndarray:
    """The task's measurement of every example of the dict dataset ``data`` by ``model``, one batch: float64 ``[Q]``."""
    examples = [data[i] for i in range(len(data))]
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
    bound = task.bind(model)
    with torch.no_grad():
        return bound.measurement(bound.forward(model, batch), batch).numpy().astype(np.float64)


def selection(args: argparse.Namespace) -> dict[str, sp.ModuleSelection]:
    """The task's parameters: its default (the blocks and the head) or, with ``--blocks-only``, the blocks only."""
    return {"parameters": sp.ModuleSelection()} if getattr(args, "blocks_only", False) else {}


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The script's options, ``--repeats`` below 2 refused before any training (as ``examples/digits/lds.py`` does):
    the report's split-half reliability compares two halves of each subset's retrains."""
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error(f"argument --repeats: {args.repeats} leaves no second half for the ground truth's split-half "
                     "reliability; ask for 2 or more")  # fmt: skip
    return args


def compare_methods(
    store: Path,
    build_model: Callable[[], nn.Module],
    task: sp.Task,
    queries: Any,
    retrain: Any,
    retrains: Path,
    args: LDSArguments,
    methods: Sequence[str] = METHODS,
    damping_factors: Sequence[float] = (),
    averages: Sequence[str] = (),
) -> dict[str, Any]:
    """Fit SOURCE (its default segmentation: the one featurize recorded, else one per stage) and the baselines into
    the featurized ``store``, score ``queries`` with each, and return each method's LDS against ``retrain``'s ground
    truth (cached in ``retrains``) with the paired per-query difference of SOURCE and each baseline (and ``fit_s``,
    the fits' seconds); prints them.
    ``damping_factors``: SOURCE again at each of these damping factors (methods ``source-damping-F``), scored
    beside the others; ``averages``: SOURCE again with each of these segment averages (``FitArguments.average``,
    methods ``source-average-A``), likewise."""
    started = time.perf_counter()
    sp.fit(store, progress=False)
    for kind in methods[1:]:
        sp.fit_baseline(store, sp.BaselineArguments(kind=kind), progress=False)
    fitting = time.perf_counter() - started
    for factor in damping_factors:
        sp.fit(store, sp.FitArguments(damping_factor=factor, method=f"source-damping-{factor:g}"), overwrite=True,
               progress=False)  # fmt: skip
    for average in averages:
        sp.fit(store, sp.FitArguments(average=average, method=f"source-average-{average}"), overwrite=True,
               progress=False)  # fmt: skip
    scores = {}
    extra = [*(f"source-damping-{factor:g}" for factor in damping_factors), *(f"source-average-{a}" for a in averages)]
    for method in [*methods, *extra]:
        attributor = sp.Attributor(store, build_model(), task, method=method)
        scores[method] = attributor.scores(queries)
        rows = attributor.rows
    truth = lds_ground_truth(retrain, rows, retrains, args)
    results = {m: lds(s, truth, args) for m, s in scores.items()}
    report: dict[str, Any] = {m: {"lds": r.mean, "ci": [r.low, r.high], "per_query": r.per_query.tolist()}
                              for m, r in results.items()}  # fmt: skip
    report["fit_s"] = fitting
    report["reliability"], report["ceiling"] = split_half_reliability(truth)
    for method in list(results)[1:]:
        diff = results[methods[0]].per_query - results[method].per_query
        diff = diff[np.isfinite(diff)]
        boot = np.random.default_rng(0).choice(diff, (2000, len(diff))).mean(1)
        report[f"{methods[0]} - {method}"] = {"mean": float(diff.mean()),
                                              "ci": np.percentile(boot, [2.5, 97.5]).tolist()}  # fmt: skip
    print(f"ground truth: split-half reliability {report['reliability']:.3f}, LDS ceiling {report['ceiling']:.3f}")
    for method, r in results.items():
        print(f"{method}: LDS {r.mean:.3f} [{r.low:.3f}, {r.high:.3f}]")
    for key, value in report.items():
        if " - " in key:
            print(f"{key}, per query: {value['mean']:+.3f} [{value['ci'][0]:+.3f}, {value['ci'][1]:+.3f}]")
    return report
