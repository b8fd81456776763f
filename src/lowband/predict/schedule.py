"""The schedule of a measured run: what :mod:`lowband.predict.simulate` replays.

A run folder holds, per algorithm and rank, the compute and blocked-communication seconds
of every step and a ledger of every operation (with the step that issued it).
:func:`build_trace` reduces them to a :class:`Trace`:

1. Each non-``init`` op keeps its issue step, the earliest over ranks (an aggregator thread
   may submit it after the step that asked for it ended; ledgers older than the ``step``
   field: the ops are spread evenly over the steps, op ``k`` of ``K`` at step
   ``ceil((k + 1) S / K)``).
2. An op is *blocking* when the training thread waited for it in its own step; any other op is
   *asynchronous* (delayed/eager/streaming DiLoCo, CO2) and must be complete by its *wait step*.
   A ledger row records the step whose training thread waited for it (``waited``, stamped by
   ``Handle.wait`` / ``PendingMean.wait``): blocking when that is its issue step, else that is the
   wait step. A row without it (an op no training thread waited for, or an older ledger) is
   inferred from timings: blocking when the step's ``comm_s`` covers at least
   ``BLOCKING_FRACTION`` of the summed durations (``end - start``) of the ops issued at that
   step, up to and including this one; else waited at the first later step whose ``comm_s`` is
   non-zero (``finish()`` at the last step at the latest). Over ranks: blocking on at least
   half of them, the earliest wait step.
3. Per op, ``overhead`` is what the op took beyond its modelled time on the rank that waited
   least for the others (gloo over loopback, thread hand-offs); the simulator carries it over.

:data:`COSTS` prices each ledger op for ``N`` ranks on a uniform link with the formulas of
:mod:`lowband.net.cost` (:func:`op_cost`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from lowband.comm.two_phase import SHARDS, prefer
from lowband.net import cost
from lowband.net.link import Link

BLOCKING_FRACTION = 0.8
"""An op is blocking if its step's ``comm_s`` covers this share of the ops' durations."""

LedgerRow = dict[str, Any]


@dataclass(frozen=True)
class RankLog:
    """What one rank of one algorithm measured: per-step seconds and its ledger rows."""

    compute_s: tuple[float, ...]
    comm_s: tuple[float, ...]
    time_s: float  # the step clock after the last step
    bytes_sent: float  # ledger total after the last step (initial broadcast included)
    ledger: tuple[LedgerRow, ...] = ()

    def __post_init__(self) -> None:
        if len(self.compute_s) != len(self.comm_s):
            raise ValueError(f"compute_s has {len(self.compute_s)} steps but comm_s {len(self.comm_s)}")
        if not self.compute_s:
            raise ValueError("a rank log needs at least one step")


@dataclass(frozen=True)
class Op:
    """One operation of the schedule; byte figures are means over the measured ranks."""

    op: str
    tag: str
    payload: int
    sent: float
    received: float
    step: int  # issue step, 1-based
    modelled: float
    overhead: float  # measured seconds beyond ``modelled`` (min over ranks)
    blocking: bool
    wait_step: int  # the step by which it must be complete (== step when blocking)
    peers: int = 0  # ranks that took part when it was recorded (0: unknown)

    def __post_init__(self) -> None:
        if self.op not in COSTS:
            raise ValueError(f"no cost formula for op {self.op!r}; known: {', '.join(COSTS)}")
        if not 1 <= self.step <= self.wait_step:
            raise ValueError(f"op issued at step {self.step} cannot be waited for at step {self.wait_step}")


@dataclass(frozen=True)
class Trace:
    """One algorithm of a measured run, reduced to what the simulator needs."""

    label: str
    params: int
    link: Link  # the measured bottleneck link
    compute: tuple[tuple[float, ...], ...]  # [rank][step]
    ops: tuple[Op, ...]
    init_ops: tuple[Op, ...]
    wall_clock_s: float
    bytes_sent_per_worker: float
    compute_s: float  # mean over ranks
    comm_s: float  # mean over ranks of the blocked seconds
    # mean neighbours per worker at n workers (gossip's topology); None: a sendrecv's peers do not
    # depend on the world size (pairs)
    neighbours: Callable[[int], float] | None = None
    speeds: tuple[float, ...] | None = None  # each rank's --worker-speed in the measured run (None: all 1)
    # from the algorithm's CommPlan (lowband.algorithms.commplan): tag -> bucket bytes of the ops it splits
    # (bucket_mb), the tags of gradient averages filled during backward, those that may go two-phase (with the
    # bytes of a requantised shard per byte of the first quantisation: 1, or more with a finer ``requant``)
    buckets: Mapping[str, float] = field(default_factory=dict)
    backward_tags: frozenset[str] = frozenset()
    two_phase: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.params < 1:
            raise ValueError(f"params must be >= 1, got {self.params}")
        if self.speeds is not None and len(self.speeds) != len(self.compute):
            raise ValueError(f"{len(self.speeds)} worker speeds for {len(self.compute)} measured ranks")
        if not self.compute or len({len(c) for c in self.compute}) != 1:
            raise ValueError("compute needs the same number (>= 1) of steps on every rank")

    @property
    def ranks(self) -> int:
        return len(self.compute)

    @property
    def steps(self) -> int:
        return len(self.compute[0])


# ----------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class Pricing:
    """How ops are priced at the target: ``n`` ranks on ``link``, payloads ``scale`` times larger, all-reduces
    by ``allreduce`` (a key of :data:`lowband.net.cost.ALL_REDUCES`), the buckets of a :class:`Trace`."""

    n: int
    link: Link
    scale: float = 1.0
    allreduce: str = "auto"
    buckets: Mapping[str, float] = field(default_factory=dict)
    two_phase: Mapping[str, float] = field(default_factory=dict)


CostFn = Callable[[Op, Pricing, float], tuple[list[float], float]]


def _priced(kind: str, size: float, p: Pricing, bucket: float = math.inf) -> tuple[list[float], float]:
    parts = cost.buckets(kind, size, p.n, p.link, bucket, p.allreduce)
    return [t.seconds for t in parts], float(sum(t.sent for t in parts))


def _all_reduce(op: Op, p: Pricing, scale: float) -> tuple[list[float], float]:
    return _priced("all_reduce", op.payload * scale, p, p.buckets.get(op.tag, math.inf))


def _all_gather(op: Op, p: Pricing, scale: float) -> tuple[list[float], float]:
    if op.tag.endswith(SHARDS) and op.peers:  # a two-phase mean's shards: 1/n of the tensor each
        scale *= op.peers / p.n
    size = op.payload * scale
    if op.tag in p.two_phase and prefer(round(size), p.n, p.link):  # the Aggregator's choice at n ranks
        scatter, a = _priced("all_to_all", size, p)
        shards, b = _priced("all_gather", math.ceil(size * p.two_phase[op.tag] / p.n), p)
        return scatter + shards, a + b
    return _priced("all_gather", size, p, p.buckets.get(op.tag, math.inf))


def _broadcast(op: Op, p: Pricing, scale: float) -> tuple[list[float], float]:
    size = round(op.payload * scale)
    t = cost.gloo_broadcast(size, p.n, p.link, 0, 0)
    return [t.seconds], size * (p.n - 1) / p.n  # the binomial tree's n - 1 sends, averaged over ranks


def _point_to_point(op: Op, p: Pricing, scale: float) -> tuple[list[float], float]:
    t = cost.point_to_point(round(op.payload * scale), p.link, sending=True)
    return [t.seconds], op.sent * scale  # the pair's bytes do not depend on the world size


def _all_to_all(op: Op, p: Pricing, scale: float) -> tuple[list[float], float]:
    return _priced("all_to_all", op.payload * scale, p)


def _neighbor_exchange(op: Op, p: Pricing, scale: float) -> tuple[list[float], float]:
    t = cost.neighbor_exchange(round(op.sent * scale), round(op.received * scale), p.link)
    return [t.seconds], op.sent * scale  # a fixed number of neighbours, whatever n is


COSTS: dict[str, CostFn] = {
    "all_reduce": _all_reduce, "all_gather": _all_gather, "broadcast": _broadcast,
    "send": _point_to_point, "recv": _point_to_point, "all_to_all": _all_to_all,
    "sendrecv": _neighbor_exchange,
}
"""Ledger op name -> ``(op, pricing, payload scale) -> (seconds of each bucket, mean bytes sent per rank)``."""


def op_parts(op: Op, pricing: Pricing) -> tuple[list[float], float]:
    """Seconds of each of ``op``'s collectives (without overhead; a scaled op re-split into its tag's
    buckets, each its cheapest algorithm: :func:`lowband.net.cost.buckets`, as ``lowband plan`` charges)
    and mean bytes sent per rank (``*.sizes`` metadata unscaled)."""
    return COSTS[op.op](op, pricing, 1.0 if op.tag.endswith(".sizes") else pricing.scale)


def op_cost(op: Op, n: int, link: Link, payload_scale: float, **pricing: Any) -> tuple[float, float]:
    """Seconds (without overhead) and mean bytes sent per rank of ``op`` for ``n`` ranks on ``link`` with
    payloads ``payload_scale`` times larger (``pricing``: the other fields of :class:`Pricing`)."""
    seconds, sent = op_parts(op, Pricing(n, link, payload_scale, **pricing))
    return sum(seconds), sent


# ----------------------------------------------------------------------------- schedule


def build_trace(label: str, params: int, link: Link, ranks: Sequence[RankLog],
                neighbours: Callable[[int], float] | None = None) -> Trace:
    """Reduce the per-rank logs of one algorithm to a :class:`Trace` (see the module doc)."""
    if not ranks:
        raise ValueError(f"{label}: no rank logged a step")
    steps = min(len(r.compute_s) for r in ranks)
    logs = [_issue_steps(r, steps) for r in ranks]  # per rank: [(row, step)] of non-init ops, and init rows
    reference = logs[0][0]
    aligned = all(len(log[0]) == len(reference) and
                  all(a["op"] == b["op"] for (a, _), (b, _) in zip(log[0], reference)) for log in logs)
    peers = logs if aligned else logs[:1]  # ranks whose op k is the same collective as rank 0's
    votes = [_classify(ops, r.comm_s[:steps]) for (ops, _), r in zip(peers, ranks)]
    ops = []
    for k, (row, _) in enumerate(reference):
        rows = [log[0][k][0] for log in peers]
        step = min(log[0][k][1] for log in peers)  # a background thread may submit after its step ended
        blocking = 2 * sum(v[k][0] for v in votes) >= len(votes)
        wait = step if blocking else min(v[k][1] for v in votes)
        ops.append(Op(op=row["op"], tag=str(row.get("tag", "")), payload=int(row["payload"]),
                      sent=_mean([float(r["sent"]) for r in rows]),
                      received=_mean([float(r["received"]) for r in rows]), step=step,
                      modelled=float(row["modelled"]),
                      overhead=max(0.0, min(_duration(r) - float(r["modelled"]) for r in rows)),
                      blocking=blocking, wait_step=max(wait, step), peers=int(row.get("peers", 0))))
    init_rows = [log[1] for log in logs]
    init_ops = tuple(Op(op=row["op"], tag=str(row.get("tag", "")), payload=int(row["payload"]),
                        sent=_mean([float(rs[k]["sent"]) for rs in init_rows if len(rs) > k]),
                        received=float(row["received"]), step=1, modelled=float(row["modelled"]),
                        overhead=0.0, blocking=True, wait_step=1)
                     for k, row in enumerate(init_rows[0]))
    return Trace(
        label=label, params=params, link=link, compute=tuple(tuple(r.compute_s[:steps]) for r in ranks),
        ops=tuple(ops), init_ops=init_ops, wall_clock_s=max(r.time_s for r in ranks),
        bytes_sent_per_worker=_mean([r.bytes_sent for r in ranks]),
        compute_s=_mean([sum(r.compute_s) for r in ranks]), comm_s=_mean([sum(r.comm_s) for r in ranks]),
        neighbours=neighbours)


def _issue_steps(rank: RankLog, steps: int) -> tuple[list[tuple[LedgerRow, int]], list[LedgerRow]]:
    """``([(row, issue step)] of step ops, [init rows])``; without ``step`` fields: spread evenly."""
    has_steps = any("step" in row for row in rank.ledger)
    init = [row for row in rank.ledger if row.get("tag") == "init" or (has_steps and not row.get("step"))]
    skip = {id(row) for row in init}
    body = [row for row in rank.ledger if id(row) not in skip]
    if has_steps:
        return [(row, min(max(int(row["step"]), 1), steps)) for row in body], init
    count = len(body)
    return [(row, max(1, math.ceil((k + 1) * steps / count))) for k, row in enumerate(body)], init


def _classify(ops: list[tuple[LedgerRow, int]], comm_s: Sequence[float]) -> list[tuple[bool, int]]:
    """Per op of one rank: ``(blocking, wait step)`` from the rank's per-step blocked seconds."""
    steps = len(comm_s)
    next_wait = [steps] * (steps + 2)  # next_wait[t]: first step > t with a wait (else the last step)
    for t in range(steps - 1, 0, -1):
        next_wait[t] = t + 1 if comm_s[t] > 0 else next_wait[t + 1]
    out: list[tuple[bool, int]] = []
    issued = 0.0  # durations of the ops issued so far at the current step
    current = 0
    for row, step in ops:
        if step != current:
            issued, current = 0.0, step
        issued += _duration(row)
        waited = int(row.get("waited", 0))
        if waited:  # the ledger says when the training thread waited for it
            out.append((waited <= step, max(waited, step)))
            continue
        blocking = comm_s[step - 1] >= BLOCKING_FRACTION * issued
        out.append((blocking, step if blocking else next_wait[step]))
    return out


def _duration(row: LedgerRow) -> float:
    return max(0.0, float(row["end"]) - float(row["start"]))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
