"""The real-cluster suite's helpers, offline, on recorded real-format inputs."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lab.config import load_config
from lab.state import Record, StateStore, Transition
from tests.conftest import with_fakes, write_config
from tests.e2e.helpers import (
    collect_diagnostics,
    http_get,
    summarize_flow,
    timings,
    timings_table,
    write_timings,
)
from tests.support import objects
from tests.support.apifront import ApiFront
from tests.support.upstream import require_upstream

# `hubble observe -o json` lines as the CLI prints them (protojson field names).
RECORDED_DROP = {
    "flow": {"time": "2026-11-20T10:00:01.5Z", "verdict": "DROPPED", "drop_reason": 133,
             "drop_reason_desc": "POLICY_DENIED", "Type": "L3_L4",
             "IP": {"source": "10.244.0.31", "destination": "10.244.0.52", "ipVersion": "IPv4"},
             "l4": {"TCP": {"source_port": 40512, "destination_port": 8080,
                            "flags": {"SYN": True}}},
             "source": {"namespace": "lab-probe-a", "pod_name": "probe"},
             "destination": {"namespace": "lab-probe-b", "pod_name": "probe"},
             "traffic_direction": "INGRESS", "policy_match_type": 0},
    "node_name": "lab-control-plane", "time": "2026-11-20T10:00:01.5Z"}


def test_summarize_a_recorded_drop() -> None:
    line = summarize_flow(RECORDED_DROP["flow"])
    assert line == "lab-probe-a/probe → lab-probe-b/probe:8080 DROPPED POLICY_DENIED"


def test_timings_table_and_json(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "lab.yaml"))
    store = StateStore(cfg.state_dir)
    rec = Record(cluster="lab", state="cni")
    rec.history = [Transition("cluster", "absent", "t0", "t1", 41.2, "ok"),
                   Transition("cni", "cluster", "t1", None, None, "interrupted"),
                   Transition("cni", "cluster", "t2", "t3", 95.0, "ok")]
    store.save(rec)
    rows = timings(cfg)
    table = timings_table(rows)
    assert "cluster" in table and "interrupted" in table
    assert table.splitlines()[-1].split()[-1] == "136.2"
    write_timings(rows, tmp_path / "t.json", {"bringUpSeconds": 140.0})
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["bringUpSeconds"] == 140.0 and len(data["transitions"]) == 3


def test_http_get_sends_the_host_header() -> None:
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers["Host"])
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"echo-7d9")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert http_get("127.0.0.1", port, "echo.localhost") == (200, "echo-7d9")
        assert seen == [f"echo.localhost:{port}"]
    finally:
        server.shutdown()
    status, detail = http_get("127.0.0.1", port, "echo.localhost", timeout=1)
    assert status == 0 and detail


def test_collect_diagnostics_gathers_every_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                kube_api: ApiFront) -> None:
    require_upstream()
    monkeypatch.setenv("PATH", with_fakes(__import__('os').environ['PATH']))
    monkeypatch.setenv("LAB_FAKE_STATE", str(tmp_path / "fake"))
    (tmp_path / "fake").mkdir()
    cfg = load_config(write_config(tmp_path / "lab.yaml"))
    StateStore(cfg.state_dir).save(Record(cluster="lab", state="locked"))
    emu = kube_api  # a clean real API server
    emu.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "echo"}})
    for obj in objects.cni_ready(["lab-control-plane"]):
        emu.put(obj)
    emu.put({"apiVersion": "v1", "kind": "Event",
             "metadata": {"name": "e1", "namespace": "echo"}, "type": "Warning",
             "reason": "BackOff", "message": "Back-off pulling image",
             "involvedObject": {"kind": "Pod", "namespace": "echo", "name": "echo-1"}})

    def agent(ns: str, pod: str, container: str, cmd: list[str]) -> tuple[int, str, str]:
        if cmd[:2] == ["cilium-dbg", "status"]:
            return 0, "KVStore: Disabled\nKubernetes: Ok\n", ""
        if cmd[:2] == ["hubble", "observe"]:
            return 0, json.dumps(RECORDED_DROP) + "\n", ""
        return 1, "", f"unexpected {cmd}"

    emu.on_exec(agent)
    kubeconfig = tmp_path / "kubeconfig"
    emu.write_kubeconfig(kubeconfig, context="kind-lab")
    written = collect_diagnostics(cfg, tmp_path / "diag", str(kubeconfig))
    assert emu.callback_errors == []
    names = {p.relative_to(tmp_path / "diag").as_posix() for p in written}
    assert {"records/lab.json", "lab/events.yaml", "lab/cilium-status-cilium-0.txt",
            "lab/hubble-dropped.jsonl", "lab/hubble-dropped-summary.txt",
            "lab/kind-export-logs.txt"} <= names
    assert "BackOff" in (tmp_path / "diag/lab/events.yaml").read_text()
    assert "POLICY_DENIED" in (tmp_path / "diag/lab/hubble-dropped-summary.txt").read_text()
