"""The fake kind/docker/helm executables behave like the real CLIs the lab drives.

Every test runs the fakes as subprocesses from tests/fakes/bin with a private $LAB_FAKE_STATE.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes import BIN_DIR, fake_env, read_calls, read_state, write_state
from tests.fakes.fakelib import merge_kind_kubeconfig, render_go_template
from tests.support.apifront import ApiFront

KIND_CONFIG = """\
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
name: lab
networking:
  disableDefaultCNI: true
  kubeProxyMode: none
nodes:
- role: control-plane
  extraPortMappings:
  - containerPort: 30443
    hostPort: 8443
- role: worker
"""


class Fake:
    """Runs the fakes with one state directory, HOME and KUBECONFIG under tmp_path."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.kubeconfig = tmp / "kube" / "config"
        self.env = fake_env(str(self.state), HOME=str(tmp / "home"),
                            KUBECONFIG=str(self.kubeconfig))
        for k in ("LAB_FAKE_FAIL", "LAB_FAKE_SLEEP", "LAB_FAKE_DOCKER_DOWN", "LAB_FAKE_KUBE_URL",
                  "KIND_CLUSTER_NAME", "HELM_KUBECONTEXT", "HELM_NAMESPACE"):
            self.env.pop(k, None)

    def run(self, *argv: str, env: dict[str, str] | None = None, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env={**self.env, **(env or {})}, input=input,
                              capture_output=True, text=True, timeout=20, check=False)

    def ok(self, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        res = self.run(*argv, **kw)
        assert res.returncode == 0, (argv, res.stdout, res.stderr)
        return res

    def batch(self, *cmds: list[str] | tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
        """Run independent read-only commands concurrently (each fake call costs ~40 ms)."""
        procs = [(list(c), self.popen(*c)) for c in cmds]
        done = []
        for argv, p in procs:
            o, e = p.communicate(timeout=20)
            done.append(subprocess.CompletedProcess(argv, p.returncode, o, e))
        return done

    def popen(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(list(argv), env={**self.env, **(env or {})}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, name: str, default: Any = None) -> Any:
        return read_state(str(self.state), name, default)

    def write(self, name: str, data: Any) -> None:
        write_state(str(self.state), name, data)

    def config(self, text: str = KIND_CONFIG, name: str = "kind.yaml") -> str:
        p = self.tmp / name
        p.write_text(text)
        return str(p)

    def wait_for(self, pred: Any, what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


def test_launchers_are_executable_python_and_not_in_lab() -> None:
    for tool in ("kind", "docker", "helm"):
        p = Path(BIN_DIR) / tool
        assert os.access(p, os.X_OK)
        assert p.read_text().startswith("#!/usr/bin/env -S python3 -S\n")  # no site: fast
    lab = Path(__file__).resolve().parent.parent / "lab"
    assert not any((lab / n).exists() for n in ("kind", "docker", "helm", "fakelib.py"))


def test_state_dir_is_required(fake: Fake) -> None:
    env = {k: v for k, v in fake.env.items() if k != "LAB_FAKE_STATE"}
    res = subprocess.run(["kind", "version"], env=env, capture_output=True, text=True,
                         check=False)
    assert res.returncode == 2
    assert "LAB_FAKE_STATE" in res.stderr


def test_call_log_and_versions(fake: Fake) -> None:
    assert fake.ok("kind", "version").stdout == "kind v0.29.0 go1.24.2 linux/amd64\n"
    assert fake.ok("helm", "version", "--short").stdout == "v3.19.0+g3d8990f\n"
    assert fake.ok("helm", "version", "--template", "{{.Version}}").stdout == "v3.19.0"
    assert fake.ok("docker", "version", "--format", "{{.Server.Version}}").stdout.strip()
    calls = read_calls(str(fake.state))
    assert [c["tool"] for c in calls] == ["kind", "helm", "helm", "docker"]
    assert calls[1]["argv"] == ["version", "--short"]
    assert calls[0]["env"]["KUBECONFIG"] == str(fake.kubeconfig)
    assert isinstance(calls[0]["time"], float)
    # unknown command / flag: usage errors, still logged
    res = fake.run("kind", "frobnicate")
    assert res.returncode == 1 and 'ERROR: unknown command "frobnicate" for "kind"' in res.stderr
    res = fake.run("kind", "create", "cluster", "--bogus")
    assert res.returncode == 1 and "ERROR: unknown flag: --bogus" in res.stderr
    assert len(read_calls(str(fake.state))) == 6


def test_kind_cluster_lifecycle_and_kubeconfig_merge(fake: Fake) -> None:
    res = fake.ok("kind", "get", "clusters")
    assert res.stdout == "" and "No kind clusters found." in res.stderr
    # a pre-existing kubeconfig entry must survive create and delete
    fake.kubeconfig.parent.mkdir(parents=True)
    fake.kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "other", "cluster": {"server": "https://10.0.0.1"}}],
        "contexts": [{"name": "other", "context": {"cluster": "other", "user": "other"}}],
        "users": [{"name": "other", "user": {"token": "t"}}]}))
    fake.write("apiservers.json", {"lab": "http://127.0.0.1:5555"})
    cfg = fake.config()
    res = fake.ok("kind", "create", "cluster", "--config", cfg, "--wait", "60s")  # name in config
    assert 'Creating cluster "lab" ...' in res.stderr
    assert " ✓ Preparing nodes 📦 📦 " in res.stderr
    assert "Installing CNI" not in res.stderr  # disableDefaultCNI
    assert 'Set kubectl context to "kind-lab"' in res.stderr
    rec = fake.read("kind.json")["clusters"]["lab"]
    assert rec["status"] == "running" and rec["config_text"] == KIND_CONFIG
    assert rec["config"]["networking"]["kubeProxyMode"] == "none"
    assert rec["image"].startswith("kindest/node:v1.33.1@sha256:")

    kc = yaml.safe_load(fake.kubeconfig.read_text())
    assert kc["current-context"] == "kind-lab"
    assert {c["name"] for c in kc["contexts"]} == {"other", "kind-lab"}
    server = {c["name"]: c["cluster"]["server"] for c in kc["clusters"]}
    assert server == {"other": "https://10.0.0.1", "kind-lab": "http://127.0.0.1:5555"}

    other = fake.tmp / "exported"
    clusters, nodes, dup, internal, export = fake.batch(
        ("kind", "get", "clusters"), ("kind", "get", "nodes", "--name", "lab"),
        ("kind", "create", "cluster", "--name", "lab", "--config", cfg),
        ("kind", "get", "kubeconfig", "--name", "lab", "--internal"),
        ("kind", "export", "kubeconfig", "--name", "lab", "--kubeconfig", str(other)))
    assert clusters.stdout == "lab\n"
    assert nodes.stdout.split() == ["lab-control-plane", "lab-worker"]
    assert dup.returncode == 1
    assert dup.stderr.strip() == ('ERROR: failed to create cluster: node(s) already exist for a '
                                  'cluster with the name "lab"')
    assert yaml.safe_load(internal.stdout)["clusters"][0]["cluster"]["server"] == \
        "https://lab-control-plane:6443"
    assert export.stderr.strip() == 'Set kubectl context to "kind-lab"'
    assert yaml.safe_load(other.read_text())["current-context"] == "kind-lab"

    res = fake.ok("kind", "delete", "cluster", "--name", "lab")
    assert 'Deleting cluster "lab" ...' in res.stderr
    assert 'Deleted nodes: ["lab-control-plane" "lab-worker"]' in res.stderr
    kc = yaml.safe_load(fake.kubeconfig.read_text())
    assert [c["name"] for c in kc["contexts"]] == ["other"] and kc["current-context"] == ""
    again, res = fake.batch(("kind", "delete", "cluster", "--name", "lab"),
                            ("kind", "get", "kubeconfig", "--name", "lab"))
    assert (again.returncode, again.stderr.strip()) == (0, 'Deleting cluster "lab" ...')
    assert res.returncode == 1
    assert ("ERROR: could not locate any control plane nodes for cluster named 'lab'. Use the "
            "--name option to select a different cluster") in res.stderr


def test_kind_rejects_bad_configs_and_host_port_clashes(fake: Fake) -> None:
    bad = fake.config(KIND_CONFIG.replace("  kubeProxyMode: none",
                                          "  kubeProxyMode: none\n  bogus: 1"), "bad.yaml")
    res, good = fake.batch(("kind", "create", "cluster", "--name", "bad", "--config", bad),
                           ("kind", "create", "cluster", "--config", fake.config()))
    assert res.returncode == 1
    assert "line 7: field bogus not found in type v1alpha4.Networking" in res.stderr
    assert good.returncode == 0 and list(fake.read("kind.json")["clusters"]) == ["lab"]
    res = fake.run("kind", "create", "cluster", "--name", "second", "--config", fake.config())
    assert res.returncode == 1
    assert "Bind for 0.0.0.0:8443 failed: port is already allocated" in res.stderr
    assert sorted(fake.read("kind.json")["clusters"]) == ["lab"]


def test_kind_create_killed_midway_leaves_half_created_cluster(fake: Fake) -> None:
    proc = fake.popen("kind", "create", "cluster", "--config", fake.config(),
                      env={"LAB_FAKE_SLEEP": "kind:create=30"})
    try:
        fake.wait_for(lambda: (fake.read("kind.json") or {}).get("clusters", {}).get("lab"),
                      "the cluster to be recorded")
        assert fake.read("kind.json")["clusters"]["lab"]["status"] == "creating"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_calls(str(fake.state))[0]["argv"][:2] == ["create", "cluster"]
    assert not fake.kubeconfig.exists()  # kind writes the kubeconfig only at the end
    listed, res = fake.batch(("kind", "get", "clusters"),
                             ("kind", "create", "cluster", "--config", fake.config()))
    assert listed.stdout == "lab\n"
    assert res.returncode == 1 and "node(s) already exist" in res.stderr
    fake.ok("kind", "delete", "cluster", "--name", "lab")
    assert fake.read("kind.json")["clusters"] == {}


def test_docker_down(fake: Fake) -> None:
    down = {"LAB_FAKE_DOCKER_DOWN": "1"}
    msg = ("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
           "Is the docker daemon running?")
    fake.env.update(down)
    ps, ver = fake.batch(("docker", "ps"), ("docker", "version"))
    assert (ps.returncode, ps.stderr.strip()) == (1, msg)
    assert ver.returncode == 1 and ver.stdout.startswith("Client:") and msg in ver.stderr
    assert "Server:" not in ver.stdout
    del fake.env["LAB_FAKE_DOCKER_DOWN"]
    fake.write("docker.json", {"down": True})  # the same, from the state file
    res, create = fake.batch(("kind", "get", "clusters"), ("kind", "create", "cluster"))
    assert res.returncode == 1
    assert res.stderr.startswith("ERROR: failed to list clusters: command \"docker ps -a")
    assert f"Command Output: {msg}" in res.stderr
    assert create.returncode == 1 and "failed to get docker info" in create.stderr


def test_docker_info_and_version_formats(fake: Fake) -> None:
    info = json.loads(fake.ok("docker", "info", "--format", "{{json .}}").stdout)
    for key in ("ServerVersion", "OperatingSystem", "CgroupVersion", "NCPU", "MemTotal",
                "KernelVersion"):
        assert key in info
    assert (info["OperatingSystem"], info["CgroupVersion"]) == ("Ubuntu 24.04 LTS", "2")
    fake.write("docker.json", {"info": {"OperatingSystem": "Docker Desktop", "NCPU": 2}})
    res, ver = fake.batch(
        ("docker", "info", "--format", "{{.OperatingSystem}}|{{.NCPU}}|{{json .NCPU}}"),
        ("docker", "version", "--format", "{{json .}}"))
    assert res.stdout == "Docker Desktop|2|2\n"
    assert json.loads(ver.stdout)["Server"]["Version"] == info["ServerVersion"]


def test_docker_networks(fake: Fake) -> None:
    full, js, gov, res = fake.batch(
        ("docker", "network", "inspect", "kind"),
        ("docker", "network", "inspect", "-f", "{{json .IPAM.Config}}", "kind"),
        ("docker", "network", "inspect", "-f", "{{.IPAM.Config}}", "kind"),
        ("docker", "network", "inspect", "nope"))
    nets = json.loads(full.stdout)
    assert len(nets) == 1 and nets[0]["Name"] == "kind" and nets[0]["Driver"] == "bridge"
    assert nets[0]["IPAM"]["Config"] == [
        {"Subnet": "172.18.0.0/16", "Gateway": "172.18.0.1"},
        {"Subnet": "fc00:f853:ccd:e793::/64", "Gateway": "fc00:f853:ccd:e793::1"}]
    assert nets[0]["EnableIPv6"] is True and nets[0]["Containers"] == {}
    assert json.loads(js.stdout)[0]["Subnet"] == "172.18.0.0/16"
    assert gov.stdout.startswith("[{172.18.0.0/16  172.18.0.1 map[]} ")
    assert (res.returncode, res.stdout, res.stderr.strip()) == (
        1, "[]\n", "Error response from daemon: network nope not found")
    # override the subnet; the kind network may also be absent until kind creates it
    fake.write("docker.json", {"kind_network_exists": False})
    ls, missing = fake.batch(("docker", "network", "ls", "--format", "{{.Name}}"),
                             ("docker", "network", "inspect", "kind"))
    assert ls.stdout.split() == ["bridge", "host", "none"] and missing.returncode == 1
    fake.write("docker.json", {"networks": {"kind": {"EnableIPv6": False, "IPAM": {
        "Config": [{"Subnet": "10.89.0.0/24", "Gateway": "10.89.0.1"}]}}}})
    res = fake.ok("docker", "network", "inspect", "kind", "--format",
                  "{{range .IPAM.Config}}{{.Subnet}} {{end}}{{.EnableIPv6}}")
    assert res.stdout == "10.89.0.0/24 false\n"


def test_node_addresses_are_allocated_in_order_and_stable(fake: Fake) -> None:
    fake.write("docker.json", {"kind_network_exists": False})
    two = fake.config(KIND_CONFIG.replace("  extraPortMappings:\n  - containerPort: 30443\n"
                                          "    hostPort: 8443\n", ""), "two.yaml")
    one = fake.config("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\n", "one.yaml")
    fake.ok("kind", "create", "cluster", "--name", "a", "--config", two)
    assert fake.read("docker.json")["kind_network_exists"] is True
    fake.ok("kind", "create", "cluster", "--name", "b", "--config", one)
    fmt = ("{{.Name}} {{.NetworkSettings.Networks.kind.IPAddress}} "
           "{{.NetworkSettings.Networks.kind.GlobalIPv6Address}}")
    res = fake.ok("docker", "inspect", "--format", fmt, "a-control-plane", "a-worker",
                  "b-control-plane")
    assert res.stdout.splitlines() == [
        "/a-control-plane 172.18.0.2 fc00:f853:ccd:e793::2",
        "/a-worker 172.18.0.3 fc00:f853:ccd:e793::3",
        "/b-control-plane 172.18.0.4 fc00:f853:ccd:e793::4"]
    res = fake.ok("docker", "ps", "-a", "--filter", "label=io.x-k8s.kind.cluster=a",
                  "--format", "{{.Names}}")
    assert sorted(res.stdout.split()) == ["a-control-plane", "a-worker"]
    fake.ok("kind", "delete", "cluster", "--name", "a")
    fake.ok("kind", "create", "cluster", "--name", "c", "--config", one)
    res, net, ghost, ex, exghost = fake.batch(
        ("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
         "b-control-plane", "c-control-plane"),
        ("docker", "network", "inspect", "kind"), ("docker", "inspect", "ghost"),
        ("docker", "exec", "c-control-plane", "sysctl", "-n", "x"),
        ("docker", "exec", "ghost", "true"))
    assert res.stdout.split() == ["172.18.0.4", "172.18.0.2"]  # b kept its address
    containers = json.loads(net.stdout)[0]["Containers"].values()
    assert sorted(c["IPv4Address"] for c in containers) == ["172.18.0.2/16", "172.18.0.4/16"]
    assert (ghost.returncode, ghost.stderr.strip()) == (1, "Error: No such object: ghost")
    assert (ex.returncode, ex.stdout) == (0, "")
    assert "No such container: ghost" in exghost.stderr and exghost.returncode == 1


@pytest.fixture
def cluster(fake: Fake) -> Fake:
    """A kubeconfig with context kind-lab (as `kind create` leaves it) and the cilium repo."""
    fake.kubeconfig.parent.mkdir(parents=True)
    merge_kind_kubeconfig(str(fake.kubeconfig), "lab", "https://127.0.0.1:6443")
    fake.write("helm-repos.json", {"cilium": {"name": "cilium", "url": "https://helm.cilium.io/"}})
    return fake


def releases(fake: Fake) -> dict[str, Any]:
    return fake.read("helm.json")["kind-lab"]


def test_helm_install_upgrade_status_list_values(cluster: Fake, tmp_path: Path) -> None:
    add, update = cluster.batch(("helm", "repo", "add", "cilium", "https://helm.cilium.io/"),
                                ("helm", "repo", "update"))
    assert add.stdout == '"cilium" already exists with the same configuration, skipping\n'
    assert '...Successfully got an update from the "cilium" chart repository' in update.stdout
    values = tmp_path / "values.yaml"
    values.write_text("ipam:\n  mode: kubernetes\ncluster:\n  name: lab\n  id: 1\n")
    cmd = ["helm", "upgrade", "--install", "cilium", "cilium/cilium", "--version", "1.18.4",
           "--namespace", "kube-system", "-f", str(values), "--set", "cluster.id=2,a.b=true",
           "--kube-context", "kind-lab", "--wait", "--timeout", "10m"]
    res = cluster.ok(*cmd)
    assert res.stdout.startswith('Release "cilium" does not exist. Installing it now.\n')
    assert "STATUS: deployed" in res.stdout and "REVISION: 1" in res.stdout
    rec = releases(cluster)["kube-system/cilium"]
    assert (rec["revision"], rec["status"], rec["chart"], rec["version"]) == (
        1, "deployed", "cilium", "1.18.4")
    assert rec["values"] == {"ipam": {"mode": "kubernetes"}, "cluster": {"name": "lab", "id": 2},
                             "a": {"b": True}}
    res = cluster.ok(*cmd)  # nothing changed: helm still makes a new revision
    assert res.stdout.startswith('Release "cilium" has been upgraded. Happy Helming!')
    assert releases(cluster)["kube-system/cilium"]["revision"] == 2
    st, ls, gv, nf, un, norepo = cluster.batch(
        ("helm", "status", "cilium", "-n", "kube-system", "-o", "json"),
        ("helm", "list", "-A", "-o", "json"),
        ("helm", "get", "values", "cilium", "-n", "kube-system", "-o", "json"),
        ("helm", "status", "nope", "-n", "kube-system"),
        ("helm", "uninstall", "nope", "-n", "kube-system"),
        ("helm", "upgrade", "--install", "x", "nosuch/chart", "-n", "default"))
    status = json.loads(st.stdout)
    assert (status["name"], status["info"]["status"], status["version"],
            status["namespace"]) == ("cilium", "deployed", 2, "kube-system")
    assert "chart" not in status  # helm's status command drops the chart before printing
    meta = json.loads(cluster.ok("helm", "get", "metadata", "cilium", "-n", "kube-system",
                                 "-o", "json").stdout)
    assert (meta["chart"], meta["version"], meta["revision"], meta["status"]) == (
        "cilium", "1.18.4", 2, "deployed")
    listed = json.loads(ls.stdout)
    assert [(r["name"], r["revision"], r["status"], r["chart"]) for r in listed] == [
        ("cilium", "2", "deployed", "cilium-1.18.4")]
    assert json.loads(gv.stdout)["cluster"] == {"id": 2, "name": "lab"}
    assert (nf.returncode, nf.stderr.strip()) == (1, "Error: release: not found")
    assert un.stderr.strip() == "Error: uninstall: Release not loaded: nope: release: not found"
    assert norepo.returncode == 1 and "Error: repo nosuch not found" in norepo.stderr
    res = cluster.ok("helm", "uninstall", "cilium", "-n", "kube-system", "--wait")
    assert res.stdout == 'release "cilium" uninstalled\n'
    assert cluster.ok("helm", "list", "-A", "-o", "json").stdout.strip() == "[]"


def test_helm_killed_mid_upgrade_leaves_pending_release(cluster: Fake) -> None:
    cmd = ["helm", "upgrade", "--install", "cilium", "cilium/cilium", "--version", "1.18.4",
           "-n", "kube-system"]
    proc = cluster.popen(*cmd, env={"LAB_FAKE_SLEEP": "helm:upgrade=30"})
    try:
        cluster.wait_for(lambda: (cluster.read("helm.json") or {}).get("kind-lab"),
                         "the pending release")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert releases(cluster)["kube-system/cilium"]["status"] == "pending-install"
    res, plain, pending = cluster.batch(
        cmd, ("helm", "list", "-A", "-o", "json"),
        ("helm", "list", "-A", "--pending", "-o", "json"))
    assert res.returncode == 1
    assert res.stderr.strip() == ("Error: UPGRADE FAILED: another operation "
                                  "(install/upgrade/rollback) is in progress")
    assert json.loads(plain.stdout) == []
    assert [r["status"] for r in json.loads(pending.stdout)] == ["pending-install"]
    assert cluster.ok("helm", "rollback", "cilium", "1", "-n", "kube-system").stdout.strip() == \
        "Rollback was a success! Happy Helming!"
    res = cluster.ok(*cmd)
    assert "REVISION: 3" in res.stdout
    assert releases(cluster)["kube-system/cilium"]["status"] == "deployed"


def test_fail_injection_once_then_success(cluster: Fake) -> None:
    cmd = ["helm", "upgrade", "--install", "hubble", "cilium/cilium", "-n", "kube-system"]
    cluster.write("fail.json", {"helm:upgrade": {"stderr": "Error: boom", "code": 1,
                                                 "times": 1}})
    res = cluster.run(*cmd)
    assert (res.returncode, res.stderr.strip()) == (1, "Error: boom")
    assert releases(cluster)["kube-system/hubble"]["status"] == "failed"
    assert cluster.read("fail.json")["helm:upgrade"]["times"] == 0
    res = cluster.ok(*cmd)
    assert "REVISION: 2" in res.stdout and "STATUS: deployed" in res.stdout
    cluster.env["LAB_FAKE_FAIL"] = "docker:network,kind:create"
    res, kc = cluster.batch(("docker", "network", "ls"), ("kind", "create", "cluster"))
    assert res.returncode == 1 and res.stderr.startswith("Error response from daemon")
    assert kc.returncode == 1 and "ERROR: failed to create cluster" in kc.stderr
    assert cluster.read("kind.json")["clusters"] == {}


def test_helm_applies_chart_objects_to_the_api_server(fake: Fake, kube_api: ApiFront) -> None:
    """Against a real API server: what the fake helm writes must be valid there, and its second
    install updates what exists instead of creating it again."""
    fake.write("apiservers.json", {"lab": kube_api.url})
    created, res = fake.batch(("kind", "create", "cluster", "--config", fake.config()),
                              ("helm", "repo", "add", "cilium", "https://helm.cilium.io/"))
    assert created.returncode == 0
    assert res.stdout == '"cilium" has been added to your repositories\n'
    charts = fake.state / "charts" / "cilium"
    (charts / "templates").mkdir(parents=True)
    (charts / "Chart.yaml").write_text("name: cilium\nversion: 1.18.4\nappVersion: 1.18.4\n")
    (charts / "templates" / "agent.yaml").write_text(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: cilium\n"
        "spec:\n  selector: {matchLabels: {k8s-app: cilium}}\n"
        "  template:\n    metadata: {labels: {k8s-app: cilium}}\n"
        "    spec: {containers: [{name: cilium-agent, image: x}]}\n"
        "status:\n  numberReady: 1\n  desiredNumberScheduled: 1\n  currentNumberScheduled: 1\n"
        "  numberMisscheduled: 0\n---\n"
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: cilium\n"
        "  namespace: {{ .Release.Namespace }}\n---\n"
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata:\n"
        "  name: cilium\nspec:\n  controllerName: io.cilium/gateway-controller\n")
    cmd = ["helm", "upgrade", "--install", "cilium", "cilium/cilium", "-n", "kube-system",
           "--create-namespace"]
    fake.ok(*cmd)
    writes = [(r.method, r.path) for r in kube_api.writes()]
    assert writes == [
        ("POST", "/api/v1/namespaces"),  # kube-system is there already: refused, and fine
        ("POST", "/api/v1/namespaces/kube-system/serviceaccounts"),  # helm's install order
        ("POST", "/apis/apps/v1/namespaces/kube-system/daemonsets"),
        ("PUT", "/apis/apps/v1/namespaces/kube-system/daemonsets/cilium/status"),
        ("POST", "/apis/gateway.networking.k8s.io/v1/gatewayclasses"),
    ]
    ds = kube_api.get("apps/v1", "DaemonSet", "cilium", "kube-system")
    assert ds is not None and ds["status"]["numberReady"] == 1
    assert ds["metadata"]["annotations"]["meta.helm.sh/release-name"] == "cilium"
    kube_api.clear_requests()
    fake.ok(*cmd)  # second time: read, then update what exists
    puts = [r.path for r in kube_api.writes() if r.method == "PUT"]
    assert "/api/v1/namespaces/kube-system/serviceaccounts/cilium" in puts
    assert not [r for r in kube_api.writes() if r.method == "POST" and "namespaces/" in r.path]
    assert releases(fake)["kube-system/cilium"]["revision"] == 2
    # a kind the server does not serve fails the release like helm does
    (charts / "templates" / "crd.yaml").write_text(
        "apiVersion: notserved/v1\nkind: Widget\nmetadata:\n  name: w\n")
    res = fake.run(*cmd)
    assert res.returncode == 1 and 'no matches for kind "Widget"' in res.stderr
    assert releases(fake)["kube-system/cilium"]["status"] == "failed"


def test_go_template_subset() -> None:
    data = {"A": {"B": "x", "L": ["p", "q"], "M": {"k": 1}}, "N": None}
    assert render_go_template("{{.A.B}}-{{json .A.L}}-{{index .A.M \"k\"}}", data) == \
        'x-["p","q"]-1'
    assert render_go_template("{{range .A.L}}[{{.}}]{{end}}{{.Missing}}", data) == \
        "[p][q]<no value>"
    assert render_go_template("{{with .A}}{{.B}}{{end}}{{if .N}}y{{else}}n{{end}}", data) == "xn"
    assert render_go_template('{{printf "%s\\t%s" .A.B .A.B}}', data) == "x\tx"
