"""``eager-diloco``: DiLoCo with eager updates (Kale, Douillard & Donchev, arXiv:2502.12996).

"Eager Updates For Overlapped Communication and Computation in DiLoCo". As in
``delayed-diloco``, the all-reduce of round t's outer gradients runs while round t + 1
trains, so the rank never blocks on it. Applying that average one round late
(``delayed-diloco``) hurts convergence; the eager update applies, at the end of every
round, the rank's own *fresh* outer gradient as a proxy for the fresh outer gradients of
the others, which have not arrived yet, mixed with the delayed outer gradients of all
the other ranks.

Notation: rank i of N, round t = 0, 1, ... of H inner steps, theta_g,i the rank's outer
parameters, x_i its model, Delta^t = mean_j delta_j^t the all-reduced outer gradient.

1. round t: H inner steps with the inner optimizer from x_i = theta_g,i;
2. the outer gradient delta_i^t = theta_g,i - x_i is formed and its mean Delta^t is
   started in the background (``mean_async``); the rank does not wait for it;
3. the rank waits for Delta^{t-1} (it travelled during round t; ~0 wait when H inner
   steps take longer than the transfer) and forms the eager outer gradient: its own fresh
   term replaces its own stale term in the delayed average::

       eager_i^t = (1/N) delta_i^t + (1/N) sum_{j != i} delta_j^{t-1}
                 = delta_i^t / N + (Delta^{t-1} - delta_i^{t-1} / N)

   (at t = 0 there is no delayed average: eager_i^0 = delta_i^0 / N);
4. the outer optimizer (Nesterov SGD, as DiLoCo, but at lr 0.3 and momentum 0.8: see
   below) steps theta_g,i with eager_i^t, and the model continues from it: x_i <- theta_g,i;
5. ``finish()`` waits for the last average Delta^{T-1} and applies what is still missing
   of it, the others' part Delta^{T-1} - delta_i^{T-1} / N, as one more outer step
   (none when N = 1); the model keeps any progress made since the last round.

Every rank's outer gradient thus enters every rank's outer optimizer exactly once with
weight 1/N: its own at once, the others' one round later. With N = 1 the eager
gradient is delta^t itself and this is DiLoCo exactly (bit for bit).

The ranks' parameters differ between synchronisations: each rank's theta_g,i carries its
own fresh term (and its own outer-optimizer momentum). With outer SGD at lr 1 without
momentum, theta_g,i + delta_i^t / N is the same on every rank after the outer step of
round t — the global model with the averages of rounds 0..t-1 applied — and the ranks
agree exactly (up to rounding) after ``finish()``. Evaluation uses the rank's own
theta_g,i; lowband's reports show rank 0's (averaging the ranks' models would cost an
extra all-reduce per evaluation). With a lossy ``compress`` the own stale term is removed
uncompressed, so the rank's compression error of round t-1 (divided by N) stays in.
Memory: theta_g,i, delta_i^{t-1} and the buffer in flight (DiLoCo: theta_g).

Outer learning rate. (N-1)/N of every eager gradient is one round stale, and Nesterov
momentum with a stale gradient is unstable at DiLoCo's lr 0.7 / momentum 0.9 for N >= 4.
On a quadratic where a round of inner steps removes a fraction k of the error
(delta = k theta), the outer iteration's spectral radius over k in (0, 1] stays below 1
only for lr <= 0.75 (N = 2), 0.4 (N = 4), 0.3 (N = 8), 0.25 (large N) at momentum 0.9, and
lr <= 0.5 (N = 4), 0.35 (large N) at momentum 0.8. Measured (char-GPT, 4 workers, 400 steps,
H = 20; docs/algorithms/eager-diloco.md): lr 0.7 oscillates between val loss 3.0 and 3.7
and ends at 3.435; lr 0.5: 2.731; lr 0.3: 2.543; lr 0.2: 2.528; lr 0.3 with momentum 0.8
(the defaults here, stable for any N in that model): see the docs page.

Against the paper (docs/faithfulness.md): the eager gradient of step 3 is the paper's
(its own fresh outer gradient mixed with the others' delayed ones, 1/N each), but the paper's
headline runs apply it per fragment of Streaming DiLoCo ("1-outer-step overlap", its
Table 1); here it is the whole model at once (streaming-diloco's P = 1). Step 5 is lowband's
end-of-training rule, and the outer lr / momentum are lowband's (above), not the paper's.

``state_dict()`` waits for the average in flight and saves it with delta_i^{t-1}; a resumed
run is bit-identical to one that did not stop.

Example::

    algo = EagerDiLoCo(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm,
                       EagerDiLoCoOptions(inner_steps=20))

or ``lowband train --algo "eager-diloco:inner_steps=20"``.
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
class EagerDiLoCoOptions(DiLoCoOptions):
    """DiLoCo's options with a gentler outer step: mostly-stale eager gradients need it."""

    outer_lr: float = 0.3
    outer_momentum: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_speed(self.budget, "eager-diloco", "its average overlaps the next round, which every rank computes")


@ALGORITHMS.register("eager-diloco")
class EagerDiLoCo(OverlappedDiLoCo):
    name = "eager-diloco"
    Options = EagerDiLoCoOptions
    elastic = "eager"  # --elastic: drained, outer state adopted at a membership change (lowband.elastic.overlapped)
    reshardable = False  # each rank's own fresh outer gradient is part of the state
    options: EagerDiLoCoOptions

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """Every H steps, hidden by the next round (H steps of compute)."""
        return average(options, setup, "outer", options.inner_steps, options.inner_steps)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.own_outer_gradients: list[torch.Tensor] | None = None  # delta_i^{t-1}, while its mean is in flight

    @torch.no_grad()
    def synchronise(self) -> None:
        """Steps 2-4: send delta_i^t, receive Delta^{t-1}, outer step with the eager gradient."""
        own = self.outer_gradients()
        stale = self.exchange([(name, d.clone()) for name, d in own])
        n = self.comm.world_size
        eager: Named = []
        for i, (name, d) in enumerate(own):
            fresh = d / n
            if stale is not None:
                assert self.own_outer_gradients is not None
                fresh = fresh + (stale[i][1] - self.own_outer_gradients[i] / n)  # the others' delayed part
            eager.append((name, fresh))
        self.apply_outer(eager)  # theta_g,i <- OuterOpt(theta_g,i, eager); x_i <- theta_g,i
        self.own_outer_gradients = [d for _, d in own]

    @torch.no_grad()
    def complete(self) -> None:
        """Step 5: outer step with the others' part of the last average; the model keeps its
        progress since theta_g,i (none when training stops at a round boundary)."""
        stale = self.take_in_flight()
        n = self.comm.world_size
        if stale is None or n == 1:  # with one rank there are no others: the average was all applied
            self.own_outer_gradients = None
            return
        assert self.own_outer_gradients is not None
        progress = [g - p for p, g in zip(self.params, self.global_params)]
        self.outer_step([(name, avg - own / n) for (name, avg), own in zip(stale, self.own_outer_gradients)])
        for p, g, d in zip(self.params, self.global_params, progress):
            p.copy_(g - d)
        self.own_outer_gradients = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        own = None if self.own_outer_gradients is None else [d.clone() for d in self.own_outer_gradients]
        return {**state, "own_outer_gradients": own}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        own = state["own_outer_gradients"]
        # a checkpoint saved elsewhere (the CPU) resumes on the parameters' device
        self.own_outer_gradients = None if own is None else [d.to(p.device, copy=True)
                                                             for d, p in zip(own, self.params)]
