"""What `tests/fakes/bin/{kind,docker,helm}` run: the call is handed to the warm fake server when
one is running (``$LAB_FAKE_WARM``, see ``warmfakes.py``), else the fake runs right here.

A fake call spends ~30 ms of CPU starting an interpreter and importing ``fakelib`` (json, re,
…) for ~3 ms of work, and a run of the suite makes some 1,700 of them. Handed over, the call runs
in a child the server forks, with this process's stdin/stdout/stderr, working directory,
environment and arguments; this process waits and exits as the child did. It dies with its
caller as a fake would: the child is killed (SIGIO) the moment this process is gone, whether it
exited or was killed.

Imports nothing ``python3 -S`` has not loaded already but the built-in ``_socket`` and
``_signal``: the point is to start in a few milliseconds. ``launch.c`` is the same launcher in C,
used instead where the test session could build it.
"""

import os
import sys

WARM_ENV = "LAB_FAKE_WARM"  # the warm fake server's socket, set by the test session


def main(tool: str) -> None:
    address = os.environ.get(WARM_ENV)
    if address:
        code = _hand_over(address, tool)
        if code is not None:
            _exit_as(code)
    import fakelib

    sys.exit(fakelib.main(tool, sys.argv[1:]))


def _hand_over(address: str, tool: str) -> "int | None":
    """The child's exit status (negative: the signal that ended it), or None where the call was
    not handed over (no server, a closed stdio descriptor): then it runs here."""
    import _socket

    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
        words = [tool, os.getcwd(), sys.argv[0], *sys.argv[1:]]
    except OSError:
        return None
    request = b"\0".join([str(len(words)).encode(), *map(os.fsencode, words),
                          *(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in os.environ.items())])
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    # The child watches the read end: its O_ASYNC signal fires when the write end closes, which
    # it does only when this process ends.
    alive_r, alive_w = os.pipe()
    fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in (0, 1, 2, alive_r))
    try:
        conn.connect(address)
        conn.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
    except OSError:
        for fd in (alive_r, alive_w):
            os.close(fd)
        conn.close()
        return None
    os.close(alive_r)
    reply = conn.recv(64)
    if reply == b"r":  # the server could not start a child: run the call here
        conn.close()
        os.close(alive_w)
        return None
    if not reply.startswith(b"x"):
        sys.stderr.write(f"fake {tool}: the warm fake server ended during the call\n")
        return 70
    return int(reply[1:])


def _exit_as(code: int) -> None:
    if code >= 0:
        os._exit(code)
    import _signal

    _signal.signal(-code, _signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    os._exit(128 - code)
