"""``ApiFront``'s pod ``exec`` and ``portforward`` subresources (WebSocket) in front of a real
API server (the pods they reach live there), driven by the real ``kubernetes.stream`` client and
by ``lab.kube.KubeClient``."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # until pytest's pythonpath = ["."] is configured
    sys.path.insert(0, str(REPO))

import websocket  # noqa: E402
from kubernetes import client, config  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from kubernetes.stream import portforward, stream  # noqa: E402

from lab.kube import KubeClient, KubeError  # noqa: E402
from tests.support.apifront import ApiFront  # noqa: E402

NS = "default"


def pod(name: str, *containers: str, init: tuple[str, ...] = ()) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": c, "image": "busybox"} for c in containers]}
    if init:
        spec["initContainers"] = [{"name": c, "image": "busybox"} for c in init]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": spec}


@pytest.fixture(scope="module")
def server(envtest: Any) -> Iterator[ApiFront]:
    """One front for the module, on the session's shared real API server, reset for each test
    by ``emu``."""
    front = ApiFront(envtest.client)
    front.delete("v1", "Pod", "agent", NS)
    with front:
        front.put(pod("agent", "cilium-agent"))
        yield front


@pytest.fixture
def emu(server: ApiFront) -> Iterator[ApiFront]:
    server.on_exec(None)
    server.on_portforward(None)
    server.clear_requests()
    yield server
    errors, server.callback_errors[:] = list(server.callback_errors), []
    assert errors == []


@pytest.fixture(scope="module")
def kubeconfig(server: ApiFront, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return server.write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig",
                                   context="kind-lab")


@pytest.fixture
def core(kubeconfig: Path) -> Iterator[client.CoreV1Api]:
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig), context="kind-lab", client_configuration=configuration)
    with client.ApiClient(configuration) as api_client:
        yield client.CoreV1Api(api_client)


@pytest.fixture
def kube(kubeconfig: Path) -> Iterator[KubeClient]:
    kube = KubeClient("kind-lab", str(kubeconfig))
    yield kube
    kube.close()


def open_exec(core: client.CoreV1Api, command: list[str], name: str = "agent",
              **kwargs: Any) -> Any:
    options: dict[str, Any] = {"stdout": True, "stderr": True, "stdin": False, "tty": False,
                               "_preload_content": False, **kwargs}
    return stream(core.connect_get_namespaced_pod_exec, name, NS, command=command, **options)


def run(core: client.CoreV1Api, command: list[str], name: str = "agent",
        **kwargs: Any) -> tuple[int, str, str]:
    resp = open_exec(core, command, name, **kwargs)
    resp.run_forever(timeout=5)
    out, err, rc = resp.read_stdout(), resp.read_stderr(), resp.returncode
    resp.close()
    return rc, out, err


# -- exec through kubernetes.stream ---------------------------------------------------------------

def test_exec_success_returns_stdout_and_records_the_call(emu: ApiFront,
                                                          core: client.CoreV1Api) -> None:
    seen: list[tuple[str, str, str, list[str]]] = []

    def handler(ns: str, name: str, container: str, command: list[str]) -> tuple[int, str, str]:
        seen.append((ns, name, container, command))
        return 0, "KVStore: Ok\n", ""

    emu.on_exec(handler)
    resp = open_exec(core, ["cilium-dbg", "status", "--brief"])
    assert resp.subprotocol == "v5.channel.k8s.io"  # the first protocol the client offers
    resp.run_forever(timeout=5)
    assert (resp.returncode, resp.read_stdout(), resp.read_stderr()) == (0, "KVStore: Ok\n", "")
    resp.close()

    # the only container is the default, as on a real server
    assert seen == [(NS, "agent", "cilium-agent", ["cilium-dbg", "status", "--brief"])]
    assert [tuple(c[:4]) for c in emu.exec_calls] == [
        (NS, "agent", "cilium-agent", ["cilium-dbg", "status", "--brief"])]
    request = emu.requests[-1]
    assert (request.method, request.path) == ("GET", f"/api/v1/namespaces/{NS}/pods/agent/exec")
    assert request.query["stdout"] == "true" and request.query["stdin"] == "false"


def test_exec_preloaded_returns_the_output(emu: ApiFront, core: client.CoreV1Api) -> None:
    emu.on_exec(lambda ns, name, container, command: (0, "a\n", "b\n"))
    assert stream(core.connect_get_namespaced_pod_exec, "agent", NS, command=["x"],
                  stdout=True, stderr=True, stdin=False, tty=False) == "a\nb\n"


def test_exec_nonzero_exit_code_and_stderr(emu: ApiFront, core: client.CoreV1Api) -> None:
    emu.on_exec(lambda ns, name, container, command: (3, "", "boom\n"))
    resp = open_exec(core, ["sh", "-c", "exit 3"])
    resp.run_forever(timeout=5)
    status = json.loads(resp.peek_channel(3))
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    assert (resp.returncode, resp.read_stdout(), resp.read_stderr()) == (3, "", "boom\n")
    resp.close()


def test_exec_without_handler_answers_126(emu: ApiFront, core: client.CoreV1Api) -> None:
    assert run(core, ["ls"]) == (126, "", "no exec handler registered in the front")


def test_the_latest_exec_handler_wins(emu: ApiFront, core: client.CoreV1Api) -> None:
    emu.on_exec(lambda ns, name, container, command: (0, "first", ""))
    emu.on_exec(lambda ns, name, container, command: (0, "second", ""))
    assert run(core, ["x"]) == (0, "second", "")
    emu.on_exec(None)
    assert run(core, ["x"])[0] == 126


def test_exec_honours_stdout_stderr_and_tty(emu: ApiFront, core: client.CoreV1Api) -> None:
    emu.on_exec(lambda ns, name, container, command: (0, "out", "err"))
    assert run(core, ["x"], stdout=False) == (0, "", "err")
    assert run(core, ["x"], tty=True) == (0, "outerr", "")  # a terminal has one stream
    assert emu.exec_calls[-1].tty is True


def test_exec_streams_chunks_as_they_come(emu: ApiFront, core: client.CoreV1Api) -> None:
    proceed = threading.Event()

    def follow(ns: str, name: str, container: str,
               command: list[str]) -> Generator[tuple[int, str | bytes], None, int]:
        yield 1, "flow 1\n"
        assert proceed.wait(5)  # the client sees flow 1 before flow 2 exists
        yield 2, "warning\n"
        yield 1, b"flow 2\n"
        return 2  # a generator's return value is the exit code

    emu.on_exec(follow)
    resp = open_exec(core, ["hubble", "observe", "--follow"])
    resp.update(timeout=5)
    assert resp.read_stdout() == "flow 1\n"
    proceed.set()
    resp.run_forever(timeout=5)
    assert (resp.read_stdout(), resp.read_stderr(), resp.returncode) == ("flow 2\n", "warning\n", 2)
    resp.close()


def test_exec_handler_failure_is_an_internal_error(emu: ApiFront,
                                                   core: client.CoreV1Api) -> None:
    def broken(ns: str, name: str, container: str, command: list[str]) -> tuple[int, str, str]:
        raise RuntimeError("handler bug")

    emu.on_exec(broken)
    resp = open_exec(core, ["x"])
    resp.run_forever(timeout=5)
    status = json.loads(resp.read_channel(3))
    assert (status["reason"], status["code"]) == ("InternalError", 500)
    assert "handler bug" in status["message"]
    resp.close()
    assert [str(e) for e in emu.callback_errors] == ["handler bug"]
    emu.callback_errors.clear()  # expected: keep the fixture's check quiet


def test_exec_on_a_missing_pod_fails_the_handshake_with_404(emu: ApiFront,
                                                            core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as info:
        open_exec(core, ["x"], name="ghost")
    # kubernetes.stream turns any handshake failure into ApiException(status=0): the HTTP status
    # and the Status body are only in the reason text
    assert info.value.status == 0
    assert "Handshake status 404" in info.value.reason
    assert 'pods \\"ghost\\" not found' in info.value.reason
    assert emu.exec_calls == []


def test_exec_checks_the_container_like_the_api_server(emu: ApiFront,
                                                       core: client.CoreV1Api) -> None:
    emu.put(pod("two", "app", "sidecar", init=("setup",)))
    emu.on_exec(lambda ns, name, container, command: (0, container, ""))
    with pytest.raises(ApiException) as info:
        open_exec(core, ["x"], name="two")
    assert "Handshake status 400" in info.value.reason
    assert ("a container name must be specified for pod two, choose one of: [app sidecar] "
            "or one of the init containers: [setup]") in info.value.reason
    with pytest.raises(ApiException) as info:
        open_exec(core, ["x"], name="two", container="nope")
    assert "container nope is not valid for pod two" in info.value.reason
    assert run(core, ["x"], "two", container="sidecar")[1] == "sidecar"
    assert run(core, ["x"], "two", container="setup")[1] == "setup"


def test_exec_needs_a_websocket_upgrade_and_honours_fail_next(emu: ApiFront,
                                                              core: client.CoreV1Api) -> None:
    url = f"{emu.url}/api/v1/namespaces/{NS}/pods/agent/exec?command=ls&stdout=true"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=5)
    assert info.value.code == 400
    assert json.loads(info.value.read())["message"] == "Upgrade request required"

    emu.fail_next("GET", r"/pods/agent/exec$", 500, "InternalError")
    with pytest.raises(ApiException) as api_info:
        open_exec(core, ["x"])
    assert "Handshake status 500" in api_info.value.reason


def test_websocket_ping_fragments_and_stdin(emu: ApiFront) -> None:
    """RFC 6455 details the kubernetes client does not exercise: ping/pong, fragmented client
    messages, client data while the command runs (dropped)."""
    release = threading.Event()

    def slow(ns: str, name: str, container: str, command: list[str]) -> Iterator[Any]:
        assert release.wait(5)
        yield 1, "done"

    emu.on_exec(slow)
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{emu.port}/api/v1/namespaces/{NS}/pods/agent/exec"
        f"?command=cat&stdin=true&stdout=true",
        header=["Sec-WebSocket-Protocol: v4.channel.k8s.io"], timeout=5)
    try:
        assert (ws.getheaders() or {})["sec-websocket-protocol"] == "v4.channel.k8s.io"
        ws.ping(b"hi")
        opcode, frame = ws.recv_data_frame(True)
        assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"hi")
        ws.send_frame(websocket.ABNF.create_frame(b"\x00par", websocket.ABNF.OPCODE_BINARY, 0))
        ws.send_frame(websocket.ABNF.create_frame(b"tial\n", websocket.ABNF.OPCODE_CONT, 1))
        release.set()
        assert ws.recv_data_frame(True)[1].data == b"\x01done"
        assert json.loads(ws.recv_data_frame(True)[1].data[1:]) == {
            "metadata": {}, "status": "Success"}
        assert ws.recv_data_frame(True)[0] == websocket.ABNF.OPCODE_CLOSE
    finally:
        ws.close()


def test_exec_offering_no_known_protocol_is_refused(emu: ApiFront) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(
            f"ws://127.0.0.1:{emu.port}/api/v1/namespaces/{NS}/pods/agent/exec"
            f"?command=ls&stdout=true", header=["Sec-WebSocket-Protocol: channel.k8s.io"],
            timeout=5)
    assert info.value.status_code == 400


def test_stopping_the_front_ends_a_running_exec(tmp_path: Path, envtest: Any) -> None:
    emu = ApiFront(envtest.client).start()
    emu.put(pod("agent", "cilium-agent"))
    kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig", context="kind-lab")
    release = threading.Event()

    def forever(ns: str, name: str, container: str, command: list[str]) -> Iterator[Any]:
        yield 1, "started\n"
        release.wait(10)

    emu.on_exec(forever)
    kube = KubeClient("kind-lab", str(kubeconfig))
    try:
        chunks = cast(Generator[str, None, None],
                      kube.exec_stream(NS, "agent", ["hubble", "observe", "-f"]))
        assert next(chunks) == "started\n"
        started = time.monotonic()
        emu.stop()
        assert time.monotonic() - started < 2
        # the command still runs (the handler waits on `release`), yet the stream is over: the
        # next read ends it (or reports the lost connection) instead of waiting for more output
        with pytest.raises((StopIteration, websocket.WebSocketConnectionClosedException)):
            next(chunks)
        assert time.monotonic() - started < 2
        chunks.close()
    finally:
        release.set()
        kube.close()


# -- exec through lab.kube.KubeClient -------------------------------------------------------------

def test_kube_client_exec(emu: ApiFront, kube: KubeClient) -> None:
    emu.on_exec(lambda ns, name, container, command:
                (0, "ok\n", "") if command[0] == "true" else (1, "", "no such thing\n"))
    result = kube.exec(NS, "agent", ["true"], container="cilium-agent", timeout=5)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")
    result = kube.exec(NS, "agent", ["false"], timeout=5)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "no such thing\n")
    assert emu.exec_calls[0].container == "cilium-agent"


def test_kube_client_exec_on_a_missing_pod(emu: ApiFront, kube: KubeClient) -> None:
    with pytest.raises(KubeError) as info:
        kube.exec(NS, "ghost", ["true"], timeout=5)
    assert "404" in str(info.value)


def test_kube_client_exec_stream_stops_the_command_when_the_reader_leaves(
        emu: ApiFront, kube: KubeClient) -> None:
    closed = threading.Event()

    def observe(ns: str, name: str, container: str, command: list[str]) -> Iterator[Any]:
        try:
            for n in range(1000):
                yield 1, f"flow {n}\n"
                time.sleep(0.005)
        finally:
            closed.set()

    emu.on_exec(observe)
    started = time.monotonic()
    chunks = cast(Generator[str, None, None],
                  kube.exec_stream(NS, "agent", ["hubble", "observe", "--follow"]))
    text = ""
    while text.count("\n") < 3:
        text += next(chunks)
    chunks.close()
    assert text.startswith("flow 0\nflow 1\nflow 2\n")
    assert closed.wait(2)
    assert time.monotonic() - started < 1.5  # no wait for a close handshake timeout


def test_kube_client_exec_stream_ends_with_the_command(emu: ApiFront,
                                                       kube: KubeClient) -> None:
    emu.on_exec(lambda ns, name, container, command: iter([(1, "a\n"), (2, "b\n"), (1, "c\n")]))
    text = "".join(kube.exec_stream(NS, "agent", ["x"]))
    # exec_stream yields what one update() buffered, stdout first: frames arriving together are
    # regrouped by channel, so only each channel's own order is kept
    assert sorted(text.splitlines()) == ["a", "b", "c"]
    assert text.index("a") < text.index("c")


# -- port-forward ---------------------------------------------------------------------------------

def test_portforward_through_kubernetes_stream(emu: ApiFront,
                                               core: client.CoreV1Api) -> None:
    opened: list[tuple[str, str, int]] = []

    def listen(ns: str, name: str, port: int) -> Any:
        opened.append((ns, name, port))
        return (lambda data: b"pong:" + data) if port == 4245 else None

    emu.on_portforward(listen)
    pf = portforward(core.connect_get_namespaced_pod_portforward, "agent", NS,
                     ports="4245,9999")
    sock = pf.socket(4245)
    sock.settimeout(5)
    sock.sendall(b"ping")
    assert sock.recv(100) == b"pong:ping"
    refused = pf.socket(9999)
    refused.settimeout(5)
    refused.sendall(b"hello")
    assert refused.recv(100) == b""  # the client closes a port on an error frame
    assert "connection refused" in pf.error(9999)
    sock.close()
    refused.close()
    assert opened == [(NS, "agent", 4245), (NS, "agent", 9999)]
    assert emu.requests[-1].path == f"/api/v1/namespaces/{NS}/pods/agent/portforward"


def test_portforward_on_a_missing_pod(emu: ApiFront, core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as info:
        portforward(core.connect_get_namespaced_pod_portforward, "ghost", NS, ports="80")
    assert "Handshake status 404" in info.value.reason


def test_kube_client_port_forward(emu: ApiFront, kube: KubeClient) -> None:
    def http(ns: str, name: str, port: int) -> Any:
        return lambda data: b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"

    emu.on_portforward(http)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local_port = probe.getsockname()[1]
    stop = threading.Event()
    forwarder = threading.Thread(target=kube.port_forward,
                                 args=(NS, "agent", 4245, local_port, stop), daemon=True)
    forwarder.start()
    try:
        deadline = time.monotonic() + 3
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", local_port), timeout=5)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        with conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert conn.recv(1000).endswith(b"\r\n\r\nok")
    finally:
        stop.set()  # the forwarder notices within its 0.5 s accept timeout: no need to wait
