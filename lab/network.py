"""LoadBalancer pool slices inside the kind Docker network; who holds a NodePort.

Docker hands container addresses out from the bottom of the network, so the pools are carved from
the top: cluster i gets the i-th slice counting down from the last address. On the usual
172.18.0.0/16 network the first cluster gets the seed's 172.18.255.0/24.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from lab.config import NODEPORT_RANGE, ClusterConfig
from lab.errors import LabError

IPv4Net = ipaddress.IPv4Network
SLICE_PREFIX = 24  # one /24 per cluster when the network has room
MIN_SLICE_PREFIX = 29  # 8 addresses: a gateway plus a few LoadBalancer Services


class PoolError(LabError):
    """The pools cannot be placed inside the Docker network."""


def ipv4_subnet(subnets: Sequence[str], network_name: str) -> IPv4Net:
    """The IPv4 subnet of a Docker network (kind's is dual-stack; L2 announcements are IPv4)."""
    v4 = [ipaddress.ip_network(s, strict=False) for s in subnets
          if ipaddress.ip_network(s, strict=False).version == 4]
    if not v4:
        raise PoolError(
            f"the Docker network {network_name!r} has no IPv4 subnet (found: {', '.join(subnets)})",
            f"recreate it with an IPv4 subnet: `docker network rm {network_name}` and let kind "
            "create it again, or set clusters[].lbPool to a range your network routes",
        )
    return v4[0]  # type: ignore[return-value]


def slice_prefix(network: IPv4Net) -> int:
    """The prefix of each cluster's slice: a /24 when the network is large, else 1/8 of it."""
    return SLICE_PREFIX if network.prefixlen <= 20 else network.prefixlen + 3


def derive_pools(clusters: Sequence[ClusterConfig], subnets: Sequence[str],
                 network_name: str = "kind") -> dict[str, str]:
    """Pools for every cluster: the configured one (checked) or a derived slice.

    Raises PoolError naming the cluster and what to change when a pool cannot work.
    """
    network = ipv4_subnet(subnets, network_name)
    prefix = slice_prefix(network)
    if prefix > MIN_SLICE_PREFIX:
        raise PoolError(
            f"the Docker network {network_name!r} ({network}) is too small to hold LoadBalancer "
            f"pools for {len(clusters)} cluster(s)",
            "use a Docker network of /24 or larger (kind creates a /16 by default), "
            "or set clusters[].lbPool explicitly",
        )
    slices = list(network.subnets(new_prefix=prefix))
    pools: dict[str, str] = {}
    for c in clusters:
        if c.lb_pool:
            pool = ipaddress.ip_network(c.lb_pool)
            if not isinstance(pool, ipaddress.IPv4Network) or not pool.subnet_of(network):
                raise PoolError(
                    f"clusters[{c.index}].lbPool {pool} of cluster {c.name!r} is outside the "
                    f"Docker network {network_name!r} ({network}): the host and the other "
                    "nodes could not reach its addresses",
                    f"set lbPool to a range inside {network}, e.g. {slices[-1 - c.index]}, "
                    "or remove it to let the lab derive one",
                )
            pools[c.name] = str(pool)
        else:
            if c.index >= len(slices) - 1:  # keep the bottom slice for the containers
                raise PoolError(
                    f"no room for a LoadBalancer pool for cluster {c.name!r} in {network}",
                    "use a larger Docker network or set clusters[].lbPool explicitly")
            pools[c.name] = str(slices[-1 - c.index])
    names = list(pools)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if ipaddress.ip_network(pools[a]).overlaps(ipaddress.ip_network(pools[b])):
                raise PoolError(
                    f"the LoadBalancer pools of {a!r} ({pools[a]}) and {b!r} ({pools[b]}) overlap:"
                    " two clusters on one Docker network would announce the same addresses",
                    "give each cluster its own lbPool, or remove lbPool to derive slices")
    return pools


# -- NodePorts -------------------------------------------------------------------------------------

def static_band(first: int = NODEPORT_RANGE[0], last: int = NODEPORT_RANGE[1]) -> range:
    """The lower band of a NodePort range that random allocation avoids until the upper band is
    full (KEP-3668, stable in 1.29; kubernetes pkg/registry/core/service/portallocator/allocator.go
    ``calculateRangeOffset``: min(max(16, size/32), 128) ports). 30000-30085 by default."""
    size = last - first + 1
    offset = 0 if size <= 16 else min(max(16, size // 32), 128)
    return range(first, first + offset)


def node_port_holders(services: Iterable[dict[str, Any]], ports: Iterable[int],
                      own: tuple[str, str]) -> dict[int, str]:
    """For each of ``ports``, the other Service holding it: ``namespace/name (port NAME)``.

    ``own`` (namespace, name) is the Service that wants the ports; its own ports never count.
    """
    wanted = set(ports)
    holders: dict[int, str] = {}
    for svc in services:
        meta = svc.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        if key == own:
            continue
        for p in (svc.get("spec") or {}).get("ports") or []:
            node_port = p.get("nodePort")
            if node_port in wanted and node_port not in holders:
                label = f" (port {p['name']})" if p.get("name") else ""
                holders[node_port] = f"{key[0]}/{key[1]}{label}"
    return holders


def node_port_conflict(holders: dict[int, str], fields: dict[int, str]) -> str:
    """What to tell the user when ``holders`` (see `node_port_holders`) keep the gateway from
    its NodePorts; ``fields`` names the config field of each port."""
    band = static_band()
    parts = []
    for port, holder in sorted(holders.items()):
        ns, _, rest = holder.partition("/")
        name = rest.split(" ", 1)[0]
        parts.append(
            f"NodePort {port} is held by Service {holder}: give that Service another nodePort "
            f"(`kubectl -n {ns} edit service {name}`) or delete it, or set {fields[port]} to a "
            f"free port in {band.start}-{band.stop - 1} (the static band, where Kubernetes never "
            "assigns random NodePorts while the rest of the range has room)")
    return "; ".join(parts)
