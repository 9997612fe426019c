"""Growing a store: a run that trained further (a longer stage, then a new stage with new examples) is added
to its store computing only the new checkpoints' work, and the grown store is the store of the longer run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.featurize.grow import finished_before_growth, record_growth
from source_proj.featurize.plan import _probe_rows
from source_proj.store import provenance
from source_proj.store.provenance import REFERENCE_ROWS, _seeded_rows
from source_proj.store.store import ckpt_key


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


MAIN, EXTRA = _data(20, 1), _data(10, 2)


def _steps(rec: sp.TrajectoryRecorder, model: nn.Module, opt: torch.optim.Optimizer, data: TensorDataset, n: int):
    x, y = data.tensors
    for _ in range(n):
        rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(rec.global_step))[:5]
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        rec.step()


def _record(run: Path) -> None:
    """8 steps of stage main (checkpoints 0, 4, 8)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=4, save_optimizer_state=True)
    rec.begin_stage("main", dataset_size=len(MAIN))
    _steps(rec, model, opt, MAIN, 8)
    rec.close()


def _continue(run: Path) -> None:
    """The finished run trains 4 more steps of main, then 4 of a new stage on new examples."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = sp.TrajectoryRecorder.resume(run, model, opt, save_every=4)
    _steps(rec, model, opt, MAIN, 4)
    rec.begin_stage("extra", dataset_size=len(EXTRA), optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    _steps(rec, model, rec.optimizer, EXTRA, 4)
    rec.close()


def _featurize(run: Path, store: Path, data: dict, kind: str = "rademacher", **kwargs) -> sp.Store:
    """The dense projection by default: a store grown from it must equal the longer run's store built
    from scratch, which the eigen projection's basis (estimated from the checkpoints it saw) does not."""
    return sp.featurize(
        run, _mlp(), sp.ClassificationTask(), data, store,
        projection=sp.ProjectionArguments(dim=16, kind=kind), options=sp.FeaturizeArguments(chunk_rows=8),
        progress=False, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made once for the module and only read (featurize leaves a run as it was): ``run8`` (``_record``), ``s8.sp``
    (its store on main, fitted), ``run16`` (a copy of run8 that trained on: ``_continue``) and ``scratch16.sp``
    (run16's store featurized at once on main and extra, not fitted). A test copies a store it changes."""
    root = tmp_path_factory.mktemp("grow")
    _record(root / "run8")
    sp.fit(_featurize(root / "run8", root / "s8.sp", {"main": MAIN}), progress=False)
    shutil.copytree(root / "run8", root / "run16")
    _continue(root / "run16")
    _featurize(root / "run16", root / "scratch16.sp", {"main": MAIN, "extra": EXTRA})
    return root


class _Counted:
    """Counts the examples whose projected gradients featurize computes, per quantity."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = {"loss": 0, "fisher": 0, "measurement": 0}
        original = sp.RademacherProjector.project_batch

        def counted(projector, grads_fn, batch, quantity="loss", *, transform=None):
            self.rows[quantity] += len(batch[0])
            return original(projector, grads_fn, batch, quantity, transform=transform)

        monkeypatch.setattr(sp.RademacherProjector, "project_batch", counted)

    def take(self) -> dict[str, int]:
        rows, self.rows = self.rows, {"loss": 0, "fisher": 0, "measurement": 0}
        return rows


def test_a_grown_store_is_the_longer_runs_store_and_only_new_checkpoints_are_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = _Counted(monkeypatch)
    _record(tmp_path / "run")
    store = _featurize(tmp_path / "run", tmp_path / "grown.sp", {"main": MAIN})
    old = counter.take()
    sp.fit(store, progress=False)
    _continue(tmp_path / "run")
    data = {"main": MAIN, "extra": EXTRA}
    with pytest.raises(sp.StoreError, match="pass --grow"):
        _featurize(tmp_path / "run", tmp_path / "grown.sp", data)
    checked: set[str] = set()
    check_chunk = sp.Store.check_chunk

    def recorded(store: sp.Store, name: str, chunk: int, entry: np.ndarray) -> np.ndarray | str:
        checked.add(name)
        return check_chunk(store, name, chunk, entry)

    monkeypatch.setattr(sp.Store, "check_chunk", recorded)
    grown = _featurize(tmp_path / "run", tmp_path / "grown.sp", data, grow=True)
    growth = counter.take()
    # Growing reads no old work either: the finished store's chunks are not re-checked (only the new ones,
    # when a growth resumes, and the ones packing reads).
    old_arrays = {f"{kind}/main/step-{step:08d}" for kind in ("grads", "fisher") for step in (0, 4, 8)}
    assert not checked & old_arrays, checked & old_arrays
    scratch = _featurize(tmp_path / "run", tmp_path / "scratch.sp", data)
    full = counter.take()
    # Only the new units ran: the old ones (checkpoints 0, 4, 8 on main) are exactly what the first featurize did.
    assert growth["loss"] == full["loss"] - old["loss"] and growth["measurement"] == full["measurement"]
    assert growth["fisher"] == full["fisher"] - old["fisher"]  # the Fisher's sampled labels' gradients
    assert 0 < growth["loss"] < full["loss"] and 0 < growth["fisher"] < full["fisher"]
    for name in scratch.progress_arrays():
        assert np.array_equal(grown.read(name), scratch.read(name)), name
    assert set(grown.progress_arrays()) == set(scratch.progress_arrays())  # the old θ_T's measurement is gone
    assert grown.meta["trajectory"] == scratch.meta["trajectory"]
    history = grown.meta["growth"]
    assert [h["checkpoints"] for h in history] == [[0, 4, 8]] and history[0]["dropped_methods"] == ["source"]
    assert not grown.meta["methods"] and sp.verify_store(grown.path).status == "ok"
    a = sp.fit(grown, progress=False)
    b = sp.fit(scratch, progress=False)
    for stage in ("main", "extra"):
        assert np.array_equal(a.read(f"methods/source/train/{stage}"), b.read(f"methods/source/train/{stage}"))


def test_each_growth_is_added_to_the_history_of_those_before(tmp_path: Path) -> None:
    """A store grown twice names both runs it held (``meta["growth"]``), not only the latest."""
    first = {"checkpoints": [0, 4], "fingerprint": "a", "dropped_methods": [], "finished": True}
    store = sp.Store.create(tmp_path / "s.sp", {"trajectory": {"checkpoints": [0, 4, 8], "fingerprint": "b"},
                                               "growth": [first], "featurized": True, "methods": {}})  # fmt: skip
    record_growth(store)
    second = {"checkpoints": [0, 4, 8], "fingerprint": "b", "dropped_methods": [], "finished": True}
    assert sp.Store.open(store.path).meta["growth"] == [first, second]


def test_info_says_to_re_fit_a_grown_stores_methods_only_until_they_are(tmp_path: Path, runs: Path) -> None:
    """`source-proj info` of a grown store said "re-fit source" even after source had been re-fitted."""
    from click.testing import CliRunner

    from source_proj.cli.main import main

    shutil.copytree(runs / "s8.sp", tmp_path / "s.sp")
    grown = _featurize(runs / "run16", tmp_path / "s.sp", {"main": MAIN, "extra": EXTRA}, grow=True)
    line = "  grown from the run with checkpoints [0, 4, 8]"
    assert f"{line}; re-fit source\n" in CliRunner().invoke(main, ["info", str(grown.path)]).output
    sp.fit(grown, progress=False)
    after = CliRunner().invoke(main, ["info", str(grown.path)]).output
    assert f"{line}\n" in after and "re-fit" not in after, after


def test_only_the_work_of_a_store_that_had_finished_is_trusted_after_its_growth(runs: Path) -> None:
    """Writers resuming a growth skip re-checking the chunks of the units the store had finished before it; a store
    killed before it finished trusts none of them (its chunks may be torn)."""
    grown = sp.Trajectory.load(runs / "run16")
    entry = {"checkpoints": [0, 4, 8], "fingerprint": "f", "dropped_methods": []}
    assert finished_before_growth({"growth": [{**entry, "finished": False}]}, grown) == set()
    assert finished_before_growth({"growth": [{**entry, "finished": True}]}, grown) == {
        ("main", ckpt_key(step)) for step in (0, 4, 8)
    }


def test_a_store_does_not_grow_into_a_run_that_did_not_continue_it(tmp_path: Path, runs: Path) -> None:
    store = shutil.copytree(runs / "s8.sp", tmp_path / "s.sp")
    model = _mlp()
    torch.nn.init.zeros_(model[0].bias)  # another run: the first checkpoint already differs
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = sp.TrajectoryRecorder(tmp_path / "other", model, opt, save_every=4)
    rec.begin_stage("main", dataset_size=len(MAIN))
    _steps(rec, model, opt, MAIN, 12)
    rec.close()
    with pytest.raises(sp.StoreError, match=r"cannot grow .* first 8 steps are not the store's run"):
        _featurize(tmp_path / "other", store, {"main": MAIN}, grow=True)
    assert sp.Store.open(store).meta["trajectory"]["checkpoints"] == [0, 4, 8]


@pytest.mark.slow
def test_two_copies_of_a_run_that_trained_on_apart_each_grow_only_a_store_of_their_common_part(
    tmp_path: Path, runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run copied (``cp -r``) and then trained on in both copies, differently: a store of their common part grows
    into one copy, and then (as a store featurized from that copy, finished or cut short) is another run's to the
    other: it neither grows into it nor resumes from it (the fingerprints hold every checkpoint's sha256)."""
    common = shutil.copytree(runs / "s8.sp", tmp_path / "common.sp")  # run8's store; run16 (copy A) trained on
    a, b = runs / "run16", shutil.copytree(runs / "run8", tmp_path / "b")
    x, y = EXTRA.tensors
    other = {"main": MAIN, "extra": TensorDataset(x.flip(0), y.flip(0))}
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = sp.TrajectoryRecorder.resume(b, model, opt, save_every=4)
    _steps(rec, model, opt, MAIN, 2)  # B trains on otherwise: fewer steps of main, then the new stage
    rec.begin_stage("extra", dataset_size=len(EXTRA), optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    _steps(rec, model, rec.optimizer, other["extra"], 6)
    rec.close()
    data = {"main": MAIN, "extra": EXTRA}
    _featurize(a, common, data, grow=True)
    with pytest.raises(sp.StoreError, match=r"cannot grow .* first 16 steps are not the store's run"):
        _featurize(b, common, other, grow=True)
    with pytest.raises(sp.StoreError, match=r"featurized from another run"):
        _featurize(b, common, other)
    # A featurize of copy A cut short is not resumed from copy B either.
    original = sp.Store.write_chunk

    def killed(store: sp.Store, name: str, chunk: int, values: np.ndarray) -> None:
        if name == "grads/extra/step-00000016":
            raise KeyboardInterrupt
        original(store, name, chunk, values)

    monkeypatch.setattr(sp.Store, "write_chunk", killed)
    with pytest.raises(KeyboardInterrupt):
        _featurize(a, tmp_path / "cut.sp", data)
    monkeypatch.undo()
    with pytest.raises(sp.StoreError, match=r"featurized from another run"):
        _featurize(b, tmp_path / "cut.sp", other)


def test_a_grown_eigen_store_keeps_its_basis(tmp_path: Path, runs: Path) -> None:
    """The eigen projection's basis was estimated from the checkpoints the store first saw; growing
    keeps it (the old features stay valid), projects the new checkpoints onto it, and fits."""
    store = _featurize(runs / "run8", tmp_path / "grown.sp", {"main": MAIN}, kind="eigen")
    basis = store.meta["projection"]["basis"]
    grown = _featurize(runs / "run16", tmp_path / "grown.sp", {"main": MAIN, "extra": EXTRA}, kind="eigen", grow=True)
    assert grown.meta["projection"]["basis"] == basis and basis["checkpoints"] == [0, 4, 8]
    assert sp.verify_store(grown.path, progress=False).status == "ok"
    sp.fit(grown, progress=False)
    scores = sp.Attributor(grown, _mlp(), sp.ClassificationTask()).scores(EXTRA)
    assert scores.shape == (10, 30) and np.isfinite(scores).all()


def test_a_grown_store_takes_the_fisher_of_the_same_batches(tmp_path: Path, runs: Path) -> None:
    """``fisher_examples``: a stage's Fisher batches are drawn per row chunk, so the old stage keeps its draw as the
    store grows and the new stage draws its own, as the longer run's store from scratch does."""

    def featurize(run: str, store: Path, data: dict, **kwargs) -> sp.Store:
        return sp.featurize(runs / run, _mlp(), sp.ClassificationTask(), data, store,
                            projection=sp.ProjectionArguments(dim=16, kind="rademacher"),
                            options=sp.FeaturizeArguments(batch_size=4, chunk_rows=8, fisher_examples=4),
                            progress=False, **kwargs)  # fmt: skip

    featurize("run8", tmp_path / "grown.sp", {"main": MAIN})
    data = {"main": MAIN, "extra": EXTRA}
    grown = featurize("run16", tmp_path / "grown.sp", data, grow=True)
    scratch = featurize("run16", tmp_path / "scratch.sp", data)
    assert grown.array("fisher/main/step-00000000").shape[0] < len(MAIN)  # a share of each stage
    assert 0 < grown.array("fisher/extra/step-00000016").shape[0] < len(EXTRA)
    for name in scratch.progress_arrays():
        assert np.array_equal(grown.read(name), scratch.read(name)), name
    assert sp.verify_store(grown.path).status == "ok"


def test_a_new_stage_that_starts_at_the_old_final_checkpoint_gets_that_checkpoint_on_its_data(
    tmp_path: Path, runs: Path
) -> None:
    """The old run ended at step 8, a checkpoint featurized on main's data; the new stage starts there, so the
    grown store needs step 8 on the new stage's data too (it used to be skipped: fit refused the grown store, and
    verify --repair and a second featurize could not mend it)."""
    store = shutil.copytree(runs / "s8.sp", tmp_path / "grown.sp")
    run = shutil.copytree(runs / "run8", tmp_path / "run")
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = sp.TrajectoryRecorder.resume(run, model, opt, save_every=4)
    rec.begin_stage("extra", dataset_size=len(EXTRA), optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    _steps(rec, model, rec.optimizer, EXTRA, 4)
    rec.close()
    data = {"main": MAIN, "extra": EXTRA}
    grown = _featurize(run, store, data, grow=True)
    scratch = _featurize(run, tmp_path / "scratch.sp", data)
    assert "grads/extra/step-00000008" in set(scratch.progress_arrays())
    assert set(grown.progress_arrays()) == set(scratch.progress_arrays())
    for name in scratch.progress_arrays():
        assert np.array_equal(grown.read(name), scratch.read(name)), name
    assert sp.verify_store(grown.path).status == "ok"
    sp.fit(grown, progress=False)  # refused before: it lacked grads/extra/step-00000008


def test_a_growth_with_other_settings_says_to_repeat_them_not_to_replace_the_store(tmp_path: Path, runs: Path) -> None:
    """`--grow` without the first featurize's `--dim` (the CLI's default k instead) is refused with the setting
    that differs, not the run's own change, and without advice to replace the store; the store is untouched."""
    store = shutil.copytree(runs / "s8.sp", tmp_path / "s.sp")
    with pytest.raises(sp.StoreError, match=r"cannot grow with other settings") as refused:
        sp.featurize(
            runs / "run16", _mlp(), sp.ClassificationTask(), {"main": MAIN, "extra": EXTRA}, store,
            projection=sp.ProjectionArguments(dim=32, kind="rademacher"), options=sp.FeaturizeArguments(chunk_rows=8),
            progress=False, grow=True,
        )  # fmt: skip
    message = str(refused.value)
    assert "projection: dim 16 → 32" in message and "trajectory" not in message and "--force" not in message
    assert sp.Store.open(store).meta["trajectory"]["checkpoints"] == [0, 4, 8]
    grown = _featurize(runs / "run16", store, {"main": MAIN, "extra": EXTRA}, grow=True)
    assert grown.meta["trajectory"]["checkpoints"] == [0, 4, 8, 12, 16]


def test_a_store_does_not_grow_with_other_data_or_another_model(tmp_path: Path, runs: Path) -> None:
    """The old stages' data and the model at the store's final checkpoint are checked before a store grows, as they
    are before it resumes: reordered examples, or another activation with the same parameters, are refused (they
    were taken, and the grown store mixed their features with the old ones); the store is left as it was."""
    path, run = shutil.copytree(runs / "s8.sp", tmp_path / "s.sp"), runs / "run16"
    x, y = MAIN.tensors
    reordered = TensorDataset(x.flip(0), y.flip(0))
    with pytest.raises(sp.TaskError, match=r"data of stage 'main' are not those .* \(other contents or order\)"):
        _featurize(run, path, {"main": reordered, "extra": EXTRA}, grow=True)
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(sp.TaskError, match=r"computes other outputs at the final checkpoint"):
        sp.featurize(
            run, relu, sp.ClassificationTask(), {"main": MAIN, "extra": EXTRA}, path,
            projection=sp.ProjectionArguments(dim=16, kind="rademacher"), options=sp.FeaturizeArguments(chunk_rows=8),
            progress=False, grow=True,
        )  # fmt: skip
    store = sp.Store.open(path)
    assert store.meta["trajectory"]["checkpoints"] == [0, 4, 8] and "growth" not in store.meta
    grown = _featurize(run, path, {"main": MAIN, "extra": EXTRA}, grow=True)
    assert grown.meta["trajectory"]["checkpoints"] == [0, 4, 8, 12, 16]


def test_an_attributor_made_before_its_store_grew_refuses_to_answer(tmp_path: Path, runs: Path) -> None:
    """An Attributor holds its store's recipe, rows and index: after the store grew and was fitted again they are
    the old store's (its top-k came from the old index, its scores mixed the new fit's rows with the old recipe), so
    it refuses, and a new Attributor answers for the grown store."""
    shutil.copytree(runs / "s8.sp", tmp_path / "s.sp")  # fitted
    old = sp.Attributor(tmp_path / "s.sp", _mlp(), sp.ClassificationTask(), search_backend="torch", progress=False)
    old.top_k(EXTRA, 3)
    sp.fit(_featurize(runs / "run16", tmp_path / "s.sp", {"main": MAIN, "extra": EXTRA}, grow=True), progress=False)
    for answer in (old.top_k, old.scores, old.query_features):
        with pytest.raises(sp.StoreError, match=r"s\.sp changed since this Attributor was made .*; make a new"):
            answer(EXTRA)
    new = sp.Attributor(tmp_path / "s.sp", _mlp(), sp.ClassificationTask(), search_backend="torch", progress=False)
    assert new.scores(EXTRA).shape == (10, 30) and new.top_k(EXTRA, 3).rows == new.rows


@pytest.mark.parametrize("backend", ["torch", "stream"])
def test_an_attributor_made_before_its_store_was_featurized_again_refuses_to_answer(
    tmp_path: Path, runs: Path, backend: str
) -> None:
    """A store replaced (featurize --force) by one of the same run with another projection, and fitted with the same
    settings, is another store: an Attributor made before answered from the old projection and index (torch), or
    projected its queries the old way and searched the new rows with them (stream: scores of neither store)."""
    store = shutil.copytree(runs / "s8.sp", tmp_path / "s.sp")  # fitted
    old = sp.Attributor(store, _mlp(), sp.ClassificationTask(), search_backend=backend, progress=False)
    old.top_k(EXTRA, 3)
    sp.featurize(runs / "run8", _mlp(), sp.ClassificationTask(), {"main": MAIN}, store, overwrite=True,
                 projection=sp.ProjectionArguments(dim=16, kind="rademacher", seed=1), progress=False)  # fmt: skip
    sp.fit(store, progress=False)
    for answer in (old.top_k, old.scores, old.query_features):
        with pytest.raises(sp.StoreError, match=r"s\.sp changed since this Attributor was made .*; make a new"):
            answer(EXTRA)
    new = sp.Attributor(store, _mlp(), sp.ClassificationTask(), search_backend=backend, progress=False)
    result = new.top_k(EXTRA, 3)
    np.testing.assert_allclose(result.positive_scores, np.sort(new.scores(EXTRA), axis=1)[:, ::-1][:, :3], rtol=1e-5)


def test_a_growth_whose_new_stage_the_model_cannot_run_is_refused_and_the_store_kept(
    tmp_path: Path, runs: Path
) -> None:
    """Examples of the new stage shaped otherwise than the model's input are refused in a sentence naming the stage
    (a bare RuntimeError came out of the first new chunk), before the store grows: its fit is kept."""
    shutil.copytree(runs / "s8.sp", tmp_path / "s.sp")  # fitted
    x, y = EXTRA.tensors
    narrow = TensorDataset(x[:, :3], y)
    with pytest.raises(sp.TaskError, match=r"The model cannot run on the training data of stage 'extra' \(RuntimeErr"):
        _featurize(runs / "run16", tmp_path / "s.sp", {"main": MAIN, "extra": narrow}, grow=True)
    store = sp.Store.open(tmp_path / "s.sp")
    assert store.meta["trajectory"]["checkpoints"] == [0, 4, 8] and list(store.meta["methods"]) == ["source"]


def test_fit_of_a_store_whose_growth_was_cut_short_says_to_grow_it_again(
    tmp_path: Path, runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A growth killed after it dropped the fit and the old learning rates, before it recorded the longer run: fit
    said only that 'trajectory/lr' was missing ("run the step that writes it"), and verify --repair printed the
    featurize without --grow; both now ask to grow again, which ends with the longer run's store, its growth noted
    once (growing again noted it a second time, with no dropped fit)."""
    shutil.copytree(runs / "s8.sp", tmp_path / "s.sp")  # fitted
    delete = sp.Store.delete

    def killed(store: sp.Store, name: str) -> None:
        if name.startswith("measurement/"):
            raise KeyboardInterrupt
        delete(store, name)

    monkeypatch.setattr(sp.Store, "delete", killed)
    data = {"main": MAIN, "extra": EXTRA}
    with pytest.raises(KeyboardInterrupt):
        _featurize(runs / "run16", tmp_path / "s.sp", data, grow=True)
    monkeypatch.undo()
    with pytest.raises(sp.StoreError, match=r"learning rates .* interrupted; re-run .* the store and grow=True"):
        sp.fit(tmp_path / "s.sp", progress=False)
    repaired = sp.verify_store(tmp_path / "s.sp", repair=True, progress=False)
    assert next(step for step in repaired.next_steps if "featurize" in step).endswith("and grow=True")
    grown = _featurize(runs / "run16", tmp_path / "s.sp", data, grow=True)
    scratch = sp.Store.open(runs / "scratch16.sp")
    assert set(grown.progress_arrays()) == set(scratch.progress_arrays())
    for name in scratch.progress_arrays():
        assert np.array_equal(grown.read(name), scratch.read(name)), name
    assert [(h["checkpoints"], h["dropped_methods"]) for h in grown.meta["growth"]] == [([0, 4, 8], ["source"])]


@pytest.mark.parametrize("bad", ["nan", "label"])
def test_a_new_stages_bad_example_outside_the_reference_batch_is_refused_before_the_store_grows(
    tmp_path: Path, runs: Path, bad: str
) -> None:
    """A NaN input or a label out of range in a new stage's example that the reference batch does not hold was
    found in its gradients only after the store had switched to the grown run: its fit was dropped, and its data
    fingerprint was the bad data's, so the mended data were refused (featurize --force, all work lost). It is
    refused before anything changes, and the mended data grow the store."""
    shutil.copytree(runs / "s8.sp", tmp_path / "s.sp")  # fitted
    before = sp.Store.open(tmp_path / "s.sp").meta
    x, y = (t.clone() for t in EXTRA.tensors)
    row = 3  # not among the reference batch's rows of the 10 examples
    assert row not in _seeded_rows(len(y), REFERENCE_ROWS, 0)
    if bad == "nan":
        x[row, 1] = float("nan")
        refusal = (sp.NumericalError, rf"loss of example {row} of the new stage 'extra' is NaN .* does not grow")
    else:
        y[row] = 7
        refusal = (sp.TaskError, r"Labels must lie in \[0, 2\]")
    with pytest.raises(refusal[0], match=refusal[1]):
        _featurize(runs / "run16", tmp_path / "s.sp", {"main": MAIN, "extra": TensorDataset(x, y)}, grow=True)
    assert sp.Store.open(tmp_path / "s.sp").meta == before
    grown = _featurize(runs / "run16", tmp_path / "s.sp", {"main": MAIN, "extra": EXTRA}, grow=True)
    assert grown.meta["trajectory"]["checkpoints"] == [0, 4, 8, 12, 16] and len(grown.meta["growth"]) == 1


def test_a_store_grows_into_chosen_checkpoints_that_leave_out_its_final_one(tmp_path: Path, runs: Path) -> None:
    """The model is checked at the store's final checkpoint (step 8) also where the checkpoints chosen for the growth
    (``checkpoint_steps``) leave it out."""

    def featurize(run: str, model: nn.Module, data: dict, steps: tuple[int, ...], **kwargs) -> sp.Store:
        return sp.featurize(runs / run, model, sp.ClassificationTask(), data, tmp_path / "s.sp",
                            projection=sp.ProjectionArguments(dim=16, kind="rademacher"),
                            options=sp.FeaturizeArguments(chunk_rows=8, checkpoint_steps=steps), progress=False,
                            **kwargs)  # fmt: skip

    featurize("run8", _mlp(), {"main": MAIN}, (0, 8))
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(sp.TaskError, match=r"computes other outputs at the final checkpoint"):
        featurize("run16", relu, {"main": MAIN, "extra": EXTRA}, (0, 4, 12), grow=True)
    grown = featurize("run16", _mlp(), {"main": MAIN, "extra": EXTRA}, (0, 4, 12), grow=True)
    assert grown.meta["trajectory"]["checkpoints"] == [0, 4, 12, 16]



def _continue_at_a_ratio(run: Path, kind: str = "sgd") -> None:
    """The finished run trains 4 steps with its two layers at 1:5 (SGD or AdamW, ``kind``): a new stage, extra, on new
    examples, or (once it has one) extra further."""
    model = _mlp()
    groups = [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters(), "lr": 0.05}]
    opt = torch.optim.SGD(groups, momentum=0.5) if kind == "sgd" else torch.optim.AdamW(groups)
    new = "extra" not in [stage.name for stage in sp.Trajectory.load(run).stages]
    rec = sp.TrajectoryRecorder.resume(run, model, torch.optim.SGD(model.parameters(), lr=0.1) if new else opt,
                                       save_every=4)  # fmt: skip
    if new:
        rec.begin_stage("extra", dataset_size=len(EXTRA), optimizer=opt)
    _steps(rec, model, rec.optimizer, EXTRA, 4)
    rec.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_store_grows_into_a_new_stage_at_a_ratio_of_rates_and_then_refuses_to_grow_naming_why(
    tmp_path: Path, runs: Path, kind: str
) -> None:
    """A store of one-rate SGD grows into a run whose new stage trains its groups at 1:5 (SGD, or AdamW): the
    segmentation is recorded as it grows, and the store, its SOURCE and baselines are those of the whole run
    featurized at once. Grown again,
    its preconditioned features are refused in one sentence naming why; it once said "an Adam run, or Fast-SOURCE"
    for every store with a segmentation, this one and one featurized with --segments included."""
    shutil.copytree(runs / "s8.sp", tmp_path / "grown.sp")  # fitted
    shutil.copytree(runs / "run8", tmp_path / "run")
    _continue_at_a_ratio(tmp_path / "run", kind)
    data = {"main": MAIN, "extra": EXTRA}
    grown = _featurize(tmp_path / "run", tmp_path / "grown.sp", data, grow=True)
    scratch = _featurize(tmp_path / "run", tmp_path / "scratch.sp", data)
    assert grown.meta["segmentation"] == scratch.meta["segmentation"]
    assert any(s["preconditioner"] for s in grown.meta["segmentation"]["segments"])
    assert set(grown.progress_arrays()) == set(scratch.progress_arrays())
    for name in scratch.progress_arrays():
        assert np.array_equal(grown.read(name), scratch.read(name)), name
    assert sp.verify_store(grown.path, progress=False).status == "ok"
    for store in (grown, scratch):
        sp.fit(store, progress=False)
        for baseline in ("tracin", "trak", "if"):
            sp.fit_baseline(store, sp.BaselineArguments(kind=baseline), progress=False)
    for method in ("source", "tracin", "trak", "if"):
        a, b = (sp.Attributor(s, _mlp(), sp.ClassificationTask(), method=method).scores(EXTRA)
                for s in (grown, scratch))  # fmt: skip
        assert np.array_equal(a, b), method
    _continue_at_a_ratio(tmp_path / "run", kind)
    before = sp.Store.open(grown.path).meta
    with pytest.raises(sp.StoreError, match="scaled by each segment's preconditioner: an Adam stage, or parameter "
                                            "groups at different learning rates"):  # fmt: skip
        _featurize(tmp_path / "run", tmp_path / "grown.sp", data, grow=True)
    assert sp.Store.open(grown.path).meta == before


def test_a_store_featurized_with_segments_refuses_to_grow_naming_them(tmp_path: Path, runs: Path) -> None:
    """Plain SGD features do not depend on the segments, but the store records them for its own run: its growth is
    refused, naming them (it once blamed an Adam run or Fast-SOURCE)."""
    options = sp.FeaturizeArguments(chunk_rows=8, segmentation=sp.SegmentationArguments(per_stage=2))
    projection = sp.ProjectionArguments(dim=16, kind="rademacher")
    sp.featurize(runs / "run8", _mlp(), sp.ClassificationTask(), {"main": MAIN}, tmp_path / "s.sp",
                 projection=projection, options=options, progress=False)  # fmt: skip
    with pytest.raises(sp.StoreError, match=r"recorded with them \(the segments featurize was given\)"):
        sp.featurize(runs / "run16", _mlp(), sp.ClassificationTask(), {"main": MAIN, "extra": EXTRA},
                     tmp_path / "s.sp", projection=projection, options=options, progress=False, grow=True)  # fmt: skip


def test_a_run_resumed_with_other_parameter_groups_is_refused_in_one_sentence_and_left_as_it_was(
    tmp_path: Path, runs: Path
) -> None:
    """Resuming a finished run to grow its store, with its layers split into groups at 1:5 inside its stage of one
    rate, raised torch's ValueError from load_state_dict (a traceback); it is one sentence naming the way that works
    (a new stage), the run is left as it was and no recorder's hook stays on the model."""
    shutil.copytree(runs / "run8", tmp_path / "run")
    index = (tmp_path / "run" / "trajectory.json").read_text()
    model = _mlp()
    groups = [{"params": model[0].parameters(), "lr": 0.02}, {"params": model[2].parameters(), "lr": 0.1}]
    split = torch.optim.SGD(groups, momentum=0.9)
    with pytest.raises(sp.TrajectoryError, match=r"The optimizer's parameter groups are not those whose state .* "
                                                 r"begin a new stage \(begin_stage\(optimizer=\.\.\.\)\)"):  # fmt: skip
        sp.TrajectoryRecorder.resume(tmp_path / "run", model, split, save_every=4)
    assert (tmp_path / "run" / "trajectory.json").read_text() == index
    assert not split._optimizer_step_pre_hooks and not split._optimizer_step_post_hooks
    rec = sp.TrajectoryRecorder.resume(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       save_every=4)  # fmt: skip
    rec.begin_stage("extra", dataset_size=len(EXTRA), optimizer=split)  # the groups, in a stage of their own
    _steps(rec, model, split, EXTRA, 4)
    rec.close()
    assert [s.name for s in sp.Trajectory.load(tmp_path / "run").stages] == ["main", "extra"]


def _with_inf(data: TensorDataset, row: int) -> TensorDataset:
    """``data`` with an infinite input in example ``row``: its loss is finite (tanh saturates), its gradient is not
    (0 · ∞ in the first layer's weights), so the check before a store grows lets it through and featurize stops on
    it (a NaN input is refused before the store grows: see above)."""
    x, y = (t.clone() for t in data.tensors)
    x[row, 1] = float("inf")
    return TensorDataset(x, y)


def _files_of(store: Path, names: list[str]) -> dict[str, tuple[int, bytes]]:
    """Every file of the arrays ``names`` (and of their progress entries): ``(mtime_ns, bytes)`` by relative path."""
    found = [p for name in names for root in (store / name, store / "progress" / name) for p in root.rglob("*")]
    return {str(p.relative_to(store)): (p.stat().st_mtime_ns, p.read_bytes()) for p in found if p.is_file()}


def _same_arrays(store: sp.Store, reference: sp.Store) -> None:
    """The stores hold the same row-chunked arrays, bit for bit."""
    assert set(store.progress_arrays()) == set(reference.progress_arrays())
    for name in reference.progress_arrays():
        assert np.array_equal(store.read(name), reference.read(name)), name


@pytest.mark.parametrize(("kind", "grow"), [("rademacher", True), ("rademacher", False), ("eigen", True)])
def test_a_growth_stopped_by_a_bad_new_example_keeps_the_earlier_work_once_the_example_is_fixed(
    tmp_path: Path, runs: Path, monkeypatch: pytest.MonkeyPatch, kind: str, grow: bool
) -> None:
    """Growing into a new stage with an example whose gradient is not finite stopped, and marked the store; the rerun
    on the fixed data started the WHOLE store afresh, recomputing the work it had finished before it grew, which
    never read the new stage's data. That work is now kept as it was (its files untouched, its gradients not
    computed again), the growth alone is done again, and the store ends as a growth of the clean store would (the
    longer run's store featurized at once, with a random projection; the eigen one keeps its first basis). ``grow``:
    the rerun repeats --grow, or is a plain featurize of the longer run. A rerun with other settings is refused
    before anything is dropped."""
    if kind == "rademacher":
        old_store = runs / "s8.sp"  # finished and fitted on main
    else:
        old_store = _featurize(runs / "run8", tmp_path / "s8.sp", {"main": MAIN}, kind=kind).path
    store, clean = (shutil.copytree(old_store, tmp_path / name) for name in ("s.sp", "clean.sp"))
    old = [f"{what}/main/{ckpt_key(step)}" for what in ("grads", "fisher") for step in (0, 4, 8)]
    before = _files_of(store, old)
    assert len(before) > 2 * len(old)
    with pytest.raises(sp.NumericalError, match=r"gradient of training example 3 at checkpoint .* stage 'extra' is Na"):
        _featurize(runs / "run16", store, {"main": MAIN, "extra": _with_inf(EXTRA, 3)}, kind=kind, grow=True)
    assert sp.Store.open(store).meta["nonfinite"]["stage"] == "extra"
    data = {"main": MAIN, "extra": EXTRA}
    stopped = sp.Store.open(store).meta
    refused = r"other settings \((projection: dim 16 → 8[,)]|dim=16 there, dim=8 here).*; pass --force"
    with pytest.raises(sp.StoreError, match=refused):
        sp.featurize(runs / "run16", _mlp(), sp.ClassificationTask(), data, store, progress=False,
                     projection=sp.ProjectionArguments(dim=8, kind=kind),
                     options=sp.FeaturizeArguments(chunk_rows=8))  # fmt: skip
    assert sp.Store.open(store).meta == stopped  # refused before anything was dropped (it used to be replaced)
    counter = _Counted(monkeypatch)
    with pytest.warns(UserWarning, match=r"of stage\(s\) \['extra'\] have changed since, .* keeping that work and"):
        fixed = _featurize(runs / "run16", store, data, kind=kind, grow=grow)
    redone = counter.take()
    grown = _featurize(runs / "run16", clean, data, kind=kind, grow=True)
    assert redone == counter.take()  # the growth's gradients only, as many as a growth of the clean store computes
    assert _files_of(store, old) == before
    _same_arrays(fixed, grown)
    for key in ("projection", "trajectory", "fingerprint", "growth", "featurized", "methods"):
        assert fixed.meta[key] == grown.meta[key], key
    assert not fixed.meta.get("nonfinite") and sp.verify_store(fixed.path).status == "ok"


@pytest.mark.parametrize("kind", ["rademacher", "factored", "eigen"])
def test_a_store_stopped_by_a_bad_example_keeps_the_other_stages_work_once_the_example_is_fixed(
    tmp_path: Path, runs: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A store that never grew, stopped by an example of stage extra whose gradient is not finite, started WHOLE
    afresh once the example was fixed, recomputing stage main's finished work, which never read extra's data. A random
    projection reads no data: main's finished work is now kept as it was (its files untouched, its gradients not
    computed again), extra's is done again, and the store ends as the run's store featurized at once on the fixed
    data. The eigen projection's basis read every stage's data: that store starts afresh, and ends so too."""
    data = {"main": MAIN, "extra": EXTRA}
    store = tmp_path / "s.sp"
    with pytest.raises(sp.NumericalError, match=r"gradient of training example 3 at checkpoint .* stage 'extra' is Na"):
        _featurize(runs / "run16", store, {"main": MAIN, "extra": _with_inf(EXTRA, 3)}, kind=kind)
    stopped = sp.Store.open(store)
    finished = [name for name in stopped.progress_arrays() if "/main/" in name and not stopped.pending_chunks(name)]
    assert len(finished) == 8  # main's gradients and Fisher at steps 0, 4, 8 and 12, before extra's first unit
    before = _files_of(store, finished)
    counter = _Counted(monkeypatch)  # the dense projection's rows
    said = (r"stage\(s\) \['extra'\] have changed since; its projection read no data, so it keeps the work of the "
            "other stages and featurizes those stages afresh") if kind != "eigen" else "nothing in it matches them"
    with pytest.warns(UserWarning, match=said):
        fixed = _featurize(runs / "run16", store, data, kind=kind)
    redone = counter.take()
    clean = _featurize(runs / "run16", tmp_path / "clean.sp", data, kind=kind)
    whole = counter.take()
    if kind == "rademacher":  # all but main's 4 finished units of 20 examples
        assert redone == {quantity: rows - 80 * (quantity != "measurement") for quantity, rows in whole.items()}
    assert (_files_of(store, finished) == before) == (kind != "eigen")
    _same_arrays(fixed, clean)
    for key in ("projection", "trajectory", "fingerprint", "featurized"):
        assert fixed.meta[key] == clean.meta[key], key
    assert not fixed.meta.get("nonfinite") and sp.verify_store(fixed.path).status == "ok"


def test_a_store_stopped_by_a_bad_example_of_its_first_stage_starts_afresh_once_it_is_fixed(
    tmp_path: Path, runs: Path
) -> None:
    """The first stage's examples fingerprint the model (a reference batch of them, which the store keeps): a fix
    there starts the store afresh even with a random projection (kept, it was refused as a model computing other
    outputs on the fixed examples), and it ends as the run's store featurized at once."""
    assert 17 in _seeded_rows(len(MAIN), REFERENCE_ROWS, 0)  # one of the reference examples, in main's third chunk
    store = tmp_path / "s.sp"
    with pytest.raises(sp.NumericalError, match=r"gradient of training example 17 at checkpoint .* stage 'main' is"):
        _featurize(runs / "run16", store, {"main": _with_inf(MAIN, 17), "extra": EXTRA})
    assert sp.Store.open(store).pending_chunks(f"grads/main/{ckpt_key(0)}") == [2]
    with pytest.warns(UserWarning, match="nothing in it matches them: featurizing it afresh"):
        fixed = _featurize(runs / "run16", store, {"main": MAIN, "extra": EXTRA})
    _same_arrays(fixed, sp.Store.open(runs / "scratch16.sp"))


@pytest.mark.parametrize("probe_rows", [256, 4])  # the probe reads every example of extra, the bad one too; or not
def test_a_growth_stopped_by_a_bad_example_probes_its_segmentation_again_once_the_example_is_fixed(
    tmp_path: Path, runs: Path, probe_rows: int
) -> None:
    """A store grown into an AdamW stage with automatic segments probes the data before it cuts; the new stage's data
    given differ from the right ones in every example, and one of them has a gradient that is not finite. It stopped
    the probe after its first chunk (``256``), or the growth's units after the probe had cut where the other examples
    said (``4``, the probe not reading the bad one). The right data keep the work finished before the growth, and
    probe, cut and featurize the growth again: the store ends as a growth of the clean store."""
    run = shutil.copytree(runs / "run8", tmp_path / "run")
    _continue_at_a_ratio(run, "adamw")
    options = sp.FeaturizeArguments(chunk_rows=8, segmentation=sp.SegmentationArguments(auto=3, probe_rows=probe_rows))

    def featurize(store: Path, data: dict) -> sp.Store:
        return sp.featurize(run, _mlp(), sp.ClassificationTask(), data, store, grow=True, progress=False,
                            projection=sp.ProjectionArguments(dim=16, kind="rademacher"), options=options)  # fmt: skip

    store, clean = (shutil.copytree(runs / "s8.sp", tmp_path / name) for name in ("s.sp", "clean.sp"))
    old = [f"{what}/main/{ckpt_key(step)}" for what in ("grads", "fisher") for step in (0, 4, 8)]
    before = _files_of(store, old)
    row = 9 if probe_rows > len(EXTRA) else next(r for r in range(len(EXTRA)) if r not in _probe_rows(10, 4, 1))
    x, y = _with_inf(EXTRA, row).tensors
    x[torch.arange(len(y)) != row] *= 2
    with pytest.raises(sp.NumericalError, match=rf"training example {row} at checkpoint .* stage 'extra' is NaN"):
        featurize(store, {"main": MAIN, "extra": TensorDataset(x, y)})
    stopped = sp.Store.open(store)
    assert bool(stopped.meta.get("segmentation")) == (probe_rows < len(EXTRA))  # cut before the units began
    probed = "probe/grads/extra/step-00000008"  # the probe's first chunk of extra holds the other examples' values
    assert stopped.pending_chunks(probed) == ([1] if probe_rows > len(EXTRA) else [])
    data = {"main": MAIN, "extra": EXTRA}
    with pytest.warns(UserWarning, match=r"of stage\(s\) \['extra'\] have changed since, .* keeping that work and"):
        fixed = featurize(store, data)
    grown = featurize(clean, data)
    assert _files_of(store, old) == before
    _same_arrays(fixed, grown)
    for key in ("segmentation", "trajectory", "fingerprint", "growth", "featurized"):
        assert fixed.meta[key] == grown.meta[key], key


@pytest.mark.parametrize("where", ["fingerprinted", "sampled"])
def test_a_growth_stopped_by_a_bad_example_starts_the_store_afresh_once_the_fix_touches_its_earlier_data(
    tmp_path: Path, runs: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Where the fixed data are the old stage's, which the work the store finished before it grew read, nothing of
    the store is kept: it starts afresh and ends as a store featurized at once on the fixed data. ``fingerprinted``:
    the fix of the new stage's example came with a change to an old stage's example; ``sampled``: the old stage's
    bad example lies where its sampled fingerprint does not read (so the growth took it), and featurize stopped on it
    in the grown work; the digest of that example names the fix."""
    data = {"main": MAIN, "extra": EXTRA}
    if where == "fingerprinted":
        store = shutil.copytree(runs / "s8.sp", tmp_path / "s.sp")
        bad = {"main": MAIN, "extra": _with_inf(EXTRA, 3)}
        x, y = (t.clone() for t in MAIN.tensors)
        x[5] += 1.0
        data["main"] = TensorDataset(x, y)
    else:
        monkeypatch.setattr(provenance, "DATA_ROWS", 4)
        monkeypatch.setattr(provenance, "QUICK_ROWS", 2)
        row = 9  # read by none of the fingerprints and not in the reference batch
        assert all(row not in _seeded_rows(len(MAIN), n, salt) for n, salt in ((4, 2), (2, 1), (REFERENCE_ROWS, 0)))
        store = tmp_path / "s.sp"
        _featurize(runs / "run8", store, {"main": MAIN})
        bad = {"main": _with_inf(MAIN, row), "extra": EXTRA}
    with pytest.raises(sp.NumericalError, match="is NaN or infinite"):
        _featurize(runs / "run16", store, bad, grow=True)
    stage = "extra" if where == "fingerprinted" else "main"
    assert sp.Store.open(store).meta["nonfinite"]["stage"] == stage
    with pytest.warns(UserWarning, match="its training data have changed since, so nothing in it matches them"):
        fixed = _featurize(runs / "run16", store, data, grow=True)
    assert "growth" not in fixed.meta and not fixed.meta.get("nonfinite")
    _same_arrays(fixed, _featurize(runs / "run16", tmp_path / "fresh.sp", data))
