"""The ring order of least cost on measured pair times (``--ring auto``): a pure solver.

A ring collective moves at its slowest hop, so the order of a ring over links of different
speeds matters: with two sites joined by a slow WAN, a ring in rank order over interleaved
sites (``0,1,0,1``) crosses the WAN at every hop, a site-contiguous ring only twice. PCCL
(Prime Collective Communications Library, arXiv:2505.14065) measures the pairwise bandwidth
between peers and solves for the ring order as a travelling-salesman problem; lowband does
the same on a matrix of measured seconds (:func:`lowband.comm.ring_probe.choose_ring` fills it).

:func:`best_ring` (``seconds[i][j]``: time of one probe exchanged between ranks i and j; the
matrix need not be symmetric, a hop costs ``max(seconds[i][j], seconds[j][i])``):

1. n <= 3: every ring is the same up to direction: rank order;
2. the **bottleneck** ``M*``: the least slowest hop over all rings;
3. among the rings whose slowest hop is within :data:`TOLERANCE` of ``M*`` (measurements are
   noisy: a ring is not better because its WAN hop measured 3% faster), the one of least
   **total hop time**; exact ties: the lexicographically smallest order;
4. search: exhaustive for n <= :data:`EXHAUSTIVE` (rank 0 first, one direction of each ring:
   (n-1)!/2 rings), otherwise nearest-neighbour tours from a few starts improved by 2-opt,
   first on (slowest hop, total), then by 2-opt and or-opt on the total under the bottleneck
   limit.

Probes exchanged in isolation do not see a shared WAN (every hop crossing it at once gets a
share of it): the total-time tie-break is what keeps sites contiguous, since each crossing
adds a WAN hop's time (checked against :meth:`lowband.net.link.Network.ring_link` in the tests).

Example::

    >>> best_ring([[0, 1, 9, 1], [1, 0, 1, 9], [9, 1, 0, 1], [1, 9, 1, 0]])
    (0, 1, 2, 3)
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

EXHAUSTIVE = 9  # rings searched exhaustively up to this many ranks ((n-1)!/2 = 20160 at 9)
TOLERANCE = 0.25  # slowest hops within this fraction of the least one count as equal
STARTS = 8  # nearest-neighbour starts of the heuristic


def best_ring(seconds: Sequence[Sequence[float]]) -> tuple[int, ...]:
    """The ring order (rank 0 first) of least slowest hop, then least total hop time (module doc)."""
    t = hop_times(seconds)
    n = len(t)
    if n <= 3:
        return tuple(range(n))
    rings = _all_rings(n) if n <= EXHAUSTIVE else _heuristic_rings(t)
    return _select(rings, t)


def heuristic_ring(seconds: Sequence[Sequence[float]]) -> tuple[int, ...]:
    """:func:`best_ring`'s search beyond :data:`EXHAUSTIVE` ranks, at any n (for comparison)."""
    t = hop_times(seconds)
    return tuple(range(len(t))) if len(t) <= 3 else _select(_heuristic_rings(t), t)


def ring_cost(order: Sequence[int], seconds: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(slowest hop, total hop time) of the ring visiting ``order`` (and back to its start)."""
    t = hop_times(seconds)
    return _cost(order, t)


def hop_times(seconds: Sequence[Sequence[float]]) -> list[list[float]]:
    """The symmetric hop-time matrix ``max(s[i][j], s[j][i])``; checks the input's shape and values."""
    n = len(seconds)
    if n == 0 or any(len(row) != n for row in seconds):
        raise ValueError(f"pair times must be a square matrix, one row and column per rank; got {n} rows "
                         f"of lengths {sorted({len(row) for row in seconds})}")
    for i, row in enumerate(seconds):
        for j, s in enumerate(row):
            if i != j and not (math.isfinite(s) and s >= 0):
                raise ValueError(f"pair time between ranks {i} and {j} must be finite and >= 0, got {s}")
    return [[0.0 if i == j else max(float(seconds[i][j]), float(seconds[j][i])) for j in range(n)] for i in range(n)]


# -- internals ----------------------------------------------------------------------------


def _cost(order: Sequence[int], t: list[list[float]]) -> tuple[float, float]:
    hops = [t[a][b] for a, b in zip(order, list(order[1:]) + list(order[:1]))]
    return max(hops), sum(hops)


def _canonical(order: Sequence[int]) -> tuple[int, ...]:
    """Rotated to start at rank 0, in the direction whose second rank is the smaller."""
    k = list(order).index(0)
    ring = list(order[k:]) + list(order[:k])
    if len(ring) > 2 and ring[1] > ring[-1]:
        ring = ring[:1] + ring[1:][::-1]
    return tuple(ring)


def _all_rings(n: int) -> list[tuple[int, ...]]:
    """Every ring over n ranks once: rank 0 first, one direction."""
    return [(0, *p) for p in itertools.permutations(range(1, n)) if p[0] < p[-1]]


def _select(rings: Sequence[tuple[int, ...]], t: list[list[float]]) -> tuple[int, ...]:
    costs = [(_cost(r, t), _canonical(r)) for r in rings]
    limit = min(c[0] for c, _ in costs) * (1 + TOLERANCE)
    return min((total, ring) for (slowest, total), ring in costs if slowest <= limit)[1]


def _heuristic_rings(t: list[list[float]]) -> list[tuple[int, ...]]:
    """Nearest-neighbour tours (and rank order) improved by 2-opt: first on (slowest, total),
    then on the total under the best bottleneck found (+ :data:`TOLERANCE`)."""
    n = len(t)
    starts = [_nearest_neighbour(t, s) for s in sorted({round(k * n / STARTS) for k in range(STARTS)} & set(range(n)))]
    tours = [_two_opt(list(tour), t, None) for tour in [list(range(n)), *starts]]
    limit = min(_cost(tour, t)[0] for tour in tours) * (1 + TOLERANCE)
    return [tuple(_shorten(tour, t, limit)) for tour in tours]


def _shorten(tour: list[int], t: list[list[float]], limit: float) -> list[int]:
    """2-opt and or-opt (move a run of 1-3 ranks elsewhere) on the total, no new hop over ``limit``."""
    while True:
        tour = _two_opt(tour, t, limit)
        moved = _or_opt(tour, t, limit)
        if moved is None:
            return tour
        tour = moved


def _or_opt(tour: list[int], t: list[list[float]], limit: float) -> list[int] | None:
    """The tour with the first run ``tour[i:i+L]`` moved (either way round) to a place where the
    total shrinks and no new hop exceeds ``limit``; None if there is none. Rank 0 stays first."""
    n = len(tour)
    total = sum(t[tour[k]][tour[(k + 1) % n]] for k in range(n))
    eps = 1e-12 * max(total, 1e-300)
    for length in (1, 2, 3):
        for i in range(1, n - length + 1):
            p, s0, s1, q = tour[i - 1], tour[i], tour[i + length - 1], tour[(i + length) % n]
            rest = tour[:i] + tour[i + length:]
            gain = t[p][s0] + t[s1][q] - t[p][q]
            if t[p][q] > limit:
                continue
            for k in range(len(rest)):
                x, y = rest[k], rest[(k + 1) % len(rest)]
                if (x, y) == (p, q):
                    continue
                for a, b in ((s0, s1), (s1, s0)):
                    if max(t[x][a], t[b][y]) <= limit and t[x][a] + t[b][y] - t[x][y] < gain - eps:
                        run = tour[i:i + length] if a == s0 else tour[i:i + length][::-1]
                        return rest[:k + 1] + run + rest[k + 1:]
    return None


def _nearest_neighbour(t: list[list[float]], start: int) -> list[int]:
    tour, left = [start], set(range(len(t))) - {start}
    while left:
        here = tour[-1]
        nxt = min(left, key=lambda j: (t[here][j], j))
        tour.append(nxt)
        left.remove(nxt)
    k = tour.index(0)
    return tour[k:] + tour[:k]


def _two_opt(tour: list[int], t: list[list[float]], limit: float | None) -> list[int]:
    """2-opt with rank 0 kept first: reverse ``tour[i..j]`` while it improves (first improvement).
    ``limit`` None: minimise (slowest hop, total); else minimise the total, no new hop over ``limit``."""
    n = len(tour)
    while True:
        hops = [t[tour[k]][tour[(k + 1) % n]] for k in range(n)]
        top = sorted(range(n), key=lambda k: -hops[k])[:3]
        slowest, total = max(hops), sum(hops)
        eps = 1e-12 * max(total, 1e-300)
        move = _improving_move(tour, t, hops, top, slowest, total, eps, limit)
        if move is None:
            return tour
        i, j = move
        tour[i:j + 1] = tour[i:j + 1][::-1]


def _improving_move(tour: list[int], t: list[list[float]], hops: list[float], top: list[int], slowest: float,
                    total: float, eps: float, limit: float | None) -> tuple[int, int] | None:
    """The first segment ``(i, j)`` whose reversal improves the tour (hops i-1 and j are replaced)."""
    n = len(tour)
    for i in range(1, n - 1):
        for j in range(i + 1, n):
            if i == 1 and j == n - 1:
                continue  # the whole ring reversed: the same ring
            a, b, c, d = tour[i - 1], tour[i], tour[j], tour[(j + 1) % n]
            new1, new2 = t[a][c], t[b][d]
            new_total = total - hops[i - 1] - hops[j] + new1 + new2
            if limit is not None:
                if max(new1, new2) <= limit and new_total < total - eps:
                    return i, j
                continue
            rest = next((hops[k] for k in top if k not in (i - 1, j)), 0.0)
            new_slowest = max(rest, new1, new2)
            if new_slowest < slowest - eps or (new_slowest <= slowest + eps and new_total < total - eps):
                return i, j
    return None
