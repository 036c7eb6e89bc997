"""`lab.onboard` makes a new application reachable through the Gateway, and nothing else."""

from __future__ import annotations

import time

from lab.kube import KubeClient
from lab.steps.locked import PROBE_NAMESPACES, PROBE_POD
from tests.e2e.conftest import E2ELab
from tests.e2e.helpers import http_get

NS, NAME, PORT = "e2e-hello", "hello", 8080
IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.53"


def _deploy(kube: KubeClient) -> None:
    labels = {"app.kubernetes.io/name": NAME}
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    kube.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": NAME, "namespace": NS},
                "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
                             "name": NAME, "image": IMAGE,
                             "args": ["netexec", f"--http-port={PORT}", "--udp-port=-1"],
                             "ports": [{"containerPort": PORT}],
                             "readinessProbe": {"httpGet": {"path": "/", "port": PORT}}}]}}}})
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": NAME, "namespace": NS},
                "spec": {"selector": labels, "ports": [{"port": PORT, "targetPort": PORT}]}})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        dep = kube.get("apps/v1", "Deployment", NAME, NS) or {}
        if dep.get("status", {}).get("readyReplicas") == 1:
            return
        time.sleep(2)
    raise AssertionError(f"{NS}/{NAME} never became ready")


def _http(e2e_lab: E2ELab) -> tuple[int, str]:
    port = e2e_lab.cfg.clusters[0].gateway.http_host_port
    return http_get("127.0.0.1", port, f"{NAME}.localhost")


def test_onboarding_opens_the_gateway_path_and_nothing_else(e2e_lab: E2ELab) -> None:
    c = e2e_lab.cfg.clusters[0]
    kube = KubeClient(c.kube_context, e2e_lab.kubeconfig)
    _deploy(kube)
    assert _http(e2e_lab)[0] != 200  # no route yet
    e2e_lab.invoke("lab.onboard", NAME, "--namespace", NS, "--port", str(PORT), "--host", NAME)
    deadline = time.monotonic() + 120
    status, body = 0, ""
    while time.monotonic() < deadline:
        status, body = _http(e2e_lab)
        if status == 200:
            break
        time.sleep(2)
    assert status == 200, body
    # ... and nothing else: another app's pod still cannot reach it.
    pod = kube.list("v1", "Pod", NS, label_selector=f"app.kubernetes.io/name={NAME}")[0]
    ip = pod["status"]["podIP"]
    res = kube.exec(PROBE_NAMESPACES[0], PROBE_POD,
                    ["/agnhost", "connect", f"{ip}:{PORT}", "--timeout=3s"], timeout=30)
    assert res.returncode != 0, res.stdout + res.stderr
    kube.delete("v1", "Namespace", NS)
