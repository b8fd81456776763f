"""A threshold's payload on the CPU: the kept values and their bitmap, by compiled loops or NumPy; registers nothing.

The payload (:mod:`lowband.compress.indices`) is every element with ``|x| >= tau``, then their
positions as a bitmap of ``ceil(n / 8)`` bytes, least significant bit first. torch builds it in
whole-tensor passes (``abs``, ``ge``, ``count_nonzero``, ``masked_select``), each reading and
writing the tensor. Here each step is one loop over the elements when numba is installed
(:mod:`lowband.compress.kernels`), else NumPy passes over cache-sized pieces; same bytes either way,
and the same bytes as :func:`lowband.compress.indices.pack_masked`. Two paths:

* one large tensor (:func:`pack_large`, :func:`expand_large`): :data:`CHUNK`-element steps that
  stay in the cache, claimed one by one by the threads (:func:`lowband.compress.select.parallel`):

  1. per chunk, the count of ``|x| >= tau`` (NumPy: ``|x|`` into a small work array, ``>= tau``
     into a mask, its count);
  2. with the counts, every chunk knows where its values start: its values and its bitmap bytes
     are written straight into the payload (NumPy: ``np.compress`` and ``np.packbits`` of the mask);
  3. decoding, the bitmap's bits are counted per chunk (popcounts of 64-bit words), then per chunk
     each element takes the next value or 0 by its bit (NumPy: the output's chunk zeroed in the
     cache, the bits unpacked, the set positions listed and the values written there);

* many small tensors (:func:`pack_many`, :func:`expand_many`: a model's layers, which the
  aggregator hands over in one call): the same steps tensor by tensor, without the per-call
  layers around them; all payloads are views of one buffer (each on an 8-byte boundary), all
  decoded tensors views of one array.

Only for :func:`fused` tensors (contiguous, on the CPU, a dtype NumPy computes in: not bf16;
the compiled encode takes fp32 and fp64, fp16 keeps the NumPy passes); the caller keeps the
torch path for the others, and for payloads whose positions travel as an index list (few kept:
:func:`lowband.compress.indices.uses_bitmap`).
"""

from __future__ import annotations

import itertools
import types
from typing import Callable, Sequence

import numpy as np
import torch

from lowband.compress import kernels, scratch
from lowband.compress.select import CHUNK, NUMPY_FLOATS, as_numpy, chunk, chunks, parallel

MANY_MAX_NUMEL = 1 << 18  # from this size on, a tensor takes the large path (its call overhead is small)


def fused(flat: torch.Tensor) -> bool:
    """Whether this module takes ``flat``: contiguous, on the CPU, fp16/fp32/fp64."""
    return flat.is_cpu and flat.dtype in NUMPY_FLOATS and flat.is_contiguous()


def pack_large(flat: torch.Tensor, tau: float, uses_bitmap: Callable[[int, int], bool]) -> torch.Tensor | None:
    """The payload of the elements of a :func:`fused` ``flat`` with ``|x| >= tau`` (a new uint8 tensor: their values,
    then the bitmap), by chunks on every thread; None where their count ``k`` makes the index list the smaller
    encoding (``uses_bitmap(n, k)`` false): the caller packs those its own way."""
    src, n, fast = flat.numpy(), flat.numel(), _compiled(flat)
    counts = [0] * chunks(n)
    where = None if fast else scratch.array("bitmaps.mask", n, np.bool_)  # the NumPy path's mask, read twice
    limit = src.dtype.type(tau)  # compared in the tensor's dtype, as NumPy and torch compare with a Python float

    def count(j: int) -> None:
        part = chunk(j, n)
        if fast:
            counts[j] = fast.count_at_least(src[part], limit)
        else:
            work = scratch.array("bitmaps.abs", CHUNK, src.dtype)[:part.stop - part.start]  # the running thread's own
            counts[j] = int(np.count_nonzero(np.greater_equal(np.abs(src[part], out=work), limit, out=where[part])))

    parallel(len(counts), count, n)
    starts = list(itertools.accumulate(counts, initial=0))
    k = starts[-1]
    if not uses_bitmap(n, k):
        return None
    blob = scratch.fresh(k * src.itemsize + (n + 7) // 8, torch.uint8, flat.device)
    dst, out = blob[:k * src.itemsize].view(flat.dtype).numpy(), blob[k * src.itemsize:].numpy()

    def fill(j: int) -> None:
        part, values, bits = chunk(j, n), dst[starts[j]:starts[j + 1]], out[j * CHUNK // 8:(j + 1) * CHUNK // 8]
        if fast:
            fast.pack_at_least(src[part], limit, values, bits)
        else:
            np.compress(where[part], src[part], out=values)
            bits[:] = np.packbits(where[part], bitorder="little")

    parallel(len(counts), fill, n)
    return blob


def expand_large(values: torch.Tensor, bits: torch.Tensor, n: int) -> torch.Tensor:
    """A new flat tensor of ``n``: zeros, with ``values`` in order at the set bits of ``bits`` (a CPU uint8 bitmap),
    by chunks on every thread; ValueError unless it has ``values.numel()`` bits set."""
    packed = bits.numpy()
    starts = list(itertools.accumulate(_chunk_popcounts(packed), initial=0))
    _check(starts[-1], values.numel())
    zeroed = n * values.element_size() >= scratch.FRESH_MIN_NBYTES  # fresh pages from the kernel: zero already
    out = (scratch.zeros if zeroed else scratch.fresh)(n, values.dtype, values.device)  # else zeroed by chunks
    src, dst = as_numpy(values), as_numpy(out)

    def fill(j: int) -> None:
        part = chunk(j, n)
        _expand(packed[part.start // 8:(part.stop + 7) // 8], src[starts[j]:starts[j + 1]], dst[part],
                starts[j + 1] - starts[j], zero=not zeroed)

    parallel(len(starts) - 1, fill, n)
    return out


def pack_many(flats: Sequence[torch.Tensor], tau: float, uses_bitmap: Callable[[int, int], bool]
              ) -> list[torch.Tensor | None]:
    """Each small :func:`fused` tensor's payload (all of one dtype), views of one new buffer; None where its count
    ``k`` makes the index list the smaller encoding (``uses_bitmap(n, k)`` false): the caller packs those its own
    way. In one thread: spreading a call's small tensors over threads measured slower here."""
    sources = [flat.numpy() for flat in flats]
    fast, limit = _compiled(flats[0]), sources[0].dtype.type(tau)
    if fast:
        counts = [fast.count_at_least(src, limit) for src in sources]
    else:
        starts = list(itertools.accumulate((src.size for src in sources), initial=0))
        mask = scratch.array("bitmaps.mask", starts[-1], np.bool_)
        work = scratch.array("bitmaps.abs", max(src.size for src in sources), sources[0].dtype)
        wheres = [mask[lo:hi] for lo, hi in zip(starts, starts[1:])]
        counts = [int(np.count_nonzero(np.greater_equal(np.abs(src, out=work[:src.size]), limit, out=where)))
                  for src, where in zip(sources, wheres)]
    nbytes = [k * src.itemsize + (src.size + 7) // 8 if uses_bitmap(src.size, k) else 0
              for src, k in zip(sources, counts)]
    offsets = list(itertools.accumulate((-(-size // 8) * 8 for size in nbytes), initial=0))  # each on a word
    blob = scratch.fresh(offsets[-1], torch.uint8, flats[0].device)
    raw = blob.numpy()
    for i, (src, k, at, size) in enumerate(zip(sources, counts, offsets, nbytes)):
        if size:
            values, bits = raw[at:at + k * src.itemsize].view(src.dtype), raw[at + k * src.itemsize:at + size]
            if fast:
                fast.pack_at_least(src, limit, values, bits)
            else:
                np.compress(wheres[i], src, out=values)
                bits[:] = np.packbits(wheres[i], bitorder="little")
    return [blob[at:at + size] if size else None for at, size in zip(offsets, nbytes)]


def expand_many(parts: Sequence[tuple[np.ndarray, int, int, bool]], dtype: torch.dtype) -> list[torch.Tensor]:
    """For each ``(payload, k, n, aligned)`` (a CPU payload's bytes: ``k`` values of ``dtype``, then the bitmap of
    ``n``; ``aligned``: whether they start on a multiple of the dtype's size): the flat decoded tensor, each a
    view of one new zeroed array; ValueError where a bitmap's count is not ``k``. Values move as integers of
    their width, so any dtype does. In one thread: spreading the tensors over threads measured slower here (the
    interpreter lock and a pool thread's wake-up cost more than their share of a small tensor's work)."""
    sizes = [n for _, _, n, _ in parts]
    starts = list(itertools.accumulate(sizes, initial=0))
    out = scratch.fresh(starts[-1], dtype, torch.device("cpu"))  # each tensor zeroed by _expand, in the cache
    dst, width = as_numpy(out), dtype.itemsize
    for (raw, k, n, aligned), lo in zip(parts, starts):
        values = raw[:k * width] if aligned else raw[:k * width].copy()  # (at an odd offset of a gathered buffer)
        _expand(raw[k * width:], values.view(dst.dtype), dst[lo:lo + n], k)
    return list(out.split(sizes))


def _expand(packed: np.ndarray, src: np.ndarray, dst: np.ndarray, expected: int, zero: bool = True) -> None:
    """``dst`` = zeros (already, unless ``zero``: the NumPy path then skips the fill), and at the set bits of
    ``packed`` the values of ``src`` in order (integer arrays of one width); ValueError unless ``packed`` holds
    ``expected`` set bits among ``dst.size``."""
    fast = kernels.loaded()
    if fast:
        _check(fast.expand_bits(packed, src, dst), expected)  # (reads no value past src's end, whatever the bits)
        return
    set_at = np.unpackbits(packed, count=dst.size, bitorder="little").view(np.bool_).nonzero()[0]  # (1-D: flatnonzero)
    _check(set_at.size, expected)
    if zero:
        dst.fill(0)
    dst[set_at] = src[:set_at.size]


def _compiled(flat: torch.Tensor) -> types.SimpleNamespace | None:
    """The compiled kernels (:mod:`lowband.compress.kernels`) where they take ``flat``'s dtype; else None."""
    fast = kernels.loaded()
    return fast if fast is not None and flat.dtype in (torch.float32, torch.float64) else None


def _check(count: int, expected: int) -> None:
    if count != expected:
        raise ValueError(f"bitmap holds {count} indices, expected {expected}")


def _chunk_popcounts(packed: np.ndarray) -> list[int]:
    """Set bits in each :data:`CHUNK`'s bytes of a bitmap (one count for an empty one): whole chunks as 64-bit
    words, popcounts summed per chunk in one reduction (a few times faster than ``reduceat`` over the bytes)."""
    per = CHUNK // 8  # bytes per chunk
    whole = packed.size // per * per
    counts = _popcounts(packed[:whole].view(np.uint64)).reshape(-1, per // 8).sum(axis=1, dtype=np.int64).tolist()
    if whole < packed.size or not counts:  # the last partial chunk (or the only, empty one)
        counts.append(int(_popcounts(packed[whole:]).sum(dtype=np.int64)))
    return counts


def _popcounts(words: np.ndarray) -> np.ndarray:
    """Set bits of each unsigned integer (NumPy >= 2.0 counts them natively)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    return np.unpackbits(words.view(np.uint8)).reshape(words.size, -1).sum(axis=1)
