"""Clean shutdown (issue 23): SIGTERM or SIGINT to a driver stops every worker within seconds, says
so in one line, returns 128 + the signal, and leaves no process and no temp file behind.

Every process of a run carries a marker in its environment (``LOWBAND_SHUTDOWN_TEST``), inherited
from the driver: the check reads /proc for it, so a worker started after any snapshot, or one that
left the driver's session (the elastic jobs), is found too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch.multiprocessing

from lowband.train.elastic import Supervisor
from lowband.train.flags import config_from_args
from lowband.train.launch import Interrupted
from lowband.train.shutdown import STOP_SIGNALS, stop_on_signal

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MARK = "LOWBAND_SHUTDOWN_TEST"
ELASTIC = ["--algo", "diloco", "--elastic", "--workers", "2", "-H", "5", "--batch-size", "4", "--bandwidth", "none",
           "--latency", "none", "--eval-every", "10", "--eval-batches", "1", "--no-progress", "--steps", "5000"]
PLAIN = ["--algo", "ddp", "--workers", "4", "--steps", "2000", "--batch-size", "4", "--no-progress"]


def _marked(token: str) -> list[int]:
    """Live (not zombie) processes whose environment carries ``MARK=token``."""
    needle = f"{MARK}={token}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _start(tmp_path: Path, flags: list[str]) -> tuple[subprocess.Popen, str, Path]:
    """The driver in its own session (a terminal's Ctrl-C goes to its process group), temp folder in tmp_path."""
    token, tmp = uuid.uuid4().hex, tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, MARK: token, "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-m", "lowband.cli", "train", *flags, "--out", str(tmp_path), "--name", "run"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, token, tmp


def _wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run did not get there (exit {proc.poll()}): {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)


def _stop_and_check(proc: subprocess.Popen, token: str, tmp: Path, signum: int, to_group: bool) -> str:
    """Send ``signum`` to the driver's process group (as a terminal's Ctrl-C does) or to the driver alone
    (``kill PID``); the driver ends with 128 + signum within 10 s, no process of the run is left 5 s
    after the signal, the temp folder is empty, no traceback. Returns the driver's stderr."""
    assert _marked(token), "no process of the run found"
    sent = time.monotonic()
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    try:
        err = proc.communicate(timeout=10)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the driver was still running 10 s after signal {signum}") from None
    took = time.monotonic() - sent
    assert proc.returncode == 128 + signum, err[-2000:]
    while _marked(token) and time.monotonic() - sent < 5:
        time.sleep(0.1)
    left = _marked(token)
    for pid in left:  # leave nothing behind on this shared machine, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the run alive 5 s after signal {signum} (driver stopped in {took:.1f} s)"
    assert list(tmp.iterdir()) == [], f"temp files left: {sorted(map(str, tmp.rglob('*')))}"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    return err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_elastic_driver_stops_every_job_on_a_signal(tmp_path: Path, signum: int) -> None:
    proc, token, tmp = _start(tmp_path, ELASTIC)
    ranks = [tmp_path / "run" / "diloco" / f"rank{r}.jsonl" for r in range(2)]
    _wait_for(lambda: all(p.is_file() and p.stat().st_size for p in ranks), 120, proc)  # both training
    err = _stop_and_check(proc, token, tmp, signum, to_group=signum == signal.SIGINT)
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"interrupted: stopped by signal {int(signum)}, 2 workers stopped;"), err
    logs = sorted((tmp_path / "run" / "diloco" / "logs").glob("replica*.log"))
    assert len(logs) == 2 and all("lowband elastic worker: stopped by signal 15" in p.read_text() for p in logs)


@pytest.mark.parametrize(("signum", "to_group"), [(signal.SIGTERM, False), (signal.SIGTERM, True),
                                                 (signal.SIGINT, True)])
def test_plain_driver_stops_its_workers_during_start_up(tmp_path: Path, signum: int, to_group: bool) -> None:
    """The signal lands while torchrun's agent starts the workers (they are still importing torch). SIGTERM to
    the driver alone used to leave the started workers to fail on their own (42 s for 20 of 64)."""
    proc, token, tmp = _start(tmp_path, PLAIN)
    _wait_for(lambda: len(_children(proc.pid)) >= 3, 60, proc)  # its resource tracker and 2 of the 4 workers
    err = _stop_and_check(proc, token, tmp, signum, to_group)
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted: stopped by signal {int(signum)};"), err


def _sleep(_rank: int) -> None:
    time.sleep(60)


def test_stop_on_signal_kills_the_workers_it_started_and_restores_the_handlers() -> None:
    """In process: workers start with SIGINT blocked (a terminal's Ctrl-C is the driver's), a SIGTERM kills
    them at once and raises Interrupted; the previous handlers come back."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    with pytest.raises(Interrupted, match="stopped by signal 15"):
        with stop_on_signal():
            context = torch.multiprocessing.start_processes(_sleep, nprocs=2, join=False, start_method="spawn")
            for process in context.processes:
                blocked = int(Path(f"/proc/{process.pid}/status").read_text().split("SigBlk:")[1].split()[0], 16)
                assert blocked & (1 << (signal.SIGINT - 1)), "a worker would take the terminal's Ctrl-C itself"
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises before this ends
    assert not any(process.is_alive() for process in context.processes)
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


def test_elastic_supervisor_on_a_signal_closes_its_store_and_temp_folder(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """In process, no worker started: the signal comes with the first spawn."""
    cfg = config_from_args(ELASTIC)
    supervisor = Supervisor(cfg, tmp_path, tmp_path / "config.json", say=lambda line: None)
    port = supervisor.store.port
    monkeypatch.setattr(supervisor, "spawn", lambda replica, incarnation: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="stopped by signal 15, 0 workers stopped"):
        supervisor.run()
    assert signal.getsignal(signal.SIGTERM) == before
    assert not Path(supervisor.tmp).exists()
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    assert not [line for line in listening if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"]
