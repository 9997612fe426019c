"""Durable writes: files and zarr chunks that are complete or absent after SIGKILL or power loss.

A write is durable when its bytes and the directory entry that names them are on stable storage
before the writer goes on. The recipe (used by everything source-proj writes):

1. write the bytes to a temporary file in the destination directory and ``fsync`` it;
2. ``rename`` it over the destination (atomic: readers see the old file or the new one);
3. ``fsync`` the directory, and every directory the write had to create, so the name survives.

[`atomic_write_bytes`][] does this for one file (trajectories, caches, reports).
[`DurableLocalStore`][] is a zarr ``LocalStore`` whose every key write (chunks, ``zarr.json``)
is followed by steps 1–3, so a progress entry written after a chunk is durable only once the
chunk is. It also hides the store's lock file and the ``*.partial`` temporary files a killed
writer leaves behind from zarr's listings; [`remove_partial_files`][] deletes those.
At exit, the writes an interrupt left running in zarr's IO thread are let finish (``_settle_io``).
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from zarr.core import sync as zarr_sync
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

from source_proj.errors import StoreError

LOCK_FILE = ".source-proj.lock"
"""Name of the lock file inside a store directory (see [`source_proj.store.locking`][])."""

PARTIAL_SUFFIX = ".partial"
"""Suffix of the temporary files of an unfinished write (zarr's and [`atomic_write_bytes`][]')."""


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (created, renamed or deleted files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle_io(timeout: float = 60.0) -> None:
    """Wait (at most ``timeout`` seconds; a second Ctrl-C ends the wait) for the reads and writes still running in
    zarr's IO thread.

    zarr runs every store operation in an event loop of its own thread; a ``KeyboardInterrupt`` reaches the
    thread that waits for one, not the operation, which goes on. Left running at exit, zarr's own clean-up cannot
    close the loop and prints a traceback. A write that goes on is still durable (steps 1–3 above): it
    ends complete, so letting it finish loses nothing.
    """
    loop = zarr_sync.loop[0]
    if loop is None or loop.is_closed():
        return

    async def rest() -> None:
        running = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        await asyncio.gather(*running, return_exceptions=True)

    with suppress(Exception, KeyboardInterrupt):
        asyncio.run_coroutine_threadsafe(rest(), loop).result(timeout)


# At exit, before zarr's own clean-up (registered when zarr was imported, above: exit handlers run last first), so
# that a script or command interrupted in a write ends with its own message, not zarr's traceback.
atexit.register(_settle_io)


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; returns the parents of what was created."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return [d.parent for d in missing]


def _create_temporary(path: Path) -> tuple[int, str]:
    """Create a new, empty temporary file next to ``path``; returns its descriptor and name.

    Unlike ``tempfile.mkstemp`` (always mode 0600), the file is created with mode 0666 less the
    process's umask, as ``open()`` would create ``path`` itself: with umask 022 the result is 0644,
    readable by colleagues on a shared machine, like the store's files. The kernel applies the umask
    at creation, so nothing reads or changes the umask (which would race with other threads).
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(path.parent))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | Sequence[bytes | memoryview]) -> None:
    """Replace ``path`` by ``data`` (bytes, or pieces written one after the other) durably: afterwards, even after a
    crash, the file holds either its old content or ``data``, never a mix, and survives power loss once this
    returns."""
    path = Path(path)
    created = _make_parents(path.parent)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for directory in [path.parent, *created]:
        fsync_dir(directory)


def remove_partial_files(root: str | os.PathLike[str]) -> int:
    """Delete the temporary files of interrupted writes under ``root``; returns how many.

    Only safe while no other process writes below ``root`` (hold the store's exclusive lock).
    """
    removed = 0
    for tmp in Path(root).rglob(f"*{PARTIAL_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


class DurableLocalStore(LocalStore):
    """A zarr ``LocalStore`` whose writes are durable (see the module docstring).

    zarr already writes each key through a temporary file and a rename; this store adds the
    ``fsync`` of the file, of its directory and of every directory the write created, before
    the write counts as done. Deletions and ``clear`` keep the store's lock file.
    """

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self._durable_dirs: set[Path] = set()

    def _sync_key(self, key: str) -> None:
        path = self.root / key
        if not path.exists():
            return  # zarr skipped writing an all-fill-value chunk
        fsync_file(path)
        directory = path.parent
        fsync_dir(directory)
        # Directories created by this write must be durable in their parents too.
        while directory != self.root and directory not in self._durable_dirs:
            fsync_dir(directory.parent)
            self._durable_dirs.add(directory)
            directory = directory.parent

    async def set(self, key: str, value: Buffer) -> None:
        await super().set(key, value)
        await asyncio.to_thread(self._sync_key, key)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if (self.root / key).exists():
            return
        await super().set_if_not_exists(key, value)
        await asyncio.to_thread(self._sync_key, key)

    def set_sync(self, key: str, value: Buffer) -> None:
        super().set_sync(key, value)
        self._sync_key(key)

    def delete_file(self, key: str) -> None:
        """Delete the file of ``key`` (a chunk's or shard's) if present, durably, as ``delete`` does, in the calling
        thread: the store's own writes of plain arrays (``Store._plain``) need no round trip through zarr's loop."""
        self._check_writable()
        path = self.root / key
        path.unlink(missing_ok=True)
        if path.parent.is_dir():
            fsync_dir(path.parent)

    async def delete(self, key: str) -> None:
        await super().delete(key)
        parent = (self.root / key).parent
        if parent.is_dir():
            await asyncio.to_thread(fsync_dir, parent)

    async def delete_dir(self, prefix: str) -> None:
        if not prefix.strip("/"):
            await self.clear()
            return
        await super().delete_dir(prefix)
        parent = (self.root / prefix).parent
        if parent.is_dir():
            await asyncio.to_thread(fsync_dir, parent)
        self._durable_dirs = {d for d in self._durable_dirs if d.exists()}

    async def clear(self) -> None:
        """Delete every key (the root ``zarr.json`` first, so an interrupted clear leaves no store)."""
        self._check_writable()
        await asyncio.to_thread(self._clear_keeping_lock)

    def _clear_keeping_lock(self) -> None:
        (self.root / "zarr.json").unlink(missing_ok=True)
        fsync_dir(self.root)
        for entry in self.root.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        fsync_dir(self.root)
        self._durable_dirs.clear()

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        async for key in super().list_dir(prefix):
            if key != LOCK_FILE and not key.endswith(PARTIAL_SUFFIX):
                yield key

    async def list(self) -> AsyncIterator[str]:
        async for key in super().list():
            name = key.rsplit("/", 1)[-1]
            if name != LOCK_FILE and not name.endswith(PARTIAL_SUFFIX):
                yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        async for key in super().list_prefix(prefix):
            name = key.rsplit("/", 1)[-1]
            if name != LOCK_FILE and not name.endswith(PARTIAL_SUFFIX):
                yield key


_IO_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission is denied",
    errno.EPERM: "permission is denied",
}


@contextmanager
def io_errors(path: str | Path, what: str) -> Iterator[None]:
    """Turn an operating-system error while writing ``what`` into a ``StoreError``."""
    try:
        yield
    except OSError as err:
        reason = _IO_REASONS.get(err.errno or 0, os.strerror(err.errno) if err.errno else str(err))
        raise StoreError(
            f"Writing {what} to {path} failed because {reason} ({err.strerror or err}); fix that and re-run the "
            "same command: it resumes, and nothing half-written was kept."
        ) from err
