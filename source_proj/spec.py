"""Experiment specs: a Python file that tells the CLI how to build the model, task and data.

A spec file defines::

    def build_model() -> torch.nn.Module          # the architecture (weights come from checkpoints)
    def build_task() -> source_proj.Task
    def train_data(stage: str) -> Dataset         # the stage's training set, in training order
    def query_data() -> Dataset                   # examples to explain (for `source-proj query`)
    def describe(stage: str, index: int) -> str   # optional: a short text for a training example
    def describe_query(index: int) -> str         # optional: the text of a query_data() example
    def retrain(keep: dict[str, np.ndarray], seed: int) -> np.ndarray
        # optional, for `source-proj lds` / `compare`: train from scratch on the kept examples
        # (keep: stage → sorted indices within that stage's dataset; stages not named are kept
        # whole) with fresh randomness from `seed`, exactly as the attributed run was trained, and
        # return the measurement of every query_data() example, shape [Q]. Worker processes import
        # the spec file by path, so it must not depend on state built elsewhere. `retrain` may
        # instead be a source_proj.evaluation.BatchedRetrain (many small models per call, in the
        # CLI's own process; see docs/howto/evaluate.md).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from source_proj.errors import SourceProjError, TaskError, first_line, out_of_memory
from source_proj.evaluation.retrain import BatchedRetrainFunction
from source_proj.tasks.task import Task

_REQUIRED = ("build_model", "build_task", "train_data")


@dataclass
class Spec:
    """A loaded spec file (see the module docstring). An exception raised inside one of its functions
    becomes a ``TaskError`` naming the function and the file."""

    path: Path
    module: ModuleType

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.module, name)(*args)
        except SourceProjError:
            raise
        except Exception as err:
            if out_of_memory(err):  # the spec is not at fault (a model too large to build here)
                raise
            call = f"{name}({', '.join(repr(a) for a in args)})"
            raise TaskError(
                f"{call} in {self.path} failed ({type(err).__name__}: {first_line(err)}); fix the spec file."
            ) from err

    def build_model(self) -> nn.Module:
        model = self._call("build_model")
        if not isinstance(model, nn.Module):
            raise TaskError(f"build_model() in {self.path} returned {type(model).__name__}, not a torch.nn.Module.")
        return model

    def build_task(self) -> Task:
        task = self._call("build_task")
        if not isinstance(task, Task):
            raise TaskError(f"build_task() in {self.path} returned {type(task).__name__}, not a source_proj.Task.")
        return task

    def train_data(self, stage: str) -> Dataset:
        return self._dataset("train_data", stage)

    def query_data(self) -> Dataset:
        if not hasattr(self.module, "query_data"):
            raise TaskError(f"{self.path} defines no query_data(); add one returning the examples to explain.")
        return self._dataset("query_data")

    def _dataset(self, name: str, *args: Any) -> Dataset:
        data = self._call(name, *args)
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise TaskError(
                f"{name}() in {self.path} returned {type(data).__name__}, not a dataset; return one with len() and "
                "indexing (e.g. a TensorDataset)."
            )
        return data

    @property
    def describes(self) -> bool:
        """Whether the spec defines ``describe(stage, index)``."""
        return callable(getattr(self.module, "describe", None))

    def describe(self, stage: str, index: int) -> str:
        return str(self._call("describe", stage, index)) if self.describes else ""

    def describe_query(self, index: int) -> str:
        defined = callable(getattr(self.module, "describe_query", None))
        return str(self._call("describe_query", index)) if defined else ""

    def retrainer(self) -> SpecRetrain | BatchedRetrainFunction:
        """The spec's ``retrain`` as a picklable function (worker processes re-import the spec by path),
        or the spec's batched retrain function itself (it trains in this process)."""
        retrain = getattr(self.module, "retrain", None)
        if isinstance(retrain, BatchedRetrainFunction):
            return retrain
        if not callable(retrain):
            raise TaskError(
                f"{self.path} defines no retrain(keep, seed); add one that trains on the kept examples and returns "
                "the measurement of every query_data() example (see source_proj/spec.py)."
            )
        return SpecRetrain(str(self.path))


@dataclass(frozen=True)
class SpecRetrain:
    """``retrain(keep, seed) -> [Q]`` of a spec file, loaded (once per process) from its path."""

    path: str

    def __call__(self, keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        return np.asarray(_loaded(self.path).module.retrain(keep, seed))


@functools.cache
def _loaded(path: str) -> Spec:
    return load_spec(path)


def load_spec(path: str | Path) -> Spec:
    """Import a spec file by path; refuses a missing file or one without the required functions."""
    path = Path(path).resolve()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise TaskError(f"Spec file {path} {what}; pass the path of a Python file defining {', '.join(_REQUIRED)}.")
    name = f"source_proj_spec_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"{path} cannot be imported as Python; pass a .py spec file.")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:
        sys.modules.pop(name, None)
        where = f", line {err.lineno}" if isinstance(err, SyntaxError) and err.lineno else ""
        raise TaskError(
            f"Spec file {path} cannot be imported ({type(err).__name__}{where}: {first_line(err)}); fix the file "
            f"(`python {path}` shows where)."
        ) from err
    finally:
        sys.path.remove(str(path.parent))
    missing = [f for f in _REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise TaskError(f"Spec file {path} does not define {', '.join(missing)}; see `source-proj featurize --help`.")
    return Spec(path, module)
