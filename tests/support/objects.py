"""What a healthy cluster's objects look like after each step, in the API's real shapes.

Used to seed a real API server (directly, or as the fake helm's chart contents) so gates can be
tested condition by condition.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def _meta(name: str, namespace: str | None = None, labels: dict[str, str] | None = None,
          generation: int = 1) -> Obj:
    m: Obj = {"name": name, "generation": generation}
    if namespace:
        m["namespace"] = namespace
    if labels:
        m["labels"] = labels
    return m


def daemonset(name: str, nodes: int, namespace: str = "kube-system") -> Obj:
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": _meta(name, namespace, {"k8s-app": name}),
            "spec": {"selector": {"matchLabels": {"k8s-app": name}},
                     "template": {"metadata": {"labels": {"k8s-app": name}},
                                  "spec": {"containers": [{"name": name, "image": "x"}]}}},
            "status": {"desiredNumberScheduled": nodes, "currentNumberScheduled": nodes,
                       "numberReady": nodes, "updatedNumberScheduled": nodes,
                       "numberAvailable": nodes, "numberMisscheduled": 0,
                       "observedGeneration": 1}}


def deployment(name: str, namespace: str = "kube-system", replicas: int = 1) -> Obj:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(name, namespace, {"app.kubernetes.io/name": name}),
            "spec": {"replicas": replicas,
                     "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                     "template": {"metadata": {"labels": {"app.kubernetes.io/name": name}},
                                  "spec": {"containers": [{"name": name, "image": "x"}]}}},
            "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas,
                       "updatedReplicas": replicas, "availableReplicas": replicas,
                       "conditions": [{"type": "Available", "status": "True",
                                       "reason": "MinimumReplicasAvailable"},
                                      {"type": "Progressing", "status": "True",
                                       "reason": "NewReplicaSetAvailable"}]}}


def pod(name: str, namespace: str, labels: dict[str, str], node: str, ready: bool = True,
        phase: str = "Running", container: str = "main") -> Obj:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _meta(name, namespace, labels),
            "spec": {"nodeName": node, "containers": [{"name": container, "image": "x"}]},
            "status": {"phase": phase, "conditions": [
                {"type": "Ready", "status": "True" if ready else "False"}]}}


def node(name: str, ready: bool = True) -> Obj:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                       "reason": "KubeletReady" if ready else "KubeletNotReady"}],
                       "addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}}


def cilium_node(name: str) -> Obj:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": name},
            "spec": {}}


def service(name: str, namespace: str, cluster_ip: str, port: int,
            type_: str = "ClusterIP") -> Obj:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace),
            "spec": {"type": type_, "clusterIP": cluster_ip,
                     "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}]}}


def cni_ready(node_names: list[str]) -> list[Obj]:
    """kube-system after a healthy Cilium + Hubble install on these nodes."""
    n = len(node_names)
    objs: list[Obj] = [node(x) for x in node_names]
    objs += [daemonset("cilium", n), daemonset("cilium-envoy", n)]
    objs += [deployment(d) for d in ("cilium-operator", "hubble-relay", "hubble-ui")]
    objs += [pod(f"cilium-{i}", "kube-system", {"k8s-app": "cilium"}, x,
                 container="cilium-agent") for i, x in enumerate(node_names)]
    objs += [pod(f"cilium-envoy-{i}", "kube-system", {"k8s-app": "cilium-envoy"}, x)
             for i, x in enumerate(node_names)]
    objs += [cilium_node(x) for x in node_names]
    objs.append(service("hubble-relay", "kube-system", "10.96.100.10", 80))
    return objs


def hubble_status_json(connected: int, unavailable: int = 0) -> str:
    """What `hubble status -o json` prints through the relay: protojson of
    observer.ServerStatusResponse with proto field names, uint64 as strings, the UInt32Value
    wrappers as plain numbers (cilium v1.18.4 hubble/pkg/printer/printer_test.go L1517)."""
    return ('{"num_flows":"4095","max_flows":"4095","seen_flows":"12345",'
            '"uptime_ns":"123456789000",'
            f'"num_connected_nodes":{connected},"num_unavailable_nodes":{unavailable},'
            '"version":"hubble-relay v1.18.4"}\n')
