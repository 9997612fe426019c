"""The prepared GPU benchmark (``benchmarks/transformer_gpu.py``) runs end to end at toy size on the CPU, so that
a session with a GPU only changes its sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import source_proj as sp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["toy-llama", "toy-gpt2"])
def test_transformer_gpu_benchmark_smoke(tmp_path: Path, model: str) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import transformer_gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    results = transformer_gpu.main(["--smoke", "--model", model, "--out", str(tmp_path)])
    assert [r["phase"] for r in results] == ["train-step", "train", "featurize", "fit"]
    assert all(r.get("examples_per_s", 1) > 0 for r in results)
    store = sp.Store.open(tmp_path / "store.sp")
    assert store.meta["projection"]["kind"] == "factored" and store.meta["projection"]["dim"] == 64
    assert store.meta["methods"]["source"]["complete"]
    trajectory = sp.Trajectory.load(tmp_path / "run")
    assert trajectory.num_steps == 4 and (trajectory.clip <= 1).all()
