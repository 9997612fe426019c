"""``source-proj verify``: check a store end to end, and repair what can be recomputed.

Checked, in order:

1. **metadata**: the format and version, and every field featurize records (parameters,
   projection, task, trajectory, featurize settings); the projection can be rebuilt from it.
2. **shapes**: every array featurize must write (``trajectory/lr``, ``grads/<stage>/<ckpt>`` and,
   unless the Fisher is empirical, ``fisher/<stage>/<ckpt>`` for each checkpoint and the stages it
   is featurized on) exists with the shape the metadata implies.
3. **chunks**: every row chunk marked complete is read back and its crc32 compared with its
   progress entry (a truncated or altered chunk is *damaged*); unmarked chunks are *pending*.
4. **methods**: each fitted method's cached features have one row per attributed example, its
   segments and query checkpoints exist, and a method marked complete has no pending chunk.
5. leftover temporary files of killed writers.

A store without featurize's metadata (another writer's, e.g. a cache built on [`Store`][]) gets
checks 3 and 5 only.

``repair=True`` (``verify --repair``) takes the store's exclusive lock, marks damaged chunks
pending (and featurize's state, or a method whose own chunks they are, unfinished), drops arrays whose
metadata is unreadable or whose shape is wrong, and deletes leftover temporary files; re-running
the command that wrote the store then recomputes exactly what was lost (``VerifyReport.next_steps``).
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from source_proj.errors import SourceProjError, StoreError
from source_proj.featurize.arguments import (
    FeaturizeArguments,
    FisherRows,
    ProjectionArguments,
    checkpoint_stages,
    projected_fisher_at,
    resolve_curvature,
    resolve_fisher_examples,
)
from source_proj.featurize.plan import PROBE
from source_proj.featurize.windows import PREFIX as CAPTURED
from source_proj.featurize.windows import WINDOW_BASES, expected_windows, is_captured
from source_proj.projection.eigen import BASIS_PREFIX
from source_proj.projection.factory import projector_from_meta
from source_proj.store import objectstore
from source_proj.store.durable import PARTIAL_SUFFIX
from source_proj.store.provenance import REFERENCE_BATCH
from source_proj.store.store import STAGING, Store, ckpt_key, is_done, is_remote, local_path, shard_chunks_for
from source_proj.store.writing import writing
from source_proj.trajectory.recorder import Checkpoint, Stage, Trajectory
from source_proj.trajectory.segments import Segment

_REQUIRED_META = {
    "params": list,
    "projection": dict,
    "task": dict,
    "trajectory": dict,
    "featurize": dict,
}


@dataclass
class VerifyReport:
    """What ``verify`` found (and, with ``repair``, did).

    Attributes:
        path: the store.
        arrays: row-chunked arrays checked.
        chunks: row chunks in them; ``complete``/``pending`` of them, and ``damaged``
            ``(array, chunk, reason)`` among the complete ones.
        problems: inconsistencies (metadata, shapes, methods), one sentence each.
        notes: harmless findings (leftover temporary files, arrays nothing refers to).
        repaired: what ``repair`` changed.
        next_steps: commands that finish or recompute the store.
        unusable: the metadata itself is broken: nothing can be repaired, only re-created.
    """

    path: str
    arrays: int = 0
    chunks: int = 0
    complete: int = 0
    pending: int = 0
    damaged: list[tuple[str, int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    unusable: bool = False

    @property
    def status(self) -> str:
        """``"damaged"`` (unrepaired damage or inconsistency), ``"incomplete"`` (resumable) or ``"ok"``."""
        if (self.damaged or self.problems) and (self.unusable or not self.repaired):
            return "damaged"
        if self.pending or self.damaged or self.problems:
            return "incomplete"
        return "ok"

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``verify --json``)."""
        return {
            "path": self.path,
            "status": self.status,
            "arrays": self.arrays,
            "chunks": self.chunks,
            "complete": self.complete,
            "pending": self.pending,
            "damaged": [{"array": a, "chunk": c, "reason": r} for a, c, r in self.damaged],
            "problems": self.problems,
            "notes": self.notes,
            "repaired": self.repaired,
            "next_steps": self.next_steps,
            "unusable": self.unusable,
        }

    def lines(self) -> list[str]:
        """The human-readable report."""
        out = [
            f"store {self.path}: {self.arrays} arrays, {self.chunks} chunks "
            f"({self.complete} complete and crc-checked, {self.pending} pending, {len(self.damaged)} damaged)"
        ]
        out += [f"  DAMAGED  chunk {c} of {a}: {r}" for a, c, r in self.damaged]
        out += [f"  PROBLEM  {p}" for p in self.problems]
        out += [f"  note     {n}" for n in self.notes]
        out += [f"  repaired {r}" for r in self.repaired]
        if self.status == "damaged":
            out.append(f"status: DAMAGED; run `source-proj verify {shlex.quote(self.path)} --repair`")
        elif self.status == "incomplete" and not self.next_steps:
            out.append("status: intact but incomplete; re-run the command that writes it to finish it")
        elif self.status == "incomplete":
            out.append("status: intact but incomplete; to finish it run:")
        else:
            out.append("status: OK (complete, every chunk matches its crc)")
        if self.status != "damaged":
            out += [f"  {step}" for step in self.next_steps]
        return out


def featurize_command(store: Store) -> str:
    """The CLI command that resumes (or recomputes chunks of) a store's featurize."""
    meta = store.meta
    if is_captured(meta):
        return (
            "capture the run again into a new store (a captured window is recomputed only by training through it), "
            "or featurize the run after training into a new store (source-proj featurize --projection factored)"
        )
    # A growth cut short after it noted the store's run in its history, before it recorded the longer one.
    growing = bool(meta.get("growth")) and meta["growth"][-1]["fingerprint"] == meta["trajectory"]["fingerprint"]
    spec = meta.get("spec")
    if spec is None:
        return "re-run source_proj.featurize(...) with the arguments that created the store" + (
            " and grow=True" if growing else ""
        )
    paths = [
        f"--ckpts {shlex.quote(meta['trajectory']['path'])}",
        f"--spec {shlex.quote(spec)}",
        f"--out {shlex.quote(store.path)}",
    ]
    recorded, command = str(meta.get("command") or ""), "source-proj featurize"
    if recorded.startswith(command):  # the CLI's own options as they were given, the paths as the store has them now
        return " ".join([command, *paths]) + recorded[len(command) :] + (" --grow" if growing else "")
    # A store that records no command (made from Python, or by an earlier version): its settings as the options.
    python_only = _python_only(meta)
    if python_only:
        options = " ".join(_featurize_options(meta))
        return (
            f"the store was featurized with {', '.join(python_only)}, which the CLI has no option for: re-run "
            f"source_proj.featurize(...) into {store.path} with {'them' if len(python_only) > 1 else 'it'}"
            + (f" and the settings the featurize options {options} ask for" if options else "")
            + (" and grow=True" if growing else "")
        )
    return " ".join([command, *paths, *_featurize_options(meta), *(["--grow"] if growing else [])])


_PROJECTION, _OPTIONS = ProjectionArguments(), FeaturizeArguments()
"""The arguments' defaults, which are the featurize options' (a test holds them to it)."""


def _python_only(meta: dict[str, Any]) -> list[str]:
    """The settings a store (metadata ``meta``) was featurized with that no featurize option sets, as typed in
    Python (``"FeaturizeArguments(measurement=False)"``); the command rebuilt without them would be refused."""
    feat = meta["featurize"]
    segmentation = (meta.get("segmentation") or {}).get("arguments") or {}
    settings = [
        ("FeaturizeArguments", "seed", feat.get("seed", 0), _OPTIONS.seed),
        ("FeaturizeArguments", "measurement", feat.get("measurement", True), _OPTIONS.measurement),
        ("SegmentationArguments", "probe_rows", segmentation.get("probe_rows", 256), 256),
    ]
    return [f"{owner}({name}={value!r})" for owner, name, value, default in settings if value != default]


def _featurize_options(meta: dict[str, Any]) -> list[str]:
    """The featurize options (``["--projection factored", "--dim 16", …]``) that ask for the settings a store
    (metadata ``meta``) was featurized with, those at the CLI's defaults left out: the projection's, the eigen
    basis's, the featurize settings it compares (``_typed_differences``), the checkpoints it took, its layout and
    the batch size and device it recorded for a bit-identical recomputation. Its settings that no option sets:
    ``_python_only``."""
    proj, feat = meta["projection"], meta["featurize"]
    kind = proj["kind"]
    args = [f"--projection {kind}"] if kind != "eigen" else []
    if kind != "identity":
        # The eigen projection records the k asked for as "k" and its blocks' total (which may be a little less) as
        # "dim"; a factored one with layers of their own k records the shared k as "shared_dim" and the total as
        # "dim". featurize compares the k asked for, so the command must ask for that one.
        dim = proj.get("k", proj.get("shared_dim", proj["dim"]))
        args += [f"--dim {dim}"] if dim != _PROJECTION.dim else []
        args += [f"--seed {proj['seed']}"] if proj["seed"] != _PROJECTION.seed else []
    args += [f"--module-dim {shlex.quote(f'{pattern}={k}')}" for pattern, k in proj.get("module_dims") or []]
    if proj.get("adam_rank", 1) != 1:
        args.append(f"--adam-rank {proj['adam_rank']}")
    args += basis_options({name: value for name, value in (meta.get("basis_arguments") or {}).items()
                           if value != getattr(_PROJECTION, name)})  # fmt: skip
    total = proj["dim"]  # the projector's k (p unprojected), which "auto" resolves by
    if feat.get("curvature", "projected") != resolve_curvature("auto", kind, total):
        args.append(f"--curvature {feat['curvature']}")
    if feat["fisher"] != _OPTIONS.fisher:
        args.append(f"--fisher {feat['fisher']}")
    provenance = meta.get("provenance", {})
    batch_size = provenance.get("batch_size", feat.get("batch_size", _OPTIONS.batch_size))
    if feat["chunk_rows"] != _OPTIONS.chunk_rows:
        args.append(f"--chunk-rows {feat['chunk_rows']}")
    # A store resumed with fisher_examples="auto" takes the share it recorded; a new one would resolve it anew.
    fresh = FeaturizeArguments(batch_size=batch_size, chunk_rows=feat["chunk_rows"], fisher=feat["fisher"])
    sizes = [stage["dataset_size"] for stage in meta["trajectory"].get("stages", [])]
    examples = feat.get("fisher_examples")
    if examples != resolve_fisher_examples(fresh, total, sizes):
        args.append(f"--fisher-examples {'all' if examples is None else examples}")
    if feat.get("precision", _OPTIONS.precision) != _OPTIONS.precision:
        args.append(f"--precision {feat['precision']}")
    steps = _chosen_checkpoints(meta)
    if steps:
        args.append(f"--checkpoints {','.join(map(str, steps))}")
    segmentation = (meta.get("segmentation") or {}).get("arguments")
    if segmentation:
        if "auto" in segmentation:
            args.append(f"--segments {_auto(segmentation['auto'])}")
        elif "boundaries" in segmentation:
            args.append(f"--segments at:{','.join(str(b) for b in segmentation['boundaries'])}")
        elif segmentation["per_stage"] != 1:  # one segment a stage: what featurize fixes where none is asked for
            args.append(f"--segments {segmentation['per_stage']}")
    products = meta.get("products") or {}
    if products.get("segment_means"):
        args.append("--fast" if products.get("checkpoints", True) else "--fast-only")
    layout = (meta.get("layout") or {}).get("shard_chunks")
    if layout is not None and layout != shard_chunks_for(4 * feat["chunk_rows"] * total):
        args.append(f"--shard-chunks {layout}")
    if "batch_size" in provenance:
        args += [f"--batch-size {batch_size}"] if batch_size != _OPTIONS.batch_size else []
        args.append(f"--device {provenance['device']}")
    return args


def _chosen_checkpoints(meta: dict[str, Any]) -> list[int] | None:
    """The checkpoints a store was featurized on where they are some of its run's (``--checkpoints``; its final one
    too, which may be the only one); ``None`` where it took every one, or its run is not the one at its path (moved,
    or trained further: a growth cut short)."""
    trajectory = meta["trajectory"]
    try:
        run = Trajectory.load(trajectory["path"])
    except SourceProjError:
        return None
    saved = [c.step for c in run.checkpoints]
    if run.fingerprint() != trajectory.get("fingerprint") or trajectory["checkpoints"] == saved:
        return None
    return trajectory["checkpoints"]


def basis_options(recorded: dict[str, int | None] | None) -> list[str]:
    """The eigen basis's arguments a store was featurized with (its ``meta["basis_arguments"]``, recorded as given)
    as featurize's options (``["--basis-examples 8", …, "--basis-checkpoints all"]``); none where the store records
    none (another projection, or featurized before they were recorded)."""
    options = ((f"--{name.replace('_', '-')}", value) for name, value in (recorded or {}).items())
    return [f"{option} {'all' if value is None else value}" for option, value in options]


def fit_command(store: Store, method: str) -> str:
    """The CLI command that resumes a method's fit."""
    arguments = store.meta["methods"][method].get("arguments", {})
    args = ["source-proj fit", shlex.quote(store.path), f"--method {shlex.quote(method)}"]
    if arguments.get("auto_segments") is not None:
        args.append(f"--segments {_auto(arguments['auto_segments'])}")
    elif arguments.get("boundaries"):
        args.append(f"--boundaries {','.join(str(b) for b in arguments['boundaries'])}")
    elif arguments.get("segments_per_stage") is not None:
        args.append(f"--segments {arguments['segments_per_stage']}")
    if arguments.get("stages"):
        args.append(f"--stages {','.join(arguments['stages'])}")
    if arguments.get("fast"):
        args.append("--fast")
    if arguments.get("curvature"):
        args.append(f"--curvature {arguments['curvature']}")
    return " ".join(args)


def _auto(count: int) -> str:
    """``auto:L``, or ``auto`` where L was chosen too (recorded as 0)."""
    return f"auto:{count}" if count else "auto"


def method_command(store: Store, method: str) -> str:
    """The CLI command that resumes a fitted method: ``fit`` for SOURCE, ``baseline`` for a baseline (whose CLI
    stores it under its kind's name; one the API named otherwise is re-run there)."""
    description = store.meta["methods"][method]
    kind = description.get("kind")
    if kind in (None, "source", "fast-source"):
        return fit_command(store, method)
    arguments = description.get("arguments", {})
    api_only = (  # settings the CLI has no option for
        arguments.get("damping") is not None
        or arguments.get("curvature_stages")
        or arguments.get("rcond", 1e-6) != 1e-6
    )
    if method != kind or api_only:
        return (
            f"re-run source_proj.fit_baseline(...) with the BaselineArguments(kind={kind!r}, method={method!r}, ...) "
            "it was fitted with"
        )
    args = ["source-proj baseline", shlex.quote(store.path), f"--kind {kind}"]
    if arguments.get("stages"):
        args.append(f"--stages {','.join(arguments['stages'])}")
    if arguments.get("damping_factor", 3.0) != 3.0:
        args.append(f"--damping-factor {arguments['damping_factor']}")
    if arguments.get("trak_dim") is not None:
        args.append(f"--trak-dim {arguments['trak_dim']}")
    return " ".join(args)


def expected_features(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every array featurize writes, with its shape: ``{name: (rows, k)}`` (a captured store: its windows)."""
    if is_captured(meta):
        return {name: shape for name, (shape, _) in expected_windows(meta).items()}
    traj = meta["trajectory"]
    stages = [Stage(**s) for s in traj["stages"]]
    checkpoints = [Checkpoint(step, "", "", False) for step in traj["checkpoints"]]
    run = SimpleNamespace(stages=stages, checkpoints=checkpoints, final_checkpoint=checkpoints[-1])
    sizes = {s.name: s.dataset_size for s in stages}
    k = meta["projection"]["dim"]
    directions = meta["featurize"]["fisher_directions"]
    products = meta.get("products") or {"checkpoints": True, "segment_means": False}
    points: list[tuple[str, str]] = []
    if products["checkpoints"]:
        points += [(stage, ckpt_key(c.step)) for c in checkpoints for stage in checkpoint_stages(run, c)]  # type: ignore[arg-type]
    segments = [Segment.from_description(d) for d in (meta.get("segmentation") or {}).get("segments", [])]
    if products["segment_means"]:
        points += [(seg.stage, seg.mean_key) for seg in segments]
    expected: dict[str, tuple[int, ...]] = {}
    curvature = meta["featurize"].get("curvature", "projected")
    last = ckpt_key(checkpoints[-1].step)
    order = [s.name for s in stages]
    for stage, key in points:
        expected[f"grads/{stage}/{key}"] = (sizes[stage], k)
        if directions and projected_fisher_at(curvature, "", key, last):
            taken = FisherRows.of(meta["featurize"], sizes[stage], order.index(stage))
            expected[f"fisher/{stage}/{key}"] = (taken.total * directions, k)
    if products["checkpoints"] and meta["featurize"].get("measurement"):
        final = ckpt_key(checkpoints[-1].step)
        expected.update({f"measurement/{s.name}/{final}": (sizes[s.name], k) for s in stages})
    params = sum(int(np.prod(shape)) for _, shape in meta["params"])
    expected.update({seg.preconditioner: (params,) for seg in segments if seg.preconditioner})
    projection = meta["projection"]
    if projection.get("kind") == "eigen":  # the basis featurize estimated and queries rebuild the projection from
        layers = {layer[0]: layer for layer in projection["layers"]}
        basis = projection["basis"]
        for i, (module, (k_out, k_in)) in enumerate(zip(basis["modules"], basis["blocks"], strict=True)):
            _, _, bias, out_features, in_features = layers[module][:5]
            expected[f"{BASIS_PREFIX}/{i}/out"] = (k_out, out_features)
            expected[f"{BASIS_PREFIX}/{i}/in"] = (k_in, in_features + (1 if bias else 0))
    return expected


def verify_store(path: str | Path, *, repair: bool = False, progress: bool = True) -> VerifyReport:
    """Check the store at ``path`` end to end (the checks: docs/howto/reliability.md); ``repair`` fixes what it can.

    Raises:
        StoreError: the path holds no readable store of this format (nothing to check or repair).
    """
    if not repair:
        return _verify(Store.open(path), repair=False, progress=progress)
    leftovers = _leftovers(path)
    with writing(path):  # removes the leftovers under the exclusive lock
        report = _verify(Store.open(path, writable=True), repair=True, progress=progress)
    if leftovers:
        report.repaired.append(f"removed {leftovers} temporary file(s) of interrupted writes")
    return report


def _leftovers(path: str | Path) -> int:
    """Temporary files of killed writers (none on object storage, whose PUTs are atomic)."""
    return 0 if is_remote(path) else sum(1 for _ in local_path(path).rglob(f"*{PARTIAL_SUFFIX}"))


def _verify(store: Store, *, repair: bool, progress: bool) -> VerifyReport:
    report = VerifyReport(store.path)
    meta = store.meta
    featurized = any(key in meta for key in _REQUIRED_META)
    for key, kind in _REQUIRED_META.items():
        if featurized and not isinstance(meta.get(key), kind):
            report.problems.append(
                f"the metadata has no valid {key!r}, so the store cannot be used; re-create it with featurize --force"
            )
    if report.problems:
        report.unusable = True
        return report
    try:
        if featurized and meta["projection"].get("kind") not in ("factored", "eigen"):  # these need the model's layers
            projector_from_meta(meta)
        expected = expected_features(meta) if featurized else {}
    except (SourceProjError, KeyError, TypeError, ValueError) as err:
        report.problems.append(f"the metadata is inconsistent ({err}); re-create the store with featurize --force")
        report.unusable = True
        return report
    if not featurized:
        report.notes.append("the store holds no featurize output (another writer's store): its chunks were checked")
    stopped = (meta.get("nonfinite") or {}).get("error")  # featurize stopped on a NaN gradient (``_after_stop``)
    if stopped:
        report.notes.append(f"featurize stopped: {stopped}")
    capturing = is_captured(meta) and not meta.get("captured")
    if capturing:
        report.notes.append(
            "capture has not finished (training runs, or was interrupted: resume it with TrajectoryRecorder.resume); "
            "the windows written so far were checked"
        )

    _check_groups(store, report, repair)
    featurize_unfinished, reported = False, set()
    if featurized and not capturing:
        featurize_unfinished, reported = _check_expected(store, meta, expected, report, repair)
    method_prefixes = {f"methods/{m}/": m for m in meta.get("methods") or {}}
    broken_methods: set[str] = set()
    try:
        names = store.progress_arrays()
    except Exception as err:
        report.problems.append(
            f"the progress metadata is unreadable ({type(err).__name__}); re-create the store with featurize --force"
        )
        report.unusable = True
        return report
    own = ("trajectory/lr", REFERENCE_BATCH)  # featurize's arrays besides the features
    # a captured store's own arrays: its windows, and an eigen capture's window bases and final basis
    captured_own = (CAPTURED, f"{WINDOW_BASES}/", f"{BASIS_PREFIX}/") if is_captured(meta) else ()
    for name in tqdm([n for n in names if n not in reported], desc="verify", unit="array", disable=not progress):
        method = next((m for p, m in method_prefixes.items() if name.startswith(p)), None)
        captures = bool(captured_own) and name.startswith(captured_own)
        if not _check_array(store, name, report, repair):
            if featurized and (name in expected or name in own or captures):
                featurize_unfinished = True
            if method is not None:
                broken_methods.add(method)
        known = name in expected or name in own or name.startswith(PROBE) or method is not None or captures
        if featurized and not known:
            report.notes.append(f"{name!r} is not part of featurize's output or of a fitted method")
    if featurized:
        broken_methods |= _check_methods(store, meta, report)

    leftovers = _leftovers(store.path)
    if leftovers and not repair:
        report.notes.append(f"{leftovers} temporary file(s) of interrupted writes (harmless; --repair removes them)")

    if repair:
        if featurize_unfinished and meta.get("captured"):
            store.update_meta(captured=False)
            report.repaired.append("capture marked unfinished (fit refuses it until the run is captured again)")
        if featurize_unfinished and meta.get("featurized"):
            store.update_meta(featurized=False)
            report.repaired.append("featurize marked unfinished (re-running it writes what is missing)")
        for method in sorted(broken_methods):
            methods = dict(store.meta["methods"])
            if methods[method].get("complete"):
                methods[method] = {**methods[method], "complete": False}
                store.update_meta(methods=methods)
                report.repaired.append(f"method {method!r} marked unfinished")
    if featurize_unfinished:
        command = featurize_command(store)
        report.next_steps.append(f"fix the example featurize stopped on, then {command}" if stopped else command)
    for method in sorted(set(meta.get("methods") or {})):
        if method in broken_methods or not meta["methods"][method].get("complete"):
            report.next_steps.append(method_command(store, method))
    return report


def _check_expected(
    store: Store, meta: dict[str, Any], expected: dict[str, tuple[int, ...]], report: VerifyReport, repair: bool
) -> tuple[bool, set[str]]:
    """Existence and shapes of featurize's arrays; returns whether featurize must run again, and the
    arrays found unreadable or misshapen (reported here, not checked further)."""
    unfinished = False
    reported = set()
    steps = meta["trajectory"]["stages"][-1]["end_step"]
    for name, shape in [("trajectory/lr", (steps,)), *expected.items()]:
        try:
            present = store.has(name)
            actual = tuple(store.array(name).shape) if present else None
        except StoreError:
            present, actual = True, None
        if not present:
            unfinished = True
            if meta.get("featurized") or meta.get("captured"):
                writer = "capture" if meta.get("captured") else "featurize"
                report.problems.append(f"{name!r} is missing although {writer} finished")
            continue
        if actual != shape:
            unfinished = True
            what = "has unreadable metadata" if actual is None else f"has shape {actual}, not {shape}"
            report.problems.append(f"{name!r} {what}")
            reported.add(name)
            if repair:
                _drop(store, name)
                report.repaired.append(f"dropped {name!r} (featurize writes it again)")
    return unfinished, reported


def _reason(err: StoreError) -> str:
    """Why an array cannot be read, in a few words."""
    cause = err.__cause__
    return f"unreadable metadata: {type(cause).__name__}" if cause is not None else "it is missing"


def _check_groups(store: Store, report: VerifyReport, repair: bool) -> None:
    """Every group's metadata is readable (arrays are checked with their chunks); ``repair`` rewrites
    an unreadable one (groups below the root hold no attributes)."""
    nodes = store.nodes()
    parents = {name.rsplit("/", 1)[0] for name in nodes if "/" in name}
    for group in sorted(parents):
        if store.node_type(group) == "group":
            continue
        if repair:
            store.write_group_metadata(group)
            report.repaired.append(f"rewrote the unreadable metadata of group {group!r}")
        else:
            report.problems.append(f"the metadata of group {group!r} is unreadable")


def _drop(store: Store, name: str) -> None:
    """Delete an array and its progress entries even when its metadata is unreadable."""
    for key in (name, f"progress/{name}", f"{STAGING}{name}"):
        if is_remote(store.path):
            objectstore.remove(store.path, key)
        else:
            shutil.rmtree(local_path(store.path) / key, ignore_errors=True)


def _check_array(store: Store, name: str, report: VerifyReport, repair: bool) -> bool:
    """crc-check every complete chunk of one array; returns whether it is complete and intact."""
    try:
        entries = store.progress_entries(name)
        chunks = store.num_chunks(name)
    except StoreError as err:
        report.problems.append(f"{name!r} cannot be checked ({_reason(err)})")
        if repair:
            _drop(store, name)
            report.repaired.append(f"dropped {name!r} (its writer writes it again)")
        return False
    if entries.shape[0] != chunks:
        report.problems.append(f"{name!r} has {entries.shape[0]} progress entries for {chunks} chunks")
        if repair:
            _drop(store, name)
            report.repaired.append(f"dropped {name!r} (its writer writes it again)")
        return False
    report.arrays += 1
    report.chunks += chunks
    unreadable = store.unreadable_progress(name)
    if unreadable:
        report.problems.append(
            f"the progress entries of {name!r} are damaged in {len(unreadable)} file(s): their chunks count as "
            "unwritten"
        )
        if repair:
            store.rewrite_progress(name, unreadable)
            report.repaired.append(f"rewrote the damaged progress entries of {name!r} (their chunks are recomputed)")
    damaged = store.damaged_chunks(name)
    pending = int((~is_done(entries)).sum())
    report.pending += pending
    report.complete += chunks - pending - len(damaged)
    for chunk, reason in sorted(damaged.items()):
        start, stop = store.chunk_rows(name, chunk)
        report.damaged.append((name, chunk, f"rows {start}–{stop - 1}: {reason}"))
    if damaged and repair:
        store.mark_pending(name, sorted(damaged))
        report.repaired.append(f"{len(damaged)} damaged chunk(s) of {name!r} marked pending")
    return not damaged and not pending


def _check_methods(store: Store, meta: dict[str, Any], report: VerifyReport) -> set[str]:
    """Consistency of every fitted method's description with the store; returns broken methods."""
    broken = set()
    sizes = {s["name"]: s["dataset_size"] for s in meta["trajectory"]["stages"]}
    steps = set(meta["trajectory"]["checkpoints"])
    for method, desc in (meta.get("methods") or {}).items():
        try:
            problems = _method_problems(store, method, desc, sizes, steps)
        except StoreError as err:
            problems = [f"cannot be checked ({_reason(err)})"]
        for problem in problems:
            report.problems.append(f"method {method!r} {problem}")
        if problems:
            broken.add(method)
    return broken


def _method_problems(
    store: Store, method: str, desc: dict[str, Any], sizes: dict[str, int], steps: set[int]
) -> list[str]:
    """What is inconsistent between one fitted method's description and the store."""
    problems = []
    for stage in desc.get("stages", []):
        name = f"methods/{method}/train/{stage}"
        if stage not in sizes:
            problems.append(f"attributes unknown stage {stage!r}")
        elif not store.has(name):
            if desc.get("complete"):
                problems.append(f"has no {name!r}")
        elif store.array(name).shape[0] != sizes[stage] or store.array(name).shape[1:] != (desc.get("dim"),):
            problems.append(f"has {name!r} of shape {store.array(name).shape}")
        elif desc.get("complete") and store.pending_chunks(name):
            problems.append(f"is marked complete but {name!r} has pending chunks")
    used = {s for seg in desc.get("segments", []) for s in seg.get("checkpoints", [])}
    used |= set(desc.get("query", {}).get("checkpoints", []))
    if used - steps:
        problems.append(f"uses checkpoints {sorted(used - steps)} the store's run does not have")
    return problems
