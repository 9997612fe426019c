"""In-run SOURCE (gradients captured during training) against post-hoc SOURCE (featurized afterwards), by
LDS on the digits settings of examples/digits/settings.py.

    python benchmarks/capture_lds.py [--settings converged,noisy,two-stage] [--dim 512] [--subsets 100]
        [--repeats 5] [--workers 2] [--out runs/capture-lds] [--retrains runs/lds] [--validation]
        [--threads 1] [--basis-examples 2048] [--variants eigen,eigen+end,...]

Per setting, model seed 0 is trained once per in-run variant with the recorder and GradientCapture (k = --dim):
the eigen projection (capture's default: a basis per window, taken as training reaches it) and the random factored
one, both with the sampled Fisher on every batch (the default), on every 2nd and on every 4th batch, with the end
pass (``CaptureArguments.end_pass``; these variants are ``end_pass=False`` but for ``eigen+end``, ``factored+end``
and ``eigen+auto``, the library's defaults, whose end pass is taken on every stage), and the
factored one with the empirical Fisher (``--variants``: a comma-separated choice of ``SHORT``'s keys; the in-run
defaults are always run). Capture does not change training (tests/test_capture.py), so the runs are bit-identical,
which is checked here. The run is also
featurized afterwards with the eigen projection (the library's default), the factored one and the
dense Rademacher one, all with the sampled Fisher. Every store is fitted with the setting's SOURCE
segments and scored on the setting's 100 queries; the LDS ground truth (α = 0.5, --subsets ×
--repeats retrains) is shared with examples/digits/lds.py through --retrains. Printed and written to
OUT/<setting>/capture_lds.json: LDS [95 % CI over subsets], and for each in-run variant the mean
per-query LDS difference to post-hoc with the same projection, with a 95 % bootstrap interval over queries,
and for the variants with the Fisher on every n-th batch the same paired difference to that projection's
in-run store with the Fisher on every batch.
``--validation`` adds the setting's next 100 test queries, with their own ground truth (the same subsets,
retrains cached in <retrains>/<setting>/retrains-validation), and reports every figure over the 200
queries together (written to OUT/<setting>/capture_lds-validation.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
import digits
import settings

import source_proj as sp
from source_proj import evaluation as ev

IN_RUN = {
    "in-run (eigen)": (sp.CaptureArguments(end_pass=False), "eigen"),
    "in-run (eigen), defaults (end pass on every stage)": (sp.CaptureArguments(), "eigen"),
    "in-run (eigen), end pass": (sp.CaptureArguments(end_pass=True), "eigen"),
    "in-run (eigen), Fisher every 2nd batch": (sp.CaptureArguments(fisher_every=2, end_pass=False), "eigen"),
    "in-run (eigen), Fisher every 4th batch": (sp.CaptureArguments(fisher_every=4, end_pass=False), "eigen"),
    "in-run (factored)": (sp.CaptureArguments(end_pass=False), "factored"),
    "in-run (factored), Fisher every 2nd batch": (sp.CaptureArguments(fisher_every=2, end_pass=False), "factored"),
    "in-run (factored), Fisher every 4th batch": (sp.CaptureArguments(fisher_every=4, end_pass=False), "factored"),
    "in-run (factored), empirical Fisher": (sp.CaptureArguments(fisher="empirical", end_pass=False), "factored"),
    "in-run (factored), end pass": (sp.CaptureArguments(end_pass=True), "factored"),
}
SHORT = {  # --variants
    "eigen": "in-run (eigen)",
    "eigen+end": "in-run (eigen), end pass",
    "eigen+auto": "in-run (eigen), defaults (end pass on every stage)",
    "eigen/2": "in-run (eigen), Fisher every 2nd batch",
    "eigen/4": "in-run (eigen), Fisher every 4th batch",
    "factored": "in-run (factored)",
    "factored/2": "in-run (factored), Fisher every 2nd batch",
    "factored/4": "in-run (factored), Fisher every 4th batch",
    "factored/empirical": "in-run (factored), empirical Fisher",
    "factored+end": "in-run (factored), end pass",
}
BASIS_EXAMPLES = [2048]  # --basis-examples
POST_HOC = {"post-hoc (eigen)": "eigen", "post-hoc (factored)": "factored", "post-hoc (rademacher)": "rademacher"}


def capturer(store: Path, dim: int, options: sp.CaptureArguments, data: dict[str, torch.utils.data.Dataset], kind: str):
    def start(recorder: sp.TrajectoryRecorder) -> sp.GradientCapture:
        projection = sp.ProjectionArguments(dim=dim, kind=kind, basis_examples=BASIS_EXAMPLES[0])
        return sp.GradientCapture(
            recorder, store, digits.build_task(), projection=projection, options=options, datasets=data, overwrite=True
        )

    return start


def prepare(
    s: settings.Setting, out: Path, dim: int, variants: list[str]
) -> tuple[dict[str, Path], dict[str, float]]:
    """Train (captured), featurize and fit; returns the store of every variant and the seconds each took."""
    stores, seconds = {}, {}
    data = {st.name: st.data for st in s.stages}
    fit = sp.FitArguments(segments_per_stage=s.segments_per_stage, stages=(s.attributed,))
    t0 = time.perf_counter()
    s.train(0, run_dir=str(out / "plain"))
    seconds["training alone"] = time.perf_counter() - t0
    fingerprint = sp.Trajectory.load(out / "plain").fingerprint()
    for name in variants:
        options, kind = IN_RUN[name]
        run, store = out / f"run-{len(stores)}", out / f"in-run-{len(stores)}.sp"
        t0 = time.perf_counter()
        s.train(0, run_dir=str(run), capture=capturer(store, dim, options, data, kind))
        seconds[name] = time.perf_counter() - t0
        if sp.Trajectory.load(run).fingerprint() != fingerprint:
            raise SystemExit(f"{name}: the captured run differs from the uncaptured one")
        sp.fit(store, fit, overwrite=True, progress=False)
        stores[name] = store
    for name, kind in POST_HOC.items():
        store = out / f"post-hoc-{kind}.sp"
        t0 = time.perf_counter()
        sp.featurize(
            out / "plain",
            digits.build_model(),
            digits.build_task(),
            data,
            store,
            projection=sp.ProjectionArguments(dim=dim, kind=kind, basis_examples=BASIS_EXAMPLES[0]),
            options=sp.FeaturizeArguments(batch_size=256, measurement=False),
            progress=False,
            overwrite=True,
        )
        seconds[name] = time.perf_counter() - t0
        sp.fit(store, fit, overwrite=True, progress=False)
        stores[name] = store
    return stores, seconds


def mean_interval(values: np.ndarray, resamples: int = 2000) -> tuple[float, float, float]:
    """The mean of the finite ``values`` (one per query) with a 95 % bootstrap interval over them."""
    values = values[np.isfinite(values)]
    means = np.random.default_rng(0).choice(values, size=(resamples, len(values))).mean(1)
    return float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def paired(a: ev.Correlation, b: ev.Correlation) -> tuple[float, float, float]:
    """Mean per-query LDS difference a − b with a 95 % bootstrap interval over queries."""
    return mean_interval(a.per_query - b.per_query)


def score(
    name: str, stores: dict[str, Path], lds_args: ev.LDSArguments, retrains: Path, validation: bool
) -> dict[str, ev.Correlation]:
    """Every store's LDS on the setting's queries (or on its next 100, ``validation``), each query set with
    its own ground truth (retrains cached under ``retrains``)."""
    s = settings.setting(name, validation)
    scores, rows = {}, None
    for variant, store in stores.items():
        attributor = sp.Attributor(store, digits.build_model(), digits.build_task(), batch_size=256)
        scores[variant], rows = attributor.scores(s.queries), attributor.rows
    cache = retrains / name / ("retrains-validation" if validation else "retrains")
    truth = ev.lds_ground_truth(settings.Retrain(name, validation), rows, cache, lds_args)
    return {variant: ev.lds(v, truth, lds_args) for variant, v in scores.items()}


def pooled(a: ev.Correlation, b: ev.Correlation) -> ev.Correlation:
    """Two query sets' LDS as one: the mean over all their queries, a 95 % bootstrap interval over queries."""
    per_query = np.concatenate([a.per_query, b.per_query])
    return ev.Correlation(*mean_interval(per_query), per_query, a.units)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(settings.SETTINGS))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--basis-examples", type=int, default=2048, help="the eigen projection's examples per basis pass"
    )
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/capture-lds")
    parser.add_argument("--retrains", default="runs/lds", help="LDS retrain cache root (shared with lds.py)")
    parser.add_argument(
        "--validation",
        action="store_true",
        help="also score the next 100 test queries (their own ground truth) and pool the 200 queries",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a tiny MLP's steps slow down 10× with 2 on a busy CPU)"
    )
    parser.add_argument("--variants", default=",".join(SHORT), help=f"in-run variants, of {', '.join(SHORT)}")
    args = parser.parse_args()
    chosen = {SHORT[v] for v in args.variants.split(",")} | {"in-run (eigen)", "in-run (factored)"}
    variants = [name for name in IN_RUN if name in chosen]
    torch.set_num_threads(args.threads)
    BASIS_EXAMPLES[0] = args.basis_examples
    for name in args.settings.split(","):
        s = settings.setting(name)
        out = Path(args.out) / name
        stores, seconds = prepare(s, out, args.dim, variants)
        lds_args = ev.LDSArguments(num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
        results = score(name, stores, lds_args, Path(args.retrains), validation=False)
        queries = len(s.queries)
        if args.validation:
            more = score(name, stores, lds_args, Path(args.retrains), validation=True)
            results = {variant: pooled(r, more[variant]) for variant, r in results.items()}
            queries += len(settings.setting(name, validation=True).queries)
        lines = [
            f"## {name}: k={args.dim}, basis examples {args.basis_examples}, M={args.subsets}, R={args.repeats}, "
            f"{queries} queries"
        ]
        report = {}
        for variant, r in results.items():
            entry = {"lds": r.mean, "low": r.low, "high": r.high, "seconds": seconds[variant]}
            line = f"{variant:32s} {r}   ({seconds[variant]:.1f} s)"
            if variant in IN_RUN:
                kind = IN_RUN[variant][1]
                diff = paired(r, results[f"post-hoc ({kind})"])
                entry[f"minus post-hoc ({kind})"] = diff
                line += f"   − post-hoc ({kind}): {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]"
                if IN_RUN[variant][0] != sp.CaptureArguments(end_pass=False):
                    diff = paired(r, results[f"in-run ({kind})"])
                    entry[f"minus in-run ({kind})"] = diff
                    line += f"   − in-run ({kind}): {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]"
            lines.append(line)
            report[variant] = entry
        lines.append(f"{'training alone':32s} ({seconds['training alone']:.1f} s)")
        print("\n".join(lines), flush=True)
        summary = {"setting": name, "dim": args.dim, "queries": queries, "results": report}
        (out / ("capture_lds-validation.json" if args.validation else "capture_lds.json")).write_text(
            json.dumps(summary, indent=1)
        )


if __name__ == "__main__":
    main()
