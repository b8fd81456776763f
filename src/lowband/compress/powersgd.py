"""``powersgd``: rank-r PowerSGD, two all-reduce rounds of low-rank factors, summable.

Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for
Distributed Optimization" (arXiv:1905.13727), Algorithm 1, with warm start.

For a tensor x of shape (n, ...), M = x viewed as an (n, m) matrix, m = numel / n, and
r = min(n, m, rank):

1. Q = orthogonalise(Q_prev)          (m, r); Q_prev is last step's averaged Q of this key
   (warm start), or, the first time, N(0, 1) from a generator seeded by (seed, key), so
   every rank starts from the same Q without communicating;
2. P = M Q                            (n, r)
3. round 1: all-reduce P (each rank sends P / world_size: the sum is the mean);
4. P^ = orthogonalise(P)              (n, r), identical on every rank;
5. Q = M^T P^                         (m, r)
6. round 2: all-reduce Q (mean); keep it as the next step's Q_prev;
7. result = P^ Q^T (the mean over ranks of P^ P^^T M_i: a rank-r projection of the mean);
   own decoded = P^ (M^T P^)^T, this rank's own approximation with the shared P^ (what
   the paper's Algorithm 2 and epfml/powersgd remember for error feedback).

Bytes on the wire: (n + m) * r * element size per compressed tensor, in two rounds.

Policy (wrapping the algorithm, as in epfml/powersgd and torch's ``powerSGD_hook``): a
tensor goes uncompressed, in its own dtype, in round 1 alone, when

* it is 1-D (biases, norms; also the aggregator's bucket of small tensors), or
* compressing saves too little: ``numel <= (n + m) * r * min_compression_rate`` (torch's
  test, so a rate exactly equal to the minimum is sent raw, as torch does), or
* it is one of the first ``start_iter`` exchanges of that key (torch's
  ``start_powerSGD_iter``: the early steps are the most sensitive to compression error).

Orthogonalisation: Gram-Schmidt (modified, column by column) for r <= 2 and Householder
QR (``torch.linalg.qr``) above, which is exactly the choice of torch's hook (so the two
compare bit for bit at r <= 2). Only the span of P^ matters: the result P^ P^^T M and the
next step's span(M M^T P^) are the same for any orthonormal basis of span(P), so the two
methods differ by rounding only. A column that is exactly zero (a zero gradient) stays
zero instead of becoming NaN (torch's hook needs ``orthogonalization_epsilon`` for that).

Error feedback: torch's hook remembers M_i - P^ Q_mean^T (and, for its uncompressed
tensors, x_i - mean); lowband remembers M_i - P^ Q_i^T (and 0). The sums over ranks are
equal and PowerSGD's result depends on the inputs only through their sum, so both give the
same averaged result, step after step (tests/test_powersgd_dist.py checks it against
torch's hook).

Example::

    agg = Aggregator(comm, build("powersgd:rank=4,start_iter=100", COMPRESSORS), build("ef", FEEDBACK))
    agg.mean_([(name, p.grad) for name, p in model.named_parameters()])
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch

from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Exchange, Payload


@dataclass(frozen=True)
class PowerSGDOptions(CompressorOptions):
    """``rank``: columns of P and Q. ``min_compression_rate``: numel / ((n + m) r) must exceed
    it, or the tensor goes raw. ``start_iter``: raw for the first N exchanges of each key.
    ``seed``: with the key, seeds the initial Q (must agree across ranks)."""

    rank: int = 2
    min_compression_rate: float = 2.0
    start_iter: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"powersgd:rank must be >= 1, got {self.rank}")
        if not self.min_compression_rate >= 0:
            raise ValueError(f"powersgd:min_compression_rate must be >= 0, got {self.min_compression_rate}")
        if self.start_iter < 0:
            raise ValueError(f"powersgd:start_iter must be >= 0, got {self.start_iter}")


@COMPRESSORS.register("powersgd")
class PowerSGD(Compressor):
    """Rank-r PowerSGD with warm start; state: the averaged Q and an exchange counter per key."""

    name = "powersgd"
    paper_feedback = "ef"  # Vogels et al.'s Algorithm 2 (and torch's powerSGD_hook) keep the error; without it it diverges
    contraction = True
    summable = True  # every round's payload (P, then Q) is summed by an all-reduce
    Options = PowerSGDOptions

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        """P (d x r) then Q (d x r) in fp32 per d x d matrix; raw where that would not compress enough."""
        o = cast(PowerSGDOptions, options)
        r = min(side, o.rank)
        if side * side / (2 * side * r) <= o.min_compression_rate:
            return (4.0 * numel,)  # the compressor sends such tensors raw
        return (numel / (side * side) * 4 * r * side,) * 2

    def __init__(self, options: Optional[PowerSGDOptions] = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.qs: dict[str, torch.Tensor] = {}  # key -> (m, r) averaged Q of the last exchange
        self.steps: dict[str, int] = {}  # key -> exchanges so far (raw ones included)

    # -- policy ---------------------------------------------------------------------------
    def _matrix_rank(self, x: torch.Tensor, step: int) -> int:
        """r for compressing ``x`` at this step of its key, or 0 to send it raw."""
        opts: PowerSGDOptions = self.options  # type: ignore[assignment]
        if x.dim() < 2 or x.numel() == 0 or step < opts.start_iter:
            return 0
        n = x.shape[0]
        m = x.numel() // n
        r = min(n, m, opts.rank)
        return r if (n + m) * r * opts.min_compression_rate < n * m else 0

    def _next_step(self, key: str) -> int:
        step = self.steps.get(key, 0)
        self.steps[key] = step + 1
        return step

    def _warm_q(self, key: str, m: int, r: int, like: torch.Tensor) -> torch.Tensor:
        """Orthonormal (m, r): last step's Q of ``key``, or a seeded random one the first time."""
        q = self.qs.get(key)
        if q is None or q.shape != (m, r):
            seed = (self.options.seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)  # type: ignore[attr-defined]
            # cpu: shared-seed initial factors, the same on every rank and device; moved once
            q = torch.randn(m, r, generator=torch.Generator().manual_seed(seed))
        return orthogonalize(q.to(device=like.device, dtype=like.dtype, copy=True))

    # -- the rounds -----------------------------------------------------------------------
    def exchange(self, x: torch.Tensor, key: str, world_size: int) -> Exchange:
        r = self._matrix_rank(x, self._next_step(key))
        if r == 0:
            summed = yield Payload([(x / world_size).contiguous()], ctx=("raw", x.shape))
            assert isinstance(summed, Payload)
            return summed.tensors[0].view(x.shape), x
        matrix = x.reshape(x.shape[0], -1)  # (n, m)
        q = self._warm_q(key, matrix.shape[1], r, x)  # (m, r)
        summed = yield Payload([matrix @ q / world_size], ctx=("P", x.shape))  # round 1: (n, r)
        assert isinstance(summed, Payload)
        p = orthogonalize(summed.tensors[0].clone())  # (n, r), the same on every rank
        q_own = matrix.t() @ p  # (m, r)
        summed = yield Payload([q_own / world_size], ctx=("Q", x.shape))  # round 2
        assert isinstance(summed, Payload)
        q_mean = summed.tensors[0].clone()
        self.qs[key] = q_mean
        return (p @ q_mean.t()).view(x.shape), (p @ q_own.t()).view(x.shape)

    # -- one rank on its own --------------------------------------------------------------
    def encode(self, x: torch.Tensor, key: str) -> Payload:
        """The exchange in a world of one: [P^, Q] (or [x] under the policy). Updates the warm start."""
        r = self._matrix_rank(x, self._next_step(key))
        if r == 0:
            return Payload([x.contiguous()], ctx=("raw", x.shape))
        matrix = x.reshape(x.shape[0], -1)
        p = orthogonalize(matrix @ self._warm_q(key, matrix.shape[1], r, x))
        q = matrix.t() @ p
        self.qs[key] = q.clone()
        return Payload([p, q], ctx=("PQ", x.shape))

    def decode(self, payload: Payload) -> torch.Tensor:
        kind, shape = payload.ctx
        if kind == "raw":
            return payload.tensors[0].view(shape)
        if kind != "PQ":
            raise ValueError(f"powersgd: a single {kind} factor cannot be decoded; run exchange() for both rounds")
        p, q = payload.tensors
        return (p @ q.t()).view(shape)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"q": {k: v.clone() for k, v in self.qs.items()}, "steps": dict(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.qs = {k: v.clone() for k, v in state.get("q", {}).items()}
        self.steps = {k: int(v) for k, v in state.get("steps", {}).items()}


def orthogonalize(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning those of ``matrix`` (n, r), r <= n; in place for r <= 2.

    Modified Gram-Schmidt for r <= 2 (as torch's hook; an exactly zero column stays zero),
    Householder QR above (as torch's hook).
    """
    r = matrix.shape[1]
    if r > 2 and matrix.dtype not in (torch.float16, torch.bfloat16):
        return torch.linalg.qr(matrix).Q
    tiny = torch.finfo(matrix.dtype).tiny
    for i in range(r):
        col = matrix[:, i:i + 1]
        col /= torch.linalg.vector_norm(col).clamp_min(tiny)
        if i + 1 < r:
            rest = matrix[:, i + 1:]
            rest -= (col * rest).sum(0, keepdim=True) * col
    return matrix
