"""The real-cluster suite cleans up whatever happens; checked offline.

A timed-out task dies with its whole process group (the tools it started included); a bring-up
that fails in any way (not only an assertion) still collects diagnostics and runs `lab.down`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import conftest as e2e


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours is dead for this purpose.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_a_timed_out_task_kills_its_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # A task that starts a long-running tool (as lab.up starts kind) and hangs itself.
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen(['sleep', '300'])\n"
              f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
              "time.sleep(300)\n")
    started = time.monotonic()
    with pytest.raises(e2e.TaskTimeout, match="process group was killed"):
        e2e.run_in_group([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ),
                         timeout=2)
    assert time.monotonic() - started < 2 + e2e.KILL_GRACE
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the tool the task started outlived the timeout"


class Options:
    def __init__(self, **values: Any) -> None:
        self.values = values

    def getoption(self, name: str) -> Any:
        return self.values.get(name)


class Request:
    def __init__(self, **options: Any) -> None:
        self.config = Options(**options)


def bring_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
             failure: BaseException) -> tuple[list[tuple[str, ...]], list[Path]]:
    """Drive the session fixture with a bring-up that raises ``failure``."""
    invoked: list[tuple[str, ...]] = []
    diagnosed: list[Path] = []

    def invoke(self: e2e.E2ELab, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        invoked.append(args)
        if args[0] in ("lab.up", "lab.mesh"):
            raise failure
        return subprocess.CompletedProcess(list(args), 0, "", "")

    monkeypatch.setenv("LAB_E2E_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setattr(e2e, "docker_unreachable", lambda: "")
    monkeypatch.setattr(e2e.E2ELab, "invoke", invoke)
    monkeypatch.setattr(e2e, "collect_diagnostics",
                        lambda cfg, out, kubeconfig=None: diagnosed.append(out) or [])
    fixture = e2e.e2e_lab.__wrapped__  # type: ignore[attr-defined]
    gen = fixture(Request())
    with pytest.raises(type(failure)):
        next(gen)
    return invoked, diagnosed


@pytest.mark.parametrize("failure", [
    subprocess.TimeoutExpired(["invoke", "lab.up"], 3600),
    e2e.TaskTimeout("lab.up timed out"),
    RuntimeError("the runner lost its connection"),
    AssertionError("lab.up exited 1"),
], ids=["timeout-expired", "task-timeout", "runtime-error", "assertion"])
def test_a_failed_bring_up_is_diagnosed_and_torn_down(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, failure: BaseException) -> None:
    invoked, diagnosed = bring_up(monkeypatch, tmp_path, failure)
    assert diagnosed == [tmp_path / "artifacts" / "diagnostics"]
    assert [a[0] for a in invoked] == ["lab.up", "lab.down"]
    assert (tmp_path / "artifacts" / "timings.json").exists()


class FixtureRequest:
    def __init__(self, lab: e2e.E2ELab) -> None:
        self.fixturenames = ["e2e_lab", "remove_test_namespaces"]
        self.lab = lab

    def getfixturevalue(self, name: str) -> Any:
        assert name == "e2e_lab"
        return self.lab


def test_namespaces_a_test_created_are_removed_after_it_even_when_it_failed(
        tmp_path: Path, kube_api: Any) -> None:
    from lab.config import load_config
    from tests.conftest import write_config

    emu = kube_api  # a clean real API server
    kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig", context="kind-lab")
    cfg = load_config(write_config(tmp_path / "lab.yaml"))
    lab = e2e.E2ELab(tmp_path / "lab.yaml", cfg, tmp_path, str(kubeconfig))
    ns = {"apiVersion": "v1", "kind": "Namespace"}
    emu.put({**ns, "metadata": {"name": "kube-system"}})
    gen = e2e.remove_test_namespaces.__wrapped__(FixtureRequest(lab))  # type: ignore
    next(gen)
    # The test creates its namespace, the lab re-creates one of its own, then it fails.
    emu.put({**ns, "metadata": {"name": "e2e-hello"}})
    emu.put({**ns, "metadata": {"name": "cert-manager"}})
    with pytest.raises(StopIteration):
        next(gen)
    # deleted: a real API server keeps a namespace Terminating until its controller empties it
    left = {n["metadata"]["name"] for n in emu.list("v1", "Namespace")
            if "deletionTimestamp" not in n["metadata"]}
    assert "e2e-hello" not in left
    assert {"kube-system", "cert-manager"} <= left
