"""Recorder and capture integrations for training frameworks (``pip install source-proj[integrations]``).

- a plain loop: [`source_proj.TrajectoryRecorder`][] itself (and [`source_proj.GradientCapture`][]);
- Hugging Face ``transformers.Trainer``: ``HuggingFaceRecorder`` (a ``TrainerCallback``), and
  ``HuggingFaceCapture``, which also captures projected gradients in-run;
- Lightning: ``LightningRecorder`` (a ``lightning.pytorch.Callback``), and ``LightningCapture``.

Both callbacks record through an optimizer *step post-hook*, which fires right after the wrapped
``torch.optim`` optimizer has stepped and before any learning-rate scheduler moves, so the rate
recorded is the rate the step used; a step skipped by a gradient scaler records nothing.

This package imports without either framework installed; a callback's framework is imported
when the callback is first used, and its absence is reported with the install command.
"""

from __future__ import annotations

import importlib
from typing import Any

from source_proj.errors import SourceProjError

_PROVIDERS = {
    "HuggingFaceRecorder": (".huggingface", "transformers"),
    "HuggingFaceCapture": (".huggingface", "transformers"),
    "LightningRecorder": (".lightning", "lightning"),
    "LightningCapture": (".lightning", "lightning"),
}


class MissingIntegrationError(SourceProjError, ImportError):
    """The training framework of an integration is not installed."""


def __getattr__(name: str) -> Any:
    if name not in _PROVIDERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, package = _PROVIDERS[name]
    try:
        return getattr(importlib.import_module(module, __name__), name)
    except ImportError as err:
        if isinstance(err, MissingIntegrationError):
            raise
        raise MissingIntegrationError(
            f"{name} needs the {package!r} package, which cannot be imported ({err}); "
            f"install it with `pip install source-proj[integrations]` (or `pip install {package}`)."
        ) from err


__all__ = [
    "HuggingFaceCapture",
    "HuggingFaceRecorder",
    "LightningCapture",
    "LightningRecorder",
    "MissingIntegrationError",
]
