"""`lab.trust`: hand the lab CA certificate to the user (never its key), and say how to trust it.

The `certs` step has cert-manager issue the lab CA inside each cluster; its certificate is in the
Secret ``cert-manager/lab-ca`` (``ca.crt``). Only that field is read: ``tls.key`` never leaves the
cluster. The file is written atomically, mode 0644 (it is public material).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lab.config import ClusterConfig, LabConfig
from lab.errors import LabError
from lab.kube import KubeClient, KubeError
from lab.steps.certs import CA_NAME, CERT_MANAGER_NAMESPACE, read_ca_pem

PEM_HEADER = "-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class Exported:
    cluster: str
    path: Path
    url: str  # the demo app's HTTPS URL on this cluster


def default_path(cfg: LabConfig, cluster: ClusterConfig) -> Path:
    """``<stateDir>/lab-ca.crt`` for the first cluster, ``lab-ca-<cluster>.crt`` for the others."""
    if cluster.index == 0:
        return cfg.state_dir / "lab-ca.crt"
    return cfg.state_dir / f"lab-ca-{cluster.name}.crt"


def demo_url(cfg: LabConfig, cluster: ClusterConfig) -> str:
    host = f"{(cfg.gateway_hosts or ('echo',))[0]}.localhost"
    port = cluster.gateway.https_host_port
    return f"https://{host}" + ("" if port == 443 else f":{port}")


def fetch_ca(kube: KubeClient, cluster: str) -> str:
    """The lab CA certificate (PEM) of one cluster, or a LabError saying what to run."""
    try:
        pem = read_ca_pem(kube)
    except KubeError as exc:
        raise LabError(f"cannot read the lab CA of cluster {cluster!r}: {exc.message}",
                       exc.hint or "is the cluster running? `invoke lab.status` shows it") from exc
    if not pem or PEM_HEADER not in pem:
        raise LabError(
            f"cluster {cluster!r} has no lab CA yet (Secret "
            f"{CERT_MANAGER_NAMESPACE}/{CA_NAME} is missing or empty)",
            "bring the lab to the `certs` state first: `invoke lab.up --to certs`")
    return pem


def write_ca(pem: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(pem if pem.endswith("\n") else pem + "\n")
    os.chmod(tmp, 0o644)
    tmp.replace(path)
    return path


def export_ca(cfg: LabConfig, cluster_name: str | None = None, out: str | None = None,
              kubeconfig: str | None = None, kube: KubeClient | None = None) -> Exported:
    """Write one cluster's lab CA certificate to ``out`` (default: :func:`default_path`)."""
    cluster = cfg.cluster(cluster_name) if cluster_name else cfg.clusters[0]
    client = kube or KubeClient(cluster.kube_context, kubeconfig)
    try:
        pem = fetch_ca(client, cluster.name)
    finally:
        if kube is None:
            client.close()
    path = Path(out).expanduser() if out else default_path(cfg, cluster)
    if path.is_dir():
        path = path / default_path(cfg, cluster).name
    write_ca(pem, path.absolute())
    return Exported(cluster.name, path.absolute(), demo_url(cfg, cluster))


def instructions(exported: Exported) -> str:
    """How to use the file: curl, then trusting it system-wide on Linux and macOS."""
    f = str(exported.path)
    name = f"kind-cilium-lab-{exported.cluster}.crt"
    return "\n".join([
        f"Wrote the lab CA certificate of cluster {exported.cluster!r} to {f}",
        "(the certificate only: its private key stays in the cluster)",
        "",
        "Use it for one request:",
        f"  curl --cacert {f} {exported.url}",
        "",
        "Trust it system-wide (optional; undo by removing the file and re-running the update):",
        "  Debian / Ubuntu:",
        f"    sudo cp {f} /usr/local/share/ca-certificates/{name}",
        "    sudo update-ca-certificates",
        "  Fedora / RHEL:",
        f"    sudo cp {f} /etc/pki/ca-trust/source/anchors/{name}",
        "    sudo update-ca-trust",
        "  macOS:",
        "    sudo security add-trusted-cert -d -r trustRoot "
        f"-k /Library/Keychains/System.keychain {f}",
        "",
        "Firefox keeps its own store: Settings → Privacy & Security → Certificates → "
        "View Certificates → Authorities → Import.",
    ])
