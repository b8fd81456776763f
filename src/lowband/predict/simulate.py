"""Project a measured run to another worker count, model size and network.

A run folder holds, per algorithm and rank, the compute and blocked-communication seconds
of every step and a ledger of every operation (with the step that issued it). The
simulator turns that into a *schedule* and replays it under the alpha-beta costs of
:mod:`lowband.net.cost` for the target configuration:

1. **Schedule** (:func:`lowband.predict.schedule.build_trace`): every op with its issue step,
   blocking or asynchronous (then with the step by which it must be complete), and the
   overhead it took beyond its modelled time, which is carried over unchanged.
2. **Compute**. A rank's step compute is ``compute_s`` scaled by ``compute_scale``
   (default ``params_target / params_measured``: FLOPs per token grow with the model, the
   per-worker batch is the same). At the measured worker count the measured per-rank
   sequences are replayed. At any other count, step ``t`` of rank ``r`` computes
   ``mean_t * u`` with ``mean_t`` the measured mean over ranks of step ``t`` (what all
   ranks share: warm-up, outer-step work, load on the machine) and ``u`` drawn
   independently per rank and step (seeded) from the pooled ratios
   ``compute[r][t] / mean_t`` (the rank-to-rank spread, mean 1). A collective starts when
   the *last* rank has issued it, so stragglers cost about ``E[max of N draws of u]`` per
   synchronisation (:func:`expected_max`, reported as the straggler factor); local-update
   methods pay the max of per-rank *sums* over a round, which is smaller. One measured rank
   gives no spread; a few measured steps give a coarse tail.
3. **Communication**. Payloads scale with ``params_target / params_measured`` (compressed
   ones too; ``*.sizes`` metadata does not) and are priced for ``N`` ranks on a uniform link
   by :func:`lowband.net.cost.buckets`, the function ``lowband plan`` prices its events with
   (:func:`lowband.predict.schedule.op_parts`): re-split into the algorithm's buckets, each the
   cheapest algorithm for its size (``Target.allreduce``), plus the
   op's measured overhead. The link carries one op at a time in issue order (as
   :class:`~lowband.comm.Comm`'s single communication thread does). A blocking op holds every rank
   until it ends; an asynchronous op runs behind compute and only the part of it still in
   flight at its wait step is exposed: ``max(0, cost - compute until the wait step)``.
   ``init`` ops (the initial broadcast, outside the step clock) count bytes once, no time.
4. **Output** (:class:`Projection`): wall-clock for the same number of steps (the slowest
   rank), bytes sent per worker, compute and exposed communication per rank (mean over
   ranks; exposed includes waiting for stragglers, as measured ``comm_s`` does) and
   utilisation = compute / (compute + exposed).

**Uneven workers** (``Target.speeds``, ``lowband simulate --worker-speed 1,1,0.5,0.25``): persistent
heterogeneity, a slow machine stays slow. A run trained with ``--worker-speed`` is first brought
back to full speed (rank r's compute times its speed, ``Trace.speeds``); target rank r's compute
is then divided by ``speeds[r % len(speeds)]`` (a pattern repeats over the target's workers).
A run trained with ``--budget speed`` (slow ranks do fewer inner steps) cannot be projected to
other speeds: its rounds are shaped by the speeds it ran with.

Not modelled: contention between
ops of different ranks on a shared fabric, neighbour-only synchronisation of gossip (a
``sendrecv`` is treated as a synchronisation point of all ranks), evaluation time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lowband.net.cost import ALL_REDUCES, behind_backward
from lowband.net.link import Link
from lowband.predict.schedule import Op, Pricing, Trace, op_parts

MAX_WORKERS = 10_240


@dataclass(frozen=True)
class Target:
    """The configuration to project to; ``compute_scale=None``: params / measured params."""

    workers: int
    bandwidth: float | None  # bytes/s, None: unlimited
    latency: float  # seconds per hop
    params: int
    compute_scale: float | None = None
    seed: int = 0
    speeds: tuple[float, ...] | None = None  # compute speed pattern over the target's ranks (None: all 1)
    allreduce: str = "auto"  # a key of lowband.net.cost.ALL_REDUCES: the cheapest per bucket, or one for all
    backward: float = 0.0  # share of a step's compute that is backward, hiding the buckets of backward tags

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be between 1 and {MAX_WORKERS}, got {self.workers}")
        if self.speeds is not None and (not self.speeds or any(not 0 < v <= 1 for v in self.speeds)):
            raise ValueError(f"--worker-speed values must be in (0, 1] (1: full speed), got {self.speeds}")
        if self.params < 1:
            raise ValueError(f"--params must be >= 1, got {self.params}")
        if self.compute_scale is not None and not self.compute_scale > 0:
            raise ValueError(f"--compute-scale must be > 0, got {self.compute_scale}")
        if self.allreduce not in ALL_REDUCES:
            raise ValueError(f"unknown all-reduce {self.allreduce!r}; choose one of: {', '.join(ALL_REDUCES)}")
        if not 0 <= self.backward < 1:
            raise ValueError(f"--overlap-backward must be in [0, 1), got {self.backward}")
        Link(self.bandwidth, self.latency)  # validates both

    @property
    def link(self) -> Link:
        return Link(self.bandwidth, self.latency)

    def slowdown(self) -> np.ndarray:
        """Per target rank: 1 / speed (the pattern repeated over the ranks)."""
        if self.speeds is None:
            return np.ones(self.workers)
        return 1.0 / np.asarray([self.speeds[r % len(self.speeds)] for r in range(self.workers)])


@dataclass(frozen=True)
class Projection:
    """Projected numbers of one algorithm (next to the measured ones of its trace)."""

    label: str
    workers: int
    steps: int
    params: int
    compute_scale: float
    payload_scale: float
    replayed: bool  # measured per-rank compute replayed (same worker count) rather than sampled
    wall_clock_s: float
    bytes_sent_per_worker: float
    compute_s: float
    exposed_comm_s: float  # mean per rank, waiting for slower ranks included
    straggler_wait_s: float  # the part of it spent at blocking ops waiting for the last rank to join
    link_busy_s: float
    straggler_factor: float  # E[max of N draws] of the rank-to-rank compute spread (mean 1)
    measured: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.wall_clock_s < 0 or self.compute_s < 0 or self.exposed_comm_s < 0:
            raise ValueError("projected seconds must be >= 0")

    @property
    def utilisation(self) -> float:
        total = self.compute_s + self.exposed_comm_s
        return self.compute_s / total if total > 0 else 1.0


# ----------------------------------------------------------------------------- simulation


def expected_max(samples: Sequence[float] | np.ndarray, n: int) -> float:
    """E[max of ``n`` iid draws] from the empirical distribution of ``samples``:
    ``sum_i x_(i) ((i/m)^n - ((i-1)/m)^n)`` over the sorted samples ``x_(1..m)``."""
    x = np.sort(np.asarray(samples, dtype=float))
    if x.size == 0 or n < 1:
        raise ValueError(f"need samples and n >= 1, got {x.size} samples and n={n}")
    cdf = np.arange(x.size + 1) / x.size
    weights = np.diff(cdf ** n)
    return float(np.dot(x, weights))


def _at_degree(trace: Trace, n: int) -> tuple[Op, ...]:
    """The ops with each neighbour exchange's bytes scaled to the topology's degree at ``n`` workers."""
    if trace.neighbours is None or n == trace.ranks:
        return trace.ops
    ratio = trace.neighbours(n) / max(trace.neighbours(trace.ranks), 1e-12)
    return tuple(dataclasses.replace(op, sent=op.sent * ratio, received=op.received * ratio)
                 if op.op == "sendrecv" else op for op in trace.ops)


def _run_issued(issued: list[int], ops: Sequence[Op], pieces: list[list[float]], durations: list[float],
                backward: float, backward_tags: frozenset[str], step: np.ndarray, link_free: float,
                ends: dict[int, float], state: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
    """Put the ops issued at one step on the link (updating ``ends`` and the per-rank ``clock``,
    ``exposed`` and ``straggling`` of ``state`` in place); the time the link is free again. The step's
    backward ops (``backward > 0``) go together as the last rank's backward fills their buckets."""
    clock, exposed, straggling = state
    during = [k for k in issued if backward > 0 and ops[k].blocking and ops[k].tag in backward_tags]
    for k in issued:
        last = float(clock.max())
        if k in during:  # all of this step's, together (lowband.net.cost.behind_backward, as the planner)
            if k != during[0]:
                continue
            window = backward * float(step[int(clock.argmax())])
            link_free = behind_backward([s for j in during for s in pieces[j]], window, last - window, link_free)
            ends.update({j: link_free for j in during})
        else:
            start = max(last, link_free)  # the collective starts when the last rank joins
            link_free = ends[k] = start + durations[k]
        if ops[k].blocking:
            straggling += last - clock
            exposed += link_free - clock
            clock[:] = link_free
    return link_free


def simulate(trace: Trace, target: Target) -> Projection:
    """Replay ``trace``'s schedule at ``target`` (see the module doc); deterministic per seed."""
    n, steps = target.workers, trace.steps
    payload_scale = target.params / trace.params
    scale = payload_scale if target.compute_scale is None else target.compute_scale
    link = target.link
    replay = n == trace.ranks
    measured = np.asarray(trace.compute, dtype=float) * scale  # [rank, step]
    if trace.speeds is not None:
        measured *= np.asarray(trace.speeds, dtype=float)[:, None]  # back to full speed
    slowdown = target.slowdown()
    step_mean = measured.mean(axis=0)
    spread = np.divide(measured, step_mean, out=np.ones_like(measured), where=step_mean > 0).ravel()
    rng = np.random.default_rng(target.seed)
    ops = _at_degree(trace, n)
    pricing = Pricing(n, link, payload_scale, target.allreduce, trace.buckets, trace.two_phase)
    priced = [op_parts(op, pricing) for op in ops]
    pieces = [seconds[:-1] + [seconds[-1] + op.overhead] for op, (seconds, _) in zip(ops, priced)]
    durations = [sum(p) for p in pieces]
    issued: dict[int, list[int]] = {}
    waited: dict[int, list[int]] = {}
    for k, op in enumerate(ops):
        issued.setdefault(op.step, []).append(k)
        if not op.blocking:
            waited.setdefault(op.wait_step, []).append(k)
    clock = np.zeros(n)
    exposed = np.zeros(n)
    straggling = np.zeros(n)
    link_free, ends = 0.0, {}
    for t in range(steps):
        step = (measured[:, t] if replay else step_mean[t] * rng.choice(spread, size=n)) * slowdown
        clock += step
        link_free = _run_issued(issued.get(t + 1, []), ops, pieces, durations, target.backward,
                                trace.backward_tags, step, link_free, ends, (clock, exposed, straggling))
        for k in waited.get(t + 1, []):
            late = np.maximum(ends[k] - clock, 0.0)
            exposed += late
            clock += late
    compute = float(clock.mean() - exposed.mean())
    sent = sum(sent for _, sent in priced) + sum(op_parts(op, pricing)[1] for op in trace.init_ops)
    measured_numbers = {
        "workers": trace.ranks, "params": trace.params, "wall_clock_s": trace.wall_clock_s,
        "bytes_sent_per_worker": trace.bytes_sent_per_worker, "compute_s": trace.compute_s,
        "exposed_comm_s": trace.comm_s,
        "utilisation": trace.compute_s / (trace.compute_s + trace.comm_s) if trace.compute_s + trace.comm_s else 1.0,
    }
    return Projection(
        label=trace.label, workers=n, steps=steps, params=target.params, compute_scale=scale,
        payload_scale=payload_scale, replayed=replay, wall_clock_s=float(clock.max()),
        bytes_sent_per_worker=sent, compute_s=max(compute, 0.0), exposed_comm_s=float(exposed.mean()),
        straggler_wait_s=float(straggling.mean()),
        link_busy_s=float(sum(durations)),
        straggler_factor=expected_max(spread, n),
        measured=measured_numbers)
