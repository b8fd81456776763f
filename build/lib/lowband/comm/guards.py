"""Guards on what crosses the wire: non-finite contributions and corrupted payloads.

Used by :class:`lowband.comm.aggregate.Aggregator` (see docs/robustness.md):

* a rank whose outgoing tensors hold NaN/inf sends zeros instead, is excluded from that
  round's aggregate, and logs one warning naming the rank, tensor and step
  (:func:`first_non_finite`);
* on the all-gather path every rank's byte buffer ends with a trailer: one flag byte
  (1: a valid contribution) and, with ``checksum=True``, the CRC-32 of the payload bytes
  (:func:`seal`, :func:`verify`); a mismatch excludes that sender like a missing contribution;
* fault injection for tests and benchmarks: :func:`corrupt_next` (or the environment
  variable ``LOWBAND_CORRUPT_FROM=<rank>``) flips one byte of a sender's payload as received.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Sequence

import torch

log = logging.getLogger(__name__)

TRAILER_FLAG = 1  # bytes of the valid flag
TRAILER_CRC = 4  # bytes of the CRC-32
ENV_CORRUPT = "LOWBAND_CORRUPT_FROM"

_pending_corruptions: list[tuple[int, frozenset[int] | None]] = []  # (sender, receivers or None: all others)


class NonFiniteError(ValueError):
    """A tensor about to be sent holds NaN or inf (and no rank could contribute instead)."""


def first_non_finite(named: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """A description of the first tensor of ``named`` holding NaN/inf, or None if all are finite.

    One device-side reduction over every tensor and one host sync (the decision to send or not);
    only when something is non-finite are the tensors looked at one by one."""
    floats = [(name, t) for name, t in named if t.is_floating_point()]
    if not floats or all_finite([t for _, t in floats]):
        return None
    for name, t in floats:
        finite = torch.isfinite(t)
        if not finite.all():
            return f"{name} holds {int((~finite).sum())} non-finite values of {t.numel()}"
    return None


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (host sync: one, for the whole list)."""
    return not tensors or finite_per_rank([tensors])[0]


def finite_per_rank(per_rank: Sequence[Sequence[torch.Tensor]]) -> list[bool]:
    """For each rank's tensors, whether all are finite (host sync: one for every rank at once)."""
    flags = torch.stack([torch.stack([torch.isfinite(t).all() for t in ts]).all() for ts in per_rank])
    return [bool(f) for f in flags.tolist()]


def finite_senders(ok: Sequence[bool], ranks: Sequence[int], rank: int, tag: str, step: int) -> list[int]:
    """Receivers' side: the positions of the senders whose values are finite (``ok``, per sender of
    ``ranks``); the others are named in a warning; none finite raises :class:`NonFiniteError`."""
    bad = [r for r, fine in zip(ranks, ok) if not fine]
    if bad and len(bad) == len(ranks):
        raise refuse(f"{tag}: no rank sent finite values")
    if bad:
        warn_excluded(rank, tag, step, bad, "non-finite values received from them")
    return [i for i, fine in enumerate(ok) if fine]


def refuse(reason: str) -> NonFiniteError:
    """The error when no rank has a finite contribution (the old strict behaviour's message)."""
    return NonFiniteError(f"{reason}; not sent (lower the learning rate, or clip gradients with --grad-clip)")


def warn_own(rank: int, tag: str, step: int, reason: str) -> None:
    log.warning("rank %d step %d: %s %s; this rank's contribution is excluded from the round",
                rank, step, tag, reason)


def warn_excluded(rank: int, tag: str, step: int, excluded: Sequence[int], why: str) -> None:
    log.warning("rank %d step %d: %s excluded rank(s) %s from the round (%s)",
                rank, step, tag, ", ".join(map(str, excluded)), why)


# -- the all-gather trailer ---------------------------------------------------------------
def trailer_bytes(checksum: bool) -> int:
    return TRAILER_FLAG + (TRAILER_CRC if checksum else 0)


def crc32(data: torch.Tensor) -> int:
    """CRC-32 (zlib) of a contiguous uint8 tensor: about 1 GB/s, cheap next to any link.

    zlib runs on the host: a device tensor is copied there first (host sync; only with ``checksum``)."""
    return zlib.crc32(data.contiguous().cpu().numpy()) if data.numel() else 0


def seal(payload: torch.Tensor, valid: bool, checksum: bool) -> torch.Tensor:
    """``payload`` (uint8, padded to the common width) followed by the flag and the CRC-32, on its device."""
    trailer = [int(valid)]
    if checksum:
        trailer += list(crc32(payload).to_bytes(4, "little"))
    return torch.cat([payload, torch.tensor(trailer, dtype=torch.uint8, device=payload.device)])


def verify(buffer: torch.Tensor, width: int, checksum: bool) -> str | None:
    """Why the sealed ``buffer`` is not a valid contribution (``'non-finite'``, ``'checksum'``) or None."""
    return verify_all([buffer], width, checksum)[0]


def verify_all(buffers: Sequence[torch.Tensor], width: int, checksum: bool) -> list[str | None]:
    """:func:`verify` for every rank's buffer, reading all the flags in one host sync."""
    if not buffers:
        return []
    flags = torch.stack([buf[width] for buf in buffers]).tolist()  # host sync: who sent a valid payload
    reasons: list[str | None] = []
    for buf, flag in zip(buffers, flags):
        if flag != 1:
            reasons.append("non-finite")
            continue
        if checksum:
            tail = buf[width + 1:width + 1 + TRAILER_CRC].cpu().tolist()  # host sync: CRC-32 runs on the host
            if int.from_bytes(bytes(tail), "little") != crc32(buf[:width]):
                reasons.append("checksum")
                continue
        reasons.append(None)
    return reasons


# -- fault injection ----------------------------------------------------------------------
def corrupt_next(sender: int, receivers: Sequence[int] | None = None) -> None:
    """Test hook: the next all-gathered buffer from ``sender`` arrives with one byte flipped on
    ``receivers`` (default: every rank but the sender). Call it on every rank (each applies its part)."""
    _pending_corruptions.append((sender, None if receivers is None else frozenset(receivers)))


def apply_corruptions(buffers: list[torch.Tensor], width: int, receiver: int) -> None:
    """Flip byte 0 of the payload part of the buffers that :func:`corrupt_next` or
    ``LOWBAND_CORRUPT_FROM`` target (called by the aggregator on what it received)."""
    targets = list(_pending_corruptions)
    _pending_corruptions.clear()
    env = os.environ.get(ENV_CORRUPT, "").strip()
    if env:
        targets.append((int(env), None))
    for sender, receivers in targets:
        hit = receiver != sender if receivers is None else receiver in receivers
        if hit and width > 0 and 0 <= sender < len(buffers):
            buffers[sender] = buffers[sender].clone()
            buffers[sender][0] ^= 0xFF


def poison_(flat: torch.Tensor) -> None:
    """Fill a summable payload with NaN: every rank's sum then shows that someone was invalid."""
    if flat.is_floating_point():
        flat.fill_(float("nan"))
