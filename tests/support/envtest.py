"""A real Kubernetes API server for tests: etcd + kube-apiserver on 127.0.0.1 (envtest).

What controller-runtime's envtest does, from the binaries ``tests.support.deps.require_envtest``
finds (``KUBEBUILDER_ASSETS``, default ``../shared/envtest/k8s/1.33.13-linux-amd64``): free ports,
temp dirs,
a bearer token in the ``system:masters`` group, the certificate kube-apiserver generates and
serves used as the CA of a kubeconfig. No kubelet, scheduler or controller-manager: pods never
run on their own, and exec/port-forward have no node to reach (``tests.support.apifront.ApiFront``
serves those in front of this server).

``RealApi`` is a small REST client for the tests and the controller simulator (``get``, ``list``,
``put``, ``delete``, ``patch_status``, ``resource_type``), every call a real request the server
validates. ``ServerPool`` lends clean servers, reset in etcd between tests (``reset``).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from lab import yamlio

Obj = dict[str, Any]

# metadata a server sets: an object read back and created again leaves them out
SERVER_SET = ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields",
              "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink")
# the pinned CRDs every server gets once, as folders under the upstream dir
PINNED_CRDS = ("gateway-api-1.4.0/standard", "cilium-1.18.4/crds", "cert-manager-1.19.0/crds")


# everything the API server stores lives under this etcd prefix
REGISTRY = b"/registry/"
REGISTRY_END = b"/registry0"  # the prefix's range end: its last byte plus one
# kept up to date by the API server itself (its identity lease): neither removed nor put back
SELF_MAINTAINED = (b"/registry/leases/kube-system/apiserver-", b"/registry/masterleases/")
ETCD_MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PortTaken(Exception):
    """A port picked as free was bound by someone else first."""


class ApiFailure(Exception):
    """A non-2xx answer: ``code`` and the server's ``Status`` body."""

    def __init__(self, code: int, body: Obj) -> None:
        super().__init__(f"{code} {body.get('reason', '')}: {body.get('message', body)}")
        self.code = code
        self.body = body


@dataclass(frozen=True)
class Resource:
    api_version: str
    kind: str
    plural: str
    namespaced: bool
    subresources: frozenset[str]

    def path(self, namespace: str | None = None, name: str | None = None,
             sub: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{urllib.parse.quote(name)}"
        if sub:
            base += f"/{sub}"
        return base


class RealApi:
    """REST calls to one kube-apiserver (thread-safe: one kept-alive connection per thread)."""

    def __init__(self, host: str, port: int, token: str, ca_file: Path,
                 user_agent: str = "envtest-client") -> None:
        self.host, self.port, self.token = host, port, token
        self.user_agent = user_agent
        self.ca_file = ca_file
        self.ssl_context = ssl.create_default_context(cafile=str(ca_file))
        self._tl = threading.local()
        self._types: dict[str, dict[str, Resource]] = {}  # groupVersion → kind → Resource
        self._types_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def as_user_agent(self, user_agent: str) -> RealApi:
        """The same server under another User-Agent (what the server records as the writer)."""
        return RealApi(self.host, self.port, self.token, self.ca_file, user_agent)

    # -- raw requests ------------------------------------------------------------------------

    def _conn(self) -> http.client.HTTPSConnection:
        conn = getattr(self._tl, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.ssl_context,
                                               timeout=30)
            self._tl.conn = conn
        return conn

    def raw(self, method: str, path: str, body: Any = None, *,
            content_type: str = "application/json",
            query: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPMessage]:
        if query:
            path += ("&" if "?" in path else "?") + urllib.parse.urlencode(query)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json",
                   "User-Agent": self.user_agent}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(2):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read(), resp.headers
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    http.client.CannotSendRequest, http.client.ResponseNotReady,
                    ssl.SSLEOFError, ssl.SSLZeroReturnError):  # a kept-alive conn, closed by it
                conn.close()
                self._tl.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json",
                query: dict[str, str] | None = None) -> Obj:
        code, data, _ = self.raw(method, path, body, content_type=content_type, query=query)
        parsed = json.loads(data) if data else {}
        if code >= 300:
            raise ApiFailure(code, parsed if isinstance(parsed, dict) else {"message": parsed})
        return parsed if isinstance(parsed, dict) else {"items": parsed}

    # -- discovery ---------------------------------------------------------------------------

    def _group_version(self, api_version: str, refresh: bool = False) -> dict[str, Resource]:
        with self._types_lock:
            if not refresh and api_version in self._types:
                return self._types[api_version]
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        try:
            listing = self.request("GET", path)
        except ApiFailure as exc:
            if exc.code != 404:
                raise
            listing = {"resources": []}
        subs: dict[str, set[str]] = {}
        for r in listing.get("resources") or []:
            if "/" in r["name"]:
                main, sub = r["name"].split("/", 1)
                subs.setdefault(main, set()).add(sub)
        kinds = {r["kind"]: Resource(api_version, r["kind"], r["name"], bool(r["namespaced"]),
                                     frozenset(subs.get(r["name"], ())))
                 for r in listing.get("resources") or [] if "/" not in r["name"]}
        with self._types_lock:
            self._types[api_version] = kinds
        return kinds

    def resource_type(self, api_version: str, kind: str) -> Resource:
        """The served resource (KeyError: not served, e.g. its CRD is missing)."""
        found = self._group_version(api_version).get(kind)
        if found is None:
            found = self._group_version(api_version, refresh=True).get(kind)
        if found is None:
            raise KeyError(f"{kind} in {api_version} is not served (missing CRD?)")
        return found

    # -- convenience calls, as real requests ---------------------------------------------------

    def get(self, api_version: str, kind: str, name: str,
            namespace: str | None = None) -> Obj | None:
        rt = self.resource_type(api_version, kind)
        try:
            return self.request("GET", rt.path(namespace or "default", name))
        except ApiFailure as exc:
            if exc.code == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str = "") -> list[Obj]:
        rt = self.resource_type(api_version, kind)
        query = {"labelSelector": label_selector} if label_selector else None
        items = self.request("GET", rt.path(namespace), query=query).get("items") or []
        for item in items:  # a list leaves them out of its items
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return list(items)

    def create(self, obj: Obj, **query: str) -> Obj:
        rt = self.resource_type(obj["apiVersion"], obj["kind"])
        ns = (obj["metadata"].get("namespace") or "default") if rt.namespaced else None
        return self.request("POST", rt.path(ns), obj, query=query or None)

    def apply(self, obj: Obj, manager: str, *, force: bool = False, **query: str) -> Obj:
        """Server-side apply (``application/apply-patch+yaml``) as field manager ``manager``."""
        rt = self.resource_type(obj["apiVersion"], obj["kind"])
        m = obj["metadata"]
        ns = (m.get("namespace") or "default") if rt.namespaced else None
        q = {"fieldManager": manager, **query}
        if force:
            q["force"] = "true"
        return self.request("PATCH", rt.path(ns, m["name"]), obj,
                            content_type="application/apply-patch+yaml", query=q)

    def put(self, obj: Obj) -> Obj:
        """Create or update ``obj`` the way a controller owning it would (status included,
        written through the status subresource when there is one; a Pod's node through its
        binding, as the scheduler does). Returns the object as stored."""
        obj = copy.deepcopy(obj)
        rt = self.resource_type(obj["apiVersion"], obj["kind"])
        m = obj.setdefault("metadata", {})
        ns = (m.get("namespace") or "default") if rt.namespaced else None
        if rt.namespaced:
            m["namespace"] = ns
        status = obj.get("status")
        for _ in range(5):
            current = self.get(obj["apiVersion"], obj["kind"], m["name"], ns)
            try:
                if current is None:
                    for key in SERVER_SET:
                        m.pop(key, None)
                    stored = self.request("POST", rt.path(ns), obj)
                elif obj["kind"] == "Pod":
                    stored = self._bind(rt, current, obj)
                else:
                    m["resourceVersion"] = current["metadata"]["resourceVersion"]
                    stored = self.request("PUT", rt.path(ns, m["name"]), obj)
                if status is not None and "status" in rt.subresources and \
                        stored.get("status") != status:
                    stored = self.request("PUT", rt.path(ns, m["name"], "status"),
                                          {**stored, "status": status})
                return stored
            except ApiFailure as exc:
                if exc.code not in (409,):
                    raise
        raise AssertionError(f"{obj['kind']} {m['name']}: conflicts did not settle")

    def _bind(self, rt: Resource, current: Obj, wanted: Obj) -> Obj:
        node = (wanted.get("spec") or {}).get("nodeName")
        m = current["metadata"]
        if node and not (current.get("spec") or {}).get("nodeName"):
            self.request("POST", rt.path(m["namespace"], m["name"], "binding"),
                         {"apiVersion": "v1", "kind": "Binding",
                          "metadata": {"name": m["name"]},
                          "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
            refreshed = self.get("v1", "Pod", m["name"], m["namespace"])
            assert refreshed is not None
            return refreshed
        return current

    def delete(self, api_version: str, kind: str, name: str,
               namespace: str | None = None) -> bool:
        """Delete at once (grace period 0: what a kubelet confirms for a pod)."""
        rt = self.resource_type(api_version, kind)
        try:
            self.request("DELETE", rt.path(namespace or "default", name),
                         {"kind": "DeleteOptions", "apiVersion": "v1",
                          "gracePeriodSeconds": 0})
            return True
        except ApiFailure as exc:
            if exc.code == 404:
                return False
            raise

    def patch_status(self, api_version: str, kind: str, name: str, namespace: str | None,
                     status: Obj) -> Obj:
        """JSON-merge ``status`` into the object's status (through /status when served)."""
        rt = self.resource_type(api_version, kind)
        sub = "status" if "status" in rt.subresources else None
        return self.request("PATCH", rt.path(namespace or "default", name, sub),
                            {"status": status}, content_type="application/merge-patch+json")

    def merge_patch(self, api_version: str, kind: str, name: str, namespace: str | None,
                    patch: Obj) -> Obj:
        rt = self.resource_type(api_version, kind)
        return self.request("PATCH", rt.path(namespace or "default", name), patch,
                            content_type="application/merge-patch+json")

    # -- CRDs ----------------------------------------------------------------------------------

    def install_crds(self, docs: Iterable[Obj], timeout: float = 60) -> list[str]:
        """Create (or leave) each CRD, then wait until every one is Established and served."""
        names: list[str] = []
        crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
        for doc in crds:
            names.append(doc["metadata"]["name"])
            try:
                self.create(doc)
            except ApiFailure as exc:
                if exc.code != 409:
                    raise
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            for name in sorted(pending):
                crd = self.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name)
                conds = {c["type"]: c["status"] for c in
                         ((crd or {}).get("status") or {}).get("conditions") or []}
                if conds.get("Established") == "True":
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise AssertionError(f"CRDs not Established after {timeout}s: {sorted(pending)}")
            if pending:
                time.sleep(0.1)
        for doc in crds:  # discovery follows Established with a short lag
            group = doc["spec"]["group"]
            for v in doc["spec"]["versions"]:
                if v.get("served"):
                    kind = doc["spec"]["names"]["kind"]
                    while True:
                        try:
                            self.resource_type(f"{group}/{v['name']}", kind)
                            break
                        except KeyError:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.1)
        return names


def load_yaml_docs(folder: Path) -> list[Obj]:
    return copy.deepcopy(list(_parsed(str(folder))))


@functools.cache
def _parsed(folder: str) -> tuple[Obj, ...]:
    """Each folder parsed once per session (the CRDs are megabytes of YAML)."""
    docs: list[Obj] = []
    for path in sorted(Path(folder).glob("*.yaml")):
        docs.extend(d for d in yamlio.load_all(path.read_text()) if d)
    return tuple(docs)


class EnvtestServer:
    """etcd + kube-apiserver for one test session or module; ``stop()`` ends both by PID."""

    def __init__(self, assets: Path, *, service_cidr: str = "10.96.0.0/16",
                 name: str = "envtest") -> None:
        self.assets = assets
        self.service_cidr = service_cidr
        self.name = name
        self.root = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.token = secrets.token_hex(16)
        self.port = 0
        self.etcd_port = 0
        # reset(): snapshots by name (key → value), the revision each key had when it last held
        # its snapshot's value, the snapshot the server is at, and each snapshot's CRDs
        self._snapshots: dict[str, dict[bytes, str]] = {}
        self._revisions: dict[bytes, str] = {}
        self._at = ""
        self._crds: dict[str, list[Obj]] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        self.api: RealApi | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> EnvtestServer:
        """Ports are picked free, then bound by etcd and kube-apiserver a moment later: another
        server starting meanwhile (a parallel one, another xdist worker) can take one first. A
        process that exits, or an etcd on our port that is not ours, means another try with new
        ports — never an API server on another server's etcd."""
        for attempt in range(3):
            try:
                self._start(self.assets, timeout)
                return self
            except _PortTaken:
                self._stop_processes()
                shutil.rmtree(self.root, ignore_errors=True)
                self.root.mkdir(parents=True)
                if attempt == 2:
                    self.stop()
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _start(self, assets: Path, timeout: float) -> None:
        client, peer, self.port = free_port(), free_port(), free_port()
        self.etcd_port = client
        etcd_url = f"http://127.0.0.1:{client}"
        etcd_name = f"envtest-{secrets.token_hex(4)}"  # to tell our etcd from another's
        self._spawn("etcd", [
            str(assets / "etcd"), "--name", etcd_name, "--data-dir", str(self.root / "etcd"),
            "--unsafe-no-fsync", "--listen-client-urls", etcd_url,
            "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"{etcd_name}=http://127.0.0.1:{peer}"])
        self._wait(lambda: self._etcd_is_ours(client, etcd_name), timeout, "etcd /health")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.root / "sa.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        (self.root / "sa.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (self.root / "token.csv").write_text(f"{self.token},admin,admin-uid,system:masters\n")
        certs = self.root / "certs"
        self._spawn("kube-apiserver", [
            str(assets / "kube-apiserver"), f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", f"--secure-port={self.port}",
            "--advertise-address=127.0.0.1", f"--cert-dir={certs}",
            f"--service-account-issuer=https://127.0.0.1:{self.port}",
            f"--service-account-key-file={self.root / 'sa.pub'}",
            f"--service-account-signing-key-file={self.root / 'sa.key'}",
            "--authorization-mode=RBAC", f"--token-auth-file={self.root / 'token.csv'}",
            f"--service-cluster-ip-range={self.service_cidr}", "--allow-privileged=true",
            "--disable-admission-plugins=ServiceAccount", "--endpoint-reconciler-type=none",
            *self._audit_flags()])
        self._wait(lambda: (certs / "apiserver.crt").exists(), timeout, "the serving cert")
        time.sleep(0.05)  # the key and cert are written one after the other
        self.api = RealApi("127.0.0.1", self.port, self.token, self.ca_file)
        self._wait(self._ready, timeout, "kube-apiserver /readyz")

    def _audit_flags(self) -> list[str]:
        """``LAB_ENVTEST_AUDIT=<dir>``: every Service write, in full, to ``<dir>/<name>-*.log``
        (kept after the server stops), for finding who allocated what."""
        folder = os.environ.get("LAB_ENVTEST_AUDIT")
        if not folder:
            return []
        policy = self.root / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
            "rules": [{"level": "RequestResponse", "verbs": ["create", "update", "patch", "delete"],
                       "resources": [{"group": "", "resources": ["services"]}]},
                      {"level": "None"}]}))
        Path(folder).mkdir(parents=True, exist_ok=True)
        log = Path(folder) / f"{self.name}-{secrets.token_hex(3)}.log"
        return [f"--audit-policy-file={policy}", f"--audit-log-path={log}"]

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        # GOGC=400: a test server's heap stays small (a few hundred MB), and its garbage collector
        # otherwise takes about a tenth of its CPU, which the suite is bound by.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                start_new_session=True, env={**os.environ, "GOGC": "400"})
        log.close()
        self._procs.append(proc)

    def _wait(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    tail = self._log_tail()
                    error = _PortTaken if "address already in use" in tail else RuntimeError
                    raise error(f"{proc.args[0]} exited {proc.returncode} waiting for "
                                f"{what}:\n{tail}")
            try:
                if check():
                    return
            except (OSError, ssl.SSLError, http.client.HTTPException):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready after {timeout}s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        out = []
        for name in ("etcd", "kube-apiserver"):
            path = self.root / f"{name}.log"
            if path.exists():
                out.append(f"--- {name}\n" + path.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    @staticmethod
    def _etcd_is_ours(port: int, name: str) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            if b'"true"' not in conn.getresponse().read():
                return False
            conn.request("POST", "/v3/cluster/member/list", body=b"{}")
            members = json.loads(conn.getresponse().read()).get("members") or []
        finally:
            conn.close()
        if [m.get("name") for m in members] != [name]:
            raise _PortTaken(f"another etcd answers on 127.0.0.1:{port}")
        return True

    def _ready(self) -> bool:
        assert self.api is not None
        code, body, _ = self.api.raw("GET", "/readyz")
        return code == 200 and body.strip() == b"ok"

    def stop(self) -> None:
        """End kube-apiserver, then etcd, by PID; remove the temp dirs."""
        self._stop_processes()
        shutil.rmtree(self.root, ignore_errors=True)

    def _stop_processes(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        self._procs.clear()

    # -- back to a clean cluster -----------------------------------------------------------------

    def _etcd(self, call: str, body: Obj) -> Obj:
        """One call of etcd's v3 JSON gateway (keys and values base64)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.etcd_port, timeout=30)
        try:
            conn.request("POST", f"/v3/{call}", body=json.dumps(body).encode())
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"{}")
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"etcd {call}: {resp.status} {data}")
        return dict(data)

    def _stored(self, keys_only: bool) -> list[Obj]:
        return list(self._etcd("kv/range", {
            "key": _b64(REGISTRY), "range_end": _b64(REGISTRY_END),
            "keys_only": keys_only}).get("kvs") or [])

    def snapshot(self, name: str) -> None:
        """Remember everything stored now under ``name`` (e.g. "bare" before the CRDs, "crds"
        after): ``reset(name)`` comes back here."""
        stored = self._stored(keys_only=False)
        self._snapshots[name] = {base64.b64decode(kv["key"]): kv.get("value", "")
                                 for kv in stored}
        self._revisions.update({base64.b64decode(kv["key"]): kv["mod_revision"] for kv in stored})
        self._crds[name] = self.client.list("apiextensions.k8s.io/v1", "CustomResourceDefinition")
        self._at = name

    def reset(self, name: str = "crds") -> int:
        """Back to snapshot ``name``, straight in etcd: whatever was created since is removed
        (namespaces with everything in them, finalizers or not: there is no namespace controller
        here to empty them), whatever changed is put back, the allocation ranges of ClusterIPs
        and NodePorts included. The API server follows through its watch on etcd, as it follows
        any other writer, and serves or stops serving CRDs as they come and go; the next test
        gets a fresh cluster in ~20 ms instead of ~7 s for a new server and its CRDs. Returns
        how many keys were removed or put back."""
        target = self._snapshots[name]
        switched = name != self._at
        before = self._snapshots.get(self._at, {})
        ops: list[Obj] = []
        present = set()
        for kv in self._stored(keys_only=True):
            key = base64.b64decode(kv["key"])
            present.add(key)
            if key.startswith(SELF_MAINTAINED):
                continue
            if key not in target:
                ops.append({"request_delete_range": {"key": kv["key"]}})
            elif self._revisions.get(key) != kv["mod_revision"] or \
                    (switched and before.get(key) != target[key]):
                ops.append({"request_put": {"key": kv["key"], "value": target[key]}})
        ops += [{"request_put": {"key": _b64(key), "value": value}}  # deleted since: back
                for key, value in target.items()
                if key not in present and not key.startswith(SELF_MAINTAINED)]
        for i in range(0, len(ops), ETCD_MAX_TXN_OPS):
            chunk = ops[i:i + ETCD_MAX_TXN_OPS]
            revision = self._etcd("kv/txn", {"success": chunk})["header"]["revision"]
            # a key put back holds its snapshot's value at the revision of that transaction
            self._revisions.update({base64.b64decode(op["request_put"]["key"]): revision
                                    for op in chunk if "request_put" in op})
        if switched:
            self._await_crds(self._crds[self._at], self._crds[name])
        self._at = name
        return len(ops)

    def _await_crds(self, had: list[Obj], wanted: list[Obj], timeout: float = 30) -> None:
        """Wait until the CRDs of ``wanted`` are served and those only in ``had`` are not."""
        def paths(crds: list[Obj]) -> set[str]:
            return {f"/apis/{c['spec']['group']}/{v['name']}/{c['spec']['names']['plural']}"
                    for c in crds for v in c["spec"]["versions"] if v.get("served")}

        want, gone = paths(wanted), paths(had) - paths(wanted)
        deadline = time.monotonic() + timeout
        for path in sorted(want | gone):
            while (self.client.raw("GET", path, query={"limit": "1"})[0] == 200) != (path in want):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{path}: still {'not ' * (path in want)}served")
                time.sleep(0.02)

    # -- access --------------------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        return self.root / "certs" / "apiserver.crt"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def client(self) -> RealApi:
        assert self.api is not None, "server not started"
        return self.api

    def kubeconfig(self, context: str = "envtest") -> Obj:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        return {"apiVersion": "v1", "kind": "Config", "current-context": context,
                "clusters": [{"name": context, "cluster": {
                    "server": self.url, "certificate-authority-data": ca}}],
                "users": [{"name": context, "user": {"token": self.token}}],
                "contexts": [{"name": context, "context": {"cluster": context,
                                                           "user": context}}]}

    def write_kubeconfig(self, path: Path, context: str = "envtest") -> Path:
        path.write_text(yaml.safe_dump(self.kubeconfig(context), sort_keys=False))
        path.chmod(0o600)
        return path

    def install_pinned_crds(self, upstream: Path) -> list[str]:
        docs: list[Obj] = []
        for folder in PINNED_CRDS:
            docs += load_yaml_docs(upstream / folder)
        return self.client.install_crds(docs)


class ServerPool:
    """The real API servers of one test process (an xdist worker), lent out (``lease``) to a test
    or a module for as long as it needs a whole cluster, each reset in etcd before it is lent
    again. A process starts as many as it ever lends at once, never more than ``LIMIT`` (each
    costs ~3 s, ~4 s of CRDs, ~9 s of CPU and ~420 MB; idle, ~2 % of a core)."""

    LIMIT = 6

    def __init__(self, assets: Path, upstream: Path) -> None:
        self.assets = assets
        self.upstream = upstream
        self.started = 0
        self._live: list[EnvtestServer] = []
        self._lent: set[EnvtestServer] = set()
        self._lock = threading.Lock()

    def _start(self, name: str, service_cidr: str) -> EnvtestServer:
        with self._lock:
            if self.started >= self.LIMIT:
                raise AssertionError(f"more than {self.LIMIT} real API servers in one session")
            self.started += 1
        server = EnvtestServer(self.assets, service_cidr=service_cidr, name=name).start()
        with self._lock:
            self._live.append(server)
        try:
            server.snapshot("bare")
            server.install_pinned_crds(self.upstream)
            server.snapshot("crds")
        except BaseException:
            self.release(server)
            raise
        return server

    @staticmethod
    def service_range(position: int) -> str:
        """What the config allocates the cluster at ``position``: 10.(96+i).0.0/16."""
        return f"10.{96 + position}.0.0/16"

    @contextlib.contextmanager
    def lease(self, count: int = 1, *, crds: bool = True) -> Iterator[list[EnvtestServer]]:
        """``count`` servers for the caller alone, the i-th serving Services from the i-th
        cluster's range (``service_range``), holding the pinned CRDs (``crds=False``: not even
        those) and nothing else: reset in etcd (``EnvtestServer.reset``, ~20 ms) rather than
        started anew, unless none is free for a position."""
        lent: list[EnvtestServer | None] = []
        with self._lock:
            for i in range(count):
                free = next((s for s in self._live if s not in self._lent
                             and s.service_cidr == self.service_range(i)), None)
                if free is not None:
                    self._lent.add(free)
                lent.append(free)
        try:
            missing = {f"clean-{self.started + n}-{i}": self.service_range(i)
                       for n, i in enumerate(i for i, s in enumerate(lent) if s is None)}
            if missing:
                started = iter(self.fresh_many(missing).values())
                lent = [s if s is not None else next(started) for s in lent]
                with self._lock:
                    self._lent.update(s for s in lent if s is not None)
            servers = [s for s in lent if s is not None]
            for server in servers:
                server.reset("crds" if crds else "bare")
            yield servers
        finally:
            with self._lock:
                self._lent.difference_update(s for s in lent if s is not None)

    def fresh_many(self, wanted: dict[str, str]) -> dict[str, EnvtestServer]:
        """Several fresh servers (name → service CIDR), started side by side."""
        if self.started + len(wanted) > self.LIMIT:
            raise AssertionError(f"more than {self.LIMIT} real API servers in one session")
        out: dict[str, EnvtestServer] = {}
        errors: list[BaseException] = []

        def start(name: str, cidr: str) -> None:
            try:
                out[name] = self._start(name, cidr)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=item) for item in wanted.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            for server in out.values():
                self.release(server)
            raise errors[0]
        return {name: out[name] for name in wanted}

    def release(self, server: EnvtestServer) -> None:
        server.stop()
        if server in self._live:
            self._live.remove(server)

    def stop_all(self) -> None:
        for server in list(self._live):
            self.release(server)
