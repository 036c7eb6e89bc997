"""Faults: a `lab.up` killed inside a step resumes; a converged `lab.up` changes nothing, fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from lab.bootstrap import tools_dir
from tests.e2e.conftest import E2ELab


def _helm_revisions(e2e_lab: E2ELab) -> dict[str, int]:
    out = {}
    for c in e2e_lab.cfg.clusters:
        helm = tools_dir() / "helm"
        cmd = [str(helm) if helm.exists() else "helm", "list", "-A", "-o", "json",
               "--kube-context", c.kube_context]
        for rel in json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                             check=True).stdout):
            out[f"{c.name}/{rel['namespace']}/{rel['name']}"] = int(rel["revision"])
    return out


def test_converged_up_changes_nothing_and_finishes_in_seconds(e2e_lab: E2ELab) -> None:
    before = _helm_revisions(e2e_lab)
    started = time.monotonic()
    e2e_lab.invoke("lab.mesh" if e2e_lab.cfg.is_mesh else "lab.up")
    seconds = time.monotonic() - started
    e2e_lab.extra["convergedUpSeconds"] = round(seconds, 1)
    assert _helm_revisions(e2e_lab) == before
    assert seconds < 180, f"a converged lab.up took {seconds:.0f}s"


def test_kill_inside_a_step_then_resume_converges(e2e_lab: E2ELab) -> None:
    proc = e2e_lab.start("lab.mesh" if e2e_lab.cfg.is_mesh else "lab.up")
    record = e2e_lab.cfg.state_dir / "clusters" / f"{e2e_lab.cfg.clusters[0].name}.json"
    deadline = time.monotonic() + 120
    killed_inside = None
    while time.monotonic() < deadline and proc.poll() is None:
        history = json.loads(record.read_text())["history"]
        if history and history[-1]["outcome"] == "running" and history[-1]["transition"] != \
                "cluster":
            killed_inside = history[-1]["transition"]
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait(30)
    assert killed_inside, "lab.up finished before it could be killed inside a step"
    e2e_lab.invoke("lab.up", "--resume")
    history = json.loads(record.read_text())["history"]
    assert any(t["outcome"] == "interrupted" and t["transition"] == killed_inside
               for t in history)
    target = "meshed" if e2e_lab.cfg.is_mesh else "locked"
    for row in e2e_lab.status():
        assert row["state"] == target
        assert all(v["ready"] for v in row["gates"].values())
