"""``lowband simulate``: the schedule from the ledger, identity on a real run, scaling, stragglers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lowband.cli import main as cli_main
from lowband.comm.ledger import Ledger, Record
from lowband.net import cost
from lowband.net.link import Link
from lowband.predict.schedule import RankLog, Trace, build_trace
from lowband.predict.simulate import Target, expected_max, simulate
from lowband.predict.simulate_cli import load_traces, simulate_run
from lowband.report.summary import load_run

ALGOS = ("ddp", "diloco", "delayed-diloco")
STEPS = 8
MB = 1_000_000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real run: 2 workers, 8 steps, H = 4, over an emulated 50mbit / 5 ms link (comm dominates)."""
    out = tmp_path_factory.mktemp("sim")
    code = cli_main(["train", "--out", str(out), "--name", "run", "--no-progress", "--workers", "2",
                     "--steps", str(STEPS), "-H", "4", "--eval-every", str(STEPS), "--eval-batches", "1",
                     "--batch-size", "4", "--bandwidth", "50mbit", "--latency", "5ms", "--algo", ",".join(ALGOS)])
    assert code == 0
    return out / "run"


# ----------------------------------------------------------------------------- real run


def test_ledger_records_carry_the_issuing_step(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "ddp" / "ledger_rank0.jsonl").read_text().splitlines()]
    assert rows[0]["tag"] == "init" and "step" not in rows[0]  # before the first step: left out
    assert [r["step"] for r in rows[1:]] == list(range(1, STEPS + 1))  # one all-reduce per step
    assert [r["waited"] for r in rows[1:]] == list(range(1, STEPS + 1))  # each waited for in its own step
    assert "waited" not in rows[0]  # the initial broadcast: before any step


def test_ledger_records_the_step_an_overlapped_mean_was_waited_for(run_dir: Path) -> None:
    """delayed-diloco starts round 1's mean at step 4 and waits for it at step 8 (the end): the schedule
    reads that from the ledger, not from timings a loaded host can blur."""
    rows = [json.loads(line) for line in (run_dir / "delayed-diloco" / "ledger_rank1.jsonl").read_text().splitlines()]
    outer = [(r["step"], r["waited"]) for r in rows if r["tag"] != "init"]
    assert outer == [(4, 8), (8, 8)], outer


def test_identity_reproduces_the_measured_wall_clock(run_dir: Path) -> None:
    run, _, projections = simulate_run(run_dir)
    assert [p.label for p in projections] == list(ALGOS)
    for p in projections:
        measured = p.measured["wall_clock_s"]
        assert p.replayed and p.workers == 2 and p.compute_scale == 1.0
        assert p.wall_clock_s == pytest.approx(measured, rel=0.15), p.label  # 3-5% when the machine is quiet
        assert p.bytes_sent_per_worker == pytest.approx(p.measured["bytes_sent_per_worker"], rel=1e-6), p.label
    trace = load_traces(run, "delayed-diloco")["delayed-diloco"]
    assert [(op.blocking, op.wait_step) for op in trace.ops] == [(False, STEPS), (True, STEPS)]  # round 1 overlaps


def test_old_ledgers_without_step_spread_ops_evenly(run_dir: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    for path in old.glob("*/ledger_rank*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "step"}) + "\n" for r in rows))
    traces = load_traces(load_run(old))
    assert [op.step for op in traces["ddp"].ops] == list(range(1, STEPS + 1))
    assert [op.step for op in traces["diloco"].ops] == [4, 8]
    _, _, projections = simulate_run(old)
    for p in projections[:2]:
        assert p.wall_clock_s == pytest.approx(p.measured["wall_clock_s"], rel=0.15), p.label  # as above


def test_records_load_with_or_without_step() -> None:
    ledger = Ledger()
    ledger.load_state_dict({"records": [
        {"op": "all_reduce", "tag": "grads", "payload": 8, "sent": 8, "received": 8, "peers": 2,
         "start": 0.0, "end": 1.0, "modelled": 0.5},
        {"op": "all_reduce", "tag": "grads", "payload": 8, "sent": 8, "received": 8, "peers": 2,
         "start": 1.0, "end": 2.0, "modelled": 0.5, "step": 3}]})
    assert [r.step for r in ledger.records] == [0, 3]
    assert "step" not in ledger.records[0].to_dict() and ledger.records[1].to_dict()["step"] == 3
    assert Record(**ledger.records[1].to_dict()) == ledger.records[1]


def test_cli_projects_to_1024_workers_and_writes_json(run_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim.json"
    code = cli_main(["simulate", str(run_dir), "--algo", "ddp", "--workers", "1024", "--bandwidth", "1gbit",
                     "--latency", "50ms", "--params", "1e9", "--json", str(out)])
    assert code == 0
    assert "projected" in capsys.readouterr().out
    row = json.loads(out.read_text())["algorithms"][0]
    params = json.loads((run_dir / "run.json").read_text())["params"]
    payload = 4 * params * (1e9 / params)  # fp32 gradients, scaled to 1e9 parameters
    expected = STEPS * 2 * 1023 / 1024 * payload + payload * 1023 / 1024  # ring all-reduces + the initial broadcast
    assert row["projected"]["bytes_sent_per_worker"] == pytest.approx(expected, rel=1e-3)
    assert 0 < row["projected"]["utilisation"] < 1


@pytest.mark.parametrize("argv, message", [
    (["simulate", "{missing}"], "no run.json in"),
    (["simulate", "{run}", "--algo", "nope"], "choose one of: ddp, diloco, delayed-diloco"),
    (["simulate", "{run}", "--workers", "0"], "--workers must be between 1 and 10240, got 0"),
    (["simulate", "{run}", "--workers", "10241"], "--workers must be between 1 and 10240, got 10241"),
    (["simulate", "{run}", "--bandwidth", "fast"], "cannot read bandwidth 'fast'"),
])
def test_bad_flags_are_one_line_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       argv: list[str], message: str) -> None:
    argv = [a.format(missing=tmp_path / "nothing", run=run_dir) for a in argv]
    assert cli_main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- synthetic traces


def _trace(steps: int = 10, compute: float = 0.1, payload: int = 10 * MB, link: Link = Link(12.5e6, 0.01),
           every: int = 1, blocking: bool = True, ranks: int = 2, spread: float = 0.0) -> Trace:
    """A synthetic 2-rank run: one all-reduce every ``every`` steps, blocking (waited in its step)
    or not (never waited for until the last step); rank r's compute is ``compute * (1 + r * spread)``."""
    modelled = cost.ring_all_reduce(payload, ranks, link).seconds
    logs = []
    for r in range(ranks):
        c = compute * (1 + r * spread)
        clock, rows, comm = 0.0, [], [0.0] * steps
        for s in range(1, steps + 1):
            clock += c
            if s % every == 0:
                rows.append({"op": "all_reduce", "tag": "grads", "payload": payload, "sent": payload,
                             "received": payload, "peers": ranks, "start": clock, "end": clock + modelled,
                             "modelled": modelled, "step": s})
                if blocking or s == steps:
                    comm[s - 1] = modelled
        logs.append(RankLog(compute_s=(c,) * steps, comm_s=tuple(comm), time_s=steps * c + sum(comm),
                            bytes_sent=payload * len(rows), ledger=tuple(rows)))
    return build_trace("synthetic", payload // 4, link, logs)


def _target(trace: Trace, **kw: float) -> Target:
    base = {"workers": trace.ranks, "bandwidth": trace.link.bandwidth, "latency": trace.link.latency,
            "params": trace.params, "compute_scale": 1.0}
    return Target(**{**base, **kw})


def test_ring_all_reduce_time_grows_toward_2S_over_B_and_bytes_follow_the_formula() -> None:
    trace = _trace(link=Link(12.5e6, 0.0))
    size, bw = 10 * MB, 12.5e6
    busy = []
    for n in (2, 8, 64, 1024):
        p = simulate(trace, _target(trace, workers=n, compute_scale=0.0 + 1e-9))
        per_op = p.link_busy_s / trace.steps
        assert per_op == pytest.approx(2 * (n - 1) * size / (n * bw), rel=1e-6)
        assert p.bytes_sent_per_worker == pytest.approx(trace.steps * 2 * (n - 1) * size / n, rel=1e-6)
        busy.append(per_op)
    assert busy == sorted(busy) and busy[-1] == pytest.approx(2 * size / bw, rel=2e-3)


def test_faster_link_less_exposed_and_bigger_model_more_bytes() -> None:
    trace = _trace()
    slow = simulate(trace, _target(trace))
    fast = simulate(trace, _target(trace, bandwidth=10 * trace.link.bandwidth))
    assert fast.exposed_comm_s < slow.exposed_comm_s and fast.wall_clock_s < slow.wall_clock_s
    big = simulate(trace, _target(trace, params=10 * trace.params))
    assert big.bytes_sent_per_worker == pytest.approx(10 * slow.bytes_sent_per_worker)
    assert big.compute_s == pytest.approx(slow.compute_s)  # compute_scale pinned to 1 here
    default = simulate(trace, _target(trace, params=10 * trace.params, compute_scale=None))
    assert default.compute_s == pytest.approx(10 * slow.compute_s)  # default: compute grows with the model


def test_async_op_is_exposed_only_beyond_the_compute_it_overlaps() -> None:
    # one all-reduce per 5-step round, waited for at the last step: the first overlaps 5 steps of compute
    trace = _trace(steps=10, compute=0.2, every=5, blocking=False, payload=MB)
    assert [(op.blocking, op.wait_step) for op in trace.ops] == [(False, 10), (True, 10)]
    quick = simulate(trace, _target(trace))  # 0.1 s per op: hidden behind the 1 s of round 2
    op = cost.ring_all_reduce(MB, 2, trace.link).seconds
    assert quick.exposed_comm_s == pytest.approx(op)  # only the final, blocking one shows
    slow_link = Link(trace.link.bandwidth / 20, trace.link.latency)
    slow = simulate(trace, _target(trace, bandwidth=slow_link.bandwidth))
    op = cost.ring_all_reduce(MB, 2, slow_link).seconds  # ~1.6 s > the 1 s it can hide behind
    assert slow.wall_clock_s == pytest.approx(1.0 + op + op)  # link busy back to back from t = 1 s
    assert slow.exposed_comm_s == pytest.approx(slow.wall_clock_s - 2.0)


def test_expected_max_of_n_draws() -> None:
    assert expected_max([0.3] * 10, 1000) == pytest.approx(0.3)
    spread = [0.1, 0.2, 0.3, 0.4]
    values = [expected_max(spread, n) for n in (1, 2, 8, 64)]
    assert values[0] == pytest.approx(0.25) and values == sorted(values) and values[-1] < 0.4 + 1e-12
    assert values[1] == pytest.approx(sum(x * ((i + 1) ** 2 - i ** 2) / 16 for i, x in enumerate(spread)))


def test_stragglers_slow_synchronous_steps_as_workers_grow() -> None:
    constant = _trace(compute=0.1, payload=1000)
    walls = [simulate(constant, _target(constant, workers=n)).wall_clock_s for n in (3, 64, 1024)]
    per_step_comm = [cost.all_reduce(1000, n, constant.link).seconds for n in (3, 64, 1024)]  # the cheapest
    for wall, comm in zip(walls, per_step_comm):
        assert wall == pytest.approx(constant.steps * (0.1 + comm))  # no spread: no straggler cost
    spread = _trace(compute=0.1, payload=1000, spread=1.0)  # rank 1 takes 0.2 s a step, rank 0 0.1 s
    p = [simulate(spread, _target(spread, workers=n, latency=0.0)) for n in (3, 64)]
    assert p[0].straggler_wait_s > 0 and p[1].wall_clock_s > p[0].wall_clock_s
    assert p[1].wall_clock_s == pytest.approx(spread.steps * (0.2 + p[1].link_busy_s / spread.steps), rel=1e-3)


def test_target_validation() -> None:
    with pytest.raises(ValueError, match="--workers must be between 1 and 10240"):
        Target(workers=0, bandwidth=None, latency=0.0, params=1)
    with pytest.raises(ValueError, match="--compute-scale must be > 0"):
        Target(workers=2, bandwidth=None, latency=0.0, params=1, compute_scale=0.0)


def test_gossip_exchanges_scale_with_the_topology_degree() -> None:
    """On a ring a worker has one neighbour at 2 workers and two from 3 on: a neighbour exchange
    measured on 2 workers sends twice the bytes (and takes twice the wire time) at 4."""
    from lowband.algorithms.gossip import neighbours

    row = {"op": "sendrecv", "tag": "gossip", "payload": 1000, "sent": 1000, "received": 1000, "peers": 2,
           "start": 0.0, "end": 0.1, "modelled": 0.1, "step": 1}
    logs = [RankLog(compute_s=(0.1,), comm_s=(0.1,), time_s=0.2, bytes_sent=1000.0, ledger=(row,))] * 2
    ring = lambda n: sum(len(p) for p in neighbours("ring", n)) / n  # noqa: E731
    fixed, gossip = (build_trace("g", 10, Link(1e4, 0.0), logs, degree) for degree in (None, ring))
    target = Target(workers=4, bandwidth=1e4, latency=0.0, params=10, compute_scale=1.0)
    assert simulate(fixed, target).bytes_sent_per_worker == pytest.approx(1000)
    projected = simulate(gossip, target)
    assert projected.bytes_sent_per_worker == pytest.approx(2000)
    assert projected.link_busy_s == pytest.approx(0.2)  # 2000 bytes at 10 kB/s
    assert simulate(gossip, Target(workers=2, bandwidth=1e4, latency=0.0, params=10)).bytes_sent_per_worker \
        == pytest.approx(1000)


def test_uneven_workers_are_persistent_and_measured_speeds_are_undone() -> None:
    """Every synchronous step waits for the slowest worker; a run measured with slow ranks is
    first brought back to full speed, so projecting it to speeds 1,1 gives the uniform run."""
    import dataclasses

    even = _trace(compute=0.1, payload=1000)
    comm = cost.all_reduce(1000, 4, even.link).seconds
    uneven = simulate(even, _target(even, workers=4, speeds=(1.0, 0.5)))  # pattern: 1, 0.5, 1, 0.5
    assert uneven.wall_clock_s == pytest.approx(even.steps * (0.2 + comm), rel=1e-6)
    assert uneven.straggler_wait_s == pytest.approx(even.steps * 0.1 / 2)  # half the ranks wait 0.1 s a step
    slowed = dataclasses.replace(_trace(compute=0.1, payload=1000, spread=1.0), speeds=(1.0, 0.5))  # rank 1: 0.2 s
    back = simulate(slowed, _target(slowed, speeds=(1.0, 1.0)))
    assert back.wall_clock_s == pytest.approx(simulate(even, _target(even)).wall_clock_s, rel=1e-6)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        _target(even, speeds=(1.0, 2.0))


def test_cli_worker_speed_slows_the_projection(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, even = simulate_run(run_dir, "ddp")
    _, target, slow = simulate_run(run_dir, "ddp", worker_speed="1,0.5")
    assert target.speeds == (1.0, 0.5) and slow[0].wall_clock_s > even[0].wall_clock_s + 0.5 * even[0].compute_s
    assert cli_main(["simulate", str(run_dir), "--algo", "ddp", "--worker-speed", "fast"]) == 2
    assert "--worker-speed takes numbers" in capsys.readouterr().err


def test_the_ring_a_run_charged_is_the_link_it_is_replayed_on(run_dir: Path, tmp_path: Path) -> None:
    from lowband.predict.simulate_cli import measured_link

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    info = json.loads((copy / "run.json").read_text())
    info["world_size"] = 4
    info["config"].update(bandwidth="1gbit", latency="1ms", sites="0,1,0,1", wan_bandwidth="50mbit", wan_latency="0")
    info["algorithms"]["diloco"]["hierarchical"] = True
    (copy / "run.json").write_text(json.dumps(info))
    assert json.loads((copy / "ddp" / "ring.json").read_text()) == {"ring": [0, 1]}  # written by the worker
    (copy / "ddp" / "ring.json").unlink()
    run = load_run(copy)
    assert measured_link(run, "ddp").bandwidth == pytest.approx(50e6 / 8 / 2)  # rank order: 4 WAN crossings
    (copy / "ddp" / "ring.json").write_text(json.dumps({"ring": [0, 1, 3, 2]}))
    assert measured_link(run, "ddp").bandwidth == pytest.approx(50e6 / 8)  # the measured order: 2 crossings
    with pytest.raises(ValueError, match="diloco averaged hierarchically"):
        load_traces(run)
