"""``fp16`` and ``bf16``: half-precision casts, 2 bytes per element, summable.

Micikevicius et al., "Mixed Precision Training" (arXiv:1710.03740) for fp16; bf16 from
Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training" (arXiv:1905.12322).

1. divide by the world size (done by :meth:`Compressor.exchange`, so the sum cannot
   overflow where the fp32 mean would not), 2. cast to the half type, 3. all-reduce (sum)
   in that type, 4. cast back to the input dtype.

Unlike torch's ``bf16_compress_hook`` (NCCL only), this works on gloo: gloo sums bf16.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lowband.compress import scratch
from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Payload


class _HalfPrecision(Compressor):
    contraction = True
    summable = True
    wire_dtype: ClassVar[torch.dtype]

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        return (2.0 * numel,)

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        return Payload([scratch.cast(x.detach(), self.wire_dtype).contiguous()], ctx=(x.shape, x.dtype))

    def decode(self, payload: Payload) -> torch.Tensor:
        shape, dtype = payload.ctx
        return scratch.cast(payload.tensors[0], dtype).view(shape)


@COMPRESSORS.register("fp16")
class FP16(_HalfPrecision):
    name = "fp16"
    wire_dtype = torch.float16


@COMPRESSORS.register("bf16")
class BF16(_HalfPrecision):
    name = "bf16"
    wire_dtype = torch.bfloat16
