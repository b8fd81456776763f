"""How faithful is the emulated network? Modelled vs measured time of every collective.

For each collective (all_reduce, all_gather, broadcast and a send/recv pair), payload size
and world size, the workers time the operation through :class:`lowband.comm.Comm` twice:

* over the emulated network (``--bandwidth``/``--latency``): the cost model says how long it
  should take (``modelled``), the wall clock says how long it did (``measured``); and
* with emulation disabled (bandwidth ``none``): the raw gloo-over-loopback time (``raw``).

``Comm`` runs the real collective first and then sleeps out the modelled time, so
``measured`` should be about ``modelled + raw``; the ratio measured/modelled shows the
overhead, which matters only when the modelled time is small. Each figure is the median
over ``--repeats`` of the slowest participating rank. Sizes are bytes of float32 payload
per rank (for all_gather: each rank's part). The table goes to stdout, the rows as JSON to
``benchmarks/results/emulation.json``.

Run: ``python benchmarks/emulation.py [--quick]`` (or ``make bench ARGS=--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.comm import Comm
from lowband.comm.group import init_from_env, shutdown
from lowband.net.link import Network
from lowband.net.units import format_bytes, parse_bandwidth, parse_latency, parse_size
from lowband.train.launch import launch

OPS = ("all_reduce", "all_gather", "broadcast", "send/recv")
DEFAULT_SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000)
QUICK_MAX = 1_000_000
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "emulation.json"


# -- worker side ---------------------------------------------------------------------------


def _run_op(comm: Comm, op: str, tensor: torch.Tensor, rank: int) -> bool:
    """Issue ``op`` once; returns whether this rank took part (send/recv: ranks 0 and 1 only)."""
    if op == "all_reduce":
        comm.all_reduce(tensor, tag=op)
    elif op == "all_gather":
        comm.all_gather(tensor, tag=op)
    elif op == "broadcast":
        comm.broadcast(tensor, src=0, tag=op)
    elif op == "send/recv":
        if rank == 0:
            comm.send(tensor, dst=1, tag=op)
        elif rank == 1:
            comm.recv(tensor, src=0, tag=op)
        else:
            return False
    else:
        raise ValueError(f"unknown op {op!r}")
    return True


def _time_op(comm: Comm, control: Comm, op: str, numel: int, rank: int, repeats: int,
             warmup: int) -> dict[str, Any]:
    """Per-rank wall-clock seconds of ``repeats`` runs of ``op`` (after ``warmup`` untimed ones)."""
    tensor = torch.ones(numel, dtype=torch.float32)
    times: list[float] = []
    took_part = True
    for i in range(warmup + repeats):
        control.barrier()  # start together; control traffic is neither emulated nor charged
        start = time.perf_counter()
        took_part = _run_op(comm, op, tensor, rank)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    modelled = comm.ledger.records[-1].modelled if took_part and len(comm.ledger) else None
    return {"times": times if took_part else None, "modelled": modelled}


@record
def bench_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Time every (op, size) raw and emulated on this rank; returns one dict per measurement."""
    rank, world = init_from_env(timeout_s=3600)
    control = Comm()
    raw = Comm(network=Network.parse("none", "none", world))
    network = Network.parse(config["bandwidth"], config["latency"], world)
    emulated = Comm(network=dataclasses.replace(network, shaped=config.get("shaped", False)))
    rows: list[dict[str, Any]] = []
    try:
        for op in config["ops"]:
            for size in config["sizes"]:
                numel = max(1, size // 4)
                if rank == 0:
                    print(f"[{world} ranks] {op:<10} {format_bytes(numel * 4):>9}", file=sys.stderr, flush=True)
                modes = (("raw", raw, 1), ("emulated", emulated, 0)) if config.get("raw", True) else \
                    (("emulated", emulated, 1),)
                for mode, comm, warmup in modes:
                    timed = _time_op(comm, control, op, numel, rank, config["repeats"], warmup)
                    rows.append({"op": op, "bytes": numel * 4, "mode": mode, "rank": rank, **timed})
    finally:
        for comm in (emulated, raw, control):
            comm.close()
        shutdown()
    return rows


# -- parent side ---------------------------------------------------------------------------


def _combine(per_rank: dict[int, list[dict[str, Any]]], world: int, bandwidth: str,
             latency: str) -> list[dict[str, Any]]:
    """Slowest participating rank per repeat, median over repeats; one row per (op, size, mode)."""
    keyed: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for rows in per_rank.values():
        for row in rows:
            if row["times"] is not None:
                keyed.setdefault((row["op"], row["bytes"], row["mode"]), []).append(row)
    out: list[dict[str, Any]] = []
    for (op, nbytes, mode), rows in keyed.items():
        slowest = [max(r["times"][i] for r in rows) for i in range(len(rows[0]["times"]))]
        modelled = max(r["modelled"] or 0.0 for r in rows)
        measured = statistics.median(slowest)
        out.append({
            "op": op, "ranks": world, "bytes": nbytes,
            "bandwidth": bandwidth if mode == "emulated" else "none",
            "latency": latency if mode == "emulated" else "none",
            "emulated": mode == "emulated",
            "modelled_s": modelled, "measured_s": measured,
            "ratio": measured / modelled if mode == "emulated" and modelled > 0 else None,
            "samples_s": slowest, "participants": len(rows),
        })
    return out


def _table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    raw = {(r["op"], r["ranks"], r["bytes"]): r["measured_s"] for r in rows if not r["emulated"]}
    lines = []
    for r in rows:
        if not r["emulated"]:
            continue
        loopback = raw.get((r["op"], r["ranks"], r["bytes"]))
        lines.append([
            r["op"], str(r["ranks"]), format_bytes(r["bytes"]), f"{r['modelled_s']:.4f}", f"{r['measured_s']:.4f}",
            f"{r['ratio']:.3f}" if r["ratio"] is not None else "-",
            f"{loopback:.4f}" if loopback is not None else "-",
            f"{r['measured_s'] - r['modelled_s']:+.4f}",
        ])
    return lines


HEADERS = ["op", "ranks", "size", "modelled s", "measured s", "measured/modelled", "raw s (none)", "over s"]


def print_table(rows: list[dict[str, Any]], title: str, plain: bool = False) -> None:
    """Print one line per emulated measurement; ``raw s`` is the same op with emulation off."""
    lines = _table_rows(rows)
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(HEADERS)]
        print(title)
        print("  ".join(h.rjust(w) if i > 0 else h.ljust(w) for i, (h, w) in enumerate(zip(HEADERS, widths))))
        for line in lines:
            print("  ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        return
    table = Table(title=title)
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for line in lines:
        table.add_row(*line)
    Console(width=max(120, len(title))).print(table)


def _sizes(text: str) -> list[int]:
    sizes = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = int(float(item))  # plain numbers are bytes: 1e6, 4096
        except ValueError:
            try:
                value = parse_size(item)  # or with a unit: 1MB, 64KiB
            except ValueError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
        if value < 4:
            raise argparse.ArgumentTypeError(f"size {item!r} is below one float32 (4 bytes)")
        sizes.append(value)
    return sizes


def _world_sizes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read world sizes {text!r}: use integers like 2,4") from None
    if any(v < 2 for v in values):
        raise argparse.ArgumentTypeError("world sizes must be >= 2 (a world of one sends nothing)")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emulation.py",
        description=(
            "Modelled vs measured time of all_reduce, all_gather, broadcast and send/recv over the "
            "emulated network, plus the raw loopback (gloo) time with emulation off. The default "
            "run (1 kB..100 MB, 2 and 4 ranks, 1gbit, 1ms, 3 repeats) takes about 1.5 minutes on a "
            "2-core machine; --quick (up to 1 MB) about 15 seconds. Slower links scale the big "
            "sizes: 100 MB at 100mbit is ~16 s per all-reduce, minutes for the whole run."
        ),
    )
    parser.add_argument("--sizes", type=_sizes, default=None,
                        help="comma-separated payload sizes per rank, bytes or with a unit "
                             "(default 1e3,1e4,1e5,1e6,1e7,1e8)")
    parser.add_argument("--quick", action="store_true", help=f"only sizes up to {format_bytes(QUICK_MAX)}")
    parser.add_argument("--world-sizes", type=_world_sizes, default=[2, 4], help="comma-separated (default 2,4)")
    parser.add_argument("--bandwidth", default="1gbit", help="emulated link bandwidth, e.g. 100mbit (default 1gbit)")
    parser.add_argument("--latency", default="1ms", help="emulated one-hop latency, e.g. 20ms (default 1ms)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point; the median is reported (default 3)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default benchmarks/results/emulation.json)")
    parser.add_argument("--plain", action="store_true", help="plain-text table instead of rich")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if parse_bandwidth(args.bandwidth) is None and parse_latency(args.latency) == 0.0:
            parser.error("--bandwidth and --latency are both 'none': nothing to emulate")
    except ValueError as err:
        parser.error(str(err))
    ops = [op.strip() for op in args.ops.split(",")]
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}: choose from {', '.join(OPS)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    sizes = args.sizes if args.sizes is not None else list(DEFAULT_SIZES)
    if args.quick:
        sizes = [s for s in sizes if s <= QUICK_MAX] or [min(sizes)]

    config = {"ops": ops, "sizes": sizes, "bandwidth": args.bandwidth, "latency": args.latency,
              "repeats": args.repeats}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for world in args.world_sizes:
        rows.extend(_combine(launch(bench_worker, world, config), world, args.bandwidth, args.latency))
    elapsed = time.perf_counter() - started
    order = {op: i for i, op in enumerate(OPS)}
    rows.sort(key=lambda r: (r["ranks"], order[r["op"]], r["bytes"], r["emulated"]))

    title = (f"emulated {args.bandwidth}, {args.latency} latency; median of {args.repeats}; "
             f"raw = same op with emulation off; {elapsed:.0f} s total")
    print_table(rows, title, plain=args.plain)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": {**config, "world_sizes": args.world_sizes, "torch": torch.__version__},
        "seconds": elapsed,
        "rows": rows,
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
