"""Featurize, fit and query on a ResNet-9 with CIFAR-shaped inputs; projector kinds side by side,
and traker in the same run when it is installed. Prints a markdown table.

    python benchmarks/resnet9.py                                   # the issue's setting (needs a GPU)
    python benchmarks/resnet9.py --n 256 --dims 512 --width 0.25 --queries 64 --timed-batches 2   # CPU smoke

Inputs are random 32×32×3 images with random labels (timing only; the model is freshly initialised
and recorded for one SGD step, so featurize sees 2 checkpoints). Per kind and k:

- ``project ex/s``: per-example gradients + projection of one batch (the work TRAK's featurize
  does per example), median over ``--timed-batches`` after one warm-up batch;
- ``featurize``: ``source_proj.featurize`` over N examples × 2 checkpoints (``fisher="empirical"``:
  one gradient per example and checkpoint, as TRAK);
- ``fit``: segments, k × k eigendecompositions and cached features;
- ``query``: query gradients and top-50 helpful + harmful for ``--queries`` queries.

On CUDA, step times come from CUDA events (after a synchronize) and peak memory from
``torch.cuda.max_memory_allocated``; on the CPU, from ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import devices
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import source_proj as sp
from source_proj.projection.factory import make_projector
from source_proj.projection.fastjl import fast_jl_available
from source_proj.tasks.gradients import PerExampleGradients, move_batch


class PNGImages(Dataset):
    """The images as PNG files in memory, decoded, randomly cropped (4-pixel padding), flipped and
    normalised in ``__getitem__``: the CPU work of a usual CIFAR input pipeline, so that DataLoader
    workers have something to overlap. The crop and flip are seeded by the index (reproducible)."""

    def __init__(self, data: TensorDataset) -> None:
        import io

        from PIL import Image

        x, self.labels = data.tensors
        pixels = ((x - x.min()) / (x.max() - x.min()) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        self.files = []
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            self.files.append(buffer.getvalue())

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import io

        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(io.BytesIO(self.files[i])).convert("RGB"), dtype=np.float32) / 255
        rng = np.random.default_rng(i)
        dy, dx = rng.integers(0, 9, 2)
        image = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")[dy : dy + 32, dx : dx + 32]
        if rng.random() < 0.5:
            image = image[:, ::-1]
        image = (image - 0.5) / 0.25
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), self.labels[i]


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def resnet9(width: float = 1.0, classes: int = 10) -> nn.Module:
    """The ResNet-9 of TRAK's CIFAR examples (6.57M parameters at width 1)."""
    c = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
    return nn.Sequential(
        conv_bn(3, c[0]),
        conv_bn(c[0], c[1], pool=True),
        Residual(c[1]),
        conv_bn(c[1], c[2], pool=True),
        conv_bn(c[2], c[3], pool=True),
        Residual(c[3]),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(c[3], classes, bias=False),
    )


class Timer:
    """Wall time of a region: CUDA events on a GPU, perf_counter on the CPU; peak GPU memory."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000, torch.cuda.max_memory_allocated() / 2**30
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, float("nan")


def record_run(run_dir: Path, model: nn.Module, data: TensorDataset) -> None:
    """One SGD step on the first batch, recorded: checkpoints at steps 0 and 1."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rec = sp.TrajectoryRecorder(run_dir, model, opt, save_every=10**9)
    rec.begin_stage("main", dataset_size=len(data))
    x, y = data.tensors
    F.cross_entropy(model(x[:32]), y[:32]).backward()
    opt.step()
    rec.step()
    rec.close()


def project_rate(
    kind: str, dim: int, args: argparse.Namespace, data: TensorDataset, device: torch.device, timer: Timer
):
    model = resnet9(args.width).to(device).eval()
    task = sp.ClassificationTask(parameters=sp.ParameterSelection(skip_norm=args.skip_norm))
    names = task.select_parameters(model)
    params = dict(model.named_parameters())
    projector = make_projector(kind, [(n, tuple(params[n].shape)) for n in names], dim, 0, model=model)
    grads_fn = PerExampleGradients(model, task, names, precision=args.precision)
    x, y = data.tensors
    batches = [move_batch((x[i : i + args.batch], y[i : i + args.batch]), device) for i in range(0, len(y), args.batch)]
    timer(lambda: projector.project_batch(grads_fn, batches[0]))  # warm-up (and the factored self-check)
    times = []
    for b in range(args.timed_batches):
        batch = batches[(b + 1) % len(batches)]
        seconds, peak = timer(lambda batch=batch: projector.project_batch(grads_fn, batch))
        times.append(seconds)
    return args.batch / statistics.median(times), peak


def run_ours(
    kind: str,
    dim: int,
    args: argparse.Namespace,
    data: TensorDataset,
    queries: TensorDataset,
    tmp: Path,
    device: torch.device,
    timer: Timer,
) -> dict[str, Any]:
    rate, project_peak = project_rate(kind, dim, args, data, device, timer)
    task = sp.ClassificationTask(parameters=sp.ParameterSelection(skip_norm=args.skip_norm))
    store = tmp / f"{kind}-{dim}.sp"
    options = sp.FeaturizeArguments(
        batch_size=args.batch,
        chunk_rows=args.chunk_rows,
        fisher="empirical",
        device=str(device),
        precision=args.precision,
        num_workers=args.workers,
        measurement=args.measurement,
    )
    train = PNGImages(data) if args.data == "png" else data
    feat_s, feat_peak = timer(
        lambda: sp.featurize(
            tmp / "run",
            resnet9(args.width),
            task,
            train,
            store,
            projection=sp.ProjectionArguments(dim=dim, kind=kind),
            options=options,
            progress=False,
        )
    )
    fit_s, fit_peak = timer(lambda: sp.fit(store, progress=False, device=str(device)))
    attributor = sp.Attributor(store, resnet9(args.width), task, device=str(device), batch_size=args.batch)
    query_s, query_peak = timer(lambda: attributor.top_k(queries, 50))
    return {
        "method": f"source-proj {kind}" + (" bf16" if args.precision == "bf16" else ""),
        "k": dim,
        "project": rate,
        "featurize": feat_s,
        "featurize_rate": 2 * len(data) / feat_s,
        "fit": fit_s,
        "query": query_s,
        "peak": max(project_peak, feat_peak, fit_peak, query_peak),
    }


def run_traker(
    dim: int,
    args: argparse.Namespace,
    data: TensorDataset,
    queries: TensorDataset,
    tmp: Path,
    device: torch.device,
    timer: Timer,
) -> dict[str, Any]:
    from trak import TRAKer

    model = resnet9(args.width).to(device).eval()
    traker = TRAKer(
        model=model,
        task="image_classification",
        train_set_size=len(data),
        save_dir=str(tmp / f"trak{dim}"),
        device=str(device),
        proj_dim=dim,
        use_half_precision=args.precision == "bf16",
    )
    x, y = data.tensors

    def featurize() -> None:
        for step in range(2):  # the same 2 checkpoints as ours
            traker.load_checkpoint(model.state_dict(), model_id=step)
            for i in range(0, len(y), args.batch):
                traker.featurize(
                    batch=[x[i : i + args.batch].to(device), y[i : i + args.batch].to(device)],
                    num_samples=len(y[i : i + args.batch]),
                )

    feat_s, feat_peak = timer(featurize)
    fit_s, fit_peak = timer(traker.finalize_features)
    qx, qy = queries.tensors

    def score() -> None:
        for step in range(2):
            traker.start_scoring_checkpoint("q", model.state_dict(), model_id=step, num_targets=len(qy))
            for i in range(0, len(qy), args.batch):
                traker.score(
                    batch=[qx[i : i + args.batch].to(device), qy[i : i + args.batch].to(device)],
                    num_samples=len(qy[i : i + args.batch]),
                )
        traker.finalize_scores(exp_name="q")

    query_s, query_peak = timer(score)
    return {
        "method": "traker " + type(traker.projector).__name__,
        "k": dim,
        "project": float("nan"),
        "featurize": feat_s,
        "featurize_rate": 2 * len(data) / feat_s,
        "fit": fit_s,
        "query": query_s,
        "peak": max(feat_peak, fit_peak, query_peak),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="training examples")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dims", default="2048,4096")
    parser.add_argument("--kinds", default="factored,fast_jl,rademacher", help="projector kinds to time")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = 6.57M parameters)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--chunk-rows", type=int, default=2000)
    parser.add_argument("--timed-batches", type=int, default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--skip-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="leave BatchNorm parameters out (default; else the factored kind projects them densely)",
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of our featurize")
    parser.add_argument(
        "--data",
        choices=["tensors", "png"],
        default="tensors",
        help="training data for our featurize: tensors in memory, or PNG files decoded and augmented per "
        "example (CPU work for --workers to overlap; no traker row then)",
    )
    parser.add_argument(
        "--measurement",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also store the final checkpoint's measurement gradients (the TRAK baseline's input): 1.5× the "
        "gradients of traker's featurize with 2 checkpoints; off by default so both do the same work",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = devices.device(args.device)
    timer = Timer(device)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(args.n, 3, 32, 32, generator=g), torch.randint(0, 10, (args.n,), generator=g))
    queries = TensorDataset(
        torch.randn(args.queries, 3, 32, 32, generator=g), torch.randint(0, 10, (args.queries,), generator=g)
    )
    torch.manual_seed(0)
    params = sum(p.numel() for p in resnet9(args.width).parameters())
    notes = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        record_run(tmp / "run", resnet9(args.width), data)
        for dim in (int(d) for d in args.dims.split(",")):
            for kind in args.kinds.split(","):
                if kind == "fast_jl" and not fast_jl_available():
                    notes.append("fast_jl skipped: it needs a CUDA GPU and `pip install source-proj[cuda]`.")
                    continue
                rows.append(run_ours(kind, dim, args, data, queries, tmp, device, timer))
                print(rows[-1], file=sys.stderr)
            if args.data == "png":
                notes.append("--data png: no traker row (traker is timed on tensors in memory only).")
            elif importlib.util.find_spec("trak") is None:
                notes.append("traker not installed: no TRAK row (`pip install traker[fast]` on a CUDA machine).")
            else:
                if device.type != "cuda":
                    notes.append(
                        "traker runs without CUDA: it falls back to its BasicProjector (not its fast_jl path)."
                    )
                rows.append(run_traker(dim, args, data, queries, tmp, device, timer))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(
        f"# {platform.processor() or platform.machine()}, GPU {gpu}, torch {torch.__version__}, "
        f"{args.threads} threads; ResNet-9 width {args.width} ({params:,} parameters), N={args.n}, "
        f"queries={args.queries}, batch {args.batch}, {args.precision}, skip_norm={args.skip_norm}, "
        f"measurement={args.measurement}, data={args.data}, workers={args.workers}"
    )
    print("| method | k | project ex/s | featurize s (ex·ckpt/s) | fit s | query s (top-50) | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "n/a (CPU)" if device.type != "cuda" else f"{r['peak']:.2f}"
        project = "—" if r["project"] != r["project"] else f"{r['project']:,.0f}"
        print(
            f"| {r['method']} | {r['k']} | {project} | {r['featurize']:.1f} ({r['featurize_rate']:,.0f}) | "
            f"{r['fit']:.2f} | {r['query']:.2f} | {peak} |"
        )
    for note in dict.fromkeys(notes):
        print(f"note: {note}")


if __name__ == "__main__":
    main()
