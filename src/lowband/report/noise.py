"""Verdicts a loaded host cannot flip: compute per step checked across the algorithms of a run.

Every algorithm of a run trains the same model on the same batches for the same steps, so its
compute per step should be about the same. When the host is shared (another job, a noisy
neighbour, fewer cores than workers), one algorithm may be measured on a loaded machine and
another on an idle one, and "3.6x slower" then describes the host, not the method. This module

1. takes each algorithm's **median compute seconds per step** (per rank, over the steps it
   computed; averaged over ranks): a median ignores a few slow steps, not a sustained load;
2. compares them: a spread (slowest / fastest median) above :data:`SPREAD_LIMIT` is flagged;
3. gives a **normalised** comparison beside the raw one: each algorithm timed as if every step
   cost the fastest median (the least loaded measurement) plus its own exposed communication,
   on rank 0: ``reference x computed steps + sum(comm_s)``, in total and up to the target.

Caveats the report states: compute per step also differs for real when methods do different
work (compression and decompression run on the training thread and count as compute; a
zeroth-order method runs no backward), which the normalisation hides; and ``comm_s`` of a
loaded run still includes waiting for loaded peers. This module is pure: it never prints.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]

SPREAD_LIMIT = 1.25  # the threshold: medians differing by more than 25% are not host noise here


@dataclass(frozen=True)
class ComputeCheck:
    """The compute-per-step comparison of one run (see the module docstring)."""

    per_step_s: dict[str, float]  # median compute seconds per step, per algorithm
    reference_s: float  # the fastest median: the step cost every algorithm is normalised to
    spread: float  # slowest median / fastest median
    normalised_s: dict[str, float]  # reference x computed steps + exposed communication (rank 0)
    normalised_to_target_s: dict[str, float | None]  # the same up to the step that reached the target

    @property
    def flagged(self) -> bool:
        """The medians differ by more than :data:`SPREAD_LIMIT`: raw time verdicts may be the host's."""
        return self.spread > SPREAD_LIMIT


def compute_check(records: dict[str, list[list[Record]]], target_steps: dict[str, int | None]) -> ComputeCheck | None:
    """The check over ``records`` (algorithm -> per-rank step records, run order); ``target_steps`` is
    the step at which each algorithm reached the target (None: never). None without two algorithms
    that computed steps."""
    medians = {name: m for name, per_rank in records.items() if (m := _median_per_step(per_rank)) is not None}
    if len(medians) < 2:
        return None
    reference = min(medians.values())
    if reference <= 0:
        return None
    normalised, to_target = {}, {}
    for name in medians:
        rank0 = next(r for r in records[name] if r)
        normalised[name] = _normalised(rank0, reference, None)
        step = target_steps.get(name)
        to_target[name] = None if step is None else _normalised(rank0, reference, step)
    return ComputeCheck(per_step_s=medians, reference_s=reference, spread=max(medians.values()) / reference,
                        normalised_s=normalised, normalised_to_target_s=to_target)


def _median_per_step(per_rank: list[list[Record]]) -> float | None:
    """Mean over ranks of each rank's median ``compute_s`` over the steps it computed (idle iterations
    of compute-aware budgets have no ``loss`` and are left out); step 1 (start-up) too."""
    medians = []
    for records in per_rank:
        values = [float(r["compute_s"]) for r in records if "loss" in r and "compute_s" in r and r.get("step", 0) > 1]
        if values:
            medians.append(statistics.median(values))
    return sum(medians) / len(medians) if medians else None


def _normalised(records: list[Record], reference: float, until: int | None) -> float:
    """``reference`` x the steps computed + the communication seconds, up to step ``until`` (all if None)."""
    rows = [r for r in records if until is None or int(r.get("step", 0)) <= until]
    computed = sum(1 for r in rows if "loss" in r)
    return reference * computed + sum(float(r.get("comm_s", 0.0)) for r in rows)


def speedup(check: ComputeCheck, baseline: str, name: str, to_target: bool = False) -> float | None:
    """Normalised baseline time / ``name``'s (> 1: ``name`` is faster), or None where one is missing."""
    table = check.normalised_to_target_s if to_target else check.normalised_s
    base, this = table.get(baseline), table.get(name)
    if base is None or this is None or this <= 0:
        return None
    return base / this


def warning(check: ComputeCheck) -> str:
    """The one line a flagged run prints: which medians differ and by how much."""
    slow = max(check.per_step_s, key=check.per_step_s.__getitem__)
    fast = min(check.per_step_s, key=check.per_step_s.__getitem__)
    return (f"compute per step differs {check.spread:.1f}x between algorithms ({slow} "
            f"{check.per_step_s[slow]:.3g} s, {fast} {check.per_step_s[fast]:.3g} s median): a loaded host, or "
            f"methods that compute differently; time verdicts below are also given normalised to "
            f"{check.reference_s:.3g} s/step")
