"""The policy matrix: the flows the zero-trust policies must allow or deny, as data.

The matrix lives in ``lab/data/policy-matrix.yaml`` (format described at its top). Each flow
names the verdict and how each side decides it (the source's egress, the destination's
ingress), so a test can ask Cilium's own policy engine whether an ingress drop really is an
ingress drop. The same data drives the live trials (``lab.steps.locked``, ``lab.verify``); a user
adds flows of their own in a file of the same shape.

This module only reads and checks the data: it has no opinion on what Cilium decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from lab import yamlio
from lab.errors import LabError

MATRIX_FILE = Path(__file__).with_name("data") / "policy-matrix.yaml"

Verdict = Literal["allowed", "denied"]
SideOutcome = Literal["allowed", "denied", "not-enforced", "n/a"]
Trial = Literal["tcp", "dns", "gateway-https", "relay-nodes", "relay-from-agent",
                "webhook-dry-run", "cert-manager-lease"]
When = Literal["always", "mesh"]
ENTITIES = ("world", "host", "remote-node", "kube-apiserver", "ingress", "health")
PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class Actor:
    """A flow's end: a pod (namespace + label selector) or an identity Cilium reserves."""

    name: str
    namespace: str = ""
    selector: Mapping[str, str] = field(default_factory=dict)
    container: str = ""
    entity: str = ""  # world, host, remote-node, kube-apiserver, ingress, health
    ip: str = ""  # where a live trial sends packets for a non-pod destination
    remote_cluster: bool = False  # a pod of another cluster of the mesh

    @property
    def is_pod(self) -> bool:
        return not self.entity

    @property
    def label_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.selector.items())


@dataclass(frozen=True)
class Flow:
    source: str
    destination: str
    port: int
    protocol: str
    expect: Verdict
    egress: SideOutcome
    ingress: SideOutcome
    why: str
    trial: Trial | None = None
    when: When = "always"

    def __str__(self) -> str:
        return f"{self.source} → {self.destination}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Matrix:
    actors: Mapping[str, Actor]
    flows: tuple[Flow, ...]

    def for_lab(self, *, mesh: bool) -> list[Flow]:
        return [f for f in self.flows if mesh or f.when == "always"]


class MatrixError(LabError):
    """A flows file that cannot be used; every problem is listed."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems),
                         "fix the flows named above (format: the top of "
                         "lab/data/policy-matrix.yaml)")


def _actor(name: str, raw: Any, problems: list[str]) -> Actor | None:
    where = f"actors.{name}"
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a mapping")
        return None
    known = {"namespace", "selector", "container", "entity", "ip", "remoteCluster"}
    for key in sorted(set(raw) - known):
        problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    entity = str(raw.get("entity") or "")
    if entity and entity not in ENTITIES:
        problems.append(f"{where}.entity: {entity!r} is not one of {', '.join(ENTITIES)}")
    selector = raw.get("selector") or {}
    if not entity and (not raw.get("namespace") or not isinstance(selector, dict)
                       or not selector):
        problems.append(f"{where}: a pod needs `namespace` and a non-empty `selector` mapping "
                        "(or give `entity` for a reserved identity)")
        return None
    return Actor(name=name, namespace=str(raw.get("namespace") or ""),
                 selector={str(k): str(v) for k, v in selector.items()},
                 container=str(raw.get("container") or ""), entity=entity,
                 ip=str(raw.get("ip") or ""), remote_cluster=bool(raw.get("remoteCluster")))


def _choice(raw: Mapping[str, Any], key: str, allowed: Sequence[str], where: str,
            problems: list[str], default: str | None = None) -> str:
    value = raw.get(key, default)
    if value not in allowed:
        problems.append(f"{where}.{key}: {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _flow(i: int, raw: Any, actors: Mapping[str, Actor], problems: list[str]) -> Flow | None:
    where = f"flows[{i}]"
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a mapping")
        return None
    known = {"from", "to", "port", "protocol", "expect", "egress", "ingress", "why", "trial",
             "when"}
    for key in sorted(set(raw) - known):
        problems.append(f"{where}: unknown key {key!r}")
    for key in ("from", "to"):
        if raw.get(key) not in actors:
            problems.append(f"{where}.{key}: unknown actor {raw.get(key)!r} (define it under "
                            "`actors`)")
    port = raw.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        problems.append(f"{where}.port: {port!r} is not a port (1-65535)")
    outcomes = get_args(SideOutcome)
    flow = Flow(
        source=str(raw.get("from")), destination=str(raw.get("to")), port=port or 0,
        protocol=_choice(raw, "protocol", PROTOCOLS, where, problems, "TCP"),
        expect=_choice(raw, "expect", get_args(Verdict), where, problems),  # type: ignore[arg-type]
        egress=_choice(raw, "egress", outcomes, where, problems),  # type: ignore[arg-type]
        ingress=_choice(raw, "ingress", outcomes, where, problems),  # type: ignore[arg-type]
        why=str(raw.get("why") or ""),
        trial=(_choice(raw, "trial", get_args(Trial), where, problems)  # type: ignore[arg-type]
               if raw.get("trial") is not None else None),
        when=_choice(raw, "when", get_args(When), where, problems, "always"),  # type: ignore[arg-type]
    )
    denied = "denied" in (flow.egress, flow.ingress)
    if flow.expect in get_args(Verdict) and denied != (flow.expect == "denied"):
        problems.append(f"{where}: expect {flow.expect!r} contradicts egress {flow.egress!r} / "
                        f"ingress {flow.ingress!r} (a flow is denied when either side denies)")
    if not flow.why:
        problems.append(f"{where}.why: say why the flow is allowed or denied")
    return flow


def parse(doc: Any, source: str, base: Mapping[str, Actor] | None = None) -> Matrix:
    """A matrix from a parsed YAML document; actors of ``base`` may be referred to."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise MatrixError(source, ["must be a mapping with `flows` (and optional `actors`)"])
    for key in sorted(set(doc) - {"actors", "flows"}):
        problems.append(f"unknown key {key!r} (known: actors, flows)")
    actors: dict[str, Actor] = dict(base or {})
    for name, raw in (doc.get("actors") or {}).items():
        actor = _actor(str(name), raw, problems)
        if actor:
            actors[actor.name] = actor
    raw_flows = doc.get("flows")
    if not isinstance(raw_flows, list) or not raw_flows:
        problems.append("`flows` must be a non-empty list")
        raw_flows = []
    flows = [f for i, raw in enumerate(raw_flows) if (f := _flow(i, raw, actors, problems))]
    seen: set[tuple[str, str, int, str]] = set()
    for f in flows:
        key = (f.source, f.destination, f.port, f.protocol)
        if key in seen:
            problems.append(f"flow {f} is listed twice")
        seen.add(key)
    if problems:
        raise MatrixError(source, problems)
    return Matrix(actors, tuple(flows))


def load(path: Path | None = None, base: Matrix | None = None) -> Matrix:
    """The lab's matrix, or a user's flows file (which may use the lab's actors)."""
    path = path or MATRIX_FILE
    try:
        doc = yamlio.load(path.read_text())
    except OSError as exc:
        raise MatrixError(str(path), [f"cannot read it: {exc.strerror}"]) from exc
    except yaml.YAMLError as exc:
        raise MatrixError(str(path), [f"not YAML: {exc}"]) from exc
    return parse(doc, str(path), base.actors if base else None)
