"""Running the external tools the lab drives: kind, helm, docker.

Binaries are looked up in the user's tools directory first (where the bootstrap puts verified
pinned releases, ``lab.bootstrap.tools_dir``), then on PATH. A missing tool or one at the wrong
version is reported with what to install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError, ToolError
from lab.logs import Logger

INSTALL_HINTS = {
    "kind": "install kind {version}: https://kind.sigs.k8s.io/docs/user/quick-start/#installation "
            "(or run `invoke lab.tools` to fetch the pinned, checksum-verified release)",
    "helm": "install helm {version}: https://helm.sh/docs/intro/install/ "
            "(or run `invoke lab.tools` to fetch the pinned, checksum-verified release)",
    "docker": "install Docker Engine (https://docs.docker.com/engine/install/) and start it",
    "cilium": "install the Cilium CLI {version} (or run `invoke lab.tools`)",
}
VERSION_ARGS = {
    "kind": (["version"], r"kind (v\d+\.\d+\.\d+)"),
    "helm": (["version", "--short"], r"(v\d+\.\d+\.\d+)"),
    "cilium": (["version", "--client"], r"cilium-cli:? (v\d+\.\d+\.\d+)"),
}


@dataclass
class Result:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str


class Tools:
    """Finds and runs the lab's external tools; every call is logged."""

    def __init__(self, bin_dir: Path | None, log: Logger,
                 pinned: dict[str, str] | None = None) -> None:
        self.bin_dir = bin_dir
        self.log = log
        self.pinned = pinned or {}
        self._paths: dict[str, str] = {}
        self._checked: set[str] = set()

    def which(self, name: str) -> str | None:
        if name in self._paths:
            return self._paths[name]
        if self.bin_dir is not None:
            candidate = self.bin_dir / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                self._paths[name] = str(candidate)
                return str(candidate)
        found = shutil.which(name)
        if found:
            self._paths[name] = found
        return found

    def path(self, name: str) -> str:
        found = self.which(name)
        if not found:
            raise LabError(f"`{name}` is not installed (not in {self.bin_dir} nor on PATH)",
                           INSTALL_HINTS.get(name, f"install {name}").format(
                               version=self.pinned.get(name, "")))
        return found

    def version(self, name: str) -> str | None:
        spec = VERSION_ARGS.get(name)
        if spec is None:
            return None
        res = self.run(name, spec[0], check=False, quiet=True, timeout=30)
        m = re.search(spec[1], res.stdout + res.stderr)
        return m.group(1) if m else None

    def require(self, name: str) -> None:
        """The tool exists and, when pinned, is at the pinned version. Checked once per run."""
        if name in self._checked:
            return
        self.path(name)
        want = self.pinned.get(name)
        if want:
            have = self.version(name)
            if have != want:
                raise LabError(
                    f"`{name}` is {have or 'of unknown version'}, the lab pins {want}",
                    INSTALL_HINTS.get(name, "").format(version=want))
        self._checked.add(name)

    def run(self, name: str, args: list[str], *, check: bool = True, input: str | None = None,
            timeout: float = 900, quiet: bool = False, doing: str = "",
            env: dict[str, str] | None = None) -> Result:
        cmd = [self.path(name), *args]
        shown = [name, *args]
        if not quiet:
            self.log.debug("tool.run", command=" ".join(shown))
        try:
            proc = subprocess.run(cmd, input=input, capture_output=True, text=True,
                                  timeout=timeout, env={**os.environ, **(env or {})},
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise ToolError(shown, -1, f"timed out after {timeout:.0f}s",
                            f"{doing or 'the command'} took too long; retry with "
                            "`invoke lab.up --resume`") from exc
        res = Result(shown, proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise ToolError(shown, proc.returncode, proc.stderr or proc.stdout,
                            f"{doing} failed; fix the cause above and run "
                            "`invoke lab.up --resume`" if doing else "")
        return res
