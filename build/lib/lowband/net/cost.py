"""Collective costs under the alpha-beta (latency-bandwidth) model.

For ``n`` ranks, a payload of ``S`` bytes, per-hop latency ``a`` and bandwidth ``B`` (the
bottleneck link of the participants, see :class:`lowband.net.link.Network`):

=================  ==========================================  ============================
collective         time                                        bytes sent by one rank
=================  ==========================================  ============================
ring all-reduce    2(n-1) (a + S/(nB))                         2(n-1) S/n
ring all-gather    (n-1) (a + S/B), S = one rank's part        (n-1) S
ring reduce-scat.  (n-1) (a + S/(nB))                          (n-1) S/n
tree broadcast     ceil(log2 n) (a + S/B)                      S x (children in binomial tree)
gloo broadcast     d a + d(d+1)/2 S/B, d = ceil(log2 n)        as the tree (its sends overlap)
all-to-all         (n-1) (a + S/(nB))                          (n-1) S/n
point-to-point     a + S/B                                     S (sender), 0 (receiver)
neighbour exch.    a + max(sent, received)/B                   what it sends (full-duplex NIC)
tree all-reduce    2 ceil(log2 n) (a + S/B)                    S x (children + 1; root: children)
halving-doubling   2 log2(n) a + 2 (n-1)/n S/B  (n = 2^k)      2(n-1) S/n
hierarchical       2(m-1)(a_i + S/(m B_i))                     2(m-1) S/m + 2(g-1) S/(g m)
                   + 2(g-1)(a_e + S/(g m B_e))
parameter server   2 (a + max(S/B, n S/B_server))              S (and S received)
gossip step        a + d S/B  (d neighbours, full-duplex)      d S
=================  ==========================================  ============================

Hierarchical: g groups of m = n/g ranks, intra-group link (a_i, B_i), inter-group link
(a_e, B_e). Parameter server: n workers and one server whose link is B_server. Gossip: d
neighbours. Every function takes a :class:`~lowband.net.link.Link` (hierarchical: one per
level): with heterogeneous links, pass the bottleneck of the participants
(``Network.bottleneck(ranks)``), as :mod:`lowband.comm` does. A world of one rank (or a
gossip step without neighbours) costs nothing.

The emulation (:mod:`lowband.comm`) makes each collective it runs (the first eight rows; for
a broadcast, gloo's, not the ideal tree) complete no earlier than this time, and the ledger charges these byte counts; the last five
are alternatives for planning (:mod:`lowband.predict.plan`). Thakur, Rabenseifner & Gropp,
"Optimization of Collective Communication Operations in MPICH" (2005) derive the same
formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lowband.net.link import Link


@dataclass(frozen=True)
class Transfer:
    """What one rank pays for one collective: modelled seconds and bytes on its link."""

    seconds: float
    sent: int
    received: int


def ring_all_reduce(nbytes: int, n: int, link: Link) -> Transfer:
    if n <= 1:
        return Transfer(0.0, 0, 0)
    steps = 2 * (n - 1)
    moved = round(steps * nbytes / n)
    return Transfer(steps * link.transfer_seconds(nbytes / n), moved, moved)


def ring_reduce_scatter(nbytes: int, n: int, link: Link) -> Transfer:
    if n <= 1:
        return Transfer(0.0, 0, 0)
    moved = round((n - 1) * nbytes / n)
    return Transfer((n - 1) * link.transfer_seconds(nbytes / n), moved, moved)


def ring_all_gather(nbytes_per_rank: int, n: int, link: Link) -> Transfer:
    if n <= 1:
        return Transfer(0.0, 0, 0)
    moved = (n - 1) * nbytes_per_rank
    return Transfer((n - 1) * link.transfer_seconds(nbytes_per_rank), moved, moved)


def binomial_children(rank: int, root: int, n: int) -> int:
    """How many ranks ``rank`` forwards to in a binomial-tree broadcast rooted at ``root``."""
    relative = (rank - root) % n
    children, mask = 0, 1
    while mask < n:
        if relative & mask:
            break
        if relative + mask < n:
            children += 1
        mask <<= 1
    return children


def tree_broadcast(nbytes: int, n: int, link: Link, rank: int, root: int) -> Transfer:
    if n <= 1:
        return Transfer(0.0, 0, 0)
    rounds = math.ceil(math.log2(n))
    sent = binomial_children(rank, root, n) * nbytes
    received = 0 if rank == root else nbytes
    return Transfer(rounds * link.transfer_seconds(nbytes), sent, received)


def gloo_broadcast(nbytes: int, n: int, link: Link, rank: int, root: int) -> Transfer:
    """gloo's binomial-tree broadcast, whose sends do not wait for each other.

    With d = ceil(log2 n) rounds, the root starts its d sends at once, so they share its
    link and all land after d S/B; the first child then starts its d - 1 sends, and so on
    down the deepest path: d a + d (d + 1) / 2 S/B in all (n = 2: a + S/B; n = 4: 2a + 3 S/B,
    measured on tc-shaped links by ``benchmarks/emulation_validation.py``). Bytes as
    :func:`tree_broadcast`."""
    tree = tree_broadcast(nbytes, n, link, rank, root)
    if n <= 1:
        return tree
    d = math.ceil(math.log2(n))
    wire = 0.0 if link.bandwidth is None else d * (d + 1) / 2 * nbytes / link.bandwidth
    return Transfer(d * link.latency + wire, tree.sent, tree.received)


def point_to_point(nbytes: int, link: Link, sending: bool) -> Transfer:
    return Transfer(link.transfer_seconds(nbytes), nbytes if sending else 0, 0 if sending else nbytes)


def all_to_all(nbytes: int, n: int, link: Link) -> Transfer:
    """Pairwise exchange: each rank keeps one of its n chunks and sends the others."""
    if n <= 1:
        return Transfer(0.0, 0, 0)
    moved = round((n - 1) * nbytes / n)
    return Transfer((n - 1) * link.transfer_seconds(nbytes / n), moved, moved)


def neighbor_exchange(sent: int, received: int, link: Link) -> Transfer:
    """Simultaneous sends and receives with a few peers over one full-duplex link."""
    if sent == 0 and received == 0:
        return Transfer(0.0, 0, 0)
    return Transfer(link.transfer_seconds(max(sent, received)), sent, received)


# -- alternatives to the ring (what lowband's Comm charges is the ring; these are for planning) --


def tree_all_reduce(nbytes: int, n: int, link: Link, rank: int = 0, root: int = 0) -> Transfer:
    """Binomial-tree reduce to ``root`` then binomial-tree broadcast: 2 ceil(log2 n) (a + S/B).

    Each round moves the whole payload, so the time grows with log n but never shrinks with
    n (latency-optimal, bandwidth-poor). Bytes are ``rank``'s: it receives S from each child
    and sends S to its parent during the reduce, then the mirror image during the broadcast;
    the root (default ``rank=root=0``) is the busiest, ceil(log2 n) S each way.
    ``link``: the bottleneck link of the participants.
    """
    if n <= 1:
        return Transfer(0.0, 0, 0)
    rounds = math.ceil(math.log2(n))
    moved = (binomial_children(rank, root, n) + (0 if rank == root else 1)) * nbytes
    return Transfer(2 * rounds * link.transfer_seconds(nbytes), moved, moved)


def halving_doubling_all_reduce(nbytes: int, n: int, link: Link) -> Transfer:
    """Rabenseifner's all-reduce: recursive-halving reduce-scatter, recursive-doubling all-gather.

    For n a power of two: 2 log2(n) a + 2 (n-1)/n S/B, and 2 (n-1)/n S each way: the ring's
    bytes with log2 n instead of n - 1 latencies. Otherwise (MPICH's fold), with p the largest
    power of two below n, the n - p extra ranks first send their whole vector to a partner
    in the power-of-two core and get the result back at the end: 2 (a + S/B) more, and the
    bytes returned are a partner's (the busiest rank): 2 (p-1)/p S + S each way.
    ``link``: the bottleneck link of the participants.
    """
    if n <= 1:
        return Transfer(0.0, 0, 0)
    p = 1 << (n.bit_length() - 1)  # largest power of two <= n
    steps = int(math.log2(p))
    bandwidth = 0.0 if link.bandwidth is None else 2 * (p - 1) / p * nbytes / link.bandwidth
    seconds = 2 * steps * link.latency + bandwidth
    moved = 2 * (p - 1) * nbytes / p
    if p != n:
        seconds += 2 * link.transfer_seconds(nbytes)
        moved += nbytes
    return Transfer(seconds, round(moved), round(moved))


def hierarchical_all_reduce(nbytes: int, n: int, groups: int, intra: Link, inter: Link) -> Transfer:
    """All-reduce over ``groups`` fast groups of m = n / groups ranks joined by slow links.

    1. ring reduce-scatter inside each group over ``intra``: each rank then holds 1/m of the
       group's sum, (m-1) (a_i + S/(m B_i));
    2. ring all-reduce of that 1/m across the groups over ``inter`` (m such rings run side
       by side, one per shard), 2 (g-1) (a_e + S/(g m B_e));
    3. ring all-gather of the shards inside each group, (m-1) (a_i + S/(m B_i)).

    ``inter`` is what one rank gets across groups: when the m ranks of a group share one
    uplink of bandwidth U, pass ``Link(U / m, latency)``. One group is the ring over
    ``intra``; ``groups == n`` is the ring over ``inter``. ``n`` must divide by ``groups``.
    """
    if groups < 1 or n % groups:
        raise ValueError(f"hierarchical all-reduce needs n divisible by groups >= 1, got n={n}, groups={groups}")
    if n <= 1:
        return Transfer(0.0, 0, 0)
    m, g = n // groups, groups
    shard = nbytes / m
    seconds = 2 * (m - 1) * intra.transfer_seconds(shard) if m > 1 else 0.0
    seconds += 2 * (g - 1) * inter.transfer_seconds(shard / g) if g > 1 else 0.0
    moved = round(2 * (m - 1) * shard + 2 * (g - 1) * shard / g)
    return Transfer(seconds, moved, moved)


def parameter_server(nbytes: int, n: int, link: Link, server: Link | None = None) -> Transfer:
    """Every one of ``n`` workers pushes S to a server and pulls S back.

    The server's link (``server``, default: the same as the workers') carries n S each way,
    so each phase takes a + max(S/B, n S/B_server): 2 (a + max(S/B, n S/B_server)) in all.
    Bytes are a worker's: S sent, S received. ``link``: the bottleneck of the workers.
    """
    if n <= 1:
        return Transfer(0.0, 0, 0)
    hub = server if server is not None else link
    worker_wire = 0.0 if link.bandwidth is None else nbytes / link.bandwidth
    server_wire = 0.0 if hub.bandwidth is None else n * nbytes / hub.bandwidth
    latency = max(link.latency, hub.latency)
    return Transfer(2 * (latency + max(worker_wire, server_wire)), nbytes, nbytes)


def gossip_step(nbytes: int, degree: int, link: Link) -> Transfer:
    """Send S to each of ``degree`` neighbours and receive theirs at once: a + d S / B.

    Full-duplex: sends and receives overlap, the d sends share the rank's link. ``link``:
    the bottleneck of the rank and its neighbours. No neighbours: nothing to pay.
    """
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    return neighbor_exchange(degree * nbytes, degree * nbytes, link)
