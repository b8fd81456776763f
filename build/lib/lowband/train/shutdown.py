"""Clean, prompt stops: what a driver does with SIGTERM and SIGINT (Ctrl-C) while its workers run.

torchrun's agent answers a termination signal by forwarding it to its workers, then waits up to
30 s (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) before SIGKILL. Two things made that slow, measured on 2
cores with 64 workers: a Ctrl-C reaches every worker too, and a worker still importing torch (its
C extension: 20-40 s of start-up under that load) only raises ``KeyboardInterrupt`` once the import
returns, then tears torch down; and a signal that lands while the agent is still starting the
workers finds no process list (the agent's ``_pc`` is unset), so nobody stops the ones already
started and the driver's exit waits for each of them to fail on its own (42 s for 20).

:func:`stop_on_signal` (around a launch) therefore

* kills the driver's worker processes with SIGKILL at the first signal (its ``multiprocessing``
  children, and any spawned child not listed yet: the signal may land mid-start; not its resource
  tracker, which unlinks their semaphores once the driver is gone), reaps them (bounded), then
  raises torch's ``SignalException`` inside the agent (its usual path: the launch ends as
  :class:`~lowband.train.launch.Interrupted`) or ``Interrupted`` outside it;
* starts the workers with SIGINT blocked: the terminal's Ctrl-C is the driver's to handle, no
  worker prints its own ``KeyboardInterrupt`` traceback;
* ignores (beyond killing the workers again) every later signal, so that cleanup (temp folders,
  network namespaces) runs to its end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing import resource_tracker
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator

import torch.multiprocessing
from torch.distributed.elastic.multiprocessing import api as elastic_api
from torch.distributed.elastic.multiprocessing.api import SignalException

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # torchrun's agent's four
REAP_S = 5.0  # how long a stop waits for SIGKILLed workers to be gone (a process in D state may take longer)


@dataclasses.dataclass
class _State:
    active: bool = False
    signum: int | None = None  # the first signal, once one came


_state = _State()


def stop_children(reap_s: float = REAP_S) -> int:
    """SIGKILL every worker process this process started (its ``multiprocessing`` children, and a
    spawned one whose start a signal interrupted) and reap them, waiting at most ``reap_s`` in all;
    returns how many there were."""
    children = multiprocessing.active_children()
    listed = {child.pid for child in children}
    strays = [pid for pid in _spawned_children() if pid not in listed]
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    count, deadline = len(children) + len(strays), time.monotonic() + reap_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    while strays and time.monotonic() < deadline:  # not multiprocessing's to reap: ours
        strays = [pid for pid in strays if not _reaped(pid)]
        if strays:
            time.sleep(0.01)
    return count


def _spawned_children() -> list[int]:
    """This process's children started by ``multiprocessing``'s spawn (from /proc: ppid, cmdline)."""
    me, found = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] != me:
                continue
            if b"multiprocessing.spawn" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    return found


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True


@contextlib.contextmanager
def handling(handler: Callable[[int, FrameType | None], Any],
             signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """``handler`` for ``signals`` while the block runs, the previous handlers back afterwards; off the
    main thread (where Python cannot set handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


@contextlib.contextmanager
def stop_on_signal() -> Iterator[None]:
    """While the block runs, SIGTERM, SIGINT, SIGHUP and SIGQUIT kill this process's workers at once
    and stop it with :class:`~lowband.train.launch.Interrupted` (see the module docstring). Usable as
    a decorator; a nested use, or one off the main thread, changes nothing."""
    from lowband.train.launch import Interrupted

    if _state.active or threading.current_thread() is not threading.main_thread():
        yield
        return
    handler, start = elastic_api._terminate_process_handler, torch.multiprocessing.start_processes
    elastic_api._terminate_process_handler = _in_agent  # what torchrun's agent registers when it starts workers
    torch.multiprocessing.start_processes = _starting(start)  # type: ignore[assignment]
    _state.active, _state.signum = True, None
    try:
        with handling(_outside_agent):
            yield
    except SignalException as err:  # a signal after the agent returned: torch's exception, ours to convert
        raise Interrupted(err.sigval) from None
    finally:
        elastic_api._terminate_process_handler = handler
        torch.multiprocessing.start_processes = start
        _state.active, _state.signum = False, None


def _first(signum: int) -> bool:
    """Record ``signum``; True when it is the first signal (the caller stops the run)."""
    if _state.signum is None:
        _state.signum = signum
        return True
    stop_children(reap_s=0.0)  # a later signal: the workers once more, nothing raised
    return False


def _in_agent(signum: int, frame: FrameType | None) -> None:
    """The handler torchrun's agent registers (in place of its own) when it starts the workers."""
    if _first(signum):
        stop_children()
        raise SignalException(f"stopped by signal {signum}", sigval=signal.Signals(signum))


def _outside_agent(signum: int, frame: FrameType | None) -> None:
    """The handler around the launch, before torchrun's agent starts workers (there are none yet)."""
    from lowband.train.launch import Interrupted

    if _first(signum):
        stop_children()
        raise Interrupted(signum)


def _starting(start: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.multiprocessing.start_processes`` with SIGINT blocked in the workers it starts (a
    blocked signal stays blocked across exec). The agent's other threads still take a SIGINT meanwhile,
    and Python runs the handler in this thread; without one it waits for the end of the loop."""

    def start_processes(*args: Any, **kwargs: Any) -> Any:
        resource_tracker.ensure_running()  # started first: starting it unblocks SIGINT and SIGTERM (bpo-33613)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return start(*args, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    return start_processes
