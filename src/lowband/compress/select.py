"""Which elements a sparsifier keeps: the exact top-k by magnitude, and the positions of a mask.

Shared by ``topk``, ``threshold`` and the sparse index encoding; registers nothing.

:func:`largest` returns the exact top-k set (ascending indices). ``torch.topk`` on the CPU
runs a selection over all n magnitudes; for the densities sparsifiers use (k a few % of n)
this finds the same set in a few linear passes (DGC, Lin et al. arXiv:1712.01887, samples a
threshold the same way but keeps whatever crosses it; here the result stays exact):

1. |x| into a reused work array (:mod:`lowband.compress.scratch`);
2. estimate a threshold t a little below the k-th largest magnitude from a fixed random
   sample of positions (enough that ~256 sampled values lie above it; t's rank targets 1.25 k
   plus slack);
3. the candidates are every element with |x| >= t (one compare, one count); if fewer than k,
   t is taken lower once more, then the whole tensor is the candidate set;
4. ``torch.topk`` among the candidates (about 1.25 k of them) picks exactly k; every element
   above the k-th largest magnitude is a candidate, so the set is a true top-k (ties at the
   k-th value broken by ``torch.topk``, as before).

On a GPU (and for small tensors, or when k is most of n) it is ``torch.topk`` itself, which
a GPU runs as a radix select without the host sync that counting candidates needs.

:func:`positions` lists a mask's set positions, ascending: NumPy's ``flatnonzero`` on the CPU
(a third of ``torch.nonzero``'s time here), ``torch.nonzero`` elsewhere.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lowband.compress import scratch

SAMPLED_MIN_NUMEL = 1 << 16  # below this, torch.topk is as fast
SAMPLED_MAX_DENSITY = 0.25  # k above this share of n: torch.topk
SAMPLE_ABOVE = 256  # sampled values expected above the threshold
_SAMPLER = torch.Generator().manual_seed(0x5EED)  # cpu: fixed sample positions, the result is exact anyway


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Ascending int64 indices of the set elements of the flat bool ``mask`` (a host sync on a GPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)


def largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of ``k`` elements of largest magnitude in the flat tensor (exact; see the module)."""
    n = flat.numel()
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
    if candidates.numel() > k:  # keep k of them, in their (ascending) order: a mask, not a sort
        keep = torch.zeros(candidates.numel(), dtype=torch.bool, device=flat.device)
        keep[magnitudes[candidates].topk(k, sorted=False).indices] = True
        candidates = candidates[keep]
    return candidates


def _threshold(magnitudes: torch.Tensor, k: int, slack: float) -> torch.Tensor:
    """A magnitude that about ``slack * k`` (plus a few standard deviations) elements reach."""
    n = magnitudes.numel()  # cpu: only the CPU path samples (positions from the CPU generator)
    m = min(n, max(16_384, math.ceil(SAMPLE_ABOVE * n / k)))
    sample = magnitudes[torch.randint(0, n, (m,), generator=_SAMPLER)]
    expected = slack * k * m / n + 3 * math.sqrt(k * m / n) + 1  # sampled values above the threshold
    rank = min(m, max(1, math.ceil(expected)))
    return sample.topk(rank, sorted=False).values.min()
