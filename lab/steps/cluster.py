"""Step `cluster`: a kind cluster ready for Cilium (no default CNI, no kube-proxy).

Adopts an existing cluster of the same name when it matches the config (networking, nodes and the
host-port mappings kind cannot add later), refuses when it does not, and replaces only a
half-created cluster this lab's own `kind create` left behind. The gate holds when the API server
answers and every node is registered; nodes stay NotReady until the CNI step.

kind puts nodes on the Docker network `kind` unless ``KIND_EXPERIMENTAL_DOCKER_NETWORK`` names
another (kind v0.29.0 ``pkg/cluster/internal/providers/docker/provider.go``), so every kind call
carries it when the config's ``dockerNetwork`` is not `kind`.

kind writes a kubeconfig with a plain ``os.WriteFile`` under an ``O_EXCL`` lock file it never
waits for (``.../kubeconfig/internal/kubeconfig/{write,lock}.go``); `kind create` takes that
lock only for its final export, after the nodes exist (``pkg/cluster/internal/create/create.go``).
So creates run in parallel, a lock error at the end of a create is answered by an export, and
only the short exports and deletes take turns here.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from lab import imagecache, yamlio
from lab.errors import LabError, ToolError
from lab.kube import KubeError
from lab.steps.base import Rendered, StepContext, Verdict, dump_yaml
from lab.tools import Result

KIND_CONFIG_FILE = "kind.yaml"
KIND_NETWORK = "kind"
NETWORK_ENV = "KIND_EXPERIMENTAL_DOCKER_NETWORK"
LOCK_ERROR = "failed to lock config file"
ALREADY_EXISTS = "node(s) already exist for a cluster"
CREATE_STARTED = "kindCreateStarted"  # fact saved before `kind create`, dropped once it finished
# Kubeconfig writes of clusters advancing in parallel take turns here (never across a create).
_KUBECONFIG_LOCK = threading.Lock()


def kind_env(ctx: StepContext) -> dict[str, str]:
    """The environment every kind call gets: the Docker network, when it is not kind's own."""
    net = ctx.lab.docker_network
    return {} if net == KIND_NETWORK else {NETWORK_ENV: net}


def cluster_kubeconfig(state_dir: Path, cluster: str) -> Path:
    """The cluster's own kubeconfig file: kind, helm and the API client of one cluster share it
    and no other cluster writes it, so parallel clusters never read each other's half-written
    kubeconfig."""
    return state_dir / "kubeconfig" / f"{cluster}.yaml"


def uses_own_kubeconfig(ctx: StepContext) -> bool:
    return bool(ctx.kubeconfig) and \
        Path(str(ctx.kubeconfig)) == cluster_kubeconfig(ctx.lab.state_dir, ctx.cluster.name)


def _kind(ctx: StepContext, args: list[str], doing: str, timeout: float = 120,
          user_kubeconfig: bool = False) -> Result:
    """Run kind; create/delete/export write the context's kubeconfig (``user_kubeconfig``: the
    user's own, i.e. kind's default: $KUBECONFIG or ~/.kube/config)."""
    if ctx.kubeconfig and not user_kubeconfig and args[0] in ("create", "delete", "export"):
        args = [*args, "--kubeconfig", ctx.kubeconfig]
    return ctx.tools.run("kind", args, check=False, timeout=timeout, doing=doing,
                         env=kind_env(ctx))


def _failed(res: Result, doing: str) -> ToolError:
    return ToolError(res.command, res.returncode, res.stderr,
                     f"{doing} failed; fix the cause above and run `invoke lab.up --resume`")


def kind_kubeconfig_write(ctx: StepContext, args: list[str], doing: str,
                          timeout: float = 120) -> None:
    """A short kind command that writes the kubeconfig (export, delete), retried on its lock.

    Another process (a user's kubectl, another lab) may hold kind's lock file briefly.
    """
    _retry_lock(ctx, args, doing, timeout)
    if args[0] == "delete" and uses_own_kubeconfig(ctx):
        # The nodes are gone: kind now only drops the context from the user's kubeconfig.
        _retry_lock(ctx, args, f"{doing} (the user's kubeconfig)", timeout, user=True)
        Path(str(ctx.kubeconfig)).unlink(missing_ok=True)


def _retry_lock(ctx: StepContext, args: list[str], doing: str, timeout: float,
                user: bool = False) -> None:
    for attempt in range(4):
        with _KUBECONFIG_LOCK:
            res = _kind(ctx, args, doing, timeout, user_kubeconfig=user)
        if res.returncode == 0:
            return
        if LOCK_ERROR not in res.stderr or attempt == 3:
            raise _failed(res, doing)
        time.sleep(0.5 * (attempt + 1))


def export_for_user(ctx: StepContext) -> None:
    """With its own kubeconfig the lab still puts the context where kubectl looks. Best effort:
    the lab itself works from its own file."""
    if not uses_own_kubeconfig(ctx):
        return
    try:
        _retry_lock(ctx, ["export", "kubeconfig", "--name", ctx.cluster.name],
                    "adding the context to your kubeconfig", 120, user=True)
    except ToolError as exc:
        ctx.log.warning("cluster.user_kubeconfig_not_written", error=exc.message,
                        fix=f"`kind export kubeconfig --name {ctx.cluster.name}`")


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
    cfg: dict[str, Any] = {
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
    return imagecache.configure_nodes(ctx.lab, ctx.work_dir, cfg)  # the shared image cache


class ClusterStep:
    name = "cluster"
    title = "kind cluster"

    def render(self, ctx: StepContext) -> Rendered:
        cfg_path = ctx.work_dir / KIND_CONFIG_FILE
        env = [f"{k}={v}" for k, v in kind_env(ctx).items()]
        create = ["kind", "create", "cluster", "--name", ctx.cluster.name,
                  "--config", str(cfg_path)]
        if ctx.kubeconfig:
            create += ["--kubeconfig", ctx.kubeconfig]
        return Rendered(files={KIND_CONFIG_FILE: dump_yaml(kind_config(ctx)),
                               **imagecache.node_files(ctx.lab)},
                        commands=[[*env, *create]])

    def _exists(self, ctx: StepContext) -> bool:
        res = _kind(ctx, ["get", "clusters"], "listing kind clusters", 60)
        if res.returncode != 0:
            raise _failed(res, "listing kind clusters")
        return ctx.cluster.name in res.stdout.split()

    def apply(self, ctx: StepContext) -> None:
        name = ctx.cluster.name
        ctx.tools.require("kind")
        ctx.tools.require("docker")
        rendered = self.render(ctx)
        cfg_path = ctx.write_file(KIND_CONFIG_FILE, rendered.files[KIND_CONFIG_FILE])
        for rel, text in imagecache.node_files(ctx.lab).items():  # mounted by every node
            ctx.write_file(rel, text)
        imagecache.before_create(ctx.lab, ctx.tools, ctx.log)
        if self._exists(ctx) and self._adopt(ctx):
            self._created(ctx)
            export_for_user(ctx)
            return
        ctx.log.info("cluster.create", config=str(cfg_path), **kind_env(ctx))
        # Saved before kind starts: a create killed half-way is recognised as this lab's own.
        ctx.facts[CREATE_STARTED] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ctx.store.save(ctx.record)
        doing = f"creating kind cluster {name!r}"
        res = _kind(ctx, ["create", "cluster", "--name", name, "--config", str(cfg_path)],
                    doing, timeout=900)
        if res.returncode != 0:
            if LOCK_ERROR in res.stderr:
                # The nodes are up; only kind's final kubeconfig export lost the lock race.
                ctx.log.warning("cluster.kubeconfig_locked", error=res.stderr.strip())
                self._export(ctx)
            elif ALREADY_EXISTS in res.stderr and self._adopt(ctx):
                pass  # another create of this cluster finished meanwhile: adopted as it is
            elif ALREADY_EXISTS in res.stderr:  # it was half-created and is now deleted
                res = _kind(ctx, ["create", "cluster", "--name", name, "--config",
                                  str(cfg_path)], doing, timeout=900)
                if res.returncode != 0:
                    raise _failed(res, doing)
            else:
                self._forget_if_gone(ctx)
                raise _failed(res, doing)
        imagecache.after_create(ctx.lab, ctx.tools, ctx.log)
        self._created(ctx)
        ctx.reset_kube()
        export_for_user(ctx)

    def _forget_if_gone(self, ctx: StepContext) -> None:
        """kind removes the nodes of a create that failed: nothing half-created is left, so a
        cluster of this name seen later is not this lab's."""
        try:
            gone = not self._exists(ctx)
        except ToolError:
            return
        if gone:
            ctx.facts.pop(CREATE_STARTED, None)
            ctx.store.save(ctx.record)

    def _created(self, ctx: StepContext) -> None:
        if ctx.facts.pop(CREATE_STARTED, None) is not None:
            ctx.facts["createdBy"] = "kind-cilium-lab"
            ctx.facts["created"] = True

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

    def _ours_unfinished(self, ctx: StepContext) -> bool:
        """This lab started a `kind create` of this cluster that never finished."""
        return CREATE_STARTED in ctx.facts

    def _node_names(self, ctx: StepContext) -> list[str]:
        res = _kind(ctx, ["get", "nodes", "--name", ctx.cluster.name], "listing kind nodes", 60)
        return res.stdout.split() if res.returncode == 0 else [ctx.cluster.control_plane]

    def _replace_half_created(self, ctx: StepContext, why: str) -> bool:
        name = ctx.cluster.name
        nodes = self._node_names(ctx)
        ctx.log.warning("cluster.half_created", reason=why, deleting=nodes,
                        started=ctx.facts.get(CREATE_STARTED))
        kind_kubeconfig_write(ctx, ["delete", "cluster", "--name", name],
                              f"removing the half-created cluster {name!r} "
                              f"(containers {', '.join(nodes)})")
        ctx.reset_kube()
        return False

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
            if self._ours_unfinished(ctx):
                # A `kind create` of this lab was killed: containers whose API never came up.
                return self._replace_half_created(ctx, f"its API server does not answer "
                                                       f"({exc.message})")
            nodes = self._node_names(ctx)
            raise LabError(
                f"kind cluster {name!r} exists but its API server does not answer, and this "
                "lab did not create it (or finished creating it): it is left as it is",
                f"if it is stopped, start it (`docker start {' '.join(nodes)}`); to replace it "
                f"with the lab's cluster delete it (`kind delete cluster --name {name}`), "
                "then `invoke lab.up`") from exc
        if self._ours_unfinished(ctx):
            missing = self.missing_nodes(ctx)
            if missing:  # killed after the control plane, before every node joined
                return self._replace_half_created(ctx, f"nodes never joined: "
                                                       f"{', '.join(missing)}")
        mismatches = self.mismatches(ctx) + self.port_mismatches(ctx)
        if mismatches:
            raise LabError(
                f"a kind cluster named {name!r} already exists and does not match the config: "
                + "; ".join(mismatches),
                f"recreate it (`invoke lab.down --cluster {name}` or `kind delete cluster "
                f"--name {name}`, then `invoke lab.up`) or rename the lab's cluster in the "
                "config; kind cannot change an existing cluster and the lab never modifies one "
                "to fit")
        ctx.log.info("cluster.adopted")
        return True

    def missing_nodes(self, ctx: StepContext) -> list[str]:
        nodes = {n["metadata"]["name"] for n in ctx.kube.list("v1", "Node")}
        return sorted(set(ctx.cluster.node_names) - nodes)

    def mismatches(self, ctx: StepContext) -> list[str]:
        """How the running cluster differs from what the config asks for."""
        c = ctx.cluster
        found: list[str] = []
        cm = ctx.kube.get("v1", "ConfigMap", "kubeadm-config", "kube-system")
        if cm:
            kubeadm = yamlio.load(cm.get("data", {}).get("ClusterConfiguration", "")) or {}
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

    def port_mismatches(self, ctx: StepContext) -> list[str]:
        """The control-plane container's published ports against the rendered
        extraPortMappings (kind cannot add a mapping to an existing node)."""
        node = ctx.cluster.control_plane
        res = ctx.tools.run("docker", ["inspect", "--format", "{{json .HostConfig.PortBindings}}",
                                       node], check=False, quiet=True, timeout=30)
        if res.returncode != 0:
            return [f"could not read the port mappings of {node}: "
                    f"{(res.stderr or res.stdout).strip()}"]
        try:
            bindings = json.loads(res.stdout or "null") or {}
        except ValueError:
            bindings = {}
        found = []
        for want in kind_config(ctx)["nodes"][0]["extraPortMappings"]:
            key = f"{want['containerPort']}/{want['protocol'].lower()}"
            have = [(b.get("HostIp") or "0.0.0.0", str(b.get("HostPort")))
                    for b in bindings.get(key) or [] if isinstance(b, dict)]
            wanted = (want["listenAddress"], str(want["hostPort"]))
            if wanted not in have:
                shown = ", ".join(f"{ip}:{port}" for ip, port in have) or "not published"
                found.append(f"NodePort {want['containerPort']} is {shown} on the host, config "
                             f"wants {wanted[0]}:{wanted[1]}")
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
