"""Ring order (``--ring auto``): the solver on measured matrices, the probe schedule, and 4 real
gloo ranks choosing a ring that avoids the WAN on interleaved sites."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path
from typing import Any

import pytest
from torch.distributed.elastic.multiprocessing.errors import record

import lowband
from lowband.comm.ring_probe import PROBE_BYTES, choose_ring, tournament
from lowband.net.link import Network
from lowband.net.ring import EXHAUSTIVE, TOLERANCE, best_ring, heuristic_ring, ring_cost
from lowband.train.launch import launch

MBIT = 1e6 / 8


def two_sites(sites: str) -> Network:
    n = len(sites.split(","))
    return Network.with_sites(Network.parse("1gbit", "1ms", n), sites, "50mbit", "30ms")


def modelled(net: Network) -> list[list[float]]:
    """What the probes measure on the model: one probe over each pair's link, in isolation."""
    n = len(net.links)
    return [[0.0 if i == j else net.bottleneck([i, j]).transfer_seconds(PROBE_BYTES) for j in range(n)]
            for i in range(n)]


def noisy(matrix: list[list[float]], seed: int, noise: float = 0.1) -> list[list[float]]:
    rng = random.Random(seed)
    return [[s * (1 + noise * rng.random()) for s in row] for row in matrix]


def hops(order: tuple[int, ...]) -> set[frozenset[int]]:
    return {frozenset(p) for p in zip(order, order[1:] + order[:1])}


def crossings(order: tuple[int, ...], net: Network) -> int:
    return sum(net.site(a) != net.site(b) for a, b in zip(order, order[1:] + order[:1]))


# -- the solver ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 5, 7, 12])
def test_one_slow_pair_is_avoided(n: int) -> None:
    seconds = [[0.0 if i == j else 1.0 for j in range(n)] for i in range(n)]
    seconds[1][2] = 50.0  # only rank 1 measured it slow: the hop costs the slower direction
    order = best_ring(seconds)
    assert frozenset((1, 2)) not in hops(order) and sorted(order) == list(range(n))
    assert ring_cost(order, seconds) == (1.0, float(n))
    assert ring_cost(range(n), seconds)[0] == 50.0  # rank order takes it


@pytest.mark.parametrize("sites", ["0,1,0,1", "0,1,0,1,0,1,0,1", "0,1,1,0,1,0", "0,1,2,0,1,2,0,1,2",
                                   "0,1,0,1,0,1,0,1,0,1,0,1"])
def test_interleaved_sites_ring_crosses_the_wan_once_each_way(sites: str) -> None:
    """Pair probes cannot see the WAN shared by several crossings; the total-time tie-break keeps the
    sites contiguous, which is what the shared-WAN model rewards (Network.ring_link)."""
    net = two_sites(sites)
    for seed in range(3):
        order = best_ring(noisy(modelled(net), seed))
        assert crossings(order, net) == len(set(net.sites or ())), order
        assert net.ring_link(order).bandwidth == pytest.approx(50 * MBIT)  # each crossing has the WAN to itself
    assert net.ring_link().bandwidth < 50 * MBIT  # rank order shares it


@pytest.mark.parametrize("bandwidth, sites", [
    ("1gbit", "0,1,0,1"),
    ("1gbit,1gbit,40mbit,1gbit", "0,1,0,1"),  # a slow worker slower than the WAN's share is not
    ("1gbit,1gbit,20mbit,1gbit", "0,1,0,1"),  # a slow worker slower than the WAN's share: every ring
    ("1gbit*3,100mbit,1gbit*2", "0,1,2,0,1,2"),
    ("1gbit", "0,0,1,1,2,2,0,1"),
    ("1gbit,10mbit,1gbit*5", "0,1,1,0,0,1,1"),
])
def test_probed_order_is_the_best_ring_on_the_shared_wan_model(bandwidth: str, sites: str) -> None:
    """What isolated probes see, solved, is the ring the model (WAN shared by crossings) charges least."""
    n = len(sites.split(","))
    net = Network.with_sites(Network.parse(bandwidth, "1ms", n), sites, "50mbit", "30ms")
    order = best_ring(modelled(net))
    best = max(net.ring_link((0, *p)).bandwidth for p in itertools.permutations(range(1, n)))
    assert net.ring_link(order).bandwidth == pytest.approx(best), order


def test_rank_order_stays_when_sites_are_contiguous() -> None:
    net = two_sites("0,0,1,1")
    assert best_ring(modelled(net)) == (0, 1, 2, 3)


def test_uniform_links_give_rank_order_and_small_worlds_need_no_search() -> None:
    assert best_ring([[0.0] * 6 for _ in range(6)]) == tuple(range(6))  # exact ties: the smallest order
    assert best_ring([[0.0, 5.0, 1.0], [5.0, 0.0, 1.0], [1.0, 1.0, 0.0]]) == (0, 1, 2)
    assert best_ring([[0.0]]) == (0,)


def test_slowest_hop_within_tolerance_yields_to_total_time() -> None:
    """A ring whose slowest hop measured a little faster but crosses more slow links loses."""
    net = two_sites("0,1,0,1,0,1")
    seconds = modelled(net)
    contiguous = best_ring(seconds)
    worse = (0, 1, 2, 3, 4, 5)  # crosses at every hop
    for a, b in zip(worse, worse[1:] + worse[:1]):
        seconds[a][b] = seconds[b][a] = seconds[a][b] * (1 - TOLERANCE / 2)
    assert ring_cost(worse, seconds)[0] < ring_cost(contiguous, seconds)[0]
    assert crossings(best_ring(seconds), net) == 2


@pytest.mark.parametrize("n", [5, 6, 7, 8])
def test_heuristic_agrees_with_exhaustive_search(n: int) -> None:
    for seed in range(4):
        rng = random.Random(100 * n + seed)
        seconds = [[rng.random() for _ in range(n)] for _ in range(n)]
        assert heuristic_ring(seconds) == best_ring(seconds), seed
        sites = ",".join(str(rng.randrange(3)) for _ in range(n))
        seconds = noisy(modelled(two_sites(sites)), seed)
        exact, found = ring_cost(best_ring(seconds), seconds), ring_cost(heuristic_ring(seconds), seconds)
        assert found[0] <= exact[0] * (1 + TOLERANCE) and found[1] <= exact[1] * 1.01, (sites, seed)


def test_the_order_is_deterministic_and_canonical() -> None:
    seconds = noisy(modelled(two_sites("0,1,0,1,0,1,0,1")), seed=7)
    orders = {best_ring(seconds) for _ in range(3)}
    assert len(orders) == 1
    order = orders.pop()
    assert order[0] == 0 and order[1] < order[-1]
    assert EXHAUSTIVE >= 8  # this case was searched exhaustively
    all_rings = [(0, *p) for p in itertools.permutations(range(1, 8))]
    best = min(ring_cost(r, seconds)[0] for r in all_rings)
    assert ring_cost(order, seconds)[0] <= best * (1 + TOLERANCE)


@pytest.mark.parametrize("seconds, message", [
    ([[0.0, 1.0], [1.0]], "square matrix"),
    ([[0.0, -1.0], [1.0, 0.0]], "finite and >= 0"),
    ([[0.0, float("nan")], [1.0, 0.0]], "finite and >= 0"),
])
def test_bad_matrices_are_refused(seconds: list[list[float]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        best_ring(seconds)


@pytest.mark.parametrize("n", range(2, 10))
def test_tournament_meets_every_pair_once_in_disjoint_rounds(n: int) -> None:
    rounds = tournament(n)
    assert len(rounds) == n - 1 + n % 2
    met = [p for r in rounds for p in r]
    assert sorted(met) == list(itertools.combinations(range(n), 2))
    for r in rounds:
        ranks = [x for p in r for x in p]
        assert len(ranks) == len(set(ranks))


def test_choose_ring_without_probing() -> None:
    from lowband.comm import Comm

    comm = Comm()
    assert choose_ring("rank", comm) == (0,) and choose_ring("auto", comm) == (0,)
    with pytest.raises(ValueError, match="order of all workers"):
        choose_ring("1,0", comm)


# -- four real ranks ------------------------------------------------------------------------


@record
def auto_ring_worker() -> dict[str, Any]:
    from lowband.comm import Comm
    from lowband.comm.group import init_from_env, shutdown

    init_from_env(timeout_s=60)
    try:
        comm = Comm(network=two_sites("0,1,0,1"))
        order = choose_ring("auto", comm)
        comm.set_ring(order)
        rows = [r.to_dict() for r in comm.ledger.records]
        comm.close()
        return {"order": order, "bandwidth": comm.ring_link.bandwidth, "rows": rows}
    finally:
        shutdown()


def test_four_ranks_auto_ring_avoids_the_shared_wan() -> None:
    here = Path(__file__).resolve().parent
    paths = [str(here), str(here.parent), str(Path(lowband.__file__).resolve().parent.parent),
             os.environ.get("PYTHONPATH", "")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
        results = launch(auto_ring_worker, 4)
    orders = {tuple(r["order"]) for r in results.values()}
    assert len(orders) == 1  # every rank solved the same order
    order = orders.pop()
    net = two_sites("0,1,0,1")
    assert crossings(order, net) == 2 and order in {(0, 1, 3, 2), (0, 2, 1, 3)}
    for r in results.values():
        assert r["bandwidth"] == pytest.approx(50 * MBIT)  # the WAN, not the WAN / 2 of rank order
        tags = {row["tag"] for row in r["rows"]}
        assert tags == {"probe"}
        exchanges = [row for row in r["rows"] if row["op"] == "sendrecv"]
        assert len(exchanges) == 3 * 2 and all(row["sent"] == PROBE_BYTES for row in exchanges)
        assert [row["op"] for row in r["rows"]].count("all_gather") == 1
    assert net.ring_link().bandwidth == pytest.approx(25 * MBIT)
