"""`source-proj baseline`, `compare` and `lds`: the same numbers as the library, retrains cached."""

from __future__ import annotations

import base64
import json
import re
import shutil
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import source_proj as sp
from source_proj import evaluation as ev
from source_proj.cli.main import main
from source_proj.query.attributor import StageRows
from source_proj.spec import load_spec

SPEC = """
import numpy as np
import torch
import torch.nn.functional as F
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

def train(seed, keep=None, run_dir=None):
    torch.manual_seed(seed)
    model = build_model()
    x, y = _data(0).tensors
    if keep is not None:
        x, y = x[keep], y[keep]
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    recorder = None
    if run_dir is not None:
        recorder = sp.TrajectoryRecorder(run_dir, model, opt, save_every=3)
        recorder.begin_stage("main", dataset_size=len(y))
    for _ in range(12):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if recorder is not None:
            recorder.step()
    if recorder is not None:
        recorder.close()
    return model

def retrain(keep, seed):
    model = train(seed, keep=torch.as_tensor(keep["main"]))
    x, y = query_data().tensors
    with torch.no_grad():
        return build_task().measurement(model(x), (x, y)).numpy()
"""


@pytest.fixture(scope="module")
def _fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The spec, run and store of :func:`fitted`, computed once for the module; do not modify them."""
    root = tmp_path_factory.mktemp("cli-evaluation")
    spec_path = root / "spec.py"
    spec_path.write_text(SPEC)
    load_spec(spec_path).module.train(0, run_dir=root / "run")
    runner = CliRunner()
    store = root / "s.sp"
    out = runner.invoke(
        main,
        ["featurize", "--ckpts", str(root / "run"), "--spec", str(spec_path), "--out", str(store), "--dim", "16"],
    )
    assert out.exit_code == 0, out.output
    assert runner.invoke(main, ["fit", str(store)]).exit_code == 0
    out = runner.invoke(main, ["baseline", str(store), "--kind", "grad-dot,trak,repsim"])
    assert out.exit_code == 0, out.output
    return spec_path, store


@pytest.fixture
def fitted(_fitted: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """(spec, store): the spec's run featurized (k = 16), fitted and with the grad-dot, TRAK and RepSim baselines,
    through the CLI. The store is a copy in ``tmp_path`` (change it freely); the spec and the run it names are
    the module's."""
    spec_path, store = _fitted
    shutil.copytree(store, tmp_path / "s.sp")
    return spec_path, tmp_path / "s.sp"


def test_compare_prints_the_library_lds_of_every_method_and_caches_the_retrains(fitted, tmp_path: Path) -> None:
    spec_path, store = fitted
    cache = tmp_path / "cache"
    args = ["compare", str(store), "--subsets", "8", "--repeats", "2", "--queries", "0:10", "--cache", str(cache)]
    out = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "per_query.csv")])
    assert out.exit_code == 0, out.output
    assert len(list((cache / "retrains").glob("*.npy"))) == 16

    spec = load_spec(spec_path)
    queries = torch.utils.data.Subset(spec.query_data(), range(10))
    truth = ev.lds_ground_truth(
        spec.retrainer(),
        sp.Attributor(store, spec.build_model(), spec.build_task()).rows,
        cache,
        ev.LDSArguments(num_subsets=8, repeats=2),
        progress=False,
    ).select(range(10))
    for method in ("source", "grad-dot", "trak", "repsim"):
        scores = sp.Attributor(store, spec.build_model(), spec.build_task(), method=method).scores(queries)
        line = next(line for line in out.output.splitlines() if line.startswith(method + " "))
        assert str(ev.lds(scores, truth)) in line, (method, line)
    assert len((tmp_path / "per_query.csv").read_text().splitlines()) == 1 + 4 * 10


def test_lds_against_alpha_reuses_finished_retrains_and_draws_the_plot(fitted, tmp_path: Path) -> None:
    _, store = fitted
    cache = tmp_path / "cache"
    base = ["lds", str(store), "--subsets", "6", "--repeats", "1", "--cache", str(cache)]
    assert CliRunner().invoke(main, [*base, "--alpha", "0.5"]).exit_code == 0
    first = {p.name: p.stat().st_mtime_ns for p in (cache / "retrains").glob("*.npy")}
    out = CliRunner().invoke(main, [*base, "--alpha", "0.3,0.5", "--plot", str(tmp_path / "lds.png")])
    assert out.exit_code == 0, out.output
    after = {p.name: p.stat().st_mtime_ns for p in (cache / "retrains").glob("*.npy")}
    assert len(after) == 12 and all(after[name] == t for name, t in first.items())  # α=0.5 was not retrained
    assert (tmp_path / "lds.png").stat().st_size > 1000
    values = re.findall(r"-?\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\]", out.output)
    assert len(values) == 2 and all(np.isfinite(float(v.split()[0])) for v in values)


def test_lds_without_a_retrain_function_says_what_to_add(fitted, tmp_path: Path) -> None:
    spec_path, store = fitted
    bare = tmp_path / "bare.py"
    bare.write_text(spec_path.read_text().split("def retrain")[0])
    out = CliRunner().invoke(main, ["lds", str(store), "--spec", str(bare), "--subsets", "4"])
    assert out.exit_code == 1
    assert "defines no retrain(keep, seed)" in out.output and "Traceback" not in out.output


BATCHED = """
from source_proj import evaluation as ev

def _seeded(seed):
    torch.manual_seed(seed)
    return build_model()

# full-batch gradient descent as train() does: one batch of all 40 examples per epoch
retrain = ev.BatchedRetrain(
    ev.BatchedSGD(_seeded, build_task(), [ev.SGDStage("main", *_data(0).tensors, epochs=12, lr=0.2, batch_size=40)]),
    *query_data().tensors,
    models_per_call=5,
)
"""


def test_lds_with_a_batched_retrain_in_the_spec_retrains_the_same_models(fitted, tmp_path: Path) -> None:
    spec_path, store = fitted
    batched = tmp_path / "batched.py"
    batched.write_text(spec_path.read_text().split("def retrain")[0] + BATCHED)
    base = ["lds", str(store), "--subsets", "6", "--repeats", "2"]
    out = CliRunner().invoke(main, [*base, "--spec", str(batched), "--cache", str(tmp_path / "b")])
    assert out.exit_code == 0, out.output
    assert CliRunner().invoke(main, [*base, "--cache", str(tmp_path / "p")]).exit_code == 0
    files = sorted((tmp_path / "p" / "retrains").glob("*.npy"))
    assert len(files) == 12
    for plain in files:  # same job keys: the same (kept subset, seed) in both caches
        np.testing.assert_allclose(np.load(tmp_path / "b" / "retrains" / plain.name), np.load(plain), atol=1e-4)


def test_compare_refuses_methods_that_attribute_different_training_rows(
    fitted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ground truth's subsets are drawn over one method's rows: a method fitted on another stage of the same
    size was scored against subsets of the wrong stage without a word."""
    _, store = fitted
    real_open = sp.Ensemble.open

    def other_stage_for_grad_dot(*args, method: str, **kwargs):  # type: ignore[no-untyped-def]
        scorer = real_open(*args, method=method, **kwargs)
        if method == "grad-dot":
            scorer.rows = [StageRows("other", r.offset, r.size) for r in scorer.rows]
        return scorer

    monkeypatch.setattr(sp.Ensemble, "open", other_stage_for_grad_dot)
    args = ["compare", str(store), "--subsets", "4", "--repeats", "1", "--queries", "0:5", "--cache", str(tmp_path)]
    out = CliRunner().invoke(main, [*args, "--methods", "grad-dot,source"])
    assert out.exit_code == 1, out.output
    assert "attribute different training rows" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "retrains").exists() or not list((tmp_path / "retrains").glob("*.npy"))


def test_lds_refuses_a_query_named_twice_which_the_mean_would_count_twice(fitted, tmp_path: Path) -> None:
    _, store = fitted
    args = ["lds", str(store), "--subsets", "4", "--repeats", "1", "--cache", str(tmp_path), "--queries", "0:3,2"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 2, out.output
    assert "query 2 more than once" in out.output and "Traceback" not in out.output


def test_lds_warns_when_its_retrain_cache_was_filled_by_another_spec(fitted, tmp_path: Path) -> None:
    """Cached retrains are keyed by (kept subset, seed) only: another retrain() reusing the default cache got the
    first one's measurements without a word."""
    spec_path, store = fitted
    base = ["lds", str(store), "--subsets", "4", "--repeats", "1", "--cache", str(tmp_path / "cache")]
    with warnings.catch_warnings(record=True) as caught:  # the same spec, named or the store's, reuses it quietly
        assert CliRunner().invoke(main, base).exit_code == 0
        assert CliRunner().invoke(main, [*base, "--spec", str(spec_path)]).exit_code == 0
    assert not [w for w in caught if "holds the retrains" in str(w.message)]
    loss = tmp_path / "loss.py"
    loss.write_text(spec_path.read_text().replace("build_task().measurement(", "build_task().loss("))
    with pytest.warns(UserWarning, match=r"holds the retrains of the spec file .* pass a fresh --cache"):
        other = CliRunner().invoke(main, [*base, "--spec", str(loss)])
    assert other.exit_code == 0, other.output


def test_a_query_without_a_correlation_is_written_as_null_not_as_json_nan(fitted, tmp_path: Path) -> None:
    """Query 0's retrained measurement never moves: its Spearman is undefined, and 'NaN' is not JSON."""
    spec_path, store = fitted
    still = tmp_path / "still.py"
    still.write_text(spec_path.read_text() + "\n_moving = retrain\n\ndef retrain(keep, seed):\n"
                     "    out = _moving(keep, seed)\n    out[0] = 1.0\n    return out\n")  # fmt: skip
    out_path = tmp_path / "per_query.jsonl"
    args = ["lds", str(store), "--spec", str(still), "--subsets", "5", "--repeats", "1", "--queries", "0:4"]
    with pytest.warns(UserWarning, match="1 of 4 queries"):
        out = CliRunner().invoke(main, [*args, "--cache", str(tmp_path / "c"), "--out", str(out_path)])
    assert out.exit_code == 0, out.output

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    rows = [json.loads(line, parse_constant=strict) for line in out_path.read_text().splitlines()]
    assert rows[0]["spearman"] is None and all(isinstance(r["spearman"], float) for r in rows[1:])


def test_fewer_than_three_subsets_are_refused_before_any_scoring(fitted, tmp_path: Path) -> None:
    """--subsets accepted 2, which the LDS refuses (a rank correlation needs 3): after every method was scored."""
    _, store = fitted
    out = CliRunner().invoke(main, ["lds", str(store), "--subsets", "2", "--cache", str(tmp_path / "cache")])
    assert out.exit_code == 2 and "--subsets" in out.output and "Traceback" not in out.output, out.output
    assert not (tmp_path / "cache").exists()


def test_lds_warns_when_its_retrain_cache_holds_retrains_no_spec_is_recorded_for(fitted, tmp_path: Path) -> None:
    """A cache filled from Python (or before caches recorded their spec) was claimed by the first spec that came,
    its retrains reused without a word whatever retrain() had made them."""
    _, store = fitted
    cache = tmp_path / "cache"
    rows = [StageRows("main", 0, 40)]
    args = ev.LDSArguments(num_subsets=4, repeats=1)
    ev.lds_ground_truth(lambda keep, seed: np.random.default_rng(seed).normal(size=40), rows, cache, args,
                        progress=False)  # fmt: skip
    base = ["lds", str(store), "--subsets", "4", "--repeats", "1", "--cache", str(cache)]
    with pytest.warns(UserWarning, match="no spec file is recorded for"):
        out = CliRunner().invoke(main, base)
    assert out.exit_code == 0, out.output
    with warnings.catch_warnings(record=True) as caught:  # said once: the cache now records the spec
        assert CliRunner().invoke(main, base).exit_code == 0
    assert not [w for w in caught if "spec file" in str(w.message)]


def test_an_alpha_the_lds_refuses_is_refused_before_the_retrains_of_the_others(fitted, tmp_path: Path) -> None:
    """--alpha 0.5,1.5 retrained every model of α = 0.5 before refusing 1.5; 0.01 keeps no row of 40."""
    _, store = fitted
    cache = tmp_path / "cache"
    for alphas, match in (("0.5,1.5", "alpha is 1.5; pass a number in (0, 1)."), ("0.5,0.01", "keeps 0 of 40 rows")):
        out = CliRunner().invoke(main, ["lds", str(store), "--subsets", "3", "--alpha", alphas, "--cache", str(cache)])
        assert out.exit_code != 0 and match in out.output and "Traceback" not in out.output, out.output
        assert not list(cache.glob("retrains/*.npy"))


def test_compare_of_an_ensemble_at_several_alphas_is_the_library_lds_of_the_ensembles_scores(
    fitted, tmp_path: Path
) -> None:
    spec_path, store = fitted
    load_spec(spec_path).module.train(1, run_dir=tmp_path / "run1")
    second = tmp_path / "s1.sp"
    runner = CliRunner()
    featurize = ["featurize", "--ckpts", str(tmp_path / "run1"), "--spec", str(spec_path), "--out", str(second)]
    assert runner.invoke(main, [*featurize, "--dim", "16"]).exit_code == 0
    assert runner.invoke(main, ["fit", str(second)]).exit_code == 0
    cache = tmp_path / "cache"
    args = ["--subsets", "5", "--repeats", "1", "--alpha", "0.3,0.6", "--queries", "0:6", "--cache", str(cache)]
    out = runner.invoke(main, ["compare", str(store), str(second), "--methods", "source", *args])
    assert out.exit_code == 0, out.output
    assert "ensemble of 2 models" in out.output

    spec = load_spec(spec_path)
    queries = torch.utils.data.Subset(spec.query_data(), range(6))
    ensemble = sp.Ensemble.open([store, second], spec.build_model(), spec.build_task(), method="source")
    line = next(line for line in out.output.splitlines() if line.startswith("source "))
    for alpha in (0.3, 0.6):
        truth = ev.lds_ground_truth(
            spec.retrainer(), ensemble.rows, cache, ev.LDSArguments(alpha=alpha, num_subsets=5, repeats=1),
            progress=False,
        ).select(range(6))
        assert str(ev.lds(ensemble.scores(queries), truth)) in line, (alpha, line)


def test_compare_prints_the_noise_ceiling_and_each_methods_paired_difference_from_the_best(
    fitted, tmp_path: Path
) -> None:
    """A reviewer asks whether the best method beats the others on these subsets and queries, and how high any LDS
    could go on this ground truth: compare printed only each method's own interval. The lines are the library's
    split_half_reliability and lds_difference, with the interval resampling what --resample says."""
    spec_path, store = fitted
    cache = tmp_path / "cache"
    args = ["compare", str(store), "--subsets", "8", "--repeats", "3", "--queries", "0:10", "--cache", str(cache),
            "--methods", "source,grad-dot,trak", "--resample", "both"]  # fmt: skip
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "intervals resample subsets and queries" in out.output

    spec = load_spec(spec_path)
    queries = torch.utils.data.Subset(spec.query_data(), range(10))
    rows = sp.Attributor(store, spec.build_model(), spec.build_task()).rows
    truth = ev.lds_ground_truth(
        spec.retrainer(), rows, cache, ev.LDSArguments(num_subsets=8, repeats=3), progress=False
    ).select(range(10))
    r, ceiling = ev.split_half_reliability(truth)
    assert f"α=0.5: ground truth split-half reliability r = {r:.3f}" in out.output
    assert f"above about {ceiling:.3f} (the noise ceiling √ρ)" in out.output
    both = ev.LDSArguments(resample="both")
    scores = {m: sp.Attributor(store, spec.build_model(), spec.build_task(), method=m).scores(queries)
              for m in ("source", "grad-dot", "trak")}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a query constant on 8 subsets is counted in the output too
        results = {m: ev.lds(s, truth, both) for m, s in scores.items()}
        best = max(results, key=lambda m: results[m].mean)
        for method in scores:
            line = next(line for line in out.output.splitlines() if line.startswith(method + " "))
            assert str(results[method]) in line, (method, line)
            if method != best:
                difference = ev.lds_difference(scores[best], scores[method], truth, both)
                line = next(line for line in out.output.splitlines() if line.startswith(f"  {best} − {method} "))
                assert line.endswith(f"{difference}{' *' if difference.significant else ''}"), line
    assert f"paired difference from the best, {best!r}" in out.output

    one = CliRunner().invoke(main, [*args[:5], "1", *args[6:]])  # --repeats 1: the same subsets, no ceiling
    assert one.exit_code == 0, one.output
    assert "α=0.5: no noise ceiling with one retrain per subset (retrain each subset twice or more" in one.output


def test_compare_scores_another_librarys_matrix_on_the_same_ground_truth_and_refuses_one_it_cannot_read(
    fitted, tmp_path: Path
) -> None:
    """A peer library's scores (a .npy matrix) were comparable only from Python; --scores puts them in the same
    table, scored by the library's lds on the same retrains, whether the file has a row per query_data() example or
    per --queries one. A file it cannot use is refused in one sentence before any retrain."""
    spec_path, store = fitted
    spec = load_spec(spec_path)
    everything = sp.Attributor(store, spec.build_model(), spec.build_task(), method="trak").scores(spec.query_data())
    np.save(tmp_path / "all.npy", everything)  # [40, 40]: a row per query_data() example
    np.save(tmp_path / "chosen.npy", everything[3:9])
    cache = tmp_path / "cache"
    common = ["compare", str(store), "--methods", "source", "--subsets", "6", "--repeats", "2", "--queries", "3:9",
              "--cache", str(cache)]  # fmt: skip
    out = CliRunner().invoke(main, [*common, "--scores", f"peer={tmp_path / 'all.npy'}",
                                    "--scores", f"peer-chosen={tmp_path / 'chosen.npy'}"])  # fmt: skip
    assert out.exit_code == 0, out.output
    rows = sp.Attributor(store, spec.build_model(), spec.build_task()).rows
    truth = ev.lds_ground_truth(spec.retrainer(), rows, cache, ev.LDSArguments(num_subsets=6, repeats=2),
                                progress=False).select(range(3, 9))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = str(ev.lds(everything[3:9], truth))
    for name in ("peer ", "peer-chosen "):
        line = next(line for line in out.output.splitlines() if line.startswith(name))
        assert expected in line, (name, line)
    assert "paired difference from the best" in out.output

    np.save(tmp_path / "turned.npy", everything[3:9].T.copy())  # [N, Q] of the 6 --queries: needs transposing
    np.save(tmp_path / "narrow.npy", everything[:, :30])
    np.save(tmp_path / "words.npy", np.full((40, 40), "x"))
    np.save(tmp_path / "gaps.npy", np.where(everything > 0, np.nan, everything))
    np.savez(tmp_path / "pair.npz", a=everything)
    (tmp_path / "text.npy").write_text("not numpy")
    fresh = tmp_path / "fresh-cache"
    for value, match in (
        (f"peer={tmp_path / 'turned.npy'}", "holds a matrix of shape (40, 6); that is [training rows, queries]: "
                                            "save its transpose."),
        (f"peer={tmp_path / 'narrow.npy'}", "give [40 query_data() examples (or the 6 of --queries), 40 training "
                                            "rows]."),
        (f"peer={tmp_path / 'words.npy'}", "not a [queries, training rows] matrix of finite real numbers"),
        (f"peer={tmp_path / 'gaps.npy'}", "not a [queries, training rows] matrix of finite real numbers"),
        (f"peer={tmp_path / 'pair.npz'}", "is an .npz archive; save the one matrix with numpy.save"),
        (f"peer={tmp_path / 'text.npy'}", "is not a numpy .npy file"),
        (f"peer={tmp_path / 'missing.npy'}", "is not a numpy .npy file"),
        (f"source={tmp_path / 'all.npy'}", "--scores names 'source', a fitted method compared"),
        (str(tmp_path / "all.npy"), "expected NAME=FILE.npy"),
    ):
        args = [*common[:-1], str(fresh), "--scores", value]
        out = CliRunner().invoke(main, args)
        assert out.exit_code != 0 and match in " ".join(out.output.split()), (value, out.output)
        assert "Traceback" not in out.output and not list(fresh.glob("retrains/*.npy")), out.output


def test_compare_with_a_ground_truth_of_ones_own_scores_against_it_without_retraining(fitted, tmp_path: Path) -> None:
    """A researcher's own retrains (subsets they chose, an .npz) could be used only from Python: --truth scores every
    method against them, as the library's lds does, and retrains nothing; a file that does not fit the store's rows
    or queries, or an option that describes retrains beside it, is one sentence."""
    spec_path, store = fitted
    spec = load_spec(spec_path)
    rng = np.random.default_rng(20)
    masks = rng.random((7, 40)) < 0.6  # subsets of several sizes, as one's own may be
    retrain = spec.retrainer()
    measurements = np.stack([[retrain({"main": np.flatnonzero(m)}, seed) for seed in (11, 12)] for m in masks])
    np.savez(tmp_path / "own.npz", masks=masks, measurements=measurements)  # [7, 2, 40], no alpha
    out = CliRunner().invoke(main, ["compare", str(store), "--methods", "source,trak", "--queries", "0:10",
                                    "--truth", str(tmp_path / "own.npz")])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert not Path(str(store) + ".retrains").exists()  # nothing retrained, no cache claimed
    assert "M=7 subsets, R=2 retrains each" in out.output and f"ground truth: {tmp_path / 'own.npz'}" in out.output
    truth = ev.Counterfactuals(float(masks.mean()), masks, measurements).select(range(10))
    queries = torch.utils.data.Subset(spec.query_data(), range(10))
    for method in ("source", "trak"):
        scores = sp.Attributor(store, spec.build_model(), spec.build_task(), method=method).scores(queries)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            expected = str(ev.lds(scores, truth))
        assert expected in next(line for line in out.output.splitlines() if line.startswith(method + " "))
    assert "ground truth split-half reliability" in out.output

    np.savez(tmp_path / "narrow.npz", masks=masks[:, :30], measurements=measurements)
    np.savez(tmp_path / "few.npz", masks=masks, measurements=measurements[:, :, :7])
    for extra, match in (
        (["--truth", str(tmp_path / "narrow.npz")], "keeps subsets of 30 training rows, but the methods attribute 40"),
        (["--truth", str(tmp_path / "few.npz")], "measures 7 queries; give a measurement per query_data() example (40) "
                                                 "or per --queries one (10)."),
        (["--truth", str(tmp_path / "missing.npz")], "missing.npz does not exist"),
        (["--truth", str(tmp_path / "own.npz"), "--subsets", "9"], "--truth: it brings the ground truth, and "
                                                                   "--subsets describes the retrains"),
    ):
        out = CliRunner().invoke(main, ["compare", str(store), "--queries", "0:10", *extra])
        assert out.exit_code != 0 and match in " ".join(out.output.split()), (extra, out.output)
        assert "Traceback" not in out.output


class _Page(HTMLParser):
    """The rows of a page's tables (each cell's text, and whether it holds a ``sig`` mark) and its images' sources."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[str, bool]]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None
        self._marked = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.links += [v for k, v in attrs if k in ("href", "src") and v and not v.startswith("data:")]
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell, self._marked = [], False
        elif tag == "span" and found.get("class") == "sig":
            self._marked = True
        elif tag == "img":
            self.images.append(found.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(("".join(self._cell).strip(), self._marked))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_compare_writes_an_html_report_with_the_printed_numbers_and_the_picture_inline(fitted, tmp_path: Path) -> None:
    """--html writes one self-contained page whose table holds each method's LDS and paired difference from the best
    exactly as the text table prints them (significant ones marked), the noise ceiling and the settings, and the
    per-query picture as an inline PNG."""
    spec_path, store = fitted
    retrain = load_spec(spec_path).retrainer()
    masks = np.random.default_rng(21).random((7, 40)) < 0.5
    measurements = np.stack([[retrain({"main": np.flatnonzero(m)}, seed) for seed in (11, 12)] for m in masks])
    np.savez(tmp_path / "own.npz", masks=masks, measurements=measurements)
    report = tmp_path / "lds.html"
    out = CliRunner().invoke(main, ["compare", str(store), "--methods", "source,trak,grad-dot", "--queries", "0:10",
                                    "--truth", str(tmp_path / "own.npz"), "--html", str(report)])  # fmt: skip
    assert out.exit_code == 0, out.output
    page = _Page()
    page.feed(report.read_text())
    table = {row[0][0]: row[1:] for row in page.rows if row}
    printed = re.compile(r"-?\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\]")
    differences = {}
    for line in out.output.splitlines():
        if " − " in line:  # "  best − method  +0.100 [+0.050, +0.150] *"
            best, _, rest = line.strip().partition(" − ")
            name, shown = rest.split(maxsplit=1)
            differences[name] = shown
    assert len(differences) == 2, out.output
    for method in ("source", "trak", "grad-dot"):
        line = next(line for line in out.output.splitlines() if line.startswith(method + " "))
        (lds_cell, _), (difference_cell, marked) = table[method]
        assert lds_cell == printed.search(line).group(), (method, lds_cell, line)
        if method == best:
            assert difference_cell == "best"
        else:
            assert difference_cell == differences[method] and marked == differences[method].endswith("*")
    r, ceiling = ev.split_half_reliability(ev.Counterfactuals(0.5, masks, measurements).select(range(10)))
    assert table["noise ceiling"] == [(f"√ρ = {ceiling:.3f} (split-half r = {r:.3f})", False)]
    settings = {row[0][0]: row[1][0] for row in page.rows if len(row) == 2}
    assert settings["subsets M"] == "7" and settings["retrains per subset R"] == "2" and settings["queries"] == "10"
    assert settings["ground truth"] == str(tmp_path / "own.npz") and settings["store"] == str(store)
    assert settings["written"].endswith("UTC")
    assert len(page.images) == 1 and page.images[0].startswith("data:image/png;base64,")
    assert base64.b64decode(page.images[0].split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert not page.links  # nothing fetched from elsewhere


@pytest.mark.parametrize("command", ["compare", "lds"])
def test_an_html_path_that_cannot_be_written_is_refused_before_any_scoring_or_retraining(
    fitted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    _, store = fitted

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored or retrained before the --html path was checked")

    monkeypatch.setattr(ev, "lds_ground_truth", never)
    monkeypatch.setattr(sp.Ensemble, "open", never)
    missing = tmp_path / "missing" / "lds.html"
    for path, match in ((tmp_path, "is a directory; give a file name such as"),
                        (missing, "missing is not an existing folder; create it first")):  # fmt: skip
        out = CliRunner().invoke(main, [command, str(store), "--subsets", "6", "--html", str(path)])
        assert out.exit_code == 2 and match in " ".join(out.output.split()), (path, out.output)
        assert "Traceback" not in out.output
    assert not (tmp_path / "missing").exists()
