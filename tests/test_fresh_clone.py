"""A fresh clone runs everything: pinned upstream files fetched and verified, the envtest release
installed and verified, and where neither can be had one line saying what to set (a failure in CI).

Every download here comes from a local HTTP server on 127.0.0.1 serving made-up files; the
expected digests are computed from the bytes the test wrote, never by the code under test.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lab import envtest_assets
from lab.bootstrap import DownloadError, platform_pair
from tests.support import deps, upstream_fetch

REPO = Path(__file__).resolve().parent.parent


class _Quiet(SimpleHTTPRequestHandler):
    served: list[str]

    def log_message(self, *args: object) -> None:
        self.served.append(self.path)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(base URL, the folder it serves, the paths requested)."""
    root = tmp_path / "www"
    root.mkdir()
    served: list[str] = []
    handler = type("Handler", (_Quiet,), {"served": served})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, served
    finally:
        httpd.shutdown()
        httpd.server_close()


def _sha(data: bytes, algo: str = "sha256") -> str:
    return hashlib.new(algo, data).hexdigest()


def _tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once closed


# -- upstream files --------------------------------------------------------------------------------

CRD = b"apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n"
VALUES = b"image:\n  tag: v1\n"


def _publish(root: Path, crd: bytes = CRD, values: bytes = VALUES) -> None:
    """What the made-up upstream serves: a raw file and a chart archive."""
    (root / "raw.example" / "repo").mkdir(parents=True)
    (root / "raw.example" / "repo" / "widgets.yaml").write_bytes(crd)
    (root / "charts.example").mkdir()
    (root / "charts.example" / "widget-1.0.tgz").write_bytes(
        _tgz({"widget/values.yaml": values, "widget/Chart.yaml": b"name: widget\n"}))


def _manifest(tmp_path: Path, root: Path, crd_sha: str | None = None,
              values_sha: str | None = None) -> Path:
    archive = (root / "charts.example" / "widget-1.0.tgz").read_bytes()
    text = (f"# made-up pins\n"
            f"{_sha(archive)}  .archives/widget-1.0.tgz  https://charts.example/widget-1.0.tgz\n"
            f"{values_sha or _sha(VALUES)}  widget-1.0/helm/values.yaml  "
            f".archives/widget-1.0.tgz!widget/values.yaml\n"
            f"{crd_sha or _sha(CRD)}  widget-1.0/crds/widgets.yaml  "
            f"https://raw.example/repo/widgets.yaml\n")
    path = tmp_path / "pins.sha256"
    path.write_text(text)
    return path


def test_upstream_files_are_fetched_verified_and_the_archive_is_not_kept(
        tmp_path: Path, web: tuple[str, Path, list[str]]) -> None:
    base, root, served = web
    _publish(root)
    manifest = _manifest(tmp_path, root)
    dest = tmp_path / "upstream"
    fetched = upstream_fetch.ensure(dest, manifest, mirror=base)
    assert sorted(fetched) == ["widget-1.0/crds/widgets.yaml", "widget-1.0/helm/values.yaml"]
    assert (dest / "widget-1.0/crds/widgets.yaml").read_bytes() == CRD
    assert (dest / "widget-1.0/helm/values.yaml").read_bytes() == VALUES
    assert sorted(p.name for p in dest.iterdir()) == ["widget-1.0"]  # no lock file left
    assert sorted(served) == ["/charts.example/widget-1.0.tgz", "/raw.example/repo/widgets.yaml"]
    assert upstream_fetch.ensure(dest, manifest, mirror=base) == []  # complete: nothing fetched
    assert len(served) == 2


def test_a_file_whose_digest_differs_is_refused_and_nothing_is_left(
        tmp_path: Path, web: tuple[str, Path, list[str]]) -> None:
    base, root, _ = web
    _publish(root, crd=CRD + b"# altered by a proxy\n")
    manifest = _manifest(tmp_path, root)  # pins the original CRD bytes
    dest = tmp_path / "upstream"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        upstream_fetch.ensure(dest, manifest, mirror=base)
    assert not (dest / "widget-1.0/crds/widgets.yaml").exists()
    assert not (dest / upstream_fetch.PARTIAL).exists()


def test_an_archive_member_whose_digest_differs_is_refused(
        tmp_path: Path, web: tuple[str, Path, list[str]]) -> None:
    base, root, _ = web
    _publish(root)
    manifest = _manifest(tmp_path, root, values_sha=_sha(b"other values\n"))
    dest = tmp_path / "upstream"
    with pytest.raises(DownloadError, match=r"values\.yaml"):
        upstream_fetch.ensure(dest, manifest, mirror=base)
    assert not (dest / "widget-1.0/helm/values.yaml").exists()
    assert not (dest / upstream_fetch.PARTIAL).exists()


def test_a_damaged_cache_file_is_replaced_but_a_user_folder_is_never_overwritten(
        tmp_path: Path, web: tuple[str, Path, list[str]]) -> None:
    base, root, _ = web
    _publish(root)
    manifest = _manifest(tmp_path, root)
    dest = tmp_path / "upstream"
    upstream_fetch.ensure(dest, manifest, mirror=base)
    crd = dest / "widget-1.0/crds/widgets.yaml"
    crd.write_bytes(b"edited by hand\n")
    assert upstream_fetch.ensure(dest, manifest, mirror=base, overwrite=False) == []
    assert crd.read_bytes() == b"edited by hand\n"
    assert upstream_fetch.ensure(dest, manifest, mirror=base) == ["widget-1.0/crds/widgets.yaml"]
    assert crd.read_bytes() == CRD


def test_the_session_fetches_into_the_cache_when_no_folder_exists(
        tmp_path: Path, web: tuple[str, Path, list[str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    base, root, _ = web
    _publish(root)
    monkeypatch.setattr(upstream_fetch, "MANIFEST", _manifest(tmp_path, root))
    monkeypatch.setenv(deps.UPSTREAM_ENV, "")  # unset for deps; restored after (it sets it)
    monkeypatch.setenv(deps.SHARED_ENV, str(tmp_path / "no-shared"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(upstream_fetch.MIRROR_ENV, base)
    deps.prepare_upstream()
    cache = tmp_path / "cache" / "kind-cilium-lab" / "upstream"
    assert os.environ[deps.UPSTREAM_ENV] == str(cache)
    assert deps.require_upstream() == cache.resolve()
    assert (cache / "widget-1.0/crds/widgets.yaml").read_bytes() == CRD


def test_the_pinned_list_matches_the_upstream_files_byte_for_byte() -> None:
    folder = deps.require_upstream()
    pins = {e.path: e.sha256 for e in upstream_fetch.entries() if not e.is_archive}
    sums = folder / "SHA256SUMS"  # the upstream folder's own list, where it has one
    if sums.exists():
        theirs = dict(reversed(line.split()) for line in sums.read_text().splitlines())
        assert pins == {p: d for p, d in theirs.items() if not p.endswith("LICENSE")}
    for path, digest in pins.items():
        assert _sha((folder / path).read_bytes()) == digest, path
    sources = {e.path: e.source for e in upstream_fetch.entries()}
    assert sources["cilium-1.18.4/crds/ciliumpodippools.yaml"] == (
        "https://raw.githubusercontent.com/cilium/cilium/afda2aa99d26f190de8944580ceadb64d9d14d38/"
        "pkg/k8s/apis/cilium.io/client/crds/v2alpha1/ciliumpodippools.yaml")
    assert sources["cilium-1.18.4/helm/values.yaml"] == \
        ".archives/cilium-1.18.4.tgz!cilium/values.yaml"
    assert sources[".archives/cilium-1.18.4.tgz"] == "https://helm.cilium.io/cilium-1.18.4.tgz"
    assert sources["cert-manager-1.19.0/helm/values.schema.json"] == (
        "https://raw.githubusercontent.com/cert-manager/cert-manager/"
        "12a3ef97916bf5c1bea55740caab49e93e2b6d54/deploy/charts/cert-manager/values.schema.json")


# -- offline: one line, or a failure in CI ---------------------------------------------------------

PROBE = """
from tests.support.upstream import require_upstream

def test_schema_a():
    require_upstream()

def test_schema_b():
    require_upstream()

def test_needs_nothing():
    pass
"""


def _run_offline(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    empty = tmp_path / "empty-upstream"
    empty.mkdir(exist_ok=True)
    probe = tmp_path / "probe" / "test_probe.py"
    probe.parent.mkdir(exist_ok=True)
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update({deps.UPSTREAM_ENV: str(empty), "PYTHONPATH": str(REPO),
                upstream_fetch.MIRROR_ENV: f"http://127.0.0.1:{_closed_port()}", **extra})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO), str(probe)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_offline_with_no_upstream_files_says_in_one_line_what_to_set(tmp_path: Path) -> None:
    proc = _run_offline(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    summary = [ln for ln in lines if "missing test dependencies" in ln]
    assert summary == [summary[0]] and summary[0].startswith(
        "2 test(s) skipped for missing test dependencies")
    assert "set LAB_UPSTREAM_DIR" in summary[0] and "Connection refused" in summary[0]
    folded = [ln for ln in lines if ln.startswith("SKIPPED")]
    assert len(folded) == 1 and folded[0].startswith("SKIPPED [2] ")  # one shared reason
    assert "1 passed, 2 skipped" in lines[-1]
    assert list((tmp_path / "empty-upstream").iterdir()) == []  # nothing fetched, no lock left


def test_in_ci_a_missing_dependency_fails_instead_of_skipping(tmp_path: Path) -> None:
    proc = _run_offline(tmp_path, CI="true")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "2 failed, 1 passed" in lines[-1]
    assert any(ln.startswith("2 test(s) failed (CI is set) for missing test dependencies")
               for ln in lines)
    assert sum("FAILED" in ln and "set LAB_UPSTREAM_DIR" in ln for ln in lines) == 2


def test_require_envtest_and_oracle_name_what_to_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(deps.SHARED_ENV, str(tmp_path / "no-shared"))
    monkeypatch.setenv(envtest_assets.ROOT_ENV, str(tmp_path / "store"))
    monkeypatch.delenv(deps.ENVTEST_ENV, raising=False)
    monkeypatch.delenv(deps.ORACLE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(deps.Missing, match=r"invoke lab.tools --envtest"):
        deps.require_envtest()
    with pytest.raises(deps.Missing, match=r"run `nox -s oracle` once .* or set LAB_POLICY_ORACLE"):
        deps.require_oracle()
    # What `nox -s oracle` built is found without LAB_POLICY_ORACLE.
    built = tmp_path / "cache" / "kind-cilium-lab" / "oracle" / "cilium-policy-oracle"
    built.parent.mkdir(parents=True)
    built.write_text("#!/bin/sh\n")
    built.chmod(0o755)
    assert deps.require_oracle() == built.resolve()
    # What `lab.tools --envtest` installs is found without KUBEBUILDER_ASSETS.
    installed = tmp_path / "store" / "k8s" / f"{envtest_assets.ENVTEST_VERSION}-" \
        f"{'-'.join(platform_pair())}"
    installed.mkdir(parents=True)
    for name in ("kube-apiserver", "etcd"):
        (installed / name).write_text("#!/bin/sh\n")
        (installed / name).chmod(0o755)
    assert deps.require_envtest() == installed.resolve()
    monkeypatch.setenv(deps.ENVTEST_ENV, str(tmp_path))
    with pytest.raises(deps.Missing, match=f"KUBEBUILDER_ASSETS={tmp_path} holds no"):
        deps.require_envtest()


# -- envtest release -------------------------------------------------------------------------------

BINARIES = {name: f"#!/bin/sh\necho {name}\n".encode() for name in ("etcd", "kube-apiserver",
                                                                    "kubectl")}


def _publish_envtest(root: Path, base: str, platform: tuple[str, str],
                     digest: str | None = None) -> tuple[str, bytes]:
    os_name, arch = platform
    name = f"envtest-v1.33.0-{os_name}-{arch}.tar.gz"
    tarball = _tgz({f"controller-tools/envtest/{b}": data for b, data in BINARIES.items()})
    (root / name).write_bytes(tarball)
    index = {"releases": {"v1.33.0": {name: {"hash": digest or _sha(tarball, "sha512"),
                                             "selfLink": f"{base}/{name}"}},
                          "v1.32.0": {}}}
    (root / "envtest-releases.yaml").write_text(json.dumps(index))  # JSON is YAML
    return f"{base}/envtest-releases.yaml", tarball


def test_envtest_release_is_verified_and_installed_in_setup_envtest_layout(
        tmp_path: Path, web: tuple[str, Path, list[str]]) -> None:
    base, root, served = web
    index, _ = _publish_envtest(root, base, ("linux", "amd64"))
    store = tmp_path / "store"
    out = io.StringIO()
    got = envtest_assets.ensure_envtest("1.33.0", store, index, ("linux", "amd64"), out)
    assert got == store / "k8s" / "1.33.0-linux-amd64"
    for name, data in BINARIES.items():
        assert (got / name).read_bytes() == data and os.access(got / name, os.X_OK)
    assert sorted(p.name for p in (store / "k8s").iterdir()) == ["1.33.0-linux-amd64"]
    assert "verified (sha512" in out.getvalue()
    requests = len(served)
    envtest_assets.ensure_envtest("1.33.0", store, index, ("linux", "amd64"), out)
    assert len(served) == requests  # installed: not fetched again


def test_envtest_with_a_wrong_digest_is_refused_and_nothing_is_left(
        tmp_path: Path, web: tuple[str, Path, list[str]]) -> None:
    base, root, _ = web
    index, _ = _publish_envtest(root, base, ("linux", "amd64"), digest="0" * 128)
    store = tmp_path / "store"
    with pytest.raises(DownloadError, match="checksum mismatch") as err:
        envtest_assets.ensure_envtest("1.33.0", store, index, ("linux", "amd64"), io.StringIO())
    assert "0" * 128 in err.value.message
    assert list((store / "k8s").iterdir()) == []


def test_envtest_for_a_platform_the_index_lacks_is_reported(
        tmp_path: Path, web: tuple[str, Path, list[str]]) -> None:
    base, root, served = web
    index, _ = _publish_envtest(root, base, ("linux", "amd64"))
    with pytest.raises(DownloadError) as err:
        envtest_assets.ensure_envtest("1.33.0", tmp_path / "store", index, ("darwin", "arm64"),
                                      io.StringIO())
    assert "no build for darwin/arm64" in err.value.message
    assert "linux-amd64" in err.value.message
    with pytest.raises(DownloadError, match=r"no release v1.99.0 \(it has: v1.32.0, v1.33.0\)"):
        envtest_assets.ensure_envtest("1.99.0", tmp_path / "store", index, ("linux", "amd64"),
                                      io.StringIO())
    assert served == ["/envtest-releases.yaml"] * 2  # no tarball was fetched


def test_lab_tools_envtest_prints_kubebuilder_assets(
        tmp_path: Path, web: tuple[str, Path, list[str]]) -> None:
    base, root, _ = web
    index, _ = _publish_envtest(root, base, platform_pair())
    env = {**os.environ, "PYTHONPATH": str(REPO), envtest_assets.INDEX_ENV: index,
           envtest_assets.ROOT_ENV: str(tmp_path / "store"), "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO),
                           "lab.tools", "--envtest"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "store" / "k8s" / f"1.33.0-{'-'.join(platform_pair())}"
    assert proc.stdout.splitlines()[-1] == f"KUBEBUILDER_ASSETS={folder}"
    assert (folder / "kube-apiserver").read_bytes() == BINARIES["kube-apiserver"]
