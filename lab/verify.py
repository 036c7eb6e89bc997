"""`lab.verify`: the lab's whole promise, checked live and read-only, flow by flow.

For every cluster (at ``locked`` or later):

1. every gate up to the cluster's state — ``ready()`` only, nothing applied: Cilium and Hubble,
   the Gateway, the certificates, the policies (present, valid, realized by every agent, both
   directions of the default deny), and in a mesh the global service answered across clusters;
2. the policy matrix (``lab/data/policy-matrix.yaml``), flow by flow: a flow with a ``trial`` is
   tried for real, with the verdict observed and what Hubble saw of that very attempt (verdict,
   drop reason, direction); the others are reported as proven offline by Cilium's policy engine
   (the offline suite feeds them to it);
3. a user's own flows (``--flows FILE``, same format, may use the lab's actors). A TCP flow from
   a pod is tried even without ``trial``. When its source is not one of the lab's probe pods,
   a short-lived probe pod (agnhost, restricted security context) is started in the source's
   namespace with the source's labels — same labels, same Cilium identity, same policy — the
   flow is tried from it, and it is deleted afterwards (also on failure or Ctrl-C).

The report is a table (``print_report``) or JSON (``Report.to_json``). The JSON is sorted and has
no timestamps; ``detail`` (free text) appears only on rows that failed, so two healthy runs print
the same bytes. Schema ``kind-cilium-lab/verify/v1``::

    {"schema": "kind-cilium-lab/verify/v1", "ok": bool,
     "summary": {"gates": n, "gatesNotReady": n, "flows": n, "tried": n, "offline": n,
                 "mismatches": n},
     "gates": [{"cluster", "gate", "ready", "checks": [{"name", "ok", "detail"?}]}],
     "flows": [{"cluster", "flow", "source", "destination", "port", "protocol", "origin"
                (lab | user | mesh), "trial" (or null), "expect" (allowed | denied),
                "observed" (allowed | denied | error | offline),
                "hubble": {"verdict", "reason", "direction", "node"} or null, "ok",
                "detail"?}]}
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from lab.errors import LabError
from lab.kube import KubeError, condition_true
from lab.matrix import Actor, Flow, Matrix
from lab.policies import PROBE_LABELS, PROBE_NAMESPACES
from lab.state import STATES
from lab.steps.base import Check, Step, StepContext, Verdict
from lab.steps.locked import (
    CONNECT_TIMEOUT,
    DNS_NAME,
    HUBBLE_WAIT,
    POLICY_DROP_REASONS,
    PROBE_IMAGE,
    Evidence,
    ExecFn,
    HttpsFn,
    TrialResult,
    connect_outcome,
    default_https,
    hubble_evidence,
    kube_exec,
    try_flow,
)

SCHEMA = "kind-cilium-lab/verify/v1"
OFFLINE = "proven offline (Cilium's policy engine)"
GLOBAL_SERVICE_CHECK = "global service answered from the other clusters"
PROBE_ANNOTATION = "lab.kind-cilium.io/verify-probe"  # annotations do not change the identity
PROBE_READY_TIMEOUT = 120.0


@dataclass
class FlowResult:
    cluster: str
    flow: str
    source: str
    destination: str
    port: int
    protocol: str
    origin: str  # lab | user | mesh
    trial: str | None
    expect: str
    observed: str  # allowed | denied | error | offline
    ok: bool
    hubble: dict[str, str] | None = None
    detail: str = ""
    why: str = ""

    @property
    def evidence(self) -> str:
        if self.hubble is None:
            return ""
        h = self.hubble
        return " ".join(x for x in (h["verdict"], h["reason"], h["direction"]) if x) + \
            (f" on {h['node']}" if h.get("node") else "")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cluster": self.cluster, "flow": self.flow, "source": self.source,
            "destination": self.destination, "port": self.port, "protocol": self.protocol,
            "origin": self.origin, "trial": self.trial, "expect": self.expect,
            "observed": self.observed, "hubble": self.hubble, "ok": self.ok}
        if not self.ok:
            out["detail"] = self.detail
        return out


@dataclass
class GateResult:
    cluster: str
    verdict: Verdict

    def to_json(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "gate": self.verdict.gate, "ready": self.verdict.ready,
                "checks": [{"name": c.name, "ok": c.ok, **({} if c.ok else {"detail": c.detail})}
                           for c in self.verdict.checks]}


@dataclass
class Report:
    gates: list[GateResult] = field(default_factory=list)
    flows: list[FlowResult] = field(default_factory=list)

    @property
    def mismatches(self) -> list[FlowResult]:
        return [f for f in self.flows if not f.ok]

    @property
    def ok(self) -> bool:
        return all(g.verdict.ready for g in self.gates) and not self.mismatches

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "ok": self.ok,
            "summary": {"gates": len(self.gates),
                        "gatesNotReady": sum(not g.verdict.ready for g in self.gates),
                        "flows": len(self.flows),
                        "tried": sum(f.observed != "offline" for f in self.flows),
                        "offline": sum(f.observed == "offline" for f in self.flows),
                        "mismatches": len(self.mismatches)},
            "gates": [g.to_json() for g in self.gates],
            "flows": [f.to_json() for f in self.flows],
        }


# -- judging one trial -----------------------------------------------------------------------------

def _hubble(evidence: Evidence | None) -> dict[str, str] | None:
    if evidence is None or evidence.flow is None:
        return None
    f = evidence.flow
    return {"verdict": str(f.get("verdict") or ""), "reason": str(f.get("reason") or ""),
            "direction": str(f.get("direction") or ""), "node": str(f.get("node") or "")}


def judge(cluster: str, flow: Flow, trial: TrialResult, origin: str) -> FlowResult:
    """Observed against expected; a pod-to-pod connection must also show in Hubble as that
    verdict — a denied one dropped by policy on the side that decides it."""
    hubble = _hubble(trial.hubble)
    problems: list[str] = []
    observed = trial.outcome
    if observed == "skipped":
        return FlowResult(cluster, str(flow), flow.source, flow.destination, flow.port,
                          flow.protocol, origin, None, flow.expect, "offline", True,
                          detail=OFFLINE, why=flow.why)
    if observed != flow.expect:
        problems.append(f"expected {flow.expect}, observed {observed}: {trial.detail}")
    if trial.hubble is not None and observed in ("allowed", "denied"):
        if hubble is None:
            problems.append(f"Hubble saw nothing of this attempt ({trial.hubble.where})")
        elif flow.expect == "allowed" and hubble["verdict"] != "FORWARDED":
            problems.append(f"Hubble shows {hubble['verdict']}, not FORWARDED")
        elif flow.expect == "denied":
            side = "EGRESS" if flow.egress == "denied" else "INGRESS"
            if hubble["reason"] not in POLICY_DROP_REASONS:
                problems.append(f"Hubble shows {hubble['verdict']} {hubble['reason']}, not a "
                                "policy drop")
            elif hubble["direction"] != side:
                problems.append(f"dropped at {hubble['direction']}, expected at {side}")
    return FlowResult(cluster, str(flow), flow.source, flow.destination, flow.port,
                      flow.protocol, origin, flow.trial, flow.expect, observed, not problems,
                      hubble, "; ".join(problems) or trial.detail, flow.why)


# -- short-lived probe pods for a user's sources ---------------------------------------------------

def is_lab_probe(actor: Actor) -> bool:
    return actor.namespace in PROBE_NAMESPACES and dict(actor.selector) == PROBE_LABELS


def probe_pod(actor: Actor, name: str, run_id: str) -> dict[str, Any]:
    """A pod with exactly the actor's labels (so Cilium gives it the same identity and applies
    the same policies), under Pod Security `restricted`."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": actor.namespace, "labels": dict(actor.selector),
                     "annotations": {PROBE_ANNOTATION: run_id}},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "probe", "image": PROBE_IMAGE, "args": ["pause"],
                "resources": {"requests": {"cpu": "5m", "memory": "8Mi"},
                              "limits": {"memory": "32Mi"}},
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


def probe_name(actor: Actor, suffix: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", actor.name.lower()).strip("-")[:40] or "actor"
    return f"lab-verify-{base}-{suffix}"


@contextmanager
def ephemeral_probe(ctx: StepContext, actor: Actor,
                    ready_timeout: float = PROBE_READY_TIMEOUT) -> Iterator[dict[str, Any]]:
    """Start a probe pod as ``actor``, yield it once Ready, delete it whatever happens."""
    k = ctx.kube
    if k.get("v1", "Namespace", actor.namespace) is None:
        raise LabError(f"namespace {actor.namespace!r} of {actor.name} does not exist",
                       "onboard the application first (`invoke lab.onboard`)")
    run_id = secrets.token_hex(3)
    name = probe_name(actor, run_id)
    ctx.log.info("verify.probe.create", namespace=actor.namespace, pod=name)
    try:
        k.apply(probe_pod(actor, name, run_id))
        deadline = time.monotonic() + ready_timeout
        while True:
            pod = k.get("v1", "Pod", name, actor.namespace)
            if condition_true(pod, "Ready") and ((pod or {}).get("status") or {}).get("podIP"):
                break
            phase = ((pod or {}).get("status") or {}).get("phase")
            if phase in ("Failed", "Succeeded") or time.monotonic() > deadline:
                raise LabError(f"probe pod {actor.namespace}/{name} did not become ready "
                               f"(phase {phase or 'unknown'})",
                               f"`kubectl -n {actor.namespace} describe pod {name}` says why")
            time.sleep(0.5)
        yield pod or {}
    finally:
        try:
            k.delete("v1", "Pod", name, actor.namespace)
            ctx.log.info("verify.probe.delete", namespace=actor.namespace, pod=name)
        except KubeError as exc:
            ctx.log.warning("verify.probe.delete_failed", pod=name, error=exc.message)


def _destination_address(ctx: StepContext, actor: Actor) -> str:
    if not actor.is_pod:
        return actor.ip
    for pod in ctx.kube.list("v1", "Pod", actor.namespace, label_selector=actor.label_selector):
        if condition_true(pod, "Ready") and not (pod.get("metadata") or {}).get(
                "annotations", {}).get(PROBE_ANNOTATION):
            return str((pod.get("status") or {}).get("podIP") or "")
    return ""


def trial_from(ctx: StepContext, flow: Flow, matrix: Matrix, pod: dict[str, Any],
               exec_fn: ExecFn, hubble_wait: float) -> TrialResult:
    """Try ``flow`` from ``pod`` (a probe pod standing in for the source)."""
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    if flow.trial == "dns":
        rc, out = exec_fn(ns, name, "probe", ["nslookup", DNS_NAME])
        return TrialResult(flow, "allowed" if rc == 0 else "denied", out.strip()[-160:])
    address = _destination_address(ctx, matrix.actors[flow.destination])
    if not address:
        return TrialResult(flow, "error", f"no ready pod or address for {flow.destination}")
    since = datetime.now(timezone.utc)
    rc, out = exec_fn(ns, name, "probe", ["/agnhost", "connect", f"{address}:{flow.port}",
                                          f"--timeout={CONNECT_TIMEOUT}"])
    outcome = connect_outcome(rc, out)
    result = TrialResult(flow, outcome, out.strip()[:160])
    if outcome in ("allowed", "denied"):
        result.hubble = hubble_evidence(
            ctx, exec_fn, src_namespace=ns, src_pod=name, dst_ip=address, dst_port=flow.port,
            verdict="FORWARDED" if outcome == "allowed" else "DROPPED", since=since,
            node=(pod.get("spec") or {}).get("nodeName"), wait=hubble_wait)
    return result


def with_default_trial(flow: Flow, matrix: Matrix) -> Flow:
    """A user's TCP flow from a pod of this cluster is tried even when it names no trial."""
    source = matrix.actors[flow.source]
    if flow.trial is None and flow.protocol == "TCP" and source.is_pod \
            and not source.remote_cluster:
        return dataclasses.replace(flow, trial="tcp")
    return flow


# -- the run ---------------------------------------------------------------------------------------

@dataclass
class Probes:
    """How the live trials reach the cluster (tests script them)."""

    exec_fn: Callable[[StepContext], ExecFn] = field(default=lambda ctx: kube_exec(ctx.kube))
    https_fn: HttpsFn = default_https
    hubble_wait: float = HUBBLE_WAIT
    probe_ready_timeout: float = PROBE_READY_TIMEOUT


def check_clusters(contexts: Sequence[StepContext]) -> None:
    """Refuse before anything runs when a cluster is not up: verify checks a lab that is."""
    low = [f"{c.cluster.name} is at `{c.record.state}`" for c in contexts
           if STATES.index(c.record.state) < STATES.index("locked")]
    if low:
        raise LabError("lab.verify checks a lab that is up: " + "; ".join(low),
                       "bring it up first: `invoke lab.up` (or `invoke lab.mesh`)")


def run(contexts: Sequence[StepContext], matrix: Matrix, user: Matrix | None = None,
        steps: Mapping[str, Step] | None = None, probes: Probes | None = None) -> Report:
    from lab.steps.registry import STEPS

    check_clusters(contexts)
    steps = steps or STEPS
    probes = probes or Probes()
    report = Report()
    for ctx in contexts:
        name = ctx.cluster.name
        exec_fn = probes.exec_fn(ctx)
        for state in STATES[1:STATES.index(ctx.record.state) + 1]:
            try:
                verdict = steps[state].ready(ctx)
            except LabError as exc:
                verdict = Verdict(state, [Check("gate", False, exc.message)])
            report.gates.append(GateResult(name, verdict))
            if state == "meshed":
                report.flows.append(_global_service(name, verdict))
        for flow in matrix.for_lab(mesh=ctx.lab.is_mesh):
            result = _try(ctx, flow, exec_fn, matrix, probes)
            report.flows.append(judge(name, flow, result, "lab"))
        if user is not None:
            report.flows.extend(_user_flows(ctx, user, exec_fn, probes))
    return report


def _try(ctx: StepContext, flow: Flow, exec_fn: ExecFn, matrix: Matrix,
         probes: Probes) -> TrialResult:
    try:
        return try_flow(ctx, flow, exec_fn, matrix, https_fn=probes.https_fn,
                        hubble_wait=probes.hubble_wait)
    except LabError as exc:
        return TrialResult(flow, "error", exc.message)


def _user_flows(ctx: StepContext, user: Matrix, exec_fn: ExecFn,
                probes: Probes) -> list[FlowResult]:
    out: list[FlowResult] = []
    flows = [with_default_trial(f, user) for f in user.for_lab(mesh=ctx.lab.is_mesh)]
    by_source: dict[str, list[Flow]] = {}
    for flow in flows:
        source = user.actors[flow.source]
        if flow.trial in ("tcp", "dns") and source.is_pod and not source.remote_cluster \
                and not is_lab_probe(source):
            by_source.setdefault(flow.source, []).append(flow)
        else:
            out.append(judge(ctx.cluster.name, flow, _try(ctx, flow, exec_fn, user, probes),
                             "user"))
    for source_name, source_flows in by_source.items():
        try:
            with ephemeral_probe(ctx, user.actors[source_name],
                                 probes.probe_ready_timeout) as pod:
                for flow in source_flows:
                    try:
                        trial = trial_from(ctx, flow, user, pod, exec_fn, probes.hubble_wait)
                    except LabError as exc:
                        trial = TrialResult(flow, "error", exc.message)
                    out.append(judge(ctx.cluster.name, flow, trial, "user"))
        except LabError as exc:
            out.extend(judge(ctx.cluster.name, f, TrialResult(f, "error", exc.message), "user")
                       for f in source_flows if not any(r.flow == str(f) for r in out))
    order = {str(f): i for i, f in enumerate(flows)}
    return sorted(out, key=lambda r: order[r.flow])


def _global_service(cluster: str, verdict: Verdict) -> FlowResult:
    check = next((c for c in verdict.checks if c.name == GLOBAL_SERVICE_CHECK), None)
    observed = "error" if check is None else ("allowed" if check.ok else "denied")
    detail = "the meshed gate did not get to it" if check is None else check.detail
    return FlowResult(cluster, "mesh-probe → echo-global (every other cluster):8080/TCP",
                      "mesh-probe", "echo-global", 8080, "TCP", "mesh", "global-service",
                      "allowed", observed, observed == "allowed", None, detail,
                      "a global service answers from the pods of every cluster of the mesh")


# -- the map of what verify tried ------------------------------------------------------------------

def _endpoint(actor: Actor | None, name: str, cluster: str) -> dict[str, Any]:
    if actor is None or not actor.is_pod:
        return {"labels": [f"reserved:{actor.entity if actor else name}"]}
    return {"namespace": actor.namespace, "workloads": [{"name": name}],
            "labels": [f"k8s:io.cilium.k8s.policy.cluster={cluster}"]}


def trial_flows(report: Report, actors: Mapping[str, Actor]) -> list[dict[str, Any]]:
    """What verify tried, as Hubble-shaped flows (for the service map): the verdict Hubble
    reported when it saw the attempt, else the observed outcome."""
    out: list[dict[str, Any]] = []
    for r in report.flows:
        if r.observed not in ("allowed", "denied") or r.origin == "mesh":
            continue  # the global-service row spans clusters: not one edge of this map
        h = r.hubble or {}
        verdict = h.get("verdict") or ("FORWARDED" if r.observed == "allowed" else "DROPPED")
        flow: dict[str, Any] = {
            "verdict": verdict,
            "source": _endpoint(actors.get(r.source), r.source, r.cluster),
            "destination": _endpoint(actors.get(r.destination), r.destination, r.cluster),
            "l4": {r.protocol: {"destination_port": r.port}},
            "is_reply": False}
        if verdict == "DROPPED":
            flow["drop_reason_desc"] = h.get("reason") or ""
        if h.get("direction"):
            flow["traffic_direction"] = h["direction"]
        out.append(flow)
    return out


# -- printing --------------------------------------------------------------------------------------

def print_report(report: Report, console: Any) -> None:
    from rich.table import Table

    clusters = list(dict.fromkeys([g.cluster for g in report.gates] +
                                  [f.cluster for f in report.flows]))
    for cluster in clusters:
        gates = Table(title=f"{cluster} — gates (read-only)", title_justify="left")
        for col in ("gate", "check", "ok", "detail"):
            gates.add_column(col)
        for g in (g for g in report.gates if g.cluster == cluster):
            for i, c in enumerate(g.verdict.checks):
                gates.add_row(g.verdict.gate if i == 0 else "", c.name, "✓" if c.ok else "✗",
                              c.detail)
        console.print(gates)
        flows = Table(title=f"{cluster} — flows", title_justify="left")
        for col in ("flow", "expected", "observed", "Hubble evidence", "ok"):
            flows.add_column(col)
        for f in (f for f in report.flows if f.cluster == cluster):
            observed = OFFLINE if f.observed == "offline" else f.observed
            flows.add_row(f.flow + (" (yours)" if f.origin == "user" else ""), f.expect,
                          observed, f.evidence, "✓" if f.ok else f"✗ {f.detail}")
        console.print(flows)
    s = report.to_json()["summary"]
    console.print(f"{'✓' if report.ok else '✗'} {s['gates'] - s['gatesNotReady']}/{s['gates']} "
                  f"gates ready; {s['tried']} flows tried live, {s['offline']} proven offline, "
                  f"{s['mismatches']} mismatch(es)")
