"""Check tasks: `lab.verify` (the lab's promise, live) and `lab.map` (the service map)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from invoke.context import Context
from invoke.exceptions import Exit

from lab.cli import CONFIG_HELP, LOG_OPTIONS, setup_logging, task
from lab.cli import guard as _guard
from lab.cli import setup as _setup


def _console() -> Any:
    from rich.console import Console

    tty = sys.stdout.isatty()
    # piped (CI logs, files): wide enough that a row stays on one line
    return Console(no_color="NO_COLOR" in os.environ or not tty, width=None if tty else 220)


@task(help={
    "config": CONFIG_HELP,
    "cluster": "only this cluster (repeatable; default: every cluster of the lab)",
    "json": "print the report as JSON (schema kind-cilium-lab/verify/v1: sorted keys, no "
            "timestamps; see lab/verify.py)",
    "flows": "also check your own flows from this YAML file (same format as "
             "lab/data/policy-matrix.yaml; may use the lab's actors). A source pod that is not "
             "one of the lab's probes is played by a short-lived probe pod (agnhost, restricted) "
             "started in its namespace with its labels, deleted afterwards",
    "map": "also write the service map of the flows tried to this SVG file (Mermaid text "
           "next to it, same name with .md)",
    **LOG_OPTIONS,
}, iterable=["cluster"])
def verify(c: Context, config: str | None = None, cluster: list[str] | None = None,
           json_: bool = False, flows: str | None = None, map: str | None = None,
           log_format: str | None = None,
           log_level: str | None = None, verbose: bool = False) -> None:
    """Check the running lab live and read-only: every gate, then the policy matrix.

    Flows with a trial are tried for real, each with what Hubble saw of the attempt (verdict,
    drop reason, direction); HTTPS through the Gateway with the lab CA; in a mesh the global
    service across clusters. Exits 1 on any mismatch. --flows adds yours: a source that is not
    a lab probe runs from a short-lived probe pod with the source's labels (same Cilium
    identity, same policy), deleted afterwards."""
    from lab import matrix as lab_matrix
    from lab import verify as lab_verify
    from lab.runner import Lab

    cfg = _setup(config, log_format, log_level, verbose)
    base = _guard(lab_matrix.load)
    user = _guard(lambda: lab_matrix.load(Path(flows), base=base)) if flows else None
    lab = Lab(cfg, kubeconfig=os.environ.get("LAB_KUBECONFIG"))
    chosen = _guard(lambda: [cfg.cluster(n) for n in cluster] if cluster
                    else list(cfg.clusters))
    contexts = [lab.context(cl) for cl in chosen]
    report = _guard(lambda: lab_verify.run(contexts, base, user))
    if map:
        actors = {**base.actors, **(user.actors if user else {})}
        _write_map(lab_verify.trial_flows(report, actors), Path(map), "lab.verify")
    if json_:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True, ensure_ascii=False))
    else:
        lab_verify.print_report(report, _console())
    if not report.ok:
        raise Exit(code=1)


def _write_map(flows: list[dict[str, Any]], svg: Path, title: str,
               problems: list[str] | None = None, mermaid: Path | None = None) -> Any:
    from lab import servicemap

    m = servicemap.build(flows, problems or [])
    servicemap.to_svg(m, svg, title)
    (mermaid or svg.with_suffix(".md")).write_text(servicemap.mermaid_markdown(m, title))
    return m


@task(help={
    "config": CONFIG_HELP,
    "cluster": "which cluster to read through hubble-relay (default: the first)",
    "flows": "read recorded `hubble observe -o json` lines from this file instead of the relay",
    "since": "with the relay: flows since this time (a duration like 10m, or RFC 3339)",
    "namespace": "with the relay: only flows to or from this namespace",
    "last": "with the relay: the last N flows (default: 2000 when --since is not given)",
    "out": "write the SVG picture here (default: service-map.svg)",
    "mermaid": "write Mermaid text (a Markdown block, e.g. for $GITHUB_STEP_SUMMARY) to this "
               "file; '-' prints it",
    **LOG_OPTIONS,
})
def map(c: Context, config: str | None = None, cluster: str | None = None,
        flows: str | None = None, since: str | None = None, namespace: str | None = None,
        last: int = 0, out: str = "service-map.svg", mermaid: str | None = None,
        log_format: str | None = None,
        log_level: str | None = None, verbose: bool = False) -> None:
    """Draw the service map (workloads by namespace, edges by port coloured by verdict) from
    Hubble flows — through hubble-relay, or from a recorded file with --flows — as SVG and
    Mermaid. Malformed lines are reported with their line number and skipped."""
    from lab import servicemap

    if flows:
        setup_logging(log_format, log_level, verbose)  # a recorded file needs no lab config
        path = Path(flows)
        if not path.is_file():
            raise Exit(f"✗ {flows}: no such file (record one with "
                       "`hubble observe -o json > FILE`, or leave out --flows to read the "
                       "relay)", code=1)
        parsed, problems = servicemap.read_file(path)
        title = f"service map of {path.name}"
    else:
        from lab.kube import KubeClient

        cfg = _setup(config, log_format, log_level, verbose)
        target = _guard(lambda: cfg.cluster(cluster) if cluster else cfg.clusters[0])
        kube = KubeClient(target.kube_context, os.environ.get("LAB_KUBECONFIG"))
        text = _guard(lambda: servicemap.read_relay(kube, since, namespace,
                                                              last or None))
        parsed, problems = servicemap.parse_lines(text.splitlines())
        title = f"service map of {target.name}"
    for problem in problems:
        print(f"! skipped {problem}", file=sys.stderr)
    m = servicemap.build(parsed, problems)
    svg = servicemap.to_svg(m, Path(out), title)
    text = servicemap.mermaid_markdown(m, title)
    if mermaid == "-":
        print(text, end="")
    elif mermaid:
        Path(mermaid).parent.mkdir(parents=True, exist_ok=True)
        Path(mermaid).write_text(text)
    print(f"✓ {svg}: {len(m.nodes)} workloads, {len(m.edges)} edges from {m.flows} flows "
          f"({m.replies} replies folded, {len(problems)} malformed line(s) skipped)",
          file=sys.stderr if mermaid == "-" else sys.stdout)


CHECK_TASKS = (verify, map)
