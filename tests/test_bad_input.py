"""Every bad input gets a one-sentence error and leaves no partial result behind.

"No partial result": a store that featurize was creating is removed when the call fails before a
work unit is finished; one that already holds finished work keeps exactly that work (complete,
crc-checked chunks) and nothing half-written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import source_proj as sp
from source_proj.store import provenance

from .crash_driver import DIM, FIT, OPTIONS, build_model, data, featurize, files
from .crash_driver import damage as damage_chunk


def _copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def _rewrite_checkpoint(run: Path, index: int, payload: bytes) -> Path:
    """Replace checkpoint ``index``'s file by ``payload`` and record its sha256 (a run edited by hand)."""
    trajectory = json.loads((run / "trajectory.json").read_text())
    entry = trajectory["checkpoints"][index]
    (run / entry["file"]).write_bytes(payload)
    entry["sha256"] = hashlib.sha256(payload).hexdigest()
    (run / "trajectory.json").write_text(json.dumps(trajectory))
    return run / entry["file"]


def _one_sentence(err: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(err.value)
    assert "\n" not in message and message.endswith((".", ".)")), message
    return message


def test_missing_checkpoint_file(tmp_path: Path, tiny_run: Path) -> None:
    run = _copy_run(tiny_run, tmp_path)
    (run / "checkpoints" / "step-00000004.pt").unlink()
    with pytest.raises(sp.TrajectoryError, match=r"step-00000004\.pt is missing; restore it") as err:
        featurize(run, tmp_path / "s.sp")
    _one_sentence(err)
    assert not (tmp_path / "s.sp").exists()


def test_changed_checkpoint_file(tmp_path: Path, tiny_run: Path) -> None:
    run = _copy_run(tiny_run, tmp_path)
    path = run / "checkpoints" / "step-00000008.pt"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(sp.TrajectoryError, match=r"step-00000008\.pt does not match the sha256") as err:
        featurize(run, tmp_path / "s.sp")
    _one_sentence(err)
    assert not (tmp_path / "s.sp").exists()


def test_unreadable_checkpoint_file(tmp_path: Path, tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _copy_run(tiny_run, tmp_path)
    denied = run / "checkpoints" / "step-00000004.pt"
    real_open = Path.open

    def open_(self: Path, *args, **kwargs):  # the tests run as root, which chmod cannot lock out
        if self == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(sp.TrajectoryError, match=r"step-00000004\.pt cannot be read \(Permission denied\)") as err:
        featurize(run, tmp_path / "s.sp")
    _one_sentence(err)
    assert not (tmp_path / "s.sp").exists()


@pytest.mark.parametrize("payload", ["not a torch file", "truncated"])
def test_checkpoint_torch_cannot_read(tmp_path: Path, tiny_run: Path, payload: str) -> None:
    run = _copy_run(tiny_run, tmp_path)
    original = (run / "checkpoints" / "step-00000004.pt").read_bytes()
    _rewrite_checkpoint(run, 1, b"not a torch file" if payload != "truncated" else original[: len(original) // 2])
    with pytest.raises(sp.TrajectoryError) as err:
        featurize(run, tmp_path / "s.sp")
    message = _one_sentence(err)  # torch reports the truncated archive as an OSError: not a permissions problem
    assert "step-00000004.pt cannot be read by torch.load (" in message
    assert message.endswith("so it is truncated or not a torch checkpoint; restore it from training.")
    assert not (tmp_path / "s.sp").exists()


def test_checkpoint_with_non_finite_weights(tmp_path: Path, tiny_run: Path) -> None:
    run = _copy_run(tiny_run, tmp_path)
    state = build_model().state_dict()
    state["2.weight"][0, 0] = float("inf")
    buffer = tmp_path / "diverged.pt"
    torch.save({"model": state}, buffer)
    _rewrite_checkpoint(run, 2, buffer.read_bytes())
    with pytest.raises(sp.TrajectoryError, match=r"step-00000008\.pt holds NaN or infinite values in '2\.weight'"):
        featurize(run, tmp_path / "s.sp")
    assert not (tmp_path / "s.sp").exists()


def test_trajectory_without_learning_rates(tmp_path: Path, tiny_run: Path) -> None:
    run = _copy_run(tiny_run, tmp_path)
    trajectory = json.loads((run / "trajectory.json").read_text())
    del trajectory["lr"]
    (run / "trajectory.json").write_text(json.dumps(trajectory))
    with pytest.raises(sp.TrajectoryError, match="records no learning rates; SOURCE needs the rate of every step"):
        featurize(run, tmp_path / "s.sp")
    assert not (tmp_path / "s.sp").exists()


def test_a_run_still_being_recorded_is_refused_as_a_trajectory_error(tmp_path: Path, tiny_run: Path) -> None:
    """An unfinished run (``complete: false``) is the trajectory's fault, not a store's: TrajectoryError, as
    docs/reference/errors.md lists it, and no store is begun."""
    run = _copy_run(tiny_run, tmp_path)
    trajectory = json.loads((run / "trajectory.json").read_text())
    trajectory["complete"] = False
    (run / "trajectory.json").write_text(json.dumps(trajectory))
    with pytest.raises(sp.TrajectoryError, match=r"is incomplete \(training was interrupted") as err:
        featurize(run, tmp_path / "s.sp")
    _one_sentence(err)
    assert not (tmp_path / "s.sp").exists()


def test_a_run_interrupted_mid_stage_is_refused_as_incomplete_not_malformed(tmp_path: Path) -> None:
    """A run killed while training leaves the recorder's index with an open stage (``end_step: null``); it was
    refused as a malformed file to be re-recorded, which would throw the training away. It is an incomplete run,
    which the recorder resumes: every reader (``Trajectory.load``, featurize, the command line) says so."""
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = sp.TrajectoryRecorder(tmp_path / "run", model, optimizer, save_every=2)
    recorder.begin_stage("main", dataset_size=len(data()))
    for x, y in DataLoader(data(), batch_size=16):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        recorder.step()  # never closed: the index on disk is that of a run still training
    incomplete = r"is incomplete \(training was interrupted or close\(\) was not called\); finish training "
    with pytest.raises(sp.TrajectoryError, match=incomplete) as err:
        sp.Trajectory.load(tmp_path / "run")
    assert "TrajectoryRecorder.resume continues an interrupted run" in _one_sentence(err)
    with pytest.raises(sp.TrajectoryError, match=incomplete):
        featurize(tmp_path / "run", tmp_path / "s.sp")
    assert not (tmp_path / "s.sp").exists()
    recorder.close()
    assert sp.Trajectory.load(tmp_path / "run").complete


def test_empty_dataset(tmp_path: Path, tiny_run: Path) -> None:
    empty = TensorDataset(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    with pytest.raises(sp.TaskError, match="The training dataset of stage 'main' is empty") as err:
        sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), empty, tmp_path / "s.sp", progress=False)
    _one_sentence(err)
    assert not (tmp_path / "s.sp").exists()


class _Unreadable(Dataset):
    """The tiny training set, its example ``bad`` raising ``error`` as a dataset with a broken file would."""

    def __init__(self, bad: int, error: Exception) -> None:
        self.examples, self.bad, self.error = data(), bad, error

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == self.bad:
            raise self.error
        return self.examples[index]


def _featurize_data(run: Path, dataset: Dataset, store: Path, workers: int = 0) -> sp.Store:
    """``featurize`` of the tiny problem, on ``dataset``, with ``workers`` DataLoader workers."""
    return sp.featurize(run, build_model(), sp.ClassificationTask(), dataset, store,
                        projection=sp.ProjectionArguments(dim=DIM, seed=3, kind="rademacher"),
                        options=sp.FeaturizeArguments(batch_size=4, chunk_rows=4, device="cpu", num_workers=workers),
                        progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("error", "shown", "workers"),
    [
        (OSError("cannot read 9.png"), "OSError: cannot read 9.png", 0),
        (KeyError("label"), "KeyError: 'label'", 0),
        (IndexError("list index out of range"), "IndexError: list index out of range", 0),
        # raised in a DataLoader worker, which the failed call leaves alive until garbage collection
        (ValueError("bad JPEG"), "ValueError: bad JPEG", 2),
    ],
)
def test_an_example_the_dataset_cannot_read_is_named_as_the_datasets_error_and_the_store_resumes(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path, monkeypatch: pytest.MonkeyPatch, error: Exception,
    shown: str, workers: int,
) -> None:
    # The data's fingerprint reads every example of a set this small: let it read a sample without example 9, as it
    # would in a large set, so that featurize's loop meets the broken example after finishing chunks 0 and 1.
    monkeypatch.setattr(provenance, "DATA_ROWS", 4)
    monkeypatch.setattr(provenance, "QUICK_ROWS", 2)
    store = tmp_path / "s.sp"
    with pytest.raises(sp.TaskError) as err:
        _featurize_data(tiny_run, _Unreadable(9, error), store, workers)
    assert _one_sentence(err) == (
        f"The dataset raised an error of its own reading training example 9 of stage 'main' ({shown}); fix that "
        "example in the dataset and run again (a store featurize was writing resumes where it stopped)."
    )
    assert sp.Store.open(store).pending_chunks("grads/main/step-00000000") == [2]
    _featurize_data(tiny_run, data(), store)  # the dataset fixed: the store resumes, and is the uninterrupted one's
    _assert_same_features(store, tiny_reference)


class _Batched(_Unreadable):
    """``_Unreadable`` with a batched read, as a Hugging Face dataset has: it counts the batches it reads."""

    batches = 0

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        type(self).batches += 1
        return [self[index] for index in indices]


def test_a_datasets_own_batched_read_is_used_and_an_example_it_fails_on_still_named(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provenance, "DATA_ROWS", 4)
    monkeypatch.setattr(provenance, "QUICK_ROWS", 2)
    monkeypatch.setattr(_Batched, "batches", 0)
    store = tmp_path / "s.sp"
    with pytest.raises(sp.TaskError) as err:
        _featurize_data(tiny_run, _Batched(9, OSError("cannot read 9.png")), store)
    assert "reading training example 9 of stage 'main' (OSError: cannot read 9.png)" in _one_sentence(err)
    assert _Batched.batches > 0  # featurize's loop read its batches through it
    monkeypatch.setattr(_Batched, "batches", 0)
    _featurize_data(tiny_run, _Batched(-1, OSError("never")), store)
    assert _Batched.batches > 0
    _assert_same_features(store, tiny_reference)


def _assert_same_features(path: Path, reference_path: Path) -> None:
    """The store at ``path`` holds the same projected gradients as the one at ``reference_path``, bit for bit."""
    store, reference = sp.Store.open(path), sp.Store.open(reference_path)
    names = reference.progress_arrays("grads/")
    assert names and store.progress_arrays("grads/") == names
    for name in names:
        np.testing.assert_array_equal(store.read(name), reference.read(name))


def test_an_example_the_dataset_cannot_read_is_named_before_a_store_is_written(tmp_path: Path, tiny_run: Path) -> None:
    """In a set this small the data's fingerprint reads every example, before the store is created."""
    with pytest.raises(sp.TaskError) as err:
        _featurize_data(tiny_run, _Unreadable(5, OSError("cannot read 5.png")), tmp_path / "s.sp")
    assert "reading training example 5 of stage 'main' (OSError: cannot read 5.png)" in _one_sentence(err)
    assert not (tmp_path / "s.sp").exists()


class _OddOne(Dataset):
    """The tiny training set, its example 9 replaced by ``odd`` (as a broken file may read)."""

    def __init__(self, odd: object) -> None:
        self.examples, self.odd = data(), odd

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> object:
        return self.odd if index == 9 else self.examples[index]


@pytest.mark.parametrize(
    ("odd", "error"),
    [
        (lambda x, y: (x[:3], y), "RuntimeError: stack expects each tensor to be equal size, but got [5] at entry 0 "
         "and [3] at entry 1"),  # a grey image among colour ones
        (lambda x, y: None, "TypeError: "),  # a dataset that skips what it cannot read
        (lambda x, y: (x,), "RuntimeError: "),
    ],
)
def test_an_example_shaped_unlike_the_others_of_its_batch_is_named(
    tmp_path: Path, tiny_run: Path, odd: Callable[[torch.Tensor, torch.Tensor], object], error: str
) -> None:
    """Example 9 is first batched in featurize's loop (the data's fingerprint reads it alone, the reference batch
    does not hold it); not "failed unexpectedly … a bug"."""
    x, y = data()[9]
    with pytest.raises(sp.TaskError) as err:
        _featurize_data(tiny_run, _OddOne(odd(x, y)), tmp_path / "s.sp")
    message = _one_sentence(err)
    assert message.startswith(
        "The dataset's training example 9 of stage 'main' differs in shape or structure from the other examples of "
        f"its batch ({error}"
    ), message
    assert message.endswith(
        "); fix that example in the dataset and run again (a store featurize was writing resumes where it stopped)."
    )
    assert sp.Store.open(tmp_path / "s.sp").pending_chunks("grads/main/step-00000000") == [2]


def test_a_query_the_dataset_cannot_read_is_named(tiny_reference: Path) -> None:
    attributor = sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask())
    with pytest.raises(sp.TaskError) as err:
        attributor.top_k(_Unreadable(3, OSError("cannot read 3.png")), 2)
    assert _one_sentence(err) == (  # nothing resumes: a query is read again
        "The dataset raised an error of its own reading query 3 (OSError: cannot read 3.png); fix that example in the "
        "dataset and run again."
    )


def _without_the_first(examples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A collate function that leaves out each batch's first example (as one that skips a bad example would)."""
    return torch.utils.data.default_collate(examples[1:])


def test_a_collate_function_that_drops_examples_is_refused(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path
) -> None:
    """Every row after a dropped example would be scored as the one before it: featurize and queries refuse."""
    dropping = sp.CollatedDataset(data(), _without_the_first)
    with pytest.raises(sp.TaskError) as err:
        _featurize_data(tiny_run, dropping, tmp_path / "s.sp")
    assert _one_sentence(err) == (
        f"The collate function made a batch of {provenance.REFERENCE_ROWS - 1} examples from "
        f"{provenance.REFERENCE_ROWS}; each example's score is kept at its place in the dataset, so the collate "
        "function must return every example it is given (leave bad examples out of the dataset itself, not out of "
        "its batches)."
    )
    assert not (tmp_path / "s.sp").exists()
    attributor = sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask(), batch_size=4)
    with pytest.raises(sp.TaskError, match=r"^The collate function made a batch of 3 examples from 4; each"):
        attributor.top_k(dropping, 2)


class _Streamed(IterableDataset):
    """The tiny training set as a stream, without an index."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(data())


_NO_INDEX = (
    "cannot be read by index; pass a dataset with __len__ and __getitem__ (a map-style Dataset, or a list of the "
    "examples)."
)
_A_LOADER = (
    "are a DataLoader; pass the dataset it reads (loader.dataset), whose examples are read by their index and batched "
    "by the library (a shuffled loader's order is not theirs)."
)


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (lambda: _Streamed(), f"(a _Streamed) {_NO_INDEX}"),
        (lambda: (example for example in data()), f"(a generator) {_NO_INDEX}"),
        (lambda: DataLoader(data(), batch_size=1, shuffle=True), _A_LOADER),  # a length, and no index
        (lambda: DataLoader(data(), batch_size=4), _A_LOADER),  # its length is its 3 batches'
    ],
)
def test_data_without_an_index_are_refused_before_any_work(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path, given: Callable[[], object], said: str
) -> None:
    with pytest.raises(sp.TaskError) as err:
        _featurize_data(tiny_run, given(), tmp_path / "s.sp")  # type: ignore[arg-type]
    assert _one_sentence(err) == f"The training data of stage 'main' {said}"
    assert not (tmp_path / "s.sp").exists()
    attributor = sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask())
    with pytest.raises(sp.TaskError) as err:
        attributor.top_k(given(), 2)  # type: ignore[arg-type]
    assert _one_sentence(err) == f"The queries {said}"


def _with_label(index: int, label: int) -> TensorDataset:
    x, y = data().tensors
    y = y.clone()
    y[index] = label
    return TensorDataset(x, y)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_integer_labels_of_any_width_are_class_ids(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path, dtype: torch.dtype
) -> None:
    """Cross-entropy trains on uint8 labels as on int64 ones: the store is the same."""
    x, y = data().tensors
    _featurize_data(tiny_run, TensorDataset(x, y.to(dtype)), tmp_path / "s.sp")
    _assert_same_features(tmp_path / "s.sp", tiny_reference)


def test_float_labels_are_refused_as_not_class_ids(tmp_path: Path, tiny_run: Path) -> None:
    x, y = data().tensors
    with pytest.raises(sp.TaskError) as err:
        _featurize_data(tiny_run, TensorDataset(x, torch.nn.functional.one_hot(y, 3).float()), tmp_path / "s.sp")
    assert _one_sentence(err) == (
        f"ClassificationTask takes integer class ids as labels, but a batch of the data holds float32 labels of shape "
        f"[{provenance.REFERENCE_ROWS}, 3]; give each example its class id (of one-hot rows, their argmax)."
    )
    assert not (tmp_path / "s.sp").exists()


def test_dict_examples_for_a_task_that_reads_pairs_are_refused_as_such(tmp_path: Path, tiny_run: Path) -> None:
    """Not "the model cannot run on the training examples (KeyError: 0)": the task cannot read them."""
    x, y = data().tensors
    with pytest.raises(sp.TaskError) as err:
        _featurize_data(tiny_run, [{"x": x[i], "y": y[i]} for i in range(len(y))], tmp_path / "s.sp")
    assert _one_sentence(err) == (
        "ClassificationTask takes examples (input, label, …), not dicts (keys ['x', 'y']); give tuples, as "
        "TensorDataset(inputs, labels) does, or a task whose forward reads the keys (a Task subclass's own, or "
        "sp.SequenceClassificationTask for tokenized text)."
    )
    assert not (tmp_path / "s.sp").exists()


def test_labels_out_of_range(tmp_path: Path, tiny_run: Path) -> None:
    with pytest.raises(sp.TaskError, match=r"Labels must lie in \[0, 2\] .* labels from \d to 7") as err:
        sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), _with_label(1, 7), tmp_path / "a.sp",
                     projection=sp.ProjectionArguments(dim=12, kind="rademacher"),
                     options=sp.FeaturizeArguments(chunk_rows=4), progress=False)  # fmt: skip
    _one_sentence(err)
    assert not (tmp_path / "a.sp").exists()
    # A bad label in the third chunk: the two chunks before it are finished work and stay, complete.
    with pytest.raises(sp.TaskError, match="Labels must lie"):
        sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), _with_label(9, -1), tmp_path / "b.sp",
                     projection=sp.ProjectionArguments(dim=12, kind="rademacher"),
                     options=sp.FeaturizeArguments(chunk_rows=4), progress=False)  # fmt: skip
    store = sp.Store.open(tmp_path / "b.sp")
    assert store.pending_chunks("grads/main/step-00000000") == [2]
    report = sp.verify_store(store.path, progress=False)
    assert report.status == "incomplete" and report.damaged == [] and report.problems == []


def test_projection_dimension_larger_than_the_parameter_count(tmp_path: Path, tiny_run: Path) -> None:
    with pytest.raises(sp.TaskError, match=r"dimension 100 is larger than the 75 selected parameters") as err:
        featurize(tiny_run, tmp_path / "s.sp", projection=sp.ProjectionArguments(dim=100, kind="rademacher"))
    _one_sentence(err)
    assert not (tmp_path / "s.sp").exists()


def test_non_finite_gradient_names_the_checkpoint_and_the_example(tmp_path: Path, tiny_run: Path) -> None:
    x, y = data().tensors
    x = x.clone()
    x[2, 3] = float("nan")
    with pytest.raises(sp.NumericalError) as err:
        sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), TensorDataset(x, y), tmp_path / "s.sp",
                     projection=sp.ProjectionArguments(dim=12, kind="rademacher"),
                     options=sp.FeaturizeArguments(chunk_rows=4), progress=False)  # fmt: skip
    message = _one_sentence(err)
    assert "training-loss gradient of training example 2 at checkpoint checkpoints/step-00000000.pt" in message
    assert not (tmp_path / "s.sp").exists()


def test_non_finite_query_names_the_query(tiny_reference: Path) -> None:
    x, y = data().tensors
    x = x[:5].clone()
    x[3, 0] = float("inf")
    attributor = sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask())
    with pytest.raises(sp.NumericalError) as err:
        attributor.top_k(TensorDataset(x, y[:5]), 2)
    assert "measurement gradient of query 3 at checkpoint step 8 is NaN or infinite" in _one_sentence(err)


def test_queries_without_labels_are_refused_as_such(tiny_reference: Path) -> None:
    """A bare tensor of inputs would otherwise be read row by row as an input and its labels."""
    x, _ = data().tensors
    attributor = sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask())
    for queries, got in ((x[:3], "a Tensor"), (TensorDataset(x[:3]), "inputs alone")):
        with pytest.raises(sp.TaskError) as err:
            attributor.scores(queries)
        assert _one_sentence(err) == (
            f"ClassificationTask takes examples (input, label, …), not {got}; pass a dataset of pairs such as "
            "TensorDataset(inputs, labels)."
        )


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"segments_per_stage": "3"}, "FitArguments.segments_per_stage is '3'; pass a whole number ≥ 1."),
        ({"segments_per_stage": 2.5}, "FitArguments.segments_per_stage is 2.5; pass a whole number ≥ 1."),
        ({"auto_segments": True}, "FitArguments.auto_segments is True; pass a whole number ≥ 0."),
        ({"boundaries": "4"}, "FitArguments.boundaries is '4'; pass a non-empty tuple of whole numbers ≥ 0."),
        ({"boundaries": 4}, "FitArguments.boundaries is 4; pass a non-empty tuple of whole numbers ≥ 0."),
        ({"boundaries": (4.5,)}, "FitArguments.boundaries is (4.5,); pass a non-empty tuple of whole numbers ≥ 0."),
    ],
)
def test_fit_arguments_that_are_not_whole_numbers_are_refused(arguments: dict, expected: str) -> None:
    with pytest.raises(sp.TaskError) as err:
        sp.FitArguments(**arguments)
    assert _one_sentence(err) == expected


def test_segment_boundaries_outside_the_run_are_refused(tmp_path: Path, tiny_reference: Path) -> None:
    """A cut at a step the run never took (a typo) is refused instead of being silently dropped."""
    store = tmp_path / "s.sp"
    shutil.copytree(tiny_reference, store)
    before = files(store)
    with pytest.raises(sp.TrajectoryError) as err:
        sp.fit(store, sp.FitArguments(boundaries=(4, 80), method="cut"), progress=False)
    assert _one_sentence(err) == "Segment boundaries [80] lie outside the run's steps 0 to 8; cut at steps inside it."
    assert files(store) == before
    sp.fit(store, sp.FitArguments(boundaries=(0, 4, 8), method="cut"), progress=False)  # stage edges are fine


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_damaged_chunk_is_named_with_the_repair_command(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path, damage: str
) -> None:
    store = tmp_path / "s.sp"
    shutil.copytree(tiny_reference, store)
    damage_chunk(store, "fisher/main/step-00000004", 1, "truncate" if damage == "truncated" else "flip")
    before = files(store)
    # A truncated shard file loses the index of all its chunks (the first is named); a flipped bit, one chunk.
    chunk, rows = (0, "0–3") if damage == "truncated" else (1, "4–7")
    reason = "unreadable" if damage == "truncated" else "its crc32 differs from the one recorded"
    with pytest.raises(sp.StoreError) as err:
        sp.fit(store, FIT, progress=False)
    message = _one_sentence(err)
    assert message.startswith(
        f"Chunk {chunk} (rows {rows}) of 'fisher/main/step-00000004' in {store} is damaged ({reason}"
    )
    assert f"run `source-proj verify {store} --repair`, then re-run the command that wrote it" in message
    assert files(store) == before  # fit wrote nothing
    assert sp.verify_store(store, repair=True, progress=False).repaired
    featurize(tiny_run, store)
    sp.fit(store, FIT, progress=False)
    assert files(store) == files(tiny_reference)


def test_a_dense_projection_that_redraws_every_batch_on_the_cpu_is_warned_about(
    tmp_path: Path, tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One sentence naming the factored projection; the store is still made (a warning, not a refusal)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a small dense projection: no warning
        featurize(tiny_run, tmp_path / "small.sp", projection=sp.ProjectionArguments(dim=8, kind="rademacher"))
    monkeypatch.setattr(sp.RademacherProjector, "redraws_every_batch", lambda self: True)
    with pytest.warns(UserWarning, match=r"GiB matrix it redraws for every batch on the CPU.*'factored'") as seen:
        featurize(tiny_run, tmp_path / "big.sp", projection=sp.ProjectionArguments(dim=8, kind="rademacher"))
    assert len(seen) == 1 and str(seen[0].message).count(". ") == 0
    assert sp.Store.open(tmp_path / "big.sp").meta["projection"]["kind"] == "rademacher"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the factored projection never redraws a dense matrix
        featurize(tiny_run, tmp_path / "factored.sp", projection=sp.ProjectionArguments(dim=8, kind="factored"))


def test_papercuts_of_the_second_audit_are_refused_or_warned(tmp_path: Path) -> None:
    """Each used to pass in silence: a module_dims pattern that matches no layer (k stayed as it was), a basis option
    on a projection without a basis, fit(store, None) (an AttributeError), an AdamW run recorded without the state
    SOURCE reads, and an empty --checkpoints list (it featurized every checkpoint)."""
    import click
    from torch import nn

    from source_proj.cli.main import _ints
    from source_proj.projection.factory import make_projector

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters()]
    with pytest.raises(sp.TaskError, match=r"module_dims pattern\(s\) \['nomatch\*'\] match no factored layer"):
        make_projector("factored", shapes, 32, 0, model=model, module_dims={"nomatch*": 16})
    with pytest.raises(sp.TaskError, match="basis_checkpoints sets the eigen projection's basis; kind='factored'"):
        sp.ProjectionArguments(kind="factored", basis_checkpoints=2)
    with pytest.raises(sp.TaskError, match="fit's args is None; pass a FitArguments"):
        sp.fit(tmp_path / "s.sp", None)  # type: ignore[arg-type]
    with pytest.raises(click.BadParameter, match="expected comma-separated integers, got ''"):
        _ints("", "--checkpoints")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=2, save_optimizer_state=False)
    with pytest.warns(UserWarning, match="trains with adamw but the recorder was made with save_optimizer_state=False"):
        rec.begin_stage("main", dataset_size=4)


def test_a_store_of_other_settings_names_the_fields_that_differ() -> None:
    """featurize's refusal says what differs, not just the setting: the setting's own fields first, a nested map's
    (the eigen basis, derived from them) only where nothing else differs."""
    from source_proj.featurize.featurize import _detail

    old = {"kind": "eigen", "dim": 64, "basis": {"positions": 64, "digest": "a"}}
    assert _detail("projection", old, {**old, "dim": 32, "basis": {"positions": 64, "digest": "b"}}) == (
        "projection: dim 64 → 32"
    )
    assert _detail("projection", old, {**old, "basis": {"positions": 4, "digest": "a"}}) == (
        "projection: basis.positions 64 → 4"
    )
    trajectory = {"path": "run", "checkpoints": [0, 4, 8], "fingerprint": "f" * 64}
    assert _detail("trajectory", trajectory, {**trajectory, "checkpoints": [4, 8]}) == (
        "trajectory: checkpoints [0, 4, 8] → [4, 8]"
    )
    assert _detail("task", "classification", "regression") == "task"


def _with_nan(example: int) -> TensorDataset:
    """The tiny training set with a NaN in example ``example``'s input."""
    x, y = data().tensors
    x = x.clone()
    x[example, 3] = float("nan")
    return TensorDataset(x, y)


def _assert_same_store(path: Path, reference_path: Path) -> None:
    """The store at ``path`` holds what the one at ``reference_path`` holds: the same arrays, bit for bit, and the
    same projection (its eigen basis too) and fingerprints."""
    store, reference = sp.Store.open(path), sp.Store.open(reference_path)
    names = reference.progress_arrays()
    assert names and store.progress_arrays() == names
    for name in names:
        np.testing.assert_array_equal(store.read(name), reference.read(name))
    for key in ("projection", "fingerprint", "featurize", "featurized"):
        assert store.meta[key] == reference.meta[key], key
    assert not store.meta.get("nonfinite")


def test_verify_of_a_store_stopped_by_a_nan_example_says_so_and_to_fix_the_example_first(
    tmp_path: Path, tiny_run: Path
) -> None:
    """verify of a store featurize stopped on a NaN gradient said only to re-run featurize as before, which stops at
    the same example again: it now notes the stop and says to fix that example first."""
    store = tmp_path / "s.sp"
    projection = sp.ProjectionArguments(dim=DIM, seed=3, kind="rademacher")
    arguments = {"projection": projection, "options": OPTIONS, "progress": False}
    with pytest.raises(sp.NumericalError) as err:
        sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), _with_nan(11), store, **arguments)
    report = sp.verify_store(store, progress=False)
    assert report.status == "incomplete" and f"featurize stopped: {_one_sentence(err)}" in report.notes
    assert [step[:46] for step in report.next_steps] == ["fix the example featurize stopped on, then re-"]


@pytest.mark.parametrize(("kind", "bad", "sampled"), [("rademacher", 11, False), ("eigen", 11, False),
                                                      ("rademacher", 9, True)])  # fmt: skip
def test_a_store_stopped_by_a_nan_example_starts_afresh_once_the_data_are_fixed(
    tmp_path: Path, tiny_run: Path, monkeypatch: pytest.MonkeyPatch, kind: str, bad: int, sampled: bool
) -> None:
    """A featurize that met a NaN gradient late kept the store with the bad data's fingerprint, so the rerun on the
    fixed data was refused as "not those the store was featurized with" and needed --force. The refusal now says what
    to do, and the rerun on fixed data starts the store afresh (saying so): it equals a fresh featurize of those
    data, also where the data's fingerprint, a sample of a large set (``sampled``), does not read the example fixed.
    The same bad data resume (and stop again); a store that finished is still refused other data."""
    if sampled:  # the fingerprint reads examples 0, 1, 7 and 11 (and 5, 8): not the bad one
        monkeypatch.setattr(provenance, "DATA_ROWS", 4)
        monkeypatch.setattr(provenance, "QUICK_ROWS", 2)
    projection = sp.ProjectionArguments(dim=DIM, seed=3, kind=kind, basis_examples=6)  # eigen: the basis draws 6
    arguments = {"projection": projection, "options": OPTIONS, "progress": False}  # examples, not example 11
    store, fresh = tmp_path / "s.sp", tmp_path / "fresh.sp"
    for _ in range(2):  # the same bad data: the store resumes, and stops at the same example
        with pytest.raises(sp.NumericalError) as err:
            sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), _with_nan(bad), store, **arguments)
        assert _one_sentence(err) == (
            f"The training-loss gradient of training example {bad} at checkpoint checkpoints/step-00000000.pt, stage "
            "'main' is NaN or infinite; fix that example's input or label (or the checkpoint's weights) and run "
            "featurize again, which does afresh what in this store read training data that changed since."
        )
        assert sp.Store.open(store).pending_chunks("grads/main/step-00000000") == [2]  # chunks 0 and 1 finished
    with pytest.warns(UserWarning, match=f"The store at {store} stopped on a NaN or infinite gradient and its "
                      "training data have changed since, so nothing in it matches them: featurizing it afresh"):
        sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), data(), store, **arguments)
    sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), data(), fresh, **arguments)
    _assert_same_store(store, fresh)
    with pytest.raises(sp.TaskError, match="The training data of stage 'main' are not those the store at"):
        sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), _with_nan(0), store, **arguments)


class _Counted(Dataset):
    """The tiny training set, counting the examples read."""

    def __init__(self) -> None:
        self.examples, self.reads = data(), 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        self.reads += 1
        return self.examples[index]


def test_a_model_builder_or_task_class_given_for_the_object_is_named_before_any_work(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path
) -> None:
    """``build_model`` for ``build_model()``, ``ClassificationTask`` for ``ClassificationTask()``: an AttributeError
    or TypeError from deep inside featurize or the Attributor, now one sentence naming what to pass."""
    model, task, store = build_model(), sp.ClassificationTask(), tmp_path / "s.sp"
    expected = {
        "model": "The model given is the function build_model, not a torch.nn.Module; pass what it returns: "
                 "build_model().",
        "task": "The task given is the class ClassificationTask, not a Task; pass an instance of it: "
                "ClassificationTask(...).",
        "string": "The task given is a str, not a Task; pass one such as sp.ClassificationTask().",
    }
    for what, (m, t) in {"model": (build_model, task), "task": (model, sp.ClassificationTask),
                         "string": (model, "classification")}.items():
        with pytest.raises(sp.TaskError) as err:
            sp.featurize(tiny_run, m, t, data(), store, progress=False)  # type: ignore[arg-type]
        assert _one_sentence(err) == expected[what]
        assert not store.exists()
        with pytest.raises(sp.TaskError) as err:
            sp.Attributor(tiny_reference, m, t)  # type: ignore[arg-type]
        assert _one_sentence(err) == expected[what]


@pytest.mark.parametrize("k", [0, 13, 2.0])
def test_a_top_k_out_of_range_is_refused_before_any_query_is_read(tiny_reference: Path, k: object) -> None:
    """k is checked against the 12 training rows before the query gradients are taken (not after), by the Attributor
    and by an Ensemble."""
    for attributor in (sp.Attributor(tiny_reference, build_model(), sp.ClassificationTask()),
                       sp.Ensemble.open([tiny_reference], build_model(), sp.ClassificationTask())):
        queries = _Counted()
        with pytest.raises(sp.TaskError, match="top-k"):
            attributor.top_k(queries, k)  # type: ignore[arg-type]
        assert queries.reads == 0


def test_attribute_refuses_a_top_k_larger_than_the_training_set_before_featurizing(
    tmp_path: Path, tiny_run: Path
) -> None:
    with pytest.raises(sp.TaskError) as err:
        sp.attribute(tiny_run, build_model(), sp.ClassificationTask(), data(), data(), tmp_path / "s.sp", top_k=50,
                     projection=sp.ProjectionArguments(dim=DIM, kind="rademacher"), options=OPTIONS, progress=False)
    assert _one_sentence(err) == (
        "top-k 50 is not between 1 and the 12 training examples the method scores; ask for 1 to 12."
    )
    assert not (tmp_path / "s.sp").exists()


def test_fit_baseline_given_a_kind_for_its_arguments_says_how_to_pass_it(tiny_reference: Path) -> None:
    with pytest.raises(sp.TaskError) as err:
        sp.fit_baseline(tiny_reference, "trak")  # type: ignore[arg-type]
    assert _one_sentence(err) == "fit_baseline's args is 'trak'; pass a BaselineArguments(kind='trak')."


def test_a_store_given_for_the_run_and_a_run_for_the_store_are_named_as_such(tmp_path: Path, tiny_run: Path,
                                                                                tiny_reference: Path) -> None:
    """Both read "no trajectory.json" / "No store at" before, which says nothing of the swap."""
    with pytest.raises(sp.TrajectoryError) as err:
        featurize(tiny_reference, tmp_path / "s.sp")
    assert _one_sentence(err) == (
        f"{tiny_reference} is a source-proj store, not a training run; pass the run directory it was featurized from "
        f"({tiny_run}, as the store records it)."
    )
    assert not (tmp_path / "s.sp").exists()
    for opens in (sp.Store.open, sp.fit, sp.verify_store,
                  lambda path: sp.Attributor(path, build_model(), sp.ClassificationTask())):
        with pytest.raises(sp.StoreError) as err:
            opens(tiny_run)
        assert _one_sentence(err) == (
            f"{tiny_run} is a training run recorded by TrajectoryRecorder, not a store; pass the store featurize "
            "wrote from it, or create one with `source-proj featurize` (source_proj.featurize)."
        )


def test_training_columns_given_for_a_dataset_and_one_store_for_an_ensemble_are_named(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path
) -> None:
    """featurize(..., (x, y), ...) read 'trained on 12 examples but its dataset has 2', as though the data were
    short; Ensemble.open("m.sp", ...) took the path's characters for stores ('given the store / twice')."""
    with pytest.raises(sp.TaskError) as err:
        sp.featurize(tiny_run, build_model(), sp.ClassificationTask(), data().tensors, tmp_path / "s.sp",
                     progress=False)
    assert _one_sentence(err) == (
        "The training data of stage 'main' are a tuple of 2 tensors of 12 rows (inputs, labels, …), not a dataset of "
        "examples; pass TensorDataset(*tensors)."
    )
    assert not (tmp_path / "s.sp").exists()
    for one in (tiny_reference, str(tiny_reference)):
        with pytest.raises(sp.TaskError) as err:
            sp.Ensemble.open(one, build_model(), sp.ClassificationTask())  # type: ignore[arg-type]
        assert _one_sentence(err) == (
            f"Ensemble.open takes a list of stores, one per trained model, not the one store {tiny_reference}; pass "
            "[store, …], or query a single model's store with sp.Attributor."
        )


@pytest.mark.parametrize("queries", ["empty", "loader"])
def test_attribute_refuses_queries_it_cannot_score_before_featurizing(
    tmp_path: Path, tiny_run: Path, queries: str
) -> None:
    """No query, or a DataLoader of them, was refused only by the query, once the whole run was featurized and fit."""
    given = {"empty": TensorDataset(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)),
             "loader": DataLoader(data(), batch_size=4)}[queries]
    with pytest.raises(sp.TaskError) as err:
        sp.attribute(tiny_run, build_model(), sp.ClassificationTask(), data(), given, tmp_path / "s.sp", top_k=3,
                     projection=sp.ProjectionArguments(dim=DIM, kind="rademacher"), options=OPTIONS, progress=False)
    assert _one_sentence(err).startswith(
        {"empty": "There are no queries to score", "loader": "The queries are a DataLoader"}[queries]
    )
    assert not (tmp_path / "s.sp").exists()


@pytest.mark.parametrize("which", ["model", "examples"])
def test_a_model_or_examples_of_another_dtype_are_named_as_such(tmp_path: Path, tiny_run: Path, which: str) -> None:
    """A float64 model (build_model().double()) on the run's float32 checkpoints was told to 'pass examples typed as
    the model was trained on', which they were; the refusal now names the dtypes as what differs, on either side."""
    model = build_model().double() if which == "model" else build_model()
    x, y = data().tensors
    examples = TensorDataset(x.double(), y) if which == "examples" else data()
    with pytest.raises(sp.TaskError) as err:
        sp.featurize(tiny_run, model, sp.ClassificationTask(), examples, tmp_path / "s.sp", progress=False)
    assert _one_sentence(err).endswith(
        "whose dtype is not its weights'; pass examples of the dtype used in training, to the model built as for "
        "training (in its checkpoints' dtype: no .double() or .half())."
    )
    assert not (tmp_path / "s.sp").exists()
