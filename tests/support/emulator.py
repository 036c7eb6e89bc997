"""An in-process Kubernetes API server emulator for tests.

``KubeEmulator`` serves a small but faithful part of the Kubernetes REST API over plain HTTP on
127.0.0.1 (a random free port), from a ``ThreadingHTTPServer`` in a daemon thread. The real
``kubernetes`` client talks to it unchanged: typed APIs, ``DynamicClient`` (discovery included),
``watch.Watch`` and raw ``ApiClient.call_api``. State lives in memory::

    with KubeEmulator() as emu:
        emu.write_kubeconfig(tmp_path / "kubeconfig", context="kind-lab")
        api = kubernetes.config.new_client_from_config(str(tmp_path / "kubeconfig"), "kind-lab")

Served: discovery (/version, /api, /apis, group versions), get/list/watch/create/update/patch/
delete/deletecollection on built-in kinds (see ``BUILTIN_RESOURCES``) and on kinds defined by
CustomResourceDefinitions (created through the API, ``put`` or ``load_crds``), the ``status``
subresource, label and field selectors, merge/strategic/JSON patches and server-side apply with
per-manager field ownership, metadata.finalizers, and ``Status`` error bodies.

Server-side apply merges lists by their schema's list type, as a real server does: a CRD's
``openAPIV3Schema`` for the served version, or for built-in kinds ``BUILTIN_APPLY_SCHEMAS`` (the
well-known map lists: containers, env, ports, volumes, conditions, ...). Items of
``x-kubernetes-list-type: map`` lists are owned per key (managedFields say
``k:{"name":"http"}``), ``set`` items per value (``v:"x"``), other lists (and
``x-kubernetes-map-type: atomic`` maps) are one field replaced whole. Values two appliers apply
alike are co-owned, and stay until neither applies them.

Pods' ``exec`` and ``portforward`` subresources are served over WebSocket (RFC 6455, the
``v5.channel.k8s.io``/``v4.channel.k8s.io`` channel protocols that ``kubernetes.stream.stream``
and ``kubernetes.stream.portforward`` speak); what runs is up to the test::

    emu.on_exec(lambda ns, pod, container, command: (0, "hello\n", ""))
    emu.on_portforward(lambda ns, pod, port: lambda data: b"echo:" + data)

Not served: authentication/authorization (any token is accepted), schema validation, defaulting
and pruning, conversion between CRD versions (the stored object is served under every version),
admission webhooks, owner-reference garbage collection, ``scale``/``log``/``attach``
subresources, SPDY streaming, Table output, protobuf/CBOR, apply conflicts with ``Update``
managers (their fields are not tracked), and the exact item order of a merged list (here items
already there keep their place and new ones are appended; a real server follows the applied
order for the items it names).
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import copy
import hashlib
import http.client
import io
import json
import logging
import random
import re
import select
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from lab import yamlio

__all__ = [
    "BUILTIN_APPLY_SCHEMAS",
    "BUILTIN_RESOURCES",
    "ApiError",
    "ApiFront",
    "ExecCall",
    "ExecCallback",
    "ExecOutput",
    "KubeEmulator",
    "PortForwardCallback",
    "PortHandler",
    "RecordedRequest",
    "ResourceType",
    "WriteCallback",
]

JSON = dict[str, Any]
JSONList = list[JSON]
FieldPath = tuple[str, ...]
WriteCallback = Callable[[str, JSON], None]
"""Called as ``callback(verb, obj)``; verb is "create", "update", "patch" or "delete"."""
ExecOutput = tuple[int, str, str] | Iterable[tuple[int, str | bytes]]
"""What an exec handler returns: ``(returncode, stdout, stderr)`` at once, or an iterable of
``(channel, text)`` chunks (channel 1 stdout, 2 stderr) sent as they come; a generator may
``return returncode`` (default 0)."""
ExecCallback = Callable[[str, str, str, list[str]], ExecOutput]
"""Called as ``callback(namespace, pod, container, command)``."""
PortHandler = Callable[[bytes], bytes]
"""One forwarded connection: called with each chunk the client sends; returns the reply bytes."""
PortForwardCallback = Callable[[str, str, int], PortHandler | None]
"""Called as ``callback(namespace, pod, port)`` for each port of a port-forward; None: refused."""

log = logging.getLogger(__name__)

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CT_JSON_PATCH = "application/json-patch+json"
CT_MERGE_PATCH = "application/merge-patch+json"
CT_STRATEGIC_PATCH = "application/strategic-merge-patch+json"
CT_APPLY_PATCH = "application/apply-patch+yaml"
CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
NAMESPACE_KEY = ("", "namespaces")
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
# metadata fields that identify an object or are owned by the server, never by an applier
SERVER_METADATA = frozenset({
    "name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink", "generateName",
})
# strategic merge: list fields merged item by item, with the candidate merge keys
STRATEGIC_MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",), "initContainers": ("name",), "ephemeralContainers": ("name",),
    "env": ("name",), "volumes": ("name",), "volumeMounts": ("mountPath",),
    "imagePullSecrets": ("name",), "conditions": ("type",),
    "ports": ("containerPort", "port", "name"),
}


# -- resource types -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResourceType:
    """One served resource: a group/version/plural, as discovery lists it."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    status_subresource: bool = False
    returns_deleted_object: bool = False  # DELETE answers with the object instead of a Status
    custom: bool = False  # defined by a CustomResourceDefinition
    singular: str = ""
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """How error messages name the resource: "pods", "gateways.gateway.networking.k8s.io"."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def storage_key(self) -> tuple[str, str]:
        """Objects are stored once per group+plural, whatever version they are served under."""
        return (self.group, self.plural)

    def discovery_entries(self) -> JSONList:
        entry: JSON = {
            "name": self.plural, "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced, "kind": self.kind, "verbs": list(ALL_VERBS),
        }
        if self.short_names:
            entry["shortNames"] = list(self.short_names)
        if self.categories:
            entry["categories"] = list(self.categories)
        entries = [entry]
        if self.status_subresource:
            entries.append({"name": f"{self.plural}/status", "singularName": "",
                            "namespaced": self.namespaced, "kind": self.kind,
                            "verbs": list(SUBRESOURCE_VERBS)})
        return entries


def _builtin(api_version: str, kind: str, plural: str, namespaced: bool,
             short_names: tuple[str, ...] = (), *, status: bool = False,
             returns_object: bool = False, singular: str = "",
             categories: tuple[str, ...] = ()) -> ResourceType:
    group, _, version = api_version.rpartition("/")
    return ResourceType(group, version, kind, plural, namespaced, short_names,
                        status_subresource=status, returns_deleted_object=returns_object,
                        singular=singular or kind.lower(), categories=categories)


BUILTIN_RESOURCES: tuple[ResourceType, ...] = (
    _builtin("v1", "Namespace", "namespaces", False, ("ns",), status=True, returns_object=True),
    _builtin("v1", "Node", "nodes", False, ("no",), status=True),
    _builtin("v1", "Pod", "pods", True, ("po",), status=True, returns_object=True,
             categories=("all",)),
    _builtin("v1", "Service", "services", True, ("svc",), status=True, returns_object=True,
             categories=("all",)),
    _builtin("v1", "ConfigMap", "configmaps", True, ("cm",)),
    _builtin("v1", "Secret", "secrets", True),
    _builtin("v1", "ServiceAccount", "serviceaccounts", True, ("sa",), returns_object=True),
    _builtin("v1", "Event", "events", True, ("ev",)),
    _builtin("v1", "Endpoints", "endpoints", True, ("ep",), singular="endpoints"),
    _builtin("apps/v1", "Deployment", "deployments", True, ("deploy",), status=True,
             categories=("all",)),
    _builtin("apps/v1", "DaemonSet", "daemonsets", True, ("ds",), status=True,
             categories=("all",)),
    _builtin("apps/v1", "StatefulSet", "statefulsets", True, ("sts",), status=True,
             categories=("all",)),
    _builtin("apps/v1", "ReplicaSet", "replicasets", True, ("rs",), status=True,
             categories=("all",)),
    _builtin("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions",
             False, ("crd", "crds"), status=True),
    _builtin("coordination.k8s.io/v1", "Lease", "leases", True),
    _builtin("rbac.authorization.k8s.io/v1", "Role", "roles", True),
    _builtin("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", True),
    _builtin("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles", False),
    _builtin("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "clusterrolebindings", False),
    _builtin("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration",
             "validatingwebhookconfigurations", False),
    _builtin("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration",
             "mutatingwebhookconfigurations", False),
    _builtin("discovery.k8s.io/v1", "EndpointSlice", "endpointslices", True),
)


def _types_from_crd(crd: JSON) -> list[ResourceType]:
    """The resource types a CustomResourceDefinition serves. Raises ValueError if malformed."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, kind, plural = spec.get("group"), names.get("kind"), names.get("plural")
    if not (group and kind and plural):
        raise ValueError("spec.group, spec.names.kind and spec.names.plural are required")
    if crd.get("metadata", {}).get("name") != f"{plural}.{group}":
        raise ValueError(f"metadata.name must be spec.names.plural+\".\"+spec.group "
                         f"({plural}.{group})")
    types = []
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or spec.get("subresources") or {}
        types.append(ResourceType(
            group, str(version["name"]), kind, plural, spec.get("scope") != "Cluster",
            tuple(names.get("shortNames") or ()), status_subresource="status" in subresources,
            returns_deleted_object=True, custom=True, singular=names.get("singular") or "",
            categories=tuple(names.get("categories") or ())))
    return types


_KUBE_VERSION = re.compile(r"^v(\d+)(?:(alpha|beta)(\d+))?$")


def _version_priority(version: str) -> tuple[int, int, int, str]:
    """Sort key putting versions in Kubernetes priority order: v2, v1, v1beta2, v1alpha1, other."""
    match = _KUBE_VERSION.match(version)
    if not match:
        return (3, 0, 0, version)
    stage = {None: 0, "beta": 1, "alpha": 2}[match.group(2)]
    return (stage, -int(match.group(1)), -int(match.group(3) or 0), "")


# -- errors ---------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered to the client as a ``Status`` body."""

    def __init__(self, code: int, reason: str, message: str,
                 details: JSON | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> JSON:
        body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                      "status": "Failure", "message": self.message, "reason": self.reason,
                      "code": self.code}
        if not self.reason:  # StatusReasonUnknown: left out, as a real server does
            del body["reason"]
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(rt: ResourceType, name: str) -> JSON:
    details: JSON = {"name": name, "kind": rt.plural}
    if rt.group:
        details["group"] = rt.group
    return details


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.group_resource} "{name}" not found', _details(rt, name))


def _path_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _invalid(rt: ResourceType, name: str, message: str) -> ApiError:
    return ApiError(422, "Invalid", f'{rt.kind} "{name}" is invalid: {message}',
                    _details(rt, name))


def _conflict(rt: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.group_resource} '
                                     f'"{name}": {why}', _details(rt, name))


STALE = ("the object has been modified; please apply your changes to the latest version and "
         "try again")


# -- small helpers --------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_body(raw: bytes) -> Any:
    """JSON, or YAML (apply bodies may be either)."""
    if not raw.strip():
        raise _bad_request("the request body is empty")
    try:
        return json.loads(raw)
    except ValueError:
        pass
    try:
        return yamlio.load(raw)
    except yaml.YAMLError as exc:
        raise _bad_request(f"the request body is neither JSON nor YAML: {exc}") from exc


def _spec_content(obj: JSON) -> JSON:
    """What counts for metadata.generation: everything but metadata, status and type info."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


# -- selectors ------------------------------------------------------------------------------------

class Requirement(NamedTuple):
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str]


_SEL_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_SEL_SET = re.compile(rf"^({_SEL_KEY})\s+(in|notin)\s+\(([^)]*)\)$")
_SEL_CMP = re.compile(rf"^({_SEL_KEY})\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)$")
_FIELD_CMP = re.compile(rf"^({_SEL_KEY})\s*(==|=|!=)\s*([^,]*)$")
_SEL_EXISTS = re.compile(rf"^(!?)\s*({_SEL_KEY})$")


def _split_terms(selector: str) -> list[str]:
    """Split on commas that are not inside "( )"."""
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [t.strip() for t in terms if t.strip()]


def parse_selector(selector: str, *, fields: bool = False) -> list[Requirement]:
    """Parse a label selector (or, with ``fields``, a field selector). Raises ApiError 400."""
    requirements = []
    for term in _split_terms(selector):
        if match := (_FIELD_CMP if fields else _SEL_CMP).match(term):
            op = "!=" if match.group(2) == "!=" else "="
            requirements.append(Requirement(match.group(1), op, frozenset({match.group(3)})))
        elif not fields and (match := _SEL_SET.match(term)):
            values = frozenset(v.strip() for v in match.group(3).split(",") if v.strip())
            requirements.append(Requirement(match.group(1), match.group(2), values))
        elif not fields and (match := _SEL_EXISTS.match(term)):
            requirements.append(Requirement(match.group(2), "!" if match.group(1) else "exists",
                                            frozenset()))
        else:
            kind = "field" if fields else "label"
            raise _bad_request(f"unable to parse requirement: invalid {kind} selector {term!r}")
    return requirements


def _matches_labels(labels: dict[str, str], requirements: list[Requirement]) -> bool:
    for key, op, values in requirements:
        value = labels.get(key)
        ok = {
            "=": value is not None and value in values,
            "!=": value is None or value not in values,
            "in": value is not None and value in values,
            "notin": value is None or value not in values,
            "exists": value is not None,
            "!": value is None,
        }[op]
        if not ok:
            return False
    return True


def _field_value(obj: JSON, path: str) -> str:
    current: Any = obj
    for part in path.split("."):
        current = current.get(part) if isinstance(current, dict) else None
    if isinstance(current, bool):
        return "true" if current else "false"
    return "" if current is None else str(current)


def _matches_fields(obj: JSON, requirements: list[Requirement]) -> bool:
    for key, op, values in requirements:
        if (_field_value(obj, key) in values) != (op == "="):
            return False
    return True


# -- patches --------------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch. Returns a new value; inputs are not modified."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A JSON merge patch, except that lists of maps under the keys in ``STRATEGIC_MERGE_KEYS``
    are merged item by item (``$patch: delete`` removes an item); other ``$`` directives are
    ignored."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in STRATEGIC_MERGE_KEYS:
            result[key] = _merge_list(result.get(key), value, STRATEGIC_MERGE_KEYS[key])
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _merge_list(current: Any, patch: list[Any], candidates: tuple[str, ...]) -> list[Any]:
    items = [i for i in patch if isinstance(i, dict)]
    merge_key = next((k for k in candidates if items and all(k in i for i in items)), None)
    if merge_key is None or len(items) != len(patch) or not isinstance(current, list):
        return [i for i in copy.deepcopy(patch) if not (isinstance(i, dict) and "$patch" in i)]
    result: list[Any] = copy.deepcopy(current)
    for item in items:
        index = next((n for n, old in enumerate(result)
                      if isinstance(old, dict) and old.get(merge_key) == item[merge_key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(strategic_merge_patch({}, item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


class PatchError(ValueError):
    pass


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]


def _walk(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            raise PatchError(f"path /{'/'.join(tokens)} does not exist")
    return doc


def _pointer_add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent, last = _walk(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list) and (last == "-" or (last.isdigit() and
                                                        int(last) <= len(parent))):
        parent.insert(len(parent) if last == "-" else int(last), value)
    else:
        raise PatchError(f"cannot add at /{'/'.join(tokens)}")
    return doc


def _pointer_remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    _walk(doc, tokens)  # raises when absent
    parent, last = _walk(doc, tokens[:-1]), tokens[-1]
    return parent.pop(int(last) if isinstance(parent, list) else last)


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test). ``doc`` is modified."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    for op in operations:
        if not isinstance(op, dict) or "path" not in op:
            raise PatchError(f"invalid operation {op!r}")
        name, tokens = op.get("op"), _pointer(op["path"])
        if name in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"operation {name} needs a value")
        if name == "add":
            doc = _pointer_add(doc, tokens, copy.deepcopy(op["value"]))
        elif name == "remove":
            _pointer_remove(doc, tokens)
        elif name == "replace":
            if tokens:
                _pointer_remove(doc, tokens)
            doc = _pointer_add(doc, tokens, copy.deepcopy(op["value"]))
        elif name in ("move", "copy"):
            source = _pointer(op.get("from"))
            value = (_pointer_remove(doc, source) if name == "move"
                     else copy.deepcopy(_walk(doc, source)))
            doc = _pointer_add(doc, tokens, value)
        elif name == "test":
            if _walk(doc, tokens) != op["value"]:
                raise PatchError(f"test operation failed at {op['path']}")
        else:
            raise PatchError(f"unknown operation {name!r}")
    return doc


# -- server-side apply: schemas -------------------------------------------------------------------
#
# Server-side apply merges by the schema. A list is atomic (one field, replaced whole) unless the
# schema says ``x-kubernetes-list-type: map`` (items merged and owned by the values of their
# ``x-kubernetes-list-map-keys``) or ``set`` (scalar items owned one by one); a map is granular
# unless ``x-kubernetes-map-type: atomic``. Schemas are OpenAPI v3 nodes: a CRD's
# ``openAPIV3Schema``, or for built-in kinds the small tables below (what Kubernetes declares,
# where it differs from those defaults). ``{}`` is a field with no schema: maps granular, lists
# atomic, as a real server deduces for fields it has no type for.

Schema = JSON


def _struct(**fields: Schema) -> Schema:
    return {"type": "object", "properties": fields}


def _map_list(*keys: str, item: Schema | None = None,
              defaults: dict[str, Any] | None = None) -> Schema:
    """A list merged by ``keys``; ``defaults``: values a key takes when an item leaves it out."""
    items: Schema = dict(item or {"type": "object"})
    if defaults:
        items["properties"] = {**(items.get("properties") or {}),
                               **{k: {"default": v} for k, v in defaults.items()}}
    return {"type": "array", "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": list(keys), "items": items}


_ATOMIC_MAP: Schema = {"type": "object", "x-kubernetes-map-type": "atomic"}
_SET: Schema = {"type": "array", "x-kubernetes-list-type": "set"}
_CONDITIONS = _map_list("type")
_OBJECT_META = _struct(ownerReferences=_map_list("uid"), finalizers=_SET,
                       managedFields={"type": "array", "x-kubernetes-list-type": "atomic"})
_CONTAINER = _struct(
    ports=_map_list("containerPort", "protocol", defaults={"protocol": "TCP"}),
    env=_map_list("name"), volumeMounts=_map_list("mountPath"),
    volumeDevices=_map_list("devicePath"))
_POD_SPEC = _struct(
    containers=_map_list("name", item=_CONTAINER),
    initContainers=_map_list("name", item=_CONTAINER),
    ephemeralContainers=_map_list("name", item=_CONTAINER),
    volumes=_map_list("name"), imagePullSecrets=_map_list("name"), hostAliases=_map_list("ip"),
    topologySpreadConstraints=_map_list("topologyKey", "whenUnsatisfiable"),
    resourceClaims=_map_list("name"), schedulingGates=_map_list("name"),
    nodeSelector=_ATOMIC_MAP)
_WORKLOAD = _struct(
    spec=_struct(selector=_ATOMIC_MAP,  # a LabelSelector is an atomic struct
                 template=_struct(metadata=_OBJECT_META, spec=_POD_SPEC)),
    status=_struct(conditions=_CONDITIONS))
_WEBHOOKS = _struct(webhooks=_map_list("name"))
BUILTIN_APPLY_SCHEMAS: dict[tuple[str, str], Schema] = {
    ("", "pods"): _struct(spec=_POD_SPEC, status=_struct(
        conditions=_CONDITIONS, podIPs=_map_list("ip"),
        resourceClaimStatuses=_map_list("name"))),
    ("", "services"): _struct(
        spec=_struct(ports=_map_list("port", "protocol", defaults={"protocol": "TCP"}),
                     selector=_ATOMIC_MAP),
        status=_struct(conditions=_CONDITIONS)),
    ("", "nodes"): _struct(spec=_struct(podCIDRs=_SET),
                           status=_struct(conditions=_CONDITIONS, addresses=_map_list("type"))),
    ("", "namespaces"): _struct(status=_struct(conditions=_CONDITIONS)),
    ("apps", "deployments"): _WORKLOAD,
    ("apps", "daemonsets"): _WORKLOAD,
    ("apps", "statefulsets"): _WORKLOAD,
    ("apps", "replicasets"): _WORKLOAD,
    CRD_KEY: _struct(status=_struct(conditions=_CONDITIONS)),
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations"): _WEBHOOKS,
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"): _WEBHOOKS,
}
"""The list and map types server-side apply uses for built-in kinds (by group and plural), on
top of ``metadata`` (ObjectMeta's, for every kind); every other list is atomic."""


def _field_schema(schema: Schema, name: str) -> Schema:
    properties = schema.get("properties")
    if isinstance(properties, dict) and isinstance(properties.get(name), dict):
        return properties[name]  # type: ignore[no-any-return]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else {}


def _items_schema(schema: Schema) -> Schema:
    items = schema.get("items")
    return items if isinstance(items, dict) else {}


def _map_is_atomic(schema: Schema) -> bool:
    return schema.get("x-kubernetes-map-type") == "atomic"


def _list_kind(schema: Schema, items: list[Any]) -> str:
    """"map", "set" or "atomic" (also when the items do not fit the declared type)."""
    declared = schema.get("x-kubernetes-list-type")
    if (declared == "map" and schema.get("x-kubernetes-list-map-keys")
            and all(isinstance(i, dict) for i in items)):
        return "map"
    if declared == "set" and not any(isinstance(i, (dict, list)) for i in items):
        return "set"
    return "atomic"


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _item_token(item: Any, schema: Schema) -> str | None:
    """How a field path names an item of a map list (``k:{"name":"http"}``, key fields left out
    of the item taking their schema default) or of a set (``v:"x"``); None if it has no key."""
    if schema.get("x-kubernetes-list-type") == "set":
        return None if isinstance(item, (dict, list)) else "v:" + _compact(item)
    if not isinstance(item, dict):
        return None
    properties = _items_schema(schema).get("properties") or {}
    key: JSON = {}
    for name in schema.get("x-kubernetes-list-map-keys") or []:
        if name in item:
            key[name] = item[name]
        elif isinstance(properties.get(name), dict) and "default" in properties[name]:
            key[name] = properties[name]["default"]
    return "k:" + _compact(key)


# -- server-side apply: field sets ----------------------------------------------------------------
#
# A field path is a tuple of managedFields tokens: ``f:<field>`` (a map field), ``k:<json key>``
# (a map-list item), ``v:<json value>`` (a set item), ``i:<index>`` (from real servers only).

def _field_set(value: Any, schema: Schema, prefix: FieldPath = ()) -> set[FieldPath]:
    """The fields an applied value sets: its leaves (scalars, nulls, empty maps, atomic lists and
    maps), plus each item of a map or set list (and, below a map-list item, its fields)."""
    if isinstance(value, dict) and value and not _map_is_atomic(schema):
        paths: set[FieldPath] = set()
        for name, child in value.items():
            paths |= _field_set(child, _field_schema(schema, name), (*prefix, f"f:{name}"))
        return paths
    if isinstance(value, list) and (kind := _list_kind(schema, value)) != "atomic":
        paths = set()
        for item in value:
            path = (*prefix, str(_item_token(item, schema)))
            paths.add(path)
            if kind == "map":
                paths |= _field_set(item, _items_schema(schema), path)
        return paths  # an empty map or set list sets nothing
    return {prefix} if prefix else set()


def _duplicates(value: Any, schema: Schema, prefix: FieldPath = ()) -> builtins.list[str]:
    """What a real server refuses in an applied object: two items with one key in a map list, or
    one value twice in a set."""
    errors: builtins.list[str] = []
    if isinstance(value, dict) and not _map_is_atomic(schema):
        for name, child in value.items():
            errors += _duplicates(child, _field_schema(schema, name), (*prefix, f"f:{name}"))
    elif isinstance(value, list) and (kind := _list_kind(schema, value)) != "atomic":
        seen: set[str] = set()
        for item in value:
            token = str(_item_token(item, schema))
            if token in seen:
                errors.append(f"{_path_text(prefix)}: duplicate entries for key "
                              f"{_path_text((token,))}")
            seen.add(token)
            if kind == "map":
                errors += _duplicates(item, _items_schema(schema), (*prefix, token))
    return errors


def _path_text(path: FieldPath) -> str:
    """A field path as apply conflicts print it: ``.spec.listeners[name="http"].port``."""
    text = ""
    for token in path:
        kind, rest = token[:2], token[2:]
        if kind == "k:":
            try:
                key = json.loads(rest)
            except ValueError:
                key = None
            text += ("[" + ",".join(f"{k}={_compact(v)}" for k, v in key.items()) + "]"
                     if isinstance(key, dict) else f"[{rest}]")
        elif kind == "v:":
            text += f"[={rest}]"
        elif kind == "i:":
            text += f"[{rest}]"
        else:
            text += "." + rest
    return text


def _fields_v1(paths: Iterable[FieldPath]) -> JSON:
    """Encode paths the way managedFields do: {"f:spec": {"f:listeners": {"k:{\\"name\\":
    \\"http\\"}": {".": {}, "f:name": {}}}}} ("." marks a member that also has members below)."""
    members = set(paths)
    tree: JSON = {}
    for path in members:
        node = tree
        for token in path:
            node = node.setdefault(token, {})

    def encode(node: JSON, prefix: FieldPath) -> JSON:
        out: JSON = {".": {}} if node and prefix in members else {}
        for token in sorted(node):
            out[token] = encode(node[token], (*prefix, token))
        return out

    return encode(tree, ())


def _paths_from_fields_v1(fields: Any, prefix: FieldPath = ()) -> set[FieldPath]:
    if not isinstance(fields, dict):
        return set()
    paths: set[FieldPath] = set()
    for key, child in fields.items():
        if key == "." and prefix:
            paths.add(prefix)
        elif key[:2] in ("f:", "k:", "v:", "i:"):
            path = (*prefix, key)
            below = _paths_from_fields_v1(child, path)
            paths |= below or {path}
    return paths


def _item_index(items: builtins.list[Any], token: str, schema: Schema) -> int | None:
    if token.startswith("i:"):
        index = int(token[2:]) if token[2:].isdigit() else len(items)
        return index if index < len(items) else None
    return next((n for n, item in enumerate(items) if _item_token(item, schema) == token), None)


def _child(value: Any, token: str, schema: Schema) -> tuple[Any, Schema] | None:
    """One step down a field path: the value there and its schema; None when there is none."""
    if token.startswith("f:"):
        if isinstance(value, dict) and token[2:] in value:
            return value[token[2:]], _field_schema(schema, token[2:])
    elif isinstance(value, list):
        index = _item_index(value, token, schema)
        if index is not None:
            return value[index], _items_schema(schema)
    return None


def _get_path(obj: Any, path: FieldPath, schema: Schema) -> Any:
    for token in path:
        step = _child(obj, token, schema)
        if step is None:
            return None
        obj, schema = step
    return obj


def _delete_path(obj: JSON, path: FieldPath, schema: Schema) -> None:
    """Remove a field or a list item (every item with that key), then the maps and lists that
    leaves empty (but never a top-level field, nor a list item)."""
    chain: builtins.list[tuple[Any, Schema]] = [(obj, schema)]
    for token in path[:-1]:
        step = _child(chain[-1][0], token, chain[-1][1])
        if step is None:
            return
        chain.append(step)
    parent, parent_schema = chain[-1]
    last = path[-1]
    if len(chain) > 1 and isinstance(chain[-2][0], list) and last[2:] in (
            chain[-2][1].get("x-kubernetes-list-map-keys") or ()):
        return  # a key field goes with its item, never alone
    if isinstance(parent, dict) and last.startswith("f:"):
        parent.pop(last[2:], None)
    elif isinstance(parent, list) and last.startswith("i:"):
        index = _item_index(parent, last, parent_schema)
        if index is not None:
            del parent[index]
    elif isinstance(parent, list):
        parent[:] = [i for i in parent if _item_token(i, parent_schema) != last]
    else:
        return
    for depth in range(len(chain) - 1, 1, -1):
        holder = chain[depth - 1][0]
        if chain[depth][0] or not isinstance(holder, dict):
            break
        holder.pop(path[depth - 1][2:], None)


def _merge_applied(live: Any, applied: Any, schema: Schema) -> Any:
    """``applied`` merged into ``live`` as server-side apply merges: granular maps field by field
    (a null removes the field), map lists item by item by key and sets value by value (items
    already there keep their place, new ones are appended), anything else replaced. ``live`` is
    changed in place; the result is returned."""
    if isinstance(applied, dict) and isinstance(live, dict) and not _map_is_atomic(schema):
        for name, value in applied.items():
            if value is None:
                live.pop(name, None)
            else:
                live[name] = _merge_applied(live.get(name), value, _field_schema(schema, name))
        return live
    if isinstance(applied, list) and isinstance(live, list):
        kind = _list_kind(schema, applied)
        if kind != "atomic" and _list_kind(schema, live) == kind:
            for item in applied:
                token = _item_token(item, schema)
                found = [n for n, old in enumerate(live) if _item_token(old, schema) == token]
                if not found:
                    live.append(copy.deepcopy(item))
                elif kind == "map" and len(found) == 1:
                    live[found[0]] = _merge_applied(live[found[0]], item, _items_schema(schema))
                elif kind == "map":  # duplicates in the live list: the applied item replaces them
                    live[found[0]] = copy.deepcopy(item)
                    live[:] = [old for n, old in enumerate(live) if n not in found[1:]]
            return live
    return copy.deepcopy(applied)


# -- records --------------------------------------------------------------------------------------

class RecordedRequest(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    content_type: str


class ExecCall(NamedTuple):
    """One exec that ran (the query's ``command`` is repeated, so ``RecordedRequest.query`` keeps
    only its last word: read it here)."""

    namespace: str
    pod: str
    container: str  # as resolved: the only container when the request named none
    command: list[str]
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True
    tty: bool = False


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    error: ApiError
    remaining: int


@dataclass
class _Event:
    rv: int
    type: str  # ADDED, MODIFIED or DELETED
    storage_key: tuple[str, str]
    obj: JSON
    old: JSON | None


@dataclass
class _Watch:
    rt: ResourceType
    namespace: str | None
    labels: list[Requirement]
    fields: list[Requirement]
    since: int | None  # None: start with ADDED events for what exists
    timeout: float
    bookmark_initial: bool = False


@dataclass
class _Reply:
    code: int
    body: Any = None
    text: str | None = None
    watch: _Watch | None = None
    writes: list[tuple[str, JSON]] = field(default_factory=list)


# -- the emulator ---------------------------------------------------------------------------------

class KubeEmulator:
    """An in-memory Kubernetes API server; see the module docstring."""

    def __init__(self, *, strict_namespaces: bool = False, git_version: str = "v1.33.1",
                 extra_resources: Iterable[ResourceType] = (), history: int = 10_000) -> None:
        """``strict_namespaces``: creating in a missing namespace fails with 404 (as a real
        server does) instead of being accepted. ``history``: how many watch events are kept for
        watches that resume from a resourceVersion (older ones get 410 Gone)."""
        self.strict_namespaces = strict_namespaces
        self.git_version = git_version
        self.callback_errors: builtins.list[BaseException] = []
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._objects: dict[tuple[str, str, str, str], JSON] = {}
        self._rv = 0
        self._events: deque[_Event] = deque(maxlen=history)
        self._builtin_types = [*BUILTIN_RESOURCES, *extra_resources]
        self._crd_types: dict[str, builtins.list[ResourceType]] = {}
        self._served: dict[tuple[str, str], dict[str, ResourceType]] = {}
        self._by_kind: dict[tuple[str, str], ResourceType] = {}
        self._rebuild_registry()
        self._meta_lock = threading.Lock()  # guards requests, faults and callbacks
        self._requests: builtins.list[RecordedRequest] = []
        self._faults: builtins.list[_Fault] = []
        self._callbacks: builtins.list[WriteCallback] = []
        self._exec_callback: ExecCallback | None = None
        self._portforward_callback: PortForwardCallback | None = None
        self._exec_calls: builtins.list[ExecCall] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        for name in DEFAULT_NAMESPACES:
            self.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> KubeEmulator:
        if self._server is None:
            self._stopping = False
            self._server = _Server(self)
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name=f"kube-emulator:{self.port}", daemon=True)
            self._thread.start()
            self._forget_discovery_cache()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._forget_discovery_cache(server.server_address[1])

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _forget_discovery_cache(self, port: int | None = None) -> None:
        """DynamicClient caches discovery in $TMPDIR/osrcp-<md5(host)>.json; ports get reused,
        so a cache left by an earlier emulator on this port would describe other CRDs."""
        if port is None and self._server is None:
            return
        host = f"http://127.0.0.1:{port or self.port}".encode()
        digest = hashlib.md5(host, usedforsecurity=False).hexdigest()
        Path(tempfile.gettempdir(), f"osrcp-{digest}.json").unlink(missing_ok=True)

    def write_kubeconfig(self, path: str | Path, context: str = "kind-lab",
                         cluster_name: str | None = None) -> Path:
        """Add (or update) a cluster, user and context for this emulator in the kubeconfig at
        ``path``, keeping its other entries. current-context is set only if it had none."""
        target = Path(path)
        config: JSON = {}
        if target.exists():
            config = yamlio.load(target.read_text()) or {}
        cluster = cluster_name or context
        config.setdefault("apiVersion", "v1")
        config.setdefault("kind", "Config")
        config.setdefault("preferences", {})
        entries = {
            "clusters": {"name": cluster, "cluster": {"server": self.url}},
            "users": {"name": context, "user": {"token": "kube-emulator"}},
            "contexts": {"name": context, "context": {"cluster": cluster, "user": context}},
        }
        for section, entry in entries.items():
            kept = [e for e in config.get(section) or [] if e.get("name") != entry["name"]]
            config[section] = [*kept, entry]
        if not config.get("current-context"):
            config["current-context"] = context
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(config, sort_keys=False))
        return target

    # -- test-side API (no HTTP) ------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def resource_type(self, api_version: str, kind: str) -> ResourceType:
        with self._lock:
            try:
                return self._by_kind[(api_version, kind)]
            except KeyError:
                raise KeyError(f"{kind} in {api_version} is not served (missing CRD?)") from None

    def put(self, obj: JSON) -> JSON:
        """Create or replace ``obj`` as given (status included: no subresource rules), bump the
        resourceVersion and notify watchers. Does not run ``on_write`` callbacks."""
        rt = self.resource_type(obj.get("apiVersion", ""), obj.get("kind", ""))
        meta = obj.get("metadata") or {}
        namespace = (meta.get("namespace") or "default") if rt.namespaced else None
        with self._lock:
            if self._key(rt, namespace, meta.get("name", "")) in self._objects:
                return self._update(rt, namespace, meta["name"], obj, via_api=False)
            return self._create(rt, namespace, obj, via_api=False)

    def get(self, api_version: str, kind: str, name: str,
            namespace: str | None = None) -> JSON | None:
        """The object (a copy), or None. Namespaced kinds default to the "default" namespace."""
        rt = self.resource_type(api_version, kind)
        with self._lock:
            found = self._objects.get(self._key(rt, namespace or "default", name))
            return self._present(rt, found) if found else None

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str = "") -> JSONList:
        """Objects of that kind (copies), in one namespace or in all when ``namespace`` is None."""
        rt = self.resource_type(api_version, kind)
        with self._lock:
            return [self._present(rt, o) for o in
                    self._select(rt, namespace, parse_selector(label_selector), [])]

    def delete(self, api_version: str, kind: str, name: str,
               namespace: str | None = None) -> bool:
        """Remove at once (finalizers ignored; a namespace takes its objects with it).
        True if something was deleted."""
        rt = self.resource_type(api_version, kind)
        with self._lock:
            key = self._key(rt, namespace or "default", name)
            if key not in self._objects:
                return False
            if rt.storage_key == NAMESPACE_KEY:
                self._empty_namespace(name)
            self._remove(key)
            return True

    def patch_status(self, api_version: str, kind: str, name: str, namespace: str | None,
                     status: JSON) -> JSON:
        """JSON-merge ``status`` into the object's .status (like a controller would)."""
        rt = self.resource_type(api_version, kind)
        with self._lock:
            old = self._objects.get(self._key(rt, namespace or "default", name))
            if old is None:
                raise KeyError(f"{kind} {namespace}/{name} does not exist")
            new = copy.deepcopy(old)
            new["status"] = merge_patch(old.get("status") or {}, status)
            return self._present(rt, self._commit(rt, new, old))

    def load_crds(self, paths: str | Path | Iterable[str | Path]) -> builtins.list[str]:
        """``put`` every CustomResourceDefinition found in these YAML files (multi-document;
        a directory means its *.yaml and *.yml files). Returns the CRD names."""
        items = [paths] if isinstance(paths, (str, Path)) else list(paths)
        files: builtins.list[Path] = []
        for item in map(Path, items):
            files += sorted([*item.glob("*.yaml"), *item.glob("*.yml")]) if item.is_dir() \
                else [item]
        names = []
        for file in files:
            for doc in yamlio.load_all(file.read_text()):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    names.append(self.put(doc)["metadata"]["name"])
        return names

    @property
    def requests(self) -> builtins.list[RecordedRequest]:
        """A snapshot of every request received, oldest first."""
        with self._meta_lock:
            return list(self._requests)

    def writes(self) -> builtins.list[RecordedRequest]:
        """The recorded POST/PUT/PATCH/DELETE requests."""
        return [r for r in self.requests if r.method in MUTATING_METHODS]

    def clear_requests(self) -> None:
        """Forget the recorded requests (and exec calls)."""
        with self._meta_lock:
            self._requests.clear()
            self._exec_calls.clear()

    def on_write(self, callback: WriteCallback) -> WriteCallback:
        """Call ``callback(verb, obj)`` after each successful write made through the API (not
        through ``put``/``patch_status``/``delete``), before the response is sent and outside
        the emulator's lock: it may use the API or the test-side methods."""
        with self._meta_lock:
            self._callbacks.append(callback)
        return callback

    def on_exec(self, callback: ExecCallback | None) -> ExecCallback | None:
        """Run ``callback(namespace, pod, container, command)`` for each pod exec; it returns
        ``(returncode, stdout, stderr)``, or an iterable of ``(channel, text)`` chunks (channel 1
        stdout, 2 stderr) that are sent as they come, e.g. a generator emulating a followed
        ``hubble observe`` (it may ``return returncode``; it is closed when the client leaves).
        The latest callback replaces the previous one; None unregisters (exec then answers 126).
        A callback that raises ends the exec with an ``InternalError`` status, as a failing
        container runtime would, and lands in ``callback_errors``. What the client sends (stdin,
        resize) is read and dropped; with ``tty=true`` stderr goes out on stdout."""
        with self._meta_lock:
            self._exec_callback = callback
        return callback

    def on_portforward(self, callback: PortForwardCallback | None) -> PortForwardCallback | None:
        """Serve pod port-forwards: ``callback(namespace, pod, port)`` is called for each port of
        each forward (one per forwarded connection) and returns a handler called with every chunk
        the client sends, whose returned bytes are sent back; None (or no callback) means nothing
        listens there: the client gets the "connection refused" error on that port's error
        channel. The latest callback replaces the previous one."""
        with self._meta_lock:
            self._portforward_callback = callback
        return callback

    @property
    def exec_calls(self) -> builtins.list[ExecCall]:
        """A snapshot of the execs that ran (past the pod/container checks), oldest first."""
        with self._meta_lock:
            return list(self._exec_calls)

    def fail_next(self, method: str, path_regex: str, code: int, reason: str,
                  count: int = 1, message: str = "") -> None:
        """Answer the next ``count`` requests whose method matches (``"*"``: any) and whose path
        matches ``path_regex`` (re.search) with a ``Status`` error."""
        error = ApiError(code, reason, message or f"injected failure ({reason})", {})
        with self._meta_lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), error, count))

    # -- registry ---------------------------------------------------------------------------------

    def _rebuild_registry(self) -> None:
        served: dict[tuple[str, str], dict[str, ResourceType]] = {}
        by_kind: dict[tuple[str, str], ResourceType] = {}
        custom = [t for types in self._crd_types.values() for t in types]
        for rt in [*self._builtin_types, *custom]:  # built-ins win name clashes
            served.setdefault((rt.group, rt.version), {}).setdefault(rt.plural, rt)
            by_kind.setdefault((rt.api_version, rt.kind), rt)
        self._served, self._by_kind = served, by_kind

    def _sync_crds(self) -> None:
        """Serve what the stored CRDs define; drop the objects of kinds no longer served."""
        before = {t.storage_key for types in self._crd_types.values() for t in types}
        self._crd_types = {}
        for (group, plural, _, name), crd in self._objects.items():
            if (group, plural) == CRD_KEY:
                self._crd_types[name] = _types_from_crd(crd)
        after = {t.storage_key for types in self._crd_types.values() for t in types}
        gone = before - after
        for key in [k for k in self._objects if k[:2] in gone]:
            self._remove(key)
        self._rebuild_registry()
        self._forget_discovery_cache()

    def _group_versions(self) -> dict[str, builtins.list[str]]:
        groups: dict[str, builtins.list[str]] = {}
        for group, version in self._served:
            if group:
                groups.setdefault(group, []).append(version)
        return {g: sorted(vs, key=_version_priority) for g, vs in groups.items()}

    def _api_group(self, group: str, versions: builtins.list[str]) -> JSON:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": dict(entries[0])}

    # -- storage primitives (call with the lock held) ---------------------------------------------

    @staticmethod
    def _key(rt: ResourceType, namespace: str | None, name: str) -> tuple[str, str, str, str]:
        return (rt.group, rt.plural, (namespace or "") if rt.namespaced else "", name)

    @staticmethod
    def _present(rt: ResourceType, obj: JSON) -> JSON:
        """A copy of a stored object as served under ``rt``'s version."""
        out = copy.deepcopy(obj)
        out["apiVersion"], out["kind"] = rt.api_version, rt.kind
        return out

    def _select(self, rt: ResourceType, namespace: str | None, labels: builtins.list[Requirement],
                fields: builtins.list[Requirement]) -> JSONList:
        found = [obj for (group, plural, ns, _), obj in sorted(self._objects.items())
                 if (group, plural) == rt.storage_key and (namespace is None or ns == namespace)]
        return [o for o in found if _matches_labels(o["metadata"].get("labels") or {}, labels)
                and _matches_fields(o, fields)]

    def _emit(self, type_: str, storage_key: tuple[str, str], obj: JSON,
              old: JSON | None) -> None:
        self._events.append(_Event(self._rv, type_, storage_key, copy.deepcopy(obj),
                                   copy.deepcopy(old) if old is not None else None))
        self._cond.notify_all()

    def _commit(self, rt: ResourceType, new: JSON, old: JSON | None,
                dry_run: bool = False) -> JSON:
        """Store ``new`` in place of ``old``: server-set defaults, resourceVersion, watch event.
        A deleted object (deletionTimestamp) whose last finalizer went is removed instead."""
        self._server_defaults(rt, new)
        if dry_run:
            return copy.deepcopy(new)
        meta = new["metadata"]
        key = self._key(rt, meta.get("namespace"), meta["name"])
        if old is not None and meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._objects[key] = new
            return self._remove(key)
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self._objects[key] = new
        self._emit("ADDED" if old is None else "MODIFIED", rt.storage_key, new, old)
        if rt.storage_key == CRD_KEY:
            self._sync_crds()
        return copy.deepcopy(new)

    def _remove(self, key: tuple[str, str, str, str]) -> JSON:
        old = self._objects.pop(key)
        self._rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._emit("DELETED", key[:2], gone, old)
        if key[:2] == CRD_KEY:
            self._sync_crds()
        return gone

    def _empty_namespace(self, namespace: str) -> None:
        for key in [k for k in self._objects if k[2] == namespace]:
            self._remove(key)

    def _server_defaults(self, rt: ResourceType, obj: JSON) -> None:
        """What a real control plane fills in on its own."""
        meta = obj["metadata"]
        if rt.storage_key == NAMESPACE_KEY:
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            phase = "Terminating" if meta.get("deletionTimestamp") else "Active"
            obj["status"] = {**(obj.get("status") or {}), "phase": phase}
        elif rt.storage_key == ("", "pods"):
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        elif rt.storage_key == CRD_KEY:
            try:
                _types_from_crd(obj)
            except ValueError as exc:
                raise _invalid(rt, meta["name"], str(exc)) from None
            spec, now = obj["spec"], _now()
            names = {"singular": spec["names"]["kind"].lower(),
                     "listKind": spec["names"]["kind"] + "List", **spec["names"]}
            stored = {v["name"] for v in spec.get("versions") or [] if v.get("storage")}
            status = obj["status"] = dict(obj.get("status") or {})
            status["acceptedNames"] = names
            status["storedVersions"] = sorted(set(status.get("storedVersions") or []) | stored)
            status["conditions"] = [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": now},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": now},
            ]

    # -- verbs (call with the lock held) ----------------------------------------------------------

    def _normalise(self, rt: ResourceType, body: Any) -> JSON:
        if not isinstance(body, dict):
            raise _bad_request(f"the request body must be a JSON or YAML object, not "
                               f"{type(body).__name__} (double-encoded JSON?)")
        obj = copy.deepcopy(body)
        if obj.get("kind") not in (None, "", rt.kind):
            raise _bad_request(f"the kind in the body ({obj['kind']}) does not match the "
                               f"resource ({rt.kind})")
        if obj.get("apiVersion") not in (None, "", rt.api_version):
            raise _bad_request(f"the API version in the data ({obj['apiVersion']}) does not "
                               f"match the expected API version ({rt.api_version})")
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        return obj

    def _check_namespace(self, rt: ResourceType, meta: JSON, namespace: str | None) -> str | None:
        if not rt.namespaced:
            meta.pop("namespace", None)
            return None
        if meta.get("namespace") and namespace and meta["namespace"] != namespace:
            raise _bad_request("the namespace of the provided object does not match the "
                               "namespace sent on the request")
        namespace = namespace or meta.get("namespace") or "default"
        meta["namespace"] = namespace
        return namespace

    def _create(self, rt: ResourceType, namespace: str | None, body: Any, *, via_api: bool,
                dry_run: bool = False, managed_entry: JSON | None = None) -> JSON:
        obj = self._normalise(rt, body)
        meta = obj["metadata"]
        namespace = self._check_namespace(rt, meta, namespace)
        if (via_api and self.strict_namespaces and namespace is not None
                and ("", "namespaces", "", namespace) not in self._objects):
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _invalid(rt, "", "metadata.name: Required value: name or generateName "
                                       "is required")
            while not meta.get("name") or self._key(rt, namespace, meta["name"]) in self._objects:
                meta["name"] = meta["generateName"] + "".join(
                    random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
        if self._key(rt, namespace, meta["name"]) in self._objects:
            raise ApiError(409, "AlreadyExists",
                           f'{rt.group_resource} "{meta["name"]}" already exists',
                           _details(rt, meta["name"]))
        for server_field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds",
                             "selfLink"):
            meta.pop(server_field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if managed_entry is not None:
            meta["managedFields"] = [managed_entry]
        if via_api and rt.status_subresource:
            obj.pop("status", None)
        return self._commit(rt, obj, None, dry_run)

    def _update(self, rt: ResourceType, namespace: str | None, name: str, body: Any, *,
                subresource: str | None = None, via_api: bool = True,
                dry_run: bool = False) -> JSON:
        """Replace (PUT semantics; patches and applies end here too)."""
        old = self._objects.get(self._key(rt, namespace, name))
        if old is None:
            raise _not_found(rt, name)
        new = self._normalise(rt, body)
        meta, old_meta = new["metadata"], old["metadata"]
        if meta.get("name") not in (None, "", name):
            raise _bad_request(f"the name of the object ({meta['name']}) does not match the "
                               f"name on the URL ({name})")
        self._check_namespace(rt, meta, namespace)
        if via_api and meta.get("resourceVersion") not in (None, "", old_meta["resourceVersion"]):
            raise _conflict(rt, name, STALE)
        if subresource == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            if "managedFields" in meta:
                merged["metadata"]["managedFields"] = meta["managedFields"]
            return self._commit(rt, merged, old, dry_run)
        for kept in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                     "deletionGracePeriodSeconds"):
            if kept in old_meta:
                meta[kept] = old_meta[kept]
        if "managedFields" not in meta and "managedFields" in old_meta:
            meta["managedFields"] = copy.deepcopy(old_meta["managedFields"])
        if via_api and rt.status_subresource:
            new.pop("status", None)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        changed = _spec_content(new) != _spec_content(old)
        meta["generation"] = int(old_meta.get("generation") or 1) + (1 if changed else 0)
        return self._commit(rt, new, old, dry_run)

    def _patch(self, rt: ResourceType, namespace: str | None, name: str, raw: bytes,
               content_type: str, query: dict[str, str], subresource: str | None) -> _Reply:
        dry_run = bool(query.get("dryRun"))
        if content_type == CT_APPLY_PATCH:
            return self._apply(rt, namespace, name, raw, query, subresource)
        old = self._objects.get(self._key(rt, namespace, name))
        if old is None:
            raise _not_found(rt, name)
        patch, current = _parse_body(raw), self._present(rt, old)
        try:
            if content_type == CT_JSON_PATCH:
                result = json_patch(current, patch)
            elif content_type == CT_MERGE_PATCH or (content_type == CT_STRATEGIC_PATCH
                                                    and not rt.custom):
                if not isinstance(patch, dict):
                    raise _bad_request(f"a merge patch must be a JSON object, not "
                                       f"{type(patch).__name__} (double-encoded JSON?)")
                merge = merge_patch if content_type == CT_MERGE_PATCH else strategic_merge_patch
                result = merge(current, patch)
            else:  # like a real server, no strategic merge for custom resources
                raise ApiError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format - accepted "
                               f"media types include: {CT_JSON_PATCH}, {CT_MERGE_PATCH}, "
                               f"{CT_APPLY_PATCH}"
                               + ("" if rt.custom else f", {CT_STRATEGIC_PATCH}"))
        except PatchError as exc:
            raise _invalid(rt, name, str(exc)) from None
        updated = self._update(rt, namespace, name, result, subresource=subresource,
                               dry_run=dry_run)
        return _Reply(200, self._present(rt, updated),
                      writes=[] if dry_run else [("patch", self._present(rt, updated))])

    def _apply_schema(self, rt: ResourceType) -> Schema:
        """The schema apply merges ``rt``'s objects by: the CRD's ``openAPIV3Schema`` for the
        served version (custom kinds) or ``BUILTIN_APPLY_SCHEMAS``, with ObjectMeta's metadata."""
        schema: Any = {}
        if rt.custom:
            crd = self._objects.get((*CRD_KEY, "", f"{rt.plural}.{rt.group}")) or {}
            for version in (crd.get("spec") or {}).get("versions") or []:
                if isinstance(version, dict) and version.get("name") == rt.version:
                    schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
        else:
            schema = BUILTIN_APPLY_SCHEMAS.get(rt.storage_key, {})
        if not isinstance(schema, dict):
            schema = {}
        properties = schema.get("properties")
        return {**schema, "properties": {**(properties if isinstance(properties, dict) else {}),
                                         "metadata": _OBJECT_META}}

    def _apply(self, rt: ResourceType, namespace: str | None, name: str, raw: bytes,
               query: dict[str, str], subresource: str | None) -> _Reply:
        """Server-side apply: merge the applied fields in (lists by their schema's list type:
        see ``_merge_applied``); drop the fields (and map/set list items) this manager applied
        last time but not now, unless another applier owns them; 409 on a differing value owned
        by another applier unless ``force``. Values two appliers both set alike are co-owned."""
        manager = query.get("fieldManager")
        if not manager:
            raise _bad_request("fieldManager is required for apply requests")
        force = query.get("force", "").lower() in ("true", "1")
        dry_run = bool(query.get("dryRun"))
        applied = self._normalise(rt, _parse_body(raw))
        ameta = applied["metadata"]
        if ameta.get("name") not in (None, "", name):
            raise _bad_request(f"the name of the object ({ameta['name']}) does not match the "
                               f"name on the URL ({name})")
        ameta["name"] = name
        self._check_namespace(rt, ameta, namespace)
        if subresource == "status":
            content: JSON = {"status": applied.get("status") or {}}
        else:
            content = {k: v for k, v in applied.items() if k not in ("apiVersion", "kind",
                       "metadata") and not (k == "status" and rt.status_subresource)}
            meta_fields = {k: v for k, v in ameta.items() if k not in SERVER_METADATA}
            if meta_fields:
                content["metadata"] = meta_fields
        schema = self._apply_schema(rt)
        errors = _duplicates(content, schema)
        if errors:  # a real server answers these with a bare 500
            raise ApiError(500, "", f"failed to create typed patch object ({namespace or ''}/"
                           f"{name}; {rt.group}/{rt.version}, Kind={rt.kind}): "
                           + (errors[0] if len(errors) == 1
                              else "errors:\n  " + "\n  ".join(errors)))
        paths = _field_set(content, schema)
        entry: JSON = {"manager": manager, "operation": "Apply", "apiVersion": rt.api_version,
                       "time": _now(), "fieldsType": "FieldsV1", "fieldsV1": _fields_v1(paths)}
        if subresource:
            entry["subresource"] = subresource
        old = self._objects.get(self._key(rt, namespace, name))
        if old is None:
            if subresource:
                raise _not_found(rt, name)
            created = self._create(rt, namespace, {**content, "metadata": {
                **content.get("metadata", {}), "name": name, "namespace": namespace}},
                via_api=True, dry_run=dry_run, managed_entry=entry)
            return _Reply(201, self._present(rt, created),
                          writes=[] if dry_run else [("create", self._present(rt, created))])

        entries: JSONList = copy.deepcopy(old["metadata"].get("managedFields") or [])
        same_scope = [e for e in entries if e.get("operation") == "Apply"
                      and e.get("subresource") == entry.get("subresource")]
        mine = next((e for e in same_scope if e.get("manager") == manager), None)
        others = {id(e): _paths_from_fields_v1(e.get("fieldsV1")) for e in same_scope
                  if e is not mine}
        # a conflict: a field another applier owns whose value the merge would change (an item
        # of a map or set list is its key: only values below it can change)
        merged = _merge_applied(copy.deepcopy(old), content, schema)
        conflicts = sorted((str(e["manager"]), path) for e in same_scope if e is not mine
                           for path in paths & others[id(e)]
                           if path[-1][:2] in ("f:", "i:")
                           and _get_path(old, path, schema) != _get_path(merged, path, schema))
        if conflicts and not force:
            raise self._apply_conflict(rt, name, conflicts)
        for e in same_scope:  # forced: the other appliers lose the fields in conflict
            lost = {path for m, path in conflicts if m == e["manager"]}
            if e is not mine and lost:
                others[id(e)] -= lost
                e["fieldsV1"] = _fields_v1(others[id(e)])
        kept = paths.union(*others.values())
        above_kept = {path[:n] for path in kept for n in range(1, len(path))}
        result = copy.deepcopy(old)
        previous = _paths_from_fields_v1(mine.get("fieldsV1")) if mine else set()
        for path in sorted(previous - kept - above_kept, key=lambda p: (len(p), p)):
            _delete_path(result, path, schema)
        result = _merge_applied(result, content, schema)
        if mine is not None:
            entries[entries.index(mine)] = entry
        else:
            entries.append(entry)
        result["metadata"]["managedFields"] = [
            e for e in entries if e is entry or e.get("operation") != "Apply"
            or e.get("subresource") != entry.get("subresource")
            or _paths_from_fields_v1(e.get("fieldsV1"))]
        result["metadata"]["resourceVersion"] = (ameta.get("resourceVersion")
                                                 or old["metadata"]["resourceVersion"])
        updated = self._update(rt, namespace, name, result, subresource=subresource,
                               dry_run=dry_run)
        return _Reply(200, self._present(rt, updated),
                      writes=[] if dry_run else [("patch", self._present(rt, updated))])

    @staticmethod
    def _apply_conflict(rt: ResourceType, name: str,
                        conflicts: builtins.list[tuple[str, FieldPath]]) -> ApiError:
        """The 409 a real server answers, message and causes alike."""
        causes = [{"reason": "FieldManagerConflict", "message": f"conflict with {json.dumps(m)}",
                   "field": _path_text(p)} for m, p in conflicts]
        if len(causes) == 1:
            message = f"Apply failed with 1 conflict: {causes[0]['message']}: {causes[0]['field']}"
        else:
            lines = []
            for manager in sorted({m for m, _ in conflicts}):
                lines.append(f"conflicts with {json.dumps(manager)}:")
                lines += [f"- {_path_text(p)}" for m, p in conflicts if m == manager]
            message = f"Apply failed with {len(causes)} conflicts: " + "\n".join(lines)
        return ApiError(409, "Conflict", message, {**_details(rt, name), "causes": causes})

    def _delete(self, rt: ResourceType, namespace: str | None, name: str, raw: bytes,
                dry_run: bool) -> _Reply:
        key = self._key(rt, namespace, name)
        old = self._objects.get(key)
        if old is None:
            raise _not_found(rt, name)
        options = _parse_body(raw) if raw.strip() else {}
        preconditions = (options.get("preconditions") if isinstance(options, dict) else None) or {}
        for precondition in ("uid", "resourceVersion"):
            wanted = preconditions.get(precondition)
            if wanted and wanted != old["metadata"].get(precondition):
                raise _conflict(rt, name, f"Precondition failed: {precondition} in precondition: "
                                          f"{wanted}, {precondition} in object meta: "
                                          f"{old['metadata'].get(precondition)}")
        if dry_run:
            return _Reply(200, self._present(rt, old))
        if old["metadata"].get("finalizers"):  # deletion waits for the finalizers to go
            pending = copy.deepcopy(old)
            pending["metadata"].setdefault("deletionTimestamp", _now())
            pending["metadata"].setdefault("deletionGracePeriodSeconds", 0)
            stored = self._commit(rt, pending, old)
            return _Reply(202, self._present(rt, stored), writes=[("delete", self._present(
                rt, stored))])
        if rt.storage_key == NAMESPACE_KEY:
            self._empty_namespace(name)
            self._objects[key] = terminating = copy.deepcopy(old)
            terminating["metadata"]["deletionTimestamp"] = _now()
            terminating["status"] = {**(old.get("status") or {}), "phase": "Terminating"}
        gone = self._present(rt, self._remove(key))
        body = gone if rt.returns_deleted_object else {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {**_details(rt, name), "uid": old["metadata"]["uid"]}}
        return _Reply(200, body, writes=[("delete", gone)])

    # -- HTTP routing -----------------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._meta_lock:
            self._requests.append(request)

    def _injected_fault(self, method: str, path: str) -> ApiError | None:
        with self._meta_lock:
            for fault in self._faults:
                if fault.method in ("*", method) and fault.pattern.search(path):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault.error
        return None

    def _run_callbacks(self, writes: builtins.list[tuple[str, JSON]]) -> None:
        with self._meta_lock:
            callbacks = list(self._callbacks)
        for verb, obj in writes:
            for callback in callbacks:
                try:
                    callback(verb, copy.deepcopy(obj))
                except Exception as exc:  # a test helper failing must not kill the server
                    log.exception("on_write callback failed")
                    self.callback_errors.append(exc)

    def _serve(self, method: str, path: str, query: dict[str, str], content_type: str,
               raw: bytes) -> _Reply:
        """Answer one request (raises ApiError)."""
        fault = self._injected_fault(method, path)
        if fault is not None:
            raise fault
        parts = [unquote(p) for p in path.split("/") if p]
        if not parts:
            return _Reply(200, {"paths": ["/api", "/api/v1", "/apis", "/version"]})
        if parts == ["version"]:
            major, minor = self.git_version.lstrip("v").split(".")[:2]
            return _Reply(200, {
                "major": major, "minor": minor, "gitVersion": self.git_version,
                "gitCommit": "0" * 40, "gitTreeState": "clean",
                "buildDate": "2025-05-15T00:00:00Z", "goVersion": "go1.24.2",
                "compiler": "gc", "platform": "linux/amd64"})
        if parts[0] in ("healthz", "livez", "readyz"):
            return _Reply(200, text="ok")
        with self._lock:
            if parts == ["api"]:
                return _Reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": [
                                        {"clientCIDR": "0.0.0.0/0",
                                         "serverAddress": f"127.0.0.1:{self.port}"}]})
            if parts == ["apis"]:
                return _Reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                    self._api_group(g, vs) for g, vs in self._group_versions().items()]})
            if parts[0] == "apis" and len(parts) == 2:
                versions = self._group_versions().get(parts[1])
                if not versions:
                    raise _path_not_found()
                return _Reply(200, {"kind": "APIGroup", "apiVersion": "v1",
                                    **self._api_group(parts[1], versions)})
            if parts[0] == "api" and len(parts) >= 2:
                group, version, rest = "", parts[1], parts[2:]
            elif parts[0] == "apis" and len(parts) >= 3:
                group, version, rest = parts[1], parts[2], parts[3:]
            else:
                raise _path_not_found()
            types = self._served.get((group, version))
            if types is None:
                raise _path_not_found()
            if not rest:
                return _Reply(200, {
                    "kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": f"{group}/{version}" if group else version,
                    "resources": [e for rt in types.values() for e in rt.discovery_entries()]})
            return self._serve_resource(method, types, rest, query, content_type, raw)

    def _serve_resource(self, method: str, types: dict[str, ResourceType], rest: builtins.list[str],
                        query: dict[str, str], content_type: str, raw: bytes) -> _Reply:
        watch = query.get("watch", "").lower() in ("true", "1")
        if rest[0] == "watch":  # the deprecated /watch/ path prefix
            watch, rest = True, rest[1:]
        namespace: str | None = None
        if (len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in types
                and types[rest[2]].namespaced):
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3 or rest[0] not in types:
            raise _path_not_found()
        rt = types[rest[0]]
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if (rt.namespaced and name is not None and namespace is None) or \
                (not rt.namespaced and namespace is not None) or \
                (subresource is not None and (subresource != "status"
                                              or not rt.status_subresource)):
            raise _path_not_found()
        dry_run = bool(query.get("dryRun"))

        if method == "GET" and watch:
            return _Reply(200, watch=self._watch_request(rt, namespace, name, query))
        if name is None:
            if method == "GET":
                return _Reply(200, self._list(rt, namespace, query))
            if method == "POST" and (namespace is not None or not rt.namespaced):
                obj = self._present(rt, self._create(rt, namespace, _parse_body(raw),
                                                     via_api=True, dry_run=dry_run))
                return _Reply(201, obj, writes=[] if dry_run else [("create", obj)])
            if method == "DELETE":
                return self._delete_collection(rt, namespace, query, dry_run)
        elif method == "GET":
            found = self._objects.get(self._key(rt, namespace, name))
            if found is None:
                raise _not_found(rt, name)
            return _Reply(200, self._present(rt, found))
        elif method == "PUT":
            obj = self._present(rt, self._update(rt, namespace, name, _parse_body(raw),
                                                 subresource=subresource, dry_run=dry_run))
            return _Reply(200, obj, writes=[] if dry_run else [("update", obj)])
        elif method == "PATCH":
            return self._patch(rt, namespace, name, raw, content_type, query, subresource)
        elif method == "DELETE" and subresource is None:
            return self._delete(rt, namespace, name, raw, dry_run)
        raise ApiError(405, "MethodNotAllowed",
                       "the server does not allow this method on the requested resource", {})

    def _list(self, rt: ResourceType, namespace: str | None, query: dict[str, str]) -> JSON:
        items = self._select(rt, namespace, parse_selector(query.get("labelSelector", "")),
                             parse_selector(query.get("fieldSelector", ""), fields=True))
        list_meta: JSON = {"resourceVersion": str(self._rv)}
        if query.get("continue"):
            try:
                after = json.loads(base64.urlsafe_b64decode(query["continue"]))
            except ValueError:
                raise ApiError(410, "Expired", "the provided continue parameter is too old "
                                               "or malformed") from None
            items = [o for o in items if [o["metadata"].get("namespace", ""),
                                          o["metadata"]["name"]] > after]
        limit = int(query.get("limit") or 0)
        if 0 < limit < len(items):
            last = items[limit - 1]["metadata"]
            token = json.dumps([last.get("namespace", ""), last["name"]]).encode()
            list_meta["continue"] = base64.urlsafe_b64encode(token).decode()
            list_meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        presented = [self._present(rt, o) for o in items]
        if not rt.custom:  # built-in list items carry no apiVersion/kind
            for item in presented:
                item.pop("apiVersion", None)
                item.pop("kind", None)
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": list_meta,
                "items": presented}

    def _delete_collection(self, rt: ResourceType, namespace: str | None,
                           query: dict[str, str], dry_run: bool) -> _Reply:
        items = self._select(rt, namespace, parse_selector(query.get("labelSelector", "")),
                             parse_selector(query.get("fieldSelector", ""), fields=True))
        deleted, writes = [], []
        for obj in items:
            meta = obj["metadata"]
            reply = self._delete(rt, meta.get("namespace"), meta["name"], b"", dry_run)
            deleted.append(self._present(rt, self._objects.get(
                self._key(rt, meta.get("namespace"), meta["name"]), obj)))
            writes += reply.writes
        return _Reply(200, {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                            "metadata": {"resourceVersion": str(self._rv)}, "items": deleted},
                      writes=writes)

    # -- watch ------------------------------------------------------------------------------------

    def _watch_request(self, rt: ResourceType, namespace: str | None, name: str | None,
                       query: dict[str, str]) -> _Watch:
        fields = parse_selector(query.get("fieldSelector", ""), fields=True)
        if name is not None:
            fields.append(Requirement("metadata.name", "=", frozenset({name})))
        since_text = query.get("resourceVersion", "")
        initial = query.get("sendInitialEvents", "").lower() == "true"
        try:
            since = None if initial or since_text in ("", "0") else int(since_text)
            timeout = float(query.get("timeoutSeconds") or 1800)
        except ValueError:
            raise _bad_request("invalid resourceVersion or timeoutSeconds") from None
        return _Watch(rt, namespace, parse_selector(query.get("labelSelector", "")), fields,
                      since, timeout, bookmark_initial=initial)

    def _watch_matches(self, watch: _Watch, obj: JSON | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        return ((watch.namespace is None or meta.get("namespace") == watch.namespace)
                and _matches_labels(meta.get("labels") or {}, watch.labels)
                and _matches_fields(obj, watch.fields))

    def _collect(self, watch: _Watch, after: int) -> tuple[JSONList, int]:
        """Watch events newer than ``after`` (call with the lock held)."""
        pending: builtins.list[_Event] = []
        for event in reversed(self._events):
            if event.rv <= after:
                break
            if event.storage_key == watch.rt.storage_key:
                pending.append(event)
        out: JSONList = []
        for event in reversed(pending):
            now, before = (self._watch_matches(watch, event.obj),
                           self._watch_matches(watch, event.old))
            type_ = event.type
            if type_ == "MODIFIED" and now != before:  # moved into / out of the selection
                type_ = "ADDED" if now else "DELETED"
            if now or (type_ == "DELETED" and before):
                out.append({"type": type_, "object": self._present(watch.rt, event.obj)})
        return out, self._rv

    def _watch_batches(self, watch: _Watch, client_gone: Callable[[], bool]) -> Iterator[JSONList]:
        """Batches of watch events until the timeout, the client leaving or the emulator
        stopping. The lock is never held while the caller writes a batch."""
        deadline = time.monotonic() + watch.timeout
        with self._cond:
            if watch.since is None:
                first = [{"type": "ADDED", "object": self._present(watch.rt, o)}
                         for o in self._select(watch.rt, watch.namespace, watch.labels,
                                               watch.fields)]
                if watch.bookmark_initial:
                    first.append({"type": "BOOKMARK", "object": {
                        "kind": watch.rt.kind, "apiVersion": watch.rt.api_version, "metadata": {
                            "resourceVersion": str(self._rv),
                            "annotations": {"k8s.io/initial-events-end": "true"}}}})
                last = self._rv
            else:
                full = self._events.maxlen is not None and len(self._events) == self._events.maxlen
                if full and watch.since < self._events[0].rv - 1:
                    expired = ApiError(410, "Expired", f"too old resource version: {watch.since} "
                                                       f"({self._events[0].rv - 1})")
                    first, last = [{"type": "ERROR", "object": expired.status()}], -1
                else:
                    first, last = [], watch.since
        if first:
            yield first
        while last >= 0 and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with self._cond:
                batch, last = self._collect(watch, last)
                if not batch and not self._stopping:
                    self._cond.wait(min(remaining, 0.5))
                    batch, last = self._collect(watch, last)
            if batch:
                yield batch
            elif client_gone():
                return

    # -- exec and port-forward ------------------------------------------------------------------

    def _stream_pod(self, namespace: str, name: str) -> JSON:
        """The pod an exec/port-forward targets (the API server checks it before upgrading)."""
        with self._lock:
            pod = self._objects.get(("", "pods", namespace, name))
            if pod is None:
                raise _not_found(self._by_kind[("v1", "Pod")], name)
            return copy.deepcopy(pod)

    def _exec_call(self, namespace: str, name: str, query: dict[str, builtins.list[str]]
                   ) -> ExecCall:
        """Validate an exec request like the API server does. Raises ApiError."""
        def flag(key: str) -> bool:
            return (query.get(key) or [""])[-1].lower() in ("true", "1")

        spec = self._stream_pod(namespace, name).get("spec") or {}
        container = (query.get("container") or [""])[-1]
        names = [str(c.get("name")) for c in spec.get("containers") or []]
        others = [str(c.get("name")) for key in ("initContainers", "ephemeralContainers")
                  for c in spec.get(key) or []]
        # a real pod has at least one container; one without is a test's shorthand: anything goes
        if names and not container:
            if len(names) > 1:
                init = [str(c.get("name")) for c in spec.get("initContainers") or []]
                message = (f"a container name must be specified for pod {name}, choose one of: "
                           f"[{' '.join(names)}]")
                if init:
                    message += f" or one of the init containers: [{' '.join(init)}]"
                raise _bad_request(message)
            container = names[0]
        elif names and container not in names + others:
            raise _bad_request(f"container {container} is not valid for pod {name}")
        call = ExecCall(namespace, name, container, list(query.get("command") or []),
                        stdin=flag("stdin"), stdout=flag("stdout"), stderr=flag("stderr"),
                        tty=flag("tty"))
        if not (call.stdin or call.stdout or call.stderr):
            raise _bad_request("you must specify at least 1 of stdin, stdout, stderr")
        return call

    def _exec_output(self, call: ExecCall) -> Generator[tuple[int, bytes], None, JSON]:
        """Run the exec handler: yields (channel, data) chunks, returns the final Status (what
        the server sends on the error channel)."""
        with self._meta_lock:
            self._exec_calls.append(call)
            callback = self._exec_callback
        if callback is None:
            yield STDERR_CHANNEL, b"no exec handler registered in the emulator"
            return _exit_status(126, call.command)
        chunks: Any = None
        try:
            result: Any = callback(call.namespace, call.pod, call.container, list(call.command))
            if isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], int):
                returncode, out, err = result
                if out:
                    yield STDOUT_CHANNEL, _to_bytes(out)
                if err:
                    yield STDERR_CHANNEL, _to_bytes(err)
                return _exit_status(int(returncode), call.command)
            chunks = iter(result)
            while True:
                try:
                    channel, text = next(chunks)
                except StopIteration as stop:
                    value = stop.value
                    return _exit_status(value if isinstance(value, int) else 0, call.command)
                if channel not in (STDOUT_CHANNEL, STDERR_CHANNEL):
                    raise ValueError(f"exec output channel must be 1 (stdout) or 2 (stderr), "
                                     f"not {channel!r}")
                yield channel, _to_bytes(text)
        except Exception as exc:  # a test helper failing must not kill the server
            log.exception("on_exec callback failed")
            self.callback_errors.append(exc)
            cause = f"error executing command in container: {exc}"
            return {"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
                    "message": f"Internal error occurred: {cause}",
                    "details": {"causes": [{"message": cause}]}}
        finally:
            if chunks is not None and hasattr(chunks, "close"):
                chunks.close()  # the client left early: let a generator clean up

    def _portforward_ports(self, namespace: str, name: str,
                           query: dict[str, builtins.list[str]]) -> builtins.list[int]:
        """Validate a port-forward request. Raises ApiError."""
        self._stream_pod(namespace, name)
        ports: builtins.list[int] = []
        for text in (p.strip() for value in query.get("ports") or [] for p in value.split(",")):
            if not text.isdigit() or not 0 < int(text) < 65536:
                raise _bad_request(f"invalid port {text!r}: must be between 1 and 65535")
            ports.append(int(text))
        if not ports:
            raise _bad_request('query parameter "ports" is required')
        return ports

    def _port_handler(self, namespace: str, pod: str, port: int) -> PortHandler | None:
        with self._meta_lock:
            callback = self._portforward_callback
        if callback is None:
            return None
        try:
            return callback(namespace, pod, port)
        except Exception as exc:
            log.exception("on_portforward callback failed")
            self.callback_errors.append(exc)
            return None

    def _forward(self, namespace: str, pod: str, port: int, handler: PortHandler | None,
                 data: bytes) -> tuple[bytes, str]:
        """(reply, "") or (b"", the error the server sends on the port's error channel)."""
        failed = f"error forwarding port {port} to pod {namespace}/{pod}"
        if handler is None:
            return b"", f"{failed}: dial tcp4 127.0.0.1:{port}: connect: connection refused"
        try:
            return bytes(handler(data) or b""), ""
        except Exception as exc:
            log.exception("port-forward handler failed")
            self.callback_errors.append(exc)
            return b"", f"{failed}: {exc}"


def _to_bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else str(text).encode()


def _exit_status(returncode: int, command: builtins.list[str]) -> JSON:
    """The Status the kubelet sends on the error channel when the command ends."""
    if returncode == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command "
                       f"[{' '.join(command)}], exit code {returncode}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(returncode)}]}}


# -- WebSocket (RFC 6455, server side) ------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
STDIN_CHANNEL, STDOUT_CHANNEL, STDERR_CHANNEL, ERROR_CHANNEL, RESIZE_CHANNEL = 0, 1, 2, 3, 4
# what the API server accepts, in no particular order: it picks the first one the client offers
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
PORTFORWARD_PROTOCOLS = ("v4.channel.k8s.io",)  # the kubelet's port-forward has no v5
STREAM_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/(exec|portforward)$")


def _unmask(data: bytes, key: bytes) -> bytes:
    if not data:
        return data
    mask = (key * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(mask, "big")).to_bytes(len(data), "big")


class _WebSocket:
    """A server's end of a WebSocket: unmasked unfragmented frames out, masked (possibly
    fragmented) frames in; pings answered, a close answered once. ``send`` may be called from
    one thread while another one reads."""

    def __init__(self, rfile: io.BufferedIOBase, wfile: io.BufferedIOBase) -> None:
        self._rfile, self._wfile = rfile, wfile
        self._send_lock = threading.Lock()
        self.close_sent = False
        self.peer_gone = threading.Event()  # the peer sent a close, or the connection dropped

    def send(self, payload: bytes, opcode: int = OP_BINARY) -> None:
        """Send one frame; nothing once a close was sent. Raises OSError."""
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x80 | opcode, size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
        with self._send_lock:
            if self.close_sent:
                return
            self.close_sent = opcode == OP_CLOSE
            self._wfile.write(header + payload)

    def send_channel(self, channel: int, data: bytes) -> None:
        self.send(bytes([channel]) + data)

    def close(self, code: int = 1000) -> None:
        with contextlib.suppress(OSError):
            self.send(struct.pack("!H", code), OP_CLOSE)

    def _read(self, size: int) -> bytes:
        data = self._rfile.read(size) if size else b""
        if len(data) < size:
            raise EOFError
        return data

    def receive(self) -> tuple[int, bytes] | None:
        """The next data message as (opcode, payload), or None once the peer closed (its close
        answered) or the connection dropped."""
        opcode, message = OP_BINARY, b""
        try:
            while True:
                first, second = self._read(2)
                fin, op = first & 0x80, first & 0x0F
                size = second & 0x7F
                if size == 126:
                    size = struct.unpack("!H", self._read(2))[0]
                elif size == 127:
                    size = struct.unpack("!Q", self._read(8))[0]
                if not second & 0x80:  # clients must mask their frames
                    self.close(1002)
                    break
                key = self._read(4)
                payload = _unmask(self._read(size), key)
                if op == OP_PING:
                    self.send(payload, OP_PONG)
                elif op == OP_CLOSE:
                    self.close(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2
                               else 1000)
                    break
                elif op != OP_PONG:
                    if op != OP_CONTINUATION:
                        opcode, message = op, b""
                    message += payload
                    if fin:
                        return opcode, message
        except (OSError, EOFError, ValueError):  # ValueError: the file was closed under us
            pass
        self.peer_gone.set()
        return None

    def drain(self) -> None:
        """Read and drop data messages (exec's stdin and resize) until the peer leaves."""
        while self.receive() is not None:
            pass


# -- HTTP plumbing --------------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, emulator: KubeEmulator) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.emulator = emulator
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients dropping connections (and stop()) are normal here: no stderr tracebacks."""
        log.debug("kube emulator connection error", exc_info=True)

    def close_connections(self) -> None:
        """Unblock the handler threads still waiting on kept-alive connections."""
        with self.connections_lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every reply has a length or is chunked
    disable_nagle_algorithm = True  # else each header/body write pair waits ~40 ms for an ACK
    server_version = "kube-emulator"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return body
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        emulator = self.server.emulator
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        raw = self._read_body()
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        emulator._record(RecordedRequest(self.command, url.path, query, content_type))
        stream = STREAM_PATH.match(url.path)
        if stream is not None and self.command in ("GET", "POST"):
            self._serve_stream(emulator, url.path, unquote(stream[1]), unquote(stream[2]),
                               stream[3], parse_qs(url.query, keep_blank_values=True))
            return
        if isinstance(emulator, ApiFront):
            fault = emulator._injected_fault(self.command, url.path)
            if fault is None and emulator.admission is not None \
                    and self.command in ("POST", "PUT", "PATCH"):
                fault = emulator.admission(self.command, url.path)
            if fault is not None:
                self._send(_Reply(fault.code, fault.status()))
            else:
                self._proxy(emulator, raw, query)
            return
        try:
            reply = emulator._serve(self.command, url.path, query, content_type, raw)
        except ApiError as err:
            reply = _Reply(err.code, err.status())
        except Exception as exc:
            log.exception("kube emulator failed on %s %s", self.command, self.path)
            reply = _Reply(500, ApiError(500, "InternalError", f"emulator error: {exc!r}",
                                         {}).status())
        emulator._run_callbacks(reply.writes)
        if reply.watch is not None:
            self._stream(emulator, reply.watch)
        else:
            self._send(reply)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def _send(self, reply: _Reply) -> None:
        if reply.text is not None:
            data, content_type = reply.text.encode(), "text/plain; charset=utf-8"
        else:
            data, content_type = json.dumps(reply.body).encode(), "application/json"
        self.send_response(reply.code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, emulator: KubeEmulator, watch: _Watch) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for batch in emulator._watch_batches(watch, self._client_gone):
                data = "".join(json.dumps(event) + "\n" for event in batch).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # the client went away (or the emulator stopped)
            self.close_connection = True

    # -- exec and port-forward (WebSocket) --------------------------------------------------------

    def _serve_stream(self, emulator: KubeEmulator, path: str, namespace: str, pod: str,
                      subresource: str, query: dict[str, builtins.list[str]]) -> None:
        """Check the request the way the API server does (pod, container, upgrade, protocol),
        answering errors as plain HTTP, then upgrade and run the exec or port-forward."""
        offered = [p.strip() for value in self.headers.get_all("Sec-WebSocket-Protocol") or []
                   for p in value.split(",") if p.strip()]
        supported = EXEC_PROTOCOLS if subresource == "exec" else PORTFORWARD_PROTOCOLS
        try:
            fault = emulator._injected_fault(self.command, path)
            if fault is not None:
                raise fault
            if subresource == "exec":
                target: ExecCall | builtins.list[int] = emulator._exec_call(namespace, pod, query)
            else:
                target = emulator._portforward_ports(namespace, pod, query)
            if (self.headers.get("Upgrade") or "").lower() != "websocket" \
                    or "upgrade" not in (self.headers.get("Connection") or "").lower():
                raise _bad_request("Upgrade request required")
            key = self.headers.get("Sec-WebSocket-Key") or ""
            if self.headers.get("Sec-WebSocket-Version") != "13" or not key:
                raise _bad_request("a WebSocket upgrade needs Sec-WebSocket-Key and "
                                   "Sec-WebSocket-Version: 13")
            protocol = next((p for p in offered if p in supported), None)
            if protocol is None:
                raise _bad_request(f"requested protocol(s) are not supported: {offered}; "
                                   f"supports {list(supported)}")
        except ApiError as err:
            self._send(_Reply(err.code, err.status()))
            return
        digest = hashlib.sha1((key + WS_GUID).encode(), usedforsecurity=False).digest()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", base64.b64encode(digest).decode())
        self.send_header("Sec-WebSocket-Protocol", protocol)
        self.end_headers()
        self.close_connection = True
        ws = _WebSocket(self.rfile, self.wfile)
        try:
            if isinstance(target, ExecCall):
                self._run_exec(emulator, ws, target)
            else:
                self._run_portforward(emulator, ws, namespace, pod, target)
        except OSError:  # the client went away (or the emulator stopped)
            pass

    def _run_exec(self, emulator: KubeEmulator, ws: _WebSocket, call: ExecCall) -> None:
        reader = threading.Thread(target=ws.drain, daemon=True,
                                  name=f"kube-emulator-exec:{call.namespace}/{call.pod}")
        reader.start()
        output = emulator._exec_output(call)
        try:
            while not ws.peer_gone.is_set():
                try:
                    channel, data = next(output)
                except StopIteration as stop:
                    ws.send_channel(ERROR_CHANNEL, json.dumps(stop.value).encode())
                    break
                if call.tty and channel == STDERR_CHANNEL:  # a terminal has one output stream
                    channel = STDOUT_CHANNEL
                if call.stdout if channel == STDOUT_CHANNEL else call.stderr:
                    ws.send_channel(channel, data)
        finally:
            output.close()
            ws.close()
            reader.join(timeout=2)  # the client's answering close
            if reader.is_alive():
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                reader.join(timeout=1)

    def _run_portforward(self, emulator: KubeEmulator, ws: _WebSocket, namespace: str, pod: str,
                         ports: builtins.list[int]) -> None:
        """Channel 2i carries port i's data, 2i+1 its errors; each starts with a frame holding
        the port number (uint16, little-endian)."""
        handlers = [emulator._port_handler(namespace, pod, port) for port in ports]
        failed: set[int] = set()
        for index, port in enumerate(ports):
            ws.send_channel(2 * index, port.to_bytes(2, "little"))
            ws.send_channel(2 * index + 1, port.to_bytes(2, "little"))
        while (message := ws.receive()) is not None:
            data = message[1]
            if not data or data[0] % 2 or data[0] // 2 >= len(ports) or data[0] in failed:
                continue
            index = data[0] // 2
            reply, error = emulator._forward(namespace, pod, ports[index], handlers[index],
                                             data[1:])
            if error:
                failed.add(data[0])
                ws.send_channel(data[0] + 1, error.encode())
            elif reply:
                ws.send_channel(data[0], reply)
        ws.close()

    # -- ApiFront: everything else goes to the real API server ----------------------------------

    def _upstream(self, front: ApiFront, watch: bool) -> http.client.HTTPSConnection:
        up = front.upstream
        if watch:
            return http.client.HTTPSConnection(up.host, up.port, context=up.ssl_context)
        conn: http.client.HTTPSConnection | None = getattr(self, "_upstream_conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(up.host, up.port, context=up.ssl_context,
                                               timeout=60)
            self._upstream_conn = conn
        return conn

    def _proxy(self, front: ApiFront, raw: bytes, query: dict[str, str]) -> None:
        """Forward the request as it came (the real server's token instead of the client's
        credentials) and relay the answer; a watch is relayed chunk by chunk."""
        watch = query.get("watch", "").lower() in ("true", "1")
        headers = {k: v for k in ("Content-Type", "Accept", "User-Agent")
                   if (v := self.headers.get(k))}
        headers["Authorization"] = f"Bearer {front.upstream.token}"
        conn = self._upstream(front, watch)
        try:
            conn.request(self.command, self.path, body=raw if raw else None, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._upstream_conn = None
            conn = self._upstream(front, watch)
            conn.request(self.command, self.path, body=raw if raw else None, headers=headers)
            resp = conn.getresponse()
        if watch and resp.status == 200:
            self.send_response(200)
            self.send_header("Content-Type", resp.headers.get("Content-Type",
                                                              "application/json"))
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while data := resp.read1(65536):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:  # the client went away
                self.close_connection = True
            finally:
                conn.close()
            return
        data = resp.read()
        if watch:
            conn.close()
        self.send_response(resp.status)
        for name in ("Content-Type", "Warning", "Audit-Id"):
            for value in resp.headers.get_all(name) or []:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if self.command in MUTATING_METHODS and resp.status < 300 and not query.get("dryRun"):
            try:
                obj = json.loads(data) if data else {}
            except ValueError:
                obj = {}
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                    "DELETE": "delete"}[self.command]
            front._run_callbacks([(verb, obj if isinstance(obj, dict) else {})])

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


# -- a front for a real API server ----------------------------------------------------------------

class ApiFront(KubeEmulator):
    """What a real API server cannot do without nodes, in front of one: the lab's kubeconfig
    points here (plain HTTP, like the emulator); every request is recorded (``requests``,
    ``writes()``), may be failed on purpose (``fail_next``) and is otherwise forwarded unchanged
    to the real kube-apiserver with its token; only pods' ``exec`` and ``portforward`` are
    answered here (``on_exec``, ``on_portforward``), for pods that exist on the real server.
    ``on_write`` callbacks run after each successful write the real server accepted, before the
    answer goes back. The test-side calls (``get``, ``list``, ``put``, ``delete``,
    ``patch_status``, ``resource_type``) are real requests too (``upstream``, a ``RealApi``)."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self._reads = threading.local()
        # a validating webhook the real server would call: (method, path) → refusal or None
        self.admission: Callable[[str, str], ApiError | None] | None = None
        self._front_ready = False
        super().__init__()
        self._front_ready = True

    # A controller pass reads the same objects many times: ``cached_reads()`` lets one thread
    # keep what it read until it writes (like an informer cache, without the lag).

    @contextlib.contextmanager
    def cached_reads(self) -> Iterator[None]:
        outer = getattr(self._reads, "cache", None)
        if outer is None:
            self._reads.cache = {}
        try:
            yield
        finally:
            if outer is None:
                self._reads.cache = None

    def forget_reads(self) -> None:
        if getattr(self._reads, "cache", None) is not None:
            self._reads.cache = {}

    def _cached(self, key: tuple[Any, ...], read: Callable[[], Any]) -> Any:
        cache = getattr(self._reads, "cache", None)
        if cache is None:
            return read()
        if key not in cache:
            cache[key] = read()
        return copy.deepcopy(cache[key])

    def put(self, obj: JSON) -> JSON:
        if not self._front_ready:
            return obj  # the emulator's own default namespaces: the real server has them
        self.forget_reads()
        result: JSON = self.upstream.put(obj)
        return result

    def get(self, api_version: str, kind: str, name: str,
            namespace: str | None = None) -> JSON | None:
        result: JSON | None = self._cached(
            ("get", api_version, kind, name, namespace),
            lambda: self.upstream.get(api_version, kind, name, namespace))
        return result

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str = "") -> JSONList:
        result: JSONList = self._cached(
            ("list", api_version, kind, namespace, label_selector),
            lambda: self.upstream.list(api_version, kind, namespace, label_selector))
        return result

    def delete(self, api_version: str, kind: str, name: str,
               namespace: str | None = None) -> bool:
        self.forget_reads()
        return bool(self.upstream.delete(api_version, kind, name, namespace))

    def patch_status(self, api_version: str, kind: str, name: str, namespace: str | None,
                     status: JSON) -> JSON:
        self.forget_reads()
        result: JSON = self.upstream.patch_status(api_version, kind, name, namespace, status)
        return result

    def resource_type(self, api_version: str, kind: str) -> Any:
        return self.upstream.resource_type(api_version, kind)

    def _stream_pod(self, namespace: str, name: str) -> JSON:
        pod = self.upstream.get("v1", "Pod", name, namespace)
        if pod is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found',
                           {"name": name, "kind": "pods"})
        return dict(pod)
