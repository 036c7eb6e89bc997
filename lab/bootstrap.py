"""Pinned tool bootstrap: kind, helm and the Cilium CLI, checksum-verified, in one tools directory.

The tools directory belongs to the user, not to a lab: ``$LAB_TOOLS_DIR``, else
``$XDG_CACHE_HOME/kind-cilium-lab/bin`` (``~/.cache/kind-cilium-lab/bin``). Every lab config (and
`lab.tools` run without one) finds the same binaries, so nothing is downloaded twice and no task
falls back to another kind or helm on PATH because it looked in another lab's state directory.

Where a tool is missing or not at the pinned version, the pinned release for this platform is
downloaded from its official release location (overridable per tool with
``LAB_DOWNLOAD_BASE_<TOOL>`` for mirrors and tests). The SHA-256 published next to the release
asset is fetched from the same base and checked *before* anything is extracted, marked executable
or run; the binary lands under its final name by an atomic rename only after that. Nothing here
executes a downloaded file before its checksum matched.

Release locations (checked against the upstream release tooling):

* kind: ``<base>/<version>/kind-<os>-<arch>`` + ``.sha256sum`` (``shasum -a 256`` output);
  kind ``hack/release/build/cross.sh``; ``kind.sigs.k8s.io/dl/v*`` redirects to
  ``github.com/kubernetes-sigs/kind/releases/download/v*`` (``site/layouts/index.redirects``).
* helm: ``https://get.helm.sh/helm-<version>-<os>-<arch>.tar.gz`` + ``.sha256sum`` (helm
  ``Makefile`` targets ``dist``/``checksum``; ``scripts/get-helm-3``); binary at
  ``<os>-<arch>/helm`` in the tarball.
* Cilium CLI: ``<base>/<version>/cilium-<os>-<arch>.tar.gz`` + ``.sha256sum`` (cilium-cli
  ``Makefile`` target ``local-release``, ``README.md``); binary ``cilium`` at the tarball root.

Downloads are atomic and resumable: bytes go to a hidden ``.part`` file in ``bin/`` (named after
the asset and the expected digest); a run that was interrupted (Ctrl-C, killed) leaves it and the
next run continues it with an HTTP range request, then verifies the whole file. A truncated
transfer or a checksum mismatch deletes the partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from lab.config import LabConfig
from lab.errors import LabError
from lab.filelock import exclusive_lock
from lab.logs import Logger
from lab.tools import INSTALL_HINTS, VERSION_ARGS, Tools

REQUIRED = ("kind", "helm")
OPTIONAL = ("cilium",)  # the Cilium CLI: handy for `cilium status`, not needed by lab.up
ALL_TOOLS = REQUIRED + OPTIONAL

TITLES = {"kind": "kind", "helm": "helm", "cilium": "Cilium CLI"}
CONFIG_KEYS = {"kind": "versions.kind", "helm": "versions.helm", "cilium": "versions.ciliumCLI"}
DEFAULT_BASES = {
    "kind": "https://github.com/kubernetes-sigs/kind/releases/download",
    "helm": "https://get.helm.sh",
    "cilium": "https://github.com/cilium/cilium-cli/releases/download",
}
BASE_ENV = "LAB_DOWNLOAD_BASE_"  # + KIND | HELM | CILIUM
NO_DOWNLOAD_ENV = "LAB_NO_DOWNLOAD"
TOOLS_DIR_ENV = "LAB_TOOLS_DIR"

SUPPORTED_OS = {"linux": "linux", "darwin": "darwin"}
SUPPORTED_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

USER_AGENT = "kind-cilium-lab (tool bootstrap)"
HTTP_TIMEOUT = 60.0
CHUNK = 256 * 1024
MIB = 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


class DownloadError(LabError):
    """A pinned release could not be fetched or did not verify; nothing was installed."""


@dataclass(frozen=True)
class Release:
    """One downloadable asset of a pinned release and where its checksum is published."""

    tool: str
    version: str
    os: str
    arch: str
    asset: str  # file name as published
    url: str
    checksum_url: str
    member: str | None  # path of the binary inside the tarball; None: the asset is the binary

    @property
    def label(self) -> str:
        return f"{self.tool} {self.version} ({self.os}/{self.arch})"


def pinned_versions(cfg: LabConfig) -> dict[str, str]:
    """The pinned tool versions keyed by binary name (the keys `Tools` uses)."""
    v = cfg.versions
    return {"kind": v.kind, "helm": v.helm, "cilium": v.cilium_cli}


def cache_root() -> Path:
    """This user's cache of the lab: ``$XDG_CACHE_HOME/kind-cilium-lab`` (``~/.cache/…``)."""
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(cache) / "kind-cilium-lab"


def tools_dir() -> Path:
    """Where verified tools live, shared by every lab of this user (see the module doc)."""
    explicit = os.environ.get(TOOLS_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    return cache_root() / "bin"


def lab_tools(cfg: LabConfig, log: Logger) -> Tools:
    """A `Tools` that looks in the tools directory first and knows the pinned versions."""
    return Tools(tools_dir(), log, pinned_versions(cfg))


def downloads_forbidden_by_env() -> bool:
    """``LAB_NO_DOWNLOAD=1`` (or true/yes) forbids downloading, like ``--no-download``."""
    return os.environ.get(NO_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def downloads_allowed(cfg: LabConfig, no_download: bool) -> bool:
    """Downloads happen unless the flag, ``LAB_NO_DOWNLOAD`` or ``downloadTools: false`` says no."""
    return cfg.download_tools and not no_download and not downloads_forbidden_by_env()


def platform_pair(system: str | None = None, machine: str | None = None) -> tuple[str, str]:
    """This machine as release assets name it: (linux|darwin, amd64|arm64)."""
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    os_name = SUPPORTED_OS.get(system.lower())
    arch = SUPPORTED_ARCH.get(machine.lower())
    if os_name is None or arch is None:
        raise DownloadError(
            f"no pinned release builds for this platform: {system or '?'}/{machine or '?'} "
            "(the lab downloads linux or darwin on amd64 or arm64)",
            "install kind, helm and the Cilium CLI for your platform yourself, put them on PATH "
            "and run with --no-download (or LAB_NO_DOWNLOAD=1)",
        )
    return os_name, arch


def host_platform() -> tuple[str, str]:
    """`platform_pair`, or this machine's own lower-case names where no pinned release exists
    (for folder names and builds, never for a download)."""
    try:
        return platform_pair()
    except DownloadError:
        return platform.system().lower(), platform.machine().lower()


def base_url(tool: str, base_urls: dict[str, str] | None = None) -> str:
    """Where a tool's releases live: ``base_urls`` > ``LAB_DOWNLOAD_BASE_<TOOL>`` > upstream."""
    base = (base_urls or {}).get(tool) or os.environ.get(BASE_ENV + tool.upper()) \
        or DEFAULT_BASES[tool]
    return base.rstrip("/")


def release(tool: str, version: str, os_name: str, arch: str, base: str | None = None) -> Release:
    """The asset, its URL and its checksum URL for one tool release."""
    base = (base or DEFAULT_BASES[tool]).rstrip("/")
    if tool == "kind":
        asset, member = f"kind-{os_name}-{arch}", None
        url = f"{base}/{version}/{asset}"
    elif tool == "helm":
        asset, member = f"helm-{version}-{os_name}-{arch}.tar.gz", f"{os_name}-{arch}/helm"
        url = f"{base}/{asset}"
    elif tool == "cilium":
        asset, member = f"cilium-{os_name}-{arch}.tar.gz", "cilium"
        url = f"{base}/{version}/{asset}"
    else:
        raise LabError(f"no release location known for {tool!r}",
                       f"the lab bootstraps: {', '.join(ALL_TOOLS)}")
    return Release(tool, version, os_name, arch, asset, url, url + ".sha256sum", member)


# -- the entry point ------------------------------------------------------------------------------

def ensure_tools(cfg: LabConfig, tools: Tools, *, allow_download: bool,
                 base_urls: dict[str, str] | None = None, out: TextIO | None = None,
                 names: Sequence[str] = ALL_TOOLS,
                 platform_: tuple[str, str] | None = None) -> list[str]:
    """Every tool of ``names`` at its pinned version, downloading what is missing or wrong.

    Returns what was installed (``"kind v0.29.0"``, …), empty when everything was in place.
    With ``allow_download=False`` a missing or wrong required tool (kind, helm) raises
    `LabError` saying what to install; an optional one (the Cilium CLI) is only reported on
    ``out`` (default: stderr). ``platform_`` overrides the detected (os, arch), for tests.
    """
    out = out or sys.stderr
    pinned = pinned_versions(cfg)
    todo: list[tuple[str, str]] = []
    for name in names:
        why = _needs_install(tools, name, pinned[name])
        if why:
            todo.append((name, why))
    if not todo:
        return []
    if not allow_download:
        _refuse(todo, pinned, tools, out)
        return []
    os_name, arch = platform_ or platform_pair()
    bin_dir = tools.bin_dir or tools_dir()
    bin_dir.mkdir(parents=True, exist_ok=True)
    installed: list[str] = []
    # one bootstrap at a time per tools directory, across labs and processes (two would share
    # the resumable .part)
    with exclusive_lock(bin_dir / ".bootstrap.lock"):
        for name, why in todo:
            want = pinned[name]
            if _installed_version(bin_dir / name, name) == want:  # another run just did it
                _forget(tools, name)
                continue
            rel = release(name, want, os_name, arch, base_url(name, base_urls))
            out.write(f"↓ {rel.label}: {why}; fetching {rel.url}\n")
            out.flush()
            path, digest = install(rel, bin_dir, out)
            _forget(tools, name)
            tools.log.info("tool.installed", tool=name, version=want, path=str(path),
                           sha256=digest)
            out.write(f"✓ {TITLES[name]} {want} verified (sha256 {digest[:16]}…) → {path}\n")
            out.flush()
            installed.append(f"{name} {want}")
    return installed


def _needs_install(tools: Tools, name: str, want: str) -> str:
    """Why the tool must be installed, or "" when the one found is at the pinned version."""
    path = tools.which(name)
    if path is None:
        return "not installed"
    try:
        have = tools.version(name)
    except LabError:
        have = None
    if have == want:
        return ""
    return f"{have or 'an unknown version'} at {path}, the lab pins {want}"


def _refuse(todo: list[tuple[str, str]], pinned: dict[str, str], tools: Tools,
            out: TextIO) -> None:
    required = [(n, w) for n, w in todo if n in REQUIRED]
    for name, why in todo:
        if name not in REQUIRED:
            out.write(f"! {TITLES[name]}: {why} (optional; downloads are off) → "
                      f"{INSTALL_HINTS.get(name, '').format(version=pinned[name])}\n")
    if not required:
        return
    problems = "; ".join(f"{TITLES[n]}: {w}" for n, w in required)
    hints = "\n    ".join(INSTALL_HINTS.get(n, f"install {n} {{version}}").format(
        version=pinned[n]) for n, _ in required)
    bin_dir = tools.bin_dir or tools_dir()
    raise LabError(
        f"required tools are missing or at the wrong version and downloads are off: {problems}",
        f"install them (or put them in {bin_dir}):\n    {hints}\n  or allow downloads "
        f"(drop --no-download / unset {NO_DOWNLOAD_ENV})",
    )


def _forget(tools: Tools, name: str) -> None:
    """Drop what `Tools` cached about ``name`` so the next lookup sees the new binary."""
    tools._paths.pop(name, None)
    tools._checked.discard(name)


def _installed_version(path: Path, tool: str) -> str | None:
    """The version a binary in ``bin/`` reports (only binaries this module verified land there)."""
    spec = VERSION_ARGS.get(tool)
    if spec is None or not (path.is_file() and os.access(path, os.X_OK)):
        return None
    try:
        proc = subprocess.run([str(path), *spec[0]], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(spec[1], proc.stdout + proc.stderr)
    return m.group(1) if m else None


# -- download, verify, install --------------------------------------------------------------------

def install(rel: Release, bin_dir: Path, out: TextIO | None = None) -> tuple[Path, str]:
    """Download ``rel``, verify its published SHA-256, then place the binary atomically.

    Returns the installed path and the verified digest. Raises `DownloadError` (nothing
    installed, no partial file left unless the process was interrupted) otherwise.
    """
    out = out or sys.stderr
    expected = fetch_checksum(rel)
    part = bin_dir / f".{rel.asset}.{expected[:12]}.part"
    download(rel.url, part, expected, out=out, label=rel.label)
    # From here on the bytes are the ones upstream published.
    target = bin_dir / rel.tool
    if rel.member is None:
        os.chmod(part, 0o755)
        os.replace(part, target)
    else:
        try:
            _extract(rel, part, target)
        finally:
            part.unlink(missing_ok=True)
    have = _installed_version(target, rel.tool)
    if have != rel.version:
        target.unlink(missing_ok=True)
        raise DownloadError(
            f"the verified {rel.asset} reports {have or 'no version'}, not {rel.version}",
            f"the release location ({rel.url}) serves another build: check "
            f"{BASE_ENV}{rel.tool.upper()} and {CONFIG_KEYS[rel.tool]}",
        )
    return target, expected


def fetch_checksum(rel: Release) -> str:
    """The SHA-256 upstream published for ``rel.asset``."""
    try:
        with _open(rel.checksum_url) as resp:
            text = resp.read(64 * 1024).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        raise _http_error(rel, rel.checksum_url, exc, "checksum file") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise _network_error(rel, rel.checksum_url, exc) from exc
    return parse_checksum(text, rel.asset, rel.checksum_url)


def parse_checksum(text: str, asset: str, source: str = "the checksum file") -> str:
    """The digest for ``asset`` in ``sha256sum``/``shasum`` output or a bare ``.sha256`` file."""
    entries: list[tuple[str, str | None]] = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or not SHA256_RE.match(parts[0]):
            continue
        name = parts[1].lstrip("*") if len(parts) > 1 else None
        entries.append((parts[0].lower(), name.rsplit("/", 1)[-1] if name else None))
    for digest, name in entries:
        if name == asset:
            return digest
    if len(entries) == 1 and entries[0][1] is None:
        return entries[0][0]
    named = ", ".join(n for _, n in entries if n) or "no SHA-256 lines"
    raise DownloadError(
        f"{source} has no SHA-256 for {asset} (it lists: {named})",
        "the release location serves another file: check the pinned version and "
        f"{BASE_ENV}<TOOL>; nothing was downloaded or installed",
    )


def download(url: str, part: Path, expected: str, *, out: TextIO | None = None,
             label: str = "") -> None:
    """Fetch ``url`` into ``part`` (continuing a previous partial file) and verify its SHA-256.

    On success ``part`` holds exactly the expected bytes. A truncated transfer or a digest
    mismatch deletes ``part`` and raises `DownloadError`; an interruption (Ctrl-C) keeps it so
    that re-running resumes.
    """
    out = out or sys.stderr
    for attempt in (1, 2):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            resp = _open(url, headers)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have and attempt == 1:  # the partial file is already complete
                if sha256_file(part) == expected:
                    return
                part.unlink(missing_ok=True)
                continue
            raise _http_error(None, url, exc, "download", label) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise _network_error(None, url, exc, label) from exc
        with resp:
            _stream(resp, url, part, have, expected, out, label)
        return


def _stream(resp: Any, url: str, part: Path, have: int, expected: str, out: TextIO,
            label: str) -> None:
    digest = hashlib.sha256()
    length = resp.headers.get("Content-Length")
    body = int(length) if length and length.isdigit() else None
    if have and resp.status == 206:
        sha256_file(part, digest)
        mode, done = "ab", have
    else:  # a fresh download, or the server ignored the range: start over
        mode, done = "wb", 0
    total = done + body if body is not None else None
    progress = _Progress(out, label or url, total, done)
    truncated = False
    try:
        with open(part, mode) as fh:
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                fh.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                progress.update(done)
            fh.flush()
            os.fsync(fh.fileno())
    except KeyboardInterrupt:
        progress.close()
        raise  # keep the partial file: the next run resumes it
    except http.client.IncompleteRead:
        truncated = True  # the server closed before Content-Length bytes: reported below
    except (OSError, http.client.HTTPException) as exc:
        progress.close()
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"downloading {url} failed after {done} bytes: {exc}",
            "the partial file was removed and nothing was installed; run the task again",
        ) from exc
    progress.close()
    if truncated or (total is not None and done != total):
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"the download of {url} was truncated: got {done} of {total or '?'} bytes",
            "the partial file was removed and nothing was installed; run the task again "
            "(check your connection or proxy if it keeps happening)",
        )
    actual = digest.hexdigest()
    if actual != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}",
            "the file was deleted and nothing was installed or run. Run the task again; if it "
            "persists, the download is being altered (proxy, mirror) or the release changed: "
            "install the tool yourself from its official release page and use --no-download",
        )


def _extract(rel: Release, archive: Path, target: Path) -> None:
    """Copy the one binary out of a verified tarball into ``target``, atomically."""
    assert rel.member is not None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = None
            for name in (rel.member, f"./{rel.member}"):
                with contextlib.suppress(KeyError):
                    member = tar.getmember(name)
                    break
            if member is None or not member.isfile():
                raise DownloadError(
                    f"{rel.asset} holds no file {rel.member}",
                    f"the release layout changed: install {rel.tool} {rel.version} yourself and "
                    "use --no-download")
            src = tar.extractfile(member)
            assert src is not None
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{rel.tool}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as dst, src:
                    shutil.copyfileobj(src, dst, CHUNK)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DownloadError(f"cannot unpack {rel.asset}: {exc}",
                            "nothing was installed; run the task again") from exc


def sha256_file(path: Path, digest: Any = None) -> str:
    h = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return str(h.hexdigest())


def _open(url: str, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    return urllib.request.urlopen(req, timeout=HTTP_TIMEOUT)


def _http_error(rel: Release | None, url: str, exc: urllib.error.HTTPError, what: str,
                label: str = "") -> DownloadError:
    name = rel.label if rel else label or url
    if exc.code == 404:
        key = CONFIG_KEYS.get(rel.tool, "versions") if rel else "versions"
        return DownloadError(
            f"{what} for {name} not found: {url} (HTTP 404)",
            f"check {key} in the config (that release may not exist or may publish no build "
            "for this platform) and the download base (LAB_DOWNLOAD_BASE_<TOOL>)")
    return DownloadError(f"{what} for {name} failed: {url} (HTTP {exc.code} {exc.reason})",
                         "retry later, or install the tool yourself and use --no-download")


def _network_error(rel: Release | None, url: str, exc: BaseException,
                   label: str = "") -> DownloadError:
    name = rel.label if rel else label or url
    return DownloadError(
        f"cannot reach {url} for {name}: {getattr(exc, 'reason', exc)}",
        "check the connection or proxy (HTTPS_PROXY), point LAB_DOWNLOAD_BASE_<TOOL> at a "
        "mirror, or install the tool yourself and use --no-download")


class _Progress:
    """Rich progress bar on a TTY; otherwise one plain line per 10% (or per 8 MiB)."""

    def __init__(self, out: TextIO, label: str, total: int | None, done: int = 0) -> None:
        self.out = out
        self.label = label
        self.total = total
        self._next = 0
        self._rich: Any = None
        self._task: Any = None
        if _isatty(out):
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._rich = Progress(TextColumn("{task.description}"), BarColumn(),
                                  DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                                  console=Console(file=out, no_color="NO_COLOR" in os.environ))
            self._rich.start()
            self._task = self._rich.add_task(label, total=total, completed=done)
        elif done:
            out.write(f"  {label}: resuming at {done / MIB:.1f} MiB\n")
        self.update(done)

    def update(self, done: int) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=done)
            return
        if self.total:
            pct = min(100, done * 100 // self.total)
            if pct >= self._next:
                self.out.write(f"  {self.label}: {pct}% ({done / MIB:.1f}/"
                               f"{self.total / MIB:.1f} MiB)\n")
                self.out.flush()
                self._next = (pct // 10 + 1) * 10
        elif done >= self._next:
            self.out.write(f"  {self.label}: {done / MIB:.1f} MiB\n")
            self.out.flush()
            self._next = done + 8 * MIB

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
