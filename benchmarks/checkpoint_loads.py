"""What featurize spends reading checkpoints: how many times it loads and hashes each one, and the seconds it takes,
on a run whose checkpoints are large beside its compute (an AdamW MLP of about 75M parameters: checkpoints of
about 0.9 GB, weights and Adam's two moments).

    python benchmarks/checkpoint_loads.py [--out runs/checkpoint-loads] [--rounds 3] [--threads 2]
        [--projection factored] [--dim 256] [--examples 64]

Trains the run into OUT/run when it is missing (12 AdamW steps, a checkpoint every 6: three checkpoints), then
featurizes it ``--rounds`` times into fresh stores, each in this process, so that a library version that hashes
each file once per process gains only within a featurize call (the real use), not across rounds: the file-hash
memory is cleared before each round. Counts the calls of ``load_checkpoint`` and of the file hash by wrapping
them, and times them. Prints the library's path, so that the same script run with ``PYTHONPATH`` set to an older
checkout measures that one; writes OUT/results-<label>.json.

The factored projection keeps the basis pass (eigendecompositions of 6,144-wide factors) out of the timing; its
loads are those of the default eigen projection less the basis pass's one a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import source_proj as sp
import source_proj.trajectory.recorder as recorder


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(2048, 6144), nn.ReLU(), nn.Linear(6144, 6144), nn.ReLU(), nn.Linear(6144, 4096), nn.ReLU(),
        nn.Linear(4096, 10),
    )  # fmt: skip


def data(examples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(examples, 2048, generator=generator),
                         torch.randint(0, 10, (examples,), generator=generator))  # fmt: skip


def train(run: Path, dataset: TensorDataset) -> None:
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rec = sp.TrajectoryRecorder(run, model, optimizer, save_every=6)
    rec.begin_stage("main", dataset_size=len(dataset))
    loader = DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rec.step()
    rec.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/checkpoint-loads"))
    parser.add_argument("--label", default="this")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--projection", default="factored")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--examples", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("library:", Path(sp.__file__).parent, flush=True)
    dataset = data(args.examples)
    run = args.out / "run"
    if not (run / "trajectory.json").exists():
        shutil.rmtree(run, ignore_errors=True)
        train(run, dataset)
        time.sleep(3)  # featurize follows training; a checkpoint written in the last 2 s is hashed at every load
    files = sorted(run.rglob("*.pt"))
    print(f"{len(files)} checkpoints, {sum(f.stat().st_size for f in files) / len(files) / 2**30:.2f} GiB each")

    calls: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    load, sha = recorder.load_checkpoint, recorder._sha256_file

    def counted_load(*a, **k):
        start = time.perf_counter()
        try:
            return load(*a, **k)
        finally:
            calls["load"] += 1
            seconds["load"] += time.perf_counter() - start

    def counted_sha(path: Path) -> str:
        start = time.perf_counter()
        try:
            return sha(path)
        finally:
            calls["hash"] += 1
            seconds["hash"] += time.perf_counter() - start

    recorder.load_checkpoint, recorder._sha256_file = counted_load, counted_sha
    for module in list(sys.modules.values()):  # the modules that imported load_checkpoint by name
        if getattr(module, "load_checkpoint", None) is load:
            module.load_checkpoint = counted_load  # type: ignore[attr-defined]
    rounds = []
    for r in range(args.rounds):
        getattr(recorder, "_HASHED", {}).clear()
        calls.clear()
        seconds.clear()
        store = args.out / f"store-{args.label}.sp"
        shutil.rmtree(store, ignore_errors=True)
        start = time.perf_counter()
        sp.featurize(run, build_model(), sp.ClassificationTask(), dataset, store, progress=False,
                     projection=sp.ProjectionArguments(kind=args.projection, dim=args.dim))  # fmt: skip
        total = time.perf_counter() - start
        rounds.append({"featurize_s": total, "loads": calls["load"], "hashes": calls["hash"],
                       "load_s": seconds["load"], "hash_s": seconds["hash"]})  # fmt: skip
        print(f"round {r}: featurize {total:.1f} s; {calls['load']} loads ({seconds['load']:.1f} s, of which "
              f"{calls['hash']} hashes {seconds['hash']:.1f} s)", flush=True)  # fmt: skip
        shutil.rmtree(store, ignore_errors=True)
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print("median:", {k: round(v, 2) for k, v in median.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results-{args.label}.json").write_text(json.dumps({"rounds": rounds, "median": median}, indent=1))


if __name__ == "__main__":
    main()
