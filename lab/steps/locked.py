"""Step `locked`: zero-trust default deny that keeps the infrastructure working, proven live.

Apply: the policies of :mod:`lab.policies` (allowances first, the cluster-wide baseline last, so
no working flow is ever cut while they land), pruning policies this step applied earlier and no
longer renders, then two probe pods in two application namespaces (``lab-probe-a``/``-b``).

The gate proves both halves:

* present: every policy exists and the operator's validator marked it ``Valid``;
* realized: every agent holds every policy in its repository (``cilium-dbg policy get``) and all
  its endpoints run that policy revision (``cilium-dbg endpoint list``). Cilium 1.18's policy
  CRDs have no per-node status any more (``status`` has only ``conditions`` and
  ``derivativePolicies``), so realization is asked of each agent;
* denied, both directions: probe-a (DNS-only egress) cannot open a TCP connection to probe-b and
  Hubble (through the relay) shows the attempt dropped by policy at probe-a's EGRESS; probe-c,
  whose own policy allows it out toward probe-b, is dropped at probe-b's INGRESS — the proof that
  the ingress default deny is enforced. Hubble is asked only for flows since the attempt began;
* still working: probe-a resolves a cluster name through kube-dns, and the demo route answers
  ``https://<echo host>.localhost`` from the host through the Gateway, verified by the lab CA.

Commands run inside pods through an ``ExecFn``; by default ``ctx.kube.exec`` (see ``kube_exec``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from lab.errors import LabError
from lab.hubble import relay_serves
from lab.kube import KubeClient, KubeError, condition, condition_true
from lab.matrix import Actor, Flow, Matrix
from lab.policies import (
    CCNP,
    CILIUM_API,
    CNP,
    INFRA_NAMESPACES,
    MANAGED_BY,
    PROBE_LABELS,
    PROBE_NAMESPACES,
    PROBE_PORT,
    STEP_LABEL,
    AppSpec,
    find_allow_all,
    policy_ref,
    render_policies,
)
from lab.steps.base import Check, Obj, Rendered, StepContext, Verdict, applied, dump_yaml
from lab.steps.certs import (
    DEMO_NAME,
    DEMO_NAMESPACE,
    DEMO_PORT,
    demo_host,
    host_address,
    https_probe,
    read_ca_pem,
    webhook_answers,
)

# The demo app's image (lab/steps/certs.py): one pull serves both. agnhost `connect` reports
# TIMEOUT / REFUSED / DNS distinctly; the image also ships nslookup (bind-tools).
PROBE_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.53"
PROBE_POD = "probe"
HUBBLE_WAIT = 10.0  # seconds to wait for a flow to reach Hubble (as cilium-cli's flow checks)
CONNECT_TIMEOUT = "3s"
DNS_NAME = "kubernetes.default.svc.cluster.local"
POLICY_DROP_REASONS = ("POLICY_DENIED", "POLICY_DENY")
# Cilium's numeric drop reasons (pkg/monitor/api): 133 policy denied, 181 denied by a deny rule.
DROP_REASON_CODES = {133: "POLICY_DENIED", 181: "POLICY_DENY"}

# exec_fn(namespace, pod, container, argv) -> (exit code, stdout + stderr)
ExecFn = Callable[[str, str, str | None, list[str]], tuple[int, str]]
# https_fn(ctx) -> (answered, detail)
HttpsFn = Callable[[StepContext], tuple[bool, str]]


def kube_exec(kube: KubeClient, timeout: float = 30) -> ExecFn:
    """Adapt ``KubeClient.exec`` to ``(namespace, pod, container, argv) -> (rc, output)``."""
    method = kube.exec

    def run(namespace: str, pod: str, container: str | None, argv: list[str]) -> tuple[int, str]:
        try:
            res = method(namespace, pod, argv, container=container, timeout=timeout)
        except KubeError as exc:
            return -1, f"exec failed: {exc.message}"
        return res.returncode, f"{res.stdout or ''}{res.stderr or ''}"

    return run


# -- objects ---------------------------------------------------------------------------------------

def probe_objects() -> list[Obj]:
    """Three namespaces with one probe pod each: an agnhost HTTP server on 8080 and a shell."""
    out: list[Obj] = []
    for ns in PROBE_NAMESPACES:
        out.append({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "labels": {
                        **MANAGED_BY, STEP_LABEL: "locked",
                        "pod-security.kubernetes.io/enforce": "restricted"}}})
    for ns in PROBE_NAMESPACES:
        out.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": PROBE_POD, "namespace": ns,
                         "labels": {**PROBE_LABELS, **MANAGED_BY, STEP_LABEL: "locked"}},
            "spec": {
                "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": 1,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 65534,
                                    "runAsGroup": 65534,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": PROBE_POD, "image": PROBE_IMAGE,
                    "args": ["netexec", f"--http-port={PROBE_PORT}", "--udp-port=-1"],
                    "ports": [{"name": "http", "containerPort": PROBE_PORT, "protocol": "TCP"}],
                    "readinessProbe": {"tcpSocket": {"port": PROBE_PORT}, "periodSeconds": 2},
                    "resources": {"requests": {"cpu": "5m", "memory": "16Mi"},
                                  "limits": {"memory": "64Mi"}},
                    "securityContext": {"allowPrivilegeEscalation": False,
                                        "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}},
                }],
            },
        })
    return out


def demo_app(ctx: StepContext) -> AppSpec:
    """The certs step's demo app: ingress only from the Gateway, on its port; DNS only."""
    return AppSpec(name=DEMO_NAME, namespace=DEMO_NAMESPACE, port=DEMO_PORT,
                   host=demo_host(ctx).removesuffix(".localhost"))


def locked_policies(ctx: StepContext) -> list[Obj]:
    peers = [str(s) for s in ctx.facts.get("dockerSubnets") or []]
    return render_policies(mesh=ctx.lab.is_mesh, mesh_peer_cidrs=peers, apps=[demo_app(ctx)])


def _key(obj: Obj) -> tuple[str, str | None, str]:
    meta = obj.get("metadata", {})
    return obj["kind"], meta.get("namespace"), meta["name"]


# -- parsing what the agents say -------------------------------------------------------------------

def _json_lines(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _policy_name(p: dict[str, Any]) -> str:
    ns = f"{p['namespace']}/" if p.get("namespace") else ""
    return f"{p.get('kind', '')} {ns}{p.get('name', '')}".strip()


def parse_hubble_flows(text: str) -> list[dict[str, Any]]:
    """`hubble observe -o json` (one GetFlowsResponse per line: ``{"flow": {...},
    "node_name": ..., "time": ...}``) → flat dicts. Non-flow lines are skipped."""
    flows: list[dict[str, Any]] = []
    for doc in _json_lines(text):
        if not isinstance(doc, dict):
            continue
        flow = doc.get("flow") if isinstance(doc.get("flow"), dict) else (
            doc if "verdict" in doc else None)
        if not isinstance(flow, dict):
            continue
        src, dst = flow.get("source") or {}, flow.get("destination") or {}
        ip, l4 = flow.get("IP") or {}, flow.get("l4") or {}
        proto, ports = next(iter(l4.items()), ("", {}))
        reason = flow.get("drop_reason_desc") or DROP_REASON_CODES.get(
            int(flow.get("drop_reason") or 0), "")
        denied_by = [_policy_name(p) for key in ("egress_denied_by", "ingress_denied_by")
                     for p in flow.get(key) or [] if isinstance(p, dict)]
        flows.append({
            "time": flow.get("time") or doc.get("time", ""),
            "node": flow.get("node_name") or doc.get("node_name", ""),
            "verdict": flow.get("verdict", ""),
            "reason": reason,
            "direction": flow.get("traffic_direction", ""),
            "src_namespace": src.get("namespace", ""), "src_pod": src.get("pod_name", ""),
            "dst_namespace": dst.get("namespace", ""), "dst_pod": dst.get("pod_name", ""),
            "src_ip": ip.get("source", ""), "dst_ip": ip.get("destination", ""),
            "protocol": proto,
            "dst_port": (ports or {}).get("destination_port") if isinstance(ports, dict) else None,
            "summary": flow.get("Summary", ""),
            "denied_by": denied_by,
        })
    return flows


def is_policy_drop(flow: dict[str, Any]) -> bool:
    return flow.get("verdict") == "DROPPED" and flow.get("reason") in POLICY_DROP_REASONS


def find_flow(flows: Sequence[dict[str, Any]], *, src_namespace: str, src_pod: str,
              dst_ip: str, dst_port: int, verdict: str) -> dict[str, Any] | None:
    """The first flow of that connection with that verdict (a DROPPED one: dropped by policy)."""
    for f in flows:
        if (f.get("verdict") == verdict and f["src_namespace"] == src_namespace
                and f["src_pod"] == src_pod and f["dst_ip"] == dst_ip
                and f["dst_port"] == dst_port and (verdict != "DROPPED" or is_policy_drop(f))):
            return f
    return None


def find_policy_drop(flows: Sequence[dict[str, Any]], *, src_namespace: str, src_pod: str,
                     dst_ip: str, dst_port: int) -> dict[str, Any] | None:
    return find_flow(flows, src_namespace=src_namespace, src_pod=src_pod, dst_ip=dst_ip,
                     dst_port=dst_port, verdict="DROPPED")


def parse_policy_get(text: str) -> tuple[int, set[str]] | None:
    """`cilium-dbg policy get -o json` → (repository revision, policy names it holds)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or "revision" not in doc:
        return None
    names: set[str] = set()
    rules: Any = doc.get("policy") or "[]"
    if isinstance(rules, str):
        try:
            rules = json.loads(rules)
        except ValueError:
            rules = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("key") == "io.cilium.k8s.policy.name" and isinstance(
                    node.get("value"), str):
                names.add(node["value"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and "io.cilium.k8s.policy.name=" in node:
            names.add(node.split("io.cilium.k8s.policy.name=", 1)[1])

    walk(rules)
    return int(doc["revision"]), names


def parse_endpoints(text: str) -> list[tuple[int, str, int]] | None:
    """`cilium-dbg endpoint list -o json` → (id, state, realized policy revision) each."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, list):
        return None
    out = []
    for ep in doc:
        status = (ep or {}).get("status") or {}
        realized = (status.get("policy") or {}).get("realized") or {}
        out.append((int(ep.get("id") or 0), str(status.get("state") or ""),
                    int(realized.get("policy-revision") or 0)))
    return out


def agent_realized(exec_fn: ExecFn, agent: str, names: set[str]) -> tuple[bool, str]:
    """One agent holds every policy and all its endpoints run that repository revision."""
    rc, out = exec_fn("kube-system", agent, "cilium-agent",
                      ["cilium-dbg", "policy", "get", "-o", "json"])
    repo = parse_policy_get(out) if rc == 0 else None
    if repo is None:
        return False, f"{agent}: `cilium-dbg policy get` failed ({out.strip()[:160]})"
    revision, held = repo
    missing = sorted(names - held)
    if missing:
        return False, f"{agent}: not in its repository yet: {', '.join(missing)}"
    rc, out = exec_fn("kube-system", agent, "cilium-agent",
                      ["cilium-dbg", "endpoint", "list", "-o", "json"])
    eps = parse_endpoints(out) if rc == 0 else None
    if eps is None:
        return False, f"{agent}: `cilium-dbg endpoint list` failed ({out.strip()[:160]})"
    behind = [str(i) for i, state, rev in eps if state != "ready" or rev < revision]
    if behind:
        return False, (f"{agent}: endpoint(s) {', '.join(behind[:5])} not yet at policy "
                       f"revision {revision}")
    return True, f"{agent}: revision {revision}, {len(eps)} endpoint(s)"


def connect_outcome(rc: int, out: str) -> str:
    """`agnhost connect` → "allowed" (connected or refused: the packet got there), "denied"
    (timed out: dropped on the way) or "error" (DNS, bad input, exec failure)."""
    if rc == 0 or "REFUSED" in out:
        return "allowed"
    if "TIMEOUT" in out:
        return "denied"
    return "error"


# -- live context ----------------------------------------------------------------------------------

def _pod_ip(pod: Obj | None) -> str:
    return str(((pod or {}).get("status") or {}).get("podIP") or "")


def _first_pod(ctx: StepContext, namespace: str, selector: str) -> Obj | None:
    pods = [p for p in ctx.kube.list("v1", "Pod", namespace, label_selector=selector)
            if condition_true(p, "Ready")]
    return pods[0] if pods else None


def ready_agents(ctx: StepContext) -> list[Obj]:
    return [p for p in ctx.kube.list("v1", "Pod", "kube-system", label_selector="k8s-app=cilium")
            if condition_true(p, "Ready")]


def relay_server(ctx: StepContext) -> str | None:
    svc = ctx.kube.get("v1", "Service", "hubble-relay", "kube-system")
    if not svc:
        return None
    ip = svc.get("spec", {}).get("clusterIP")
    port = (svc.get("spec", {}).get("ports") or [{}])[0].get("port", 80)
    return f"{ip}:{port}" if ip else None


def hubble_timestamp(when: datetime) -> str:
    """RFC 3339 in UTC, as `hubble observe --since` takes it."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def observe_flows(ctx: StepContext, exec_fn: ExecFn, src_namespace: str, src_pod: str,
                  since: datetime, node: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Flows from that pod since ``since``, cluster-wide through the relay (falling back to the
    agent on ``node``). Returns (flows, where they came from)."""
    agents = ready_agents(ctx)
    if not agents:
        return [], "no ready agent"
    argv = ["hubble", "observe", "--from-pod", f"{src_namespace}/{src_pod}",
            "--since", hubble_timestamp(since), "-o", "json"]
    relay = relay_server(ctx)
    errors = []
    if relay:
        rc, out = exec_fn("kube-system", agents[0]["metadata"]["name"], "cilium-agent",
                          [*argv, "--server", relay])
        if rc == 0:
            return parse_hubble_flows(out), "relay"
        errors.append(f"relay: {out.strip()[:120]}")
    local = [a for a in agents if a.get("spec", {}).get("nodeName") == node] or agents
    rc, out = exec_fn("kube-system", local[0]["metadata"]["name"], "cilium-agent", argv)
    if rc == 0:
        return parse_hubble_flows(out), f"agent {local[0]['metadata']['name']}"
    errors.append(f"agent: {out.strip()[:120]}")
    return [], "; ".join(errors)


@dataclass
class Evidence:
    """What Hubble saw of one attempt (``flow`` is None when nothing matching arrived)."""

    flow: dict[str, Any] | None
    where: str

    def __str__(self) -> str:
        if self.flow is None:
            return f"nothing in Hubble yet ({self.where})"
        f = self.flow
        reason = f" {f['reason']}" if f.get("reason") else ""
        return f"{f['verdict']}{reason} {f.get('direction') or '?'} on {f.get('node') or '?'} " \
               f"(via {self.where})"


def hubble_evidence(ctx: StepContext, exec_fn: ExecFn, *, src_namespace: str, src_pod: str,
                    dst_ip: str, dst_port: int, verdict: str, since: datetime,
                    node: str | None = None, wait: float = HUBBLE_WAIT) -> Evidence:
    """Poll Hubble for this attempt's flow with ``verdict`` (FORWARDED, or DROPPED by policy)
    until it shows up or ``wait`` seconds pass; flows before ``since`` never count."""
    deadline = time.monotonic() + wait
    while True:
        flows, where = observe_flows(ctx, exec_fn, src_namespace, src_pod, since, node)
        hit = find_flow(flows, src_namespace=src_namespace, src_pod=src_pod, dst_ip=dst_ip,
                        dst_port=dst_port, verdict=verdict)
        if hit is not None or time.monotonic() >= deadline:
            return Evidence(hit, where)
        time.sleep(1.0)


def default_https(ctx: StepContext) -> tuple[bool, str]:
    """GET https://<demo host>:<https host port>/ from this machine, trusting only the lab CA."""
    ca_pem = read_ca_pem(ctx.kube)
    if not ca_pem:
        return False, "the lab CA Secret is missing (the certs step issues it)"
    g = ctx.cluster.gateway
    return https_probe(host_address(g.listen_address), g.https_host_port, demo_host(ctx), ca_pem)


# -- the step --------------------------------------------------------------------------------------

class LockedStep:
    name = "locked"
    title = "zero-trust default deny + onboarding"

    def __init__(self, exec_fn: ExecFn | None = None, https_fn: HttpsFn | None = None,
                 hubble_wait: float = HUBBLE_WAIT) -> None:
        self.exec_fn = exec_fn
        self.https_fn = https_fn or default_https
        self.hubble_wait = hubble_wait

    def executor(self, ctx: StepContext) -> ExecFn:
        return self.exec_fn or kube_exec(ctx.kube)

    def render(self, ctx: StepContext) -> Rendered:
        policies = locked_policies(ctx)
        problems = find_allow_all(policies)
        if problems:  # a bug in lab/policies.py, never a user error
            raise LabError("a rendered policy would allow everything: " + "; ".join(problems))
        return Rendered(files={"locked/policies.yaml": dump_yaml(policies),
                               "locked/probes.yaml": dump_yaml(probe_objects())},
                        objects=[*policies, *probe_objects()],
                        # as `apply` runs: the probes' namespaces, allowances first and the
                        # baseline last, then every probe object (their namespaces re-applied)
                        commands=applied(*(o for o in probe_objects() if o["kind"] == "Namespace"),
                                         *reversed(policies), *probe_objects()))

    # -- apply ------------------------------------------------------------------------------------

    def apply(self, ctx: StepContext) -> None:
        k = ctx.kube
        if not (k.serves(CILIUM_API, CCNP) and k.serves(CILIUM_API, CNP)):
            raise LabError("Cilium's policy CRDs are not served (CiliumNetworkPolicy, "
                           "CiliumClusterwideNetworkPolicy)",
                           "the cni step installs Cilium, whose operator registers them: run "
                           "`invoke lab.up --resume`")
        if ctx.lab.is_mesh and not ctx.facts.get("dockerSubnets"):
            raise LabError("the Docker subnets the mesh peers come from are not recorded, so "
                           "the clustermesh-apiserver's etcd could not admit them",
                           "the gateway step records them: run `invoke lab.up --resume`")
        rendered = self.render(ctx)
        policies = [o for o in rendered.objects if o["apiVersion"] == CILIUM_API]
        for ns in sorted({o["metadata"]["namespace"] for o in policies
                          if o["metadata"].get("namespace")} - set(PROBE_NAMESPACES)):
            if k.get("v1", "Namespace", ns) is None:
                raise LabError(f"namespace {ns!r} does not exist: its policy has nowhere to go",
                               "the certs step installs cert-manager and the demo app: run "
                               "`invoke lab.up --resume`")
        ctx.write_file("locked/policies.yaml", rendered.files["locked/policies.yaml"])
        for obj in probe_objects():  # the probes' namespaces hold a policy of their own
            if obj["kind"] == "Namespace":
                k.apply(obj)
        # Allowances first, the baseline last: no flow that must work is ever cut meanwhile.
        for obj in reversed(policies):
            k.apply(obj)
        self._prune(ctx, policies)
        self._ensure_probes(ctx)
        ctx.facts["locked"] = {"policies": [policy_ref(p) for p in policies],
                               "excludedNamespaces": list(INFRA_NAMESPACES)}

    def _prune(self, ctx: StepContext, keep: list[Obj]) -> None:
        wanted = {_key(o) for o in keep}
        for kind in (CCNP, CNP):
            for obj in ctx.kube.list(CILIUM_API, kind, label_selector=f"{STEP_LABEL}=locked"):
                key = _key({**obj, "kind": kind})
                if key not in wanted:
                    ctx.log.info("locked.prune", policy=policy_ref({**obj, "kind": kind}))
                    ctx.kube.delete(CILIUM_API, kind, key[2], key[1])

    def _ensure_probes(self, ctx: StepContext) -> None:
        k = ctx.kube
        for obj in probe_objects():
            if obj["kind"] == "Pod":
                ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
                current = k.get("v1", "Pod", name, ns)
                stale = current is not None and (
                    current.get("status", {}).get("phase") in ("Failed", "Succeeded")
                    or current.get("metadata", {}).get("deletionTimestamp")
                    or [c.get("image") for c in current.get("spec", {}).get("containers", [])]
                    != [PROBE_IMAGE])
                if stale:
                    k.delete("v1", "Pod", name, ns)
                    deadline = time.monotonic() + 60
                    while k.get("v1", "Pod", name, ns) is not None:
                        if time.monotonic() > deadline:
                            raise LabError(f"probe pod {ns}/{name} did not go away",
                                           f"delete it by hand (`kubectl -n {ns} delete pod "
                                           f"{name} --force`), then `invoke lab.up --resume`")
                        time.sleep(0.5)
            k.apply(obj)

    # -- gate -------------------------------------------------------------------------------------

    def ready(self, ctx: StepContext) -> Verdict:
        v = Verdict("locked")
        k = ctx.kube
        if not v.add("policy CRDs served", k.serves(CILIUM_API, CCNP) and
                     k.serves(CILIUM_API, CNP)):
            return v
        policies = locked_policies(ctx)
        missing, drifted, invalid = [], [], []
        for p in policies:
            kind, ns, name = _key(p)
            got = k.get(CILIUM_API, kind, name, ns)
            if got is None:
                missing.append(policy_ref(p))
                continue
            if got.get("spec") != p["spec"]:  # the CRDs default nothing: equal when untouched
                drifted.append(policy_ref(p))
            valid = condition(got, "Valid")
            if valid is not None and valid.get("status") != "True":
                invalid.append(f"{policy_ref(p)}: {valid.get('message', '')[:120]}")
        v.add("policies present", not missing and not drifted,
              f"missing: {', '.join(missing)}" if missing
              else f"changed since applied (`invoke lab.up` restores them): {', '.join(drifted)}"
              if drifted else f"{len(policies)} policies")
        v.add("policies valid (operator's Valid condition)", not invalid, "; ".join(invalid))
        exec_fn = self.executor(ctx)
        v.checks.append(self._realized(ctx, exec_fn, policies))
        pods = {ns: k.get("v1", "Pod", PROBE_POD, ns) for ns in PROBE_NAMESPACES}
        v.checks.append(ctx.pods_check("probe pods run", [p for p in pods.values() if p],
                                       k.list("v1", "Node")))
        not_ready = [ns for ns, p in pods.items()
                     if not condition_true(p, "Ready") or not _pod_ip(p)]
        if not v.add("probe pods ready", not not_ready,
                     f"not ready: {', '.join(not_ready)}" if not_ready else ""):
            return v
        a_ns, b_ns, c_ns = PROBE_NAMESPACES
        target = _pod_ip(pods[b_ns])
        # (source, the side that must drop it): a's DNS-only egress, then b's ingress default
        # deny against c, whose own policy lets it out toward b.
        for src, side in ((a_ns, "EGRESS"), (c_ns, "INGRESS")):
            since = datetime.now(timezone.utc)
            rc, out = exec_fn(src, PROBE_POD, PROBE_POD,
                              ["/agnhost", "connect", f"{target}:{PROBE_PORT}",
                               f"--timeout={CONNECT_TIMEOUT}"])
            outcome = connect_outcome(rc, out)
            v.add(f"{src} cannot reach {b_ns} ({side.lower()} default deny)",
                  outcome == "denied",
                  {"allowed": f"connected: the {side.lower()} default deny is not enforced",
                   "denied": "timed out"}.get(outcome, out.strip()[:160]))
            seen = hubble_evidence(ctx, exec_fn, src_namespace=src, src_pod=PROBE_POD,
                                   dst_ip=target, dst_port=PROBE_PORT, verdict="DROPPED",
                                   since=since, wait=self.hubble_wait,
                                   node=(pods[src] or {}).get("spec", {}).get("nodeName"))
            v.add(f"Hubble shows {src} → {b_ns} dropped by policy at {side}",
                  seen.flow is not None and seen.flow.get("direction") == side, str(seen))
        rc, out = exec_fn(a_ns, PROBE_POD, PROBE_POD, ["nslookup", DNS_NAME])
        v.add(f"DNS resolves from {a_ns}", rc == 0,
              DNS_NAME if rc == 0 else out.strip()[-160:])
        ok, detail = self.https_fn(ctx)
        v.add("the demo route answers through the Gateway from the host", ok, detail)
        return v

    def _realized(self, ctx: StepContext, exec_fn: ExecFn, policies: list[Obj]) -> Check:
        agents = ready_agents(ctx)
        nodes = ctx.kube.list("v1", "Node")
        if not agents or len(agents) < len(nodes):
            return Check("policies realized by every agent", False,
                         f"{len(agents)} ready agent(s) for {len(nodes)} node(s)")
        names = {p["metadata"]["name"] for p in policies}
        results = [agent_realized(exec_fn, a["metadata"]["name"], names) for a in agents]
        bad = [d for ok, d in results if not ok]
        return Check("policies realized by every agent", not bad,
                     "; ".join(bad) if bad else "; ".join(d for _, d in results))

    def probe(self, ctx: StepContext) -> Verdict:
        v = Verdict("locked")
        k = ctx.kube
        if not v.add("policy CRDs served", k.serves(CILIUM_API, CCNP)):
            return v
        for p in locked_policies(ctx)[:2]:  # the baseline and the Gateway's allowance
            kind, ns, name = _key(p)
            v.add(f"{policy_ref(p)} present", k.get(CILIUM_API, kind, name, ns) is not None)
        return v


# -- live trials of the matrix (the e2e suite) -----------------------------------------------------

@dataclass
class TrialResult:
    flow: Flow
    outcome: str  # allowed | denied | skipped | error
    detail: str = ""
    hubble: Evidence | None = None  # what Hubble saw of this attempt (pod-to-pod trials)


def _actor_pod(ctx: StepContext, actor: Actor) -> Obj | None:
    return _first_pod(ctx, actor.namespace, actor.label_selector)


def try_flow(ctx: StepContext, flow: Flow, exec_fn: ExecFn, matrix: Matrix,
             https_fn: HttpsFn = default_https, hubble_wait: float = HUBBLE_WAIT) -> TrialResult:
    """Try one matrix flow for real. A connection between pods also records what Hubble saw of
    this very attempt: the FORWARDED flow, or the policy drop with its direction."""
    if flow.trial is None:
        return TrialResult(flow, "skipped", "proven offline only (Cilium's policy engine)")
    if flow.trial == "gateway-https":
        ok, detail = https_fn(ctx)
        return TrialResult(flow, "allowed" if ok else "denied", detail)
    if flow.trial == "webhook-dry-run":
        ok, detail = webhook_answers(ctx.kube)
        return TrialResult(flow, "allowed" if ok else "denied", detail)
    if flow.trial == "cert-manager-lease":
        return _lease_trial(ctx, flow)
    if flow.trial in ("relay-nodes", "relay-from-agent"):
        return _relay_trial(ctx, flow, exec_fn)
    source, dest = matrix.actors[flow.source], matrix.actors[flow.destination]
    if not source.is_pod or source.remote_cluster:
        return TrialResult(flow, "error", f"{flow.source} is not a pod of this cluster: "
                                          "nothing to run its side from")
    pod = _actor_pod(ctx, source)
    if pod is None:
        return TrialResult(flow, "error",
                           f"no ready pod {source.label_selector} in {source.namespace}")
    ns, pod_name = source.namespace, pod["metadata"]["name"]
    container = source.container or None
    if flow.trial == "dns":
        rc, out = exec_fn(ns, pod_name, container, ["nslookup", DNS_NAME])
        return TrialResult(flow, "allowed" if rc == 0 else "denied", out.strip()[-160:])
    if dest.is_pod:
        dst = _actor_pod(ctx, dest)
        if dst is None:
            return TrialResult(flow, "error",
                               f"no ready pod {dest.label_selector} in {dest.namespace}")
        address = _pod_ip(dst)
    else:
        address = dest.ip
    if not address:
        return TrialResult(flow, "error", f"no address for {flow.destination}")
    since = datetime.now(timezone.utc)
    rc, out = exec_fn(ns, pod_name, container,
                      ["/agnhost", "connect", f"{address}:{flow.port}",
                       f"--timeout={CONNECT_TIMEOUT}"])
    outcome = connect_outcome(rc, out)
    result = TrialResult(flow, outcome, out.strip()[:160])
    if outcome in ("allowed", "denied"):
        result.hubble = hubble_evidence(
            ctx, exec_fn, src_namespace=ns, src_pod=pod_name, dst_ip=address,
            dst_port=flow.port, verdict="FORWARDED" if outcome == "allowed" else "DROPPED",
            since=since, node=pod.get("spec", {}).get("nodeName"), wait=hubble_wait)
    return result


def _relay_trial(ctx: StepContext, flow: Flow, exec_fn: ExecFn) -> TrialResult:
    agents, relay = ready_agents(ctx), relay_server(ctx)
    if not agents or not relay:
        return TrialResult(flow, "error", "no ready agent or no hubble-relay Service")
    rc, out = exec_fn("kube-system", agents[0]["metadata"]["name"], "cilium-agent",
                      ["hubble", "status", "--server", relay, "-o", "json"])
    if rc != 0:
        return TrialResult(flow, "denied", out.strip()[:160])
    if flow.trial == "relay-from-agent":
        return TrialResult(flow, "allowed", "the relay answered an agent pod")
    verdict = relay_serves(out, len(ctx.kube.list("v1", "Node")))
    if verdict is None:
        return TrialResult(flow, "error", out.strip()[:160])
    ok, detail = verdict
    return TrialResult(flow, "allowed" if ok else "denied", detail)


def _lease_trial(ctx: StepContext, flow: Flow, fresh: float = 120) -> TrialResult:
    """cert-manager's controller renews its leader lease through the kube-apiserver."""
    lease = ctx.kube.get("coordination.k8s.io/v1", "Lease", "cert-manager-controller",
                         "kube-system")
    renew = ((lease or {}).get("spec") or {}).get("renewTime")
    if not renew:
        return TrialResult(flow, "error", "no cert-manager-controller lease in kube-system")
    when = datetime.fromisoformat(str(renew).replace("Z", "+00:00"))
    age = (datetime.now(timezone.utc) - when).total_seconds()
    return TrialResult(flow, "allowed" if age < fresh else "denied",
                       f"leader lease renewed {age:.0f}s ago")
