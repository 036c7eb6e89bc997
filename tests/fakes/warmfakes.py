"""The warm fake server: one process per test session that has imported ``fakelib`` (and what its
calls import later) and forks a child for each fake call ``launch.py`` hands it.

The child becomes the call: it takes the caller's stdin/stdout/stderr, working directory,
environment and ``sys.argv``, runs ``fakelib.main`` and exits as an interpreter would (the
status of ``SystemExit``, 1 and a traceback for an uncaught exception, 120 when stdout cannot be
flushed). The server sends the caller the exit status once it has reaped the child. A child
whose caller is gone is killed at once by SIGIO (its default action), raised by the kernel when
the caller's end of the pipe handed over with the call closes: a fake killed mid-call stops where
it was, as a fresh process would.

``WarmFakeServer`` starts one from the test process and exports ``LAB_FAKE_WARM``; without it
(``LAB_TEST_COLD_TASKS=1``, or where the server cannot start) every fake starts fresh.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

FAKES_DIR = os.path.dirname(os.path.abspath(__file__))
WARM_ENV = "LAB_FAKE_WARM"
# the C launchers' directory, put on PATH before tests/fakes/bin by fakelib.fakes_path (which
# names it NATIVE_BIN_ENV: this file also runs as a script, beside fakelib rather than in tests)
NATIVE_ENV = "LAB_FAKE_NATIVE_BIN"
_MAX_REQUEST = 1 << 20
_FDS = 4  # stdin, stdout, stderr, the read end of the caller's liveness pipe


# -- the test process's side ---------------------------------------------------------------------

class WarmFakeServer:
    """A warm fake server for this test process, its socket exported as ``$LAB_FAKE_WARM``."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):  # SIGIO for a pipe's closed end: Linux's
            raise RuntimeError("the warm fake server runs on Linux only")
        self._dir = tempfile.mkdtemp(prefix="lab-fakes-")
        self.address = os.path.join(self._dir, "server")
        # stdin stays open: the server ends when this process does (EOF)
        self.process = subprocess.Popen(
            [sys.executable, "-S", os.path.abspath(__file__), self.address],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        assert self.process.stdout is not None
        if self.process.stdout.readline() != b"ready\n":
            self.stop()
            raise RuntimeError("the warm fake server did not start (its stderr says why)")

    def export(self) -> None:
        """``$LAB_FAKE_WARM`` for this process and its children, and ``$LAB_FAKE_NATIVE_BIN``
        where the C launchers could be built."""
        os.environ[WARM_ENV] = self.address
        try:  # test_warm_fakes.py fails where the build does; the Python launchers serve here
            native = build_native_launchers(os.path.join(self._dir, "bin"))
        except RuntimeError:
            native = None
        if native is not None:
            os.environ[NATIVE_ENV] = native

    def stop(self) -> None:
        if os.environ.get(WARM_ENV) == self.address:
            del os.environ[WARM_ENV]
            os.environ.pop(NATIVE_ENV, None)
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)


def build_native_launchers(folder: str) -> str | None:
    """``launch.c`` built as ``folder/{kind,docker,helm}`` with the C compiler on PATH: a call
    then starts no interpreter at all (~1 ms instead of ~14 ms). None where there is no compiler
    (the Python launchers serve); RuntimeError where the build fails."""
    import shutil

    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, "kind")
    built = subprocess.run(
        [compiler, "-O2", "-o", target, os.path.join(FAKES_DIR, "launch.c"),
         f'-DFAKES_BIN="{os.path.join(FAKES_DIR, "bin")}"', f'-DPYTHON="{sys.executable}"'],
        capture_output=True, check=False)
    if built.returncode != 0:
        raise RuntimeError(f"{compiler} could not build launch.c:\n{built.stderr.decode()}")
    for tool in ("docker", "helm"):
        try:
            os.link(target, os.path.join(folder, tool))
        except OSError:
            shutil.copy2(target, os.path.join(folder, tool))
    return folder


# -- the server ----------------------------------------------------------------------------------

def _preload() -> None:
    """Import fakelib and what its calls import on first use (YAML after the site directories,
    as ``fakelib.yaml_mod`` adds them), so that a child imports nothing."""
    sys.path.insert(0, FAKES_DIR)
    sys.dont_write_bytecode = False
    import fakelib

    fakelib.yaml_mod()
    for name in ("_sha256", "hashlib", "ipaddress", "urllib.parse", "urllib.request",
                 "urllib.error", "ssl", "calendar", "socket", "traceback", "io"):
        with contextlib.suppress(ImportError):
            __import__(name)


def serve(address: str) -> tuple[socket.socket, bytes, list[int]] | None:
    """Fork a child per call and send each caller its child's exit status. Returns in a child
    (its connection, request and descriptors), or None once the test process has gone."""
    import array
    import selectors

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(64)
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    calls: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wakeup_r, selectors.EVENT_READ)
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                conn.settimeout(10)  # the caller sends at once; a stuck one must not stop us
                try:
                    request, ancillary, _flags, _ = conn.recvmsg(
                        _MAX_REQUEST, socket.CMSG_SPACE(_FDS * 4))
                except OSError:
                    conn.close()
                    continue
                fds = array.array("i")
                for level, kind, data in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                if not request or len(fds) != _FDS:
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                try:
                    pid = os.fork()
                except OSError:  # no child: the caller runs the call itself
                    for fd in fds:
                        os.close(fd)
                    with contextlib.suppress(OSError):
                        conn.send(b"r")
                    conn.close()
                    continue
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for fd in (wakeup_r, wakeup_w):
                        os.close(fd)
                    selector.close()
                    listener.close()
                    for other in calls.values():
                        other.close()
                    return conn, request, list(fds)
                for fd in fds:
                    os.close(fd)
                calls[pid] = conn
            elif key.fileobj == wakeup_r:
                report_exits(wakeup_r, calls, lambda code: b"x%d" % code)
            elif not os.read(sys.stdin.fileno(), 4096):
                return None


def adopt_stdio() -> None:
    """``sys.std*`` (and ``sys.__std*__``) for descriptors 0/1/2 as a fresh interpreter makes
    them at start, with the encoding this one was started with. The warm task interpreter
    (tests/support/warm.py) uses it too."""
    import io

    def fresh(fd: int, old: Any) -> Any:
        # newline="\n": lines split at "\n" and nothing translated, as CPython's create_stdio
        if fd == 0:
            return io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "rb", closefd=False)),
                                    encoding=old.encoding, errors=old.errors, newline="\n")
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        raw = io.FileIO(fd, "wb", closefd=False)
        line_buffered = not unbuffered and (raw.isatty() or fd == 2)
        return io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw),
                                encoding=old.encoding, errors=old.errors, newline="\n",
                                line_buffering=line_buffered, write_through=unbuffered)

    sys.stdin, sys.stdout, sys.stderr = (fresh(0, sys.stdin), fresh(1, sys.stdout),
                                         fresh(2, sys.stderr))
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def report_exits(wakeup_r: int, children: dict[int, socket.socket],
                 message: Callable[[int], bytes]) -> None:
    """After SIGCHLD (``wakeup_r`` readable): reap every child that ended and send its caller
    ``message(exit status)`` (a signal as its negative number) on its socket, then close it.
    The warm task interpreter reaps its children with it too."""
    os.read(wakeup_r, 4096)
    while children:
        pid, wait_status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        conn = children.pop(pid)
        with contextlib.suppress(OSError):  # the caller may have stopped waiting
            conn.send(message(os.waitstatus_to_exitcode(wait_status)))
        conn.close()


def become_call(conn: socket.socket, request: bytes, fds: list[int]) -> int:
    """In the child: die with the caller, take its stdio, directory, environment and
    arguments, run the fake. Returns the exit status."""
    import fcntl

    import fakelib

    alive = fds[3]
    fcntl.fcntl(alive, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(alive, fcntl.F_SETFL, fcntl.fcntl(alive, fcntl.F_GETFL) | os.O_ASYNC |
                os.O_NONBLOCK)
    try:
        gone = os.read(alive, 1) == b""  # the caller ended before we could watch it
    except BlockingIOError:
        gone = False
    if gone:
        os.kill(os.getpid(), signal.SIGKILL)
    conn.close()  # the server holds it; the caller's liveness is the pipe's now
    for target in (0, 1, 2):
        os.dup2(fds[target], target)
    for fd in set(fds[:3]):
        if fd > 2:
            os.close(fd)
    count, *rest = request.split(b"\0")
    words = [os.fsdecode(w) for w in rest[:int(count)]]
    tool, cwd, argv0, argv = words[0], words[1], words[2], words[3:]
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(os.fsdecode(item).split("=", 1) for item in rest[int(count):])
    adopt_stdio()
    sys.argv = [argv0, *argv]
    return _exit_status(lambda: fakelib.main(tool, argv))


def _exit_status(run: Any) -> int:
    """Run the call; its exit status as the interpreter's shutdown would make it."""
    try:
        result = run()
    except SystemExit as exc:
        result = exc.code
    except KeyboardInterrupt:  # a fresh interpreter dies by the signal itself
        traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        result = 1
    except BaseException:
        traceback.print_exc()
        result = 1
    if result is None:
        code = 0
    elif isinstance(result, int):
        code = result & 0xFF
    else:
        print(result, file=sys.stderr)
        code = 1
    return 120 if not _flush() else code


def _flush() -> bool:
    ok = True
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            ok = False
    return ok


def main() -> None:
    _preload()
    import gc

    gc.collect()
    gc.freeze()  # the server's heap stays shared with its children
    call = serve(sys.argv[1])
    if call is not None:
        try:
            code = become_call(*call)
        except BaseException:
            traceback.print_exc()
            code = 70
        os._exit(code)  # the server's copy never goes through an interpreter shutdown


if __name__ == "__main__":
    main()
