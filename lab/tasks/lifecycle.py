"""Lifecycle tasks: `lab.up`, `lab.mesh`, `lab.down`, `lab.status`, `lab.render`.

Thin: parse options, call the runner, print, map errors to Exit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from invoke.context import Context

from lab import logs
from lab.cli import CONFIG_HELP, LOG_OPTIONS, output, task
from lab.cli import guard as _guard
from lab.cli import setup as _setup
from lab.config import (
    SKIP_DOCTOR_ENV,
    LabConfig,
    env_flag,
    kubeconfig_from_env,
    resolve_config_path,
)


def _lab(cfg: LabConfig) -> Any:
    from lab.runner import Lab  # imported on use: keeps `invoke --list` fast

    return Lab(cfg, kubeconfig=kubeconfig_from_env())


UP_HELP = {
    "config": CONFIG_HELP,
    "to": "stop at this state: cluster, cni, gateway, certs, locked, meshed",
    "resume": "trust the record: re-probe completed steps, step back on drift, continue",
    "dry_run": "print what would run, in order (tool commands, API operations); change nothing",
    "cluster": "only this cluster (repeatable; default: all)",
    "skip_doctor": "skip the preflight checks (experts; logged)",
    "no_download": "never download pinned tools; report what to install instead",
    **LOG_OPTIONS,
}


@task(help=UP_HELP, iterable=["cluster"])
def up(c: Context, config: str | None = None, to: str | None = None, resume: bool = False,
       dry_run: bool = False, cluster: list[str] | None = None, skip_doctor: bool = False,
       no_download: bool = False, log_format: str | None = None, log_level: str | None = None,
       verbose: bool = False) -> None:
    """Bring the lab up (converges from wherever it is)."""
    cfg = _setup(config, log_format, log_level, verbose)
    _up(cfg, to, resume, dry_run, cluster, skip_doctor, no_download)


@task(help={k: v for k, v in UP_HELP.items() if k != "to"}, iterable=["cluster"])
def mesh(c: Context, config: str | None = None, resume: bool = False, dry_run: bool = False,
         cluster: list[str] | None = None, skip_doctor: bool = False, no_download: bool = False,
         log_format: str | None = None, log_level: str | None = None,
         verbose: bool = False) -> None:
    """Bring every cluster of a multi-cluster config up and join them with Cluster Mesh."""
    cfg = _setup(config, log_format, log_level, verbose)
    _up(cfg, "meshed", resume, dry_run, cluster, skip_doctor, no_download)


def _up(cfg: LabConfig, to: str | None, resume: bool, dry_run: bool,
        cluster: list[str] | None, skip_doctor: bool, no_download: bool) -> None:
    from lab.runner import check_target, default_target

    lab = _lab(cfg)
    # Every option is checked before tools are downloaded or anything is planned.
    _guard(lambda: check_target(cfg, to or default_target(cfg)))
    _guard(lambda: lab.chosen(cluster))
    if dry_run:
        plan = _guard(lambda: lab.plan(to, resume, cluster or None))
        with output():
            _print_plan(plan)
        return
    _guard(lambda: _preflight(cfg, skip_doctor, no_download))
    from lab.ui import Progress

    def converge() -> None:
        with Progress() as progress:
            lab.progress = progress
            lab.up(to, resume, cluster or None)

    _guard(converge)
    with output():
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
    """The doctor's host checks, then the pinned tools: both before any side effect."""
    from lab.bootstrap import REQUIRED, downloads_allowed, ensure_tools, lab_tools
    from lab.doctor import preflight

    log = logs.get("lab")
    tools = lab_tools(cfg, log)
    skip = skip_doctor or env_flag(SKIP_DOCTOR_ENV)
    if not skip:
        # Docker and the host first: a missing daemon is reported before anything is downloaded.
        # The tools' versions need no check of their own: ensure_tools installs the pins.
        preflight(cfg, tools, log, include_tools=False)
    ensure_tools(cfg, tools, names=REQUIRED,
                 allow_download=downloads_allowed(cfg, no_download))
    if skip:
        log.warning("doctor.skipped", reason="--skip-doctor" if skip_doctor else SKIP_DOCTOR_ENV)


@task(help={
    "config": CONFIG_HELP,
    "cluster": "only this cluster (repeatable; default: every cluster of the lab)",
    "purge": "also remove the machine's shared image cache and its volumes (every lab's)",
    **LOG_OPTIONS,
}, iterable=["cluster"])
def down(c: Context, config: str | None = None, cluster: list[str] | None = None,
         purge: bool = False, log_format: str | None = None, log_level: str | None = None,
         verbose: bool = False) -> None:
    """Delete the lab's kind clusters and their records (the shared image cache stays)."""
    cfg = _setup(config, log_format, log_level, verbose)
    lab = _lab(cfg)
    names = [cl.name for cl in _guard(lambda: lab.chosen(cluster))]
    with output():
        print(f"deleting kind cluster(s) {', '.join(names)} and their records under "
              f"{cfg.state_dir}")
    from lab.ui import Progress

    def delete() -> tuple[list[str], list[str]]:
        with Progress() as progress:
            lab.progress = progress
            result: tuple[list[str], list[str]] = lab.down(cluster or None)
            return result

    removed, absent = _guard(delete)
    with output():
        if removed:
            print(f"✓ removed {', '.join(removed)}")
        if absent:
            print(f"✓ nothing to delete for {', '.join(absent)}: no kind cluster and no record")
    if purge:
        from lab.tasks.cache import purge_cache

        purge_cache(cfg)


@task(help={
    "config": CONFIG_HELP,
    "json": "machine-readable output",
    "offline": "show the recorded verdicts without asking the clusters",
    **LOG_OPTIONS,
})
def status(c: Context, config: str | None = None, json_: bool = False, offline: bool = False,
           log_format: str | None = None, log_level: str | None = None,
           verbose: bool = False) -> None:
    """Per cluster: state, each gate's verdict, per-step durations."""
    cfg = _setup(config, log_format, log_level, verbose)
    rows = _guard(lambda: _lab(cfg).status(live=not offline))
    with output():
        if json_:
            print(json.dumps(rows, indent=2))
            return
        _print_status(cfg, rows)


@task(help={
    "config": CONFIG_HELP,
    "out": "output directory (default: ./render)",
    **LOG_OPTIONS,
})
def render(c: Context, config: str | None = None, out: str = "render",
           log_format: str | None = None, log_level: str | None = None,
           verbose: bool = False) -> None:
    """Write everything the lab would apply, without Docker or a cluster."""
    cfg = _setup(config, log_format, log_level, verbose)
    written = _guard(lambda: _lab(cfg).render(Path(out)))
    with output():
        for path in written:
            print(path)


# -- printing --------------------------------------------------------------------------------------

def _print_plan(plan: list[dict[str, Any]]) -> None:
    if not plan:
        print("nothing to do: every cluster is at or past the target")
    for item in plan:
        print(f"{item['cluster']}: {item['step']} — {item['title']}")
        for action in item["actions"]:
            # tool commands run as shown; the rest are API operations described in words
            program = next(w for w in action.split() if "=" not in w)  # after VAR=value
            shell = program in ("kind", "helm", "docker")
            print(f"    {'$ ' if shell else ''}{action}")
    print("(dry run: nothing was changed)")


def _print_status(cfg: LabConfig, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    tty = sys.stdout.isatty()
    console = Console(no_color=logs.no_color() or not tty)

    def say(text: str, indent: int = 0) -> None:
        """Folded at word boundaries, indented, on a terminal; one line each in a pipe."""
        if tty:
            console.print(Padding(Text.from_markup(text), (0, 0, 0, indent)))
        else:
            print(" " * indent + Text.from_markup(text).plain)

    for row in rows:
        a = row["allocation"]
        # The title is printed on its own: as a table title it would wrap at the table's width.
        say(f"[bold]{row['cluster']}[/bold] — state [bold]{row['state']}[/bold]")
        say(f"id {a['id']}, pods {a['podCIDR']}, services {a['serviceCIDR']}, "
            f"pool {a['lbPool'] or 'derived at apply'}, "
            f"http {a['httpHostPort']}→{a['httpNodePort']}, "
            f"https {a['httpsHostPort']}→{a['httpsNodePort']}, "
            f"clustermesh {a['clustermeshNodePort']}", 2)
        if row["state"] == "absent" and not row["gates"]:
            start = "invoke lab.mesh" if cfg.is_mesh else "invoke lab.up"
            if cfg.path != resolve_config_path(None):  # the config a bare command reads
                start += f" --config {cfg.path}"
            say(f"no cluster yet: `{start}` creates it", 2)
            continue
        table = Table()
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
