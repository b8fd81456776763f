"""``topk``, ``randomk`` and ``threshold``: send a few elements, zeros elsewhere.

Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory" (arXiv:1809.07599) for top-k and
random-k (use them with error feedback, ``ef``; random-k then with ``unbiased=false``);
Strom, "Scalable Distributed DNN Training Using Commodity GPU Cloud Computing"
(Interspeech 2015) for the threshold.

``topk`` (not summable, fixed size):

1. k = options.k, or round(ratio * n) (at least 1), clamped to n at encode;
2. keep the k elements of largest |x| (exact; :func:`lowband.compress.select.largest`: a
   sampled threshold, then ``torch.topk`` among the ~1.25 k candidates; ties broken by ``torch.topk``);
3. send their values (input dtype) and indices (:mod:`lowband.compress.indices`: the
   narrowest integer list or an n-bit bitmap, whichever is smaller) in one byte tensor;
4. every rank's payload is all-gathered and scattered into zeros.

``randomk`` (summable):

1. the k indices come from a generator seeded by (``seed``, key, step of that key): every
   rank draws the same ones, so only the k values cross the wire and are summed by an
   all-reduce; the step counter advances once per encode of a key, in lockstep on all ranks;
2. decode scatters the values and, with ``unbiased`` (default), multiplies them by n / k,
   so that E[decode(encode(x))] = x. Rescaled, its error is ~sqrt(n / k) times the input: not a
   contraction, so error feedback diverges with it; ``unbiased=false`` is one (Stich et al.).

``threshold`` (not summable, variable size: ``fixed_size = False``):

1. send every element with |x| >= ``tau`` (values and indices, as top-k; a bitmap is the mask itself);
2. the count differs between ranks and rounds; the receiver recovers it from the
   payload's length (:func:`~lowband.compress.indices.count_from_nbytes`), no header.

Strom quantizes the sent values to +-tau (1 bit each); here they travel exactly.

Example::

    agg = Aggregator(comm, build("topk:ratio=0.01", COMPRESSORS), build("ef", FEEDBACK))
    agg = Aggregator(comm, build("randomk:k=1000,seed=3,unbiased=false", COMPRESSORS), build("ef", FEEDBACK))
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Sequence, cast

import torch

from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Payload, per_matrix
from lowband.compress.indices import (
    index_nbytes, pack, pack_at_least, pack_many_at_least, scatter, unpack_dense, unpack_many_dense)
from lowband.compress.select import largest

DEFAULT_RATIO = 0.01


@dataclass(frozen=True)
class SparseOptions(CompressorOptions):
    """``ratio``: density (fraction kept, default 0.01) or ``k``: count kept; give at most one."""

    ratio: float | None = None
    k: int | None = None

    def __post_init__(self) -> None:
        if self.ratio is not None and self.k is not None:
            raise ValueError(f"give ratio or k, not both (got ratio={self.ratio}, k={self.k})")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def count(self, n: int) -> int:
        """Elements kept of ``n``: k, or round(ratio * n) but at least 1; never more than n."""
        if self.k is not None:
            return min(self.k, n)
        ratio = DEFAULT_RATIO if self.ratio is None else self.ratio
        return min(n, max(1, round(ratio * n)))


@dataclass(frozen=True)
class RandomKOptions(SparseOptions):
    """Also ``seed`` (shared by all ranks) and ``unbiased`` (rescale by n / k, default True)."""

    seed: int = 0
    unbiased: bool = True


@dataclass(frozen=True)
class ThresholdOptions(CompressorOptions):
    """``tau``: send elements with |x| >= tau (> 0)."""

    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be a finite number > 0, got {self.tau}")


def stable_seed(seed: int, key: str, step: int) -> int:
    """A 63-bit seed from (seed, key, step), equal in every process (unlike ``hash``)."""
    text = f"{seed}\x00{key}\x00{step}".encode()
    return (zlib.crc32(text) << 31 ^ zlib.crc32(text[::-1])) & ((1 << 63) - 1)


def random_subset(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct indices of range(n), uniform over k-subsets, ascending (O(k) memory when k << n)."""
    if 4 * k > n:
        # cpu: shared-seed indices, drawn on the host so that every device draws the same; moved once
        return torch.randperm(n, generator=generator)[:k].sort().values
    drawn = torch.empty(0, dtype=torch.int64)
    while drawn.numel() < k:  # draws with repetition; the set of distinct draws is exchangeable
        more = torch.randint(0, n, (2 * k + 16,), generator=generator)
        drawn = torch.cat([drawn, more]).unique()
    keep = torch.randperm(drawn.numel(), generator=generator)[:k]  # a uniform k-subset of it
    return drawn[keep].sort().values


class _Sparse(Compressor):
    """Values + indices in one uint8 tensor; decoded by scattering into zeros."""

    contraction = True  # the kept elements exactly, zeros elsewhere

    def decode(self, payload: Payload) -> torch.Tensor:
        shape, dtype, k = payload.ctx
        return unpack_dense(payload.tensors[0], shape, dtype, k)

    def _payload(self, flat: torch.Tensor, idx: torch.Tensor, shape: torch.Size, k: int | None) -> Payload:
        return Payload([pack(flat[idx], idx, flat.numel())], ctx=(shape, flat.dtype, k))


@COMPRESSORS.register("topk")
class TopK(_Sparse):
    """The k elements of largest magnitude; see the module docstring."""

    name = "topk"
    Options = SparseOptions

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        count = cast(SparseOptions, options).count  # fp32 values + packed indices
        return per_matrix(numel, side, lambda n: 4 * count(n) + index_nbytes(n, count(n)))

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.detach().reshape(-1)
        k = self.options.count(flat.numel())
        return self._payload(flat, largest(flat, k), x.shape, k)


@COMPRESSORS.register("threshold")
class Threshold(_Sparse):
    """Every element with |x| >= tau; see the module docstring."""

    name = "threshold"
    fixed_size = False
    Options = ThresholdOptions

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        tau = cast(ThresholdOptions, options).tau
        raise ValueError(f"threshold:tau={tau} sends a data-dependent count: plan it as topk:ratio=R")

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.detach().reshape(-1)
        return Payload([pack_at_least(flat, self.options.tau)], ctx=(x.shape, flat.dtype, None))  # k: from its length

    def encode_many(self, xs: Sequence[torch.Tensor], keys: Sequence[str]) -> list[Payload]:
        """:meth:`encode` of each; the small CPU tensors in one NumPy pass (:mod:`lowband.compress.bitmaps`)."""
        flats = [x.detach().reshape(-1) for x in xs]
        return [Payload([blob], ctx=(x.shape, flat.dtype, None))
                for x, flat, blob in zip(xs, flats, pack_many_at_least(flats, self.options.tau))]

    def decode_many(self, payloads: Sequence[Payload]) -> list[torch.Tensor]:
        """:meth:`decode` of each; the small CPU bitmaps of each dtype into one zeroed array."""
        dtypes = [p.ctx[1] for p in payloads]
        out: list[torch.Tensor | None] = [None] * len(payloads)
        for dtype in dict.fromkeys(dtypes):
            picked = [i for i, d in enumerate(dtypes) if d == dtype]
            decoded = unpack_many_dense([(payloads[i].tensors[0], payloads[i].ctx[0], None) for i in picked], dtype)
            for i, tensor in zip(picked, decoded):
                out[i] = tensor
        return cast(list[torch.Tensor], out)


@COMPRESSORS.register("randomk")
class RandomK(Compressor):
    """k elements at indices every rank draws alike; summable. See the module docstring."""

    name = "randomk"
    summable = True
    Options = RandomKOptions

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        count = cast(RandomKOptions, options).count  # fp32 values only: the indices come from the shared seed
        return per_matrix(numel, side, lambda n: 4 * count(n))

    def is_contraction(self) -> bool:
        """Only without the n / k rescaling (``unbiased=false``): rescaled, its error is ~sqrt(n / k) x the input."""
        return not self.options.unbiased

    def __init__(self, options: RandomKOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.steps: dict[str, int] = {}

    def indices(self, key: str, n: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ascending indices ``key`` sends at ``step`` (identical on every rank), on ``device``.

        Drawn on the CPU, so that they are the same whatever the device, then moved (k int64 values)."""
        generator = torch.Generator().manual_seed(stable_seed(self.options.seed, key, step))
        return random_subset(n, self.options.count(n), generator).to(device, non_blocking=True)

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.detach().reshape(-1)
        step = self.steps.get(key, 0)
        self.steps[key] = step + 1
        idx = self.indices(key, flat.numel(), step, flat.device)
        scale = flat.numel() / idx.numel() if self.options.unbiased and idx.numel() else 1.0
        return Payload([flat[idx]], ctx=(x.shape, x.dtype, idx, scale))

    def decode(self, payload: Payload) -> torch.Tensor:
        shape, dtype, idx, scale = payload.ctx
        values = payload.tensors[0].float() * scale if scale != 1.0 else payload.tensors[0]
        return scatter(values, idx, shape, dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": dict(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = dict(state["steps"])
