"""The shared pull-through image cache (lab/imagecache.py) against the fake docker/kind and the
pinned upstream chart values.

Judges: the chart values in ../shared/upstream (read here, image references built by hand from
the charts' own templates), kind v0.29.0's v1alpha4 field names (pkg/apis/config/v1alpha4/types.go,
hand-copied below), containerd 2.1.1's hosts.toml fields (docs/hosts.md), and the fake docker's
record of what was run.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from lab import imagecache, logs
from lab.config import parse_config
from lab.errors import LabError
from lab.tools import Tools
from tests.conftest import (
    REPO,
    LabEnv,
    ready_node,
    upstream_dir,
    with_fakes,
    write_config,
)
from tests.support.apifront import ApiFront

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the test extra installs tomli on 3.10
    import tomli as tomllib

CACHES = {  # registry → the container its hosts.toml points at, and the fallback server
    "quay.io": ("kind-cilium-lab-cache-quay-io", "https://quay.io"),
    "registry.k8s.io": ("kind-cilium-lab-cache-registry-k8s-io", "https://registry.k8s.io"),
    "docker.io": ("kind-cilium-lab-cache-docker-io", "https://registry-1.docker.io"),
}
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.53"  # lab/steps/certs.py's demo app


# -- the judge: what the pinned charts run, built here from the upstream values -------------------

def _upstream_values(rel: str) -> dict[str, Any]:
    path = upstream_dir() / rel
    if not path.is_file():
        pytest.skip(f"{path} is absent (set LAB_UPSTREAM_DIR)")
    return copy.deepcopy(_parsed_values(path))


@functools.cache
def _parsed_values(path: Path) -> dict[str, Any]:
    """Each chart's values.yaml parsed once (libyaml where PyYAML has it: ~10x faster)."""
    data: dict[str, Any] = yaml.load(path.read_text(),
                                     Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return data


def expected_images(mesh: bool) -> list[str]:
    """Cilium 1.18.4: `cilium.image` is repository:tag@digest when useDigest; the operator's image
    is repository-<cloud><suffix>:tag@<cloud>Digest, cloud `generic` unless eni/azure/alibabacloud
    (templates/cilium-operator/_helpers.tpl). cert-manager v1.19.0: repository@digest, else
    repository:tag, tag defaulting to the appVersion v1.19.0 (templates/_helpers.tpl `image`)."""
    cil = _upstream_values("cilium-1.18.4/helm/values.yaml")
    cm = _upstream_values("cert-manager-1.19.0/helm/values.yaml")

    def pinned(img: dict[str, Any]) -> str:
        assert img["useDigest"] is True and not img.get("override")
        return f"{img['repository']}:{img['tag']}@{img['digest']}"

    assert not (cil["eni"]["enabled"] or cil["azure"]["enabled"]
                or cil["alibabacloud"]["enabled"])
    op = cil["operator"]["image"]
    images = [
        pinned(cil["image"]),
        f"{op['repository']}-generic{op['suffix']}:{op['tag']}@{op['genericDigest']}",
        pinned(cil["envoy"]["image"]),
        pinned(cil["hubble"]["relay"]["image"]),
        pinned(cil["hubble"]["ui"]["backend"]["image"]),
        pinned(cil["hubble"]["ui"]["frontend"]["image"]),
    ]
    for section in (cm, cm["webhook"], cm["cainjector"], cm["startupapicheck"]):
        img = section["image"]
        assert "digest" not in img and "tag" not in img and "registry" not in img
        images.append(f"{img['repository']}:v1.19.0")
    # enabled by the chart's defaults (the lab does not turn them off)
    assert cm["cainjector"]["enabled"] and cm["startupapicheck"]["enabled"]
    if mesh:
        images.append(pinned(cil["clustermesh"]["apiserver"]["image"]))
    return [*images, AGNHOST]


def _cfg(tmp_path: Path, base: str = "config/lab.yaml", **top: Any) -> Any:
    raw = yaml.safe_load((REPO / base).read_text())
    raw.update({"stateDir": str(tmp_path / ".lab"), **top})
    return parse_config(raw, tmp_path / "lab.yaml")


def test_prefetch_list_equals_the_images_the_pinned_charts_run(tmp_path: Path) -> None:
    single, _ = imagecache.prefetch_images(_cfg(tmp_path))
    mesh, _ = imagecache.prefetch_images(_cfg(tmp_path, "config/mesh.yaml"))
    assert sorted(single) == sorted(expected_images(mesh=False))
    assert sorted(mesh) == sorted(expected_images(mesh=True))
    assert len(single) == len(set(single)) == 11


def test_the_committed_list_is_what_the_generator_writes_from_the_upstream_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    committed = imagecache.lock_path("1.18.4", "v1.19.0").read_text()
    monkeypatch.setattr(imagecache, "MANIFESTS", tmp_path)
    _upstream_values("cilium-1.18.4/helm/values.yaml")
    up = upstream_dir()
    assert imagecache.main([
        "lock", "--cilium-values", str(up / "cilium-1.18.4/helm/values.yaml"),
        "--cert-manager-values", str(up / "cert-manager-1.19.0/helm/values.yaml"),
        "--cilium", "1.18.4", "--cert-manager", "v1.19.0"]) == 0
    assert (tmp_path / "images-cilium-1.18.4-cert-manager-v1.19.0.yaml").read_text() == committed


def test_other_chart_versions_have_no_list_and_say_how_to_make_one(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "config/lab.yaml").read_text())
    raw["versions"]["cilium"] = "1.18.5"
    cfg = parse_config({**raw, "stateDir": str(tmp_path)}, tmp_path / "lab.yaml")
    images, missing = imagecache.prefetch_images(cfg)
    assert images == [AGNHOST]
    assert "1.18.5" in missing and "python -m lab.imagecache lock" in missing


# -- node configuration -----------------------------------------------------------------------

# kind v0.29.0 pkg/apis/config/v1alpha4/types.go: the yaml tags of Cluster, Node and Mount.
KIND_CLUSTER_FIELDS = {"kind", "apiVersion", "name", "nodes", "networking", "featureGates",
                       "runtimeConfig", "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902",
                       "containerdConfigPatches", "containerdConfigPatchesJSON6902"}
KIND_NODE_FIELDS = {"role", "image", "labels", "extraMounts", "extraPortMappings",
                    "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902"}
KIND_MOUNT_FIELDS = {"containerPath", "hostPath", "readOnly", "selinuxRelabel", "propagation"}


def _render(tmp_path: Path, base: str = "config/lab.yaml", **top: Any) -> Path:
    from lab.runner import Lab

    out = tmp_path / "render"
    Lab(_cfg(tmp_path, base, **top)).render(out)
    return out


def test_nodes_pull_every_upstream_registry_through_the_cache_with_upstream_fallback(
        tmp_path: Path) -> None:
    out = _render(tmp_path, "config/mesh.yaml")
    registries = {i.split("/")[0] for i in expected_images(mesh=True)}
    assert registries <= set(CACHES)
    for cluster in ("east", "west"):
        for registry, (container, server) in CACHES.items():
            hosts = tomllib.loads((out / cluster / "certs.d" / registry / "hosts.toml")
                                  .read_text())
            # containerd docs/hosts.md: `host`s are tried in order, then `server` (the fallback)
            assert hosts["server"] == server
            assert list(hosts["host"]) == [f"http://{container}:5000"]
            entry = hosts["host"][f"http://{container}:5000"]
            assert entry["capabilities"] == ["pull", "resolve"]
            assert set(entry) <= {"capabilities", "dial_timeout", "skip_verify", "ca",
                                  "client", "header", "override_path"}


def test_the_kind_config_mounts_the_hosts_files_and_sets_config_path(tmp_path: Path) -> None:
    out = _render(tmp_path, "config/mesh.yaml")
    for cluster in ("east", "west"):
        kind = yaml.safe_load((out / cluster / "kind.yaml").read_text())
        assert set(kind) <= KIND_CLUSTER_FIELDS
        patches = [tomllib.loads(p) for p in kind["containerdConfigPatches"]]
        assert patches == [{"plugins": {"io.containerd.grpc.v1.cri": {"registry": {
            "config_path": "/etc/containerd/certs.d"}}}}]
        for node in kind["nodes"]:
            assert set(node) <= KIND_NODE_FIELDS
            for mount in node["extraMounts"]:
                assert set(mount) <= KIND_MOUNT_FIELDS
            assert node["extraMounts"] == [{
                "containerPath": "/etc/containerd/certs.d",
                "hostPath": str(tmp_path / ".lab" / "work" / cluster / "certs.d"),
                "readOnly": True}]


def test_image_cache_false_leaves_nodes_and_docker_alone(tmp_path: Path) -> None:
    out = _render(tmp_path, imageCache=False)
    kind = yaml.safe_load((out / "lab" / "kind.yaml").read_text())
    assert "containerdConfigPatches" not in kind
    assert all("extraMounts" not in n for n in kind["nodes"])
    assert not (out / "lab" / "certs.d").exists()


# -- the containers, through the real tasks and the fake docker -----------------------------------

def _standalone(env: LabEnv) -> tuple[dict[str, Any], dict[str, Any]]:
    data = json.loads((env.fake_state / "docker.json").read_text())
    return data.get("standalone") or {}, data.get("volumes") or {}


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, envtest_pool: Any) -> Iterator[LabEnv]:
    """One machine (one fake docker) where the shipped lab was brought to `cluster` once."""
    root = tmp_path_factory.mktemp("cache")
    fake_state = root / "fake"
    fake_state.mkdir()
    with envtest_pool.lease() as (server,):
        yield from _machine(root, fake_state, server)


def _machine(root: Path, fake_state: Path, server: Any) -> Iterator[LabEnv]:
    emu = ApiFront(server.client).start()
    try:
        emu.put(ready_node("lab-control-plane"))
        (fake_state / "apiservers.json").write_text(json.dumps({"lab": emu.url}))
        env = LabEnv(root=root, config=write_config(root / "lab.yaml"), fake_state=fake_state,
                     kubeconfig=root / "kubeconfig", fronts={"lab": emu})
        env.run("lab.up", "--to", "cluster")
        yield env
    finally:
        emu.stop()


@pytest.fixture
def in_process(machine: LabEnv, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Tools, Any]:
    """The machine's config, tools and log for calling lab.imagecache in this process."""
    for key, value in machine.env().items():
        monkeypatch.setenv(key, value)
    log = logs.get("test")
    from lab.config import load_config

    return load_config(machine.config), Tools(None, log), log


def test_created_once_then_reused_by_a_second_cluster_and_a_second_lab(
        machine: LabEnv, tmp_path: Path) -> None:
    containers, volumes = _standalone(machine)
    assert sorted(containers) == sorted(c for c, _ in CACHES.values())
    assert sorted(volumes) == sorted(containers)
    for registry, (name, server) in CACHES.items():
        c = containers[name]
        assert c["labels"] == {"io.kind-cilium-lab.image-cache": "true",
                               "io.kind-cilium-lab.upstream": registry}
        assert f"REGISTRY_PROXY_REMOTEURL={server}" in c["env"]
        assert c["volumes"] == [f"{name}:/var/lib/registry"]
        assert c["image"].startswith("registry:3.1.1@sha256:")
        assert "kind" in c["networks"] and c["running"]
    # the files the kind config mounts exist when kind creates the nodes
    assert (machine.state_dir / "work/lab/certs.d/quay.io/hosts.toml").is_file()
    runs = len(machine.calls("docker", "run"))
    assert runs == 3

    # another lab (own dir and state) of two clusters on the same machine
    _second_lab(machine, tmp_path)
    assert len(machine.calls("docker", "run")) == runs  # two more clusters, no new container
    assert sorted(_standalone(machine)[0]) == sorted(containers)
    kind_cfgs = [a[a.index("--config") + 1] for a in machine.calls("kind", "create")]
    assert len(kind_cfgs) == 3
    for path in kind_cfgs:
        mount = yaml.safe_load(Path(path).read_text())["nodes"][0]["extraMounts"][0]
        hosts = Path(mount["hostPath"]) / "quay.io/hosts.toml"
        assert f"http://{CACHES['quay.io'][0]}:5000" in hosts.read_text()


def _second_lab(machine: LabEnv, tmp_path: Path) -> None:
    """A lab of two clusters, two-a and two-b, brought to `cluster` on the same machine. What is
    measured is the machine's cache: their API is the first lab's real server, behind a front
    each (their kubeconfigs differ)."""
    server = machine.fronts["lab"].upstream  # type: ignore[attr-defined]
    emus = [ApiFront(server).start() for _ in range(2)]
    try:
        for name, emu in zip(("two-a", "two-b"), emus, strict=True):
            emu.put(ready_node(f"{name}-control-plane"))
        known = json.loads((machine.fake_state / "apiservers.json").read_text())
        known.update({"two-a": emus[0].url, "two-b": emus[1].url})
        (machine.fake_state / "apiservers.json").write_text(json.dumps(known))
        config = write_config(tmp_path / "lab.yaml", clusters=[
            {"name": "two-a", "lbPool": "172.18.254.0/24",
             "gateway": {"httpHostPort": 31080, "httpsHostPort": 31443}},
            {"name": "two-b", "lbPool": "172.18.253.0/24",
             "gateway": {"httpHostPort": 32080, "httpsHostPort": 32443}}])
        machine.run("lab.up", "--to", "cluster", LAB_CONFIG=str(config))
    finally:
        for emu in emus:
            emu.stop()


def test_two_labs_creating_it_at_once_share_one_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    monkeypatch.setenv("PATH", with_fakes(os.environ["PATH"]))
    monkeypatch.setenv("LAB_FAKE_STATE", str(fake))
    # every `docker run` takes a while: both labs find the cache missing and both create it
    monkeypatch.setenv("LAB_FAKE_SLEEP", "docker:run=0.5")
    monkeypatch.setattr(imagecache, "UPSTREAMS", {"quay.io": "https://quay.io"})
    log = logs.get("test")
    labs = [_cfg(tmp_path / "a"), _cfg(tmp_path / "b")]
    errors: list[BaseException] = []

    def ensure(cfg: Any) -> None:
        try:
            imagecache.ImageCache(cfg, Tools(None, log), log).ensure()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ensure, args=(cfg,)) for cfg in labs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    calls = [json.loads(line)["argv"] for line in (fake / "calls.jsonl").read_text().splitlines()]
    assert len([a for a in calls if a[0] == "run"]) == 2  # both tried; the name decided
    standalone = json.loads((fake / "docker.json").read_text())["standalone"]
    assert list(standalone) == [CACHES["quay.io"][0]]


def test_status_shows_running_size_and_the_lab_images_cached(machine: LabEnv) -> None:
    from lab.tasks.cache import cache_line

    agent = expected_images(mesh=False)[0]  # quay.io/cilium/cilium:v1.18.4@sha256:…
    repo, digest = agent.split("/", 1)[1].split(":")[0], agent.split("@")[1]
    rules = [  # what `du` and `find` print in the volume (distribution registry/storage/paths.go)
        {"container": CACHES["quay.io"][0], "match": "du -sk",
         "stdout": (f"204800\t/var/lib/registry\n./{repo}/_manifests/revisions/sha256/"
                    f"{digest.split(':')[1]}/link\n./jetstack/cert-manager-webhook/_manifests/"
                    "tags/v1.19.0/current/link\n")},
        {"container": CACHES["registry.k8s.io"][0], "match": "du -sk",
         "stdout": "1024\t/var/lib/registry\n./e2e-test-images/agnhost/_manifests/tags/2.53/"
                   "current/link\n"},
    ]
    state = json.loads((machine.fake_state / "docker.json").read_text())
    (machine.fake_state / "docker.json").write_text(json.dumps({**state, "exec": rules}))
    rows = json.loads(machine.run("lab.status", "--json").stdout)
    cache = rows[0]["imageCache"]
    assert cache["imagesNeeded"] == 11 and cache["imagesCached"] == 3
    assert cache["diskKiB"] == 204800 + 1024
    assert all(r["running"] for r in cache["registries"])
    assert agent not in cache["missing"] and len(cache["missing"]) == 8
    assert cache_line(cache) == ("image cache: running for quay.io, registry.k8s.io, docker.io; "
                                 "201 MiB on disk; 3/11 of the lab's images cached")


def test_doctor_checks_the_cache(machine: LabEnv, in_process: tuple[Any, Tools, Any],
                                 tmp_path: Path) -> None:
    from lab.doctor import run_checks

    cfg, tools, log = in_process
    found = {f.name: f for f in run_checks(cfg, tools)}
    assert found["image cache"].verdict == "ok"
    assert found["image cache"].found.startswith("running: ")
    name = CACHES["docker.io"][0]
    tools.run("docker", ["stop", name])
    try:
        verdict, what, fix = imagecache.doctor_check(cfg, tools, log)
        assert verdict == "warn" and name in what and f"docker start {name}" in fix
        # lab.up starts a stopped cache again
        imagecache.before_create(cfg, tools, log)
        assert imagecache.ImageCache(cfg, tools, log).inspect("docker.io").running
    finally:
        tools.run("docker", ["start", name], check=False)
    off = _cfg(tmp_path, imageCache=False)
    assert imagecache.doctor_check(off, tools, log)[0] == "ok"


def test_a_cache_that_cannot_start_never_breaks_the_lab(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    monkeypatch.setenv("PATH", with_fakes(os.environ["PATH"]))
    monkeypatch.setenv("LAB_FAKE_STATE", str(fake))
    monkeypatch.setenv("LAB_FAKE_FAIL", "docker:run")
    log = logs.get("test")
    cfg = _cfg(tmp_path)
    imagecache.before_create(cfg, Tools(None, log), log)  # a warning, not a raise
    assert "imagecache.unavailable" in caplog.text
    # imageCache: false runs no docker command at all
    (fake / "calls.jsonl").unlink()
    off = _cfg(tmp_path, imageCache=False)
    imagecache.before_create(off, Tools(None, log), log)
    imagecache.after_create(off, Tools(None, log), log)
    assert imagecache.start_prefetch(off, Tools(None, log), log, None) is None
    assert not (fake / "calls.jsonl").exists()


def test_dry_run_shows_the_containers_the_node_configuration_and_the_prefetch_list(
        machine: LabEnv) -> None:
    runs = len(machine.calls("docker", "run"))
    out = machine.run("lab.up", "--dry-run").stdout
    for registry, (name, server) in CACHES.items():
        assert ("$ docker volume create --label io.kind-cilium-lab.image-cache=true --label "
                f"io.kind-cilium-lab.upstream={registry} {name}\n") in out
        assert f"$ docker run --detach --name {name} " in out
        assert f"--env REGISTRY_PROXY_REMOTEURL={server} " in out
        assert f"$ docker network connect kind {name}" in out
        assert (f"containerd on every node pulls {registry} from http://{name}:5000, "
                f"else {server}") in out
    assert (f"every node mounts {machine.state_dir}/work/lab/certs.d read-only at "
            "/etc/containerd/certs.d") in out
    for image in expected_images(mesh=False):
        assert f"    prefetch {image}\n" in out
    assert len(machine.calls("docker", "run")) == runs


def test_down_keeps_the_cache_and_purge_removes_it_with_its_volumes(
        machine: LabEnv, in_process: tuple[Any, Tools, Any]) -> None:
    machine.run("lab.down")
    containers, volumes = _standalone(machine)
    assert len(containers) == 3 and len(volumes) == 3
    proc = machine.run("lab.cache", "--purge")
    assert "removed the image cache" in proc.stdout
    assert _standalone(machine) == ({}, {})
    # a container of that name that is not ours is never removed, and refused before kind runs
    cfg, tools, log = in_process
    foreign = CACHES["quay.io"][0]
    tools.run("docker", ["run", "--detach", "--name", foreign, "nginx"])
    assert imagecache.ImageCache(cfg, tools, log).purge() == []
    assert list(_standalone(machine)[0]) == [foreign]
    with pytest.raises(LabError, match="is not the lab's image cache") as err:
        imagecache.before_create(cfg, tools, log)
    assert "imageCache: false" in err.value.hint


# -- prefetch ------------------------------------------------------------------------------------

class _Registry(BaseHTTPRequestHandler):
    """A tiny OCI registry: every repository has an index (amd64 + arm64) of 2-layer images."""

    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        parts = self.path.split("/")
        if "/manifests/" in self.path:
            ref = parts[-1]
            if ref.startswith("sha256:amd64") or ref.startswith("sha256:arm64"):
                arch = ref[7:12]
                body = {"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"digest": f"sha256:{arch}config", "size": 3},
                        "layers": [{"digest": f"sha256:{arch}layer{i}", "size": 3}
                                   for i in (1, 2)]}
            else:
                body = {"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{"digest": f"sha256:{a}", "platform": {
                            "os": "linux", "architecture": a}} for a in ("arm64", "amd64")]}
            data = json.dumps(body).encode()
        else:
            data = b"x" * 70000
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def registry() -> Iterator[ThreadingHTTPServer]:
    _Registry.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prefetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
              ports: dict[str, int] | None = None) -> imagecache.Prefetch:
    fake = tmp_path / "fake"
    fake.mkdir(exist_ok=True)
    standalone = {  # the caches exist already (as `docker run` left them)
        name: {"id": name, "image": "registry:3", "env": [], "volumes": [], "running": True,
               "labels": {"io.kind-cilium-lab.image-cache": "true",
                          "io.kind-cilium-lab.upstream": registry},
               "ports": {"5000": (ports or {}).get(name) or _closed_port()},
               "networks": ["bridge", "kind"]}
        for registry, (name, _) in CACHES.items()}
    (fake / "docker.json").write_text(json.dumps({"standalone": standalone}))
    monkeypatch.setenv("PATH", with_fakes(os.environ["PATH"]))
    monkeypatch.setenv("LAB_FAKE_STATE", str(fake))
    log = logs.get("test")
    job = imagecache.Prefetch(_cfg(tmp_path), Tools(None, log), log).start()
    assert job._thread is not None
    job._thread.join(60)
    return job


def test_prefetch_pulls_every_manifest_and_blob_through_the_caches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        registry: ThreadingHTTPServer) -> None:
    port = registry.server_address[1]
    job = _prefetch(tmp_path, monkeypatch, {c: port for c, _ in CACHES.values()})
    images = expected_images(mesh=False)
    assert job.failed == {}
    assert sorted(job.done) == sorted(images)
    expected = set()
    for ref in images:
        name = ref.split("@")[0].split("/", 1)[1].rsplit(":", 1)[0]
        reference = ref.split("@")[1] if "@" in ref else ref.rsplit(":", 1)[1]
        expected |= {f"/v2/{name}/manifests/{reference}", f"/v2/{name}/manifests/sha256:amd64",
                     f"/v2/{name}/blobs/sha256:amd64config",
                     f"/v2/{name}/blobs/sha256:amd64layer1",
                     f"/v2/{name}/blobs/sha256:amd64layer2"}
    assert set(_Registry.requests) == expected  # the node's platform only, every blob
    assert job.bytes == len(images) * 3 * 70000  # every byte read, so the proxy stores it


def test_a_failed_prefetch_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    job = _prefetch(tmp_path, monkeypatch)  # nobody listens on the published ports
    assert job.done == [] and sorted(job.failed) == sorted(expected_images(mesh=False))


def test_lab_up_warms_the_cache_in_the_background_and_a_failed_prefetch_is_only_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from lab.runner import Lab

    _prefetch(tmp_path, monkeypatch)  # the caches exist; nobody listens on their ports
    caplog.clear()
    jobs: list[imagecache.Prefetch] = []
    start = imagecache.start_prefetch

    def recorded(*args: Any) -> imagecache.Prefetch | None:
        job = start(*args)
        assert job is not None
        jobs.append(job)
        return job

    def clusters_converge(clusters: Any, work: Any) -> None:
        # the prefetch runs while the clusters come up (stands in for kind create and the rest)
        assert jobs and jobs[0]._thread is not None
        jobs[0]._thread.join(60)

    monkeypatch.setattr(imagecache, "start_prefetch", recorded)
    monkeypatch.setattr(Lab, "_parallel", lambda self, clusters, work: clusters_converge(
        clusters, work))
    Lab(_cfg(tmp_path)).up("cni")  # returns normally
    assert sorted(jobs[0].failed) == sorted(expected_images(mesh=False))
    assert caplog.text.count("imagecache.prefetch_failed") == 11
    assert "imagecache.prefetched" in caplog.text
