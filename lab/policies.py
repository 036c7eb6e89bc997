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

Reading the policies
--------------------
Each policy's ``spec.description`` is its one-line "why". ``find_allow_all`` refuses empty rules
(``{}`` — in Cilium an empty rule or selector means *allow all*), rules without a peer and the
``all`` entity. ``MATRIX`` lists flows with the expected verdict; ``decide`` evaluates a flow
against rendered policies (a small model of Cilium's semantics, enough for these shapes) and names
the rule that allows it. The same matrix drives the live trials in ``lab.steps.locked``.
"""

from __future__ import annotations

import copy
import fnmatch
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
                    # Ingress has no rule at all: explicit default deny, never an empty rule.
                    "enableDefaultDeny": {"ingress": True, "egress": True},
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
                   "kube-apiserver; nothing else",
                   {"endpointSelector": {"matchLabels": {"k8s:k8s-app": "hubble-ui"}},
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
    remote: Obj = ({"fromCIDRSet": [{"cidr": c} for c in peer_cidrs]} if peer_cidrs
                   else {"fromEntities": ["world"]})
    return _policy(CNP, "lab-infra-clustermesh-apiserver", "kube-system",
                   "The clustermesh-apiserver's etcd (2379) is read by this cluster's agents and "
                   "by the remote clusters' nodes through its NodePort",
                   {"endpointSelector": {"matchLabels": {"k8s:k8s-app": "clustermesh-apiserver"}},
                    "ingress": [
                        {"fromEntities": ["host", "remote-node"], "toPorts": _ports(ETCD_PORT)},
                        # before the mesh connects, other clusters' nodes are outside this
                        # cluster's identity space (mTLS still guards etcd)
                        {**remote, "toPorts": _ports(ETCD_PORT)}]})


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
                                                      for k, v in app.pod_labels.items()}}}
    if ingress:
        spec["ingress"] = ingress
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


ECHO_APP = AppSpec(name="echo", namespace="echo", port=8080, host="echo")


def render_policies(*, mesh: bool = False, mesh_peer_cidrs: Sequence[str] = (),
                    apps: Sequence[AppSpec] = (ECHO_APP,)) -> list[Obj]:
    """Every policy the `locked` step applies, baseline first."""
    out = [default_deny(), gateway_envoy(), coredns(), hubble_relay(), hubble_ui(),
           cert_manager(), cert_manager_webhook()]
    if mesh:
        out.append(clustermesh_apiserver(mesh_peer_cidrs))
    out += [app_policy(a, labels={STEP_LABEL: "locked", ONBOARD_LABEL: a.name}) for a in apps]
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


def find_allow_all(policies: Iterable[Obj]) -> list[str]:
    """Every rule that would allow all peers. Empty list: none."""
    problems: list[str] = []
    for policy in policies:
        for spec in _specs(policy):
            for section, peers in SECTIONS.items():
                for i, rule in enumerate(spec.get(section) or []):
                    where = f"{policy_ref(policy)}: {section}[{i}]"
                    if not isinstance(rule, dict) or not rule:
                        problems.append(f"{where} is an empty rule ({{}}): it allows everything")
                        continue
                    present = [k for k in peers if rule.get(k)]
                    if not present:
                        problems.append(f"{where} names no peer ({', '.join(peers[:3])}, …): "
                                        "it applies to every peer")
                    for key in ("fromEndpoints", "toEndpoints", "fromNodes", "toNodes"):
                        for sel in rule.get(key) or []:
                            if not sel or not (sel.get("matchLabels")
                                               or sel.get("matchExpressions")):
                                problems.append(f"{where}.{key} has an empty selector: it "
                                                "selects every endpoint")
                    for key in ("fromEntities", "toEntities"):
                        if "all" in (rule.get(key) or []):
                            problems.append(f"{where}.{key} names the `all` entity")
    return problems


# -- the matrix ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Actor:
    """A source or destination: the identity Cilium sees for it."""

    name: str
    labels: Mapping[str, str]  # identity labels, with their source prefix (k8s:, reserved:)
    entities: frozenset[str]
    endpoint: bool = True  # a Cilium endpoint with policy; hosts and the world are not
    ip: str = ""
    fqdn: str = ""

    @property
    def namespace(self) -> str | None:
        return self.labels.get(NS)


def pod_actor(name: str, namespace: str, **labels: str) -> Actor:
    """A pod: its namespace and labels as Cilium sees them (source `k8s:`)."""
    return Actor(name, {NS: namespace, **{f"k8s:{k}": v for k, v in labels.items()}},
                 frozenset({"cluster"}))


ACTORS: dict[str, Actor] = {a.name: a for a in (
    pod_actor("app-a", "lab-probe-a", **{"app.kubernetes.io/name": "lab-probe"}),
    pod_actor("app-b", "lab-probe-b", **{"app.kubernetes.io/name": "lab-probe"}),
    pod_actor("echo", "echo", **{"app.kubernetes.io/name": "echo"}),
    pod_actor("kube-dns", "kube-system", **{"k8s-app": "kube-dns"}),
    pod_actor("hubble-relay", "kube-system", **{"k8s-app": "hubble-relay"}),
    pod_actor("hubble-ui", "kube-system", **{"k8s-app": "hubble-ui"}),
    pod_actor("cert-manager", "cert-manager", **{"app.kubernetes.io/component": "controller",
                                            "app.kubernetes.io/instance": "cert-manager"}),
    pod_actor("cert-manager-webhook", "cert-manager", **{"app.kubernetes.io/component": "webhook",
                                                    "app.kubernetes.io/instance": "cert-manager"}),
    pod_actor("clustermesh-apiserver", "kube-system", **{"k8s-app": "clustermesh-apiserver"}),
    Actor("gateway", {"reserved:ingress": ""}, frozenset({"ingress", "cluster"})),
    Actor("world", {"reserved:world": ""}, frozenset({"world"}), endpoint=False, ip="1.1.1.1",
          fqdn="one.one.one.one"),
    Actor("host", {"reserved:host": ""}, frozenset({"host", "cluster"}), endpoint=False),
    Actor("remote-node", {"reserved:remote-node": ""}, frozenset({"remote-node", "cluster"}),
          endpoint=False),
    Actor("kube-apiserver", {"reserved:kube-apiserver": ""},
          frozenset({"kube-apiserver", "cluster"}), endpoint=False),
    Actor("kube-apiserver-tunnelled", {"reserved:remote-node": ""},
          frozenset({"remote-node", "cluster"}), endpoint=False),
    Actor("remote-cluster-node", {"reserved:world": ""}, frozenset({"world"}), endpoint=False,
          ip="172.18.0.10"),
)}

# How the live suite tries a flow (see lab.steps.locked.try_flow); None: proven offline only.
Trial = Literal["tcp", "dns", "gateway-https", "relay-nodes", "relay-from-agent",
                "webhook-dry-run", "cert-manager-lease"]


@dataclass(frozen=True)
class Flow:
    source: str
    destination: str
    port: int
    protocol: str
    expect: Literal["allowed", "denied"]
    why: str
    trial: Trial | None = None
    when: Literal["always", "mesh"] = "always"

    def __str__(self) -> str:
        return f"{self.source} → {self.destination}:{self.port}/{self.protocol}"


MATRIX: list[Flow] = [
    Flow("app-a", "app-b", 8080, "TCP", "denied",
         "applications are isolated from each other by default", "tcp"),
    Flow("app-a", "kube-dns", 53, "UDP", "allowed", "every application resolves names", "dns"),
    Flow("app-a", "kube-dns", 53, "TCP", "allowed", "large DNS answers fall back to TCP"),
    Flow("app-a", "world", 443, "TCP", "denied", "no egress to the internet unless asked for",
         "tcp"),
    Flow("app-a", "echo", 8080, "TCP", "denied", "only the Gateway may call echo", "tcp"),
    Flow("app-a", "hubble-relay", 4245, "TCP", "denied", "applications cannot read flows", "tcp"),
    Flow("app-a", "cert-manager-webhook", 10250, "TCP", "denied",
         "only the kube-apiserver calls the webhook", "tcp"),
    Flow("app-a", "kube-dns", 9153, "TCP", "denied", "CoreDNS serves DNS, not its metrics"),
    Flow("world", "gateway", 443, "TCP", "allowed",
         "the Gateway serves clients outside the cluster", "gateway-https"),
    Flow("host", "gateway", 443, "TCP", "allowed", "the node itself may use the Gateway"),
    Flow("gateway", "echo", 8080, "TCP", "allowed",
         "the demo route reaches its backend on its port", "gateway-https"),
    Flow("gateway", "echo", 9090, "TCP", "denied", "the Gateway reaches echo on 8080 only"),
    Flow("gateway", "kube-dns", 53, "UDP", "denied", "the Gateway forwards to applications only"),
    Flow("world", "echo", 8080, "TCP", "denied",
         "applications are reached only through the Gateway"),
    Flow("echo", "world", 443, "TCP", "denied", "echo asked for no egress", "tcp"),
    Flow("echo", "kube-dns", 53, "UDP", "allowed", "echo resolves names", "dns"),
    Flow("hubble-ui", "hubble-relay", 4245, "TCP", "allowed", "hubble-ui reads flows"),
    Flow("hubble-ui", "kube-apiserver", 6443, "TCP", "allowed", "hubble-ui lists namespaces"),
    Flow("hubble-ui", "world", 443, "TCP", "denied", "hubble-ui has no business outside"),
    Flow("hubble-relay", "host", 4244, "TCP", "allowed", "the relay reads the local agent",
         "relay-nodes"),
    Flow("hubble-relay", "remote-node", 4244, "TCP", "allowed", "the relay reads every agent",
         "relay-nodes"),
    Flow("hubble-relay", "world", 443, "TCP", "denied", "the relay talks to nodes only"),
    Flow("host", "hubble-relay", 4245, "TCP", "allowed",
         "`hubble observe --server` from the local agent pod", "relay-from-agent"),
    Flow("remote-node", "hubble-relay", 4245, "TCP", "allowed",
         "`hubble observe --server` from an agent pod on another node"),
    Flow("kube-apiserver", "cert-manager-webhook", 10250, "TCP", "allowed",
         "admission calls from the kube-apiserver", "webhook-dry-run"),
    Flow("kube-apiserver-tunnelled", "cert-manager-webhook", 10250, "TCP", "allowed",
         "admission calls to a webhook on another node arrive as remote-node in tunnel mode"),
    Flow("world", "cert-manager-webhook", 10250, "TCP", "denied", "nobody else calls the webhook"),
    Flow("cert-manager", "kube-apiserver", 6443, "TCP", "allowed",
         "cert-manager issues certificates through the API", "cert-manager-lease"),
    Flow("cert-manager", "world", 443, "TCP", "denied", "the lab's CA issuer needs no internet"),
    Flow("remote-cluster-node", "clustermesh-apiserver", 2379, "TCP", "allowed",
         "remote clusters read this cluster's state", when="mesh"),
    Flow("remote-node", "clustermesh-apiserver", 2379, "TCP", "allowed",
         "this cluster's agents read the kvstoremesh cache", when="mesh"),
    Flow("app-a", "clustermesh-apiserver", 2379, "TCP", "denied",
         "applications cannot read the mesh's etcd", when="mesh"),
]


# -- a small model of Cilium's policy semantics ----------------------------------------------------

def _label(labels: Mapping[str, str], key: str) -> str | None:
    """A selector key without a source matches any source (Cilium's `any:`)."""
    if key.startswith("any:"):
        key = key[4:]
    if key in labels:
        return labels[key]
    if ":" not in key.split("/")[0]:
        for full, value in labels.items():
            if full.split(":", 1)[-1] == key and ":" in full.split("/")[0]:
                return value
    return None


def selector_matches(selector: Obj, labels: Mapping[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if _label(labels, key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        have = _label(labels, expr["key"])
        op, values = expr["operator"], expr.get("values") or []
        if ((op == "In" and have not in values) or (op == "NotIn" and have in values)
                or (op == "Exists" and have is None)
                or (op == "DoesNotExist" and have is not None)):
            return False
    return True


def _scoped(selector: Obj, policy: Obj) -> Obj:
    """In a CiliumNetworkPolicy, selectors without a namespace mean the policy's namespace."""
    ns = policy.get("metadata", {}).get("namespace")
    if policy.get("kind") != CNP or not ns:
        return selector
    keys = set(selector.get("matchLabels") or {}) | {
        e["key"] for e in selector.get("matchExpressions") or []}
    if keys & {NS, "io.kubernetes.pod.namespace", "any:io.kubernetes.pod.namespace"}:
        return selector
    return {**selector, "matchLabels": {**(selector.get("matchLabels") or {}), NS: ns}}


def _ports_match(rule: Obj, port: int, protocol: str) -> bool:
    to_ports = rule.get("toPorts")
    if not to_ports:
        return True
    for entry in to_ports:
        for p in entry.get("ports") or []:
            proto = p.get("protocol") or "ANY"
            if str(p.get("port")) in (str(port), "0") and proto in (protocol, "ANY"):
                return True
    return False


def _peer_matches(rule: Obj, peer: Actor, policy: Obj, prefix: str) -> bool:
    for sel in rule.get(f"{prefix}Endpoints") or []:
        if peer.endpoint and selector_matches(_scoped(sel, policy), peer.labels):
            return True
    for entity in rule.get(f"{prefix}Entities") or []:
        if entity == "all" or entity in peer.entities:
            return True
    if peer.ip and "world" in peer.entities:
        ip = ipaddress.ip_address(peer.ip)
        cidrs = [c.get("cidr", "") for c in rule.get(f"{prefix}CIDRSet") or []]
        cidrs += list(rule.get(f"{prefix}CIDR") or [])
        if any(c and ip in ipaddress.ip_network(c, strict=False) for c in cidrs):
            return True
    if peer.fqdn and prefix == "to":
        for f in rule.get("toFQDNs") or []:
            if f.get("matchName", "").rstrip(".") == peer.fqdn or fnmatch.fnmatch(
                    peer.fqdn, f.get("matchPattern", "\0").rstrip(".")):
                return True
    return False


def selects(policy: Obj, actor: Actor) -> bool:
    if not actor.endpoint:
        return False
    spec = policy.get("spec") or {}
    sel = spec.get("endpointSelector")
    if sel is None:
        return False
    if policy.get("kind") == CNP and actor.namespace != policy.get("metadata", {}).get(
            "namespace"):
        return False
    return selector_matches(sel, actor.labels)


@dataclass
class Side:
    """One endpoint's half of a flow: its egress (source) or ingress (destination)."""

    enforced: bool = False
    allowed_by: list[str] = field(default_factory=list)
    denied_by: list[str] = field(default_factory=list)

    @property
    def allows(self) -> bool:
        return not self.denied_by and (not self.enforced or bool(self.allowed_by))


@dataclass
class Decision:
    flow: Flow
    egress: Side
    ingress: Side

    @property
    def verdict(self) -> Literal["allowed", "denied"]:
        return "allowed" if self.egress.allows and self.ingress.allows else "denied"

    def explain(self) -> str:
        def side(name: str, s: Side) -> str:
            if s.denied_by:
                return f"{name} denied by {', '.join(s.denied_by)}"
            if not s.enforced:
                return f"{name} not enforced"
            return (f"{name} allowed by {', '.join(s.allowed_by)}" if s.allowed_by
                    else f"{name} default-denied")
        return f"{self.flow}: {side('egress', self.egress)}; {side('ingress', self.ingress)}"


def _side(policies: Sequence[Obj], subject: Actor, peer: Actor, flow: Flow,
          direction: Literal["ingress", "egress"]) -> Side:
    side = Side()
    prefix = "from" if direction == "ingress" else "to"
    for policy in policies:
        if not selects(policy, subject):
            continue
        spec = policy.get("spec") or {}
        has_rules = bool(spec.get(direction) or spec.get(f"{direction}Deny"))
        default_deny = (spec.get("enableDefaultDeny") or {}).get(direction)
        if default_deny if default_deny is not None else has_rules:
            side.enforced = True
        for key, hits in ((direction, side.allowed_by), (f"{direction}Deny", side.denied_by)):
            for i, rule in enumerate(spec.get(key) or []):
                if _peer_matches(rule, peer, policy, prefix) and _ports_match(
                        rule, flow.port, flow.protocol):
                    hits.append(f"{policy_ref(policy)} {key}[{i}]")
    return side


def decide(flow: Flow, policies: Sequence[Obj],
           actors: Mapping[str, Actor] | None = None) -> Decision:
    """Would Cilium allow this flow under these policies? (``actors``: default ``ACTORS``)"""
    known = {**ACTORS, **(actors or {})}
    src, dst = known[flow.source], known[flow.destination]
    return Decision(flow, _side(policies, src, dst, flow, "egress"),
                    _side(policies, dst, src, flow, "ingress"))
