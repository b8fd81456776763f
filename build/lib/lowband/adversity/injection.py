"""Fault injection (tests and benchmarks): kill, hang or corrupt an elastic worker; spoil a payload.

``LOWBAND_FAULT`` holds the faults, separated by ``;``.

Elastic runs: ``kill:rank=1,step=30`` (SIGKILL at the start of step 30), ``kill:rank=1,step=30,at=sync``
(at the first outer step from step 30 on, after the quorum, before the all-reduce),
``at=commit`` (after the all-reduce, before voting), ``hang:rank=1,step=30,seconds=20``,
``corrupt:rank=2`` (the next state replica 2 receives has one byte flipped). ``rank`` is the
replica id (a worker's rank at the start); kills and hangs apply to a replica's first
incarnation unless ``incarnation=I`` names another (its I-th restart), so a restarted worker
does not die again by accident.

Payloads, in any multi-process run (what rank R sends through the
:class:`~lowband.comm.aggregate.Aggregator`, after its own guard ran, like a broken sender or NIC;
on every aggregation from step S on, default 0, so every later round tests the receivers):

* ``nan:rank=R[,step=S]``: every value rank R sends is NaN (applied where ``--attack`` is, after
  any attack); receivers name and exclude it (all-gather paths) or stop naming it (a summed mean);
* ``corrupt:rank=R,at=wire[,step=S]``: byte 0 of every all-gathered buffer rank R sends is
  flipped after its CRC-32 was computed, so every rank (R too) receives the same flipped bytes;
  ``checksum`` detects and excludes it, without it they are decoded as they are. A summed
  all-reduce has no per-rank bytes: there it does nothing (warned). ``at=wire`` tells it from
  the elastic ``corrupt:rank=R``.

``rank`` is the rank in the aggregator's communicator (a worker's rank; under ``--hierarchical``
the leaders' exchange, where ranks are sites) and ``step`` is ``comm.ledger.step``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lowband.adversity.attacks import Attack

FAULT_KINDS = ("kill", "hang", "corrupt", "nan")
FAULT_POINTS = ("step", "sync", "commit")
WIRE = "wire"  # ``at=`` of the payload faults
ENV_FAULT = "LOWBAND_FAULT"
FORMS = ("kill|hang|corrupt:rank=R[,step=S][,at=step|sync|commit][,seconds=T][,incarnation=I] (elastic), "
         "nan:rank=R[,step=S] or corrupt:rank=R,at=wire[,step=S] (payloads)")
_POINTS = {"kill": FAULT_POINTS, "hang": FAULT_POINTS, "corrupt": (*FAULT_POINTS, WIRE), "nan": (WIRE,)}
_KEYS = {"rank", "step", "at", "seconds", "incarnation"}
_WIRE_KEYS = {"rank", "step", "at"}
log = logging.getLogger("lowband.elastic.membership")
wire_log = logging.getLogger("lowband.adversity.injection")


@dataclass(frozen=True)
class Fault:
    kind: str
    replica: int
    step: int = 0
    at: str = "step"
    seconds: float = 30.0
    incarnation: int = 0  # kills and hangs: the incarnation they apply to (0: the first start)

    @property
    def wire(self) -> bool:
        """A payload fault (``nan``, ``corrupt ... at=wire``) rather than an elastic one."""
        return self.at == WIRE


def parse_faults(text: str) -> tuple[Fault, ...]:
    """``"kill:rank=1,step=30;corrupt:rank=2;nan:rank=1,step=5"`` -> faults; bad input raises one line."""
    faults = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            faults.append(_parse_fault(part))
        except ValueError:
            raise ValueError(f"bad LOWBAND_FAULT {part!r}: use {FORMS}") from None
    return tuple(faults)


def _parse_fault(part: str) -> Fault:
    """One fault; any ValueError means ``part`` is not one of :data:`FORMS`."""
    kind, _, rest = part.partition(":")
    opts = dict(kv.split("=", 1) for kv in rest.split(",") if kv)  # a key without '=': ValueError
    at = opts.get("at", WIRE if kind == "nan" else "step")
    if kind not in _POINTS or "rank" not in opts or at not in _POINTS[kind] \
            or not set(opts) <= (_WIRE_KEYS if at == WIRE else _KEYS):
        raise ValueError(part)
    fault = Fault(kind, int(opts["rank"]), int(opts.get("step", 0)), at, float(opts.get("seconds", 30.0)),
                  int(opts.get("incarnation", 0)))
    if fault.replica < 0:
        raise ValueError(part)
    return fault


@dataclass
class FaultPlan:
    """The faults that apply to this process (replica, incarnation)."""

    faults: list[Fault] = field(default_factory=list)

    @classmethod
    def from_env(cls, replica: int, incarnation: int) -> "FaultPlan":
        faults = parse_faults(os.environ.get(ENV_FAULT, ""))  # payload faults (wire) are the aggregator's, below
        return cls([f for f in faults if f.replica == replica and not f.wire
                    and (f.kind == "corrupt" or incarnation == f.incarnation)])

    def trigger(self, point: str, step: int) -> None:
        """Kill or hang here if a fault says so (``point``: step, sync or commit)."""
        for fault in list(self.faults):
            if fault.kind in ("kill", "hang") and fault.at == point and step >= fault.step:
                self.faults.remove(fault)
                if fault.kind == "kill":
                    log.warning("fault injection: SIGKILL at step %d (%s)", step, point)
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(fault.seconds)

    def corrupt(self, payload: torch.Tensor) -> None:
        for fault in list(self.faults):
            if fault.kind == "corrupt":
                self.faults.remove(fault)
                payload[len(payload) // 2] ^= 0xFF


# -- payload faults (any multi-process run) --------------------------------------------------
class PayloadFaults(Attack):
    """``attack``, then the payload faults of ``LOWBAND_FAULT``: what the aggregator applies as its attack.

    ``__call__`` is where ``--attack`` transforms a rank's contribution (``nan``); :meth:`on_wire`
    spoils its sealed all-gather buffer after the CRC-32 (``corrupt ... at=wire``)."""

    name = "payload-faults"

    def __init__(self, attack: Attack, faults: Sequence[Fault]) -> None:
        self.inner, self.faults, self.options = attack, tuple(faults), attack.options
        self.ranks = attack.ranks | {f.replica for f in self.faults if f.kind == "nan"}
        self._fired: set[Fault] = set()

    def __call__(self, x: torch.Tensor, rank: int, step: int, key: str) -> torch.Tensor:
        if self.inner.applies(rank):
            x = self.inner(x, rank, step, key)
        return torch.full_like(x, float("nan")) if x.is_floating_point() and self._due("nan", rank, step) else x

    def on_wire(self, sealed: torch.Tensor, nbytes: int, rank: int, step: int) -> torch.Tensor:
        sealed = self.inner.on_wire(sealed, nbytes, rank, step)
        if nbytes > 0 and self._due("corrupt", rank, step):
            sealed[0] ^= 0xFF  # a fresh buffer of the aggregator's: the CRC-32 in its trailer no longer matches
        return sealed

    def _due(self, kind: str, rank: int, step: int) -> bool:
        """Whether a fault of ``kind`` hits ``rank`` at ``step`` (logged the first time)."""
        for fault in self.faults:
            if fault.kind == kind and fault.replica == rank and step >= fault.step:
                if fault not in self._fired:
                    self._fired.add(fault)
                    wire_log.warning("rank %d step %d: fault injection: %s on every payload it sends from now on",
                                     rank, step, "NaN" if kind == "nan" else "one byte flipped after the checksum")
                return True
        return False


def payload_faults(attack: Attack, summed: bool = False) -> Attack:
    """``attack`` with the payload faults of ``LOWBAND_FAULT`` (``attack`` itself when there are none).
    ``summed``: the aggregator sums by all-reduce, where ``corrupt ... at=wire`` has no bytes to spoil."""
    faults = [f for f in parse_faults(os.environ.get(ENV_FAULT, "")) if f.wire]
    if not faults:
        return attack
    if summed and any(f.kind == "corrupt" for f in faults):
        wire_log.warning("LOWBAND_FAULT corrupt:...,at=wire does nothing on a summed all-reduce (no per-rank bytes): "
                         "use a non-summable compressor or a robust --aggregate, with --checksum")
    return PayloadFaults(attack, faults)
