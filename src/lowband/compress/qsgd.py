"""``qsgd``: stochastic uniform quantization (unbiased), with the paper's bucketing.

Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
Encoding" (arXiv:1610.02132). ``qsgd`` splits x into buckets of ``bucket`` consecutive
elements (the paper's bucketing, default 512; 0 = the whole tensor is one bucket) and sends
``4 * buckets + ceil(n * bits / 8)`` bytes:

1. norm_b = ||x_b||_2 per bucket (fp32, in the payload); s = 2**(bits-1) - 1 levels;
2. r_i = s * x_i / norm_b(i) in [-s, s]; l_i = floor(|r_i|);
3. level_i = sign(r_i) (l_i + 1) with probability |r_i| - l_i, else sign(r_i) l_i (so
   E[level_i] = r_i: unbiased);
4. code_i = level_i + s in [0, 2 s], packed at ``bits`` in {2, 4, 8} (offset binary: the
   2 s + 1 levels of sign and magnitude, one code unused);
5. decode: (code_i - s) * norm_b(i) / s.

How (:mod:`lowband.compress.quant`): steps 2-4 are one stochastic rounding of r_i + s, whose
distribution is exactly the paper's sign-and-magnitude rounding, with 16-bit uniforms; the
decode looks each packed byte up in a table of levels and scales each bucket in place.

The variance grows with the bucket size (the paper's bound is min(d/s^2, sqrt(d)/s) for a
bucket of d elements): one norm for a 1M-element tensor at 4 bits gives an error ten
times the tensor's norm; buckets of 512 keep it near one, for 4/512 extra bytes per element.

Randomness comes from a ``torch.Generator`` owned by the compressor (option ``seed``,
default 0), on the input's device; ``state_dict`` saves its state, so a resumed run draws
the same numbers. The aggregator calls ``for_rank`` so that every rank draws independent
noise (seed + 1000003 * rank); otherwise ranks with similar inputs would make correlated
rounding errors that average out less.

Example::

    c = build("qsgd:bits=4", COMPRESSORS)
    payload = c.encode(grad, "layer.weight")   # nbytes = ceil(grad.numel() / 2) + 4 per 512
    approx = c.decode(payload)                 # E[approx] == grad
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence, cast

import numpy as np
import torch

from lowband import devices
from lowband.compress import batched, scratch
from lowband.compress.base import COMPRESSORS, CompressorOptions, Payload, per_matrix
from lowband.compress.packing import decode_levels, pack
from lowband.compress.quant import (
    NOISE_OFFSET, NUMPY_MIN_NUMEL, SeededCompressor, check_int, flat_fp32, per_group, restore, rows_and_tail)
from lowband.compress.select import CHUNK


_LEVELS: dict[int, dict[torch.device, torch.Tensor]] = {2: {}, 4: {}, 8: {}}  # code - s, per width and device


@dataclass(frozen=True)
class QSGDOptions(CompressorOptions):
    bits: int = 4
    bucket: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (2, 4, 8):
            raise ValueError(f"qsgd:bits must be one of 2, 4, 8, got {self.bits!r}")
        check_int("qsgd:bucket", self.bucket, 0)
        check_int("qsgd:seed", self.seed, 0)


@COMPRESSORS.register("qsgd")
class QSGD(SeededCompressor):
    name = "qsgd"
    summable = False
    requantizable = True  # buckets of a chunk quantise alone (lowband.comm.two_phase)
    Options: ClassVar[type[CompressorOptions]] = QSGDOptions

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        o = cast(QSGDOptions, options)  # fp32 norm per bucket + bits per element, packed
        return per_matrix(numel, side, lambda n: 4 * math.ceil(n / (o.bucket or n)) + math.ceil(n * o.bits / 8))

    @property
    def bits(self) -> int:
        return int(self.options.bits)  # type: ignore[attr-defined]

    @property
    def levels(self) -> int:
        """s: the magnitudes 0..s on each side of zero."""
        return (1 << (self.bits - 1)) - 1

    def _bucket(self, n: int) -> int:
        return int(self.options.bucket) or max(n, 1)  # type: ignore[attr-defined]

    def is_contraction(self) -> bool:
        """Unbiased with variance omega ||x||^2, omega = min(b / s^2, sqrt(b) / s) for buckets of b
        elements and s levels (Alistarh et al., Lemma 3.1): a contraction in expectation when omega < 1
        (8 bits, s = 127, b = 512: 0.03), not at 2 or 4 bits (4 bits: 3.2) nor with one bucket per tensor."""
        b, s = int(self.options.bucket), self.levels  # type: ignore[attr-defined]
        return b > 0 and min(b / s ** 2, math.sqrt(b) / s) < 1

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        return Payload(list(self._quantize(flat_fp32(x))), ctx=(x.shape, x.dtype))

    def _quantize(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-4 on a flat fp32 tensor: (the buckets' norms, the packed codes)."""
        n, s = flat.numel(), self.levels
        bucket = self._bucket(n)
        norms = bucket_norms(flat, bucket)  # (ceil(n / bucket),)
        scale = torch.where(norms > 0, s / norms, torch.zeros_like(norms))
        if flat.device.type == "cpu" and n >= NUMPY_MIN_NUMEL and (bucket >= n or CHUNK % bucket == 0) \
                and bool(torch.isfinite(scale).all()):
            shifted = _shifted(flat.contiguous().numpy(), bucket, scale.numpy(), np.float32(s + NOISE_OFFSET))
            return norms, self.round_pack_cpu(n, shifted, 2 * s, self.bits)  # steps 2-4 in NumPy, same bytes
        y = per_group(torch.mul, flat, bucket, scale, scratch.buffer("qsgd.y", n, torch.float32, flat.device))
        y.add_(s + NOISE_OFFSET)  # r + s >= 0, ready for the rounding
        codes = self.round_stochastic(y, 2 * s, scratch.buffer("qsgd.codes", n, torch.uint8, flat.device))
        return norms, pack(codes, self.bits, check=False)

    def decode(self, payload: Payload) -> torch.Tensor:
        norms, packed = payload.tensors
        n = math.prod(payload.ctx[0])
        out = self._levels_of(packed.reshape(-1), n)
        per_group(torch.mul, out, self._bucket(n), norms.to(torch.float32) / self.levels, out)
        return restore(out, payload.ctx)

    def _levels_of(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        """Step 5 before scaling: code - s for the first ``n`` codes of the flat ``packed``, fp32."""
        s = self.levels
        out = scratch.fresh(n, torch.float32, packed.device)
        if self.bits == 8:  # a byte per code: the conversion is the table
            return out.copy_(packed[:n]).sub_(s)
        levels = devices.cached(_LEVELS[self.bits], packed.device,
                                lambda d: torch.arange(-s, (1 << self.bits) - s, dtype=torch.float32, device=d))
        return decode_levels(packed, self.bits, n, levels, out)

    def encode_many(self, xs: Sequence[torch.Tensor], keys: Sequence[str]) -> list[Payload]:
        """:meth:`encode` of each, the small ones quantised in one pass (:mod:`lowband.compress.batched`)."""
        return batched.encode_many(self, xs, keys, int(self.options.bucket), 8 // self.bits,  # type: ignore[attr-defined]
                                   lambda flats, lay: batched.split(lay, *self._quantize(batched.pad_cat(flats, lay)),
                                                                    per_tensor_scale=False))

    def decode_many(self, payloads: Sequence[Payload]) -> list[torch.Tensor]:
        """:meth:`decode` of each, the small ones in one table gather and one scaling."""
        return batched.decode_many(self, payloads, int(self.options.bucket), 8 // self.bits,  # type: ignore[attr-defined]
                                   self._decode_batch)

    def _decode_batch(self, norms: torch.Tensor, packed: torch.Tensor, lay: batched.Layout) -> torch.Tensor:
        values = self._levels_of(packed, packed.numel() * lay.per)
        return batched.scale(values, lay, norms.to(torch.float32) / self.levels, per_tensor_scale=False)


def _shifted(src: np.ndarray, bucket: int, scale: np.ndarray, offset: np.float32
             ) -> Callable[[int, int, np.ndarray], None]:
    """``shifted(lo, hi, y)``: ``y = x[lo:hi] * scale of its bucket + offset`` (``lo`` on a bucket boundary), the
    NumPy twin of the torch path's per-bucket multiply and add."""

    def shifted(lo: int, hi: int, y: np.ndarray) -> None:
        full = (hi - lo) // bucket if bucket < src.size else 0
        first = lo // bucket
        if full:
            np.multiply(src[lo:lo + full * bucket].reshape(full, bucket), scale[first:first + full, None],
                        out=y[:full * bucket].reshape(full, bucket))
        if lo + full * bucket < hi:  # the last, partial bucket (or the one bucket of the tensor)
            np.multiply(src[lo + full * bucket:hi], scale[-1], out=y[full * bucket:])
        np.add(y, offset, out=y)

    return shifted


def bucket_norms(flat: torch.Tensor, bucket: int) -> torch.Tensor:
    """||x_b||_2 of each bucket of ``bucket`` consecutive elements, fp32 (one norm for n = 0)."""
    if flat.numel() == 0:
        return torch.zeros(1, device=flat.device)
    rows, tail = rows_and_tail(flat, bucket)
    groups = ([rows] if rows.numel() else []) + ([tail.unsqueeze(0)] if tail.numel() else [])
    norms = torch.cat([torch.linalg.vector_norm(g, dim=1) for g in groups])
    if flat.is_cpu and torch.isfinite(norms).all():  # a free check on the CPU; on a GPU, no sync: both below
        return norms
    # squares beyond the fp32 range: rescale by each bucket's peak
    safe = torch.cat([_safe_norms(g) for g in groups])
    return torch.where(torch.isfinite(norms), norms, safe)


def _safe_norms(rows: torch.Tensor) -> torch.Tensor:
    """Each row's norm, computed on the row divided by its largest magnitude (no overflow)."""
    peak = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return peak.squeeze(1) * torch.linalg.vector_norm(rows / peak, dim=1)
