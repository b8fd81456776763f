"""Bit packing: unsigned integer codes of 1, 2, 4 or 8 bits in and out of a uint8 buffer.

Shared by the quantizers (``qsgd``, ``int8``, ``terngrad``, ``sign``); registers nothing.

1. check the width (1, 2, 4 or 8 bits: a code never straddles two bytes) and that every
   code fits in it;
2. pad the flat codes with zeros to a whole number of bytes (``8 // bits`` codes each);
3. byte ``j`` holds codes ``j * per .. j * per + per - 1``, code ``k`` of a byte in bits
   ``k * bits .. k * bits + bits - 1`` (least significant first);
4. unpacking shifts every byte by every slot at once and drops the padding, given ``n``.

The buffer is exactly ``ceil(n * bits / 8)`` bytes (:func:`packed_nbytes`); nothing about
``n`` is stored, the receiver knows it from the shape. Vectorised: the only Python loop
runs over the ``8 // bits`` slots of a byte, never over elements.

Example::

    codes = torch.tensor([3, 0, 1, 2, 3], dtype=torch.uint8)
    packed = pack(codes, 2)            # 2 bytes: [0b10_01_00_11, 0b00_00_00_11]
    assert torch.equal(unpack(packed, 2, 5), codes)
"""

from __future__ import annotations

import torch

WIDTHS = (1, 2, 4, 8)


def check_bits(bits: int) -> None:
    """Refuse a width that is not 1, 2, 4 or 8 bits, in one line."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in WIDTHS:
        raise ValueError(f"bit width must be one of 1, 2, 4, 8, got {bits!r}")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy: ``ceil(n * bits / 8)``."""
    check_bits(bits)
    return (n * bits + 7) // 8


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
    if bits == 8:
        return flat.to(torch.uint8, copy=True)
    per = 8 // bits
    nbytes = packed_nbytes(n, bits)
    slots = torch.zeros(nbytes * per, dtype=torch.uint8, device=codes.device)
    slots[:n] = flat
    slots = slots.view(nbytes, per)
    out = slots[:, 0].clone()
    for k in range(1, per):  # over the slots of a byte, not over elements
        out |= slots[:, k] << (k * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` codes (flat uint8) that :func:`pack` turned into ``packed``."""
    check_bits(bits)
    expected = packed_nbytes(n, bits)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(f"cannot unpack {n} codes of {bits} bits from {packed.numel()} {packed.dtype} "
                         f"values; expected {expected} uint8")
    flat = packed.reshape(-1)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (flat.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n]
