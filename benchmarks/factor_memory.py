"""Peak memory of the Kronecker-factor pass on convolutional models: ``curvature="kfac"`` featurize's per-batch
``FactorCollector.add`` (a sampled Fisher target batch, every position) and the eigen projection's basis pass
(``BasisPass.visit``, ``basis_positions`` drawn of each example), each variant in a fresh process.

    python benchmarks/factor_memory.py [--trees /tmp/base,.] [--model resnet9|conv3d] [--batch 64] [--rounds 3]
        [--passes kfac,basis] [--positions 64] [--visits 1] [--width 1.0] [--json OUT.json]

``--trees``: source trees to compare (each put first on the child's ``PYTHONPATH``; ``.`` is this one), run
alternately, round after round. In each child the model, the batch and one forward without gradients come first;
then the kernel's record of the peak resident set is reset (``/proc/self/clear_refs``), and the pass runs once:
``peak`` is VmHWM after it, ``above`` that peak less VmRSS before it (what the pass itself held at its peak, torch's
CPU tensors included, which ``tracemalloc`` does not see; the kfac pass adds into sums made before, as featurize's
chunk does, the basis visit makes its own; ``--visits 2``: the second visit is measured, the means of the first
resident, as at every checkpoint after a run's first). Linux only. ``patches``: by arithmetic, the im2col
patches of every convolution of the batch (float32), which a pass that holds them all until the backward adds.

Models: ``resnet9`` (``benchmarks/resnet9.py``, 32 × 32 × 3 inputs, ``--width``); ``conv3d``: three 3 × 3 × 3
convolutions (1 → 16 → 16 → 32 channels, zero padding, a 2× max pool after the second) on 1 × 32³ volumes, then a
global max pool and a linear head.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def conv3d_model() -> object:
    from torch import nn

    return nn.Sequential(
        nn.Conv3d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv3d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> dict[str, float]:
    """One pass in this process: its peak and its time."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import source_proj as sp
    from source_proj.featurize.basis import BasisPass
    from source_proj.featurize.factors import FactorCollector, kronecker_layers
    from source_proj.tasks.draws import FisherDraws
    from source_proj.tasks.gradients import PerExampleGradients

    sys.path.insert(0, str(HERE))
    import resnet9

    torch.manual_seed(0)
    if args.model == "resnet9":
        model, shape = resnet9.resnet9(args.width), (3, 32, 32)
    else:
        model, shape = conv3d_model(), (1, 32, 32, 32)
    model = model.eval()
    x, y = torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,))
    task = sp.ClassificationTask()
    names = task.select_parameters(model)
    grads_fn = PerExampleGradients(model, task, names)
    layers, diagonal = kronecker_layers(model, names)
    modules = dict(model.named_modules())
    patches = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal patches
        patches += output[0, 0].numel() * args.batch * module.weight[0].numel() * 4

    handles = [modules[layer.module].register_forward_hook(count) for layer in layers if layer.kind == "conv"]
    outputs = grads_fn.outputs((x, y))  # libraries, threads and kernels loaded before the peak is reset
    for handle in handles:
        handle.remove()
    if args.pass_ == "kfac":
        collector = FactorCollector(grads_fn, layers, diagonal)
        sums = collector.empty()
        targets = task.fisher_targets(outputs, (x, y), FisherDraws(0, torch.arange(args.batch)))

        def run() -> None:
            collector.add(sums, targets)
    else:
        basis = BasisPass(grads_fn, task, {"main": TensorDataset(x, y)}, names, 512, examples=args.batch, seed=0,
                          batch_size=args.batch, device=torch.device("cpu"), positions=args.positions)  # fmt: skip

        for _ in range(args.visits - 1):
            basis.visit("main", "benchmark", basis.quiet())

        def run() -> None:
            basis.visit("main", "benchmark", basis.quiet())
    del outputs
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set back to the current one
    before = status("VmRSS")
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    return {"peak": peak, "above": peak - before, "seconds": seconds, "patches": patches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default=".")
    parser.add_argument("--model", choices=["resnet9", "conv3d"], default="resnet9")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--passes", default="kfac,basis")
    parser.add_argument("--visits", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pass", dest="pass_", choices=["kfac", "basis"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    passes = args.passes.split(",")
    runs: dict[tuple[str, str], list[dict[str, float]]] = {(t, p): [] for t in trees for p in passes}
    for _ in range(args.rounds):
        for pass_ in passes:
            for tree in trees:
                command = [sys.executable, __file__, "--child", "--pass", pass_, "--model", args.model,
                           "--width", str(args.width), "--batch", str(args.batch), "--positions", str(args.positions),
                           "--visits", str(args.visits)]
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
                out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
                runs[(tree, pass_)].append(json.loads(out.strip().splitlines()[-1]))
    mib = 2**20
    print(f"{args.model} (width {args.width}), batch {args.batch}, basis_positions {args.positions}, "
          f"basis visit {args.visits}, {args.rounds} rounds, medians\n")  # fmt: skip
    print("| pass | tree | peak RSS (MiB) | above RSS before the pass (MiB) | patches (MiB) | pass s |")
    print("|---|---|---|---|---|---|")
    for pass_ in passes:
        for tree in trees:
            got = runs[(tree, pass_)]
            row = [statistics.median(r[k] for r in got) for k in ("peak", "above", "patches", "seconds")]
            print(f"| {pass_} | {tree} | {row[0] / mib:,.0f} | {row[1] / mib:,.0f} | {row[2] / mib:,.0f} "
                  f"| {row[3]:.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({f"{t}|{p}": v for (t, p), v in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
