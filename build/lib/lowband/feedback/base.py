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

from lowband.compress.base import Compressor
from lowband.registry import Registry, options_from


@dataclass(frozen=True)
class FeedbackOptions:
    """Base for feedback options (frozen, validated in ``__post_init__``)."""


class Feedback(ABC):
    """Base class: no memory at all (``none``). Subclasses keep tensors in ``self.state``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[FeedbackOptions]] = FeedbackOptions

    def __init__(self, options: FeedbackOptions | None = None, **kwargs: Any) -> None:
        """``EF21(EF21Options(...))`` or with the options as keyword arguments."""
        self.options = options_from(type(self).Options, options, kwargs)
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


def pairing_warning(compressor: Compressor, feedback: Feedback, spec: str | None = None) -> str | None:
    """Why feeding back ``compressor``'s error diverges, or None: error feedback needs a contraction
    (:meth:`~lowband.compress.Compressor.is_contraction`), else its residual grows without bound
    (``spec``: how the user wrote the compressor, for the message).
    The CLI, ``lowband.ddp_hook`` and ``lowband.wrap`` all warn with this line."""
    if feedback.name == "none" or compressor.is_contraction():
        return None
    return (f"{spec or compressor.name} is not a contraction (its error can exceed its input), so {feedback.name}'s "
            "residual grows without bound; use no feedback (--feedback none, feedback='none'), or a contraction "
            "(topk, sign, powersgd; randomk or sketch with unbiased=false); docs/compression.md")


@FEEDBACK.register("none")
class NoFeedback(Feedback):
    """Compress the tensor as it is; remember nothing."""

    name = "none"
