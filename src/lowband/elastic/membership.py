"""Elastic membership for the local-update family: quorum, commit or skip, join with a verified state.

A membership composes with an algorithm through its synchronisation points
(:meth:`~lowband.algorithms.base.Algorithm.attach`): the algorithm calls ``after_step``,
``synchronise`` and ``finish`` of the attached membership, which runs its quorum around the
algorithm's own. Each algorithm names the protocol that drives it (``Algorithm.elastic``);
:data:`MEMBERSHIPS` holds them: ``rounds`` (:class:`ElasticSync`: DiLoCo's outer step, local
SGD's averaging), the overlapped variants' drains (:mod:`lowband.elastic.overlapped`) and
gossip's quorum points (:mod:`lowband.elastic.decentralized`). At every outer step, on every worker:

1. **quorum**: arrive at the :class:`~lowband.elastic.quorum.QuorumService` and get the
   members of this attempt (:class:`~lowband.elastic.quorum.Decision`);
2. **group**: if the membership changed (or the last attempt failed), rebuild the default
   process group over the members (``pg/<epoch>/`` in the driver's store) and re-point the
   :class:`~lowband.comm.Comm` at it (one ledger across groups);
3. **join**: members that do not hold the committed state (joiners, restarted or
   late workers) receive it from the lowest-ranked holder by broadcast, with a CRC-32
   checked before use (:func:`pack_state`, :func:`unpack_state`): global model, outer
   optimizer, inner optimizer, lr schedule, counters, training step and clock;
4. **average**: the outer gradients are all-reduced; joiners contribute zeros and the
   holders scale theirs by members/holders, so the mean is over the workers that trained;
5. **commit or skip**: every member reports to the service; the outer step is applied only
   if every member succeeded. Otherwise nothing was applied (the compressor/feedback state is
   restored too) and the round is redone with a new quorum.

A member that fails in a collective sets ``abort/<quorum>`` in the store; members still
blocked in it (gloo would make a rank waiting on a *live* peer wait for its full timeout:
closing a group's sockets does not wake it) poll that key and ``commit/<quorum>`` (set at
once by the service when a member's process exits) every 50 ms, and give up: their blocked
communication and aggregation threads are left to fail on their own and fresh ones take
over (:meth:`ElasticSync._abandon`).

Fault injection (``LOWBAND_FAULT``) lives in :mod:`lowband.adversity.injection`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lowband.adversity.injection import Fault, FaultPlan, parse_faults  # noqa: F401  (re-exported)
from lowband.algorithms import ALGORITHMS, Algorithm
from lowband.comm import group
from lowband.elastic.quorum import Decision, QuorumClient, replica_of
from lowband.feedback import FEEDBACK
from lowband.net.link import Network
from lowband.registry import Registry, build, parse_spec

STORE_POLL_S = 0.05  # while a collective runs: how often the store is asked whether a member failed
log = logging.getLogger("lowband.elastic.membership")


class StateChecksumError(RuntimeError):
    """A transferred state did not match its checksum: it is refused, the attempt is skipped."""


class CollectiveAbandoned(RuntimeError):
    """A member of this quorum failed: its collective is given up instead of waiting for gloo's timeout."""


def elastic_algorithms() -> list[str]:
    """The registered algorithms that declare a membership protocol (``Algorithm.elastic``)."""
    return [name for name in ALGORITHMS.names() if ALGORITHMS.get(name).elastic]


def membership_for(algo: Algorithm) -> type["ElasticSync"]:
    """The membership class that drives ``algo`` (its class's ``elastic`` protocol)."""
    protocol = type(algo).elastic
    if not protocol:
        raise ValueError(f"--elastic supports {', '.join(elastic_algorithms())}, not {algo.name}")
    return MEMBERSHIPS.get(protocol)


def check_elastic(algos: Sequence[str], workers: int, min_workers: int) -> None:
    """Raise one line if ``--elastic`` cannot run these algorithms with these worker counts."""
    names = [a.partition(":")[0].strip() for a in algos]
    unsupported = [n for n in names if n not in ALGORITHMS or not ALGORITHMS.get(n).elastic]
    if unsupported:
        raise ValueError(f"--elastic supports {', '.join(elastic_algorithms())}, not {', '.join(unsupported)}")
    for spec in algos:
        cls, options = parse_spec(spec, ALGORITHMS)
        cls.Options(**options)  # its own one-line errors first
        if options.get("asynchronous") is False:
            raise ValueError("--elastic runs co2 with asynchronous=true only (its blocking mode averages after "
                             "the commit vote); use diloco for blocking rounds")
        if options.get("budget", "fixed") != "fixed":
            raise ValueError("--elastic runs budget=fixed only (a speed budget's measurements are per membership)")
    if len(algos) != 1:
        raise ValueError("--elastic runs one algorithm at a time: give one --algo (and one --compress/--feedback)")
    if not 1 <= min_workers <= workers:
        raise ValueError(f"--min-workers must be in [1, --workers={workers}], got {min_workers}")


# -- state transfer -----------------------------------------------------------------------------
def pack_state(state: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """``state`` serialised (``torch.save``) as a uint8 tensor, and its CRC-32."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    raw = buffer.getvalue()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8), zlib.crc32(raw)


def unpack_state(payload: torch.Tensor, crc: int) -> dict[str, Any]:
    """The state in ``payload``; raises :class:`StateChecksumError` if its CRC-32 is not ``crc``."""
    raw = payload.numpy().tobytes()
    got = zlib.crc32(raw)
    if got != crc:
        raise StateChecksumError(f"state transfer refused: CRC-32 {got:08x} != sent {crc:08x} "
                                 "(corrupted in transit; the round is redone)")
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


@dataclass
class LoopState:
    """The training loop's counters, shared with :class:`ElasticSync` (and sent to joiners)."""

    step: int = 0
    clock: float = 0.0
    val_loss: float = float("nan")


class ElasticSync:
    """Runs a DiLoCo-family algorithm's outer steps over a changing membership (module docstring).

    Example (what :mod:`lowband.train.elastic_worker` does)::

        sync = membership_for(algo)(client, store, algo, scheduler, network, loop, faults, timeout=30)
        sync.join()            # first quorum: the start, or a running job's next outer step
        for step in ...:       # algo.step() reaches sync.synchronise() every H steps (its sync_point)
    """

    def __init__(self, client: QuorumClient, store: Any, algo: Any, scheduler: Any, network: Network,
                 loop: LoopState, faults: FaultPlan, timeout: float,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.client, self.store, self.algo, self.scheduler = client, store, algo, scheduler
        self.network, self.loop, self.faults, self.timeout = network, loop, faults, timeout
        self.on_event = on_event or (lambda event: None)
        self.comm = algo.comm
        self.epoch = 0
        self.decision: Decision | None = None
        self.elastic_s = 0.0  # seconds spent in quorums, votes, group rebuilds and state transfers
        self.redone = 0  # attempts that did not commit
        self._setup()
        algo.attach(self)  # the algorithm's synchronisation points now come here

    def _setup(self) -> None:
        """State of a protocol's own (subclasses); DiLoCo's rounds keep none."""

    # -- the algorithm's synchronisation points (Algorithm.attach) --------------------------------
    def after_step(self) -> None:
        """After each inner step: the algorithm's own (DiLoCo counts to H and reaches :meth:`synchronise`)."""
        self.algo.after_step()

    def finish(self) -> None:
        """End of training: the algorithm's own (nothing is in flight between DiLoCo's rounds)."""
        self.algo.end_training()

    @property
    def members(self) -> int:
        return len(self.decision.members) if self.decision else 1

    def join(self) -> None:
        """The first quorum of this worker: the start of training, or a running job's next outer step
        (then the state comes from a holder and the loop continues at its step)."""
        joined = self._until_committed()
        if joined.kind == "sync" and self.client.token in joined.joiners:
            self.algo.local_steps = 0
            self.scheduler.step()  # the holders step their schedule after this step too
            self.on_event({"event": "synced", "replica": self.client.token, "round": joined.round,
                           "outer_steps": self.rounds, "params_sha": self.fingerprint()})

    @torch.no_grad()
    def synchronise(self) -> None:
        """One outer step over the current quorum, redone until it commits."""
        self._until_committed()

    def _until_committed(self) -> Decision:
        while True:
            started = time.perf_counter()
            d = self.client.arrive({"outer_steps": self.rounds, "step": self.loop.step})
            self._charge(time.perf_counter() - started)
            self.decision = d
            work, ok = None, True
            started, waited = time.perf_counter(), self.comm.wait_seconds
            self._prepare(d)
            snapshot = self._snapshot()
            try:
                self._regroup(d)
                if d.kind == "sync":
                    work = self._attempt(d)
            except Exception as err:  # a peer died or hung mid-collective, or the state was refused
                ok = False
                self.store.set(f"abort/{d.number}", self.client.token)  # members still in a collective stop
                self._abandon()
                group.shutdown()
                self.epoch = 0
                self._charge(time.perf_counter() - started - (self.comm.wait_seconds - waited))
                log.warning("replica %s, quorum %d (round %d attempt %d): %s: %s", self.client.token, d.number,
                            d.round, d.attempt, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            self.faults.trigger("commit", self.loop.step)
            started = time.perf_counter()
            committed = self.client.commit(d.number, ok)
            self._charge(time.perf_counter() - started)
            if committed:
                if work is not None:
                    self._apply(d, work)
                self._report(d)
                return d
            self.redone += 1
            self._rollback(snapshot)  # never half-applied: compressor/feedback too

    # -- what one attempt does (subclasses for the algorithms with averages in flight, and gossip) --
    @property
    def rounds(self) -> int:
        """Synchronisations committed so far (the fingerprints in the metrics are keyed by it)."""
        return int(getattr(self.algo, "outer_steps", 0))

    def _prepare(self, d: Decision) -> None:
        """Before the group is rebuilt: nothing here (DiLoCo has nothing in flight between rounds)."""

    def _abandon(self) -> None:
        """Stop waiting for the group about to be torn down. Its collectives may block on a live peer
        until gloo's timeout (closing our side does not wake them): the communication and
        aggregation threads are left to fail on their own (nothing reads their results) and fresh
        ones take over; the aggregator's state is set again by the rollback."""
        self.comm.close(wait=False)  # close() with waiting would wait for the blocked op
        old = getattr(self.algo, "aggregator", None)
        if old is not None:
            fresh = self.algo.build_aggregator(old.tag)
            fresh.compressor.for_rank(replica_of(self.client.token))
            fresh.load_state_dict(copy.deepcopy(old.state_dict()))  # rollback or preflight sets it again
            self.algo.aggregator = fresh

    def _wait(self, done: Callable[[], bool], keys: Sequence[str]) -> None:
        """Block until ``done()``; raise :class:`CollectiveAbandoned` as soon as one of ``keys`` is in the
        store (a member failed, or the service decided the quorum: the collective cannot complete)."""
        started, checked = time.perf_counter(), 0.0
        try:
            while not done():
                now = time.perf_counter()
                if now - checked >= STORE_POLL_S:
                    checked = now
                    found = [k for k in keys if self.store.check([k])]
                    if found:
                        raise CollectiveAbandoned(f"{found[0]} is set: a member failed, the collective is abandoned")
                time.sleep(0.002)
        finally:
            self.comm.account_wait(time.perf_counter() - started)

    def _abort_keys(self, d: Decision) -> tuple[str, ...]:
        return f"abort/{d.number}", f"commit/{d.number}"

    def _snapshot(self) -> Any:
        return copy.deepcopy(self.algo.aggregator.state_dict())

    def _rollback(self, snapshot: Any) -> None:
        self.algo.aggregator.load_state_dict(snapshot)

    def _attempt(self, d: Decision) -> Any:
        """The work of a sync quorum before the vote (DiLoCo: the averaged outer gradients)."""
        return self._average(d, self.algo.outer_gradients)

    def _apply(self, d: Decision, work: Any) -> None:
        """After the commit (DiLoCo: the outer step)."""
        self.algo.apply_outer(work)

    def _regroup(self, d: Decision) -> None:
        if d.epoch == self.epoch:
            return
        started = time.perf_counter()
        self.epoch = 0  # a failed rebuild must be retried
        replicas = [int(t.split(".")[0]) for t in d.members]
        group.init_from_store(self.store, f"pg/{d.epoch}/", d.rank(self.client.token), len(d.members), self.timeout)
        self.comm.rebind(self.network.subset(replicas))
        self.epoch = d.epoch
        self._charge(time.perf_counter() - started)

    def _average(self, d: Decision, outer_gradients: Callable[[], list[tuple[str, torch.Tensor]]],
                 receivers: Sequence[str] | None = None) -> list[tuple[str, torch.Tensor]]:
        """Send the state to the joiners (and ``receivers``), then average ``outer_gradients()`` over
        the contributors (joiners send zeros); a refused state is raised after the all-reduce."""
        token, refused = self.client.token, None
        if d.joiners or receivers:
            try:
                self._transfer(d, receivers)
            except StateChecksumError as err:  # still take part in the all-reduce: peers must not wait
                refused = err
        self.faults.trigger("sync", self.loop.step)
        deltas = outer_gradients()
        scale = len(d.members) / len(d.contributors)
        for _, delta in deltas:
            if token not in d.contributors:
                delta.zero_()
            elif scale != 1.0:
                delta.mul_(scale)
        pending = self.algo.aggregator.mean_async(deltas)
        self._wait(pending.done, self._abort_keys(d))
        pending.wait()  # raises the collective's own error, if any
        if refused is not None:
            raise refused  # this member votes to skip: the round is redone, the state sent again
        return deltas

    def _transfer(self, d: Decision, receivers: Sequence[str] | None = None) -> None:
        """Broadcast the committed state from ``d.src`` (else the first contributor) to the members;
        joiners (and ``receivers``) verify it and load it (:meth:`load_shared_state`, :meth:`adopt`)."""
        started = time.perf_counter()
        source = d.src or d.contributors[0]
        token, src = self.client.token, d.rank(source)
        # cpu: the state transfer runs on gloo: elastic runs are CPU-only for now (docs/gpu.md)
        header = torch.zeros(2, dtype=torch.int64)
        payload = torch.empty(0, dtype=torch.uint8)
        if token == source:
            payload, crc = pack_state(self.shared_state())
            header[0], header[1] = payload.numel(), crc
        self._broadcast(header, src, "elastic.header", d)
        if token != source:
            payload = torch.empty(int(header[0]), dtype=torch.uint8)
        self._broadcast(payload, src, "elastic.state", d)
        if token in d.joiners:
            self.faults.corrupt(payload)
            self.load_shared_state(unpack_state(payload, int(header[1])))
        elif token != source and token in (receivers or ()):
            self.adopt(unpack_state(payload, int(header[1])))
        self.elastic_s += time.perf_counter() - started  # the broadcasts' waits are charged by Comm

    def _broadcast(self, tensor: torch.Tensor, src: int, tag: str, d: Decision) -> None:
        handle = self.comm.broadcast(tensor, src=src, async_op=True, tag=tag)
        self._wait(handle.done, self._abort_keys(d))
        handle.wait()

    def shared_state(self) -> dict[str, Any]:
        """What a joiner needs: everything the holders agree on, plus the loop's position."""
        model = self.algo.model
        params = {id(p) for p in model.parameters()}
        return {"algorithm": self.algo.state_dict(), "optimizer": self.algo.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "buffers": {n: b for n, b in model.named_buffers() if id(b) not in params},
                "loop": {"step": self.loop.step, "clock": self.loop.clock, "val_loss": self.loop.val_loss}}

    @torch.no_grad()
    def load_shared_state(self, state: dict[str, Any]) -> None:
        """Become a copy of the sender: its global model (also as this worker's local model, so
        this round's contribution is zero), optimizers, schedule and counters; error feedback
        starts empty (residuals are per worker)."""
        self.algo.load_state_dict(state["algorithm"])
        self.algo.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        buffers = dict(self.algo.model.named_buffers())
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)
        for p, g in zip(self.algo.params, self.algo.global_params):
            p.copy_(g)
        self.algo.aggregator.feedback = build(self.algo.options.feedback, FEEDBACK)
        loop = state["loop"]
        self.loop.step, self.loop.clock, self.loop.val_loss = int(loop["step"]), float(loop["clock"]), \
            float(loop["val_loss"])

    def adopt(self, state: dict[str, Any]) -> None:
        """A holder told to take the sender's shared part (subclasses whose ranks' states differ)."""

    @torch.no_grad()
    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of the global model: equal on every member after a commit."""
        return digest_of(self.algo.global_params)

    def _charge(self, seconds: float) -> None:
        self.elastic_s += seconds
        self.comm.account_wait(seconds)

    def _report(self, d: Decision) -> None:
        if d.rank(self.client.token) != 0:
            return
        base = {"round": d.round, "attempt": d.attempt, "members": len(d.members)}
        for token in d.left:
            self.on_event({"event": "leave", "replica": token, **base})
        for token in d.joined:
            self.on_event({"event": "join", "replica": token, **base})
        if d.attempt:
            self.on_event({"event": "redo", "replica": None, **base})


def digest_of(tensors: list[torch.Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of ``tensors``' bytes, in order."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


MEMBERSHIPS: Registry[type[ElasticSync]] = Registry("membership protocol")
MEMBERSHIPS.register("rounds")(ElasticSync)
