"""State records: readable, atomic, versioned, locked."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from lab.errors import LockedError, StateError
from lab.state import RECORD_FORMAT, Record, StateStore, Transition, now_iso


def test_roundtrip_is_readable_json(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    rec = Record(cluster="lab", state="cni", config_fingerprint="sha256:x",
                 versions={"cilium": "1.18.4"})
    rec.history.append(Transition("cluster", "absent", now_iso(), now_iso(), 1.5, "ok"))
    store.save(rec)
    data = json.loads(store.path("lab").read_text())
    assert data["format"] == RECORD_FORMAT and data["state"] == "cni"
    assert data["history"][0] == {"transition": "cluster", "from": "absent",
                                  "started": data["history"][0]["started"],
                                  "finished": data["history"][0]["finished"], "seconds": 1.5,
                                  "outcome": "ok", "error": None}
    again = store.load("lab")
    assert again.state == "cni" and again.versions == {"cilium": "1.18.4"}
    assert again.last_ok("cluster") is not None
    assert list(tmp_path.glob("clusters/*.tmp*")) == []


def test_save_replaces_the_record_whole_never_rewriting_it_in_place(tmp_path: Path) -> None:
    """A reader (lab.status, a resume) that opened the record keeps a whole old record while a
    save happens, and a crash mid-save can only lose the new record, never corrupt the old one:
    the new record is a new file renamed over the old name."""
    store = StateStore(tmp_path)
    store.save(Record(cluster="lab", state="cluster", facts={"pad": "x" * 4096}))
    path = store.path("lab")
    with open(path) as reader:
        inode = os.fstat(reader.fileno()).st_ino
        store.save(Record(cluster="lab", state="cni"))
        old = json.loads(reader.read())
    assert old["state"] == "cluster" and old["facts"]["pad"] == "x" * 4096
    assert os.stat(path).st_ino != inode
    assert store.load("lab").state == "cni"
    assert sorted(p.name for p in store.clusters_dir.iterdir()) == ["lab.json"]


def test_missing_record_is_absent(tmp_path: Path) -> None:
    assert StateStore(tmp_path).load("lab").state == "absent"


@pytest.mark.parametrize(("content", "words"), [
    ("{not json", "unreadable"),
    ('{"cluster": "lab", "state": "cni"}', "no format version"),
    (json.dumps({"format": RECORD_FORMAT + 1, "cluster": "lab", "state": "cni"}), "newer"),
    (json.dumps({"format": RECORD_FORMAT, "state": "cni"}), "corrupt"),
    (json.dumps({"format": RECORD_FORMAT, "cluster": "lab", "state": "flying"}), "unknown state"),
])
def test_bad_records_are_refused_with_recovery(tmp_path: Path, content: str, words: str) -> None:
    store = StateStore(tmp_path)
    store.clusters_dir.mkdir(parents=True)
    store.path("lab").write_text(content)
    with pytest.raises(StateError) as err:
        store.load("lab")
    assert words in err.value.message
    assert err.value.hint  # says how to recover


def _hold(root: str, ready: multiprocessing.synchronize.Event,  # type: ignore[name-defined]
          release: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    with StateStore(Path(root)).lock("lab", "lab.up"):
        ready.set()
        release.wait(10)


def test_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    proc = multiprocessing.Process(target=_hold, args=(str(tmp_path), ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        with pytest.raises(LockedError) as err, StateStore(tmp_path).lock("lab", "lab.up"):
            pass
        assert time.monotonic() - started < 2  # refused at once, not after a wait
        assert f"pid {proc.pid}" in err.value.message and "lab.up" in err.value.message
    finally:
        release.set()
        proc.join(10)
    with StateStore(tmp_path).lock("lab", "lab.up"):  # released when the holder exits
        pass


def test_lock_of_a_killed_holder_is_free(tmp_path: Path) -> None:
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    proc = multiprocessing.Process(target=_hold, args=(str(tmp_path), ready, release))
    proc.start()
    assert ready.wait(10)
    proc.kill()
    proc.join(10)
    with StateStore(tmp_path).lock("lab", "lab.up"):
        pass
