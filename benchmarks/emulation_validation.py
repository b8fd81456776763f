"""Is the in-process emulation right? ``--net model`` against real shaped links (``--net netns``).

The same collectives and the same short training runs, at 10, 100 and 1,000 Mbit/s:

* ``model``: workers talk over loopback and :class:`lowband.comm.Comm` sleeps out the
  alpha-beta cost of each collective (:mod:`lowband.net.cost`) after the real op;
* ``netns``: every worker in its own network namespace behind a veth link shaped by the
  kernel's ``tc tbf`` to the same bandwidth (:mod:`lowband.net.netns`); the real TCP
  transfer is the bandwidth term, and Comm adds only the same per-hop latency (this
  kernel has no netem).

Per collective (all_reduce, all_gather, broadcast, send/recv; 2 and 4 ranks; payloads
sized so the modelled time stays under ``--max-seconds``): the median over ``--repeats``
of the slowest rank's wall-clock time in each mode, and model/netns. Per training run
(``ddp`` and ``diloco`` on the char-GPT, ``--workers`` processes, ``--steps`` steps): the
wall-clock and exposed communication seconds in each mode, and model/netns. Target: the
model within ±15% of netns wherever communication dominates. Prints both tables and
writes ``benchmarks/results/emulation_validation.json``.

Needs root (namespaces, veth, tc); elsewhere it stops with one line saying so.

Run: ``python benchmarks/emulation_validation.py`` (about 15 minutes on 2 cores) or
``--quick`` (100 Mbit/s only, 2 ranks, no training runs: about a minute).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emulation import OPS, _combine, bench_worker  # noqa: E402  (a sibling script)

from lowband.net import cost  # noqa: E402
from lowband.net.link import Link, Network  # noqa: E402
from lowband.net.netns import NetnsUnavailable, ShapedNetwork, check_supported, netns_worker  # noqa: E402
from lowband.net.units import format_bytes, parse_bandwidth  # noqa: E402
from lowband.report.summary import load_run, summarize  # noqa: E402
from lowband.train.config import TrainConfig  # noqa: E402
from lowband.train.launch import launch  # noqa: E402
from lowband.train.run import run  # noqa: E402

BANDWIDTHS = ("10mbit", "100mbit", "1gbit")
SIZES = (100_000, 1_000_000, 10_000_000, 100_000_000)
ALGOS = ("ddp", "diloco")
MODES = ("model", "netns")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "emulation_validation.json"


def sizes_for(bandwidth: str, world: int, max_seconds: float) -> list[int]:
    """Payloads whose modelled ring all-reduce (the costliest op per byte) takes at most ``max_seconds``."""
    link = Link(parse_bandwidth(bandwidth), 0.0)
    return [s for s in SIZES if cost.ring_all_reduce(s, world, link).seconds <= max_seconds]


def collectives(bandwidth: str, latency: str, world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every op and size timed in both modes; one row per (op, size) with both times."""
    config = {"ops": list(OPS), "sizes": sizes_for(bandwidth, world, args.max_seconds), "bandwidth": bandwidth,
              "latency": latency, "repeats": args.repeats, "raw": False}
    timed: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for mode in MODES:
        print(f"collectives: {bandwidth}, {world} ranks, --net {mode}", file=sys.stderr, flush=True)
        if mode == "netns":
            with ShapedNetwork(Network.parse(bandwidth, latency, world)) as spec:
                per_rank = launch(netns_worker, world, bench_worker, spec, {**config, "shaped": True},
                                  bind=spec.bridge_ip)
        else:
            per_rank = launch(bench_worker, world, config)
        rows = [r for r in _combine(per_rank, world, bandwidth, latency) if r["emulated"]]
        timed[mode] = {(r["op"], r["bytes"]): r for r in rows}
    out = []
    for key, model in timed["model"].items():
        netns = timed["netns"][key]
        out.append({"bandwidth": bandwidth, "latency": latency, "ranks": world, "op": key[0], "bytes": key[1],
                    "cost_model_s": model["modelled_s"], "model_s": model["measured_s"],
                    "netns_s": netns["measured_s"], "ratio": model["measured_s"] / netns["measured_s"]})
    return out


def training(bandwidth: str, latency: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``ddp`` and ``diloco`` trained in both modes; one row per algorithm with both runs' numbers."""
    found: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        name = f"emulation-validation-{bandwidth}-{mode}"
        print(f"training {', '.join(ALGOS)}: {bandwidth}, {args.workers} workers, --net {mode}",
              file=sys.stderr, flush=True)
        cfg = TrainConfig(algos=ALGOS, workers=args.workers, steps=args.steps, inner_steps=10, eval_every=args.steps,
                          eval_batches=1, batch_size=8, warmup_steps=5, bandwidth=bandwidth, latency=latency,
                          net=mode, out=args.runs, name=name, progress=False)
        run(cfg)
        summary = summarize(load_run(Path(args.runs) / name))
        for row in summary.rows:
            found.setdefault(row.name, {})[mode] = row
    out = []
    for algo, modes in found.items():
        m, n = modes["model"], modes["netns"]
        out.append({"bandwidth": bandwidth, "latency": latency, "workers": args.workers, "algo": algo,
                    "model_wall_s": m.wall_clock_s, "netns_wall_s": n.wall_clock_s,
                    "wall_ratio": m.wall_clock_s / n.wall_clock_s,
                    "model_comm_s": m.comm_s, "netns_comm_s": n.comm_s,
                    "comm_ratio": m.comm_s / n.comm_s if n.comm_s > 0 else None,
                    "bytes_model": m.bytes_sent_per_worker, "bytes_netns": n.bytes_sent_per_worker})
    return out


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_tables(coll: list[dict[str, Any]], runs: list[dict[str, Any]], latency: str) -> None:
    console = Console(width=140)
    table = Table(title=f"collectives: --net model vs --net netns ({latency} latency in both; median of repeats, "
                        "slowest rank)", title_justify="left")
    for i, header in enumerate(("bandwidth", "ranks", "op", "size", "cost model s", "model s", "netns s",
                                "model/netns")):
        table.add_column(header, justify="left" if i < 3 else "right")
    for r in coll:
        table.add_row(r["bandwidth"], str(r["ranks"]), r["op"], format_bytes(r["bytes"]), f"{r['cost_model_s']:.3f}",
                      f"{r['model_s']:.3f}", f"{r['netns_s']:.3f}", _ratio(r["ratio"]))
    console.print(table)
    if runs:
        table = Table(title="training runs: --net model vs --net netns", title_justify="left")
        for i, header in enumerate(("bandwidth", "algo", "model wall s", "netns wall s", "model/netns",
                                    "model comm s", "netns comm s", "model/netns", "bytes equal")):
            table.add_column(header, justify="left" if i < 2 else "right")
        for r in runs:
            table.add_row(r["bandwidth"], r["algo"], f"{r['model_wall_s']:.1f}", f"{r['netns_wall_s']:.1f}",
                          _ratio(r["wall_ratio"]), f"{r['model_comm_s']:.1f}", f"{r['netns_comm_s']:.1f}",
                          _ratio(r["comm_ratio"]), "yes" if r["bytes_model"] == r["bytes_netns"] else "no")
        console.print(table)
    ratios = [r["ratio"] for r in coll] + [r["wall_ratio"] for r in runs]
    inside = sum(0.85 <= x <= 1.15 for x in ratios)
    print(f"{inside} of {len(ratios)} ratios within ±15%; median model/netns {statistics.median(ratios):.3f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emulation_validation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidths", default=",".join(BANDWIDTHS), help="comma-separated link bandwidths")
    parser.add_argument("--latency", default="10ms", help="per-hop latency in both modes (default 10ms)")
    parser.add_argument("--world-sizes", default="2,4", help="ranks for the collectives (default 2,4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per collective (default 3)")
    parser.add_argument("--max-seconds", type=float, default=3.0,
                        help="largest modelled all-reduce time; bigger payloads are skipped (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the training runs (default 2)")
    parser.add_argument("--steps", type=int, default=30, help="steps of the training runs (default 30)")
    parser.add_argument("--no-training", action="store_true", help="collectives only")
    parser.add_argument("--quick", action="store_true", help="100mbit, 2 ranks, 1 repeat, no training runs")
    parser.add_argument("--runs", default="runs", help="folder for the training runs (default runs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.bandwidths, args.world_sizes, args.repeats, args.no_training = "100mbit", "2", 1, True
    try:
        check_supported()
        bandwidths = [b.strip() for b in args.bandwidths.split(",")]
        for b in bandwidths:
            if parse_bandwidth(b) is None:
                raise ValueError(f"bandwidth {b!r} is unlimited: nothing to shape; give e.g. 100mbit")
        worlds = [int(w) for w in args.world_sizes.split(",")]
    except (NetnsUnavailable, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    coll = [row for b in bandwidths for w in worlds for row in collectives(b, args.latency, w, args)]
    runs = [] if args.no_training else [row for b in bandwidths for row in training(b, args.latency, args)]
    elapsed = time.perf_counter() - started
    print_tables(coll, runs, args.latency)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "seconds": elapsed,
                                    "collectives": coll, "training": runs}, indent=1) + "\n")
    print(f"wrote {args.out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
