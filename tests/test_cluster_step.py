"""The `cluster` step against the fake kind/docker (tests/fakes) and a real API server.

Expectations come from kind v0.29.0's behaviour as the fake models it (network override, the
kubeconfig lock taken only for the final export, `node(s) already exist`) and from the config.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.errors import LabError
from lab.steps.cluster import (
    CREATE_STARTED,
    ClusterStep,
    cluster_kubeconfig,
    kind_kubeconfig_write,
)
from tests.conftest import ready_node, step_context
from tests.fakes.fakelib import read_calls, read_intervals, read_state, write_state
from tests.support.apifront import ApiFront

REPO = Path(__file__).resolve().parent.parent




@pytest.fixture
def emu(kube_api: ApiFront) -> ApiFront:
    """The API server the fake kind's cluster answers with: a real one, clean."""
    return kube_api


def raw_config(**cluster: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((REPO / "config" / "lab.yaml").read_text())
    raw["clusters"][0].update(cluster)
    return raw


def kind_calls(fake: Path, sub: str | None = None) -> list[dict[str, Any]]:
    return [c for c in read_calls(str(fake))
            if c["tool"] == "kind" and (sub is None or c["argv"][0] == sub)]


def runs(items: list[str]) -> list[str]:
    """Consecutive repeats collapsed (a delete also clears the user's kubeconfig: two calls)."""
    return [k for k, _ in itertools.groupby(items)]


def own_context(tmp_path: Path, raw: dict[str, Any], fake: Path, emu: ApiFront) -> Any:
    """A context whose kubeconfig is the cluster's own file, written by the fake kind."""
    ctx = step_context(tmp_path, raw)
    ctx.kubeconfig = str(cluster_kubeconfig(ctx.lab.state_dir, ctx.cluster.name))
    servers = read_state(str(fake), "apiservers.json", {}) or {}
    write_state(str(fake), "apiservers.json", {**servers, ctx.cluster.name: emu.url})
    return ctx


@pytest.fixture
def silent_api_gives_up_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused API is retried for 30 s in the product (riding out restarts); these tests are
    about what the step decides once it gives up, so they give up after 1 s."""
    import functools

    import lab.steps.base
    from lab.kube import KubeClient

    monkeypatch.setattr(lab.steps.base, "KubeClient",
                        functools.partial(KubeClient, retry_budget=1.0))


def half_create(fake: Path, ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `kind create` killed after it made the containers (the fake leaves it `creating`)."""
    cfg = ctx.write_file("kind.yaml", ClusterStep().render(ctx).files["kind.yaml"])
    monkeypatch.setenv("LAB_FAKE_SLEEP", "kind:create=30")
    import subprocess

    proc = subprocess.Popen(["kind", "create", "cluster", "--name", ctx.cluster.name,
                             "--config", str(cfg), "--kubeconfig", str(ctx.kubeconfig)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while ctx.cluster.name not in (read_state(str(fake), "kind.json", {}) or {}).get(
            "clusters", {}):
        assert time.monotonic() < deadline, "the fake kind never recorded the cluster"
        time.sleep(0.05)
    proc.kill()
    proc.wait(10)
    monkeypatch.delenv("LAB_FAKE_SLEEP")


# -- dockerNetwork reaches kind --------------------------------------------------------------------

def test_docker_network_is_passed_to_kind_and_shown_in_the_plan(
        tmp_path: Path, fake: Path, emu: ApiFront) -> None:
    raw = raw_config()
    raw["dockerNetwork"] = "labnet"
    raw["clusters"][0].pop("lbPool")
    ctx = own_context(tmp_path, raw, fake, emu)
    plan = ClusterStep().render(ctx).commands[0]
    assert plan[0] == "KIND_EXPERIMENTAL_DOCKER_NETWORK=labnet"
    assert plan[1:4] == ["kind", "create", "cluster"]
    ClusterStep().apply(ctx)
    creates = kind_calls(fake, "create")
    assert [c["env"].get("KIND_EXPERIMENTAL_DOCKER_NETWORK") for c in creates] == ["labnet"]
    # The node really sits on that network (docker's view, as the mesh step reads it).
    import subprocess

    nets = subprocess.run(["docker", "inspect", "--format", "{{json .NetworkSettings.Networks}}",
                           "lab-control-plane"], capture_output=True, text=True, check=True)
    assert list(json.loads(nets.stdout)) == ["labnet"]


def test_default_network_sets_no_override(tmp_path: Path, fake: Path, emu: ApiFront) -> None:
    ctx = own_context(tmp_path, raw_config(), fake, emu)
    assert ClusterStep().render(ctx).commands[0][0] == "kind"
    ClusterStep().apply(ctx)
    assert all("KIND_EXPERIMENTAL_DOCKER_NETWORK" not in c["env"] for c in kind_calls(fake))


# -- half-created clusters -------------------------------------------------------------------------

@pytest.mark.usefixtures("silent_api_gives_up_soon")
def test_own_half_created_cluster_whose_api_never_came_up_is_replaced(
        tmp_path: Path, fake: Path, emu: ApiFront, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = own_context(tmp_path, raw_config(), fake, emu)
    ctx.facts[CREATE_STARTED] = "2026-01-01T00:00:00Z"  # saved before the killed create
    half_create(fake, ctx, monkeypatch)
    write_state(str(fake), "apiservers.json", {"lab": "http://127.0.0.1:9"})  # nothing answers
    ClusterStep().apply(ctx)
    subs = [c["argv"][0] for c in kind_calls(fake) if c["argv"][0] in ("create", "delete")]
    assert runs(subs) == ["create", "delete", "create"]
    assert ctx.facts.get("created") is True and CREATE_STARTED not in ctx.facts


@pytest.mark.usefixtures("silent_api_gives_up_soon")
def test_a_stopped_cluster_the_lab_did_not_create_is_left_alone(
        tmp_path: Path, fake: Path, emu: ApiFront, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = own_context(tmp_path, raw_config(), fake, emu)
    half_create(fake, ctx, monkeypatch)  # e.g. the user's own cluster, seen by a fresh state dir
    write_state(str(fake), "apiservers.json", {"lab": "http://127.0.0.1:9"})
    with pytest.raises(LabError) as err:
        ClusterStep().apply(ctx)
    assert "did not create it" in err.value.message
    assert "docker start lab-control-plane" in err.value.hint
    assert "kind delete cluster --name lab" in err.value.hint
    assert not kind_calls(fake, "delete")


def test_create_killed_before_workers_joined_is_half_created_not_a_mismatch(
        tmp_path: Path, fake: Path, emu: ApiFront, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = own_context(tmp_path, raw_config(workers=1), fake, emu)
    ctx.facts[CREATE_STARTED] = "2026-01-01T00:00:00Z"
    half_create(fake, ctx, monkeypatch)
    emu.put(ready_node("lab-control-plane"))  # the control plane answers; the worker never joined
    ClusterStep().apply(ctx)
    subs = [c["argv"][0] for c in kind_calls(fake) if c["argv"][0] in ("create", "delete")]
    assert runs(subs) == ["create", "delete", "create"]


def test_a_foreign_cluster_missing_a_worker_is_refused(
        tmp_path: Path, fake: Path, emu: ApiFront, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = own_context(tmp_path, raw_config(workers=1), fake, emu)
    half_create(fake, ctx, monkeypatch)
    emu.put(ready_node("lab-control-plane"))
    with pytest.raises(LabError, match="does not match the config"):
        ClusterStep().apply(ctx)
    assert not kind_calls(fake, "delete")


# -- adopted clusters: port mappings ---------------------------------------------------------------

def test_adopting_a_cluster_with_other_port_mappings_is_refused(
        tmp_path: Path, fake: Path, emu: ApiFront) -> None:
    raw = raw_config()
    raw["clusters"][0]["gateway"]["httpsHostPort"] = 31443
    ClusterStep().apply(own_context(tmp_path / "before", raw, fake, emu))
    emu.put(ready_node("lab-control-plane"))
    ctx = own_context(tmp_path, raw_config(), fake, emu)  # the config now wants 30443
    with pytest.raises(LabError) as err:
        ClusterStep().apply(ctx)
    assert ("NodePort 30443 is 127.0.0.1:31443 on the host, config wants 127.0.0.1:30443"
            in err.value.message)
    assert "invoke lab.down --cluster lab" in err.value.hint
    assert len(kind_calls(fake, "create")) == 1


def test_adopting_a_matching_cluster_creates_nothing(
        tmp_path: Path, fake: Path, emu: ApiFront) -> None:
    ClusterStep().apply(own_context(tmp_path / "before", raw_config(), fake, emu))
    emu.put(ready_node("lab-control-plane"))
    ctx = own_context(tmp_path, raw_config(), fake, emu)
    ClusterStep().apply(ctx)
    assert len(kind_calls(fake, "create")) == 1
    assert "created" not in ctx.facts  # adopted, not created by this record


# -- kind's kubeconfig lock ------------------------------------------------------------------------

def test_lock_error_at_the_end_of_create_exports_instead_of_creating_again(
        tmp_path: Path, fake: Path, emu: ApiFront) -> None:
    ctx = own_context(tmp_path, raw_config(), fake, emu)
    lock = Path(str(ctx.kubeconfig) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()  # someone else's kubectl holds kind's lock file

    def release_after_create_failed() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if kind_calls(fake, "export"):
                lock.unlink()
                return
            time.sleep(0.02)

    t = threading.Thread(target=release_after_create_failed)
    t.start()
    ClusterStep().apply(ctx)
    t.join()
    assert len(kind_calls(fake, "create")) == 1
    assert kind_calls(fake, "export")
    kc = yaml.safe_load(Path(ctx.kubeconfig).read_text())
    assert [c["name"] for c in kc["contexts"]] == ["kind-lab"]


def test_parallel_creates_overlap_and_never_share_a_kubeconfig(
        tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch,
        envtest_cluster: Any) -> None:
    mesh: dict[str, Any] = yaml.safe_load((REPO / "config" / "mesh.yaml").read_text())
    # one front each: the clusters' kubeconfigs differ in their server URL (one real server)
    emus = [ApiFront(envtest_cluster.client).start() for _ in mesh["clusters"]]
    try:
        monkeypatch.setenv("LAB_FAKE_SLEEP", "kind:create=1.5")
        from lab.state import Record

        contexts = []
        for i, e in enumerate(emus):
            ctx = step_context(tmp_path, mesh)
            ctx.cluster = ctx.lab.clusters[i]
            ctx.record = Record(cluster=ctx.cluster.name)
            ctx.kubeconfig = str(cluster_kubeconfig(ctx.lab.state_dir, ctx.cluster.name))
            servers = read_state(str(fake), "apiservers.json", {}) or {}
            write_state(str(fake), "apiservers.json", {**servers, ctx.cluster.name: e.url})
            contexts.append(ctx)
        errors: list[BaseException] = []

        def create(ctx: Any) -> None:
            try:
                ClusterStep().apply(ctx)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=create, args=(c,)) for c in contexts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        creates = [c for c in read_intervals(str(fake))
                   if c["tool"] == "kind" and c["argv"][0] == "create"]
        assert len(creates) == 2
        a, b = creates
        assert a["start"] < b["end"] and b["start"] < a["end"], "the creates took turns"
        files = {c["argv"][c["argv"].index("--kubeconfig") + 1] for c in creates}
        assert files == {str(c.kubeconfig) for c in contexts}
        for ctx in contexts:
            kc = yaml.safe_load(Path(ctx.kubeconfig).read_text())
            assert [c["name"] for c in kc["contexts"]] == [ctx.cluster.kube_context]
        # kubectl still finds both: the user's kubeconfig got each context, one write at a time.
        user = yaml.safe_load(Path(os.environ["KUBECONFIG"]).read_text())
        assert sorted(c["name"] for c in user["contexts"]) == ["kind-east", "kind-west"]
    finally:
        for e in emus:
            e.stop()


def test_down_clears_the_users_context_and_the_clusters_own_kubeconfig(
        tmp_path: Path, fake: Path, emu: ApiFront) -> None:
    ctx = own_context(tmp_path, raw_config(), fake, emu)
    ClusterStep().apply(ctx)
    user = Path(os.environ["KUBECONFIG"])
    assert [c["name"] for c in yaml.safe_load(user.read_text())["contexts"]] == ["kind-lab"]
    kind_kubeconfig_write(ctx, ["delete", "cluster", "--name", "lab"], "deleting")
    assert yaml.safe_load(user.read_text())["contexts"] == []
    assert not Path(ctx.kubeconfig).exists()
    assert (read_state(str(fake), "kind.json", {}) or {}).get("clusters") == {}


def test_a_create_kind_cleaned_up_itself_leaves_no_creation_fact(
        tmp_path: Path, fake: Path, emu: ApiFront, monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.errors import ToolError

    ctx = own_context(tmp_path, raw_config(), fake, emu)
    monkeypatch.setenv("LAB_FAKE_FAIL", "kind:create")  # kubeadm init fails; kind deletes nodes
    with pytest.raises(ToolError):
        ClusterStep().apply(ctx)
    assert CREATE_STARTED not in ctx.facts
    assert CREATE_STARTED not in ctx.store.load("lab").facts
