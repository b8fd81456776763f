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
double binary tr.  (sqrt((D-1) a) + sqrt(2S/B))^2,             2 S
                   D = 2 ceil(log2 n) (pipelined, below)
Bruck all-gather   ceil(log2 n) a + (n-1) S/B                  (n-1) S
Bruck all-to-all   ceil(log2 n) (a + S/(2B))                   ceil(log2 n) S/2
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

**Projections** (``lowband plan`` and ``lowband simulate`` both call :func:`buckets`): a payload
becomes ``ceil(S / bucket)`` collectives (full buckets, then the rest) where the algorithm
buckets (``bucket_mb``), one after the other (NCCL runs a communicator's collectives in order
on one stream, lowband's Comm on one thread), each by the cheapest algorithm for its size
(:func:`all_reduce`: ring, double binary tree or halving-doubling, as NCCL picks ring or tree
and MPICH Rabenseifner by size; :func:`all_gather`, :func:`all_to_all_any`: ring/pairwise or
Bruck). :func:`behind_backward` is when DDP's buckets are done if they go as backward fills them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

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


# -- what a projection charges: the cheapest algorithm per message, per bucket (planner and simulator) --


def double_tree_all_reduce(nbytes: int, n: int, link: Link) -> Transfer:
    """NCCL's double binary tree, pipelined: (sqrt((D-1) a) + sqrt(W))^2, D = 2 ceil(log2 n), W = 2 S/B.

    Two binary trees each carry half the payload; a rank is inner node of at most one, so every
    rank sends (and receives) S on the way up to the roots and S on the way down: 2 S each way.
    The payload goes in k chunks through a pipeline of D stages (d hops up, d down), a stage
    costing a + W/k: (D + k - 1)(a + W/k), least at k = sqrt((D-1) W / a), which gives the
    formula above (one chunk, k = 1, when that is below 1: D (a + W)). Latency grows with
    log n, the bandwidth term 2 S/B is the ring's 2 (n-1)/n S/B for large n. The form is that
    of Sanders, Speck & Träff, "Two-tree algorithms for full bandwidth broadcast, reduction and
    scan", Parallel Computing 35(12), 2009 (b m + 2 a log p + sqrt(8 a b m log p) for the
    two-tree broadcast); NVIDIA's "Massively Scale Your Deep Learning Training with NCCL 2.4"
    (2019) describes the trees NCCL runs. ``link``: the bottleneck of the participants.
    """
    if n <= 1:
        return Transfer(0.0, 0, 0)
    depth = 2 * math.ceil(math.log2(n))
    wire = 0.0 if link.bandwidth is None else 2 * nbytes / link.bandwidth
    a = link.latency
    if a == 0.0 or (depth - 1) * wire > a:  # k* = sqrt((D-1) W / a) > 1 chunk
        seconds = (math.sqrt((depth - 1) * a) + math.sqrt(wire)) ** 2
    else:
        seconds = depth * (a + wire)
    return Transfer(seconds, 2 * nbytes, 2 * nbytes)


def bruck_all_gather(nbytes_per_rank: int, n: int, link: Link) -> Transfer:
    """Bruck's all-gather (recursive doubling when n is a power of two): ceil(log2 n) a + (n-1) S/B.

    Round i sends the 2^i parts gathered so far (the last round what is left), so the ring's
    bytes take ceil(log2 n) latencies instead of n - 1 (Thakur, Rabenseifner & Gropp 2005,
    section 4.1; the local rotations are not charged)."""
    if n <= 1:
        return Transfer(0.0, 0, 0)
    moved = (n - 1) * nbytes_per_rank
    wire = 0.0 if link.bandwidth is None else moved / link.bandwidth
    return Transfer(math.ceil(math.log2(n)) * link.latency + wire, moved, moved)


def bruck_all_to_all(nbytes: int, n: int, link: Link) -> Transfer:
    """Bruck's all-to-all: ceil(log2 n) (a + S/(2B)), each round forwarding about half the data.

    Fewer latencies than the pairwise exchange ((n-1) of them) for more bytes (log2(n) S/2
    instead of (n-1) S/n): MPICH's choice for short messages (Thakur et al. 2005, section 4.5)."""
    if n <= 1:
        return Transfer(0.0, 0, 0)
    rounds = math.ceil(math.log2(n))
    moved = round(rounds * nbytes / 2)
    return Transfer(rounds * link.transfer_seconds(nbytes / 2), moved, moved)


def cheapest(algorithms: dict[str, Collective], nbytes: int, n: int, link: Link) -> tuple[str, Transfer]:
    """The algorithm of ``algorithms`` with the fewest modelled seconds (the first on a tie) and its cost."""
    costs = {name: fn(nbytes, n, link) for name, fn in algorithms.items()}
    name = min(costs, key=lambda k: costs[k].seconds)
    return name, costs[name]


def all_reduce(nbytes: int, n: int, link: Link) -> Transfer:
    """The cheapest of ring, double binary tree and halving-doubling for this message, as NCCL
    (ring or tree by size) and MPICH (Rabenseifner for long messages) choose."""
    return cheapest(ALL_REDUCE_ALGORITHMS, nbytes, n, link)[1]


def all_gather(nbytes_per_rank: int, n: int, link: Link) -> Transfer:
    """The cheaper of the ring and Bruck's all-gather."""
    return cheapest(ALL_GATHER_ALGORITHMS, nbytes_per_rank, n, link)[1]


def all_to_all_any(nbytes: int, n: int, link: Link) -> Transfer:
    """The cheaper of the pairwise exchange and Bruck's all-to-all."""
    return cheapest(ALL_TO_ALL_ALGORITHMS, nbytes, n, link)[1]


def bucket_sizes(nbytes: float, bucket_bytes: float = math.inf) -> list[int]:
    """What a payload becomes in buckets of at most ``bucket_bytes``: full ones, then the rest."""
    size = round(nbytes)
    if not math.isfinite(bucket_bytes) or size <= bucket_bytes:
        return [size]
    full, rest = divmod(size, max(1, int(bucket_bytes)))
    return [int(bucket_bytes)] * full + ([rest] if rest else [])


def buckets(kind: str, nbytes: float, n: int, link: Link, bucket_bytes: float = math.inf,
            allreduce: str = "auto") -> list[Transfer]:
    """One collective of ``kind`` (a key of :data:`PROJECTED`) per bucket, each its cheapest
    algorithm (``allreduce``: a key of :data:`ALL_REDUCES` for all-reduces), one after the other."""
    fn = ALL_REDUCES[allreduce] if kind == "all_reduce" else PROJECTED[kind]
    sizes = bucket_sizes(nbytes, bucket_bytes)
    one = {size: fn(size, n, link) for size in set(sizes)}
    return [one[size] for size in sizes]


def behind_backward(bucket_seconds: list[float], window: float, start: float = 0.0, link_free: float = 0.0) -> float:
    """When the last bucket is done if bucket j of b is ready at ``start + window j / b`` (DDP's
    buckets, filled in turn during backward) and the link takes one at a time from ``link_free``.

    ``window = 0``: all ready at ``start``, the plain sum. The time past ``start + window`` is
    what the backward could not hide."""
    free, count = link_free, len(bucket_seconds)
    for j, seconds in enumerate(bucket_seconds, 1):
        free = max(free, start + window * j / count) + seconds
    return free


Collective = Callable[[int, int, Link], Transfer]  # (bytes, ranks or neighbours, link) -> one rank's cost
ALL_REDUCE_ALGORITHMS: dict[str, Collective] = {
    "ring": ring_all_reduce, "double-tree": double_tree_all_reduce, "halving-doubling": halving_doubling_all_reduce}
ALL_GATHER_ALGORITHMS: dict[str, Collective] = {"ring": ring_all_gather, "bruck": bruck_all_gather}
ALL_TO_ALL_ALGORITHMS: dict[str, Collective] = {"pairwise": all_to_all, "bruck": bruck_all_to_all}
ALL_REDUCES: dict[str, Collective] = {
    "auto": all_reduce, **ALL_REDUCE_ALGORITHMS, "tree": tree_all_reduce,  # tree: binomial, the root's bytes
    "parameter-server": parameter_server,
}
"""``--allreduce`` choices: ``auto`` (the cheapest per bucket, the default) or one algorithm for all."""
PROJECTED: dict[str, Collective] = {
    "all_gather": all_gather, "all_to_all": all_to_all_any, "neighbours": gossip_step,
}
"""The other collective kinds a plan or a projected ledger op can be."""
