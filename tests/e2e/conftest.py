"""The real-cluster suite: one lab brought up once per session through the real tasks.

Every test here is marked `e2e` (plain `pytest` deselects them; `nox -s e2e` runs them). Where no
Docker daemon answers, the session skips with one line. On any failure, diagnostics are collected
into `e2e-artifacts/diagnostics/` (kind logs, each agent's status, Hubble drops, events, records).
"""

from __future__ import annotations

import json
import os
import shutil
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
from tests.e2e.helpers import (
    artifacts_dir,
    collect_diagnostics,
    timings,
    timings_table,
    write_timings,
)

REPO = Path(__file__).resolve().parents[2]


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
        proc = subprocess.run(cmd, cwd=REPO, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, check=False)
        log = self.artifacts / "tasks.log"
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
        lab.invoke(task)
    except AssertionError:
        collect_diagnostics(lab.cfg, artifacts / "diagnostics", lab.kubeconfig)
        raise
    lab.up_seconds = time.monotonic() - started
    yield lab
    rows = timings(lab.cfg)
    table = timings_table(rows)
    print("\n" + table)
    (artifacts / "timings.txt").write_text(table + "\n")
    write_timings(rows, artifacts / "timings.json",
                  {"config": chosen, "bringUpSeconds": round(lab.up_seconds, 1), **lab.extra})
    if not request.config.getoption("--e2e-keep"):
        lab.invoke("lab.down", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        lab = item.funcargs.get("e2e_lab") if hasattr(item, "funcargs") else None
        if isinstance(lab, E2ELab):
            collect_diagnostics(lab.cfg, lab.artifacts / "diagnostics" / item.name,
                                lab.kubeconfig)
