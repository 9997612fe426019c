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
touch the same file.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import StoreError

FORMAT = "source-proj-store"
FORMAT_VERSION = 1


def ckpt_key(step: int) -> str:
    """Array name of a checkpoint inside the store."""
    return f"step-{step:08d}"


class Store:
    """A feature store on disk (any zarr v3 store path)."""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = str(path)
        self.group = group

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any], *, overwrite: bool = False) -> Store:
        """Create a new store; an existing one is refused unless ``overwrite``."""
        if _exists(path) and not overwrite:
            raise StoreError(
                f"A store already exists at {path}; pass --force (overwrite=True) to replace it, "
                "or choose another path."
            )
        group = zarr.open_group(str(path), mode="w")
        group.attrs["source_proj"] = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        return cls(path, group)

    @classmethod
    def open(cls, path: str | Path, *, writable: bool = False) -> Store:
        """Open an existing store, checking that this library can read it."""
        if not _exists(path):
            raise StoreError(f"No store at {path}; create one with `source-proj featurize` (source_proj.featurize).")
        try:
            group = zarr.open_group(str(path), mode="r+" if writable else "r")
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
                f"{path} was written in store format {meta.get('format_version')} but this library reads format "
                f"{FORMAT_VERSION}; re-create it with `source-proj featurize --force`."
            )
        return cls(path, group)

    @property
    def meta(self) -> dict[str, Any]:
        """The store's self-description (a copy): params, projection, task, trajectory, methods."""
        return dict(self.group.attrs["source_proj"])

    def update_meta(self, **fields: Any) -> None:
        """Replace top-level metadata fields."""
        meta = self.meta
        meta.update(fields)
        self.group.attrs["source_proj"] = meta

    def has(self, name: str) -> bool:
        try:
            self.group[name]
        except KeyError:
            return False
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
        return self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=None, fill_value=0)

    def delete(self, name: str) -> None:
        """Remove an array or group (and its progress entries) if present."""
        for key in (name, f"progress/{name}"):
            if self.has(key):
                del self.group[key]

    # -- progress of row-chunked writes ------------------------------------------------------

    def _progress(self, name: str, num_chunks: int) -> zarr.Array:
        key = f"progress/{name}"
        if self.has(key):
            return self.array(key)
        return self.group.create_array(
            key, shape=(num_chunks, 2), chunks=(1, 2), dtype="uint32", compressors=None, fill_value=0
        )

    def pending_chunks(self, name: str) -> list[int]:
        """Row chunks of array ``name`` not yet marked complete."""
        arr = self.array(name)
        num_chunks = -(-arr.shape[0] // arr.chunks[0])
        done = self._progress(name, num_chunks)[:, 0]
        return [int(i) for i in np.flatnonzero(done == 0)]

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
        arr[start:stop] = values
        num_chunks = -(-arr.shape[0] // rows)
        self._progress(name, num_chunks)[chunk] = np.array([1, zlib.crc32(values.tobytes())], dtype=np.uint32)

    def is_complete(self, name: str) -> bool:
        return self.has(name) and not self.pending_chunks(name)

    def iter_chunks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, rows)`` for every row chunk of a complete array, in order."""
        if self.pending_chunks(name):
            raise StoreError(
                f"{name!r} in {self.path} is incomplete (an interrupted run?); re-run the command that writes it "
                "to finish it."
            )
        arr = self.array(name)
        rows = arr.chunks[0]
        for start in range(0, arr.shape[0], rows):
            yield start, np.asarray(arr[start : start + rows])

    def read(self, name: str) -> np.ndarray:
        """A complete array, whole."""
        if self.pending_chunks(name):
            raise StoreError(f"{name!r} in {self.path} is incomplete; re-run the command that writes it to finish it.")
        return np.asarray(self.array(name)[...])

    def write_whole(self, name: str, values: np.ndarray) -> None:
        """Write a small array in one piece (one chunk) and mark it complete."""
        self.delete(name)
        self.require_array(name, tuple(values.shape), max(1, values.shape[0]), str(values.dtype))
        self.write_chunk(name, 0, values)


def _exists(path: str | Path) -> bool:
    return (Path(path) / "zarr.json").exists()
