"""``dgc``: Deep Gradient Compression's sparsifier — sampled top-k threshold, warm-up density.

Lin, Han, Mao, Wang and Dally, "Deep Gradient Compression: Reducing the Communication
Bandwidth for Distributed Training" (ICLR 2018, arXiv:1712.01887). Pair it with the
``dgc`` feedback (:mod:`lowband.feedback.dgc`: momentum correction, momentum factor
masking, local gradient clipping) and plain SGD without momentum as the inner optimizer.

Per tensor and round (n elements, step s = how often this key was encoded before):

1. density d(s): with ``warmup_steps`` W > 0, the paper's exponential warm-up: for
   s < W, stage i = floor(4 s / W) sends d = max(ratio, 0.25 / 4**i) — 25%, 6.25%,
   1.5625%, 0.39% — then ``ratio`` (default 0.001, i.e. 99.9% sparsity) from s >= W;
   k = max(1, round(d n));
2. sample m = min(n, max(1000, ceil(``sample`` n))) magnitudes (with repetition; all of
   them when m = n) and take the threshold t = the ceil(k m / n)-th largest sampled |x|;
3. select |x| >= t; if more than k are selected, take the exact top-k among the
   selected (the paper's hierarchical selection), so at most k elements are sent;
4. send the values (input dtype) and indices (:mod:`lowband.compress.indices`) in one
   byte tensor. The count varies with the data (``fixed_size = False``); receivers
   recover it from the payload's length.

Fewer than k elements go out when the sampled threshold overshoots; with n <= 1000 the
sample is the whole tensor and the selection is exact top-k. The step counter advances
once per encode of a key, so it stays in lockstep on every rank (every rank encodes
every key each round) and is saved by :meth:`DGC.state_dict`. Sampling is seeded by
(``seed``, key, step): runs are reproducible.

Example::

    agg = Aggregator(comm, build("dgc:ratio=0.001,warmup_steps=400", COMPRESSORS),
                     build("dgc:momentum=0.9,clip=1.0", FEEDBACK))
    torch.optim.SGD(model.parameters(), lr=0.1)  # momentum=0: DGC applies it before compressing
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch

from lowband import devices
from lowband.compress import scratch

from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Payload, per_matrix
from lowband.compress.indices import index_nbytes, pack, scatter, unpack
from lowband.compress.select import keep_largest, positions
from lowband.compress.sparse import stable_seed

WARMUP_START = 0.25  # the paper: 75% sparsity in the first warm-up epoch
WARMUP_FACTOR = 0.25  # ... then 93.75%, 98.4375%, 99.6%: density / 4 per stage
WARMUP_STAGES = 4
MIN_SAMPLE = 1000


@dataclass(frozen=True)
class DGCOptions(CompressorOptions):
    """``ratio``: final density; ``warmup_steps``: steps of exponential warm-up (0 = none;
    the paper uses 4 epochs); ``sample``: fraction sampled for the threshold; ``seed``."""

    ratio: float = 0.001
    warmup_steps: int = 0
    sample: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 < self.sample <= 1:
            raise ValueError(f"sample must be in (0, 1], got {self.sample}")


def density(step: int, ratio: float, warmup_steps: int) -> float:
    """The fraction of elements sent at ``step`` (0-based) under the warm-up schedule."""
    if step >= warmup_steps:
        return ratio
    stage = (WARMUP_STAGES * step) // warmup_steps
    return max(ratio, WARMUP_START * WARMUP_FACTOR ** stage)


def select(flat: torch.Tensor, k: int, sample: float, generator: torch.Generator) -> torch.Tensor:
    """Ascending indices of at most ``k`` large-|x| elements by sampled threshold (steps 2-3)."""
    n = flat.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=flat.device)
    magnitude = torch.abs(flat, out=scratch.buffer("dgc.abs", n, flat.dtype, flat.device))
    m = min(n, max(MIN_SAMPLE, math.ceil(sample * n)))
    sampled = magnitude if m == n else magnitude[torch.randint(0, n, (m,), generator=generator,
                                                                         device=flat.device)]
    top = min(m, max(1, math.ceil(k * m / n)))
    threshold = sampled.topk(top, sorted=False).values.min()
    mask = torch.ge(magnitude, threshold, out=scratch.buffer("dgc.mask", n, torch.bool, flat.device))
    # host sync on a GPU: the count selected; hierarchical selection: the exact top-k of the selected
    return keep_largest(positions(mask), magnitude, k)


def _sparse_bytes(n: int, k: int) -> int:
    """k fp32 values and their packed indices among n."""
    return 4 * k + index_nbytes(n, k)


@COMPRESSORS.register("dgc")
class DGC(Compressor):
    """Sampled-threshold top-k with warm-up; see the module docstring."""

    name = "dgc"
    paper_feedback = "dgc"  # Lin et al.: momentum correction and local accumulation (lowband.feedback.dgc)
    fixed_size = False
    contraction = True  # sends the largest elements, zeros the rest: a top-k
    Options = DGCOptions

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        ratio = cast(DGCOptions, options).ratio  # after warm-up: the final density, values + packed indices
        return per_matrix(numel, side, lambda n: _sparse_bytes(n, max(1, round(ratio * n))))

    def __init__(self, options: DGCOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.steps: dict[str, int] = {}

    def density(self, key: str) -> float:
        """The density the next encode of ``key`` uses."""
        return density(self.steps.get(key, 0), self.options.ratio, self.options.warmup_steps)

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.detach().reshape(-1)
        n = flat.numel()
        step = self.steps.get(key, 0)
        self.steps[key] = step + 1
        d = density(step, self.options.ratio, self.options.warmup_steps)
        k = min(n, max(1, round(d * n)))
        generator = devices.generator(flat.device, stable_seed(self.options.seed, key, step))
        idx = select(flat, k, self.options.sample, generator)
        return Payload([pack(flat[idx], idx, n)], ctx=(x.shape, x.dtype))

    def decode(self, payload: Payload) -> torch.Tensor:
        shape, dtype = payload.ctx
        values, idx = unpack(payload.tensors[0], math.prod(shape), dtype)
        return scatter(values, idx, shape, dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": dict(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = dict(state["steps"])
