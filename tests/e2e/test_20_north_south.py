"""From the host: HTTPS verified against the lab CA, plain HTTP, and a wrong CA refused."""

from __future__ import annotations

import shutil
import subprocess

from lab.steps.certs import https_probe
from tests.e2e.conftest import E2ELab
from tests.e2e.helpers import http_get


def _ca(e2e_lab: E2ELab, cluster: str) -> str:
    out = e2e_lab.artifacts / f"lab-ca-{cluster}.crt"
    e2e_lab.invoke("lab.trust", "--cluster", cluster, "--out", str(out))
    text = out.read_text()
    assert "BEGIN CERTIFICATE" in text and "PRIVATE KEY" not in text
    return text


def test_https_answers_with_a_certificate_from_the_lab_ca(e2e_lab: E2ELab) -> None:
    for c in e2e_lab.cfg.clusters:
        ca = _ca(e2e_lab, c.name)
        ok, detail = https_probe("127.0.0.1", c.gateway.https_host_port, "echo.localhost", ca)
        assert ok, detail


def test_curl_with_the_lab_ca(e2e_lab: E2ELab) -> None:
    if not shutil.which("curl"):
        return  # the Python probe above is the same check without curl
    c = e2e_lab.cfg.clusters[0]
    ca_file = e2e_lab.artifacts / "lab-ca-curl.crt"
    ca_file.write_text(_ca(e2e_lab, c.name))
    url = f"https://echo.localhost:{c.gateway.https_host_port}/"
    proc = subprocess.run(["curl", "-sS", "--fail", "--max-time", "10", "--cacert",
                           str(ca_file), "--resolve",
                           f"echo.localhost:{c.gateway.https_host_port}:127.0.0.1", url],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_wrong_ca_is_refused(e2e_lab: E2ELab) -> None:
    from lab.ca import _generate

    other_ca = _generate()[0].decode()
    c = e2e_lab.cfg.clusters[0]
    ok, detail = https_probe("127.0.0.1", c.gateway.https_host_port, "echo.localhost", other_ca)
    assert not ok and "does not verify" in detail


def test_plain_http_answers(e2e_lab: E2ELab) -> None:
    for c in e2e_lab.cfg.clusters:
        status, body = http_get("127.0.0.1", c.gateway.http_host_port, "echo.localhost")
        assert status == 200, body
