"""Pieces the quantizers share (``qsgd``, ``int8``, ``terngrad``, ``sign``); registers nothing.

* :func:`flat_fp32` / :func:`restore`: a tensor in and out of the flat fp32 form the codes are made from;
* :func:`rows_and_tail`: a flat tensor as whole groups of ``size`` (rows) and the last partial group,
  both views, so per-group scales broadcast without a zero-padded copy;
* :class:`SeededCompressor`: a compressor with its own generator, saved in ``state_dict``, and
  :meth:`SeededCompressor.round_stochastic`, the unbiased rounding every stochastic quantizer does.

Stochastic rounding (QSGD, TernGrad): a value ``y >= 0`` becomes ``floor(y + u)``, ``u`` uniform
on [0, 1), so ``E[floor(y + u)] = y``. Signed values are shifted by the number of levels first
(``y = r + s``), which rounds ``r`` in the same distribution as rounding ``|r|`` and restoring
the sign (for ``r = -(l + f)``: ``-(l + 1)`` with probability ``f``, else ``-l``), and the code
``floor(y + u)`` in ``[0, 2 s]`` needs no separate sign bit. ``u`` is drawn at 16 bits,
``(k + 0.5) / 65536`` for ``k`` uniform in ``[0, 65536)``: four draws from each 64-bit word
of the generator, a quarter of what fp32 uniforms cost (the CPU generator is the largest
pass of an encode). Each rounding's probability is then ``frac(y)`` to the nearest
1/65536: off by at most 2**-17 of a level, with either sign (fp32 holds ``y`` near 128 to
2**-17 as well).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from lowband import devices
from lowband.compress import scratch
from lowband.compress.base import Compressor, CompressorOptions
from lowband.compress.packing import pack_numpy, packed_nbytes
from lowband.compress.select import CHUNK, InOrder, chunked

Ctx = tuple[torch.Size, torch.dtype]
NOISE_SCALE = 2.0 ** -16  # one step of the 16-bit uniform
NOISE_OFFSET = 0.5 + 2.0 ** -17  # (k + 32768.5) / 65536 for k in [-32768, 32768): add it to y first


def check_int(where: str, value: Any, minimum: int) -> None:
    """One-line ValueError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")


def flat_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened in fp32 (any layout, any float dtype); copies only when needed."""
    return x.detach().reshape(-1).to(torch.float32)


def restore(flat: torch.Tensor, ctx: Ctx) -> torch.Tensor:
    shape, dtype = ctx
    return scratch.cast(flat, dtype).view(shape)


def rows_and_tail(flat: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``flat``: ``(n // size, size)`` whole groups and the ``n % size`` elements after them."""
    body = flat.numel() - flat.numel() % size
    return flat[:body].view(-1, size), flat[body:]


def per_group(op: Any, src: torch.Tensor, size: int, column: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = op(src, column[group])`` for groups of ``size`` consecutive elements; returns ``out``.

    ``column`` holds one value per group (the last for the partial group); ``op`` is a torch
    binary function taking ``out=`` (``torch.mul``, ``torch.sub``); ``out`` may be ``src``."""
    rows, tail = rows_and_tail(src, size)
    out_rows, out_tail = rows_and_tail(out, size)
    if rows.numel():
        op(rows, column[:rows.shape[0]].unsqueeze(1), out=out_rows)
    if tail.numel():
        op(tail, column[-1], out=out_tail)
    return out


NUMPY_MIN_NUMEL = 1 << 23  # a CPU tensor from this size on: the quantizers' NumPy chunk loops (faster at 25M in
# benchmarks/compressors.py); below, the torch ops on cached work arrays timed as fast or faster (by hand, here)


class SeededCompressor(Compressor):
    """A compressor that draws from its own ``torch.Generator`` (``options.seed``), saved in ``state_dict``.

    The noise is drawn on the input's device (:func:`lowband.devices.generator`): a CPU draw copied to
    a GPU would move bytes for every element every step. The generator follows the first device it
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

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self.device != device:  # first use on this device: the same seed there
            self.device, self.generator = device, devices.generator(device, self.seed)
        return self.generator

    def round_stochastic(self, y: torch.Tensor, top: int, codes: torch.Tensor) -> torch.Tensor:
        """``codes = min(floor(y + u), top)`` as uint8, for ``y`` (fp32, flat, overwritten) that already
        holds ``value + NOISE_OFFSET`` with value >= 0; returns ``codes``.

        ``u - NOISE_OFFSET`` is added here: ``k / 65536`` for ``k`` uniform in [-32768, 32768), four
        per 64-bit draw (see the module docstring). ``top`` caps the code where fp32 rounding of the
        scaled value overshot its last level by an ulp."""
        n = y.numel()
        words = scratch.buffer("noise.words", (n + 3) // 4, torch.int64, y.device)
        words.random_(-2 ** 63, None, generator=self._generator_on(y.device))  # every bit random
        noise = scratch.buffer("noise.float", n, torch.float32, y.device)
        noise.copy_(words.view(torch.int16)[:n])
        y.add_(noise, alpha=NOISE_SCALE)
        return codes.copy_(y).clamp_(max=top)  # y >= 0: the conversion truncates, which is floor

    def round_pack_cpu(self, n: int, shifted: Callable[[int, int, np.ndarray], None], top: int, bits: int
                       ) -> torch.Tensor:
        """:meth:`round_stochastic` and :func:`~lowband.compress.packing.pack` on the CPU, in NumPy by cache-sized
        chunks on every thread (:func:`lowband.compress.select.chunked`): ``shifted(lo, hi, y)`` writes value +
        ``NOISE_OFFSET`` of elements ``[lo, hi)`` into ``y`` (finite). The same generator draws and the same IEEE
        operations (the noise ``k / 65536`` is exact in fp32, so adding it rounds once either way), so the same
        bytes as the torch ops; the values pass through the cache once instead of once per op. The generator
        draws each chunk's words in chunk order (:class:`~lowband.compress.select.InOrder`: the CPU generator
        is serial, its stream the same whether drawn at once or in pieces), while the other threads round and
        pack the chunks already drawn: the draw, the largest single step, no longer runs alone before them."""
        cpu = torch.device("cpu")
        generator = self._generator_on(cpu)
        words = scratch.buffer("noise.words", (n + 3) // 4, torch.int64, cpu)
        noise = words.numpy().view(np.int16)
        per = 8 // bits
        out = scratch.fresh(packed_nbytes(n, bits), torch.uint8, cpu)
        packed, order = out.numpy(), InOrder()

        def body(lo: int, hi: int) -> None:
            with order.turn(lo // CHUNK):  # as round_stochastic draws, a chunk's words at a time
                words[lo // 4:(hi + 3) // 4].random_(-2 ** 63, None, generator=generator)
            m, whole = hi - lo, -(-(hi - lo) // per) * per
            y = scratch.array("round.y", m, np.float32)
            shifted(lo, hi, y)
            np.add(y, np.multiply(noise[lo:hi], np.float32(NOISE_SCALE), out=scratch.array("round.u", m, np.float32)),
                   out=y)
            codes = scratch.array("round.codes", whole, np.uint8)
            np.copyto(codes[:m], y, casting="unsafe")  # y >= 0: the conversion truncates, which is floor
            codes[m:] = 0
            top_codes = scratch.constant(top, m, np.uint8)  # (against a scalar NumPy takes a slow loop)
            np.minimum(codes[:m], top_codes, out=codes[:m])
            pack_numpy(codes, bits, packed[lo * bits // 8:(lo + whole) * bits // 8])

        chunked(n, body)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "device": str(self.device)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.device = torch.device(state.get("device", "cpu"))  # checkpoints before GPU support: CPU
        self.generator = devices.generator(self.device)
        self.generator.set_state(state["generator"])
