"""Paired per-query LDS differences between two reports of one benchmark against one ground truth.

    python benchmarks/paired_reports.py AFTER/result.json BEFORE/result.json

The reports of ``methods_lds.compare_methods`` (``sequence_heads_lds.py``, ``token_classification_lds.py``…) or of
``text_average_lds.py``, each method's ``per_query`` LDS recorded, from two runs that share their recorded run and
ground truth (the library at two revisions, say: link ``run`` and ``retrains`` of the second run's ``--out`` to
the first's). Printed per method (and setting): both LDS and the mean per-query difference, first − second, with
its 95 % bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def methods(report: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """``name → entry`` of every entry with per-query LDS, nested settings flattened as ``setting/method``."""
    out = {}
    for key, value in report.items():
        if isinstance(value, dict) and "per_query" in value:
            out[prefix + key] = value
        elif isinstance(value, dict):
            out.update(methods(value, f"{prefix}{key}/"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    first, second = (methods(json.loads(p.read_text())) for p in (args.first, args.second))
    for name in first:
        if name not in second:
            continue
        a, b = (np.asarray(r[name]["per_query"], dtype=np.float64) for r in (first, second))
        diff = (a - b)[np.isfinite(a - b)]
        boot = np.random.default_rng(0).choice(diff, (2000, len(diff))).mean(1)
        low, high = np.percentile(boot, [2.5, 97.5])
        print(f"{name}: {first[name]['lds']:.3f} against {second[name]['lds']:.3f}, per query "
              f"{diff.mean():+.4f} [{low:+.4f}, {high:+.4f}]")  # fmt: skip


if __name__ == "__main__":
    main()
