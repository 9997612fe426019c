"""Killed at any moment, out of disk, or hit by a lost write, featurize and fit resume with the same
command and end bit-identical to an uninterrupted run."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import source_proj as sp
import source_proj.store.store as store_module
from source_proj.cli.main import main
from source_proj.store.durable import PARTIAL_SUFFIX, DurableLocalStore

from .crash_driver import FIT, OPTIONS, damage, featurize, files

DRIVER = Path(__file__).with_name("crash_driver.py")
ROOT = Path(__file__).resolve().parents[1]


def _scratch(tmp_path: Path) -> Path:
    """A RAM disk when there is one: a SIGKILL keeps the page cache, so the kill semantics are the
    same as on disk, and the loop runs several times faster without the fsyncs' latency."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(dir=shm, prefix="source-proj-kills-"))
    return tmp_path


def test_sigkilled_featurize_and_fit_resume_bit_identical(tmp_path: Path) -> None:
    work = _scratch(tmp_path)
    try:
        out = subprocess.run(
            [sys.executable, str(DRIVER), str(work), "--kills", "12", "--fit-kills", "4", "--seed", "0"],
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # The driver compares every file of every resumed store with the reference and fails otherwise.
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["featurize"]["kills"] >= 12 and result["fit"]["kills"] >= 4
    assert result["featurize"]["identical"] == result["featurize"]["trials"] >= 1


SPEC = """
import sys
sys.path.insert(0, {root!r})
import source_proj as sp
from tests.crash_driver import build_model, data

def build_task():
    return sp.ClassificationTask()

def train_data(stage):
    return data()
"""


def test_the_same_cli_command_resumes_a_killed_featurize(tmp_path: Path, tiny_run: Path) -> None:
    spec = tmp_path / "spec.py"
    spec.write_text(SPEC.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(store: Path) -> list[str]:
        return ["featurize", "--ckpts", str(tiny_run), "--spec", str(spec), "--out", str(store), "--dim", "12",
                "--seed", "3", "--batch-size", "4", "--chunk-rows", "4"]  # fmt: skip

    # The command killed is a process of its own; the reference and the resume run the same command in this one.
    reference = tmp_path / "reference.sp"
    assert CliRunner().invoke(main, command(reference)).exit_code == 0
    store = tmp_path / "killed.sp"
    child = subprocess.Popen([sys.executable, "-m", "source_proj.cli.main", *command(store)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(store.glob("progress/grads/main/*/c/0/0")) and time.monotonic() < deadline:
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert sp.verify_store(store, progress=False).status == "incomplete"  # killed mid-run, lock left behind
    resumed = CliRunner().invoke(main, command(store))
    assert resumed.exit_code == 0, resumed.output
    assert files(store) == files(reference)


def test_resume_recomputes_a_completed_chunk_a_crash_damaged(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "s.sp"
    original = sp.Store.write_chunk
    written = []

    def interrupted(self: sp.Store, name: str, chunk: int, values) -> None:
        if len(written) == 6:
            raise KeyboardInterrupt
        original(self, name, chunk, values)
        written.append((name, chunk))

    monkeypatch.setattr(sp.Store, "write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        featurize(tiny_run, store)
    monkeypatch.undo()
    # A write the disk lost at power failure, although its progress entry survived.
    name, chunk = next(w for w in written if w[0].startswith("grads/"))
    damage(store, name, chunk, "truncate")
    with pytest.warns(UserWarning, match=rf"damaged \(first: chunk {chunk} of '{name}'\); they are recomputed"):
        featurize(tiny_run, store)
    sp.fit(store, FIT, progress=False)
    assert files(store) == files(tiny_reference)


def test_a_killed_featurize_resumes_from_its_run_moved_to_another_directory(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run moved or copied elsewhere is the same run (its fingerprint holds every checkpoint's sha256): the store
    resumes from it and records where it is now. It was refused as featurized "with other settings", whose only
    advice, --force, threw the finished chunks away."""
    store, moved = tmp_path / "s.sp", tmp_path / "moved"
    original = sp.Store.write_chunk

    def interrupted(self: sp.Store, name: str, chunk: int, values) -> None:
        if name.startswith("grads/main/step-00000004"):
            raise KeyboardInterrupt
        original(self, name, chunk, values)

    monkeypatch.setattr(sp.Store, "write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        featurize(tiny_run, store)
    monkeypatch.undo()
    shutil.copytree(tiny_run, moved)
    featurize(moved, store)
    sp.fit(store, FIT, progress=False)
    meta, expected = sp.Store.open(store).meta, sp.Store.open(tiny_reference).meta
    assert meta["trajectory"] == {**expected["trajectory"], "path": str(moved.resolve())}
    assert {**meta, "trajectory": None} == {**expected, "trajectory": None}
    root = "zarr.json"  # the metadata, compared above
    assert {k: v for k, v in files(store).items() if k != root} == {
        k: v for k, v in files(tiny_reference).items() if k != root
    }


def test_disk_full_is_one_sentence_and_the_same_command_resumes(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "s.sp"
    original, original_file = DurableLocalStore.set, store_module.atomic_write_bytes
    chunk_writes = []

    def fill(path: str) -> None:  # the 10th write of a chunk or progress entry, through zarr or the store's own
        if "/c/" in path:
            chunk_writes.append(path)
            if len(chunk_writes) > 9:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    async def full_disk(self: DurableLocalStore, key: str, value) -> None:
        fill(str(self.root / key))
        await original(self, key, value)

    def full_disk_file(path, data) -> None:
        fill(str(path))
        original_file(path, data)

    monkeypatch.setattr(DurableLocalStore, "set", full_disk)
    monkeypatch.setattr(store_module, "atomic_write_bytes", full_disk_file)
    with pytest.raises(sp.StoreError) as err:
        featurize(tiny_run, store)
    monkeypatch.undo()
    message = str(err.value)
    assert (
        message.startswith("Writing ") and "failed because the disk is full (No space left on device)" in message
    )
    assert message.endswith("re-run the same command: it resumes, and nothing half-written was kept.")
    report = sp.verify_store(store, progress=False)
    assert report.damaged == [] and report.problems == [] and report.pending > 0 and report.complete > 0
    assert not list(store.rglob(f"*{PARTIAL_SUFFIX}"))
    featurize(tiny_run, store)
    sp.fit(store, FIT, progress=False)
    assert files(store) == files(tiny_reference)


def test_loader_workers_write_the_store_one_process_writes(
    tmp_path: Path, tiny_run: Path, tiny_reference: Path
) -> None:
    """featurize with DataLoader workers (one loader per run of chunks) writes the reference's bytes."""
    store = tmp_path / "workers.sp"
    featurize(tiny_run, store, options=dataclasses.replace(OPTIONS, num_workers=2))
    ours, reference = files(store), files(tiny_reference)
    arrays = ("grads/", "fisher/", "progress/grads/", "progress/fisher/")
    featurized = [name for name in reference if name.startswith(arrays)]
    assert len(featurized) > 10
    assert all(ours.get(name) == reference[name] for name in featurized)


def test_chunk_batches_never_straddle_a_chunk() -> None:
    from source_proj.featurize.featurize import _ChunkBatches

    assert list(_ChunkBatches([(0, 4), (8, 10)], 3)) == [[0, 1, 2], [3], [8, 9]]
    assert len(_ChunkBatches([(4, 8)], 4)) == 1
