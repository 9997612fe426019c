"""GPU paths against their CPU references (run wherever a CUDA device exists; CI has none)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from source_proj import ClassificationTask
from source_proj.projection.factory import make_projector
from source_proj.projection.fastjl import fast_jl_available
from source_proj.query.topk import DEVICE_QUERY_BATCH, HOST_QUERY_BATCH, TorchIndex, faiss_gpu_available
from source_proj.tasks.gradients import PerExampleGradients

from .conftest import full_batch_run

DEVICE = "cuda"
"""The device the tests below put on trial; each computes its reference on the CPU (or in float64) alongside."""

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
    from torch.utils.data import TensorDataset

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
        _train_captured(rec, cap, model, optimizer, data, device, epochs=2)
        store = sp.fit(tmp_path / f"{device}.sp", progress=False)
        assert store.meta["capture_ends"] == ["main/8"]
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        scores[device] = sp.Attributor(store, fresh, ClassificationTask(), device=device).scores(data)
    assert np.abs(scores["cpu"]).max() > 0
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], rtol=1e-3, atol=1e-3 * np.abs(scores["cpu"]).max())


def _train_captured(rec, cap, model: nn.Module, optimizer, data, device: str, epochs: int = 1) -> None:
    """Train ``model`` on ``data`` (one stage, batches of 8 in a fixed shuffle) for ``epochs`` on ``device``, every
    batch captured by ``cap`` and every step recorded by ``rec``, and close the run."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    import source_proj as sp

    rec.begin_stage("main", dataset_size=len(data))
    loader = DataLoader(sp.IndexedDataset(data), batch_size=8, generator=torch.Generator().manual_seed(1),
                        shuffle=True)  # fmt: skip
    for _ in range(epochs):
        for rows, (bx, by) in loader:
            with cap.batch((rows, (bx.to(device), by.to(device)))) as (bx, by):
                optimizer.zero_grad()
                F.cross_entropy(model(bx), by).backward()
            optimizer.step()
            rec.step()
    rec.close()


def _check_top_k(scores: np.ndarray, ids: np.ndarray, exact: np.ndarray, tol: np.ndarray) -> None:
    """``(scores, ids)`` ``[Q, k]`` are the top-k of the float64 score matrix ``exact`` ``[Q, N]`` up to ties within
    ``tol`` ``[Q, 1]`` (the search's rounding, per query): distinct rows, scores within ``tol`` of the exact ones and
    non-increasing, every row at least the exact k-th score and each at least the next one's exact score, less
    2·``tol``. Rows whose exact scores differ by more than 2·``tol`` are therefore in the brute force's order."""
    k = ids.shape[1]
    assert all(len(np.unique(row)) == k for row in ids)
    true = np.take_along_axis(exact, ids, 1)
    assert (np.abs(scores - true) <= tol).all()
    assert (np.diff(scores, axis=1) <= 0).all()
    kth = -np.partition(-exact, k - 1, axis=1)[:, k - 1 : k]
    assert (true >= kth - 2 * tol).all()
    assert (true[:, :-1] >= true[:, 1:] - 2 * tol).all()


@pytest.fixture(scope="module")
def ensemble_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, TensorDataset]:
    """Two fitted stores of independently trained 6-16-3 MLPs (200 examples, chunks of 64 and 48 rows, so the
    ensemble's index reads them side by side cut differently) and their training data."""
    import torch.nn.functional as F

    import source_proj as sp

    root = tmp_path_factory.mktemp("ensemble")
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(200, 6, generator=g), torch.randint(0, 3, (200,), generator=g))
    stores = []
    for seed in range(2):
        torch.manual_seed(seed)
        full_batch_run(root / f"run{seed}", _ensemble_mlp(), data, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                       lr=0.2, steps=4, save_every=2)  # fmt: skip
        store = sp.featurize(root / f"run{seed}", _ensemble_mlp(), ClassificationTask(), data, root / f"s{seed}.sp",
                             projection=sp.ProjectionArguments(kind="factored", dim=64),
                             options=sp.FeaturizeArguments(device="cpu", chunk_rows=64 - 16 * seed),
                             progress=False)  # fmt: skip
        stores.append(sp.fit(store, progress=False).path)
    return stores, data


def _ensemble_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


@pytest.mark.parametrize("backend", ["auto", "torch", "stream"])
def test_an_ensembles_index_on_cuda_gives_the_brute_force_top_k_of_its_cpu_scores(
    ensemble_stores: tuple[list, TensorDataset], backend: str
) -> None:
    """An ensemble opened on CUDA builds its index over the models' concatenated rows on that device (the torch
    index, or FAISS-GPU for ``auto`` where installed) and its top-k, both ends, is the brute-force top-k of the same
    ensemble's score matrix computed on the CPU in float64."""
    import source_proj as sp

    stores, data = ensemble_stores
    queries = TensorDataset(*(t[:12] for t in data.tensors))
    cpu = sp.Ensemble.open(stores, _ensemble_mlp(), ClassificationTask(), device="cpu", progress=False)
    exact = cpu.query_features(queries).astype(np.float64) @ cpu.train_features().astype(np.float64).T
    ensemble = sp.Ensemble.open(stores, _ensemble_mlp(), ClassificationTask(), device=DEVICE, search_backend=backend,
                                progress=False)  # fmt: skip
    index = ensemble.index()
    if isinstance(index, TorchIndex):
        assert [d.type for d in index.devices] == [torch.device(DEVICE).type]
    else:  # FAISS: on a GPU where this build has GPU support, else (the CPU) where installed
        assert backend == "auto" and (faiss_gpu_available() or torch.device(DEVICE).type == "cpu")
    result = ensemble.top_k(queries, 20)
    tol = 1e-4 * np.abs(exact).max(axis=1, keepdims=True)
    _check_top_k(result.positive_scores, result.positive_ids, exact, tol)
    _check_top_k(-result.negative_scores, result.negative_ids, -exact, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_resident_torch_index_on_cuda_gives_the_float64_top_k_up_to_its_rounding(
    dtype: torch.dtype,
) -> None:
    """The rows held on CUDA in float16 or bfloat16 (half the memory): the top-50 is the float64 brute force's up to
    ties within the rounding (rows, the queries, float16's unit queries and the products, each a few units of the
    dtype's ε of |q|·|row|). Features ×60 at d = 64 put the largest scores beyond float16's range (65504), so
    float16 only answers through its unit queries."""
    rng = np.random.default_rng(4)
    feats = (60 * rng.standard_normal((20_000, 64))).astype(np.float32)
    queries = (60 * rng.standard_normal((100, 64))).astype(np.float32)
    index = TorchIndex.resident(feats, DEVICE, block_rows=3000, dtype=dtype)
    _, held = next(iter(index._blocks()))
    assert held.dtype == dtype and held.device.type == torch.device(DEVICE).type
    scores, ids = index.search(queries, 50)
    exact = queries.astype(np.float64) @ feats.astype(np.float64).T
    assert np.abs(exact).max() > 65504  # the case: float32 scores float16 cannot hold
    eps = torch.finfo(dtype).eps
    tol = 4 * eps * np.linalg.norm(queries, axis=1, keepdims=True) * np.linalg.norm(feats, axis=1).max()
    _check_top_k(scores, ids, exact, tol)
    order = np.argsort(-exact, axis=1)[:, :50]
    recall = np.mean([len(np.intersect1d(a, b)) / 50 for a, b in zip(ids, order, strict=True)])
    assert recall > 0.9  # the ties are few: the tolerance does not hide a wrong search


@pytest.mark.parametrize("k", [1, 2999, 3000])
def test_the_torch_index_answers_more_queries_than_its_cuda_batch_in_one_search_as_brute_force(k: int) -> None:
    """On CUDA the torch index scores 4,096 queries a product: 2 × 4,096 + 37 queries (a last, partial batch) over
    3,000 rows in blocks of 1,000, with k = 1, N − 1 and N (more than a block holds): the float64 brute force's
    top-k, in its order up to float32 ties."""
    rng = np.random.default_rng(5)
    feats = rng.standard_normal((3000, 32)).astype(np.float32)
    index = TorchIndex.resident(feats, DEVICE, block_rows=1000)
    assert index.query_batch == (DEVICE_QUERY_BATCH if torch.device(DEVICE).type == "cuda" else HOST_QUERY_BATCH)
    queries = rng.standard_normal((2 * index.query_batch + 37, 32)).astype(np.float32)
    scores, ids = index.search(queries, k)
    assert scores.shape == ids.shape == (len(queries), k)
    exact = queries.astype(np.float64) @ feats.astype(np.float64).T
    tol = 1e-5 * np.linalg.norm(queries, axis=1, keepdims=True) * np.linalg.norm(feats, axis=1).max()
    _check_top_k(scores, ids, exact, tol)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_capture_of_groups_at_a_ratio_of_rates_on_cuda_takes_the_cpus_denominators_and_features(
    tmp_path, kind: str
) -> None:
    """In-run capture computes D on the model's device: 1/r on an SGD stage whose groups train at a ratio r of rates
    (``ratio_denominator``), (√v̂ + ε)/r on AdamW's (``live_preconditioner``), D = ∞ (scale 0) for a group at rate
    0; then scales the gradients by D^{-1/2} (the factored projection's rank-one terms). On CUDA every window's
    stored D and captured gradients are those of the same run captured on the CPU (the training itself differs by
    float rounding only)."""

    import source_proj as sp
    from source_proj.featurize.windows import window_array

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g))
    stores = {}
    for role, device in (("reference", "cpu"), ("tried", DEVICE)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)
        first, last = model[0], model[2]
        groups = [{"params": list(first.parameters()), "lr": 0.02}, {"params": [last.weight], "lr": 0.1},
                  {"params": [last.bias], "lr": 0.0}]  # fmt: skip
        if kind == "sgd":
            optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        else:
            optimizer = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.01)
        rec = sp.TrajectoryRecorder(tmp_path / f"run-{role}", model, optimizer, save_every=4)
        cap = sp.GradientCapture(rec, tmp_path / f"{role}.sp", ClassificationTask(),
                                 projection=sp.ProjectionArguments(kind="factored", dim=16),
                                 options=sp.CaptureArguments(fisher="empirical", end_pass=False))  # fmt: skip
        _train_captured(rec, cap, model, optimizer, data, device)
        stores[role] = sp.Store.open(tmp_path / f"{role}.sp")
    cpu, cuda = stores["reference"], stores["tried"]
    for start in (4,) if kind == "adamw" else (0, 4):  # AdamW has no D before its first step to capture with
        d = cpu.read(window_array("denominator", "main", start))
        ratios = np.repeat([1 / 0.2, 1.0, np.inf], [6 * 8 + 8, 3 * 8, 3])
        if kind == "sgd":
            np.testing.assert_array_equal(d, ratios.astype(np.float32))
        else:
            assert (d[-3:] == np.inf).all() and (d[:-3] > 0).all()
        np.testing.assert_allclose(cuda.read(window_array("denominator", "main", start)), d, rtol=1e-4)
        grads = cpu.read(window_array("grads", "main", start))
        assert np.abs(grads).max() > 0
        np.testing.assert_allclose(cuda.read(window_array("grads", "main", start)), grads, rtol=1e-3,
                                   atol=1e-4 * np.abs(grads).max())  # fmt: skip


def test_each_rank_of_a_process_group_on_a_one_gpu_node_computes_on_that_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a process sees one GPU (one GPU in the machine, or ``CUDA_VISIBLE_DEVICES`` per process) every rank of
    a process group computes on it: ``cuda`` and ``cuda:0`` are cuda:0 whatever its LOCAL_RANK, a product there gives
    the CPU's; ``cuda:1`` given to every rank of the node (which would all compute there) is refused in one sentence."""
    import source_proj as sp
    from source_proj.distributed import Ranks, Shard, local_gpu, rank_device

    if torch.cuda.device_count() != 1:
        pytest.skip("the one-GPU mapping needs a process that sees one GPU (CUDA_VISIBLE_DEVICES=0)")
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for rank in range(4):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        group = Ranks(Shard(rank, 4), coordinated=True)
        assert local_gpu(rank) == 0
        for given in ("cuda", "cuda:0"):
            device = rank_device(torch.device(given), group)
            assert device == torch.device("cuda", 0)
            assert torch.allclose((x.to(device) @ x.to(device)).cpu(), x @ x, rtol=1e-12)
        with pytest.raises(sp.StoreError, match=rf"^Rank {rank} of 4 was given device cuda:1, but the 4 ranks on its "
                           r"node compute one per GPU \(this one on cuda:0"):  # fmt: skip
            rank_device(torch.device("cuda", 1), group)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a rank beyond its node's GPUs is refused only where a "
                    "process sees several GPUs (with one, every rank computes on it: the test above); needs 2 or more")
def test_ranks_map_one_per_visible_gpu_and_a_rank_beyond_them_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """With G visible GPUs, LOCAL_RANK i < G computes on cuda:i (a product there gives the CPU's); LOCAL_RANK G is
    refused in one sentence."""
    import source_proj as sp
    from source_proj.distributed import Ranks, Shard, rank_device

    count = torch.cuda.device_count()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(count + 1))
    for local in range(count):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        device = rank_device(torch.device("cuda"), Ranks(Shard(local, count + 1), coordinated=True))
        assert device == torch.device("cuda", local)
        assert torch.allclose((x.to(device) @ x.to(device)).cpu(), x @ x, rtol=1e-12)
    monkeypatch.setenv("LOCAL_RANK", str(count))
    with pytest.raises(sp.StoreError, match=rf"^Rank {count} is rank {count} on its node, which has {count} GPUs"):
        rank_device(torch.device("cuda"), Ranks(Shard(count, count + 1), coordinated=True))
