"""Fault injection for elastic runs (tests and benchmarks): kill, hang or corrupt a worker.

``LOWBAND_FAULT`` holds the faults, separated by
``;``: ``kill:rank=1,step=30`` (SIGKILL at the start of step 30), ``kill:rank=1,step=30,at=sync``
(at the first outer step from step 30 on, after the quorum, before the all-reduce),
``at=commit`` (after the all-reduce, before voting), ``hang:rank=1,step=30,seconds=20``,
``corrupt:rank=2`` (the next state replica 2 receives has one byte flipped). ``rank`` is the
replica id (a worker's rank at the start); kills and hangs apply to a replica's first
incarnation unless ``incarnation=I`` names another (its I-th restart), so a restarted worker
does not die again by accident.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field

import torch

FAULT_KINDS = ("kill", "hang", "corrupt")
FAULT_POINTS = ("step", "sync", "commit")
log = logging.getLogger("lowband.fault.elastic")


@dataclass(frozen=True)
class Fault:
    kind: str
    replica: int
    step: int = 0
    at: str = "step"
    seconds: float = 30.0
    incarnation: int = 0  # kills and hangs: the incarnation they apply to (0: the first start)


def parse_faults(text: str) -> tuple[Fault, ...]:
    """``"kill:rank=1,step=30;corrupt:rank=2"`` -> faults; bad input raises one line."""
    faults = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kind, _, rest = part.partition(":")
        opts = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
        if kind not in FAULT_KINDS or "rank" not in opts or opts.get("at", "step") not in FAULT_POINTS:
            raise ValueError(f"bad LOWBAND_FAULT {part!r}: use kill|hang|corrupt:rank=R[,step=S][,at=step|sync|commit]"
                             "[,seconds=T][,incarnation=I]")
        faults.append(Fault(kind, int(opts["rank"]), int(opts.get("step", 0)), opts.get("at", "step"),
                            float(opts.get("seconds", 30.0)), int(opts.get("incarnation", 0))))
    return tuple(faults)


@dataclass
class FaultPlan:
    """The faults that apply to this process (replica, incarnation)."""

    faults: list[Fault] = field(default_factory=list)

    @classmethod
    def from_env(cls, replica: int, incarnation: int) -> "FaultPlan":
        faults = parse_faults(os.environ.get("LOWBAND_FAULT", ""))
        return cls([f for f in faults if f.replica == replica and (f.kind == "corrupt" or incarnation == f.incarnation)])

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
