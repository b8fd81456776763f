"""Joins and departures of an elastic run (``<run>/<algo>/events.jsonl``) for the report's timelines."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from lowband.report.summary import Run

STYLE = {"leave": ("tab:red", "worker left"), "join": ("tab:green", "worker joined")}


def membership_events(run: "Run") -> list[dict[str, Any]]:
    """Every ``join``/``leave`` event of every algorithm folder of ``run`` (none for non-elastic runs)."""
    folders = run.meta.get("folders") or {a: a for a in run.algorithms}
    out = []
    for algo in run.algorithms:
        path = run.path / folders.get(algo, algo) / "events.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                break  # a line torn by a kill
            if event.get("event") in STYLE:
                out.append(event)
    return out


def mark_membership(ax: "Axes", run: "Run", x_key: str) -> None:
    """Vertical lines where workers left (red) and joined (green), on an x axis of ``step`` or ``time_s``."""
    labelled: set[str] = set()
    for event in membership_events(run):
        if x_key not in event:
            continue
        color, label = STYLE[event["event"]]
        ax.axvline(float(event[x_key]), color=color, linestyle=":", linewidth=1.2,
                   label=None if label in labelled else label)
        labelled.add(label)
