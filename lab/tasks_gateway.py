"""Task `lab.trust`: export the lab CA certificate and say how to trust it.

Added to the `lab` collection by lab/tasks.py (``GATEWAY_TASKS``).
"""

from __future__ import annotations

import os

from invoke.context import Context
from invoke.tasks import task

from lab.cli import CONFIG_HELP, LOG_HELP
from lab.cli import guard as _guard
from lab.cli import setup as _setup


@task(help={
    "config": CONFIG_HELP,
    "cluster": "the cluster whose lab CA to export (default: the first cluster of the config)",
    "out": "where to write the certificate (default: <stateDir>/lab-ca.crt; "
           "<stateDir>/lab-ca-<cluster>.crt for the other clusters)",
    "log_format": LOG_HELP,
})
def trust(c: Context, config: str | None = None, cluster: str | None = None,
          out: str | None = None, log_format: str | None = None) -> None:
    """Write the lab CA certificate (never its key) to a file and print how to trust it."""
    from lab import trust as lab_trust  # imported on use: keeps `invoke --list` fast

    cfg = _setup(config, log_format)
    exported = _guard(lambda: lab_trust.export_ca(
        cfg, cluster, out, kubeconfig=os.environ.get("LAB_KUBECONFIG")))
    print(lab_trust.instructions(exported))


GATEWAY_TASKS = (trust,)
