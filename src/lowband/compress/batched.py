"""Many tensors through one encode and one decode, each payload as it would be alone; registers nothing.

Why: a tensor of 16k-65k elements (a small model's layers) is bound by per-call overhead, not by
memory: several times as many small torch ops per encode + decode as GRACE-style code issues, each a
few microseconds on a CPU and a kernel launch on a GPU (``benchmarks/compressors.py``, table (c)).
The aggregator hands a compressor all of a call's groups at once (:meth:`Compressor.encode_many`,
:meth:`Compressor.decode_many`); a compressor whose scales belong to fixed-size groups of elements
(QSGD's buckets) does them in one pass, as follows:

1. each flat tensor is padded with zeros to a whole number of groups and all are concatenated
   (:func:`pad_cat`): every group then lies inside one tensor, so every scale is the one the
   tensor alone would get (zeros add nothing to a norm; the sum's rounding may differ in the last bit);
2. the concatenation is quantised and packed once; tensor ``i``'s payload is a view of the
   result: its groups' scales and the bytes of its codes (its start is a whole number of
   groups, so a whole number of bytes), exactly the size ``encode`` gives, read by ``decode``
   alike (the last byte's unused codes, zeros here, are never read);
3. the decode lays the payloads' codes out as the encode had them, padded to whole groups (one
   copy of the bytes, zero bytes between), decodes every code in one table gather, and scales
   every group by its scale in one op (:func:`scale`); each decoded tensor is a view of the result.

Compressors with one scale per tensor (sign, TernGrad, int8) pad to whole blocks of
:data:`BLOCK` elements the same way, reduce each block in one op (a norm, a max), and combine a
tensor's blocks with :func:`per_tensor` (a small scatter over the blocks): a segment reduction
over the elements themselves (``torch.segment_reduce``) is much slower on a CPU. Sign and TernGrad
decode with each tensor's scale folded into its own rows of the level table
(:meth:`Layout.byte_owners`): the gather writes the final values, no scaling pass.

Tensors of :data:`BATCH_MAX_NUMEL` elements or more are worth their own call (memory-bound) and
go alone; so do empty ones.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Sequence, cast

import torch

from lowband.compress import scratch
from lowband.compress.base import Compressor, Payload
from lowband.compress.quant import flat_fp32, restore

BATCH_MAX_NUMEL = 1 << 18  # from this size on, a tensor's own call costs little next to its data
BLOCK = 512  # elements per block for per-tensor scales (a multiple of every codes-per-byte)


def batchable(numels: Sequence[int], group: int, per: int) -> list[int]:
    """Positions of the tensors worth batching (non-empty, below :data:`BATCH_MAX_NUMEL`); none if fewer than 2,
    or if groups of ``group`` elements would not start on a byte (``per`` codes a byte), or ``group`` is 0."""
    if not group or group % per:
        return []
    picked = [i for i, n in enumerate(numels) if 0 < n < BATCH_MAX_NUMEL]
    return picked if len(picked) > 1 else []


class Layout:
    """Where each of a batch's tensors lives, padded to whole groups (encode) and in packed bytes (decode)."""

    def __init__(self, numels: tuple[int, ...], group: int, per: int) -> None:
        self.numels, self.group, self.per = numels, group, per
        padded = [n + (-n % group) for n in numels]
        self.starts = [0, *itertools.accumulate(padded)][:-1]  # element offsets, whole groups
        self.groups = [p // group for p in padded]
        self.code_bytes = [math.ceil(n / per) for n in numels]  # each payload's packed bytes
        self.padded_bytes = [p // per for p in padded]  # the same, padded to whole groups
        self.pad = max(p - n for p, n in zip(padded, numels))
        self._index: dict[tuple[str, torch.device], torch.Tensor] = {}

    def numel_tensor(self, device: torch.device, padding: bool = False) -> torch.Tensor:
        """Each tensor's element count, or (``padding``) the zeros after it (fp32), on ``device`` (made once)."""
        key = ("padding" if padding else "numels", device)
        if key not in self._index:
            counts = [g * self.group - n for g, n in zip(self.groups, self.numels)] if padding else self.numels
            self._index[key] = torch.tensor(counts, dtype=torch.float32, device=device)
        return self._index[key]

    def byte_owners(self, device: torch.device) -> torch.Tensor:
        """For every byte of :func:`padded_codes`, 256 times the tensor it belongs to (int32):
        :func:`lowband.compress.packing.decode_levels`'s ``owners``, a level table per tensor (made once)."""
        key = ("owners", device)
        if key not in self._index:
            tables = torch.arange(len(self.numels), dtype=torch.int32, device=device) * 256
            self._index[key] = tables.repeat_interleave(torch.tensor(self.padded_bytes, device=device))
        return self._index[key]

    def block_tensor(self, device: torch.device) -> torch.Tensor:
        """For every group (block) of the padded concatenation, which tensor it belongs to (int64)."""
        key = ("blocks", device)
        if key not in self._index:
            self._index[key] = torch.cat([torch.full((g,), i, dtype=torch.int64, device=device)
                                          for i, g in enumerate(self.groups)])
        return self._index[key]


@functools.lru_cache(maxsize=64)
def layout(numels: tuple[int, ...], group: int, per: int) -> Layout:
    """The :class:`Layout` of a batch (cached: a training run sends the same shapes every step)."""
    return Layout(numels, group, per)


def pad_cat(flats: Sequence[torch.Tensor], lay: Layout, repeat_last: bool = False) -> torch.Tensor:
    """The flat tensors back to back, each followed by what completes its last group: zeros, or (``repeat_last``)
    copies of its last element, which leave a min or a max unchanged. In a work array
    (:mod:`lowband.compress.scratch`): valid until the calling thread's next ``pad_cat``."""
    zeros = flats[0].new_zeros(lay.pad)
    parts: list[torch.Tensor] = []
    for flat in flats:
        parts.append(flat)
        pad = -flat.numel() % lay.group
        if pad:
            parts.append(flat[-1:].expand(pad) if repeat_last else zeros[:pad])
    out = scratch.buffer("batched.pad_cat", lay.starts[-1] + lay.groups[-1] * lay.group, flats[0].dtype, flats[0].device)
    return torch.cat(parts, out=out)


def per_tensor(block_values: torch.Tensor, lay: Layout, reduce: str) -> torch.Tensor:
    """One value per tensor from one per block: ``reduce`` is "sum", "amax" or "amin" over each tensor's blocks."""
    out = block_values.new_zeros(len(lay.numels))
    return out.scatter_reduce_(0, lay.block_tensor(block_values.device), block_values, reduce, include_self=False)


def encode_many(compressor: Compressor, xs: Sequence[torch.Tensor], keys: Sequence[str], group: int, per: int,
                batch: Callable[[list[torch.Tensor], Layout], list[list[torch.Tensor]]],
                host: Callable[[list[torch.Tensor]], list[list[torch.Tensor]]] | None = None) -> list[Payload]:
    """``compressor.encode`` of each tensor; the batchable ones through ``batch(flats, layout)``, which gives
    each one's payload tensors (see :func:`batchable` for what is not batched). With ``host``, batchable CPU
    tensors go through ``host(flats)`` instead (contiguous), which gives the same: NumPy tensor by tensor, which
    measured faster there (``benchmarks/compressors.py``, table (c)): NumPy's elementwise loops on a small
    tensor, and its calls, cost less than torch's CPU kernels and their dispatch."""
    flats = [flat_fp32(x) for x in xs]
    picked = batchable([f.numel() for f in flats], group, per)
    alone = set(range(len(xs))) - set(picked)
    out = [compressor.encode(x, key) if i in alone else None for i, (x, key) in enumerate(zip(xs, keys))]
    if picked and host is not None and all(flats[i].is_cpu for i in picked):
        for i, tensors in zip(picked, host([flats[i].contiguous() for i in picked])):
            out[i] = Payload(tensors, ctx=(xs[i].shape, xs[i].dtype))
    elif picked:
        lay = layout(tuple(flats[i].numel() for i in picked), group, per)
        for i, tensors in zip(picked, batch([flats[i] for i in picked], lay)):
            out[i] = Payload(tensors, ctx=(xs[i].shape, xs[i].dtype))
    return cast(list[Payload], out)


def decode_many(compressor: Compressor, payloads: Sequence[Payload], group: int, per: int,
                batch: Callable[[torch.Tensor, torch.Tensor, Layout], torch.Tensor],
                host: Callable[[list[Payload], list[int]], list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
    """``compressor.decode`` of each payload; the batchable ones through ``batch(scales, codes, layout)``,
    given every picked payload's first and second tensor back to back, which returns every decoded slot.
    With ``host``, batchable CPU payloads go through ``host(payloads, numels)`` instead (each one's flat fp32
    decode, in NumPy tensor by tensor, into one new array)."""
    numels = [math.prod(p.ctx[0]) for p in payloads]
    picked = batchable(numels, group, per)
    alone = set(range(len(payloads))) - set(picked)
    out = [compressor.decode(p) if i in alone else None for i, p in enumerate(payloads)]
    if picked and host is not None and all(payloads[i].tensors[1].is_cpu for i in picked):
        for i, flat in zip(picked, host([payloads[i] for i in picked], [numels[i] for i in picked])):
            out[i] = restore(flat, payloads[i].ctx)
    elif picked:
        lay = layout(tuple(numels[i] for i in picked), group, per)
        scales = torch.cat([payloads[i].tensors[0].reshape(-1) for i in picked])
        values = batch(scales, padded_codes([payloads[i].tensors[1] for i in picked], lay), lay)
        for j, i in enumerate(picked):
            out[i] = restore(values[lay.starts[j]:lay.starts[j] + numels[i]], payloads[i].ctx)
    return cast(list[torch.Tensor], out)


def padded_codes(codes: Sequence[torch.Tensor], lay: Layout) -> torch.Tensor:
    """The payloads' packed codes back to back, each followed by zero bytes up to its whole groups: the bytes
    the encode packed (``batch`` of :func:`decode_many` decodes them into the padded layout, read by views).
    In a work array (:mod:`lowband.compress.scratch`): valid until the calling thread's next call."""
    zeros = codes[0].new_zeros(max(p - c for p, c in zip(lay.padded_bytes, lay.code_bytes)))
    parts: list[torch.Tensor] = []
    for part, have, want in zip(codes, lay.code_bytes, lay.padded_bytes):
        parts.append(part.reshape(-1))
        if want > have:
            parts.append(zeros[:want - have])
    out = scratch.buffer("batched.codes", sum(lay.padded_bytes), codes[0].dtype, codes[0].device)
    return torch.cat(parts, out=out)


def split(lay: Layout, scales: torch.Tensor, codes: torch.Tensor, per_tensor_scale: bool) -> list[list[torch.Tensor]]:
    """Each tensor's payload as views: its rows of ``scales`` (its groups', or its own one) and its codes' bytes."""
    out = []
    for j, start in enumerate(lay.starts):
        first, count = (j, 1) if per_tensor_scale else (start // lay.group, lay.groups[j])
        byte = start // lay.per
        out.append([scales[first:first + count].reshape(-1), codes[byte:byte + lay.code_bytes[j]]])
    return out


def scale(values: torch.Tensor, lay: Layout, scales: torch.Tensor, per_tensor_scale: bool,
          op: Callable[..., torch.Tensor] = torch.mul) -> torch.Tensor:
    """``values`` (a batch decoded in its padded layout) with every group ``op``-ed in place, in one op, by its
    tensor's scale (``per_tensor_scale``) or by its own; returns ``values``."""
    rows = values.view(-1, lay.group)
    column = scales[lay.block_tensor(values.device)] if per_tensor_scale else scales
    op(rows, column.unsqueeze(1), out=rows)
    return values
