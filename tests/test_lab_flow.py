"""The single-cluster lab end to end: `invoke lab.*` subprocesses against simulated clusters.

The product runs unchanged: `invoke lab.up` drives the fake kind/helm/docker and talks to a real
API server (through its ``ApiFront``), where ``tests.support.simcluster.SimCluster`` plays the
cluster's controllers, the Cilium agents, cert-manager, the kubelets and the host's port mapping
(a real TLS server). So
every gate holds only because what the product wrote made it hold: the NodePort patch, the CA
chain and the gateway certificate, the policies the live probes run into.
"""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from lab.state import STATES
from lab.steps.certs import https_probe
from tests.conftest import REPO, LabEnv
from tests.fakes.fakelib import wait_until_sleeping
from tests.support.simcluster import SimLab, make_lab
from tests.support.upstream import require_upstream, validate_helm_values, validate_object

LOCKED_STATES = list(STATES[1:STATES.index("locked") + 1])
MUTATING = ("POST", "PUT", "PATCH", "DELETE")


# Before the module's lab is built: the server this test leases is then the lab's.
def test_kill_inside_gateway_and_certs_then_resume_converges(tmp_path: Path,
                                                             envtest_cluster: Any) -> None:
    require_upstream()
    sim_lab = make_lab(tmp_path, [envtest_cluster])
    env, sim = sim_lab.env, sim_lab.sims["lab"]
    try:
        # Killed while the gateway step asks Docker for the network.
        proc = env.start("lab.up", LAB_FAKE_SLEEP="docker:network inspect=30")
        try:
            wait_until_sleeping(env.fake_state, "docker", ["network", "inspect"])
        finally:
            env.kill(proc)
        rec = env.record()
        assert rec["state"] == "cni"
        assert (rec["history"][-1]["transition"], rec["history"][-1]["outcome"]) == (
            "gateway", "running")
        # Resumed, then killed again while helm installs cert-manager (release pending-install).
        proc = env.start("lab.up", "--resume", LAB_FAKE_SLEEP="helm:upgrade=30")
        try:
            wait_until_sleeping(env.fake_state, "helm", ["upgrade", "cert-manager"])
        finally:
            env.kill(proc)
        helm = json.loads((env.fake_state / "helm.json").read_text())
        assert helm["kind-lab"]["cert-manager/cert-manager"]["history"][-1]["status"] == \
            "pending-install"
        rec = env.record()
        assert rec["state"] == "gateway"
        # The last resume converges, repairing the unfinished release first.
        proc = env.run("lab.up", "--resume")
        assert "lab is up" in proc.stdout
        rec = env.record()
        assert rec["state"] == "locked"
        assert all(rec["gates"][s]["ready"] for s in LOCKED_STATES)
        outcomes = [(t["transition"], t["outcome"]) for t in rec["history"]]
        assert outcomes == [("cluster", "ok"), ("cni", "ok"), ("gateway", "interrupted"),
                            ("gateway", "ok"), ("certs", "interrupted"), ("certs", "ok"),
                            ("locked", "ok")]
        assert [a[:2] for a in env.calls("helm", "uninstall")] == [["uninstall", "cert-manager"]]
        assert len(env.calls("kind", "create")) == 1
        assert [a[2] for a in env.calls("helm", "upgrade")] == [
            "cilium", "cert-manager", "cert-manager"]
        ok, detail = https_probe("127.0.0.1", sim.https_port, "echo.localhost",
                                 _ca_pem(sim.emu))
        assert ok, detail
        sim_lab.check()
    finally:
        sim_lab.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory,
        envtest: Any) -> Iterator[tuple[SimLab, Any, float]]:
    """One lab brought from absent to `locked` by a plain `invoke lab.up` against the session's
    real API server (shared by the tests of this module that only read it or leave it as they
    found it)."""
    require_upstream()
    sim_lab = make_lab(tmp_path_factory.mktemp("flow"), [envtest])
    try:
        start = time.monotonic()
        proc = sim_lab.env.run("lab.up", check=False, timeout=120)
        yield sim_lab, proc, time.monotonic() - start
        sim_lab.check()
    finally:
        sim_lab.close()


def _non_dry_posts(emu: Any) -> list[Any]:
    return [r for r in emu.writes() if r.method == "POST" and "dryRun" not in r.query]


def _ca_pem(emu: Any) -> str:
    secret = emu.get("v1", "Secret", "lab-ca", "cert-manager")
    return base64.b64decode(secret["data"]["ca.crt"]).decode()


@pytest.mark.envtest
def test_up_from_absent_to_locked_through_the_real_tasks(
        lab: tuple[SimLab, Any, float]) -> None:
    sim_lab, proc, seconds = lab
    env, sim = sim_lab.env, sim_lab.sims["lab"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "lab is up" in proc.stdout
    rec = env.record()
    assert rec["state"] == "locked"
    assert [(t["transition"], t["outcome"]) for t in rec["history"]] == [
        (s, "ok") for s in LOCKED_STATES]
    assert all(rec["gates"][s]["ready"] for s in LOCKED_STATES)
    assert len(env.calls("kind", "create")) == 1
    installs = [a[2] for a in env.calls("helm", "upgrade")]
    assert installs == ["cilium", "cert-manager"]
    emu = sim.emu
    # The gateway Service's nodePorts were allocated at random and patched by the product.
    svc = emu.get("v1", "Service", "cilium-gateway-lab", "lab-gateway")
    assert {p["name"]: p["nodePort"] for p in svc["spec"]["ports"]} == {
        "port-80": 30080, "port-443": 30443}
    patches = [r for r in emu.requests if r.method == "PATCH"
               and r.path.endswith("/services/cilium-gateway-lab")]
    assert [r.content_type for r in patches] == ["application/json-patch+json"] * 2
    # The gates ran their live checks against the simulated agents and probe pods...
    ran = {tuple(c.command[:2]) for c in emu.exec_calls}
    assert {("hubble", "status"), ("cilium-dbg", "policy"), ("cilium-dbg", "endpoint"),
            ("/agnhost", "connect"), ("hubble", "observe"),
            ("nslookup", "kubernetes.default.svc.cluster.local")} <= ran
    denied = [f for f in sim.flows() if f.src.get("namespace") == "lab-probe-a"]
    assert len(denied) == 1 and denied[0].direction == "EGRESS" and denied[0].port == 8080
    # ...and the HTTPS probe from the host reached the real TLS server with SNI echo.localhost.
    assert sim.front.requests and all(r == ("echo.localhost", f"echo.localhost:{sim.https_port}",
                                            200) for r in sim.front.requests)
    # The leaf certificate names what the Certificate asked for and chains to the lab CA.
    cert = emu.get("cert-manager.io/v1", "Certificate", "lab-gateway-tls", "lab-gateway")
    leaf = emu.get("v1", "Secret", "lab-gateway-tls", "lab-gateway")
    parsed = x509.load_pem_x509_certificate(base64.b64decode(leaf["data"]["tls.crt"]))
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == sorted(cert["spec"]["dnsNames"])
    ok, detail = https_probe("127.0.0.1", sim.https_port, "echo.localhost", _ca_pem(emu))
    assert ok, detail
    print(f"lab.up absent → locked: {seconds:.1f}s; per step "
          f"{ {t['transition']: t['seconds'] for t in env.record()['history']} }")


@pytest.mark.envtest
def test_status_json_shows_every_gate_ready_with_named_checks_and_durations(
        lab: tuple[SimLab, Any, float]) -> None:
    env = lab[0].env
    (row,) = json.loads(env.run("lab.status", "--json").stdout)
    assert row["state"] == "locked" and row["interrupted"] is None
    assert row["configDrift"] is False
    assert list(row["gates"]) == LOCKED_STATES
    for gate, verdict in row["gates"].items():
        assert verdict["ready"], f"{gate}: {verdict}"
        assert verdict["checks"] and all(c["ok"] and c["name"] for c in verdict["checks"])
    names = {g: [c["name"] for c in v["checks"]] for g, v in row["gates"].items()}
    assert names["cluster"] == ["api-server answers", "nodes registered"]
    assert {"daemonset cilium rolled out", "deployment hubble-relay available", "nodes Ready",
            "no Pending or failed pods in kube-system", "every agent healthy",
            "hubble relay serves every node"} <= set(names["cni"])
    assert {"GatewayClass cilium Accepted", "Gateway lab-gateway/lab Programmed",
            "Gateway lab-gateway/lab status is current", "Gateway address from the LB pool",
            "gateway Service nodePorts as configured"} <= set(names["gateway"])
    assert {"cert-manager webhook answers", "ClusterIssuer lab-ca Ready",
            "Certificate lab-gateway/lab-gateway-tls Ready", "listener https ResolvedRefs",
            "demo app answers over HTTPS from the host"} <= set(names["certs"])
    assert {"policies realized by every agent",
            "lab-probe-a cannot reach lab-probe-b (egress default deny)",
            "Hubble shows lab-probe-a → lab-probe-b dropped by policy at EGRESS",
            "lab-probe-c cannot reach lab-probe-b (ingress default deny)",
            "Hubble shows lab-probe-c → lab-probe-b dropped by policy at INGRESS",
            "DNS resolves from lab-probe-a",
            "the demo route answers through the Gateway from the host"} <= set(names["locked"])
    checks = {c["name"]: c["detail"] for c in row["gates"]["gateway"]["checks"]}
    assert checks["Gateway address from the LB pool"].endswith("in 172.18.255.0/24")
    assert list(row["durations"]) == LOCKED_STATES
    assert all(isinstance(s, float) and s > 0 for s in row["durations"].values())
    assert row["allocation"]["httpsHostPort"] == lab[0].sims["lab"].https_port


@pytest.mark.envtest
def test_second_up_creates_nothing_and_finishes_quickly(lab: tuple[SimLab, Any, float]) -> None:
    sim_lab, _, first = lab
    env, sim = sim_lab.env, sim_lab.sims["lab"]
    calls = {t: len(env.calls(t)) for t in ("kind", "helm", "docker")}
    helm_upgrades = len(env.calls("helm", "upgrade"))
    created = len(sim.api_creates)
    history = len(env.record()["history"])
    sim.emu.clear_requests()
    start = time.monotonic()
    proc = env.run("lab.up")
    took = time.monotonic() - start
    assert "lab is up" in proc.stdout
    assert _non_dry_posts(sim.emu) == []
    assert sim.api_creates[created:] == []  # nothing created, not even by server-side apply
    assert len(env.calls("kind", "create")) == 1
    assert len(env.calls("helm", "upgrade")) == helm_upgrades
    assert not [a for a in env.calls("helm")[calls["helm"]:] if a[0] in ("install", "uninstall",
                                                                       "rollback")]
    rec = env.record()
    assert rec["state"] == "locked"
    # every completed step was re-converged in place, each with its gate
    assert [(t["transition"], t["from"], t["outcome"]) for t in rec["history"][history:]] == [
        (s, s, "ok") for s in LOCKED_STATES]
    print(f"first lab.up {first:.1f}s, second {took:.1f}s")  # figures: `nox -s bench`


@pytest.mark.envtest
def test_resume_on_a_converged_lab_probes_and_does_nothing(
        lab: tuple[SimLab, Any, float]) -> None:
    env, sim = lab[0].env, lab[0].sims["lab"]
    history = env.record()["history"]
    calls = len(env.calls())
    sim.emu.clear_requests()
    proc = env.run("lab.up", "--resume")
    assert "lab is up" in proc.stdout
    assert [r for r in sim.emu.requests if r.method in MUTATING] == []
    assert sim.emu.exec_calls == []  # probes are cheap: no live gate ran
    new = env.calls()[calls:]
    assert all(a[0] in ("version", "get", "status") for a in new), new  # read-only tool calls
    rec = env.record()
    assert rec["state"] == "locked" and rec["history"] == history


@pytest.mark.envtest
def test_the_gates_depend_on_what_the_product_applied(lab: tuple[SimLab, Any, float]) -> None:
    """The simulator is not vacuous: undo what the product did and the gates see it."""
    sim_lab = lab[0]
    env, sim = sim_lab.env, sim_lab.sims["lab"]
    emu = sim.emu
    ca = _ca_pem(emu)
    # 1. The Service is recreated with another nodePort: the host port no longer reaches Envoy.
    svc = emu.get("v1", "Service", "cilium-gateway-lab", "lab-gateway")
    drifted = copy.deepcopy(svc)
    for p in drifted["spec"]["ports"]:
        if p["name"] == "port-443":
            p["nodePort"] = 31999
    emu.put(drifted)
    ok, detail = https_probe("127.0.0.1", sim.https_port, "echo.localhost", ca)
    # nothing behind the mapped port: the connection is dropped (before or inside the handshake)
    assert not ok and ("no HTTPS answer" in detail or "TLS handshake" in detail), detail
    (row,) = json.loads(env.run("lab.status", "--json").stdout)
    check = next(c for c in row["gates"]["certs"]["checks"]
                 if c["name"] == "gateway Service HTTPS nodePort as configured")
    assert not check["ok"] and "nodePort 31999, want 30443" in check["detail"]
    assert "re-patched" in check["detail"]
    assert https_probe("127.0.0.1", sim.https_port, "echo.localhost", ca)[0]
    # 2. Without the demo app's policy, the default deny keeps Envoy from the backend.
    policy = emu.get("cilium.io/v2", "CiliumNetworkPolicy", "lab-app-echo", "echo")
    emu.delete("cilium.io/v2", "CiliumNetworkPolicy", "lab-app-echo", "echo")
    ok, detail = https_probe("127.0.0.1", sim.https_port, "echo.localhost", ca)
    assert not ok and "503" in detail
    (row,) = json.loads(env.run("lab.status", "--json").stdout)
    failing = {c["name"] for c in row["gates"]["locked"]["checks"] if not c["ok"]}
    assert failing == {"policies present", "policies realized by every agent",
                       "the demo route answers through the Gateway from the host"}
    emu.put({k: v for k, v in policy.items() if k != "status"})  # as the product applied it
    assert https_probe("127.0.0.1", sim.https_port, "echo.localhost", ca)[0]
    # 3. The served leaf chains to the cert-manager lab CA only: another CA (the lab's Cilium
    #    CA, on disk) does not verify it.
    cilium_ca = (env.state_dir / "ca" / "cilium-ca.crt").read_text()
    ok, detail = https_probe("127.0.0.1", sim.https_port, "echo.localhost", cilium_ca)
    assert not ok and "does not verify against the lab CA" in detail


def test_render_of_the_shipped_config_validates(tmp_path: Path) -> None:
    require_upstream()
    out = tmp_path / "render"
    fake = tmp_path / "fake"
    fake.mkdir()
    env = LabEnv(root=tmp_path, config=REPO / "config" / "lab.yaml", fake_state=fake,
                 kubeconfig=tmp_path / "kubeconfig", fronts={})
    proc = env.run("lab.render", "--config", str(REPO / "config" / "lab.yaml"),
                   "--out", str(out))
    written = [Path(line) for line in proc.stdout.split()]
    assert written and all(p.exists() for p in written)
    assert not (fake / "calls.jsonl").exists()  # no tool ran
    base = out / "lab"
    objects: list[dict[str, Any]] = []
    for path in sorted(base.glob("*/objects.yaml")):
        objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for path in sorted((base / "locked").glob("*.yaml")):
        objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {o["kind"] for o in objects}
    assert {"CiliumLoadBalancerIPPool", "CiliumL2AnnouncementPolicy", "Gateway", "Certificate",
            "ClusterIssuer", "HTTPRoute", "Deployment", "Service", "Namespace",
            "CiliumClusterwideNetworkPolicy", "CiliumNetworkPolicy", "Pod"} <= kinds
    for obj in objects:
        assert validate_object(obj) == [], f"{obj['kind']} {obj['metadata'].get('name')}"
    values = {p.name: yaml.safe_load(p.read_text()) for p in (base / "helm").glob("*.yaml")}
    assert set(values) == {"cilium.values.yaml", "cert-manager.values.yaml"}
    assert validate_helm_values(values["cilium.values.yaml"], "cilium") == []
    assert validate_helm_values(values["cert-manager.values.yaml"], "cert-manager") == []
    kind_cfg = yaml.safe_load((base / "kind.yaml").read_text())
    assert kind_cfg["networking"]["disableDefaultCNI"] is True
