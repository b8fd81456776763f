"""Compressed averaging: compensate -> encode -> communicate -> decode -> update.

:class:`Aggregator` replaces a set of named tensors (gradients, DiLoCo's outer gradients)
with their mean over ranks, as it crosses the wire in compressed form:

1. guard: a rank whose input holds NaN/inf sends zeros and is excluded from the round
   (logged with rank, tensor and step; :mod:`lowband.comm.guards`); all ranks invalid:
   :class:`NonFiniteError`;
2. group: tensors of fewer than ``small_numel`` elements are concatenated into one
   bucket per dtype, keyed by :func:`small_key` (compressing a 128-element bias alone is waste);
3. per group: ``feedback.compensate`` then ``compressor.exchange`` (a generator with one
   payload per round);
4. per round, every group's payload travels in one flat buffer (chunked to
   ``bucket_mb``): summed by all-reduce when the compressor is summable, otherwise
   all-gathered as bytes and handed back per rank (robust ``rule``: always all-gathered,
   decoded per rank and combined by the rule, :mod:`lowband.comm.robust`); a
   ``requantizable`` quantiser under the mean takes the two-phase reduce-scatter whose bytes
   stay flat in n where the cost model prefers it (:mod:`lowband.comm.two_phase`);
5. ``feedback.update`` with what this rank's payload decoded to, ``feedback.finalize``
   on the mean, and the result is written back in place.

The ledger therefore charges exactly the payload bytes: no headers are sent, since shapes
and dtypes are known to every rank, except the all-gather trailer (1 valid-flag byte, plus a
4-byte CRC-32 with ``checksum``). Exclusions cost nothing while every rank is healthy; see
docs/robustness.md for what a fault costs. With ``world_size == 1`` the same
pipeline runs without communicating, so compression error is visible in one process too.
"""

from __future__ import annotations

import math
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from lowband.comm import guards
from lowband.comm.buffers import flat_or_self, small_key, write_back
from lowband.comm.comm import Comm, PendingMean
from lowband.comm.guards import NonFiniteError
from lowband.comm.robust import Mean, Rule
from lowband.comm.tamper import Tamper
from lowband.comm.wire import PayloadWire
from lowband.comm.two_phase import TwoPhase, prefer
from lowband.compress.base import Compressor, Payload, RunningMean, running_mean
from lowband.feedback.base import Feedback

COLLECTIVES = ("auto", "all_reduce", "all_gather", "two_phase")
__all__ = ["Aggregator", "NonFiniteError", "PendingMean", "small_key"]


class Aggregator:
    """Mean of named tensors over ranks through ``compressor`` with ``feedback``.

    Example::

        agg = Aggregator(comm, build("topk:ratio=0.01", COMPRESSORS), build("ef", FEEDBACK))
        agg.mean_([(name, p.grad) for name, p in model.named_parameters()])
    """

    def __init__(self, comm: Comm, compressor: Compressor, feedback: Feedback, tag: str = "grads",
                 small_numel: int = 4096, bucket_mb: float = 25.0, collective: str = "auto",
                 rule: Rule | None = None, attack: Tamper | None = None, checksum: bool = False,
                 requant: Compressor | None = None) -> None:
        if collective not in COLLECTIVES:
            raise ValueError(f"unknown collective {collective!r}; choose one of: {', '.join(COLLECTIVES)}")
        if collective == "all_reduce" and not compressor.summable:
            raise ValueError(f"compressor {compressor.name!r} cannot use all_reduce: its payloads from different "
                             "ranks cannot be summed (different indices, scales or codes); use all_gather or auto")
        if collective == "all_gather" and compressor.summable:
            raise ValueError(f"compressor {compressor.name!r} is summable: all_gather would move n times the bytes "
                             "of all_reduce for the same result; use all_reduce or auto")
        if small_numel < 0 or bucket_mb <= 0:
            raise ValueError(f"small_numel must be >= 0 and bucket_mb > 0, got {small_numel} and {bucket_mb}")
        self.rule = rule if rule is not None else Mean()
        self.robust = not isinstance(self.rule, Mean)
        if self.robust and type(compressor).exchange is not Compressor.exchange:
            raise ValueError(f"aggregation rule {self.rule.name!r} needs every rank's decoded contribution; "
                             f"compressor {compressor.name!r} exchanges in several summed rounds: use identity, "
                             "a half-precision, sparse or quantising compressor, or aggregate=mean")
        if self.robust and collective == "all_reduce":
            raise ValueError(f"aggregation rule {self.rule.name!r} needs every rank's contribution: all_gather")
        if checksum and compressor.summable and not self.robust:
            raise ValueError("checksum needs the all-gather path (a non-summable compressor or a robust aggregate "
                             "rule): summed all-reduce payloads carry no per-rank checksum")
        self.attack = attack if attack is not None else Tamper()
        self.comm, self.compressor, self.feedback, self.tag = comm, compressor, feedback, tag
        compressor.for_rank(comm.rank)
        self.small_numel = small_numel
        self.wire = PayloadWire(comm, tag, int(bucket_mb * 1e6), self.attack, checksum,
                                fixed_size=getattr(compressor, "fixed_size", True))
        self._pool: ThreadPoolExecutor | None = None
        # quantisers under the plain mean: a reduce-scatter whose bytes stay flat in n (comm/two_phase.py)
        flat_in_n = compressor.requantizable and not self.robust and not checksum and self.attack.idle
        self.two_phase = TwoPhase(comm, compressor, tag, requant) if flat_in_n and collective != "all_gather" else None
        if collective == "two_phase" and self.two_phase is None:
            raise ValueError(f"two_phase needs a requantizable compressor (qsgd, int8, terngrad; not "
                             f"{compressor.name!r}) under aggregate=mean, without checksum or a simulated attack")
        self.collective = collective

    def mean_(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Replace every tensor of ``named`` in place with its mean over ranks (blocks)."""
        self.mean_async(named).wait()

    def mean_async(self, named: Sequence[tuple[str, torch.Tensor]]) -> PendingMean:
        """Start :meth:`mean_` on the aggregator's thread; ``wait()`` on the result finishes it.

        The tensors must not be touched until then. Every call, sync or async, runs on one
        thread in call order, so collectives keep the same order on every rank. Non-finite
        input is detected here, before anything is sent: in a world of one it raises
        :class:`NonFiniteError`; otherwise this rank's contribution is excluded (logged).
        """
        bad = guards.first_non_finite(named)
        step = self.comm.ledger.step
        if bad is not None:
            if self.comm.world_size == 1:
                raise guards.refuse(bad)
            guards.warn_own(self.comm.rank, self.tag, step, bad)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowband-aggregate")
        return PendingMean(self.comm, self._pool.submit(self._run, list(named), step, bad))

    def mean_at(self, named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        """:meth:`mean_` on the calling thread, its records stamped with ``step``: for a caller that
        already runs on its own thread (:class:`~lowband.comm.hierarchy.HierarchicalAggregator`)."""
        bad = guards.first_non_finite(named)
        if bad is not None:
            if self.comm.world_size == 1:
                raise guards.refuse(bad)
            guards.warn_own(self.comm.rank, self.tag, step, bad)
        self._run(list(named), step, bad)

    def _run(self, named: list[tuple[str, torch.Tensor]], step: int, bad: str | None) -> list[int]:
        """The mean on this thread; the ledger indices of its collectives (stamped by ``PendingMean.wait``)."""
        records: list[int] = []
        with torch.no_grad(), self.comm.background(step, records):
            self._mean(named, step, bad)
        return records

    def state_dict(self) -> dict[str, Any]:
        """What this pipeline remembers between rounds: compressor, feedback and rule state."""
        own = self.two_phase is not None and self.two_phase.requant is not self.compressor
        return {"compressor": self.compressor.state_dict(), "feedback": self.feedback.state_dict(),
                "rule": self.rule.state_dict(), **({"requant": self.two_phase.requant.state_dict()} if own else {})}

    def metrics(self) -> dict[str, Any]:
        """The compressor's numbers for the metrics row (:meth:`Compressor.metrics`)."""
        return self.compressor.metrics()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.compressor.load_state_dict(state["compressor"])
        self.feedback.load_state_dict(state["feedback"])
        self.rule.load_state_dict(state.get("rule", {}))  # checkpoints from before robust rules have none
        if "requant" in state and self.two_phase is not None:
            self.two_phase.requant.load_state_dict(state["requant"])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _mean(self, named: Sequence[tuple[str, torch.Tensor]], step: int = 0, bad: str | None = None) -> None:
        groups = self._groups(named)
        valid = bad is None
        inputs = {key: self.feedback.compensate(key, flat_or_self(members)) if valid
                  else torch.zeros_like(flat_or_self(members)) for key, members in groups.items()}
        if valid and self.attack.applies(self.comm.rank):
            inputs = {key: self.attack(x, self.comm.rank, step, key) for key, x in inputs.items()}
        if self.robust:
            results = self._robust(inputs, valid, step)
        elif self.compressor.summable:
            results = self._summed(inputs, valid, step)
        elif self._flat_in_n(inputs):
            results = self.two_phase.mean(inputs, valid, step)  # type: ignore[union-attr]
        else:
            results = self._rounds(inputs, valid, step)
        for key, members in groups.items():
            mean, own = results[key]
            if valid:
                self.feedback.update(key, inputs[key], own)
            write_back(self.feedback.finalize(key, mean), members)

    # -- the paths --------------------------------------------------------------------------
    def _flat_in_n(self, inputs: dict[str, torch.Tensor]) -> bool:
        """Two-phase for this call: forced, or cheaper by the cost model on this rank's ring link."""
        if self.two_phase is None or self.comm.world_size < 2:
            return False
        c = self.compressor
        payload = sum(sum(type(c).wire_bytes(c.options, x.numel(), max(1, math.isqrt(x.numel()))))
                      for x in inputs.values())
        return self.collective == "two_phase" or prefer(round(payload), self.comm.world_size, self.comm.ring_link)

    def _rounds(self, inputs: dict[str, torch.Tensor], valid: bool, step: int,
                poison: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """The compressor's rounds; None if a summed round 1 is non-finite (``poison``: this rank's is)."""
        n = self.comm.world_size
        if not self.compressor.summable and type(self.compressor).exchange is Compressor.exchange:
            return self._gathered(inputs, valid, step)
        exchanges = {key: self.compressor.exchange(x, key, n) for key, x in inputs.items()}
        pending = {key: next(ex) for key, ex in exchanges.items()}
        results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        first, mask = True, [True] * n
        received: dict[str, Payload | list[Payload]]
        while pending:
            if self.compressor.summable:
                summed = self.wire.all_reduce(pending, poison=first and poison)
                if first and not guards.all_finite([t for p in summed.values() for t in p.tensors
                                                    if t.is_floating_point()]):  # host sync: one per call
                    for ex in exchanges.values():
                        ex.close()
                    return None
                received = dict(summed)
            else:
                gathered, ok = self.wire.all_gather(pending, valid, step)
                mask = [a and b for a, b in zip(mask, ok)]
                received = {key: [p for p, keep in zip(ps, mask) if keep] for key, ps in gathered.items()}
            first = False
            nxt: dict[str, Payload] = {}
            for key, answer in received.items():
                try:
                    nxt[key] = exchanges[key].send(answer)
                except StopIteration as done:
                    results[key] = done.value
            pending = nxt
        return results

    def _gathered(self, inputs: dict[str, torch.Tensor], valid: bool,
                  step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`Compressor.exchange`'s one all-gather round for every group at once: one ``encode_many``,
        one ``decode_many`` per sender (a compressor may batch them: lowband.compress.batched)."""
        keys = list(inputs)
        own = dict(zip(keys, self.compressor.encode_many([inputs[key] for key in keys], keys)))
        gathered, ok = self.wire.all_gather(own, valid, step)
        received = {key: [p for p, keep in zip(ps, ok) if keep] for key, ps in gathered.items()}
        senders = [r for r in range(self.comm.world_size) if ok[r]]
        means = [RunningMean() for _ in keys]  # one sender decoded at a time: its tensors and the sums held, not n
        for j in range(len(senders)):
            for acc, decoded in zip(means, self.compressor.decode_many([received[key][j] for key in keys])):
                acc.add(decoded)
        mine = self.compressor.decode_many([own[key] for key in keys])
        results = {key: (acc.mean(), mine_i) for key, acc, mine_i in zip(keys, means, mine)}
        return self._receiver_check(results, received, senders, step)

    def _receiver_check(self, results: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        received: dict[str, Any], ranks: list[int],
                        step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Receivers check what they got (a sender's own guard ran before any attack or fault): a
        non-finite mean is traced to the senders whose decoded payloads are non-finite, which are
        named and excluded; every rank decodes the same bytes, so all exclude alike."""
        if guards.all_finite([mean for mean, _ in results.values()]):  # host sync: one per call
            return results
        decoded = {key: [self.compressor.decode(p) for p in ps] for key, ps in received.items()}
        ok = guards.finite_per_rank([[d[i] for d in decoded.values()] for i in range(len(ranks))])
        keep = guards.finite_senders(ok, ranks, self.comm.rank, self.tag, step)
        if len(keep) == len(ranks):
            raise NonFiniteError(f"{self.tag}: the mean is non-finite although every sender's values are finite "
                                 "(overflow?)")
        return {key: (running_mean(ds[i] for i in keep), results[key][1]) for key, ds in decoded.items()}

    def _summed(self, inputs: dict[str, torch.Tensor], valid: bool,
                step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """All-reduce path. An invalid rank poisons its round-1 payload with NaN, so every rank sees
        a non-finite sum; only then do ranks exchange validity flags and redo the round without it."""
        snapshot = self.compressor.state_dict()
        results = self._rounds(inputs, valid, step, poison=not valid)
        if results is not None:
            return results
        n = self.comm.world_size
        flags = torch.zeros(n, dtype=torch.float32, device=self._device(inputs))
        flags[self.comm.rank] = float(valid)
        self.comm.all_reduce(flags, tag=f"{self.tag}.valid")
        excluded = [r for r, flag in enumerate(flags.tolist()) if flag == 0]  # host sync: who is excluded
        if not excluded:
            raise NonFiniteError(self._who_sent_non_finite(inputs))
        if len(excluded) == n:
            raise guards.refuse(f"{self.tag}: every rank's contribution is non-finite")
        guards.warn_excluded(self.comm.rank, self.tag, step, excluded, "non-finite")
        self.compressor.load_state_dict(snapshot)
        redone = self._rounds(inputs, valid, step)
        if redone is None:
            raise NonFiniteError(f"{self.tag}: the summed payload is non-finite without the excluded ranks")
        scale = n / (n - len(excluded))
        return {key: (mean * scale, own) for key, (mean, own) in redone.items()}

    def _who_sent_non_finite(self, inputs: dict[str, torch.Tensor]) -> str:
        """Why a sum is non-finite although every rank's input passed its guard: each rank reports
        whether what it actually sent (after a simulated attack or fault) was finite; a sum cannot
        be traced further, so the run stops naming those ranks (a robust rule would exclude them)."""
        flags = torch.zeros(self.comm.world_size, dtype=torch.float32, device=self._device(inputs))
        flags[self.comm.rank] = float(guards.all_finite(list(inputs.values())))
        self.comm.all_reduce(flags, tag=f"{self.tag}.valid")
        senders = [r for r, flag in enumerate(flags.tolist()) if flag == 0]  # host sync: the culprits
        if senders:
            return (f"{self.tag}: rank(s) {', '.join(map(str, senders))} sent non-finite values after their guard; "
                    "the mean of a sum cannot exclude them: use a robust --aggregate (median, trimmed-mean, "
                    "centered-clip), which excludes such senders")
        return (f"{self.tag}: the summed payload is non-finite although every rank sent finite values "
                "(overflow in a low-precision sum?)")

    def _robust(self, inputs: dict[str, torch.Tensor], valid: bool,
                step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every rank's payload all-gathered, decoded, and combined by the rule over the whole call."""
        keys = list(inputs)
        payloads = dict(zip(keys, self.compressor.encode_many([inputs[key] for key in keys], keys)))
        gathered, mask = self.wire.all_gather(payloads, valid, step)
        ranks = [r for r in range(self.comm.world_size) if mask[r]]
        rows = torch.stack([torch.cat([d.reshape(-1).float() for d in self.compressor.decode_many(
            [gathered[key][r] for key in keys])]) for r in ranks])
        ok = torch.isfinite(rows).all(1).tolist()  # host sync: receivers check every sender's decoded values
        keep = guards.finite_senders(ok, ranks, self.comm.rank, self.tag, step)  # alike on every rank
        if len(keep) < len(ranks):
            rows, ranks = rows[torch.tensor(keep, device=rows.device)], [ranks[i] for i in keep]
        aggregate = self.rule("|".join(inputs), rows, ranks)
        results, offset = {}, 0
        for (key, x), own in zip(inputs.items(), self.compressor.decode_many([payloads[key] for key in keys])):
            results[key] = (aggregate[offset:offset + x.numel()].view(x.shape).to(x.dtype), own)
            offset += x.numel()
        return results

    # -- grouping -------------------------------------------------------------------------
    def _groups(self, named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        groups: dict[str, list[torch.Tensor]] = {}
        small: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = defaultdict(list)
        for name, t in named:
            if t.numel() < self.small_numel:
                small[t.dtype].append((name, t))
            else:
                groups[name] = [t]
        for dtype, members in small.items():
            groups[small_key(dtype, [name for name, _ in members])] = [t for _, t in members]
        return groups

    @staticmethod
    def _device(inputs: dict[str, torch.Tensor]) -> torch.device:
        """The device of the tensors being averaged (where flags that travel with them must live)."""
        return next(iter(inputs.values())).device if inputs else torch.device("cpu")
