"""Cilium 1.18.4's own policy engine as the judge of the lab's policies.

``../shared/tools/cilium-policy-oracle/cilium-policy-oracle`` (override: ``LAB_POLICY_ORACLE``) is a
binary built from Cilium's ``pkg/policy``: given policy objects and a scenario (namespaces, pods,
flows) it prints, per flow, the verdict and how each side decides it. Absent: the tests that
need it skip with one reason; under ``CI=true`` they fail instead.

The pods of the scenario carry the labels the real manifests give them: the lab's own pods from
what the lab renders, the charts' pods from the upstream templates (cited below), never from the
policies under test.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.matrix import Actor, Flow
from tests.support import deps

REPO = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]

# Pods the upstream charts and kubeadm run: (namespace, pod labels, service account).
CHART_PODS: dict[str, tuple[str, dict[str, str], str]] = {
    # kubeadm cmd/kubeadm/app/phases/addons/dns/manifests.go (kind v0.29.0 → kindest/node v1.33.1)
    "kube-dns": ("kube-system", {"k8s-app": "kube-dns"}, "coredns"),
    # cilium v1.18.4 install/kubernetes/cilium/templates/hubble-relay/deployment.yaml L42-51
    "hubble-relay": ("kube-system", {"k8s-app": "hubble-relay",
                                     "app.kubernetes.io/name": "hubble-relay",
                                     "app.kubernetes.io/part-of": "cilium"}, "hubble-relay"),
    # .../templates/hubble-ui/deployment.yaml L41-57
    "hubble-ui": ("kube-system", {"k8s-app": "hubble-ui", "app.kubernetes.io/name": "hubble-ui",
                                  "app.kubernetes.io/part-of": "cilium"}, "hubble-ui"),
    # .../templates/clustermesh-apiserver/deployment.yaml L44-53
    "clustermesh-apiserver": ("kube-system", {"k8s-app": "clustermesh-apiserver",
                                              "app.kubernetes.io/name": "clustermesh-apiserver",
                                              "app.kubernetes.io/part-of": "cilium"},
                              "clustermesh-apiserver"),
    # cert-manager v1.19.0 deploy/charts/cert-manager/templates/deployment.yaml L33-41 and
    # _helpers.tpl L153-162 (release name cert-manager, creator helm)
    "cert-manager": ("cert-manager", {
        "app": "cert-manager", "app.kubernetes.io/name": "cert-manager",
        "app.kubernetes.io/instance": "cert-manager", "app.kubernetes.io/component": "controller",
        "app.kubernetes.io/version": "v1.19.0", "app.kubernetes.io/managed-by": "Helm",
        "helm.sh/chart": "cert-manager-v1.19.0"}, "cert-manager"),
    # .../templates/webhook-deployment.yaml
    "cert-manager-webhook": ("cert-manager", {
        "app": "webhook", "app.kubernetes.io/name": "webhook",
        "app.kubernetes.io/instance": "cert-manager", "app.kubernetes.io/component": "webhook",
        "app.kubernetes.io/version": "v1.19.0", "app.kubernetes.io/managed-by": "Helm",
        "helm.sh/chart": "cert-manager-v1.19.0"}, "cert-manager-webhook"),
    # .../templates/cainjector-deployment.yaml L34-42
    "cert-manager-cainjector": ("cert-manager", {
        "app": "cainjector", "app.kubernetes.io/name": "cainjector",
        "app.kubernetes.io/instance": "cert-manager",
        "app.kubernetes.io/component": "cainjector", "app.kubernetes.io/version": "v1.19.0",
        "app.kubernetes.io/managed-by": "Helm", "helm.sh/chart": "cert-manager-v1.19.0"},
        "cert-manager-cainjector"),
}
LOCAL_CLUSTER = "lab"
REMOTE_CLUSTER = "peer"


def oracle_binary() -> Path:
    """The oracle, or skip (fail under CI=true) with what to set (tests/support/deps.py)."""
    return deps.require_oracle()


def judge(policies: Sequence[Obj], scenario: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One oracle run: a JSON verdict per scenario flow, in order. Parse errors fail the test."""
    binary = oracle_binary()
    with tempfile.TemporaryDirectory() as tmp:
        pol, sc = Path(tmp) / "policies.yaml", Path(tmp) / "scenario.yaml"
        pol.write_text(yaml.safe_dump_all(list(policies), sort_keys=False))
        sc.write_text(yaml.safe_dump(dict(scenario), sort_keys=False))
        proc = subprocess.run([str(binary), "--policies", str(pol), "--scenario", str(sc)],
                              capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode not in (0, 3):
        pytest.fail(f"the oracle refused the policies (exit {proc.returncode}): "
                    f"{proc.stderr.strip()[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def pod_templates(objects: Iterable[Obj]) -> list[tuple[str, dict[str, str], str]]:
    """(namespace, labels, service account) of every pod the objects would run."""
    out = []
    for obj in objects:
        if obj.get("kind") == "Pod":
            meta, spec = obj["metadata"], obj.get("spec") or {}
        elif obj.get("kind") in ("Deployment", "DaemonSet", "StatefulSet"):
            meta = {**obj["spec"]["template"]["metadata"],
                    "namespace": obj["metadata"].get("namespace")}
            spec = obj["spec"]["template"].get("spec") or {}
        else:
            continue
        out.append((str(meta.get("namespace") or "default"), dict(meta.get("labels") or {}),
                    str(spec.get("serviceAccountName") or "default")))
    return out


def _selects(actor: Actor, namespace: str, labels: Mapping[str, str]) -> bool:
    return namespace == actor.namespace and all(labels.get(k) == v
                                                for k, v in actor.selector.items())


class Scenario:
    """Endpoints for the matrix's pod actors, built from real pod labels."""

    def __init__(self, actors: Mapping[str, Actor], lab_pods: Sequence[tuple[str, dict[str, str],
                                                                               str]]) -> None:
        self.actors = actors
        self.lab_pods = list(lab_pods)
        self.endpoints: dict[str, Obj] = {}
        for name, actor in actors.items():
            if actor.is_pod:
                self.endpoints[name] = self._endpoint(name, actor)

    def _endpoint(self, name: str, actor: Actor) -> Obj:
        pods = [*self.lab_pods, *CHART_PODS.values()]
        found = [(ns, labels, sa) for ns, labels, sa in pods if _selects(actor, ns, labels)]
        assert found, (f"actor {name}: no pod the lab or the charts run matches namespace "
                       f"{actor.namespace} and selector {actor.label_selector}")
        ns, labels, sa = found[0]
        ep: Obj = {"name": name, "namespace": ns, "labels": labels, "serviceAccount": sa}
        if actor.remote_cluster:
            ep["cluster"] = REMOTE_CLUSTER
        return ep

    def peer(self, name: str) -> str:
        actor = self.actors[name]
        if actor.is_pod:
            return name
        if actor.ip:
            return f"cidr:{actor.ip}"
        return f"reserved:{actor.entity}"

    def document(self, flows: Sequence[Flow]) -> Obj:
        used = {n for f in flows for n in (f.source, f.destination)} & set(self.endpoints)
        endpoints = [self.endpoints[n] for n in sorted(used)]
        return {
            "cluster": LOCAL_CLUSTER,
            "namespaces": {ns: {} for ns in sorted({e["namespace"] for e in endpoints})},
            "endpoints": endpoints,
            "flows": [{"id": str(f), "from": self.peer(f.source), "to": self.peer(f.destination),
                       "port": f.port, "protocol": f.protocol} for f in flows],
        }


def mismatches(flows: Sequence[Flow], verdicts: Sequence[dict[str, Any]]) -> list[str]:
    """Every flow whose verdict or deciding side differs from the oracle's."""
    assert len(verdicts) == len(flows)
    out = []
    for flow, got in zip(flows, verdicts, strict=True):
        want = (flow.expect, flow.egress, flow.ingress)
        have = (got["verdict"], got["egress"], got["ingress"])
        if want != have:
            out.append(f"{flow}: expected {want}, Cilium says {have} "
                       f"(egress by {got.get('egressBy')}, ingress by {got.get('ingressBy')}; "
                       f"{'; '.join(got.get('notes') or [])})")
    return out
