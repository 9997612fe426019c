"""Figures are drawn headless (Agg); without matplotlib, or to a path no image can be written to, drawing is refused
in one sentence, by the CLI before its work."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.container import BarContainer

from source_proj.cli.main import main
from source_proj.errors import TaskError
from source_proj.evaluation.lds import plot_lds
from source_proj.evaluation.metrics import Correlation
from source_proj.figures import check_figure_path, pyplot


def _lds_result() -> dict[str, list[Correlation]]:
    return {"source": [Correlation(0.4, 0.3, 0.5, np.array([0.4]), 50)]}


def test_without_matplotlib_a_figure_is_refused_in_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(TaskError, match=r"^Drawing a figure needs matplotlib, .*`pip install source-proj\[demo\]`"):
        plot_lds(_lds_result(), [0.5], tmp_path / "lds.png")
    cli = CliRunner()
    for command in (["lds", str(tmp_path / "missing.sp"), "--plot", str(tmp_path / "lds.png")],
                    ["trajectory", str(tmp_path / "missing.sp"), "--plot", str(tmp_path / "t.png")]):  # fmt: skip
        out = cli.invoke(main, command)  # refused before the store is opened: before any work
        assert out.exit_code == 1 and out.output.startswith("Error: Drawing a figure needs matplotlib"), out.output
        assert "bug" not in out.output and len(out.output.strip().splitlines()) == 1


def test_a_figure_path_no_image_can_be_written_to_is_refused_before_the_work(tmp_path: Path) -> None:
    """A folder, an unknown suffix, or none (matplotlib writes NAME.png, and the path reported would not exist)."""
    cli = CliRunner()
    for plot, message in ((tmp_path, "is a folder"), (tmp_path / "lds.txt", "names no image format (.txt)"),
                          (tmp_path / "lds", "names no image format (no suffix)")):  # fmt: skip
        with pytest.raises(TaskError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_figure_path(plot)
        out = cli.invoke(main, ["lds", str(tmp_path / "missing.sp"), "--plot", str(plot)])
        assert out.exit_code == 1 and message in out.output and "No store" not in out.output, out.output
    with pytest.raises(TaskError, match="names no image format"):
        plot_lds(_lds_result(), [0.5], tmp_path / "lds")
    assert not (tmp_path / "lds").exists() and not (tmp_path / "lds.png").exists()


def test_a_figure_leaves_a_sessions_own_backend_alone(tmp_path: Path) -> None:
    """Figures selected Agg even where pyplot was imported already: a notebook's inline backend was switched to Agg,
    and its own plots stopped showing. Agg is chosen only for a first import (headless, as figures are saved)."""
    plt = pyplot()
    before = plt.get_backend()
    plt.switch_backend("svg")
    try:
        plot_lds(_lds_result(), [0.5], tmp_path / "kept.png")
        assert plt.get_backend() == "svg" and (tmp_path / "kept.png").read_bytes().startswith(b"\x89PNG")
    finally:
        plt.switch_backend(before)


def test_figures_are_written_in_the_format_their_suffix_names(tmp_path: Path) -> None:
    png = plot_lds(_lds_result(), [0.5], tmp_path / "a" / "lds.png")
    svg = plot_lds(_lds_result(), [0.5], tmp_path / "lds.SVG")
    assert png.read_bytes().startswith(b"\x89PNG") and b"<svg" in svg.read_bytes()[:1000]


def test_the_text_lds_figure_is_redrawn_from_its_recorded_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """docs/text_lds.png is drawn by `examples/text/lds.py --replot docs/text_lds.json`: each bar is its number,
    RepSim's with the sign it has since it scores −cos on a loss (BENCHMARKS.md's text table), and nothing trains."""
    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("lds_text_replot", root / "examples" / "text" / "lds.py")
    assert spec is not None and spec.loader is not None
    lds = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, lds)
    spec.loader.exec_module(lds)
    drawn = []
    save = lds.save_figure
    monkeypatch.setattr(lds, "save_figure", lambda fig, path, dpi: (drawn.append(fig), save(fig, path, dpi))[1])
    monkeypatch.setattr(sys, "argv", ["lds.py", "--replot", str(root / "docs" / "text_lds.json"),
                                      str(tmp_path / "f.png"), "--note", "a note"])  # fmt: skip
    lds.main()
    recorded = json.loads((root / "docs" / "text_lds.json").read_text())
    (ax,) = drawn[0].axes
    heights = {c.get_label(): [bar.get_height() for bar in c] for c in ax.containers if isinstance(c, BarContainer)}
    methods = list(recorded["finetune"])
    assert heights == {m: [recorded[s][m]["lds"] for s in recorded] for m in methods}
    assert recorded["finetune"]["repsim"]["lds"] > 0  # measured −0.151 with +cos
    assert ax.get_xlabel() == "a note" and (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")
