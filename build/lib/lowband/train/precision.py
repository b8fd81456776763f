"""``--device`` and ``--precision``: where a worker trains, and in which precision (issue 22).

``--precision`` (:data:`PRECISIONS`):

* ``fp32``: as before, no autocast;
* ``bf16``: ``torch.autocast(device.type, torch.bfloat16)`` around every forward pass (training
  and evaluation); parameters, gradients and optimizer state stay fp32. Real on the CPU too;
* ``fp16``: autocast to float16 and a :class:`torch.amp.GradScaler` (on the CPU too): the loss is
  scaled before ``backward``, the gradients are unscaled before the algorithm's step (so clipping
  and anything the algorithm does with them see true gradients), and an inner step whose
  gradients hold inf/NaN is skipped.

fp16 and the step counters. A skipped step is decided by each rank alone, from its own
gradients, so fp16 is accepted only for algorithms that communicate parameters, not gradients
(:func:`fp16_tolerant`: the DiLoCo family, local SGD, QSR, CO2, NoLoCo, gossip). They count inner
steps and synchronise every H of them; a rank that skips an inner step **still counts it**
(``Algorithm.step()`` runs in full, only the inner optimizer's ``step()`` does nothing), so every
rank reaches each synchronisation at the same iteration, and a skipped step is a step whose
update was zero. The learning-rate schedule advances too, as with ``GradScaler.step``. Each rank's
loss scale follows its own overflows (nothing about it crosses the wire). Algorithms that average
gradients every step (ddp, ddp-backup) or replace the inner optimizer's update (onebit-adam,
dist-lion, dion, zo-onebyte) are refused with fp16: one rank skipping alone would leave the
ranks apart, and an overflowing gradient would reach the aggregator (which excludes or refuses
non-finite contributions, docs/robustness.md) or the algorithm's own state. Use bf16 there
(no loss scale needed). fp16 runs are not resumable yet (the loss scale is not checkpointed).

The skip is made without touching the algorithms: while ``algo.step()`` runs, the inner
optimizer's ``step`` is replaced by one that applies the update only when every gradient is
finite (:func:`finite_steps_only`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch

from lowband.algorithms import ALGORITHMS, Algorithm
from lowband.devices import DEVICE_CHOICES, NO_CUDA
from lowband.registry import parse_spec

if TYPE_CHECKING:
    from lowband.train.config import TrainConfig

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_MISSING = object()


def fp16_tolerant(algorithm: type[Algorithm]) -> bool:
    """Whether ``algorithm`` tolerates a rank skipping an inner step alone: its ``step()`` is
    :class:`Algorithm`'s (reduce, clip, the inner optimizer's step, count, ``after_step``) and it
    communicates no gradients between backward and the inner step."""
    return (algorithm.step is Algorithm.step and algorithm.reduce_gradients is Algorithm.reduce_gradients
            and not algorithm.zeroth_order)


def check_config(cfg: "TrainConfig") -> None:
    """Validate ``cfg.device`` and ``cfg.precision`` (one line naming the fix); called on construction."""
    if cfg.device not in DEVICE_CHOICES:
        raise ValueError(f"unknown --device {cfg.device!r}; choose one of: {', '.join(DEVICE_CHOICES)}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown --precision {cfg.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(NO_CUDA)
    if cfg.elastic and (cfg.device == "cuda" or cfg.precision != "fp32"):
        raise ValueError("--elastic trains on the CPU in fp32 for now: drop --device cuda and --precision")
    if cfg.net == "netns" and cfg.device == "cuda":
        raise ValueError("--net netns shapes sockets, which NCCL bypasses between GPUs of one machine: "
                         "use --net model with --device cuda")
    if cfg.precision != "fp16":
        return
    refused = [a for a in cfg.algos if not fp16_tolerant(parse_spec(a, ALGORITHMS)[0])]
    if refused:
        raise ValueError(f"--precision fp16 skips overflowing steps rank by rank, which only local-update algorithms "
                         f"tolerate (the DiLoCo family, localsgd, qsr, co2, noloco, gossip), not "
                         f"{', '.join(refused)}: use --precision bf16")
    if cfg.resume:
        raise ValueError("--precision fp16 runs cannot --resume yet (the loss scale is not checkpointed): "
                         "use --precision bf16, or a new --name")


def device_choice(cfg: "TrainConfig") -> str:
    """``cfg.device``, except ``auto`` means the CPU where GPUs are not supported yet
    (``--net netns``: NCCL would bypass the shaped links)."""
    return "cpu" if cfg.device == "auto" and cfg.net == "netns" else cfg.device


@dataclasses.dataclass
class Precision:
    """One algorithm run's precision on ``device``: autocast for forward passes, with fp16 a
    loss scaler and the count of inner steps it skipped. Build one per algorithm run."""

    name: str
    device: torch.device
    scaler: torch.amp.GradScaler | None = dataclasses.field(init=False, default=None)
    skipped: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"unknown precision {self.name!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.name == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: fp32, no autocast)."""
        return PRECISIONS[self.name]

    def autocast(self) -> ContextManager[Any]:
        """The context for a forward pass (and its loss)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, of the scaled loss with fp16."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, algo: Algorithm) -> None:
        """``algo.step()``; with fp16: unscale the gradients first, skip the inner optimizer's update
        if any is inf/NaN (the algorithm still counts the step), then update the loss scale."""
        if self.scaler is None:
            algo.step()
            return
        self.scaler.unscale_(algo.optimizer)
        with finite_steps_only(algo.optimizer) as skipped:
            algo.step()
        self.skipped += skipped[0]
        self.scaler.update()

    def metrics(self) -> dict[str, Any]:
        """For the metrics row at each evaluation: fp16's loss scale and skipped inner steps."""
        if self.scaler is None:
            return {}
        return {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped}


@contextlib.contextmanager
def finite_steps_only(optimizer: torch.optim.Optimizer) -> Iterator[list[int]]:
    """Within: ``optimizer.step()`` applies its update only if every gradient is finite; yields a
    one-element list counting the steps it skipped. The optimizer's own ``step`` (an lr scheduler
    wraps it per instance) is put back on exit."""
    own = vars(optimizer).get("step", _MISSING)
    real = optimizer.step
    skipped = [0]

    def step(*args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # host sync: skip or step is a host decision (GradScaler.step makes the same one)
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            skipped[0] += 1
            optimizer._opt_called = True  # type: ignore[attr-defined]  # the schedule moves on, as with GradScaler
            return None
        return real(*args, **kwargs)

    optimizer.step = step  # type: ignore[method-assign]
    try:
        yield skipped
    finally:
        if own is _MISSING:
            del optimizer.step
        else:
            optimizer.step = own  # type: ignore[method-assign]
