"""Compiled CPU loops for threshold's bitmap payload, int8's codes and sign's decode (numba, optional); registers
nothing.

NumPy builds a bitmap payload (:mod:`lowband.compress.bitmaps`) from whole-array passes: ``|x|``,
``>= tau``, a count, ``compress`` (itself ``nonzero`` then ``take``) and ``packbits``; decoding,
``unpackbits``, ``nonzero``, a zero fill and a fancy assignment. The ``nonzero`` passes alone
cost ~0.56 ns an element here, twice per round trip (hand-timed, a lead). A compiled loop does
each direction in one pass over the elements, with no branch on the data:

* :func:`count_at_least`: how many ``|x| >= tau`` (a vectorised compare-and-add);
* :func:`pack_at_least`: per element, write ``x`` at the next value slot and advance the slot by
  ``|x| >= tau`` (0 or 1); the same 0/1 is the element's bit, eight of them make a bitmap byte;
* :func:`expand_bits`: per element, its bit picks the next value or 0, and advances the value
  slot by the bit. Values move as integers of their width (any float dtype, and the bits of a
  NaN unchanged); past the last whole byte whose values all lie within, each read is checked, so
  a bitmap that holds more bits than values never reads past them. It returns the bits it found: the caller checks
  that count before trusting the output. A bitmap shorter than the output covers only its own
  elements; the rest are written 0, never left as the memory held them.

int8 (:mod:`lowband.compress.int8`) quantises in NumPy in four passes (subtract, multiply, round,
convert) and decodes in three (convert, multiply, add); :func:`quantize` and :func:`dequantize` are
each one vectorised loop doing the same fp32 operations in the same order (no fused multiply-add:
numba compiles without fastmath), so the same bytes.

sign (:mod:`lowband.compress.sign`) decodes through a table gather in torch, a row of eight floats
per byte; :func:`expand_signs` writes ``scale`` or ``-scale`` per bit, eight selects per byte that
the compiler unrolls (~8 us per 65,536 elements against ~56 us for the gather, hand-timed, a lead).

The loops live in ``_numba_loops.py``, imported on first use only. numba (``pip install lowband[cpu]``;
``make setup`` installs it) compiles them then, ~0.3 s a signature, and later processes load them
from its cache beside that file (or its user cache when that is not writable). Without numba, or
with ``LOWBAND_KERNELS=numpy`` in the environment, :func:`loaded` returns None and the NumPy passes
run; both give the same bytes (tests/test_kernels.py, tests/test_compress_fast_paths.py).
Kernels release the GIL (``nogil``), so a large tensor's chunks run on every thread
(:func:`lowband.compress.select.parallel`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import types
from typing import Any

import numpy as np

ENV = "LOWBAND_KERNELS"  # "numpy": never load the compiled kernels
NAMES = ("count_at_least", "pack_at_least", "expand_bits", "quantize", "dequantize", "expand_signs")
_LOADED: list[types.SimpleNamespace | None] = []
log = logging.getLogger(__name__)


def loaded() -> types.SimpleNamespace | None:
    """The compiled kernels (:data:`NAMES`), or None where numba is missing or fails, or with
    ``LOWBAND_KERNELS=numpy``; decided once per process."""
    if not _LOADED:
        _LOADED.append(None if os.environ.get(ENV, "").lower() == "numpy" else _load())
    return _LOADED[0]


def _load() -> types.SimpleNamespace | None:
    """The kernels, compiled (from numba's cache when it has them) and each run once on a few fp32 elements, so
    that a compiler failure shows here, once, and not inside a training step; None (the NumPy path) on any."""
    if importlib.util.find_spec("numba") is None:
        return None
    try:
        from lowband.compress import _numba_loops as fast

        _smoke(fast)
        return types.SimpleNamespace(**{name: getattr(fast, name) for name in NAMES})
    except Exception as err:  # noqa: BLE001 - a broken numba means the NumPy path, with a warning
        log.warning("lowband: numba kernels unavailable (%s: %s); using the NumPy path", type(err).__name__, err)
        return None


def _smoke(fast: Any) -> None:
    """One call of each kernel on 11 fp32 elements, checked against NumPy (compiles the common signatures)."""
    x = np.linspace(-1, 1, 11, dtype=np.float32)
    tau = np.float32(0.5)
    keep = np.abs(x) >= tau
    k = fast.count_at_least(x, tau)
    values, bits, back = np.empty(k, np.float32), np.empty(2, np.uint8), np.empty(11, np.float32)
    fast.pack_at_least(x, tau, values, bits)
    fast.expand_bits(bits, values.view(np.int32), back.view(np.int32))
    codes, decoded = np.empty(11, np.uint8), np.empty(11, np.float32)
    fast.quantize(x, np.float32(-1), np.float32(5), codes)
    fast.dequantize(codes, np.float32(0.2), np.float32(-1), decoded)
    signs = np.empty(11, np.float32)
    fast.expand_signs(np.packbits(x < 0, bitorder="little"), np.float32(2), np.float32(-2), signs)
    if (k != keep.sum() or not (values == x[keep]).all() or not (back == np.where(keep, x, 0)).all()
            or not (codes == np.rint((x + 1) * 5)).all() or not np.allclose(decoded, x, atol=1e-6)
            or not (signs == np.where(x < 0, -2, 2)).all()):
        raise RuntimeError("the compiled kernels disagree with NumPy on a smoke test")
