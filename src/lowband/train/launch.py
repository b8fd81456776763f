"""Start workers through torchrun's launcher API (``torch.distributed.launcher.api``).

``launch(fn, 4, cfg)`` is what ``torchrun --standalone --nproc-per-node 4`` does: a local
c10d rendezvous on a free port, one process per worker with RANK/WORLD_SIZE set, no
restarts. ``fn`` must be importable (a module-level function). A failed worker surfaces as
:class:`WorkerFailed` naming the rank and the cause, never as a hang.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


class WorkerFailed(RuntimeError):
    """One or more workers exited with an error; the message names ranks and causes."""


def launch(fn: Callable[..., Any], nprocs: int, *args: Any) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nprocs`` worker processes; returns {rank: return value}."""
    if nprocs < 1:
        raise ValueError(f"workers must be >= 1, got {nprocs}")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=f"lowband-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", rdzv_configs={"timeout": 120},
        max_restarts=0, monitor_interval=0.1, start_method="spawn",
    )
    try:
        return elastic_launch(config, fn)(*args)
    except ChildFailedError as err:
        raise WorkerFailed(_describe(err)) from None


def _describe(err: ChildFailedError) -> str:
    lines = []
    for rank, failure in sorted(err.failures.items()):
        cause = _last_line(failure.message) if failure.message else f"exit code {failure.exitcode}"
        if failure.exitcode is not None and failure.exitcode < 0:
            cause = f"killed by signal {-failure.exitcode}"
        lines.append(f"worker rank {rank} failed: {cause}")
    return "; ".join(lines)


def _last_line(message: Any) -> str:
    if isinstance(message, dict):  # error file payload: {"message": "...", "extraInfo": {...}}
        message = message.get("message", message)
    text = str(message).strip()
    return text.splitlines()[-1] if text else "unknown error"
