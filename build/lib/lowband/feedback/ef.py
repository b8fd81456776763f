"""``ef``: error feedback with residual memory.

Seide et al., "1-Bit Stochastic Gradient Descent and its Application to Data-Parallel
Distributed Training of Speech DNNs" (Interspeech 2014); Karimireddy et al., "Error
Feedback Fixes SignSGD and other Gradient Compression Schemes" (arXiv:1901.09847).

1. x' = x + e        (add what earlier rounds failed to send)
2. send C(x')
3. e  = x' - D(C(x')) (remember what this round failed to send)

Invariant: x' == decoded + e after every round (tested).
"""

from __future__ import annotations

import torch

from lowband.feedback.base import FEEDBACK, Feedback


@FEEDBACK.register("ef")
class ErrorFeedback(Feedback):
    name = "ef"

    def compensate(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return x + self._get(key, "residual", x)

    def update(self, key: str, compensated: torch.Tensor, own_decoded: torch.Tensor) -> None:
        self.state[key]["residual"] = compensated - own_decoded
