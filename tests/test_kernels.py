"""The compiled bitmap kernels (lowband.compress.kernels): the NumPy passes' results, element for element,
at every tail length, and never a read or write outside the arrays they are given."""

from __future__ import annotations

import numpy as np
import pytest

from lowband.compress import kernels

pytest.importorskip("numba")


@pytest.fixture(scope="module")
def fast() -> object:
    from lowband.compress import _numba_loops

    return _numba_loops


def _data(n: int, dtype: type, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n).astype(dtype)
    if n > 6:
        x[2], x[5] = np.nan, -np.inf  # |nan| >= tau is false; -inf is kept
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 1000, 4099])
@pytest.mark.parametrize("tau", [0.0, 0.7, 9.0])  # all kept (but NaN), some, none
def test_pack_and_expand_match_numpy(fast: object, dtype: type, n: int, tau: float) -> None:
    x = _data(n, dtype, n)
    limit = x.dtype.type(tau)
    keep = np.abs(x) >= limit
    k = int(keep.sum())
    assert fast.count_at_least(x, limit) == k
    buffer = np.full(k + 4, 12345.0, dtype)  # room for k values, then sentinels that must stay
    bits = np.full((n + 7) // 8 + 1, 0xAB, np.uint8)
    assert fast.pack_at_least(x, limit, buffer[:k], bits[:-1]) == k
    np.testing.assert_array_equal(buffer[:k], x[keep])
    assert (buffer[k:] == 12345.0).all() and bits[-1] == 0xAB
    np.testing.assert_array_equal(bits[:-1], np.packbits(keep, bitorder="little"))
    ints = np.dtype(f"i{x.itemsize}")
    dst = np.full(n + 1, 7, ints)
    assert fast.expand_bits(bits[:-1], buffer[:k].view(ints), dst[:n]) == k
    np.testing.assert_array_equal(dst[:n].view(dtype), np.where(keep, x, 0))
    assert dst[n] == 7


@pytest.mark.parametrize("n", [8, 9, 100, 1003])
def test_expanding_more_bits_than_values_reads_none_past_them(fast: object, n: int) -> None:
    bits = np.full((n + 7) // 8, 0xFF, np.uint8)  # every bit set
    room = n // 2
    values = np.arange(1, room + 3, dtype=np.int32)  # the last two never read: the kernel sees room values
    dst = np.full(n, -1, np.int32)
    assert fast.expand_bits(bits, values[:room], dst) == n  # counts every bit; the caller rejects it
    np.testing.assert_array_equal(dst[:room], values[:room])
    assert (dst[room:] == 0).all()


def test_a_short_bitmap_is_read_no_further_and_the_rest_is_zero(fast: object) -> None:
    values = np.arange(1, 101, dtype=np.int32)
    dst = np.full(100, -1, np.int32)
    assert fast.expand_bits(np.full(3, 0xFF, np.uint8), values, dst) == 24  # 3 bytes: 24 elements covered
    np.testing.assert_array_equal(dst[:24], values[:24])
    assert (dst[24:] == 0).all()
    bits = np.zeros(2, np.uint8)
    x = np.ones(100, np.float32)
    assert fast.pack_at_least(x, np.float32(0.5), np.zeros(100, np.float32), bits) == 16  # 2 bytes' worth
    assert (bits == 0xFF).all()


def test_packing_into_fewer_slots_than_kept_writes_none_past_them(fast: object) -> None:
    x = np.ones(100, np.float32)
    values = np.zeros(60, np.float32)
    bits = np.zeros(13, np.uint8)
    assert fast.pack_at_least(x, np.float32(0.5), values[:50], bits) == 100
    assert (values[:50] == 1).all() and (values[50:] == 0).all()


@pytest.mark.parametrize("n", [0, 5, 8, 77, 1024])
def test_signs_and_quantised_codes_stay_inside_their_arrays(fast: object, n: int) -> None:
    x = _data(n, np.float32, n + 1)
    x[~np.isfinite(x)] = 0
    bits = np.packbits(x < 0, bitorder="little")
    out = np.full(n + 3, 9, np.float32)
    fast.expand_signs(bits, np.float32(0.25), np.float32(-0.25), out[:n])
    np.testing.assert_array_equal(out[:n], np.where(x < 0, -0.25, 0.25).astype(np.float32))
    assert (out[n:] == 9).all()
    fast.expand_signs(bits[:n // 16], np.float32(1), np.float32(-1), out[:n])  # too few bits: only what they cover
    codes = np.full(n + 2, 7, np.uint8)
    fast.quantize(np.abs(x), np.float32(0), np.float32(10), codes[:n])
    np.testing.assert_array_equal(codes[:n], np.rint(np.abs(x) * np.float32(10)).astype(np.uint8))
    assert (codes[n:] == 7).all()
    decoded = np.full(n + 2, 9, np.float32)
    fast.dequantize(codes, np.float32(0.1), np.float32(0), decoded[:n])  # more codes than room: n written
    assert (decoded[n:] == 9).all()


def test_the_environment_switch_keeps_the_numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_LOADED", [])
    monkeypatch.setenv(kernels.ENV, "numpy")
    assert kernels.loaded() is None
    monkeypatch.setattr(kernels, "_LOADED", [])
    monkeypatch.delenv(kernels.ENV)
    assert kernels.loaded() is not None


def test_a_failing_compiler_leaves_the_numpy_path_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    def broken(fast: object) -> None:
        raise RuntimeError("LLVM said no")

    monkeypatch.setattr(kernels, "_LOADED", [])
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_smoke", broken)
    assert kernels.loaded() is None
    assert "numba kernels unavailable (RuntimeError: LLVM said no); using the NumPy path" in caplog.text


def test_import_of_the_compress_package_leaves_numba_unloaded() -> None:
    import subprocess
    import sys

    code = "import sys, lowband.compress; print('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
