"""What produced a store, and the checks that refuse inputs which do not belong with it.

A store's metadata (``Store.meta``) identifies everything its numbers depend on: the attributed
parameters (names and shapes), the projection (kind, seed, dimension, generator), the task
(class and parameter selection), the trajectory (path, fingerprint over learning rates, stages and
every checkpoint's sha256), the featurize settings, the store format and library version. This
module adds how it was produced (``provenance``: model class, final checkpoint, software versions)
and holds the checks made before anything is written or scored:

- [`check_checkpoints`][]: every checkpoint exists, is intact (sha256), loads, fits the model
  and holds finite weights: featurize refuses a bad one before it writes anything.
- [`check_query_model`][]: the model, task and run given to the [`Attributor`][]
  are the store's. Queries are always scored at the store's final checkpoint θ_T: the model
  passed in supplies the architecture, and its weights are replaced by θ_T's, which must still be
  the file featurize used (same run fingerprint, same sha256).
- ``check_model``: the model computes what the store's model computed. Same parameter names
  and shapes do not make the same function (ReLU replaced by Tanh), so featurize (and capture,
  ``featurize/capture.py``) records what θ_T computes on a fixed *reference batch* of training
  examples (``meta["fingerprint"]["model"]``: per example loss, measurement, and mean and standard
  deviation of the outputs; the batch itself in the array ``REFERENCE_BATCH``), and every later
  use recomputes it and compares within ``MODEL_RTOL`` of the largest recorded magnitude (wide
  enough for CPU/GPU and summation order; narrower than another activation or layer makes, unless
  the outputs hardly depend on it, as in a barely trained model).
- ``check_data``: the training data are the store's. ``meta["fingerprint"]["data"]`` holds per
  stage the sha256 of every example (of a seeded sample of ``DATA_ROWS`` examples for larger
  sets) and, for cheap checks at query time, of ``QUICK_ROWS`` of them; ``None`` in a store
  captured without its datasets.

A store written before the fingerprints existed still opens; the first check says once that it
cannot be checked.
"""

from __future__ import annotations

import hashlib
import io
import math
import platform
import shlex
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
import zarr
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from source_proj import __version__
from source_proj.errors import SourceProjError, StoreError, TaskError, TrajectoryError, first_line, out_of_memory
from source_proj.store.store import Store
from source_proj.tasks.data import loader
from source_proj.tasks.gradients import checkpointing_error, move_batch
from source_proj.tasks.task import ParameterSelection, Task
from source_proj.tasks.text import ModuleSelection
from source_proj.trajectory.recorder import Trajectory

REFERENCE_BATCH = "provenance/reference_batch"
"""Array holding the reference batch (``torch.save`` bytes, uint8) the model fingerprint is computed on."""

REFERENCE_ROWS = 8
"""Training examples in the reference batch."""

MODEL_RTOL = 1e-2
"""Largest accepted difference of a fingerprint quantity, relative to its largest recorded magnitude."""

DATA_ROWS = 2048
"""Examples hashed per stage by featurize (all of them in smaller training sets)."""

QUICK_ROWS = 32
"""Examples hashed per stage by the cheap check made before query results are described."""


def describe_provenance(
    model: nn.Module, trajectory: Trajectory, device: torch.device, batch_size: int
) -> dict[str, Any]:
    """How a store is produced (informative: not compared when a store is resumed). The device and
    batch size matter for bit-identical recomputation (``verify --repair`` prints them back)."""
    final = trajectory.final_checkpoint
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_parameters": int(sum(p.numel() for p in model.parameters())),
        "final_checkpoint": {"step": final.step, "file": final.file, "sha256": final.sha256},
        "software": {
            "source_proj": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "zarr": zarr.__version__,
        },
        "device": device.type,
        "batch_size": batch_size,
    }


def check_checkpoints(trajectory: Trajectory, model: nn.Module, progress: bool = False) -> None:
    """Load every checkpoint of ``trajectory`` into ``model`` (left holding the last one) and refuse
    a missing, changed, unreadable, mismatched or non-finite one with a one-sentence reason. ``progress``: a bar
    once it takes more than 2 s (a large model's checkpoints are hashed at gigabytes a second)."""
    checkpoints = trajectory.checkpoints
    for checkpoint in tqdm(checkpoints, desc="check checkpoints", unit="ckpt", delay=2.0, disable=not progress):
        trajectory.load_into(model, checkpoint)
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise TrajectoryError(
                    f"Checkpoint {trajectory.path / checkpoint.file} holds NaN or infinite values in {name!r} "
                    "(training diverged before it was saved?); attribute a run whose checkpoints are finite."
                )


def _parameter_mismatch(stored: list[tuple[str, list[int]]], actual: list[tuple[str, list[int]]]) -> str:
    stored_shapes, actual_shapes = dict(stored), dict(actual)
    parts = []
    missing = [n for n in stored_shapes if n not in actual_shapes]
    extra = [n for n in actual_shapes if n not in stored_shapes]
    reshaped = [
        f"{n} {actual_shapes[n]} vs {stored_shapes[n]}"
        for n in stored_shapes
        if n in actual_shapes and actual_shapes[n] != stored_shapes[n]
    ]
    if missing:
        parts.append(f"missing {missing[:3]}")
    if extra:
        parts.append(f"not in the store {extra[:3]}")
    if reshaped:
        parts.append(f"other shapes: {', '.join(reshaped[:3])}")
    if not parts:
        parts.append("same parameters in another order")
    return "; ".join(parts)


def run_difference(meta: dict[str, Any], trajectory: Trajectory) -> str | None:
    """How ``trajectory`` differs from the run the store was featurized from (``None``: it is that run)."""
    recorded = meta["trajectory"]
    if trajectory.fingerprint() == recorded["fingerprint"]:
        return None
    steps = [c.step for c in trajectory.checkpoints]
    if steps != recorded["checkpoints"]:
        return f"it has checkpoints at steps {steps}, the store's run at {recorded['checkpoints']}"
    return "its learning rates, stages or checkpoint files differ"


def check_run(meta: dict[str, Any], trajectory: Trajectory) -> None:
    """Refuse a run that is not the one the store was featurized from (its final checkpoint is the query model)."""
    why = run_difference(meta, trajectory)
    if why is not None:
        raise StoreError(
            f"The run at {trajectory.path} is not the one the store was featurized from ({why}), so its final "
            "checkpoint is not the store's query model; pass the original run, or featurize this one into a new store."
        )


def check_query_model(
    meta: dict[str, Any], model: nn.Module, task: Task, trajectory: Trajectory, path: str | None = None
) -> None:
    """Refuse a query model, task or run that is not the store's (see the module docstring); ``path``: the store's,
    named in the refusal (several stores evaluated together need it)."""
    check_run(meta, trajectory)
    described = task.describe()
    selection = other_selection(meta["task"], described)
    if selection is not None:
        raise TaskError(f"{selection[0].upper()}{selection[1:]}.")
    if described != meta["task"]:
        raise TaskError(
            f"The task is not the store's ({task_differences(meta['task'], described)}); query with the task the store "
            "was featurized with."
        )
    names = task.select_parameters(model)
    params = dict(model.named_parameters())
    actual = [(n, list(params[n].shape)) for n in names]
    stored = [(n, list(shape)) for n, shape in meta["params"]]
    if actual != stored:
        why = _parameter_mismatch(stored, actual)
        raise TaskError(
            f"The query model's attributed parameters do not match those of the store"
            f"{'' if path is None else f' at {path}'} ({why}); build the model and parameter selection used for "
            "featurize."
        )


def other_selection(stored: Mapping[str, Any], described: Mapping[str, Any]) -> str | None:
    """Where two task descriptions differ in their parameter selection only: a clause naming both and the
    ``parameters=`` argument that rebuilds the stored one (a store made before a task's default selection changed
    is the common case); else ``None``."""
    if dict(stored) == dict(described) or {**described, "parameters": None} != {**stored, "parameters": None}:
        return None
    return (
        f"the task selects the parameters {described['parameters']}, the store was featurized with "
        f"{stored['parameters']}; build the task with the store's selection ({selection_code(stored)})"
    )


def task_differences(stored: Mapping[str, Any], described: Mapping[str, Any]) -> str:
    """``"tokens_per_sequence 7.0, the store's 4.0"``: each field where a task's description differs from the stored
    one, as given and as stored (two whole descriptions, side by side, hid the one field that differs)."""
    return "; ".join(
        f"{key} {described.get(key)!r}, the store's {stored.get(key)!r}"
        for key in sorted(set(stored) | set(described), key=str)
        if stored.get(key) != described.get(key)
    )


def selection_code(task: Mapping[str, Any]) -> str:
    """The ``parameters=`` argument that rebuilds a stored task description's parameter selection (the fields that
    differ from the selection class's defaults)."""
    selection = dict(task.get("parameters") or {})
    kind = ModuleSelection if selection.pop("kind", None) == "modules" else ParameterSelection
    default = kind().describe()
    chosen = ", ".join(
        f"{k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in selection.items() if v != default.get(k)
    )
    return f"parameters=sp.{kind.__name__}({chosen})"


def _seeded_rows(size: int, count: int, salt: int) -> list[int]:
    """``count`` distinct rows of ``range(size)`` (all when ``size ≤ count``), fixed by ``salt``, sorted."""
    if size <= count:
        return list(range(size))
    return sorted(int(i) for i in np.random.default_rng([20261129, salt]).choice(size, count, replace=False))


def reference_batch(datasets: Mapping[str, Dataset], stage: str | None = None) -> Any:
    """The reference batch: ``REFERENCE_ROWS`` seeded examples of the first stage's data (``stage``: of that
    stage's), collated."""
    data = next(iter(datasets.values())) if stage is None else datasets[stage]
    rows = _seeded_rows(len(data), REFERENCE_ROWS, 0)  # type: ignore[arg-type]
    return next(iter(loader(Subset(data, rows), batch_size=len(rows))))


def model_fingerprint(
    model: nn.Module, task: Task, batch: Any, device: torch.device, what: str = "the training examples"
) -> dict[str, list[float | None]]:
    """What ``model`` (holding the weights to describe) computes on ``batch``, per example, in fp32 and
    eval mode: the task's loss and measurement, and the mean and standard deviation of the outputs. ``what``: the
    batch, as a refusal of examples the model cannot run names it."""
    model.eval()
    bound = task.bind(model)
    batch = move_batch(batch, device)
    with torch.no_grad(), model_errors(what):
        outputs = bound.forward(model, batch)
        values = {"loss": bound.loss(outputs, batch), "measurement": bound.measurement(outputs, batch)}
    flat = outputs.detach().double().reshape(outputs.shape[0], -1)
    values.update(output_mean=flat.mean(1), output_std=flat.std(1, correction=0))
    return {
        name: [float(v) if math.isfinite(v) else None for v in tensor.double().cpu().tolist()]
        for name, tensor in values.items()
    }


DTYPES_DIFFER = ("must have the same dtype", "mixed dtype", "expected scalar type", "and bias type (")
"""What torch says of an input whose floating dtype is not its layer's weights' (Linear, Conv, LayerNorm, bmm)."""

RAGGED = ("stack expects each tensor to be equal size", "each element in list of batch should be of equal size")
"""What torch's default collate says of examples of different lengths (tensors, lists)."""


@contextmanager
def model_errors(what: str) -> Iterator[None]:
    """Turn the model failing on ``what`` (inputs of another shape or type) into a ``TaskError``."""
    try:
        yield
    except (SourceProjError, torch.OutOfMemoryError):
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as err:
        if out_of_memory(err):  # the host's allocator raises a plain RuntimeError: not the examples' fault
            raise
        refusal = checkpointing_error(err)  # not the examples' fault either
        if refusal is not None:
            raise refusal from err
        if any(s in str(err) for s in RAGGED):  # default_collate on examples of two lengths
            raise TaskError(
                f"The examples in {what} have different lengths ({first_line(err)}), and batches are stacked as they "
                "are: give the collate function that padded the training batches, sp.CollatedDataset(dataset, "
                "collate_fn) (a Trainer's is trainer.data_collator), or pad every example to one length "
                "(sp.TextDataset(sequences, length=T))."
            ) from err
        if any(s in str(err) for s in DTYPES_DIFFER):  # the examples' dtype, or the model's (model.double())
            raise TaskError(
                f"The model cannot run on {what} ({type(err).__name__}: {first_line(err)}), whose dtype is not its "
                "weights'; pass examples of the dtype used in training, to the model built as for training (in its "
                "checkpoints' dtype: no .double() or .half())."
            ) from err
        raise TaskError(
            f"The model cannot run on {what} ({type(err).__name__}: {first_line(err)}); pass examples shaped and "
            "typed as the model was trained on."
        ) from err


def save_reference_batch(store: Store, batch: Any) -> None:
    """Write the reference batch into the store (crc-checked like every array)."""
    buffer = io.BytesIO()
    torch.save(batch, buffer)
    store.write_whole(REFERENCE_BATCH, np.frombuffer(buffer.getvalue(), dtype=np.uint8))


def load_reference_batch(store: Store) -> Any | None:
    """The store's reference batch (on the CPU), or ``None`` if it holds none (yet)."""
    if not store.has(REFERENCE_BATCH) or not store.is_complete(REFERENCE_BATCH):
        return None
    return torch.load(io.BytesIO(store.read(REFERENCE_BATCH).tobytes()), map_location="cpu", weights_only=True)


def _model_difference(
    recorded: Mapping[str, Sequence[float | None]], actual: Mapping[str, Sequence[float | None]]
) -> str | None:
    """Where the fingerprints differ beyond ``MODEL_RTOL`` (``None``: they agree). The outputs' mean
    is compared on the scale of the outputs themselves (their standard deviation), as it may cancel."""

    def magnitude(name: str) -> float:
        return max([abs(v) for v in recorded.get(name, []) if v is not None], default=0.0)

    for name, old in recorded.items():
        new = actual.get(name, [])
        if len(new) != len(old):
            return f"{len(new)} {name} values instead of {len(old)}"
        if any((a is None) != (b is None) for a, b in zip(old, new, strict=True)):
            return f"a {name} that is finite in one and not in the other"
        scale = max(magnitude(name), magnitude("output_std") if name == "output_mean" else 0.0)
        for row, (a, b) in enumerate(zip(old, new, strict=True)):
            if a is not None and b is not None and abs(a - b) > MODEL_RTOL * max(scale, 1e-6):
                return f"{name.replace('_', ' ')} of reference example {row}: {b:.6g}, recorded {a:.6g}"
    return None


_UNCHECKED: set[str] = set()
"""Stores already named as unfingerprinted in this process (the warning is given once per store)."""


def _captured(meta: Mapping[str, Any]) -> bool:
    """Whether the store was captured during training (``featurize.windows.is_captured``)."""
    return meta.get("capture") is not None


def _unchecked(path: str, meta: Mapping[str, Any], what: Literal["model", "data"]) -> None:
    """Say once per store what its fingerprints leave unchecked (``what``: the check that found none)."""
    if path in _UNCHECKED:
        return
    _UNCHECKED.add(path)
    if what == "data" and _captured(meta) and (meta.get("fingerprint") or {}).get("model") is not None:
        message = (
            f"The store at {path} was captured without its training datasets (GradientCapture's datasets=), so "
            "training data changed since cannot be detected (its model is checked)."
        )
    elif _captured(meta):
        message = (
            f"The store at {path} was captured during training before source-proj fingerprinted captured runs, so a "
            "model or training data changed since cannot be detected."
        )
    else:
        message = (
            f"The store at {path} was written before source-proj fingerprinted its model and training data, so a "
            "model or data changed since cannot be detected; re-run featurize --force to record them."
        )
    warnings.warn(message, stacklevel=3)


def check_model(store: Store, model: nn.Module, task: Task, device: torch.device) -> None:
    """Refuse a model (holding the store's final checkpoint θ_T) that computes something other than the
    store's model on the reference batch, e.g. the same layers with another activation."""
    batch = load_reference_batch(store)
    if batch is None:
        if (store.meta.get("fingerprint") or {}).get("model") is not None:  # recorded, and lost since
            raise StoreError(
                f"The store at {store.path} lacks its reference batch ({REFERENCE_BATCH!r}), on which the model is "
                f"checked; run `source-proj verify {shlex.quote(store.path)} --repair`, then the command it prints."
            )
        _unchecked(store.path, store.meta, "model")
        return
    check_model_values(store.path, store.meta, model_fingerprint(model, task, batch, device))


def check_model_values(path: str, meta: Mapping[str, Any], values: Mapping[str, Sequence[float | None]]) -> None:
    """Refuse model fingerprint ``values`` (see ``model_fingerprint``) that differ from the store's."""
    recorded = (meta.get("fingerprint") or {}).get("model")
    if recorded is None:
        _unchecked(path, meta, "model")
        return
    difference = _model_difference(recorded["values"], values)
    if difference is not None:
        if _captured(meta):
            origin, advice = "captured from", "exactly as it was trained (same layers, activations and forward)."
        else:
            origin = "featurized with"
            advice = (
                "exactly as for featurize (same layers, activations and forward), or featurize this one into a new "
                "store (featurize --force replaces this one)."
            )
        raise TaskError(
            f"The model computes other outputs at the final checkpoint than the one the store at {path} was {origin} "
            f"({difference}), although its parameters have the same names and shapes; build the model {advice}"
        )


def _digest(value: Any, digest: Any) -> None:
    """Feed an example (a pytree of tensors, arrays, numbers and strings) into ``digest``."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().reshape(-1).contiguous()
        digest.update(f"tensor{value.dtype}{tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray) and value.dtype != object:
        digest.update(f"array{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _digest(value[key], digest)
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq{len(value)}".encode())
        for item in value:
            _digest(item, digest)
    elif value is None or isinstance(value, (str, bytes, int, float, bool, np.generic)):
        digest.update(repr(value).encode())
    else:
        try:  # e.g. a PIL image
            array = np.asarray(value)
        except Exception:
            array = None
        if array is not None and array.dtype != object:
            _digest(array, digest)
        else:  # its repr may hold a memory address: only its type is fingerprinted
            digest.update(type(value).__qualname__.encode())


def data_digest(dataset: Dataset, rows: Sequence[int]) -> str:
    """The sha256 of ``dataset``'s examples ``rows``, in that order (what ``data_fingerprint`` records)."""
    digest = hashlib.sha256()
    for row in rows:
        _digest(dataset[row], digest)
    return digest.hexdigest()


def data_fingerprint(datasets: Mapping[str, Dataset], *, quick: bool = False) -> dict[str, dict[str, Any]]:
    """Per stage: its size, and the sha256 of every example (a seeded sample of ``DATA_ROWS`` in larger
    sets; skipped when ``quick``) and of ``QUICK_ROWS`` seeded examples."""
    out = {}
    for stage, dataset in datasets.items():
        size = len(dataset)  # type: ignore[arg-type]
        entry: dict[str, Any] = {"size": size, "quick": data_digest(dataset, _seeded_rows(size, QUICK_ROWS, 1))}
        if not quick:
            rows = _seeded_rows(size, DATA_ROWS, 2)
            entry.update(rows=len(rows), sha256=data_digest(dataset, rows))
        out[stage] = entry
    return out


def check_data(
    path: str,
    meta: Mapping[str, Any],
    datasets: Mapping[str, Dataset],
    *,
    quick: bool = False,
    fingerprint: Mapping[str, Mapping[str, Any]] | None = None,
    warned: set[str] | None = None,
) -> bool:
    """Refuse training data whose fingerprint differs from the store's (``quick``: ``QUICK_ROWS``
    examples per stage; ``fingerprint``: theirs, if already computed). Returns whether they could be
    checked: not against a store written before fingerprints, nor a dataset that reads differently
    every time (random augmentation), which is let through with a warning, once per stage of ``warned`` (the stages
    one run has warned of already, added to in place)."""
    recorded = (meta.get("fingerprint") or {}).get("data")
    if recorded is None:
        _unchecked(path, meta, "data")
        return False
    now = fingerprint or data_fingerprint(datasets, quick=quick)
    key = "quick" if quick else "sha256"
    checked = True
    for stage, entry in now.items():
        old = recorded.get(stage)
        if old is None or old.get(key) == entry.get(key):
            continue
        again = data_fingerprint({stage: datasets[stage]}, quick=quick)[stage]
        if again.get(key) != entry.get(key):
            if warned is None or stage not in warned:
                warnings.warn(
                    f"The training data of stage {stage!r} read differently twice (random augmentation?), so they "
                    "cannot be checked against the store's; attribute with deterministic examples.",
                    stacklevel=2,
                )
            if warned is not None:
                warned.add(stage)
            checked = False
            continue
        same_size = old.get("size") == entry["size"]
        what = "other contents or order" if same_size else f"{entry['size']} examples, not {old.get('size')}"
        if _captured(meta):
            origin, advice = "captured with", "the training set the run trained on, in its original order."
        else:
            origin = "featurized with"
            advice = (
                "the original training set in its original order, or featurize these data into a new store "
                "(featurize --force replaces this one)."
            )
        raise TaskError(
            f"The training data of stage {stage!r} are not those the store at {path} was {origin} ({what}); pass "
            f"{advice}"
        )
    return checked
