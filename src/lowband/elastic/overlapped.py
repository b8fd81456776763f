"""Elastic membership for the DiLoCo variants that keep averages in flight across outer steps.

``delayed-diloco`` (DiLoCoX's one-step delay, arXiv:2506.21263), ``eager-diloco`` (Kale et al.,
arXiv:2502.12996), ``co2`` (Sun et al., arXiv:2401.16265) and ``streaming-diloco`` (Douillard et
al., arXiv:2501.18512) start an average in the background and apply it later (one round later,
or tau steps later per fragment). :class:`~lowband.elastic.membership.ElasticSync` commits or skips
one blocking outer step; here an average can be in flight while the membership changes.

The rule is **drain at a membership change**: an average is applied only at a quorum point
whose members are exactly the ones it was started with, after every member voted that it
arrived (the vote covers the wait). At a quorum point whose process group is new (members
changed, or the last attempt failed: the service then gives a new epoch), every member:

1. waits for what it has in flight (a failed or partial average is fine: it is discarded) and
   drops it, restoring the compressor/feedback state saved before it started
   (``preflight``, taken when the aggregator was idle), so nothing of it is half-applied;
2. rebuilds the group and sends the state (now with nothing in flight) to the joiners;
3. runs one blocking DiLoCo round over the new members: delta_i = theta_g - x_i plus the own
   progress that only the dropped average carried (``lost``: co2's last outer gradient,
   eager's (N-1)/N of its last one; delayed and streaming keep it in x_i already), joiners
   send zeros, holders scale by members/holders; votes; on commit the outer optimizer steps
   theta_g with the mean and every member continues from x_i = theta_g with nothing in
   flight (the pipeline restarts as at round 0, or with every fragment freshly synchronised);
4. on skip nothing is applied (the aggregator state is restored) and the drain is redone.

A quorum point whose group is unchanged is **steady**: the members wait for the average due
there, vote, and on commit run the algorithm's own step (bit-identical to a run without
``--elastic``). Quorum points: delayed, eager, co2: every round end (H steps) and ``finish()``;
streaming: every step at which a fragment's average is due (start + tau), and ``finish()``
if anything is in flight. Starting an average needs no quorum (a broken group fails it; the
next quorum point sees that).

``eager-diloco``'s ranks hold different theta_g,i (each carries its own fresh term): at a
drain every member adopts the sending holder's theta_g and outer-optimizer state (broadcast
to all members, not only joiners), so after it the members agree bit for bit.

Cost of a drain: the dropped average's bytes are sent again inside the blocking round (one
full-model average, not overlapped), plus the state broadcast when someone joins (always
for eager). Steady quorum points cost one store round trip each (~20-40 ms with the
service's 20 ms poll).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch

from lowband.algorithms.diloco import DiLoCo
from lowband.elastic.membership import MEMBERSHIPS, ElasticSync
from lowband.elastic.quorum import Decision

Named = list[tuple[str, torch.Tensor]]
log = logging.getLogger("lowband.elastic.membership")


class DrainingSync(ElasticSync):
    """Shared by the overlapped variants: steady rounds, drains, the final quorum."""

    def _setup(self) -> None:
        self.preflight: dict[str, Any] | None = None  # aggregator state before the oldest average in flight
        self.lost: list[torch.Tensor] | None = None  # own progress only a dropped average carried
        self.steady = False
        self.finishing = False
        self.drains = 0  # drain rounds committed

    # -- hooks of the variants ------------------------------------------------------------
    def _has_flight(self) -> bool:
        raise NotImplementedError

    def _settle(self) -> None:
        """Collect everything in flight, arrived or failed (a failure is the drain's business)."""
        raise NotImplementedError

    def _done(self) -> bool:
        """Nothing in flight is still running."""
        raise NotImplementedError

    def _drop(self) -> list[torch.Tensor] | None:
        """Forget what is in flight; return the own progress only it carried (None: none)."""
        raise NotImplementedError

    def _land(self, deltas: Named) -> None:
        """Apply the drain round's mean: outer step on theta_g, x_i <- theta_g, nothing in flight."""
        raise NotImplementedError

    # -- ElasticSync's hooks --------------------------------------------------------------
    def _prepare(self, d: Decision) -> None:
        self.steady = d.epoch == self.epoch and d.kind == "sync"
        if self.steady:
            return
        started = time.perf_counter()
        if self._has_flight():
            if self._done():
                self._settle()  # arrived or failed: either way dropped below
            else:  # blocked on the old group (a member died): left behind, not waited for
                self._abandon()
            lost = self._drop()
            if lost is not None:
                self.lost = lost if self.lost is None else [a + b for a, b in zip(self.lost, lost)]
            if self.preflight is not None:
                self.algo.aggregator.load_state_dict(self.preflight)
            self.preflight = None
        self.elastic_s += time.perf_counter() - started

    def _drain_gradients(self) -> Named:
        """theta_g - x_i (+ lost): every bit of own progress not yet in theta_g (fresh tensors)."""
        a = self.algo
        deltas = [(name, g - p) for (name, p), g in zip(a.named_params, a.global_params)]
        if self.lost is not None and self.client.token in self.decision.contributors:
            for (_, d), extra in zip(deltas, self.lost):
                d.add_(extra)
        return deltas

    def _drain(self, d: Decision) -> Named:
        return self._average(d, self._drain_gradients, self._receivers(d))

    def _receivers(self, d: Decision) -> tuple[str, ...] | None:
        """Holders that must take the sender's shared state too (eager: the ranks' theta_g differ)."""
        return None

    def _apply(self, d: Decision, work: Any) -> None:
        if work is True:
            self._steady_apply()
            return
        self._land(work)
        self.lost = None
        self.drains += 1

    def _steady_apply(self) -> None:
        raise NotImplementedError


class OverlapSync(DrainingSync):
    """``delayed-diloco``: one average in flight (started at a round end, applied at the next)."""

    def _setup(self) -> None:
        super()._setup()
        self.flight_world = 1  # members when the average in flight started

    def finish(self) -> None:
        """End of training: a last quorum; the last average lands only if every member has it."""
        self.finishing = True
        self._until_committed()
        self.algo.end_training()

    def _has_flight(self) -> bool:
        return self.algo.in_flight is not None

    def _settle(self) -> None:
        try:
            self.algo.wait_in_flight()
        except Exception as err:  # noqa: BLE001 - the average is dropped whatever went wrong
            log.info("replica %s: average in flight failed (%s): dropped", self.client.token, err)
            self.algo.forget_average()

    def _done(self) -> bool:
        return self.algo.in_flight_done()

    def _drop(self) -> list[torch.Tensor] | None:
        self.algo.drop_in_flight()
        return None  # delayed: r_i = theta_g - (own progress in flight), so theta_g - x_i has it

    def _attempt(self, d: Decision) -> Any:
        if not self.steady:
            return self._drain(d)
        self.faults.trigger("sync", self.loop.step)
        if not self.algo.in_flight_done():
            self._wait(self.algo.in_flight_done, self._abort_keys(d))
        self.algo.wait_in_flight()  # raises if the average failed here: this member votes to skip
        return True

    def _steady_apply(self) -> None:
        if self.finishing:
            return  # the algorithm's end_training applies the last average
        self.preflight = copy.deepcopy(self.algo.aggregator.state_dict())  # idle: the last average arrived
        self.flight_world = self.comm.world_size
        self._remember()
        self.algo.synchronise()  # the algorithm's own: starts the next average

    def _remember(self) -> None:
        """Keep what a drain would need of the average about to start (co2: its outer gradient)."""

    @torch.no_grad()
    def _land(self, deltas: Named) -> None:
        a = self.algo
        a.outer_step(deltas)
        for p, g in zip(a.params, a.global_params):
            p.copy_(g)
        for r, g in zip(getattr(a, "reference", ()), a.global_params):
            r.copy_(g)  # delayed: the next outer gradient is measured from theta_g


class EagerSync(OverlapSync):
    """``eager-diloco``: as delayed, plus the sender's outer state adopted by every member at a drain."""

    def _drop(self) -> list[torch.Tensor] | None:
        a = self.algo
        a.drop_in_flight()
        own, a.own_outer_gradients = a.own_outer_gradients, None
        if own is None or self.flight_world == 1:
            return None
        n = self.flight_world
        return [d * ((n - 1) / n) for d in own]  # the others never received it; 1/N is in theta_g,i

    def _receivers(self, d: Decision) -> tuple[str, ...] | None:
        return d.members

    def adopt(self, state: dict[str, Any]) -> None:
        a, algo = self.algo, state["algorithm"]
        with torch.no_grad():
            for g, saved in zip(a.global_params, algo["global_params"]):
                g.copy_(saved)
        a.outer_optimizer.load_state_dict(algo["outer_optimizer"])
        a.outer_steps = int(algo["outer_steps"])


class CO2Sync(OverlapSync):
    """``co2``: as delayed, but the own outer gradient in flight is kept (x_i restarts from theta_g)."""

    def _setup(self) -> None:
        super()._setup()
        self.own: list[torch.Tensor] | None = None

    @torch.no_grad()
    def _remember(self) -> None:
        a = self.algo
        self.own = [g - p for p, g in zip(a.params, a.global_params)]

    def _drop(self) -> list[torch.Tensor] | None:
        self.algo.drop_in_flight()
        own, self.own = self.own, None
        return own

    @torch.no_grad()
    def _land(self, deltas: Named) -> None:
        for n in self.algo.gap_norms:
            n.zero_()  # applied where it was computed: no staleness penalty
        super()._land(deltas)
        for n in self.algo.gap_norms:
            n.zero_()  # nothing in flight any more


class StreamingSync(DrainingSync):
    """``streaming-diloco``: fragments start on their schedule; quorum points where one is due."""

    @torch.no_grad()
    def after_step(self) -> None:
        """In place of the algorithm's own (the same schedule): start the fragments due, then a
        quorum where one's average is due."""
        a = self.algo
        t = a.step_count
        started = a.starts_at(t)
        for p in started:
            if not a.in_flight:
                self.preflight = copy.deepcopy(a.aggregator.state_dict())  # idle: nothing in flight
            a.start_sync(p)
        if any(f.apply_at == t for f in a.in_flight.values()):
            self._until_committed()
        a.local_steps = 0 if started else a.local_steps + 1

    def finish(self) -> None:
        """End of training: a last quorum if anything is in flight, then land it."""
        a = self.algo
        if a.in_flight:
            self.finishing = True
            self._until_committed()
        a.end_training()  # the algorithm's own: applies what is left, no quorum

    def _has_flight(self) -> bool:
        return bool(self.algo.in_flight)

    def _settle(self) -> None:
        for p, flight in sorted(self.algo.in_flight.items()):
            try:
                flight.wait()
            except Exception as err:  # noqa: BLE001 - dropped whatever went wrong
                log.info("replica %s: fragment %d in flight failed (%s): dropped", self.client.token, p, err)
            flight.pending = None

    def _done(self) -> bool:
        return all(f.pending is None or f.pending.done() for f in self.algo.in_flight.values())

    def _drop(self) -> list[torch.Tensor] | None:
        self.algo.in_flight = {}
        return None  # x_i is mixed only on arrival: theta_g - x_i still has the progress

    def _due(self) -> list[int]:
        a = self.algo
        return sorted((p for p, f in a.in_flight.items() if self.finishing or f.apply_at == a.step_count),
                      key=lambda p: (a.in_flight[p].apply_at, p))

    def _attempt(self, d: Decision) -> Any:
        if not self.steady:
            return self._drain(d)
        self.faults.trigger("sync", self.loop.step)
        for p in self._due():
            flight = self.algo.in_flight[p]
            if flight.pending is not None:
                self._wait(flight.pending.done, self._abort_keys(d))
            flight.wait()  # raises if it failed here: this member votes to skip
        return True

    def _steady_apply(self) -> None:
        if self.finishing:
            return
        for p in self._due():
            self.algo.apply_sync(p)

    @torch.no_grad()
    def _land(self, deltas: Named) -> None:
        """Every fragment's outer step at once (the outer optimizer's state is per parameter)."""
        a = self.algo
        DiLoCo.apply_outer(a, deltas)  # one outer step over every parameter (counts 1)
        a.fragment_outer_steps = [n + 1 for n in a.fragment_outer_steps]
        a.outer_steps += len(a.fragments) - 1


MEMBERSHIPS.register("delayed")(OverlapSync)
MEMBERSHIPS.register("eager")(EagerSync)
MEMBERSHIPS.register("co2")(CO2Sync)
MEMBERSHIPS.register("streaming")(StreamingSync)
