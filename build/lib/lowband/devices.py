"""Where tensors live: the device rules every layer follows, and the helpers they share.

Rules (a GPU run must never meet a CPU tensor in a device path):

1. every tensor a compressor, feedback, aggregator, guard, rule or algorithm creates is made
   on its input's device (``torch.zeros(n, device=x.device)``), and in its dtype where it matters;
2. randomness that every rank must draw alike (shared-seed indices, sketches, initial factors)
   comes from a CPU generator, so it is the same on any device, and is moved once;
   per-rank noise (dithering) is drawn on the device from :func:`generator`;
3. ``.item()``, ``.tolist()``, ``bool(t)`` on a device tensor wait for the GPU: only where a host
   decision cannot be avoided, each named in a comment ("host sync: ...").

The contract is tested over every registry entry on a stand-in accelerator
(``tests/fakecuda.py``), and on a real GPU by ``tests/test_cuda.py``.
"""

from __future__ import annotations

from typing import Callable

import torch


def generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A generator on ``device`` (seeded when ``seed`` is given), for noise drawn where it is used."""
    g = torch.Generator(device=torch.device(device))
    if seed is not None:
        g.manual_seed(seed)
    return g


def cached(cache: dict[torch.device, torch.Tensor], device: torch.device,
           make: Callable[[torch.device], torch.Tensor]) -> torch.Tensor:
    """A small constant tensor per device, made once by ``make(device)`` (module-level tensors are CPU traps)."""
    t = cache.get(device)
    if t is None:
        t = cache[device] = make(device)
    return t


# -- where a training worker runs (lowband train --device; issue 22) ------------------------------
DEVICE_CHOICES = ("auto", "cpu", "cuda")
NO_CUDA = "no CUDA device: use --device cpu"


def resolve_device(choice: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """The device of the worker with ``local_rank`` among ``local_world_size`` on this machine.

    ``cpu``: the CPU. ``cuda``: GPU ``local_rank`` (one GPU per local worker); no CUDA, or fewer
    GPUs than local workers, raises one line naming the fix. ``auto``: CUDA when
    ``torch.cuda.is_available()`` and every local worker gets a GPU of its own (NCCL runs one
    rank per GPU), else the CPU; every worker of a machine decides alike."""
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"unknown --device {choice!r}; choose one of: {', '.join(DEVICE_CHOICES)}")
    if local_rank < 0 or local_world_size < 1:
        raise ValueError(f"local rank {local_rank} of {local_world_size} workers: torchrun's LOCAL_RANK and "
                         "LOCAL_WORLD_SIZE must be >= 0 and >= 1")
    if choice == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if choice == "auto":
        return torch.device("cuda", local_rank) if available and local_world_size <= count else torch.device("cpu")
    if not available:
        raise ValueError(NO_CUDA)
    if local_rank >= count:
        raise ValueError(f"local worker {local_rank} has no GPU ({count} visible): run at most {count} workers "
                         "per machine with --device cuda, or use --device cpu")
    return torch.device("cuda", local_rank)


def check_gpus(choice: str, workers: int) -> None:
    """Before starting ``workers`` local workers: ``--device cuda`` needs CUDA and one GPU each."""
    if choice != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(NO_CUDA)
    count = torch.cuda.device_count()
    if workers > count:
        raise ValueError(f"--device cuda runs one worker per GPU: {workers} workers, {count} GPUs visible; "
                         f"use --workers {count} or --device cpu")


def backend_for(device: torch.device | str) -> str:
    """The torch.distributed backend for a worker on ``device``: NCCL on CUDA, gloo on the CPU."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "nccl"
    if kind == "cpu":
        return "gloo"
    raise ValueError(f"no process-group backend for device {kind!r}: use --device cpu or cuda")
