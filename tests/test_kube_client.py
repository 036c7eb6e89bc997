"""lab.kube against an API server that misbehaves on purpose (tests/support/flaky_api.py):
exec honours its deadline, streams never borrow the REST client, transient errors are retried
with a bound, non-repeatable writes are not, and an expired watch re-lists."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes.stream  # noqa: F401 - imported up front: the deadlines measure the exec
import pytest

from lab.kube import KubeClient, KubeError, Unavailable, Unreachable
from tests.support.flaky_api import (
    FlakyApi,
    late,
    never_upgrade,
    ok,
    silent_exec,
    status,
    truncated,
    watch_events,
)

CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
EXEC = "/api/v1/namespaces/kube-system/pods/agent/exec"


@pytest.fixture
def api() -> Iterator[FlakyApi]:
    server = FlakyApi()
    yield server
    server.stop()


def client(api: FlakyApi, tmp_path: Path, request_timeout: float = 5.0,
           retry_budget: float = 6.0) -> KubeClient:
    kube = KubeClient("kind-flaky", str(api.write_kubeconfig(tmp_path / "kubeconfig")),
                      request_timeout=request_timeout)
    kube.retry_budget = retry_budget  # tests keep the bound short
    return kube


def configmap(name: str, rv: str = "1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": rv}}


def cm_list(*items: dict[str, Any], rv: str = "10") -> dict[str, Any]:
    return {"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {"resourceVersion": rv},
            "items": list(items)}


def within(seconds: float, work: Callable[[], Any]) -> tuple[Any, BaseException | None, float]:
    """Run ``work`` in a thread; fail the test if it has not returned after ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # handed back to the test
            box["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds}s"
    return box.get("value"), box.get("error"), time.monotonic() - started


# -- 1. exec honours its deadline ---------------------------------------------------------------

def test_exec_on_a_silent_stream_ends_at_its_deadline(api: FlakyApi, tmp_path: Path) -> None:
    api.start()
    answered = threading.Event()
    api.script("GET", EXEC, silent_exec(answered=answered))
    kube = client(api, tmp_path)
    _, error, took = within(10, lambda: kube.exec("kube-system", "agent", ["hubble", "status"],
                                                  timeout=2.5))
    assert answered.is_set()  # the upgrade completed: the wait that ended was the silent read
    assert isinstance(error, Unreachable), error
    assert "no answer within 2.5s" in error.message, error.message
    assert 2.4 <= took < 5


def test_exec_whose_upgrade_never_completes_ends_at_its_deadline(api: FlakyApi,
                                                                  tmp_path: Path) -> None:
    api.start()
    api.script("GET", EXEC, never_upgrade())
    kube = client(api, tmp_path)
    _, error, took = within(8, lambda: kube.exec("kube-system", "agent", ["true"], timeout=1))
    assert isinstance(error, Unreachable), error
    assert took < 3


def test_a_rest_call_during_an_exec_handshake_stays_plain_http(api: FlakyApi,
                                                               tmp_path: Path) -> None:
    """kubernetes.stream swaps `call_api` on the ApiClient it is given while it connects: on a
    shared client, this GET would be sent as a websocket upgrade."""
    api.start()
    upgrading = threading.Event()
    api.script("GET", EXEC, silent_exec(upgrading, delay=1.5))
    api.script("GET", CONFIGMAPS, ok(cm_list(configmap("a"))))
    kube = client(api, tmp_path)
    kube.version()  # the REST client exists before the exec starts
    threading.Thread(target=lambda: _swallow(lambda: kube.exec(
        "kube-system", "agent", ["true"], timeout=3)), daemon=True).start()
    assert upgrading.wait(5)
    _, error, _ = within(5, lambda: kube.list("v1", "ConfigMap", "default"))
    assert error is None, error
    gets = api.seen("GET", CONFIGMAPS)
    assert len(gets) == 1 and "watch" not in gets[0].query


def _swallow(work: Callable[[], Any]) -> None:
    with contextlib.suppress(KubeError):
        work()


# -- 3. transient API errors are retried, with a bound -------------------------------------------

def test_connection_refused_while_the_api_server_restarts_is_retried(api: FlakyApi,
                                                                     tmp_path: Path) -> None:
    api.script("GET", CONFIGMAPS, ok(cm_list(configmap("a"))))
    kube = client(api, tmp_path)
    threading.Timer(1.0, api.start).start()
    items, error, took = within(10, lambda: kube.list("v1", "ConfigMap", "default"))
    assert error is None, error
    assert [i["metadata"]["name"] for i in items] == ["a"]
    assert took >= 0.9


def test_a_server_that_stays_down_costs_one_budget_not_one_per_call(api: FlakyApi,
                                                                     tmp_path: Path) -> None:
    kube = client(api, tmp_path, retry_budget=1.5)
    _, first, took_first = within(10, lambda: kube.version())
    _, second, took_second = within(10, lambda: kube.version())
    assert isinstance(first, Unreachable) and isinstance(second, Unreachable)
    assert took_first >= 0.5 and took_second < 0.3, (took_first, took_second)
    api.start()  # back: the next call answers, and retries are on again
    _, error, _ = within(10, lambda: kube.version())
    assert error is None, error


def test_a_create_refused_at_connect_is_sent_again(api: FlakyApi, tmp_path: Path) -> None:
    """A refused connection never reached the server: even a POST is safe to send again."""
    api.script("POST", CONFIGMAPS, ok(configmap("c")))
    kube = client(api, tmp_path)
    threading.Timer(1.0, api.start).start()
    obj, error, _ = within(10, lambda: kube.request("POST", CONFIGMAPS, body=configmap("c")))
    assert error is None, error
    assert obj["metadata"]["name"] == "c" and len(api.seen("POST", CONFIGMAPS)) == 1


def test_429_honours_retry_after(api: FlakyApi, tmp_path: Path) -> None:
    api.start()
    path = CONFIGMAPS + "/c"
    api.script("PATCH", path, status(429, "TooManyRequests", headers={"Retry-After": "1"}),
               ok(configmap("c", "7")))
    kube = client(api, tmp_path)
    obj, error, _ = within(10, lambda: kube.apply(configmap("c")))
    assert error is None, error
    assert obj["metadata"]["resourceVersion"] == "7"
    first, second = api.seen("PATCH", path)
    assert second.at - first.at >= 0.95  # waited as asked, not the default back-off


def test_a_create_refused_with_429_is_sent_again(api: FlakyApi, tmp_path: Path) -> None:
    """429 means the request was not processed: even a POST is safe to send again."""
    api.start()
    api.script("POST", CONFIGMAPS, status(429, "TooManyRequests", headers={"Retry-After": "0"}),
               ok(configmap("c")))
    kube = client(api, tmp_path)
    obj, error, _ = within(10, lambda: kube.request("POST", CONFIGMAPS, body=configmap("c")))
    assert error is None, error
    assert obj["metadata"]["name"] == "c" and len(api.seen("POST", CONFIGMAPS)) == 2


@pytest.mark.parametrize("code", [500, 503])
def test_server_errors_on_a_read_are_retried(api: FlakyApi, tmp_path: Path, code: int) -> None:
    api.start()
    api.script("GET", CONFIGMAPS, status(code, "ServiceUnavailable"),
               status(code, "ServiceUnavailable"), ok(cm_list(configmap("a"))))
    kube = client(api, tmp_path)
    items, error, _ = within(10, lambda: kube.list("v1", "ConfigMap", "default"))
    assert error is None, error
    assert len(items) == 1 and len(api.seen("GET", CONFIGMAPS)) == 3


def test_a_body_cut_short_is_retried(api: FlakyApi, tmp_path: Path) -> None:
    api.start()
    api.script("GET", CONFIGMAPS, truncated(cm_list(configmap("a"), configmap("b"))),
               ok(cm_list(configmap("a"))))
    kube = client(api, tmp_path)
    items, error, _ = within(10, lambda: kube.list("v1", "ConfigMap", "default"))
    assert error is None, error
    assert len(items) == 1 and len(api.seen("GET", CONFIGMAPS)) == 2


def test_a_read_timeout_is_retried(api: FlakyApi, tmp_path: Path) -> None:
    api.start()
    path = CONFIGMAPS + "/c"
    api.script("PATCH", path, late(1.5, ok(configmap("c", "6"))), ok(configmap("c", "7")))
    kube = client(api, tmp_path, request_timeout=0.5)
    obj, error, _ = within(10, lambda: kube.apply(configmap("c")))
    assert error is None, error
    assert obj["metadata"]["resourceVersion"] == "7"


def test_server_side_apply_is_retried_with_back_off(api: FlakyApi, tmp_path: Path) -> None:
    api.start()
    path = CONFIGMAPS + "/c"
    api.script("PATCH", path, status(503, "ServiceUnavailable"), status(500, "InternalError"),
               ok(configmap("c", "7")))
    kube = client(api, tmp_path)
    obj, error, _ = within(10, lambda: kube.apply(configmap("c")))
    assert error is None, error
    assert obj["metadata"]["resourceVersion"] == "7"
    attempts = api.seen("PATCH", path)
    assert len(attempts) == 3
    assert attempts[2].at - attempts[1].at > attempts[1].at - attempts[0].at  # backs off


def test_the_retry_is_bounded(api: FlakyApi, tmp_path: Path) -> None:
    api.start()
    path = CONFIGMAPS + "/c"
    api.script("PATCH", path, *[status(503, "ServiceUnavailable")] * 50)
    kube = client(api, tmp_path, retry_budget=2.0)
    _, error, took = within(10, lambda: kube.apply(configmap("c")))
    assert isinstance(error, Unavailable), error
    assert 2 <= len(api.seen("PATCH", path)) < 10
    assert took < 4


def test_a_create_is_not_repeated_after_a_server_error(api: FlakyApi, tmp_path: Path) -> None:
    """A POST that failed with 5xx may have been applied: sending it again is not safe."""
    api.start()
    api.script("POST", CONFIGMAPS, status(503, "ServiceUnavailable"), ok(configmap("c")))
    kube = client(api, tmp_path)
    _, error, _ = within(10, lambda: kube.request("POST", CONFIGMAPS, body=configmap("c")))
    assert isinstance(error, Unavailable), error
    assert len(api.seen("POST", CONFIGMAPS)) == 1


def test_errors_stay_lab_errors(api: FlakyApi, tmp_path: Path) -> None:
    api.start()
    api.script("POST", CONFIGMAPS, truncated(configmap("c")))
    kube = client(api, tmp_path)
    _, error, _ = within(10, lambda: kube.request("POST", CONFIGMAPS, body=configmap("c")))
    assert isinstance(error, Unreachable), error


# -- watches that expire re-list -----------------------------------------------------------------

def test_a_watch_answered_410_gone_relists_and_watches_on(api: FlakyApi, tmp_path: Path) -> None:
    api.start()
    api.script("GET", CONFIGMAPS,
               status(410, "Expired", "too old resource version: 5 (9)"),   # the watch
               ok(cm_list(configmap("a", "9"), rv="9")),                     # the re-list
               watch_events({"type": "ADDED", "object": configmap("b", "11")}))
    kube = client(api, tmp_path)
    events, error, _ = within(10, lambda: list(kube.watch(
        "v1", "ConfigMap", "default", resource_version="5", timeout_seconds=5)))
    assert error is None, error
    assert [(t, o["metadata"]["name"]) for t, o in events] == [("ADDED", "a"), ("ADDED", "b")]
    watch_rvs = [s.query.get("resourceVersion") for s in api.seen("GET", CONFIGMAPS)
                 if s.query.get("watch") == ["true"]]
    assert watch_rvs == [["5"], ["9"]]


def test_a_410_error_event_in_the_stream_relists(api: FlakyApi, tmp_path: Path) -> None:
    api.start()
    gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                                        "status": "Failure", "reason": "Expired", "code": 410,
                                        "message": "too old resource version: 5 (9)"}}
    api.script("GET", CONFIGMAPS,
               watch_events({"type": "MODIFIED", "object": configmap("a", "6")}, gone),
               ok(cm_list(configmap("a", "9"), rv="9")),
               watch_events())
    kube = client(api, tmp_path)
    events, error, _ = within(10, lambda: list(kube.watch(
        "v1", "ConfigMap", "default", resource_version="5", timeout_seconds=5)))
    assert error is None, error
    assert [(t, o["metadata"]["name"]) for t, o in events] == [("MODIFIED", "a"),
                                                               ("ADDED", "a")]
    watch_rvs = [s.query.get("resourceVersion") for s in api.seen("GET", CONFIGMAPS)
                 if s.query.get("watch") == ["true"]]
    assert watch_rvs == [["5"], ["9"]]


def test_exec_asks_for_the_command_with_the_contexts_credentials(
        api: FlakyApi, tmp_path: Path) -> None:
    """The websocket request is built like every REST call: the bearer token of the context,
    the command word by word, the container, stdout and stderr without stdin or a TTY."""
    api.script("GET", EXEC, status(403, "Forbidden", "exec is not allowed"))
    api.start()
    kube = client(api, tmp_path)
    with pytest.raises(KubeError):
        kube.exec("kube-system", "agent", ["hubble", "observe", "--last", "1"],
                  container="cilium-agent", timeout=5)
    (seen,) = [s for s in api.state.seen if s.path == EXEC]
    assert seen.headers["authorization"] == "Bearer t"
    assert seen.headers["upgrade"].lower() == "websocket"
    assert seen.query == {"command": ["hubble", "observe", "--last", "1"],
                          "container": ["cilium-agent"], "stderr": ["true"], "stdin": ["false"],
                          "stdout": ["true"], "tty": ["false"]}
