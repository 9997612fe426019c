"""Multi-stage pipelines: each stage has its own data; attribute the final model to one stage's data or to all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.func import functional_call, grad, jacrev
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.cli.main import main


def _squared(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.squeeze(-1) - y) ** 2


def _datasets() -> dict[str, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(12, 3, generator=g), torch.randn(10, 3, generator=g)
    # the second stage fits another function: it overwrites what the first one learned
    return {
        "pre": TensorDataset(xa, xa @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(12, generator=g)),
        "fine": TensorDataset(xb, xb @ torch.tensor([-1.0, 0.5, 2.0]) + 1.0 + 0.3 * torch.randn(10, generator=g)),
    }


LR, PRE_STEPS = 0.02, 10


def _two_stage_run(run: Path, fine_steps: int) -> None:
    data = _datasets()
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=1)
    for name, steps in (("pre", PRE_STEPS), ("fine", fine_steps)):
        x, y = data[name].tensors
        rec.begin_stage(name, dataset_size=len(y))
        for _ in range(steps):
            opt.zero_grad()
            _squared(model(x), y).mean().backward()
            opt.step()
            rec.step()
    rec.close()


def _unrolled_first_stage(queries: TensorDataset, fine_steps: int) -> np.ndarray:
    """∂f(q; θ_T)/∂w_z for the first stage's examples, by autodiff through both stages (float64)."""
    data = _datasets()
    torch.manual_seed(0)
    net = nn.Linear(3, 1).double()
    theta0 = {n: p.detach() for n, p in net.named_parameters()}
    qx, qy = (t.double() for t in queries.tensors)

    def final(w: torch.Tensor) -> torch.Tensor:
        theta = dict(theta0)
        for name, steps in (("pre", PRE_STEPS), ("fine", fine_steps)):
            x, y = (t.double() for t in data[name].tensors)
            weights = w if name == "pre" else torch.ones(len(y), dtype=torch.float64)
            for _ in range(steps):
                g = grad(lambda t, w=weights, x=x, y=y: (w * _squared(functional_call(net, t, (x,)), y)).mean())(theta)
                theta = {n: theta[n] - LR * g[n] for n in theta}
        return (functional_call(net, theta, (qx,)).squeeze(-1) - qy).abs()

    return jacrev(final)(torch.ones(12, dtype=torch.float64)).numpy()


def _fit_scores(run: Path, store: Path, queries: TensorDataset, stages: tuple[str, ...] | None, method: str):
    if not (store / "zarr.json").exists():
        torch.manual_seed(0)
        sp.featurize(
            run,
            nn.Linear(3, 1),
            sp.RegressionTask(),
            _datasets(),
            store,
            projection=sp.ProjectionArguments(kind="identity"),
            # every first-stage checkpoint, and of the second stage (constant curvature) its first and its last
            options=sp.FeaturizeArguments(
                batch_size=12, chunk_rows=12, fisher="exact", checkpoint_steps=tuple(range(PRE_STEPS + 1))
            ),
            progress=False,
        )
    # one segment per step in the first stage; the second stage (constant curvature) is one segment
    args = sp.FitArguments(boundaries=tuple(range(1, PRE_STEPS)), stages=stages, method=method, damping_factor=0.0)
    sp.fit(store, args, progress=False)
    return sp.Attributor(store, nn.Linear(3, 1), sp.RegressionTask(), method=method).scores(queries)


def test_first_stage_scores_decay_through_the_second_stage_as_predicted(tmp_path: Path) -> None:
    queries = TensorDataset(torch.randn(5, 3, generator=torch.Generator().manual_seed(7)), torch.zeros(5))
    norms = []
    for fine_steps in (20, 120):
        run = tmp_path / f"run{fine_steps}"
        _two_stage_run(run, fine_steps)
        ours = _fit_scores(run, tmp_path / f"s{fine_steps}.sp", queries, ("pre",), "pre-only")
        assert ours.shape == (5, 12)
        exact = _unrolled_first_stage(queries, fine_steps)
        # survival exp(−η̄K H_fine) vs the exact (I − ηH_fine)^K, and per-step exp vs (I − ηH) in the first stage
        assert np.linalg.norm(ours - exact) / np.linalg.norm(exact) < 0.05
        norms.append(np.linalg.norm(ours))

        # the predicted survival, S = exp(−η̄K H̄) of the fine-tuning segment, applied to the first stage's response
        store = sp.Store.open(tmp_path / f"s{fine_steps}.sp")
        segments = store.meta["methods"]["pre-only"]["segments"]
        assert [s["stage"] for s in segments] == ["pre"] * PRE_STEPS + ["fine"]
        x = _datasets()["fine"].tensors[0].double()
        features = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        hessian = 2 * features.T @ features / len(x)
        survival = torch.linalg.matrix_exp(-LR * fine_steps * hessian)
        # T(z) = −(1/N) S_fine A_pre ḡ(z): undo S_fine and the first stage's features no longer depend on fine_steps
        before = torch.linalg.solve(survival, torch.from_numpy(store.read("methods/pre-only/train/pre")).double().T)
        if fine_steps == 20:
            reference = before
        else:
            assert torch.allclose(before, reference, rtol=1e-3, atol=1e-6)
    assert norms[1] < 0.5 * norms[0]  # the second stage overwrites the first: its examples matter less and less


def test_attributing_one_stage_keeps_exactly_its_rows_of_the_full_attribution(tmp_path: Path) -> None:
    queries = TensorDataset(torch.randn(3, 3, generator=torch.Generator().manual_seed(7)), torch.zeros(3))
    _two_stage_run(tmp_path / "run", 20)
    store = tmp_path / "s.sp"
    everything = _fit_scores(tmp_path / "run", store, queries, None, "source")
    first = _fit_scores(tmp_path / "run", store, queries, ("pre",), "pre-only")
    second = _fit_scores(tmp_path / "run", store, queries, ("fine",), "fine-only")
    assert everything.shape == (3, 22)
    assert np.allclose(everything[:, :12], first) and np.allclose(everything[:, 12:], second)
    result = sp.Attributor(store, nn.Linear(3, 1), sp.RegressionTask(), method="fine-only").top_k(queries, 2)
    assert {result.locate(int(i))[0] for i in result.helpful_ids.ravel()} == {"fine"}

    cli = CliRunner().invoke(
        main,
        [
            "fit",
            str(store),
            "--boundaries",
            ",".join(map(str, range(1, PRE_STEPS))),
            "--stages",
            "pre",
            "--method",
            "cli-pre",
            "--damping-factor",
            "0",
        ],
    )
    assert cli.exit_code == 0, cli.output
    assert "attributes stages ['pre']" in cli.output
    ours = sp.Attributor(store, nn.Linear(3, 1), sp.RegressionTask(), method="cli-pre").scores(queries)
    assert np.allclose(ours, first)
    cli = CliRunner().invoke(main, ["fit", str(store), "--stages", "pretrain"])
    assert cli.exit_code == 1 and "Unknown stage(s) ['pretrain']" in cli.output


def test_a_stage_without_data_is_refused(tmp_path: Path) -> None:
    _two_stage_run(tmp_path / "run", 4)
    with pytest.raises(sp.TaskError, match=r"No training dataset was given for stage\(s\) \['fine'\]"):
        sp.featurize(
            tmp_path / "run",
            nn.Linear(3, 1),
            sp.RegressionTask(),
            {"pre": _datasets()["pre"]},
            tmp_path / "s.sp",
            progress=False,
        )


def test_data_for_a_stage_the_run_lacks_is_refused_not_left_out(tmp_path: Path) -> None:
    """A new stage's data passed before the run recorded that stage (growing a store too early) was ignored: the
    store was written, or kept, without it and nothing said so."""
    _two_stage_run(tmp_path / "run", 4)
    data = {**_datasets(), "more": _datasets()["fine"]}
    with pytest.raises(sp.TaskError, match=r"stage\(s\) \['more'\], which the trajectory does not have"):
        sp.featurize(tmp_path / "run", nn.Linear(3, 1), sp.RegressionTask(), data, tmp_path / "s.sp", progress=False)
    assert not (tmp_path / "s.sp").exists()
