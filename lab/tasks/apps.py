"""Application tasks: `lab.onboard` gives an application its CiliumNetworkPolicy (and HTTPRoute)
under lockdown. Long options only: an automatic
`-h` for --host would shadow the help flag users reach for.
"""

from __future__ import annotations

import os
from pathlib import Path

from invoke.context import Context
from invoke.exceptions import Exit

from lab.cli import CONFIG_HELP, LOG_OPTIONS, task
from lab.cli import guard as _guard
from lab.cli import setup as _setup

EGRESS_HELP = ("a destination it may open connections to (repeatable): "
               "app:NS/KEY=VALUE[,KEY=VALUE]:PORT, svc:NS/NAME:PORT, fqdn:NAME:PORT "
               "(`*` for a pattern), world:PORT, cidr:CIDR:PORT; `/udp` after the port for UDP")


@task(help={
    "name": "the application's name: a DNS-1123 label; its pods are selected by "
            "app.kubernetes.io/name=NAME unless --selector says otherwise",
    "namespace": "its namespace (must exist; not an infrastructure namespace)",
    "port": "the port its pods listen on (1-65535): the Gateway or --from peers reach it "
            "there; the HTTPRoute targets Service NAME on the same port",
    "host": "serve it at https://HOST.localhost through the lab Gateway (needs --port)",
    "egress": EGRESS_HELP,
    "from_": "pods that may connect to it on --port besides the Gateway (repeatable): "
             "app:NS/KEY=VALUE[,KEY=VALUE], e.g. a database reached only by its API",
    "selector": "its pods' labels as KEY=VALUE[,KEY=VALUE] (default app.kubernetes.io/name=NAME)",
    "out": "write the objects to DIR/NAME.yaml instead of applying them (works without a "
           "cluster; then the namespace is not checked)",
    "cluster": "the cluster to onboard it on (default: the first cluster of the config)",
    "config": CONFIG_HELP,
    **LOG_OPTIONS,
}, iterable=["egress", "from_"], auto_shortflags=False)
def onboard(c: Context, name: str, namespace: str | None = None, port: str | None = None,
            host: str | None = None, egress: list[str] | None = None,
            from_: list[str] | None = None, selector: str | None = None, out: str | None = None,
            cluster: str | None = None, config: str | None = None,
            log_format: str | None = None,
            log_level: str | None = None, verbose: bool = False) -> None:
    """Onboard an application: its CiliumNetworkPolicy (+ HTTPRoute), applied or written."""
    from lab import onboard as ob  # imported on use: keeps `invoke --list` fast
    from lab.kube import KubeClient

    cfg = _setup(config, log_format, log_level, verbose)
    if not namespace:
        raise Exit("✗ --namespace is required (the application's namespace)", code=1)
    target = _guard(lambda: cfg.cluster(cluster) if cluster else cfg.clusters[0])
    kube = KubeClient(target.kube_context, os.environ.get("LAB_KUBECONFIG"))
    req = ob.OnboardRequest(name=name, namespace=namespace, port=port, host=host,
                            egress=egress or [], ingress_from=from_ or [], selector=selector)
    outcome = _guard(lambda: ob.onboard(req, kube=kube, out_dir=Path(out) if out else None))
    if outcome.written:
        print(f"✓ wrote {outcome.written} ({len(outcome.objects)} object(s), nothing applied)")
    for line in outcome.applied:
        print(f"✓ applied {line}")
    for host_name in outcome.hosts:
        print(f"  certificate name: {host_name}")
    for note in outcome.notes:
        print(f"  note: {note}")


APP_TASKS = (onboard,)
