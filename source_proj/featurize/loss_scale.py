"""Featurize's check that the run trained on the batch mean of the task's loss, the step SOURCE models.

SOURCE takes step k as η_k times the gradient of the batch *mean* of the task's per-example loss. A loss summed over
the batch steps B times as far (so does a loss scaler the recorder was not given, by its scale), and SOURCE would
model every step B times too short; nothing in the recorded rates shows it. The recorder keeps, for the step taken at
each checkpoint's weights, the squared norm of each parameter's gradient before clipping (``gradient_norms`` in
``trajectory.json``), and the examples the step's forwards saw, B. At that checkpoint featurize takes the task's
per-example gradients g_i of up to ``EXAMPLES`` examples of the stage, one at a time in training mode as the run
trained (dropout draws each example's mask as a training batch does; batch norm in eval mode), over the parameters
both hold, and the ratio

    r = ‖recorded gradient‖² / mean_i ‖g_i‖².

For the batch mean ḡ of any B examples, ‖ḡ‖² ≤ mean over the batch of ‖g_i‖² (the squared norm is convex), so
E[r] ≤ 1, however large B and however alike the examples' gradients; for the sum, E‖Σ g_i‖² = B²‖μ‖² + B·tr Σ ≥
B·E‖g_i‖² (μ, Σ: the mean and covariance of the examples' gradients), so E[r] ≥ B. Between them, at B ≥
``MIN_EXAMPLES``, lies ``BOUND``: a stage whose median r over its first ``CHECKED`` recorded checkpoints exceeds it is
warned of. Smaller batches are not checked (a mean over a batch of 1 is its sum), nor steps whose examples the
recorder did not see (``examples`` 0), nor runs recorded before the recorder kept the norms (no ``gradient_norms``).

What moves r under a mean loss (BENCHMARKS.md, "The training loss's scale after training"): label smoothing and
clipping do not (the task smooths alike; the recorded norm is before clipping); dropout would, against an eval-mode
reference (dropout 0.9 on examples whose gradients agree: a median of 2.2 and a ratio of 5.0 against eval mode's,
0.33 against training mode's); one batch's draw of examples does (a batch's mean is not the expectation: 1.06 for
the mean over 8 agreeing examples), which the median over checkpoints and the margin of 3 absorb. Late in training
the per-example norms are heavy-tailed, and the earliest checkpoints are the ones checked. It is a warning, not a
refusal: what it tells cannot be mended after training, and a check that samples must not stop a run it misjudged.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from source_proj.featurize.basis import modes_kept
from source_proj.tasks.data import loader
from source_proj.tasks.gradients import move_batch
from source_proj.tasks.task import Task
from source_proj.trajectory.recorder import Trajectory

MIN_EXAMPLES = 8
"""Steps of fewer examples are not checked: a sum over B examples is only B times the mean, too close to tell."""
BOUND = 3.0
"""A stage whose median ratio r exceeds this trained on more than the batch mean (E[r] ≤ 1 for the mean, ≥ 8 for a
sum over 8 or more examples: the bound is about their geometric middle)."""
CHECKED = 3
"""Recorded checkpoints per stage checked, the earliest (their per-example gradients are the least heavy-tailed)."""
EXAMPLES = 256
"""Examples of the stage whose per-example gradients are the reference at each checked checkpoint (all of a smaller
stage), drawn with a fixed seed."""


def loss_scale_ratios(
    trajectory: Trajectory,
    model: nn.Module,
    task: Task,
    names: Sequence[str],
    datasets: Mapping[str, Dataset],
    device: torch.device,
    *,
    training: bool = True,
) -> dict[str, list[tuple[int, int, float]]]:
    """Each stage's checked steps: ``(step, examples, r)`` (see the module docstring). ``model`` (on ``device``)
    is loaded with each checked checkpoint's weights; ``names``: the task's parameters. ``training=False``: the
    reference gradients in eval mode instead (no dropout), for comparison (BENCHMARKS.md)."""
    saved = {c.step: c for c in trajectory.checkpoints}
    ratios: dict[str, list[tuple[int, int, float]]] = {}
    for stage in trajectory.stages:
        entries = [e for e in trajectory.gradient_norms if stage.start_step <= e["step"] < stage.end_step
                   and e["examples"] >= MIN_EXAMPLES and e["step"] in saved][:CHECKED]  # fmt: skip
        data = datasets.get(stage.name)
        if not entries or data is None:
            continue
        rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:EXAMPLES]  # type: ignore[arg-type]
        examples = Subset(data, sorted(rows.tolist()))
        found = []
        for entry in entries:
            common = [n for n in names if n in entry["squared"]]
            if not common:
                continue
            trajectory.load_into(model, saved[entry["step"]])
            each = _mean_squared_gradients(model, task, common, examples, device, training)
            missing = [n for n in common if each[n] is None and entry["squared"][n] > 0]
            if missing:
                raise RuntimeError(
                    f"no example's gradient of the task's loss reaches {missing[0]!r}, which the training step's did "
                    "(a forward that checkpoints reentrantly in training mode?)"
                )
            reference = sum(v for v in each.values() if v is not None)
            if reference > 0:
                found.append((entry["step"], entry["examples"], sum(entry["squared"][n] for n in common) / reference))
        if found:
            ratios[stage.name] = found
    return ratios


def _mean_squared_gradients(
    model: nn.Module, task: Task, names: Sequence[str], examples: Dataset, device: torch.device, training: bool
) -> dict[str, float | None]:
    """mean_i ‖∇ℓ(z_i)‖² of each of ``names`` (``None``: no example's gradient reaches it): each example's gradient
    of the task's loss alone, in training mode as the run
    trained (dropout draws each example's mask, as it does in a training batch; batch norm in eval mode, whose
    training mode would normalise an example by itself), with seeded masks and the random state left as it was.
    Taken through the model's own parameters (not a functional copy): a forward that checkpoints in training mode
    recomputes through them."""
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    flags = [p.requires_grad for p in chosen]
    bound = task.bind(model)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    totals: list[float | None] = [None] * len(chosen)
    count = 0
    try:
        for p in chosen:
            p.requires_grad_(True)
        with modes_kept(model), torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(0)  # the same masks at every featurize of the run
            for i, one in enumerate(loader(examples, batch_size=1)):
                one = move_batch(one, device)
                if i == 0:  # the task's checks of the model (a text task's of its mask) see it in eval mode, once
                    model.eval()
                    with torch.no_grad():
                        bound.forward(model, one)
                    model.train(training)
                    for module in model.modules():
                        if isinstance(module, nn.modules.batchnorm._BatchNorm):
                            module.eval()
                loss = bound.loss(bound.forward(model, one), one).sum()
                grads = torch.autograd.grad(loss, chosen, allow_unused=True)
                for j, g in enumerate(grads):
                    if g is not None:
                        totals[j] = (totals[j] or 0.0) + float(g.double().pow(2).sum())
                count += 1
    finally:
        for p, flag in zip(chosen, flags, strict=True):
            p.requires_grad_(flag)
    return {n: None if t is None else t / max(count, 1) for n, t in zip(names, totals, strict=True)}


def loss_scale_warning(ratios: Mapping[str, list[tuple[int, int, float]]]) -> str | None:
    """The sentence that warns of the stages whose median ratio exceeds ``BOUND``; ``None`` where none does."""
    over = {name: found for name, found in ratios.items() if statistics.median(r for _, _, r in found) > BOUND}
    if not over:
        return None
    name, found = next(iter(over.items()))
    ratio = statistics.median(r for _, _, r in found)
    examples = statistics.median(b for _, b, _ in found)
    others = f" (and stage(s) {', '.join(repr(n) for n in list(over)[1:])})" if len(over) > 1 else ""
    return (
        f"Stage {name!r}{others} stepped with gradients whose squared norm was {ratio:.3g} times the task's mean "
        f"squared per-example gradient at the same weights (at most about 1 for the batch mean of the task's loss, at "
        f"least about the batch size, {examples:g}, for its sum), so its training loss was larger than that mean (a "
        "loss summed over the batch, or a loss scaler the recorder was not given) and SOURCE models its steps too "
        "short: train on the batch mean of the task's loss (plain SGD takes a summed loss's steps with the learning "
        "rate times B and the weight decay over B), or give the recorder the loss scaler (grad_scaler=...)."
    )
