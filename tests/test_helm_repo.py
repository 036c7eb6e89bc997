"""Helm chart repositories are the user's state too, and parallel clusters share them.

Against the fake helm (tests/fakes), whose `repo add` refuses a differing entry without
`--force-update` and whose `search repo` reads only the index fetched at add/update time, as
helm v3.19.0 does (cmd/helm/repo_add.go, cmd/helm/search_repo.go).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from lab.errors import LabError
from lab.helm import HELM_TIMEOUT, ensure_release
from lab.state import Record
from lab.steps.base import HelmRelease
from lab.steps.certs import cert_manager_values
from tests.conftest import step_context
from tests.fakes.fakelib import read_calls, read_intervals, read_state, write_state
from tests.support.apifront import ApiFront

REPO = Path(__file__).resolve().parent.parent
URL = "https://charts.example.org/demo"


def demo(version: str = "1.2.3", repo: str = "demo", url: str = URL) -> HelmRelease:
    return HelmRelease(release="demo", chart=f"{repo}/demo", repo_name=repo, repo_url=url,
                       version=version, namespace="default", values={"replicas": 1})




@pytest.fixture
def ctx(tmp_path: Path, fake: Path, kube_api: ApiFront) -> Any:
    return step_context(tmp_path, yaml.safe_load((REPO / "config" / "lab.yaml").read_text()),
                        kube_api)


def helm_argv(fake: Path, *prefix: str) -> list[list[str]]:
    return [c["argv"] for c in read_calls(str(fake))
            if c["tool"] == "helm" and c["argv"][:len(prefix)] == list(prefix)]


def test_missing_repo_is_added_without_force_and_not_updated(ctx: Any, fake: Path) -> None:
    ensure_release(ctx, demo())
    assert helm_argv(fake, "repo", "add") == [["repo", "add", "demo", URL]]
    assert helm_argv(fake, "repo", "update") == []
    upgrade = helm_argv(fake, "upgrade")[0]
    assert upgrade[upgrade.index("--timeout") + 1] == HELM_TIMEOUT == "15m0s"


def test_configured_repo_with_the_version_is_left_alone(ctx: Any, fake: Path) -> None:
    ensure_release(ctx, demo())
    ensure_release(ctx, demo("1.2.4"))  # a new pin: the index ("*" in the fake) lists it
    assert len(helm_argv(fake, "repo", "add")) == 1
    assert helm_argv(fake, "repo", "update") == []


def test_index_refreshed_only_when_the_pinned_version_is_missing(ctx: Any, fake: Path) -> None:
    write_state(str(fake), "helm-index.json", {URL: {"demo": ["1.2.3"]}})
    ensure_release(ctx, demo())
    assert helm_argv(fake, "repo", "update") == []
    write_state(str(fake), "helm-index.json", {URL: {"demo": ["1.2.3", "1.3.0"]}})
    ensure_release(ctx, demo("1.3.0"))
    assert helm_argv(fake, "repo", "update") == [["repo", "update", "demo"]]


def test_a_users_differing_entry_is_used_never_overwritten(ctx: Any, fake: Path) -> None:
    mirror = "https://mirror.example.org/charts"
    write_state(str(fake), "helm-repos.json", {"demo": {"name": "demo", "url": mirror,
                                                        "index": {"demo": ["1.2.3"]}}})
    write_state(str(fake), "helm-index.json", {mirror: {"demo": ["1.2.3"]}})
    with structlog.testing.capture_logs() as logs:
        ensure_release(ctx, demo())
    assert helm_argv(fake, "repo", "add") == []
    assert read_state(str(fake), "helm-repos.json")["demo"]["url"] == mirror
    assert [e["configured"] for e in logs if e["event"] == "helm.repo_differs"] == [mirror]
    with pytest.raises(LabError) as err:  # the mirror lacks the pin: say so, change nothing
        ensure_release(ctx, demo("9.9.9"))
    assert mirror in err.value.message and "--force-update" in err.value.hint
    assert read_state(str(fake), "helm-repos.json")["demo"]["url"] == mirror


def test_cert_manager_startupapicheck_hook_is_off() -> None:
    # cert-manager v1.19.0 templates/startupapicheck-job.yaml: `{{- if .Values.startupapicheck
    # .enabled }}`, a post-install hook (values.yaml jobAnnotations) helm waits for.
    assert cert_manager_values()["startupapicheck"] == {"enabled": False}


def test_parallel_clusters_never_write_repo_state_while_helm_reads_it(
        tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch,
        envtest_cluster: Any) -> None:
    raw = yaml.safe_load((REPO / "config" / "mesh.yaml").read_text())
    raw["clusters"].append({"name": "north"})
    monkeypatch.setenv("LAB_FAKE_SLEEP", "helm:upgrade=1.5")
    emu = ApiFront(envtest_cluster.client).start()
    try:
        contexts = []
        for i in range(3):
            c = step_context(tmp_path, raw, emu)
            c.cluster = c.lab.clusters[i]
            c.record = Record(cluster=c.cluster.name)
            c.kubeconfig = str(emu.write_kubeconfig(tmp_path / "kubeconfig",
                                                    context=c.cluster.kube_context))
            contexts.append(c)
        releases = [demo(), demo(), demo(repo="other", url="https://charts.example.org/other")]
        errors: list[BaseException] = []

        def install(c: Any, r: HelmRelease) -> None:
            try:
                ensure_release(c, r)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=install, args=p)
                   for p in zip(contexts, releases, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
    finally:
        emu.stop()
    calls = [c for c in read_intervals(str(fake)) if c["tool"] == "helm"]
    upgrades = [c for c in calls if c["argv"][0] == "upgrade"]
    writes = [c for c in calls if c["argv"][:2] in (["repo", "add"], ["repo", "update"])]
    assert len(upgrades) == 3 and len(writes) == 2
    for w in writes:
        for u in upgrades:
            assert w["end"] <= u["start"] or u["end"] <= w["start"], (w["argv"], u["argv"])
    overlapping = [(a, b) for i, a in enumerate(upgrades) for b in upgrades[i + 1:]
                   if a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping, "the clusters' helm upgrades took turns"
