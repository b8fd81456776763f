"""The answer a run gives: which method to use on this link, by how much, and what to be careful of.

From a :class:`~lowband.report.summary.Summary` (pure, prints nothing):

1. the methods that reached the target loss and whose best validation loss is within
   :data:`QUALITY` (10%) of the best any method reached (the automatic target is the weakest
   method's best, which a method that stalls or diverges reaches first: it is not a candidate);
   none: say so and how to get one;
2. **recommended**: the candidate that reached the target first (time to target), with its factor
   against the baseline and its bytes to target;
3. **fewest bytes**: the candidate that reached it with the fewest bytes, if another;
4. **caveats**: methods that never reached the target or ended too far above the best; a runner-up within 10% of the winner's
   time (one run cannot separate them: seed and host noise are of that order here); compute per
   step that differed across methods (:mod:`lowband.report.noise`: then the winner is also named
   by the normalised comparison when that differs).

Shown above the console table, at the top of report.html, and by ``lowband report``.
"""

from __future__ import annotations

from lowband.net.units import format_bytes, format_seconds
from lowband.report.noise import ComputeCheck
from lowband.report.summary import AlgorithmSummary, Summary

CLOSE = 1.10  # a runner-up within 10% of the winner's time to target: too close for one run to call
QUALITY = 1.10  # a candidate's best val loss is at most 10% above the best any method reached


def recommendation(summary: Summary) -> list[str]:
    """The recommendation and its caveats, one sentence a line (the first is the answer)."""
    if summary.target_loss is None:
        return ["No recommendation: no method logged a validation loss."]
    target = f"val loss {summary.target_loss:.3f}"
    best_loss = min((r.best_val_loss for r in summary.rows if r.best_val_loss is not None), default=None)
    reached = [r for r in summary.rows if r.time_to_target_s is not None and best_loss is not None and
               r.best_val_loss is not None and r.best_val_loss <= QUALITY * best_loss]
    if not reached:
        return [f"No recommendation: no method reached {target} (train longer, or give --target-loss)."]
    best = min(reached, key=lambda r: r.time_to_target_s or 0.0)
    lines = [f"Recommended on {summary.network}: {best.name}, first to {target} "
             f"({format_seconds(best.time_to_target_s)}{_against(best, summary)}, "
             f"{format_bytes(best.bytes_to_target or 0)} sent per worker to get there)."]
    fewest = min(reached, key=lambda r: r.bytes_to_target or 0.0)
    if fewest is not best and (fewest.bytes_to_target or 0) < (best.bytes_to_target or 0):
        factor = (best.bytes_to_target or 0) / max(fewest.bytes_to_target or 1, 1)
        lines.append(f"Fewest bytes to the target: {fewest.name} ({format_bytes(fewest.bytes_to_target or 0)}, "
                     f"{factor:.1f}x fewer than {best.name}).")
    return lines + caveats(summary, best, reached)


def caveats(summary: Summary, best: AlgorithmSummary, reached: list[AlgorithmSummary]) -> list[str]:
    """What could change the answer (step 4 of the module docstring)."""
    out = []
    missed = [r.name for r in summary.rows if r.time_to_target_s is None]
    if missed:
        out.append(f"Never reached the target: {', '.join(missed)}.")
    weak = [r for r in summary.rows if r.time_to_target_s is not None and r not in reached]
    if weak:
        out.append(f"Not candidates, their best val loss more than {QUALITY - 1:.0%} above the best: "
                   + ", ".join(f"{r.name} ({r.best_val_loss:.3f})" for r in weak) + ".")
    close = [r.name for r in reached if r is not best and (r.time_to_target_s or 0) <= CLOSE * (best.time_to_target_s or 0)]
    if close:
        out.append(f"Within 10% of {best.name}'s time: {', '.join(close)}; one run cannot separate them "
                   "(repeat with seeds: lowband bench --seeds 0,1,2).")
    check = summary.compute
    if check is not None and check.flagged:
        normalised = _normalised_best(check, reached)
        also = "" if normalised in (None, best.name) else f"; normalised, {normalised} is first"
        out.append(f"Compute per step differed {check.spread:.1f}x across methods: a loaded host may have "
                   f"decided the timing{also}.")
    return out


def _normalised_best(check: ComputeCheck, reached: list[AlgorithmSummary]) -> str | None:
    times = {r.name: check.normalised_to_target_s.get(r.name) for r in reached}
    known = {name: t for name, t in times.items() if t is not None}
    return min(known, key=known.__getitem__) if known else None


def _against(best: AlgorithmSummary, summary: Summary) -> str:
    if best.name == summary.baseline:
        return ""
    ratio = summary.ratio(best.name).time_to_target_speedup
    return "" if ratio is None else f", {ratio:.1f}x sooner than {summary.baseline}"
