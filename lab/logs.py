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

# structlog's dev module imports rich, when installed, only to offer rich tracebacks: ~0.1 s of
# every task's start. The console renderer here prints plain tracebacks, so rich stays out of
# that import (lab.ui imports it for the live view, where it is wanted).
_HIDE_RICH = "rich" not in sys.modules
if _HIDE_RICH:
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` raises ImportError
try:
    import structlog
finally:
    if _HIDE_RICH:
        del sys.modules["rich"]

from lab.errors import LabError  # noqa: E402

Logger = Any  # structlog's BoundLogger is a lazy proxy; typed loosely on purpose

FORMAT_ENV = "LAB_LOG_FORMAT"
LEVEL_ENV = "LAB_LOG_LEVEL"
FORMATS = ("json", "console")
LEVELS = ("debug", "info", "warning", "error", "critical")

_configured = False
_json = False


def wants_json(log_format: str | None, stream: TextIO) -> bool:
    if log_format in FORMATS:
        return log_format == "json"
    return not stream.isatty()


def json_mode() -> bool:
    """True when log lines are JSON (not a TTY, or asked): errors are then one JSON event."""
    return _json


def _choice(value: str | None, name: str, choices: tuple[str, ...]) -> str | None:
    """A flag's value, else the variable's; None when neither is set. LabError when unknown."""
    env = os.environ.get(name, "")
    if value is None and not env.strip():
        return None
    word = (value if value is not None else env).strip().lower()
    if word in choices:
        return word
    flag = "--" + name.removeprefix("LAB_").lower().replace("_", "-")
    said = f"{flag} {value!r}" if value is not None else f"{name}={env!r}"
    raise LabError(f"unknown log {name.rsplit('_', 1)[-1].lower()} in {said}",
                   f"use one of: {', '.join(choices)} (`{flag} {choices[0]}` or "
                   f"`export {name}={choices[0]}`), or leave it unset")


def settings(log_format: str | None = None, level: str | None = None, verbose: bool = False,
             stream: TextIO | None = None) -> tuple[bool, str]:
    """(JSON?, level) from the flags, then LAB_LOG_FORMAT / LAB_LOG_LEVEL. LabError if unknown.

    Default level: on a TTY with the console format the user watches status lines, so events at
    INFO and below stay out of the way unless asked (``-v``, ``--log-level``); everywhere else
    (CI, pipes, JSON) INFO.
    """
    out = stream or sys.stderr
    use_json = wants_json(_choice(log_format, FORMAT_ENV, FORMATS), out)
    chosen = _choice(level, LEVEL_ENV, LEVELS)
    if chosen is None:
        chosen = "info" if verbose or use_json or not out.isatty() else "warning"
    return use_json, chosen


def configure(log_format: str | None = None, level: str | None = None,
              stream: TextIO | None = None, verbose: bool = False) -> None:
    """Idempotent. ``log_format``: json | console | None (auto: console only on a TTY).
    Raises LabError (before changing anything) for an unknown format or level."""
    global _configured, _json
    out = stream or sys.stderr
    use_json, level_name = settings(log_format, level, verbose, out)
    numeric = getattr(logging, level_name.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (structlog.processors.JSONRenderer(ensure_ascii=False) if use_json else
                     structlog.dev.ConsoleRenderer(
                         colors=_colors(out), exception_formatter=structlog.dev.plain_traceback))
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
    _json = use_json


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


def no_color() -> bool:
    """NO_COLOR (no-color.org): present and not empty, whatever its value, turns colour off."""
    return bool(os.environ.get("NO_COLOR"))


def _colors(stream: TextIO) -> bool:
    return stream.isatty() and not no_color()


def get(name: str = "lab") -> Logger:
    if not _configured:
        try:
            configure()
        except LabError:  # a bad LAB_LOG_* is reported by the task that reads it (lab.cli)
            configure("json" if not sys.stderr.isatty() else "console", "info")
    return structlog.get_logger(name)


def bind(**values: Any) -> None:
    structlog.contextvars.bind_contextvars(**values)


def unbind(*keys: str) -> None:
    structlog.contextvars.unbind_contextvars(*keys)
