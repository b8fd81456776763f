"""The compressor contract: what a tensor becomes on the wire, and back. Pure: never communicates.

A compressor turns a tensor into a :class:`Payload` — the tensors that cross the wire
plus a local context that never does (shape, dtype: what every receiver knows already) —
and decodes payloads back. Its ``nbytes`` is the exact byte count the ledger charges.

Two kinds, declared by ``summable``:

* summable (fp16, PowerSGD factors, shared-seed random-k): payloads of all ranks can be
  summed element-wise by an all-reduce and ``decode(sum of payloads) == sum of decodes``;
* not summable (top-k, sign, QSGD): every rank's payload is all-gathered and decoded one
  by one.

The aggregator hands a single-round, non-summable compressor all of a call's groups at once
(:meth:`Compressor.encode_many`, :meth:`Compressor.decode_many`; by default one by one): a
compressor may do small tensors' work in a few large ops (:mod:`lowband.compress.batched`), as
long as every payload is the one ``encode`` would give (size, meaning) and decodes alike.

Multi-round compressors (PowerSGD) override :meth:`Compressor.exchange`, a generator that
yields one payload per communication round and receives the reduced result; the caller
(:class:`lowband.comm.aggregate.Aggregator`) does the communicating.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Generator, Iterable, Sequence, Union

import torch

from lowband.registry import Registry, build, options_from, parse_spec  # noqa: F401  (re-exported)


@dataclass
class Payload:
    """``tensors`` cross the wire; ``ctx`` stays local (it must not depend on the rank's data)."""

    tensors: list[torch.Tensor]
    ctx: Any = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


@dataclass(frozen=True)
class CompressorOptions:
    """Base for compressor options (frozen, validated in ``__post_init__``)."""


Received = Union[Payload, list[Payload]]  # the summed payload, or every rank's payload in rank order
Exchange = Generator[Payload, Received, tuple[torch.Tensor, torch.Tensor]]


class Compressor(ABC):
    """Base class. Subclasses set ``name``, ``summable``, ``Options`` and register in COMPRESSORS."""

    name: ClassVar[str] = ""
    summable: ClassVar[bool] = False
    contraction: ClassVar[bool] = False  # ||C(x) - x|| <= ||x||: see is_contraction
    fixed_size: ClassVar[bool] = True  # the payload's size depends on the input's shape only (else sizes go first)
    # chunks of a tensor can be encoded alone, their decoded mean encoded again: the two-phase
    # reduce-scatter whose bytes stay flat in n may carry it (lowband.comm.two_phase)
    requantizable: ClassVar[bool] = False
    # the error feedback ``lowband train --feedback default`` pairs it with when it is chosen (a paper's
    # own pairing, where measured to help: docs/compression.md); ``--feedback none`` opts out
    paper_feedback: ClassVar[str] = "none"
    Options: ClassVar[type[CompressorOptions]] = CompressorOptions
    PROBE_SIDE: ClassVar[int] = 256  # the default wire model encodes one matrix of at most this side

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        """Bytes one rank sends per communication round for ``numel`` fp32 elements held in
        ``side x side`` matrices: the planner's wire model (``lowband plan``).

        Default, for any compressor: measured. One random matrix of side ``min(side, PROBE_SIDE)``
        goes through :meth:`exchange` (world of one) and each round's payload bytes are scaled by
        ``numel`` / the probe's elements. Compressors whose bytes do not scale linearly with the
        matrix (PowerSGD's d r per matrix) or that are cheaper to count override it exactly."""
        d = max(1, min(side, cls.PROBE_SIDE, math.isqrt(max(numel, 1))))
        probe = torch.randn(d, d, generator=torch.Generator().manual_seed(0))  # cpu: a planning probe
        rounds: list[float] = []
        compressor = cls(options)
        steps = compressor.exchange(probe, "probe", 1)
        try:
            payload = next(steps)
            while True:
                rounds.append(payload.nbytes * numel / probe.numel())
                payload = steps.send(payload if compressor.summable else [payload])
        except StopIteration:
            return tuple(rounds)

    def __init__(self, options: CompressorOptions | None = None, **kwargs: Any) -> None:
        """``PowerSGD(PowerSGDOptions(rank=2))`` or ``PowerSGD(rank=2)``: the options, validated."""
        self.options = options_from(type(self).Options, options, kwargs)

    def is_contraction(self) -> bool:
        """Whether its error is never larger than its input (||C(x) - x|| <= ||x||), which error feedback
        needs to keep its residual bounded (Stich et al., arXiv:1809.07599; Karimireddy et al.,
        arXiv:1901.09847). Unbiased compressors whose variance exceeds the input's norm
        (rescaled random-k or sketch, QSGD at 2 or 4 bits, TernGrad) are not: with feedback they diverge."""
        return self.contraction

    @abstractmethod
    def encode(self, x: torch.Tensor, key: str) -> Payload:
        """Compress ``x`` (any shape, float dtype); ``key`` names the tensor (state is kept per key)."""

    @abstractmethod
    def decode(self, payload: Payload) -> torch.Tensor:
        """The tensor a payload stands for (shape and dtype of the encoded input)."""

    def encode_many(self, xs: Sequence[torch.Tensor], keys: Sequence[str]) -> list[Payload]:
        """Each tensor's payload, as :meth:`encode` gives it one by one (the default). A compressor may do
        the work of many tensors in a few large ops (QSGD): each payload keeps its size and meaning."""
        return [self.encode(x, key) for x, key in zip(xs, keys)]

    def decode_many(self, payloads: Sequence[Payload]) -> list[torch.Tensor]:
        """What each payload stands for, as :meth:`decode` gives it one by one (the default)."""
        return [self.decode(p) for p in payloads]

    def exchange(self, x: torch.Tensor, key: str, world_size: int) -> Exchange:
        """Rounds of communication for one tensor; returns (mean over ranks, own decoded).

        Single round by default. Summable: encode x / n, so the summed payload decodes to
        the mean (and fp16 sums cannot overflow where fp32 would not). Otherwise: decode
        every rank's payload and average.
        """
        if self.summable:
            own = self.encode(x / world_size, key)
            summed = yield own
            assert isinstance(summed, Payload)
            return self.decode(summed), self.decode(own) * world_size
        own = self.encode(x, key)
        everyone = yield own
        assert isinstance(everyone, list)
        return running_mean(self.decode(p) for p in everyone), self.decode(own)

    def for_rank(self, rank: int) -> None:
        """Called once by the aggregator with this process's rank (seeded compressors draw
        independent noise per rank; shared-seed ones, like random-k, must not)."""

    def metrics(self) -> dict[str, Any]:
        """Numbers for the metrics row at each evaluation (lgreco: its per-layer choices); default none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RunningMean:
    """The mean of equally shaped tensors added one at a time, into one new accumulator (fp32 at least: fp16 and
    bf16 sums are kept in fp32, as ``torch.mean`` keeps them), returned in their dtype. Holds the sum and nothing
    else, where stacking every sender's decoded tensor held n of them (n workers' gradients)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0
        self.dtype = torch.float32

    def add(self, t: torch.Tensor) -> None:
        if self.total is None:
            self.dtype = t.dtype
            self.total = t.to(torch.promote_types(t.dtype, torch.float32), copy=True)  # never the caller's memory
        else:
            self.total.add_(t)
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("the mean of no tensors")
        return self.total.div_(self.count).to(self.dtype)


def running_mean(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """:class:`RunningMean` of ``tensors``."""
    acc = RunningMean()
    for t in tensors:
        acc.add(t)
    return acc.mean()


def per_matrix(numel: int, side: int, per: Callable[[int], float]) -> tuple[float]:
    """One round of ``per(elements)`` bytes for each ``side x side`` matrix of ``numel`` elements (the last partial)."""
    full, rest = divmod(numel, side * side)
    return (full * per(side * side) + (per(rest) if rest else 0),)


COMPRESSORS: Registry[type[Compressor]] = Registry("compressor")
