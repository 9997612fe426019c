"""The eigen basis's decompositions of wide factors: whole (float64 ``eigh``, as before) against the leading
eigenpairs only (``projection/eigen.py: leading_eigh``, block subspace iteration, for factors wider than
``PARTIAL_ABOVE``): seconds, the eigenvalues' error, the share of the trace the leading subspace keeps, and for a
whole transformer block the basis ``EigenBasis.from_factors`` builds, before and after.

    python benchmarks/eigen_basis_time.py [--sides 3072,8192] [--modes 64] [--threads 2] [--json OUT.json]
        [--block gpt2-124m|none] [--block-dim 1365] [--device cuda]

Each decomposition runs where the library would run it: NumPy's on the CPU, torch's on ``--device`` (the model's
device: featurize and capture decompose there). Copies to and from the device are inside the times, as in the
library.

Factors (float64, symmetric PSD), two kinds per side d:
- ``decaying``: 512 directions (a random orthonormal d × 512) with power-law eigenvalues i^-1.2, over a floor of a
  tenth of the 512th (a trained layer's inputs: a few hundred directions that matter, then noise);
- ``random network``: the covariance of min(2·d, 4,096) Gaussian positions (a freshly initialised network's
  inputs: a flat Marchenko–Pastur spectrum, the slowest case for subspace iteration).
``--block gpt2-124m``: one GPT-2 small block's 4 layers (c_attn 769 → 2,304, attn.c_proj 769 → 768, c_fc 769 →
3,072, mlp.c_proj 3,073 → 768; A and B of the decaying kind) with k = --block-dim (16,384 / 12 blocks), the basis
built whole (``PARTIAL_ABOVE`` raised past every side) and as the library builds it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import devices
import numpy as np
import torch

from source_proj.projection import eigen

GPT2_BLOCK = [(769, 2304), (769, 768), (769, 3072), (3073, 768)]  # (A side, B side) per layer


def decaying(side: int, rng: np.random.Generator, exponent: float = 1.2) -> np.ndarray:
    directions = min(512, side)
    basis, _ = np.linalg.qr(rng.standard_normal((side, directions)))
    values = np.arange(1, directions + 1, dtype=np.float64) ** -exponent
    return (basis * values) @ basis.T + np.eye(side) * values[-1] / 10


def random_network(side: int, rng: np.random.Generator) -> np.ndarray:
    positions = rng.standard_normal((min(2 * side, 4096), side))
    return positions.T @ positions / positions.shape[0]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compare(matrix: np.ndarray, modes: int, device: str) -> dict[str, float]:
    """Whole and leading decompositions of ``matrix`` on ``device`` (the library's choice there: NumPy on the CPU,
    torch elsewhere), each timed once after a warm-up of the device's kernels on a small factor."""
    eigen.eigh(matrix[:256, :256], device)
    eigen.leading_eigh(matrix[:1024, :1024], 16, device)
    (values, vectors), whole_s = timed(lambda: eigen.eigh(matrix, device))
    values, vectors = values[::-1][:modes], vectors[:, ::-1][:, :modes]
    (top, leading), part_s = timed(lambda: eigen.leading_eigh(matrix, modes, device))
    kept = float(np.trace(leading.T @ matrix @ leading)) / float(values.sum())
    return {
        "whole_s": whole_s,
        "leading_s": part_s,
        "speed_up": whole_s / part_s,
        "max_eigenvalue_error": float(np.abs(top - values).max() / values[0]),
        "trace_kept_vs_exact": kept,
    }


def block(dim: int, rng: np.random.Generator) -> dict[str, object]:
    # each factor its own exponent and scale: identical spectra would tie the allocation's gains exactly
    a = [decaying(sa, rng, rng.uniform(1.0, 1.4)) * rng.uniform(0.5, 2.0) for sa, _ in GPT2_BLOCK]
    b = [decaying(sb, rng, rng.uniform(1.0, 1.4)) * rng.uniform(0.5, 2.0) for _, sb in GPT2_BLOCK]
    modules = [f"layer{i}" for i in range(len(GPT2_BLOCK))]
    saved = eigen.PARTIAL_ABOVE
    eigen.PARTIAL_ABOVE = 10**9
    try:
        whole, whole_s = timed(lambda: eigen.EigenBasis.from_factors(modules, a, b, dim, [0], 1))
    finally:
        eigen.PARTIAL_ABOVE = saved
    part, part_s = timed(lambda: eigen.EigenBasis.from_factors(modules, a, b, dim, [0], 1))
    subspace = max(
        float((m.double().T @ m.double() - w.double().T @ w.double()).abs().max())
        for m, w in zip((*part.out, *part.inp), (*whole.out, *whole.inp), strict=True)
    )
    return {
        "dim": dim,
        "whole_s": whole_s,
        "library_s": part_s,
        "speed_up": whole_s / part_s,
        "blocks_whole": whole.blocks,
        "blocks_library": part.blocks,
        "captured_whole": whole.captured,
        "captured_library": part.captured,
        "largest_projector_difference": subspace,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="3072,8192", help="comma-separated, or 'none'")
    parser.add_argument("--modes", type=int, default=eigen.FIRST_MODES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", choices=["gpt2-124m", "none"], default="gpt2-124m")
    parser.add_argument("--block-dim", type=int, default=16384 // 12)
    parser.add_argument("--device", default="cpu", help="where the decompositions run (cuda: torch's, as the library)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    devices.device(args.device)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.threads} CPU threads"
    print(f"# {where}, torch {torch.__version__}, leading {args.modes} eigenpairs, "
          f"PARTIAL_ABOVE {eigen.PARTIAL_ABOVE}", flush=True)  # fmt: skip
    print("| side | factor | whole eigh s | leading s | speed-up | max eigenvalue error (of the largest) | "
          "trace kept / exact |", flush=True)  # fmt: skip
    print("|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for side in [] if args.sides == "none" else [int(s) for s in args.sides.split(",")]:
        for kind, make in (("decaying", decaying), ("random network", random_network)):
            row = {"side": side, "factor": kind, **compare(make(side, rng), args.modes, args.device)}
            rows.append(row)
            print(f"| {side:,} | {kind} | {row['whole_s']:.2f} | {row['leading_s']:.2f} | {row['speed_up']:.1f}× | "
                  f"{row['max_eigenvalue_error']:.1e} | {row['trace_kept_vs_exact']:.9f} |", flush=True)  # fmt: skip
    result: dict[str, object] = {"threads": args.threads, "modes": args.modes, "factors": rows}
    if args.block != "none":
        row = block(args.block_dim, rng)
        result["block"] = row
        print(f"\nGPT-2 small block at k = {args.block_dim}: whole {row['whole_s']:.2f} s, library "
              f"{row['library_s']:.2f} s ({row['speed_up']:.1f}×); blocks equal: "
              f"{row['blocks_whole'] == row['blocks_library']} {row['blocks_library']}; captured "
              f"{row['captured_whole']:.9f} → {row['captured_library']:.9f}; largest projector difference "
              f"{row['largest_projector_difference']:.1e}", flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
