"""Row chunks written by a thread of their own while the next ones are computed (write-behind).

A featurize chunk is computed on the device, copied to the host, then written durably: staged, packed into its
shard, every step fsynced (``Store.write_chunk``). Written in the computing thread, the device waits for the
disk at every chunk; on a GPU, whose chunks take a fraction of a second to compute, that is a large share of
featurize. ``ChunkWriter`` hands each finished chunk to one writer thread and returns at once, so the writes of
a chunk overlap the computation of the next ones. At most ``depth`` chunks wait, so host memory stays bounded
and a disk slower than the device slows the computation down instead of filling memory.

Nothing about crash safety changes: the thread writes the chunks in the order they were handed over, each
through ``Store.write_chunk`` (data first, its progress entry after), so a kill loses at most the chunks still
waiting, which are unfinished in the store and recomputed on resume, as before. A write that fails is raised
in the computing thread (an ``OSError`` as the one-sentence ``StoreError`` of ``io_errors``) at its next
``write`` or when the block ends, whichever comes first; what was handed over before it is still written.
"""

from __future__ import annotations

import queue
import threading
from types import TracebackType

import numpy as np

from source_proj.errors import StoreError
from source_proj.store.durable import io_errors
from source_proj.store.store import Store

WRITE_BEHIND = 2
"""Chunks that may wait for the writer thread while the next is computed (``ChunkWriter``'s default depth);
0 writes each chunk in the computing thread before the next is computed."""

_STOP = object()


class ChunkWriter:
    """Write row chunks of ``store`` in a thread of its own (see the module docstring); ``depth``: chunks that may
    wait (default ``WRITE_BEHIND``; 0: each is written by ``write`` itself).

    Usage::

        with ChunkWriter(store) as writer:
            for chunk in chunks:
                writer.write(name, chunk, compute(chunk))   # returns once the chunk is queued
        # every chunk handed over is written here (or the first failure raised)
    """

    def __init__(self, store: Store, depth: int | None = None) -> None:
        depth = WRITE_BEHIND if depth is None else depth
        if depth < 0:
            raise ValueError(f"depth must be ≥ 0, not {depth}")
        self.store = store
        self.depth = depth
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(depth, 1))
        self._error: BaseException | None = None  # the first failed write's; nothing is written after it
        self._raised = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ChunkWriter:
        if self.depth:
            self._thread = threading.Thread(target=self._run, daemon=True, name="source-proj-writer")
            self._thread.start()
        return self

    def write(self, name: str, chunk: int, values: np.ndarray) -> None:
        """Hand row chunk ``chunk`` of array ``name`` over for writing (``Store.write_chunk``); waits while
        ``depth`` chunks are already waiting. Raises the first failure of an earlier write."""
        self._raise_failure()
        if self._error is not None:
            raise StoreError(f"An earlier write to {self.store.path} failed, so nothing more is written there; "
                             "re-run the same command: it resumes.")
        if self._thread is None:
            with io_errors(self.store.path, f"chunk {chunk} of {name!r}"):
                self.store.write_chunk(name, chunk, values)
            return
        while True:
            try:
                self._queue.put((name, chunk, values), timeout=0.5)
                return
            except queue.Full:
                self._raise_failure()  # a failed thread takes nothing more: do not wait on it forever
                if not self._thread.is_alive():
                    raise StoreError(f"The writer thread of {self.store.path} stopped; re-run the same command: it "
                                     "resumes.") from None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # after a failure nothing more is written: the store resumes from what it holds
            name, chunk, values = item  # type: ignore[misc]
            try:
                with io_errors(self.store.path, f"chunk {chunk} of {name!r}"):  # an OSError: one sentence too
                    self.store.write_chunk(name, chunk, values)
            except BaseException as err:  # handed to the computing thread, raised there
                self._error = err

    def _raise_failure(self) -> None:
        """Raise the first failed write's error (once; the thread writes nothing after it)."""
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def close(self) -> None:
        """Wait for every chunk handed over to be written; raise the first failure, if any."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        self._raise_failure()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is not None:
            # The computation failed (or was interrupted): the chunks already handed over are finished work, so
            # they are still written, but a failure of theirs is not raised over the error already propagating.
            self._raised = True
        self.close()
