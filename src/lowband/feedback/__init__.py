"""What a worker remembers between rounds: error feedback. Every module registers itself in FEEDBACK."""

from lowband.feedback.base import FEEDBACK, Feedback, FeedbackOptions
from lowband.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["FEEDBACK", "Feedback", "FeedbackOptions"]
