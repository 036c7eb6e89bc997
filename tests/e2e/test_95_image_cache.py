"""Cold vs warm bring-up through the shared image cache. Runs last (after `lab.down`).

Cold: the cache is purged (`lab.down --purge`), so every image comes from quay.io and
registry.k8s.io through the freshly created proxies. Warm: `lab.down` keeps the cache, so the
second bring-up pulls every image from the proxies on the kind network. Expected: the warm
bring-up is faster (on a CI runner most of a cold bring-up is image pulls), and in a mesh the
second cluster fetches next to nothing from outside: the first cluster already pulled the same
digests through the same proxies, so they answer from their volumes (distribution's proxy counts
what it fetched upstream in `registry.proxy.*.BytesPulled`, read from `/debug/vars`).

Both times, each cluster's per-step durations and the bytes fetched upstream go into
`timings.json` under `imageCache`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from lab import imagecache, logs
from lab.bootstrap import lab_tools
from tests.e2e.conftest import E2ELab

SECOND_CLUSTER_SHARE = 0.05  # of the first cluster's upstream bytes: manifests at most


def _bring_up(lab: E2ELab, *args: str) -> float:
    started = time.monotonic()
    lab.invoke(*args)
    return round(time.monotonic() - started, 1)


def _steps(lab: E2ELab) -> dict[str, Any]:
    rows = json.loads(lab.invoke("lab.status", "--json", "--offline").stdout)
    return {r["cluster"]: r["durations"] for r in rows}


def _upstream_bytes(lab: E2ELab) -> int:
    log = logs.get("e2e")
    return sum(imagecache.ImageCache(lab.cfg, lab_tools(lab.cfg, log), log)
               .upstream_bytes().values())


def test_cold_then_warm_bring_up_through_the_image_cache(e2e_lab: E2ELab) -> None:
    lab = e2e_lab
    task = ["lab.mesh"] if lab.cfg.is_mesh else ["lab.up"]
    result: dict[str, Any] = {}
    lab.invoke("lab.down", "--purge")  # no clusters, no cache: a cold machine

    if lab.cfg.is_mesh:
        first, second = (c.name for c in lab.cfg.clusters[:2])
        started = time.monotonic()
        lab.invoke("lab.up", "--to", "locked", "--cluster", first)
        after_first = _upstream_bytes(lab)
        lab.invoke("lab.up", "--to", "locked", "--cluster", second)
        after_second = _upstream_bytes(lab)
        lab.invoke(*task)
        result["coldSeconds"] = round(time.monotonic() - started, 1)
        result["firstClusterUpstreamBytes"] = after_first
        result["secondClusterUpstreamBytes"] = after_second - after_first
    else:
        result["coldSeconds"] = _bring_up(lab, *task)
        result["coldUpstreamBytes"] = _upstream_bytes(lab)
    result["coldSteps"] = _steps(lab)

    lab.invoke("lab.down")  # keeps the cache
    before_warm = _upstream_bytes(lab)
    result["warmSeconds"] = _bring_up(lab, *task)
    result["warmSteps"] = _steps(lab)
    result["warmUpstreamBytes"] = _upstream_bytes(lab) - before_warm
    cache = json.loads(lab.invoke("lab.cache", "--json").stdout)
    result["cache"] = {k: cache.get(k) for k in ("imagesNeeded", "imagesCached", "diskKiB")}
    lab.extra["imageCache"] = result
    print(json.dumps(result, indent=2))

    assert cache["imagesCached"] == cache["imagesNeeded"], cache.get("missing")
    assert result["warmSeconds"] < result["coldSeconds"], result
    if lab.cfg.is_mesh:
        assert result["firstClusterUpstreamBytes"] > 0, result
        assert (result["secondClusterUpstreamBytes"]
                <= SECOND_CLUSTER_SHARE * result["firstClusterUpstreamBytes"]), result
