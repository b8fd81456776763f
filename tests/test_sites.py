"""Sites joined by a WAN in the emulated network: pair links, bottlenecks, ring order, config."""

from __future__ import annotations

import pytest

from lowband.net.link import Link, Network
from lowband.train.config import TrainConfig

MBIT = 1e6 / 8


def two_sites(sites: str = "0,0,1,1") -> Network:
    return Network.with_sites(Network.parse("1gbit", "1ms", 4), sites, "50mbit", "30ms")


def test_pair_across_sites_goes_through_the_wan() -> None:
    net = two_sites()
    assert net.bottleneck([0, 1]) == Link(1000 * MBIT, 0.001)  # same site: the NICs
    assert net.bottleneck([1, 2]) == Link(50 * MBIT, 0.031)  # across: WAN bandwidth, NIC + WAN latency
    assert net.bottleneck() == Link(50 * MBIT, 0.031)
    assert net.multisite and net.emulated


def test_ring_in_site_order_crosses_the_wan_once_each_way() -> None:
    net = two_sites()
    assert net.ring_link() == Link(50 * MBIT, 0.031)  # 0 1 | 2 3: one flow each direction
    assert net.ring_link([0, 2, 1, 3]) == Link(25 * MBIT, 0.031)  # four crossings: two flows share each way


def test_interleaved_sites_are_fixed_by_the_ring_order() -> None:
    net = two_sites("0,1,0,1")
    assert net.ring_link().bandwidth == pytest.approx(25 * MBIT)  # rank order crosses four times
    assert net.ring_link([0, 2, 1, 3]).bandwidth == pytest.approx(50 * MBIT)


def test_without_sites_the_ring_is_the_bottleneck() -> None:
    net = Network.parse("100mbit,1gbit,10mbit,1gbit", "5ms,1ms,2ms,20ms", 4)
    assert net.ring_link() == net.bottleneck()
    assert net.ring_link([3, 1, 0, 2]) == net.bottleneck()


def test_subset_keeps_sites_and_wan() -> None:
    net = two_sites().subset([0, 1])
    assert net.sites == (0, 0) and not net.multisite and net.bottleneck() == Link(1000 * MBIT, 0.001)
    assert two_sites().subset([1, 3]).bottleneck() == Link(50 * MBIT, 0.031)


def test_ring_order_must_visit_every_rank() -> None:
    with pytest.raises(ValueError, match="visit every rank"):
        two_sites().ring_link([0, 1, 1, 3])


@pytest.mark.parametrize("kwargs, message", [
    (dict(sites="0,0,1"), "3 sites for 4 workers"),
    (dict(sites="0,0,1,1"), "need the link between them"),
    (dict(wan_bandwidth="50mbit"), "need --sites"),
    (dict(sites="a,b,c,d", wan_bandwidth="1mbit"), "one site number per worker"),
    (dict(sites="0,0,1,1", wan_bandwidth="50mbps"), "50mbps"),
    (dict(worker_speed="1,1,0.5"), "3 values for 4 workers"),
    (dict(worker_speed="1,2,1,1"), r"in \(0, 1\]"),
    (dict(worker_speed="fast"), "numbers, comma-separated"),
    (dict(ring="0,1,2"), "an order of all workers"),
    (dict(ring="auto", net="netns"), "use --net model"),
])
def test_config_refuses_bad_heterogeneity(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(workers=4, **kwargs)


def test_config_builds_the_network_and_speeds() -> None:
    cfg = TrainConfig(workers=4, bandwidth="1gbit", latency="1ms", sites="0,0,1,1", wan_bandwidth="50mbit", wan_latency="30ms",
                      worker_speed="1,1,0.5,0.25", ring="0,1,3,2")
    assert cfg.network(4) == two_sites()
    assert cfg.speeds(4) == (1.0, 1.0, 0.5, 0.25)
    assert TrainConfig(workers=3).speeds(3) == (1.0, 1.0, 1.0)
    assert "sites 0,0,1,1 joined by 50mbit, 30 ms" in cfg.network(4).describe()


def test_comm_charges_the_ring_order_it_is_given() -> None:
    from lowband.comm import Comm

    comm = Comm()  # one rank: nothing crosses a wire, but the ring's link is still priced
    assert comm.ring == (0,)
    with pytest.raises(ValueError, match="visit every rank"):
        comm.set_ring((0, 1))


def test_elastic_refuses_heterogeneity_for_now() -> None:
    with pytest.raises(ValueError, match="--elastic does not take"):
        TrainConfig(workers=4, algos=("diloco",), elastic=True, worker_speed="1,1,1,0.5")


def test_per_worker_lists_take_repeats() -> None:
    from lowband.net.units import per_worker

    assert per_worker("0*2,1*2") == ["0", "0", "1", "1"]
    assert TrainConfig(workers=4, worker_speed="1*2,0.5,0.25").speeds(4) == (1.0, 1.0, 0.5, 0.25)
    assert Network.with_sites(Network.parse("1gbit*4", "1ms", 4), "0*2,1*2", "50mbit", "30ms") == two_sites()
    with pytest.raises(ValueError, match="whole count"):
        per_worker("1*x")


@pytest.mark.parametrize("algo, budget", [("diloco", "speed"), ("diloco:budget=speed", None)])
def test_elastic_refuses_speed_budgets(algo: str, budget: str | None) -> None:
    with pytest.raises(ValueError, match="budget"):
        TrainConfig(workers=4, algos=(algo,), elastic=True, budget=budget)


@pytest.mark.parametrize("kwargs", [dict(hierarchical=True), dict(algos=("diloco:hierarchical=true",))])
def test_hierarchical_needs_sites(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="--hierarchical averages inside each site"):
        TrainConfig(workers=4, **kwargs)
    TrainConfig(workers=4, sites="0,0,1,1", wan_bandwidth="50mbit", **kwargs)  # accepted with sites
