"""Each doctor check against prepared inputs: a fake `docker`/`kind`/`helm` on PATH, proc-style
files under a temporary root, host ports held open by the test."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab import bootstrap
from lab.config import LabConfig, parse_config
from lab.doctor import (
    INOTIFY_INSTANCES,
    INOTIFY_WATCHES,
    Finding,
    preflight,
    run_checks,
    to_json,
)
from lab.errors import LabError
from lab.logs import get as get_logger

GIB = 1024 ** 3
NODE_IMAGE = ("kindest/node:v1.33.1@sha256:"
              "050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f")
ENGINE_INFO: dict[str, Any] = {
    "ServerVersion": "27.3.1", "OperatingSystem": "Ubuntu 24.04.1 LTS", "OSType": "linux",
    "Architecture": "x86_64", "NCPU": 8, "MemTotal": 16 * GIB,
}

DOCKER = """#!/bin/sh
d="$FAKE_DOCKER_DIR"
case "$1" in
  info)
    if [ -f "$d/info.json" ]; then /bin/cat "$d/info.json"; exit 0; fi
    echo '{"ServerErrors":null}'
    echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." \\
         "Is the docker daemon running?" >&2
    exit 1;;
  network)
    if [ -f "$d/network-$3.json" ]; then /bin/cat "$d/network-$3.json"; exit 0; fi
    echo "[]"
    echo "Error response from daemon: network $3 not found" >&2
    exit 1;;
  ps)
    if [ -f "$d/ps.txt" ]; then /bin/cat "$d/ps.txt"; fi
    exit 0;;
esac
echo "fake docker: unexpected $*" >&2
exit 2
"""
KIND = """#!/bin/sh
case "$1" in
  version) echo "kind {version} go1.24.2 linux/amd64";;
  get) if [ -f "$FAKE_DOCKER_DIR/clusters.txt" ]; then /bin/cat "$FAKE_DOCKER_DIR/clusters.txt";
       else echo "No kind clusters found." >&2; fi;;
esac
"""
HELM = "#!/bin/sh\necho '{version}+g3d8990f'\n"
CILIUM = "#!/bin/sh\necho 'cilium-cli: {version} compiled with go1.25.4 on linux/amd64'\n"


@dataclass
class Env:
    root: Path
    bin: Path
    docker_dir: Path
    proc: Path

    def tool(self, name: str, body: str | None) -> None:
        path = self.bin / name
        if body is None:
            path.unlink(missing_ok=True)
            return
        path.write_text(body)
        path.chmod(0o755)

    def info(self, **changes: Any) -> None:
        """Docker answers `docker info` with the engine defaults plus ``changes``."""
        data = {**ENGINE_INFO, **changes}
        (self.docker_dir / "info.json").write_text(json.dumps(data))

    def docker_down(self) -> None:
        (self.docker_dir / "info.json").unlink(missing_ok=True)

    def network(self, name: str, *subnets: str) -> None:
        doc = [{"Name": name, "IPAM": {"Driver": "default",
                                       "Config": [{"Subnet": s} for s in subnets]}}]
        (self.docker_dir / f"network-{name}.json").write_text(json.dumps(doc))

    def ps(self, *lines: str) -> None:
        (self.docker_dir / "ps.txt").write_text("".join(line + "\n" for line in lines))

    def kind_clusters(self, *names: str) -> None:
        (self.docker_dir / "clusters.txt").write_text("".join(n + "\n" for n in names))

    def sysfile(self, rel: str, text: str | None) -> None:
        path = self.proc / rel
        if text is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def routes(self, *routes: tuple[str, str]) -> None:
        """/proc/net/route as the kernel writes it: little-endian hex destination and mask."""
        import ipaddress
        import struct

        def hexle(addr: ipaddress.IPv4Address) -> str:
            return f"{struct.unpack('<L', addr.packed)[0]:08X}"

        lines = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\t"
                 "Window\tIRTT"]
        for dev, cidr in routes:
            net = ipaddress.IPv4Network(cidr)
            lines.append(f"{dev}\t{hexle(net.network_address)}\t00000000\t0001\t0\t0\t0\t"
                         f"{hexle(net.netmask)}\t0\t0\t0")
        self.sysfile("proc/net/route", "\n".join(lines) + "\n")

    def meminfo(self, total: float, available: float) -> None:
        self.sysfile("proc/meminfo", f"MemTotal:       {int(total * GIB / 1024)} kB\n"
                     f"MemFree:         1000 kB\n"
                     f"MemAvailable:   {int(available * GIB / 1024)} kB\n")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    e = Env(tmp_path, tmp_path / "fakebin", tmp_path / "docker", tmp_path / "root")
    for d in (e.bin, e.docker_dir, e.proc):
        d.mkdir()
    monkeypatch.setenv("PATH", str(e.bin))
    monkeypatch.setenv("FAKE_DOCKER_DIR", str(e.docker_dir))
    monkeypatch.setenv("LAB_TOOLS_DIR", str(tmp_path / "tools"))
    e.tool("docker", DOCKER)
    e.tool("kind", KIND.format(version="v0.29.0"))
    e.tool("helm", HELM.format(version="v3.19.0"))
    e.tool("cilium", CILIUM.format(version="v0.18.9"))
    e.info()
    e.network("kind", "172.18.0.0/16", "fc00:f853:ccd:e793::/64")
    e.sysfile("proc/sys/fs/inotify/max_user_watches", f"{INOTIFY_WATCHES}\n")
    e.sysfile("proc/sys/fs/inotify/max_user_instances", f"{INOTIFY_INSTANCES}\n")
    e.sysfile("proc/sys/kernel/osrelease", "6.8.0-45-generic\n")
    e.sysfile("sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
    e.meminfo(16, 12)
    e.routes(("eth0", "0.0.0.0/0"), ("eth0", "192.168.1.0/24"), ("docker0", "172.17.0.0/16"),
             ("br-4d7f2a1b9c3e", "172.18.0.0/16"))
    return e


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Distinct free ports: every socket stays bound until all are picked (the OS may hand the
    same ephemeral port out again once one is closed)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port something else listens on, for the test's duration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def make_cfg(root: Path, clusters: int = 1, workers: int = 0,
             pools: list[str | None] | None = None, ports: list[tuple[int, int]] | None = None,
             listen: str = "127.0.0.1") -> LabConfig:
    pools = pools or ["172.18.255.0/24", "172.18.254.0/24", "172.18.253.0/24"][:clusters]
    if not ports:
        picked = free_ports(2 * clusters)
        ports = [(picked[2 * i], picked[2 * i + 1]) for i in range(clusters)]
    raw: dict[str, Any] = {
        "apiVersion": "kind-cilium-lab/v1",
        "versions": {"kind": "v0.29.0", "nodeImage": NODE_IMAGE, "helm": "v3.19.0",
                     "cilium": "1.18.4", "ciliumCLI": "v0.18.9", "gatewayAPI": "v1.4.0",
                     "certManager": "v1.19.0"},
        "stateDir": str(root / "state"),
        "clusters": [],
    }
    for i in range(clusters):
        c: dict[str, Any] = {"name": "lab" if i == 0 else f"lab{i + 1}", "workers": workers,
                             "gateway": {"httpHostPort": ports[i][0],
                                         "httpsHostPort": ports[i][1], "listenAddress": listen}}
        if pools[i]:
            c["lbPool"] = pools[i]
        raw["clusters"].append(c)
    return parse_config(raw, root / "lab.yaml")


class Disk:
    """os.statvfs stand-in: ``free_gib`` available to unprivileged users."""

    def __init__(self, free_gib: float) -> None:
        self.f_frsize = 4096
        self.f_bavail = int(free_gib * GIB / 4096)


def check(env: Env, cfg: LabConfig | None = None, name: str = "", *,
          states: dict[str, str] | None = None, system: str = "Linux",
          free_gib: float = 100) -> list[Finding]:
    cfg = cfg or make_cfg(env.root)
    findings = run_checks(cfg, bootstrap.lab_tools(cfg, get_logger("test")), proc_root=env.proc,
                          states=states, host_system=system,
                          statvfs=lambda path: Disk(free_gib))
    return [f for f in findings if f.name.startswith(name)]


def one(env: Env, name: str, cfg: LabConfig | None = None, **kw: Any) -> Finding:
    found = check(env, cfg, name, **kw)
    assert len(found) == 1, found
    return found[0]


# -- all in order --------------------------------------------------------------------------------

def test_healthy_machine_passes_every_check(env: Env) -> None:
    findings = check(env)
    assert [f for f in findings if f.verdict != "ok"] == []
    names = [f.name for f in findings]
    assert names[:3] == ["docker daemon", "docker desktop", "docker network kind"]
    for expected in ("fs.inotify.max_user_watches", "fs.inotify.max_user_instances",
                     "cgroup v2", "kernel", "memory", "cpus", "tool kind", "tool helm",
                     "tool Cilium CLI"):
        assert expected in names
    assert sum(n.startswith("host port") for n in names) == 2
    doc = to_json(findings)
    assert doc["ok"] is True
    assert set(doc["findings"][0]) == {"name", "verdict", "found", "fix"}


# -- docker --------------------------------------------------------------------------------------

def test_docker_ok(env: Env) -> None:
    f = one(env, "docker daemon")
    assert f.verdict == "ok" and "27.3.1" in f.found


def test_docker_daemon_down_fails_with_fix(env: Env) -> None:
    env.docker_down()
    f = one(env, "docker daemon")
    assert f.verdict == "fail"
    assert "Cannot connect to the Docker daemon" in f.found
    assert "systemctl start docker" in f.fix and "docker info" in f.fix


def test_docker_missing_fails_with_install_hint(env: Env) -> None:
    env.tool("docker", None)
    f = one(env, "docker daemon")
    assert f.verdict == "fail" and "not installed" in f.found
    assert "docs.docker.com/engine/install" in f.fix


def test_docker_desktop_warns_what_does_not_work(env: Env) -> None:
    assert one(env, "docker desktop").verdict == "ok"
    env.info(OperatingSystem="Docker Desktop", KernelVersion="6.10.14-linuxkit")
    f = one(env, "docker desktop")
    assert f.verdict == "warn"
    assert "LoadBalancer IPs" in f.found and "host ports" in f.found
    assert "https://echo.localhost:" in f.fix


def test_macos_host_warns_like_docker_desktop(env: Env) -> None:
    env.info(OperatingSystem="Ubuntu 24.04 (colima)")
    f = one(env, "docker desktop", system="Darwin")
    assert f.verdict == "warn" and "macOS" in f.found


# -- kind network vs pools -----------------------------------------------------------------------

def test_network_subnet_holds_the_pools(env: Env) -> None:
    f = one(env, "docker network kind")
    assert f.verdict == "ok"
    assert "172.18.0.0/16" in f.found and "lab=172.18.255.0/24" in f.found


def test_network_subnet_misses_the_pool_fails(env: Env) -> None:
    env.network("kind", "172.19.0.0/16")
    f = one(env, "docker network kind")
    assert f.verdict == "fail"
    assert "172.18.255.0/24" in f.found and "outside" in f.found
    assert "inside 172.19.0.0/16" in f.fix


def test_network_absent_is_created_by_kind(env: Env) -> None:
    (env.docker_dir / "network-kind.json").unlink()
    f = one(env, "docker network kind")
    assert f.verdict == "ok" and "kind will create it" in f.found
    # Derived pools (no lbPool) are carved from the usual default.
    f = one(env, "docker network kind", make_cfg(env.root, pools=[None]))
    assert f.verdict == "ok" and "172.18.255.0/24" in f.found


def test_network_absent_with_pool_outside_the_default_warns(env: Env) -> None:
    (env.docker_dir / "network-kind.json").unlink()
    f = one(env, "docker network kind", make_cfg(env.root, pools=["10.99.0.0/24"]))
    assert f.verdict == "warn"
    assert "kind will create it" in f.found and "10.99.0.0/24" in f.found
    assert "lbPool" in f.fix


# -- inotify ---------------------------------------------------------------------------------------

def test_inotify_ok(env: Env) -> None:
    findings = check(env, name="fs.inotify")
    assert [f.name for f in findings] == ["fs.inotify.max_user_watches",
                                          "fs.inotify.max_user_instances"]
    for f in findings:
        assert f.verdict == "ok", f


def test_inotify_low_warns_for_one_cluster(env: Env) -> None:
    env.sysfile("proc/sys/fs/inotify/max_user_instances", "128\n")
    f = one(env, "fs.inotify.max_user_instances")
    assert f.verdict == "warn" and "128 < 512" in f.found
    assert "fs.inotify.max_user_instances=512" in f.fix and "sysctl.d" in f.fix


def test_inotify_low_fails_for_several_clusters(env: Env) -> None:
    env.sysfile("proc/sys/fs/inotify/max_user_watches", "8192\n")
    env.sysfile("proc/sys/fs/inotify/max_user_instances", "128\n")
    cfg = make_cfg(env.root, clusters=2)
    findings = check(env, cfg, "fs.inotify")
    assert [f.verdict for f in findings] == ["fail", "fail"]
    assert "8192 < 524288" in findings[0].found and "2 clusters" in findings[0].found
    assert "fs.inotify.max_user_watches=524288" in findings[0].fix


def test_inotify_unreadable_warns(env: Env) -> None:
    env.sysfile("proc/sys/fs/inotify/max_user_watches", None)
    f = one(env, "fs.inotify.max_user_watches")
    assert f.verdict == "warn" and "sysctl fs.inotify.max_user_watches" in f.fix


# -- host ports ------------------------------------------------------------------------------------

def test_free_ports_ok(env: Env) -> None:
    findings = check(env, name="host port")
    assert [f.verdict for f in findings] == ["ok", "ok"]


def test_port_held_by_another_program_fails(env: Env, held_port: int) -> None:
    cfg = make_cfg(env.root, ports=[(held_port, free_port())])
    f = check(env, cfg, "host port")[0]
    assert f.verdict == "fail" and f"127.0.0.1:{held_port}" in f.name
    assert "another program" in f.found
    assert f"sport = :{held_port}" in f.fix and "clusters[0].gateway.httpHostPort" in f.fix


def test_port_held_by_another_container_names_it(env: Env, held_port: int) -> None:
    env.ps(f"web\t0.0.0.0:{held_port}->80/tcp, [::]:{held_port}->80/tcp")
    cfg = make_cfg(env.root, ports=[(free_port(), held_port)])
    f = check(env, cfg, "host port")[1]
    assert f.verdict == "fail" and "container web" in f.found
    assert "docker stop web" in f.fix and "httpsHostPort" in f.fix


def test_port_held_by_the_labs_own_control_plane_is_ok(env: Env, held_port: int) -> None:
    env.ps("other\t",
           f"lab-control-plane\t127.0.0.1:{held_port}->{held_port}/tcp, "
           "127.0.0.1:41234->6443/tcp")
    cfg = make_cfg(env.root, ports=[(held_port, free_port())])
    f = check(env, cfg, "host port")[0]
    assert f.verdict == "ok" and "lab-control-plane" in f.found


def test_port_taken_while_the_labs_cluster_exists_is_ok(env: Env, held_port: int) -> None:
    env.kind_clusters("lab", "someone-else")
    cfg = make_cfg(env.root, ports=[(held_port, free_port())])
    f = check(env, cfg, "host port")[0]
    assert f.verdict == "ok" and "the lab's own" in f.found


def test_recorded_state_stands_in_when_kind_is_missing(env: Env, held_port: int) -> None:
    env.tool("kind", None)
    cfg = make_cfg(env.root, ports=[(held_port, free_port())])
    assert check(env, cfg, "host port", states={"lab": "absent"})[0].verdict == "fail"
    assert check(env, cfg, "host port", states={"lab": "cni"})[0].verdict == "ok"


def test_listen_address_not_on_this_host_fails(env: Env) -> None:
    cfg = make_cfg(env.root, listen="192.0.2.55")
    f = check(env, cfg, "host port")[0]
    assert f.verdict == "fail" and "not on this host" in f.found
    assert "listenAddress" in f.fix


# -- cgroups, kernel -------------------------------------------------------------------------------

def test_cgroup_v2_ok(env: Env) -> None:
    f = one(env, "cgroup")
    assert f.verdict == "ok" and "host" in f.found


def test_cgroup_v1_fails(env: Env) -> None:
    env.sysfile("sys/fs/cgroup/cgroup.controllers", None)  # v1: the directory without the file
    f = one(env, "cgroup")
    assert f.verdict == "fail" and "v1" in f.found
    assert "systemd.unified_cgroup_hierarchy=1" in f.fix


def test_cgroup_daemon_view_wins(env: Env) -> None:
    env.info(CgroupVersion="1")
    f = one(env, "cgroup")
    assert f.verdict == "fail" and "docker daemon" in f.found


def test_cgroup_unknown_warns(env: Env) -> None:
    env.sysfile("sys/fs/cgroup/cgroup.controllers", None)
    (env.proc / "sys/fs/cgroup").rmdir()
    f = one(env, "cgroup")
    assert f.verdict == "warn" and "cgroup2fs" in f.fix


def test_kernel_ok(env: Env) -> None:
    f = one(env, "kernel")
    assert f.verdict == "ok" and "6.8.0-45-generic" in f.found


def test_kernel_too_old_fails(env: Env) -> None:
    env.sysfile("proc/sys/kernel/osrelease", "5.4.0-150-generic\n")
    f = one(env, "kernel")
    assert f.verdict == "fail" and "< 5.10" in f.found
    assert "upgrade the kernel to 5.10" in f.fix


def test_kernel_rhel8_warns(env: Env) -> None:
    env.sysfile("proc/sys/kernel/osrelease", "4.18.0-553.el8_10.x86_64\n")
    f = one(env, "kernel")
    assert f.verdict == "warn" and "RHEL 8.10" in f.fix


def test_kernel_daemon_view_wins(env: Env) -> None:
    env.sysfile("proc/sys/kernel/osrelease", "4.19.0\n")
    env.info(KernelVersion="6.10.14-linuxkit")
    f = one(env, "kernel")
    assert f.verdict == "ok" and "docker daemon" in f.found


# -- memory, cpus ----------------------------------------------------------------------------------

def test_memory_ok(env: Env) -> None:
    f = one(env, "memory")
    assert f.verdict == "ok" and "16.0 GiB total" in f.found and "1 node(s)" in f.found


def test_memory_tight_warns(env: Env) -> None:
    env.info(MemTotal=int(2 * GIB))
    f = one(env, "memory")
    assert f.verdict == "warn" and "tight" in f.found
    assert "Settings → Resources" in f.fix


def test_memory_too_little_fails(env: Env) -> None:
    env.info(MemTotal=int(1 * GIB))
    f = one(env, "memory")
    assert f.verdict == "fail" and "too little" in f.found and "fewer" in f.fix


def test_memory_counts_every_node_of_every_cluster(env: Env) -> None:
    env.info(MemTotal=int(8 * GIB))  # 2 clusters × (control plane + 1 worker) = 4 nodes
    f = one(env, "memory", make_cfg(env.root, clusters=2, workers=1))
    assert f.verdict == "warn" and "4 node(s)" in f.found


def test_memory_available_ignores_running_clusters(env: Env) -> None:
    env.meminfo(16, 1)  # little left, but the lab's cluster already runs
    assert one(env, "memory").verdict == "fail"
    env.kind_clusters("lab")
    f = one(env, "memory")
    assert f.verdict == "ok" and "1 already running" in f.found


def test_cpus(env: Env) -> None:
    assert one(env, "cpus").verdict == "ok"
    env.info(NCPU=1)
    f = one(env, "cpus")
    assert f.verdict == "warn" and "1 (docker daemon) < 2" in f.found
    assert "at least 2 CPUs" in f.fix


# -- tools -----------------------------------------------------------------------------------------

def test_tools_at_pinned_versions_ok(env: Env) -> None:
    assert [f.verdict for f in check(env, name="tool ")] == ["ok", "ok", "ok"]


def test_tool_wrong_version_fails_with_fix(env: Env) -> None:
    env.tool("kind", KIND.format(version="v0.20.0"))
    f = one(env, "tool kind")
    assert f.verdict == "fail" and "v0.20.0" in f.found and "pins v0.29.0" in f.found
    assert "invoke lab.tools" in f.fix


def test_required_tool_missing_fails(env: Env) -> None:
    env.tool("helm", None)
    f = one(env, "tool helm")
    assert f.verdict == "fail" and "not installed" in f.found and "helm.sh" in f.fix


def test_cilium_cli_is_optional(env: Env) -> None:
    env.tool("cilium", None)
    assert one(env, "tool Cilium CLI").verdict == "warn"
    env.tool("cilium", CILIUM.format(version="v0.16.0"))
    f = one(env, "tool Cilium CLI")
    assert f.verdict == "warn" and "v0.16.0" in f.found and "invoke lab.tools" in f.fix


# -- preflight and the tasks ----------------------------------------------------------------------

def test_preflight_lists_every_failure_with_its_fix(env: Env, held_port: int) -> None:
    env.info(CgroupVersion="1")
    cfg = make_cfg(env.root, ports=[(held_port, free_port())])
    tools = bootstrap.lab_tools(cfg, get_logger("test"))
    with pytest.raises(LabError) as err:
        preflight(cfg, tools, get_logger("test"), proc_root=env.proc, host_system="Linux")
    msg = err.value.message
    assert "2 problem(s)" in msg
    assert f"host port 127.0.0.1:{held_port}" in msg and "sport = :" in msg
    assert "cgroup v1" in msg and "unified_cgroup_hierarchy" in msg
    assert "--skip-doctor" in err.value.hint


def test_preflight_passes_with_warnings_only(env: Env) -> None:
    env.info(NCPU=1)
    cfg = make_cfg(env.root)
    findings = preflight(cfg, bootstrap.lab_tools(cfg, get_logger("test")), get_logger("test"),
                         proc_root=env.proc, host_system="Linux")
    assert {f.verdict for f in findings} == {"ok", "warn"}


def test_doctor_task_json_and_exit_code(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    from invoke.context import Context
    from invoke.exceptions import Exit

    from lab.tasks.tools import TOOL_TASKS, doctor

    assert sorted(t.name for t in TOOL_TASKS) == ["doctor", "tools"]
    cfg_file = env.root / "lab.yaml"
    cfg_file.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "kind-cilium-lab/v1",
        "versions": {"kind": "v0.29.0", "nodeImage": NODE_IMAGE, "helm": "v3.19.0",
                     "cilium": "1.18.4", "ciliumCLI": "v0.18.9", "gatewayAPI": "v1.4.0",
                     "certManager": "v1.19.0"},
        "stateDir": str(env.root / "state"),
        "clusters": [{"name": "lab", "gateway": {"httpHostPort": free_port(),
                                                 "httpsHostPort": free_port()}}]}))
    env.docker_down()  # a sure failure, whatever this machine's /proc says
    with pytest.raises(Exit) as exc:
        doctor(Context(), config=str(cfg_file), json_=True, log_format="json")
    assert exc.value.code == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    failed = {f["name"] for f in doc["findings"] if f["verdict"] == "fail"}
    assert "docker daemon" in failed


# -- rootless engines (kind provider.go info(), create.go validateProvider, rootless.md) -----------

ROOTLESS = ["name=seccomp,profile=builtin", "name=rootless", "name=cgroupns"]
DELEGATED = {"CgroupVersion": "2", "CgroupDriver": "systemd", "MemoryLimit": True,
             "PidsLimit": True, "CPUShares": True}


def test_rootful_engine_is_ok(env: Env) -> None:
    env.info(SecurityOptions=["name=apparmor", "name=seccomp,profile=builtin"], **DELEGATED)
    assert one(env, "rootless").verdict == "ok"


def test_rootless_engine_with_delegation_warns_about_bpf(env: Env) -> None:
    env.info(SecurityOptions=ROOTLESS, **DELEGATED)
    f = one(env, "rootless")
    assert f.verdict == "warn" and "BPF" in f.found and "rootful Docker" in f.fix


def test_rootless_engine_without_delegation_fails_with_the_systemd_fix(env: Env) -> None:
    env.info(SecurityOptions=ROOTLESS, **{**DELEGATED, "PidsLimit": False})
    f = one(env, "rootless")
    assert f.verdict == "fail" and "not delegated" in f.found
    assert "/etc/systemd/system/user@.service.d/delegate.conf" in f.fix and "Delegate=yes" in f.fix


def test_rootless_engine_on_cgroup_v1_fails(env: Env) -> None:
    env.info(SecurityOptions=ROOTLESS, **{**DELEGATED, "CgroupVersion": "1"})
    f = one(env, "rootless")
    assert f.verdict == "fail" and "cgroup v2" in f.found
    assert "systemd.unified_cgroup_hierarchy=1" in f.fix


def test_rootless_engine_cannot_publish_privileged_host_ports(env: Env) -> None:
    env.info(SecurityOptions=ROOTLESS, **DELEGATED)
    env.sysfile("proc/sys/net/ipv4/ip_unprivileged_port_start", "1024\n")
    cfg = make_cfg(env.root, ports=[(80, 443)])
    f = one(env, "rootless", cfg)
    assert f.verdict == "fail" and "80, 443" in f.found
    assert "net.ipv4.ip_unprivileged_port_start=80" in f.fix


def test_rootless_podman_is_recognised(env: Env) -> None:
    env.info(host={"security": {"rootless": True}}, **DELEGATED)
    assert one(env, "rootless").verdict == "warn"


# -- socket-LB on kind (cilium v1.18.4 Documentation/installation/kind.rst) ------------------------

CGROUPS_V1_NET = ("#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t0\t1\t1\n"
                  "net_cls\t4\t1\t1\nnet_prio\t4\t1\t1\nmemory\t0\t90\t1\n")
CGROUPS_V2_ONLY = ("#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t0\t1\t1\n"
                   "net_cls\t0\t1\t1\nnet_prio\t0\t1\t1\nmemory\t0\t90\t1\n")


def test_socket_lb_ok_on_a_new_kernel(env: Env) -> None:
    env.info(KernelVersion="5.14.0-427.el9.x86_64")
    env.sysfile("proc/cgroups", CGROUPS_V1_NET)  # irrelevant from 5.14 on
    assert one(env, "socket-LB").verdict == "ok"


def test_socket_lb_fails_on_an_old_kernel_with_net_cls_mounted(env: Env) -> None:
    env.info(KernelVersion="5.10.0-32-amd64")
    env.sysfile("proc/cgroups", CGROUPS_V1_NET)
    f = one(env, "socket-LB")
    assert f.verdict == "fail" and "net_cls/net_prio" in f.found
    assert "cgroup_no_v1=net_cls,net_prio" in f.fix and "5.14" in f.fix


def test_socket_lb_ok_on_an_old_kernel_without_v1_net_controllers(env: Env) -> None:
    env.info(KernelVersion="5.10.0-32-amd64")
    env.sysfile("proc/cgroups", CGROUPS_V2_ONLY)
    assert one(env, "socket-LB").verdict == "ok"


def test_socket_lb_warns_when_the_kernel_is_unknown(env: Env) -> None:
    env.info(KernelVersion="")
    env.sysfile("proc/sys/kernel/osrelease", "unknown\n")
    assert one(env, "socket-LB").verdict == "warn"


# -- free disk (kind disables the kubelet's disk eviction) -----------------------------------------

@pytest.mark.parametrize(("free", "verdict"), [(50, "ok"), (3, "warn"), (1, "fail")])
def test_free_disk(env: Env, free: float, verdict: str) -> None:
    env.info(DockerRootDir="/var/lib/docker")
    f = one(env, "free disk", free_gib=free)
    assert f.verdict == verdict, f
    if verdict != "ok":
        assert "docker system prune" in f.fix and "image pull failures" in f.fix


# -- host routes over the lab's ranges -------------------------------------------------------------

def test_routes_ok_with_only_docker_and_lan_routes(env: Env) -> None:
    f = one(env, "host routes")
    assert f.verdict == "ok", f


def test_vpn_route_over_the_pool_fails(env: Env) -> None:
    env.routes(("eth0", "0.0.0.0/0"), ("br-4d7f2a1b9c3e", "172.18.0.0/16"),
               ("tun0", "172.18.255.0/24"))
    f = one(env, "host routes")
    assert f.verdict == "fail" and "172.18.255.0/24 via tun0" in f.found
    assert "lbPool" in f.fix


def test_vpn_route_over_the_pod_cidr_warns(env: Env) -> None:
    env.routes(("eth0", "0.0.0.0/0"), ("wg0", "10.0.0.0/8"))
    f = one(env, "host routes")
    assert f.verdict == "warn" and "podCIDR 10.244.0.0/16 overlaps 10.0.0.0/8 via wg0" in f.found
    assert "serviceCIDR 10.96.0.0/16 overlaps 10.0.0.0/8 via wg0" in f.found


def test_routes_warn_when_unreadable(env: Env) -> None:
    env.sysfile("proc/net/route", None)
    assert one(env, "host routes").verdict == "warn"


# -- firewalld / SELinux (known-issues.md "Fedora") and Cilium on the host -------------------------

def test_firewalld_nftables_backend_warns_only_when_enabled(env: Env) -> None:
    env.sysfile("etc/firewalld/firewalld.conf", "DefaultZone=public\nFirewallBackend=nftables\n")
    assert one(env, "firewalld").verdict == "ok"  # installed, not enabled
    env.sysfile("etc/systemd/system/multi-user.target.wants/firewalld.service", "[Unit]\n")
    f = one(env, "firewalld")
    assert f.verdict == "warn" and "FirewallBackend=iptables" in f.fix
    env.sysfile("etc/firewalld/firewalld.conf", "FirewallBackend=iptables\n")
    assert one(env, "firewalld").verdict == "ok"


def test_selinux_enforcing_on_fedora_33_warns(env: Env) -> None:
    env.sysfile("sys/fs/selinux/enforce", "1")
    env.sysfile("etc/os-release", 'NAME="Fedora Linux"\nID=fedora\nVERSION_ID=33\n')
    f = one(env, "selinux")
    assert f.verdict == "warn" and "setenforce 0" in f.fix
    env.sysfile("etc/os-release", 'NAME="Fedora Linux"\nID=fedora\nVERSION_ID=40\n')
    assert one(env, "selinux").verdict == "ok"


def test_cilium_agent_on_the_host_warns_but_not_one_in_a_kind_node(env: Env) -> None:
    env.sysfile("proc/4242/comm", "cilium-agent\n")
    env.sysfile("proc/4242/cgroup", "0::/system.slice/docker-0123abcd.scope/kubelet.slice/"
                "kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/cri-containerd-9f.scope\n")
    assert one(env, "cilium on the host").verdict == "ok"
    env.sysfile("proc/777/comm", "cilium-agent\n")
    env.sysfile("proc/777/cgroup", "0::/system.slice/cilium.service\n")
    f = one(env, "cilium on the host")
    assert f.verdict == "warn" and "pid 777" in f.found and "bpftool cgroup tree" in f.fix


# -- Docker before any download (lab.up's order) ---------------------------------------------------

def test_host_checks_without_tools_name_the_docker_daemon(env: Env) -> None:
    env.docker_down()
    for tool in ("kind", "helm", "cilium"):
        env.tool(tool, None)  # nothing downloaded yet
    cfg = make_cfg(env.root)
    names = [f.name for f in run_checks(cfg, bootstrap.lab_tools(cfg, get_logger("test")),
                                        proc_root=env.proc, include_tools=False)]
    assert not [n for n in names if n.startswith("tool ")]
    with pytest.raises(LabError) as err:
        preflight(cfg, bootstrap.lab_tools(cfg, get_logger("test")), get_logger("test"),
                  proc_root=env.proc, include_tools=False)
    assert "docker daemon" in err.value.message and "tool " not in err.value.message
