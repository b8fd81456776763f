"""Where a single-machine run's sockets listen: loopback only (issue 23).

``launch()`` hosts the rendezvous and the workers' store on loopback, and pins gloo's worker
sockets to the loopback interface (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` from
``pin_sockets``): without that gloo binds to whatever the host name resolves to, a LAN address
on many machines. Each worker lists its own listening TCP sockets from /proc after a real
all-reduce, so the check reads what the kernel says, not what the code meant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

import lowband
from lowband.comm.group import init_from_env, interface_of, pin_sockets, shutdown
from lowband.train.launch import launch

LOOPBACK = ("127.", "[0000:0000:0000:0000:0000:0000:0000:0001]")  # listening addresses as /proc shows them
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp (Linux)")


def listening_addresses(pid: int | str = "self") -> list[str]:
    """``ip:port`` of every TCP socket process ``pid`` listens on (IPv4 and IPv6), from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in ((f"/proc/{pid}/net/tcp", 8), (f"/proc/{pid}/net/tcp6", 32)):  # pid's network namespace
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            found.append(f"{_address(address, width)}:{int(port, 16)}")
    return found


def _address(hex_address: str, width: int) -> str:
    raw = bytes.fromhex(hex_address)
    if width == 8:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # four little-endian 32-bit words
    return "[" + bytes(b for w in words for b in w).hex(":", 2) + "]"


@record
def _worker() -> dict[str, Any]:
    rank, _ = init_from_env("gloo", timeout_s=60)
    try:
        t = torch.ones(4)
        dist.all_reduce(t)
        return {"sum": t.tolist(), "ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "listening": listening_addresses()}
    finally:
        shutdown()


def test_interface_of_loopback() -> None:
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.77") is None  # no such local address
    assert pin_sockets("127.0.0.1") == {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                                        "NCCL_SOCKET_IFNAME": os.environ.get("NCCL_SOCKET_IFNAME", "lo")}


def test_workers_listen_on_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    here = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), str(Path(lowband.__file__).parent.parent)]))
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    results = launch(_worker, 2)
    assert "GLOO_SOCKET_IFNAME" not in os.environ  # restored in the parent
    for rank, res in results.items():
        assert res["sum"] == [2.0] * 4
        assert res["ifname"] == "lo", rank
        assert res["listening"], f"rank {rank}: gloo's listening socket was not found in /proc"
        outside = [a for a in res["listening"] if not a.startswith(LOOPBACK)]
        assert not outside, f"rank {rank} listens beyond loopback: {outside}"


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def test_an_elastic_run_listens_on_loopback_only(tmp_path: Path) -> None:
    """``--elastic``: the driver's store, each worker's launcher (its rendezvous and shared stores)
    and the workers' gloo sockets, sampled every 0.2 s over a whole run: all on loopback."""
    import subprocess
    import time

    cmd = [sys.executable, "-m", "lowband.cli", "train", "--algo", "diloco", "--elastic", "--workers", "2",
           "-H", "4", "--steps", "16", "--batch-size", "4", "--bandwidth", "none", "--latency", "none",
           "--eval-every", "8", "--eval-batches", "1", "--no-progress", "--out", str(tmp_path), "--name", "e"]
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, set[int]] = {}
    deadline = time.monotonic() + 170
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in descendants(proc.pid):
            try:
                for address in listening_addresses(pid):
                    seen.setdefault(address, set()).add(pid)
            except OSError:  # the process ended while being read
                pass
        time.sleep(0.2)
    out = proc.communicate(timeout=30)[0] if proc.poll() is not None else (proc.kill(), "timed out")[1]
    assert proc.returncode == 0, out[-2000:]
    assert len({pid for pids in seen.values() for pid in pids}) >= 3, seen  # driver, agents, workers seen
    outside = [a for a in seen if not a.startswith(LOOPBACK)]
    assert not outside, f"an elastic run listened beyond loopback: {outside}"


@record
def _failing_worker() -> None:
    import tempfile

    assert os.stat(tempfile.gettempdir()).st_mode & 0o077 == 0, "the workers' temp folder is private"
    raise RuntimeError("planned failure")


def test_a_failed_launch_leaves_nothing_in_the_shared_temp_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture) -> None:
    """torch's per-worker error files (pickles the launcher reads back) and torchelastic's logs go to a
    private folder of the launch, removed afterwards, not to the shared temp folder; the agent's dump of
    the failure (the worker's traceback) goes to the run folder's launch.log, not the terminal."""
    import tempfile

    from lowband.train.launch import WorkerFailed

    here = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), str(Path(lowband.__file__).parent.parent)]))
    shared = Path(tempfile.gettempdir())
    patterns = ("pytorch-errorfile-*", "torchelastic_*", "lowband-launch-*")
    before = {p for pattern in patterns for p in shared.glob(pattern)}
    with pytest.raises(WorkerFailed, match=r"worker rank \d failed: .*planned failure"):
        launch(_failing_worker, 2, log_file=tmp_path / "run" / "launch.log")
    after = {p for pattern in patterns for p in shared.glob(pattern)}
    assert after <= before, sorted(map(str, after - before))
    assert tempfile.gettempdir() == str(shared)  # restored
    log = (tmp_path / "run" / "launch.log").read_text()
    assert "Traceback" in log and "planned failure" in log
    assert "Traceback" not in capfd.readouterr().err
