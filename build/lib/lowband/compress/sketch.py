"""``sketch``: a random linear sketch S x with a shared seed, de-sketched by the transpose.

Song, Wang, Yu, Zhang, "Sketching for First Order Method: Efficient Algorithm for
Low-Bandwidth Channel and Vulnerability" (ICML 2023, arXiv:2210.08371). A worker sends
sk(x) = S x, with S (b x d, b = ``ratio`` * d) drawn from a seed every rank shares; the
receiver "recovers" x with the de-sketching matrix S^T. Because S is the same on every rank,
sketches are summable: S x_1 + ... + S x_n = S (x_1 + ... + x_n), so they travel by all-reduce.

Per tensor (``key``) and call, on every rank alike:

1. S is drawn from a generator seeded by (``seed``, key, call counter of that key)
   (:func:`lowband.compress.sparse.stable_seed`): a new S every step, the same on every rank;
   the counter advances once per encode of a key, in lockstep on all ranks;
2. encode: y = S x (fp32, b entries), plus, with ``noise`` = sigma > 0, Gaussian noise
   N(0, sigma^2) on every entry, drawn per rank (the paper's differentially private variant:
   each rank releases S x_i + xi_i);
3. the payloads are summed by an all-reduce (each rank sends y_i / n, so the sum is the mean);
4. decode: x_hat = S^T y. S is scaled so that E[S^T S] = I: the de-sketch is unbiased,
   E[S^T S x] = x.

Kinds (``kind``), chosen for CPU cost:

* ``countsketch``: b buckets; every coordinate j gets a bucket h(j) and a sign
  s(j) = +-1, so S has one non-zero per column: y[h(j)] += s(j) x_j, x_hat_j = s(j) y[h(j)].
  One int32 draw c(j) = 2 h(j) + (1 + s(j)) / 2 per coordinate; encode is one ``index_add_``
  into 2b halves (y = positive half - negative half), decode one gather. O(d) time and
  memory, no scaling needed: E[S^T S] = I because E[s(j) s(k)] = 0 for j != k. Variance of
  x_hat_j: sum_{k != j} x_k^2 / b.
* ``gaussian`` (default) / ``sign``: a dense projection. A d x b matrix is out of the question
  for real layers (1M x 10k floats), so x is cut into blocks of ``block`` elements (the last
  one zero-padded) and every block is projected by one r x B matrix M (B = min(block, d),
  r = max(1, round(ratio * B))), entries N(0, 1/r) or +-1/sqrt(r): S = I_blocks (x) M,
  E[M^T M] = I_B. One (blocks x B) @ (B x r) matmul; r * B random numbers per call. The payload
  is ceil(d / B) * r values (ratio * d when B divides d and ratio * B is whole; 0.977% of d
  for ratio 0.01 and the default B = 1024, r = 10).

Why gaussian is the default: on this 2-core CPU, encode + decode of 25M elements at ratio 0.01
took 72 ms blockwise-gaussian, 106 ms sign, 633 ms countsketch (a copy: 23 ms). Countsketch
needs one random integer per element; the blocks need r * B numbers and one BLAS matmul.
The estimators' variances are alike (omega ~ 1 / ratio); blocks share one M per call, which
correlates their errors but leaves each unbiased.

Bytes: 4 b per tensor (fp32 payload whatever the input dtype); countsketch b = round(ratio * d)
(at least 1; 0 for an empty tensor), gaussian/sign b = ceil(d / B) * r. Summable, fixed
size, unbiased (unless ``unbiased=false``).

Noise: ``metrics()`` reports sigma (``sketch_noise_std``, per sketch entry of one rank) and
the standard deviation it leaves on every coordinate of the decoded mean,
sigma / sqrt(n) (``sketch_mean_noise_std``: S^T of one rank's noise has per-coordinate
variance sigma^2 for every kind, and the mean of n independent ranks divides it by n).
No (epsilon, delta) is claimed: that needs a bound on each rank's contribution (clip its
gradient) and an accountant.

Error feedback: an unbiased sketch is not a contraction (E||x - S^T S x||^2 = omega ||x||^2,
omega = (d - 1) / b ~ 1 / ratio for countsketch), so ``ef``'s residual grows without bound
(measured: the char-GPT's sum overflowed at step 39, countsketch ratio 0.01). With ``unbiased=false``
the de-sketch is S^T y / (1 + omega), the contraction that minimises E||x - C(x)||^2
(= omega / (1 + omega) ||x||^2): use that with ``ef``. The residual x - C(x) also carries
-S^T xi into the next round, so feedback partly cancels privacy noise; use ``feedback=none``
when the noise is meant for privacy.

Example::

    agg = Aggregator(comm, build("sketch:ratio=0.01,unbiased=false", COMPRESSORS), build("ef", FEEDBACK))
    agg = Aggregator(comm, build("sketch:ratio=0.05,kind=gaussian,block=1024,noise=1e-3", COMPRESSORS),
                     build("none", FEEDBACK))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch

from lowband import devices
from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Exchange, Payload, per_matrix
from lowband.compress.sparse import stable_seed

Draw = Callable[[int, int, torch.Generator, torch.device | str], torch.Tensor]  # (r, B, generator, device) -> r x B
DENSE: dict[str, Draw] = {  # entries of variance 1/r, so that E[M^T M] = I
    "gaussian": lambda r, b, g, d: torch.randn(r, b, generator=g, device=d).div_(math.sqrt(r)),
    "sign": lambda r, b, g, d: (torch.randint(0, 2, (r, b), generator=g, dtype=torch.float32, device=d) * 2 - 1)
    .div_(math.sqrt(r)),
}
KINDS = ("countsketch", *DENSE)


@dataclass(frozen=True)
class SketchOptions(CompressorOptions):
    """``ratio`` b/d in (0, 1]; ``kind`` countsketch, gaussian or sign; ``noise`` sigma >= 0 per
    sketch entry; ``block`` elements per dense block; ``seed`` shared by every rank; ``unbiased``
    de-sketch S^T y (True) or the contraction S^T y / (1 + omega) for error feedback (False)."""

    ratio: float = 0.01
    kind: str = "gaussian"
    noise: float = 0.0
    block: int = 1024
    seed: int = 0
    unbiased: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise ValueError(f"sketch ratio must be in (0, 1] (sketch entries per element), got {self.ratio!r}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown sketch kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        if not (isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"sketch noise must be a finite std >= 0 (0: no noise), got {self.noise!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"sketch block must be an integer >= 1 (elements per dense block), got {self.block!r}")
        if not isinstance(self.unbiased, bool):
            raise ValueError(f"sketch unbiased must be true or false, got {self.unbiased!r}")


@dataclass(frozen=True)
class Plan:
    """What S is for one tensor at one call; kept in the payload's ctx (never sent)."""

    shape: torch.Size
    dtype: torch.dtype
    numel: int
    codes: torch.Tensor | None = None  # countsketch: 2 h(j) + (1 + s(j)) / 2, int32
    matrix: torch.Tensor | None = None  # dense: M (r x B)
    scale: float = 1.0  # applied at decode: 1, or 1 / (1 + omega) when not unbiased


def sketch_size(numel: int, options: SketchOptions) -> int:
    """Entries of the sketch of ``numel`` elements (the payload's fp32 count)."""
    if numel == 0:
        return 0
    if options.kind == "countsketch":
        return max(1, round(options.ratio * numel))
    width = min(options.block, numel)
    return math.ceil(numel / width) * max(1, round(options.ratio * width))


@COMPRESSORS.register("sketch")
class Sketch(Compressor):
    """Shared-seed random linear sketch, de-sketched by the transpose; see the module docstring."""

    name = "sketch"
    summable = True
    Options = SketchOptions
    options: SketchOptions

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        return per_matrix(numel, side, lambda n: 4 * sketch_size(n, cast(SketchOptions, options)))

    def is_contraction(self) -> bool:
        """Only with ``unbiased=false`` (the module docstring's error-feedback paragraph)."""
        return not self.options.unbiased

    def __init__(self, options: SketchOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.steps: dict[str, int] = {}
        self.rank, self.world_size = 0, 1

    def for_rank(self, rank: int) -> None:
        """S is shared by every rank; only the privacy noise is drawn per rank."""
        self.rank = rank

    def plan(self, key: str, shape: torch.Size, dtype: torch.dtype, step: int,
             device: torch.device | str = "cpu") -> Plan:
        """S for ``key`` at call ``step``, drawn on ``device`` (identical on every rank: all ranks of a
        run draw on one kind of device, from the same seed)."""
        o, numel = self.options, math.prod(shape)
        g = devices.generator(device, stable_seed(o.seed, key, step))
        if numel == 0:
            return Plan(shape, dtype, 0)
        if o.kind == "countsketch":
            # (bucket, sign) jointly uniform in one draw; int32 halves the memory and time of int64
            codes = torch.randint(0, 2 * sketch_size(numel, o), (numel,), generator=g, dtype=torch.int32,
                                  device=device)
            return Plan(shape, dtype, numel, codes=codes, scale=self.shrink(numel))
        width = min(o.block, numel)
        rows = max(1, round(o.ratio * width))
        return Plan(shape, dtype, numel, matrix=DENSE[o.kind](rows, width, g, device), scale=self.shrink(numel))

    def variance(self, numel: int) -> float:
        """omega with E||S^T S x||^2 = (1 + omega) ||x||^2: (d - 1) / b for countsketch, (B + 1) / r
        for gaussian, (B - 1) / r for sign (B columns, r rows per block)."""
        o = self.options
        if o.kind == "countsketch":
            return (numel - 1) / max(1, sketch_size(numel, o))
        width = min(o.block, numel)
        rows = max(1, round(o.ratio * width))
        return (width + (1 if o.kind == "gaussian" else -1)) / rows

    def shrink(self, numel: int) -> float:
        """The decode factor: 1 (unbiased), or 1 / (1 + omega), which makes E||x - C(x)||^2 =
        omega / (1 + omega) ||x||^2 < ||x||^2 (a contraction, as error feedback needs)."""
        return 1.0 if self.options.unbiased else 1.0 / (1.0 + self.variance(numel))

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        step = self.steps.get(key, 0)
        self.steps[key] = step + 1
        plan = self.plan(key, x.shape, x.dtype, step, x.device)
        flat = x.detach().reshape(-1).to(torch.float32)
        size = sketch_size(plan.numel, self.options)
        if plan.numel == 0:
            y = flat.new_zeros(0)
        elif plan.codes is not None:  # y[h] = (sum of x_j with s(j) = +1) - (sum with s(j) = -1)
            halves = flat.new_zeros(2 * size).index_add_(0, plan.codes, flat).view(size, 2)
            y = halves[:, 1] - halves[:, 0]
        else:
            y = (_blocks(flat, plan.matrix.shape[1]) @ plan.matrix.T).reshape(-1)
        if self.options.noise > 0 and size:
            g = devices.generator(y.device, stable_seed(self.options.seed, f"noise\x00{self.rank}\x00{key}", step))
            y.add_(torch.randn(size, generator=g, device=y.device), alpha=self.options.noise)
        return Payload([y], ctx=plan)

    def decode(self, payload: Payload) -> torch.Tensor:
        plan: Plan = payload.ctx
        y = payload.tensors[0].to(torch.float32)
        if plan.numel == 0:
            return torch.zeros(plan.shape, dtype=plan.dtype, device=y.device)
        if plan.codes is not None:  # s(j) y[h(j)]: one gather from (-y, +y) interleaved
            out = torch.stack([-y, y], dim=1).reshape(-1)[plan.codes]
        else:
            out = (y.view(-1, plan.matrix.shape[0]) @ plan.matrix).reshape(-1)[:plan.numel]
        if plan.scale != 1.0:
            out = out * plan.scale
        return out.view(plan.shape).to(plan.dtype)

    def exchange(self, x: torch.Tensor, key: str, world_size: int) -> Exchange:
        """One all-reduced round. Unlike the base (which encodes x / n), every rank sketches its own
        x and sends the sketch / n, so ``noise`` is sigma on what each rank releases, S x_i + xi_i."""
        self.world_size = world_size
        own = self.encode(x, key)
        summed = yield Payload([own.tensors[0] / world_size], own.ctx)
        assert isinstance(summed, Payload)
        return self.decode(summed), self.decode(own)

    def metrics(self) -> dict[str, Any]:
        """The privacy noise: sigma per sketch entry, and sigma / sqrt(n) on the decoded mean."""
        if self.options.noise == 0:
            return {}
        return {"sketch_noise_std": self.options.noise,
                "sketch_mean_noise_std": self.options.noise / math.sqrt(self.world_size)}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": dict(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = dict(state["steps"])


def _blocks(flat: torch.Tensor, width: int) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks, as a (blocks x width) matrix."""
    pad = -flat.numel() % width
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, width)
