"""A forked child process that holds something (a store lock) until it is SIGKILLed."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def held_in_child(acquire: Callable[[], object]) -> Iterator[int]:
    """Fork a child that calls ``acquire()``, reports it, and sleeps until SIGKILLed; yields its pid."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            acquire()
            os.write(write, b"1")
            signal.pause()
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
