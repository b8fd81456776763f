"""``lowband``: the command line.

    lowband train [flags]      train across workers over an emulated link, then report
    lowband bench [SPEC]       a sweep of runs (resumable), compared in one report
    lowband report RUN_DIR     rebuild the table, plots and report.html of a run folder (or sweep)
    lowband plan [flags]       predict wall-clock and bytes of every algorithm (no training)
    lowband simulate RUN_DIR   project a measured run to other workers, model size and network
    lowband --version          lowband's, torch's and Python's versions

``python -m lowband`` is the same command.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape  # messages print as written: '[[task]]' is no markup

from lowband.registry import Registry

COMMANDS: Registry[Callable[[list[str]], int]] = Registry("command")
console = Console(stderr=True, highlight=False, soft_wrap=True)


@COMMANDS.register("train")
def train(argv: list[str]) -> int:
    """Start ``--workers`` processes through torchrun's launcher API and train."""
    if console.is_terminal and not {"-h", "--help"} & set(argv):  # a person watching: a line at once (torch's
        console.print("[dim]lowband train: loading torch and reading the flags...[/dim]")  # import takes seconds)
    from lowband.devices import check_gpus
    from lowband.train.checks import worker_warnings
    from lowband.adversity.injection import parse_faults
    from lowband.train.flags import parse_train_args
    from lowband.net.netns import NetnsUnavailable
    from lowband.train.launch import RendezvousFailed, WorkerFailed

    from lowband.train.run import run

    cfg, nodes = parse_train_args(argv)
    try:
        check_gpus(cfg.device, cfg.workers)  # one GPU per worker, before any worker starts
        bind = nodes.bind()  # the interface every socket listens on
        parse_faults(os.environ.get("LOWBAND_FAULT", ""))  # fault injection for tests: a bad spec fails here
    except ValueError as err:
        console.print(f"[red]error[/red]: {escape(str(err))}")
        return 2
    machines = (f" on node {nodes.node_rank} of {nodes.nnodes} (rendezvous {nodes.rdzv_endpoint}, sockets on {bind})"
                if nodes.multi else "")
    console.print(f"[bold]lowband[/bold]: {cfg.model} on {cfg.data}, {cfg.workers} workers{machines}, "
                  f"link {cfg.bandwidth} / {cfg.latency} ({cfg.net}), {cfg.steps} steps each of: {', '.join(cfg.algos)}"
                  + ("" if (cfg.device, cfg.precision) == ("auto", "fp32") else f" ({cfg.device}, {cfg.precision})"))
    for line in [*worker_warnings(cfg.workers), *cfg.feedback_warnings(), *cfg.period_warnings()]:
        console.print(f"[yellow]warning[/yellow]: {escape(line)}")
    console.print(f"[dim]starting {cfg.workers} worker processes (torch imports take a few seconds each)...[/dim]")
    os.environ["LOWBAND_STARTED"] = str(time.time())  # the workers report their start-up from here
    try:
        run(cfg, nodes, bind)
    except (NetnsUnavailable, RendezvousFailed) as err:
        console.print(f"[red]error[/red]: {escape(str(err))}")
        return 2
    except WorkerFailed as err:
        console.print(f"[red]error[/red]: {escape(str(err))}")
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM: the workers are stopped already (launch.Interrupted)
        console.print(f"[red]interrupted[/red]: {escape(str(err) or 'stopped by signal 2')}; "
                      "per-rank metrics written so far are kept in the run folder")
        return 128 + int(getattr(err, "sigval", signal.SIGINT))
    return 0


@COMMANDS.register("bench")
def bench(argv: list[str]) -> int:
    """Run a sweep (a TOML spec and/or flags), resumable, then write its report (docs/bench.md)."""
    from lowband.bench.sweep import DEFAULT_SPEC, SpecError, SweepSpec, parse_toml, run_sweep
    from lowband.bench.sweep_report import write_sweep_report

    parser = argparse.ArgumentParser(prog="lowband bench", description=bench.__doc__)
    parser.add_argument("spec", type=Path, nargs="?", help="a sweep spec (TOML); default: the built-in sweep")
    parser.add_argument("--print-spec", action="store_true", help="print the default spec (a template) and exit")
    parser.add_argument("--name", help="sweep name = folder under --out (default: the spec's)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of sweep folders")
    parser.add_argument("--algo", help="entries, ';'-separated lowband algorithms (replaces the spec's): "
                                       "'ddp;diloco;ddp+powersgd:rank=2+ef'")
    parser.add_argument("--peers", help="peers to add, ';'-separated: 'torch-powersgd;torchft-diloco'")
    parser.add_argument("--networks", help="'1gbit/10ms,100mbit/20ms' (replaces the spec's)")
    parser.add_argument("--workers", help="worker counts, e.g. 2,4")
    parser.add_argument("--seeds", help="e.g. 0,1")
    parser.add_argument("--steps", type=int, help="steps per worker")
    parser.add_argument("--target-loss", type=float, help="validation loss for time/bytes to target")
    parser.add_argument("--dry-run", action="store_true", help="list the runs (done or to do) and exit")
    parser.add_argument("--no-report", action="store_true", help="run only; `lowband report DIR` writes it later")
    args = parser.parse_args(argv)
    if args.print_spec:
        print(DEFAULT_SPEC, end="")
        return 0
    try:
        source = str(args.spec) if args.spec else "the default spec"
        text = args.spec.read_text() if args.spec else DEFAULT_SPEC
        spec = SweepSpec.from_dict(_bench_overrides(parse_toml(text, source), args), source)
    except FileNotFoundError:
        console.print(f"[red]error[/red]: spec file not found: {escape(str(args.spec))} "
                      "(lowband bench --print-spec > my.toml)")
        return 2
    except (SpecError, ValueError, KeyError) as err:
        console.print(f"[red]error[/red]: {escape(str(err))}")
        return 2
    try:
        result = run_sweep(spec, args.out, dry_run=args.dry_run)
    except KeyboardInterrupt as err:  # Ctrl-C; SIGTERM through torchrun's agent (launch.Interrupted)
        console.print("[red]interrupted[/red]: finished runs are kept; the same command resumes the sweep")
        return 128 + int(getattr(err, "sigval", signal.SIGINT))
    if not args.dry_run and not args.no_report and (result.ran or result.skipped):
        console.print(f"report: {write_sweep_report(args.out / spec.name)}")
    return 1 if result.failed else 0


def _bench_overrides(data: dict, args: argparse.Namespace) -> dict:
    """The spec's dict with the command-line flags applied."""
    if args.name:
        data["name"] = args.name
    if args.algo:
        data["entry"] = [_entry(a) for a in args.algo.split(";") if a.strip()]
    if args.peers:
        data["entry"] = data.get("entry", []) + [{"peer": p.strip()} for p in args.peers.split(";") if p.strip()]
    if args.networks:
        nets = [n.strip().split("/") for n in args.networks.split(",") if n.strip()]
        if any(len(n) != 2 for n in nets):
            raise ValueError(f"--networks takes bandwidth/latency pairs like 100mbit/20ms, got {args.networks!r}")
        data["network"] = [{"bandwidth": b, "latency": a} for b, a in nets]
    for key in ("workers", "seeds"):
        if getattr(args, key):
            try:
                data[key] = [int(v) for v in getattr(args, key).split(",")]
            except ValueError:
                raise ValueError(f"--{key} takes integers like 0,1, got {getattr(args, key)!r}") from None
    if args.steps is not None:
        data["steps"] = args.steps
    if args.target_loss is not None:
        data["target_loss"] = args.target_loss
    return data


def _entry(text: str) -> dict[str, str]:
    """'ddp+powersgd:rank=2+ef' -> {'algo': 'ddp', 'compress': 'powersgd:rank=2', 'feedback': 'ef'}."""
    parts = [p.strip() for p in text.split("+")]
    return dict(zip(("algo", "compress", "feedback"), parts))


@COMMANDS.register("report")
def report(argv: list[str]) -> int:
    """Rebuild summary.json, summary.md, the plots and report.html from a run folder."""
    from lowband.report.render import show_report

    parser = argparse.ArgumentParser(prog="lowband report", description=report.__doc__)
    parser.add_argument("run_dir", type=Path, help="a folder written by lowband train (runs/<name>)")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="validation loss for time-to-target (default: the best loss every algorithm reaches)")
    args = parser.parse_args(argv)
    try:
        if (args.run_dir / "sweep.json").is_file():  # a lowband bench folder
            from lowband.bench.sweep_report import write_sweep_report

            console.print(f"report: {write_sweep_report(args.run_dir)}")
            return 0
        show_report(args.run_dir, args.target_loss)
    except (FileNotFoundError, ValueError) as err:
        if args.run_dir.exists():  # a run or sweep folder with nothing to report yet
            console.print(f"[red]error[/red]: {escape(str(err))}")
            return 1
        console.print(f"[red]error[/red]: {escape(str(err))}; give a run folder of lowband train or a sweep folder "
                      "of lowband bench")
        return 2
    return 0


@COMMANDS.register("simulate")
def simulate(argv: list[str]) -> int:
    """Project a measured run to another worker count, model size and network (docs/simulator.md)."""
    from lowband.predict.simulate_cli import print_table, simulate_run, write_json
    from lowband.net.cost import ALL_REDUCES
    from lowband.predict.simulate import MAX_WORKERS

    parser = argparse.ArgumentParser(prog="lowband simulate", description=simulate.__doc__)
    parser.add_argument("run_dir", type=Path, help="a folder written by lowband train (runs/<name>)")
    parser.add_argument("--algo", default=None, help="one algorithm label of the run (default: all)")
    parser.add_argument("--workers", type=int, default=None, help=f"1..{MAX_WORKERS} (default: the run's)")
    parser.add_argument("--bandwidth", default=None, help="per-worker link, e.g. 1gbit (default: the run's)")
    parser.add_argument("--latency", default=None, help="per-hop latency, e.g. 50ms (default: the run's)")
    parser.add_argument("--params", type=float, default=None, help="model parameters, e.g. 1e9 (default: the run's)")
    parser.add_argument("--compute-scale", type=float, default=None,
                        help="step compute multiplier (default: params / the run's params)")
    parser.add_argument("--worker-speed", default=None,
                        help="compute speed per target worker, repeated over the workers ('1,1,0.5,0.25'; "
                             "default: the run's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the straggler draws")
    parser.add_argument("--allreduce", choices=list(ALL_REDUCES), default="auto",
                        help="all-reduce algorithm (default auto: the cheapest per bucket, as lowband plan)")
    parser.add_argument("--overlap-backward", type=float, default=0.0, metavar="SHARE",
                        help="share of a step's compute that is backward, during which ddp's gradient buckets "
                             "may go (torch DDP: about 0.67; default 0: after backward, as lowband's ddp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    try:
        run, target, projections = simulate_run(
            args.run_dir, args.algo, workers=args.workers, bandwidth=args.bandwidth, latency=args.latency,
            params=args.params, compute_scale=args.compute_scale, seed=args.seed, worker_speed=args.worker_speed,
            allreduce=args.allreduce, overlap_backward=args.overlap_backward)
    except FileNotFoundError as err:
        console.print(f"[red]error[/red]: {escape(str(err))}; give a run folder written by lowband train")
        return 2
    except ValueError as err:
        console.print(f"[red]error[/red]: {escape(str(err))}")
        return 2
    print_table(run, target, projections)
    if args.json is not None:
        write_json(args.json, run, target, projections)
        console.print(f"wrote {args.json}")
    return 0


@COMMANDS.register("plan")
def plan(argv: list[str]) -> int:
    """Predict wall-clock, bytes and exposed communication per algorithm; recommend one."""
    from lowband.predict.plan_cli import main as plan_main

    return plan_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        import torch

        from lowband.version import __version__

        print(f"lowband {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        run = COMMANDS.get(command)
    except ValueError as err:
        console.print(f"[red]error[/red]: {escape(str(err))}")
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
