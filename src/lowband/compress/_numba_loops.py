"""The numba loops behind :mod:`lowband.compress.kernels` (read its docstring); imported only by its loader.

Module-level functions, so that numba's cache (``cache=True``: beside this file, or its user cache)
serves every process after the first; ``nogil``: a large tensor's chunks run on every thread.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

jit: Any = numba.njit(cache=True, nogil=True, boundscheck=False)


@jit
def count_at_least(src: np.ndarray, tau: float) -> int:
    k = 0
    for i in range(src.size):
        k += abs(src[i]) >= tau
    return k


@jit
def pack_tail(src: np.ndarray, tau: float, values: np.ndarray, bits: np.ndarray, b: int, k: int) -> int:
    n, room = min(src.size, 8 * bits.size), values.size
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
def pack_at_least(src: np.ndarray, tau: float, values: np.ndarray, bits: np.ndarray) -> int:
    n, room, k, b = min(src.size, 8 * bits.size), values.size, 0, 0  # (never past an array: the caller sizes them)
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
def expand_tail(bits: np.ndarray, values: np.ndarray, dst: np.ndarray, b: int, k: int) -> int:
    n, room = min(dst.size, 8 * bits.size), values.size
    while 8 * b < n:  # from byte b on, each read checked
        byte, at = bits[b], 8 * b
        for j in range(min(8, n - at)):
            bit = (byte >> j) & 1
            dst[at + j] = values[k] if bit and k < room else 0
            k += bit
        b += 1
    return k


@jit
def expand_bits(bits: np.ndarray, values: np.ndarray, dst: np.ndarray) -> int:
    n, room, k, b = min(dst.size, 8 * bits.size), values.size, 0, 0
    dst[n:] = 0  # elements no bit covers (a short bitmap): zero, never what the memory held
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
def quantize(src: np.ndarray, lo: float, inv: float, out: np.ndarray) -> None:
    for i in range(min(src.size, out.size)):  # (never past either array, whatever the caller passes)
        out[i] = np.uint8(np.rint((src[i] - lo) * inv))


@jit
def dequantize(codes: np.ndarray, step: float, lo: float, out: np.ndarray) -> None:
    for i in range(min(codes.size, out.size)):
        out[i] = np.float32(codes[i]) * step + lo


@jit
def expand_signs(bits: np.ndarray, low: float, high: float, out: np.ndarray) -> None:
    n = min(out.size, 8 * bits.size)
    out[n:] = 0  # elements no bit covers (a short bitmap)
    for b in range(n // 8):  # whole bytes: the eight selects unroll and vectorise
        byte = bits[b]
        for j in range(8):
            out[8 * b + j] = high if (byte >> j) & 1 else low
    for i in range(n // 8 * 8, n):
        out[i] = high if (bits[i >> 3] >> (i & 7)) & 1 else low
