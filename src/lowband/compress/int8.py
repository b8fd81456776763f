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
the decode converts the bytes and applies each chunk's affine map in place. On the CPU (chunk 0)
with numba installed, steps 2 and 3 are one compiled loop each (:mod:`lowband.compress.kernels`),
at every size; without it, NumPy passes from 2^23 elements and torch ops below.

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
from typing import ClassVar, Sequence, cast

import numpy as np
import torch

from lowband.compress import batched, kernels, scratch
from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Payload, per_matrix
from lowband.compress.quant import NUMPY_MIN_NUMEL, check_int, flat_fp32, per_group, restore, rows_and_tail
from lowband.compress.select import chunked


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
        whole = not self.options.chunk  # type: ignore[attr-defined]
        if flat.is_cpu and whole and (n >= NUMPY_MIN_NUMEL or kernels.loaded()):  # compiled: at every size
            return Payload(_encode_cpu([flat.contiguous()])[0], ctx=(x.shape, x.dtype))
        size = self._size(n)
        rows, tail = rows_and_tail(flat, size)
        lo, hi = (torch.cat(parts) for parts in zip(*(_bounds(g) for g in (rows, tail.unsqueeze(0)) if g.numel())))
        step = (hi - lo) / 255
        inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
        y = per_group(torch.sub, flat, size, lo, scratch.buffer("int8.y", n, torch.float32, flat.device))
        per_group(torch.mul, y, size, inv, y).round_()
        q = scratch.fresh(n, torch.uint8, flat.device).copy_(y)
        return Payload([torch.stack([lo, hi], 1).reshape(-1), q], ctx=(x.shape, x.dtype))

    def decode(self, payload: Payload) -> torch.Tensor:
        scales, q = payload.tensors
        shape, _ = payload.ctx
        n = math.prod(shape)
        if q.is_cpu and kernels.loaded() and not self.options.chunk:  # type: ignore[attr-defined]
            return restore(_decode_cpu([payload], [n])[0], payload.ctx)  # one compiled pass instead of three ops
        lo, hi = scales.to(torch.float32).view(-1, 2).unbind(1)
        size = self._size(n)
        out = scratch.fresh(n, torch.float32, q.device).copy_(q)
        per_group(torch.mul, out, size, (hi - lo) / 255, out)
        return restore(per_group(torch.add, out, size, lo, out), payload.ctx)

    def encode_many(self, xs: Sequence[torch.Tensor], keys: Sequence[str]) -> list[Payload]:
        """:meth:`encode` of each, the small ones in one pass (:mod:`lowband.compress.batched`): padded with their
        last element (a chunk's min and max stay), each block's bounds, then each tensor's (chunk 0)."""
        whole = not self.options.chunk  # type: ignore[attr-defined]
        return batched.encode_many(self, xs, keys, self._group(), 1, self._encode_batch, _encode_cpu if whole else None)

    def _group(self) -> int:
        return int(self.options.chunk) or batched.BLOCK  # type: ignore[attr-defined]

    def _encode_batch(self, flats: list[torch.Tensor], lay: batched.Layout) -> list[list[torch.Tensor]]:
        rows = batched.pad_cat(flats, lay, repeat_last=True).view(-1, lay.group)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        whole = not self.options.chunk  # type: ignore[attr-defined]
        if whole:  # each tensor's bounds, then back to its blocks
            lo, hi = batched.per_tensor(lo, lay, "amin"), batched.per_tensor(hi, lay, "amax")
        blocks = lay.block_tensor(rows.device)
        lo_rows, hi_rows = (lo[blocks], hi[blocks]) if whole else (lo, hi)
        step = (hi_rows - lo_rows) / 255
        inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
        y = scratch.buffer("int8.y", rows.numel(), torch.float32, rows.device).view(rows.shape)
        torch.sub(rows, lo_rows.unsqueeze(1), out=y).mul_(inv.unsqueeze(1)).round_()
        q = scratch.fresh(rows.numel(), torch.uint8, rows.device).copy_(y.view(-1))
        return batched.split(lay, torch.stack([lo, hi], 1), q, per_tensor_scale=whole)

    def decode_many(self, payloads: Sequence[Payload]) -> list[torch.Tensor]:
        """:meth:`decode` of each, the small ones in one conversion and one affine map."""
        whole = not self.options.chunk  # type: ignore[attr-defined]
        return batched.decode_many(self, payloads, self._group(), 1, self._decode_batch, _decode_cpu if whole else None)

    def _decode_batch(self, scales: torch.Tensor, q: torch.Tensor, lay: batched.Layout) -> torch.Tensor:
        lo, hi = scales.to(torch.float32).view(-1, 2).unbind(1)
        whole = not self.options.chunk  # type: ignore[attr-defined]
        values = scratch.fresh(q.numel(), torch.float32, q.device).copy_(q)
        batched.scale(values, lay, (hi - lo) / 255, whole)
        return batched.scale(values, lay, lo, whole, op=torch.add)


def _encode_cpu(flats: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """:meth:`Int8.encode` (chunk 0) of non-empty contiguous fp32 CPU tensors, in NumPy: the same IEEE operations in
    the same order as the torch ops (min, max, (x - lo) * inv rounded half to even), so the same bytes. A large
    tensor by cache-sized chunks on every thread (:func:`lowband.compress.select.chunked`), in one read of ``x``;
    the codes of all in one new buffer, the bounds in one array (each payload views of them)."""
    sources = [flat.numpy() for flat in flats]
    bounds = np.empty((len(sources), 2), dtype=np.float32)
    for row, flat, src in zip(bounds, flats, sources):
        row[:] = torch.aminmax(flat) if src.size >= batched.BATCH_MAX_NUMEL else (src.min(), src.max())
    steps = _steps(bounds)
    with np.errstate(divide="ignore"):
        inverses = np.where(steps > 0, np.float32(1) / steps, np.float32(0)).astype(np.float32)
    sizes = [src.size for src in sources]
    q = scratch.fresh(sum(sizes), torch.uint8, flats[0].device)
    codes, first = q.numpy(), 0
    for src, (lo, _), inv, step in zip(sources, bounds, inverses, steps):
        out, first = codes[first:first + src.size], first + src.size
        if not np.isfinite(step):  # a NaN or an infinity: codes 0, the bounds carry it
            out.fill(0)
        else:
            chunked(src.size, lambda c0, c1, x=src, lo=lo, inv=inv, q=out: _quantize(x[c0:c1], lo, inv, q[c0:c1]))
    return [list(pair) for pair in zip(torch.from_numpy(bounds).unbind(0), q.split(sizes))]


def _quantize(src: np.ndarray, lo: np.float32, inv: np.float32, out: np.ndarray) -> None:
    """``out`` (uint8) = round((src - lo) * inv), half to even: one compiled loop (:mod:`lowband.compress.kernels`),
    else NumPy passes through the running thread's work array."""
    fast = kernels.loaded()
    if fast:
        fast.quantize(src, lo, inv, out)
        return
    y = scratch.array("int8.y", src.size, np.float32)
    np.rint(np.multiply(np.subtract(src, lo, out=y), inv, out=y), out=y)
    np.copyto(out, y, casting="unsafe")


def _decode_cpu(payloads: list[Payload], numels: list[int]) -> list[torch.Tensor]:
    """:meth:`Int8.decode` (chunk 0) of CPU payloads in NumPy, into one new array (a large one by chunks on every
    thread): lo + q * step, as the torch ops compute it (the codes converted, then the product, then the sum);
    NaN where a bound is not finite, as there."""
    bounds = np.array([p.tensors[0].to(torch.float32).numpy() for p in payloads], dtype=np.float32).reshape(-1, 2)
    steps = _steps(bounds)
    out = scratch.fresh(sum(numels), torch.float32, torch.device("cpu"))
    values, first = out.numpy(), 0
    for payload, n, (lo, _), step in zip(payloads, numels, bounds, steps):
        codes, part, first = payload.tensors[1].numpy().reshape(-1), values[first:first + n], first + n
        if codes.size != n:
            raise ValueError(f"int8 payload of {n} elements carries {codes.size} codes")
        if not np.isfinite(step):  # what lo + 0 * step gives
            part.fill(np.nan)
        else:
            chunked(n, lambda c0, c1, q=codes, step=step, lo=lo, x=part: _affine(q[c0:c1], step, lo, x[c0:c1]))
    return list(out.split(numels))


def _affine(codes: np.ndarray, step: np.float32, lo: np.float32, out: np.ndarray) -> None:
    """``out`` (fp32) = lo + codes * step: one compiled loop, else NumPy converting in place first (a uint8-by-float
    product is a slower loop)."""
    fast = kernels.loaded()
    if fast:
        fast.dequantize(codes, step, lo, out)
        return
    np.copyto(out, codes)
    np.add(np.multiply(out, step, out=out), lo, out=out)


def _steps(bounds: np.ndarray) -> np.ndarray:
    """(hi - lo) / 255 in fp32 for each ``(lo, hi)`` row, as torch computes it (NaN or inf bounds: no warning)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return ((bounds[:, 1] - bounds[:, 0]) / np.float32(255)).astype(np.float32)


def _bounds(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each row; one row (chunk 0) as a whole-tensor reduction, which runs on every thread."""
    if rows.shape[0] == 1:
        lo, hi = torch.aminmax(rows)
        return lo.reshape(1), hi.reshape(1)
    return torch.aminmax(rows, dim=1)
