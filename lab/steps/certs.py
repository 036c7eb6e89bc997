"""Step `certs`: cert-manager, the lab CA, the Gateway's HTTPS listener and a demo app on day 0.

1. cert-manager via Helm (jetstack chart, CRDs from the chart, Gateway API support switched on in
   its controller configuration). The Gateway API CRDs must exist before cert-manager starts (it
   checks them at start-up), so the step refuses to run before the `cni` step installed them.
2. The CA chain: a selfSigned ClusterIssuer signs a CA Certificate (isCA, ECDSA P-256, key never
   rotated, 10 years) in the cert-manager namespace, which a CA ClusterIssuer then uses.
3. The Gateway's certificate, issued by that CA as an explicit Certificate (not the gateway-shim
   annotation: the names must be explicit). OpenSSL (so curl and Python) and browsers reject a
   certificate whose only name is ``*.localhost`` for ``echo.localhost``, so it carries
   ``localhost`` and every app host name of the lab besides the wildcard.
4. The HTTPS listener, added to the shared Gateway under this step's own field manager once the
   certificate is issued (the `gateway` step owns the HTTP listener; see lab/steps/gateway.py).
5. A demo app (agnhost netexec) with an HTTPRoute, so ``https://echo.localhost:30443`` answers.

The gate ends with the real thing: from the host, an HTTPS request to the demo app whose
certificate must verify against the lab CA (and nothing else).
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
from typing import Any

from lab.errors import LabError
from lab.helm import ensure_release
from lab.kube import (
    Conflict,
    Invalid,
    KubeClient,
    KubeError,
    NotFound,
    condition,
    deployment_available,
)
from lab.steps.base import (
    HelmRelease,
    Obj,
    Rendered,
    StepContext,
    Verdict,
    applied,
    helm_upgrade_command,
)
from lab.steps.gateway import (
    CERTS_FIELD_MANAGER,
    GATEWAY_API,
    GATEWAY_CLASS,
    GATEWAY_NAME,
    GATEWAY_NAMESPACE,
    HTTPS_LISTENER,
    HTTPS_PORT_NAME,
    LISTENER_HOSTNAME,
    MANAGED_BY,
    ROUTES_LABEL,
    allowed_routes,
    check_gateway_programmed,
    ensure_node_ports,
    is_true,
    node_port_command,
)

CERT_MANAGER_NAMESPACE = "cert-manager"
CERT_MANAGER_REPO = ("jetstack", "https://charts.jetstack.io")
CERT_MANAGER_DEPLOYMENTS = ("cert-manager", "cert-manager-cainjector", "cert-manager-webhook")
CM_API = "cert-manager.io/v1"

SELFSIGNED_ISSUER = "lab-selfsigned"
CA_NAME = "lab-ca"  # the CA Certificate, its Secret and the CA ClusterIssuer
CA_DURATION = "87600h"  # 10 years: users trust this certificate by hand, it must not churn
GATEWAY_CERT = "lab-gateway-tls"  # Certificate and Secret, next to the Gateway

DEMO_NAMESPACE = "echo"
DEMO_NAME = "echo"
# agnhost is maintained by Kubernetes SIG Testing and published on registry.k8s.io; netexec
# serves HTTP on an unprivileged port and runs as any non-root user with a read-only root.
DEMO_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.53"
DEMO_PORT = 8080
WEBHOOK_PROBE = "lab-webhook-probe"


# -- what is rendered ------------------------------------------------------------------------------

def cert_manager_values() -> dict[str, Any]:
    """Chart values (every key checked against cert-manager v1.19.0's values.yaml and schema)."""
    return {
        "crds": {"enabled": True},  # `installCRDs` is the deprecated spelling
        "config": {
            "apiVersion": "controller.config.cert-manager.io/v1alpha1",
            "kind": "ControllerConfiguration",
            "enableGatewayAPI": True,
        },
        # The chart's startupapicheck Job is a post-install hook; helm waits for it (within
        # --timeout) and marks the release failed when a cold image pull outlasts that. The
        # certs gate asks the webhook itself (a server-side dry-run), so the hook is off.
        "startupapicheck": {"enabled": False},
    }


def cert_manager_release(ctx: StepContext) -> HelmRelease:
    return HelmRelease(release="cert-manager", chart="jetstack/cert-manager",
                       repo_name=CERT_MANAGER_REPO[0], repo_url=CERT_MANAGER_REPO[1],
                       version=ctx.lab.versions.cert_manager, namespace=CERT_MANAGER_NAMESPACE,
                       values=cert_manager_values())


def demo_host(ctx: StepContext) -> str:
    """The host name the demo app answers on: the first of the lab's gateway hosts."""
    return f"{(ctx.lab.gateway_hosts or ('echo',))[0]}.localhost"


def certificate_names(ctx: StepContext) -> list[str]:
    names = ["localhost", *(f"{h}.localhost" for h in ctx.lab.gateway_hosts or ("echo",)),
             LISTENER_HOSTNAME]
    return list(dict.fromkeys(names))


def issuer_ref(name: str) -> Obj:
    return {"name": name, "kind": "ClusterIssuer", "group": "cert-manager.io"}


def ca_objects(ctx: StepContext) -> list[Obj]:
    return [
        {"apiVersion": CM_API, "kind": "ClusterIssuer",
         "metadata": {"name": SELFSIGNED_ISSUER, "labels": dict(MANAGED_BY)},
         "spec": {"selfSigned": {}}},
        {"apiVersion": CM_API, "kind": "Certificate",
         "metadata": {"name": CA_NAME, "namespace": CERT_MANAGER_NAMESPACE,
                      "labels": dict(MANAGED_BY)},
         "spec": {
             "isCA": True,
             "commonName": f"kind-cilium-lab CA ({ctx.cluster.name})",
             "subject": {"organizations": ["kind-cilium-lab"]},
             "secretName": CA_NAME,
             "duration": CA_DURATION,
             # Never: a renewed CA keeps its key, so a CA the user trusted keeps verifying.
             "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Never"},
             "issuerRef": issuer_ref(SELFSIGNED_ISSUER),
         }},
        {"apiVersion": CM_API, "kind": "ClusterIssuer",
         "metadata": {"name": CA_NAME, "labels": dict(MANAGED_BY)},
         "spec": {"ca": {"secretName": CA_NAME}}},  # read from the cluster resource namespace
        {"apiVersion": CM_API, "kind": "Certificate",
         "metadata": {"name": GATEWAY_CERT, "namespace": GATEWAY_NAMESPACE,
                      "labels": dict(MANAGED_BY)},
         "spec": {
             "secretName": GATEWAY_CERT,
             # A subject as well as the SANs: strict X.509 checks (Python ≥ 3.13's default) want
             # one or the other marked critical; a common name keeps every client content.
             "commonName": "localhost",
             "dnsNames": certificate_names(ctx),
             "usages": ["digital signature", "server auth"],
             "privateKey": {"algorithm": "ECDSA", "size": 256},
             "issuerRef": issuer_ref(CA_NAME),
         }},
    ]


def demo_objects(ctx: StepContext) -> list[Obj]:
    labels = {"app.kubernetes.io/name": DEMO_NAME}
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": DEMO_NAMESPACE, "labels": {
             **MANAGED_BY, ROUTES_LABEL: "true",  # may attach routes to the shared Gateway
             "pod-security.kubernetes.io/enforce": "restricted"}}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": DEMO_NAME, "namespace": DEMO_NAMESPACE,
                      "labels": {**labels, **MANAGED_BY}},
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": labels},
             "template": {
                 "metadata": {"labels": labels},
                 "spec": {
                     "automountServiceAccountToken": False,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65534,
                                         "runAsGroup": 65534,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{
                         "name": DEMO_NAME,
                         "image": DEMO_IMAGE,
                         # --http-override answers every path with the pod's name: netexec's
                         # /shell, /upload and /exit must not be reachable through the Gateway.
                         "args": ["netexec", f"--http-port={DEMO_PORT}", "--udp-port=-1",
                                  "--http-override=/hostname"],
                         "ports": [{"name": "http", "containerPort": DEMO_PORT,
                                    "protocol": "TCP"}],
                         "readinessProbe": {"httpGet": {"path": "/", "port": "http"},
                                            "periodSeconds": 5},
                         "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                                       "limits": {"memory": "64Mi"}},
                         "securityContext": {"allowPrivilegeEscalation": False,
                                             "readOnlyRootFilesystem": True,
                                             "capabilities": {"drop": ["ALL"]}},
                     }],
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": DEMO_NAME, "namespace": DEMO_NAMESPACE,
                      "labels": {**labels, **MANAGED_BY}},
         "spec": {"selector": labels,
                  "ports": [{"name": "http", "port": 80, "targetPort": "http",
                             "protocol": "TCP"}]}},
        {"apiVersion": GATEWAY_API, "kind": "HTTPRoute",
         "metadata": {"name": DEMO_NAME, "namespace": DEMO_NAMESPACE,
                      "labels": {**labels, **MANAGED_BY}},
         "spec": {
             # No sectionName: the route attaches to the HTTP and the HTTPS listener alike.
             "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                             "namespace": GATEWAY_NAMESPACE, "name": GATEWAY_NAME}],
             "hostnames": [demo_host(ctx)],
             "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                        "backendRefs": [{"name": DEMO_NAME, "port": 80}]}],
         }},
    ]


def gateway_https_object() -> Obj:
    """The Gateway as the `certs` step owns it: only the HTTPS listener (class shared)."""
    return {
        "apiVersion": GATEWAY_API,
        "kind": "Gateway",
        "metadata": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE},
        "spec": {
            "gatewayClassName": GATEWAY_CLASS,
            "listeners": [{
                "name": HTTPS_LISTENER, "protocol": "HTTPS", "port": 443,
                "hostname": LISTENER_HOSTNAME,
                "tls": {"mode": "Terminate",
                        "certificateRefs": [{"group": "", "kind": "Secret",
                                             "name": GATEWAY_CERT}]},
                "allowedRoutes": allowed_routes(),
            }],
        },
    }


# -- checks ----------------------------------------------------------------------------------------

def webhook_answers(kube: KubeClient) -> tuple[bool, str]:
    """A server-side dry-run create goes through cert-manager's validating webhook."""
    probe = {"apiVersion": CM_API, "kind": "Issuer",
             "metadata": {"name": WEBHOOK_PROBE, "namespace": CERT_MANAGER_NAMESPACE},
             "spec": {"selfSigned": {}}}
    try:
        res = kube.resource(CM_API, "Issuer")
        kube.request("POST", res.path(CERT_MANAGER_NAMESPACE), query=[("dryRun", "All")],
                     body=probe, doing="asking cert-manager's webhook (dry-run create)")
    except NotFound as exc:
        return False, f"cert-manager's CRDs are not served: {exc.message}"
    except (Conflict, Invalid) as exc:  # an answer: admission ran, the API refused the probe
        return True, f"answered ({exc.reason or exc.status})"
    except KubeError as exc:
        return False, exc.message[:300]
    return True, "answered a dry-run"


def certificate_ready(cert: Obj | None) -> tuple[bool, str]:
    if cert is None:
        return False, "missing"
    ok, detail = is_true(cert, "Ready")
    gen = cert.get("metadata", {}).get("generation")
    observed = (condition(cert, "Ready") or {}).get("observedGeneration")
    if ok and observed is not None and gen is not None and observed != gen:
        return False, f"Ready for generation {observed}, the spec is at {gen}"
    return ok, detail


def check_https_listeners(v: Verdict, gw: Obj | None) -> None:
    ref = f"{GATEWAY_NAMESPACE}/{GATEWAY_NAME}"
    spec = [lst for lst in (gw or {}).get("spec", {}).get("listeners") or []
            if lst.get("protocol") == "HTTPS"]
    if not spec:
        v.add(f"Gateway {ref} has an HTTPS listener", False,
              "no HTTPS listener (the certs step adds it once the certificate is issued)")
        return
    status = {s.get("name"): s for s in (gw or {}).get("status", {}).get("listeners") or []}
    for lst in spec:
        name = lst.get("name")
        ok, detail = is_true(status.get(name), "ResolvedRefs")
        if name not in status:
            ok, detail = False, "no listener status yet"
        v.add(f"listener {name} ResolvedRefs", ok, detail)


def check_route(v: Verdict, route: Obj | None) -> None:
    ref = f"HTTPRoute {DEMO_NAMESPACE}/{DEMO_NAME}"
    if route is None:
        v.add(f"{ref} accepted by the Gateway", False, "missing")
        return
    parents = [p for p in route.get("status", {}).get("parents") or []
               if (p.get("parentRef") or {}).get("name") == GATEWAY_NAME
               and (p.get("parentRef") or {}).get("namespace", DEMO_NAMESPACE) == GATEWAY_NAMESPACE]
    if not parents:
        v.add(f"{ref} accepted by the Gateway", False, "no status from the Gateway yet")
        return
    accepted, detail = is_true(parents[0], "Accepted")
    resolved, rdetail = is_true(parents[0], "ResolvedRefs")
    v.add(f"{ref} accepted by the Gateway", accepted and resolved,
          detail if not accepted else rdetail)


def read_ca_pem(kube: KubeClient) -> str | None:
    """The lab CA certificate (PEM) from its Secret: ``ca.crt``, never ``tls.key``."""
    secret = kube.get("v1", "Secret", CA_NAME, CERT_MANAGER_NAMESPACE)
    data = (secret or {}).get("data") or {}
    raw = data.get("ca.crt") or data.get("tls.crt")  # self-signed CA: both are the CA itself
    if not raw:
        return None
    return base64.b64decode(raw).decode()


def https_probe(address: str, port: int, server_name: str, ca_pem: str, path: str = "/",
                timeout: float = 5.0) -> tuple[bool, str]:
    """GET https://<server_name>:<port><path>, connecting to ``address``, trusting only ``ca_pem``.

    SNI and the Host header carry ``server_name`` (as curl and browsers send them); the server's
    certificate must chain to ``ca_pem`` and name ``server_name``. Returns (HTTP 200, detail).
    """
    try:
        context = ssl.create_default_context(cadata=ca_pem)  # only the lab CA, no system store
    except ssl.SSLError as exc:
        return False, f"the lab CA is not a usable certificate: {exc}"
    host = server_name if port == 443 else f"{server_name}:{port}"
    try:
        with socket.create_connection((address, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kind-cilium-lab\r\n"
                        "Accept: */*\r\nConnection: close\r\n\r\n".encode())
            resp = http.client.HTTPResponse(tls)
            resp.begin()
            body = resp.read(512).decode(errors="replace").strip()
            status = resp.status
    except ssl.SSLCertVerificationError as exc:
        return False, (f"https://{host} presented a certificate that does not verify against "
                       f"the lab CA: {exc.verify_message or exc}")
    except ssl.SSLError as exc:
        return False, f"TLS handshake with {address}:{port} (SNI {server_name}) failed: {exc}"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"no HTTPS answer from {address}:{port} for {server_name}: {exc}"
    if status != 200:
        return False, f"https://{host}{path} answered HTTP {status}: {body[:120]}"
    return True, f"https://{host}{path} answered 200 ({body[:60]}), certificate verified"


def host_address(listen_address: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen_address, listen_address)


# -- the step --------------------------------------------------------------------------------------

class CertsStep:
    name = "certs"
    title = "cert-manager + lab CA + HTTPS on the Gateway + demo app"

    def render(self, ctx: StepContext) -> Rendered:
        release = cert_manager_release(ctx)
        objects = [*ca_objects(ctx), *demo_objects(ctx), gateway_https_object()]
        return Rendered(
            helm=[release],
            objects=objects,
            commands=[helm_upgrade_command(ctx, release), *applied(*objects),
                      node_port_command({443: ctx.cluster.gateway.https_node_port})],
        )

    def wanted_ports(self, ctx: StepContext) -> dict[str, int]:
        return {HTTPS_PORT_NAME: ctx.cluster.gateway.https_node_port}

    def apply(self, ctx: StepContext) -> None:
        if not ctx.kube.serves(GATEWAY_API, "Gateway"):
            raise LabError("the Gateway API CRDs are not installed",
                           "cert-manager's Gateway API support needs them before it starts; the "
                           "`cni` step installs them: run `invoke lab.up --resume`")
        ensure_release(ctx, cert_manager_release(ctx))
        timeout = ctx.timeouts.for_gate("certs")
        ctx.wait_for(lambda: self.cert_manager_verdict(ctx), timeout, "cert-manager ready")
        for obj in [*ca_objects(ctx), *demo_objects(ctx)]:
            ctx.kube.apply(obj)
        # The HTTPS listener goes on only once its certificate exists: the Gateway never shows
        # a listener with unresolved references because of the order of our own work.
        ctx.wait_for(lambda: self.certificate_verdict(ctx), timeout,
                     "the gateway certificate issued")
        ctx.kube.apply(gateway_https_object(), field_manager=CERTS_FIELD_MANAGER)
        ensure_node_ports(ctx, self.wanted_ports(ctx))  # Cilium may not have added port-443 yet

    def cert_manager_verdict(self, ctx: StepContext) -> Verdict:
        v = Verdict("cert-manager")
        for name in CERT_MANAGER_DEPLOYMENTS:
            dep = ctx.kube.get("apps/v1", "Deployment", name, CERT_MANAGER_NAMESPACE)
            v.add(f"deployment {CERT_MANAGER_NAMESPACE}/{name} available",
                  *deployment_available(dep))
        v.add("cert-manager webhook answers", *webhook_answers(ctx.kube))
        return v

    def certificate_verdict(self, ctx: StepContext) -> Verdict:
        v = Verdict("certificates")
        issuer = ctx.kube.get(CM_API, "ClusterIssuer", CA_NAME)
        v.add(f"ClusterIssuer {CA_NAME} Ready", *(is_true(issuer, "Ready") if issuer
                                                  else (False, "missing")))
        for ns, name in ((CERT_MANAGER_NAMESPACE, CA_NAME), (GATEWAY_NAMESPACE, GATEWAY_CERT)):
            cert = ctx.kube.get(CM_API, "Certificate", name, ns)
            v.add(f"Certificate {ns}/{name} Ready", *certificate_ready(cert))
        return v

    def ready(self, ctx: StepContext) -> Verdict:
        v = Verdict("certs")
        v.checks += self.cert_manager_verdict(ctx).checks
        v.checks += self.certificate_verdict(ctx).checks
        gw = ctx.kube.get(GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE)
        check_https_listeners(v, gw)
        check_gateway_programmed(v, gw)
        check_route(v, ctx.kube.get(GATEWAY_API, "HTTPRoute", DEMO_NAME, DEMO_NAMESPACE))
        v.add(f"deployment {DEMO_NAMESPACE}/{DEMO_NAME} available",
              *deployment_available(ctx.kube.get("apps/v1", "Deployment", DEMO_NAME,
                                                 DEMO_NAMESPACE)))
        # why a pod does not run (image pull, crash loop, unschedulable), ending early if final
        nodes = ctx.kube.list("v1", "Node")
        for ns in (CERT_MANAGER_NAMESPACE, DEMO_NAMESPACE):
            v.checks.append(ctx.pods_check(f"pods of {ns} run", ctx.kube.list("v1", "Pod", ns),
                                           nodes))
        ok, detail = ensure_node_ports(ctx, self.wanted_ports(ctx))  # read after the Gateway
        v.add("gateway Service HTTPS nodePort as configured", ok, detail)
        ca_pem = read_ca_pem(ctx.kube)
        g = ctx.cluster.gateway
        if ca_pem is None:
            v.add("demo app answers over HTTPS from the host", False,
                  f"the lab CA Secret {CERT_MANAGER_NAMESPACE}/{CA_NAME} has no certificate yet")
        else:
            v.add("demo app answers over HTTPS from the host",
                  *https_probe(host_address(g.listen_address), g.https_host_port,
                               demo_host(ctx), ca_pem))
        return v

    def probe(self, ctx: StepContext) -> Verdict:
        v = Verdict("certs")
        cert = ctx.kube.get(CM_API, "Certificate", GATEWAY_CERT, GATEWAY_NAMESPACE)
        v.add(f"Certificate {GATEWAY_NAMESPACE}/{GATEWAY_CERT} Ready", *certificate_ready(cert))
        gw = ctx.kube.get(GATEWAY_API, "Gateway", GATEWAY_NAME, GATEWAY_NAMESPACE)
        names = [lst.get("name") for lst in (gw or {}).get("spec", {}).get("listeners") or []]
        v.add(f"Gateway {GATEWAY_NAMESPACE}/{GATEWAY_NAME} has the HTTPS listener",
              HTTPS_LISTENER in names)
        return v
