"""The ring order of collectives (``--ring``): rank order, a given order, or measured (``auto``).

``--ring auto`` measures the links at start-up, in the spirit of PCCL's topology optimisation
(arXiv:2505.14065), and every rank solves the same order:

1. **probe**: every pair of ranks exchanges :data:`PROBE_BYTES` each way through
   :meth:`Comm.sendrecv`, in a round-robin tournament (circle method: n-1 rounds of disjoint
   pairs for even n, n rounds with one rank idle per round for odd n); every round starts
   at a barrier (uncharged control traffic) and is repeated :data:`PROBE_REPEATS` times;
   each rank keeps its fastest wall-clock time per peer. In the emulator that time is the
   modelled pair link (sites: through the WAN) plus the real loopback transfer; over real
   links it is the real link;
2. **share**: every rank all-gathers the measured rows (one float64 row per rank);
3. **solve**: :func:`lowband.net.ring.best_ring` on the matrix (a pure function of it, so
   every rank gets the same order): least slowest hop, then least total hop time.

The probes and the all-gather go through the run's :class:`Comm`, so the ledger charges them
(tag ``probe``, step 0). With 3 ranks or fewer every ring is the same: no probe is sent.
Rank 0 prints the chosen order once, with the measured slowest hop and total against rank
order. gloo's own ring follows rank order whatever the order: the order changes what the
emulated link charges (:meth:`Comm.set_ring`), see docs/topology.md.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from lowband.comm.comm import Comm
from lowband.net.ring import best_ring, ring_cost

PROBE_BYTES = 256 * 1024  # bytes each way per pair and repeat
PROBE_REPEATS = 2  # the fastest of this many exchanges per pair counts (the first may set up connections)


def choose_ring(spec: str, comm: Comm) -> tuple[int, ...]:
    """``'rank'``: rank order; ``'0,2,1,3'``: that order; ``'auto'``: measured (module doc)."""
    if spec == "rank":
        return tuple(range(comm.world_size))
    if spec == "auto":
        return measured_ring(comm)
    order = tuple(int(r) for r in spec.split(","))
    if sorted(order) != list(range(comm.world_size)):
        raise ValueError(f"--ring must be an order of all workers 0..{comm.world_size - 1}, got {spec!r}")
    return order


def measured_ring(comm: Comm) -> tuple[int, ...]:
    """Probe every pair, share the rows, solve (collective: every rank calls it, same result)."""
    n = comm.world_size
    if n <= 3:
        return tuple(range(n))
    seconds = measure_pairs(comm)
    order = best_ring(seconds)
    if comm.rank == 0:
        slowest, total = ring_cost(order, seconds)
        rank_slowest, rank_total = ring_cost(range(n), seconds)
        print(f"lowband: ring order {','.join(map(str, order))} (measured {PROBE_BYTES // 1024} kB probes: slowest hop "
              f"{slowest * 1e3:.1f} ms, all hops {total * 1e3:.1f} ms; rank order {rank_slowest * 1e3:.1f} ms, "
              f"{rank_total * 1e3:.1f} ms)", file=sys.stderr, flush=True)
    return order


def measure_pairs(comm: Comm) -> list[list[float]]:
    """``seconds[i][j]``: rank i's fastest exchange of :data:`PROBE_BYTES` with rank j (all ranks)."""
    n = comm.world_size
    probe = torch.zeros(PROBE_BYTES // 4, dtype=torch.float32, device=comm.device)
    echo = torch.empty_like(probe)
    row = torch.zeros(n, dtype=torch.float64, device=comm.device)
    for pairs in tournament(n):
        peer = next((b if a == comm.rank else a for a, b in pairs if comm.rank in (a, b)), None)
        best = math.inf
        for _ in range(PROBE_REPEATS):
            comm.barrier()  # both sides of every pair start together
            if peer is None:
                continue  # this rank's bye (odd n)
            started = time.perf_counter()
            comm.sendrecv({peer: probe}, {peer: echo}, tag="probe")
            best = min(best, time.perf_counter() - started)
        if peer is not None:
            row[peer] = best
    rows = comm.all_gather(row, tag="probe")
    return torch.stack(rows).tolist()  # host sync: the ring solver runs on the host


def tournament(n: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs ``(a, b)``, ``a < b``, in which every pair of ``range(n)`` meets once
    (the circle method; odd n: a phantom player gives one rank a bye per round)."""
    m = n + n % 2
    players = list(range(m))
    rounds = []
    for _ in range(m - 1):
        pairs = [(min(players[i], players[m - 1 - i]), max(players[i], players[m - 1 - i])) for i in range(m // 2)]
        rounds.append([p for p in pairs if p[1] < n])
        players = [players[0], players[-1], *players[1:-1]]
    return rounds
