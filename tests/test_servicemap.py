"""`lab.map`: the service map from recorded `hubble observe -o json` lines.

The inputs are written by hand in the shape Hubble prints (cilium api/v1/flow/flow.proto through
protojson with proto field names: zero values omitted, enums by name, uint64 as strings, one
GetFlowsResponse per line). The expected nodes and edges are written by hand too, and checked by
parsing the SVG the real task writes (xml.etree), not by asking the module what it drew.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

SVG = "{http://www.w3.org/2000/svg}"
DEMO = REPO / "docs" / "demo-flows.jsonl"


def line(flow: dict[str, Any], node: str = "lab/lab-control-plane") -> str:
    return json.dumps({"flow": {**flow, "node_name": node}, "node_name": node,
                       "time": flow.get("time", "2026-11-30T14:00:00.000000001Z")})


def pod(ns: str, name: str, *labels: str, workload: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"ID": 301, "identity": 51234, "namespace": ns, "pod_name": name,
                           "labels": [*labels, f"k8s:io.kubernetes.pod.namespace={ns}"]}
    if workload:
        out["workloads"] = [{"name": workload, "kind": "Deployment"}]
    return out


SHOP_WEB = pod("shop", "web-7c9f5d6b48-tnq2w", "k8s:app=web", workload="web")
SHOP_API = pod("shop", "api-5b8f9c7d4d-hx9rk", "k8s:app=api")  # no workloads: from the pod name
SHOP_DB = pod("shop", "db-0", "k8s:app=db")  # a StatefulSet's pod
WORLD = {"identity": 2, "labels": ["reserved:world"]}
INGRESS = {"identity": 8, "labels": ["reserved:ingress"]}


def tcp(src: dict[str, Any], dst: dict[str, Any], port: int, verdict: str = "FORWARDED",
        reply: bool = False, **extra: Any) -> dict[str, Any]:
    ports = {"source_port": port, "destination_port": 41000} if reply else \
        {"source_port": 41000, "destination_port": port}
    return {"verdict": verdict, "IP": {"source": "10.244.0.5", "destination": "10.244.0.6",
                                       "ipVersion": "IPv4"},
            "l4": {"TCP": {**ports, "flags": {"SYN": True, "ACK": reply}}},
            "source": src, "destination": dst, "Type": "L3_L4", "is_reply": reply,
            "traffic_direction": "EGRESS", "event_type": {"type": 4}, **extra}


RECORDED = "\n".join([
    # the Gateway's Envoy forwards to web, three times; web answers (replies: no new edge)
    *[line(tcp(INGRESS, SHOP_WEB, 8080)) for _ in range(3)],
    *[line(tcp(SHOP_WEB, INGRESS, 8080, reply=True)) for _ in range(3)],
    line(tcp(WORLD, INGRESS, 443, traffic_direction="INGRESS")),
    # web → api allowed twice; api → db dropped by policy at db's ingress
    line(tcp(SHOP_WEB, SHOP_API, 9000)), line(tcp(SHOP_WEB, SHOP_API, 9000)),
    line(tcp(SHOP_API, SHOP_DB, 5432, "DROPPED", drop_reason=133,
             drop_reason_desc="POLICY_DENIED", traffic_direction="INGRESS")),
    "{this is not json",
    line(tcp(SHOP_API, WORLD, 443, "DROPPED", drop_reason_desc="POLICY_DENIED")),
    json.dumps({"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "3"}}),
    json.dumps(["a", "list"]),
    line({"verdict": "TRACED", "Type": "SOCK", "source": SHOP_API, "destination": WORLD,
          "l4": {"UDP": {"source_port": 5353, "destination_port": 53}},
          "socket_cookie": "20483", "cgroup_id": "9214"}),
    "",
    line({**tcp(SHOP_WEB, SHOP_API, 9000), "l4": {"TCP": {"destination_port": "9000"}}}),
])
# Hand-written: what the map of RECORDED must show.
NODES = {"shop/web", "shop/api", "shop/db", "reserved:world", "reserved:ingress"}
EDGES = {
    "edge:reserved:ingress->shop/web:8080/TCP:FORWARDED": 3,
    "edge:reserved:world->reserved:ingress:443/TCP:FORWARDED": 1,
    "edge:shop/web->shop/api:9000/TCP:FORWARDED": 2,
    "edge:shop/api->shop/db:5432/TCP:DROPPED": 1,
    "edge:shop/api->reserved:world:443/TCP:DROPPED": 1,
}
GREEN, RED = "#2e7d32", "#c62828"


def run_map(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO), "lab.map",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "NO_COLOR": "1",
                                            "PYTHONPATH": str(REPO), "LAB_LOG_FORMAT": "json"})


def groups(svg: Path) -> dict[str, ET.Element]:
    root = ET.parse(svg).getroot()
    return {g.get("id", ""): g for g in root.iter(f"{SVG}g") if g.get("id")}


def stroke(group: ET.Element) -> str:
    style = next(p.get("style", "") for p in group.iter(f"{SVG}path"))
    found = re.search(r"stroke: (#[0-9a-f]{6})", style)
    return found.group(1) if found else ""


def texts(svg: Path) -> list[str]:
    return ["".join(t.itertext()) for t in ET.parse(svg).getroot().iter(f"{SVG}text")]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("map")
    flows = tmp / "flows.jsonl"
    flows.write_text(RECORDED + "\n")
    proc = run_map("--flows", str(flows), "--out", str(tmp / "map.svg"),
                   "--mermaid", str(tmp / "map.md"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp / "map.svg", tmp / "map.md", proc.stderr + proc.stdout


def test_nodes_and_edges_in_the_svg(drawn: tuple[Path, Path, str]) -> None:
    svg, _, _ = drawn
    ids = groups(svg)
    # a reserved identity in a cycle is drawn twice: on the callers' side (@caller) and as callee
    assert {i[5:].removesuffix("@caller") for i in ids if i.startswith("node:")} == NODES
    assert "node:reserved:world@caller" in ids  # the clients of the Gateway, on the left
    edges = {i for i in ids if i.startswith("edge:")}
    assert edges == set(EDGES)
    for edge in EDGES:
        assert stroke(ids[edge]) == (RED if edge.endswith("DROPPED") else GREEN), edge
    labels = texts(svg)
    # workload names: from `workloads`, from the pod name without its hashes, a StatefulSet's
    for name in ("web", "api", "db", "world", "ingress", "shop"):
        assert name in labels, labels
    assert "8080/TCP ×3" in labels and "9000/TCP ×2" in labels
    assert "5432/TCP POLICY_DENIED ×1" in labels  # a drop carries its reason
    assert not any("tnq2w" in t or "hx9rk" in t for t in labels)


def test_replies_are_not_separate_edges(drawn: tuple[Path, Path, str]) -> None:
    svg, _, _ = drawn
    ids = groups(svg)
    assert not any(i.startswith("edge:shop/web->reserved:ingress") for i in ids)
    # the three replies did not add to the forward edge's weight either
    assert "8080/TCP ×3" in texts(svg) and "8080/TCP ×6" not in texts(svg)


def test_malformed_lines_are_reported_with_their_number_and_skipped(
        drawn: tuple[Path, Path, str]) -> None:
    _, _, stderr = drawn
    skipped = [s for s in stderr.splitlines() if s.startswith("! skipped")]
    assert len(skipped) == 3, stderr
    assert skipped[0].startswith("! skipped line 11: not JSON")
    assert skipped[1].startswith("! skipped line 14: not a JSON object")
    assert skipped[2].startswith("! skipped line 17: `flow.l4.TCP.destination_port`")
    assert "3 malformed line(s) skipped" in stderr


def test_mermaid_for_a_job_summary(drawn: tuple[Path, Path, str]) -> None:
    _, md, _ = drawn
    text = md.read_text()
    assert text.count("```") == 2 and "```mermaid\n" in text and "\nflowchart LR\n" in text
    assert 'subgraph g0["shop"]' in text or re.search(r'subgraph g\d+\["shop"\]', text)
    arrows = re.findall(r"^  n\d+ (-->|-\.->)\|\"([^\"]+)\"\| n\d+$", text, re.M)
    assert sorted(arrows) == sorted([
        ("-->", "8080/TCP ×3"), ("-->", "443/TCP ×1"), ("-->", "9000/TCP ×2"),
        ("-.->", "5432/TCP POLICY_DENIED ×1"), ("-.->", "443/TCP POLICY_DENIED ×1")])
    assert text.count("linkStyle") == 5


def test_the_committed_demo_picture_is_what_the_demo_flows_draw(tmp_path: Path) -> None:
    """docs/service-map.svg is generated from docs/demo-flows.jsonl (README says how)."""
    proc = run_map("--flows", str(DEMO), "--out", str(tmp_path / "demo.svg"), cwd=tmp_path)
    assert proc.returncode == 0 and "0 malformed" in proc.stdout, proc.stderr
    fresh = (tmp_path / "demo.svg").read_text()
    # same input → the same bytes (no date, fixed ids)
    assert fresh == (REPO / "docs" / "service-map.svg").read_text()
    ids = groups(tmp_path / "demo.svg")
    nodes = {i[5:].removesuffix("@caller") for i in ids if i.startswith("node:")}
    assert {"lab-probe-a/probe", "lab-probe-b/probe", "echo/echo", "kube-system/coredns",
            "kube-system/hubble-relay", "cert-manager/cert-manager-webhook",
            "reserved:world", "reserved:ingress", "reserved:host+kube-apiserver"} <= nodes
    # the two halves of the default deny: a's egress drop, c's drop at b's ingress
    assert "edge:lab-probe-a/probe->lab-probe-b/probe:8080/TCP:DROPPED" in ids
    assert "edge:lab-probe-c/probe->lab-probe-b/probe:8080/TCP:DROPPED" in ids
    assert "edge:reserved:ingress->echo/echo:8080/TCP:FORWARDED" in ids
    assert not any(i.startswith("edge:kube-system/coredns->") for i in ids)  # DNS answers


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    proc = run_map("--flows", str(tmp_path / "nope.jsonl"), cwd=tmp_path)
    assert proc.returncode == 1 and "no such file" in proc.stderr
    assert not (tmp_path / "service-map.svg").exists()
