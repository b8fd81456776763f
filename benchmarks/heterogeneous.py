"""Heterogeneous workers: time-to-target loss and utilisation with and without resource-aware scheduling.

The char-GPT on Shakespeare, 4 workers at compute speeds 1, 1, 0.5, 0.25 (``--worker-speed``),
in two sites (``--sites 0,0,1,1``: the two full-speed workers in one, the slow ones in the
other) with 1 Gbit/s + 1 ms inside a site and 50 Mbit/s + 20 ms between them; the same
steps, seed and data for every entry:

* ``ddp`` — data parallel, a flat ring all-reduce every step: every step waits for the slowest;
* ``ddp:hierarchical=true`` — the same gradients averaged inside each site first, one update
  per site across the WAN (docs/topology.md);
* ``diloco`` — plain DiLoCo, H inner steps on every worker: the fast ones wait at every round;
* ``diloco:budget=speed`` — compute-aware budgets: inner steps proportional to each worker's
  measured speed, updates weighted by the work done (docs/heterogeneous.md);
* ``diloco:budget=speed,hierarchical=true`` — both.

A ``lowband bench`` sweep in ``--out`` (default ``runs``), folder ``heterogeneous``: resumable (a
finished run is not repeated), with its report (plots, HTML). Prints the table (time to the
automatic target of :mod:`lowband.report.target`, final validation loss, bytes, exposed
communication, utilisation = compute / (compute + blocked communication), mean over workers)
and writes ``benchmarks/results/heterogeneous.json``.

Run: ``python benchmarks/heterogeneous.py`` (about 20 minutes on 2 cores) or ``--quick``
(a few steps: a smoke test of the pipeline, no meaningful numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from lowband.bench.sweep import Entry, SweepSpec, run_sweep
from lowband.bench.sweep_report import load_groups, summarize_group, write_sweep_report
from lowband.net.units import format_bytes

ENTRIES = (Entry("ddp"), Entry("ddp:hierarchical=true"), Entry("diloco"), Entry("diloco:budget=speed"),
           Entry("diloco:budget=speed,hierarchical=true"))
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "heterogeneous.json"


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run what is not done yet; one row per entry, mean over seeds."""
    train = {"worker_speed": args.worker_speed, "sites": args.sites, "wan_bandwidth": args.wan_bandwidth,
             "wan_latency": args.wan_latency, "inner_steps": args.inner_steps,
             "eval_every": max(1, args.steps // 8), "eval_batches": 4}
    spec = SweepSpec(name="heterogeneous", workers=(len(args.worker_speed.split(",")),),
                     networks=((args.bandwidth, args.latency),), entries=ENTRIES, seeds=tuple(args.seeds),
                     steps=args.steps, train=tuple(sorted(train.items())))
    result = run_sweep(spec, Path(args.out))
    for unit, error in result.failed:
        print(f"failed: {unit.entry.label} seed {unit.seed}: {error}", file=sys.stderr)
    folder = Path(args.out) / "heterogeneous"
    write_sweep_report(folder)
    _, groups = load_groups(folder)
    rows = []
    for group in groups:
        chosen, per_seed = summarize_group(group, None)
        target = chosen.loss
        for entry in ENTRIES:
            found = [s.row(entry.label) for s in per_seed.values() if any(r.name == entry.label for r in s.rows)]
            if not found:
                continue
            mean = lambda key: sum(getattr(r, key) for r in found) / len(found)  # noqa: E731
            reached = [r.time_to_target_s for r in found if r.time_to_target_s is not None]
            rows.append({
                "entry": entry.label, "seeds": len(found), "target_loss": target,
                "time_to_target_s": sum(reached) / len(reached) if len(reached) == len(found) else None,
                "final_val_loss": sum(r.final_val_loss or 0.0 for r in found) / len(found),
                "wall_clock_s": mean("wall_clock_s"), "compute_s": mean("compute_s"), "comm_s": mean("comm_s"),
                "bytes_sent": mean("bytes_sent_per_worker"), "tokens": mean("tokens"),
                "utilisation": sum(r.compute_s / max(r.compute_s + r.comm_s, 1e-9) for r in found) / len(found)})
    return rows


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    base = next((r for r in rows if r["entry"] == "ddp"), None)
    table = Table(title=title, title_justify="left")
    headers = ("entry", "time to target s", "vs ddp", "final val loss", "wall-clock s", "exposed comm s",
               "utilisation", "sent/worker", "tokens/worker")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for r in rows:
        ttt = r["time_to_target_s"]
        speedup = "-" if ttt is None or base is None or base["time_to_target_s"] is None \
            else f"{base['time_to_target_s'] / ttt:.2f}x"
        table.add_row(r["entry"], "not reached" if ttt is None else f"{ttt:.1f}", speedup,
                      f"{r['final_val_loss']:.3f}", f"{r['wall_clock_s']:.1f}", f"{r['comm_s']:.1f}",
                      f"{r['utilisation']:.0%}", format_bytes(r["bytes_sent"]), f"{r['tokens']:.0f}")
    Console(width=150).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="heterogeneous.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker-speed", default="1,1,0.5,0.25")
    parser.add_argument("--sites", default="0,0,1,1")
    parser.add_argument("--bandwidth", default="1gbit", help="each worker's link inside its site")
    parser.add_argument("--latency", default="1ms")
    parser.add_argument("--wan-bandwidth", default="50mbit")
    parser.add_argument("--wan-latency", default="20ms")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true", help="a few steps (pipeline smoke test)")
    parser.add_argument("--out", default="runs", help="parent folder of the sweep (default runs)")
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.inner_steps = 8, 4
    rows = sweep(args)
    title = (f"{args.steps} steps, speeds {args.worker_speed}, sites {args.sites}: {args.bandwidth} + {args.latency} "
             f"inside, {args.wan_bandwidth} + {args.wan_latency} between; H={args.inner_steps}; "
             f"seeds {','.join(map(str, args.seeds))}")
    print_table(rows, title)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                    indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
