"""Elastic membership for the DiLoCo variants with averages in flight (streaming, eager, delayed,
co2: drain at a membership change) and for gossip (topology rebuilt at quorum points), with real
workers killed and restarted through ``lowband train --elastic`` (docs/elastic.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lowband.algorithms import ALGORITHMS
from lowband.elastic import MEMBERSHIPS
from lowband.elastic.membership import check_elastic, elastic_algorithms

# 3 workers, H=5, no emulated link; a run's wall-clock is mostly the workers' start-up
FLAGS = ["--elastic", "--workers", "3", "-H", "5", "--batch-size", "4", "--bandwidth", "none", "--latency", "none",
         "--eval-every", "10", "--eval-batches", "2", "--no-progress", "--elastic-timeout", "10"]
ALGOS = {"diloco": "diloco", "streaming-diloco": "streaming-diloco:fragments=2", "eager-diloco": "eager-diloco",
         "delayed-diloco": "delayed-diloco", "co2": "co2", "gossip": "gossip:quorum_every=5"}
FOLDERS = {"streaming-diloco": "streaming-diloco-fragments=2", "gossip": "gossip-quorum_every=5"}


def _train(tmp_path: Path, algo: str, name: str, *flags: str, fault: str = "") -> tuple[str, Path]:
    env = {**os.environ, "LOWBAND_FAULT": fault}
    cmd = [sys.executable, "-m", "lowband.cli", "train", "--algo", ALGOS[algo], *FLAGS, "--out", str(tmp_path),
           "--name", name, *flags]
    proc = subprocess.run(["nice", "-n", "10", *cmd], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr, tmp_path / name / FOLDERS.get(algo, algo)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _fingerprints(algo_dir: Path, replica: int) -> dict[int, str]:
    """{round: fingerprint} as replica ``replica`` logged them (the global model; gossip: its own)."""
    return {r["outer_steps"]: r["params_sha"] for r in _rows(algo_dir / f"rank{replica}.jsonl") if "params_sha" in r}


def _at_step(algo_dir: Path, replica: int, step: int) -> dict[str, Any]:
    return [r for r in _rows(algo_dir / f"rank{replica}.jsonl") if r["step"] == step][-1]


def _final_loss(algo_dir: Path, replica: int) -> float:
    return _rows(algo_dir / f"rank{replica}.jsonl")[-1]["val_loss"]


def test_every_local_update_variant_and_gossip_is_elastic_with_one_line_refusals() -> None:
    assert set(ALGOS) | {"localsgd"} == set(elastic_algorithms())
    for name in elastic_algorithms():  # declared by the class itself (not inherited by accident) and known
        cls = ALGORITHMS.get(name)
        assert "elastic" in vars(cls) and cls.elastic in MEMBERSHIPS, name
    for spec in ALGOS.values():
        check_elastic([spec], 3, 2)
    for spec, message in (("noloco", "not noloco"), ("co2:asynchronous=false", "asynchronous=true only"),
                          ("gossip:quorum_every=0", "quorum_every must be >= 1")):
        with pytest.raises(ValueError, match=message):
            check_elastic([spec], 3, 2)


def _check_kill(out: str, algo_dir: Path, algo: str, steps: int) -> None:
    """Replica 1 died; replicas 0 and 2 finished every step and agree where they must."""
    assert "replica 1.0 left: killed by signal 9" in out
    leaves = [e for e in _rows(algo_dir / "events.jsonl") if e["event"] == "leave"]
    assert [e["replica"] for e in leaves] == ["1.0"]
    for replica in (0, 2):
        assert _rows(algo_dir / f"rank{replica}.jsonl")[-1]["step"] == steps
    if algo == "gossip":  # two survivors on a ring mix with weight 1/2: equal after every exchange
        assert _final_loss(algo_dir, 0) == _final_loss(algo_dir, 2)
        return
    drain = _at_step(algo_dir, 0, leaves[0]["step"])  # the drain round: every member lands the same mean
    assert drain["params_sha"] == _at_step(algo_dir, 2, leaves[0]["step"])["params_sha"]
    if algo != "eager-diloco":  # eager's theta_g,i carry each rank's own fresh term between drains
        assert _fingerprints(algo_dir, 0) == _fingerprints(algo_dir, 2)


def _slowest_step(algo_dir: Path, replicas: tuple[int, ...]) -> float:
    return max(r["compute_s"] + r["comm_s"] for i in replicas for r in _rows(algo_dir / f"rank{i}.jsonl"))


@pytest.mark.parametrize("algo, fault, workers", [
    ("streaming-diloco", "kill:rank=1,step=8,at=sync", "3"),  # after a quorum, before the due average's wait
    ("eager-diloco", "kill:rank=1,step=12", "3"),  # between quorum points: an average is in flight
    # mid-way between quorum points: exchanges fail; rank 3's neighbours (0 and 2) stop exchanging
    # with it, it gives up through the store at once (not after --elastic-timeout), the ring is rebuilt
    ("gossip", "kill:rank=1,step=12", "4"),
])
def test_kill_a_worker_the_survivors_drain_and_agree(tmp_path: Path, algo: str, fault: str, workers: str) -> None:
    out, algo_dir = _train(tmp_path, algo, "kill", "--steps", "30", "--min-workers", "2", "--workers", workers,
                           fault=fault)
    _check_kill(out, algo_dir, algo, 30)
    assert _final_loss(algo_dir, 0) < 3.6  # ln(vocab) ~ 4.2 at the start: it trained
    assert _slowest_step(algo_dir, (0, 2)) < 8.0  # --elastic-timeout is 10


def test_a_rank_blocked_on_a_live_peer_gives_up_through_the_store(tmp_path: Path) -> None:
    """4 workers: replica 2 dies after the quorum of the outer step at step 10, before the
    all-reduce. Its ring neighbours fail at once; rank 0 waits on a live peer, which gloo
    would let it do for the whole --elastic-timeout (30 s here): it sees the service's
    decision in the store and gives up within a poll. The redone round is bit-identical."""
    out, algo_dir = _train(tmp_path, "diloco", "stall", "--steps", "20", "--min-workers", "2", "--workers", "4",
                           "--elastic-timeout", "30", fault="kill:rank=2,step=8,at=sync")
    assert "replica 2.0 left: killed by signal 9" in out
    assert any(e["event"] == "redo" for e in _rows(algo_dir / "events.jsonl"))
    assert _fingerprints(algo_dir, 0) == _fingerprints(algo_dir, 1) == _fingerprints(algo_dir, 3)
    assert _slowest_step(algo_dir, (0, 1, 3)) < 15.0  # gloo's timeout would make it > 30 s


@pytest.mark.slow
@pytest.mark.parametrize("algo, fault", [
    ("delayed-diloco", "kill:rank=1,step=12"), ("co2", "kill:rank=1,step=8,at=sync"),
    ("streaming-diloco", "kill:rank=1,step=12,at=commit"), ("eager-diloco", "kill:rank=1,step=8,at=commit"),
    ("gossip", "kill:rank=1,step=10,at=sync"),
])
def test_kill_a_worker_final_loss_close_to_the_fault_free_run(tmp_path: Path, algo: str, fault: str) -> None:
    _, clean = _train(tmp_path, algo, "clean", "--steps", "40")
    out, algo_dir = _train(tmp_path, algo, "kill", "--steps", "40", "--min-workers", "2", fault=fault)
    _check_kill(out, algo_dir, algo, 40)
    if algo != "gossip":
        assert any(e["event"] == "redo" for e in _rows(algo_dir / "events.jsonl")) == ("at=" in fault)
    final, reference = _final_loss(algo_dir, 0), _final_loss(clean, 0)
    assert abs(final - reference) < 0.05 * reference, (final, reference)  # 2 of 3 workers for most of it


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["streaming-diloco", "eager-diloco", "delayed-diloco", "co2", "gossip"])
def test_restarted_worker_equals_its_source_after_one_round(tmp_path: Path, algo: str) -> None:
    """Replica 1 dies after the average of an early round (before voting), restarts at once and
    is fed a corrupted state first (refused: redone), then joins: right after its first round its
    fingerprint equals the others' (gossip: its source's, replica 0, at that quorum)."""
    _, algo_dir = _train(tmp_path, algo, "rejoin", "--steps", "150", "--min-workers", "2", "--rejoin-after", "0",
                         fault="kill:rank=1,step=5,at=commit;corrupt:rank=1")
    assert "state transfer refused" in (algo_dir / "logs" / "replica1.1.log").read_text()
    events = _rows(algo_dir / "events.jsonl")
    assert [e["replica"] for e in events if e["event"] == "join"] == ["1.1"], events
    synced = [e for e in events if e["event"] == "synced"]
    assert [e["replica"] for e in synced] == ["1.1"]
    first = synced[0]["outer_steps"]
    others = _fingerprints(algo_dir, 0)
    assert synced[0]["params_sha"] == others[first]
    if algo in ("gossip", "eager-diloco"):  # models (eager: outer models) differ per rank after the join
        return
    assert others[first] == _fingerprints(algo_dir, 2)[first]
    rejoined = _fingerprints(algo_dir, 1)
    later = [k for k in rejoined if k > first]
    assert later and all(rejoined[k] == others[k] for k in later)
    assert _rows(algo_dir / "rank1.jsonl")[-1]["members"] == 3
