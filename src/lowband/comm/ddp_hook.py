"""``lowband.ddp_hook``: any lowband compressor and feedback as a torch DDP communication hook.

    state, hook = lowband.ddp_hook(model, compress="powersgd:rank=2", feedback="ef")
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(state, hook)

The hook follows torch's contract ``hook(state, bucket) -> Future[Tensor]`` (see
``torch.distributed.algorithms.ddp_comm_hooks``): it averages the bucket's gradients
through an :class:`~lowband.comm.aggregate.Aggregator` and returns the bucket buffer.
Feedback and compressor state are keyed by parameter name, not bucket index, so they
survive DDP's bucket rebuild after the first iteration; it works on gloo with any number
of buckets (torch's own ``powerSGD_hook`` aborts there with more than one bucket).

Overlap (``overlap=True``, the default): the hook hands the bucket to the aggregator's thread
(:meth:`Aggregator.mean_async`) and returns at once a future that completes, on that thread,
when the bucket's mean is written back, so backward goes on computing earlier layers'
gradients while buckets travel; DDP waits for every future at the end of backward. Every
aggregation runs on the aggregator's one thread in bucket order, so collectives keep one order
on every rank. ``overlap=False`` reduces each bucket inside the hook (blocking), bit-identical.

* ``state.wait_seconds`` (``aggregator.comm.wait_seconds``): the time the thread running
  backward was blocked on the hook's communication. Blocking: the time inside the hook.
  Overlapped: the time from the end of backward's computation until the last bucket's mean
  landed (a callback queued on the autograd engine waits for each future before DDP's own
  wait): the communication not hidden behind backward.
* An error in the aggregation (e.g. :class:`~lowband.comm.aggregate.NonFiniteError`) is raised
  by ``backward()`` with its own type; DDP is then left mid-iteration: stop or rebuild it.
* DDP's own collectives during backward (``find_unused_parameters=True`` all-reduces its
  used-parameter map) go on DDP's group from another thread: give the hook its own group
  (``process_group=dist.new_group()``) so the two never interleave differently on two ranks.
* CUDA (not tested on a GPU with this hook): the aggregator's thread issues its
  kernels on the legacy default stream, which every thread shares, so they queue behind the
  gradients backward made there; the future completes after that stream has synchronised.
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's ``bucket`` annotation
# against ``dist.GradBucket`` at registration, and a string annotation fails that check.
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from lowband.comm.aggregate import Aggregator
from lowband.comm.comm import Comm
from lowband.compress import COMPRESSORS
from lowband.feedback import FEEDBACK
from lowband.feedback.base import pairing_warning
from lowband.net.link import Network
from lowband.registry import resolve

Hook = Callable[["HookState", dist.GradBucket], torch.futures.Future]


@dataclass
class HookState:
    """What the hook needs between calls: the aggregator, parameter names and the mode."""

    aggregator: Aggregator
    names: "dict[int, str]"  # id(parameter) -> name
    calls: int = 0  # buckets reduced so far
    overlap: bool = True  # False: each bucket is reduced inside the hook (blocking)

    @property
    def wait_seconds(self) -> float:
        """Seconds backward was blocked on the hook's communication (see the module docstring)."""
        return self.aggregator.comm.wait_seconds

    def name_of(self, param: torch.Tensor, bucket_index: int, position: int) -> str:
        return self.names.get(id(param), f"bucket{bucket_index}.{position}")

    def state_dict(self) -> dict:
        return self.aggregator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.aggregator.load_state_dict(state)

    def close(self) -> None:
        """Finish the aggregations in flight and stop the threads (before destroying the group)."""
        self.aggregator.close()
        self.aggregator.comm.close()


def ddp_hook(model: Optional[nn.Module] = None, compress: Any = "identity", feedback: Any = "default",
             process_group: Optional[dist.ProcessGroup] = None, network: Optional[Network] = None,
             small_numel: int = 4096, overlap: bool = True, compressor: Any = None) -> Tuple[HookState, Hook]:
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

    ``compress`` and ``feedback``: a name or spec string (``"powersgd:rank=2"``), a registered class,
    or an instance (``lowband.compress.PowerSGD(rank=2)``); ``compressor`` is the older name of
    ``compress``. ``model`` (the module before wrapping) names the parameters so state is keyed by
    name; ``network`` emulates a slow link for the hook's traffic, charged to the hook's ledger
    (``lowband.ledger(state)``); ``overlap`` returns each bucket's future before its mean is computed
    (False: blocks in the hook). ``feedback="default"``: the compressor's own pairing
    (``Compressor.paper_feedback``: ``ef`` for PowerSGD, as torch's ``powerSGD_hook``; ``dgc`` for DGC;
    else none). Feeding back a compressor that is not a contraction warns
    (:func:`lowband.feedback.base.pairing_warning`).
    """
    chosen = resolve(compress if compressor is None else compressor, COMPRESSORS)
    fed_back = resolve(chosen.paper_feedback if isinstance(feedback, str) and feedback == "default" else feedback,
                       FEEDBACK)
    line = pairing_warning(chosen, fed_back)
    if line:
        warnings.warn(line, stacklevel=2)
    comm = Comm(group=process_group, network=network)
    aggregator = Aggregator(comm, chosen, fed_back, tag="grads", small_numel=small_numel)
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    return HookState(aggregator, names, overlap=overlap), _hook


def _hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    grads = bucket.gradients()  # views into bucket.buffer()
    params = bucket.parameters()
    named = [(state.name_of(p, bucket.index(), i), g) for i, (p, g) in enumerate(zip(params, grads))]
    buffer = bucket.buffer()
    state.calls += 1
    future: torch.futures.Future = torch.futures.Future()
    if not state.overlap:
        state.aggregator.mean_(named)
        _copy_back(buffer, grads)
        future.set_result(buffer)
        return future
    if buffer.is_cuda and torch.cuda.current_stream(buffer.device) != torch.cuda.default_stream(buffer.device):
        # The aggregator's thread works on the legacy default stream, which every thread shares, so
        # its kernels queue behind the gradients backward made there; gradients made on a side
        # stream are waited for here instead.
        torch.cuda.current_stream(buffer.device).synchronize()
    state.aggregator.mean_async(named).add_done_callback(partial(_settle, future, buffer, grads))
    _wait_at_end_of_backward(state, future)
    return future


def _settle(future: torch.futures.Future, buffer: torch.Tensor, grads: List[torch.Tensor],
            error: Optional[BaseException]) -> None:
    """Complete ``future`` with the bucket buffer itself (DDP reads the result from it) or the error;
    runs on the aggregator's thread."""
    if error is None:
        try:
            _copy_back(buffer, grads)
            if buffer.is_cuda:  # the mean's kernels, queued on this thread's stream, have finished
                torch.cuda.current_stream(buffer.device).synchronize()
        except Exception as err:  # noqa: BLE001  (the training thread sees it through the future)
            error = err
    if error is None:
        future.set_result(buffer)
    else:
        future.set_exception(error)


def _wait_at_end_of_backward(state: HookState, future: torch.futures.Future) -> None:
    """Queue a callback that waits for ``future`` when backward's computation is over, charging the
    wait to ``wait_seconds`` and raising the aggregation's own error from ``backward()``. Queued
    while DDP marks this bucket ready, it runs before DDP's own wait (queued after the last bucket)."""
    comm = state.aggregator.comm

    def wait() -> None:
        started = time.perf_counter()
        try:
            future.wait()
        finally:
            comm.account_wait(time.perf_counter() - started)

    try:
        torch.autograd.Variable._execution_engine.queue_callback(wait)
    except RuntimeError:  # not inside a backward pass: DDP's own (uncharged) wait is all there is
        pass


def _copy_back(buffer: torch.Tensor, grads: List[torch.Tensor]) -> None:
    """Gradients that are not views into ``buffer`` (older torch) are copied into it."""
    for g, view in zip(grads, _views(buffer, grads)):
        if g.data_ptr() != view.data_ptr():
            view.copy_(g.reshape(-1))


def _views(buffer: torch.Tensor, grads: List[torch.Tensor]) -> List[torch.Tensor]:
    out, offset = [], 0
    for g in grads:
        out.append(buffer[offset:offset + g.numel()])
        offset += g.numel()
    return out
