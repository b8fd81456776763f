"""Index encoding for sparse payloads: the narrowest integer list, or a bitmap, whichever is smaller.

A sparse payload names ``k`` positions of a tensor of ``n`` elements. Two encodings:

* a list of ``k`` indices in the narrowest unsigned type holding ``n - 1``: uint8
  (n <= 256), uint16 (n <= 65 536), uint32 (n <= 2**32), else int64 — ``k * width`` bytes;
* a bitmap of ``n`` bits, least significant bit first, packed into ``ceil(n / 8)`` bytes.

The smaller one is used (the list on a tie). The choice is a function of ``(n, k)`` only
(:func:`index_nbytes`, :func:`uses_bitmap`), so no flag crosses the wire:

1. ``n`` comes from the shape every rank knows;
2. ``k`` is either known from the options (top-k, random-k) or, for variable-size
   payloads (threshold, DGC), recovered from the payload's byte length by
   :func:`count_from_nbytes` — the aggregator already exchanges those lengths, so no
   header is sent.

The bitmap cannot carry order or repeats: pass sorted, distinct indices (decoding always
returns them ascending then). Integers are stored in native byte order.

A whole sparse payload (values then indices) is one uint8 tensor (:func:`pack`,
:func:`unpack`): the aggregator's all-gather moves bytes, and a single byte tensor has no
alignment requirement wherever it lands in the gathered buffer.

Example::

    blob = pack(values, idx, n)                     # values.numel()*4 + index_nbytes(n, k) bytes
    values, idx = unpack(blob, n, torch.float32)    # k recovered from len(blob)
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch

from lowband import devices
from lowband.compress import bitmaps, scratch
from lowband.compress.packing import decode_levels
from lowband.compress.packing import pack as bitpack
from lowband.compress.select import compact, expand, positions

_BOOLS: dict[torch.device, torch.Tensor] = {}

def index_dtype(n: int) -> torch.dtype:
    """The narrowest integer dtype holding every index of a tensor of ``n`` elements."""
    if n <= 1 << 8:
        return torch.uint8
    if n <= 1 << 16:
        return torch.uint16
    if n <= 1 << 32:
        return torch.uint32
    return torch.int64


def bitmap_nbytes(n: int) -> int:
    return (n + 7) // 8


def uses_bitmap(n: int, k: int) -> bool:
    """Whether ``k`` of ``n`` indices travel as a bitmap (strictly smaller than the list)."""
    return bitmap_nbytes(n) < k * index_dtype(n).itemsize


def index_nbytes(n: int, k: int) -> int:
    """Bytes of ``k`` indices into ``n`` elements: min(list, bitmap)."""
    return min(k * index_dtype(n).itemsize, bitmap_nbytes(n))


def encode_indices(idx: torch.Tensor, n: int) -> torch.Tensor:
    """``idx`` (int64, sorted and distinct for the bitmap) as ``index_nbytes(n, k)`` uint8 bytes."""
    k = idx.numel()
    if not uses_bitmap(n, k):
        return idx.reshape(-1).to(index_dtype(n)).view(torch.uint8)
    mask = scratch.buffer("indices.mask", n, torch.bool, idx.device).zero_()
    mask[idx] = True
    return pack_mask(mask)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """The bitmap of a flat bool ``mask``: ``bitmap_nbytes(n)`` bytes, least significant bit first."""
    return bitpack(mask, 1, check=False)


def decode_indices(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """int64 indices from :func:`encode_indices` bytes (ascending when a bitmap was used)."""
    where = decode_where(data, n, k)
    return positions(where) if where.dtype == torch.bool else where


def decode_where(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The positions :func:`encode_indices` wrote: int64 indices (a list) or a bool mask of ``n`` (a bitmap)."""
    if data.numel() != index_nbytes(n, k):
        raise ValueError(f"{k} indices into {n} elements take {index_nbytes(n, k)} bytes, got {data.numel()}")
    if not uses_bitmap(n, k):
        return aligned(data, index_dtype(n)).to(torch.int64)
    levels = devices.cached(_BOOLS, data.device, lambda d: torch.tensor([False, True], device=d))
    mask = decode_levels(data, 1, n, levels, scratch.fresh(n, torch.bool, data.device))
    count = int(torch.count_nonzero(mask))  # host sync on a GPU: the payload must hold k values
    if count != k:
        raise ValueError(f"bitmap holds {count} indices, expected {k}")
    return mask


def aligned(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes viewed as ``dtype``; copied first only when their offset is not a multiple of its size."""
    flat = data.reshape(-1)
    if flat.storage_offset() % dtype.itemsize or flat.data_ptr() % dtype.itemsize:
        flat = flat.clone()
    return flat.view(dtype)


def count_from_nbytes(n: int, nbytes: int, value_size: int) -> int:
    """``k`` such that ``k * value_size + index_nbytes(n, k) == nbytes`` (the total grows with k)."""
    listed = nbytes // (value_size + index_dtype(n).itemsize)
    if listed * (value_size + index_dtype(n).itemsize) == nbytes and not uses_bitmap(n, listed):
        return listed
    mapped = bitmap_count(n, nbytes, value_size)
    if mapped is not None:
        return mapped
    raise ValueError(f"{nbytes} bytes are no sparse payload of a tensor of {n} elements "
                     f"with {value_size}-byte values")


def bitmap_count(n: int, nbytes: int, value_size: int) -> int | None:
    """``k`` if ``nbytes`` is a payload of ``k`` values and a bitmap of ``n`` bits (the bitmap reading
    of :func:`count_from_nbytes`), else None."""
    k, rest = divmod(nbytes - bitmap_nbytes(n), value_size)
    return k if k >= 0 and not rest and uses_bitmap(n, k) else None


def payload_nbytes(n: int, k: int, value_size: int) -> int:
    """Exact bytes of :func:`pack` for ``k`` values of ``value_size`` bytes out of ``n``."""
    return k * value_size + index_nbytes(n, k)


def pack(values: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """One uint8 tensor: the values' bytes, then the encoded indices (``idx`` sorted, distinct)."""
    raw = values.reshape(-1).contiguous().view(torch.uint8)
    return torch.cat([raw, encode_indices(idx, n)])


def pack_masked(flat: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`pack` of ``flat[mask]`` (``k`` set) with the indices of ``mask``, the values written in place."""
    n, size = flat.numel(), flat.element_size()
    if not uses_bitmap(n, k):
        idx = positions(mask)
        return pack(flat[idx], idx, n)
    blob = scratch.fresh(k * size + bitmap_nbytes(n), torch.uint8, flat.device)
    compact(flat, mask, blob[:k * size].view(flat.dtype))
    blob[k * size:] = pack_mask(mask)
    return blob


def pack_at_least(flat: torch.Tensor, tau: float) -> torch.Tensor:
    """:func:`pack_masked` of the elements with ``|flat| >= tau`` (a threshold's payload). On the CPU by
    cache-sized chunks (:mod:`lowband.compress.bitmaps`: a count per chunk, then the values and the bitmap written
    straight into the payload); elsewhere, and for an index list, in torch ops."""
    n = flat.numel()
    if bitmaps.fused(flat):
        blob = bitmaps.pack_large(flat, tau, uses_bitmap)
        if blob is not None:
            return blob
    magnitudes = torch.abs(flat, out=scratch.buffer("indices.abs", n, flat.dtype, flat.device))
    mask = torch.ge(magnitudes, tau, out=scratch.buffer("indices.at_least", n, torch.bool, flat.device))
    return pack_masked(flat, mask, int(torch.count_nonzero(mask)))  # host sync on a GPU: the payload's size


def pack_many_at_least(flats: list[torch.Tensor], tau: float) -> list[torch.Tensor]:
    """:func:`pack_at_least` of each flat tensor; the small CPU ones (of the first one's dtype) in one NumPy pass
    (:func:`lowband.compress.bitmaps.pack_many`), whose payloads are views of one buffer."""
    small = [i for i, f in enumerate(flats) if 0 < f.numel() < bitmaps.MANY_MAX_NUMEL and bitmaps.fused(f)]
    many = [i for i in small if flats[i].dtype == flats[small[0]].dtype]
    out: list[torch.Tensor | None] = [None] * len(flats)
    if len(many) > 1:
        for i, blob in zip(many, bitmaps.pack_many([flats[i] for i in many], tau, uses_bitmap)):
            out[i] = blob
    return [pack_at_least(f, tau) if blob is None else blob for f, blob in zip(flats, out)]


def unpack_dense(blob: torch.Tensor, shape: torch.Size, dtype: torch.dtype, k: int | None = None) -> torch.Tensor:
    """:func:`scatter` of :func:`unpack`: the dense tensor a sparse payload stands for. A bitmap on the CPU is
    expanded from its bits by chunks (:func:`lowband.compress.bitmaps.expand_large`), never as a whole mask."""
    return unpack_many_dense([(blob, shape, k)], dtype)[0]


def unpack_many_dense(payloads: list[tuple[torch.Tensor, torch.Size, int | None]], dtype: torch.dtype
                      ) -> list[torch.Tensor]:
    """:func:`unpack_dense` of each ``(blob, shape, k)`` (``k`` None: from the blob's length). Bitmaps on the CPU
    in NumPy: a large one by chunks, small ones together into one zeroed array
    (:func:`lowband.compress.bitmaps.expand_many`). (Read once per tensor, in as few calls as the checks allow:
    this loop runs over a model's layers every step.)"""
    out: list[torch.Tensor | None] = [None] * len(payloads)
    small: list[tuple[int, tuple[np.ndarray, int, int, bool]]] = []
    size, numpy = dtype.itemsize, dtype in bitmaps.NUMPY_FLOATS
    for i, (blob, shape, k) in enumerate(payloads):
        n = math.prod(shape)
        raw = blob.numpy() if numpy and blob.is_cpu else None
        mapped = None if raw is None else bitmap_count(n, raw.size, size)
        if mapped is None or (k is not None and k != mapped):  # a list, another device, or a wrong length
            values, where = unpack(blob, n, dtype, k)  # (unpack raises on a wrong length)
            out[i] = scatter(values, where, shape, dtype)
        elif n >= bitmaps.MANY_MAX_NUMEL:
            out[i] = bitmaps.expand_large(aligned(blob[:mapped * size], dtype), blob[mapped * size:], n).view(shape)
        else:
            small.append((i, (raw, mapped, n, blob.data_ptr() % size == 0)))
    if small:
        for (i, _), flat in zip(small, bitmaps.expand_many([part for _, part in small], dtype)):
            out[i] = flat.view(payloads[i][1])
    return cast(list[torch.Tensor], out)


def unpack(blob: torch.Tensor, n: int, dtype: torch.dtype, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values of ``dtype``, positions) from :func:`pack`; ``k`` from the length when not given. The positions
    are int64 indices, or a bool mask of ``n`` when a bitmap was sent (:func:`scatter` takes either)."""
    size = dtype.itemsize
    if k is None:
        k = count_from_nbytes(n, blob.numel(), size)
    elif blob.numel() != payload_nbytes(n, k, size):
        raise ValueError(f"payload of {k} of {n} elements takes {payload_nbytes(n, k, size)} bytes, "
                         f"got {blob.numel()}")
    return aligned(blob[:k * size], dtype), decode_where(blob[k * size:], n, k)


def scatter(values: torch.Tensor, where: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor of ``shape`` and ``dtype`` holding ``values`` at flat positions ``where`` (indices or a mask)."""
    if where.dtype == torch.bool:
        return expand(values.to(dtype), where).view(shape)
    out = scratch.zeros(math.prod(shape), dtype, values.device)
    out[where] = values.to(dtype)
    return out.view(shape)
