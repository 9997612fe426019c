"""SIGKILL featurize and fit at random moments, resume them, and compare with an uninterrupted run.

Run as a script (its own interpreter, one torch thread, so that forking is safe and the results
are deterministic); the tests also import its tiny problem::

    python tests/crash_driver.py WORKDIR --kills 20 --fit-kills 5 --seed 0

It records a tiny training run, computes a reference store in a forked child without
interruption, then for each trial forks children that run the *same call* (featurize, then fit)
into a fresh store, SIGKILLs them after a random delay (one to three times), lets a last child
finish, and compares every file of the store (every array's chunks and progress entries, and
all metadata) byte for byte with the reference. Prints one JSON object: kills that landed while
the child was still writing, trials, stores identical to the reference, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.store.durable import LOCK_FILE, PARTIAL_SUFFIX

DIM = 12
OPTIONS = sp.FeaturizeArguments(batch_size=4, chunk_rows=4, device="cpu")


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def record(run: Path) -> None:
    model = build_model()
    x, y = data().tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    rec = sp.TrajectoryRecorder(run, model, opt, save_every=4)
    rec.begin_stage("main", dataset_size=len(y))
    for _ in range(8):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step()
    rec.close()


def featurize(run: Path, store: Path, **kwargs: object) -> sp.Store:
    """featurize of the tiny problem (the call the tests interrupt), with the dense projection whose chunks and
    write counts these tests were written against (the eigen projection's basis pass: tests/test_eigen.py)."""
    arguments: dict = {
        "projection": sp.ProjectionArguments(dim=DIM, seed=3, kind="rademacher"),
        "options": OPTIONS,
        "progress": False,
    }
    arguments.update(kwargs)
    return sp.featurize(run, build_model(), sp.ClassificationTask(), data(), store, **arguments)


FIT = sp.FitArguments(segments_per_stage=2)


def featurize_and_fit(run: Path, store: Path, what: str) -> None:
    """The command under test: the same call every time."""
    if what == "featurize":
        featurize(run, store)
    else:
        sp.fit(store, FIT, progress=False)


def in_child(run: Path, store: Path, what: str) -> int:
    """Fork a child that runs ``what`` and exits; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            featurize_and_fit(run, store, what)
        except BaseException as err:  # report, never fall back into the parent's code
            print(f"child failed: {type(err).__name__}: {err}", file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    return pid


def run_to_end(run: Path, store: Path, what: str) -> float:
    start = time.perf_counter()
    _, status = os.waitpid(in_child(run, store, what), 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{what} into {store} failed")
    return time.perf_counter() - start


def kill_after(run: Path, store: Path, what: str, delay: float) -> bool:
    """Run ``what`` and SIGKILL it after ``delay`` s; returns whether it was still running."""
    pid = in_child(run, store, what)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def files(store: Path) -> dict[str, bytes]:
    """Every file of a store except its lock file, by relative path."""
    out = {}
    for path in sorted(store.rglob("*")):
        if path.is_file() and path.name != LOCK_FILE:
            out[str(path.relative_to(store))] = path.read_bytes()
    return out


def chunk_bytes(store: Path, name: str, chunk: int) -> tuple[Path, int, int]:
    """Where row chunk ``chunk`` of array ``name`` lies on disk: ``(file, offset, size)`` (its staged file,
    its own file, or its byte range in its shard file, as the shard's index at the file's end says)."""
    meta = json.loads((store / name / "zarr.json").read_text())
    rest = ("0",) * (len(meta["shape"]) - 1)  # chunks span every column (and matrix) of a row
    staged = Path(store / "staging" / name / "c" / str(chunk), *rest)
    if staged.exists():
        return staged, 0, staged.stat().st_size
    codec = meta["codecs"][0]
    if codec["name"] != "sharding_indexed":
        own = Path(store / name / "c" / str(chunk), *rest)
        return own, 0, own.stat().st_size
    per_shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // codec["configuration"]["chunk_shape"][0]
    shard = Path(store / name / "c" / str(chunk // per_shard), *rest)
    raw = shard.read_bytes()
    index = np.frombuffer(raw[-(16 * per_shard + 4) : -4], dtype="<u8").reshape(per_shard, 2)
    offset, size = index[chunk % per_shard]
    return shard, int(offset), int(size)


def damage(store: Path, name: str, chunk: int, how: str) -> None:
    """Damage a chunk's bytes as a crash or a bad disk would: ``"flip"`` one bit, or ``"truncate"`` its
    file (in a shard file this damages every chunk of the shard)."""
    path, offset, size = chunk_bytes(store, name, chunk)
    raw = bytearray(path.read_bytes())
    if how == "flip":
        raw[offset + min(9, size - 1)] ^= 0x10
    else:
        raw = raw[:-6]
    path.write_bytes(bytes(raw))


def trial(
    run: Path, store: Path, reference: dict[str, bytes], what: str, budget: float, rng: random.Random, featurized: Path
) -> int:
    """Kill ``what`` one to three times at random moments, finish it, compare; returns kills landed. A fit starts
    from a copy of ``featurized`` (the reference store as featurize left it: the same bytes a featurize re-run
    would write, without its cost)."""
    if what == "fit":
        shutil.copytree(featurized, store)
    landed = 0
    for attempt in range(rng.randint(1, 3)):
        landed += kill_after(run, store, what, rng.uniform(0.0, budget / (1 + attempt)))
    run_to_end(run, store, what)
    got = files(store)
    leftovers = [name for name in got if name.endswith(PARTIAL_SUFFIX)]
    if leftovers or got != reference:
        differing = sorted(set(got) ^ set(reference)) or [n for n in got if got[n] != reference[n]]
        raise AssertionError(f"{store} differs from the reference in {differing[:5]}")
    return landed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--kills", type=int, default=20, help="featurize kills that must land mid-run")
    parser.add_argument("--fit-kills", type=int, default=5, help="fit kills that must land mid-run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-trials", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: forking is safe and every run computes the same bits
    rng = random.Random(args.seed)
    start = time.perf_counter()
    run = args.workdir / "run"
    record(run)
    reference_store = args.workdir / "reference.sp"
    seconds = {"featurize": run_to_end(run, reference_store, "featurize")}
    reference = {"featurize": files(reference_store)}
    featurized = args.workdir / "featurized.sp"
    shutil.copytree(reference_store, featurized)
    seconds["fit"] = run_to_end(run, reference_store, "fit")
    reference["fit"] = files(reference_store)
    result: dict[str, object] = {f"{what}_seconds": s for what, s in seconds.items()}
    for what, wanted in (("featurize", args.kills), ("fit", args.fit_kills)):
        landed = trials = identical = 0
        while landed < wanted and trials < args.max_trials:
            store = args.workdir / f"{what}-{trials}.sp"
            landed += trial(run, store, reference[what], what, seconds[what], rng, featurized)
            trials += 1
            identical += 1
        result[what] = {"kills": landed, "trials": trials, "identical": identical}
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result))


if __name__ == "__main__":
    main()
