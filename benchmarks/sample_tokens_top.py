"""sample_tokens before and after a change, alternating, in one process: time and whether they draw the same tokens.

    git show e98bb8b:source_proj/tasks/text.py > /tmp/text_before.py
    python benchmarks/sample_tokens_top.py --before /tmp/text_before.py

``--before``: the ``tasks/text.py`` of the tree to compare against (loaded as a module of its own; the library's
other modules are this tree's). Logits ``torch.randn`` of a GPT-2-sized vocabulary and of one under 256 (one padded
block), uniforms ``torch.rand``; median of ``--rounds``, the order of the two alternating round by round.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

from source_proj.tasks import text


def _load(path: str) -> object:
    spec = importlib.util.spec_from_file_location("text_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["text_before"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="tasks/text.py of the tree to compare against")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    before = _load(args.before)
    g = torch.Generator().manual_seed(0)
    for rows, vocab in ((512, 50257), (65536, 200)):
        logits = torch.randn(rows, vocab, generator=g)
        uniform = torch.rand(rows, generator=g, dtype=torch.float64)
        times: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(args.rounds):
            order = [("before", before), ("after", text)]
            for name, module in order if r % 2 else order[::-1]:
                start = time.perf_counter()
                module.sample_tokens(logits, uniform)  # type: ignore[attr-defined]
                times[name].append(time.perf_counter() - start)
        same = torch.equal(before.sample_tokens(logits, uniform), text.sample_tokens(logits, uniform))  # type: ignore[attr-defined]
        medians = ", ".join(f"{name} {statistics.median(t):.3f} s" for name, t in times.items())
        print(f"{rows} x {vocab}: {medians}; same draws: {same}")


if __name__ == "__main__":
    main()
