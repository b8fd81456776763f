"""Benchmark results: load a run folder, summarize it, print and write reports."""

from __future__ import annotations

from lowband.bench.report import print_summary, show_report, write_report
from lowband.bench.summary import AlgorithmSummary, Ratios, Run, Summary, load_run, summarize

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
