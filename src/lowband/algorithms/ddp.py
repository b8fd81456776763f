"""``ddp``: synchronous data parallel, the baseline every other method is measured against.

Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training"
(VLDB 2020, arXiv:2006.15704). Each step:

1. every rank computes gradients on its own batch;
2. gradients are packed into buckets of at most ``bucket_mb`` megabytes and all-reduced
   (sum), then divided by the world size, so every rank holds the average gradient;
3. every rank applies the same inner optimizer step, so parameters stay identical.

Example::

    algo = DDP(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowband.algorithms.base import ALGORITHMS, Algorithm, Options, flatten, unflatten_into


@dataclass(frozen=True)
class DDPOptions(Options):
    bucket_mb: float = 25.0  # as torch DDP's bucket_cap_mb

    def __post_init__(self) -> None:
        if self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")


@ALGORITHMS.register("ddp")
class DDP(Algorithm):
    name = "ddp"
    Options = DDPOptions
    options: DDPOptions

    def _buckets(self) -> list[list[torch.Tensor]]:
        """Gradients grouped into buckets of at most ``bucket_mb`` (same dtype per bucket)."""
        limit = self.options.bucket_mb * 1e6
        buckets: list[list[torch.Tensor]] = []
        size = 0.0
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad
            nbytes = grad.numel() * grad.element_size()
            if not buckets or size + nbytes > limit or grad.dtype != buckets[-1][0].dtype:
                buckets.append([])
                size = 0
            buckets[-1].append(grad)
            size += nbytes
        return buckets

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        if self.comm.world_size == 1:
            return
        for bucket in self._buckets():
            flat = flatten(bucket)
            self.comm.all_reduce(flat, average=True, tag="grads")
            unflatten_into(flat, bucket)
