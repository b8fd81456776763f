"""lowband inside your own training script: the public API (docs/api.md).

Under ``torchrun --nproc-per-node N your_train.py``::

    import lowband

    rt = lowband.init()                                   # process group, device, a Comm with a ledger
    model = MyModel().to(rt.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    algo = lowband.wrap(model, opt, "diloco", comm=rt.comm, inner_steps=20)
    for x, y in batches:
        loss = model(x.to(rt.device), y.to(rt.device))
        loss.backward()
        algo.step()                                       # inner step; every H steps the outer step
        algo.zero_grad()
    algo.finish()                                         # land what is in flight
    print(lowband.ledger(algo).bytes_sent)
    lowband.save("ckpt.pt", model, opt, algo, step=step)  # communication state included

or keep DDP and change only what crosses the wire::

    state, hook = lowband.ddp_hook(model, compress=lowband.compress.PowerSGD(rank=2), feedback="ef")
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(state, hook)

The same validation as the command line: options are checked on construction (one line naming
the valid ones) and feeding back the error of a compressor that is not a contraction warns.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowband.algorithms import ALGORITHMS, Algorithm
from lowband.comm import Comm, Ledger, group
from lowband.comm.aggregate import Aggregator
from lowband.comm.ddp_hook import HookState, ddp_hook  # noqa: F401  (lowband.ddp_hook)
from lowband.compress import COMPRESSORS, paper_feedback
from lowband.devices import backend_for, resolve_device
from lowband.feedback import FEEDBACK
from lowband.feedback.base import pairing_warning
from lowband.net.link import Network
from lowband.registry import build, options_from, parse_spec
from lowband.train.checkpoint import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class Runtime:
    """This process in the run: its rank, the world, its device and a :class:`Comm` counting every byte."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    comm: Comm


def init(device: str = "auto", network: Network | str | None = None, timeout_s: float = 300.0) -> Runtime:
    """Join the process group torchrun describes (a plain ``python`` process: a world of one).

    ``device`` as ``lowband train --device``: ``auto`` (GPU ``LOCAL_RANK`` with NCCL when every local
    worker has one, else the CPU with gloo), ``cuda`` or ``cpu``. ``network``: emulate a slow link for
    the Comm's traffic, ``"100mbit/20ms"`` or a :class:`Network` (default: none, the real wire)."""
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    chosen = resolve_device(device, local_rank, local_world)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)  # before the group: NCCL uses the current device
    rank, world_size = group.init_from_env(backend_for(chosen), timeout_s)
    return Runtime(rank, world_size, local_rank, chosen, Comm(network=_network(network, world_size)))


def _network(network: Network | str | None, world_size: int) -> Network | None:
    if network is None or isinstance(network, Network):
        return network
    bandwidth, sep, latency = network.partition("/")
    if not sep:
        raise ValueError(f"network must be 'bandwidth/latency' like '100mbit/20ms', got {network!r}")
    return Network.parse(bandwidth, latency, world_size)


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, algo: str = "diloco", comm: Comm | None = None,
         grad_clip: float = 0.0, **options: Any) -> Algorithm:
    """A lowband algorithm driving ``optimizer`` on ``model``, for your own loop (``step()``,
    ``zero_grad()``, ``finish()``; ``with algo:`` around ``optimizer.step()`` works too).

    ``algo``: a name or spec (``"diloco"``, ``"diloco:inner_steps=50"``); ``options``: its Options as
    keyword arguments (``inner_steps=20, compress="qsgd:bits=4", feedback="ef"``), over the spec's; a
    compressor given without a feedback gets its own pairing (``Compressor.paper_feedback``: PowerSGD ef).
    ``comm``: default a :class:`Comm` over the default process group (no emulated link)."""
    cls, spec_options = parse_spec(algo, ALGORITHMS)
    given = {**spec_options, **options}
    if isinstance(given.get("compress"), str) and "feedback" not in given:  # the compressor's own pairing
        given["feedback"] = paper_feedback(given["compress"])
    chosen = options_from(cls.Options, None, given)  # unknown names: one line
    if hasattr(chosen, "compress") and hasattr(chosen, "feedback"):
        line = pairing_warning(build(chosen.compress, COMPRESSORS), build(chosen.feedback, FEEDBACK), chosen.compress)
        if line:
            warnings.warn(line, stacklevel=2)
    return cls(model, optimizer, comm if comm is not None else Comm(), chosen, grad_clip=grad_clip)


def ledger(source: Any) -> Ledger:
    """Every byte and second sent so far by ``source``: an algorithm, a DDP hook's state, a
    :class:`Runtime`, a :class:`Comm` or an aggregator (``.bytes_sent``, ``.records``)."""
    if isinstance(source, Ledger):
        return source
    if isinstance(source, Comm):
        return source.ledger
    if isinstance(source, (Algorithm, Runtime, Aggregator)):
        return source.comm.ledger
    if isinstance(source, HookState):
        return source.aggregator.comm.ledger
    raise TypeError(f"no ledger in a {type(source).__name__}: give an algorithm, a ddp_hook state, a Runtime or a Comm")


def save(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         algo: Algorithm | HookState | None = None, **extra: Any) -> None:
    """Model, optimizer and every piece of communication state (compressor, feedback, outer
    optimizer, averages in flight: they land first) in one file, atomically, with a SHA-256
    digest next to it (``<path>.sha256``, checked by :func:`load`). ``extra``: tensors and plain
    values of your own (the step, the data position). Call it on every rank, each with its own path
    where the state differs per rank (feedback memories do)."""
    state: dict[str, Any] = {"algorithm": algo.state_dict() if algo is not None else None}
    state.update(model=model.state_dict(), optimizer=optimizer.state_dict() if optimizer is not None else None,
                 ledger=ledger(algo).state_dict() if algo is not None else None, extra=extra)
    save_checkpoint(Path(path), state)


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         algo: Algorithm | HookState | None = None) -> dict[str, Any]:
    """Restore what :func:`save` wrote into these objects (built as before); returns its ``extra``.
    A file that fails its digest, is not one of these, or misses a part raises one line naming it."""
    state = load_checkpoint(Path(path), require_digest=True)
    missing = [part for part, given in (("optimizer", optimizer), ("algorithm", algo)) if given is not None
               and state.get(part) is None]
    if "model" not in state or missing:
        raise ValueError(f"checkpoint {path} holds no {', '.join(missing or ['model'])} state: save it with "
                         "lowband.save(path, model, optimizer, algo)")
    if algo is not None:
        algo.load_state_dict(state["algorithm"])
        if state.get("ledger") is not None:
            ledger(algo).load_state_dict(state["ledger"])
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return dict(state.get("extra") or {})
