"""LoadBalancer pool slices inside the kind Docker network.

Docker hands container addresses out from the bottom of the network, so the pools are carved from
the top: cluster i gets the i-th slice counting down from the last address. On the usual
172.18.0.0/16 network the first cluster gets the seed's 172.18.255.0/24.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from lab.config import ClusterConfig
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
