"""``Comm``: the only code in lowband that talks to torch.distributed.

Every operation runs on one background thread per ``Comm``, in the order it was issued,
so synchronous and asynchronous collectives keep the same order on every rank (which
collectives require) and the emulated link is busy with one transfer at a time. Each
operation:

1. runs the real collective on the process group (gloo on CPU, NCCL on GPU);
2. when a network is emulated, sleeps until ``end_of_real_op + modelled_cost`` so it
   completes no earlier than the alpha-beta model allows (:mod:`lowband.net.cost`);
   the real transfer (loopback, usually milliseconds) is added on top, never hidden;
3. appends a :class:`~lowband.comm.ledger.Record` with the exact bytes to the ledger.

Synchronous calls block the caller until step 3; ``async_op=True`` returns a
:class:`Handle` whose ``wait()`` blocks and returns the result, so overlap is real
wall-clock overlap. Time the caller spends blocked is summed in ``wait_seconds``.
With ``world_size == 1`` (or no process group) nothing is sent and nothing recorded.

A ``Comm`` over a sub-group (``dist.new_group``) takes group ranks everywhere (``src``,
``dst``, peers); several ``Comm`` may share one ``ledger`` (the sub-groups of hierarchical
averaging, :mod:`lowband.comm.hierarchy`, charge the algorithm's).

CUDA tensors (NCCL). A NCCL collective returns once it is enqueued on the GPU, not when it has
completed, so step 2 would start the modelled delay too early and the ledger would record an
op that had not finished. When an op's tensors are CUDA tensors, the comm thread first makes
their device current (CUDA's current device is per thread, and NCCL's streams follow it), and
after the real op waits for the device's current stream (:func:`_complete`) before reading the
clock: the real GPU transfer is then inside ``start``..``end`` like gloo's, and the modelled
delay is slept after it. CPU tensors (gloo) take exactly the path they always did.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from lowband.comm.group import group_device
from lowband.comm.ledger import Ledger, Record
from lowband.net import cost
from lowband.net.link import Link, Network


class Handle:
    """An operation in flight; ``wait()`` returns its result (a tensor or list of tensors)."""

    def __init__(self, comm: "Comm", future: Future | None, result: Any = None,
                 records: list[int] | None = None) -> None:
        self._comm, self._future, self._result = comm, future, result
        self._records = records if records is not None else []  # its ledger indices, once it has run

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self) -> Any:
        if self._future is not None:
            started = time.perf_counter()
            self._result = self._future.result()
            self._comm.account_wait(time.perf_counter() - started, self._records)
            self._future = None
        return self._result


class PendingMean:
    """A mean in flight (:meth:`lowband.comm.aggregate.Aggregator.mean_async`); ``wait()`` blocks until it is
    written back."""

    def __init__(self, comm: Comm, future: Future) -> None:
        self._comm, self._future = comm, future

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        started = time.perf_counter()
        records = self._future.result()  # the ledger indices of the mean's collectives
        self._comm.account_wait(time.perf_counter() - started, records or ())

    def add_done_callback(self, fn: Callable[[BaseException | None], None]) -> None:
        """Call ``fn(None)`` once the mean is written back, or ``fn(error)`` if it failed: on the
        aggregator's thread (on this one, at once, if already done). Nothing is charged to
        ``wait_seconds``; a bridge to another future (:mod:`lowband.comm.ddp_hook`) times its own wait."""
        self._future.add_done_callback(lambda future: fn(future.exception()))


class Comm:
    """Collectives over a process group, charged to a ledger, optionally over an emulated network.

    Example::

        comm = Comm(network=Network.parse("100mbit", "20ms", dist.get_world_size()))
        comm.all_reduce(grad, average=True, tag="grads")   # in place, blocks
        h = comm.all_reduce(delta, async_op=True); ...; h.wait()
    """

    def __init__(self, group: dist.ProcessGroup | None = None, network: Network | None = None,
                 ledger: Ledger | None = None) -> None:
        active = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if active else 0
        self.world_size = dist.get_world_size(group) if active else 1
        if self.rank < 0:
            raise ValueError("this rank is not a member of the group: build a Comm only on the group's members")
        if network is not None and len(network.links) != self.world_size:
            raise ValueError(f"network has {len(network.links)} links for {self.world_size} ranks")
        self.network = network
        self.link = network.bottleneck() if network is not None else Link()
        self.ring: tuple[int, ...] = tuple(range(self.world_size))
        self.ring_link = network.ring_link() if network is not None else Link()
        self.ledger = ledger if ledger is not None else Ledger()
        self.device = group_device(group)  # where metadata this Comm sends must live (NCCL: the GPU)
        self.wait_seconds = 0.0  # time the training thread spent blocked on communication
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowband-comm") if self.world_size > 1 else None

    # -- collectives -------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, average: bool = False, async_op: bool = False,
                   tag: str = "") -> Handle | torch.Tensor:
        """Sum (or average) ``tensor`` in place across ranks."""
        def run() -> torch.Tensor:
            dist.all_reduce(tensor, group=self.group)
            if average:
                tensor.div_(self.world_size)
            return tensor

        price = lambda link: cost.ring_all_reduce(_nbytes(tensor), self.world_size, link)  # noqa: E731
        return self._submit("all_reduce", tag, _nbytes(tensor), price, run, tensor, async_op, link=self.ring_link)

    def all_gather(self, tensor: torch.Tensor, async_op: bool = False, tag: str = "") -> Handle | list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]

        def run() -> list[torch.Tensor]:
            dist.all_gather(out, tensor, group=self.group)
            return out

        price = lambda link: cost.ring_all_gather(_nbytes(tensor), self.world_size, link)  # noqa: E731
        return self._submit("all_gather", tag, _nbytes(tensor), price, run, [tensor], async_op, link=self.ring_link)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False,
                  tag: str = "") -> Handle | torch.Tensor:
        """Copy ``src``'s ``tensor`` into every rank's ``tensor``."""
        def run() -> torch.Tensor:
            dist.broadcast(tensor, group_src=src, group=self.group)
            return tensor

        price = lambda link: cost.gloo_broadcast(_nbytes(tensor), self.world_size, link, self.rank, src)  # noqa: E731
        return self._submit("broadcast", tag, _nbytes(tensor), price, run, tensor, async_op)

    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False, tag: str = "") -> Handle | torch.Tensor:
        price = lambda link: cost.point_to_point(_nbytes(tensor), link, sending=True)  # noqa: E731
        return self._submit("send", tag, _nbytes(tensor), price,
                            lambda: (dist.send(tensor, group_dst=dst, group=self.group), tensor)[1], tensor, async_op,
                            peers=2,
                            link=self._pair(dst))

    def recv(self, tensor: torch.Tensor, src: int, async_op: bool = False, tag: str = "") -> Handle | torch.Tensor:
        price = lambda link: cost.point_to_point(_nbytes(tensor), link, sending=False)  # noqa: E731
        return self._submit("recv", tag, _nbytes(tensor), price,
                            lambda: (dist.recv(tensor, group_src=src, group=self.group), tensor)[1], tensor, async_op,
                            peers=2,
                            link=self._pair(src))

    def all_to_all(self, tensor: torch.Tensor, async_op: bool = False, tag: str = "") -> Handle | torch.Tensor:
        """Chunk j of ``tensor`` (split into ``world_size`` equal chunks) goes to rank j; returns a
        tensor whose chunk j is rank j's chunk for this rank. ``numel`` must divide by ``world_size``."""
        if tensor.numel() % self.world_size:
            raise ValueError(f"all_to_all needs numel divisible by world size {self.world_size}, "
                             f"got {tensor.numel()}: pad the tensor")
        out = torch.empty_like(tensor)

        def run() -> torch.Tensor:
            dist.all_to_all_single(out, tensor, group=self.group)
            return out

        price = lambda link: cost.all_to_all(_nbytes(tensor), self.world_size, link)  # noqa: E731
        return self._submit("all_to_all", tag, _nbytes(tensor), price, run, tensor.clone(), async_op,
                            link=self.ring_link)

    def sendrecv(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], async_op: bool = False,
                 tag: str = "") -> Handle | dict[int, torch.Tensor]:
        """Send ``sends[peer]`` to each peer and receive into ``recvs[peer]`` from each, all at once
        (neighbour exchange for gossip and pairwise averaging); returns ``recvs``. Both sides of
        every pair must call it in the same order of operations."""
        sent = sum(_nbytes(t) for t in sends.values())
        received = sum(_nbytes(t) for t in recvs.values())
        peers = sorted(set(sends) | set(recvs))
        if self.rank in peers:
            raise ValueError(f"rank {self.rank} cannot send to or receive from itself")

        def run() -> dict[int, torch.Tensor]:
            ops = [dist.P2POp(dist.isend, t, group=self.group, group_peer=p) for p, t in sorted(sends.items())]
            ops += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=p) for p, t in sorted(recvs.items())]
            for work in dist.batch_isend_irecv(ops) if ops else []:
                work.wait()
            return recvs

        link = self.network.bottleneck([self.rank, *peers]) if self.network is not None and peers else self.link
        price = lambda link: cost.neighbor_exchange(sent, received, link)  # noqa: E731
        return self._submit("sendrecv", tag, max(sent, received), price, run, recvs, async_op,
                            peers=len(peers) + 1, link=link, on=(sends, recvs))

    def monitor_all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place across ranks for monitoring (e.g. consensus distance): control
        traffic, like :meth:`barrier`: not emulated, not charged to the ledger."""
        if self._pool is not None:
            device = _cuda_device(tensor)

            def run() -> None:
                _enter(device)
                dist.all_reduce(tensor, group=self.group)
                _complete(device)

            self._pool.submit(run).result()
        return tensor

    def account_wait(self, seconds: float, records: Iterable[int] = ()) -> None:
        """Charge ``seconds`` of blocking to ``wait_seconds`` and stamp the ledger ``records`` waited for
        as waited at the current step (neither from background threads: no training thread waits there)."""
        if not getattr(self._local, "background", False):
            self.wait_seconds += seconds
            self.ledger.mark_waited(records, self.ledger.step)

    @contextlib.contextmanager
    def background(self, step: int | None = None, collect: list[int] | None = None) -> Iterator[None]:
        """Within this context, waits on this thread are not the training thread's: not charged;
        ops issued here are stamped with ``step`` (the training step that started the work) and their
        ledger indices appended to ``collect`` (for the training thread to stamp when it waits)."""
        self._local.background, self._local.step, self._local.collect = True, step, collect
        try:
            yield
        finally:
            self._local.background, self._local.step, self._local.collect = False, None, None

    def set_ring(self, order: tuple[int, ...]) -> None:
        """Charge ring collectives (all-reduce, all-gather, all-to-all) as a ring visiting
        ``order`` (:meth:`Network.ring_link`: across sites, the WAN is shared by the hops
        that cross it). The arithmetic is gloo's, whose own ring follows rank order: the
        order changes what the emulated link charges, which is what it models."""
        if sorted(order) != list(range(self.world_size)):
            raise ValueError(f"a ring order must visit every rank 0..{self.world_size - 1} once, got {list(order)}")
        self.ring = tuple(order)
        self.ring_link = self.network.ring_link(order) if self.network is not None else Link()

    def barrier(self) -> None:
        """Wait for every rank (control traffic: not emulated, not charged). Under NCCL the barrier
        runs on the caller's current GPU, made current on the comm thread too."""
        if self._pool is not None:
            device = self.device if self.device.type == "cuda" else None

            def run() -> None:
                _enter(device)
                dist.barrier(group=self.group)

            self._pool.submit(run).result()

    def close(self, wait: bool = True) -> None:
        """Stop the communication thread: after the ops in flight (``wait``), or at once, cancelling the
        queued ones and leaving a blocked op to fail on its own (a group being torn down)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=not wait)

    def rebind(self, network: Network | None = None) -> None:
        """Point this Comm at the current default process group (an elastic run rebuilt it over
        new members) with ``network``'s links; the ledger and ``wait_seconds`` carry on."""
        self.close()
        active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(self.group) if active else 0
        self.world_size = dist.get_world_size(self.group) if active else 1
        if network is not None and len(network.links) != self.world_size:
            raise ValueError(f"network has {len(network.links)} links for {self.world_size} ranks")
        self.network = network
        self.link = network.bottleneck() if network is not None else Link()
        self.ring = tuple(range(self.world_size))
        self.ring_link = network.ring_link() if network is not None else Link()
        self.device = group_device(self.group)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowband-comm") if self.world_size > 1 else None

    # -- internals ---------------------------------------------------------------------
    def _pair(self, peer: int) -> Link:
        if self.network is None:
            return Link()
        return self.network.bottleneck([self.rank, peer])

    def _submit(self, op: str, tag: str, payload: int, price: Callable[[Link], cost.Transfer],
                run: Callable[[], Any], local_result: Any, async_op: bool, peers: int | None = None,
                link: Link | None = None, on: Any = None) -> Any:
        """Run ``run`` on the comm thread; ``price(link)`` is the op's modelled cost on ``link``
        (default: the bottleneck of the group), charged to the ledger and slept out after the
        real op. Under kernel shaping (netns) only the latency part is slept out. ``on``: the
        op's tensors, whose device it runs on (default: ``local_result``)."""
        if self._pool is None:  # world_size 1: nothing crosses a wire
            return Handle(self, None, local_result) if async_op else local_result
        link = self.link if link is None else link
        transfer = price(link)
        emulate = self.network is not None and self.network.emulated
        delay = price(Link(None, link.latency)).seconds if self.network is not None and self.network.shaped \
            else transfer.seconds

        issued = getattr(self._local, "step", None)
        issued = self.ledger.step if issued is None else issued
        collect = getattr(self._local, "collect", None)
        mine: list[int] = []

        device = _cuda_device(local_result if on is None else on)  # None: CPU tensors, nothing to do

        def execute(step: int = issued) -> Any:  # the step is read at submission
            _enter(device)
            start = time.perf_counter()
            result = run()
            _complete(device)  # NCCL returns when enqueued: the op is over only once the GPU is done
            if emulate:
                _sleep_until(time.perf_counter() + delay)
            index = self.ledger.add(Record(op, tag, payload, transfer.sent, transfer.received,
                                           peers or self.world_size, start, time.perf_counter(), transfer.seconds, step))
            mine.append(index)
            if collect is not None:
                collect.append(index)
            return result

        handle = Handle(self, self._pool.submit(execute), records=mine)
        return handle if async_op else handle.wait()


def _cuda_device(obj: Any) -> torch.device | None:
    """The device of the first CUDA tensor in ``obj`` (a tensor, or lists, tuples and dicts of
    them), or None when it holds none (CPU tensors: the op needs nothing done)."""
    if isinstance(obj, torch.Tensor):
        return obj.device if obj.is_cuda else None
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for item in items:
        found = _cuda_device(item)
        if found is not None:
            return found
    return None


def _enter(device: torch.device | None) -> None:
    """On the comm thread, make the op's GPU current (CUDA's current device is per thread; a
    fresh thread's is GPU 0, and NCCL would open a context there); nothing for the CPU."""
    if device is not None:
        torch.cuda.set_device(device)


def _complete(device: torch.device | None) -> None:
    """Block until the op's GPU work is done (a synchronous NCCL op returns once enqueued: it has
    made ``device``'s current stream wait for it); nothing for the CPU, where gloo returns done."""
    if device is not None:
        torch.cuda.current_stream(device).synchronize()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _sleep_until(deadline: float) -> None:
    while (left := deadline - time.perf_counter()) > 0:
        time.sleep(left)
