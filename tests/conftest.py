"""Shared fixtures: a lab wired to real API servers (envtest, behind an ``ApiFront``) and the fake
kind/helm/docker on PATH.

The fakes live in tests/fakes/bin and are put on PATH for the subprocesses the tests start; the
product code under lab/ runs unchanged against them and against a real HTTP API server.
"""

from __future__ import annotations

import json
import os
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

from tests.fakes.fakelib import fakes_path
from tests.support import deps, warm
from tests.support.apifront import ApiFront

REPO = Path(__file__).resolve().parent.parent
FAKE_BIN = REPO / "tests" / "fakes" / "bin"


def with_fakes(path: str) -> str:
    """PATH with the fake kind/helm/docker first (their C launchers where the session built
    them) and the running interpreter next, so the fakes' `#!/usr/bin/env -S python3 -S` finds
    it rather than a version-manager shim (pyenv's adds ~80 ms to every call)."""
    return fakes_path(path)


def upstream_dir() -> Path:
    """The pinned upstream files (skips, or fails under CI, where they are unavailable)."""
    return deps.require_upstream()


# Modules whose module-scoped fixture is a whole lab: under xdist all of a module's tests go to one
# worker, or each worker would build the fixture again (the mesh is a `lab.mesh` on two real API
# servers). Real servers are started per worker as its tests need them at once (~9 s of CPU each),
# so the modules that lease the most share one: the mesh and the README walk (one cluster and a
# mesh) on one worker, the module-wide labs and namespace tests on one server of another.
XDIST_GROUPS = {
    "test_mesh": "mesh", "test_readme_walk": "mesh", "test_imagecache": "imagecache",
    "test_gateway_certs": "gateway_certs", "test_locked": "locked",
    "test_policy_oracle": "policy_oracle", "test_servicemap": "servicemap",
    "test_lab_flow": "envtest-shared", "test_envtest_api": "envtest-shared",
    "test_api_front": "envtest-shared"}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one xdist worker")
    if getattr(config.option, "dist", "no") == "load":  # `-n N`: honour the groups below
        config.option.dist = "loadgroup"
    if getattr(config, "workerinput", {}).get("lab_loadgroup"):
        config.option.loadgroup = True  # a worker parses the command line, not our switch
    deps.configure(config)  # fetch missing upstream files; one line for what is still missing


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, controller side: tell each worker that groups are on."""
    node.workerinput["lab_loadgroup"] = node.config.getvalue("dist") == "loadgroup"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if hasattr(item, "module") else ""
        if module in XDIST_GROUPS:
            item.add_marker(pytest.mark.xdist_group(XDIST_GROUPS[module]))
    if getattr(config.option, "loadgroup", False) or config.getoption("dist", "no") == "loadgroup":
        # The two longest groups first, one per worker, while the rest fills in around them:
        # started last, either would leave the other worker idle at the end.
        first = ("mesh", "envtest-shared")
        items.sort(key=lambda i: next((n for n, g in enumerate(first) if any(
            m.args == (g,) for m in i.iter_markers("xdist_group"))), len(first)))


def load_upstream_crds(emu: ApiFront, *folders: str) -> None:
    """Write upstream CRDs (e.g. "cilium-1.18.4/crds") to the server behind ``emu``, as a
    chart or an operator installs them: only those missing or different (Cilium's operator
    updates a CRD only when its schema changed; a no-op update of a large CRD costs the server
    ~0.1 s of CPU). Parsed once per run."""
    from tests.support.envtest import load_yaml_docs

    api = "apiextensions.k8s.io/v1"
    have = {c["metadata"]["name"]: c for c in emu.list(api, "CustomResourceDefinition")}
    for folder in folders:
        for doc in load_yaml_docs(upstream_dir() / folder):  # parsed once, copied each time
            current = have.get(doc["metadata"]["name"])
            if current is None or current.get("spec") != _with_defaults(doc)["spec"]:
                emu.put(doc)


def _with_defaults(crd: dict[str, Any]) -> dict[str, Any]:
    """``crd`` as the server stores it: what it defaults in a CRD's spec filled in."""
    spec = dict(crd["spec"])
    spec.setdefault("conversion", {"strategy": "None"})
    names = dict(spec["names"])
    names.setdefault("listKind", f"{names['kind']}List")
    names.setdefault("singular", names["kind"].lower())
    spec["names"] = names
    return {**crd, "spec": spec}


@dataclass
class LabEnv:
    """One lab in a temp dir: config, state, fakes' state, kubeconfig, the API front of each
    cluster."""

    root: Path
    config: Path
    fake_state: Path
    kubeconfig: Path
    fronts: dict[str, ApiFront]
    # environment forced on every run, e.g. a longer gate timeout against real API servers
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / ".lab"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PATH": with_fakes(env.get("PATH", "")),
            "LAB_FAKE_STATE": str(self.fake_state),
            "KUBECONFIG": str(self.kubeconfig),
            "LAB_CONFIG": str(self.config),
            "LAB_GATE_TIMEOUT": "6",
            "LAB_LOG_FORMAT": "json",
            "LAB_SKIP_DOCTOR": "1",
            "PYTHONPATH": str(REPO),
            "NO_COLOR": "1",
        })
        env.update(extra)
        env.update(self.overrides)
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args]

    def run(self, *args: str, check: bool = True, timeout: float = 90,
            **extra_env: str) -> subprocess.CompletedProcess[str]:
        proc = warm.run(self.command(*args), cwd=self.root, env=self.env(**extra_env),
                        capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                                 f"stderr:\n{proc.stderr[-4000:]}")
        return proc

    def start(self, *args: str, **extra_env: str) -> subprocess.Popen[str]:
        return warm.popen(self.command(*args), cwd=self.root, env=self.env(**extra_env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)

    def calls(self, tool: str | None = None, sub: str | None = None) -> list[list[str]]:
        path = self.fake_state / "calls.jsonl"
        if not path.exists():
            return []
        out = []
        # complete lines only: a fake may be appending its line right now
        for line in path.read_text().split("\n")[:-1]:
            call = json.loads(line)
            argv = call["argv"]
            if tool and call["tool"] != tool:
                continue
            if sub and (not argv or argv[0] != sub):
                continue
            out.append(argv)
        return out

    def wait_for_call(self, tool: str, words: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(all(w in argv for w in words) for argv in self.calls(tool)):
                return
            time.sleep(0.05)
        raise AssertionError(f"{tool} {words} was never called: {self.calls(tool)}")

    def record(self, cluster: str = "lab") -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            (self.state_dir / "clusters" / f"{cluster}.json").read_text())
        return data

    @staticmethod
    def kill(proc: subprocess.Popen[str]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def write_config(path: Path, clusters: list[dict[str, Any]] | None = None,
                 **top: Any) -> Path:
    raw = yaml.safe_load((REPO / "config" / "lab.yaml").read_text())
    raw["stateDir"] = str(path.parent / ".lab")
    if clusters is not None:
        raw["clusters"] = clusters
    raw.update(top)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake kind/helm/docker first on PATH for code run in this process; their state dir."""
    state = tmp_path / "fake"
    state.mkdir()
    monkeypatch.setenv("PATH", with_fakes(os.environ.get("PATH", "")))
    monkeypatch.setenv("LAB_FAKE_STATE", str(state))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "user-kubeconfig"))  # never the real one
    return state


def step_context(tmp_path: Path, raw: dict[str, Any], emu: ApiFront | None = None,
                 timeouts: Any = None, bin_dir: Path | None = None) -> Any:
    """A StepContext for the first cluster of ``raw`` (state under tmp_path), talking to ``emu``
    through a kubeconfig of its own (or to nothing)."""
    from lab import logs
    from lab.config import parse_config
    from lab.state import Record, StateStore
    from lab.steps.base import StepContext
    from lab.tools import Tools

    raw = {**raw, "stateDir": str(tmp_path / ".lab")}
    cfg = parse_config(raw, tmp_path / "lab.yaml")
    c = cfg.clusters[0]
    kubeconfig = str(emu.write_kubeconfig(tmp_path / "kubeconfig", context=c.kube_context)) \
        if emu else str(tmp_path / "no-kubeconfig")
    log = logs.get("test")
    return StepContext(cfg, c, StateStore(cfg.state_dir), Record(cluster=c.name),
                       Tools(bin_dir, log, pinned={}), log, timeouts, kubeconfig)


def ready_node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"conditions": [{"type": "Ready", "status": "False",
                                       "reason": "KubeletNotReady",
                                       "message": "container runtime network not ready: "
                                                  "cni plugin not initialized"}]}}


def _lab_env(tmp_path: Path, front: ApiFront) -> LabEnv:
    fake_state = tmp_path / "fake"
    fake_state.mkdir()
    front.put(ready_node("lab-control-plane"))
    (fake_state / "apiservers.json").write_text(json.dumps({"lab": front.url}))
    return LabEnv(root=tmp_path, config=write_config(tmp_path / "lab.yaml"),
                  fake_state=fake_state, kubeconfig=tmp_path / "kubeconfig",
                  fronts={"lab": front})


@pytest.fixture
def lab_env(tmp_path: Path, kube_api: Any) -> LabEnv:
    """The shipped single-cluster lab against a clean real API server (the pinned CRDs and nothing
    else) behind an ``ApiFront``; its node registered, not Ready (no CNI yet)."""
    return _lab_env(tmp_path, kube_api)


@pytest.fixture
def bare_lab_env(tmp_path: Path, bare_kube_api: Any) -> LabEnv:
    """``lab_env`` on a server without any CRD, as kind leaves a new cluster."""
    return _lab_env(tmp_path, bare_kube_api)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kind-cilium-lab e2e")
    group.addoption("--mesh", action="store_true",
                    help="e2e: bring up config/mesh.yaml (two clusters, Cluster Mesh)")
    group.addoption("--e2e-config", default=None,
                    help="e2e: bring up this config instead of config/lab.yaml")
    group.addoption("--e2e-keep", action="store_true",
                    help="e2e: leave the lab running at the end (no lab.down)")


# -- fake calls from a warm server ----------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def warm_fakes() -> Iterator[None]:
    """The fake kind/helm/docker calls of this test process fork from a warm fake server
    (tests/fakes/warmfakes.py) instead of each starting an interpreter; ``LAB_TEST_COLD_TASKS=1``
    (or a server that cannot start) leaves every call to start fresh."""
    from tests.fakes.warmfakes import WarmFakeServer

    if os.environ.get(warm.COLD_ENV):
        yield
        return
    try:
        server = WarmFakeServer()
    except RuntimeError:
        yield
        return
    server.export()
    try:
        yield
    finally:
        server.stop()


# -- the real API server tier (envtest) ---------------------------------------------------------

@pytest.fixture(scope="session")
def envtest_pool() -> Iterator[Any]:
    """Starts real API servers on demand (at most ``ServerPool.LIMIT`` in a session, ~420 MB
    each) and stops whatever is left at the end."""
    from tests.support.deps import require_envtest
    from tests.support.envtest import ServerPool

    pool = ServerPool(require_envtest(), upstream_dir())  # one skip reason (fails under CI)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def envtest(envtest_pool: Any) -> Iterator[Any]:
    """A real API server with the pinned CRDs Established, lent to this module (reset first):
    its tests isolate by namespace (``envtest_namespace``), apply with dryRun or share one lab."""
    with envtest_pool.lease() as (server,):
        yield server


@pytest.fixture
def envtest_cluster(envtest_pool: Any) -> Iterator[Any]:
    """A real API server for this test alone: the pinned CRDs Established and nothing else (lent
    by the pool, reset in etcd)."""
    with envtest_pool.lease() as (server,):
        yield server


def _front(server: Any) -> Iterator[Any]:
    front = ApiFront(server.client.as_user_agent("test")).start()
    try:
        yield front
        # a test's controller hook that crashed inside a write must not pass for a failing gate
        assert front.callback_errors == [], "a test hook of the API front crashed"
    finally:
        front.stop()


@pytest.fixture
def kube_api(envtest_cluster: Any) -> Iterator[Any]:
    """``ApiFront`` over this test's clean real API server: what the product's kubeconfig points
    at (``write_kubeconfig``), with the test-side calls, recording, faults and exec hooks."""
    yield from _front(envtest_cluster)


@pytest.fixture
def bare_kube_api(envtest_pool: Any) -> Iterator[Any]:
    """Like ``kube_api``, on a server without even the pinned CRDs (a cluster kind just made)."""
    with envtest_pool.lease(crds=False) as (server,):
        yield from _front(server)


@pytest.fixture
def envtest_namespace(envtest: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace on the shared real API server."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{name}-{uuid.uuid4().hex[:6]}"
    envtest.client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    # No namespace controller: the namespace stays Terminating with its objects in it, so the
    # objects that other tests' controllers react to (Gateways, Services) go first.
    for api_version, kind in (("gateway.networking.k8s.io/v1", "Gateway"), ("v1", "Service")):
        for obj in envtest.client.list(api_version, kind, name):
            envtest.client.delete(api_version, kind, obj["metadata"]["name"], name)
    envtest.client.delete("v1", "Namespace", name)
