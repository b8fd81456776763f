"""``qsr``: local SGD/AdamW with the Quadratic Synchronization Rule.

Gu, Lyu, Arora, Zhang, Huang, "A Quadratic Synchronization Rule for Distributed Deep
Learning" (arXiv:2310.14423, ICLR 2024). Local SGD (:mod:`lowband.algorithms.localsgd`)
whose period grows as the learning rate decays, H proportional to 1/lr^2:

1. when a round starts at step t, read the inner optimizer's learning rate
   lr_t = ``param_groups[0]["lr"]`` (the rate the round's first step runs at) and fix
   H = max(H_base, floor((alpha / lr_t)^2)) for the whole round; during the first
   ``warmup_steps`` steps H = H_base (the rule would give huge periods while the rate
   ramps up from almost zero), and when the total ``steps`` is known H is cut to the
   steps left, so the last round ends with training (both as the authors' code does, which
   cuts H only after the warm-up; here the cut applies in the warm-up too);
2. each rank takes H inner steps alone;
3. the ranks average their parameters, as local SGD does: the changes since the last
   synchronisation are averaged (through the chosen compressor and feedback) and
   subtracted from the last synchronised parameters;
4. every rank copies the average into its model and continues; the inner optimizer
   state stays local.

Early on (large lr) the ranks synchronise every H_base steps; as the schedule decays the
rounds lengthen, which the paper shows both saves communication and generalises better
than a constant H or H ~ 1/lr.

Defaults, for AdamW at peak lr 3e-3 decayed by cosine to 3e-4 (the CLI's defaults):
``h_base=4`` is the paper's H_base for Local AdamW (ViT-B: H_base 4, alpha 0.0175 at peak
lr 8e-3). ``alpha=1.2e-3`` keeps H = 4 while lr >= alpha / sqrt(4) = 6e-4 (the first ~78%
of a cosine to 10%) and reaches (1.2e-3 / 3e-4)^2 = 16 = 4 H_base at the end. Scaling
the paper's alpha/peak ratio (2.19) to our peak instead would give alpha 6.6e-3 and a final
H of about (6.6e-3 / 3e-4)^2 = 484, sensible for its ~94k steps but not for a few hundred.

Example::

    algo = QSR(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm,
               QSROptions(h_base=4, alpha=1.2e-3, warmup_steps=20, steps=400))
    scheduler = torch.optim.lr_scheduler.LambdaLR(algo.optimizer, cosine)
    # per step: loss.backward(); algo.step(); algo.zero_grad(); scheduler.step()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lowband.algorithms.base import ALGORITHMS, SyncOptions
from lowband.algorithms.commplan import Setup, Sync, average
from lowband.algorithms.localsgd import LocalSGD

MAX_PERIOD = 2**31  # the rule is clamped here: a tiny lr must not overflow a float
MAX_RATIO = math.sqrt(MAX_PERIOD)


@dataclass(frozen=True)
class QSROptions(SyncOptions):
    """``compress``/``feedback`` apply to the change since the last synchronisation.

    ``warmup_steps`` and ``steps`` have the names of the CLI's ``--warmup-steps`` and
    ``--steps``, which fill them; from Python, pass your schedule's values (0: none/unknown).
    """

    h_base: int = 4  # H_base: the shortest period (used while the lr is large, and in warm-up)
    alpha: float = 1.2e-3  # growth coefficient: H = (alpha / lr)^2 once that exceeds h_base
    warmup_steps: int = 0  # rounds starting in the first warmup_steps steps use h_base
    steps: int = 0  # total training steps: the last round is cut to end with them (0: unknown)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.h_base < 1:
            raise ValueError(f"h_base must be >= 1, got {self.h_base}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0 (0: unknown), got {self.steps}")


def qsr_period(options: QSROptions, step: int, lr: float) -> int:
    """H of a round whose first step has 0-based index ``step`` and runs at learning rate ``lr``."""
    if math.isnan(lr):
        raise ValueError(f"QSR: the learning rate at step {step} is NaN")
    if step < options.warmup_steps or lr <= 0:  # warm-up; at lr 0 nothing moves: keep the base period
        h = options.h_base
    else:
        ratio = options.alpha / lr
        h = max(options.h_base, math.floor(ratio ** 2) if ratio < MAX_RATIO else MAX_PERIOD)
    if options.steps > step:
        h = min(h, options.steps - step)
    return h


@ALGORITHMS.register("qsr")
class QSR(LocalSGD):
    """Local SGD whose period, fixed at the start of each round, follows the learning rate."""

    name = "qsr"
    Options = QSROptions
    elastic = ""  # not under --elastic yet: its period follows the lr schedule, untested with joiners
    options: QSROptions  # type: ignore[assignment]

    @classmethod
    def tail_steps(cls, options: Any, steps: int) -> int:
        return 0  # its period grows with the lr schedule: no fixed H to divide

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """Every ``h_base`` steps, its shortest period: an upper bound on its traffic."""
        return average(options, setup, "outer", options.h_base)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set when the first round starts: a scheduler attached after construction (LambdaLR)
        # changes the lr, so it is read at the round's first step, not here.
        self.current_period = self.options.h_base

    def period(self) -> int:
        """H of the current round (fixed when it started)."""
        return self.current_period

    @torch.no_grad()
    def after_step(self) -> None:
        if self.local_steps == 0:
            # Step 1: the round's first inner step has just run; the scheduler has not stepped
            # yet, so param_groups still hold the lr that step used, the lr at the round's start.
            lr = float(self.optimizer.param_groups[0]["lr"])
            self.current_period = qsr_period(self.options, self.step_count - 1, lr)
        super().after_step()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "period": self.current_period}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.current_period = int(state["period"])
