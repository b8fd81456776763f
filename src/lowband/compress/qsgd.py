"""``qsgd``: stochastic uniform quantization (unbiased); ``int8``: min-max quantization (biased).

Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
Encoding" (arXiv:1610.02132). ``qsgd`` splits x into buckets of ``bucket`` consecutive
elements (the paper's bucketing, default 512; 0 = the whole tensor is one bucket) and sends
``4 * buckets + ceil(n * bits / 8)`` bytes:

1. norm_b = ||x_b||_2 per bucket (fp32, in the payload); s = 2**(bits-1) - 1 levels;
2. r_i = s * |x_i| / norm_b(i) in [0, s]; l_i = floor(r_i);
3. level_i = l_i + 1 with probability r_i - l_i, else l_i (so E[level_i] = r_i: unbiased);
4. code_i = sign bit (1 = negative) << (bits-1) | level_i, packed at ``bits`` in {2, 4, 8};
5. decode: sign_i * level_i * norm_b(i) / s.

The variance grows with the bucket size (the paper's bound is min(d/s^2, sqrt(d)/s) for a
bucket of d elements): one norm for a 1M-element tensor at 4 bits gives an error ten
times the tensor's norm; buckets of 512 keep it near one, for 4/512 extra bytes per element.

Randomness comes from a ``torch.Generator`` owned by the compressor (option ``seed``,
default 0; drawn on the CPU so results do not depend on the device); ``state_dict`` saves
its state, so a resumed run draws the same numbers. The aggregator calls ``for_rank`` so
that every rank draws independent noise (seed + 1000003 * rank); otherwise ranks with
similar inputs would make correlated rounding errors that average out less.

``int8``: min-max quantization to 256 levels, deterministic round-to-nearest, hence biased
(E[C(x)] = C(x) != x; the error is at most (max - min) / 510 per element). Scales are the
min and the max of each chunk, as fp32 (8 bytes per chunk); option ``chunk`` = 0 uses one
pair for the whole tensor, else one pair per ``chunk`` consecutive elements (the last chunk
may be shorter): ``n + 8 * ceil(n / chunk)`` bytes, or ``n + 8`` per tensor.

1. lo, hi = min, max of the chunk; step = (hi - lo) / 255 (0 for a constant chunk);
2. q_i = round((x_i - lo) / step) in [0, 255] (0 when step is 0);
3. decode: lo + q_i * step.

A contraction (||C(x) - x|| < ||x||) on ordinary gradients, but not for every x: zeros
between two large values of opposite sign decode to +-step/2, so ``[M, -M]`` followed by
more than 2 * 255**2 zeros comes back with a larger error than ``||x||``.

Example::

    c = build("qsgd:bits=4", COMPRESSORS)
    payload = c.encode(grad, "layer.weight")   # nbytes = ceil(grad.numel() / 2) + 4
    approx = c.decode(payload)                 # E[approx] == grad
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch

from lowband import devices

from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Payload, per_matrix
from lowband.compress.packing import pack, unpack

Ctx = tuple[torch.Size, torch.dtype]


def check_int(where: str, value: Any, minimum: int) -> None:
    """One-line ValueError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")


def flat_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened in fp32 (any layout, any float dtype); copies only when needed."""
    return x.detach().reshape(-1).to(torch.float32)


def restore(flat: torch.Tensor, ctx: Ctx) -> torch.Tensor:
    shape, dtype = ctx
    return flat.to(dtype).view(shape)


class SeededCompressor(Compressor):
    """A compressor that draws from its own ``torch.Generator`` (``options.seed``), saved in ``state_dict``.

    The noise is drawn on the input's device (:func:`lowband.devices.generator`): a CPU draw copied to
    a GPU would move 4 bytes per element every step. The generator follows the first device it
    serves; CPU and CUDA generators give different (equally valid) streams for the same seed.
    """

    def __init__(self, options: CompressorOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.seed = int(self.options.seed)  # type: ignore[attr-defined]
        self.device = torch.device("cpu")  # where the generator draws
        self.generator = devices.generator(self.device, self.seed)

    def for_rank(self, rank: int) -> None:
        """Independent noise per rank: reseed with (seed, rank); rank 0 keeps ``seed`` itself."""
        self.seed = int(self.options.seed) + 1_000_003 * rank  # type: ignore[attr-defined]
        self.generator = devices.generator(self.device, self.seed)

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        """``n`` draws from U[0, 1) in fp32 on ``device``."""
        if self.device != device:  # first use on this device: the same seed there
            self.device, self.generator = device, devices.generator(device, self.seed)
        return torch.rand(n, generator=self.generator, dtype=torch.float32, device=device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "device": str(self.device)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.device = torch.device(state.get("device", "cpu"))  # checkpoints before GPU support: CPU
        self.generator = devices.generator(self.device)
        self.generator.set_state(state["generator"])


@dataclass(frozen=True)
class QSGDOptions(CompressorOptions):
    bits: int = 4
    bucket: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (2, 4, 8):
            raise ValueError(f"qsgd:bits must be one of 2, 4, 8, got {self.bits!r}")
        check_int("qsgd:bucket", self.bucket, 0)
        check_int("qsgd:seed", self.seed, 0)


@COMPRESSORS.register("qsgd")
class QSGD(SeededCompressor):
    name = "qsgd"
    summable = False
    requantizable = True  # buckets of a chunk quantise alone (lowband.comm.two_phase)
    Options: ClassVar[type[CompressorOptions]] = QSGDOptions

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        o = cast(QSGDOptions, options)  # fp32 norm per bucket + bits per element, packed
        return per_matrix(numel, side, lambda n: 4 * math.ceil(n / (o.bucket or n)) + math.ceil(n * o.bits / 8))

    @property
    def bits(self) -> int:
        return int(self.options.bits)  # type: ignore[attr-defined]

    def _bucket(self, n: int) -> int:
        return int(self.options.bucket) or max(n, 1)  # type: ignore[attr-defined]

    def is_contraction(self) -> bool:
        """Unbiased with variance omega ||x||^2, omega = min(b / s^2, sqrt(b) / s) for buckets of b
        elements and s levels (Alistarh et al., Lemma 3.1): a contraction in expectation when omega < 1
        (8 bits, s = 127, b = 512: 0.03), not at 2 or 4 bits (4 bits: 3.2) nor with one bucket per tensor."""
        b, s = int(self.options.bucket), (1 << (self.bits - 1)) - 1  # type: ignore[attr-defined]
        return b > 0 and min(b / s ** 2, math.sqrt(b) / s) < 1

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = flat_fp32(x)
        s = (1 << (self.bits - 1)) - 1
        bucket = self._bucket(flat.numel())
        norms = bucket_norms(flat, bucket)  # (ceil(n / bucket),)
        scale = torch.where(norms > 0, s / norms, torch.zeros_like(norms)).repeat_interleave(bucket)[:flat.numel()]
        r = (flat.abs() * scale).clamp_(max=s)
        level = r.floor()
        level += self.uniform(flat.numel(), flat.device) < (r - level)
        codes = level.to(torch.uint8) | ((flat < 0).to(torch.uint8) << (self.bits - 1))
        return Payload([norms, pack(codes, self.bits, check=False)], ctx=(x.shape, x.dtype))

    def decode(self, payload: Payload) -> torch.Tensor:
        norms, packed = payload.tensors
        shape, _ = payload.ctx
        n = math.prod(shape)
        s = (1 << (self.bits - 1)) - 1
        codes = unpack(packed, self.bits, n)
        unit = (norms.to(torch.float32) / s).repeat_interleave(self._bucket(n))[:n]
        magnitude = (codes & s).to(torch.float32) * unit
        negative = (codes >> (self.bits - 1)).bool()
        return restore(torch.where(negative, -magnitude, magnitude), payload.ctx)


def bucket_norms(flat: torch.Tensor, bucket: int) -> torch.Tensor:
    """||x_b||_2 of each bucket of ``bucket`` consecutive elements, fp32 (one norm for n = 0)."""
    if flat.numel() == 0:
        return torch.zeros(1, device=flat.device)
    buckets = math.ceil(flat.numel() / bucket)
    padded = torch.zeros(buckets * bucket, dtype=torch.float32, device=flat.device)
    padded[:flat.numel()] = flat
    rows = padded.view(buckets, bucket)
    norms = torch.linalg.vector_norm(rows, dim=1)
    if flat.is_cpu and torch.isfinite(norms).all():  # a free check on the CPU; on a GPU, no sync: both below
        return norms
    # squares beyond the fp32 range: rescale by each row's peak
    peak = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    safe = peak.squeeze(1) * torch.linalg.vector_norm(rows / peak, dim=1)
    return torch.where(torch.isfinite(norms), norms, safe)


@dataclass(frozen=True)
class Int8Options(CompressorOptions):
    chunk: int = 0

    def __post_init__(self) -> None:
        check_int("int8:chunk", self.chunk, 0)


@COMPRESSORS.register("int8")
class Int8(Compressor):
    name = "int8"
    summable = False
    requantizable = True  # a chunk's min and scale are its own (lowband.comm.two_phase)
    contraction = True  # deterministic rounding: each element moves by at most (max - min) / 510
    Options: ClassVar[type[CompressorOptions]] = Int8Options

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        chunk = cast(Int8Options, options).chunk  # a byte per element + min and scale per chunk
        return per_matrix(numel, side, lambda n: n + 8 * (math.ceil(n / chunk) if chunk else 1))

    def _layout(self, n: int) -> tuple[int, int]:
        """(chunks, elements per chunk) for ``n`` elements; one chunk per tensor when ``chunk`` is 0."""
        chunk = int(self.options.chunk)  # type: ignore[attr-defined]
        if chunk == 0:
            return 1, max(n, 1)
        return -(-n // chunk), chunk

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = flat_fp32(x)
        n = flat.numel()
        chunks, size = self._layout(n)
        if n == 0:
            scales = torch.zeros(2 * chunks, dtype=torch.float32, device=flat.device)
            return Payload([scales, torch.empty(0, dtype=torch.uint8, device=flat.device)], ctx=(x.shape, x.dtype))
        pad = chunks * size - n  # repeat the last element: it cannot change its chunk's min or max
        rows = torch.cat([flat, flat[-1:].expand(pad)]).view(chunks, size) if pad else flat.view(chunks, size)
        lo, hi = torch.aminmax(rows, dim=1)
        step = (hi - lo) / 255
        inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
        q = ((rows - lo[:, None]) * inv[:, None]).round_().clamp_(0, 255).to(torch.uint8)
        return Payload([torch.stack([lo, hi], 1).reshape(-1), q.reshape(-1)[:n].clone()], ctx=(x.shape, x.dtype))

    def decode(self, payload: Payload) -> torch.Tensor:
        scales, q = payload.tensors
        shape, _ = payload.ctx
        n = math.prod(shape)
        chunks, size = self._layout(n)
        lo, hi = scales.to(torch.float32).view(chunks, 2).unbind(1)
        step = (hi - lo) / 255
        padded = torch.zeros(chunks * size, dtype=torch.float32, device=q.device)
        padded[:n] = q
        flat = (lo[:, None] + padded.view(chunks, size) * step[:, None]).reshape(-1)[:n]
        return restore(flat, payload.ctx)
