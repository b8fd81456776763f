"""The emulated network: one link per worker (its NIC), each with bandwidth and latency.

A collective over a set of ranks is bounded by its slowest member: the ring moves at the
lowest bandwidth and pays the highest per-hop latency among them. ``bandwidth=None`` means
unlimited; a network whose links are all unlimited with zero latency is not emulated.
``shaped=True`` (``--net netns``, :mod:`lowband.net.netns`): real links carry the traffic at
the kernel-shaped rate, and the emulation adds only the modelled latency.

**Sites** (``--sites 0,0,1,1 --wan-bandwidth 50mbit --wan-latency 30ms``): ranks at different
sites talk through the wide-area link ``wan`` between their sites, on top of their own NICs:
a pair across sites gets ``min(NICs, wan)`` bandwidth and ``max(NIC latencies) + wan``
latency. The WAN's bandwidth is per direction between two sites and shared by the flows that
cross it at once, so a ring's cost depends on its order (:meth:`Network.ring_link`): ranks
``0,1 | 2,3`` in rank order cross twice (one flow each way), interleaved sites
``0,1,0,1`` cross four times (two flows share each direction: half the bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lowband.net.units import format_bandwidth, parse_bandwidth, parse_latency, per_worker


@dataclass(frozen=True)
class Link:
    """A worker's link: ``bandwidth`` in bytes/s (None: unlimited), one-hop ``latency`` in s."""

    bandwidth: float | None = None
    latency: float = 0.0

    def __post_init__(self) -> None:
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth} (use None for unlimited)")
        if self.latency < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {self.latency}")

    def transfer_seconds(self, nbytes: float) -> float:
        """Time for ``nbytes`` to cross this link once: latency + size / bandwidth."""
        wire = 0.0 if self.bandwidth is None else nbytes / self.bandwidth
        return self.latency + wire

    def describe(self) -> str:
        return f"{format_bandwidth(self.bandwidth)}, {self.latency * 1e3:g} ms"


@dataclass(frozen=True)
class Network:
    """Per-rank links. ``Network.parse('100mbit', '20ms', world_size=4)`` builds a uniform one;
    comma-separated values (``'100mbit,100mbit,10mbit,10mbit'``, or ``'100mbit*2,10mbit*2'``) give
    one link per rank."""

    links: tuple[Link, ...]
    shaped: bool = False  # the kernel shapes the bandwidth (``--net netns``); Comm adds only latency
    sites: tuple[int, ...] | None = None  # each rank's site; None: one site
    wan: Link | None = None  # the link between two sites (per direction, shared by the flows crossing it)

    def __post_init__(self) -> None:
        if not self.links:
            raise ValueError("a network needs at least one link")
        if self.sites is not None:
            if len(self.sites) != len(self.links):
                raise ValueError(f"--sites lists {len(self.sites)} sites for {len(self.links)} workers: give one per worker")
            if any(s < 0 for s in self.sites):
                raise ValueError(f"sites are numbers >= 0, got {','.join(map(str, self.sites))}")
            if len(set(self.sites)) > 1 and self.wan is None:
                raise ValueError("workers at several --sites need the link between them: give --wan-bandwidth")
        if self.wan is not None and self.sites is None:
            raise ValueError("--wan-bandwidth/--wan-latency need --sites (which site each worker is at)")

    @classmethod
    def uniform(cls, world_size: int, bandwidth: float | None, latency: float = 0.0) -> "Network":
        return cls(tuple(Link(bandwidth, latency) for _ in range(world_size)))

    @classmethod
    def parse(cls, bandwidth: str, latency: str, world_size: int) -> "Network":
        bws = _per_rank([parse_bandwidth(b) for b in per_worker(bandwidth)], world_size, "--bandwidth")
        lats = _per_rank([parse_latency(a) for a in per_worker(latency)], world_size, "--latency")
        return cls(tuple(Link(b, a) for b, a in zip(bws, lats)))

    @classmethod
    def with_sites(cls, links: "Network", sites: str | None, wan_bandwidth: str | None,
                   wan_latency: str | None) -> "Network":
        """``links`` placed at ``sites`` ('0,0,1,1') joined by a WAN ('50mbit', '30ms')."""
        if sites is None:
            if wan_bandwidth is not None or wan_latency is not None:
                raise ValueError("--wan-bandwidth/--wan-latency need --sites (which site each worker is at)")
            return links
        try:
            placed = tuple(int(s) for s in per_worker(sites))
        except ValueError:
            raise ValueError(f"--sites takes one site number per worker, comma-separated (0,0,1,1), got {sites!r}") from None
        wan = None
        if wan_bandwidth is not None or wan_latency is not None:
            wan = Link(parse_bandwidth(wan_bandwidth or "none"), parse_latency(wan_latency or "0"))
        return cls(links.links, links.shaped, placed, wan)

    @property
    def emulated(self) -> bool:
        wan = self.wan is not None and (self.wan.bandwidth is not None or self.wan.latency > 0)
        return wan or any(link.bandwidth is not None or link.latency > 0 for link in self.links)

    @property
    def multisite(self) -> bool:
        return self.sites is not None and len(set(self.sites)) > 1

    def site(self, rank: int) -> int:
        return 0 if self.sites is None else self.sites[rank]

    def subset(self, ranks: Sequence[int]) -> "Network":
        """The network of ``ranks`` only, renumbered 0..len-1 in the order given."""
        sites = None if self.sites is None else tuple(self.sites[r] for r in ranks)
        return Network(tuple(self.links[r] for r in ranks), self.shaped, sites, self.wan if sites else None)

    def bottleneck(self, ranks: Sequence[int] | None = None) -> Link:
        """The link that bounds a collective over ``ranks`` (default: all ranks): the slowest
        NIC and the highest latency, and the WAN once if the ranks span several sites."""
        chosen_ranks = list(ranks if ranks is not None else range(len(self.links)))
        chosen = [self.links[r] for r in chosen_ranks]
        link = _worst(chosen)
        if self.wan is not None and len({self.site(r) for r in chosen_ranks}) > 1:
            link = _worst([link, self.wan], add_latency=True)
        return link

    def ring_link(self, order: Sequence[int] | None = None) -> Link:
        """The link that bounds a ring collective visiting ``order`` (default: rank order).

        Each hop ``order[k] -> order[k+1]`` gets its pair's link; a hop across sites shares the
        WAN's bandwidth (that direction, those two sites) with the ring's other hops crossing it.
        The ring moves at its slowest hop: the minimum bandwidth and the maximum latency."""
        ring = list(order if order is not None else range(len(self.links)))
        if sorted(ring) != list(range(len(self.links))):
            raise ValueError(f"a ring order must visit every rank 0..{len(self.links) - 1} once, got {ring}")
        if len(ring) == 1:
            return self.links[ring[0]]
        hops = list(zip(ring, ring[1:] + ring[:1]))
        flows: dict[tuple[int, int], int] = {}
        for a, b in hops:
            if self.site(a) != self.site(b):
                flows[(self.site(a), self.site(b))] = flows.get((self.site(a), self.site(b)), 0) + 1
        worst = []
        for a, b in hops:
            link = self.bottleneck([a, b])
            shared = flows.get((self.site(a), self.site(b)), 1)
            if self.wan is not None and self.wan.bandwidth is not None and self.site(a) != self.site(b):
                link = Link(min(self.wan.bandwidth / shared, link.bandwidth or float("inf")), link.latency)
            worst.append(link)
        return _worst(worst)

    def describe(self) -> str:
        if not self.emulated:
            return "not emulated"
        distinct = set(self.links)
        if len(distinct) == 1:
            text = self.links[0].describe()
        else:
            text = "; ".join(f"rank {r}: {link.describe()}" for r, link in enumerate(self.links))
        if self.multisite and self.wan is not None:
            text += f"; sites {','.join(map(str, self.sites or ()))} joined by {self.wan.describe()}"
        return text + (" (netns: tc-shaped veth links, user-space latency)" if self.shaped else "")


def _worst(links: Sequence[Link], add_latency: bool = False) -> Link:
    """The lowest finite bandwidth (None if all unlimited) and the highest (or summed) latency."""
    finite = [link.bandwidth for link in links if link.bandwidth is not None]
    latency = sum(link.latency for link in links) if add_latency else max(link.latency for link in links)
    return Link(min(finite) if finite else None, latency)


def _per_rank(values: list, world_size: int, flag: str) -> list:
    if len(values) == 1:
        return values * world_size
    if len(values) != world_size:
        raise ValueError(f"{flag} lists {len(values)} values for {world_size} workers: give one, or one per worker")
    return values
