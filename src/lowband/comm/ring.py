"""The ring order of collectives (``--ring``): rank order, a given order, or measured (``auto``)."""

from __future__ import annotations

from lowband.comm.comm import Comm


def choose_ring(spec: str, comm: Comm) -> tuple[int, ...]:
    """``'rank'``: rank order; ``'0,2,1,3'``: that order."""
    if spec == "rank":
        return tuple(range(comm.world_size))
    if spec == "auto":
        raise ValueError("--ring auto is not available yet: give an order ('0,2,1,3') or 'rank'")
    order = tuple(int(r) for r in spec.split(","))
    if sorted(order) != list(range(comm.world_size)):
        raise ValueError(f"--ring must be an order of all workers 0..{comm.world_size - 1}, got {spec!r}")
    return order
