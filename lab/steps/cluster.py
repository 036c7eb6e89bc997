"""Step `cluster`: a kind cluster ready for Cilium (no default CNI, no kube-proxy).

Adopts an existing cluster of the same name when it matches the config, refuses when it does not,
and replaces a half-created one left behind by a killed `kind create`. The gate holds when the API
server answers and every node is registered; nodes stay NotReady until the CNI step.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import yaml

from lab.errors import LabError, ToolError
from lab.kube import KubeError
from lab.steps.base import Rendered, StepContext, Verdict, dump_yaml

KIND_CONFIG_FILE = "kind.yaml"
# kind locks the kubeconfig with O_EXCL and no retry: clusters advancing in parallel take turns.
_KUBECONFIG_LOCK = threading.Lock()


def kind_kubeconfig_write(ctx: StepContext, args: list[str], doing: str,
                           timeout: float = 120) -> None:
    if ctx.kubeconfig:
        args = [*args, "--kubeconfig", ctx.kubeconfig]
    for attempt in range(4):
        with _KUBECONFIG_LOCK:
            res = ctx.tools.run("kind", args, check=False, timeout=timeout, doing=doing)
        if res.returncode == 0:
            return
        # Another process (a user's kubectl, another lab) may hold kind's lock file briefly.
        if "lock" not in res.stderr or attempt == 3:
            raise ToolError(res.command, res.returncode, res.stderr,
                            f"{doing} failed; fix the cause above and run "
                            "`invoke lab.up --resume`")
        time.sleep(0.5 * (attempt + 1))


def kind_config(ctx: StepContext) -> dict[str, Any]:
    c = ctx.cluster
    image = ctx.lab.versions.node_image
    g = c.gateway
    mappings = [
        {"containerPort": g.http_node_port, "hostPort": g.http_host_port,
         "listenAddress": g.listen_address, "protocol": "TCP"},
        {"containerPort": g.https_node_port, "hostPort": g.https_host_port,
         "listenAddress": g.listen_address, "protocol": "TCP"},
    ]
    nodes: list[dict[str, Any]] = [
        {"role": "control-plane", "image": image, "extraPortMappings": mappings}]
    nodes += [{"role": "worker", "image": image} for _ in range(c.workers)]
    return {
        "kind": "Cluster",
        "apiVersion": "kind.x-k8s.io/v1alpha4",
        "name": c.name,
        "networking": {
            "disableDefaultCNI": True,  # Cilium is the CNI
            "kubeProxyMode": "none",  # Cilium replaces kube-proxy
            "podSubnet": c.pod_cidr,
            "serviceSubnet": c.service_cidr,
        },
        "nodes": nodes,
    }


class ClusterStep:
    name = "cluster"
    title = "kind cluster"

    def render(self, ctx: StepContext) -> Rendered:
        cfg_path = ctx.work_dir / KIND_CONFIG_FILE
        return Rendered(
            files={KIND_CONFIG_FILE: dump_yaml(kind_config(ctx))},
            commands=[["kind", "create", "cluster", "--name", ctx.cluster.name,
                       "--config", str(cfg_path)]],
        )

    def _exists(self, ctx: StepContext) -> bool:
        res = ctx.tools.run("kind", ["get", "clusters"], doing="listing kind clusters")
        return ctx.cluster.name in res.stdout.split()

    def apply(self, ctx: StepContext) -> None:
        name = ctx.cluster.name
        ctx.tools.require("kind")
        ctx.tools.require("docker")
        rendered = self.render(ctx)
        cfg_path = ctx.write_file(KIND_CONFIG_FILE, rendered.files[KIND_CONFIG_FILE])
        if self._exists(ctx) and self._adopt(ctx):
            return
        ctx.log.info("cluster.create", config=str(cfg_path))
        # kind writes the kubeconfig context itself at the end of a create.
        kind_kubeconfig_write(ctx, ["create", "cluster", "--name", name, "--config",
                                     str(cfg_path)], f"creating kind cluster {name!r}",
                               timeout=900)
        ctx.facts["createdBy"] = "kind-cilium-lab"
        ctx.facts["created"] = True
        ctx.reset_kube()

    def _export(self, ctx: StepContext) -> None:
        kind_kubeconfig_write(ctx, ["export", "kubeconfig", "--name", ctx.cluster.name],
                               "exporting the kubeconfig")
        ctx.reset_kube()

    def _answers(self, ctx: StepContext) -> KubeError | None:
        try:
            ctx.kube.version()
            return None
        except KubeError as exc:
            return exc

    def _adopt(self, ctx: StepContext) -> bool:
        """True when the existing cluster is ours to keep; False when it must be recreated."""
        name = ctx.cluster.name
        exc = self._answers(ctx)  # the context usually exists and answers: no kubeconfig write
        if exc is not None:
            try:
                self._export(ctx)
                exc = self._answers(ctx)
            except ToolError as export_failed:  # e.g. kubeadm never wrote admin.conf
                exc = KubeError(export_failed.message)
        if exc is not None:
            if ctx.record.last_ok("cluster") is None:
                # A `kind create` that was killed leaves containers whose API never came up.
                ctx.log.warning("cluster.half_created", error=exc.message)
                ctx.tools.run("kind", ["delete", "cluster", "--name", name],
                              doing=f"removing the half-created cluster {name!r}")
                return False
            raise LabError(
                f"kind cluster {name!r} exists but its API server does not answer",
                f"start its containers (`docker start {name}-control-plane`), or recreate it "
                f"with `invoke lab.down --cluster {name}` then `invoke lab.up`") from exc
        mismatches = self.mismatches(ctx)
        if mismatches:
            raise LabError(
                f"a kind cluster named {name!r} already exists and does not match the config: "
                + "; ".join(mismatches),
                f"delete it (`kind delete cluster --name {name}`) or rename the lab's cluster "
                "in the config; the lab never modifies a cluster it did not create to fit")
        ctx.log.info("cluster.adopted")
        return True

    def mismatches(self, ctx: StepContext) -> list[str]:
        """How the running cluster differs from what the config asks for."""
        c = ctx.cluster
        found: list[str] = []
        cm = ctx.kube.get("v1", "ConfigMap", "kubeadm-config", "kube-system")
        if cm:
            kubeadm = yaml.safe_load(cm.get("data", {}).get("ClusterConfiguration", "")) or {}
            net = kubeadm.get("networking", {})
            if net.get("podSubnet") and net["podSubnet"] != c.pod_cidr:
                found.append(f"pod subnet is {net['podSubnet']}, config says {c.pod_cidr}")
            if net.get("serviceSubnet") and net["serviceSubnet"] != c.service_cidr:
                found.append(f"service subnet is {net['serviceSubnet']}, config says "
                             f"{c.service_cidr}")
        if ctx.kube.get("apps/v1", "DaemonSet", "kube-proxy", "kube-system"):
            found.append("kube-proxy is installed (the lab needs kubeProxyMode: none)")
        if ctx.kube.get("apps/v1", "DaemonSet", "kindnet", "kube-system"):
            found.append("kindnet is installed (the lab needs disableDefaultCNI: true)")
        nodes = {n["metadata"]["name"] for n in ctx.kube.list("v1", "Node")}
        if nodes and nodes != set(c.node_names):
            found.append(f"nodes are {sorted(nodes)}, config wants {c.node_names}")
        return found

    def ready(self, ctx: StepContext) -> Verdict:
        v = Verdict("cluster")
        try:
            info = ctx.kube.version()
            v.add("api-server answers", True, str(info.get("gitVersion", "")))
        except KubeError as exc:
            v.add("api-server answers", False, exc.message)
            return v
        nodes = {n["metadata"]["name"] for n in ctx.kube.list("v1", "Node")}
        missing = sorted(set(ctx.cluster.node_names) - nodes)
        v.add("nodes registered", not missing,
              f"missing {', '.join(missing)}" if missing else f"{len(nodes)} node(s)")
        return v

    def probe(self, ctx: StepContext) -> Verdict:
        v = Verdict("cluster")
        if not v.add("kind cluster exists", self._exists(ctx)):
            return v
        try:
            ctx.kube.version()
            v.add("api-server answers", True)
        except KubeError as exc:
            v.add("api-server answers", False, exc.message)
        return v
