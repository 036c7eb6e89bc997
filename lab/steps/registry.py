"""The registry: every step keyed by the state it leads to, in pipeline order."""

from __future__ import annotations

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

