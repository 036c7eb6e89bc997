"""A controller simulator: what runs inside a kind cluster, on one real API server.

``SimCluster`` plays, for one kind cluster served by a real ``kube-apiserver`` (envtest, reached
through an ``ApiFront``), the parts of a real
cluster the lab's readiness gates look at, by *reacting to what was written*:

* **kubelet + kind** — when the fake ``kind create`` records the cluster (``kind.json`` in
  ``$LAB_FAKE_STATE``), its nodes register (NotReady: no CNI), with the InternalIP the fake Docker
  gave them and a podCIDR from the kind config; ``kubeadm-config``, CoreDNS (Pending until a CNI
  runs), kube-proxy/kindnet only if the kind config asked for them. Pods are scheduled (taints,
  required anti-affinity), start only once the node's Cilium agent is ready (host-network pods
  excepted), get IPs from the node's podCIDR.
* **helm's chart templates** — the fake helm applies a one-object chart (a ServiceAccount) per
  release; on seeing it the simulator renders the rest of the chart *from the values the release
  was installed with* (``helm.json``): Cilium's agent/envoy DaemonSets, operator (replicas and the
  chart's required anti-affinity), Hubble relay/UI, clustermesh-apiserver + its NodePort Service,
  the ``cilium-clustermesh`` Secret and agent ``hostAliases`` for the declared peers, the
  ``cilium-ca`` Secret, the GatewayClass (only when its CRD exists, as the chart's capability check
  does); cert-manager's Deployments and, with ``crds.enabled``, its CRDs.
* **controllers** — DaemonSet/Deployment controllers (rollouts, observedGeneration, Available),
  Cilium's operator (CRDs at start-up, the Gateway controller only
  if the Gateway API CRDs existed when it started, GatewayClass Accepted, LB IPAM from the
  ``CiliumLoadBalancerIPPool``, the ``cilium-gateway-<name>`` Service, Gateway/listener/HTTPRoute
  status, policy ``Valid`` conditions), Cilium agents (ready only with ``k8sServiceHost`` and the
  CRDs; the node turns Ready with them), cert-manager (issuers, Certificates minted with
  ``cryptography`` from their spec: a real CA and leaf certificates for the requested dnsNames)
  and its admission webhook (writes to cert-manager.io fail while it does not answer, or when a
  policy keeps the kube-apiserver from it).
* **the datapath** — a small, independent model of Cilium policy (selectors with sources,
  namespace scoping of CiliumNetworkPolicies, entities, CIDR sets, ports, default deny,
  deny rules), Service translation only with kube-proxy replacement; it decides the probe pods'
  connections (a drop is a ``TIMEOUT`` and a Hubble ``POLICY_DENIED`` flow), DNS, the relay's
  reach to every node, Cluster Mesh connections (peer address from ``hostAliases``, the peer's
  clustermesh NodePort on its node IP from the fake Docker, the shared CA, cluster name and id)
  and global-service answers (``curl`` gets the pod name of a backend in any connected cluster).
* **the host** — a real TLS server on 127.0.0.1 at the cluster's ``httpsHostPort`` plays kind's
  port mapping → the node's NodePort → Cilium's Envoy: it answers only if the kind config maps
  that host port to a NodePort that the Gateway's Service really has, serves the certificate of the
  Secret the HTTPS listener references (chosen by SNI), routes by HTTPRoute to a ready backend pod
  the policies let Envoy reach, and answers 200 with the pod's name.

Execs answered (``cilium-dbg status|policy get|endpoint list -o json``, ``hubble status|observe``,
``/agnhost connect``, ``nslookup``, ``curl``) read the live objects. Not modelled: image pulls,
restarts and crash loops, probes' timing (the controllers converge in passes right after the
writes that caused them), L7 policy (DNS rules allow the L4 traffic), FQDN and Service-based
policy peers, the host firewall, real TLS between clusters (the shared CA is compared).

The real API server does the server-side apply: the `gateway` and `certs` steps each own one
listener of the same Gateway (``x-kubernetes-list-type: map``). Faults for one cluster only go
through that cluster's ``emu.fail_next``: fakelib's injection keys name a tool and subcommand, not
a cluster. ``make_lab``/``sim_lab`` build a ``LabEnv`` with one simulator per cluster of a shipped
config; call ``check()`` at the end to surface errors raised inside controllers or handlers.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import hashlib
import ipaddress
import itertools
import json
import random
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import REPO, LabEnv, load_upstream_crds, upstream_dir
from tests.support.apifront import ApiError, ApiFront

Obj = dict[str, Any]

KS = "kube-system"
HELM_RELEASE = "meta.helm.sh/release-name"
HELM_NAMESPACE = "meta.helm.sh/release-namespace"
OWNER = "sim.kind-cilium-lab/owner"  # "<Kind>/<name>/<uid>" of the controller of a pod
GATEWAY_API = "gateway.networking.k8s.io/v1"
CM_API = "cert-manager.io/v1"
CILIUM = "cilium.io/v2"
GATEWAY_CONTROLLER = "io.cilium/gateway"
NS_LABEL = "io.kubernetes.pod.namespace"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
NODEPORT_RANGE = (30000, 32767)
# where the host's connections through kind's port mappings come from
HOST_GATEWAY_IP = "172.18.0.1"
GATEWAY_API_CRDS = ("gatewayclasses", "gateways", "httproutes", "grpcroutes", "referencegrants")


# ================================================================================================
# small helpers
# ================================================================================================

def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def dig(obj: Any, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return default
        obj = obj[part]
    return obj


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def meta(obj: Obj | None) -> Obj:
    return (obj or {}).get("metadata") or {}


def cond_of(obj: Obj | None, type_: str) -> Obj | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def is_true(obj: Obj | None, type_: str) -> bool:
    return (cond_of(obj, type_) or {}).get("status") == "True"


def condition(type_: str, ok: bool, reason: str, message: str = "",
              generation: int | None = None, old: Iterable[Obj] = ()) -> Obj:
    """A status condition whose lastTransitionTime only moves when its status does."""
    status = "True" if ok else "False"
    previous = next((c for c in old if c.get("type") == type_), None)
    since = previous.get("lastTransitionTime") if previous and previous.get(
        "status") == status else now_iso()
    out: Obj = {"type": type_, "status": status, "reason": reason, "message": message,
                "lastTransitionTime": since}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def _hash(value: Any, length: int = 10) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


# ================================================================================================
# PKI (what cert-manager issues)
# ================================================================================================

def _new_key(spec: Obj | None) -> Any:
    alg = str((spec or {}).get("algorithm") or "RSA").upper()
    size = int((spec or {}).get("size") or 0)
    if alg == "ECDSA":
        return ec.generate_private_key({384: ec.SECP384R1(), 521: ec.SECP521R1()}.get(
            size, ec.SECP256R1()))
    if alg == "ED25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=size or 2048)


def _key_pem(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def _subject(spec: Obj) -> x509.Name:
    attrs = []
    if spec.get("commonName"):
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, str(spec["commonName"])))
    for org in dig(spec, "subject.organizations", []) or []:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(org)))
    return x509.Name(attrs)


def _duration(spec: Obj) -> datetime.timedelta:
    text = str(spec.get("duration") or "2160h")
    hours = float(text[:-1]) if text.endswith("h") else 2160.0
    return datetime.timedelta(hours=hours)


def issue_certificate(spec: Obj, issuer_cert: x509.Certificate | None, issuer_key: Any | None,
                      reuse_key: Any | None = None) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) as cert-manager issues them: self-signed when no issuer is
    given, else signed by it; SANs are the spec's dnsNames, a CA when ``isCA``."""
    key = reuse_key or _new_key(spec.get("privateKey"))
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = _subject(spec)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + _duration(spec)))
    names = [x509.DNSName(n) for n in spec.get("dnsNames") or []]
    if names:
        # As Go's crypto/x509 (which cert-manager signs with): critical when the subject is empty.
        builder = builder.add_extension(x509.SubjectAlternativeName(names),
                                        critical=len(subject) == 0)
    if spec.get("isCA"):
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                        critical=True)
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                        critical=True)
        if "server auth" in (spec.get("usages") or ["server auth"]):
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                    critical=False)
    if issuer_key is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    signer = issuer_key or key
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = builder.sign(signer, algorithm)  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def load_pair(secret: Obj | None) -> tuple[x509.Certificate, Any] | None:
    data = (secret or {}).get("data") or {}
    try:
        cert = x509.load_pem_x509_certificate(unb64(data.get("tls.crt")))
        key = serialization.load_pem_private_key(unb64(data.get("tls.key")), password=None)
    except (ValueError, TypeError):
        return None
    return cert, key


def cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.value.get_values_for_type(x509.DNSName)]


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


# ================================================================================================
# a small model of Cilium network policy
# ================================================================================================

@dataclass(frozen=True)
class Ident:
    """A peer as one cluster's datapath sees it."""

    labels: tuple[tuple[str, str, str], ...]  # (source, key, value)
    entities: frozenset[str]
    ip: str = ""
    namespace: str | None = None
    endpoint: bool = False  # has endpoint policy (a pod, or Envoy's reserved:ingress)
    named_ports: tuple[tuple[str, int], ...] = ()
    what: str = ""

    def value(self, key: str) -> str | None:
        source, _, name = key.partition(":") if ":" in key else ("any", "", key)
        for src, k, v in self.labels:
            if k == name and source in ("any", src):
                return v
        return None


def selector_matches(selector: Obj | None, ident: Ident) -> bool:
    """Kubernetes label-selector semantics over Cilium's source-prefixed labels."""
    if selector is None:
        return False
    for key, want in (selector.get("matchLabels") or {}).items():
        if ident.value(key) != str(want):
            return False
    for expr in selector.get("matchExpressions") or []:
        have = ident.value(str(expr.get("key")))
        values = [str(v) for v in expr.get("values") or []]
        op = expr.get("operator")
        ok = {"In": have is not None and have in values,
              "NotIn": have is None or have not in values,
              "Exists": have is not None,
              "DoesNotExist": have is None}.get(str(op), False)
        if not ok:
            return False
    return True


def _mentions_namespace(selector: Obj) -> bool:
    keys = list(selector.get("matchLabels") or {}) + [
        str(e.get("key")) for e in selector.get("matchExpressions") or []]
    return any(k.split(":", 1)[-1] == NS_LABEL for k in keys)


@dataclass
class Verdict:
    allowed: bool
    direction: str = ""  # where it was dropped: EGRESS or INGRESS
    why: str = ""


class PolicyModel:
    """Cilium's L3/L4 policy over the CiliumNetworkPolicies of one cluster."""

    def __init__(self, policies: list[Obj]) -> None:
        self.policies = policies

    @staticmethod
    def _specs(policy: Obj) -> list[Obj]:
        specs = [policy["spec"]] if isinstance(policy.get("spec"), dict) else []
        return specs + [s for s in policy.get("specs") or [] if isinstance(s, dict)]

    def _selecting(self, ident: Ident) -> list[tuple[Obj, Obj]]:
        out = []
        for policy in self.policies:
            ns = meta(policy).get("namespace")
            if policy.get("kind") == "CiliumNetworkPolicy" and ident.namespace != ns:
                continue
            for spec in self._specs(policy):
                if "nodeSelector" in spec:  # host policies: no host firewall in the lab
                    continue
                if selector_matches(spec.get("endpointSelector"), ident):
                    out.append((policy, spec))
        return out

    @staticmethod
    def _peer(rule: Obj, direction: str, policy: Obj, peer: Ident) -> bool:
        side = "from" if direction == "ingress" else "to"
        ns = meta(policy).get("namespace")
        for sel in rule.get(f"{side}Endpoints") or []:
            if not peer.labels:
                continue
            if policy.get("kind") == "CiliumNetworkPolicy" and not _mentions_namespace(sel) \
                    and peer.namespace != ns:
                continue
            if selector_matches(sel, peer):
                return True
        for entity in rule.get(f"{side}Entities") or []:
            entity = {"world-ipv4": "world", "world-ipv6": "world"}.get(entity, entity)
            if entity == "all" or entity in peer.entities:
                return True
        if "world" in peer.entities and peer.ip:
            cidrs = [{"cidr": c} for c in rule.get(f"{side}CIDR") or []]
            cidrs += [c for c in rule.get(f"{side}CIDRSet") or [] if isinstance(c, dict)]
            ip = ipaddress.ip_address(peer.ip)
            for c in cidrs:
                if not c.get("cidr"):
                    continue
                net = ipaddress.ip_network(c["cidr"], strict=False)
                if ip.version == net.version and ip in net and not any(
                        ip in ipaddress.ip_network(x, strict=False)
                        for x in c.get("except") or []
                        if ipaddress.ip_network(x, strict=False).version == ip.version):
                    return True
        return False

    @staticmethod
    def _ports(rule: Obj, port: int, proto: str, named: dict[str, int]) -> bool:
        entries = rule.get("toPorts")
        if not entries:
            return True
        for entry in entries:
            ports = entry.get("ports") or []
            if not ports:
                return True
            for p in ports:
                protocol = str(p.get("protocol") or "ANY").upper()
                if protocol not in ("ANY", proto):
                    continue
                value = str(p.get("port") or "0")
                if value == "0":
                    return True
                if value.isdigit():
                    if int(value) <= port <= int(p.get("endPort") or value):
                        return True
                elif named.get(value) == port:
                    return True
        return False

    def decide(self, endpoint: Ident, peer: Ident, direction: str, port: int, proto: str,
               named: dict[str, int]) -> tuple[bool, str]:
        selecting = self._selecting(endpoint)
        for policy, spec in selecting:
            for rule in spec.get(f"{direction}Deny") or []:
                if self._peer(rule, direction, policy, peer) and self._ports(rule, port, proto,
                                                                             named):
                    return False, f"denied by {policy['kind']} {meta(policy).get('name')}"
        enforced = []
        for policy, spec in selecting:
            explicit = (spec.get("enableDefaultDeny") or {}).get(direction)
            has_rules = bool(spec.get(direction) or spec.get(f"{direction}Deny"))
            if explicit is True or (explicit is None and has_rules):
                enforced.append(policy)
        if not enforced:
            return True, "no policy enforces this direction"
        for policy, spec in selecting:
            for rule in spec.get(direction) or []:
                if self._peer(rule, direction, policy, peer) and self._ports(rule, port, proto,
                                                                             named):
                    return True, f"allowed by {policy['kind']} {meta(policy).get('name')}"
        return False, "default deny (" + ", ".join(
            sorted({str(meta(p).get("name")) for p in enforced})) + ")"


@dataclass
class Flow:
    when: float
    node: str
    src: Obj
    dst: Obj
    src_ip: str
    dst_ip: str
    port: int
    proto: str
    direction: str


@dataclass
class Mesh:
    """The simulated clusters sharing one Docker network (one fake state)."""

    clusters: dict[str, SimCluster] = field(default_factory=dict)

    def by_node_ip(self, ip: str) -> SimCluster | None:
        for sim in self.clusters.values():
            if any(n.get("ipv4") == ip for n in sim.kind_nodes()):
                return sim
        return None


class SimCluster:
    """Controllers, kubelets, agents and the host port of one kind cluster (module docstring)."""

    def __init__(self, name: str, fake_state: Path, *, mesh: Mesh | None = None,
                 front: ApiFront) -> None:
        self.name = name
        self.fake_state = Path(fake_state)
        self.mesh = mesh if mesh is not None else Mesh()
        self.mesh.clusters[name] = self
        self.emu = front  # started here, stopped by close()
        self.emu.start()
        self.emu.admission = self._admission
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._rng = random.Random(f"sim-{name}")
        self._kind: Obj | None = None  # the kind.json record this cluster was registered from
        self._dirty_releases: set[str] = set()
        self._rendered: dict[str, set[tuple[str, str, str, str]]] = {}
        self._ip_next: dict[str, int] = {}
        self._policy_revision = 1
        self._rr = itertools.count()
        self._flows: list[Flow] = []
        self._operator_started: dict[str, bool] = {}  # operator pod uid → Gateway API CRDs then
        self._tl = threading.local()  # .cache: list snapshots, only inside a reconcile pass
        self.api_creates: list[str] = []  # "Kind ns/name" created through the API
        self.errors: list[BaseException] = []
        self._register_apiserver()
        write_charts(self.fake_state)
        self.front = HostFront(self)
        self.emu.on_write(self._on_write)
        self.emu.on_exec(self._on_exec)
        self.emu.on_portforward(self._on_portforward)
        self._watcher = threading.Thread(target=self._watch_kind, daemon=True,
                                         name=f"sim-{name}-kind")
        self._watcher.start()
        # The controllers run in their own thread, one pass per burst of writes (a work queue),
        # as real controllers do.
        self._worker = threading.Thread(target=self._controllers, daemon=True,
                                        name=f"sim-{name}-controllers")
        self._worker.start()

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def https_port(self) -> int:
        return self.front.port

    def _controllers(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(0.2):
                continue
            # A burst of writes makes one pass: a task writes several objects in a row (a helm
            # release, a step's manifests), and each pass reads and rewrites a lot.
            self._stop.wait(0.3)
            self._wake.clear()
            try:
                with self.emu.cached_reads():
                    self.reconcile()
            except Exception as exc:  # keep running; the test sees it through check()
                self.errors.append(exc)

    def close(self) -> None:
        self._stop.set()
        self._watcher.join(timeout=5)
        self._worker.join(timeout=10)
        self.front.close()
        self.emu.admission = None
        self.emu.stop()
        self.mesh.clusters.pop(self.name, None)

    def _register_apiserver(self) -> None:
        path = self.fake_state / "apiservers.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[self.name] = self.emu.url
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    def flows(self) -> list[Flow]:
        """The policy drops Hubble has seen in this cluster, oldest first."""
        with self._lock:
            return list(self._flows)

    def check(self) -> None:
        """Raise the first error a controller or handler hit (tests call it at the end)."""
        errors = self.errors + self.emu.callback_errors
        if errors:
            raise AssertionError(f"simulator {self.name}: {errors[0]!r}") from errors[0]

    # -- kind: the cluster's nodes -----------------------------------------------------------------

    def kind_record(self) -> Obj | None:
        try:
            data = json.loads((self.fake_state / "kind.json").read_text() or "{}")
        except (OSError, ValueError):
            return None
        rec = (data.get("clusters") or {}).get(self.name)
        return rec if isinstance(rec, dict) else None

    def kind_nodes(self) -> list[Obj]:
        rec = self._kind
        return [n for n in (rec or {}).get("nodes") or []
                if n.get("role") != "external-load-balancer"]

    def _watch_kind(self) -> None:
        # kind.json is read again once it changed (the fake replaces it whole on each write),
        # and every 0.5 s in any case: two writes within one tick of the file system's clock can
        # leave the same inode number, time and size
        seen, read_at = None, 0.0
        while not self._stop.wait(0.03):
            try:
                try:
                    st = (self.fake_state / "kind.json").stat()
                    now = (st.st_ino, st.st_mtime_ns, st.st_size)
                except OSError:
                    now = None
                if now is not None and now == seen and time.monotonic() - read_at < 0.5:
                    continue
                read_at = time.monotonic()
                rec = self.kind_record()
                running = rec is not None and rec.get("status") == "running"
                if running and (self._kind is None or self._kind.get("seq") != rec.get("seq")):
                    with self._lock:
                        self._kind = copy.deepcopy(rec)
                        self._cluster_created(rec)
                        self.reconcile()
                elif rec is None and self._kind is not None:
                    with self._lock:
                        self._kind = None
                seen = now  # handled: read again once it changes
            except Exception as exc:  # keep watching; the test sees it through check()
                self.errors.append(exc)

    def _kind_config(self) -> Obj:
        return (self._kind or {}).get("config") or {}

    def _cluster_created(self, rec: Obj) -> None:
        cfg = rec.get("config") or {}
        net = cfg.get("networking") or {}
        pod_cidr = ipaddress.ip_network(net.get("podSubnet") or "10.244.0.0/16")
        svc_cidr = ipaddress.ip_network(net.get("serviceSubnet") or "10.96.0.0/16")
        subnets = list(pod_cidr.subnets(new_prefix=24))
        workers = any(n["role"] == "worker" for n in self.kind_nodes())
        for i, node in enumerate(self.kind_nodes()):
            labels = {"kubernetes.io/hostname": node["name"], "kubernetes.io/os": "linux"}
            taints = []
            if node["role"] == "control-plane":
                labels["node-role.kubernetes.io/control-plane"] = ""
                if workers:
                    taints.append({"key": "node-role.kubernetes.io/control-plane",
                                   "effect": "NoSchedule"})
            self._put({"apiVersion": "v1", "kind": "Node",
                          "metadata": {"name": node["name"], "labels": labels},
                          "spec": {"podCIDR": str(subnets[i]), "podCIDRs": [str(subnets[i])],
                                   "taints": taints},
                          "status": {"conditions": [condition(
                              "Ready", False, "KubeletNotReady",
                              "container runtime network not ready: NetworkReady=false "
                              "reason:NetworkPluginNotReady message:Network plugin returns "
                              "error: cni plugin not initialized")],
                              "addresses": [{"type": "InternalIP", "address": node["ipv4"]},
                                            {"type": "Hostname", "address": node["name"]}]}})
        kubeadm = {"apiVersion": "kubeadm.k8s.io/v1beta4", "kind": "ClusterConfiguration",
                   "clusterName": self.name,
                   "networking": {"podSubnet": str(pod_cidr), "serviceSubnet": str(svc_cidr),
                                  "dnsDomain": "cluster.local"}}
        self._put({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "kubeadm-config", "namespace": KS},
                      "data": {"ClusterConfiguration": yaml.safe_dump(kubeadm)}})
        self._put({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "kubernetes", "namespace": "default",
                                   "labels": {"component": "apiserver"}},
                      "spec": {"clusterIP": str(svc_cidr.network_address + 1),
                               "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}})
        self._put({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "kube-dns", "namespace": KS,
                                   "labels": {"k8s-app": "kube-dns"}},
                      "spec": {"clusterIP": str(svc_cidr.network_address + 10),
                               "selector": {"k8s-app": "kube-dns"},
                               "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                                         {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}})
        coredns_tolerations = [{"key": "node-role.kubernetes.io/control-plane",
                                "effect": "NoSchedule"}, {"key": "CriticalAddonsOnly",
                                                          "operator": "Exists"}]
        self._put(_deployment("coredns", KS, {"k8s-app": "kube-dns"}, replicas=2,
                                 containers=[{"name": "coredns", "ports": [
                                     {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                     {"name": "dns-tcp", "containerPort": 53}]}],
                                 extra_spec={"tolerations": coredns_tolerations}))
        if net.get("kubeProxyMode", "iptables") != "none":
            self._put(_daemonset("kube-proxy", KS, {"k8s-app": "kube-proxy"}, "kube-proxy"))
        if not net.get("disableDefaultCNI"):
            self._put(_daemonset("kindnet", KS, {"app": "kindnet"}, "kindnet-cni"))

    # -- helm: charts rendered from the installed values -------------------------------------------

    def release(self, name: str, namespace: str) -> Obj | None:
        """The newest revision of a release in this cluster (None: not installed)."""
        try:
            data = json.loads((self.fake_state / "helm.json").read_text() or "{}")
        except (OSError, ValueError):
            return None
        rec = (data.get(f"kind-{self.name}") or {}).get(f"{namespace}/{name}")
        if not rec or not rec.get("history"):
            return None
        last = rec["history"][-1]
        return None if last.get("status") in ("uninstalled", "uninstalling") else last

    def helm_values(self, name: str, namespace: str) -> Obj:
        rev = self.release(name, namespace)
        return copy.deepcopy((rev or {}).get("values") or {})

    def _render_release(self, release: str) -> None:
        marker = {"cilium": (KS, "cilium"), "cert-manager": ("cert-manager", "cert-manager")}
        if release not in marker:
            return
        ns, sa = marker[release]
        rev = self.release(release, ns)
        installed = self.emu.get("v1", "ServiceAccount", sa, ns) is not None
        if rev is None or not installed:
            for api, kind, namespace, name in self._rendered.pop(release, set()):
                with contextlib.suppress(KeyError):
                    self._delete(api, kind, name, namespace or None)
            return
        values = rev.get("values") or {}
        objs = (self._render_cilium(values) if release == "cilium"
                else self._render_cert_manager(values, ns))
        wanted = set()
        for obj in objs:
            m = obj.setdefault("metadata", {})
            m.setdefault("labels", {})["app.kubernetes.io/managed-by"] = "Helm"
            m.setdefault("annotations", {}).update({HELM_RELEASE: release, HELM_NAMESPACE: ns})
            self._apply(obj)
            wanted.add((obj["apiVersion"], obj["kind"], m.get("namespace") or "", m["name"]))
        for api, kind, namespace, name in self._rendered.get(release, set()) - wanted:
            with contextlib.suppress(KeyError):
                self._delete(api, kind, name, namespace or None)
        self._rendered[release] = wanted

    def _render_cilium(self, v: Obj) -> list[Obj]:
        kpr = str(v.get("kubeProxyReplacement", "false")).lower() == "true"
        domain = dig(v, "clustermesh.config.domain", "mesh.cilium.io")
        config = {
            "cluster-name": str(dig(v, "cluster.name", "default")),
            "cluster-id": str(dig(v, "cluster.id", 0)),
            "kube-proxy-replacement": "true" if kpr else "false",
            "k8s-service-host": str(v.get("k8sServiceHost") or ""),
            "k8s-service-port": str(v.get("k8sServicePort") or ""),
            "ipam": str(dig(v, "ipam.mode", "cluster-pool")),
            "enable-gateway-api": str(bool(dig(v, "gatewayAPI.enabled", False))).lower(),
            "enable-envoy-config": str(bool(dig(v, "envoy.enabled", True))).lower(),
            "enable-l7-proxy": str(bool(v.get("l7Proxy", True))).lower(),
            "enable-l2-announcements": str(bool(dig(v, "l2announcements.enabled"))).lower(),
            "enable-hubble": str(bool(dig(v, "hubble.enabled", True))).lower(),
            "enable-bpf-masquerade": str(bool(dig(v, "bpf.masquerade", False))).lower(),
        }
        checksum = _hash(config, 64)
        out: list[Obj] = [{"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": "cilium-config", "namespace": KS},
                           "data": config}]
        if dig(v, "tls.ca.cert"):
            out.append({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "cilium-ca", "namespace": KS},
                        "data": {"ca.crt": dig(v, "tls.ca.cert"),
                                 "ca.key": dig(v, "tls.ca.key", "")}})
        peers = dig(v, "clustermesh.config.clusters") or [] \
            if dig(v, "clustermesh.config.enabled") else []
        aliases = [{"ip": ip, "hostnames": [f"{p['name']}.{domain}"]}
                   for p in peers for ip in p.get("ips") or []]
        agent_tpl: Obj = {"hostNetwork": True, "tolerations": [{"operator": "Exists"}],
                          "containers": [{"name": "cilium-agent",
                                          "image": "quay.io/cilium/cilium:v"
                                                   + CHART_VERSIONS["cilium"],
                                          "ports": [{"name": "hubble-metrics",
                                                     "containerPort": 9965}]}]}
        if aliases:
            agent_tpl["hostAliases"] = aliases
        out.append(_daemonset("cilium", KS, {"k8s-app": "cilium",
                                             "app.kubernetes.io/name": "cilium-agent"},
                              "cilium-agent", spec=agent_tpl,
                              annotations={"cilium.io/cilium-configmap-checksum": checksum}
                              if v.get("rollOutCiliumPods") else None))
        if dig(v, "envoy.enabled", True):
            out.append(_daemonset("cilium-envoy", KS, {"k8s-app": "cilium-envoy",
                                                       "app.kubernetes.io/name": "cilium-envoy"},
                                  "cilium-envoy"))
        op_labels = {"io.cilium/app": "operator", "name": "cilium-operator",
                     "app.kubernetes.io/name": "cilium-operator"}
        out.append(_deployment(
            "cilium-operator", KS, op_labels, replicas=int(dig(v, "operator.replicas", 2)),
            containers=[{"name": "cilium-operator"}], max_unavailable="50%",
            annotations={"cilium.io/cilium-configmap-checksum": checksum}
            if dig(v, "operator.rollOutPods") else None,
            extra_spec={"hostNetwork": True, "tolerations": [{"operator": "Exists"}],
                        "affinity": {"podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [{
                                "labelSelector": {"matchLabels": {"io.cilium/app": "operator"}},
                                "topologyKey": "kubernetes.io/hostname"}]}}}))
        if dig(v, "hubble.enabled", True) and dig(v, "hubble.relay.enabled", False):
            out.append(_deployment("hubble-relay", KS, {"k8s-app": "hubble-relay",
                                                        "app.kubernetes.io/name": "hubble-relay"},
                                   containers=[{"name": "hubble-relay", "ports": [
                                       {"name": "grpc", "containerPort": 4245}]}]))
            out.append({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "hubble-relay", "namespace": KS,
                                     "labels": {"k8s-app": "hubble-relay"}},
                        "spec": {"type": "ClusterIP", "selector": {"k8s-app": "hubble-relay"},
                                 "ports": [{"protocol": "TCP", "port": 80,
                                            "targetPort": "grpc"}]}})
        if dig(v, "hubble.enabled", True) and dig(v, "hubble.ui.enabled", False):
            out.append(_deployment("hubble-ui", KS, {"k8s-app": "hubble-ui",
                                                     "app.kubernetes.io/name": "hubble-ui"},
                                   containers=[{"name": "frontend", "ports": [
                                       {"name": "http", "containerPort": 8081}]},
                                       {"name": "backend"}]))
            out.append({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "hubble-ui", "namespace": KS,
                                     "labels": {"k8s-app": "hubble-ui"}},
                        "spec": {"type": "ClusterIP", "selector": {"k8s-app": "hubble-ui"},
                                 "ports": [{"name": "http", "port": 80, "targetPort": 8081}]}})
        if dig(v, "clustermesh.useAPIServer", False):
            out.append(_deployment(
                "clustermesh-apiserver", KS,
                {"k8s-app": "clustermesh-apiserver",
                 "app.kubernetes.io/name": "clustermesh-apiserver"},
                containers=[{"name": "etcd", "ports": [{"name": "etcd",
                                                        "containerPort": 2379}]},
                            {"name": "apiserver"}]))
            stype = dig(v, "clustermesh.apiserver.service.type", "NodePort")
            port: Obj = {"name": "apiserv", "port": 2379, "targetPort": "etcd",
                         "protocol": "TCP"}
            if stype == "NodePort" and dig(v, "clustermesh.apiserver.service.nodePort"):
                port["nodePort"] = int(dig(v, "clustermesh.apiserver.service.nodePort"))
            out.append({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "clustermesh-apiserver", "namespace": KS,
                                     "labels": {"k8s-app": "clustermesh-apiserver"}},
                        "spec": {"type": stype, "ports": [port],
                                 "selector": {"k8s-app": "clustermesh-apiserver"}}})
        if dig(v, "clustermesh.config.enabled"):
            data = {}
            for p in peers:
                host = p.get("address") or f"{p['name']}.{domain}"
                data[p["name"]] = b64(yaml.safe_dump(
                    {"endpoints": [f"https://{host}:{p.get('port', 2379)}"],
                     "trusted-ca-file": "/var/lib/cilium/clustermesh/common-etcd-client-ca.crt"}))
            out.append({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "cilium-clustermesh", "namespace": KS},
                        "data": data})
        if dig(v, "gatewayAPI.enabled") and self._served(GATEWAY_API, "GatewayClass") \
                and dig(v, "gatewayAPI.gatewayClass.create", "auto") in ("auto", "true", True):
            out.append({"apiVersion": GATEWAY_API, "kind": "GatewayClass",
                        "metadata": {"name": "cilium"},
                        "spec": {"controllerName": GATEWAY_CONTROLLER,
                                 "description": "The default Cilium GatewayClass"}})
        return out

    def _render_cert_manager(self, v: Obj, ns: str) -> list[Obj]:
        if v.get("crds", {}).get("enabled") or v.get("installCRDs"):
            folder = upstream_dir() / "cert-manager-1.19.0" / "crds"
            if not self.emu.get("apiextensions.k8s.io/v1", "CustomResourceDefinition",
                                "certificates.cert-manager.io"):
                self._load_crds(str(folder.relative_to(upstream_dir())))
        out = []
        for name, component in (("cert-manager", "controller"),
                                ("cert-manager-cainjector", "cainjector"),
                                ("cert-manager-webhook", "webhook")):
            labels = {"app.kubernetes.io/name": name.replace("cert-manager-", "") if name !=
                      "cert-manager" else "cert-manager", "app.kubernetes.io/instance":
                      "cert-manager", "app.kubernetes.io/component": component}
            ports = [{"name": "https", "containerPort": 10250}] if component == "webhook" else []
            out.append(_deployment(name, ns, labels, containers=[
                {"name": f"cert-manager-{component}", "ports": ports}]))
        out.append({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "cert-manager-webhook", "namespace": ns},
                    "spec": {"type": "ClusterIP",
                             "selector": {"app.kubernetes.io/component": "webhook",
                                          "app.kubernetes.io/instance": "cert-manager"},
                             "ports": [{"name": "https", "port": 443, "targetPort": "https"}]}})
        if v.get("config"):
            out.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "cert-manager", "namespace": ns},
                        "data": {"config.yaml": yaml.safe_dump(v["config"])}})
        return out

    # -- read/write plumbing -----------------------------------------------------------------------
    #
    # Inside a reconcile pass, lists are snapshots taken once a kind, across namespaces, and
    # dropped when the simulator writes that kind; handlers in other threads (execs, the host
    # port) always read live.

    def _list(self, api: str, kind: str, namespace: str | None = None) -> list[Obj]:
        cache = getattr(self._tl, "cache", None)
        if cache is None:
            return self.emu.list(api, kind, namespace)
        key = (api, kind)
        if key not in cache:  # every namespace at once: one request a kind and pass
            cache[key] = self.emu.list(api, kind)
        return [o for o in cache[key]
                if namespace is None or o["metadata"].get("namespace") == namespace]

    def _dirty(self, api: str | None = None, kind: str | None = None) -> None:
        """Forget what this pass read of ``kind`` (everything when None): on a bare API server
        a write changes nothing of other kinds."""
        cache = getattr(self._tl, "cache", None)
        if cache is not None:
            if kind is None:
                cache.clear()
            else:
                cache.pop((api, kind), None)
        self.emu.forget_reads(api, kind)

    def _put(self, obj: Obj) -> Obj:
        self._dirty(obj.get("apiVersion"), obj.get("kind"))
        return self.emu.put(obj)

    def _delete(self, api: str, kind: str, name: str, namespace: str | None = None) -> bool:
        self._dirty(api, kind)
        return self.emu.delete(api, kind, name, namespace)

    def _patch_status(self, api: str, kind: str, name: str, namespace: str | None,
                      status: Obj) -> Obj:
        self._dirty(api, kind)
        return self.emu.patch_status(api, kind, name, namespace, status)

    def _load_crds(self, folder: str) -> None:
        self._dirty()
        load_upstream_crds(self.emu, folder)


    def _served(self, api: str, kind: str) -> bool:
        try:
            self.emu.resource_type(api, kind)
            return True
        except KeyError:
            return False

    def _apply(self, obj: Obj) -> bool:
        """Create or update a controller-owned object; True if it changed."""
        m = obj["metadata"]
        old = self.emu.get(obj["apiVersion"], obj["kind"], m["name"], m.get("namespace"))
        if old is not None:
            same = all(old.get(k) == v for k, v in obj.items() if k not in (
                "metadata", "status", "apiVersion", "kind"))
            om = old["metadata"]
            same = same and (om.get("labels") or {}) == (m.get("labels") or {}) and \
                (om.get("annotations") or {}) == (m.get("annotations") or {})
            if same:
                return False
            if "status" not in obj and "status" in old:
                obj = {**obj, "status": old["status"]}
        self._put(obj)
        return True

    def _status(self, obj: Obj, status: Obj) -> bool:
        """Merge ``status`` into an object's status; True if it changed."""
        m = obj["metadata"]
        current = self.emu.get(obj["apiVersion"], obj["kind"], m["name"], m.get("namespace"))
        if current is None:
            return False
        have = current.get("status") or {}
        merged = {**have, **status}
        if merged == have or _same_stored(have, merged):
            return False
        stored = self._patch_status(obj["apiVersion"], obj["kind"], m["name"],
                                    m.get("namespace"), status)
        # a real server normalises what it stores (drops empty lists, …): changed only if the
        # stored status moved
        return (stored.get("status") or {}) != have

    def _on_write(self, verb: str, obj: Obj) -> None:
        try:
            kind = obj.get("kind", "")
            m = meta(obj)
            if verb == "create":
                self.api_creates.append(f"{kind} {m.get('namespace', '')}/{m.get('name')}")
            release = (m.get("annotations") or {}).get(HELM_RELEASE)
            with self._lock:
                if release and (kind == "ServiceAccount" or verb == "delete"):
                    self._dirty_releases.add(release)
                if kind in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
                    self._policy_revision += 1
                self._wake.set()  # the controllers catch up on their own
        except Exception as exc:
            self.errors.append(exc)
            raise

    # -- the control loop --------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Run every controller until nothing changes (level-triggered, like the real ones)."""
        with self._lock:
            if self._kind is None:
                return
            outer = getattr(self._tl, "cache", None) is not None
            self._tl.cache = {}
            try:
                self._settle()
            finally:
                if not outer:
                    self._tl.cache = None

    def _settle(self) -> None:
        for _ in range(12):
            changed = False
            for release in sorted(self._dirty_releases):
                self._render_release(release)
            self._dirty_releases.clear()
            changed |= self._operator_crds()
            changed |= self._workloads()
            changed |= self._kubelet()
            changed |= self._agents()
            changed |= self._lb_ipam()
            changed |= self._gateways()
            changed |= self._cert_manager()
            changed |= self._policy_status()
            if not changed:
                return
        raise AssertionError(f"simulator {self.name}: controllers do not settle")

    # -- workload controllers ----------------------------------------------------------------------

    def _pods(self, namespace: str | None = None) -> list[Obj]:
        return self._list("v1", "Pod", namespace)

    def _owned(self, kind: str, obj: Obj, pods: list[Obj]) -> list[Obj]:
        tag = f"{kind}/{meta(obj)['name']}/{meta(obj)['uid']}"
        return [p for p in pods if (meta(p).get("annotations") or {}).get(OWNER) == tag
                and meta(p).get("namespace") == meta(obj).get("namespace")]

    def _new_pod(self, kind: str, owner: Obj, name: str, template: Obj, template_hash: str,
                 node: str | None = None) -> Obj:
        m = meta(owner)
        tmeta = template.get("metadata") or {}
        labels = dict(tmeta.get("labels") or {})
        labels["controller-revision-hash" if kind == "DaemonSet" else "pod-template-hash"] = \
            template_hash
        spec = copy.deepcopy(template.get("spec") or {})
        if node:
            spec["nodeName"] = node
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": m["namespace"], "labels": labels,
                             "annotations": {**(tmeta.get("annotations") or {}),
                                             OWNER: f"{kind}/{m['name']}/{m['uid']}"},
                             "ownerReferences": [{"apiVersion": "apps/v1",
                                                  "kind": "DaemonSet" if kind == "DaemonSet"
                                                  else "ReplicaSet",
                                                  "name": m["name"] if kind == "DaemonSet"
                                                  else f"{m['name']}-{template_hash}",
                                                  "uid": m["uid"], "controller": True}]},
                "spec": spec}

    def _suffix(self) -> str:
        return "".join(self._rng.choices("bcdfghjklmnpqrstvwxz2456789", k=5))

    def _workloads(self) -> bool:
        changed = False
        pods = self._pods()
        nodes = self._list("v1", "Node")
        owners = {f"{k}/{meta(o)['name']}/{meta(o)['uid']}"
                  for k, api in (("DaemonSet", "apps/v1"), ("Deployment", "apps/v1"))
                  for o in self._list(api, k)}
        for pod in pods:  # garbage collection of pods whose controller is gone
            owner = (meta(pod).get("annotations") or {}).get(OWNER)
            if owner and owner not in owners:
                self._delete("v1", "Pod", meta(pod)["name"], meta(pod)["namespace"])
                changed = True
        if changed:
            pods = self._pods()
        for ds in self._list("apps/v1", "DaemonSet"):
            tpl = ds["spec"].get("template") or {}
            h = _hash(tpl)
            mine = self._owned("DaemonSet", ds, pods)
            for pod in mine:
                if meta(pod)["labels"].get("controller-revision-hash") != h or \
                        pod["spec"].get("nodeName") not in {meta(n)["name"] for n in nodes}:
                    self._delete("v1", "Pod", meta(pod)["name"], meta(pod)["namespace"])
                    changed = True
            mine = [p for p in self._owned("DaemonSet", ds, self._pods(meta(ds)["namespace"]))]
            have = {p["spec"].get("nodeName") for p in mine}
            for node in nodes:
                if meta(node)["name"] not in have:
                    self._put(self._new_pod("DaemonSet", ds, f"{meta(ds)['name']}-"
                                               f"{self._suffix()}", tpl, h, meta(node)["name"]))
                    changed = True
            mine = self._owned("DaemonSet", ds, self._pods(meta(ds)["namespace"]))
            ready = sum(1 for p in mine if _pod_ready(p))
            changed |= self._status(ds, {
                "desiredNumberScheduled": len(nodes), "currentNumberScheduled": len(mine),
                "numberReady": ready, "updatedNumberScheduled": len(mine),
                "numberAvailable": ready, "numberUnavailable": len(nodes) - ready,
                "numberMisscheduled": 0, "observedGeneration": meta(ds)["generation"]})
        for dep in self._list("apps/v1", "Deployment"):
            tpl = dep["spec"].get("template") or {}
            h = _hash(tpl)
            want = int(dep["spec"].get("replicas", 1))
            mine = self._owned("Deployment", dep, pods)
            for pod in mine:
                if meta(pod)["labels"].get("pod-template-hash") != h:
                    self._delete("v1", "Pod", meta(pod)["name"], meta(pod)["namespace"])
                    changed = True
            mine = [p for p in self._owned("Deployment", dep, self._pods(meta(dep)["namespace"]))]
            for extra in mine[want:]:
                self._delete("v1", "Pod", meta(extra)["name"], meta(extra)["namespace"])
                changed = True
            for _ in range(want - len(mine)):
                self._put(self._new_pod("Deployment", dep, f"{meta(dep)['name']}-{h}-"
                                           f"{self._suffix()}", tpl, h))
                changed = True
            mine = self._owned("Deployment", dep, self._pods(meta(dep)["namespace"]))
            ready = sum(1 for p in mine if _pod_ready(p))
            unavailable = _max_unavailable(dep, want)
            old = (dep.get("status") or {}).get("conditions") or []
            available = ready >= want - unavailable
            changed |= self._status(dep, {
                "observedGeneration": meta(dep)["generation"], "replicas": len(mine),
                "updatedReplicas": len(mine), "readyReplicas": ready,
                "availableReplicas": ready, "unavailableReplicas": max(want - ready, 0),
                "conditions": [
                    condition("Available", available,
                              "MinimumReplicasAvailable" if available
                              else "MinimumReplicasUnavailable",
                              "Deployment has minimum availability." if available
                              else "Deployment does not have minimum availability.", old=old),
                    condition("Progressing", True, "NewReplicaSetAvailable",
                              f'ReplicaSet "{meta(dep)["name"]}-{h}" has successfully '
                              "progressed.", old=old)]})
        return changed

    # -- the kubelets and the scheduler ------------------------------------------------------------

    def _node_has_cni(self, node: str, pods: list[Obj]) -> bool:
        if any(_label(p, "app") == "kindnet" and p["spec"].get("nodeName") == node
               and _pod_ready(p) for p in pods):
            return True
        return any(_label(p, "k8s-app") == "cilium" and p["spec"].get("nodeName") == node
                   and _pod_ready(p) for p in pods)

    def _schedule(self, pod: Obj, nodes: list[Obj], pods: list[Obj]) -> str | None:
        spec = pod["spec"]
        tolerations = spec.get("tolerations") or []
        every = any(t.get("operator") == "Exists" and not t.get("key") for t in tolerations)
        keys = {t.get("key") for t in tolerations}
        candidates = []
        for node in nodes:
            name = meta(node)["name"]
            if not every:
                if not is_true(node, "Ready") and "node.kubernetes.io/not-ready" not in keys:
                    continue
                if any(t.get("effect") == "NoSchedule" and t.get("key") not in keys
                       for t in node["spec"].get("taints") or []):
                    continue
            anti = dig(spec, "affinity.podAntiAffinity", {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution") or []
            clash = False
            for term in anti:
                sel = term.get("labelSelector") or {}
                for other in pods:
                    if other is pod or other["spec"].get("nodeName") != name or \
                            meta(other).get("namespace") != meta(pod).get("namespace"):
                        continue
                    if all((meta(other).get("labels") or {}).get(k) == v
                           for k, v in (sel.get("matchLabels") or {}).items()):
                        clash = True
            if clash:
                continue
            load = sum(1 for p in pods if p["spec"].get("nodeName") == name)
            candidates.append((load, name))
        return min(candidates)[1] if candidates else None

    def _kubelet(self) -> bool:
        changed = False
        nodes = self._list("v1", "Node")
        by_name = {meta(n)["name"]: n for n in nodes}
        pods = self._pods()
        for pod in pods:
            m = meta(pod)
            if m.get("deletionTimestamp"):
                continue
            spec, status = pod["spec"], pod.get("status") or {}
            node_name = spec.get("nodeName")
            if not node_name:
                chosen = self._schedule(pod, nodes, pods)
                if chosen is None:
                    changed |= self._status(pod, {"phase": "Pending", "conditions": [condition(
                        "PodScheduled", False, "Unschedulable",
                        f"0/{len(nodes)} nodes are available",
                        old=status.get("conditions") or [])]})
                    continue
                full = self.emu.get("v1", "Pod", m["name"], m["namespace"]) or pod
                full["spec"]["nodeName"] = chosen
                self._put(full)
                pod["spec"]["nodeName"] = node_name = chosen
                changed = True
            node = by_name.get(node_name)
            if node is None:
                continue
            host_ip = _node_ip(node)
            if status.get("phase") == "Running":
                ready = self._container_ready(pod)
                if ready != _pod_ready(pod):
                    changed |= self._status(pod, _running_status(pod, status.get("podIP"),
                                                                  host_ip, ready))
                continue
            if not spec.get("hostNetwork") and not self._node_has_cni(node_name, pods):
                old = status.get("conditions") or []
                changed |= self._status(pod, {"phase": "Pending", "hostIP": host_ip,
                                              "conditions": [condition(
                                                  "PodScheduled", True, "", old=old),
                                                  condition("Ready", False, "ContainersNotReady",
                                                            "containers with unready status",
                                                            old=old)]})
                continue
            ip = host_ip if spec.get("hostNetwork") else self._pod_ip(node)
            changed |= self._status(pod, _running_status(pod, ip, host_ip,
                                                         self._container_ready(pod)))
            pods = self._pods()
        for node in nodes:
            name = meta(node)["name"]
            cni = self._node_has_cni(name, self._pods())
            if cni != is_true(node, "Ready"):
                old = node["status"].get("conditions") or []
                changed |= self._status(node, {"conditions": [condition(
                    "Ready", cni, "KubeletReady" if cni else "KubeletNotReady",
                    "kubelet is posting ready status" if cni else
                    "container runtime network not ready: cni plugin not initialized", old=old)]})
        return changed

    def _pod_ip(self, node: Obj) -> str:
        net = ipaddress.ip_network(node["spec"]["podCIDR"])
        ipam = (self._config() or {}).get("ipam", "kubernetes")
        if ipam == "cluster-pool":  # the chart's default: 10.0.0.0/8 in every cluster
            net = ipaddress.ip_network(f"10.0.{list(self._node_names()).index(meta(node)['name'])}"
                                       ".0/24")
        n = self._ip_next.get(str(net), 10)
        self._ip_next[str(net)] = n + 1
        return str(net.network_address + n)

    def _node_names(self) -> list[str]:
        return [meta(n)["name"] for n in self._list("v1", "Node")]

    def _config(self) -> dict[str, str] | None:
        cm = self.emu.get("v1", "ConfigMap", "cilium-config", KS)
        return (cm or {}).get("data")

    def _container_ready(self, pod: Obj) -> bool:
        if _label(pod, "k8s-app") == "cilium":
            return self.agent_health()[0]
        return True

    # -- Cilium: operator and agents ---------------------------------------------------------------

    def operator_running(self) -> bool:
        return any(_label(p, "io.cilium/app") == "operator" and _pod_ready(p)
                   for p in self._pods(KS))

    def _operator_crds(self) -> bool:
        changed = False
        for pod in self._pods(KS):
            if _label(pod, "io.cilium/app") == "operator" and _pod_ready(pod):
                uid = meta(pod)["uid"]
                if uid not in self._operator_started:  # what the operator saw when it started
                    self._operator_started[uid] = all(
                        self.emu.get("apiextensions.k8s.io/v1", "CustomResourceDefinition",
                                     f"{p}.gateway.networking.k8s.io") for p in GATEWAY_API_CRDS)
                if not self._served(CILIUM, "CiliumNode"):
                    self._load_crds("cilium-1.18.4/crds")
                    changed = True
        return changed

    def gateway_controller_on(self) -> bool:
        cfg = self._config() or {}
        live = {meta(p)["uid"] for p in self._pods(KS)
                if _label(p, "io.cilium/app") == "operator" and _pod_ready(p)}
        return cfg.get("enable-gateway-api") == "true" and cfg.get(
            "kube-proxy-replacement") == "true" and any(
            self._operator_started.get(uid) for uid in live)

    def kpr(self) -> bool:
        """Services are translated: Cilium's kube-proxy replacement, or a kube-proxy."""
        cfg = self._config() or {}
        return (cfg.get("kube-proxy-replacement") == "true" and self.agent_health()[0]) or \
            self.emu.get("apps/v1", "DaemonSet", "kube-proxy", KS) is not None

    def agent_health(self) -> tuple[bool, str]:
        cfg = self._config()
        if cfg is None:
            return False, "no cilium-config"
        host = cfg.get("k8s-service-host")
        if not host and self.emu.get("apps/v1", "DaemonSet", "kube-proxy", KS) is None:
            return False, ("Unable to contact k8s api-server: 10.96.0.1:443: i/o timeout "
                           "(no kube-proxy: set k8sServiceHost)")
        if host and host not in self._node_names() and host not in {
                _node_ip(n) for n in self._list("v1", "Node")}:
            return False, f"Unable to contact k8s api-server: lookup {host}: no such host"
        if not self._served(CILIUM, "CiliumNode"):
            return False, "waiting for the CRDs the operator installs"
        return True, "Ok"

    def _agents(self) -> bool:
        changed = False
        if not self._served(CILIUM, "CiliumNode"):
            return False
        for pod in self._pods(KS):
            if _label(pod, "k8s-app") != "cilium" or not _pod_ready(pod):
                continue
            node = self.emu.get("v1", "Node", pod["spec"]["nodeName"])
            if node is None or self.emu.get(CILIUM, "CiliumNode", meta(node)["name"]):
                continue
            self._put({"apiVersion": CILIUM, "kind": "CiliumNode",
                          "metadata": {"name": meta(node)["name"]},
                          "spec": {"addresses": [{"type": "InternalIP", "ip": _node_ip(node)}],
                                   "ipam": {"podCIDRs": [node["spec"]["podCIDR"]]}}})
            changed = True
        return changed

    def _lb_ipam(self) -> bool:
        if not self.operator_running() or not self._served(CILIUM, "CiliumLoadBalancerIPPool"):
            return False
        changed = False
        pools = [p for p in self._list(CILIUM, "CiliumLoadBalancerIPPool")
                 if not p["spec"].get("disabled")]
        services = self._list("v1", "Service")
        used = {i.get("ip") for s in services
                for i in dig(s, "status.loadBalancer.ingress", []) or []}
        for svc in services:
            if svc["spec"].get("type") != "LoadBalancer" or svc["spec"].get("loadBalancerClass"):
                continue
            have = [i.get("ip") for i in dig(svc, "status.loadBalancer.ingress", []) or []]
            if have and any(_in_pools(ip, pools) for ip in have):
                continue
            ip = None
            for pool in pools:
                if pool["spec"].get("serviceSelector") and not _labels_match(
                        pool["spec"]["serviceSelector"], meta(svc).get("labels") or {}):
                    continue
                for block in pool["spec"].get("blocks") or []:
                    net = ipaddress.ip_network(block["cidr"], strict=False)
                    for host in net.hosts():
                        if str(host) not in used:
                            ip = str(host)
                            break
                    if ip:
                        break
                if ip:
                    break
            if ip is None:
                continue
            used.add(ip)
            old = (svc.get("status") or {}).get("conditions") or []
            changed |= self._status(svc, {"loadBalancer": {"ingress": [{"ip": ip}]},
                                          "conditions": [condition(
                                              "cilium.io/IPAMRequestSatisfied", True,
                                              "satisfied", old=old)]})
        for pool in pools:
            old = (pool.get("status") or {}).get("conditions") or []
            changed |= self._status(pool, {"conditions": [condition(
                "cilium.io/PoolConflict", False, "resolved", old=old)]})
        return changed

    # -- Cilium: the Gateway API controller --------------------------------------------------------

    def _gateways(self) -> bool:
        if not self._served(GATEWAY_API, "Gateway") or not self.gateway_controller_on():
            return False
        changed = False
        classes = {}
        for gc in self._list(GATEWAY_API, "GatewayClass"):
            if gc["spec"].get("controllerName") != GATEWAY_CONTROLLER:
                continue
            old = (gc.get("status") or {}).get("conditions") or []
            changed |= self._status(gc, {"conditions": [condition(
                "Accepted", True, "Accepted", "Valid GatewayClass",
                meta(gc)["generation"], old=old)]})
            classes[meta(gc)["name"]] = gc
        namespaces = {meta(n)["name"]: n for n in self._list("v1", "Namespace")}
        routes = self._list(GATEWAY_API, "HTTPRoute")
        route_parents: dict[tuple[str, str], list[Obj]] = {}
        for gw in self._list(GATEWAY_API, "Gateway"):
            if gw["spec"].get("gatewayClassName") not in classes:
                continue
            if meta(namespaces.get(meta(gw)["namespace"])).get("deletionTimestamp"):
                continue  # nothing can be created there any more (another test's leftover)
            gm = meta(gw)
            ns, name, gen = gm["namespace"], gm["name"], gm["generation"]
            listeners = gw["spec"].get("listeners") or []
            svc_name = f"cilium-gateway-{name}"
            ports = sorted({int(lst["port"]) for lst in listeners})
            current = self.emu.get("v1", "Service", svc_name, ns)
            if self._ensure_gateway_service(current, name, ns, gm["uid"], ports):
                self._lb_ipam()
                changed = True
            current = self.emu.get("v1", "Service", svc_name, ns)
            ips = [i.get("ip") for i in dig(current, "status.loadBalancer.ingress", []) or []]
            programmed = bool(ips)
            attached: dict[str, int] = {}
            for route in routes:
                rm = meta(route)
                for ref in route["spec"].get("parentRefs") or []:
                    if ref.get("name") != name or ref.get("namespace", rm["namespace"]) != ns \
                            or ref.get("kind", "Gateway") != "Gateway":
                        continue
                    ok_listeners = [lst for lst in listeners
                                    if (not ref.get("sectionName")
                                        or ref["sectionName"] == lst["name"])
                                    and _route_allowed(lst, rm["namespace"], ns, namespaces)
                                    and _hosts_intersect(lst.get("hostname"),
                                                         route["spec"].get("hostnames"))]
                    for lst in ok_listeners:
                        attached[lst["name"]] = attached.get(lst["name"], 0) + 1
                    resolved, why = self._backends_resolve(route)
                    rgen = rm["generation"]
                    old = next((p.get("conditions") or [] for p in dig(
                        route, "status.parents", []) or [] if p.get("parentRef") == ref), [])
                    route_parents.setdefault((rm["namespace"], rm["name"]), []).append({
                        "parentRef": ref, "controllerName": GATEWAY_CONTROLLER,
                        "conditions": [
                            condition("Accepted", bool(ok_listeners),
                                      "Accepted" if ok_listeners else "NotAllowedByListeners",
                                      "Accepted HTTPRoute" if ok_listeners else
                                      "no listener of the Gateway admits this route", rgen,
                                      old),
                            condition("ResolvedRefs", resolved,
                                      "ResolvedRefs" if resolved else "BackendNotFound", why,
                                      rgen, old)]})
            old_status = gw.get("status") or {}
            old_listeners = {s.get("name"): s.get("conditions") or []
                             for s in old_status.get("listeners") or []}
            status_listeners = []
            for lst in listeners:
                refs_ok, why = self._listener_refs(lst, ns)
                old = old_listeners.get(lst["name"], [])
                status_listeners.append({
                    "name": lst["name"], "attachedRoutes": attached.get(lst["name"], 0),
                    "supportedKinds": [{"group": "gateway.networking.k8s.io",
                                        "kind": "HTTPRoute"}],
                    "conditions": [
                        condition("Accepted", True, "Accepted", "Listener Accepted", gen, old),
                        condition("Programmed", programmed, "Programmed" if programmed
                                  else "Pending", "", gen, old),
                        condition("ResolvedRefs", refs_ok, "ResolvedRefs" if refs_ok
                                  else "InvalidCertificateRef", why, gen, old)]})
            old = old_status.get("conditions") or []
            changed |= self._status(gw, {
                "addresses": [{"type": "IPAddress", "value": ip} for ip in ips],
                "conditions": [
                    condition("Accepted", True, "Accepted", "Gateway successfully scheduled",
                              gen, old),
                    condition("Programmed", programmed,
                              "Programmed" if programmed else "AddressNotAssigned",
                              "Gateway successfully reconciled" if programmed else
                              "No address assigned to the Gateway's Service", gen, old)],
                "listeners": status_listeners})
        for route in routes:
            parents = route_parents.get((meta(route)["namespace"], meta(route)["name"]))
            if parents is not None:
                changed |= self._status(route, {"parents": parents})
        return changed

    def _ensure_gateway_service(self, current: Obj | None, gateway: str, ns: str, uid: str,
                                ports: list[int]) -> bool:
        """Cilium 1.18's ``ensureService``: ``controllerutil.CreateOrPatch`` with
        ``svc.Spec = desired.Spec`` (ports ``port-<n>``, no nodePort, no clusterIP), owner and
        labels set, sent as a JSON merge patch of the difference — on every reconcile. What
        survives of the allocated clusterIP and nodePorts is up to the API server. True if the
        stored Service changed."""
        labels = {"io.cilium.gateway/owning-gateway": gateway,
                  "gateway.networking.k8s.io/gateway-name": gateway}
        owner = [{"apiVersion": GATEWAY_API, "kind": "Gateway", "name": gateway, "uid": uid,
                  "controller": True}]
        spec = {"type": "LoadBalancer",
                "ports": [{"name": f"port-{p}", "port": p, "protocol": "TCP", "targetPort": 0}
                          for p in ports]}
        name = f"cilium-gateway-{gateway}"
        self._dirty("v1", "Service")
        if current is None:
            self.emu.upstream.create({"apiVersion": "v1", "kind": "Service",
                                      "metadata": {"name": name, "namespace": ns,
                                                   "labels": labels, "ownerReferences": owner},
                                      "spec": spec})
            return True
        after = copy.deepcopy(current)
        after["spec"] = spec
        after["metadata"]["ownerReferences"] = owner
        after["metadata"]["labels"] = {**(current["metadata"].get("labels") or {}), **labels}
        patch = merge_diff(current, after)
        if not patch:
            return False
        stored = self.emu.upstream.merge_patch("v1", "Service", name, ns, patch)
        return bool(stored["metadata"]["resourceVersion"] !=
                    current["metadata"]["resourceVersion"])

    def _listener_refs(self, lst: Obj, ns: str) -> tuple[bool, str]:
        if lst.get("protocol") != "HTTPS":
            return True, ""
        refs = dig(lst, "tls.certificateRefs", []) or []
        if not refs:
            return False, "no certificateRefs"
        for ref in refs:
            secret = self.emu.get("v1", "Secret", ref.get("name", ""),
                                  ref.get("namespace") or ns)
            if secret is None:
                return False, f"Secret {ns}/{ref.get('name')} does not exist"
            if load_pair(secret) is None:
                return False, f"Secret {ns}/{ref.get('name')} holds no valid TLS key pair"
        return True, ""

    def _backends_resolve(self, route: Obj) -> tuple[bool, str]:
        ns = meta(route)["namespace"]
        for rule in route["spec"].get("rules") or []:
            for ref in rule.get("backendRefs") or []:
                svc = self.emu.get("v1", "Service", ref.get("name", ""),
                                   ref.get("namespace") or ns)
                if svc is None:
                    return False, f"Service {ns}/{ref.get('name')} not found"
                if not any(p.get("port") == ref.get("port") for p in svc["spec"].get("ports")
                           or []):
                    return False, f"Service {ns}/{ref.get('name')} has no port {ref.get('port')}"
        return True, "Resolved all the Object references for the Route"

    def _policy_status(self) -> bool:
        if not self.operator_running() or not self._served(CILIUM, "CiliumNetworkPolicy"):
            return False
        changed = False
        for kind in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
            for pol in self._list(CILIUM, kind):
                specs = PolicyModel._specs(pol)
                ok = bool(specs) and all("endpointSelector" in s or "nodeSelector" in s
                                         for s in specs)
                old = (pol.get("status") or {}).get("conditions") or []
                changed |= self._status(pol, {"conditions": [condition(
                    "Valid", ok, "" if ok else "InvalidPolicy",
                    "Policy validation succeeded" if ok else "no endpointSelector", old=old)]})
        return changed

    # -- cert-manager ------------------------------------------------------------------------------

    def cert_manager_ready(self) -> bool:
        dep = self.emu.get("apps/v1", "Deployment", "cert-manager", "cert-manager")
        return dep is not None and is_true(dep, "Available") and self._served(CM_API,
                                                                              "Certificate")

    def _cert_manager(self) -> bool:
        if not self.cert_manager_ready():
            return False
        controller = next((p for p in self._pods("cert-manager") if _label(
            p, "app.kubernetes.io/component") == "controller" and _pod_ready(p)), None)
        if controller is None:
            return False
        api = self.kube_apiserver_ident(controller["spec"]["nodeName"])
        if not self.allowed(self.pod_ident(controller), api, 6443, "TCP").allowed:
            return False  # it cannot talk to the kube-apiserver: nothing gets issued
        changed = False
        for kind in ("ClusterIssuer", "Issuer"):
            for issuer in self._list(CM_API, kind):
                ok, reason, message = self._issuer_ready(issuer)
                old = (issuer.get("status") or {}).get("conditions") or []
                changed |= self._status(issuer, {"conditions": [condition(
                    "Ready", ok, reason, message, meta(issuer).get("generation"), old)]})
        for cert in self._list(CM_API, "Certificate"):
            changed |= self._issue(cert)
        return changed

    def _issuer(self, cert: Obj) -> Obj | None:
        ref = cert["spec"].get("issuerRef") or {}
        if ref.get("kind", "Issuer") == "ClusterIssuer":
            return self.emu.get(CM_API, "ClusterIssuer", ref.get("name", ""))
        return self.emu.get(CM_API, "Issuer", ref.get("name", ""), meta(cert)["namespace"])

    def _issuer_ca(self, issuer: Obj) -> Obj | None:
        name = dig(issuer, "spec.ca.secretName")
        ns = "cert-manager" if issuer["kind"] == "ClusterIssuer" else meta(issuer)["namespace"]
        return self.emu.get("v1", "Secret", name, ns) if name else None

    def _issuer_ready(self, issuer: Obj) -> tuple[bool, str, str]:
        spec = issuer.get("spec") or {}
        if "selfSigned" in spec:
            return True, "IsReady", ""
        if "ca" in spec:
            pair = load_pair(self._issuer_ca(issuer))
            if pair is None:
                return False, "ErrGetKeyPair", (f"Error getting keypair for CA issuer: secret "
                                                f"\"{dig(spec, 'ca.secretName')}\" not found or "
                                                "not a key pair")
            if not is_ca(pair[0]):
                return False, "ErrInvalidKeyPair", "the secret's certificate is not a CA"
            return True, "KeyPairVerified", "Signing CA verified"
        return False, "ErrInitIssuer", "issuer type not supported by the simulator"

    def _issue(self, cert: Obj) -> bool:
        m, spec = meta(cert), cert["spec"]
        gen = m["generation"]
        issuer = self._issuer(cert)
        old = (cert.get("status") or {}).get("conditions") or []
        if issuer is None or not is_true(issuer, "Ready"):
            return self._status(cert, {"conditions": [condition(
                "Ready", False, "IssuerNotReady", "Issuer not ready", gen, old)]})
        secret = self.emu.get("v1", "Secret", spec["secretName"], m["namespace"])
        pair = load_pair(secret)
        ca_secret = self._issuer_ca(issuer) if "ca" in issuer["spec"] else None
        ca_pair = load_pair(ca_secret)
        ann = meta(secret).get("annotations") or {}
        fresh = (pair is not None and ann.get("cert-manager.io/alt-names") == ",".join(
            spec.get("dnsNames") or []) and ann.get("cert-manager.io/issuer-name") == meta(
            issuer)["name"] and bool(spec.get("isCA")) == is_ca(pair[0])
            and (ca_pair is None or pair[0].issuer == ca_pair[0].subject))
        if not fresh:
            reuse = pair[1] if pair and dig(spec, "privateKey.rotationPolicy") == "Never" \
                else None
            crt, key = issue_certificate(spec, ca_pair[0] if ca_pair else None,
                                         ca_pair[1] if ca_pair else None, reuse)
            ca_crt = unb64(ca_secret["data"]["tls.crt"]) if ca_secret else crt
            self._apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                         "metadata": {"name": spec["secretName"], "namespace": m["namespace"],
                                      "labels": {"controller.cert-manager.io/fao": "true"},
                                      "annotations": {
                                          "cert-manager.io/certificate-name": m["name"],
                                          "cert-manager.io/common-name": spec.get(
                                              "commonName", ""),
                                          "cert-manager.io/alt-names": ",".join(
                                              spec.get("dnsNames") or []),
                                          "cert-manager.io/issuer-name": meta(issuer)["name"],
                                          "cert-manager.io/issuer-kind": issuer["kind"],
                                          "cert-manager.io/issuer-group": "cert-manager.io"}},
                         "data": {"tls.crt": b64(crt), "tls.key": b64(key),
                                  "ca.crt": b64(ca_crt)}})
            pair = load_pair(self.emu.get("v1", "Secret", spec["secretName"], m["namespace"]))
        assert pair is not None
        c = pair[0]
        return self._status(cert, {
            "conditions": [condition("Ready", True, "Ready", "Certificate is up to date and "
                                     "has not expired", gen, old)],
            "notBefore": c.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "notAfter": c.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "revision": int((cert.get("status") or {}).get("revision") or 0) + (
                0 if fresh else 1)}) or not fresh

    def _admission(self, method: str, path: str) -> ApiError | None:
        """cert-manager's validating webhook: called by the kube-apiserver for cert-manager.io."""
        if "/apis/cert-manager.io/" not in path or not self._served(CM_API, "Certificate"):
            return None
        if self.release("cert-manager", "cert-manager") is None:
            return None  # no webhook registered
        with self.emu.cached_reads():  # one call reads each object once, as one snapshot
            cause = self.webhook_unreachable()
        if cause is None:
            return None
        return ApiError(500, "InternalError", 'Internal error occurred: failed calling webhook '
                        '"webhook.cert-manager.io": failed to call webhook: Post "https://'
                        'cert-manager-webhook.cert-manager.svc:443/validate?timeout=30s": '
                        + cause)

    def webhook_unreachable(self) -> str | None:
        pods = [p for p in self._pods("cert-manager")
                if _label(p, "app.kubernetes.io/component") == "webhook" and _pod_ready(p)]
        if not pods or not self.kpr():
            return "dial tcp: connect: connection refused"
        pod = pods[0]
        api = self.kube_apiserver_ident(pod["spec"]["nodeName"])
        if not self.allowed(api, self.pod_ident(pod), 10250, "TCP").allowed:
            return "context deadline exceeded"
        return None

    # -- identities and the datapath ---------------------------------------------------------------

    def policies(self) -> PolicyModel:
        if not self._served(CILIUM, "CiliumNetworkPolicy"):
            return PolicyModel([])
        return PolicyModel([*self._list(CILIUM, "CiliumNetworkPolicy"),
                            *self._list(CILIUM, "CiliumClusterwideNetworkPolicy")])

    def pod_ident(self, pod: Obj, viewer: str | None = None) -> Ident:
        """A pod as the datapath of cluster ``viewer`` (default: its own) sees it."""
        m = meta(pod)
        viewer = viewer or self.name
        if pod["spec"].get("hostNetwork"):
            return self.node_ident(pod["spec"].get("nodeName", ""), viewer, None)
        ns = self.emu.get("v1", "Namespace", m["namespace"])
        labels = [("k8s", k, str(v)) for k, v in (m.get("labels") or {}).items()]
        labels += [("k8s", NS_LABEL, m["namespace"]),
                   ("k8s", CLUSTER_LABEL, self.cluster_name())]
        labels += [("k8s", f"io.cilium.k8s.namespace.labels.{k}", str(v))
                   for k, v in (meta(ns).get("labels") or {}).items()]
        named = tuple((p["name"], int(p["containerPort"])) for c in pod["spec"].get(
            "containers") or [] for p in c.get("ports") or [] if p.get("name"))
        return Ident(tuple(labels), frozenset({"cluster"} if viewer == self.name else set()),
                     str((pod.get("status") or {}).get("podIP") or ""), m["namespace"],
                     endpoint=viewer == self.name, named_ports=named,
                     what=f"{m['namespace']}/{m['name']}")

    def node_ident(self, node: str, viewer: str, viewer_node: str | None) -> Ident:
        ip = next((_node_ip(n) for n in self._list("v1", "Node") if meta(n)["name"] == node),
                  "")
        if viewer != self.name:
            return Ident((("reserved", "world", ""),), frozenset({"world"}), ip, what=node)
        if viewer_node == node:
            return Ident((("reserved", "host", ""),), frozenset({"host", "cluster"}), ip,
                         what=node)
        return Ident((("reserved", "remote-node", ""),), frozenset({"remote-node", "cluster"}),
                     ip, what=node)

    def kube_apiserver_ident(self, viewer_node: str) -> Ident:
        cp = next((n["name"] for n in self.kind_nodes() if n["role"] == "control-plane"), "")
        where = "host" if cp == viewer_node else "remote-node"
        return Ident((("reserved", "kube-apiserver", ""), ("reserved", where, "")),
                     frozenset({"kube-apiserver", where, "cluster"}), what="kube-apiserver")

    @staticmethod
    def envoy_ident() -> Ident:
        return Ident((("reserved", "ingress", ""),), frozenset({"ingress", "cluster"}),
                     endpoint=True, what="gateway (reserved:ingress)")

    @staticmethod
    def world_ident(ip: str) -> Ident:
        return Ident((("reserved", "world", ""),), frozenset({"world"}), ip, what=ip)

    def allowed(self, src: Ident, dst: Ident, port: int, proto: str,
                dst_cluster: SimCluster | None = None) -> Verdict:
        """Both ends' policies: egress where the source is an endpoint of this cluster, ingress
        where the destination is one (of ``dst_cluster``, default this one)."""
        dst_cluster = dst_cluster or self
        if src.endpoint:
            ok, why = self.policies().decide(src, dst, "egress", port, proto,
                                             dict(dst.named_ports))
            if not ok:
                return Verdict(False, "EGRESS", why)
        if dst.endpoint:
            ok, why = dst_cluster.policies().decide(dst, src, "ingress", port, proto,
                                                    dict(dst.named_ports))
            if not ok:
                return Verdict(False, "INGRESS", why)
        return Verdict(True)

    def cluster_name(self) -> str:
        return (self._config() or {}).get("cluster-name", "default")

    def ready_pods(self, namespace: str, selector: dict[str, str]) -> list[Obj]:
        return [p for p in self._pods(namespace) if _pod_ready(p) and all(
            (meta(p).get("labels") or {}).get(k) == v for k, v in selector.items())]

    def backends(self, svc: Obj, port: int, proto: str = "TCP") -> list[tuple[Obj, int]]:
        """(pod, target port) behind a Service port, if Services are translated at all."""
        if not self.kpr() or not svc["spec"].get("selector"):
            return []
        sp = next((p for p in svc["spec"].get("ports") or []
                   if int(p["port"]) == port and p.get("protocol", "TCP") == proto), None)
        if sp is None:
            return []
        out = []
        for pod in self.ready_pods(meta(svc)["namespace"], svc["spec"]["selector"]):
            target = sp.get("targetPort", sp["port"])
            if isinstance(target, str) and not target.isdigit():
                found = [int(p["containerPort"]) for c in pod["spec"].get("containers") or []
                         for p in c.get("ports") or [] if p.get("name") == target]
                if not found:
                    continue
                target = found[0]
            out.append((pod, int(target)))
        return out

    def drop(self, node: str, src: Ident, dst: Ident, port: int, proto: str,
             direction: str) -> None:
        """Record what Hubble shows for a policy drop."""
        def side(i: Ident) -> Obj:
            ns, _, pod = i.what.partition("/")
            out: Obj = {"identity": int(_hash(i.labels, 4), 16) + 256,
                        "labels": [f"{s}:{k}={v}" if v else f"{s}:{k}" for s, k, v in i.labels]}
            if pod:
                out.update(namespace=ns, pod_name=pod)
            return out

        with self._lock:
            self._flows.append(Flow(time.time(), node, side(src), side(dst), src.ip, dst.ip,
                                    port, proto, direction))

    # -- execs -------------------------------------------------------------------------------------

    def _on_exec(self, ns: str, pod_name: str, container: str, cmd: list[str]
                 ) -> tuple[int, str, str]:
        try:
            # One exec reads each object once, as one snapshot (an agent answers from its own
            # view of the cluster too); the next exec reads live again.
            with self.emu.cached_reads():
                return self._exec(ns, pod_name, container, cmd)
        except Exception as exc:
            self.errors.append(exc)
            raise

    def _exec(self, ns: str, pod_name: str, container: str, cmd: list[str]
              ) -> tuple[int, str, str]:
        pod = self.emu.get("v1", "Pod", pod_name, ns)
        if pod is None or (pod.get("status") or {}).get("phase") != "Running":
            return 1, "", f'container "{container}" is not running'
        if _label(pod, "k8s-app") == "cilium" and container == "cilium-agent":
            return self._agent_exec(pod, cmd)
        if cmd[:2] == ["/agnhost", "connect"]:
            return self._connect(pod, cmd[2:])
        if cmd and cmd[0] == "nslookup":
            return self._nslookup(pod, cmd[1:])
        if cmd and cmd[0] == "curl":
            return self._curl(pod, cmd[1:])
        return 126, "", ("OCI runtime exec failed: exec failed: unable to start container "
                         f'process: exec: "{cmd[0] if cmd else ""}": executable file not '
                         "found in $PATH: unknown")

    def _agent_exec(self, pod: Obj, cmd: list[str]) -> tuple[int, str, str]:
        ok, why = self.agent_health()
        if cmd[:2] == ["cilium-dbg", "status"]:
            return 0, json.dumps(self._agent_status(pod, ok, why)), ""
        if not ok:
            return 1, "", f"Error: cannot reach the agent: {why}"
        if cmd[:3] == ["cilium-dbg", "policy", "get"]:
            return 0, json.dumps(self._policy_repository()), ""
        if cmd[:3] == ["cilium-dbg", "endpoint", "list"]:
            return 0, json.dumps(self._endpoints(pod["spec"]["nodeName"])), ""
        if cmd[:2] == ["hubble", "status"]:
            return self._hubble_status(pod, _flags(cmd[2:]))
        if cmd[:2] == ["hubble", "observe"]:
            return self._hubble_observe(pod, _flags(cmd[2:]))
        return 1, "", f"Error: unknown command {' '.join(cmd)!r}"

    def _agent_status(self, pod: Obj, ok: bool, why: str) -> Obj:
        out: Obj = {"cilium": {"state": "Ok" if ok else "Failure", "msg": why},
                    "kubernetes": {"state": "Ok" if ok else "Failure"},
                    "kube-proxy-replacement": {"mode": "True" if (self._config() or {}).get(
                        "kube-proxy-replacement") == "true" else "False"},
                    "cluster": {"ciliumHealth": {"state": "Ok"}}}
        secret = self.emu.get("v1", "Secret", "cilium-clustermesh", KS)
        if secret is not None:
            out["cluster-mesh"] = {"clusters": [self.remote_status(pod, peer, unb64(text))
                                                for peer, text in sorted(
                                                    (secret.get("data") or {}).items())]}
        return out

    def remote_status(self, agent: Obj, peer: str, config: bytes) -> Obj:
        """How this agent's connection to a remote cluster's clustermesh-apiserver fares."""
        ok, status = self._connect_remote(agent, peer, config)
        remote = self.mesh.clusters.get(peer)
        out: Obj = {"name": peer, "ready": ok, "connected": ok, "status": status,
                    "num-failures": 0 if ok else 1, "last-failure": "" if ok else now_iso()}
        if ok and remote is not None:
            out.update({"num-nodes": len(remote.kind_nodes()),
                        "num-endpoints": len([p for p in remote._pods() if _pod_ready(p)]),
                        "num-shared-services": len(remote.global_services()),
                        "synced": {"nodes": True, "endpoints": True, "identities": True,
                                   "services": True}})
        return out

    def _connect_remote(self, agent: Obj, peer: str, config: bytes) -> tuple[bool, str]:
        mine = self._config() or {}
        if int(mine.get("cluster-id") or 0) == 0:
            return False, "the local cluster has no cluster id"
        endpoint = (yaml.safe_load(config) or {}).get("endpoints") or []
        if not endpoint:
            return False, "no etcd endpoint configured"
        url = urlsplit(endpoint[0])
        host, port = url.hostname or "", int(url.port or 2379)
        aliases = {h: a["ip"] for a in agent["spec"].get("hostAliases") or []
                   for h in a.get("hostnames") or []}
        ip = aliases.get(host, host)
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            return False, f"dial tcp: lookup {host}: no such host"
        remote = self.mesh.by_node_ip(ip)
        if remote is None:
            return False, f"dial tcp {ip}:{port}: i/o timeout (no node there)"
        svc = next((s for s in remote.emu.list("v1", "Service")
                    if any(p.get("nodePort") == port for p in s["spec"].get("ports") or [])),
                   None)
        if svc is None or not remote.kpr():
            return False, f"dial tcp {ip}:{port}: connect: connection refused"
        sp = next(p for p in svc["spec"]["ports"] if p.get("nodePort") == port)
        backends = remote.backends(svc, int(sp["port"]), sp.get("protocol", "TCP"))
        if not backends:
            return False, f"dial tcp {ip}:{port}: connect: connection refused (no endpoints)"
        backend, target = backends[0]
        if _label(backend, "k8s-app") != "clustermesh-apiserver":
            return False, (f"{ip}:{port} is {meta(svc)['namespace']}/{meta(svc)['name']} of "
                           f"{remote.name}, not its clustermesh-apiserver")
        src = self.node_ident(agent["spec"]["nodeName"], remote.name, None)
        verdict = remote.allowed(src, remote.pod_ident(backend), target, "TCP")
        if not verdict.allowed:
            remote.drop(backend["spec"]["nodeName"], src, remote.pod_ident(backend), target,
                        "TCP", verdict.direction)
            return False, f"dial tcp {ip}:{port}: i/o timeout ({verdict.why} in {remote.name})"
        my_ca = ((self.emu.get("v1", "Secret", "cilium-ca", KS) or {}).get("data") or {}).get(
            "ca.crt")
        their_ca = ((remote.emu.get("v1", "Secret", "cilium-ca", KS) or {}).get("data")
                    or {}).get("ca.crt")
        if not my_ca or my_ca != their_ca:
            return False, ("remote: tls: failed to verify certificate: x509: certificate signed "
                           "by unknown authority")
        theirs = remote._config() or {}
        if theirs.get("cluster-name") != peer:
            return False, (f"remote cluster configuration mismatch: name "
                           f"{theirs.get('cluster-name')!r}, expected {peer!r}")
        if theirs.get("cluster-id") in ("0", mine.get("cluster-id")):
            return False, f"remote cluster id {theirs.get('cluster-id')} is 0 or ours"
        if self._pod_networks() & remote._pod_networks():
            return False, "remote cluster's pod CIDRs overlap ours"
        return True, "ready"

    def _pod_networks(self) -> set[str]:
        return {str(ipaddress.ip_network(p["status"]["podIP"]).supernet(new_prefix=24))
                for p in self._pods() if (p.get("status") or {}).get("podIP")
                and not p["spec"].get("hostNetwork")}

    def global_services(self) -> list[Obj]:
        return [s for s in self._list("v1", "Service")
                if (meta(s).get("annotations") or {}).get("service.cilium.io/global") == "true"
                and (meta(s).get("annotations") or {}).get("service.cilium.io/shared",
                                                           "true") != "false"]

    def _policy_repository(self) -> Obj:
        rules = []
        for pol in self.policies().policies:
            m = meta(pol)
            labels = [{"key": "io.cilium.k8s.policy.derived-from", "value": pol["kind"],
                       "source": "k8s"},
                      {"key": "io.cilium.k8s.policy.name", "value": m["name"], "source": "k8s"},
                      {"key": "io.cilium.k8s.policy.uid", "value": m["uid"], "source": "k8s"}]
            if m.get("namespace"):
                labels.append({"key": "io.cilium.k8s.policy.namespace",
                               "value": m["namespace"], "source": "k8s"})
            for spec in PolicyModel._specs(pol):
                rules.append({**copy.deepcopy(spec), "labels": labels})
        return {"policy": json.dumps(rules, indent=2), "revision": self._policy_revision}

    def _endpoints(self, node: str) -> list[Obj]:
        out = [{"id": 1, "status": {"state": "ready", "identity": {"id": 1, "labels": [
            "reserved:host"]}, "policy": {"realized": {"policy-revision":
                                                       self._policy_revision}}}}]
        for i, pod in enumerate(sorted(self._pods(), key=lambda p: meta(p)["uid"])):
            if pod["spec"].get("nodeName") != node or pod["spec"].get("hostNetwork") or \
                    (pod.get("status") or {}).get("phase") != "Running":
                continue
            out.append({"id": 100 + i, "status": {
                "state": "ready",
                "external-identifiers": {"k8s-namespace": meta(pod)["namespace"],
                                         "k8s-pod-name": meta(pod)["name"]},
                "networking": {"addressing": [{"ipv4": pod["status"].get("podIP")}]},
                "policy": {"realized": {"policy-revision": self._policy_revision},
                           "spec": {"policy-revision": self._policy_revision}}}})
        return out

    def _relay(self, server: str | None) -> tuple[Obj | None, str]:
        """The relay pod behind ``--server ip:port`` (or why it cannot be reached)."""
        host, _, port = (server or "").rpartition(":")
        svc = next((s for s in self._list("v1", "Service", KS)
                    if s["spec"].get("clusterIP") == host), None)
        if svc is None or not port.isdigit():
            return None, f"failed to connect to '{server}': connection refused"
        backends = self.backends(svc, int(port))
        if not backends:
            return None, f"failed to connect to '{server}': connection refused"
        pod, target = backends[0]
        if _label(pod, "k8s-app") != "hubble-relay":
            return None, f"'{server}' is not hubble-relay"
        return pod, str(target)

    def _relay_reaches(self, relay: Obj) -> tuple[int, int]:
        """(nodes whose Hubble the relay reaches, nodes it does not)."""
        relay_id = self.pod_ident(relay)
        ok = bad = 0
        agents = {p["spec"]["nodeName"]: p for p in self._pods(KS)
                  if _label(p, "k8s-app") == "cilium"}
        for node in self._node_names():
            agent = agents.get(node)
            peer = self.node_ident(node, self.name, relay["spec"]["nodeName"])
            if agent is not None and _pod_ready(agent) and \
                    self.allowed(relay_id, peer, 4244, "TCP").allowed:
                ok += 1
            else:
                bad += 1
        return ok, bad

    def _hubble_status(self, agent: Obj, flags: dict[str, str]) -> tuple[int, str, str]:
        relay, target = self._relay(flags.get("--server"))
        if relay is None:
            return 1, "", target
        src = self.node_ident(agent["spec"]["nodeName"], self.name, relay["spec"]["nodeName"])
        verdict = self.allowed(src, self.pod_ident(relay), int(target), "TCP")
        if not verdict.allowed:
            return 1, "", (f"failed to connect to '{flags.get('--server')}': context deadline "
                           "exceeded")
        ok, bad = self._relay_reaches(relay)
        flows = sum(1 for _ in self._flows)
        return 0, json.dumps({"numFlows": str(flows), "maxFlows": "4095",
                              "seenFlows": str(flows), "uptimeNs": "123456789000",
                              "numConnectedNodes": ok, "numUnavailableNodes": bad,
                              "version": CHART_VERSIONS["cilium"]}) + "\n", ""

    def _hubble_observe(self, agent: Obj, flags: dict[str, str]) -> tuple[int, str, str]:
        nodes: set[str] | None = {agent["spec"]["nodeName"]}
        if flags.get("--server"):
            code, out, err = self._hubble_status(agent, flags)
            if code != 0:
                return code, out, err
            nodes = None
        since = _since(flags.get("--since"))
        verdict = flags.get("--verdict")
        src_pod = flags.get("--from-pod", "")
        lines = []
        for f in list(self._flows):
            if nodes is not None and f.node not in nodes:
                continue
            if since is not None and f.when < time.time() - since:
                continue
            if verdict and verdict != "DROPPED":
                continue
            if src_pod:
                ns, _, prefix = src_pod.rpartition("/")
                if f.src.get("namespace") != ns or not str(f.src.get("pod_name", "")
                                                           ).startswith(prefix):
                    continue
            when = datetime.datetime.fromtimestamp(f.when, datetime.timezone.utc).isoformat()
            node = f"{self.cluster_name()}/{f.node}"
            lines.append(json.dumps({"flow": {
                "time": when, "verdict": "DROPPED", "drop_reason": 133,
                "drop_reason_desc": "POLICY_DENIED",
                "IP": {"source": f.src_ip, "destination": f.dst_ip, "ipVersion": "IPv4"},
                "l4": {f.proto: {"source_port": 40000 + len(lines),
                                 "destination_port": f.port,
                                 **({"flags": {"SYN": True}} if f.proto == "TCP" else {})}},
                "source": f.src, "destination": f.dst, "Type": "L3_L4", "node_name": node,
                "traffic_direction": f.direction,
                "Summary": "TCP Flags: SYN" if f.proto == "TCP" else "UDP"},
                "node_name": node, "time": when}))
        return 0, "".join(line + "\n" for line in lines), ""

    def _connect(self, pod: Obj, args: list[str]) -> tuple[int, str, str]:
        target = next((a for a in args if not a.startswith("--")), "")
        host, _, port = target.rpartition(":")
        dst = next((p for p in self._pods() if (p.get("status") or {}).get("podIP") == host
                    and not p["spec"].get("hostNetwork")), None)
        src = self.pod_ident(pod)
        if dst is None:
            return 1, "TIMEOUT\n", ""
        dst_id = self.pod_ident(dst)
        verdict = self.allowed(src, dst_id, int(port), "TCP")
        if not verdict.allowed:
            node = pod["spec"]["nodeName"] if verdict.direction == "EGRESS" else \
                dst["spec"]["nodeName"]
            self.drop(node, src, dst_id, int(port), "TCP", verdict.direction)
            return 1, "TIMEOUT\n", ""
        listening = int(port) in {int(p["containerPort"]) for c in dst["spec"].get(
            "containers") or [] for p in c.get("ports") or []}
        return (0, "", "") if listening else (1, "REFUSED\n", "")

    def resolve(self, pod: Obj, name: str) -> tuple[str | None, str]:
        """Ask kube-dns from a pod: (the Service's clusterIP or None, what nslookup prints)."""
        dns = self.emu.get("v1", "Service", "kube-dns", KS)
        if dns is None:
            return None, ";; connection timed out; no servers could be reached\n"
        backends = self.backends(dns, 53, "UDP")
        if not backends:
            return None, ";; connection timed out; no servers could be reached\n"
        coredns, target = backends[0]
        src = self.pod_ident(pod)
        verdict = self.allowed(src, self.pod_ident(coredns), target, "UDP")
        if not verdict.allowed:
            self.drop(pod["spec"]["nodeName"], src, self.pod_ident(coredns), target, "UDP",
                      verdict.direction)
            return None, ";; connection timed out; no servers could be reached\n"
        server = dns["spec"]["clusterIP"]
        head = f"Server:\t\t{server}\nAddress:\t{server}#53\n\n"
        parts = name.rstrip(".").split(".")
        if len(parts) >= 2 and parts[2:] in ([], ["svc"], ["svc", "cluster", "local"]):
            svc = self.emu.get("v1", "Service", parts[0], parts[1])
            if svc is not None and svc["spec"].get("clusterIP"):
                fqdn = f"{parts[0]}.{parts[1]}.svc.cluster.local"
                return svc["spec"]["clusterIP"], (f"{head}Name:\t{fqdn}\nAddress: "
                                                  f"{svc['spec']['clusterIP']}\n")
        return None, f"{head}** server can't find {name}: NXDOMAIN\n"

    def _nslookup(self, pod: Obj, args: list[str]) -> tuple[int, str, str]:
        name = next((a for a in args if not a.startswith("-")), "")
        ip, text = self.resolve(pod, name)
        return (0, text, "") if ip else (1, text, "")

    def _curl(self, pod: Obj, args: list[str]) -> tuple[int, str, str]:
        url = next((a for a in args if a.startswith("http")), "")
        parts = urlsplit(url)
        host, port = parts.hostname or "", int(parts.port or 80)
        try:
            ipaddress.ip_address(host)
            ip: str | None = host
        except ValueError:
            ip, _ = self.resolve(pod, host)
            if ip is None:
                return 6, "", f"curl: (6) Could not resolve host: {host}\n"
        svc = next((s for s in self._list("v1", "Service")
                    if s["spec"].get("clusterIP") == ip), None)
        if svc is None:
            return 28, "", "curl: (28) Connection timed out after 2000 milliseconds\n"
        candidates = [(self, p, t) for p, t in self.backends(svc, port)]
        ann = meta(svc).get("annotations") or {}
        if ann.get("service.cilium.io/global") == "true":
            agent = next((p for p in self._pods(KS) if _label(p, "k8s-app") == "cilium"
                          and p["spec"].get("nodeName") == pod["spec"]["nodeName"]), None)
            secret = self.emu.get("v1", "Secret", "cilium-clustermesh", KS)
            for peer, text in sorted(((secret or {}).get("data") or {}).items()):
                remote = self.mesh.clusters.get(peer)
                if agent is None or remote is None or not self._connect_remote(
                        agent, peer, unb64(text))[0]:
                    continue
                theirs = next((s for s in remote.global_services()
                               if meta(s)["name"] == meta(svc)["name"]
                               and meta(s)["namespace"] == meta(svc)["namespace"]), None)
                if theirs is not None:
                    candidates += [(remote, p, t) for p, t in remote.backends(theirs, port)]
        if not candidates:
            return 7, "", f"curl: (7) Failed to connect to {host} port {port}: Connection refused\n"
        owner, backend, target = candidates[next(self._rr) % len(candidates)]
        src = self.pod_ident(pod, viewer=self.name)
        dst = owner.pod_ident(backend, viewer=self.name)
        if src.endpoint:
            ok, _why = self.policies().decide(src, dst, "egress", target, "TCP",
                                             dict(owner.pod_ident(backend).named_ports))
            if not ok:
                self.drop(pod["spec"]["nodeName"], src, dst, target, "TCP", "EGRESS")
                return 28, "", "curl: (28) Connection timed out after 2000 milliseconds\n"
        their_src = self.pod_ident(pod, viewer=owner.name)
        verdict = owner.policies().decide(owner.pod_ident(backend), their_src, "ingress",
                                          target, "TCP", dict(owner.pod_ident(backend)
                                                              .named_ports))
        if not verdict[0]:
            owner.drop(backend["spec"]["nodeName"], their_src, owner.pod_ident(backend), target,
                       "TCP", "INGRESS")
            return 28, "", "curl: (28) Connection timed out after 2000 milliseconds\n"
        return 0, meta(backend)["name"], ""

    def _on_portforward(self, ns: str, pod: str, port: int) -> Callable[[bytes], bytes] | None:
        found = self.emu.get("v1", "Pod", pod, ns)
        if found is None or not _pod_ready(found) or _label(found, "k8s-app") != "hubble-ui" \
                or port != 8081:
            return None
        body = b"<!doctype html><title>Hubble UI</title>"
        return lambda data: (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body) if data else b""

    # -- the host's view: kind port mapping → NodePort → Envoy -------------------------------------

    def host_route(self, host_port: int) -> tuple[Obj, Obj, int] | None:
        """(gateway, its Service, listener port) that a host port reaches, or None."""
        mapping = None
        for node in self._kind_config().get("nodes") or []:
            for pm in node.get("extraPortMappings") or []:
                if int(pm.get("hostPort", 0)) == host_port:
                    mapping = pm
        if mapping is None or self._kind is None or not self.kpr():
            return None
        node_port = int(mapping["containerPort"])
        for svc in self._list("v1", "Service"):
            if svc["spec"].get("type") not in ("NodePort", "LoadBalancer"):
                continue
            for p in svc["spec"].get("ports") or []:
                if p.get("nodePort") == node_port:
                    owner = (meta(svc).get("labels") or {}).get("io.cilium.gateway/owning-gateway")
                    gw = self.emu.get(GATEWAY_API, "Gateway", owner or "",
                                      meta(svc)["namespace"])
                    if gw is None or not is_true(gw, "Programmed"):
                        return None
                    return gw, svc, int(p["port"])
        return None

    def listener_secret(self, gw: Obj, port: int, sni: str | None) -> Obj | None:
        status = {s.get("name"): s for s in dig(gw, "status.listeners", []) or []}
        for lst in gw["spec"].get("listeners") or []:
            if lst.get("protocol") != "HTTPS" or int(lst["port"]) != port:
                continue
            entry = status.get(lst["name"])
            if entry is None or not is_true({"status": entry}, "ResolvedRefs"):
                continue
            if not sni or not _host_matches(lst.get("hostname"), sni):
                continue
            ref = (dig(lst, "tls.certificateRefs", []) or [{}])[0]
            return self.emu.get("v1", "Secret", ref.get("name", ""),
                                ref.get("namespace") or meta(gw)["namespace"])
        return None

    def serve_request(self, gw: Obj, port: int, host: str, path: str) -> tuple[int, str]:
        """What Envoy answers for a request from the host: (HTTP status, body)."""
        world = self.world_ident(HOST_GATEWAY_IP)
        envoy = self.envoy_ident()
        if not self.allowed(world, envoy, port, "TCP").allowed:
            return 403, "Access denied\r\n"
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host
        for route in self._list(GATEWAY_API, "HTTPRoute"):
            parents = [p for p in dig(route, "status.parents", []) or []
                       if dig(p, "parentRef.name") == meta(gw)["name"]
                       and is_true({"status": p}, "Accepted")]
            if not parents:
                continue
            names = route["spec"].get("hostnames") or []
            if names and not any(_host_matches(n, hostname) for n in names):
                continue
            for rule in route["spec"].get("rules") or [{}]:
                matches = rule.get("matches") or [{"path": {"type": "PathPrefix", "value": "/"}}]
                if not any(path.startswith(dig(mt, "path.value", "/")) for mt in matches):
                    continue
                backends: list[tuple[Obj, int]] = []
                for ref in rule.get("backendRefs") or []:
                    svc = self.emu.get("v1", "Service", ref.get("name", ""),
                                       meta(route)["namespace"])
                    if svc is not None:
                        backends += self.backends(svc, int(ref.get("port", 80)))
                if not backends:
                    return 503, "no healthy upstream"
                pod, target = backends[next(self._rr) % len(backends)]
                verdict = self.allowed(envoy, self.pod_ident(pod), target, "TCP")
                if not verdict.allowed:
                    return 503, ("upstream connect error or disconnect/reset before headers. "
                                 "reset reason: connection timeout")
                return 200, meta(pod)["name"]
        return 404, ""


# ================================================================================================
# the host port: a real TLS server
# ================================================================================================

class HostFront:
    """127.0.0.1:<free port>, serving what kind's mapping of that port would reach."""

    def __init__(self, sim: SimCluster) -> None:
        self.sim = sim
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self._dir = Path(tempfile.mkdtemp(prefix=f"simfront-{sim.name}-"))
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._stop = threading.Event()
        self.requests: list[tuple[str | None, str, int]] = []  # (SNI, Host, status)
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"sim-{sim.name}-https")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _context_for(self, secret: Obj) -> ssl.SSLContext:
        key = f"{meta(secret)['uid']}-{meta(secret)['resourceVersion']}"
        if key not in self._contexts:
            crt, pem = self._dir / f"{key}.crt", self._dir / f"{key}.key"
            crt.write_bytes(unb64(secret["data"]["tls.crt"]))
            pem.write_bytes(unb64(secret["data"]["tls.key"]))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(crt, pem)
            self._contexts[key] = ctx
        return self._contexts[key]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            # one request reads each object once, as one snapshot (Envoy's view of the cluster)
            with self.sim.emu.cached_reads():
                self._answer(conn)
        except (OSError, ssl.SSLError):
            pass
        except Exception as exc:
            self.sim.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _answer(self, conn: socket.socket) -> None:
        """Route, terminate TLS with the listener's certificate (by SNI), answer one request."""
        route = self.sim.host_route(self.port)
        if route is None:  # nothing behind the mapping (or no such mapping): reset
            conn.close()
            return
        gw, _svc, port = route
        chosen: dict[str, Any] = {}

        def pick(sslobj: Any, name: str | None, _ctx: ssl.SSLContext) -> int | None:
            secret = self.sim.listener_secret(gw, port, name)
            chosen["sni"] = name
            if secret is None:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = self._context_for(secret)
            return None

        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.sni_callback = pick
        with base.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = tls.recv(4096)
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
            path = head[0].split(" ")[1] if len(head[0].split(" ")) > 1 else "/"
            host = next((h.split(":", 1)[1].strip() for h in head[1:]
                         if h.lower().startswith("host:")), "")
            code, body = self.sim.serve_request(gw, port, host, path)
            self.requests.append((chosen.get("sni"), host, code))
            reason = {200: "OK", 403: "Forbidden", 404: "Not Found",
                      503: "Service Unavailable"}.get(code, "")
            payload = body.encode()
            tls.sendall(f"HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\n"
                        f"content-length: {len(payload)}\r\nserver: envoy\r\n"
                        "connection: close\r\n\r\n".encode() + payload)


# ================================================================================================
# object builders and small pieces
# ================================================================================================

CHART_VERSIONS = {"cilium": "1.18.4", "cert-manager": "v1.19.0"}


def write_charts(fake_state: Path) -> None:
    """The fake helm's chart contents: one ServiceAccount per release (the simulator renders the
    rest from the values the release is installed with)."""
    for chart, version in CHART_VERSIONS.items():
        d = fake_state / "charts" / chart / "templates"
        d.mkdir(parents=True, exist_ok=True)
        (d.parent / "Chart.yaml").write_text(yaml.safe_dump(
            {"apiVersion": "v2", "name": chart, "version": version,
             "appVersion": version.lstrip("v")}))
        (d / "serviceaccount.yaml").write_text(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n"
            f"  name: {chart}\n  namespace: {{{{ .Release.Namespace }}}}\n")


def _deployment(name: str, ns: str, labels: dict[str, str], *, replicas: int = 1,
                containers: list[Obj], max_unavailable: str = "25%",
                annotations: dict[str, str] | None = None,
                extra_spec: Obj | None = None) -> Obj:
    tmeta: Obj = {"labels": dict(labels)}
    if annotations:
        tmeta["annotations"] = annotations
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
            "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {
                         "maxUnavailable": max_unavailable, "maxSurge": "25%"}},
                     "template": {"metadata": tmeta, "spec": {
                         "containers": [{"image": "sim", **c} for c in containers],
                         **(extra_spec or {})}}}}


def _daemonset(name: str, ns: str, labels: dict[str, str], container: str, *,
               spec: Obj | None = None, annotations: dict[str, str] | None = None) -> Obj:
    tmeta: Obj = {"labels": dict(labels)}
    if annotations:
        tmeta["annotations"] = annotations
    pod_spec = spec or {"hostNetwork": True, "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": container, "image": "sim"}]}
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
            "spec": {"selector": {"matchLabels": dict(labels)},
                     "template": {"metadata": tmeta, "spec": pod_spec}}}


def _same_stored(stored: Obj, wanted: Obj) -> bool:
    """``wanted`` equals ``stored`` up to the zero values a real server leaves out or spells
    as null (Go's omitempty and nil pointers: 0, "", [], {} and null)."""
    return bool(_pruned(stored) == _pruned(wanted))


def _pruned(value: Any) -> Any:
    if isinstance(value, dict):
        out = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is False or v not in (None, 0, "", [], {})}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def merge_diff(before: Any, after: Any) -> Any:
    """The RFC 7386 JSON merge patch turning ``before`` into ``after`` (what controller-runtime's
    ``client.MergeFrom`` sends): removed keys as null, lists and scalars whole."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return after
    patch: Obj = {}
    for key in before.keys() - after.keys():
        patch[key] = None
    for key, value in after.items():
        if key not in before:
            patch[key] = value
        elif before[key] != value:
            sub = merge_diff(before[key], value)
            if sub != {} or not isinstance(value, dict):
                patch[key] = sub
    return patch


def _label(obj: Obj, key: str) -> str | None:
    return (meta(obj).get("labels") or {}).get(key)


def _pod_ready(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" and is_true(pod, "Ready") \
        and not meta(pod).get("deletionTimestamp")


def _node_ip(node: Obj) -> str:
    return next((a["address"] for a in dig(node, "status.addresses", []) or []
                 if a.get("type") == "InternalIP"), "")


def _running_status(pod: Obj, ip: str | None, host_ip: str, ready: bool) -> Obj:
    old = (pod.get("status") or {}).get("conditions") or []
    started = (pod.get("status") or {}).get("startTime") or now_iso()
    return {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}] if ip else [],
            "hostIP": host_ip, "startTime": started,
            "conditions": [condition("PodScheduled", True, "", old=old),
                           condition("Initialized", True, "", old=old),
                           condition("ContainersReady", ready, "", old=old),
                           condition("Ready", ready, "" if ready else "ContainersNotReady",
                                     old=old)],
            "containerStatuses": [{"name": c["name"], "ready": ready, "started": True,
                                   "restartCount": 0, "image": c.get("image", ""),
                                   "state": {"running": {"startedAt": started}}}
                                  for c in pod["spec"].get("containers") or []]}


def _max_unavailable(dep: Obj, replicas: int) -> int:
    text = str(dig(dep, "spec.strategy.rollingUpdate.maxUnavailable", "25%"))
    if text.endswith("%"):
        return int(replicas * int(text[:-1]) / 100)
    return int(text)


def _labels_match(selector: Obj, labels: dict[str, str]) -> bool:
    ident = Ident(tuple(("k8s", k, v) for k, v in labels.items()), frozenset())
    return selector_matches(selector, ident)


def _in_pools(ip: str, pools: list[Obj]) -> bool:
    return any(ipaddress.ip_address(ip) in ipaddress.ip_network(b["cidr"], strict=False)
               for p in pools for b in p["spec"].get("blocks") or [] if b.get("cidr"))


def _host_matches(pattern: str | None, host: str) -> bool:
    if not pattern:
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return pattern == host


def _hosts_intersect(listener: str | None, hostnames: list[str] | None) -> bool:
    if not listener or not hostnames:
        return True
    return any(_host_matches(listener, h) or _host_matches(h, listener) for h in hostnames)


def _route_allowed(listener: Obj, route_ns: str, gw_ns: str, namespaces: dict[str, Obj]) -> bool:
    allowed = dig(listener, "allowedRoutes.namespaces", {}) or {}
    source = allowed.get("from", "Same")
    if source == "All":
        return True
    if source == "Same":
        return route_ns == gw_ns
    if source == "Selector":
        ns = namespaces.get(route_ns)
        return ns is not None and _labels_match(allowed.get("selector") or {},
                                                meta(ns).get("labels") or {})
    return False


def _flags(args: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    it = iter(args)
    for a in it:
        if a.startswith("-"):
            if "=" in a:
                k, _, v = a.partition("=")
                out[k] = v
            else:
                out[a] = next(it, "")
    return out


def _since(text: str | None) -> float | None:
    """Seconds back from now: `hubble observe --since` takes a duration or an RFC 3339 time."""
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError):
        pass
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return time.time() - when.timestamp()


# ================================================================================================
# a lab wired to simulated clusters (the tests' fixture body)
# ================================================================================================

@dataclass
class SimLab:
    """A ``LabEnv`` whose clusters are ``SimCluster``s, and the config written for them."""

    env: LabEnv
    sims: dict[str, SimCluster]
    mesh: Mesh

    def close(self) -> None:
        for sim in list(self.sims.values()):
            sim.close()

    def check(self) -> None:
        for sim in self.sims.values():
            sim.check()


def make_lab(root: Path, servers: Sequence[Any], base: str = "config/lab.yaml",
             clusters: list[Obj] | None = None) -> SimLab:
    """A lab under ``root`` from a shipped config, one ``SimCluster`` per cluster on the real API
    server of the same position in ``servers`` (``EnvtestServer``s, reached through an
    ``ApiFront`` for exec and port-forward), each cluster's ``httpsHostPort`` set to its
    simulator's free port; the Gateway API CRD cache pre-filled from the pinned upstream files
    (no network)."""
    raw = yaml.safe_load((REPO / base).read_text())
    raw["stateDir"] = str(root / ".lab")
    if clusters is not None:
        raw["clusters"] = clusters
    fake_state = root / "fake"
    fake_state.mkdir(parents=True, exist_ok=True)
    mesh = Mesh()
    sims: dict[str, SimCluster] = {}
    try:
        assert len(servers) == len(raw["clusters"]), "one real API server per cluster"
        for c, server in zip(raw["clusters"], servers, strict=True):
            front = ApiFront(server.client.as_user_agent(f"sim-{c['name']}"))
            sim = SimCluster(c["name"], fake_state, mesh=mesh, front=front)
            sims[c["name"]] = sim
            gateway = c.setdefault("gateway", {})
            gateway["httpsHostPort"] = sim.https_port
    except BaseException:
        for sim in sims.values():
            sim.close()
        raise
    config = root / "lab.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    cache = root / ".lab" / "cache" / f"gateway-api-{raw['versions']['gatewayAPI']}"
    cache.mkdir(parents=True, exist_ok=True)
    for p in (upstream_dir() / "gateway-api-1.4.0" / "standard").glob("*.yaml"):
        (cache / p.name).write_bytes(p.read_bytes())
    env = LabEnv(root=root, config=config, fake_state=fake_state,
                 kubeconfig=root / "kubeconfig", fronts={n: s.emu for n, s in sims.items()})
    # the simulated controllers catch up asynchronously through a real server: a gate may need a
    # few passes of theirs on a loaded machine
    env.overrides["LAB_GATE_TIMEOUT"] = "30"
    return SimLab(env, sims, mesh)


@contextlib.contextmanager
def sim_lab(root: Path, servers: Sequence[Any], base: str = "config/lab.yaml",
            clusters: list[Obj] | None = None) -> Iterator[SimLab]:
    lab = make_lab(root, servers, base, clusters)
    try:
        yield lab
    finally:
        lab.close()
