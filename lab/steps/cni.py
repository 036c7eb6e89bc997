"""Step `cni`: Gateway API CRDs, then Cilium 1.18 (kube-proxy replacement, Hubble), readiness-gated.

Order matters: Cilium's operator checks the Gateway API CRDs once at start-up and never enables
its Gateway controller if one is missing, and the chart creates the `cilium` GatewayClass only when
the GatewayClass CRD exists at install time. So the CRDs go first.

Only the standard channel is installed. TLSRoute (experimental, v1alpha2) is optional for Cilium
1.18; the lab serves HTTP and HTTPS with TLS terminated at the Gateway, and mixing one experimental
CRD into a standard-channel install is what Gateway API's own guidance warns against.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from lab import ca, yamlio
from lab.errors import LabError
from lab.helm import ensure_release
from lab.hubble import relay_serves
from lab.kube import KubeError, condition, condition_true, deployment_available
from lab.steps.base import HelmRelease, Rendered, StepContext, Verdict, helm_upgrade_command

MANIFESTS = Path(__file__).resolve().parent.parent.parent / "manifests"
GATEWAY_API_BASE = ("https://raw.githubusercontent.com/kubernetes-sigs/gateway-api/{version}/"
                    "config/crd/standard/")
CILIUM_REPO = ("cilium", "https://helm.cilium.io/")
DAEMONSETS = ("cilium", "cilium-envoy")
DEPLOYMENTS = ("cilium-operator", "hubble-relay", "hubble-ui")


def gateway_api_crds(version: str) -> list[tuple[str, str]]:
    """(file name, sha256) of the pinned standard-channel CRDs."""
    path = MANIFESTS / f"gateway-api-{version}-standard.sha256"
    if not path.exists():
        raise LabError(f"no pinned checksums for Gateway API {version} ({path})",
                       "use the Gateway API version this release of the lab pins (v1.4.0)")
    out = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split()
            out.append((name, digest))
    return out


def crd_name(file_name: str) -> str:
    """`gateway.networking.k8s.io_gateways.yaml` holds `gateways.gateway.networking.k8s.io`."""
    group, plural = file_name.removesuffix(".yaml").split("_", 1)
    return f"{plural}.{group}"


def cilium_values(ctx: StepContext,
                  peers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The Cilium chart values for this cluster (validated against the chart in the tests).

    In a multi-cluster lab the clustermesh-apiserver is installed from the start; the peers come
    from the `meshed` step (``peers``, else what it recorded) so every step renders the same values.
    """
    c = ctx.cluster
    nodes = 1 + c.workers
    values: dict[str, Any] = {
        "cluster": {"name": c.name, "id": c.id},
        # eBPF replaces kube-proxy; without kube-proxy the agent must be told where the API is.
        "kubeProxyReplacement": True,
        "k8sServiceHost": c.control_plane,
        "k8sServicePort": 6443,
        # Pod CIDRs come from the kind config (kubeadm), so mesh clusters never overlap.
        "ipam": {"mode": "kubernetes"},
        # The operator's anti-affinity is required: a second replica on one node stays Pending.
        "operator": {"replicas": 1 if nodes == 1 else 2, "rollOutPods": True},
        "rollOutCiliumPods": True,
        "gatewayAPI": {"enabled": True},
        "envoy": {"enabled": True},
        "l7Proxy": True,
        # L2 announcements renew one lease per announced Service every leaseRenewDeadline (5s):
        # QPS ≈ services ÷ 5s; the default 10/20 leaves little room for the agent's own calls.
        "l2announcements": {"enabled": True},
        "k8sClientRateLimit": {"qps": 20, "burst": 40},
        "hubble": {
            "enabled": True,
            "relay": {"enabled": True, "rollOutPods": True},
            "ui": {"enabled": True, "rollOutPods": True},
            "tls": {"enabled": True, "auto": {"enabled": True, "method": "helm"}},
        },
        # eBPF masquerading turns on eBPF host routing, which bypasses Docker's embedded DNS on
        # kind nodes (cilium#23283): keep the iptables path.
        "bpf": {"masquerade": False},
    }
    if ctx.lab.is_mesh:
        values.update(mesh_values(ctx, peers if peers is not None
                                  else ctx.facts.get("meshPeers")))
    return values


def mesh_values(ctx: StepContext, peers: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The clustermesh part of the Cilium values for this cluster."""
    c = ctx.cluster
    mesh: dict[str, Any] = {
        "useAPIServer": True,
        "apiserver": {
            # Distinct per cluster: under kube-proxy replacement a NodePort shared by two clusters
            # is answered by the local cluster (cilium#24692).
            "service": {"type": "NodePort", "nodePort": c.clustermesh_node_port},
            "tls": {"auto": {"enabled": True, "method": "helm"}},
        },
    }
    if peers is not None:
        mesh["config"] = {"enabled": True, "clusters": peers}
    return {"clustermesh": mesh}


def cilium_release(ctx: StepContext, values: dict[str, Any] | None = None) -> HelmRelease:
    return HelmRelease(release="cilium", chart="cilium/cilium", repo_name=CILIUM_REPO[0],
                       repo_url=CILIUM_REPO[1], version=ctx.lab.versions.cilium,
                       namespace="kube-system",
                       values=values if values is not None else cilium_values(ctx))


class CniStep:
    name = "cni"
    title = "Gateway API CRDs + Cilium + Hubble"

    def render(self, ctx: StepContext) -> Rendered:
        version = ctx.lab.versions.gateway_api
        base = GATEWAY_API_BASE.format(version=version)
        sources = [{"url": base + name, "sha256": digest}
                   for name, digest in gateway_api_crds(version)]
        release = cilium_release(ctx)
        return Rendered(
            files={"cni/gateway-api-crds.sources.yaml": yaml.safe_dump(
                {"gatewayAPI": version, "channel": "standard", "crds": sources},
                sort_keys=False)},
            helm=[release],
            # As `apply` runs: the CRDs (each file's one CRD, named after the file), then Cilium.
            commands=[*(["apply", f"CustomResourceDefinition {crd_name(name)}"]
                        for name, _ in gateway_api_crds(version)),
                      helm_upgrade_command(ctx, release, secret_values=True)],
            objects=[],
        )

    # -- apply ------------------------------------------------------------------------------------

    def apply(self, ctx: StepContext) -> None:
        for crd in self.fetch_crds(ctx):
            ctx.kube.apply(crd)
        self._wait_crds_established(ctx)
        lab_ca = ca.load_or_create(ctx.lab.state_dir)
        ensure_release(ctx, cilium_release(ctx), secret_values=lab_ca.helm_values())

    def fetch_crds(self, ctx: StepContext) -> list[dict[str, Any]]:
        """Download (or reuse the cached copy of) each pinned CRD, verifying its SHA-256."""
        version = ctx.lab.versions.gateway_api
        cache = ctx.lab.state_dir / "cache" / f"gateway-api-{version}"
        cache.mkdir(parents=True, exist_ok=True)
        base = GATEWAY_API_BASE.format(version=version)
        docs: list[dict[str, Any]] = []
        for name, digest in gateway_api_crds(version):
            path = cache / name
            data = path.read_bytes() if path.exists() else None
            if data is None or hashlib.sha256(data).hexdigest() != digest:
                data = _download(base + name)
                actual = hashlib.sha256(data).hexdigest()
                if actual != digest:
                    raise LabError(
                        f"{base + name} has sha256 {actual}, the lab pins {digest}",
                        "a proxy or mirror changed the file; fetch it from the official "
                        "Gateway API release, then retry")
                # a temp name of its own: parallel clusters share this cache
                fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{name}.", suffix=".tmp")
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, path)
            docs.extend(d for d in yamlio.load_all(data) if d)
        return docs

    def _wait_crds_established(self, ctx: StepContext) -> None:
        names = [crd_name(n) for n, _ in gateway_api_crds(ctx.lab.versions.gateway_api)]

        def gate() -> Verdict:
            v = Verdict("gateway-api-crds")
            for name in names:
                crd = ctx.kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name)
                est = condition(crd, "Established")
                v.add(f"crd {name} established", bool(est and est.get("status") == "True"))
            return v

        ctx.wait_for(gate, 60, "Gateway API CRDs established")

    # -- gate -------------------------------------------------------------------------------------

    def ready(self, ctx: StepContext) -> Verdict:
        v = Verdict("cni")
        k = ctx.kube
        for name in DAEMONSETS:
            ds = k.get("apps/v1", "DaemonSet", name, "kube-system")
            v.add(f"daemonset {name} rolled out", *_daemonset_ready(ds))
        for name in DEPLOYMENTS + (("clustermesh-apiserver",) if ctx.lab.is_mesh else ()):
            dep = k.get("apps/v1", "Deployment", name, "kube-system")
            v.add(f"deployment {name} available", *deployment_available(dep))
        nodes = k.list("v1", "Node")
        not_ready = [n["metadata"]["name"] for n in nodes
                     if not condition_true(n, "Ready")]
        v.add("nodes Ready", bool(nodes) and not not_ready,
              f"not Ready: {', '.join(not_ready)}" if not_ready else f"{len(nodes)} Ready")
        pods = k.list("v1", "Pod", "kube-system")
        v.checks.append(ctx.pods_check("no Pending or failed pods in kube-system", pods, nodes))
        agents = [p for p in pods if p["metadata"].get("labels", {}).get("k8s-app") == "cilium"]
        unhealthy = [p["metadata"]["name"] for p in agents if not condition_true(p, "Ready")]
        # The agent's readiness probe is its own /healthz, which answers OK only while
        # `cilium-dbg status` is healthy: a Ready agent pod is the agent's own verdict.
        v.add("every agent healthy", len(agents) == len(nodes) and not unhealthy,
              f"unhealthy: {', '.join(unhealthy)}" if unhealthy
              else f"{len(agents)} agent(s) for {len(nodes)} node(s)")
        cnodes = {n["metadata"]["name"] for n in k.list("cilium.io/v2", "CiliumNode")} \
            if k.serves("cilium.io/v2", "CiliumNode") else set()
        missing = sorted({n["metadata"]["name"] for n in nodes} - cnodes)
        v.add("every node registered with Cilium", not missing,
              f"no CiliumNode for {', '.join(missing)}" if missing else "")
        v.checks.append(self._relay_check(ctx, agents, len(nodes)))
        return v

    def _relay_check(self, ctx: StepContext, agents: list[dict[str, Any]],
                     node_count: int) -> Any:
        """Hubble relay serving flows for every node, asked from an agent through the relay."""
        from lab.steps.base import Check

        ready_agents = [p for p in agents if condition_true(p, "Ready")]
        svc = ctx.kube.get("v1", "Service", "hubble-relay", "kube-system")
        if not ready_agents or not svc:
            return Check("hubble relay serves every node", False,
                         "no ready agent" if not ready_agents else "no hubble-relay Service")
        ip = svc.get("spec", {}).get("clusterIP")
        port = (svc.get("spec", {}).get("ports") or [{}])[0].get("port", 80)
        try:
            res = ctx.kube.exec("kube-system", ready_agents[0]["metadata"]["name"],
                                ["hubble", "status", "--server", f"{ip}:{port}", "-o", "json"],
                                container="cilium-agent", timeout=20)
        except KubeError as exc:
            return Check("hubble relay serves every node", False, exc.message)
        verdict = relay_serves(res.stdout, node_count)
        if res.returncode != 0 or verdict is None:
            return Check("hubble relay serves every node", False,
                         (res.stderr or res.stdout).strip()[:200] or f"exit {res.returncode}")
        ok, detail = verdict
        return Check("hubble relay serves every node", ok, detail)

    def probe(self, ctx: StepContext) -> Verdict:
        v = Verdict("cni")
        ds = ctx.kube.get("apps/v1", "DaemonSet", "cilium", "kube-system")
        v.add("cilium installed", ds is not None)
        v.add("gateway API CRDs present",
              ctx.kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition",
                           "gateways.gateway.networking.k8s.io") is not None)
        return v


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            data: bytes = resp.read()
            return data
    except OSError as exc:
        raise LabError(f"could not download {url} ({exc})",
                       "check the internet connection (or proxy settings), then retry") from exc


def _daemonset_ready(ds: dict[str, Any] | None) -> tuple[bool, str]:
    if ds is None:
        return False, "missing"
    st, gen = ds.get("status", {}), ds["metadata"].get("generation")
    desired = st.get("desiredNumberScheduled", 0)
    ready, updated = st.get("numberReady", 0), st.get("updatedNumberScheduled", 0)
    available = st.get("numberAvailable", 0)
    if st.get("observedGeneration") != gen:
        return False, f"observedGeneration {st.get('observedGeneration')} ≠ generation {gen}"
    ok = desired > 0 and desired == ready == updated == available
    return ok, f"{ready}/{desired} ready, {updated} updated, {available} available"
