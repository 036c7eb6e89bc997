"""The warm interpreter (support/warm.py): a task forked from it behaves as one started fresh.

The judge is a fresh `python -m invoke` run of the same task: what it sees of its process
(environment, import-time settings, stdio, directory, session, exit status) must be the same."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import warm

PROBE_TASKS = '''
import json, os, sys, time
from invoke import task

@task
def show(c):
    import kubernetes.config.kube_config as kube_config
    import structlog._config as structlog_config
    print(json.dumps({
        "kubeconfig_default": kube_config.KUBE_CONFIG_DEFAULT_LOCATION,
        "structlog_no_colors": structlog_config._no_colors,
        "structlog_force_colors": structlog_config._force_colors,
        "env": {k: os.environ.get(k) for k in ("KUBECONFIG", "NO_COLOR", "PROBE")},
        "cwd": os.getcwd(),
        "path": sys.path,
        "argv0": os.path.basename(sys.argv[0]),
        "stdin": sys.stdin.read(),
        "stdout_line_buffering": sys.stdout.line_buffering,
        "stderr_line_buffering": sys.stderr.line_buffering,
        "session_leader": os.getsid(0) == os.getpid(),
    }, sort_keys=True))
    print("to stderr", file=sys.stderr)

@task
def fail(c, code=3):
    sys.exit(int(code))

@task
def hang(c):
    print("started", flush=True)
    time.sleep(60)
'''


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    root = tmp_path / "tasks"
    root.mkdir()
    (root / "tasks.py").write_text(PROBE_TASKS)
    return root


def command(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "invoke", "--search-root", str(root), *args]


def both(root: Path, *args: str, **kwargs: Any) -> tuple[subprocess.CompletedProcess[str], ...]:
    """The same task, fresh and warm."""
    cold = subprocess.run(command(root, *args), capture_output=True, text=True, timeout=60,
                          check=False, **kwargs)
    hot = warm.run(command(root, *args), capture_output=True, text=True, timeout=60, **kwargs)
    assert isinstance(hot, subprocess.CompletedProcess)
    return cold, hot


def test_a_warm_task_sees_what_a_fresh_one_sees(probe: Path, tmp_path: Path) -> None:
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig"), "NO_COLOR": "1",
           "PROBE": "yes"}
    env.pop("FORCE_COLOR", None)
    cold, hot = both(probe, "show", cwd=tmp_path, env=env, input="from stdin\r\nline two")
    assert cold.returncode == hot.returncode == 0, (cold.stderr, hot.stderr)
    seen_cold, seen_hot = json.loads(cold.stdout), json.loads(hot.stdout)
    assert seen_hot == seen_cold
    assert hot.stderr == cold.stderr == "to stderr\n"
    # and what that is, by hand: the warm interpreter started with other settings
    assert seen_hot["kubeconfig_default"] == str(tmp_path / "kubeconfig")
    assert seen_hot["structlog_no_colors"] is True
    assert seen_hot["env"] == {"KUBECONFIG": str(tmp_path / "kubeconfig"), "NO_COLOR": "1",
                               "PROBE": "yes"}
    assert seen_hot["cwd"] == str(tmp_path)
    assert seen_hot["stdin"] == "from stdin\r\nline two"  # no newline translation
    assert seen_hot["session_leader"] is False


def test_a_warm_task_runs_in_the_warm_interpreter(probe: Path, tmp_path: Path) -> None:
    hot = warm.popen(command(probe, "show"), cwd=tmp_path, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    hot.communicate(timeout=60)
    assert isinstance(hot, warm.WarmPopen)
    assert hot.returncode == 0
    # its parent is the warm interpreter, not this process
    assert warm.WarmInterpreter.get().process.pid != os.getpid()


def test_exit_status_and_a_new_session_killed_at_once(probe: Path, tmp_path: Path) -> None:
    cold, hot = both(probe, "fail", "--code", "7", cwd=tmp_path)
    assert cold.returncode == hot.returncode == 7

    proc = warm.popen(command(probe, "hang"), cwd=tmp_path, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert isinstance(proc, warm.WarmPopen)
    assert os.getpgid(proc.pid) == proc.pid  # its own group before Popen returns, as with Popen
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


def test_a_timeout_kills_the_task(probe: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        warm.run(command(probe, "hang"), capture_output=True, text=True, timeout=1,
                 cwd=tmp_path)
    assert time.monotonic() - started < 15


def test_cold_on_request_and_for_other_commands(probe: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    other = warm.popen([sys.executable, "-c", "pass"])
    other.wait(30)
    assert type(other) is subprocess.Popen
    monkeypatch.setenv(warm.COLD_ENV, "1")
    cold = warm.popen(command(probe, "fail"), cwd=tmp_path, stderr=subprocess.DEVNULL)
    assert type(cold) is subprocess.Popen
    assert cold.wait(60) == 3
