"""``--net netns``: namespaces, tc-shaped veth links, cleanup on every exit path, and the error
everywhere it cannot work. Tests that build namespaces skip (with the reason) where the
machine does not permit them; on root Linux machines with iproute2 they run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband import cli
from lowband.comm import Comm
from lowband.comm.group import init_from_env, shutdown
from lowband.net import netns
from lowband.net.link import Network
from lowband.net.netns import NetnsUnavailable, ShapedNetwork, netns_worker, sweep_stale, tbf_args
from lowband.train.config import TrainConfig
from lowband.train.launch import launch


def _namespaces_permitted() -> str | None:
    """None when this process can create network namespaces, else why not."""
    try:
        netns.check_supported()
    except NetnsUnavailable as err:
        return str(err)
    probe = f"lowband-probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


REASON = _namespaces_permitted()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"network namespaces not permitted here: {REASON}")


def _ours(pid: int) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(f"lowband-{pid}-")]


# ----------------------------------------------------------------------------- everywhere


def test_not_root_gets_one_line_pointing_at_model(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsUnavailable, match=r"needs root .* use --net model"):
        netns.check_supported()
    code = cli.main(["train", "--net", "netns", "--workers", "2", "--steps", "2", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--net netns needs root" in err and "--net model" in err


def test_netns_flag_validated_and_refused_outside_the_driver() -> None:
    with pytest.raises(ValueError, match="unknown --net 'wan'; choose one of: model, netns"):
        TrainConfig(net="wan")
    from lowband.train.worker import main as worker_main

    env = os.environ.pop("GLOO_SOCKET_IFNAME", None)
    try:
        with pytest.raises(ValueError, match="under torchrun use --net model"):
            worker_main(TrainConfig(net="netns", workers=1, steps=1))
    finally:
        if env is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = env


def test_tbf_parameters() -> None:
    assert tbf_args(12.5e6)[:3] == ["tbf", "rate", "100000000bit"]
    assert int(tbf_args(125e6)[4]) == 125_000  # 1 ms of a 1 Gbit/s link
    assert int(tbf_args(1.25e6)[4]) == 15_140  # never below ten full frames


# ----------------------------------------------------------------------------- where permitted


@needs_netns
def test_namespaces_links_and_shaping_built_then_removed() -> None:
    with ShapedNetwork(Network.parse("50mbit,20mbit", "0ms", 2)) as spec:
        assert sorted(_ours(os.getpid())) == sorted(spec.namespaces)
        qdisc = subprocess.run(["tc", "-n", spec.namespaces[1], "qdisc", "show", "dev", "lb0"],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "20Mbit" in qdisc, qdisc
    assert _ours(os.getpid()) == []
    with pytest.raises(RuntimeError, match="boom"):
        with ShapedNetwork(Network.parse("50mbit", "0ms", 2)):
            raise RuntimeError("boom")
    assert _ours(os.getpid()) == []


@needs_netns
def test_leftovers_of_a_dead_driver_are_swept() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"lowband-{dead.pid}-0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    assert name in sweep_stale()
    assert _ours(dead.pid) == []


@record
def _timed_all_reduce(numel: int) -> dict[str, Any]:
    rank, world = init_from_env()
    comm = Comm(network=Network(Network.parse("none", "none", world).links, shaped=True))
    tensor = torch.full((numel,), float(rank + 1))
    comm.all_reduce(tensor)  # warm-up: connections
    start = time.perf_counter()
    comm.all_reduce(tensor)
    elapsed = time.perf_counter() - start
    address = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", "lb0"], capture_output=True, text=True).stdout
    comm.close()
    shutdown()
    return {"seconds": elapsed, "value": tensor[0].item(), "address": address}


@needs_netns
def test_collective_runs_over_the_shaped_link() -> None:
    numel = 250_000  # 1 MB: a 2-rank ring all-reduce moves 1 MB each way, 0.4 s at 20 Mbit/s
    with ShapedNetwork(Network.parse("20mbit", "0ms", 2)) as spec:
        out = launch(netns_worker, 2, _timed_all_reduce, spec, numel, bind=spec.bridge_ip)
    for rank, result in out.items():
        assert result["value"] == 6.0  # (1 + 2), reduced twice: 3, then 6
        assert "lb0" in result["address"] and spec.bridge_ip.rsplit(".", 1)[0] in result["address"]
        assert 0.3 < result["seconds"] < 1.5, result  # the kernel's rate, not loopback (~ms)
    assert _ours(os.getpid()) == []


@needs_netns
def test_train_over_netns_end_to_end(tmp_path: Path) -> None:
    code = cli.main(["train", "--net", "netns", "--workers", "2", "--algo", "diloco", "-H", "3", "--steps", "6",
                     "--eval-every", "6", "--eval-batches", "1", "--batch-size", "4", "--bandwidth", "100mbit",
                     "--latency", "5ms", "--out", str(tmp_path), "--name", "ns", "--no-progress"])
    assert code == 0
    info = (tmp_path / "ns" / "run.json").read_text()
    assert "netns: tc-shaped veth links" in info
    assert _ours(os.getpid()) == []


@needs_netns
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_nothing(tmp_path: Path, signum: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "lowband.cli", "train", "--net", "netns", "--workers", "2",
                             "--algo", "ddp", "--steps", "2000", "--bandwidth", "10mbit", "--out", str(tmp_path),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(_ours(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_ours(proc.pid)) == 2, "the run never built its namespaces"
        time.sleep(3)  # workers inside, training
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum  # reported as interrupted, not a crash
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _ours(proc.pid) == []
    bridges = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout
    assert f"lbbr{proc.pid}" not in bridges


def _listening(_port: int) -> str:
    return subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout


def test_the_stores_listen_on_loopback_only() -> None:
    """The rendezvous store and the shared store torchrun's agent makes for the workers."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    from lowband.train.launch import _bound_store
    from lowband.train.nodes import Nodes

    with _bound_store("127.0.0.1", Nodes()) as endpoint:
        port = int(endpoint.rpartition(":")[2])
        shared = dynamic_rendezvous.DynamicRendezvousHandler._create_tcp_store_server(None, "0.0.0.0", 0)
        for p in (port, shared.port):
            lines = [line for line in _listening(p).splitlines() if f":{p} " in line]
            assert lines and all("127.0.0.1:" in line for line in lines), lines
