"""``identity``: no compression (fp32 on the wire). The reference every compressor is measured against."""

from __future__ import annotations

import torch

from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Payload


@COMPRESSORS.register("identity")
class Identity(Compressor):
    name = "identity"
    contraction = True
    summable = True

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        return (4.0 * numel,)

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        return Payload([x.contiguous()], ctx=x.shape)

    def decode(self, payload: Payload) -> torch.Tensor:
        return payload.tensors[0].view(payload.ctx)
