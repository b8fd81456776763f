"""``ddp-backup``: data parallel with backup workers, each step averages the first ``n - b`` gradients.

Chen, Pan, Monga, Bengio & Jozefowicz, "Revisiting Distributed Synchronous SGD"
(arXiv:1604.00981): with ``b`` backup workers a synchronous step waits for the fastest
``n - b`` gradients only, so a few slow workers no longer set the pace; ``b`` fixed, or
chosen per step from measured times in the spirit of "Dynamic Backup Workers for Parallel
Machine Learning" (Xu, Neglia & Sebastianelli, arXiv:2004.14696). Each step, on every rank:

1. ``b`` for this step: ``backups``, or with ``dynamic=true`` the controller's choice from the
   last ``window`` steps' published times (identical on every rank);
2. serve the simulated straggler delay (``straggle=...``), unless ``n - b`` other ranks are
   ready first: then abandon it (:class:`~lowband.adversity.stragglers.Arrivals`, a counter in
   the process group's store decides the first ``n - b``, exactly);
3. a dropped rank zeroes its gradient; every rank joins the usual aggregation (any summable or
   gathered compressor, no feedback, ``mean``) and scales the result by ``n / (n - b)``: the
   mean over the contributors;
4. inner optimizer step on every rank with the same averaged gradient: ranks stay identical
   (a dropped rank's own gradient is discarded, as in the paper).

What this saves and what it does not (details in :mod:`lowband.adversity.stragglers` and
docs/robustness.md): the part of a straggler's *simulated* delay after the ``n - b``-th arrival
is saved; a rank whose *real* forward/backward is slow still holds the all-reduce back, because
the collective needs every rank to enter it. Bytes on the wire are those of ddp: dropped ranks
send zeros, the all-reduce does not shrink.

Example::

    lowband train --algo "ddp;ddp-backup:backups=1;ddp-backup:dynamic=true,max_backups=2" \\
        --straggle random:prob=0.1,delay=0.5
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from lowband.adversity.stragglers import Arrival, Arrivals, Controller
from lowband.algorithms.base import ALGORITHMS
from lowband.algorithms.commplan import Setup, Sync, average
from lowband.algorithms.ddp import DDP, DDPOptions


@dataclass(frozen=True)
class BackupDDPOptions(DDPOptions):
    """``backups``: b (the initial b with ``dynamic``); ``max_backups``: the most ``dynamic`` may drop."""

    backups: int = 1
    dynamic: bool = False
    max_backups: int = 1
    window: int = 10  # steps of history behind the dynamic choice

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backups < 0 or self.max_backups < 0 or (self.dynamic and self.backups > self.max_backups):
            raise ValueError(f"ddp-backup: need 0 <= backups <= max_backups with dynamic, got {self.backups}, "
                             f"{self.max_backups}")
        if self.window < 1:
            raise ValueError(f"ddp-backup: window must be >= 1, got {self.window}")
        if self.feedback != "none" or self.aggregate != "mean":
            raise ValueError("ddp-backup averages the contributors' gradients: use feedback=none and aggregate=mean "
                             "(a dropped rank's residual or a robust rule's history would count it anyway)")


@ALGORITHMS.register("ddp-backup")
class BackupDDP(DDP):
    name = "ddp-backup"
    Options = BackupDDPOptions
    options: BackupDDPOptions
    deterministic = False  # which n - b ranks contribute is decided by who is ready first

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """As ddp: dropped ranks send zeros."""
        return average(options, setup, "grads", 1, backward=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        o, n = self.options, self.comm.world_size
        if n > 1 and max(o.backups, o.max_backups if o.dynamic else 0) >= n:
            raise ValueError(f"ddp-backup: backups must be < the number of workers ({n}); got backups={o.backups}"
                             + (f", max_backups={o.max_backups}" if o.dynamic else ""))
        self.arrivals = Arrivals(self.comm.rank, n) if n > 1 else None
        self.controller = Controller(n, o.max_backups if o.dynamic else o.backups, o.window)
        self.backups = o.backups
        self.dropped_steps = 0  # steps where this rank's gradient was dropped
        self.saved_s = 0.0  # simulated delay this rank abandoned
        self._started = time.perf_counter()
        self._aggregate_s = 0.0

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        step, n = self.step_count + 1, self.comm.world_size
        delay = self.straggler.delay(self.comm.rank, step)
        if self.arrivals is None:  # a world of one: nothing to wait for
            return super().reduce_gradients()
        k = n - self.backups
        arrival = self.arrivals.arrive(step, k, self._started, delay)
        self.arrivals.publish(step, arrival, self._aggregate_s)
        self._account(arrival, delay)
        for _, p in self.named_params:
            if p.grad is None or not arrival.contributes:
                p.grad = torch.zeros_like(p)
        begin = time.perf_counter()
        self.aggregator.mean_([(name, p.grad) for name, p in self.named_params])
        if k < n:
            for p in self.params:
                p.grad.mul_(n / k)  # the all-reduce's 1/n over k contributors and n - k zeros
        self._aggregate_s = time.perf_counter() - begin
        self.controller.observe(self.arrivals.times(step))
        if self.comm.rank == 0 and step > 1:
            self.arrivals.forget(step - 1)  # every rank read step - 1's times before this all-reduce
        if self.options.dynamic:
            self.backups = self.controller.choose(self.options.backups)
        self._started = time.perf_counter()

    def _account(self, arrival: Arrival, delay: float) -> None:
        if not arrival.contributes:
            self.dropped_steps += 1
        self.saved_s += delay - arrival.waited_s

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "backups": self.backups, "dropped_steps": self.dropped_steps,
                "straggle_saved_s": round(self.saved_s, 3)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "backup": {"backups": self.backups, "controller": self.controller.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.backups = int(state["backup"]["backups"])
        self.controller.load_state_dict(state["backup"]["controller"])
