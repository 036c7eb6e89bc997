"""`lab.verify` against a real API server with scripted agents, probe pods and Hubble.

The cluster is test_locked.py's ``FakeCluster`` (Hubble keeps a flow per attempt, answered only
`--since` the attempt began), extended so chosen targets connect. The gates before `locked` are
scripted verdicts; `locked` is the real gate. Expected rows are written by hand from the matrix
file's own words (expect, egress/ingress), not computed by the module under test.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from invoke.context import Context
from invoke.exceptions import Exit

from lab import verify as lab_verify
from lab.matrix import load as load_matrix
from lab.state import Record, StateStore
from lab.steps.base import Check, StepContext, Verdict
from lab.steps.locked import LockedStep, locked_policies
from lab.tasks.checks import verify as verify_task
from tests import test_locked
from tests.conftest import write_config
from tests.support.apifront import ApiFront
from tests.test_locked import FakeCluster, _namespace, make_ctx

emu = test_locked.emu

MATRIX = load_matrix()
EARLIER = ("cluster", "cni", "gateway", "certs")


class Scripted(FakeCluster):
    """FakeCluster, plus (source namespace, "ip:port") pairs that connect (FORWARDED in
    Hubble)."""

    def __init__(self, emu: ApiFront, policies: list[str]) -> None:
        super().__init__(emu, policies)
        self.open: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        self.written: list[dict[str, Any]] = []

    def exec(self, ns: str, pod: str, container: str | None, argv: list[str]) -> tuple[int, str]:
        with self.lock:
            if argv[:2] == ["/agnhost", "connect"] and (ns, argv[2]) in self.open:
                saved, self.connect = self.connect, (0, "")
                try:
                    return super().exec(ns, pod, container, argv)
                finally:
                    self.connect = saved
            return super().exec(ns, pod, container, argv)


class Gate:
    def __init__(self, name: str, ok: bool = True) -> None:
        self.name, self.ok = name, ok

    def ready(self, ctx: StepContext) -> Verdict:
        return Verdict(self.name, [Check("scripted", self.ok, "" if self.ok else "broken")])


def _ready_pod(emu: ApiFront, ns: str, name: str, labels: dict[str, str], ip: str,
               container: str = "main") -> None:
    emu.put({"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": name, "namespace": ns, "labels": labels},
             "spec": {"nodeName": "lab-control-plane",
                      "containers": [{"name": container, "image": "x"}]}})
    emu.patch_status("v1", "Pod", name, ns, {"phase": "Running", "podIP": ip, "conditions": [
        {"type": "Ready", "status": "True"}]})


def _kubelet(emu: ApiFront) -> list[dict[str, Any]]:
    """Probe pods the verify run creates start and turn Ready (as the kubelet would); returns
    the list of the pods as written."""
    written: list[dict[str, Any]] = []

    def start(verb: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        if obj.get("kind") == "Pod" and verb in ("create", "patch") \
                and meta.get("name", "").startswith("lab-verify-") \
                and not (obj.get("status") or {}).get("podIP"):
            written.append(obj)
            emu.patch_status("v1", "Pod", meta["name"], meta["namespace"], {
                "phase": "Running", "podIP": "10.244.0.201",
                "conditions": [{"type": "Ready", "status": "True"}]})

    emu.on_write(start)
    return written


@pytest.fixture
def cluster(emu: ApiFront, tmp_path: Path) -> tuple[StepContext, Scripted]:
    _namespace(emu, "echo")
    ctx = make_ctx(tmp_path, emu)
    fake = Scripted(emu, [p["metadata"]["name"] for p in locked_policies(ctx)])
    LockedStep(exec_fn=fake.exec).apply(ctx)
    fake.seed()
    _ready_pod(emu, "echo", "echo-7c9f5d6b48-tnq2w", {"app.kubernetes.io/name": "echo"},
               "10.244.0.87", container="echo")
    _ready_pod(emu, "kube-system", "hubble-relay-5b8f9c7d4d-hx9rk",
               {"k8s-app": "hubble-relay"}, "10.244.0.45")
    _ready_pod(emu, "cert-manager", "cert-manager-webhook-58c7b9f94d-k4zrn",
               {"app.kubernetes.io/component": "webhook"}, "10.244.0.32")
    emu.put({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "cert-manager-controller", "namespace": "kube-system"},
             "spec": {"renewTime": datetime.now(timezone.utc).strftime(
                 "%Y-%m-%dT%H:%M:%S.%fZ")}})
    fake.written = _kubelet(emu)
    ctx.record.state = "locked"
    return ctx, fake


def steps(fake: Scripted, earlier_ok: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {n: Gate(n, earlier_ok) for n in EARLIER}
    out["locked"] = LockedStep(exec_fn=fake.exec, https_fn=lambda c: (True, "answered 200"),
                               hubble_wait=0)
    return out


def probes(fake: Scripted, https_ok: bool = True) -> lab_verify.Probes:
    return lab_verify.Probes(exec_fn=lambda ctx: fake.exec,
                             https_fn=lambda c: (https_ok, "answered 200" if https_ok
                                                 else "connection refused"),
                             hubble_wait=0, probe_ready_timeout=5)


def rows(report: lab_verify.Report) -> dict[str, dict[str, Any]]:
    return {r["flow"]: r for r in report.to_json()["flows"]}


def test_a_healthy_lab_matches_every_flow(cluster: tuple[StepContext, Scripted],
                                          emu: ApiFront) -> None:
    ctx, fake = cluster
    emu.clear_requests()
    report = lab_verify.run([ctx], MATRIX, steps=steps(fake), probes=probes(fake))
    got = rows(report)
    assert report.ok, [r for r in got.values() if not r["ok"]]
    assert [g["gate"] for g in report.to_json()["gates"]] == [*EARLIER, "locked"]
    single = [f for f in MATRIX.flows if f.when == "always"]
    assert len(got) == len(single)  # the mesh-only flows are not this lab's
    # hand-written: what the trials must show
    a_b = got["app-a → app-b:8080/TCP"]
    assert (a_b["observed"], a_b["hubble"]["verdict"], a_b["hubble"]["reason"],
            a_b["hubble"]["direction"]) == ("denied", "DROPPED", "POLICY_DENIED", "EGRESS")
    assert got["app-c → app-b:8080/TCP"]["hubble"]["direction"] == "INGRESS"
    assert got["app-a → world:443/TCP"]["hubble"]["direction"] == "EGRESS"
    assert got["echo → world:443/TCP"]["observed"] == "denied"
    assert got["world → gateway:443/TCP"]["observed"] == "allowed"  # HTTPS with the lab CA
    assert got["kube-apiserver → cert-manager-webhook:10250/TCP"]["observed"] == "allowed"
    assert got["app-a → kube-dns:53/UDP"]["observed"] == "allowed"
    offline = got["app-c → app-b:9090/TCP"]
    assert offline["observed"] == "offline" and offline["ok"] and offline["trial"] is None
    assert "detail" not in offline  # details only on failures: healthy runs compare equal
    assert sum(r["observed"] == "offline" for r in got.values()) == \
        sum(f.trial is None for f in single)
    # read-only: nothing was created, changed or deleted
    assert emu.writes() == [] or all("dryRun" in w.query for w in emu.writes())


def test_json_is_stable(cluster: tuple[StepContext, Scripted]) -> None:
    ctx, fake = cluster
    first = json.dumps(lab_verify.run([ctx], MATRIX, steps=steps(fake),
                                      probes=probes(fake)).to_json(), sort_keys=True, indent=2)
    second = json.dumps(lab_verify.run([ctx], MATRIX, steps=steps(fake),
                                       probes=probes(fake)).to_json(), sort_keys=True, indent=2)
    assert first == second
    doc = json.loads(first)
    assert doc["schema"] == "kind-cilium-lab/verify/v1" and doc["ok"] is True
    assert "time" not in first.lower().replace("timed out", "")


def test_mismatches_are_named(cluster: tuple[StepContext, Scripted]) -> None:
    ctx, fake = cluster
    fake.drops_at["lab-probe-c"] = "EGRESS"  # dropped, but at the wrong side
    fake.open.add(("lab-probe-a", "10.244.0.87:8080"))  # probe-a reaches echo: not enforced
    report = lab_verify.run([ctx], MATRIX, steps=steps(fake, earlier_ok=False),
                            probes=probes(fake, https_ok=False))
    got = rows(report)
    assert not report.ok
    bad = {flow for flow, r in got.items() if not r["ok"]}
    assert bad == {"app-c → app-b:8080/TCP", "app-a → echo:8080/TCP",
                   "world → gateway:443/TCP", "gateway → echo:8080/TCP"}
    assert got["app-c → app-b:8080/TCP"]["detail"] == "dropped at EGRESS, expected at INGRESS"
    assert got["app-a → echo:8080/TCP"]["observed"] == "allowed"
    assert got["app-a → echo:8080/TCP"]["detail"].startswith("expected denied, observed allowed")
    assert got["world → gateway:443/TCP"]["detail"].endswith("connection refused")
    summary = report.to_json()["summary"]
    assert summary["mismatches"] == 4 and summary["gatesNotReady"] == 5


USER_FLOWS = {
    "actors": {"api": {"namespace": "shop", "selector": {"app": "api", "tier": "backend"}},
               "db": {"namespace": "shop", "selector": {"app": "db"}}},
    "flows": [
        {"from": "api", "to": "db", "port": 5432, "expect": "allowed", "egress": "allowed",
         "ingress": "allowed", "why": "the API reads its database"},
        {"from": "api", "to": "world", "port": 443, "expect": "allowed", "egress": "allowed",
         "ingress": "n/a", "why": "the API calls a payment provider"},
        {"from": "app-a", "to": "db", "port": 5432, "expect": "denied", "egress": "denied",
         "ingress": "denied", "why": "other applications cannot reach the database"},
    ],
}


def test_user_flows_run_from_a_short_lived_probe_with_the_source_labels(
        cluster: tuple[StepContext, Scripted], emu: ApiFront, tmp_path: Path) -> None:
    ctx, fake = cluster
    _namespace(emu, "shop")
    _ready_pod(emu, "shop", "db-0", {"app": "db"}, "10.244.0.60")
    fake.open.add(("shop", "10.244.0.60:5432"))
    path = tmp_path / "flows.yaml"
    path.write_text(yaml.safe_dump(USER_FLOWS))
    user = load_matrix(path, base=MATRIX)
    emu.clear_requests()
    report = lab_verify.run([ctx], MATRIX, user, steps=steps(fake), probes=probes(fake))
    got = {r["flow"]: r for r in report.to_json()["flows"] if r["origin"] == "user"}
    assert list(got) == ["api → db:5432/TCP", "api → world:443/TCP", "app-a → db:5432/TCP"]
    assert got["api → db:5432/TCP"]["ok"] and got["api → db:5432/TCP"]["trial"] == "tcp"
    assert got["api → db:5432/TCP"]["hubble"]["verdict"] == "FORWARDED"
    # the policy denies what the user expected: a mismatch, with Hubble's word for it
    world = got["api → world:443/TCP"]
    assert not world["ok"] and world["observed"] == "denied"
    assert world["hubble"]["reason"] == "POLICY_DENIED"
    assert got["app-a → db:5432/TCP"]["ok"]  # a lab probe: tried from the probe itself
    # one probe pod, with exactly the source's labels, created then deleted
    created = [w for w in emu.writes() if w.method == "PATCH" and "/pods/lab-verify-" in w.path]
    deleted = [w for w in emu.writes() if w.method == "DELETE" and "/pods/lab-verify-" in w.path]
    assert len(created) == 1 and len(deleted) == 1
    assert created[0].path.startswith("/api/v1/namespaces/shop/pods/lab-verify-api-")
    (body,) = fake.written
    assert body["metadata"]["labels"] == {"app": "api", "tier": "backend"}
    sc = body["spec"]["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert body["spec"]["securityContext"]["runAsNonRoot"] is True
    assert [p for p in emu.list("v1", "Pod", "shop") if p["metadata"]["name"].startswith(
        "lab-verify-")] == []
    calls = [c for c in fake.calls if c[1].startswith("lab-verify-api-")]
    assert [c[2][:2] for c in calls] == [["/agnhost", "connect"]] * 2


def test_the_probe_pod_is_deleted_when_the_run_is_interrupted(
        cluster: tuple[StepContext, Scripted], emu: ApiFront, tmp_path: Path) -> None:
    ctx, fake = cluster
    _namespace(emu, "shop")
    _ready_pod(emu, "shop", "db-0", {"app": "db"}, "10.244.0.60")

    def interrupted(ns: str, pod: str, container: str | None,
                    argv: list[str]) -> tuple[int, str]:
        if pod.startswith("lab-verify-"):
            raise KeyboardInterrupt
        return fake.exec(ns, pod, container, argv)

    path = tmp_path / "flows.yaml"
    path.write_text(yaml.safe_dump(USER_FLOWS))
    with pytest.raises(KeyboardInterrupt):
        lab_verify.run([ctx], MATRIX, load_matrix(path, base=MATRIX), steps=steps(fake),
                       probes=lab_verify.Probes(exec_fn=lambda c: interrupted,
                                                https_fn=lambda c: (True, ""), hubble_wait=0))
    assert [p["metadata"]["name"] for p in emu.list("v1", "Pod", "shop")] == ["db-0"]


def test_a_lab_that_is_not_up_is_refused_before_anything(
        cluster: tuple[StepContext, Scripted], emu: ApiFront) -> None:
    ctx, fake = cluster
    ctx.record.state = "certs"
    emu.clear_requests()
    with pytest.raises(Exception, match=r"lab\.verify checks a lab that is up"):
        lab_verify.run([ctx], MATRIX, steps=steps(fake), probes=probes(fake))
    assert emu.requests == []


# -- the task: table, JSON, exit code -----------------------------------------------------------

@pytest.fixture
def task_env(cluster: tuple[StepContext, Scripted], emu: ApiFront, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> tuple[str, Scripted]:
    ctx, fake = cluster
    (tmp_path / "task").mkdir()
    config = write_config(tmp_path / "task" / "lab.yaml")
    StateStore(tmp_path / "task" / ".lab").save(Record(cluster="lab", state="locked"))
    monkeypatch.setenv("LAB_KUBECONFIG", str(ctx.kubeconfig))
    from lab.steps import registry

    for name, step in steps(fake).items():
        monkeypatch.setitem(registry.STEPS, name, step)
    scripted = probes(fake)
    monkeypatch.setattr(lab_verify, "Probes", lambda: scripted)
    return str(config), fake


def test_task_json_and_exit_code(task_env: tuple[str, Scripted],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    config, fake = task_env
    verify_task(Context(), config=config, json_=True, log_format="json")
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["summary"]["mismatches"] == 0
    fake.drops_at["lab-probe-c"] = "EGRESS"
    with pytest.raises(Exit) as err:
        verify_task(Context(), config=config, json_=True, log_format="json")
    assert err.value.code == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["summary"]["mismatches"] == 1


def test_task_table(task_env: tuple[str, Scripted], capsys: pytest.CaptureFixture[str],
                    tmp_path: Path) -> None:
    config, _fake = task_env
    verify_task(Context(), config=config, log_format="json", map=str(tmp_path / "v.svg"))
    out = capsys.readouterr().out
    assert "lab — flows" in out and "lab — gates (read-only)" in out
    line = next(x for x in out.splitlines() if "app-c → app-b:8080/TCP" in x)
    assert "DROPPED POLICY_DENIED INGRESS" in line and "✓" in line
    assert "proven offline (Cilium's policy engine)" in out
    assert "0 mismatch(es)" in out.splitlines()[-1]
    svg = (tmp_path / "v.svg").read_text()
    assert 'id="edge:lab-probe-c/app-c-&gt;lab-probe-b/app-b:8080/TCP:DROPPED"' in svg
    assert (tmp_path / "v.md").read_text().startswith("### lab.verify")


def test_in_a_mesh_the_global_service_is_a_row_and_mesh_flows_are_listed(
        emu: ApiFront, tmp_path: Path) -> None:
    _namespace(emu, "echo")
    ctx = make_ctx(tmp_path, emu, clusters=[{"name": "east"}, {"name": "west"}])
    ctx.facts["dockerSubnets"] = ["172.18.0.0/16"]
    fake = Scripted(emu, [p["metadata"]["name"] for p in locked_policies(ctx)])
    LockedStep(exec_fn=fake.exec).apply(ctx)
    fake.seed()
    ctx.record.state = "meshed"
    answered = Check("global service answered from the other clusters", True,
                     "answered by echo-west-7c9f5d6b48-tnq2w")
    meshed = Gate("meshed")
    meshed.ready = lambda c: Verdict("meshed", [answered])  # type: ignore[method-assign]
    gates = {**steps(fake), "meshed": meshed}
    got = rows(lab_verify.run([ctx], MATRIX, steps=gates, probes=probes(fake)))
    row = got["mesh-probe → echo-global (every other cluster):8080/TCP"]
    assert (row["cluster"], row["origin"], row["observed"], row["ok"]) == (
        "east", "mesh", "allowed", True)
    mesh_only = {str(f) for f in MATRIX.flows if f.when == "mesh"}
    assert mesh_only and mesh_only <= set(got)  # listed (proven offline: no trial)
    answered.ok, answered.detail = False, "no answer from west (seen: nothing)"
    got = rows(lab_verify.run([ctx], MATRIX, steps=gates, probes=probes(fake)))
    row = got["mesh-probe → echo-global (every other cluster):8080/TCP"]
    assert (row["observed"], row["ok"]) == ("denied", False)
    assert row["detail"] == "no answer from west (seen: nothing)"
