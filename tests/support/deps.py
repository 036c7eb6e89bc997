"""What the tests need from outside the repository, where each comes from, and what a miss does.

* **upstream files** (pinned CRDs, chart values and schemas): ``$LAB_UPSTREAM_DIR``, else
  ``../shared/upstream``, else a cache (``$XDG_CACHE_HOME/kind-cilium-lab/upstream``) that the
  session fills at start from the upstream URLs in ``manifests/upstream-test-files.sha256``,
  each file SHA-256 verified (`prepare_upstream`). A named folder that lacks files is filled too.
* **envtest** (a real kube-apiserver + etcd): ``$KUBEBUILDER_ASSETS``, else
  ``../shared/envtest/k8s/1.33.13-linux-amd64`` (linux/amd64), else what
  ``invoke lab.tools --envtest`` installed (`lab.envtest_assets`).
* **policy oracle** (Cilium's policy engine as a binary): ``$LAB_POLICY_ORACLE``, else
  ``../shared/tools/cilium-policy-oracle/cilium-policy-oracle``, else what ``nox -s oracle``
  built from Cilium's source and verified against the pinned digest (`oracle_build`).

`require_upstream`, `require_envtest` and `require_oracle` return the path or raise `Missing`, a
skip with one reason per dependency (so pytest folds them into one line). `configure` registers
`DependencyReport`, which ends the run with one line saying what to set, and which turns those
skips into failures where ``CI`` is true: CI must not pass by skipping.
"""

from __future__ import annotations

import os
import platform
from collections import Counter
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from lab import envtest_assets
from lab.bootstrap import cache_root
from lab.errors import LabError
from tests.support import oracle_build, upstream_fetch

REPO = Path(__file__).resolve().parents[2]
SHARED_ENV = "LAB_SHARED_DIR"  # where ../shared is (tests of this module point it elsewhere)
UPSTREAM_ENV = "LAB_UPSTREAM_DIR"
ENVTEST_ENV = "KUBEBUILDER_ASSETS"
ORACLE_ENV = "LAB_POLICY_ORACLE"
ENVTEST_BINARIES = ("kube-apiserver", "etcd")

_fetch_failure: dict[str, str] = {}


class Missing(pytest.skip.Exception):  # type: ignore[name-defined,misc]
    """A test dependency is absent: a skip, or a failure under CI (see `DependencyReport`)."""

    def __init__(self, dependency: str, reason: str) -> None:
        super().__init__(reason)
        self.dependency = dependency
        self.reason = reason


_MISSING_LINE = Missing.__init__.__code__.co_firstlineno


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def shared_dir() -> Path:
    return Path(os.environ.get(SHARED_ENV) or REPO.parent / "shared")


def shared_upstream() -> Path:
    return shared_dir() / "upstream"


def shared_envtest() -> Path:
    return shared_dir() / "envtest" / "k8s" / "1.33.13-linux-amd64"


def shared_oracle() -> Path:
    return shared_dir() / "tools" / "cilium-policy-oracle" / "cilium-policy-oracle"


def upstream_cache() -> Path:
    return cache_root() / "upstream"


# -- upstream files --------------------------------------------------------------------------------

def prepare_upstream() -> None:
    """Session start: fetch what the upstream folder lacks and point ``$LAB_UPSTREAM_DIR`` at it.

    Runs before collection, so modules that read the variable at import see the filled folder.
    A failure (offline) is remembered for `require_upstream`'s reason; nothing raises here.
    """
    raw = os.environ.get(UPSTREAM_ENV, "").strip()
    if raw:
        folder, overwrite = Path(raw).expanduser(), False
        if not folder.is_dir():
            return  # a folder the user named but that does not exist: say so, fetch nowhere
    elif upstream_fetch.is_complete(shared_upstream()):
        folder = shared_upstream()
        os.environ[UPSTREAM_ENV] = str(folder)
        return
    else:
        folder, overwrite = upstream_cache(), True
    try:
        upstream_fetch.ensure(folder, overwrite=overwrite)
    except (LabError, OSError) as exc:
        _fetch_failure["upstream"] = str(exc).splitlines()[0]
        return
    os.environ[UPSTREAM_ENV] = str(folder)


def require_upstream() -> Path:
    """The complete upstream folder, or `Missing` naming what to set."""
    raw = os.environ.get(UPSTREAM_ENV, "").strip()
    folder = Path(raw).expanduser() if raw else shared_upstream()
    if folder.is_dir() and upstream_fetch.is_complete(folder):
        return folder.resolve()
    if raw:
        where = (f"${UPSTREAM_ENV}={raw} lacks pinned files" if folder.is_dir()
                 else f"${UPSTREAM_ENV}={raw} does not exist (default {shared_upstream()})")
    else:
        where = f"${UPSTREAM_ENV} unset, {shared_upstream()} absent"
    failure = _fetch_failure.get("upstream")
    fetched = f"; fetch failed: {failure}" if failure else ""
    raise Missing("upstream", (
        f"pinned upstream CRDs/chart schemas unavailable ({where}{fetched}) → set {UPSTREAM_ENV} "
        f"to a folder with cilium-1.18.4/, gateway-api-1.4.0/, cert-manager-1.19.0/, or run "
        f"online once (they are fetched into {upstream_cache()})"))


# -- envtest ---------------------------------------------------------------------------------------

def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _has_envtest(folder: Path) -> bool:
    return all(_is_executable(folder / b) for b in ENVTEST_BINARIES)


def require_envtest() -> Path:
    """A folder with kube-apiserver and etcd (what ``KUBEBUILDER_ASSETS`` names), or `Missing`."""
    raw = os.environ.get(ENVTEST_ENV, "").strip()
    if raw:
        if _has_envtest(Path(raw)):
            return Path(raw).resolve()
        where = f"${ENVTEST_ENV}={raw} holds no executable kube-apiserver and etcd"
    else:
        candidates = [envtest_assets.assets_dir()]
        if (platform.system(), platform.machine()) == ("Linux", "x86_64"):
            candidates.insert(0, shared_envtest())
        for folder in candidates:
            if _has_envtest(folder):
                return folder.resolve()
        where = (f"${ENVTEST_ENV} unset, no kube-apiserver and etcd in "
                 f"{' or '.join(str(c) for c in candidates)}")
    raise Missing("envtest", (
        f"envtest binaries unavailable ({where}) → run `invoke lab.tools --envtest` (the official "
        f"controller-tools release) or set {ENVTEST_ENV}"))


# -- policy oracle ---------------------------------------------------------------------------------

def require_oracle() -> Path:
    """The cilium-policy-oracle binary, or `Missing`."""
    raw = os.environ.get(ORACLE_ENV, "").strip()
    if raw:
        if _is_executable(Path(raw).expanduser()):
            return Path(raw).expanduser().resolve()
        where = f"${ORACLE_ENV}={raw} is not an executable"
    else:
        candidates = [shared_oracle(), oracle_build.default_dest()]
        for path in candidates:
            if _is_executable(path):
                return path.resolve()
        where = f"${ORACLE_ENV} unset, no binary at {' or '.join(str(c) for c in candidates)}"
    raise Missing("oracle", (
        f"cilium-policy-oracle unavailable ({where}) → run `nox -s oracle` once (builds it from "
        f"Cilium v1.18.4's source with Go 1.27.3 and checks it against the pinned SHA-256) or "
        f"set {ORACLE_ENV}"))


# -- reporting -------------------------------------------------------------------------------------

class DependencyReport:
    """Counts the tests a missing dependency stopped; under CI turns each into a failure."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.reasons: dict[str, str] = {}

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item,
                                  call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
        report = yield
        exc = call.excinfo.value if call.excinfo is not None else None
        if isinstance(exc, Missing) and report.skipped:
            self.counts[exc.dependency] += 1
            self.reasons.setdefault(exc.dependency, exc.reason)
            # One location for every such skip, so `-rs` folds each dependency into one line.
            report.longrepr = (__file__, _MISSING_LINE, f"Skipped: {exc.reason}")
            if in_ci():
                report.outcome = "failed"
                report.longrepr = f"missing test dependency (CI is set, so this fails): " \
                                  f"{exc.reason}"
        return report

    def summary(self) -> str:
        total = sum(self.counts.values())
        verdict = "failed (CI is set)" if in_ci() else "skipped"
        parts = "; ".join(self.reasons[d] for d in self.counts)
        return f"{total} test(s) {verdict} for missing test dependencies: {parts}"

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.counts:
            terminalreporter.write_line(self.summary(), yellow=not in_ci(), red=in_ci())


def configure(config: pytest.Config) -> None:
    prepare_upstream()
    config.pluginmanager.register(DependencyReport(), "lab-test-dependencies")
