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
from typing import ClassVar

import torch

from lowband.compress.base import COMPRESSORS, CompressorOptions, Payload, per_matrix
from lowband.compress.packing import pack, unpack
from lowband.compress.qsgd import SeededCompressor, check_int, flat_fp32, restore


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

    def clipped(self, flat: torch.Tensor) -> torch.Tensor:
        """Step 1: ``flat`` clamped to +-clip standard deviations (unchanged if clip or sigma is 0)."""
        clip = float(self.options.clip)  # type: ignore[attr-defined]
        if clip == 0 or flat.numel() < 2:
            return flat
        bound = clip * flat.std(correction=0)
        return torch.where(bound > 0, flat.clamp(-bound, bound), flat)  # sigma 0: unchanged (no host sync)

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = self.clipped(flat_fp32(x))
        magnitude = flat.abs()
        scaler = magnitude.max() if flat.numel() else torch.zeros((), dtype=torch.float32, device=flat.device)
        inv = torch.where(scaler > 0, 1 / scaler, torch.zeros_like(scaler))
        fire = self.uniform(flat.numel(), flat.device) < magnitude * inv
        codes = torch.where(fire, torch.where(flat < 0, 0, 2), 1).to(torch.uint8)  # b + 1
        return Payload([scaler.reshape(1), pack(codes, 2, check=False)], ctx=(x.shape, x.dtype))

    def decode(self, payload: Payload) -> torch.Tensor:
        scaler, packed = payload.tensors
        shape, _ = payload.ctx
        ternary = unpack(packed, 2, math.prod(shape)).to(torch.float32) - 1  # b = code - 1
        return restore(ternary * scaler.to(torch.float32), payload.ctx)
