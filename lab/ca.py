"""The lab's Cilium CA: generated once per lab, shared by every cluster.

Cluster Mesh needs every cluster's certificates (clustermesh-apiserver, Hubble) to chain to one CA.
Giving each cluster the same CA before Cilium is installed means joining a mesh later needs no
re-issuing and no restarts. The key stays in the state directory (mode 0600) and is never logged.
"""

from __future__ import annotations

import base64
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError
from lab.filelock import exclusive_lock

CA_VALIDITY_DAYS = 3 * 365  # the chart's own default (tls.ca.certValidityDuration: 1095)


@dataclass(frozen=True)
class LabCA:
    cert_pem: bytes
    key_pem: bytes

    def helm_values(self) -> dict[str, object]:
        """The Cilium chart's `tls.ca` values (base64 PEM, as `buildCustomCert` expects)."""
        return {"tls": {"ca": {"cert": base64.b64encode(self.cert_pem).decode(),
                               "key": base64.b64encode(self.key_pem).decode()}}}


def ca_dir(state_dir: Path) -> Path:
    return state_dir / "ca"


def load_or_create(state_dir: Path) -> LabCA:
    """Idempotent: the first call creates the CA, every later call returns the same one.

    Serialized with a file lock, so two `lab.up --cluster …` processes share one CA.
    """
    d = ca_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    cert_path, key_path = d / "cilium-ca.crt", d / "cilium-ca.key"
    with exclusive_lock(d / ".lock"):
        if cert_path.exists() and key_path.exists():
            ca = LabCA(cert_path.read_bytes(), key_path.read_bytes())
            _check_pair(ca, cert_path)
            return ca
        cert_pem, key_pem = _generate()
        _write_private(key_path, key_pem)
        tmp = cert_path.with_name(cert_path.name + ".tmp")
        tmp.write_bytes(cert_pem)
        tmp.replace(cert_path)
        return LabCA(cert_pem, key_pem)


def _check_pair(ca: LabCA, cert_path: Path) -> None:
    """Refuse a key that does not belong to the certificate (Helm's buildCustomCert won't)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    pub = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*pub) != key.public_key().public_bytes(*pub):
        raise LabError(f"the lab CA in {cert_path.parent} is inconsistent: the key does not "
                       "belong to the certificate",
                       f"remove {cert_path.parent} and run `invoke lab.down` then `invoke lab.up` "
                       "(every cluster must be re-created with the new CA)")


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def _generate() -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Cilium CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kind-cilium-lab")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return cert_pem, key_pem
