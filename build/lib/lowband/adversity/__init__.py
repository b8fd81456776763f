"""Adversity, simulated: attacks on the wire and on the data, stragglers, injected faults.

What the layers below must survive, made to happen on purpose (docs/robustness.md,
docs/stragglers.md): ``attacks.py`` (Byzantine ranks rewriting what they send: the aggregator's
:class:`~lowband.comm.tamper.Tamper` hook), ``poison.py`` (label flipping), ``stragglers.py``
(slow or late ranks), ``injection.py`` (``LOWBAND_FAULT``: kill, hang, corrupt, NaN).
Every registry fills itself here.
"""

from lowband.adversity import attacks, injection, poison, stragglers  # noqa: F401  (register their entries)
from lowband.adversity.attacks import ATTACKS

__all__ = ["ATTACKS"]
