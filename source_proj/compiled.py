"""Hooks under ``torch.compile``.

A module's forward hooks run inside a compiled model's graph, where dynamo would trace them: capture's and
featurize's hooks do what a graph cannot hold (Python state, numpy, the store), so they run eagerly, dynamo
breaking the graph around each. ``torch.compiler.disable`` says so, but its first call imports torch's compiler
package (about 2 s), which a query must not pay: hooks shared with featurize and queries take
``eager_if_compiling``, which marks them only where the compiler is loaded (a model compiled in this process
loaded it). Capture, whose hooks may run under a model compiled after it starts, loads it, and drops the graphs
compiled before its hooks were added (``load_compiler``).

Capture's sampled Fisher backpropagates the training forward's graph once before the training backward
(``retain_graph``), which a compiled graph with donated buffers refuses: while a capture listens
(``hold_no_donated_buffers``) the compiler donates none.
"""

from __future__ import annotations

import importlib
import sys
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def load_compiler() -> None:
    """Import torch's compiler (dynamo), so that every hook made after runs eagerly under a compiled model, and
    drop the graphs it compiled before: dynamo does not guard on a module's hooks, and shares a class's graphs
    between its instances, so a graph compiled before capture's hooks were added (this model's, or another
    instance's of its class) would run without them. The next forward compiles again, with them."""
    loaded = "torch._dynamo" in sys.modules
    dynamo = importlib.import_module("torch._dynamo")
    if loaded:
        dynamo.reset()


def eager(hook: F) -> F:
    """``hook``, run eagerly under a compiled model (imports the compiler)."""
    return torch.compiler.disable(hook)  # type: ignore[return-value]


def eager_if_compiling(hook: F) -> F:
    """``hook``, run eagerly under a compiled model where the compiler is loaded; as it is otherwise (no model of
    this process can be compiled without loading it)."""
    return eager(hook) if "torch._dynamo" in sys.modules else hook


_owners: weakref.WeakSet[object] = weakref.WeakSet()  # the captures listening now
_restore: dict[str, Any] = {}  # "value": the setting before the first of them


def _compiler_config() -> Any:
    """torch's AOT-autograd settings module (importing it compiles nothing), or None where it has no
    ``donated_buffer``."""
    try:
        config = importlib.import_module("torch._functorch.config")
    except ImportError:  # pragma: no cover - a torch without torch.compile
        return None
    return config if hasattr(config, "donated_buffer") else None


def hold_no_donated_buffers(owner: object) -> None:
    """From now until ``owner`` releases it (and every other owner has), compiled graphs donate no buffers: AOT
    autograd reads the setting as it compiles and as each backward runs. An owner collected unreleased (a killed
    run's capture) leaves it off."""
    config = _compiler_config()
    if config is None:
        return
    if not _owners:
        _restore.setdefault("value", config.donated_buffer)
    _owners.add(owner)
    config.donated_buffer = False


def release_no_donated_buffers(owner: object) -> None:
    """``owner`` no longer needs the setting; the last owner to release it restores the setting as it was."""
    config = _compiler_config()
    if config is None:
        return
    _owners.discard(owner)
    if not _owners and "value" in _restore:
        config.donated_buffer = _restore.pop("value")
