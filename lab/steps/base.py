"""What every step shares: the context it works in, the verdict of its gate, what it renders."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from lab.config import ClusterConfig, LabConfig, gate_timeout_from_env
from lab.errors import GateFailed, GateTimeout, Interrupted
from lab.kube import KubeClient, KubeError
from lab.logs import Logger
from lab.state import Record, StateStore
from lab.steps import pods as podlib
from lab.tools import Tools

Obj = dict[str, Any]

# Set when the user interrupts: every gate wait in every cluster's thread stops at once.
CANCELLED = threading.Event()


@dataclass
class Check:
    """One condition of a readiness gate. ``terminal``: it cannot clear by waiting (``fix`` says
    what to do), so the gate ends at once."""

    name: str
    ok: bool
    detail: str = ""
    terminal: bool = False
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "ok": self.ok, "detail": self.detail}
        if self.terminal:
            out.update(terminal=True, fix=self.fix)
        return out


@dataclass
class Verdict:
    """A gate's structured answer: ready only when every named check holds."""

    gate: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failing(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    def explain(self) -> str:
        if self.ready:
            return f"{self.gate}: ready"
        lines = [f"{c.name}: {c.detail}" if c.detail else c.name for c in self.failing]
        return f"{self.gate}: not ready — " + "; ".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"gate": self.gate, "ready": self.ready,
                "checks": [c.to_json() for c in self.checks]}


@dataclass
class HelmRelease:
    release: str
    chart: str  # repo/chart or oci:// reference
    repo_name: str
    repo_url: str
    version: str
    namespace: str
    values: Obj

    @property
    def values_file(self) -> str:
        return f"helm/{self.release}.values.yaml"


@dataclass
class Rendered:
    """Everything a step would apply, without touching anything."""

    files: dict[str, str] = field(default_factory=dict)  # relative path → text
    helm: list[HelmRelease] = field(default_factory=list)
    objects: list[Obj] = field(default_factory=list)  # applied on entering the state
    # For --dry-run, in the order `apply` runs them: tool commands (argv, as run) and API
    # operations in words (`applied`, "patch …").
    commands: list[list[str]] = field(default_factory=list)


def describe(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    return f"{obj.get('kind')} {ns + '/' if ns else ''}{meta.get('name')}"


def applied(*objs: Obj) -> list[list[str]]:
    """The API operations that server-side-apply ``objs``, for a step's ordered commands."""
    return [["apply", describe(o)] for o in objs]


def helm_upgrade_command(ctx: StepContext, release: HelmRelease,
                         secret_values: bool = False) -> list[str]:
    """`helm upgrade --install` exactly as lab.helm.ensure_release runs it for ``release``."""
    from lab.helm import HELM_TIMEOUT  # lab.helm imports this module

    args = ["helm", "upgrade", "--install", release.release, release.chart,
            "--version", release.version, "--namespace", release.namespace,
            "--create-namespace", "--values", str(ctx.work_dir / release.values_file)]
    if secret_values:
        args += ["--values", str(ctx.work_dir / f"helm/{release.release}.secret.values.yaml")]
    args += ["--reset-values", "--kube-context", ctx.cluster.kube_context]
    args += ["--kubeconfig", ctx.kubeconfig] if ctx.kubeconfig else []
    return [*args, "--timeout", HELM_TIMEOUT]


@dataclass
class Timeouts:
    """Gate deadlines in seconds (real clusters on a 2-core laptop need minutes)."""

    cluster: float = 300
    cni: float = 600
    gateway: float = 300
    certs: float = 300
    locked: float = 300
    meshed: float = 600
    # A local cluster answers a gate's reads in milliseconds: polling at most every 2 s costs it
    # nothing and lets each step move on within 2 s of its gate holding.
    poll_start: float = 0.25
    poll_max: float = 2.0
    image_pull: float = 180  # an image pull failing this long is taken as final
    report_every: float = 30  # how often a waiting gate shows its failing checks

    @classmethod
    def from_env(cls) -> Timeouts:
        """``LAB_GATE_TIMEOUT`` (seconds) overrides every gate deadline (LabError if not a
        positive number)."""
        t = gate_timeout_from_env()
        if t is None:
            return cls()
        # A pull failure is called final well before a short deadline, so the user gets the
        # reason and its fix rather than a timeout.
        return cls(cluster=t, cni=t, gateway=t, certs=t, locked=t, meshed=t,
                   poll_start=min(cls.poll_start, t / 20),
                   poll_max=min(cls.poll_max, max(t / 5, 0.1)),
                   image_pull=min(cls.image_pull, t / 2))

    def for_gate(self, name: str) -> float:
        return float(getattr(self, name, 300))


class StepContext:
    """The shared context a step works in: one cluster of one lab."""

    def __init__(self, lab: LabConfig, cluster: ClusterConfig, store: StateStore, record: Record,
                 tools: Tools, log: Logger, timeouts: Timeouts | None = None,
                 kubeconfig: str | None = None, dry_run: bool = False) -> None:
        self.lab = lab
        self.cluster = cluster
        self.store = store
        self.record = record
        self.tools = tools
        self.log = log
        self.timeouts = timeouts or Timeouts()
        self.kubeconfig = kubeconfig
        self.dry_run = dry_run
        self._kube: KubeClient | None = None
        self.first_seen = podlib.FirstSeen()  # how long each pod problem has lasted

    @property
    def kube(self) -> KubeClient:
        if self._kube is None:
            self._kube = KubeClient(self.cluster.kube_context, self.kubeconfig)
        return self._kube

    def reset_kube(self) -> None:
        """Drop the client (e.g. after the kubeconfig was re-exported)."""
        if self._kube is not None:
            self._kube.close()
        self._kube = None

    @property
    def work_dir(self) -> Path:
        return self.lab.state_dir / "work" / self.cluster.name

    def write_file(self, relative: str, text: str, mode: int = 0o644) -> Path:
        path = self.work_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(path)
        return path

    @property
    def facts(self) -> dict[str, Any]:
        return self.record.facts

    def wait_for(self, gate: Callable[[], Verdict], timeout: float, doing: str) -> Verdict:
        """Poll a gate with exponential back-off until it holds or the deadline passes.

        A failing check marked terminal ends the wait at once; every ``report_every`` seconds the
        failing checks are logged at info level, so the live view says what is awaited."""
        started = time.monotonic()
        deadline = started + timeout
        reported = started
        delay = self.timeouts.poll_start
        last: Verdict | None = None
        while True:
            try:
                last = gate()
            except KubeError as exc:
                last = Verdict(doing, [Check("api", False, exc.message)])
            if last.ready:
                return last
            hopeless = [c for c in last.failing if c.terminal]
            if hopeless:
                raise GateFailed(
                    f"{doing} cannot hold — " + "; ".join(
                        f"{c.name}: {c.detail}" for c in hopeless),
                    hopeless[0].fix or "fix the cause named above, then run "
                    "`invoke lab.up --resume`")
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise GateTimeout(
                    f"{doing} did not hold within {timeout:.0f}s — {last.explain()}",
                    "look at the failing conditions above (`invoke lab.status` shows them too); "
                    "when they clear, run `invoke lab.up --resume`")
            if now - reported >= self.timeouts.report_every:
                reported = now
                self.log.info("gate.waiting", gate=last.gate, waited=f"{now - started:.0f}s",
                              failing=[f"{c.name}: {c.detail}" if c.detail else c.name
                                       for c in last.failing])
            else:
                self.log.debug("gate.waiting", gate=last.gate,
                               failing=[c.name for c in last.failing])
            if CANCELLED.wait(min(delay, remaining)):
                raise Interrupted(f"interrupted while waiting for {doing}",
                                  "run `invoke lab.up --resume` to continue")
            delay = min(delay * 1.6, self.timeouts.poll_max)

    def pods_check(self, name: str, pods: list[Obj], nodes: list[Obj]) -> Check:
        """Every pod runs or is on its way; otherwise each blocking pod with the kubelet's or the
        scheduler's reason. Failed/Unknown leftovers of earlier attempts never block."""
        pressure = podlib.node_pressure(nodes)
        problems: list[podlib.PodProblem] = []
        seen_keys: set[str] = set()
        leftovers = []
        for pod in pods:
            if podlib.is_leftover(pod):
                leftovers.append(pod["metadata"]["name"])
            elif podlib.blocks(pod):
                problems.extend(podlib.diagnose(pod, pressure, self.first_seen,
                                                self.timeouts.image_pull, seen_keys))
        self.first_seen.keep_only(seen_keys)
        terminal = [p for p in problems if p.terminal]
        detail = "; ".join(p.detail for p in problems)
        if leftovers and not problems:
            detail = f"ignoring leftover pods of earlier attempts: {', '.join(leftovers)}"
        return Check(name, not problems, detail, terminal=bool(terminal),
                     fix=terminal[0].fix if terminal else "")


class Step(Protocol):
    """One transition of the pipeline. ``name`` is the state it leads to."""

    name: str
    title: str

    def render(self, ctx: StepContext) -> Rendered:
        """What the step applies. Pure: no cluster, no Docker."""
        ...

    def apply(self, ctx: StepContext) -> None:
        """Make it so. Idempotent: re-running after success changes nothing."""
        ...

    def ready(self, ctx: StepContext) -> Verdict:
        """The readiness gate: every condition named."""
        ...

    def probe(self, ctx: StepContext) -> Verdict:
        """A cheap check that the step's effects still hold (for --resume)."""
        ...


def dump_yaml(docs: list[Obj] | Obj) -> str:
    if isinstance(docs, list):
        return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)
    return yaml.safe_dump(docs, sort_keys=False, default_flow_style=False)
