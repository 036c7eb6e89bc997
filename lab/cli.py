"""What every task shares: config loading, log setup, and turning failures into one clear exit."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from invoke.exceptions import Exit

from lab import logs
from lab.config import CONFIG_ENV, LabConfig, load_config
from lab.errors import LabError

T = TypeVar("T")

CONFIG_HELP = f"lab config file (default: ${CONFIG_ENV} or config/lab.yaml)"
LOG_HELP = "log format: json or console (default: console on a TTY, JSON otherwise)"


def guard(fn: Callable[[], T]) -> T:
    """Every user-facing failure ends in one message that says what to do next."""
    try:
        return fn()
    except LabError as exc:
        logs.get("lab").error("failed", error=exc.message.splitlines()[0])
        raise Exit(f"✗ {exc}", code=1) from None
    except KeyboardInterrupt:
        raise Exit("✗ interrupted; run `invoke lab.up --resume` to continue", code=130) from None


def setup(config: str | None, log_format: str | None) -> LabConfig:
    logs.configure(log_format)
    return guard(lambda: load_config(config))
