"""A new user's first contact, through the real tasks (`invoke lab.*` subprocesses) and the fakes.

Bad input is refused before any side effect with what to change, and never as a traceback; each
error is said once (the ✗ / → lines on a terminal, one JSON event otherwise); nothing to do is
not an error; a minimal config gets the README's defaults; the dry-run plan is the order a real
`lab.up` runs in; and the README's command list runs top to bottom.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import FAKE_BIN, REPO, LabEnv, write_config
from tests.support.simcluster import SimLab, make_lab
from tests.support.upstream import require_upstream

README = (REPO / "README.md").read_text()
# kind v0.29.0's default node image (kind pkg/apis/config/defaults/image.go at v0.29.0)
KIND_NODE_IMAGE = ("kindest/node:v1.33.1@sha256:"
                   "050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def without_fakes() -> str:
    """PATH with no kind, helm or docker: a machine where nothing is installed yet."""
    return os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p != str(FAKE_BIN) and not (Path(p) / "kind").exists())


def failure_events(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    events = []
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "failed":
                events.append(event)
    return events


def said_once(proc: subprocess.CompletedProcess[str]) -> str:
    """The one error of a task run with JSON logs: exactly one `failed` event, no ✗ line for it,
    no traceback. Returns "error → hint"."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    (event,) = failure_events(proc)
    assert not [line for line in proc.stderr.splitlines() if line.startswith("✗ ")
                and event["error"].splitlines()[0] in line], proc.stderr
    return f"{event['error']} → {event.get('hint', '')}"


def nothing_happened(env: LabEnv) -> None:
    assert env.calls() == [], "a tool ran before the bad input was refused"
    assert not env.state_dir.exists(), "the state dir was touched before the bad input was refused"


# -- 1. bad input: refused before any side effect, with what to change -----------------------------

BAD_ENVIRONMENT = [
    ("LAB_GATE_TIMEOUT", "abc", "LAB_GATE_TIMEOUT='abc' is not a positive number of seconds",
     "e.g. LAB_GATE_TIMEOUT=600"),
    ("LAB_LOG_FORMAT", "xml", "unknown log format in LAB_LOG_FORMAT='xml'",
     "use one of: json, console"),
    ("LAB_LOG_LEVEL", "loud", "unknown log level in LAB_LOG_LEVEL='loud'",
     "use one of: debug, info, warning, error, critical"),
    ("LAB_NO_DOWNLOAD", "maybe", "LAB_NO_DOWNLOAD='maybe' is not a yes/no value",
     "set LAB_NO_DOWNLOAD=1"),
    ("LAB_SKIP_DOCTOR", "sometimes", "LAB_SKIP_DOCTOR='sometimes' is not a yes/no value",
     "set LAB_SKIP_DOCTOR=1"),
    ("LAB_KUBECONFIG", "{root}", "LAB_KUBECONFIG='{root}' is not a file (it is a directory)",
     "point it at a kubeconfig file"),
    ("LAB_TOOLS_DIR", "{root}/lab.yaml", "LAB_TOOLS_DIR='{root}/lab.yaml' is not a directory",
     "point it at a directory"),
    ("LAB_CONFIG", "{root}/nope.yaml", "{root}/nope.yaml: file not found (from LAB_CONFIG)",
     "pass --config PATH"),
]


@pytest.mark.parametrize(("name", "value", "said", "fix"), BAD_ENVIRONMENT,
                         ids=[f"{n}={v}" for n, v, _, _ in BAD_ENVIRONMENT])
def test_a_bad_environment_variable_is_refused_with_what_to_change(
        lab_env: LabEnv, name: str, value: str, said: str, fix: str) -> None:
    root = str(lab_env.root)
    proc = lab_env.run("lab.up", "--to", "cluster", check=False,
                       **{name: value.format(root=root)})
    assert proc.returncode == 1
    message = said_once(proc)
    assert said.format(root=root) in message and fix in message, message
    nothing_happened(lab_env)


@pytest.mark.parametrize("task", ["lab.down", "lab.doctor"])
def test_every_task_checks_the_environment_first(lab_env: LabEnv, task: str) -> None:
    proc = lab_env.run(task, check=False, LAB_GATE_TIMEOUT="soon")
    assert proc.returncode == 1
    assert "LAB_GATE_TIMEOUT='soon' is not a positive number of seconds" in said_once(proc)
    nothing_happened(lab_env)


@pytest.mark.parametrize(("args", "said"), [
    (["--log-format", "xml"], "unknown log format in --log-format 'xml' → use one of: json"),
    (["--log-level", "loud"], "unknown log level in --log-level 'loud' → use one of: debug"),
    (["--to", "nosuch"], "unknown target state 'nosuch' → use one of: cluster, cni, gateway"),
    (["--dry-run", "--cluster", "nosuch"], "--cluster 'nosuch': "),
])
def test_a_bad_option_is_refused_with_what_to_change(lab_env: LabEnv, args: list[str],
                                                     said: str) -> None:
    proc = lab_env.run("lab.up", *args, check=False)
    assert proc.returncode == 1
    assert said in said_once(proc)
    assert proc.stdout == ""  # no plan for a cluster that does not exist
    nothing_happened(lab_env)


# Every task has the options (test_short_flags_are_letters_and_v_is_verbose reads them all);
# these runs prove them wired, one per code path: the lab config first (setup), or logging alone
# (`lab.map --flows`, `lab.tools --envtest`).
@pytest.mark.parametrize("task", [
    ["lab.trust"], ["lab.hubble", "--observe"], ["lab.onboard", "web"],
    ["lab.map", "--flows", "flows.jsonl"], ["lab.tools", "--envtest"]])
def test_every_task_takes_the_log_options(lab_env: LabEnv, task: list[str]) -> None:
    proc = lab_env.run(*task, "--log-level", "loud", "--verbose", check=False)
    assert proc.returncode == 1, proc.stderr
    assert "unknown log level in --log-level 'loud' → use one of: debug" in said_once(proc)
    nothing_happened(lab_env)


def test_short_flags_are_letters_and_v_is_verbose() -> None:
    """Invoke's automatic short flags can pick the `-` of `--log-level`; `-v` means --verbose
    on every task that has it (lab.hubble's --verdict then takes another letter)."""
    from tasks import ns

    names = list(ns.task_names)
    assert len(names) >= 13
    for name in names:
        found = copy.copy(ns[name])
        found.help = dict(found.help)  # get_arguments() consumes the help of the task it reads
        args = {a.name: a.names for a in found.get_arguments()}
        assert {"log_format", "log_level", "verbose"} <= set(args), name
        shorts = [n for ns in args.values() for n in ns[1:]]
        assert all(len(s) == 1 and s.isalnum() for s in shorts), (name, shorts)
        assert len(shorts) == len(set(shorts)), (name, shorts)
        if found.auto_shortflags:
            assert args["verbose"][1:] == ("v",), (name, args["verbose"])


def test_to_is_checked_before_any_tool_is_downloaded(lab_env: LabEnv) -> None:
    """No kind or helm anywhere and downloads allowed: the bad --to still comes first."""
    proc = lab_env.run("lab.up", "--to", "nosuch", check=False, PATH=without_fakes(),
                       LAB_DOWNLOAD_BASE_KIND="http://127.0.0.1:9/",
                       LAB_DOWNLOAD_BASE_HELM="http://127.0.0.1:9/")
    assert proc.returncode == 1
    assert "unknown target state 'nosuch'" in said_once(proc)
    assert "download" not in proc.stderr
    nothing_happened(lab_env)


def test_a_missing_docker_is_reported_before_any_tool_is_downloaded(lab_env: LabEnv) -> None:
    """No Docker, no kind or helm, downloads allowed: the doctor's host checks come first."""
    proc = lab_env.run("lab.up", check=False, PATH=without_fakes(), LAB_SKIP_DOCTOR="0",
                       LAB_DOWNLOAD_BASE_KIND="http://127.0.0.1:9/",
                       LAB_DOWNLOAD_BASE_HELM="http://127.0.0.1:9/")
    assert proc.returncode == 1
    assert "Docker" in said_once(proc) and "preflight found" in proc.stderr
    assert "download" not in proc.stderr
    nothing_happened(lab_env)


def test_dry_run_plans_only_the_clusters_asked_for(lab_env: LabEnv) -> None:
    write_config(lab_env.config, clusters=[{"name": "east"}, {"name": "west"}])
    proc = lab_env.run("lab.mesh", "--dry-run", "--cluster", "west")
    headers = [line for line in proc.stdout.splitlines() if not line.startswith(" ")][:-1]
    assert headers == [f"west: {s} — " + t for s, t in (
        ("cluster", "kind cluster"), ("cni", "Gateway API CRDs + Cilium + Hubble"),
        ("gateway", "LB IPAM + L2 + shared Gateway on static NodePorts"),
        ("certs", "cert-manager + lab CA + HTTPS on the Gateway + demo app"),
        ("locked", "zero-trust default deny + onboarding"), ("meshed", "Cluster Mesh"))]
    proc = lab_env.run("lab.mesh", "--dry-run", "--cluster", "north", check=False)
    assert proc.returncode == 1
    assert "--cluster 'north': " in said_once(proc) and "use one of: east, west" in proc.stderr
    nothing_happened(lab_env)


def test_down_refuses_an_unknown_cluster_before_saying_it_deletes(lab_env: LabEnv) -> None:
    proc = lab_env.run("lab.down", "--cluster", "nosuch", check=False)
    assert proc.returncode == 1
    assert "--cluster 'nosuch': " in said_once(proc)
    assert "deleting" not in proc.stdout
    nothing_happened(lab_env)


def test_a_reader_that_stops_early_ends_the_plan_quietly(lab_env: LabEnv) -> None:
    """`invoke lab.up --dry-run | head`: the reader is gone before the plan is written."""
    read, write = os.pipe()
    os.close(read)  # every write of the plan now fails with EPIPE
    try:
        proc = subprocess.run(lab_env.command("lab.up", "--dry-run"), cwd=lab_env.root,
                              env=lab_env.env(), stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=60, check=False)
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored" either


# -- 2. each error said once; terminal output ----------------------------------------------------

def run_on_terminal(env: LabEnv, *args: str, columns: int = 120,
                    **extra: str) -> tuple[int, str]:
    """Run a task with stdout and stderr on a pseudo-terminal ``columns`` wide: (rc, raw text)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    environment = env.env(**extra)
    for name in ("LAB_LOG_FORMAT", "COLUMNS", "LINES"):
        environment.pop(name, None)
    environment.update({k: v for k, v in extra.items()})
    environment["TERM"] = "xterm-256color"
    proc = subprocess.Popen(env.command(*args), cwd=env.root, env=environment, stdin=slave,
                            stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(30), b"".join(chunks).decode(errors="replace")


def screen_lines(raw: str) -> list[str]:
    return [line.rstrip() for line in ANSI.sub("", raw).split("\n")]


def test_on_a_terminal_an_error_is_said_once_and_info_events_stay_out(lab_env: LabEnv) -> None:
    rc, raw = run_on_terminal(lab_env, "lab.up", "--to", "cluster", LAB_FAKE_FAIL="kind:create")
    text = ANSI.sub("", raw)
    assert rc == 1
    assert text.count("✗ `kind create cluster --name lab") == 1, text
    assert text.count("→ creating kind cluster 'lab' failed") == 1, text
    assert '"event"' not in text and "[error" not in text, text  # no log event repeats it
    assert "cluster.create" not in text, text  # an INFO event: out of the live view
    assert "Traceback" not in text
    rc, raw = run_on_terminal(lab_env, "lab.up", "--to", "cluster", "-v",
                              LAB_FAKE_FAIL="kind:create")
    text = ANSI.sub("", raw)
    assert rc == 1 and "cluster.create" in text, text  # asked for: -v shows INFO events
    assert text.count("→ creating kind cluster 'lab' failed") == 1, text


def test_json_logs_when_not_a_terminal_or_asked(lab_env: LabEnv) -> None:
    proc = lab_env.run("lab.up", "--to", "cluster", check=False, LAB_FAKE_FAIL="kind:create",
                       LAB_LOG_FORMAT="")  # not a TTY: JSON without being asked
    assert proc.returncode == 1
    assert "creating kind cluster 'lab' failed" in said_once(proc)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert any(e["event"] == "cluster.create" for e in events)  # INFO is logged in JSON
    rc, raw = run_on_terminal(lab_env, "lab.up", "--to", "cluster", "--log-format", "json",
                              LAB_FAKE_FAIL="kind:create")
    failed = [e for e in (json.loads(line) for line in screen_lines(raw) if line.startswith("{"))
              if e["event"] == "failed"]
    assert rc == 1 and len(failed) == 1, raw
    assert "✗ `kind create" not in ANSI.sub("", raw)


def test_long_fix_commands_and_urls_are_folded_between_words(lab_env: LabEnv) -> None:
    rc, raw = run_on_terminal(lab_env, "lab.up", "--no-download", columns=60,
                              PATH=without_fakes())
    lines = screen_lines(raw)
    assert rc == 1, raw
    whole = ["https://kind.sigs.k8s.io/docs/user/quick-start/#installation",
             "https://helm.sh/docs/intro/install/", "`invoke lab.tools`"]
    for token in whole:
        assert any(token in line for line in lines), (token, lines)
    for line in lines:  # folded to the width, unless one unbreakable token is wider
        assert len(line) <= 60 or len(line.split()) == 1, line
    words = " ".join(" ".join(lines).split())
    assert "checksum-verified release" in words and "required tools are missing" in words


def test_colour_follows_no_color(lab_env: LabEnv) -> None:
    """NO_COLOR (no-color.org): present and non-empty turns colour off; empty does not."""
    red_cross = "\x1b[31m✗"
    rc, raw = run_on_terminal(lab_env, "lab.up", "--to", "nosuch", NO_COLOR="1")
    assert rc == 1 and "✗ unknown target state" in raw and red_cross not in raw
    rc, raw = run_on_terminal(lab_env, "lab.up", "--to", "nosuch", NO_COLOR="")
    assert rc == 1 and red_cross in raw


def test_status_title_uses_the_terminal_width(lab_env: LabEnv) -> None:
    lab_env.run("lab.up", "--to", "cluster")
    rc, raw = run_on_terminal(lab_env, "lab.status", columns=120)
    lines = screen_lines(raw)
    assert rc == 0, raw
    title = lines.index("lab — state cluster")
    folded = lines[title + 1:title + 3]
    assert 100 < len(folded[0]) <= 120, folded  # folded near 120 columns, not at 37
    assert " ".join(" ".join(folded).split()) == (
        "id 1, pods 10.244.0.0/16, services 10.96.0.0/16, pool 172.18.255.0/24, "
        "http 30080→30080, https 30443→30443, clustermesh 32379")


# -- 3. nothing to do is not an error ------------------------------------------------------------

def locks(env: LabEnv) -> list[str]:
    return sorted(str(p.relative_to(env.root)) for p in env.root.rglob("*.lock"))


def test_down_with_nothing_to_delete_needs_no_kind(lab_env: LabEnv) -> None:
    proc = lab_env.run("lab.down", PATH=without_fakes())
    assert "nothing to delete for lab: no kind cluster and no record" in proc.stdout
    assert locks(lab_env) == [] and lab_env.calls() == []


def test_down_with_nothing_to_delete_only_asks_kind(lab_env: LabEnv) -> None:
    proc = lab_env.run("lab.down")
    assert "nothing to delete for lab" in proc.stdout
    assert lab_env.calls("kind") == [["get", "clusters"]]
    assert locks(lab_env) == []


def test_no_cluster_lock_is_left_behind(lab_env: LabEnv) -> None:
    lab_env.run("lab.up", "--dry-run")
    assert locks(lab_env) == []
    lab_env.run("lab.up", "--to", "cluster")
    lab_env.run("lab.down")
    assert [p for p in locks(lab_env) if "clusters" in p] == []


def test_status_with_no_cluster_says_how_to_start_one(lab_env: LabEnv) -> None:
    proc = lab_env.run("lab.status")
    assert "no cluster yet: `invoke lab.up` creates it" in proc.stdout
    mesh = write_config(lab_env.root / "two.yaml", clusters=[{"name": "east"}, {"name": "west"}])
    proc = lab_env.run("lab.status", "--config", str(mesh))
    assert f"no cluster yet: `invoke lab.mesh --config {mesh}` creates it" in proc.stdout


def test_every_state_dir_of_a_shipped_config_is_ignored_by_git() -> None:
    state_dirs = {yaml.safe_load(p.read_text()).get("stateDir", ".lab")
                  for p in sorted((REPO / "config").glob("*.yaml"))}
    assert {".lab", ".lab-mesh"} <= state_dirs
    for state_dir in state_dirs:
        proc = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q",
                               f"{state_dir}/clusters/lab.json"], check=False)
        assert proc.returncode == 0, f"{state_dir}/ is not ignored by .gitignore"


# -- 4. config defaults match the README ---------------------------------------------------------

def test_a_minimal_config_gets_every_documented_default(lab_env: LabEnv) -> None:
    # What the README's "Config reference" says, row by row.
    for row in ("| `versions.kind` / `helm` / `ciliumCLI` | v0.29.0 / v3.19.0 / v0.18.9 |",
                "| `versions.cilium` / `gatewayAPI` / `certManager` | 1.18.4 / v1.4.0 / v1.19.0 |",
                "| `stateDir` | `.lab` |", "| `dockerNetwork` | `kind` |",
                "| `gatewayHosts` | `[echo]` |"):
        assert row in README, row
    minimal = lab_env.root / "minimal.yaml"
    minimal.write_text("apiVersion: kind-cilium-lab/v1\nclusters:\n  - name: lab\n")
    plan = lab_env.run("lab.up", "--dry-run", "--config", str(minimal)).stdout
    for words in ("$ docker network inspect kind", "--version 1.18.4", "--version v1.19.0",
                  "apply CustomResourceDefinition gateways.gateway.networking.k8s.io",
                  "apply HTTPRoute echo/echo", f"--config {lab_env.root}/.lab/work/lab/kind.yaml"):
        assert words in plan, words
    lab_env.run("lab.up", "--to", "cluster", "--config", str(minimal))
    record = lab_env.record()  # under <cwd>/.lab: the default stateDir
    assert record["versions"] == {
        "kind": "v0.29.0", "node_image": KIND_NODE_IMAGE, "helm": "v3.19.0",
        "cilium": "1.18.4", "cilium_cli": "v0.18.9", "gateway_api": "v1.4.0",
        "cert_manager": "v1.19.0"}
    kind = json.loads((lab_env.fake_state / "kind.json").read_text())["clusters"]["lab"]
    config = yaml.safe_load(kind["config_text"])
    assert config["networking"] == {"disableDefaultCNI": True, "kubeProxyMode": "none",
                                    "podSubnet": "10.244.0.0/16",
                                    "serviceSubnet": "10.96.0.0/16"}
    (node,) = config["nodes"]
    assert node["image"] == KIND_NODE_IMAGE
    assert [(m["containerPort"], m["hostPort"], m["listenAddress"])
            for m in node["extraPortMappings"]] == [(30080, 30080, "127.0.0.1"),
                                                     (30443, 30443, "127.0.0.1")]


def test_an_empty_config_names_only_what_has_no_default(lab_env: LabEnv) -> None:
    empty = lab_env.root / "empty.yaml"
    empty.write_text("")
    proc = lab_env.run("lab.up", "--dry-run", "--config", str(empty), check=False)
    assert proc.returncode == 1
    message = said_once(proc)
    assert f"{empty}: apiVersion: is required → add `apiVersion: kind-cilium-lab/v1`" in message
    assert f"{empty}: clusters: is required → add at least one cluster" in message
    assert message.count("is required") == 2, message


# -- 5. the dry-run plan is the real order -------------------------------------------------------

class Recorder:
    """What a real run did, in order: the fakes' calls (calls.jsonl, with their start times) and
    the lab's writes to each API front (stamped as they arrive)."""

    TOOL_ACTIONS = (("kind", "create"), ("kind", "delete"), ("helm", "upgrade"),
                    ("helm", "install"), ("helm", "uninstall"), ("helm", "rollback"),
                    ("docker", "network inspect"), ("docker", "inspect"))

    def __init__(self, lab: SimLab) -> None:
        self.lab = lab
        self.writes: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._ports: dict[str, set[str]] = {}
        for name, sim in lab.sims.items():
            sim.emu.on_write(lambda verb, obj, c=name: self._write(c, verb, obj))

    def _write(self, cluster: str, verb: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        ref = f"{obj.get('kind')} {meta['namespace'] + '/' if meta.get('namespace') else ''}" \
              f"{meta.get('name')}"
        managers = [f.get("manager", "") for f in meta.get("managedFields") or []
                    if f.get("operation") == "Apply"]
        fixed = [f"{p['name']}→{p['nodePort']}" for p in (obj.get("spec") or {}).get("ports") or []
                 if p.get("nodePort") in (30080, 30443, 30180, 30543)]
        seen = self._ports.setdefault(ref, set())
        if verb == "patch" and obj.get("kind") == "Service" and set(fixed) - seen:
            new = [p for p in fixed if p not in seen]  # the lab's NodePort patch
            seen.update(new)
            action = f"patch {ref} nodePorts {', '.join(new)}"
        elif verb in ("create", "patch") and any(m.startswith("kind-cilium-lab") for m in managers):
            action = f"apply {ref}"  # server-side apply under one of the lab's field managers
        else:
            return  # helm's chart objects, controllers' writes
        with self._lock:
            self.writes.append((time.time(), cluster, action))

    def since(self, start: float) -> dict[str, list[str]]:
        """Per cluster, every action after ``start`` in the order it happened."""
        events = [(t, c, a) for t, c, a in self.writes if t >= start]
        for call in (json.loads(line) for line in
                     (self.lab.env.fake_state / "calls.jsonl").read_text().splitlines()):
            argv = call["argv"]
            words = " ".join(argv)
            if call["time"] < start or not any(
                    call["tool"] == tool and words.startswith(sub)
                    for tool, sub in self.TOOL_ACTIONS):
                continue
            cluster = next((c for c in self.lab.sims if f"kind-{c}" in argv or c in argv
                            or f"{c}-control-plane" in argv), "")
            if call["tool"] == "docker" and argv[0] == "inspect":  # asked by the other cluster
                cluster = next(c for c in self.lab.sims if c not in argv[1])
            events.append((call["time"], cluster, f"{call['tool']} {words}"))
        out: dict[str, list[str]] = {}
        for _, cluster, action in sorted(events):
            if not cluster and len(self.lab.sims) == 1:
                cluster = next(iter(self.lab.sims))
            out.setdefault(cluster, []).append(action)  # "": names no cluster
        return out


CACHE_NAME = "kind-cilium-lab-cache-"
ACTION = re.compile(r"^(kind|helm|docker|apply|patch) ")


def plan_of(stdout: str) -> dict[str, list[tuple[str, str]]]:
    """Per cluster, (step, action) in the order the dry run prints them. The machine's image
    cache (created once for every cluster and lab; tests/test_imagecache.py) and lines that
    describe rather than act (node registry configuration, prefetch list) are left out."""
    out: dict[str, list[tuple[str, str]]] = {}
    cluster = step = ""
    for line in stdout.splitlines():
        if m := re.match(r"^(\S+): (\S+) — ", line):
            cluster, step = m.groups()
        elif (line.startswith("    ") and ACTION.match(action := line.strip().removeprefix("$ "))
              and CACHE_NAME not in action):
            out.setdefault(cluster, []).append((step, action))
    return out


def assert_plan_is_the_real_order(plan: dict[str, list[tuple[str, str]]],
                                  done: dict[str, list[str]]) -> None:
    """Per cluster, the plan's actions are exactly what the run did, in that order. A call that
    names no cluster (`docker network inspect kind` while clusters run in parallel) cannot be
    placed in one cluster's order: those are only counted."""
    shared = sorted(done.pop("", []))
    planned = {c: [a for _, a in steps] for c, steps in plan.items()}
    assert shared == sorted(a for actions in planned.values() for a in actions if a in shared)
    plan = {c: [(s, a) for s, a in steps if a not in shared] for c, steps in plan.items()}
    assert set(plan) == set(done), (plan.keys(), done.keys())
    for cluster, steps in plan.items():
        assert [a for _, a in steps] == done[cluster], (
            f"{cluster}: the dry-run plan is not what lab.up did\nplan:\n  "
            + "\n  ".join(a for _, a in steps) + "\nreal:\n  " + "\n  ".join(done[cluster]))


@pytest.fixture
def simulated(tmp_path: Path, envtest_cluster: Any) -> Iterator[SimLab]:
    require_upstream()
    lab = make_lab(tmp_path, [envtest_cluster])
    try:
        yield lab
        lab.check()
    finally:
        lab.close()


def test_dry_run_plan_is_the_order_lab_up_runs(simulated: SimLab) -> None:
    """Up to `gateway` (the README walk below compares the whole single-cluster and mesh runs)."""
    env, recorder = simulated.env, Recorder(simulated)
    plan = plan_of(env.run("lab.up", "--to", "gateway", "--dry-run").stdout)
    steps = [s for s, _ in plan["lab"]]
    assert steps.index("cni") < steps.index("gateway")
    cni = [a for s, a in plan["lab"] if s == "cni"]
    assert cni[0] == "apply CustomResourceDefinition backendtlspolicies.gateway.networking.k8s.io"
    assert cni[-1].startswith("helm upgrade --install cilium cilium/cilium --version 1.18.4")
    gateway = [a for s, a in plan["lab"] if s == "gateway"]
    assert gateway.index("apply Gateway lab-gateway/lab") < gateway.index(
        "patch Service lab-gateway/cilium-gateway-lab nodePorts port-80→30080")
    start = time.time()
    env.run("lab.up", "--to", "gateway", timeout=180)
    assert_plan_is_the_real_order(plan, recorder.since(start))


# -- 7. the benchmark without the upstream folder ------------------------------------------------

def test_bench_without_the_upstream_folder_says_what_it_needs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LAB_UPSTREAM_DIR": str(tmp_path / "absent")}
    proc = subprocess.run([sys.executable, "-m", "tests.bench", "--runs", "1"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert re.search(r"invoke --list +median", proc.stdout)
    (line,) = [line for line in proc.stdout.splitlines() if "simulated lab figures" in line]
    assert f"skipped: pinned upstream CRDs/chart schemas unavailable ($LAB_UPSTREAM_DIR=" \
        f"{tmp_path / 'absent'} does not exist" in line and "→ set LAB_UPSTREAM_DIR" in line
