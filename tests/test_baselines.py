"""Every baseline equals its textbook formula computed by brute force on the full parameters.

With the identity projection the engine works on the full gradients, so the only gap is float32
storage. The brute force never touches the engine: per-example gradients, the Gauss–Newton matrix,
probabilities and hidden activations are computed here from scratch in float64.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.methods import baselines

from .conftest import full_batch_run

LR, STEPS, EVERY = 0.5, 12, 4


def _arch() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, TensorDataset, TensorDataset]:
    tmp = tmp_path_factory.mktemp("baselines")
    train, queries = _data(80, 0), _data(6, 1)
    ce = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    full_batch_run(tmp / "run", _arch(), train, ce, lr=LR, steps=STEPS, save_every=EVERY)
    store = sp.featurize(
        tmp / "run",
        _arch(),
        sp.ClassificationTask(),
        train,
        tmp / "s.sp",
        projection=sp.ProjectionArguments(kind="identity"),
        options=sp.FeaturizeArguments(batch_size=16, chunk_rows=32, fisher="exact"),
        progress=False,
    )
    dim = store.meta["projection"]["dim"]  # every coordinate: the textbook formulas below use the full kernel
    for kind in sp.BASELINES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TRAK's near-singular full kernel, on purpose
            sp.fit_baseline(
                store,
                sp.BaselineArguments(kind=kind, trak_dim=dim),
                model=_arch(),
                task=sp.ClassificationTask(),
                train_data=train,
                progress=False,
            )
    return tmp / "run", tmp / "s.sp", train, queries


def _flat(net: nn.Module) -> tuple[torch.Tensor, callable]:
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    theta = torch.cat([p.detach().double().reshape(-1) for p in net.parameters()])

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    return theta, unflat


class Brute:
    """Full-parameter float64 quantities at one checkpoint."""

    def __init__(self, run: Path, step: int, train: TensorDataset, queries: TensorDataset) -> None:
        traj = sp.Trajectory.load(run)
        net = _arch()
        traj.load_into(net, next(c for c in traj.checkpoints if c.step == step))
        self.net = net.double()
        theta, unflat = _flat(self.net)
        x, y = train.tensors[0].double(), train.tensors[1]
        qx, qy = queries.tensors[0].double(), queries.tensors[1]

        def logits(v: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
            return functional_call(self.net, unflat(v), (xi[None],))[0]

        def loss(v, xi, yi):
            return F.cross_entropy(logits(v, xi)[None], yi[None])

        def margin(v, xi, yi):
            out = logits(v, xi)
            label = torch.arange(3) == yi
            return (out * label).sum() - torch.logsumexp(out.masked_fill(label, -torch.inf), 0)

        self.g = vmap(grad(loss), in_dims=(None, 0, 0))(theta, x, y)  # [N, p]
        self.q = vmap(grad(margin), in_dims=(None, 0, 0))(theta, qx, qy)  # [Q, p]
        self.phi = vmap(grad(margin), in_dims=(None, 0, 0))(theta, x, y)  # [N, p]
        jac = vmap(jacrev(logits), in_dims=(None, 0))(theta, x)  # [N, C, p]
        probs = torch.softmax(vmap(logits, in_dims=(None, 0))(theta, x), -1)
        self.p_label = probs.gather(1, y[:, None]).squeeze(1)
        lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        self.gauss_newton = torch.einsum("ncp,ncd,ndq->pq", jac, lam, jac) / len(y)
        with torch.no_grad():
            self.h_train = torch.tanh(self.net[0](x))
            self.h_query = torch.tanh(self.net[0](qx))


def _engine(run: Path, store: Path, queries: TensorDataset, method: str) -> np.ndarray:
    return sp.Attributor(store, _arch(), sp.ClassificationTask(), method=method).scores(queries)


def _close(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())


def test_grad_dot_is_minus_the_final_gradient_inner_product(fitted) -> None:
    run, store, train, queries = fitted
    b = Brute(run, STEPS, train, queries)
    _close(_engine(run, store, queries, "grad-dot"), -(b.q @ b.g.T).numpy())


def test_grad_cos_is_minus_the_cosine_of_the_final_gradients(fitted) -> None:
    run, store, train, queries = fitted
    b = Brute(run, STEPS, train, queries)
    expected = -(F.normalize(b.q, dim=1) @ F.normalize(b.g, dim=1).T).numpy()
    _close(_engine(run, store, queries, "grad-cos"), expected)


def test_tracin_sums_learning_rate_weighted_gradient_products_over_checkpoints(fitted) -> None:
    run, store, train, queries = fitted
    expected = 0
    for step in (4, 8, 12):  # checkpoints saved during training; each stands for EVERY steps at LR
        b = Brute(run, step, train, queries)
        expected = expected - (LR * EVERY / len(train)) * (b.q @ b.g.T)
    _close(_engine(run, store, queries, "tracin"), expected.numpy())


def test_influence_function_uses_the_damped_gauss_newton_at_the_final_checkpoint(fitted) -> None:
    run, store, train, queries = fitted
    b = Brute(run, STEPS, train, queries)
    h = b.gauss_newton
    damping = 3.0 * float(torch.linalg.eigvalsh(h).clamp_min(0).mean())
    inverse = torch.linalg.inv(h + damping * torch.eye(len(h), dtype=torch.float64))
    expected = -(b.q @ inverse @ b.g.T / len(train)).numpy()
    _close(_engine(run, store, queries, "if"), expected)
    assert sp.Store.open(store).meta["methods"]["if"]["damping"] == pytest.approx(damping, rel=1e-4)


def test_an_absolute_damping_replaces_the_damping_factor_and_zero_is_the_pseudo_inverse(fitted) -> None:
    """``damping`` δ is added as given (kronfluence's ``damping_factor``), whatever ``damping_factor`` says; δ = 0 is
    the pseudo-inverse, eigenvalues below rcond × the largest dropped."""
    run, store, train, queries = fitted
    b = Brute(run, STEPS, train, queries)
    h = b.gauss_newton
    for damping in (0.05, 0.0):
        method = f"if-{damping}"
        sp.fit_baseline(store, sp.BaselineArguments(kind="if", method=method, damping=damping), progress=False)
        assert sp.Store.open(store).meta["methods"][method]["damping"] == damping
        inverse = torch.linalg.pinv(h + damping * torch.eye(len(h), dtype=torch.float64), hermitian=True, rtol=1e-6)
        _close(_engine(run, store, queries, method), -(b.q @ inverse @ b.g.T / len(train)).numpy())

def test_trak_is_the_margin_gauss_newton_estimator_with_its_one_minus_p_weights(fitted) -> None:
    run, store, train, queries = fitted
    b = Brute(run, STEPS, train, queries)
    # TRAK (Park et al. 2023): φ(q)ᵀ (ΦᵀΦ)⁻¹ Φᵀ diag(1 − p), φ = margin gradient, p = probability of the label.
    # The margin ignores a shift of all logits, so ΦᵀΦ is singular along the output layer's shift
    # directions (to which every gradient is orthogonal): the inverse is the pseudo-inverse.
    gram = b.phi.T @ b.phi
    assert torch.linalg.matrix_rank(gram, hermitian=True) < len(gram)
    inverse = torch.linalg.pinv(gram, hermitian=True, rtol=1e-10)
    expected = (b.q @ inverse @ (b.phi * (1 - b.p_label)[:, None]).T).numpy()
    _close(_engine(run, store, queries, "trak"), expected)


def test_trak_fits_its_kernel_on_a_tenth_of_n_coordinates_and_warns_near_singular_choices(fitted) -> None:
    _, store, _, _ = fitted
    n, dim = 80, sp.Store.open(store).meta["projection"]["dim"]
    assert dim > n // 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default choice is silent
        sp.fit_baseline(store, sp.BaselineArguments(kind="trak", method="trak-default"), progress=False)
    assert sp.Store.open(store).meta["methods"]["trak-default"]["trak_dim"] == n // 10
    with pytest.warns(UserWarning, match="near-singular"):
        sp.fit_baseline(store, sp.BaselineArguments(kind="trak", method="trak-41", trak_dim=41), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.fit_baseline(store, sp.BaselineArguments(kind="trak", method="trak-40", trak_dim=40), progress=False)
    assert sp.Store.open(store).meta["methods"]["trak-40"]["trak_dim"] == 40


def test_trak_on_d_coordinates_is_trak_with_a_d_dimensional_sub_projection(fitted) -> None:
    run, store, train, queries = fitted
    b = Brute(run, STEPS, train, queries)
    d = 8
    sp.fit_baseline(store, sp.BaselineArguments(kind="trak", method="trak-8", trak_dim=d), progress=False)
    k = sp.Store.open(store).meta["projection"]["dim"]
    r = torch.randn(k, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    phi, q, g = b.phi @ r, b.q @ r, (b.phi * (1 - b.p_label)[:, None]) @ r
    expected = (q @ torch.linalg.pinv(phi.T @ phi, hermitian=True, rtol=1e-10) @ g.T).numpy()
    _close(_engine(run, store, queries, "trak-8"), expected)


def test_repsim_is_the_cosine_of_the_last_hidden_activations(fitted) -> None:
    run, store, train, queries = fitted
    b = Brute(run, STEPS, train, queries)
    expected = (F.normalize(b.h_query, dim=1) @ F.normalize(b.h_train, dim=1).T).numpy()
    _close(_engine(run, store, queries, "repsim"), expected)


def test_repsim_of_a_task_measuring_an_error_is_minus_the_cosine(tmp_path: Path) -> None:
    """A regression's measurement is its error, so a positive score means z raised it (docs/concepts/scores.md):
    RepSim's similar examples, which it takes to help, score negative there, as a language model's do."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=g)
    train = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 0.0]))
    queries = TensorDataset(torch.randn(3, 4, generator=g), torch.zeros(3))
    task = sp.RegressionTask()

    def arch() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))

    squared = lambda o, t: (o.squeeze(-1) - t) ** 2  # noqa: E731
    full_batch_run(tmp_path / "run", arch(), train, squared, lr=0.1, steps=4, save_every=2)
    sp.featurize(tmp_path / "run", arch(), task, train, tmp_path / "s.sp",
                 projection=sp.ProjectionArguments(kind="identity"),
                 options=sp.FeaturizeArguments(batch_size=10, chunk_rows=10), progress=False)  # fmt: skip
    sp.fit_baseline(tmp_path / "s.sp", sp.BaselineArguments(kind="repsim"), model=arch(), task=task, train_data=train,
                    progress=False)  # fmt: skip
    net = arch()
    sp.Trajectory.load(tmp_path / "run").load_into(net, sp.Trajectory.load(tmp_path / "run").final_checkpoint)
    with torch.no_grad():
        h_train, h_query = torch.tanh(net[0](train.tensors[0])), torch.tanh(net[0](queries.tensors[0]))
    expected = -(F.normalize(h_query, dim=1) @ F.normalize(h_train, dim=1).T).numpy()
    _close(sp.Attributor(tmp_path / "s.sp", arch(), task, method="repsim").scores(queries), expected)


def test_an_ensemble_averages_the_scores_of_its_models_and_its_top_k_is_exact(fitted, tmp_path: Path) -> None:
    run, store, train, queries = fitted
    ce = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    full_batch_run(tmp_path / "run2", other, train, ce, lr=LR, steps=STEPS, save_every=EVERY)
    second = sp.featurize(
        tmp_path / "run2",
        _arch(),
        sp.ClassificationTask(),
        train,
        tmp_path / "s2.sp",
        projection=sp.ProjectionArguments(kind="identity"),
        options=sp.FeaturizeArguments(batch_size=16, chunk_rows=32, fisher="exact"),
        progress=False,
    )
    sp.fit(second, progress=False)
    sp.fit(sp.Store.open(store, writable=True), progress=False)
    singles = [_engine(r, s, queries, "source") for r, s in ((run, store), (tmp_path / "run2", tmp_path / "s2.sp"))]
    ensemble = sp.Ensemble.open([store, second], _arch(), sp.ClassificationTask())
    scores = ensemble.scores(queries)
    np.testing.assert_allclose(scores, (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-7)
    assert not np.allclose(singles[0], singles[1], rtol=0.05)  # the two models really differ
    top = ensemble.top_k(queries, 5)
    np.testing.assert_array_equal(top.helpful_ids, np.argsort(-scores, axis=1, kind="stable")[:, :5])
    for attributor in ensemble.attributors:  # a k beyond the rows is refused before any query gradient
        attributor.query_features = None  # type: ignore[assignment,method-assign]
    rows = scores.shape[1]
    with pytest.raises(sp.TaskError, match=rf"^top-k {rows + 1} is not between 1 and the {rows} training examples"):
        ensemble.top_k(queries, rows + 1)
    sp.fit(second, sp.FitArguments(damping_factor=0.5), overwrite=True, progress=False)  # refitted otherwise
    with pytest.raises(sp.StoreError, match=r"s2\.sp changed since this Attributor was made"):
        ensemble.train_features()  # they were the new fit's, silently, next to the old query recipe


def test_an_ensemble_refuses_one_model_counted_twice(fitted, tmp_path: Path) -> None:
    _, store, _, _ = fitted
    arch, task = _arch(), sp.ClassificationTask()
    once = r"^The ensemble is given the store .*s\.sp twice; .*pass each model's store once\.$"
    with pytest.raises(sp.StoreError, match=once):
        sp.Ensemble.open([store, store], arch, task, method="grad-dot")
    alias = tmp_path / "alias.sp"
    alias.symlink_to(store, target_is_directory=True)  # another spelling of the same directory
    with pytest.raises(sp.StoreError, match=r"twice \(as .*s\.sp and .*alias\.sp\)"):
        sp.Ensemble.open([store, str(alias)], arch, task, method="grad-dot")
    copy = tmp_path / "copy.sp"  # another directory, the same training run
    shutil.copytree(store, copy)
    same_run = r"^The ensemble's stores .*s\.sp and .*copy\.sp were featurized from the same training run"
    with pytest.raises(sp.StoreError, match=same_run):
        sp.Ensemble.open([store, copy], arch, task, method="grad-dot")
    with pytest.raises(sp.StoreError, match="same training run"):  # built from attributors, the same refusal
        sp.Ensemble([sp.Attributor(s, arch, task, method="grad-dot") for s in (store, copy)])


def test_repsim_without_a_model_an_unknown_kind_and_a_curvature_too_wide_are_refused(
    fitted, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, store, _, _ = fitted
    with pytest.raises(sp.TaskError, match="needs model"):
        sp.fit_baseline(store, sp.BaselineArguments(kind="repsim", method="r2"), progress=False)
    with pytest.raises(sp.TaskError, match=r"^BaselineArguments\.kind is 'datamodels'; use one of trak, if"):
        sp.BaselineArguments(kind="datamodels")
    # IF and TRAK invert a k × k matrix: on exact gradients of a wide model (k = p) that cannot fit
    k = sp.Store.open(store).meta["projection"]["dim"]
    monkeypatch.setattr(baselines, "PROJECTED_MAX", k - 1)
    for kind in ("if", "trak"):
        with pytest.raises(sp.TaskError, match=f"{kind.upper()} inverts a k × k curvature, too large at k = {k}"):
            sp.fit_baseline(store, sp.BaselineArguments(kind=kind, method=f"{kind}-wide"), progress=False)


def test_a_baseline_fits_into_a_store_opened_for_reading_as_fit_does(fitted, tmp_path: Path) -> None:
    """`sp.Store.open(path)` opens for reading; `sp.fit` takes such a store, and `fit_baseline` stopped on zarr's
    "store was opened in read-only mode" ValueError. It fits, and equals the baseline fitted from the path."""
    _, store, _, queries = fitted
    copy = tmp_path / "copy.sp"
    shutil.copytree(store, copy)
    opened = sp.Store.open(copy)
    returned = sp.fit_baseline(opened, sp.BaselineArguments(kind="grad-dot", method="gd"), progress=False)
    assert returned is opened and opened.meta["methods"]["gd"]["kind"] == "grad-dot"  # refreshed, as fit's
    scores = sp.Attributor(opened, _arch(), sp.ClassificationTask(), method="gd").scores(queries)
    np.testing.assert_array_equal(scores, _engine(store, store, queries, "grad-dot"))


def test_tracin_under_momentum_predicts_the_change_of_the_measurement_in_its_units(tmp_path: Path) -> None:
    """Barely trained (η̄K·σ ≪ 1), TracIn-CP with a checkpoint at every step is the counterfactual derivative
    ∂f(q; θ_T)/∂w_z computed through heavy-ball SGD (β = 0.5), in the measurement's units as SOURCE's
    (docs/concepts/scores.md): each step moves the weights by η/(1−β) times the gradient, not η."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g)
    train = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(12, generator=g))
    queries = TensorDataset(torch.randn(4, 3, generator=g), torch.full((4,), -100.0))  # f = ŷ + 100: linear in θ
    lr, beta, steps = 1e-4, 0.5, 60
    torch.manual_seed(0)
    full_batch_run(tmp_path / "run", nn.Linear(3, 1), train, lambda o, t: (o.squeeze(-1) - t) ** 2, lr=lr,
                   steps=steps, momentum=beta)  # fmt: skip
    sp.featurize(tmp_path / "run", nn.Linear(3, 1), sp.RegressionTask(), train, tmp_path / "s.sp",
                 projection=sp.ProjectionArguments(kind="identity"),
                 options=sp.FeaturizeArguments(batch_size=12, chunk_rows=12), progress=False)  # fmt: skip
    sp.fit_baseline(tmp_path / "s.sp", sp.BaselineArguments(kind="tracin"), progress=False)
    ours = sp.Attributor(tmp_path / "s.sp", nn.Linear(3, 1), sp.RegressionTask(), method="tracin").scores(queries)

    torch.manual_seed(0)
    net = nn.Linear(3, 1).double()
    start = {n: p.detach() for n, p in net.named_parameters()}
    xd, yd, qx = x.double(), train.tensors[1].double(), queries.tensors[0].double()

    def final(w: torch.Tensor) -> torch.Tensor:  # torch's SGD: v ← βv + g (v = g at the first step), θ ← θ − ηv
        theta, velocity = dict(start), None
        for _ in range(steps):
            step = grad(lambda t: (w * (functional_call(net, t, (xd,)).squeeze(-1) - yd) ** 2).mean())(theta)
            velocity = step if velocity is None else {n: beta * velocity[n] + step[n] for n in theta}
            theta = {n: theta[n] - lr * velocity[n] for n in theta}
        return functional_call(net, theta, (qx,)).squeeze(-1) + 100.0

    exact = jacrev(final)(torch.ones(len(yd), dtype=torch.float64)).numpy()
    # TracIn-CP leaves out the curvature (the exact derivative is about ηKσ/(2(1−β)) ≤ 4 % smaller here) and the last
    # steps' momentum, which has not built up by the end (Σ_t β^{K−t}/K ≈ β/((1−β)K) = 1/60); with η alone: 0.52
    scale = float((ours * exact).sum() / (exact * exact).sum())
    assert 0.95 < scale < 1.06, scale


def test_repsim_refuses_training_data_other_than_the_stores(fitted, tmp_path: Path) -> None:
    """RepSim reads the training examples again; other examples of the store's size were scored as its rows."""
    _, store, train, _ = fitted
    copy = tmp_path / "copy.sp"
    shutil.copytree(store, copy)
    other = _data(len(train), 7)
    with pytest.raises(sp.TaskError, match=r"^The training data of stage 'main' are not those the store at .* was"):
        sp.fit_baseline(copy, sp.BaselineArguments(kind="repsim", method="r2"), model=_arch(),
                        task=sp.ClassificationTask(), train_data=other, progress=False)  # fmt: skip
    assert "r2" not in sp.Store.open(copy).meta["methods"]


def test_a_baseline_refitted_with_other_settings_names_baseline_arguments(fitted, tmp_path: Path) -> None:
    _, store, _, _ = fitted
    copy = tmp_path / "copy.sp"
    shutil.copytree(store, copy)
    with pytest.raises(sp.StoreError, match=r"another --method name \(BaselineArguments\(method=\.\.\.\)\)\.$"):
        sp.fit_baseline(copy, sp.BaselineArguments(kind="if", damping=0.5), progress=False)
