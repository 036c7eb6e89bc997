"""kind-cilium-lab: a production-shaped local Kubernetes lab driven by a resumable state machine."""

__version__ = "0.1.0"
