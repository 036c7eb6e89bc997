"""Application onboarding: from `lab.onboard NAME --namespace NS …` to the objects it needs.

An application gets exactly one CiliumNetworkPolicy (``lab-app-<name>``): ingress from the
Gateway on its port when it is served at ``https://<host>.localhost``, ingress from named peers
(``--from``) for internal services such as a database, and only the egress it asks for. DNS is
already granted to every application by the baseline (``lab-default-deny``), whose L7 DNS rule is
also what lets ``fqdn:`` egress learn the addresses behind a name.

Egress specs (``--egress``, repeatable; ``/udp`` after the port for UDP):

    app:NS/KEY=VALUE[,KEY=VALUE]:PORT   pods with those labels in NS      (toEndpoints)
    svc:NS/NAME:PORT                   the pods behind Service NS/NAME (read from the cluster)
    fqdn:NAME:PORT                     a DNS name; `*` makes it a pattern (toFQDNs)
    world:PORT                         anywhere outside the cluster        (toEntities world)
    cidr:CIDR:PORT                     an address range outside the cluster (toCIDRSet)

``svc:`` is resolved to the Service's pod selector because Cilium's ``toServices`` only applies
to Services *without* a selector (Cilium docs, "Services based"). Peers (``--from``) use the
``app:NS/KEY=VALUE`` form without a port: they may connect on the application's ``--port``.

Every input is validated before anything is applied; ``OnboardError`` lists every problem.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lab.errors import LabError
from lab.policies import (
    INFRA_NAMESPACES,
    MANAGED_BY,
    ONBOARD_LABEL,
    AppSpec,
    Egress,
    Peer,
    app_policy,
    find_allow_all,
)
from lab.steps.gateway import GATEWAY_API, GATEWAY_NAME, GATEWAY_NAMESPACE, ROUTES_LABEL

Obj = dict[str, Any]

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")  # the CRD's pattern
FQDN_NAME = re.compile(r"^([-a-zA-Z0-9_]+[.]?)+$")  # toFQDNs.matchName pattern (CRD)
FQDN_PATTERN = re.compile(r"^([-a-zA-Z0-9_*]+[.]?)+$")  # toFQDNs.matchPattern pattern (CRD)
HTTPROUTE_API = GATEWAY_API


class OnboardError(LabError):
    """The application cannot be onboarded as asked; nothing was applied."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("cannot onboard: " + "; ".join(problems),
                         "fix the options named above (see `invoke --help lab.onboard`); "
                         "nothing was applied")


class ServiceReader(Protocol):
    """What onboarding needs from the cluster (``lab.kube.KubeClient`` fits)."""

    def get(self, api_version: str, kind: str, name: str,
            namespace: str | None = None) -> Obj | None: ...


# -- parsing ---------------------------------------------------------------------------------------

def _port(text: str, where: str, problems: list[str]) -> int:
    try:
        value = int(text)
    except ValueError:
        problems.append(f"{where}: port {text!r} is not a number")
        return 0
    if not 1 <= value <= 65535:
        problems.append(f"{where}: port {value} is outside 1-65535")
        return 0
    return value


def _port_proto(text: str, where: str, problems: list[str]) -> tuple[int, str]:
    port, _, proto = text.partition("/")
    protocol = (proto or "tcp").upper()
    if protocol not in ("TCP", "UDP"):
        problems.append(f"{where}: protocol {proto!r} must be tcp or udp")
    return _port(port, where, problems), protocol


def _labels(text: str, where: str, problems: list[str]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for pair in text.split(","):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            problems.append(f"{where}: {pair!r} is not KEY=VALUE")
            continue
        if not LABEL_KEY.match(key) or len(key.split("/")[-1]) > 63:
            problems.append(f"{where}: {key!r} is not a valid label key")
        if not LABEL_VALUE.match(value) or len(value) > 63:
            problems.append(f"{where}: {value!r} is not a valid label value")
        out.append((key, value))
    return tuple(out)


def _namespace(ns: str, where: str, problems: list[str]) -> str:
    if not DNS_LABEL.match(ns) or len(ns) > 63:
        problems.append(f"{where}: namespace {ns!r} is not a DNS-1123 label")
    return ns


def parse_peer(text: str, problems: list[str]) -> Peer | None:
    """``app:NS/KEY=VALUE[,KEY=VALUE]`` — pods allowed to connect to the application."""
    where = f"--from {text}"
    kind, _, rest = text.partition(":")
    ns, slash, labels = rest.partition("/")
    if kind != "app" or not slash or not labels:
        problems.append(f"{where}: expected app:NAMESPACE/KEY=VALUE[,KEY=VALUE]")
        return None
    return Peer(_namespace(ns, where, problems), _labels(labels, where, problems))


def parse_egress(text: str, problems: list[str],
                 services: ServiceReader | None = None) -> Egress | None:
    """One ``--egress`` spec (see the module docstring). Problems are appended, not raised."""
    where = f"--egress {text}"
    kind, _, rest = text.partition(":")
    if kind == "world":
        port, proto = _port_proto(rest, where, problems)
        return Egress("world", port, proto)
    if kind in ("fqdn", "cidr"):
        target, colon, port_text = rest.rpartition(":")
        if not colon or not target:
            problems.append(f"{where}: expected {kind}:{kind.upper()}:PORT")
            return None
        port, proto = _port_proto(port_text, where, problems)
        if kind == "fqdn":
            name = target.rstrip(".")
            pattern = FQDN_PATTERN if "*" in name else FQDN_NAME
            if len(name) > 253 or not pattern.match(name) or "." not in name:
                problems.append(f"{where}: {target!r} is not a DNS name (or a `*` pattern)")
            return Egress("fqdn", port, proto, target=name)
        try:
            net = ipaddress.ip_network(target, strict=True)
        except ValueError as exc:
            problems.append(f"{where}: {target!r} is not a CIDR ({exc})")
            return None
        if net.prefixlen == 0:
            problems.append(f"{where}: {target} is the whole internet; say world:{port} instead")
        return Egress("cidr", port, proto, target=str(net))
    if kind in ("app", "svc"):
        head, colon, port_text = rest.rpartition(":")
        ns, slash, what = head.partition("/")
        if not colon or not slash or not what:
            form = "app:NS/KEY=VALUE:PORT" if kind == "app" else "svc:NS/NAME:PORT"
            problems.append(f"{where}: expected {form}")
            return None
        _namespace(ns, where, problems)
        port, proto = _port_proto(port_text, where, problems)
        if kind == "app":
            return Egress("app", port, proto, namespace=ns,
                          labels=_labels(what, where, problems))
        return _service_egress(ns, what, port, proto, where, problems, services)
    problems.append(f"{where}: unknown kind {kind!r} (use app:, svc:, fqdn:, world: or cidr:)")
    return None


def _service_egress(ns: str, name: str, port: int, proto: str, where: str,
                    problems: list[str], services: ServiceReader | None) -> Egress | None:
    if not DNS_LABEL.match(name):
        problems.append(f"{where}: {name!r} is not a Service name")
        return None
    if services is None:
        problems.append(f"{where}: svc: needs the cluster to read the Service's pod selector; "
                        "without one use app:NS/KEY=VALUE:PORT")
        return None
    svc = services.get("v1", "Service", name, ns)
    if svc is None:
        problems.append(f"{where}: there is no Service {ns}/{name}")
        return None
    selector = (svc.get("spec") or {}).get("selector") or {}
    if not selector:
        problems.append(f"{where}: Service {ns}/{name} has no pod selector; use cidr: or fqdn:")
        return None
    for sp in (svc.get("spec") or {}).get("ports") or []:
        if sp.get("port") == port and (sp.get("protocol") or "TCP") == proto:
            target = sp.get("targetPort", port)
            if isinstance(target, str) and not target.isdigit():
                return Egress("app", port, proto, namespace=ns,
                              labels=tuple(sorted(selector.items())), port_name=target)
            return Egress("app", int(target), proto, namespace=ns,
                          labels=tuple(sorted(selector.items())))
    problems.append(f"{where}: Service {ns}/{name} has no {proto} port {port}")
    return None


# -- the request -----------------------------------------------------------------------------------

@dataclass
class OnboardRequest:
    """The options of `lab.onboard`, as given."""

    name: str
    namespace: str
    port: str | int | None = None
    host: str | None = None
    egress: Sequence[str] = ()
    ingress_from: Sequence[str] = ()
    selector: str | None = None
    notes: list[str] = field(default_factory=list)


def build_spec(req: OnboardRequest, *, services: ServiceReader | None = None,
               namespace_exists: Callable[[str], bool] | None = None) -> AppSpec:
    """Validate every option and build the AppSpec. Raises OnboardError listing all problems.

    ``namespace_exists`` None means the cluster was not asked (``--out`` without a cluster): the
    caller says so in ``req.notes``.
    """
    problems: list[str] = []
    if not DNS_LABEL.match(req.name) or len(req.name) > 63:
        problems.append(f"name {req.name!r} is not a DNS-1123 label (lowercase letters, digits, "
                        "'-', at most 63)")
    elif len(f"lab-app-{req.name}") > 253:
        problems.append(f"name {req.name!r} is too long")
    if not req.namespace:
        problems.append("--namespace is required")
    else:
        _namespace(req.namespace, "--namespace", problems)
        if req.namespace in INFRA_NAMESPACES:
            problems.append(f"--namespace {req.namespace} is an infrastructure namespace "
                            "(excluded from the default deny); onboard applications elsewhere")
    port: int | None = None
    if req.port is not None and str(req.port) != "":
        port = _port(str(req.port), "--port", problems) or None
    if req.host is not None:
        host = req.host.removesuffix(".localhost")
        if not DNS_LABEL.match(host) or len(host) > 63:
            problems.append(f"--host {req.host!r} is not a DNS label (it is served as "
                            "<host>.localhost)")
        if req.port is None:
            problems.append("--host needs --port: the Gateway forwards to that port")
    peers = tuple(p for p in (parse_peer(t, problems) for t in req.ingress_from) if p)
    if req.ingress_from and req.port is None:
        problems.append("--from needs --port: peers may connect on that port only")
    egress = tuple(e for e in (parse_egress(t, problems, services) for t in req.egress) if e)
    selector: tuple[tuple[str, str], ...] = ()
    if req.selector:
        selector = _labels(req.selector, "--selector", problems)
    if req.port is not None and req.host is None and not req.ingress_from:
        problems.append("--port without --host or --from: nothing could reach it")
    if req.port is None and req.host is None and not req.ingress_from and not req.egress:
        problems.append("nothing to allow: give --host/--port, --from or --egress")
    if not problems and req.namespace and namespace_exists is not None \
            and not namespace_exists(req.namespace):
        problems.append(f"namespace {req.namespace!r} does not exist in the cluster "
                        f"(create it first: `kubectl create namespace {req.namespace}`)")
    if problems:
        raise OnboardError(problems)
    spec = AppSpec(name=req.name, namespace=req.namespace, port=port,
                   host=req.host.removesuffix(".localhost") if req.host else None,
                   egress=egress, ingress_from=peers, selector=selector)
    allow_all = find_allow_all([app_policy(spec)])
    if allow_all:  # cannot happen with the parsers above; a last line of defence
        raise OnboardError(allow_all)
    return spec


def http_route(app: AppSpec) -> Obj | None:
    """The application's HTTPRoute on the lab Gateway (None when it is not served)."""
    if not app.host or not app.port:
        return None
    return {
        "apiVersion": HTTPROUTE_API, "kind": "HTTPRoute",
        "metadata": {"name": app.name, "namespace": app.namespace,
                     "labels": {**MANAGED_BY, ONBOARD_LABEL: app.name}},
        "spec": {
            "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                            "name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE}],
            "hostnames": [app.hostname],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                       "backendRefs": [{"name": app.name, "port": app.port}]}],
        },
    }


def render_app(app: AppSpec) -> list[Obj]:
    route = http_route(app)
    return [app_policy(app)] + ([route] if route else [])


def onboarded_hosts(apps: Iterable[AppSpec]) -> list[str]:
    """The names the Gateway's certificate must carry (`<host>.localhost`), sorted."""
    return sorted({a.hostname for a in apps if a.hostname})


def hosts_in_cluster(kube: Any) -> list[str]:
    """Every hostname of the HTTPRoutes `lab.onboard` applied (for the certificate's dnsNames)."""
    routes = kube.list(HTTPROUTE_API, "HTTPRoute", label_selector=ONBOARD_LABEL)
    return sorted({h for r in routes for h in (r.get("spec") or {}).get("hostnames") or []})


@dataclass
class Outcome:
    objects: list[Obj]
    hosts: list[str]
    written: Path | None = None
    applied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write(objects: list[Obj], out_dir: Path, name: str) -> Path:
    from lab.steps.base import dump_yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    path.write_text(dump_yaml(objects))
    return path


def onboard(req: OnboardRequest, *, kube: Any | None, out_dir: Path | None = None) -> Outcome:
    """Validate, render, then write (``out_dir``) or apply. Nothing is applied on any problem."""
    from lab.kube import KubeError, Unreachable

    exists: Callable[[str], bool] | None = None
    services: ServiceReader | None = None
    notes = list(req.notes)
    if kube is not None:
        try:
            kube.version()

            def namespace_exists(ns: str) -> bool:
                return kube.get("v1", "Namespace", ns) is not None

            exists = namespace_exists
            services = kube
        except Unreachable as exc:
            if out_dir is None:
                raise LabError(f"cannot onboard {req.name!r}: the cluster does not answer "
                               f"({exc.message})",
                               "start the lab (`invoke lab.up`), or write the objects with "
                               "--out DIR") from exc
            notes.append("the cluster did not answer: namespace existence was not checked")
        except KubeError as exc:
            raise LabError(f"cannot onboard {req.name!r}: {exc.message}", exc.hint) from exc
    elif out_dir is not None:
        notes.append("no cluster asked (--out): namespace existence was not checked")
    spec = build_spec(req, services=services, namespace_exists=exists)
    objects = render_app(spec)
    outcome = Outcome(objects, onboarded_hosts([spec]), notes=notes)
    if spec.host:
        outcome.notes.append(
            f"the Gateway's certificate must name {spec.hostname}: add {spec.host!r} to "
            "gatewayHosts in the lab config and run `invoke lab.up` (the certs step reissues it)")
    if out_dir is not None:
        outcome.written = write(objects, out_dir, spec.name)
        if spec.host:
            outcome.notes.append(
                f"routes attach only from namespaces labelled {ROUTES_LABEL}=true: "
                f"`kubectl label namespace {spec.namespace} {ROUTES_LABEL}=true`")
        return outcome
    if kube is None:
        raise LabError("nothing to do: no cluster and no --out", "pass --out DIR")
    if spec.host:
        # A merge patch adds the one label and takes no ownership of the namespace's others.
        kube.patch("v1", "Namespace", spec.namespace,
                   {"metadata": {"labels": {ROUTES_LABEL: "true"}}})
        outcome.applied.append(f"Namespace {spec.namespace} labelled {ROUTES_LABEL}=true")
    for obj in objects:
        kube.apply(obj)
        outcome.applied.append(f"{obj['kind']} {obj['metadata']['namespace']}/"
                               f"{obj['metadata']['name']}")
    return outcome
