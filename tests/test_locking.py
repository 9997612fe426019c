"""Two writers of one store: the second is refused with a clear message; a killed writer blocks nobody."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import pytest

import source_proj as sp

from .crash_driver import featurize, files
from .forked import held_in_child


def _held_by_another_process(path: Path, mode: str = "exclusive") -> AbstractContextManager[int]:
    """A forked process that takes the store's lock and sleeps until it is SIGKILLed; yields its pid."""
    return held_in_child(lambda: sp.store_lock(path, mode).acquire())  # type: ignore[arg-type]


def test_a_second_writer_is_refused_and_a_killed_one_blocks_nothing(tmp_path: Path, tiny_run: Path) -> None:
    store = tmp_path / "s.sp"
    with _held_by_another_process(store) as pid:
        with pytest.raises(sp.StoreError) as err:
            featurize(tiny_run, store)
        message = str(err.value)
        assert message.startswith(f"The store at {store} is being written by process {pid} on ")
        assert message.endswith(
            "wait for that to finish (a killed writer releases the lock at once), or write to another path."
        )
        assert not (store / "zarr.json").exists()
        with pytest.raises(sp.StoreError, match="is being written by process"):
            sp.fit(store, progress=False)
    # The holder was SIGKILLed: its lock file is still there, its lock is not.
    assert (store / ".source-proj.lock").exists()
    featurize(tiny_run, store)
    assert sp.verify_store(store, progress=False).status == "ok"


def test_a_child_forked_while_the_lock_is_held_does_not_keep_it(tmp_path: Path) -> None:
    """A DataLoader worker forked during featurize outlives a failed call until garbage collection: the lock goes
    with its writer's release all the same."""
    store = tmp_path / "s.sp"
    lock = sp.store_lock(store)
    lock.acquire()
    with held_in_child(lambda: None):
        lock.release()
        with sp.store_lock(store):  # taken anew: no other process holds it
            pass


def test_cooperative_writers_share_the_store_and_exclude_an_exclusive_one(tmp_path: Path) -> None:
    store = tmp_path / "s.sp"
    with _held_by_another_process(store, "cooperative"):
        with sp.store_lock(store, "cooperative"):
            pass
        with pytest.raises(sp.StoreError, match=r"is being written cooperatively \(last joined by process \d+ on "):
            sp.store_lock(store).acquire()
    with _held_by_another_process(store) as pid:
        with pytest.raises(sp.StoreError, match=f"by process {pid}"):
            sp.store_lock(store, "cooperative").acquire()


def test_the_lock_is_reentrant_inside_one_process(tmp_path: Path, tiny_run: Path) -> None:
    store = tmp_path / "s.sp"
    with sp.store_lock(store):
        featurize(tiny_run, store)  # takes the same lock again
    with _held_by_another_process(store):
        pass  # and it was released at the end


def test_a_directory_of_other_files_is_never_turned_into_a_store(tmp_path: Path, tiny_run: Path) -> None:
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(sp.StoreError, match="already holds files that are not a source-proj store; choose a new"):
        featurize(tiny_run, target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    with pytest.raises(sp.StoreError, match=r"^No store at .*results; create one with `source-proj featurize`"):
        sp.fit(target, progress=False)  # fit creates no store: the directory is named as holding none
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_an_existing_store_is_never_replaced_without_overwrite(tmp_path: Path, tiny_reference: Path) -> None:
    before = files(tiny_reference)
    with pytest.raises(sp.StoreError, match=r"A store already exists at .*; pass --force"):
        sp.Store.create(tiny_reference, {"anything": 1})
    assert files(tiny_reference) == before
