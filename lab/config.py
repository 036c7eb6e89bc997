"""Typed lab configuration: load YAML, allocate what the user left out, validate it all
before any side effect.

A lab is one or more kind clusters. Everything that must differ between clusters (ids, CIDRs,
LoadBalancer pool slices, host ports, NodePorts) is allocated deterministically from the cluster's
position unless the user sets it; whatever is set is validated against everything else.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from lab import yamlio
from lab.errors import ConfigError, ConfigProblem, LabError

DEFAULT_CONFIG = Path("config/lab.yaml")
CONFIG_ENV = "LAB_CONFIG"
FORMAT_VERSION = 1

# Cilium's cluster name rule (pkg/clustermesh/types: ≤ 32, lowercase alphanumerics and dashes).
CLUSTER_NAME_RE = re.compile(r"^([a-z0-9][-a-z0-9]*)?[a-z0-9]$")
CLUSTER_NAME_MAX = 32
NODEPORT_RANGE = (30000, 32767)  # kube-apiserver's default --service-node-port-range
MAX_AUTO_CLUSTERS = 10  # 10.244+i / 10.96+i stay clear of each other up to here

# The seed lab's values for the first cluster; cluster i is offset from them.
BASE_POD_CIDR = ipaddress.ip_network("10.244.0.0/16")
BASE_SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")
BASE_HTTP_NODEPORT = 30080
BASE_HTTPS_NODEPORT = 30443
BASE_CLUSTERMESH_NODEPORT = 32379
PORT_STRIDE = 100  # cluster i: 30080+100i, 30443+100i

# What a config that leaves `versions` (or any key of it) out gets: the releases this lab is built
# and tested for (README "Config reference"). nodeImage is kind v0.29.0's default node image
# (kind pkg/apis/config/defaults/image.go at v0.29.0).
DEFAULT_VERSIONS = {
    "kind": "v0.29.0",
    "nodeImage": "kindest/node:v1.33.1@sha256:"
                 "050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f",
    "helm": "v3.19.0",
    "cilium": "1.18.4",
    "ciliumCLI": "v0.18.9",
    "gatewayAPI": "v1.4.0",
    "certManager": "v1.19.0",
}
DEFAULT_STATE_DIR = ".lab"
DEFAULT_DOCKER_NETWORK = "kind"
DEFAULT_GATEWAY_HOSTS = ("echo",)
DEFAULT_LISTEN_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class Versions:
    kind: str
    node_image: str
    helm: str
    cilium: str
    cilium_cli: str
    gateway_api: str
    cert_manager: str


@dataclass(frozen=True)
class GatewayPorts:
    http_node_port: int
    https_node_port: int
    http_host_port: int
    https_host_port: int
    listen_address: str


@dataclass(frozen=True)
class ClusterConfig:
    """One kind cluster, fully allocated."""

    name: str
    id: int
    index: int
    workers: int
    pod_cidr: str
    service_cidr: str
    lb_pool: str | None  # None: derived from the Docker network at apply time
    gateway: GatewayPorts
    clustermesh_node_port: int

    @property
    def kube_context(self) -> str:
        return f"kind-{self.name}"

    @property
    def control_plane(self) -> str:
        return f"{self.name}-control-plane"

    @property
    def node_names(self) -> list[str]:
        workers = [f"{self.name}-worker{'' if i == 1 else i}" for i in range(1, self.workers + 1)]
        return [self.control_plane, *workers]


@dataclass(frozen=True)
class LabConfig:
    path: Path
    versions: Versions
    state_dir: Path
    docker_network: str
    gateway_hosts: tuple[str, ...]
    clusters: tuple[ClusterConfig, ...]
    download_tools: bool = True
    image_cache: bool = True  # the machine-wide pull-through cache (lab/imagecache.py)

    @property
    def is_mesh(self) -> bool:
        return len(self.clusters) > 1

    def cluster(self, name: str) -> ClusterConfig:
        for c in self.clusters:
            if c.name == name:
                return c
        known = ", ".join(c.name for c in self.clusters)
        raise ConfigError([ConfigProblem(str(self.path), "clusters", f"no cluster named {name!r}",
                                         f"use one of: {known}")])

    def fingerprint(self) -> str:
        """A digest of everything that shapes the clusters (not the state dir)."""
        data = {"versions": asdict(self.versions), "network": self.docker_network,
                "hosts": list(self.gateway_hosts),
                "clusters": [asdict(c) for c in self.clusters]}
        blob = json.dumps(data, sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        return {"config": str(self.path), "versions": asdict(self.versions),
                "clusters": [asdict(c) for c in self.clusters]}


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    if path:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG


def load_config(path: str | os.PathLike[str] | None = None) -> LabConfig:
    """Read, allocate and validate. Raises ConfigError listing every problem found."""
    cfg_path = resolve_config_path(path)
    if not cfg_path.is_file():
        origin = ("--config" if path else f"{CONFIG_ENV}" if os.environ.get(CONFIG_ENV)
                  else "the default config path")
        what = "is a directory" if cfg_path.is_dir() else "file not found"
        raise ConfigError([ConfigProblem(str(cfg_path), "", f"{what} (from {origin})",
                                         f"pass --config PATH to a lab config file, or set "
                                         f"{CONFIG_ENV}; config/lab.yaml is the shipped one")])
    try:
        raw = yamlio.load(cfg_path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(str(cfg_path), "", f"not valid YAML: {exc}",
                                         "fix the YAML syntax")]) from exc
    return parse_config(raw, cfg_path)


# --- environment (README "Environment") -----------------------------------------------------------

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
GATE_TIMEOUT_ENV = "LAB_GATE_TIMEOUT"
KUBECONFIG_ENV = "LAB_KUBECONFIG"
NO_DOWNLOAD_ENV = "LAB_NO_DOWNLOAD"
SKIP_DOCTOR_ENV = "LAB_SKIP_DOCTOR"
TOOLS_DIR_ENV = "LAB_TOOLS_DIR"


def _env_error(name: str, value: str, expected: str, fix: str) -> LabError:
    return LabError(f"environment variable {name}={value!r} is not {expected}",
                    f"{fix}, or unset it (`unset {name}`)")


def env_flag(name: str) -> bool:
    """A yes/no variable: 1/true/yes/on or 0/false/no/off (any case); unset or empty is off."""
    raw = os.environ.get(name, "")
    word = raw.strip().lower()
    if word in ("", *FALSE_WORDS):
        return False
    if word in TRUE_WORDS:
        return True
    raise _env_error(name, raw, "a yes/no value", f"set {name}=1 to switch it on or {name}=0")


def gate_timeout_from_env() -> float | None:
    """``LAB_GATE_TIMEOUT``: seconds every gate may wait (a positive number); None when unset."""
    raw = os.environ.get(GATE_TIMEOUT_ENV, "")
    if not raw.strip():
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise _env_error(GATE_TIMEOUT_ENV, raw, "a positive number of seconds",
                         f"set it to the seconds each gate may wait, e.g. {GATE_TIMEOUT_ENV}=600")
    return seconds


def kubeconfig_from_env() -> str | None:
    """``LAB_KUBECONFIG``: the kubeconfig file kind writes and the lab reads (default: kind's)."""
    raw = os.environ.get(KUBECONFIG_ENV, "")
    if not raw.strip():
        return None
    if Path(raw).is_dir():
        raise _env_error(KUBECONFIG_ENV, raw, "a file (it is a directory)",
                         f"point it at a kubeconfig file, e.g. {KUBECONFIG_ENV}=$HOME/.kube/lab")
    return raw


def tools_dir_from_env() -> str | None:
    """``LAB_TOOLS_DIR``: where pinned tools are installed and looked up (lab.bootstrap)."""
    raw = os.environ.get(TOOLS_DIR_ENV, "")
    if not raw.strip():
        return None
    if Path(raw).expanduser().exists() and not Path(raw).expanduser().is_dir():
        raise _env_error(TOOLS_DIR_ENV, raw, "a directory (it is a file)",
                         f"point it at a directory, e.g. {TOOLS_DIR_ENV}=$HOME/.cache/lab-tools")
    return raw


def check_environment() -> None:
    """Every variable README "Environment" lists, read once up front: a bad value is refused
    before any side effect (LAB_LOG_FORMAT and LAB_LOG_LEVEL are checked by lab.logs, NO_COLOR
    takes any value, LAB_CONFIG by load_config)."""
    problems: list[LabError] = []
    for check in (gate_timeout_from_env, kubeconfig_from_env, tools_dir_from_env,
                  lambda: env_flag(NO_DOWNLOAD_ENV), lambda: env_flag(SKIP_DOCTOR_ENV)):
        try:
            check()
        except LabError as exc:
            problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise LabError("\n".join(p.message for p in problems),
                       "\n    ".join(p.hint for p in problems))


# --- parsing -------------------------------------------------------------------------------------

class _Reader:
    """Walks the raw YAML, collecting problems instead of stopping at the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[ConfigProblem] = []

    def problem(self, field_path: str, message: str, fix: str = "") -> None:
        self.problems.append(ConfigProblem(self.file, field_path, message, fix))

    def mapping(self, value: Any, where: str, allowed: dict[str, str]) -> dict[str, Any]:
        """``allowed`` maps each known key to a one-line description (used in the error)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(where, f"must be a mapping, got {type(value).__name__}")
            return {}
        for key in value:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                self.problem(f"{where}.{key}" if where else str(key), "unknown key",
                             f"remove it or use one of: {known}")
        return value

    def get(self, data: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...],
            default: Any = None, required: bool | str = False) -> Any:
        """``required``: True, or the fix to print when the key is missing."""
        path = f"{where}.{key}" if where else key
        if key not in data or data[key] is None:
            if required:
                self.problem(path, "is required", required if isinstance(required, str)
                             else "add it")
            return default
        value = data[key]
        # bool is an int in Python; a port of `true` is a type error, not 1.
        if isinstance(value, bool) and kind is not bool and bool not in (
                kind if isinstance(kind, tuple) else (kind,)):
            self.problem(path, f"must be {_type_name(kind)}, got a boolean",
                         f"write {_type_name(kind)}")
            return default
        if not isinstance(value, kind):
            self.problem(path, f"must be {_type_name(kind)}, got {type(value).__name__} {value!r}",
                         f"write {_type_name(kind)}")
            return default
        return value


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", str: "a string", bool: "true or false", list: "a list",
             dict: "a mapping"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


TOP_KEYS = {
    "apiVersion": "config format, must be kind-cilium-lab/v1",
    "versions": "pinned tool and chart versions",
    "stateDir": "where records, the lab CA and downloaded tools live",
    "dockerNetwork": "the Docker network kind puts nodes on",
    "gatewayHosts": "host names served by the gateway under .localhost",
    "clusters": "the kind clusters of the lab",
    "downloadTools": "false forbids downloading pinned tools (report what to install instead)",
    "imageCache": "false turns off the shared pull-through image cache and its prefetch",
}
VERSION_KEYS = {
    "kind": "kind release", "nodeImage": "kind node image, pinned by digest",
    "helm": "helm release", "cilium": "Cilium chart version", "ciliumCLI": "Cilium CLI release",
    "gatewayAPI": "Gateway API release", "certManager": "cert-manager chart version",
}
CLUSTER_KEYS = {
    "name": "cluster name", "id": "Cilium cluster id 1-255", "workers": "worker node count",
    "podCIDR": "pod subnet", "serviceCIDR": "service subnet",
    "lbPool": "LoadBalancer IP pool (a CIDR inside the Docker network)",
    "gateway": "gateway NodePorts and host ports",
    "clustermesh": "Cluster Mesh settings",
}
GATEWAY_KEYS = {
    "httpNodePort": "NodePort of the HTTP listener", "httpsNodePort": "NodePort of HTTPS",
    "httpHostPort": "host port mapped to httpNodePort",
    "httpsHostPort": "host port mapped to httpsNodePort",
    "listenAddress": "host address the ports bind to",
}
MESH_KEYS = {"apiserverNodePort": "NodePort of the clustermesh-apiserver"}

API_VERSION = "kind-cilium-lab/v1"


def parse_config(raw: Any, path: Path) -> LabConfig:
    r = _Reader(str(path))
    top = r.mapping(raw, "", TOP_KEYS)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(r.problems)
    api_version = r.get(top, "apiVersion", "", str, required=f"add `apiVersion: {API_VERSION}`")
    if api_version is not None and api_version != API_VERSION:
        r.problem("apiVersion", f"unsupported format {api_version!r}",
                  f"set apiVersion: {API_VERSION}")

    v = r.mapping(top.get("versions"), "versions", VERSION_KEYS)
    ver = {k: r.get(v, k, "versions", str, default=DEFAULT_VERSIONS[k]) or ""
           for k in VERSION_KEYS}
    versions = Versions(kind=ver["kind"], node_image=ver["nodeImage"], helm=ver["helm"],
                        cilium=ver["cilium"], cilium_cli=ver["ciliumCLI"],
                        gateway_api=ver["gatewayAPI"], cert_manager=ver["certManager"])
    _check_versions(r, versions)

    state_dir = Path(r.get(top, "stateDir", "", str, default=DEFAULT_STATE_DIR))
    if not state_dir.is_absolute():
        state_dir = Path.cwd() / state_dir
    network = r.get(top, "dockerNetwork", "", str, default=DEFAULT_DOCKER_NETWORK)
    hosts = r.get(top, "gatewayHosts", "", list, default=list(DEFAULT_GATEWAY_HOSTS))
    for i, h in enumerate(hosts):
        if not isinstance(h, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", h):
            r.problem(f"gatewayHosts[{i}]", f"{h!r} is not a DNS label",
                      "use lowercase letters, digits and dashes (the lab serves <label>.localhost)")

    raw_clusters = r.get(top, "clusters", "", list,
                         required="add at least one cluster, e.g. `clusters: [{name: lab}]`") or []
    if "clusters" in top and not raw_clusters and isinstance(top.get("clusters"), list):
        r.problem("clusters", "is empty", "declare at least one cluster")
    alloc = _Allocator(raw_clusters)
    clusters = [_parse_cluster(r, c, i, alloc) for i, c in enumerate(raw_clusters)]
    built = [c for c in clusters if c is not None]
    if len(built) == len(raw_clusters):
        _check_clusters(r, built)
    download = r.get(top, "downloadTools", "", bool, default=True)
    image_cache = r.get(top, "imageCache", "", bool, default=True)
    if r.problems:
        raise ConfigError(r.problems)
    return LabConfig(path=path, versions=versions, state_dir=state_dir, docker_network=network,
                     gateway_hosts=tuple(hosts), clusters=tuple(built),
                     download_tools=bool(download), image_cache=bool(image_cache))


def _check_versions(r: _Reader, v: Versions) -> None:
    if v.node_image and "@sha256:" not in v.node_image:
        r.problem("versions.nodeImage", f"{v.node_image!r} is not pinned by digest",
                  "use kindest/node:vX.Y.Z@sha256:<digest> from the kind release notes")
    m = re.match(r"^kindest/node:v1\.(\d+)\.", v.node_image or "")
    if v.node_image and (not m or not 30 <= int(m.group(1)) <= 33):
        r.problem("versions.nodeImage", f"{v.node_image!r} is not Kubernetes 1.30-1.33",
                  "Cilium 1.18 is tested on Kubernetes 1.30-1.33: pick a kindest/node image "
                  "of those")
    for key, value, pattern in (
        ("kind", v.kind, r"v\d+\.\d+\.\d+"), ("helm", v.helm, r"v3\.\d+\.\d+"),
        ("cilium", v.cilium, r"\d+\.\d+\.\d+"), ("ciliumCLI", v.cilium_cli, r"v\d+\.\d+\.\d+"),
        ("gatewayAPI", v.gateway_api, r"v\d+\.\d+\.\d+"),
        ("certManager", v.cert_manager, r"v\d+\.\d+\.\d+"),
    ):
        if value and not re.fullmatch(pattern, value):
            r.problem(f"versions.{key}", f"{value!r} is not a release version",
                      f"use the form {pattern.replace(chr(92) + 'd+', 'N').replace(chr(92), '')}")


def _int_field(r: _Reader, data: dict[str, Any], key: str, where: str, default: int) -> int:
    value = r.get(data, key, where, int, default=default)
    return int(value) if value is not None else default


class _Allocator:
    """Defaults for what a cluster leaves out, routed around what any cluster sets explicitly.

    Cluster i gets slot i (10.(244+i).0.0/16, 30080+100i, …) unless an explicit value elsewhere in
    the config claims it; then the next free slot. Deterministic: same config, same allocation.
    """

    def __init__(self, raw_clusters: list[Any]) -> None:
        items: list[dict[str, Any]] = [c for c in raw_clusters if isinstance(c, dict)]

        def section(c: dict[str, Any], key: str) -> dict[str, Any]:
            value = c.get(key)
            return value if isinstance(value, dict) else {}

        gw = [section(c, "gateway") for c in items]
        mesh = [section(c, "clustermesh") for c in items]
        self.ids = {c["id"] for c in items if isinstance(c.get("id"), int)}
        self.nets = [n for c in items for k in ("podCIDR", "serviceCIDR", "lbPool")
                     if (n := _net_or_none(c.get(k))) is not None]
        self.ports = {p for g in gw for k in GATEWAY_KEYS if k != "listenAddress"
                      if isinstance(p := g.get(k), int)}
        self.ports |= {p for m in mesh if isinstance(p := m.get("apiserverNodePort"), int)}
        self.given: dict[str, set[object]] = {}

    def _free(self, kind: str, start: int, candidate: Callable[[int], object],
              clash: Callable[[object], bool], limit: int) -> object | None:
        taken = self.given.setdefault(kind, set())
        for k in range(start, limit):
            value = candidate(k)
            if value not in taken and not clash(value):
                taken.add(value)
                return value
        return None

    def cluster_id(self, i: int) -> int:
        value = self._free("id", i + 1, lambda k: k, lambda v: v in self.ids, 256)
        return value if isinstance(value, int) else i + 1

    def cidr(self, base: ipaddress.IPv4Network | ipaddress.IPv6Network, i: int) -> str | None:
        def clash(v: object) -> bool:
            net = ipaddress.ip_network(str(v))
            return any(net.overlaps(n) for n in self.nets if n.version == net.version)

        value = self._free(f"net{base}", i, lambda k: _offset_net(base, k), clash,
                           i + MAX_AUTO_CLUSTERS)
        return str(value) if value is not None else None

    def port(self, base: int, stride: int, i: int) -> int:
        def in_range(k: int) -> int:
            return base + stride * k

        value = self._free(f"port{base}", i, in_range,
                           lambda v: v in self.ports or not isinstance(v, int)
                           or v > NODEPORT_RANGE[1], i + 64)
        return value if isinstance(value, int) else base + stride * i


def _net_or_none(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(value, strict=True) if isinstance(value, str) else None
    except ValueError:
        return None


def _parse_cluster(r: _Reader, raw: Any, i: int, alloc: _Allocator) -> ClusterConfig | None:
    where = f"clusters[{i}]"
    before = len(r.problems)
    c = r.mapping(raw, where, CLUSTER_KEYS)
    if not isinstance(raw, dict):
        return None
    name = r.get(c, "name", where, str,
                 required="add `name:` (lowercase letters, digits, dashes)") or ""
    if name:
        if len(name) > CLUSTER_NAME_MAX or not CLUSTER_NAME_RE.match(name):
            r.problem(f"{where}.name", f"{name!r} is not a valid cluster name",
                      f"use at most {CLUSTER_NAME_MAX} lowercase letters, digits and dashes, "
                      "starting and ending with a letter or digit")
        if name == "default":
            r.problem(f"{where}.name", "'default' is reserved by Cilium for cluster id 0",
                      "pick another name")
    cid = _int_field(r, c, "id", where, alloc.cluster_id(i) if "id" not in c else i + 1)
    if not 1 <= cid <= 255:
        r.problem(f"{where}.id", f"{cid} is outside 1-255", "pick a unique id from 1 to 255")
    workers = _int_field(r, c, "workers", where, 0)
    if not 0 <= workers <= 8:
        r.problem(f"{where}.workers", f"{workers} workers", "use 0 to 8 workers")

    pod = _cidr(r, c, "podCIDR", where,
                alloc.cidr(BASE_POD_CIDR, i) if "podCIDR" not in c else None)
    svc = _cidr(r, c, "serviceCIDR", where,
                alloc.cidr(BASE_SERVICE_CIDR, i) if "serviceCIDR" not in c else None)
    pool = c.get("lbPool")
    if pool is not None:
        pool = _cidr(r, c, "lbPool", where, None)

    g = r.mapping(c.get("gateway"), f"{where}.gateway", GATEWAY_KEYS)
    gw = f"{where}.gateway"
    http_np = _int_field(r, g, "httpNodePort", gw,
                         alloc.port(BASE_HTTP_NODEPORT, PORT_STRIDE, i)
                         if "httpNodePort" not in g else 0)
    https_np = _int_field(r, g, "httpsNodePort", gw,
                          alloc.port(BASE_HTTPS_NODEPORT, PORT_STRIDE, i)
                          if "httpsNodePort" not in g else 0)
    ports = GatewayPorts(
        http_node_port=http_np, https_node_port=https_np,
        http_host_port=_int_field(r, g, "httpHostPort", gw, http_np),
        https_host_port=_int_field(r, g, "httpsHostPort", gw, https_np),
        listen_address=r.get(g, "listenAddress", gw, str, default=DEFAULT_LISTEN_ADDRESS),
    )
    m = r.mapping(c.get("clustermesh"), f"{where}.clustermesh", MESH_KEYS)
    mesh_np = _int_field(r, m, "apiserverNodePort", f"{where}.clustermesh",
                         alloc.port(BASE_CLUSTERMESH_NODEPORT, 1, i)
                         if "apiserverNodePort" not in m else 0)
    for key, port in (("gateway.httpNodePort", ports.http_node_port),
                      ("gateway.httpsNodePort", ports.https_node_port),
                      ("clustermesh.apiserverNodePort", mesh_np)):
        if not NODEPORT_RANGE[0] <= port <= NODEPORT_RANGE[1]:
            r.problem(f"{where}.{key}", f"{port} is outside the NodePort range",
                      f"pick a port in {NODEPORT_RANGE[0]}-{NODEPORT_RANGE[1]}")
    for key, port in (("gateway.httpHostPort", ports.http_host_port),
                      ("gateway.httpsHostPort", ports.https_host_port)):
        if not 1 <= port <= 65535:
            r.problem(f"{where}.{key}", f"{port} is not a TCP port", "pick a port in 1-65535")
    try:
        ipaddress.ip_address(ports.listen_address)
    except ValueError:
        r.problem(f"{gw}.listenAddress", f"{ports.listen_address!r} is not an IP address",
                  "use 127.0.0.1 (only this machine) or 0.0.0.0 (every interface)")
    if len(r.problems) != before:
        return None
    return ClusterConfig(name=name, id=cid, index=i, workers=workers, pod_cidr=pod or "",
                         service_cidr=svc or "", lb_pool=pool, gateway=ports,
                         clustermesh_node_port=mesh_np)


def _offset_net(base: ipaddress.IPv4Network | ipaddress.IPv6Network,
                i: int) -> str:
    return str(ipaddress.ip_network(f"{base.network_address + i * base.num_addresses}/"
                                    f"{base.prefixlen}"))


def _cidr(r: _Reader, c: dict[str, Any], key: str, where: str,
          default: str | None) -> str | None:
    value = r.get(c, key, where, str, default=default)
    if value is None:
        if default is None and key != "lbPool":
            r.problem(f"{where}.{key}", "no free range left to allocate",
                      "set it explicitly")
        return None
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        r.problem(f"{where}.{key}", f"{value!r} is not a CIDR ({exc})",
                  "write a network address with its prefix, e.g. 10.244.0.0/16")
        return None
    if net.version != 4:
        r.problem(f"{where}.{key}", "IPv6 is not supported by the lab yet", "use an IPv4 CIDR")
    return str(net)


def _check_clusters(r: _Reader, clusters: list[ClusterConfig]) -> None:
    seen_names: dict[str, int] = {}
    seen_ids: dict[int, int] = {}
    host_ports: dict[tuple[str, int], str] = {}
    node_ports: dict[int, str] = {}
    for c in clusters:
        where = f"clusters[{c.index}]"
        if c.name in seen_names:
            r.problem(f"{where}.name", f"duplicate cluster name {c.name!r} "
                      f"(also clusters[{seen_names[c.name]}])", "give every cluster its own name")
        seen_names.setdefault(c.name, c.index)
        if c.id in seen_ids:
            r.problem(f"{where}.id",
                      f"duplicate cluster id {c.id} (also clusters[{seen_ids[c.id]}])",
                      "give every cluster a unique id from 1 to 255")
        seen_ids.setdefault(c.id, c.index)
        for field_name, port in (("gateway.httpHostPort", c.gateway.http_host_port),
                                 ("gateway.httpsHostPort", c.gateway.https_host_port)):
            key = (c.gateway.listen_address, port)
            wildcard = ("0.0.0.0", port)
            clash = host_ports.get(key) or (host_ports.get(wildcard) if key != wildcard else None)
            if clash is None and c.gateway.listen_address == "0.0.0.0":
                clash = next((w for (a, p), w in host_ports.items() if p == port), None)
            if clash:
                r.problem(f"{where}.{field_name}", f"host port {port} is already used by {clash}",
                          "give each cluster its own host ports")
            host_ports.setdefault(key, f"{where}.{field_name}")
        for field_name, port in (("gateway.httpNodePort", c.gateway.http_node_port),
                                 ("gateway.httpsNodePort", c.gateway.https_node_port),
                                 ("clustermesh.apiserverNodePort", c.clustermesh_node_port)):
            if port in node_ports:
                r.problem(f"{where}.{field_name}", f"NodePort {port} is already used by "
                          f"{node_ports[port]}", "give every listener and cluster its own NodePort "
                          "(under kube-proxy replacement a NodePort shared across clusters is "
                          "served locally)")
            node_ports.setdefault(port, f"{where}.{field_name}")
    nets: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    for c in clusters:
        where = f"clusters[{c.index}]"
        for field_key, value in (("podCIDR", c.pod_cidr), ("serviceCIDR", c.service_cidr),
                                 ("lbPool", c.lb_pool)):
            if not value:
                continue
            net = ipaddress.ip_network(value)
            for other_where, other in nets:
                if net.version == other.version and net.overlaps(other):
                    r.problem(f"{where}.{field_key}", f"{value} overlaps {other} ({other_where})",
                              "pick non-overlapping ranges for every cluster's pods, services "
                              "and LoadBalancer pool")
            nets.append((f"{where}.{field_key}", net))
