"""``streaming-diloco``: DiLoCo synchronising one fragment at a time, overlapped with training.

Douillard et al., "Streaming DiLoCo with overlapping communication: Towards a Distributed
Free Lunch" (arXiv:2501.18512). DiLoCo sends every parameter at once every H steps, so the
link idles for H - 1 steps and then carries the whole model (peak bandwidth = model size).
Streaming DiLoCo splits the model into P fragments and staggers them:

1. the parameters, in model order, are cut into P fragments of contiguous tensors of
   roughly equal size (cuts at the tensor boundaries nearest to k/P of the total; a
   tensor is never split — for the GPT these are runs of consecutive layers);
2. every rank keeps the global parameters theta_g (as DiLoCo) and trains alone with its
   inner optimizer;
3. fragment p starts its synchronisation after inner step t when
   ``(t - offset_p) % H == 0`` (t >= 1), with ``offset_p = p * H // P``: each fragment is
   synchronised once every H steps, the fragments one after another, so each
   synchronisation carries about 1/P of the model;
4. at its start, the fragment's outer gradient delta_i = theta_g,p - theta_i,p is formed
   and its average over ranks is started in the background (``Aggregator.mean_async``,
   4-bit quantized by default) while training continues;
5. tau inner steps later (after inner step t + tau) the average is waited for, the outer
   optimizer (Nesterov SGD, as DiLoCo) steps theta_g,p with it, and the arriving global
   fragment is mixed into the local one:
   ``theta_i,p <- alpha * theta_i,p + (1 - alpha) * theta_g,p`` (alpha = 0: replace, as
   DiLoCo; the paper uses alpha = 0.5, which keeps the tau steps of local progress made
   while the fragment was in flight). With tau = 0 the wait is immediate.

With P = 1, tau = 0 and alpha = 0 this is DiLoCo exactly (bit for bit: same schedule,
same outer gradients, same outer optimizer).

Against the paper and torchft's ``DiLoCo`` (docs/faithfulness.md): step 5's mixing is
torchft's ``lerp(local, alpha)`` (alpha weighs the local fragment); torchft starts a
fragment tau steps before its boundary and applies it at the boundary, here it starts at
the boundary and applies tau steps later (the same overlap, shifted), and fragment 0 goes
last in the first round, not first. The paper uses H = 30 or 100 and fragments of 3 layers
("sequential" or "strided", its Figure 2); lowband's defaults are H = 20, P = 4 sequential.

Quantization: the paper sends the outer gradients as 4-bit floats (E3M0) and accumulates
in fp32. lowband's default ``compress="qsgd:bits=4"`` is a different 4-bit code: QSGD's
unbiased stochastic quantizer (one fp32 norm per 512 elements), exchanged with an
all-gather (QSGD codes of different ranks cannot be summed on the wire) and averaged in
fp32 after decoding. Any other compressor (``compress="identity"`` for fp32) can be used.

The outer optimizer is DiLoCo's single optimizer over theta_g; torch optimizers keep their
state per parameter and skip parameters without a gradient, so giving gradients to one
fragment at a time steps exactly that fragment with its own momentum (and, for Adam, its
own step count): the state is per fragment. ``outer_steps`` counts fragment outer steps
(P per H steps).

Checkpoints: ``state_dict()`` first waits for the averages in flight (waiting only moves
time, not results), then saves the averaged outer gradients with the step at which each is
to be applied; a resumed run applies them at that step, so resuming is bit-identical to not
stopping. ``finish()`` applies what is still in flight at the end of training.

Example::

    algo = StreamingDiLoCo(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm,
                           StreamingDiLoCoOptions(inner_steps=20, fragments=4, tau=1))

or ``lowband train --algo "streaming-diloco:fragments=4,tau=5"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from lowband.algorithms.base import ALGORITHMS
from lowband.algorithms.budget import refuse_speed
from lowband.algorithms.commplan import Setup, Sync, average
from lowband.algorithms.diloco import DiLoCo, DiLoCoOptions
from lowband.comm.aggregate import PendingMean


@dataclass(frozen=True)
class StreamingDiLoCoOptions(DiLoCoOptions):
    """DiLoCo's options (``inner_steps`` is H, the period of every fragment) plus the streaming ones."""

    compress: str = "qsgd:bits=4"  # the paper quantizes outer gradients to 4 bits (see the module docstring)
    fragments: int = 4  # P: fragments of contiguous parameters, synchronised one after another
    tau: int = 1  # inner steps a fragment's average may take before it is applied (overlap)
    alpha: float = 0.5  # theta_local <- alpha * theta_local + (1 - alpha) * theta_global on arrival

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_speed(self.budget, "streaming-diloco", "its fragments synchronise at staggered steps of every rank")
        if self.fragments < 1:
            raise ValueError(f"fragments (P) must be >= 1, got {self.fragments}")
        if not 0 <= self.tau < self.inner_steps:
            raise ValueError(f"tau must be in [0, inner_steps={self.inner_steps}) so a fragment arrives "
                             f"before it is sent again, got {self.tau}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass
class InFlight:
    """One fragment's averaged outer gradient: being averaged (``pending``) or ready to apply."""

    deltas: list[torch.Tensor]  # fresh tensors, the mean over ranks once ``pending`` is waited for
    apply_at: int  # the inner step after which it is applied
    pending: PendingMean | None = field(default=None, repr=False)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


def contiguous_fragments(numels: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``numels`` cut into ``parts`` non-empty runs of roughly equal total.

    The k-th cut is the tensor boundary nearest to k/parts of the total (ties: the earlier
    boundary), kept after the previous cut and leaving one tensor for each later run.
    """
    n = len(numels)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} parameter tensors into {parts} fragments (tensors are never split); "
                         f"use fragments <= {n}")
    prefix = [0]
    for x in numels:
        prefix.append(prefix[-1] + x)
    total = prefix[-1]
    cuts = [0]
    for k in range(1, parts):
        target = k * total / parts
        candidates = range(cuts[-1] + 1, n - (parts - k) + 1)
        cuts.append(min(candidates, key=lambda i: (abs(prefix[i] - target), i)))
    cuts.append(n)
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:])]


@ALGORITHMS.register("streaming-diloco")
class StreamingDiLoCo(DiLoCo):
    name = "streaming-diloco"
    Options = StreamingDiLoCoOptions
    elastic = "streaming"  # --elastic: quorum where a fragment is due (lowband.elastic.overlapped)
    options: StreamingDiLoCoOptions

    @classmethod
    def tail_steps(cls, options: Any, steps: int) -> int:
        return 0  # every fragment synchronises on its own offset: no common last round

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """1/P of the model every H/P steps (P fragments staggered), hidden by ``tau`` steps."""
        return average(options, setup, "outer", options.inner_steps / options.fragments, options.tau,
                       1 / options.fragments)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        o = self.options
        self.fragments = contiguous_fragments([p.numel() for p in self.params], o.fragments)
        self.offsets = [p * o.inner_steps // o.fragments for p in range(o.fragments)]
        self.fragment_outer_steps = [0] * o.fragments
        self.in_flight: dict[int, InFlight] = {}

    # -- schedule -------------------------------------------------------------------------
    def starts_at(self, step: int) -> list[int]:
        """Fragments whose synchronisation starts after inner step ``step`` (>= 1)."""
        h = self.options.inner_steps
        return [p for p, offset in enumerate(self.offsets) if step >= 1 and (step - offset) % h == 0]

    @torch.no_grad()
    def after_step(self) -> None:
        t = self.step_count
        started = self.starts_at(t)
        for p in started:
            self.start_sync(p)
        for p in sorted(p for p, f in self.in_flight.items() if f.apply_at == t):
            self.apply_sync(p)
        self.local_steps = 0 if started else self.local_steps + 1  # inner steps since a sync last started

    # -- one fragment -------------------------------------------------------------------------
    def fragment_outer_gradients(self, p: int) -> list[tuple[str, torch.Tensor]]:
        """Step 4: delta_i = theta_g - theta_i for fragment ``p`` (fresh tensors)."""
        return [(self.named_params[i][0], self.global_params[i] - self.params[i]) for i in self.fragments[p]]

    @torch.no_grad()
    def start_sync(self, p: int) -> None:
        """Step 4: form fragment ``p``'s outer gradient and start averaging it."""
        assert p not in self.in_flight, f"fragment {p} is sent again before its last average arrived"
        named = self.fragment_outer_gradients(p)
        self.in_flight[p] = InFlight([d for _, d in named], self.step_count + self.options.tau,
                                     self.aggregator.mean_async(named))

    @torch.no_grad()
    def apply_sync(self, p: int) -> None:
        """Step 5: wait for fragment ``p``'s average, outer step on theta_g,p, mix into the model."""
        flight = self.in_flight.pop(p)
        flight.wait()
        indices = self.fragments[p]
        for i, d in zip(indices, flight.deltas):
            self.global_params[i].grad = d
        self.outer_optimizer.step()  # only parameters with a gradient (this fragment) move
        self.outer_optimizer.zero_grad(set_to_none=True)
        alpha = self.options.alpha
        for i in indices:
            local, glob = self.params[i], self.global_params[i]
            if alpha == 0.0:
                local.copy_(glob)
            elif alpha < 1.0:
                local.mul_(alpha).add_(glob, alpha=1.0 - alpha)
        self.fragment_outer_steps[p] += 1
        self.outer_steps += 1

    @torch.no_grad()
    def synchronise(self) -> None:
        """Apply every fragment in flight now (in the order they were due)."""
        for p in sorted(self.in_flight, key=lambda q: (self.in_flight[q].apply_at, q)):
            self.apply_sync(p)

    def end_training(self) -> None:
        """End of training: apply the fragments still in flight, stop the aggregator's thread."""
        self.synchronise()
        super().end_training()

    # -- state ----------------------------------------------------------------------------
    def wait_in_flight(self) -> None:
        for p in sorted(self.in_flight):
            self.in_flight[p].wait()

    def state_dict(self) -> dict[str, Any]:
        """DiLoCo's state plus the fragment counters and the averages in flight (waited for first)."""
        self.wait_in_flight()  # the compressor/feedback state below is final only after this
        return {**super().state_dict(), "fragments": [list(f) for f in self.fragments],
                "fragment_outer_steps": list(self.fragment_outer_steps),
                "in_flight": {p: {"deltas": [d.clone() for d in f.deltas], "apply_at": f.apply_at}
                              for p, f in self.in_flight.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [list(f) for f in self.fragments] != state["fragments"]:
            raise ValueError(f"checkpoint fragments {state['fragments']} differ from this model's {self.fragments}")
        self.wait_in_flight()  # nothing of ours may still be written by the aggregator's thread
        super().load_state_dict(state)
        self.fragment_outer_steps = [int(n) for n in state["fragment_outer_steps"]]
        # a checkpoint saved elsewhere (the CPU) resumes on the parameters' device
        self.in_flight = {int(p): InFlight([d.to(self.params[i].device, copy=True)
                                            for i, d in zip(self.fragments[int(p)], f["deltas"])], int(f["apply_at"]))
                          for p, f in state["in_flight"].items()}
