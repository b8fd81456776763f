"""``lowband plan``: predicted wall-clock and bytes of every algorithm, before training anything.

Each registered algorithm declares its :class:`CommPlan` (``comm_plan``), built from the model size,
the workers and the algorithm's own ``Options`` (H, fragments, tau, freeze_step, topology,
compress, bucket_mb): :class:`Sync` events, each a collective of :mod:`lowband.net.cost` with
its bytes, period, ``bucket_mb`` buckets (each the cheapest algorithm for its size,
:func:`lowband.net.cost.buckets`, as ``lowband simulate`` prices a recorded op) and overlap
window. Over T steps of ``step_time``::

    exposed = max(sum of max(0, event seconds - overlap window), link seconds - compute)
    wall = compute + exposed,   utilisation = compute / wall

(the last event of an overlapped sync is exposed in full: training's end waits for it; with
``Setup.backward``, DDP's buckets go as backward fills them, :func:`lowband.net.cost.behind_backward`).

It predicts time and bytes, not loss; the recommendation is the fastest row the project
measured within :data:`CONVERGED_WITHIN` of ddp's validation loss (docs/planner.md)::

    rows = plan_rows(Setup(params=7 * 10**9, workers=64, link=Link(1.25e8, 0.03), step_time=0.8, steps=10_000))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lowband.algorithms import ALGORITHMS
from lowband.algorithms.commplan import ALL_REDUCES, Setup, Sync, wire  # noqa: F401  (re-exported)
from lowband.registry import parse_spec

DDP_COMPRESSORS = ("identity", "fp16", "qsgd:bits=4", "powersgd:rank=4", "topk:ratio=0.01")
CONVERGED_WITHIN = 0.10  # recommend only rows measured within 10% of ddp's final validation loss


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


def comm_plan(spec: str, setup: Setup, compress: str | None = None) -> CommPlan:
    """The :class:`CommPlan` of an algorithm spec ('diloco:inner_steps=50'), optionally with ``compress``."""
    cls, kwargs = parse_spec(spec, ALGORITHMS)
    if compress is not None:
        kwargs["compress"] = compress
    options = cls.Options(**kwargs)
    return CommPlan(cls.name, getattr(options, "compress", "-"), cls.comm_plan(options, setup))


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
        one = sync.exposed(setup)  # an overlapped event's last one has no compute left to hide behind
        exposed += count * one + (t.seconds - one if count and sync.overlap_steps > 0 else 0.0)
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
