"""Pinned tool bootstrap against a local HTTP server serving made-up releases and checksums."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lab import bootstrap
from lab.bootstrap import (
    DownloadError,
    ensure_tools,
    parse_checksum,
    platform_pair,
    release,
)
from lab.config import LabConfig, parse_config
from lab.errors import LabError
from lab.logs import get as get_logger
from lab.tools import Tools

KIND_V, HELM_V, CILIUM_V = "v0.29.0", "v3.19.0", "v0.18.9"
OS, ARCH = "linux", "amd64"
NODE_IMAGE = ("kindest/node:v1.33.1@sha256:"
              "050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f")


# -- made-up releases ----------------------------------------------------------------------------

def script(output: str, marker: Path | None = None) -> bytes:
    """A tiny "binary": prints its version; touches ``marker`` when run (to prove it never was)."""
    touch = f": > '{marker}'\n" if marker else ""
    return f"#!/bin/sh\n{touch}echo '{output}'\n".encode()


def tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256sum_line(data: bytes, name: str) -> bytes:
    return f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode()


@dataclass
class Server:
    base: str
    files: dict[str, bytes]
    truncate: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def publish(self, path: str, data: bytes, checksum: bytes | None = None) -> None:
        self.files[path] = data
        name = path.rsplit("/", 1)[-1]
        self.files[path + ".sha256sum"] = checksum if checksum is not None else \
            sha256sum_line(data, name)

    def bases(self) -> dict[str, str]:
        return {t: f"{self.base}/{t}" for t in ("kind", "helm", "cilium")}


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(base="", files={})

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            state.requests.append((self.path, rng))
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            start = 0
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path in state.truncate:
                body = body[: len(body) // 2]
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def publish_all(srv: Server, marker: Path | None = None) -> dict[str, bytes]:
    kind = script(f"kind {KIND_V} go1.24.2 {OS}/{ARCH}", marker)
    helm = tarball({f"{OS}-{ARCH}/helm": script(f"{HELM_V}+g3d8990f"),
                    f"{OS}-{ARCH}/LICENSE": b"Apache-2.0\n"})
    cilium = tarball({"cilium": script(f"cilium-cli: {CILIUM_V} compiled with go1.25.4 on "
                                       f"{OS}/{ARCH}")})
    srv.publish(f"/kind/{KIND_V}/kind-{OS}-{ARCH}", kind)
    srv.publish(f"/helm/helm-{HELM_V}-{OS}-{ARCH}.tar.gz", helm)
    srv.publish(f"/cilium/{CILIUM_V}/cilium-{OS}-{ARCH}.tar.gz", cilium)
    return {"kind": kind, "helm": helm, "cilium": cilium}


# -- the lab side ----------------------------------------------------------------------------------

@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LabConfig:
    empty = tmp_path / "path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no real kind/helm/cilium leaks in
    monkeypatch.setenv("LAB_TOOLS_DIR", str(tmp_path / "tools"))  # never the user's cache
    for tool in ("KIND", "HELM", "CILIUM"):
        monkeypatch.delenv(f"LAB_DOWNLOAD_BASE_{tool}", raising=False)
    raw = {
        "apiVersion": "kind-cilium-lab/v1",
        "versions": {"kind": KIND_V, "nodeImage": NODE_IMAGE, "helm": HELM_V,
                     "cilium": "1.18.4", "ciliumCLI": CILIUM_V, "gatewayAPI": "v1.4.0",
                     "certManager": "v1.19.0"},
        "stateDir": str(tmp_path / "state"),
        "clusters": [{"name": "lab"}],
    }
    return parse_config(raw, tmp_path / "lab.yaml")


def lab_tools(cfg: LabConfig) -> Tools:
    return bootstrap.lab_tools(cfg, get_logger("test"))


def leftovers(bin_dir: Path) -> list[str]:
    if not bin_dir.is_dir():
        return []
    return sorted(p.name for p in bin_dir.iterdir()
                  if p.name.endswith((".part", ".tmp", ".lock")))


# -- tests -----------------------------------------------------------------------------------------

def test_good_checksums_install_every_tool(cfg: LabConfig, server: Server) -> None:
    publish_all(server)
    tools = lab_tools(cfg)
    out = io.StringIO()
    installed = ensure_tools(cfg, tools, allow_download=True, base_urls=server.bases(), out=out,
                             platform_=(OS, ARCH))
    assert installed == [f"kind {KIND_V}", f"helm {HELM_V}", f"cilium {CILIUM_V}"]
    bin_dir = bootstrap.tools_dir()
    for name in ("kind", "helm", "cilium"):
        path = bin_dir / name
        assert path.stat().st_mode & stat.S_IXUSR
        assert tools.which(name) == str(path)
    assert tools.version("kind") == KIND_V
    assert tools.version("helm") == HELM_V
    assert tools.version("cilium") == CILIUM_V
    assert leftovers(bin_dir) == []
    assert not (bin_dir / "LICENSE").exists()  # only the binary leaves the tarball
    text = out.getvalue()
    assert "100%" in text and "verified (sha256" in text  # plain progress lines off a TTY
    # Re-running finds everything at the pinned version: no download at all.
    before = len(server.requests)
    assert ensure_tools(cfg, lab_tools(cfg), allow_download=True, base_urls=server.bases(),
                        out=io.StringIO(), platform_=(OS, ARCH)) == []
    assert len(server.requests) == before


def test_wrong_checksum_is_refused_and_the_file_removed(cfg: LabConfig, server: Server,
                                                        tmp_path: Path) -> None:
    marker = tmp_path / "kind-was-run"
    files = publish_all(server, marker=marker)
    bogus = "0" * 64
    server.files[f"/kind/{KIND_V}/kind-{OS}-{ARCH}.sha256sum"] = \
        f"{bogus}  kind-{OS}-{ARCH}\n".encode()
    with pytest.raises(DownloadError) as err:
        ensure_tools(cfg, lab_tools(cfg), allow_download=True, base_urls=server.bases(),
                     out=io.StringIO(), platform_=(OS, ARCH), names=("kind",))
    msg = str(err.value)
    assert "checksum mismatch" in msg
    assert bogus in msg and hashlib.sha256(files["kind"]).hexdigest() in msg
    assert "nothing was installed" in err.value.hint
    bin_dir = bootstrap.tools_dir()
    assert not (bin_dir / "kind").exists()
    assert leftovers(bin_dir) == []
    assert not marker.exists()  # the unverified binary never ran


def test_truncated_download_is_cleaned_up(cfg: LabConfig, server: Server) -> None:
    publish_all(server)
    path = f"/helm/helm-{HELM_V}-{OS}-{ARCH}.tar.gz"
    server.truncate.add(path)
    with pytest.raises(DownloadError, match="truncated") as err:
        ensure_tools(cfg, lab_tools(cfg), allow_download=True, base_urls=server.bases(),
                     out=io.StringIO(), platform_=(OS, ARCH), names=("helm",))
    assert "run the task again" in err.value.hint
    bin_dir = bootstrap.tools_dir()
    assert not (bin_dir / "helm").exists()
    assert leftovers(bin_dir) == []
    # Re-running (the server healthy again) completes the job.
    server.truncate.clear()
    assert ensure_tools(cfg, lab_tools(cfg), allow_download=True, base_urls=server.bases(),
                        out=io.StringIO(), platform_=(OS, ARCH),
                        names=("helm",)) == [f"helm {HELM_V}"]


def test_interrupted_download_resumes_with_a_range_request(cfg: LabConfig,
                                                           server: Server) -> None:
    files = publish_all(server)
    data = files["kind"]
    digest = hashlib.sha256(data).hexdigest()
    bin_dir = bootstrap.tools_dir()
    bin_dir.mkdir(parents=True)
    half = len(data) // 2
    (bin_dir / f".kind-{OS}-{ARCH}.{digest[:12]}.part").write_bytes(data[:half])
    assert ensure_tools(cfg, lab_tools(cfg), allow_download=True, base_urls=server.bases(),
                        out=io.StringIO(), platform_=(OS, ARCH),
                        names=("kind",)) == [f"kind {KIND_V}"]
    assert (f"/kind/{KIND_V}/kind-{OS}-{ARCH}", f"bytes={half}-") in server.requests
    assert (bin_dir / "kind").read_bytes() == data
    assert leftovers(bin_dir) == []


def test_wrong_platform_is_reported() -> None:
    with pytest.raises(LabError, match="Windows/AMD64") as err:
        platform_pair("Windows", "AMD64")
    assert "linux or darwin on amd64 or arm64" in err.value.message
    assert "--no-download" in err.value.hint
    with pytest.raises(LabError, match="Linux/riscv64"):
        platform_pair("Linux", "riscv64")
    assert platform_pair("Linux", "x86_64") == ("linux", "amd64")
    assert platform_pair("Linux", "aarch64") == ("linux", "arm64")
    assert platform_pair("Darwin", "arm64") == ("darwin", "arm64")
    assert platform_pair("Darwin", "x86_64") == ("darwin", "amd64")


def test_unsupported_machine_stops_before_any_download(cfg: LabConfig, server: Server,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    publish_all(server)
    monkeypatch.setattr(bootstrap.platform, "system", lambda: "SunOS")
    monkeypatch.setattr(bootstrap.platform, "machine", lambda: "sparc64")
    with pytest.raises(LabError, match="SunOS/sparc64"):
        ensure_tools(cfg, lab_tools(cfg), allow_download=True, base_urls=server.bases(),
                     out=io.StringIO())
    assert server.requests == []


def test_release_missing_for_the_platform_names_the_url(cfg: LabConfig,
                                                        server: Server) -> None:
    publish_all(server)  # linux/amd64 only
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        ensure_tools(cfg, lab_tools(cfg), allow_download=True, base_urls=server.bases(),
                     out=io.StringIO(), platform_=("darwin", "arm64"), names=("kind",))
    assert f"/kind/{KIND_V}/kind-darwin-arm64.sha256sum" in err.value.message
    assert "versions.kind" in err.value.hint
    assert leftovers(bootstrap.tools_dir()) == []


def test_wrong_version_on_path_is_replaced(cfg: LabConfig, server: Server,
                                           tmp_path: Path) -> None:
    publish_all(server)
    old = tmp_path / "path" / "kind"
    old.write_bytes(script("kind v0.20.0 go1.20 linux/amd64"))
    old.chmod(0o755)
    tools = lab_tools(cfg)
    assert tools.version("kind") == "v0.20.0"
    out = io.StringIO()
    ensure_tools(cfg, tools, allow_download=True, base_urls=server.bases(), out=out,
                 platform_=(OS, ARCH), names=("kind",))
    assert "v0.20.0" in out.getvalue()
    assert tools.which("kind") == str(bootstrap.tools_dir() / "kind")
    assert tools.version("kind") == KIND_V


def test_no_download_reports_what_to_install(cfg: LabConfig, server: Server) -> None:
    out = io.StringIO()
    with pytest.raises(LabError) as err:
        ensure_tools(cfg, lab_tools(cfg), allow_download=False, out=out)
    assert "kind: not installed" in err.value.message
    assert "helm: not installed" in err.value.message
    assert f"install kind {KIND_V}" in err.value.hint
    assert f"install helm {HELM_V}" in err.value.hint
    assert "Cilium CLI" in out.getvalue() and "optional" in out.getvalue()
    assert server.requests == []
    # Only the optional Cilium CLI missing: reported, not fatal.
    assert ensure_tools(cfg, lab_tools(cfg), allow_download=False, out=io.StringIO(),
                        names=("cilium",)) == []


def test_base_url_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAB_DOWNLOAD_BASE_HELM", "https://mirror.example/helm/")
    assert bootstrap.base_url("helm") == "https://mirror.example/helm"
    assert bootstrap.base_url("helm", {"helm": "http://x"}) == "http://x"
    monkeypatch.delenv("LAB_DOWNLOAD_BASE_HELM")
    assert bootstrap.base_url("helm") == "https://get.helm.sh"


def test_official_release_locations() -> None:
    kind = release("kind", KIND_V, "linux", "amd64")
    assert kind.url == ("https://github.com/kubernetes-sigs/kind/releases/download/"
                        "v0.29.0/kind-linux-amd64")
    assert kind.checksum_url == kind.url + ".sha256sum" and kind.member is None
    helm = release("helm", HELM_V, "darwin", "arm64")
    assert helm.url == "https://get.helm.sh/helm-v3.19.0-darwin-arm64.tar.gz"
    assert helm.checksum_url == helm.url + ".sha256sum" and helm.member == "darwin-arm64/helm"
    cilium = release("cilium", CILIUM_V, "linux", "arm64")
    assert cilium.url == ("https://github.com/cilium/cilium-cli/releases/download/"
                          "v0.18.9/cilium-linux-arm64.tar.gz")
    assert cilium.checksum_url == cilium.url + ".sha256sum" and cilium.member == "cilium"


def test_parse_checksum_formats() -> None:
    h = "ab" * 32
    assert parse_checksum(f"{h}  kind-linux-amd64\n", "kind-linux-amd64") == h
    assert parse_checksum(f"{h.upper()} *cilium-linux-amd64.tar.gz\n",
                          "cilium-linux-amd64.tar.gz") == h
    assert parse_checksum(f"{'cd' * 32}  other\n{h}  ./dist/helm.tgz\n", "helm.tgz") == h
    assert parse_checksum(f"{h}\n", "anything") == h  # helm's bare .sha256 form
    with pytest.raises(DownloadError, match="no SHA-256 for kind-linux-amd64"):
        parse_checksum(f"{h}  kind-darwin-arm64\n", "kind-linux-amd64")
    with pytest.raises(DownloadError):
        parse_checksum("<html>not found</html>", "kind-linux-amd64")


def test_no_download_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAB_NO_DOWNLOAD", "1")
    assert bootstrap.downloads_forbidden_by_env()
    monkeypatch.setenv("LAB_NO_DOWNLOAD", "0")
    assert not bootstrap.downloads_forbidden_by_env()
    for forbidding in ("true", "YES", " on "):
        monkeypatch.setenv("LAB_NO_DOWNLOAD", forbidding)
        assert bootstrap.downloads_forbidden_by_env(), forbidding
    for allowing in ("", "no", "false", "off"):
        monkeypatch.setenv("LAB_NO_DOWNLOAD", allowing)
        assert not bootstrap.downloads_forbidden_by_env(), allowing
    monkeypatch.delenv("LAB_NO_DOWNLOAD")
    assert not bootstrap.downloads_forbidden_by_env()


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tty_shows_a_rich_progress_bar(cfg: LabConfig, server: Server) -> None:
    size = len(publish_all(server)["kind"])
    out = FakeTTY()
    ensure_tools(cfg, lab_tools(cfg), allow_download=True, base_urls=server.bases(), out=out,
                 platform_=(OS, ARCH), names=("kind",))
    text = out.getvalue()
    assert "kind v0.29.0 (linux/amd64)" in text and "verified" in text
    # rich's bar (BarColumn) and byte counter (DownloadColumn), complete at the end
    assert "━" in text and f"{size}/{size} bytes" in text
    assert "% (" not in text  # no plain percentage lines on a TTY


def test_tools_task_installs_and_reports(cfg: LabConfig, server: Server, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from invoke.context import Context
    from invoke.exceptions import Exit

    from lab.tasks.tools import tools as tools_task

    os_name, arch = platform_pair()
    kind = script(f"kind {KIND_V} go1.24.2 {os_name}/{arch}")
    helm = tarball({f"{os_name}-{arch}/helm": script(f"{HELM_V}+g3d8990f")})
    server.publish(f"/kind/{KIND_V}/kind-{os_name}-{arch}", kind)
    server.publish(f"/helm/helm-{HELM_V}-{os_name}-{arch}.tar.gz", helm)  # no Cilium CLI
    for tool, base in server.bases().items():
        monkeypatch.setenv(f"LAB_DOWNLOAD_BASE_{tool.upper()}", base)
    cfg_file = tmp_path / "lab.yaml"
    cfg_file.write_text(
        "apiVersion: kind-cilium-lab/v1\n"
        f"versions: {{kind: {KIND_V}, nodeImage: '{NODE_IMAGE}', helm: {HELM_V}, "
        f"cilium: 1.18.4, ciliumCLI: {CILIUM_V}, gatewayAPI: v1.4.0, certManager: v1.19.0}}\n"
        f"stateDir: {tmp_path / 'state'}\n"
        "clusters: [{name: lab}]\n")
    # The Cilium CLI release is missing upstream: the task fails, naming it.
    with pytest.raises(Exit) as exc:
        tools_task(Context(), config=str(cfg_file), log_format="json")
    failed = [json.loads(line) for line in capsys.readouterr().err.splitlines()
              if line.startswith("{") and '"event": "failed"' in line]  # said once, as JSON
    assert exc.value.code == 1 and len(failed) == 1 and "cilium" in failed[0]["error"]
    # kind and helm were installed before that; with downloads off the optional CLI is reported.
    capsys.readouterr()
    tools_task(Context(), config=str(cfg_file), no_download=True, log_format="json")
    printed = capsys.readouterr().out
    assert str(tmp_path / "tools" / "kind") in printed
    assert "missing (optional)" in printed
    assert "export PATH=" in printed


def test_download_switch_in_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`downloadTools: false` forbids downloads like `--no-download` and LAB_NO_DOWNLOAD."""
    import yaml

    from lab.bootstrap import downloads_allowed
    from lab.config import load_config

    root = Path(__file__).resolve().parent.parent
    raw = yaml.safe_load((root / "config" / "lab.yaml").read_text())
    raw["stateDir"] = str(tmp_path / ".lab")
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.delenv("LAB_NO_DOWNLOAD", raising=False)
    assert downloads_allowed(load_config(path), no_download=False)
    assert not downloads_allowed(load_config(path), no_download=True)
    monkeypatch.setenv("LAB_NO_DOWNLOAD", "1")
    assert not downloads_allowed(load_config(path), no_download=False)
    monkeypatch.delenv("LAB_NO_DOWNLOAD")
    raw["downloadTools"] = False
    path.write_text(yaml.safe_dump(raw))
    assert not downloads_allowed(load_config(path), no_download=False)


def test_tools_dir_is_the_users_not_the_labs(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAB_TOOLS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert bootstrap.tools_dir() == tmp_path / "cache" / "kind-cilium-lab" / "bin"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bootstrap.tools_dir() == tmp_path / "home" / ".cache" / "kind-cilium-lab" / "bin"
    monkeypatch.setenv("LAB_TOOLS_DIR", str(tmp_path / "mine"))
    assert bootstrap.tools_dir() == tmp_path / "mine"


def test_two_labs_share_one_download(cfg: LabConfig, server: Server, tmp_path: Path) -> None:
    """`lab.tools` without --config and `lab.doctor --config config/mesh.yaml` (another state
    directory) must find the same binaries: the second lab downloads nothing."""
    publish_all(server)
    ensure_tools(cfg, lab_tools(cfg), allow_download=True, base_urls=server.bases(),
                 out=io.StringIO(), platform_=(OS, ARCH))
    fetched = len(server.requests)
    raw = {"apiVersion": "kind-cilium-lab/v1", "versions": {
        "kind": KIND_V, "nodeImage": NODE_IMAGE, "helm": HELM_V, "cilium": "1.18.4",
        "ciliumCLI": CILIUM_V, "gatewayAPI": "v1.4.0", "certManager": "v1.19.0"},
        "stateDir": str(tmp_path / "other-state"),
        "clusters": [{"name": "east"}, {"name": "west"}]}
    other = parse_config(raw, tmp_path / "mesh.yaml")
    tools = lab_tools(other)
    assert ensure_tools(other, tools, allow_download=True, base_urls=server.bases(),
                        out=io.StringIO(), platform_=(OS, ARCH)) == []
    assert len(server.requests) == fetched
    assert tools.which("kind") == str(tmp_path / "tools" / "kind")
