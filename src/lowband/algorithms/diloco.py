"""``diloco``: Distributed Low-Communication training (Douillard et al., arXiv:2311.08105).

Workers train alone for ``H`` inner steps with their own inner optimizer (AdamW in the
paper), then synchronise once:

1. every rank keeps the global parameters theta_g of the last synchronisation;
2. after H inner steps, each rank forms its outer gradient (pseudo-gradient)
   delta_i = theta_g - theta_i;
3. the outer gradients are averaged over ranks: delta = mean_i delta_i (all-reduced in
   fp32, or through any compressor with error feedback: ``compress="qsgd:bits=4"``);
4. the outer optimizer (SGD with Nesterov momentum, lr 0.7, momentum 0.9 in the paper;
   ``outer_optimizer="adam"`` or ``nesterov=False`` for the alternatives the paper
   compares) steps theta_g with gradient delta;
5. every rank copies theta_g into its model and continues; the inner optimizer state is
   kept across rounds, as in the paper.

Communication drops by a factor of H against data parallel. All ranks apply the same
outer step to the same averaged delta, so parameters are identical after each round.

Uneven workers (``budget="speed"``, :mod:`lowband.algorithms.budget`, after FedCompass,
arXiv:2309.14675): each rank's inner steps per round follow its measured speed (the
fastest does H, rank i max(1, round(H t_fast / t_i))), a rank past its budget sits out
the round's remaining iterations (the loop asks :meth:`DiLoCo.wants_compute` and calls
:meth:`DiLoCo.idle` instead of computing), everyone synchronises on the round's H-th
iteration, and step 3 weights delta_i by the work done (``weighting="work"``).

Example::

    algo = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm,
                  DiLoCoOptions(inner_steps=20))
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from lowband.algorithms.base import ALGORITHMS, Algorithm
from lowband.algorithms.budget import LocalWorkOptions, SpeedBudget
from lowband.algorithms.commplan import Setup, Sync, average


OUTER_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class DiLoCoOptions(LocalWorkOptions):
    """``compress``/``feedback`` apply to the outer gradient (``compress="qsgd:bits=4"``)."""

    outer_optimizer: str = "sgd"  # "sgd" (Nesterov by default, as the paper) or "adam"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9  # sgd: momentum; adam: beta1
    nesterov: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outer_lr <= 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr}")
        if not 0 <= self.outer_momentum < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(f"outer_optimizer must be one of {', '.join(OUTER_OPTIMIZERS)}, got {self.outer_optimizer!r}")
        if self.outer_optimizer == "sgd" and self.nesterov and self.outer_momentum == 0:
            raise ValueError("nesterov needs outer_momentum > 0; set nesterov=False for plain SGD")


@ALGORITHMS.register("diloco")
class DiLoCo(Algorithm):
    name = "diloco"
    Options = DiLoCoOptions
    elastic = "rounds"  # --elastic: blocking outer steps, committed or redone (lowband.elastic.membership)
    reshardable = True  # global model, outer optimizer, counters and averages in flight agree on every rank
    options: DiLoCoOptions

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """The outer gradient through ``compress`` every H steps, blocking."""
        return average(options, setup, "outer", options.inner_steps)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.global_params = [p.detach().clone() for p in self.params]  # theta_g
        self.outer_optimizer = self.build_outer_optimizer()
        self.outer_steps = 0
        self.local_steps = 0  # inner steps since the last synchronisation
        self.aggregator = self.build_aggregator("outer")
        o = self.options  # qsr's options have no budget: fixed
        self.speed_budget = SpeedBudget(self.comm, o.inner_steps, o.budget_smoothing, o.weighting, self.device) \
            if getattr(o, "budget", "fixed") == "speed" else None
        self._inner_started = time.perf_counter()

    # -- compute-aware budgets (budget="speed"; overrides Algorithm's defaults) -------------
    @property
    def compute_aware(self) -> bool:
        """True when this rank may sit out iterations (``budget="speed"``)."""
        return self.speed_budget is not None

    def wants_compute(self) -> bool:
        """Whether this rank takes an inner step at this iteration; if not, call :meth:`idle`
        instead of drawing a batch, computing and :meth:`step`."""
        return self.speed_budget is None or self.speed_budget.wants_compute(self.local_steps)

    def record_compute(self, seconds: float) -> None:
        """The loop's compute seconds for the step in progress (forward, backward, simulated
        slow-down), reported before :meth:`step`; without it the time between steps is used."""
        if self.speed_budget is not None:
            self.speed_budget.record(seconds)

    @torch.no_grad()
    def idle(self) -> None:
        """An iteration this rank sits out: no inner step; synchronises at the round's end."""
        if self.speed_budget is None or self.wants_compute():
            raise RuntimeError("idle() is for the iterations wants_compute() declines (budget='speed')")
        self.speed_budget.idle()
        self.local_steps += 1
        self.end_iteration()

    def _before_inner_step(self, *args: Any) -> None:
        self._inner_started = time.perf_counter()  # the inner optimizer step counts as compute
        super()._before_inner_step(*args)

    # -- hooks for the DiLoCo family (local SGD, QSR, streaming, eager, delayed) ------------
    def build_outer_optimizer(self) -> torch.optim.Optimizer:
        o = self.options
        if o.outer_optimizer == "adam":
            return torch.optim.Adam(self.global_params, lr=o.outer_lr, betas=(o.outer_momentum, 0.999))
        return torch.optim.SGD(self.global_params, lr=o.outer_lr, momentum=o.outer_momentum,
                               nesterov=o.nesterov and o.outer_momentum > 0)

    @classmethod
    def tail_steps(cls, options: Any, steps: int) -> int:
        """The last ``steps % H`` inner steps: no outer step follows them."""
        h = int(options.inner_steps)
        return steps % h if h > 1 else 0

    def period(self) -> int:
        """Inner steps in the current round (H; QSR makes it grow as the lr decays)."""
        return self.options.inner_steps

    @torch.no_grad()
    def after_step(self) -> None:
        self.local_steps += 1
        if self.speed_budget is not None:
            self.speed_budget.after_inner_step(self.local_steps, self.period(),
                                               time.perf_counter() - self._inner_started)
        self.end_iteration()

    def end_iteration(self) -> None:
        """Synchronise once the round's ``period()`` iterations have run."""
        if self.local_steps >= self.period():
            self.sync_point()  # synchronise(), or the attached membership's quorum round around it
            self.local_steps = 0

    def outer_gradients(self) -> list[tuple[str, torch.Tensor]]:
        """Step 2: delta_i = theta_g - theta_i per parameter (fresh tensors)."""
        return [(name, g - p) for (name, p), g in zip(self.named_params, self.global_params)]

    @torch.no_grad()
    def apply_outer(self, deltas: list[tuple[str, torch.Tensor]]) -> None:
        """Steps 4-5: outer optimizer step on theta_g with the averaged delta, copy into the model."""
        for g, (_, d) in zip(self.global_params, deltas):
            g.grad = d
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.params, self.global_params):
            p.copy_(g)
        self.outer_steps += 1

    @torch.no_grad()
    def synchronise(self) -> None:
        """Steps 2-5: outer gradient, average, outer step, copy back."""
        deltas = self.outer_gradients()
        if self.speed_budget is not None:  # weighted by the work done: n w_i / sum(w) before the mean
            factor = self.speed_budget.factor()
            if factor != 1.0:
                for _, d in deltas:
                    d.mul_(factor)
        self.aggregator.mean_(deltas)
        self.apply_outer(deltas)
        if self.speed_budget is not None:
            self.speed_budget.end_round()  # the round's measurements set the next budgets

    @contextlib.contextmanager
    def evaluation_parameters(self) -> Iterator[None]:
        """The global model of the last synchronisation (what every rank agrees on)."""
        local = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, g in zip(self.params, self.global_params):
                p.copy_(g)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, local):
                    p.copy_(saved)

    def metrics(self) -> dict[str, Any]:
        """The aggregator's numbers and, with ``budget="speed"``, this rank's inner-step budget."""
        extra = {} if self.speed_budget is None else {"budget": self.speed_budget.budget()}
        return {**super().metrics(), **extra}

    def state_dict(self) -> dict[str, Any]:
        budget = {} if self.speed_budget is None else self.speed_budget.state_dict()
        return {**super().state_dict(), "outer_steps": self.outer_steps, "local_steps": self.local_steps,
                "global_params": [g.clone() for g in self.global_params],
                "outer_optimizer": self.outer_optimizer.state_dict(),
                **self.aggregator.state_dict(), **budget}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.outer_steps = int(state["outer_steps"])
        self.local_steps = int(state["local_steps"])
        with torch.no_grad():
            for g, saved in zip(self.global_params, state["global_params"]):
                g.copy_(saved)
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.aggregator.load_state_dict(state)
        if self.speed_budget is not None:
            self.speed_budget.load_state_dict(state)

