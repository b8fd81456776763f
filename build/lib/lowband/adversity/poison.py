"""Data poisoning by a worker: label flipping, a data-side simulated Byzantine attack.

The update attacks of :mod:`lowband.adversity.attacks` change what a rank *sends*; a data attack
changes what it *trains on*: the attacking rank computes an honest gradient of a poisoned
batch, so its contribution looks like any other worker's (Biggio et al., "Poisoning Attacks
against Support Vector Machines", ICML 2012; label flipping as evaluated for
Byzantine-robust aggregation in Karimireddy, He & Jaggi, arXiv:2012.10333, section 6, and
Allen-Zhu et al., arXiv:2012.14368). It is an attack spec like the others, so it goes where
they go::

    lowband train --algo ddp --attack labelflip:ranks=0 --aggregate centered-clip:tau=1
    DDPOptions(attack="labelflip:ranks=1,mode=permute,seed=3")

Steps, on an attacking rank, every training batch:

1. the training loop draws the batch as usual (same data stream as an honest run);
2. :func:`poisoner` maps the targets: ``reverse`` sends class ``y`` to ``C - 1 - y`` (MNIST:
   ``9 - y``; the char-GPT: the vocabulary read backwards; with an odd ``C`` the middle
   class maps to itself), ``permute`` through a fixed seeded derangement of the ``C``
   classes (no class maps to itself);
3. forward, backward and the algorithm's step are unchanged: the aggregator sees an honest
   update of wrong labels (its update transform is the identity).

Ranks are a worker's rank in ``lowband train``; elastic runs (``--elastic``) do not poison data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from lowband.adversity.attacks import ATTACKS, Attack, AttackOptions
from lowband.registry import build

TargetMap = Callable[[torch.Tensor], torch.Tensor]
LABELFLIP_MODES = ("reverse", "permute")


class DataAttack(Attack):
    """An attack on a rank's training data; what it sends is its honest update of that data."""

    data_side: ClassVar[bool] = True

    def __call__(self, x: torch.Tensor, rank: int, step: int, key: str) -> torch.Tensor:
        return x  # the update is honest; the batch was poisoned

    def targets(self, y: torch.Tensor, classes: int) -> torch.Tensor:
        """The targets an attacking rank trains on instead of ``y`` (values in ``[0, classes)``)."""
        raise NotImplementedError


@dataclass(frozen=True)
class LabelFlipOptions(AttackOptions):
    mode: str = "reverse"  # 'reverse': y -> C-1-y; 'permute': a seeded derangement of the classes
    seed: int = 0  # 'permute' only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in LABELFLIP_MODES:
            raise ValueError(f"labelflip: mode must be one of {', '.join(LABELFLIP_MODES)}, got {self.mode!r}")


@ATTACKS.register("labelflip")
class LabelFlip(DataAttack):
    """Label flipping: the attacking ranks train on ``C - 1 - y`` or on a fixed derangement of ``y``."""

    name = "labelflip"
    Options = LabelFlipOptions
    options: LabelFlipOptions

    def __init__(self, options: AttackOptions | None = None) -> None:
        super().__init__(options)
        self._tables: dict[int, torch.Tensor] = {}

    def table(self, classes: int) -> torch.Tensor:
        """The class map as a (classes,) int64 table."""
        # cpu: host data, built once per run and moved to the labels' device by targets()
        if classes < 2:
            raise ValueError(f"labelflip needs at least 2 classes, got {classes}")
        if self.options.mode == "reverse":
            return torch.arange(classes - 1, -1, -1)
        order = torch.randperm(classes, generator=torch.Generator().manual_seed(self.options.seed))
        table = torch.empty(classes, dtype=torch.int64)
        table[order] = order.roll(-1)  # each class to the next one in a random cycle: no fixed point
        return table

    def targets(self, y: torch.Tensor, classes: int) -> torch.Tensor:
        if classes not in self._tables:
            self._tables[classes] = self.table(classes)
        return self._tables[classes].to(y.device)[y]


def poisoner(attack: str, rank: int, classes: int) -> TargetMap:
    """The target map of ``rank`` under attack spec ``attack`` (identity unless it is a data attack
    naming this rank). Built once per run."""
    adversary = build(attack, ATTACKS)
    if not isinstance(adversary, DataAttack) or not adversary.applies(rank):
        return _identity
    # cpu: a one-label probe that validates classes now, not mid-run
    adversary.targets(torch.zeros(1, dtype=torch.int64), classes)
    return lambda y: adversary.targets(y, classes)


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y
