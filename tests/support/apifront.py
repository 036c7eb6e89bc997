"""What a real API server cannot do without nodes, in front of one: ``ApiFront``.

The lab's kubeconfig points at the front (plain HTTP on 127.0.0.1, a random free port, as the fake
``kind`` writes it). Every request is recorded (``requests``, ``writes()``), may be failed on
purpose (``fail_next``) or refused by a test's admission hook, and is otherwise forwarded unchanged
to the real ``kube-apiserver`` (``tests/support/envtest.py``) with its token; the answer, watches
included, is relayed as it came. Only pods' ``exec`` and ``portforward`` subresources are answered
here, for pods that exist on the real server: there is no kubelet behind a bare API server. They
are served over WebSocket (RFC 6455, the ``v5.channel.k8s.io``/``v4.channel.k8s.io`` channel
protocols that ``kubernetes.stream.stream`` and ``kubernetes.stream.portforward`` speak); what
runs is up to the test::

    front.on_exec(lambda ns, pod, container, command: (0, "hello\n", ""))
    front.on_portforward(lambda ns, pod, port: lambda data: b"echo:" + data)

``on_write`` callbacks run after each write the real server accepted, before the answer goes
back: a simulated controller reacts the way an informer-driven one would, only sooner. The
test-side calls (``get``, ``list``, ``put``, ``delete``, ``patch_status``, ``resource_type``) are
real requests too (``upstream``, an ``envtest.RealApi``).
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import copy
import hashlib
import http.client
import io
import json
import logging
import re
import select
import socket
import struct
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from lab import yamlio

__all__ = ["ApiError", "ApiFront", "ExecCall", "ExecCallback", "ExecOutput",
           "PortForwardCallback", "PortHandler", "RecordedRequest", "WriteCallback"]

JSON = dict[str, Any]
JSONList = list[JSON]
WriteCallback = Callable[[str, JSON], None]
"""Called as ``callback(verb, obj)``; verb is "create", "update", "patch" or "delete"."""
ExecOutput = tuple[int, str, str] | Iterable[tuple[int, str | bytes]]
"""What an exec handler returns: ``(returncode, stdout, stderr)`` at once, or an iterable of
``(channel, text)`` chunks (channel 1 stdout, 2 stderr) sent as they come; a generator may
``return returncode`` (default 0)."""
ExecCallback = Callable[[str, str, str, list[str]], ExecOutput]
"""Called as ``callback(namespace, pod, container, command)``."""
PortHandler = Callable[[bytes], bytes]
"""One forwarded connection: called with each chunk the client sends; returns the reply bytes."""
PortForwardCallback = Callable[[str, str, int], PortHandler | None]
"""Called as ``callback(namespace, pod, port)`` for each port of a port-forward; None: refused."""

log = logging.getLogger(__name__)

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
STDIN_CHANNEL, STDOUT_CHANNEL, STDERR_CHANNEL, ERROR_CHANNEL, RESIZE_CHANNEL = 0, 1, 2, 3, 4
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
PORTFORWARD_PROTOCOLS = ("v4.channel.k8s.io",)  # the kubelet's port-forward has no v5
STREAM_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/(exec|portforward)$")


class ApiError(Exception):
    """An error answered to the client as a ``Status`` body."""

    def __init__(self, code: int, reason: str, message: str,
                 details: JSON | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> JSON:
        body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                      "status": "Failure", "message": self.message, "reason": self.reason,
                      "code": self.code}
        if not self.reason:  # StatusReasonUnknown: left out, as a real server does
            del body["reason"]
        if self.details is not None:
            body["details"] = self.details
        return body


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# -- records --------------------------------------------------------------------------------------

class RecordedRequest(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    content_type: str


class ExecCall(NamedTuple):
    """One exec that ran (the query's ``command`` is repeated, so ``RecordedRequest.query`` keeps
    only its last word: read it here)."""

    namespace: str
    pod: str
    container: str  # as resolved: the only container when the request named none
    command: list[str]
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True
    tty: bool = False


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    error: ApiError
    remaining: int


# -- the front ------------------------------------------------------------------------------------

class ApiFront:
    """A real API server's front for exec, port-forward, recording and faults (module
    docstring); ``upstream`` is the ``envtest.RealApi`` of the server behind it."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self.callback_errors: builtins.list[BaseException] = []
        # a validating webhook the real server would call: (method, path) → refusal or None
        self.admission: Callable[[str, str], ApiError | None] | None = None
        self._reads = threading.local()
        self._meta_lock = threading.Lock()  # guards requests, faults and callbacks
        self._requests: builtins.list[RecordedRequest] = []
        self._faults: builtins.list[_Fault] = []
        self._callbacks: builtins.list[WriteCallback] = []
        self._exec_callback: ExecCallback | None = None
        self._portforward_callback: PortForwardCallback | None = None
        self._exec_calls: builtins.list[ExecCall] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> ApiFront:
        if self._server is None:
            self._server = _Server(self)
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name=f"api-front:{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ApiFront:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the front is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: str | Path, context: str = "kind-lab",
                         cluster_name: str | None = None) -> Path:
        """Add (or update) a cluster, user and context for this front in the kubeconfig at
        ``path``, keeping its other entries. current-context is set only if it had none."""
        target = Path(path)
        config: JSON = {}
        if target.exists():
            config = yamlio.load(target.read_text()) or {}
        cluster = cluster_name or context
        config.setdefault("apiVersion", "v1")
        config.setdefault("kind", "Config")
        config.setdefault("preferences", {})
        entries = {
            "clusters": {"name": cluster, "cluster": {"server": self.url}},
            "users": {"name": context, "user": {"token": "api-front"}},
            "contexts": {"name": context, "context": {"cluster": cluster, "user": context}},
        }
        for section, entry in entries.items():
            kept = [e for e in config.get(section) or [] if e.get("name") != entry["name"]]
            config[section] = [*kept, entry]
        if not config.get("current-context"):
            config["current-context"] = context
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(config, sort_keys=False))
        return target

    # -- recording, faults, hooks -----------------------------------------------------------------

    @property
    def requests(self) -> builtins.list[RecordedRequest]:
        """A snapshot of every request received, oldest first."""
        with self._meta_lock:
            return list(self._requests)

    def writes(self) -> builtins.list[RecordedRequest]:
        """The recorded POST/PUT/PATCH/DELETE requests."""
        return [r for r in self.requests if r.method in MUTATING_METHODS]

    def clear_requests(self) -> None:
        """Forget the recorded requests (and exec calls)."""
        with self._meta_lock:
            self._requests.clear()
            self._exec_calls.clear()

    def on_write(self, callback: WriteCallback) -> WriteCallback:
        """Call ``callback(verb, obj)`` after each successful write made through the API (not
        through ``put``/``patch_status``/``delete``), before the response is sent and it may use
        the API or the test-side methods."""
        with self._meta_lock:
            self._callbacks.append(callback)
        return callback

    def on_exec(self, callback: ExecCallback | None) -> ExecCallback | None:
        """Run ``callback(namespace, pod, container, command)`` for each pod exec; it returns
        ``(returncode, stdout, stderr)``, or an iterable of ``(channel, text)`` chunks (channel 1
        stdout, 2 stderr) that are sent as they come, e.g. a generator emulating a followed
        ``hubble observe`` (it may ``return returncode``; it is closed when the client leaves).
        The latest callback replaces the previous one; None unregisters (exec then answers 126).
        A callback that raises ends the exec with an ``InternalError`` status, as a failing
        container runtime would, and lands in ``callback_errors``. What the client sends (stdin,
        resize) is read and dropped; with ``tty=true`` stderr goes out on stdout."""
        with self._meta_lock:
            self._exec_callback = callback
        return callback

    def on_portforward(self, callback: PortForwardCallback | None) -> PortForwardCallback | None:
        """Serve pod port-forwards: ``callback(namespace, pod, port)`` is called for each port of
        each forward (one per forwarded connection) and returns a handler called with every chunk
        the client sends, whose returned bytes are sent back; None (or no callback) means nothing
        listens there: the client gets the "connection refused" error on that port's error
        channel. The latest callback replaces the previous one."""
        with self._meta_lock:
            self._portforward_callback = callback
        return callback

    @property
    def exec_calls(self) -> builtins.list[ExecCall]:
        """A snapshot of the execs that ran (past the pod/container checks), oldest first."""
        with self._meta_lock:
            return list(self._exec_calls)

    def fail_next(self, method: str, path_regex: str, code: int, reason: str,
                  count: int = 1, message: str = "") -> None:
        """Answer the next ``count`` requests whose method matches (``"*"``: any) and whose path
        matches ``path_regex`` (re.search) with a ``Status`` error."""
        error = ApiError(code, reason, message or f"injected failure ({reason})", {})
        with self._meta_lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), error, count))

    def _record(self, request: RecordedRequest) -> None:
        with self._meta_lock:
            self._requests.append(request)

    def _injected_fault(self, method: str, path: str) -> ApiError | None:
        with self._meta_lock:
            for fault in self._faults:
                if fault.method in ("*", method) and fault.pattern.search(path):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault.error
        return None

    def _run_callbacks(self, writes: builtins.list[tuple[str, JSON]]) -> None:
        with self._meta_lock:
            callbacks = list(self._callbacks)
        for verb, obj in writes:
            for callback in callbacks:
                try:
                    callback(verb, copy.deepcopy(obj))
                except Exception as exc:  # a test helper failing must not kill the server
                    log.exception("on_write callback failed")
                    self.callback_errors.append(exc)

    # -- test-side calls: real requests to the server behind --------------------------------------

    # A controller pass reads the same objects many times: ``cached_reads()`` lets one thread
    # keep what it read until it writes (like an informer cache, without the lag).

    @contextlib.contextmanager
    def cached_reads(self) -> Iterator[None]:
        outer = getattr(self._reads, "cache", None)
        if outer is None:
            self._reads.cache = {}
        try:
            yield
        finally:
            if outer is None:
                self._reads.cache = None

    def forget_reads(self, api_version: str | None = None, kind: str | None = None) -> None:
        """Drop what this thread read of ``kind`` (everything when None): a write changes only
        objects of its own kind on a bare API server, where no controller runs."""
        cache = getattr(self._reads, "cache", None)
        if cache is None:
            return
        if kind is None:
            cache.clear()
        else:
            for key in [k for k in cache if k[1:3] == (api_version, kind)]:
                del cache[key]

    def _cached(self, key: tuple[Any, ...], read: Callable[[], Any]) -> Any:
        cache = getattr(self._reads, "cache", None)
        if cache is None:
            return read()
        if key not in cache:
            cache[key] = read()
        return copy.deepcopy(cache[key])

    def put(self, obj: JSON) -> JSON:
        self.forget_reads(obj.get("apiVersion"), obj.get("kind"))
        result: JSON = self.upstream.put(obj)
        return result

    def get(self, api_version: str, kind: str, name: str,
            namespace: str | None = None) -> JSON | None:
        result: JSON | None = self._cached(
            ("get", api_version, kind, name, namespace),
            lambda: self.upstream.get(api_version, kind, name, namespace))
        return result

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str = "") -> JSONList:
        result: JSONList = self._cached(
            ("list", api_version, kind, namespace, label_selector),
            lambda: self.upstream.list(api_version, kind, namespace, label_selector))
        return result

    def delete(self, api_version: str, kind: str, name: str,
               namespace: str | None = None) -> bool:
        self.forget_reads(api_version, kind)
        return bool(self.upstream.delete(api_version, kind, name, namespace))

    def patch_status(self, api_version: str, kind: str, name: str, namespace: str | None,
                     status: JSON) -> JSON:
        self.forget_reads(api_version, kind)
        result: JSON = self.upstream.patch_status(api_version, kind, name, namespace, status)
        return result

    def resource_type(self, api_version: str, kind: str) -> Any:
        return self.upstream.resource_type(api_version, kind)

    def _stream_pod(self, namespace: str, name: str) -> JSON:
        pod = self.upstream.get("v1", "Pod", name, namespace)
        if pod is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found',
                           {"name": name, "kind": "pods"})
        return dict(pod)

    # -- exec and port-forward --------------------------------------------------------------------

    def _exec_call(self, namespace: str, name: str, query: dict[str, builtins.list[str]]
                   ) -> ExecCall:
        """Validate an exec request like the API server does. Raises ApiError."""
        def flag(key: str) -> bool:
            return (query.get(key) or [""])[-1].lower() in ("true", "1")

        spec = self._stream_pod(namespace, name).get("spec") or {}
        container = (query.get("container") or [""])[-1]
        names = [str(c.get("name")) for c in spec.get("containers") or []]
        others = [str(c.get("name")) for key in ("initContainers", "ephemeralContainers")
                  for c in spec.get(key) or []]
        # a real pod has at least one container; one without is a test's shorthand: anything goes
        if names and not container:
            if len(names) > 1:
                init = [str(c.get("name")) for c in spec.get("initContainers") or []]
                message = (f"a container name must be specified for pod {name}, choose one of: "
                           f"[{' '.join(names)}]")
                if init:
                    message += f" or one of the init containers: [{' '.join(init)}]"
                raise _bad_request(message)
            container = names[0]
        elif names and container not in names + others:
            raise _bad_request(f"container {container} is not valid for pod {name}")
        call = ExecCall(namespace, name, container, list(query.get("command") or []),
                        stdin=flag("stdin"), stdout=flag("stdout"), stderr=flag("stderr"),
                        tty=flag("tty"))
        if not (call.stdin or call.stdout or call.stderr):
            raise _bad_request("you must specify at least 1 of stdin, stdout, stderr")
        return call

    def _exec_output(self, call: ExecCall) -> Generator[tuple[int, bytes], None, JSON]:
        """Run the exec handler: yields (channel, data) chunks, returns the final Status (what
        the server sends on the error channel)."""
        with self._meta_lock:
            self._exec_calls.append(call)
            callback = self._exec_callback
        if callback is None:
            yield STDERR_CHANNEL, b"no exec handler registered in the front"
            return _exit_status(126, call.command)
        chunks: Any = None
        try:
            result: Any = callback(call.namespace, call.pod, call.container, list(call.command))
            if isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], int):
                returncode, out, err = result
                if out:
                    yield STDOUT_CHANNEL, _to_bytes(out)
                if err:
                    yield STDERR_CHANNEL, _to_bytes(err)
                return _exit_status(int(returncode), call.command)
            chunks = iter(result)
            while True:
                try:
                    channel, text = next(chunks)
                except StopIteration as stop:
                    value = stop.value
                    return _exit_status(value if isinstance(value, int) else 0, call.command)
                if channel not in (STDOUT_CHANNEL, STDERR_CHANNEL):
                    raise ValueError(f"exec output channel must be 1 (stdout) or 2 (stderr), "
                                     f"not {channel!r}")
                yield channel, _to_bytes(text)
        except Exception as exc:  # a test helper failing must not kill the server
            log.exception("on_exec callback failed")
            self.callback_errors.append(exc)
            cause = f"error executing command in container: {exc}"
            return {"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
                    "message": f"Internal error occurred: {cause}",
                    "details": {"causes": [{"message": cause}]}}
        finally:
            if chunks is not None and hasattr(chunks, "close"):
                chunks.close()  # the client left early: let a generator clean up

    def _portforward_ports(self, namespace: str, name: str,
                           query: dict[str, builtins.list[str]]) -> builtins.list[int]:
        """Validate a port-forward request. Raises ApiError."""
        self._stream_pod(namespace, name)
        ports: builtins.list[int] = []
        for text in (p.strip() for value in query.get("ports") or [] for p in value.split(",")):
            if not text.isdigit() or not 0 < int(text) < 65536:
                raise _bad_request(f"invalid port {text!r}: must be between 1 and 65535")
            ports.append(int(text))
        if not ports:
            raise _bad_request('query parameter "ports" is required')
        return ports

    def _port_handler(self, namespace: str, pod: str, port: int) -> PortHandler | None:
        with self._meta_lock:
            callback = self._portforward_callback
        if callback is None:
            return None
        try:
            return callback(namespace, pod, port)
        except Exception as exc:
            log.exception("on_portforward callback failed")
            self.callback_errors.append(exc)
            return None

    def _forward(self, namespace: str, pod: str, port: int, handler: PortHandler | None,
                 data: bytes) -> tuple[bytes, str]:
        """(reply, "") or (b"", the error the server sends on the port's error channel)."""
        failed = f"error forwarding port {port} to pod {namespace}/{pod}"
        if handler is None:
            return b"", f"{failed}: dial tcp4 127.0.0.1:{port}: connect: connection refused"
        try:
            return bytes(handler(data) or b""), ""
        except Exception as exc:
            log.exception("port-forward handler failed")
            self.callback_errors.append(exc)
            return b"", f"{failed}: {exc}"


def _to_bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else str(text).encode()


def _exit_status(returncode: int, command: builtins.list[str]) -> JSON:
    """The Status the kubelet sends on the error channel when the command ends."""
    if returncode == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command "
                       f"[{' '.join(command)}], exit code {returncode}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(returncode)}]}}


# -- WebSocket (RFC 6455), server side ------------------------------------------------------------

def _unmask(data: bytes, key: bytes) -> bytes:
    if not data:
        return data
    mask = (key * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(mask, "big")).to_bytes(len(data), "big")


class _WebSocket:
    """A server's end of a WebSocket: unmasked unfragmented frames out, masked (possibly
    fragmented) frames in; pings answered, a close answered once. ``send`` may be called from
    one thread while another one reads."""

    def __init__(self, rfile: io.BufferedIOBase, wfile: io.BufferedIOBase) -> None:
        self._rfile, self._wfile = rfile, wfile
        self._send_lock = threading.Lock()
        self.close_sent = False
        self.peer_gone = threading.Event()  # the peer sent a close, or the connection dropped

    def send(self, payload: bytes, opcode: int = OP_BINARY) -> None:
        """Send one frame; nothing once a close was sent. Raises OSError."""
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x80 | opcode, size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
        with self._send_lock:
            if self.close_sent:
                return
            self.close_sent = opcode == OP_CLOSE
            self._wfile.write(header + payload)

    def send_channel(self, channel: int, data: bytes) -> None:
        self.send(bytes([channel]) + data)

    def close(self, code: int = 1000) -> None:
        with contextlib.suppress(OSError):
            self.send(struct.pack("!H", code), OP_CLOSE)

    def _read(self, size: int) -> bytes:
        data = self._rfile.read(size) if size else b""
        if len(data) < size:
            raise EOFError
        return data

    def receive(self) -> tuple[int, bytes] | None:
        """The next data message as (opcode, payload), or None once the peer closed (its close
        answered) or the connection dropped."""
        opcode, message = OP_BINARY, b""
        try:
            while True:
                first, second = self._read(2)
                fin, op = first & 0x80, first & 0x0F
                size = second & 0x7F
                if size == 126:
                    size = struct.unpack("!H", self._read(2))[0]
                elif size == 127:
                    size = struct.unpack("!Q", self._read(8))[0]
                if not second & 0x80:  # clients must mask their frames
                    self.close(1002)
                    break
                key = self._read(4)
                payload = _unmask(self._read(size), key)
                if op == OP_PING:
                    self.send(payload, OP_PONG)
                elif op == OP_CLOSE:
                    self.close(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2
                               else 1000)
                    break
                elif op != OP_PONG:
                    if op != OP_CONTINUATION:
                        opcode, message = op, b""
                    message += payload
                    if fin:
                        return opcode, message
        except (OSError, EOFError, ValueError):  # ValueError: the file was closed under us
            pass
        self.peer_gone.set()
        return None

    def drain(self) -> None:
        """Read and drop data messages (exec's stdin and resize) until the peer leaves."""
        while self.receive() is not None:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, front: ApiFront) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.front = front
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients dropping connections (and stop()) are normal here: no stderr tracebacks."""
        log.debug("api front connection error", exc_info=True)

    def close_connections(self) -> None:
        """Unblock the handler threads still waiting on kept-alive connections."""
        with self.connections_lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every reply has a length or is chunked
    disable_nagle_algorithm = True  # else each header/body write pair waits ~40 ms for an ACK
    server_version = "api-front"
    sys_version = ""
    server: _Server
    _upstream_conn: http.client.HTTPSConnection | None = None  # kept alive per connection

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return body
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        front = self.server.front
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        raw = self._read_body()
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        front._record(RecordedRequest(self.command, url.path, query, content_type))
        stream = STREAM_PATH.match(url.path)
        if stream is not None and self.command in ("GET", "POST"):
            self._serve_stream(front, url.path, unquote(stream[1]), unquote(stream[2]),
                               stream[3], parse_qs(url.query, keep_blank_values=True))
            return
        fault = front._injected_fault(self.command, url.path)
        if fault is None and front.admission is not None \
                and self.command in ("POST", "PUT", "PATCH"):
            fault = front.admission(self.command, url.path)
        if fault is not None:
            self._send(fault.code, fault.status())
        else:
            self._proxy(front, raw, query)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def _send(self, code: int, body: JSON) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve_stream(self, front: ApiFront, path: str, namespace: str, pod: str,
                      subresource: str, query: dict[str, builtins.list[str]]) -> None:
        """Check the request the way the API server does (pod, container, upgrade, protocol),
        answering errors as plain HTTP, then upgrade and run the exec or port-forward."""
        offered = [p.strip() for value in self.headers.get_all("Sec-WebSocket-Protocol") or []
                   for p in value.split(",") if p.strip()]
        supported = EXEC_PROTOCOLS if subresource == "exec" else PORTFORWARD_PROTOCOLS
        try:
            fault = front._injected_fault(self.command, path)
            if fault is not None:
                raise fault
            if subresource == "exec":
                target: ExecCall | builtins.list[int] = front._exec_call(namespace, pod, query)
            else:
                target = front._portforward_ports(namespace, pod, query)
            if (self.headers.get("Upgrade") or "").lower() != "websocket" \
                    or "upgrade" not in (self.headers.get("Connection") or "").lower():
                raise _bad_request("Upgrade request required")
            key = self.headers.get("Sec-WebSocket-Key") or ""
            if self.headers.get("Sec-WebSocket-Version") != "13" or not key:
                raise _bad_request("a WebSocket upgrade needs Sec-WebSocket-Key and "
                                   "Sec-WebSocket-Version: 13")
            protocol = next((p for p in offered if p in supported), None)
            if protocol is None:
                raise _bad_request(f"requested protocol(s) are not supported: {offered}; "
                                   f"supports {list(supported)}")
        except ApiError as err:
            self._send(err.code, err.status())
            return
        digest = hashlib.sha1((key + WS_GUID).encode(), usedforsecurity=False).digest()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", base64.b64encode(digest).decode())
        self.send_header("Sec-WebSocket-Protocol", protocol)
        self.end_headers()
        self.close_connection = True
        ws = _WebSocket(self.rfile, self.wfile)
        try:
            if isinstance(target, ExecCall):
                self._run_exec(front, ws, target)
            else:
                self._run_portforward(front, ws, namespace, pod, target)
        except OSError:  # the client went away (or the front stopped)
            pass

    def _run_exec(self, front: ApiFront, ws: _WebSocket, call: ExecCall) -> None:
        reader = threading.Thread(target=ws.drain, daemon=True,
                                  name=f"api-front-exec:{call.namespace}/{call.pod}")
        reader.start()
        output = front._exec_output(call)
        try:
            while not ws.peer_gone.is_set():
                try:
                    channel, data = next(output)
                except StopIteration as stop:
                    ws.send_channel(ERROR_CHANNEL, json.dumps(stop.value).encode())
                    break
                if call.tty and channel == STDERR_CHANNEL:  # a terminal has one output stream
                    channel = STDOUT_CHANNEL
                if call.stdout if channel == STDOUT_CHANNEL else call.stderr:
                    ws.send_channel(channel, data)
        finally:
            output.close()
            ws.close()
            reader.join(timeout=2)  # the client's answering close
            if reader.is_alive():
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                reader.join(timeout=1)

    def _run_portforward(self, front: ApiFront, ws: _WebSocket, namespace: str, pod: str,
                         ports: builtins.list[int]) -> None:
        """Channel 2i carries port i's data, 2i+1 its errors; each starts with a frame holding
        the port number (uint16, little-endian)."""
        handlers = [front._port_handler(namespace, pod, port) for port in ports]
        failed: set[int] = set()
        for index, port in enumerate(ports):
            ws.send_channel(2 * index, port.to_bytes(2, "little"))
            ws.send_channel(2 * index + 1, port.to_bytes(2, "little"))
        while (message := ws.receive()) is not None:
            data = message[1]
            if not data or data[0] % 2 or data[0] // 2 >= len(ports) or data[0] in failed:
                continue
            index = data[0] // 2
            reply, error = front._forward(namespace, pod, ports[index], handlers[index],
                                             data[1:])
            if error:
                failed.add(data[0])
                ws.send_channel(data[0] + 1, error.encode())
            elif reply:
                ws.send_channel(data[0], reply)
        ws.close()

    # -- everything else goes to the real API server -----------------------------------------------

    def _upstream(self, front: ApiFront, watch: bool) -> http.client.HTTPSConnection:
        up = front.upstream
        if watch:
            return http.client.HTTPSConnection(up.host, up.port, context=up.ssl_context)
        conn = self._upstream_conn
        if conn is None:
            conn = http.client.HTTPSConnection(up.host, up.port, context=up.ssl_context,
                                               timeout=60)
            self._upstream_conn = conn
        return conn

    def _proxy(self, front: ApiFront, raw: bytes, query: dict[str, str]) -> None:
        """Forward the request as it came (the real server's token instead of the client's
        credentials) and relay the answer; a watch is relayed chunk by chunk."""
        watch = query.get("watch", "").lower() in ("true", "1")
        headers = {k: v for k in ("Content-Type", "Accept", "User-Agent")
                   if (v := self.headers.get(k))}
        headers["Authorization"] = f"Bearer {front.upstream.token}"
        conn = self._upstream(front, watch)
        try:
            conn.request(self.command, self.path, body=raw if raw else None, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._upstream_conn = None
            conn = self._upstream(front, watch)
            conn.request(self.command, self.path, body=raw if raw else None, headers=headers)
            resp = conn.getresponse()
        if watch and resp.status == 200:
            self.send_response(200)
            self.send_header("Content-Type", resp.headers.get("Content-Type",
                                                              "application/json"))
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while data := resp.read1(65536):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:  # the client went away
                self.close_connection = True
            finally:
                conn.close()
            return
        data = resp.read()
        if watch:
            conn.close()
        self.send_response(resp.status)
        for name in ("Content-Type", "Warning", "Audit-Id"):
            for value in resp.headers.get_all(name) or []:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if self.command in MUTATING_METHODS and resp.status < 300 and not query.get("dryRun"):
            try:
                obj = json.loads(data) if data else {}
            except ValueError:
                obj = {}
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                    "DELETE": "delete"}[self.command]
            front._run_callbacks([(verb, obj if isinstance(obj, dict) else {})])

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True
