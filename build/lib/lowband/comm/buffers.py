"""Flat buffers for the aggregators: grouping small tensors, chunking, writing results back.

Shared by :class:`~lowband.comm.aggregate.Aggregator` and
:class:`~lowband.comm.hierarchy.HierarchicalAggregator`; no communication here.
"""

from __future__ import annotations

from typing import Sequence

import torch


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
