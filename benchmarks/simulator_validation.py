"""How well does ``lowband simulate`` extrapolate? A 2-worker run projected to 4 workers vs a real 4-worker run.

For each algorithm of ``--algo`` the script trains the char-GPT twice over the same
emulated link (``--bandwidth``/``--latency``), with 2 and with 4 real worker processes
(same seed, steps and per-worker batch), then simulates the 2-worker run at 4 workers
(same params and network: only the worker count changes) and compares the projection with
the 4-worker measurement: wall-clock, bytes sent per worker and exposed communication.

Two projections are reported per algorithm:

* ``raw``: compute taken from the 2-worker run as it is (compute scale 1);
* ``calibrated``: compute scaled by the ratio of the measured mean step compute of the
  4-worker run to the 2-worker run's. On a machine with fewer cores than workers the
  4-worker run computes slower per step (the processes share cores), which is not
  what the simulator is about; calibrating it out isolates the communication, overlap
  and straggler model.

Each figure of the 2-worker run is also replayed at 2 workers (the identity check).
Prints a table and writes ``benchmarks/results/simulator_validation.json``.

Run: ``python benchmarks/simulator_validation.py`` (7 algorithms, 60 steps, a few minutes)
or ``--quick`` (3 algorithms, 8 steps).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from lowband.predict.simulate import Projection, simulate
from lowband.predict.simulate_cli import load_traces, make_target
from lowband.report.summary import load_run
from lowband.train.config import TrainConfig
from lowband.train.launch import launch
from lowband.train.worker import main as worker_main

ALGOS = ("ddp", "diloco", "delayed-diloco", "eager-diloco", "streaming-diloco", "co2", "gossip")
QUICK_ALGOS = ("ddp", "diloco", "delayed-diloco")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "simulator_validation.json"


def train(algos: Sequence[str], workers: int, args: argparse.Namespace) -> Path:
    """One real run of every algorithm on ``workers`` processes; returns its folder."""
    name = f"{args.name}-{workers}w"
    cfg = TrainConfig(algos=tuple(algos), workers=workers, steps=args.steps, inner_steps=args.inner_steps,
                      eval_every=args.steps, eval_batches=1, batch_size=args.batch_size,
                      warmup_steps=min(20, args.steps // 4), bandwidth=args.bandwidth, latency=args.latency,
                      out=args.runs, name=name, progress=False)
    print(f"training {', '.join(algos)} on {workers} workers, {args.steps} steps", file=sys.stderr)
    launch(worker_main, workers, cfg)
    return Path(args.runs) / name


def _error(projected: float, measured: float) -> float | None:
    return (projected - measured) / measured if measured > 0 else None


def compare(small: Path, large: Path, workers: int) -> list[dict[str, Any]]:
    """Per algorithm: the 2-worker run replayed, projected to ``workers`` (raw and calibrated), and measured."""
    small_run, large_run = load_run(small), load_run(large)
    small_traces, large_traces = load_traces(small_run), load_traces(large_run)
    rows = []
    for label, trace in small_traces.items():
        truth = large_traces[label]
        ring = "ring"  # the emulated runs it is checked against pace every all-reduce as a ring
        identity = simulate(trace, make_target(small_run, allreduce=ring))
        raw = simulate(trace, make_target(small_run, workers=workers, compute_scale=1.0, allreduce=ring))
        scale = truth.compute_s / trace.compute_s if trace.compute_s > 0 else 1.0
        calibrated = simulate(trace, make_target(small_run, workers=workers, compute_scale=scale, allreduce=ring))
        row: dict[str, Any] = {"label": label, "compute_scale": scale, "measured": {
            "wall_clock_s": truth.wall_clock_s, "bytes_sent_per_worker": truth.bytes_sent_per_worker,
            "exposed_comm_s": truth.comm_s, "compute_s": truth.compute_s}}
        for key, p in (("identity", identity), ("raw", raw), ("calibrated", calibrated)):
            reference = trace if key == "identity" else truth
            row[key] = _numbers(p)
            row[key]["wall_clock_error"] = _error(p.wall_clock_s, reference.wall_clock_s)
            row[key]["bytes_error"] = _error(p.bytes_sent_per_worker, reference.bytes_sent_per_worker)
        rows.append(row)
    return rows


def _numbers(p: Projection) -> dict[str, Any]:
    return {"wall_clock_s": p.wall_clock_s, "bytes_sent_per_worker": p.bytes_sent_per_worker,
            "exposed_comm_s": p.exposed_comm_s, "compute_s": p.compute_s, "utilisation": p.utilisation}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(("algorithm", "identity err", "measured 4w", "raw 4w", "raw err",
                                "calibrated 4w", "calibrated err", "bytes err", "exposed meas/cal")):
        table.add_column(header, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(r["label"], _pct(r["identity"]["wall_clock_error"]), f"{r['measured']['wall_clock_s']:.2f} s",
                      f"{r['raw']['wall_clock_s']:.2f} s", _pct(r["raw"]["wall_clock_error"]),
                      f"{r['calibrated']['wall_clock_s']:.2f} s", _pct(r["calibrated"]["wall_clock_error"]),
                      _pct(r["calibrated"]["bytes_error"]),
                      f"{r['measured']['exposed_comm_s']:.2f} / {r['calibrated']['exposed_comm_s']:.2f} s")
    Console(width=150).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", default=None, help="';'-separated algorithm specs (default: 7 methods)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--inner-steps", "-H", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bandwidth", default="20mbit")
    p.add_argument("--latency", default="20ms")
    p.add_argument("--workers", type=int, default=4, help="the larger real run (the small one has 2 workers)")
    p.add_argument("--runs", default="runs", help="folder for the two run folders")
    p.add_argument("--name", default="bench-simulator")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="ddp, diloco, delayed-diloco; 8 steps, H 4, 50mbit / 5 ms")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.inner_steps, args.bandwidth, args.latency = 8, 4, "50mbit", "5ms"
    algos = [a for a in (args.algo or ";".join(QUICK_ALGOS if args.quick else ALGOS)).split(";") if a]
    small = train(algos, 2, args)
    large = train(algos, args.workers, args)
    rows = compare(small, large, args.workers)
    title = (f"simulator validation: 2-worker runs projected to {args.workers} workers vs measured, "
             f"{args.steps} steps, {args.bandwidth} / {args.latency}")
    print_table(rows, title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "steps": args.steps, "workers": args.workers,
                                    "bandwidth": args.bandwidth, "latency": args.latency,
                                    "inner_steps": args.inner_steps, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
