"""Sharded store arrays (zarr v3 shards): the same values as one file per chunk, a few files instead
of many, every chunk readable whatever step of a shard's packing a kill interrupts, damage found
and recomputed, format-1 stores still read, and distributed writers split at shard boundaries."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr

import source_proj as sp
import source_proj.store.store as store_module
from source_proj.distributed import Shard
from source_proj.store.store import PACKED, STAGING, WRITTEN, Store, is_done
from source_proj.store.verify import verify_store

ROWS, WIDTH, CHUNK = 29, 5, 3  # 10 row chunks, the last one short
NAME = "grads/main/step-00000001"


def _values(chunk: int, start: int, stop: int) -> np.ndarray:
    return np.random.default_rng(chunk).normal(size=(stop - start, WIDTH)).astype(np.float32)


def _store(path: Path, shard_chunks: int | None, rows: int = ROWS) -> Store:
    meta = {} if shard_chunks is None else {"layout": {"shard_chunks": shard_chunks}}
    store = Store.create(path, meta)
    store.require_array(NAME, (rows, WIDTH), CHUNK, "float32")
    store.pending_chunks(NAME)  # creates the progress entries, as the writers' preparation does
    return store


def _write(store: Store, chunks: list[int]) -> None:
    for chunk in chunks:
        store.write_chunk(NAME, chunk, _values(chunk, *store.chunk_rows(NAME, chunk)))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _count(directory: Path) -> int:
    """Files under ``directory`` besides zarr's metadata."""
    return sum(1 for p in directory.rglob("*") if p.is_file() and p.name != "zarr.json")


def _expected() -> np.ndarray:
    return np.concatenate([_values(c, c * CHUNK, min(ROWS, (c + 1) * CHUNK)) for c in range(10)])


def test_a_sharded_array_holds_the_same_rows_in_a_file_per_shard(tmp_path: Path) -> None:
    sharded, plain = _store(tmp_path / "sharded.sp", 4), _store(tmp_path / "plain.sp", None)
    order = list(range(10))
    random.Random(0).shuffle(order)
    for done, chunk in enumerate(order, start=1):
        _write(sharded, [chunk])
        _write(plain, [chunk])
        assert sharded.pending_chunks(NAME) == sorted(order[done:])
        for finished in order[:done]:  # staged or packed, every finished chunk reads back exactly
            np.testing.assert_array_equal(sharded.read_chunk(NAME, finished), plain.read_chunk(NAME, finished))
    np.testing.assert_array_equal(sharded.read(NAME), _expected())
    np.testing.assert_array_equal(sharded.read_rows(NAME, 4, 23), _expected()[4:23])
    # Every shard was packed by the write that completed it: 3 shard files (4 + 4 + 2 chunks) and
    # 3 files of progress entries, against 10 + 10 files without shards.
    assert (sharded.progress_entries(NAME)[:, 0] == PACKED).all()
    assert sharded.chunks_per_shard(NAME) == 4
    assert _count(tmp_path / "sharded.sp" / NAME) == _count(tmp_path / "sharded.sp/progress" / NAME) == 3
    assert _count(tmp_path / "plain.sp" / NAME) == _count(tmp_path / "plain.sp/progress" / NAME) == 10
    assert _count(tmp_path / "sharded.sp" / "staging") == 0
    assert sharded.pack(NAME) and not (tmp_path / "sharded.sp" / "staging").exists()


@pytest.mark.parametrize(
    ("rows", "tail", "chunk", "per", "zero", "negative"),
    [
        (29, (5,), 3, 4, [], []),  # the last shard partial, its last chunk short, an inner chunk beyond the array
        (24, (5,), 3, 4, [1, 5], []),  # whole shards; chunks of the fill value 0.0, which zarr does not store
        (24, (5,), 3, 4, [], [0, 2]),  # chunks of -0.0, which zarr stores (not the fill value bit for bit)
        (12, (2, 3), 4, 3, [0, 1, 2], []),  # rows of 2 × 3; a shard of zeros only, which zarr does not write
        (7, (), 2, 8, [], []),  # one-dimensional, one partial shard
        (29, (5,), 3, 1, [2], [4]),  # a file per chunk (format 1's layout): the last chunk short
    ],
)
def test_chunk_and_shard_files_are_written_and_read_as_zarr_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: int, tail: tuple[int, ...], chunk: int, per: int,
    zero: list[int], negative: list[int],
) -> None:
    """The chunk and shard files the store writes and reads itself (``Store._plain``: staged chunks, chunks of an
    unsharded array, whole shards) hold zarr's own bytes for every layout of rows and chunks: every file of the store
    is the same as when zarr writes them, and each reads back the same through zarr and through the store."""
    def fill(path: Path) -> Store:
        store = Store.create(path, {"layout": {"shard_chunks": per}})
        store.require_array(NAME, (rows, *tail), chunk, "float32")
        store.pending_chunks(NAME)
        for c in range(store.num_chunks(NAME)):
            start, stop = store.chunk_rows(NAME, c)
            values = np.random.default_rng(c).normal(size=(stop - start, *tail)).astype(np.float32)
            if c in zero or c in negative:
                values = np.zeros_like(values) * (-1.0 if c in negative else 1.0)
            store.write_chunk(NAME, c, values)
            if c == 1:  # staged (or in its own file), read back by the store
                np.testing.assert_array_equal(store.read_chunk(NAME, c), values)
        assert store.pack(NAME) and is_done(store.progress_entries(NAME)).all()
        return store

    own = []
    plain = Store._plain
    monkeypatch.setattr(Store, "_plain", lambda self, arr: own.append(plain(self, arr)) or own[-1])
    fill(tmp_path / "own.sp")
    monkeypatch.setattr(Store, "_plain", lambda self, arr: False)  # zarr writes and reads every chunk
    fill(tmp_path / "zarr.sp")
    assert any(own)
    mine, theirs = _files(tmp_path / "own.sp"), _files(tmp_path / "zarr.sp")
    assert sorted(mine) == sorted(theirs) and any(f"{NAME}/c/" in k for k in mine)
    for key in mine:
        assert mine[key] == theirs[key], key
    through_zarr = Store.open(tmp_path / "own.sp").read(NAME)
    monkeypatch.setattr(Store, "_plain", plain)
    got = Store.open(tmp_path / "own.sp").read(NAME)
    np.testing.assert_array_equal(got, through_zarr)
    np.testing.assert_array_equal(got, Store.open(tmp_path / "zarr.sp").read(NAME))
    assert all(np.signbit(got[c * chunk]).all() for c in negative)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "uint8", "uint32", "int64"])
def test_the_store_creates_arrays_with_the_metadata_zarr_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """A plain array's metadata, its progress entries', its staging array's and its parent groups' are written by the
    store itself (``Store._create_array``): the same files as zarr's, opened as zarr opens them."""
    def create(path: Path) -> Store:
        store = Store.create(path, {"layout": {"shard_chunks": 2}})
        store.require_array("a/b/sharded", (5, 3), 2, dtype)  # in shards of two chunks: staged too
        store.require_array("a/one", (4,), 4, dtype)  # one chunk: not sharded
        for name in ("a/b/sharded", "a/one"):
            store.pending_chunks(name)
        return store

    own = []
    plain = Store._plain
    monkeypatch.setattr(Store, "_plain", lambda self, arr: own.append(plain(self, arr)) or own[-1])
    create(tmp_path / "own.sp")
    monkeypatch.setattr(Store, "_plain", lambda self, arr: False)  # zarr creates every array
    create(tmp_path / "zarr.sp")
    monkeypatch.setattr(Store, "_plain", plain)
    assert all(own) and len(own) >= 5
    assert _files(tmp_path / "own.sp") == _files(tmp_path / "zarr.sp")
    opened = Store.open(tmp_path / "own.sp")
    for name in ("a/b/sharded", "a/one", "progress/a/b/sharded", f"{STAGING}a/b/sharded"):
        assert opened.array(name).metadata == opened.group[name].metadata  # read by the store, and by zarr


class _Killed(BaseException):
    pass


def test_a_kill_at_any_write_of_a_shards_packing_loses_no_chunk(tmp_path: Path, monkeypatch) -> None:
    """Kill the write that completes a shard at each of its zarr writes in turn: afterwards every chunk
    is either pending or reads back exactly, and finishing the work gives the uninterrupted store's bytes."""
    reference = _store(tmp_path / "reference.sp", 4, rows=12)  # one shard of 4 chunks
    _write(reference, list(range(4)))
    reference.pack(NAME)
    original, original_file = zarr.Array.__setitem__, store_module.atomic_write_bytes
    kill = 0
    while True:
        path = tmp_path / f"killed-{kill}.sp"
        store = _store(path, 4, rows=12)
        _write(store, [1, 2, 3])
        writes = {"count": 0}

        def killing(write, writes=writes, kill=kill):
            def counted(*args):
                if writes["count"] == kill:
                    raise _Killed
                writes["count"] += 1
                write(*args)

            return counted

        # zarr's writes, and the shard file the store writes itself (``Store._write_shard_file``)
        monkeypatch.setattr(zarr.Array, "__setitem__", killing(original))
        monkeypatch.setattr(store_module, "atomic_write_bytes", killing(original_file))
        try:
            _write(store, [0])  # completes shard 0: the shard (chunk 0 never staged), the entries (then deletions)
            finished = True
        except _Killed:
            finished = False
        monkeypatch.setattr(zarr.Array, "__setitem__", original)
        monkeypatch.setattr(store_module, "atomic_write_bytes", original_file)
        reopened = Store.open(path, writable=True)
        assert reopened.heal(NAME) == []
        for chunk in range(4):
            if chunk not in reopened.pending_chunks(NAME):
                expected = _values(chunk, *reopened.chunk_rows(NAME, chunk))
                np.testing.assert_array_equal(reopened.read_chunk(NAME, chunk), expected)
        _write(reopened, reopened.pending_chunks(NAME))
        reopened.pack(NAME)
        assert _files(path) == _files(tmp_path / "reference.sp"), f"killed at write {kill}"
        if finished:
            break
        kill += 1
    assert kill == 2  # every write of the packing was interrupted once


def test_a_damaged_shard_is_found_and_its_chunks_recomputed(tmp_path: Path) -> None:
    reference = _store(tmp_path / "reference.sp", 4)
    _write(reference, list(range(10)))
    reference.pack(NAME)
    for shard in (1, 2):  # a middle shard and the short last one (zarr merges into a partial shard file)
        path = tmp_path / f"damaged-{shard}.sp"
        store = _store(path, 4)
        _write(store, list(range(10)))
        (path / NAME / "c" / str(shard) / "0").write_bytes(b"garbage")
        chunks = list(range(4 * shard, min(10, 4 * shard + 4)))
        assert sorted(store.damaged_chunks(NAME)) == chunks
        with pytest.raises(sp.StoreError, match=rf"Chunk {chunks[0]} \(rows .*\) of '{NAME}' .* is damaged"):
            store.read(NAME)
        with pytest.warns(UserWarning, match=f"{len(chunks)} chunk"):
            assert store.heal(NAME) == [(NAME, c) for c in chunks]
        assert store.pending_chunks(NAME) == chunks
        _write(store, chunks)
        np.testing.assert_array_equal(store.read(NAME), _expected())
        store.pack(NAME)
        assert _files(path) == _files(tmp_path / "reference.sp")


@pytest.mark.parametrize("cut", [5, 40])
@pytest.mark.parametrize("shard", [1, 2])
def test_a_damaged_file_of_progress_entries_makes_its_chunks_unwritten_and_is_rewritten(
    tmp_path: Path, shard: int, cut: int
) -> None:
    reference = _store(tmp_path / "reference.sp", 4)
    _write(reference, list(range(10)))
    reference.pack(NAME)
    path = tmp_path / "damaged.sp"
    store = _store(path, 4)
    _write(store, list(range(10)))
    entries = path / "progress" / NAME / "c" / str(shard) / "0"
    entries.write_bytes(entries.read_bytes()[:cut])  # truncated: zarr cannot read any entry of the shard
    chunks = list(range(4 * shard, min(10, 4 * shard + 4)))
    store = Store.open(path, writable=True)
    assert store.unreadable_progress(NAME) == [shard]
    assert store.pending_chunks(NAME) == chunks  # unreadable entries: never trusted, recomputed
    # A writer resuming without verify: its first entry in the damaged file rewrites the file first
    # (zarr would read the damaged file to merge one entry into it).
    _write(store, chunks)
    assert store.unreadable_progress(NAME) == []
    np.testing.assert_array_equal(store.read(NAME), _expected())
    store.pack(NAME)
    assert _files(path) == _files(tmp_path / "reference.sp")


def test_verify_repair_rewrites_damaged_progress_entries(tmp_path: Path) -> None:
    path = tmp_path / "damaged.sp"
    _write(_store(path, 4), list(range(10)))
    entries = path / "progress" / NAME / "c" / "1" / "0"
    entries.write_bytes(entries.read_bytes()[:7])
    report = verify_store(path, progress=False)
    assert any("progress entries" in p and NAME in p for p in report.problems) and report.pending == 4
    report = verify_store(path, repair=True, progress=False)
    assert any("rewrote the damaged progress entries" in r for r in report.repaired)
    store = Store.open(path)
    assert store.unreadable_progress(NAME) == [] and store.pending_chunks(NAME) == [4, 5, 6, 7]


def test_a_format_1_store_is_read_and_resumed_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "old.sp"
    store = _store(path, None)
    _write(store, [0, 1, 2])
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["source_proj"]["format_version"] = 1
    (path / "zarr.json").write_text(json.dumps(root))
    old = Store.open(path, writable=True)
    assert old.shard_chunks == 1 and old.chunks_per_shard(NAME) == 1
    _write(old, list(range(3, 10)))
    np.testing.assert_array_equal(old.read(NAME), _expected())
    entries = old.progress_entries(NAME)
    assert (entries[:, 0] == WRITTEN).all()  # as format 1 wrote them: no packing, no staging
    crcs = [zlib.crc32(_values(c, *old.chunk_rows(NAME, c)).tobytes()) for c in range(10)]
    assert [int(e[1]) for e in entries] == crcs
    assert not (path / STAGING).exists() and _count(path / NAME) == 10


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_ranks_split_work_at_shard_boundaries_and_partition_it(world: int) -> None:
    items = [(unit, chunk) for unit in "abc" for chunk in range(10)]
    taken = [Shard(rank, world).take_groups(items, lambda item: (item[0], item[1] // 4)) for rank in range(world)]
    assert [item for block in taken for item in block] == items
    for block in taken:
        for other in taken:
            if other is not block:
                assert not {(u, c // 4) for u, c in block} & {(u, c // 4) for u, c in other}
