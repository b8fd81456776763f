"""An algorithm's communication, as the planner charges it: :class:`Sync` events of a :class:`Setup`.

Every registered algorithm declares its own plan (``Algorithm.comm_plan(options, setup)``, next to
the code that communicates) from the events here; every compressor its own bytes
(:meth:`lowband.compress.Compressor.wire_bytes`). :mod:`lowband.predict.plan` turns the events into
seconds and bytes over a budget of steps (docs/planner.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from lowband.comm.two_phase import SHARDS, prefer
from lowband.compress import COMPRESSORS
from lowband.net import cost
from lowband.net.cost import Transfer
from lowband.net.link import Link
from lowband.registry import parse_spec

Collective = Callable[[int, int, Link], Transfer]  # (bytes, ranks or neighbours, link) -> one rank's cost
ALL_REDUCES: dict[str, Collective] = {
    "ring": cost.ring_all_reduce, "tree": cost.tree_all_reduce,  # tree: the root's bytes (the busiest)
    "halving-doubling": cost.halving_doubling_all_reduce, "parameter-server": cost.parameter_server,
}
OTHER_COLLECTIVES: dict[str, Collective] = {
    "all_gather": cost.ring_all_gather, "all_to_all": cost.all_to_all, "neighbours": cost.gossip_step,
}


@dataclass(frozen=True)
class Setup:
    """What is planned: model size, workers, their (bottleneck) link, seconds per step, steps."""

    params: int
    workers: int
    link: Link
    step_time: float
    steps: int
    allreduce: str = "ring"  # how all-reduces are charged: a key of ALL_REDUCES (lowband runs "ring")
    matrix_side: int = 0  # side d of the d x d weight matrices (0: estimated from params)

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

    @property
    def side(self) -> int:
        """d: given, or GPT-shaped (params ~ 12 L d^2 with L ~ d / 128), never more than sqrt(params)."""
        d = self.matrix_side or round((128 * self.params / 12) ** (1 / 3))
        return max(1, min(d, math.isqrt(self.params)))


@dataclass(frozen=True)
class Sync:
    """One kind of communication event: ``nbytes`` per rank (all-gather: one rank's part;
    neighbours: to each), ``rounds`` collectives of it (PowerSGD: P then Q) in chunks of at most
    ``chunk_bytes``, every ``every`` steps in [start, stop), or once at the end."""

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

    def transfer(self, setup: Setup) -> Transfer:
        """One event: ``rounds`` x chunks collectives, one after the other."""
        chunks = max(1, math.ceil(self.nbytes / self.chunk_bytes))
        fn = ALL_REDUCES[setup.allreduce] if self.collective == "all_reduce" else OTHER_COLLECTIVES[self.collective]
        one = fn(round(self.nbytes / chunks), setup.workers if self.peers is None else self.peers, setup.link)
        k = chunks * self.rounds
        return Transfer(k * one.seconds, k * one.sent, k * one.received)


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


def average(o: Any, setup: Setup, label: str, every: float, overlap: float = 0.0,
            fraction: float = 1.0) -> tuple[Sync, ...]:
    """An Aggregator mean of ``fraction`` of the parameters through ``o.compress``."""
    w = wire(o.compress, round(setup.params * fraction), setup.side)
    plain = getattr(o, "aggregate", "mean") == "mean" and not getattr(o, "checksum", False) and \
        getattr(o, "attack", "none") == "none"
    if w.requantizable and plain and prefer(round(w.rounds[0]), setup.workers, setup.link):  # as the Aggregator
        return (Sync(label, "all_to_all", w.rounds[0], every, chunk_bytes=math.inf, overlap_steps=overlap),
                Sync(label + SHARDS, "all_gather", w.rounds[0] / setup.workers, every, chunk_bytes=math.inf,
                     overlap_steps=overlap))
    kind = "all_reduce" if w.summable else "all_gather"
    syncs = [Sync(label, kind, w.rounds[0], every, rounds=len(w.rounds), chunk_bytes=o.bucket_mb * 1e6,
                  overlap_steps=overlap)]
    if not w.fixed_size:  # one small all-gather of the payload sizes first
        syncs.append(Sync(f"{label}.sizes", "all_gather", 8, every, overlap_steps=overlap))
    return tuple(syncs)


def exchange(o: Any, s: Setup, every: int, degree: int) -> tuple[Sync, ...]:
    """The fp32 model to ``degree`` peers every ``every`` steps, plus the optional final merge."""
    merge = (Sync("merge", "all_reduce", 4.0 * s.params, at_end=True),) if o.merge_at_end else ()
    return (Sync("peers", "neighbours", 4.0 * s.params, every, peers=degree),) + merge
