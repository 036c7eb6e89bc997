"""Which Service holds a NodePort, and Kubernetes' static band (KEP-3668), on prepared Services.

Band sizes are worked by hand from kubernetes pkg/registry/core/service/portallocator/
allocator.go `calculateRangeOffset`: min(max(16, size/32), 128), 0 when size <= 16.
"""

from __future__ import annotations

from typing import Any

from lab.network import node_port_conflict, node_port_holders, static_band

GATEWAY = ("lab-gateway", "cilium-gateway-lab")


def svc(ns: str, name: str, *ports: tuple[str, int]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name},
            "spec": {"type": "NodePort",
                     "ports": [{"name": n, "port": 80, "nodePort": p} for n, p in ports]}}


def test_static_band_of_the_default_range_is_30000_to_30085() -> None:
    assert (static_band().start, static_band().stop - 1) == (30000, 30085)
    assert 30080 in static_band() and 30443 not in static_band() and 32379 not in static_band()


def test_static_band_bounds() -> None:
    assert len(static_band(30000, 30015)) == 0  # 16 ports: no band
    assert len(static_band(30000, 30099)) == 16  # 100/32 = 3, at least 16
    assert len(static_band(20000, 39999)) == 128  # 20000/32 = 625, at most 128


def test_the_service_holding_the_port_is_named_never_the_gateway_itself() -> None:
    services = [svc(*GATEWAY, ("port-80", 31234), ("port-443", 30443)),
                svc("shop", "web", ("http", 30443)),
                svc("default", "kubernetes")]
    holders = node_port_holders(services, [30080, 30443], GATEWAY)
    assert holders == {30443: "shop/web (port http)"}
    text = node_port_conflict(holders, {30443: "clusters[0].gateway.httpsNodePort"})
    assert "NodePort 30443 is held by Service shop/web (port http)" in text
    assert "kubectl -n shop edit service web" in text
    assert "clusters[0].gateway.httpsNodePort" in text and "30000-30085" in text


def test_no_holder_when_the_ports_are_free() -> None:
    assert node_port_holders([svc("shop", "web", ("http", 31000))], [30443], GATEWAY) == {}
