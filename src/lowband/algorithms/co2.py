"""``co2``: local updates with the outer all-reduce overlapping the next round (Sun et al., ICLR 2024).

"CO2: Efficient Distributed Training with Full Communication-Computation Overlap",
arXiv:2401.16265. As in SlowMo, workers take tau (here H) local steps with their inner
optimizer and then an outer momentum step on the averaged progress; CO2 starts that
all-reduce asynchronously and applies it one round late, so it overlaps the whole next
local phase. Its two additions for the resulting staleness are the *staleness gap
penalty* (the stale update is scaled down by how far the global model has moved since it
was computed) and *outer momentum clipping* (the momentum is clipped to [-phi, phi]).

Notation (the paper's): round t of H inner steps, x_t = x_{t,0} the global model every
rank starts round t from, x_{t,H}^(i) rank i's model after it, alpha the outer lr, beta
the outer momentum, m_t the outer momentum, lambda the penalty coefficient, phi the clip.

1. round t: H inner steps with the inner optimizer (AdamW in the runner) from x_t;
2. the rank's outer update delta_t^(i) = x_t - x_{t,H}^(i) starts averaging in the
   background, Delta_t = mean_i delta_t^(i) (``mean_async``; the paper all-reduces the
   models x_{t,H}^(i), the same thing since every rank started from x_t; deltas can go
   through ``compress``/``feedback``). The rank does not wait for it;
3. it waits for Delta_{t-1} (it travelled during round t). Delta_{t-1} was computed at
   x_{t-1} and is applied at x_t: per parameter tensor l, the staleness gap penalty is::

       Lambda_t,l = 1 + lambda * ||x_t,l - x_{t-1},l|| / ||Delta_{t-1},l||

4. outer momentum with clipping (element-wise), and the outer step::

       m_t     = clip(beta * m_{t-1} + Delta_{t-1} / Lambda_t, -phi, phi)
       x_{t+1} = x_t - alpha * m_t        (nesterov=True: x_t - alpha * (Delta_{t-1} / Lambda_t + beta * m_t))

   (round 0 has nothing to apply: x_1 = x_0). Every rank continues from x_{t+1}; its own
   progress of round t is in the average still in flight and lands one round later;
5. ``finish()`` waits for the last average and applies it the same way (the model keeps
   any progress made since x_t: none when training stops at a round boundary).

``asynchronous=False`` (zero staleness) blocks on Delta_t at the end of round t and steps
x_{t+1} = x_t - alpha m_t with m_t = clip(beta m_{t-1} + Delta_t / Lambda, -phi, phi); the
update is applied where it was computed, so the gap is 0 and Lambda = 1: without clipping
(phi = 0) this is ``diloco`` with outer SGD (bit for bit).

Defaults (paper's code, fairseq-CO2's run_co2_local.sh for 4 GPUs): alpha = 1.0, beta = 0.2,
heavy-ball momentum (nesterov=False), clipping on with phi = 1.0, H = 20 (fairseq-CO2's
``co2_outer_frequency``). Where we had to choose (the paper's method section was not at
hand; steps 3-4 follow its abstract, its OpenReview discussion -- Lambda_t is computed from
x_{t,0}, the clip has a threshold phi -- and the authors' code, which divides the update by
a penalty and clamps the momentum; in fairscale-CO2's ``co2.py`` that penalty is a constant,
``co2_gap_penalty`` = 1.0, and the clamp's result is discarded): (a) the penalty's normaliser, the gap measured per
tensor relative to the stale update's own norm (as Gap-Aware, Barkai et al. 2019), and
lambda = 1.0; (b) clipping is element-wise, as the authors' ``torch.clamp`` on the momentum
(phi = 0 disables it); (c) with Nesterov, beta * m_t uses the clipped momentum.

Evaluation uses x_t, the global model every rank agrees on (what the outer loop deploys;
after ``finish()`` it holds every average). Memory: x_t, m_t, one norm per tensor and the
buffer in flight. ``state_dict()`` saves all of it (waiting for the
average in flight first), so resuming is bit-identical to not stopping.

Example::

    algo = CO2(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm, CO2Options(inner_steps=20))

or ``lowband train --algo "co2:inner_steps=20,gap_penalty=0.5"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowband.algorithms.base import ALGORITHMS
from lowband.algorithms.budget import refuse_speed
from lowband.algorithms.commplan import Setup, Sync, average
from lowband.algorithms.delayed_diloco import Named, OverlappedDiLoCo
from lowband.algorithms.diloco import DiLoCoOptions


@dataclass(frozen=True)
class CO2Options(DiLoCoOptions):
    """DiLoCo's options with CO2's defaults, plus the penalty, the clip and the overlap switch."""

    outer_lr: float = 1.0  # alpha
    outer_momentum: float = 0.2  # beta
    nesterov: bool = False  # heavy-ball outer momentum, as SlowMo and CO2
    gap_penalty: float = 1.0  # lambda: staleness gap penalty coefficient (0: no penalty)
    clip_threshold: float = 1.0  # phi: outer momentum clipped to [-phi, phi] (0: no clipping)
    asynchronous: bool = True  # False: block on each round's average (zero staleness)

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_speed(self.budget, "co2", "its average overlaps the next round, which every rank computes")
        if self.outer_optimizer != "sgd":
            raise ValueError(f"co2's outer step is momentum SGD (it clips the momentum); set outer_optimizer='sgd', "
                             f"got {self.outer_optimizer!r}")
        if self.gap_penalty < 0:
            raise ValueError(f"gap_penalty (lambda) must be >= 0 (0 disables it), got {self.gap_penalty}")
        if self.clip_threshold < 0:
            raise ValueError(f"clip_threshold (phi) must be >= 0 (0 disables clipping), got {self.clip_threshold}")


@ALGORITHMS.register("co2")
class CO2(OverlappedDiLoCo):
    name = "co2"
    Options = CO2Options
    elastic = "co2"  # --elastic: drained at a membership change, own outer gradient kept (lowband.elastic.overlapped)
    reshardable = False  # not verified at another world size (its staleness penalty state)
    options: CO2Options  # type: ignore[assignment]

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """Every H steps, hidden by a round when asynchronous."""
        hidden = options.inner_steps if options.asynchronous else 0
        return average(options, setup, "outer", options.inner_steps, hidden)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the outer step is written out in outer_step (the clip sits inside the momentum
        # update, which torch.optim.SGD cannot express): DiLoCo's outer_optimizer is never stepped
        self.momentum = [torch.zeros_like(g) for g in self.global_params]  # m
        # ||x_t - x_{t-1}|| per tensor: the gap of the update in flight
        self.gap_norms = [torch.zeros((), dtype=g.dtype, device=g.device) for g in self.global_params]

    # -- the outer step -------------------------------------------------------------------
    @torch.no_grad()
    def outer_step(self, deltas: Named) -> None:
        """Steps 3-4: x_{t+1} = x_t - alpha m_t, with the penalty of the current gap and the clip."""
        o = self.options
        for i, (g, m, (_, d)) in enumerate(zip(self.global_params, self.momentum, deltas)):
            if o.gap_penalty > 0:
                ratio = self.gap_norms[i] / d.norm().clamp_min(torch.finfo(d.dtype).tiny)
                d = d / (1 + o.gap_penalty * ratio)  # Delta / Lambda_t,l (Lambda = 1 when the gap is 0)
            m.mul_(o.outer_momentum).add_(d)
            if o.clip_threshold > 0:
                m.clamp_(-o.clip_threshold, o.clip_threshold)
            step = d.add(m, alpha=o.outer_momentum) if o.nesterov else m
            g.add_(step, alpha=-o.outer_lr)
            if o.asynchronous:  # the gap of the update in flight: computed at x_t, applied at x_{t+1}
                self.gap_norms[i] = step.norm() * o.outer_lr
        self.outer_steps += 1

    @torch.no_grad()
    def _continue_from_global(self) -> None:
        for p, g in zip(self.params, self.global_params):
            p.copy_(g)

    @torch.no_grad()
    def synchronise(self) -> None:
        """Steps 2-4 (asynchronous), or DiLoCo's blocking round with CO2's outer step."""
        deltas = self.outer_gradients()  # delta_t^(i) = x_t - x_{t,H}^(i), fresh tensors
        if not self.options.asynchronous:
            self.aggregator.mean_(deltas)
            self.outer_step(deltas)
        else:
            previous = self.exchange(deltas)
            if previous is not None:  # None at round 0 (and after finish() or a resume with nothing in flight)
                self.outer_step(previous)
        self._continue_from_global()

    @torch.no_grad()
    def complete(self) -> None:
        """Step 5: apply the last average; the model keeps its progress since x_t."""
        averaged = self.take_in_flight()
        if averaged is None:
            return
        progress = [p - g for p, g in zip(self.params, self.global_params)]
        self.outer_step(averaged)
        for p, g, d in zip(self.params, self.global_params, progress):
            p.copy_(g + d)
        for n in self.gap_norms:
            n.zero_()  # nothing in flight any more: the next update is measured from, and applied at, x_t

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "momentum": [m.clone() for m in self.momentum],
                "gap_norms": [n.clone() for n in self.gap_norms]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for m, saved in zip(self.momentum, state["momentum"]):
                m.copy_(saved)
        # a checkpoint saved elsewhere (the CPU) resumes on the parameters' device
        self.gap_norms = [n.detach().to(device=g.device, dtype=g.dtype, copy=True)
                          for n, g in zip(state["gap_norms"], self.global_params)]
