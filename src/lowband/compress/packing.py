"""Bit packing: unsigned integer codes of 1, 2, 4 or 8 bits in and out of a uint8 buffer.

Shared by the quantizers (``qsgd``, ``int8``, ``terngrad``, ``sign``) and the sparse bitmaps;
registers nothing.

1. check the width (1, 2, 4 or 8 bits: a code never straddles two bytes) and that every
   code fits in it;
2. byte ``j`` holds codes ``j * per .. j * per + per - 1`` (``per = 8 // bits``), code ``k``
   of a byte in bits ``k * bits .. k * bits + bits - 1`` (least significant first); a last
   partial byte is padded with zero codes;
3. unpacking looks each byte up in a table of its ``per`` codes (:func:`byte_table`): one
   gather, no per-slot shifts; :func:`decode_levels` looks the bytes up in a table of the
   *values* the codes stand for, so a quantizer decodes in that one pass.

The buffer is exactly ``ceil(n * bits / 8)`` bytes (:func:`packed_nbytes`); nothing about
``n`` is stored, the receiver knows it from the shape.

Speed (``benchmarks/compressors.py``): 1-bit codes pack eight at a time, the eight bytes
read as one 64-bit word whose product with 0x0102040810204080 gathers bit ``i`` of byte
``i`` into the top byte (every partial product lands on its own bit, so no carry mixes them;
the product wraps modulo 2**64, as integer arithmetic does on every torch backend); 2 and 4
bits shift and OR the ``per`` slots of each byte in place. Vectorised: the only Python loops
run over the slots of a byte, never over elements.

Example::

    codes = torch.tensor([3, 0, 1, 2, 3], dtype=torch.uint8)
    packed = pack(codes, 2)            # 2 bytes: [0b10_01_00_11, 0b00_00_00_11]
    assert torch.equal(unpack(packed, 2, 5), codes)
"""

from __future__ import annotations

import numpy as np
import torch

from lowband import devices
from lowband.compress import scratch

WIDTHS = (1, 2, 4, 8)
GATHER_BITS = 0x0102040810204080  # byte i's low bit -> bit 56 + i of the product
_TABLES: dict[int, dict[torch.device, torch.Tensor]] = {bits: {} for bits in WIDTHS}


def check_bits(bits: int) -> None:
    """Refuse a width that is not 1, 2, 4 or 8 bits, in one line."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in WIDTHS:
        raise ValueError(f"bit width must be one of 1, 2, 4, 8, got {bits!r}")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy: ``ceil(n * bits / 8)``."""
    check_bits(bits)
    return (n * bits + 7) // 8


def byte_table(bits: int, device: torch.device) -> torch.Tensor:
    """``(256, 8 // bits)`` int64: row ``v`` holds the codes byte ``v`` packs, first code first (an index)."""
    check_bits(bits)

    def make(d: torch.device) -> torch.Tensor:
        values = torch.arange(256, dtype=torch.int32, device=d).unsqueeze(1)
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=d)
        return ((values >> shifts) & ((1 << bits) - 1)).to(torch.int64)

    return devices.cached(_TABLES[bits], device, make)


def pack(codes: torch.Tensor, bits: int, check: bool = True) -> torch.Tensor:
    """``codes`` (any shape, integer or bool, values in ``[0, 2**bits)``) as a flat uint8 buffer.

    ``check`` verifies the range (a host sync on a GPU); the quantizers, whose codes are in range
    by construction, pass ``check=False``.
    """
    check_bits(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"pack expects integer codes, got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if check and n and codes.dtype != torch.bool:  # host sync: the range check
        lo, hi = torch.aminmax(flat)
        if int(lo) < 0 or int(hi) >= 1 << bits:
            raise ValueError(f"codes must lie in [0, {1 << bits}) to pack in {bits} bits, "
                             f"got values in [{int(lo)}, {int(hi)}]")
    if flat.dtype not in (torch.uint8, torch.bool):
        flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.to(torch.uint8, copy=True)
    flat = flat.view(torch.uint8)
    per = 8 // bits
    out = scratch.fresh(packed_nbytes(n, bits), torch.uint8, flat.device)
    body = n - n % 8 if bits == 1 else n - n % per  # whole words (1 bit) or whole bytes (2, 4 bits)
    if bits == 1 and body:
        if flat.storage_offset() % 8:  # a view starting mid-word: 64-bit words need an aligned copy
            flat = flat.clone()
        words = scratch.buffer("pack.words", body // 8, torch.int64, flat.device)
        torch.mul(flat[:body].view(torch.int64), GATHER_BITS, out=words)
        out[:body // 8].copy_(words.bitwise_right_shift_(56))  # the top byte; the copy keeps its low 8 bits
    elif body:
        _pack_slots(flat[:body].view(-1, per), bits, out[:body // per])
    if body < n:  # the last partial byte (or word), from a zero-padded copy of the tail
        tail = torch.zeros(packed_nbytes(n - body, bits) * per, dtype=torch.uint8, device=flat.device)
        tail[:n - body] = flat[body:]
        _pack_slots(tail.view(-1, per), bits, out[body * bits // 8:])
    return out


def pack_numpy(codes: np.ndarray, bits: int, out: np.ndarray) -> None:
    """:func:`pack` in NumPy, into ``out``: ``codes`` (uint8, a whole number of bytes' worth, values in range;
    overwritten). The codes of a byte are read as one little-endian word (``per`` bytes) and folded into its low
    byte by shifts, on contiguous arrays (strided slices of the codes are several times slower)."""
    if bits == 8:
        out[:] = codes
        return
    word = codes.view(np.uint16 if bits == 4 else np.uint32)  # bits 4: c0 + c1 << 8; bits 2: four bytes
    folded = scratch.array("pack.folded", word.size, word.dtype)
    np.bitwise_or(word, np.right_shift(word, 8 - bits, out=folded), out=folded)  # c0 | c1 << bits in the low byte
    if bits == 2:  # c2 | c3 << 2 sit in the second byte: move them to bits 4-7
        word = np.right_shift(folded, 12, out=scratch.array("pack.high", word.size, word.dtype))
        np.bitwise_or(folded, word, out=folded)
    np.copyto(out, folded, casting="unsafe")  # the low byte of each word


def _pack_slots(slots: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """``out[j]`` = the ``per`` codes of row ``j`` of ``slots``, first code in the low bits (in place)."""
    per = slots.shape[1]
    out.copy_(slots[:, per - 1])
    for k in range(per - 2, -1, -1):  # over the slots of a byte, not over elements
        out.bitwise_left_shift_(bits).bitwise_or_(slots[:, k])


_WORDS = {4: torch.int32, 8: torch.int64}  # a table row's bytes -> the integer that holds it


def decode_levels(packed: torch.Tensor, bits: int, n: int, levels: torch.Tensor, out: torch.Tensor,
                  owners: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i] = levels[code_i]`` for the ``n`` codes packed in ``packed``, in one gather; returns ``out``.

    ``levels`` (``2**bits`` values, ``out``'s dtype and device) is what each code stands for; ``out``
    is a flat tensor of ``n`` elements. Each byte is looked up in a ``(256, per)`` table of values.
    With ``owners`` (int32, one per packed byte: 256 times the row of ``levels`` it reads), ``levels`` is
    ``(T, 2**bits)``, a level table per tensor of a batch, and the tables are stacked: still one gather.
    """
    check_bits(bits)
    _check_packed(packed, bits, n)
    flat = packed.reshape(-1)
    per = 8 // bits
    table = levels[..., byte_table(bits, flat.device)].reshape(-1, per)  # (256 T, per): a tiny gather
    index = scratch.buffer("unpack.index", flat.numel(), torch.int32, flat.device)
    index.copy_(flat) if owners is None else torch.add(owners, flat, out=index)
    full = n // per
    row = _WORDS.get(per * out.element_size())  # a row of the table as one word: a 1-D gather, faster than rows
    if full and row is not None and out.storage_offset() % per == 0:
        torch.index_select(table.contiguous().view(row).reshape(-1), 0, index[:full], out=out[:full * per].view(row))
    elif full:
        torch.index_select(table, 0, index[:full], out=out[:full * per].view(full, per))
    if full * per < n:
        out[full * per:].copy_(table.index_select(0, index[full:]).reshape(-1)[:n - full * per])
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` codes (flat uint8) that :func:`pack` turned into ``packed``."""
    check_bits(bits)
    _check_packed(packed, bits, n)
    if bits == 8:
        return packed.reshape(-1).clone()
    out = scratch.fresh(n, torch.uint8, packed.device)
    levels = torch.arange(1 << bits, dtype=torch.uint8, device=packed.device)
    return decode_levels(packed, bits, n, levels, out)


def _check_packed(packed: torch.Tensor, bits: int, n: int) -> None:
    expected = packed_nbytes(n, bits)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(f"cannot unpack {n} codes of {bits} bits from {packed.numel()} {packed.dtype} "
                         f"values; expected {expected} uint8")
