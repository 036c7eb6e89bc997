"""One process at a time: an exclusive ``flock`` on a lock file, released with the block.

The lock file exists only while it is held: the holder unlinks it before letting go, so no task
leaves a ``.lock`` behind. A waiter that opened the file just before it was unlinked holds a lock
on a name nobody else sees any more; it notices (the path is gone or is another inode) and takes
the lock on the current file instead."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def _acquire(path: Path, *, blocking: bool, mode: int) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # the previous holder removed this file as it let go: lock the new one


@contextlib.contextmanager
def exclusive_lock(path: Path, *, blocking: bool = True, mode: int = 0o600) -> Iterator[int]:
    """Hold an exclusive lock on ``path`` for the ``with`` block; yields the open descriptor.

    ``blocking=False`` raises ``BlockingIOError`` at once when another process holds it. The
    kernel drops the lock with the process, so a killed holder never blocks the next one (its
    file stays, unheld, and is reused)."""
    fd = _acquire(path, blocking=blocking, mode=mode)
    try:
        yield fd
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still held: a waiter re-checks the inode it locked
        os.close(fd)
