"""A store records what produced it, and refuses inputs that do not belong with it."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.store.provenance import REFERENCE_BATCH, check_data, check_model_values, selection_code

from .crash_driver import DIM, OPTIONS, build_model, data, featurize, files


def test_the_store_records_what_produced_it(tiny_run: Path, tiny_reference: Path) -> None:
    meta = sp.Store.open(tiny_reference).meta
    trajectory = sp.Trajectory.load(tiny_run)
    model = build_model()
    assert meta["format"] == "source-proj-store" and meta["format_version"] == 2
    assert meta["library_version"] == sp.__version__ and meta["featurized"] is True
    assert meta["params"] == [[n, list(p.shape)] for n, p in model.named_parameters()]
    assert meta["projection"] == {
        "kind": "rademacher",
        "dim": DIM,
        "seed": 3,
        "block_rows": 4096,
        "generator": "numpy-philox-4x64-v1",
    }
    assert meta["task"] == sp.ClassificationTask().describe()
    assert meta["trajectory"]["fingerprint"] == trajectory.fingerprint()
    assert meta["trajectory"]["checkpoints"] == [0, 4, 8]
    provenance = meta["provenance"]
    assert provenance["final_checkpoint"] == {
        "step": 8,
        "file": "checkpoints/step-00000008.pt",
        "sha256": trajectory.final_checkpoint.sha256,
    }
    assert provenance["model_class"] == "torch.nn.modules.container.Sequential"
    assert provenance["model_parameters"] == sum(p.numel() for p in model.parameters())
    assert provenance["software"]["torch"] == torch.__version__ and provenance["device"] == "cpu"
    assert provenance["batch_size"] == 4


def _wider() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def test_a_checkpoint_of_another_architecture_is_refused_before_anything_is_written(
    tmp_path: Path, tiny_run: Path
) -> None:
    refusal = r"step-00000000\.pt does not fit the model .*build the model exactly"
    with pytest.raises(sp.TrajectoryError, match=refusal) as err:
        sp.featurize(tiny_run, _wider(), sp.ClassificationTask(), data(), tmp_path / "s.sp", progress=False)
    assert "\t" not in str(err.value) and "\n" not in str(err.value)  # one sentence, torch's tab and lines joined
    assert not (tmp_path / "s.sp").exists()


def test_a_query_model_of_another_architecture_is_refused(tiny_reference: Path) -> None:
    with pytest.raises(sp.TaskError) as err:
        sp.Attributor(tiny_reference, _wider(), sp.ClassificationTask())
    assert str(err.value).startswith(
        f"The query model's attributed parameters do not match those of the store at {tiny_reference} (other shapes: "
        "0.weight [16, 5] vs [8, 5]"
    )
    assert str(err.value).endswith("build the model and parameter selection used for featurize.")


@pytest.mark.parametrize(
    ("task", "differing"),
    [
        (
            sp.RegressionTask(),
            "class 'source_proj.tasks.task.RegressionTask', the store's 'source_proj.tasks.task.ClassificationTask'; "
            "name 'regression', the store's 'classification'",
        ),
        # the field that differs was lost in two whole descriptions printed side by side
        (sp.ClassificationTask(label_smoothing=0.1), "label_smoothing 0.1, the store's None"),
    ],
)
def test_a_query_task_that_is_not_the_stores_is_refused_naming_what_differs(
    tiny_reference: Path, task: sp.Task, differing: str
) -> None:
    with pytest.raises(sp.TaskError) as err:
        sp.Attributor(tiny_reference, build_model(), task)
    assert str(err.value) == (
        f"The task is not the store's ({differing}); query with the task the store was featurized with."
    )


def test_another_parameter_selection_is_refused_with_the_stores_to_pass(tiny_reference: Path) -> None:
    task = sp.ClassificationTask(parameters=sp.ParameterSelection(exclude=("*.bias",)))
    with pytest.raises(sp.TaskError, match=r"^The task selects the parameters .*with the store.s") as err:
        sp.Attributor(tiny_reference, build_model(), task)
    code = str(err.value).rsplit("(parameters=", 1)[1][:-2]  # the argument the sentence names, without ")."
    fixed = eval(f"sp.ClassificationTask(parameters={code})", {"sp": sp})
    assert sp.Attributor(tiny_reference, build_model(), fixed).rows  # the named selection is the store's


@pytest.mark.parametrize(
    "selection",
    [
        sp.ModuleSelection(),
        sp.ModuleSelection(blocks_only=False),
        sp.ModuleSelection(include=("*.mlp.*",), exclude=("h.0.*",), bias=False),
        sp.ParameterSelection(),
        sp.ParameterSelection(include=("0.*",), exclude=("*.bias",), skip_norm=True, skip_embedding=True),
    ],
)
def test_the_named_selection_rebuilds_the_stored_one(selection: Any) -> None:
    code = selection_code({"parameters": selection.describe()})
    assert code.startswith("parameters=sp.")
    rebuilt = eval(code.removeprefix("parameters="), {"sp": sp})
    assert rebuilt == selection and rebuilt.describe() == selection.describe()


def test_a_run_whose_final_checkpoint_is_not_the_stores_is_refused(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path
) -> None:
    # Training went on after featurize: the run's final checkpoint is no longer the store's.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    index = json.loads((run / "trajectory.json").read_text())
    shutil.copy(run / "checkpoints" / "step-00000008.pt", run / "checkpoints" / "step-00000012.pt")
    index["lr"] += [0.2] * 4
    if "clip" in index:
        index["clip"] += [1.0] * 4
    index["stages"][0]["end_step"] = 12
    index["checkpoints"].append({**index["checkpoints"][-1], "step": 12, "file": "checkpoints/step-00000012.pt"})
    (run / "trajectory.json").write_text(json.dumps(index))
    with pytest.raises(sp.StoreError) as err:
        sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask(), trajectory=run)
    assert "(it has checkpoints at steps [0, 4, 8, 12], the store's run at [0, 4, 8])" in str(err.value)
    assert "so its final checkpoint is not the store's query model; pass the original run" in str(err.value)
    # The final checkpoint file was replaced on disk since featurize.
    (run / "checkpoints" / "step-00000008.pt").write_bytes(b"other weights")
    index = json.loads((tiny_run / "trajectory.json").read_text())
    (run / "trajectory.json").write_text(json.dumps(index))
    with pytest.raises(sp.TrajectoryError, match=r"step-00000008\.pt does not match the sha256"):
        sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask(), trajectory=run)


def test_a_store_whose_run_moved_after_it_closed_says_how_to_name_the_new_place(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path
) -> None:
    """An Attributor loads the run from the directory the store records. Moved away, that said only "... is not a
    directory; pass the run directory" (of which, and how, for a store?); now the refusal names the store and how to
    point it at the run, and the featurize it names records the new place without recomputing anything. Another run
    in the old place is refused as not the store's run, never used."""
    shutil.copytree(tiny_run, tmp_path / "run")
    shutil.copytree(tiny_reference, tmp_path / "s.sp")
    featurize(tmp_path / "run", tmp_path / "s.sp")  # the store follows its copied run
    (tmp_path / "run").rename(tmp_path / "moved")
    with pytest.raises(sp.StoreError, match=r"s\.sp records its run at .*run, where there is no run now .*trajectory="):
        sp.Attributor(tmp_path / "s.sp", build_model(), sp.ClassificationTask(), progress=False)
    other = tmp_path / "run"  # another run, recorded where the store's was
    shutil.copytree(tiny_run, other)
    index = json.loads((other / "trajectory.json").read_text())
    index["lr"] = [rate / 2 for rate in index["lr"]]
    (other / "trajectory.json").write_text(json.dumps(index))
    with pytest.raises(sp.StoreError, match=r"where the store at .*s\.sp records its run, is not the store's"):
        sp.Attributor(tmp_path / "s.sp", build_model(), sp.ClassificationTask(), progress=False)
    expected = sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask(), progress=False).scores(data())
    moved = sp.Attributor(tmp_path / "s.sp", build_model(), sp.ClassificationTask(), trajectory=tmp_path / "moved",
                          progress=False)  # fmt: skip
    assert np.array_equal(moved.scores(data()), expected)
    featurize(tmp_path / "moved", tmp_path / "s.sp")
    assert sp.Store.open(tmp_path / "s.sp").meta["trajectory"]["path"] == str((tmp_path / "moved").resolve())
    assert np.array_equal(sp.Attributor(tmp_path / "s.sp", build_model(), sp.ClassificationTask(),
                                        progress=False).scores(data()), expected)  # fmt: skip


def test_another_projection_is_refused_and_leaves_the_store_untouched(tmp_path: Path, tiny_run: Path) -> None:
    store = tmp_path / "s.sp"
    featurize(tiny_run, store)
    before = files(store)
    with pytest.raises(sp.StoreError, match=r"with other settings \(projection: seed 3 → 4\); pass --force"):
        featurize(tiny_run, store, projection=sp.ProjectionArguments(dim=DIM, seed=4, kind="rademacher"))
    assert files(store) == before
    featurize(tiny_run, store, projection=sp.ProjectionArguments(dim=DIM, seed=4, kind="rademacher"), overwrite=True)
    assert sp.Store.open(store).meta["projection"]["seed"] == 4


def test_a_store_of_an_incompatible_format_is_refused(tmp_path: Path, tiny_reference: Path) -> None:
    store = tmp_path / "s.sp"
    shutil.copytree(tiny_reference, store)
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["source_proj"]["format_version"] = 3
    (store / "zarr.json").write_text(json.dumps(root))
    expected = (
        rf"{re.escape(str(store))} was written in store format 3 \(by source-proj {sp.__version__}\) but this "
        "library reads formats 1 and 2; use a matching source-proj version or re-create the store"
    )
    for use in (
        lambda: sp.Attributor(store, build_model(), sp.ClassificationTask()),
        lambda: sp.fit(store, progress=False),
        lambda: sp.verify_store(store),
    ):
        with pytest.raises(sp.StoreError, match=expected):
            use()


def _tanh() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def test_a_model_with_the_same_shapes_but_another_function_is_refused(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path
) -> None:
    with pytest.raises(sp.TaskError) as err:
        sp.Attributor(tiny_reference, _tanh(), sp.ClassificationTask())
    message = str(err.value)
    assert message.startswith(
        f"The model computes other outputs at the final checkpoint than the one the store at {tiny_reference} was "
        "featurized with ("
    )
    assert "although its parameters have the same names and shapes; build the model exactly as for featurize" in message
    sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask())  # the store's own model passes
    store = tmp_path / "s.sp"
    shutil.copytree(tiny_reference, store)
    before = files(store)
    with pytest.raises(sp.TaskError, match="The model computes other outputs"):  # nor may featurize resume with it
        sp.featurize(tiny_run, _tanh(), sp.ClassificationTask(), data(), store, progress=False,
                     projection=sp.ProjectionArguments(dim=DIM, seed=3, kind="rademacher"),
                     options=OPTIONS)  # fmt: skip
    assert files(store) == before


def test_the_model_check_tolerates_float_noise_but_not_a_changed_output(tiny_reference: Path) -> None:
    store = sp.Store.open(tiny_reference)
    recorded = store.meta["fingerprint"]["model"]["values"]
    assert sorted(recorded) == ["loss", "measurement", "output_mean", "output_std"]
    assert all(len(v) == 8 for v in recorded.values())  # the reference batch: 8 training examples
    noisy = {name: [v * (1 + 1e-4 * (-1) ** i) for i, v in enumerate(vs)] for name, vs in recorded.items()}
    check_model_values(store.path, store.meta, noisy)  # CPU/GPU and summation-order differences
    for name in recorded:
        changed = {**recorded, name: [v + 0.05 * max(abs(x) for x in recorded[name]) for v in recorded[name]]}
        with pytest.raises(sp.TaskError, match=f"{name.replace('_', ' ')} of reference example 0"):
            check_model_values(store.path, store.meta, changed)


@pytest.mark.parametrize("change", ["one label", "order"])
def test_training_data_changed_but_of_the_same_size_are_refused(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path, change: str
) -> None:
    store = tmp_path / "s.sp"
    shutil.copytree(tiny_reference, store)
    before = files(store)
    x, y = data().tensors
    if change == "one label":
        y = y.clone()
        y[7] = (y[7] + 1) % 3
    else:
        x, y = x.flip(0), y.flip(0)
    with pytest.raises(sp.TaskError) as err:
        sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), TensorDataset(x, y), store, progress=False,
                     projection=sp.ProjectionArguments(dim=DIM, seed=3, kind="rademacher"),
                     options=OPTIONS)  # fmt: skip
    assert str(err.value) == (
        f"The training data of stage 'main' are not those the store at {store} was featurized with (other contents "
        "or order); pass the original training set in its original order, or featurize these data into a new store "
        "(featurize --force replaces this one)."
    )
    assert files(store) == before


class _Augmented(torch.utils.data.Dataset):
    """The tiny run's 12 examples, read with fresh noise each time (random augmentation)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data()[i]
        return x + 0.01 * torch.randn(5), y


def test_a_dataset_that_reads_differently_each_time_cannot_be_checked_and_says_so(tiny_reference: Path) -> None:
    meta = sp.Store.open(tiny_reference).meta
    with pytest.warns(UserWarning, match=r"read differently twice \(random augmentation\?\)"):
        check_data(str(tiny_reference), meta, {"main": _Augmented()})
    check_data(str(tiny_reference), meta, {"main": data()})  # the store's own data pass silently
    check_data(str(tiny_reference), meta, {"main": data()}, quick=True)


def test_a_featurize_says_once_per_stage_that_its_data_read_differently_twice(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path
) -> None:
    """featurize checks a finished store's data as it opens it and again before its work: the warning that they cannot
    be checked is said once per stage of that featurize, not at each check (and again by the next featurize)."""

    store = tmp_path / "s.sp"
    shutil.copytree(tiny_reference, store)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), _Augmented(), store, progress=False,
                         projection=sp.ProjectionArguments(dim=DIM, seed=3, kind="rademacher"),
                         options=OPTIONS)  # fmt: skip
        said = [str(w.message) for w in seen if "read differently twice" in str(w.message)]
        assert len(said) == 1 and said[0].startswith("The training data of stage 'main' read differently twice")


def test_a_store_written_before_fingerprints_opens_and_says_once_that_it_cannot_be_checked(
    tmp_path: Path, tiny_reference: Path
) -> None:
    store = tmp_path / "old.sp"
    shutil.copytree(tiny_reference, store)
    opened = sp.Store.open(store, writable=True)
    opened.update_meta(fingerprint=None)
    opened.delete(REFERENCE_BATCH)
    with pytest.warns(UserWarning, match="written before source-proj fingerprinted its model and training") as seen:
        sp.Attributor(store, _tanh(), sp.ClassificationTask())
        sp.Attributor(store, build_model(), sp.ClassificationTask())
    assert len(seen) == 1


def test_a_store_that_lost_its_reference_batch_is_refused_not_queried_unchecked(
    tmp_path: Path, tiny_reference: Path
) -> None:
    """A store that recorded its model's fingerprint but lost the reference batch it was taken on (its metadata file
    deleted) was queried with the model unchecked, under a warning that the store predates fingerprints and advice to
    replace it: it is damaged, and verify --repair with the featurize it prints rewrites the batch."""
    store = tmp_path / "s.sp"
    shutil.copytree(tiny_reference, store)
    (store / REFERENCE_BATCH / "zarr.json").unlink()
    with pytest.raises(sp.StoreError, match=rf"lacks its reference batch .*`source-proj verify {store} --repair`"):
        sp.Attributor(store, _tanh(), sp.ClassificationTask())


def test_overwrite_replaces_a_finished_store_of_the_same_settings(tmp_path: Path, tiny_run: Path) -> None:
    store = tmp_path / "s.sp"
    featurize(tiny_run, store)
    reference = files(store)
    sp.Store.open(store, writable=True).write_whole("scratch/left-over", np.arange(3.0))
    featurize(tiny_run, store)  # reused as it is
    assert sp.Store.open(store).has("scratch/left-over")
    featurize(tiny_run, store, overwrite=True)
    assert not sp.Store.open(store).has("scratch/left-over") and files(store) == reference


def test_a_store_of_another_library_version_is_not_reused(tmp_path: Path, tiny_run: Path, tiny_reference: Path) -> None:
    store = tmp_path / "s.sp"
    shutil.copytree(tiny_reference, store)
    sp.Store.open(store, writable=True).update_meta(library_version="0.0.9")
    before = files(store)
    with pytest.raises(sp.StoreError) as err:
        featurize(tiny_run, store)
    assert str(err.value) == (
        f"The store at {store} was featurized by source-proj 0.0.9, this is {sp.__version__}, whose numbers may "
        "differ; pass --force (overwrite=True) to featurize it anew, or use another store path."
    )
    assert files(store) == before
    featurize(tiny_run, store, overwrite=True)
    assert sp.Store.open(store).meta["library_version"] == sp.__version__
