"""Fetch the pinned upstream test files (CRDs, chart values and schemas) into a folder.

``manifests/upstream-test-files.sha256`` lists every file the offline tests read from the upstream
folder, with its SHA-256 and where upstream publishes it (raw GitHub at the pinned commit, or a
member of the published Cilium chart archive). A file lands under its final name only after its
digest matched (``lab.bootstrap.download`` verifies while streaming, then a rename); an archive is
verified before any member is read; nothing but verified files is left in the folder.
``LAB_UPSTREAM_MIRROR`` replaces ``https://HOST/PATH`` by ``<mirror>/HOST/PATH`` (a mirror, or a
local server in tests).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from lab.bootstrap import DownloadError, download
from lab.filelock import exclusive_lock

MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "upstream-test-files.sha256"
MIRROR_ENV = "LAB_UPSTREAM_MIRROR"
ARCHIVES = ".archives"
PARTIAL = ".partial"  # downloads in progress; removed when a fetch ends


@dataclass(frozen=True)
class Entry:
    sha256: str
    path: str  # relative to the upstream folder
    source: str  # URL, or "<archive path>!<member>"

    @property
    def is_archive(self) -> bool:
        return self.path.startswith(ARCHIVES + "/")


def entries(manifest: Path | None = None) -> list[Entry]:
    out = []
    for line in (manifest or MANIFEST).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, path, source = line.split()
            out.append(Entry(digest, path, source))
    return out


def listed_files(manifest: Path | None = None) -> list[str]:
    """The relative paths a complete upstream folder holds (archives excluded)."""
    return [e.path for e in entries(manifest) if not e.is_archive]


def is_complete(folder: Path, manifest: Path | None = None) -> bool:
    """Every listed file exists (cheap: no hashing; for folders the tests did not fill)."""
    return all((folder / p).is_file() for p in listed_files(manifest))


def url_for(source: str, mirror: str | None = None) -> str:
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV, "")
    if not mirror:
        return source
    return mirror.rstrip("/") + "/" + source.split("://", 1)[1]


def ensure(folder: Path, manifest: Path | None = None, mirror: str | None = None,
           overwrite: bool = True) -> list[str]:
    """Fetch what ``folder`` lacks; returns the paths fetched. Raises `DownloadError`.

    With ``overwrite`` (a cache the tests own) a file whose digest differs is fetched again;
    without it (a folder the user pointed at) only missing files are fetched.
    """
    todo = [e for e in entries(manifest) if not e.is_archive and _needs(folder / e.path,
                                                                         e.sha256, overwrite)]
    if not todo:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    archives = {e.path: e for e in entries(manifest) if e.is_archive}
    staging = folder / PARTIAL
    with exclusive_lock(folder / ".fetch.lock"):  # two pytest runs sharing the cache
        todo = [e for e in todo if _needs(folder / e.path, e.sha256, overwrite)]
        try:
            for e in todo:
                staging.mkdir(exist_ok=True)
                part = staging / f"{e.path.replace('/', '_')}.{e.sha256[:12]}"
                if "!" in e.source:
                    archive_path, member = e.source.split("!", 1)
                    archive = _archive(staging, archives, archive_path, mirror)
                    _extract(archive, member, part, e.sha256)
                else:
                    download(url_for(e.source, mirror), part, e.sha256, out=io.StringIO(),
                             label=e.path)
                target = folder / e.path
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [e.path for e in todo]


def _needs(path: Path, digest: str, overwrite: bool) -> bool:
    if not path.is_file():
        return True
    return overwrite and hashlib.sha256(path.read_bytes()).hexdigest() != digest


def _archive(staging: Path, archives: dict[str, Entry], path: str, mirror: str | None) -> Path:
    entry = archives.get(path)
    if entry is None:
        raise DownloadError(f"the manifest names archive {path} but does not list it",
                            "list the archive (digest, path, URL) above its members")
    target = staging / path.replace("/", "_")
    if not target.is_file():
        part = target.with_name(target.name + ".part")
        download(url_for(entry.source, mirror), part, entry.sha256, out=io.StringIO(),
                 label=path)
        os.replace(part, target)
    return target


def _extract(archive: Path, member: str, part: Path, digest: str) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            src = tar.extractfile(member)
            data = src.read() if src is not None else None
    except (KeyError, tarfile.TarError, OSError) as exc:
        raise DownloadError(f"{archive.name} holds no readable {member} ({exc})",
                            "the archive's layout changed: update the manifest") from exc
    if data is None:
        raise DownloadError(f"{member} in {archive.name} is not a file", "update the manifest")
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise DownloadError(f"{member} in {archive.name} has sha256 {actual}, pinned {digest}",
                            "the archive changed upstream; nothing was written")
    part.write_bytes(data)
