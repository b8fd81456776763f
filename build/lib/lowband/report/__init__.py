"""Reports of runs: load a run folder, summarize it, print the table, write plots and report.html."""

from __future__ import annotations

from lowband.report.render import print_summary, show_report, write_report
from lowband.report.summary import AlgorithmSummary, Ratios, Run, Summary, load_run, summarize

__all__ = [
    "AlgorithmSummary",
    "Ratios",
    "Run",
    "Summary",
    "load_run",
    "print_summary",
    "show_report",
    "summarize",
    "write_report",
]
