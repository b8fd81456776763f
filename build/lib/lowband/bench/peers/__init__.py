"""Peers: other libraries' algorithms run on lowband's task, over lowband's emulated link.

A peer writes the same run-folder format as ``lowband train`` (``<run>/<label>/rank<r>.jsonl``,
``ledger_rank<r>.jsonl``, its label added to ``run.json``), so ``lowband report`` puts it
next to lowband's own algorithms. See ``docs/peers.md``.

* :mod:`lowband.bench.peers.torch_ddp`: PyTorch's own DDP, ``fp16_compress_hook``,
  ``powerSGD_hook`` and post-local SGD (``torch-ddp``, ``torch-fp16``, ``torch-powersgd``,
  ``torch-postlocal``);
* :mod:`lowband.bench.peers.torchft_diloco`: torchft 0.2.0's DiLoCo and Streaming DiLoCo
  (``torchft-diloco``, ``torchft-streaming``).

``PEERS.get(label)(cfg, run_dir)`` trains that peer on ``cfg.workers`` processes into
``run_dir`` with its default options. Peers are optional: importing this package needs none
of them (each runner imports its module when called; torchft's raises :class:`PeerError`
with the install command when torchft is missing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lowband.registry import Registry
from lowband.train.config import TrainConfig

PeerRunner = Callable[[TrainConfig, Path], None]
PEERS: Registry[PeerRunner] = Registry("peer")
TORCH_LABELS = ("torch-ddp", "torch-fp16", "torch-powersgd", "torch-postlocal")
TORCHFT_LABELS = ("torchft-diloco", "torchft-streaming")


def _torch_runner(label: str) -> PeerRunner:
    def run(cfg: TrainConfig, run_dir: Path) -> None:
        from lowband.bench.peers.torch_ddp import TorchPeerOptions, run_torch

        run_torch(cfg, Path(run_dir), TorchPeerOptions(peer=label))

    run.__doc__ = f"Train PyTorch's {label!r} (default options) on cfg.workers processes into run_dir."
    run.__name__ = f"run_{label.replace('-', '_')}"
    return run


def _torchft_runner(label: str) -> PeerRunner:
    def run(cfg: TrainConfig, run_dir: Path) -> None:
        from lowband.bench.peers.torchft_diloco import run_torchft

        run_torchft(cfg, Path(run_dir), streaming=label == "torchft-streaming")

    run.__doc__ = f"Train torchft's {label!r} (default options) on cfg.workers replicas into run_dir."
    run.__name__ = f"run_{label.replace('-', '_')}"
    return run


for _label in TORCH_LABELS:
    PEERS.register(_label)(_torch_runner(_label))
for _label in TORCHFT_LABELS:
    PEERS.register(_label)(_torchft_runner(_label))


def missing(label: str) -> str | None:
    """Why peer ``label`` cannot run here (its optional package is absent), or None."""
    import importlib.util

    if label in TORCHFT_LABELS and importlib.util.find_spec("torchft") is None:
        return "torchft is not installed (make peers; docs/peers.md)"
    return None
