"""The planner (``lowband.predict.plan``, ``lowband plan``) against hand-computed values."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from lowband.algorithms import ALGORITHMS
from lowband.algorithms.dist_lion import vote_bytes
from lowband.algorithms.onebit_adam import compressed_bytes
from lowband.cli import main as cli_main
from lowband.net.link import Link
from lowband.predict.plan import Measured, Row, Setup, comm_plan, plan_rows, predict, recommend, wire

# 1M fp32 parameters (4 MB) on 4 workers, 100mbit = 12.5 MB/s, 1 ms per hop, 0.1 s per step, 100 steps; the
# hand-computed numbers below are the ring's (the default, allreduce="auto", is tested at the end)
SETUP = Setup(params=1_000_000, workers=4, link=Link(12_500_000.0, 0.001), step_time=0.1, steps=100, allreduce="ring")


def row(spec: str, setup: Setup = SETUP, compress: str | None = None) -> Row:
    return predict(spec, comm_plan(spec, setup, compress), setup)


def test_ddp_by_hand() -> None:
    # ring all-reduce of 4 MB on 4 ranks (one 25 MB bucket): 2(n-1)(a + S/(nB)) = 6 * (0.001 + 1e6/12.5e6)
    # = 6 * 0.081 = 0.486 s per step, 2(n-1)/n S = 6 MB sent per step; 100 steps
    r = row("ddp")
    assert r.events == 100
    assert r.sent_bytes == pytest.approx(100 * 6_000_000)
    assert r.comm_seconds == pytest.approx(48.6)
    assert r.exposed_seconds == pytest.approx(48.6)  # blocking: all of it
    assert r.compute_seconds == pytest.approx(10.0)
    assert r.wall_seconds == pytest.approx(58.6)
    assert r.utilisation == pytest.approx(10.0 / 58.6)


def test_diloco_by_hand() -> None:
    # the same all-reduce every H = 20 steps: 5 events, 5 * 0.486 = 2.43 s, 5 * 6 MB = 30 MB
    r = row("diloco")
    assert r.events == 5
    assert r.sent_bytes == pytest.approx(30_000_000)
    assert r.comm_seconds == pytest.approx(2.43)
    assert r.wall_seconds == pytest.approx(12.43)
    h50 = row("diloco:inner_steps=50")  # options from the spec: 2 events
    assert h50.events == 2 and h50.comm_seconds == pytest.approx(0.972)


def test_buckets_pay_latency_each() -> None:
    # bucket_mb=1: four 1 MB all-reduces per step, 6 * (0.001 + 0.25e6/12.5e6) = 0.126 s each
    r = row("ddp:bucket_mb=1")
    assert r.comm_seconds == pytest.approx(100 * 4 * 0.126)
    assert r.sent_bytes == pytest.approx(100 * 6_000_000)  # same bytes


def test_streaming_diloco_by_hand() -> None:
    # fp32 fragments of 1/4 of the model (1 MB) every H/P = 5 steps: 20 events of
    # 6 * (0.001 + 0.25e6/12.5e6) = 0.126 s; tau = 1 step (0.1 s) hides 0.1 s of each but the last,
    # which training's end waits for in full
    r = row("streaming-diloco:compress=identity")
    assert r.events == 20
    assert r.sent_bytes == pytest.approx(20 * 1_500_000)  # = diloco's 30 MB
    assert r.comm_seconds == pytest.approx(20 * 0.126)
    assert r.exposed_seconds == pytest.approx(19 * 0.026 + 0.126)


@pytest.mark.parametrize("step_time", [0.001, 0.01, 0.1, 1.0])
@pytest.mark.parametrize("overlapped", ["delayed-diloco", "eager-diloco", "co2", "streaming-diloco"])
def test_overlap_never_exposes_more_than_blocking(overlapped: str, step_time: float) -> None:
    setup = Setup(SETUP.params, SETUP.workers, SETUP.link, step_time, SETUP.steps)
    hidden = row(overlapped, setup)
    blocking = row("co2:asynchronous=false" if overlapped == "co2" else
                   "streaming-diloco:tau=0" if overlapped == "streaming-diloco" else "diloco", setup)
    assert hidden.comm_seconds == pytest.approx(blocking.comm_seconds)
    assert hidden.exposed_seconds <= blocking.exposed_seconds + 1e-12
    assert blocking.exposed_seconds == pytest.approx(blocking.comm_seconds)
    # one link: what is exposed is at least the link time that no compute can cover
    assert hidden.exposed_seconds >= hidden.comm_seconds - hidden.compute_seconds - 1e-9


def test_overlap_hides_a_short_transfer_entirely() -> None:
    # 0.486 s per event against a round of 20 * 0.1 = 2 s of compute: all hidden but the last event,
    # which no round follows (finish() waits for it, as lowband simulate replays it)
    assert row("delayed-diloco").exposed_seconds == pytest.approx(0.486)
    assert row("delayed-diloco").comm_seconds == pytest.approx(2.43)


def test_auto_all_reduce_takes_the_cheapest_per_bucket() -> None:
    # 4 workers, 1 ms: halving-doubling, 2 log2(4) a + 2 (3/4) S/B = 0.004 + 0.48 = 0.484 s < the ring's 0.486
    auto = Setup(SETUP.params, SETUP.workers, SETUP.link, SETUP.step_time, SETUP.steps)
    assert auto.allreduce == "auto"
    assert row("ddp", auto).comm_seconds == pytest.approx(100 * 0.484)
    assert row("ddp", auto).sent_bytes == pytest.approx(row("ddp").sent_bytes)  # the ring's bytes


def test_ddp_buckets_go_during_backward() -> None:
    # bucket_mb=1: four 0.126 s ring all-reduces. Backward = 60% of a 1 s step fills a bucket every 0.15 s,
    # longer than one takes: only the last one shows (0.126 s). At 30%, one every 0.075 s: the link, busy from
    # 0.075 s, ends at 0.075 + 4 * 0.126 = 0.579 s, 0.279 s after backward
    slow = Setup(SETUP.params, SETUP.workers, SETUP.link, 1.0, SETUP.steps, allreduce="ring", backward=0.6)
    r = row("ddp:bucket_mb=1", slow)
    assert r.exposed_seconds == pytest.approx(100 * 0.126)
    assert r.comm_seconds == pytest.approx(100 * 4 * 0.126)
    busy = row("ddp:bucket_mb=1", dataclasses.replace(slow, backward=0.3))
    assert busy.exposed_seconds == pytest.approx(100 * 0.279)
    assert row("diloco", slow).exposed_seconds == pytest.approx(row("diloco", dataclasses.replace(slow, backward=0))
                                                                .exposed_seconds)  # outer steps: not in backward


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_every_registered_algorithm_has_a_plan(name: str) -> None:
    assert "comm_plan" in vars(ALGORITHMS.get(name)), (
        f"algorithm {name!r} declares no plan of its own: define comm_plan in its class (what it sends, how often, "
        "overlapped or not)")
    r = row(name)
    assert r.events > 0 and r.sent_bytes > 0 and math.isfinite(r.wall_seconds)
    assert 0 < r.utilisation <= 1


def test_one_worker_sends_nothing() -> None:
    alone = Setup(params=SETUP.params, workers=1, link=SETUP.link, step_time=0.1, steps=100)
    for r in plan_rows(alone):
        assert (r.sent_bytes, r.comm_seconds, r.exposed_seconds) == (0, 0, 0), r.label
        assert r.utilisation == 1.0


def test_default_rows_cover_every_algorithm_and_the_ddp_compressors() -> None:
    labels = [r.label for r in plan_rows(SETUP)]
    assert {r.algorithm for r in plan_rows(SETUP)} == set(ALGORITHMS.names())
    assert labels[:5] == ["ddp", "ddp+fp16", "ddp+qsgd:bits=4", "ddp+powersgd:rank=4", "ddp+topk:ratio=0.01"]


def test_wire_sizes_follow_the_compressors_encodings() -> None:
    n, d = 1024 * 1024, 1024  # one 1024 x 1024 matrix
    assert wire("identity", n, d).rounds == (4 * n,)
    assert wire("fp16", n, d).rounds == (2 * n,) and wire("fp16", n, d).summable
    # qsgd: 4 bytes per bucket of 512 + 4 bits per element = 4 * 2048 + 524_288
    assert wire("qsgd:bits=4", n, d).rounds == (532_480,) and not wire("qsgd:bits=4", n, d).summable
    assert wire("sign", n, d).rounds == (n // 8 + 4,)
    # topk 1%: k = round(10_485.76) = 10_486 fp32 values + uint32 indices (n > 65_536) = 8 bytes each
    assert wire("topk:ratio=0.01", n, d).rounds == (10_486 * 8,)
    # powersgd rank 4: P (1024 x 4) then Q (1024 x 4), fp32, each all-reduced
    assert wire("powersgd:rank=4", n, d).rounds == (16_384, 16_384)
    assert not wire("dgc:ratio=0.01", n, d).fixed_size
    with pytest.raises(ValueError, match="topk"):
        wire("threshold", n, d)


def test_own_encodings_match_the_algorithms_byte_counts() -> None:
    setup = Setup(params=820_480, workers=4, link=SETUP.link, step_time=0.1, steps=100)
    lion = row("dist-lion", setup)
    assert lion.sent_bytes == pytest.approx(100 * vote_bytes(820_480, 4))
    onebit = row("onebit-adam:freeze_step=60", setup)  # 60 fp32 steps, then 40 compressed ones
    fp32 = 2 * 3 * 4 * 820_480 / 4
    assert onebit.sent_bytes == pytest.approx(60 * fp32 + 40 * compressed_bytes(820_480, 4), rel=1e-6)


def test_gossip_and_noloco_send_to_neighbours() -> None:
    # ring gossip: a + 2 S/B = 0.001 + 8e6/12.5e6 = 0.641 s per step, then one merge (0.486 s)
    g = row("gossip")
    assert g.comm_seconds == pytest.approx(100 * 0.641 + 0.486)
    assert row("gossip:merge_at_end=false").sent_bytes == pytest.approx(100 * 8_000_000)
    # noloco: one partner every 20 steps, 0.001 + 4e6/12.5e6 = 0.321 s
    assert row("noloco").comm_seconds == pytest.approx(5 * 0.321)


def test_recommendation_needs_a_measured_convergence() -> None:
    fast_unmeasured = Row("noloco", "noloco", "-", 1, 1.0, 0.0, 0.0, 10.0, None)
    slow_worse = Row("eager-diloco", "eager-diloco", "identity", 1, 1.0, 0.0, 0.0, 11.0,
                     Measured(3.4, 2.0, "x"))
    ok = Row("diloco", "diloco", "identity", 1, 1.0, 5.0, 5.0, 10.0, Measured(2.1, 2.0, "x"))
    ddp = Row("ddp", "ddp", "identity", 1, 20.0, 90.0, 90.0, 10.0, Measured(2.0, 2.0, "x"))
    chosen, reason = recommend([fast_unmeasured, slow_worse, ok, ddp], ddp)
    assert chosen is ok
    assert reason.startswith("diloco: 6.7x faster than ddp at 5.0% of its bytes; exposed comm 33%")
    assert recommend([fast_unmeasured], ddp)[0] is ddp  # nothing measured: stay with ddp


def test_setup_validates() -> None:
    with pytest.raises(ValueError, match="workers"):
        Setup(params=10, workers=0, link=SETUP.link, step_time=0.1, steps=1)
    with pytest.raises(ValueError, match="step time"):
        Setup(params=10, workers=2, link=SETUP.link, step_time=0.0, steps=1)
    with pytest.raises(ValueError, match="all-reduce"):
        Setup(params=10, workers=2, link=SETUP.link, step_time=0.1, steps=1, allreduce="butterfly")


# ----------------------------------------------------------------------------- command line
FLAGS = ["plan", "--params", "7e9", "--workers", "64", "--bandwidth", "1gbit", "--latency", "30ms",
         "--step-time", "0.8s"]


def test_cli_prints_a_table_and_a_recommendation(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_json = tmp_path / "plan.json"
    assert cli_main(FLAGS + ["--steps", "10000", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for text in ("ddp+fp16", "streaming-diloco", "noloco", "wall-clock", "recommended", "not convergence"):
        assert text in out, text
    data = json.loads(out_json.read_text())
    assert {r["algorithm"] for r in data["rows"]} == set(ALGORITHMS.names())
    assert data["setup"]["steps"] == 10_000 and data["recommendation"]["reason"]


def test_cli_tokens_and_selected_algorithms(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_json = tmp_path / "plan.json"
    argv = FLAGS[:-1] + ["800ms", "--tokens", "1e8", "--tokens-per-step", "1e6", "--algo", "ddp;diloco:inner_steps=50",
                         "--compress", "identity;bf16", "--json", str(out_json)]
    assert cli_main(argv) == 0
    data = json.loads(out_json.read_text())
    assert data["setup"]["steps"] == 100 and data["setup"]["step_time"] == pytest.approx(0.8)
    assert [r["label"] for r in data["rows"]] == ["ddp", "ddp+bf16", "diloco:inner_steps=50"]


@pytest.mark.parametrize("change, message", [
    (["--bandwidth", "fast"], "cannot read bandwidth"),
    (["--step-time", "0"], "step time"),
    (["--step-time", "fast"], "e.g. 0.8s"),
    (["--workers", "6.5"], "--workers must be a whole number"),
    (["--algo", "dilco"], "unknown algorithm 'dilco'; choose one of"),
    (["--compress", "zip"], "unknown compressor 'zip'"),
    (["--algo", "diloco:inner_steps=0"], "inner_steps"),
    (["--tokens", "1e9"], "not both"),
    (["--allreduce", "butterfly"], "invalid choice"),
])
def test_cli_bad_flags_are_one_line_errors(change: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = FLAGS + ["--steps", "100"]
    for flag, value in zip(change[::2], change[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert err.startswith("lowband plan: error: ")


def test_cli_needs_a_budget(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(FLAGS)
    assert exit_info.value.code == 2
    assert "give --steps N, or --tokens T with --tokens-per-step" in capsys.readouterr().err


def test_labels_name_only_what_differs_from_the_defaults() -> None:
    rows = plan_rows(SETUP, [("streaming-diloco:compress=identity", None), ("ddp", "identity"), ("ddp", "bf16"),
                             ("diloco", None)])
    assert [r.label for r in rows] == ["streaming-diloco:compress=identity", "ddp", "ddp+bf16", "diloco"]
    assert rows[0].measured is None and rows[3].measured is not None
