"""Status lines: one per step, started and ended (✓/✗), spinner only on a TTY, NO_COLOR honoured.

Several clusters may advance in parallel; on a TTY each gets its own live line, otherwise every
start and end is a plain line of its own (CI logs stay readable).
"""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from lab import logs
from lab.errors import LabError


class Progress:
    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        # JSON logs (asked for on a terminal) stay whole lines: no live spinner between them.
        self.live = self.stream.isatty() and not logs.json_mode() if live is None else live
        self.color = self.live and not logs.no_color()
        self._lock = threading.Lock()
        self._active: dict[str, tuple[str, float]] = {}
        self._rich: Any = None
        self._console: Any = None

    def __enter__(self) -> Progress:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self.stream, no_color=not self.color)
            self._rich = Live(_Frame(self), console=self._console, refresh_per_second=8,
                              transient=True)
            self._rich.__enter__()
            # Log lines go above the live lines instead of through them.
            logs.redirect(_ConsoleWriter(self._console))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            logs.redirect(None)
            self._rich.__exit__(None, None, None)
            self._rich = None

    def _render(self) -> Any:
        from rich.spinner import Spinner
        from rich.table import Table

        table = Table.grid(padding=(0, 1))
        for key, (title, started) in list(self._active.items()):
            table.add_row(Spinner("dots"), f"{key}: {title}",
                          f"[dim]{time.monotonic() - started:5.1f}s[/dim]")
        return table

    def _emit(self, line: str) -> None:
        with self._lock:
            if self._console is not None:
                self._console.print(line, highlight=False)
            else:
                self.stream.write(line + "\n")
                self.stream.flush()

    @contextmanager
    def step(self, key: str, title: str) -> Iterator[None]:
        """Start line, then ✓ with the elapsed time, or ✗ and the exception propagates."""
        started = time.monotonic()
        with self._lock:
            self._active[key] = (title, started)
        if self._rich is None:
            self._emit(f"• {key}: {title} …")
        try:
            yield
        except BaseException:
            self._finish(key, title, started, ok=False)
            raise
        self._finish(key, title, started, ok=True)

    def _finish(self, key: str, title: str, started: float, ok: bool) -> None:
        with self._lock:
            self._active.pop(key, None)
        mark = "✓" if ok else "✗"
        if self.color:
            mark = f"[green]{mark}[/green]" if ok else f"[red]{mark}[/red]"
        self._emit(f"{mark} {key}: {title} ({time.monotonic() - started:.1f}s)")

    def note(self, line: str) -> None:
        self._emit(line)


class _Frame:
    """Re-rendered on every refresh, so the elapsed times tick."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __rich__(self) -> Any:
        return self.progress._render()


class _ConsoleWriter:
    """A text stream that prints whole lines through the live console."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self._buf = ""

    def write(self, text: str) -> int:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            from rich.text import Text

            self.console.print(Text.from_ansi(line), highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


# -- errors ----------------------------------------------------------------------------------------

# A `quoted command` (spaces and all) or any other run of non-spaces: never split across lines.
_TOKEN = re.compile(r"`[^`]*`\S*|\S+")


def wrap(line: str, width: int) -> list[str]:
    """Fold one line at spaces to ``width``; continuation lines are indented under the text after
    the line's own indent and marker (✗, →). A command in backticks or a URL stays whole, even
    when it alone is wider than ``width``."""
    m = re.match(r"(\s*(?:[✗→•] )?)(.*)", line)
    lead, body = (m.group(1), m.group(2)) if m else ("", line)
    indent = " " * len(lead)
    out: list[str] = []
    current, empty = lead, True
    for token in _TOKEN.findall(body):
        if not empty and len(current) + 1 + len(token) > width:
            out.append(current)
            current = indent + token
        else:
            current += token if empty else " " + token
        empty = False
    out.append(current)
    return out


def print_error(exc: LabError, stream: TextIO | None = None) -> None:
    """``✗ what happened`` then ``→ what to do``, folded at word boundaries on a terminal."""
    out = stream or sys.stderr
    tty = out.isatty()
    width = shutil.get_terminal_size((100, 24)).columns if tty else 0
    lines = f"✗ {exc}".splitlines()
    for i, line in enumerate(lines):
        for folded in (wrap(line, width) if width else [line]):
            if i == 0 and tty and not logs.no_color():
                folded = folded.replace("✗", "\x1b[31m✗\x1b[0m", 1)
            out.write(folded + "\n")
    out.flush()
