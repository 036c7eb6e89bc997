"""A small Kubernetes-shaped HTTP server on 127.0.0.1 that misbehaves on purpose.

Each request is answered by the next scripted action queued for its method and path (then by the
default answer): refuse nothing here — a refused connection is a server not yet started — but
answer 429 with Retry-After, 5xx, a body cut short, a late answer, a 410 Gone, a watch stream,
and exec websockets that upgrade and then say nothing (or never finish the upgrade). Every
request is recorded with its arrival time, so tests can count retries and measure back-off.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3

DISCOVERY_V1 = {
    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
    "resources": [
        {"name": "configmaps", "singularName": "configmap", "namespaced": True,
         "kind": "ConfigMap", "verbs": ["create", "delete", "get", "list", "patch", "update",
                                        "watch"]},
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["get", "list", "watch"]},
        {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions",
         "verbs": ["create", "get"]},
    ],
}


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    at: float
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased


Action = Callable[["_Handler"], None]


def status(code: int, reason: str, message: str = "", headers: dict[str, str] | None = None,
           ) -> Action:
    """A metav1.Status error answer."""
    def act(h: _Handler) -> None:
        h.send_json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": message or reason, "reason": reason, "code": code},
                    headers)
    return act


def ok(body: Any) -> Action:
    return lambda h: h.send_json(200, body)


def truncated(body: Any) -> Action:
    """Content-Length promises the whole body; half of it arrives, then the connection closes."""
    def act(h: _Handler) -> None:
        data = json.dumps(body).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[: len(data) // 2])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)
    return act


def late(seconds: float, then: Action) -> Action:
    """Answer only after ``seconds`` (a read timeout for an impatient client)."""
    def act(h: _Handler) -> None:
        time.sleep(seconds)
        then(h)
    return act


def watch_events(*events: dict[str, Any]) -> Action:
    """A watch stream: one JSON event per line, then the server ends the stream."""
    def act(h: _Handler) -> None:
        data = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return act


def silent_exec(upgraded: threading.Event | None = None, delay: float = 0.0,
                answered: threading.Event | None = None) -> Action:
    """Accept the exec websocket (after ``delay``), then never send a frame. ``upgraded`` is set
    when the upgrade request arrives, ``answered`` once the 101 has been sent."""
    def act(h: _Handler) -> None:
        if upgraded is not None:
            upgraded.set()
        if delay and h.server_state.stopped.wait(delay):
            return
        key = h.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        h.send_response(101, "Switching Protocols")
        h.send_header("Upgrade", "websocket")
        h.send_header("Connection", "Upgrade")
        h.send_header("Sec-WebSocket-Accept", accept)
        h.send_header("Sec-WebSocket-Protocol", "v4.channel.k8s.io")
        h.end_headers()
        h.wfile.flush()
        if answered is not None:
            answered.set()
        h.server_state.stopped.wait()
        h.close_connection = True
    return act


def never_upgrade() -> Action:
    """Read the upgrade request and never answer it."""
    def act(h: _Handler) -> None:
        h.server_state.stopped.wait()
        h.close_connection = True
    return act


@dataclass
class _State:
    script: dict[tuple[str, str], list[Action]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: _State

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _serve(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        state = self.server_state
        with state.lock:
            state.seen.append(Seen(self.command, url.path, parse_qs(url.query), time.monotonic(),
                                   {k.lower(): v for k, v in self.headers.items()}))
            queue = state.script.get((self.command, url.path)) or []
            action = queue.pop(0) if queue else None
        if action is not None:
            action(self)
        elif url.path == "/api/v1":
            self.send_json(200, DISCOVERY_V1)
        elif url.path == "/version":
            self.send_json(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.1"})
        else:
            status(404, "NotFound", f"{url.path} not found")(self)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve


class FlakyApi:
    """Start with ``start()`` (optionally on a chosen port, e.g. after refusing for a while)."""

    def __init__(self) -> None:
        self.state = _State()
        self._server: ThreadingHTTPServer | None = None
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FlakyApi:
        handler = type("Handler", (_Handler,), {"server_state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self.state.stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def script(self, method: str, path: str, *actions: Action) -> None:
        with self.state.lock:
            self.state.script.setdefault((method, path), []).extend(actions)

    def seen(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        with self.state.lock:
            return [s for s in self.state.seen
                    if (method is None or s.method == method) and (path is None or s.path == path)]

    def write_kubeconfig(self, path: Path, context: str = "kind-flaky") -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "flaky", "cluster": {"server": self.url}}],
            "users": [{"name": "flaky", "user": {"token": "t"}}],
            "contexts": [{"name": context, "context": {"cluster": "flaky", "user": "flaky"}}],
        }))
        return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
