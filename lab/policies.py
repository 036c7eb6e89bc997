"""Zero-trust policies for the `locked` step: what they are, why, and the matrix that proves them.

Which namespaces are "application namespaces"
---------------------------------------------
Every namespace is an application namespace except the infrastructure ones the lab itself runs
(``INFRA_NAMESPACES``: kube-system, cert-manager, local-path-storage, lab-gateway, kube-public,
kube-node-lease). The baseline ``CiliumClusterwideNetworkPolicy`` selects pods by *exclusion*
(``k8s:io.kubernetes.pod.namespace`` Exists and NotIn that list), so a namespace created tomorrow
is locked the moment its first pod starts — opt-in labels would leave every forgotten namespace
open, the opposite of zero trust. The ``Exists`` term keeps Cilium's reserved identities (the
Gateway's Envoy, health, host) out of the baseline: they carry no namespace label, and a bare
NotIn would select them too (Kubernetes selector semantics: NotIn matches an absent key).

Why kube-system and cert-manager are not under the blanket default deny
-----------------------------------------------------------------------
They are allowed *rule by rule, per workload*, instead of being swept into the application
baseline. The baseline's egress (DNS only) is wrong for infrastructure, whose main peer is the
kube-apiserver; and kube-system also holds pods the lab does not enumerate. So each infrastructure
workload the lab runs gets its own named policy listing exactly what it needs; in Cilium a policy
with an ``ingress``/``egress`` section puts the pods it selects into default deny for that
direction, so each allowance is also that workload's lockdown. Host-network components (agents,
operator, cilium-envoy, the control plane) are not governed by endpoint policy without the host
firewall, which the lab does not enable. Two directions stay deliberately open because closing
them would depend on the environment and fail silently: CoreDNS's egress (its upstream on kind is
the Docker network's resolver) and the ingress of cert-manager's controller/cainjector (metrics).

Default deny, as Cilium really does it
-------------------------------------
Cilium 1.18 enforces a direction for an endpoint only when some rule selecting it has a section
for that direction (``ingress``/``ingressDeny``, ``egress``/``egressDeny``;
``pkg/policy/repository.go``). ``enableDefaultDeny`` can only switch enforcement *off* for such a
rule, never on. So the baseline carries ``ingress: [{}]``: the one empty rule, which selects no
peer and allows nothing, and puts ingress into enforcement. Every onboarded application's policy
carries an ingress section too (its allowances, or ``[{}]``).

Reading the policies
--------------------
Each policy's ``spec.description`` is its one-line "why". ``find_allow_all`` refuses allow rules
that admit every peer (no peer named, empty selectors, the ``all`` entity or ``0.0.0.0/0`` on every
port) and accepts the exact empty rule. What the policies must allow and deny, flow by flow, is
data: ``lab/data/policy-matrix.yaml`` (:mod:`lab.matrix`), judged offline by Cilium's own policy
engine and tried live by the ``locked`` gate and ``lab.verify``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lab.steps.gateway import GATEWAY_NAMESPACE

Obj = dict[str, Any]

CILIUM_API = "cilium.io/v2"
CCNP = "CiliumClusterwideNetworkPolicy"
CNP = "CiliumNetworkPolicy"
NS = "k8s:io.kubernetes.pod.namespace"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kind-cilium-lab"}
STEP_LABEL = "lab.kind-cilium.io/step"  # value "locked": owned (and pruned) by the locked step
ONBOARD_LABEL = "lab.kind-cilium.io/onboarded"  # value: the application's name

INFRA_NAMESPACES: tuple[str, ...] = tuple(sorted({
    "cert-manager", "kube-node-lease", "kube-public", "kube-system", "local-path-storage",
    GATEWAY_NAMESPACE}))
KUBE_APISERVER_PORT = 6443  # kind's kube-apiserver; policies see the port after service translation
WEBHOOK_PORT = 10250  # cert-manager v1.19 webhook.securePort (chart values.yaml)
RELAY_PORT = 4245  # hubble-relay listenPort; its Service port 80 targets it
HUBBLE_PORT = 4244  # each agent's Hubble server (hubble.listenAddress ":4244")
ETCD_PORT = 2379  # clustermesh-apiserver's etcd, behind its NodePort

DNS_PEER: Obj = {"matchLabels": {NS: "kube-system", "k8s:k8s-app": "kube-dns"}}
DNS_PORTS: list[Obj] = [{"port": "53", "protocol": "UDP"}, {"port": "53", "protocol": "TCP"}]
APP_NAMESPACES: Obj = {"matchExpressions": [
    {"key": NS, "operator": "Exists"},
    {"key": NS, "operator": "NotIn", "values": list(INFRA_NAMESPACES)},
]}

# The one empty rule: it selects no peer and allows nothing, but its presence puts the
# direction into enforcement (upstream examples/policies/l3/egress-default-deny).
DENY_ALL: Obj = {}

DEFAULT_DENY = "lab-default-deny"
GATEWAY_ENVOY = "lab-gateway-envoy"


def _ports(*ports: int | str, protocol: str = "TCP") -> list[Obj]:
    return [{"ports": [{"port": str(p), "protocol": protocol} for p in ports]}]


def _meta(name: str, namespace: str | None, **labels: str) -> Obj:
    meta: Obj = {"name": name, "labels": {**MANAGED_BY, **labels}}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _policy(kind: str, name: str, namespace: str | None, why: str, spec: Obj,
            labels: Mapping[str, str] | None = None) -> Obj:
    # Deep copy: shared selectors would come out of YAML as &anchors, and callers may mutate.
    return {"apiVersion": CILIUM_API, "kind": kind,
            "metadata": _meta(name, namespace, **(labels or {STEP_LABEL: "locked"})),
            "spec": copy.deepcopy({"description": why, **spec})}


# -- the baseline and the infrastructure allowances ------------------------------------------------

def default_deny() -> Obj:
    return _policy(CCNP, DEFAULT_DENY, None,
                   "Zero-trust baseline: application pods accept nothing and may only ask kube-dns "
                   "(L7 DNS rule, so Hubble shows every name asked for)",
                   {"endpointSelector": APP_NAMESPACES,
                    # Cilium enforces a direction only for endpoints selected by a rule with a
                    # section for it (pkg/policy/repository.go); enableDefaultDeny can only
                    # switch that off. `ingress: [{}]` enforces ingress and admits no one.
                    "enableDefaultDeny": {"ingress": True, "egress": True},
                    "ingress": [DENY_ALL],
                    "egress": [{"toEndpoints": [DNS_PEER],
                                "toPorts": [{"ports": DNS_PORTS,
                                             "rules": {"dns": [{"matchPattern": "*"}]}}]}]})


def gateway_envoy() -> Obj:
    return _policy(CCNP, GATEWAY_ENVOY, None,
                   "The Gateway's Envoy (reserved:ingress): clients outside the cluster and the "
                   "node reach the Gateway; it forwards only to application pods, whose own "
                   "policies admit it port by port",
                   {"endpointSelector": {"matchExpressions": [
                       {"key": "reserved:ingress", "operator": "Exists"}]},
                    # No toPorts: Envoy enforces its ingress policy on the backend's port, not
                    # the listener's (cilium/proxy#351), so a port here would be the wrong one.
                    "ingress": [{"fromEntities": ["world", "host"]}],
                    "egress": [{"toEndpoints": [APP_NAMESPACES]}]})


def coredns() -> Obj:
    return _policy(CNP, "lab-infra-coredns", "kube-system",
                   "CoreDNS answers every pod and node of the cluster on 53 and nothing else; its "
                   "egress (kube-apiserver, the node's resolver) stays open",
                   {"endpointSelector": {"matchLabels": {"k8s:k8s-app": "kube-dns"}},
                    "ingress": [{"fromEntities": ["cluster"], "toPorts": [{"ports": DNS_PORTS}]}]})


def hubble_relay() -> Obj:
    return _policy(CNP, "lab-infra-hubble-relay", "kube-system",
                   "Hubble relay gathers flows from every node's agent on 4244 and serves them "
                   "on 4245 to hubble-ui and to `hubble observe` run from an agent pod",
                   {"endpointSelector": {"matchLabels": {"k8s:k8s-app": "hubble-relay"}},
                    "ingress": [
                        {"fromEndpoints": [{"matchLabels": {NS: "kube-system",
                                                            "k8s:k8s-app": "hubble-ui"}}],
                         "toPorts": _ports(RELAY_PORT)},
                        # agent pods are host-network: host on the relay's node, remote-node
                        # elsewhere (the cni gate and `lab.hubble` query the relay from there)
                        {"fromEntities": ["host", "remote-node"], "toPorts": _ports(RELAY_PORT)}],
                    "egress": [
                        {"toEntities": ["host", "remote-node"], "toPorts": _ports(HUBBLE_PORT)},
                        # resolves the hubble-peer Service
                        {"toEndpoints": [DNS_PEER], "toPorts": [{"ports": DNS_PORTS}]}]})


def hubble_ui() -> Obj:
    return _policy(CNP, "lab-infra-hubble-ui", "kube-system",
                   "hubble-ui's backend reads flows from the relay and namespaces from the "
                   "kube-apiserver; nobody calls it (users reach it by port-forward, inside "
                   "the pod's network namespace)",
                   {"endpointSelector": {"matchLabels": {"k8s:k8s-app": "hubble-ui"}},
                    "ingress": [DENY_ALL],
                    "egress": [
                        {"toEndpoints": [{"matchLabels": {NS: "kube-system",
                                                          "k8s:k8s-app": "hubble-relay"}}],
                         "toPorts": _ports(RELAY_PORT)},
                        {"toEntities": ["kube-apiserver"],
                         "toPorts": _ports(KUBE_APISERVER_PORT)},
                        {"toEndpoints": [DNS_PEER], "toPorts": [{"ports": DNS_PORTS}]}]})


def cert_manager() -> Obj:
    return _policy(CNP, "lab-infra-cert-manager", "cert-manager",
                   "cert-manager (controller, cainjector, webhook) talks only to the "
                   "kube-apiserver, plus DNS",
                   {"endpointSelector": {"matchLabels": {NS: "cert-manager"}},
                    "egress": [
                        {"toEntities": ["kube-apiserver"],
                         "toPorts": _ports(KUBE_APISERVER_PORT)},
                        {"toEndpoints": [DNS_PEER], "toPorts": [{"ports": DNS_PORTS}]}]})


def cert_manager_webhook() -> Obj:
    return _policy(CNP, "lab-infra-cert-manager-webhook", "cert-manager",
                   "The kube-apiserver calls cert-manager's webhook on 10250; in tunnel mode its "
                   "calls to another node arrive as remote-node (cilium#18049, #27967)",
                   {"endpointSelector": {"matchLabels": {
                       "k8s:app.kubernetes.io/component": "webhook"}},
                    "ingress": [{"fromEntities": ["kube-apiserver", "remote-node"],
                                 "toPorts": _ports(WEBHOOK_PORT)}]})


def clustermesh_apiserver(peer_cidrs: Sequence[str] = ()) -> Obj:
    """``peer_cidrs``: the Docker network the clusters share (the gateway step records it).
    Unknown (``lab.render`` without Docker): the remote rule is left out — closed, never the
    world."""
    ingress: list[Obj] = [{"fromEntities": ["host", "remote-node"], "toPorts": _ports(ETCD_PORT)}]
    if peer_cidrs:
        # other clusters' nodes are outside this cluster's identity space (mTLS guards etcd too)
        ingress.append({"fromCIDRSet": [{"cidr": c} for c in peer_cidrs],
                        "toPorts": _ports(ETCD_PORT)})
    return _policy(CNP, "lab-infra-clustermesh-apiserver", "kube-system",
                   "The clustermesh-apiserver's etcd (2379) is read by this cluster's agents and "
                   "by the remote clusters' nodes through its NodePort",
                   {"endpointSelector": {"matchLabels": {"k8s:k8s-app": "clustermesh-apiserver"}},
                    "ingress": ingress})


# -- applications ----------------------------------------------------------------------------------

EgressKind = Literal["app", "fqdn", "world", "cidr"]


@dataclass(frozen=True)
class Egress:
    """One destination an application may open connections to."""

    kind: EgressKind
    port: int
    protocol: str = "TCP"
    namespace: str = ""  # app
    labels: tuple[tuple[str, str], ...] = ()  # app
    target: str = ""  # fqdn name/pattern, or CIDR
    port_name: str = ""  # a named container port (from a Service's targetPort)

    def rule(self) -> Obj:
        ports = [{"ports": [{"port": self.port_name or str(self.port),
                             "protocol": self.protocol}]}]
        if self.kind == "app":
            return {"toEndpoints": [{"matchLabels": {NS: self.namespace,
                                                     **{_k8s(k): v for k, v in self.labels}}}],
                    "toPorts": ports}
        if self.kind == "fqdn":
            key = "matchPattern" if "*" in self.target else "matchName"
            return {"toFQDNs": [{key: self.target}], "toPorts": ports}
        if self.kind == "world":
            return {"toEntities": ["world"], "toPorts": ports}
        return {"toCIDRSet": [{"cidr": self.target}], "toPorts": ports}


@dataclass(frozen=True)
class Peer:
    """Pods allowed to connect to an application (besides the Gateway)."""

    namespace: str
    labels: tuple[tuple[str, str], ...]

    def selector(self) -> Obj:
        return {"matchLabels": {NS: self.namespace, **{_k8s(k): v for k, v in self.labels}}}


@dataclass(frozen=True)
class AppSpec:
    """What an application needs: the lab renders its CiliumNetworkPolicy (and HTTPRoute)."""

    name: str
    namespace: str
    port: int | None = None
    host: str | None = None  # served as https://<host>.localhost through the Gateway
    egress: tuple[Egress, ...] = ()
    ingress_from: tuple[Peer, ...] = ()
    selector: tuple[tuple[str, str], ...] = ()  # default: app.kubernetes.io/name=<name>

    @property
    def pod_labels(self) -> dict[str, str]:
        return dict(self.selector) if self.selector else {"app.kubernetes.io/name": self.name}

    @property
    def policy_name(self) -> str:
        return f"lab-app-{self.name}"

    @property
    def hostname(self) -> str | None:
        return f"{self.host}.localhost" if self.host else None


def _k8s(key: str) -> str:
    return key if ":" in key.split("/")[0] else f"k8s:{key}"


def app_policy(app: AppSpec, labels: Mapping[str, str] | None = None) -> Obj:
    """The application's own CiliumNetworkPolicy. DNS comes from the baseline, nothing else."""
    ingress: list[Obj] = []
    if app.host and app.port:
        ingress.append({"fromEntities": ["ingress"], "toPorts": _ports(app.port)})
    if app.ingress_from and app.port:
        ingress.append({"fromEndpoints": [p.selector() for p in app.ingress_from],
                        "toPorts": _ports(app.port)})
    spec: Obj = {"endpointSelector": {"matchLabels": {_k8s(k): v
                                                      for k, v in app.pod_labels.items()}},
                 # Always an ingress section: it is what enforces ingress (and a rule with
                 # neither section is refused by Cilium's parser).
                 "ingress": ingress or [DENY_ALL]}
    if app.egress:
        spec["egress"] = [e.rule() for e in app.egress]
    parts = []
    if app.host:
        parts.append(f"the Gateway ({app.hostname}) on {app.port}")
    if app.ingress_from:
        parts.append(f"{len(app.ingress_from)} peer selector(s) on {app.port}")
    why = (f"{app.name}: ingress only from " + " and ".join(parts) if parts
           else f"{app.name}: no ingress")
    why += f"; egress to {len(app.egress)} destination(s) it asked for" if app.egress else \
        "; egress: DNS only"
    return _policy(CNP, app.policy_name, app.namespace, why, spec,
                   labels=labels if labels is not None else {ONBOARD_LABEL: app.name})


PROBE_LABELS = {"app.kubernetes.io/name": "lab-probe"}
# The probes of the locked gate: a (DNS only), b (the target), c (egress opened toward b, so a
# refused connection from c proves the *ingress* default deny of b).
PROBE_NAMESPACES = ("lab-probe-a", "lab-probe-b", "lab-probe-c")
PROBE_PORT = 8080


def probe_egress() -> Obj:
    target = {"matchLabels": {NS: PROBE_NAMESPACES[1],
                              **{_k8s(k): v for k, v in PROBE_LABELS.items()}}}
    return _policy(CNP, "lab-probe-egress", PROBE_NAMESPACES[2],
                   "The ingress proof: this probe may open connections to lab-probe-b on 8080, "
                   "so only lab-probe-b's ingress default deny can stop them",
                   {"endpointSelector": {"matchLabels": {_k8s(k): v
                                                         for k, v in PROBE_LABELS.items()}},
                    "egress": [{"toEndpoints": [target], "toPorts": _ports(PROBE_PORT)}]})


ECHO_APP = AppSpec(name="echo", namespace="echo", port=8080, host="echo")


def render_policies(*, mesh: bool = False, mesh_peer_cidrs: Sequence[str] = (),
                    apps: Sequence[AppSpec] = (ECHO_APP,)) -> list[Obj]:
    """Every policy the `locked` step applies, baseline first."""
    out = [default_deny(), gateway_envoy(), coredns(), hubble_relay(), hubble_ui(),
           cert_manager(), cert_manager_webhook()]
    if mesh:
        out.append(clustermesh_apiserver(mesh_peer_cidrs))
    out += [app_policy(a, labels={STEP_LABEL: "locked", ONBOARD_LABEL: a.name}) for a in apps]
    out.append(probe_egress())
    return out


# -- allow-all detection ---------------------------------------------------------------------------

INGRESS_PEERS = ("fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet", "fromNodes",
                 "fromGroups")
EGRESS_PEERS = ("toEndpoints", "toEntities", "toCIDR", "toCIDRSet", "toFQDNs", "toServices",
                "toNodes", "toGroups")
SECTIONS = {"ingress": INGRESS_PEERS, "ingressDeny": INGRESS_PEERS,
            "egress": EGRESS_PEERS, "egressDeny": EGRESS_PEERS}


def _specs(policy: Obj) -> list[Obj]:
    specs = [policy["spec"]] if isinstance(policy.get("spec"), dict) else []
    return specs + [s for s in policy.get("specs") or [] if isinstance(s, dict)]


def policy_ref(policy: Obj) -> str:
    meta = policy.get("metadata", {})
    ns = meta.get("namespace")
    return f"{policy.get('kind')} {ns + '/' if ns else ''}{meta.get('name')}"


ALL_ADDRESSES = ("0.0.0.0/0", "::/0")


def find_allow_all(policies: Iterable[Obj]) -> list[str]:
    """Every allow rule that would admit every peer (on every port, for the broad forms).

    The exact empty rule ``{}`` is not one: it selects no peer and allows nothing, and is how a
    direction is put into default deny. Deny sections are not checked: they cannot allow.
    Empty list: none found.
    """
    problems: list[str] = []
    for policy in policies:
        for spec in _specs(policy):
            for section in ("ingress", "egress"):
                peers = SECTIONS[section]
                for i, rule in enumerate(spec.get(section) or []):
                    where = f"{policy_ref(policy)}: {section}[{i}]"
                    if rule == DENY_ALL:
                        continue
                    if not isinstance(rule, dict):
                        problems.append(f"{where} is not a rule (a mapping)")
                        continue
                    if not any(rule.get(k) for k in peers):
                        problems.append(f"{where} names no peer ({', '.join(peers[:3])}, …): "
                                        "it admits every peer on its ports")
                    for key in ("fromEndpoints", "toEndpoints", "fromNodes", "toNodes"):
                        for sel in rule.get(key) or []:
                            if not sel or not (sel.get("matchLabels")
                                               or sel.get("matchExpressions")):
                                problems.append(f"{where}.{key} has an empty selector: it "
                                                "selects every endpoint")
                    if rule.get("toPorts"):
                        continue  # the forms below are allow-alls only without ports
                    for key in ("fromEntities", "toEntities"):
                        if "all" in (rule.get(key) or []):
                            problems.append(f"{where}.{key} names the `all` entity on every "
                                            "port")
                    cidrs = [*(rule.get("fromCIDR") or []), *(rule.get("toCIDR") or []),
                             *(c.get("cidr") for c in [*(rule.get("fromCIDRSet") or []),
                                                       *(rule.get("toCIDRSet") or [])]
                               if isinstance(c, dict))]
                    for cidr in cidrs:
                        if cidr in ALL_ADDRESSES:
                            problems.append(f"{where} admits {cidr} on every port")
    return problems
