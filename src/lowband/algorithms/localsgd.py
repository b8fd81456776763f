"""``localsgd``: periodic parameter averaging (local SGD, local AdamW).

Stich, "Local SGD Converges Fast and Communicates Little" (arXiv:1805.09767, ICLR 2019);
Lin et al., "Don't Use Large Mini-Batches, Use Local SGD" (arXiv:1808.07217, ICLR 2020).
Every rank trains alone with its own inner optimizer; every ``H`` steps the ranks replace
their parameters by the average over ranks:

1. every rank keeps theta_g, the parameters of the last synchronisation;
2. after H inner steps, each rank forms delta_i = theta_g - theta_i (the change since
   the last synchronisation, negated);
3. the deltas are averaged over ranks: delta = mean_i delta_i (all-reduced in fp32, or
   through any compressor with error feedback: ``compress="qsgd:bits=4"``);
4. theta_g <- theta_g - delta, which is mean_i theta_i exactly (up to rounding): DiLoCo
   with an outer SGD at lr 1 and no momentum;
5. every rank copies theta_g into its model and continues; the inner optimizer state is
   kept, not averaged.

Averaging the changes rather than the parameters themselves gives the same result
uncompressed, but with compression it is what makes compression meaningful: the
compressor sees the update of one round, whose error is a small fraction of it, not the
full weights, whose quantisation or sparsification error would be as large as the update.
Communication drops by a factor of H against data parallel; all ranks apply the same
averaged delta, so their parameters are identical after every round.

``budget="speed"`` gives uneven workers inner-step budgets that follow their measured
speed and weights the average by the work done (:mod:`lowband.algorithms.budget`).

Example::

    algo = LocalSGD(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm,
                    LocalSGDOptions(inner_steps=20))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowband.algorithms.base import ALGORITHMS
from lowband.algorithms.budget import LocalWorkOptions
from lowband.algorithms.commplan import Setup, Sync, average
from lowband.algorithms.diloco import DiLoCo


@dataclass(frozen=True)
class LocalSGDOptions(LocalWorkOptions):
    """``compress``/``feedback`` apply to the change since the last synchronisation.

    ``inner_steps`` defaults to DiLoCo's 20 (also the CLI's ``--inner-steps``, which sets
    both), so ``--algo "diloco;localsgd"`` compares the outer step at equal communication.
    """


@ALGORITHMS.register("localsgd")
class LocalSGD(DiLoCo):
    """DiLoCo whose outer step is plain averaging (outer SGD, lr 1, no momentum)."""

    name = "localsgd"
    Options = LocalSGDOptions
    elastic = "rounds"  # --elastic: blocking averages, committed or redone (lowband.elastic.membership)
    options: LocalSGDOptions  # type: ignore[assignment]

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """The model average through ``compress`` every H steps, blocking."""
        return average(options, setup, "outer", options.inner_steps)

    def build_outer_optimizer(self) -> torch.optim.Optimizer:
        """Step 4: theta_g - 1.0 * mean_i(theta_g - theta_i) = mean_i theta_i; no state to keep."""
        return torch.optim.SGD(self.global_params, lr=1.0, momentum=0.0)
