"""Wall-time figures (run with `nox -s bench` or `python -m tests.bench`). Prints, asserts nothing.

- `invoke --list`: the cost of every task invocation before it does anything (goal ≤ 0.5 s).
- a converged `lab.up --resume` against a real API server (envtest) and the fake tools: the cost
  of the spine itself (probe every completed step, find nothing to do), at `cluster` and — with
  the cluster simulator (tests/support/simcluster.py) on that server — at `locked`.
- a converged plain `lab.up` (re-applies every step, changes nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import LabEnv, ready_node, write_config
from tests.support.apifront import ApiFront
from tests.support.envtest import EnvtestServer, ServerPool
from tests.support.warm import COLD_ENV

REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A measured command failed: what ran and what it said."""


def _time(cmd: list[str], runs: int, **kw: object) -> list[float]:
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.run(cmd, check=False, capture_output=True,  # type: ignore[call-overload]
                              text=True, **kw)
        if proc.returncode != 0:
            raise BenchError(f"`{' '.join(cmd[2:])}` exited with {proc.returncode}:\n"
                             + (proc.stderr or proc.stdout)[-2000:])
        out.append(time.perf_counter() - started)
    return out


def _fmt(name: str, samples: list[float]) -> str:
    return (f"{name:<44} median {statistics.median(samples):6.3f}s  "
            f"min {min(samples):6.3f}s  max {max(samples):6.3f}s  (n={len(samples)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="samples per figure")
    args = parser.parse_args()
    os.environ[COLD_ENV] = "1"  # every task a fresh interpreter, as a user starts it
    try:
        results, skipped = _measure(args.runs)
    except (BenchError, AssertionError) as exc:
        sys.exit(f"benchmark failed: {exc}")
    print(f"kind-cilium-lab wall times on this machine ({sys.platform}, "
          f"Python {sys.version.split()[0]}):")
    for name, samples in results.items():
        print("  " + _fmt(name, samples))
    for line in skipped:
        print("  " + line)


def _measure(runs: int) -> tuple[dict[str, list[float]], list[str]]:
    results: dict[str, list[float]] = {}
    skipped: list[str] = []
    results["invoke --list"] = _time([sys.executable, "-m", "invoke", "--list"], runs,
                                     cwd=REPO)
    from tests.support import deps

    deps.prepare_upstream()  # where the folder is absent, fetch the pinned files (online)
    try:
        upstream, assets = deps.require_upstream(), deps.require_envtest()
    except deps.Missing as missing:
        # The labs run on a real API server with the pinned CRDs; the simulated one also installs
        # the pinned Gateway API CRDs from the upstream folder (no network).
        skipped.append(f"{'simulated lab figures':<44} skipped: {missing.reason}")
        return results, skipped
    pool = ServerPool(assets, upstream)
    try:
        with pool.lease() as (server,):
            results.update(_cluster_figures(server, runs))
        with pool.lease() as servers:
            results.update(_locked_figures(servers, runs))
    finally:
        pool.stop_all()
    return results, skipped


def _cluster_figures(server: EnvtestServer, runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, ApiFront(server.client) as emu:
        root = Path(tmp)
        fake = root / "fake"
        fake.mkdir()
        emu.put(ready_node("lab-control-plane"))
        (fake / "apiservers.json").write_text(json.dumps({"lab": emu.url}))
        lab = LabEnv(root=root, config=write_config(root / "lab.yaml"), fake_state=fake,
                     kubeconfig=root / "kubeconfig", fronts={"lab": emu})
        lab.run("lab.up", "--to", "cluster")
        results["converged lab.up --resume --to cluster"] = _time(
            lab.command("lab.up", "--resume", "--to", "cluster"), runs, cwd=root,
            env=lab.env())
        results["converged lab.up --to cluster (re-apply)"] = _time(
            lab.command("lab.up", "--to", "cluster"), runs, cwd=root, env=lab.env())
    return results


def _locked_figures(servers: list[EnvtestServer], runs: int) -> dict[str, list[float]]:
    from tests.support.simcluster import sim_lab

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, sim_lab(Path(tmp), servers) as sim:
        env = sim.env
        started = time.perf_counter()
        env.run("lab.up", timeout=600)
        results["lab.up absent → locked (simulated cluster)"] = [time.perf_counter() - started]
        results["converged lab.up --resume (locked)"] = _time(
            env.command("lab.up", "--resume"), runs, cwd=env.root, env=env.env())
        results["converged lab.up (locked, re-apply)"] = _time(
            env.command("lab.up"), max(1, runs // 2), cwd=env.root, env=env.env())
    return results


if __name__ == "__main__":
    main()
