"""``gossip``: decentralised SGD over a sparse graph, with one global merge at the end.

Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study
for Decentralized Parallel Stochastic Gradient Descent" (D-PSGD, arXiv:1705.09056, NeurIPS
2017): there is no global model; each rank averages its parameters with a few neighbours
only, so a rank's traffic per step is its degree times the model, whatever the world size.
Zhu et al., "A Single Merging Suffices: Recovering Server-based Learning Performance in
Decentralized Learning" (arXiv:2507.06542; later versions retitled "On the Surprising
Effectiveness of a Single Global Merging in Decentralized Learning", ICLR 2026): one exact
average of all local models at the final step can substantially improve the global test
performance of decentralised SGD under high data heterogeneity and limited communication,
and the globally merged model of decentralised SGD can match the convergence rate of
parallel (server-based) SGD; the discrepancy among local models is partly constructive
rather than only noise.

1. the ranks form an undirected graph (``ring``: i +- 1; ``torus``: up, down, left and right
   on the most square rows x cols grid of n, wrapping around; ``exponential``: i +- 2^k for
   2^k < n) with Metropolis-Hastings weights W_ij = 1 / (1 + max(deg_i, deg_j)) on edges and
   W_ii = 1 - sum_j W_ij: symmetric and doubly stochastic, so mixing keeps the global average;
2. every step each rank takes one inner optimizer step on its own batch (AdamW in the runner);
   the inner optimizer state stays local;
3. every ``period`` steps each rank sends its full parameters (one flat fp32 buffer) to each
   neighbour, receives theirs (one :meth:`~lowband.comm.Comm.sendrecv`) and sets
   x_i <- W_ii x_i + sum_j W_ij x_j (adapt-then-combine: mixing after the local step, where the
   paper's update mixes the point the gradient was taken at; the same for period 1 up to the
   order of the two operations);
4. at each evaluation :meth:`Gossip.metrics` reports the consensus distance
   mean_i ||x_i - mean_j x_j|| (monitoring traffic, not charged);
5. with ``merge_at_end`` :meth:`Gossip.finish` replaces every model by the exact average of
   all of them (one charged all-reduce): every rank ends with the same parameters.

Under ``lowband train --elastic`` (:mod:`lowband.elastic.decentralized`) the graph is rebuilt
over the current members at a quorum every ``quorum_every`` steps; see docs/elastic.md.

Example::

    algo = Gossip(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm,
                  GossipOptions(topology="torus", period=2))
    # CLI: lowband train --algo "gossip:topology=exponential,merge_at_end=false"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lowband.algorithms.base import ALGORITHMS, Algorithm, Options, consensus_distance, flatten, unflatten_into
from lowband.algorithms.commplan import Setup, Sync, exchange
from lowband.comm import Comm
from lowband.comm.comm import Handle


# ----------------------------------------------------------------------------- topologies


def grid(n: int) -> tuple[int, int]:
    """The most square (rows, cols) with rows * cols == n and rows <= cols: 6 -> (2, 3), 7 -> (1, 7)."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


def _ring(n: int) -> list[set[int]]:
    return [{(i - 1) % n, (i + 1) % n} for i in range(n)]


def _torus(n: int) -> list[set[int]]:
    rows, cols = grid(n)
    out = []
    for i in range(n):
        r, c = divmod(i, cols)
        out.append({((r - 1) % rows) * cols + c, ((r + 1) % rows) * cols + c,
                    r * cols + (c - 1) % cols, r * cols + (c + 1) % cols})
    return out


def _exponential(n: int) -> list[set[int]]:
    hops = [1 << k for k in range(n.bit_length()) if 1 << k < n]
    return [{(i + sign * h) % n for h in hops for sign in (1, -1)} for i in range(n)]


TOPOLOGIES: dict[str, Callable[[int], list[set[int]]]] = {
    "ring": _ring, "torus": _torus, "exponential": _exponential,
}


def neighbours(topology: str, n: int) -> list[list[int]]:
    """Each rank's sorted neighbours (itself and duplicates removed) in the undirected graph."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; choose one of: {', '.join(TOPOLOGIES)}")
    if n < 1:
        raise ValueError(f"a topology needs at least 1 rank, got {n}")
    return [sorted(peers - {i}) for i, peers in enumerate(TOPOLOGIES[topology](n))]


def metropolis_weights(neighbours: list[list[int]]) -> torch.Tensor:
    """The n x n float64 Metropolis-Hastings mixing matrix of an undirected graph."""
    n = len(neighbours)
    # cpu: the mixing matrix is host data (a schedule of peers and weights)
    w = torch.zeros(n, n, dtype=torch.float64)
    for i, peers in enumerate(neighbours):
        for j in peers:
            w[i, j] = 1.0 / (1 + max(len(peers), len(neighbours[j])))
    w += torch.diag(1.0 - w.sum(dim=1))
    return w


@torch.no_grad()
def mix(comm: Comm, flat: torch.Tensor, neighbours: list[list[int]], weights: torch.Tensor,
        tag: str = "gossip", wait: Callable[[Handle], None] | None = None) -> torch.Tensor:
    """One gossip step on this rank's 1-D ``flat`` (any dtype), in place:
    flat <- W_ii flat + sum_j W_ij flat_j, one neighbour exchange; returns ``flat``.
    ``wait``: how to wait for the exchange (an elastic run gives up early when a peer failed)."""
    peers = neighbours[comm.rank]
    if not peers:
        return flat
    recvs = {j: torch.empty_like(flat) for j in peers}
    if wait is None:
        comm.sendrecv({j: flat for j in peers}, recvs, tag=tag)
    else:
        handle = comm.sendrecv({j: flat for j in peers}, recvs, async_op=True, tag=tag)
        assert isinstance(handle, Handle)
        wait(handle)
    row = weights[comm.rank].tolist()
    flat.mul_(row[comm.rank])
    for j in peers:  # sorted: the same order of additions on every run
        flat.add_(recvs[j], alpha=row[j])
    return flat


# ----------------------------------------------------------------------------- algorithm


@dataclass(frozen=True)
class GossipOptions(Options):
    """Graph, how often to gossip, and whether to merge all models once at the end."""

    topology: str = "ring"  # ring | torus | exponential
    period: int = 1  # inner steps between gossip steps
    merge_at_end: bool = True  # one exact global average in finish() (arXiv:2507.06542)
    quorum_every: int = 10  # --elastic: steps between quorum points (departures rebuilt, joiners let in)

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {self.topology!r}")
        if self.period < 1:
            raise ValueError(f"period must be >= 1 (gossip every period steps), got {self.period}")
        if self.quorum_every < 1:
            raise ValueError(f"quorum_every must be >= 1 (an elastic quorum every that many steps), "
                             f"got {self.quorum_every}")


@ALGORITHMS.register("gossip")
class Gossip(Algorithm):
    """D-PSGD: local steps, neighbour averaging every ``period`` steps, an optional final merge."""

    name = "gossip"
    Options = GossipOptions
    elastic = "gossip"  # --elastic: quorum every quorum_every steps (lowband.elastic.decentralized)
    options: GossipOptions

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """The fp32 model to each neighbour (the busiest rank's degree) every ``period`` steps."""
        return exchange(options, setup, options.period, max(map(len, neighbours(options.topology, setup.workers))))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rebuild_topology()
        self.gossip_steps = 0

    def rebuild_topology(self) -> None:
        """Step 1 over the current ``comm.world_size`` (an elastic run re-points the Comm at new members)."""
        self.neighbours = neighbours(self.options.topology, self.comm.world_size)
        self.weights = metropolis_weights(self.neighbours)

    @property
    def peers(self) -> list[int]:
        """This rank's neighbours."""
        return self.neighbours[self.comm.rank]

    def _flat(self) -> torch.Tensor:
        return flatten([p.detach().float() for p in self.params])

    @torch.no_grad()
    def after_step(self) -> None:
        """Step 3: a gossip step every ``period`` inner steps."""
        if self.step_count % self.options.period == 0:
            self.gossip()

    @torch.no_grad()
    def gossip(self, wait: Callable[[Handle], None] | None = None) -> None:
        """x_i <- sum_j W_ij x_j over this rank and its neighbours (nothing without neighbours)."""
        self.gossip_steps += 1
        if not self.peers:
            return
        flat = mix(self.comm, self._flat(), self.neighbours, self.weights, wait=wait)
        unflatten_into(flat, self.params)

    @torch.no_grad()
    def end_training(self) -> None:
        """Step 5: one exact average of all models (charged: it is real traffic)."""
        if self.options.merge_at_end and self.comm.world_size > 1:
            flat = self._flat()
            self.comm.all_reduce(flat, average=True, tag="merge")
            unflatten_into(flat, self.params)
        super().end_training()

    def metrics(self) -> dict[str, float]:
        """Step 4: consensus distance mean_i ||x_i - x_bar|| (L2 over all parameters), in float64."""
        return {"consensus_distance": consensus_distance(self.comm, self.params)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "gossip_steps": self.gossip_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.gossip_steps = int(state["gossip_steps"])
