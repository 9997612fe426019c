"""``verify`` finds every damaged chunk and inconsistency; ``--repair`` plus the printed commands
recompute exactly what was lost, back to the uninterrupted store's bytes."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import source_proj as sp
from source_proj.cli.main import main
from source_proj.store import verify
from source_proj.store.verify import fit_command

from .crash_driver import FIT, damage, featurize, files
from .test_crash_resume import ROOT, SPEC


def test_an_intact_store_verifies_ok(tiny_reference: Path) -> None:
    report = sp.verify_store(tiny_reference, progress=False)
    # lr (1 chunk) + grads and fisher of 3 checkpoints (3 chunks each) + the final checkpoint's
    # measurement gradients (3) + 2 eigvals and 2 folded operators (1 each) + train (3) + the reference
    # batch of the model's fingerprint (1)
    assert (report.arrays, report.chunks, report.complete) == (14, 30, 30)
    assert report.status == "ok" and report.damaged == report.problems == report.notes == []
    assert report.lines()[-1] == "status: OK (complete, every chunk matches its crc)"


def _cli_store(tmp_path: Path, tiny_run: Path, name: str) -> tuple[Path, list[str]]:
    spec = tmp_path / "spec.py"
    spec.write_text(SPEC.format(root=str(ROOT)))
    store = tmp_path / name
    args = ["featurize", "--ckpts", str(tiny_run), "--spec", str(spec), "--out", str(store), "--dim", "12"]
    args += ["--seed", "3", "--batch-size", "4", "--chunk-rows", "4"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert CliRunner().invoke(main, ["fit", str(store), "--segments", "2"]).exit_code == 0
    return store, args


def test_verify_repair_and_the_printed_commands_recompute_exactly_the_damage(tmp_path: Path, tiny_run: Path) -> None:
    reference, _ = _cli_store(tmp_path, tiny_run, "reference.sp")
    store = tmp_path / "s.sp"
    shutil.copytree(reference, store)
    damage(store, "grads/main/step-00000004", 2, "flip")
    damage(store, "methods/source/train/main", 0, "truncate")  # the shard file of all 3 chunks
    (store / "fisher/main/zarr.abc123.partial").write_bytes(b"left by a killed writer")
    cli = CliRunner()

    out = cli.invoke(main, ["verify", str(store)])
    assert out.exit_code == 1
    assert "DAMAGED  chunk 2 of grads/main/step-00000004: rows 8–11: its crc32 differs" in out.stdout
    for chunk, rows in enumerate(("0–3", "4–7", "8–11")):
        assert f"DAMAGED  chunk {chunk} of methods/source/train/main: rows {rows}: unreadable" in out.stdout
    assert "note     1 temporary file(s) of interrupted writes" in out.stdout
    assert out.stdout.splitlines()[-1] == f"status: DAMAGED; run `source-proj verify {store} --repair`"

    out = cli.invoke(main, ["verify", str(store), "--repair"])
    assert out.exit_code == 0, out.stdout
    assert "repaired 1 damaged chunk(s) of 'grads/main/step-00000004' marked pending" in out.stdout
    assert "repaired method 'source' marked unfinished" in out.stdout
    assert "repaired removed 1 temporary file(s) of interrupted writes" in out.stdout
    opened = sp.Store.open(store)
    assert opened.pending_chunks("grads/main/step-00000004") == [2]
    assert opened.pending_chunks("methods/source/train/main") == [0, 1, 2]
    steps = out.stdout.splitlines()[-2:]
    assert steps[0].startswith("  source-proj featurize --ckpts ") and "--dim 12 --seed 3" in steps[0]
    assert steps[1] == f"  source-proj fit {store} --method source --segments 2"
    for step in steps:
        assert cli.invoke(main, shlex.split(step)[1:]).exit_code == 0
    assert files(store) == files(reference)
    assert cli.invoke(main, ["verify", str(store)]).stdout.splitlines()[-1].startswith("status: OK")


def test_an_interrupted_store_is_reported_incomplete_with_the_command_that_finishes_it(
    tmp_path: Path, tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = sp.Store.write_chunk
    calls = []

    def interrupted(self: sp.Store, name: str, chunk: int, values) -> None:
        calls.append(name)
        if len(calls) > 5:
            raise KeyboardInterrupt
        original(self, name, chunk, values)

    monkeypatch.setattr(sp.Store, "write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        featurize(tiny_run, tmp_path / "s.sp")
    report = sp.verify_store(tmp_path / "s.sp", progress=False)
    assert report.status == "incomplete" and report.damaged == [] and report.problems == []
    assert report.complete == 5 and report.pending == report.chunks - 5
    assert report.next_steps == ["re-run source_proj.featurize(...) with the arguments that created the store"]


def test_a_missing_array_of_a_finished_store_is_found_and_rewritten(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path
) -> None:
    store = tmp_path / "s.sp"
    shutil.copytree(tiny_reference, store)
    shutil.rmtree(store / "grads/main/step-00000004")
    shutil.rmtree(store / "progress/grads/main/step-00000004")
    report = sp.verify_store(store, progress=False)
    assert report.status == "damaged"
    assert report.problems == ["'grads/main/step-00000004' is missing although featurize finished"]
    assert sp.verify_store(store, repair=True, progress=False).status == "incomplete"
    featurize(tiny_run, store)
    sp.fit(store, FIT, progress=False)
    assert files(store) == files(tiny_reference)


def test_a_fast_source_store_verifies_ok_and_its_repair_command_keeps_the_segmentation(
    tmp_path: Path, tiny_run: Path
) -> None:
    from dataclasses import replace

    from .crash_driver import OPTIONS

    store = tmp_path / "fast.sp"
    options = replace(OPTIONS, segment_means=True, segmentation=sp.SegmentationArguments(per_stage=2))
    featurize(tiny_run, store, options=options)
    sp.fit(store, sp.FitArguments(fast=True), progress=False)
    report = sp.verify_store(store, progress=False)
    assert report.status == "ok" and report.notes == [] and report.problems == []
    # besides the checkpoints' arrays: the 2 segment means' and the final checkpoint's measurement
    names = verify.expected_features(sp.Store.open(store).meta)
    assert sum(n.startswith("grads/main/steps-mean-") for n in names) == 2
    assert "measurement/main/step-00000008" in names
    sp.Store.open(store, writable=True).update_meta(spec="spec.py")  # as a CLI-made store records it
    command = verify.featurize_command(sp.Store.open(store))
    assert "--segments 2 --fast " in command, command
    (store / "grads/main" / next(n.split("/")[-1] for n in names if "mean-" in n) / "c/0/0").write_bytes(b"\0")
    damaged = sp.verify_store(store, progress=False)
    assert damaged.status == "damaged" and any("mean-" in str(entry) for entry in damaged.damaged)


@pytest.mark.parametrize(
    "arguments",
    [
        {"curvature": "kfac", "segments_per_stage": 2},
        {"curvature": "projected", "auto_segments": 0, "stages": ["pretrain"]},
        {"boundaries": [10, 20], "fast": True},
    ],
)
def test_the_printed_fit_command_repeats_every_setting_the_fit_was_made_with(arguments: dict) -> None:
    store = SimpleNamespace(path="runs/a b.sp", meta={"methods": {"m": {"arguments": arguments}}})
    command = fit_command(store, "m")  # type: ignore[arg-type]
    context = main.commands["fit"].make_context("fit", shlex.split(command)[2:])
    seg = sp.SegmentationArguments.parse(context.params["segments"]) if context.params["segments"] else None
    assert context.params["store_path"] == "runs/a b.sp" and context.params["method"] == "m"
    assert context.params["curvature"] == arguments.get("curvature")
    assert context.params["fast"] == arguments.get("fast", False)
    assert (seg.auto if seg else None) == arguments.get("auto_segments")
    if "segments_per_stage" in arguments:
        assert seg is not None and seg.per_stage == arguments["segments_per_stage"]
    assert context.params["boundaries"] == (
        ",".join(map(str, arguments["boundaries"])) if "boundaries" in arguments else None
    )
    assert context.params["stages"] == (",".join(arguments["stages"]) if "stages" in arguments else None)


def test_a_damaged_window_basis_of_a_captured_store_asks_for_a_new_capture(
    tmp_path: Path, classification_data
) -> None:
    """An eigen capture's window bases and final basis are its own arrays: an intact store gets no note about them,
    and a damaged one is marked for a new capture (it used to send the user to fit, which sent them back)."""
    from .test_capture import _train

    _train(tmp_path / "run", tmp_path / "cap.sp", classification_data, steps=8, batch=8, save_every=4,
           datasets={"main": classification_data}, projection=sp.ProjectionArguments(dim=16, kind="eigen"))  # fmt: skip
    sp.fit(tmp_path / "cap.sp", progress=False)
    report = sp.verify_store(tmp_path / "cap.sp", progress=False)
    assert report.status == "ok" and not [n for n in report.notes if "is not part of featurize's output" in n]
    bases = sp.Store.open(tmp_path / "cap.sp").progress_arrays("projection/windows/")
    assert bases
    damage(tmp_path / "cap.sp", bases[0], 0, "flip")
    report = sp.verify_store(tmp_path / "cap.sp", repair=True, progress=False)
    assert "capture marked unfinished (fit refuses it until the run is captured again)" in report.repaired
    assert report.next_steps and report.next_steps[0].startswith("capture the run again into a new store")


def test_the_printed_featurize_command_of_an_eigen_store_asks_for_its_k_and_precision(
    tmp_path: Path, tiny_run: Path
) -> None:
    """The eigen projection's blocks may add up to less than the k asked for (here 23 → 22): the command verify
    prints must ask for the k the store was featurized with, else featurize refuses it as other settings."""
    spec = tmp_path / "spec.py"
    spec.write_text(SPEC.format(root=str(ROOT)))
    store = tmp_path / "s.sp"
    args = ["featurize", "--ckpts", str(tiny_run), "--spec", str(spec), "--out", str(store), "--dim", "23"]
    args += ["--batch-size", "4", "--chunk-rows", "4", "--precision", "bf16"]
    assert CliRunner().invoke(main, args).exit_code == 0
    projection = sp.Store.open(store).meta["projection"]
    assert projection["kind"] == "eigen" and projection["k"] == 23 and projection["dim"] < 23
    reference = files(store)
    damage(store, "grads/main/step-00000004", 1, "flip")
    out = CliRunner().invoke(main, ["verify", str(store), "--repair"])
    command = out.stdout.splitlines()[-1]
    assert command.startswith("  source-proj featurize ") and "--dim 23 " in command and "--precision bf16" in command
    resumed = CliRunner().invoke(main, shlex.split(command)[1:])
    assert resumed.exit_code == 0, resumed.output
    assert files(store) == reference


def test_the_printed_featurize_command_repeats_every_option_the_store_was_featurized_with(
    tmp_path: Path, tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Options the store's settings do not spell out as options (the basis's budget and checkpoints, a subset of the
    checkpoints, a file per chunk) are in the command verify prints, which the store records as the CLI was given it:
    run from another directory, it recomputes the damaged chunk exactly."""
    spec = tmp_path / "spec.py"
    spec.write_text(SPEC.format(root=str(ROOT)))
    monkeypatch.chdir(tmp_path)
    args = ["featurize", "--ckpts", str(tiny_run), "--spec", "spec.py", "--out", "s.sp", "--dim", "23"]
    args += ["--batch-size", "4", "--chunk-rows", "4", "--basis-examples", "8", "--basis-checkpoints", "1"]
    args += ["--checkpoints", "4", "--shard-chunks", "1"]
    assert CliRunner().invoke(main, args).exit_code == 0
    store = tmp_path / "s.sp"
    assert sp.Store.open(store).meta["trajectory"]["checkpoints"] == [4, 8]
    reference = files(store)
    damage(store, "grads/main/step-00000004", 1, "flip")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = CliRunner().invoke(main, ["verify", str(store), "--repair"])
    command = out.stdout.splitlines()[-1].strip()
    for option in ("--basis-examples 8", "--basis-checkpoints 1", "--checkpoints 4", "--shard-chunks 1"):
        assert option in command
    assert f"--out {store}" in command and f"--spec {spec}" in command
    resumed = CliRunner().invoke(main, shlex.split(command)[1:])
    assert resumed.exit_code == 0, resumed.output
    assert files(store) == reference


def test_the_featurize_command_rebuilt_for_a_store_without_one_asks_for_its_basis_arguments(
    tmp_path: Path, tiny_run: Path
) -> None:
    """A store that records no command (made from Python with a spec, or by an earlier version) gets one rebuilt
    from its settings: with the eigen basis's arguments the store recorded (``basis_arguments``), else featurize
    refuses the store as other settings. Run, it recomputes the damaged chunk exactly."""
    spec = tmp_path / "spec.py"
    spec.write_text(SPEC.format(root=str(ROOT)))
    store = tmp_path / "s.sp"
    args = ["featurize", "--ckpts", str(tiny_run), "--spec", str(spec), "--out", str(store), "--dim", "23"]
    args += ["--batch-size", "4", "--chunk-rows", "4", "--basis-examples", "8", "--basis-positions", "all"]
    args += ["--basis-layer-positions", "5", "--basis-checkpoints", "1"]
    assert CliRunner().invoke(main, args).exit_code == 0
    sp.Store.open(store, writable=True).update_meta(command=None)
    reference = files(store)
    damage(store, "grads/main/step-00000004", 1, "flip")
    out = CliRunner().invoke(main, ["verify", str(store), "--repair"])
    command = shlex.split(out.stdout.splitlines()[-1])
    context = main.commands["featurize"].make_context("featurize", command[2:])
    asked = {name: context.params[name] for name in ('basis_examples', 'basis_positions', 'basis_layer_positions',
                                                     'basis_checkpoints')}  # fmt: skip
    assert asked == {"basis_examples": 8, "basis_positions": "all", "basis_layer_positions": "5",
                     "basis_checkpoints": "1"}, command  # fmt: skip
    resumed = CliRunner().invoke(main, command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert files(store) == reference


@pytest.mark.parametrize("rank", [1, 3])
def test_the_rebuilt_featurize_command_asks_for_the_adam_rank_the_store_was_featurized_with(rank: int) -> None:
    meta = {"spec": "spec.py", "trajectory": {"path": "run", "fingerprint": "f"},
            "projection": {"kind": "factored", "dim": 16, "seed": 2, **({"adam_rank": rank} if rank != 1 else {})},
            "featurize": {"fisher": "sampled", "chunk_rows": 8}}  # fmt: skip
    command = verify.featurize_command(SimpleNamespace(path="s.sp", meta=meta))  # type: ignore[arg-type]
    context = main.commands["featurize"].make_context("featurize", shlex.split(command)[2:])
    assert (context.params["adam_rank"], context.params["projection"]) == (rank, "factored"), command
    assert (context.params["dim"], context.params["seed"]) == (16, 2)


_BASE_PROJECTION = sp.ProjectionArguments(dim=12, kind="rademacher")
_BASE_OPTIONS = sp.FeaturizeArguments(batch_size=4, chunk_rows=4, device="cpu")
_BASE_PARAMS = {"projection": "rademacher", "dim": 12, "batch_size": 4, "chunk_rows": 4, "device": "cpu"}
"""What every store of the cases below is featurized with, and the featurize options that ask for it."""

_REBUILT_CASES = {  # a setting of a store made from Python: (projection, options, the featurize options asking for it)
    "seed": ({"seed": 3}, {}, {"seed": 3}),
    "factored": ({"kind": "factored"}, {}, {"projection": "factored"}),
    "identity": ({"kind": "identity"}, {}, {"projection": "identity", "dim": 1024}),  # k = p, whatever dim says
    "module_dims": ({"kind": "factored", "module_dims": {"0": 4}}, {},
                    {"projection": "factored", "module_dims": ("0=4",)}),
    "adam_rank": ({"kind": "factored", "adam_rank": 2}, {}, {"projection": "factored", "adam_rank": 2}),
    "eigen basis": ({"kind": "eigen", "dim": 23, "basis_examples": 8, "basis_positions": None,
                     "basis_layer_positions": 5, "basis_checkpoints": 1}, {},
                    {"projection": "eigen", "dim": 23, "basis_examples": 8, "basis_positions": "all",
                     "basis_layer_positions": "5", "basis_checkpoints": "1"}),
    "precision": ({}, {"precision": "bf16"}, {"precision": "bf16"}),
    "fisher exact": ({}, {"fisher": "exact"}, {"fisher": "exact"}),
    "fisher empirical": ({}, {"fisher": "empirical"}, {"fisher": "empirical"}),
    "fisher_examples": ({}, {"fisher_examples": 4, "batch_size": 2}, {"fisher_examples": "4", "batch_size": 2}),
    "curvature kfac": ({}, {"curvature": "kfac"}, {"curvature": "kfac"}),
    "curvature both": ({}, {"curvature": "both"}, {"curvature": "both"}),
    "checkpoints": ({}, {"checkpoint_steps": (4,)}, {"checkpoint_steps": "4,8"}),  # the final one always added
    "final checkpoint": ({}, {"checkpoint_steps": (8,)}, {"checkpoint_steps": "8"}),
    "chunk_rows": ({}, {"chunk_rows": 8}, {"chunk_rows": 8}),
    "shard_chunks": ({}, {"shard_chunks": 1}, {"shard_chunks": 1}),
    "segments": ({}, {"segmentation": sp.SegmentationArguments(per_stage=2)}, {"segmentation": "2"}),
    "segments at": ({}, {"segmentation": sp.SegmentationArguments(boundaries=(4,))}, {"segmentation": "at:4"}),
    "segments auto": ({}, {"segmentation": sp.SegmentationArguments(auto=2)}, {"segmentation": "auto:2"}),
    "fast": ({}, {"segment_means": True}, {"fast": True}),
    "fast-only": ({}, {"segment_means": True, "checkpoints": False}, {"fast_only": True}),
}  # fmt: skip

_NOT_RECORDED = {  # featurize's options the rebuilt command leaves out, and why
    "run_dir", "spec_path", "store_path",  # the paths, as the store has them now
    "force", "grow", "shard",  # what would replace the store, grow it or pick one shard (--grow: a growth cut short)
    "workers", "shard_parameters",  # how the work is spread, which changes no number the store holds
}  # fmt: skip


def _store_made_from_python(tmp_path: Path, tiny_run: Path, projection: dict, options: dict) -> Path:
    """A store of the tiny run featurized from Python with the settings of the base and ``projection``,
    ``options``: it records a spec but no command."""
    from dataclasses import replace

    spec = tmp_path / "spec.py"
    spec.write_text(SPEC.format(root=str(ROOT)))
    store = tmp_path / "s.sp"
    featurize(tiny_run, store, projection=replace(_BASE_PROJECTION, **projection),
              options=replace(_BASE_OPTIONS, **options), spec=str(spec))  # fmt: skip
    assert "command" not in sp.Store.open(store).meta
    return store


def test_every_featurize_option_has_a_rebuilt_counterpart_or_is_not_recorded() -> None:
    """A new featurize option fails here until the command verify rebuilds for a store without one asks for it (and
    a case below shows it) or it is named as one the store does not record."""
    options = {param.name for param in main.commands["featurize"].params}
    covered = set(_BASE_PARAMS).union(*(params for _, _, params in _REBUILT_CASES.values()))
    assert options - _NOT_RECORDED == covered


@pytest.mark.parametrize("case", sorted(_REBUILT_CASES))
def test_the_featurize_command_rebuilt_for_a_store_made_from_python_asks_for_its_settings_and_repairs_it(
    case: str, tmp_path: Path, tiny_run: Path
) -> None:
    """A store made from Python with one setting other than the CLI's default: the featurize command verify --repair
    rebuilds asks for exactly its settings (every other option at its default), and run, it recomputes the damaged
    chunk back to the undamaged store's bytes (featurize refuses a store of other settings)."""
    projection, options, asked = _REBUILT_CASES[case]
    store = _store_made_from_python(tmp_path, tiny_run, projection, options)
    reference = files(store)
    damage(store, sp.Store.open(store).progress_arrays("grads/")[0], 0, "flip")
    out = CliRunner().invoke(main, ["verify", str(store), "--repair"])
    assert out.exit_code == 0, out.output
    command = shlex.split(out.stdout.splitlines()[-1])
    assert command[:2] == ["source-proj", "featurize"], out.stdout
    context = main.commands["featurize"].make_context("featurize", command[2:])
    defaults = main.commands["featurize"].make_context("featurize", ["--ckpts", "r", "--spec", "s", "--out", "o"])
    expected = {**defaults.params, **_BASE_PARAMS, **asked, "run_dir": Path(tiny_run).resolve(),
                "spec_path": tmp_path / "spec.py", "store_path": str(store)}  # fmt: skip
    assert context.params == expected, command
    resumed = CliRunner().invoke(main, command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert files(store) == reference


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"measurement": False}, "FeaturizeArguments(measurement=False)"),
        ({"seed": 5}, "FeaturizeArguments(seed=5)"),
        ({"segmentation": sp.SegmentationArguments(auto=2, probe_rows=8)}, "SegmentationArguments(probe_rows=8)"),
    ],
)
def test_a_store_made_with_a_setting_the_cli_cannot_express_is_sent_back_to_python(
    options: dict, named: str, tmp_path: Path, tiny_run: Path
) -> None:
    """A featurize command without the setting would be refused as other settings: verify names the setting and asks
    for the Python call instead, in one sentence."""
    store = _store_made_from_python(tmp_path, tiny_run, {}, options)
    damage(store, "grads/main/step-00000004", 0, "flip")
    out = CliRunner().invoke(main, ["verify", str(store), "--repair"])
    step = out.stdout.splitlines()[-1].strip()
    assert step.startswith(f"the store was featurized with {named}, which the CLI has no option for: re-run "
                           f"source_proj.featurize(...) into {store} with it and the settings the featurize options "
                           "--projection rademacher --dim 12 "), step  # fmt: skip
    assert "source-proj featurize" not in step


def test_the_defaults_verify_leaves_out_are_the_featurize_options_defaults() -> None:
    """The rebuilt command leaves out a setting at the arguments' default: it must be the option's default too."""
    params = {param.name: param.default for param in main.commands["featurize"].params}
    projection, options = sp.ProjectionArguments(), sp.FeaturizeArguments()
    assert (params["dim"], params["seed"], params["adam_rank"]) == (projection.dim, projection.seed, 1)
    assert (params["batch_size"], params["chunk_rows"]) == (options.batch_size, options.chunk_rows)
    assert (params["fisher"], params["precision"]) == (options.fisher, options.precision)
    assert params["basis_examples"] == projection.basis_examples
    basis = {name: params[name] for name in ("basis_positions", "basis_layer_positions", "basis_checkpoints")}
    assert basis == {name: "all" if getattr(projection, name) is None else str(getattr(projection, name))
                     for name in basis}  # fmt: skip
