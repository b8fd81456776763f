"""Elastic membership: workers leave and join a running job (docs/elastic.md).

``quorum.py`` decides each outer step's members and whether it commits; ``membership.py`` holds
the synchronisation of the DiLoCo family and localsgd under a changing membership, with verified
state transfer to joiners; ``decentralized.py`` (gossip) and ``overlapped.py`` (eager, delayed,
co2, streaming) add their protocols to :data:`MEMBERSHIPS`; each algorithm names the one that drives
it (``Algorithm.elastic``) and the membership composes with it through ``Algorithm.attach``. The driver and the worker loop are in
:mod:`lowband.train` (``elastic.py``, ``elastic_worker.py``).
"""

from lowband.elastic import decentralized, membership, overlapped  # noqa: F401  (register their entries)
from lowband.elastic.membership import MEMBERSHIPS, membership_for

__all__ = ["MEMBERSHIPS", "membership_for"]
