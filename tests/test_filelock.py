"""lab/filelock.py: one holder at a time across processes, and no lock file left behind."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from lab.filelock import exclusive_lock


def _count(lock: str, counter: str, rounds: int) -> None:
    """Read-modify-write under the lock, slowly enough that an unguarded second holder shows."""
    for _ in range(rounds):
        with exclusive_lock(Path(lock)):
            value = int(Path(counter).read_text())
            time.sleep(0.001)
            Path(counter).write_text(str(value + 1))


def test_the_lock_file_exists_only_while_held(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with exclusive_lock(lock):
        assert lock.exists()
    assert not lock.exists()


def test_a_second_holder_is_refused_without_blocking(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with exclusive_lock(lock), pytest.raises(BlockingIOError):  # noqa: SIM117
        with exclusive_lock(lock, blocking=False):
            pass
    with exclusive_lock(lock, blocking=False):  # free again
        pass


def test_contending_processes_never_hold_it_together(tmp_path: Path) -> None:
    """Holders unlink the file as they let go; a waiter that locked the unlinked inode must
    notice and retry, or two processes would count at once and increments would be lost."""
    lock, counter = tmp_path / "c.lock", tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_count, args=(str(lock), str(counter), 40)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert counter.read_text() == "160"
    assert not lock.exists()


def test_a_killed_holder_blocks_nobody(tmp_path: Path) -> None:
    lock = tmp_path / "k.lock"
    pid = os.fork()
    if pid == 0:  # the child takes the lock and dies without letting go
        cm = exclusive_lock(lock)
        cm.__enter__()
        os._exit(0)
    os.waitpid(pid, 0)
    assert lock.exists()  # its file stays, unheld
    with exclusive_lock(lock, blocking=False):
        pass
    assert not lock.exists()
