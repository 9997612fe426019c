"""SOURCE's fit against SOURCE_MATH's formulas computed by brute force, across its options: several segments of
unequal lengths under a learning-rate schedule, heavy-ball momentum and weight decay, a segment of one checkpoint,
two stages with their own data and optimizers, each damping, both averages and Fast-SOURCE.

The identity projection keeps every coordinate, so the engine's k × k curvature is the p × p Gauss–Newton and the
only gap to the float64 brute force here is float32 storage. The brute force never touches the engine: per-example
gradients, the exact Fisher, the segments' weights and the matrix functions are computed from scratch.
"""

from __future__ import annotations

import itertools
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.store.store import ckpt_key

from .conftest import step_weights_by_hand

CLASSES = 3


def _arch() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, CLASSES))


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


QUERIES = _data(5, 99)


def _schedule(step: int) -> float:
    """A warm-up over 3 steps, then a decay at every step: no two neighbouring steps share a rate."""
    return (step + 1) / 3 if step < 3 else 0.9 ** (step - 2)


def _train(
    run: Path,
    stages: list[tuple[str, TensorDataset, dict, int]],
    save_every: int,
    optimizer: type = torch.optim.SGD,
    ratio: float = 1.0,
) -> None:
    """Full-batch training through ``stages`` (name, data, optimizer settings, steps), each with its own optimizer
    and the warm-up-and-decay schedule; the first layer at ``ratio`` times the settings' rate (a group of its own)."""
    model = _arch()
    rec = None
    for name, data, settings, steps in stages:
        groups = [{"params": model[0].parameters(), "lr": ratio * settings["lr"]}, {"params": model[2].parameters()}]
        opt = optimizer(groups, **settings)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule)
        if rec is None:
            rec = sp.TrajectoryRecorder(run, model, opt, save_every=save_every)
            rec.begin_stage(name, dataset_size=len(data))
        else:
            rec.begin_stage(name, dataset_size=len(data), optimizer=opt)
        x, y = data.tensors
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            rec.step()
            sched.step()
    assert rec is not None
    rec.close()


class _Flat:
    """The architecture as a function of one flat float64 parameter vector."""

    def __init__(self) -> None:
        self.net = _arch().double()
        self.names = [n for n, _ in self.net.named_parameters()]
        self.shapes = [p.shape for p in self.net.parameters()]

    def flat(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[n].double().reshape(-1) for n in self.names])

    def unflat(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes, strict=True):
            out[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def logits(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, self.unflat(v), (x[None],))[0]

    def loss_grads(self, v: torch.Tensor, data: TensorDataset) -> torch.Tensor:
        """∇ℓ(z_i; θ) of every example, ``[N, p]``."""
        x, y = data.tensors[0].double(), data.tensors[1]
        return vmap(grad(lambda v, xi, yi: F.cross_entropy(self.logits(v, xi)[None], yi[None])), in_dims=(None, 0, 0))(
            v, x, y
        )

    def gauss_newton(self, v: torch.Tensor, data: TensorDataset) -> torch.Tensor:
        """(1/N) Σ_i J_iᵀ (diag p − ppᵀ) J_i: the exact Fisher of the mean cross-entropy, ``[p, p]``."""
        x = data.tensors[0].double()
        jac = vmap(jacrev(self.logits), in_dims=(None, 0))(v, x)
        probs = torch.softmax(vmap(self.logits, in_dims=(None, 0))(v, x), -1)
        lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        return torch.einsum("ncp,ncd,ndq->pq", jac, lam, jac) / len(x)

    def margins(self, v: torch.Tensor, queries: TensorDataset) -> torch.Tensor:
        """∇f(q; θ) of the margin of every query, ``[Q, p]``."""

        def margin(v, xi, yi):
            out = self.logits(v, xi)
            label = torch.arange(CLASSES) == yi
            return (out * label).sum() - torch.logsumexp(out.masked_fill(label, -torch.inf), 0)

        return vmap(grad(margin), in_dims=(None, 0, 0))(v, queries.tensors[0].double(), queries.tensors[1])


def _brute_source(
    run: Path,
    datasets: dict[str, TensorDataset],
    segments: list[tuple[str, int, int, dict[int, float]]],
    lr: np.ndarray,
    factors: dict[str, tuple[float, float]],
    damping_factor: float,
    attributed: tuple[str, ...],
    fast: bool = False,
    empirical: bool = False,
    scale: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """SOURCE_MATH §3 by hand: ``segments`` are (stage, start, end, {checkpoint step: weight}); ``factors`` each
    stage's (momentum factor 1/(1−β), weight decay λ); ``lr`` the rate of every step. Returns the scores of
    ``QUERIES`` per attributed stage. ``scale``: s = r^{1/2} per coordinate, where the groups train at rates r·η:
    SOURCE in u = θ/s, whose gradients (training and query) are s ⊙ ∇_θ and whose curvature is diag(s) H diag(s).

    Fast-SOURCE takes the segment's gradients and curvature at its weighted mean parameters instead; the empirical
    Fisher is (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ at the observed labels."""
    traj = sp.Trajectory.load(run)
    f = _Flat()
    theta = {c.step: f.flat(traj.load_into(_arch(), c).state_dict()) for c in traj.checkpoints}
    ops = []
    for stage, start, end, weights in segments:
        data = datasets[stage]
        momentum_factor, decay = factors[stage]
        time = momentum_factor * float(np.mean(lr[start:end])) * (end - start)
        if fast:
            mean = sum(w * theta[s] for s, w in weights.items())
            points = {0: (mean, 1.0)}
        else:
            points = {s: (theta[s], w) for s, w in weights.items()}
        if empirical:
            h = sum(w * f.loss_grads(v, data).T @ f.loss_grads(v, data) / len(data) for v, w in points.values())
        else:
            h = sum(w * f.gauss_newton(v, data) for v, w in points.values())
        g = sum(w * f.loss_grads(v, data) for v, w in points.values())
        if scale is not None:
            h, g = scale[:, None] * h * scale[None, :], g * scale
        p = len(h)
        lam = decay + damping_factor * float(torch.linalg.eigvalsh(h).clamp_min(0).mean())
        damped = h + lam * torch.eye(p, dtype=torch.float64)
        survive = torch.linalg.matrix_exp(-time * damped)
        response = (torch.eye(p, dtype=torch.float64) - survive) @ torch.linalg.inv(damped)
        ops.append((stage, survive, response, g, len(data)))
    q = f.margins(theta[max(theta)], QUERIES) * (1.0 if scale is None else scale)
    out = {}
    for stage in attributed:
        total = 0
        for i, (own, _, response, g, n) in enumerate(ops):
            if own != stage:
                continue
            later = torch.eye(len(response), dtype=torch.float64)
            for _, survive, *_ in ops[i + 1 :]:
                later = survive @ later
            total = total + (later @ response @ g.T) / n  # Δθ_T(z), [p, N]
        out[stage] = -(q @ total).numpy()
    return out


def _featurize(run: Path, store: Path, datasets: dict[str, TensorDataset], fisher: str = "exact", **options) -> None:
    """``run`` featurized into ``store`` on the identity projection (every coordinate)."""
    sp.featurize(
        run,
        _arch(),
        sp.ClassificationTask(),
        datasets if len(datasets) > 1 else next(iter(datasets.values())),
        store,
        projection=sp.ProjectionArguments(kind="identity"),
        options=sp.FeaturizeArguments(batch_size=5, chunk_rows=10, fisher=fisher, **options),
        progress=False,
    )


Featurized = Callable[[Path, Path, dict[str, TensorDataset]], None]


@pytest.fixture(scope="module")
def featurized(tmp_path_factory: pytest.TempPathFactory) -> Featurized:
    """``copy(run, store, datasets)``: ``run`` featurized with :func:`_featurize`'s defaults, copied into ``store``;
    each run is featurized once for the module (the tests that only fit it with other settings share it)."""
    cache: dict[Path, Path] = {}

    def copy(run: Path, store: Path, datasets: dict[str, TensorDataset]) -> None:
        if run not in cache:
            cache[run] = tmp_path_factory.mktemp("featurized") / "s.sp"
            _featurize(run, cache[run], datasets)
        shutil.copytree(cache[run], store)

    return copy


def _engine(run: Path, store: Path, datasets: dict[str, TensorDataset], args, fisher: str = "exact", **options) -> dict:
    """The scores of ``QUERIES`` per attributed stage, of SOURCE (``args``: FitArguments) or of a baseline
    (BaselineArguments); ``run`` is featurized into ``store`` unless ``store`` exists."""
    if not (store / "zarr.json").exists():
        _featurize(run, store, datasets, fisher, **options)
    if isinstance(args, sp.FitArguments):
        sp.fit(store, args, progress=False)
        method = args.name
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TRAK's full kernel is near-singular, on purpose
            sp.fit_baseline(store, args, progress=False)
        method = args.method or args.kind
    scores = sp.Attributor(store, _arch(), sp.ClassificationTask(), method=method).scores(QUERIES)
    stores = sp.Store.open(store)
    rows = {}
    column = 0
    for stage in stores.meta["methods"][method]["stages"]:
        n = len(datasets[stage])
        rows[stage] = scores[:, column : column + n]
        column += n
    assert column == scores.shape[1]
    return rows


def _close(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


ONE = {"main": _data(20, 0)}
ONE_SETTINGS = {"lr": 0.4, "momentum": 0.5, "weight_decay": 0.02}
ONE_STEPS, ONE_EVERY = 13, 3  # checkpoints 0, 3, 6, 9, 12 and the stage's closing 13


@pytest.fixture(scope="module")
def one_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    _train(run, [("main", ONE["main"], ONE_SETTINGS, ONE_STEPS)], ONE_EVERY)
    return run


@pytest.mark.parametrize("average", ["steps", "checkpoints"])
@pytest.mark.parametrize("damping_factor", [0.0, 0.5, None])
def test_unequal_segments_under_a_schedule_with_momentum_and_decay_equal_the_formula(
    tmp_path: Path, one_stage: Path, featurized: Featurized, average: str, damping_factor: float | None
) -> None:
    """Cuts at 5 and 9: segments [0, 5) (checkpoints 0, 3), [4 steps of] [5, 9) (checkpoint 6 only) and [9, 13)
    (9, 12); the rate changes at every step; λ = the decay + the damping factor × the mean eigenvalue (default 1
    on the identity projection)."""
    store = tmp_path / f"s-{average}-{damping_factor}.sp"
    featurized(one_stage, store, ONE)
    args = sp.FitArguments(boundaries=(5, 9), damping_factor=damping_factor, average=average)
    ours = _engine(one_stage, store, ONE, args)
    lr = np.array([ONE_SETTINGS["lr"] * _schedule(k) for k in range(ONE_STEPS)])
    steps = (0, 3, 6, 9, 12, 13)
    segments = []
    for start, end, own in ((0, 5, (0, 3)), (5, 9, (6,)), (9, 13, (9, 12))):
        if average == "checkpoints":
            weights = {s: 1 / len(own) for s in own}
        else:
            weights = step_weights_by_hand(start, end, list(steps), lr)
        segments.append(("main", start, end, weights))
    factors = {"main": (1 / (1 - ONE_SETTINGS["momentum"]), ONE_SETTINGS["weight_decay"])}
    factor = 1.0 if damping_factor is None else damping_factor
    expected = _brute_source(one_stage, ONE, segments, lr, factors, factor, ("main",))
    _close(ours["main"], expected["main"])


def _group_ratios(ratio: float) -> torch.Tensor:
    """r per coordinate of ``_Flat``: the first layer's weight and bias (16) at ``ratio``, the head's (15) at 1."""
    return torch.cat([torch.full((16,), ratio, dtype=torch.float64), torch.ones(15, dtype=torch.float64)])


RATIO = 0.2


@pytest.fixture(scope="module")
def ratio_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ONE's run with the first layer at ``RATIO`` times the head's rate."""
    run = tmp_path_factory.mktemp("ratio") / "run"
    _train(run, [("main", ONE["main"], ONE_SETTINGS, ONE_STEPS)], ONE_EVERY, ratio=RATIO)
    return run


def test_sgd_groups_at_a_rate_ratio_are_the_formula_in_the_coordinates_their_rates_make(
    tmp_path: Path, ratio_run: Path
) -> None:
    """The first layer at 1/5 of the head's rate under one LambdaLR, heavy-ball momentum and decay: SGD's step
    θ ← θ − ηRg is gradient descent in u = R^{-1/2}θ, so SOURCE there is the formula with every gradient scaled by
    R^{1/2}, η the head's (reference) rate and λ = mean(r)·λ_g = (16·0.2 + 15)/31 · 0.02; the segmentation is fixed at
    featurize (cuts 5, 9; each segment's step average over its own checkpoints, as on Adam stages). Read as one rate
    (R = I), the scores are far from it."""
    run, ratio, settings = ratio_run, RATIO, ONE_SETTINGS
    segmentation = sp.SegmentationArguments(boundaries=(5, 9))
    ours = _engine(run, tmp_path / "s.sp", ONE, sp.FitArguments(damping_factor=0.5), segmentation=segmentation)
    lr = np.array([settings["lr"] * _schedule(k) for k in range(ONE_STEPS)])
    np.testing.assert_allclose(sp.Trajectory.load(run).lr, lr, rtol=1e-6)
    segments = [("main", a, b, step_weights_by_hand(a, b, list(knots), lr))
                for a, b, knots in ((0, 5, (0, 3)), (5, 9, (6,)), (9, 13, (9, 12, 13)))]  # fmt: skip
    r = _group_ratios(ratio)
    factors = {"main": (1 / (1 - settings["momentum"]), float(r.mean()) * settings["weight_decay"])}
    expected = _brute_source(run, ONE, segments, lr, factors, 0.5, ("main",), scale=r.sqrt())
    _close(ours["main"], expected["main"])
    unscaled = _brute_source(run, ONE, segments, lr, {"main": (2.0, settings["weight_decay"])}, 0.5, ("main",))
    assert np.abs(unscaled["main"] - expected["main"]).max() > 0.1 * np.abs(expected["main"]).max()


def test_tracin_on_groups_at_a_rate_ratio_takes_every_gradient_in_the_coordinates_their_rates_make(
    tmp_path: Path, ratio_run: Path
) -> None:
    """TracIn-CP on the ratio run: −(1/N) Σ_c w_c (R^{1/2}∇f(q; θ_c))·(R^{1/2}∇ℓ(z; θ_c)), w_c the effective rates
    (the head's, the reference, × 1/(1−β) = 2) of the steps since the previous checkpoint."""
    ours = _engine(ratio_run, tmp_path / "s.sp", ONE, sp.BaselineArguments(kind="tracin"))
    lr = np.array([ONE_SETTINGS["lr"] * _schedule(k) for k in range(ONE_STEPS)])
    traj = sp.Trajectory.load(ratio_run)
    f = _Flat()
    scale = _group_ratios(RATIO).sqrt()
    by_step = {c.step: c for c in traj.checkpoints}
    expected = 0
    for a, c in itertools.pairwise((0, 3, 6, 9, 12, 13)):
        theta = f.flat(traj.load_into(_arch(), by_step[c]).state_dict())
        q, g = f.margins(theta, QUERIES) * scale, f.loss_grads(theta, ONE["main"]) * scale
        expected = expected - 2.0 * float(lr[a:c].sum()) * (q @ g.T) / len(ONE["main"])
    _close(ours["main"], expected.numpy())


def test_a_group_at_rate_0_is_attributed_as_frozen(tmp_path: Path) -> None:
    """The first layer at rate 0 (ratio 0) never moves: its gradients are scaled by 0, so SOURCE's scores are those
    of the run attributed without it (no decay here: a frozen group counts 0 in the mean decay, as a group without
    decay does)."""
    run = tmp_path / "run"
    _train(run, [("main", ONE["main"], {"lr": 0.4, "momentum": 0.5}, ONE_STEPS)], ONE_STEPS, ratio=0.0)
    traj = sp.Trajectory.load(run)
    assert torch.equal(traj.load_state(traj.checkpoints[0])["model"]["0.weight"],
                       traj.load_state(traj.final_checkpoint)["model"]["0.weight"])  # fmt: skip
    scores = []
    head = sp.ParameterSelection(exclude=("0.*",))
    for name, task in (("all", sp.ClassificationTask()), ("head", sp.ClassificationTask(parameters=head))):
        store = sp.featurize(run, _arch(), task, ONE["main"], tmp_path / f"{name}.sp",
                             projection=sp.ProjectionArguments(kind="identity"),
                             options=sp.FeaturizeArguments(batch_size=5, chunk_rows=10, fisher="exact"),
                             progress=False)  # fmt: skip
        sp.fit(store, sp.FitArguments(damping_factor=0.0), progress=False)
        scores.append(np.asarray(sp.Attributor(store, _arch(), task).scores(QUERIES)))
    assert np.abs(scores[1]).max() > 1e-3
    _close(scores[0], scores[1])


TWO = {"pre": _data(20, 0), "fine": _data(12, 1)}
TWO_STAGES = [
    ("pre", TWO["pre"], {"lr": 0.4, "momentum": 0.5, "weight_decay": 0.02}, 7),
    ("fine", TWO["fine"], {"lr": 0.2}, 8),
]


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("two") / "run"
    _train(run, TWO_STAGES, 3)
    return run


def _two_stage_brute(run: Path, attributed: tuple[str, ...], damping_factor: float, average: str) -> dict:
    """Two segments per stage: pre [0, 4) (checkpoints 0, 3) and [4, 7) (6); fine [7, 11) (7, 9) and [11, 15) (12);
    the fine-tuning stage restarts the schedule at its own first step."""
    lr = np.array([settings["lr"] * _schedule(k) for _, _, settings, steps in TWO_STAGES for k in range(steps)])
    stage_steps = {"pre": (0, 3, 6, 7), "fine": (7, 9, 12, 15)}
    segments = []
    for stage, start, end, own in (("pre", 0, 4, (0, 3)), ("pre", 4, 7, (6,)), ("fine", 7, 11, (7, 9)),
                                   ("fine", 11, 15, (12,))):  # fmt: skip
        if average == "checkpoints":
            weights = {s: 1 / len(own) for s in own}
        else:
            weights = step_weights_by_hand(start, end, list(stage_steps[stage]), lr)
        segments.append((stage, start, end, weights))
    factors = {"pre": (2.0, 0.02), "fine": (1.0, 0.0)}
    return _brute_source(run, TWO, segments, lr, factors, damping_factor, attributed)


@pytest.mark.parametrize("average", ["steps", "checkpoints"])
def test_a_fine_tuning_stage_after_pre_training_equals_the_formula_for_either_stage_or_both(
    tmp_path: Path, two_stages: Path, featurized: Featurized, average: str
) -> None:
    """Each stage's examples are credited with 1/N of their own stage and carried through every later segment's
    survival; attributing one stage keeps exactly its columns. Which stages are attributed does not depend on how a
    segment averages its checkpoints (``feature_points``): the single stages are checked under one average."""
    store = tmp_path / "s.sp"
    featurized(two_stages, store, TWO)
    for stages in (None, ("pre",), ("fine",)) if average == "steps" else (None,):
        method = "-".join(stages or ("all",))
        args = sp.FitArguments(segments_per_stage=2, damping_factor=0.25, average=average, stages=stages,
                               method=method)  # fmt: skip
        ours = _engine(two_stages, store, TWO, args)
        expected = _two_stage_brute(two_stages, stages or ("pre", "fine"), 0.25, average)
        assert set(ours) == set(expected)
        for stage in expected:
            _close(ours[stage], expected[stage])


def test_fast_source_takes_gradients_and_curvature_at_each_segments_step_averaged_parameters(
    tmp_path: Path, two_stages: Path
) -> None:
    segmentation = sp.SegmentationArguments(per_stage=2)
    args = sp.FitArguments(fast=True, damping_factor=0.25)
    ours = _engine(two_stages, tmp_path / "s.sp", TWO, args, segmentation=segmentation, segment_means=True)
    lr = np.array([settings["lr"] * _schedule(k) for _, _, settings, steps in TWO_STAGES for k in range(steps)])
    stage_steps = {"pre": [0, 3, 6, 7], "fine": [7, 9, 12, 15]}
    segments = [(stage, a, b, step_weights_by_hand(a, b, stage_steps[stage], lr))
                for stage, a, b in (("pre", 0, 4), ("pre", 4, 7), ("fine", 7, 11), ("fine", 11, 15))]  # fmt: skip
    expected = _brute_source(two_stages, TWO, segments, lr, {"pre": (2.0, 0.02), "fine": (1.0, 0.0)}, 0.25,
                             ("pre", "fine"), fast=True)  # fmt: skip
    for stage in expected:
        _close(ours[stage], expected[stage])


def test_the_empirical_fisher_is_the_observed_label_gradients_outer_product(tmp_path: Path, one_stage: Path) -> None:
    args = sp.FitArguments(boundaries=(5, 9), damping_factor=0.0)
    ours = _engine(one_stage, tmp_path / "s.sp", ONE, args, fisher="empirical")
    lr = np.array([ONE_SETTINGS["lr"] * _schedule(k) for k in range(ONE_STEPS)])
    steps = [0, 3, 6, 9, 12, 13]
    segments = [("main", a, b, step_weights_by_hand(a, b, steps, lr)) for a, b in ((0, 5), (5, 9), (9, 13))]
    expected = _brute_source(one_stage, ONE, segments, lr, {"main": (2.0, 0.02)}, 0.0, ("main",), empirical=True)
    _close(ours["main"], expected["main"])


def test_tracin_weighs_each_checkpoint_by_the_effective_rates_since_the_previous_one_in_its_stage(
    tmp_path: Path, two_stages: Path, featurized: Featurized
) -> None:
    """TracIn-CP: −(1/N_s) Σ_c w_c ∇f(q; θ_c)·∇ℓ(z; θ_c) over the checkpoints c saved during z's stage s,
    w_c = the steps' effective rates since the previous checkpoint: η/(1−β) under heavy-ball momentum β, as SOURCE's
    η̄ (the pre-training stage's β = 0.5 doubles its rates)."""
    featurized(two_stages, tmp_path / "s.sp", TWO)
    ours = _engine(two_stages, tmp_path / "s.sp", TWO, sp.BaselineArguments(kind="tracin"))
    lr = np.array([settings["lr"] * _schedule(k) for _, _, settings, steps in TWO_STAGES for k in range(steps)])
    traj = sp.Trajectory.load(two_stages)
    f = _Flat()
    theta = {c.step: f.flat(traj.load_into(_arch(), c).state_dict()) for c in traj.checkpoints}
    for stage, bounds, momentum_factor in (("pre", (0, 3, 6, 7), 2.0), ("fine", (7, 9, 12, 15), 1.0)):
        expected = 0
        for a, c in itertools.pairwise(bounds):
            q, g = f.margins(theta[c], QUERIES), f.loss_grads(theta[c], TWO[stage])
            expected = expected - momentum_factor * float(lr[a:c].sum()) * (q @ g.T) / len(TWO[stage])
        _close(ours[stage], expected.numpy())


def test_if_and_trak_take_the_curvature_of_every_stages_examples_at_the_final_checkpoint(
    tmp_path: Path, two_stages: Path, featurized: Featurized
) -> None:
    """IF: −(1/N) q(H + δI)⁻¹ g_T(z), H the Gauss–Newton of all N = 32 examples, δ = 3 × its mean eigenvalue.
    TRAK on every coordinate: −q (ΦᵀΦ)⁺ g_T(z), Φ the margin gradients of all 32."""
    store = tmp_path / "s.sp"
    featurized(two_stages, store, TWO)
    influence = _engine(two_stages, store, TWO, sp.BaselineArguments(kind="if"))
    k = sp.Store.open(store).meta["projection"]["dim"]
    trak = _engine(two_stages, store, TWO, sp.BaselineArguments(kind="trak", trak_dim=k))
    traj = sp.Trajectory.load(two_stages)
    f = _Flat()
    final = f.flat(traj.load_into(_arch(), traj.final_checkpoint).state_dict())
    n = sum(len(d) for d in TWO.values())
    h = sum(len(d) * f.gauss_newton(final, d) for d in TWO.values()) / n
    damping = 3.0 * float(torch.linalg.eigvalsh(h).clamp_min(0).mean())
    inverse = torch.linalg.inv(h + damping * torch.eye(k, dtype=torch.float64))
    phi = torch.cat([f.margins(final, d) for d in TWO.values()])
    gram = torch.linalg.pinv(phi.T @ phi, hermitian=True, rtol=1e-6)
    q = f.margins(final, QUERIES)
    for stage, data in TWO.items():
        g = f.loss_grads(final, data)
        _close(influence[stage], -(q @ inverse @ g.T / n).numpy())
        _close(trak[stage], -(q @ gram @ g.T).numpy())


@pytest.mark.parametrize("ratio", [1.0, 0.2])
def test_adamw_segments_are_the_formula_in_each_segments_preconditioned_coordinates(
    tmp_path: Path, ratio: float
) -> None:
    """AdamW under the schedule, cut at 5 and 9: segment ℓ works in u = D_ℓ^{1/2}θ, D_ℓ = the mean of √v̂ + ε saved at
    the checkpoints s with start < s ≤ end (3; 6, 9; 12, 13), every gradient (training, Fisher, query: the last
    segment's) scaled by D_ℓ^{-1/2}; its step average over the checkpoints featurized in its coordinates (0, 3; 6;
    9, 12, 13), λ = AdamW's decay. With the first layer at ``ratio`` of the head's rate, D is D/R and λ the mean of
    r·λ (θ ← (1 − rηλ)θ)."""
    settings = {"lr": 0.05, "weight_decay": 0.1}
    run = tmp_path / "run"
    _train(run, [("main", ONE["main"], settings, ONE_STEPS)], ONE_EVERY, torch.optim.AdamW, ratio=ratio)
    segmentation = sp.SegmentationArguments(boundaries=(5, 9))
    ours = _engine(run, tmp_path / "s.sp", ONE, sp.FitArguments(damping_factor=0.2), segmentation=segmentation)

    traj = sp.Trajectory.load(run)
    f = _Flat()
    by_step = {c.step: c for c in traj.checkpoints}
    theta = {c.step: f.flat(traj.load_into(_arch(), c).state_dict()) for c in traj.checkpoints}

    def denominator(step: int) -> torch.Tensor:
        state = traj.load_state(by_step[step])["optimizer"]
        parts = []
        for index in range(len(f.names)):
            entry = state["state"][index]
            v_hat = entry["exp_avg_sq"].double() / (1 - 0.999 ** float(entry["step"]))
            parts.append((v_hat.sqrt() + 1e-8).reshape(-1))
        return torch.cat(parts)

    lr = np.array([settings["lr"] * _schedule(k) for k in range(ONE_STEPS)])
    data, n = ONE["main"], len(ONE["main"])
    ops = []
    r = _group_ratios(ratio)
    decay = float(r.mean()) * settings["weight_decay"]
    for (a, b), states, knots in (((0, 5), (3,), (0, 3)), ((5, 9), (6, 9), (6,)), ((9, 13), (12, 13), (9, 12, 13))):
        scale = (sum(denominator(s) for s in states).div(len(states)) / r).rsqrt()
        weights = step_weights_by_hand(a, b, list(knots), lr)
        h = sum(w * scale[:, None] * f.gauss_newton(theta[s], data) * scale[None, :] for s, w in weights.items())
        g = sum(w * f.loss_grads(theta[s], data) * scale for s, w in weights.items())
        damped = h + (decay + 0.2 * float(torch.linalg.eigvalsh(h).clamp_min(0).mean())) * torch.eye(
            len(h), dtype=torch.float64
        )
        survive = torch.linalg.matrix_exp(-float(lr[a:b].mean()) * (b - a) * damped)
        ops.append((survive, (torch.eye(len(h), dtype=torch.float64) - survive) @ torch.linalg.inv(damped), g, scale))
    total = 0
    for i, (_, response, g, _) in enumerate(ops):
        later = torch.eye(len(response), dtype=torch.float64)
        for survive, *_ in ops[i + 1 :]:
            later = survive @ later
        total = total + later @ response @ g.T / n
    q = f.margins(theta[ONE_STEPS], QUERIES) * ops[-1][3]
    _close(ours["main"], -(q @ total).numpy())


def _rebuilt_features(store: sp.Store, method: str, stage: str) -> np.ndarray:
    """T(z) of ``stage``'s examples rebuilt from the method's ``train`` recipe (what per-token scores split, see
    ``query/per_token.py``) and the stored gradients: T[columns] += weight · O · Σ_points w_point g̃_point(z)."""
    description = store.meta["methods"][method]
    out = np.zeros((store.meta["trajectory"]["stages"][[s["name"] for s in store.meta["trajectory"]["stages"]].index(
        stage)]["dataset_size"], description["dim"]))  # fmt: skip
    for term in description["train"]["terms"]:
        if term["stage"] != stage:
            continue
        assert all(point["point"][0] == "checkpoint" and point.get("scale") is None for point in term["points"])
        summed = sum(float(point.get("weight", 1.0)) * store.read(f"grads/{stage}/{ckpt_key(point['point'][1])}")
                     .astype(np.float64) for point in term["points"])  # fmt: skip
        if term["operator"]:
            summed = summed @ store.read(term["operator"]).astype(np.float64).T
        lo, hi = term["columns"]
        assert out[:, lo:hi].shape == summed.shape, (lo, hi, out.shape)
        out[:, lo:hi] += float(term["weight"]) * summed
    return out


@pytest.mark.slow  # featurizes the two-stage run with Kronecker factors too
def test_every_train_recipe_rebuilds_the_cached_features_from_the_stored_gradients(
    tmp_path: Path, two_stages: Path
) -> None:
    """The recipe per-token scores follow (``fit._Fit._train_recipe``, ``baselines._term``) is the cached training
    features exactly: SOURCE (projected: A_ℓ folded, −1/N; Kronecker: one block of k columns per attributed segment,
    counted among the attributed segments only), fitted to the fine-tuning stage alone after pre-training, and
    TracIn-CP and Grad-Dot on both stages."""
    store_path = tmp_path / "s.sp"
    _featurize(two_stages, store_path, TWO, curvature="both")
    fits = {
        "projected": sp.FitArguments(segments_per_stage=2, stages=("fine",), method="projected"),
        "kfac": sp.FitArguments(segments_per_stage=2, stages=("fine",), curvature="kfac", method="kfac"),
    }
    for args in fits.values():
        sp.fit(store_path, args, progress=False)
    for kind in ("tracin", "grad-dot"):
        sp.fit_baseline(store_path, sp.BaselineArguments(kind=kind), progress=False)
    store = sp.Store.open(store_path)
    assert store.meta["methods"]["kfac"]["dim"] == 2 * store.meta["projection"]["dim"]  # the fine stage's segments
    for method in (*fits, "tracin", "grad-dot"):
        for stage in store.meta["methods"][method]["stages"]:
            cached = store.read(f"methods/{method}/train/{stage}").astype(np.float64)
            rebuilt = _rebuilt_features(store, method, stage)
            np.testing.assert_allclose(rebuilt, cached, rtol=1e-4, atol=1e-5 * np.abs(cached).max(), err_msg=method)
