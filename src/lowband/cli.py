"""``lowband``: the command line.

    lowband train [flags]      train across workers over an emulated link, then report
    lowband report RUN_DIR     rebuild the table, plots and report.html of a run folder
    lowband plan [flags]       predict wall-clock and bytes of every algorithm (no training)
    lowband simulate RUN_DIR   project a measured run to other workers, model size and network
"""

from __future__ import annotations

import argparse
import signal
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
    from lowband.net.netns import NetnsUnavailable
    from lowband.train.launch import WorkerFailed
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from lowband.train.run import run

    cfg = config_from_args(argv)
    console.print(f"[bold]lowband[/bold]: {cfg.model} on {cfg.data}, {cfg.workers} workers, "
                  f"link {cfg.bandwidth} / {cfg.latency} ({cfg.net}), {cfg.steps} steps each of: {', '.join(cfg.algos)}")
    try:
        run(cfg)
    except NetnsUnavailable as err:
        console.print(f"[red]error[/red]: {err}")
        return 2
    except WorkerFailed as err:
        console.print(f"[red]error[/red]: {err}")
        return 1
    except (KeyboardInterrupt, SignalException) as err:  # Ctrl-C; SIGTERM through torchrun's agent
        console.print("[red]interrupted[/red]: per-rank metrics written so far are kept in the run folder")
        return 128 + int(getattr(err, "sigval", signal.SIGINT))
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


@COMMANDS.register("simulate")
def simulate(argv: list[str]) -> int:
    """Project a measured run to another worker count, model size and network (docs/simulator.md)."""
    from lowband.bench.simulation import print_table, simulate_run, write_json
    from lowband.net.simulate import MAX_WORKERS

    parser = argparse.ArgumentParser(prog="lowband simulate", description=simulate.__doc__)
    parser.add_argument("run_dir", type=Path, help="a folder written by lowband train (runs/<name>)")
    parser.add_argument("--algo", default=None, help="one algorithm label of the run (default: all)")
    parser.add_argument("--workers", type=int, default=None, help=f"1..{MAX_WORKERS} (default: the run's)")
    parser.add_argument("--bandwidth", default=None, help="per-worker link, e.g. 1gbit (default: the run's)")
    parser.add_argument("--latency", default=None, help="per-hop latency, e.g. 50ms (default: the run's)")
    parser.add_argument("--params", type=float, default=None, help="model parameters, e.g. 1e9 (default: the run's)")
    parser.add_argument("--compute-scale", type=float, default=None,
                        help="step compute multiplier (default: params / the run's params)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the straggler draws")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    try:
        run, target, projections = simulate_run(
            args.run_dir, args.algo, workers=args.workers, bandwidth=args.bandwidth, latency=args.latency,
            params=args.params, compute_scale=args.compute_scale, seed=args.seed)
    except FileNotFoundError as err:
        console.print(f"[red]error[/red]: {err}; give a run folder written by lowband train")
        return 1
    except ValueError as err:
        console.print(f"[red]error[/red]: {err}")
        return 2
    print_table(run, target, projections)
    if args.json is not None:
        write_json(args.json, run, target, projections)
        console.print(f"wrote {args.json}")
    return 0


@COMMANDS.register("plan")
def plan(argv: list[str]) -> int:
    """Predict wall-clock, bytes and exposed communication per algorithm; recommend one."""
    from lowband.bench.planning import main as plan_main

    return plan_main(argv)


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
