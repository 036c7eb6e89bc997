"""Access tasks: `lab.trust` (the lab CA and how to trust it) and `lab.hubble` (UI, flows)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

from invoke.context import Context

from lab.cli import CONFIG_HELP, LOG_OPTIONS, task
from lab.cli import guard as _guard
from lab.cli import output as _output
from lab.cli import setup as _setup


@task(help={
    "config": CONFIG_HELP,
    "cluster": "the cluster whose lab CA to export (default: the first cluster of the config)",
    "out": "where to write the certificate (default: <stateDir>/lab-ca.crt; "
           "<stateDir>/lab-ca-<cluster>.crt for the other clusters)",
    **LOG_OPTIONS,
})
def trust(c: Context, config: str | None = None, cluster: str | None = None,
          out: str | None = None, log_format: str | None = None,
          log_level: str | None = None, verbose: bool = False) -> None:
    """Write the lab CA certificate (never its key) to a file and print how to trust it."""
    from lab import trust as lab_trust  # imported on use: keeps `invoke --list` fast

    cfg = _setup(config, log_format, log_level, verbose)
    exported = _guard(lambda: lab_trust.export_ca(
        cfg, cluster, out, kubeconfig=os.environ.get("LAB_KUBECONFIG")))
    print(lab_trust.instructions(exported))


@task(help={
    "config": CONFIG_HELP,
    "cluster": "which cluster (default: the first)",
    "observe": "stream flows through hubble-relay instead of opening the UI",
    "verdict": "with --observe: only flows with this verdict (e.g. DROPPED, FORWARDED)",
    "namespace": "with --observe: only flows to or from this namespace",
    "pod": "with --observe: only flows to or from this pod ([namespace/]name prefix)",
    "last": "with --observe: start with the last N flows (0: only new ones)",
    "follow": "with --observe: keep streaming (--no-follow prints what is there and stops)",
    "output": "with --observe: compact, dict, json or table",
    "port": "local port for the UI (default 12000)",
    **LOG_OPTIONS,
})
def hubble(c: Context, config: str | None = None, cluster: str | None = None,
           observe: bool = False, verdict: str | None = None, namespace: str | None = None,
           pod: str | None = None, last: int = 0, follow: bool = True,
           output: str = "compact", port: int = 12000, log_format: str | None = None,
           log_level: str | None = None, verbose: bool = False) -> None:
    """Open the Hubble UI (port-forward), or stream flows cluster-wide with --observe."""
    import threading

    from lab import hubble as hub
    from lab.kube import KubeClient

    cfg = _setup(config, log_format, log_level, verbose)
    target = _guard(lambda: cfg.cluster(cluster) if cluster else cfg.clusters[0])
    kube = KubeClient(target.kube_context, os.environ.get("LAB_KUBECONFIG"))
    if observe:
        flt = hub.ObserveFilter(verdict=verdict, namespace=namespace, pod=pod,
                                follow=follow, last=last or None, output=output)
        _guard(flt.validate)
        with _output():
            _guard(lambda: _stream(hub.observe(kube, flt)))
        return
    ui = _guard(lambda: hub.ready_pod(kube, "kube-system", "k8s-app=hubble-ui", "hubble-ui"))
    stop = threading.Event()

    def listening(where: str) -> None:
        print(f"Hubble UI for {target.name}: http://{where}  (Ctrl-C to stop)", flush=True)

    def serve() -> None:
        try:
            kube.port_forward("kube-system", ui, hub.UI_PORT, port, stop,
                              on_listening=listening)
        except KeyboardInterrupt:  # Ctrl-C is how a port-forward ends: not a failure
            stop.set()
            print("stopped", flush=True)

    _guard(serve)


def _stream(chunks: Iterator[str]) -> None:
    """Print flows as they come; Ctrl-C ends a --follow stream quietly."""
    try:
        for chunk in chunks:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


ACCESS_TASKS = (trust, hubble)
