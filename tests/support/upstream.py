"""Offline validation against the pinned upstream schemas (test support only).

The folder ``shared/upstream`` (see its README.md and FACTS.md) holds verbatim upstream
CRDs and Helm values/schema files for Cilium 1.18.4, Gateway API v1.4.0 and cert-manager
v1.19.0. This module checks what the project renders against them, so a typo fails a
unit test instead of being silently dropped by the API server or ignored by Helm.

Where the data lives
    ``$LAB_UPSTREAM_DIR`` if set (and non-empty), else ``<repo root>/../shared/upstream``.
    :func:`upstream_dir` returns ``None`` when that folder is absent and
    :func:`require_upstream` turns absence (or missing files) into a skip with a reason naming
    both. Where neither exists, the session fetches the pinned files into a cache first and
    points ``$LAB_UPSTREAM_DIR`` there (``tests/support/deps.py``).
    Built-in kinds (Deployment, Service, ...) do not need the folder at all.

Public API
    :func:`upstream_dir`, :func:`require_upstream`, :class:`CrdIndex`, :class:`CrdVersion`,
    :func:`get_crd_index`, :func:`validate_object`, :func:`validate_helm_values`,
    :func:`helm_defaults`, :func:`helm_values_schema`, :data:`NOT_CHECKED`.

Rules for Kubernetes objects (:func:`validate_object`)
    * Groups of the pinned CRDs (``cilium.io``, ``gateway.networking.k8s.io``,
      ``gateway.networking.x-k8s.io``, ``cert-manager.io``, ``acme.cert-manager.io``) are
      validated against the CRD's ``openAPIV3Schema`` for that version, converted from the
      Kubernetes OpenAPI v3 dialect to JSON Schema Draft 7 (see :func:`k8s_schema_to_jsonschema`):
      unknown fields are errors, ``x-kubernetes-int-or-string`` allows integer or string,
      ``nullable`` allows null (a null anywhere else is an error: the API server drops it),
      the formats the API server checks (int32, int64, byte, date-time, ipv4, ipv6, cidr)
      are checked and other formats are ignored, ``x-kubernetes-list-type: set|map`` is
      checked for duplicates, CEL ``x-kubernetes-validations`` are NOT checked (listed by
      :meth:`CrdIndex.not_checked`). A version that exists with ``served: false`` is an
      error; ``metadata`` is checked minimally (see :func:`metadata_errors`), and
      ``metadata.namespace`` on a cluster-scoped kind is an error (the API server drops it).
    * Every other apiVersion goes to ``kubernetes_validate.validate(obj, "1.33", strict=True)``
      (unknown fields are errors); a kind it has no schema for gives ``"unknown kind: ..."``.

Rules for Helm values (:func:`validate_helm_values`)
    * The values are merged over the chart's ``values.yaml`` the way Helm does (maps merge,
      ``null`` deletes a default) and the result is validated with ``values.schema.json``.
    * Every key path of the given values must exist in ``values.yaml``: Helm ignores
      unknown keys silently. Exempt ("free-form") are keys whose ``values.yaml`` default is
      ``{}`` or ``null``, and keys that are pass-through maps by nature (``*annotations``,
      ``*labels``, ``nodeSelector``, ``affinity``, ``resources``, ``*securityContext``,
      probes, ``extra*``, ...; see :data:`FREE_FORM_KEYS`). List items are checked by the
      schema only.

Errors are plain strings ``"<path>: <message>"`` with paths such as
``spec.blocks[0].cidr`` or ``hubble.relay.enabled``; an empty list means valid.
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import functools
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema

from lab import yamlio

__all__ = [
    "CERT_MANAGER_DIR",
    "CILIUM_DIR",
    "CRD_GROUPS",
    "DEFAULT_UPSTREAM_DIR",
    "ENV_VAR",
    "FREE_FORM_KEYS",
    "GATEWAY_API_DIR",
    "GATEWAY_CHANNELS",
    "KUBERNETES_VERSION",
    "NOT_CHECKED",
    "CrdIndex",
    "CrdVersion",
    "get_crd_index",
    "helm_defaults",
    "helm_values_schema",
    "k8s_schema_to_jsonschema",
    "metadata_errors",
    "require_upstream",
    "upstream_dir",
    "validate_helm_values",
    "validate_object",
]

ENV_VAR = "LAB_UPSTREAM_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_UPSTREAM_DIR = REPO_ROOT.parent / "shared" / "upstream"

CILIUM_DIR = "cilium-1.18.4"
GATEWAY_API_DIR = "gateway-api-1.4.0"
CERT_MANAGER_DIR = "cert-manager-1.19.0"
GATEWAY_CHANNELS = ("standard", "experimental")
#: Kubernetes version for built-in kinds (kind v0.29.0 defaults to v1.33.1; Cilium 1.18 is
#: tested on 1.30-1.33).
KUBERNETES_VERSION = "1.33"

#: API groups served by the pinned CRDs. Objects in these groups never fall through to
#: kubernetes_validate: an unknown kind/version there is reported as such.
CRD_GROUPS = frozenset(
    {
        "cilium.io",
        "gateway.networking.k8s.io",
        "gateway.networking.x-k8s.io",
        "cert-manager.io",
        "acme.cert-manager.io",
    }
)

#: What the validators deliberately do not check (per-CRD CEL rules: CrdIndex.not_checked).
NOT_CHECKED: tuple[str, ...] = (
    "CRD x-kubernetes-validations (CEL rules): never evaluated; list them per kind with "
    "CrdIndex.not_checked(api_version, kind)",
    "CRD defaulting: defaults are not applied before validation (no pinned CRD has a "
    "required field with a default, so this changes no verdict today)",
    "CRD x-kubernetes-list-type=map items: keys missing from an item fall back to the "
    "schema default, else null, when looking for duplicates",
    "CRD patterns: Go RE2 patterns run with Python 're' (or the 'regex' package for \\p "
    "classes); a pattern neither can compile is skipped and listed by not_checked()",
    "CRD formats other than int32, int64, byte, date-time, ipv4, ipv6, cidr are ignored",
    "metadata: only name/generateName/namespace/labels/annotations syntax is checked; "
    "ownerReferences, finalizers, managedFields etc. are only type-checked loosely",
    "built-in kinds: kubernetes_validate schemas do not know enum values, name rules per "
    "kind, immutability or cross-field rules enforced by the API server's Go validation",
    "Helm: templates are not rendered; a key that exists in values.yaml but that the "
    "templates never read cannot be detected; free-form subtrees are not checked "
    "against values.yaml",
)


# --------------------------------------------------------------------------- location


def upstream_dir() -> Path | None:
    """Return the upstream reference folder, or ``None`` when it does not exist.

    ``$LAB_UPSTREAM_DIR`` wins when set to a non-empty value (even if that path is
    missing: then the answer is ``None``); otherwise ``<repo root>/../shared/upstream``.
    """
    raw = os.environ.get(ENV_VAR, "").strip()
    path = Path(raw).expanduser() if raw else DEFAULT_UPSTREAM_DIR
    return path.resolve() if path.is_dir() else None


def require_upstream() -> Path:
    """The complete upstream folder, or skip (fail under CI) saying what to set: see
    :func:`tests.support.deps.require_upstream` (which also fetches missing files at start)."""
    from tests.support import deps

    return deps.require_upstream()


# --------------------------------------------------------------------------- helpers


def _yaml_load_all(path: Path) -> list[Any]:
    return [doc for doc in yamlio.load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _fmt_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(root)"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _normalize(value: Any) -> Any:
    """Deep copy as JSON-like data (YAML timestamps become RFC 3339 strings, tuples lists)."""
    if isinstance(value, Mapping):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            return value.isoformat() + "Z"
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, _dt.date):
        return value.isoformat()
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- formats

_K8S_FORMATS = jsonschema.FormatChecker(formats=())
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fmt_int32(value: Any) -> bool:
    return not _is_int(value) or -(2**31) <= value < 2**31


def _fmt_int64(value: Any) -> bool:
    return not _is_int(value) or -(2**63) <= value < 2**63


def _fmt_byte(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    try:
        base64.b64decode(value, validate=True)
    except ValueError:
        return False
    return True


def _fmt_date_time(value: Any) -> bool:
    return not isinstance(value, str) or bool(_DATE_TIME.match(value))


def _fmt_ipv4(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _fmt_ipv6(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


def _fmt_cidr(value: Any) -> bool:
    # Go's net.ParseCIDR: host bits may be set, the prefix length is mandatory.
    if not isinstance(value, str):
        return True
    if "/" not in value:
        return False
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


for _name, _check in (
    ("int32", _fmt_int32),
    ("int64", _fmt_int64),
    ("byte", _fmt_byte),
    ("date-time", _fmt_date_time),
    ("ipv4", _fmt_ipv4),
    ("ipv6", _fmt_ipv6),
    ("cidr", _fmt_cidr),
):
    _K8S_FORMATS.checks(_name)(_check)


# --------------------------------------------------------------------------- schema dialect


@functools.cache
def _compile_pattern(pattern: str) -> Any:
    """Compile a Go RE2 pattern: Python ``re`` first, then ``regex`` (``\\pC`` etc.)."""
    try:
        return re.compile(pattern)
    except re.error:
        pass
    try:
        import regex  # optional: supports Unicode classes such as \PC
    except ImportError:
        return None
    try:
        return regex.compile(pattern)
    except Exception:
        return None


def _pattern_keyword(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if not isinstance(instance, str):
        return
    compiled = _compile_pattern(pattern)
    if compiled is not None and not compiled.search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _list_map_keys_keyword(
    validator: Any, keys: Sequence[str], instance: Any, schema: Any
) -> Iterator[Any]:
    """``x-kubernetes-list-type: map``: the tuple of key fields must be unique per item."""
    if not isinstance(instance, list):
        return
    item_props = (schema.get("items") or {}).get("properties") or {}
    defaults = {k: (item_props.get(k) or {}).get("x-lab-default") for k in keys}
    seen: dict[str, int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, Mapping):
            continue
        ident = {k: item.get(k, defaults[k]) for k in keys}
        token = json.dumps(ident, sort_keys=True, default=str)
        if token in seen:
            yield jsonschema.ValidationError(
                f"items [{seen[token]}] and [{index}] have the same key {ident} "
                f"(x-kubernetes-list-type: map, keys {list(keys)}): duplicates are rejected",
                path=[index],
            )
        else:
            seen[token] = index


_K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"pattern": _pattern_keyword, "x-lab-list-map-keys": _list_map_keys_keyword},
)

# JSON-Schema validation keywords copied through unchanged (recursing where needed).
_PLAIN_KEYWORDS = (
    "type",
    "enum",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "required",
)


def k8s_schema_to_jsonschema(
    node: Mapping[str, Any],
    *,
    path: str = "",
    notes: list[str] | None = None,
    structural: bool = True,
) -> dict[str, Any]:
    """Convert a Kubernetes structural ``openAPIV3Schema`` node to JSON Schema Draft 7.

    * An object node (``type: object`` or ``properties``) outside ``allOf/anyOf/oneOf/not``
      without ``additionalProperties`` and without ``x-kubernetes-preserve-unknown-fields:
      true`` gets ``additionalProperties: false``: the API server would prune the field
      (or reject it with kubectl's default ``--validate=strict``). Junctor branches only
      add value constraints in structural schemas, so they stay open.
    * ``x-kubernetes-int-or-string: true`` becomes ``type: [integer, string]``.
    * ``nullable: true`` adds ``"null"`` to ``type`` (and ``None`` to ``enum``).
    * ``x-kubernetes-list-type: set`` becomes ``uniqueItems``; ``map`` becomes the custom
      keyword ``x-lab-list-map-keys`` (duplicate key tuples are errors).
    * OpenAPI 3.0 boolean ``exclusiveMinimum/Maximum`` become Draft 7 numbers.
    * ``x-kubernetes-validations`` (CEL), ``default``, ``description`` are dropped; CEL
      rules and patterns that cannot be compiled are appended to ``notes``.
    """
    if notes is None:
        notes = []
    where = path or "(root)"
    out: dict[str, Any] = {k: copy.deepcopy(node[k]) for k in _PLAIN_KEYWORDS if k in node}

    for rule in node.get("x-kubernetes-validations") or ():
        message = rule.get("message") or rule.get("messageExpression") or ""
        notes.append(f"{where}: CEL rule not checked: {rule.get('rule')!r} ({message})")
    if "pattern" in node and _compile_pattern(node["pattern"]) is None:
        notes.append(f"{where}: pattern not checked (cannot compile): {node['pattern']!r}")
    if "default" in node:
        out["x-lab-default"] = copy.deepcopy(node["default"])

    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*types, "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True and limit in out:
            out[bound] = out.pop(limit)

    if isinstance(node.get("properties"), Mapping):
        out["properties"] = {
            name: k8s_schema_to_jsonschema(
                sub, path=_join(path, name), notes=notes, structural=structural
            )
            for name, sub in node["properties"].items()
        }
    if isinstance(node.get("items"), Mapping):
        out["items"] = k8s_schema_to_jsonschema(
            node["items"], path=f"{path}[]", notes=notes, structural=structural
        )
    additional = node.get("additionalProperties")
    if isinstance(additional, Mapping):
        out["additionalProperties"] = k8s_schema_to_jsonschema(
            additional, path=f"{path}.*", notes=notes, structural=structural
        )
    elif isinstance(additional, bool):
        out["additionalProperties"] = additional
    for junctor in ("allOf", "anyOf", "oneOf"):
        if isinstance(node.get(junctor), list):
            out[junctor] = [
                k8s_schema_to_jsonschema(sub, path=path, notes=notes, structural=False)
                for sub in node[junctor]
            ]
    if isinstance(node.get("not"), Mapping):
        out["not"] = k8s_schema_to_jsonschema(node["not"], path=path, notes=notes, structural=False)

    list_type = node.get("x-kubernetes-list-type")
    if list_type == "set":
        out["uniqueItems"] = True
    elif list_type == "map" and node.get("x-kubernetes-list-map-keys"):
        out["x-lab-list-map-keys"] = list(node["x-kubernetes-list-map-keys"])

    is_object = node.get("type") == "object" or "properties" in node
    if (
        structural
        and is_object
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _schema_errors(validator: Any, instance: Any, what: str) -> list[str]:
    """Run ``validator`` and format its errors (one message per unknown field)."""
    errors: list[str] = []
    for err in validator.iter_errors(instance):
        path = _fmt_path(err.absolute_path)
        if err.validator == "additionalProperties" and err.validator_value is False:
            props = err.schema.get("properties") or {}
            patterns = list((err.schema.get("patternProperties") or {}).keys())
            for key in err.instance if isinstance(err.instance, Mapping) else ():
                if key in props or any(re.search(p, key) for p in patterns):
                    continue
                errors.append(
                    f"{_join('' if path == '(root)' else path, key)}: unknown field "
                    f"(not in the {what} schema; kubectl --validate=strict rejects it, "
                    "otherwise the API server silently drops it)"
                )
            continue
        if err.validator == "type" and err.instance is None:
            errors.append(
                f"{path}: null for a non-nullable field (the API server drops it): "
                f"expected {err.validator_value}"
            )
            continue
        message = err.message
        if len(message) > 300:
            message = message[:297] + "..."
        if err.validator in ("anyOf", "oneOf") and err.context:
            best = jsonschema.exceptions.best_match(err.context)
            if best is not None:
                message += f" (e.g. {_fmt_path(best.absolute_path)}: {best.message[:200]})"
        errors.append(f"{path}: {message}")
    return sorted(dict.fromkeys(errors))


# --------------------------------------------------------------------------- metadata

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_OBJECT_META_KEYS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "labels",
        "annotations",
        "finalizers",
        "ownerReferences",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
    }
)


def _qualified_key_error(key: Any) -> str | None:
    if not isinstance(key, str) or not key:
        return "key must be a non-empty string"
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "prefix must be a DNS subdomain (lowercase, at most 253 characters)"
    if len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return "name part must be at most 63 characters [A-Za-z0-9-_.], alphanumeric at both ends"
    return None


def metadata_errors(
    meta: Any,
    *,
    name_rule: Literal["dns-subdomain", "path-segment"] = "dns-subdomain",
    cluster_scoped: bool | None = None,
    reject_unknown_keys: bool = True,
    kind: str = "object",
) -> list[str]:
    """Minimal ``metadata`` checks, paths prefixed with ``metadata.``.

    ``name`` (or ``generateName``) is required; ``name`` must be a DNS subdomain (custom
    resources) or a path segment (built-ins such as ``system:`` ClusterRoles);
    ``namespace`` must be a DNS label and is an error on a cluster-scoped kind;
    ``labels`` and ``annotations`` must map qualified names to strings (label values at
    most 63 characters, annotations at most 256 KiB in total); keys that ObjectMeta does
    not have are errors when ``reject_unknown_keys``.
    """
    if meta is None:
        return ["metadata: required (with name or generateName)"]
    if not isinstance(meta, Mapping):
        return [f"metadata: must be a map, got {type(meta).__name__}"]
    errors: list[str] = []
    if reject_unknown_keys:
        for key in meta:
            if key not in _OBJECT_META_KEYS:
                errors.append(
                    f"metadata.{key}: unknown field (ObjectMeta has no such field; "
                    "the API server drops it)"
                )
    name, generate = meta.get("name"), meta.get("generateName")
    if not name and not generate:
        errors.append("metadata.name: required (or metadata.generateName)")
    for key, value in (("name", name), ("generateName", generate)):
        if value is None:
            continue
        if not isinstance(value, str):
            errors.append(f"metadata.{key}: must be a string, got {_short(value)}")
            continue
        checked = value[:-1] if key == "generateName" and value.endswith("-") else value
        if key == "generateName" and not checked:
            continue
        if name_rule == "dns-subdomain":
            if len(value) > 253 or not _DNS_SUBDOMAIN.match(checked):
                errors.append(
                    f"metadata.{key}: {value!r} is not a DNS subdomain (lowercase "
                    "alphanumerics, '-' and '.', at most 253 characters)"
                )
        elif checked in (".", "..") or "/" in checked or "%" in checked:
            errors.append(f"metadata.{key}: {value!r} may not be '.', '..' or contain '/' or '%'")
    namespace = meta.get("namespace")
    if namespace is not None:
        if cluster_scoped:
            errors.append(
                f"metadata.namespace: {kind} is cluster-scoped; the namespace "
                f"{_short(namespace)} would be dropped"
            )
        elif (
            not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL.match(namespace)
        ):
            errors.append(f"metadata.namespace: {_short(namespace)} is not a DNS label")
    for field_name in ("labels", "annotations"):
        mapping = meta.get(field_name)
        if mapping is None:
            continue
        if not isinstance(mapping, Mapping):
            errors.append(f"metadata.{field_name}: must be a map of strings")
            continue
        total = 0
        for key, value in mapping.items():
            where = f"metadata.{field_name}[{key!r}]"
            problem = _qualified_key_error(key)
            if problem:
                errors.append(f"{where}: {problem}")
            if not isinstance(value, str):
                errors.append(f"{where}: value must be a string, got {_short(value)}")
                continue
            total += len(str(key)) + len(value)
            if field_name == "labels" and (len(value) > 63 or not _LABEL_VALUE.match(value)):
                errors.append(
                    f"{where}: label value {value!r} must be at most 63 characters "
                    "[A-Za-z0-9-_.], alphanumeric at both ends"
                )
        if field_name == "annotations" and total > 256 * 1024:
            errors.append("metadata.annotations: total size exceeds 256 KiB")
    finalizers = meta.get("finalizers")
    if finalizers is not None and (
        not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers)
    ):
        errors.append("metadata.finalizers: must be a list of strings")
    return errors


# --------------------------------------------------------------------------- CRDs


@dataclass(frozen=True)
class CrdVersion:
    """One ``spec.versions[]`` entry of a loaded CRD."""

    group: str
    version: str
    kind: str
    plural: str
    scope: str  # "Namespaced" | "Cluster"
    served: bool
    storage: bool
    deprecated: bool
    deprecation_warning: str | None
    schema: Mapping[str, Any] = field(repr=False)  # verbatim openAPIV3Schema
    source: Path = field(repr=False)
    channel: str | None = None  # Gateway API channel, None for cilium/cert-manager

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


class CrdIndex:
    """Every pinned CRD, looked up by ``(apiVersion, kind)``.

    Loads ``cilium-1.18.4/crds``, ``gateway-api-1.4.0/<channel>`` for each requested
    channel and ``cert-manager-1.19.0/crds``. Channels stay separate: the default index
    has the standard channel only. If several channels are given and define the same CRD
    (same ``metadata.name``), the later channel replaces it whole, as installing that
    bundle on top would.
    """

    def __init__(self, channels: Sequence[str] = ("standard",), root: Path | None = None):
        unknown = [c for c in channels if c not in GATEWAY_CHANNELS]
        if unknown:
            raise ValueError(f"unknown Gateway API channel(s) {unknown}; use {GATEWAY_CHANNELS}")
        self.channels = tuple(channels)
        self.root = root if root is not None else require_upstream()
        sources: list[tuple[Path, str | None]] = [(self.root / CILIUM_DIR / "crds", None)]
        sources += [(self.root / GATEWAY_API_DIR / ch, ch) for ch in self.channels]
        sources.append((self.root / CERT_MANAGER_DIR / "crds", None))

        crds: dict[str, list[CrdVersion]] = {}
        for folder, channel in sources:
            files = sorted(folder.glob("*.yaml"))
            if not files:
                raise FileNotFoundError(f"no CRD files in {folder}")
            for path in files:
                for doc in _yaml_load_all(path):
                    if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                        continue
                    spec = doc["spec"]
                    crds[doc["metadata"]["name"]] = [
                        CrdVersion(
                            group=spec["group"],
                            version=v["name"],
                            kind=spec["names"]["kind"],
                            plural=spec["names"]["plural"],
                            scope=spec["scope"],
                            served=bool(v.get("served")),
                            storage=bool(v.get("storage")),
                            deprecated=bool(v.get("deprecated", False)),
                            deprecation_warning=v.get("deprecationWarning"),
                            schema=v["schema"]["openAPIV3Schema"],
                            source=path,
                            channel=channel,
                        )
                        for v in spec["versions"]
                    ]
        self._by_gvk: dict[tuple[str, str, str], CrdVersion] = {}
        self._by_gk: dict[tuple[str, str], list[CrdVersion]] = {}
        for versions in crds.values():
            for cv in versions:
                self._by_gvk[(cv.group, cv.version, cv.kind)] = cv
                self._by_gk.setdefault((cv.group, cv.kind), []).append(cv)
        self._compiled: dict[tuple[str, str, str], tuple[Any, list[str]]] = {}

    # ---- lookup
    def lookup(self, api_version: str, kind: str) -> CrdVersion | None:
        """The CRD version for ``(apiVersion, kind)``, served or not; ``None`` if undefined."""
        group, version = _split_api_version(api_version)
        return self._by_gvk.get((group, version, kind))

    def schema(self, api_version: str, kind: str) -> Mapping[str, Any]:
        """The verbatim ``openAPIV3Schema`` of a served version (``KeyError`` otherwise)."""
        cv = self.lookup(api_version, kind)
        if cv is None or not cv.served:
            state = "not served" if cv is not None else "not defined"
            raise KeyError(f"{kind} {api_version} is {state} by the loaded CRDs")
        return cv.schema

    def kinds(self, served_only: bool = True) -> list[tuple[str, str]]:
        """All ``(apiVersion, kind)`` pairs, sorted."""
        return sorted(
            (cv.api_version, cv.kind)
            for cv in self._by_gvk.values()
            if cv.served or not served_only
        )

    def not_checked(self, api_version: str, kind: str) -> list[str]:
        """CEL rules (and uncompilable patterns) of that kind's schema that are NOT checked."""
        cv = self.lookup(api_version, kind)
        if cv is None:
            raise KeyError(f"{kind} {api_version} is not defined by the loaded CRDs")
        return list(self._compile(cv)[1])

    def _compile(self, cv: CrdVersion) -> tuple[Any, list[str]]:
        key = (cv.group, cv.version, cv.kind)
        if key not in self._compiled:
            notes: list[str] = []
            converted = k8s_schema_to_jsonschema(cv.schema, notes=notes)
            props = converted.setdefault("properties", {})
            props["apiVersion"] = {"const": cv.api_version}
            props["kind"] = {"const": cv.kind}
            props["metadata"] = {}  # checked by metadata_errors()
            converted["$schema"] = "http://json-schema.org/draft-07/schema#"
            validator = _K8sValidator(converted, format_checker=_K8S_FORMATS)
            self._compiled[key] = (validator, notes)
        return self._compiled[key]

    # ---- validation
    def validate(self, obj: Mapping[str, Any]) -> list[str]:
        """Validate a custom resource; see the module docstring for the rules."""
        head = _head_errors(obj)
        if head:
            return head
        api_version, kind = obj["apiVersion"], obj["kind"]
        group, version = _split_api_version(api_version)
        cv = self._by_gvk.get((group, version, kind))
        if cv is None:
            known = self._by_gk.get((group, kind))
            if known:
                names = ", ".join(
                    f"{v.version}{'' if v.served else ' (not served)'}" for v in known
                )
                return [f"apiVersion: {kind} has no version {version!r} (defined: {names})"]
            return [
                f"unknown kind: {kind} ({api_version}) is not defined by the CRDs loaded from "
                f"{self.root} (Gateway API channels: {', '.join(self.channels)})"
            ]
        if not cv.served:
            served = [v.version for v in self._by_gk[(group, kind)] if v.served]
            return [
                f"apiVersion: {api_version} {kind} exists but is not served (served: false); "
                f"served versions: {served or 'none'}"
            ]
        validator, _ = self._compile(cv)
        data = _normalize(obj)
        errors = _schema_errors(validator, data, f"{kind} {api_version}")
        errors += metadata_errors(
            data.get("metadata"),
            name_rule="dns-subdomain",
            cluster_scoped=cv.scope == "Cluster",
            kind=kind,
        )
        return errors


@functools.cache
def _crd_index(root: Path, channels: tuple[str, ...]) -> CrdIndex:
    return CrdIndex(channels=channels, root=root)


def get_crd_index(channels: Sequence[str] = ("standard",)) -> CrdIndex:
    """Module-level cached :class:`CrdIndex` for the current upstream folder (skips if absent)."""
    return _crd_index(require_upstream(), tuple(channels))


# --------------------------------------------------------------------------- objects


def _head_errors(obj: Any) -> list[str]:
    if not isinstance(obj, Mapping):
        return [f"(root): expected a mapping, got {type(obj).__name__}"]
    errors = []
    for key in ("apiVersion", "kind"):
        if not isinstance(obj.get(key), str) or not obj.get(key):
            errors.append(f"{key}: required (non-empty string)")
    return errors


def validate_object(
    obj: Mapping[str, Any],
    *,
    channels: Sequence[str] = ("standard",),
    kubernetes_version: str = KUBERNETES_VERSION,
) -> list[str]:
    """Validate one Kubernetes object; return error strings (empty when valid).

    Objects in :data:`CRD_GROUPS` are checked against the pinned CRDs (Gateway API
    ``channels``, default standard only; skips the test if the upstream folder is absent).
    Everything else is checked with ``kubernetes_validate`` in strict mode for
    ``kubernetes_version``; a kind neither knows gives ``"unknown kind: ..."``.
    """
    head = _head_errors(obj)
    if head:
        return head
    group, _ = _split_api_version(obj["apiVersion"])
    if group in CRD_GROUPS:
        return get_crd_index(channels).validate(obj)
    return _validate_builtin(obj, kubernetes_version)


def _validate_builtin(obj: Mapping[str, Any], kubernetes_version: str) -> list[str]:
    import kubernetes_validate

    data = _normalize(obj)
    api_version, kind = data["apiVersion"], data["kind"]
    try:
        kubernetes_validate.validate(data, kubernetes_version, strict=True)
        errors: list[str] = []
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"unknown kind: {kind} ({api_version}) is neither a Kubernetes {kubernetes_version} "
            "built-in kind (kubernetes_validate) nor a kind of the pinned CRDs"
        ]
    except kubernetes_validate.ValidationError as exc:
        validator = _builtin_validator(exc.version, api_version, kind)
        if validator is not None:
            errors = _schema_errors(
                validator, data, f"{kind} {api_version} (Kubernetes {exc.version})"
            )
        else:
            errors = []
        if not errors:  # fallback: the single error kubernetes_validate reported
            errors = [f"{_fmt_path(exc.path)}: {exc.message}"]
    errors += metadata_errors(
        data.get("metadata"), name_rule="path-segment", reject_unknown_keys=False, kind=kind
    )
    return errors


@functools.cache
def _builtin_validator(major_minor: str, api_version: str, kind: str) -> Any:
    """All-errors validator over kubernetes_validate's strict schema (None if unavailable).

    kubernetes_validate.validate() stops at the first error; this rebuilds the same
    Draft 2020-12 validator from the package's data to list every error. Any surprise in
    the package's internals makes it return None and the caller falls back.
    """
    try:
        from kubernetes_validate import utils
        from referencing import Registry, Resource

        full = [v for v in utils.all_versions() if utils.major_minor(v) == major_minor][-1]
        schema_dir = f"kubernetes-json-schema/v{full}-local-strict"
        api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        schema = utils.schema_contents(f"{schema_dir}/{kind.lower()}-{api}.json", major_minor)
        definitions = _builtin_definitions(schema_dir, major_minor)
        registry = Resource.from_contents(definitions) @ (
            Resource.from_contents(schema) @ Registry()
        )
        return jsonschema.Draft202012Validator(schema, registry=registry)
    except Exception:
        return None


@functools.cache
def _builtin_definitions(schema_dir: str, major_minor: str) -> Any:
    from kubernetes_validate import utils

    return utils.schema_contents(f"{schema_dir}/_definitions.json", major_minor)


# --------------------------------------------------------------------------- Helm values

HelmChart = Literal["cilium", "cert-manager"]
_HELM_CHARTS: dict[str, tuple[str, str]] = {
    "cilium": (f"{CILIUM_DIR}/helm", "cilium 1.18.4"),
    "cert-manager": (f"{CERT_MANAGER_DIR}/helm", "cert-manager v1.19.0"),
}

#: Keys whose subtree is a pass-through Kubernetes map (or list) by nature: keys below
#: them are not looked up in values.yaml. Also free-form: any key ending in
#: "annotations"/"labels" (case-insensitive), any key starting with "extra", and any key
#: whose values.yaml default is {} or null.
FREE_FORM_KEYS = frozenset(
    {
        "nodeSelector",
        "affinity",
        "tolerations",
        "topologySpreadConstraints",
        "resources",
        "initResources",
        "securityContext",
        "podSecurityContext",
        "containerSecurityContext",
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "lifecycle",
        "updateStrategy",
        "strategy",
        "env",
    }
)
_FREE_FORM_SUFFIXES = ("annotations", "labels")
_FREE_FORM_PREFIXES = ("extra",)


@dataclass(frozen=True)
class _Chart:
    label: str
    defaults: dict[str, Any]
    schema: dict[str, Any]
    validator: Any


@functools.cache
def _load_chart(root: Path, chart: str) -> _Chart:
    if chart not in _HELM_CHARTS:
        raise ValueError(f"unknown chart {chart!r}; use one of {sorted(_HELM_CHARTS)}")
    folder, label = _HELM_CHARTS[chart]
    docs = _yaml_load_all(root / folder / "values.yaml")
    defaults = docs[0] if docs else {}
    schema = json.loads((root / folder / "values.schema.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return _Chart(label=label, defaults=defaults, schema=schema, validator=cls(schema))


def helm_defaults(chart: HelmChart) -> dict[str, Any]:
    """A deep copy of the chart's ``values.yaml`` (skips the test if upstream is absent)."""
    return copy.deepcopy(_load_chart(require_upstream(), chart).defaults)


def helm_values_schema(chart: HelmChart) -> dict[str, Any]:
    """A deep copy of the chart's ``values.schema.json``."""
    return copy.deepcopy(_load_chart(require_upstream(), chart).schema)


def _is_free_form(key: str, default: Any, path: str, extra: frozenset[str]) -> bool:
    lowered = key.lower()
    return (
        default is None
        or default == {}
        or key in FREE_FORM_KEYS
        or lowered.endswith(_FREE_FORM_SUFFIXES)
        or key.startswith(_FREE_FORM_PREFIXES)
        or path in extra
    )


def _unknown_key_message(path: str, label: str) -> str:
    return (
        f"{path}: unknown key for chart {label} (not in its values.yaml; Helm silently ignores it)"
    )


def _key_path_errors(
    values: Mapping[str, Any],
    defaults: Mapping[str, Any],
    path: str,
    label: str,
    extra: frozenset[str],
) -> Iterator[str]:
    for raw_key, value in values.items():
        key = str(raw_key)
        here = _join(path, key)
        if key not in defaults:
            yield _unknown_key_message(here, label)
            continue
        default = defaults[key]
        if _is_free_form(key, default, here, extra) or value is None:
            continue
        if isinstance(value, Mapping):
            if isinstance(default, Mapping):
                yield from _key_path_errors(value, default, here, label, extra)
            else:
                yield (
                    f"{here}: is a {type(default).__name__} in values.yaml, so "
                    f"{sorted(map(str, value))} below it are not chart settings"
                )
        elif isinstance(default, Mapping):
            yield (
                f"{here}: values.yaml has a map here, got {_short(value)} "
                "(Helm: cannot overwrite table with non table)"
            )


def _coalesce(defaults: Any, values: Any) -> Any:
    """Helm's merge of user values over chart defaults (``null`` deletes a default key)."""
    if not isinstance(defaults, Mapping) or not isinstance(values, Mapping):
        return copy.deepcopy(values)
    merged = copy.deepcopy(dict(defaults))
    for key, value in values.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _coalesce(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validate_helm_values(
    values: Mapping[str, Any],
    chart: HelmChart,
    *,
    free_form: Iterable[str] = (),
) -> list[str]:
    """Validate Helm values for ``chart`` ("cilium" or "cert-manager"); errors, empty if valid.

    1. Every key path must exist in the chart's values.yaml (Helm ignores unknown keys
       silently), except inside free-form subtrees: values.yaml default ``{}``/``null``,
       the names in :data:`FREE_FORM_KEYS`, ``*annotations``/``*labels``/``extra*`` keys,
       and the dotted paths given in ``free_form``. List items are not looked up.
    2. The values merged over values.yaml (as Helm does) must satisfy values.schema.json.
    """
    if not isinstance(values, Mapping):
        return [f"(root): expected a mapping, got {type(values).__name__}"]
    loaded = _load_chart(require_upstream(), chart)
    data = _normalize(values)
    errors = list(_key_path_errors(data, loaded.defaults, "", loaded.label, frozenset(free_form)))
    merged = _coalesce(loaded.defaults, data)
    for err in loaded.validator.iter_errors(merged):
        path = _fmt_path(err.absolute_path)
        if err.validator == "additionalProperties" and err.validator_value is False:
            props = err.schema.get("properties") or {}
            for key in err.instance if isinstance(err.instance, Mapping) else ():
                if key not in props:
                    base = "" if path == "(root)" else path
                    errors.append(_unknown_key_message(_join(base, key), loaded.label))
            continue
        errors.append(f"{path}: {err.message[:300]} (values.schema.json)")
    return sorted(dict.fromkeys(errors))
