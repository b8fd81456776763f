"""``dgc``: Deep Gradient Compression's momentum correction, momentum factor masking and clipping.

Lin, Han, Mao, Wang and Dally, "Deep Gradient Compression: Reducing the Communication
Bandwidth for Distributed Training" (ICLR 2018, arXiv:1712.01887), sections 3.1-3.3.

Momentum is applied *before* compressing, to the local gradient, so the inner optimizer
must be plain SGD without momentum (``torch.optim.SGD(params, lr, momentum=0)``):
otherwise momentum is applied twice. Per tensor, with u the local momentum and v the
local accumulation (both start at zero):

1. clip: with ``clip`` > 0, scale g so that its L2 norm is at most ``clip`` (the paper
   clips each node's gradient at the global threshold times N**-0.5 for N nodes: pass
   that value);
2. momentum correction: u = ``momentum`` * u + g; v = v + u; compress v;
3. momentum factor masking, with the positions this rank sent (decoded != 0): v = 0 and
   u = 0 there; v keeps the unsent rest for later rounds.

With a sparsifier that sends exact values (``topk``, ``dgc``, ``threshold``) step 3 is
error feedback: afterwards compensated == own decoded + v (tested).

Example::

    agg = Aggregator(comm, build("dgc:ratio=0.001", COMPRESSORS), build("dgc:momentum=0.9", FEEDBACK))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowband.feedback.base import FEEDBACK, Feedback, FeedbackOptions


@dataclass(frozen=True)
class DGCFeedbackOptions(FeedbackOptions):
    """``momentum`` in [0, 1); ``clip``: max L2 norm of each tensor's gradient (0 = off)."""

    momentum: float = 0.9
    clip: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (self.clip >= 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be a finite number >= 0 (0 = off), got {self.clip}")


@FEEDBACK.register("dgc")
class DGCFeedback(Feedback):
    """Momentum correction with factor masking; see the module docstring."""

    name = "dgc"
    Options = DGCFeedbackOptions

    def compensate(self, key: str, x: torch.Tensor) -> torch.Tensor:
        g = x
        if self.options.clip > 0:
            norm = float(torch.linalg.vector_norm(x.float()))
            if norm > self.options.clip:
                g = x * (self.options.clip / norm)
        u = self._get(key, "momentum", x)
        u.mul_(self.options.momentum).add_(g)
        v = self._get(key, "accumulated", x)
        v.add_(u)
        return v.clone()  # the caller may keep it; the state is masked in update

    def update(self, key: str, compensated: torch.Tensor, own_decoded: torch.Tensor) -> None:
        sent = own_decoded.reshape(compensated.shape) != 0
        residual = compensated.masked_fill(sent, 0)
        self.state[key]["accumulated"] = residual
        self.state[key]["momentum"].masked_fill_(sent, 0)
