"""What every task shares: config loading, log setup, and turning failures into one clear exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

from invoke.exceptions import Exit
from invoke.tasks import Task
from invoke.tasks import task as invoke_task

from lab import logs
from lab.config import CONFIG_ENV, LabConfig, check_environment, load_config
from lab.errors import Interrupted, LabError

T = TypeVar("T")

CONFIG_HELP = f"lab config file (default: ${CONFIG_ENV} or config/lab.yaml)"
LOG_HELP = "log format: json or console (default: console on a TTY, JSON otherwise)"
LEVEL_HELP = ("log level: debug, info, warning, error (default: warning on a terminal, "
              "info otherwise; $LAB_LOG_LEVEL)")
VERBOSE_HELP = "show the log events (level info) on a terminal too"
LOG_OPTIONS = {"log_format": LOG_HELP, "log_level": LEVEL_HELP, "verbose": VERBOSE_HELP}


class LabTask(Task[Callable[..., Any]]):
    """Invoke's task with two fixes to automatic short flags: ``-v`` is always ``--verbose``
    (another option starting with v takes its next letter), and a short flag is a letter or
    digit — plain invoke can pick the ``-`` of ``log-level``, shown as ``--=STRING``."""

    def arg_opts(self, name: str, default: str, taken_names: set[str]) -> dict[str, Any]:
        # Invoke primes ``taken_names`` with every parameter name, so a task with --verbose is
        # known before its other options pick their letters: they leave `v` to it.
        reserved = set("-_") | ({"v"} if name != "verbose" and "verbose" in taken_names else set())
        opts: dict[str, Any] = super().arg_opts(name, default, taken_names | reserved)
        return opts


def task(*args: Any, **kwargs: Any) -> Callable[..., Any]:
    """Invoke's ``@task`` making a :class:`LabTask`."""
    return invoke_task(*args, klass=LabTask, **kwargs)


def fail(exc: LabError, code: int = 1) -> NoReturn:
    """Say the error once: one JSON event when logs are JSON, else the ✗ / → lines."""
    if logs.json_mode():
        logs.get("lab").error("failed", error=exc.message,
                              **({"hint": exc.hint} if exc.hint else {}))
    else:
        from lab.ui import print_error

        print_error(exc)
    raise Exit(code=code)


def guard(fn: Callable[[], T]) -> T:
    """Every user-facing failure ends in one message that says what to do next."""
    try:
        return fn()
    except LabError as exc:
        fail(exc, code=130 if isinstance(exc, Interrupted) else 1)
    except KeyboardInterrupt:
        fail(LabError("interrupted", "run `invoke lab.up --resume` to continue"), code=130)


def setup(config: str | None, log_format: str | None, log_level: str | None = None,
          verbose: bool = False) -> LabConfig:
    """Logging, the environment, then the config: each refused with what to change, before any
    side effect."""
    setup_logging(log_format, log_level, verbose)
    guard(check_environment)
    return guard(lambda: load_config(config))


def setup_logging(log_format: str | None, log_level: str | None = None,
                  verbose: bool = False) -> None:
    """Logging alone, for tasks that need no lab config; a bad option is refused like any
    other error."""
    try:
        logs.configure(log_format, log_level, verbose=verbose)
    except LabError as exc:
        logs.configure("json" if not sys.stderr.isatty() else "console", "info")
        fail(exc)


@contextmanager
def output() -> Iterator[None]:
    """Printing to a reader that stops early (`invoke lab.up --dry-run | head`) ends quietly."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would complain again when flushing stdout at exit: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise Exit(code=0) from None
