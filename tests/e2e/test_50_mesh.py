"""Cluster Mesh (with `--mesh`): the global service answers from every cluster."""

from __future__ import annotations

import pytest

from lab import logs
from lab.state import StateStore
from lab.steps.base import StepContext, Timeouts
from lab.steps.meshed import MeshStep, remote_clusters
from lab.tools import Tools
from tests.e2e.conftest import E2ELab


@pytest.fixture(scope="module")
def mesh_lab(e2e_lab: E2ELab) -> E2ELab:
    if not e2e_lab.cfg.is_mesh:
        pytest.skip("single-cluster run (use `nox -s e2e -- --mesh` for Cluster Mesh)")
    return e2e_lab


def _ctx(lab: E2ELab, i: int) -> StepContext:
    store = StateStore(lab.cfg.state_dir)
    c = lab.cfg.clusters[i]
    log = logs.get("e2e")
    return StepContext(lab.cfg, c, store, store.load(c.name), Tools(None, log), log,
                       Timeouts.from_env(), lab.kubeconfig)


def test_every_agent_sees_every_peer_ready(mesh_lab: E2ELab) -> None:
    for i, c in enumerate(mesh_lab.cfg.clusters):
        ctx = _ctx(mesh_lab, i)
        peers = {o.name for o in mesh_lab.cfg.clusters if o.name != c.name}
        for pod in ctx.kube.list("v1", "Pod", "kube-system", label_selector="k8s-app=cilium"):
            res = ctx.kube.exec("kube-system", pod["metadata"]["name"],
                                ["cilium-dbg", "status", "-o", "json"], container="cilium-agent")
            remote = remote_clusters(res.stdout)
            assert peers <= set(remote), remote
            assert all(remote[p].get("ready") for p in peers), remote


def test_global_service_answers_from_both_clusters(mesh_lab: E2ELab) -> None:
    for i in range(len(mesh_lab.cfg.clusters)):
        ctx = _ctx(mesh_lab, i)
        verdict = ctx.wait_for(lambda c=ctx: MeshStep().ready(c), 180, "the meshed gate")
        check = {c.name: c for c in verdict.checks}[
            "global service answered from the other clusters"]
        assert check.ok, check.detail
