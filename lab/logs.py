"""structlog setup: console renderer on a TTY, JSON otherwise; stdlib logs routed through it.

``cluster`` and ``step`` are bound with contextvars so every event says where it came from. The
kubernetes client logs through the stdlib ``logging`` module; those records go through the same
processors, so a JSON log stays one format.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

Logger = Any  # structlog's BoundLogger is a lazy proxy; typed loosely on purpose

_configured = False


def wants_json(log_format: str | None, stream: TextIO) -> bool:
    if log_format in ("json", "console"):
        return log_format == "json"
    return not stream.isatty()


def configure(log_format: str | None = None, level: str | None = None,
              stream: TextIO | None = None) -> None:
    """Idempotent. ``log_format``: json | console | None (auto: console only on a TTY)."""
    global _configured
    out = stream or sys.stderr
    level_name = (level or os.environ.get("LAB_LOG_LEVEL") or "info").upper()
    numeric = getattr(logging, level_name, logging.INFO)
    use_json = wants_json(log_format or os.environ.get("LAB_LOG_FORMAT"), out)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if use_json else
                     structlog.dev.ConsoleRenderer(colors=_colors(out)))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _RedirectableHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_lab_handler", False):
            root.removeHandler(h)
    handler._lab_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    # The kubernetes client, urllib3 and transitions narrate every call or callback at
    # DEBUG/INFO; keep them at WARNING unless debugging.
    for name in ("kubernetes", "urllib3", "transitions"):
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
    _configured = True


class _RedirectableHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose stream the live progress display can borrow."""


def redirect(stream: Any) -> None:
    """Send log lines to ``stream`` (e.g. above a live display); None restores the original."""
    for h in logging.getLogger().handlers:
        if isinstance(h, _RedirectableHandler):
            if stream is None:
                original = getattr(h, "_lab_original", None)
                if original is not None:
                    h.setStream(original)
            else:
                if not hasattr(h, "_lab_original"):
                    h._lab_original = h.stream  # type: ignore[attr-defined]
                h.setStream(stream)


def _colors(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def get(name: str = "lab") -> Logger:
    if not _configured:
        configure()
    return structlog.get_logger(name)


def bind(**values: Any) -> None:
    structlog.contextvars.bind_contextvars(**values)


def unbind(*keys: str) -> None:
    structlog.contextvars.unbind_contextvars(*keys)
