"""``ddp``: synchronous data parallel, the baseline every other method is measured against.

Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training"
(VLDB 2020, arXiv:2006.15704). Each step:

1. every rank computes gradients on its own batch;
2. gradients are averaged across ranks through the aggregator: uncompressed (fp32,
   one all-reduce per ``bucket_mb`` megabytes) by default, or any compressor with error
   feedback (``DDPOptions(compress="topk:ratio=0.01", feedback="ef")``);
3. every rank applies the same inner optimizer step, so parameters stay identical.

Example::

    algo = DDP(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm)
"""

from __future__ import annotations

from dataclasses import dataclass
import time
from typing import Any

import torch

from lowband.adversity.stragglers import STRAGGLERS
from lowband.algorithms.base import ALGORITHMS, Algorithm, SyncOptions
from lowband.algorithms.commplan import Setup, Sync, average
from lowband.registry import build


@dataclass(frozen=True)
class DDPOptions(SyncOptions):
    """``compress``/``feedback`` choose what the gradients become on the wire (default: fp32);
    ``straggle`` simulates slow ranks (:mod:`lowband.adversity.stragglers`)."""

    straggle: str = "none"  # 'fixed:ranks=3,delay=0.5', 'random:prob=0.1,delay=0.5,seed=0'

    def __post_init__(self) -> None:
        super().__post_init__()
        build(self.straggle, STRAGGLERS)


@ALGORITHMS.register("ddp")
class DDP(Algorithm):
    name = "ddp"
    Options = DDPOptions
    options: DDPOptions

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """The gradients through ``compress`` every step, blocking."""
        return average(options, setup, "grads", 1, backward=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aggregator = self.build_aggregator("grads")
        self.straggler = build(self.options.straggle, STRAGGLERS)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        time.sleep(self.straggler.delay(self.comm.rank, self.step_count + 1))  # a simulated slow device
        for _, p in self.named_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.aggregator.mean_([(name, p.grad) for name, p in self.named_params])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.aggregator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.aggregator.load_state_dict(state)
