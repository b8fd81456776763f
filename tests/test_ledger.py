"""The byte ledger (``lowband.comm.ledger``) and ``Comm`` in a world of one process."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from lowband.comm import Comm, Handle, Ledger, Record
from lowband.net.link import Network


def _record(op: str = "all_reduce", tag: str = "grads", sent: int = 100, received: int = 100,
            start: float = 1.0, end: float = 2.0, modelled: float = 0.5) -> Record:
    return Record(op=op, tag=tag, payload=sent, sent=sent, received=received, peers=2,
                  start=start, end=end, modelled=modelled)


def test_ledger_totals_and_by_tag() -> None:
    ledger = Ledger()
    assert len(ledger) == 0 and ledger.bytes_sent == 0 and ledger.by_tag() == {}
    ledger.add(_record(tag="grads", sent=100, received=100))
    ledger.add(_record(op="broadcast", tag="init", sent=0, received=4000))
    ledger.add(_record(tag="grads", sent=250, received=50))
    ledger.add(_record(op="send", tag="", sent=7, received=0))
    assert len(ledger) == 4
    assert ledger.bytes_sent == 357
    assert ledger.bytes_received == 4150
    assert ledger.by_tag() == {"grads": 350, "init": 0, "": 7}
    assert [r.op for r in ledger.records] == ["all_reduce", "broadcast", "all_reduce", "send"]


def test_ledger_state_dict_round_trip() -> None:
    ledger = Ledger()
    for i in range(5):
        ledger.add(_record(tag=f"t{i % 2}", sent=10 * i, received=i, start=float(i), end=i + 0.25, modelled=0.1 * i))
    state = ledger.state_dict()
    assert isinstance(state["records"][0], dict)
    assert state["records"][3] == {"op": "all_reduce", "tag": "t1", "payload": 30, "sent": 30, "received": 3,
                                   "peers": 2, "start": 3.0, "end": 3.25, "modelled": pytest.approx(0.3)}

    restored = Ledger()
    restored.add(_record(sent=999_999))  # replaced, not appended to
    restored.load_state_dict(state)
    assert restored.records == ledger.records
    assert restored.bytes_sent == ledger.bytes_sent == 100
    assert restored.bytes_received == ledger.bytes_received == 10
    assert restored.by_tag() == ledger.by_tag() == {"t0": 60, "t1": 40}
    # the restored ledger keeps counting
    restored.add(_record(tag="t0", sent=1, received=2))
    assert restored.bytes_sent == 101 and restored.bytes_received == 12
    assert len(ledger) == 5, "loading does not alias the source ledger"


def test_ledger_state_dict_survives_torch_save(tmp_path) -> None:
    ledger = Ledger()
    ledger.add(_record(tag="outer", sent=123, received=456))
    path = tmp_path / "ledger.pt"
    torch.save(ledger.state_dict(), path)
    restored = Ledger()
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.records == ledger.records
    assert (restored.bytes_sent, restored.bytes_received) == (123, 456)


def test_ledger_is_thread_safe() -> None:
    ledger = Ledger()

    def add_many() -> None:
        for _ in range(2000):
            ledger.add(_record(sent=3, received=5))

    threads = [threading.Thread(target=add_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ledger) == 8000
    assert ledger.bytes_sent == 24_000 and ledger.bytes_received == 40_000


# -- Comm with one process (no process group) --------------------------------------------


@pytest.fixture
def solo() -> Comm:
    assert not dist.is_initialized(), "these tests need a process without a process group"
    comm = Comm()
    yield comm
    comm.close()


def test_comm_world_of_one(solo: Comm) -> None:
    assert (solo.rank, solo.world_size) == (0, 1)
    t = torch.arange(6, dtype=torch.float32)
    before = t.clone()
    out = solo.all_reduce(t, tag="grads")
    assert out is t and torch.equal(t, before)
    out = solo.all_reduce(t, average=True)
    assert out is t and torch.equal(t, before), "averaging over one rank is the identity"
    assert solo.broadcast(t, src=0) is t and torch.equal(t, before)
    gathered = solo.all_gather(t)
    assert isinstance(gathered, list) and len(gathered) == 1 and torch.equal(gathered[0], before)
    solo.barrier()  # no-op, must not hang
    assert len(solo.ledger) == 0
    assert solo.ledger.bytes_sent == solo.ledger.bytes_received == 0
    assert solo.wait_seconds == 0.0


def test_comm_world_of_one_async(solo: Comm) -> None:
    t = torch.ones(4)
    handle = solo.all_reduce(t, async_op=True, tag="outer")
    assert isinstance(handle, Handle)
    assert handle.done()
    assert handle.wait() is t
    assert handle.wait() is t, "wait() is idempotent"
    assert torch.equal(t, torch.ones(4))
    gathered = solo.all_gather(t, async_op=True).wait()
    assert len(gathered) == 1 and torch.equal(gathered[0], t)
    assert solo.broadcast(t, async_op=True).wait() is t
    assert len(solo.ledger) == 0


def test_comm_world_of_one_with_emulated_network_is_free() -> None:
    net = Network.parse("1kbit", "1s", world_size=1)  # would take hours if it were charged
    comm = Comm(network=net)
    try:
        t = torch.zeros(1_000_000)
        assert comm.all_reduce(t) is t
        assert comm.all_reduce(t, async_op=True).wait() is t
        assert len(comm.ledger) == 0 and comm.ledger.bytes_sent == 0
    finally:
        comm.close()


def test_comm_rejects_network_of_wrong_size() -> None:
    with pytest.raises(ValueError, match="2 links for 1 ranks"):
        Comm(network=Network.parse("1gbit", "1ms", world_size=2))
