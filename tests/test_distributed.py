"""Several processes write one store: torchrun ranks (gloo on loopback) and independent shards end
with stores bit-identical to a one-process run, and a killed shard re-run alone completes its store."""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from torch import nn

import source_proj as sp
from source_proj.cli.main import main
from source_proj.distributed import Ranks, Shard, rank_device, ranks
from source_proj.featurize.arguments import default_device
from source_proj.featurize.sharded import ShardedParameters
from source_proj.query.attributor import method_meta

from .crash_driver import files

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
import os
import signal
import sys
import time

from torch.utils.data import Dataset

sys.path.insert(0, {root!r})
import source_proj as sp
from tests.crash_driver import build_model as tiny_model, data


class Slow(Dataset):
    # Loading an example takes SLOW_EXAMPLE_SECONDS: a shard is still running when the test kills it.
    def __init__(self, base, delay):
        self.base, self.delay = base, delay

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.base[i]


class FailsOnOneRank(Dataset):
    # The FAIL_READ-th example this process reads fails, in the process of rank FAIL_RANK only.
    def __init__(self, base, rank, read):
        self.base, self.reads = base, 0
        self.fails = os.environ.get("RANK", "0") == rank and read

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        if self.fails and self.reads == int(self.fails):
            raise ValueError(f"cannot decode example {{i}}")
        return self.base[i]


def _for_a_chunk():
    # Whether featurize reads this example for a chunk of its shard (not to check the data or estimate a basis first).
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "_featurize_units":
        frame = frame.f_back
    return frame is not None


class StopsMidShard(Dataset):
    # Rank FAIL_RANK fails as MIDSHARD says (read, interrupt, kill) at the 6th example it reads for its chunks (in
    # its second chunk) and leaves the file FAILED. Rank 0 begins its second chunk (example 4) only once FAILED is
    # there, and should not begin its third (example 8): where it does, it waits there for two minutes.
    def __init__(self, base):
        self.base, self.reads = base, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        failed = os.environ["FAILED"]
        if not _for_a_chunk():
            return self.base[i]
        if os.environ.get("FAIL_RANK", "none") == os.environ.get("RANK"):
            self.reads += 1
            if self.reads == 6:
                open(failed, "w").close()
                how = os.environ.get("MIDSHARD")
                if how == "read":
                    raise ValueError(f"cannot decode example {{i}}")
                if how == "interrupt":
                    raise KeyboardInterrupt
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
        elif i == 4:
            deadline = time.monotonic() + 60
            while not os.path.exists(failed) and time.monotonic() < deadline:
                time.sleep(0.01)
        elif i == 8 and os.path.exists(failed):
            time.sleep(120)
        return self.base[i]


def build_model():
    if os.environ.get("BUILD_FAILS", "none") == os.environ.get("RANK"):
        raise RuntimeError("no such layer: Linear")
    return tiny_model()


def build_task():
    if os.environ.get("ONLY_BIASES"):  # no layer the eigen projection can factor
        return sp.ClassificationTask(parameters=sp.ParameterSelection(include=["*bias"]))
    return sp.ClassificationTask()


def train_data(stage):
    if os.environ.get("DATA_FAILS", "none") == os.environ.get("RANK"):
        raise FileNotFoundError("no such file: train.bin")
    if os.environ.get("FAILED"):
        return StopsMidShard(data())
    delay = float(os.environ.get("SLOW_EXAMPLE_SECONDS", "0"))
    if os.environ.get("FAIL_READ"):
        return FailsOnOneRank(data(), os.environ["FAIL_RANK"], os.environ["FAIL_READ"])
    return Slow(data(), delay) if delay else data()


def query_data():
    return data()
"""

# The crash tests' tiny problem: 3 checkpoints × 3 row chunks of 4 examples = 9 work items.
FEATURIZE = ["--dim", "12", "--seed", "3", "--batch-size", "4", "--chunk-rows", "4", "--device", "cpu"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _torchrun(ranks: int, *command: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *command]


def _launch(ranks: int, script: Path, timeout: float) -> tuple[str, str]:
    """(stdout, stderr) of ``script`` run by ``ranks`` torchrun ranks in its folder; fails the test where they hang
    (killing torchrun and every rank, which would otherwise outlive it) or fail."""
    launch = subprocess.Popen(_torchrun(ranks, str(script)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(), cwd=script.parent, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = launch.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(launch.pid), launch.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = launch.communicate()
        pytest.fail(f"the ranks hung: {stdout[-3000:]}")
    assert launch.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return stdout, stderr


def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (torchrun starts each rank in a session of its own: killing torchrun's
    process group leaves them running, holding its output open)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # it ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        started = children.get(todo.pop(), [])
        found.extend(started)
        todo.extend(started)
    return found


def _in_process(*args: str) -> str:
    """A CLI command run in this process (where a separate process is not what is tested)."""
    out = CliRunner().invoke(main, list(args))
    assert out.exit_code == 0, out.output
    return out.output


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "spec.py"
    path.write_text(SPEC.format(root=str(ROOT)))
    return path


def _featurize(run: Path, spec: Path, store: Path, *args: str) -> list[str]:
    return ["featurize", "--ckpts", str(run), "--spec", str(spec), "--out", str(store), *FEATURIZE, *args]


FACTORED = ["--projection", "factored", "--dim", "16", "--shard-parameters"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, spec: Path) -> Path:
    """The store one process writes with the CLI; next to it ``one-fitted.sp``, the same fitted with two
    segments per stage, and ``one-factored.sp`` and ``one-eigen.sp``, featurized with the factored and the
    (default) eigen projection and --shard-parameters (one process: nothing to shard). Copy them before changing
    them."""
    root = tmp_path_factory.mktemp("one")
    _in_process(*_featurize(tiny_run, spec, root / "one.sp"))
    shutil.copytree(root / "one.sp", root / "one-fitted.sp")
    _in_process("fit", str(root / "one-fitted.sp"), "--segments", "2")
    _in_process(*_featurize(tiny_run, spec, root / "one-factored.sp", *FACTORED))
    _in_process(*_featurize(tiny_run, spec, root / "one-eigen.sp", "--shard-parameters"))
    return root / "one.sp"


LEAVE = """
import os as _os
import sys as _sys

_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)  # past torch's gloo teardown, which aborts now and then on a loaded CPU ("terminate called ...")
"""
"""Appended to each script after it left its process group: the checks read its output and the stores it wrote."""


TWO_RANKS = """
import importlib
import os

import click
import torch.distributed as dist

from source_proj.cli.main import main

# One process group for several commands (a process cannot join a torchrun group a second time): the commands
# find it initialised and run as its ranks, as they do in the group they join themselves under torchrun.
dist.init_process_group("gloo")


def cli(*args):
    try:
        main(list(args), standalone_mode=False)
    except click.ClickException as err:
        print(f"refused: {{err.format_message()}}")


featurize = ["featurize", "--ckpts", {run!r}, "--spec", {spec!r}, *{featurize!r}]
cli(*featurize, "--out", "2.sp")
cli("fit", "2.sp", "--segments", "2")
cli(*featurize, "--out", "2-factored.sp", *{factored!r})
cli(*featurize, "--out", "2-eigen.sp", "--shard-parameters")
cli(*featurize, "--out", "refused.sp", "--projection", "rademacher", "--shard-parameters")
cli(*featurize, "--out", "refused-fisher.sp", "--shard-parameters", "--fisher-examples", "4")
os.environ["ONLY_BIASES"] = "1"
cli(*featurize, "--out", "no-layers.sp", "--shard-parameters")
cli(*featurize, "--out", "dense.sp", "--dim", "8")  # unsharded, it warns that it projects densely instead
del os.environ["ONLY_BIASES"]
featurizing = importlib.import_module("source_proj.featurize.featurize")  # the package's name is the function's
estimated, estimate = [], featurizing.estimate_basis
featurizing.estimate_basis = lambda *args, **kwargs: estimated.append(1) or estimate(*args, **kwargs)
cli(*featurize, "--out", "forced.sp", "--force")
print(f"rank {{dist.get_rank()}} estimated the eigen basis {{len(estimated)}} times")
featurizing.estimate_basis = estimate
rank = dist.get_rank()
for attempt in range(2):  # each rank its own path: the second attempt finds rank 0's store (its basis), not rank 1's
    cli(*featurize, "--out", f"own-eigen-{{rank}}.sp", "--shard-parameters")
cli(*featurize, "--out", "share.sp", *{factored!r}, "--batch-size", "2")  # resumes share.sp's --fisher-examples 4
{probe}
dist.destroy_process_group()
"""


def _interrupted_with_a_fisher_share(run: Path, spec: Path, store: Path) -> None:
    """One process featurizes ``store`` with the factored projection, the Fisher of 4 examples in batches of 2, and
    stops at checkpoint 4 (its 50th example read fails): checkpoint 0's chunks are written, 5 chunks are pending."""
    options = ["--projection", "factored", "--dim", "16", "--fisher-examples", "4", "--batch-size", "2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FAIL_RANK", "0")
        patch.setenv("FAIL_READ", "50")
        # The loss-scale check's reads would come first and move the failing read (the check warns and goes on).
        featurizing = importlib.import_module("source_proj.featurize.featurize")  # the package's name is the function's
        patch.setattr(featurizing, "loss_scale_ratios", lambda *args, **kwargs: {})
        out = CliRunner().invoke(main, _featurize(run, spec, store, *options))
    assert "cannot decode example" in out.output, out.output
    assert _pending(store) == [0, 2, 3]


def _pending(store: Path) -> list[int]:
    """How many row chunks of checkpoints 0, 4 and 8 are not written in ``store``."""
    opened = sp.Store.open(store)
    return [len(opened.pending_chunks(f"grads/main/step-0000000{step}")) for step in (0, 4, 8)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, spec: Path) -> tuple[Path, str]:
    """(folder, output) of one torchrun launch of two gloo ranks that run, in one process group: featurize
    (``2.sp``), fit --segments 2 of it, featurize with the factored projection and --shard-parameters
    (``2-factored.sp``), the same with the default eigen projection (``2-eigen.sp``), with the dense one
    (refused), and of the biases only (no layer to factor: refused; unsharded, ``dense.sp``), ``forced.sp`` with
    --force (counting the eigen basis passes of each rank), twice the eigen projection and --shard-parameters with
    a store path of each rank's own (``own-eigen-R.sp``), --shard-parameters resuming ``share.sp``
    (:func:`_interrupted_with_a_fisher_share`), and :data:`PROBE`.
    The ranks' stderr is left in ``stderr.txt``."""
    root = tmp_path_factory.mktemp("two-ranks")
    _interrupted_with_a_fisher_share(tiny_run, spec, root / "share.sp")
    script = root / "ranks.py"
    arguments = {"run": str(tiny_run), "spec": str(spec), "featurize": FEATURIZE, "factored": FACTORED}
    script.write_text(TWO_RANKS.format(**arguments, probe=PROBE) + LEAVE)
    stdout, stderr = _launch(2, script, timeout=240)
    (root / "stderr.txt").write_text(stderr)
    return root, stdout


THREE_RANKS = """
import torch.distributed as dist

from source_proj.cli.main import main

# The first command joins the process group itself (WORLD_SIZE is 3 and no group is initialised), as
# `torchrun -m source_proj.cli featurize ...` does. Leaving it at its end is deferred (a process cannot join a
# torchrun group a second time), so that the second command runs as a rank of the same group.
leave = dist.destroy_process_group
left = []
dist.destroy_process_group = lambda *args, **kwargs: left.append(dist.is_initialized())
featurize = ["featurize", "--ckpts", {run!r}, "--spec", {spec!r}, *{featurize!r}]
assert not dist.is_initialized()
main([*featurize, "--out", "3.sp"], standalone_mode=False)
assert left == [True], left  # it joined the group, and left it at its end
dist.destroy_process_group = leave
main([*featurize, "--out", "3-factored.sp", *{factored!r}], standalone_mode=False)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, spec: Path) -> Path:
    """The folder of one torchrun launch of three gloo ranks that featurize ``3.sp`` (joining their process
    group themselves, as the console module's ranks do) and, in the same group, ``3-factored.sp`` (the
    factored projection and --shard-parameters). One launch: each costs 4 interpreters that import torch."""
    root = tmp_path_factory.mktemp("three-ranks")
    script = root / "ranks.py"
    arguments = {"run": str(tiny_run), "spec": str(spec), "featurize": FEATURIZE, "factored": FACTORED}
    script.write_text(THREE_RANKS.format(**arguments) + LEAVE)
    _launch(3, script, timeout=240)
    return root


def test_two_and_three_gloo_ranks_write_the_store_a_single_process_writes(
    one_process: Path, two_ranks: tuple[Path, str], three_ranks: Path
) -> None:
    """Three ranks that join their process group themselves (:func:`three_ranks`) and the two of
    :func:`two_ranks`: two different splits of the 9 work items."""
    assert files(three_ranks / "3.sp") == files(one_process), "3 ranks"
    # 2 ranks, then fit: the ranks split the checkpoints' curvature (broadcast in a fixed order) and the cached
    # chunks, so the fitted store is the fitted one-process store (whose featurized arrays are one.sp's).
    root, out = two_ranks
    assert "fitted 'source'" in out, out  # the commands' output, and any refusal ("refused: ...")
    fitted = files(one_process.with_name("one-fitted.sp"))
    assert any(name.startswith("methods/source/train/") for name in fitted)
    assert files(root / "2.sp") == fitted


def test_a_killed_shard_re_run_alone_completes_the_store(
    tmp_path: Path, tiny_run: Path, spec: Path, one_process: Path
) -> None:
    reference = files(one_process)

    store = tmp_path / "sharded.sp"
    # Three independent processes race to prepare the store; shard 1 of 3 holds checkpoint 4's chunks. At 0.05 s an
    # example, shard 1 still has 8 examples and 2 chunks to go when its first chunk lands (about 1 s; the 0.15 s
    # this test had cost 18 s, most of it in the 84 loads of the preparing shard's passes).
    slow = _env(SLOW_EXAMPLE_SECONDS="0.05")
    commands = [[sys.executable, "-m", "source_proj.cli", *_featurize(tiny_run, spec, store, "--shard", f"{i}/3")]
                for i in range(3)]  # fmt: skip
    procs = [subprocess.Popen(c, env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    first_of_victim = store / "progress" / "grads" / "main" / "step-00000004" / "c" / "0" / "0"
    deadline = time.monotonic() + 90
    while not first_of_victim.exists():
        assert procs[1].poll() is None and time.monotonic() < deadline, procs[1].communicate()
        time.sleep(0.01)
    procs[1].kill()
    procs[1].wait()
    for proc in (procs[0], procs[2]):
        stdout, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 0, stderr[-3000:]
        assert "the store is finished once every shard has run" in stdout

    unfinished = sp.Store.open(store)
    assert not unfinished.meta.get("featurized")
    assert unfinished.pending_chunks("grads/main/step-00000004") != []
    assert unfinished.pending_chunks("grads/main/step-00000000") == []
    assert unfinished.pending_chunks("grads/main/step-00000008") == []

    # the re-run in this process: the shards never talk, so any process may run the missing one
    out = _in_process(*_featurize(tiny_run, spec, store, "--shard", "1/3"))
    assert "featurized 3 checkpoints" in out  # the last shard to finish marks the store finished
    assert files(store) == reference


def test_any_world_size_partitions_the_work_so_a_resume_may_change_it() -> None:
    items = list(range(23))
    for world in (1, 2, 3, 4, 7, 23, 30):
        shards = [Shard(rank, world).take(items) for rank in range(world)]
        assert [i for shard in shards for i in shard] == items  # disjoint, complete, in order
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shards_are_read_from_the_command_line_and_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Shard.parse("2/5") == Shard(2, 5)
    for bad in ("5/5", "-1/2", "two/3"):
        with pytest.raises(sp.StoreError, match="i/n"):
            Shard.parse(bad)
    slurm = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_PROCID", "SLURM_NTASKS")
    for key in slurm:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(sp.StoreError, match="inside a SLURM job"):
        Shard.parse("slurm")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert Shard.parse("slurm") == Shard(3, 8)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "11")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert Shard.parse("slurm") == Shard(1, 4)
    assert ranks(Shard(1, 4)).coordinated is False and ranks().single


def test_each_rank_of_a_process_group_computes_on_its_own_gpu_and_one_gpu_named_for_all_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under torchrun every rank gets the same --device. ``cuda`` is the rank's own GPU, cuda:LOCAL_RANK (or cuda:0
    where each process sees one GPU of its own); an explicit ``cuda:N`` is kept where it is that GPU or the node has
    one rank, and refused in one sentence where the node's ranks would all compute on GPU N (it pinned every rank to
    it). A node's rank beyond its GPUs is refused; independent shards and the CPU keep what they were given. (CUDA
    itself is not needed: the visible GPUs and the launcher's variables are set here.)"""
    gpus = {"count": 4}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus["count"])

    def device(given: str, rank: int, local: int, per_node: int, world: int = 8, joined: bool = True) -> str:
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
        return str(rank_device(default_device(given), Ranks(Shard(rank, world), coordinated=joined)))

    assert [device("cuda", 4 + i, i, 4) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert device("cuda:2", 6, 2, 4) == "cuda:2"  # a launcher script's --device cuda:$LOCAL_RANK
    for rank, local in ((5, 1), (7, 3)):
        with pytest.raises(sp.StoreError, match=rf"^Rank {rank} of 8 was given device cuda:0, but the 4 ranks on its "
                           rf"node compute one per GPU \(this one on cuda:{local}.*pass --device cuda"):  # fmt: skip
            device("cuda:0", rank, local, 4)
    assert device("cuda:3", 1, 0, 1, world=2) == "cuda:3"  # one rank per node: its GPU is its own choice
    assert device("cpu", 5, 1, 4) == "cpu"
    assert device("cuda:0", 3, 3, 4, world=4, joined=False) == "cuda:0"  # independent shards: as given
    assert device("cuda", 3, 3, 4, world=4, joined=False) == "cuda"
    with pytest.raises(sp.StoreError, match=r"^Rank 5 is rank 5 on its node, which has 4 GPUs; run at most 4"):
        device("cuda", 5, 5, 8)
    gpus["count"] = 1  # each process sees its own GPU (CUDA_VISIBLE_DEVICES per rank)
    assert device("cuda", 3, 3, 4) == device("cuda:0", 3, 3, 4) == "cuda:0"


def test_independent_shards_refuse_overwrite(tmp_path: Path, tiny_run: Path) -> None:
    from .crash_driver import featurize

    with pytest.raises(sp.StoreError, match="cannot be combined with --shard"):
        featurize(tiny_run, tmp_path / "s.sp", overwrite=True, shard=Shard(0, 2))
    assert not (tmp_path / "s.sp" / "zarr.json").exists()


def test_fit_of_a_python_store_with_a_shard_missing_asks_for_the_python_call_in_plain_words(
    tmp_path: Path, tiny_run: Path
) -> None:
    """A store featurized from Python (no spec: no command rebuilds it) with one of its two shards run: fit names the
    Python call that finishes it and the shard argument, not a CLI command in backticks that is not one."""
    from .crash_driver import featurize

    store = tmp_path / "half.sp"
    featurize(tiny_run, store, shard=Shard(0, 2))
    with pytest.raises(sp.StoreError) as refused:
        sp.fit(store, progress=False)
    message = str(refused.value)
    assert message.startswith(f"The store at {store} is not fully featurized (["), message
    assert message.endswith("has run; finish it, then fit: re-run source_proj.featurize(...) with the arguments that "
                            "created the store (each missing shard with its shard=source_proj.distributed.Shard(i, n))."
                            ), message  # fmt: skip
    assert "`" not in message and "--shard)" not in message
    with pytest.raises(sp.StoreError) as refused:  # a query says it too, before the fit it would need
        method_meta(sp.Store.open(store), "source")
    assert "no fitted method 'source'; finish it (re-run source_proj.featurize(...) with the arguments that created " \
        "the store" in str(refused.value), str(refused.value)


def test_a_slurm_shard_says_which_shard_it_computed(
    tmp_path: Path, tiny_run: Path, spec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    out = _in_process(*_featurize(tiny_run, spec, tmp_path / "s.sp", "--shard", "slurm"))
    assert "featurized shard 1/2 of" in out, out


def test_sharded_parameters_on_gloo_ranks_write_the_store_one_process_writes(
    one_process: Path, two_ranks: tuple[Path, str], three_ranks: Path
) -> None:
    """2 and 3 ranks each hold a slice of every layer and gather it only while it runs (in lock step, the
    ranks with fewer rows running batches they discard): every byte of the store equals one process's, with
    the factored projection and (2 ranks) the eigen one, whose basis pass runs through the gathered layers."""
    reference = files(one_process.with_name("one-factored.sp"))
    assert files(three_ranks / "3-factored.sp") == reference, "3 ranks"
    root, out = two_ranks
    assert files(root / "2-factored.sp") == reference, out
    # The eigen projection: each rank runs the same basis pass through the gathered layers, as one process does.
    eigen = files(one_process.with_name("one-eigen.sp"))
    assert any(name.startswith("projection/") or "basis" in name for name in eigen), sorted(eigen)[:20]
    assert files(root / "2-eigen.sp") == eigen, out
    refusal = "refused: Sharded parameters need the 'eigen' or 'factored' projection (they need no parameter gradient)"
    assert out.count(refusal) == 2, out  # each rank
    assert not (root / "refused.sp").exists()
    # A Fisher of some batches only: the ranks would take different Fisher passes, and gather out of step.
    assert out.count("Sharded parameters need the Fisher of every example (fisher_examples=None") == 2, out
    assert not (root / "refused-fisher.sp").exists()
    # No layer to factor: the eigen projection's dense fallback would need whole weights, so it is refused too.
    assert out.count("Sharded parameters need the eigen or factored projection: featurize this model unsharded.") == 2
    assert not (root / "no-layers.sp").exists()


def test_with_force_the_other_ranks_read_the_eigen_basis_rank_0_estimated(
    one_process: Path, two_ranks: tuple[Path, str]
) -> None:
    """The store rank 0 just replaced holds the basis: the other ranks project with it instead of estimating it
    again (a whole pass over the run each)."""
    root, out = two_ranks
    assert "rank 0 estimated the eigen basis 1 times" in out and "rank 1 estimated the eigen basis 0 times" in out, out
    assert files(root / "forced.sp") == files(one_process)


def test_only_rank_0_prints_the_summary_and_the_warnings(two_ranks: tuple[Path, str]) -> None:
    """Every rank runs the command and meets the same warnings; the other ranks keep quiet but for their errors."""
    root, out = two_ranks
    assert out.count("featurized 3 checkpoints into dense.sp") == 1, out
    warning = "The eigen projection found no layer with Kronecker factors"
    assert (root / "stderr.txt").read_text().count(warning) == 1, (root / "stderr.txt").read_text()[-3000:]


def test_the_rank_with_the_most_chunks_shows_the_progress(two_ranks: tuple[Path, str]) -> None:
    """Each checkpoint's 3 row chunks fill one store file, which one rank writes: unsharded, rank 1 has 2 of the 3
    files; with --shard-parameters (``2-factored.sp``, ``2-eigen.sp``) it has every file, and in fit the one file of
    the cached features. Rank 0 showed the only bar, of its own share (nothing at all, "featurize: 0chunk", while
    rank 1 computed 9 chunks unseen); the busiest rank shows its bar instead."""
    root, _ = two_ranks
    bars = (root / "stderr.txt").read_text().replace("\r", "\n")
    assert "featurize: 0chunk" not in bars and "fit: 0chunk" not in bars, bars[-3000:]
    assert "featurize: 100%|██████████| 9/9 " in bars and "featurize: 100%|██████████| 6/6 " in bars, bars[-3000:]
    assert "fit: 100%|██████████| 3/3 " in bars, bars[-3000:]


def test_sharded_parameters_hold_a_slice_and_gather_a_layer_only_while_it_runs(two_ranks: tuple[Path, str]) -> None:
    """Each gloo rank of :func:`two_ranks` runs :data:`PROBE` by hand: the layers hold placeholders between runs,
    the forward and the backward through them match the unsharded model's, and a checkpoint loads as slices."""
    _, out = two_ranks
    assert out.count("probe ok") == 2, out


def test_sharded_parameters_agree_before_the_eigen_basis_pass_so_a_rank_without_the_store_stops_them_all(
    two_ranks: tuple[Path, str],
) -> None:
    """Given their own paths, rank 0 prepares its store (with the eigen basis) and rank 1 refuses; run again, rank 0
    would read the basis its store holds while rank 1 estimated it, gathering every layer alone: the ranks hung
    until the process group's timeout. They agree first, estimate it together, and refuse again in one sentence."""
    root, out = two_ranks
    assert out.count("refused: Rank 1 of 2 does not find at own-eigen-1.sp the store rank 0 prepared") == 2, out
    assert out.count("refused: Rank 1 of 2 failed (its error is in its output)") >= 2, out
    assert not (root / "own-eigen-1.sp").exists()


def test_sharded_parameters_refuse_to_resume_a_store_that_takes_a_fisher_share(two_ranks: tuple[Path, str]) -> None:
    """A store featurized by one process with the Fisher of some batches only (``--fisher-examples``) resumes that
    share under ``auto``; sharded, the ranks would take different numbers of Fisher passes and gather out of step
    (rank 0 aborted in gloo). Every rank refuses in one sentence, and the store is left as it was."""
    root, out = two_ranks
    refusal = "refused: The store at share.sp takes the Fisher of 4 examples per stage (fisher_examples, as it was"
    assert out.count(refusal) == 2, out
    assert _pending(root / "share.sp") == [0, 2, 3]


def test_sharded_parameters_gather_the_out_proj_weights_multihead_attention_reads_as_tensors(tmp_path: Path) -> None:
    """nn.MultiheadAttention (so nn.TransformerEncoderLayer) uses its out_proj's weights without calling out_proj, whose
    own gather never runs: it gathers them with its own, and computes what the unsharded layer computes. One rank (a
    process group of one, in this process) holds every slice, yet keeps placeholders between layers as W ranks do."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        reference = copy.deepcopy(layer)
        shards = ShardedParameters(layer, torch.device("cpu"))
        x = torch.randn(3, 5, 8, requires_grad=True)
        with shards.saving():
            y = layer(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        y0 = reference(x)
        (gx0,) = torch.autograd.grad(y0.square().sum(), x)
        # Equal to rounding: the attention kernels' order of summation differs between the two (the store two gloo
        # ranks featurize through such layers is byte-identical to one process's all the same).
        torch.testing.assert_close(y, y0, rtol=0, atol=1e-6)
        torch.testing.assert_close(gx, gx0, rtol=0, atol=1e-6)
        assert all(p.device.type == "meta" for p in layer.parameters())
    finally:
        dist.destroy_process_group()


PROBE = """
import torch
from torch import nn

from source_proj.featurize.sharded import ShardedParameters

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
reference = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
reference.load_state_dict(model.state_dict())
shards = ShardedParameters(model, torch.device("cpu"))
assert all(p.device.type == "meta" for p in model.parameters())
assert sum(u.local.numel() for u in shards.units) == 21 + 12  # (35 + 7) / 2 and (21 + 3) / 2
x = torch.randn(4, 5, requires_grad=True)
with shards.saving():
    y = model(x)
assert all(p.device.type == "meta" for p in model.parameters())  # dropped after each layer ran
(gx,) = torch.autograd.grad(y.square().sum(), x)  # the backward gathers the weights it needs again
y0 = reference(x)
(gx0,) = torch.autograd.grad(y0.square().sum(), x)
assert torch.equal(y, y0) and torch.equal(gx, gx0)
state = {k: v * 2 for k, v in reference.state_dict().items()}
model.load_state_dict(state)
reference.load_state_dict(state)
with torch.no_grad():
    assert torch.equal(model(x), reference(x))
print("probe ok")
"""


FAILING_RANK = """
import copy
import importlib
import os
import shutil

import click
import torch.distributed as dist

import source_proj as sp
from source_proj.cli.main import main
from source_proj.methods.source import SegmentOperator

dist.init_process_group("gloo")


def cli(*args):
    try:
        main(list(args), standalone_mode=False)
    except click.ClickException as err:
        print(f"rank {{dist.get_rank()}} refused: {{err.format_message()}}", flush=True)


featurize = ["featurize", "--ckpts", {run!r}, "--spec", {spec!r}, *{featurize!r}, "--out", "s.sp", *{factored!r}]
os.environ.update(FAIL_RANK="1", FAIL_READ="50")
cli(*featurize)
del os.environ["FAIL_READ"]
if dist.get_rank() == 0:
    store = sp.Store.open("s.sp")
    pending = [len(store.pending_chunks(f"grads/main/step-0000000{{step}}")) for step in (0, 4, 8)]
    print(f"featurized {{bool(store.meta.get('featurized'))}}, pending {{pending}}", flush=True)
cli(*featurize)
rank = dist.get_rank()
cli(*featurize, "--out", f"own-{{rank}}.sp")  # each rank its own path (a disk of its own node)
cli(*featurize, "--out", "dims.sp", "--dim", str(16 + 4 * rank))
if rank == 0:
    shutil.copytree("s.sp", "fitted.sp")
dist.barrier()
if rank == 1:  # fit: rank 1 fails on its first segment, while rank 0 goes on to broadcast the second's curvature
    def fails(*args, **kwargs):
        raise ValueError("rank 1 cannot decompose")

    SegmentOperator.from_curvature = fails
cli("fit", "fitted.sp", "--segments", "2")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_rank_failing_in_lock_step_stops_every_rank_and_the_store_resumes(
    tmp_path: Path, tiny_run: Path, spec: Path, one_process: Path
) -> None:
    """With --shard-parameters the ranks gather each layer together: rank 1's 50th example (checkpoint 4's
    second chunk) fails while rank 0 waits in a gather. Every rank must stop with one sentence (not wait for
    the failed rank forever), the store stays unfinished with checkpoint 0's chunks kept, and the same command
    completes it into the one-process store. Then the ranks are given different store paths, and different
    dimensions; and rank 1 fails in fit while rank 0 broadcasts a curvature."""
    script = tmp_path / "ranks.py"
    arguments = {"run": str(tiny_run), "spec": str(spec), "featurize": FEATURIZE, "factored": FACTORED}
    script.write_text(FAILING_RANK.format(**arguments) + LEAVE)
    stdout, _ = _launch(2, script, timeout=90)
    assert "rank 1 refused: " in stdout and "cannot decode example" in stdout, stdout
    assert "rank 0 refused: Rank 1 of 2 failed (its error is in its output)" in stdout, stdout
    assert "featurized False, pending [0, 2, 3]" in stdout, stdout
    assert files(tmp_path / "s.sp") == files(one_process.with_name("one-factored.sp"))
    # Ranks given other paths or options than rank 0 say so, and leave no empty store behind.
    assert "rank 1 refused: Rank 1 of 2 does not find at own-1.sp the store rank 0 prepared" in stdout, stdout
    assert "rank 1 refused: Rank 1 of 2 does not find at dims.sp the store rank 0 prepared" in stdout, stdout
    assert "projection: dim 16 → 20" in stdout, stdout
    assert "rank 1 refused: source-proj fit failed unexpectedly (ValueError: rank 1 cannot decompose)" in stdout
    assert stdout.count("rank 0 refused: Rank 1 of 2 failed") == 4, stdout
    assert not (tmp_path / "own-1.sp").exists()


RANK_CLI = """
import click
import torch.distributed as dist

import source_proj as sp
from source_proj.cli.main import main

dist.init_process_group("gloo")
rank = dist.get_rank()


def cli(*args):
    try:
        main(list(args), standalone_mode=False)
    except click.ClickException as err:
        print(f"rank {{rank}} refused: {{err.format_message()}}", flush=True)

"""
"""The prelude of a gloo rank's script (a template for ``str.format``): the process group joined, ``rank``, and
``cli(...)``, which prints a refusal as ``rank N refused: ...`` where the command would exit with it."""


STOPS_MID_SHARD = """
import errno
import os

from source_proj.store.store import Store
from tests.crash_driver import featurize as tiny_featurize
""" + RANK_CLI + """

def pending(path):
    if rank == 0:
        store = sp.Store.open(path)
        left = [len(store.pending_chunks(f"grads/main/step-0000000{{step}}")) for step in (0, 4, 8)]
        print(f"{{path}}: featurized {{bool(store.meta.get('featurized'))}}, pending {{left}}", flush=True)


featurize = ["featurize", "--ckpts", {run!r}, "--spec", {spec!r}, *{featurize!r}]
os.environ["FAIL_RANK"] = "1"
for how in ("read", "interrupt"):
    os.environ.update(FAILED=f"failed-{{how}}", MIDSHARD=how)
    cli(*featurize, "--out", f"{{how}}.sp")
    dist.barrier()
    pending(f"{{how}}.sp")
    del os.environ["FAILED"], os.environ["MIDSHARD"]
    cli(*featurize, "--out", f"{{how}}.sp")

write = Store.write_chunk


def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


if rank == 1:
    Store.write_chunk = full
cli(*featurize, "--out", "disk.sp")
Store.write_chunk = write
cli(*featurize, "--out", "disk.sp")
try:  # in Python, rank 1 is given a run it does not find
    tiny_featurize({run!r} if rank == 0 else "no-such-run", "api.sp")
except sp.SourceProjError as err:
    print(f"rank {{rank}} refused: {{err}}", flush=True)
os.environ["BUILD_FAILS"] = "1"  # last: without an agreement rank 1 would go on alone
cli(*featurize, "--out", "build.sp")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_rank_failing_mid_shard_stops_every_rank_within_a_chunk_and_the_store_resumes(
    tmp_path: Path, tiny_run: Path, spec: Path, one_process: Path
) -> None:
    """Unsharded parameters: rank 1 fails in its second chunk (an example it cannot read, an interrupt), while rank 0
    has a chunk to go that it begins only after the failure (:class:`StopsMidShard`, where it would wait two minutes):
    the ranks agree before each chunk, so rank 0 stops before it, where it would compute the rest of its shard (hours)
    with rank 1 waiting for it. Rank 1 names the cause, rank 0 says rank 1 failed, the chunks written are kept and the
    same command completes the one-process store. So too where rank 1's disk is full, and where rank 1 does not find
    its run (in Python) or cannot build its model, before the ranks' first agreement (rank 0 waited for it there)."""
    script = tmp_path / "ranks.py"
    script.write_text(STOPS_MID_SHARD.format(run=str(tiny_run), spec=str(spec), featurize=FEATURIZE) + LEAVE)
    stdout, _ = _launch(2, script, timeout=100)
    assert "rank 1 refused: The dataset raised an error of its own reading training example 5 of stage 'main' " \
           "(ValueError: cannot decode example 5)" in stdout, stdout  # fmt: skip
    assert "rank 1 refused: source-proj featurize was interrupted; run the same command again" in stdout, stdout
    assert "rank 1 refused: Writing chunk 0 of " in stdout and "failed because the disk is full" in stdout, stdout
    assert "rank 1 refused: no-such-run is not a directory; pass the run directory" in stdout, stdout
    assert "rank 1 refused: build_model() in " in stdout and "(RuntimeError: no such layer: Linear)" in stdout, stdout
    assert stdout.count("rank 0 refused: Rank 1 of 2 failed (its error is in its output)") == 5, stdout
    assert stdout.count("refused") == 10, stdout
    # Rank 0 wrote its first two chunks of checkpoint 0, rank 1 its first of checkpoint 4: kept, and resumed.
    assert "read.sp: featurized False, pending [1, 2, 3]" in stdout, stdout
    assert "interrupt.sp: featurized False, pending [1, 2, 3]" in stdout, stdout
    reference = files(one_process)
    for store in ("read.sp", "interrupt.sp", "disk.sp"):
        assert files(tmp_path / store) == reference, store
    assert not (tmp_path / "api.sp").exists() and not (tmp_path / "build.sp").exists()


FIT_STOPS_MID_SHARD = """
import importlib
import os
import time
""" + RANK_CLI + """

# Each rank caches 3 of the 6 chunks. Rank 1 fails in its second chunk and leaves the file FAILED; rank 0 begins its
# second chunk only once FAILED is there, and should not begin its third: where it does, it waits there two minutes.
fitting = importlib.import_module("source_proj.methods.fit")  # the package's name is the function's
means, begun = fitting._checkpoint_means, []


def stops_mid_shard(*args, **kwargs):
    begun.append(1)
    if rank == 1 and len(begun) == 2:
        open("FAILED", "w").close()
        raise ValueError("rank 1 cannot read its chunk")
    if rank == 0 and len(begun) == 2:
        deadline = time.monotonic() + 60
        while not os.path.exists("FAILED") and time.monotonic() < deadline:
            time.sleep(0.01)
    if rank == 0 and len(begun) == 3 and os.path.exists("FAILED"):
        time.sleep(120)
    return means(*args, **kwargs)


fitting._checkpoint_means = stops_mid_shard
cli("fit", "two.sp", "--segments", "2", "--curvature", {curvature!r})
fitting._checkpoint_means = means
dist.barrier()
if rank == 0:
    store = sp.Store.open("two.sp")
    print(f"pending {{store.pending_chunks('methods/source/train/main')}}", flush=True)
cli("fit", "two.sp", "--segments", "2", "--curvature", {curvature!r})
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["projected", "kfac"])
def test_a_fit_rank_failing_mid_shard_stops_every_rank_within_a_chunk_and_the_store_resumes(
    tmp_path: Path, tiny_run: Path, spec: Path, curvature: str
) -> None:
    """fit's cached features under a process group (6 chunks of 2 rows, one per shard file: 3 per rank): rank 1 fails
    in its second chunk, while rank 0 has a chunk to go that it begins only after the failure (where it would wait two
    minutes). The ranks agree before each chunk, so rank 0 stops before it, where it would compute the rest of its share
    (hours) with rank 1 waiting for it. Rank 1 names the cause, rank 0 says rank 1 failed, the chunks written are kept
    (rank 0's first two, rank 1's first) and the same command completes the store a one-process fit writes. So with
    the projected curvature and with the Kronecker factors (their cached features are other blocks)."""
    _in_process(*_featurize(tiny_run, spec, tmp_path / "one.sp", "--chunk-rows", "2", "--batch-size", "2",
                            "--shard-chunks", "1", "--curvature", "both"))  # fmt: skip
    shutil.copytree(tmp_path / "one.sp", tmp_path / "two.sp")
    _in_process("fit", str(tmp_path / "one.sp"), "--segments", "2", "--curvature", curvature)
    script = tmp_path / "ranks.py"
    script.write_text(FIT_STOPS_MID_SHARD.format(curvature=curvature) + LEAVE)
    stdout, _ = _launch(2, script, timeout=100)
    assert "rank 1 refused: source-proj fit failed unexpectedly (ValueError: rank 1 cannot read its chunk)" in stdout
    assert "rank 0 refused: Rank 1 of 2 failed (its error is in its output)" in stdout, stdout
    assert stdout.count("refused") == 2, stdout
    assert "pending [2, 4, 5]" in stdout, stdout
    assert stdout.count("fitted 'source'") == 1, stdout  # the rerun's summary (rank 0's)
    assert sp.Store.open(tmp_path / "one.sp").meta["methods"]["source"]["curvature"] == curvature
    assert files(tmp_path / "two.sp") == files(tmp_path / "one.sp")


def _ranks_on_their_own(command: list[str], timeout: float, **extra: str) -> list[tuple[int, str]]:
    """(exit status, stderr) of each of two processes that run ``command`` as the ranks of the process group they join
    themselves (``MASTER_ADDR``, ``RANK``, ...), with no launcher to stop the others where one ends (``srun``, a script
    of one's own); fails the test where they hang."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    group = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-m", "source_proj.cli", *command], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env=_env(**group, **extra, RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in range(2)]  # fmt: skip
    deadline = time.monotonic() + timeout
    ended = []
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for each in procs:
                each.kill()
            pytest.fail(f"the ranks hung: {[each.communicate()[1][-2000:] for each in procs]}")
        ended.append((proc.returncode, stderr))
    return ended


def _said(stderr: str) -> str:
    """The one sentence a rank ended with (a traceback fails the test)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.slow
def test_ranks_without_a_launcher_end_together_where_one_fails_before_joining_or_is_killed(
    tmp_path: Path, tiny_run: Path, spec: Path, one_process: Path
) -> None:
    """Rank 1 cannot load its training data: it loaded them before it joined the process group, and rank 0 waited for
    it to join until the group's timeout (7 days). Each joins first, then both end. Then rank 1 is killed in its second
    chunk: rank 0 says so in one sentence (not as a bug), and a re-run of both completes the one-process store."""
    store = tmp_path / "s.sp"
    command = _featurize(tiny_run, spec, store)
    (zero, said_zero), (one, said_one) = _ranks_on_their_own(command, timeout=60, DATA_FAILS="1")
    assert _said(said_one).startswith("Error: train_data('main') in ") and "no such file: train.bin" in said_one
    assert _said(said_zero).startswith("Error: Rank 1 of 2 failed (its error is in its output)"), said_zero
    assert zero == one == 1 and not store.exists()

    killed = _ranks_on_their_own(command, timeout=60, FAILED=str(tmp_path / "killed"), MIDSHARD="kill", FAIL_RANK="1")
    (zero, said_zero), (one, _) = killed
    assert one == -signal.SIGKILL and zero == 1, killed
    lost = "Error: Another of the 2 ranks ended without agreeing (killed, or out of memory: its output or the"
    assert _said(said_zero).startswith(f"{lost} launcher's says which), so rank 0 stops too ("), said_zero
    assert [status for status, _ in _ranks_on_their_own(command, timeout=60)] == [0, 0]
    assert files(store) == files(one_process)
