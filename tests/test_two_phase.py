"""The two-phase quantised mean (lowband.comm.two_phase, issue 26) on real ranks: the same mean on every
rank, close to the exact one, bytes per rank 2(n-1)/n of a payload instead of (n-1), an invalid rank
excluded, and the cost model's choice."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.comm import Comm, group
from lowband.comm.aggregate import Aggregator
from lowband.comm.two_phase import prefer
from lowband.compress import COMPRESSORS, build
from lowband.compress.quant import NOISE_OFFSET
from lowband.feedback import FEEDBACK
from lowband.net.link import Link, Network
from lowband.net.units import parse_bandwidth, parse_latency
from lowband.train.launch import launch

SHAPES = {"w": (300, 200), "b": (4096,)}


def _inputs(rank: int, step: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return [(k, torch.randn(*shape, generator=g)) for k, shape in SHAPES.items()]


def _mean_of(collective: str, spec: str, n: int, rank: int, invalid: int | None = None,
             requant: str = "") -> dict[str, Any]:
    comm = Comm(network=Network.parse("100mbit", "1ms", n))
    agg = Aggregator(comm, build(spec, COMPRESSORS), build("none", FEEDBACK), collective=collective,
                     requant=build(requant, COMPRESSORS) if requant else None)
    named = _inputs(rank)
    if rank == invalid:
        named[0][1][0, 0] = float("nan")
    sent = comm.ledger.bytes_sent
    agg.mean_(named)
    out = {"mean": torch.cat([t.reshape(-1) for _, t in named]), "bytes": comm.ledger.bytes_sent - sent,
           "ops": [r.op for r in comm.ledger.records]}
    comm.close()
    return out


@record
def _worker(spec: str, invalid: int | None) -> dict[str, Any]:
    rank, n = group.init_from_env("gloo", timeout_s=120)
    torch.set_num_threads(1)
    try:
        return {c: _mean_of(c, spec, n, rank, invalid if c == "two_phase" else None)
                for c in ("two_phase", "all_gather", "auto")}
    finally:
        group.shutdown()


@record
def _requant_worker(spec: str, finer: str) -> dict[str, Any]:
    rank, n = group.init_from_env("gloo", timeout_s=120)
    torch.set_num_threads(1)
    try:
        return {"same": _mean_of("two_phase", spec, n, rank), "finer": _mean_of("two_phase", spec, n, rank,
                                                                                  requant=finer)}
    finally:
        group.shutdown()


def _exact(n: int, skip: int | None = None) -> torch.Tensor:
    ranks = [r for r in range(n) if r != skip]
    return torch.stack([torch.cat([t.reshape(-1) for _, t in _inputs(r)]) for r in ranks]).mean(0)


@pytest.mark.parametrize("spec", ["qsgd:bits=8", "int8"])
def test_four_ranks_agree_on_a_close_mean_with_flat_bytes(spec: str) -> None:
    n = 4
    results = launch(_worker, n, spec, None)
    exact = _exact(n)
    two = [results[r]["two_phase"] for r in range(n)]
    for r in range(1, n):
        assert torch.equal(two[r]["mean"], two[0]["mean"]), "every rank holds the same mean"
    error = (torch.linalg.vector_norm(two[0]["mean"] - exact) / torch.linalg.vector_norm(exact)).item()
    gathered = (torch.linalg.vector_norm(results[0]["all_gather"]["mean"] - exact)
                / torch.linalg.vector_norm(exact)).item()
    assert gathered < error < 2 * gathered, (error, gathered)  # two quantisations: about sqrt(2) x one
    payload = results[0]["all_gather"]["bytes"] / (n - 1)  # the all-gather path sends (n - 1) payloads
    assert two[0]["bytes"] == pytest.approx(2 * (n - 1) / n * payload, rel=0.02)  # + flag bytes and padding
    assert two[0]["ops"] == ["all_to_all", "all_gather"] and results[0]["auto"]["ops"] == two[0]["ops"]


def test_requantising_at_more_bits_removes_most_of_the_second_error_for_half_again_the_bytes() -> None:
    """4-bit QSGD, 4 ranks: the reduced shards re-encoded at 8 bits (requant=qsgd:bits=8). The first phase is
    unchanged; the gather's shards take twice the bits, so 1.5x the bytes; the error falls toward the
    all-gather path's one quantisation."""
    n = 4
    results = launch(_requant_worker, n, "qsgd:bits=4", "qsgd:bits=8")
    exact = _exact(n)
    error = {k: (torch.linalg.vector_norm(results[0][k]["mean"] - exact) / torch.linalg.vector_norm(exact)).item()
             for k in ("same", "finer")}
    assert error["finer"] < 0.8 * error["same"], error
    assert results[0]["finer"]["bytes"] == pytest.approx(1.5 * results[0]["same"]["bytes"], rel=0.03)
    assert torch.equal(results[1]["finer"]["mean"], results[0]["finer"]["mean"])


def test_a_rank_with_non_finite_input_is_excluded() -> None:
    n = 3
    results = launch(_worker, n, "qsgd:bits=8", 1)
    exact = _exact(n, skip=1)
    mean = results[0]["two_phase"]["mean"]
    assert torch.isfinite(mean).all() and torch.equal(mean, results[2]["two_phase"]["mean"])
    assert (torch.linalg.vector_norm(mean - exact) / torch.linalg.vector_norm(exact)).item() < 0.2


def test_the_cost_model_prefers_two_phase_where_it_sends_less_and_latency_does_not_dominate() -> None:
    fast = Link(parse_bandwidth("1gbit"), parse_latency("1ms"))
    assert not prefer(10_000_000, 2, fast)  # n = 2: the same bytes, two quantisations
    assert prefer(10_000_000, 4, fast) and prefer(10_000_000, 64, fast)
    assert not prefer(1_000, 64, Link(parse_bandwidth("1gbit"), parse_latency("50ms")))  # tiny payload: twice the latency loses
    assert prefer(1_000, 4, Link())  # no emulated link: fewer bytes decide


def test_the_option_is_validated_and_the_planner_charges_what_the_aggregator_sends() -> None:
    from lowband.algorithms import ALGORITHMS
    from lowband.algorithms.commplan import Setup, average

    options = ALGORITHMS.get("ddp").Options
    assert options(compress="qsgd:bits=4", collective="two_phase").collective == "two_phase"
    for bad, message in ((dict(compress="topk:ratio=0.01", collective="two_phase"), "requantizable"),
                         (dict(compress="qsgd", collective="ring"), "collective must be")):
        with pytest.raises(ValueError, match=message):
            options(**bad)
    fast = Link(parse_bandwidth("1gbit"), parse_latency("1ms"))
    syncs = average(options(compress="qsgd:bits=4"), Setup(params=10_000_000, workers=64, link=fast, step_time=1.0, steps=10), "grads", 1)
    assert [(s.collective, s.label) for s in syncs] == [("all_to_all", "grads"), ("all_gather", "grads.shards")]
    assert syncs[1].nbytes == pytest.approx(syncs[0].nbytes / 64)
    finer = average(options(compress="qsgd:bits=4", requant="qsgd:bits=8"),
                    Setup(params=10_000_000, workers=64, link=fast, step_time=1.0, steps=10), "grads", 1)
    assert finer[1].nbytes == pytest.approx(2 * syncs[1].nbytes, rel=0.01)  # the shards at 8 bits
    with pytest.raises(ValueError, match="requant='topk:ratio=0.01' must be a requantizable compressor"):
        options(compress="qsgd:bits=4", requant="topk:ratio=0.01")


def test_scaling_benchmark_quick(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scaling.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its workers are started by module name ('scaling')
    spec = importlib.util.spec_from_file_location("scaling", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "scaling", bench)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--out", str(tmp_path / "scaling.json")]) == 0
    result = json.loads((tmp_path / "scaling.json").read_text())
    two, four = result["measured"]
    assert four["two-phase_bytes"] < four["all-gather_bytes"] and result["ratio_spread"] < 0.02
    big = result["projected"][-1]
    assert big["workers"] == 10_240 and big["two-phase_bytes"] < 0.2 * big["fp32_bytes"] < big["all-gather_bytes"]


def test_the_requantiser_s_random_state_is_checkpointed() -> None:
    """A seeded requant compressor draws its own noise: the aggregator's state carries it, so a resumed run
    rounds the shards as one that did not stop."""
    comm = Comm()
    agg = Aggregator(comm, build("qsgd:bits=4", COMPRESSORS), build("none", FEEDBACK),
                     requant=build("qsgd:bits=8", COMPRESSORS))
    assert agg.two_phase is not None
    requant = agg.two_phase.requant
    def draw() -> torch.Tensor:  # 64 roundings of 0.5: the generator's next bits
        halves = torch.full((64,), 0.5 + NOISE_OFFSET)
        return requant.round_stochastic(halves, 1, torch.empty(64, dtype=torch.uint8)).clone()

    draw()
    saved = agg.state_dict()
    ahead = draw()
    agg.load_state_dict(saved)
    assert torch.equal(draw(), ahead)
    plain = Aggregator(comm, build("qsgd:bits=4", COMPRESSORS), build("none", FEEDBACK))
    assert "requant" not in plain.state_dict()  # the compressor itself: saved once, under "compressor"
