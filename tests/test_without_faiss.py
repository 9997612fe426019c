"""FAISS is an optional extra (``pip install "source-proj[faiss]"``): without it every search backend but ``faiss`` and
``ivf`` works, ``auto`` searches with the torch index, and asking for FAISS says which extra to install. The suite
installs FAISS, so its absence is simulated: ``sys.modules["faiss"] = None`` makes ``import faiss`` raise
ImportError."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.cli.main import main
from source_proj.query.topk import TorchIndex, build_index

from .conftest import ROOT, mlp

_EXTRA = re.escape('install it with `pip install "source-proj[faiss]"`')
_REFUSED = {
    "faiss": rf"^The faiss search backend needs FAISS, which cannot be imported \(.*\); {_EXTRA}, or search with the "
    r"torch backend \(the same exact top-k\)\.$",
    "ivf": rf"^The ivf search backend is FAISS's approximate inverted-file index and needs FAISS, which cannot be "
    rf"imported \(.*\); {_EXTRA}, or search exactly with the auto, torch or stream backend\.$",
}


def _block_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError until the test ends


def test_importing_source_proj_and_its_cli_does_not_import_faiss() -> None:
    """``import faiss`` ran when ``source_proj`` was imported, so no part of the library worked without it."""
    code = "import sys, source_proj, source_proj.cli.main; assert 'faiss' not in sys.modules, 'faiss was imported'"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_auto_without_faiss_finds_the_faiss_top_k_with_the_torch_index(
    fitted_mlp_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Oracle: the FAISS flat index (what ``auto`` builds on the CPU where FAISS is installed)."""
    labels = torch.tensor([0, 1, 2, 0, 1])
    queries = TensorDataset(torch.randn(5, 4, generator=torch.Generator().manual_seed(3)), labels)
    expected = sp.Attributor(fitted_mlp_store, mlp(), sp.ClassificationTask(), search_backend="faiss",
                             progress=False).top_k(queries, 6)  # fmt: skip
    _block_faiss(monkeypatch)
    auto = sp.Attributor(fitted_mlp_store, mlp(), sp.ClassificationTask(), progress=False)
    result = auto.top_k(queries, 6)
    assert isinstance(auto.index(), TorchIndex)
    np.testing.assert_array_equal(result.helpful_ids, expected.helpful_ids)
    np.testing.assert_array_equal(result.harmful_ids, expected.harmful_ids)
    np.testing.assert_allclose(result.helpful_scores, expected.helpful_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.harmful_scores, expected.harmful_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["faiss", "ivf"])
def test_a_faiss_backend_without_faiss_is_refused_in_one_sentence_naming_the_extra(
    fitted_mlp_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """It was an ImportError at ``import source_proj``; now the Attributor, an Ensemble (before opening its stores)
    and ``build_index`` refuse the backend when made, before any query gradient."""
    _block_faiss(monkeypatch)
    with pytest.raises(sp.TaskError, match=_REFUSED[backend]):
        sp.Attributor(fitted_mlp_store, mlp(), sp.ClassificationTask(), search_backend=backend)  # type: ignore[arg-type]
    with pytest.raises(sp.TaskError, match=_REFUSED[backend]):
        sp.Ensemble.open([tmp_path / "a.sp", tmp_path / "b.sp"], mlp(), sp.ClassificationTask(),
                         search_backend=backend)  # type: ignore[arg-type]  # fmt: skip
    rows = np.ones((4, 2), dtype=np.float32)
    with pytest.raises(sp.TaskError, match=_REFUSED[backend]):
        build_index(lambda: [(0, rows)], 4, 2, torch.device("cpu"), backend)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["faiss", "ivf"])
def test_the_cli_refuses_a_faiss_backend_without_faiss_in_one_line(
    cli_reference: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    store, spec = cli_reference
    _block_faiss(monkeypatch)
    out = CliRunner().invoke(main, ["query", str(store), "--spec", str(spec), "--search", backend, "--device", "cpu"])
    assert out.exit_code == 1, out.output
    assert out.output.startswith(f"Error: The {backend} search backend ") and out.output.count("\n") == 1, out.output
    assert 'pip install "source-proj[faiss]"' in out.output and "Traceback" not in out.output
