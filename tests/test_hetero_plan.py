"""Planning a mixed cluster (lowband.predict.hetero, `lowband plan --worker-speed --sites`)."""

from __future__ import annotations

import pytest

from lowband.net import cost
from lowband.net.link import Link, Network
from lowband.predict.hetero import Cluster, best_ring, budgets, hierarchical_seconds, plan_cluster, ring_seconds
from lowband.predict.plan_cli import main as plan_main

MB = 10**6


def sites(placement: str, n: int = 4) -> Network:
    return Network.with_sites(Network.parse("1gbit", "1ms", n), placement, "50mbit", "30ms")


def crossings(net: Network, order: tuple[int, ...]) -> int:
    return sum(net.site(a) != net.site(b) for a, b in zip(order, order[1:] + order[:1]))


def test_best_ring_crosses_the_wan_once_each_way() -> None:
    net = sites("0,1,0,1")
    ring = best_ring(net, 100 * MB)
    assert crossings(net, ring) == 2 and crossings(net, tuple(range(4))) == 4
    assert ring_seconds(net, ring, 100 * MB) == pytest.approx(ring_seconds(net, range(4), 100 * MB) / 2, rel=0.01)


def test_large_clusters_keep_sites_contiguous() -> None:
    net = sites(",".join(["0", "1"] * 6), 12)
    ring = best_ring(net, MB)
    assert crossings(net, ring) == 2 and sorted(ring) == list(range(12))


def test_hierarchical_is_inside_plus_across_plus_broadcast() -> None:
    net = sites("0,0,1,1")
    inside = cost.ring_all_reduce(400 * MB, 2, Link(125e6, 0.001)).seconds
    across = cost.ring_all_reduce(400 * MB, 2, Link(6.25e6, 0.031)).seconds
    back = cost.gloo_broadcast(400 * MB, 2, Link(125e6, 0.001), 0, 0).seconds
    assert hierarchical_seconds(net, [[0, 1], [2, 3]], 400 * MB) == pytest.approx(inside + across + back)


def test_work_follows_speed() -> None:
    assert budgets((1, 1, 0.5, 0.25), 20) == (20, 20, 10, 5)
    assert budgets((0.5, 0.01), 10) == (10, 1)  # at least one step
    assert budgets((1, 0.5), 5) == (5, 3)  # halves round up, as --budget speed does
    plan = plan_cluster(Cluster(sites("0,0,1,1"), (1, 1, 0.5, 0.25)), 400 * MB)
    assert plan.groups == ((0, 1), (2, 3)) and plan.budgets == (20, 20, 10, 5)
    assert plan.batch_shares == pytest.approx((1 / 2.75, 1 / 2.75, 0.5 / 2.75, 0.25 / 2.75))
    assert (plan.throughput_fixed, plan.throughput_speed) == (1.0, 2.75)
    assert plan.utilisation_fixed == pytest.approx((0.25 + 0.25 + 0.5 + 1) / 4)
    assert plan.hierarchical  # 2 x 2 workers, 1 Gbit/s inside, 50 Mbit/s between


def test_cluster_refuses_bad_speeds() -> None:
    with pytest.raises(ValueError, match="3 values for 4 workers"):
        Cluster(sites("0,0,1,1"), (1, 1, 1))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        Cluster(sites("0,0,1,1"), (1, 1, 1, 2))


def test_plan_cli_prints_the_mixed_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--params", "1e8", "--workers", "4", "--bandwidth", "1gbit", "--sites", "0,1,0,1", "--wan-bandwidth",
            "50mbit", "--wan-latency", "30ms", "--worker-speed", "1*2,0.5,0.25", "--step-time", "0.2s",
            "--steps", "100", "--algo", "ddp;diloco", "--compress", "identity"]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    assert "100 steps of 0.8 s" in out  # the slowest worker's pace
    assert "ring order    0,1,3,2" in out and "20*2,10,5" in out and "(2.75x)" in out
    with pytest.raises(SystemExit) as exit_:
        plan_main(argv[:-8] + ["--worker-speed", "1,1", "--step-time", "0.2s", "--steps", "100"])
    assert exit_.value.code == 2 and "2 values for 4 workers" in capsys.readouterr().err
