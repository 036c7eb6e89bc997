"""Idempotent Helm releases: install or upgrade only when the chart version or values changed.

A release left ``pending-*`` by a killed ``helm`` is repaired first (rolled back, or uninstalled
when it never finished its first install), so a crash at any point converges on the next run.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from lab.errors import ToolError
from lab.steps.base import HelmRelease, StepContext, dump_yaml

_REPO_LOCK = threading.Lock()


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
    if not release.chart.startswith("oci://"):
        with _REPO_LOCK:  # parallel clusters would race on helm's repositories file
            ctx.tools.run("helm", ["repo", "add", release.repo_name, release.repo_url,
                                   "--force-update"],
                          doing=f"adding the {release.repo_name} chart repo")
    ctx.tools.run("helm", args, timeout=900,
                  doing=f"installing {release.release} {release.version}")
    ctx.log.info("helm.applied", release=release.release, version=release.version)
    return True


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
