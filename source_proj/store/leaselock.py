"""The store lock on object storage: lease markers instead of flock (see [`source_proj.store.objectstore`][])."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from typing import Any

import fsspec

from source_proj.errors import StoreError
from source_proj.store.durable import LOCK_FILE
from source_proj.store.locking import LockHeld, LockMode, StoreLock, holder_info, refusal
from source_proj.store.objectstore import filesystem

LEASE_SECONDS = 60.0
"""How long an object-storage lock marker stays valid without renewal."""

# url → [lock, count]: the object-storage locks this process holds (re-entrant, like flock's).
_held: dict[str, list[Any]] = {}


class ObjectStoreLock(StoreLock):
    """Lease markers under ``STORE/.source-proj.lock/`` (see docs/howto/distributed.md).

    Args:
        path: the store's URL.
        mode: ``"exclusive"`` or ``"cooperative"``.
        lease: seconds a marker stays valid without renewal (renewed every ``lease / 3``).
    """

    def __init__(self, path: str, mode: LockMode = "exclusive", *, lease: float = LEASE_SECONDS) -> None:
        if mode not in ("exclusive", "cooperative"):
            raise StoreError(f"Unknown lock mode {mode!r}; use 'exclusive' or 'cooperative'.")
        self.path = str(path).rstrip("/")
        self.mode = mode
        self.lease = lease
        self._owned = False
        self._marker = ""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> None:
        if self._owned:
            return
        held = _held.get(self.path)
        if held is not None:
            if held[0].mode == "cooperative" and self.mode == "exclusive":
                raise StoreError(
                    f"The store at {self.path} is held cooperatively by this process, which cannot also write it "
                    "exclusively; finish the cooperative writing first."
                )
            held[1] += 1
            self._owned = True
            return
        fs, root = filesystem(self.path)
        folder = f"{root}/{LOCK_FILE}"
        self._marker = f"{folder}/{self.mode}-{uuid.uuid4().hex}.json"
        fs.makedirs(folder, exist_ok=True)  # a no-op on object storage (no directories)
        self._write_marker(fs)
        holder = self._conflict(fs, folder)
        if holder is not None:
            self._delete_marker(fs)
            raise LockHeld(refusal(self.path, holder, f"a killed writer's lease lapses within {self.lease:.0f} s"))
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, args=(fs,), daemon=True, name="source-proj-lease")
        self._renewer.start()
        _held[self.path] = [self, 1]
        self._owned = True

    def release(self) -> None:
        if not self._owned:
            return
        self._owned = False
        held = _held[self.path]
        held[1] -= 1
        if held[1] > 0:
            return
        del _held[self.path]
        owner: ObjectStoreLock = held[0]
        owner._stop.set()
        if owner._renewer is not None:
            owner._renewer.join()
        owner._delete_marker(filesystem(self.path)[0])

    def holder(self) -> dict[str, Any] | None:
        if self.path in _held:
            return None  # this process writes it
        fs, root = filesystem(self.path)
        try:
            return self._conflict(fs, f"{root}/{LOCK_FILE}")
        except FileNotFoundError:
            return None

    def _write_marker(self, fs: fsspec.AbstractFileSystem) -> None:
        info = {**holder_info(self.mode), "expires": time.time() + self.lease}
        fs.pipe_file(self._marker, json.dumps(info).encode())

    def _delete_marker(self, fs: fsspec.AbstractFileSystem) -> None:
        with contextlib.suppress(FileNotFoundError):  # lapsed and removed by another writer
            fs.rm(self._marker)

    def _conflict(self, fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, Any] | None:
        """The holder of a live marker that excludes this one (``None``: the lock is ours)."""
        now = time.time()
        for entry in sorted(fs.ls(folder, detail=False)):
            if str(entry).rstrip("/") == self._marker.rstrip("/"):
                continue
            try:
                info = json.loads(fs.cat_file(entry))
            except (FileNotFoundError, ValueError):
                continue  # released meanwhile, or not ours to read
            if not isinstance(info, dict) or float(info.get("expires", 0)) < now:
                continue  # a killed writer's lapsed lease
            if self.mode == "exclusive" or info.get("mode") == "exclusive":
                return info
        return None

    def _renew(self, fs: fsspec.AbstractFileSystem) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                self._write_marker(fs)
            except Exception:  # a transient failure: the next renewal retries within the lease
                continue
