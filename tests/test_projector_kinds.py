"""Projector kinds end to end: the store records the kind, queries rebuild the same map, the
factored projection's scores agree with the exact ones, and fast_jl falls back cleanly without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.projection.factory import make_projector, projector_from_meta
from source_proj.projection.fastjl import fast_jl_available

from .conftest import full_batch_run


def _arch() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


@pytest.fixture
def trained(tmp_path: Path, classification_data) -> Path:
    torch.manual_seed(0)
    full_batch_run(
        tmp_path / "run",
        _arch(),
        classification_data,
        lambda o, t: F.cross_entropy(o, t, reduction="none"),
        lr=0.1,
        steps=30,
        save_every=10,
    )
    return tmp_path / "run"


def _scores(run: Path, data: TensorDataset, store: Path, kind: str, dim: int, seed: int = 0) -> np.ndarray:
    sp.featurize(
        run,
        _arch(),
        sp.ClassificationTask(),
        data,
        store,
        projection=sp.ProjectionArguments(dim=dim, seed=seed, kind=kind),
        options=sp.FeaturizeArguments(batch_size=8, chunk_rows=16),
        progress=False,
    )
    sp.fit(store, progress=False)
    queries = TensorDataset(torch.randn(8, 4, generator=torch.Generator().manual_seed(5)), torch.arange(8) % 3)
    return sp.Attributor(store, _arch(), sp.ClassificationTask()).scores(queries)


def test_factored_store_is_rebuilt_for_queries_and_agrees_with_exact_scores(
    tmp_path: Path, trained: Path, classification_data
) -> None:
    exact = _scores(trained, classification_data, tmp_path / "exact.sp", "identity", 0)
    factored = [_scores(trained, classification_data, tmp_path / f"f{s}.sp", "factored", 1024, s) for s in range(3)]
    meta = sp.Store.open(tmp_path / "f0.sp").meta
    assert meta["projection"]["kind"] == "factored" and meta["projection"]["factors"] == [32, 32]
    assert [layer[0] for layer in meta["projection"]["layers"]] == ["0", "2", "4"]
    assert projector_from_meta(meta, _arch()).describe() == meta["projection"]
    with pytest.raises(sp.TaskError, match="pass the model"):
        projector_from_meta(meta)
    # p = 1,315 parameters, k = 1,024: scores close to the exact (unprojected) SOURCE scores
    for scores in factored:
        assert spearmanr(scores.ravel(), exact.ravel())[0] > 0.95
    assert not np.array_equal(factored[0], factored[1])  # the seed defines the map


def test_changing_the_projection_kind_of_a_store_is_refused(tmp_path: Path, trained: Path, classification_data) -> None:
    _scores(trained, classification_data, tmp_path / "s.sp", "factored", 64)
    with pytest.raises(sp.StoreError, match="other settings \\(projection"):
        sp.featurize(
            trained,
            _arch(),
            sp.ClassificationTask(),
            classification_data,
            tmp_path / "s.sp",
            projection=sp.ProjectionArguments(dim=64, kind="rademacher"),
            progress=False,
        )


@pytest.mark.skipif(fast_jl_available(), reason="checks the fallback on machines without CUDA + fast_jl")
def test_fast_jl_without_cuda_is_refused_clearly_and_auto_falls_back(
    tmp_path: Path, trained: Path, classification_data
) -> None:
    shapes = [("w", (600,))]
    with pytest.raises(sp.TaskError, match="fast_jl"):
        make_projector("fast_jl", shapes, 512, 0)
    assert make_projector("auto", shapes, 512, 0).describe()["kind"] == "rademacher"
    _scores(trained, classification_data, tmp_path / "auto.sp", "auto", 64)
    assert sp.Store.open(tmp_path / "auto.sp").meta["projection"]["kind"] == "rademacher"


def test_bf16_featurize_records_its_precision_and_keeps_scores(
    tmp_path: Path, trained: Path, classification_data
) -> None:
    stores = {}
    for precision in ("fp32", "bf16"):
        stores[precision] = tmp_path / f"{precision}.sp"
        sp.featurize(
            trained,
            _arch(),
            sp.ClassificationTask(),
            classification_data,
            stores[precision],
            projection=sp.ProjectionArguments(dim=64, kind="factored"),
            options=sp.FeaturizeArguments(batch_size=8, precision=precision),
            progress=False,
        )
    assert sp.Store.open(stores["bf16"]).meta["featurize"]["precision"] == "bf16"
    g32 = sp.Store.open(stores["fp32"]).read("grads/main/step-00000030")
    g16 = sp.Store.open(stores["bf16"]).read("grads/main/step-00000030")
    assert np.linalg.norm(g16 - g32) / np.linalg.norm(g32) < 0.05


def test_cli_factored_bf16_featurize_and_streamed_query(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from source_proj.cli.main import main

    from .test_cli import SPEC

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
        steps=6,
        save_every=3,
    )
    store = tmp_path / "s.sp"
    cli = CliRunner()
    args = ["featurize", "--ckpts", str(tmp_path / "run"), "--spec", str(spec), "--out", str(store)]
    out = cli.invoke(main, [*args, "--dim", "16", "--projection", "factored", "--precision", "bf16"])
    assert out.exit_code == 0, out.output
    meta = sp.Store.open(store).meta
    assert meta["projection"]["kind"] == "factored" and meta["featurize"]["precision"] == "bf16"
    assert cli.invoke(main, ["fit", str(store), "--device", "cpu"]).exit_code == 0
    results = {}
    for backend in ("stream", "faiss"):
        out = cli.invoke(
            main, ["query", str(store), "--top-k", "3", "--search", backend, "--out", str(tmp_path / f"{backend}.csv")]
        )
        assert out.exit_code == 0, out.output
        results[backend] = (tmp_path / f"{backend}.csv").read_text().splitlines()
    assert [r.split(",")[:5] for r in results["stream"]] == [r.split(",")[:5] for r in results["faiss"]]
    out = cli.invoke(main, [*args, "--dim", "17", "--projection", "factored", "--force"])
    assert out.exit_code == 1 and "near-square" in out.output
