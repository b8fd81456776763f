"""Sign bits and the plumbing shared by the optimizers that replace the inner optimizer.

Used by ``onebit-adam`` (Tang et al., arXiv:2102.02888) and ``dist-lion`` (Liu et al.,
arXiv:2404.00438); registers nothing.

1. ``pack_signs(x)``: bit_i = 1 if x_i < 0 else 0 (zeros count as positive, as the
   ``sign`` compressor), 8 per byte with :func:`lowband.compress.packing.pack`;
2. ``unpack_signs(packed, n)``: the n values 1 - 2 bit_i (+1 or -1, fp32);
3. ``param_groups(optimizer, params)``: the optimizer's param group of each parameter,
   so lr (scheduler-adjusted), betas, eps and weight decay are read at every step;
4. ``OwnUpdate``: an :class:`Algorithm` whose ``step()`` applies its own update instead
   of the inner optimizer's, and which refuses context-manager use.

Example::

    packed = pack_signs(torch.tensor([0.5, -1.0, 0.0]))   # 1 byte: 0b010
    assert unpack_signs(packed, 3).tolist() == [1.0, -1.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowband.algorithms.base import Algorithm
from lowband.compress.packing import pack, unpack


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """The signs of ``x`` (flattened) as ``ceil(numel / 8)`` bytes; zeros count as positive."""
    return pack(x.reshape(-1) < 0, 1)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` signs (+1.0 / -1.0, fp32) that :func:`pack_signs` packed."""
    return 1.0 - 2.0 * unpack(packed, 1, n).to(torch.float32)


def param_groups(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[dict[str, Any]]:
    """The param group (the optimizer's own dict, read live) of each of ``params``."""
    owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    missing = [i for i, p in enumerate(params) if id(p) not in owner]
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters are not in the optimizer; "
                         "build it from model.parameters()")
    return [owner[id(p)] for p in params]


class OwnUpdate(Algorithm):
    """``step()``: reduce, clip, this algorithm's ``update()`` (never ``optimizer.step()``)."""

    def step(self) -> None:
        self._before_inner_step()
        self.update()
        # the step was taken, by us: torch's lr schedulers check this flag (set by the
        # optimizer.step() they wrap) and would warn that the schedule skipped a value
        self.optimizer._opt_called = True  # type: ignore[attr-defined]
        self._after_inner_step()

    def update(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Algorithm":
        raise TypeError(f"{self.name} replaces the optimizer's update: call algo.step() instead of "
                        "optimizer.step() inside 'with algo:'")

    @torch.no_grad()
    def local_gradients(self) -> list[torch.Tensor]:
        """Each parameter's gradient (zeros where there is none), after clipping."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]
