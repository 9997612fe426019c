"""Shared fixtures: tiny models, data and recorded trajectories."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj import TrajectoryRecorder, fit
from source_proj.cli.main import main

from .crash_driver import FIT, featurize, record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))

# One thread, here and in the commands the tests start: the tests' tensors are too small to gain much from
# a second one, and on a busy 2-core machine a second thread waiting for the first makes each step several
# times slower (digits' 460 training steps: 3.4 s of CPU with one thread, 28 s with two, under load 7).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Back to one thread after a test that ran a script's ``main`` (``torch.set_num_threads(args.threads)``):
    the session's stores built after it on two threads differed in their last bits from the same store built on
    one, and a test comparing them bit for bit failed by which file its worker ran before."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


RAM_DISK = Path("/dev/shm")


def pytest_configure(config: pytest.Config) -> None:
    """Temporary folders on a RAM disk when it has room and nobody chose another place (``--basetemp``,
    ``PYTEST_DEBUG_TEMPROOT``): every chunk a store writes is fsync'ed with its folder (13 ms each on the
    development machine's disk, 2,650 in test_provenance.py alone), and on a RAM disk an fsync costs nothing.
    The writes, renames and fsync calls are the same; a SIGKILL keeps the page cache either way."""
    roomy = RAM_DISK.is_dir() and os.access(RAM_DISK, os.W_OK) and shutil.disk_usage(RAM_DISK).free > 4 * 2**30
    if roomy and config.option.basetemp is None and "PYTEST_DEBUG_TEMPROOT" not in os.environ:
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(RAM_DISK)


class TokenModel(nn.Module):
    """Two Linear layers at each of an example's positions (tokens: inputs ``[B, T, 3]``), their outputs averaged
    into its 4 logits: every layer sees T positions an example, as a language model's do."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.drop, self.head = nn.Linear(3, 5), nn.Dropout(dropout), nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.inner(x)))).mean(1)


def assert_binomial(counts: torch.Tensor, probs: torch.Tensor, trials: int) -> None:
    """Each of ``counts`` (how many of ``trials`` independent draws fell in a class) within 5 binomial standard
    deviations (plus one draw) of ``trials · probs``, elementwise; shapes broadcast."""
    probs = probs.double()
    spread = 5 * torch.sqrt(trials * probs * (1 - probs)) + 1
    assert ((counts.double() - trials * probs).abs() <= spread).all(), (counts / trials, probs)


def conv_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Brute-force im2col of a convolution's input ``x`` ``[B, C_in, *spatial]``: ``[B·T, C_in·∏kernel]``, the rows
    example-major, each patch in the order of ``weight.reshape(C_out, -1)``. They are what the convolution outputs
    with the identity for its weight (one output channel per patch entry), padded as the layer pads."""
    d_in = conv.weight[0].numel()
    eye = torch.eye(d_in, dtype=x.dtype).reshape(d_in, *conv.weight.shape[1:])
    return conv._conv_forward(x, eye, None).flatten(2).transpose(1, 2).reshape(-1, d_in)


def full_batch_run(
    run_dir: Path,
    model: nn.Module,
    data: TensorDataset,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    lr: float,
    steps: int,
    save_every: int = 1,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Full-batch SGD on ``data`` with the recorder (checkpoints at 0, save_every, …, steps); ``label_smoothing``
    is recorded with the stage (``loss_fn`` is what smooths the labels)."""
    x, y = data.tensors
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay, momentum=momentum)
    rec = TrajectoryRecorder(run_dir, model, opt, save_every=save_every)
    rec.begin_stage("main", dataset_size=len(y), label_smoothing=label_smoothing)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).mean().backward()
        opt.step()
        rec.step()
    rec.close()
    return model



def step_weights_by_hand(start: int, end: int, knots: list[int], lr) -> dict[int, float]:
    """SOURCE's average over the steps start … end − 1, step by step (the oracle of ``segments.step_average``):
    step t counts with its rate η_t, its gradient taken on the straight line between the checkpoints around it in
    τ = the sum of the rates before it, the first and last checkpoint's where it lies outside them."""
    def tau(step: int) -> float:
        return float(sum(float(r) for r in lr[:step]))

    knots = sorted(knots)
    total = sum(float(r) for r in lr[start:end])
    weights = dict.fromkeys(knots, 0.0)
    for t in range(start, end):
        mass = float(lr[t]) if total > 0 else 1.0
        x = tau(t)
        if x < tau(knots[0]):
            weights[knots[0]] += mass
        elif x >= tau(knots[-1]):
            weights[knots[-1]] += mass
        else:
            j = max(i for i, k in enumerate(knots) if tau(k) <= x)
            share = (x - tau(knots[j])) / (tau(knots[j + 1]) - tau(knots[j]))
            weights[knots[j]] += mass * (1 - share)
            weights[knots[j + 1]] += mass * share
    norm = total if total > 0 else end - start
    return {k: w / norm for k, w in weights.items() if w > 0}

@pytest.fixture
def regression_data() -> TensorDataset:
    return _regression_data()


def _regression_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(12, generator=g)
    return TensorDataset(x, y)


def _classification_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    return TensorDataset(x, y)


@pytest.fixture
def classification_data() -> TensorDataset:
    return _classification_data()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The crash tests' tiny run (12 examples, checkpoints at steps 0, 4, 8); do not modify it."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    record(run)
    return run


@pytest.fixture(scope="session")
def tiny_reference(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted featurize + fit of ``tiny_run`` (copy it before changing it)."""
    store = tmp_path_factory.mktemp("tiny-reference") / "reference.sp"
    featurize(tiny_run, store)
    fit(store, FIT, progress=False)
    return store


def mlp() -> nn.Module:
    """The 4-16-3 MLP of :func:`fitted_mlp_store` (any initialisation: stores load their checkpoints)."""
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture(scope="session")
def _fitted_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run (``run``) and the store (``s.sp``) of :func:`fitted_mlp_store`, computed once; do not modify them."""
    root = tmp_path_factory.mktemp("fitted-mlp")
    data = _classification_data()
    torch.manual_seed(0)
    full_batch_run(
        root / "run",
        mlp(),
        data,
        lambda o, t: F.cross_entropy(o, t, reduction="none"),
        lr=0.1,
        steps=30,
        save_every=5,
    )
    store = root / "s.sp"
    sp.featurize(
        root / "run",
        mlp(),
        sp.ClassificationTask(),
        data,
        store,
        projection=sp.ProjectionArguments(dim=32, kind="rademacher"),  # the dense oracle the tests compare with
        options=sp.FeaturizeArguments(batch_size=7, chunk_rows=9),
        progress=False,
    )
    fit(store, progress=False)
    return root


@pytest.fixture
def fitted_mlp_store(tmp_path: Path, _fitted_mlp: Path) -> Path:
    """A 4-16-3 MLP trained full-batch on ``classification_data`` (30 steps, checkpoints every 5),
    featurized at k = 32 in row chunks of 9 (the last one partial) and fitted with SOURCE: a copy of the
    session's store in ``tmp_path / "s.sp"`` (change it freely), whose run (``meta["trajectory"]["path"]``)
    is the session's, read-only."""
    shutil.copytree(_fitted_mlp / "s.sp", tmp_path / "s.sp")
    return tmp_path / "s.sp"


CLI_SPEC = """
import sys
sys.path.insert(0, {root!r})
import source_proj as sp
from tests.crash_driver import build_model, data

def build_task():
    return sp.ClassificationTask()

def train_data(stage):
    return data()

def query_data():
    return data()

def describe(stage, index):
    with open({log!r}, "a") as log:
        log.write(f"{{stage}} {{index}}\\n")
    return f"label {{int(data().tensors[1][index])}}"
"""


def write_spec(path: Path, log: Path) -> Path:
    """The CLI tests' spec for ``tiny_run`` (query_data: the 12 training examples; ``describe`` logs
    every call to ``log``)."""
    path.write_text(CLI_SPEC.format(root=str(ROOT), log=str(log)))
    return path


@pytest.fixture(scope="session")
def cli_reference(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, spec): ``tiny_run`` featurized (k = 12, chunks of 4) and fitted with fit's defaults
    through the CLI, with :data:`CLI_SPEC` (copy the store before changing it)."""
    root = tmp_path_factory.mktemp("cli-reference")
    spec = write_spec(root / "spec.py", root / "described.log")
    store = root / "reference.sp"
    args = ["featurize", "--ckpts", str(tiny_run), "--spec", str(spec), "--out", str(store), "--dim", "12"]
    args += ["--seed", "3", "--batch-size", "4", "--chunk-rows", "4", "--device", "cpu"]
    for command in (args, ["fit", str(store), "--device", "cpu"]):
        out = CliRunner().invoke(main, command)
        assert out.exit_code == 0, out.output
    return store, spec
