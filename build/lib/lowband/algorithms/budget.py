"""Compute-aware local work for the local-update family (``diloco``/``localsgd`` with ``budget="speed"``).

Model: FedCompass (Li, Kotecha, ... Huerta, "FedCompass: Efficient Cross-Silo Federated
Learning on Heterogeneous Client Devices using a Computing Power Aware Scheduler",
arXiv:2309.14675): give each worker an amount of local work proportional to its measured
speed so that all of them reach the synchronisation at the same time, instead of the fast
ones waiting for the slowest. Here with a synchronous round (DiLoCo's), which keeps a
single common step counter:

1. every rank times its inner steps: compute only (forward, backward, the simulated
   slow-down of ``--worker-speed``, the inner optimizer step), never communication;
2. at the first inner step, and at every synchronisation, the ranks all-gather their mean
   seconds per inner step since the last exchange (one float64 each, tag ``"speeds"``,
   charged like any traffic: one tiny all-gather per round);
3. every rank smooths the gathered vector with the previous estimate,
   t <- beta t + (1 - beta) t_measured (the first measurement is taken as it is), and
   computes the same budgets from the same numbers: the fastest rank does H inner steps,
   rank i does b_i = max(1, round(H t_fast / t_i)) (:func:`speed_budgets`);
4. in the round, rank i takes b_i inner steps and is idle for the remaining H - b_i
   iterations of the loop (no batch, no forward/backward, no optimizer step); the loop's
   step counter stays common, so every rank synchronises on the round's H-th iteration;
5. the outer gradients are averaged weighted by the work done: Delta = sum_i w_i Delta_i /
   sum_i w_i with w_i = b_i, known on every rank from the budgets (no extra traffic),
   implemented by scaling Delta_i by n w_i / sum_j w_j before the aggregator's mean
   (``weighting="work"``); ``"uniform"`` keeps the plain mean. The alternative is FedNova's
   normalised averaging (Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective
   Inconsistency Problem in Heterogeneous Federated Optimization", arXiv:2007.07481,
   NeurIPS 2020): Delta = mean_j(b_j) * mean_i(Delta_i / b_i), each update normalised by
   its step count, so a rank that did fewer steps is neither under- nor over-weighted
   (``weighting="normalised"``).

Example::

    budget = SpeedBudget(comm, inner_steps=20)
    # per loop iteration: if budget.wants_compute(local_steps): compute; budget.record(seconds)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lowband.algorithms.base import SyncOptions
from lowband.comm import Comm

BUDGETS = ("fixed", "speed")


def _work(budgets: Sequence[int]) -> list[float]:
    total = sum(budgets)
    return [len(budgets) * b / total for b in budgets]


def _uniform(budgets: Sequence[int]) -> list[float]:
    return [1.0] * len(budgets)


def _normalised(budgets: Sequence[int]) -> list[float]:
    mean = sum(budgets) / len(budgets)
    return [mean / b for b in budgets]


# weighting name -> the factor each rank's outer gradient is scaled by before the plain mean
WEIGHTINGS: dict[str, Callable[[Sequence[int]], list[float]]] = {
    "work": _work, "uniform": _uniform, "normalised": _normalised}


@dataclass(frozen=True)
class LocalWorkOptions(SyncOptions):
    """The options every local-update method shares: H, and how uneven workers share the work."""

    inner_steps: int = 20  # H: inner steps between synchronisations
    budget: str = "fixed"  # "fixed": H inner steps each; "speed": inner steps follow measured speed
    weighting: str = "work"  # budget="speed": "work" (by inner steps done), "uniform", "normalised" (FedNova)
    budget_smoothing: float = 0.5  # budget="speed": EMA beta of the measured seconds per step

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps (H) must be >= 1, got {self.inner_steps}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if not 0 <= self.budget_smoothing < 1:
            raise ValueError(f"budget_smoothing (the EMA's beta) must be in [0, 1), got {self.budget_smoothing}")
        if (self.budget == "speed" and self.weighting != "uniform"
                and self.aggregate.partition(":")[0].strip() != "mean"):
            raise ValueError(f"weighting={self.weighting!r} scales the outer gradients before a mean; with "
                             f"aggregate={self.aggregate!r} set weighting='uniform'")


def refuse_speed(budget: str, algorithm: str, why: str) -> None:
    """For the DiLoCo family members whose rounds cannot follow per-rank budgets."""
    if budget == "speed":
        raise ValueError(f"{algorithm} does not take budget='speed' ({why}); use diloco or localsgd, or budget='fixed'")


def speed_budgets(seconds_per_step: Sequence[float], inner_steps: int) -> tuple[int, ...]:
    """Step 3: the fastest rank does ``inner_steps`` (H), rank i does max(1, round(H t_fast / t_i)).

    Halves round up (``floor(x + 0.5)``). A time that is not a positive finite number (nothing
    measured yet) counts as the fastest, so a missing measurement never starves a rank.
    """
    if inner_steps < 1:
        raise ValueError(f"inner_steps (H) must be >= 1, got {inner_steps}")
    valid = [t for t in seconds_per_step if math.isfinite(t) and t > 0]
    if not valid:
        return (inner_steps,) * len(seconds_per_step)
    fastest = min(valid)
    return tuple(max(1, min(inner_steps, math.floor(inner_steps * fastest / t + 0.5)))
                 if math.isfinite(t) and t > 0 else inner_steps for t in seconds_per_step)


def smooth(previous: Sequence[float] | None, measured: Sequence[float], beta: float) -> tuple[float, ...]:
    """EMA of the seconds per step, per rank: beta * previous + (1 - beta) * measured; where either
    side is missing (not finite: nothing measured), the other is taken as it is."""
    if previous is None or len(previous) != len(measured):
        return tuple(measured)
    return tuple(m if not math.isfinite(p) else p if not math.isfinite(m) else beta * p + (1 - beta) * m
                 for p, m in zip(previous, measured))


class SpeedBudget:
    """One rank's side of the compute-aware schedule: timing, the exchange, budgets and weights.

    ``budgets`` is ``None`` until the first exchange (every rank then does H); the loop asks
    :meth:`wants_compute` each iteration, reports each inner step's compute seconds with
    :meth:`record` (else the time between steps is used), and the algorithm calls
    :meth:`after_inner_step`, :meth:`idle`, :meth:`factor` and :meth:`end_round`.
    """

    def __init__(self, comm: Comm, inner_steps: int, smoothing: float = 0.5, weighting: str = "work",
                 device: torch.device | str | None = None) -> None:
        self.comm, self.inner_steps, self.smoothing = comm, inner_steps, smoothing
        # where the exchanged seconds live: the communication device (the parameters'; NCCL rejects
        # CPU tensors); by default the Comm's own
        self.device = torch.device(device) if device is not None else getattr(comm, "device", torch.device("cpu"))
        self.weight = WEIGHTINGS[weighting]
        self.estimate: tuple[float, ...] | None = None  # smoothed seconds per inner step, per rank
        self.budgets: tuple[int, ...] | None = None  # this round's inner steps per rank
        self.seconds, self.steps = 0.0, 0  # this rank's compute since the last exchange
        self._reported: float | None = None  # seconds the loop reported for the step in progress
        self._mark = time.perf_counter()  # fallback clock: end of the previous step or idle iteration

    # -- the loop's side --------------------------------------------------------------------
    def wants_compute(self, local_steps: int) -> bool:
        """Step 4: does this rank take an inner step at this iteration of the round?"""
        return local_steps < self.budget()

    def budget(self) -> int:
        """This rank's inner steps in the current round."""
        return self.inner_steps if self.budgets is None else self.budgets[self.comm.rank]

    def record(self, seconds: float) -> None:
        """Step 1: compute seconds of the inner step in progress (forward, backward, slow-down)."""
        self._reported = (self._reported or 0.0) + seconds

    # -- the algorithm's side -----------------------------------------------------------------
    def after_inner_step(self, local_steps: int, period: int, own_seconds: float) -> None:
        """Count the step's seconds: what the loop reported plus ``own_seconds`` (the algorithm's
        inner optimizer step), or, if the loop reported nothing, the time since the previous
        step; exchange at the first inner step of a round when nothing is measured yet (step 2)."""
        now = time.perf_counter()
        self.seconds += self._reported + own_seconds if self._reported is not None else now - self._mark
        self.steps += 1
        self._reported, self._mark = None, now
        if self.estimate is None and local_steps == 1 < period:
            self.exchange()

    def idle(self) -> None:
        """An iteration without work: nothing is timed."""
        self._reported, self._mark = None, time.perf_counter()

    def factor(self) -> float:
        """Step 5: this rank's scale for its outer gradient, n w_i / sum(w) for ``"work"``."""
        budgets = self.budgets or (self.inner_steps,) * self.comm.world_size
        return self.weight(budgets)[self.comm.rank]

    def end_round(self) -> None:
        """At the synchronisation: exchange the round's measurements, set the next budgets."""
        self.exchange()

    @torch.no_grad()
    def exchange(self) -> None:
        """Steps 2-3: all-gather seconds per step, smooth, recompute every rank's budget."""
        own = self.seconds / self.steps if self.steps else math.nan  # NaN: keep this rank's estimate
        gathered = self.comm.all_gather(torch.tensor([own], dtype=torch.float64, device=self.device), tag="speeds")
        # host sync: the budgets (inner steps per rank) are host decisions; one read per synchronisation
        measured = [float(t) for t in torch.cat(gathered).tolist()]
        self.estimate = smooth(self.estimate, measured, self.smoothing)
        self.budgets = speed_budgets(self.estimate, self.inner_steps)
        self.seconds, self.steps = 0.0, 0
        self._mark = time.perf_counter()  # the fallback clock leaves communication out

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"budget_estimate": self.estimate, "budgets": self.budgets,
                "budget_seconds": self.seconds, "budget_steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; at another world size the measurements are dropped: every rank does H until
        the next synchronisation measures again (that round is averaged uniformly)."""
        estimate, budgets = state.get("budget_estimate"), state.get("budgets")
        if budgets is not None and len(budgets) != self.comm.world_size:
            estimate, budgets = None, None
        self.estimate = None if estimate is None else tuple(float(t) for t in estimate)
        self.budgets = None if budgets is None else tuple(int(b) for b in budgets)
        self.seconds, self.steps = float(state.get("budget_seconds", 0.0)), int(state.get("budget_steps", 0))
        self._reported, self._mark = None, time.perf_counter()
