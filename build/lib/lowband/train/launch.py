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
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import RendezvousError, dynamic_rendezvous
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from lowband.comm.group import pin_sockets, serve_store
from lowband.train.nodes import Nodes
from lowband.train.shutdown import stop_on_signal

TORCH_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")  # what a failed launch dumps
JOIN_TIMEOUT_S = 600  # several machines: how long a node waits for the others (torchrun's default)


class WorkerFailed(RuntimeError):
    """One or more workers exited with an error; the message names ranks and causes."""


class RendezvousFailed(RuntimeError):
    """The machines of a run could not meet (endpoint taken or unreachable, a node never joined)."""


class Interrupted(KeyboardInterrupt):
    """A termination signal stopped the run (a ``KeyboardInterrupt``: ``except Exception`` lets it through)."""

    def __init__(self, sigval: int, detail: str = "") -> None:
        super().__init__(f"stopped by signal {int(sigval)}" + (f", {detail}" if detail else ""))
        self.sigval = int(sigval)


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, bind: str = "127.0.0.1",
           nodes: Nodes | None = None, log_file: Path | None = None) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nprocs`` worker processes; returns {rank: return value} of this machine's ranks.

    The stores listen on ``bind`` only (default loopback: nothing off this machine can reach
    them). TCPStore listens on every interface whatever host it is given, so lowband hosts the
    rendezvous store itself on a socket bound to ``bind`` (the agent joins it, ``is_host=False``)
    and has the agent create the workers' shared store the same way.

    With ``nodes`` of several machines (:class:`lowband.train.nodes.Nodes`), this is one machine's
    ``torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT``: node 0 hosts the
    rendezvous store on HOST:PORT, every node waits (up to :data:`JOIN_TIMEOUT_S`) for the others.

    ``log_file``: torchelastic's and torch's process starter's warnings and errors (a failed
    worker's traceback: ~40 lines) go there instead of the terminal, which gets the one line of
    :class:`WorkerFailed`; the file is only created when something is logged."""
    if nprocs < 1:
        raise ValueError(f"workers must be >= 1, got {nprocs}")
    nodes = nodes or Nodes()
    # the workers' gloo/NCCL sockets on bind's interface too; every temp file of the launch (torch's
    # error files, torchelastic's logs) in a private folder
    with _bound_store(bind, nodes) as endpoint, _private_tmp() as tmp, _logs_to(log_file), \
            _environment({**pin_sockets(bind), "TMPDIR": tmp}):
        config = LaunchConfig(
            min_nodes=nodes.nnodes, max_nodes=nodes.nnodes, nproc_per_node=nprocs,
            run_id=f"lowband-{nodes.rdzv_endpoint}" if nodes.multi else f"lowband-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d", rdzv_endpoint=endpoint,
            rdzv_configs={"timeout": JOIN_TIMEOUT_S if nodes.multi else 120, "is_host": False},
            max_restarts=0, monitor_interval=0.1, start_method="spawn", local_addr=bind,
        )
        try:
            with stop_on_signal():  # SIGTERM/SIGINT: every worker killed at once, even mid-start
                return elastic_launch(config, fn)(*args)
        except ChildFailedError as err:
            raise WorkerFailed(_describe(err)) from None
        except RendezvousError as err:  # another node never came, or the endpoint is unreachable
            raise RendezvousFailed(f"the rendezvous at {endpoint} failed ({type(err).__name__}): "
                                   f"{_last_line(str(err))}") from None
        except SignalException as err:  # SIGTERM/SIGINT reached the agent, which stopped the workers:
            raise Interrupted(err.sigval) from None  # stop the caller too


@contextlib.contextmanager
def _logs_to(path: Path | None) -> Iterator[None]:
    """torchelastic's and the process starter's log records into ``path`` (created when the first
    record comes) instead of the terminal, for the launch; nothing changes when ``path`` is None."""
    if path is None:
        yield
        return
    handler = _LazyFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in TORCH_LOGGERS]
    saved = [(lg.propagate, lg.handlers[:]) for lg in loggers]
    for lg in loggers:
        lg.propagate, lg.handlers = False, [handler]
    try:
        yield
    finally:
        for lg, (propagate, handlers) in zip(loggers, saved):
            lg.propagate, lg.handlers = propagate, handlers
        handler.close()


class _LazyFileHandler(logging.FileHandler):
    """A file handler whose file (and folder) appear with the first record."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=True)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        super().emit(record)


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
def _bound_store(host: str, nodes: Nodes) -> Iterator[str]:
    """The rendezvous store, and the workers' shared store torchrun's agent creates after it,
    both listening on ``host`` only, for the run's lifetime; yields the rendezvous endpoint.

    One machine: the rendezvous store on a free port of ``host``. Several: node 0 serves it on
    ``--rdzv-endpoint``, the other nodes only join it."""
    if nodes.multi:
        rdzv_host, port = nodes.endpoint()
        try:
            store = serve_store(rdzv_host, port, timeout_s=300) if nodes.node_rank == 0 else None
        except OSError as err:
            raise RendezvousFailed(f"--rdzv-endpoint {nodes.rdzv_endpoint}: node 0 cannot listen there "
                                   f"({err.strerror or err}): choose a free port") from None
        endpoint = f"{rdzv_host}:{port}"
    else:
        store = serve_store(host, timeout_s=300)
        endpoint = f"{host}:{store.port}"
    handler = dynamic_rendezvous.DynamicRendezvousHandler
    original = handler._create_tcp_store_server
    handler._create_tcp_store_server = lambda self, addr, port: serve_store(host, timeout_s=300)  # type: ignore[method-assign]
    try:
        yield endpoint
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
