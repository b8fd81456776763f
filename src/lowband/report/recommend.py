"""The answer a run gives: which method to use on this link, by how much, and what to be careful of.

From a :class:`~lowband.report.summary.Summary` (one run) or a sweep group's rows of means over
seeds (pure, prints nothing):

1. the candidates: the methods that reached the target loss (in a sweep: in every seed) and whose
   loss (a run: best val loss; a sweep: mean final val loss) is within :data:`QUALITY` (10%) of the
   best any method has (a method that reaches an easy target first and then stalls or diverges is
   not a candidate); none: say so and how to get one;
2. **recommended**: the candidate that reached the target first (time to target), with its factor
   against the baseline and its bytes to target;
3. **fewest bytes**: the candidate that reached it with the fewest bytes, if another;
4. **caveats**: methods that never reached the target or ended too far above the best; a runner-up
   within 10% of the winner's time, or (sweeps) whose mean +- spread over seeds overlaps the
   winner's (one run cannot separate them: seed and host noise are of that order here); compute
   per step that differed across methods (:mod:`lowband.report.noise`: then the winner is also
   named by the normalised comparison when that differs).

Shown above the console table, at the top of report.html, by ``lowband report`` and above each
group of a ``lowband bench`` report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowband.net.units import format_bytes, format_seconds
from lowband.report.noise import ComputeCheck
from lowband.report.summary import Summary

CLOSE = 1.10  # a runner-up within 10% of the winner's time to target: too close for one run to call
QUALITY = 1.10  # a candidate's best val loss is at most 10% above the best any method reached


@dataclass(frozen=True)
class Entry:
    """One method as the recommendation sees it: time and bytes to the target (means over seeds in a
    sweep), its loss (best val loss of a run; mean final val loss over a sweep's seeds) and, in a
    sweep, the spread of its time to target and whether every seed reached the target."""

    name: str
    time_s: float | None
    bytes_sent: float | None
    loss: float | None
    time_sd: float | None = None
    every_seed: bool = True

    @property
    def reached(self) -> bool:
        return self.time_s is not None and self.every_seed


def recommendation(summary: Summary) -> list[str]:
    """The recommendation and its caveats for one run, one sentence a line (the first is the answer)."""
    entries = [Entry(r.name, r.time_to_target_s, r.bytes_to_target, r.best_val_loss) for r in summary.rows]
    return recommend(entries, summary.network, summary.target_loss, summary.baseline, check=summary.compute)


def sweep_recommendation(rows: list[dict[str, Any]], network: str, target: float | None, baseline: str) -> list[str]:
    """The same answer for one group of a ``lowband bench`` sweep, from its rows of means over seeds
    (:func:`lowband.bench.sweep_report.group_rows`): a method must reach the target in every seed."""
    entries = [Entry(r["entry"], r["time_to_target_s"]["mean"], r["bytes_to_target"]["mean"],
                     r["final_val_loss"]["mean"], r["time_to_target_s"]["sd"], r["reached"] == r["seeds"])
               for r in rows]
    return recommend(entries, network, target, baseline, loss_word="mean final")


def recommend(entries: list[Entry], network: str, target_loss: float | None, baseline: str,
              loss_word: str = "best", check: ComputeCheck | None = None) -> list[str]:
    """Steps 1-4 of the module docstring over any list of methods (``check``: a run's compute per step
    across methods, for the loaded-host caveat)."""
    if target_loss is None:
        return ["No recommendation: no method logged a validation loss."]
    target = f"val loss {target_loss:.3f}"
    best, reached = _decide(entries)
    if best is None:
        return [f"No recommendation: no method reached {target} (train longer, or give --target-loss)."]
    base = next((e for e in entries if e.name == baseline), None)
    against = "" if best.name == baseline or base is None or not base.time_s or not best.time_s else (
        f", {base.time_s / best.time_s:.1f}x sooner than {baseline}")
    lines = [f"Recommended on {network}: {best.name}, first to {target} "
             f"({format_seconds(best.time_s or 0.0)}{against}, "
             f"{format_bytes(best.bytes_sent or 0)} sent per worker to get there)."]
    fewest = min(reached, key=lambda e: e.bytes_sent or 0.0)
    if fewest is not best and (fewest.bytes_sent or 0) < (best.bytes_sent or 0):
        factor = (best.bytes_sent or 0) / max(fewest.bytes_sent or 1, 1)
        lines.append(f"Fewest bytes to the target: {fewest.name} ({format_bytes(fewest.bytes_sent or 0)}, "
                     f"{factor:.1f}x fewer than {best.name}).")
    return lines + caveats(entries, best, reached, loss_word) + _noise(check, best, reached)


def _decide(entries: list[Entry]) -> tuple[Entry | None, list[Entry]]:
    """The candidates (reached the target, loss within :data:`QUALITY` of the best) and the first of
    them to the target (steps 1-2)."""
    best_loss = min((e.loss for e in entries if e.loss is not None), default=None)
    reached = [e for e in entries if e.reached and best_loss is not None and e.loss is not None
               and e.loss <= QUALITY * best_loss]
    return (min(reached, key=lambda e: e.time_s or 0.0) if reached else None), reached


def caveats(entries: list[Entry], best: Entry, reached: list[Entry], loss_word: str = "best") -> list[str]:
    """What could change the answer (step 4 of the module docstring, less the host's noise)."""
    out = []
    missed = [e.name for e in entries if not e.reached]
    if missed:
        out.append(f"Never reached the target{'' if all(e.every_seed for e in entries) else ' (in every seed)'}: "
                   f"{', '.join(missed)}.")
    weak = [e for e in entries if e.reached and e not in reached]
    if weak:
        out.append(f"Not candidates, their {loss_word} val loss more than "
                   f"{QUALITY - 1:.0%} above the best: " + ", ".join(f"{e.name} ({e.loss:.3f})" for e in weak) + ".")
    close = [e for e in reached if e is not best and _close(e, best)]
    if close:
        names = ", ".join(e.name for e in close)
        if any(e.time_sd is not None for e in [best, *close]):
            out.append(f"Within seed noise of {best.name}'s time: {names} (their spreads over seeds overlap).")
        else:
            out.append(f"Within 10% of {best.name}'s time: {names}; one run cannot separate them "
                       "(repeat with seeds: lowband bench --seeds 0,1,2).")
    return out


def _close(other: Entry, best: Entry) -> bool:
    """A runner-up within 10% of the winner's time, or whose time overlaps it within one spread."""
    mine, theirs = best.time_s or 0.0, other.time_s or 0.0
    overlap = (best.time_sd or 0.0) + (other.time_sd or 0.0)
    return theirs <= CLOSE * mine or theirs - mine <= overlap


def _noise(check: ComputeCheck | None, best: Entry, candidates: list[Entry]) -> list[str]:
    """The loaded-host caveat, naming the normalised winner when it differs."""
    if check is None or not check.flagged:
        return []
    times = {e.name: check.normalised_to_target_s.get(e.name) for e in candidates}
    known = {name: t for name, t in times.items() if t is not None}
    normalised = min(known, key=known.__getitem__) if known else None
    also = "" if normalised in (None, best.name) else f"; normalised, {normalised} is first"
    return [f"Compute per step differed {check.spread:.1f}x across methods: a loaded host may have "
            f"decided the timing{also}."]
