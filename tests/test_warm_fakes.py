"""The warm fake server (fakes/warmfakes.py): a fake call handed to it behaves as one started fresh.

The judge is the same call started fresh (no ``LAB_FAKE_WARM``), and hand-written expectations:
what the caller sees (exit status, stdout, stderr), what the fake saw of its process (arguments,
directory, environment, stdin) and what it left in its state, including when it is killed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import fake_env, read_calls
from tests.fakes.fakelib import wait_until_sleeping
from tests.fakes.warmfakes import NATIVE_ENV, WARM_ENV, WarmFakeServer, build_native_launchers

KIND_CONFIG = """kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
- role: worker
"""

# A fresh clone's first steps: an empty docker, a cluster from stdin, helm against it, failures.
CALLS: list[tuple[list[str], str]] = [
    (["kind", "get", "clusters"], ""),
    (["kind", "create", "cluster", "--name", "demo", "--config", "-"], KIND_CONFIG),
    (["kind", "get", "nodes", "--name", "demo"], ""),
    # CRLF on stdin reaches the fake untranslated (kind.json keeps the config's text)
    (["kind", "create", "cluster", "--name", "crlf", "--config", "-"],
     KIND_CONFIG.replace("\n", "\r\n")),
    (["docker", "ps", "--format", "{{.Names}}"], ""),
    (["docker", "network", "inspect", "kind", "--format", "{{json .IPAM.Config}}"], ""),
    (["helm", "version", "--short"], ""),
    (["helm", "list", "--all-namespaces", "--kube-context", "kind-demo"], ""),
    (["helm", "frobnicate"], ""),
    (["kind", "delete", "cluster", "--name", "nope"], ""),
    (["docker", "info", "--format", "{{.ServerVersion}}"], ""),
]
# fake call records that differ between any two runs: when, by which process
RUN_SPECIFIC = ("time", "pid")
# random or time-stamped in every run: container ids, MAC addresses, creation times
RUN_SPECIFIC_TEXT = [(re.compile(r"\b[0-9a-f]{12,64}\b"), "<id>"),
                     (re.compile(r"\b02:42(:[0-9a-f]{2}){4}\b"), "<mac>"),
                     (re.compile(r"\b1[0-9]{9}\.[0-9]+\b"), "<time>"),
                     (re.compile(r"\d{4}-\d\d-\d\dT[0-9:.]+Z"), "<time>")]


def normalized(text: str, state: Path | None = None, cwd: Path | None = None) -> str:
    for pattern, stands_for in RUN_SPECIFIC_TEXT:
        text = pattern.sub(stands_for, text)
    for path, stands_for in ((state, "<state>"), (cwd, "<cwd>")):
        if path is not None:
            text = text.replace(str(path), stands_for)
    return text


@pytest.fixture(scope="module")
def server() -> Any:
    if not sys.platform.startswith("linux"):
        pytest.skip("the warm fake server runs on Linux only (elsewhere every fake starts fresh)")
    # a variable only the server has: a call must see its caller's environment alone
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KIND_CLUSTER_NAME", "the-servers-own")
        server = WarmFakeServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def native_bin(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """The C launchers, built as the session builds them (None without a C compiler)."""
    return build_native_launchers(str(tmp_path_factory.mktemp("native")))


@pytest.fixture(params=["python", "native"])
def launcher(request: pytest.FixtureRequest, native_bin: str | None) -> str | None:
    """The launcher a call goes through: the directory on PATH before tests/fakes/bin."""
    if request.param == "python":
        return None
    if native_bin is None:
        pytest.skip("no C compiler: the fakes use their Python launcher here")
    return native_bin


def env_for(state: Path, server: WarmFakeServer | None, launcher: str | None = None,
            **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (WARM_ENV, NATIVE_ENV, "KIND_CLUSTER_NAME")}
    env = fake_env(str(state), env, KUBECONFIG=str(state / "kubeconfig"), **extra)
    path = [p for p in env["PATH"].split(os.pathsep) if p != os.environ.get(NATIVE_ENV)]
    env["PATH"] = os.pathsep.join([launcher, *path] if launcher else path)
    if server is not None:
        env[WARM_ENV] = server.address
    return env


def walk(tmp_path: Path, server: WarmFakeServer | None, launcher: str | None = None
         ) -> dict[str, Any]:
    """Run CALLS from a directory of their own; what the caller saw and the fake left."""
    state = tmp_path / ("warm" if server else "fresh")
    cwd = tmp_path / ("cwd-warm" if server else "cwd-fresh")
    cwd.mkdir()
    env = env_for(state, server, launcher, PROBE="x")
    seen = []
    pids = []
    for argv, stdin in CALLS:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, text=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(stdin, timeout=30)
        seen.append((argv, proc.returncode, normalized(out), normalized(err)))
        pids.append(proc.pid)
    calls = read_calls(str(state))
    assert {c["cwd"] for c in calls} == {str(cwd)}
    kept = [{k: v for k, v in c.items() if k not in RUN_SPECIFIC} for c in calls]
    return {"seen": seen, "calls": [json.loads(normalized(json.dumps(c), state, cwd))
                                    for c in kept],
            "state": {p.name: normalized(p.read_text(), state, cwd)
                      for p in sorted(state.glob("*.json"))},
            "fake_pids": [c["pid"] for c in calls], "caller_pids": pids}


def test_a_call_handed_over_is_the_call_started_fresh(tmp_path: Path, server: WarmFakeServer,
                                                     launcher: str | None) -> None:
    if launcher is not None:
        found = shutil.which("kind", path=env_for(tmp_path, server, launcher)["PATH"])
        assert found == os.path.join(launcher, "kind")
    fresh = walk(tmp_path, None)
    handed = walk(tmp_path, server, launcher)
    assert handed["seen"] == fresh["seen"]
    assert handed["calls"] == fresh["calls"]
    assert handed["state"] == fresh["state"]
    assert set(handed["state"]) >= {"kind.json", "docker.json"}
    # the calls really were handed over: each ran in a process of the server's, not the caller
    assert fresh["fake_pids"] == fresh["caller_pids"]
    assert not set(handed["fake_pids"]) & set(handed["caller_pids"])
    # and what a fresh call says, written down
    by_argv = {tuple(argv): (code, out, err) for argv, code, out, err in handed["seen"]}
    assert by_argv[("kind", "get", "clusters")] == (0, "", "No kind clusters found.\n")
    assert by_argv[("kind", "get", "nodes", "--name", "demo")][:2] == (
        0, "demo-control-plane\ndemo-worker\n")
    assert by_argv[("helm", "frobnicate")][0] == 1
    assert 'unknown command "frobnicate" for "helm"' in by_argv[("helm", "frobnicate")][2]
    assert [c["argv"] for c in handed["calls"]] == [argv[1:] for argv, _ in CALLS]
    assert all(c["env"]["KUBECONFIG"] == "<state>/kubeconfig" and c["cwd"] == "<cwd>"
               for c in handed["calls"])


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
def test_exit_status_and_signals_reach_the_caller(tmp_path: Path, server: WarmFakeServer,
                                                  warm: bool, launcher: str | None) -> None:
    env = env_for(tmp_path, server if warm else None, launcher, LAB_FAKE_FAIL="helm:version")
    failed = subprocess.run(["helm", "version"], env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert failed.returncode == 1
    env = env_for(tmp_path, server if warm else None, launcher, LAB_FAKE_SLEEP="kind:create=30")
    proc = subprocess.Popen(["kind", "create", "cluster", "--name", "sig"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    call = wait_until_sleeping(tmp_path, "kind", ["create"])
    assert (call["pid"] == proc.pid) is not warm
    os.kill(call["pid"], signal.SIGTERM)  # the fake itself, wherever it runs
    assert proc.wait(10) == -signal.SIGTERM


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
def test_a_killed_caller_takes_the_call_with_it(tmp_path: Path, server: WarmFakeServer,
                                               warm: bool, launcher: str | None) -> None:
    env = env_for(tmp_path, server if warm else None, launcher, LAB_FAKE_SLEEP="kind:create=30")
    subprocess.run(["kind", "get", "clusters"], env=env, check=True, capture_output=True,
                   timeout=30)
    proc = subprocess.Popen(["kind", "create", "cluster", "--name", "k"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    call = wait_until_sleeping(tmp_path, "kind", ["create"])
    proc.kill()  # what a killed `lab.up` does to the kind it waits for
    assert proc.wait(10) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while _alive(call["pid"]):
        assert time.monotonic() < deadline, "the fake outlived its killed caller"
        time.sleep(0.01)
    ends = [json.loads(line) for line in (tmp_path / "ends.jsonl").read_text().splitlines()]
    assert [e["pid"] for e in ends] != [] and call["pid"] not in [e["pid"] for e in ends]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead; only its parent (the server, or our Popen) has yet to reap it
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # reaped meanwhile
        return False


def test_without_a_server_or_stdio_the_call_runs_fresh(tmp_path: Path, server: WarmFakeServer,
                                                       launcher: str | None) -> None:
    gone = env_for(tmp_path, None, launcher)
    gone[WARM_ENV] = str(tmp_path / "no-such-socket")
    closed_stdin = ["sh", "-c", "exec kind get clusters <&-"]
    for argv, env in ((["kind", "get", "clusters"], gone),
                      (closed_stdin, env_for(tmp_path, server, launcher))):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out, err) == (0, "", "No kind clusters found.\n")
        # it ran in the caller: the Python launcher itself, or what the C one exec'd
        assert read_calls(str(tmp_path))[-1]["pid"] == proc.pid
