"""The emulated network: one link per worker (its NIC), each with bandwidth and latency.

A collective over a set of ranks is bounded by its slowest member: the ring moves at the
lowest bandwidth and pays the highest per-hop latency among them. ``bandwidth=None`` means
unlimited; a network whose links are all unlimited with zero latency is not emulated.
``shaped=True`` (``--net netns``, :mod:`lowband.net.netns`): real links carry the traffic at
the kernel-shaped rate, and the emulation adds only the modelled latency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lowband.net.units import format_bandwidth, parse_bandwidth, parse_latency


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
    comma-separated values (``'100mbit,100mbit,10mbit,10mbit'``) give one link per rank."""

    links: tuple[Link, ...]
    shaped: bool = False  # the kernel shapes the bandwidth (``--net netns``); Comm adds only latency

    def __post_init__(self) -> None:
        if not self.links:
            raise ValueError("a network needs at least one link")

    @classmethod
    def uniform(cls, world_size: int, bandwidth: float | None, latency: float = 0.0) -> "Network":
        return cls(tuple(Link(bandwidth, latency) for _ in range(world_size)))

    @classmethod
    def parse(cls, bandwidth: str, latency: str, world_size: int) -> "Network":
        bws = _per_rank([parse_bandwidth(b) for b in bandwidth.split(",")], world_size, "--bandwidth")
        lats = _per_rank([parse_latency(a) for a in latency.split(",")], world_size, "--latency")
        return cls(tuple(Link(b, a) for b, a in zip(bws, lats)))

    @property
    def emulated(self) -> bool:
        return any(link.bandwidth is not None or link.latency > 0 for link in self.links)

    def bottleneck(self, ranks: Sequence[int] | None = None) -> Link:
        """The link that bounds a collective over ``ranks`` (default: all ranks)."""
        chosen = [self.links[r] for r in (ranks if ranks is not None else range(len(self.links)))]
        finite = [link.bandwidth for link in chosen if link.bandwidth is not None]
        return Link(min(finite) if finite else None, max(link.latency for link in chosen))

    def describe(self) -> str:
        if not self.emulated:
            return "not emulated"
        distinct = set(self.links)
        if len(distinct) == 1:
            text = self.links[0].describe()
        else:
            text = "; ".join(f"rank {r}: {link.describe()}" for r, link in enumerate(self.links))
        return text + (" (netns: tc-shaped veth links, user-space latency)" if self.shaped else "")


def _per_rank(values: list, world_size: int, flag: str) -> list:
    if len(values) == 1:
        return values * world_size
    if len(values) != world_size:
        raise ValueError(f"{flag} lists {len(values)} values for {world_size} workers: give one, or one per worker")
    return values
