"""``Comm`` across real processes (gloo over loopback), started with ``launch()``.

Each launch costs a few seconds, so one worker function per world size runs every check
and returns plain values (lists, floats, ledger rows); the tests below assert on them in
the parent process, where pytest can show the difference. The workers are module-level so
the spawned children can import them: ``multiprocessing``'s spawn start method hands the
parent's ``sys.path`` (which holds this directory) to the children, and the fixtures also
put this directory and the package on ``PYTHONPATH`` for any import mode.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

import lowband
from lowband.comm import Comm
from lowband.comm.group import init_from_env, shutdown
from lowband.net import cost
from lowband.net.link import Link, Network
from lowband.train.launch import launch

# 1 MB of float32 over 10mbit between 2 ranks: 2(n-1) * (S/n)/B = 2 * 500_000 / 1.25e6 = 0.8 s
EMU_NUMEL = 250_000
EMU_BANDWIDTH = "10mbit"
EMU_SECONDS = 0.8
# overlap check: 500 kB all-reduce over 10mbit = 0.4 s, overlapped with a 0.4 s sleep
OVERLAP_NUMEL = 125_000
OVERLAP_SLEEP = 0.4
# four ranks, one slow link (rank 2): collectives are bounded by it, the 0<->1 pair is not
HETERO_BANDWIDTH = "1gbit,1gbit,100mbit,1gbit"
HETERO_LATENCY = "1ms,1ms,1ms,3ms"
SMALL_NUMEL = 1000  # 4000 bytes


def _rows(comm: Comm) -> list[dict[str, Any]]:
    return [r.to_dict() for r in comm.ledger.records]


@record
def two_rank_worker() -> dict[str, Any]:
    """Correctness, ledger bytes, async overlap and emulated timing, with 2 ranks."""
    rank, world = init_from_env(timeout_s=60)
    out: dict[str, Any] = {"rank": rank, "world": world}
    plain = Comm()
    try:
        # -- correctness (no emulation) -------------------------------------------------
        import pickle

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("agree() unpickled bytes from the network")

        real_loads, pickle.loads = pickle.loads, refuse
        try:
            out["agreed"] = lowband.comm.group.agree(f"run-é-{rank}" if rank == 1 else "", src=1)
        finally:
            pickle.loads = real_loads
        t = torch.full((5,), float(rank + 1))
        returned = plain.all_reduce(t, tag="sum")
        out["sum"] = t.tolist()
        out["sum_in_place"] = returned is t

        t = torch.tensor([2.0 * rank, 10.0 + rank])
        plain.all_reduce(t, average=True, tag="avg")
        out["avg"] = t.tolist()

        t = torch.tensor([rank, 10 * rank + 1, -rank], dtype=torch.int64)
        out["gather"] = [g.tolist() for g in plain.all_gather(t, tag="gather")]

        t = torch.arange(4, dtype=torch.float32) + 100 * rank
        plain.broadcast(t, src=1, tag="bcast")
        out["bcast"] = t.tolist()

        if rank == 0:
            plain.send(torch.arange(7, dtype=torch.int64) * 3, dst=1, tag="p2p")
            back = torch.zeros(7, dtype=torch.int64)
            plain.recv(back, src=1, tag="p2p")
            out["p2p"] = back.tolist()
        else:
            got = torch.zeros(7, dtype=torch.int64)
            plain.recv(got, src=0, tag="p2p")
            plain.send(got + 1, dst=0, tag="p2p")
            out["p2p"] = got.tolist()

        t = torch.full((3,), 2.0 ** rank)
        handle = plain.all_reduce(t, async_op=True, tag="async")
        out["async"] = handle.wait().tolist()

        # -- emulated 1 MB all-reduce over 10mbit ---------------------------------------
        plain.all_reduce(torch.zeros(EMU_NUMEL))  # warm the gloo path for this size
        out["plain_ledger"] = _rows(plain)
        emu = Comm(network=Network.parse(EMU_BANDWIDTH, "none", world))
        try:
            x = torch.ones(EMU_NUMEL)
            plain.barrier()
            start = time.perf_counter()
            emu.all_reduce(x, tag="emu")
            out["emu_measured"] = time.perf_counter() - start
            out["emu_value"] = float(x[0])

            # -- async overlap: 0.4 s transfer alongside 0.4 s of caller work ----------------
            y = torch.ones(OVERLAP_NUMEL)
            plain.barrier()
            start = time.perf_counter()
            emu.all_reduce(y, tag="seq")
            time.sleep(OVERLAP_SLEEP)
            out["sequential"] = time.perf_counter() - start

            y = torch.ones(OVERLAP_NUMEL)
            plain.barrier()
            wait_before = emu.wait_seconds
            start = time.perf_counter()
            handle = emu.all_reduce(y, async_op=True, tag="overlap")
            out["done_right_away"] = handle.done()
            time.sleep(OVERLAP_SLEEP)
            handle.wait()
            out["overlapped"] = time.perf_counter() - start
            out["overlap_wait_seconds"] = emu.wait_seconds - wait_before
            out["overlap_value"] = float(y[0])
            out["emu_ledger"] = _rows(emu)
        finally:
            emu.close()
    finally:
        plain.close()
        shutdown()
    return out


@record
def four_rank_worker() -> dict[str, Any]:
    """Correctness and ledger bytes with 4 ranks over a network with one slow link."""
    rank, world = init_from_env(timeout_s=60)
    out: dict[str, Any] = {"rank": rank, "world": world}
    comm = Comm(network=Network.parse(HETERO_BANDWIDTH, HETERO_LATENCY, world))
    try:
        t = torch.full((SMALL_NUMEL,), float(rank + 1))
        comm.all_reduce(t, tag="sum")
        out["sum"] = sorted(set(t.tolist()))

        t = torch.full((SMALL_NUMEL,), float(rank))
        comm.all_reduce(t, average=True, tag="avg")
        out["avg"] = sorted(set(t.tolist()))

        t = torch.full((SMALL_NUMEL,), float(rank)) + torch.arange(SMALL_NUMEL) / SMALL_NUMEL
        gathered = comm.all_gather(t, tag="gather")
        out["gather_ok"] = [torch.equal(g, torch.full((SMALL_NUMEL,), float(r)) + torch.arange(SMALL_NUMEL) / SMALL_NUMEL)
                            for r, g in enumerate(gathered)]

        t = torch.full((SMALL_NUMEL,), float(rank * 7))
        comm.broadcast(t, src=1, tag="bcast")
        out["bcast"] = sorted(set(t.tolist()))

        # two disjoint pairs at once: 0 -> 1 over fast links, 2 -> 3 through rank 2's slow link
        peer = {0: 1, 1: 0, 2: 3, 3: 2}[rank]
        if rank in (0, 2):
            comm.send(torch.full((SMALL_NUMEL,), float(rank + 40)), dst=peer, tag="p2p")
            out["p2p"] = None
        else:
            got = torch.zeros(SMALL_NUMEL)
            comm.recv(got, src=peer, tag="p2p")
            out["p2p"] = sorted(set(got.tolist()))

        # all-to-all: chunk j of rank r holds 10 r + j; after it, chunk j is rank j's chunk for r
        t = torch.cat([torch.full((SMALL_NUMEL // 4,), 10.0 * rank + j) for j in range(world)])
        got = comm.all_to_all(t, tag="a2a")
        out["a2a"] = [sorted(set(c.tolist())) for c in got.chunk(world)]

        # ring neighbour exchange: send to both neighbours, receive from both
        left, right = (rank - 1) % world, (rank + 1) % world
        mine = torch.full((SMALL_NUMEL,), float(rank))
        recvs = {left: torch.zeros(SMALL_NUMEL), right: torch.zeros(SMALL_NUMEL)}
        comm.sendrecv({left: mine, right: mine}, recvs, tag="ring")
        out["ring"] = {peer: sorted(set(t.tolist())) for peer, t in recvs.items()}

        # monitoring traffic is not charged
        t = torch.tensor([float(rank)])
        comm.monitor_all_reduce(t)
        out["monitor"] = t.item()
        out["ledger"] = _rows(comm)
    finally:
        comm.close()
        shutdown()
    return out


# -- fixtures: one launch per world size --------------------------------------------------


def _launch(fn: Any, nprocs: int) -> dict[int, dict[str, Any]]:
    here = Path(__file__).resolve().parent
    package_root = Path(lowband.__file__).resolve().parent.parent
    paths = [str(here), str(here.parent), str(package_root), os.environ.get("PYTHONPATH", "")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
        results = launch(fn, nprocs)
    assert sorted(results) == list(range(nprocs))
    return results


@pytest.fixture(scope="module")
def two() -> dict[int, dict[str, Any]]:
    return _launch(two_rank_worker, 2)


@pytest.fixture(scope="module")
def four() -> dict[int, dict[str, Any]]:
    return _launch(four_rank_worker, 4)


def _by_tag(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["tag"], []).append(row)
    return grouped


# -- two ranks -------------------------------------------------------------------------


def test_two_ranks_values(two: dict[int, dict[str, Any]]) -> None:
    for rank, res in two.items():
        assert (res["rank"], res["world"]) == (rank, 2)
        assert res["sum"] == [3.0] * 5
        assert res["sum_in_place"] is True
        assert res["avg"] == [1.0, 10.5]
        assert res["gather"] == [[0, 1, 0], [1, 11, -1]], "all_gather returns rank order"
        assert res["bcast"] == [100.0, 101.0, 102.0, 103.0], "broadcast copies src 1's tensor"
        assert res["async"] == [3.0, 3.0, 3.0]
        assert res["agreed"] == "run-é-1", "agree() hands every rank src's string (never unpickled)"
    assert two[1]["p2p"] == [0, 3, 6, 9, 12, 15, 18]
    assert two[0]["p2p"] == [1, 4, 7, 10, 13, 16, 19]


def test_two_ranks_ledger_bytes(two: dict[int, dict[str, Any]]) -> None:
    free = Link()
    for rank, res in two.items():
        rows = _by_tag(res["plain_ledger"])
        assert list(rows) == ["sum", "avg", "gather", "bcast", "p2p", "async", ""]
        # all-reduce, n=2: 2(n-1)S/n = S each way
        (row,) = rows["sum"]
        assert (row["op"], row["payload"], row["sent"], row["received"], row["peers"]) == ("all_reduce", 20, 20, 20, 2)
        assert (row["sent"], row["received"]) == (cost.ring_all_reduce(20, 2, free).sent,) * 2
        (row,) = rows["avg"]
        assert (row["sent"], row["received"]) == (8, 8)
        # all-gather of 3 int64 per rank: (n-1) * 24 bytes
        (row,) = rows["gather"]
        assert (row["op"], row["payload"], row["sent"], row["received"]) == ("all_gather", 24, 24, 24)
        # broadcast from 1 of 16 bytes: the root sends to its one child, the other receives
        (row,) = rows["bcast"]
        expected = (16, 0) if rank == 1 else (0, 16)
        assert (row["sent"], row["received"]) == expected
        t = cost.tree_broadcast(16, 2, free, rank, 1)
        assert (t.sent, t.received) == expected
        # p2p: 7 int64 = 56 bytes, charged to the sender as sent and to the receiver as received
        ops = [(r["op"], r["sent"], r["received"], r["peers"]) for r in rows["p2p"]]
        if rank == 0:
            assert ops == [("send", 56, 0, 2), ("recv", 0, 56, 2)]
        else:
            assert ops == [("recv", 0, 56, 2), ("send", 56, 0, 2)]
        # the warm-up all-reduce (no tag) of 1 MB
        (row,) = rows[""]
        assert (row["payload"], row["sent"], row["received"]) == (1_000_000, 1_000_000, 1_000_000)
        # no network: nothing modelled, totals add up
        assert all(r["modelled"] == 0.0 for r in res["plain_ledger"])
        assert all(r["end"] >= r["start"] for r in res["plain_ledger"])


def test_two_ranks_emulated_all_reduce_time(two: dict[int, dict[str, Any]]) -> None:
    link = Network.parse(EMU_BANDWIDTH, "none", 2).bottleneck()
    modelled = cost.ring_all_reduce(EMU_NUMEL * 4, 2, link).seconds
    assert modelled == pytest.approx(EMU_SECONDS)
    for rank, res in two.items():
        assert res["emu_value"] == 2.0
        measured = res["emu_measured"]
        assert modelled <= measured <= 1.3 * modelled, f"rank {rank}: {measured:.3f}s for {modelled:.3f}s modelled"
        (row,) = _by_tag(res["emu_ledger"])["emu"]
        assert row["modelled"] == pytest.approx(EMU_SECONDS)
        assert (row["sent"], row["received"]) == (1_000_000, 1_000_000)
        assert row["end"] - row["start"] >= row["modelled"]


def test_two_ranks_async_overlap(two: dict[int, dict[str, Any]]) -> None:
    modelled = cost.ring_all_reduce(OVERLAP_NUMEL * 4, 2, Network.parse(EMU_BANDWIDTH, "none", 2).bottleneck()).seconds
    assert modelled == pytest.approx(0.4)
    for rank, res in two.items():
        seq, over = res["sequential"], res["overlapped"]
        assert seq >= modelled + OVERLAP_SLEEP, f"rank {rank}: sequential {seq:.3f}s"
        assert over >= modelled, f"rank {rank}: an overlapped op cannot beat its own transfer ({over:.3f}s)"
        # overlap saves most of the 0.4 s sleep; allow half of it to be lost to a noisy machine
        assert over < seq - 0.5 * OVERLAP_SLEEP, f"rank {rank}: overlapped {over:.3f}s vs sequential {seq:.3f}s"
        assert res["done_right_away"] is False
        assert res["overlap_wait_seconds"] < modelled, "the caller blocked only for what was left"
        assert res["overlap_value"] == 2.0
        tags = [r["tag"] for r in res["emu_ledger"]]
        assert tags == ["emu", "seq", "overlap"]
        for row in res["emu_ledger"][1:]:
            assert row["modelled"] == pytest.approx(0.4)
            assert (row["sent"], row["received"]) == (500_000, 500_000)


# -- four ranks ------------------------------------------------------------------------


def test_four_ranks_values(four: dict[int, dict[str, Any]]) -> None:
    for rank, res in four.items():
        assert (res["rank"], res["world"]) == (rank, 4)
        assert res["sum"] == [10.0]
        assert res["avg"] == [1.5]
        assert res["gather_ok"] == [True] * 4
        assert res["bcast"] == [7.0], "broadcast copies src 1's tensor"
    assert four[1]["p2p"] == [40.0]
    assert four[3]["p2p"] == [42.0]
    for rank, res in four.items():
        assert res["a2a"] == [[10.0 * j + rank] for j in range(4)]
        assert res["ring"] == {(rank - 1) % 4: [float((rank - 1) % 4)], (rank + 1) % 4: [float((rank + 1) % 4)]}
        assert res["monitor"] == 6.0
        assert "monitor" not in _by_tag(res["ledger"])


def test_four_ranks_ledger_matches_cost_model(four: dict[int, dict[str, Any]]) -> None:
    size = SMALL_NUMEL * 4
    net = Network.parse(HETERO_BANDWIDTH, HETERO_LATENCY, 4)
    slow = net.bottleneck()
    assert slow == Link(12_500_000.0, 0.003)
    for rank, res in four.items():
        rows = _by_tag(res["ledger"])
        # all-reduce: 2(n-1)S/n = 6 * 1000 = 6000 bytes; 6 * (3 ms + 1000 B / 12.5 MB/s) = 18.48 ms
        for tag in ("sum", "avg"):
            (row,) = rows[tag]
            assert (row["sent"], row["received"], row["peers"]) == (6000, 6000, 4)
            assert row["modelled"] == pytest.approx(0.01848)
            assert row["modelled"] == pytest.approx(cost.ring_all_reduce(size, 4, slow).seconds)
            assert row["end"] - row["start"] >= row["modelled"]
        # all-gather: (n-1) S = 12000 bytes; 3 * (3 ms + 4000/12.5e6) = 9.96 ms
        (row,) = rows["gather"]
        assert (row["sent"], row["received"]) == (12_000, 12_000)
        assert row["modelled"] == pytest.approx(0.00996)
        # binomial broadcast from root 1: relative ranks (r - 1) % 4 = 3, 0, 1, 2 send to 0, 2, 0, 1 children
        (row,) = rows["bcast"]
        assert row["sent"] == [0, 2 * size, 0, size][rank]
        assert row["received"] == (0 if rank == 1 else size)
        assert row["modelled"] == pytest.approx(2 * 0.003 + 3 * size / 12.5e6)  # gloo's overlapping sends
        t = cost.gloo_broadcast(size, 4, slow, rank, 1)
        assert (row["sent"], row["received"]) == (t.sent, t.received)
        # point-to-point is bounded by the pair's links only
        (row,) = rows["p2p"]
        assert row["op"] == ("send" if rank in (0, 2) else "recv")
        assert (row["sent"], row["received"]) == ((size, 0) if rank in (0, 2) else (0, size))
        assert row["peers"] == 2
        if rank in (0, 1):
            assert row["modelled"] == pytest.approx(0.001 + size / 125e6)  # 1gbit, 1 ms
        else:
            assert row["modelled"] == pytest.approx(0.003 + size / 12.5e6)  # 100mbit, 3 ms
        # all-to-all: (n-1) S/n = 3000 bytes; 3 * (3 ms + 1000/12.5e6)
        (row,) = rows["a2a"]
        assert (row["op"], row["sent"], row["received"]) == ("all_to_all", 3000, 3000)
        assert row["modelled"] == pytest.approx(3 * (0.003 + 1000 / 12.5e6))
        # ring exchange: 2 S each way through the slowest link among the rank and its neighbours
        (row,) = rows["ring"]
        assert (row["op"], row["sent"], row["received"], row["peers"]) == ("sendrecv", 2 * size, 2 * size, 3)
        assert row["modelled"] == pytest.approx(net.bottleneck([rank, (rank - 1) % 4, (rank + 1) % 4])
                                                .transfer_seconds(2 * size))
    # bytes balance across ranks for every collective
    for tag in ("sum", "gather", "bcast", "p2p"):
        sent = sum(_by_tag(four[r]["ledger"])[tag][0]["sent"] for r in range(4))
        received = sum(_by_tag(four[r]["ledger"])[tag][0]["received"] for r in range(4))
        assert sent == received, tag
