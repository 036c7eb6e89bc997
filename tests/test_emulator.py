"""The Kubernetes API emulator (tests/support/emulator.py), driven by the real ``kubernetes``
client: typed APIs, DynamicClient, watch.Watch and raw ApiClient.call_api."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # until pytest's pythonpath = ["."] is configured
    sys.path.insert(0, str(REPO))

from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from kubernetes.dynamic import DynamicClient  # noqa: E402
from kubernetes.dynamic.exceptions import (  # noqa: E402
    DynamicApiError,
    ResourceNotFoundError,
)

from tests.support.emulator import KubeEmulator  # noqa: E402

UPSTREAM = Path(os.environ.get("LAB_UPSTREAM_DIR") or REPO.parent / "shared" / "upstream")
GATEWAY_CRD = (UPSTREAM / "gateway-api-1.4.0" / "standard"
               / "gateway.networking.k8s.io_gateways.yaml")
needs_gateway_crd = pytest.mark.skipif(
    not GATEWAY_CRD.is_file(),
    reason=f"upstream Gateway API CRD not found at {GATEWAY_CRD} (set LAB_UPSTREAM_DIR)")
GW = "gateway.networking.k8s.io/v1"


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emulator:
        yield emulator
    assert emulator.callback_errors == []


@pytest.fixture
def api(emu: KubeEmulator, tmp_path: Path) -> Iterator[client.ApiClient]:
    kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig", context="kind-lab")
    configuration = client.Configuration()  # not the process-wide default
    config.load_kube_config(config_file=str(kubeconfig), context="kind-lab",
                            client_configuration=configuration)
    with client.ApiClient(configuration) as api_client:
        yield api_client


@pytest.fixture
def dyn(api: client.ApiClient, tmp_path: Path) -> DynamicClient:
    return DynamicClient(api, cache_file=str(tmp_path / "discovery.json"))


def raw(api: client.ApiClient, method: str, path: str, body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, Any]] | None = None) -> tuple[int, Any]:
    """A request made the way lab/kube.py makes them: ApiClient.call_api."""
    payload = body if body is None or isinstance(body, str) else json.dumps(body)
    request = api.param_serialize(
        method, path, query_params=query or [], body=payload, auth_settings=["BearerToken"],
        header_params={"Accept": "application/json", "Content-Type": content_type})
    response = api.call_api(*request)
    data = response.read()
    if not 200 <= response.status <= 299:  # call_api does not raise: see lab/kube.py
        raise ApiException.from_response(http_resp=response, body=None, data=None)
    return response.status, json.loads(data) if data else None


def status_of(exc: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert body["code"] == exc.status
    return body


def pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]}}


def gateway(name: str, listener_port: int = 80) -> dict[str, Any]:
    return {"apiVersion": GW, "kind": "Gateway", "metadata": {"name": name, "namespace": "default"},
            "spec": {"gatewayClassName": "cilium",
                     "listeners": [{"name": "http", "protocol": "HTTP", "port": listener_port}]}}


# -- discovery ------------------------------------------------------------------------------------

BUILTIN_KINDS = [
    ("v1", "Namespace", False), ("v1", "Node", False), ("v1", "Pod", True),
    ("v1", "Service", True), ("v1", "ConfigMap", True), ("v1", "Secret", True),
    ("v1", "ServiceAccount", True), ("v1", "Event", True), ("v1", "Endpoints", True),
    ("apps/v1", "Deployment", True), ("apps/v1", "DaemonSet", True),
    ("apps/v1", "StatefulSet", True), ("apps/v1", "ReplicaSet", True),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition", False),
    ("coordination.k8s.io/v1", "Lease", True),
    ("rbac.authorization.k8s.io/v1", "Role", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", False),
    ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration", False),
    ("discovery.k8s.io/v1", "EndpointSlice", True),
]


def test_discovery_through_dynamic_client(dyn: DynamicClient, api: client.ApiClient) -> None:
    assert dyn.version["kubernetes"]["gitVersion"] == "v1.33.1"
    for api_version, kind, namespaced in BUILTIN_KINDS:
        resource = dyn.resources.get(api_version=api_version, kind=kind)
        assert resource.namespaced is namespaced, kind
        assert "watch" in resource.verbs and "patch" in resource.verbs
    pods = dyn.resources.get(api_version="v1", kind="Pod")
    assert pods.name == "pods" and pods.short_names == ["po"]
    assert set(pods.subresources) == {"status"}
    assert "status" in dyn.resources.get(api_version="apps/v1", kind="Deployment").subresources
    assert not dyn.resources.get(api_version="v1", kind="ConfigMap").subresources

    code, groups = raw(api, "GET", "/apis")
    assert code == 200 and groups["kind"] == "APIGroupList"
    apps = next(g for g in groups["groups"] if g["name"] == "apps")
    assert apps["preferredVersion"] == {"groupVersion": "apps/v1", "version": "v1"}
    code, resources = raw(api, "GET", "/apis/apps/v1")
    names = {r["name"] for r in resources["resources"]}
    assert {"deployments", "deployments/status", "daemonsets"} <= names
    assert raw(api, "GET", "/api")[1]["versions"] == ["v1"]
    with pytest.raises(ApiException) as err:
        raw(api, "GET", "/apis/example.com/v1")
    assert err.value.status == 404


# -- built-in kinds -------------------------------------------------------------------------------

def test_cluster_scoped_namespace_crud(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    created = core.create_namespace({"metadata": {"name": "lab", "labels": {"team": "a"}}})
    assert created.metadata.uid and created.metadata.generation == 1
    assert created.metadata.labels == {"team": "a", "kubernetes.io/metadata.name": "lab"}
    assert created.status.phase == "Active"
    assert core.read_namespace("lab").metadata.resource_version == \
        created.metadata.resource_version

    def names(**kwargs: Any) -> list[str]:
        return [n.metadata.name for n in core.list_namespace(**kwargs).items]

    assert names(label_selector="team=a") == ["lab"]
    assert names(label_selector="!team") == ["default", "kube-node-lease", "kube-public",
                                             "kube-system"]
    assert names(label_selector="team,kubernetes.io/metadata.name in (lab,default)") == ["lab"]
    assert names(field_selector="metadata.name=default") == ["default"]

    with pytest.raises(ApiException) as err:
        core.create_namespace({"metadata": {"name": "lab"}})
    assert err.value.status == 409 and status_of(err.value)["reason"] == "AlreadyExists"

    patched = core.patch_namespace("lab", {"metadata": {"labels": {"team": None, "x": "y"}}},
                                   _content_type="application/merge-patch+json")
    assert "team" not in patched.metadata.labels and patched.metadata.labels["x"] == "y"
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)

    core.create_namespaced_config_map("lab", {"metadata": {"name": "inside"}})
    core.delete_namespace("lab")
    for read in (lambda: core.read_namespace("lab"),
                 lambda: core.read_namespaced_config_map("inside", "lab")):
        with pytest.raises(ApiException) as err:
            read()
        assert err.value.status == 404 and status_of(err.value)["reason"] == "NotFound"


def test_namespaced_builtin_crud_patches_and_status(api: client.ApiClient) -> None:
    apps = client.AppsV1Api(api)
    body = {"metadata": {"name": "web", "labels": {"app": "web", "tier": "front"}},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                         "containers": [{"name": "app", "image": "nginx:1"},
                                        {"name": "sidecar", "image": "envoy:1"}]}}},
            "status": {"replicas": 99}}
    created = apps.create_namespaced_deployment("default", body)
    assert created.metadata.namespace == "default" and created.status is None  # status dropped

    def names(**kwargs: Any) -> list[str]:
        return [d.metadata.name for d in apps.list_namespaced_deployment("default", **kwargs).items]

    assert names(label_selector="app in (web,api),tier") == ["web"]
    assert names(label_selector="app notin (web)") == []
    assert names(label_selector="tier!=back") == ["web"]
    assert names(field_selector="metadata.namespace=default,metadata.name=web") == ["web"]
    assert [d.metadata.name for d in apps.list_deployment_for_all_namespaces().items] == ["web"]

    # strategic merge: containers merge by name; a spec change bumps the generation
    patched = apps.patch_namespaced_deployment("web", "default", {"spec": {"template": {"spec": {
        "containers": [{"name": "sidecar", "image": "envoy:2"}]}}}})
    assert [(c.name, c.image) for c in patched.spec.template.spec.containers] == [
        ("app", "nginx:1"), ("sidecar", "envoy:2")]
    assert patched.metadata.generation == 2

    # JSON patch, including a failing test op (422)
    patched = apps.patch_namespaced_deployment("web", "default", [
        {"op": "test", "path": "/spec/replicas", "value": 1},
        {"op": "replace", "path": "/spec/replicas", "value": 3},
        {"op": "add", "path": "/metadata/labels/new", "value": "yes"}])
    assert patched.spec.replicas == 3 and patched.metadata.labels["new"] == "yes"
    with pytest.raises(ApiException) as err:
        apps.patch_namespaced_deployment("web", "default", [
            {"op": "test", "path": "/spec/replicas", "value": 1}])
    assert err.value.status == 422

    # status subresource: only .status changes there, and .status is ignored elsewhere
    with_status = apps.patch_namespaced_deployment_status(
        "web", "default", {"status": {"readyReplicas": 3}, "spec": {"replicas": 7}})
    assert with_status.status.ready_replicas == 3 and with_status.spec.replicas == 3
    assert with_status.metadata.generation == 3
    ignored = apps.patch_namespaced_deployment("web", "default", {"status": {"readyReplicas": 0}})
    assert ignored.status.ready_replicas == 3
    assert apps.read_namespaced_deployment_status("web", "default").status.ready_replicas == 3

    # PUT with a stale resourceVersion is a 409 Conflict; with the current one it works
    with pytest.raises(ApiException) as err:
        apps.replace_namespaced_deployment("web", "default", created)  # resourceVersion 1st
    assert err.value.status == 409 and status_of(err.value)["reason"] == "Conflict"
    current = apps.read_namespaced_deployment("web", "default")
    current.spec.replicas = 5
    assert apps.replace_namespaced_deployment("web", "default", current).spec.replicas == 5

    apps.delete_namespaced_deployment("web", "default")
    with pytest.raises(ApiException) as err:
        apps.delete_namespaced_deployment("web", "default")
    assert err.value.status == 404


def test_generate_name_finalizers_and_pagination(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    made = core.create_namespaced_config_map(
        "default", {"metadata": {"generateName": "cm-", "finalizers": ["lab/keep"]}})
    name = made.metadata.name
    assert name.startswith("cm-") and len(name) == 8

    code, pending = raw(api, "DELETE", f"/api/v1/namespaces/default/configmaps/{name}")
    assert code == 202 and pending["metadata"]["deletionTimestamp"]
    assert core.read_namespaced_config_map(name, "default").metadata.deletion_timestamp
    core.patch_namespaced_config_map(name, "default", {"metadata": {"finalizers": None}},
                                     _content_type="application/merge-patch+json")
    with pytest.raises(ApiException):
        core.read_namespaced_config_map(name, "default")

    for n in range(5):
        core.create_namespaced_config_map("default", {"metadata": {"name": f"page-{n}"}})
    first = core.list_namespaced_config_map("default", limit=2)
    assert [c.metadata.name for c in first.items] == ["page-0", "page-1"]
    rest = core.list_namespaced_config_map("default", limit=10, _continue=first.metadata._continue)
    assert [c.metadata.name for c in rest.items] == ["page-2", "page-3", "page-4"]
    core.delete_collection_namespaced_config_map("default", label_selector="")
    assert core.list_namespaced_config_map("default").items == []


# -- server-side apply ----------------------------------------------------------------------------

def test_server_side_apply(dyn: DynamicClient, api: client.ApiClient) -> None:
    cms = dyn.resources.get(api_version="v1", kind="ConfigMap")
    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": "default", "labels": {"a": "1"}},
            "data": {"one": "1", "two": "2"}}
    created = cms.server_side_apply(body=body, name="cfg", namespace="default",
                                    field_manager="lab", force_conflicts=True)
    assert created.data.to_dict() == {"one": "1", "two": "2"}
    [entry] = created.metadata.managedFields
    assert (entry.manager, entry.operation) == ("lab", "Apply")

    # another writer's field survives; the field "lab" stops applying is removed
    cms.patch(body={"data": {"other": "x"}}, name="cfg", namespace="default",
              content_type="application/merge-patch+json")
    body["data"] = {"one": "1b"}
    again = cms.server_side_apply(body=body, name="cfg", namespace="default", field_manager="lab")
    assert again.data.to_dict() == {"one": "1b", "other": "x"}
    assert again.metadata.labels.to_dict() == {"a": "1"}

    # a second applier changing an owned value conflicts unless forced
    theirs = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "cfg", "namespace": "default"}, "data": {"one": "mine"}}
    with pytest.raises(DynamicApiError) as err:
        cms.server_side_apply(body=theirs, name="cfg", namespace="default", field_manager="other")
    assert err.value.status == 409 and "conflict" in json.loads(err.value.body)["message"]
    forced = cms.server_side_apply(body=theirs, name="cfg", namespace="default",
                                   field_manager="other", force_conflicts=True)
    assert forced.data.one == "mine"
    assert {m.manager for m in forced.metadata.managedFields} == {"lab", "other"}

    # apply needs a fieldManager (400); a YAML body is accepted
    with pytest.raises(DynamicApiError) as err:
        cms.patch(body=body, name="cfg", namespace="default",
                  content_type="application/apply-patch+yaml")
    assert err.value.status == 400
    code, made = raw(api, "PATCH", "/api/v1/namespaces/default/configmaps/from-yaml",
                     body="apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-yaml\n"
                          "data:\n  k: v\n",
                     content_type="application/apply-patch+yaml",
                     query=[("fieldManager", "lab"), ("force", "true")])
    assert code == 201 and made["data"] == {"k": "v"} and made["metadata"]["namespace"] == "default"


# -- custom resources -----------------------------------------------------------------------------

@needs_gateway_crd
def test_gateway_crd_from_upstream(emu: KubeEmulator, dyn: DynamicClient,
                                   api: client.ApiClient) -> None:
    assert emu.load_crds([GATEWAY_CRD]) == ["gateways.gateway.networking.k8s.io"]
    gateways = dyn.resources.get(api_version=GW, kind="Gateway")
    assert gateways.namespaced and gateways.short_names == ["gtw"]
    assert "status" in gateways.subresources
    assert dyn.resources.get(api_version="gateway.networking.k8s.io/v1beta1", kind="Gateway")
    crd = dyn.resources.get(api_version="apiextensions.k8s.io/v1",
                            kind="CustomResourceDefinition").get(
        name="gateways.gateway.networking.k8s.io")
    assert {c.type: c.status for c in crd.status.conditions}["Established"] == "True"

    # a controller stand-in: program every Gateway created through the API
    def controller(verb: str, obj: dict[str, Any]) -> None:
        if verb == "create" and obj["kind"] == "Gateway":
            emu.patch_status(GW, "Gateway", obj["metadata"]["name"], "default", {"conditions": [
                {"type": "Programmed", "status": "True", "reason": "Programmed"}]})

    emu.on_write(controller)
    created = gateways.create(body=gateway("gw", 80), namespace="default")
    assert created.metadata.generation == 1 and created.status is None
    read = gateways.get(name="gw", namespace="default")
    assert read.status.conditions[0].type == "Programmed"
    assert [g.metadata.name for g in gateways.get(namespace="default").items] == ["gw"]
    assert emu.get(GW, "Gateway", "gw", "default")["spec"]["gatewayClassName"] == "cilium"

    patched = gateways.patch(body={"spec": {"gatewayClassName": "other"}}, name="gw",
                             namespace="default", content_type="application/merge-patch+json")
    assert patched.spec.gatewayClassName == "other" and patched.metadata.generation == 2
    with pytest.raises(DynamicApiError) as err:  # like a real server: no strategic merge for CRs
        gateways.patch(body={"spec": {}}, name="gw", namespace="default")
    assert err.value.status == 415

    custom = client.CustomObjectsApi(api)
    applied = custom.patch_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", "default", "gateways", "gw", gateway("gw", 8080),
        field_manager="lab", force=True, _content_type="application/apply-patch+yaml")
    assert applied["spec"]["listeners"][0]["port"] == 8080
    assert applied["spec"]["gatewayClassName"] == "cilium"
    status = custom.patch_namespaced_custom_object_status(
        "gateway.networking.k8s.io", "v1", "default", "gateways", "gw",
        {"status": {"addresses": [{"type": "IPAddress", "value": "172.18.0.200"}]},
         "spec": {"gatewayClassName": "ignored"}})
    assert status["status"]["addresses"][0]["value"] == "172.18.0.200"
    assert status["spec"]["gatewayClassName"] == "cilium"
    assert status["metadata"]["generation"] == applied["metadata"]["generation"]

    gateways.delete(name="gw", namespace="default")
    with pytest.raises(DynamicApiError) as err:
        gateways.get(name="gw", namespace="default")
    assert err.value.status == 404


def test_crd_created_through_the_api_becomes_discoverable(dyn: DynamicClient,
                                                          tmp_path: Path) -> None:
    crds = dyn.resources.get(api_version="apiextensions.k8s.io/v1",
                             kind="CustomResourceDefinition")
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "widgets.example.com"},
           "spec": {"group": "example.com", "scope": "Cluster",
                    "names": {"kind": "Widget", "plural": "widgets", "singular": "widget",
                              "shortNames": ["wd"]},
                    "versions": [
                        {"name": "v1alpha1", "served": True, "storage": False},
                        {"name": "v1", "served": True, "storage": True,
                         "subresources": {"status": {}}}]}}
    crds.create(body=crd)
    widgets = dyn.resources.get(api_version="example.com/v1", kind="Widget")
    assert not widgets.namespaced and widgets.short_names == ["wd"]
    widgets.create(body={"apiVersion": "example.com/v1", "kind": "Widget",
                         "metadata": {"name": "w1"}, "spec": {"size": 1}})
    old_version = dyn.resources.get(api_version="example.com/v1alpha1", kind="Widget")
    listed = old_version.get()
    assert [(w.apiVersion, w.metadata.name) for w in listed.items] == [
        ("example.com/v1alpha1", "w1")]

    crds.delete(name="widgets.example.com")
    fresh = DynamicClient(dyn.client, cache_file=str(tmp_path / "fresh.json"))
    with pytest.raises(ResourceNotFoundError, match="No matches found"):
        fresh.resources.get(api_version="example.com/v1", kind="Widget")


# -- watch ----------------------------------------------------------------------------------------

def test_typed_watch_sees_writes_from_another_thread(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_pod("default", pod("before"))
    since = core.list_namespaced_pod("default").metadata.resource_version

    def writer() -> None:
        core.create_namespaced_pod("default", pod("p1"))
        core.patch_namespaced_pod("p1", "default", {"metadata": {"labels": {"x": "y"}}})
        core.delete_namespaced_pod("p1", "default")

    watcher = watch.Watch()
    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    for event in watcher.stream(core.list_namespaced_pod, "default", resource_version=since,
                                timeout_seconds=5):
        seen.append((event["type"], event["object"].metadata.name))
        assert isinstance(event["object"], client.V1Pod)
        if event["type"] == "DELETED":
            watcher.stop()
    thread.join()
    assert seen == [("ADDED", "p1"), ("MODIFIED", "p1"), ("DELETED", "p1")]

    # without a resourceVersion the stream starts with what exists
    watcher = watch.Watch()
    initial = []
    for event in watcher.stream(core.list_namespaced_pod, "default", timeout_seconds=5):
        initial.append((event["type"], event["object"].metadata.name))
        watcher.stop()
    assert initial == [("ADDED", "before")]


def test_dynamic_watch_with_label_selector(dyn: DynamicClient, emu: KubeEmulator) -> None:
    pods = dyn.resources.get(api_version="v1", kind="Pod")
    since = pods.get(namespace="default").metadata.resourceVersion

    def writer() -> None:
        pods.create(body=pod("other", {"app": "db"}), namespace="default")
        pods.create(body=pod("web", {"app": "web"}), namespace="default")
        pods.patch(body={"metadata": {"labels": {"app": "db"}}}, name="web", namespace="default",
                   content_type="application/merge-patch+json")

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    watcher = watch.Watch()
    for event in pods.watch(namespace="default", label_selector="app=web",
                            resource_version=since, timeout=5, watcher=watcher):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 2:
            watcher.stop()
    thread.join()
    assert seen == [("ADDED", "web"), ("DELETED", "web")]  # relabelled out of the selection


def test_stop_ends_open_watches(emu: KubeEmulator, api: client.ApiClient) -> None:
    outcome: list[Any] = []

    def watch_forever() -> None:
        try:
            code, _ = raw(api, "GET", "/api/v1/pods", query=[("watch", "true"),
                                                             ("timeoutSeconds", "60")])
            outcome.append(code)
        except Exception as exc:  # the emulator stopping may cut the stream
            outcome.append(exc)

    thread = threading.Thread(target=watch_forever)
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    emu.stop()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - started < 2
    # the watch ended: cleanly (200, end of stream) or cut at the socket, never an API error
    (result,) = outcome
    assert result == 200 or isinstance(result, (OSError, urllib3.exceptions.HTTPError)), result


# -- the test-side API ----------------------------------------------------------------------------

def test_python_side_api(emu: KubeEmulator, api: client.ApiClient) -> None:
    stored = emu.put({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
                      "status": {"phase": "Running"}})
    assert stored["metadata"]["resourceVersion"] == str(emu.resource_version)
    assert emu.get("v1", "Node", "n1")["status"] == {"phase": "Running"}
    emu.patch_status("v1", "Node", "n1", None, {"addresses": [{"type": "InternalIP",
                                                              "address": "172.18.0.2"}]})
    node = client.CoreV1Api(api).read_node("n1")
    assert node.status.addresses[0].address == "172.18.0.2" and node.status.phase == "Running"
    assert [n["metadata"]["name"] for n in emu.list("v1", "Namespace")] == [
        "default", "kube-node-lease", "kube-public", "kube-system"]
    assert emu.delete("v1", "Node", "n1") and not emu.delete("v1", "Node", "n1")
    assert emu.get("v1", "Node", "n1") is None

    emu.clear_requests()
    core = client.CoreV1Api(api)
    emu.fail_next("GET", r"/namespaces/default/configmaps$", 503, "ServiceUnavailable")
    with pytest.raises(ApiException) as err:
        core.list_namespaced_config_map("default")
    assert err.value.status == 503 and status_of(err.value)["reason"] == "ServiceUnavailable"
    assert core.list_namespaced_config_map("default").items == []
    core.create_namespaced_config_map("default", {"metadata": {"name": "c"}},
                                      field_manager="lab")
    assert [(r.method, r.path) for r in emu.writes()] == [
        ("POST", "/api/v1/namespaces/default/configmaps")]
    method, path, query, _content_type = emu.writes()[0]  # a plain 4-tuple too
    assert (method, path, query) == ("POST", "/api/v1/namespaces/default/configmaps",
                                     {"fieldManager": "lab"})
    assert len(emu.requests) == 3


def test_kubeconfig_holds_several_emulators(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    with KubeEmulator() as one, KubeEmulator(strict_namespaces=True) as two:
        one.write_kubeconfig(kubeconfig, context="kind-one")
        two.write_kubeconfig(kubeconfig, context="kind-two")
        data = yaml.safe_load(kubeconfig.read_text())
        assert data["current-context"] == "kind-one"
        assert [c["name"] for c in data["contexts"]] == ["kind-one", "kind-two"]
        api_two = config.new_client_from_config(str(kubeconfig), context="kind-two")
        try:
            with pytest.raises(ApiException) as err:  # strict: the namespace must exist
                client.CoreV1Api(api_two).create_namespaced_config_map(
                    "missing", {"metadata": {"name": "c"}})
            assert err.value.status == 404
        finally:
            api_two.close()
        assert one.list("v1", "ConfigMap") == [] and two.list("v1", "ConfigMap") == []
