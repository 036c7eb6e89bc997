"""Lifecycle tasks: `lab.up`, `lab.mesh`, `lab.down`, `lab.status`, `lab.render`.

Thin: parse options, call the runner, print, map errors to Exit.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from invoke.context import Context
from invoke.tasks import task

from lab import logs
from lab.cli import CONFIG_HELP, LOG_HELP
from lab.cli import guard as _guard
from lab.cli import setup as _setup
from lab.config import LabConfig


def _lab(cfg: LabConfig) -> Any:
    from lab.runner import Lab  # imported on use: keeps `invoke --list` fast

    return Lab(cfg, kubeconfig=os.environ.get("LAB_KUBECONFIG"))


UP_HELP = {
    "config": CONFIG_HELP,
    "to": "stop at this state: cluster, cni, gateway, certs, locked, meshed",
    "resume": "trust the record: re-probe completed steps, step back on drift, continue",
    "dry_run": "print the plan (steps, commands, objects) and change nothing",
    "cluster": "only this cluster (repeatable; default: all)",
    "skip_doctor": "skip the preflight checks (experts; logged)",
    "no_download": "never download pinned tools; report what to install instead",
    "log_format": LOG_HELP,
}


@task(help=UP_HELP, iterable=["cluster"])
def up(c: Context, config: str | None = None, to: str | None = None, resume: bool = False,
       dry_run: bool = False, cluster: list[str] | None = None, skip_doctor: bool = False,
       no_download: bool = False, log_format: str | None = None) -> None:
    """Bring the lab up (converges from wherever it is)."""
    _up(config, to, resume, dry_run, cluster, skip_doctor, no_download, log_format)


@task(help={k: v for k, v in UP_HELP.items() if k != "to"}, iterable=["cluster"])
def mesh(c: Context, config: str | None = None, resume: bool = False, dry_run: bool = False,
         cluster: list[str] | None = None, skip_doctor: bool = False, no_download: bool = False,
         log_format: str | None = None) -> None:
    """Bring every cluster of a multi-cluster config up and join them with Cluster Mesh."""
    _up(config, "meshed", resume, dry_run, cluster, skip_doctor, no_download, log_format)


def _up(config: str | None, to: str | None, resume: bool, dry_run: bool,
        cluster: list[str] | None, skip_doctor: bool, no_download: bool,
        log_format: str | None) -> None:
    cfg = _setup(config, log_format)
    if to is not None:  # refused before the preflight may download tools
        from lab.runner import check_target

        _guard(lambda: check_target(cfg, to))
    lab = _lab(cfg)
    if dry_run:
        plan = _guard(lambda: lab.plan(to, resume))
        _print_plan(plan)
        return
    _guard(lambda: _preflight(cfg, skip_doctor, no_download))
    from lab.ui import Progress

    with Progress() as progress:
        lab.progress = progress
        _guard(lambda: lab.up(to, resume, cluster or None))
    _print_next_steps(cfg, to)


def _print_next_steps(cfg: LabConfig, to: str | None) -> None:
    from lab.state import STATES

    print(f"✓ lab is up ({', '.join(cl.name for cl in cfg.clusters)}); "
          "`invoke lab.status` shows every gate")
    if to is None or STATES.index(to) >= STATES.index("certs"):
        host = cfg.gateway_hosts[0] if cfg.gateway_hosts else "echo"
        for cl in cfg.clusters:
            g = cl.gateway
            print(f"  {cl.name}: https://{host}.localhost:{g.https_host_port}  "
                  f"http://{host}.localhost:{g.http_host_port}")
        print("  trust the lab CA: `invoke lab.trust`; flows: `invoke lab.hubble`")


def _preflight(cfg: LabConfig, skip_doctor: bool, no_download: bool) -> None:
    """Pinned tools, then the doctor: both before any side effect on a cluster."""
    from lab.bootstrap import REQUIRED, downloads_allowed, ensure_tools, lab_tools
    from lab.doctor import preflight

    log = logs.get("lab")
    tools = lab_tools(cfg, log)
    ensure_tools(cfg, tools, names=REQUIRED,
                 allow_download=downloads_allowed(cfg, no_download))
    if skip_doctor or os.environ.get("LAB_SKIP_DOCTOR") == "1":
        log.warning("doctor.skipped", reason="--skip-doctor" if skip_doctor else "LAB_SKIP_DOCTOR")
        return
    preflight(cfg, tools, log)


@task(help={
    "config": CONFIG_HELP,
    "cluster": "only this cluster (repeatable; default: every cluster of the lab)",
    "purge": "also remove the machine's shared image cache and its volumes (every lab's)",
    "log_format": LOG_HELP,
}, iterable=["cluster"])
def down(c: Context, config: str | None = None, cluster: list[str] | None = None,
         purge: bool = False, log_format: str | None = None) -> None:
    """Delete the lab's kind clusters and their records (the shared image cache stays)."""
    cfg = _setup(config, log_format)
    lab = _lab(cfg)
    names = cluster or [cl.name for cl in cfg.clusters]
    print(f"deleting kind cluster(s) {', '.join(names)} and their records under "
          f"{cfg.state_dir}")
    from lab.ui import Progress

    with Progress() as progress:
        lab.progress = progress
        removed = _guard(lambda: lab.down(cluster or None))
    print(f"✓ removed {', '.join(removed)}")
    if purge:
        from lab.tasks.cache import purge_cache

        purge_cache(cfg)


@task(help={
    "config": CONFIG_HELP,
    "json": "machine-readable output",
    "offline": "show the recorded verdicts without asking the clusters",
    "log_format": LOG_HELP,
})
def status(c: Context, config: str | None = None, json_: bool = False, offline: bool = False,
           log_format: str | None = None) -> None:
    """Per cluster: state, each gate's verdict, per-step durations."""
    cfg = _setup(config, log_format)
    rows = _guard(lambda: _lab(cfg).status(live=not offline))
    if json_:
        print(json.dumps(rows, indent=2))
        return
    _print_status(rows)


@task(help={
    "config": CONFIG_HELP,
    "out": "output directory (default: ./render)",
    "log_format": LOG_HELP,
})
def render(c: Context, config: str | None = None, out: str = "render",
           log_format: str | None = None) -> None:
    """Write everything the lab would apply, without Docker or a cluster."""
    cfg = _setup(config, log_format)
    written = _guard(lambda: _lab(cfg).render(Path(out)))
    for path in written:
        print(path)


# -- printing --------------------------------------------------------------------------------------

def _print_plan(plan: list[dict[str, Any]]) -> None:
    if not plan:
        print("nothing to do: every cluster is at or past the target")
    for item in plan:
        print(f"{item['cluster']}: {item['step']} — {item['title']}")
        for cmd in item["commands"]:
            # tool commands run as shown; the rest are API operations described in words
            shell = cmd.split()[0] in ("kind", "helm", "docker")
            print(f"    {'$ ' if shell else ''}{cmd}")
        for h in item["helm"]:
            print(f"    helm release {h}")
        for o in item["objects"]:
            print(f"    apply {o}")
    print("(dry run: nothing was changed)")


def _print_status(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(no_color="NO_COLOR" in os.environ or not sys.stdout.isatty())
    for row in rows:
        a = row["allocation"]
        title = (f"{row['cluster']} — state [bold]{row['state']}[/bold]  "
                 f"(id {a['id']}, pods {a['podCIDR']}, services {a['serviceCIDR']}, "
                 f"pool {a['lbPool'] or 'derived at apply'}, "
                 f"http {a['httpHostPort']}→{a['httpNodePort']}, "
                 f"https {a['httpsHostPort']}→{a['httpsNodePort']}, "
                 f"clustermesh {a['clustermeshNodePort']})")
        table = Table(title=title, title_justify="left")
        table.add_column("gate")
        table.add_column("check")
        table.add_column("ok")
        table.add_column("detail")
        table.add_column("took")
        for gate, verdict in row["gates"].items():
            took = row["durations"].get(gate)
            for i, check in enumerate(verdict.get("checks", [])):
                table.add_row(gate if i == 0 else "", check["name"],
                              "✓" if check["ok"] else "✗", check.get("detail", ""),
                              f"{took:.1f}s" if took is not None and i == 0 else "")
        console.print(table)
        if row.get("interrupted"):
            console.print(f"  ! the `{row['interrupted']}` transition was interrupted; "
                          "run `invoke lab.up --resume`")
        if row.get("configDrift"):
            console.print("  ! the config changed since the last `lab.up`; run it again")
    if rows:
        from lab.tasks.cache import cache_line

        console.print(cache_line(rows[0].get("imageCache") or {}), soft_wrap=True,
                      highlight=False)


LIFECYCLE_TASKS = (up, mesh, down, status, render)
