"""`lab.hubble --observe`: flows streamed from hubble-relay through an agent pod, filtered."""

from __future__ import annotations

import json
import os
import select
import signal
import socket

import pytest

from lab.errors import LabError
from lab.hubble import ObserveFilter, parse_flows
from tests.conftest import LabEnv
from tests.support import objects

DROP = {"flow": {"verdict": "DROPPED", "drop_reason_desc": "POLICY_DENIED",
                 "source": {"namespace": "lab-probe-a", "pod_name": "probe"},
                 "destination": {"namespace": "lab-probe-b", "pod_name": "probe"}},
        "node_name": "lab-control-plane"}


def test_filter_args_follow_the_hubble_cli() -> None:
    flt = ObserveFilter(verdict="dropped", namespace="echo", pod="echo/echo-", last=50,
                        follow=False, output="json")
    assert flt.args() == ["--verdict", "DROPPED", "--namespace", "echo", "--pod", "echo/echo-",
                          "--last", "50", "--output", "json"]
    assert ObserveFilter().args() == ["--follow", "--output", "compact"]


@pytest.mark.parametrize(("flt", "words"), [
    (ObserveFilter(verdict="DENIED"), "unknown verdict"),
    (ObserveFilter(last=-1), "positive"),
    (ObserveFilter(output="yaml"), "unknown output"),
])
def test_bad_filters_are_refused(flt: ObserveFilter, words: str) -> None:
    with pytest.raises(LabError, match=words):
        flt.validate()


def test_parse_flows_skips_noise() -> None:
    text = "Healthcheck (via 10.96.0.9:80): Ok\n" + json.dumps(DROP) + "\nnot json {\n"
    assert parse_flows(text) == [DROP["flow"]]


def test_observe_task_streams_from_the_relay(lab_env: LabEnv) -> None:
    emu = lab_env.fronts["lab"]
    for obj in objects.cni_ready(["lab-control-plane"]):
        if obj["kind"] != "CiliumNode":
            emu.put(obj)
    emu.write_kubeconfig(lab_env.kubeconfig, context="kind-lab")

    def agent(ns: str, pod: str, container: str, cmd: list[str]):  # type: ignore[no-untyped-def]
        yield 1, json.dumps(DROP) + "\n"
        yield 1, json.dumps(DROP) + "\n"

    emu.on_exec(agent)
    proc = lab_env.run("lab.hubble", "--observe", "--verdict", "DROPPED", "--namespace",
                       "lab-probe-b", "--no-follow", "--output", "json")
    assert len(parse_flows(proc.stdout)) == 2
    (call,) = emu.exec_calls
    assert (call.namespace, call.container) == ("kube-system", "cilium-agent")
    assert call.command == ["hubble", "observe", "--server", "10.96.100.10:80", "--verdict",
                            "DROPPED", "--namespace", "lab-probe-b", "--output", "json"]


def test_observe_task_refuses_a_bad_verdict_before_any_call(lab_env: LabEnv) -> None:
    emu = lab_env.fronts["lab"]
    for obj in objects.cni_ready(["lab-control-plane"]):  # a call, if made, would succeed
        if obj["kind"] != "CiliumNode":
            emu.put(obj)
    emu.write_kubeconfig(lab_env.kubeconfig, context="kind-lab")
    emu.on_exec(lambda *a: (0, json.dumps(DROP) + "\n", ""))
    proc = lab_env.run("lab.hubble", "--observe", "--verdict", "DENIED", check=False)
    assert proc.returncode == 1 and "unknown verdict" in proc.stderr
    assert emu.exec_calls == [] and emu.requests == []


def test_ui_url_is_shown_once_it_listens_and_ctrl_c_ends_it_cleanly(lab_env: LabEnv) -> None:
    """The URL line comes only when the port accepts connections (no retry below), and Ctrl-C,
    the way a port-forward is ended, exits 0 without a traceback or a resume hint."""
    emu = lab_env.fronts["lab"]
    emu.put(objects.pod("hubble-ui-7d9c", "kube-system", {"k8s-app": "hubble-ui"},
                        "lab-control-plane"))
    forwards: list[tuple[str, str, int]] = []

    def ui(ns: str, pod: str, port: int):  # type: ignore[no-untyped-def]
        forwards.append((ns, pod, port))
        return lambda data: b"ui:" + data

    emu.on_portforward(ui)
    emu.write_kubeconfig(lab_env.kubeconfig, context="kind-lab")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = lab_env.start("lab.hubble", "--port", str(port), PYTHONUNBUFFERED="1")
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        assert line == f"Hubble UI for lab: http://127.0.0.1:{port}  (Ctrl-C to stop)\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert conn.recv(100).startswith(b"ui:GET /")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip().endswith("stopped")
    assert "Traceback" not in err and "resume" not in out + err
    assert forwards == [("kube-system", "hubble-ui-7d9c", 8081)]


def test_a_busy_ui_port_shows_no_url_only_what_to_change(lab_env: LabEnv) -> None:
    emu = lab_env.fronts["lab"]
    emu.put(objects.pod("hubble-ui-7d9c", "kube-system", {"k8s-app": "hubble-ui"},
                        "lab-control-plane"))
    emu.write_kubeconfig(lab_env.kubeconfig, context="kind-lab")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = lab_env.run("lab.hubble", "--port", str(port), check=False)
    assert proc.returncode == 1
    assert "http://" not in proc.stdout
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "pick another local port with --port" in proc.stderr
