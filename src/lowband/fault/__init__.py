"""Surviving the network: membership and quorum, checkpoint/resume, guards (issue #7).

Every algorithm exposes ``state_dict()/load_state_dict()`` covering its communication
state (``lowband.algorithms.base.Algorithm``). ``checkpoint.py`` saves them with the model,
optimizer, scheduler, RNG streams, data position and ledger, atomically, for exact resume
(docs/checkpoints.md). ``quorum.py`` and ``elastic.py``: elastic membership (workers leave
and join a running job; docs/elastic.md).
"""
