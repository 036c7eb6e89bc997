"""Orchestration: bring every cluster of a lab to a target state, show status, render, tear down.

Clusters advance in parallel, each under its own lock and record; the lab-wide ``meshed`` state
starts only once every cluster has reached the state before it.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lab import ca, imagecache, logs
from lab.bootstrap import lab_tools
from lab.config import ClusterConfig, LabConfig
from lab.errors import LabError
from lab.kube import KubeError
from lab.pipeline import ClusterPipeline
from lab.state import STATES, Record, StateStore
from lab.steps.base import CANCELLED, Check, Rendered, StepContext, Timeouts, Verdict, dump_yaml
from lab.steps.cluster import cluster_kubeconfig, kind_kubeconfig_write
from lab.steps.registry import STEPS
from lab.ui import Progress


def default_target(cfg: LabConfig) -> str:
    return "meshed" if cfg.is_mesh else "locked"


def check_target(cfg: LabConfig, target: str) -> None:
    if target not in STATES or target == "absent":
        raise LabError(f"unknown target state {target!r}",
                       f"use one of: {', '.join(STATES[1:])} (or `invoke lab.down`)")
    if target == "meshed" and not cfg.is_mesh:
        raise LabError("`meshed` needs at least two clusters in the config",
                       "use config/mesh.yaml (`--config config/mesh.yaml`) or stop at `locked`")


class Lab:
    def __init__(self, cfg: LabConfig, *, kubeconfig: str | None = None,
                 progress: Progress | None = None, timeouts: Timeouts | None = None) -> None:
        self.cfg = cfg
        self.store = StateStore(cfg.state_dir)
        self.kubeconfig = kubeconfig
        self.progress = progress or Progress()
        self.timeouts = timeouts or Timeouts.from_env()
        self.log = logs.get("lab")

    def context(self, cluster: ClusterConfig, record: Record | None = None,
                dry_run: bool = False) -> StepContext:
        log = self.log.bind(cluster=cluster.name)
        # Each cluster its own kubeconfig file (kind, helm and the client), unless one is given:
        # parallel clusters never read each other's half-written file.
        kubeconfig = self.kubeconfig or str(cluster_kubeconfig(self.cfg.state_dir, cluster.name))
        return StepContext(self.cfg, cluster, self.store,
                           record or self.store.load(cluster.name), lab_tools(self.cfg, log),
                           log, self.timeouts, kubeconfig, dry_run)

    # -- up --------------------------------------------------------------------------------------

    def up(self, target: str | None = None, resume: bool = False,
           clusters: list[str] | None = None) -> None:
        target = target or default_target(self.cfg)
        check_target(self.cfg, target)
        chosen = self.chosen(clusters)
        before_mesh = "locked" if target == "meshed" else target
        if STATES.index(target) >= STATES.index("cni"):
            ca.load_or_create(self.cfg.state_dir)  # once, before clusters run in parallel
        # Warm the shared image cache while kind creates the clusters (never fails lab.up);
        # clusters already at the target have every image they need.
        behind = [c for c in chosen
                  if STATES.index(self.store.load(c.name).state) < STATES.index(before_mesh)]
        prefetch = imagecache.start_prefetch(self.cfg, lab_tools(self.cfg, self.log), self.log,
                                             self.progress) \
            if behind and STATES.index(target) > STATES.index("cluster") else None
        try:
            self._parallel(chosen, lambda c: self._up_cluster(c, before_mesh, resume))
            if target == "meshed":
                # Every earlier step was just converged: re-check and re-apply only `meshed`.
                self._parallel(chosen, lambda c: self._up_cluster(c, "meshed", resume,
                                                                  from_state="meshed"))
        finally:
            if prefetch is not None:
                prefetch.finish()

    def _parallel(self, clusters: list[ClusterConfig],
                  work: Callable[[ClusterConfig], None]) -> None:
        if len(clusters) == 1:
            work(clusters[0])
            return
        errors: list[tuple[str, BaseException]] = []
        pool = ThreadPoolExecutor(max_workers=len(clusters))
        try:
            futures = {pool.submit(work, c): c.name for c in clusters}
            for fut, name in futures.items():
                exc = fut.exception()
                if exc is not None:
                    errors.append((name, exc))
        except KeyboardInterrupt:
            CANCELLED.set()  # the other clusters' gate waits stop now, not at their deadline
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if len(errors) == 1:
            raise errors[0][1]
        if errors:
            raise LabError("; ".join(f"{n}: {e}" for n, e in errors),
                           "fix the causes above, then run `invoke lab.up --resume`")

    @contextlib.contextmanager
    def _bound(self, cluster: str) -> Iterator[None]:
        logs.bind(cluster=cluster)
        try:
            yield
        finally:
            logs.unbind("cluster")

    def _up_cluster(self, cluster: ClusterConfig, target: str, resume: bool,
                    from_state: str = "cluster") -> None:
        """Converge one cluster; completed steps before ``from_state`` are taken as they are."""
        with self._bound(cluster.name), self.store.lock(cluster.name, "lab.up"):
            record = self.store.load(cluster.name)
            ctx = self.context(cluster, record)
            interrupted = record.running
            if interrupted:
                interrupted.outcome = "interrupted"
                interrupted.error = "the process stopped inside this transition"
                self.log.warning("state.interrupted", transition=interrupted.name)
            record.config_fingerprint = self.cfg.fingerprint()
            record.versions = {k: str(v) for k, v in self.cfg.versions.__dict__.items()}
            pipe = ClusterPipeline(ctx, STEPS, self.progress)
            target_index = STATES.index(target)
            first = STATES.index(from_state)
            if resume:
                self._reprobe(pipe, first)
            else:
                # Re-converge every completed step in order (idempotent), then go on.
                for name in STATES[first:min(STATES.index(pipe.state), target_index) + 1]:
                    pipe.reconcile(name)
            while STATES.index(pipe.state) < target_index:
                pipe.advance()
            self.store.save(ctx.record)
            self.log.info("cluster.converged", state=pipe.state)

    def _reprobe(self, pipe: ClusterPipeline, first: int = 1) -> None:
        """--resume: trust the record, but step back to the last state whose probe still holds."""
        for name in STATES[first:STATES.index(pipe.state) + 1]:
            try:
                verdict = STEPS[name].probe(pipe.ctx)
            except KubeError as exc:  # e.g. its CRDs are gone: the step no longer holds
                verdict = Verdict(name, [Check("probe", False, exc.message)])
            if not verdict.ready:
                previous = STATES[STATES.index(name) - 1]
                pipe.step_back(previous, f"`{name}` no longer holds ({verdict.explain()})")
                return

    # -- plan (--dry-run) ------------------------------------------------------------------------

    def chosen(self, clusters: list[str] | None) -> list[ClusterConfig]:
        """The clusters named by --cluster (LabError for an unknown one, before anything runs)."""
        known = {c.name: c for c in self.cfg.clusters}
        unknown = [n for n in clusters or [] if n not in known]
        if unknown:
            raise LabError(f"--cluster {', '.join(map(repr, unknown))}: {self.cfg.path} has no "
                           f"such cluster", f"use one of: {', '.join(known)} (or leave "
                           "--cluster out for every cluster)")
        return [known[n] for n in clusters] if clusters else list(self.cfg.clusters)

    def plan(self, target: str | None = None, resume: bool = False,
             clusters: list[str] | None = None) -> list[dict[str, Any]]:
        """What `lab.up` would do, in the order it would do it, from the records alone.

        As in `up`: every chosen cluster up to the state before `meshed`, then `meshed` for each.
        Within a step, ``actions`` are tool commands and API operations in the order `apply`
        runs them (each step's `render` lists them so). Changes nothing.
        """
        target = target or default_target(self.cfg)
        check_target(self.cfg, target)
        chosen = self.chosen(clusters)
        before_mesh = "locked" if target == "meshed" else target
        phases = [(c, s) for c in chosen for s in STATES[1:STATES.index(before_mesh) + 1]]
        if target == "meshed":
            phases += [(c, "meshed") for c in chosen]
        out: list[dict[str, Any]] = []
        records = {c.name: self.store.load(c.name) for c in chosen}
        for cluster, name in phases:
            record = records[cluster.name]
            if resume and STATES.index(name) <= STATES.index(record.state):
                continue  # --resume trusts the record (and re-probes it)
            ctx = self.context(cluster, record, dry_run=True)
            rendered = STEPS[name].render(ctx)
            # the shared image cache comes before `kind create` (lab/imagecache.py)
            cache = imagecache.plan_lines(self.cfg, ctx.work_dir, cluster.index == 0) \
                if name == "cluster" else []
            out.append({
                "cluster": cluster.name, "step": name, "title": STEPS[name].title,
                "actions": [" ".join(c) for c in [*cache, *rendered.commands]],
                "helm": [f"{h.release} ({h.chart} {h.version}) in {h.namespace}"
                         for h in rendered.helm],
                "files": sorted(rendered.files),
            })
        return out

    # -- status ----------------------------------------------------------------------------------

    def status(self, live: bool = True) -> list[dict[str, Any]]:
        rows = []
        cache = imagecache.status(self.cfg, lab_tools(self.cfg, self.log), self.log) \
            if live else {"enabled": self.cfg.image_cache}
        for cluster in self.cfg.clusters:
            record = self.store.load(cluster.name)
            row: dict[str, Any] = {
                "cluster": cluster.name, "state": record.state, "updated": record.updated,
                "allocation": {"id": cluster.id, "podCIDR": cluster.pod_cidr,
                               "serviceCIDR": cluster.service_cidr,
                               "lbPool": record.facts.get("lbPool", cluster.lb_pool),
                               "httpHostPort": cluster.gateway.http_host_port,
                               "httpsHostPort": cluster.gateway.https_host_port,
                               "httpNodePort": cluster.gateway.http_node_port,
                               "httpsNodePort": cluster.gateway.https_node_port,
                               "clustermeshNodePort": cluster.clustermesh_node_port},
                "configDrift": bool(record.config_fingerprint)
                and record.config_fingerprint != self.cfg.fingerprint(),
                "durations": _durations(record),
                "gates": {},
                "interrupted": record.running.name if record.running else None,
                "imageCache": cache,  # one cache per machine: the same in every row
            }
            if live and record.state != "absent":
                ctx = self.context(cluster, record)
                for name in STATES[1:STATES.index(record.state) + 1]:
                    try:
                        verdict = STEPS[name].ready(ctx)
                    except LabError as exc:
                        verdict = Verdict(name)
                        verdict.add("check", False, exc.message)
                    row["gates"][name] = verdict.to_json()
            else:
                row["gates"] = {k: v for k, v in record.gates.items()}
            rows.append(row)
        return rows

    # -- render ----------------------------------------------------------------------------------

    def render(self, out: Path) -> list[Path]:
        """Everything the lab would apply, per cluster, without Docker or a cluster."""
        written: list[Path] = []
        for cluster in self.cfg.clusters:
            ctx = self.context(cluster, Record(cluster=cluster.name), dry_run=True)
            base = out / cluster.name
            final = default_target(self.cfg)  # a single-cluster lab never reaches `meshed`
            for name in STATES[1:STATES.index(final) + 1]:
                rendered: Rendered = STEPS[name].render(ctx)
                for rel, text in rendered.files.items():
                    written.append(_write(base / rel, text))
                for h in rendered.helm:
                    written.append(_write(base / h.values_file, dump_yaml(h.values)))
                if rendered.objects:
                    written.append(_write(base / name / "objects.yaml",
                                          dump_yaml(rendered.objects)))
        return list(dict.fromkeys(written))  # a later state may rewrite a values file

    # -- down ------------------------------------------------------------------------------------

    def down(self, clusters: list[str] | None = None) -> tuple[list[str], list[str]]:
        """Delete the chosen clusters and their records: (removed, absent — nothing to delete)."""
        chosen = self.chosen(clusters)
        removed, absent = [], []
        for cluster in chosen:
            if not self.store.exists(cluster.name) and not self._kind_has(cluster):
                absent.append(cluster.name)
                continue
            with self._bound(cluster.name), self.store.lock(cluster.name, "lab.down"):
                ctx = self.context(cluster)
                with self.progress.step(cluster.name, "delete kind cluster"):
                    kind_kubeconfig_write(ctx, ["delete", "cluster", "--name", cluster.name],
                                          f"deleting kind cluster {cluster.name!r}")
                self.store.remove(cluster.name)
                shutil.rmtree(ctx.work_dir, ignore_errors=True)
                removed.append(cluster.name)
        # The clusters that stay drop the removed ones from their mesh peers.
        for cluster in self.cfg.clusters:
            if cluster.name not in removed and self.store.load(cluster.name).state == "meshed":
                self._remesh(cluster)
        return removed, absent

    def _kind_has(self, cluster: ClusterConfig) -> bool:
        """Whether kind knows the cluster; without kind installed there is none to delete."""
        tools = lab_tools(self.cfg, self.log)
        if tools.which("kind") is None:
            return False
        res = tools.run("kind", ["get", "clusters"], check=False, quiet=True,
                        doing="listing kind clusters")
        # When kind cannot tell (e.g. Docker is down), try the delete: it says what is wrong.
        return res.returncode != 0 or cluster.name in res.stdout.split()

    def _remesh(self, cluster: ClusterConfig) -> None:
        with self._bound(cluster.name), self.store.lock(cluster.name, "lab.down (re-mesh)"):
            ctx = self.context(cluster)
            ClusterPipeline(ctx, STEPS, self.progress).reconcile("meshed")


def _durations(record: Record) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in record.history:
        if t.outcome == "ok" and t.seconds is not None:
            out[t.name] = t.seconds
    return out


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
