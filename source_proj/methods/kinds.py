"""The baseline kinds, apart from the code that fits them, so that the query side can name them in its messages
without importing ``baselines.py`` (which imports the query side)."""

from __future__ import annotations

BASELINES = ("trak", "if", "tracin", "grad-dot", "grad-cos", "repsim")
"""The baseline kinds [`fit_baseline`][] knows."""
