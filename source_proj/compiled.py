"""Capture's hooks under ``torch.compile``.

A module's forward hooks run inside a compiled model's graph, where dynamo would trace them: capture's and
featurize's hooks do what a graph cannot hold (Python state, numpy, the store), so they run eagerly, dynamo
breaking the graph around each. ``torch.compiler.disable`` says so, but its first call imports torch's compiler
package (about 2 s), which a query must not pay: hooks shared with featurize and queries take
``eager_if_compiling``, which marks them only where the compiler is loaded (a model compiled in this process
loaded it). Capture, whose hooks may run under a model compiled after it starts, loads it.

Two of the compiler's settings would defeat capture, so while a capture listens (``hold_compiler_settings``)
both are off, and the last capture to stop restores them:

* dynamo does not guard a graph on its modules' hooks (``skip_nnmodule_hook_guards``), and shares a class's
  graphs between its instances: a graph compiled without capture's hooks (another instance's of the model's
  class, trained beside it or before it) would run the captured model without them;
* capture's sampled Fisher backpropagates the training forward's graph once before the training backward
  (``retain_graph``), which a compiled graph with donated buffers refuses (``donated_buffer``).

Graphs compiled before capture began carry no guard on hooks: capture drops them as it starts
(``torch._dynamo.reset``), and the next forward compiles again.
"""

from __future__ import annotations

import importlib
import sys
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

SETTINGS = {("torch._dynamo.config", "skip_nnmodule_hook_guards"): False,
            ("torch._functorch.config", "donated_buffer"): False}  # fmt: skip
"""The compiler's settings while a capture listens: (module, name) → value."""

_owners: weakref.WeakSet[object] = weakref.WeakSet()  # the captures listening now
_restore: dict[tuple[str, str], Any] = {}  # the settings as they were before the first of them


def eager(hook: F) -> F:
    """``hook``, run eagerly under a compiled model (imports the compiler)."""
    return torch.compiler.disable(hook)  # type: ignore[return-value]


def eager_if_compiling(hook: F) -> F:
    """``hook``, run eagerly under a compiled model where the compiler is loaded; as it is otherwise (no model of
    this process can be compiled without loading it)."""
    return eager(hook) if "torch._dynamo" in sys.modules else hook


def hold_compiler_settings(owner: object) -> None:
    """Load the compiler, drop the graphs it compiled before, and keep ``SETTINGS`` until ``owner`` (and every
    other owner) releases them, or is collected unreleased (a capture a failed run never closed)."""
    loaded = "torch._dynamo" in sys.modules
    dynamo = importlib.import_module("torch._dynamo")
    if loaded and not _live_owners():
        dynamo.reset()
    for (module, name), value in SETTINGS.items():
        config = importlib.import_module(module)
        if hasattr(config, name):
            _restore.setdefault((module, name), getattr(config, name))
            setattr(config, name, value)
    if owner not in _owners:
        _owners.add(owner)
        weakref.finalize(owner, _restore_unless_held)


def release_compiler_settings(owner: object) -> None:
    """``owner`` no longer needs ``SETTINGS``; the last owner to release them restores them as they were."""
    _owners.discard(owner)
    _restore_unless_held()


def _live_owners() -> bool:
    return any(True for _ in _owners)  # a WeakSet's iteration skips an owner being collected; its len may not


def _restore_unless_held() -> None:
    if _live_owners():
        return
    for (module, name), value in list(_restore.items()):
        setattr(importlib.import_module(module), name, value)
        del _restore[(module, name)]
