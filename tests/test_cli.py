"""The CLI runs featurize → fit → query → info and turns library errors into one-line messages."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner, Result

import source_proj as sp
from source_proj.cli.main import main
from source_proj.featurize import featurize as featurize_module

from .conftest import full_batch_run

SPEC = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
import source_proj as sp

def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g))

def build_model():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))

def build_task():
    return sp.ClassificationTask()

def train_data(stage):
    return _data(0)

def query_data():
    return _data(1)

def describe(stage, index):
    return f"label {int(_data(0).tensors[1][index])}"
"""


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path]:
    spec = tmp_path / "spec.py"
    spec.write_text(SPEC)
    module = sp.spec.load_spec(spec)
    torch.manual_seed(0)
    full_batch_run(
        tmp_path / "run",
        module.build_model(),
        module.train_data("main"),
        lambda o, t: F.cross_entropy(o, t, reduction="none"),
        lr=0.2,
        steps=12,
        save_every=3,
    )
    return tmp_path / "run", spec


def test_featurize_fit_query_info(tmp_path: Path, run: tuple[Path, Path]) -> None:
    run_dir, spec = run
    store = tmp_path / "s.sp"
    cli = CliRunner()
    out = cli.invoke(
        main,
        [
            "featurize",
            "--ckpts",
            str(run_dir),
            "--spec",
            str(spec),
            "--out",
            str(store),
            "--dim",
            "16",
            "--batch-size",
            "8",
            "--chunk-rows",
            "16",
        ],
    )
    assert out.exit_code == 0, out.output
    out = cli.invoke(main, ["fit", str(store), "--segments", "2"])
    assert out.exit_code == 0, out.output
    assert "segment main steps [0, 6)" in out.output and "segment main steps [6, 12)" in out.output
    for points in sp.Store.open(store).meta["methods"]["source"]["points"]:  # each checkpoint's weight is printed
        assert all(f"{int(key.split('-')[1])} ×{weight:.3f}" in out.output for key, weight in points)
    out = cli.invoke(main, ["fit", str(store), "--segments", "2", "--average", "checkpoints", "--method", "plain"])
    assert out.exit_code == 0, out.output
    plain = sp.Store.open(store).meta["methods"]["plain"]
    assert plain["average"] == "checkpoints" and all(len({w for _, w in p}) == 1 for p in plain["points"])
    out = cli.invoke(
        main, ["query", str(store), "--queries", "0:4", "--top-k", "3", "--out", str(tmp_path / "r.jsonl")]
    )
    assert out.exit_code == 0, out.output
    assert "query 0" in out.output and "label" in out.output
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2 * 3
    spec_module = sp.spec.load_spec(spec)
    scores = sp.Attributor(store, spec_module.build_model(), spec_module.build_task()).scores(
        torch.utils.data.Subset(spec_module.query_data(), range(4))
    )
    for row in rows:
        assert np.isclose(row["score"], scores[row["query"], row["index"]], rtol=1e-4, atol=1e-7)
        if row["kind"] == "helpful" and row["rank"] == 1:
            assert row["index"] == int(np.argmax(scores[row["query"]]))
    out = cli.invoke(main, ["query", str(store), "--queries", "1", "--top-k", "2", "--out", str(tmp_path / "r.csv")])
    assert out.exit_code == 0 and (tmp_path / "r.csv").read_text().startswith("query,kind,rank,stage,index,score")
    out = cli.invoke(main, ["info", str(store), "--json"])
    summary = json.loads(out.output)
    assert (
        summary["projection"]["dim"] == 16 and summary["featurized_chunks"] == "15/15"
    )  # 5 checkpoints × ⌈40/16⌉ chunks
    assert summary["methods"]["source"]["complete"] is True
    assert summary["projection"]["kind"] == "eigen"  # the default
    kept = summary["projection"]["basis"]["captured"]
    out = cli.invoke(main, ["info", str(store)])
    assert out.exit_code == 0 and f"keeps {kept:.0%} of their Fisher trace" in out.output, out.output


def test_errors_are_one_line_messages(tmp_path: Path, run: tuple[Path, Path]) -> None:
    run_dir, spec = run
    cli = CliRunner()
    out = cli.invoke(main, ["fit", str(tmp_path / "missing.sp")])
    assert out.exit_code == 1 and out.output.startswith("Error: No store at") and "Traceback" not in out.output
    out = cli.invoke(
        main, ["featurize", "--ckpts", str(tmp_path / "nope"), "--spec", str(spec), "--out", str(tmp_path / "s.sp")]
    )
    assert out.exit_code == 1 and "is not a directory" in out.output
    store = tmp_path / "s.sp"
    args = ["featurize", "--ckpts", str(run_dir), "--spec", str(spec), "--out", str(store), "--dim", "16"]
    assert cli.invoke(main, args).exit_code == 0
    out = cli.invoke(main, [*args[:-1], "8"])
    assert out.exit_code == 1 and "--force" in out.output
    assert "other settings (--dim 16 there, --dim 8 here)" in out.output, out.output
    assert cli.invoke(main, [*args[:-1], "8", "--force"]).exit_code == 0
    assert sp.Store.open(store).meta["projection"]["dim"] == 8
    out = cli.invoke(main, [*args, "--basis-layer-positions", "0"])
    assert out.exit_code == 2 and "--basis-layer-positions" in out.output and "'all'" in out.output
    # The spec's model is an MLP: the layers' budget cuts nothing, so 'all' gives the default's basis.
    uncut = [*args[:-3], str(tmp_path / "all.sp"), "--dim", "8", "--basis-layer-positions", "all"]
    assert cli.invoke(main, uncut).exit_code == 0
    basis = [sp.Store.open(p).meta["projection"]["basis"] for p in (store, tmp_path / "all.sp")]
    assert basis[0]["digest"] == basis[1]["digest"] and basis[0]["inputs"] == basis[1]["inputs"]


def test_featurize_says_when_it_took_the_fisher_of_a_share(tmp_path: Path, run: tuple[Path, Path]) -> None:
    run_dir, spec = run
    base = ["featurize", "--ckpts", str(run_dir), "--spec", str(spec), "--dim", "16", "--batch-size", "4",
            "--chunk-rows", "8"]  # fmt: skip
    out = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "share.sp"), "--fisher-examples", "8"])
    assert out.exit_code == 0, out.output
    assert "the Fisher of about 8 examples a stage (--fisher-examples all: of every example)" in out.output
    assert "featurized 5 checkpoints into" in out.output and "Fast-SOURCE" not in out.output, out.output
    assert sp.Store.open(tmp_path / "share.sp").meta["featurize"]["fisher_examples"] == 8
    out = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "every.sp")])  # "auto" on a small stage
    assert out.exit_code == 0, out.output
    assert "the Fisher of about" not in out.output
    assert "featurized 5 checkpoints into" in out.output and "Fast-SOURCE" not in out.output, out.output
    assert "fisher_examples" not in sp.Store.open(tmp_path / "every.sp").meta["featurize"]


def test_fast_only_featurize_says_what_it_featurized(tmp_path: Path, run: tuple[Path, Path]) -> None:
    run_dir, spec = run
    args = ["--out", str(tmp_path / "s.sp"), "--dim", "16", "--fast-only", "--segments", "2"]
    out = CliRunner().invoke(main, ["featurize", "--ckpts", str(run_dir), "--spec", str(spec), *args])
    assert out.exit_code == 0, out.output
    assert "featurized 2 segments' averaged parameters (Fast-SOURCE) into" in out.output, out.output
    assert "checkpoints into" not in out.output


def test_info_shows_the_settings_fit_and_featurize_fixed(tmp_path: Path, run: tuple[Path, Path]) -> None:
    """What decides a refit's refusal is on show: featurize's fixed segmentation and segment-mean features, SOURCE's
    damping factor, the baselines' arguments, and the command that completes an unfinished method."""
    run_dir, spec = run
    store = tmp_path / "s.sp"
    cli = CliRunner()
    args = ["featurize", "--ckpts", str(run_dir), "--spec", str(spec), "--out", str(store), "--dim", "16"]
    featurized = cli.invoke(main, [*args, "--segments", "2", "--fast"])
    assert featurized.exit_code == 0
    assert "segmentation fixed for this store: 2 segments a stage\n" in featurized.output, featurized.output
    fitted = cli.invoke(main, ["fit", str(store), "--segments", "2", "--damping-factor", "0.5"])
    assert fitted.exit_code == 0, fitted.output
    assert cli.invoke(main, ["baseline", str(store), "--kind", "if,trak", "--damping-factor", "2"]).exit_code == 0
    summary = json.loads(cli.invoke(main, ["info", str(store), "--json"]).output)
    # info lists the checkpoints each segment averages with their weights, as fit printed them: a segment averaged
    # over its steps weighs its closing checkpoint too, which its own checkpoints leave out
    averaged = re.findall(r"averages checkpoints (.*?)  η̄K", fitted.output)
    listed = re.findall(r"\) checkpoints (.*?) η̄K=", cli.invoke(main, ["info", str(store)]).output)
    assert len(averaged) == 2 and listed == averaged, (averaged, listed)
    for seg in summary["methods"]["source"]["segments"]:
        assert sum(weight for _, weight in seg["averages"]) == pytest.approx(1.0)
        steps = [step for step, _ in seg["averages"]]
        assert steps[:-1] == seg["checkpoints"] and steps[-1] > seg["checkpoints"][-1]
    assert summary["segmentation"] == {"per_stage": 2} and summary["segment_means"] is True
    assert summary["methods"]["source"]["settings"] == {"curvature": "projected", "damping_factor": 0.5,
                                                        "average": "steps"}
    assert summary["methods"]["if"]["settings"] == {"damping_factor": 2.0, "rcond": 1e-6}
    assert summary["methods"]["trak"]["settings"] == {"rcond": 1e-6}  # TRAK reads no damping
    text = cli.invoke(main, ["info", str(store)]).output
    assert "  segmentation fixed by featurize: 2 segments a stage\n" in text, text
    assert "  features at each segment's mean weights (Fast-SOURCE, --fast)\n" in text, text
    assert ("  curvature projected; damping λ = weight decay + 0.5 × mean eigenvalue; each segment averaged over "
            "its steps\n") in text, text
    assert "  damping factor 2.0, rcond 1e-06\n" in text, text
    # no damping at all is IF's pseudo-inverse, as BaselineArguments(damping_factor=0) allows
    undamped = cli.invoke(main, ["baseline", str(store), "--kind", "if", "--damping-factor", "0", "--force"])
    assert undamped.exit_code == 0, undamped.output
    summary = json.loads(cli.invoke(main, ["info", str(store), "--json"]).output)
    assert summary["methods"]["if"]["settings"] == {"damping_factor": 0.0, "rcond": 1e-6}
    opened = sp.Store.open(store, writable=True)
    methods = opened.meta["methods"]
    opened.update_meta(methods={**methods, "source": {**methods["source"], "complete": False}})
    text = cli.invoke(main, ["info", str(store)]).output
    assert f"source, UNFINISHED (complete it: source-proj fit {store} --method source --segments 2" in text, text


def test_a_store_of_another_run_and_model_is_named_as_another_runs(tmp_path: Path, run: tuple[Path, Path]) -> None:
    """Another run of another model into an existing store was refused with every field of every setting that
    differed (layers, fingerprints, checkpoints: a paragraph of JSON); it is named as another run's store, with the
    settings that differ."""
    run_dir, spec = run
    store = tmp_path / "s.sp"
    cli = CliRunner()
    args = ["featurize", "--ckpts", str(run_dir), "--spec", str(spec), "--out", str(store), "--dim", "8"]
    assert cli.invoke(main, args).exit_code == 0
    other_spec = tmp_path / "other.py"
    other_spec.write_text(SPEC.replace("Linear(8, 3)", "Linear(8, 4)"))
    module = sp.spec.load_spec(other_spec)
    full_batch_run(tmp_path / "other", module.build_model(), module.train_data("main"),
                   lambda o, t: F.cross_entropy(o, t, reduction="none"), lr=0.2, steps=4, save_every=2)  # fmt: skip
    out = cli.invoke(main, [*args[:2], str(tmp_path / "other"), "--spec", str(other_spec), *args[5:]])
    assert out.exit_code == 1 and out.output.splitlines()[-1] == (
        f"Error: The store at {store} was featurized from another run ({run_dir.resolve()}) with other settings "
        "(params, projection); pass --force (overwrite=True) to replace it, or use another store path."
    ), out.output


def test_featurize_refuses_other_basis_options_before_the_basis_pass_naming_them_as_typed(
    tmp_path: Path, run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store featurized again with other --basis-* options ran the whole eigen basis pass (minutes on a large model)
    before it was refused as "projection: basis.inputs …" (a digest); it is refused first, each option that differs
    (the Fisher's and the chunks' too) named as typed, the store's value first ('all' where it is every one)."""
    run_dir, spec = run
    store = tmp_path / "s.sp"
    args = ["featurize", "--ckpts", str(run_dir), "--spec", str(spec), "--out", str(store), "--dim", "16"]
    cli = CliRunner()
    assert cli.invoke(main, args).exit_code == 0
    before = sp.Store.open(store).meta

    def refuse(*args, **kwargs):
        raise AssertionError("the basis was estimated before the refusal")

    monkeypatch.setattr(featurize_module, "estimate_basis", refuse)
    examples = "--basis-examples 2048 there, --basis-examples 16 here"
    for more, said in [
        (["--basis-examples", "16"], f"with other settings ({examples}); pass --force (overwrite=True)"),
        (["--basis-positions", "all", "--basis-checkpoints", "2"], "(--basis-positions 64 there, --basis-positions "
         "all here; --basis-checkpoints all there, --basis-checkpoints 2 here)"),
        (["--basis-examples", "16", "--fisher", "empirical", "--chunk-rows", "16"], f"({examples}; --chunk-rows 1024 "
         "there, --chunk-rows 16 here; --fisher sampled there, --fisher empirical here)"),
        (["--basis-examples", "16", "--grow"], f"cannot grow with other settings than it was featurized with "
         f"({examples}); repeat the options"),
    ]:  # fmt: skip
        out = cli.invoke(main, [*args, *more])
        assert out.exit_code == 1 and said in out.output and "Traceback" not in out.output, out.output
    assert sp.Store.open(store).meta == before


def test_info_shows_the_eigen_basis_arguments_the_store_was_featurized_with(
    tmp_path: Path, run: tuple[Path, Path]
) -> None:
    """featurize refuses a store of other --basis-* options, so info shows those the store was featurized with, as
    typed ('all' where every one), under the projection; --json gives them as recorded (None for all)."""
    run_dir, spec = run
    store = tmp_path / "s.sp"
    args = ["featurize", "--ckpts", str(run_dir), "--spec", str(spec), "--out", str(store), "--dim", "16"]
    args += ["--basis-examples", "24", "--basis-positions", "all", "--basis-checkpoints", "2"]
    cli = CliRunner()
    assert cli.invoke(main, args).exit_code == 0
    summary = json.loads(cli.invoke(main, ["info", str(store), "--json"]).output)
    assert summary["basis_arguments"] == {"basis_examples": 24, "basis_positions": None,
                                          "basis_layer_positions": 2048, "basis_checkpoints": 2}  # fmt: skip
    lines = cli.invoke(main, ["info", str(store)]).output.splitlines()
    shown = lines.index("  basis asked for with --basis-examples 24 --basis-positions all --basis-layer-positions "
                        "2048 --basis-checkpoints 2")  # fmt: skip
    assert lines[shown - 1].startswith("  basis of 2 layers from checkpoints"), lines


def test_featurize_of_a_finished_store_says_it_computed_nothing(tmp_path: Path, run: tuple[Path, Path]) -> None:
    run_dir, spec = run
    store = tmp_path / "s.sp"
    cli = CliRunner()
    args = ["featurize", "--ckpts", str(run_dir), "--spec", str(spec), "--out", str(store), "--dim", "16"]
    assert "featurized 5 checkpoints into" in cli.invoke(main, args).output
    again = cli.invoke(main, [*args, "--batch-size", "4"])
    assert again.exit_code == 0 and "already holds these features; nothing to compute" in again.output, again.output
    assert "featurized 5 checkpoints" not in again.output
    assert "featurize:" not in again.output, again.output  # no progress bar of no chunks
    changed = cli.invoke(main, [*args, "--segments", "2"])  # records a segmentation: not "nothing"
    assert changed.exit_code == 0 and "nothing to compute" not in changed.output, changed.output


def test_info_names_one_segment_a_stage_in_the_singular() -> None:
    """The default Adam segmentation (one a stage) read "1 segments a stage" in `source-proj info`."""
    from source_proj.cli.main import _segmentation_text

    assert _segmentation_text({"per_stage": 1}) == "1 segment a stage"
    assert _segmentation_text({"per_stage": 3}) == "3 segments a stage"


def test_under_torchrun_only_rank_0_prints_the_summary_and_every_rank_its_errors(
    tiny_reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank ran the command and printed the same 'featurized …' and 'fitted …' lines, once per process."""
    cli = CliRunner()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    leader = cli.invoke(main, ["info", str(tiny_reference)])
    assert leader.exit_code == 0 and leader.stdout.startswith("store ")
    monkeypatch.setenv("RANK", "1")
    follower = cli.invoke(main, ["info", str(tiny_reference)])
    assert follower.exit_code == 0 and follower.stdout == ""
    failed = cli.invoke(main, ["info", str(tiny_reference) + "-missing"])
    assert failed.exit_code == 1 and failed.stderr.startswith("Error: No store at ")


REGRESSION_SPEC = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
import source_proj as sp

def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=g)
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5]))

def build_model():
    return nn.Linear(3, 1)

def build_task():
    return sp.RegressionTask()

def train_data(stage):
    return _data(0)

def query_data():
    return _data(1)
"""


@pytest.fixture
def regression_store(tmp_path: Path) -> Path:
    """A fitted store of a linear regression (16 training examples) trained by full-batch gradient descent."""
    spec = tmp_path / "spec.py"
    spec.write_text(REGRESSION_SPEC)
    module = sp.spec.load_spec(spec)
    torch.manual_seed(0)
    full_batch_run(tmp_path / "run", module.build_model(), module.train_data("main"),
                   lambda o, t: (o.squeeze(-1) - t) ** 2, lr=0.05, steps=6, save_every=3)  # fmt: skip
    store, cli = tmp_path / "s.sp", CliRunner()
    for command in (["featurize", "--ckpts", str(tmp_path / "run"), "--spec", str(spec), "--out", str(store),
                     "--projection", "identity", "--batch-size", "8"], ["fit", str(store)]):  # fmt: skip
        out = cli.invoke(main, command)
        assert out.exit_code == 0, out.output
    return store


def test_query_of_a_regression_task_says_a_positive_score_raised_the_error(regression_store: Path) -> None:
    """A regression's measurement is its error: a positive score means the example raised it (harmed the query),
    so the CLI must not head those examples "helpful"."""
    out = CliRunner().invoke(main, ["query", str(regression_store), "--queries", "0:2", "--top-k", "2"])
    assert out.exit_code == 0, out.output
    header = next(line for line in out.output.splitlines() if line.strip().startswith("rank"))
    assert "raised the query's error" in header and "lowered the query's error" in header, header
    assert "helpful" not in out.output
    out = CliRunner().invoke(main, ["query", str(regression_store), "--queries", "0:2", "--top-k", "16"])
    assert out.exit_code == 0, out.output  # 16 of 16 examples: no list is full; its words read as a sentence
    said = "queries have fewer than 16 training examples with a score < 0 (lowered the query's error) and 2 fewer "
    assert said + "than 16 with a score > 0 (raised the query's error)" in out.output, out.output


def test_query_results_file_names_a_row_helpful_when_it_lowered_the_error(
    tmp_path: Path, regression_store: Path
) -> None:
    """The results file's ``kind`` said "helpful" for every positive score, also where (a regression's error, a
    language model's loss) a positive score means the example raised the measurement: harmed the query. Oracle:
    the full score matrix, whose sign says what removing each example does to the query's error."""
    out = CliRunner().invoke(main, ["query", str(regression_store), "--queries", "0:3", "--top-k", "3",
                                    "--out", str(tmp_path / "r.jsonl")])  # fmt: skip
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    module = sp.spec.load_spec(tmp_path / "spec.py")
    scores = sp.Attributor(regression_store, module.build_model(), module.build_task()).scores(
        torch.utils.data.Subset(module.query_data(), range(3))
    )
    assert {row["kind"] for row in rows} == {"helpful", "harmful"}
    for row in rows:  # score = −Δ|error|: removing a helpful example raises the query's error (a negative score)
        assert row["kind"] == ("harmful" if scores[row["query"], row["index"]] > 0 else "helpful"), row
        if row["rank"] == 1:  # the most harmful raises the error most: the largest score
            best = np.argmax if row["kind"] == "harmful" else np.argmin
            assert row["index"] == int(best(scores[row["query"]])), row


def test_fit_says_when_it_has_no_trajectory_view_to_plot(tmp_path: Path, regression_store: Path) -> None:
    """fit --plot drew the trajectory view of automatic segments and, for segments placed otherwise, wrote nothing
    and said nothing; a path no figure can be written to is refused before the fit."""
    cli = CliRunner()
    out = cli.invoke(main, ["fit", str(regression_store), "--method", "other", "--plot", str(tmp_path)])
    assert out.exit_code == 1 and "is a folder" in out.output, out.output
    assert "other" not in (sp.Store.open(regression_store).meta.get("methods") or {})
    plot = tmp_path / "fit.png"
    out = cli.invoke(main, ["fit", str(regression_store), "--method", "other", "--plot", str(plot)])
    assert out.exit_code == 0 and f"no plot written to {plot}" in out.output, out.output
    assert not plot.exists()


def _first_helpful(output: str, query: int) -> int:
    """The training index printed first under ``query`` (the table's left column, or the first line of texts)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"query {query}"))
    first = next(line for line in lines[start + 1 :] if "main[" in line)
    return int(first.split("main[", 1)[1].split("]", 1)[0])


def _check_helpful_first(path: Path, spec: Path, best: Callable[[np.ndarray], int], words: str) -> None:
    """``source-proj query`` of the store at ``path`` leads, in both layouts (a table, and one line per example where
    descriptions are long texts), with the list headed ``words`` whose first example per query is ``best`` of the
    query's row of the full score matrix (the oracle)."""
    cli = CliRunner()
    module = sp.spec.load_spec(spec)
    scores = sp.Attributor(path, module.build_model(), module.build_task()).scores(
        torch.utils.data.Subset(module.query_data(), range(3))
    )
    long = spec.with_name(f"long_{spec.name}")  # descriptions longer than a table cell: one line per example
    long.write_text(spec.read_text() + "\ndef describe(stage, index):\n    return 'example ' * 9\n")
    for spec_path, texts in ((spec, False), (long, True)):
        out = cli.invoke(main, ["query", str(path), "--spec", str(spec_path), "--queries", "0:3", "--top-k", "3"])
        assert out.exit_code == 0 and ("  rank  " in out.output) != texts, out.output
        for q in range(3):
            assert _first_helpful(out.output, q) == int(best(scores[q])), out.output
        lines = out.output.splitlines()
        heading = lines.index(next(line for line in lines if line.startswith("query 0")))
        first = lines[heading + 1].strip()  # the table's heading, or the first example's line
        assert first.removeprefix("rank").strip().startswith(words), out.output


def test_query_prints_the_examples_that_lowered_a_loss_first(regression_store: Path) -> None:
    """The printed lists came by sign, the largest scores first, under the task's words: for a regression's error
    (or a language model's loss) the list a reader met first was the examples that harmed the query. It leads with
    the helpful ones now: the most negative scores."""
    spec = regression_store.with_name("spec.py")
    _check_helpful_first(regression_store, spec, np.argmin, "lowered the query's error")


def test_query_prints_the_examples_that_raised_a_margin_first(tmp_path: Path, run: tuple[Path, Path]) -> None:
    """For a classification margin the helpful examples are the most positive scores, still printed first."""
    run_dir, spec = run
    store = tmp_path / "c.sp"
    for command in (["featurize", "--ckpts", str(run_dir), "--spec", str(spec), "--out", str(store), "--projection",
                     "identity", "--batch-size", "8"], ["fit", str(store)]):  # fmt: skip
        assert CliRunner().invoke(main, command).exit_code == 0
    _check_helpful_first(store, spec, np.argmax, "helpful")


def test_featurize_stopped_by_a_nan_example_reruns_without_force_once_the_data_are_fixed(
    tmp_path: Path, run: tuple[Path, Path]
) -> None:
    """The rerun on fixed data was refused as "not the data the store was featurized with" until --force: it now
    starts the store afresh with a one-line warning, and the store equals a fresh featurize of the fixed data."""
    run_dir, spec = run
    bad = tmp_path / "bad.py"  # the spec's training data with a NaN in example 37 (the last chunk)
    bad.write_text(SPEC.replace("def train_data(stage):\n    return _data(0)",
                                "def train_data(stage):\n    x, y = _data(0).tensors\n    x = x.clone()\n"
                                "    x[37, 2] = float('nan')\n    return TensorDataset(x, y)"))  # fmt: skip
    cli = CliRunner()

    def featurize(spec_path: Path, store: Path) -> Result:
        return cli.invoke(main, ["featurize", "--ckpts", str(run_dir), "--spec", str(spec_path), "--out", str(store),
                                 "--projection", "identity", "--batch-size", "20", "--chunk-rows", "20"])  # fmt: skip

    store, fresh = tmp_path / "s.sp", tmp_path / "fresh.sp"
    out = featurize(bad, store)
    assert out.exit_code == 1 and out.output.strip().splitlines()[-1] == (
        "Error: The training-loss gradient of training example 37 at checkpoint checkpoints/step-00000000.pt, stage "
        "'main' is NaN or infinite; fix that example's input or label (or the checkpoint's weights) and run featurize "
        "again, which does afresh what in this store read training data that changed since."
    ), out.output
    with pytest.warns(UserWarning, match="its training data have changed since, so nothing in it matches them: "
                      "featurizing it afresh"):  # fmt: skip
        out = featurize(spec, store)
    assert out.exit_code == 0, out.output
    assert featurize(spec, fresh).exit_code == 0
    ours, theirs = sp.Store.open(store), sp.Store.open(fresh)
    assert ours.progress_arrays() == theirs.progress_arrays()
    for name in theirs.progress_arrays():
        np.testing.assert_array_equal(ours.read(name), theirs.read(name))
