"""The feature store: a chunked zarr (v3) group with self-describing metadata.

Layout (``k`` = projection dimension, ``N_s`` = size of stage ``s``'s dataset, ``S`` = Fisher
directions per example: 1 when sampled)::

    STORE/
      zarr.json                          attrs["source_proj"]: what produced the store (see Store.meta)
      trajectory/lr                      float64 [steps]      learning rate of every optimiser step
      grads/<stage>/<ckpt>               float32 [N_s, k]     P ∇ℓ(z_i; θ_c)
      fisher/<stage>/<ckpt>              float32 [N_s·S, k]   √w · P ∇ℓ(x_i, ŷ_i; θ_c), ŷ from the model (with
                                                          ``fisher_examples``: the rows of ``FisherRows``)
      progress/<array path>              uint32 [chunks, 2]   (state, crc32) of every row chunk
      staging/<array path>               row chunks of a sharded array written but not yet packed
      methods/<method>/train/<stage>     float32 [N_s, d]     cached training features: score = ⟨q, T(z)⟩
      methods/<method>/operators/...     per-segment eigenvalues/vectors (SOURCE)

Arrays are written in row chunks. A chunk counts as written only once its progress entry is
set, after its data; an interrupted command therefore recomputes exactly the unfinished chunks.
A progress entry is (0, 0) while its chunk is pending, (1, crc32) once written, (2, crc32) once
packed into its shard.

**Shards** (format 2). A store created with ``meta["layout"]["shard_chunks"]`` = n > 1 keeps n
consecutive row chunks of each array in one file (a zarr v3 shard, ``shards=``), so a store of
10⁷ rows holds thousands of files, not millions. A shard file is only ever written whole (zarr
rewrites a whole shard for any partial write): a finished chunk is first written to a file of its
own under ``staging/`` and its entry set to 1, unless it is the last of its shard to be finished:
then the shard is written in one piece from it and the shard's verified staged chunks (on a local
disk by the store itself, in zarr's own encoding: ``_write_shard_file``), their entries set to 2,
and the staged files deleted.
A kill between these steps leaves every chunk readable from where its entry says, and
`Store.pack` (run by the writers when they finish) packs what was left. The progress entries of a
shard's chunks share one file too. Two processes therefore never write the same file as long as
they write disjoint *shards*: the distributed writers split their work at shard boundaries
(``Store.shard_chunks``). Stores of format 1 (one file per chunk and per progress entry) are read
and resumed as they are.

Local stores write through [`DurableLocalStore`][]
(fsync before a write counts), URLs (``s3://``, ``memory://``…) through zarr's fsspec store
([`source_proj.store.objectstore`][]: atomic PUTs, nothing to fsync), and every chunk read is checked
against the crc32 of its progress entry, so a chunk damaged after it was written is reported by
name instead of being used.
Writers hold the store's lock ([`source_proj.store.locking`][]).
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync

from source_proj.errors import StoreError
from source_proj.store import objectstore
from source_proj.store.durable import LOCK_FILE, DurableLocalStore, atomic_write_bytes, io_errors
from source_proj.store.objectstore import RemoteStore, is_remote

FORMAT = "source-proj-store"
FORMAT_VERSION = 2
"""The format this library writes: 2 adds sharded arrays and the packed progress state."""
READABLE_VERSIONS = (1, 2)

PENDING, WRITTEN, PACKED = 0, 1, 2
"""Progress states of a row chunk: not written, written (staged if its array is sharded), packed into its shard."""
_DONE = (WRITTEN, PACKED)
STAGING = "staging/"

SHARD_BYTES = 256 * 2**20
"""Default size of a shard file (see ``shard_chunks_for``): large enough that 10⁷ rows of k = 4096 make
about 600 files per array, small enough to be packed in memory."""


def shard_chunks_for(chunk_bytes: int, shard_bytes: int = SHARD_BYTES) -> int:
    """Row chunks per shard file so that a shard holds at most ``shard_bytes`` (at least one chunk)."""
    return max(1, shard_bytes // max(1, chunk_bytes))


def ckpt_key(step: int) -> str:
    """Array name of a checkpoint inside the store."""
    return f"step-{step:08d}"


def key_step(key: str) -> int:
    """The step of a checkpoint's array name (inverse of [`ckpt_key`][])."""
    return int(key.removeprefix("step-"))


class Store:
    """A feature store: a local directory (or ``file://`` URL), or a URL of any fsspec filesystem."""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = str(path)
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}  # opened arrays (their metadata never changes; deletion forgets them)

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any], *, overwrite: bool = False) -> Store:
        """Create a new store; an existing one is refused unless ``overwrite``."""
        if is_store(path) and not overwrite:
            raise StoreError(
                f"A store already exists at {path}; pass --force (overwrite=True) to replace it, "
                "or choose another path."
            )
        refuse_foreign_directory(path)
        attributes = {"source_proj": {**meta, "format": FORMAT, "format_version": FORMAT_VERSION}}
        with io_errors(path, "the new store"):  # one write of the root metadata: a store exists whole or not at all
            group = zarr.open_group(store=_zarr_store(path, read_only=False), mode="w", attributes=attributes)
        return cls(path, group)

    @classmethod
    def open(cls, path: str | Path, *, writable: bool = False) -> Store:
        """Open an existing store, checking that this library can read it."""
        if not is_store(path) and not is_remote(path) and (local_path(path) / "trajectory.json").is_file():
            raise StoreError(
                f"{path} is a training run recorded by TrajectoryRecorder, not a store; pass the store featurize wrote "
                "from it, or create one with `source-proj featurize` (source_proj.featurize)."
            )
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
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise StoreError(
                f"{path} was written in store format {meta.get('format_version')} (by source-proj "
                f"{meta.get('library_version', '?')}) but this library reads formats "
                f"{' and '.join(str(v) for v in READABLE_VERSIONS)}; use a matching source-proj version or re-create "
                "the store with `source-proj featurize --force`."
            )
        return cls(path, group)

    def refresh(self) -> None:
        """Re-read the store's metadata (after other processes or Store objects changed it)."""
        self.group = Store.open(self.path, writable=not self.group.store.read_only).group
        self._arrays.clear()

    @property
    def meta(self) -> dict[str, Any]:
        """The store's self-description (a copy): params, projection, task, trajectory, methods."""
        return dict(self.group.attrs["source_proj"])

    @property
    def shard_chunks(self) -> int:
        """Row chunks per shard file of the arrays this store creates (``meta["layout"]``; 1: a file per chunk)."""
        return int((self.group.attrs["source_proj"].get("layout") or {}).get("shard_chunks", 1))

    def update_meta(self, **fields: Any) -> None:
        """Replace top-level metadata fields."""
        meta = self.meta
        meta.update(fields)
        with io_errors(self.path, "the store's metadata"):
            self.group.attrs["source_proj"] = meta

    def has(self, name: str) -> bool:
        if name in self._arrays:
            return True
        try:
            self._node(name)
        except KeyError:
            return False
        except Exception as err:
            raise StoreError(
                f"The metadata of {name!r} in {self.path} is unreadable ({type(err).__name__}); run "
                f"`source-proj verify {self.path} --repair` and re-run the command that wrote it."
            ) from err
        return True

    def array(self, name: str) -> zarr.Array:
        if name in self._arrays:
            return self._arrays[name]
        try:
            arr = self._node(name)
        except KeyError as err:
            raise StoreError(
                f"The store at {self.path} has no array {name!r}; run the step that writes it first."
            ) from err
        except Exception as err:
            raise StoreError(
                f"The metadata of {name!r} in {self.path} is unreadable ({type(err).__name__}); run "
                f"`source-proj verify {self.path} --repair` and re-run the command that wrote it."
            ) from err
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{name!r} in {self.path} is a group, not an array.")
        self._arrays[name] = arr
        return arr

    def require_array(self, name: str, shape: tuple[int, ...], chunk_rows: int, dtype: str) -> zarr.Array:
        """The array ``name``, created (row-chunked, uncompressed, in shards of ``shard_chunks``
        chunks when it has several) if missing; checks its shape."""
        if self.has(name):
            arr = self.array(name)
            if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != dtype:
                raise StoreError(
                    f"{name!r} in {self.path} has shape {arr.shape} and dtype {arr.dtype}, not {shape} and {dtype}; "
                    "the store was written with other settings, so re-create it with --force."
                )
            if arr.shards is not None and self.has(f"progress/{name}") and self.pending_chunks(name):
                self._staging(name)  # created here, by the preparing process, not by several writers at once
            return arr
        rows = max(1, min(chunk_rows, shape[0]))
        per_shard = min(self.shard_chunks, -(-shape[0] // rows))
        if per_shard == 1:
            return self._create_array(name, shape, (rows, *shape[1:]), dtype)
        arr = self._create_array(name, shape, (rows, *shape[1:]), dtype, shards=(rows * per_shard, *shape[1:]))
        self._staging(name)
        return arr

    def _node(self, name: str) -> zarr.Array | zarr.Group:
        """The array or group ``name`` (``KeyError`` where there is none). On a local store an array's metadata file is
        read and parsed by the store itself as zarr reads it (``AsyncGroup.getitem``), without a round trip through
        zarr's event loop; a group, or a URL, through zarr."""
        store = self.group.store
        if not isinstance(store, DurableLocalStore) or self.group.metadata.consolidated_metadata is not None:
            return self.group[name]
        try:
            document = json.loads((store.root / name / "zarr.json").read_bytes())
        except (FileNotFoundError, NotADirectoryError) as err:
            raise KeyError(name) from err
        if not isinstance(document, dict) or document.get("node_type") != "array":
            return self.group[name]
        return self._opened(name, ArrayV3Metadata.from_dict(document))

    def _opened(self, name: str, metadata: ArrayV3Metadata) -> zarr.Array:
        """Array ``name`` of this store with these metadata, as zarr opens it (nothing read or written)."""
        return zarr.Array(zarr.AsyncArray(metadata, store_path=zarr.storage.StorePath(self.group.store, name)))

    def _create_array(
        self,
        name: str,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: str,
        shards: tuple[int, ...] | None = None,
    ) -> zarr.Array:
        """Create an uncompressed array, its parent groups first (zarr writes them concurrently
        otherwise, and a kill in between would leave an array without its parents' metadata).

        A plain array (``_plain``) is created by the store itself: the metadata files zarr would write (the array's
        from ``_array_metadata_template``, an empty group's for each missing parent), each durably, one after the
        other, without zarr's round trips through its event loop."""
        document = copy.deepcopy(_array_metadata_template(dtype, shards is not None))
        document["shape"] = list(shape)
        document["chunk_grid"]["configuration"]["chunk_shape"] = list(shards or chunks)
        if shards is not None:
            document["codecs"][0]["configuration"]["chunk_shape"] = list(chunks)
        metadata = ArrayV3Metadata.from_dict(document)
        arr = self._opened(name, metadata)
        parents = ["/".join(name.split("/")[:depth]) for depth in range(1, name.count("/") + 1)]
        with io_errors(self.path, f"array {name!r}"):
            if not self._plain(arr):
                for parent in parents:
                    self.group.require_group(parent)
                return self.group.create_array(
                    name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, compressors=None, fill_value=0
                )
            root = self.group.store.root  # type: ignore[attr-defined]
            if (root / name / "zarr.json").exists():
                raise zarr.errors.ContainsArrayError(f"An array exists in store {self.path!r} at path {name!r}.")
            for parent in parents:
                if not (root / parent / "zarr.json").exists():
                    self.write_group_metadata(parent)
            atomic_write_bytes(root / name / "zarr.json",
                               metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())  # fmt: skip
        self._arrays[name] = arr
        return arr

    def _forget(self, prefix: str) -> None:
        """Drop the opened arrays at or below ``prefix`` (and their progress and staged chunks)."""
        for key in list(self._arrays):
            if any(key == p or key.startswith(f"{p}/") for p in (prefix, f"progress/{prefix}", f"{STAGING}{prefix}")):
                del self._arrays[key]

    def _staging(self, name: str) -> zarr.Array:
        """Where the finished, not yet packed row chunks of sharded array ``name`` wait (one file each)."""
        key = f"{STAGING}{name}"
        if self.has(key):
            return self.array(key)
        arr = self.array(name)
        try:
            return self._create_array(key, tuple(arr.shape), tuple(arr.chunks), str(arr.dtype))
        except zarr.errors.ContainsArrayError:
            return self.array(key)  # another process created it in the meantime

    def chunks_per_shard(self, name: str) -> int:
        """Row chunks that share one file in array ``name`` (1 when it is not sharded)."""
        arr = self.array(name)
        return 1 if arr.shards is None else arr.shards[0] // arr.chunks[0]

    def delete(self, name: str) -> None:
        """Remove an array or group (and its progress entries and staged chunks) if present."""
        self._forget(name)
        for key in (name, f"progress/{name}", f"{STAGING}{name}"):
            if self.has(key):
                with io_errors(self.path, f"the deletion of {key!r}"):
                    del self.group[key]

    # -- progress of row-chunked writes ------------------------------------------------------

    def _progress(self, name: str, num_chunks: int) -> zarr.Array:
        key = f"progress/{name}"
        if self.has(key):
            return self.array(key)
        per_shard = self.chunks_per_shard(name)
        shards = (per_shard, 2) if per_shard > 1 else None  # a shard's entries share its writer, and one file
        return self._create_array(key, (num_chunks, 2), (1, 2), "uint32", shards=shards)

    def num_chunks(self, name: str) -> int:
        """Number of row chunks of array ``name``."""
        arr = self.array(name)
        return -(-arr.shape[0] // arr.chunks[0])

    def progress_entries(self, name: str) -> np.ndarray:
        """uint32 ``[chunks, 2]``: (state, crc32) of every row chunk (state ``WRITTEN`` or ``PACKED``
        once complete); an unreadable entry reads (0, 0)."""
        if self.group.store.read_only and not self.has(f"progress/{name}"):
            return np.zeros((self.num_chunks(name), 2), dtype=np.uint32)  # created, never written
        progress = self._progress(name, self.num_chunks(name))
        try:
            return self._read_rows(progress, 0, progress.shape[0])
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
        return [int(i) for i in np.flatnonzero(~is_done(self.progress_entries(name)))]

    def chunk_rows(self, name: str, chunk: int) -> tuple[int, int]:
        """``(start, stop)`` rows of row chunk ``chunk``."""
        arr = self.array(name)
        start = chunk * arr.chunks[0]
        return start, min(arr.shape[0], start + arr.chunks[0])

    def check_chunk(self, name: str, chunk: int, entry: np.ndarray) -> np.ndarray | str:
        """The rows of a complete chunk whose progress entry is ``entry`` (state, crc32), read from
        where the state says (its shard, or its staged copy), or why they cannot be trusted."""
        start, stop = self.chunk_rows(name, chunk)
        state, crc = int(entry[0]), int(entry[1])
        try:
            arr = self.array(name)
            holder = self.array(f"{STAGING}{name}") if state == WRITTEN and arr.shards is not None else arr
            if self._plain(holder):
                values = self._read_chunk_file(holder, chunk, stop)
            else:
                values = np.asarray(holder[start:stop])
        except Exception as err:
            return f"unreadable: {type(err).__name__}, truncated?"
        if crc32(values) != int(crc):
            return "its crc32 differs from the one recorded when it was written"
        return values

    def read_chunk(self, name: str, chunk: int) -> np.ndarray:
        """Row chunk ``chunk`` of array ``name``, checked against its crc32; refuses a damaged one."""
        try:
            entry = self._read_rows(self._progress(name, self.num_chunks(name)), chunk, chunk + 1)[0]
        except Exception:
            entry = np.zeros(2, dtype=np.uint32)  # an unreadable progress entry: the chunk counts as unwritten
        if not is_done(entry):
            raise StoreError(
                f"{name!r} in {self.path} is incomplete (an interrupted run?); re-run the command that writes it "
                "to finish it."
            )
        values = self.check_chunk(name, chunk, entry)
        if isinstance(values, str):
            start, stop = self.chunk_rows(name, chunk)
            raise StoreError(
                f"Chunk {chunk} (rows {start}–{stop - 1}) of {name!r} in {self.path} is damaged ({values}); run "
                f"`source-proj verify {self.path} --repair`, then re-run the command that wrote it to recompute it."
            )
        return values

    def mark_pending(self, name: str, chunks: list[int]) -> None:
        """Forget that these chunks were written, so the writing command recomputes them."""
        with io_errors(self.path, f"the progress entries of {name!r}"):
            for chunk in chunks:
                self._set_progress(name, slice(chunk, chunk + 1), np.zeros((1, 2), dtype=np.uint32))

    def _entries_per_file(self, name: str) -> int:
        """Progress entries of array ``name`` that share one file (those of one shard of its chunks)."""
        shards = self._progress(name, self.num_chunks(name)).shards
        return 1 if shards is None else int(shards[0])

    def unreadable_progress(self, name: str) -> list[int]:
        """The files of array ``name``'s progress entries that cannot be read (truncated, flipped): their
        entries read as unwritten, so their chunks are recomputed, but they must be rewritten whole
        ([`rewrite_progress`][source_proj.store.store.Store.rewrite_progress]) before any entry in them
        is written again, since zarr reads a shard's file to merge a write into it."""
        progress, per = self._progress(name, self.num_chunks(name)), self._entries_per_file(name)
        bad = []
        for file in range(-(-progress.shape[0] // per)):
            try:
                self._read_rows(progress, file * per, min(progress.shape[0], (file + 1) * per))
            except Exception:
                bad.append(file)
        return bad

    def rewrite_progress(self, name: str, files: Iterable[int]) -> None:
        """Rewrite these files of array ``name``'s progress entries from what can still be read of them
        (an unreadable entry becomes unwritten). Each file's entries belong to one writer (the
        chunks of one shard), so no other process writes them meanwhile."""
        progress, per = self._progress(name, self.num_chunks(name)), self._entries_per_file(name)
        entries = self.progress_entries(name)
        with io_errors(self.path, f"the progress entries of {name!r}"):
            for file in files:
                first, last = file * per, min(progress.shape[0], (file + 1) * per)
                sync(self.group.store.delete(f"{progress.path}/{progress.metadata.encode_chunk_key((file, 0))}"))
                self._write_rows(progress, first, last, entries[first:last])

    def _set_progress(self, name: str, rows: slice, values: np.ndarray) -> None:
        """Write progress entries ``rows`` of array ``name``; a damaged file of entries in the way is
        rewritten first from what can still be read of it."""
        progress = self._progress(name, self.num_chunks(name))
        try:
            self._write_rows(progress, rows.start, rows.stop, values)
        except OSError:
            raise
        except Exception:
            per = self._entries_per_file(name)
            files = range(rows.start // per, (rows.stop - 1) // per + 1)
            damaged = [f for f in self.unreadable_progress(name) if f in files]
            if not damaged:
                raise
            self.rewrite_progress(name, damaged)
            self._write_rows(progress, rows.start, rows.stop, values)

    def progress_arrays(self, prefix: str = "") -> list[str]:
        """Names of the row-chunked arrays (those with progress entries) under ``prefix``, sorted.

        Read from the storage listing, so an array whose progress metadata is unreadable is listed
        too (reading its entries then raises ``StoreError``); directories a killed writer left
        without metadata are not.
        """
        nodes = self.nodes("progress/")
        parents = {name.rsplit("/", 1)[0] for name in nodes}
        leaves = [name for name in nodes if name not in parents and name != "progress"]
        names = [name.removeprefix("progress/") for name in leaves if self.node_type(name) != "group"]
        return sorted(n for n in names if n.startswith(prefix))

    def _files(self) -> tuple[Any, str]:
        """The fsspec filesystem holding the store, and the store's root on it."""
        return objectstore.filesystem(str(local_path(self.path).resolve()) if not is_remote(self.path) else self.path)

    def nodes(self, prefix: str = "") -> list[str]:
        """Names of every array and group below ``prefix`` that has a metadata file (``zarr.json``),
        read from the storage listing (a node whose metadata is unreadable is listed too), sorted."""
        fs, root = self._files()
        try:
            keys = fs.find(f"{root}/{prefix}".rstrip("/"))
        except FileNotFoundError:
            return []
        suffix = "/zarr.json"
        names = {str(k)[len(root) + 1 : -len(suffix)] for k in keys if str(k).endswith(suffix)}
        return sorted(n for n in names if n and not n.startswith(LOCK_FILE))

    def node_type(self, name: str) -> str | None:
        """``"array"`` or ``"group"`` as a node's metadata says, or ``None`` if it is unreadable."""
        fs, root = self._files()
        try:
            meta = json.loads(fs.cat_file(f"{root}/{name}/zarr.json"))
        except (OSError, ValueError):
            return None
        kind = meta.get("node_type") if isinstance(meta, dict) else None
        return kind if kind in ("array", "group") else None

    def write_group_metadata(self, name: str) -> None:
        """Replace a group's metadata by that of an empty group (what every group below the root holds)."""
        data = GroupMetadata(zarr_format=3).to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
        with io_errors(self.path, f"the metadata of group {name!r}"):
            if is_remote(self.path):
                fs, root = self._files()
                fs.pipe_file(f"{root}/{name}/zarr.json", data)
            else:
                atomic_write_bytes(local_path(self.path) / name / "zarr.json", data)

    def damaged_chunks(self, name: str) -> dict[int, str]:
        """Chunks marked complete whose data no longer match their crc32: ``{chunk: reason}``."""
        damaged = {}
        for chunk, entry in enumerate(self.progress_entries(name)):
            if is_done(entry):
                values = self.check_chunk(name, chunk, entry)
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
                c for c in indices if is_done(entries[c]) and isinstance(self.check_chunk(name, c, entries[c]), str)
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
        """Write row chunk ``chunk`` of array ``name`` in full, then mark it complete (in a sharded
        array: the chunk that completes its shard is written there with the shard's staged chunks, any
        other is staged until then)."""
        arr = self.array(name)
        rows = arr.chunks[0]
        start = chunk * rows
        stop = min(arr.shape[0], start + rows)
        values = np.ascontiguousarray(values, dtype=arr.dtype)
        if values.shape != (stop - start, *arr.shape[1:]):
            raise ValueError(
                f"chunk {chunk} of {name} needs shape {(stop - start, *arr.shape[1:])}, got {values.shape}"
            )
        self._progress(name, -(-arr.shape[0] // rows))
        shard = None if arr.shards is None else chunk // self.chunks_per_shard(name)
        if shard is not None and self._pack_shard(name, shard, finished=(chunk, values)):
            return
        target = arr if arr.shards is None else self._staging(name)
        with io_errors(self.path, f"chunk {chunk} of {name!r}"):
            if self._plain(target):
                self._write_chunk_file(target, chunk, values)
            else:
                target[start:stop] = values
            entry = np.array([[WRITTEN, crc32(values)]], dtype=np.uint32)
            self._set_progress(name, slice(chunk, chunk + 1), entry)
        if shard is not None:
            self._pack_shard(name, shard)  # complete now if its entries were unreadable before (rewritten since)

    def _pack_shard(self, name: str, shard: int, finished: tuple[int, np.ndarray] | None = None) -> bool:
        """Write shard ``shard`` of sharded array ``name`` in one piece once all its chunks are complete,
        mark them packed and delete their staged copies; returns whether it is packed now. ``finished``:
        ``(chunk, rows)`` of a chunk of the shard just computed and not written yet, which completes it
        when every other chunk of it is complete: its rows then go straight into the shard, never staged
        (a kill before its entry is written leaves it unwritten, recomputed)."""
        arr, per_shard, num_chunks = self.array(name), self.chunks_per_shard(name), self.num_chunks(name)
        first, last = shard * per_shard, min(num_chunks, (shard + 1) * per_shard)
        try:
            entries = self._read_rows(self._progress(name, num_chunks), first, last)
        except Exception:  # damaged entries count as unwritten: their chunks are written again first
            return False
        done, crcs = is_done(entries), entries[:, 1].copy()
        if finished is not None:
            done[finished[0] - first], crcs[finished[0] - first] = True, crc32(finished[1])
        if not done.all():
            return False
        if finished is None and (entries[:, 0] == PACKED).all():
            return True
        chunks = [
            finished[1] if finished is not None and chunk == finished[0] else self.read_chunk(name, chunk)
            for chunk in range(first, last)
        ]
        start, stop = self.chunk_rows(name, first)[0], self.chunk_rows(name, last - 1)[1]
        with io_errors(self.path, f"shard {shard} of {name!r}"):
            try:
                if not self._write_shard_file(arr, shard, chunks):
                    arr[start:stop] = np.concatenate(chunks)
            except ValueError:  # zarr merges a partial (last) shard into the old file, which is damaged: drop it
                key = f"{arr.path}/{arr.metadata.encode_chunk_key((shard, *[0] * (arr.ndim - 1)))}"
                sync(self.group.store.delete(key))
                arr[start:stop] = np.concatenate(chunks)
            packed = np.column_stack([np.full(last - first, PACKED, dtype=np.uint32), crcs])
            self._set_progress(name, slice(first, last), packed)
            for chunk in range(first, last):
                if entries[chunk - first, 0] == WRITTEN:
                    staged = self._staging(name)
                    key = staged.metadata.encode_chunk_key((chunk, *[0] * (arr.ndim - 1)))
                    self._delete_file(f"{staged.path}/{key}")
        return True

    def _plain(self, arr: zarr.Array) -> bool:
        """Whether ``arr`` is on a local disk in the layout this store creates, whose chunk files the store reads and
        writes itself (``_write_chunk_file``, ``_read_chunk_file``, ``_write_shard_file``) in zarr's own encoding:
        row chunks of whole rows, uncompressed (zarr's ``bytes`` codec, little-endian), fill value 0 and empty chunks
        not stored; sharded, with zarr's default index (little-endian uint64 offsets and lengths, crc32c, at the end).
        Anything else (a URL, another zarr layout) is read and written through zarr."""
        codecs = arr.metadata.codecs
        if not isinstance(self.group.store, DurableLocalStore) or len(codecs) != 1:
            return False
        codec, rows = codecs[0], arr.chunks
        if type(codec).__name__ == "ShardingCodec":
            inner = codec.codecs  # type: ignore[attr-defined]
            if (
                len(inner) != 1
                or [type(c).__name__ for c in codec.index_codecs] != ["BytesCodec", "Crc32cCodec"]  # type: ignore[attr-defined]
                or getattr(codec.index_location, "value", None) != "end"  # type: ignore[attr-defined]
            ):
                return False
            codec = inner[0]
        return (
            type(codec).__name__ == "BytesCodec"
            and getattr(codec.endian, "value", "little") == "little"  # type: ignore[attr-defined]
            and tuple(rows[1:]) == tuple(arr.shape[1:])
            and arr.dtype.byteorder != ">"
            and arr.dtype.kind in "fiu"
            and np.asarray(arr.metadata.fill_value).item() == 0
            and not getattr(getattr(arr.async_array, "config", None), "write_empty_chunks", True)
            and 0 not in arr.shape
        )

    def _delete_file(self, key: str) -> None:
        """Delete the file of chunk or shard ``key`` (durably): on a local disk by the store itself, else through
        zarr."""
        if isinstance(self.group.store, DurableLocalStore):
            self.group.store.delete_file(key)
        else:
            sync(self.group.store.delete(key))

    def _chunk_key(self, arr: zarr.Array, index: int) -> str:
        return f"{arr.path}/{arr.metadata.encode_chunk_key((index, *[0] * (arr.ndim - 1)))}"

    @staticmethod
    def _chunk_bytes(values: np.ndarray, rows: int, dtype: np.dtype) -> memoryview | None:
        """A row chunk's bytes as zarr stores them (padded with zeros to ``rows`` rows at the array's edge), or
        ``None`` where it is all the fill value 0, bit for bit (-0.0 is not), which zarr does not store."""
        block = np.ascontiguousarray(values, dtype=dtype)
        if not np.frombuffer(memoryview(block.reshape(-1)).cast("B"), dtype=np.uint8).any():
            return None
        if block.shape[0] < rows:
            block = np.concatenate([block, np.zeros((rows - block.shape[0], *block.shape[1:]), block.dtype)])
        return memoryview(block.reshape(-1)).cast("B")

    def _write_chunk_file(self, arr: zarr.Array, chunk: int, values: np.ndarray) -> None:
        """Row chunk ``chunk`` of an unsharded plain array (``_plain``), written durably as zarr writes it."""
        key, data = self._chunk_key(arr, chunk), self._chunk_bytes(values, arr.chunks[0], arr.dtype)
        if data is None:
            self._delete_file(key)
        else:
            atomic_write_bytes(self.group.store.root / key, data)  # type: ignore[attr-defined]

    def _read_chunk_file(self, arr: zarr.Array, chunk: int, stop: int) -> np.ndarray:
        """Rows ``chunk · rows`` to ``stop`` of a plain array (``_plain``), as zarr reads them: from the chunk's own
        file, or from its shard's file through the shard's index (whose crc32c is checked, as zarr checks it). A
        chunk not stored reads as zeros; a file of the wrong size, or an index that does not check, is unreadable."""
        rows, tail = arr.chunks[0], tuple(arr.shape[1:])
        nbytes = rows * int(np.prod(tail, dtype=np.int64)) * arr.dtype.itemsize
        zeros = np.zeros((stop - chunk * rows, *tail), dtype=arr.dtype)
        if arr.shards is None:
            path, offset = self.group.store.root / self._chunk_key(arr, chunk), 0  # type: ignore[attr-defined]
            if not path.exists():
                return zeros  # all zeros: not stored
            if path.stat().st_size != nbytes:
                raise ValueError(f"{path.stat().st_size} bytes where the chunk holds {nbytes}")
        else:
            per = arr.shards[0] // rows
            path = self.group.store.root / self._chunk_key(arr, chunk // per)  # type: ignore[attr-defined]
            if not path.exists():
                return zeros  # a shard of zeros: not stored
            with path.open("rb") as f:
                f.seek(-(16 * per + 4), 2)
                table = f.read(16 * per + 4)
            offset = self._inner_offset(table, chunk % per, nbytes, path.stat().st_size)
            if offset is None:
                return zeros  # all zeros: not stored
        values = np.fromfile(path, dtype=arr.dtype, count=nbytes // arr.dtype.itemsize, offset=offset)
        if values.nbytes != nbytes:
            raise ValueError(f"{values.nbytes} bytes where the chunk holds {nbytes}")
        return values.reshape(rows, *tail)[: stop - chunk * rows]

    @staticmethod
    def _inner_offset(table: bytes, inner: int, nbytes: int, size: int) -> int | None:
        """Where inner chunk ``inner`` (of ``nbytes`` bytes) starts in a shard file of ``size`` bytes whose index (and
        its crc32c) is ``table``, or ``None`` where it is not stored; raises ``ValueError`` where the index does not
        check or places the chunk elsewhere than in the file's data."""
        if len(table) < 20 or google_crc32c.value(table[:-4]).to_bytes(4, "little") != table[-4:]:
            raise ValueError("the shard's index fails its crc32c")
        offset, length = (int(v) for v in np.frombuffer(table[:-4], dtype="<u8").reshape(-1, 2)[inner])
        if offset == length == np.iinfo(np.uint64).max:
            return None
        if length != nbytes or offset + length > size - len(table):
            raise ValueError(f"the shard's index places the chunk at {offset}:+{length}, not a chunk of {nbytes}")
        return offset

    def _read_shard_file(self, arr: zarr.Array, shard: int) -> np.ndarray:
        """Every row of shard ``shard`` of a plain sharded array (``_plain``) within the array, read from its file in
        one piece as ``_read_chunk_file`` reads one of its chunks (a chunk not stored reads as zeros)."""
        rows, tail, per = arr.chunks[0], tuple(arr.shape[1:]), arr.shards[0] // arr.chunks[0]
        nbytes = rows * int(np.prod(tail, dtype=np.int64)) * arr.dtype.itemsize
        values = np.zeros((per * rows, *tail), dtype=arr.dtype)
        path = self.group.store.root / self._chunk_key(arr, shard)  # type: ignore[attr-defined]
        data = path.read_bytes() if path.exists() else b""
        for inner in range(per) if data else ():
            offset = self._inner_offset(data[-(16 * per + 4) :], inner, nbytes, len(data))
            if offset is not None:
                chunk = np.frombuffer(data, dtype=arr.dtype, count=nbytes // arr.dtype.itemsize, offset=offset)
                values[inner * rows : (inner + 1) * rows] = chunk.reshape(rows, *tail)
        return values[: min(arr.shape[0], (shard + 1) * per * rows) - shard * per * rows]

    def _read_rows(self, arr: zarr.Array, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``arr``, read by the store from the files that hold them where the array is plain
        (``_plain``: each file read once), else through zarr."""
        if not self._plain(arr):
            return np.asarray(arr[start:stop])
        size = arr.chunks[0] if arr.shards is None else arr.shards[0]  # rows per file
        first = start // size
        files = [self._read_file(arr, file) for file in range(first, max(first + 1, -(-stop // size)))]
        return np.concatenate(files)[start - first * size : stop - first * size]

    def _read_file(self, arr: zarr.Array, file: int) -> np.ndarray:
        """The rows of a plain array's chunk file or shard file ``file`` (chunk ``file``, or shard ``file``)."""
        if arr.shards is None:
            return self._read_chunk_file(arr, file, min(arr.shape[0], (file + 1) * arr.chunks[0]))
        return self._read_shard_file(arr, file)

    def _write_rows(self, arr: zarr.Array, start: int, stop: int, values: np.ndarray) -> None:
        """Write rows ``start:stop`` of ``arr``: where it is plain (``_plain``), the store rewrites each file holding
        them whole (merged with the rows it already holds, read first, as zarr merges a partial write), each durably;
        else through zarr."""
        if not self._plain(arr):
            arr[start:stop] = values
            return
        size = arr.chunks[0] if arr.shards is None else arr.shards[0]  # rows per file
        for file in range(start // size, -(-stop // size)):
            lo, hi = file * size, min(arr.shape[0], (file + 1) * size)
            if start <= lo and hi <= stop:
                rows = np.asarray(values[lo - start : hi - start], dtype=arr.dtype)
            else:
                rows = self._read_file(arr, file)
                rows[max(lo, start) - lo : min(hi, stop) - lo] = values[max(lo, start) - start : min(hi, stop) - start]
            if arr.shards is None:
                self._write_chunk_file(arr, file, rows)
            else:
                inner = arr.chunks[0]
                self._write_shard_file(arr, file, [rows[i : i + inner] for i in range(0, hi - lo, inner)])

    def _write_shard_file(self, arr: zarr.Array, shard: int, chunks: list[np.ndarray]) -> bool:
        """Write shard ``shard`` of ``arr`` (all its row chunks, in order) as one durable file on a local store, encoded
        as zarr's sharding codec encodes it (the same bytes: ``tests/test_store_shards.py``) without its copies;
        returns ``False``, writing nothing, where the array is not plain (``_plain``; zarr then writes it).

        The layout (zarr v3 ``sharding_indexed``, index at the end): each stored inner chunk's bytes (full chunk
        shape, an edge chunk padded with the fill value), then for every inner chunk its (offset, length) as
        little-endian uint64 (2⁶⁴ − 1 twice for one not stored: beyond the array, or all fill value, as zarr skips
        those), then the crc32c of that index. A shard with no stored chunk is deleted, as zarr does."""
        if arr.shards is None or not self._plain(arr):
            return False
        rows, per = arr.chunks[0], arr.shards[0] // arr.chunks[0]
        parts, index, offset = [], np.full((per, 2), np.iinfo(np.uint64).max, dtype="<u8"), 0
        for inner, values in enumerate(chunks):  # those beyond the array's last row are not stored
            data = self._chunk_bytes(values, rows, arr.dtype)
            if data is None:
                continue
            parts.append(data)
            index[inner] = (offset, data.nbytes)
            offset += data.nbytes
        key = self._chunk_key(arr, shard)
        if not parts:
            self._delete_file(key)
            return True
        table = index.tobytes()
        atomic_write_bytes(self.group.store.root / key,  # type: ignore[attr-defined]
                           [*parts, table, google_crc32c.value(table).to_bytes(4, "little")])  # fmt: skip
        return True

    def pack(self, name: str, *, drop_staging: bool = True) -> bool:
        """Pack every complete shard of array ``name`` (a kill can leave one unpacked) and, once all are
        packed, delete its staged chunks (and, with ``drop_staging``, the staging group when it is empty: a caller
        packing many arrays passes ``False`` and calls ``drop_empty_staging`` once, which reads every staged node);
        returns whether the array is entirely packed. Unsharded arrays: no-op."""
        if self.array(name).shards is None:
            return True
        shards = -(-self.num_chunks(name) // self.chunks_per_shard(name))
        packed = all([self._pack_shard(name, shard) for shard in range(shards)])
        if packed:
            self._drop_keys(f"{STAGING}{name}")
            if drop_staging:
                self.drop_empty_staging()
        return packed

    def staged_arrays(self) -> set[str]:
        """Names of the arrays that have staged chunks (finished, not yet packed into their shards)."""
        return {name.removeprefix(STAGING) for name in self.nodes(STAGING)}

    def drop_empty_staging(self) -> None:
        """Delete the staging group once no array has staged chunks (a kill can leave it empty)."""
        root = STAGING.rstrip("/")
        staged = self.has(root) and self.group[root].members(max_depth=None)
        if not any(isinstance(node, zarr.Array) for _, node in staged or ()):
            self._drop_keys(root)

    def _drop_keys(self, prefix: str) -> None:
        """Delete every key below ``prefix``: an array or group, whole or as a killed deletion left it."""
        store = self.group.store

        async def listed() -> bool:
            async for _ in store.list_prefix(f"{prefix}/"):
                return True
            return False

        present = (store.root / prefix).is_dir() if isinstance(store, DurableLocalStore) else sync(listed())
        if present:
            self._forget(prefix)
            with io_errors(self.path, f"the deletion of {prefix!r}"):
                sync(store.delete_dir(prefix))

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

    def check_readable(self, name: str) -> None:
        """Read every chunk of a complete array through its crc check, keeping none: an incomplete or damaged
        array raises the StoreError that reading it would."""
        collections.deque(self.iter_chunks(name), maxlen=0)

    def read(self, name: str) -> np.ndarray:
        """A complete array, whole (crc-checked)."""
        return np.concatenate([rows for _, rows in self.iter_chunks(name)])

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of an array, read through their complete, crc-checked chunks."""
        rows = self.array(name).chunks[0]
        first, last = start // rows, -(-stop // rows)
        values = np.concatenate([self.read_chunk(name, chunk) for chunk in range(first, max(first + 1, last))])
        return values[start - first * rows : stop - first * rows]

    def write_whole(self, name: str, values: np.ndarray) -> None:
        """Write a small array in one piece (one chunk) and mark it complete."""
        self.delete(name)
        self.require_array(name, tuple(values.shape), max(1, values.shape[0]), str(values.dtype))
        self.write_chunk(name, 0, values)


@functools.cache
def _array_metadata_template(dtype: str, sharded: bool) -> dict[str, Any]:
    """The metadata document zarr creates for an uncompressed array of ``dtype`` with fill value 0, in shards or not,
    for a placeholder shape (made by zarr in memory, once): ``Store._create_array`` puts its shape and chunks in a
    copy."""
    shards = (2, 1) if sharded else None
    template = zarr.create_array(zarr.storage.MemoryStore(), shape=(2, 1), chunks=(1, 1), shards=shards, dtype=dtype,
                                 compressors=None, fill_value=0)  # fmt: skip
    return template.metadata.to_dict()


def crc32(values: np.ndarray) -> int:
    """The crc32 of an array's bytes in C order (``values.tobytes()``'s, without that copy)."""
    contiguous = np.ascontiguousarray(values)
    return zlib.crc32(memoryview(contiguous.reshape(-1)).cast("B")) if contiguous.size else zlib.crc32(b"")


def is_done(entries: np.ndarray) -> np.ndarray:
    """Whether progress entries (``[..., 2]``) mark their chunks complete (written or packed)."""
    return np.isin(np.asarray(entries)[..., 0], _DONE)


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
