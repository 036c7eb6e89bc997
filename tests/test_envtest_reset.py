"""The clean real API servers the tests lease (``ServerPool.lease``) come back clean: what one
test created, changed or allocated is gone for the next, including what a real server would keep
(a Terminating namespace without a namespace controller, a NodePort allocation)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.envtest import ApiFailure

pytestmark = pytest.mark.envtest
GW = "gateway.networking.k8s.io/v1"


def _service(name: str, namespace: str, node_port: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": "NodePort", "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "nodePort": node_port}]}}


def test_what_a_test_left_behind_is_gone_for_the_next(envtest_pool: Any) -> None:
    with envtest_pool.lease() as (server,):
        api = server.client
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        api.create(_service("web", "shop", 30080))
        api.create({"apiVersion": GW, "kind": "GatewayClass", "metadata": {"name": "cilium"},
                    "spec": {"controllerName": "io.cilium/gateway-controller"}})
        default = api.get("v1", "Namespace", "default")
        api.put({**default, "metadata": {**default["metadata"], "labels": {"left": "behind"}}})
        api.delete("v1", "Namespace", "shop")  # Terminating for good: no namespace controller
        assert api.get("v1", "Namespace", "shop")["status"]["phase"] == "Terminating"
        with pytest.raises(ApiFailure, match="already allocated"):
            api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
            api.create(_service("other", "other", 30080))
    with envtest_pool.lease() as (again,):
        assert again is server  # the same server, not a new one
        api = again.client
        assert api.get("v1", "Namespace", "shop") is None
        assert api.get("v1", "Namespace", "other") is None
        assert api.list(GW, "GatewayClass") == []
        assert "left" not in (api.get("v1", "Namespace", "default")["metadata"].get("labels")
                              or {})
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        stored = api.create(_service("web", "shop", 30080))  # the NodePort is free again
        assert stored["spec"]["ports"][0]["nodePort"] == 30080


def test_a_bare_lease_serves_no_crds_and_the_next_one_serves_them_again(
        envtest_pool: Any) -> None:
    gateways = f"/apis/{GW}/gatewayclasses"
    with envtest_pool.lease(crds=False) as (server,):
        assert server.client.raw("GET", gateways)[0] == 404
        assert server.client.list("apiextensions.k8s.io/v1", "CustomResourceDefinition") == []
    with envtest_pool.lease() as (again,):
        assert again is server
        assert again.client.raw("GET", gateways)[0] == 200
        again.client.create({"apiVersion": GW, "kind": "GatewayClass",
                             "metadata": {"name": "cilium"},
                             "spec": {"controllerName": "io.cilium/gateway-controller"}})
