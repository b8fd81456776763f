"""Compiled CPU loops for a threshold's bitmap payload and int8's codes (numba, optional); registers nothing.

NumPy builds a bitmap payload (:mod:`lowband.compress.bitmaps`) from whole-array passes: ``|x|``,
``>= tau``, a count, ``compress`` (itself ``nonzero`` then ``take``) and ``packbits``; decoding,
``unpackbits``, ``nonzero``, a zero fill and a fancy assignment. The ``nonzero`` passes alone
cost ~0.56 ns an element here, twice per round trip (hand-timed, a lead). A compiled loop does
each direction in one pass over the elements, with no branch on the data:

* :func:`count_at_least`: how many ``|x| >= tau`` (a vectorised compare-and-add);
* :func:`pack_at_least`: per element, write ``x`` at the next value slot and advance the slot by
  ``|x| >= tau`` (0 or 1); the same 0/1 is the element's bit, eight of them make a bitmap byte;
* :func:`expand_bits`: per element, its bit picks the next value or 0, and advances the value
  slot by the bit. Values move as unsigned integers of their width (any float dtype, and the
  bits of a NaN unchanged); the slot read is clamped to the last value, so a bitmap that holds
  more bits than values never reads past them. It returns the bits it found: the caller checks
  that count before trusting the output.

int8 (:mod:`lowband.compress.int8`) quantises in NumPy in four passes (subtract, multiply, round,
convert) and decodes in three (convert, multiply, add); :func:`quantize` and :func:`dequantize` are
each one vectorised loop doing the same fp32 operations in the same order (no fused multiply-add:
numba compiles without fastmath), so the same bytes.

numba (``pip install lowband[cpu]``; ``make setup`` installs it) compiles them on first use,
~0.3 s a signature, then from its cache beside this file (or its user cache when that is not
writable). Without numba, or with ``LOWBAND_KERNELS=numpy`` in the environment, :func:`loaded`
returns None and the NumPy passes run; both give the same bytes (tests/test_kernels.py).
Kernels release the GIL (``nogil``), so a large tensor's chunks run on every thread
(:func:`lowband.compress.select.parallel`).
"""

from __future__ import annotations

import os
import types
from typing import Any

import numpy as np

ENV = "LOWBAND_KERNELS"  # "numpy": never load the compiled kernels
FLOATS = (np.dtype(np.float32), np.dtype(np.float64))  # what pack_at_least compares in
_LOADED: list[types.SimpleNamespace | None] = []


def loaded() -> types.SimpleNamespace | None:
    """The compiled kernels (``count_at_least``, ``pack_at_least``, ``expand_bits``, ``quantize``, ``dequantize``),
    or None where numba is
    missing, fails to import, or ``LOWBAND_KERNELS=numpy``; decided once per process."""
    if not _LOADED:
        _LOADED.append(None if os.environ.get(ENV, "").lower() == "numpy" else _compile())
    return _LOADED[0]


def _compile() -> types.SimpleNamespace | None:
    try:
        import numba
    except Exception:  # noqa: BLE001 - any broken numba install means the NumPy path, not a failure
        return None
    jit: Any = numba.njit(cache=True, nogil=True, boundscheck=False)

    @jit
    def count_at_least(src: np.ndarray, tau: float) -> int:  # pragma: no cover - compiled
        k = 0
        for i in range(src.size):
            k += abs(src[i]) >= tau
        return k

    @jit
    def pack_tail(src: np.ndarray, tau: float, values: np.ndarray, bits: np.ndarray, b: int, k: int
                  ) -> int:  # pragma: no cover - compiled
        n, room = src.size, values.size
        while 8 * b < n:  # from byte b on, each write checked
            byte, at = 0, 8 * b
            for j in range(min(8, n - at)):
                x = src[at + j]
                keep = abs(x) >= tau
                if keep and k < room:
                    values[k] = x
                k += keep
                byte |= keep << j
            bits[b] = byte
            b += 1
        return k

    @jit
    def pack_at_least(src: np.ndarray, tau: float, values: np.ndarray, bits: np.ndarray) -> int:  # pragma: no cover
        n, room, k, b = src.size, values.size, 0, 0
        while b < n // 8 and k + 8 <= room:  # whole bytes while every slot they may write is free: no checks
            byte, at = 0, 8 * b
            for j in range(8):
                x = src[at + j]
                keep = abs(x) >= tau
                values[k] = x
                k += keep
                byte |= keep << j
            bits[b] = byte
            b += 1
        return pack_tail(src, tau, values, bits, b, k)  # (its own function: the loop above compiles tighter)

    @jit
    def expand_tail(bits: np.ndarray, values: np.ndarray, dst: np.ndarray, b: int, k: int
                    ) -> int:  # pragma: no cover - compiled
        n, room = dst.size, values.size
        while 8 * b < n:  # from byte b on, each read checked
            byte, at = bits[b], 8 * b
            for j in range(min(8, n - at)):
                bit = (byte >> j) & 1
                dst[at + j] = values[k] if bit and k < room else 0
                k += bit
            b += 1
        return k

    @jit
    def expand_bits(bits: np.ndarray, values: np.ndarray, dst: np.ndarray) -> int:  # pragma: no cover - compiled
        n, room, k, b = dst.size, values.size, 0, 0
        while b < n // 8 and k + 8 <= room:  # whole bytes whose values all lie within: no checks
            byte, at = bits[b], 8 * b
            for j in range(8):
                bit = (byte >> j) & 1
                value = values[k]
                dst[at + j] = value if bit else 0
                k += bit
            b += 1
        return expand_tail(bits, values, dst, b, k)

    @jit
    def quantize(src: np.ndarray, lo: float, inv: float, out: np.ndarray) -> None:  # pragma: no cover - compiled
        for i in range(src.size):
            out[i] = np.uint8(np.rint((src[i] - lo) * inv))

    @jit
    def dequantize(codes: np.ndarray, step: float, lo: float, out: np.ndarray) -> None:  # pragma: no cover
        for i in range(codes.size):
            out[i] = np.float32(codes[i]) * step + lo

    return types.SimpleNamespace(count_at_least=count_at_least, pack_at_least=pack_at_least,
                                 expand_bits=expand_bits, quantize=quantize, dequantize=dequantize)
