"""Preflight checks: find in seconds what would otherwise fail ten minutes into `lab.up`.

Each check gives a verdict (ok / warn / fail), what was found and the exact fix. `preflight` runs
them all and raises one `LabError` listing every failing check; `lab.up` calls it before any side
effect. Where Docker runs the containers in a VM (Docker Desktop, macOS) the daemon's view of
kernel, cgroups, memory and CPUs is the one that matters, so it is preferred over the host's.

Sources for the thresholds: kind ``site/content/docs/user/known-issues.md`` (inotify limits for
several clusters, Docker Desktop cannot reach node IPs), cilium
``Documentation/operations/system_requirements.rst`` (kernel >= 5.10 or RHEL 8.10's 4.18),
cilium ``Documentation/installation/kind.rst`` (socket-LB needs cgroup v2).

The host checks added for what kind and Cilium users commonly hit (sources at the pinned tags):
rootless Docker/Podman (kind ``pkg/cluster/internal/providers/docker/provider.go`` ``info()``:
``SecurityOptions`` ``name=rootless``; ``pkg/cluster/internal/create/create.go``
``validateProvider``: cgroup v2 and ``Delegate=yes``; ``site/content/docs/user/rootless.md``);
socket-LB on kind (cilium v1.18.4 ``Documentation/installation/kind.rst`` lines 50-85: private
cgroup namespaces, which kind requests with ``--cgroupns=private``, and kernel >= 5.14 or the
cgroup v1 ``net_cls``/``net_prio`` controllers off; lines 115-125: another Cilium or overlapping
BPF cgroup programs on the host crash the agents); free disk (kind
``pkg/cluster/internal/kubeadm/config.go`` sets ``evictionHard`` to 0%, so a full disk shows as
image pull failures; known-issues.md "Failing to properly start cluster"); host routes over the
lab's ranges (known-issues.md "Local Subnet Clashes"); firewalld's nftables backend and SELinux
on Fedora (known-issues.md "Fedora").
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import platform
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lab.bootstrap import REQUIRED, TITLES
from lab.config import ClusterConfig, LabConfig
from lab.errors import LabError
from lab.logs import Logger
from lab.network import PoolError, derive_pools
from lab.state import StateStore
from lab.tools import INSTALL_HINTS, Tools

Verdict = Literal["ok", "warn", "fail"]

INOTIFY_WATCHES = 524288
INOTIFY_INSTANCES = 512
KERNEL_MIN = (5, 10)
GIB = 1024 ** 3
MEM_PER_NODE_WARN = 2.5 * GIB  # Cilium + envoy + hubble + cert-manager + the control plane
MEM_PER_NODE_FAIL = 1.5 * GIB
MIN_CPUS = 2
KIND_DEFAULT_SUBNET = "172.18.0.0/16"
DOCKER_TIMEOUT = 20.0
SOCKET_LB_KERNEL = (5, 14)  # cgroup v1 net_cls/net_prio no longer break BPF socket hooks
DISK_PER_NODE_WARN = 4 * GIB  # node image layers + Cilium, Envoy, Hubble, cert-manager images
DISK_PER_NODE_FAIL = 2 * GIB
UNPRIVILEGED_PORT_START = 1024  # the kernel's default net.ipv4.ip_unprivileged_port_start

SYSCTL_FIX = ("sudo sysctl -w fs.inotify.{key}={need}; to keep it across reboots: "
              "echo 'fs.inotify.{key} = {need}' | sudo tee -a /etc/sysctl.d/99-kind.conf")


@dataclass
class Finding:
    name: str
    verdict: Verdict
    found: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class _Facts:
    """What the checks share: the daemon's view and what the lab already runs."""

    docker: bool = False  # the daemon answered
    docker_error: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    published: dict[int, list[str]] = field(default_factory=dict)  # host port → containers
    existing: set[str] = field(default_factory=set)  # the lab's clusters that already exist
    vm: bool = False  # containers run in a VM the host cannot route to (Docker Desktop, macOS)
    vm_why: str = ""
    network: dict[str, Any] = field(default_factory=dict)  # `docker network inspect` of it
    pools: dict[str, str] = field(default_factory=dict)  # cluster → LB pool, when known


StatVfs = Callable[[Path], Any]  # os.statvfs, or a stand-in in the tests


def run_checks(cfg: LabConfig, tools: Tools, *, proc_root: Path = Path("/"),
               states: dict[str, str] | None = None,
               host_system: str | None = None, include_tools: bool = True,
               statvfs: StatVfs = os.statvfs) -> list[Finding]:
    """Every check, in a fixed order. Never raises for what it finds; reports it.

    ``proc_root`` is where ``proc/sys/fs/inotify/*``, ``proc/sys/kernel/osrelease``,
    ``proc/meminfo`` and ``sys/fs/cgroup/cgroup.controllers`` are read (tests point it at temp
    files). ``states`` maps cluster name → recorded state; it stands in for `kind get clusters`
    when kind is unavailable. ``host_system`` overrides `platform.system()` (tests).
    ``include_tools=False`` leaves out the tool versions: the checks that need no download, so
    `lab.up` can run them (Docker first) before fetching anything. ``statvfs`` reads free disk.
    """
    system = host_system or platform.system()
    facts = _gather(cfg, tools, states or {}, system)
    findings = [_check_docker(tools, facts), _check_desktop(cfg, facts),
                _check_network(cfg, tools, facts), _check_rootless(cfg, proc_root, facts)]
    findings += _check_inotify(cfg, proc_root, facts, system)
    findings += _check_ports(cfg, facts)
    findings += [_check_cgroup(proc_root, facts), _check_kernel(proc_root, facts, system),
                 _check_socket_lb(proc_root, facts, system),
                 _check_memory(cfg, proc_root, facts), _check_cpus(facts),
                 _check_disk(cfg, proc_root, facts, statvfs),
                 _check_routes(cfg, proc_root, facts, system),
                 _check_host_cilium(proc_root, facts, system),
                 *_check_fedora(proc_root, facts, system)]
    if include_tools:
        findings += _check_tools(tools)
    findings.append(_check_image_cache(cfg, tools, facts))
    return findings


def preflight(cfg: LabConfig, tools: Tools, log: Logger, *, proc_root: Path = Path("/"),
              host_system: str | None = None, include_tools: bool = True) -> list[Finding]:
    """Run the checks, log each, raise `LabError` naming every failing one with its fix.

    `lab.up` calls it with ``include_tools=False`` before downloading the pinned tools, so a
    missing Docker daemon (or another host problem) is the first thing reported.
    """
    findings = run_checks(cfg, tools, proc_root=proc_root, states=recorded_states(cfg),
                          host_system=host_system, include_tools=include_tools)
    for f in findings:
        level = {"ok": log.debug, "warn": log.warning, "fail": log.error}[f.verdict]
        level("doctor.check", check=f.name, verdict=f.verdict, found=f.found,
              **({"fix": f.fix} if f.fix and f.verdict != "ok" else {}))
    failed = [f for f in findings if f.verdict == "fail"]
    if failed:
        lines = "\n  ".join(f"✗ {f.name}: {f.found}\n      fix: {f.fix}" for f in failed)
        raise LabError(
            f"preflight found {len(failed)} problem(s) that would break the lab:\n  {lines}",
            "apply the fixes above, then run again (nothing was changed); `invoke lab.doctor` "
            "shows every check, `--skip-doctor` skips them at your own risk",
        )
    return findings


def recorded_states(cfg: LabConfig) -> dict[str, str]:
    """Each configured cluster's recorded state (read-only; unreadable records are skipped)."""
    store = StateStore(cfg.state_dir)
    states: dict[str, str] = {}
    for c in cfg.clusters:
        try:
            states[c.name] = store.load(c.name).state
        except LabError:
            continue
    return states


def to_json(findings: list[Finding]) -> dict[str, Any]:
    return {"ok": not any(f.verdict == "fail" for f in findings),
            "findings": [f.to_json() for f in findings]}


# -- gathering -------------------------------------------------------------------------------------

def _docker(tools: Tools, args: list[str]) -> tuple[int, str, str]:
    try:
        res = tools.run("docker", args, check=False, quiet=True, timeout=DOCKER_TIMEOUT)
    except LabError as exc:
        return -1, "", exc.message
    return res.returncode, res.stdout, res.stderr


def _gather(cfg: LabConfig, tools: Tools, states: dict[str, str], system: str) -> _Facts:
    facts = _Facts()
    if tools.which("docker") is None:
        facts.docker_error = "the docker CLI is not installed"
    else:
        rc, out, err = _docker(tools, ["info", "--format", "{{json .}}"])
        info: Any = None
        try:
            info = json.loads(out) if out.strip() else None
        except ValueError:
            info = None
        server_errors = info.get("ServerErrors") if isinstance(info, dict) else None
        if rc != 0 or not isinstance(info, dict) or server_errors or not info.get("ServerVersion"):
            detail = (err.strip() or "; ".join(server_errors or []) or out.strip()
                      or f"exit code {rc}")
            facts.docker_error = detail.splitlines()[-1] if detail else f"exit code {rc}"
        else:
            facts.docker, facts.info = True, info
            rc, out, _ = _docker(tools, ["ps", "--format", "{{.Names}}\t{{.Ports}}"])
            if rc == 0:
                facts.published = _published_ports(out)
    kind_clusters: set[str] | None = None
    if tools.which("kind") is not None:
        try:
            res = tools.run("kind", ["get", "clusters"], check=False, quiet=True, timeout=30)
            if res.returncode == 0:
                kind_clusters = {ln.strip() for ln in res.stdout.splitlines() if ln.strip()}
        except LabError:
            kind_clusters = None
    for c in cfg.clusters:
        if kind_clusters is not None:
            if c.name in kind_clusters:
                facts.existing.add(c.name)
        elif states.get(c.name, "absent") != "absent":
            facts.existing.add(c.name)
    os_name = str(facts.info.get("OperatingSystem", ""))
    if "docker desktop" in os_name.lower():
        facts.vm, facts.vm_why = True, f"Docker Desktop ({os_name})"
    elif system == "Darwin":
        facts.vm, facts.vm_why = True, f"macOS: Docker runs in a VM ({os_name or 'unknown OS'})"
    return facts


PORT_RE = re.compile(r"(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]*\]|::):(\d+)(?:-(\d+))?->")


def _published_ports(ps_output: str) -> dict[int, list[str]]:
    """host port → names of the containers publishing it, from `docker ps` Names<TAB>Ports."""
    ports: dict[int, list[str]] = {}
    for line in ps_output.splitlines():
        name, _, spec = line.partition("\t")
        for m in PORT_RE.finditer(spec):
            first = int(m.group(1))
            last = int(m.group(2) or first)
            for port in range(first, last + 1):
                owners = ports.setdefault(port, [])
                if name.strip() and name.strip() not in owners:
                    owners.append(name.strip())
    return ports


def _read(proc_root: Path, rel: str) -> str | None:
    try:
        return (proc_root / rel).read_text()
    except OSError:
        return None


# -- checks ----------------------------------------------------------------------------------------

def _check_docker(tools: Tools, facts: _Facts) -> Finding:
    name = "docker daemon"
    if tools.which("docker") is None:
        return Finding(name, "fail", "the docker CLI is not installed", INSTALL_HINTS["docker"])
    if not facts.docker:
        return Finding(
            name, "fail", f"`docker info` failed: {facts.docker_error}",
            "start Docker (`sudo systemctl start docker`, or open Docker Desktop) and let your "
            "user talk to it without sudo (`sudo usermod -aG docker $USER`, then log in again); "
            "`docker info` must succeed")
    i = facts.info
    return Finding(name, "ok", f"Docker {i.get('ServerVersion')} on {i.get('OperatingSystem', '?')}"
                   f" ({i.get('OSType', 'linux')}/{i.get('Architecture', '?')})")


def _check_desktop(cfg: LabConfig, facts: _Facts) -> Finding:
    name = "docker desktop"
    if not facts.docker and not facts.vm:
        return Finding(name, "warn", "not checked: Docker is not reachable",
                       "fix the docker daemon check first")
    if not facts.vm:
        return Finding(name, "ok", "Docker Engine on this host: LoadBalancer IPs and node IPs "
                       "are reachable from the host")
    host = f"{cfg.gateway_hosts[0]}.localhost" if cfg.gateway_hosts else "echo.localhost"
    maps = ", ".join(f"{c.name}: http {c.gateway.listen_address}:{c.gateway.http_host_port}, "
                     f"https {c.gateway.listen_address}:{c.gateway.https_host_port}"
                     for c in cfg.clusters)
    first = cfg.clusters[0].gateway.https_host_port if cfg.clusters else 30443
    return Finding(
        name, "warn",
        f"{facts.vm_why}: the host cannot reach node IPs or LoadBalancer IPs (the LB pool, "
        "L2 announcements); only the published host ports work",
        f"use the host-port mappings ({maps}), e.g. https://{host}:{first}; "
        "LoadBalancer IPs are reachable only from containers on the kind network. For "
        "host access to LB IPs run the lab on Linux with Docker Engine")


def _check_network(cfg: LabConfig, tools: Tools, facts: _Facts) -> Finding:
    net = cfg.docker_network
    name = f"docker network {net}"
    if not facts.docker:
        return Finding(name, "warn", "not checked: Docker is not reachable",
                       "fix the docker daemon check first")
    rc, out, err = _docker(tools, ["network", "inspect", net])
    if rc != 0:
        msg = (err or out).strip()
        if re.search(r"not found|no such network", msg, re.IGNORECASE):
            try:
                pools = derive_pools(cfg.clusters, [KIND_DEFAULT_SUBNET], net)
            except PoolError as exc:
                return Finding(
                    name, "warn",
                    f"absent: kind will create it (usually {KIND_DEFAULT_SUBNET}), but with that "
                    f"subnet: {exc.message}", exc.hint)
            return Finding(name, "ok", f"absent: kind will create it (usually "
                           f"{KIND_DEFAULT_SUBNET}); pools then: {_pools_text(pools)}")
        return Finding(name, "warn", f"`docker network inspect {net}` failed: "
                       f"{msg.splitlines()[-1] if msg else f'exit code {rc}'}",
                       f"check `docker network inspect {net}` by hand")
    try:
        data = json.loads(out)
        ipam = data[0].get("IPAM") or {}
        subnets = [str(s["Subnet"]) for s in ipam.get("Config") or [] if s.get("Subnet")]
        facts.network = dict(data[0], subnets=subnets)
    except (ValueError, IndexError, KeyError, TypeError, AttributeError):
        return Finding(name, "warn", f"could not read `docker network inspect {net}`",
                       f"check it by hand: docker network inspect -f '{{{{.IPAM.Config}}}}' {net}")
    try:
        pools = derive_pools(cfg.clusters, subnets, net)
    except PoolError as exc:
        return Finding(name, "fail", f"subnets {', '.join(subnets) or 'none'}: {exc.message}",
                       exc.hint)
    facts.pools = pools
    return Finding(name, "ok", f"subnets {', '.join(subnets)}; pools {_pools_text(pools)}")


def _pools_text(pools: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in pools.items())


def _check_inotify(cfg: LabConfig, proc_root: Path, facts: _Facts,
                   system: str) -> list[Finding]:
    several = len(cfg.clusters) > 1
    findings = []
    for key, need in (("max_user_watches", INOTIFY_WATCHES),
                      ("max_user_instances", INOTIFY_INSTANCES)):
        name = f"fs.inotify.{key}"
        if facts.vm or system != "Linux":
            findings.append(Finding(name, "ok", "not checked: the containers run in Docker's VM, "
                                    "whose limits this host cannot read"))
            continue
        raw = _read(proc_root, f"proc/sys/fs/inotify/{key}")
        try:
            value = int((raw or "").strip())
        except ValueError:
            findings.append(Finding(name, "warn", f"could not read /proc/sys/fs/inotify/{key}",
                                    f"check `sysctl fs.inotify.{key}` (kind wants >= {need})"))
            continue
        if value >= need:
            findings.append(Finding(name, "ok", f"{value} (>= {need})"))
            continue
        verdict: Verdict = "fail" if several else "warn"
        why = (f"{len(cfg.clusters)} clusters hit 'too many open files'" if several else
               "enough for one cluster usually; several clusters hit 'too many open files'")
        findings.append(Finding(name, verdict, f"{value} < {need}: {why}",
                                SYSCTL_FIX.format(key=key, need=need)))
    return findings


def _check_ports(cfg: LabConfig, facts: _Facts) -> list[Finding]:
    findings = []
    own = {c.control_plane: c for c in cfg.clusters}
    for c in cfg.clusters:
        for proto, port in (("http", c.gateway.http_host_port),
                            ("https", c.gateway.https_host_port)):
            findings.append(_check_port(c, proto, port, facts, own))
    return findings


def _check_port(c: ClusterConfig, proto: str, port: int, facts: _Facts,
                own: dict[str, ClusterConfig]) -> Finding:
    addr = c.gateway.listen_address
    name = f"host port {addr}:{port} ({c.name} {proto})"
    field_path = f"clusters[{c.index}].gateway.{proto}HostPort"
    problem = port_in_use(addr, port)
    if problem is None:
        return Finding(name, "ok", "free")
    kind, detail = problem
    if kind == "bad-address":
        return Finding(name, "fail", detail,
                       f"set clusters[{c.index}].gateway.listenAddress to 127.0.0.1 or 0.0.0.0")
    if kind == "untested":
        return Finding(name, "warn", detail, "Docker binds host ports itself (as root): nothing "
                       "to do unless `lab.up` reports the port taken")
    owners = facts.published.get(port, [])
    mine = [o for o in owners if o in own]
    if mine:
        return Finding(name, "ok", f"in use by {mine[0]}, the lab's own cluster")
    if c.name in facts.existing:
        return Finding(name, "ok", f"in use; kind cluster {c.name!r} (the lab's own) exists")
    if owners:
        return Finding(name, "fail", f"in use by container {', '.join(owners)}",
                       f"stop it (`docker stop {owners[0]}`; for another kind cluster "
                       "`kind delete cluster --name <name>`) or set "
                       f"{field_path} to a free port")
    return Finding(name, "fail", f"in use by another program ({detail})",
                   f"find it (`sudo ss -ltnp 'sport = :{port}'` or "
                   f"`lsof -nP -iTCP:{port} -sTCP:LISTEN`) and stop it, or set {field_path} "
                   "to a free port")


def port_in_use(addr: str, port: int) -> tuple[str, str] | None:
    """None when ``addr:port`` can be bound, i.e. nothing listens there; else (kind, detail).

    kind is ``busy`` (something listens), ``untested`` (e.g. a port below 1024 without root) or
    ``bad-address`` (the listen address is not on this host).
    """
    family = socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            s.bind((addr, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "busy", os.strerror(exc.errno)
            if exc.errno in (errno.EACCES, errno.EPERM):
                return "untested", f"could not test: {exc.strerror} (ports below 1024 need root)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return "bad-address", f"the address {addr} is not on this host"
            return "untested", f"could not test: {exc}"
    return None


def _check_cgroup(proc_root: Path, facts: _Facts) -> Finding:
    name = "cgroup v2"
    fix = ("boot the host with cgroup v2 (systemd.unified_cgroup_hierarchy=1 on the kernel "
           "command line, e.g. in GRUB_CMDLINE_LINUX, then reboot); Cilium's socket-LB in kind "
           "needs it")
    version = str(facts.info.get("CgroupVersion", "")) if facts.docker else ""
    source = "docker daemon"
    if not version:
        source = "host"
        if (proc_root / "sys/fs/cgroup/cgroup.controllers").is_file():
            version = "2"
        elif (proc_root / "sys/fs/cgroup").is_dir():
            version = "1"
    if version == "2":
        return Finding(name, "ok", f"cgroup v2 ({source})")
    if version == "1":
        return Finding(name, "fail", f"cgroup v1 ({source})", fix)
    return Finding(name, "warn", "could not tell the cgroup version",
                   "check `stat -fc %T /sys/fs/cgroup` prints cgroup2fs; " + fix)


def _check_kernel(proc_root: Path, facts: _Facts, system: str) -> Finding:
    name = "kernel"
    release = str(facts.info.get("KernelVersion", "")) if facts.docker else ""
    source = "docker daemon"
    if not release:
        source = "host"
        release = (_read(proc_root, "proc/sys/kernel/osrelease") or "").strip()
        if not release and system == "Linux":
            release = platform.release()
    m = re.match(r"(\d+)\.(\d+)", release)
    want = f"{KERNEL_MIN[0]}.{KERNEL_MIN[1]}"
    if not m:
        return Finding(name, "warn", f"could not read the kernel version ({release or 'none'})",
                       f"check `uname -r` is {want} or newer (Cilium 1.18's minimum)")
    have = (int(m.group(1)), int(m.group(2)))
    if have >= KERNEL_MIN:
        return Finding(name, "ok", f"{release} ({source}, >= {want})")
    if have == (4, 18) and re.search(r"\.el8", release):
        return Finding(name, "warn", f"{release} ({source}): RHEL 8's 4.18 works only from "
                       "RHEL 8.10 on", "make sure the host is RHEL 8.10 or newer")
    return Finding(name, "fail", f"{release} ({source}) < {want}, Cilium 1.18's minimum",
                   f"upgrade the kernel to {want} or newer (e.g. your distribution's HWE/backports "
                   "kernel), or update Docker Desktop, whose VM brings its own kernel")


def _meminfo(proc_root: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in (_read(proc_root, "proc/meminfo") or "").splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            values[m.group(1)] = int(m.group(2)) * 1024
    return values


def _check_memory(cfg: LabConfig, proc_root: Path, facts: _Facts) -> Finding:
    name = "memory"
    nodes = sum(1 + c.workers for c in cfg.clusters)
    new_nodes = sum(1 + c.workers for c in cfg.clusters if c.name not in facts.existing)
    meminfo = {} if facts.vm else _meminfo(proc_root)
    total = int(facts.info.get("MemTotal") or 0) if facts.docker else 0
    source = "docker daemon" if total else "host"
    total = total or meminfo.get("MemTotal", 0)
    available = meminfo.get("MemAvailable")
    fix = ("free memory (close programs, delete unused kind clusters: `kind get clusters`), "
           "give Docker Desktop more memory (Settings → Resources), or configure fewer "
           "clusters/workers")
    if not total:
        return Finding(name, "warn", "could not tell how much memory Docker has",
                       f"make sure Docker has ~{MEM_PER_NODE_WARN / GIB:.1f} GiB per node "
                       f"({nodes} node(s))")
    found = (f"{total / GIB:.1f} GiB total ({source})"
             + (f", {available / GIB:.1f} GiB available" if available is not None else "")
             + f"; {nodes} node(s) at ~{MEM_PER_NODE_WARN / GIB:.1f} GiB each"
             + (f", {nodes - new_nodes} already running" if nodes != new_nodes else ""))
    verdict: Verdict = "ok"
    if total < nodes * MEM_PER_NODE_FAIL:
        verdict = "fail"
    elif total < nodes * MEM_PER_NODE_WARN:
        verdict = "warn"
    if available is not None and new_nodes and verdict != "fail":
        if available < new_nodes * MEM_PER_NODE_FAIL:
            verdict = "fail"
        elif available < new_nodes * MEM_PER_NODE_WARN:
            verdict = "warn"
    if verdict == "ok":
        return Finding(name, "ok", found)
    return Finding(name, verdict, found + (" — too little" if verdict == "fail" else
                                           " — tight: pods may be evicted or stay Pending"), fix)


def _check_cpus(facts: _Facts) -> Finding:
    ncpu = int(facts.info.get("NCPU") or 0) if facts.docker else 0
    source = "docker daemon" if ncpu else "host"
    ncpu = ncpu or (os.cpu_count() or 0)
    if ncpu >= MIN_CPUS:
        return Finding("cpus", "ok", f"{ncpu} ({source})")
    return Finding("cpus", "warn", f"{ncpu or 'unknown'} ({source}) < {MIN_CPUS}: bring-up will "
                   "be slow and readiness gates may time out",
                   "give Docker at least 2 CPUs (Docker Desktop: Settings → Resources)")


# -- what kind and Cilium users commonly hit ------------------------------------------------------

def _rootless(info: dict[str, Any]) -> bool:
    """Docker lists ``name=rootless`` among SecurityOptions (kind's provider.go ``info()``);
    Podman's `docker info` answers ``host.security.rootless``."""
    for opt in info.get("SecurityOptions") or []:
        if "name=rootless" in str(opt).split(","):
            return True
    host = info.get("host")
    return isinstance(host, dict) and bool((host.get("security") or {}).get("rootless"))


def _check_rootless(cfg: LabConfig, proc_root: Path, facts: _Facts) -> Finding:
    name = "rootless container engine"
    if not facts.docker:
        return Finding(name, "warn", "not checked: Docker is not reachable",
                       "fix the docker daemon check first")
    info = facts.info
    if not _rootless(info):
        return Finding(name, "ok", "rootful engine")
    fails, fixes = [], []
    if str(info.get("CgroupVersion", "")) != "2":
        fails.append("kind with a rootless provider requires cgroup v2")
        fixes.append("boot with cgroup v2: add systemd.unified_cgroup_hierarchy=1 to "
                     "GRUB_CMDLINE_LINUX in /etc/default/grub, `sudo update-grub`, reboot")
    delegated = info.get("CgroupDriver") != "none" and all(
        info.get(k) for k in ("MemoryLimit", "PidsLimit", "CPUShares"))
    if not delegated:
        fails.append("the cgroup controllers are not delegated to your user (no memory, pids "
                     "or cpu limits), which kind refuses")
        fixes.append("create /etc/systemd/system/user@.service.d/delegate.conf with "
                     "'[Service]' and 'Delegate=yes', run `sudo systemctl daemon-reload`, then "
                     "`systemctl --user restart docker`")
    start = _int_file(proc_root, "proc/sys/net/ipv4/ip_unprivileged_port_start",
                      UNPRIVILEGED_PORT_START)
    low = sorted({p for c in cfg.clusters
                  for p in (c.gateway.http_host_port, c.gateway.https_host_port) if p < start})
    if low:
        fails.append(f"host port(s) {', '.join(map(str, low))} are below "
                     f"net.ipv4.ip_unprivileged_port_start ({start}): a rootless engine "
                     "cannot publish them")
        fixes.append(f"use host ports >= {start} (clusters[].gateway.http(s)HostPort) or "
                     f"`sudo sysctl -w net.ipv4.ip_unprivileged_port_start={min(low)}`")
    bpf = ("Cilium's agent must load BPF programs and mount the BPF filesystem in the node, "
           "which user-namespaced (rootless) containers are not allowed to do")
    if fails:
        return Finding(name, "fail", "rootless engine: " + "; ".join(fails) + f"; also, {bpf}",
                       "; ".join(fixes) + " (https://kind.sigs.k8s.io/docs/user/rootless/); "
                       "or use rootful Docker")
    return Finding(name, "warn", f"rootless engine: {bpf}",
                   "use rootful Docker (`sudo systemctl start docker`, unset DOCKER_HOST) for "
                   "this lab; kind's rootless notes: https://kind.sigs.k8s.io/docs/user/rootless/")


def _int_file(proc_root: Path, rel: str, default: int) -> int:
    try:
        return int((_read(proc_root, rel) or "").strip())
    except ValueError:
        return default


def _kernel_release(proc_root: Path, facts: _Facts, system: str) -> tuple[str, str]:
    release = str(facts.info.get("KernelVersion", "")) if facts.docker else ""
    if release:
        return release, "docker daemon"
    release = (_read(proc_root, "proc/sys/kernel/osrelease") or "").strip()
    if not release and system == "Linux":
        release = platform.release()
    return release, "host"


def _check_socket_lb(proc_root: Path, facts: _Facts, system: str) -> Finding:
    name = "socket-LB on kind"
    release, source = _kernel_release(proc_root, facts, system)
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        return Finding(name, "warn", f"could not read the kernel version ({release or 'none'})",
                       "check `uname -r`: Cilium's socket-LB on kind needs 5.14+, or the cgroup "
                       "v1 net_cls/net_prio controllers off")
    if (int(m.group(1)), int(m.group(2))) >= SOCKET_LB_KERNEL:
        return Finding(name, "ok", f"kernel {release} ({source}) >= 5.14; kind runs each node "
                       "in a private cgroup namespace")
    if facts.vm:
        return Finding(name, "warn", f"kernel {release} ({source}) < 5.14 in Docker's VM, "
                       "whose cgroup controllers this host cannot read",
                       "update Docker Desktop (its VM brings a newer kernel)")
    v1 = []
    for line in (_read(proc_root, "proc/cgroups") or "").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] in ("net_cls", "net_prio") and parts[1] != "0" \
                and parts[3] == "1":
            v1.append(parts[0])
    if not v1:
        return Finding(name, "ok", f"kernel {release} ({source}) < 5.14 but the cgroup v1 "
                       "net_cls/net_prio controllers are not mounted")
    return Finding(name, "fail", f"kernel {release} ({source}) < 5.14 with the cgroup v1 "
                   f"{'/'.join(v1)} controller(s) mounted: Cilium's socket-LB (kube-proxy "
                   "replacement) attaches at the wrong cgroup and Services break",
                   "upgrade the kernel to 5.14 or newer, or boot with "
                   "cgroup_no_v1=net_cls,net_prio (or cgroup_no_v1=all) on the kernel command "
                   "line (GRUB_CMDLINE_LINUX), then reboot")


def _check_disk(cfg: LabConfig, proc_root: Path, facts: _Facts, statvfs: StatVfs) -> Finding:
    name = "free disk"
    root = str(facts.info.get("DockerRootDir") or "/var/lib/docker") if facts.docker else \
        "/var/lib/docker"
    nodes = sum(1 + c.workers for c in cfg.clusters)
    if facts.vm:
        return Finding(name, "ok", f"not checked: images live in Docker's VM ({facts.vm_why}); "
                       f"give it ~{nodes * DISK_PER_NODE_WARN / GIB:.0f} GiB free")
    path = proc_root / root.lstrip("/")
    while not path.exists() and path != path.parent:
        path = path.parent  # e.g. /var/lib/docker unreadable: its filesystem is the parent's
    try:
        st = statvfs(path)
        free = int(st.f_bavail) * int(st.f_frsize)
    except OSError as exc:
        return Finding(name, "warn", f"could not read free space at {root}: {exc}",
                       f"check `df -h {root}`: ~{nodes * DISK_PER_NODE_WARN / GIB:.0f} GiB "
                       "should be free")
    found = (f"{free / GIB:.1f} GiB free for {root}; {nodes} node(s) at "
             f"~{DISK_PER_NODE_WARN / GIB:.0f} GiB each")
    fix = ("free space: `docker system prune` / `docker image prune` (unused containers and "
           "images), delete unused kind clusters (`kind get clusters`); kind turns the "
           "kubelet's disk eviction off, so a full disk shows up as image pull failures")
    if free < nodes * DISK_PER_NODE_FAIL:
        return Finding(name, "fail", found + " — too little", fix)
    if free < nodes * DISK_PER_NODE_WARN:
        return Finding(name, "warn", found + " — tight", fix)
    return Finding(name, "ok", found)


def host_routes(text: str) -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, destination) of each IPv4 route in ``/proc/net/route`` (little-endian hex)."""
    routes = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 8:
            continue
        try:
            dest = socket.inet_ntoa(struct.pack("<L", int(parts[1], 16)))
            mask = socket.inet_ntoa(struct.pack("<L", int(parts[7], 16)))
            routes.append((parts[0], ipaddress.IPv4Network(f"{dest}/{mask}")))
        except (ValueError, struct.error):
            continue
    return routes


def _bridge_name(network: dict[str, Any]) -> str:
    """Docker names a user-defined bridge ``br-<first 12 of the id>`` unless an option says."""
    opts = network.get("Options") or {}
    explicit = opts.get("com.docker.network.bridge.name")
    if explicit:
        return str(explicit)
    net_id = str(network.get("Id") or "")
    return f"br-{net_id[:12]}" if net_id else ""


def _check_routes(cfg: LabConfig, proc_root: Path, facts: _Facts, system: str) -> Finding:
    name = "host routes"
    if facts.vm or system != "Linux":
        return Finding(name, "ok", "not checked: the nodes run in Docker's VM")
    text = _read(proc_root, "proc/net/route")
    if text is None:
        return Finding(name, "warn", "could not read /proc/net/route",
                       "check `ip route` for routes over the lab's pod, service and pool ranges")
    bridge = _bridge_name(facts.network)
    kind_net = [n for s in facts.network.get("subnets", [])
                if isinstance(n := ipaddress.ip_network(s), ipaddress.IPv4Network)]
    routes = [(dev, net) for dev, net in host_routes(text) if net.prefixlen > 0 and dev != bridge
              and not any(net == k for k in kind_net)]
    fails, warns = [], []
    for c in cfg.clusters:
        for label, cidr in (("podCIDR", c.pod_cidr), ("serviceCIDR", c.service_cidr)):
            net = ipaddress.ip_network(cidr)
            for dev, r in routes:
                if net.version == 4 and r.overlaps(net):
                    warns.append(f"{c.name} {label} {cidr} overlaps {r} via {dev}: pods cannot "
                                 "reach those host-routed addresses")
        pool = facts.pools.get(c.name) or c.lb_pool
        if pool:
            pnet = ipaddress.IPv4Network(pool)
            longest = max((k.prefixlen for k in kind_net if pnet.subnet_of(k)), default=0)
            for dev, r in routes:
                if r.overlaps(pnet) and r.prefixlen >= longest:
                    fails.append(f"{c.name} lbPool {pool} overlaps {r} via {dev}: the host "
                                 "sends LoadBalancer traffic there instead of to the kind "
                                 "network")
    if fails:
        return Finding(name, "fail", "; ".join(fails + warns),
                       "set clusters[].lbPool to a range no host route covers (or remove the "
                       "route, e.g. a VPN's), or move Docker's networks away from it "
                       "(\"default-address-pools\" in /etc/docker/daemon.json)")
    if warns:
        return Finding(name, "warn", "; ".join(warns),
                       "set clusters[].podCIDR/serviceCIDR to ranges no host route covers")
    return Finding(name, "ok", f"no route over the lab's ranges ({len(routes)} other route(s))")


def _check_host_cilium(proc_root: Path, facts: _Facts, system: str) -> Finding:
    name = "cilium on the host"
    if facts.vm or system != "Linux":
        return Finding(name, "ok", "not checked: the nodes run in Docker's VM")
    found = []
    proc = proc_root / "proc"
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit():
            continue
        if (_read(proc_root, f"proc/{entry.name}/comm") or "").strip() != "cilium-agent":
            continue
        cgroup = (_read(proc_root, f"proc/{entry.name}/cgroup") or "").strip()
        if "docker" in cgroup or "libpod" in cgroup:
            continue  # an agent inside a kind node (another kind cluster): no conflict
        found.append(f"pid {entry.name} ({cgroup.splitlines()[-1] if cgroup else '?'})")
    if found:
        return Finding(name, "warn", "a cilium-agent runs on the host itself: "
                       + ", ".join(found) + "; its BPF cgroup programs overlap the kind "
                       "nodes' and their Cilium agents crash",
                       "tear that Cilium down, or detach the overlapping BPF cgroup programs "
                       "(`sudo bpftool cgroup tree /sys/fs/cgroup` lists them)")
    return Finding(name, "ok", "no cilium-agent on the host (other BPF cgroup programs need "
                   "root to list: `sudo bpftool cgroup tree /sys/fs/cgroup`)")


def _os_release(proc_root: Path) -> dict[str, str]:
    out = {}
    for line in (_read(proc_root, "etc/os-release") or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


def _check_fedora(proc_root: Path, facts: _Facts, system: str) -> list[Finding]:
    if facts.vm or system != "Linux":
        return []
    findings = []
    conf = _read(proc_root, "etc/firewalld/firewalld.conf") or ""
    backend = re.search(r"^\s*FirewallBackend\s*=\s*(\S+)", conf, re.MULTILINE)
    enabled = (proc_root / "etc/systemd/system/multi-user.target.wants/firewalld.service"
               ).exists()
    if enabled and backend and backend.group(1) == "nftables":
        findings.append(Finding(
            "firewalld", "warn", "firewalld is enabled with FirewallBackend=nftables: kind "
            "nodes may not reach each other",
            "sudo sed -i 's/FirewallBackend=.*/FirewallBackend=iptables/' "
            "/etc/firewalld/firewalld.conf && sudo systemctl restart firewalld"))
    else:
        findings.append(Finding("firewalld", "ok", "not enabled with the nftables backend"))
    osr = _os_release(proc_root)
    enforcing = (_read(proc_root, "sys/fs/selinux/enforce") or "").strip() == "1"
    if enforcing and osr.get("ID") == "fedora" and osr.get("VERSION_ID") == "33":
        findings.append(Finding(
            "selinux", "warn", "SELinux enforcing on Fedora 33, whose policy makes `kind "
            "create cluster` fail with 'open /dev/dma_heap: permission denied'",
            "upgrade to Fedora 34+, or `sudo setenforce 0` (permissive until reboot)"))
    else:
        findings.append(Finding("selinux", "ok", "enforcing" if enforcing else
                                "not enforcing or not present"))
    return findings


def _check_image_cache(cfg: LabConfig, tools: Tools, facts: _Facts) -> Finding:
    """The shared pull-through image cache (lab/imagecache.py): ours, running, or creatable."""
    from lab import imagecache, logs

    if cfg.image_cache and not facts.docker:
        return Finding("image cache", "warn", "not checked: Docker is not reachable",
                       "fix the docker daemon check first")
    verdict, found, fix = imagecache.doctor_check(cfg, tools, logs.get("lab"))
    return Finding("image cache", verdict, found, fix)


def _check_tools(tools: Tools) -> list[Finding]:
    findings = []
    for tool in ("kind", "helm", "cilium"):
        want = tools.pinned.get(tool, "")
        title = TITLES[tool]
        name = f"tool {title}"
        required = tool in REQUIRED
        bad: Verdict = "fail" if required else "warn"
        own = INSTALL_HINTS.get(tool, f"install {tool} {{version}}").split(" (or run")[0]
        hint = (f"run `invoke lab.tools` (downloads the pinned, checksum-verified release into "
                f"{tools.bin_dir}), or {own.format(version=want)}")
        path = tools.which(tool)
        if path is None:
            extra = "" if required else " (optional: only for `cilium status` and friends)"
            findings.append(Finding(name, bad, f"not installed{extra}", hint))
            continue
        try:
            have = tools.version(tool)
        except LabError:
            have = None
        if not want or have == want:
            findings.append(Finding(name, "ok", f"{have or 'unknown version'} ({path})"))
        else:
            findings.append(Finding(name, bad, f"{have or 'unknown version'} at {path}, the lab "
                                    f"pins {want}", hint))
    return findings
