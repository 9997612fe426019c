"""The benchmark scripts keep up with the library: every ``benchmarks/**/*.py`` imports, every name it takes from
``source_proj`` exists and every script's ``--help`` parses (without running a benchmark); and the prepared GPU
benchmark (``benchmarks/transformer_gpu.py``) runs end to end at toy size on the CPU, so that a session with a GPU
only changes its sizes."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import source_proj as sp
from source_proj import evaluation as ev

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "benchmarks").rglob("*.py"))
LOCAL = (ROOT / "benchmarks", ROOT / "examples")  # the scripts' own modules (digits, lm, settings, harness, ...)


def _local(module: object) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and any(Path(file).is_relative_to(folder) for folder in LOCAL)


def _has(module: ModuleType, name: str) -> bool:
    """Whether ``module`` has ``name``, without importing what a lazy ``__getattr__`` would (the integrations')."""
    return (
        name in vars(module)
        or name in getattr(module, "__all__", ())
        or (hasattr(module, "__path__") and importlib.util.find_spec(f"{module.__name__}.{name}") is not None)
    )


def _missing_library_names(tree: ast.Module) -> list[str]:
    """The names a script takes from ``source_proj`` that it lacks, those an import alone does not check included:
    ``from source_proj... import name`` inside a function, and ``alias.name`` on a ``source_proj`` module."""
    aliases: dict[str, ModuleType] = {}
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:  # `import source_proj.x as y` binds y to source_proj.x, `import source_proj.x` the top
                if a.name.split(".")[0] == "source_proj":
                    aliases[a.asname or "source_proj"] = importlib.import_module(a.name if a.asname else "source_proj")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "source_proj":
            assert node.module is not None
            module = importlib.import_module(node.module)
            for a in node.names:
                if not _has(module, a.name):
                    missing.append(f"line {node.lineno}: from {node.module} import {a.name}")
                elif isinstance(vars(module).get(a.name), ModuleType):
                    aliases[a.asname or a.name] = vars(module)[a.name]
    missing += [
        f"line {node.lineno}: {node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        and not _has(aliases[node.value.id], node.attr)
    ]  # fmt: skip
    return missing


def _load(script: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``script`` imported as ``python script`` would run it, but not run: its folder first on sys.path and its
    sibling modules fresh (a digits ``settings`` must not stand in for accuracy's); ``monkeypatch`` undoes both."""
    path = ROOT / script
    for name, module in list(sys.modules.items()):
        if _local(module):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # as __main__ is: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fresh_modules() -> Iterator[None]:
    """The scripts' own modules a test imported are dropped after it, so the next script imports its own."""
    yield
    for name, loaded in list(sys.modules.items()):
        if _local(loaded):
            del sys.modules[name]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_imports_and_parses_help(
    script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fresh_modules: None
) -> None:
    """A script that imports or uses a name the library no longer has fails here, and so does an argparse script
    whose ``--help`` does not parse. A third-party package missing here (an optional peer) skips."""
    try:
        module = _load(script, monkeypatch)
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        if top == "source_proj" or importlib.util.find_spec(top) is not None or any(
            next(folder.rglob(f"{top}.py"), None) for folder in LOCAL
        ):
            raise
        pytest.skip(f"{script} needs {top}, not installed here")
    missing = _missing_library_names(ast.parse((ROOT / script).read_text(), filename=script))
    assert not missing, f"{script} uses names source_proj lacks: {missing}"
    if callable(getattr(module, "main", None)):
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as leave:
            module.main()
        assert leave.value.code == 0 and "usage:" in capsys.readouterr().out


def test_peers_absent_is_one_sentence_before_any_work(monkeypatch: pytest.MonkeyPatch, fresh_modules: None) -> None:
    """``accuracy/peers.py`` for a peer library that is not installed stops at once in one sentence naming it,
    before it locates (trains) any model, and refuses a peer it does not know by name."""
    peers = _load("benchmarks/accuracy/peers.py", monkeypatch)
    absent = [p for p in ("kronfluence", "dattri", "bergson") if importlib.util.find_spec(p) is None]
    if not absent:
        pytest.skip("every peer is installed here")

    def locate(*args: object, **kwargs: object) -> None:
        raise AssertionError("located the models before checking the peers")

    monkeypatch.setattr(peers.harness, "locate", locate)
    monkeypatch.setattr(sys, "argv", ["peers.py", "--settings", "early", "--peers", absent[0]])
    with pytest.raises(SystemExit) as leave:
        peers.main()
    assert str(leave.value.code).startswith(f"{absent[0]} cannot be imported by {sys.executable}; install")
    monkeypatch.setattr(sys, "argv", ["peers.py", "--peers", "trak"])
    with pytest.raises(SystemExit) as leave:
        peers.main()
    assert leave.value.code == 2


def test_query_scale_without_faiss_says_which_extra_before_any_work(
    monkeypatch: pytest.MonkeyPatch, fresh_modules: None
) -> None:
    """``query_scale.py`` imported FAISS on its first line, so even ``--backends torch`` needed it; now a FAISS
    backend without FAISS stops at once in the library's sentence naming the extra (absence simulated)."""
    monkeypatch.setitem(sys.modules, "faiss", None)
    bench = _load("benchmarks/query_scale.py", monkeypatch)

    def features(*args: object) -> None:
        raise AssertionError("made the features before checking for FAISS")

    monkeypatch.setattr(bench, "features", features)
    monkeypatch.setattr(sys, "argv", ["query_scale.py", "--backends", "torch,ivf", "--device", "cpu"])
    with pytest.raises(SystemExit) as leave:
        bench.main()
    assert str(leave.value.code).startswith("The ivf search backend is FAISS's approximate inverted-file index")
    assert 'pip install "source-proj[faiss]"' in str(leave.value.code)


def test_query_scale_refuses_an_unknown_backend_before_any_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fresh_modules: None
) -> None:
    """A misspelt ``--backends`` name (``fais``) was taken for FAISS's flat index after the features were made (10⁷
    rows on the GPU check) and reported under the misspelt name; it now stops at once, naming it and the choices."""
    bench = _load("benchmarks/query_scale.py", monkeypatch)

    def features(*args: object) -> None:
        raise AssertionError("made the features before checking the backends")

    monkeypatch.setattr(bench, "features", features)
    monkeypatch.setattr(sys, "argv", ["query_scale.py", "--backends", "torch,fais", "--device", "cpu"])
    with pytest.raises(SystemExit) as leave:
        bench.main()
    assert leave.value.code == 2
    assert "unknown backend 'fais' in --backends; choose from torch, torch-bf16" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("model", ["toy-llama", "toy-gpt2"])
def test_transformer_gpu_benchmark_smoke(tmp_path: Path, model: str) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import transformer_gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    results = transformer_gpu.main(["--smoke", "--model", model, "--out", str(tmp_path)])
    assert [r["phase"] for r in results] == ["train-step", "train", "featurize", "fit"]
    assert all(r.get("examples_per_s", 1) > 0 for r in results)
    store = sp.Store.open(tmp_path / "store.sp")
    assert store.meta["projection"]["kind"] == "factored" and store.meta["projection"]["dim"] == 64
    assert store.meta["methods"]["source"]["complete"]
    trajectory = sp.Trajectory.load(tmp_path / "run")
    assert trajectory.num_steps == 4 and (trajectory.clip <= 1).all()


def test_digits_diagnostics_scaled_source_features_at_scale_one_are_fit_s(fitted_mlp_store: Path) -> None:
    """``digits_lds_diagnostics.py``'s SOURCE with every segment's time η̄K scaled: at scale 1 the features fit
    stores, with fit's feature points and damping; another scale changes them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import digits_lds_diagnostics as diagnostics
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    store = sp.Store.open(fitted_mlp_store, writable=True)
    args = sp.FitArguments(segments_per_stage=2, method="two")
    sp.fit(store, args, progress=False)
    stages = [s["name"] for s in store.meta["trajectory"]["stages"]]
    fitted = np.concatenate([store.read(f"methods/two/train/{stage}") for stage in stages])
    np.testing.assert_allclose(diagnostics.scaled_source_features(store, args, 1.0), fitted, rtol=1e-5, atol=1e-7)
    assert not np.allclose(diagnostics.scaled_source_features(store, args, 3.0), fitted, rtol=1e-3)


def test_unrolled_lds_reads_the_sequence_heads_recipe(monkeypatch: pytest.MonkeyPatch, fresh_modules: None) -> None:
    """``unrolled_lds.py`` rebuilds ``sequence_heads_lds.py``'s training from its own options: the fixed-length
    sentences that benchmark records by default (the unrolled training passes no attention mask)."""
    unrolled = _load("benchmarks/unrolled_lds.py", monkeypatch)
    training = unrolled.heads.Training(unrolled.parse(["--train", "6", "--queries", "2"]))
    assert len(training.train_data) == 6 and len(training.queries) == 2
    assert bool(training.train_data.attention_mask.all()) and bool(training.queries.attention_mask.all())


GPU_SCRIPTS = ["capture_overhead", "distributed_scaling", "eigen_basis_time", "loss_blocks", "query_scale", "resnet9",
               "transformer_gpu", "write_behind"]  # fmt: skip


@pytest.mark.parametrize("name", GPU_SCRIPTS)
def test_gpu_script_without_a_gpu_is_one_sentence_before_any_work(
    name: str, monkeypatch: pytest.MonkeyPatch, fresh_modules: None
) -> None:
    """``--device cuda`` where there is no GPU ends a benchmark script in one sentence saying so, before it trains or
    allocates anything (it was torch's assertion, or a featurize subprocess's error, in a traceback)."""
    script = _load(f"benchmarks/{name}.py", monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--device", "cuda"])
    with pytest.raises(SystemExit) as leave:
        script.main()
    assert str(leave.value.code).startswith("--device cuda needs a CUDA GPU, but ")


def test_the_gpu_transformer_script_at_gpu_sizes_without_a_gpu_refuses_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_modules: None
) -> None:
    """``transformer_gpu.py`` at a real model's sizes with no ``--device`` on a machine without a GPU stops in one
    sentence (it trained GPT-2 124M on the CPU for hours instead); ``--smoke`` is what runs on a CPU."""
    script = _load("benchmarks/transformer_gpu.py", monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as leave:
        script.main(["--model", "gpt2-124m", "--out", str(tmp_path / "out")])
    assert "is sized for a GPU and this machine has none; pass --smoke" in str(leave.value.code)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["lora_lds", "seq2seq_lds", "sequence_heads_lds", "token_classification_lds"])
def test_methods_lds_scripts_refuse_a_single_repeat_before_training(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fresh_modules: None
) -> None:
    """The LDS scripts that report the ground truth's split-half reliability refuse ``--repeats 1`` as a usage error
    before they train (they trained, then failed on the empty second half's NaNs), as ``examples/digits/lds.py``."""
    script = _load(f"benchmarks/{name}.py", monkeypatch)

    def train_kept(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained before refusing --repeats 1")

    monkeypatch.setattr(script, "train_kept", train_kept)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--repeats", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as leave:
        script.main()
    assert leave.value.code == 2 and "--repeats: 1 leaves no second half" in capsys.readouterr().err


def test_baseline_grid_without_run_s_store_names_the_command_that_writes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_modules: None
) -> None:
    """``accuracy/baseline_grid.py`` reads model 0's store that ``run.py --kind KIND`` writes; without it the script
    stops in one sentence giving that command, before it builds the ground truth (since run.py's default became eigen,
    its dense store is not there)."""
    grid = _load("benchmarks/accuracy/baseline_grid.py", monkeypatch)
    monkeypatch.setattr(grid.harness, "locate", lambda name, **kwargs: (None, tmp_path, []))

    def prepare(*args: object, **kwargs: object) -> None:
        raise AssertionError("built the ground truth before refusing")

    monkeypatch.setattr(grid.harness, "prepare", prepare)
    monkeypatch.setattr(sys, "argv", ["baseline_grid.py", "--settings", "early", "--root", "r", "--dim", "32"])
    with pytest.raises(SystemExit) as leave:
        grid.main()
    assert leave.value.code == (
        f"No store at {tmp_path / 'model-0-k32.sp'}; write it first with `python benchmarks/accuracy/run.py "
        "--settings early --root r --dim 32 --kind rademacher`."
    )


def test_accuracy_setting_recorded_with_a_head_ratio_is_what_batched_sgd_retrains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_modules: None
) -> None:
    """``group_rates_lds.py``'s recorded run and its ground truth follow one recipe: ``Setting.train_recorded`` with
    the head at 5× records the body's ``lr_ratio`` 0.2 and the head's rate, and ends where ``BatchedSGD`` with the
    same ``lr_ratio`` ends on the whole data with the same seed; ``ignore_ratio`` describes every group at the head's
    rate and no ratio."""
    script = _load("benchmarks/group_rates_lds.py", monkeypatch)
    settings = script.settings_module
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 64, generator=g), torch.randint(0, 10, (20,), generator=g)
    stage = settings.SGDStage("main", x, y, epochs=2, lr=0.03, batch_size=8, momentum=0.9, weight_decay=1e-3)
    s = settings._setting("tiny", (64, 5, 10), [stage], "main", {"test": (x[:3], y[:3])}, 3)
    ratios = dict.fromkeys(script.head_names(s.build_model(0)), 5.0)
    assert list(ratios) == ["2.weight", "2.bias"]
    model = s.train_recorded(0, tmp_path / "run", lr_ratio=ratios)
    groups = sp.Trajectory.load(tmp_path / "run").stages[0].optimizer["groups"]
    assert [(g["params"], g["lr"], g["lr_ratio"]) for g in groups] == [
        (["0.weight", "0.bias"], 0.03, 0.2), (["2.weight", "2.bias"], 0.03 * 5.0, 1.0)]  # fmt: skip
    params = ev.BatchedSGD(s.build_model, sp.ClassificationTask(), s.stages, lr_ratio=ratios).train([{}], [0])
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name][0], p.detach(), rtol=1e-5, atol=1e-6)
    script.ignore_ratio(tmp_path / "run", tmp_path / "ignored")
    groups = sp.Trajectory.load(tmp_path / "ignored").stages[0].optimizer["groups"]
    assert [(g["lr"], "lr_ratio" in g) for g in groups] == [(0.15, False), (0.15, False)]
