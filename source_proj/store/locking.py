"""Who may write a store: an advisory lock that a killed process cannot leave stuck.

Every command that writes a store (featurize, fit, ``verify --repair``) holds the store's lock
for as long as it writes. Two modes:

- **exclusive** (the default): one writer; a second process is refused with a message naming
  the holder. Needed to create, overwrite or repair a store.
- **cooperative**: several processes that write *disjoint* row chunks of one existing store (the
  ranks of a distributed job) hold the lock together; an exclusive writer is refused while any
  of them runs, and they are refused while an exclusive writer runs. Create the store (and its
  arrays) under the exclusive lock first, then let the ranks write their chunks cooperatively.

[`FileStoreLock`][] implements both with ``fcntl.flock`` on ``STORE/.source-proj.lock``
(``LOCK_EX`` / ``LOCK_SH``). The kernel drops a flock when its holder dies, however it dies, so a
lock left by a SIGKILLed process never blocks the resume. The lock is per process (re-entrant
inside one process). On object storage, where there is no flock, ``store_lock`` returns
[`ObjectStoreLock`][] (lease markers, same two modes).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from source_proj.errors import StoreError
from source_proj.store.durable import LOCK_FILE, io_errors

LockMode = Literal["exclusive", "cooperative"]


class LockHeld(StoreError):
    """The store's lock is held by another process (the message names it)."""


class StoreLock(ABC):
    """The right to write a store, held from [`acquire`][] to [`release`][] (or as a context)."""

    path: str
    mode: LockMode

    @abstractmethod
    def acquire(self) -> None:
        """Take the lock now or raise [`StoreError`][] saying who holds it (never waits)."""

    @abstractmethod
    def release(self) -> None:
        """Give the lock back (idempotent)."""

    @abstractmethod
    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now (``holder_info`` of a writer in another process), or ``None``.
        Only reads; meant for explaining why a store looks unfinished."""

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


# path → [fd, mode, count]: the locks this process holds (flock is per open file, not per process).
_held: dict[str, list[Any]] = {}


def _forget_in_child() -> None:
    """A forked child (a DataLoader's worker) closes its copies of the locks' descriptors: a flock lasts until the
    last copy is closed, so workers a failed featurize left alive would otherwise keep its store locked."""
    for fd, _, _ in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class FileStoreLock(StoreLock):
    """``fcntl.flock`` on ``<store>/.source-proj.lock`` (see the module docstring).

    Args:
        path: the store directory (created if missing).
        mode: ``"exclusive"`` or ``"cooperative"``.
    """

    def __init__(self, path: str | os.PathLike[str], mode: LockMode = "exclusive") -> None:
        if mode not in ("exclusive", "cooperative"):
            raise StoreError(f"Unknown lock mode {mode!r}; use 'exclusive' or 'cooperative'.")
        self.path = str(path)
        self.mode = mode
        self._key = str(Path(path).resolve())
        self._owned = False

    @property
    def file(self) -> Path:
        return Path(self.path) / LOCK_FILE

    def acquire(self) -> None:
        if self._owned:
            return
        held = _held.get(self._key)
        if held is not None:
            if held[1] == "cooperative" and self.mode == "exclusive":
                raise StoreError(
                    f"The store at {self.path} is held cooperatively by this process, which cannot also write it "
                    "exclusively; finish the cooperative writing first."
                )
            held[2] += 1
            self._owned = True
            return
        operation = (fcntl.LOCK_EX if self.mode == "exclusive" else fcntl.LOCK_SH) | fcntl.LOCK_NB
        for _ in range(10):
            with io_errors(self.path, "the store's lock file"):
                Path(self.path).mkdir(parents=True, exist_ok=True)
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, operation)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise StoreError(f"The store at {self.path} cannot be locked ({err}); check the path.") from err
                raise LockHeld(self._refusal()) from None
            # The file may have been removed (a discarded store) between open and flock: retry.
            try:
                same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise StoreError(f"The store at {self.path} keeps disappearing while being locked; is it being deleted?")
        _write_holder(fd, self.mode)
        _held[self._key] = [fd, self.mode, 1]
        self._owned = True

    def release(self) -> None:
        if not self._owned:
            return
        self._owned = False
        held = _held.get(self._key)
        if held is None:  # a forked child's copy of its parent's lock (``_forget_in_child``)
            return
        held[2] -= 1
        if held[2] == 0:
            del _held[self._key]
            os.close(held[0])  # closing the last descriptor drops the flock

    def holder(self) -> dict[str, Any] | None:
        if self._key in _held:
            return None  # this process writes it
        try:
            fd = os.open(self.file, os.O_RDONLY)
        except OSError:
            return None  # never locked
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(self.file.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            return holder if isinstance(holder, dict) else {}
        finally:
            os.close(fd)  # drops the probe's lock
        return None

    def _refusal(self) -> str:
        try:
            holder = json.loads(self.file.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        return refusal(self.path, holder, "a killed writer releases the lock at once")


def holder_info(mode: LockMode) -> dict[str, Any]:
    """Who takes a lock: mode, process, host, time and command (read only to explain a refusal)."""
    return {
        "mode": mode,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": time.time(),
        "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200],
    }


def writer_name(holder: Any) -> str:
    """``by process PID on HOST since TIME (COMMAND)`` for a lock holder's [`holder_info`][]."""
    if not isinstance(holder, dict) or "pid" not in holder:
        return "by another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    who = f"by process {holder['pid']} on {holder.get('host', '?')} since {since} ({holder.get('command', '?')})"
    return f"cooperatively (last joined {who})" if holder.get("mode") == "cooperative" else who


def refusal(path: str, holder: Any, release: str) -> str:
    """The message refusing a writer because ``holder`` (its [`holder_info`][]) writes the store."""
    return (
        f"The store at {path} is being written {writer_name(holder)}; wait for that to finish ({release}), or write "
        "to another path."
    )


def _write_holder(fd: int, mode: LockMode) -> None:
    """Record who holds the lock (read only to explain a refusal)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder_info(mode)).encode(), 0)








