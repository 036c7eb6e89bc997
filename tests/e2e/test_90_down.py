"""`lab.down` removes every cluster, container and record it created. Runs last."""

from __future__ import annotations

import json
import subprocess

from lab.bootstrap import tools_dir
from tests.e2e.conftest import E2ELab


def test_down_removes_clusters_containers_and_records(e2e_lab: E2ELab) -> None:
    e2e_lab.invoke("lab.down")
    names = {c.name for c in e2e_lab.cfg.clusters}
    bundled = tools_dir() / "kind"
    kind = subprocess.run([str(bundled) if bundled.exists() else "kind", "get", "clusters"],
                          capture_output=True, text=True, check=False)
    assert not names & set(kind.stdout.split())
    for name in names:
        ps = subprocess.run(["docker", "ps", "-a", "--filter",
                             f"label=io.x-k8s.kind.cluster={name}", "--format", "{{.Names}}"],
                            capture_output=True, text=True, check=True)
        assert ps.stdout.strip() == ""
    records = e2e_lab.cfg.state_dir / "clusters"
    assert not records.exists() or not list(records.glob("*.json"))
    rows = json.loads(e2e_lab.invoke("lab.status", "--json", "--offline").stdout)
    assert all(r["state"] == "absent" for r in rows)
