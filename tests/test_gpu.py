"""GPU paths against their CPU references (run wherever a CUDA device exists; CI has none)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from source_proj import ClassificationTask
from source_proj.projection.factory import make_projector
from source_proj.projection.fastjl import fast_jl_available
from source_proj.query.topk import TorchIndex, faiss_gpu_available
from source_proj.tasks.gradients import PerExampleGradients

from .conftest import full_batch_run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (the GPU paths' CPU fallbacks are tested elsewhere)"
    ),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def _batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 3, 16, 16, generator=g).to(device), torch.randint(0, 10, (32,), generator=g).to(device)


@pytest.mark.parametrize("kind", ["factored", "rademacher"])
def test_cuda_features_equal_cpu_features(kind: str) -> None:
    out = {}
    for device in ("cpu", "cuda"):
        model = _model().to(device)
        names = [n for n, _ in model.named_parameters()]
        shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        projector = make_projector(kind, shapes, 256, 0, model=model)
        grads_fn = PerExampleGradients(model, ClassificationTask(), names)
        out[device] = projector.project_batch(grads_fn, _batch(device)).cpu()
        if kind == "factored":  # factors are drawn on the CPU and moved: bit-identical
            assert torch.equal(projector.factors(0, device)[1].cpu(), projector.factors(0, "cpu")[1])
    assert float((out["cuda"] - out["cpu"]).norm() / out["cpu"].norm()) < 1e-4


def test_bf16_on_cuda_agrees_with_fp32() -> None:
    model = _model().cuda()
    names = [n for n, _ in model.named_parameters()]
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    projector = make_projector("factored", shapes, 256, 0, model=model)
    fp32 = projector.project_batch(PerExampleGradients(model, ClassificationTask(), names), _batch("cuda"))
    bf16 = projector.project_batch(
        PerExampleGradients(model, ClassificationTask(), names, precision="bf16"), _batch("cuda")
    )
    assert float((bf16 - fp32).norm() / fp32.norm()) < 0.05


def test_torch_index_on_cuda_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((20_000, 64)).astype(np.float32)
    queries = rng.standard_normal((100, 64)).astype(np.float32)
    scores, ids = TorchIndex.resident(feats, "cuda", block_rows=3000).search(queries, 50)
    exact = queries.astype(np.float64) @ feats.astype(np.float64).T
    order = np.argsort(-exact, axis=1)[:, :50]
    assert np.array_equal(ids, order)
    assert np.allclose(scores, np.take_along_axis(exact, order, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not fast_jl_available(), reason="fast_jl is not installed (pip install source-proj[cuda])")
def test_fast_jl_is_a_normalised_reproducible_projection() -> None:
    shapes = [("w", (3000,))]
    projector = make_projector("fast_jl", shapes, 512, 7)
    eye = torch.eye(3000, device="cuda")[:64]
    columns = projector.project({"w": eye})  # rows: P e_i, entries must be ±1/√k
    assert torch.allclose(columns.abs(), torch.full_like(columns, 1 / math.sqrt(512)), rtol=1e-3)
    again = make_projector("fast_jl", shapes, 512, 7, feature_tiles=projector.describe()["feature_tiles"])
    x = torch.randn(16, 3000, device="cuda")
    assert torch.equal(projector.project({"w": x}), again.project({"w": x}))
    u, v = torch.randn(2, 3000, device="cuda")
    pu, pv = projector.project({"w": torch.stack([u, v])})
    assert abs(float(pu @ pv - u @ v)) < 5 * math.sqrt(2 / 512) * float(u.norm() * v.norm())


@pytest.mark.skipif(not faiss_gpu_available(), reason="this FAISS build has no GPU support")
def test_faiss_gpu_index_equals_torch_index() -> None:
    from source_proj.query.topk import build_index

    rng = np.random.default_rng(1)
    feats = rng.standard_normal((5000, 32)).astype(np.float32)
    q = rng.standard_normal((10, 32)).astype(np.float32)
    gpu = build_index(lambda: [(0, feats)], 5000, 32, torch.device("cuda"), "auto")
    _, ids = gpu.search(q, 20)
    _, expected = TorchIndex.resident(feats, "cuda").search(q, 20)
    assert np.array_equal(ids, expected)


def test_adams_rank_r_scaling_fitted_on_cuda_equals_the_cpu_fit() -> None:
    """In-run capture refits Adam's rank-R scaling on the model's device as training goes: on CUDA the
    weighted fit must give the CPU's factors, and stay on the device."""
    from source_proj.projection.layers import factorable_layers
    from source_proj.projection.transform import scaling_transform

    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 7))
    layers = factorable_layers(model, [n for n, _ in model.named_parameters()])[0]
    g = torch.Generator().manual_seed(2)
    scale = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) * 3 + 0.01 for n, p in model.named_parameters()}
    for rank in (1, 2):
        cpu = scaling_transform(scale, layers, rank)
        cuda = scaling_transform({n: t.cuda() for n, t in scale.items()}, layers, rank)
        for a, b in zip(cpu.layers, cuda.layers, strict=True):
            assert b.left.is_cuda and b.right.is_cuda
            assert torch.allclose(b.left.cpu(), a.left, rtol=1e-4, atol=1e-6)
            assert torch.allclose(b.right.cpu(), a.right, rtol=1e-4, atol=1e-6)


def test_leading_eigenpairs_on_cuda_equal_the_cpu_ones() -> None:
    """The eigen basis decomposes factors wider than ``PARTIAL_ABOVE`` for their leading eigenpairs on the model's
    device: on CUDA the iteration must give NumPy's leading eigenvalues and subspace, as on the CPU."""
    from source_proj.projection.eigen import leading_eigh

    g = np.random.default_rng(0)
    q, _ = np.linalg.qr(g.standard_normal((600, 600)))
    factor = (q * np.arange(1, 601, dtype=np.float64) ** -1.2) @ q.T
    values, vectors = np.linalg.eigh(factor)
    values, vectors = values[::-1][:20], vectors[:, ::-1][:, :20]
    top, leading = leading_eigh(factor, 20, "cuda", tolerance=1e-12)
    assert np.allclose(top, values, rtol=1e-10, atol=1e-12 * values[0])
    assert np.allclose(leading @ leading.T, vectors @ vectors.T, atol=1e-6)


def test_eigen_projection_on_cuda_gives_the_cpu_scores(tmp_path) -> None:
    """The eigen projection's basis pass, features and SOURCE fit on CUDA against the same on the CPU. At
    k = p the basis is complete, so its eigenvectors' signs and the order of near-equal eigenvalues (which
    may differ between devices) cannot change the scores; below p the blocks' shapes must agree."""
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    import source_proj as sp

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    data = TensorDataset(x, y)

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    model = full_batch_run(tmp_path / "run", mlp(), data, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                           lr=0.2, steps=6, save_every=3, momentum=0.9)  # fmt: skip
    p = sum(t.numel() for t in model.parameters())
    scores, blocks = {}, {}
    for device in ("cpu", "cuda"):
        for dim in (p, 40):
            store = sp.featurize(tmp_path / "run", mlp(), ClassificationTask(), data, tmp_path / f"{device}-{dim}.sp",
                                 projection=sp.ProjectionArguments(kind="eigen", dim=dim),
                                 options=sp.FeaturizeArguments(device=device), progress=False)  # fmt: skip
            blocks[device, dim] = store.meta["projection"]["basis"]["blocks"]
            if dim == p:
                sp.fit(store, progress=False)
                scores[device] = sp.Attributor(store, mlp(), ClassificationTask(), device=device).scores(data)
    assert blocks["cpu", 40] == blocks["cuda", 40]
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], rtol=1e-3, atol=1e-4 * np.abs(scores["cpu"]).max())


def test_eigen_capture_with_the_end_pass_on_cuda_gives_the_cpu_scores(tmp_path) -> None:
    """In-run capture on CUDA (eigen projection at k = p, so the basis is complete and eigenvector signs cannot
    matter; AdamW, so Adam's coordinates; the end pass): fitted, its scores are those of the same capture on
    the CPU. Training itself runs on each device, so the two runs differ by float rounding only."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import source_proj as sp

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    data = TensorDataset(x, y)
    scores = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
        rec = sp.TrajectoryRecorder(tmp_path / f"run-{device}", model, optimizer, save_every=4)
        cap = sp.GradientCapture(rec, tmp_path / f"{device}.sp", ClassificationTask(),
                                 projection=sp.ProjectionArguments(kind="eigen", dim=83),  # k = p
                                 options=sp.CaptureArguments(end_pass=True), datasets={"main": data})  # fmt: skip
        rec.begin_stage("main", dataset_size=len(data))
        loader = DataLoader(sp.IndexedDataset(data), batch_size=8, generator=torch.Generator().manual_seed(1),
                            shuffle=True)  # fmt: skip
        for _ in range(2):
            for rows, (bx, by) in loader:
                with cap.batch((rows, (bx.to(device), by.to(device)))) as (bx, by):
                    optimizer.zero_grad()
                    F.cross_entropy(model(bx), by).backward()
                optimizer.step()
                rec.step()
        rec.close()
        store = sp.fit(tmp_path / f"{device}.sp", progress=False)
        assert store.meta["capture_ends"] == ["main/8"]
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        scores[device] = sp.Attributor(store, fresh, ClassificationTask(), device=device).scores(data)
    assert np.abs(scores["cpu"]).max() > 0
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], rtol=1e-3, atol=1e-3 * np.abs(scores["cpu"]).max())
