"""The lab's error types: every failure a user sees says what happened and what to do next."""

from __future__ import annotations


class LabError(Exception):
    """A failure the user can act on. ``hint`` says what to do next."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  → {self.hint}"
        return self.message


class ConfigError(LabError):
    """The configuration cannot work. Raised before any side effect."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        lines = [f"{p.location}: {p.message}" + (f" → {p.fix}" if p.fix else "") for p in problems]
        super().__init__(
            "the lab configuration is invalid:\n  " + "\n  ".join(lines),
            "fix the fields named above, then run the task again (nothing was changed)",
        )


class ConfigProblem:
    """One invalid field: where it is, what is wrong, what to change."""

    def __init__(self, file: str, field: str, message: str, fix: str = "") -> None:
        self.file = file
        self.field = field
        self.message = message
        self.fix = fix

    @property
    def location(self) -> str:
        return f"{self.file}: {self.field}" if self.field else self.file

    def __repr__(self) -> str:
        return f"ConfigProblem({self.location!r}, {self.message!r})"


class StateError(LabError):
    """The persisted record cannot be used (corrupt, newer format, locked)."""


class LockedError(StateError):
    """Another process holds the lab's lock."""


class ToolError(LabError):
    """An external command (kind, helm, docker) failed."""

    def __init__(self, command: list[str], returncode: int, stderr: str, hint: str = "") -> None:
        self.command = command
        self.returncode = returncode
        self.stderr = stderr
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        super().__init__(
            f"`{' '.join(command)}` exited with {returncode}" + (f":\n{tail}" if tail else ""),
            hint,
        )


class GateTimeout(LabError):
    """A readiness gate did not hold before its deadline."""


class GateFailed(LabError):
    """A readiness gate can no longer hold: a condition it waits for cannot clear by waiting."""


class Interrupted(LabError):
    """The user interrupted the run (Ctrl-C); the record says `interrupted`, not `failed`."""


class StepFailed(LabError):
    """A step failed; wraps the cause with what was being done."""
