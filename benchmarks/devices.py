"""The device a benchmark script runs on: a CUDA device this machine lacks ends the script in one sentence, before
any work (the GPU benchmarks are optional checks on a machine that has one)."""

from __future__ import annotations

import torch


def device(name: str | None) -> torch.device:
    """The torch device ``name`` (``None``: CUDA where there is a GPU, else the CPU). A CUDA device without a GPU
    raises ``SystemExit`` with the sentence saying why and what to pass instead."""
    chosen = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
        raise SystemExit(f"--device {name} needs a CUDA GPU, but {why}; run it on a machine with one, or pass cpu.")
    return chosen
