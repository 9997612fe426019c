"""The digits demo (``./dev.sh demo [args]``, examples/digits/run.py) refuses bad arguments and reports the
library's errors in one line, not with a traceback."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")  # the demo reads the digits file scikit-learn ships

ROOT = Path(__file__).resolve().parents[1]


def _demo(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "examples" / "digits" / "run.py"), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-k", "0"], "argument --top-k: expected a whole number ≥ 1, got '0'"),
        (["--queries", "0"], "argument --queries: expected a whole number ≥ 1, got '0'"),
        (["--queries", "361"], "argument --queries: 361 is more than the 360 test digits; ask for 1 to 360"),
        (["--top-k", "1438"], "argument --top-k: 1438 is more than the 1437 training digits; ask for 1 to 1437"),
    ],
)
def test_bad_counts_are_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """In this process (argparse refuses before any work; the subprocess below proves the whole path)."""
    spec = importlib.util.spec_from_file_location("digits_demo_run", ROOT / "examples" / "digits" / "run.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["run.py", *args, "--out", str(out)])
    with pytest.raises(SystemExit) as exited:
        demo.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"run.py: error: {message}"
    assert not out.exists()  # nothing was trained


def test_a_library_error_is_one_line_on_stderr(tmp_path: Path) -> None:
    (tmp_path / "digits.sp").mkdir()
    (tmp_path / "digits.sp" / "notes.txt").write_text("not a store")  # refused by featurize, after training
    done = _demo("--out", tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'digits.sp'} already holds files that are not a source-proj store; choose a new or "
        "empty directory for the store."
    ]


@pytest.mark.parametrize("script", ["digits/lds.py", "text/lds.py"])
def test_the_lds_examples_refuse_one_repeat_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], script: str
) -> None:
    """Their report's split-half reliability needs two retrains a subset: with one, they used to train and retrain
    everything, then stop on a traceback (NaN ranks) instead of printing the table."""
    if script.startswith("text/"):
        pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(f"lds_{script.split('/')[0]}", ROOT / "examples" / script)
    assert spec is not None and spec.loader is not None
    lds = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, lds)  # its dataclasses look their module up
    spec.loader.exec_module(lds)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["lds.py", "--repeats", "1", "--out", str(out)])
    with pytest.raises(SystemExit) as exited:
        lds.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lds.py: error: argument --repeats: 1 leaves no second half for the ground truth's split-half reliability; "
        "ask for 2 or more"
    )
    assert not out.exists()  # nothing was trained


def _top_lists(text: str) -> list[tuple[str, list[tuple[int, str, float]]]]:
    """The demo's printed query-0 lists, ``(kind, [(row, label, score)])``, as they appear in ``text``."""
    block = text[text.index("query 0: a test '2' (predicted 2)") :].splitlines()[1:3]
    cell = re.compile(r"#(\d+):'(\d)' ([+-]\d\.\d\de[+-]\d\d)")
    return [(line.split()[0], [(int(r), y, float(s)) for r, y, s in cell.findall(line)]) for line in block]


@pytest.mark.slow
def test_the_demo_prints_the_output_the_readme_and_the_tutorial_show(tmp_path: Path) -> None:
    """The quick start's printed lists (README.md and docs/tutorials/digits.md) are the demo's: the same training
    rows in the same order, the scores to their printed precision give or take a BLAS's rounding."""
    done = _demo("--out", tmp_path, "--queries", "1")
    assert done.returncode == 0, done.stderr
    printed = _top_lists(done.stdout)
    assert [kind for kind, _ in printed] == ["helpful", "harmful"]
    for page in (ROOT / "README.md", ROOT / "docs" / "tutorials" / "digits.md"):
        shown = _top_lists(page.read_text())
        assert [[(r, y) for r, y, _ in cells] for _, cells in shown] == [
            [(r, y) for r, y, _ in cells] for _, cells in printed
        ], f"{page.relative_to(ROOT)} shows other training digits than the demo prints:\n{done.stdout}"
        for (_, want), (_, got) in zip(shown, printed, strict=True):
            assert [s for *_, s in want] == pytest.approx([s for *_, s in got], rel=0.02), page
