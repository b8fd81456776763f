"""Flat buffers for the aggregators: grouping small tensors, chunking, cutting received bytes back
into payloads, writing results back.

Shared by :class:`~lowband.comm.aggregate.Aggregator`, :class:`~lowband.comm.two_phase.TwoPhase` and
:class:`~lowband.comm.hierarchy.HierarchicalAggregator`; no communication here.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lowband.compress.base import Payload


def as_bytes(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``tensors`` back to back as one flat uint8 buffer (what :func:`cut_payloads` undoes)."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def cut_payloads(buf: torch.Tensor, templates: Sequence[Payload], counts: Sequence[int] | None = None) -> list[Payload]:
    """``buf`` (flat uint8, the payloads' tensors back to back) cut into payloads shaped like ``templates``:
    tensor i holds ``counts[i]`` elements of its template's dtype (default: the template's own count; a
    count that differs gives a flat tensor). Views where the bytes are aligned, copies where not."""
    out, offset, i = [], 0, 0
    for template in templates:
        tensors = []
        for t in template.tensors:
            count = t.numel() if counts is None else counts[i]
            raw = buf[offset:offset + count * t.element_size()]
            if raw.storage_offset() % t.element_size():  # misaligned after an odd-length byte tensor
                raw = raw.clone()
            piece = raw.view(t.dtype)
            tensors.append(piece.view(t.shape) if count == t.numel() else piece)
            offset, i = offset + count * t.element_size(), i + 1
        out.append(Payload(tensors, template.ctx))
    return out


def small_key(dtype: torch.dtype, names: Sequence[str]) -> str:
    """The key of a bucket of small tensors: ``small.float32[0.bias..4.bias]``.

    It names its first and last members, so the buckets of different calls (one per DDP
    bucket in :mod:`lowband.comm.ddp_hook`) keep separate feedback and compressor state.
    """
    return f"small.{str(dtype).removeprefix('torch.')}[{names[0]}..{names[-1]}]"


def flat_or_self(members: list[torch.Tensor]) -> torch.Tensor:
    return members[0] if len(members) == 1 else torch.cat([m.reshape(-1) for m in members])


def write_back(result: torch.Tensor, members: list[torch.Tensor]) -> None:
    if len(members) == 1:
        members[0].copy_(result.view_as(members[0]))
        return
    offset = 0
    for m in members:
        m.copy_(result[offset:offset + m.numel()].view_as(m))
        offset += m.numel()


def chunks(flat: torch.Tensor, max_bytes: int) -> list[torch.Tensor]:
    """Views of ``flat`` of at most ``max_bytes`` each (at least one element each)."""
    step = max(1, max_bytes // flat.element_size())
    return [flat[i:i + step] for i in range(0, flat.numel(), step)]
