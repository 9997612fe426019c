"""Sharded commands: featurize and fit split over processes that write one store.

Two ways to run several processes:

- **torchrun** (or any launcher that initialises a ``torch.distributed`` process group with
  several ranks): the ranks meet through the process group (gloo on CPUs, NCCL on GPUs). Rank 0
  prepares the store (metadata, arrays, progress entries) under the exclusive lock, every rank
  writes its shard under the cooperative lock, and rank 0 marks the store finished; failures are
  agreed on (before each row chunk too, ``Ranks.agree`` and ``Ranks.paced``), so every rank stops with the error
  (docs/howto/distributed.md, "When a rank fails"). fit reduces its curvature across ranks.
- **independent shards** (a SLURM array, or ``--shard i/n`` by hand): the processes never talk.
  Whichever process finds the store unprepared prepares it (the others wait for it), each writes
  its shard under the cooperative lock, and the last to finish marks the store finished.

A shard is the block ``items[r·n/w : (r+1)·n/w]`` of the command's work items — (work unit, row
chunk) pairs for featurize, (stage, row chunk) for fit — listed in a fixed order that depends on
the store's plan only, never on progress, and cut only at the boundaries of the store's shard files
(``Shard.take_groups``: the chunks of one file are written by one process). A shard is therefore
recomputable from (rank, world size) alone: a rank that died is re-run alone (``--shard r/w``) and
writes exactly its missing chunks; a job resumed with another world size recomputes every pending
chunk exactly once, since the shards of any world size partition the items. Every chunk is computed
by the same code from the same inputs whoever computes it (the Fisher's labels are seeded per
chunk), so the store is bit-identical to a one-process run on the same kind of device with the same
batch size and thread count per process (torchrun sets one thread per process unless
``OMP_NUM_THREADS`` says otherwise).
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, TypeVar

import torch
import torch.distributed as dist

from source_proj.errors import StoreError, first_line
from source_proj.store.locking import LockHeld
from source_proj.store.writing import store_lock, writing

T = TypeVar("T")

PREPARE_WAIT_SECONDS = 3600.0
"""How long an independent shard waits for another process to prepare the store."""


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` processes sharing one command's work.

    Attributes:
        rank: this process's index, ``0 ≤ rank < world``.
        world: how many processes share the work.
    """

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise StoreError(f"Shard {self.rank}/{self.world} does not exist; use i/n with 0 ≤ i < n.")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"``, or ``"slurm"``: the task of a SLURM array (``SLURM_ARRAY_TASK_ID`` counted from
        ``SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``), else the task of an srun step
        (``SLURM_PROCID`` of ``SLURM_NTASKS``)."""
        if text == "slurm":
            return cls.slurm()
        try:
            rank, world = (int(part) for part in text.split("/"))
        except ValueError:
            raise StoreError(f"--shard takes i/n (e.g. 0/4) or slurm, not {text!r}.") from None
        return cls(rank, world)

    @classmethod
    def slurm(cls) -> Shard:
        """This SLURM task's shard (see [`parse`][])."""
        env = os.environ
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            return cls(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]))
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            return cls(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]))
        raise StoreError(
            "--shard slurm needs SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (sbatch --array) or "
            "SLURM_PROCID/SLURM_NTASKS (srun); run it inside a SLURM job, or pass --shard i/n."
        )

    def take(self, items: Sequence[T]) -> list[T]:
        """This shard's contiguous block of ``items`` (the shards of all ranks partition them)."""
        n = len(items)
        return list(items[self.rank * n // self.world : (self.rank + 1) * n // self.world])

    def take_groups(self, items: Sequence[T], group: Callable[[T], Hashable]) -> list[T]:
        """``take`` over the runs of consecutive items with equal ``group(item)``, kept whole (the
        row chunks of one store shard file, which one process must write)."""
        runs = [list(run) for _, run in itertools.groupby(items, key=group)]
        return [item for run in self.take(runs) for item in run]


class RankFailed(StoreError):
    """Another rank of the process group failed, as every rank learnt at one agreement (``Ranks.agree``)."""


@dataclass(frozen=True)
class Ranks:
    """The processes of one sharded command, and how they meet.

    Attributes:
        shard: this process's rank and the world size.
        coordinated: a ``torch.distributed`` process group joins the ranks (collectives work);
            otherwise the ranks are independent processes.
    """

    shard: Shard = Shard()
    coordinated: bool = False

    @property
    def single(self) -> bool:
        """One process does everything."""
        return self.shard.world == 1

    @property
    def leader(self) -> bool:
        return self.shard.rank == 0

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree(self, error: BaseException | None) -> None:
        """Every rank learns whether any rank failed: a failed rank re-raises its error, the others
        raise a [`RankFailed`][] naming the first failed rank. Independent ranks just re-raise.

        Ranks in lock step (sharded parameters, fit's broadcasts) agree before each collective of their
        work as well (``agree(None)``): a rank that fails between two of them agrees at once, and meets
        the others there instead of leaving them waiting in a collective it will never join. The ``RankFailed``
        they raise was agreed on by every rank, so it is re-raised without agreeing again."""
        if isinstance(error, RankFailed):
            raise error
        if self.coordinated:
            world = self.shard.world
            first = torch.tensor([self.shard.rank if error is not None else world], device=self._device())
            try:
                dist.all_reduce(first, op=dist.ReduceOp.MIN)
            except RuntimeError as lost:  # a rank ended without agreeing (killed, out of memory): its connection broke
                if error is not None:
                    raise error from None
                why = first_line(lost).split("] ", 1)[-1].split(". ")[0]  # gloo's "[pair.cc:553] Connection closed ..."
                raise RankFailed(
                    f"Another of the {world} ranks ended without agreeing (killed, or out of memory: its output or the "
                    f"launcher's says which), so rank {self.shard.rank} stops too ({why}); the finished chunks are "
                    "kept: re-run the same command to resume."
                ) from None
            failed = int(first.item())
            if error is None and failed < world:
                raise RankFailed(
                    f"Rank {failed} of {world} failed (its error is in its output); the finished chunks are kept: fix "
                    "the cause and re-run the same command to resume."
                )
        if error is not None:
            raise error

    def most(self, value: int) -> int:
        """The largest ``value`` any rank holds (a collective: every rank calls it; ranks in lock step, so it
        agrees first, see ``agree``)."""
        self.agree(None)
        held = torch.tensor([value], device=self._device())
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        return int(held.item())

    def busiest(self, work: int) -> bool:
        """Whether this rank holds the most ``work`` of all ranks (the first of those that do): the rank whose progress
        stands for the command's (a collective, see ``most``)."""
        world, rank = self.shard.world, self.shard.rank
        return self.most(work * world + world - 1 - rank) % world == world - 1 - rank

    def paced(self, items: Sequence[T]) -> Iterator[T]:
        """``items``, the ranks of a process group agreeing (``agree``) before each, and a rank with fewer items as
        often once it is done (the most any rank holds, a collective, first): a rank that fails on an item stops the
        others within an item, where they would otherwise work through the rest of their shards (hours) before they
        learnt of it. Independent ranks just take the items. Iterate to the end: the last agreements come then."""
        if not self.coordinated:
            yield from items
            return
        most = self.most(len(items))
        for item in items:
            self.agree(None)
            yield item
        for _ in range(most - len(items)):
            self.agree(None)

    def broadcast(self, tensor: torch.Tensor, source: int) -> torch.Tensor:
        """``tensor`` as held by rank ``source``, on every rank (on ``tensor``'s device). The ranks agree first
        (see ``agree``): a rank that failed since the last broadcast stops the others here."""
        self.agree(None)
        device = self._device()
        held = tensor.to(device)
        dist.broadcast(held, src=source)
        return held.to(tensor.device)


def ranks(shard: Shard | None = None) -> Ranks:
    """The ranks of this command: ``shard`` (independent processes), else those of an initialised
    ``torch.distributed`` process group with several ranks, else one process."""
    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if shard is not None:
        if grouped:
            raise StoreError(
                "A torch.distributed process group already splits this command between its ranks; drop --shard "
                "(shard), or run without torchrun."
            )
        return Ranks(shard)
    if grouped:
        return Ranks(Shard(dist.get_rank(), dist.get_world_size()), coordinated=True)
    return Ranks()


def rank_device(device: torch.device, group: Ranks) -> torch.device:
    """The device of this rank. Ranks joined by a process group compute one per GPU: an unnumbered ``cuda``
    becomes this rank's GPU (``local_gpu``: ``cuda:LOCAL_RANK``), and a numbered ``cuda:N`` must be it where
    several ranks share the node (``LOCAL_WORLD_SIZE``, else the world size), or every rank there would compute
    on GPU N (the one command line gives every rank the same ``--device``): it is refused in one sentence. A
    node's only rank keeps its ``cuda:N``; independent shards (``--shard``) keep the device they were given."""
    if device.type != "cuda" or not group.coordinated:
        return device
    local = local_gpu(group.shard.rank)
    if device.index is None or device.index == local:
        return torch.device("cuda", local)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", group.shard.world))
    if sharing > 1:
        raise StoreError(
            f"Rank {group.shard.rank} of {group.shard.world} was given device {device}, but the {sharing} ranks on "
            f"its node compute one per GPU (this one on cuda:{local}, its LOCAL_RANK's), so all would compute on "
            f"{device}; pass --device cuda (device='cuda'), and each rank takes its own."
        )
    return device


def local_gpu(rank: int) -> int:
    """The GPU a rank of a process group computes on, among those its process sees: its rank on the node
    (``LOCAL_RANK``, as torchrun sets it; else ``rank`` over the GPUs), or the only one it sees where the launcher
    gives each process a GPU of its own (``CUDA_VISIBLE_DEVICES`` per process). A node's rank beyond its GPUs is
    refused in one sentence."""
    count = torch.cuda.device_count()
    local = int(os.environ.get("LOCAL_RANK", rank % max(1, count)))
    if count == 1:
        return 0
    if local >= count:
        raise StoreError(
            f"Rank {rank} is rank {local} on its node, which has {count} GPUs; run at most {count} processes per "
            f"node (torchrun --nproc-per-node {count}), one per GPU."
        )
    return local


@contextmanager
def launched(device: str | None) -> Iterator[None]:
    """Join the process group a launcher such as torchrun describes (``WORLD_SIZE`` > 1 in the
    environment; NCCL when the ranks compute on CUDA, else gloo) for the duration of a command."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield
        return
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(local_gpu(int(os.environ.get("RANK", "0"))))
    # Ranks wait for each other only at a handful of barriers, possibly for hours (uneven shards).
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(days=7))
    try:
        yield
    finally:
        dist.destroy_process_group()


class ShardedJob(Protocol):
    """A command in four phases (see [`run_sharded`][])."""

    def prepare(self, overwrite: bool) -> None:
        """Create or check the store and every array and progress entry the ranks write (exclusive lock)."""

    def ready(self) -> bool:
        """Whether the store is prepared for this job (read-only; raises if it belongs to other settings)."""

    def work(self, group: Ranks) -> None:
        """Write this rank's shard (cooperative lock)."""

    def finish(self) -> bool:
        """Mark the store finished if every shard is done (exclusive lock); returns whether it was."""


def run_sharded(
    path: str,
    job: ShardedJob,
    group: Ranks,
    *,
    overwrite: bool,
    keep_new: Callable[[str], bool],
    wait: float = PREPARE_WAIT_SECONDS,
) -> None:
    """Run ``job`` on the store at ``path`` as one of ``group``'s ranks (see docs/howto/distributed.md).

    One process holds the exclusive lock throughout, as every writing command does. Ranks of a
    process group: rank 0 prepares, all write, rank 0 finishes, agreeing on failures in between.
    Independent ranks: prepared by whichever finds the store unprepared (the others wait up to
    ``wait`` seconds), finished by whichever finds every shard done.
    """
    if group.single:
        with writing(path, keep_new=keep_new):
            job.prepare(overwrite)
            job.work(group)
            job.finish()
        return
    if group.coordinated:
        _in_turn(group, group.leader, lambda: _prepare(path, job, overwrite, keep_new))
        _in_turn(group, True, lambda: _cooperatively(path, job, group))
        _in_turn(group, group.leader, lambda: _finish(path, job))
        return
    if overwrite:
        raise StoreError(
            "--force (overwrite) cannot be combined with --shard: independent shards would each replace the store; "
            "replace it with one process first, then run the shards."
        )
    _independent(path, job, group, keep_new, wait)
    try:
        _finish(path, job)
    except LockHeld:
        pass  # another shard still writes; the last one to finish marks the store finished


def together(step: Callable[[], T]) -> T:
    """``step()`` on every rank of the initialised process group (if any), agreeing on its failure (``Ranks.agree``):
    a rank that fails before the command's own agreements (loading its inputs) stops every rank with its error, where
    the others would wait for it in their first agreement."""
    group = ranks()
    try:
        result = step()
    except BaseException as err:
        group.agree(err)  # raises it, once every rank has learnt of it
        raise
    group.agree(None)
    return result


def _in_turn(group: Ranks, mine: bool, step: Callable[[], object]) -> None:
    error = None
    if mine:
        try:
            step()
        except BaseException as err:  # an interrupt too: the other ranks learn of it instead of losing the connection
            error = err
    group.agree(error)


def _prepare(path: str, job: ShardedJob, overwrite: bool, keep_new: Callable[[str], bool]) -> None:
    with writing(path, keep_new=keep_new):
        job.prepare(overwrite)


def _cooperatively(path: str, job: ShardedJob, group: Ranks) -> None:
    if group.coordinated and not group.leader:
        _find_prepared(path, job, group)
    with store_lock(path, "cooperative"):
        job.work(group)


def _find_prepared(path: str, job: ShardedJob, group: Ranks) -> None:
    """A rank of a process group finds the store rank 0 has just prepared at its own path, for its own options:
    else the ranks were given different paths (or do not share a filesystem) or different options."""
    try:
        found, why = job.ready(), ""
    except StoreError as err:
        found, why = False, f" ({err})"
    if not found:
        raise StoreError(
            f"Rank {group.shard.rank} of {group.shard.world} does not find at {path} the store rank 0 prepared for "
            f"the same options{why}: run every rank with the same command and store path, on a filesystem every "
            "rank sees."
        )


def _finish(path: str, job: ShardedJob) -> None:
    with store_lock(path):
        job.finish()


def _independent(path: str, job: ShardedJob, group: Ranks, keep_new: Callable[[str], bool], wait: float) -> None:
    """Write this shard once the store is prepared, preparing it if nobody else does."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with store_lock(path, "cooperative"):
                if job.ready():
                    job.work(group)
                    return
            _prepare(path, job, False, keep_new)
            continue
        except LockHeld as busy:
            if time.monotonic() > deadline:
                raise StoreError(
                    f"Shard {group.shard.rank}/{group.shard.world} waited {wait:.0f} s for the store at {path} to be "
                    f"prepared ({busy}); run every shard with the same command and options."
                ) from None
        time.sleep(0.2 + random.random())
