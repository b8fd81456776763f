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
