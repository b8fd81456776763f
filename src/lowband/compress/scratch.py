"""Reused work arrays for the compressors' intermediate results on the CPU; registers nothing.

Why: on the CPU, torch gets every large tensor from the C allocator, which maps fresh pages
from the kernel and returns them on free. Touching a fresh 100 MB array costs its page faults,
more than the arithmetic of an elementwise op over it (``benchmarks/compressors.py``'s memcpy
column is a clone into fresh memory). An encode that made five such
temporaries spent most of its time faulting pages in. A GPU has a caching allocator that
already recycles blocks (and streams whose order a shared buffer would have to respect), so
there :func:`buffer` simply allocates.

Contract:

1. ``buffer(slot, numel, dtype, device)`` returns an uninitialised tensor of ``numel`` elements;
   on the CPU it is a view of a per-thread, per-slot byte array kept between calls and grown
   (never shrunk) to the largest request;
2. the view stays valid until the same thread asks for the same slot again: a compressor uses
   it for intermediates of one call only, never for what it returns (payloads, decoded tensors);
3. threads never share one (the aggregator encodes on its own threads), so no lock is needed;
4. :func:`release` drops the calling thread's arrays; :func:`held_bytes` says what they hold:
   up to about 13 bytes per element of the largest tensor a thread compresses (QSGD: fp32 values,
   fp32 noise, 16-bit noise words, codes, packing words), what its encode would otherwise allocate
   and free on every call.

What a compressor returns (payloads, decoded tensors) cannot be recycled: it belongs to the
caller. :func:`fresh` and :func:`zeros` allocate it, and on Linux ask the kernel for 2 MiB
pages (``madvise(MADV_HUGEPAGE)``, before the first touch) when it holds a whole one
(:data:`HUGE_MIN_NBYTES`): where its pages are fresh from the kernel, one fault per 2 MiB instead
of one per 4 KiB (``benchmarks/compressors.py``'s copy into hinted memory takes ~0.6 of a plain
clone's time here; torch itself hints with ``THP_MEM_ALLOC_ENABLE=1``). From
:data:`FRESH_MIN_NBYTES` on glibc maps every allocation fresh; below, it may hand back heap pages
already faulted in, where the hint costs one system call and changes nothing. A model's layers
(2-10 MB each) are often fresh too: glibc returns the freed memory of a step's decoded tensors to
the kernel; with the hint from 2 MiB instead of 32 MiB, table (c) of ``benchmarks/compressors.py``
timed lowband's encode + decode of ResNet-18's list at 23.6-24.9 ms for threshold (28.7-29.8 ms
before), 30-31.6 ms for 4-bit QSGD (33-34.6 ms). Only the hint changes: where the kernel has
transparent huge pages off or no free 2 MiB page, it hands out small pages as before.
The work arrays of :func:`buffer` get the same hint when they are made (fewer TLB misses on the
passes over a large tensor). ``LOWBAND_HUGEPAGES=0`` turns the hint off.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Any, Optional

import numpy as np
import torch

_LOCAL = threading.local()
_CPU = torch.device("cpu")
HUGE_PAGE = 2 << 20
HUGE_MIN_NBYTES = HUGE_PAGE  # hint a result that holds a whole huge page
FRESH_MIN_NBYTES = 32 << 20  # glibc's largest mmap threshold: from here on, every allocation is fresh (zero) pages
_MADV_HUGEPAGE = 14


def _madvise() -> Optional[Any]:
    """libc's ``madvise``, or None off Linux, without it, or with ``LOWBAND_HUGEPAGES=0``."""
    if not sys.platform.startswith("linux") or os.environ.get("LOWBAND_HUGEPAGES", "1") == "0":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_ADVISE = _madvise()


def _local(name: str) -> dict[str, Any]:
    """The calling thread's dict ``name`` (made at its first use)."""
    held = getattr(_LOCAL, name, None)
    if held is None:
        held = {}
        setattr(_LOCAL, name, held)
    return held


def _pool() -> dict[str, torch.Tensor]:
    return _local("pool")


def buffer(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``(numel,)`` tensor of ``dtype`` on ``device``, recycled per thread and slot on the CPU."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    need = numel * dtype.itemsize
    pool = _pool()
    held = pool.get(slot)
    if held is None or held.numel() < need:
        pool.pop(slot, None)  # free the smaller one first: the peak stays one array per slot
        held = pool[slot] = hint_huge(torch.empty(max(need, 1), dtype=torch.uint8, device=device))
    return held[:need].view(dtype)  # offset 0: aligned for every dtype


def array(slot: str, numel: int, dtype: type | np.dtype) -> np.ndarray:
    """:func:`buffer` for the NumPy paths: an uninitialised NumPy array of ``numel`` elements of ``dtype``, recycled
    per thread and slot under the same contract (slicing a NumPy array costs a fraction of a torch view)."""
    need = numel * np.dtype(dtype).itemsize
    views = _views()
    held = views.get(slot)
    if held is None or held.size < need:
        views[slot] = held = buffer("numpy:" + slot, need, torch.uint8, _CPU).numpy()
    return held[:need].view(dtype)


def _views() -> dict[str, np.ndarray]:
    return _local("views")


_CONSTANTS: dict[tuple[int | float, str], np.ndarray] = {}


def constant(value: int | float, numel: int, dtype: type | np.dtype) -> np.ndarray:
    """``numel`` copies of ``value`` as a read-only NumPy array of ``dtype``, shared by every thread (one array per
    value and dtype, grown as needed): an operand where NumPy's loop against a scalar is slower, or a BLAS dot's."""
    key = (value, np.dtype(dtype).str)
    held = _CONSTANTS.get(key)
    if held is None or held.size < numel:
        held = np.full(numel, value, dtype=dtype)
        held.flags.writeable = False
        _CONSTANTS[key] = held
    return held[:numel]


def release() -> None:
    """Free the calling thread's arrays (they come back, at their first use, when needed again)."""
    _pool().clear()
    _views().clear()


def held_bytes() -> int:
    """Bytes the calling thread's arrays hold."""
    return sum(t.numel() for t in _pool().values())


def fresh(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(numel)`` for a result the caller keeps; large CPU ones hinted to huge pages (see above)."""
    out = torch.empty(numel, dtype=dtype, device=device)
    return hint_huge(out) if device.type == "cpu" else out


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` (``t`` itself when it has that dtype), the copy in :func:`fresh` memory, in ``t``'s shape."""
    if t.dtype == dtype:
        return t
    if not t.is_cpu or t.numel() * dtype.itemsize < FRESH_MIN_NBYTES:
        return t.to(dtype)  # (below the fresh-pages size the hint rarely pays: a plain conversion, its call cheaper)
    return fresh(t.numel(), dtype, t.device).view(t.shape).copy_(t)


def zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros(numel)`` for a result the caller keeps. On the CPU from ``calloc`` (NumPy's zeros), whose
    fresh pages the kernel hands out zeroed at their first write, instead of a pass writing zeros (half of a
    sparse decode's time), and hinted to huge pages before that write."""
    if device.type != "cpu":
        return torch.zeros(numel, dtype=dtype, device=device)
    out = torch.from_numpy(np.zeros(numel, dtype=f"u{dtype.itemsize}")).view(dtype)  # unsigned ints of its width
    return hint_huge(out)


def hint_huge(t: torch.Tensor) -> torch.Tensor:
    """Advise 2 MiB pages for the whole huge pages inside a contiguous CPU tensor of at least
    :data:`HUGE_MIN_NBYTES` not yet written; returns ``t``. Only a hint: any failure is ignored."""
    nbytes = t.numel() * t.element_size()
    if _ADVISE is None or nbytes < HUGE_MIN_NBYTES:
        return t
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end > start:
        _ADVISE(start, end - start, _MADV_HUGEPAGE)
    return t
