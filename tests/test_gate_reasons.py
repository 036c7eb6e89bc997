"""Gates name why they do not hold, end early when waiting cannot help, report while they wait,
accept the relay's mesh-wide node count, and a Ctrl-C is recorded as an interruption.

Pod and node fields are the ones the kubelet writes (Kubernetes v1.33:
pkg/kubelet/images/types.go, pkg/kubelet/kuberuntime/kuberuntime_container.go,
pkg/kubelet/container/sync_result.go; core/v1 PodScheduled/Unschedulable, node pressure
conditions); ``hubble status -o json`` is protojson with proto names (cilium v1.18.4
api/v1/observer/observer.pb.json.go, UseProtoNames) of observer.ServerStatusResponse.
"""

from __future__ import annotations

import copy
import io
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from lab.errors import GateTimeout, LabError
from lab.steps.base import CANCELLED, Check, StepContext, Timeouts, Verdict
from lab.steps.cni import CniStep
from tests.conftest import REPO, step_context
from tests.support import objects
from tests.support.apifront import ApiFront

NODE = "lab-control-plane"
AGENT_IMAGE = "quay.io/cilium/cilium:v1.18.4@sha256:" + "0" * 64
PODS_CHECK = "no Pending or failed pods in kube-system"


def relay_status(connected: int, unavailable: int = 0, names: tuple[str, ...] = ()) -> str:
    """`hubble status -o json`: protojson, proto field names, UInt32Value wrappers as numbers."""
    body: dict[str, Any] = {"num_flows": "4095", "max_flows": "4095", "seen_flows": "9000",
                            "uptime_ns": "123456789000", "num_connected_nodes": connected,
                            "num_unavailable_nodes": unavailable, "version": "1.18.4"}
    if names:
        body["unavailable_nodes"] = list(names)
    return json.dumps(body) + "\n"


@pytest.fixture
def cni(tmp_path: Path, kube_api: ApiFront) -> tuple[ApiFront, StepContext]:
    """A kube-system where Cilium and Hubble are healthy on one node (a real API server); the
    relay answers."""
    emu = kube_api
    for obj in objects.cni_ready([NODE]):
        emu.put(obj)
    emu.on_exec(lambda ns, pod, container, cmd: (0, relay_status(1), "")
                if cmd[:2] == ["hubble", "status"] else (1, "", "unexpected command"))
    raw = yaml.safe_load((REPO / "config" / "lab.yaml").read_text())
    ctx = step_context(tmp_path, raw, emu, Timeouts(cni=5, poll_start=0.05, poll_max=0.2))
    return emu, ctx


def kube_system_pod(name: str, *, phase: str = "Pending", ready: bool = False,
                    waiting: tuple[str, str] | None = None, restarts: int = 0,
                    scheduled: tuple[str, str] | None = None, container: str = "cilium-agent",
                    node: str | None = NODE, owner: str | None = "DaemonSet",
                    image: str = AGENT_IMAGE) -> dict[str, Any]:
    """A Pod as the kubelet and scheduler report it."""
    status: dict[str, Any] = {"phase": phase, "conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}]}
    if scheduled is not None:
        reason, message = scheduled
        status["conditions"].append({"type": "PodScheduled", "status": "False",
                                     "reason": reason, "message": message})
    if waiting is not None:
        reason, message = waiting
        status["containerStatuses"] = [{
            "name": container, "image": image, "imageID": "", "ready": False,
            "restartCount": restarts, "started": False,
            "state": {"waiting": {"reason": reason, "message": message}}}]
    meta: dict[str, Any] = {"name": name, "namespace": "kube-system",
                            "labels": {"k8s-app": "cilium-test"}}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner, "name": "cilium",
                                    "uid": "1", "controller": True}]
    spec: dict[str, Any] = {"containers": [{"name": container, "image": image}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def failing(verdict: Verdict) -> dict[str, Check]:
    return {c.name: c for c in verdict.failing}


# -- the reason is named -------------------------------------------------------------------------

PULL_MESSAGE = ('Back-off pulling image "' + AGENT_IMAGE + '": ErrImagePull: failed to pull '
                'and unpack image: dial tcp: lookup quay.io: no such host')


@pytest.mark.parametrize(("pod", "expected"), [
    (kube_system_pod("cilium-pull", waiting=("ImagePullBackOff", PULL_MESSAGE)),
     ["kube-system/cilium-pull (cilium-agent)", "ImagePullBackOff",
      "lookup quay.io: no such host"]),
    (kube_system_pod("cilium-crash", phase="Running",
                     waiting=("CrashLoopBackOff", "back-off 20s restarting failed container"),
                     restarts=2),
     ["kube-system/cilium-crash (cilium-agent)", "CrashLoopBackOff", "2 restarts"]),
    (kube_system_pod("cilium-cfg", waiting=(
        "CreateContainerConfigError", 'secret "cilium-ca" not found')),
     ["CreateContainerConfigError", 'secret "cilium-ca" not found']),
    (kube_system_pod("coredns-x", node=None, scheduled=(
        "Unschedulable", "0/1 nodes are available: 1 node(s) had untolerated taint "
        "{node.kubernetes.io/not-ready: }.")),
     ["coredns-x", "unschedulable", "untolerated taint {node.kubernetes.io/not-ready: }"]),
], ids=["image pull back-off", "crash loop", "config error", "unschedulable"])
def test_the_gate_names_why_a_pod_is_not_ready(cni: tuple[ApiFront, StepContext],
                                               pod: dict[str, Any], expected: list[str]) -> None:
    emu, ctx = cni
    emu.put(pod)
    bad = failing(CniStep().ready(ctx))
    assert PODS_CHECK in bad, bad
    for text in expected:
        assert text in bad[PODS_CHECK].detail, bad[PODS_CHECK].detail


def test_node_pressure_is_named_with_the_pod_it_keeps_out(
        cni: tuple[ApiFront, StepContext]) -> None:
    emu, ctx = cni
    node = copy.deepcopy(emu.get("v1", "Node", NODE))
    assert node is not None
    node["status"]["conditions"].append({
        "type": "DiskPressure", "status": "True", "reason": "KubeletHasDiskPressure",
        "message": "kubelet has disk pressure"})
    emu.put(node)
    emu.put(kube_system_pod("coredns-x", node=None, scheduled=(
        "Unschedulable", "0/1 nodes are available: 1 node(s) had untolerated taint "
        "{node.kubernetes.io/disk-pressure: }.")))
    detail = failing(CniStep().ready(ctx))[PODS_CHECK].detail
    assert "DiskPressure" in detail and NODE in detail, detail


# -- terminal conditions end the wait early, with the reason and a fix ----------------------------

def _wait(ctx: StepContext, timeout: float) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        ctx.wait_for(lambda: CniStep().ready(ctx), timeout, "the cni gate")
    except LabError as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


@pytest.mark.parametrize(("pod", "expected", "fix"), [
    (kube_system_pod("cilium-bad", waiting=(
        "InvalidImageName", 'Failed to apply default image tag "quay.io/cilium/cilium:v1.18.4@'
                            'sha256:nothex": couldn\'t parse image name')),
     "InvalidImageName", "malformed"),
    (kube_system_pod("cilium-crash", phase="Running",
                     waiting=("CrashLoopBackOff", "back-off 40s restarting failed container"),
                     restarts=3),
     "3 restarts", "kubectl -n kube-system logs cilium-crash -c cilium-agent --previous"),
], ids=["invalid image name", "crash loop at 3 restarts"])
def test_a_terminal_condition_ends_the_wait_at_once(cni: tuple[ApiFront, StepContext],
                                                    pod: dict[str, Any], expected: str,
                                                    fix: str) -> None:
    emu, ctx = cni
    emu.put(pod)
    error, took = _wait(ctx, 4)
    assert error is not None and not isinstance(error, GateTimeout), error
    assert took < 2, took
    assert expected in error.message and fix in error.hint, (error.message, error.hint)


def test_an_image_pull_error_ends_the_wait_once_it_persists(
        cni: tuple[ApiFront, StepContext]) -> None:
    emu, ctx = cni
    ctx.timeouts.image_pull = 0.6  # the lab's default is minutes: a pull may be slow or retried
    emu.put(kube_system_pod("cilium-pull", waiting=("ErrImagePull", PULL_MESSAGE)))
    error, took = _wait(ctx, 4)
    assert error is not None and not isinstance(error, GateTimeout), error
    assert 0.5 <= took < 2.5, took
    assert "ErrImagePull" in error.message and "crictl pull" in error.hint, error


def test_a_young_image_pull_error_is_waited_out_but_named(
        cni: tuple[ApiFront, StepContext]) -> None:
    emu, ctx = cni
    ctx.timeouts.image_pull = 60
    emu.put(kube_system_pod("cilium-pull", waiting=("ErrImagePull", PULL_MESSAGE)))
    error, _ = _wait(ctx, 0.8)
    assert isinstance(error, GateTimeout), error
    assert "ErrImagePull" in error.message


def test_a_crash_loop_below_three_restarts_is_not_terminal(
        cni: tuple[ApiFront, StepContext]) -> None:
    emu, ctx = cni
    emu.put(kube_system_pod("cilium-crash", phase="Running", restarts=2,
                            waiting=("CrashLoopBackOff", "back-off 20s")))
    error, _ = _wait(ctx, 0.8)
    assert isinstance(error, GateTimeout), error


@pytest.mark.parametrize("phase", ["Failed", "Unknown"])
def test_a_leftover_pod_from_an_earlier_attempt_does_not_block(
        cni: tuple[ApiFront, StepContext], phase: str) -> None:
    emu, ctx = cni
    emu.put(kube_system_pod("cilium-old", phase=phase, node="lab-worker-gone"))
    verdict = CniStep().ready(ctx)
    assert verdict.ready, verdict.explain()


# -- the live view shows the failing checks while a gate waits -----------------------------------

def test_a_waiting_gate_reports_its_failing_checks_at_normal_verbosity(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "config" / "lab.yaml").read_text())
    ctx = step_context(tmp_path, raw, None, Timeouts(poll_start=0.05, poll_max=0.1))
    ctx.timeouts.report_every = 0.3

    def gate() -> Verdict:
        v = Verdict("cni")
        v.add("deployment hubble-relay available", False, "0/1 ready")
        return v

    with structlog.testing.capture_logs() as captured, pytest.raises(GateTimeout):
        ctx.wait_for(gate, 1.0, "the cni gate")
    reports = [e for e in captured if e["event"] == "gate.waiting" and e["log_level"] == "info"]
    assert 2 <= len(reports) <= 4, captured
    assert "deployment hubble-relay available: 0/1 ready" in json.dumps(reports[-1])


# -- 6. the relay after meshing ------------------------------------------------------------------

@pytest.mark.parametrize(("status", "ok", "detail"), [
    (relay_status(1), True, "1/1 local nodes connected"),
    (relay_status(3), True, "1/1 local nodes connected (3 in the mesh)"),
    (relay_status(3, 1, ("west/west-control-plane",)), False, "west/west-control-plane"),
    (relay_status(0, 1, (f"lab/{NODE}",)), False, f"lab/{NODE}"),
], ids=["alone", "meshed", "a remote node unavailable", "the local node unavailable"])
def test_the_relay_check_counts_local_nodes_whatever_the_mesh_adds(
        cni: tuple[ApiFront, StepContext], status: str, ok: bool, detail: str) -> None:
    emu, ctx = cni
    emu.on_exec(lambda *a: (0, status, ""))
    check = {c.name: c for c in CniStep().ready(ctx).checks}["hubble relay serves every node"]
    assert (check.ok, detail in check.detail) == (ok, True), check


# -- 8. Ctrl-C in parallel mode -----------------------------------------------------------------

class _NeverReady:
    """A step whose gate never holds (as a cluster that is still coming up)."""

    name = "cluster"
    title = "a step that waits"

    def __init__(self) -> None:
        self.waiting = threading.Semaphore(0)

    def render(self, ctx: StepContext) -> Any:
        raise AssertionError("not rendered")

    def apply(self, ctx: StepContext) -> None:
        pass

    def ready(self, ctx: StepContext) -> Verdict:
        self.waiting.release()
        return Verdict("cluster", [Check("api-server answers", False, "not yet")])

    def probe(self, ctx: StepContext) -> Verdict:
        return self.ready(ctx)


def test_ctrl_c_in_parallel_mode_records_interrupted(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.config import load_config
    from lab.runner import Lab
    from lab.state import StateStore
    from lab.ui import Progress

    raw = yaml.safe_load((REPO / "config" / "mesh.yaml").read_text())
    raw["stateDir"] = str(tmp_path / ".lab")
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "mesh.yaml")
    step = _NeverReady()
    monkeypatch.setattr("lab.runner.STEPS", {"cluster": step})
    lab = Lab(cfg, progress=Progress(stream=io.StringIO(), live=False),
              timeouts=Timeouts(cluster=60, poll_start=0.05, poll_max=0.1))

    def press_ctrl_c() -> None:  # SIGINT to the main thread, once both clusters wait
        for _ in cfg.clusters:
            step.waiting.acquire(timeout=20)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            lab.up(target="cluster")
    finally:
        CANCELLED.clear()
    assert time.monotonic() - started < 20
    store = StateStore(cfg.state_dir)
    for cluster in cfg.clusters:
        last = store.load(cluster.name).history[-1]
        assert (last.name, last.outcome) == ("cluster", "interrupted"), (cluster.name, last)
