"""Tool tasks: `lab.tools` (pinned, checksum-verified kind/helm/Cilium CLI) and `lab.doctor`
(preflight checks, each with its fix)."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

from invoke.context import Context
from invoke.exceptions import Exit

from lab import logs
from lab.bootstrap import (
    ALL_TOOLS,
    NO_DOWNLOAD_ENV,
    REQUIRED,
    TITLES,
    downloads_allowed,
    downloads_forbidden_by_env,
    ensure_tools,
    lab_tools,
    pinned_versions,
    tools_dir,
)
from lab.cli import CONFIG_HELP, LOG_OPTIONS, setup_logging, task
from lab.cli import guard as _guard
from lab.cli import setup as _setup
from lab.doctor import Finding, recorded_states, run_checks, to_json
from lab.errors import LabError

if TYPE_CHECKING:
    from rich.console import Console

MARKS = {"ok": "✓ ok", "warn": "! warn", "fail": "✗ fail"}


@task(help={
    "config": CONFIG_HELP,
    "json": "print {ok, findings} as JSON (for CI); exit code 1 when a check fails",
    **LOG_OPTIONS,
})
def doctor(c: Context, config: str | None = None, json_: bool = False,
           log_format: str | None = None,
           log_level: str | None = None, verbose: bool = False) -> None:
    """Preflight checks, each with its verdict, what was found and the fix."""
    cfg = _setup(config, log_format, log_level, verbose)
    tools = lab_tools(cfg, logs.get("lab"))
    findings = _guard(lambda: run_checks(cfg, tools, states=recorded_states(cfg)))
    failed = [f for f in findings if f.verdict == "fail"]
    if json_:
        print(json.dumps(to_json(findings), indent=2))
        if failed:
            raise Exit(code=1)
        return
    _print_findings(findings)
    if failed:
        raise Exit(f"✗ {len(failed)} check(s) failed: apply the fixes above, then run "
                   "`invoke lab.doctor` again", code=1)
    warned = sum(f.verdict == "warn" for f in findings)
    print("✓ ready for `invoke lab.up`" + (f" ({warned} warning(s) above)" if warned else ""))


@task(help={
    "config": CONFIG_HELP,
    "no_download": f"never download: report what to install instead (also {NO_DOWNLOAD_ENV}=1)",
    "envtest": "instead: the envtest kube-apiserver/etcd/kubectl the test suite's real-API "
               "tier runs (controller-tools release, SHA-512 verified); prints KUBEBUILDER_ASSETS",
    **LOG_OPTIONS,
})
def tools(c: Context, config: str | None = None, no_download: bool = False,
          envtest: bool = False, log_format: str | None = None,
          log_level: str | None = None, verbose: bool = False) -> None:
    """Install the pinned kind, helm and Cilium CLI (SHA-256 verified) into the tools directory
    shared by every lab ($LAB_TOOLS_DIR, else ~/.cache/kind-cilium-lab/bin)."""
    if envtest:  # for the test suite: needs no lab config
        setup_logging(log_format, log_level, verbose)
        _envtest(allow=not no_download and not downloads_forbidden_by_env())
        return
    cfg = _setup(config, log_format, log_level, verbose)
    lab = lab_tools(cfg, logs.get("lab"))
    allow = downloads_allowed(cfg, no_download)
    installed = _guard(lambda: ensure_tools(cfg, lab, allow_download=allow))
    pinned = pinned_versions(cfg)
    rows: list[tuple[str, str, str, str, str]] = []
    for name in ALL_TOOLS:
        path = lab.which(name)
        try:
            have = lab.version(name) if path else None
        except LabError:
            have = None
        if f"{name} {pinned[name]}" in installed:
            status = "installed now"
        elif path is None:
            status = "missing" + ("" if name in REQUIRED else " (optional)")
        else:
            status = "ok" if have == pinned[name] else "wrong version"
        rows.append((TITLES[name], pinned[name], have or "-", path or "-", status))
    _print_tools(rows)
    bin_dir = lab.bin_dir or tools_dir()
    if any(r[3].startswith(str(bin_dir)) for r in rows):
        print(f"the lab uses {bin_dir} first; to use them in your shell: "
              f'export PATH="{bin_dir}:$PATH"')


def _envtest(allow: bool) -> None:
    import shlex

    from lab import envtest_assets

    folder = envtest_assets.assets_dir()
    if not allow and not envtest_assets.is_installed(folder):
        raise Exit(f"✗ envtest v{envtest_assets.ENVTEST_VERSION} is not in {folder} and "
                   "downloads are off\n  → allow downloads, or set KUBEBUILDER_ASSETS to a folder "
                   "with kube-apiserver and etcd", code=1)
    folder = _guard(lambda: envtest_assets.ensure_envtest())
    print(f"KUBEBUILDER_ASSETS={shlex.quote(str(folder))}")


TOOL_TASKS = (tools, doctor)


# -- printing --------------------------------------------------------------------------------------

def _console() -> Console:
    from rich.console import Console

    return Console(no_color="NO_COLOR" in os.environ or not sys.stdout.isatty(),
                   width=None if sys.stdout.isatty() else 160)


def _print_findings(findings: list[Finding]) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title="lab.doctor", title_justify="left")
    table.add_column("check", overflow="fold")
    table.add_column("verdict", no_wrap=True)
    table.add_column("found", overflow="fold")
    table.add_column("fix", overflow="fold")
    for f in findings:
        table.add_row(f.name, MARKS[f.verdict], f.found, f.fix if f.verdict != "ok" else "",
                      style={"ok": "", "warn": "yellow", "fail": "red"}[f.verdict])
    console.print(table)


def _print_tools(rows: list[tuple[str, str, str, str, str]]) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title="lab.tools", title_justify="left")
    for col in ("tool", "pinned", "found", "path", "status"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
