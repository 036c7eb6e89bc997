"""The spine end to end: real `invoke lab.*` subprocesses, fake kind/docker on PATH, a real API
server.

Crash and resume, idempotency, drift, the lock, dry-run and refusal before side effects.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lab.state import StateStore
from tests.conftest import LabEnv, write_config
from tests.fakes.fakelib import wait_until_sleeping
from tests.support.objects import daemonset


def test_up_to_cluster_creates_records_and_exports_kubeconfig(lab_env: LabEnv) -> None:
    lab_env.run("lab.up", "--to", "cluster")
    creates = lab_env.calls("kind", "create")
    assert len(creates) == 1
    argv = creates[0]
    assert argv[argv.index("--name") + 1] == "lab"
    kind_cfg = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    assert kind_cfg["networking"] == {"disableDefaultCNI": True, "kubeProxyMode": "none",
                                      "podSubnet": "10.244.0.0/16",
                                      "serviceSubnet": "10.96.0.0/16"}
    ports = kind_cfg["nodes"][0]["extraPortMappings"]
    assert {(p["containerPort"], p["hostPort"], p["listenAddress"]) for p in ports} == {
        (30080, 30080, "127.0.0.1"), (30443, 30443, "127.0.0.1")}
    rec = lab_env.record()
    assert rec["state"] == "cluster"
    assert [(t["transition"], t["outcome"]) for t in rec["history"]] == [("cluster", "ok")]
    assert rec["history"][0]["seconds"] >= 0
    assert rec["versions"]["cilium"] == "1.18.4"
    assert rec["gates"]["cluster"]["ready"] is True
    kubeconfig = yaml.safe_load(lab_env.kubeconfig.read_text())
    assert "kind-lab" in [c["name"] for c in kubeconfig["contexts"]]


def test_second_up_on_converged_lab_creates_nothing(lab_env: LabEnv) -> None:
    lab_env.run("lab.up", "--to", "cluster")
    emu = lab_env.fronts["lab"]
    emu.clear_requests()
    before = len(lab_env.calls("kind", "create"))
    lab_env.run("lab.up", "--to", "cluster")
    lab_env.run("lab.up", "--to", "cluster", "--resume")
    assert len(lab_env.calls("kind", "create")) == before
    assert [r for r in emu.writes() if r.method == "POST"] == []
    assert lab_env.record()["state"] == "cluster"


def test_kill_inside_cluster_step_then_resume_converges(lab_env: LabEnv) -> None:
    proc = lab_env.start("lab.up", "--to", "cluster", LAB_FAKE_SLEEP="kind:create=30")
    try:  # killed inside `kind create`, once it recorded the cluster
        wait_until_sleeping(lab_env.fake_state, "kind", ["create"])
    finally:
        lab_env.kill(proc)
    rec = lab_env.record()
    assert rec["state"] == "absent"
    assert rec["history"][-1]["outcome"] == "running"  # the crash is visible
    lab_env.run("lab.up", "--resume", "--to", "cluster")
    rec = lab_env.record()
    assert rec["state"] == "cluster"
    outcomes = [t["outcome"] for t in rec["history"]]
    assert outcomes[0] == "interrupted" and outcomes[-1] == "ok"
    # The half-created cluster was either adopted or replaced: never two clusters.
    clusters = lab_env.run("lab.status", "--json", "--offline").stdout
    assert json.loads(clusters)[0]["state"] == "cluster"
    kind_clusters = json.loads((lab_env.fake_state / "kind.json").read_text())
    assert list(kind_clusters.get("clusters", kind_clusters)) == ["lab"]


def test_kill_during_a_rerun_then_resume_converges(lab_env: LabEnv) -> None:
    lab_env.run("lab.up", "--to", "cluster")
    creates = len(lab_env.calls("kind", "create"))
    # A second run killed while it re-applies the completed cluster step (inside `kind get`).
    proc = lab_env.start("lab.up", "--to", "cluster", LAB_FAKE_SLEEP="kind:get=30")
    try:
        wait_until_sleeping(lab_env.fake_state, "kind", ["get"])
    finally:
        lab_env.kill(proc)
    assert lab_env.record()["history"][-1]["outcome"] == "running"
    lab_env.run("lab.up", "--resume", "--to", "cluster")
    assert lab_env.record()["state"] == "cluster"
    assert len(lab_env.calls("kind", "create")) == creates


def test_drift_deleted_cluster_steps_back_and_is_recreated(lab_env: LabEnv) -> None:
    lab_env.run("lab.up", "--to", "cluster")
    # Someone deletes the cluster by hand.
    import subprocess

    subprocess.run(["kind", "delete", "cluster", "--name", "lab"], env=lab_env.env(),
                   check=True, capture_output=True)
    proc = lab_env.run("lab.up", "--resume", "--to", "cluster")
    assert "stepping back" in proc.stderr or "state.drift" in proc.stderr
    rec = lab_env.record()
    assert rec["state"] == "cluster"
    assert [t["outcome"] for t in rec["history"]][-2:] == ["stepped-back", "ok"]
    assert len(lab_env.calls("kind", "create")) == 2


def test_concurrent_up_is_refused_naming_the_holder(lab_env: LabEnv) -> None:
    store = StateStore(lab_env.state_dir)
    with store.lock("lab", "lab.up (test holder)"):
        proc = lab_env.run("lab.up", "--to", "cluster", check=False)
    assert proc.returncode == 1
    assert "locked by pid" in proc.stderr and "lab.up (test holder)" in proc.stderr
    # Only read-only preflight queries ran (tool versions); nothing touched a cluster.
    assert {argv[0] for argv in lab_env.calls()} <= {"version"}
    assert lab_env.fronts["lab"].requests == []


def test_down_is_refused_while_another_task_holds_the_cluster(lab_env: LabEnv) -> None:
    lab_env.run("lab.up", "--to", "cluster")
    store = StateStore(lab_env.state_dir)
    with store.lock("lab", "lab.up (test holder)"):
        proc = lab_env.run("lab.down", check=False)
    assert proc.returncode == 1
    assert "locked by pid" in proc.stderr and "lab.up (test holder)" in proc.stderr
    assert lab_env.calls("kind", "delete") == []
    assert lab_env.record()["state"] == "cluster"  # the record the holder owns is untouched


def test_down_without_kind_is_refused_while_another_task_holds_the_cluster(
        lab_env: LabEnv) -> None:
    """Without kind on PATH, down cannot ask kind; the record alone says there is something to
    delete, so it still takes the lock first and refuses, leaving the holder's record."""
    from tests.test_first_run import without_fakes

    lab_env.run("lab.up", "--to", "cluster")
    store = StateStore(lab_env.state_dir)
    with store.lock("lab", "lab.up (test holder)"):
        proc = lab_env.run("lab.down", check=False, PATH=without_fakes())
        assert (store.clusters_dir / "lab.lock").exists()  # still the holder's
    assert proc.returncode == 1
    assert "locked by pid" in proc.stderr and "lab.up (test holder)" in proc.stderr
    assert lab_env.record()["state"] == "cluster"
    assert not (store.clusters_dir / "lab.lock").exists()  # the holder removed it letting go


def test_up_to_absent_is_refused_with_the_valid_states(lab_env: LabEnv) -> None:
    proc = lab_env.run("lab.up", "--to", "absent", check=False)
    assert proc.returncode == 1
    assert "'absent'" in proc.stderr
    assert "cluster, cni, gateway, certs, locked, meshed" in proc.stderr
    assert "lab.down" in proc.stderr  # the way to get to `absent`
    assert lab_env.calls() == []
    assert not (lab_env.state_dir / "clusters").exists()


def test_bad_config_is_refused_before_any_side_effect(lab_env: LabEnv) -> None:
    write_config(lab_env.config, clusters=[{"name": "Bad_Name", "id": 300}])
    proc = lab_env.run("lab.up", check=False)
    assert proc.returncode == 1
    assert "clusters[0].name" in proc.stderr and "clusters[0].id" in proc.stderr
    assert lab_env.calls() == []
    assert not (lab_env.state_dir / "clusters").exists()


def test_dry_run_prints_the_plan_and_changes_nothing(lab_env: LabEnv) -> None:
    proc = lab_env.run("lab.up", "--dry-run", "--to", "cni")
    assert "kind create cluster --name lab" in proc.stdout
    assert "helm upgrade --install cilium cilium/cilium --version 1.18.4" in proc.stdout
    assert "dry run: nothing was changed" in proc.stdout
    assert lab_env.calls() == []
    assert not (lab_env.state_dir / "clusters").exists()


def test_down_deletes_cluster_and_record(lab_env: LabEnv) -> None:
    lab_env.run("lab.up", "--to", "cluster")
    proc = lab_env.run("lab.down")
    assert "lab" in proc.stdout
    deletes = lab_env.calls("kind", "delete")
    # the cluster with its own kubeconfig, then its context in the user's kubeconfig
    assert [argv[:4] for argv in deletes] == [["delete", "cluster", "--name", "lab"]] * 2
    assert deletes[0][4:] == ["--kubeconfig",
                              str(lab_env.state_dir / "kubeconfig" / "lab.yaml")]
    assert "--kubeconfig" not in deletes[1]
    assert json.loads((lab_env.fake_state / "kind.json").read_text())["clusters"] == {}
    assert not (lab_env.state_dir / "clusters" / "lab.json").exists()
    status = json.loads(lab_env.run("lab.status", "--json", "--offline").stdout)
    assert status[0]["state"] == "absent"


def test_existing_cluster_that_does_not_match_is_refused(lab_env: LabEnv) -> None:
    emu = lab_env.fronts["lab"]
    emu.put(daemonset("kube-proxy", 1))
    import subprocess

    other = lab_env.root / "other-kind.yaml"
    other.write_text("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\n")
    subprocess.run(["kind", "create", "cluster", "--name", "lab", "--config", str(other)],
                   env=lab_env.env(), check=True, capture_output=True)
    proc = lab_env.run("lab.up", "--to", "cluster", check=False)
    assert proc.returncode == 1
    assert "does not match" in proc.stderr and "kube-proxy" in proc.stderr
    assert len(lab_env.calls("kind", "create")) == 1  # only the test's own


def test_status_json_shows_gates_and_durations(lab_env: LabEnv) -> None:
    lab_env.run("lab.up", "--to", "cluster")
    rows = json.loads(lab_env.run("lab.status", "--json").stdout)
    (row,) = rows
    assert row["state"] == "cluster"
    assert row["gates"]["cluster"]["ready"] is True
    names = [c["name"] for c in row["gates"]["cluster"]["checks"]]
    assert names == ["api-server answers", "nodes registered"]
    assert "cluster" in row["durations"]
    assert row["allocation"]["lbPool"] == "172.18.255.0/24"
