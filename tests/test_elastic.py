"""Elastic membership (docs/elastic.md): quorum protocol in process, then real workers killed,
hung, restarted and fed a corrupted state through ``lowband train --elastic``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lowband.comm import group
from lowband.elastic.membership import StateChecksumError, pack_state, parse_faults, unpack_state
from lowband.elastic.quorum import QuorumAborted, QuorumClient, QuorumService
from lowband.train.flags import config_from_args

# a short run: 3 workers, H=5, no emulated link; about 0.1 s per step on 2 shared cores
FLAGS = ["--algo", "diloco", "--elastic", "--workers", "3", "-H", "5", "--batch-size", "4",
         "--bandwidth", "none", "--latency", "none", "--eval-every", "10", "--eval-batches", "2",
         "--no-progress", "--elastic-timeout", "10"]


# -- in process: the protocol ---------------------------------------------------------------------
def _serve(service: QuorumService, stop: threading.Event) -> None:
    while not stop.is_set():
        service.poll()
        time.sleep(0.005)


def _concurrently(calls: dict[str, Any]) -> dict[str, Any]:
    """Run each ``calls[token]()`` in its own thread; {token: result or exception}."""
    out: dict[str, Any] = {}

    def one(token: str) -> None:
        try:
            out[token] = calls[token]()
        except Exception as err:  # noqa: BLE001 - the test inspects it
            out[token] = err

    threads = [threading.Thread(target=one, args=(t,)) for t in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return out


def _serving(service: QuorumService) -> threading.Event:
    stop = threading.Event()
    threading.Thread(target=_serve, args=(service, stop), daemon=True).start()
    return stop


def test_quorum_start_then_a_death_fails_the_commit_and_the_redo_excludes_it() -> None:
    store = group.serve_store()
    service = QuorumService(store, min_workers=2, timeout=5.0)
    clients = {t: QuorumClient(group.connect_store(f"127.0.0.1:{store.port}"), t) for t in ("0.0", "1.0", "2.0")}
    for token in clients:
        service.spawned(token, starter=True)
    stop = _serving(service)
    try:
        start = _concurrently({t: lambda c=c: c.arrive({}) for t, c in clients.items()})
        assert {d.kind for d in start.values()} == {"start"} and start["0.0"].members == ("0.0", "1.0", "2.0")
        assert _concurrently({t: lambda c=c: c.commit(start[c.token].number, True) for t, c in clients.items()}) \
            == {"0.0": True, "1.0": True, "2.0": True}
        round0 = _concurrently({t: lambda c=c: c.arrive({}) for t, c in clients.items()})
        assert round0["0.0"].kind == "sync" and round0["0.0"].contributors == ("0.0", "1.0", "2.0")
        service.exited("2.0", -9)  # dies before voting: the outer step must not commit
        time.sleep(0.3)  # the service decides at once, before the others vote: they stay holders
        votes = _concurrently({t: lambda c=c: c.commit(round0[c.token].number, True)
                               for t, c in clients.items() if t != "2.0"})
        assert votes == {"0.0": False, "1.0": False}
        redo = _concurrently({t: lambda c=c: c.arrive({}) for t, c in clients.items() if t != "2.0"})["0.0"]
        assert (redo.round, redo.attempt, redo.members, redo.left, redo.epoch) == (0, 1, ("0.0", "1.0"), ("2.0",), 2)
        assert (redo.contributors, redo.joiners) == (("0.0", "1.0"), ())
        assert any(e["event"] == "skip" and e["why"] == {"2.0": "gone"} for e in service.events)
    finally:
        stop.set()


def test_quorum_below_min_workers_aborts_with_the_fix_named() -> None:
    store = group.serve_store()
    service = QuorumService(store, min_workers=3, timeout=5.0)
    clients = {t: QuorumClient(group.connect_store(f"127.0.0.1:{store.port}"), t) for t in ("0.0", "1.0")}
    for token in clients:
        service.spawned(token, starter=True)
    stop = _serving(service)
    try:
        started = time.monotonic()
        out = _concurrently({t: lambda c=c: c.arrive({}) for t, c in clients.items()})
        assert time.monotonic() - started < 5
        assert all(isinstance(e, QuorumAborted) for e in out.values())
        assert "--min-workers is 3" in str(out["0.0"]) and "--rejoin-after" in str(out["0.0"])
    finally:
        stop.set()


def test_state_transfer_checksum_refuses_a_flipped_byte() -> None:
    payload, crc = pack_state({"w": torch.arange(1000, dtype=torch.float32), "step": 7})
    assert unpack_state(payload.clone(), crc)["step"] == 7
    payload[len(payload) // 2] ^= 0xFF
    with pytest.raises(StateChecksumError, match="refused"):
        unpack_state(payload, crc)


def test_flags_refuse_unsupported_algorithms_and_misuse(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["--algo", "ddp", "--elastic"], "--elastic supports co2, delayed-diloco, diloco, "
                           "eager-diloco, gossip, localsgd, streaming-diloco, not ddp"),
                          (["--algo", "noloco", "--elastic"], "not noloco"),
                          (["--algo", "diloco", "--min-workers", "2"], "need --elastic"),
                          (["--algo", "diloco", "--elastic", "--min-workers", "5"], "--min-workers must be in")):
        with pytest.raises(SystemExit):
            config_from_args(argv)
        assert message in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(ValueError, match="bad LOWBAND_FAULT"):
        parse_faults("kill:step=3")


# -- real workers --------------------------------------------------------------------------------
def _train(tmp_path: Path, name: str, *flags: str, fault: str = "") -> tuple[subprocess.CompletedProcess, Path]:
    env = {**os.environ, "LOWBAND_FAULT": fault}
    cmd = [sys.executable, "-m", "lowband.cli", "train", *FLAGS, "--out", str(tmp_path), "--name", name, *flags]
    proc = subprocess.run(["nice", "-n", "10", *cmd], env=env, capture_output=True, text=True, timeout=170)
    return proc, tmp_path / name / "diloco"


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _fingerprints(algo_dir: Path, replica: int) -> dict[int, str]:
    """{outer step: SHA of the global model} as replica ``replica`` logged them."""
    return {r["outer_steps"]: r["params_sha"] for r in _rows(algo_dir / f"rank{replica}.jsonl") if "params_sha" in r}


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory: pytest.TempPathFactory) -> Path:
    proc, algo_dir = _train(tmp_path_factory.mktemp("elastic"), "clean", "--steps", "30")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return algo_dir


@pytest.mark.parametrize("at", ["step", "sync"])
def test_kill_a_worker_survivors_agree_bit_for_bit(tmp_path: Path, fault_free: Path, at: str) -> None:
    """at=step: SIGKILL at the start of step 12 (seen at the next outer step); at=sync: SIGKILL
    after the quorum of the outer step at step 10, so the survivors' all-reduce breaks mid-way."""
    proc, algo_dir = _train(tmp_path, at, "--steps", "30", "--min-workers", "2",
                            fault=f"kill:rank=1,step={12 if at == 'step' else 8},at={at}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "replica 1.0 left: killed by signal 9" in proc.stderr + proc.stdout
    survivors = [_fingerprints(algo_dir, r) for r in (0, 2)]
    assert survivors[0] == survivors[1] and max(survivors[0]) == 6  # 30 steps / H=5, none lost
    assert _fingerprints(algo_dir, 1) and max(_fingerprints(algo_dir, 1)) <= 2
    events = _rows(algo_dir / "events.jsonl")
    assert [e["replica"] for e in events if e["event"] == "leave"] == ["1.0"]
    if at == "sync":  # the broken round was redone with the survivors, never half-applied
        assert any(e["event"] == "redo" for e in events)
    final = [_rows(algo_dir / f"rank{r}.jsonl")[-1]["val_loss"] for r in (0, 2)]
    clean = _rows(fault_free / "rank0.jsonl")[-1]["val_loss"]
    assert final[0] == final[1] and abs(final[0] - clean) < 0.05 * clean, (final, clean)  # 2 of 3 workers left


@pytest.mark.slow
def test_restarted_worker_refuses_a_corrupt_state_then_equals_the_others(tmp_path: Path) -> None:
    """Replica 1 dies after the all-reduce of the outer step at step 5 (before voting: the
    commit round shows it missing, the step is redone), restarts at once, receives a corrupted
    state first (refused by its checksum: the round is redone), then the real one."""
    proc, algo_dir = _train(tmp_path, "rejoin", "--steps", "120", "--min-workers", "2", "--rejoin-after", "0",
                            fault="kill:rank=1,step=5,at=commit;corrupt:rank=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (algo_dir / "logs" / "replica1.1.log").read_text()
    assert "state transfer refused" in log
    events = _rows(algo_dir / "events.jsonl")
    joined = [e for e in events if e["event"] == "join"]
    assert [e["replica"] for e in joined] == ["1.1"], events
    synced = [e for e in events if e["event"] == "synced"]  # the joiner, right after its first outer step
    first = joined[0]["round"] + 1
    assert [(e["replica"], e["outer_steps"]) for e in synced] == [("1.1", first)]
    others = _fingerprints(algo_dir, 0)
    assert synced[0]["params_sha"] == others[first] == _fingerprints(algo_dir, 2)[first]
    rejoined = _fingerprints(algo_dir, 1)
    later = [k for k in rejoined if k > first]
    assert later and all(rejoined[k] == others[k] for k in later)
    assert _rows(algo_dir / "rank1.jsonl")[-1]["members"] == 3


def test_fewer_survivors_than_min_workers_stops_with_one_line(tmp_path: Path) -> None:
    started = time.monotonic()
    proc, _ = _train(tmp_path, "minimum", "--steps", "30", "--min-workers", "3", fault="kill:rank=2,step=3")
    assert proc.returncode == 1
    assert "only 2 worker(s) left and --min-workers is 3" in proc.stderr
    assert time.monotonic() - started < 60
