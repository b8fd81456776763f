"""L-GreCo's layer-wise knapsack: one setting per layer, minimum total bytes, total error <= budget.

Markov, Alimohammadi, Frantar, Alistarh, "L-GreCo: Layerwise-Adaptive Gradient Compression
for Efficient and Accurate Deep Learning" (MLSys 2024, arXiv:2210.17357). Each layer l has
candidates c with (bytes b_lc, error e_lc); the problem is

    minimise sum_l b_l,c(l)   subject to   sum_l e_l,c(l) <= budget,

a multiple-choice knapsack. As in the paper, errors are discretised so that a dynamic
programme over the error axis solves it exactly for the discretised errors:

1. unit = budget / levels; every error becomes w_lc = ceil(e_lc / unit) units (rounded *up*,
   so any assignment with sum_l w <= levels has true error <= budget: the budget is never
   exceeded; the price is that assignments within about L units of the budget are lost);
2. dp_0[e] = 0 for e = 0..levels; dp_l[e] = min_c dp_{l-1}[e - w_lc] + b_lc (the fewest bytes
   of layers 1..l using at most e units), remembering the argmin per (l, e);
3. walk back from dp_L[levels]: layer L's choice at e, then e -= w, and so on.

Cost: O(L x C x levels) integer operations, vectorised over the error axis.
:func:`assign` adds L-GreCo's budget (the error of a default assignment) and falls back to
the default whenever the programme finds nothing cheaper (rounding up can make the default
itself look infeasible).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

INF = 1 << 62


class Candidate(NamedTuple):
    """One setting of one layer: payload bytes and compression error (any non-negative measure)."""

    nbytes: int
    error: float


def discretise(layers: Sequence[Sequence[Candidate]], budget: float, levels: int) -> list[list[int]]:
    """Every error in whole units of budget / levels, rounded up (``levels + 1``: can never fit)."""
    out = []
    for candidates in layers:
        row = []
        for c in candidates:
            if c.error <= 0:
                row.append(0)
            elif budget <= 0 or not math.isfinite(c.error):
                row.append(levels + 1)
            else:
                row.append(min(levels + 1, math.ceil(c.error * levels / budget)))
        out.append(row)
    return out


def solve(layers: Sequence[Sequence[Candidate]], budget: float, levels: int = 1000) -> Optional[list[int]]:
    """The candidate index per layer with the fewest total bytes whose discretised errors fit
    in ``levels`` units of ``budget / levels``; None if no assignment fits. Deterministic:
    among equal byte counts the candidate listed first wins."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    weights = discretise(layers, budget, levels)
    # cpu: the L-GreCo knapsack is a small host-side table (levels + 1 entries per layer)
    dp = torch.zeros(levels + 1, dtype=torch.int64)
    choices: list[torch.Tensor] = []
    for candidates, ws in zip(layers, weights):
        best = torch.full((levels + 1,), INF, dtype=torch.int64)
        arg = torch.full((levels + 1,), -1, dtype=torch.int64)
        for i, (c, w) in enumerate(zip(candidates, ws)):
            if w > levels:
                continue
            shifted = torch.full((levels + 1,), INF, dtype=torch.int64)
            shifted[w:] = torch.where(dp[:levels + 1 - w] < INF, dp[:levels + 1 - w] + int(c.nbytes), INF)
            better = shifted < best
            best = torch.where(better, shifted, best)
            arg = torch.where(better, torch.full_like(arg, i), arg)
        dp = best
        choices.append(arg)
    if int(dp[levels]) >= INF:
        return None
    picked, e = [], levels
    for arg, ws in zip(reversed(choices), reversed(weights)):
        i = int(arg[e])
        picked.append(i)
        e -= ws[i]
    return picked[::-1]


def total(layers: Sequence[Sequence[Candidate]], picked: Sequence[int]) -> Candidate:
    """Total bytes and total error of an assignment."""
    return Candidate(sum(layers[l][i].nbytes for l, i in enumerate(picked)),
                     math.fsum(layers[l][i].error for l, i in enumerate(picked)))


def assign(layers: Sequence[Sequence[Candidate]], default: Sequence[int], levels: int = 1000) -> list[int]:
    """L-GreCo's assignment: the fewest bytes with total error <= that of ``default`` (one
    candidate index per layer); ``default`` itself unless the programme finds fewer bytes.
    Ties in bytes go to a layer's default (a layer whose settings all cost the same keeps it)."""
    budget = total(layers, default).error
    orders = [[d] + [i for i in range(len(cs)) if i != d] for cs, d in zip(layers, default)]  # ties: default
    picked = solve([[cs[i] for i in order] for cs, order in zip(layers, orders)], budget, levels)
    if picked is None:
        return list(default)
    picked = [order[i] for order, i in zip(orders, picked)]
    return picked if total(layers, picked).nbytes < total(layers, default).nbytes else list(default)
