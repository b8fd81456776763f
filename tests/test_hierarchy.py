"""Hierarchical averaging (``--hierarchical``, Holmes arXiv:2312.03549) on 4 real gloo ranks:
equal to the flat mean, WAN bytes from the leaders only, compressed across, faults, options."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

import lowband
from lowband.algorithms.base import SyncOptions
from lowband.comm import guards
from lowband.comm.aggregate import Aggregator
from lowband.comm.hierarchy import HierarchicalAggregator
from lowband.compress import COMPRESSORS, build
from lowband.feedback import FEEDBACK
from lowband.net.link import Network
from lowband.train.launch import launch

SHAPES = [(64, 80), (80,), (300,), (7, 5)]  # large and small tensors (small ones are bucketed across)


def network(sites: str) -> Network:
    return Network.with_sites(Network.parse("1gbit", "1ms", 4), sites, "50mbit", "30ms")


def inputs(rank: int, dtype: torch.dtype = torch.float64) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return [(f"t{i}", torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)) for i, shape in enumerate(SHAPES)]


def identity(comm: Any) -> Aggregator:
    return Aggregator(comm, build("identity", COMPRESSORS), build("none", FEEDBACK), tag="t")


def powersgd(comm: Any) -> Aggregator:
    return Aggregator(comm, build("powersgd:rank=2", COMPRESSORS), build("ef", FEEDBACK), tag="t")


def _rows(comm: Any, since: int) -> list[dict[str, Any]]:
    return [r.to_dict() for r in comm.ledger.records[since:]]


@record
def hierarchy_worker() -> dict[str, Any]:
    from lowband.comm import Comm
    from lowband.comm.group import init_from_env, shutdown

    rank, _ = init_from_env(timeout_s=60)
    out: dict[str, Any] = {}
    plain = Comm()
    try:
        for sites in ("0,0,1,1", "0,0,0,1"):
            comm = Comm(network=network(sites))
            flat = [(n, t.clone()) for n, t in inputs(rank)]
            for _, t in flat:
                plain.all_reduce(t, average=True)  # the flat mean, float64
            hier = HierarchicalAggregator(comm, identity, tag="t")
            named = inputs(rank)
            before = comm.wait_seconds
            pending = hier.mean_async(named)
            done_at_once = pending.done()
            pending.wait()
            out[sites] = {
                "done_at_once": done_at_once,
                "error": max((a - b).abs().max().item() for (_, a), (_, b) in zip(named, flat)),
                "rows": _rows(comm, 0), "waited": comm.wait_seconds - before, "leader": hier.leader,
                "state": hier.state_dict(),
            }
            hier.close()
            comm.close()
        # compressed across the WAN: one PowerSGD update per site, every rank gets the same result
        comm = Comm(network=network("0,0,1,1"))
        hier = HierarchicalAggregator(comm, powersgd, tag="t")
        named = inputs(rank, torch.float32)
        hier.mean_(named)
        gathered = comm.all_gather(torch.cat([t.reshape(-1) for _, t in named]), tag="check")
        out["compressed"] = {"spread": max((g - gathered[0]).abs().max().item() for g in gathered),
                             "rows": _rows(comm, 0), "state_keys": sorted(hier.state_dict()["feedback"])}
        # a non-finite input excludes its site for the round: the mean of the other site
        named = inputs(rank)
        if rank == 3:
            named[0][1][0, 0] = float("nan")
        site0 = [inputs(r) for r in (0, 1)]
        expected = [(a + b) / 2 for (_, a), (_, b) in zip(*site0)]
        hier = HierarchicalAggregator(comm, identity, tag="t")
        hier.mean_(named)
        out["faulty"] = max((t - e).abs().max().item() for (_, t), e in zip(named, expected))
        named = inputs(rank)
        if rank in (1, 3):  # one per site: nothing valid reaches the leaders
            named[1][1][0] = float("inf")
        try:
            hier.mean_(named)
            out["all_faulty"] = "no error"
        except guards.NonFiniteError as err:
            out["all_faulty"] = str(err)
        hier.close()
        comm.close()
        plain.close()
        return out
    finally:
        shutdown()


@pytest.fixture(scope="module")
def four() -> dict[int, dict[str, Any]]:
    here = Path(__file__).resolve().parent
    paths = [str(here), str(here.parent), str(Path(lowband.__file__).resolve().parent.parent),
             os.environ.get("PYTHONPATH", "")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
        return launch(hierarchy_worker, 4)


@pytest.mark.parametrize("sites", ["0,0,1,1", "0,0,0,1"])
def test_hierarchical_mean_equals_flat_mean(four: dict[int, dict[str, Any]], sites: str) -> None:
    for rank, out in four.items():
        assert out[sites]["error"] < 1e-12, (rank, out[sites]["error"])


@pytest.mark.parametrize("sites, leaders", [("0,0,1,1", {0, 2}), ("0,0,0,1", {0, 3})])
def test_only_leaders_cross_the_wan(four: dict[int, dict[str, Any]], sites: str, leaders: set[int]) -> None:
    payload = sum(torch.Size(s).numel() for s in SHAPES) * 8
    for rank, out in four.items():
        rows = out[sites]["rows"]
        by_tag = {tag: [r for r in rows if r["tag"] == tag] for tag in ("t.site", "t", "t.bcast")}
        assert out[sites]["leader"] == (rank in leaders)
        across = sum(r["sent"] for r in by_tag["t"])
        if rank in leaders:
            assert across == payload  # ring all-reduce over 2 leaders: the whole payload once
            assert all(r["peers"] == 2 for r in by_tag["t"])
        else:
            assert across == 0 and out[sites]["state"] == {"compressor": {}, "feedback": {}, "rule": {}}
        site_size = sum(s == sites.split(",")[rank] for s in sites.split(","))
        assert (sum(r["payload"] for r in by_tag["t.site"]) == payload) == (site_size > 1)
        assert all(r["peers"] == site_size for r in by_tag["t.site"] + by_tag["t.bcast"])
        assert out[sites]["waited"] > 0.03  # the WAN's latency, charged to the algorithm's Comm
        assert not out[sites]["done_at_once"]  # async: returns before the WAN has carried anything


def test_one_compressed_update_per_site(four: dict[int, dict[str, Any]]) -> None:
    payload = sum(torch.Size(s).numel() for s in SHAPES) * 4
    for rank, out in four.items():
        compressed = out["compressed"]
        assert compressed["spread"] == 0.0  # every rank holds the same mean
        across = sum(r["sent"] for r in compressed["rows"] if r["tag"] == "t")
        if rank in (0, 2):
            assert 0 < across < payload / 4 and compressed["state_keys"]  # PowerSGD factors; EF residuals
        else:
            assert across == 0 and compressed["state_keys"] == []


def test_a_non_finite_input_excludes_its_site(four: dict[int, dict[str, Any]]) -> None:
    for rank, out in four.items():
        assert out["faulty"] < 1e-12, rank
        assert "non-finite" in out["all_faulty"], (rank, out["all_faulty"])  # every rank raises, none hangs


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(aggregate="median"), "aggregate=mean or drop --hierarchical"),
    (dict(checksum=True, compress="topk:ratio=0.1"), "drop --checksum"),
    (dict(attack="signflip:ranks=0"), "drop --attack"),
])
def test_hierarchical_refuses_what_needs_every_rank(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyncOptions(hierarchical=True, **kwargs)
    SyncOptions(**kwargs)  # fine without it


def test_hierarchical_needs_sites() -> None:
    from lowband.algorithms import ALGORITHMS
    from lowband.comm import Comm
    from tiny import tiny_gpt

    SyncOptions(hierarchical=True, attack="labelflip")  # a data-side attack sends honest updates
    model = tiny_gpt()
    options = ALGORITHMS.get("ddp").Options(hierarchical=True)
    with pytest.raises(ValueError, match="--sites .* --wan-bandwidth"):
        ALGORITHMS.get("ddp")(model, torch.optim.SGD(model.parameters(), lr=0.1), Comm(), options)


@pytest.mark.slow
def test_hierarchical_diloco_trains_through_the_cli(tmp_path: Path) -> None:
    from lowband.cli import main as cli_main

    code = cli_main(["train", "--out", str(tmp_path), "--name", "run", "--no-progress", "--workers", "4",
                     "--sites", "0,0,1,1", "--wan-bandwidth", "50mbit", "--wan-latency", "30ms", "--bandwidth", "1gbit",
                     "--hierarchical", "--algo", "diloco", "--steps", "10", "--inner-steps", "5", "--eval-every", "5",
                     "--eval-batches", "1", "--batch-size", "4"])
    assert code == 0
    run = tmp_path / "run"
    ledgers = {r: [json.loads(x) for x in (run / "diloco" / f"ledger_rank{r}.jsonl").read_text().splitlines()]
               for r in range(4)}
    for rank, rows in ledgers.items():
        outer = [r for r in rows if r["tag"] == "outer"]
        assert len({r["step"] for r in outer}) == (2 if rank in (0, 2) else 0)  # the leaders, at steps 5 and 10
        assert {r["step"] for r in rows if r["tag"] == "outer.bcast"} == {5, 10}
    losses = [json.loads(x)["val_loss"] for x in (run / "diloco" / "rank0.jsonl").read_text().splitlines()
              if "val_loss" in json.loads(x)]
    assert len(losses) == 2 and all(loss < 10 for loss in losses)
