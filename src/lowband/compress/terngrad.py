"""``terngrad``: stochastic ternary gradients {-s, 0, +s}, 2 bits per element (unbiased after clipping).

Wen et al., "TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep
Learning" (arXiv:1705.07878). Sends ``ceil(n / 4) + 4`` bytes:

1. clip: sigma = standard deviation of x (population, mean subtracted, as in the
   authors' code); x_i <- clamp(x_i, -c * sigma, c * sigma) with c = option ``clip``
   (default 2.5; 0 disables clipping). A constant tensor (sigma = 0, e.g. one element) is
   not clipped: its ternarization is exact anyway;
2. scaler s = max_i |x_i| of the clipped tensor (fp32, one scalar in the payload);
3. b_i = sign(x_i) with probability |x_i| / s, else 0 (so E[s * b_i] = x_i: unbiased with
   respect to the clipped tensor; clipping itself is the only bias);
4. code_i = b_i + 1 in {0, 1, 2}, packed at 2 bits;
5. decode: s * (code_i - 1).

How (:mod:`lowband.compress.quant`): steps 3-4 are one stochastic rounding of x_i / s + 1,
whose distribution is exactly step 3's, with 16-bit uniforms; the clipped tensor lives in a
reused work array; the decode looks each byte up in a table of the four values.

Clipping is around zero, as in the paper: a tensor whose mean is far from zero compared
with its spread loses most of its mean (use ``clip=0`` for such tensors).

Randomness comes from a ``torch.Generator`` owned by the compressor (option ``seed``,
default 0), saved by ``state_dict``; see :mod:`lowband.compress.qsgd` for the same seed
on every rank.

Example::

    c = build("terngrad:clip=2.5", COMPRESSORS)
    payload = c.encode(grad, "layer.weight")   # nbytes = ceil(grad.numel() / 4) + 4
    approx = c.decode(payload)                 # values in {-s, 0, s}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch

from lowband import devices
from lowband.compress import batched, scratch
from lowband.compress.base import COMPRESSORS, CompressorOptions, Payload, per_matrix
from lowband.compress.packing import decode_levels, pack
from lowband.compress.quant import (
    NOISE_OFFSET, NUMPY_MIN_NUMEL, SeededCompressor, check_int, flat_fp32, restore)

TERNARY = (-1.0, 0.0, 1.0, 1.0)  # code -> b (code 3 never comes out of the capped rounding)


@dataclass(frozen=True)
class TernGradOptions(CompressorOptions):
    clip: float = 2.5
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) \
                or not math.isfinite(self.clip) or self.clip < 0:
            raise ValueError(f"terngrad:clip must be a finite number >= 0 (0 disables clipping), got {self.clip!r}")
        check_int("terngrad:seed", self.seed, 0)


@COMPRESSORS.register("terngrad")
class TernGrad(SeededCompressor):
    name = "terngrad"
    summable = False
    requantizable = True  # a chunk's scaler is its own max (lowband.comm.two_phase)
    Options: ClassVar[type[CompressorOptions]] = TernGradOptions

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        return per_matrix(numel, side, lambda n: math.ceil(n / 4) + 4)  # 2 bits per element + one fp32 scale

    def clipped(self, flat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Step 1: ``flat`` clamped to +-clip standard deviations into ``out``; ``flat`` itself when
        clip or sigma is 0 (no host sync: a zero bound becomes an infinite one)."""
        clip = float(self.options.clip)  # type: ignore[attr-defined]
        if clip == 0 or flat.numel() < 2:
            return flat
        bound = _bound(clip * flat.std(correction=0))
        if flat.device.type == "cpu":  # a number for bounds: torch's CPU clamp runs ~4x faster than with tensors
            limit = float(bound)
            return torch.clamp(flat, -limit, limit, out=out)
        return torch.clamp(flat, -bound, bound, out=out)

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = flat_fp32(x)
        n = flat.numel()
        if flat.device.type == "cpu" and n >= NUMPY_MIN_NUMEL:
            encoded = self._encode_cpu(flat.contiguous())
            if encoded is not None:
                return Payload(encoded, ctx=(x.shape, x.dtype))
        y = scratch.buffer("terngrad.y", n, torch.float32, flat.device)
        clipped = self.clipped(flat, y)
        if n:
            lo, hi = torch.aminmax(clipped)
            scaler = torch.maximum(-lo, hi)
        else:
            scaler = torch.zeros((), dtype=torch.float32, device=flat.device)
        inv = torch.where(scaler > 0, 1 / scaler, torch.zeros_like(scaler))
        torch.mul(clipped, inv, out=y).add_(1 + NOISE_OFFSET)  # x / s + 1 in [0, 2]
        codes = self.round_stochastic(y, 2, scratch.buffer("terngrad.codes", n, torch.uint8, flat.device))
        return Payload([scaler.reshape(1), pack(codes, 2, check=False)], ctx=(x.shape, x.dtype))

    def decode(self, payload: Payload) -> torch.Tensor:
        scaler, packed = payload.tensors
        shape, _ = payload.ctx
        n = math.prod(shape)
        levels = devices.cached(_TERNARY, packed.device, lambda d: torch.tensor(TERNARY, device=d))
        out = scratch.fresh(n, torch.float32, packed.device)
        return restore(decode_levels(packed, 2, n, levels * scaler.to(torch.float32), out), payload.ctx)

    def _encode_cpu(self, flat: torch.Tensor) -> list[torch.Tensor] | None:
        """Steps 1-4 on the CPU, the rounding and packing in NumPy by chunks (:meth:`round_pack_cpu`): the same
        bytes as the torch ops (the clipped tensor's peak is min(max |x|, bound), exactly), without the clipped
        copy. None for a tensor with a NaN or an infinity (the torch ops take it)."""
        lo, hi = (np.float32(v) for v in torch.aminmax(flat))
        peak, clip = max(-lo, hi), float(self.options.clip)  # type: ignore[attr-defined]
        limit = float(_bound(clip * flat.std(correction=0))) if clip and flat.numel() >= 2 else math.inf
        if math.isfinite(limit):
            peak = min(peak, np.float32(limit))
        if not math.isfinite(peak):
            return None
        inv = np.float32(1) / peak if peak > 0 else np.float32(0)
        src, bound, offset = flat.numpy(), np.float32(limit), np.float32(1 + NOISE_OFFSET)

        def shifted(first: int, last: int, y: np.ndarray) -> None:  # x / s + 1 (+ the noise's offset)
            part = np.clip(src[first:last], -bound, bound, out=y) if math.isfinite(limit) else src[first:last]
            np.add(np.multiply(part, inv, out=y), offset, out=y)

        return [torch.from_numpy(np.array([peak], dtype=np.float32)), self.round_pack_cpu(flat.numel(), shifted, 2, 2)]

    def encode_many(self, xs: Sequence[torch.Tensor], keys: Sequence[str]) -> list[Payload]:
        """:meth:`encode` of each, the small ones in one pass (:mod:`lowband.compress.batched`)."""
        return batched.encode_many(self, xs, keys, batched.BLOCK, 4, self._encode_batch)

    def _encode_batch(self, flats: list[torch.Tensor], lay: batched.Layout) -> list[list[torch.Tensor]]:
        rows = batched.pad_cat(flats, lay).view(-1, lay.group)
        blocks = lay.block_tensor(rows.device)
        y = scratch.buffer("terngrad.y", rows.numel(), torch.float32, rows.device).view(rows.shape)
        src = self._clipped_rows(rows, lay, y) if self.options.clip else rows  # type: ignore[attr-defined]
        peak = torch.maximum(-src.amin(dim=1), src.amax(dim=1))
        scaler = batched.per_tensor(peak, lay, "amax")
        inv = torch.where(scaler > 0, 1 / scaler, torch.zeros_like(scaler))
        torch.mul(src, inv[blocks].unsqueeze(1), out=y).add_(1 + NOISE_OFFSET)
        codes = self.round_stochastic(y.view(-1), 2, scratch.buffer("terngrad.codes", y.numel(), torch.uint8, y.device))
        return batched.split(lay, scaler, pack(codes, 2, check=False), per_tensor_scale=True)

    def _clipped_rows(self, rows: torch.Tensor, lay: batched.Layout, out: torch.Tensor) -> torch.Tensor:
        """Step 1 for every tensor of the batch: two-pass standard deviations (the padding's share taken
        out exactly), bounds back to each block, one clamp into ``out``."""
        blocks, n = lay.block_tensor(rows.device), lay.numel_tensor(rows.device)
        mean = batched.per_tensor(rows.sum(dim=1), lay, "sum") / n
        centered = torch.sub(rows, mean[blocks].unsqueeze(1), out=out)
        squares = batched.per_tensor(torch.linalg.vector_norm(centered, dim=1) ** 2, lay, "sum")
        pads = lay.numel_tensor(rows.device, padding=True)  # padded zeros, each adding (0 - mean)^2
        sigma = ((squares - pads * mean ** 2).clamp_min(0) / n).sqrt()
        bound = _bound(float(self.options.clip) * torch.where(n > 1, sigma, torch.zeros_like(sigma)))  # type: ignore[attr-defined]
        return torch.clamp(rows, -bound[blocks].unsqueeze(1), bound[blocks].unsqueeze(1), out=out)

    def decode_many(self, payloads: Sequence[Payload]) -> list[torch.Tensor]:
        """:meth:`decode` of each, the small ones in one table gather (a table of levels per tensor, scale included)."""
        return batched.decode_many(self, payloads, batched.BLOCK, 4, self._decode_batch)

    def _decode_batch(self, scalers: torch.Tensor, packed: torch.Tensor, lay: batched.Layout) -> torch.Tensor:
        levels = devices.cached(_TERNARY, packed.device, lambda d: torch.tensor(TERNARY, device=d))
        slots = packed.numel() * 4
        table = scalers.to(torch.float32).unsqueeze(1) * levels  # (tensors, 4): each tensor's own table
        return decode_levels(packed, 2, slots, table, scratch.fresh(slots, torch.float32, packed.device),
                             lay.byte_owners(packed.device))


_TERNARY: dict[torch.device, torch.Tensor] = {}


def _bound(bound: torch.Tensor) -> torch.Tensor:
    """A clipping bound with 0 (sigma 0: a constant tensor) made infinite: no clipping, no host sync."""
    return torch.where(bound > 0, bound, torch.full_like(bound, math.inf))
