"""Every algorithm keeps its state, and every tensor it makes, on the parameters' device.

Issue 22 ("lowband on GPUs: device-correct everywhere"). Each entry of ``ALGORITHMS`` (so a new
algorithm is covered without editing this file) runs a few steps at world size 1 (``Comm()``
without a process group) on the stand-in accelerator of ``tests/fakecuda.py``: parameters,
batches and buffers are device tensors; an op mixing them with a CPU tensor raises
``DeviceMismatchError``. Asserted for each:

* it trains past at least one synchronisation (H = 2, 5 steps), ``metrics()``,
  ``evaluation_parameters()`` and ``finish()`` included, without a device mismatch;
* the parameters are still device tensors, in their dtype;
* every tensor of ``state_dict()`` is on the device (but what torch itself keeps on the CPU on a
  GPU too: optimizers' 0-dim ``step`` counters, generator states; :func:`host_side`);
* a checkpoint saved on the CPU (every tensor moved to the CPU) loads into a fresh run on the
  device with its state on the device, and that run steps on;
* every host sync (``.item()``, ``.tolist()``, ``bool(t)`` on a device tensor) happens in a file of
  :data:`SYNC_ALLOWLIST`, whose reason says why a host decision is unavoidable there. The syncs
  are printed per algorithm (run with ``-s`` to see them).

At world size 1 algorithms skip their communication, so each also runs on :class:`MirrorComm`, rank
0 of a stand-in world of 2 whose other rank mirrors it: the world > 1 paths run (all-to-all,
neighbour exchange, wire metadata), and every tensor handed to a collective must be on the device,
as NCCL requires. Algorithms that cannot run there are named in :data:`MIRROR_SKIPPED`.

Run: ``.venv/bin/pytest -q -s tests/test_device_algorithms.py``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Iterator

import pytest
import torch
from torch import nn

import fakecuda
from lowband.algorithms import ALGORITHMS, Algorithm
from lowband.comm import Comm
from lowband.comm.comm import Handle
from tiny import batch, one_step, tiny_gpt

H = 2  # inner steps (or the algorithm's equivalent) between synchronisations
STEPS = 5  # passes two synchronisations, and onebit-adam's freeze (freeze_step = H)

# source file (as fakecuda reports it, relative to src/lowband/) -> why a host sync there is unavoidable
SYNC_ALLOWLIST: dict[str, str] = {
    "algorithms/base.py": "consensus_distance() returns a Python float for the metrics row (gossip, noloco; "
                          "once per evaluation)",
    "algorithms/zo_onebyte.py": "the step's byte is quantised on the host from l+ and l- (one sync for both), "
                                "and the gathered bytes choose, on the host, whose perturbations to regenerate "
                                "and the next quantiser step (one sync)",
    "algorithms/budget.py": "budget='speed': the gathered seconds per step set each rank's inner-step budget, "
                            "a host decision (one sync per synchronisation)",
    # not algorithm code: every aggregator call goes through it (comm/aggregate.py); documented there as
    # the host decision to send or not, one sync per checked list (today two per mean_: the inputs and
    # the summed payload)
    "comm/guards.py": "all_finite(): whether this rank's contribution (and the summed payload) is finite "
                       "decides on the host whether it is sent or the round redone",
}

# algorithm name -> why it cannot run at world size 1 on the device (none so far; never skip silently)
SKIPPED: dict[str, str] = {}

# algorithm name -> why it cannot run on MirrorComm (a stand-in world of 2 without a process group)
MIRROR_SKIPPED: dict[str, str] = {
    "ddp-backup": "its arrival protocol (adversity/stragglers.Arrivals) needs torchrun's TCPStore and a real second "
                  "rank; at world size 1 it is plain ddp, covered by test_algorithm_stays_on_device",
}

# (name, options) beyond each algorithm's defaults, for code paths the defaults do not reach
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("diloco", {"budget": "speed"}),
    ("localsgd", {"budget": "speed", "weighting": "normalised"}),
    ("diloco", {"outer_optimizer": "adam"}),
    ("co2", {"asynchronous": False}),
    ("dion", {"scalar_optimizer": "lion"}),
    ("dion", {"rank": 1}),
    ("dist-lion", {"vote": "average"}),
]

# option name -> value that makes the algorithm synchronise within STEPS
SMALL = {"inner_steps": H, "h_base": H, "period": 1, "freeze_step": H}


def options_for(name: str, extra: dict[str, Any] | None = None) -> Any:
    cls = ALGORITHMS.get(name).Options
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in SMALL.items() if k in fields}, **(extra or {}))


class _Patch:
    """The one monkeypatch method fakecuda needs, for use outside a test's fixture."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        self.monkeypatch.setattr(obj, name, value)


def to_device(model: nn.Module) -> nn.Module:
    """Replace every parameter (ties kept) and buffer of ``model`` by a device copy (call inside the mode)."""
    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(fakecuda.to_device(p.data), requires_grad=p.requires_grad)
                module._parameters[key] = moved[id(p)]
        for key, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[key] = fakecuda.to_device(b)
    return model


class MirrorComm(Comm):
    """Rank 0 of a world of 2 whose other rank holds the same tensors, so every collective completes
    locally; it stands for NCCL: a tensor handed to a collective must be on the device.

    At world size 1 algorithms skip their communication; this runs their world > 1 paths (wire
    metadata, all-to-all, neighbour exchange) on the device without a process group."""

    def __init__(self) -> None:
        super().__init__()
        self.world_size, self.ring = 2, (0, 1)
        self.device = fakecuda.DEVICE  # where NCCL takes tensors
        self.calls: Counter[str] = Counter()  # collectives by name (each one checks its tensors' device)

    def _on_device(self, op: str, *tensors: torch.Tensor) -> None:
        self.calls[op] += 1
        for t in tensors:
            if not isinstance(t, fakecuda.DeviceTensor):
                raise fakecuda.DeviceMismatchError(f"{op} of a CPU tensor {tuple(t.shape)} {t.dtype} "
                                                   f"(at {fakecuda._where()}): NCCL rejects it")

    def _done(self, result: Any, async_op: bool) -> Any:
        return Handle(self, None, result) if async_op else result

    def all_reduce(self, tensor: torch.Tensor, average: bool = False, async_op: bool = False, tag: str = "") -> Any:
        self._on_device("all_reduce", tensor)
        if not average:
            tensor.mul_(2)
        return self._done(tensor, async_op)

    def all_gather(self, tensor: torch.Tensor, async_op: bool = False, tag: str = "") -> Any:
        self._on_device("all_gather", tensor)
        return self._done([tensor.clone(), tensor.clone()], async_op)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False, tag: str = "") -> Any:
        self._on_device("broadcast", tensor)
        return self._done(tensor, async_op)

    def all_to_all(self, tensor: torch.Tensor, async_op: bool = False, tag: str = "") -> Any:
        self._on_device("all_to_all", tensor)
        mine = tensor.reshape(-1).chunk(2)[0]  # both ranks send their chunk 0 to rank 0
        return self._done(torch.cat([mine, mine]).view_as(tensor), async_op)

    def sendrecv(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], async_op: bool = False,
                 tag: str = "") -> Any:
        self._on_device("sendrecv", *sends.values(), *recvs.values())
        for peer, t in recvs.items():
            t.copy_(sends[peer])
        return self._done(recvs, async_op)

    def monitor_all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._on_device("monitor_all_reduce", tensor)
        return tensor.mul_(2)

    def barrier(self) -> None:
        pass

    def send(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("MirrorComm: point-to-point send has no mirror")

    recv = send


def build(name: str, extra: dict[str, Any] | None = None, comm: Comm | None = None) -> Algorithm:
    """``name`` at world size 1 (or on ``comm``) on a tiny GPT whose parameters are on the device (inside the mode)."""
    model = to_device(tiny_gpt())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    comm = Comm() if comm is None else comm
    return ALGORITHMS.get(name)(model, optimizer, comm, options_for(name, extra), grad_clip=1.0)


def train(algo: Algorithm, steps: range) -> None:
    model = algo.model
    for step in steps:
        one_step(model, algo, *(fakecuda.to_device(t) for t in batch(0, step)))


def tensors(state: Any, path: str = "state") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a nested state (dicts, lists, tuples) with its path."""
    if isinstance(state, torch.Tensor):
        yield path, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from tensors(v, f"{path}[{k!r}]")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from tensors(v, f"{path}[{i}]")


def host_side(path: str, t: torch.Tensor) -> bool:
    """State torch itself keeps on the CPU on a GPU too: optimizers' 0-dim ``step`` counters (unless
    ``capturable``) and generator states (``torch.Generator.get_state()`` is a CPU byte tensor)."""
    return (path.endswith("['step']") and t.dim() == 0) or \
        (t.dtype == torch.uint8 and any(k in path.lower() for k in ("generator", "rng")))


def off_device(state: Any) -> list[str]:
    """Paths of the tensors of ``state`` not on the device (:func:`host_side` ones excepted)."""
    return [f"{path}: {type(t).__name__} {t.device} {tuple(t.shape)}" for path, t in tensors(state)
            if not isinstance(t, fakecuda.DeviceTensor) and not host_side(path, t)]


def to_cpu(state: Any) -> Any:
    """``state`` with every tensor a plain CPU copy (a checkpoint saved on the CPU)."""
    if isinstance(state, torch.Tensor):
        return fakecuda.to_cpu(state)
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state


def check_parameters(algo: Algorithm, dtypes: list[torch.dtype]) -> None:
    for (n, p), dtype in zip(algo.model.named_parameters(), dtypes):
        assert isinstance(p, fakecuda.DeviceTensor), f"{algo.name}: parameter {n} left the device ({type(p)})"
        assert p.dtype == dtype, f"{algo.name}: parameter {n} changed dtype {dtype} -> {p.dtype}"


def check_syncs(label: str, mode: fakecuda.FakeAccelerator) -> None:
    print(f"\n{label}: host syncs {dict(mode.syncs) or 'none'}; device<->CPU copies {dict(mode.transfers) or 'none'}")
    outside = {where: n for where, n in mode.syncs.items() if where.rsplit(":", 1)[0] not in SYNC_ALLOWLIST}
    assert not outside, (f"{label}: host syncs outside SYNC_ALLOWLIST: {outside}; avoid them or add the file with "
                         "the reason a host decision is unavoidable there")


def run_on_device(name: str, extra: dict[str, Any] | None, monkeypatch: pytest.MonkeyPatch,
                  comm: type[Comm] = Comm) -> None:
    label = name + (f" {extra}" if extra else "") + (f" ({comm.__name__})" if comm is not Comm else "")
    with fakecuda.fake_accelerator(_Patch(monkeypatch)) as mode:
        algo = build(name, extra, comm())
        dtypes = [p.dtype for p in algo.model.parameters()]
        train(algo, range(STEPS))
        metrics = algo.metrics()
        with algo.evaluation_parameters():
            x, y = (fakecuda.to_device(t) for t in batch(0, STEPS))
            algo.model(x, y)
        check_parameters(algo, dtypes)
        state = algo.state_dict()
        assert not off_device(state), f"{label}: state off the device: {off_device(state)}"
        assert not off_device(algo.optimizer.state_dict()), f"{label}: inner optimizer state off the device"
        checkpoint = to_cpu(state)

        # a checkpoint saved on the CPU resumes on the device
        resumed = build(name, extra, comm())
        resumed.load_state_dict(checkpoint)
        assert not off_device(resumed.state_dict()), \
            f"{label}: state off the device after loading a CPU checkpoint: {off_device(resumed.state_dict())}"
        train(resumed, range(STEPS, STEPS + H))
        check_parameters(resumed, dtypes)
        algo.finish()
        resumed.finish()
        if isinstance(algo.comm, MirrorComm):
            print(f"\n{label}: collectives {dict(algo.comm.calls)}")
            assert algo.comm.calls, f"{label}: nothing was communicated on a world of 2"
        check_parameters(algo, dtypes)
        assert not off_device(algo.state_dict()), f"{label}: state off the device after finish()"
        del metrics
    check_syncs(label, mode)


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_algorithm_stays_on_device(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    run_on_device(name, None, monkeypatch)


@pytest.mark.parametrize("comm", [Comm, MirrorComm], ids=["world1", "mirror2"])
@pytest.mark.parametrize("name,extra", VARIANTS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in e.items())}"
                                                      for n, e in VARIANTS])
def test_variant_stays_on_device(name: str, extra: dict[str, Any], comm: type[Comm],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if comm is MirrorComm and name in MIRROR_SKIPPED:
        pytest.skip(MIRROR_SKIPPED[name])
    run_on_device(name, extra, monkeypatch, comm)


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_algorithm_stays_on_device_with_two_ranks(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The world > 1 paths (what crosses the wire must be on the device, as NCCL wants) on :class:`MirrorComm`."""
    if name in MIRROR_SKIPPED:
        pytest.skip(MIRROR_SKIPPED[name])
    run_on_device(name, None, monkeypatch, MirrorComm)
