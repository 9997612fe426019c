"""Property: whatever a newcomer gives the CLI or the Python API (query ranges, store paths, spec
files, damaged stores and checkpoints), it ends in one sentence or in a correct result: never a
traceback, never a silently wrong answer, never lost data.

The catalogue (``fuzz_cases.CASES``) holds the named bad inputs; the hypothesis tests draw more
from the same spaces. ``SOURCE_PROJ_FUZZ_SCALE=10`` multiplies their examples for a longer hunt.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import source_proj as sp
from source_proj.cli.main import main

from .crash_driver import DIM, OPTIONS, build_model, data
from .fuzz_cases import CASES, SPEC_CHANGES, Case, Workspace, judge, snapshot

SCALE = int(os.environ.get("SOURCE_PROJ_FUZZ_SCALE", "1"))


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def test_the_catalogue_holds_at_least_sixty_distinct_bad_inputs() -> None:
    assert len({case.name for case in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_every_bad_input_ends_in_one_sentence_and_loses_nothing(
    case: Case, tmp_path: Path, tiny_run: Path, cli_reference: tuple[Path, Path]
) -> None:
    outcome = judge(case, Workspace(tmp_path, tiny_run, cli_reference[0]))
    assert outcome.clear and not outcome.traceback and not outcome.lost, outcome


@pytest.fixture
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, cli_reference: tuple[Path, Path]) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("fuzz"), tiny_run, cli_reference[0])


def _clear(out: object, code: int | None = None) -> str:
    """The single error line of a refused CLI command (asserting there is no traceback)."""
    assert out.exception is None or isinstance(out.exception, SystemExit), out.output  # type: ignore[attr-defined]
    assert "Traceback" not in out.output and "failed unexpectedly" not in out.output, out.output  # type: ignore[attr-defined]
    assert out.exit_code != 0 if code is None else out.exit_code == code, out.output  # type: ignore[attr-defined]
    errors = [line for line in out.output.splitlines() if line.startswith("Error: ")]  # type: ignore[attr-defined]
    assert len(errors) == 1, out.output  # type: ignore[attr-defined]
    return errors[0]


def _indices(n: int, text: str) -> list[int] | None:
    """What ``--queries text`` means for ``n`` queries, by its definition (None: not valid)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        bounds = part.split(":")
        if len(bounds) > 2 or not all(re.fullmatch(r"\s*-?\d+\s*|\s*", b) for b in bounds):
            return None
        if len(bounds) == 1:
            if not bounds[0].strip():
                return None
            start = int(bounds[0])
            stop = start + 1
        else:
            start = int(bounds[0]) if bounds[0].strip() else 0
            stop = int(bounds[1]) if bounds[1].strip() else n
        if not 0 <= start < stop <= n:
            return None
        out.extend(range(start, stop))
    return out


@_settings(25)
@given(st.text(alphabet="0123456789:,- a", max_size=7))
def test_any_queries_text_selects_exactly_its_indices_or_is_refused(workspace: Workspace, text: str) -> None:
    out_file = workspace.path("rows.jsonl")
    out_file.unlink(missing_ok=True)
    args = ["query", str(workspace.store), "--queries", text, "--top-k", "1", "--out", str(out_file)]
    out = CliRunner().invoke(main, args)
    expected = _indices(12, text)
    if expected is None:
        assert "Invalid value for --queries: " in _clear(out, 2)
        assert not out_file.exists()
        return
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert {r["query"] for r in rows} <= set(expected)  # rows of the wrong sign are left out, nothing else
    shown = [int(m) for m in re.findall(r"^query (\d+)", out.output, re.MULTILINE)]
    assert shown == expected[:5]


PATHS = ["missing", "file", "empty folder", "foreign folder", "garbage root", "json root", "odd name"]
COMMANDS = [
    ["info"],
    ["verify"],
    ["verify", "--repair"],
    ["fit"],
    ["query"],
    ["trajectory"],
    ["baseline", "--kind", "trak"],
]


@_settings(30)
@given(st.sampled_from(PATHS), st.sampled_from(COMMANDS), st.binary(max_size=40), st.text(max_size=12))
def test_any_store_path_is_refused_in_one_sentence_or_works(
    workspace: Workspace, kind: str, command: list[str], raw: bytes, text: str
) -> None:
    target = workspace.path("target")
    shutil.rmtree(target, ignore_errors=True)
    target.unlink(missing_ok=True)
    if kind == "file":
        target.write_bytes(raw)
    elif kind != "missing":
        target.mkdir()
    if kind == "foreign folder":
        (target / "notes.txt").write_text(text or "x")
    if kind == "garbage root":
        (target / "zarr.json").write_bytes(raw)
    if kind == "json root":
        (target / "zarr.json").write_text(
            json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"x": text}})
        )
    if kind == "odd name":
        target = workspace.path(f"a store ü {len(text)}.sp")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(workspace.store, target)
    before = snapshot(workspace.root)
    out = CliRunner().invoke(main, [command[0], str(target), *command[1:]])
    if kind == "odd name":  # a real store under an unusual name works (trajectory has no automatic cuts)
        assert out.exit_code == (2 if command == ["trajectory"] else 0), out.output
        return
    message = _clear(out)
    assert str(target) in message or "Invalid value" in message or "Usage" in out.output
    after = snapshot(workspace.root)
    assert all(after.get(name) == digest for name, digest in before.items())


def _damage(store: Path, draw: st.DataObject) -> list[str]:
    """1–3 random damages to the store's chunks and array/group metadata (never its root metadata):
    flipped bytes, truncations, deletions, garbage metadata. Returns what was done."""
    done = []
    for _ in range(draw.draw(st.integers(1, 3))):
        candidates = [p for p in sorted(store.rglob("*")) if p.is_file() and p.name != ".source-proj.lock"]
        candidates = [p for p in candidates if p != store / "zarr.json"]
        target = draw.draw(st.sampled_from(candidates))
        raw = target.read_bytes()
        if target.name == "zarr.json":
            target.write_bytes(draw.draw(st.binary(max_size=20)))
            done.append(f"garbage {target.relative_to(store)}")
            continue
        op = draw.draw(st.sampled_from(["flip", "truncate", "delete"]))
        if op == "flip" and raw:
            at = draw.draw(st.integers(0, len(raw) - 1))
            target.write_bytes(raw[:at] + bytes([raw[at] ^ (1 << draw.draw(st.integers(0, 7)))]) + raw[at + 1 :])
        elif op == "truncate" and raw:
            target.write_bytes(raw[: draw.draw(st.integers(0, len(raw) - 1))])
        else:
            target.unlink()
        done.append(f"{op} {target.relative_to(store)}")
    return done


@_settings(4)
@given(st.data())
def test_any_store_damage_is_reported_and_repair_recomputes_exactly_what_was_lost(
    workspace: Workspace, draw: st.DataObject
) -> None:
    store = workspace.path("damaged.sp")
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(workspace.store, store)
    reference = snapshot(workspace.store)
    _damage(store, draw)
    cli = CliRunner()
    out = cli.invoke(main, ["verify", str(store)])
    assert out.exit_code in (0, 1) and isinstance(out.exception, (SystemExit, type(None))), out.output
    assert "Traceback" not in out.output and "failed unexpectedly" not in out.output
    query = cli.invoke(main, ["query", str(store), "--top-k", "2"])
    if query.exit_code != 0:
        _clear(query)  # refused in one sentence: a damaged chunk is never scored
    out = cli.invoke(main, ["verify", str(store), "--repair"])
    assert out.exit_code == 0, out.output
    for line in out.stdout.splitlines():
        if line.startswith("  source-proj "):
            step = cli.invoke(main, shlex.split(line)[1:])
            assert step.exit_code == 0, (line, step.output)
    # Back to the bytes before the damage; the root metadata (rewritten by zarr) to the same content.
    assert {k: v for k, v in snapshot(store).items() if k != "zarr.json"} == {
        k: v for k, v in reference.items() if k != "zarr.json"
    }
    assert _attributes(store) == _attributes(workspace.store)


def _attributes(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]


def _loaded(path: Path) -> dict[str, torch.Tensor] | None:
    """The checkpoint's weights read as the library reads them (mapped: ``load_checkpoint(mmap=True)``), copied out
    of the file; ``None`` where that fails. A mapped load reads a tensor's own bytes only, so a damaged storage
    size in the archive's index that still covers those bytes loads the true weights where a whole read refuses."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
        return {name: tensor.clone() for name, tensor in weights.items()}
    except Exception:
        return None


@_settings(12)
@given(st.integers(0, 2), st.sampled_from(["flip", "truncate", "append", "delete"]), st.booleans(), st.data())
def test_any_checkpoint_damage_is_refused_before_anything_is_written(
    workspace: Workspace, index: int, op: str, record_sha: bool, draw: st.DataObject
) -> None:
    workspace.reset_run()
    entry = json.loads((workspace.run / "trajectory.json").read_text())["checkpoints"][index]
    path = workspace.run / entry["file"]
    raw = path.read_bytes()
    original = _loaded(path)
    if op == "delete":
        path.unlink()
    else:
        if op == "flip":
            at = draw.draw(st.integers(0, len(raw) - 1))
            damaged = raw[:at] + bytes([raw[at] ^ 0x40]) + raw[at + 1 :]
        elif op == "truncate":
            damaged = raw[: draw.draw(st.integers(0, len(raw) - 1))]
        else:
            damaged = raw + draw.draw(st.binary(min_size=1, max_size=64))
        if record_sha:
            workspace.rewrite_checkpoint(index, damaged)
        else:
            path.write_bytes(damaged)
    target = workspace.path("new.sp")
    shutil.rmtree(target, ignore_errors=True)  # one failing example must not fail every later one
    try:
        sp.featurize(workspace.run, build_model(), sp.ClassificationTask(), data(), target,
                     projection=sp.ProjectionArguments(dim=DIM, seed=3), options=OPTIONS, progress=False)  # fmt: skip
    except sp.TrajectoryError as err:
        assert "\n" not in str(err) and not target.exists()
        return
    # Accepted only when the run names this file (its sha256 recorded) and it holds finite weights that fit
    # the model (a flip inside a tensor's data, bytes appended to the archive): the store records that run.
    assert op != "delete" and record_sha
    weights = _loaded(path)
    assert weights is not None and all(torch.isfinite(t).all() for t in weights.values())
    assert sp.Store.open(target).meta["trajectory"]["fingerprint"] == sp.Trajectory.load(workspace.run).fingerprint()
    assert original is not None
    shutil.rmtree(target)


BREAKS_FEATURIZE = {
    "syntax error", "import error", "exits on import", "build_model raises", "build_model returns None",
    "build_task returns a string", "train_data returns an int", "train_data of another size", "train_data shuffled",
    "another activation", "another width", "regression task",
}  # fmt: skip


@_settings(12)
@given(st.lists(st.sampled_from(sorted(SPEC_CHANGES)), min_size=1, max_size=2, unique=True), st.booleans())
def test_any_broken_spec_is_refused_by_the_commands_it_breaks(
    workspace: Workspace, changes: list[str], featurize: bool
) -> None:
    spec = workspace.spec_with("".join(SPEC_CHANGES[c] for c in changes), "drawn.py")
    before = snapshot(workspace.store)
    if featurize:
        args = ["featurize", "--ckpts", str(workspace.run), "--spec", str(spec), "--out", str(workspace.store)]
        args += ["--dim", str(DIM), "--seed", "3", "--batch-size", "4", "--chunk-rows", "4", "--device", "cpu"]
        breaks = bool(BREAKS_FEATURIZE & set(changes))
    else:
        args = ["query", str(workspace.store), "--spec", str(spec), "--top-k", "2"]
        breaks = True
    out = CliRunner().invoke(main, args)
    if breaks:
        _clear(out)
    else:  # featurize of the same inputs reuses the finished store
        assert out.exit_code == 0, out.output
    assert snapshot(workspace.store) == before


def test_a_checkpoint_whose_storages_name_another_device_is_read_onto_the_cpu(workspace: Workspace) -> None:
    """A flipped bit that turns a storage's location tag "cpu" into "#pu" (a case hypothesis found): torch.load with
    ``map_location="cpu"``, as the library loads, reads the same weights, so featurize accepts the run it names; the
    fuzz test's own check must load it the same way."""
    workspace.reset_run()
    entry = json.loads((workspace.run / "trajectory.json").read_text())["checkpoints"][0]
    path = workspace.run / entry["file"]
    raw = path.read_bytes()
    original = _loaded(path)
    at = raw.index(b"cpu")
    workspace.rewrite_checkpoint(0, raw[:at] + b"#" + raw[at + 1 :])
    with pytest.raises(RuntimeError, match="data location"):
        torch.load(path, weights_only=True)
    weights = _loaded(path)
    assert original is not None and weights is not None
    assert all(torch.equal(weights[k], original[k]) for k in original)
    target = workspace.path("new.sp")
    sp.featurize(workspace.run, build_model(), sp.ClassificationTask(), data(), target,
                 projection=sp.ProjectionArguments(dim=DIM, seed=3), options=OPTIONS, progress=False)  # fmt: skip
    assert sp.Store.open(target).meta["trajectory"]["fingerprint"] == sp.Trajectory.load(workspace.run).fingerprint()
