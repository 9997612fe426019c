"""``source-proj``: featurize → fit → query from the shell. Parses options and calls the library."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import click
import torch

import source_proj as sp
from source_proj.info import store_summary
from source_proj.projection import PROJECTION_KINDS
from source_proj.query import method_meta
from source_proj.spec import Spec, load_spec
from source_proj.topk import SEARCH_BACKENDS


def _fail(err: Exception) -> None:
    raise click.ClickException(str(err)) from err


class _Command(click.Command):
    """Turns the library's errors into one-line messages (exit code 1) instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except sp.SourceProjError as err:
            _fail(err)


def _ints(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from err


def _names(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(sp.__version__, prog_name="source-proj")
def main() -> None:
    """Training data attribution with SOURCE: which training examples made the model do that.

    \b
    source-proj featurize --ckpts RUN --spec spec.py --out STORE   per-example gradients, projected
    source-proj fit STORE                                          segments, SOURCE operators, cached features
    source-proj query STORE --top-k 50                             most helpful / harmful training examples
    source-proj info STORE                                         what a store holds
    """


@main.command(cls=_Command)
@click.option(
    "--ckpts",
    "run_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory written by TrajectoryRecorder (trajectory.json + checkpoints/).",
)
@click.option(
    "--spec",
    "spec_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Python file defining build_model, build_task, train_data(stage), query_data().",
)
@click.option("--out", "store_path", required=True, type=click.Path(path_type=Path), help="Store to write (or resume).")
@click.option("--dim", default=1024, show_default=True, help="Projection dimension k.")
@click.option("--seed", default=0, show_default=True, help="Projection seed.")
@click.option(
    "--projection",
    type=click.Choice([*PROJECTION_KINDS, "auto"]),
    default="rademacher",
    show_default=True,
    help="factored: per-layer Kronecker (fast, no per-example gradients); fast_jl: TRAK's CUDA kernel; "
    "auto: fast_jl when available, else rademacher.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="bf16: forward/backward under bfloat16 autocast, projections accumulated in fp32.",
)
@click.option(
    "--fisher",
    type=click.Choice(["sampled", "exact", "empirical"]),
    default="sampled",
    show_default=True,
    help="Curvature: Fisher with sampled labels (true Fisher), enumerated exactly, or empirical.",
)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--chunk-rows", default=1024, show_default=True, help="Examples per store chunk (unit of resumption).")
@click.option("--device", default=None, help="cuda, cpu, ... (default: cuda when available).")
@click.option("--workers", default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--force", is_flag=True, help="Replace an existing store written with other settings.")
def featurize(
    run_dir: Path,
    spec_path: Path,
    store_path: Path,
    dim: int,
    seed: int,
    projection: str,
    precision: str,
    fisher: str,
    batch_size: int,
    chunk_rows: int,
    device: str | None,
    workers: int,
    force: bool,
) -> None:
    """Project per-example training gradients of every checkpoint into STORE (resumes if interrupted)."""
    spec = load_spec(spec_path)
    trajectory = sp.Trajectory.load(run_dir)
    data = {s.name: spec.train_data(s.name) for s in trajectory.stages}
    store = sp.featurize(
        trajectory,
        spec.build_model(),
        spec.build_task(),
        data,
        store_path,
        projection=sp.ProjectionArguments(dim=dim, seed=seed, kind=projection),
        options=sp.FeaturizeArguments(
            batch_size=batch_size,
            chunk_rows=chunk_rows,
            fisher=fisher,
            device=device,
            num_workers=workers,
            precision=precision,
        ),
        overwrite=force,
        spec=str(spec.path),
    )
    click.echo(f"featurized {len(trajectory.checkpoints)} checkpoints into {store.path}")


@main.command(cls=_Command)
@click.argument("store_path", type=click.Path(path_type=Path))
@click.option("--segments", default=3, show_default=True, help="Equal segments per stage.")
@click.option(
    "--boundaries", default=None, help="Explicit global steps to cut at, e.g. 100,200 (overrides --segments)."
)
@click.option("--stages", default=None, help="Attribute to these stages' data only, e.g. pretrain (default: all).")
@click.option("--method", default="source", show_default=True, help="Name to store the result under.")
@click.option("--device", default=None, help="Where the k×k algebra runs (default: cuda when available).")
@click.option("--force", is_flag=True, help="Replace a method fitted with other settings.")
def fit(
    store_path: Path,
    segments: int,
    boundaries: str | None,
    stages: str | None,
    method: str,
    device: str | None,
    force: bool,
) -> None:
    """Segment the trajectory, build SOURCE's operators and cache the training features in STORE."""
    args = sp.FitArguments(
        segments_per_stage=segments, boundaries=_ints(boundaries), stages=_names(stages), method=method
    )
    store = sp.fit(store_path, args, overwrite=force, device=device)
    for seg in method_meta(store, method)["segments"]:
        t = seg["mean_lr"] * (seg["end_step"] - seg["start_step"])
        click.echo(
            f"segment {seg['stage']} steps [{seg['start_step']}, {seg['end_step']}) "
            f"checkpoints {seg['checkpoints']}  η̄K = {t:.4g}  λ = {seg['weight_decay']:.3g}"
        )
    click.echo(f"fitted {method!r} in {store.path}")


def _select(n: int, spec: str | None) -> list[int]:
    if not spec:
        return list(range(n))
    out: list[int] = []
    for part in spec.split(","):
        if ":" in part:
            a, b = part.split(":", 1)
            out.extend(range(int(a or 0), min(n, int(b or n))))
        else:
            out.append(int(part))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise click.BadParameter(f"query indices {bad[:5]} are outside the {n} query examples")
    return out


def _write(records: list[dict[str, Any]], path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as err:
            raise click.ClickException(
                "Writing parquet needs pyarrow; `pip install source-proj[parquet]` or use .csv/.jsonl."
            ) from err
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise click.BadParameter(f"unknown output format {suffix!r}; use .csv, .jsonl or .parquet", param_hint="--out")


@main.command(cls=_Command)
@click.argument("store_path", type=click.Path(path_type=Path))
@click.option(
    "--spec",
    "spec_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Spec file (default: the one recorded by featurize).",
)
@click.option("--queries", "which", default=None, help="Query indices: 0:10, 3,5,8 (default: all).")
@click.option("--top-k", default=10, show_default=True)
@click.option("--method", default="source", show_default=True)
@click.option(
    "--out",
    "out_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Write all results (.csv, .jsonl, .parquet).",
)
@click.option("--show", default=5, show_default=True, help="Queries to print on the terminal.")
@click.option("--device", default=None)
@click.option(
    "--search",
    "search_backend",
    type=click.Choice(list(SEARCH_BACKENDS)),
    default="auto",
    show_default=True,
    help="Top-k search: FAISS, torch matmul+top-k on the device, or stream store chunks (bounded memory).",
)
def query(
    store_path: Path,
    spec_path: Path | None,
    which: str | None,
    top_k: int,
    method: str,
    out_path: Path | None,
    show: int,
    device: str | None,
    search_backend: str,
) -> None:
    """Print the most helpful and most harmful training examples of each query."""
    store = sp.Store.open(store_path)
    spec = _spec_of(store, spec_path)
    queries = spec.query_data()
    indices = _select(len(queries), which)
    attributor = sp.Attributor(
        store, spec.build_model(), spec.build_task(), method=method, device=device, search_backend=search_backend
    )
    result = attributor.top_k(torch.utils.data.Subset(queries, indices), top_k)
    records = result.records()
    for r in records:
        r["query"] = indices[r["query"]]
        r["description"] = spec.describe(r["stage"], r["index"])
    for q, qi in enumerate(indices[:show]):
        click.echo(f"\nquery {qi}")
        click.echo(f"  {'rank':>4}  {'helpful':<34} {'harmful':<34}")
        for rank in range(result.helpful_ids.shape[1]):
            cells = []
            for ids, scores in (
                (result.helpful_ids, result.helpful_scores),
                (result.harmful_ids, result.harmful_scores),
            ):
                stage, index = result.locate(int(ids[q, rank]))
                label = f"{stage}[{index}] {spec.describe(stage, index)}"[:22]
                cells.append(f"{label:<22} {scores[q, rank]:+.3e}")
            click.echo(f"  {rank + 1:>4}  {cells[0]:<34} {cells[1]:<34}")
    if len(indices) > show:
        click.echo(f"\n({len(indices) - show} more queries not shown; use --out to save all)")
    if out_path is not None:
        _write(records, out_path)
        click.echo(f"wrote {len(records)} rows to {out_path}")


def _spec_of(store: sp.Store, spec_path: Path | None) -> Spec:
    path = spec_path or store.meta.get("spec")
    if path is None:
        raise click.UsageError("The store records no spec file; pass --spec.")
    return load_spec(path)


@main.command(cls=_Command)
@click.argument("store_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(store_path: Path, as_json: bool) -> None:
    """Describe a store: what produced it, how far featurize got, and its fitted methods."""
    summary = store_summary(sp.Store.open(store_path))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    proj = summary["projection"]
    traj = summary["trajectory"]
    click.echo(f"store       {summary['path']}  (source-proj {summary['library_version']})")
    click.echo(
        f"parameters  {summary['parameters']:,} in {summary['parameter_tensors']} tensors; task {summary['task']}"
    )
    click.echo(f"projection  {proj['kind']} k={proj['dim']}" + (f" seed={proj['seed']}" if "seed" in proj else ""))
    click.echo(f"trajectory  {traj['path']} ({traj['fingerprint']}…)")
    for s in traj["stages"]:
        click.echo(f"  stage {s['name']}: steps [{s['start_step']}, {s['end_step']}), {s['dataset_size']} examples")
    click.echo(f"  checkpoints at steps {traj['checkpoints']}")
    click.echo(f"featurized  {summary['featurized_chunks']} chunks (Fisher: {summary['fisher']})")
    for name, m in summary["methods"].items():
        state = "complete" if m["complete"] else "UNFINISHED (re-run fit)"
        click.echo(f"method {name}: {m['kind']}, {state}, attributes stages {m['stages']}")
        for seg in m["segments"]:
            click.echo(
                f"  {seg['stage']} [{seg['start_step']}, {seg['end_step']}) checkpoints {seg['checkpoints']} "
                f"η̄K={seg['time']:.4g} λ={seg['weight_decay']:.3g}"
            )


if __name__ == "__main__":
    sys.exit(main())
