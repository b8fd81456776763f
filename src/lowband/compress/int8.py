"""``int8``: min-max quantization to 256 levels (biased, deterministic).

Deterministic round-to-nearest, hence biased (E[C(x)] = C(x) != x; the error is at most
(max - min) / 510 per element). Scales are the min and the max of each chunk, as fp32 (8
bytes per chunk); option ``chunk`` = 0 uses one pair for the whole tensor, else one pair per
``chunk`` consecutive elements (the last chunk may be shorter): ``n + 8 * ceil(n / chunk)``
bytes, or ``n + 8`` per tensor.

1. lo, hi = min, max of the chunk; step = (hi - lo) / 255 (0 for a constant chunk);
2. q_i = round((x_i - lo) / step) in [0, 255] (0 when step is 0): x_i - lo >= 0 exactly, and
   (hi - lo) / step rounds to 255, so no clamp is needed;
3. decode: lo + q_i * step.

The intermediate (x - lo) / step lives in a reused work array (:mod:`lowband.compress.scratch`);
the decode converts the bytes and applies each chunk's affine map in place.

A contraction (||C(x) - x|| < ||x||) on ordinary gradients, but not for every x: zeros
between two large values of opposite sign decode to +-step/2, so ``[M, -M]`` followed by
more than 2 * 255**2 zeros comes back with a larger error than ``||x||``.

Example::

    c = build("int8", COMPRESSORS)
    payload = c.encode(grad, "layer.weight")   # nbytes = grad.numel() + 8
    approx = c.decode(payload)                 # within (max - min) / 510 of grad
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, cast

import torch

from lowband.compress import scratch
from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Payload, per_matrix
from lowband.compress.quant import check_int, flat_fp32, per_group, restore, rows_and_tail


@dataclass(frozen=True)
class Int8Options(CompressorOptions):
    chunk: int = 0

    def __post_init__(self) -> None:
        check_int("int8:chunk", self.chunk, 0)


@COMPRESSORS.register("int8")
class Int8(Compressor):
    name = "int8"
    summable = False
    requantizable = True  # a chunk's min and scale are its own (lowband.comm.two_phase)
    contraction = True  # deterministic rounding: each element moves by at most (max - min) / 510
    Options: ClassVar[type[CompressorOptions]] = Int8Options

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        chunk = cast(Int8Options, options).chunk  # a byte per element + min and scale per chunk
        return per_matrix(numel, side, lambda n: n + 8 * (math.ceil(n / chunk) if chunk else 1))

    def _size(self, n: int) -> int:
        """Elements per chunk for ``n`` elements: the whole tensor when ``chunk`` is 0."""
        return int(self.options.chunk) or max(n, 1)  # type: ignore[attr-defined]

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = flat_fp32(x)
        n = flat.numel()
        if n == 0:
            pairs = 0 if self.options.chunk else 1  # type: ignore[attr-defined]  (chunks of nothing: none)
            scales = torch.zeros(2 * pairs, dtype=torch.float32, device=flat.device)
            return Payload([scales, torch.empty(0, dtype=torch.uint8, device=flat.device)], ctx=(x.shape, x.dtype))
        size = self._size(n)
        rows, tail = rows_and_tail(flat, size)
        lo, hi = (torch.cat(parts) for parts in zip(*(_bounds(g) for g in (rows, tail.unsqueeze(0)) if g.numel())))
        step = (hi - lo) / 255
        inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
        y = per_group(torch.sub, flat, size, lo, scratch.buffer("int8.y", n, torch.float32, flat.device))
        per_group(torch.mul, y, size, inv, y).round_()
        q = torch.empty(n, dtype=torch.uint8, device=flat.device).copy_(y)
        return Payload([torch.stack([lo, hi], 1).reshape(-1), q], ctx=(x.shape, x.dtype))

    def decode(self, payload: Payload) -> torch.Tensor:
        scales, q = payload.tensors
        shape, _ = payload.ctx
        n = math.prod(shape)
        lo, hi = scales.to(torch.float32).view(-1, 2).unbind(1)
        size = self._size(n)
        out = torch.empty(n, dtype=torch.float32, device=q.device).copy_(q)
        per_group(torch.mul, out, size, (hi - lo) / 255, out)
        return restore(per_group(torch.add, out, size, lo, out), payload.ctx)


def _bounds(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each row; one row (chunk 0) as a whole-tensor reduction, which runs on every thread."""
    if rows.shape[0] == 1:
        lo, hi = torch.aminmax(rows)
        return lo.reshape(1), hi.reshape(1)
    return torch.aminmax(rows, dim=1)
