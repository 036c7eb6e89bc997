"""Every readiness gate holds on the real lab, every condition named and true."""

from __future__ import annotations

import ipaddress

from lab.state import STATES
from tests.e2e.conftest import E2ELab


def test_every_cluster_reached_its_target_and_every_gate_holds(e2e_lab: E2ELab) -> None:
    target = "meshed" if e2e_lab.cfg.is_mesh else "locked"
    rows = e2e_lab.status()
    assert [r["cluster"] for r in rows] == [c.name for c in e2e_lab.cfg.clusters]
    for row in rows:
        assert row["state"] == target, row
        assert list(row["gates"]) == list(STATES[1:STATES.index(target) + 1])
        for gate, verdict in row["gates"].items():
            failing = [c for c in verdict["checks"] if not c["ok"]]
            assert verdict["ready"] and not failing, (row["cluster"], gate, failing)


def test_cni_gate_proves_agents_and_relay(e2e_lab: E2ELab) -> None:
    """Every local node connected and none unavailable; after meshing the relay also connects
    to the other clusters' nodes, so the total may be larger."""
    for row in e2e_lab.status():
        checks = {c["name"]: c for c in row["gates"]["cni"]["checks"]}
        nodes = 1 + e2e_lab.cfg.cluster(row["cluster"]).workers
        relay = checks["hubble relay serves every node"]
        assert relay["ok"], relay
        assert relay["detail"].startswith(f"{nodes}/{nodes} local nodes connected"), relay
        assert "unavailable" not in relay["detail"], relay
        assert checks["every agent healthy"]["ok"]


def test_gateway_has_an_address_from_the_pool(e2e_lab: E2ELab) -> None:
    from lab.kube import KubeClient

    for row in e2e_lab.status():
        cluster = e2e_lab.cfg.cluster(row["cluster"])
        pool = ipaddress.ip_network(row["allocation"]["lbPool"])
        kube = KubeClient(cluster.kube_context, e2e_lab.kubeconfig)
        gw = kube.get("gateway.networking.k8s.io/v1", "Gateway", "lab", "lab-gateway")
        assert gw is not None
        addresses = [a["value"] for a in gw["status"]["addresses"]]
        assert addresses and all(ipaddress.ip_address(a) in pool for a in addresses)
        svc = kube.get("v1", "Service", "cilium-gateway-lab", "lab-gateway")
        assert svc is not None and svc["spec"]["type"] == "LoadBalancer"
        ports = {p["port"]: p["nodePort"] for p in svc["spec"]["ports"]}
        assert ports == {80: cluster.gateway.http_node_port,
                         443: cluster.gateway.https_node_port}
