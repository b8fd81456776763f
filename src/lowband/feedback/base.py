"""The feedback contract: what a worker remembers between rounds of compressed communication.

For each tensor, keyed by parameter name (so state survives re-bucketing, checkpoints and
membership changes), an :class:`~lowband.comm.aggregate.Aggregator` calls:

1. ``compensate(key, x) -> x'``: what to compress this round (e.g. x plus the residual);
2. ``update(key, x', own_decoded)``: after encoding, with what this rank's payload decodes to;
3. ``finalize(key, mean) -> result``: the result the algorithm applies (EF21: its running
   estimate; default: the mean itself).
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lowband.registry import Registry


@dataclass(frozen=True)
class FeedbackOptions:
    """Base for feedback options (frozen, validated in ``__post_init__``)."""


class Feedback(ABC):
    """Base class: no memory at all (``none``). Subclasses keep tensors in ``self.state``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[FeedbackOptions]] = FeedbackOptions

    def __init__(self, options: FeedbackOptions | None = None) -> None:
        self.options = options if options is not None else type(self).Options()
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def compensate(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def update(self, key: str, compensated: torch.Tensor, own_decoded: torch.Tensor) -> None:
        pass

    def finalize(self, key: str, mean: torch.Tensor) -> torch.Tensor:
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {key: {k: v.clone() for k, v in tensors.items()} for key, tensors in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {key: {k: v.clone() for k, v in tensors.items()} for key, tensors in state.items()}

    def _get(self, key: str, slot: str, like: torch.Tensor) -> torch.Tensor:
        """The ``slot`` tensor of ``key`` (zeros like ``like`` the first time)."""
        tensors = self.state.setdefault(key, {})
        if slot not in tensors or tensors[slot].shape != like.shape or tensors[slot].dtype != like.dtype:
            tensors[slot] = torch.zeros_like(like)
        return tensors[slot]


FEEDBACK: Registry[type[Feedback]] = Registry("feedback")


@FEEDBACK.register("none")
class NoFeedback(Feedback):
    """Compress the tensor as it is; remember nothing."""

    name = "none"
