"""Issue 14's newcomer probe, case by case: each bad input ends in one sentence (exit code ≠ 0),
no traceback, and leaves every store as it was."""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner, Result

import source_proj as sp
from source_proj.cli.main import main
from source_proj.store.durable import LOCK_FILE

from .conftest import write_spec
from .crash_driver import files


def _refused(out: Result, code: int = 1) -> str:
    """The one-line error of a refused command (and no traceback, no unexpected-error fallback)."""
    assert out.exit_code == code, out.output
    assert "Traceback" not in out.output and "failed unexpectedly" not in out.output, out.output
    errors = [line for line in out.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, out.output
    return errors[0]


def _copy(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "s.sp"
    shutil.copytree(store, copy)
    return copy


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [("fit", "--boundaries", "x,y"), ("featurize", "--checkpoints", "a,b"), ("featurize", "--module-dim", "abc")],
)
def test_a_malformed_option_value_names_the_option(
    cli_reference: tuple[Path, Path], tiny_run: Path, tmp_path: Path, command: str, option: str, value: str
) -> None:
    """These values are parsed inside the command, where click cannot tell which option they came from."""
    store, spec = cli_reference
    if command == "fit":
        args = ["fit", str(_copy(store, tmp_path)), "--force"]
    else:
        args = ["featurize", "--ckpts", str(tiny_run), "--spec", str(spec), "--out", str(tmp_path / "new.sp")]
    message = _refused(CliRunner().invoke(main, [*args, option, value]), code=2)
    assert f"Invalid value for {option}: " in message and repr(value) in message


@pytest.mark.parametrize("segments", ["2", "auto:3"])
def test_fit_refuses_segments_with_boundaries(cli_reference: tuple[Path, Path], tmp_path: Path, segments: str) -> None:
    """--boundaries overrode --segments 2 and was itself overridden by --segments auto:3, silently either way."""
    store = _copy(cli_reference[0], tmp_path)
    out = CliRunner().invoke(main, ["fit", str(store), "--method", "x", "--segments", segments, "--boundaries", "4"])
    assert "--segments and --boundaries each say where to cut; give one" in _refused(out, code=2)
    assert "x" not in sp.Store.open(store).meta["methods"]


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("400:410", "the range 400:410 reaches outside the 12 query examples; use indices from 0 to 11"),
        ("10:14", "the range 10:14 reaches outside the 12 query examples"),  # partly inside: not shortened
        ("12", "query index 12 reaches outside the 12 query examples"),
        ("-1", "query index -1 reaches outside"),
        ("5:5", "the range 5:5 is empty; write START:STOP with START < STOP"),
        ("10:5", "the range 10:5 is empty"),
        ("abc", "'abc' is neither an index nor a range START:STOP"),
        ("3,,5", "'' is neither an index nor a range"),
        ("1:2:3", "'1:2:3' is neither an index nor a range"),
    ],
)
def test_query_indices_outside_the_queries_or_empty_are_refused(
    cli_reference: tuple[Path, Path], which: str, expected: str
) -> None:
    store, _ = cli_reference
    before = files(store)
    message = _refused(CliRunner().invoke(main, ["query", str(store), "--queries", which]), code=2)
    assert message == f"Error: Invalid value for '--queries': {expected}" or expected in message, message
    assert files(store) == before


def test_top_k_beyond_the_training_set_is_refused(cli_reference: tuple[Path, Path]) -> None:
    store, _ = cli_reference
    message = _refused(CliRunner().invoke(main, ["query", str(store), "--top-k", "5000"]))
    assert message == (
        "Error: top-k 5000 is not between 1 and the 12 training examples the method scores; ask for 1 to 12."
    )
    assert "x>=1" in _refused(CliRunner().invoke(main, ["query", str(store), "--top-k", "0"]), code=2)


def test_lists_stop_where_the_scores_change_sign(cli_reference: tuple[Path, Path], tmp_path: Path) -> None:
    store, spec = cli_reference
    out = CliRunner().invoke(main, ["query", str(store), "--top-k", "12", "--out", str(tmp_path / "all.jsonl")])
    assert out.exit_code == 0, out.output
    assert f"(7 more queries not shown; all are in {tmp_path / 'all.jsonl'})" in out.output  # not "use --out"
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    scores = sp.Attributor(store, *_model_and_task(spec)).scores(sp.spec.load_spec(spec).query_data())
    for row in rows:
        assert (row["score"] > 0) == (row["kind"] == "helpful")
    for kind, sign in (("helpful", 1), ("harmful", -1)):
        listed = sum(1 for row in rows if row["kind"] == kind)
        assert listed == int((sign * scores > 0).sum())  # every example of the right sign, none of the other
    assert "12 of 12 queries have fewer than 12 training examples with a score > 0 (helpful)" in out.output


@pytest.mark.parametrize(
    ("short", "said"),
    [
        ((0, 3), "3 of 12 queries have fewer than 2 training examples with a score < 0 (harmful)"),
        ((1, 0), "1 of 12 queries has fewer than 2 training examples with a score > 0 (helpful)"),
        ((2, 5), "2 of 12 queries have fewer than 2 training examples with a score > 0 (helpful) and 5 fewer than 2 "
                 "with a score < 0 (harmful)"),
    ],
)  # fmt: skip
def test_the_note_on_short_lists_names_only_the_kinds_that_are_short(
    cli_reference: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, short: tuple[int, int], said: str
) -> None:
    """It read "0 of 12 queries have fewer than 2 training examples with a score > 0 (helpful) and 3 fewer …"."""
    store, _ = cli_reference
    monkeypatch.setattr(sp.query.attributor.QueryResult, "short_lists", lambda self: short)
    out = CliRunner().invoke(main, ["query", str(store), "--top-k", "2"])
    assert out.exit_code == 0 and out.output.splitlines()[-1] == f"{said}; their lists stop there.", out.output


def test_a_query_without_any_example_of_either_sign_writes_a_csv_header_and_no_rows(
    cli_reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = cli_reference
    top_k = sp.Attributor.top_k

    def flat(self, queries, k=10):  # type: ignore[no-untyped-def]  # every score 0 (e.g. a zero query gradient)
        result = top_k(self, queries, k)
        result.helpful_scores[:] = 0.0
        result.harmful_scores[:] = 0.0
        return result

    monkeypatch.setattr(sp.Attributor, "top_k", flat)
    out = CliRunner().invoke(main, ["query", str(store), "--top-k", "2", "--out", str(tmp_path / "r.csv")])
    assert out.exit_code == 0, out.output
    assert "wrote 0 rows to" in out.output
    assert (tmp_path / "r.csv").read_text().splitlines() == ["query,kind,rank,stage,index,score,description"]


def _broken_text_spec(tmp_path: Path) -> Path:
    """The CLI tests' spec whose texts hold a lone surrogate (half an emoji, as broken JSON escapes decode) and a
    terminal escape sequence (clear the screen)."""
    spec = write_spec(tmp_path / "spec.py", tmp_path / "described.log")
    text = spec.read_text().replace(
        'return f"label {int(data().tensors[1][index])}"', 'return "half an emoji \\ud83d, then \\x1b[2J a long text"'
    )
    spec.write_text(text + '\ndef describe_query(index):\n    return "query \\ud83d \\x1b[2J"\n')
    return spec


def test_texts_with_a_lone_surrogate_are_written_to_csv_and_html(
    cli_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    store, _ = cli_reference
    spec = _broken_text_spec(tmp_path)
    args = ["query", str(store), "--spec", str(spec), "--top-k", "2", "--show", "0"]
    out = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "r.csv"), "--html", str(tmp_path / "r.html")])
    assert out.exit_code == 0, out.output
    assert "half an emoji \\ud83d, then" in (tmp_path / "r.csv").read_text(encoding="utf-8")
    assert "half an emoji \\ud83d, then" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_texts_that_begin_as_spreadsheet_formulas_are_written_to_csv_as_text(
    cli_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    """A description from the user's data that begins with = + - @ would run as a formula where the CSV is opened in a
    spreadsheet (formula injection): its cell begins with a ' instead; scores stay numbers, negative ones too."""
    store, _ = cli_reference
    spec = write_spec(tmp_path / "spec.py", tmp_path / "described.log")
    texts = ["=HYPERLINK(\"http://x\",\"a\")", "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "plain -1"]
    spec.write_text(spec.read_text().replace(
        'return f"label {int(data().tensors[1][index])}"', f"return {texts!r}[index % {len(texts)}]"
    ))  # fmt: skip
    out = CliRunner().invoke(main, ["query", str(store), "--spec", str(spec), "--top-k", "3", "--show", "0",
                                    "--out", str(tmp_path / "r.csv")])  # fmt: skip
    assert out.exit_code == 0, out.output
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    expected = ["'=HYPERLINK(\"http://x\",\"a\")", "'+1+1", "'-2+3", "'@SUM(A1)", "'\tTAB", "plain -1"]
    assert rows and [r["description"] for r in rows] == [expected[int(r["index"]) % len(texts)] for r in rows]
    scores = [float(r["score"]) for r in rows]
    assert min(scores) < 0 < max(scores)


def test_texts_reach_the_terminal_with_control_characters_and_lone_surrogates_escaped(
    cli_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    store, _ = cli_reference
    out = CliRunner().invoke(main, ["query", str(store), "--spec", str(_broken_text_spec(tmp_path)), "--top-k", "2"])
    assert out.exit_code == 0, out.output
    assert "query 0: query \\ud83d \\x1b[2J" in out.output
    assert "half an emoji \\ud83d, then \\x1b[2J a long text" in out.output
    assert "\x1b" not in out.output and "\ud83d" not in out.output


def _model_and_task(spec: Path) -> tuple[object, sp.Task]:
    loaded = sp.spec.load_spec(spec)
    return loaded.build_model(), loaded.build_task()


def test_only_printed_or_written_rows_are_described_each_once(cli_reference: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = cli_reference
    log = tmp_path / "described.log"
    spec = write_spec(tmp_path / "spec.py", log)
    out = CliRunner().invoke(main, ["query", str(store), "--spec", str(spec), "--top-k", "2", "--show", "1"])
    assert out.exit_code == 0, out.output
    described = [int(line.split()[1]) for line in log.read_text().splitlines()]
    printed = {int(i) for i in re.findall(r"main\[(\d+)\]", out.output)}
    assert len(described) == len(set(described)) <= 4  # each example once, only query 0's top 2 + 2
    assert printed <= set(described) and printed
    log.unlink()
    out = CliRunner().invoke(
        main, ["query", str(store), "--spec", str(spec), "--top-k", "2", "--out", str(tmp_path / "r.csv")]
    )
    assert out.exit_code == 0, out.output
    described = [int(line.split()[1]) for line in log.read_text().splitlines()]
    assert len(described) == len(set(described))
    written = (tmp_path / "r.csv").read_text().splitlines()[1:]
    assert {int(row.split(",")[4]) for row in written} <= set(described)
    log.unlink()
    out = CliRunner().invoke(main, ["query", str(store), "--spec", str(spec), "--show", "0"])
    assert out.exit_code == 0 and not log.exists()  # nothing printed, nothing written: nothing described


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("", "is a directory; give a file name ending in .csv, .jsonl or .parquet"),
        ("results.txt", "results.txt has no known format (.txt); end it in .csv, .jsonl or .parquet"),
        ("results", "results has no known format (no suffix)"),
    ],
)
def test_query_out_that_cannot_be_written_is_refused(
    cli_reference: tuple[Path, Path], tmp_path: Path, target: str, expected: str
) -> None:
    store, _ = cli_reference
    out = CliRunner().invoke(main, ["query", str(store), "--top-k", "2", "--out", str(tmp_path / target)])
    assert expected in _refused(out, code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_html_report_path_that_is_a_directory_is_refused_before_any_work(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["query", str(tmp_path / "missing.sp"), "--html", str(tmp_path)])
    assert f"{tmp_path} is a directory; give a file name such as report.html" in _refused(out, code=2)


@pytest.mark.parametrize("command", ["lds", "compare"])
def test_an_alpha_that_keeps_no_training_row_is_refused_as_the_options_before_any_score(
    cli_reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """Checked once the first method's rows are known (α · 12 rows rounds to 0), before its scores or a retrain."""
    store, _ = cli_reference
    monkeypatch.setattr(sp.Ensemble, "scores", lambda *_: pytest.fail("scored before the α was checked"))
    out = CliRunner().invoke(main, [command, str(store), "--alpha", "0.5,0.01", "--cache", str(tmp_path / "cache")])
    assert _refused(out, code=2) == (
        "Error: Invalid value for --alpha: alpha=0.01 keeps 0 of 12 rows; choose alpha so that 0 < αN < N."
    )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", [["query"], ["lds", "--method", "source"], ["compare"]])
def test_an_out_without_a_known_format_is_refused_before_any_work(tmp_path: Path, command: list[str]) -> None:
    """Before the store is even opened: not after the queries were scored or the models retrained."""
    out = CliRunner().invoke(main, [command[0], str(tmp_path / "missing.sp"), *command[1:], "--out", "r.txt"])
    assert "r.txt has no known format (.txt); end it in .csv, .jsonl or .parquet" in _refused(out, code=2)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def build_model(:\n", r"cannot be imported \(SyntaxError, line 1: invalid syntax.*\); fix the file"),
        ("import no_such_module_xyz\n", r"cannot be imported \(ModuleNotFoundError: No module named 'no_such_mo"),
        ("raise SystemExit(3)\n", r"cannot be imported \(SystemExit: 3\)"),
        ("def build_task(): pass\n", r"does not define build_model, train_data"),
    ],
)
def test_a_broken_spec_file_is_named(
    cli_reference: tuple[Path, Path], tmp_path: Path, source: str, expected: str
) -> None:
    store, _ = cli_reference
    spec = tmp_path / "spec.py"
    spec.write_text(source)
    message = _refused(CliRunner().invoke(main, ["query", str(store), "--spec", str(spec)]))
    assert message.startswith(f"Error: Spec file {spec}")
    assert re.search(expected, message), message


def test_a_spec_function_that_raises_is_named(cli_reference: tuple[Path, Path], tmp_path: Path) -> None:
    store, good = cli_reference
    spec = tmp_path / "spec.py"
    spec.write_text(good.read_text() + "\ndef build_model():\n    raise ValueError('no weights here')\n")
    message = _refused(CliRunner().invoke(main, ["query", str(store), "--spec", str(spec)]))
    assert message == f"Error: build_model() in {spec} failed (ValueError: no weights here); fix the spec file."
    spec.write_text(good.read_text() + "\ndef query_data():\n    return 42\n")
    message = _refused(CliRunner().invoke(main, ["query", str(store), "--spec", str(spec)]))
    assert "query_data() in" in message and "returned int, not a dataset" in message


def test_another_activation_in_the_spec_is_refused_by_query(cli_reference: tuple[Path, Path], tmp_path: Path) -> None:
    store, good = cli_reference
    spec = tmp_path / "tanh.py"
    spec.write_text(
        good.read_text()
        + "\nfrom torch import nn\ndef build_model():\n"
        + "    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))\n"
    )
    message = _refused(CliRunner().invoke(main, ["query", str(store), "--spec", str(spec), "--queries", "0:1"]))
    assert "The model computes other outputs at the final checkpoint than the one the store" in message
    assert "build the model exactly as for featurize" in message


def test_changed_training_data_are_refused_before_describing(cli_reference: tuple[Path, Path], tmp_path: Path) -> None:
    store, good = cli_reference
    spec = tmp_path / "shuffled.py"
    spec.write_text(
        good.read_text()
        + "\nfrom torch.utils.data import Subset\ndef train_data(stage):\n"
        + "    return Subset(data(), list(range(11, -1, -1)))\n"
    )
    message = _refused(CliRunner().invoke(main, ["query", str(store), "--spec", str(spec)]))
    assert "The training data of stage 'main' are not those the store" in message
    assert "(other contents or order)" in message


_UNREADABLE_SPEC = """
class Unreadable:
    def __init__(self):
        self.examples = data()
    def __len__(self):
        return len(self.examples)
    def __getitem__(self, index):
        if index == 9:
            raise OSError("cannot read 9.png")
        return self.examples[index]
def {function}(*_):
    return Unreadable()
"""


@pytest.mark.parametrize(
    ("function", "command", "example"),
    [
        ("train_data", "featurize", "training example 9 of stage 'main'"),
        ("query_data", "query", "query 9"),
        ("query_data", "query --queries 8:10", "query 9"),  # named by its index in query_data(), not in the selection
        ("train_data", "query", "training example 9 of stage 'main'"),  # read to check the data before describing
    ],
)
def test_an_example_the_dataset_cannot_read_is_named_as_the_datasets_error(
    cli_reference: tuple[Path, Path], tiny_run: Path, tmp_path: Path, function: str, command: str, example: str
) -> None:
    """Not "failed unexpectedly … a bug": the dataset's own error, with the example it was reading."""
    reference, good = cli_reference
    spec = tmp_path / "spec.py"
    spec.write_text(good.read_text() + _UNREADABLE_SPEC.format(function=function))
    store = tmp_path / "s.sp"
    if command == "featurize":
        args = ["featurize", "--ckpts", str(tiny_run), "--spec", str(spec), "--out", str(store), "--device", "cpu"]
    else:
        args = ["query", str(_copy(reference, tmp_path)), "--spec", str(spec), *command.split()[1:]]
    message = _refused(CliRunner().invoke(main, args))
    resumes = " (a store featurize was writing resumes where it stopped)" if command == "featurize" else ""
    assert message == (
        f"Error: The dataset raised an error of its own reading {example} (OSError: cannot read 9.png); fix that "
        f"example in the dataset and run again{resumes}."
    )
    assert command != "featurize" or not store.exists()


def test_every_option_has_help_text() -> None:
    missing = [
        f"{name} {param.opts[0]}"
        for name, command in main.commands.items()
        for param in command.params
        if isinstance(param, click.Option) and not param.help and param.opts[0] not in ("--help", "-h")
    ]
    assert missing == []


def test_verify_repair_after_a_default_fit_prints_commands_that_run(
    cli_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    reference, _ = cli_reference
    store = _copy(reference, tmp_path)
    [shard] = [f for f in (store / "methods/source/train/main/c").rglob("*") if f.is_file()]  # one shard file
    shard.write_bytes(b"\0" * 5)
    cli = CliRunner()
    out = cli.invoke(main, ["verify", str(store), "--repair"])
    assert out.exit_code == 0, out.output
    command = out.stdout.splitlines()[-1].strip()
    assert command == f"source-proj fit {store} --method source"
    assert cli.invoke(main, shlex.split(command)[1:]).exit_code == 0
    assert files(store) == files(reference)


@pytest.mark.parametrize(
    "node",
    ["grads/main/step-00000004", "progress/fisher/main/step-00000008", "methods/source/train/main", "grads/main"],
)
def test_unreadable_array_or_group_metadata_is_reported_and_repaired(
    cli_reference: tuple[Path, Path], tmp_path: Path, node: str
) -> None:
    reference, _ = cli_reference
    store = _copy(reference, tmp_path)
    (store / node / "zarr.json").write_text("garbage")
    cli = CliRunner()
    out = cli.invoke(main, ["verify", str(store)])
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    assert "unreadable" in out.output and out.stdout.splitlines()[-1].startswith("status: DAMAGED")
    out = cli.invoke(main, ["verify", str(store), "--repair"])
    assert out.exit_code == 0 and "repaired" in out.output, out.output
    for line in out.stdout.splitlines():
        if line.startswith("  source-proj "):
            assert cli.invoke(main, shlex.split(line)[1:]).exit_code == 0, line
    assert files(store) == files(reference)  # recomputed exactly: nothing lost


def _read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make every file creation and directory creation under ``root`` fail as on a read-only mount
    (the tests run as root, whom permissions cannot stop)."""
    real_open, real_mkdir = os.open, Path.mkdir

    def open_(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).startswith(str(root)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    def mkdir(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(self).startswith(str(root)) and not self.is_dir():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("command", ["featurize", "fit", "verify --repair"])
def test_a_read_only_store_location_is_named(
    cli_reference: tuple[Path, Path], tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    reference, spec = cli_reference
    store = _copy(reference, tmp_path)
    before = files(store)
    args = {
        "featurize": ["featurize", "--ckpts", str(tiny_run), "--spec", str(spec), "--out", str(tmp_path / "new.sp")],
        "fit": ["fit", str(store), "--force"],
        "verify --repair": ["verify", str(store), "--repair"],
    }[command]
    _read_only(monkeypatch, tmp_path)
    message = _refused(CliRunner().invoke(main, args))
    assert "failed because the file system is read-only" in message
    monkeypatch.undo()
    assert files(store) == before and not (tmp_path / "new.sp").exists()


def test_query_on_a_store_being_rewritten_names_the_writer(cli_reference: tuple[Path, Path], tmp_path: Path) -> None:
    reference, _ = cli_reference
    store = _copy(reference, tmp_path)
    opened = sp.Store.open(store, writable=True)
    methods = opened.meta["methods"]
    opened.update_meta(methods={"source": {**methods["source"], "complete": False}})  # as fit --force leaves it
    holder = {"mode": "exclusive", "pid": 4242, "host": "gpu7", "time": 0, "command": "source-proj fit s.sp --force"}
    fd = os.open(store / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        fcntl.flock(fd, fcntl.LOCK_EX)  # another writer, as far as the probe can tell
        message = _refused(CliRunner().invoke(main, ["query", str(store)]))
    finally:
        os.close(fd)
    assert message.startswith(f"Error: Method 'source' in {store} is not ready: the store is being written by process")
    assert "process 4242 on gpu7 since" in message
    assert "(source-proj fit s.sp --force); wait for that to finish, then query again." in message
    message = _refused(CliRunner().invoke(main, ["query", str(store)]))  # writer gone: the command that completes it
    assert f"is unfinished (an interrupted or failed fit); complete it with `source-proj fit {store}" in message


def _unfinish(store: Path, method: str) -> None:
    """Leave ``method`` as a killed fit leaves it: recorded, not complete, its last chunk not written."""
    opened = sp.Store.open(store, writable=True)
    methods = opened.meta["methods"]
    opened.update_meta(methods={**methods, method: {**methods[method], "complete": False}})


@pytest.mark.parametrize(
    ("fit", "method"),
    [(["fit", "--force", "--segments", "2"], "source"), (["baseline", "--kind", "if", "--damping-factor", "2"], "if")],
)
def test_an_unfinished_method_names_the_command_that_completes_it(
    cli_reference: tuple[Path, Path], tmp_path: Path, fit: list[str], method: str
) -> None:
    """With the settings it was fitted with: a plain `source-proj fit S` would be refused as other settings."""
    store = _copy(cli_reference[0], tmp_path)
    out = CliRunner().invoke(main, [fit[0], str(store), *fit[1:]])
    assert out.exit_code == 0, out.output
    _unfinish(store, method)
    message = _refused(CliRunner().invoke(main, ["query", str(store), "--method", method]))
    command = re.search(r"complete it with `source-proj ([^`]*)`", message)
    assert command is not None, message
    assert "--segments 2" in command.group(1) if method == "source" else "--damping-factor 2.0" in command.group(1)
    out = CliRunner().invoke(main, shlex.split(command.group(1)))
    assert out.exit_code == 0, out.output
    assert CliRunner().invoke(main, ["query", str(store), "--method", method, "--top-k", "2"]).exit_code == 0


@pytest.mark.parametrize(
    ("method", "hint"),
    [
        ("trak", "`source-proj baseline {s} --kind trak` (in Python: sp.fit_baseline(store, "
                 "sp.BaselineArguments('trak')))"),
        ("mine", "`source-proj fit {s} --method mine` (SOURCE; in Python: sp.fit(store, "
                 "sp.FitArguments(method='mine')))"),
    ],
)
def test_a_method_the_store_lacks_names_the_command_that_fits_it(
    cli_reference: tuple[Path, Path], method: str, hint: str
) -> None:
    store = cli_reference[0]
    message = _refused(CliRunner().invoke(main, ["query", str(store), "--method", method]))
    assert f"has no fitted method {method!r} (it has ['source']); run {hint.format(s=store)}" in message


def _missing_cuda() -> str:
    return "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("banana", "'banana' is not a device; pass cpu, cuda or cuda:N."),
        ("cuda:", "'cuda:' is not a device"),
        ("cuda", None),  # CUDA on a machine without it: refused, and the reason named
        ("cuda:7", None),
    ],
)
@pytest.mark.parametrize("command", ["query", "fit --force --segments 3", "baseline --kind trak --force", "featurize"])
def test_a_device_this_machine_lacks_is_refused_before_any_work(
    cli_reference: tuple[Path, Path], tiny_run: Path, tmp_path: Path, device: str, expected: str | None, command: str
) -> None:
    """A device torch does not know, or CUDA where there is none, is one sentence. fit --force used to replace the
    fitted method first and fail after, leaving the store with an unfinished method."""
    index = int(device.partition(":")[2] or 0) if device in ("cuda", "cuda:7") else None
    if index is not None and torch.cuda.is_available() and index < torch.cuda.device_count():
        pytest.skip(f"{device} exists on this machine, so nothing is refused")  # GPU machines: only the others run
    reference, spec = cli_reference
    store = _copy(reference, tmp_path)
    before = files(store)
    name, *rest = command.split()
    args = {"featurize": ["featurize", "--ckpts", str(tiny_run), "--spec", str(spec), "--out", str(store)]}.get(
        name, [name, str(store), *rest]
    )
    message = _refused(CliRunner().invoke(main, [*args, "--device", device]))
    if expected is not None:
        assert message == f"Error: {expected}" or message.startswith(f"Error: {expected}"), message
    elif not torch.cuda.is_available():
        assert message == f"Error: Device {device!r} is CUDA, but {_missing_cuda()}; pass cpu.", message
    else:
        assert f"Device {device!r} does not exist: this machine has" in message, message
    assert files(store) == before
    out = CliRunner().invoke(main, ["query", str(store), "--top-k", "2"])  # the fitted method is intact
    assert out.exit_code == 0, out.output


@pytest.mark.parametrize(("devices", "expected"), [("banana", "'banana' is not a device"), ("cpu,cuda:7", None)])
def test_search_devices_this_machine_lacks_are_refused_in_a_sentence(
    cli_reference: tuple[Path, Path], devices: str, expected: str | None
) -> None:
    if expected is None and torch.cuda.device_count() > 7:
        pytest.skip("cuda:7 exists on this machine, so nothing is refused")
    store, _ = cli_reference
    args = ["query", str(store), "--top-k", "2", "--search", "torch", "--search-devices", devices]
    message = _refused(CliRunner().invoke(main, args))
    if expected is not None:
        assert message.startswith(f"Error: {expected}"), message
    elif not torch.cuda.is_available():
        assert message == f"Error: Device 'cuda:7' is CUDA, but {_missing_cuda()}; pass cpu.", message
    else:
        assert "Device 'cuda:7' does not exist: this machine has" in message, message


def test_a_reader_that_leaves_ends_the_output_quietly(cli_reference: tuple[Path, Path]) -> None:
    """`source-proj info S | head -1`: the closed pipe is not reported as a bug (click exits with status 1). The pipe's
    reading end is closed before the command starts, so every write meets it."""
    import subprocess
    import sys

    store, _ = cli_reference
    script = "from source_proj.cli.main import main; main()"
    for args in (["info", str(store)], ["query", str(store), "--top-k", "5"]):
        read, write = os.pipe()
        os.close(read)
        try:
            command = [sys.executable, "-c", script, *args]
            done = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True)
        finally:
            os.close(write)
        assert (done.returncode, done.stderr) == (1, ""), (done.returncode, done.stderr)


_INTERRUPTED_IN_A_WRITE = """
import os, signal, sys, threading, time
from zarr.core.sync import sync
import source_proj.cli.main as cli

async def stuck_write():
    time.sleep(1.0)  # zarr's IO thread still in a write (an fsync on a slow disk) when the interrupt comes

def interrupted(store):
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    sync(stuck_write())

cli.store_summary = interrupted
cli.main(["info", sys.argv[1]], prog_name="source-proj")
"""


def test_ctrl_c_during_a_store_write_ends_in_one_sentence(cli_reference: tuple[Path, Path]) -> None:
    """Ctrl-C while zarr's IO thread was writing printed "Aborted!", then zarr's clean-up at exit a traceback ("Cannot
    close a running event loop"): the write is let finish, and the command ends in one sentence with status 130."""
    import subprocess
    import sys

    store, _ = cli_reference
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_IN_A_WRITE, str(store)], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "Error: source-proj info was interrupted.\n")


def test_ctrl_c_in_a_command_that_writes_says_it_resumes(
    cli_reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    store, _ = cli_reference
    monkeypatch.setattr(sp, "fit", interrupted)
    out = CliRunner().invoke(main, ["fit", str(_copy(store, tmp_path)), "--device", "cpu"])
    assert _refused(out, 130) == (
        "Error: source-proj fit was interrupted; run the same command again to resume where it stopped."
    )


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--search", "ivf", "--nprobe", "0"], "Invalid value for '--nprobe': 0 is not in the range x>=1."),
        (["--search", "ivf", "--nlist", "0"], "Invalid value for '--nlist': 0 is not in the range x>=1."),
        (["--nprobe", "4"], "--nprobe applies to the approximate search only; add --search ivf, or drop it."),
        (["--nlist", "2", "--ivf-fp16"], "--nlist and --ivf-fp16 apply to the approximate search only; add --search"),
        (["--search", "ivf", "--search-devices", "cpu,cpu"],
         "--search-devices shards --search torch, stream or auto; --search ivf runs on one device, so drop it."),
    ],
)
def test_approximate_search_options_are_checked(
    cli_reference: tuple[Path, Path], options: list[str], expected: str
) -> None:
    store, _ = cli_reference
    message = _refused(CliRunner().invoke(main, ["query", str(store), *options]), code=2)
    assert message.startswith(f"Error: {expected}"), message


def test_ivf_arguments_refuse_what_is_not_a_count() -> None:
    for field in ("nlist", "nprobe", "train_rows"):
        with pytest.raises(sp.TaskError, match=f"IVFArguments.{field} is 0; pass a whole number ≥ 1."):
            sp.IVFArguments(**{field: 0})
    assert sp.IVFArguments(nlist=None, nprobe=1).nprobe == 1


def test_parquet_without_pyarrow_is_refused_before_any_work(
    cli_reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    store, _ = cli_reference
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    out = CliRunner().invoke(main, ["query", str(store), "--top-k", "2", "--out", str(tmp_path / "r.parquet")])
    message = _refused(out, code=2)
    assert "writing parquet needs pyarrow; `pip install source-proj[parquet]`" in message
    assert "more queries not shown" not in out.output and not (tmp_path / "r.parquet").exists()


def test_fit_of_a_store_whose_featurize_has_not_finished_says_so_and_records_nothing(
    cli_reference: tuple[Path, Path], tiny_run: Path, tmp_path: Path
) -> None:
    """One shard of a split featurize: fit names what is missing and how to finish it, before it records a method
    (it used to record one, unfinished, and fail reading the first unwritten chunk)."""
    _, spec = cli_reference
    store = tmp_path / "half.sp"
    args = ["featurize", "--ckpts", str(tiny_run), "--spec", str(spec), "--out", str(store), "--dim", "12"]
    args += ["--batch-size", "4", "--chunk-rows", "4", "--device", "cpu"]
    out = CliRunner().invoke(main, [*args, "--shard", "0/2"])
    assert out.exit_code == 0, out.output
    # A query said to fit it, and the fit then to finish featurizing first: the query says both, in that order.
    resume = "source-proj featurize --ckpts"
    assert _refused(CliRunner().invoke(main, ["query", str(store)])).startswith(
        f"Error: The store at {store} is not fully featurized, so it has no fitted method 'source'; finish it with "
        f"`{resume} "
    )
    message = _refused(CliRunner().invoke(main, ["fit", str(store)]))
    assert f"The store at {store} is not fully featurized ([" in message
    assert "not every shard of a split one (--shard i/n) has run; finish it with `source-proj featurize" in message
    assert not sp.Store.open(store).meta.get("methods")  # no unfinished method left behind
    out = CliRunner().invoke(main, [*args, "--shard", "1/2"])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(main, ["fit", str(store)])
    assert out.exit_code == 0, out.output


def test_an_unfinished_baseline_fitted_with_settings_the_cli_lacks_points_to_the_api(
    cli_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    store = _copy(cli_reference[0], tmp_path)
    sp.fit_baseline(store, sp.BaselineArguments(kind="if", damping=0.5), progress=False)
    _unfinish(store, "if")
    message = _refused(CliRunner().invoke(main, ["query", str(store), "--method", "if"]))
    expected = (
        "is unfinished (an interrupted or failed fit); complete it (re-run source_proj.fit_baseline(...) with the "
        "BaselineArguments(kind='if', method='if', ...) it was fitted with), or replace it with --force"
    )
    assert expected in message, message


_GREEDY_SPEC = """
import torch
from tests.crash_driver import build_model as _build

def build_model():
    model = _build()

    def greedy(module, args):  # a batch of 6 takes more memory than this machine has
        if args[0].shape[0] == 6:
            {allocation}

    model.register_forward_pre_hook(greedy)
    return model
"""
_ALLOCATIONS = {
    "host": ("torch.empty(2**60, dtype=torch.uint8)", "the host could not allocate 1073741824.0 GiB"),
    "cuda": (
        "raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 12.00 GiB. GPU 0 has a total capacity "
        "of 79.19 GiB of which 3.12 GiB is free.')",
        "CUDA out of memory. Tried to allocate 12.00 GiB",
    ),
}


@pytest.mark.parametrize("where", list(_ALLOCATIONS))
def test_running_out_of_memory_names_what_to_lower_and_the_store_resumes(
    tiny_run: Path, tmp_path: Path, where: str
) -> None:
    """A batch that does not fit (the host's allocator, or a GPU's) is neither "a bug" nor the examples' fault
    (the host's failure is a plain RuntimeError, which the model's own errors are too): one sentence names the
    allocation and what to lower, and featurize with the batch it names then completes the same store."""
    allocation, said = _ALLOCATIONS[where]
    spec = write_spec(tmp_path / "spec.py", tmp_path / "described.log")
    spec.write_text(spec.read_text() + _GREEDY_SPEC.format(allocation=allocation))
    store = tmp_path / "s.sp"
    args = ["featurize", "--ckpts", str(tiny_run), "--spec", str(spec), "--out", str(store), "--dim", "12"]
    args += ["--seed", "3", "--chunk-rows", "6", "--device", "cpu"]
    message = _refused(CliRunner().invoke(main, [*args, "--batch-size", "6"]))
    assert message == (
        f"Error: source-proj featurize ran out of memory ({said}); featurize again with --batch-size 3 (half of 6: a "
        "batch's activations, and a language model's logits, grow with it; the store resumes where it stopped), or "
        "anew with --precision bf16 and --force."
    )
    out = CliRunner().invoke(main, [*args, "--batch-size", "3"])
    assert out.exit_code == 0, out.output
    assert CliRunner().invoke(main, ["verify", str(store)]).exit_code == 0
    # the library raises the allocation's own error, not a TaskError that blames the examples
    module = sp.spec.load_spec(spec)
    with pytest.raises(RuntimeError, match=r"can't allocate memory|CUDA out of memory") as raised:
        sp.featurize(
            tiny_run, module.build_model(), module.build_task(), {"main": module.train_data("main")},
            tmp_path / "lib.sp", projection=sp.ProjectionArguments(dim=12),
            options=sp.FeaturizeArguments(batch_size=6, chunk_rows=6, device="cpu"),
        )  # fmt: skip
    assert not isinstance(raised.value, sp.SourceProjError)
