"""Steps `gateway` and `certs`, `lab.trust`: rendering, pool derivation, gates, HTTPS from the host.

Offline: a real API server holds the cluster's objects, small in-test controllers play Cilium
(Gateway status, the generated LoadBalancer Service, whose allocated nodePorts the server keeps by
port name), cert-manager (Certificates issued from a CA made here with `cryptography`) and the
kubelet (Deployments available); the fake docker/helm from tests/fakes/bin play the host tools,
and a local TLS server on 127.0.0.1 plays the Gateway's HTTPS NodePort.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import random
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lab import trust
from lab.errors import LabError
from lab.network import PoolError
from lab.steps.base import StepContext, Timeouts, Verdict
from lab.steps.certs import (
    CA_NAME,
    CERT_MANAGER_DEPLOYMENTS,
    CERT_MANAGER_NAMESPACE,
    DEMO_IMAGE,
    GATEWAY_CERT,
    CertsStep,
    ca_objects,
    cert_manager_release,
    demo_objects,
    gateway_https_object,
    https_probe,
)
from lab.steps.gateway import (
    CERTS_FIELD_MANAGER,
    GATEWAY_API,
    GATEWAY_FIELD_MANAGER,
    GATEWAY_NAME,
    GATEWAY_NAMESPACE,
    GATEWAY_SERVICE,
    POOL_SOURCE_ANNOTATION,
    GatewayStep,
    ensure_node_ports,
    resolve_pool,
)
from tests.conftest import FAKE_BIN, REPO, step_context
from tests.support.apifront import ApiFront
from tests.support.upstream import require_upstream, validate_helm_values, validate_object

FAST = Timeouts(cluster=3, cni=3, gateway=3, certs=3, locked=3, meshed=3,
                poll_start=0.02, poll_max=0.1)
Obj = dict[str, Any]


# -- PKI made here ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[Pem, Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Pem(_cert_pem(cert), _key_pem(key)), key, cert


def make_leaf(ca_key: Any, ca_cert: x509.Certificate, names: list[str]) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(names[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Pem(_cert_pem(cert), _key_pem(key))


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


@dataclass(frozen=True)
class Pki:
    ca: Pem
    leaf: Pem  # explicit names + wildcard, from the lab CA (what the certs step asks for)
    wildcard_only: Pem  # only *.localhost, from the lab CA
    other_ca: Pem
    other_leaf: Pem  # the right names, from a CA the lab does not trust


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, ca_key, ca_cert = make_ca("kind-cilium-lab CA (lab)")
    other, other_key, other_cert = make_ca("someone else's CA")
    names = ["localhost", "echo.localhost", "*.localhost"]
    return Pki(ca=ca, leaf=make_leaf(ca_key, ca_cert, names),
               wildcard_only=make_leaf(ca_key, ca_cert, ["*.localhost"]),
               other_ca=other, other_leaf=make_leaf(other_key, other_cert, names))


class TLSServer:
    """HTTPS on 127.0.0.1:<random>, answering every request with 200 and a pod-like name."""

    def __init__(self, pem: Pem, tmp: Path, body: bytes = b"echo-6d5f8c7b9-x2k4q") -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "tls.crt").write_bytes(pem.cert)
        (tmp / "tls.key").write_bytes(pem.key)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
        self.sni: list[str | None] = []
        self.hosts: list[str] = []
        self.context.sni_callback = self._record_sni
        self.body = body
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _record_sni(self, _sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.sni.append(name)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                conn.settimeout(3)
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    for line in data.decode(errors="replace").split("\r\n"):
                        if line.lower().startswith("host:"):
                            self.hosts.append(line.split(":", 1)[1].strip())
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                % (len(self.body), self.body))
            except (OSError, ssl.SSLError):
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


# -- the emulated cluster --------------------------------------------------------------------------

def _cond(type_: str, status: bool, gen: int | None, reason: str = "") -> Obj:
    c: Obj = {"type": type_, "status": "True" if status else "False",
              "reason": reason or (type_ if status else f"Not{type_}"), "message": "",
              "lastTransitionTime": "2025-01-01T00:00:00Z"}
    if gen is not None:
        c["observedGeneration"] = gen
    return c


class FakeCluster:
    """Cilium, cert-manager and the kubelet, as far as the two gates look at them."""

    def __init__(self, emu: ApiFront, pki: Pki) -> None:
        self.emu = emu
        self.pki = pki
        self.programmed = True
        self.stale = False  # report the previous generation
        self.drift = False  # the next reconcile re-allocates nodePorts (as if recreated)
        self.address: str | None = None  # default: first usable address of the pool
        self.resolved_refs: bool | None = None  # None: True iff the TLS Secret exists
        self.certs_ready = True
        self.class_accepted = True
        self.emu.on_write(self._on_write)

    def _on_write(self, verb: str, obj: Obj) -> None:
        if verb == "delete":
            return
        kind = obj.get("kind")
        if kind in ("Certificate", "ClusterIssuer"):
            self.issue()
        if kind == "Deployment":
            self.kubelet(obj["metadata"]["namespace"], obj["metadata"]["name"])
        if kind in ("Gateway", "HTTPRoute", "Certificate"):
            self.reconcile()

    # cert-manager
    def issue(self) -> None:
        for issuer in self.emu.list("cert-manager.io/v1", "ClusterIssuer"):
            self.emu.patch_status("cert-manager.io/v1", "ClusterIssuer",
                                  issuer["metadata"]["name"], None,
                                  {"conditions": [_cond("Ready", self.certs_ready, None)]})
        for cert in self.emu.list("cert-manager.io/v1", "Certificate"):
            meta = cert["metadata"]
            pem = self.pki.ca if cert["spec"].get("isCA") else self.pki.leaf
            if self.certs_ready:
                self.emu.put({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                              "metadata": {"name": cert["spec"]["secretName"],
                                           "namespace": meta["namespace"]},
                              "data": {"tls.crt": _b64(pem.cert), "tls.key": _b64(pem.key),
                                       "ca.crt": _b64(self.pki.ca.cert)}})
            self.emu.patch_status("cert-manager.io/v1", "Certificate", meta["name"],
                                  meta["namespace"], {"conditions": [
                                      _cond("Ready", self.certs_ready, meta["generation"])]})

    # the kubelet
    def kubelet(self, namespace: str, name: str) -> None:
        dep = self.emu.get("apps/v1", "Deployment", name, namespace)
        if dep is None:
            return
        n = dep["spec"].get("replicas", 1)
        self.emu.patch_status("apps/v1", "Deployment", name, namespace, {
            "observedGeneration": dep["metadata"]["generation"], "replicas": n,
            "readyReplicas": n, "updatedReplicas": n, "availableReplicas": n,
            "conditions": [_cond("Available", True, None, "MinimumReplicasAvailable")]})

    # Cilium's operator
    def pool(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        pool = self.emu.get("cilium.io/v2", "CiliumLoadBalancerIPPool", "lab-pool")
        return ipaddress.ip_network(pool["spec"]["blocks"][0]["cidr"]) if pool else None

    def reconcile(self) -> None:
        self.emu.patch_status(GATEWAY_API, "GatewayClass", "cilium", None, {"conditions": [
            _cond("Accepted", self.class_accepted, 1)]})
        gw = self.emu.get(GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE)
        if gw is None:
            return
        pool = self.pool()
        ip = self.address or (str(pool.network_address + 1) if pool else None)
        listeners = gw["spec"]["listeners"]
        old = self.emu.get("v1", "Service", GATEWAY_SERVICE, GATEWAY_NAMESPACE)
        kept = {p["name"]: p.get("nodePort") for p in (old or {}).get("spec", {}).get("ports", [])}
        ports = []
        for port in sorted({lst["port"] for lst in listeners}):
            name = f"port-{port}"
            node_port = None if self.drift else kept.get(name)
            ports.append({"name": name, "port": port, "protocol": "TCP", "targetPort": port,
                          "nodePort": node_port or random.randint(31000, 32700)})
        self.drift = False
        # Cilium's desired Service carries no nodePort; the API server keeps the allocated ones.
        self.emu.put({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": GATEWAY_SERVICE, "namespace": GATEWAY_NAMESPACE,
                                   "labels": {"gateway.networking.k8s.io/gateway-name": "lab"}},
                      "spec": {"type": "LoadBalancer", "ports": ports},
                      "status": {"loadBalancer": {"ingress": [{"ip": ip}] if ip else []}}})
        gen = gw["metadata"]["generation"] - (1 if self.stale else 0)
        secret = self.emu.get("v1", "Secret", GATEWAY_CERT, GATEWAY_NAMESPACE)
        status_listeners = []
        for lst in listeners:
            refs = True
            if lst["protocol"] == "HTTPS":
                refs = secret is not None if self.resolved_refs is None else self.resolved_refs
            status_listeners.append({
                "name": lst["name"], "attachedRoutes": 1,
                "supportedKinds": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}],
                "conditions": [_cond("Accepted", True, gen), _cond("Programmed", True, gen),
                               _cond("ResolvedRefs", refs, gen,
                                     "" if refs else "InvalidCertificateRef")]})
        programmed = self.programmed and ip is not None
        self.emu.patch_status(GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE, {
            "addresses": [{"type": "IPAddress", "value": ip}] if ip else [],
            "conditions": [_cond("Accepted", True, gen),
                           _cond("Programmed", programmed, gen,
                                 "" if programmed else "AddressNotAssigned")],
            "listeners": status_listeners})
        route = self.emu.get(GATEWAY_API, "HTTPRoute", "echo", "echo")
        if route is not None:
            self.emu.patch_status(GATEWAY_API, "HTTPRoute", "echo", "echo", {"parents": [{
                "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                              "namespace": GATEWAY_NAMESPACE, "name": GATEWAY_NAME},
                "controllerName": "io.cilium/gateway",
                "conditions": [_cond("Accepted", True, route["metadata"]["generation"]),
                               _cond("ResolvedRefs", True, route["metadata"]["generation"])]}]})

    def cert_manager_installed(self) -> None:
        self.emu.put({"apiVersion": "v1", "kind": "Namespace",
                      "metadata": {"name": CERT_MANAGER_NAMESPACE}})
        for name in CERT_MANAGER_DEPLOYMENTS:
            self.emu.put({"apiVersion": "apps/v1", "kind": "Deployment",
                          "metadata": {"name": name, "namespace": CERT_MANAGER_NAMESPACE},
                          "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                                   "template": {"metadata": {"labels": {"app": name}},
                                                "spec": {"containers": [
                                                    {"name": name, "image": "x"}]}}}})
            self.kubelet(CERT_MANAGER_NAMESPACE, name)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def fake_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "fake"
    state.mkdir()
    monkeypatch.setenv("LAB_FAKE_STATE", str(state))
    return state


def set_docker_subnets(state: Path, subnets: list[str] | None) -> None:
    """`docker network inspect kind` answers with these subnets (None: no such network)."""
    net: Any = None if subnets is None else {
        "IPAM": {"Config": [{"Subnet": s} for s in subnets]}}
    (state / "docker.json").write_text(json.dumps({"networks": {"kind": net},
                                                   "kind_network_exists": subnets is not None}))


@pytest.fixture
def emu(kube_api: ApiFront) -> ApiFront:
    """A real API server with the pinned CRDs and Cilium's GatewayClass, Accepted."""
    kube_api.put({"apiVersion": GATEWAY_API, "kind": "GatewayClass",
                  "metadata": {"name": "cilium"},
                  "spec": {"controllerName": "io.cilium/gateway"},
                  "status": {"conditions": [_cond("Accepted", True, 1)]}})
    return kube_api


@pytest.fixture
def cluster(emu: ApiFront, pki: Pki) -> FakeCluster:
    return FakeCluster(emu, pki)


def make_ctx(tmp_path: Path, emu: ApiFront | None = None,
             cluster: dict[str, Any] | None = None, **top: Any) -> StepContext:
    raw = yaml.safe_load((REPO / "config" / "lab.yaml").read_text())
    if cluster is not None:
        raw["clusters"] = [cluster]
    raw.update(top)
    ctx: StepContext = step_context(tmp_path, raw, emu, FAST, FAKE_BIN)
    return ctx


def lab_cluster(**gateway: Any) -> dict[str, Any]:
    """The shipped config's cluster, pool left to derivation, with gateway overrides."""
    return {"name": "lab", "id": 1, "gateway": {"httpNodePort": 30080, "httpsNodePort": 30443,
                                                **gateway}}


def failing(v: Verdict) -> dict[str, str]:
    return {c.name: c.detail for c in v.failing}


def stored(emu: ApiFront, api_version: str, kind: str, name: str,
           namespace: str | None = None) -> Obj:
    obj = emu.get(api_version, kind, name, namespace)
    assert obj is not None, f"{kind} {namespace}/{name} does not exist"
    return obj


# -- rendering -------------------------------------------------------------------------------------

def test_every_rendered_object_validates_against_the_pinned_schemas(tmp_path: Path) -> None:
    require_upstream()
    ctx = make_ctx(tmp_path)
    objects = [*GatewayStep().render(ctx).objects, *CertsStep().render(ctx).objects]
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == ["Certificate", "CiliumL2AnnouncementPolicy", "CiliumLoadBalancerIPPool",
                     "ClusterIssuer", "Deployment", "Gateway", "HTTPRoute", "Namespace",
                     "Service"]
    for obj in objects:
        assert validate_object(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"
    # the validator is strict: a typo is caught, not dropped
    bad = GatewayStep().render(ctx).objects[0]
    bad["spec"]["blocks"][0]["cdir"] = "172.18.255.0/24"
    assert validate_object(bad) != []


def test_cert_manager_release_and_values(tmp_path: Path) -> None:
    require_upstream()
    ctx = make_ctx(tmp_path)
    rendered = CertsStep().render(ctx)
    [release] = rendered.helm
    assert release == cert_manager_release(ctx)
    assert (release.chart, release.repo_url, release.version, release.namespace) == (
        "jetstack/cert-manager", "https://charts.jetstack.io", "v1.19.0", "cert-manager")
    assert release.values_file == "helm/cert-manager.values.yaml"
    assert release.values["crds"] == {"enabled": True}
    assert release.values["config"] == {
        "apiVersion": "controller.config.cert-manager.io/v1alpha1",
        "kind": "ControllerConfiguration", "enableGatewayAPI": True}
    assert validate_helm_values(release.values, "cert-manager") == []


def test_render_is_pure_and_says_where_the_pool_comes_from(tmp_path: Path,
                                                           fake_state: Path) -> None:
    derived = make_ctx(tmp_path, cluster=lab_cluster())
    pool = GatewayStep().render(derived).objects[0]
    assert pool["spec"]["blocks"] == [{"cidr": "172.18.255.0/24"}]
    assert "assumed" in pool["metadata"]["annotations"][POOL_SOURCE_ANNOTATION]
    derived.facts["lbPool"] = "172.19.255.0/24"  # what an earlier `apply` learned from Docker
    assert GatewayStep().render(derived).objects[0]["spec"]["blocks"] == [
        {"cidr": "172.19.255.0/24"}]
    configured = make_ctx(tmp_path)  # config/lab.yaml pins lbPool: 172.18.255.0/24
    assert "configured" in GatewayStep().render(configured).objects[0]["metadata"][
        "annotations"][POOL_SOURCE_ANNOTATION]
    CertsStep().render(configured)
    assert not (fake_state / "calls.jsonl").exists()  # no docker, no helm
    assert derived._kube is None and configured._kube is None  # no cluster either


def test_gateway_and_certs_each_own_their_listener(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    [http_gw] = [o for o in GatewayStep().render(ctx).objects if o["kind"] == "Gateway"]
    https_gw = gateway_https_object()
    assert [lst["name"] for lst in http_gw["spec"]["listeners"]] == ["http"]
    assert [lst["name"] for lst in https_gw["spec"]["listeners"]] == ["https"]
    https = https_gw["spec"]["listeners"][0]
    assert https["tls"] == {"mode": "Terminate", "certificateRefs": [
        {"group": "", "kind": "Secret", "name": GATEWAY_CERT}]}
    assert https["hostname"] == "*.localhost" and https["port"] == 443
    for lst in (http_gw["spec"]["listeners"][0], https):
        assert lst["allowedRoutes"]["namespaces"]["from"] == "Selector"
    echo_ns = demo_objects(ctx)[0]
    selector = https["allowedRoutes"]["namespaces"]["selector"]["matchLabels"]
    assert selector.items() <= echo_ns["metadata"]["labels"].items()


def test_certificate_names_work_for_real_clients(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, gatewayHosts=["echo", "shop"])
    certs = {o["metadata"]["name"]: o for o in ca_objects(ctx) if o["kind"] == "Certificate"}
    ca = certs[CA_NAME]["spec"]
    assert ca["isCA"] is True and ca["privateKey"]["algorithm"] == "ECDSA"
    assert certs[CA_NAME]["metadata"]["namespace"] == CERT_MANAGER_NAMESPACE
    names = certs[GATEWAY_CERT]["spec"]["dnsNames"]
    assert {"localhost", "echo.localhost", "shop.localhost"} <= set(names)
    assert certs[GATEWAY_CERT]["spec"]["issuerRef"]["name"] == CA_NAME
    route = next(o for o in demo_objects(ctx) if o["kind"] == "HTTPRoute")
    assert route["spec"]["hostnames"] == ["echo.localhost"]


def test_demo_app_is_pinned_small_and_locked_down(tmp_path: Path) -> None:
    dep = next(o for o in demo_objects(make_ctx(tmp_path)) if o["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["image"] == DEMO_IMAGE and ":" in c["image"].rsplit("/", 1)[1]
    assert c["readinessProbe"]["httpGet"]["port"] == "http"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "--http-override=/hostname" in c["args"]  # no /shell through the Gateway


# -- the LoadBalancer pool from the Docker network -------------------------------------------------

@pytest.mark.parametrize(("subnets", "pool"), [
    (["172.18.0.0/16", "fc00:f853:ccd:e793::/64"], "172.18.255.0/24"),  # kind's default
    (["172.19.0.0/16"], "172.19.255.0/24"),
    (["192.168.50.0/24"], "192.168.50.224/27"),  # a small network: 1/8 of it, from the top
    (["fc00:f853:ccd:e793::/64", "172.20.0.0/16"], "172.20.255.0/24"),  # IPv6 listed first
])
def test_pool_derived_from_the_docker_network(tmp_path: Path, fake_state: Path,
                                              subnets: list[str], pool: str) -> None:
    set_docker_subnets(fake_state, subnets)
    ctx = make_ctx(tmp_path, cluster=lab_cluster())
    assert resolve_pool(ctx) == pool
    assert ctx.facts["lbPool"] == pool
    assert GatewayStep().render(ctx).objects[0]["spec"]["blocks"] == [{"cidr": pool}]


@pytest.mark.parametrize(("subnets", "lb_pool", "message", "fix"), [
    (["fc00:f853:ccd:e793::/64"], None, "no IPv4 subnet", "IPv4"),
    (["172.18.0.0/30"], None, "too small", "/24 or larger"),
    (["172.18.0.0/16"], "10.99.0.0/24", "outside the Docker network",
     "inside 172.18.0.0/16, e.g. 172.18.255.0/24"),
    (["172.19.0.0/16"], "172.18.255.0/24", "outside the Docker network",
     "inside 172.19.0.0/16"),
])
def test_pool_that_cannot_work_is_refused_with_the_fix(tmp_path: Path, fake_state: Path,
                                                       subnets: list[str], lb_pool: str | None,
                                                       message: str, fix: str) -> None:
    set_docker_subnets(fake_state, subnets)
    cluster = lab_cluster()
    if lb_pool:
        cluster["lbPool"] = lb_pool
    ctx = make_ctx(tmp_path, cluster=cluster)
    with pytest.raises(PoolError) as err:
        resolve_pool(ctx)
    assert message in err.value.message and fix in err.value.hint
    assert "lbPool" not in ctx.facts


def test_missing_docker_network_is_explained(tmp_path: Path, fake_state: Path) -> None:
    set_docker_subnets(fake_state, None)
    with pytest.raises(LabError) as err:
        resolve_pool(make_ctx(tmp_path, cluster=lab_cluster()))
    assert "kind" in err.value.message and "docker network ls" in err.value.hint


# -- the `gateway` gate ----------------------------------------------------------------------------

@pytest.fixture
def gw_ctx(tmp_path: Path, fake_state: Path, emu: ApiFront,
           cluster: FakeCluster) -> StepContext:
    """The gateway step applied (pool derived from the fake kind network 172.18.0.0/16)."""
    ctx = make_ctx(tmp_path, emu, cluster=lab_cluster())
    GatewayStep().apply(ctx)
    return ctx


def test_gateway_apply_and_gate_hold(gw_ctx: StepContext, emu: ApiFront) -> None:
    step = GatewayStep()
    verdict = gw_ctx.wait_for(lambda: step.ready(gw_ctx), 3, "the gateway gate")
    assert verdict.ready, verdict.explain()
    assert gw_ctx.facts["lbPool"] == "172.18.255.0/24"
    svc = emu.get("v1", "Service", GATEWAY_SERVICE, GATEWAY_NAMESPACE)
    assert svc is not None and svc["spec"]["type"] == "LoadBalancer"
    assert {p["name"]: p["nodePort"] for p in svc["spec"]["ports"]} == {"port-80": 30080}
    gw = emu.get(GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE)
    assert gw is not None
    # the spec is the step's alone (the status is the controller's, through /status)
    assert [m["manager"] for m in gw["metadata"]["managedFields"]
            if m.get("subresource") != "status"] == [GATEWAY_FIELD_MANAGER]
    l2 = emu.get("cilium.io/v2alpha1", "CiliumL2AnnouncementPolicy", "lab-l2")
    assert l2 is not None and l2["spec"]["interfaces"] == ["^eth[0-9]+"]
    assert step.probe(gw_ctx).ready
    # idempotent: a second apply changes nothing
    emu.clear_requests()
    step.apply(gw_ctx)
    assert stored(emu, GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE)["metadata"][
        "generation"] == gw["metadata"]["generation"]
    assert not [r for r in emu.writes() if r.method in ("POST", "PUT")]


def test_gateway_not_programmed_is_named(gw_ctx: StepContext, cluster: FakeCluster) -> None:
    cluster.programmed = False
    cluster.reconcile()
    bad = failing(GatewayStep().ready(gw_ctx))
    assert list(bad) == ["Gateway lab-gateway/lab Programmed"]
    assert "AddressNotAssigned" in bad["Gateway lab-gateway/lab Programmed"]
    assert not GatewayStep().probe(gw_ctx).ready


def test_stale_observed_generation_is_named(gw_ctx: StepContext, cluster: FakeCluster) -> None:
    cluster.stale = True
    cluster.reconcile()
    bad = failing(GatewayStep().ready(gw_ctx))
    assert list(bad) == ["Gateway lab-gateway/lab status is current"]


def test_address_outside_the_pool_and_class_not_accepted_are_named(
        gw_ctx: StepContext, cluster: FakeCluster) -> None:
    cluster.address = "10.0.0.7"
    cluster.class_accepted = False
    cluster.reconcile()
    bad = failing(GatewayStep().ready(gw_ctx))
    assert set(bad) == {"Gateway address from the LB pool", "GatewayClass cilium Accepted"}
    assert "outside 172.18.255.0/24" in bad["Gateway address from the LB pool"]


def test_a_nodeport_held_by_another_service_is_named_with_the_fix(
        gw_ctx: StepContext, emu: ApiFront, cluster: FakeCluster) -> None:
    """The real API server refuses the patch (422, port already allocated); the gate names the
    Service holding the port and the config field to change."""
    step = GatewayStep()
    assert gw_ctx.wait_for(lambda: step.ready(gw_ctx), 3, "gate").ready
    cluster.drift = True  # Cilium recreated the Service: 30080 is free again...
    cluster.reconcile()
    emu.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    emu.put({"apiVersion": "v1", "kind": "Service",  # ...and another Service takes it
             "metadata": {"name": "web", "namespace": "shop"},
             "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80,
                                                     "nodePort": 30080}]}})
    detail = failing(step.ready(gw_ctx))["gateway Service nodePorts as configured"]
    assert "NodePort 30080 is held by Service shop/web (port http)" in detail
    assert "clusters[0].gateway.httpNodePort" in detail and "30000-30085" in detail


def test_nodeports_drifted_after_a_reconcile_are_repatched(gw_ctx: StepContext,
                                                           emu: ApiFront,
                                                           cluster: FakeCluster) -> None:
    step = GatewayStep()
    assert gw_ctx.wait_for(lambda: step.ready(gw_ctx), 3, "gate").ready
    cluster.drift = True  # Cilium recreated the Service: the API server allocated new ports
    cluster.reconcile()
    drifted = stored(emu, "v1", "Service", GATEWAY_SERVICE, GATEWAY_NAMESPACE)
    assert drifted["spec"]["ports"][0]["nodePort"] != 30080
    first = step.ready(gw_ctx)
    assert list(failing(first)) == ["gateway Service nodePorts as configured"]
    assert "re-patched" in failing(first)["gateway Service nodePorts as configured"]
    fixed = stored(emu, "v1", "Service", GATEWAY_SERVICE, GATEWAY_NAMESPACE)
    assert fixed["spec"]["ports"][0]["nodePort"] == 30080
    cluster.reconcile()  # Cilium rewrites the spec again: the allocated port is kept by name
    assert step.ready(gw_ctx).ready


def test_service_missing_is_named(tmp_path: Path, fake_state: Path, emu: ApiFront) -> None:
    ctx = make_ctx(tmp_path, emu, cluster=lab_cluster())
    GatewayStep().apply(ctx)  # no Cilium here: nothing reconciles the Gateway
    bad = failing(GatewayStep().ready(ctx))
    assert "not created yet" in bad["gateway Service nodePorts as configured"]
    assert "Gateway lab-gateway/lab Programmed" in bad


# -- the `certs` gate ------------------------------------------------------------------------------

@pytest.fixture
def https_server(tmp_path: Path, pki: Pki) -> Iterator[TLSServer]:
    server = TLSServer(pki.leaf, tmp_path / "tls")
    yield server
    server.close()


@pytest.fixture
def certs_ctx(tmp_path: Path, fake_state: Path, emu: ApiFront, cluster: FakeCluster,
              https_server: TLSServer) -> StepContext:
    """Both steps' objects applied, cert-manager 'installed'; HTTPS host port: the TLS server."""
    ctx = make_ctx(tmp_path, emu, cluster=lab_cluster(httpsHostPort=https_server.port))
    GatewayStep().apply(ctx)
    cluster.cert_manager_installed()
    for obj in [*ca_objects(ctx), *demo_objects(ctx)]:
        ctx.kube.apply(obj)
    ctx.kube.apply(gateway_https_object(), field_manager=CERTS_FIELD_MANAGER)
    ensure_node_ports(ctx, CertsStep().wanted_ports(ctx))
    return ctx


def test_certs_gate_holds_and_https_verifies_against_the_lab_ca(
        certs_ctx: StepContext, https_server: TLSServer) -> None:
    step = CertsStep()
    verdict = certs_ctx.wait_for(lambda: step.ready(certs_ctx), 3, "the certs gate")
    assert verdict.ready, verdict.explain()
    https = next(c for c in verdict.checks if c.name.startswith("demo app answers"))
    assert "certificate verified" in https.detail
    assert https_server.sni[-1] == "echo.localhost"
    assert https_server.hosts[-1] == f"echo.localhost:{https_server.port}"
    assert step.probe(certs_ctx).ready


def test_listener_resolved_refs_false_is_named(certs_ctx: StepContext,
                                               cluster: FakeCluster) -> None:
    cluster.resolved_refs = False
    cluster.reconcile()
    bad = failing(CertsStep().ready(certs_ctx))
    assert list(bad) == ["listener https ResolvedRefs"]
    assert "InvalidCertificateRef" in bad["listener https ResolvedRefs"]


def test_certificate_not_ready_is_named(certs_ctx: StepContext, cluster: FakeCluster) -> None:
    cluster.certs_ready = False
    cluster.issue()
    bad = failing(CertsStep().ready(certs_ctx))
    assert "Certificate lab-gateway/lab-gateway-tls Ready" in bad
    assert "ClusterIssuer lab-ca Ready" in bad
    assert not CertsStep().probe(certs_ctx).ready


def test_webhook_not_answering_and_gateway_not_programmed_are_named(
        certs_ctx: StepContext, emu: ApiFront, cluster: FakeCluster) -> None:
    emu.fail_next("POST", r"/namespaces/cert-manager/issuers$", 500, "InternalError",
                  message='Internal error occurred: failed calling webhook '
                          '"webhook.cert-manager.io": connection refused')
    cluster.programmed = False
    cluster.reconcile()
    bad = failing(CertsStep().ready(certs_ctx))
    assert "failed calling webhook" in bad["cert-manager webhook answers"]
    assert "Gateway lab-gateway/lab Programmed" in bad


def test_https_nodeport_drift_is_repatched(certs_ctx: StepContext, emu: ApiFront,
                                           cluster: FakeCluster) -> None:
    cluster.drift = True
    cluster.reconcile()
    bad = failing(CertsStep().ready(certs_ctx))
    assert "re-patched" in bad["gateway Service HTTPS nodePort as configured"]
    ports = {p["name"]: p["nodePort"] for p in stored(
        emu, "v1", "Service", GATEWAY_SERVICE, GATEWAY_NAMESPACE)["spec"]["ports"]}
    assert ports["port-443"] == 30443
    assert CertsStep().ready(certs_ctx).ready


# -- HTTPS from the host ---------------------------------------------------------------------------

def test_https_probe_verify_ok(pki: Pki, https_server: TLSServer) -> None:
    ok, detail = https_probe("127.0.0.1", https_server.port, "echo.localhost",
                             pki.ca.cert.decode())
    assert ok, detail
    assert "echo-6d5f8c7b9-x2k4q" in detail


def test_https_probe_rejects_a_certificate_from_another_ca(pki: Pki, tmp_path: Path) -> None:
    server = TLSServer(pki.other_leaf, tmp_path / "other")
    try:
        ok, detail = https_probe("127.0.0.1", server.port, "echo.localhost",
                                 pki.ca.cert.decode())
    finally:
        server.close()
    assert not ok
    assert "does not verify against the lab CA" in detail


def test_https_probe_rejects_a_bare_wildcard_localhost_certificate(pki: Pki,
                                                                   tmp_path: Path) -> None:
    """Why the certificate carries explicit names: OpenSSL refuses `*.localhost` alone."""
    server = TLSServer(pki.wildcard_only, tmp_path / "wild")
    try:
        ok, detail = https_probe("127.0.0.1", server.port, "echo.localhost",
                                 pki.ca.cert.decode())
    finally:
        server.close()
    assert not ok and "does not verify" in detail


def test_https_probe_no_answer(pki: Pki) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    ok, detail = https_probe("127.0.0.1", port, "echo.localhost", pki.ca.cert.decode(),
                             timeout=1)
    assert not ok and "no HTTPS answer" in detail


# -- the whole path: apply both steps, their gates hold --------------------------------------------

def test_apply_both_steps_end_to_end(tmp_path: Path, fake_state: Path, emu: ApiFront,
                                     cluster: FakeCluster, https_server: TLSServer) -> None:
    ctx = make_ctx(tmp_path, emu, cluster=lab_cluster(httpsHostPort=https_server.port))
    gateway, certs = GatewayStep(), CertsStep()
    gateway.apply(ctx)
    assert ctx.wait_for(lambda: gateway.ready(ctx), 3, "gateway gate").ready
    cluster.cert_manager_installed()  # what the chart's Deployments become once running
    certs.apply(ctx)
    verdict = ctx.wait_for(lambda: certs.ready(ctx), 3, "certs gate")
    assert verdict.ready, verdict.explain()
    helm = [json.loads(line)["argv"] for line in (fake_state / "calls.jsonl").read_text()
            .splitlines() if json.loads(line)["tool"] == "helm"]
    upgrade = next(a for a in helm if a[:1] == ["upgrade"])
    assert upgrade[2:4] == ["cert-manager", "jetstack/cert-manager"]
    assert upgrade[upgrade.index("--version") + 1] == "v1.19.0"
    values_path = Path(upgrade[upgrade.index("--values") + 1])
    assert values_path == ctx.work_dir / "helm" / "cert-manager.values.yaml"
    assert yaml.safe_load(values_path.read_text())["config"]["enableGatewayAPI"] is True
    gw = stored(emu, GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE)
    managers = {m["manager"] for m in gw["metadata"]["managedFields"]}
    assert CERTS_FIELD_MANAGER in managers
    # re-running the certs step is idempotent: helm sees the same release, nothing re-created
    def helm_upgrades() -> list[list[str]]:
        return [a for a in (json.loads(line)["argv"] for line in
                            (fake_state / "calls.jsonl").read_text().splitlines()
                            if json.loads(line)["tool"] == "helm") if a[:1] == ["upgrade"]]

    specs = ((GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE),
             ("cert-manager.io/v1", "Certificate", GATEWAY_CERT, GATEWAY_NAMESPACE),
             ("cert-manager.io/v1", "Certificate", CA_NAME, CERT_MANAGER_NAMESPACE))

    def generations() -> list[int]:
        return [stored(emu, *ref)["metadata"]["generation"] for ref in specs]

    upgrades, before = helm_upgrades(), generations()
    emu.clear_requests()
    certs.apply(ctx)
    assert helm_upgrades() == upgrades
    assert [(r.method, r.path) for r in emu.writes()
            if r.method in ("POST", "PUT") and "dryRun" not in r.query] == []
    assert generations() == before
    assert certs.ready(ctx).ready


def test_listener_split_survives_reapplying_either_step(tmp_path: Path, fake_state: Path,
                                                        emu: ApiFront,
                                                        cluster: FakeCluster) -> None:
    """On a real API server `spec.listeners` is a map list keyed by name (Gateway API CRD,
    x-kubernetes-list-type: map), so each field manager owns its own listener."""
    ctx = make_ctx(tmp_path, emu, cluster=lab_cluster())
    GatewayStep().apply(ctx)
    ctx.kube.apply(gateway_https_object(), field_manager=CERTS_FIELD_MANAGER)
    listeners = stored(emu, GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE)["spec"][
        "listeners"]
    assert sorted(lst["name"] for lst in listeners) == ["http", "https"]
    GatewayStep().apply(ctx)
    listeners = stored(emu, GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE)["spec"][
        "listeners"]
    assert sorted(lst["name"] for lst in listeners) == ["http", "https"]


def test_certs_refuses_to_run_before_the_gateway_api_crds(tmp_path: Path, fake_state: Path,
                                                          bare_kube_api: ApiFront) -> None:
    ctx = make_ctx(tmp_path, bare_kube_api)
    with pytest.raises(LabError) as err:
        CertsStep().apply(ctx)
    assert "Gateway API CRDs" in err.value.message and "cni" in err.value.hint
    assert not (fake_state / "calls.jsonl").exists()  # helm never ran


# -- lab.trust -------------------------------------------------------------------------------------

def test_trust_writes_the_ca_certificate_never_the_key(certs_ctx: StepContext, pki: Pki,
                                                       emu: ApiFront) -> None:
    secret = emu.get("v1", "Secret", CA_NAME, CERT_MANAGER_NAMESPACE)
    assert secret is not None and "tls.key" in secret["data"]  # the key is in the cluster...
    exported = trust.export_ca(certs_ctx.lab, kubeconfig=certs_ctx.kubeconfig)
    assert exported.path == certs_ctx.lab.state_dir / "lab-ca.crt"
    text = exported.path.read_text()
    assert text == pki.ca.cert.decode()  # ...and never leaves it
    assert "PRIVATE KEY" not in text
    assert exported.path.stat().st_mode & 0o777 == 0o644
    out = trust.instructions(exported)
    port = certs_ctx.cluster.gateway.https_host_port
    assert f"curl --cacert {exported.path} https://echo.localhost:{port}" in out
    assert "update-ca-certificates" in out and "update-ca-trust" in out
    assert (f"security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain "
            f"{exported.path}") in out


def test_trust_without_a_ca_says_what_to_run(tmp_path: Path, kube_api: ApiFront) -> None:
    ctx = make_ctx(tmp_path, kube_api)
    with pytest.raises(LabError) as err:
        trust.export_ca(ctx.lab, kubeconfig=ctx.kubeconfig)
    assert "no lab CA yet" in err.value.message and "--to certs" in err.value.hint


def test_trust_task_writes_out_and_prints(certs_ctx: StepContext, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from invoke.context import Context

    from lab.tasks.access import ACCESS_TASKS
    from lab.tasks.access import trust as trust_task

    assert trust_task in ACCESS_TASKS
    assert set(trust_task.help) == {"config", "cluster", "out", "log_format", "log_level",
                                    "verbose"}
    config = tmp_path / "task-lab.yaml"
    raw = yaml.safe_load((REPO / "config" / "lab.yaml").read_text())
    raw["stateDir"] = str(certs_ctx.lab.state_dir)
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("LAB_KUBECONFIG", str(certs_ctx.kubeconfig))
    out = tmp_path / "exported" / "ca.pem"
    trust_task(Context(), config=str(config), out=str(out))
    assert out.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert f"curl --cacert {out}" in capsys.readouterr().out
    from invoke.exceptions import Exit

    with pytest.raises(Exit) as err:
        trust_task(Context(), config=str(config), cluster="nope")
    assert err.value.code == 1 and "no cluster named 'nope'" in capsys.readouterr().err
