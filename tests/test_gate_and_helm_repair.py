"""Two guards each earlier suite let a mutation through: the gateway gate insists on a
LoadBalancer Service, and a release a killed `helm upgrade` left pending is rolled back (its
installed revision kept), not uninstalled."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.helm import ensure_release
from lab.steps.base import HelmRelease, StepContext
from lab.steps.gateway import GATEWAY_NAMESPACE, GATEWAY_SERVICE, ensure_node_ports
from tests.conftest import FAKE_BIN, REPO, step_context, with_fakes
from tests.fakes.fakelib import read_calls, wait_until_sleeping
from tests.support.apifront import ApiFront


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kube_api: ApiFront) -> StepContext:
    """The shipped lab's first cluster on a clean real API server, the fake helm on PATH."""
    monkeypatch.setenv("LAB_FAKE_STATE", str(tmp_path / "fake"))
    monkeypatch.setenv("PATH", with_fakes(os.environ["PATH"]))
    raw = yaml.safe_load((REPO / "config" / "lab.yaml").read_text())
    ctx: StepContext = step_context(tmp_path, raw, kube_api, bin_dir=FAKE_BIN)
    return ctx


def _gateway_service(emu_ctx: StepContext, type_: str) -> None:
    emu_ctx.kube.apply({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": GATEWAY_SERVICE, "namespace": GATEWAY_NAMESPACE},
        "spec": {"type": type_, "ports": [{"name": "port-80", "port": 80, "protocol": "TCP",
                                           "nodePort": 30080}]}})


def test_gateway_gate_fails_a_service_that_is_not_a_load_balancer(ctx: StepContext) -> None:
    ctx.kube.apply({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": GATEWAY_NAMESPACE}})
    _gateway_service(ctx, "NodePort")  # right ports, wrong type: never Programmed on 1.18
    ok, detail = ensure_node_ports(ctx, {"port-80": 30080})
    assert not ok
    assert "type is NodePort" in detail and "LoadBalancer" in detail
    _gateway_service(ctx, "LoadBalancer")
    assert ensure_node_ports(ctx, {"port-80": 30080}) == (True, "port-80→30080")


def test_a_nodeport_patch_that_races_cilium_is_refused_and_leaks_no_port(
        ctx: StepContext, kube_api: ApiFront) -> None:
    """The real server allocates a NodePort before its write and keeps it when the write is
    retried after losing to a concurrent one: the next patch then finds 30180 "already
    allocated" by no Service for ~10 minutes. So the gate patches only once LB IPAM has written
    the new Service's address, and only against the Service as it read it: when Cilium's
    operator rewrites the Service between the gate's read and its patch, the patch is refused
    and nothing is applied."""
    ctx.kube.apply({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": GATEWAY_NAMESPACE}})
    ctx.kube.apply({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": GATEWAY_SERVICE, "namespace": GATEWAY_NAMESPACE},
                    "spec": {"type": "LoadBalancer",
                             "ports": [{"name": "port-80", "port": 80, "protocol": "TCP"}]}})
    # Until LB IPAM has written the address (a write that follows the Service's creation), the
    # gate does not patch at all.
    kube_api.clear_requests()
    ok, detail = ensure_node_ports(ctx, {"port-80": 30180})
    assert not ok and detail.endswith("patching once LB IPAM has written the Service's address")
    assert [r for r in kube_api.writes() if r.path.endswith(GATEWAY_SERVICE)] == []
    kube_api.upstream.patch_status("v1", "Service", GATEWAY_SERVICE, GATEWAY_NAMESPACE,
                                   {"loadBalancer": {"ingress": [{"ip": "172.18.255.200"}]}})
    rewrites = []

    def cilium_rewrites_first(method: str, path: str) -> None:
        if method == "PATCH" and path.endswith(f"/services/{GATEWAY_SERVICE}") and not rewrites:
            rewrites.append(kube_api.upstream.merge_patch(
                "v1", "Service", GATEWAY_SERVICE, GATEWAY_NAMESPACE,
                {"metadata": {"labels": {"io.cilium.gateway/owning-gateway": "lab"}}}))
        return None

    kube_api.admission = cilium_rewrites_first
    random_port = ctx.kube.get("v1", "Service", GATEWAY_SERVICE,
                               GATEWAY_NAMESPACE)["spec"]["ports"][0]["nodePort"]
    ok, detail = ensure_node_ports(ctx, {"port-80": 30180})
    assert rewrites and not ok
    assert detail.endswith("the Service changed while patching (Cilium rewrites it); re-patching")
    svc = ctx.kube.get("v1", "Service", GATEWAY_SERVICE, GATEWAY_NAMESPACE)
    assert svc["spec"]["ports"][0]["nodePort"] == random_port  # nothing applied
    assert ensure_node_ports(ctx, {"port-80": 30180}) == (
        False, f"port-80 nodePort {random_port}, want 30180 — re-patched")
    assert ensure_node_ports(ctx, {"port-80": 30180}) == (True, "port-80→30180")


def _release(values: dict[str, Any]) -> HelmRelease:
    return HelmRelease(release="demo", chart="cilium/cilium", repo_name="cilium",
                       repo_url="https://helm.cilium.io/", version="1.18.4",
                       namespace="kube-system", values=values)


def _history(state: Path) -> list[tuple[int, str]]:
    helm = json.loads((state / "helm.json").read_text())
    return [(h["revision"], h["status"])
            for h in helm["kind-lab"]["kube-system/demo"]["history"]]


def test_a_pending_upgrade_is_rolled_back_not_uninstalled(ctx: StepContext,
                                                          tmp_path: Path) -> None:
    state = tmp_path / "fake"
    assert ensure_release(ctx, _release({"replicas": 1}))
    # A second upgrade killed while helm runs it leaves revision 2 pending-upgrade.
    upgrade = ["helm", "upgrade", "--install", "demo", "cilium/cilium", "--version", "1.18.4",
               "--namespace", "kube-system", "--kube-context", ctx.cluster.kube_context,
               "--kubeconfig", str(ctx.kubeconfig)]
    proc = subprocess.Popen(upgrade, env={**os.environ, "LAB_FAKE_SLEEP": "helm:upgrade=30"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_sleeping(state, "helm", ["upgrade", "demo"])
    finally:
        proc.kill()
        proc.wait(10)
    assert _history(state) == [(1, "deployed"), (2, "pending-upgrade")]

    assert ensure_release(ctx, _release({"replicas": 2}))
    ran = [c["argv"][:3] for c in read_calls(str(state)) if c["tool"] == "helm"
           and c["argv"][0] in ("rollback", "uninstall")]
    assert ran == [["rollback", "demo", "1"]]  # back to the last deployed revision
    assert _history(state)[-1] == (4, "deployed")  # 3 is the rollback, 4 the new upgrade
