"""Cluster Mesh (issue 6): allocation for 2…8 clusters, rendering, and the mesh end to end.

Allocation and rendering are pure. The end-to-end tests run the real `invoke lab.*` tasks against
one real API server per cluster, each with a ``tests.support.simcluster.SimCluster``: the agents'
mesh status follows the Cilium values actually installed (peer address from the chart's
``hostAliases``, the peer's clustermesh NodePort on its node IP from the fake Docker, the shared
CA, cluster names and ids) and the global service answers from the pods of every cluster the
agents are connected to, under the policies the product applied.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.config import parse_config
from lab.errors import ConfigError
from lab.network import PoolError, derive_pools
from tests.conftest import REPO, LabEnv
from tests.support.simcluster import SimLab, make_lab, unb64
from tests.support.upstream import require_upstream, validate_helm_values, validate_object

BASE: dict[str, Any] = yaml.safe_load((REPO / "config" / "mesh.yaml").read_text())
KIND_SUBNET = "172.18.0.0/16"
MESH_STATES = ["cluster", "cni", "gateway", "certs", "locked", "meshed"]


def _cfg(clusters: list[dict[str, Any]]) -> Any:
    raw = copy.deepcopy(BASE)
    raw["clusters"] = clusters
    return parse_config(raw, Path("mesh.yaml"))


# -- allocation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", range(2, 9))
def test_pool_slices_for_n_clusters_are_disjoint_inside_the_network_and_deterministic(
        count: int) -> None:
    cfg = _cfg([{"name": f"c{i}"} for i in range(count)])
    pools = derive_pools(cfg.clusters, [KIND_SUBNET])
    assert list(pools) == [f"c{i}" for i in range(count)]
    nets = [ipaddress.ip_network(p) for p in pools.values()]
    network = ipaddress.ip_network(KIND_SUBNET)
    assert nets[0] == ipaddress.ip_network("172.18.255.0/24")  # the seed lab's pool first
    assert [n.prefixlen for n in nets] == [24] * count
    assert all(n.subnet_of(network) for n in nets)
    # carved from the top, one per position: Docker hands container addresses from the bottom
    assert [str(n) for n in nets] == [f"172.18.{255 - i}.0/24" for i in range(count)]
    assert not any(n.overlaps(ipaddress.ip_network("172.18.0.0/24")) for n in nets)
    every = nets + [ipaddress.ip_network(x) for c in cfg.clusters
                    for x in (c.pod_cidr, c.service_cidr)]
    assert all(not a.overlaps(b) for i, a in enumerate(every) for b in every[i + 1:])
    assert derive_pools(_cfg([{"name": f"c{i}"} for i in range(count)]).clusters,
                        [KIND_SUBNET]) == pools


@pytest.mark.parametrize("subnet, prefix, fits", [("172.30.0.0/20", 24, 8),
                                                   ("10.11.12.0/24", 27, 7)])
def test_pool_slices_shrink_with_the_docker_network(subnet: str, prefix: int, fits: int) -> None:
    cfg = _cfg([{"name": f"c{i}"} for i in range(fits)])
    nets = [ipaddress.ip_network(p) for p in derive_pools(cfg.clusters, [subnet]).values()]
    assert {n.prefixlen for n in nets} == {prefix}
    assert all(n.subnet_of(ipaddress.ip_network(subnet)) for n in nets)  # type: ignore[arg-type]
    assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])
    assert ipaddress.ip_network(subnet).network_address not in nets[-1]  # bottom slice kept free
    if fits < 8:  # one cluster more does not fit: refused with what to do instead
        with pytest.raises(PoolError, match="no room") as err:
            derive_pools(_cfg([{"name": f"c{i}"} for i in range(fits + 1)]).clusters, [subnet])
        assert "lbPool" in err.value.hint


def test_user_overrides_are_respected_and_the_rest_allocated_by_position() -> None:
    override = {"name": "c1", "id": 42, "podCIDR": "10.200.0.0/16",
                "serviceCIDR": "10.201.0.0/16", "lbPool": "172.18.100.0/24",
                "gateway": {"httpNodePort": 31080, "httpsNodePort": 31443, "httpHostPort": 8080,
                            "httpsHostPort": 8443, "listenAddress": "0.0.0.0"},
                "clustermesh": {"apiserverNodePort": 32000}}
    cfg = _cfg([{"name": "c0"}, override, {"name": "c2"}, {"name": "c3"}])
    c0, c1, c2, c3 = cfg.clusters
    assert (c1.id, c1.pod_cidr, c1.service_cidr, c1.lb_pool) == (
        42, "10.200.0.0/16", "10.201.0.0/16", "172.18.100.0/24")
    g = c1.gateway
    assert (g.http_node_port, g.https_node_port, g.http_host_port, g.https_host_port,
            g.listen_address, c1.clustermesh_node_port) == (31080, 31443, 8080, 8443, "0.0.0.0",
                                                            32000)
    # the others keep their positional allocation, as if c1 had not been overridden
    assert [(c.id, c.pod_cidr, c.service_cidr) for c in (c0, c2, c3)] == [
        (1, "10.244.0.0/16", "10.96.0.0/16"), (3, "10.246.0.0/16", "10.98.0.0/16"),
        (4, "10.247.0.0/16", "10.99.0.0/16")]
    assert [(c.gateway.https_node_port, c.gateway.https_host_port, c.clustermesh_node_port)
            for c in (c0, c2, c3)] == [(30443, 30443, 32379), (30643, 30643, 32381),
                                       (30743, 30743, 32382)]
    pools = derive_pools(cfg.clusters, [KIND_SUBNET])
    assert pools == {"c0": "172.18.255.0/24", "c1": "172.18.100.0/24",
                     "c2": "172.18.253.0/24", "c3": "172.18.252.0/24"}


CONFLICTS: list[tuple[str, list[dict[str, Any]], str, str]] = [
    # (case, clusters, field named, words of the fix): two explicit values that cannot coexist
    ("clustermesh NodePort set to another cluster's gateway NodePort",
     [{"name": "c0", "gateway": {"httpNodePort": 31000, "httpHostPort": 8080}},
      {"name": "c1", "clustermesh": {"apiserverNodePort": 31000}}],
     "clusters[1].clustermesh.apiserverNodePort", "own NodePort"),
    ("the same clustermesh NodePort twice",
     [{"name": "c0", "clustermesh": {"apiserverNodePort": 32000}},
      {"name": "c1", "clustermesh": {"apiserverNodePort": 32000}}],
     "clusters[1].clustermesh.apiserverNodePort", "own NodePort"),
    ("service CIDR set inside another cluster's pod CIDR",
     [{"name": "c0", "podCIDR": "10.50.0.0/16"},
      {"name": "c1", "serviceCIDR": "10.50.128.0/20"}],
     "clusters[1].serviceCIDR", "non-overlapping"),
    ("the same id twice",
     [{"name": "c0", "id": 7}, {"name": "c1"}, {"name": "c2", "id": 7}],
     "clusters[2].id", "unique id"),
]


def test_allocation_routes_around_explicit_values() -> None:
    """What one cluster sets is never handed to another by default."""
    cfg = _cfg([{"name": "c0", "podCIDR": "10.245.0.0/16"}, {"name": "c1"},
                {"name": "c2", "id": 1,
                 "gateway": {"httpNodePort": 30180, "httpHostPort": 8180}}])
    c0, c1, c2 = cfg.clusters
    assert (c0.id, c1.id, c2.id) == (2, 3, 1)
    # slot i, or the next free one upwards
    assert (c0.pod_cidr, c1.pod_cidr, c2.pod_cidr) == ("10.245.0.0/16", "10.246.0.0/16",
                                                       "10.247.0.0/16")
    assert (c0.gateway.http_node_port, c1.gateway.http_node_port) == (30080, 30280)
    assert c2.gateway.http_node_port == 30180
    assert _cfg([{"name": "c0", "podCIDR": "10.245.0.0/16"}, {"name": "c1"},
                 {"name": "c2", "id": 1,
                  "gateway": {"httpNodePort": 30180, "httpHostPort": 8180}}]) == cfg


@pytest.mark.parametrize(("clusters", "field", "fix"), [c[1:] for c in CONFLICTS],
                         ids=[c[0] for c in CONFLICTS])
def test_conflicting_overrides_are_refused_naming_what_to_change(
        clusters: list[dict[str, Any]], field: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(clusters)
    matching = [p for p in err.value.problems if p.field == field]
    assert matching, err.value.problems
    assert any(fix in p.fix for p in matching)


@pytest.mark.parametrize("clusters, words, fix", [
    ([{"name": "c0"}, {"name": "c1", "lbPool": "172.18.255.0/24"}],
     "pools of 'c0' (172.18.255.0/24) and 'c1' (172.18.255.0/24) overlap",
     "give each cluster its own lbPool"),
    ([{"name": "c0"}, {"name": "c1", "lbPool": "192.168.50.0/24"}],
     "clusters[1].lbPool 192.168.50.0/24 of cluster 'c1' is outside the Docker network",
     "172.18.254.0/24"),
])
def test_pool_overrides_that_cannot_work_are_refused(clusters: list[dict[str, Any]], words: str,
                                                     fix: str) -> None:
    cfg = _cfg(clusters)  # the config alone is fine: the network decides
    with pytest.raises(PoolError) as err:
        derive_pools(cfg.clusters, [KIND_SUBNET])
    assert words in err.value.message and fix in err.value.hint


def test_lab_up_refuses_a_pool_conflict_before_any_side_effect(tmp_path: Path) -> None:
    raw = copy.deepcopy(BASE)
    raw["stateDir"] = str(tmp_path / ".lab")
    raw["clusters"] = [{"name": "east"}, {"name": "west", "lbPool": "172.18.255.0/24"}]
    config = tmp_path / "mesh.yaml"
    config.write_text(yaml.safe_dump(raw))
    fake = tmp_path / "fake"
    fake.mkdir()
    env = LabEnv(root=tmp_path, config=config, fake_state=fake,
                 kubeconfig=tmp_path / "kubeconfig", fronts={})
    proc = env.run("lab.mesh", check=False, LAB_SKIP_DOCTOR="0")
    assert proc.returncode == 1
    assert "docker network kind" in proc.stdout + proc.stderr
    assert "give each cluster its own lbPool" in proc.stdout + proc.stderr
    assert env.calls("kind", "create") == [] and env.calls("helm", "upgrade") == []
    assert not (tmp_path / ".lab" / "clusters").exists()


# -- render ----------------------------------------------------------------------------------------

def test_render_of_the_two_cluster_config_validates(tmp_path: Path) -> None:
    require_upstream()
    fake = tmp_path / "fake"
    fake.mkdir()
    env = LabEnv(root=tmp_path, config=REPO / "config" / "mesh.yaml", fake_state=fake,
                 kubeconfig=tmp_path / "kubeconfig", fronts={})
    out = tmp_path / "render"
    env.run("lab.render", "--config", str(REPO / "config" / "mesh.yaml"), "--out", str(out))
    assert not (fake / "calls.jsonl").exists()
    assert sorted(p.name for p in out.iterdir()) == ["east", "west"]
    cfg = parse_config(copy.deepcopy(BASE), REPO / "config" / "mesh.yaml")
    kinds: dict[str, Any] = {}
    for cluster in cfg.clusters:
        base = out / cluster.name
        objects = [d for path in sorted(base.glob("*/objects.yaml"))
                   for d in yaml.safe_load_all(path.read_text()) if d]
        assert {"Gateway", "Certificate", "CiliumClusterwideNetworkPolicy",
                "CiliumNetworkPolicy", "Deployment", "Service", "Pod"} <= {
            o["kind"] for o in objects}
        for obj in objects:
            assert validate_object(obj) == [], f"{cluster.name}: {obj['kind']} " \
                                               f"{obj['metadata'].get('name')}"
        names = {o["metadata"]["name"] for o in objects
                 if o["kind"] == "CiliumNetworkPolicy"}
        assert "lab-infra-clustermesh-apiserver" in names  # the mesh allowance is rendered
        values = yaml.safe_load((base / "helm" / "cilium.values.yaml").read_text())
        peers = values["clustermesh"]["config"]["clusters"]
        others = [c for c in cfg.clusters if c.name != cluster.name]
        assert [(p["name"], p["port"]) for p in peers] == [
            (o.name, o.clustermesh_node_port) for o in others]
        assert all(p["ips"] and "resolved at apply" in p["ips"][0] for p in peers)
        checked = copy.deepcopy(values)
        for p in checked["clustermesh"]["config"]["clusters"]:
            p["ips"] = ["172.18.0.9"]  # the placeholder is for people; check the rest
        assert validate_helm_values(checked, "cilium") == []
        assert values["cluster"] == {"name": cluster.name, "id": cluster.id}
        assert values["clustermesh"]["useAPIServer"] is True
        assert values["clustermesh"]["apiserver"]["service"]["nodePort"] == \
            cluster.clustermesh_node_port
        cm = yaml.safe_load((base / "helm" / "cert-manager.values.yaml").read_text())
        assert validate_helm_values(cm, "cert-manager") == []
        kind_cfg = yaml.safe_load((base / "kind.yaml").read_text())
        kinds[cluster.name] = kind_cfg
        assert kind_cfg["networking"]["podSubnet"] == cluster.pod_cidr
        pool = next(o for o in objects if o["kind"] == "CiliumLoadBalancerIPPool")
        assert pool["spec"]["blocks"] == [{"cidr": f"172.18.{255 - cluster.index}.0/24"}]
    host_ports = [m["hostPort"] for k in kinds.values() for n in k["nodes"]
                  for m in n.get("extraPortMappings") or []]
    assert len(host_ports) == len(set(host_ports)) == 4


# -- the mesh end to end ---------------------------------------------------------------------------

# Before the module's mesh is built: the two servers this test leases are then the mesh's.
def test_a_crash_in_one_cluster_lets_the_other_reach_locked_then_resume_converges(
        tmp_path: Path, envtest_pool: Any) -> None:
    require_upstream()
    with envtest_pool.lease(2) as servers:
        _crash_one_cluster_then_resume(tmp_path, servers)


def _crash_one_cluster_then_resume(tmp_path: Path, servers: list[Any]) -> None:
    lab = make_lab(tmp_path, servers, "config/mesh.yaml", [{"name": "east"}, {"name": "west"}])
    env = lab.env
    try:
        # west's API server fails helm's install of cert-manager (fakelib's injection keys are
        # per tool and subcommand, not per cluster: the fault goes into west's API instead)
        lab.sims["west"].emu.fail_next(
            "POST", r"^/api/v1/namespaces/cert-manager/serviceaccounts$", 500, "InternalError",
            message="etcdserver: request timed out")
        proc = env.run("lab.mesh", check=False, timeout=150, LAB_GATE_TIMEOUT="10")
        assert proc.returncode == 1
        assert "etcdserver: request timed out" in proc.stderr
        east, west = env.record("east"), env.record("west")
        assert east["state"] == "locked"
        assert [t["outcome"] for t in east["history"]] == ["ok"] * 5
        assert west["state"] == "gateway"
        assert (west["history"][-1]["transition"], west["history"][-1]["outcome"]) == (
            "certs", "failed")
        helm = json.loads((env.fake_state / "helm.json").read_text())
        assert helm["kind-west"]["cert-manager/cert-manager"]["history"][-1]["status"] == \
            "failed"
        assert "cert-manager/cert-manager" in helm["kind-east"]
        east_len = len(east["history"])
        proc = env.run("lab.up", "--resume", timeout=150, LAB_GATE_TIMEOUT="10")
        for name in ("east", "west"):
            rec = env.record(name)
            assert rec["state"] == "meshed", name
            assert all(rec["gates"][s]["ready"] for s in MESH_STATES), name
        # east was trusted (re-probed, not re-run) and only went on to `meshed`
        assert [(t["transition"], t["outcome"]) for t in env.record("east")["history"][
            east_len:]] == [("meshed", "ok")]
        assert [(t["transition"], t["outcome"]) for t in env.record("west")["history"][-3:]] == [
            ("certs", "ok"), ("locked", "ok"), ("meshed", "ok")]
        # the failed release was cleared before the retry
        uninstalls = [a for a in env.calls("helm", "uninstall")]
        assert len(uninstalls) == 1 and uninstalls[0][1] == "cert-manager"
        assert "kind-west" in uninstalls[0]
        assert len(env.calls("kind", "create")) == 2
        lab.check()
    finally:
        lab.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory,
         envtest_pool: Any) -> Iterator[tuple[SimLab, Any, float]]:
    """Two clusters, east and west, each its own real API server (service ranges as the config
    allocates them), brought from absent to `meshed` by one `invoke lab.mesh`. The tests below
    share it in file order; the last one removes west."""
    require_upstream()
    with envtest_pool.lease(2) as servers:
        lab = make_lab(tmp_path_factory.mktemp("mesh"), servers, "config/mesh.yaml",
                       [{"name": "east"}, {"name": "west"}])
        try:
            start = time.monotonic()
            proc = lab.env.run("lab.mesh", check=False, timeout=150, LAB_GATE_TIMEOUT="10")
            yield lab, proc, time.monotonic() - start
            lab.check()
        finally:
            lab.close()


def _interval(rec: dict[str, Any], last: str) -> tuple[datetime.datetime, datetime.datetime]:
    first = datetime.datetime.fromisoformat(rec["history"][0]["started"])
    end = next(t for t in rec["history"] if t["transition"] == last and t["outcome"] == "ok")
    return first, datetime.datetime.fromisoformat(end["finished"])


def _node_ip(env: LabEnv, cluster: str) -> str:
    kind = json.loads((env.fake_state / "kind.json").read_text())
    return str(kind["clusters"][cluster]["nodes"][0]["ipv4"])


def _docker_ip(env: LabEnv, node: str) -> str:
    """The node's address on the kind network, as the fake `docker inspect` reports it."""
    proc = subprocess.run(["docker", "inspect", node, "--format",
                           "{{json .NetworkSettings.Networks}}"], env=env.env(),
                          capture_output=True, text=True, check=True)
    return str(json.loads(proc.stdout)["kind"]["IPAddress"])


def _cilium_release(env: LabEnv, cluster: str) -> dict[str, Any]:
    helm = json.loads((env.fake_state / "helm.json").read_text())
    return dict(helm[f"kind-{cluster}"]["kube-system/cilium"])


@pytest.mark.envtest
def test_lab_mesh_brings_both_clusters_up_in_parallel_to_meshed(
        mesh: tuple[SimLab, Any, float]) -> None:
    lab, proc, seconds = mesh
    env = lab.env
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = {n: env.record(n) for n in ("east", "west")}
    for name, rec in recs.items():
        assert rec["state"] == "meshed", name
        firsts = [(t["transition"], t["outcome"]) for t in rec["history"]
                  if t["from"] != t["transition"]]
        assert firsts == [(s, "ok") for s in MESH_STATES], name
        assert all(rec["gates"][s]["ready"] for s in MESH_STATES), name
        other = "west" if name == "east" else "east"
        checks = {c["name"]: c for c in rec["gates"]["meshed"]["checks"]}
        assert checks["every agent connected to every remote cluster"]["detail"] == \
            "1 agent(s) × 1 peer(s) ready"
        answered = checks["global service answered from the other clusters"]["detail"]
        assert f"echo-{other}-" in answered  # the other cluster's pods answered
    # in parallel: each cluster's way to `locked` overlaps the other's
    (e0, e1), (w0, w1) = _interval(recs["east"], "locked"), _interval(recs["west"], "locked")
    assert max(e0, w0) < min(e1, w1)
    ran = {tuple(c.command[:2]) for s in lab.sims.values() for c in s.emu.exec_calls}
    assert {("cilium-dbg", "status"), ("curl", "-s")} <= ran
    print(f"lab.mesh absent → meshed (2 clusters): {seconds:.1f}s")


@pytest.mark.envtest
def test_installed_cilium_values_list_the_other_cluster_as_peer(
        mesh: tuple[SimLab, Any, float]) -> None:
    require_upstream()
    lab = mesh[0]
    env = lab.env
    cfg = parse_config(yaml.safe_load(env.config.read_text()), env.config)
    ports = {c.name: c.clustermesh_node_port for c in cfg.clusters}
    assert ports == {"east": 32379, "west": 32380}
    for name, other in (("east", "west"), ("west", "east")):
        release = _cilium_release(env, name)
        last = release["history"][-1]
        assert last["status"] == "deployed"
        values = last["values"]
        assert values["cluster"]["name"] == name
        peer_ip = _docker_ip(env, f"{other}-control-plane")
        assert values["clustermesh"]["config"] == {"enabled": True, "clusters": [
            {"name": other, "port": ports[other], "ips": [peer_ip]}]}
        assert values["clustermesh"]["apiserver"]["service"]["nodePort"] == ports[name]
        assert validate_helm_values(values, "cilium") == []
        assert env.record(name)["facts"]["meshPeers"] == values["clustermesh"]["config"][
            "clusters"]
        # what the chart made of them: the agent resolves the peer to that node IP
        sim = lab.sims[name]
        secret = sim.emu.get("v1", "Secret", "cilium-clustermesh", "kube-system")
        assert yaml.safe_load(unb64(secret["data"][other]))["endpoints"] == [
            f"https://{other}.mesh.cilium.io:{ports[other]}"]
        agent = next(p for p in sim.emu.list("v1", "Pod", "kube-system")
                     if p["metadata"]["labels"].get("k8s-app") == "cilium")
        assert agent["spec"]["hostAliases"] == [{"ip": peer_ip,
                                                 "hostnames": [f"{other}.mesh.cilium.io"]}]
        # and the peer really serves its clustermesh-apiserver on that NodePort
        svc = lab.sims[other].emu.get("v1", "Service", "clustermesh-apiserver", "kube-system")
        assert svc["spec"]["type"] == "NodePort"
        assert [p["nodePort"] for p in svc["spec"]["ports"]] == [ports[other]]
    assert _node_ip(env, "east") != _node_ip(env, "west")


@pytest.mark.envtest
def test_second_mesh_is_idempotent(mesh: tuple[SimLab, Any, float]) -> None:
    lab = mesh[0]
    env = lab.env
    upgrades = len(env.calls("helm", "upgrade"))
    creates = {n: len(s.api_creates) for n, s in lab.sims.items()}
    revisions = {n: len(_cilium_release(env, n)["history"]) for n in lab.sims}
    for sim in lab.sims.values():
        sim.emu.clear_requests()
    start = time.monotonic()
    env.run("lab.mesh", timeout=150, LAB_GATE_TIMEOUT="10")
    took = time.monotonic() - start
    assert len(env.calls("helm", "upgrade")) == upgrades
    for name, sim in lab.sims.items():
        posts = [r for r in sim.emu.writes() if r.method == "POST" and "dryRun" not in r.query]
        assert posts == [], name
        assert sim.api_creates[creates[name]:] == [], name
        assert len(_cilium_release(env, name)["history"]) == revisions[name]
        rec = env.record(name)
        assert rec["state"] == "meshed" and rec["gates"]["meshed"]["ready"]
    print(f"second lab.mesh: {took:.1f}s")


@pytest.mark.envtest
def test_down_west_removes_it_from_east_peers(mesh: tuple[SimLab, Any, float]) -> None:
    """Runs last on the shared mesh: it removes west."""
    lab = mesh[0]
    env = lab.env
    east_revisions = len(_cilium_release(env, "east")["history"])
    east_history = len(env.record("east")["history"])
    proc = env.run("lab.down", "--cluster", "west", timeout=150, LAB_GATE_TIMEOUT="10")
    assert "removed west" in proc.stdout
    # west with its own kubeconfig, then its context in the user's kubeconfig
    assert [a[:4] for a in env.calls("kind", "delete")] == [
        ["delete", "cluster", "--name", "west"]] * 2
    kind = json.loads((env.fake_state / "kind.json").read_text())
    assert list(kind["clusters"]) == ["east"]
    assert not (env.state_dir / "clusters" / "west.json").exists()
    # east's Cilium values were re-applied without west...
    release = _cilium_release(env, "east")
    assert len(release["history"]) == east_revisions + 1
    last = release["history"][-1]
    assert last["status"] == "deployed"
    assert last["values"]["clustermesh"]["config"] == {"enabled": True, "clusters": []}
    sim = lab.sims["east"]
    secret = sim.emu.get("v1", "Secret", "cilium-clustermesh", "kube-system")
    assert "west" not in (secret.get("data") or {})
    # ...and east's record stays consistent: still meshed, no peers, every gate ready
    rec = env.record("east")
    assert rec["state"] == "meshed"
    assert rec["facts"]["meshPeers"] == []
    assert [(t["transition"], t["from"], t["outcome"]) for t in rec["history"][east_history:]] \
        == [("meshed", "meshed", "ok")]
    assert all(rec["gates"][s]["ready"] for s in MESH_STATES)
    checks = {c["name"]: c["detail"] for c in rec["gates"]["meshed"]["checks"]}
    assert checks["global service answered from the other clusters"] == \
        "no other cluster is in the mesh (the lab has one left)"
    status = {r["cluster"]: r for r in json.loads(
        env.run("lab.status", "--json", "--offline").stdout)}
    assert status["west"]["state"] == "absent" and status["east"]["state"] == "meshed"


def test_pod_names_are_matched_to_their_cluster_exactly() -> None:
    from lab.steps.meshed import _pod_of

    assert _pod_of("echo-east-7d9f8b6c5d-x2x9k", "east")
    assert not _pod_of("echo-east-2-7d9f8b6c5d-x2x9k", "east")  # cluster `east-2`
    assert _pod_of("echo-east-2-7d9f8b6c5d-x2x9k", "east-2")


def test_global_service_check_fails_while_a_peer_has_not_joined(tmp_path: Path) -> None:
    from lab import logs
    from lab.config import load_config
    from lab.state import Record, StateStore
    from lab.steps.base import StepContext
    from lab.steps.meshed import MeshStep
    from lab.tools import Tools

    raw = yaml.safe_load((REPO / "config" / "mesh.yaml").read_text())
    raw["stateDir"] = str(tmp_path / ".lab")
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "mesh.yaml")
    store = StateStore(cfg.state_dir)
    store.save(Record(cluster="west", state="locked"))
    log = logs.get("test")
    east = cfg.clusters[0]
    ctx = StepContext(cfg, east, store, Record(cluster="east", state="locked"),
                      Tools(None, log), log)
    check = MeshStep()._global_service(ctx, ["west"])
    assert not check.ok and "west has not joined the mesh" in check.detail
