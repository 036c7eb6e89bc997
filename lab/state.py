"""The persisted record of each cluster: small, readable JSON, written atomically,
guarded by a lock.

Layout under the state directory::

    clusters/<name>.json   the record (format, state, history, gates, fingerprint, versions)
    clusters/<name>.lock   held (flock) by the one process advancing that cluster; it exists
                           only while held (lab/filelock.py)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lab.errors import LockedError, StateError
from lab.filelock import exclusive_lock

RECORD_FORMAT = 1
STATES = ("absent", "cluster", "cni", "gateway", "certs", "locked", "meshed")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Transition:
    """One attempt at a transition."""

    name: str  # the state it leads to
    source: str
    started: str
    finished: str | None = None
    seconds: float | None = None
    outcome: str = "running"  # running | ok | failed | interrupted | stepped-back
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"transition": self.name, "from": self.source, "started": self.started,
                "finished": self.finished, "seconds": self.seconds, "outcome": self.outcome,
                "error": self.error}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Transition:
        return cls(name=d["transition"], source=d["from"], started=d["started"],
                   finished=d.get("finished"), seconds=d.get("seconds"),
                   outcome=d.get("outcome", "ok"), error=d.get("error"))


@dataclass
class Record:
    cluster: str
    state: str = "absent"
    config_fingerprint: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    history: list[Transition] = field(default_factory=list)
    gates: dict[str, Any] = field(default_factory=dict)  # last verdict per gate
    facts: dict[str, Any] = field(default_factory=dict)  # what steps learned (pool, node IPs)
    updated: str = ""

    HISTORY_LIMIT = 200

    def to_json(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, "cluster": self.cluster, "state": self.state,
                "updated": self.updated, "configFingerprint": self.config_fingerprint,
                "versions": self.versions, "facts": self.facts, "gates": self.gates,
                "history": [t.to_json() for t in self.history[-self.HISTORY_LIMIT:]]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Record:
        return cls(cluster=d["cluster"], state=d["state"], updated=d.get("updated", ""),
                   config_fingerprint=d.get("configFingerprint", ""),
                   versions=dict(d.get("versions", {})), facts=dict(d.get("facts", {})),
                   gates=dict(d.get("gates", {})),
                   history=[Transition.from_json(t) for t in d.get("history", [])])

    @property
    def running(self) -> Transition | None:
        """A transition that started and never finished: the process died inside it."""
        if self.history and self.history[-1].outcome == "running":
            return self.history[-1]
        return None

    def last_ok(self, name: str) -> Transition | None:
        for t in reversed(self.history):
            if t.name == name and t.outcome == "ok":
                return t
        return None


class StateStore:
    """Records and locks of one lab's clusters."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clusters_dir = root / "clusters"

    def path(self, cluster: str) -> Path:
        return self.clusters_dir / f"{cluster}.json"

    def exists(self, cluster: str) -> bool:
        return self.path(cluster).exists()

    def names(self) -> list[str]:
        if not self.clusters_dir.is_dir():
            return []
        return sorted(p.stem for p in self.clusters_dir.glob("*.json"))

    def load(self, cluster: str) -> Record:
        path = self.path(cluster)
        if not path.exists():
            return Record(cluster=cluster)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StateError(
                f"the state record {path} is unreadable ({exc})",
                f"inspect it; to start over remove it (`rm {path}`) and run `invoke lab.up`: "
                "the steps re-detect what already exists and adopt it",
            ) from exc
        fmt = data.get("format") if isinstance(data, dict) else None
        if not isinstance(fmt, int):
            raise StateError(f"the state record {path} has no format version",
                             f"remove it (`rm {path}`) and run `invoke lab.up` to re-detect")
        if fmt > RECORD_FORMAT:
            raise StateError(
                f"the state record {path} has format {fmt}, newer than this tool's "
                f"{RECORD_FORMAT}", "upgrade kind-cilium-lab, or remove the record to re-detect")
        try:
            record = Record.from_json(data)
        except (KeyError, TypeError) as exc:
            raise StateError(
                f"the state record {path} is corrupt (missing {exc})",
                f"remove it (`rm {path}`) and run `invoke lab.up` to re-detect") from exc
        if record.state not in STATES:
            raise StateError(f"the state record {path} names unknown state {record.state!r}",
                             f"remove it (`rm {path}`) and run `invoke lab.up` to re-detect")
        return record

    def save(self, record: Record) -> None:
        """Atomic: write a temp file, fsync it, rename over the record, fsync the folder."""
        record.updated = now_iso()
        self.clusters_dir.mkdir(parents=True, exist_ok=True)
        path = self.path(record.cluster)
        tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        data = json.dumps(record.to_json(), indent=2, sort_keys=False) + "\n"
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.clusters_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self, cluster: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(cluster).unlink()

    @contextlib.contextmanager
    def lock(self, cluster: str, purpose: str) -> Iterator[None]:
        """Exclusive, non-blocking: a second holder fails at once naming the first."""
        self.clusters_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.clusters_dir / f"{cluster}.lock"
        with contextlib.ExitStack() as held:
            try:
                fd = held.enter_context(exclusive_lock(lock_path, blocking=False, mode=0o644))
            except BlockingIOError:
                holder = _read_holder(lock_path)
                raise LockedError(
                    f"cluster {cluster!r} is locked by {holder}",
                    "wait for that task to finish (or stop it); the lock is released when its "
                    "process exits, so a crashed holder never blocks you",
                ) from None
            os.ftruncate(fd, 0)
            holder_info = {"pid": os.getpid(), "host": socket.gethostname(), "task": purpose,
                           "since": now_iso()}
            os.write(fd, json.dumps(holder_info).encode())
            os.fsync(fd)
            yield


def _read_holder(lock_path: Path) -> str:
    for _ in range(5):  # the holder writes its name right after taking the lock
        try:
            info = json.loads(lock_path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if info:
            return (f"pid {info.get('pid')} on {info.get('host')} "
                    f"(`{info.get('task')}`, since {info.get('since')})")
        time.sleep(0.05)
    return "another process"
