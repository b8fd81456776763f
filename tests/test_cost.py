"""Alpha-beta collective costs (``lowband.net.cost``) against hand-computed values."""

from __future__ import annotations

import math

import pytest

from lowband.net import cost
from lowband.net.cost import Transfer
from lowband.net.link import Link

# 100mbit = 12.5 MB/s, 1 ms per hop: easy numbers to do by hand.
LINK = Link(bandwidth=12_500_000.0, latency=0.001)
MB = 1_000_000


def test_ring_all_reduce_by_hand() -> None:
    # n=4, S=1 MB: 2(n-1)(a + S/(nB)) = 6 * (0.001 + 250_000/12.5e6) = 6 * 0.021 = 0.126 s
    t = cost.ring_all_reduce(MB, 4, LINK)
    assert t.seconds == pytest.approx(0.126)
    # bytes: 2(n-1)S/n = 6 * 250_000 = 1.5 MB each way
    assert (t.sent, t.received) == (1_500_000, 1_500_000)
    # n=2: 2 * (0.001 + 0.04) = 0.082 s, 1 MB each way
    t2 = cost.ring_all_reduce(MB, 2, LINK)
    assert t2.seconds == pytest.approx(0.082)
    assert (t2.sent, t2.received) == (MB, MB)


def test_ring_all_reduce_bytes_are_ints_and_rounded() -> None:
    t = cost.ring_all_reduce(1000, 3, LINK)  # 4 * 1000 / 3 = 1333.33 -> 1333
    assert t.sent == 1333 and isinstance(t.sent, int)
    assert t.seconds == pytest.approx(4 * (0.001 + (1000 / 3) / 12.5e6))


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_ring_all_reduce_formula(n: int) -> None:
    s, a, b = 4_000_000, 0.02, 1_250_000.0
    t = cost.ring_all_reduce(s, n, Link(b, a))
    assert t.seconds == pytest.approx(2 * (n - 1) * (a + s / (n * b)))
    assert t.sent == round(2 * (n - 1) * s / n)
    # the all-reduce is exactly a reduce-scatter followed by an all-gather of the shards
    rs = cost.ring_reduce_scatter(s, n, Link(b, a))
    ag = cost.ring_all_gather(s // n, n, Link(b, a)) if s % n == 0 else None
    if ag is not None:
        assert t.seconds == pytest.approx(rs.seconds + ag.seconds)
        assert t.sent == rs.sent + ag.sent


def test_ring_reduce_scatter_by_hand() -> None:
    # n=4, S=1 MB: (n-1)(a + S/(nB)) = 3 * 0.021 = 0.063 s; (n-1)S/n = 750_000 bytes
    t = cost.ring_reduce_scatter(MB, 4, LINK)
    assert t.seconds == pytest.approx(0.063)
    assert (t.sent, t.received) == (750_000, 750_000)


def test_ring_all_gather_by_hand() -> None:
    # n=4, each rank holds 1 MB: (n-1)(a + S/B) = 3 * (0.001 + 0.08) = 0.243 s; 3 MB each way
    t = cost.ring_all_gather(MB, 4, LINK)
    assert t.seconds == pytest.approx(0.243)
    assert (t.sent, t.received) == (3 * MB, 3 * MB)
    t2 = cost.ring_all_gather(500, 2, Link(1000.0, 0.0))  # 1 * 500/1000
    assert t2 == Transfer(0.5, 500, 500)


def test_gloo_broadcast_by_hand() -> None:
    # n=4: d = 2 rounds of latency, the root's two overlapping sends (2 S/B) then one forward (S/B)
    t = cost.gloo_broadcast(MB, 4, LINK, rank=0, root=0)
    assert t.seconds == pytest.approx(2 * 0.001 + 3 * 0.08)
    assert (t.sent, t.received) == (2 * MB, 0)  # bytes as the binomial tree's
    assert cost.gloo_broadcast(MB, 2, LINK, rank=1, root=0) == cost.tree_broadcast(MB, 2, LINK, rank=1, root=0)
    assert cost.gloo_broadcast(MB, 8, LINK, rank=5, root=0).seconds == pytest.approx(3 * 0.001 + 6 * 0.08)
    assert cost.gloo_broadcast(MB, 1, LINK, rank=0, root=0) == Transfer(0.0, 0, 0)


def test_tree_broadcast_by_hand() -> None:
    # n=4: ceil(log2 4) = 2 rounds of (0.001 + 0.08) = 0.162 s
    root = cost.tree_broadcast(MB, 4, LINK, rank=0, root=0)
    assert root.seconds == pytest.approx(0.162)
    assert (root.sent, root.received) == (2 * MB, 0)  # root sends to relative ranks 1 and 2
    leaf = cost.tree_broadcast(MB, 4, LINK, rank=3, root=0)
    assert (leaf.sent, leaf.received) == (0, MB)
    inner = cost.tree_broadcast(MB, 4, LINK, rank=2, root=0)
    assert (inner.sent, inner.received) == (MB, MB)  # forwards to rank 3
    # n=5 needs 3 rounds; every rank is charged the same time
    for r in range(5):
        assert cost.tree_broadcast(MB, 5, LINK, rank=r, root=2).seconds == pytest.approx(3 * 0.081)
    # n=2: one round
    assert cost.tree_broadcast(MB, 2, LINK, rank=1, root=1) == Transfer(pytest.approx(0.081), MB, 0)


def test_binomial_children_n8_root0() -> None:
    # Relative rank r forwards to r + 2^k for every 2^k below r's lowest set bit.
    assert [cost.binomial_children(r, 0, 8) for r in range(8)] == [3, 0, 1, 0, 2, 0, 1, 0]
    # root 3 shifts the same tree: relative = (rank - 3) % 8
    assert [cost.binomial_children(r, 3, 8) for r in range(8)] == [0, 1, 0, 3, 0, 1, 0, 2]
    # n=6, root 0: 0 -> 1, 2, 4; 2 -> 3; 4 -> 5
    assert [cost.binomial_children(r, 0, 6) for r in range(6)] == [3, 0, 1, 0, 1, 0]


@pytest.mark.parametrize("n", range(1, 18))
def test_binomial_children_form_a_spanning_tree(n: int) -> None:
    rounds = math.ceil(math.log2(n)) if n > 1 else 0
    for root in range(n):
        children = [cost.binomial_children(r, root, n) for r in range(n)]
        assert sum(children) == n - 1, f"n={n} root={root}: {children}"
        assert children[root] == rounds, "the root sends once per round"
        assert all(0 <= c <= rounds for c in children)


@pytest.mark.parametrize("n", range(1, 18))
def test_tree_broadcast_bytes_balance(n: int) -> None:
    s = 1234
    for root in range(n):
        transfers = [cost.tree_broadcast(s, n, LINK, rank=r, root=root) for r in range(n)]
        assert sum(t.sent for t in transfers) == sum(t.received for t in transfers) == (n - 1) * s
        assert transfers[root].received == 0


def test_point_to_point_by_hand() -> None:
    send = cost.point_to_point(MB, LINK, sending=True)
    recv = cost.point_to_point(MB, LINK, sending=False)
    assert send.seconds == recv.seconds == pytest.approx(0.081)
    assert (send.sent, send.received) == (MB, 0)
    assert (recv.sent, recv.received) == (0, MB)
    assert cost.point_to_point(MB, Link(None, 0.0), sending=True) == Transfer(0.0, MB, 0)


def test_unlimited_link_costs_only_latency() -> None:
    link = Link(None, 0.01)
    assert cost.ring_all_reduce(10**9, 4, link).seconds == pytest.approx(6 * 0.01)
    assert cost.ring_all_gather(10**9, 4, link).seconds == pytest.approx(3 * 0.01)
    assert cost.tree_broadcast(10**9, 8, link, 0, 0).seconds == pytest.approx(3 * 0.01)
    # bytes are still charged: the ledger counts traffic whether or not it is slowed down
    assert cost.ring_all_reduce(10**9, 4, link).sent == 1_500_000_000


@pytest.mark.parametrize("n", [0, 1])
def test_single_rank_is_free(n: int) -> None:
    free = Transfer(0.0, 0, 0)
    assert cost.ring_all_reduce(MB, n, LINK) == free
    assert cost.ring_reduce_scatter(MB, n, LINK) == free
    assert cost.ring_all_gather(MB, n, LINK) == free
    assert cost.tree_broadcast(MB, n, LINK, rank=0, root=0) == free


# -- alternatives to the ring (planning) ----------------------------------------------------
FAST = Link(bandwidth=125_000_000.0, latency=0.0001)  # 1gbit, 0.1 ms: an intra-group link


def test_tree_all_reduce_by_hand() -> None:
    # n=4: 2 ceil(log2 4) (a + S/B) = 4 * (0.001 + 0.08) = 0.324 s
    root = cost.tree_all_reduce(MB, 4, LINK)  # rank 0 = root: 2 children, no parent -> 2 MB each way
    assert root.seconds == pytest.approx(0.324)
    assert (root.sent, root.received) == (2 * MB, 2 * MB)
    leaf = cost.tree_all_reduce(MB, 4, LINK, rank=3, root=0)  # 0 children + 1 parent
    assert (leaf.sent, leaf.received) == (MB, MB)
    inner = cost.tree_all_reduce(MB, 4, LINK, rank=2, root=0)  # 1 child (rank 3) + 1 parent
    assert (inner.sent, inner.received) == (2 * MB, 2 * MB)
    # n=5: 2 * 3 rounds * 0.081 = 0.486 s
    assert cost.tree_all_reduce(MB, 5, LINK).seconds == pytest.approx(0.486)


@pytest.mark.parametrize("n", range(2, 18))
def test_tree_all_reduce_bytes_balance(n: int) -> None:
    transfers = [cost.tree_all_reduce(1234, n, LINK, rank=r, root=0) for r in range(n)]
    # every edge of the spanning tree carries S up and S down
    assert sum(t.sent for t in transfers) == sum(t.received for t in transfers) == 2 * (n - 1) * 1234


def test_halving_doubling_by_hand() -> None:
    # n=4: 2 log2(4) a + 2 (n-1)/n S/B = 4 * 0.001 + 1.5 * 0.08 = 0.004 + 0.12 = 0.124 s
    t = cost.halving_doubling_all_reduce(MB, 4, LINK)
    assert t.seconds == pytest.approx(0.124)
    assert (t.sent, t.received) == (1_500_000, 1_500_000)  # the ring's bytes: 2 * 3/4 * 1 MB
    assert t.seconds < cost.ring_all_reduce(MB, 4, LINK).seconds  # 4 latencies instead of 6
    # n=8: 6 * 0.001 + 2 * 7/8 * 0.08 = 0.006 + 0.14 = 0.146 s; 1.75 MB
    t8 = cost.halving_doubling_all_reduce(MB, 8, LINK)
    assert t8.seconds == pytest.approx(0.146)
    assert t8.sent == 1_750_000


def test_halving_doubling_not_a_power_of_two_folds() -> None:
    # n=6: core p=4 (0.124 s, 1.5 MB) + fold and unfold of the whole vector 2 * (0.001 + 0.08)
    # = 0.124 + 0.162 = 0.286 s; a partner moves 1.5 MB + 1 MB = 2.5 MB each way
    t = cost.halving_doubling_all_reduce(MB, 6, LINK)
    assert t.seconds == pytest.approx(0.286)
    assert (t.sent, t.received) == (2_500_000, 2_500_000)


def test_hierarchical_by_hand() -> None:
    # n=8 in g=2 groups of m=4, shard S/m = 250 kB
    # intra: 2 (m-1) (a_i + S/(m B_i)) = 6 * (0.0001 + 250e3/125e6) = 6 * 0.0021 = 0.0126 s
    # inter: 2 (g-1) (a_e + S/(g m B_e)) = 2 * (0.001 + 125e3/12.5e6) = 2 * 0.011 = 0.022 s
    t = cost.hierarchical_all_reduce(MB, 8, 2, intra=FAST, inter=LINK)
    assert t.seconds == pytest.approx(0.0346)
    # bytes: 2 (m-1) S/m + 2 (g-1) S/(g m) = 6 * 250e3 + 2 * 125e3 = 1.75 MB
    assert (t.sent, t.received) == (1_750_000, 1_750_000)
    # the flat ring over the slow link: 14 * (0.001 + 0.01) = 0.154 s
    assert cost.ring_all_reduce(MB, 8, LINK).seconds == pytest.approx(0.154)


@pytest.mark.parametrize("n", [2, 3, 4, 6, 8, 12])
def test_hierarchical_limits_are_rings(n: int) -> None:
    s = 1_200_000
    one_group = cost.hierarchical_all_reduce(s, n, 1, intra=FAST, inter=LINK)
    ring_intra = cost.ring_all_reduce(s, n, FAST)
    assert one_group.seconds == pytest.approx(ring_intra.seconds)
    assert (one_group.sent, one_group.received) == (ring_intra.sent, ring_intra.received)
    all_groups = cost.hierarchical_all_reduce(s, n, n, intra=FAST, inter=LINK)
    ring_inter = cost.ring_all_reduce(s, n, LINK)
    assert all_groups.seconds == pytest.approx(ring_inter.seconds)
    assert (all_groups.sent, all_groups.received) == (ring_inter.sent, ring_inter.received)


def test_hierarchical_needs_whole_groups() -> None:
    with pytest.raises(ValueError, match="divisible"):
        cost.hierarchical_all_reduce(MB, 6, 4, intra=FAST, inter=LINK)
    with pytest.raises(ValueError, match="divisible"):
        cost.hierarchical_all_reduce(MB, 6, 0, intra=FAST, inter=LINK)


def test_parameter_server_by_hand() -> None:
    # n=4 workers, server on the same link: 2 (a + max(S/B, n S/B)) = 2 * (0.001 + 0.32) = 0.642 s
    t = cost.parameter_server(MB, 4, LINK)
    assert t.seconds == pytest.approx(0.642)
    assert (t.sent, t.received) == (MB, MB)
    # a 10x faster server link: n S/B_s = 4e6/125e6 = 0.032 < S/B = 0.08 -> 2 * 0.081 = 0.162 s
    assert cost.parameter_server(MB, 4, LINK, server=Link(125_000_000.0, 0.001)).seconds == pytest.approx(0.162)


def test_gossip_step_by_hand() -> None:
    # d=2 neighbours: a + d S/B = 0.001 + 2e6/12.5e6 = 0.161 s; 2 MB each way (full-duplex)
    t = cost.gossip_step(MB, 2, LINK)
    assert t.seconds == pytest.approx(0.161)
    assert (t.sent, t.received) == (2 * MB, 2 * MB)
    assert cost.gossip_step(MB, 0, LINK) == Transfer(0.0, 0, 0)
    with pytest.raises(ValueError):
        cost.gossip_step(MB, -1, LINK)


@pytest.mark.parametrize("n", [0, 1])
def test_single_rank_is_free_for_planning_collectives(n: int) -> None:
    free = Transfer(0.0, 0, 0)
    assert cost.tree_all_reduce(MB, n, LINK) == free
    assert cost.halving_doubling_all_reduce(MB, n, LINK) == free
    assert cost.hierarchical_all_reduce(MB, 1, 1, intra=FAST, inter=LINK) == free
    assert cost.parameter_server(MB, n, LINK) == free


# -- what projections charge: the cheapest algorithm per bucket (lowband plan and lowband simulate) --
WAN = Link(bandwidth=125_000_000.0, latency=0.05)  # 1gbit, 50 ms


def test_double_tree_by_hand() -> None:
    # n=1024: D = 2 * 10 = 20 stages, W = 2 S/B = 0.4 s for 25 MB: (sqrt(19 * 0.05) + sqrt(0.4))^2
    t = cost.double_tree_all_reduce(25_000_000, 1024, WAN)
    assert t.seconds == pytest.approx((math.sqrt(0.95) + math.sqrt(0.4)) ** 2)
    assert (t.sent, t.received) == (50_000_000, 50_000_000)
    # one byte: a single chunk, D (a + W)
    assert cost.double_tree_all_reduce(1, 1024, WAN).seconds == pytest.approx(20 * (0.05 + 2 / 125e6))
    assert cost.double_tree_all_reduce(MB, 1, WAN) == Transfer(0.0, 0, 0)


def test_all_reduce_picks_the_cheapest() -> None:
    big = 25_000_000
    # 1,024 ranks (a power of two): halving-doubling, 20 latencies and the ring's bytes
    assert cost.all_reduce(big, 1024, WAN) == cost.halving_doubling_all_reduce(big, 1024, WAN)
    # 10,240 ranks at 0.1 ms: the fold costs halving-doubling 2 (a + S/B) more (0.80 s); the double tree
    # (sqrt(27 a) + sqrt(0.4))^2 = 0.47 s is cheaper; at 50 ms its 27 latencies cost more than the fold
    assert cost.cheapest(cost.ALL_REDUCE_ALGORITHMS, big, 10_240, FAST)[0] == "double-tree"
    assert cost.cheapest(cost.ALL_REDUCE_ALGORITHMS, big, 10_240, WAN)[0] == "halving-doubling"
    # two ranks: every algorithm is the ring or worse, and the ring wins ties
    assert cost.cheapest(cost.ALL_REDUCE_ALGORITHMS, MB, 2, LINK)[0] == "ring"
    for n in (3, 4, 7, 64, 1000):
        assert cost.all_reduce(MB, n, WAN).seconds == min(f(MB, n, WAN).seconds
                                                          for f in cost.ALL_REDUCE_ALGORITHMS.values())


def test_bruck_collectives_by_hand() -> None:
    # all-gather, n=5: ceil(log2 5) a + 4 S/B = 3 * 0.001 + 4 * 0.08 = 0.323 s (ring: 4 * 0.081 = 0.324 s)
    assert cost.bruck_all_gather(MB, 5, LINK).seconds == pytest.approx(0.323)
    assert cost.all_gather(MB, 5, LINK) == cost.bruck_all_gather(MB, 5, LINK)
    # all-to-all, n=8: 3 (a + S/(2B)) = 3 * (0.001 + 0.04) = 0.123 s, 1.5 MB (pairwise: 7 * 0.011 = 0.077 s)
    t = cost.bruck_all_to_all(MB, 8, LINK)
    assert t.seconds == pytest.approx(0.123) and t.sent == 1_500_000
    assert cost.all_to_all_any(MB, 8, LINK) == cost.all_to_all(MB, 8, LINK)
    assert cost.all_to_all_any(1000, 1024, WAN) == cost.bruck_all_to_all(1000, 1024, WAN)  # latency-bound


def test_buckets_split_full_then_the_rest() -> None:
    assert cost.bucket_sizes(60, 25) == [25, 25, 10]
    assert cost.bucket_sizes(50, 25) == [25, 25]
    assert cost.bucket_sizes(10, math.inf) == [10]
    parts = cost.buckets("all_reduce", 60 * MB, 4, LINK, 25 * MB, "ring")
    assert [p.sent for p in parts] == [int(1.5 * 25 * MB)] * 2 + [int(1.5 * 10 * MB)]
    assert sum(p.sent for p in parts) == 90 * MB


def test_behind_backward() -> None:
    # buckets of 1 s ready at 1, 2, 3 (window 3): each done before the next is ready, the last at 4
    assert cost.behind_backward([1.0, 1.0, 1.0], 3.0) == pytest.approx(4.0)
    # buckets of 2 s: the link lags, 1 + 3 * 2 = 7; no window: the plain sum from the start
    assert cost.behind_backward([2.0, 2.0, 2.0], 3.0) == pytest.approx(7.0)
    assert cost.behind_backward([2.0, 2.0], 0.0, start=1.0) == pytest.approx(5.0)
    assert cost.behind_backward([2.0], 0.0, start=1.0, link_free=4.0) == pytest.approx(6.0)
