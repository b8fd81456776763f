"""Start workers through torchrun's launcher API (``torch.distributed.launcher.api``).

``launch(fn, 4, cfg)`` is what ``torchrun --standalone --nproc-per-node 4`` does: a local
c10d rendezvous on a free port of the loopback interface (``bind``), one process per worker with
RANK/WORLD_SIZE set, no restarts. The workers' gloo and NCCL sockets are pinned to ``bind``'s
interface too (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``, unless the user set them): nothing
of a single-machine run listens beyond loopback. ``fn`` must be importable (a module-level function). A failed worker surfaces as
:class:`WorkerFailed` naming the rank and the cause, never as a hang. A termination signal
(SIGTERM, SIGINT) stops the workers and surfaces as :class:`Interrupted`, a ``KeyboardInterrupt`` that no
``except Exception`` swallows: ``lowband bench`` stops instead of going on to the next run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Iterator

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import dynamic_rendezvous
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from lowband.comm.group import pin_sockets, serve_store


class WorkerFailed(RuntimeError):
    """One or more workers exited with an error; the message names ranks and causes."""


class Interrupted(KeyboardInterrupt):
    """A termination signal stopped the run (a ``KeyboardInterrupt``: ``except Exception`` lets it through)."""

    def __init__(self, sigval: int) -> None:
        super().__init__(f"stopped by signal {int(sigval)}")
        self.sigval = int(sigval)


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, bind: str = "127.0.0.1") -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nprocs`` worker processes; returns {rank: return value}.

    The stores listen on ``bind`` only (default loopback: nothing off this machine can reach
    them). TCPStore listens on every interface whatever host it is given, so lowband hosts the
    rendezvous store itself on a socket bound to ``bind`` (the agent joins it, ``is_host=False``)
    and has the agent create the workers' shared store the same way."""
    if nprocs < 1:
        raise ValueError(f"workers must be >= 1, got {nprocs}")
    # the workers' gloo/NCCL sockets on bind's interface too; every temp file of the launch (torch's
    # error files, torchelastic's logs) in a private folder
    with _bound_store(bind) as port, _private_tmp() as tmp, _environment({**pin_sockets(bind), "TMPDIR": tmp}):
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=f"lowband-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d", rdzv_endpoint=f"{bind}:{port}", rdzv_configs={"timeout": 120, "is_host": False},
            max_restarts=0, monitor_interval=0.1, start_method="spawn", local_addr=bind,
        )
        try:
            return elastic_launch(config, fn)(*args)
        except ChildFailedError as err:
            raise WorkerFailed(_describe(err)) from None
        except SignalException as err:  # SIGTERM/SIGINT reached the agent, which stopped the workers:
            raise Interrupted(err.sigval) from None  # stop the caller too


@contextlib.contextmanager
def _private_tmp() -> Iterator[str]:
    """A temp folder only this user can use (mode 0700) for one launch, removed afterwards.

    torch's process starter gives each worker an error file (``pytorch-errorfile-*.pickle``, a
    traceback the launcher unpickles) and torchelastic writes its logs, both in the temp folder:
    in a shared ``/tmp`` they were left behind, readable by everyone, under names another local
    user could create first. Here they live and die in this folder."""
    path = tempfile.mkdtemp(prefix="lowband-launch-")
    saved, tempfile.tempdir = tempfile.tempdir, path
    try:
        yield path
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (the spawned workers inherit it), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _bound_store(host: str) -> Iterator[int]:
    """The rendezvous store, and the workers' shared store torchrun's agent creates after it,
    both listening on ``host`` only, for the run's lifetime; yields the rendezvous port."""
    store = serve_store(host, timeout_s=300)
    handler = dynamic_rendezvous.DynamicRendezvousHandler
    original = handler._create_tcp_store_server
    handler._create_tcp_store_server = lambda self, addr, port: serve_store(host, timeout_s=300)  # type: ignore[method-assign]
    try:
        yield store.port
    finally:
        handler._create_tcp_store_server = original  # type: ignore[method-assign]
        del store


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
