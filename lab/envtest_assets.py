"""The envtest binaries (kube-apiserver, etcd, kubectl) the test suite's real-API tier runs.

The official build is what controller-tools publishes: an index, ``envtest-releases.yaml``
(``releases: {v<ver>: {envtest-v<ver>-<os>-<arch>.tar.gz: {hash: <sha512 hex>, selfLink: URL}}}``,
written by controller-tools ``hack/envtest/update-releases.sh`` from ``sha512sum`` of each
tarball), and tarballs holding ``controller-tools/envtest/{etcd,kube-apiserver,kubectl}``
(``hack/envtest/linux/Dockerfile``). The tarball is verified against the index's SHA-512 before
anything is extracted; the three binaries land in ``<root>/k8s/<ver>-<os>-<arch>/`` — the layout
controller-runtime's ``setup-envtest`` uses, in its default store (``pkg/envtest/binaries.go``
``SetupEnvtestDefaultBinaryAssetsDirectory``), so either tool finds what the other installed —
by one rename of a finished folder. Nothing is left behind on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
from pathlib import Path
from typing import Any, TextIO

import yaml

from lab import yamlio
from lab.bootstrap import (
    CHUNK,
    DownloadError,
    _open,
    _Progress,
    host_platform,
    platform_pair,
)

#: The Kubernetes minor the lab pins (kindest/node v1.33.1); the index's only 1.33 release.
ENVTEST_VERSION = "1.33.0"
#: The index as of controller-tools v0.18.0 (the release for Kubernetes 1.33); pinned, not HEAD.
INDEX_URL = ("https://raw.githubusercontent.com/kubernetes-sigs/controller-tools/v0.18.0/"
             "envtest-releases.yaml")
INDEX_ENV = "LAB_ENVTEST_INDEX_URL"
ROOT_ENV = "LAB_ENVTEST_DIR"
BINARIES = ("etcd", "kube-apiserver", "kubectl")
MEMBER_DIR = "controller-tools/envtest/"
SHA512_RE = re.compile(r"^[0-9a-f]{128}$")


def default_root() -> Path:
    """``$LAB_ENVTEST_DIR``, else setup-envtest's store (its ``k8s/`` is below this)."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "io.kubebuilder.envtest"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "kubebuilder-envtest"


def assets_dir(version: str = ENVTEST_VERSION, root: Path | None = None,
               platform_: tuple[str, str] | None = None) -> Path:
    """Where the binaries of ``version`` for this platform live (``KUBEBUILDER_ASSETS``)."""
    os_name, arch = platform_ or host_platform()
    return (root or default_root()) / "k8s" / f"{version}-{os_name}-{arch}"


def is_installed(folder: Path) -> bool:
    return all((folder / b).is_file() and os.access(folder / b, os.X_OK) for b in BINARIES)


def ensure_envtest(version: str = ENVTEST_VERSION, root: Path | None = None,
                   index_url: str | None = None, platform_: tuple[str, str] | None = None,
                   out: TextIO | None = None) -> Path:
    """The folder holding the verified binaries, downloading them when absent.

    Raises `DownloadError` (nothing installed) when the index has no such version or platform,
    the download fails, or its SHA-512 differs from the index's.
    """
    out = out or sys.stderr
    os_name, arch = platform_ or platform_pair()
    target = assets_dir(version, root, (os_name, arch))
    if is_installed(target):
        return target
    url = index_url or os.environ.get(INDEX_ENV) or INDEX_URL
    archive, link, digest = _lookup(_fetch_index(url), url, version, os_name, arch)
    target.parent.mkdir(parents=True, exist_ok=True)
    out.write(f"↓ envtest v{version} ({os_name}/{arch}): fetching {link}\n")
    part = target.parent / f".{archive}.{digest[:12]}.part"
    try:
        _download_sha512(link, part, digest, out, f"envtest v{version}")
        _install(part, target)
    finally:
        part.unlink(missing_ok=True)
    out.write(f"✓ envtest v{version} verified (sha512 {digest[:16]}…) → {target}\n")
    return target


def _fetch_index(url: str) -> dict[str, Any]:
    try:
        with _open(url) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        raise _unreachable(url, exc, "the envtest index") from exc
    try:
        data = yamlio.load(text)
    except yaml.YAMLError as exc:
        raise DownloadError(f"{url} is not YAML ({exc})", f"point {INDEX_ENV} at "
                            "controller-tools' envtest-releases.yaml") from exc
    if not isinstance(data, dict) or not isinstance(data.get("releases"), dict):
        raise DownloadError(f"{url} has no `releases` map",
                            f"point {INDEX_ENV} at controller-tools' envtest-releases.yaml")
    return data


def _lookup(index: dict[str, Any], url: str, version: str, os_name: str,
            arch: str) -> tuple[str, str, str]:
    releases = index["releases"]
    archives = releases.get(f"v{version}")
    if not isinstance(archives, dict):
        raise DownloadError(
            f"the envtest index {url} has no release v{version} "
            f"(it has: {', '.join(sorted(map(str, releases))) or 'none'})",
            "use a version the index lists, or set KUBEBUILDER_ASSETS to binaries you have")
    name = f"envtest-v{version}-{os_name}-{arch}.tar.gz"
    entry = archives.get(name)
    if not isinstance(entry, dict):
        have = sorted(str(n).removeprefix(f"envtest-v{version}-").removesuffix(".tar.gz")
                      for n in archives)
        raise DownloadError(
            f"envtest v{version} has no build for {os_name}/{arch} in {url} "
            f"(it has: {', '.join(have) or 'none'})",
            "set KUBEBUILDER_ASSETS to a folder with kube-apiserver and etcd for this platform")
    digest, link = str(entry.get("hash", "")).lower(), str(entry.get("selfLink", ""))
    if not SHA512_RE.match(digest) or not link.startswith(("https://", "http://")):
        raise DownloadError(f"the index entry for {name} has no SHA-512 hash or selfLink",
                            f"point {INDEX_ENV} at controller-tools' envtest-releases.yaml")
    return name, link, digest


def _download_sha512(url: str, part: Path, expected: str, out: TextIO, label: str) -> None:
    """Stream ``url`` into ``part``, then refuse it (deleted) unless its SHA-512 matches."""
    digest = hashlib.sha512()
    try:
        resp = _open(url)
    except (urllib.error.URLError, OSError) as exc:
        raise _unreachable(url, exc, label) from exc
    length = resp.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    progress = _Progress(out, label, total)
    done = 0
    try:
        with resp, open(part, "wb") as fh:
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                progress.update(done)
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"downloading {url} failed after {done} bytes: {exc}",
                            "nothing was installed; run the task again") from exc
    finally:
        progress.close()
    if total is not None and done != total:
        raise DownloadError(f"the download of {url} was truncated: {done} of {total} bytes",
                            "nothing was installed; run the task again")
    actual = digest.hexdigest()
    if actual != expected:
        raise DownloadError(
            f"checksum mismatch for {url}: the index publishes sha512 {expected}, got {actual}",
            "the file was deleted and nothing was installed; if it persists the download is "
            "being altered (proxy, mirror)")


def _unreachable(url: str, exc: BaseException, what: str) -> DownloadError:
    why = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else \
        getattr(exc, "reason", exc)
    return DownloadError(
        f"cannot fetch {what} from {url}: {why}",
        f"check the connection or proxy (HTTPS_PROXY), point {INDEX_ENV} at a mirror of the "
        "index, or set KUBEBUILDER_ASSETS to a folder with kube-apiserver and etcd")


def _install(archive: Path, target: Path) -> None:
    """Extract the three binaries into a fresh folder, then rename it to ``target``."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            for binary in BINARIES:
                member = members.get(MEMBER_DIR + binary)
                src = tar.extractfile(member) if member is not None else None
                if src is None:
                    raise DownloadError(
                        f"{archive.name.lstrip('.')} holds no {MEMBER_DIR}{binary}",
                        "the release layout changed; set KUBEBUILDER_ASSETS yourself")
                with src, open(staging / binary, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                os.chmod(staging / binary, 0o755)
        if target.exists():  # an incomplete earlier install
            shutil.rmtree(target)
        os.replace(staging, target)
    except (tarfile.TarError, EOFError) as exc:
        raise DownloadError(f"cannot unpack the envtest archive: {exc}",
                            "nothing was installed; run the task again") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
