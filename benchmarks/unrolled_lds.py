"""What a linear method could reach on the sequence-heads benchmark: the exact derivative through training.

For the recorded AdamW run of ``sequence_heads_lds.py`` (same ``--head``, ``--epochs``, ``--out``; run that first:
its run, store and cached retrains are read), trains the model again as a function of per-example loss weights w
(float64, the same initialisation, batch order and AdamW settings as the recorded run) and differentiates every
query's measurement after the last step with respect to w, through all of training and every parameter: the
linear response that SOURCE approximates, with nothing stationary, projected or sampled. Two forms:

- ``moving D``: Adam exactly, its second moment moving with the removed example;
- ``fixed D``: Adam's denominator held at the segment's mean D of the recorded checkpoints, as SOURCE takes it.

Then the curvature-free inner product ∇f(θ_T)ᵀ D⁻¹ ḡ(z) (ḡ: the mean gradient over the segment's checkpoints,
as SOURCE averages it; plain: without D⁻¹) restricted to each group of parameters (the blocks' linear layers, the
head, the layer norms, the embedding tables, the task's default selection, all), which shows what each group's
share of the change predicts. Every score matrix is scored by LDS against
the benchmark's ground truth.

    python benchmarks/sequence_heads_lds.py --head multi --epochs 1 --out runs/multi-label-lds-1
    python benchmarks/unrolled_lds.py --head multi --epochs 1 --out runs/multi-label-lds-1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

import source_proj as sp
from source_proj.evaluation.lds import LDSArguments, lds, lds_ground_truth
from source_proj.trajectory.preconditioner import steps_preconditioner
from source_proj.trajectory.recorder import Trajectory

try:
    import sequence_heads_lds as heads
except ImportError:  # imported as benchmarks.unrolled_lds
    from benchmarks import sequence_heads_lds as heads

LR, BETAS, EPS, DECAY = 3e-3, (0.9, 0.999), 1e-8, 0.01  # torch.optim.AdamW(lr=3e-3)'s, as the benchmark trains


def losses(model: torch.nn.Module, theta: dict[str, torch.Tensor], ids: torch.Tensor, y: torch.Tensor, head: str):
    """Per-example training losses, as the Hugging Face model computes its batch loss (before the mean)."""
    out = functional_call(model, theta, (), {"input_ids": ids}).logits
    if head == "multi":
        return torch.nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none").mean(1)
    return (out.squeeze(-1) - y) ** 2


def measurements(model, theta, training, head, rows=slice(None)):
    """The task's measurement of the queries ``rows``, as ``SequenceClassificationTask`` defines it."""
    q = training.queries
    out = functional_call(model, theta, (), {"input_ids": q.input_ids[rows]}).logits
    y = q.labels[rows].double()
    if head == "multi":
        return ((2 * y - 1) * out).sum(1)
    return (out.squeeze(-1) - y).abs()


def unrolled(model, training, args, fixed: dict[str, torch.Tensor] | None) -> np.ndarray:
    """d measurement_q(θ_T) / d w_i [Q, N]: w_i weighs example i's loss at each of its visits."""
    data, n = training.train_data, len(training.train_data)
    theta = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    m = {k: torch.zeros_like(p) for k, p in theta.items()}
    v = {k: torch.zeros_like(p) for k, p in theta.items()}
    w = torch.ones(n, dtype=torch.float64, requires_grad=True)
    order = torch.Generator().manual_seed(0)
    step = 0
    for _ in range(args.epochs):
        permutation = torch.randperm(n, generator=order)
        for start in range(0, n, heads.BATCH):
            rows = permutation[start : start + heads.BATCH]
            step += 1
            loss = (w[rows] * losses(model, theta, data.input_ids[rows], data.labels[rows].double(), args.head)).mean()
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
            new = {}
            for (k, p), g in zip(theta.items(), grads, strict=True):
                m[k] = BETAS[0] * m[k] + (1 - BETAS[0]) * g
                v[k] = BETAS[1] * v[k] + (1 - BETAS[1]) * g * g
                v_hat = v[k] / (1 - BETAS[1] ** step)
                d = fixed[k] if fixed is not None else torch.sqrt(v_hat.clamp_min(1e-30)) + EPS
                new[k] = p * (1 - LR * DECAY) - LR * (m[k] / (1 - BETAS[0] ** step)) / d
            theta = new
    if fixed is None:  # the same run as the recorded one: its final weights, up to float32 rounding
        recorded = Trajectory.load(args.out / "run")
        final = recorded.load_state(recorded.checkpoints[-1])["model"]
        drifts = {k: float((theta[k].detach() - final[k].double()).abs().max() / final[k].double().abs().max())
                  for k in theta if not k.endswith("key.bias")}  # fmt: skip
        print(f"the float64 replay ends within {max(drifts.values()):.1e} (relative, per tensor) of the recorded "
              "run's weights, the attention key biases aside (their gradient is zero up to rounding, and Adam "
              "normalises the rounding into steps)")  # fmt: skip
    f = measurements(model, theta, training, args.head)
    return np.stack([torch.autograd.grad(f[q], w, retain_graph=True)[0].numpy() for q in range(len(f))])


def grouped_inner_products(model, training, args, trajectory, d_fixed) -> dict[str, np.ndarray]:
    """−∇f(θ_T)ᵀ D⁻¹ ḡ(z) per parameter group, ḡ the mean over the segment's checkpoints (0 ≤ step < end)."""
    names = [k for k, _ in model.named_parameters()]
    data = training.train_data
    stage = trajectory.stages[0]
    steps = [c.step for c in trajectory.checkpoints]
    states = [trajectory.load_state(c)["model"] for c in trajectory.checkpoints]

    def per_example(theta, fn, count):
        rows = []
        for i in range(count):
            th = {k: t.clone().requires_grad_(True) for k, t in theta.items()}
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(fn(th, i), list(th.values()))]))
        return torch.stack(rows)

    def train_loss(th, i):
        return losses(model, th, data.input_ids[i : i + 1], data.labels[i : i + 1].double(), args.head).sum()

    def query_measurement(th, i):
        return measurements(model, th, training, args.head, slice(i, i + 1)).sum()

    thetas = [{k: s[k].double() for k in names} for s in states]
    at = torch.stack([per_example(th, train_loss, len(data)) for th in thetas])  # [checkpoints, N, p]
    inside = torch.tensor([stage.start_step <= step < stage.end_step for step in steps])
    train = at[inside].mean(0)  # SOURCE's ḡ: the checkpoints inside the segment, its first one included
    query = per_example(thetas[-1], query_measurement, len(training.queries))
    inverse = torch.cat([(1 / d_fixed[k]).reshape(-1) for k in names])
    blocks = set(sp.ModuleSelection().select(model))  # the old default: the blocks' linear layers
    default = set(training.task.select_parameters(model))  # the task's: the blocks' and the head's linear layers
    groups = {
        "blocks' linear layers": blocks.__contains__,
        "head (pooler, classifier)": lambda k: k.startswith(("bert.pooler.", "classifier.")),
        "layer norms": lambda k: "LayerNorm" in k,
        "embedding tables": lambda k: ".embeddings." in k and "LayerNorm" not in k,
        "the task's default selection": default.__contains__,
        "all": lambda k: True,
    }
    out = {}
    for group, keeps in groups.items():
        mask = torch.cat([torch.full((p.numel(),), float(keeps(k))) for k, p in model.named_parameters()])
        for kind, scale in (("Adam's D⁻¹", inverse), ("plain", torch.ones_like(inverse))):
            out[f"{group}, {kind}"] = -((query * mask * scale) @ train.T).numpy()
    # Which checkpoints ḡ averages, in Adam's coordinates: SOURCE's (the segment's, from its first), the
    # trapezoid rule over the segment's ends, the later ones only, the final one only.
    trapezoid = torch.tensor([0.5 if step in (stage.start_step, stage.end_step) else 1.0 for step in steps])
    averages = {"segment's checkpoints": inside.double(), "trapezoid": trapezoid.double(),
                "after the first": torch.tensor([float(step > stage.start_step) for step in steps]),
                "final only": torch.tensor([float(step == steps[-1]) for step in steps])}  # fmt: skip
    for group in ("blocks' linear layers", "the task's default selection"):
        mask = torch.cat([torch.full((p.numel(),), float(groups[group](k))) for k, p in model.named_parameters()])
        for average, weights in averages.items():
            g = torch.einsum("c,cnp->np", weights.double() / weights.sum(), at)
            out[f"{group}, ḡ over {average}"] = -((query * mask * inverse) @ g.T).numpy()
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, completed with what ``sequence_heads_lds.Training`` reads of the recorded run's recipe: AdamW and
    fixed-length sentences (``--min-length`` at its default; the unrolled training below passes no attention mask)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", choices=("multi", "regression"), default="multi")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/multi-label-lds-1"))
    args = parser.parse_args(argv)
    args.optimizer, args.min_length = "adamw", heads.LENGTH
    return args


def main() -> None:
    args = parse()
    torch.set_num_threads(2)
    training = heads.Training(args)
    trajectory = Trajectory.load(args.out / "run")
    model = heads.build_model(args.head, 0).double()
    model.set_attn_implementation("eager")  # double backward through attention
    names = [k for k, _ in model.named_parameters()]
    stage = trajectory.stages[0]
    d = steps_preconditioner(trajectory, stage, stage.start_step, stage.end_step, names)
    d = {k: torch.where(torch.isinf(x), torch.full_like(x, 1e30), x) for k, x in d.items()}  # no state: no step
    rows = sp.Attributor(args.out / "run.sp", heads.build_model(args.head), training.task).rows
    lds_args = LDSArguments(num_subsets=args.subsets, repeats=args.repeats)
    truth = lds_ground_truth(training, rows, args.out / "retrains", lds_args, progress=False)
    scores = {"exact derivative, moving D": unrolled(model, training, args, None),
              "exact derivative, fixed D": unrolled(model, training, args, d)}  # fmt: skip
    scores.update(grouped_inner_products(model, training, args, trajectory, d))
    report = {}
    for name, matrix in scores.items():
        result = lds(matrix, truth, lds_args)
        report[name] = {"lds": result.mean, "ci": [result.low, result.high]}
        print(f"{name}: LDS {result.mean:.3f} [{result.low:.3f}, {result.high:.3f}]", flush=True)
    (args.out / "unrolled.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
