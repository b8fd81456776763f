"""Which elements a sparsifier keeps: the exact top-k by magnitude, and the positions of a mask.

Shared by ``topk``, ``threshold`` and the sparse index encoding; registers nothing.

:func:`largest` returns the exact top-k set (ascending indices). ``torch.topk`` on the CPU
runs a selection over all n magnitudes; for the densities sparsifiers use (k a few % of n)
this finds the same set in a few linear passes (DGC, Lin et al. arXiv:1712.01887, samples a
threshold the same way but keeps whatever crosses it; here the result stays exact):

1. |x| into a reused work array (:mod:`lowband.compress.scratch`);
2. estimate a threshold t a little below the k-th largest magnitude from a fixed random
   sample of positions (enough that ~64 sampled values lie above it; t's rank targets 1.25 k
   plus three standard deviations of the sample);
3. the candidates are every element with |x| >= t (one compare, one count); if fewer than k,
   t is taken lower once more, then the whole tensor is the candidate set;
4. ``torch.topk`` among the candidates (about 1.25 k of them) picks exactly k; every element
   above the k-th largest magnitude is a candidate, so the set is a true top-k (ties at the
   k-th value broken by ``torch.topk``, as before).

On a GPU (and for tiny tensors, or when k is most of n) it is ``torch.topk`` itself, which
a GPU runs as a radix select without the host sync that counting candidates needs. A CPU tensor
of fewer than :data:`PARTITION_MAX_NUMEL` elements takes NumPy's ``argpartition`` (an introselect,
faster there than ``torch.topk`` and than the sampling, as profiled here), the same exact set
(ties broken its own way).

:func:`positions` lists a mask's set positions, ascending: NumPy's ``flatnonzero`` on the CPU
(faster than ``torch.nonzero`` on a CPU), ``torch.nonzero`` elsewhere. :func:`compact` and
:func:`expand` move values between a dense tensor and the list of its masked elements (a
threshold's payload with a bitmap). On the CPU they run NumPy's ``compress`` / ``flatnonzero``
and fancy assignment, which release the GIL, on as many slices as torch has threads (each
slice's offset from a count of the mask before it); elsewhere ``masked_select`` and
``masked_scatter_``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from lowband.compress import scratch

SAMPLED_MIN_NUMEL = 1 << 15  # below this, torch.topk itself is faster (or NumPy's argpartition, on the CPU)
PARTITION_MAX_NUMEL = 1 << 19  # CPU tensors below this: NumPy's argpartition (faster than sampling there)
SAMPLED_MAX_DENSITY = 0.25  # k above this share of n: torch.topk
SAMPLE_ABOVE = 64  # sampled values expected above the threshold (its rank's sd: 1/8 of it)
_SAMPLER = torch.Generator().manual_seed(0x5EED)  # cpu: fixed sample positions, the result is exact anyway
PARALLEL_MIN_NUMEL = 1 << 20  # below this, one slice
CHUNK = 1 << 16  # elements per step of a chunked NumPy loop (a multiple of 8: whole bitmap bytes)
NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)  # the dtypes NumPy computes in (not bf16)
_BITS_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # any dtype's bits, as NumPy knows them
_POOL: list[ThreadPoolExecutor] = []


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Ascending int64 indices of the set elements of the flat bool ``mask`` (a host sync on a GPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)


def largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of ``k`` elements of largest magnitude in the flat tensor (exact; see the module)."""
    n = flat.numel()
    if flat.device.type == "cpu" and n < PARTITION_MAX_NUMEL and 0 < k < n and flat.dtype in NUMPY_FLOATS:
        src = flat.contiguous().numpy()
        magnitudes = np.abs(src, out=scratch.array("select.abs", n, src.dtype))
        picked = np.argpartition(magnitudes, n - k)[n - k:]
        picked.sort()
        return torch.from_numpy(picked)
    if flat.device.type != "cpu" or n < SAMPLED_MIN_NUMEL or k > SAMPLED_MAX_DENSITY * n:
        return flat.abs().topk(k, sorted=False).indices.sort().values
    magnitudes = torch.abs(flat, out=scratch.buffer("select.abs", n, flat.dtype, flat.device))
    mask = scratch.buffer("select.mask", n, torch.bool, flat.device)
    for slack in (1.25, 2.0):
        threshold = _threshold(magnitudes, k, slack)
        if int(torch.count_nonzero(torch.ge(magnitudes, threshold, out=mask))) >= k:
            candidates = positions(mask)
            break
    else:  # many equal magnitudes, or a sample far off: every element is a candidate
        candidates = torch.arange(n, device=flat.device)
    return keep_largest(candidates, magnitudes, k)


def keep_largest(candidates: torch.Tensor, magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` of the ascending ``candidates`` with the largest ``magnitudes``, still ascending (all if
    there are no more than ``k``): ``torch.topk`` among them, then a mask keeps their order (no sort)."""
    if candidates.numel() <= k:
        return candidates
    keep = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    keep[magnitudes[candidates].topk(k, sorted=False).indices] = True
    return candidates[keep]


def _threshold(magnitudes: torch.Tensor, k: int, slack: float) -> torch.Tensor:
    """A magnitude that about ``slack * k`` (plus a few standard deviations) elements reach."""
    n = magnitudes.numel()  # cpu: only the CPU path samples (positions from the CPU generator)
    m = min(n, max(2048, math.ceil(SAMPLE_ABOVE * n / k)))
    sample = magnitudes[torch.randint(0, n, (m,), generator=_SAMPLER)]
    expected = slack * k * m / n + 3 * math.sqrt(k * m / n) + 1  # sampled values above the threshold
    rank = min(m, max(1, math.ceil(expected)))
    return sample.topk(rank, sorted=False).values.min()


def compact(flat: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (as many elements as ``mask`` has set) = ``flat[mask]``, in order; returns ``out``."""
    if flat.device.type != "cpu":
        return out.copy_(flat[mask])
    src, dst, where = as_numpy(flat), as_numpy(out), mask.numpy()
    jobs = [(np.compress, where[part], src[part], 0, dst[lo:hi]) for part, lo, hi in _slices(where)]
    run(jobs)
    return out


def expand(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A new tensor of ``mask``'s length: zeros, with ``values`` at the set positions of ``mask``, in order."""
    out = scratch.zeros(mask.numel(), values.dtype, values.device)
    if out.device.type != "cpu":
        return out.masked_scatter_(mask, values)
    src, dst, where = as_numpy(values), as_numpy(out), mask.numpy()
    run([(_fill, dst[part], where[part], src[lo:hi]) for part, lo, hi in _slices(where)])
    return out


def _fill(dst: np.ndarray, where: np.ndarray, values: np.ndarray) -> None:
    dst[np.flatnonzero(where)] = values


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A flat CPU tensor's storage as NumPy integers of its width (bf16 has no NumPy dtype; bits move alike)."""
    return t.view(_BITS_OF[t.element_size()]).numpy()


def _slices(where: np.ndarray) -> list[tuple[slice, int, int]]:
    """(slice of the mask, first and last+1 position of its elements in the compact list) per thread."""
    out, start = [], 0
    for lo, hi in slices(where.size):
        count = int(np.count_nonzero(where[lo:hi]))
        out.append((slice(lo, hi), start, start + count))
        start += count
    return out


def run(jobs: list[tuple]) -> list:
    """Each ``(fn, *args)`` on the pool, as many at once as torch has threads (NumPy releases the GIL);
    their results, in order."""
    if len(jobs) == 1:
        return [jobs[0][0](*jobs[0][1:])]
    if not _POOL:
        workers = max(1, min(torch.get_num_threads(), 8))
        _POOL.append(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowband-select"))
    return [future.result() for future in [_POOL[0].submit(fn, *args) for fn, *args in jobs]]


def slices(n: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` per thread: whole :data:`CHUNK` s (the last slice ends at ``n``), one slice below
    :data:`PARALLEL_MIN_NUMEL`."""
    parts = max(1, min(torch.get_num_threads(), 8)) if n >= PARALLEL_MIN_NUMEL else 1
    chunks = -(-n // CHUNK)
    per = max(1, -(-chunks // parts)) * CHUNK  # whole chunks per slice, in elements
    return [(lo, min(n, lo + per)) for lo in range(0, max(n, 1), per)]


def chunked(n: int, body: Callable[[int, int], None]) -> None:
    """``body(lo, hi)`` for every :data:`CHUNK` of ``range(n)``, in order within each slice, the slices
    (:func:`slices`) at once: NumPy work that stays in the cache and releases the interpreter lock. Up to one
    chunk, one call in the calling thread."""
    if n <= CHUNK:
        body(0, n)
        return

    def part(lo: int, hi: int) -> None:
        for c0 in range(lo, hi, CHUNK):
            body(c0, min(c0 + CHUNK, hi))

    run([(part, lo, hi) for lo, hi in slices(n)])
