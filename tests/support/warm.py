"""Task processes forked from a warm interpreter: `python -m invoke …` without the import.

A run of the suite starts some 150 `invoke lab.*` processes; each spends ~0.6 s of CPU importing
invoke, the lab and the kubernetes client before it does anything, about a sixth of the CPU the
whole suite has on two cores. A *warm interpreter* (one per xdist worker, started on first use)
imports them once and then forks a child per task. The child is an ordinary process of its own:
it gets the caller's stdin/stdout/stderr, working directory, environment and, when asked, a
session of its own, then runs ``invoke`` as ``python -m invoke`` does (``runpy``, ``__main__``)
and exits through the interpreter's normal shutdown. The product code it runs is unchanged;
only the imports it would have made are already there.

What an import would have read from the environment is read again in the child
(``IMPORT_TIME_ENV``): without that the kubernetes client would look for the kubeconfig the warm
interpreter saw at its start. ``WarmPopen`` is a ``subprocess.Popen`` whose child comes from the
warm interpreter, so tests keep ``communicate``, ``wait``, ``kill``, ``os.killpg(proc.pid, …)``.

``LAB_TEST_COLD_TASKS=1`` starts every task as a fresh interpreter instead. Tests that need a
fresh interpreter on purpose (a terminal, import order, start-up time) start one themselves.
"""

from __future__ import annotations

import array
import inspect
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.fakes.warmfakes import adopt_stdio, report_exits

REPO = Path(__file__).resolve().parents[2]
COLD_ENV = "LAB_TEST_COLD_TASKS"
_MESSAGE = struct.Struct("ci")  # b"p" pid (from the child, once it is set up) or b"x" exit status
_MAX_MESSAGE = 1 << 20
# Popen._execute_child's parameters after errwrite (restore_signals, …, start_new_session, and
# process_group from Python 3.11): found by name, they differ between versions
_EXTRA_PARAMETERS = list(inspect.signature(subprocess.Popen._execute_child).parameters)[17:]

# In the order a task imports them: the root tasks.py first (as invoke loads it, the lab's logging
# before rich), then what the lab imports lazily on its first API call, then what `lab.up` and
# the other lab tasks import when they start (the pipeline and its steps, the CA's x509).
WARM_IMPORTS = ("runpy", "invoke.main", "tasks", "kubernetes.client", "kubernetes.config",
                "kubernetes.stream.ws_client", "lab.kube", "lab.runner", "cryptography.x509",
                "rich.console")
# (module, attribute, how a fresh interpreter computes it at import from the environment)
def _kubeconfig_default(env: Any) -> str:
    return str(env.get("KUBECONFIG", "~/.kube/config"))


IMPORT_TIME_ENV: list[tuple[str, str, Any]] = [
    ("kubernetes.config.kube_config", "KUBE_CONFIG_DEFAULT_LOCATION", _kubeconfig_default),
    ("kubernetes.config", "KUBE_CONFIG_DEFAULT_LOCATION", _kubeconfig_default),
    ("structlog._config", "_no_colors", lambda env: env.get("NO_COLOR", "") != ""),
    ("structlog._config", "_force_colors", lambda env: env.get("FORCE_COLOR", "") != ""),
]


def is_task_command(argv: list[str]) -> bool:
    """``[sys.executable, "-m", "invoke", …]``: what the warm interpreter can run."""
    return len(argv) >= 3 and argv[0] == sys.executable and argv[1:3] == ["-m", "invoke"]


# -- the caller's side -----------------------------------------------------------------------------

class WarmInterpreter:
    """The warm interpreter of this process, started on first use, ended with this process."""

    _instance: WarmInterpreter | None = None
    _instance_lock = threading.Lock()
    _failed = False

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # `-m` from the repository puts it first on sys.path: tests.support.warm and tasks import
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.warm", str(theirs.fileno())], cwd=REPO,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=[theirs.fileno()],
            start_new_session=True)
        theirs.close()
        self._control = ours
        self._send_lock = threading.Lock()
        ready = ours.recv(16)
        if ready != b"ready":
            raise RuntimeError("the warm interpreter did not start (its stderr says why)")

    @classmethod
    def get(cls) -> WarmInterpreter | None:
        """The warm interpreter, or None where it cannot start (say, the lab no longer imports):
        the tasks then start fresh and show the error themselves."""
        with cls._instance_lock:
            if cls._failed:
                return None
            if cls._instance is None or cls._instance.process.poll() is not None:
                try:
                    cls._instance = cls()
                except (RuntimeError, OSError):  # OSError: no SOCK_SEQPACKET (macOS)
                    cls._failed = True
                    return None
            return cls._instance

    def spawn(self, argv: list[str], cwd: str | None, env: dict[str, str] | None,
              fds: tuple[int, int, int], new_session: bool) -> tuple[int, socket.socket]:
        """Fork a child running ``argv`` (a ``python -m invoke`` command line); its pid and the
        socket on which its exit status will arrive."""
        status_ours, status_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        request = json.dumps({"argv": argv[3:], "cwd": cwd or os.getcwd(),
                              "env": dict(os.environ if env is None else env),
                              "new_session": new_session}).encode()
        if len(request) > _MAX_MESSAGE:
            raise ValueError("task request too large for the warm interpreter")
        # -1 (not redirected): the child shares this process's own stdio, as with Popen
        passed = [status_theirs.fileno(), *(fd if fd != -1 else i for i, fd in enumerate(fds))]
        with self._send_lock:
            self._control.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", passed))])
        status_theirs.close()
        # The child says its pid once it has its session and stdio, as Popen returns only once
        # its child is ready: a test may signal its process group right away.
        status_ours.settimeout(30)
        try:
            reply = status_ours.recv(_MESSAGE.size)
        except TimeoutError:
            reply = b""
        status_ours.settimeout(None)
        kind, value = _MESSAGE.unpack(reply) if len(reply) == _MESSAGE.size else (b"", 0)
        if kind != b"p":
            raise RuntimeError(f"the warm interpreter did not start the task ({reply!r})")
        return value, status_ours


class WarmPopen(subprocess.Popen):  # type: ignore[type-arg]
    """``subprocess.Popen`` for a ``python -m invoke`` command line whose child is forked by the
    warm interpreter. Its exit status comes from that interpreter (it is the parent)."""

    _status: socket.socket | None = None

    def _execute_child(self, args: Any, executable: Any, preexec_fn: Any, close_fds: Any,
                       pass_fds: Any, cwd: Any, env: Any, startupinfo: Any, creationflags: Any,
                       shell: Any, p2cread: int, p2cwrite: int, c2pread: int, c2pwrite: int,
                       errread: int, errwrite: int, *rest: Any) -> None:
        if shell or executable or preexec_fn or pass_fds or not is_task_command(list(args)):
            raise ValueError(f"not a task command line for the warm interpreter: {args}")
        extra = dict(zip(_EXTRA_PARAMETERS, rest, strict=False))
        if extra.get("process_group", -1) not in (-1, None) or extra.get("umask", -1) != -1:
            raise ValueError("process_group and umask are not passed to a warm task")
        new_session = bool(extra.get("start_new_session"))
        try:
            interpreter = WarmInterpreter.get()
            if interpreter is None:
                raise RuntimeError("no warm interpreter")
            self.pid, self._status = interpreter.spawn(
                list(args), None if cwd is None else os.fsdecode(cwd), env,
                (p2cread, c2pwrite, errwrite), new_session)
        finally:
            # as Popen does: the child's ends are the child's alone now
            if p2cread != -1 and p2cwrite != -1:
                os.close(p2cread)
            if c2pwrite != -1 and c2pread != -1:
                os.close(c2pwrite)
            if errwrite != -1 and errread != -1:
                os.close(errwrite)
            devnull = getattr(self, "_devnull", None)
            if devnull is not None:
                os.close(devnull)
            self._closed_child_pipe_fds = True

    def _read_status(self, timeout: float | None, deadstate: int | None = None) -> bool:
        if self._status is None:
            return self.returncode is not None
        ready, _, _ = select.select([self._status], [], [], timeout)
        if not ready:
            return False
        data = self._status.recv(_MESSAGE.size)
        self._status.close()
        self._status = None
        if len(data) == _MESSAGE.size:
            self.returncode = _MESSAGE.unpack(data)[1]
        else:  # the warm interpreter is gone: the status is lost
            self.returncode = deadstate if deadstate is not None else -signal.SIGKILL
        return True

    def _internal_poll(self, _deadstate: int | None = None, **_: Any) -> int | None:
        if self.returncode is None:
            self._read_status(0, _deadstate)
        return self.returncode

    def _wait(self, timeout: float | None) -> int:
        if self.returncode is None and not self._read_status(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
        assert self.returncode is not None
        return self.returncode


def _cold(argv: list[str]) -> bool:
    return bool(os.environ.get(COLD_ENV)) or not is_task_command(argv) or \
        WarmInterpreter.get() is None


def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    """``subprocess.Popen(argv, …)``, the child forked warm when ``argv`` is a task command."""
    if _cold(argv):
        return subprocess.Popen(argv, **kwargs)
    return WarmPopen(argv, **kwargs)


def run(argv: list[str], *, timeout: float | None = None, **kwargs: Any
        ) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(argv, …)`` with the child from :func:`popen`."""
    if _cold(argv):
        return subprocess.run(argv, timeout=timeout, check=False, **kwargs)
    if kwargs.pop("capture_output", False):
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    given = kwargs.pop("input", None)
    if given is not None:
        kwargs["stdin"] = subprocess.PIPE
    with WarmPopen(argv, **kwargs) as proc:
        try:
            out, err = proc.communicate(given, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# -- the warm interpreter ------------------------------------------------------------------------

def _warm_up() -> None:
    """Import what a task imports (``WARM_IMPORTS``)."""
    import importlib

    for module in WARM_IMPORTS:
        importlib.import_module(module)
    del sys.modules["tasks"]  # invoke loads the root tasks.py itself, as in a fresh interpreter


def _pythonpath() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def _become_task(request: dict[str, Any], status: socket.socket, fds: list[int]) -> None:
    """In the forked child: take the caller's stdio, directory and environment, run invoke."""
    import runpy

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if request["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    status.send(_MESSAGE.pack(b"p", os.getpid()))
    status.close()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for module, attribute, compute in IMPORT_TIME_ENV:
        if module in sys.modules:
            setattr(sys.modules[module], attribute, compute(os.environ))
    adopt_stdio()
    # as a fresh `python -m` makes it: the working directory, $PYTHONPATH, then the rest
    sys.path[:] = [request["cwd"], *_pythonpath(), *_INTERPRETER_PATH]
    sys.argv = ["-m", *request["argv"]]
    runpy.run_module("invoke", run_name="__main__", alter_sys=True)


def _serve(control: socket.socket
           ) -> tuple[dict[str, Any], socket.socket, list[int]] | None:
    """Fork a child per request, report its pid and then its exit status. Returns in the child
    (with its request), or None when the caller has gone."""
    import selectors

    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wakeup_r, selectors.EVENT_READ)
    control.send(b"ready")
    while True:
        for key, _ in selector.select():
            if key.fileobj is control:
                message, ancillary, _flags, _ = control.recvmsg(
                    _MAX_MESSAGE, socket.CMSG_SPACE(4 * struct.calcsize("i")))
                if not message:
                    return None
                fds = array.array("i")
                for level, kind, data in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                status = socket.socket(fileno=fds[0])
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    for fd in (wakeup_r, wakeup_w):
                        os.close(fd)
                    selector.close()
                    control.close()
                    for other in children.values():
                        other.close()
                    return json.loads(message), status, list(fds[1:])
                for fd in fds[1:]:
                    os.close(fd)
                children[pid] = status
            else:
                report_exits(wakeup_r, children, lambda code: _MESSAGE.pack(b"x", code))


# sys.path past its first entry and $PYTHONPATH's: the interpreter's own (stdlib, site-packages)
_INTERPRETER_PATH: list[str] = []


def main() -> None:
    import gc

    _INTERPRETER_PATH[:] = sys.path[1 + len(_pythonpath()):]
    control = socket.socket(fileno=int(sys.argv[1]))
    _warm_up()
    gc.collect()
    # The warm heap is left out of the children's collections: fewer pages copied on write. It
    # holds modules and what their import made, which a task keeps to its end anyway.
    gc.freeze()
    child = _serve(control)
    if child is not None:
        _become_task(*child)


if __name__ == "__main__":
    main()
