"""lowband: train deep networks across many workers over slow links."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def ddp_hook(*args: Any, **kwargs: Any) -> Any:
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``; see :mod:`lowband.comm.ddp_hook`."""
    from lowband.comm.ddp_hook import ddp_hook as build

    return build(*args, **kwargs)
