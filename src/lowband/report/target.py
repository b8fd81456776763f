"""The loss that time-to-target and bytes-to-target are measured at.

Order: ``--target-loss`` (or ``lowband report --target-loss``) > the run's configured
``target_loss`` > **automatic**:

1. the baseline (the first algorithm; ddp in a sweep when present) is read at **half its steps**:
   its first evaluation at or after step ``ceil(last step / 2)``;
2. that validation loss is the target. The baseline reaches it by construction, halfway; a method
   worth recommending reaches it within the run, and one that stalls above it shows "never
   reached" instead of setting the bar;
3. with several seeds (a sweep), the largest of the seeds' halfway losses, so the baseline reaches
   it in every seed;
4. a baseline without an evaluation from halfway on (a run cut short) falls back to the earlier
   rule: the largest best validation loss, the lowest loss every algorithm reaches.

Why not the earlier rule alone: the weakest method's best makes the target easy for everyone, so
"time to target" rewarded methods that barely train (issue 28). The one-line origin
(:attr:`Target.origin`) is printed under the table and in report.html.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

Record = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """The target loss, whether it was chosen automatically, what set it and how, in words."""

    loss: float | None
    auto: bool
    setter: str | None
    origin: str


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def halfway(per_rank: Sequence[Sequence[Record]]) -> tuple[float, int, int] | None:
    """``(val loss, its step, last step)`` of the first evaluation at or after half its steps of the
    lowest rank that logged (step 1 of the module docstring); ``None`` without one."""
    records = next((rows for rows in per_rank if rows), None)
    if not records:
        return None
    last = int(records[-1]["step"])
    half = math.ceil(last / 2)
    point = next((r for r in records if int(r["step"]) >= half and _finite(r.get("val_loss"))), None)
    return None if point is None else (float(point["val_loss"]), int(point["step"]), last)


def automatic(baseline: str, halfways: Iterable[tuple[float, int, int] | None],
              bests: dict[str, float | None]) -> Target:
    """The automatic target from the baseline's halfway points (one per seed) or, failing that,
    the largest of ``bests`` (steps 2-4 of the module docstring)."""
    points = list(halfways)
    if points and all(p is not None for p in points):
        loss, step, last = max(p for p in points if p is not None)
        seeds = " (the largest over seeds)" if len(points) > 1 else ""
        return Target(loss, True, baseline, f"automatic: {baseline}'s val loss at step {step} of {last}, "
                                             f"half its steps{seeds}; --target-loss overrides")
    known = {name: best for name, best in bests.items() if best is not None}
    if not known:
        return Target(None, True, None, "no algorithm logged a validation loss")
    setter = max(known, key=known.__getitem__)
    return Target(known[setter], True, setter, f"automatic: {setter}'s best, the lowest val loss every "
                                               f"algorithm reached ({baseline} has no evaluation past half "
                                               "its steps); --target-loss overrides")


def given(loss: float, by: str) -> Target:
    """A target the user set (``by``: "--target-loss" or "the run's target_loss")."""
    return Target(float(loss), False, None, f"set by {by}")
