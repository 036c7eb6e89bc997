"""The lab's promise on a real lab, through `invoke lab.verify --json`: every gate, every matrix
flow with a trial tried for real with what Hubble saw of that attempt. The expected side of each
drop is read from the matrix file here, not from the verify report. The service map of the run
(`invoke lab.map` through hubble-relay) lands in the artifacts for the job summary."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lab.matrix import load
from tests.e2e.conftest import E2ELab

MATRIX = load()


@pytest.fixture(scope="module")
def report(e2e_lab: E2ELab) -> dict[str, Any]:
    proc = e2e_lab.invoke("lab.verify", "--json", "--map",
                          str(e2e_lab.artifacts / "verify-map.svg"), check=False, timeout=1800)
    (e2e_lab.artifacts / "verify.json").write_text(proc.stdout)
    doc: dict[str, Any] = json.loads(proc.stdout)
    doc["exit"] = proc.returncode
    return doc


def test_verify_holds(report: dict[str, Any]) -> None:
    bad = [f"{f['cluster']}: {f['flow']}: {f.get('detail')}" for f in report["flows"]
           if not f["ok"]]
    gates = [f"{g['cluster']}/{g['gate']}: {c['name']}: {c.get('detail')}"
             for g in report["gates"] for c in g["checks"] if not c["ok"]]
    assert not bad and not gates, "\n".join(gates + bad)
    assert report["ok"] is True and report["exit"] == 0


def test_every_trial_was_tried(report: dict[str, Any], e2e_lab: E2ELab) -> None:
    flows = MATRIX.for_lab(mesh=e2e_lab.cfg.is_mesh)
    tried = {(r["cluster"], r["flow"]) for r in report["flows"] if r["observed"] != "offline"}
    for cluster in e2e_lab.cfg.clusters:
        missing = [str(f) for f in flows if f.trial and (cluster.name, str(f)) not in tried]
        assert not missing, f"{cluster.name}: not tried: {missing}"


def test_hubble_saw_each_connection_on_the_deciding_side(report: dict[str, Any]) -> None:
    by_flow = {str(f): f for f in MATRIX.flows}
    for row in report["flows"]:
        flow = by_flow.get(row["flow"])
        if flow is None or flow.trial != "tcp" or row["origin"] != "lab":
            continue
        seen = row["hubble"]
        assert seen is not None, f"{row['flow']}: Hubble saw nothing"
        if flow.expect == "allowed":
            assert seen["verdict"] == "FORWARDED", row
        else:
            side = "EGRESS" if flow.egress == "denied" else "INGRESS"
            assert seen["reason"] in ("POLICY_DENIED", "POLICY_DENY"), row
            assert seen["direction"] == side, f"dropped on the wrong side: {row}"


def test_service_map_through_the_relay(e2e_lab: E2ELab) -> None:
    svg, md = e2e_lab.artifacts / "service-map.svg", e2e_lab.artifacts / "service-map.md"
    e2e_lab.invoke("lab.map", "--since", "30m", "--out", str(svg), "--mermaid", str(md),
                   timeout=300)
    text = svg.read_text()
    assert 'id="node:lab-probe-a/probe"' in text and ":DROPPED" in text
    assert md.read_text().startswith("### service map")


def test_observe_dropped_through_the_relay(e2e_lab: E2ELab) -> None:
    from lab.hubble import parse_flows

    proc = e2e_lab.invoke("lab.hubble", "--observe", "--verdict", "DROPPED", "--no-follow",
                          "--last", "200", "--output", "json", timeout=120)
    flows = parse_flows(proc.stdout)
    assert flows, "no DROPPED flow seen through hubble-relay"
    assert all(f["verdict"] == "DROPPED" for f in flows)
    assert any(f.get("drop_reason_desc") in ("POLICY_DENIED", "POLICY_DENY") for f in flows)
