"""Server-side apply in the API emulator (tests/support/emulator.py): lists merged by the schema's
list type, as a real API server does. Map lists (``x-kubernetes-list-type: map``) are merged and
owned item by item by key, sets value by value, atomic lists (the default) replaced whole; list
semantics come from the stored CRD's ``openAPIV3Schema`` for custom kinds and from a small table
of the well-known map lists for built-in ones. Driven through ``lab.kube.KubeClient`` (the real
``kubernetes`` client underneath) and raw requests for the error bodies."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.kube import Conflict, KubeClient
from tests.support.emulator import KubeEmulator

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = Path(os.environ.get("LAB_UPSTREAM_DIR") or REPO.parent / "shared" / "upstream")
GATEWAY_CRD = (UPSTREAM / "gateway-api-1.4.0" / "standard"
               / "gateway.networking.k8s.io_gateways.yaml")
needs_gateway_crd = pytest.mark.skipif(
    not GATEWAY_CRD.is_file(),
    reason=f"upstream Gateway API v1.4.0 CRD not found at {GATEWAY_CRD} "
           f"(set LAB_UPSTREAM_DIR to the shared/upstream folder)")

GW = "gateway.networking.k8s.io/v1"
GATEWAY_MANAGER = "kind-cilium-lab-gateway"  # step `gateway`
CERTS_MANAGER = "kind-cilium-lab-certs"  # step `certs`
Obj = dict[str, Any]


# -- fixtures and helpers -------------------------------------------------------------------------

@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emulator:
        yield emulator
    assert emulator.callback_errors == []


@pytest.fixture
def kube(emu: KubeEmulator, tmp_path: Path) -> Iterator[KubeClient]:
    kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig", context="kind-lab")
    client = KubeClient("kind-lab", str(kubeconfig))
    yield client
    client.close()


@pytest.fixture
def gateway_crd(emu: KubeEmulator) -> None:
    if not GATEWAY_CRD.is_file():
        pytest.skip(f"upstream Gateway API v1.4.0 CRD not found at {GATEWAY_CRD} "
                    f"(set LAB_UPSTREAM_DIR to the shared/upstream folder)")
    assert emu.load_crds([GATEWAY_CRD]) == ["gateways.gateway.networking.k8s.io"]


def raw_apply(kube: KubeClient, path: str, body: Obj, manager: str,
              force: bool = False) -> tuple[int, Obj]:
    """An apply whose error body is kept (KubeClient maps errors to exceptions)."""
    query = [("fieldManager", manager)] + ([("force", "true")] if force else [])
    request = kube.api.param_serialize(
        "PATCH", path, query_params=query, body=json.dumps(body), auth_settings=["BearerToken"],
        header_params={"Accept": "application/json",
                       "Content-Type": "application/apply-patch+yaml"})
    response = kube.api.call_api(*request)
    data = response.read()
    return response.status, json.loads(data) if data else {}


def managed(obj: Obj, manager: str, subresource: str | None = None) -> Obj:
    """The fieldsV1 of one manager's Apply entry."""
    [entry] = [e for e in obj["metadata"]["managedFields"]
               if e["manager"] == manager and e.get("subresource") == subresource]
    assert entry["operation"] == "Apply"
    fields: Obj = entry["fieldsV1"]
    return fields


def managers(obj: Obj) -> set[str]:
    return {e["manager"] for e in obj["metadata"].get("managedFields") or []}


def listener(name: str, port: int, **extra: Any) -> Obj:
    return {"name": name, "protocol": "HTTPS" if port == 443 else "HTTP", "port": port,
            "allowedRoutes": {"namespaces": {"from": "All"}}, **extra}


def gateway(*listeners: Obj, class_name: str | None = "cilium", **meta: Any) -> Obj:
    spec: Obj = {"listeners": list(listeners)} if listeners else {}
    if class_name is not None:
        spec["gatewayClassName"] = class_name
    return {"apiVersion": GW, "kind": "Gateway",
            "metadata": {"name": "lab", "namespace": "lab-gateway", **meta}, "spec": spec}


HTTP = listener("http", 80)
HTTPS = listener("https", 443, hostname="*.localhost", tls={
    "mode": "Terminate", "certificateRefs": [{"group": "", "kind": "Secret", "name": "gw-cert"}]})


def listener_names(emu: KubeEmulator) -> list[str]:
    gw = emu.get(GW, "Gateway", "lab", "lab-gateway")
    assert gw is not None
    return [item["name"] for item in gw["spec"].get("listeners") or []]


def stored(emu: KubeEmulator, api_version: str, kind: str, name: str,
           namespace: str | None = "default") -> Obj:
    obj = emu.get(api_version, kind, name, namespace)
    assert obj is not None
    return obj


# -- Gateway listeners: a map list keyed by name (Gateway API v1.4.0 CRD) --------------------------

@needs_gateway_crd
def test_gateway_listeners_split_between_two_managers(emu: KubeEmulator, kube: KubeClient,
                                                      gateway_crd: None) -> None:
    kube.apply(gateway(HTTP, labels={"app.kubernetes.io/managed-by": "lab"}),
               field_manager=GATEWAY_MANAGER, force=False)
    # gatewayClassName is applied by both alike: co-owned, no conflict even without force
    after = kube.apply(gateway(HTTPS), field_manager=CERTS_MANAGER, force=False)
    assert [item["name"] for item in after["spec"]["listeners"]] == ["http", "https"]
    assert after["spec"]["listeners"][1] == HTTPS
    assert after["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "lab"}
    assert managers(after) == {GATEWAY_MANAGER, CERTS_MANAGER}

    # each manager owns its own listener, addressed by key as on a real server
    mine = managed(after, GATEWAY_MANAGER)["f:spec"]
    theirs = managed(after, CERTS_MANAGER)["f:spec"]
    assert list(mine["f:listeners"]) == ['k:{"name":"http"}']
    assert list(theirs["f:listeners"]) == ['k:{"name":"https"}']
    http_fields = mine["f:listeners"]['k:{"name":"http"}']
    assert http_fields["."] == {} and http_fields["f:port"] == {}
    assert http_fields["f:allowedRoutes"] == {"f:namespaces": {"f:from": {}}}
    assert "f:gatewayClassName" in mine and "f:gatewayClassName" in theirs

    # re-applying either step keeps the other's listener, in place
    kube.apply(gateway(HTTP, labels={"app.kubernetes.io/managed-by": "lab"}),
               field_manager=GATEWAY_MANAGER, force=False)
    assert listener_names(emu) == ["http", "https"]
    kube.apply(gateway(HTTPS), field_manager=CERTS_MANAGER, force=False)
    assert listener_names(emu) == ["http", "https"]
    kube.apply(gateway(HTTP, labels={"app.kubernetes.io/managed-by": "lab"}),
               field_manager=GATEWAY_MANAGER)  # KubeClient's default: force
    gw = stored(emu, GW, "Gateway", "lab", "lab-gateway")
    assert [item["name"] for item in gw["spec"]["listeners"]] == ["http", "https"]
    assert gw["spec"]["listeners"] == [HTTP, HTTPS]


@needs_gateway_crd
def test_gateway_manager_dropping_its_listener_removes_only_that_one(
        emu: KubeEmulator, kube: KubeClient, gateway_crd: None) -> None:
    kube.apply(gateway(HTTP), field_manager=GATEWAY_MANAGER)
    kube.apply(gateway(HTTPS), field_manager=CERTS_MANAGER)

    # a field the certs manager stops applying goes from its listener only
    no_hostname = {k: v for k, v in HTTPS.items() if k != "hostname"}
    after = kube.apply(gateway(no_hostname), field_manager=CERTS_MANAGER)
    assert after["spec"]["listeners"] == [HTTP, no_hostname]

    # the certs manager drops its listener: only that one goes
    after = kube.apply(gateway(), field_manager=CERTS_MANAGER)
    assert [item["name"] for item in after["spec"]["listeners"]] == ["http"]
    assert after["spec"]["gatewayClassName"] == "cilium"
    assert "f:listeners" not in managed(after, CERTS_MANAGER)["f:spec"]

    # and the other way round
    kube.apply(gateway(HTTPS), field_manager=CERTS_MANAGER)
    assert listener_names(emu) == ["http", "https"]
    after = kube.apply(gateway(), field_manager=GATEWAY_MANAGER)
    assert after["spec"]["listeners"] == [HTTPS]

    # the last listener going takes the (then empty) list with it
    after = kube.apply(gateway(), field_manager=CERTS_MANAGER)
    assert "listeners" not in after["spec"]
    assert after["spec"]["gatewayClassName"] == "cilium"


@needs_gateway_crd
def test_gateway_listener_owned_by_both_survives_one_dropping_it(
        emu: KubeEmulator, kube: KubeClient, gateway_crd: None) -> None:
    kube.apply(gateway(HTTP), field_manager=GATEWAY_MANAGER, force=False)
    kube.apply(gateway(HTTP, HTTPS), field_manager=CERTS_MANAGER, force=False)  # same values
    assert listener_names(emu) == ["http", "https"]
    kube.apply(gateway(HTTPS), field_manager=CERTS_MANAGER, force=False)
    assert stored(emu, GW, "Gateway", "lab", "lab-gateway")["spec"]["listeners"] == [HTTP, HTTPS]
    kube.apply(gateway(), field_manager=GATEWAY_MANAGER, force=False)
    assert listener_names(emu) == ["https"]


@needs_gateway_crd
def test_gateway_listener_conflict_names_the_keyed_field(
        emu: KubeEmulator, kube: KubeClient, gateway_crd: None) -> None:
    kube.apply(gateway(HTTP, HTTPS), field_manager=GATEWAY_MANAGER)
    path = "/apis/gateway.networking.k8s.io/v1/namespaces/lab-gateway/gateways/lab"
    moved = gateway({**HTTP, "port": 8080}, class_name="other")
    code, body = raw_apply(kube, path, moved, CERTS_MANAGER)
    assert code == 409 and body["reason"] == "Conflict"
    fields = sorted(c["field"] for c in body["details"]["causes"])
    assert fields == [".spec.gatewayClassName", '.spec.listeners[name="http"].port']
    assert {c["message"] for c in body["details"]["causes"]} == {
        f'conflict with "{GATEWAY_MANAGER}"'}
    assert body["message"].startswith("Apply failed with 2 conflicts: ")
    with pytest.raises(Conflict):
        kube.apply(moved, field_manager=CERTS_MANAGER, force=False)
    assert stored(emu, GW, "Gateway", "lab", "lab-gateway")["spec"]["listeners"] == [HTTP, HTTPS]

    # forced: the port and the class change hands, the rest of the listener stays shared
    code, after = raw_apply(kube, path, moved, CERTS_MANAGER, force=True)
    assert code == 200
    assert after["spec"]["listeners"] == [{**HTTP, "port": 8080}, HTTPS]
    http_fields = managed(after, GATEWAY_MANAGER)["f:spec"]["f:listeners"]['k:{"name":"http"}']
    assert "f:port" not in http_fields and "f:protocol" in http_fields
    assert "f:gatewayClassName" not in managed(after, GATEWAY_MANAGER)["f:spec"]
    # the gateway manager re-applying its old port now conflicts with the certs manager
    code, body = raw_apply(kube, path, gateway(HTTP, HTTPS), GATEWAY_MANAGER)
    assert code == 409
    assert body["message"] == (f'Apply failed with 2 conflicts: conflicts with "{CERTS_MANAGER}":'
                               f'\n- .spec.gatewayClassName\n- .spec.listeners[name="http"].port')


@needs_gateway_crd
def test_gateway_duplicate_listener_names_are_refused(
        emu: KubeEmulator, kube: KubeClient, gateway_crd: None) -> None:
    path = "/apis/gateway.networking.k8s.io/v1/namespaces/lab-gateway/gateways/lab"
    code, body = raw_apply(kube, path, gateway(HTTP, {**HTTP, "port": 81}), GATEWAY_MANAGER)
    assert code == 500  # what a real server answers (structured-merge-diff's error)
    assert body["message"] == (
        "failed to create typed patch object (lab-gateway/lab; gateway.networking.k8s.io/v1, "
        'Kind=Gateway): .spec.listeners: duplicate entries for key [name="http"]')
    assert emu.get(GW, "Gateway", "lab", "lab-gateway") is None


@needs_gateway_crd
def test_gateway_atomic_lists_inside_listeners_are_replaced(
        emu: KubeEmulator, kube: KubeClient, gateway_crd: None) -> None:
    """tls.certificateRefs is `x-kubernetes-list-type: atomic` in the CRD."""
    kube.apply(gateway(HTTPS), field_manager=CERTS_MANAGER)
    refs = [{"group": "", "kind": "Secret", "name": "other-cert"}]
    changed = {**HTTPS, "tls": {"mode": "Terminate", "certificateRefs": refs}}
    after = kube.apply(gateway(changed), field_manager=CERTS_MANAGER)
    assert after["spec"]["listeners"][0]["tls"]["certificateRefs"] == refs
    tls = managed(after, CERTS_MANAGER)["f:spec"]["f:listeners"]['k:{"name":"https"}']["f:tls"]
    assert tls == {"f:certificateRefs": {}, "f:mode": {}}


# -- built-in kinds: the table of well-known map lists --------------------------------------------

def deployment(*containers: Obj, **spec: Any) -> Obj:
    template: Obj = {"metadata": {"labels": {"app": "web"}}, "spec": {
        "containers": list(containers)}}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template, **spec}}


def containers_of(obj: Obj) -> list[Obj]:
    found: list[Obj] = obj["spec"]["template"]["spec"]["containers"]
    return found


def test_deployment_containers_merge_by_name_across_managers(emu: KubeEmulator,
                                                             kube: KubeClient) -> None:
    app = {"name": "app", "image": "nginx:1.27", "ports": [{"containerPort": 80}],
           "env": [{"name": "A", "value": "1"}]}
    kube.apply(deployment(app, replicas=2), field_manager="lab", force=False)
    sidecar = {"name": "sidecar", "image": "envoy:1.31"}
    after = kube.apply(deployment(sidecar), field_manager="mesh", force=False)
    assert [c["name"] for c in containers_of(after)] == ["app", "sidecar"]
    assert containers_of(after)[0] == app and after["spec"]["replicas"] == 2
    spec_fields = managed(after, "mesh")["f:spec"]["f:template"]["f:spec"]
    assert list(spec_fields["f:containers"]) == ['k:{"name":"sidecar"}']

    # a second manager adds an env var to the first manager's container: env merges by name
    after = kube.apply(deployment(sidecar, {"name": "app", "env": [{"name": "B", "value": "2"}]}),
                       field_manager="mesh", force=False)
    assert [c["name"] for c in containers_of(after)] == ["app", "sidecar"]  # order kept
    assert containers_of(after)[0]["env"] == [{"name": "A", "value": "1"},
                                              {"name": "B", "value": "2"}]
    # the first manager drops its env var (and a port, keyed by containerPort+protocol, with
    # protocol defaulting to TCP): only its own item goes
    app2 = {"name": "app", "image": "nginx:1.27",
            "ports": [{"containerPort": 80, "protocol": "TCP", "name": "http"}]}
    after = kube.apply(deployment(app2, replicas=2), field_manager="lab", force=False)
    [merged_app, _] = containers_of(after)
    assert merged_app["env"] == [{"name": "B", "value": "2"}]
    assert merged_app["ports"] == [{"containerPort": 80, "protocol": "TCP", "name": "http"}]
    ports = managed(after, "lab")["f:spec"]["f:template"]["f:spec"]["f:containers"][
        'k:{"name":"app"}']["f:ports"]
    assert list(ports) == ['k:{"containerPort":80,"protocol":"TCP"}']

    # another manager changing the first one's image conflicts, keyed by container name
    with pytest.raises(Conflict) as err:
        kube.apply(deployment({"name": "app", "image": "nginx:1.28"}), field_manager="mesh",
                   force=False)
    assert '.spec.template.spec.containers[name="app"].image' in err.value.message
    # the mesh manager leaving takes its sidecar and its env var, not the app container
    after = kube.apply(deployment(), field_manager="mesh", force=False)
    assert containers_of(after) == [app2]


def test_service_ports_merge_by_port_and_protocol(emu: KubeEmulator, kube: KubeClient) -> None:
    def service(*ports: Obj) -> Obj:
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "dns", "namespace": "default"},
                "spec": {"selector": {"app": "dns"}, "ports": list(ports)}}

    kube.apply(service({"name": "dns-tcp", "port": 53}), field_manager="a", force=False)
    after = kube.apply(service({"name": "dns-udp", "port": 53, "protocol": "UDP"}),
                       field_manager="b", force=False)
    assert [(p["port"], p.get("protocol")) for p in after["spec"]["ports"]] == [
        (53, None), (53, "UDP")]  # two items: TCP (by default) and UDP
    after = kube.apply(service(), field_manager="a", force=False)
    assert after["spec"]["ports"] == [{"name": "dns-udp", "port": 53, "protocol": "UDP"}]
    assert after["spec"]["selector"] == {"app": "dns"}  # co-owned (an atomic map, equal)


def test_status_conditions_merge_by_type(emu: KubeEmulator, kube: KubeClient) -> None:
    kube.apply(deployment({"name": "app", "image": "nginx"}), field_manager="lab")
    path = "/apis/apps/v1/namespaces/default/deployments/web/status"

    def status(*types: str) -> Obj:
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "default"},
                "status": {"conditions": [{"type": t, "status": "True"} for t in types]}}

    assert raw_apply(kube, path, status("Available"), "controller-a")[0] == 200
    code, after = raw_apply(kube, path, status("Progressing"), "controller-b")
    assert code == 200
    assert [c["type"] for c in after["status"]["conditions"]] == ["Available", "Progressing"]
    code, after = raw_apply(kube, path, status(), "controller-a")
    assert [c["type"] for c in after["status"]["conditions"]] == ["Progressing"]
    assert managed(after, "controller-b", "status") == {"f:status": {"f:conditions": {
        'k:{"type":"Progressing"}': {".": {}, "f:status": {}, "f:type": {}}}}}
    assert containers_of(after) == [{"name": "app", "image": "nginx"}]  # spec untouched


# -- lists by CRD schema: set, atomic, map with a defaulted key, atomic map -----------------------

def widget_crd() -> Obj:
    port_item = {"type": "object", "required": ["port"], "properties": {
        "port": {"type": "integer"}, "protocol": {"type": "string", "default": "TCP"},
        "name": {"type": "string"}}}
    v1: Obj = {"type": "object", "properties": {"spec": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
        "hosts": {"type": "array", "items": {"type": "string"}},  # atomic: the default
        "rules": {"type": "array", "x-kubernetes-list-type": "atomic",
                  "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "ports": {"type": "array", "items": port_item, "x-kubernetes-list-type": "map",
                  "x-kubernetes-list-map-keys": ["port", "protocol"]},
        "selector": {"type": "object", "x-kubernetes-map-type": "atomic",
                     "additionalProperties": {"type": "string"}},
        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    }}}}
    v1alpha1 = copy.deepcopy(v1)
    del v1alpha1["properties"]["spec"]["properties"]["tags"]["x-kubernetes-list-type"]
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                     "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
                     "versions": [
                         {"name": "v1", "served": True, "storage": True,
                          "schema": {"openAPIV3Schema": v1}},
                         {"name": "v1alpha1", "served": True, "storage": False,
                          "schema": {"openAPIV3Schema": v1alpha1}}]}}


def widget(name: str = "w", api_version: str = "example.com/v1", **spec: Any) -> Obj:
    return {"apiVersion": api_version, "kind": "Widget",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


@pytest.fixture
def widgets(emu: KubeEmulator) -> None:
    emu.put(widget_crd())


def test_set_list_owned_value_by_value(emu: KubeEmulator, kube: KubeClient,
                                       widgets: None) -> None:
    kube.apply(widget(tags=["a", "shared"]), field_manager="one", force=False)
    after = kube.apply(widget(tags=["b", "shared"]), field_manager="two", force=False)
    assert after["spec"]["tags"] == ["a", "shared", "b"]  # kept in place, new ones appended
    assert managed(after, "two") == {"f:spec": {"f:tags": {'v:"b"': {}, 'v:"shared"': {}}}}
    after = kube.apply(widget(), field_manager="one", force=False)
    assert after["spec"]["tags"] == ["shared", "b"]  # "shared" is co-owned by "two"
    after = kube.apply(widget(), field_manager="two", force=False)
    assert "tags" not in after["spec"]

    # ObjectMeta's finalizers are a set too, on every kind
    def cm(*finalizers: str) -> Obj:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cfg", "namespace": "default",
                             "finalizers": list(finalizers)}}

    kube.apply(cm("example.com/a"), field_manager="one", force=False)
    after = kube.apply(cm("example.com/b"), field_manager="two", force=False)
    assert after["metadata"]["finalizers"] == ["example.com/a", "example.com/b"]
    after = kube.apply(cm(), field_manager="one", force=False)
    assert after["metadata"]["finalizers"] == ["example.com/b"]


def test_set_semantics_follow_the_served_versions_schema(emu: KubeEmulator, kube: KubeClient,
                                                         widgets: None) -> None:
    """v1alpha1 declares no list type for tags: atomic there, a set under v1."""
    alpha = "example.com/v1alpha1"
    kube.apply(widget(api_version=alpha, tags=["a"]), field_manager="one")
    after = kube.apply(widget(api_version=alpha, tags=["b"]), field_manager="two")
    assert after["spec"]["tags"] == ["b"]
    assert managed(after, "two") == {"f:spec": {"f:tags": {}}}
    assert "one" not in managers(after)  # forced out of its only field


def test_atomic_lists_and_maps_are_replaced_whole(emu: KubeEmulator, kube: KubeClient,
                                                  widgets: None) -> None:
    kube.apply(widget(hosts=["a", "b"], rules=[{"name": "r1"}], selector={"x": "1", "y": "2"},
                      extra={"items": [1, 2]}), field_manager="one")
    # a single manager re-applying fewer items replaces the list
    after = kube.apply(widget(hosts=["a"], rules=[{"name": "r1"}], selector={"x": "1"},
                              extra={"items": [1]}), field_manager="one")
    spec = after["spec"]
    assert (spec["hosts"], spec["selector"], spec["extra"]) == (["a"], {"x": "1"}, {"items": [1]})
    assert managed(after, "one") == {"f:spec": {"f:extra": {"f:items": {}}, "f:hosts": {},
                                                "f:rules": {}, "f:selector": {}}}

    # another manager's different items conflict with the whole list...
    with pytest.raises(Conflict) as err:
        kube.apply(widget(hosts=["c"]), field_manager="two", force=False)
    assert err.value.message.endswith('Apply failed with 1 conflict: conflict with "one": '
                                      '.spec.hosts')
    with pytest.raises(Conflict):
        kube.apply(widget(selector={"x": "1", "z": "3"}), field_manager="two", force=False)
    # ...and, forced, replace it: the last applier wins the list
    after = kube.apply(widget(hosts=["c"], rules=[{"name": "r2"}]), field_manager="two")
    assert after["spec"]["hosts"] == ["c"] and after["spec"]["rules"] == [{"name": "r2"}]
    assert managed(after, "one") == {"f:spec": {"f:extra": {"f:items": {}},
                                                "f:selector": {}}}
    # the same atomic value applied by both is co-owned
    kube.apply(widget(hosts=["c"]), field_manager="one", force=False)
    after = kube.apply(widget(rules=[{"name": "r2"}]), field_manager="two", force=False)
    assert after["spec"]["hosts"] == ["c"]


def test_map_list_key_defaults_and_order(emu: KubeEmulator, kube: KubeClient,
                                         widgets: None) -> None:
    kube.apply(widget(ports=[{"port": 80, "name": "http"}, {"port": 53, "protocol": "UDP"}]),
               field_manager="one", force=False)
    # protocol left out is TCP (the schema default): the same item, not a new one
    after = kube.apply(widget(ports=[{"port": 443}, {"port": 80, "protocol": "TCP"}]),
                       field_manager="two", force=False)
    assert after["spec"]["ports"] == [{"port": 80, "name": "http", "protocol": "TCP"},
                                      {"port": 53, "protocol": "UDP"}, {"port": 443}]
    assert set(managed(after, "two")["f:spec"]["f:ports"]) == {
        'k:{"port":443,"protocol":"TCP"}', 'k:{"port":80,"protocol":"TCP"}'}
    after = kube.apply(widget(), field_manager="one", force=False)
    # port 80 stays (co-owned), without the name only "one" set; 53/UDP goes
    assert after["spec"]["ports"] == [{"port": 80, "protocol": "TCP"}, {"port": 443}]


# -- co-ownership and managedFields ---------------------------------------------------------------

def test_co_owned_field_survives_one_manager_dropping_it(emu: KubeEmulator,
                                                         kube: KubeClient) -> None:
    def cm(**data: str) -> Obj:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cfg", "namespace": "default"}, "data": data}

    kube.apply(cm(shared="same", mine="1"), field_manager="one", force=False)
    kube.apply(cm(shared="same", theirs="2"), field_manager="two", force=False)
    after = kube.apply(cm(), field_manager="one", force=False)
    assert after["data"] == {"shared": "same", "theirs": "2"}
    after = kube.apply(cm(), field_manager="two", force=False)
    assert after.get("data") in (None, {})


def test_managed_fields_written_by_a_real_server_are_understood(emu: KubeEmulator,
                                                                kube: KubeClient) -> None:
    """An object whose managedFields use the real notation (".", "k:"), e.g. put by a test."""
    obj = deployment({"name": "app", "image": "nginx"}, {"name": "sidecar", "image": "envoy"})
    obj["metadata"]["managedFields"] = [{
        "manager": "kubectl", "operation": "Apply", "apiVersion": "apps/v1",
        "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {
            "f:selector": {}, "f:template": {"f:metadata": {"f:labels": {"f:app": {}}},
                                             "f:spec": {"f:containers": {
                                                 'k:{"name":"app"}': {
                                                     ".": {}, "f:image": {}, "f:name": {}},
                                                 'k:{"name":"sidecar"}': {
                                                     ".": {}, "f:image": {}, "f:name": {}}}}}}}}]
    emu.put(obj)
    # kubectl's sidecar image is owned: another manager changing it conflicts
    with pytest.raises(Conflict) as err:
        kube.apply(deployment({"name": "sidecar", "image": "envoy:2"}), field_manager="other",
                   force=False)
    assert 'containers[name="sidecar"].image' in err.value.message
    # kubectl dropping the sidecar removes it, keeping the app container
    after = kube.apply(deployment({"name": "app", "image": "nginx"}), field_manager="kubectl",
                       force=False)
    assert containers_of(after) == [{"name": "app", "image": "nginx"}]
