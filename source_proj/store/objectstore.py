"""Stores on object storage and other fsspec filesystems (``s3://``, ``gs://``, ``memory://``…).

A store whose path is a URL (anything with ``://`` except ``file://``, which names a local
directory and gets the local, fsync'ed store) is read and written through zarr's own
``FsspecStore``. What durability and locking mean there:

- **Durability.** An object PUT is atomic: a reader sees the whole new object or none, never a
  prefix, and the PUT returns only once the object is stored (S3, GCS and Azure are strongly
  read-after-write consistent). There is nothing to fsync. zarr writes a chunk with one PUT and
  awaits it before the progress entry is PUT, so the local guarantee carries over unchanged: a
  chunk counts only once its progress entry exists, and then its bytes exist whole.
  No temporary files are left by a killed writer.
- **Locking.** Object stores have no flock. [`ObjectStoreLock`][] keeps the same
  two modes (exclusive, cooperative) with *lease markers*: a writer PUTs ``STORE/.source-proj.lock/<id>.json``
  (who, mode, lease expiry), then lists the markers; if another live marker conflicts, it deletes
  its own and is refused with the holder's name. Two writers racing both see each other and both
  step back (re-run one), so two writers never proceed together. A thread renews the lease every
  third of its length; a killed writer stops renewing, and its marker is ignored once its lease
  has lapsed (60 s by default), so a killed writer blocks a resume for at most one lease. The
  lease is read against the local clock: hosts must agree on the time to within the lease, and a
  writer stalled for longer than its lease (suspended, partitioned) loses its lock without knowing.

``file://`` URLs and NFS mounts are local directories (flock works on Linux NFS).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import fsspec
from zarr.storage import FsspecStore

from source_proj.errors import StoreError
from source_proj.store.durable import LOCK_FILE


def is_remote(path: object) -> bool:
    """Whether ``path`` is the URL of an fsspec filesystem other than the local one."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The (synchronous) fsspec filesystem of ``url`` and the store's root path on it."""
    try:
        fs, root = fsspec.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise StoreError(
            f"{url} cannot be opened ({err}); install the fsspec filesystem for its protocol "
            "(e.g. `pip install s3fs` for s3://, gcsfs for gs://)."
        ) from err
    return fs, root.rstrip("/")


def exists(url: str, key: str = "") -> bool:
    """Whether the object (or directory) ``key`` below ``url`` exists."""
    fs, root = filesystem(url)
    return bool(fs.exists(f"{root}/{key}" if key else root))


def contents(url: str) -> list[str]:
    """Names directly below ``url`` other than the lock markers (empty if nothing is there)."""
    fs, root = filesystem(url)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    names = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]
    return [n for n in names if n and n != LOCK_FILE]


def remove(url: str, key: str = "") -> None:
    """Delete ``key`` below ``url`` (recursively); with no key, everything but the lock markers."""
    fs, root = filesystem(url)
    targets = [f"{root}/{key}"] if key else [f"{root}/{name}" for name in contents(url)]
    for target in targets:
        with contextlib.suppress(FileNotFoundError):  # already gone: nothing to delete
            fs.rm(target, recursive=True)


class RemoteStore(FsspecStore):
    """zarr's ``FsspecStore`` that keeps the store's lock markers out of zarr's sight: listings
    skip them and clearing the store (``mode="w"``) leaves them in place."""

    @classmethod
    def open_url(cls, url: str, *, read_only: bool) -> RemoteStore:
        store = FsspecStore.from_url(url, read_only=read_only)
        return cls(store.fs, read_only=read_only, path=store.path, allowed_exceptions=store.allowed_exceptions)

    async def list(self) -> AsyncIterator[str]:
        async for key in super().list():
            if not key.startswith(LOCK_FILE):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        async for key in super().list_dir(prefix):
            if key != LOCK_FILE:
                yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        async for key in super().list_prefix(prefix):
            if not key.startswith(LOCK_FILE):
                yield key

    async def delete_dir(self, prefix: str) -> None:
        if prefix.strip("/"):
            await super().delete_dir(prefix)
            return
        await self.clear()

    async def clear(self) -> None:
        """Delete every key but the lock markers (the root ``zarr.json`` first: no half store is left)."""
        self._check_writable()
        await self.delete("zarr.json")
        try:
            entries = await self.fs._ls(self.path, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            if str(entry).rstrip("/").rsplit("/", 1)[-1] != LOCK_FILE:
                await self.fs._rm(entry, recursive=True)
