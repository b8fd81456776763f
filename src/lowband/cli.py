"""``lowband``: the command line.

    lowband train [flags]      train across workers over an emulated link, then report
    lowband report RUN_DIR     rebuild the table, plots and report.html of a run folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from rich.console import Console

from lowband.registry import Registry

COMMANDS: Registry[Callable[[list[str]], int]] = Registry("command")
console = Console(stderr=True, highlight=False, soft_wrap=True)


@COMMANDS.register("train")
def train(argv: list[str]) -> int:
    """Start ``--workers`` processes through torchrun's launcher API and train."""
    from lowband.train.config import config_from_args
    from lowband.train.launch import WorkerFailed, launch
    from lowband.train.worker import main as worker_main

    cfg = config_from_args(argv)
    console.print(f"[bold]lowband[/bold]: {cfg.model} on {cfg.data}, {cfg.workers} workers, "
                  f"link {cfg.bandwidth} / {cfg.latency}, {cfg.steps} steps each of: {', '.join(cfg.algos)}")
    try:
        launch(worker_main, cfg.workers, cfg)
    except WorkerFailed as err:
        console.print(f"[red]error[/red]: {err}")
        return 1
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: per-rank metrics written so far are kept in the run folder")
        return 130
    return 0


@COMMANDS.register("report")
def report(argv: list[str]) -> int:
    """Rebuild summary.json, summary.md, the plots and report.html from a run folder."""
    from lowband.bench.report import show_report

    parser = argparse.ArgumentParser(prog="lowband report", description=report.__doc__)
    parser.add_argument("run_dir", type=Path, help="a folder written by lowband train (runs/<name>)")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="validation loss for time-to-target (default: the best loss every algorithm reaches)")
    args = parser.parse_args(argv)
    try:
        show_report(args.run_dir, args.target_loss)
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]error[/red]: {err}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        run = COMMANDS.get(command)
    except ValueError as err:
        console.print(f"[red]error[/red]: {err}")
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
