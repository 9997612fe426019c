"""Stores on fsspec URLs: featurize → fit → query on memory:// equals the local store; file:// is the
local durable store; lease locks refuse a second writer and release a killed one's store after the lease."""

from __future__ import annotations

import time
import uuid
from contextlib import AbstractContextManager
from pathlib import Path

import fsspec
import numpy as np
import pytest

import source_proj as sp
from source_proj.store.leaselock import ObjectStoreLock
from source_proj.store.locking import LockHeld

from .crash_driver import FIT, build_model, data, featurize, files
from .forked import held_in_child


def test_a_memory_url_store_runs_featurize_fit_query_exactly_like_a_local_one(
    tiny_run: Path, tiny_reference: Path
) -> None:
    url = f"memory://{uuid.uuid4().hex}/run.sp"
    featurize(tiny_run, url)
    sp.fit(url, FIT, progress=False)
    remote, local = sp.Store.open(url), sp.Store.open(tiny_reference)
    assert remote.meta == local.meta
    names = local.progress_arrays()
    assert remote.progress_arrays() == names and "methods/source/train/main" in names
    for name in names:
        assert np.array_equal(remote.read(name), local.read(name)), name
        assert np.array_equal(remote.progress_entries(name), local.progress_entries(name)), name
    queries = data()
    top = {}
    for store in (url, tiny_reference):
        top[str(store)] = sp.Attributor(store, build_model(), sp.ClassificationTask()).top_k(queries, 4)
    assert np.array_equal(top[url].helpful_ids, top[str(tiny_reference)].helpful_ids)
    assert np.array_equal(top[url].harmful_scores, top[str(tiny_reference)].harmful_scores)
    assert sp.verify_store(url, progress=False).status == "ok"
    fs, markers = fsspec.filesystem("memory"), f"{url.removeprefix('memory://')}/.source-proj.lock"
    assert not fs.exists(markers) or fs.ls(markers) == []  # every lease marker was removed on release
    featurize(tiny_run, url)  # a finished store is reused as it is
    with pytest.raises(sp.StoreError, match="A store already exists"):
        sp.Store.create(url, {"anything": 1})


def test_objects_that_are_not_a_store_are_never_overwritten(tiny_run: Path) -> None:
    root = f"memory://{uuid.uuid4().hex}/results"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root.removeprefix('memory://')}/notes.txt", b"mine")
    with pytest.raises(sp.StoreError, match="already holds objects that are not a source-proj store"):
        featurize(tiny_run, root)
    assert [Path(p).name for p in fs.ls(root.removeprefix("memory://"), detail=False)] == ["notes.txt"]


def test_a_file_url_is_the_local_durable_store(tmp_path: Path, tiny_run: Path, tiny_reference: Path) -> None:
    store = tmp_path / "s.sp"
    featurize(tiny_run, f"file://{store}")
    sp.fit(f"file://{store}", FIT, progress=False)
    assert files(store) == files(tiny_reference)
    assert (store / ".source-proj.lock").is_file()  # flock, not lease markers


def _held_elsewhere(url: str, mode: str, lease: float) -> AbstractContextManager[int]:
    """A forked process holding an ObjectStoreLock until SIGKILLed; yields its pid."""
    return held_in_child(lambda: ObjectStoreLock(url, mode, lease=lease).acquire())  # type: ignore[arg-type]


def test_lease_locks_refuse_a_second_writer_and_a_killed_one_blocks_for_one_lease(tmp_path: Path) -> None:
    # The lease protocol on a filesystem two processes share (on object storage it is the same code). Leases of
    # seconds, not fractions: the suite runs a process per core, and a busy machine can stall a process that long.
    url = f"file://{tmp_path}/s.sp"
    with _held_elsewhere(url, "exclusive", lease=3.0) as pid:
        for mode in ("exclusive", "cooperative"):
            with pytest.raises(LockHeld, match=f"is being written by process {pid} on .*lease lapses within 3 s"):
                ObjectStoreLock(url, mode, lease=3.0).acquire()  # type: ignore[arg-type]
    killed = time.monotonic()
    with pytest.raises(LockHeld):  # the killed holder's marker is still within its lease
        ObjectStoreLock(url, lease=3.0).acquire()
    time.sleep(max(0.0, 3.1 - (time.monotonic() - killed)))
    with ObjectStoreLock(url, lease=3.0):
        pass

    with _held_elsewhere(url, "cooperative", lease=30):
        with ObjectStoreLock(url, "cooperative"):
            pass
        with pytest.raises(LockHeld, match=r"being written cooperatively \(last joined by process"):
            ObjectStoreLock(url).acquire()


def test_a_lease_is_renewed_while_its_holder_lives(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/s.sp"
    with _held_elsewhere(url, "exclusive", lease=1.5):
        time.sleep(4.0)  # more than two leases: only renewal keeps the holder's marker alive
        with pytest.raises(LockHeld):
            ObjectStoreLock(url, lease=1.5).acquire()
