"""Step `cni`: values against the pinned chart, pinned CRDs, idempotent helm, the readiness gate."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.config import load_config
from lab.errors import LabError
from lab.logs import get as get_logger
from lab.runner import Lab
from lab.state import Record, StateStore
from lab.steps.base import StepContext, Timeouts
from lab.steps.cni import CniStep, cilium_values, gateway_api_crds
from lab.tools import Tools
from tests.conftest import REPO, LabEnv, load_upstream_crds, write_config
from tests.support import objects
from tests.support.apifront import ApiFront
from tests.support.upstream import require_upstream, validate_helm_values


def _ctx(tmp_path: Path, config: str = "config/lab.yaml", cluster: int = 0,
         kubeconfig: Path | None = None) -> StepContext:
    raw = yaml.safe_load((REPO / config).read_text())
    raw["stateDir"] = str(tmp_path / ".lab")
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    c = cfg.clusters[cluster]
    log = get_logger("test")
    return StepContext(cfg, c, StateStore(cfg.state_dir), Record(cluster=c.name),
                       Tools(None, log), log,
                       Timeouts(cni=2, poll_start=0.05, poll_max=0.2),
                       str(kubeconfig) if kubeconfig else None)


# -- values -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["config/lab.yaml", "config/mesh.yaml"])
def test_cilium_values_validate_against_the_pinned_chart(tmp_path: Path, config: str) -> None:
    require_upstream()
    for i in range(len(yaml.safe_load((REPO / config).read_text())["clusters"])):
        values = cilium_values(_ctx(tmp_path, config, i))
        assert validate_helm_values(values, "cilium") == []


def test_cilium_values_carry_what_the_lab_needs(tmp_path: Path) -> None:
    v = cilium_values(_ctx(tmp_path))
    assert v["kubeProxyReplacement"] is True
    assert (v["k8sServiceHost"], v["k8sServicePort"]) == ("lab-control-plane", 6443)
    assert v["ipam"] == {"mode": "kubernetes"}
    assert v["operator"]["replicas"] == 1  # one node: a second replica would stay Pending
    assert v["gatewayAPI"]["enabled"] and v["l2announcements"]["enabled"]
    assert v["hubble"]["relay"]["enabled"] and v["hubble"]["ui"]["enabled"]
    assert v["hubble"]["tls"]["enabled"]
    assert v["cluster"] == {"name": "lab", "id": 1}
    assert v["bpf"]["masquerade"] is False
    assert "externalIPs" not in v  # removed in 1.18


def test_the_ca_values_are_valid_and_never_in_the_rendered_values(tmp_path: Path) -> None:
    from lab import ca

    require_upstream()
    lab_ca = ca.load_or_create(tmp_path)
    assert sorted(lab_ca.helm_values()["tls"]["ca"]) == ["cert", "key"]
    assert validate_helm_values(lab_ca.helm_values(), "cilium") == []
    key = tmp_path / "ca" / "cilium-ca.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert ca.load_or_create(tmp_path) == lab_ca  # created once, reused by every cluster
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == [
        "cilium-ca.crt", "cilium-ca.key"]  # no lock file left behind
    rendered = CniStep().render(_ctx(tmp_path))
    assert "tls" not in rendered.helm[0].values


# -- Gateway API CRDs ---------------------------------------------------------------------------

def test_pinned_crd_digests_match_the_upstream_release_files() -> None:
    root = require_upstream() / "gateway-api-1.4.0" / "standard"
    pinned = dict(gateway_api_crds("v1.4.0"))
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("*.yaml")}
    assert pinned == files


def test_cached_crds_are_verified_and_a_tampered_cache_is_refetched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = require_upstream() / "gateway-api-1.4.0" / "standard"
    ctx = _ctx(tmp_path)
    cache = ctx.lab.state_dir / "cache" / "gateway-api-v1.4.0"
    cache.mkdir(parents=True)
    for p in root.glob("*.yaml"):
        (cache / p.name).write_bytes(p.read_bytes())
    (cache / "gateway.networking.k8s.io_gateways.yaml").write_text("tampered: true\n")
    fetched: list[str] = []

    def fake_download(url: str) -> bytes:
        fetched.append(url)
        return b"still: wrong\n"

    monkeypatch.setattr("lab.steps.cni._download", fake_download)
    with pytest.raises(LabError, match="the lab pins"):
        CniStep().fetch_crds(ctx)
    assert fetched == ["https://raw.githubusercontent.com/kubernetes-sigs/gateway-api/v1.4.0/"
                       "config/crd/standard/gateway.networking.k8s.io_gateways.yaml"]
    (cache / "gateway.networking.k8s.io_gateways.yaml").write_bytes(
        (root / "gateway.networking.k8s.io_gateways.yaml").read_bytes())
    docs = CniStep().fetch_crds(ctx)
    kinds = sorted(d["spec"]["names"]["kind"] for d in docs)
    assert kinds == ["BackendTLSPolicy", "GRPCRoute", "Gateway", "GatewayClass", "HTTPRoute",
                     "ReferenceGrant"]
    for d in docs:
        assert d["metadata"]["annotations"]["gateway.networking.k8s.io/channel"] == "standard"


def test_parallel_clusters_filling_the_crd_cache_never_share_a_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two clusters download the same CRDs into one cache at once: each writes a temp file of its
    own, so neither renames the other's (half-written) file away."""
    import os
    import threading

    root = require_upstream() / "gateway-api-1.4.0" / "standard"
    ctx = _ctx(tmp_path)
    monkeypatch.setattr("lab.steps.cni._download",
                        lambda url: (root / url.rsplit("/", 1)[-1]).read_bytes())
    both_written = threading.Barrier(2, timeout=10)
    real_replace = os.replace

    def replace_when_both_wrote(src: Any, dst: Any) -> None:
        both_written.wait()  # both temp files exist before either is renamed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_when_both_wrote)
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            CniStep().fetch_crds(ctx)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    cache = ctx.lab.state_dir / "cache" / "gateway-api-v1.4.0"
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in root.glob("*.yaml"))
    for p in cache.iterdir():
        assert p.read_bytes() == (root / p.name).read_bytes()


# -- the gate -----------------------------------------------------------------------------------

@pytest.fixture
def cni_cluster(tmp_path: Path, kube_api: ApiFront) -> tuple[ApiFront, StepContext]:
    """kube-system of a healthy Cilium + Hubble install on a real API server."""
    emu = kube_api
    for obj in objects.cni_ready(["lab-control-plane"]):
        emu.put(obj)
    emu.on_exec(lambda ns, pod, container, cmd: (0, objects.hubble_status_json(1), "")
                if cmd[:2] == ["hubble", "status"] else (1, "", "unexpected command"))
    kubeconfig = tmp_path / "kubeconfig"
    emu.write_kubeconfig(kubeconfig, context="kind-lab")
    return emu, _ctx(tmp_path, kubeconfig=kubeconfig)


def test_gate_holds_when_everything_is_ready(
        cni_cluster: tuple[ApiFront, StepContext]) -> None:
    _, ctx = cni_cluster
    verdict = CniStep().ready(ctx)
    assert verdict.ready, verdict.explain()
    assert [c.name for c in verdict.checks] == [
        "daemonset cilium rolled out", "daemonset cilium-envoy rolled out",
        "deployment cilium-operator available", "deployment hubble-relay available",
        "deployment hubble-ui available", "nodes Ready",
        "no Pending or failed pods in kube-system", "every agent healthy",
        "every node registered with Cilium", "hubble relay serves every node"]


def _break(emu: ApiFront, case: str) -> None:
    if case == "agent daemonset not rolled out":
        emu.patch_status("apps/v1", "DaemonSet", "cilium", "kube-system", {"numberReady": 0})
    elif case == "envoy missing":
        emu.delete("apps/v1", "DaemonSet", "cilium-envoy", "kube-system")
    elif case == "stale observedGeneration":
        emu.patch_status("apps/v1", "DaemonSet", "cilium", "kube-system",
                         {"observedGeneration": 0})
    elif case == "operator unavailable":
        emu.patch_status("apps/v1", "Deployment", "cilium-operator", "kube-system",
                         {"conditions": [{"type": "Available", "status": "False"}]})
    elif case == "relay missing":
        emu.delete("apps/v1", "Deployment", "hubble-relay", "kube-system")
    elif case == "node not ready":
        emu.put(objects.node("lab-control-plane", ready=False))
    elif case == "pending pod":
        emu.put(objects.pod("coredns-x", "kube-system", {"k8s-app": "kube-dns"},
                            "lab-control-plane", ready=False, phase="Pending"))
    elif case == "agent unhealthy":
        emu.put(objects.pod("cilium-0", "kube-system", {"k8s-app": "cilium"},
                            "lab-control-plane", ready=False, container="cilium-agent"))
    elif case == "no CiliumNode":
        emu.delete("cilium.io/v2", "CiliumNode", "lab-control-plane")
    elif case == "relay sees no node":
        emu.on_exec(lambda *a: (0, objects.hubble_status_json(0, 1), ""))
    elif case == "relay unreachable":
        emu.on_exec(lambda *a: (1, "", "failed to connect to '10.96.100.10:80'"))


GATE_CASES = {
    "agent daemonset not rolled out": "daemonset cilium rolled out",
    "envoy missing": "daemonset cilium-envoy rolled out",
    "stale observedGeneration": "daemonset cilium rolled out",
    "operator unavailable": "deployment cilium-operator available",
    "relay missing": "deployment hubble-relay available",
    "node not ready": "nodes Ready",
    "pending pod": "no Pending or failed pods in kube-system",
    "agent unhealthy": "every agent healthy",
    "no CiliumNode": "every node registered with Cilium",
    "relay sees no node": "hubble relay serves every node",
    "relay unreachable": "hubble relay serves every node",
}


@pytest.mark.parametrize(("case", "check"), GATE_CASES.items(), ids=list(GATE_CASES))
def test_each_failing_condition_is_named(cni_cluster: tuple[ApiFront, StepContext],
                                         case: str, check: str) -> None:
    emu, ctx = cni_cluster
    _break(emu, case)
    verdict = CniStep().ready(ctx)
    assert not verdict.ready
    assert check in [c.name for c in verdict.failing], verdict.explain()


def test_gate_timeout_names_the_failing_conditions(
        cni_cluster: tuple[ApiFront, StepContext]) -> None:
    from lab.errors import GateTimeout

    emu, ctx = cni_cluster
    _break(emu, "operator unavailable")
    with pytest.raises(GateTimeout) as err:
        ctx.wait_for(lambda: CniStep().ready(ctx), 0.5, "the cni gate")
    assert "deployment cilium-operator available" in str(err.value)
    assert "lab.up --resume" in err.value.hint


# -- the whole step through the real tasks, fake helm, a real API server ------------------------

def _seed_cni(lab_env: LabEnv) -> None:
    """The fake helm 'installs' the chart as ready objects; the CRD cache holds the pinned files."""
    up = require_upstream()
    emu = lab_env.fronts["lab"]  # a real API server: it establishes the CRDs itself
    emu.on_exec(lambda *a: (0, objects.hubble_status_json(1), ""))
    charts = lab_env.fake_state / "charts" / "cilium"
    charts.mkdir(parents=True)
    charts.joinpath("ready.yaml").write_text(
        yaml.safe_dump_all(objects.cni_ready(["lab-control-plane"])))
    cache = lab_env.state_dir / "cache" / "gateway-api-v1.4.0"
    cache.mkdir(parents=True)
    for p in (up / "gateway-api-1.4.0" / "standard").glob("*.yaml"):
        (cache / p.name).write_bytes(p.read_bytes())


@functools.cache
def _gateway_api_crd_names() -> frozenset[str]:
    """metadata.name of every CRD of the pinned standard channel, read from upstream's files
    (with libyaml where PyYAML has it: ~10x faster)."""
    root = require_upstream() / "gateway-api-1.4.0" / "standard"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return frozenset(d["metadata"]["name"] for p in root.glob("*.yaml")
                     for d in yaml.load_all(p.read_text(), Loader=loader)
                     if d and d.get("kind") == "CustomResourceDefinition")


def test_up_to_cni_installs_crds_then_cilium_with_rendered_values(bare_lab_env: LabEnv) -> None:
    """On a server without the Gateway API CRDs, as kind leaves it: the step creates them and
    moves on once the real server has Established them."""
    lab_env = bare_lab_env
    _seed_cni(lab_env)
    emu = lab_env.fronts["lab"]
    crds = _gateway_api_crd_names()
    assert len(crds) == 6
    for name in sorted(crds):
        assert emu.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name) is None
    # Cilium's operator installs its own CRDs; the chart's objects below need them
    load_upstream_crds(emu, "cilium-1.18.4/crds")
    lab_env.run("lab.up", "--to", "cni")
    for name in sorted(crds):
        crd = emu.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name)
        assert crd is not None, name
        assert {"type": "Established", "status": "True"}.items() <= next(
            c for c in crd["status"]["conditions"] if c["type"] == "Established").items()
    # the CRDs went in through the API before helm applied the chart's objects
    writes = [r for r in emu.requests if r.method in ("POST", "PUT", "PATCH")]
    crd_writes = [i for i, r in enumerate(writes)
                  if any(r.path.endswith(f"/customresourcedefinitions/{n}") for n in crds)]
    chart_writes = [i for i, r in enumerate(writes) if "/daemonsets" in r.path]
    assert crd_writes and chart_writes, [(r.method, r.path) for r in writes]
    assert max(crd_writes) < min(chart_writes)
    installs = [a for a in lab_env.calls("helm", "upgrade")]
    assert len(installs) == 1
    argv = installs[0]
    assert argv[:4] == ["upgrade", "--install", "cilium", "cilium/cilium"]
    assert argv[argv.index("--version") + 1] == "1.18.4"
    values_files = [argv[i + 1] for i, a in enumerate(argv) if a == "--values"]
    rendered = yaml.safe_load(Path(values_files[0]).read_text())
    assert rendered["kubeProxyReplacement"] is True
    secret = Path(values_files[1])
    assert secret.stat().st_mode & 0o777 == 0o600 and "tls" in yaml.safe_load(secret.read_text())
    rec = lab_env.record()
    assert rec["state"] == "cni" and rec["gates"]["cni"]["ready"]


def test_rerun_after_success_changes_nothing(lab_env: LabEnv) -> None:
    _seed_cni(lab_env)
    lab_env.run("lab.up", "--to", "cni")
    emu = lab_env.fronts["lab"]
    emu.clear_requests()
    lab_env.run("lab.up", "--to", "cni")
    assert len(lab_env.calls("helm", "upgrade")) == 1
    helm_state = json.loads((lab_env.fake_state / "helm.json").read_text())
    history = helm_state["kind-lab"]["kube-system/cilium"]["history"]
    assert [h["status"] for h in history] == ["deployed"]  # no new revision
    # the only API writes: the CRDs server-side applied again, in place (nothing created)
    assert sorted((r.method, r.path.rsplit("/", 1)[-1], r.content_type) for r in emu.writes()) \
        == [("PATCH", n, "application/apply-patch+yaml") for n in sorted(_gateway_api_crd_names())]
    assert lab_env.record()["state"] == "cni"


def test_crash_mid_helm_install_resumes_and_converges(lab_env: LabEnv) -> None:
    _seed_cni(lab_env)
    lab_env.run("lab.up", "--to", "cluster")
    proc = lab_env.start("lab.up", "--to", "cni", LAB_FAKE_SLEEP="helm:upgrade=30")
    try:
        lab_env.wait_for_call("helm", ["upgrade"])
        import time

        time.sleep(0.5)
    finally:
        lab_env.kill(proc)
    assert lab_env.record()["state"] == "cluster"
    lab_env.run("lab.up", "--resume", "--to", "cni")
    rec = lab_env.record()
    assert rec["state"] == "cni"
    assert lab_env.calls("helm", "uninstall")  # the pending-install was cleared first
    assert len(lab_env.calls("helm", "upgrade")) == 2


def test_log_never_contains_the_ca_key(lab_env: LabEnv) -> None:
    _seed_cni(lab_env)
    proc = lab_env.run("lab.up", "--to", "cni", LAB_LOG_LEVEL="debug")
    assert '"level": "debug"' in proc.stderr  # debug logging really ran: the check means something
    key = (lab_env.state_dir / "ca" / "cilium-ca.key").read_text()
    body = "".join(key.splitlines()[1:-1])[:40]
    assert body not in proc.stderr and body not in proc.stdout
    assert "PRIVATE KEY" not in proc.stderr


def test_render_writes_values_and_crd_sources(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path / "lab.yaml")
    lab = Lab(load_config(cfg_path))
    lab.render(tmp_path / "out")
    values = yaml.safe_load((tmp_path / "out/lab/helm/cilium.values.yaml").read_text())
    assert values == cilium_values(lab.context(lab.cfg.clusters[0]))
    sources = yaml.safe_load((tmp_path / "out/lab/cni/gateway-api-crds.sources.yaml").read_text())
    assert len(sources["crds"]) == 6 and sources["channel"] == "standard"
    assert (tmp_path / "out/lab/kind.yaml").exists()


def test_kill_at_the_step_boundary_then_resume_converges(lab_env: LabEnv) -> None:
    """Killed the moment the record shows `cluster` done and `cni` started: between steps."""
    import time

    _seed_cni(lab_env)
    record = lab_env.state_dir / "clusters" / "lab.json"
    proc = lab_env.start("lab.up", "--to", "cni", LAB_FAKE_SLEEP="helm:repo=5")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if record.exists():
                rec = json.loads(record.read_text())
                if rec["state"] == "cluster" and rec["history"][-1]["transition"] == "cni":
                    break
            time.sleep(0.02)
        else:
            raise AssertionError("the cni transition never started")
    finally:
        lab_env.kill(proc)
    assert lab_env.record()["history"][-1]["outcome"] == "running"
    lab_env.run("lab.up", "--resume", "--to", "cni")
    rec = lab_env.record()
    assert rec["state"] == "cni"
    assert [t["outcome"] for t in rec["history"]] == ["ok", "interrupted", "ok"]
    assert len(lab_env.calls("kind", "create")) == 1


def test_a_chart_version_bump_upgrades_even_with_equal_values(lab_env: LabEnv) -> None:
    """`helm status` carries no chart; the version comes from `helm get metadata`."""
    _seed_cni(lab_env)
    lab_env.run("lab.up", "--to", "cni")
    raw = yaml.safe_load(lab_env.config.read_text())
    raw["versions"]["cilium"] = "1.18.5"
    lab_env.config.write_text(yaml.safe_dump(raw))
    lab_env.run("lab.up", "--to", "cni")
    upgrades = lab_env.calls("helm", "upgrade")
    assert len(upgrades) == 2
    assert upgrades[1][upgrades[1].index("--version") + 1] == "1.18.5"


def test_a_ca_whose_key_does_not_match_is_refused(tmp_path: Path) -> None:
    from lab import ca

    first = ca.load_or_create(tmp_path)
    other_key = ca._generate()[1]
    assert first.key_pem != other_key  # the setup really mismatches the pair
    (tmp_path / "ca" / "cilium-ca.key").write_bytes(other_key)
    with pytest.raises(LabError, match="inconsistent"):
        ca.load_or_create(tmp_path)
    # refused, not "repaired": neither file was replaced by a new CA
    assert (tmp_path / "ca" / "cilium-ca.key").read_bytes() == other_key
    assert (tmp_path / "ca" / "cilium-ca.crt").read_bytes() == first.cert_pem
