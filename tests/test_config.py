"""Config: the shipped files load; bad configs are refused before any side effect, field by
field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.config import load_config, parse_config
from lab.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BASE: dict[str, Any] = yaml.safe_load((ROOT / "config/lab.yaml").read_text())


def test_shipped_single_cluster_config_is_the_seed_lab() -> None:
    cfg = load_config(ROOT / "config/lab.yaml")
    (c,) = cfg.clusters
    assert (c.name, c.id, c.pod_cidr, c.lb_pool) == ("lab", 1, "10.244.0.0/16", "172.18.255.0/24")
    assert (c.gateway.http_host_port, c.gateway.https_host_port) == (30080, 30443)
    assert (c.gateway.http_node_port, c.gateway.https_node_port) == (30080, 30443)
    assert cfg.versions.cilium == "1.18.4"
    assert cfg.versions.gateway_api == "v1.4.0"
    assert cfg.versions.cert_manager == "v1.19.0"
    assert "@sha256:" in cfg.versions.node_image and ":v1.33." in cfg.versions.node_image
    assert not cfg.is_mesh


def test_shipped_mesh_config_allocates_distinct_values() -> None:
    cfg = load_config(ROOT / "config/mesh.yaml")
    east, west = cfg.clusters
    assert (east.id, west.id) == (1, 2)
    assert east.pod_cidr != west.pod_cidr and east.service_cidr != west.service_cidr
    assert east.gateway.https_host_port != west.gateway.https_host_port
    assert east.clustermesh_node_port != west.clustermesh_node_port
    assert cfg.is_mesh


def test_config_path_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(BASE))
    monkeypatch.setenv("LAB_CONFIG", str(path))
    assert load_config(None).path == path


def _with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        target: Any = data
        keys = dotted.split("__")
        for k in keys[:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = keys[-1]
        if value is _DELETE:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return data


_DELETE = object()
SECOND = {"name": "two", "id": 2, "podCIDR": "10.245.0.0/16", "serviceCIDR": "10.97.0.0/16",
          "lbPool": "172.18.254.0/24",
          "gateway": {"httpNodePort": 30180, "httpsNodePort": 30543, "httpHostPort": 30180,
                      "httpsHostPort": 30543}}


def _two(**second: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    other = copy.deepcopy(SECOND)
    for k, v in second.items():
        if isinstance(v, dict) and isinstance(other.get(k), dict):
            other[k].update(v)
        else:
            other[k] = v
    data["clusters"].append(other)
    return data


BAD_CONFIGS: list[tuple[str, Any, str, str]] = [
    # (case, raw config, field named in the error, words of the fix)
    ("unknown top-level key", _with(clsuters=[]), "clsuters", "remove it"),
    ("unknown cluster key", _with(clusters__0__podCidr="10.0.0.0/16"), "clusters[0].podCidr",
     "use one of"),
    ("uppercase name", _with(clusters__0__name="Lab"), "clusters[0].name", "lowercase"),
    ("name too long", _with(clusters__0__name="a" * 33), "clusters[0].name", "at most 32"),
    ("name 'default'", _with(clusters__0__name="default"), "clusters[0].name", "another name"),
    ("id 0", _with(clusters__0__id=0), "clusters[0].id", "1 to 255"),
    ("id 256", _with(clusters__0__id=256), "clusters[0].id", "1 to 255"),
    ("id as string", _with(clusters__0__id="one"), "clusters[0].id", "integer"),
    ("port as bool", _with(clusters__0__gateway={"httpNodePort": True}),
     "clusters[0].gateway.httpNodePort", "integer"),
    ("bad CIDR", _with(clusters__0__podCIDR="10.244.0.1/16"), "clusters[0].podCIDR",
     "network address"),
    ("NodePort outside range", _with(clusters__0__gateway={"httpsNodePort": 443}),
     "clusters[0].gateway.httpsNodePort", "30000-32767"),
    ("missing apiVersion", _with(apiVersion=_DELETE), "apiVersion",
     "add `apiVersion: kind-cilium-lab/v1`"),
    ("missing cluster name", _with(clusters__0__name=_DELETE), "clusters[0].name", "add `name:`"),
    ("node image not pinned", _with(versions__nodeImage="kindest/node:v1.33.1"),
     "versions.nodeImage", "@sha256"),
    ("kubernetes too new for cilium 1.18",
     _with(versions__nodeImage="kindest/node:v1.35.0@sha256:" + "0" * 64),
     "versions.nodeImage", "1.30-1.33"),
    ("wrong format version", _with(apiVersion="v2"), "apiVersion", "kind-cilium-lab/v1"),
    ("no clusters", _with(clusters=[]), "clusters", "at least one"),
    ("duplicate id", _two(id=1), "clusters[1].id", "unique id"),
    ("duplicate name", _two(name="lab"), "clusters[1].name", "its own name"),
    ("overlapping pod CIDRs", _two(podCIDR="10.244.128.0/17"), "clusters[1].podCIDR",
     "non-overlapping"),
    ("pod CIDR overlapping services", _two(podCIDR="10.96.0.0/16"), "clusters[1].podCIDR",
     "non-overlapping"),
    ("overlapping LB pools", _two(lbPool="172.18.255.128/25"), "clusters[1].lbPool",
     "non-overlapping"),
    ("pod CIDR overlapping its own service CIDR", _with(clusters__0__podCIDR="10.96.0.0/12"),
     "clusters[0].serviceCIDR", "non-overlapping"),
    ("service CIDR overlapping its own LB pool",
     _with(clusters__0__serviceCIDR="172.18.255.0/28"), "clusters[0].lbPool", "non-overlapping"),
    ("duplicate host port", _two(gateway={"httpsHostPort": 30443}),
     "clusters[1].gateway.httpsHostPort", "own host ports"),
    ("duplicate NodePort", _two(gateway={"httpNodePort": 30080, "httpHostPort": 31080}),
     "clusters[1].gateway.httpNodePort", "own NodePort"),
    ("bad listen address", _with(clusters__0__gateway={"listenAddress": "localhost"}),
     "clusters[0].gateway.listenAddress", "127.0.0.1"),
    ("gateway host not a label", _with(gatewayHosts=["Echo App"]), "gatewayHosts[0]",
     "lowercase"),
    ("workers out of range", _with(clusters__0__workers=20), "clusters[0].workers", "0 to 8"),
    ("downloadTools not a boolean", _with(downloadTools="no"), "downloadTools", "true or false"),
]


@pytest.mark.parametrize(("raw", "field", "fix"), [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_refused_with_field_and_fix(raw: Any, field: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, Path("config/lab.yaml"))
    problems = err.value.problems
    matching = [p for p in problems if p.field == field]
    assert matching, f"no problem names {field!r}: {problems}"
    assert any(fix in p.fix for p in matching), [p.fix for p in matching]
    assert "config/lab.yaml" in str(err.value)


def test_every_problem_is_reported_at_once() -> None:
    raw = _with(clusters__0__id=0, clusters__0__name="Bad Name", extra=1)
    with pytest.raises(ConfigError) as err:
        parse_config(raw, Path("c.yaml"))
    fields = {p.field for p in err.value.problems}
    assert {"clusters[0].id", "clusters[0].name", "extra"} <= fields


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")


def test_fingerprint_changes_with_shape_not_with_state_dir(tmp_path: Path) -> None:
    a = parse_config(copy.deepcopy(BASE), Path("a.yaml"))
    b = parse_config(_with(stateDir=str(tmp_path)), Path("a.yaml"))
    c = parse_config(_with(clusters__0__workers=1), Path("a.yaml"))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("count", range(2, 9))
def test_allocation_for_n_clusters_never_overlaps(count: int) -> None:
    import ipaddress

    raw = copy.deepcopy(BASE)
    raw["clusters"] = [{"name": f"c{i}"} for i in range(count)]
    cfg = parse_config(raw, Path("mesh.yaml"))
    nets = [ipaddress.ip_network(n) for c in cfg.clusters for n in (c.pod_cidr, c.service_cidr)]
    assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])
    ports = [p for c in cfg.clusters for p in (c.gateway.http_node_port, c.gateway.https_node_port,
                                               c.clustermesh_node_port)]
    assert len(set(ports)) == len(ports)
    hosts = [p for c in cfg.clusters for p in (c.gateway.http_host_port, c.gateway.https_host_port)]
    assert len(set(hosts)) == len(hosts)
    assert len({c.id for c in cfg.clusters}) == count
    # deterministic
    again = parse_config(copy.deepcopy(raw), Path("mesh.yaml"))
    assert again.clusters == cfg.clusters
