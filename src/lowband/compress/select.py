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
and fancy assignment, which release the GIL, by :data:`CHUNK` s (each chunk's offset from a count
of the mask before it) claimed by the threads (:func:`parallel`); elsewhere ``masked_select`` and
``masked_scatter_``.

:func:`parallel` is how every NumPy path here uses threads: the calling thread starts at once and
pool threads join as they wake, each claiming the next task (see its docstring for why).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch

from lowband.compress import scratch

SAMPLED_MIN_NUMEL = 1 << 15  # below this, torch.topk itself is faster (or NumPy's argpartition, on the CPU)
PARTITION_MAX_NUMEL = 1 << 19  # CPU tensors below this: NumPy's argpartition (faster than sampling there)
SAMPLED_MAX_DENSITY = 0.25  # k above this share of n: torch.topk
SAMPLE_ABOVE = 64  # sampled values expected above the threshold (its rank's sd: 1/8 of it)
_SAMPLER = torch.Generator().manual_seed(0x5EED)  # cpu: fixed sample positions, the result is exact anyway
PARALLEL_MIN_NUMEL = 1 << 20  # a tensor of fewer elements: one thread
CHUNK = 1 << 16  # elements per step of a chunked NumPy loop (a multiple of 8: whole bitmap bytes)
NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)  # the dtypes NumPy computes in (not bf16)
_BITS_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # any dtype's bits, as NumPy knows them
_POOL: list[ThreadPoolExecutor] = []
_LOCAL = threading.local()  # .inside: the running thread is in a task of parallel()


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
    starts = chunk_starts(where)

    def take(j: int) -> None:
        part = chunk(j, where.size)
        np.compress(where[part], src[part], out=dst[starts[j]:starts[j + 1]])

    parallel(chunks(where.size), take, where.size)
    return out


def expand(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A new tensor of ``mask``'s length: zeros, with ``values`` at the set positions of ``mask``, in order."""
    out = scratch.zeros(mask.numel(), values.dtype, values.device)
    if out.device.type != "cpu":
        return out.masked_scatter_(mask, values)
    src, dst, where = as_numpy(values), as_numpy(out), mask.numpy()
    starts = chunk_starts(where)

    def fill(j: int) -> None:
        part = chunk(j, where.size)
        dst[part][np.flatnonzero(where[part])] = src[starts[j]:starts[j + 1]]

    parallel(chunks(where.size), fill, where.size)
    return out


def chunk_starts(where: np.ndarray) -> list[int]:
    """Where each :data:`CHUNK` of a flat bool mask starts in the list of its set elements (then their total)."""
    counts = (int(np.count_nonzero(where[chunk(j, where.size)])) for j in range(chunks(where.size)))
    return list(itertools.accumulate(counts, initial=0))


def chunks(n: int) -> int:
    """How many :data:`CHUNK` s ``n`` elements make (at least one)."""
    return max(1, -(-n // CHUNK))


def chunk(j: int, n: int) -> slice:
    """Chunk ``j`` of ``n`` elements."""
    return slice(j * CHUNK, min(n, (j + 1) * CHUNK))


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A flat CPU tensor's storage as NumPy integers of its width (bf16 has no NumPy dtype; bits move alike)."""
    return t.view(_BITS_OF[t.element_size()]).numpy()


def threads() -> int:
    """How many threads the NumPy paths use at most: torch's intra-op threads, up to 8."""
    return max(1, min(torch.get_num_threads(), 8))


def parallel(count: int, task: Callable[[int], None], numel: int, min_numel: int = PARALLEL_MIN_NUMEL) -> None:
    """``task(j)`` for every ``j < count`` (tasks touching ``numel`` elements in all), on up to :func:`threads`
    threads when ``numel >= min_numel``: the calling thread starts at once, pool threads join as they wake, each
    claiming the next task until none is left; returns when all are done (then raises a task's error, if any).
    Tasks write only their own outputs and use only work arrays (:mod:`lowband.compress.scratch`) their caller
    does not hold (each runs in some thread, the caller's included). Nested calls run in one thread.

    Why claimed, not dealt out: a pool thread idle for a few milliseconds is slow to wake on a virtual machine
    (~0.35 ms timed by hand here, against ~0.02 ms right after a call), longer than a small call's whole work. With
    dealt-out shares the calling thread waited for it; a claimed task never waits for a thread that has not
    started it."""
    helpers = min(threads(), count) - 1 if numel >= min_numel and not getattr(_LOCAL, "inside", False) else 0
    if helpers <= 0:
        for j in range(count):
            task(j)
        return
    claim, lock, left, finished, errors = itertools.count(), threading.Lock(), [count], threading.Event(), []

    def work() -> None:
        _LOCAL.inside = True
        try:
            for j in claim:
                if j >= count:
                    return
                try:
                    task(j)
                except BaseException as err:  # noqa: BLE001 - raised in the caller, once all are done
                    errors.append(err)
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        finished.set()
        finally:
            _LOCAL.inside = False

    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="lowband-select"))
    for _ in range(helpers):
        _POOL[0].submit(work)
    work()
    finished.wait()
    if errors:
        raise errors[0]


class InOrder:
    """A step the tasks of one :func:`parallel` call take strictly in task order (a serial generator's draws), the
    rest of each task running alongside: ``with order.turn(j): ...`` waits until tasks ``< j`` have taken theirs.
    Tasks are claimed in order and each starts on its claim, so the earlier turns are always under way."""

    def __init__(self) -> None:
        self._next, self._changed = 0, threading.Condition()

    @contextlib.contextmanager
    def turn(self, j: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._next >= j)
        try:
            yield
        finally:  # (on an error too: the later tasks go on, parallel raises it at the end)
            with self._changed:
                self._next = j + 1
                self._changed.notify_all()


def chunked(n: int, body: Callable[[int, int], None]) -> None:
    """``body(lo, hi)`` for every :data:`CHUNK` of ``range(n)`` through :func:`parallel` (from
    :data:`PARALLEL_MIN_NUMEL` elements on): NumPy work that stays in the cache and releases the interpreter
    lock. Up to one chunk, one call in the calling thread."""
    if n <= CHUNK:
        body(0, n)
        return
    parallel(chunks(n), lambda j: body(j * CHUNK, min(n, (j + 1) * CHUNK)), n)
