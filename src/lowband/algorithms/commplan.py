"""An algorithm's communication, as the planner charges it: :class:`Sync` events of a :class:`Setup`.

Every registered algorithm declares its own plan (``Algorithm.comm_plan(options, setup)``, next to
the code that communicates) from the events here; every compressor its own bytes
(:meth:`lowband.compress.Compressor.wire_bytes`). :mod:`lowband.predict.plan` turns the events into
seconds and bytes over a budget of steps (docs/planner.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lowband.comm.two_phase import SHARDS, prefer
from lowband.compress import COMPRESSORS
from lowband.net import cost
from lowband.net.cost import Transfer
from lowband.net.link import Link
from lowband.registry import parse_spec

ALL_REDUCES = cost.ALL_REDUCES  # 'auto' (the cheapest per bucket), or one algorithm for every all-reduce
OTHER_COLLECTIVES = cost.PROJECTED  # all_gather, all_to_all, neighbours: each its cheapest algorithm


@dataclass(frozen=True)
class Setup:
    """What is planned: model size, workers, their (bottleneck) link, seconds per step, steps."""

    params: int
    workers: int
    link: Link
    step_time: float
    steps: int
    allreduce: str = "auto"  # how all-reduces are charged: a key of ALL_REDUCES (lowband's emulation runs "ring")
    matrix_side: int = 0  # side d of the d x d weight matrices (0: estimated from params)
    backward: float = 0.0  # share of step_time that is backward, hiding buckets of backward syncs (0: after it)

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) for v in (self.params, self.workers, self.steps, self.matrix_side)):
            raise ValueError("params, workers, steps and matrix_side must be ints (int(7e9), not 7e9)")
        if min(self.params, self.workers, self.steps) < 1:
            raise ValueError(f"params, workers and steps must be >= 1, got {self.params}, {self.workers}, {self.steps}")
        if not self.step_time > 0:
            raise ValueError(f"step time must be > 0 seconds, got {self.step_time}")
        if self.allreduce not in ALL_REDUCES:
            raise ValueError(f"unknown all-reduce {self.allreduce!r}; choose one of: {', '.join(ALL_REDUCES)}")
        if self.matrix_side < 0:
            raise ValueError(f"matrix side must be >= 0 (0: estimate), got {self.matrix_side}")
        if not 0 <= self.backward < 1:
            raise ValueError(f"backward share of the step must be in [0, 1), got {self.backward}")

    @property
    def side(self) -> int:
        """d: given, or GPT-shaped (params ~ 12 L d^2 with L ~ d / 128), never more than sqrt(params)."""
        d = self.matrix_side or round((128 * self.params / 12) ** (1 / 3))
        return max(1, min(d, math.isqrt(self.params)))


@dataclass(frozen=True)
class Sync:
    """One kind of communication event: ``nbytes`` per rank (all-gather: one rank's part;
    neighbours: to each), ``rounds`` collectives of it (PowerSGD: P then Q) in chunks of at most
    ``chunk_bytes``, every ``every`` steps in [start, stop), or once at the end. ``backward``: the
    buckets are filled during the step's backward and may go as they fill (DDP's overlap)."""

    label: str
    collective: str  # 'all_reduce' or a key of OTHER_COLLECTIVES
    nbytes: float
    every: float = 1.0
    peers: int | None = None  # neighbours of a 'neighbours' exchange (None: all ranks take part)
    rounds: int = 1
    chunk_bytes: float = math.inf
    overlap_steps: float = 0.0  # steps of compute the event can hide behind (0: blocking)
    start: int = 0
    stop: int | None = None
    at_end: bool = False
    backward: bool = False

    def __post_init__(self) -> None:
        if self.collective != "all_reduce" and self.collective not in OTHER_COLLECTIVES:
            raise ValueError(f"unknown collective {self.collective!r}")
        if self.nbytes < 0 or not self.every > 0 or self.rounds < 1 or not self.chunk_bytes > 0:
            raise ValueError(f"sync {self.label!r}: need nbytes >= 0, every > 0, rounds >= 1, chunk_bytes > 0")
        if self.overlap_steps < 0 or self.start < 0:
            raise ValueError(f"sync {self.label!r}: overlap_steps and start must be >= 0")

    def events(self, steps: int) -> int:
        """How many times it happens in ``steps`` steps."""
        if self.at_end:
            return 1
        end = steps if self.stop is None else min(self.stop, steps)
        return max(0, math.floor((end - self.start) / self.every + 1e-9))

    def parts(self, setup: Setup) -> list[Transfer]:
        """One event's collectives in order: ``rounds`` x its ``chunk_bytes`` buckets, each priced by
        :func:`lowband.net.cost.buckets` (what ``lowband simulate`` charges a ledger op too)."""
        n = setup.workers if self.peers is None else self.peers
        return self.rounds * cost.buckets(self.collective, self.nbytes, n, setup.link, self.chunk_bytes,
                                          setup.allreduce)

    def transfer(self, setup: Setup) -> Transfer:
        """One event: its collectives one after the other, seconds and bytes summed."""
        parts = self.parts(setup)
        return Transfer(sum(t.seconds for t in parts), sum(t.sent for t in parts), sum(t.received for t in parts))

    def exposed(self, setup: Setup) -> float:
        """Seconds of one event that no compute hides: beyond its overlap window, or, for a backward
        sync, past the end of backward (:func:`lowband.net.cost.behind_backward`)."""
        parts = self.parts(setup)
        if self.backward and setup.backward > 0:
            window = setup.backward * setup.step_time
            return max(0.0, cost.behind_backward([t.seconds for t in parts], window) - window)
        return max(0.0, sum(t.seconds for t in parts) - self.overlap_steps * setup.step_time)


@dataclass(frozen=True)
class Wire:
    """What ``numel`` elements become: bytes per round, and whether ranks' payloads can be summed."""

    rounds: tuple[float, ...]
    summable: bool
    fixed_size: bool = True
    requantizable: bool = False  # may take the two-phase reduce-scatter (lowband.comm.two_phase)


def wire(spec: str, numel: int, side: int) -> Wire:
    """Bytes on the wire for ``numel`` fp32 elements through compressor ``spec`` ('qsgd:bits=4'):
    the compressor's own model (:meth:`lowband.compress.Compressor.wire_bytes`)."""
    cls, kwargs = parse_spec(spec, COMPRESSORS)
    options = cls.Options(**kwargs)
    summable = cls(options).summable  # per instance: lgreco's is its family's
    return Wire(cls.wire_bytes(options, numel, side), summable, cls.fixed_size, cls.requantizable)


def two_phase_capable(o: Any) -> bool:
    """Whether an Aggregator with options ``o`` may take the two-phase path (lowband.comm.two_phase):
    a requantizable compressor under a plain mean; it does where :func:`prefer` says so."""
    plain = getattr(o, "aggregate", "mean") == "mean" and not getattr(o, "checksum", False) and \
        getattr(o, "attack", "none") == "none"
    return plain and bool(parse_spec(o.compress, COMPRESSORS)[0].requantizable)


def average(o: Any, setup: Setup, label: str, every: float, overlap: float = 0.0,
            fraction: float = 1.0, backward: bool = False) -> tuple[Sync, ...]:
    """An Aggregator mean of ``fraction`` of the parameters through ``o.compress`` (``backward``: a
    gradient average whose buckets may go during backward, as DDP's)."""
    w = wire(o.compress, round(setup.params * fraction), setup.side)
    if two_phase_capable(o) and prefer(round(w.rounds[0]), setup.workers, setup.link):  # as the Aggregator
        shards = wire(o.requant, round(setup.params * fraction), setup.side) if getattr(o, "requant", "") else w
        return (Sync(label, "all_to_all", w.rounds[0], every, chunk_bytes=math.inf, overlap_steps=overlap),
                Sync(label + SHARDS, "all_gather", shards.rounds[0] / setup.workers, every, chunk_bytes=math.inf,
                     overlap_steps=overlap))
    kind = "all_reduce" if w.summable else "all_gather"
    syncs = [Sync(label, kind, w.rounds[0], every, rounds=len(w.rounds), chunk_bytes=o.bucket_mb * 1e6,
                  overlap_steps=overlap, backward=backward)]
    if not w.fixed_size:  # one small all-gather of the payload sizes first
        syncs.append(Sync(f"{label}.sizes", "all_gather", 8, every, overlap_steps=overlap))
    return tuple(syncs)


def exchange(o: Any, s: Setup, every: int, degree: int) -> tuple[Sync, ...]:
    """The fp32 model to ``degree`` peers every ``every`` steps, plus the optional final merge."""
    merge = (Sync("merge", "all_reduce", 4.0 * s.params, at_end=True),) if o.merge_at_end else ()
    return (Sync("peers", "neighbours", 4.0 * s.params, every, peers=degree),) + merge
