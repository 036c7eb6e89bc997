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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from lab.errors import LabError

FIELD_MANAGER = "kind-cilium-lab"
Obj = dict[str, Any]


class KubeError(LabError):
    """An API call failed. ``status`` is the HTTP code (0 when the server was not reached)."""

    status = 0

    def __init__(self, message: str, hint: str = "", status: int = 0,
                 reason: str = "") -> None:
        super().__init__(message, hint)
        self.status = status
        self.reason = reason


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
                 request_timeout: float = 15.0) -> None:
        self.context = context
        self.kubeconfig = kubeconfig
        self.request_timeout = request_timeout
        self._api: Any = None
        self._resources: dict[tuple[str, str], Resource] = {}
        self._discovered: set[str] = set()
        self._lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def api(self) -> Any:
        if self._api is None:
            from kubernetes import config as kconfig  # lazy: see module docstring
            from kubernetes.config.config_exception import ConfigException
            try:
                self._api = kconfig.new_client_from_config(  # type: ignore[no-untyped-call]
                    config_file=self.kubeconfig, context=self.context, persist_config=False)
            except (ConfigException, OSError) as exc:
                raise Unreachable(
                    f"no usable kubeconfig context {self.context!r} ({exc})",
                    f"export it with `kind export kubeconfig --name "
                    f"{self.context.removeprefix('kind-')}` or run `invoke lab.up`",
                ) from exc
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    def request(self, method: str, path: str, *, query: list[tuple[str, Any]] | None = None,
                body: Any = None, content_type: str = "application/json",
                doing: str = "", stream: bool = False, timeout: float | None = None) -> Any:
        """One HTTP call. Returns parsed JSON (or the raw response when ``stream``)."""
        from kubernetes.client.exceptions import ApiException
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
        doing = doing or f"{method} {path}"
        try:
            resp = api.call_api(*req, _request_timeout=(5.0, read_timeout))
        except ApiException as exc:
            raise _map_api_exception(exc, doing) from exc
        except (Urllib3Error, OSError) as exc:
            raise Unreachable(
                f"{doing}: the API server of context {self.context!r} did not answer ({exc})",
                "check that the cluster's containers run (`docker ps`), or run "
                "`invoke lab.up --resume` to let the lab re-detect and repair it") from exc
        if not 200 <= resp.status <= 299:
            resp.read()
            try:
                ApiException.from_response(http_resp=resp, body=None, data=None)  # raises
            except ApiException as exc:
                raise _map_api_exception(exc, doing) from exc
        if stream:
            return resp.response
        raw = resp.read()
        return json.loads(raw) if raw else {}

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
                     stop: threading.Event, address: str = "127.0.0.1") -> None:
        """Serve address:local_port → pod:remote_port until ``stop`` is set (blocks)."""
        _port_forward(self, namespace, pod, remote_port, local_port, address, stop)

    def watch(self, api_version: str, kind: str, namespace: str | None = None,
              label_selector: str | None = None, field_selector: str | None = None,
              timeout_seconds: int = 30, resource_version: str | None = None,
              ) -> Iterator[tuple[str, Obj]]:
        """Yields (event type, object) until the server closes the stream."""
        res = self.resource(api_version, kind)
        query: list[tuple[str, Any]] = [("watch", "true"), ("timeoutSeconds", timeout_seconds)]
        if label_selector:
            query.append(("labelSelector", label_selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        if resource_version:
            query.append(("resourceVersion", resource_version))
        resp = self.request("GET", res.path(namespace), query=query, stream=True,
                            timeout=timeout_seconds + 5,
                            doing=f"watching {kind} in {namespace or 'all namespaces'}")
        buf = b""
        try:
            for chunk in resp.stream(4096, decode_content=False):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        event = json.loads(line)
                        yield event["type"], event["object"]
        finally:
            resp.release_conn()


@dataclass(frozen=True)
class ExecResult:
    returncode: int
    stdout: str
    stderr: str


def _open_exec(client: KubeClient, namespace: str, pod: str, command: list[str],
               container: str | None) -> Any:
    """The exec subresource's websocket (stdout and stderr, no stdin, no TTY)."""
    from kubernetes.client import CoreV1Api
    from kubernetes.stream import stream

    kwargs: dict[str, Any] = {"command": command, "stdout": True, "stderr": True,
                              "stdin": False, "tty": False, "_preload_content": False}
    if container:
        kwargs["container"] = container
    return stream(CoreV1Api(client.api).connect_get_namespaced_pod_exec, pod, namespace,
                  **kwargs)


def _exec(client: KubeClient, namespace: str, pod: str, command: list[str],
          container: str | None, timeout: float) -> ExecResult:
    from kubernetes.client.exceptions import ApiException

    doing = f"running {command[0]} in {namespace}/{pod}"
    try:
        resp = _open_exec(client, namespace, pod, command, container)
        resp.run_forever(timeout=timeout)
        out, err = resp.read_stdout() or "", resp.read_stderr() or ""
        rc = resp.returncode
        resp.close()
    except ApiException as exc:
        raise _map_api_exception(exc, doing) from exc
    except Exception as exc:  # websocket errors carry no common base class
        raise Unreachable(f"{doing}: {exc}", "is the pod running?") from exc
    return ExecResult(rc if rc is not None else -1, out, err)


def _exec_stream(client: KubeClient, namespace: str, pod: str, command: list[str],
                 container: str | None) -> Iterator[str]:
    from kubernetes.client.exceptions import ApiException

    try:
        resp = _open_exec(client, namespace, pod, command, container)
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
                yield resp.read_stdout()
            if resp.peek_stderr():
                yield resp.read_stderr()
    finally:
        resp.close()


def _port_forward(client: KubeClient, namespace: str, pod: str, remote_port: int,
                  local_port: int, address: str, stop: threading.Event) -> None:
    """Accept on address:local_port; relay each connection through the API's portforward."""
    import select
    import socket

    from kubernetes.client import CoreV1Api
    from kubernetes.stream import portforward

    def relay(conn: socket.socket) -> None:
        pf = portforward(CoreV1Api(client.api).connect_get_namespaced_pod_portforward,
                         pod, namespace, ports=str(remote_port))
        remote = pf.socket(remote_port)
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

    try:
        server = socket.create_server((address, local_port))
    except OSError as exc:
        raise LabError(f"cannot listen on {address}:{local_port} ({exc.strerror})",
                       "pick another local port with --port") from exc
    server.settimeout(0.5)
    with server:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=relay, args=(conn,), daemon=True).start()


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
