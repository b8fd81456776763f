"""Quorum over a torch.distributed store: who takes part in the next outer step, then commit or skip.

The protocol of ``lowband train --elastic`` (docs/elastic.md), in the spirit of torchft's
Manager and Lighthouse: one :class:`QuorumService` (in the ``lowband train`` driver, which
hosts the store and supervises every worker process) decides; every worker talks to it
through a :class:`QuorumClient` over the same store. Workers are named by a *token*
``"<replica>.<incarnation>"`` (replica 1 restarted once is ``1.1``).

One quorum, from the worker's side::

    d = client.arrive({"outer_steps": 12})   # blocks until the service has decided
    ... build the process group of d.epoch, transfer state to d.joiners, all-reduce ...
    if client.commit(d.number, ok):         # every member finished: apply the outer step
        ...
    else:                                    # someone failed or vanished: redo with a new quorum

Store keys (all small strings): ``arrive/<token>`` (arrival counter) and
``arrive/<token>/<n>`` (its JSON info), ``assign/<token>/<n>`` (the quorum number that
arrival belongs to), ``quorum/<q>`` (the decision, JSON), ``done/<q>/<token>`` ("1"/"0"),
``commit/<q>`` ("1"/"0"). Process groups live under ``pg/<epoch>/``.

Rules of the service (:meth:`QuorumService.poll`):

* *holders* are the workers whose state is the last committed one (every starter at
  first; afterwards the members of the last committed quorum; after a failed quorum the
  same holders, since nothing was applied, except those silent past the deadline);
* a quorum is formed when every live holder has arrived, or ``timeout`` seconds after the
  first holder arrived (holders still missing are dropped: a hung worker that comes back
  later is a joiner); waiting non-holders join it and receive the state;
* the first quorum (``kind="start"``) waits for every started worker (``start_timeout``);
* fewer than ``min_workers`` members: wait while a restart is pending (at most
  ``timeout``), then abort every waiting worker with one line naming the fix;
* a quorum commits only if every member reported success before ``3 * timeout``; a
  member that died (the driver saw its process exit) fails it at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

WAIT_S = 3600.0  # a worker's longest wait on the service (the service answers within its own timeouts)


class QuorumAborted(RuntimeError):
    """The service stopped the run (too few workers); the message names the fix."""


class TrainingOver(RuntimeError):
    """A worker arrived after the last synchronisation: there is nothing left to join."""


@dataclass(frozen=True)
class Decision:
    """One quorum: its members in rank order, who contributes, who needs the state."""

    number: int
    kind: str  # "start" (first formation) or "sync" (an outer step)
    round: int  # outer steps committed before this quorum
    attempt: int  # 0, then 1, 2 ... when the round is redone
    epoch: int  # process-group generation; a new one whenever members change or a quorum failed
    members: tuple[str, ...]
    contributors: tuple[str, ...]  # holders: their outer gradients count
    joiners: tuple[str, ...]  # members that receive the state from ``src`` first
    src: str | None
    left: tuple[str, ...] = ()  # members of the last committed quorum that are not in this one
    joined: tuple[str, ...] = ()  # members that were not in the last committed quorum

    def rank(self, token: str) -> int:
        return self.members.index(token)

    @classmethod
    def from_json(cls, text: str) -> "Decision":
        raw = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def replica_of(token: str) -> int:
    return int(token.split(".")[0])


def token_key(token: str) -> tuple[int, int]:
    replica, _, incarnation = token.partition(".")
    return int(replica), int(incarnation or 0)


class QuorumClient:
    """A worker's side of the protocol (one per worker process)."""

    def __init__(self, store: dist.Store, token: str) -> None:
        self.store, self.token, self.arrivals = store, token, 0

    def arrive(self, info: dict[str, Any]) -> Decision:
        """Announce that this worker is at a synchronisation point; block until its quorum is decided."""
        self.arrivals += 1
        n = self.arrivals
        self.store.set(f"arrive/{self.token}/{n}", json.dumps(info))
        self.store.add(f"arrive/{self.token}", 1)
        key = f"assign/{self.token}/{n}"
        self.store.wait([key], timedelta(seconds=WAIT_S))
        raw = json.loads(self.store.get(f"quorum/{int(self.store.get(key))}"))
        if "abort" in raw:
            raise QuorumAborted(raw["abort"])
        if "finished" in raw:
            raise TrainingOver(raw["finished"])
        return Decision.from_json(json.dumps(raw))

    def commit(self, number: int, ok: bool) -> bool:
        """Report this member's outcome of quorum ``number``; True when every member succeeded."""
        self.store.set(f"done/{number}/{self.token}", "1" if ok else "0")
        self.store.wait([f"commit/{number}"], timedelta(seconds=WAIT_S))
        return self.store.get(f"commit/{number}") == b"1"


@dataclass
class _Open:
    """The quorum whose commit votes the service is collecting."""

    decision: Decision
    deadline: float


@dataclass
class QuorumService:
    """The deciding side, polled by the driver; the driver reports process starts and exits.

    ``events`` collects what happened (dicts with ``event`` in join, leave, skip, commit,
    abort) for the driver to print; :attr:`aborted` holds the abort message, if any."""

    store: dist.Store
    min_workers: int
    timeout: float
    start_timeout: float = 120.0
    alive: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    restart_pending: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    aborted: str | None = None
    _starters: set[str] = field(default_factory=set)
    _holders: set[str] = field(default_factory=set)
    _started: bool = False
    _round: int = 0
    _attempt: int = 0
    _epoch: int = 0
    _number: int = 0
    _last_members: tuple[str, ...] = ()
    _committed_members: tuple[str, ...] = ()
    _last_ok: bool = True
    _consumed: dict[str, int] = field(default_factory=dict)
    _waiting: dict[str, tuple[int, float]] = field(default_factory=dict)  # token -> (arrival, since)
    _below_min_since: float | None = None
    _open: _Open | None = None

    # -- the driver's reports -------------------------------------------------------------
    def spawned(self, token: str, starter: bool) -> None:
        self.alive.add(token)
        if starter:
            self._starters.add(token)

    def exited(self, token: str, code: int) -> None:
        self.alive.discard(token)
        self._waiting.pop(token, None)
        if code == 0:
            self.finished.add(token)
        self._holders.discard(token)

    @property
    def over(self) -> bool:
        """Training has ended for the holders (one finished): no restart can still join."""
        return bool(self.finished) or self.aborted is not None

    # -- one poll ---------------------------------------------------------------------------
    def poll(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._collect_arrivals(now)
        if self._open is not None:
            self._collect_votes(now)
        if self._open is None and self.aborted is None:
            self._maybe_decide(now)

    def _collect_arrivals(self, now: float) -> None:
        for token in sorted(self.alive):
            count = int(self.store.add(f"arrive/{token}", 0))
            if count > self._consumed.get(token, 0) and token not in self._waiting:
                self._waiting[token] = (count, now)

    def _collect_votes(self, now: float) -> None:
        assert self._open is not None
        d = self._open.decision
        votes = {t: self.store.get(f"done/{d.number}/{t}") for t in d.members
                 if self.store.check([f"done/{d.number}/{t}"])}
        gone = [t for t in d.members if t not in votes and t not in self.alive]
        if len(votes) < len(d.members) and not gone and now < self._open.deadline:
            return
        ok = [t for t, v in votes.items() if v == b"1"]
        committed = len(ok) == len(d.members)
        self.store.set(f"commit/{d.number}", "1" if committed else "0")
        self._open, self._last_ok = None, committed
        if committed:
            for token in d.left:
                self.events.append({"event": "leave", "replica": token, "round": d.round, "members": len(d.members)})
            for token in d.joined:
                self.events.append({"event": "join", "replica": token, "round": d.round, "members": len(d.members)})
            self._committed_members = d.members
            self._holders = set(d.members) & self.alive
            self._started = True
            if d.kind == "sync":
                self._round += 1
            self._attempt = 0
        else:
            if not gone:  # decided by the deadline: silent holders are dropped (a hung worker rejoins later)
                self._holders &= set(votes)  # holders that answered still hold the committed state
            self._attempt += 1
            why = {t: ("gone" if t in gone else "failed" if t in votes else "silent")
                   for t in d.members if t not in ok and (t in votes or t in gone or not gone)}
            self.events.append({"event": "skip", "quorum": d.number, "round": d.round, "attempt": d.attempt,
                                "why": why})

    def _maybe_decide(self, now: float) -> None:
        if not self._waiting:
            return
        if not self._started:
            expected = (self._starters & self.alive) - self.finished
            first = min(since for _, since in self._waiting.values())
            if not expected <= set(self._waiting) and now - first < self.start_timeout:
                return
            holders: set[str] = set(self._waiting)
            arrived = set(self._waiting)
        else:
            live = self._holders & self.alive
            if not live:
                self._end_waiting("every worker holding the training state has finished" if self.finished else None)
                return
            arrived = live & set(self._waiting)
            if not arrived:
                return  # joiners wait for the holders' next synchronisation
            first = min(self._waiting[t][1] for t in arrived)
            if arrived < live and now - first < self.timeout:
                return
            holders = arrived
            self._holders = set(arrived)  # holders that did not come in time are dropped
        members = tuple(sorted(self._waiting, key=token_key))
        if len(members) < self.min_workers:
            self._below_min_since = self._below_min_since or now
            pending = self.restart_pending or bool((self.alive - self.finished) - set(members))
            if pending and now - self._below_min_since < self.timeout:
                return
            self._abort(f"only {len(members)} worker(s) left and --min-workers is {self.min_workers}: the run stops "
                        f"(lower --min-workers, or let workers rejoin with --rejoin-after SECONDS)")
            return
        self._below_min_since = None
        self._decide(members, holders)

    def _decide(self, members: tuple[str, ...], holders: set[str]) -> None:
        self._number += 1
        if members != self._last_members or not self._last_ok:
            self._epoch += 1
        kind = "sync" if self._started else "start"
        contributors = tuple(t for t in members if t in holders) if kind == "sync" else members
        joiners = tuple(t for t in members if t not in holders) if kind == "sync" else ()
        decision = Decision(
            number=self._number, kind=kind, round=self._round, attempt=self._attempt, epoch=self._epoch,
            members=members, contributors=contributors, joiners=joiners,
            src=contributors[0] if joiners else None,
            left=tuple(t for t in self._committed_members if t not in members),
            joined=tuple(t for t in members if t not in self._committed_members) if self._started else ())
        self.store.set(f"quorum/{self._number}", decision.to_json())
        for token in members:
            arrival, _ = self._waiting.pop(token)
            self._consumed[token] = arrival
            self.store.set(f"assign/{token}/{arrival}", str(self._number))
        self._last_members = members
        self._open = _Open(decision, time.monotonic() + 3 * self.timeout)

    def _end_waiting(self, finished: str | None) -> None:
        """No holder is left: finished runs release late joiners; otherwise the state is lost."""
        if finished is None:
            self._abort("every worker holding the training state died: nothing to continue from "
                        "(use --checkpoint-every and --resume for runs that must survive this)")
            return
        self._broadcast_to_waiting({"finished": f"{finished}: nothing left to join"})

    def _abort(self, message: str) -> None:
        self.aborted = message
        self.events.append({"event": "abort", "why": message})
        self._broadcast_to_waiting({"abort": message})

    def _broadcast_to_waiting(self, payload: dict[str, str]) -> None:
        self._number += 1
        self.store.set(f"quorum/{self._number}", json.dumps(payload))
        for token, (arrival, _) in list(self._waiting.items()):
            self._consumed[token] = arrival
            self.store.set(f"assign/{token}/{arrival}", str(self._number))
        self._waiting.clear()
