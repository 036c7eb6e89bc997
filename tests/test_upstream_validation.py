"""The upstream validators can fail: valid objects/values pass, realistic mistakes do not.

Tests that need shared/upstream skip (with the reason from require_upstream) only when
that folder is absent; the built-in-kind and schema-dialect tests need nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.support import upstream
from tests.support.upstream import (
    get_crd_index,
    k8s_schema_to_jsonschema,
    validate_helm_values,
    validate_object,
)

LB_POOL: dict[str, Any] = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumLoadBalancerIPPool",
    "metadata": {"name": "lab-pool", "labels": {"app.kubernetes.io/part-of": "kind-cilium-lab"}},
    "spec": {
        "blocks": [
            {"cidr": "172.18.255.0/24"},
            {"start": "172.18.254.10", "stop": "172.18.254.20"},
        ],
        "allowFirstLastIPs": "No",
    },
}

GATEWAY: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {
        "name": "lab-gateway",
        "namespace": "infra",
        "annotations": {"cert-manager.io/cluster-issuer": "lab-ca"},
    },
    "spec": {
        "gatewayClassName": "cilium",
        "listeners": [
            {"name": "http", "protocol": "HTTP", "port": 80},
            {
                "name": "https-echo",
                "protocol": "HTTPS",
                "port": 443,
                "hostname": "echo.localhost",
                "tls": {"mode": "Terminate", "certificateRefs": [{"name": "echo-tls"}]},
                "allowedRoutes": {"namespaces": {"from": "All"}},
            },
        ],
    },
}

CERTIFICATE: dict[str, Any] = {
    "apiVersion": "cert-manager.io/v1",
    "kind": "Certificate",
    "metadata": {"name": "lab-ca", "namespace": "cert-manager"},
    "spec": {
        "isCA": True,
        "commonName": "kind-cilium-lab CA",
        "secretName": "lab-ca",
        "privateKey": {"algorithm": "ECDSA", "size": 256},
        "issuerRef": {"name": "selfsigned", "kind": "ClusterIssuer", "group": "cert-manager.io"},
    },
}

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "echo", "namespace": "demo", "labels": {"app": "echo"}},
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"app": "echo"}},
        "template": {
            "metadata": {"labels": {"app": "echo"}},
            "spec": {
                "containers": [
                    {
                        "name": "echo",
                        "image": "registry.k8s.io/echoserver:1.10",
                        "ports": [{"name": "http", "containerPort": 8080}],
                    }
                ]
            },
        },
    },
}


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Deep copy of ``obj`` with ``value`` set at dotted ``path`` (ints index lists)."""
    out = copy.deepcopy(obj)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = out
    for part in parents:
        node = node[part]
    node[last] = value
    return out


def _has(errors: list[str], *fragments: str) -> bool:
    return any(all(f in e for f in fragments) for e in errors)


# ----------------------------------------------------------------- location / skipping


def test_upstream_dir_honours_env_and_require_skips_with_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "nope"
    monkeypatch.setenv(upstream.ENV_VAR, str(missing))
    assert upstream.upstream_dir() is None
    with pytest.raises(pytest.skip.Exception) as skipped:
        upstream.require_upstream()
    reason = str(skipped.value)
    assert upstream.ENV_VAR in reason
    assert str(upstream.DEFAULT_UPSTREAM_DIR) in reason

    monkeypatch.setenv(upstream.ENV_VAR, str(tmp_path))
    assert upstream.upstream_dir() == tmp_path.resolve()


def test_default_path_is_next_to_the_repo() -> None:
    repo_root = Path(__file__).resolve().parents[1]
    expected = repo_root.parent / "shared" / "upstream"
    assert expected == upstream.DEFAULT_UPSTREAM_DIR


# ----------------------------------------------------------------- CRD kinds


def test_lb_ip_pool_valid_passes() -> None:
    assert validate_object(LB_POOL) == []


def test_lb_ip_pool_unknown_field_fails() -> None:
    errors = validate_object(_with(LB_POOL, "spec.cidrs", [{"cidr": "172.18.255.0/24"}]))
    assert _has(errors, "spec.cidrs", "unknown field"), errors


def test_lb_ip_pool_bad_cidr_enum_and_namespace_fail() -> None:
    bad = _with(LB_POOL, "spec.blocks.0.cidr", "172.18.255.0")  # no prefix length
    bad = _with(bad, "spec.allowFirstLastIPs", "no")
    bad = _with(bad, "metadata.namespace", "infra")  # cluster-scoped kind
    errors = validate_object(bad)
    assert _has(errors, "spec.blocks[0].cidr", "cidr"), errors
    assert _has(errors, "spec.allowFirstLastIPs"), errors
    assert _has(errors, "metadata.namespace", "cluster-scoped"), errors


def test_gateway_valid_passes() -> None:
    assert validate_object(GATEWAY) == []


def test_gateway_listener_typo_fails() -> None:
    listener = dict(GATEWAY["spec"]["listeners"][1])
    listener["hostName"] = listener.pop("hostname")
    errors = validate_object(_with(GATEWAY, "spec.listeners.1", listener))
    assert _has(errors, "spec.listeners[1].hostName", "unknown field"), errors


def test_gateway_duplicate_listener_name_and_bad_port_fail() -> None:
    listeners = [*GATEWAY["spec"]["listeners"], {"name": "http", "protocol": "HTTP", "port": 0}]
    errors = validate_object(_with(GATEWAY, "spec.listeners", listeners))
    assert _has(errors, "spec.listeners", "same key"), errors
    assert _has(errors, "spec.listeners[2].port"), errors


def test_certificate_valid_passes_and_string_bool_fails() -> None:
    assert validate_object(CERTIFICATE) == []
    errors = validate_object(_with(CERTIFICATE, "spec.isCA", "yes"))
    assert _has(errors, "spec.isCA", "boolean"), errors


def test_metadata_rules() -> None:
    no_name = _with(CERTIFICATE, "metadata", {"namespace": "cert-manager"})
    assert _has(validate_object(no_name), "metadata.name", "required")
    generated = _with(CERTIFICATE, "metadata", {"generateName": "ca-", "namespace": "x"})
    assert validate_object(generated) == []
    errors = validate_object(
        _with(CERTIFICATE, "metadata", {"name": "Lab_CA", "labels": {"tier": 1}, "owner": "me"})
    )
    assert _has(errors, "metadata.name", "DNS subdomain"), errors
    assert _has(errors, "metadata.labels", "string"), errors
    assert _has(errors, "metadata.owner", "unknown field"), errors


def test_version_rules_served_unknown_and_channels() -> None:
    btls = {
        "apiVersion": "gateway.networking.k8s.io/v1alpha3",
        "kind": "BackendTLSPolicy",
        "metadata": {"name": "b", "namespace": "demo"},
        "spec": {},
    }
    assert _has(validate_object(btls), "not served"), validate_object(btls)
    assert _has(validate_object(_with(LB_POOL, "apiVersion", "cilium.io/v3")), "no version")
    assert _has(validate_object(_with(LB_POOL, "kind", "CiliumLBPool")), "unknown kind")

    tls_route = {
        "apiVersion": "gateway.networking.k8s.io/v1alpha2",
        "kind": "TLSRoute",
        "metadata": {"name": "t", "namespace": "demo"},
        "spec": {
            "parentRefs": [{"name": "lab-gateway"}],
            "rules": [{"backendRefs": [{"name": "s", "port": 443}]}],
        },
    }
    assert _has(validate_object(tls_route), "unknown kind")  # standard channel only
    assert validate_object(tls_route, channels=("standard", "experimental")) == []


def test_cel_rules_are_listed_as_not_checked() -> None:
    notes = get_crd_index().not_checked("gateway.networking.k8s.io/v1", "Gateway")
    assert notes and all("not checked" in n for n in notes)
    assert get_crd_index().schema("cilium.io/v2", "CiliumLoadBalancerIPPool")["type"] == "object"
    assert any("CEL" in line for line in upstream.NOT_CHECKED)


# ----------------------------------------------------------------- built-in kinds


def test_deployment_valid_passes() -> None:
    assert validate_object(DEPLOYMENT) == []


def test_deployment_unknown_field_fails() -> None:
    errors = validate_object(_with(DEPLOYMENT, "spec.replica", 2))
    assert _has(errors, "spec.replica", "unknown field"), errors
    container = {
        **DEPLOYMENT["spec"]["template"]["spec"]["containers"][0],
        "imagePullPolicyy": "IfNotPresent",
    }
    errors = validate_object(_with(DEPLOYMENT, "spec.template.spec.containers.0", container))
    assert _has(errors, "containers[0].imagePullPolicyy", "unknown field"), errors


def test_kind_that_is_neither_builtin_nor_crd_is_unknown() -> None:
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
    }
    assert _has(validate_object(obj), "unknown kind")
    assert _has(validate_object({"kind": "Deployment"}), "apiVersion", "required")


# ----------------------------------------------------------------- dialect (no upstream needed)


def test_dialect_conversion() -> None:
    schema = k8s_schema_to_jsonschema(
        {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True},
                "note": {"type": "string", "nullable": True},
                "raw": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "pick": {
                    "type": "object",
                    "oneOf": [{"required": ["a"]}, {"required": ["b"]}],
                    "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                },
                "when": {"type": "string", "format": "made-up-format"},
            },
            "x-kubernetes-validations": [{"rule": "true", "message": "m"}],
        }
    )
    check = jsonschema.Draft7Validator(schema)
    ok = {"port": "http", "note": None, "raw": {"x": {"y": 1}}, "pick": {"a": "1"}, "when": "?"}
    assert list(check.iter_errors(ok)) == []
    assert check.is_valid({**ok, "port": 8080})
    assert not check.is_valid({**ok, "port": 1.5})
    assert not check.is_valid({**ok, "extra": 1})
    assert not check.is_valid({**ok, "pick": {"a": "1", "c": "2"}})
    assert not check.is_valid({**ok, "pick": {"a": "1", "b": "2"}})


# ----------------------------------------------------------------- Helm values


def test_cilium_values_valid_pass() -> None:
    values = {
        "kubeProxyReplacement": True,
        "hubble": {"relay": {"enabled": True, "podAnnotations": {"lab/x": "y"}}},
        "operator": {"replicas": 1, "nodeSelector": {"node-role.kubernetes.io/control-plane": ""}},
        "ipam": {"mode": "kubernetes"},
    }
    assert validate_helm_values(values, "cilium") == []


def test_cilium_values_unknown_keys_fail() -> None:
    errors = validate_helm_values({"hubble": {"relayy": {}}}, "cilium")
    assert _has(errors, "hubble.relayy", "unknown key"), errors
    errors = validate_helm_values({"externalIPs": {"enabled": True}}, "cilium")  # gone in 1.18
    assert _has(errors, "externalIPs", "unknown key"), errors


def test_cilium_values_wrong_type_fails() -> None:
    errors = validate_helm_values({"operator": {"replicas": "two"}}, "cilium")
    assert _has(errors, "operator.replicas", "values.schema.json"), errors


def test_cert_manager_values() -> None:
    assert validate_helm_values({"crds": {"enabled": True}}, "cert-manager") == []
    errors = validate_helm_values({"installCRDz": True}, "cert-manager")
    assert _has(errors, "installCRDz", "unknown key"), errors
