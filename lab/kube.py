"""The one module that talks to the Kubernetes API (and the only one importing ``kubernetes``).

A thin, generic client: objects are plain dicts addressed by apiVersion + kind, resolved through
API discovery (so CRDs installed moments ago work), written with server-side apply. Every
``ApiException`` is mapped to a typed error; the ``kubernetes`` package is imported lazily because
its import alone costs about half a second, which every ``invoke`` call would otherwise pay.
"""

from __future__ import annotations

import builtins
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from lab import logs
from lab.errors import LabError

FIELD_MANAGER = "kind-cilium-lab"
Obj = dict[str, Any]

# Transient failures are retried with doubling delays for up to RETRY_BUDGET seconds per call:
# long enough to ride out an API server restart, short enough that a gate's own deadline rules.
RETRY_BUDGET = 30.0
RETRY_FIRST_DELAY = 0.25
RETRY_MAX_DELAY = 5.0
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_REPEATABLE_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})
MAX_RELISTS = 3  # a watch that expires again right after each re-list gives up
_REPEATABLE_PATCHES = frozenset({"application/apply-patch+yaml", "application/merge-patch+json"})


class KubeError(LabError):
    """An API call failed. ``status`` is the HTTP code (0 when the server was not reached)."""

    status = 0

    def __init__(self, message: str, hint: str = "", status: int = 0,
                 reason: str = "") -> None:
        super().__init__(message, hint)
        self.status = status
        self.reason = reason
        # Set where the failure is worth another attempt (see KubeClient.request).
        self.retry_after: float | None = None
        self.unsent = False  # the request never reached the server: safe to send again
        self.transient = False


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Forbidden(KubeError):
    pass


class Invalid(KubeError):
    pass


class Unreachable(KubeError):
    """The API server did not answer (cluster down, wrong kubeconfig, network)."""


class Unavailable(KubeError):
    """The API server answered 5xx or 429: worth retrying."""


def _map_api_exception(exc: Any, doing: str) -> KubeError:
    status = int(getattr(exc, "status", 0) or 0)
    body = getattr(exc, "body", None)
    message, reason = "", ""
    if body:
        try:
            parsed = json.loads(body)
            message = parsed.get("message", "")
            reason = parsed.get("reason", "")
        except (ValueError, AttributeError):
            message = str(body)[:300]
    text = f"{doing}: {message or getattr(exc, 'reason', '') or 'HTTP ' + str(status)}"
    cls: type[KubeError] = {404: NotFound, 409: Conflict, 403: Forbidden, 401: Forbidden,
                            422: Invalid, 400: Invalid, 429: Unavailable}.get(status, KubeError)
    if status >= 500:
        cls = Unavailable
    hint = {
        401: "the kubeconfig credentials were refused: re-export them with "
             "`kind export kubeconfig --name <cluster>`",
        403: "the kubeconfig user lacks permission for this",
        422: "the object was rejected by the API server's validation",
    }.get(status, "")
    return cls(text, hint, status=status, reason=reason)


@dataclass(frozen=True)
class Resource:
    group_version: str
    plural: str
    kind: str
    namespaced: bool

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/api/{self.group_version}" if "/" not in self.group_version else \
            f"/apis/{self.group_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name)}"
        if subresource:
            base += f"/{subresource}"
        return base


class KubeClient:
    """Generic access to one cluster, by kubeconfig context."""

    def __init__(self, context: str, kubeconfig: str | None = None,
                 request_timeout: float = 15.0, retry_budget: float = RETRY_BUDGET) -> None:
        self.context = context
        self.kubeconfig = kubeconfig
        self.request_timeout = request_timeout
        self.retry_budget = retry_budget
        self._down_until = 0.0  # until then the server is taken as down: no retries
        self._api: Any = None
        self._resources: dict[tuple[str, str], Resource] = {}
        self._discovered: set[str] = set()
        self._lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = self._new_api_client()
        return self._api

    def _new_api_client(self) -> Any:
        from kubernetes import client as kclient
        from kubernetes import config as kconfig  # lazy: see module docstring
        from kubernetes.config.config_exception import ConfigException

        configuration = kclient.Configuration()
        try:
            kconfig.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=self.kubeconfig, context=self.context,
                client_configuration=configuration, persist_config=False)
        except (ConfigException, OSError) as exc:
            raise Unreachable(
                f"no usable kubeconfig context {self.context!r} ({exc})",
                f"export it with `kind export kubeconfig --name "
                f"{self.context.removeprefix('kind-')}` or run `invoke lab.up`",
            ) from exc
        # The retry policy is request()'s alone: urllib3's own retries would sleep out any
        # Retry-After unbounded and hide the attempts from the budget.
        configuration.retries = False
        return kclient.ApiClient(configuration)

    def stream_client(self) -> Any:
        """A fresh ApiClient for one websocket stream (exec, port-forward), with the shared
        configuration: a stream (and its thread) never shares state with the REST calls made
        meanwhile. The caller closes it."""
        from kubernetes import client as kclient

        return kclient.ApiClient(self.api.configuration)

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    def request(self, method: str, path: str, *, query: list[tuple[str, Any]] | None = None,
                body: Any = None, content_type: str = "application/json",
                doing: str = "", stream: bool = False, timeout: float | None = None,
                retry: bool = True) -> Any:
        """One API call, retried while the failure is transient and the budget lasts.

        Returns parsed JSON (or the raw response when ``stream``). Any request is sent again when
        it never reached the server (connection refused while the API server restarts) or was
        refused with 429 (after its Retry-After); a request that may have been applied already
        (5xx, a read timeout, a body cut short) is sent again only when repeating it converges
        to the same result: reads, deletes, puts, server-side apply and merge patches."""
        doing = doing or f"{method} {path}"
        repeatable = method in _REPEATABLE_METHODS or (
            method == "PATCH" and content_type in _REPEATABLE_PATCHES)
        # Once a server has stayed unreachable for a whole budget, the next calls try once:
        # a status of a stopped cluster must not wait out the budget for every object it reads.
        budget = self.retry_budget if retry and time.monotonic() >= self._down_until else 0.0
        deadline = time.monotonic() + budget
        delay = RETRY_FIRST_DELAY
        while True:
            try:
                result = self._request_once(method, path, query, body, content_type, doing,
                                            stream, timeout)
                self._down_until = 0.0
                return result
            except KubeError as exc:
                if not exc.transient or not (repeatable or exc.unsent):
                    raise
                wait = exc.retry_after if exc.retry_after is not None else delay
                if time.monotonic() + wait > deadline:
                    if exc.unsent and budget:
                        self._down_until = time.monotonic() + self.retry_budget
                    raise
                time.sleep(wait)
                delay = min(delay * 2, RETRY_MAX_DELAY)

    def _request_once(self, method: str, path: str, query: list[tuple[str, Any]] | None,
                      body: Any, content_type: str, doing: str, stream: bool,
                      timeout: float | None) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import ConnectTimeoutError, MaxRetryError
        from urllib3.exceptions import HTTPError as Urllib3Error

        api = self.api
        headers = {"Accept": "application/json", "Content-Type": content_type}
        # JSON bodies go as Python objects (the client encodes them once); an apply patch goes as
        # a JSON string, which the client sends untouched under the YAML content type.
        payload = json.dumps(body) if content_type.endswith("+yaml") and body is not None \
            and not isinstance(body, str) else body
        req = api.param_serialize(method, path, query_params=query or [], header_params=headers,
                                  body=payload, auth_settings=["BearerToken"])
        read_timeout = timeout if timeout is not None else self.request_timeout
        try:
            resp = api.call_api(*req, _request_timeout=(5.0, read_timeout))
        except ApiException as exc:
            raise _map_api_exception(exc, doing) from exc
        except (Urllib3Error, OSError) as exc:
            cause = exc.reason if isinstance(exc, MaxRetryError) else exc
            raise self._unreachable(doing, exc, unsent=isinstance(
                cause, (ConnectTimeoutError, ConnectionRefusedError))) from exc
        try:
            if not 200 <= resp.status <= 299:
                resp.read()
                try:
                    ApiException.from_response(http_resp=resp, body=None, data=None)  # raises
                except ApiException as exc:
                    error = _map_api_exception(exc, doing)
                    error.transient = resp.status in TRANSIENT_STATUS
                    error.retry_after = _retry_after(resp.getheader("Retry-After"))
                    error.unsent = resp.status == 429  # refused before it was processed
                    raise error from exc
            if stream:
                return resp.response
            raw = resp.read()
            return json.loads(raw) if raw else {}
        except (Urllib3Error, OSError, ValueError) as exc:  # the body broke off or is not JSON
            raise self._unreachable(doing, exc, unsent=False) from exc

    def _unreachable(self, doing: str, exc: BaseException, unsent: bool) -> Unreachable:
        error = Unreachable(
            f"{doing}: the API server of context {self.context!r} did not answer ({exc})",
            "check that the cluster's containers run (`docker ps`), or run "
            "`invoke lab.up --resume` to let the lab re-detect and repair it")
        error.transient, error.unsent = True, unsent
        return error

    # -- discovery --------------------------------------------------------------------------------

    def resource(self, api_version: str, kind: str) -> Resource:
        key = (api_version, kind)
        if key in self._resources:
            return self._resources[key]
        self._discover(api_version, refresh=api_version in self._discovered)
        if key not in self._resources:
            raise NotFound(f"the API server does not serve {kind} in {api_version}",
                           "install the CRD that defines it (an earlier step may not have run)",
                           status=404)
        return self._resources[key]

    def _discover(self, api_version: str, refresh: bool = False) -> None:
        with self._lock:
            if api_version in self._discovered and not refresh:
                return
            path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
            try:
                data = self.request("GET", path, doing=f"discovering {api_version}")
            except NotFound:
                self._discovered.add(api_version)
                return
            for r in data.get("resources", []):
                if "/" in r["name"]:
                    continue
                self._resources[(api_version, r["kind"])] = Resource(
                    api_version, r["name"], r["kind"], bool(r.get("namespaced")))
            self._discovered.add(api_version)

    def serves(self, api_version: str, kind: str) -> bool:
        try:
            self.resource(api_version, kind)
            return True
        except NotFound:
            return False

    # -- verbs ------------------------------------------------------------------------------------

    def version(self) -> Obj:
        return dict(self.request("GET", "/version", doing="asking the API server its version",
                                 timeout=5.0))

    def get(self, api_version: str, kind: str, name: str,
            namespace: str | None = None) -> Obj | None:
        res = self.resource(api_version, kind)
        try:
            return dict(self.request("GET", res.path(namespace, name),
                                     doing=f"reading {kind} {_ref(namespace, name)}"))
        except NotFound:
            return None

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str | None = None, field_selector: str | None = None) -> list[Obj]:
        res = self.resource(api_version, kind)
        query: list[tuple[str, Any]] = []
        if label_selector:
            query.append(("labelSelector", label_selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        data = self.request("GET", res.path(namespace), query=query,
                            doing=f"listing {kind} in {namespace or 'all namespaces'}")
        items: list[Obj] = data.get("items", [])
        return items

    def apply(self, obj: Obj, field_manager: str = FIELD_MANAGER, force: bool = True) -> Obj:
        """Server-side apply: creates or converges the fields this manager owns."""
        meta = obj.get("metadata", {})
        res = self.resource(obj["apiVersion"], obj["kind"])
        namespace = meta.get("namespace") if res.namespaced else None
        if res.namespaced and not namespace:
            raise Invalid(f"{obj['kind']} {meta.get('name')} needs a namespace")
        query = [("fieldManager", field_manager)] + ([("force", "true")] if force else [])
        return dict(self.request(
            "PATCH", res.path(namespace, meta["name"]), query=query, body=obj,
            content_type="application/apply-patch+yaml",
            doing=f"applying {obj['kind']} {_ref(namespace, meta['name'])}"))

    def patch(self, api_version: str, kind: str, name: str, patch: Any,
              namespace: str | None = None, patch_type: str = "merge",
              subresource: str | None = None) -> Obj:
        content_type = {"merge": "application/merge-patch+json",
                        "strategic": "application/strategic-merge-patch+json",
                        "json": "application/json-patch+json"}[patch_type]
        res = self.resource(api_version, kind)
        return dict(self.request("PATCH", res.path(namespace, name, subresource), body=patch,
                                 content_type=content_type,
                                 doing=f"patching {kind} {_ref(namespace, name)}"))

    def delete(self, api_version: str, kind: str, name: str,
               namespace: str | None = None) -> bool:
        """True when something was deleted, False when it was already gone."""
        res = self.resource(api_version, kind)
        try:
            self.request("DELETE", res.path(namespace, name),
                         doing=f"deleting {kind} {_ref(namespace, name)}")
            return True
        except NotFound:
            return False

    def exec(self, namespace: str, pod: str, command: builtins.list[str],
             container: str | None = None, timeout: float = 30.0) -> ExecResult:
        """Run a command in a pod (the API's exec subresource over a websocket)."""
        return _exec(self, namespace, pod, command, container, timeout)

    def exec_stream(self, namespace: str, pod: str, command: builtins.list[str],
                    container: str | None = None) -> Iterator[str]:
        """Run a command in a pod and yield its output as it arrives (e.g. a followed log)."""
        return _exec_stream(self, namespace, pod, command, container)

    def port_forward(self, namespace: str, pod: str, remote_port: int, local_port: int,
                     stop: threading.Event, address: str = "127.0.0.1",
                     on_listening: Callable[[str], None] | None = None) -> None:
        """Serve address:local_port → pod:remote_port until ``stop`` is set (blocks).

        ``on_listening`` gets "address:port" once connections are accepted, so a URL is shown
        only when it works (port 0 picks a free port)."""
        _port_forward(self, namespace, pod, remote_port, local_port, address, stop,
                      on_listening)

    def watch(self, api_version: str, kind: str, namespace: str | None = None,
              label_selector: str | None = None, field_selector: str | None = None,
              timeout_seconds: int = 30, resource_version: str | None = None,
              ) -> Iterator[tuple[str, Obj]]:
        """Yields (event type, object) until the server closes the stream.

        A resource version the server no longer has (410 Gone, as an answer or as an ERROR
        event) is not an error: the objects are listed again, each yielded as ``ADDED`` (treat
        ADDED as "upsert"), and the watch goes on from the list's resource version, as
        client-go's reflector does."""
        res = self.resource(api_version, kind)
        selectors: list[tuple[str, Any]] = []
        if label_selector:
            selectors.append(("labelSelector", label_selector))
        if field_selector:
            selectors.append(("fieldSelector", field_selector))
        where = namespace or "all namespaces"
        deadline = time.monotonic() + timeout_seconds
        version = resource_version
        for _ in range(MAX_RELISTS + 1):
            remaining = max(1, round(deadline - time.monotonic()))
            query = [("watch", "true"), ("timeoutSeconds", remaining), *selectors]
            if version:
                query.append(("resourceVersion", version))
            try:
                resp = self.request("GET", res.path(namespace), query=query, stream=True,
                                    timeout=remaining + 5, doing=f"watching {kind} in {where}")
            except KubeError as exc:
                if exc.status != 410:
                    raise
                resp = None
            if resp is not None:
                expired = False
                for type_, obj in _watch_events(resp, f"watching {kind} in {where}"):
                    if type_ == "ERROR" and obj.get("code") == 410:
                        expired = True
                        break
                    version = obj.get("metadata", {}).get("resourceVersion") or version
                    yield type_, obj
                if not expired:
                    return
            listed = self.request("GET", res.path(namespace), query=selectors,
                                  doing=f"listing {kind} in {where} again (the watch expired)")
            for obj in listed.get("items", []):
                yield "ADDED", obj
            version = listed.get("metadata", {}).get("resourceVersion")
        raise Unavailable(f"watching {kind} in {where}: the watch kept expiring",
                          "the API server's watch cache is under pressure; retry shortly")


@dataclass(frozen=True)
class ExecResult:
    returncode: int
    stdout: str
    stderr: str


def _ws_request(api: Any, path: str, query: list[tuple[str, Any]]) -> tuple[str, Any]:
    """URL (query included) and headers (the credentials) of a websocket subresource request,
    built the way every REST call is (``param_serialize``). The generated ``CoreV1Api`` would do
    the same, but importing it costs ~0.9 s of CPU on every task that execs."""
    _, url, headers, _, _ = api.param_serialize("GET", path, query_params=query,
                                                header_params={}, auth_settings=["BearerToken"])
    return url, headers


def _open_exec(api: Any, namespace: str, pod: str, command: list[str],
               container: str | None) -> Any:
    """The exec subresource's websocket (stdout and stderr, no stdin, no TTY) on ``api``, an
    ApiClient of the stream's own (see KubeClient.stream_client)."""
    from kubernetes.stream import ws_client

    query: list[tuple[str, Any]] = [("command", word) for word in command]
    if container:
        query.append(("container", container))
    query += [("stderr", "true"), ("stdin", "false"), ("stdout", "true"), ("tty", "false")]
    url, headers = _ws_request(api, f"/api/v1/namespaces/{quote(namespace)}/pods/"
                                    f"{quote(pod)}/exec", query)
    return ws_client.websocket_call(  # type: ignore[no-untyped-call]
        api.configuration, "GET", url, headers=headers, _preload_content=False)


def _within(deadline: float, open_: Callable[[], Any]) -> Any:
    """``open_()`` (a websocket handshake, which has no timeout of its own), or None when the
    deadline passes first; a handshake that completes later is closed by its thread."""
    box: dict[str, Any] = {}
    done, abandoned = threading.Event(), threading.Event()

    def run() -> None:
        try:
            box["value"] = open_()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
        finally:
            done.set()
            if abandoned.is_set() and "value" in box:
                box["value"].close(timeout=0)

    threading.Thread(target=run, name="exec-handshake", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        abandoned.set()
        if done.is_set() and "value" in box:  # finished between the wait and the flag
            box["value"].close(timeout=0)
        return None
    if "error" in box:
        raise box["error"]
    return box["value"]


def _exec(client: KubeClient, namespace: str, pod: str, command: list[str],
          container: str | None, timeout: float) -> ExecResult:
    """Run to completion or until ``timeout``: every wait below is bounded by one deadline."""
    # Imported before the clock starts: the first import of the websocket client takes a while.
    from kubernetes.client.exceptions import ApiException
    from kubernetes.stream import ws_client  # noqa: F401

    doing = f"running {command[0]} in {namespace}/{pod}"
    late = Unreachable(
        f"{doing}: no answer within {timeout:g}s (the stream stayed silent)",
        "the pod, its node or the API server is overloaded or the stream stalled; the gate "
        "asks again on its next poll — if it persists, look at the pod (`kubectl -n "
        f"{namespace} describe pod {pod}`)")
    deadline = time.monotonic() + timeout
    api = client.stream_client()
    resp: Any = None
    try:
        resp = _within(deadline, lambda: _open_exec(api, namespace, pod, command, container))
        if resp is None:
            raise late
        while resp.is_open():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise late
            # A frame that starts but never finishes must not block past the deadline either.
            resp.sock.settimeout(remaining)
            resp.update(timeout=remaining)
        out, err = resp.read_stdout(timeout=0) or "", resp.read_stderr(timeout=0) or ""
        status = resp.read_channel(ERROR_CHANNEL, timeout=0) or ""
    except KubeError:
        raise
    except ApiException as exc:
        raise _map_api_exception(exc, doing) from exc
    except Exception as exc:  # websocket errors carry no common base class
        if time.monotonic() >= deadline:
            raise late from exc
        raise Unreachable(f"{doing}: {exc}", "is the pod running?") from exc
    finally:
        if resp is not None:
            resp.close(timeout=0)  # no waiting for the server's close reply past the deadline
        api.close()
    return ExecResult(_exit_code(status, doing), out, err)


ERROR_CHANNEL = 3  # the exec protocol's status channel (v4.channel.k8s.io)


def _exit_code(status_text: str, doing: str) -> int:
    """The exit code from the exec's final Status (apimachinery remotecommand: Success, or a
    Failure whose cause of type ``ExitCode`` carries the code)."""
    if not status_text.strip():
        raise Unreachable(f"{doing}: the stream closed without an exit status",
                          "the API server or kubelet dropped the stream; retry")
    try:
        status = json.loads(status_text)
    except ValueError as exc:
        raise Unreachable(f"{doing}: unreadable exit status {status_text[:100]!r}") from exc
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            return int(cause.get("message", -1))
    raise KubeError(f"{doing}: {status.get('message') or status.get('reason') or status_text}",
                    "is the container running, and does it have that command?")


def _exec_stream(client: KubeClient, namespace: str, pod: str, command: list[str],
                 container: str | None) -> Iterator[str]:
    from kubernetes.client.exceptions import ApiException

    api = client.stream_client()
    try:
        try:
            resp = _open_exec(api, namespace, pod, command, container)
        except ApiException as exc:
            raise _map_api_exception(exc, f"running {command[0]} in {namespace}/{pod}") from exc
        try:
            while resp.is_open():
                try:
                    resp.update(timeout=1)
                except Exception as exc:  # websocket errors carry no common base class
                    raise Unreachable(f"the stream from {namespace}/{pod} broke: {exc}",
                                      "is the cluster still running? retry the command") from exc
                if resp.peek_stdout():
                    yield resp.read_stdout(timeout=0)
                if resp.peek_stderr():
                    yield resp.read_stderr(timeout=0)
            # A frame read together with the close (each peek reads one more) is still buffered.
            if resp.peek_stdout(timeout=0):
                yield resp.read_stdout(timeout=0)
            if resp.peek_stderr(timeout=0):
                yield resp.read_stderr(timeout=0)
        finally:
            resp.close(timeout=0)
    finally:
        api.close()


def _port_forward(client: KubeClient, namespace: str, pod: str, remote_port: int,
                  local_port: int, address: str, stop: threading.Event,
                  on_listening: Callable[[str], None] | None) -> None:
    """Accept on address:local_port; relay each connection through the API's portforward."""
    import select
    import socket

    from kubernetes.stream import ws_client

    def relay(conn: socket.socket) -> None:
        api = client.stream_client()
        try:
            url, headers = _ws_request(
                api, f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/portforward",
                [("ports", str(remote_port))])
            pf = ws_client.portforward_call(  # type: ignore[no-untyped-call]
                api.configuration, "GET", url, headers=headers)
            remote = pf.socket(remote_port)
        except Exception as exc:  # one refused connection must not end the forward
            logs.get("lab.kube").warning("port_forward.failed", pod=f"{namespace}/{pod}",
                                         port=remote_port, error=str(exc))
            conn.close()
            api.close()
            return
        remote.setblocking(True)
        try:
            while not stop.is_set():
                readable, _, _ = select.select([conn, remote], [], [], 0.5)
                if conn in readable:
                    data = conn.recv(65536)
                    if not data:
                        break
                    remote.sendall(data)
                if remote in readable:
                    data = remote.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
        finally:
            conn.close()
            remote.close()
            api.close()

    try:
        server = socket.create_server((address, local_port))
    except OSError as exc:
        raise LabError(f"cannot listen on {address}:{local_port} ({exc.strerror})",
                       "pick another local port with --port") from exc
    server.settimeout(0.5)
    with server:
        if on_listening is not None:
            host, port = server.getsockname()[:2]
            on_listening(f"{host}:{port}")
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=relay, args=(conn,), daemon=True).start()


def _watch_events(resp: Any, doing: str) -> Iterator[tuple[str, Obj]]:
    """The (type, object) events of one watch response, one JSON document per line."""
    from urllib3.exceptions import HTTPError as Urllib3Error

    buf = b""
    try:
        for chunk in resp.stream(4096, decode_content=False):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    event = json.loads(line)
                    yield event["type"], event["object"]
    except (Urllib3Error, OSError, ValueError) as exc:
        raise Unreachable(f"{doing}: the stream broke off ({exc})",
                          "is the cluster still running? retry the command") from exc
    finally:
        resp.release_conn()


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the API server sends whole seconds); None when absent or a date."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _ref(namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def condition(obj: Obj | None, type_: str) -> Obj | None:
    """The status condition of that type, or None."""
    if not obj:
        return None
    for c in obj.get("status", {}).get("conditions", []) or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def condition_true(obj: Obj | None, type_: str) -> bool:
    """The status condition of that type exists and is True."""
    c = condition(obj, type_)
    return bool(c and c.get("status") == "True")


def deployment_available(dep: Obj | None) -> tuple[bool, str]:
    """Rolled out at its current generation: Available, every replica ready and updated."""
    if dep is None:
        return False, "missing"
    st, gen = dep.get("status", {}), dep.get("metadata", {}).get("generation")
    if st.get("observedGeneration") != gen:
        return False, f"observedGeneration {st.get('observedGeneration')} ≠ generation {gen}"
    want = dep.get("spec", {}).get("replicas", 1)
    ok = (condition_true(dep, "Available") and st.get("readyReplicas", 0) == want
          and st.get("updatedReplicas", 0) == want)
    return ok, f"{st.get('readyReplicas', 0)}/{want} ready"
