"""Read a run folder written by the training workers and reduce it to comparable numbers.

A run folder looks like::

    runs/<name>/run.json                 {"config": {...}, "world_size": 4, "network": "...",
                                          "params": 820480, "algorithms": {"ddp": {...}, ...}}
    runs/<name>/<folder>/rank<r>.jsonl    one JSON object per training step per rank; run.json's
                                          "folders" maps each algorithm label to its folder
                                          (labels like "ddp+topk:ratio=0.01" are not paths)

The order of ``algorithms`` in ``run.json`` is the run order and the first algorithm is the
baseline every ratio is taken against. Logs of a crashed run may stop early, miss whole
ranks or end in a half-written line; everything here uses whatever is there.

This module is pure: it reads files and computes, it never prints.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowband.report.noise import ComputeCheck, compute_check
from lowband.report.target import Target, automatic, given, halfway

Record = dict[str, Any]
"""One step of one rank: ``step``, ``loss``, ``tokens``, ``bytes_sent``, ``bytes_received``,
``compute_s``, ``comm_s``, ``time_s`` and, on evaluation steps only, ``val_loss``."""

TRAIN_TAIL = 10
"""Final train loss is the mean of each rank's last ``TRAIN_TAIL`` step losses."""

_RANK_FILE = re.compile(r"rank(\d+)\.jsonl")


@dataclass
class Run:
    """A loaded run folder.

    ``records[algorithm][r]`` is rank ``r``'s list of step records (an empty list when that
    rank wrote nothing). Algorithms keep the run order of ``run.json``; the first is the
    baseline.
    """

    path: Path
    meta: dict[str, Any]
    records: dict[str, list[list[Record]]] = field(default_factory=dict)
    link_busy: dict[str, list[float]] = field(default_factory=dict)  # per rank: seconds the link was busy

    @property
    def name(self) -> str:
        """The run's folder name."""
        return self.path.name

    @property
    def config(self) -> dict[str, Any]:
        """The training flags recorded in ``run.json`` (empty if absent)."""
        return dict(self.meta.get("config") or {})

    @property
    def algorithms(self) -> list[str]:
        """Algorithm names in run order (baseline first)."""
        return list(self.records)


@dataclass(frozen=True)
class AlgorithmSummary:
    """The headline numbers of one algorithm (one table row)."""

    name: str
    ranks: int
    steps: int
    tokens: int
    final_train_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    bytes_sent_per_worker: float
    wall_clock_s: float
    compute_s: float
    comm_s: float
    comm_fraction: float | None
    peak_step_bytes: float  # most bytes one rank sent in one step (steps after the first)
    link_busy_s: float  # mean over ranks: seconds the link carried traffic
    overlap_fraction: float | None  # share of link time hidden behind compute: 1 - exposed / busy
    time_to_target_s: float | None
    bytes_to_target: float | None


@dataclass(frozen=True)
class Ratios:
    """One algorithm against the baseline; ``None`` where a side is missing or zero.

    ``bytes_ratio`` and ``bytes_to_target_ratio`` are baseline / this ("x fewer bytes"),
    the speed-ups are baseline time / this time, ``val_loss_ratio`` is this / baseline.
    """

    name: str
    baseline: str
    bytes_ratio: float | None
    wall_clock_speedup: float | None
    time_to_target_speedup: float | None
    bytes_to_target_ratio: float | None
    val_loss_ratio: float | None


@dataclass(frozen=True)
class Summary:
    """Rows, ratios against the baseline and the target loss that time-to-target used."""

    run_name: str
    world_size: int
    network: str
    params: int | None
    config: dict[str, Any]
    algorithm_options: dict[str, Any]
    baseline: str
    target_loss: float | None
    target_auto: bool
    rows: tuple[AlgorithmSummary, ...]
    ratios: tuple[Ratios, ...]
    target_setter: str | None = None
    """With an automatic target: the algorithm that set it (the baseline, at half its steps)."""
    target_origin: str = ""
    """Where the target came from, in one line (:mod:`lowband.report.target`)."""
    compute: ComputeCheck | None = None
    """Compute per step compared across the algorithms, with normalised times (:mod:`lowband.report.noise`)."""

    def row(self, name: str) -> AlgorithmSummary:
        """The row of algorithm ``name`` (``KeyError`` if it did not run)."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no algorithm {name!r} in this run (have {[r.name for r in self.rows]})")

    def ratio(self, name: str) -> Ratios:
        """The ratios of algorithm ``name`` against the baseline."""
        for ratio in self.ratios:
            if ratio.name == name:
                return ratio
        raise KeyError(f"no algorithm {name!r} in this run (have {[r.name for r in self.ratios]})")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite floats (diverged runs) become ``None``."""
        return _finite(asdict(self))


# ----------------------------------------------------------------------------- loading


def load_run(run_dir: Path | str) -> Run:
    """Load ``run.json`` and every ``<algorithm>/rank<r>.jsonl`` under ``run_dir``.

    Algorithms are ordered as in ``run.json`` (folders it does not list, e.g. from an earlier
    run under the same name, are ignored); listed algorithms without logs are left out. A half-written
    last line is ignored. Raises ``FileNotFoundError`` if ``run.json`` is missing or no
    rank log exists, ``ValueError`` if ``run.json`` or a complete log line is not JSON.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no run.json in {run_dir} (expected {meta_path})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path} is not valid JSON: {err}") from None
    listed = list(meta.get("algorithms") or {})
    folders = {label: (meta.get("folders") or {}).get(label, label) for label in listed}
    if not folders:  # no list in run.json: every folder with rank logs, by name
        folders = {p.name: p.name for p in sorted(run_dir.iterdir()) if p.is_dir() and _rank_files(p)}
    records: dict[str, list[list[Record]]] = {}
    link_busy: dict[str, list[float]] = {}
    for algo, folder in folders.items():
        per_rank = _load_algorithm(run_dir / folder, int(meta.get("world_size") or 0))
        if any(per_rank):
            records[algo] = per_rank
            link_busy[algo] = [_link_busy(run_dir / folder / f"ledger_rank{r}.jsonl") for r in range(len(per_rank))]
    if not records:
        expected = f"{run_dir}/<algorithm>/rank<r>.jsonl"
        raise FileNotFoundError(f"no rank logs in {run_dir} (expected {expected})")
    return Run(path=run_dir, meta=meta, records=records, link_busy=link_busy)


def _rank_files(folder: Path) -> dict[int, Path]:
    """``{rank: path}`` of the ``rank<r>.jsonl`` files in ``folder``."""
    found: dict[int, Path] = {}
    for path in folder.glob("rank*.jsonl"):
        match = _RANK_FILE.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _link_busy(path: Path) -> float:
    """Seconds the rank's link carried training traffic (sum of ledger ``end - start``; 0 if no ledger)."""
    if not path.is_file():
        return 0.0
    records = _read_jsonl(path, key="op")  # the initial broadcast happens before the step clock starts
    return sum(float(r["end"]) - float(r["start"]) for r in records if r.get("tag") != "init")


def _load_algorithm(folder: Path, world_size: int) -> list[list[Record]]:
    """Per-rank records of one algorithm, index = rank; missing ranks are empty lists."""
    files = _rank_files(folder) if folder.is_dir() else {}
    size = max([world_size, *(r + 1 for r in files)])
    return [_read_jsonl(files[r]) if r in files else [] for r in range(size)]


def _read_jsonl(path: Path, key: str = "step") -> list[Record]:
    """The JSON objects of ``path``, one a line; a broken *last* line (crash) is dropped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records: list[Record] = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not valid JSON: {err}") from None
        if isinstance(record, dict) and key in record:
            records.append(record)
    return records


# ----------------------------------------------------------------------------- summary


def summarize(run: Run, target_loss: float | None = None) -> Summary:
    """Reduce ``run`` to one :class:`AlgorithmSummary` per algorithm plus ratios.

    The target loss for time/bytes-to-target is ``target_loss`` if given, else
    ``config["target_loss"]`` if set, else automatic: the baseline's validation loss at half its
    steps (:mod:`lowband.report.target`).
    """
    stats = {algo: _base_stats(run.records[algo], run.link_busy.get(algo, [])) for algo in run.algorithms}
    chosen = _choose_target(run, target_loss, stats)
    target = chosen.loss
    rows = tuple(
        _row(algo, run.records[algo], stats[algo], target) for algo in run.algorithms
    )
    baseline = rows[0]
    meta = run.meta
    return Summary(
        run_name=run.name,
        world_size=int(meta.get("world_size") or max(r.ranks for r in rows)),
        network=str(meta.get("network") or "unknown network"),
        params=meta.get("params"),
        config=run.config,
        algorithm_options={a: (meta.get("algorithms") or {}).get(a, {}) for a in run.algorithms},
        baseline=baseline.name,
        target_loss=target,
        target_auto=chosen.auto,
        rows=rows,
        ratios=tuple(_ratios(row, baseline) for row in rows),
        target_setter=chosen.setter,
        target_origin=chosen.origin,
        compute=compute_check(run.records, {a: _target_step(run.records[a], target) for a in run.algorithms}),
    )


def _choose_target(run: Run, explicit: float | None, stats: dict[str, dict[str, Any]]) -> Target:
    """The target following the argument > config > automatic order (:mod:`lowband.report.target`)."""
    if explicit is not None:
        return given(explicit, "--target-loss")
    configured = run.config.get("target_loss")
    if configured is not None:
        return given(configured, "the run's target_loss")
    baseline = run.algorithms[0] if run.algorithms else ""
    return automatic(baseline, [halfway(run.records.get(baseline, []))],
                     {name: s["best_val_loss"] for name, s in stats.items()})


def _present(per_rank: list[list[Record]]) -> list[list[Record]]:
    """The ranks that logged at least one step."""
    return [records for records in per_rank if records]


def _val_points(records: list[Record]) -> list[Record]:
    """The evaluation records (those with a finite ``val_loss``)."""
    return [r for r in records if _is_finite(r.get("val_loss"))]


def _peak_step_bytes(records: list[Record]) -> float:
    """The most bytes sent in one step, leaving out step 1 (it carries the initial broadcast)."""
    sent = [float(r.get("bytes_sent", 0)) for r in records]
    return max((b - a for a, b in zip(sent, sent[1:])), default=sent[0] if sent else 0.0)


def _base_stats(per_rank: list[list[Record]], link_busy: list[float]) -> dict[str, Any]:
    """Target-independent numbers of one algorithm."""
    ranks = _present(per_rank)
    reference = ranks[0]  # rank 0, or the lowest rank that logged
    vals = [float(r["val_loss"]) for r in _val_points(reference)]
    tails = [[float(r["loss"]) for r in records[-TRAIN_TAIL:] if "loss" in r] for records in ranks]
    tails = [tail for tail in tails if tail]
    compute = _mean([sum(float(r.get("compute_s", 0.0)) for r in records) for records in ranks])
    comm = _mean([sum(float(r.get("comm_s", 0.0)) for r in records) for records in ranks])
    busy = _mean(link_busy) if link_busy else 0.0
    return {
        "ranks": len(ranks),
        "steps": max(int(records[-1]["step"]) for records in ranks),
        "tokens": sum(int(records[-1].get("tokens", 0)) for records in ranks),
        "final_train_loss": _mean([_mean(tail) for tail in tails]) if tails else None,
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        "bytes_sent_per_worker": _mean([float(rs[-1].get("bytes_sent", 0)) for rs in ranks]),
        "wall_clock_s": max(float(records[-1].get("time_s", 0.0)) for records in ranks),
        "compute_s": compute,
        "comm_s": comm,
        "comm_fraction": comm / (compute + comm) if compute + comm > 0 else None,
        "peak_step_bytes": max(_peak_step_bytes(records) for records in ranks),
        "link_busy_s": busy,
        "overlap_fraction": max(0.0, 1.0 - comm / busy) if busy > 0 else None,
    }


def _row(
    name: str, per_rank: list[list[Record]], stats: dict[str, Any], target: float | None
) -> AlgorithmSummary:
    """Add time/bytes-to-target (rank 0's first eval at or below ``target``) to ``stats``."""
    reached = _reached(per_rank, target)
    return AlgorithmSummary(
        name=name,
        time_to_target_s=float(reached["time_s"]) if reached else None,
        bytes_to_target=float(reached["bytes_sent"]) if reached else None,
        **stats,
    )


def _reached(per_rank: list[list[Record]], target: float | None) -> Record | None:
    """Rank 0's (or the lowest logging rank's) first evaluation at or below ``target``."""
    if target is None:
        return None
    return next((r for r in _val_points(_present(per_rank)[0]) if r["val_loss"] <= target), None)


def _target_step(per_rank: list[list[Record]], target: float | None) -> int | None:
    reached = _reached(per_rank, target)
    return None if reached is None else int(reached["step"])


def _ratios(row: AlgorithmSummary, base: AlgorithmSummary) -> Ratios:
    """``row`` against the baseline ``base``."""
    return Ratios(
        name=row.name,
        baseline=base.name,
        bytes_ratio=_div(base.bytes_sent_per_worker, row.bytes_sent_per_worker),
        wall_clock_speedup=_div(base.wall_clock_s, row.wall_clock_s),
        time_to_target_speedup=_div(base.time_to_target_s, row.time_to_target_s),
        bytes_to_target_ratio=_div(base.bytes_to_target, row.bytes_to_target),
        val_loss_ratio=_div(row.final_val_loss, base.final_val_loss),
    )


# ----------------------------------------------------------------------------- helpers


def _div(num: float | None, den: float | None) -> float | None:
    """``num / den``, or ``None`` if either is missing or ``den`` is zero."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def _mean(values: list[float]) -> float:
    """Arithmetic mean of a non-empty list."""
    return sum(values) / len(values)


def _is_finite(value: Any) -> bool:
    """True for a real, finite number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite(value: Any) -> Any:
    """Recursively replace NaN/inf with ``None`` and tuples with lists (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
