"""A threshold's payload on the CPU: the kept values and their bitmap, written in NumPy; registers nothing.

The payload (:mod:`lowband.compress.indices`) is every element with ``|x| >= tau``, then their
positions as a bitmap of ``ceil(n / 8)`` bytes, least significant bit first. torch builds it in
whole-tensor passes (``abs``, ``ge``, ``count_nonzero``, ``masked_select``), each reading and
writing the tensor; NumPy compacts and expands a mask several times faster than torch on a CPU.
Two paths, one layout, same bytes as :func:`lowband.compress.indices.pack_masked`:

* one large tensor (:func:`pack_large`, :func:`expand_large`): :data:`CHUNK`-element steps that
  stay in the cache, one slice of the tensor per thread (:func:`lowband.compress.select.run`):

  1. per chunk: ``|x|`` into a small work array, ``>= tau`` into the mask, its count (one read of
     ``x`` where the torch ops read and wrote it four times);
  2. with the counts, every slice knows where its values start: per chunk ``np.compress`` into the
     payload and ``np.packbits`` into its bitmap;
  3. decoding, each slice counts its bitmap's bits (a popcount of n / 8 bytes), then per chunk
     zeroes the chunk of the output (in the cache, not a pass of its own), unpacks the bits, lists
     the set positions and writes the values there;

* many small tensors (:func:`pack_many`, :func:`expand_many`: a model's layers, which the
  aggregator hands over in one call): the same steps tensor by tensor, without the per-call
  layers around them; all payloads are views of one buffer (each on an 8-byte boundary), all
  decoded tensors views of one array.

Only for :func:`fused` tensors (contiguous, on the CPU, a dtype NumPy computes in: not bf16);
the caller keeps the torch path for the others, and for payloads whose positions travel as an
index list (few kept: :func:`lowband.compress.indices.uses_bitmap`).
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np
import torch

from lowband.compress import scratch
from lowband.compress.select import CHUNK, NUMPY_FLOATS, as_numpy, chunked, run, slices

MANY_MAX_NUMEL = 1 << 18  # from this size on, a tensor takes the large path (its call overhead is small)


def fused(flat: torch.Tensor) -> bool:
    """Whether this module takes ``flat``: contiguous, on the CPU, fp16/fp32/fp64."""
    return flat.device.type == "cpu" and flat.dtype in NUMPY_FLOATS and flat.is_contiguous()


def mask_large(flat: torch.Tensor, tau: float, mask: torch.Tensor) -> list[list[int]]:
    """Step 1: ``mask`` (flat bool, ``flat``'s length) = ``|flat| >= tau``; returns the set count of every
    :data:`CHUNK` of every slice (:func:`slices`)."""
    src, where = flat.numpy(), mask.numpy()

    def slice_counts(lo: int, hi: int) -> list[int]:
        work = scratch.array("bitmaps.abs", CHUNK, src.dtype)
        counts = []
        for c0 in range(lo, hi, CHUNK):
            c1 = min(c0 + CHUNK, hi)
            np.greater_equal(np.abs(src[c0:c1], out=work[:c1 - c0]), tau, out=where[c0:c1])
            counts.append(int(np.count_nonzero(where[c0:c1])))
        return counts

    return run([(slice_counts, lo, hi) for lo, hi in slices(flat.numel())])


def pack_large(flat: torch.Tensor, mask: torch.Tensor, counts: list[list[int]], blob: torch.Tensor) -> None:
    """Step 2: ``blob`` (uint8, ``k * itemsize + ceil(n / 8)`` bytes) = ``flat[mask]``'s bytes, then the bitmap of
    ``mask``, from :func:`mask_large`'s counts."""
    k = sum(map(sum, counts))
    src, where = flat.numpy(), mask.numpy()
    dst, out = blob[:k * flat.element_size()].view(flat.dtype).numpy(), blob[k * flat.element_size():].numpy()

    def fill(lo: int, hi: int, start: int, chunk_counts: list[int]) -> None:
        for c0, count in zip(range(lo, hi, CHUNK), chunk_counts):
            c1 = min(c0 + CHUNK, hi)
            np.compress(where[c0:c1], src[c0:c1], out=dst[start:start + count])
            out[c0 // 8:(c1 + 7) // 8] = np.packbits(where[c0:c1], bitorder="little")
            start += count

    starts = list(itertools.accumulate((sum(c) for c in counts), initial=0))
    run([(fill, lo, hi, starts[i], counts[i]) for i, (lo, hi) in enumerate(slices(flat.numel()))])


def expand_large(values: torch.Tensor, bits: torch.Tensor, n: int) -> torch.Tensor:
    """Step 3: a new flat tensor of ``n``: zeros, with ``values`` in order at the set bits of ``bits``
    (a CPU uint8 bitmap); ValueError unless it has ``values.numel()`` bits set."""
    packed = bits.numpy()
    parts = slices(n)
    per_part = [popcount(packed[lo // 8:(hi + 7) // 8]) for lo, hi in parts]
    _check(sum(per_part), values.numel())
    zeroed = n * values.element_size() >= scratch.HUGE_MIN_NBYTES  # fresh pages from the kernel: zero already
    out = (scratch.zeros if zeroed else scratch.fresh)(n, values.dtype, values.device)  # else zeroed by chunks
    src, dst = as_numpy(values), as_numpy(out)

    def fill(lo: int, hi: int, start: int) -> None:
        for c0 in range(lo, hi, CHUNK):
            c1 = min(c0 + CHUNK, hi)
            start += _expand(packed[c0 // 8:(c1 + 7) // 8], src[start:], dst[c0:c1], zero=not zeroed)

    starts = list(itertools.accumulate(per_part, initial=0))
    run([(fill, lo, hi, starts[i]) for i, (lo, hi) in enumerate(parts)])
    return out


def pack_many(flats: Sequence[torch.Tensor], tau: float, uses_bitmap: Callable[[int, int], bool]
              ) -> list[torch.Tensor | None]:
    """Each small :func:`fused` tensor's payload, views of one new buffer; None where its count ``k`` makes the
    index list the smaller encoding (``uses_bitmap(n, k)`` false): the caller packs those its own way."""
    sources = [flat.numpy() for flat in flats]
    sizes = [src.size for src in sources]
    starts = list(itertools.accumulate(sizes, initial=0))
    mask = scratch.array("bitmaps.mask", starts[-1], np.bool_)

    def count(i: int) -> int:
        where = mask[starts[i]:starts[i + 1]]
        work = scratch.array("bitmaps.abs", sizes[i], sources[i].dtype)
        np.greater_equal(np.abs(sources[i], out=work), tau, out=where)
        return int(np.count_nonzero(where))

    counts = [count(i) for i in range(len(sources))]
    nbytes = [k * src.itemsize + (src.size + 7) // 8 if uses_bitmap(src.size, k) else 0
              for src, k in zip(sources, counts)]
    offsets = list(itertools.accumulate((-(-size // 8) * 8 for size in nbytes), initial=0))  # each on a word
    blob = scratch.fresh(offsets[-1], torch.uint8, flats[0].device)
    raw = blob.numpy()

    def fill(i: int) -> None:
        if nbytes[i]:
            at, values, where = offsets[i], counts[i] * sources[i].itemsize, mask[starts[i]:starts[i + 1]]
            np.compress(where, sources[i], out=raw[at:at + values].view(sources[i].dtype))
            raw[at + values:at + nbytes[i]] = np.packbits(where, bitorder="little")

    for i in range(len(sources)):
        fill(i)
    return [blob[at:at + size] if size else None for at, size in zip(offsets, nbytes)]


def expand_many(parts: Sequence[tuple[np.ndarray, int, int, bool]], dtype: torch.dtype) -> list[torch.Tensor]:
    """For each ``(payload, k, n, aligned)`` (a CPU payload's bytes: ``k`` values of ``dtype``, then the bitmap of
    ``n``; ``aligned``: whether they start on a multiple of the dtype's size): the flat decoded tensor, each a
    view of one new zeroed array; ValueError where a bitmap's count is not ``k``. Values move as integers of
    their width, so any dtype does. (NumPy keeps the interpreter lock in the fancy assignment: spreading the
    tensors over threads measured slower.)"""
    sizes = [n for _, _, n, _ in parts]
    starts = list(itertools.accumulate(sizes, initial=0))
    out = scratch.fresh(starts[-1], dtype, torch.device("cpu"))  # each tensor zeroed by _expand, in the cache
    dst, width = as_numpy(out), dtype.itemsize
    for (raw, k, n, aligned), lo in zip(parts, starts):
        values = raw[:k * width] if aligned else raw[:k * width].copy()  # (at an odd offset of a gathered buffer)
        _expand(raw[k * width:], values.view(dst.dtype), dst[lo:lo + n], k)
    return list(out.split(sizes))


def _expand(packed: np.ndarray, src: np.ndarray, dst: np.ndarray, expected: int | None = None,
            zero: bool = True) -> int:
    """``dst`` = zeros (already, unless ``zero``), and at the set bits of ``packed`` the first values of ``src``, in
    order; returns how many (ValueError unless ``expected``, when given)."""
    set_at = np.flatnonzero(np.unpackbits(packed, count=dst.size, bitorder="little").view(np.bool_))
    if expected is not None:
        _check(set_at.size, expected)
    if zero:
        dst.fill(0)
    dst[set_at] = src[:set_at.size]
    return set_at.size


def negative(flat: torch.Tensor) -> torch.Tensor:
    """The bitmap of ``flat < 0`` (``ceil(n / 8)`` new uint8 bytes, least significant bit first) of a :func:`fused`
    tensor, by chunks on every thread: NumPy's compare and ``packbits`` cost a fraction of torch's ``lt`` and
    bit packing on a CPU."""
    src = flat.numpy()
    out = scratch.fresh((src.size + 7) // 8, torch.uint8, flat.device)
    bits = out.numpy()

    def fill(c0: int, c1: int) -> None:
        below = scratch.array("bitmaps.negative", c1 - c0, np.bool_)  # the running thread's own
        bits[c0 // 8:(c1 + 7) // 8] = np.packbits(np.less(src[c0:c1], 0, out=below), bitorder="little")

    chunked(src.size, fill)
    return out


def _check(count: int, expected: int) -> None:
    if count != expected:
        raise ValueError(f"bitmap holds {count} indices, expected {expected}")


def popcount(packed: np.ndarray) -> int:
    """Set bits in a uint8 array."""
    if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(np.unpackbits(packed).sum(dtype=np.int64))
