"""Adam's rank-R scaling on wide layers: the weighted fit (``projection/transform.py: low_rank``) as it was (started
from the exact truncated SVD, 30 ALS steps) against now (a randomized SVD start on layers wider than 512, ALS until
it settles): seconds, the fit's weighted error, and how far the two fits are apart.

    python benchmarks/adam_low_rank_start.py [--checkpoint runs/checkpoint-loads/run/checkpoints/step-00000012.pt]
        [--rank 1] [--threads 2] [--json runs/adam-low-rank-start.json]

The grids S = D^{-1/2} (D = √v̂ + ε, as ``trajectory/preconditioner.py`` forms it; ``low_rank`` weights the fit by
S⁻⁴) come from (1) Adam second moments simulated over 50 steps of gradients that are sums of 16 outer products with
heavy-tailed row and column scales, at a 1B Llama's layer shapes (2,048 × 2,048 attention, 2,048 × 8,192 MLP) and
GPT-2 small's MLP (768 × 3,072); (2) the AdamW checkpoint of ``checkpoint_loads.py``'s 75M MLP, where present.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from source_proj.projection import transform


def weighted_error(grid: torch.Tensor, weights: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """Σ w (s − Σ_r u_r v_rᵀ)² / Σ w s²: the fit's weighted error, relative."""
    w = weights / weights.max()
    return float((w * (grid - u.T @ v) ** 2).sum() / (w * grid**2).sum())


def simulated_grid(m: int, n: int, seed: int, steps: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the scales' draws
    rows = torch.distributions.LogNormal(0.0, 1.0).sample((m, 1)).double()
    cols = torch.distributions.LogNormal(0.0, 1.0).sample((1, n)).double()
    v = torch.zeros(m, n, dtype=torch.float64)
    for _ in range(steps):
        grad = (torch.randn(m, 16, generator=g, dtype=torch.float64) @ torch.randn(16, n, generator=g,
                                                                                   dtype=torch.float64))  # fmt: skip
        v = 0.999 * v + 0.001 * (rows * grad * cols) ** 2
    v_hat = v / (1 - 0.999**steps)
    return (v_hat.sqrt() + 1e-8) ** -0.5


def checkpoint_grids(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    names = [n for n in state["model"] if n.endswith("weight")]
    groups = state["optimizer"]["param_groups"][0]
    params = groups["params"]
    by_index = {i: n for i, n in zip(params, state["model"], strict=False)}
    grids = {}
    for index, entry in state["optimizer"]["state"].items():
        name = by_index.get(index)
        if name in names and min(entry["exp_avg_sq"].shape) > transform._EXACT_START:
            step = float(entry["step"])
            v_hat = entry["exp_avg_sq"].double() / (1 - groups["betas"][1] ** step)
            grids[f"75M MLP {name} {tuple(v_hat.shape)}"] = (v_hat.sqrt() + groups["eps"]) ** -0.5
    return grids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checkpoint = Path("runs/checkpoint-loads/run/checkpoints/step-00000012.pt")
    parser.add_argument("--checkpoint", type=Path, default=checkpoint)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grids = {
        f"simulated {m} x {n}": simulated_grid(m, n, seed)
        for seed, (m, n) in enumerate([(768, 3072), (2048, 2048), (2048, 8192)])
    }
    if args.checkpoint.exists():
        grids.update(checkpoint_grids(args.checkpoint))
    rows = []
    for name, grid in grids.items():
        weights = grid**-4
        result: dict[str, object] = {"grid": name}
        fits = {}
        for variant, start, tolerance in (("before", 10**9, 0.0), ("now", 512, transform._ALS_TOLERANCE)):
            transform._EXACT_START, transform._ALS_TOLERANCE = start, tolerance
            begin = time.perf_counter()
            fits[variant] = transform.low_rank(grid, args.rank, weights=weights)
            result[f"{variant}_s"] = time.perf_counter() - begin
            result[f"{variant}_error"] = weighted_error(grid, weights, *fits[variant])
        transform._EXACT_START, transform._ALS_TOLERANCE = 512, 1e-13
        (u0, v0), (u1, v1) = fits["before"], fits["now"]
        result["difference"] = float((u1.T @ v1 - u0.T @ v0).norm() / (u0.T @ v0).norm())
        rows.append(result)
        print(f"{name}: before (exact start, 30 ALS steps) {result['before_s']:.2f} s, now {result['now_s']:.2f} s; "
              f"weighted error {result['before_error']:.6g} → {result['now_error']:.6g}; fits differ by "
              f"{result['difference']:.1e} (relative)", flush=True)  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
