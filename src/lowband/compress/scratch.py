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
"""

from __future__ import annotations

import threading

import torch

_LOCAL = threading.local()


def _pool() -> dict[str, torch.Tensor]:
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        pool = _LOCAL.pool = {}
    return pool


def buffer(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``(numel,)`` tensor of ``dtype`` on ``device``, recycled per thread and slot on the CPU."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    need = numel * dtype.itemsize
    pool = _pool()
    held = pool.get(slot)
    if held is None or held.numel() < need:
        pool.pop(slot, None)  # free the smaller one first: the peak stays one array per slot
        held = pool[slot] = torch.empty(max(need, 1), dtype=torch.uint8, device=device)
    return held[:need].view(dtype)  # offset 0: aligned for every dtype


def release() -> None:
    """Free the calling thread's arrays (they come back, at their first use, when needed again)."""
    _pool().clear()


def held_bytes() -> int:
    """Bytes the calling thread's arrays hold."""
    return sum(t.numel() for t in _pool().values())
