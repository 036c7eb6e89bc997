"""Helpers of the real-cluster suite: timings, diagnostics, host-side HTTP checks.

Unit-tested offline (tests/test_e2e_helpers.py) on recorded real-format inputs.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lab.bootstrap import tools_dir
from lab.config import LabConfig
from lab.errors import LabError
from lab.hubble import ObserveFilter, observe_command, parse_flows, ready_pod
from lab.kube import KubeClient
from lab.state import StateStore

# -- timings --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    cluster: str
    transition: str
    source: str
    seconds: float | None
    outcome: str


def timings(cfg: LabConfig) -> list[Timing]:
    """Every recorded transition of every cluster, in order."""
    store = StateStore(cfg.state_dir)
    out = []
    for c in cfg.clusters:
        for t in store.load(c.name).history:
            out.append(Timing(c.name, t.name, t.source, t.seconds, t.outcome))
    return out


def timings_table(rows: list[Timing]) -> str:
    lines = [f"{'cluster':<12} {'transition':<10} {'from':<10} {'seconds':>9}  outcome"]
    for r in rows:
        secs = f"{r.seconds:9.1f}" if r.seconds is not None else f"{'-':>9}"
        lines.append(f"{r.cluster:<12} {r.transition:<10} {r.source:<10} {secs}  {r.outcome}")
    ok = [r.seconds for r in rows if r.outcome == "ok" and r.seconds is not None]
    lines.append(f"{'total (ok)':<34} {sum(ok):9.1f}")
    return "\n".join(lines)


def write_timings(rows: list[Timing], path: Path, extra: dict[str, Any] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"transitions": [r.__dict__ for r in rows], **(extra or {})}
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- diagnostics ----------------------------------------------------------------------------------

def collect_diagnostics(cfg: LabConfig, out: Path, kubeconfig: str | None = None) -> list[Path]:
    """Best effort: every part that fails writes why instead of stopping the rest."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(rel: str, text: str) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)

    records = cfg.state_dir / "clusters"
    if records.is_dir():
        for rec in records.glob("*.json"):
            save(f"records/{rec.name}", rec.read_text())
    for c in cfg.clusters:
        base = c.name
        pinned = tools_dir() / "kind"  # the lab's own verified kind first, as the lab uses it
        kind = str(pinned) if pinned.is_file() else shutil.which("kind") or "kind"
        proc = _run([kind, "export", "logs", str(out / base / "kind-logs"), "--name", c.name])
        save(f"{base}/kind-export-logs.txt", proc)
        kube = KubeClient(c.kube_context, kubeconfig)
        try:
            events = kube.list("v1", "Event")
            save(f"{base}/events.yaml", yaml.safe_dump(
                [_event_line(e) for e in events], sort_keys=False))
        except LabError as exc:
            save(f"{base}/events.error.txt", str(exc))
        try:
            agents = kube.list("v1", "Pod", "kube-system", label_selector="k8s-app=cilium")
            for pod in agents:
                name = pod["metadata"]["name"]
                res = kube.exec("kube-system", name, ["cilium-dbg", "status", "--verbose"],
                                container="cilium-agent", timeout=30)
                save(f"{base}/cilium-status-{name}.txt", res.stdout + res.stderr)
        except LabError as exc:
            save(f"{base}/cilium-status.error.txt", str(exc))
        try:
            agent = ready_pod(kube, "kube-system", "k8s-app=cilium", "Cilium agent")
            cmd = observe_command(kube, ObserveFilter(verdict="DROPPED", follow=False, last=500,
                                                      output="json"))
            res = kube.exec("kube-system", agent, cmd, container="cilium-agent", timeout=60)
            save(f"{base}/hubble-dropped.jsonl", res.stdout)
            save(f"{base}/hubble-dropped-summary.txt",
                 "\n".join(summarize_flow(f) for f in parse_flows(res.stdout)) + "\n")
        except LabError as exc:
            save(f"{base}/hubble-dropped.error.txt", str(exc))
        finally:
            kube.close()
    return written


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"$ {' '.join(cmd)}\n{exc}\n"
    return f"$ {' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"


def _event_line(e: dict[str, Any]) -> dict[str, Any]:
    obj = e.get("involvedObject", {})
    return {"time": e.get("lastTimestamp") or e.get("eventTime"), "type": e.get("type"),
            "reason": e.get("reason"),
            "object": f"{obj.get('kind')}/{obj.get('namespace', '')}/{obj.get('name')}",
            "message": e.get("message")}


def summarize_flow(flow: dict[str, Any]) -> str:
    """One line per flow: source → destination:port verdict (reason)."""
    def side(ep: dict[str, Any] | None, ip: str | None) -> str:
        if ep and ep.get("pod_name"):
            return f"{ep.get('namespace')}/{ep.get('pod_name')}"
        return ip or "?"

    ip = flow.get("IP") or flow.get("ip") or {}
    l4 = flow.get("l4") or {}
    port = (l4.get("TCP") or l4.get("UDP") or {}).get("destination_port", "")
    reason = flow.get("drop_reason_desc") or flow.get("policy_match_type") or ""
    return (f"{side(flow.get('source'), ip.get('source'))} → "
            f"{side(flow.get('destination'), ip.get('destination'))}:{port} "
            f"{flow.get('verdict')} {reason}".rstrip())


# -- host-side HTTP -------------------------------------------------------------------------------

def http_get(address: str, port: int, host: str, path: str = "/",
             timeout: float = 5.0) -> tuple[int, str]:
    """Plain HTTP from the host through the kind port mapping, with a Host header."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": f"{host}:{port}"})
        resp = conn.getresponse()
        return resp.status, resp.read(512).decode(errors="replace")
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        return 0, str(exc)
    finally:
        conn.close()


def artifacts_dir() -> Path:
    return Path(os.environ.get("LAB_E2E_ARTIFACTS", "e2e-artifacts")).resolve()
