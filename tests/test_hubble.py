"""`lab.hubble --observe`: flows streamed from hubble-relay through an agent pod, filtered."""

from __future__ import annotations

import json

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
    emu = lab_env.emulators["lab"]
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
    emu = lab_env.emulators["lab"]
    for obj in objects.cni_ready(["lab-control-plane"]):  # a call, if made, would succeed
        if obj["kind"] != "CiliumNode":
            emu.put(obj)
    emu.write_kubeconfig(lab_env.kubeconfig, context="kind-lab")
    emu.on_exec(lambda *a: (0, json.dumps(DROP) + "\n", ""))
    proc = lab_env.run("lab.hubble", "--observe", "--verdict", "DENIED", check=False)
    assert proc.returncode == 1 and "unknown verdict" in proc.stderr
    assert emu.exec_calls == [] and emu.requests == []
