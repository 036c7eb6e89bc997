"""The zero-trust promise, judged by Cilium 1.18.4's own policy engine.

Every policy the lab renders (single cluster via `lab.render`, a mesh cluster as the `locked` step
renders it with the Docker subnets it records, each onboarding shape) goes to the oracle
(tests/support/oracle.py) together with pods labelled as the real manifests label them. Each flow
of lab/data/policy-matrix.yaml must get the verdict it names *and* the same outcome on each side
(the source's egress, the destination's ingress), so an ingress drop is proven as an ingress drop.
Hand-written mutations of the policies must each be caught.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab import logs
from lab.config import parse_config
from lab.matrix import Actor, Flow, load, parse
from lab.onboard import OnboardRequest, build_spec
from lab.policies import AppSpec, app_policy, find_allow_all, render_policies
from lab.state import Record, StateStore
from lab.steps.base import StepContext, Timeouts
from lab.steps.locked import locked_policies
from lab.tools import Tools
from tests.conftest import REPO
from tests.support.oracle import Scenario, judge, mismatches, oracle_binary, pod_templates

Obj = dict[str, Any]
MATRIX = load()
SINGLE = MATRIX.for_lab(mesh=False)
MESH = MATRIX.for_lab(mesh=True)
DOCKER_SUBNETS = ["172.18.0.0/16", "fc00:f853:ccd:e793::/64"]  # kind's default network


def _docs(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    """`invoke lab.render` of the shipped single-cluster config, as a user would run it."""
    out = tmp_path_factory.mktemp("render")
    subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO), "lab.render",
                    "--config", str(REPO / "config" / "lab.yaml"), "--out", str(out)],
                   check=True, capture_output=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    cluster = out / "lab"
    return {"policies": _docs(cluster / "locked" / "policies.yaml"),
            "pods": [*_docs(cluster / "locked" / "probes.yaml"),
                     *_docs(cluster / "certs" / "objects.yaml")]}


def mesh_policies(tmp_path: Path) -> list[Obj]:
    """What the `locked` step applies on the first cluster of config/mesh.yaml."""
    raw = yaml.safe_load((REPO / "config" / "mesh.yaml").read_text())
    raw["stateDir"] = str(tmp_path / ".lab")
    cfg = parse_config(raw, tmp_path / "mesh.yaml")
    log = logs.get("test")
    record = Record(cluster=cfg.clusters[0].name, facts={"dockerSubnets": DOCKER_SUBNETS})
    ctx = StepContext(cfg, cfg.clusters[0], StateStore(cfg.state_dir), record, Tools(None, log),
                      log, Timeouts())
    return locked_policies(ctx)


@pytest.fixture(scope="module")
def scenario(rendered: dict[str, list[Obj]]) -> Scenario:
    return Scenario(MATRIX.actors, pod_templates(rendered["pods"]))


@pytest.fixture(scope="module")
def single_verdicts(rendered: dict[str, list[Obj]], scenario: Scenario) -> dict[str, Obj]:
    got = judge(rendered["policies"], scenario.document(SINGLE))
    return {str(f): v for f, v in zip(SINGLE, got, strict=True)}


@pytest.fixture(scope="module")
def mesh_verdicts(tmp_path_factory: pytest.TempPathFactory, scenario: Scenario) -> dict[str, Obj]:
    got = judge(mesh_policies(tmp_path_factory.mktemp("mesh")), scenario.document(MESH))
    return {str(f): v for f, v in zip(MESH, got, strict=True)}


def _check(flow: Flow, got: Obj) -> None:
    assert not mismatches([flow], [got]), mismatches([flow], [got])[0]


# -- the matrix is what Cilium decides -------------------------------------------------------------

@pytest.mark.parametrize("flow", SINGLE, ids=str)
def test_single_cluster_flow(flow: Flow, single_verdicts: dict[str, Obj]) -> None:
    _check(flow, single_verdicts[str(flow)])


@pytest.mark.parametrize("flow", MESH, ids=str)
def test_mesh_cluster_flow(flow: Flow, mesh_verdicts: dict[str, Obj]) -> None:
    _check(flow, mesh_verdicts[str(flow)])


def test_the_matrix_covers_every_allowance_and_its_near_misses(
        mesh_verdicts: dict[str, Obj], tmp_path: Path) -> None:
    assert len(MATRIX.flows) >= 50
    policies = {p["metadata"]["name"] for p in mesh_policies(tmp_path)}
    allowing: set[str] = set()  # policies seen allowing one side of some flow
    for got in mesh_verdicts.values():
        for side in ("egress", "ingress"):
            if got[side] == "allowed":
                allowing |= {ref.rsplit("/", 1)[-1].rsplit(" ", 1)[-1]
                             for ref in got.get(f"{side}By") or []}
    # every named allowance is exercised by at least one flow it allows...
    assert policies <= allowing, f"never seen allowing a flow: {sorted(policies - allowing)}"
    # ...and every pod the lab protects is also the target of denied flows on its ingress
    ingress_denied = {f.destination for f in MESH if f.ingress == "denied"}
    protected = {"app-b", "echo", "kube-dns", "hubble-relay", "hubble-ui",
                 "cert-manager-webhook", "clustermesh-apiserver", "gateway"}
    assert protected <= ingress_denied
    # both directions of the default deny are shown against a source whose other side is open
    assert any(f.egress == "allowed" and f.ingress == "denied" and f.destination == "app-b"
               for f in MESH)
    assert any(f.egress == "denied" and f.ingress in ("not-enforced", "n/a") for f in MESH)
    sources = {f.source for f in MESH if f.destination == "app-b" and f.expect == "denied"}
    assert {"app-a", "app-c", "kube-dns", "world", "remote-node", "gateway",
            "remote-pod"} <= sources


def test_the_oracle_is_not_a_rubber_stamp() -> None:
    """Cilium's documented examples, with the verdicts its docs give (shared selftest)."""
    selftest = oracle_binary().parent / "selftest" / "selftest.sh"
    proc = subprocess.run(["sh", str(selftest)], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "ORACLE": str(oracle_binary())})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("rc=0") == 9


# -- mutations each fail ---------------------------------------------------------------------------

def _policy(policies: list[Obj], name: str) -> Obj:
    return next(p for p in policies if p["metadata"]["name"] == name)


def _envoy_from_cluster(ps: list[Obj]) -> None:
    _policy(ps, "lab-gateway-envoy")["spec"]["ingress"][0]["fromEntities"].append("cluster")


def _relay_any_port(ps: list[Obj]) -> None:
    _policy(ps, "lab-infra-hubble-relay")["spec"]["egress"][0].pop("toPorts")


def _coredns_from_world(ps: list[Obj]) -> None:
    _policy(ps, "lab-infra-coredns")["spec"]["ingress"][0]["fromEntities"].append("world")


def _cert_manager_api_any_port(ps: list[Obj]) -> None:
    _policy(ps, "lab-infra-cert-manager")["spec"]["egress"][0].pop("toPorts")


def _baseline_without_ingress(ps: list[Obj]) -> None:
    _policy(ps, "lab-default-deny")["spec"].pop("ingress")


def _hubble_ui_ingress_open(ps: list[Obj]) -> None:
    _policy(ps, "lab-infra-hubble-ui")["spec"].pop("ingress")


def _webhook_without_tunnel(ps: list[Obj]) -> None:
    _policy(ps, "lab-infra-cert-manager-webhook")["spec"]["ingress"][0]["fromEntities"] = [
        "kube-apiserver"]


def _probe_egress_gone(ps: list[Obj]) -> None:
    ps.remove(_policy(ps, "lab-probe-egress"))


def _echo_without_policy(ps: list[Obj]) -> None:
    ps.remove(_policy(ps, "lab-app-echo"))


def _mesh_etcd_from_world(ps: list[Obj]) -> None:
    _policy(ps, "lab-infra-clustermesh-apiserver")["spec"]["ingress"][1] = {
        "fromEntities": ["world"], "toPorts": [{"ports": [{"port": "2379", "protocol": "TCP"}]}]}


MUTATIONS: list[tuple[Callable[[list[Obj]], None], str]] = [
    (_envoy_from_cluster, "kube-dns → gateway:443/TCP"),
    (_relay_any_port, "hubble-relay → remote-node:4240/TCP"),
    (_coredns_from_world, "world → kube-dns:53/UDP"),
    (_cert_manager_api_any_port, "cert-manager → kube-apiserver:2379/TCP"),
    (_baseline_without_ingress, "world → app-b:8080/TCP"),
    (_hubble_ui_ingress_open, "kube-dns → hubble-ui:8081/TCP"),
    (_webhook_without_tunnel, "remote-node → cert-manager-webhook:10250/TCP"),
    (_probe_egress_gone, "app-c → app-b:8080/TCP"),
    (_echo_without_policy, "gateway → echo:8080/TCP"),
    (_mesh_etcd_from_world, "world → clustermesh-apiserver:2379/TCP"),
]


@pytest.mark.parametrize("mutate, flow", MUTATIONS, ids=[m.__name__.strip("_")
                                                          for m, _ in MUTATIONS])
def test_a_weakened_policy_is_caught(mutate: Callable[[list[Obj]], None], flow: str,
                                     scenario: Scenario, tmp_path: Path) -> None:
    policies = copy.deepcopy(mesh_policies(tmp_path))
    mutate(policies)
    found = mismatches(MESH, judge(policies, scenario.document(MESH)))
    assert any(line.startswith(f"{flow}:") for line in found), found


# -- onboarded applications -----------------------------------------------------------------------

SHOP = {
    "actors": {
        "api": {"namespace": "shop", "selector": {"app.kubernetes.io/name": "api"}},
        "db": {"namespace": "shop", "selector": {"app.kubernetes.io/name": "db"}},
        "web": {"namespace": "shop", "selector": {"app.kubernetes.io/name": "web"}},
        "quiet": {"namespace": "shop", "selector": {"app.kubernetes.io/name": "quiet"}},
        "stripe": {"entity": "world", "ip": "203.0.113.7"},
        "backups": {"entity": "world", "ip": "10.20.3.4"},
    },
    "flows": [
        {"from": "api", "to": "db", "port": 5432, "expect": "allowed", "egress": "allowed",
         "ingress": "allowed", "why": "the API's egress and the database's --from"},
        {"from": "api", "to": "db", "port": 5433, "expect": "denied", "egress": "denied",
         "ingress": "denied", "why": "wrong port"},
        {"from": "web", "to": "db", "port": 5432, "expect": "denied", "egress": "denied",
         "ingress": "denied", "why": "another app of the namespace"},
        {"from": "kube-dns", "to": "db", "port": 5432, "expect": "denied",
         "egress": "not-enforced", "ingress": "denied",
         "why": "a kube-system pod with open egress is refused at the database's ingress"},
        {"from": "gateway", "to": "db", "port": 5432, "expect": "denied", "egress": "allowed",
         "ingress": "denied", "why": "the database has no route"},
        {"from": "gateway", "to": "api", "port": 8080, "expect": "allowed", "egress": "allowed",
         "ingress": "allowed", "why": "the API is served through the Gateway"},
        {"from": "gateway", "to": "api", "port": 9090, "expect": "denied", "egress": "allowed",
         "ingress": "denied", "why": "on its port only"},
        {"from": "world", "to": "api", "port": 8080, "expect": "denied", "egress": "n/a",
         "ingress": "denied", "why": "only through the Gateway"},
        {"from": "api", "to": "world", "port": 443, "expect": "allowed", "egress": "allowed",
         "ingress": "n/a", "why": "world:443 asked for"},
        {"from": "api", "to": "world", "port": 80, "expect": "denied", "egress": "denied",
         "ingress": "n/a", "why": "world on 443 only"},
        {"from": "db", "to": "world", "port": 443, "expect": "denied", "egress": "denied",
         "ingress": "n/a", "why": "the database asked for no egress"},
        {"from": "db", "to": "kube-dns", "port": 53, "protocol": "UDP", "expect": "allowed",
         "egress": "allowed", "ingress": "allowed", "why": "DNS from the baseline"},
        {"from": "web", "to": "api", "port": 8080, "expect": "denied", "egress": "denied",
         "ingress": "denied", "why": "web asked for no egress to the API"},
        {"from": "app-a", "to": "api", "port": 8080, "expect": "denied", "egress": "denied",
         "ingress": "denied", "why": "another namespace's app"},
        {"from": "worker", "to": "backups", "port": 5432, "expect": "allowed",
         "egress": "allowed", "ingress": "n/a", "why": "cidr:10.20.0.0/16:5432 asked for"},
        {"from": "worker", "to": "stripe", "port": 5432, "expect": "denied", "egress": "denied",
         "ingress": "n/a", "why": "outside the CIDR asked for"},
        {"from": "worker", "to": "api", "port": 8080, "expect": "denied", "egress": "denied",
         "ingress": "denied",
         "why": "the worker's rule names api pods with tier=backend, which these are not"},
        {"from": "kube-dns", "to": "quiet", "port": 8080, "expect": "denied",
         "egress": "not-enforced", "ingress": "denied",
         "why": "an app with neither ingress nor egress still enforces ingress"},
        {"from": "quiet", "to": "world", "port": 443, "expect": "denied", "egress": "denied",
         "ingress": "n/a", "why": "and egress (DNS only, from the baseline)"},
    ],
}
SHAPES = {
    "api": OnboardRequest("api", "shop", port="8080", host="api",
                          egress=["app:shop/app.kubernetes.io/name=db:5432", "world:443"]),
    "db": OnboardRequest("db", "shop", port=5432,
                         ingress_from=["app:shop/app.kubernetes.io/name=api"]),
    "web": OnboardRequest("web", "shop", port=8080, host="web"),
    "worker": OnboardRequest("worker", "jobs", egress=[
        "cidr:10.20.0.0/16:5432", "app:shop/app.kubernetes.io/name=api,tier=backend:8080"],
        selector="app=worker,tier=batch"),
}


def test_onboarded_apps_are_reached_only_as_asked(rendered: dict[str, list[Obj]]) -> None:
    matrix = parse({**SHOP, "actors": {**SHOP["actors"], "worker": {
        "namespace": "jobs", "selector": {"app": "worker", "tier": "batch"}}}},
        "onboarding flows", MATRIX.actors)
    apps = [app_policy(build_spec(r)) for r in SHAPES.values()]
    apps.append(app_policy(AppSpec(name="quiet", namespace="shop")))  # no ingress, no egress
    assert find_allow_all(apps) == []
    extra_pods = [(a.namespace, dict(a.selector), "default")
                  for a in matrix.actors.values() if a.is_pod and a.namespace in ("shop", "jobs")]
    scenario = Scenario(matrix.actors, [*pod_templates(rendered["pods"]), *extra_pods])
    found = mismatches(matrix.flows, judge([*rendered["policies"], *apps],
                                           scenario.document(matrix.flows)))
    assert found == []


# -- allow-all detection ---------------------------------------------------------------------------

def _with(rule: Obj, kind: str = "CiliumNetworkPolicy", section: str = "egress") -> Obj:
    meta: Obj = {"name": "x"} | ({"namespace": "shop"} if kind == "CiliumNetworkPolicy" else {})
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta,
            "spec": {"endpointSelector": {"matchLabels": {"app": "x"}}, section: [rule]}}


@pytest.mark.parametrize("rule, kind, words", [
    ({"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}, "CiliumNetworkPolicy",
     "names no peer"),
    ({"toEndpoints": [{}]}, "CiliumClusterwideNetworkPolicy", "empty selector"),
    ({"toEndpoints": [{}]}, "CiliumNetworkPolicy", "empty selector"),
    ({"toEntities": ["all"]}, "CiliumNetworkPolicy", "`all` entity"),
    ({"toCIDR": ["0.0.0.0/0"]}, "CiliumNetworkPolicy", "0.0.0.0/0"),
    ({"toCIDRSet": [{"cidr": "::/0"}]}, "CiliumClusterwideNetworkPolicy", "::/0"),
    ({"toEndpoints": []}, "CiliumNetworkPolicy", "names no peer"),
])
def test_find_allow_all_refuses_real_allow_alls(rule: Obj, kind: str, words: str) -> None:
    problems = find_allow_all([_with(rule, kind)])
    assert problems and words in problems[0], problems


def test_find_allow_all_accepts_the_empty_deny_rule_and_port_scoped_forms() -> None:
    assert find_allow_all([_with({}, section="ingress"), _with({})]) == []
    ports = [{"ports": [{"port": "443", "protocol": "TCP"}]}]
    assert find_allow_all([_with({"toEntities": ["all"], "toPorts": ports}),
                           _with({"toCIDR": ["0.0.0.0/0"], "toPorts": ports})]) == []


def test_every_rendered_policy_is_free_of_allow_alls(tmp_path: Path) -> None:
    assert find_allow_all([*render_policies(), *mesh_policies(tmp_path)]) == []


def test_matrix_actors_match_real_pods(scenario: Scenario) -> None:
    """Each pod actor's selector finds a pod the lab or the charts really run (the Scenario
    asserts it); the probes and the demo app come from `lab.render`, not from the matrix."""
    assert {n for n, a in MATRIX.actors.items() if a.is_pod} == set(scenario.endpoints)
    assert scenario.endpoints["app-c"]["namespace"] == "lab-probe-c"
    assert isinstance(MATRIX.actors["gateway"], Actor)
