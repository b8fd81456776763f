"""``dist-lion``: every worker runs Lion on its own gradient and sends 1 bit per parameter.

Liu et al., "Communication Efficient Distributed Training with Distributed Lion"
(arXiv:2404.00438); Lion itself is Chen et al., "Symbolic Discovery of Optimization
Algorithms" (arXiv:2302.06675). The algorithm is the optimizer: the inner AdamW's own
update is never applied; lr (scheduler-adjusted) and weight decay are read from its param
groups at every step. Each step, on rank i of n:

1. the local (clipped) gradient g_i gives the local direction
   u_i = sign(b1 m_i + (1 - b1) g_i), with sign(0) = +1 (one bit cannot say 0);
2. the rank's own momentum moves on: m_i = b2 m_i + (1 - b2) g_i (never communicated);
3. u_i travels as packed bits, ceil(numel / 8) bytes, through an all-gather: every rank
   receives every u_j and computes the same aggregate, as the paper's server would and
   broadcast back (its downlink is the majority vote, 1 bit again, or the average,
   log2(n + 1) bits; here no server exists and each rank takes the n - 1 others' bits);
4. aggregate: ``vote="majority"``: sign(sum_j u_j) (ties of an even n give 0),
   ``vote="average"``: mean_j u_j (multiples of 1/n);
5. theta -= lr_lion (agg + wd_lion theta), with lr_lion = ``lr_ratio`` * lr and
   wd_lion = wd / ``lr_ratio``: Lion wants a smaller lr and larger weight decay than AdamW
   (Chen et al.: 3-10x), and keeping lr * wd fixed keeps the decay per step of AdamW.

Bytes per rank per step (ring all-gather): (n - 1) ceil(numel / 8) sent and received,
against 2 (n - 1) / n * 4 numel for the fp32 all-reduce of ``ddp``: 64 / n times less
(32x on two ranks; the all-gather grows with n, a server would not). Parameters
stay identical on every rank; the momenta m_i do not.

Example::

    algo = DistLion(model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1), comm,
                    DistLionOptions(vote="majority", lr_ratio=0.3))
    loss.backward(); algo.step(); algo.zero_grad()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lowband.algorithms.base import ALGORITHMS, Options, flatten, views
from lowband.algorithms.commplan import Setup, Sync
from lowband.algorithms.signs import OwnUpdate, pack_signs, param_groups, unpack_signs
from lowband.comm import Comm

VOTES = ("majority", "average")


@dataclass(frozen=True)
class DistLionOptions(Options):
    """``vote``: how the n directions combine; ``lr_ratio``: Lion lr / AdamW lr (lr * wd kept)."""

    vote: str = "majority"
    lr_ratio: float = 0.3
    beta1: float = 0.9  # interpolation of the direction
    beta2: float = 0.99  # momentum decay

    def __post_init__(self) -> None:
        if self.vote not in VOTES:
            raise ValueError(f"vote must be one of {', '.join(VOTES)}, got {self.vote!r}")
        if not self.lr_ratio > 0:
            raise ValueError(f"lr_ratio must be > 0 (Lion lr = lr_ratio * lr), got {self.lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def vote_bytes(numel: int, world_size: int) -> int:
    """Bytes one rank sends (and receives) per step."""
    return (world_size - 1) * ((numel + 7) // 8)


def aggregate_signs(comm: Comm, direction: torch.Tensor, vote: str, tag: str = "signs") -> torch.Tensor:
    """Steps 3-4: the aggregate of every rank's ``sign(direction)`` (flat fp32), same on all ranks."""
    n = direction.numel()
    gathered = comm.all_gather(pack_signs(direction), tag=tag)
    total = torch.stack([unpack_signs(bits, n) for bits in gathered]).sum(0)  # integers: exact in fp32
    return torch.sign(total) if vote == "majority" else total / comm.world_size


@ALGORITHMS.register("dist-lion")
class DistLion(OwnUpdate):
    name = "dist-lion"
    Options = DistLionOptions
    options: DistLionOptions

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """ceil(P / 8) bytes of packed signs, all-gathered every step."""
        return (Sync("signs", "all_gather", float(math.ceil(setup.params / 8))),)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = param_groups(self.optimizer, self.params)
        self.m = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float32,
                             device=self.device)  # this rank's own

    @torch.no_grad()
    def update(self) -> None:
        o = self.options
        grads = [g.float() for g in self.local_gradients()]
        ms = views(self.m, self.params)
        direction = flatten([m.lerp(g, 1 - o.beta1) for m, g in zip(ms, grads)]) if grads else self.m
        for m, g in zip(ms, grads):
            m.lerp_(g, 1 - o.beta2)
        agg = aggregate_signs(self.comm, direction, o.vote)
        for p, group, a in zip(self.params, self.groups, views(agg, self.params)):
            lr, wd = group["lr"], group.get("weight_decay", 0.0)
            p.mul_(1 - lr * wd)  # = 1 - lr_lion * wd_lion
            p.add_(a, alpha=-o.lr_ratio * lr)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "m": self.m.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["m"].shape != self.m.shape:
            raise ValueError(f"m has shape {tuple(state['m'].shape)}, expected {tuple(self.m.shape)}: "
                             "resume with the same model")
        self.m.copy_(state["m"])
        super().load_state_dict(state)
