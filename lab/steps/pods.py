"""Why a pod is not running, in the kubelet's and the scheduler's own words.

Reasons are the ones the kubelet writes into ``containerStatuses[].state.waiting.reason``
(Kubernetes v1.33: pkg/kubelet/images/types.go, pkg/kubelet/kuberuntime/kuberuntime_container.go,
pkg/kubelet/container/sync_result.go) and the scheduler into the ``PodScheduled`` condition.
Some can never clear by waiting; a gate that meets one ends at once with the reason and a fix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]

# Waiting reasons of a container that is simply on its way.
STARTING = frozenset({"ContainerCreating", "PodInitializing"})
# The image reference cannot work, whatever the network does.
HOPELESS_IMAGE = frozenset({"InvalidImageName", "ErrImageNeverPull"})
# Pull failures may be a slow or flaky registry: terminal only once they persist.
PULL_FAILURES = frozenset({"ErrImagePull", "ImagePullBackOff"})
CRASH_LOOP = "CrashLoopBackOff"
CRASH_LOOP_RESTARTS = 3
PRESSURE = ("MemoryPressure", "DiskPressure", "PIDPressure", "NetworkUnavailable")


@dataclass(frozen=True)
class PodProblem:
    """One reason a pod does not run. ``terminal``: waiting longer cannot help."""

    pod: str
    detail: str
    terminal: bool = False
    fix: str = ""


class FirstSeen:
    """How long a condition has been seen, across the polls of one gate wait."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def age(self, key: str) -> float:
        now = time.monotonic()
        return now - self._since.setdefault(key, now)

    def keep_only(self, keys: set[str]) -> None:
        """Forget what was not seen in this poll: a condition that clears starts over."""
        for key in set(self._since) - keys:
            del self._since[key]


def node_pressure(nodes: list[Obj]) -> dict[str, list[str]]:
    """Node name → the pressure conditions that hold on it."""
    out: dict[str, list[str]] = {}
    for n in nodes:
        held = [c["type"] for c in (n.get("status") or {}).get("conditions") or []
                if c.get("type") in PRESSURE and c.get("status") == "True"]
        if held:
            out[n["metadata"]["name"]] = held
    return out


def is_leftover(pod: Obj) -> bool:
    """A Failed or Unknown pod: its controller has replaced it (or will), and the workloads'
    own checks say whether enough replicas run; it must not block a gate forever."""
    return (pod.get("status") or {}).get("phase") in ("Failed", "Unknown")


def diagnose(pod: Obj, pressure: dict[str, list[str]], seen: FirstSeen, pull_grace: float,
             seen_keys: set[str]) -> list[PodProblem]:
    """The problems of one pod that blocks (Pending, or a container waiting for a bad reason)."""
    meta, spec = pod["metadata"], pod.get("spec") or {}
    status = pod.get("status") or {}
    name, namespace = meta["name"], meta.get("namespace", "default")
    node = spec.get("nodeName")
    images = {c["name"]: c.get("image", "") for c in
              (spec.get("initContainers") or []) + (spec.get("containers") or [])}
    problems: list[PodProblem] = []
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses")
                                                                or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason") or ""
        if not reason or reason in STARTING:
            continue
        container, restarts = cs.get("name", "?"), int(cs.get("restartCount") or 0)
        image = cs.get("image") or images.get(container, "")
        where = f"{namespace}/{name} ({container})"
        text = f"{where}: {reason}"
        if reason == CRASH_LOOP:
            text += f" after {restarts} restarts"
        if waiting.get("message"):
            text += f" — {_short(waiting['message'])}"
        terminal, fix = False, ""
        if reason in HOPELESS_IMAGE:
            terminal, fix = True, _image_fix(reason, image, node)
        elif reason in PULL_FAILURES:
            key = f"{namespace}/{name}/{container}/pull"
            seen_keys.add(key)
            age = seen.age(key)
            text += f" (for {age:.0f}s)"
            terminal, fix = age >= pull_grace, _image_fix(reason, image, node)
        elif reason == CRASH_LOOP:
            terminal = restarts >= CRASH_LOOP_RESTARTS
            fix = (f"the container keeps crashing: `kubectl -n {namespace} logs {name} "
                   f"-c {container} --previous` shows why; fix that, then "
                   "`invoke lab.up --resume`")
        problems.append(PodProblem(name, text + _pressure_note(pressure, node), terminal, fix))
    if problems or status.get("phase") != "Pending":
        return problems
    scheduled = next((c for c in status.get("conditions") or []
                      if c.get("type") == "PodScheduled"), None)
    if scheduled and scheduled.get("status") == "False":
        text = f"{name}: unschedulable — {_short(scheduled.get('message') or '')}"
    else:
        text = f"{name} (Pending)"
    return [PodProblem(name, text + _pressure_note(pressure, node))]


def blocks(pod: Obj) -> bool:
    """Pending, or a container waiting for anything but its normal start."""
    status = pod.get("status") or {}
    if status.get("phase") == "Pending":
        return True
    return any(((cs.get("state") or {}).get("waiting") or {}).get("reason") not in
               (None, "", *STARTING)
               for cs in (status.get("initContainerStatuses") or [])
               + (status.get("containerStatuses") or []))


def _pressure_note(pressure: dict[str, list[str]], node: str | None) -> str:
    """The pressure on the pod's node (or on every node while it is not scheduled)."""
    held = {n: c for n, c in pressure.items() if node is None or n == node}
    if not held:
        return ""
    return " (node " + "; node ".join(f"{n}: {', '.join(c)}" for n, c in sorted(held.items())) \
        + ")"


def _image_fix(reason: str, image: str, node: str | None) -> str:
    on_node = node or "<node>"
    if reason == "InvalidImageName":
        return (f"the image reference {image!r} is malformed: correct it where it is set "
                "(chart values or the config's versions), then `invoke lab.up --resume`")
    if reason == "ErrImageNeverPull":
        return (f"the pod may not pull and {image!r} is not on {on_node}: load it with "
                "`kind load docker-image IMAGE --name <cluster>`, then `invoke lab.up --resume`")
    return ("the node cannot pull the image: check this machine's internet access, proxy and "
            f"the registry's rate limits; `docker exec {on_node} crictl pull {image}` shows the "
            "registry's answer; then `invoke lab.up --resume`")


def _short(text: str, limit: int = 300) -> str:
    """One line; a long message keeps its start and its end, where the root cause usually is
    (e.g. "…: dial tcp: lookup quay.io: no such host")."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + " … " + text[-(limit - head - 3):]
