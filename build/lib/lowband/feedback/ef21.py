"""``ef21``: every worker sends a compressed correction to a running gradient estimate.

Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and
Practically Faster Error Feedback" (arXiv:2106.05203), Algorithm 1.

Worker i keeps g_i, every worker keeps the server estimate g = mean_i g_i (the same on
all ranks, because all of them add the same mean); both start at zero. Per round, with
x_i this round's tensor (gradient) and C the compressor:

1. c_i = C(x_i - g_i)             (``compensate`` returns x_i - g_i; the compressor sends it)
2. g_i = g_i + c_i                (``update``, with c_i = what this rank's payload decoded to)
3. g   = g + mean_i c_i           (``finalize``, with the mean the exchange returned)
4. the algorithm applies g.

Starting from zero, the first round sends C(x_i): the paper's g_i^0 = C(grad f_i(x^0)).
Unlike ``ef`` (which sends x + residual), what is sent shrinks as g_i tracks x_i, and the
applied estimate g stays the average of the g_i exactly (when ``decode`` is linear in the
sum, as for every summable compressor).

Example::

    agg = Aggregator(comm, build("powersgd:rank=2", COMPRESSORS), build("ef21", FEEDBACK))
"""

from __future__ import annotations

import torch

from lowband.feedback.base import FEEDBACK, Feedback


@FEEDBACK.register("ef21")
class EF21(Feedback):
    """State per key: ``g_i`` (this worker's estimate) and ``g`` (the shared estimate)."""

    name = "ef21"

    def compensate(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return x - self._get(key, "g_i", x)

    def update(self, key: str, compensated: torch.Tensor, own_decoded: torch.Tensor) -> None:
        self.state[key]["g_i"] = self.state[key]["g_i"] + own_decoded

    def finalize(self, key: str, mean: torch.Tensor) -> torch.Tensor:
        g = self._get(key, "g", mean) + mean
        self.state[key]["g"] = g
        return g.clone()
