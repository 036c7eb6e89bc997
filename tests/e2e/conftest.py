"""The real-cluster suite: one lab brought up once per session through the real tasks.

Every test here is marked `e2e` (plain `pytest` deselects them; `nox -s e2e` runs them). Where no
Docker daemon answers, the session skips with one line. On any failure (an assertion, a timeout,
anything else) diagnostics are collected into `e2e-artifacts/diagnostics/` (kind logs, each agent's
status, Hubble drops, events, records); whatever happens the lab is brought down at the end (unless
`--e2e-keep`), a task that outlives its timeout is killed with its whole process group (kind and
helm included), and namespaces a test created are removed after it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.config import LabConfig, load_config
from lab.kube import KubeClient
from lab.steps.locked import PROBE_NAMESPACES
from tests.e2e.helpers import (
    artifacts_dir,
    collect_diagnostics,
    timings,
    timings_table,
    write_timings,
)

REPO = Path(__file__).resolve().parents[2]
KILL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL for a task that timed out
# Namespaces the lab itself creates (they may appear during a test that re-runs a step).
LAB_NAMESPACES = {"kube-system", "kube-public", "kube-node-lease", "default", "cert-manager",
                  "lab-gateway", "local-path-storage", *PROBE_NAMESPACES}


class TaskTimeout(AssertionError):
    """A task outlived its timeout; its whole process group was killed."""


def run_in_group(cmd: list[str], *, cwd: Path, env: dict[str, str],
                 timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; past ``timeout`` kill the group (SIGTERM, then
    SIGKILL), so kind, helm and docker children die with it, and raise `TaskTimeout`."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise TaskTimeout(f"{' '.join(cmd)} timed out after {timeout:.0f}s; its process group "
                          f"was killed\nstdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}") from None
    except BaseException:  # Ctrl-C, or the test runner stopping: nothing may outlive us
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen[str]) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; children may still run in its group
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def docker_unreachable() -> str:
    if not shutil.which("docker"):
        return "the docker CLI is not installed"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    return "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["failed"])[-1]


@dataclass
class E2ELab:
    config_path: Path
    cfg: LabConfig
    artifacts: Path
    kubeconfig: str | None
    up_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = dict(os.environ, LAB_CONFIG=str(self.config_path), NO_COLOR="1")
        env.setdefault("LAB_LOG_FORMAT", "json")
        return env

    def invoke(self, *args: str, check: bool = True,
               timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args]
        log = self.artifacts / "tasks.log"
        try:
            proc = run_in_group(cmd, cwd=REPO, env=self.env(), timeout=timeout)
        except TaskTimeout as exc:
            with log.open("a") as f:
                f.write(f"$ invoke {' '.join(args)}  (timed out)\n{exc}\n")
            raise
        with log.open("a") as f:
            f.write(f"$ invoke {' '.join(args)}  (exit {proc.returncode})\n{proc.stdout}"
                    f"{proc.stderr}\n")
        if check and proc.returncode != 0:
            raise AssertionError(f"invoke {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def start(self, *args: str) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args]
        return subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def status(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.invoke("lab.status", "--json").stdout)
        return rows


@pytest.fixture(scope="session")
def e2e_lab(request: pytest.FixtureRequest) -> Iterator[E2ELab]:
    reason = docker_unreachable()
    if reason:
        pytest.skip(f"no Docker daemon reachable ({reason}): the e2e suite needs real clusters")
    artifacts = artifacts_dir()
    artifacts.mkdir(parents=True, exist_ok=True)
    chosen = request.config.getoption("--e2e-config") or (
        "config/mesh.yaml" if request.config.getoption("--mesh") else "config/lab.yaml")
    raw = yaml.safe_load((REPO / chosen).read_text())
    raw["stateDir"] = str(artifacts / "state")
    config_path = artifacts / "lab.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    lab = E2ELab(config_path, load_config(config_path), artifacts,
                 os.environ.get("LAB_KUBECONFIG"))
    task = "lab.mesh" if lab.cfg.is_mesh else "lab.up"
    started = time.monotonic()
    try:
        try:
            lab.invoke(task)
        except BaseException:  # a failed assertion, a timeout, Ctrl-C: diagnostics first
            diagnose(lab, artifacts / "diagnostics")
            raise
        lab.up_seconds = time.monotonic() - started
        yield lab
    finally:
        try:
            rows = timings(lab.cfg)
            table = timings_table(rows)
            print("\n" + table)
            (artifacts / "timings.txt").write_text(table + "\n")
            write_timings(rows, artifacts / "timings.json",
                          {"config": chosen, "bringUpSeconds": round(lab.up_seconds, 1),
                           **lab.extra})
        finally:
            if not request.config.getoption("--e2e-keep"):
                lab.invoke("lab.down", check=False, timeout=1200)


def diagnose(lab: E2ELab, out: Path) -> None:
    """Best effort: a failure while collecting never hides the failure being diagnosed."""
    try:
        collect_diagnostics(lab.cfg, out, lab.kubeconfig)
    except Exception as exc:  # written next to what was collected
        out.mkdir(parents=True, exist_ok=True)
        (out / "collect.error.txt").write_text(f"{type(exc).__name__}: {exc}\n")


def namespaces(lab: E2ELab) -> set[str]:
    names: set[str] = set()
    for c in lab.cfg.clusters:
        kube = KubeClient(c.kube_context, lab.kubeconfig)
        try:
            names |= {f"{c.kube_context}/{n['metadata']['name']}"
                      for n in kube.list("v1", "Namespace")}
        finally:
            kube.close()
    return names


@pytest.fixture(autouse=True)
def remove_test_namespaces(request: pytest.FixtureRequest) -> Iterator[None]:
    """Namespaces a test creates are deleted after it, passed or failed (after the failure's
    diagnostics, which the report hook collects before teardown)."""
    if "e2e_lab" not in request.fixturenames:
        yield
        return
    lab: E2ELab = request.getfixturevalue("e2e_lab")
    before = namespaces(lab)
    yield
    for key in sorted(namespaces(lab) - before):
        context, name = key.split("/", 1)
        if name in LAB_NAMESPACES:
            continue
        kube = KubeClient(context, lab.kubeconfig)
        try:
            kube.delete("v1", "Namespace", name)
        finally:
            kube.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when in ("setup", "call") and report.failed:
        lab = item.funcargs.get("e2e_lab") if hasattr(item, "funcargs") else None
        if isinstance(lab, E2ELab):
            diagnose(lab, lab.artifacts / "diagnostics" / item.name)
