"""Every module imports on its own (no import cycles), every task answers --help, and
`invoke --list` never imports the kubernetes client (it costs ~0.5 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for p in (REPO / "lab").rglob("*.py"))


def test_each_module_imports_first_in_a_fresh_interpreter() -> None:
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    for m in [k for k in sys.modules if k == 'lab' or k.startswith('lab.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n")
    proc = subprocess.run([sys.executable, "-c", code, *MODULES], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _tasks() -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  lab.")]


def test_task_list_is_complete() -> None:
    assert set(_tasks()) == {"lab.up", "lab.mesh", "lab.down", "lab.status", "lab.render",
                             "lab.doctor", "lab.tools", "lab.hubble", "lab.trust",
                             "lab.onboard", "lab.verify", "lab.map", "lab.cache"}


@pytest.mark.parametrize("task", sorted({"lab.up", "lab.mesh", "lab.down", "lab.status",
                                         "lab.render", "lab.doctor", "lab.tools", "lab.hubble",
                                         "lab.trust", "lab.onboard", "lab.verify",
                                         "lab.map", "lab.cache"}))
def test_every_option_has_help(task: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "invoke", "--help", task], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    # option lines are indented by two spaces; wrapped help text is indented further
    options = [line for line in proc.stdout.splitlines()
               if line.startswith("  -") and not line.startswith("   ")]
    assert options
    for line in options:
        # invoke prints flags, then two or more spaces, then the option's help text
        import re

        assert len(re.split(r"\s{2,}", line.strip())) >= 2, f"{task}: option without help: {line}"


def _python(code: str) -> str:
    """What a fresh interpreter prints running ``code`` in the repository."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True).stdout


def test_invoke_list_does_not_import_the_kubernetes_client() -> None:
    code = ("import sys, runpy\n"
            "sys.argv = ['invoke', '--list']\n"
            "try:\n"
            "    runpy.run_module('invoke', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('kubernetes' in sys.modules, 'transitions' in sys.modules)\n")
    assert _python(code).strip().splitlines()[-1].split()[0] == "False"


def test_task_modules_are_named_for_what_their_tasks_do() -> None:
    """lab/tasks/<module>.py holds exactly the tasks a user reaches for that kind of work."""
    from lab.tasks import access, apps, cache, checks, lifecycle, tools

    layout = {mod.__name__.rsplit(".", 1)[-1]: sorted(t.name for t in tasks) for mod, tasks in (
        (lifecycle, lifecycle.LIFECYCLE_TASKS), (tools, tools.TOOL_TASKS),
        (access, access.ACCESS_TASKS), (apps, apps.APP_TASKS), (checks, checks.CHECK_TASKS),
        (cache, cache.CACHE_TASKS))}
    assert layout == {"lifecycle": ["down", "mesh", "render", "status", "up"],
                      "tools": ["doctor", "tools"], "access": ["hubble", "trust"],
                      "apps": ["onboard"], "checks": ["map", "verify"], "cache": ["cache"]}


@pytest.mark.parametrize("task", ["lab.up", "lab.mesh", "lab.down", "lab.status", "lab.render"])
def test_lifecycle_tasks_take_log_level_and_verbose(task: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "invoke", "--help", task], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    assert "--log-level=STRING" in proc.stdout and "-v, --verbose" in proc.stdout, proc.stdout


def test_logging_leaves_rich_out_yet_the_console_prints_a_traceback() -> None:
    """structlog would import rich (~0.1 s of every task's start) for tracebacks we print plain;
    rich itself still imports afterwards for the live view."""
    code = ("import sys, io\n"
            "from lab import logs\n"
            "print('rich' in sys.modules)\n"
            "out = io.StringIO()\n"
            "logs.configure('console', 'info', stream=out)\n"
            "try:\n"
            "    1 / 0\n"
            "except ZeroDivisionError:\n"
            "    logs.get('t').exception('boom')\n"
            "print('ZeroDivisionError' in out.getvalue())\n"
            "import rich.console\n"
            "print('rich' in sys.modules)\n")
    assert _python(code).split() == ["False", "True", "True"]
