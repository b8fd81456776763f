"""What every peer shares: the emulated link, a c10d backend charged to it, and the run folder.

* :class:`EmulatedLink` charges collectives as :class:`lowband.comm.Comm` does, for a process
  group lowband does not own: one thread waits for each real collective in issue order, sleeps
  until its end + the alpha-beta time (:mod:`lowband.net.cost`), records it in a
  :class:`~lowband.comm.ledger.Ledger`, then completes the future the library waits on.
* :class:`LinkWork`: a ``torch.distributed`` work object over such a future.
* :func:`emulated_world`: the default process group as a c10d backend named ``lowband``
  (``dist.Backend.register_backend``) whose every collective is real gloo, charged to the
  link -- so a library's own code (DDP, its hooks, model averagers) runs unchanged on the
  default group, and a collective the backend does not implement fails instead of going
  uncounted. Used by :mod:`lowband.bench.peers.torch_ddp`.
* :func:`register_peer`, :func:`write_ledger`: lowband's run-folder format.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from lowband.comm.ledger import Ledger, Record
from lowband.net import cost
from lowband.net.link import Link
from lowband.train.config import TrainConfig
from lowband.train.data import load_dataset
from lowband.train.metrics import MetricsWriter

SAME_TASK = ("model", "data", "steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "schedule",
             "weight_decay", "grad_clip", "sharding", "seed", "eval_every", "eval_batches")
BACKEND = "lowband"  # the c10d backend name of emulated_world()


class PeerError(RuntimeError):
    """The peer cannot run here; the message is one line saying why."""


# ----------------------------------------------------------------------------- the emulated link


class EmulatedLink:
    """Charges collectives as :class:`lowband.comm.Comm` does, for a process group it does not own.

    ``charge(work, result, op, payload, transfer, peers)`` takes a real collective in flight; a
    single background thread (one transfer at a time) waits for it, sleeps until its end + the
    modelled ``transfer.seconds`` (when the network is emulated), records it in ``ledger``
    (stamped with ``ledger.step`` at submission) and completes the returned future with
    ``result``. ``inline_completion=False`` completes futures on other threads, so callbacks
    that issue and wait for further collectives (torch's ``powerSGD_hook``) do not block the link.
    """

    def __init__(self, link: Link, emulate: bool, tag: str = "outer", inline_completion: bool = True) -> None:
        self.link, self.emulate, self.tag = link, emulate, tag
        self.ledger = Ledger()
        self.wait_seconds = 0.0  # training thread blocked on this link (through LinkWork.wait)
        self.last_submit = 0.0  # perf_counter of the last collective issued by the training thread
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowband-link")
        self._done = None if inline_completion else ThreadPoolExecutor(16, thread_name_prefix="lowband-done")

    def submit(self, work: Any, tensors: list[torch.Tensor], n: int) -> torch.futures.Future:
        """A ring all-reduce of ``tensors`` over ``n`` ranks (torchft's process group)."""
        payload = sum(t.numel() * t.element_size() for t in tensors)
        return self.charge(work, tensors, "all_reduce", payload, cost.ring_all_reduce(payload, n, self.link), n)

    def charge(self, work: Any, result: Any, op: str, payload: int, transfer: cost.Transfer, peers: int,
               tag: str | None = None) -> torch.futures.Future:
        """Charge ``work`` (anything with ``wait()``) to the link; the future completes with ``result``."""
        tag, step = self.tag if tag is None else tag, self.ledger.step
        if threading.current_thread() is threading.main_thread():
            self.last_submit = time.perf_counter()
        future: torch.futures.Future = torch.futures.Future()

        def complete(fn: Callable[[Any], None], value: Any) -> None:
            if self._done is None:
                fn(value)
            else:
                self._done.submit(fn, value)

        def execute() -> None:
            start = time.perf_counter()
            try:
                work.wait()
            except Exception as err:  # the library sees it through the future
                complete(future.set_exception, err)
                return
            if self.emulate:
                sleep_until(time.perf_counter() + transfer.seconds)
            self.ledger.add(Record(op, tag, payload, transfer.sent, transfer.received, peers,
                                   start, time.perf_counter(), transfer.seconds, step))
            complete(future.set_result, result)

        self._pool.submit(execute)
        return future

    @contextlib.contextmanager
    def tagged(self, tag: str) -> Iterator[None]:
        """Collectives issued inside are tagged ``tag`` (integer payloads stay ``control``)."""
        saved, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = saved

    def account_wait(self, seconds: float) -> None:
        if threading.current_thread() is threading.main_thread():
            self.wait_seconds += seconds

    def close(self) -> None:
        """Complete every transfer in flight."""
        self._pool.shutdown(wait=True)
        if self._done is not None:
            self._done.shutdown(wait=True)


def sleep_until(deadline: float) -> None:
    while (left := deadline - time.perf_counter()) > 0:
        time.sleep(left)


class LinkWork(dist._Work):
    """A collective charged to an :class:`EmulatedLink`: done when the link says so."""

    def __init__(self, link: EmulatedLink, future: torch.futures.Future) -> None:
        super().__init__()
        self._link, self._future = link, future

    def wait(self, timeout: timedelta | None = None) -> bool:
        started = time.perf_counter()
        self._future.wait()
        self._link.account_wait(time.perf_counter() - started)
        return True

    def is_completed(self) -> bool:
        return self._future.done()

    def get_future(self) -> torch.futures.Future:
        return self._future


# ----------------------------------------------------------------------------- a c10d backend on the link


class EmulatedGroup(dist.ProcessGroup):
    """A process group whose collectives run on a real gloo group and are charged to ``link``.

    all-reduce: the ring (2(n-1)(a + S/(nB)), 2(n-1)S/n bytes); broadcast: gloo's binomial tree;
    all-gather: the ring. Payloads with integer elements (DDP's parameter-shape checks and bucket
    indices) are tagged ``control``; everything else gets ``link.tag``. ``barrier`` is control
    traffic, uncharged (as ``Comm.barrier``). A group of one rank sends nothing and is not charged;
    larger subgroups are charged at the world's bottleneck link (the peers use none). Any other
    collective raises (torch's default): nothing crosses the wire uncounted.
    """

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta, link: EmulatedLink) -> None:
        super().__init__(rank, size)
        self.real = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, size, timeout)
        self.link = link

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return BACKEND

    def allreduce(self, tensors: list[torch.Tensor], opts: Any) -> Any:
        payload = _nbytes(tensors)
        return self._charge(self.real.allreduce(tensors, opts), tensors, "all_reduce", payload,
                            cost.ring_all_reduce(payload, self.size(), self.link.link), tensors)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> Any:
        payload = _nbytes(tensors)
        transfer = cost.gloo_broadcast(payload, self.size(), self.link.link, self.rank(), opts.rootRank)
        return self._charge(self.real.broadcast(tensors, opts), tensors, "broadcast", payload, transfer, tensors)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any) -> Any:
        payload = _nbytes(inputs)
        return self._charge(self.real.allgather(outputs, inputs, opts), outputs, "all_gather", payload,
                            cost.ring_all_gather(payload, self.size(), self.link.link), inputs)

    def barrier(self, opts: Any) -> Any:
        return self.real.barrier(opts)

    def _charge(self, work: Any, result: Any, op: str, payload: int, transfer: cost.Transfer,
                sent: list[torch.Tensor]) -> Any:
        if self.size() == 1:
            return work
        tag = None if all(t.is_floating_point() for t in sent) else "control"
        return LinkWork(self.link, self.link.charge(work, result, op, payload, transfer, self.size(), tag))


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


_ACTIVE: list[EmulatedLink] = []  # the link emulated_world() gives the groups it creates


def _create(store: dist.Store, rank: int, size: int, timeout: timedelta) -> EmulatedGroup:
    if not _ACTIVE:
        raise PeerError(f"the {BACKEND!r} process-group backend is only usable inside emulated_world()")
    return EmulatedGroup(store, rank, size, timeout, _ACTIVE[-1])


@contextlib.contextmanager
def emulated_world(link: EmulatedLink, timeout: timedelta) -> Iterator[None]:
    """The default process group (from torchrun's environment) on the ``lowband`` backend, every
    collective charged to ``link``; subgroups (``dist.new_subgroups``) share it. Destroyed at exit."""
    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, _create, devices=["cpu"])
    _ACTIVE.append(link)
    try:
        dist.init_process_group(BACKEND, timeout=timeout)
        try:
            yield
        finally:
            dist.destroy_process_group()
    finally:
        _ACTIVE.remove(link)


# ----------------------------------------------------------------------------- the run folder


def register_peer(run_dir: Path, cfg: TrainConfig, label: str, options: dict[str, Any]) -> None:
    """Add ``label`` (with ``options``) to ``run_dir/run.json``, creating it as ``lowband train``
    would; refuses (one line naming the differences) if it describes a different task."""
    from lowband.train.loop import build_model

    data = load_dataset(cfg.data)
    network = cfg.network(cfg.workers)
    path = run_dir / "run.json"
    if path.is_file():
        info = json.loads(path.read_text())
        theirs = info.get("config") or {}
        differs = [f"{k} {theirs[k]!r} != {getattr(cfg, k)!r}" for k in SAME_TASK
                   if k in theirs and theirs[k] != getattr(cfg, k)]
        if info.get("world_size") not in (None, cfg.workers):
            differs.append(f"workers {info['world_size']} != {cfg.workers}")
        if info.get("network") not in (None, network.describe()):
            differs.append(f"network {info['network']!r} != {network.describe()!r}")
        if differs:
            raise ValueError(f"{path} is a different task; give the same flags ({'; '.join(differs)})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        info = {"config": cfg.to_dict(), "world_size": cfg.workers, "network": network.describe(),
                "params": sum(p.numel() for p in build_model(cfg, data).parameters()),
                "dataset": {"name": data.name, "kind": data.kind, "vocab_size": data.vocab_size}}
    info.setdefault("algorithms", {})[label] = options
    info.setdefault("folders", {})[label] = label
    path.write_text(json.dumps(info, indent=2))


def write_ledger(path: Path, ledger: Ledger) -> None:
    """``ledger_rank<r>.jsonl``: one line per operation, as ``lowband train`` writes it."""
    with MetricsWriter(path) as out:
        for rec in ledger.records:
            out.write(rec.to_dict())
