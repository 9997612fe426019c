"""``source-proj``: featurize → fit → query from the shell. Parses options and calls the library."""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import shlex
import sys
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click
import numpy as np
import torch
from tqdm.auto import tqdm

import source_proj as sp
from source_proj import evaluation as ev
from source_proj.distributed import Shard, launched, together
from source_proj.errors import describe_out_of_memory, first_line, mention, out_of_memory
from source_proj.evaluation.lds import MIN_SUBSETS
from source_proj.figures import check_figure_path, pyplot
from source_proj.methods.fit import store_view
from source_proj.projection.factory import PROJECTION_KINDS
from source_proj.query.attributor import StageRows, method_meta
from source_proj.query.text_report import text_report
from source_proj.query.topk import SEARCH_BACKENDS
from source_proj.spec import Spec, load_spec
from source_proj.store.durable import atomic_write_bytes
from source_proj.store.info import segment_points, store_summary
from source_proj.store.provenance import check_data
from source_proj.store.store import is_store
from source_proj.store.verify import basis_options, method_command, verify_store
from source_proj.tasks.data import training_examples


class _Command(click.Command):
    """Turns the library's errors into one-line messages (exit code 1) instead of tracebacks; one refusing the value
    of an argument an option set names the option instead (``--subsets is 0; …``, a usage error: exit code 2).

    An error the library did not anticipate is a bug: it is named in one line too (set
    ``SOURCE_PROJ_TRACEBACK=1`` to see the traceback instead).
    """

    def invoke(self, ctx: click.Context) -> Any:
        # Under torchrun every rank runs the command, meets the same warnings and ends with the same summary: rank 0
        # prints them, the others print nothing but their errors (stderr).
        follower = int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"
        try:
            with warnings.catch_warnings(), (
                contextlib.redirect_stdout(io.StringIO()) if follower else contextlib.nullcontext()
            ):
                warnings.simplefilter("ignore" if follower else "default")
                warnings.formatwarning = _format_warning  # type: ignore[assignment]
                result = super().invoke(ctx)
            sys.stdout.flush()  # a reader that has left (`| head`) is met here, where click handles it, not at exit
            return result
        except sp.SourceProjError as err:
            text = self._spelled(str(err), err.mentions)
            option = _option_of(self, err.subject)
            if option is None:
                raise click.ClickException(text) from err
            raise click.UsageError(option + text[len(err.subject or ""):], ctx) from err
        except (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise  # click ends a command whose output's reader left quietly (exit status 1)
        except KeyboardInterrupt:  # the write it left running ends at exit (store/durable.py, ``_settle_io``)
            raise _Interrupted(ctx.info_name) from None
        except Exception as err:
            if os.environ.get("SOURCE_PROJ_TRACEBACK"):
                raise
            if out_of_memory(err):  # not a bug: the work as asked does not fit
                raise click.ClickException(
                    f"source-proj {ctx.info_name} ran out of memory ({describe_out_of_memory(err)}); "
                    f"{self._memory_advice(ctx)}."
                ) from err
            raise click.ClickException(
                f"source-proj {ctx.info_name} failed unexpectedly ({type(err).__name__}: {first_line(err)}); this is "
                "a bug, please report it with the command (SOURCE_PROJ_TRACEBACK=1 shows where it happened)."
            ) from err

    def _spelled(self, text: str, mentions: tuple[tuple[str, object], ...]) -> str:
        """``text`` with the arguments it names in Python (``average='checkpoints'``) named by this command's options
        (``--average checkpoints``), where it has them; ``None`` is the options' ``all`` (``--basis-positions all``)."""
        for field, value in mentions:
            option = _option_of(self, field)
            if option is not None:
                typed = option if value is True else f"{option} {'all' if value is None else value}"
                text = text.replace(mention(field, value), typed)
        return text

    def _memory_advice(self, ctx: click.Context) -> str:
        """What to change when the command ran out of memory."""
        batch = ctx.params.get("batch_size")
        if ctx.info_name == "featurize" and isinstance(batch, int) and batch > 1:
            smaller = next(d for d in range(batch // 2, 0, -1) if batch % d == 0)  # a divisor: any store resumes
            return (
                f"featurize again with --batch-size {smaller} ({'half' if 2 * smaller == batch else 'a divisor'} of "
                f"{batch}: a batch's activations, and a language model's logits, grow with it; the store resumes "
                "where it stopped), or anew with --precision bf16 and --force"
            )
        if ctx.info_name in _MEMORY_ADVICE:
            return _MEMORY_ADVICE[ctx.info_name]
        if any(param.name == "device" for param in self.params):
            return "run it on the CPU (--device cpu), or on a machine with more memory"
        return "run it on a machine with more memory"


class _Interrupted(click.ClickException):
    """Ctrl-C: one sentence, exit status 130 (the shell's for SIGINT); a command that writes says it resumes."""

    exit_code = 130

    def __init__(self, command: str | None) -> None:
        resumes = "; run the same command again to resume where it stopped" if command in _RESUMABLE else ""
        super().__init__(f"source-proj {command} was interrupted{resumes}.")


_RESUMABLE = ("featurize", "fit", "baseline", "lds", "compare")  # commands whose finished work an interrupt keeps


_MEMORY_ADVICE = {  # what to change when a command runs out of memory
    "featurize": "featurize on a device with more memory, or anew with --precision bf16 and --force",
    "query": "ask for fewer --queries at a time, search with --search stream (the index read a chunk at a time), or "
    "run on the CPU (--device cpu)",
}


_OPTIONS: dict[str, str | None] = {
    # The arguments' fields set from an option of another name; the other fields an option sets share its name
    # (batch_size: --batch-size). None: no option sets it, though one of its name sets another class's field.
    "BaselineArguments.kind": "--kind",
    "FeaturizeArguments.num_workers": "--workers",
    "FeaturizeArguments.seed": None,  # featurize's --seed is the projection's
    "FeaturizeArguments.segmentation": "--segments",
    "FitArguments.auto_segments": "--segments",
    "FitArguments.segments_per_stage": "--segments",
    "IVFArguments.fp16": "--ivf-fp16",
    "LDSArguments.alpha": "--alpha",
    "LDSArguments.num_subsets": "--subsets",
    "ProjectionArguments.kind": "--projection",
    "ProjectionArguments.module_dims": "--module-dim",
    "SegmentationArguments.auto": "--segments",
    "SegmentationArguments.boundaries": "--segments",
    "SegmentationArguments.per_stage": "--segments",
}


class _Whole(click.IntRange):
    """A whole number in a range, refused as not "a valid integer" (click's own says "integer range" of ``abc``)."""

    name = "integer"


class _Real(click.FloatRange):
    """A number in a range, refused as not "a valid float" (click's own says "float range")."""

    name = "float"


def _option_of(command: click.Command, subject: str | None) -> str | None:
    """The option of ``command`` that set the field an error refuses (its ``subject``: ``"LDSArguments.num_subsets"``,
    ``"ProjectionArguments.module_dims['fc']"``) as the user types it (``"--subsets"``, ``"--module-dim 'fc'"``), or
    ``None``: a subject that is no arguments' field, or one no option of ``command`` sets."""
    field, keyed, key = (subject or "").partition("[")
    owner, _, name = field.partition(".")
    if not owner.endswith("Arguments"):
        return None
    options = {param.name: param.opts[0] for param in command.params if isinstance(param, click.Option)}
    option = _OPTIONS[field] if field in _OPTIONS else options.get(name)
    if option not in options.values():
        return None
    return f"{option} {key.removesuffix(']')}" if keyed else option


def _format_warning(message: Warning | str, *_: Any, **__: Any) -> str:
    return f"Warning: {message}\n"


def _ints(value: str | None, option: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError as err:  # "" too: an empty list would select nothing, not everything
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=option) from err


def _basis_positions(value: str, option: str = "--basis-positions") -> int | None:
    if value.strip().lower() == "all":
        return None
    try:
        positions = int(value)
    except ValueError:
        positions = 0
    if positions < 1:
        raise click.BadParameter(f"expected a whole number ≥ 1 or 'all', got {value!r}", param_hint=option)
    return positions


def _fisher_examples(value: str) -> int | Literal["auto"] | None:
    word = value.strip().lower()
    if word in ("auto", "all"):
        return "auto" if word == "auto" else None
    if not word.isdigit() or int(word) < 1:
        raise click.BadParameter(f"expected a whole number ≥ 1, 'all' or 'auto', got {value!r}",
                                 param_hint="--fisher-examples")  # fmt: skip
    return int(word)


def _segmentation(text: str | None) -> sp.SegmentationArguments | None:
    """``--segments`` read (``None`` where not given); a text that names no segmentation is refused as the option's
    value, as is one whose number is out of range (that one by its field, which names the option: ``_option_of``)."""
    if text is None:
        return None
    try:
        return sp.SegmentationArguments.parse(text)
    except sp.TrajectoryError as err:
        if err.subject is not None:
            raise
        raise click.BadParameter(str(err), param_hint="--segments") from err


def _names(value: str | None, option: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:  # "" too: an empty list would select nothing (or, left out, everything)
        raise click.BadParameter(f"expected comma-separated names, got {value!r}", param_hint=option)
    return names


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(sp.__version__, prog_name="source-proj")
def main() -> None:
    """Training data attribution with SOURCE: which training examples made the model do that.

    \b
    source-proj featurize --ckpts RUN --spec spec.py --out STORE   per-example gradients, projected
    source-proj fit STORE                                          segments, SOURCE operators, cached features
    source-proj query STORE --top-k 50                             most helpful / harmful training examples
    source-proj info STORE                                         what a store holds
    source-proj verify STORE [--repair]                            check every chunk; repair damage
    source-proj trajectory STORE --segments auto:3 --plot t.png    change between checkpoints, automatic cuts
    source-proj baseline STORE --kind trak,if,tracin               baselines fitted into the same store
    source-proj compare STORE [STORE ...] --methods source,trak    LDS table of methods (several stores: ensemble)
    source-proj lds STORE --method source --alpha 0.25,0.5,0.75    LDS of one method against α, with a plot
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
@click.option("--out", "store_path", required=True, help="Store to write (or resume): a directory or a URL (s3://…).")
@click.option("--dim", default=1024, show_default=True, type=_Whole(min=1), help="Projection dimension k.")
@click.option("--seed", default=0, show_default=True, type=_Whole(min=0), help="Projection seed.")
@click.option(
    "--projection",
    type=click.Choice([*PROJECTION_KINDS, "auto"]),
    default="eigen",
    show_default=True,
    help="eigen: each layer onto its leading Kronecker-factor eigenvectors, estimated from the run (most accurate; "
    "rademacher where no layer has them); factored: per-layer random Kronecker (fast, no per-example gradients); "
    "rademacher: dense random signs; fast_jl: TRAK's CUDA kernel; auto: fast_jl when available, else rademacher.",
)
@click.option(
    "--module-dim",
    "module_dims",
    multiple=True,
    help="factored: PATTERN=K projects the layers whose module name matches the glob PATTERN into K coordinates "
    "of their own (repeatable; a bare K: every layer, like bergson's per-module projection); the rest share --dim.",
)
@click.option(
    "--adam-rank",
    default=1,
    show_default=True,
    type=_Whole(min=1),
    help="eigen and factored, Adam/AdamW runs: rank R of each layer's approximation of D^-1/2 (R times the "
    "projection cost).",
)
@click.option(
    "--basis-examples",
    default=2048,
    show_default=True,
    type=_Whole(min=1),
    help="eigen: at most this many examples per stage and checkpoint whose sampled-label Fisher estimates the "
    "basis.",
)
@click.option(
    "--basis-layer-positions",
    default="2048",
    show_default=True,
    help="eigen: of those examples, the fewest that give every layer this many sampled positions (or twice its "
    "width, if more); 'all' for every one of --basis-examples.",
)
@click.option(
    "--basis-positions",
    default="64",
    show_default=True,
    help="eigen: at most this many positions (tokens, patches) of each of those examples enter the basis's "
    "factors; 'all' for every position.",
)
@click.option(
    "--basis-checkpoints",
    default="all",
    show_default=True,
    help="eigen: the basis averages at most this many checkpoints of each stage, evenly spaced (first and last "
    "included); 'all' for every checkpoint featurized.",
)
@click.option(
    "--checkpoints",
    "checkpoint_steps",
    default=None,
    help="Featurize only the checkpoints saved at these steps, e.g. 100,200,300 (the final one is always added).",
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
@click.option(
    "--fisher-examples",
    default="auto",
    show_default=True,
    help="Take the projected Fisher of about this many examples of each stage at each checkpoint (whole batches "
    "drawn in every row chunk, at least one a chunk) instead of all: the other batches skip the Fisher's backward, "
    "and the store keeps only those rows; a number needs --chunk-rows a multiple of --batch-size. 'all': every "
    "example; 'auto': max(32·k, 65536), so every example of a stage no larger.",
)
@click.option(
    "--curvature",
    type=click.Choice(["auto", "projected", "kfac", "both"]),
    default="auto",
    show_default=True,
    help="What fit's curvature is made of: the k x k projected Gauss-Newton, per-layer Kronecker factors in the "
    "full parameter space, or both; auto: projected, or kfac for --projection identity above 4,096 parameters "
    "(see docs/concepts/source.md).",
)
@click.option(
    "--batch-size",
    default=64,
    show_default=True,
    type=_Whole(min=1),
    help="Examples per forward/backward pass (memory against speed); a store resumes with a size that divides the "
    "one it was begun with (half of it, after running out of memory).",
)
@click.option(
    "--chunk-rows",
    default=1024,
    show_default=True,
    type=_Whole(min=1),
    help="Examples per store chunk (unit of resumption).",
)
@click.option("--device", default=None, help="cuda, cpu, ... (default: cuda when available).")
@click.option(
    "--workers", default=0, show_default=True, type=_Whole(min=0), help="DataLoader worker processes."
)
@click.option(
    "--segments",
    "segmentation",
    default=None,
    help="Fix the segmentation now: 3 (parts per stage), auto, auto:L or at:STEP,STEP. Adam runs and --fast need it "
    "(default 1 per stage); fit then keeps it.",
)
@click.option("--fast", is_flag=True, help="Also featurize each segment's averaged parameters (Fast-SOURCE).")
@click.option("--fast-only", is_flag=True, help="Featurize only the segments' averaged parameters (cheap mode).")
@click.option(
    "--shard",
    default=None,
    help="i/n: compute shard i of n as an independent process (slurm: from the SLURM array task). Under "
    "torchrun the ranks split the work without it.",
)
@click.option(
    "--shard-parameters",
    is_flag=True,
    help="Under torchrun: keep 1/W of the model's parameters on each rank, gathering a layer's only while it runs "
    "(models larger than one device; --projection eigen or factored).",
)
@click.option(
    "--shard-chunks",
    type=int,
    default=None,
    help="Row chunks per store file (zarr shard) of a new store (default: as many as fit in 256 MiB; 1: a file per "
    "chunk).",
)
@click.option("--force", is_flag=True, help="Replace an existing store (even a finished one with the same settings).")
@click.option(
    "--grow",
    is_flag=True,
    help="The store holds an earlier part of this run (it trained further): add only what is new, then re-fit.",
)
def featurize(
    run_dir: Path,
    spec_path: Path,
    store_path: str,
    dim: int,
    seed: int,
    projection: str,
    module_dims: tuple[str, ...],
    adam_rank: int,
    basis_examples: int,
    basis_layer_positions: str,
    basis_positions: str,
    basis_checkpoints: str,
    checkpoint_steps: str | None,
    precision: str,
    fisher: str,
    fisher_examples: str,
    curvature: str,
    batch_size: int,
    chunk_rows: int,
    device: str | None,
    workers: int,
    segmentation: str | None,
    fast: bool,
    fast_only: bool,
    shard: str | None,
    shard_parameters: bool,
    shard_chunks: int | None,
    force: bool,
    grow: bool,
) -> None:
    """Project per-example training gradients of every checkpoint into STORE (resumes if interrupted).

    Run it under torchrun (torchrun --nproc-per-node G -m source_proj.cli featurize ...) or as n
    independent processes with --shard i/n to split the work; see docs/howto/distributed.md.
    """
    projection_args = sp.ProjectionArguments(  # the options first: a bad one is refused before any work
        dim=dim, seed=seed, kind=projection, module_dims=_module_dims(module_dims), adam_rank=adam_rank,
        basis_examples=basis_examples, basis_positions=_basis_positions(basis_positions),
        basis_layer_positions=_basis_positions(basis_layer_positions, "--basis-layer-positions"),
        basis_checkpoints=_basis_positions(basis_checkpoints, "--basis-checkpoints"),
    )  # fmt: skip
    options = sp.FeaturizeArguments(
        batch_size=batch_size,
        chunk_rows=chunk_rows,
        fisher=fisher,
        curvature=curvature,  # type: ignore[arg-type]
        device=device,
        num_workers=workers,
        segmentation=_segmentation(segmentation),
        checkpoints=not fast_only,
        checkpoint_steps=_ints(checkpoint_steps, "--checkpoints"),
        segment_means=fast or fast_only,
        precision=precision,
        shard_chunks=shard_chunks,
        shard_parameters=shard_parameters,
        fisher_examples=_fisher_examples(fisher_examples),
    )
    part = Shard.parse(shard) if shard else None
    command = _replay(click.get_current_context())
    with launched(device):
        # Under torchrun each rank loads its inputs once it has joined the others: one that cannot stops them all,
        # where they would wait for it to join until the process group's timeout (where no launcher stops them).
        spec, trajectory, data, model, task = together(lambda: _featurize_inputs(spec_path, run_dir))
        before = _finished_meta(store_path) if not force else None
        store = sp.featurize(
            trajectory,
            model,
            task,
            data,
            store_path,
            projection=projection_args,
            options=options,
            overwrite=force,
            spec=str(spec.path),
            shard=part,
            grow=grow,
            command=command,
        )
    if not store.meta.get("featurized"):
        which = f"{part.rank}/{part.world}" if part is not None else shard
        click.echo(f"featurized shard {which} of {store.path}; the store is finished once every shard has run")
        return
    products = store.meta.get("products") or {"checkpoints": True}
    if before is not None and before == json.dumps(store.meta, sort_keys=True):
        click.echo(
            f"the store at {store.path} already holds these features; nothing to compute (it keeps the batch size "
            "and device it was featurized with)"
        )
    elif products.get("checkpoints", True):
        click.echo(f"featurized {len(store.meta['trajectory']['checkpoints'])} checkpoints into {store.path}")
    else:
        segments = len((store.meta.get("segmentation") or {}).get("segments") or [])
        click.echo(f"featurized {segments} segments' averaged parameters (Fast-SOURCE) into {store.path}")
    examples = store.meta["featurize"].get("fisher_examples")
    if examples is not None:
        click.echo(f"the Fisher of about {examples:,} examples a stage (--fisher-examples all: of every example)")
    recorded = store.meta.get("segmentation")
    if recorded is not None:
        click.echo(f"segmentation fixed for this store: {_segmentation_text(recorded['arguments'])}")
        if recorded.get("view"):
            click.echo(sp.TrajectoryView.from_description(recorded["view"]).table())


def _featurize_inputs(
    spec_path: Path, run_dir: Path
) -> tuple[Spec, sp.Trajectory, dict[str, Any], torch.nn.Module, sp.Task]:
    """featurize's spec, run, training data by stage, model and task."""
    spec = load_spec(spec_path)
    trajectory = sp.Trajectory.load(run_dir)
    data = {s.name: spec.train_data(s.name) for s in trajectory.stages}
    return spec, trajectory, data, spec.build_model(), spec.build_task()


def _finished_meta(path: str) -> str | None:
    """The metadata of a finished store at ``path`` (as JSON, to compare), else ``None``."""
    if not is_store(path):
        return None
    try:
        meta = sp.Store.open(path).meta
    except sp.SourceProjError:  # featurize itself says what is wrong with it
        return None
    return json.dumps(meta, sort_keys=True) if meta.get("featurized") else None


_NOT_REPLAYED = ("run_dir", "spec_path", "store_path", "force", "grow", "shard")


def _replay(ctx: click.Context) -> str:
    """The options of this command as given, those at their defaults left out (the store records them for
    ``verify --repair``); left out too: the paths, which the store records as they are now (``--ckpts``, ``--spec``,
    ``--out``: a store or its run may have moved since), and what would replace the store, grow it or pick one shard
    (``--force``, ``--grow``, ``--shard``)."""
    command = ctx.command
    words = [f"source-proj {command.name}"]
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in _NOT_REPLAYED:
            continue
        value = ctx.params.get(param.name)
        if param.is_flag:
            if value:
                words.append(param.opts[0])
        elif value is not None and value != param.get_default(ctx) and not (param.multiple and not value):
            for each in value if param.multiple else (value,):
                words += [param.opts[0], shlex.quote(str(each))]
    return " ".join(words)


def _module_dims(values: tuple[str, ...]) -> dict[str, int]:
    """``PATTERN=K`` (or a bare ``K`` for every layer) as ``{pattern: K}``."""
    dims = {}
    for value in values:
        pattern, _, k = value.rpartition("=")
        if not k.isdigit():
            raise click.BadParameter(
                f"expected PATTERN=K or K, K a whole number (e.g. '*.mlp.*=256'), not {value!r}",
                param_hint="--module-dim",
            )
        dims[pattern or "*"] = int(k)
    return dims


@main.command(cls=_Command)
@click.argument("store_path")
@click.option(
    "--segments",
    default=None,
    help="Equal segments per stage (3), auto:L for L segments placed automatically, auto to choose L too, or "
    "at:STEP,STEP to cut at those steps, as --boundaries (default: the store's, else 1).",
)
@click.option(
    "--curvature",
    type=click.Choice(["projected", "kfac"]),
    default=None,
    help="The projected Gauss-Newton or the Kronecker factors (default: projected, or kfac when the store holds "
    "only those).",
)
@click.option(
    "--boundaries", default=None, help="Explicit global steps to cut at, e.g. 100,200 (not with --segments)."
)
@click.option("--stages", default=None, help="Attribute to these stages' data only, e.g. pretrain (default: all).")
@click.option("--fast", is_flag=True, help="Fast-SOURCE: features at each segment's averaged parameters.")
@click.option(
    "--damping-factor",
    type=_Real(min=0.0),
    default=None,
    help="Damp each segment's curvature by the weight decay + this × its mean eigenvalue (0: the paper's SOURCE; "
    "default: 1 with the projected curvature, 0.3 with it on the eigen projection, 0 with kfac).",
)
@click.option(
    "--average",
    type=click.Choice(["steps", "checkpoints"]),
    default="steps",
    show_default=True,
    help="How a segment's gradients and curvature weigh its checkpoints: steps = the mean over its steps, "
    "interpolated between the checkpoints around them; checkpoints = the plain mean of the checkpoints its steps "
    "start from (the paper's rule).",
)
@click.option("--method", default=None, help="Name to store the result under [default: source, fast-source].")
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=Path), help="PNG of the trajectory view.")
@click.option("--device", default=None, help="Where the k×k algebra runs (default: cuda when available).")
@click.option(
    "--shard",
    default=None,
    help="i/n: compute shard i of n as an independent process (slurm: from the SLURM array task). Under "
    "torchrun the ranks split the work without it.",
)
@click.option("--force", is_flag=True, help="Replace a method fitted with other settings.")
def fit(
    store_path: str,
    segments: str | None,
    curvature: str | None,
    boundaries: str | None,
    stages: str | None,
    fast: bool,
    damping_factor: float | None,
    average: str,
    method: str | None,
    plot_path: Path | None,
    device: str | None,
    shard: str | None,
    force: bool,
) -> None:
    """Segment the trajectory, build SOURCE's operators and cache the training features in STORE.

    Under torchrun the ranks split the checkpoints' curvature and the cached chunks; --shard i/n
    writes one shard as an independent process.
    """
    if plot_path is not None:  # before the work, as trajectory's and lds's are
        check_figure_path(plot_path)
    if segments and boundaries:
        raise click.UsageError(
            "--segments and --boundaries each say where to cut; give one (--segments at:100,200 is --boundaries "
            "100,200)."
        )
    seg = _segmentation(segments)
    args = sp.FitArguments(
        segments_per_stage=seg.per_stage if seg and seg.auto is None and seg.boundaries is None else None,
        boundaries=_ints(boundaries, "--boundaries") or (seg.boundaries if seg else None),
        auto_segments=seg.auto if seg else None,
        stages=_names(stages, "--stages"),
        method=method,
        fast=fast,
        curvature=curvature,
        damping_factor=damping_factor,
        average=average,
    )
    with launched(device):
        store = sp.fit(store_path, args, overwrite=force, device=device, shard=Shard.parse(shard) if shard else None)
    if not (store.meta.get("methods") or {}).get(args.name, {}).get("complete"):
        click.echo(f"fitted shard {shard} of {args.name!r} in {store.path}; it is finished once every shard has run")
        return
    described = method_meta(store, args.name)
    if described.get("view"):
        view = sp.TrajectoryView.from_description(described["view"])
        click.echo(view.table())
        if plot_path is not None:
            click.echo(f"wrote {_save(plot_path, lambda: view.plot(plot_path))}")
    elif plot_path is not None:
        click.echo(f"no plot written to {plot_path}: its trajectory view shows where automatic segments cut, and "
                   f"{args.name!r} has none; `source-proj trajectory {store_path} --segments auto:L --plot "
                   f"{plot_path}` draws one")  # fmt: skip
    what = "averages the parameters of checkpoints" if described.get("means") else "averages checkpoints"
    for seg_desc, own in zip(described["segments"], segment_points(described), strict=True):
        t = seg_desc["mean_lr"] * (seg_desc["end_step"] - seg_desc["start_step"])
        click.echo(
            f"segment {seg_desc['stage']} steps [{seg_desc['start_step']}, {seg_desc['end_step']}) "
            f"{what} {_averaged(seg_desc, own)}  η̄K = {t:.4g}  λ = {seg_desc['weight_decay']:.3g} "
            f"+ {described['damping_factor']:g} × mean eigenvalue"
        )
    click.echo(f"fitted {args.name!r} ({described['kind']}) in {store.path}; attributes stages {described['stages']}")


@main.command(cls=_Command)
@click.argument("store_path")
@click.option("--segments", default=None, help="auto:L — place L segments (default: the store's automatic cuts).")
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=Path), help="Write the view as a PNG.")
def trajectory(store_path: str, segments: str | None, plot_path: Path | None) -> None:
    """Show how curvature and gradients change between checkpoints, and where automatic segments cut."""
    if plot_path is not None:
        check_figure_path(plot_path)
    seg = _segmentation(segments)  # refused before the store is read
    if seg is not None and seg.auto is None:
        raise click.BadParameter("the trajectory view places automatic cuts: write auto:L", param_hint="--segments")
    view = _trajectory_view(sp.Store.open(store_path), seg)
    click.echo(view.table())
    if plot_path is not None:
        click.echo(f"wrote {_save(plot_path, lambda: view.plot(plot_path))}")


def _trajectory_view(store: sp.Store, seg: sp.SegmentationArguments | None) -> sp.TrajectoryView:
    if seg is not None:
        return store_view(store, seg.auto)
    meta = store.meta
    recorded = [("featurize", (meta.get("segmentation") or {}).get("view"))]
    recorded += [(f"method {name!r}", m.get("view")) for name, m in (meta.get("methods") or {}).items()]
    views = [(who, v) for who, v in recorded if v]
    if not views:
        raise click.UsageError("The store holds no automatic segmentation yet; pass --segments auto:L.")
    if any(v != views[0][1] for _, v in views):  # showing the first would hide which one it is
        held = ", ".join(f"{who} at {v['cuts']}" for who, v in views)
        raise click.UsageError(
            f"The store holds automatic cuts that differ ({held}); pass --segments auto:L for the L to show."
        )
    return sp.TrajectoryView.from_description(views[0][1])


def _select(n: int, spec: str | None) -> list[int]:
    """The query indices ``--queries`` names (``0:10``, ``3,5,8``, ``:5``; default all ``n``); refuses
    anything that is not an index or a non-empty range inside ``0..n-1``."""
    if n == 0:
        raise click.UsageError("The spec's query_data() holds no examples; return the examples to explain.")
    if spec is None:
        return list(range(n))
    out: list[int] = []
    for part in spec.split(","):
        text = part.strip()
        try:
            if ":" in text:
                a, b = text.split(":", 1)
                start, stop = int(a) if a.strip() else 0, int(b) if b.strip() else n
            else:
                start = int(text)
                stop = start + 1
        except ValueError:
            raise click.BadParameter(
                f"{text!r} is neither an index nor a range START:STOP; write e.g. 0:10 or 3,5,8", param_hint="--queries"
            ) from None
        if ":" in text and start >= stop:
            raise click.BadParameter(
                f"the range {text} is empty; write START:STOP with START < STOP, e.g. 0:{min(n, 10)}",
                param_hint="--queries",
            )
        if not 0 <= start < stop <= n:
            what = f"the range {text}" if ":" in text else f"query index {text}"
            raise click.BadParameter(
                f"{what} reaches outside the {n} query examples; use indices from 0 to {n - 1}", param_hint="--queries"
            )
        out.extend(range(start, stop))
    return out


def _check_out(path: Path | None) -> None:
    """Refuse an ``--out`` path results cannot be written to, before the work that makes them."""
    if path is None:
        return
    if path.is_dir():
        raise click.BadParameter(f"{path} is a directory; give a file name ending in .csv, .jsonl or .parquet",
                                 param_hint="--out")  # fmt: skip
    if path.suffix.lower() not in (".csv", ".jsonl", ".parquet"):
        raise click.BadParameter(
            f"{path.name} has no known format ({path.suffix or 'no suffix'}); end it in .csv, .jsonl or .parquet",
            param_hint="--out",
        )
    if path.suffix.lower() == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise click.BadParameter(
            "writing parquet needs pyarrow; `pip install source-proj[parquet]`, or end the name in .csv or .jsonl",
            param_hint="--out",
        )


def _write(records: list[dict[str, Any]], path: Path, columns: tuple[str, ...] = ()) -> None:
    """Write the results in the format of ``path``'s suffix, atomically (never a half-written file); ``columns``:
    the CSV header where there are no records (every score zero: a header and no rows, not a crash)."""
    _check_out(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(records[0]) if records else list(columns))
        writer.writeheader()
        writer.writerows([{key: _inert_cell(value) for key, value in r.items()} for r in records])
        data = text.getvalue().encode("utf-8", "backslashreplace")  # a lone surrogate as \udXXX
    elif suffix == ".jsonl":
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as err:
            raise click.ClickException(
                "Writing parquet needs pyarrow; `pip install source-proj[parquet]` or use .csv/.jsonl."
            ) from err
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(records), sink)
        data = sink.getvalue().to_pybytes()
    _save(path, lambda: atomic_write_bytes(path, data))


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""How a CSV cell that a spreadsheet runs as a formula begins."""


def _inert_cell(value: Any) -> Any:
    """A CSV cell as a spreadsheet shows it and runs nothing of: a text (an example's description, a stage's name) that
    begins as a formula would, quoted by a leading ``'``; numbers as they are."""
    return f"'{value}" if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value


def _save(path: Path, write: Callable[[], Any]) -> Any:
    """Run ``write`` (writing ``path``), turning an operating-system error into one sentence."""
    try:
        return write()
    except OSError as err:
        raise click.ClickException(
            f"Writing {path} failed ({err.strerror or err}); choose a path you can write to."
        ) from err


@main.command(cls=_Command)
@click.argument("store_path")
@click.option(
    "--spec",
    "spec_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Spec file (default: the one recorded by featurize).",
)
@click.option("--queries", "which", default=None, help="Query indices: 0:10, 3,5,8 (default: all).")
@click.option(
    "--top-k",
    default=10,
    show_default=True,
    type=_Whole(min=1),
    help="Training examples listed per query and kind (at most the training set's size).",
)
@click.option("--method", default="source", show_default=True, help="Fitted method to score with (see `info`).")
@click.option(
    "--out",
    "out_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Write all results (.csv, .jsonl, .parquet): query, kind, rank, stage, index, score, description; kind is "
    "helpful or harmful for the query (for a task measuring a loss or an error, a positive score is harmful); an "
    "existing file is replaced.",
)
@click.option(
    "--show", default=5, show_default=True, type=_Whole(min=0), help="Queries to print on the terminal."
)
@click.option(
    "--html",
    "html_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Write an HTML report: each query's text and its top training examples' texts (spec's describe; one "
    "longer than 500 characters shows its start, the whole text a click away), the helpful examples first; an "
    "existing file is replaced.",
)
@click.option("--device", default=None, help="Where query gradients are computed (default: cuda when available).")
@click.option(
    "--search",
    "search_backend",
    type=click.Choice(list(SEARCH_BACKENDS)),
    default="auto",
    show_default=True,
    help="Top-k search: auto (FAISS where installed, else torch), faiss, torch matmul+top-k on the device, stream "
    "store chunks (bounded memory), or ivf (approximate: FAISS inverted file, see --nprobe); faiss and ivf need "
    'pip install "source-proj[faiss]".',
)
@click.option(
    "--search-devices",
    default=None,
    help="Shard the index over these devices, e.g. cuda:0,cuda:1 (default: --device, or every GPU when the "
    "features do not fit on it).",
)
@click.option("--nlist", type=_Whole(min=1), default=None, help="--search ivf: cells (default 4·√N).")
@click.option(
    "--nprobe", type=_Whole(min=1), default=32, show_default=True, help="--search ivf: cells scanned per query."
)
@click.option("--ivf-fp16", is_flag=True, help="--search ivf: hold the rows in float16 (half the memory).")
def query(
    store_path: str,
    spec_path: Path | None,
    which: str | None,
    top_k: int,
    method: str,
    out_path: Path | None,
    show: int,
    html_path: Path | None,
    device: str | None,
    search_backend: str,
    search_devices: str | None,
    nlist: int | None,
    nprobe: int,
    ivf_fp16: bool,
) -> None:
    """Print the most helpful and most harmful training examples of each query.

    The helpful ones come first, named by the task's words: for a margin (classification) the largest scores, for
    a loss or an error (language modelling, seq2seq, regression) the most negative ones (docs/concepts/scores.md).

    Training examples are described (by the spec's describe function) only where they are printed or
    written, each once.
    """
    _check_out(out_path)
    if html_path is not None and html_path.is_dir():  # before the work, as --out is
        raise click.BadParameter(f"{html_path} is a directory; give a file name such as report.html",
                                 param_hint="--html")  # fmt: skip
    context = click.get_current_context()
    given = [f"--{n.replace('_', '-')}" for n in ("nlist", "nprobe", "ivf_fp16")
             if context.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]  # fmt: skip
    if given and search_backend != "ivf":
        one = len(given) == 1
        raise click.UsageError(
            f"{' and '.join(given)} {'applies' if one else 'apply'} to the approximate search only; add --search ivf, "
            f"or drop {'it' if one else 'them'}."
        )
    if search_devices is not None and search_backend in ("faiss", "ivf"):
        raise click.UsageError(
            f"--search-devices shards --search torch, stream or auto; --search {search_backend} runs on one device, "
            "so drop it."
        )
    ivf = sp.IVFArguments(nlist=nlist, nprobe=nprobe, fp16=ivf_fp16)
    devices = _names(search_devices, "--search-devices")
    store = sp.Store.open(store_path)
    spec = _spec_of(store, spec_path)
    queries = spec.query_data()
    indices = _select(len(queries), which)
    task = spec.build_task()
    attributor = sp.Attributor(
        store,
        spec.build_model(),
        task,
        method=method,
        device=device,
        search_backend=search_backend,
        search_devices=devices,
        search_ivf=ivf,
    )
    result = attributor.top_k(torch.utils.data.Subset(queries, indices), top_k)
    describe = _describer(store, spec)
    lists = _lists(result)  # the helpful examples first, for every task (for a loss: the most negative scores)
    shown = indices[:show]
    shown_rows = [int(row) for _, _, ids, _ in lists for row in ids[: len(shown)].ravel()]
    text_layout = any(len(describe(*result.locate(row))) > 22 for row in shown_rows)
    if text_layout:  # texts: one line per example
        _echo_texts(result, lists, shown, spec, describe)
    for q, qi in enumerate([] if text_layout else shown):
        click.echo(f"\nquery {qi}")
        click.echo(f"  {'rank':>4}  {lists[0][0][:34]:<34} {lists[1][0][:34]}")
        for rank in range(result.positive_ids.shape[1]):
            row = []
            for _, sign, ids, scores in lists:
                if not sign * scores[q, rank] > 0:
                    row.append(f"{'–':<22} {'':>10}")
                    continue
                stage, index = result.locate(int(ids[q, rank]))
                label = f"{stage}[{index}] {_printable(describe(stage, index))}"[:22]
                row.append(f"{label:<22} {scores[q, rank]:+.3e}")
            click.echo(f"  {rank + 1:>4}  {row[0]:<34} {row[1]}".rstrip())
    if len(indices) > show:
        where = f"all are in {out_path}" if out_path is not None else "use --out to save all"
        click.echo(f"\n({len(indices) - show} more queries not shown; {where})")
    few = result.short_lists()  # by sign: (score > 0, score < 0)
    few_helpful, few_harmful = few if result.positive_helps else few[::-1]
    counts = (few_helpful, few_harmful)
    short = [(n, kind, ">" if sign > 0 else "<") for n, (kind, sign, _, _) in zip(counts, lists, strict=True) if n]
    if short:  # a kind whose lists all are full is left out ("0 of 5 queries have fewer … and 2 fewer …")
        (n, kind, sign), *other = short
        also = "".join(f" and {m} fewer than {top_k} with a score {s} 0 ({k})" for m, k, s in other)
        click.echo(
            f"\n{n} of {len(indices)} queries {'has' if n == 1 else 'have'} fewer than {top_k} training examples "
            f"with a score {sign} 0 ({kind}){also}; their lists stop there."
        )
    if out_path is not None:
        records = result.records()  # kinds named by what each row did to the query for its task
        for r in tqdm(records, desc="describe", unit="row", delay=2.0):
            r["query"] = indices[r["query"]]
            r["description"] = describe(r["stage"], r["index"])
        _write(records, out_path, ("query", "kind", "rank", "stage", "index", "score", "description"))
        click.echo(f"wrote {len(records)} rows to {out_path}")
    if html_path is not None:
        texts = [spec.describe_query(i) or f"query {i}" for i in indices]
        names = [f"query {i}" for i in indices]
        title = f"{store_path}: {method}"
        report = _save(html_path, lambda: text_report(result, texts, describe, html_path, title=title,
                                                      query_names=names))  # fmt: skip
        click.echo(f"wrote {report}")


def _describer(store: sp.Store, spec: Spec) -> Callable[[str, int], str]:
    """The spec's ``describe``, each example described once; first checks (cheaply) that the spec's
    training data are the store's, so that descriptions name the examples that were scored."""
    if spec.describes:
        names = [s["name"] for s in store.meta["trajectory"]["stages"]]
        data = {name: training_examples(spec.train_data(name), name, resumes="") for name in names}
        check_data(store.path, store.meta, data, quick=True)
    return functools.cache(spec.describe)


def _lists(result: sp.QueryResult) -> list[tuple[str, float, np.ndarray, np.ndarray]]:
    """The result's two lists by meaning, the helpful one first: (words, sign of its scores, ids ``[Q, k]``,
    scores ``[Q, k]``) each, the words the task's ``score_labels`` up to their first " (". For a loss or an error
    (``positive_helps`` False) the helpful list holds the most negative scores."""
    words = [label.split(" (")[0] for label in result.score_labels]  # words for a score > 0 and < 0
    helps = 1.0 if result.positive_helps else -1.0
    helpful, harmful = (words[0], words[1]) if result.positive_helps else (words[1], words[0])
    return [
        (helpful, helps, result.helpful_ids, result.helpful_scores),
        (harmful, -helps, result.harmful_ids, result.harmful_scores),
    ]


def _echo_texts(
    result: sp.QueryResult,
    lists: list[tuple[str, float, np.ndarray, np.ndarray]],
    indices: list[int],
    spec: Spec,
    describe: Callable[[str, int], str],
) -> None:
    """Each query's text, then its top examples' scores, stages and texts (100 characters each), the helpful ones
    first (``_lists``)."""
    width = max(len(label) for label, _, _, _ in lists)
    for q, qi in enumerate(indices):
        click.echo(f"\nquery {qi}: {_printable(spec.describe_query(qi))[:100]}")
        for label, sign, ids, scores in lists:
            for row, score in zip(ids[q], scores[q], strict=True):
                if not sign * score > 0:
                    continue
                stage, index = result.locate(int(row))
                text = _printable(" ".join(describe(stage, index).split()))
                click.echo(f"  {label:<{width}} {score:+.3e}  {stage}[{index}]  {text[:100]}")


def _printable(text: str) -> str:
    """``text`` as the terminal shows it: every character that is not printable (a control character such as a
    newline or an escape sequence's ESC, a zero-width or direction mark, a lone surrogate, which no terminal
    encoding holds) written as its Python escape, so that data can neither break a line nor drive the terminal."""
    kept = (c.isprintable() or unicodedata.category(c) == "Zs" for c in text)  # Zs: a no-break space is a space
    return "".join(c if keep else c.encode("unicode_escape").decode() for c, keep in zip(text, kept, strict=True))


def _spec_of(store: sp.Store, spec_path: Path | None) -> Spec:
    path = spec_path or store.meta.get("spec")
    if path is None:
        raise click.UsageError("The store records no spec file; pass --spec.")
    return load_spec(path)


@main.command(cls=_Command)
@click.argument("store_path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(store_path: str, as_json: bool) -> None:
    """Describe a store: what produced it, how far featurize got, and its fitted methods."""
    store = sp.Store.open(store_path)
    summary = store_summary(store)
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
    if proj.get("basis") and "modules" not in proj["basis"]:  # an eigen capture still training
        click.echo("  a basis per captured window; the store's basis is averaged when the run closes")
    elif proj.get("basis"):  # the eigen projection: how much of the Fisher trace its blocks keep
        basis = proj["basis"]
        click.echo(
            f"  basis of {len(basis['modules'])} layers from checkpoints {basis['checkpoints']} (at most "
            f"{basis['examples']} examples of each stage at each), keeps {basis['captured']:.0%} of their Fisher "
            "trace (raise --dim when that is low)"
        )
        if summary["basis_arguments"]:  # absent from a store featurized before they were recorded
            click.echo(f"  basis asked for with {' '.join(basis_options(summary['basis_arguments']))}")
    click.echo(f"trajectory  {traj['path']} ({traj['fingerprint']}…)")
    for s in traj["stages"]:
        click.echo(f"  stage {s['name']}: steps [{s['start_step']}, {s['end_step']}), {s['dataset_size']} examples")
    click.echo(f"  checkpoints at steps {traj['checkpoints']}")
    click.echo(
        f"features    {summary['features']}: {summary['featurized_chunks']} chunks (Fisher: {summary['fisher']})"
    )
    for grown in summary["growth"]:  # a method dropped by a growth and complete now was fitted since
        refit = [m for m in grown["dropped_methods"] if not (summary["methods"].get(m) or {}).get("complete")]
        dropped = f"; re-fit {', '.join(refit)}" if refit else ""
        rewound = f", rewound to step {grown['rewound_to']}" if grown.get("rewound_to") is not None else ""
        click.echo(f"  grown from the run with checkpoints {grown['checkpoints']}{rewound}{dropped}")
    if summary["segmentation"]:  # featurize --segments / --fast fixed it: fit takes these segments
        click.echo(f"  segmentation fixed by featurize: {_segmentation_text(summary['segmentation'])}")
    if summary["segment_means"]:
        only = "" if summary["checkpoint_features"] else " only (no checkpoint features)"
        click.echo(f"  features at each segment's mean weights{only} (Fast-SOURCE, --fast)")
    for name, m in summary["methods"].items():
        state = "complete" if m["complete"] else f"UNFINISHED (complete it: {method_command(store, name)})"
        click.echo(f"method {name}: {m['kind']}, {state}, attributes stages {m['stages']}")
        settings = m["settings"]
        if m["kind"] in ("source", "fast-source") and settings["damping_factor"] is not None:
            average = f"; each segment averaged over its {settings['average']}" if settings.get("average") else ""
            click.echo(
                f"  curvature {settings['curvature']}; damping λ = weight decay + {settings['damping_factor']:g} × "
                f"mean eigenvalue{average}"
            )
        elif settings:
            click.echo("  " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items()))
        for seg in m["segments"]:
            click.echo(
                f"  {seg['stage']} [{seg['start_step']}, {seg['end_step']}) checkpoints "
                f"{_averaged(seg, seg['averages'])} η̄K={seg['time']:.4g} weight decay {seg['weight_decay']:.3g}"
            )


def _averaged(segment: dict[str, Any], points: list[tuple[int, float]] | None) -> str:
    """The checkpoints a segment's features average, each with its weight (``segment_points``), else its own."""
    if points:
        return ", ".join(f"{step} ×{weight:.3f}" for step, weight in points)
    return ", ".join(str(c) for c in segment["checkpoints"])


def _segmentation_text(arguments: dict[str, Any]) -> str:
    if "auto" in arguments:
        return f"{arguments['auto']} automatic segments" if arguments["auto"] else "automatic segments, L chosen too"
    if "boundaries" in arguments:
        return f"boundaries at steps {arguments['boundaries']}"
    count = arguments.get("per_stage")
    return f"{count} segment{'' if count == 1 else 's'} a stage"


@main.command(cls=_Command)
@click.argument("store_path")
@click.option("--repair", is_flag=True, help="Mark damaged chunks pending so the writing command recomputes them.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(store_path: str, repair: bool, as_json: bool) -> None:
    """Check STORE end to end: metadata, shapes, every chunk's crc, completeness, fitted methods.

    Exits with 1 while damage or an inconsistency remains (after --repair: 0, and the report says
    which command recomputes what was lost).
    """
    report = verify_store(store_path, repair=repair)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else "\n".join(report.lines()))
    if report.status == "damaged":
        sys.exit(1)


@main.command(cls=_Command)
@click.argument("store_path")
@click.option("--kind", "kinds", required=True, help=f"Comma-separated baselines: {','.join(sp.BASELINES)}.")
@click.option("--stages", default=None, help="Attribute to these stages' data only (default: all).")
@click.option(
    "--damping-factor",
    default=3.0,
    show_default=True,
    type=_Real(min=0),
    help="IF: damping = factor × mean eigenvalue (0: none; eigenvalues below 1e-6 × the largest are dropped).",
)
@click.option(
    "--trak-dim",
    default=None,
    type=_Whole(min=1),
    help="TRAK: kernel coordinates d (default: min(k, N/10)).",
)
@click.option("--spec", "spec_path", default=None, type=click.Path(path_type=Path), help="Spec file (RepSim).")
@click.option(
    "--device",
    default=None,
    help="Where RepSim's forward passes run (default: cuda when available); the other baselines compute on the CPU.",
)
@click.option("--force", is_flag=True, help="Replace a baseline fitted with other settings.")
def baseline(
    store_path: str,
    kinds: str,
    stages: str | None,
    damping_factor: float,
    trak_dim: int | None,
    spec_path: Path | None,
    device: str | None,
    force: bool,
) -> None:
    """Fit baselines (TRAK, IF, TracIn-CP, Grad-Dot, Grad-Cos, RepSim) into STORE, next to SOURCE."""
    chosen = [  # every kind's before any is fitted (or the store read)
        sp.BaselineArguments(kind=kind, stages=_names(stages, "--stages"), damping_factor=damping_factor,
                             trak_dim=trak_dim)
        for kind in _names(kinds, "--kind") or ()
    ]  # fmt: skip
    store = sp.Store.open(store_path, writable=True)
    for args in chosen:
        extra: dict[str, Any] = {}
        if args.kind == "repsim":
            spec = _spec_of(store, spec_path)
            names = [s["name"] for s in store.meta["trajectory"]["stages"]]
            data = {n: spec.train_data(n) for n in names}
            extra = dict(model=spec.build_model(), task=spec.build_task(), train_data=data)
        sp.fit_baseline(store, args, device=device, overwrite=force, **extra)
        click.echo(f"fitted {args.kind!r} in {store.path}")


def _evaluation_options(fn: Any) -> Any:
    options = [
        click.argument("store_paths", nargs=-1, required=True),
        click.option("--alpha", "alphas", default="0.5", show_default=True, help="Kept fraction(s), e.g. 0.25,0.5."),
        click.option("--subsets", default=100, show_default=True, type=_Whole(min=MIN_SUBSETS),
                     help="M, random subsets per α."),
        click.option("--repeats", default=5, show_default=True, type=_Whole(min=1),
                     help="R, retrains per subset (averaged)."),
        click.option("--seed", default=0, show_default=True, type=_Whole(min=0),
                     help="Seed of the subsets and retrain seeds."),
        click.option("--workers", default=1, show_default=True, type=_Whole(min=1),
                     help="Parallel retraining processes."),
        click.option("--resample", default="subsets", show_default=True,
                     type=click.Choice(["subsets", "queries", "both"]),
                     help="What the 95% bootstrap intervals resample: the subsets (the SOURCE paper's), the queries, "
                          "or both at once."),
        click.option("--queries", "which", default=None, help="Query indices: 0:100, 3,5,8 (default: all)."),
        click.option("--cache", "cache", default=None, type=click.Path(path_type=Path),
                     help="Directory of finished retrains (default: FIRST_STORE.retrains); resumes."),
        click.option("--truth", "truth_path", default=None, type=click.Path(path_type=Path),
                     help="Your own ground truth instead of retraining: an .npz of masks [M, N] and measurements "
                          "[M, R, Q] (Counterfactuals.load), a measurement per query_data() or --queries example."),
        click.option("--spec", "spec_path", default=None, type=click.Path(path_type=Path),
                     help="Spec file with retrain(keep, seed) (default: the one recorded by featurize)."),
        click.option("--out", "out_path", default=None, type=click.Path(path_type=Path),
                     help="Write per-query correlations (.csv, .jsonl or .parquet)."),
        click.option("--html", "html_path", default=None, type=click.Path(path_type=Path),
                     help="Write an HTML report (one self-contained file): the table, the settings and a picture of "
                          "each query's correlation under each method, the noise ceiling marked; an existing file is "
                          "replaced."),
        click.option("--device", default=None,
                     help="Where query gradients are computed (default: cuda when available)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _finite_or_none(value: float) -> float | None:
    """A correlation for a results file: None (JSON null, an empty CSV cell) where undefined, as NaN is not JSON."""
    value = float(value)
    return value if math.isfinite(value) else None


def _claim_cache(directory: Path, spec: Spec) -> None:
    """Record which spec file filled a retrain cache, and warn when another (or an edited) one reuses it: cached
    retrains are keyed by kept subset and seed only, so a changed retrain() would get the old measurements. A cache
    that holds retrains but records no spec (filled from Python) is claimed with a warning."""
    digest = hashlib.sha256(Path(spec.path).read_bytes()).hexdigest()
    stamp = directory / "spec.sha256"
    if not stamp.exists():
        if any((directory / "retrains").glob("*.npy")):
            warnings.warn(
                f"The retrain cache {directory} holds retrains that no spec file is recorded for (filled from "
                f"Python, or by an older version) and reuses them as those of {spec.path}; if another retrain() or "
                "query_data() made them, pass a fresh --cache.",
                stacklevel=2,
            )
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(stamp, f"{digest}  {Path(spec.path).resolve()}\n".encode())
        return
    recorded, _, origin = stamp.read_text().strip().partition("  ")
    if recorded != digest:
        warnings.warn(
            f"The retrain cache {directory} holds the retrains of the spec file {origin} as it was then, not of "
            f"{spec.path} as it is now, and reuses them as they are; if retrain() or query_data() changed, pass a "
            f"fresh --cache, and if not, delete {stamp}.",
            stacklevel=2,
        )


def _lds_table(
    store_paths: tuple[str, ...],
    methods: list[str] | None,
    alphas: str,
    subsets: int,
    repeats: int,
    seed: int,
    workers: int,
    resample: str,
    which: str | None,
    cache: Path | None,
    truth_path: Path | None,
    spec_path: Path | None,
    out_path: Path | None,
    html_path: Path | None,
    device: str | None,
    external: dict[str, tuple[Path, np.ndarray]] | None = None,
) -> tuple[dict[str, list[Any]], list[float]]:
    """The LDS of ``methods`` (``None``: every method fitted in the first store) at each ``--alpha``, printed (and
    written to ``--out``) with the ground truth's noise ceiling and, for several methods, each one's paired
    difference from the best; ``external`` (name → its file and matrix) adds scores made elsewhere. Every option
    is checked before the store is read, every external matrix before the retrains. ``truth_path`` (``--truth``)
    brings the ground truth instead of the retrains; ``html_path`` (``--html``) writes ``ev.lds_report``."""
    brought = None if truth_path is None else _brought_truth(truth_path)
    try:
        levels = [float(a) for a in alphas.split(",")] if brought is None else [brought.alpha]
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated fractions, got {alphas!r}", param_hint="--alpha") from err
    arguments = [ev.LDSArguments(alpha=a, num_subsets=subsets, repeats=repeats, seed=seed, workers=workers)
                 for a in levels]  # fmt: skip
    _check_out(out_path)
    _check_html(html_path)
    first = sp.Store.open(store_paths[0])
    methods = methods or sorted(first.meta.get("methods") or {})
    if not methods:
        raise click.UsageError("The store has no fitted method; run `source-proj fit` or `source-proj baseline` first.")
    spec = _spec_of(first, spec_path)
    queries = spec.query_data()
    indices = _select(len(queries), which)
    twice = sorted(i for i, count in Counter(indices).items() if count > 1)
    if twice:
        raise click.BadParameter(
            f"it names query {twice[0]} more than once, and the LDS, a mean over queries, would count it twice; "
            "name each query once",
            param_hint="--queries",
        )
    subset = torch.utils.data.Subset(queries, indices)
    model, task = spec.build_model(), spec.build_task()
    scores, rows = {}, None
    for method in methods:
        scorer = sp.Ensemble.open(store_paths, model, task, method=method, device=device)
        if rows is not None and scorer.rows != rows:
            raise click.ClickException(
                f"{methods[0]!r} and {method!r} attribute different training rows "
                f"({[(r.stage, r.size) for r in rows]} against {[(r.stage, r.size) for r in scorer.rows]}), and one "
                "ground truth draws its subsets over one set of rows; compare methods fitted on the same stages."
            )
        if rows is None and brought is None:  # every α checked against the rows before the scores and the retrains
            for alpha in levels:
                try:
                    ev.sample_subsets(sum(r.size for r in scorer.rows), subsets, alpha, seed)
                except sp.TaskError as err:  # an α that keeps no row, or every one, of these rows
                    raise click.BadParameter(str(err), param_hint="--alpha") from err
        rows = scorer.rows
        scores[method] = scorer.scores(subset)
    assert rows is not None
    for name, (path, matrix) in (external or {}).items():
        if name in scores:
            raise click.ClickException(f"--scores names {name!r}, a fitted method compared; give the file another "
                                       "name.")  # fmt: skip
        scores[name] = _external_scores(path, matrix, len(queries), indices, sum(r.size for r in rows))
    truths = [] if brought is None else [_fitted_truth(brought, truth_path, len(queries), indices, rows)]
    cache_dir = cache or Path(str(store_paths[0]).rstrip("/") + ".retrains")
    if brought is None:
        _claim_cache(cache_dir, spec)
    for args in arguments if brought is None else []:
        truth = ev.lds_ground_truth(spec.retrainer(), rows, cache_dir, args)
        if truth.measurements.shape[2] != len(queries):
            raise click.ClickException(
                f"retrain() in {spec.path} returned {truth.measurements.shape[2]} measurements but query_data() has "
                f"{len(queries)} examples; return one measurement per query_data() example."
            )
        truths.append(truth.select(indices))
    summary = ev.LDSArguments(seed=seed, resample=resample)  # type: ignore[arg-type]
    results = ev.compare(scores, truths, summary)
    if out_path is not None:
        records = [
            {"method": m, "alpha": a, "query": indices[q], "spearman": _finite_or_none(r.per_query[q])}
            for m, rs in results.items()
            for a, r in zip(levels, rs, strict=True)
            for q in range(len(indices))
        ]
        _write(records, out_path)
        click.echo(f"wrote {len(records)} rows to {out_path}")
    ensemble = f" (ensemble of {len(store_paths)} models)" if len(store_paths) > 1 else ""
    over = {"subsets": "the subsets", "queries": "the queries", "both": "subsets and queries"}[resample]
    shape = f"M={truths[0].masks.shape[0]} subsets, R={truths[0].measurements.shape[1]} retrains each"
    origin = "" if truth_path is None else f" (ground truth: {truth_path})"
    click.echo(f"LDS over {len(indices)} queries, {shape}{ensemble}{origin}; intervals resample {over}:")
    click.echo(ev.format_table(results, levels))
    comparison = ev.paired_comparison(scores, truths, results, summary)
    click.echo(ev.format_comparison(scores, truths, results, summary, comparison))
    if html_path is not None:
        settings = {
            "store" + ("s" if len(store_paths) > 1 else ""): ", ".join(str(s) for s in store_paths),
            "queries chosen": which or "all",
            "ground truth": str(truth_path) if truth_path is not None else f"retrains cached in {cache_dir}",
        }
        report = _save(html_path, lambda: ev.lds_report(scores, truths, results, html_path, args=summary,
                                                        settings=settings, comparison=comparison))  # fmt: skip
        click.echo(f"report: {report}")
    return results, levels


def _check_html(path: Path | None) -> None:
    """Refuse an ``--html`` path the report cannot be written to, or a report matplotlib cannot draw, before the work
    that makes it."""
    if path is None:
        return
    if path.is_dir():
        raise click.BadParameter(f"{path} is a directory; give a file name such as {path / 'lds.html'}",
                                 param_hint="--html")  # fmt: skip
    if not path.parent.is_dir():
        raise click.BadParameter(f"{path.parent} is not an existing folder; create it first, or name a file in one",
                                 param_hint="--html")  # fmt: skip
    pyplot()


def _brought_truth(path: Path) -> ev.Counterfactuals:
    """The ground truth of ``--truth``, refused where an option that describes the retrains it replaces is given."""
    ctx = click.get_current_context()
    for name, option in (("alphas", "--alpha"), ("subsets", "--subsets"), ("repeats", "--repeats"),
                         ("workers", "--workers"), ("cache", "--cache")):  # fmt: skip
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            raise click.BadParameter(f"it brings the ground truth, and {option} describes the retrains that would "
                                     "make one; leave it out", param_hint="--truth")  # fmt: skip
    return ev.Counterfactuals.load(path)


def _fitted_truth(
    truth: ev.Counterfactuals, path: Path | None, queries: int, indices: list[int], rows: list[StageRows]
) -> ev.Counterfactuals:
    """A ``--truth`` ground truth restricted to the ``--queries``: it measures every query_data() example or the
    selected ones (taken as they are), over the methods' training rows; one sentence otherwise."""
    total = sum(r.size for r in rows)
    if truth.masks.shape[1] != total:
        raise click.ClickException(
            f"The ground truth in {path} keeps subsets of {truth.masks.shape[1]} training rows, but the methods "
            f"attribute {total} ({[(r.stage, r.size) for r in rows]}); its masks need a column per attributed row."
        )
    measured = truth.measurements.shape[2]
    if measured not in (queries, len(indices)):
        raise click.ClickException(
            f"The ground truth in {path} measures {measured} queries; give a measurement per query_data() example "
            f"({queries}) or per --queries one ({len(indices)})."
        )
    return truth.select(indices) if measured == queries else truth


def _external(values: tuple[str, ...]) -> dict[str, tuple[Path, np.ndarray]]:
    """``--scores NAME=FILE.npy`` read into name → (path, matrix): each name once, each file a 2-D array of finite
    real numbers (checked before the store is opened; its shape against the store's rows and queries later)."""
    files: dict[str, tuple[Path, np.ndarray]] = {}
    for value in values:
        name, _, text = value.partition("=")
        name, path = name.strip(), Path(text)
        if not name or not text:
            raise click.BadParameter(f"expected NAME=FILE.npy, got {value!r}", param_hint="--scores")
        if name in files:
            raise click.BadParameter(f"it names {name!r} twice; give each matrix its own name", param_hint="--scores")
        try:
            matrix = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise click.BadParameter(f"{path} is not a numpy .npy file ({first_line(err)})",
                                     param_hint="--scores") from err  # fmt: skip
        if not isinstance(matrix, np.ndarray):  # an .npz archive
            matrix.close()
            raise click.BadParameter(f"{path} is an .npz archive; save the one matrix with numpy.save",
                                     param_hint="--scores")  # fmt: skip
        if matrix.dtype.kind not in "biuf" or matrix.ndim != 2 or not np.isfinite(matrix).all():
            raise click.BadParameter(
                f"{path} holds {matrix.dtype} of shape {matrix.shape}, not a [queries, training rows] matrix of "
                "finite real numbers",
                param_hint="--scores",
            )
        files[name] = (path, matrix.astype(np.float64))
    return files


def _external_scores(path: Path, matrix: np.ndarray, queries: int, indices: list[int], rows: int) -> np.ndarray:
    """The scores ``[Q, N]`` of the ``--queries`` a ``--scores`` matrix holds: it has a row per query_data() example
    (restricted to ``indices``) or per selected query (taken as it is); one sentence for another shape."""
    if matrix.shape[1] != rows or matrix.shape[0] not in (queries, len(indices)):
        turned = matrix.shape[0] == rows and matrix.shape[1] in (queries, len(indices))
        raise click.ClickException(
            f"{path} holds a matrix of shape {matrix.shape}; "
            + ("that is [training rows, queries]: save its transpose." if turned else
               f"give [{queries} query_data() examples (or the {len(indices)} of --queries), {rows} training rows].")
        )  # fmt: skip
    return matrix[indices] if matrix.shape[0] == queries else matrix


@main.command(cls=_Command)
@_evaluation_options
@click.option("--methods", default=None, help="Fitted methods to compare (default: every fitted method).")
@click.option("--scores", "external", multiple=True, metavar="NAME=FILE.npy",
              help="Scores made elsewhere (another library), [queries, training rows] with this project's sign "
                   "(positive = raised the measurement), compared on the same ground truth; repeatable.")
def compare(store_paths: tuple[str, ...], methods: str | None, external: tuple[str, ...], **options: Any) -> None:
    """LDS of several fitted methods on the same retrained ground truth: a table of methods × LDS [95% CI].

    Several STOREs (one per independently trained model) evaluate the ensemble of each method. The methods must
    attribute the same training rows (fitted on the same stages). --scores adds score matrices made elsewhere
    (one row per query_data() example, or per --queries one; one column per attributed training row).
    """
    chosen = _names(methods, "--methods")
    files = _external(external)
    _lds_table(store_paths, list(chosen) if chosen else None, **options, external=files)


@main.command(cls=_Command)
@_evaluation_options
@click.option("--method", default="source", show_default=True, help="The fitted method to evaluate.")
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=Path), help="PNG of LDS against α.")
def lds(store_paths: tuple[str, ...], method: str, plot_path: Path | None, **options: Any) -> None:
    """Linear datamodeling score of one fitted method (Park et al. 2023), at one or several α.

    STORE's spec file must define retrain(keep, seed); finished retrains are cached (see --cache),
    so an interrupted run resumes where it stopped. Several STOREs evaluate an ensemble.
    """
    if plot_path is not None:  # before the scores and the retrains, as --out is
        check_figure_path(plot_path)
    results, levels = _lds_table(store_paths, [method], **options)
    if plot_path is not None:
        click.echo(f"plot: {_save(plot_path, lambda: ev.plot_lds(results, levels, plot_path, title=method))}")


if __name__ == "__main__":
    sys.exit(main())
