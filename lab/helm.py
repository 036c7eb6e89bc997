"""Idempotent Helm releases: install or upgrade only when the chart version or values changed.

A release left ``pending-*`` by a killed ``helm`` is repaired first (rolled back, or uninstalled
when it never finished its first install), so a crash at any point converges on the next run.

Chart repositories are the user's helm state too: an entry is added only when missing, the index
is refreshed only when it lacks the pinned chart version, and an entry of the same name pointing
elsewhere (a mirror) is used as it is, with a warning, never overwritten. helm writes
``repositories.yaml`` and the cached indexes in place (``os.WriteFile``), so within one run those
writes wait until no ``helm upgrade`` of another cluster is reading them, and vice versa.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

from lab.errors import LabError, ToolError
from lab.steps.base import HelmRelease, StepContext, dump_yaml

# helm waits this long for each Kubernetes operation, hooks included (its default is 5m0s,
# cmd/helm/upgrade.go); a cold node pulls every image first. The subprocess gets a little more.
HELM_TIMEOUT = "15m0s"
HELM_PROCESS_TIMEOUT = 16 * 60


class _ReadWriteLock:
    """Many readers (helm upgrades) or one writer (repo add/update), within this process."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and self._readers == 0)
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


REPO_STATE = _ReadWriteLock()
_REPO_CHECK = threading.Lock()  # one repository check at a time; it reads, and rarely writes


def _ctx_args(ctx: StepContext) -> list[str]:
    args = ["--kube-context", ctx.cluster.kube_context]
    if ctx.kubeconfig:
        args += ["--kubeconfig", ctx.kubeconfig]
    return args


def release_status(ctx: StepContext, release: HelmRelease) -> dict[str, Any] | None:
    """`helm get metadata`: chart version, status and revision (`helm status` omits the chart)."""
    res = ctx.tools.run("helm", ["get", "metadata", release.release, "-n", release.namespace,
                                 "-o", "json", *_ctx_args(ctx)], check=False, quiet=True)
    if res.returncode != 0:
        if "not found" in (res.stderr + res.stdout):
            return None
        raise ToolError(res.command, res.returncode, res.stderr,
                        "helm could not read the release; is the cluster reachable?")
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def deployed_values(ctx: StepContext, release: HelmRelease) -> dict[str, Any]:
    res = ctx.tools.run("helm", ["get", "values", release.release, "-n", release.namespace,
                                 "-o", "json", *_ctx_args(ctx)], quiet=True)
    data = json.loads(res.stdout or "{}")
    return data if isinstance(data, dict) else {}


def ensure_release(ctx: StepContext, release: HelmRelease,
                   secret_values: dict[str, Any] | None = None) -> bool:
    """Converge one release. Returns True when helm changed something.

    ``secret_values`` (e.g. a CA key) go in a separate 0600 file, never in the rendered values.
    """
    ctx.tools.require("helm")
    wanted = _merge(release.values, secret_values or {})
    status = release_status(ctx, release)
    if status is not None:
        state = str(status.get("status", ""))
        revision = int(status.get("revision", 1))
        if state == "deployed" and _same_version(status.get("version"), release.version) and \
                _normalise(deployed_values(ctx, release)) == _normalise(wanted):
            ctx.log.info("helm.unchanged", release=release.release, revision=revision)
            return False
        if state.startswith("pending-") or state == "failed":
            _repair(ctx, release, state, revision)
    values_path = ctx.write_file(release.values_file, dump_yaml(release.values))
    args = ["upgrade", "--install", release.release, release.chart,
            "--version", release.version, "--namespace", release.namespace, "--create-namespace",
            "--values", str(values_path), "--reset-values", *_ctx_args(ctx)]
    if secret_values:
        secret_path = ctx.write_file(f"helm/{release.release}.secret.values.yaml",
                                     dump_yaml(secret_values), mode=0o600)
        args[args.index("--reset-values"):args.index("--reset-values")] = [
            "--values", str(secret_path)]
    args += ["--timeout", HELM_TIMEOUT]
    if not release.chart.startswith("oci://"):
        with _REPO_CHECK:
            ensure_repo(ctx, release)
    with REPO_STATE.read():  # helm reads repositories.yaml and the index while it starts
        ctx.tools.run("helm", args, timeout=HELM_PROCESS_TIMEOUT,
                      doing=f"installing {release.release} {release.version}")
    ctx.log.info("helm.applied", release=release.release, version=release.version)
    return True


def ensure_repo(ctx: StepContext, release: HelmRelease) -> None:
    """The chart's repository is configured and its local index lists the pinned version.

    Adds the entry only when missing and refreshes the index only when the version is not in
    it. An entry of the same name with another URL is the user's (e.g. a mirror): it is used
    as it is, with a warning, and never overwritten.
    """
    name, url = release.repo_name, release.repo_url
    res = ctx.tools.run("helm", ["repo", "list", "-o", "json"], check=False, quiet=True)
    entries = json.loads(res.stdout or "[]") if res.returncode == 0 else []
    configured = {str(e.get("name")): str(e.get("url")) for e in entries if isinstance(e, dict)}
    if name not in configured:
        with REPO_STATE.write():
            ctx.tools.run("helm", ["repo", "add", name, url],
                          doing=f"adding the {name} chart repository ({url})")
    elif configured[name].rstrip("/") != url.rstrip("/"):
        ctx.log.warning("helm.repo_differs", repo=name, configured=configured[name], lab=url,
                        note="using your entry as it is; the lab does not overwrite it")
    if _has_version(ctx, release):
        return
    with REPO_STATE.write():
        ctx.tools.run("helm", ["repo", "update", name],
                      doing=f"refreshing the {name} chart repository index")
    if not _has_version(ctx, release):
        raise LabError(
            f"chart {release.chart} {release.version} is not in the {name!r} repository "
            f"({configured.get(name, url)})",
            f"check that repository (`helm search repo {release.chart} --versions`); if it is "
            f"your own mirror, publish {release.version} there or point the entry back at "
            f"{url} (`helm repo add {name} {url} --force-update`)")


def _has_version(ctx: StepContext, release: HelmRelease) -> bool:
    """`helm search repo` reads only the local index: is the pinned version listed?"""
    res = ctx.tools.run("helm", ["search", "repo", release.chart, "--version", release.version,
                                 "-o", "json"], check=False, quiet=True)
    if res.returncode != 0:
        return False
    try:
        found = json.loads(res.stdout or "[]")
    except ValueError:
        return False
    return any(isinstance(r, dict) and r.get("name") == release.chart
               and _same_version(r.get("version"), release.version) for r in found)


def _repair(ctx: StepContext, release: HelmRelease, state: str, revision: int) -> None:
    """Clear what a killed helm left behind so the next upgrade is allowed."""
    ctx.log.warning("helm.repair", release=release.release, status=state, revision=revision)
    if state == "pending-install" or revision <= 1:
        ctx.tools.run("helm", ["uninstall", release.release, "-n", release.namespace,
                               *_ctx_args(ctx)], doing=f"removing the unfinished {release.release}")
    else:
        ctx.tools.run("helm", ["rollback", release.release, str(revision - 1), "-n",
                               release.namespace, *_ctx_args(ctx)],
                      doing=f"rolling back the unfinished {release.release} upgrade")


def _same_version(deployed: object, wanted: str) -> bool:
    """Chart versions compare without a leading v (cert-manager's chart is `v1.19.0`)."""
    return isinstance(deployed, str) and bool(deployed) and \
        deployed.removeprefix("v") == wanted.removeprefix("v")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _normalise(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, default=str)
