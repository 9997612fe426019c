"""Durable writes: a file is old or new, never half; a chunk's data reach the disk before its
progress entry does."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import source_proj as sp
from source_proj.store import durable
from source_proj.store.durable import LOCK_FILE, PARTIAL_SUFFIX, DurableLocalStore


def test_atomic_write_replaces_the_file_or_leaves_it_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "new" / "deeper" / "cache.bin"
    sp.atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        sp.atomic_write_bytes(target, b"second, longer content")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["cache.bin"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_durably_written_file_has_the_mode_the_umask_gives(tmp_path: Path, umask: int, mode: int) -> None:
    # Run files (trajectory.json, checkpoints) and reports go through atomic_write_bytes; on a
    # shared machine they must be as readable as a file open() would create, not always 0600.
    old = os.umask(umask)
    try:
        target = tmp_path / "run" / "trajectory.json"
        sp.atomic_write_bytes(target, b"first")
        assert target.stat().st_mode & 0o777 == mode
        sp.atomic_write_bytes(target, b"replaced")
        assert target.stat().st_mode & 0o777 == mode
    finally:
        os.umask(old)
    assert target.read_bytes() == b"replaced"
    assert sorted(p.name for p in target.parent.iterdir()) == ["trajectory.json"]


def test_a_chunk_is_on_disk_before_its_progress_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = sp.Store.create(tmp_path / "s.sp", {"x": 1})
    store.require_array("grads/a", (10, 3), 4, "float32")
    store.pending_chunks("grads/a")  # creates the progress entries
    events: list[tuple[str, str]] = []
    for name in ("fsync_file", "fsync_dir"):
        real = getattr(durable, name)
        monkeypatch.setattr(durable, name, lambda p, real=real, name=name: (events.append((name, str(p))), real(p)))
    rename = os.replace  # the store writes its chunk files itself: fsynced under a temporary name, then renamed
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("renamed", str(b))), rename(a, b)))
    store.write_chunk("grads/a", 1, np.ones((4, 3), np.float32))
    root = str(tmp_path / "s.sp")
    data, entry = f"{root}/grads/a/c/1/0", f"{root}/progress/grads/a/c/1/0"
    # zarr's path (DurableLocalStore): the file fsynced once written; the store's own (atomic_write_bytes): the
    # temporary file fsynced, then renamed to the chunk's (or entry's) name. Either way, then the names, then the entry.
    written, entry_written = (next(i for i, e in enumerate(events) if e in {("fsync_file", key), ("renamed", key)})
                              for key in (data, entry))  # fmt: skip
    named = events.index(("fsync_dir", f"{root}/grads/a/c/1"), written)
    created = events.index(("fsync_dir", f"{root}/grads/a/c"), written)  # the directory the write created
    assert written < named and written < created < entry_written
    assert named < entry_written
    assert np.array_equal(store.read_chunk("grads/a", 1), np.ones((4, 3), np.float32))


def test_the_lock_file_and_leftover_temporaries_are_invisible_to_zarr(tmp_path: Path) -> None:
    store = sp.Store.create(tmp_path / "s.sp", {"x": 1})
    store.require_array("grads/a", (4, 2), 4, "float32")
    (tmp_path / "s.sp" / LOCK_FILE).write_text("{}")
    (tmp_path / "s.sp" / "grads" / f"zarr.1234{PARTIAL_SUFFIX}").write_text("killed")
    group = zarr.open_group(store=DurableLocalStore(tmp_path / "s.sp", read_only=True), mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(k for k, _ in group.members(max_depth=None)) == ["grads", "grads/a"]


def test_a_new_store_is_its_root_metadata_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A kill between an empty root group and its attributes used to leave a store nobody could open.
    writes = []
    real_set = DurableLocalStore.set

    async def spy(self: DurableLocalStore, key: str, value) -> None:
        writes.append(key)
        await real_set(self, key, value)

    monkeypatch.setattr(DurableLocalStore, "set", spy)
    sp.Store.create(tmp_path / "s.sp", {"x": 1})
    assert writes == ["zarr.json"]
    assert sp.Store.open(tmp_path / "s.sp").meta["x"] == 1


_INTERRUPTED_IN_A_WRITE = """
import os, signal, threading, time
import source_proj
from zarr.core.sync import sync

async def stuck_write():
    time.sleep(1.0)  # zarr's IO thread still in a write (an fsync on a slow disk) when the interrupt comes
    print("write finished", flush=True)

threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
sync(stuck_write())
"""


def test_a_script_interrupted_in_a_write_lets_it_finish_and_exits_without_zarrs_traceback() -> None:
    """Ctrl-C while zarr's IO thread was writing: Python's own KeyboardInterrupt, then zarr's clean-up at exit printed
    a second traceback ("Cannot close a running event loop"), the write cut off by the exit. The write is let
    finish first, and zarr exits quietly."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_IN_A_WRITE], capture_output=True, text=True)
    assert done.stderr.rstrip().endswith("KeyboardInterrupt"), done.stderr
    assert "event loop" not in done.stderr and done.stdout == "write finished\n", (done.stdout, done.stderr)
