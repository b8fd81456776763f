"""``delayed-diloco``: DiLoCo whose outer-gradient average travels during the next round.

The one-step-delay overlap of communication and local training of DiLoCoX (Qi et al.,
arXiv:2506.21263), which is also the "delayed outer gradients" scheme that Kale et al.
use as their starting point (arXiv:2502.12996, Figure 2). DiLoCo blocks at every outer
step until the all-reduce of the outer gradients is done; here the all-reduce of round
t runs while round t + 1 trains, and its result is applied one round late.

Notation: rank i of N, round t = 0, 1, ... of H inner steps, theta_g the global parameters
(identical on every rank), x_i the rank's model, r_i the point its current round started
from.

1. round t: H inner steps with the inner optimizer take x_i from r_i to x_i^t;
2. the outer gradient is this round's local progress, delta_i^t = r_i - x_i^t, and its
   mean Delta^t = mean_i delta_i^t is started in the background (``mean_async``); the
   rank does not wait for it;
3. if t >= 1, the rank waits for Delta^{t-1} (it travelled during round t, so the wait
   is ~0 when H inner steps take longer than the transfer) and steps the outer optimizer
   (Nesterov SGD, as DiLoCo): theta_g <- OuterOpt(theta_g, Delta^{t-1}). Round 0 has
   nothing to apply;
4. reconciliation (DiLoCoX's rule): the rank continues from the new global model plus its
   own progress of round t, whose average is still in flight::

       x_i <- theta_g - delta_i^t        r_i <- x_i

   (at round 0 theta_g = r_i, so x_i simply continues from x_i^0);
5. ``finish()`` waits for the last average, applies it, and sets x_i <- theta_g minus any
   progress made since r_i (none when training stops at a round boundary).

Against the papers (docs/faithfulness.md): applying Delta^{t-1} one round late is the scheme
of Kale et al.'s Figure 2 ("delaying the application of the averaged outer gradient in the
outer optimizer", its caption; the method text was not at hand in issue 27). Step 4's
reconciliation, which keeps the rank's own round-t progress, is the DiLoCoX rule as lowband
read it; whether Kale et al.'s delayed baseline keeps it too, or restarts each round from
theta_g (the rule ``co2`` follows), was not verifiable, so this baseline may be the kinder one.

Invariant: r_i = theta_g - (the rank's own outer gradient in flight), so with the outer
optimizer plain SGD at lr 1 the outer step at the end of round t + 1 gives exactly
theta_g = mean_i r_i (the mean of the models the ranks started round t + 1 from): the
average is DiLoCo's, one round late. In a world of one, x follows plain local training
and theta_g trails it by one round. theta_g, the outer optimizer state and ``outer_steps``
are identical on every rank; the models x_i never are (each carries its own last round).
Evaluation uses theta_g. Memory: theta_g, r_i and the buffer in flight (DiLoCo: theta_g).

``state_dict()`` waits for the average in flight and saves it (with r_i); a resumed run
applies it at the next round end, so resuming is bit-identical to not stopping.

Example::

    algo = DelayedDiLoCo(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm,
                         DiLoCoOptions(inner_steps=20))

or ``lowband train --algo "delayed-diloco:inner_steps=20"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowband.algorithms.base import ALGORITHMS
from lowband.algorithms.budget import refuse_speed
from lowband.algorithms.commplan import Setup, Sync, average
from lowband.algorithms.diloco import DiLoCo, DiLoCoOptions
from lowband.comm.aggregate import PendingMean

Named = list[tuple[str, torch.Tensor]]


class OverlappedDiLoCo(DiLoCo):
    """DiLoCo with one outer-gradient average in flight across a round (base of delayed and eager).

    Subclasses implement :meth:`synchronise` (called after every H inner steps) with
    :meth:`exchange`, and :meth:`complete` (called by :meth:`end_training`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight: Named | None = None  # the tensors being averaged, or their mean once waited for
        self._pending: PendingMean | None = None

    # -- the average in flight ------------------------------------------------------------
    def exchange(self, deltas: Named) -> Named | None:
        """Start averaging ``deltas`` (fresh tensors, not touched again until their turn);
        wait for and return the previous round's average (``None`` if there is none)."""
        previous, pending = self.in_flight, self._pending
        self.in_flight, self._pending = deltas, self.aggregator.mean_async(deltas)
        if pending is not None:
            pending.wait()
        return previous

    def wait_in_flight(self) -> None:
        """Block until the average in flight (if any) is written back."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def in_flight_done(self) -> bool:
        """Whether nothing is being averaged any more (nothing in flight, or its mean written back)."""
        return self._pending is None or self._pending.done()

    def forget_average(self) -> None:
        """Stop waiting for the average in flight (elastic membership gave it up); its tensors stay."""
        self._pending = None

    def drop_in_flight(self) -> None:
        """Nothing in flight any more: the average and its tensors are dropped (a membership change)."""
        self.in_flight = None
        self.forget_average()

    def take_in_flight(self) -> Named | None:
        """The average in flight, waited for, and nothing in flight afterwards."""
        self.wait_in_flight()
        averaged, self.in_flight = self.in_flight, None
        return averaged

    @torch.no_grad()
    def outer_step(self, deltas: Named) -> None:
        """theta_g <- OuterOpt(theta_g, deltas); the model is not touched."""
        for g, (_, d) in zip(self.global_params, deltas):
            g.grad = d
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self.outer_steps += 1

    # -- end of training ------------------------------------------------------------------
    def complete(self) -> None:
        """Apply the average still in flight (subclasses)."""
        raise NotImplementedError

    @torch.no_grad()
    def end_training(self) -> None:
        """End of training: apply the average in flight, stop the aggregator's thread."""
        self.complete()
        super().end_training()

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """DiLoCo's state plus the average in flight (waited for first: waiting moves time, not results)."""
        self.wait_in_flight()  # the compressor/feedback state saved below is final only after this
        saved = None if self.in_flight is None else [d.clone() for _, d in self.in_flight]
        return {**super().state_dict(), "in_flight": saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait_in_flight()  # nothing of ours may still be written by the aggregator's thread
        super().load_state_dict(state)
        saved = state["in_flight"]
        if saved is not None and len(saved) != len(self.named_params):
            raise ValueError(f"checkpoint has {len(saved)} outer gradients in flight "
                             f"for {len(self.named_params)} parameters")
        # a checkpoint saved elsewhere (the CPU) resumes on the parameters' device
        self.in_flight = None if saved is None else [(n, d.to(p.device, copy=True))
                                                     for (n, p), d in zip(self.named_params, saved)]


@dataclass(frozen=True)
class DelayedDiLoCoOptions(DiLoCoOptions):
    """DiLoCo's options; the rounds are common to all ranks (``budget="fixed"`` only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_speed(self.budget, "delayed-diloco", "its average overlaps the next round, which every rank computes")


@ALGORITHMS.register("delayed-diloco")
class DelayedDiLoCo(OverlappedDiLoCo):
    name = "delayed-diloco"
    Options = DelayedDiLoCoOptions
    elastic = "delayed"  # --elastic: drained at a membership change (lowband.elastic.overlapped)

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """Every H steps, hidden by the next round (H steps of compute)."""
        return average(options, setup, "outer", options.inner_steps, options.inner_steps)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference = [p.detach().clone() for p in self.params]  # r_i: where this round started

    def outer_gradients(self) -> Named:
        """Step 2: delta_i = r_i - x_i, this round's local progress (fresh tensors)."""
        return [(name, r - p) for (name, p), r in zip(self.named_params, self.reference)]

    @torch.no_grad()
    def synchronise(self) -> None:
        """Steps 2-4: send this round's outer gradient, apply last round's average, reconcile."""
        previous = self.exchange(self.outer_gradients())
        if previous is None:  # round 0 (or first round after finish/resume with nothing in flight)
            for p, r in zip(self.params, self.reference):
                r.copy_(p)
            return
        self.outer_step(previous)
        self._reconcile()

    @torch.no_grad()
    def _reconcile(self) -> None:
        """x_i <- theta_g - (r_i - x_i); r_i <- x_i."""
        for p, r, g in zip(self.params, self.reference, self.global_params):
            p.copy_(g - (r - p))
            r.copy_(p)

    @torch.no_grad()
    def complete(self) -> None:
        """Step 5: apply the last average; x_i <- theta_g - (progress since r_i); r_i <- theta_g."""
        averaged = self.take_in_flight()
        if averaged is None:
            return
        self.outer_step(averaged)
        self._reconcile()
        for r, g in zip(self.reference, self.global_params):
            r.copy_(g)  # nothing in flight any more: the next outer gradient is measured from theta_g

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "reference": [r.clone() for r in self.reference]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for r, saved in zip(self.reference, state["reference"]):
                r.copy_(saved)
