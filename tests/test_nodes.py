"""The machine flags of ``lowband train`` (:mod:`lowband.train.nodes`) and where the workers' sockets go
under a plain torchrun (:func:`lowband.comm.group.worker_sockets`): validation, one-line errors, defaults.
The two-machine run itself is tests/test_multinode.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import record

from lowband import cli
from lowband.comm import group
from lowband.train.config import TrainConfig
from lowband.train.flags import config_from_args, parse_train_args
from lowband.train.launch import launch
from lowband.train.nodes import LOOPBACK, Nodes, check_nodes, resolve_iface


@pytest.mark.parametrize("kwargs, message", [
    ({"nnodes": 0}, "--nnodes must be >= 1"),
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "10.0.0.1:29400"}, r"--node-rank must be in 0\.\.1"),
    ({"nnodes": 2}, "needs --rdzv-endpoint HOST:PORT"),
    ({"rdzv_endpoint": "10.0.0.1:29400"}, "add --nnodes N"),
    ({"nnodes": 2, "rdzv_endpoint": "10.0.0.1"}, "must be HOST:PORT"),
    ({"nnodes": 2, "rdzv_endpoint": "10.0.0.1:70000"}, "port in 1..65535"),
])
def test_bad_machine_flags_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Nodes(**kwargs)


def test_bind_defaults_to_loopback_then_the_named_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOWBAND_IFACE", raising=False)
    assert Nodes().bind() == LOOPBACK
    assert Nodes(iface="lo").bind() == Nodes(iface="127.0.0.1").bind() == LOOPBACK
    monkeypatch.setenv("LOWBAND_IFACE", "lo")
    assert Nodes().bind() == LOOPBACK
    with pytest.raises(ValueError, match=r"--iface eth9: no interface of that name .*interfaces: lo"):
        resolve_iface("eth9")
    with pytest.raises(ValueError, match="not an address of this machine"):
        resolve_iface("203.0.113.9")


def test_several_machines_bind_to_the_rendezvous_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOWBAND_IFACE", raising=False)
    assert Nodes(2, 0, "127.0.0.1:29400").bind() == LOOPBACK  # node 0 holds the endpoint's address
    assert Nodes(2, 1, "127.0.0.1:29400").bind() == LOOPBACK  # the others: the route towards it
    with pytest.raises(ValueError, match="203.0.113.9 is not an address of this machine, and node 0 hosts"):
        Nodes(2, 0, "203.0.113.9:29400").bind()
    assert Nodes(2, 0, "127.0.0.1:29400", iface="lo").bind() == LOOPBACK
    with pytest.raises(ValueError, match=r"--rdzv-endpoint 10.9.9.9:29400 is not on --iface lo \(127.0.0.1\)"):
        Nodes(2, 0, "10.9.9.9:29400", iface="lo").bind()


def test_machine_flags_refused_where_they_cannot_work() -> None:
    multi = Nodes(2, 0, "127.0.0.1:29400")
    with pytest.raises(ValueError, match="--elastic runs on one machine"):
        check_nodes(TrainConfig(algos=("diloco",), elastic=True), multi)
    with pytest.raises(ValueError, match="--net netns builds its namespaces"):
        check_nodes(TrainConfig(net="netns"), multi)
    check_nodes(TrainConfig(algos=("diloco",), elastic=True), Nodes(iface="lo"))  # loopback is fine
    cfg, nodes = parse_train_args(["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "10.0.0.1:29400"])
    assert nodes == Nodes(2, 1, "10.0.0.1:29400") and "nnodes" not in cfg.to_dict()


def test_torchrun_entry_refuses_machine_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        config_from_args(["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:29400"], prog="torchrun ... -m lowband.train")
    assert exit_.value.code == 2
    assert "under torchrun give torchrun its --nnodes/--rdzv-endpoint" in capsys.readouterr().err


def test_cli_refuses_an_unknown_interface_before_any_worker(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", "--iface", "eth9", "--steps", "1", "--no-progress"]) == 2
    assert "--iface eth9: no interface of that name" in capsys.readouterr().err


def test_plain_torchrun_workers_pin_their_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "LOWBAND_IFACE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # the interface the run meets on
    assert group.worker_sockets() == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    monkeypatch.setenv("LOWBAND_IFACE", "127.0.0.1")
    assert group.worker_sockets()["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "mine")  # the user's own choice is kept
    assert group.worker_sockets()["GLOO_SOCKET_IFNAME"] == "mine"
    monkeypatch.setenv("LOWBAND_IFACE", "eth9")
    with pytest.raises(ValueError, match="LOWBAND_IFACE=eth9: no interface of that name"):
        group.worker_sockets()


def test_all_gather_bytes_outside_a_group_is_the_rank_itself() -> None:
    assert group.all_gather_bytes(b"rank0") == [b"rank0"]


@record
def _gather_worker() -> list[bytes]:
    rank, _ = group.init_from_env("gloo", timeout_s=60)
    try:
        return group.all_gather_bytes(b"x" * (5 * rank) + bytes([255, rank]) if rank else b"")
    finally:
        group.shutdown()


def test_all_gather_bytes_across_ranks_of_different_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    results = launch(_gather_worker, 3)
    expected = [b"", b"xxxxx\xff\x01", b"x" * 10 + b"\xff\x02"]
    assert all(results[r] == expected for r in range(3)), results
