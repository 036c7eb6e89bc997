"""Step `gateway`: LB IPAM + L2 announcements and a Programmed Gateway on static NodePorts.

The north-south path is ``host → NodePort → Cilium Gateway (Envoy) → policy → pod``. Cilium marks a
Gateway ``Programmed`` (and only then programs its Envoy listeners) once the Gateway's generated
Service ``cilium-gateway-<name>`` got an address from LB IPAM, so this step brings:

1. a ``CiliumLoadBalancerIPPool`` carved from the kind Docker network (derived from
   ``docker network inspect`` unless the config pins ``lbPool``; a pool outside the network is
   refused, see :mod:`lab.network`);
2. a ``CiliumL2AnnouncementPolicy`` announcing LoadBalancer IPs on the nodes' ``eth*`` interfaces;
3. the shared Gateway ``lab-gateway/lab`` with its HTTP listener. The HTTPS listener belongs to the
   ``certs`` step: its certificate does not exist before cert-manager runs. Both steps
   server-side-apply the same Gateway under their own field manager, and ``spec.listeners`` is a
   map keyed by ``name`` in the Gateway API schema (``x-kubernetes-list-type: map``), so each step
   owns exactly its listener and re-applying one never removes the other's;
4. the static NodePorts: the Service stays type LoadBalancer (a NodePort-type Gateway Service never
   becomes Programmed on 1.18) and its ports, which Cilium names ``port-<listener port>``
   (``operator/pkg/model/translation/gateway-api/translator.go``), are patched to the configured
   NodePorts that kind maps to localhost. Cilium's reconciler rewrites that Service's spec; the API
   server keeps allocated nodePorts across such updates, but the gate re-verifies them after the
   Gateway is Programmed and re-patches idempotently whenever they drifted.
"""

from __future__ import annotations

import ipaddress
import json

from lab.errors import LabError
from lab.kube import FIELD_MANAGER, Invalid, KubeError, condition
from lab.network import PoolError, derive_pools, node_port_conflict, node_port_holders
from lab.steps.base import Obj, Rendered, StepContext, Verdict, applied

GATEWAY_API = "gateway.networking.k8s.io/v1"
GATEWAY_CLASS = "cilium"
GATEWAY_NAMESPACE = "lab-gateway"
GATEWAY_NAME = "lab"
GATEWAY_SERVICE = f"cilium-gateway-{GATEWAY_NAME}"  # Cilium's CiliumGatewayPrefix + name
HTTP_LISTENER = "http"
HTTPS_LISTENER = "https"
LISTENER_HOSTNAME = "*.localhost"
# Cilium names each Service port after the listener port: fmt.Sprintf("port-%d", port).
HTTP_PORT_NAME = "port-80"
HTTPS_PORT_NAME = "port-443"

# Distinct server-side-apply field managers: each step owns its own listener of the one Gateway.
GATEWAY_FIELD_MANAGER = "kind-cilium-lab-gateway"
CERTS_FIELD_MANAGER = "kind-cilium-lab-certs"

# Route attachment. `Selector` rather than `All`: the Gateway is shared infrastructure serving
# names under .localhost, and with `All` any namespace could bind any of those host names (or
# hijack one with an older route). Only namespaces the lab opts in by this label may attach.
ROUTES_LABEL = "lab.kind-cilium/routes"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kind-cilium-lab"}

POOL_NAME = "lab-pool"
L2_POLICY_NAME = "lab-l2"
NODE_INTERFACES = "^eth[0-9]+"  # kind node containers' interfaces (must be among Cilium's devices)
POOL_SOURCE_ANNOTATION = "lab.kind-cilium/pool-source"
# What `render` assumes when it cannot ask Docker: the subnet Docker usually gives the kind network.
ASSUMED_KIND_SUBNET = "172.18.0.0/16"


# -- the LoadBalancer pool -------------------------------------------------------------------------

def rendered_pool(ctx: StepContext) -> tuple[str, str]:
    """(pool, where it comes from) without Docker: config, then the recorded fact, then assumed."""
    if ctx.cluster.lb_pool:
        return ctx.cluster.lb_pool, "configured (clusters[].lbPool)"
    recorded = ctx.facts.get("lbPool")
    if isinstance(recorded, str) and recorded:
        return recorded, f"derived from the Docker network {ctx.lab.docker_network!r}"
    pool = derive_pools([ctx.cluster], [ASSUMED_KIND_SUBNET], ctx.lab.docker_network)
    return pool[ctx.cluster.name], (
        f"assumed: derived from {ASSUMED_KIND_SUBNET}, the usual subnet of the Docker network "
        f"{ctx.lab.docker_network!r}; `invoke lab.up` derives it from `docker network inspect "
        f"{ctx.lab.docker_network}`")


def docker_subnets(ctx: StepContext) -> list[str]:
    """The subnets of the lab's Docker network (`docker network inspect`)."""
    name = ctx.lab.docker_network
    res = ctx.tools.run("docker", ["network", "inspect", name], check=False,
                        doing=f"inspecting the Docker network {name!r}")
    if res.returncode != 0:
        said = (res.stderr or res.stdout).strip().splitlines()
        raise LabError(
            f"cannot inspect the Docker network {name!r}: {said[-1] if said else 'no output'}",
            f"kind creates the network {name!r} with the first cluster: check `docker network ls`"
            " and that Docker runs, or set dockerNetwork in the config")
    try:
        data = json.loads(res.stdout or "[]")
        configs = ((data[0].get("IPAM") or {}).get("Config") or []) if data else []
    except (ValueError, AttributeError, IndexError, TypeError) as exc:
        raise LabError(f"`docker network inspect {name}` printed something unexpected ({exc})",
                       "check the Docker CLI works (`docker network inspect kind`)") from exc
    return [str(c["Subnet"]) for c in configs if isinstance(c, dict) and c.get("Subnet")]


def resolve_pool(ctx: StepContext) -> str:
    """This cluster's pool, checked against the real Docker network; recorded as a fact."""
    subnets = docker_subnets(ctx)
    pools = derive_pools(ctx.lab.clusters, subnets, ctx.lab.docker_network)  # PoolError: the fix
    pool = pools[ctx.cluster.name]
    previous = ctx.facts.get("lbPool")
    if previous and previous != pool:
        ctx.log.warning("gateway.pool_changed", previous=previous, pool=pool)
    ctx.facts["lbPool"] = pool
    ctx.facts["dockerSubnets"] = subnets
    return pool


def current_pool(ctx: StepContext) -> str:
    """The pool the gates compare addresses with (never asks Docker)."""
    try:
        return rendered_pool(ctx)[0]
    except PoolError:
        return ""


# -- objects ---------------------------------------------------------------------------------------

def allowed_routes() -> Obj:
    return {"namespaces": {"from": "Selector",
                           "selector": {"matchLabels": {ROUTES_LABEL: "true"}}}}


def pool_object(pool: str, source: str) -> Obj:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumLoadBalancerIPPool",
        "metadata": {"name": POOL_NAME, "labels": dict(MANAGED_BY),
                     "annotations": {POOL_SOURCE_ANNOTATION: source}},
        "spec": {"blocks": [{"cidr": pool}]},
    }


def l2_policy_object() -> Obj:
    return {
        "apiVersion": "cilium.io/v2alpha1",
        "kind": "CiliumL2AnnouncementPolicy",
        "metadata": {"name": L2_POLICY_NAME, "labels": dict(MANAGED_BY)},
        "spec": {"interfaces": [NODE_INTERFACES], "loadBalancerIPs": True, "externalIPs": False},
    }


def namespace_object() -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": GATEWAY_NAMESPACE, "labels": dict(MANAGED_BY)}}


def gateway_http_object() -> Obj:
    """The Gateway as the `gateway` step owns it: class and the HTTP listener."""
    return {
        "apiVersion": GATEWAY_API,
        "kind": "Gateway",
        "metadata": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE,
                     "labels": dict(MANAGED_BY)},
        "spec": {
            "gatewayClassName": GATEWAY_CLASS,
            # No hostname: plain HTTP serves whatever host an attached route names.
            "listeners": [{"name": HTTP_LISTENER, "protocol": "HTTP", "port": 80,
                           "allowedRoutes": allowed_routes()}],
        },
    }


def gateway_objects(pool: str, source: str) -> list[Obj]:
    return [pool_object(pool, source), l2_policy_object(), namespace_object(),
            gateway_http_object()]


def node_port_command(ports: dict[int, int]) -> list[str]:
    """The API operation, for --dry-run: the Service's ports patched to the static NodePorts."""
    return ["patch", f"Service {GATEWAY_NAMESPACE}/{GATEWAY_SERVICE}", "nodePorts",
            ", ".join(f"port-{p}→{n}" for p, n in ports.items())]


def field_manager_for(obj: Obj, gateway_manager: str) -> str:
    return gateway_manager if obj.get("kind") == "Gateway" else FIELD_MANAGER


# -- status helpers (shared with the certs step) ---------------------------------------------------

def is_true(obj: Obj | None, type_: str) -> tuple[bool, str]:
    """(condition True, detail) for a condition of an object's status, or of a status entry
    that carries its own ``conditions`` (a Gateway listener, an HTTPRoute parent)."""
    if obj is not None and "conditions" in obj:
        c = next((dict(x) for x in obj.get("conditions") or [] if x.get("type") == type_), None)
    else:
        c = condition(obj, type_)
    if c is None:
        return False, f"no {type_} condition yet"
    ok = c.get("status") == "True"
    detail = f"{c.get('status')}: {c.get('reason', '')}"
    if c.get("message"):
        detail += f" — {str(c['message'])[:200]}"
    return ok, detail


def check_gateway_class(v: Verdict, ctx: StepContext) -> None:
    gc = ctx.kube.get(GATEWAY_API, "GatewayClass", GATEWAY_CLASS)
    if gc is None:
        v.add(f"GatewayClass {GATEWAY_CLASS} Accepted", False,
              "missing: the Cilium chart creates it when gatewayAPI.enabled and the Gateway API "
              "CRDs existed at install time")
        return
    ok, detail = is_true(gc, "Accepted")
    v.add(f"GatewayClass {GATEWAY_CLASS} Accepted", ok, detail)


def check_gateway_programmed(v: Verdict, gw: Obj | None) -> bool:
    """Programmed=True, reported for the current generation. Adds two named checks."""
    ref = f"{GATEWAY_NAMESPACE}/{GATEWAY_NAME}"
    if gw is None:
        v.add(f"Gateway {ref} Programmed", False, "missing")
        return False
    ok, detail = is_true(gw, "Programmed")
    v.add(f"Gateway {ref} Programmed", ok, detail)
    gen = gw.get("metadata", {}).get("generation")
    observed = (condition(gw, "Programmed") or {}).get("observedGeneration")
    current = observed is not None and observed == gen
    v.add(f"Gateway {ref} status is current", current,
          f"observedGeneration {observed}, generation {gen}" if not current
          else f"generation {gen}")
    return ok and current


def check_gateway_address(v: Verdict, gw: Obj | None, pool: str) -> None:
    addrs = [str(a.get("value", "")) for a in (gw or {}).get("status", {}).get("addresses") or []]
    if not pool:
        v.add("Gateway address from the LB pool", False, "the LB pool is not known yet")
        return
    net = ipaddress.ip_network(pool)
    inside = []
    for a in addrs:
        try:
            if ipaddress.ip_address(a) in net:
                inside.append(a)
        except ValueError:
            continue
    v.add("Gateway address from the LB pool", bool(inside),
          f"{inside[0]} in {pool}" if inside else
          (f"addresses {', '.join(addrs)} are outside {pool}" if addrs
           else f"no address yet (LB IPAM assigns one from {pool})"))


def check_pool(v: Verdict, ctx: StepContext) -> None:
    pool = ctx.kube.get("cilium.io/v2", "CiliumLoadBalancerIPPool", POOL_NAME)
    if pool is None:
        v.add(f"LB pool {POOL_NAME} exists", False, "missing")
        return
    conflict = condition(pool, "cilium.io/PoolConflict")
    clash = bool(conflict and conflict.get("status") == "True")
    v.add(f"LB pool {POOL_NAME} not in conflict", not clash,
          str((conflict or {}).get("message", ""))[:200] if clash else "")


def service_node_ports(svc: Obj | None) -> dict[str, int | None]:
    return {str(p.get("name", "")): p.get("nodePort")
            for p in (svc or {}).get("spec", {}).get("ports") or []}


def ensure_node_ports(ctx: StepContext, wanted: dict[str, int],
                      svc: Obj | None = None) -> tuple[bool, str]:
    """Verify the gateway Service's nodePorts by port name; re-patch the drifted ones.

    Returns (every wanted port present and already right, detail). A port that had to be patched
    counts as not yet right: the caller re-verifies on its next look (Cilium may rewrite again).
    """
    if svc is None:
        svc = ctx.kube.get("v1", "Service", GATEWAY_SERVICE, GATEWAY_NAMESPACE)
    if svc is None:
        return False, f"Service {GATEWAY_NAMESPACE}/{GATEWAY_SERVICE} not created yet by Cilium"
    stype = svc.get("spec", {}).get("type")
    ports = list(svc.get("spec", {}).get("ports") or [])
    problems, ops = [], []
    for name, want in wanted.items():
        index = next((i for i, p in enumerate(ports) if p.get("name") == name), None)
        if index is None:
            problems.append(f"{name} missing (listener not reconciled yet)")
            continue
        have = ports[index].get("nodePort")
        if have != want:
            problems.append(f"{name} nodePort {have}, want {want}")
            ops += [{"op": "test", "path": f"/spec/ports/{index}/name", "value": name},
                    {"op": "replace" if have is not None else "add",
                     "path": f"/spec/ports/{index}/nodePort", "value": want}]
    if stype != "LoadBalancer":
        problems.append(f"type is {stype}, Cilium's Gateway Service must stay LoadBalancer")
    if ops and not (svc.get("status", {}).get("loadBalancer") or {}).get("ingress"):
        # The API server allocates a NodePort before it writes the Service and keeps it when the
        # write then loses to a concurrent one and is retried: a patch racing LB IPAM's status
        # write, which follows the Service's creation, would leak the very port it wants for
        # ~10 minutes. So the patch waits for that write.
        return False, "; ".join(problems) + \
            " — patching once LB IPAM has written the Service's address"
    if ops:
        # Only against the Service as read (same leak): a stale read is refused before any
        # allocation instead of being retried against the latest.
        version = svc.get("metadata", {}).get("resourceVersion")
        if version:
            ops.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": version})
        try:
            ctx.kube.patch("v1", "Service", GATEWAY_SERVICE, ops, GATEWAY_NAMESPACE,
                           patch_type="json")
            ctx.log.info("gateway.nodeports_patched", wanted=wanted)
            return False, "; ".join(problems) + " — re-patched"
        except Invalid as exc:
            if version and _changed_since(ctx, version):
                return False, "; ".join(problems) + \
                    " — the Service changed while patching (Cilium rewrites it); re-patching"
            return False, "; ".join(problems) + f" — patch refused: {exc.message}" + \
                _held_by(ctx, wanted, exc.message)
        except KubeError as exc:
            return False, "; ".join(problems) + f" — patch failed: {exc.message}"
    if problems:
        return False, "; ".join(problems)
    return True, ", ".join(f"{n}→{p}" for n, p in wanted.items())


def _changed_since(ctx: StepContext, version: str) -> bool:
    try:
        svc = ctx.kube.get("v1", "Service", GATEWAY_SERVICE, GATEWAY_NAMESPACE)
    except KubeError:
        return False
    return svc is not None and svc.get("metadata", {}).get("resourceVersion") != version


def _held_by(ctx: StepContext, wanted: dict[str, int], refusal: str = "") -> str:
    """Which other Service holds the wanted NodePorts, and the fix (empty: nothing to say)."""
    try:
        services = ctx.kube.list("v1", "Service")
    except KubeError:
        return ""
    holders = node_port_holders(services, wanted.values(), (GATEWAY_NAMESPACE, GATEWAY_SERVICE))
    if not holders and "already allocated" in refusal:
        # Allocated with no Service holding it: leaked by a write that lost a race (see
        # ensure_node_ports). The API server's repair loop frees it on its third pass (3 min).
        return (" — no Service holds it: the API server leaked the allocation in a concurrent "
                "update and its repair loop frees it within about 10 minutes; run "
                "`invoke lab.up --resume` then")
    i = ctx.lab.clusters.index(ctx.cluster)
    fields = {port: f"clusters[{i}].gateway."
                    f"{'httpNodePort' if name == HTTP_PORT_NAME else 'httpsNodePort'}"
              for name, port in wanted.items()}
    return f" — {node_port_conflict(holders, fields)}" if holders else ""


# -- the step --------------------------------------------------------------------------------------

class GatewayStep:
    name = "gateway"
    title = "LB IPAM + L2 + shared Gateway on static NodePorts"

    def render(self, ctx: StepContext) -> Rendered:
        pool, source = rendered_pool(ctx)
        net = ctx.lab.docker_network
        objects = gateway_objects(pool, source)
        # As `apply` runs: the pool checked against Docker, the objects, then the NodePort patch
        # of the Service Cilium creates for the Gateway.
        return Rendered(
            objects=objects,
            commands=[["docker", "network", "inspect", net], *applied(*objects),
                      node_port_command({80: ctx.cluster.gateway.http_node_port})],
        )

    def wanted_ports(self, ctx: StepContext) -> dict[str, int]:
        return {HTTP_PORT_NAME: ctx.cluster.gateway.http_node_port}

    def apply(self, ctx: StepContext) -> None:
        ctx.tools.require("docker")
        resolve_pool(ctx)  # checks the pool against Docker (PoolError says what to change)
        for api, kind in (("cilium.io/v2", "CiliumLoadBalancerIPPool"),
                          ("cilium.io/v2alpha1", "CiliumL2AnnouncementPolicy"),
                          (GATEWAY_API, "Gateway")):
            if not ctx.kube.serves(api, kind):
                raise LabError(f"the cluster does not serve {kind} ({api})",
                               "the `cni` step installs Cilium and the Gateway API CRDs: run "
                               "`invoke lab.up --resume`")
        pool, source = rendered_pool(ctx)  # the same objects `render` shows, now with the fact
        for obj in gateway_objects(pool, source):
            ctx.kube.apply(obj, field_manager=field_manager_for(obj, GATEWAY_FIELD_MANAGER))
        # Cilium creates the Service shortly after the Gateway; the gate re-verifies and patches.
        ok, detail = ensure_node_ports(ctx, self.wanted_ports(ctx))
        ctx.log.info("gateway.applied", pool=pool, nodeports=detail if not ok else "as configured")

    def ready(self, ctx: StepContext) -> Verdict:
        """Class Accepted, Gateway Programmed (current generation) with a pool address, NodePorts.

        The Service is read after the Gateway so that its nodePorts are verified once the Gateway
        was seen Programmed; drifted ports are re-patched here (the gate's polling loop converges).
        """
        v = Verdict("gateway")
        check_gateway_class(v, ctx)
        check_pool(v, ctx)
        gw = ctx.kube.get(GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE)
        check_gateway_programmed(v, gw)
        check_gateway_address(v, gw, current_pool(ctx))
        ok, detail = ensure_node_ports(ctx, self.wanted_ports(ctx))
        v.add("gateway Service nodePorts as configured", ok, detail)
        return v

    def probe(self, ctx: StepContext) -> Verdict:
        v = Verdict("gateway")
        gw = ctx.kube.get(GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE)
        v.add(f"Gateway {GATEWAY_NAMESPACE}/{GATEWAY_NAME} exists", gw is not None)
        if gw is not None:
            ok, detail = is_true(gw, "Programmed")
            v.add(f"Gateway {GATEWAY_NAMESPACE}/{GATEWAY_NAME} Programmed", ok, detail)
        return v
