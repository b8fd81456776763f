"""The aggregator's hook for what a rank puts on the wire being changed on its way out.

:class:`~lowband.comm.aggregate.Aggregator` calls a :class:`Tamper` after the sender's own guard
ran: ``__call__`` on each input tensor of the ranks it ``applies`` to, ``on_wire`` on the sealed
all-gather buffer (payload, padding, trailer with its CRC-32). The default changes nothing. The
simulated Byzantine attacks and injected payload faults of :mod:`lowband.adversity` implement it,
so that the communication layer never depends on them (docs/architecture.md).
"""

from __future__ import annotations

import torch


class Tamper:
    """Changes nothing; subclasses (:class:`lowband.adversity.attacks.Attack`) rewrite what a rank sends."""

    idle: bool = True  # changes nothing on any rank (the two-phase mean, which has no per-rank bytes, needs it)

    def applies(self, rank: int) -> bool:
        """Whether ``__call__`` rewrites what rank ``rank`` sends."""
        return False

    def __call__(self, x: torch.Tensor, rank: int, step: int, key: str) -> torch.Tensor:
        """What rank ``rank`` sends instead of ``x`` at ``step`` (tensor ``key``)."""
        return x

    def on_wire(self, sealed: torch.Tensor, nbytes: int, rank: int, step: int) -> torch.Tensor:
        """The all-gather buffer rank ``rank`` sends (``nbytes`` payload bytes, padding, trailer)."""
        return sealed
