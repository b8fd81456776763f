"""Planning a mixed cluster: uneven workers and links (``lowband plan --worker-speed --sites``).

Given each worker's compute speed and the network (per-worker links, sites joined by a WAN,
:class:`~lowband.net.link.Network`), :func:`plan_cluster` names what to do with them:

1. **groups**: the sites (workers that share a fast network), each with its leader (lowest rank);
2. **ring order**: the order of the ring collectives that charges least on the model
   (:meth:`Network.ring_link`: across sites the WAN is shared by the hops crossing it):
   exhaustive over the (n-1)!/2 rings for n <= :data:`EXHAUSTIVE`, otherwise the sites kept
   contiguous (each site boundary crossed once per direction); against the rank-order ring;
3. **flat vs hierarchical** averaging of a payload: the ring over everyone, or (Holmes,
   arXiv:2312.03549) sum inside each site, average the site sums across sites among the
   leaders, broadcast inside each site;
4. **work per worker**: the local-update family's inner-step budgets ``max(1, round(H s_i /
   s_max))`` (the fastest does H, everyone arrives at the synchronisation together:
   FedCompass, arXiv:2309.14675), and data parallel's batch shares ``s_i / sum(s)``;
5. **throughput**: samples per second relative to one full-speed worker, with fixed work
   (every synchronisation waits for the slowest: ``n s_min``) and with speed-proportional
   work (``sum(s)``), and the utilisation of the fixed schedule, ``mean(s_min / s_i)``.

Example::

    net = Network.with_sites(Network.parse("1gbit", "1ms", 4), "0,0,1,1", "50mbit", "30ms")
    plan = plan_cluster(Cluster(net, (1, 1, 0.5, 0.25)), nbytes=4 * 10**8, inner_steps=20)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

from lowband.net import cost
from lowband.net.link import Link, Network

EXHAUSTIVE = 8  # rings searched exhaustively up to this many workers


@dataclass(frozen=True)
class Cluster:
    """Workers' speeds (1: full speed; 0.5: steps take twice as long) on ``network``."""

    network: Network
    speeds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.speeds) != len(self.network.links):
            raise ValueError(f"--worker-speed lists {len(self.speeds)} values for {len(self.network.links)} "
                             "workers: give one per worker (or 'value*count')")
        if any(not 0 < s <= 1 for s in self.speeds):
            raise ValueError(f"worker speeds must be in (0, 1] (1: full speed), got {self.speeds}")

    @property
    def workers(self) -> int:
        return len(self.speeds)

    def groups(self) -> list[list[int]]:
        """Ranks per site, sites in order of their number."""
        by_site: dict[int, list[int]] = {}
        for rank in range(self.workers):
            by_site.setdefault(self.network.site(rank), []).append(rank)
        return [by_site[s] for s in sorted(by_site)]


@dataclass(frozen=True)
class ClusterPlan:
    """What :func:`plan_cluster` recommends, with the numbers behind it."""

    groups: tuple[tuple[int, ...], ...]
    ring: tuple[int, ...]
    ring_link: Link
    rank_ring_link: Link
    flat_seconds: float  # one all-reduce of the payload on the chosen ring
    rank_ring_seconds: float  # ... on the rank-order ring
    hierarchical_seconds: float  # sum in site, average across sites, broadcast in site
    budgets: tuple[int, ...]
    batch_shares: tuple[float, ...]
    throughput_fixed: float  # samples/s in units of one full-speed worker
    throughput_speed: float
    utilisation_fixed: float

    @property
    def hierarchical(self) -> bool:
        """Whether hierarchical averaging beats the best flat ring."""
        return len(self.groups) > 1 and self.hierarchical_seconds < self.flat_seconds


def ring_seconds(network: Network, order: Sequence[int], nbytes: int) -> float:
    """One ring all-reduce of ``nbytes`` visiting ``order``."""
    return cost.ring_all_reduce(nbytes, len(order), network.ring_link(order)).seconds


def best_ring(network: Network, nbytes: int) -> tuple[int, ...]:
    """The ring order of least all-reduce time on the model (rank 0 first, ties: rank order)."""
    n = len(network.links)
    if n <= 3:
        return tuple(range(n))
    if n > EXHAUSTIVE:
        return tuple(sorted(range(n), key=lambda r: (network.site(r), r)))  # sites contiguous
    best, best_time = tuple(range(n)), ring_seconds(network, range(n), nbytes)
    for rest in itertools.permutations(range(1, n)):
        if rest[0] > rest[-1]:
            continue  # the same ring the other way round
        order = (0, *rest)
        t = ring_seconds(network, order, nbytes)
        if t < best_time - 1e-12:
            best, best_time = order, t
    return best


def hierarchical_seconds(network: Network, groups: Sequence[Sequence[int]], nbytes: int) -> float:
    """Sum inside each site (ring), average across the leaders (ring over the WAN), broadcast in
    each site: the sites work side by side, so each phase costs its slowest site."""
    inside = max(cost.ring_all_reduce(nbytes, len(g), network.subset(g).ring_link()).seconds for g in groups)
    leaders = [g[0] for g in groups]
    across = cost.ring_all_reduce(nbytes, len(leaders), network.subset(leaders).ring_link()).seconds
    back = max(cost.gloo_broadcast(nbytes, len(g), network.subset(g).bottleneck(), 0, 0).seconds for g in groups)
    return inside + across + back


def budgets(speeds: Sequence[float], inner_steps: int) -> tuple[int, ...]:
    """Inner steps per worker: the fastest does ``inner_steps``, the others in proportion (>= 1),
    as ``--budget speed`` assigns them (:func:`lowband.algorithms.budget.speed_budgets`)."""
    from lowband.algorithms.budget import speed_budgets

    return speed_budgets([1 / s for s in speeds], inner_steps)


def plan_cluster(cluster: Cluster, nbytes: int, inner_steps: int = 20) -> ClusterPlan:
    """Groups, ring order, flat vs hierarchical averaging and work per worker (module doc)."""
    net, speeds, n = cluster.network, cluster.speeds, cluster.workers
    groups = tuple(tuple(g) for g in cluster.groups())
    ring = best_ring(net, nbytes)
    rank_ring = tuple(range(n))
    total = sum(speeds)
    slowest = min(speeds)
    return ClusterPlan(
        groups=groups, ring=ring, ring_link=net.ring_link(ring), rank_ring_link=net.ring_link(rank_ring),
        flat_seconds=ring_seconds(net, ring, nbytes), rank_ring_seconds=ring_seconds(net, rank_ring, nbytes),
        hierarchical_seconds=hierarchical_seconds(net, groups, nbytes) if len(groups) > 1 else math.inf,
        budgets=budgets(speeds, inner_steps), batch_shares=tuple(s / total for s in speeds),
        throughput_fixed=n * slowest, throughput_speed=total,
        utilisation_fixed=sum(slowest / s for s in speeds) / n)
