"""The README's command list, walked top to bottom through the real tasks against simulated
clusters on real API servers: one cluster and a two-cluster mesh, as a new user would run them.

Its own module so that it shares an xdist worker with the mesh tests: both lease two real API
servers at once, which a worker then starts only once.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.simcluster import SimLab, make_lab
from tests.support.upstream import require_upstream
from tests.test_first_run import (
    README,
    Recorder,
    assert_plan_is_the_real_order,
    plan_of,
)

# -- the README, top to bottom ---------------------------------------------------------------------

MESH_CONFIG = "--config config/mesh.yaml"  # what the README's mesh commands add

# Commands of the README's code blocks that are not the lab's: the test suite and its sessions.
NOT_LAB_COMMANDS = ("pip install -e '.[dev]'", "python -m pytest -q -n auto", "nox", "nox -s e2e",
                    "nox -s e2e -- --mesh", "nox -s bench", "nox -s oracle")


# "Check your own policy" shows how to onboard and verify an application of your own (`shop`),
# which the README leaves to the reader to deploy: walked by the tests of lab.onboard/lab.verify.
YOUR_APPLICATION = (
    "invoke lab.onboard db --namespace shop --port 5432 --from app:shop/app.kubernetes.io/name=api",
    "invoke lab.onboard api --namespace shop --port 8080 --host api "
    "--egress app:shop/app.kubernetes.io/name=db:5432",
    "invoke lab.verify --flows shop-flows.yaml --map shop.svg")


def readme_commands() -> list[str]:
    """Every command of README.md's ```bash blocks, top to bottom (comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = re.split(r"\s{2,}#", line)[0].strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, within: float = 30) -> bytes:
    """GET, retried while the port-forward starts listening."""
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: bytes = response.read()
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_readme_command_list_walked_top_to_bottom(tmp_path: Path, envtest_pool: Any) -> None:
    require_upstream()
    commands = readme_commands()
    assert commands[:2] == ["pip install -e '.[dev]'", "invoke lab.up"]
    # The README takes the one-cluster lab down before it builds the mesh, so the mesh is walked
    # on servers leased after the first lab's are back (a worker starts two, not three).
    first_mesh = next(i for i, c in enumerate(commands) if MESH_CONFIG in c)
    walked = []
    with envtest_pool.lease(1) as servers:
        single = make_lab(tmp_path / "single", servers)
        walked += _walk_readme(single, commands[:first_mesh], mesh=False)
    with envtest_pool.lease(2) as servers:
        mesh = make_lab(tmp_path / "mesh", servers, "config/mesh.yaml",
                        [{"name": "east"}, {"name": "west"}])
        walked += _walk_readme(mesh, commands[first_mesh:], mesh=True)
    assert walked == ["invoke lab.up", "invoke lab.status", "invoke lab.trust",
                      "curl --cacert .lab/lab-ca.crt https://echo.localhost:30443/",
                      "invoke lab.hubble", "invoke lab.hubble --observe --verdict DROPPED",
                      "invoke lab.down", "invoke lab.mesh --config config/mesh.yaml"]


def _walk_readme(lab: SimLab, commands: list[str], *, mesh: bool) -> list[str]:
    """Run ``commands`` on ``lab`` (the mesh's: each lab command names its config), checking
    what each says and does; returns the commands walked."""
    env = lab.env
    recorder = Recorder(lab)
    walked = []
    try:
        if mesh:  # `--config config/mesh.yaml` from the folder it is run in: the sims' copy
            (env.root / "config").mkdir()
            (env.root / "config" / "mesh.yaml").write_text(env.config.read_text())
        for command in commands:
            if command in NOT_LAB_COMMANDS or command in YOUR_APPLICATION:
                continue
            walked.append(command)
            words = command.split()
            if words[0] == "curl":
                port = str(lab.sims["lab"].https_port)  # the https host port of this lab
                url = words[-1].replace(":30443", f":{port}")
                proc = subprocess.run([*words[:-1], "--silent", "--show-error", url],
                                      cwd=env.root, capture_output=True, text=True, timeout=30,
                                      check=False)
                assert proc.returncode == 0, (command, proc.stderr)
                continue
            assert words[0] == "invoke", f"README command not walked: {command}"
            assert (MESH_CONFIG in command) == mesh, f"{command}: the other lab's command"
            args = words[1:]
            if args == ["lab.hubble"]:
                port = free_port()
                proc_ui = env.start(*args, "--port", str(port), PYTHONUNBUFFERED="1")
                try:
                    assert proc_ui.stdout is not None
                    ready, _, _ = select.select([proc_ui.stdout], [], [], 60)
                    line = proc_ui.stdout.readline() if ready else ""
                    assert f"http://127.0.0.1:{port}" in line, line
                    assert b"Hubble UI" in http_get(f"http://127.0.0.1:{port}/")
                finally:
                    os.killpg(proc_ui.pid, signal.SIGINT)
                assert proc_ui.wait(30) == 0  # Ctrl-C stops it: not a failure
                continue
            if args[0] in ("lab.up", "lab.mesh"):
                plan = plan_of(env.run(*args, "--dry-run").stdout)
                start = time.time()
            proc = env.run(*args, timeout=240)
            out = proc.stdout
            if args[0] in ("lab.up", "lab.mesh"):
                done = recorder.since(start)
                assert_plan_is_the_real_order(plan, done)
            if args[0] == "lab.mesh":
                assert "✓ lab is up (east, west)" in out
                # `meshed` starts only once every cluster is at `locked`
                firsts = {c: done[c].index(next(a for s, a in plan[c] if s == "meshed"))
                          for c in plan}
                lasts = {c: done[c].index([a for s, a in plan[c] if s == "locked"][-1])
                         for c in plan}
                assert all(firsts[c] > lasts[c] for c in plan)
            elif args == ["lab.up"]:
                assert "✓ lab is up (lab)" in out and env.record()["state"] == "locked"
            elif args == ["lab.status"]:
                assert "lab — state locked" in out and "✗" not in out
            elif args == ["lab.trust"]:
                assert (env.root / ".lab" / "lab-ca.crt").is_file()
            elif args[:2] == ["lab.hubble", "--observe"]:
                assert "DROPPED" in out
            elif args == ["lab.down"]:
                assert "✓ removed lab" in out and not (env.root / ".lab" / "clusters" /
                                                        "lab.json").exists()
        lab.check()
    finally:
        lab.close()
    return walked
