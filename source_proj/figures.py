"""matplotlib on a headless backend, and saving a figure: the shared tail of every picture we draw.

matplotlib is an optional extra (``pip install source-proj[demo]``): without it, drawing is refused in one sentence.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from source_proj.errors import TaskError


def pyplot() -> Any:
    """``matplotlib.pyplot``, imported lazily (matplotlib is needed only for pictures) on the Agg backend, which
    needs no display; where pyplot is imported already (a notebook's inline backend) its backend is left as it is,
    as figures are only ever saved. Refuses, in one sentence, where matplotlib cannot be imported."""
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise TaskError(
            f"Drawing a figure needs matplotlib, which cannot be imported ({err}); install it with "
            "`pip install source-proj[demo]` (or `pip install matplotlib`)."
        ) from err
    return plt


def check_figure_path(path: str | Path) -> Path:
    """Refuse, in one sentence, a figure's path that nothing could be drawn to: where matplotlib is missing, a
    folder, or a name whose suffix is no image format matplotlib writes (``.png``, ``.pdf``, ``.svg``…; without a
    suffix matplotlib would write ``NAME.png``, not the path given). Returns the path."""
    path = Path(path)
    pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.is_dir():
        raise TaskError(f"{path} is a folder; give the figure a file name such as {path / 'figure.png'}.")
    if path.suffix.lower().lstrip(".") not in formats:
        raise TaskError(
            f"{path.name} names no image format ({path.suffix or 'no suffix'}); end it in .png, or another of "
            f"{', '.join('.' + f for f in sorted(formats))}."
        )
    return path


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write ``fig`` at ``path`` (creating its folder) in the format its suffix names (PNG for ``.png``)
    and close it; returns the path. A path ``check_figure_path`` refuses is refused before anything is written."""
    try:
        path = check_figure_path(path)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        pyplot().close(fig)
    return path
