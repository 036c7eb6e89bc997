"""The `locked` step: zero-trust policies, the policy matrix, onboarding, the gate.

Offline: the rendered policies validate against the pinned Cilium 1.18.4 CRDs (unknown fields are
errors). What they allow and deny is judged by Cilium's own engine in tests/test_policy_oracle.py.
Onboarding output for several application shapes validates the same way; bad input is refused
before anything reaches the API (the API front records every write). The gate runs against a
real API server with scripted agents, probe pods and a Hubble that keeps the flows each attempt
makes.

The same matrix is tried for real, flow by flow, in tests/e2e/test_30_policy_matrix.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from invoke.context import Context
from invoke.exceptions import Exit

from lab import logs, yamlio
from lab.config import parse_config
from lab.errors import LabError
from lab.matrix import load as load_matrix
from lab.onboard import (
    OnboardError,
    OnboardRequest,
    build_spec,
    hosts_in_cluster,
    http_route,
    onboard,
    render_app,
)
from lab.policies import (
    CCNP,
    CILIUM_API,
    CNP,
    DEFAULT_DENY,
    NS,
    STEP_LABEL,
    app_policy,
    find_allow_all,
    render_policies,
)
from lab.state import Record, StateStore
from lab.steps.base import StepContext, Timeouts, Verdict
from lab.steps.locked import (
    PROBE_IMAGE,
    PROBE_NAMESPACES,
    PROBE_POD,
    LockedStep,
    agent_realized,
    connect_outcome,
    find_policy_drop,
    is_policy_drop,
    kube_exec,
    locked_policies,
    parse_endpoints,
    parse_hubble_flows,
    parse_policy_get,
    probe_objects,
    try_flow,
)
from lab.tasks.apps import onboard as onboard_task
from lab.tools import Tools
from tests.conftest import REPO, step_context
from tests.support.apifront import ApiFront
from tests.support.upstream import require_upstream, validate_object

Obj = dict[str, Any]
FAST = Timeouts(locked=2, poll_start=0.01, poll_max=0.05)


def all_rendered() -> list[Obj]:
    return [*render_policies(), *render_policies(mesh=True),
            *render_policies(mesh=True, mesh_peer_cidrs=["172.18.0.0/16"])]


# -- schema validity and no allow-all --------------------------------------------------------------

@pytest.mark.parametrize("policy", all_rendered(),
                         ids=lambda p: f"{p['kind']}:{p['metadata']['name']}")
def test_rendered_policy_validates_against_the_pinned_crd(policy: Obj) -> None:
    require_upstream()
    assert validate_object(policy) == []


def test_validation_really_rejects_unknown_fields() -> None:
    require_upstream()
    bad = copy.deepcopy(render_policies()[0])
    bad["spec"]["egress"][0]["toEndpoint"] = bad["spec"]["egress"][0].pop("toEndpoints")
    assert any("toEndpoint" in e for e in validate_object(bad))
    bad = copy.deepcopy(render_policies()[0])
    bad["spec"]["enableDefaultDeny"]["both"] = True
    assert validate_object(bad)


def _walk_rules(policy: Obj) -> Iterator[tuple[str, Any]]:
    for spec in [policy.get("spec") or {}, *(policy.get("specs") or [])]:
        for section in ("ingress", "egress", "ingressDeny", "egressDeny"):
            for rule in spec.get(section) or []:
                yield section, rule


def test_no_rule_is_peerless_anywhere() -> None:
    """Independent of find_allow_all: every rule is the empty deny rule of an ingress section or
    names a peer; every selector selects."""
    peers = {"ingress": ("fromEndpoints", "fromEntities", "fromCIDRSet"),
             "egress": ("toEndpoints", "toEntities", "toCIDRSet", "toFQDNs")}
    for policy in all_rendered():
        for section, rule in _walk_rules(policy):
            assert isinstance(rule, dict), policy["metadata"]["name"]
            if rule == {} and section == "ingress":
                continue
            assert any(rule.get(k) for k in peers[section]), (policy["metadata"]["name"], rule)
            for key in ("fromEndpoints", "toEndpoints"):
                for sel in rule.get(key) or []:
                    assert sel.get("matchLabels") or sel.get("matchExpressions")
            assert "all" not in (rule.get("fromEntities") or []) + (rule.get("toEntities") or [])
        assert policy["spec"]["endpointSelector"], "an empty endpointSelector selects everything"
    assert find_allow_all(all_rendered()) == []


def test_baseline_shape() -> None:
    policies = render_policies()
    baseline = policies[0]
    assert (baseline["kind"], baseline["metadata"]["name"]) == (CCNP, DEFAULT_DENY)
    spec = baseline["spec"]
    assert spec["enableDefaultDeny"] == {"ingress": True, "egress": True}
    assert spec["ingress"] == [{}]  # what enforces ingress (enableDefaultDeny alone does not)
    (dns,) = spec["egress"]
    assert dns["toEndpoints"] == [{"matchLabels": {NS: "kube-system",
                                                   "k8s:k8s-app": "kube-dns"}}]
    ports = dns["toPorts"][0]["ports"]
    assert {(p["port"], p["protocol"]) for p in ports} == {("53", "UDP"), ("53", "TCP")}
    assert dns["toPorts"][0]["rules"] == {"dns": [{"matchPattern": "*"}]}
    exprs = spec["endpointSelector"]["matchExpressions"]
    assert {"key": NS, "operator": "Exists"} in exprs
    notin = next(e for e in exprs if e["operator"] == "NotIn")
    assert {"kube-system", "cert-manager", "lab-gateway"} <= set(notin["values"])
    for p in policies:
        assert p["spec"]["description"] and "\n" not in p["spec"]["description"]
        assert p["metadata"]["labels"][STEP_LABEL] == "locked"


# -- onboarding ------------------------------------------------------------------------------------

SHAPES: dict[str, OnboardRequest] = {
    "web": OnboardRequest("web", "shop", port=8080, host="web"),
    "api": OnboardRequest("api", "shop", port="8080", host="api",
                          egress=["app:shop/app.kubernetes.io/name=db:5432",
                                  "fqdn:api.stripe.com:443", "fqdn:*.s3.amazonaws.com:443",
                                  "world:443"]),
    "db": OnboardRequest("db", "shop", port=5432,
                         ingress_from=["app:shop/app.kubernetes.io/name=api"]),
    "worker": OnboardRequest("worker", "jobs",
                             egress=["cidr:10.20.0.0/16:5432", "world:123/udp",
                                     "app:shop/app.kubernetes.io/name=api,tier=backend:8080"],
                             selector="app=worker,tier=batch"),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_onboarding_output_validates(shape: str) -> None:
    require_upstream()
    spec = build_spec(SHAPES[shape])
    objects = render_app(spec)
    assert objects[0]["kind"] == CNP and objects[0]["metadata"]["name"] == f"lab-app-{shape}"
    for obj in objects:
        assert validate_object(obj) == [], obj["kind"]
    assert find_allow_all(objects[:1]) == []
    route = http_route(spec)
    if spec.host:
        assert route is not None and route["spec"]["hostnames"] == [f"{spec.host}.localhost"]
        assert route["spec"]["parentRefs"][0] | {} == {
            "group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "lab",
            "namespace": "lab-gateway"}
        assert route["spec"]["rules"][0]["backendRefs"] == [{"name": shape, "port": spec.port}]
    else:
        assert route is None and len(objects) == 1


@pytest.mark.parametrize("req, words", [
    (OnboardRequest("Web", "shop", port=80, host="web"), "not a DNS-1123 label"),
    (OnboardRequest("-web", "shop", port=80, host="web"), "not a DNS-1123 label"),
    (OnboardRequest("w" * 64, "shop", port=80, host="web"), "not a DNS-1123 label"),
    (OnboardRequest("web", "shop", port=0, host="web"), "outside 1-65535"),
    (OnboardRequest("web", "shop", port=65536, host="web"), "outside 1-65535"),
    (OnboardRequest("web", "shop", port="http", host="web"), "not a number"),
    (OnboardRequest("web", "Shop", port=80, host="web"), "not a DNS-1123 label"),
    (OnboardRequest("web", "", port=80, host="web"), "--namespace is required"),
    (OnboardRequest("web", "kube-system", port=80, host="web"), "infrastructure namespace"),
    (OnboardRequest("web", "shop", host="web"), "--host needs --port"),
    (OnboardRequest("web", "shop", port=80, host="web.example.com"), "not a DNS label"),
    (OnboardRequest("db", "shop", ingress_from=["app:shop/app=api"]), "--from needs --port"),
    (OnboardRequest("db", "shop", port=5432, ingress_from=["shop/app=api"]), "expected app:"),
    (OnboardRequest("db", "shop", port=5432), "nothing could reach it"),
    (OnboardRequest("x", "shop"), "nothing to allow"),
    (OnboardRequest("x", "shop", egress=["ftp:host:21"]), "unknown kind"),
    (OnboardRequest("x", "shop", egress=["world:99999"]), "outside 1-65535"),
    (OnboardRequest("x", "shop", egress=["world:53/icmp"]), "tcp or udp"),
    (OnboardRequest("x", "shop", egress=["cidr:10.0.0.1/8:80"]), "not a CIDR"),
    (OnboardRequest("x", "shop", egress=["cidr:0.0.0.0/0:80"]), "whole internet"),
    (OnboardRequest("x", "shop", egress=["fqdn:not a name:443"]), "not a DNS name"),
    (OnboardRequest("x", "shop", egress=["fqdn:443"]), "expected fqdn:"),
    (OnboardRequest("x", "shop", egress=["app:shop/app=db"]), "expected app:"),
    (OnboardRequest("x", "shop", egress=["app:shop/app=-db-:5432"]), "not a valid label value"),
    (OnboardRequest("x", "shop", egress=["svc:shop/db:5432"]), "needs the cluster"),
    (OnboardRequest("x", "shop", egress=["world:443"], selector="app"), "not KEY=VALUE"),
])
def test_bad_input_is_refused(req: OnboardRequest, words: str) -> None:
    with pytest.raises(OnboardError) as err:
        build_spec(req)
    assert words in str(err.value), str(err.value)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(OnboardError) as err:
        build_spec(OnboardRequest("Bad", "kube-system", port=0, host="x",
                                  egress=["nope:1", "world:0"]))
    assert len(err.value.problems) >= 4


# -- onboarding against a real API server ----------------------------------------------------------

def _crd_docs(*files: Path) -> list[Obj]:
    return [d for f in files for d in yamlio.load_all(f.read_text())
            if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"]


@pytest.fixture
def emu(kube_api: ApiFront) -> ApiFront:
    """A real API server with the pinned CRDs and the cert-manager namespace."""
    kube_api.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "cert-manager"}})
    return kube_api


def kube_for(emu: ApiFront, tmp_path: Path) -> Any:
    from lab.kube import KubeClient

    path = emu.write_kubeconfig(tmp_path / "kubeconfig", context="kind-lab")
    return KubeClient("kind-lab", str(path))


def _namespace(emu: ApiFront, name: str) -> None:
    emu.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


def test_onboard_applies_the_policy_and_route(emu: ApiFront, tmp_path: Path) -> None:
    _namespace(emu, "shop")
    kube = kube_for(emu, tmp_path)
    out = onboard(copy.deepcopy(SHAPES["api"]), kube=kube)
    assert out.hosts == ["api.localhost"] and out.written is None
    cnp = emu.get(CILIUM_API, CNP, "lab-app-api", "shop")
    route = emu.get("gateway.networking.k8s.io/v1", "HTTPRoute", "api", "shop")
    assert cnp is not None and route is not None
    assert cnp["spec"] == app_policy(build_spec(SHAPES["api"]))["spec"]
    ns = emu.get("v1", "Namespace", "shop")
    assert ns is not None and ns["metadata"]["labels"]["lab.kind-cilium/routes"] == "true"
    assert hosts_in_cluster(kube) == ["api.localhost"]
    onboard(copy.deepcopy(SHAPES["api"]), kube=kube)  # idempotent
    assert len(emu.list(CILIUM_API, CNP, "shop")) == 1


def test_unknown_namespace_is_refused_before_any_write(emu: ApiFront,
                                                       tmp_path: Path) -> None:
    kube = kube_for(emu, tmp_path)
    emu.clear_requests()
    with pytest.raises(OnboardError, match="does not exist in the cluster"):
        onboard(copy.deepcopy(SHAPES["web"]), kube=kube)
    with pytest.raises(OnboardError, match="outside 1-65535"):
        onboard(OnboardRequest("web", "shop", port=70000, host="web"), kube=kube)
    assert emu.writes() == []


def test_svc_egress_is_resolved_to_the_services_pods(emu: ApiFront, tmp_path: Path) -> None:
    _namespace(emu, "shop")
    emu.put({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "shop"},
             "spec": {"selector": {"app.kubernetes.io/name": "db"},
                      "ports": [{"name": "pg", "port": 5432, "targetPort": "postgres",
                                 "protocol": "TCP"},
                                {"name": "m", "port": 9187, "targetPort": 9100}]}})
    kube = kube_for(emu, tmp_path)
    spec = build_spec(OnboardRequest("api", "shop", egress=["svc:shop/db:5432",
                                                            "svc:shop/db:9187"]),
                      services=kube)
    rules = app_policy(spec)["spec"]["egress"]
    assert rules[0] == {"toEndpoints": [{"matchLabels": {NS: "shop",
                                                         "k8s:app.kubernetes.io/name": "db"}}],
                        "toPorts": [{"ports": [{"port": "postgres", "protocol": "TCP"}]}]}
    assert rules[1]["toPorts"][0]["ports"][0]["port"] == "9100"
    require_upstream()
    assert validate_object(app_policy(spec)) == []
    for bad, words in (("svc:shop/nope:5432", "no Service shop/nope"),
                       ("svc:shop/db:1234", "no TCP port 1234")):
        with pytest.raises(OnboardError, match=words):
            build_spec(OnboardRequest("api", "shop", egress=[bad]), services=kube)


def test_out_without_a_cluster_writes_and_says_what_was_not_checked(tmp_path: Path) -> None:
    from lab.kube import KubeClient

    kube = KubeClient("kind-nowhere", str(tmp_path / "missing-kubeconfig"))
    out = onboard(copy.deepcopy(SHAPES["db"]), kube=kube, out_dir=tmp_path / "out")
    assert out.written == tmp_path / "out" / "db.yaml"
    docs = list(yaml.safe_load_all(out.written.read_text()))
    assert [d["kind"] for d in docs] == [CNP]
    assert any("not checked" in n for n in out.notes)
    with pytest.raises(LabError, match="does not answer"):
        onboard(copy.deepcopy(SHAPES["db"]), kube=kube)


def test_onboard_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LAB_KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    cfg = str(REPO / "config" / "lab.yaml")
    onboard_task(Context(), "shop-api", namespace="shop", port="8080", host="shop",
                 egress=["app:shop/app.kubernetes.io/name=db:5432"],
                 from_=None, out=str(tmp_path), config=cfg, log_format="json")
    printed = capsys.readouterr().out
    assert "wrote" in printed and "shop.localhost" in printed
    assert (tmp_path / "shop-api.yaml").exists()
    with pytest.raises(Exit) as err:
        onboard_task(Context(), "shop-api", namespace="shop", port="99999", host="shop",
                     out=str(tmp_path / "x"), config=cfg, log_format="json")
    assert err.value.code == 1 and "65535" in capsys.readouterr().err  # the one JSON event
    assert not (tmp_path / "x").exists()
    with pytest.raises(Exit, match="--namespace is required"):
        onboard_task(Context(), "shop-api", config=cfg, log_format="json")


# -- parsing what agents and Hubble say ------------------------------------------------------------

# Shapes recorded from real `hubble observe -o json` runs: Cilium's own docs (Hubble exporter
# page, a kind cluster) and a k3d capture (with identity, labels, Type, Summary); one line per
# GetFlowsResponse, the flow under "flow".
HUBBLE_LINES = "\n".join([
    json.dumps({"flow": {"time": "2023-08-21T12:12:18.510175415Z", "verdict": "DROPPED",
                         "IP": {"source": "10.244.1.60", "destination": "10.244.1.5",
                                "ipVersion": "IPv4"},
                         "l4": {"TCP": {"source_port": 44916, "destination_port": 80,
                                        "flags": {"SYN": True}}},
                         "source": {"namespace": "default", "pod_name": "xwing"},
                         "destination": {"namespace": "default",
                                         "pod_name": "deathstar-7848d6c4d5-th9v2"},
                         "node_name": "kind-kind/kind-worker",
                         "drop_reason_desc": "POLICY_DENIED"},
                "node_name": "kind-kind/kind-worker", "time": "2023-08-21T12:12:18.510175415Z"}),
    json.dumps({"flow": {"time": "2026-09-20T14:56:45.779111730Z",
                         "uuid": "2848b6b6-59c0-4be2-8bdc-3a5861de4c68", "verdict": "DROPPED",
                         "drop_reason": 133,
                         "IP": {"source": "10.244.0.116", "destination": "10.244.0.117",
                                "ipVersion": "IPv4"},
                         "l4": {"TCP": {"source_port": 38160, "destination_port": 8080,
                                        "flags": {"SYN": True}}},
                         "source": {"ID": 4070, "identity": 60176, "namespace": "lab-probe-a",
                                    "labels": ["k8s:app.kubernetes.io/name=lab-probe"],
                                    "pod_name": "probe"},
                         "destination": {"ID": 2376, "identity": 10337,
                                         "namespace": "lab-probe-b", "pod_name": "probe"},
                         "Type": "L3_L4", "node_name": "lab-control-plane",
                         "traffic_direction": "EGRESS", "Summary": "TCP Flags: SYN"},
                "node_name": "lab-control-plane", "time": "2026-09-20T14:56:45.779111730Z"}),
    json.dumps({"flow": {"verdict": "DROPPED", "drop_reason_desc": "POLICY_DENY",
                         "traffic_direction": "INGRESS",
                         "IP": {"source": "10.244.0.9", "destination": "10.244.0.10"},
                         "l4": {"UDP": {"source_port": 5353, "destination_port": 53}},
                         "source": {"namespace": "a"}, "destination": {"namespace": "b"},
                         "ingress_denied_by": [{"name": "deny-dns", "namespace": "b",
                                                "kind": "CiliumNetworkPolicy"}]}}),
    json.dumps({"flow": {"verdict": "DROPPED", "drop_reason_desc": "INVALID_SOURCE_IP",
                         "IP": {"source": "fe80::1", "destination": "ff02::2"},
                         "l4": {"ICMPv6": {"type": 133}}, "source": {}, "destination": {}}}),
    json.dumps({"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": 3}}),
    "Defaulted container \"cilium-agent\" out of: cilium-agent, config (init)",
    "{not json",
])


def test_parse_hubble_flows_on_recorded_output() -> None:
    flows = parse_hubble_flows(HUBBLE_LINES)
    assert len(flows) == 4
    first, probe, deny, _other = flows
    assert first["reason"] == "POLICY_DENIED" and first["dst_port"] == 80
    assert first["src_pod"] == "xwing" and first["node"] == "kind-kind/kind-worker"
    assert probe["reason"] == "POLICY_DENIED"  # from the numeric drop_reason 133
    assert (probe["direction"], probe["protocol"], probe["dst_ip"]) == (
        "EGRESS", "TCP", "10.244.0.117")
    assert deny["denied_by"] == ["CiliumNetworkPolicy b/deny-dns"] and deny["protocol"] == "UDP"
    assert [is_policy_drop(f) for f in flows] == [True, True, True, False]
    hit = find_policy_drop(flows, src_namespace="lab-probe-a", src_pod="probe",
                           dst_ip="10.244.0.117", dst_port=8080)
    assert hit is probe
    assert find_policy_drop(flows, src_namespace="lab-probe-a", src_pod="probe",
                            dst_ip="10.244.0.117", dst_port=8081) is None
    assert parse_hubble_flows("") == []


def test_connect_outcomes() -> None:
    assert connect_outcome(0, "") == "allowed"
    assert connect_outcome(1, "REFUSED\n") == "allowed"  # the packet got there
    assert connect_outcome(1, "TIMEOUT\n") == "denied"
    assert connect_outcome(1, "DNS: lookup x: no such host") == "error"


def _policy_get(names: list[str], revision: int) -> str:
    rules = [{"endpointSelector": {"matchLabels": {"any:app": "x"}},
              "labels": [{"key": "io.cilium.k8s.policy.derived-from",
                          "value": "CiliumNetworkPolicy", "source": "k8s"},
                         {"key": "io.cilium.k8s.policy.name", "value": n, "source": "k8s"}]}
             for n in names]
    return json.dumps({"policy": json.dumps(rules, indent=2), "revision": revision})


def _endpoints(*revs: tuple[str, int]) -> str:
    return json.dumps([{"id": i + 100, "status": {"state": state, "policy": {
        "realized": {"policy-revision": rev}, "spec": {"policy-revision": rev}}}}
        for i, (state, rev) in enumerate(revs)])


def test_agent_realization() -> None:
    assert parse_policy_get(_policy_get(["a", "b"], 7)) == (7, {"a", "b"})
    assert parse_policy_get("garbage") is None
    assert parse_endpoints(_endpoints(("ready", 3))) == [(100, "ready", 3)]

    def agent(names: list[str], *eps: tuple[str, int]) -> Any:
        def run(ns: str, pod: str, container: str | None, argv: list[str]) -> tuple[int, str]:
            assert (ns, container) == ("kube-system", "cilium-agent")
            if argv[:3] == ["cilium-dbg", "policy", "get"]:
                return 0, _policy_get(names, 9)
            return 0, _endpoints(*eps)
        return run

    ok, detail = agent_realized(agent(["a", "b"], ("ready", 9), ("ready", 10)), "cilium-x",
                                {"a", "b"})
    assert ok, detail
    ok, detail = agent_realized(agent(["a"], ("ready", 9)), "cilium-x", {"a", "b"})
    assert not ok and "b" in detail
    ok, detail = agent_realized(agent(["a"], ("ready", 8), ("regenerating", 9)), "cilium-x",
                                {"a"})
    assert not ok and "100, 101" in detail
    ok, detail = agent_realized(lambda *a: (1, "command not found"), "cilium-x", {"a"})
    assert not ok and "policy get" in detail


def test_kube_exec_adapter(emu: ApiFront, tmp_path: Path) -> None:
    _namespace(emu, "n")
    emu.put({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"},
             "spec": {"containers": [{"name": "c", "image": "x"}]}})
    emu.on_exec(lambda ns, pod, container, argv: (1, "out ", "err")
                if (ns, pod, container, argv) == ("n", "p", "c", ["x"]) else (9, "", "wrong"))
    run = kube_exec(kube_for(emu, tmp_path))
    assert run("n", "p", "c", ["x"]) == (1, "out err")
    assert run("n", "missing", "c", ["x"])[0] == -1  # an API error is a failed trial


# -- the step: render, apply, gate -----------------------------------------------------------------

def make_ctx(tmp_path: Path, emu: ApiFront | None = None, **top: Any) -> StepContext:
    raw = yaml.safe_load((REPO / "config" / "lab.yaml").read_text())
    raw.update(top)
    ctx: StepContext = step_context(tmp_path, raw, emu, FAST)
    return ctx


def test_render_is_pure_and_complete(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    rendered = LockedStep().render(ctx)
    names = {o["metadata"]["name"] for o in rendered.objects if o["apiVersion"] == CILIUM_API}
    assert {DEFAULT_DENY, "lab-gateway-envoy", "lab-infra-coredns", "lab-infra-hubble-relay",
            "lab-infra-hubble-ui", "lab-infra-cert-manager", "lab-infra-cert-manager-webhook",
            "lab-app-echo", "lab-probe-egress"} == names  # single cluster: no clustermesh policy
    assert set(rendered.files) == {"locked/policies.yaml", "locked/probes.yaml"}
    require_upstream()
    for obj in rendered.objects:
        assert validate_object(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"
    assert not (tmp_path / ".lab").exists()


def test_mesh_adds_the_clustermesh_allowance_from_the_docker_subnet(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "config" / "mesh.yaml").read_text())
    raw["stateDir"] = str(tmp_path / ".lab")
    cfg = parse_config(raw, tmp_path / "mesh.yaml")
    log = logs.get("test")
    record = Record(cluster=cfg.clusters[0].name, facts={"dockerSubnets": ["172.18.0.0/16"]})
    ctx = StepContext(cfg, cfg.clusters[0], StateStore(cfg.state_dir), record,
                      Tools(None, log), log, FAST)
    mesh = next(p for p in locked_policies(ctx)
                if p["metadata"]["name"] == "lab-infra-clustermesh-apiserver")
    assert mesh["spec"]["ingress"][1]["fromCIDRSet"] == [{"cidr": "172.18.0.0/16"}]


def test_mesh_without_recorded_subnets_stays_closed(emu: ApiFront, tmp_path: Path) -> None:
    """`lab.render` (no Docker) leaves the remote rule out, and apply refuses, rather than open
    the mesh's etcd to the world."""
    raw = yaml.safe_load((REPO / "config" / "mesh.yaml").read_text())
    ctx = step_context(tmp_path, raw, emu, FAST)
    mesh = next(p for p in locked_policies(ctx)
                if p["metadata"]["name"] == "lab-infra-clustermesh-apiserver")
    assert mesh["spec"]["ingress"] == [{"fromEntities": ["host", "remote-node"], "toPorts": [
        {"ports": [{"port": "2379", "protocol": "TCP"}]}]}]
    _namespace(emu, "echo")
    emu.clear_requests()
    with pytest.raises(LabError, match="Docker subnets"):
        LockedStep().apply(ctx)
    assert emu.writes() == []


class FakeCluster:
    """Agents, probe pods and Hubble as a healthy locked cluster would answer.

    Hubble keeps a flow for every connection attempt, stamped with the time it was made, and
    answers `hubble observe --from-pod NS/POD --since T` with that pod's flows since T — so a
    check that ignored --since, or an old drop, shows up as a failure.
    """

    # which side drops a probe's connection to lab-probe-b: a's egress, c's target's ingress
    DROPS_AT: ClassVar[dict[str, str]] = {"lab-probe-a": "EGRESS", "lab-probe-c": "INGRESS"}

    def __init__(self, emu: ApiFront, policies: list[str]) -> None:
        self.emu = emu
        self.policies = list(policies)
        self.connect = (1, "TIMEOUT\n")
        self.dns = (0, "Name: kubernetes.default.svc.cluster.local\nAddress: 10.96.0.1\n")
        self.drops = True  # Hubble records what happens
        self.drops_at = dict(self.DROPS_AT)
        self.flows: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str, list[str]]] = []

    def seed(self) -> None:
        e = self.emu
        e.put({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "lab-control-plane"}})
        e.put({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "cilium-abcde", "namespace": "kube-system",
                            "labels": {"k8s-app": "cilium"}},
               "spec": {"nodeName": "lab-control-plane",
                        "containers": [{"name": "cilium-agent", "image": "x"}]},
               "status": {"phase": "Running",
                          "conditions": [{"type": "Ready", "status": "True"}]}})
        e.put({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "hubble-relay", "namespace": "kube-system"},
               "spec": {"clusterIP": "10.96.10.10", "ports": [{"port": 80}]}})
        for i, ns in enumerate(PROBE_NAMESPACES):
            e.patch_status("v1", "Pod", PROBE_POD, ns, {
                "phase": "Running", "podIP": f"10.244.0.{116 + i}",  # as in HUBBLE_LINES
                "conditions": [{"type": "Ready", "status": "True"}]})

    def record(self, ns: str, pod: str, target: str, when: datetime | None = None) -> None:
        ip, port = target.rsplit(":", 1)
        denied = self.connect[0] != 0 and "TIMEOUT" in self.connect[1]
        flow: dict[str, Any] = {
            "time": (when or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "verdict": "DROPPED" if denied else "FORWARDED",
            "IP": {"source": "10.244.0.1", "destination": ip},
            "l4": {"TCP": {"source_port": 40000, "destination_port": int(port)}},
            "source": {"namespace": ns, "pod_name": pod}, "destination": {},
            "traffic_direction": self.drops_at.get(ns, "EGRESS") if denied else "EGRESS",
            "node_name": "lab-control-plane", "is_reply": False}
        if denied:
            flow["drop_reason_desc"] = "POLICY_DENIED"
        self.flows.append(flow)

    def observe(self, argv: list[str]) -> str:
        ns, pod = argv[argv.index("--from-pod") + 1].split("/")
        since = datetime.fromisoformat(argv[argv.index("--since") + 1].replace("Z", "+00:00"))
        return "\n".join(json.dumps({"flow": f}) for f in self.flows
                         if f["source"] == {"namespace": ns, "pod_name": pod}
                         and datetime.fromisoformat(f["time"].replace("Z", "+00:00")) >= since)

    def exec(self, ns: str, pod: str, container: str | None, argv: list[str]) -> tuple[int, str]:
        self.calls.append((ns, pod, argv))
        if argv[:3] == ["cilium-dbg", "policy", "get"]:
            return 0, _policy_get(self.policies, 12)
        if argv[:3] == ["cilium-dbg", "endpoint", "list"]:
            return 0, _endpoints(("ready", 12), ("ready", 12))
        if argv[:2] == ["/agnhost", "connect"]:
            if self.drops:
                self.record(ns, pod, argv[2])
            return self.connect
        if argv[0] == "nslookup":
            return self.dns
        if argv[:2] == ["hubble", "status"]:
            return 0, json.dumps({"num_connected_nodes": 1, "num_unavailable_nodes": 0,
                                  "num_flows": "4095"})
        if argv[:2] == ["hubble", "observe"]:
            assert "--server" in argv and "10.96.10.10:80" in argv
            return 0, self.observe(argv)
        return 127, f"unexpected command {argv}"


@pytest.fixture
def locked(emu: ApiFront, tmp_path: Path) -> tuple[StepContext, FakeCluster, LockedStep]:
    _namespace(emu, "echo")
    ctx = make_ctx(tmp_path, emu)
    fake = FakeCluster(emu, [p["metadata"]["name"] for p in locked_policies(ctx)])
    step = LockedStep(exec_fn=fake.exec, https_fn=lambda c: (True, "answered 200"),
                      hubble_wait=0)
    step.apply(ctx)
    fake.seed()
    return ctx, fake, step


def failing(v: Verdict) -> dict[str, str]:
    return {c.name: c.detail for c in v.failing}


def test_apply_then_gate_holds(locked: tuple[StepContext, FakeCluster, LockedStep],
                               emu: ApiFront) -> None:
    ctx, _fake, step = locked
    assert emu.get(CILIUM_API, CCNP, DEFAULT_DENY) is not None
    assert emu.get(CILIUM_API, CNP, "lab-app-echo", "echo") is not None
    pod = emu.get("v1", "Pod", PROBE_POD, PROBE_NAMESPACES[0])
    assert pod is not None and pod["spec"]["containers"][0]["image"] == PROBE_IMAGE
    verdict = step.ready(ctx)
    assert verdict.ready, verdict.explain()
    assert step.probe(ctx).ready
    assert (ctx.work_dir / "locked" / "policies.yaml").exists()
    assert ctx.facts["locked"]["policies"][0] == f"{CCNP} {DEFAULT_DENY}"


def test_apply_lands_the_baseline_last_and_is_idempotent(emu: ApiFront,
                                                         tmp_path: Path) -> None:
    _namespace(emu, "echo")
    ctx = make_ctx(tmp_path, emu)
    emu.clear_requests()
    LockedStep(exec_fn=lambda *a: (0, "")).apply(ctx)
    policy_writes = [r.path for r in emu.writes() if "cilium.io" in r.path]
    assert policy_writes[0].endswith("/ciliumnetworkpolicies/lab-probe-egress")
    assert policy_writes[-1].endswith(f"/ciliumclusterwidenetworkpolicies/{DEFAULT_DENY}")
    def stored() -> dict[tuple[Any, Any, Any], Any]:
        return {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o["spec"]
                for kind in (CCNP, CNP) for o in emu.list(CILIUM_API, kind)}

    before = stored()
    emu.clear_requests()
    LockedStep(exec_fn=lambda *a: (0, "")).apply(ctx)
    assert stored() == before and len(before) == 9
    # re-applied in place: nothing created, replaced or deleted (probe pods included)
    assert [(r.method, r.path) for r in emu.writes() if r.method != "PATCH"] == []


def test_apply_prunes_what_it_no_longer_renders(emu: ApiFront, tmp_path: Path) -> None:
    _namespace(emu, "echo")
    stale = copy.deepcopy(next(p for p in render_policies(mesh=True)
                               if p["metadata"]["name"] == "lab-infra-clustermesh-apiserver"))
    emu.put(stale)
    user = app_policy(build_spec(SHAPES["web"]))  # onboarded: not the step's to prune
    _namespace(emu, "shop")
    emu.put(user)
    LockedStep().apply(make_ctx(tmp_path, emu))
    assert emu.get(CILIUM_API, CNP, "lab-infra-clustermesh-apiserver", "kube-system") is None
    assert emu.get(CILIUM_API, CNP, "lab-app-web", "shop") is not None


def test_apply_refuses_without_the_demo_namespace(emu: ApiFront, tmp_path: Path) -> None:
    with pytest.raises(LabError, match="namespace 'echo' does not exist"):
        LockedStep().apply(make_ctx(tmp_path, emu))
    assert emu.list(CILIUM_API, CCNP) == []


def test_gate_names_each_broken_half(locked: tuple[StepContext, FakeCluster, LockedStep],
                                     emu: ApiFront) -> None:
    ctx, fake, step = locked
    stored_echo = emu.get(CILIUM_API, CNP, "lab-app-echo", "echo")
    assert stored_echo is not None
    fake.connect = (0, "")
    fake.drops = False
    fake.dns = (1, ";; connection timed out; no servers could be reached")
    fake.policies.remove("lab-infra-hubble-ui")
    step.https_fn = lambda c: (False, "no HTTPS answer")
    emu.delete(CILIUM_API, CNP, "lab-app-echo", "echo")
    assert step.ready(ctx).failing[0].detail == "missing: CiliumNetworkPolicy echo/lab-app-echo"
    opened = emu.get(CILIUM_API, CNP, "lab-infra-coredns", "kube-system")
    assert opened is not None
    opened["spec"]["ingress"][0]["fromEntities"] = ["all"]
    emu.put(opened)
    emu.patch_status(CILIUM_API, CCNP, DEFAULT_DENY, None, {"conditions": [
        {"type": "Valid", "status": "False", "message": "bad selector"}]})
    bad = failing(step.ready(ctx))
    assert "lab-app-echo" in bad["policies present"]
    emu.put(stored_echo)
    assert "changed since applied" in failing(step.ready(ctx))["policies present"]
    assert "bad selector" in bad["policies valid (operator's Valid condition)"]
    assert "lab-infra-hubble-ui" in bad["policies realized by every agent"]
    assert "not enforced" in bad["lab-probe-a cannot reach lab-probe-b (egress default deny)"]
    assert "ingress default deny is not enforced" in bad[
        "lab-probe-c cannot reach lab-probe-b (ingress default deny)"]
    assert "nothing in Hubble" in bad[
        "Hubble shows lab-probe-a → lab-probe-b dropped by policy at EGRESS"]
    assert "nothing in Hubble" in bad[
        "Hubble shows lab-probe-c → lab-probe-b dropped by policy at INGRESS"]
    assert "no servers" in bad["DNS resolves from lab-probe-a"]
    assert bad["the demo route answers through the Gateway from the host"] == "no HTTPS answer"


def test_gate_proves_the_ingress_drop_as_an_ingress_drop(
        locked: tuple[StepContext, FakeCluster, LockedStep]) -> None:
    ctx, fake, step = locked
    assert step.ready(ctx).ready
    fake.drops_at["lab-probe-c"] = "EGRESS"  # dropped, but on the wrong side
    bad = failing(step.ready(ctx))
    assert list(bad) == ["Hubble shows lab-probe-c → lab-probe-b dropped by policy at INGRESS"]
    assert bad["Hubble shows lab-probe-c → lab-probe-b dropped by policy at INGRESS"].startswith(
        "DROPPED POLICY_DENIED EGRESS")


def test_an_earlier_drop_does_not_count(
        locked: tuple[StepContext, FakeCluster, LockedStep]) -> None:
    """Only flows since the attempt began count: a drop from a minute ago proves nothing."""
    ctx, fake, step = locked
    for ns in ("lab-probe-a", "lab-probe-c"):
        fake.record(ns, PROBE_POD, "10.244.0.117:8080",
                    when=datetime.now(timezone.utc) - timedelta(minutes=1))
    fake.drops = False  # today's attempts reach Hubble no more
    bad = failing(step.ready(ctx))
    assert set(bad) == {"Hubble shows lab-probe-a → lab-probe-b dropped by policy at EGRESS",
                        "Hubble shows lab-probe-c → lab-probe-b dropped by policy at INGRESS"}


def test_gate_names_why_a_probe_pod_does_not_run(
        locked: tuple[StepContext, FakeCluster, LockedStep], emu: ApiFront) -> None:
    ctx, _fake, step = locked
    emu.patch_status("v1", "Pod", PROBE_POD, "lab-probe-b", {
        "phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [{"name": PROBE_POD, "ready": False, "restartCount": 0, "state": {
            "waiting": {"reason": "InvalidImageName",
                        "message": 'Failed to apply default image tag "bad//image"'}}}]})
    check = next(c for c in step.ready(ctx).checks if c.name == "probe pods run")
    assert not check.ok and check.terminal  # waiting longer cannot help
    assert "InvalidImageName" in check.detail and "lab-probe-b" in check.detail


def test_gate_waits_for_probe_pods(emu: ApiFront, tmp_path: Path) -> None:
    _namespace(emu, "echo")
    ctx = make_ctx(tmp_path, emu)
    fake = FakeCluster(emu, [p["metadata"]["name"] for p in locked_policies(ctx)])
    step = LockedStep(exec_fn=fake.exec, https_fn=lambda c: (True, ""), hubble_wait=0)
    step.apply(ctx)
    assert "lab-probe-a" in failing(step.ready(ctx))["probe pods ready"]


def test_probe_objects_validate() -> None:
    require_upstream()
    objects = probe_objects()
    assert sorted((o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
                  for o in objects) == sorted(
        [*(("Namespace", None, ns) for ns in PROBE_NAMESPACES),
         *(("Pod", ns, PROBE_POD) for ns in PROBE_NAMESPACES)])
    for obj in objects:
        assert validate_object(obj) == [], obj["kind"]


MATRIX = load_matrix()


def test_live_trials_against_the_scripted_cluster(
        locked: tuple[StepContext, FakeCluster, LockedStep]) -> None:
    ctx, fake, _step = locked
    flows = {str(f): f for f in MATRIX.flows}

    def trial(name: str) -> Any:
        return try_flow(ctx, flows[name], fake.exec, MATRIX, hubble_wait=0)

    denied = trial("app-a → app-b:8080/TCP")
    assert denied.outcome == "denied" and denied.hubble is not None
    assert denied.hubble.flow is not None and denied.hubble.flow["reason"] == "POLICY_DENIED"
    assert str(denied.hubble).startswith("DROPPED POLICY_DENIED EGRESS")
    ingress = trial("app-c → app-b:8080/TCP")
    assert ingress.hubble is not None and str(ingress.hubble).startswith(
        "DROPPED POLICY_DENIED INGRESS")
    assert trial("app-a → kube-dns:53/UDP").outcome == "allowed"
    relay = trial("hubble-relay → remote-node:4244/TCP")
    assert relay.outcome == "allowed", relay.detail
    fake.connect = (1, "REFUSED\n")
    refused = trial("app-a → app-b:8080/TCP")
    assert refused.outcome == "allowed" and refused.hubble is not None
    assert str(refused.hubble).startswith("FORWARDED")  # the allowed flow's evidence too
    echo = trial("echo → world:443/TCP")
    assert echo.outcome == "error" and "no ready pod" in echo.detail  # no echo pod seeded


@pytest.mark.parametrize("status, ok", [
    ({"num_connected_nodes": 1, "num_unavailable_nodes": 0}, True),
    ({"num_connected_nodes": 3, "num_unavailable_nodes": 0}, True),  # meshed: remote nodes too
    ({"num_connected_nodes": 0}, False),
    ({"num_connected_nodes": 2, "num_unavailable_nodes": 1,
      "unavailable_nodes": ["east/east-worker"]}, False),
])
def test_relay_serves_every_local_node_whatever_the_remote_count(status: Obj, ok: bool) -> None:
    from lab.hubble import relay_serves

    assert relay_serves(json.dumps(status), 1) is not None
    assert relay_serves(json.dumps(status), 1)[0] is ok  # type: ignore[index]
    assert relay_serves("{}", 1) is None and relay_serves("not json", 1) is None


def test_offline_trials_are_skipped(locked: tuple[StepContext, FakeCluster, LockedStep]) -> None:
    ctx, fake, _step = locked
    flow = next(f for f in MATRIX.flows if f.trial is None)
    assert try_flow(ctx, flow, fake.exec, MATRIX).outcome == "skipped"
