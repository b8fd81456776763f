"""What a worker remembers between rounds: error feedback. Every module registers itself in FEEDBACK."""

from typing import Any

from lowband.feedback.base import FEEDBACK, Feedback, FeedbackOptions
from lowband.registry import class_named, import_submodules

import_submodules(__name__, __path__)

__all__ = ["FEEDBACK", "Feedback", "FeedbackOptions"]


def __getattr__(name: str) -> Any:
    """Every registered class by its class name: ``lowband.feedback.EF21``."""
    return class_named(FEEDBACK, name)
