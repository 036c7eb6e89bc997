"""The default-deny policy matrix, each flow tried for real, with what Hubble saw of each attempt:
FORWARDED for allowed connections, a policy drop on the deciding side for denied ones."""

from __future__ import annotations

from typing import Any

import pytest

from lab import logs
from lab.matrix import Flow, load
from lab.state import StateStore
from lab.steps.base import StepContext, Timeouts
from lab.steps.locked import LockedStep, kube_exec, try_flow
from lab.tools import Tools
from tests.e2e.conftest import E2ELab

MATRIX = load()


@pytest.fixture(scope="module")
def live_ctx(e2e_lab: E2ELab) -> StepContext:
    cfg = e2e_lab.cfg
    cluster = cfg.clusters[0]
    store = StateStore(cfg.state_dir)
    log = logs.get("e2e")
    return StepContext(cfg, cluster, store, store.load(cluster.name), Tools(None, log), log,
                       Timeouts.from_env(), e2e_lab.kubeconfig)


def test_locked_gate_holds(live_ctx: StepContext) -> None:
    verdict = live_ctx.wait_for(lambda: LockedStep().ready(live_ctx), 120, "the locked gate")
    assert verdict.ready, verdict.explain()


@pytest.mark.parametrize("flow", [f for f in MATRIX.flows if f.trial], ids=str)
def test_matrix_flow(live_ctx: StepContext, flow: Flow, record_property: Any) -> None:
    if flow.when == "mesh" and not live_ctx.lab.is_mesh:
        pytest.skip("mesh-only flow")
    result = try_flow(live_ctx, flow, kube_exec(live_ctx.kube), MATRIX)
    record_property("hubble", str(result.hubble) if result.hubble else "n/a")
    print(f"{flow}: {result.outcome} ({result.detail}); Hubble: {result.hubble or 'n/a'}")
    assert result.outcome == flow.expect, result.detail
    if flow.trial == "tcp":
        seen = result.hubble
        assert seen is not None and seen.flow is not None, f"Hubble saw nothing: {seen}"
        if flow.expect == "allowed":
            assert seen.flow["verdict"] == "FORWARDED", str(seen)
        else:
            side = "EGRESS" if flow.egress == "denied" else "INGRESS"
            assert seen.flow["reason"] in ("POLICY_DENIED", "POLICY_DENY"), str(seen)
            assert seen.flow["direction"] == side, f"dropped on the wrong side: {seen}"


def test_observe_dropped_through_the_relay(e2e_lab: E2ELab) -> None:
    from lab.hubble import parse_flows

    proc = e2e_lab.invoke("lab.hubble", "--observe", "--verdict", "DROPPED", "--no-follow",
                          "--last", "200", "--output", "json", timeout=120)
    flows = parse_flows(proc.stdout)
    assert flows, "no DROPPED flow seen through hubble-relay"
    assert all(f["verdict"] == "DROPPED" for f in flows)
    assert any(f.get("drop_reason_desc") in ("POLICY_DENIED", "POLICY_DENY") for f in flows)
