"""Writing a store under its lock: the lock of a path (file or object store), and the write
session that undoes a store creation that came to nothing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from source_proj.store import objectstore
from source_proj.store.durable import remove_partial_files
from source_proj.store.leaselock import ObjectStoreLock
from source_proj.store.locking import FileStoreLock, LockMode, StoreLock, writer_name
from source_proj.store.store import is_remote, is_store, local_path, refuse_foreign_directory


def current_writer(path: str | os.PathLike[str]) -> str | None:
    """``by process PID on HOST since TIME (COMMAND)`` when another process writes the store now, else ``None``."""
    holder = store_lock(path).holder()
    return None if holder is None else writer_name(holder)


def store_lock(path: str | os.PathLike[str], mode: LockMode = "exclusive") -> StoreLock:
    """The lock guarding writes to the store at ``path``: ``FileStoreLock`` for a local directory
    (or ``file://`` URL), [`ObjectStoreLock`][] on object storage."""
    if is_remote(path):
        return ObjectStoreLock(str(path), mode)
    return FileStoreLock(local_path(path), mode)


@contextmanager
def writing(
    path: str | os.PathLike[str],
    mode: LockMode = "exclusive",
    *,
    keep_new: Callable[[str], bool] = is_store,
) -> Iterator[StoreLock]:
    """Hold the store's lock while writing it; undo the creation of a store that came to nothing.

    Refuses a directory of other files. Under the exclusive lock, the temporary files of killed
    writers are removed first. If the block raises and the store did not exist before, the path
    is put back as it was (removed, or emptied if it was an empty directory) unless
    ``keep_new(path)`` says that completed work is worth keeping (by default: any store).
    """
    refuse_foreign_directory(path)
    remote = is_remote(path)
    root = local_path(path)
    dir_existed = objectstore.exists(str(path)) if remote else root.is_dir()
    store_existed = is_store(path)
    with store_lock(path, mode) as lock:
        if mode == "exclusive" and not remote:
            remove_partial_files(root)
        try:
            yield lock
        except BaseException:
            if not store_existed and not keep_new(str(path)):
                if remote:
                    objectstore.remove(str(path))
                else:
                    _discard(root, keep_dir=dir_existed)
            raise


def _discard(root: Path, *, keep_dir: bool) -> None:
    if not keep_dir:
        shutil.rmtree(root, ignore_errors=True)
        return
    for entry in list(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
