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
from source_proj.projection.factored import FactoredProjector
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
    rebuilt = projector_from_meta(meta, _arch())
    assert rebuilt.describe() == meta["projection"]
    without_model = projector_from_meta(meta)  # from the recorded layers (what verify does): the same matrix
    assert isinstance(rebuilt, FactoredProjector) and isinstance(without_model, FactoredProjector)
    assert torch.equal(without_model.dense(), rebuilt.dense())
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
    blocks = [*args[:-1], str(tmp_path / "blocks.sp"), "--projection", "factored", "--dim", "16"]
    blocks += ["--fisher", "empirical"]
    out = cli.invoke(main, [*blocks, "--module-dim", "16", "--module-dim", "0=4", "--checkpoints", "3"])
    assert out.exit_code == 0, out.output
    meta = sp.Store.open(tmp_path / "blocks.sp").meta
    assert meta["projection"]["module_dims"] == [["*", 16], ["0", 4]] and meta["trajectory"]["checkpoints"] == [3, 6]
    out = cli.invoke(main, [*blocks, "--module-dim", "*.mlp=x", "--force"])
    assert out.exit_code == 2 and "PATTERN=K" in out.output


def _adam_run(run: Path, data: TensorDataset) -> None:
    x, y = data.tensors
    torch.manual_seed(0)
    model = _arch()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=20)
    rec.begin_stage("main", dataset_size=len(y))
    for step in range(60):
        rows = torch.arange(step * 10, step * 10 + 10) % len(y)
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        rec.step()
    rec.close()


def test_adam_run_on_the_factored_projection_scales_each_layer_by_its_rank_r_preconditioner(
    tmp_path: Path, classification_data
) -> None:
    """At a rank covering every layer (min(d_out, d_in + 1) ≤ 32) the stored features are P(D^{-1/2} ⊙ ∇ℓ)
    exactly; at rank 1 they are close to them, far closer than unscaled gradients; queries rebuild the rank."""
    from source_proj.tasks.gradients import PerExampleGradients
    from source_proj.trajectory.preconditioner import read_scale

    _adam_run(tmp_path / "run", classification_data)
    options = sp.FeaturizeArguments(batch_size=10, chunk_rows=30, fisher="empirical", measurement=False)
    features = {}
    for rank in (32, 1):
        store = sp.featurize(
            tmp_path / "run", _arch(), sp.ClassificationTask(), classification_data, tmp_path / f"r{rank}.sp",
            projection=sp.ProjectionArguments(dim=64, kind="factored", adam_rank=rank), options=options,
            progress=False,
        )  # fmt: skip
        assert store.meta["projection"].get("adam_rank", 1) == rank
        features[rank] = store.read("grads/main/step-00000040")
    model = _arch()
    trajectory = sp.Trajectory.load(tmp_path / "run")
    trajectory.load_into(model, trajectory.checkpoints[2])
    segment = next(s for s in store.meta["segmentation"]["segments"] if 40 in s["checkpoints"])
    scale = read_scale(store, segment["preconditioner"], store.meta["params"])
    assert scale is not None
    projector = projector_from_meta(store.meta, model)
    grads = PerExampleGradients(model, sp.ClassificationTask(), list(scale))(classification_data.tensors)
    exact = projector.project({n: g * scale[n] for n, g in grads.items()}).numpy()
    unscaled = projector.project(grads).numpy()

    def rel(a: np.ndarray) -> float:
        return float(np.linalg.norm(a - exact) / np.linalg.norm(exact))

    assert rel(features[32]) < 1e-4
    assert rel(features[1]) < 0.5 * rel(unscaled), (rel(features[1]), rel(unscaled))
    sp.fit(store, progress=False)
    assert np.isfinite(sp.Attributor(store, _arch(), sp.ClassificationTask()).scores(classification_data)).all()
