"""Write-behind (``ChunkWriter``): the same store bytes as writing each chunk in the computing thread, the writes
really off that thread and in order, failures raised where the computation runs (an OSError as one sentence),
and nothing handed over lost."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import source_proj as sp
import source_proj.store.writer as writer_module
from source_proj.store.store import Store
from source_proj.store.writer import ChunkWriter

from .crash_driver import featurize, files

NAME = "grads/main/step-00000001"
ROWS, WIDTH, CHUNK = 20, 3, 4  # 5 row chunks


def _values(chunk: int) -> np.ndarray:
    return np.random.default_rng(chunk).normal(size=(CHUNK, WIDTH)).astype(np.float32)


def _store(path: Path, shard_chunks: int = 1) -> Store:
    store = Store.create(path, {"layout": {"shard_chunks": shard_chunks}})
    store.require_array(NAME, (ROWS, WIDTH), CHUNK, "float32")
    store.pending_chunks(NAME)
    return store


class _Gate:
    """``Store.write_chunk`` held until released, recording the thread and order of the writes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> None:
        self.open = threading.Event()
        self.calls: list[tuple[int, str]] = []
        original = Store.write_chunk

        def gated(store: Store, name: str, chunk: int, values: np.ndarray) -> None:
            self.open.wait(timeout=10)
            self.calls.append((chunk, threading.current_thread().name))
            if chunk == fail_at:
                raise sp.StoreError(f"chunk {chunk} failed")
            original(store, name, chunk, values)

        monkeypatch.setattr(Store, "write_chunk", gated)


def test_writes_leave_the_computing_thread_and_keep_their_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path / "s.sp", shard_chunks=2)
    gate = _Gate(monkeypatch)
    with ChunkWriter(store, depth=5) as writer:
        for chunk in range(5):
            writer.write(NAME, chunk, _values(chunk))  # returns while every write is held
        assert gate.calls == []
        gate.open.set()
    assert [chunk for chunk, _ in gate.calls] == [0, 1, 2, 3, 4]
    assert {thread for _, thread in gate.calls} == {"source-proj-writer"}
    assert not store.pending_chunks(NAME)
    np.testing.assert_array_equal(store.read(NAME), np.concatenate([_values(c) for c in range(5)]))


def test_depth_bounds_the_chunks_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path / "s.sp")
    gate = _Gate(monkeypatch)
    handed = []

    def compute() -> None:
        with ChunkWriter(store, depth=2) as writer:
            for chunk in range(5):
                writer.write(NAME, chunk, _values(chunk))
                handed.append(chunk)

    thread = threading.Thread(target=compute)
    thread.start()
    time.sleep(0.5)
    # One chunk taken by the writer (held at the gate), two waiting: the fourth write waits for room.
    assert handed == [0, 1, 2]
    gate.open.set()
    thread.join(timeout=10)
    assert handed == [0, 1, 2, 3, 4] and not store.pending_chunks(NAME)


def test_a_failed_write_is_raised_in_the_computing_thread_and_stops_the_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path / "s.sp")
    gate = _Gate(monkeypatch, fail_at=1)
    gate.open.set()
    with pytest.raises(sp.StoreError, match="chunk 1 failed"):
        with ChunkWriter(store, depth=1) as writer:
            for chunk in range(5):
                writer.write(NAME, chunk, _values(chunk))
                time.sleep(0.05)
    assert store.pending_chunks(NAME) == [1, 2, 3, 4]  # chunk 0 written; nothing after the failure


def test_chunks_handed_over_are_written_when_the_computation_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path / "s.sp")
    gate = _Gate(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        with ChunkWriter(store, depth=3) as writer:
            for chunk in range(3):
                writer.write(NAME, chunk, _values(chunk))
            gate.open.set()
            raise KeyboardInterrupt
    assert store.pending_chunks(NAME) == [3, 4]


def test_depth_zero_writes_in_the_computing_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path / "s.sp")
    gate = _Gate(monkeypatch)
    gate.open.set()
    with ChunkWriter(store, depth=0) as writer:
        writer.write(NAME, 0, _values(0))
        assert gate.calls == [(0, threading.current_thread().name)]


def test_featurize_writes_behind_the_same_bytes_as_in_line(
    tmp_path: Path, tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = sp.FeaturizeArguments(batch_size=4, chunk_rows=4, device="cpu", shard_chunks=2)
    threads = []
    original = Store.write_chunk

    def recorded(store: Store, name: str, chunk: int, values: np.ndarray) -> None:
        threads.append(threading.current_thread().name)
        original(store, name, chunk, values)

    monkeypatch.setattr(Store, "write_chunk", recorded)
    behind = tmp_path / "behind.sp"
    featurize(tiny_run, behind, options=options)
    written_behind, threads[:] = set(threads), []
    monkeypatch.setattr(writer_module, "WRITE_BEHIND", 0)
    in_line = tmp_path / "in-line.sp"
    featurize(tiny_run, in_line, options=options)
    assert "source-proj-writer" in written_behind and "source-proj-writer" not in threads
    assert files(behind) == files(in_line)
    assert sp.verify_store(behind, progress=False).status == "ok"


@pytest.mark.parametrize("depth", [0, 2])
def test_an_os_error_of_a_write_reaches_the_caller_as_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    store = _store(tmp_path / "s.sp")

    def full(store: Store, name: str, chunk: int, values: np.ndarray) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Store, "write_chunk", full)
    with pytest.raises(sp.StoreError, match=r"^Writing chunk 0 of 'grads/main/step-00000001' to .* the disk is full"):
        with ChunkWriter(store, depth=depth) as writer:
            writer.write(NAME, 0, _values(0))


def test_a_failed_write_does_not_mask_the_computations_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path / "s.sp")
    _Gate(monkeypatch, fail_at=0).open.set()
    with pytest.raises(ValueError, match="the model failed"):
        with ChunkWriter(store, depth=2) as writer:
            writer.write(NAME, 0, _values(0))
            raise ValueError("the model failed")
    assert store.pending_chunks(NAME) == [0, 1, 2, 3, 4]
