"""``lowband plan``: predicted wall-clock and bytes of every algorithm, before training anything.

:data:`PLANS` gives each registered algorithm a :class:`CommPlan`, built from the model size,
the workers and the algorithm's own ``Options`` (H, fragments, tau, freeze_step, topology,
compress, bucket_mb): :class:`Sync` events, each a collective of :mod:`lowband.net.cost` with
its bytes, period, ``bucket_mb`` chunks and overlap window. Over T steps of ``step_time``::

    exposed = max(sum of max(0, event seconds - overlap window), link seconds - compute)
    wall = compute + exposed,   utilisation = compute / wall

It predicts time and bytes, not loss; the recommendation is the fastest row the project
measured within :data:`CONVERGED_WITHIN` of ddp's validation loss (docs/planner.md)::

    rows = plan_rows(Setup(params=7 * 10**9, workers=64, link=Link(1.25e8, 0.03), step_time=0.8, steps=10_000))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from lowband.algorithms import ALGORITHMS
from lowband.algorithms.gossip import neighbours
from lowband.algorithms.onebit_adam import padded_numel
from lowband.compress import COMPRESSORS
from lowband.compress.indices import index_nbytes
from lowband.compress.sketch import sketch_size
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
DDP_COMPRESSORS = ("identity", "fp16", "qsgd:bits=4", "powersgd:rank=4", "topk:ratio=0.01")
CONVERGED_WITHIN = 0.10  # recommend only rows measured within 10% of ddp's final validation loss


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
class CommPlan:
    """An algorithm's communication: its events, and the compressor its averages go through."""

    algorithm: str
    compress: str
    syncs: tuple[Sync, ...]

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"no registered algorithm {self.algorithm!r}")


@dataclass(frozen=True)
class Measured:
    """Final validation loss of a row and of ddp in the same project benchmark."""

    loss: float
    ddp_loss: float
    source: str

    def __post_init__(self) -> None:
        if not (self.loss > 0 and self.ddp_loss > 0):
            raise ValueError("measured losses must be > 0")

    @property
    def excess(self) -> float:
        return self.loss / self.ddp_loss - 1


_LOCAL, _COMP, _ASYNC = "docs/local-updates.md", "docs/compression.md", "docs/decentralized.md"
MEASURED: dict[str, Measured] = {  # char-GPT runs on 2-4 workers: see docs/planner.md
    "ddp": Measured(2.087, 2.087, _LOCAL), "diloco": Measured(2.256, 2.087, _LOCAL),
    "localsgd": Measured(2.298, 2.087, _LOCAL), "qsr": Measured(2.197, 2.087, _LOCAL),
    "streaming-diloco": Measured(2.217, 2.087, _LOCAL), "eager-diloco": Measured(2.485, 2.087, _LOCAL),
    "delayed-diloco": Measured(2.541, 2.087, _LOCAL),
    "ddp+fp16": Measured(2.451, 2.451, _COMP), "ddp+bf16": Measured(2.451, 2.451, _COMP),
    "ddp+int8": Measured(2.444, 2.451, _COMP), "ddp+qsgd:bits=4": Measured(2.450, 2.451, _COMP),
    "ddp+powersgd:rank=2": Measured(2.870, 2.451, _COMP), "ddp+topk:ratio=0.01": Measured(2.644, 2.451, _COMP),
    "ddp+sign": Measured(2.513, 2.451, _COMP), "ddp+terngrad": Measured(2.486, 2.451, _COMP),
    "ddp+dgc:ratio=0.01": Measured(2.660, 2.451, _COMP), "ddp+randomk:ratio=0.01": Measured(2.872, 2.451, _COMP),
    "onebit-adam": Measured(2.048, 2.087, _ASYNC), "dist-lion": Measured(2.282, 2.087, _ASYNC),
    "co2": Measured(2.492, 2.087, _ASYNC), "noloco": Measured(2.325, 2.087, _ASYNC),
    "gossip": Measured(2.297, 2.087, _ASYNC),
    "ddp+sketch:ratio=0.01": Measured(2.724, 2.513, "docs/algorithms/sketch.md"),  # 2 workers, 150 steps
}


# ----------------------------------------------------------------------------- wire sizes
@dataclass(frozen=True)
class Wire:
    """What ``numel`` elements become: bytes per round, and whether ranks' payloads can be summed."""

    rounds: tuple[float, ...]
    summable: bool
    fixed_size: bool = True


WireModel = Callable[[Any, int, int], tuple[float, ...]]  # (compressor options, numel, side) -> bytes per round


def _per_matrix(per: Callable[[Any, int, int], float]) -> WireModel:
    """Apply a per-tensor byte count to d x d matrices (the last one partial)."""
    def model(o: Any, numel: int, d: int) -> tuple[float, ...]:
        full, rest = divmod(numel, d * d)
        return (full * per(o, d * d, d) + (per(o, rest, d) if rest else 0),)
    return model


def _powersgd(o: Any, numel: int, d: int) -> tuple[float, ...]:
    r = min(d, o.rank)
    if d * d / (2 * d * r) <= o.min_compression_rate:
        return (4.0 * numel,)  # the compressor sends such tensors raw
    return (numel / (d * d) * 4 * r * d,) * 2  # P (d x r) then Q (d x r), fp32


def _threshold(o: Any, numel: int, d: int) -> tuple[float, ...]:
    raise ValueError(f"threshold:tau={o.tau} sends a data-dependent count: plan it as topk:ratio=R")


def _sparse(o: Any, n: int, d: int) -> float:
    k = o.count(n) if hasattr(o, "count") else max(1, round(o.ratio * n))
    return 4 * k + index_nbytes(n, k)


WIRES: dict[str, WireModel] = {
    "identity": lambda o, n, d: (4.0 * n,), "fp16": lambda o, n, d: (2.0 * n,),
    "bf16": lambda o, n, d: (2.0 * n,),
    "int8": _per_matrix(lambda o, n, d: n + 8 * (math.ceil(n / o.chunk) if o.chunk else 1)),
    "qsgd": _per_matrix(lambda o, n, d: 4 * math.ceil(n / (o.bucket or n)) + math.ceil(n * o.bits / 8)),
    "sign": _per_matrix(lambda o, n, d: math.ceil(n / 8) + 4),
    "terngrad": _per_matrix(lambda o, n, d: math.ceil(n / 4) + 4),
    "topk": _per_matrix(_sparse), "dgc": _per_matrix(_sparse),
    "randomk": _per_matrix(lambda o, n, d: 4 * o.count(n)),
    "powersgd": _powersgd, "threshold": _threshold,
    "sketch": _per_matrix(lambda o, n, d: 4 * sketch_size(n, o)),
}


def wire(spec: str, numel: int, side: int) -> Wire:
    """Bytes on the wire for ``numel`` fp32 elements through compressor ``spec`` ('qsgd:bits=4')."""
    cls, kwargs = parse_spec(spec, COMPRESSORS)
    if cls.name not in WIRES:
        raise ValueError(f"compressor {cls.name!r} has no wire model in lowband.net.plan.WIRES: add one")
    rounds = WIRES[cls.name](cls.Options(**kwargs), numel, side)
    return Wire(rounds, cls.summable, getattr(cls, "fixed_size", True))


# ----------------------------------------------------------------------------- algorithms
PlanBuilder = Callable[[Any, Setup], tuple[Sync, ...]]  # (the algorithm's Options, setup) -> its events


def average(o: Any, setup: Setup, label: str, every: float, overlap: float = 0.0,
            fraction: float = 1.0) -> tuple[Sync, ...]:
    """An Aggregator mean of ``fraction`` of the parameters through ``o.compress``."""
    w = wire(o.compress, round(setup.params * fraction), setup.side)
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


def _onebit_adam(o: Any, s: Setup) -> tuple[Sync, ...]:
    """fp32 all-reduce of the gradients until freeze_step, then 1-bit chunks: all-to-all + all-gather."""
    chunk = padded_numel(s.params, s.workers) // (8 * s.workers) + 4  # packed signs + one fp32 scale
    return (Sync("grads", "all_reduce", 4.0 * s.params, stop=o.freeze_step),
            Sync("momentum.a2a", "all_to_all", float(s.workers * chunk), start=o.freeze_step),
            Sync("momentum.gather", "all_gather", float(chunk), start=o.freeze_step))


def _dion(o: Any, s: Setup) -> tuple[Sync, ...]:
    """Dion on d x d matrices: P then R (d r floats each per matrix) all-reduced every step, or the
    fp32 gradients when the factors are no smaller (embeddings and 1-D parameters counted as matrices)."""
    r = o.matrix_rank(s.side, s.side)
    if 2 * s.side * r >= s.side * s.side:
        return (Sync("grads", "all_reduce", 4.0 * s.params),)
    factors = 4.0 * s.params / s.side * r  # params / d^2 matrices, d r floats each
    return (Sync("dion.P", "all_reduce", factors), Sync("dion.R", "all_reduce", factors))


PLANS: dict[str, PlanBuilder] = {  # one small function per registered algorithm (see their docstrings)
    "ddp": lambda o, s: average(o, s, "grads", 1),  # every step, blocking
    "ddp-backup": lambda o, s: average(o, s, "grads", 1),  # as ddp: dropped ranks send zeros
    "diloco": lambda o, s: average(o, s, "outer", o.inner_steps),  # every H, blocking
    "localsgd": lambda o, s: average(o, s, "outer", o.inner_steps),
    "qsr": lambda o, s: average(o, s, "outer", o.h_base),  # its shortest period: an upper bound on traffic
    "delayed-diloco": lambda o, s: average(o, s, "outer", o.inner_steps, o.inner_steps),  # hidden by a round
    "eager-diloco": lambda o, s: average(o, s, "outer", o.inner_steps, o.inner_steps),
    "co2": lambda o, s: average(o, s, "outer", o.inner_steps, o.inner_steps if o.asynchronous else 0),
    "streaming-diloco": lambda o, s: average(o, s, "fragment", o.inner_steps / o.fragments, o.tau,
                                             1 / o.fragments),  # 1/P of the model every H/P, tau steps
    "dist-lion": lambda o, s: (Sync("signs", "all_gather", float(math.ceil(s.params / 8))),),
    "gossip": lambda o, s: exchange(o, s, o.period, max(map(len, neighbours(o.topology, s.workers)))),
    "noloco": lambda o, s: exchange(o, s, o.inner_steps, min(s.workers - 1, 2 if s.workers % 2 else 1)),
    "onebit-adam": _onebit_adam,
    "dion": _dion,
    "zo-onebyte": lambda o, s: (Sync("bytes", "all_gather", 1.0),),  # one byte per worker per step
}


def comm_plan(spec: str, setup: Setup, compress: str | None = None) -> CommPlan:
    """The :class:`CommPlan` of an algorithm spec ('diloco:inner_steps=50'), optionally with ``compress``."""
    cls, kwargs = parse_spec(spec, ALGORITHMS)
    if cls.name not in PLANS:
        raise ValueError(f"algorithm {cls.name!r} has no plan: register one in lowband.net.plan.PLANS")
    if compress is not None:
        kwargs["compress"] = compress
    options = cls.Options(**kwargs)
    return CommPlan(cls.name, getattr(options, "compress", "-"), PLANS[cls.name](options, setup))


# ----------------------------------------------------------------------------- prediction
@dataclass(frozen=True)
class Row:
    """The prediction for one algorithm and compressor over the whole budget."""

    label: str
    algorithm: str
    compress: str
    events: int
    sent_bytes: float
    comm_seconds: float
    exposed_seconds: float
    compute_seconds: float
    measured: Measured | None

    def __post_init__(self) -> None:
        if min(self.sent_bytes, self.comm_seconds, self.exposed_seconds, self.compute_seconds) < 0:
            raise ValueError(f"row {self.label!r}: negative time or bytes")

    @property
    def wall_seconds(self) -> float:
        return self.compute_seconds + self.exposed_seconds

    @property
    def utilisation(self) -> float:
        return self.compute_seconds / self.wall_seconds

    @property
    def converges(self) -> bool:
        """Measured within CONVERGED_WITHIN of ddp's final validation loss."""
        return self.measured is not None and self.measured.excess <= CONVERGED_WITHIN


def predict(label: str, plan: CommPlan, setup: Setup) -> Row:
    """Wall-clock, bytes and exposed communication of ``plan`` over ``setup.steps`` steps."""
    compute = setup.steps * setup.step_time
    events, sent, comm, exposed = 0, 0.0, 0.0, 0.0
    for sync in plan.syncs:
        count, t = sync.events(setup.steps), sync.transfer(setup)
        events, sent, comm = events + count, sent + count * t.sent, comm + count * t.seconds
        exposed += count * max(0.0, t.seconds - sync.overlap_steps * setup.step_time)
    exposed = max(exposed, comm - compute)  # one link: overlap cannot hide more than the compute
    return Row(label, plan.algorithm, plan.compress, events, sent, comm, exposed, compute, MEASURED.get(label))


def row_specs(algos: str | None = None, compressors: str | None = None) -> list[tuple[str, str | None]]:
    """(algorithm spec, compressor) per row: ``algos`` separated by ';' (default: every registered
    one); a ddp without its own ``compress`` gets one row per compressor (default DDP_COMPRESSORS)."""
    text = algos or ";".join(["ddp"] + [n for n in ALGORITHMS.names() if n != "ddp"])
    chosen = [c.strip() for c in (compressors or ";".join(DDP_COMPRESSORS)).split(";") if c.strip()]
    out: list[tuple[str, str | None]] = []
    for algo in filter(None, (a.strip() for a in text.split(";" if ";" in text or ":" in text else ","))):
        bare_ddp = algo.partition(":")[0].strip() == "ddp" and "compress=" not in algo
        out += [(algo, c) for c in chosen] if bare_ddp else [(algo, None)]
    return out


def plan_rows(setup: Setup, specs: Sequence[tuple[str, str | None]] | None = None) -> list[Row]:
    """One :class:`Row` per (algorithm spec, compressor); labels as lowband train's ('ddp+fp16')."""
    rows = []
    for spec, compress in row_specs() if specs is None else specs:
        plan = comm_plan(spec, setup, compress)
        own = getattr(ALGORITHMS.get(plan.algorithm).Options(), "compress", "-")
        rows.append(predict(spec if compress in (None, own) else f"{spec}+{compress}", plan, setup))
    return rows


def recommend(rows: Sequence[Row], baseline: Row) -> tuple[Row, str]:
    """The fastest row measured to converge close to ddp, and why (``baseline``: plain ddp)."""
    chosen = min((r for r in rows if r.converges), key=lambda r: r.wall_seconds, default=baseline)
    m = chosen.measured
    if chosen.label == baseline.label or m is None:
        return chosen, f"{chosen.label}: no faster row was measured within {CONVERGED_WITHIN:.0%} of ddp's loss"
    loss = f"measured val loss {round(m.excess, 3) + 0.0:+.1%} vs ddp ({m.source})"
    reason = (f"{chosen.label}: {baseline.wall_seconds / chosen.wall_seconds:.1f}x faster than ddp at "
              f"{chosen.sent_bytes / max(baseline.sent_bytes, 1):.1%} of its bytes; exposed comm "
              f"{chosen.exposed_seconds / chosen.wall_seconds:.0%}; {loss}")
    return chosen, reason
