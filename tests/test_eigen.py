"""The eigen projection (each layer's leading Kronecker-factor eigenvectors, ``projection/eigen.py``):
its allocation, its basis against brute force, its features against materialised gradients, and
SOURCE through it against SOURCE without a projection."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.cli.main import main
from source_proj.featurize import featurize as featurize_module
from source_proj.featurize.basis import BasisPass, spread
from source_proj.methods.fit import read_curvature
from source_proj.methods.kronecker import layer_matrix
from source_proj.projection.eigen import allocate
from source_proj.projection.layers import FactoredLayer, factorable_layers
from source_proj.store.store import ckpt_key, key_step
from source_proj.tasks.gradients import PerExampleGradients
from source_proj.trajectory.recorder import Checkpoint

from .conftest import TokenModel, conv_patches, full_batch_run


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _run(tmp_path: Path, data: TensorDataset) -> tuple[Path, nn.Module]:
    run = tmp_path / "run"
    model = _mlp()
    full_batch_run(run, model, data, lambda o, y: F.cross_entropy(o, y, reduction="none"), lr=0.3, steps=4,
                   save_every=2, weight_decay=1e-3, momentum=0.9)  # fmt: skip
    return run, _mlp()


def _featurize(run: Path, model: nn.Module, data: TensorDataset, path: Path, **projection) -> sp.Store:
    return sp.featurize(
        run, model, sp.ClassificationTask(), data, path, projection=sp.ProjectionArguments(**projection), progress=False
    )


def _assert_same_source(eigen: sp.Store, exact: sp.Store, queries: TensorDataset) -> None:
    """SOURCE (projected curvature, f = 1) of the two stores gives the same scores, and not trivially zero."""
    scores = []
    for store in (eigen, exact):
        sp.fit(store, sp.FitArguments(curvature="projected", damping_factor=1.0), progress=False)
        scores.append(np.asarray(sp.Attributor(store, _mlp(), sp.ClassificationTask()).scores(queries)))
    assert np.abs(scores[1]).max() > 1e-3
    np.testing.assert_allclose(scores[0], scores[1], rtol=2e-3, atol=2e-4 * np.abs(scores[1]).max())


def _assert_basis_features(
    store: sp.Store,
    trajectory: sp.Trajectory,
    work: nn.Module,
    names: list[str],
    layers: list[FactoredLayer],
    data: TensorDataset,
) -> None:
    """The store's features at step 4 are each layer's per-example gradient matrix G in the stored basis,
    ``U_out G U_inᵀ`` (flattened, layers concatenated), from gradients taken at the final checkpoint."""
    trajectory.load_into(work, trajectory.final_checkpoint)
    grads = PerExampleGradients(work, sp.ClassificationTask(), names)(tuple(data.tensors), "loss")
    expected = []
    for i, layer in enumerate(layers):
        u_in = torch.from_numpy(np.asarray(store.read(f"projection/basis/{i}/in")))
        u_out = torch.from_numpy(np.asarray(store.read(f"projection/basis/{i}/out")))
        expected.append((u_out @ layer_matrix(grads, layer).float() @ u_in.T).flatten(1))
    features = np.asarray(store.read(f"grads/main/{ckpt_key(4)}"))
    np.testing.assert_allclose(features, torch.cat(expected, dim=1).numpy(), rtol=1e-4, atol=1e-5)


def test_allocate_takes_the_largest_gain_per_coordinate_and_stays_in_budget() -> None:
    """One layer, A eigenvalues (4, 1), B eigenvalues (3, 1), k = 2: a second B direction keeps
    (3+1)·4 = 16, a second A direction 3·(4+1) = 15, so B's is taken. A budget that fits everything
    gives every layer its whole size; every layer keeps at least one direction per side."""
    assert allocate([np.array([4.0, 1.0])], [np.array([3.0, 1.0])], 2) == [(2, 1)]
    assert allocate([np.array([1.0, 4.0][::-1])], [np.array([1.0, 3.0][::-1])], 2) == [(2, 1)]
    sizes = [(np.array([5.0, 2, 1]), np.array([3.0, 1])), (np.array([9.0, 0.1]), np.array([2.0, 2, 2]))]
    a, b = [s[0] for s in sizes], [s[1] for s in sizes]
    assert allocate(a, b, 100) == [(2, 3), (3, 2)]
    small = allocate(a, b, 5)
    assert sum(ko * ki for ko, ki in small) <= 5 and all(ko >= 1 and ki >= 1 for ko, ki in small)
    with pytest.raises(sp.TaskError, match="k ≥ the number of layers"):
        allocate(a, b, 1)


def test_full_rank_eigen_source_equals_source_without_projection(tmp_path: Path, classification_data) -> None:
    """With k ≥ p every layer keeps its whole eigenbasis: the projection is an orthogonal change of
    coordinates, under which SOURCE's projected Gauss–Newton operators (φ(PHPᵀ) = Pφ(H)Pᵀ), the
    weight decay, the damping's mean eigenvalue and every inner product are unchanged. So its scores
    equal those of the identity projection (the exact Gauss–Newton, no projection at all)."""
    run, model = _run(tmp_path, classification_data)
    p = sum(x.numel() for x in model.parameters())
    eigen = _featurize(run, model, classification_data, tmp_path / "eigen.sp", kind="eigen", dim=p + 50)
    basis = eigen.meta["projection"]["basis"]  # k above p: every layer keeps all its directions, dim = p
    assert basis["blocks"] == [[6, 5], [3, 7]] and eigen.meta["projection"]["dim"] == p
    exact = _featurize(run, model, classification_data, tmp_path / "identity.sp", kind="identity")
    _assert_same_source(eigen, exact, TensorDataset(*(t[:7] for t in classification_data.tensors)))
    # The default damping: 0.3 on the eigen projection, 1 on the others (BENCHMARKS.md, "The eigen projection").
    for store, factor in ((eigen, 0.3), (exact, 1.0)):
        sp.fit(store, sp.FitArguments(curvature="projected", method="default"), progress=False)
        assert sp.Store.open(store.path).meta["methods"]["default"]["damping_factor"] == factor


def test_truncated_basis_is_the_leading_eigenvectors_and_features_are_its_projection(
    tmp_path: Path, classification_data
) -> None:
    """At k < p: the input side of each layer's basis spans the leading eigenvectors of A averaged over
    the checkpoints (brute force over every example; the inputs do not depend on the sampled labels),
    both sides are orthonormal, and the stored features are U_Bᵀ G U_A of the materialised gradients."""
    run, model = _run(tmp_path, classification_data)
    store = _featurize(run, model, classification_data, tmp_path / "eigen.sp", kind="eigen", dim=24)
    desc = store.meta["projection"]
    blocks = desc["basis"]["blocks"]
    assert sum(ko * ki for ko, ki in blocks) <= 24 and desc["basis"]["checkpoints"] == [0, 2, 4]
    trajectory = sp.Trajectory.load(run)
    work = _mlp()
    names = [n for n, _ in work.named_parameters()]
    layers, _ = factorable_layers(work, names)
    x = classification_data.tensors[0]
    a_mean = [torch.zeros(layer.in_rows, layer.in_rows, dtype=torch.float64) for layer in layers]
    for checkpoint in trajectory.checkpoints:
        trajectory.load_into(work, checkpoint)
        inputs = [x, torch.tanh(work[0](x))]
        for i, a in enumerate(inputs):
            a1 = torch.cat([a, torch.ones(len(a), 1)], dim=1).double()
            a_mean[i] += a1.T @ a1 / len(a1) / len(trajectory.checkpoints)
    for i, (ko, ki) in enumerate(blocks):
        u_in = torch.from_numpy(np.asarray(store.read(f"projection/basis/{i}/in"))).double()
        u_out = torch.from_numpy(np.asarray(store.read(f"projection/basis/{i}/out"))).double()
        torch.testing.assert_close(u_in @ u_in.T, torch.eye(ki, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(u_out @ u_out.T, torch.eye(ko, dtype=torch.float64), atol=1e-5, rtol=0)
        _, vectors = torch.linalg.eigh(a_mean[i])
        top = vectors[:, -ki:]
        torch.testing.assert_close(u_in.T @ u_in, top @ top.T, atol=1e-4, rtol=0)
    _assert_basis_features(store, trajectory, work, names, layers, classification_data)


class _Conv3dNet(nn.Module):
    """A 3-d convolution (reflect padding, stride 2 in depth: 2 × 4 × 4 patches of a 3 × 3 × 3 volume), then a linear
    layer (one position a volume)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 2, 2, stride=(2, 1, 1), padding=1, padding_mode="reflect")
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_a_conv3d_model_takes_the_eigen_basis_and_kronecker_curvature_of_its_patches(tmp_path: Path) -> None:
    """A Conv3d is a Kronecker layer like a Conv2d (it took the Fisher diagonal and the dense part): featurize's eigen
    basis has a block for it whose input side spans the leading eigenvectors of its patches' A (brute force over every
    volume, averaged over the checkpoints), its features are U_Bᵀ G U_A of the materialised gradients, and fit's
    Kronecker curvature of it is B̄ ⊗ Ā of the exact Fisher, Ā = Σ_n Σ_t ā āᵀ / (N·T), B̄ = Σ_n Σ_c p_c Σ_t δ δᵀ / N,
    against explicit per-example loops."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 1, 3, 3, 3, generator=g), torch.randint(0, 3, (12,), generator=g))
    run = tmp_path / "run"
    full_batch_run(run, _Conv3dNet(), data, lambda o, y: F.cross_entropy(o, y, reduction="none"), lr=0.5, steps=4,
                   save_every=2)  # fmt: skip
    store = sp.featurize(
        run, _Conv3dNet(), sp.ClassificationTask(), data, tmp_path / "s.sp",
        projection=sp.ProjectionArguments(kind="eigen", dim=12, basis_positions=None, basis_layer_positions=None),
        options=sp.FeaturizeArguments(batch_size=6, chunk_rows=6, fisher="exact", curvature="kfac"), progress=False,
    )  # fmt: skip
    blocks = store.meta["projection"]["basis"]["blocks"]
    assert len(blocks) == 2 and sum(ko * ki for ko, ki in blocks) <= 12
    assert store.meta["featurize"]["kronecker"] == {
        "layers": [["conv", "conv.weight", "conv.bias", 2, 8], ["head", "head.weight", "head.bias", 3, 64]],
        "diagonal": [],
    }
    sp.fit(store, sp.FitArguments(curvature="kfac"), progress=False)
    store = sp.Store.open(tmp_path / "s.sp")
    trajectory, work = sp.Trajectory.load(run), _Conv3dNet()
    names = [n for n, _ in work.named_parameters()]
    layers, _ = factorable_layers(work, names)
    x = data.tensors[0]

    def positions(i: int, inputs: torch.Tensor) -> torch.Tensor:
        """ā of layer i at every position, ``[N·T, d_in + 1]``, float64."""
        a = conv_patches(work.conv, inputs) if i == 0 else inputs
        return torch.cat([a, torch.ones(len(a), 1)], 1).double()

    a_basis = [torch.zeros(la.in_rows, la.in_rows, dtype=torch.float64) for la in layers]
    for checkpoint in trajectory.checkpoints:  # the inputs do not depend on the sampled labels
        trajectory.load_into(work, checkpoint)
        with torch.no_grad():
            inputs = [x, torch.tanh(work.conv(x)).flatten(1)]
        for i, a in enumerate(positions(i, inputs[i]) for i in range(2)):
            a_basis[i] += a.T @ a / len(a) / len(trajectory.checkpoints)
    assert len(positions(0, x)) == 12 * 32
    for i, (_, ki) in enumerate(blocks):
        u_in = torch.from_numpy(np.asarray(store.read(f"projection/basis/{i}/in"))).double()
        top = torch.linalg.eigh(a_basis[i])[1][:, -ki:]
        torch.testing.assert_close(u_in.T @ u_in, top @ top.T, atol=1e-4, rtol=0)
    _assert_basis_features(store, trajectory, work, names, layers, data)

    fitted = read_curvature(store, "methods/source/operators/0", 0.0)
    a_fit, b_fit = torch.zeros(9, 9, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
    for key, weight in store.meta["methods"]["source"]["points"][0]:
        trajectory.load_into(work, next(c for c in trajectory.checkpoints if c.step == key_step(key)))
        a_fit += weight * positions(0, x).T @ positions(0, x) / (12 * 32)
        for n in range(len(x)):
            out = work.conv(x[n : n + 1])
            logits = work.head(torch.tanh(out).flatten(1))
            probs = torch.softmax(logits, -1).detach()[0]
            for c in range(len(probs)):
                d = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([c])), out, retain_graph=True)[0]
                d = d.flatten(2)[0].T.double()  # [positions, C_out]
                b_fit += weight * probs[c].double() * d.T @ d / len(x)
    factors = fitted.factors[0]
    ours_a = (factors.a_vectors * factors.a_values) @ factors.a_vectors.T
    ours_b = (factors.b_vectors * factors.b_values) @ factors.b_vectors.T
    product = torch.kron(b_fit, a_fit)  # only B ⊗ A is defined: a scale may move between its factors
    torch.testing.assert_close(torch.kron(ours_b, ours_a), product, rtol=1e-4, atol=1e-6 * float(product.abs().max()))
    scores = np.asarray(sp.Attributor(store, _Conv3dNet(), sp.ClassificationTask()).scores(
        TensorDataset(*(t[:3] for t in data.tensors))))  # fmt: skip
    assert scores.shape == (3, 12) and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_a_resumed_store_keeps_its_basis_and_other_data_are_refused(
    tmp_path: Path, classification_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Featurize again on the same inputs reuses the stored basis (no second estimate); other training
    data are named as such in one sentence (the store's data fingerprint), and the store is kept; with
    overwrite the basis is estimated again from the new data."""
    run, model = _run(tmp_path, classification_data)
    path = tmp_path / "eigen.sp"
    first = _featurize(run, model, classification_data, path, kind="eigen", dim=24)
    digest = first.meta["projection"]["basis"]["digest"]

    def refuse(*args, **kwargs):
        raise AssertionError("the basis was estimated again")

    with monkeypatch.context() as patch:
        patch.setattr(featurize_module, "estimate_basis", refuse)
        again = _featurize(run, model, classification_data, path, kind="eigen", dim=24)
    assert again.meta["projection"]["basis"]["digest"] == digest
    x, y = classification_data.tensors
    other = TensorDataset(x.flip(0), y.flip(0).roll(1))
    with pytest.raises(sp.TaskError, match="training data of stage 'main' are not those"):
        _featurize(run, model, other, path, kind="eigen", dim=24)
    assert sp.Store.open(path).meta["projection"]["basis"]["digest"] == digest
    replaced = sp.featurize(run, model, sp.ClassificationTask(), other, path, overwrite=True, progress=False,
                            projection=sp.ProjectionArguments(kind="eigen", dim=24))  # fmt: skip
    assert replaced.meta["projection"]["basis"]["digest"] != digest


def test_a_store_of_another_k_or_seed_is_refused_before_the_basis_pass(
    tmp_path: Path, classification_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """featurize into a store of another --dim or --seed estimated a whole basis (minutes on a large model) before
    refusing it, and named the blocks' sum (``dim 24 → 16``) where the user typed k: it is refused first, naming the
    argument as typed, and the store is kept."""
    run, model = _run(tmp_path, classification_data)
    path = tmp_path / "eigen.sp"
    digest = _featurize(run, model, classification_data, path, kind="eigen", dim=24).meta["projection"]["basis"]

    def refuse(*args, **kwargs):
        raise AssertionError("the basis was estimated before the refusal")

    with monkeypatch.context() as patch:
        patch.setattr(featurize_module, "estimate_basis", refuse)
        with pytest.raises(sp.StoreError, match=r"other settings \(dim=24 there, dim=16 here\); pass --force"):
            _featurize(run, model, classification_data, path, kind="eigen", dim=16)
        with pytest.raises(sp.StoreError, match=r"other settings \(seed=0 there, seed=5 here\); pass --force"):
            _featurize(run, model, classification_data, path, kind="eigen", dim=24, seed=5)
    assert sp.Store.open(path).meta["projection"]["basis"] == digest


def test_a_store_of_another_run_selection_or_version_is_refused_before_the_basis_pass(
    tmp_path: Path, classification_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store of another run is refused without a basis pass (its basis, of the same inputs, is read); one of this
    run (or one it grows) whose basis cannot be this featurize's, with another parameter selection or by another
    library version, was refused only after a whole basis pass (minutes on a large model): first now, with the same
    sentences, and the store is kept."""
    run, model = _run(tmp_path, classification_data)
    other = tmp_path / "other"
    full_batch_run(other, _mlp(), classification_data, lambda o, y: F.cross_entropy(o, y, reduction="none"), lr=0.1,
                   steps=4, save_every=2)  # fmt: skip
    path = tmp_path / "eigen.sp"
    digest = _featurize(run, model, classification_data, path, kind="eigen", dim=24).meta["projection"]["basis"]

    def refuse(*args, **kwargs):
        raise AssertionError("the basis was estimated before the refusal")

    def featurize(trajectory: Path, task: sp.Task | None = None, grow: bool = False, **projection):
        arguments = sp.ProjectionArguments(kind="eigen", dim=24, **projection)
        return sp.featurize(trajectory, _mlp(), task or sp.ClassificationTask(), classification_data, path, grow=grow,
                            projection=arguments, progress=False)  # fmt: skip

    head = sp.ClassificationTask(parameters=sp.ParameterSelection(exclude=("0.*",)))
    with monkeypatch.context() as patch:
        patch.setattr(featurize_module, "estimate_basis", refuse)
        with pytest.raises(sp.StoreError, match=r"from another run \(or an earlier part of this one\); pass --grow"):
            featurize(other)
        for grow in (False, True):
            with pytest.raises(sp.StoreError, match="featurized with another parameter selection: the task selects"):
                featurize(run, head, grow=grow)
        patch.setattr(featurize_module, "__version__", "0.0.1")
        with pytest.raises(sp.StoreError, match=r"featurized by source-proj \S+, this is 0\.0\.1, whose numbers"):
            featurize(run, basis_examples=16)
    assert sp.Store.open(path).meta["projection"]["basis"] == digest


def test_other_basis_or_featurize_arguments_are_refused_before_the_basis_pass_naming_them_as_given(
    tmp_path: Path, classification_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """featurize into a store of other eigen basis arguments (basis_examples, basis_positions, basis_checkpoints), or
    of another projection kind, estimated a whole basis (minutes on a large model) and was then refused as
    "projection: basis.inputs …", the digest, with the featurize options that differed (fisher, chunk_rows) by their
    recorded fields: it is refused before the pass, naming every argument that differs as given, grown, of another
    run or resumed, and the store is kept."""
    run, model = _run(tmp_path, classification_data)
    other = tmp_path / "other"
    full_batch_run(other, _mlp(), classification_data, lambda o, y: F.cross_entropy(o, y, reduction="none"), lr=0.1,
                   steps=4, save_every=2)  # fmt: skip
    path, factored = tmp_path / "eigen.sp", tmp_path / "factored.sp"
    _featurize(run, model, classification_data, path, kind="eigen", dim=24)
    _featurize(run, _mlp(), classification_data, factored, kind="factored", dim=24)
    stored = {store: sp.Store.open(store).meta for store in (path, factored)}

    def refuse(*args, **kwargs):
        raise AssertionError("the basis was estimated before the refusal")

    def featurize(trajectory: Path = run, store: Path = path, grow: bool = False, options=None, **projection):
        arguments = sp.ProjectionArguments(kind="eigen", dim=24, **projection)
        return sp.featurize(trajectory, _mlp(), sp.ClassificationTask(), classification_data, store, grow=grow,
                            projection=arguments, options=options or sp.FeaturizeArguments(), progress=False)

    examples = r"basis_examples=2048 there, basis_examples=16 here"
    with monkeypatch.context() as patch:
        patch.setattr(featurize_module, "estimate_basis", refuse)
        with pytest.raises(sp.StoreError, match=rf"featurized with other settings \({examples}\); pass --force"):
            featurize(basis_examples=16)
        with pytest.raises(sp.StoreError, match=r"other settings \(basis_positions=64 there, basis_positions=8 here; "
                           r"basis_checkpoints=None there, basis_checkpoints=2 here\)"):  # fmt: skip
            featurize(basis_positions=8, basis_checkpoints=2)
        with pytest.raises(sp.StoreError, match=r"other settings \(adam_rank=1 there, adam_rank=2 here; basis_exampl"):
            featurize(basis_examples=16, adam_rank=2)
        fisher = sp.FeaturizeArguments(fisher="empirical", chunk_rows=16)
        with pytest.raises(sp.StoreError, match=rf"\({examples}; chunk_rows=1024 there, chunk_rows=16 here; "
                           r"fisher='sampled' there, fisher='empirical' here\); pass --force"):  # fmt: skip
            featurize(basis_examples=16, options=fisher)
        with pytest.raises(sp.StoreError, match=rf"cannot grow with other settings than it was featurized with "
                           rf"\({examples}\); repeat the options"):  # fmt: skip
            featurize(basis_examples=16, grow=True)
        with pytest.raises(sp.StoreError, match=rf"from another run \(\S+\) with other settings \({examples}\)"):
            featurize(other, basis_examples=16)
        with pytest.raises(sp.StoreError, match=r"other settings \(kind='factored' there, kind='eigen' here\)"):
            featurize(store=factored)
    assert {store: sp.Store.open(store).meta for store in (path, factored)} == stored


def _eigen_featurizer(tmp_path: Path, build: Callable[[], nn.Module], data: TensorDataset) -> Callable[..., sp.Store]:
    """Two full-batch steps of ``build()`` on ``data`` (a checkpoint each), and featurize of that run into a given
    path with the eigen projection at k = 12 and the given projection arguments."""
    run = tmp_path / "run"
    full_batch_run(run, build(), data, lambda o, y: F.cross_entropy(o, y, reduction="none"), lr=0.3, steps=2,
                   save_every=1)  # fmt: skip

    def featurize(path: Path, **projection) -> sp.Store:
        return sp.featurize(run, build(), sp.ClassificationTask(), data, path, progress=False,
                            projection=sp.ProjectionArguments(kind="eigen", dim=12, **projection))  # fmt: skip

    return featurize


class _Pooled(nn.Module):
    """A Linear layer over 6 positions per example, mean-pooled, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.head = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x)).mean(1))


def test_sampled_basis_positions_are_recorded_and_a_store_of_other_positions_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A basis whose factors sampled positions records how many, in its inputs too: featurize with another
    ``basis_positions`` is refused in one sentence and keeps the store. A basis of every position (the
    ``None`` setting, and every store from before the option) is what sampling estimates: a store holding
    one is resumed with it, without a new estimate. Where no example has more positions than asked (the
    head here, an MLP's layers), nothing is sampled and nothing recorded."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 6, 3, generator=g), torch.randint(0, 4, (24,), generator=g))
    featurize = _eigen_featurizer(tmp_path, _Pooled, data)

    sampled = featurize(tmp_path / "sampled.sp", basis_positions=2)
    every = featurize(tmp_path / "every.sp", basis_positions=None)
    unsampled = featurize(tmp_path / "unsampled.sp", basis_positions=6)
    assert sampled.meta["projection"]["basis"]["positions"] == 2
    assert "positions" not in every.meta["projection"]["basis"]
    assert "positions" not in unsampled.meta["projection"]["basis"]
    digests = [s.meta["projection"]["basis"]["digest"] for s in (sampled, every, unsampled)]
    assert digests[0] != digests[1] and digests[1] == digests[2]

    def refuse(*args, **kwargs):
        raise AssertionError("the basis was estimated again")

    with monkeypatch.context() as patch:
        patch.setattr(featurize_module, "estimate_basis", refuse)
        again = featurize(tmp_path / "every.sp", basis_positions=2)
        assert again.meta["projection"]["basis"]["digest"] == digests[1]
        featurize(tmp_path / "sampled.sp", basis_positions=2)
    with pytest.raises(sp.StoreError, match=r"other settings \(basis_positions=2 there, basis_positions=3 here\)"):
        featurize(tmp_path / "sampled.sp", basis_positions=3)
    assert sp.Store.open(tmp_path / "sampled.sp").meta["projection"]["basis"]["digest"] == digests[0]
    with pytest.raises(sp.TaskError, match="basis_positions is 0; pass a whole number ≥ 1"):
        sp.ProjectionArguments(basis_positions=0)


def test_adam_full_rank_eigen_source_equals_source_without_projection(tmp_path: Path, classification_data) -> None:
    """On an AdamW run the eigen projection applies D^{-1/2} through its layer factors (here exactly:
    ``adam_rank`` above every layer's rank) before its orthogonal full-rank basis, so SOURCE's scores
    equal those of the identity projection, which scales the materialised gradients exactly."""
    run = tmp_path / "run"
    model = _mlp()
    x, y = classification_data.tensors
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=2)
    rec.begin_stage("main", dataset_size=len(y))
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step()
    rec.close()
    p = sum(t.numel() for t in model.parameters())
    eigen = _featurize(run, _mlp(), classification_data, tmp_path / "eigen.sp", kind="eigen", dim=p, adam_rank=10**6)
    exact = _featurize(run, _mlp(), classification_data, tmp_path / "identity.sp", kind="identity")
    _assert_same_source(eigen, exact, TensorDataset(x[:5], y[:5]))


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
def test_groups_at_a_rate_ratio_full_rank_eigen_source_equals_source_without_projection(
    tmp_path: Path, classification_data, optimizer: type
) -> None:
    """The first layer at 1/5 of the head's rate under one LambdaLR: its gradients are scaled by √(1/5) (and Adam's
    D^{-1/2}), through the eigen projection's layer factors, in its basis estimate too. On SGD the scale is rank one
    per layer, so the default rank applies it exactly; on AdamW a rank above every layer's makes Adam's D exact. So
    SOURCE's scores through the full-rank basis equal those of the identity projection."""
    run = tmp_path / "run"
    model = _mlp()
    x, y = classification_data.tensors
    rate = 0.3 if optimizer is torch.optim.SGD else 0.05
    opt = optimizer([{"params": model[0].parameters(), "lr": rate / 5}, {"params": model[2].parameters()}], lr=rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.8**k)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=2)
    rec.begin_stage("main", dataset_size=len(y))
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step()
        sched.step()
    rec.close()
    p = sum(t.numel() for t in model.parameters())
    rank = {} if optimizer is torch.optim.SGD else {"adam_rank": 10**6}
    eigen = _featurize(run, _mlp(), classification_data, tmp_path / "eigen.sp", kind="eigen", dim=p, **rank)
    exact = _featurize(run, _mlp(), classification_data, tmp_path / "identity.sp", kind="identity")
    _assert_same_source(eigen, exact, TensorDataset(x[:5], y[:5]))


class _Bilinear(nn.Module):
    """No nn.Linear/Conv: a bare parameter, which no Kronecker factor covers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(0.1 * torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


@pytest.mark.parametrize("adam_rank", [1, 2])
def test_a_model_without_kronecker_layers_falls_back_to_the_dense_projection(
    tmp_path: Path, classification_data, adam_rank: int
) -> None:
    """The eigen projection needs layers with Kronecker factors; without any, featurize warns in one
    sentence and uses the dense Rademacher projection, which the store records (and queries rebuild). An
    ``adam_rank`` the eigen projection took goes with it: the dense projection scales by Adam's D exactly."""
    run = tmp_path / "run"
    full_batch_run(run, _Bilinear(), classification_data, lambda o, y: F.cross_entropy(o, y, reduction="none"),
                   lr=0.3, steps=2)  # fmt: skip
    with pytest.warns(UserWarning, match="dense 'rademacher' projection instead"):
        store = _featurize(run, _Bilinear(), classification_data, tmp_path / "s.sp", kind="eigen", dim=8,
                           adam_rank=adam_rank)  # fmt: skip
    assert store.meta["projection"]["kind"] == "rademacher"
    sp.fit(store, progress=False)
    scores = sp.Attributor(store, _Bilinear(), sp.ClassificationTask()).scores(classification_data)
    assert np.isfinite(np.asarray(scores)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_rows_flags_exactly_the_examples_with_a_nan_or_an_infinity(dtype: torch.dtype) -> None:
    from source_proj.featurize.basis import finite_rows

    outputs = torch.randn(6, 4, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    outputs[1, 2, 7], outputs[3, 0, 0], outputs[4, 3, 49] = float("nan"), float("inf"), float("-inf")
    outputs[5] = torch.finfo(dtype).max  # large, but finite
    want = torch.isfinite(outputs.reshape(6, -1)).all(dim=1)
    assert want.tolist() == [True, False, True, False, False, True]
    assert torch.equal(finite_rows(outputs), want)


def test_bad_inputs_stop_the_basis_pass_in_one_sentence_before_anything_is_written(
    tmp_path: Path, classification_data
) -> None:
    """The basis pass reads the data before featurize writes anything: a NaN input is named by its
    example and checkpoint, a label out of range by the task's sentence, and no store is left."""
    run, model = _run(tmp_path, classification_data)
    x, y = (t.clone() for t in classification_data.tensors)
    x[5, 1] = float("nan")
    with pytest.raises(sp.NumericalError, match=r"output of training example 5 at checkpoint \S+step-00000000.pt"):
        _featurize(run, model, TensorDataset(x, y), tmp_path / "nan.sp", kind="eigen", dim=24)
    assert not (tmp_path / "nan.sp").exists()
    y = classification_data.tensors[1].clone()
    y[3] = 7
    with pytest.raises(sp.TaskError, match="Labels must lie"):
        _featurize(run, model, TensorDataset(classification_data.tensors[0], y), tmp_path / "y.sp", kind="eigen",
                   dim=24)  # fmt: skip
    assert not (tmp_path / "y.sp").exists()


class _Encoder(nn.Module):
    """A Linear whose weight is applied outside its forward (F.linear): no Kronecker factor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.proj = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(torch.tanh(self.enc(x)), self.proj.weight, self.proj.bias).mean(1))


def test_a_layer_the_basis_pass_cannot_factor_falls_back_to_the_dense_projection(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 5, 8, generator=g), torch.randint(0, 3, (12,), generator=g))
    full_batch_run(tmp_path / "run", _Encoder(), data, lambda o, y: F.cross_entropy(o, y, reduction="none"),
                   lr=0.1, steps=2)  # fmt: skip
    cause = r"\(Layer 'proj' took no part in the loss.*\)\. Featurize uses"
    with pytest.warns(UserWarning, match=cause):
        store = _featurize(tmp_path / "run", _Encoder(), data, tmp_path / "s.sp", dim=64)
    assert store.meta["projection"]["kind"] == "rademacher"


def test_eigh_on_an_accelerator_path_agrees_with_numpy() -> None:
    """The torch decomposition the basis uses off the CPU (here run on the CPU) gives NumPy's eigenvalues and
    eigenvectors, up to each vector's sign, on a factor with distinct eigenvalues; the CPU path is NumPy's."""
    from source_proj.projection.eigen import _torch_eigh, eigh

    g = np.random.default_rng(0)
    m = g.standard_normal((40, 40))
    factor = m @ m.T + np.diag(np.arange(40.0))
    values, vectors = np.linalg.eigh(factor)
    cpu_values, cpu_vectors = eigh(factor)
    assert np.array_equal(cpu_values, values) and np.array_equal(cpu_vectors, vectors)
    t_values, t_vectors = _torch_eigh((factor + factor.T) / 2, "cpu")
    assert np.allclose(t_values, values, rtol=1e-10, atol=1e-10 * values.max())
    signs = np.sign((t_vectors * vectors).sum(0))
    assert np.allclose(t_vectors * signs, vectors, atol=1e-8)


def _factor(side: int, seed: int, rank: int | None = None) -> np.ndarray:
    """A symmetric PSD factor in a random basis with distinct power-law eigenvalues (zero past ``rank``)."""
    g = np.random.default_rng(seed)
    q, _ = np.linalg.qr(g.standard_normal((side, side)))
    values = np.arange(1, side + 1, dtype=np.float64) ** -1.2 * (1 + 0.1 * g.random(side))
    values = np.sort(values)[::-1]
    if rank is not None:
        values[rank:] = 0.0
    return (q * values) @ q.T


def test_leading_eigh_gives_the_leading_eigenpairs_and_always_ritz_pairs() -> None:
    """Block subspace iteration run to a tolerance of 1e-12 gives NumPy's leading eigenvalues (to 1e-10) and
    eigenvectors (up to sign), at the default 1e-6 the eigenvalues to 1e-5 of the largest, on a full-rank factor, a
    rank-5 one and a zero one; a count whose 2·count reaches the side is NumPy's decomposition.
    Stopped after any number of rounds its pairs are Ritz pairs of one orthonormal basis: VᵀV = I, VᵀSV = diag."""
    from source_proj.projection.eigen import leading_eigh

    for factor, count in ((_factor(300, 0), 12), (_factor(200, 1, rank=5), 8), (_factor(120, 2), 60)):
        values, vectors = np.linalg.eigh(factor)
        values, vectors = values[::-1][:count], vectors[:, ::-1][:, :count]
        top, leading = leading_eigh(factor, count, tolerance=1e-12)
        assert top.shape == (count,) and leading.shape == (factor.shape[0], count)
        assert np.allclose(top, values, rtol=1e-10, atol=1e-12 * values[0])
        assert np.abs(leading_eigh(factor, count)[0] - values).max() <= 1e-5 * values[0]  # the default tolerance
        nonzero = values > 1e-9 * values[0]
        signs = np.sign((leading * vectors).sum(0))[nonzero]
        assert np.allclose(leading[:, nonzero] * signs, vectors[:, nonzero], atol=1e-6)
    zero_values, zero_vectors = leading_eigh(np.zeros((100, 100)), 4)
    assert np.array_equal(zero_values, np.zeros(4)) and np.allclose(zero_vectors.T @ zero_vectors, np.eye(4))
    factor = _factor(300, 3)
    for rounds in (1, 2, 5):
        top, leading = leading_eigh(factor, 10, iterations=rounds)
        assert np.allclose(leading.T @ leading, np.eye(10), atol=1e-12)
        assert np.allclose(leading.T @ factor @ leading, np.diag(top), atol=1e-12 * top[0])
    assert leading_eigh(factor, 10, iterations=1)[0][9] < np.linalg.eigvalsh(factor)[::-1][9] * (1 - 1e-6)


def test_a_basis_of_wide_factors_decomposed_in_part_is_the_whole_decomposition(monkeypatch) -> None:
    """Factors wider than ``PARTIAL_ABOVE`` give only their leading eigenpairs, ``FIRST_MODES`` at first and twice as
    many wherever the allocation took all of them: the blocks, the share of the trace kept and the subspaces
    kept are those of the whole decomposition (here with 2 modes first: the blocks need up to 8)."""
    from source_proj.projection import eigen

    a = [_factor(90, 10), _factor(70, 11), _factor(60, 12, rank=20)]
    b = [_factor(40, 13), _factor(80, 14), _factor(30, 15)]
    whole = eigen.EigenBasis.from_factors(["l0", "l1", "l2"], a, b, 160, [0], 10)
    calls: list[tuple[int, int]] = []
    leading = eigen.leading_eigh

    def counted(matrix: np.ndarray, count: int, device="cpu", **kwargs):
        calls.append((matrix.shape[0], count))
        return leading(matrix, count, device, **kwargs)

    monkeypatch.setattr(eigen, "leading_eigh", counted)
    monkeypatch.setattr(eigen, "PARTIAL_ABOVE", 50)
    monkeypatch.setattr(eigen, "FIRST_MODES", 2)
    part = eigen.EigenBasis.from_factors(["l0", "l1", "l2"], a, b, 160, [0], 10)
    assert part.blocks == whole.blocks and max(max(block) for block in whole.blocks) > 4
    assert {side for side, _ in calls} == {90, 70, 60, 80} and max(count for _, count in calls) > 2
    assert abs(part.captured - whole.captured) < 1e-6  # the iteration's tolerance
    for mine, theirs, factor in zip((*part.out, *part.inp), (*whole.out, *whole.inp), (*b, *a), strict=True):
        mine, theirs, factor = mine.double(), theirs.double(), torch.from_numpy(factor)
        assert torch.allclose(mine.T @ mine, theirs.T @ theirs, atol=1e-3)  # the same kept subspace
        kept, best = torch.trace(mine @ factor @ mine.T), torch.trace(theirs @ factor @ theirs.T)
        assert abs(kept - best) <= 1e-6 * best  # and the same share of the factor in it


def _token_data(n: int = 40, positions: int = 6) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, positions, 3, generator=g), torch.randint(0, 4, (n,), generator=g))


def _basis_pass(model: nn.Module, data, examples: int = 30, **kwargs) -> BasisPass:
    task = sp.ClassificationTask()
    names = task.select_parameters(model)
    return BasisPass(PerExampleGradients(model, task, names), task, {"main": data}, names, 12, examples=examples,
                     seed=0, batch_size=8, device=torch.device("cpu"), **kwargs)  # fmt: skip


@pytest.mark.parametrize(
    ("layer_positions", "positions", "kept"),
    [
        # inner (d_in' 4, d_out 5) and head (6, 4) both see 6 positions an example: 20 positions → ⌈20/6⌉ = 4
        (20, None, 4),
        # 4 of the 6 positions sampled per example: ⌈20/4⌉ = 5
        (20, 4, 5),
        # a budget below twice the widest side: the head's 2 × 6 = 12 positions at 2 an example → 6
        (1, 2, 6),
        # more than the 30 drawn: all of them, nothing cut
        (1000, None, 30),
    ],
)
def test_the_layers_budget_keeps_the_fewest_examples_of_the_draw_that_give_every_layer_its_positions(
    layer_positions: int, positions: int | None, kept: int
) -> None:
    """``basis_layer_positions``: of the seeded draw of ``basis_examples`` (30 here), the pass keeps its first
    examples, as few as give each layer max(budget, 2 × its widest side) positions, counted as an example's
    positions after the draw of ``positions``; the subset is that prefix of the uncut draw's order, so its
    examples are among the uncut ones, and the digest says the cut."""
    whole = _basis_pass(TokenModel(), _token_data(), positions=positions)
    cut = _basis_pass(TokenModel(), _token_data(), positions=positions, layer_positions=layer_positions)
    digest = cut.inputs_cut()  # counts the positions (a visit, or the progress bar, counts first too)
    assert len(cut.subsets["main"]) == kept
    np.testing.assert_array_equal(cut.orders["main"], whole.orders["main"][:kept])
    assert cut.subsets["main"] == sorted(whole.orders["main"][:kept].tolist())
    assert whole.inputs_cut() == [] and whole.examples == 30
    if kept < 30:
        assert digest == [["layer examples", [("main", kept)]]] and cut.examples == kept
    else:
        assert digest == [] and cut.examples == 30
    # The brute-force count: the kept examples' positions (after the draw) reach every layer's target; one fewer
    # does not reach the largest.
    taken = 6 if positions is None else min(6, positions)
    targets = [max(layer_positions, 2 * 5), max(layer_positions, 2 * 6)]
    if kept < 30:
        assert all(kept * taken >= t for t in targets) and (kept - 1) * taken < max(targets)


def test_the_layers_budget_leaves_a_one_position_model_and_the_random_state_as_they_were(
    classification_data,
) -> None:
    """An MLP gives each layer one position an example: the default budget (2,048) keeps every example drawn, so
    its basis and digest are those without the budget. The probe's forward pass leaves a model with dropout in its
    train mode and the global random state untouched."""
    mlp = _basis_pass(_mlp(), classification_data, layer_positions=2048)
    assert mlp.inputs_cut() == [] and len(mlp.subsets["main"]) == len(classification_data)
    model, task = TokenModel(dropout=0.5), sp.ClassificationTask()
    names = task.select_parameters(model)
    grads_fn = PerExampleGradients(model, task, names)  # which puts its model in eval mode
    model.train()
    state = torch.get_rng_state()
    cut = BasisPass(grads_fn, task, {"main": _token_data()}, names, 12, examples=30, seed=0, batch_size=8,
                    device=torch.device("cpu"), layer_positions=20)  # fmt: skip
    cut.bar(["main"], progress=False).close()
    assert len(cut.subsets["main"]) == 4 and model.training and model.drop.training
    assert torch.equal(torch.get_rng_state(), state)


class _ConvNet(nn.Module):
    """A 3 × 3 convolution over 6 × 6 images (16 patches an image), then a linear layer (one position an image)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(1, 2, 3), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_the_layer_with_the_fewest_positions_decides_how_many_examples_the_budget_keeps() -> None:
    """A CNN whose last layer is linear: the convolution's 16 patches an image would need ⌈80/16⌉ = 5 images for a
    budget of 80 positions, the linear layer (one position an image, 33 wide) 80; at the default budget it keeps
    every image drawn, as an MLP does."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(200, 1, 6, 6, generator=g), torch.randint(0, 3, (200,), generator=g))
    cut = _basis_pass(_ConvNet(), data, examples=150, layer_positions=80)
    assert cut.inputs_cut() == [["layer examples", [("main", 80)]]] and len(cut.subsets["main"]) == 80
    default = _basis_pass(_ConvNet(), data, examples=150, layer_positions=2048)
    assert default.inputs_cut() == [] and len(default.subsets["main"]) == 150


def test_a_store_whose_basis_visited_every_example_drawn_is_resumed_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store featurized with ``basis_layer_positions=None`` (as every store before the option) holds the basis
    that the budget's cut estimates: featurize with the budget resumes it, without a new estimate. A store of the
    cut records the examples it kept, and its digest differs from the uncut store's."""
    featurize = _eigen_featurizer(tmp_path, TokenModel, _token_data())

    whole = featurize(tmp_path / "whole.sp", basis_layer_positions=None)
    cut = featurize(tmp_path / "cut.sp", basis_layer_positions=20)
    assert whole.meta["projection"]["basis"]["examples"] == 2048  # at most this many: all 40
    assert cut.meta["projection"]["basis"]["examples"] == 4
    info = CliRunner().invoke(main, ["info", str(tmp_path / "cut.sp")])
    assert info.exit_code == 0 and "(at most 4 examples of each stage at each)" in info.output, info.output
    assert cut.meta["projection"]["basis"]["digest"] != whole.meta["projection"]["basis"]["digest"]

    def refuse(*args, **kwargs):
        raise AssertionError("the basis was estimated again")

    with monkeypatch.context() as patch:
        patch.setattr(featurize_module, "estimate_basis", refuse)
        again = featurize(tmp_path / "whole.sp", basis_layer_positions=20)
        assert again.meta["projection"]["basis"] == whole.meta["projection"]["basis"]
        featurize(tmp_path / "cut.sp", basis_layer_positions=20)
    with pytest.raises(sp.StoreError, match=r"\(basis_layer_positions=20 there, basis_layer_positions=30 here\)"):
        featurize(tmp_path / "cut.sp", basis_layer_positions=30)
    with pytest.raises(sp.TaskError, match="basis_layer_positions is 0; pass a whole number ≥ 1"):
        sp.ProjectionArguments(basis_layer_positions=0)


def test_spread_keeps_the_first_and_the_last_evenly_spaced() -> None:
    checkpoints = [Checkpoint(step, f"c{step}", "", False) for step in range(0, 19)]
    assert [c.step for c in spread(checkpoints, 4)] == [0, 6, 12, 18]
    assert [c.step for c in spread(checkpoints, 2)] == [0, 18]
    assert [c.step for c in spread(checkpoints, 1)] == [18]  # the final weights, where queries are taken
    assert spread(checkpoints[:3], 4) == checkpoints[:3]


def test_a_basis_of_some_checkpoints_is_the_basis_of_a_store_of_only_those(tmp_path: Path) -> None:
    """``basis_checkpoints=2`` on a run of checkpoints 0, 2, 4: the basis averages checkpoints 0 and 4 only, as a
    store that featurizes those two alone does (its rows still come from every checkpoint)."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g))
    run, model = _run(tmp_path, data)
    some = _featurize(run, model, data, tmp_path / "some.sp", dim=16, basis_checkpoints=2)
    assert some.meta["projection"]["basis"]["checkpoints"] == [0, 4]
    assert some.has(f"grads/main/{ckpt_key(2)}")
    two = sp.featurize(run, _mlp(), sp.ClassificationTask(), data, tmp_path / "two.sp",
                       projection=sp.ProjectionArguments(dim=16),
                       options=sp.FeaturizeArguments(checkpoint_steps=(0,)), progress=False)  # fmt: skip
    assert two.meta["projection"]["basis"]["checkpoints"] == [0, 4]
    every = _featurize(run, _mlp(), data, tmp_path / "every.sp", dim=16)
    assert every.meta["projection"]["basis"]["checkpoints"] == [0, 2, 4]
    layers = range(len(some.meta["projection"]["basis"]["modules"]))
    for name in (f"projection/basis/{i}/{side}" for i in layers for side in ("out", "in")):
        np.testing.assert_array_equal(some.read(name), two.read(name))
    assert not all(np.array_equal(some.read(f"projection/basis/{i}/in"), every.read(f"projection/basis/{i}/in"))
                   for i in layers)  # fmt: skip
    with pytest.raises(sp.TaskError, match="basis_checkpoints"):
        sp.ProjectionArguments(basis_checkpoints=0)
