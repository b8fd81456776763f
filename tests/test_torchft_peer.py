"""The torchft peer (``lowband.bench.peers.torchft_diloco``): torchft 0.2.0's DiLoCo on lowband's task.

Skipped without torchft (install: see docs/peers.md). The default suite runs one short
DiLoCo job (2 replicas, 6 steps, H=3: ~25 s) and fast single-process checks; the
streaming run and the step-by-step comparison with lowband's own DiLoCo are ``slow``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")

from lowband.bench.peers import torchft_diloco as peer  # noqa: E402
from lowband.bench.peers.torchft_replica import model_fragments  # noqa: E402
from lowband.net import cost  # noqa: E402
from lowband.net.link import Link, Network  # noqa: E402
from lowband.report.summary import load_run, summarize  # noqa: E402
from lowband.train.config import TrainConfig  # noqa: E402
from lowband.train.data import load_dataset  # noqa: E402
from lowband.train.launch import launch  # noqa: E402
from lowband.train.loop import build_model  # noqa: E402
from lowband.train.worker import main as worker_main  # noqa: E402

FAST = dict(workers=2, steps=6, inner_steps=3, eval_every=3, eval_batches=1, batch_size=4,
            bandwidth="1gbit", latency="1ms", progress=False, name="run")


def _cfg(tmp_path: Path, **over: object) -> TrainConfig:
    return TrainConfig(**{**FAST, "out": str(tmp_path), **over})


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _params_bytes(cfg: TrainConfig) -> int:
    return sum(p.numel() * p.element_size() for p in build_model(cfg, load_dataset(cfg.data)).parameters())


# ----------------------------------------------------------------------------- real runs


def test_diloco_rows_bytes_and_report(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    peer.run_torchft(cfg, run, streaming=False)
    link = Network.parse(cfg.bandwidth, cfg.latency, 2).bottleneck()
    per_sync = cost.ring_all_reduce(_params_bytes(cfg), 2, link)  # bucketized: one allreduce per outer step
    assert per_sync.sent > 0
    for rank in (0, 1):
        rows = _rows(run / "torchft-diloco" / f"rank{rank}.jsonl")
        assert [r["step"] for r in rows] == list(range(1, 7))
        assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
        assert [r["bytes_sent"] for r in rows] == [0, 0, per_sync.sent, per_sync.sent, per_sync.sent, 2 * per_sync.sent]
        assert rows[-1]["bytes_received"] == 2 * per_sync.received
        assert all(r["comm_s"] >= 0 and r["compute_s"] > 0 for r in rows)
        ledger = _rows(run / "torchft-diloco" / f"ledger_rank{rank}.jsonl")
        assert [(r["op"], r["sent"], r["peers"]) for r in ledger] == [("all_reduce", per_sync.sent, 2)] * 2
        assert all(r["end"] - r["start"] >= per_sync.seconds for r in ledger)  # the link was emulated
    info = json.loads((run / "run.json").read_text())
    assert info["folders"]["torchft-diloco"] == "torchft-diloco"
    assert info["algorithms"]["torchft-diloco"]["peer"] == "torchft 0.2.0"
    summary = summarize(load_run(run))
    row = summary.row("torchft-diloco")
    assert row.ranks == 2 and row.steps == 6
    assert row.bytes_sent_per_worker == 2 * per_sync.sent


@pytest.mark.slow
def test_streaming_sends_every_fragment_once_per_period(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    peer.run_torchft(cfg, run, streaming=True, fragments=3, tau=0)
    rows = _rows(run / "torchft-streaming" / "rank1.jsonl")
    ledger = _rows(run / "torchft-streaming" / "ledger_rank1.jsonl")
    assert len(ledger) == 6  # one fragment per step (H / P = 1), each fragment twice in 6 steps
    assert rows[-1]["bytes_sent"] == 2 * _params_bytes(cfg)  # 2 ranks: a ring sends the payload once
    assert summarize(load_run(run)).row("torchft-streaming").ranks == 2


@pytest.mark.slow
def test_torchft_diloco_trains_as_lowband_diloco(tmp_path: Path) -> None:
    """Same model, data, schedule and outer optimizer: the same losses, step by step."""
    cfg = _cfg(tmp_path, algos=("diloco",))
    launch(worker_main, 2, cfg)
    peer.run_torchft(cfg, tmp_path / "run", streaming=False)
    for rank in (0, 1):
        ours = _rows(tmp_path / "run" / "diloco" / f"rank{rank}.jsonl")
        theirs = _rows(tmp_path / "run" / "torchft-diloco" / f"rank{rank}.jsonl")
        assert [r["loss"] for r in theirs] == pytest.approx([r["loss"] for r in ours], abs=1e-5)
    assert list(json.loads((tmp_path / "run" / "run.json").read_text())["algorithms"]) == ["diloco", "torchft-diloco"]


# ----------------------------------------------------------------------------- single process


class _FakeWork:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def wait(self) -> bool:
        if self.error is not None:
            raise self.error
        return True


def test_emulated_link_charges_the_ring_time_and_bytes() -> None:
    link = peer.EmulatedLink(Link(bandwidth=1e6, latency=0.01), emulate=True)
    tensor = torch.ones(1000)  # 4000 bytes; ring over 2: 2 * (0.01 + 2000 / 1e6) = 0.024 s
    started = time.perf_counter()
    assert link.submit(_FakeWork(), [tensor], 2).wait() == [tensor]
    assert time.perf_counter() - started >= 0.024
    assert link.wait_seconds == 0.0  # only waits through LinkWork are the training thread's
    failed = link.submit(_FakeWork(RuntimeError("gloo timeout")), [tensor], 2)
    with pytest.raises(RuntimeError, match="gloo timeout"):
        failed.wait()
    link.close()
    assert len(link.ledger) == 1 and link.ledger.bytes_sent == 4000
    assert link.ledger.records[0].modelled == pytest.approx(0.024)


def test_register_adds_the_label_to_a_lowband_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    network = Network.parse(cfg.bandwidth, cfg.latency, 2).describe()
    base = {"config": cfg.to_dict(), "world_size": 2, "network": network, "params": 1,
            "algorithms": {"diloco": {"inner_steps": 3}}, "folders": {"diloco": "diloco"}}
    (run / "run.json").write_text(json.dumps(base))
    peer.register(run, cfg, peer.PeerOptions.for_mode(streaming=True))
    info = json.loads((run / "run.json").read_text())
    assert list(info["algorithms"]) == ["diloco", "torchft-streaming"]
    assert info["algorithms"]["torchft-streaming"]["fragments"] == 4
    assert info["config"] == json.loads(json.dumps(cfg.to_dict())) and info["params"] == 1
    with pytest.raises(ValueError, match="steps 6 != 7"):
        peer.register(run, _cfg(tmp_path, steps=7), peer.PeerOptions.for_mode(streaming=False))


def test_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, inner_steps=20)
    with pytest.raises(ValueError, match="divide H"):
        peer.check_options(cfg, peer.PeerOptions.for_mode(True, fragments=3))
    with pytest.raises(ValueError, match="tau < H / fragments = 5"):
        peer.check_options(cfg, peer.PeerOptions.for_mode(True, fragments=4, tau=5))
    import torchft.manager

    if not torchft.manager.IS_TRITON_AVAILABLE:
        with pytest.raises(peer.PeerError, match="triton"):
            peer.check_torchft(peer.PeerOptions.for_mode(False, quantize=True))


def test_fragments_cover_every_parameter_once(tmp_path: Path) -> None:
    model = build_model(_cfg(tmp_path), load_dataset("shakespeare"))
    fragments = model_fragments(model, 4)
    got = [p for f in fragments for p in f.parameters()]
    assert len(fragments) == 4 and [id(p) for p in got] == [id(p) for p in model.parameters()]
    assert model_fragments(model, 1) == [model]


def test_lighthouse_listens_on_loopback_and_is_always_stopped(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        with peer.lighthouse(2, tmp_path / "lighthouse.log") as address:
            host, port = address.removeprefix("http://").split(":")
            assert host == "127.0.0.1"
            socket.create_connection((host, int(port)), timeout=2).close()
            raise KeyError("a failing run")
    time.sleep(0.2)
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()
