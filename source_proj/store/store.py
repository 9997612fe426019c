"""The feature store: a chunked zarr (v3) group with self-describing metadata.

Layout (``k`` = projection dimension, ``N_s`` = size of stage ``s``'s dataset, ``S`` = Fisher
directions per example: 1 when sampled)::

    STORE/
      zarr.json                          attrs["source_proj"]: what produced the store (see Store.meta)
      trajectory/lr                      float64 [steps]      learning rate of every optimiser step
      grads/<stage>/<ckpt>               float32 [N_s, k]     P ∇ℓ(z_i; θ_c)
      fisher/<stage>/<ckpt>              float32 [N_s·S, k]   √w · P ∇ℓ(x_i, ŷ_i; θ_c), ŷ from the model
      progress/<array path>              uint32 [chunks, 2]   (1, crc32) once a row chunk is complete
      methods/<method>/train/<stage>     float32 [N_s, d]     cached training features: score = ⟨q, T(z)⟩
      methods/<method>/operators/...     per-segment eigenvalues/vectors (SOURCE)

Arrays are written in row chunks. A chunk counts as written only once its progress entry is
set, after its data; an interrupted command therefore recomputes exactly the unfinished chunks.
Every progress entry lives in its own zarr chunk, so processes writing disjoint row chunks never
touch the same file. Local stores write through [`DurableLocalStore`][]
(fsync before a write counts), URLs (``s3://``, ``memory://``…) through zarr's fsspec store
([`source_proj.store.objectstore`][]: atomic PUTs, nothing to fsync), and every chunk read is checked
against the crc32 of its progress entry, so a chunk damaged after it was written is reported by
name instead of being used.
Writers hold the store's lock ([`source_proj.store.locking`][]).
"""

from __future__ import annotations

import errno
import os
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from source_proj.errors import StoreError
from source_proj.store import objectstore
from source_proj.store.durable import LOCK_FILE, DurableLocalStore
from source_proj.store.objectstore import RemoteStore, is_remote

FORMAT = "source-proj-store"
FORMAT_VERSION = 1


def ckpt_key(step: int) -> str:
    """Array name of a checkpoint inside the store."""
    return f"step-{step:08d}"


class Store:
    """A feature store: a local directory (or ``file://`` URL), or a URL of any fsspec filesystem."""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = str(path)
        self.group = group

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any], *, overwrite: bool = False) -> Store:
        """Create a new store; an existing one is refused unless ``overwrite``."""
        if is_store(path) and not overwrite:
            raise StoreError(
                f"A store already exists at {path}; pass --force (overwrite=True) to replace it, "
                "or choose another path."
            )
        refuse_foreign_directory(path)
        attributes = {"source_proj": {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}}
        with _io(path, "the new store"):  # one write of the root metadata: a store exists whole or not at all
            group = zarr.open_group(store=_zarr_store(path, read_only=False), mode="w", attributes=attributes)
        return cls(path, group)

    @classmethod
    def open(cls, path: str | Path, *, writable: bool = False) -> Store:
        """Open an existing store, checking that this library can read it."""
        if not is_store(path):
            raise StoreError(f"No store at {path}; create one with `source-proj featurize` (source_proj.featurize).")
        try:
            group = zarr.open_group(store=_zarr_store(path, read_only=not writable), mode="r+" if writable else "r")
        except Exception as err:
            raise StoreError(
                f"{path} is not a readable zarr store ({err}); re-create it with featurize --force."
            ) from err
        meta = group.attrs.get("source_proj")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(
                f"{path} is a zarr group but not a source-proj store; point to a store written by featurize."
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} was written in store format {meta.get('format_version')} (by source-proj "
                f"{meta.get('library_version', '?')}) but this library reads format {FORMAT_VERSION}; use a matching "
                "source-proj version or re-create the store with `source-proj featurize --force`."
            )
        return cls(path, group)

    def refresh(self) -> None:
        """Re-read the store's metadata (after other processes or Store objects changed it)."""
        self.group = Store.open(self.path, writable=not self.group.store.read_only).group

    @property
    def meta(self) -> dict[str, Any]:
        """The store's self-description (a copy): params, projection, task, trajectory, methods."""
        return dict(self.group.attrs["source_proj"])

    def update_meta(self, **fields: Any) -> None:
        """Replace top-level metadata fields."""
        meta = self.meta
        meta.update(fields)
        with _io(self.path, "the store's metadata"):
            self.group.attrs["source_proj"] = meta

    def has(self, name: str) -> bool:
        try:
            self.group[name]
        except KeyError:
            return False
        except Exception as err:
            raise StoreError(
                f"The metadata of {name!r} in {self.path} is unreadable ({type(err).__name__}); run "
                f"`source-proj verify {self.path} --repair` and re-run the command that wrote it."
            ) from err
        return True

    def array(self, name: str) -> zarr.Array:
        try:
            arr = self.group[name]
        except KeyError as err:
            raise StoreError(
                f"The store at {self.path} has no array {name!r}; run the step that writes it first."
            ) from err
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{name!r} in {self.path} is a group, not an array.")
        return arr

    def require_array(self, name: str, shape: tuple[int, ...], chunk_rows: int, dtype: str) -> zarr.Array:
        """The array ``name``, created (row-chunked, uncompressed) if missing; checks its shape."""
        if self.has(name):
            arr = self.array(name)
            if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != dtype:
                raise StoreError(
                    f"{name!r} in {self.path} has shape {arr.shape} and dtype {arr.dtype}, not {shape} and {dtype}; "
                    "the store was written with other settings, so re-create it with --force."
                )
            return arr
        chunks = (max(1, min(chunk_rows, shape[0])), *shape[1:])
        return self._create_array(name, shape, chunks, dtype)

    def _create_array(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str) -> zarr.Array:
        """Create an uncompressed array, its parent groups first (zarr writes them concurrently
        otherwise, and a kill in between would leave an array without its parents' metadata)."""
        with _io(self.path, f"array {name!r}"):
            parts = name.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                self.group.require_group("/".join(parts[:depth]))
            return self.group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, compressors=None, fill_value=0
            )

    def delete(self, name: str) -> None:
        """Remove an array or group (and its progress entries) if present."""
        for key in (name, f"progress/{name}"):
            if self.has(key):
                with _io(self.path, f"the deletion of {key!r}"):
                    del self.group[key]

    # -- progress of row-chunked writes ------------------------------------------------------

    def _progress(self, name: str, num_chunks: int) -> zarr.Array:
        key = f"progress/{name}"
        if self.has(key):
            return self.array(key)
        return self._create_array(key, (num_chunks, 2), (1, 2), "uint32")

    def num_chunks(self, name: str) -> int:
        """Number of row chunks of array ``name``."""
        arr = self.array(name)
        return -(-arr.shape[0] // arr.chunks[0])

    def progress_entries(self, name: str) -> np.ndarray:
        """uint32 ``[chunks, 2]``: (1, crc32) for every complete row chunk; an unreadable entry reads (0, 0)."""
        if self.group.store.read_only and not self.has(f"progress/{name}"):
            return np.zeros((self.num_chunks(name), 2), dtype=np.uint32)  # created, never written
        progress = self._progress(name, self.num_chunks(name))
        try:
            return np.asarray(progress[...])
        except Exception:
            entries = np.zeros(progress.shape, dtype=np.uint32)
            for i in range(progress.shape[0]):
                try:
                    entries[i] = progress[i]
                except Exception:
                    entries[i] = 0
            return entries

    def pending_chunks(self, name: str) -> list[int]:
        """Row chunks of array ``name`` not yet marked complete."""
        return [int(i) for i in np.flatnonzero(self.progress_entries(name)[:, 0] != 1)]

    def chunk_rows(self, name: str, chunk: int) -> tuple[int, int]:
        """``(start, stop)`` rows of row chunk ``chunk``."""
        arr = self.array(name)
        start = chunk * arr.chunks[0]
        return start, min(arr.shape[0], start + arr.chunks[0])

    def check_chunk(self, name: str, chunk: int, crc: int) -> np.ndarray | str:
        """The rows of a chunk whose recorded crc32 is ``crc``, or why they cannot be trusted."""
        start, stop = self.chunk_rows(name, chunk)
        try:
            values = np.asarray(self.array(name)[start:stop])
        except Exception as err:
            return f"unreadable: {type(err).__name__}, truncated?"
        if zlib.crc32(values.tobytes()) != int(crc):
            return "its crc32 differs from the one recorded when it was written"
        return values

    def read_chunk(self, name: str, chunk: int) -> np.ndarray:
        """Row chunk ``chunk`` of array ``name``, checked against its crc32; refuses a damaged one."""
        try:
            done, crc = self._progress(name, self.num_chunks(name))[chunk]
        except Exception:
            done, crc = 0, 0  # an unreadable progress entry: the chunk counts as unwritten
        if done != 1:
            raise StoreError(
                f"{name!r} in {self.path} is incomplete (an interrupted run?); re-run the command that writes it "
                "to finish it."
            )
        values = self.check_chunk(name, chunk, int(crc))
        if isinstance(values, str):
            start, stop = self.chunk_rows(name, chunk)
            raise StoreError(
                f"Chunk {chunk} (rows {start}–{stop - 1}) of {name!r} in {self.path} is damaged ({values}); run "
                f"`source-proj verify {self.path} --repair`, then re-run the command that wrote it to recompute it."
            )
        return values

    def mark_pending(self, name: str, chunks: list[int]) -> None:
        """Forget that these chunks were written, so the writing command recomputes them."""
        progress = self._progress(name, self.num_chunks(name))
        with _io(self.path, f"the progress entries of {name!r}"):
            for chunk in chunks:
                progress[chunk] = np.zeros(2, dtype=np.uint32)

    def progress_arrays(self, prefix: str = "") -> list[str]:
        """Names of the row-chunked arrays (those with progress entries) under ``prefix``, sorted."""
        if not self.has("progress"):
            return []
        group = self.group["progress"]
        with warnings.catch_warnings():  # directories a killed writer left without metadata
            warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
            names = [key for key, node in group.members(max_depth=None) if isinstance(node, zarr.Array)]
        return sorted(n for n in names if n.startswith(prefix))

    def damaged_chunks(self, name: str) -> dict[int, str]:
        """Chunks marked complete whose data no longer match their crc32: ``{chunk: reason}``."""
        damaged = {}
        for chunk, (done, crc) in enumerate(self.progress_entries(name)):
            if done == 1:
                values = self.check_chunk(name, chunk, int(crc))
                if isinstance(values, str):
                    damaged[chunk] = values
        return damaged

    def heal(self, *prefixes: str) -> list[tuple[str, int]]:
        """Re-check every complete chunk under ``prefixes`` and mark the damaged ones pending.

        Writers call this when they resume an interrupted store, so a chunk damaged by a crash
        (a lost write on a disk that ignored fsync) is recomputed instead of trusted. Returns the
        ``(array, chunk)`` pairs marked pending.
        """
        return self.heal_chunks(
            (name, chunk)
            for prefix in prefixes
            for name in self.progress_arrays(prefix)
            for chunk in range(self.num_chunks(name))
        )

    def heal_chunks(self, chunks: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """[`heal`][] restricted to these ``(array, chunk)`` pairs (a shard of a distributed writer
        heals only its own chunks, which no other process writes)."""
        wanted: dict[str, list[int]] = {}
        for name, chunk in chunks:
            wanted.setdefault(name, []).append(chunk)
        healed = []
        for name, indices in wanted.items():
            entries = self.progress_entries(name)
            damaged = [
                c
                for c in indices
                if entries[c, 0] == 1 and isinstance(self.check_chunk(name, c, int(entries[c, 1])), str)
            ]
            if damaged:
                self.mark_pending(name, damaged)
                healed.extend((name, chunk) for chunk in damaged)
        if healed:
            name, chunk = healed[0]
            warnings.warn(
                f"{len(healed)} chunk(s) of {self.path} written before the interruption were damaged (first: chunk "
                f"{chunk} of {name!r}); they are recomputed.",
                stacklevel=2,
            )
        return healed

    def write_chunk(self, name: str, chunk: int, values: np.ndarray) -> None:
        """Write row chunk ``chunk`` of array ``name`` in full, then mark it complete."""
        arr = self.array(name)
        rows = arr.chunks[0]
        start = chunk * rows
        stop = min(arr.shape[0], start + rows)
        values = np.ascontiguousarray(values, dtype=arr.dtype)
        if values.shape != (stop - start, *arr.shape[1:]):
            raise ValueError(
                f"chunk {chunk} of {name} needs shape {(stop - start, *arr.shape[1:])}, got {values.shape}"
            )
        num_chunks = -(-arr.shape[0] // rows)
        progress = self._progress(name, num_chunks)
        with _io(self.path, f"chunk {chunk} of {name!r}"):
            arr[start:stop] = values
            progress[chunk] = np.array([1, zlib.crc32(values.tobytes())], dtype=np.uint32)

    def is_complete(self, name: str) -> bool:
        return self.has(name) and not self.pending_chunks(name)

    def iter_chunks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, rows)`` for every row chunk of a complete array, in order (crc-checked)."""
        if self.pending_chunks(name):
            raise StoreError(
                f"{name!r} in {self.path} is incomplete (an interrupted run?); re-run the command that writes it "
                "to finish it."
            )
        for chunk in range(self.num_chunks(name)):
            yield self.chunk_rows(name, chunk)[0], self.read_chunk(name, chunk)

    def read(self, name: str) -> np.ndarray:
        """A complete array, whole (crc-checked)."""
        return np.concatenate([rows for _, rows in self.iter_chunks(name)])

    def write_whole(self, name: str, values: np.ndarray) -> None:
        """Write a small array in one piece (one chunk) and mark it complete."""
        self.delete(name)
        self.require_array(name, tuple(values.shape), max(1, values.shape[0]), str(values.dtype))
        self.write_chunk(name, 0, values)


def local_path(path: str | Path) -> Path:
    """The directory of a local store path or ``file://`` URL."""
    text = str(path)
    return Path(text.removeprefix("file://")) if text.startswith("file://") else Path(path)


def _zarr_store(path: str | Path, *, read_only: bool) -> zarr.abc.store.Store:
    """Local directories are written durably; a URL goes through zarr's fsspec store (see objectstore.py)."""
    if is_remote(path):
        return RemoteStore.open_url(str(path), read_only=read_only)
    return DurableLocalStore(local_path(path), read_only=read_only)


def is_store(path: str | Path) -> bool:
    """Whether ``path`` holds a store (its root metadata exists)."""
    if is_remote(path):
        return objectstore.exists(str(path), "zarr.json")
    return (local_path(path) / "zarr.json").exists()


def refuse_foreign_directory(path: str | Path) -> None:
    """Refuse to turn a directory holding other files into a store (it would be emptied)."""
    if is_remote(path):
        if not is_store(path) and objectstore.contents(str(path)):
            raise StoreError(
                f"{path} already holds objects that are not a source-proj store; choose a new or empty location for "
                "the store."
            )
        return
    root = local_path(path)
    if root.exists() and not root.is_dir():
        raise StoreError(f"{path} is a file, not a store directory; choose another path for the store.")
    if not root.is_dir() or is_store(root) or (root / LOCK_FILE).exists() or not any(root.iterdir()):
        return
    raise StoreError(
        f"{path} already holds files that are not a source-proj store; choose a new or empty directory for the store."
    )


_IO_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission is denied",
    errno.EPERM: "permission is denied",
}


@contextmanager
def _io(path: str | Path, what: str) -> Iterator[None]:
    """Turn an operating-system error while writing ``what`` into a [`StoreError`][]."""
    try:
        yield
    except OSError as err:
        reason = _IO_REASONS.get(err.errno or 0, os.strerror(err.errno) if err.errno else str(err))
        raise StoreError(
            f"Writing {what} to {path} failed because {reason} ({err.strerror or err}); fix that and re-run the "
            "same command: it resumes, and nothing half-written was kept."
        ) from err
