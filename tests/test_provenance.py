"""A store records what produced it, and refuses inputs that do not belong with it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import source_proj as sp

from .crash_driver import DIM, build_model, data, featurize, files


def test_the_store_records_what_produced_it(tiny_run: Path, tiny_reference: Path) -> None:
    meta = sp.Store.open(tiny_reference).meta
    trajectory = sp.Trajectory.load(tiny_run)
    model = build_model()
    assert meta["format"] == "source-proj-store" and meta["format_version"] == 1
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
    with pytest.raises(sp.TrajectoryError, match=r"step-00000000\.pt does not fit the model .*build the model exactly"):
        sp.featurize(tiny_run, _wider(), sp.ClassificationTask(), data(), tmp_path / "s.sp", progress=False)
    assert not (tmp_path / "s.sp").exists()


def test_a_query_model_of_another_architecture_is_refused(tiny_reference: Path) -> None:
    with pytest.raises(sp.TaskError) as err:
        sp.Attributor(tiny_reference, _wider(), sp.ClassificationTask())
    assert str(err.value).startswith(
        "The query model's attributed parameters do not match the store's (other shapes: 0.weight [16, 5] vs [8, 5]"
    )
    assert str(err.value).endswith("build the model and parameter selection used for featurize.")


@pytest.mark.parametrize(
    "task",
    [
        sp.ClassificationTask(parameters=sp.ParameterSelection(exclude=("*.bias",))),
        sp.RegressionTask(),
    ],
    ids=["other parameter selection", "other task"],
)
def test_a_query_task_that_is_not_the_stores_is_refused(tiny_reference: Path, task: sp.Task) -> None:
    with pytest.raises(sp.TaskError, match=r"is not the store's .*query with the task the store was featurized with"):
        sp.Attributor(tiny_reference, build_model(), task)


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
    attributor = sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask(), trajectory=run)
    with pytest.raises(sp.TrajectoryError, match=r"step-00000008\.pt does not match the sha256"):
        attributor.scores(data())


def test_another_projection_is_refused_and_leaves_the_store_untouched(tmp_path: Path, tiny_run: Path) -> None:
    store = tmp_path / "s.sp"
    featurize(tiny_run, store)
    before = files(store)
    with pytest.raises(sp.StoreError, match=r"was featurized with other settings \(projection\); pass --force"):
        featurize(tiny_run, store, projection=sp.ProjectionArguments(dim=DIM, seed=4))
    assert files(store) == before
    featurize(tiny_run, store, projection=sp.ProjectionArguments(dim=DIM, seed=4), overwrite=True)
    assert sp.Store.open(store).meta["projection"]["seed"] == 4


def test_a_store_of_an_incompatible_format_is_refused(tmp_path: Path, tiny_reference: Path) -> None:
    store = tmp_path / "s.sp"
    shutil.copytree(tiny_reference, store)
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["source_proj"]["format_version"] = 2
    (store / "zarr.json").write_text(json.dumps(root))
    expected = (
        rf"{re.escape(str(store))} was written in store format 2 \(by source-proj {sp.__version__}\) but this "
        "library reads format 1; use a matching source-proj version or re-create the store"
    )
    for use in (
        lambda: sp.Attributor(store, build_model(), sp.ClassificationTask()),
        lambda: sp.fit(store, progress=False),
        lambda: sp.verify_store(store),
    ):
        with pytest.raises(sp.StoreError, match=expected):
            use()
