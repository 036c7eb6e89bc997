"""Step `meshed`: Cilium Cluster Mesh between every cluster of the lab, declared in Helm values.

Peering is declarative (`clustermesh.config.clusters` in the Cilium chart values) rather than
made with `cilium clustermesh connect`: the values are computed from the config and the peers'
node addresses, so re-running converges (helm changes nothing when the values are equal), a crash
mid-way is repaired like any other release, and removing a cluster is re-rendering the others'
values without it. The shared lab CA (step `cni`) means the chart's "remote" client certificate of
each cluster is trusted by every peer, so no per-peer TLS material is exchanged.

The gate proves the mesh end to end: every agent reports every peer ready, and a global service
(`service.cilium.io/global: "true"`) answers from the other clusters' pods.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lab.errors import LabError
from lab.helm import ensure_release
from lab.kube import KubeError, condition_true
from lab.state import STATES
from lab.steps.base import Check, Rendered, StepContext, Verdict, applied, helm_upgrade_command
from lab.steps.cni import cilium_release, cilium_values

DEMO_NAMESPACE = "lab-mesh"
DEMO_SERVICE = "echo-global"
DEMO_PORT = 8080
DEMO_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.53"
PROBE_POD = "mesh-probe"
APISERVER_PORT = 2379  # clustermesh-apiserver's etcd port behind the NodePort
UNRESOLVED = "<resolved at apply: the peer's control-plane address on the kind network>"


def expected_peers(ctx: StepContext) -> list[str]:
    """The other clusters of the lab that exist (their record is past `locked` or at it)."""
    peers = []
    for other in ctx.lab.clusters:
        if other.name == ctx.cluster.name:
            continue
        state = ctx.store.load(other.name).state
        if STATES.index(state) >= STATES.index("locked"):
            peers.append(other.name)
    return peers


def node_address_command(node: str) -> list[str]:
    return ["docker", "inspect", node, "--format", "{{json .NetworkSettings.Networks}}"]


def node_address(ctx: StepContext, node: str) -> str:
    """The node container's IPv4 address on the lab's Docker network."""
    res = ctx.tools.run("docker", node_address_command(node)[1:],
                        doing=f"reading the address of {node}")
    networks = json.loads(res.stdout or "{}")
    address = (networks.get(ctx.lab.docker_network) or {}).get("IPAddress")
    if not address:
        raise LabError(f"{node} has no address on the Docker network {ctx.lab.docker_network!r}",
                       "is the cluster running? `invoke lab.status` shows it")
    return str(address)


def demo_objects(ctx: StepContext) -> list[dict[str, Any]]:
    """The same global Service in every cluster; each cluster's pods carry its name."""
    name = f"echo-{ctx.cluster.name}"
    labels = {"app.kubernetes.io/name": "echo-global", "lab.kind-cilium/cluster": ctx.cluster.name}
    container = {
        "name": "echo", "image": DEMO_IMAGE,
        "args": ["netexec", f"--http-port={DEMO_PORT}"],
        "ports": [{"name": "http", "containerPort": DEMO_PORT}],
        "readinessProbe": {"httpGet": {"path": "/", "port": DEMO_PORT}},
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                      "limits": {"memory": "64Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                            "runAsUser": 65534, "capabilities": {"drop": ["ALL"]}},
    }
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": DEMO_NAMESPACE, "labels": {"lab.kind-cilium/app": "mesh-demo"}}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": name, "namespace": DEMO_NAMESPACE, "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels},
                               "spec": {"containers": [container]}}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": DEMO_SERVICE, "namespace": DEMO_NAMESPACE,
                      "annotations": {"service.cilium.io/global": "true"}},
         "spec": {"selector": {"app.kubernetes.io/name": "echo-global"},
                  "ports": [{"name": "http", "port": DEMO_PORT, "targetPort": DEMO_PORT}]}},
        # Under the lab's default deny: the demo's pods (of any cluster) may talk to each other.
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": {"name": "mesh-demo", "namespace": DEMO_NAMESPACE},
         "spec": {
             "description": "mesh demo: probe → echo-global pods in every cluster on 8080",
             "endpointSelector": {"matchLabels": {"app.kubernetes.io/name": "echo-global"}},
             "ingress": [{"fromEndpoints": [{"matchLabels": {
                 "k8s:io.kubernetes.pod.namespace": DEMO_NAMESPACE,
                 "app.kubernetes.io/name": "mesh-probe"}}],
                 "toPorts": [{"ports": [{"port": str(DEMO_PORT), "protocol": "TCP"}]}]}]}},
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": {"name": "mesh-probe", "namespace": DEMO_NAMESPACE},
         "spec": {
             "description": "mesh probe → echo-global pods of every cluster on 8080",
             "endpointSelector": {"matchLabels": {"app.kubernetes.io/name": "mesh-probe"}},
             "egress": [{"toEndpoints": [{"matchLabels": {
                 "k8s:io.kubernetes.pod.namespace": DEMO_NAMESPACE,
                 "app.kubernetes.io/name": "echo-global"}}],
                 "toPorts": [{"ports": [{"port": str(DEMO_PORT), "protocol": "TCP"}]}]}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": PROBE_POD, "namespace": DEMO_NAMESPACE,
                      "labels": {"app.kubernetes.io/name": "mesh-probe"}},
         "spec": {"containers": [{
             "name": "probe", "image": DEMO_IMAGE, "args": ["pause"],
             "resources": {"requests": {"cpu": "5m", "memory": "8Mi"},
                           "limits": {"memory": "32Mi"}},
             "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                 "runAsUser": 65534, "capabilities": {"drop": ["ALL"]}}}]}},
    ]


class MeshStep:
    name = "meshed"
    title = "Cluster Mesh"

    def _peer_entries(self, ctx: StepContext, resolve: bool) -> list[dict[str, Any]]:
        entries = []
        names = expected_peers(ctx) if resolve else [
            c.name for c in ctx.lab.clusters if c.name != ctx.cluster.name]
        known = {p["name"]: p for p in ctx.facts.get("meshPeers", [])}
        for name in names:
            peer = ctx.lab.cluster(name)
            if resolve:
                ips = [node_address(ctx, peer.control_plane)]
            else:
                ips = known.get(name, {}).get("ips", [UNRESOLVED])
            entries.append({"name": name, "port": peer.clustermesh_node_port, "ips": ips})
        return entries

    def render(self, ctx: StepContext) -> Rendered:
        release = cilium_release(ctx, cilium_values(ctx, peers=self._peer_entries(ctx, False)))
        peers = [c.name for c in ctx.lab.clusters if c.name != ctx.cluster.name]
        return Rendered(helm=[release], objects=demo_objects(ctx),
                        commands=[*(node_address_command(f"{p}-control-plane") for p in peers),
                                  helm_upgrade_command(ctx, release, secret_values=True),
                                  *applied(*demo_objects(ctx))])

    def apply(self, ctx: StepContext) -> None:
        if not ctx.lab.is_mesh:
            raise LabError("`meshed` needs at least two clusters in the config",
                           "use config/mesh.yaml or stop at `locked`")
        peers = self._peer_entries(ctx, True)
        ctx.facts["meshPeers"] = peers
        ensure_release(ctx, cilium_release(ctx, cilium_values(ctx, peers=peers)),
                       secret_values=_ca_values(ctx))
        for obj in demo_objects(ctx):
            ctx.kube.apply(obj)

    def ready(self, ctx: StepContext) -> Verdict:
        v = Verdict("meshed")
        k = ctx.kube
        dep = k.get("apps/v1", "Deployment", "clustermesh-apiserver", "kube-system")
        v.add("clustermesh-apiserver ready", condition_true(dep, "Available"),
              "missing" if dep is None else "")
        v.checks.append(ctx.pods_check(
            "clustermesh-apiserver pods run",
            k.list("v1", "Pod", "kube-system", label_selector="k8s-app=clustermesh-apiserver"),
            k.list("v1", "Node")))
        peers = [p["name"] for p in ctx.facts.get("meshPeers", [])]
        v.checks.append(self._agents_connected(ctx, peers))
        v.checks.append(self._global_service(ctx, peers))
        return v

    def _agents_connected(self, ctx: StepContext, peers: list[str]) -> Check:
        name = "every agent connected to every remote cluster"
        agents = ctx.kube.list("v1", "Pod", "kube-system", label_selector="k8s-app=cilium")
        if not agents:
            return Check(name, False, "no Cilium agent pods")
        problems = []
        for pod in agents:
            pod_name = pod["metadata"]["name"]
            try:
                res = ctx.kube.exec("kube-system", pod_name, ["cilium-dbg", "status", "-o", "json"],
                                    container="cilium-agent", timeout=20)
                remote = remote_clusters(res.stdout)
            except (KubeError, ValueError) as exc:
                problems.append(f"{pod_name}: {exc}")
                continue
            for peer in peers:
                state = remote.get(peer)
                if state is None:
                    problems.append(f"{pod_name}: {peer} unknown")
                elif not state.get("ready"):
                    problems.append(f"{pod_name}: {peer} not ready ({state.get('status', '')})")
        return Check(name, not problems,
                     "; ".join(problems) if problems
                     else f"{len(agents)} agent(s) × {len(peers)} peer(s) ready")

    def _global_service(self, ctx: StepContext, peers: list[str]) -> Check:
        name = "global service answered from the other clusters"
        if not peers:
            return Check(name, True, "no other cluster is in the mesh (the lab has one left)")
        absent = [p for p in peers if not _joining(ctx, p)]
        if absent:
            return Check(name, False, f"{', '.join(absent)} has not joined the mesh yet: run "
                         "`invoke lab.mesh` (every cluster joins in parallel)")
        probe = ctx.kube.get("v1", "Pod", PROBE_POD, DEMO_NAMESPACE)
        if not condition_true(probe, "Ready"):
            return Check(name, False, "the mesh probe pod is not ready")
        url = f"http://{DEMO_SERVICE}.{DEMO_NAMESPACE}.svc.cluster.local:{DEMO_PORT}/hostname"
        seen: set[str] = set()
        # Global services balance across clusters; a few requests reach every peer.
        for _ in range(8 * (len(peers) + 1)):
            try:
                # agnhost is Alpine with curl; netexec's /hostname answers with the pod name.
                res = ctx.kube.exec(DEMO_NAMESPACE, PROBE_POD,
                                    ["curl", "-s", "-m", "2", url], timeout=10)
            except KubeError as exc:
                return Check(name, False, exc.message)
            if res.returncode == 0:
                seen.add(res.stdout.strip())
            if all(any(_pod_of(h, p) for h in seen) for p in peers):
                return Check(name, True, f"answered by {', '.join(sorted(seen))}")
        missing = [p for p in peers if not any(_pod_of(h, p) for h in seen)]
        return Check(name, False, f"no answer from {', '.join(missing)} (seen: "
                     f"{', '.join(sorted(seen)) or 'nothing'})")

    def probe(self, ctx: StepContext) -> Verdict:
        v = Verdict("meshed")
        recorded = sorted((p["name"], tuple(p.get("ips", ()))) for p in
                          ctx.facts.get("meshPeers", []))
        wanted = sorted((p["name"], tuple(p["ips"])) for p in self._peer_entries(ctx, True))
        v.add("peers as configured", recorded == wanted,
              f"recorded {recorded}, now {wanted}" if recorded != wanted else "")
        v.add("clustermesh-apiserver installed", ctx.kube.get(
            "apps/v1", "Deployment", "clustermesh-apiserver", "kube-system") is not None)
        return v


def _pod_of(hostname: str, cluster: str) -> bool:
    """A pod of Deployment echo-<cluster>: <deployment>-<replicaset hash>-<5 characters>."""
    return re.fullmatch(rf"echo-{re.escape(cluster)}-[a-z0-9]{{1,10}}-[a-z0-9]{{5}}",
                        hostname) is not None


def _joining(ctx: StepContext, peer: str) -> bool:
    """A peer serves the global demo once it is meshed, or while its meshed step runs."""
    record = ctx.store.load(peer)
    running = record.running
    return record.state == "meshed" or (running is not None and running.name == "meshed")


def remote_clusters(status_json: str) -> dict[str, dict[str, Any]]:
    """`cilium-dbg status -o json` → {remote cluster name: RemoteCluster}."""
    data = json.loads(status_json)
    clusters = (data.get("cluster-mesh") or {}).get("clusters") or []
    return {c["name"]: c for c in clusters if isinstance(c, dict) and "name" in c}


def _ca_values(ctx: StepContext) -> dict[str, Any]:
    from lab import ca

    return ca.load_or_create(ctx.lab.state_dir).helm_values()
