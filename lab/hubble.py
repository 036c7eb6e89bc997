"""Hubble access: the UI through a port-forward, and flows cluster-wide through hubble-relay.

Flows are read with the `hubble` CLI that ships in the Cilium agent image, pointed at the relay's
ClusterIP, so what the user sees is the relay's cluster-wide view, not one node's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lab.errors import LabError
from lab.kube import KubeClient, condition_true

VERDICTS = ("FORWARDED", "DROPPED", "AUDIT", "REDIRECTED", "ERROR", "TRACED", "TRANSLATED")
UI_PORT = 8081  # hubble-ui's frontend container port


@dataclass(frozen=True)
class ObserveFilter:
    verdict: str | None = None
    namespace: str | None = None
    pod: str | None = None
    follow: bool = True
    last: int | None = None
    output: str = "compact"

    def validate(self) -> None:
        if self.verdict and self.verdict.upper() not in VERDICTS:
            raise LabError(f"unknown verdict {self.verdict!r}",
                           f"use one of: {', '.join(VERDICTS)}")
        if self.last is not None and self.last <= 0:
            raise LabError("--last must be a positive number of flows", "e.g. --last 100")
        if self.output not in ("compact", "dict", "json", "jsonpb", "table"):
            raise LabError(f"unknown output {self.output!r}", "use compact, dict, json or table")

    def args(self) -> list[str]:
        out: list[str] = []
        if self.verdict:
            out += ["--verdict", self.verdict.upper()]
        if self.namespace:
            out += ["--namespace", self.namespace]
        if self.pod:
            out += ["--pod", self.pod]
        if self.last is not None:
            out += ["--last", str(self.last)]
        if self.follow:
            out.append("--follow")
        return [*out, "--output", self.output]


def relay_address(kube: KubeClient) -> str:
    svc = kube.get("v1", "Service", "hubble-relay", "kube-system")
    if not svc:
        raise LabError("hubble-relay is not installed in this cluster",
                       "bring the lab to `cni` or later: `invoke lab.up --to cni`")
    spec = svc.get("spec", {})
    port = (spec.get("ports") or [{}])[0].get("port", 80)
    return f"{spec.get('clusterIP')}:{port}"


def ready_pod(kube: KubeClient, namespace: str, selector: str, what: str) -> str:
    for pod in kube.list("v1", "Pod", namespace, label_selector=selector):
        if condition_true(pod, "Ready"):
            return str(pod["metadata"]["name"])
    raise LabError(f"no ready {what} pod ({namespace}, {selector})",
                   "check `invoke lab.status`; the cni gate names what is not ready")


def observe_command(kube: KubeClient, flt: ObserveFilter) -> list[str]:
    return ["hubble", "observe", "--server", relay_address(kube), *flt.args()]


def observe(kube: KubeClient, flt: ObserveFilter) -> Iterator[str]:
    """Stream flows from the relay (run in a Cilium agent pod, where the hubble CLI lives)."""
    flt.validate()
    agent = ready_pod(kube, "kube-system", "k8s-app=cilium", "Cilium agent")
    return kube.exec_stream("kube-system", agent, observe_command(kube, flt),
                            container="cilium-agent")


def parse_flows(text: str) -> list[dict[str, Any]]:
    """`hubble observe -o json` output: one JSON object per line, the flow under "flow"."""
    flows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        flow = data.get("flow", data)
        if isinstance(flow, dict) and "verdict" in flow:
            flows.append(flow)
    return flows


def relay_serves(text: str, local_nodes: int) -> tuple[bool, str] | None:
    """Judge `hubble status -o json` asked through the relay: every node of this cluster
    connected and none unavailable (None: not a status). After meshing the relay also connects
    to every remote cluster's nodes (the peer service announces all nodes it knows), so the
    count only has to cover the local nodes.

    The output is protojson of observer.ServerStatusResponse with proto field names (cilium
    v1.18.4 api/v1/observer/observer.pb.json.go); the UInt32Value wrappers print as plain numbers.
    """
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None

    def number(*keys: str) -> int | None:
        for key in keys:
            value = data.get(key)
            if isinstance(value, dict):  # a wrapper printed as a message: {"value": N}
                value = value.get("value", 0)
            if value is not None:
                return int(value)
        return None

    connected = number("num_connected_nodes", "numConnectedNodes")
    if connected is None:
        return None
    unavailable = number("num_unavailable_nodes", "numUnavailableNodes") or 0
    names = [str(n) for n in data.get("unavailable_nodes", data.get("unavailableNodes")) or []]
    ok = connected >= local_nodes and unavailable == 0
    detail = f"{min(connected, local_nodes)}/{local_nodes} local nodes connected"
    if connected > local_nodes:
        detail += f" ({connected} in the mesh)"
    if unavailable:
        detail += f"; {unavailable} unavailable" + (f": {', '.join(names)}" if names else "")
    return ok, detail
