"""The registry: every step keyed by the state it leads to, in pipeline order."""

from __future__ import annotations

from lab.state import STATES
from lab.steps.base import Step
from lab.steps.certs import CertsStep
from lab.steps.cluster import ClusterStep
from lab.steps.cni import CniStep
from lab.steps.gateway import GatewayStep
from lab.steps.locked import LockedStep
from lab.steps.meshed import MeshStep

STEPS: dict[str, Step] = {
    "cluster": ClusterStep(),
    "cni": CniStep(),
    "gateway": GatewayStep(),
    "certs": CertsStep(),
    "locked": LockedStep(),
    "meshed": MeshStep(),
}


def implemented_states() -> list[str]:
    """``absent`` plus every state with a step, in pipeline order (always a prefix)."""
    out = ["absent"]
    for name in STATES[1:]:
        if name not in STEPS:
            break
        out.append(name)
    return out
