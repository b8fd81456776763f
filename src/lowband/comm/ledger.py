"""The per-rank ledger: every communication operation with its exact bytes and times.

The ledger is what every byte figure in lowband comes from. Each record holds the
operation, a free-form ``tag`` (what was sent: ``grads``, ``outer``, ``init``), the payload
size, the bytes this rank sent and received under the collective's algorithm (see
:mod:`lowband.net.cost`), the participants, when it started and ended on the link, and
the training step during which it was issued (``Ledger.step`` at submission; 0 before the
first step, e.g. the initial broadcast) and the step in which the training thread waited for it
(``waited``: the issue step for a blocking op, a later one for an overlapped mean; 0 when no
training thread waited, e.g. an op of the gossip thread, or a ledger older than the field). :mod:`lowband.predict.schedule` reads this schedule and :mod:`lowband.predict.simulate` replays it.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable


@dataclass(frozen=True)
class Record:
    op: str
    tag: str
    payload: int  # bytes of the tensor(s) handed to the collective
    sent: int  # bytes this rank put on its link
    received: int  # bytes this rank took off its link
    peers: int  # ranks taking part
    start: float  # perf_counter when the op began on the link
    end: float  # perf_counter when it completed (emulated delay included)
    modelled: float  # seconds the cost model charges
    step: int = 0  # training step that issued it (0: before the first step, or a ledger older than the field)
    waited: int = 0  # training step whose thread waited for it (0: none did, or unknown)

    def to_dict(self) -> dict:
        """A JSON-ready dict; ``step`` and ``waited`` are left out when 0, so such dicts match older ledgers'."""
        out = asdict(self)
        for key in ("step", "waited"):
            if not out[key]:
                del out[key]
        return out


@dataclass
class Ledger:
    """Thread-safe list of :class:`Record` plus running totals.

    ``step`` is the training step in progress; the training loop sets it at the start of every
    step and :class:`~lowband.comm.Comm` copies it into each record when the op is submitted.
    """

    records: list[Record] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    step: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, record: Record) -> int:
        """Append ``record``; its index (for :meth:`mark_waited`)."""
        with self._lock:
            self.records.append(record)
            self.bytes_sent += record.sent
            self.bytes_received += record.received
            return len(self.records) - 1

    def mark_waited(self, indices: Iterable[int], step: int) -> None:
        """Stamp the records at ``indices`` as waited for by the training thread at ``step`` (the first
        wait counts: a record already stamped keeps its step)."""
        with self._lock:
            for i in indices:
                if 0 <= i < len(self.records) and not self.records[i].waited:
                    self.records[i] = replace(self.records[i], waited=step)

    def __len__(self) -> int:
        return len(self.records)

    def by_tag(self) -> dict[str, int]:
        """Bytes sent per tag."""
        totals: dict[str, int] = {}
        with self._lock:
            for r in self.records:
                totals[r.tag] = totals.get(r.tag, 0) + r.sent
        return totals

    def state_dict(self) -> dict:
        with self._lock:
            return {"records": [r.to_dict() for r in self.records]}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self.records = [Record(**r) for r in state["records"]]
            self.bytes_sent = sum(r.sent for r in self.records)
            self.bytes_received = sum(r.received for r in self.records)
