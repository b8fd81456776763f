"""``lowband plan``: the command line over :mod:`lowband.predict.plan` (flags, table, JSON).

    lowband plan --params 7e9 --workers 64 --bandwidth 1gbit --latency 30ms --step-time 0.8s --steps 10000
    lowband plan --params 1e8 --workers 4 --bandwidth 1gbit --sites 0,0,1,1 --wan-bandwidth 50mbit \
                 --worker-speed 1,1,0.5,0.25 --step-time 0.2s --steps 1000      # a mixed cluster

With ``--worker-speed``/``--sites``/per-worker ``--bandwidth`` the rows are charged as a
synchronous schedule runs on that cluster: the slowest worker bounds every step
(``--step-time`` is a full-speed worker's) and collectives run on the best ring order's
slowest hop; a second table (:mod:`lowband.predict.hetero`) names the groups, the ring order,
flat vs hierarchical averaging and the work to give each worker.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Sequence

from lowband.net.link import Network
from lowband.predict.hetero import Cluster, ClusterPlan, plan_cluster
from lowband.predict.plan import (ALL_REDUCES, CONVERGED_WITHIN, DDP_COMPRESSORS, Row, Setup, comm_plan, plan_rows,
                              predict, recommend, row_specs)
from lowband.net.units import format_bandwidth, per_worker

if TYPE_CHECKING:
    from rich.console import Console

FOOTER = ("Predicts time and bytes under the alpha-beta model, not convergence: the recommendation "
          f"considers only rows whose final val loss the project measured within {CONVERGED_WITHIN:.0%} of "
          "ddp's (small char-GPT runs; docs/planner.md).")
_DURATION = re.compile(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(ns|us|ms|s|min|h|)")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "": 1.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``'0.8s'``, ``'800ms'``, ``'2min'`` or a bare number of seconds -> seconds (> 0)."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"cannot read step time {text!r}: use a positive number of s, ms or min (e.g. 0.8s, 800ms)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def parse_count(text: str, flag: str) -> int:
    """``'7e9'`` -> 7_000_000_000: a whole number >= 1."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise ValueError(f"{flag} must be a whole number >= 1 (e.g. 7e9 or 64), got {text!r}")
    return int(value)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``lowband plan: error: ...``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> _Parser:
    p = _Parser(prog="lowband plan", description="Predict wall-clock and bytes per algorithm (no training).")
    p.add_argument("--params", required=True, help="model parameters, e.g. 7e9")
    p.add_argument("--workers", required=True, help="data-parallel workers, e.g. 64")
    p.add_argument("--bandwidth", required=True, help="each worker's link: 1gbit, 100mbit, 12.5MB/s, none; "
                   "or one per worker ('1gbit*3,100mbit')")
    p.add_argument("--latency", default="0", help="per-hop latency, e.g. 30ms (default 0); or one per worker")
    p.add_argument("--sites", help="each worker's site ('0,0,1,1' or '0*32,1*32'): sites talk over --wan-bandwidth")
    p.add_argument("--wan-bandwidth", help="--sites: the link between two sites, e.g. 50mbit")
    p.add_argument("--wan-latency", help="--sites: latency added across sites, e.g. 30ms")
    p.add_argument("--worker-speed", help="compute speed per worker in (0, 1] ('1,1,0.5,0.25' or '1*48,0.5*16')")
    p.add_argument("--inner-steps", type=int, default=20, help="H of the local-update family, for the work budgets")
    p.add_argument("--step-time", required=True, help="compute time of one step, e.g. 0.8s or 800ms")
    p.add_argument("--steps", help="training steps (or --tokens with --tokens-per-step)")
    p.add_argument("--tokens", help="training tokens in all, e.g. 1e11")
    p.add_argument("--tokens-per-step", help="tokens of one step over all workers, e.g. 1e6")
    p.add_argument("--algo", help="algorithm specs separated by ';' (default: every registered algorithm)")
    p.add_argument("--compress", help=f"ddp rows' compressors, ';'-separated (default: {';'.join(DDP_COMPRESSORS)})")
    p.add_argument("--allreduce", choices=list(ALL_REDUCES), default="auto",
                   help="all-reduce algorithm (default auto: the cheapest per bucket; lowband's emulation: ring)")
    p.add_argument("--overlap-backward", type=float, default=0.0, metavar="SHARE",
                   help="share of --step-time that is backward, during which ddp's gradient buckets may go "
                        "(torch DDP: about 0.67; default 0: after backward, as lowband's ddp)")
    p.add_argument("--matrix-side", type=int, default=0, help="d of the d x d weights (default: estimated)")
    p.add_argument("--json", type=Path, help="also write the table to this JSON file")
    return p


def parse_args(argv: Sequence[str]) -> tuple[Setup, list[Row], Path | None, ClusterPlan | None]:
    """Flags -> (setup, its rows, json path, mixed-cluster plan); bad input exits with one line (code 2)."""
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    try:
        if (ns.steps is None) == (ns.tokens is None):
            raise ValueError("give --steps N, or --tokens T with --tokens-per-step, not both")
        if (ns.tokens is None) != (ns.tokens_per_step is None):
            raise ValueError("--tokens and --tokens-per-step go together (steps = tokens / tokens-per-step)")
        steps = parse_count(ns.steps, "--steps") if ns.steps else math.ceil(
            parse_count(ns.tokens, "--tokens") / parse_count(ns.tokens_per_step, "--tokens-per-step"))
        params, workers = parse_count(ns.params, "--params"), parse_count(ns.workers, "--workers")
        network = Network.with_sites(Network.parse(ns.bandwidth, ns.latency, workers), ns.sites,
                                     ns.wan_bandwidth, ns.wan_latency)
        speeds = tuple(float(v) for v in per_worker(ns.worker_speed)) if ns.worker_speed else (1.0,)
        speeds = speeds * workers if len(speeds) == 1 else speeds
        if ns.inner_steps < 1:
            raise ValueError(f"--inner-steps must be >= 1, got {ns.inner_steps}")
        mixed = ns.worker_speed or ns.sites or len(set(network.links)) > 1
        cluster = plan_cluster(Cluster(network, speeds), 4 * params, ns.inner_steps) if mixed else None
        link = cluster.ring_link if cluster else network.bottleneck()
        step_time = parse_duration(ns.step_time) / min(speeds)  # the slowest worker bounds a synchronous step
        setup = Setup(params, workers, link, step_time, steps, ns.allreduce, ns.matrix_side, ns.overlap_backward)
        rows = plan_rows(setup, row_specs(ns.algo, ns.compress))  # specs and compressors validated here
    except ValueError as err:
        parser.error(str(err))
    return setup, rows, ns.json, cluster


def _seconds(v: float) -> str:
    if v < 60:
        return f"{v:.1f} s"
    if v < 86_400:
        h, rest = divmod(round(v), 3600)
        return f"{h}h {rest // 60:02d}m" if h else f"{rest // 60}m {rest % 60:02d}s"
    return f"{v / 86_400:.1f} d" if v < 365 * 86_400 else f"{v / 31_557_600:.1f} y"


def _bytes(v: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f} B"


def main(argv: Sequence[str]) -> int:
    """``lowband plan``: print the table and the recommendation (and write ``--json``)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    setup, rows, json_path, cluster = parse_args(argv)
    baseline = predict("ddp", comm_plan("ddp", setup, "identity"), setup)
    chosen, reason = recommend(rows, baseline)
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=160)
    title = (f"{setup.params:.3g} params, {setup.workers} workers, {format_bandwidth(setup.link.bandwidth)} + "
             f"{setup.link.latency * 1e3:g} ms, {setup.steps} steps of {setup.step_time:g} s, "
             f"{setup.allreduce} all-reduce" + (" (steps at the slowest worker's pace, the best ring's slowest hop)"
                                                if cluster is not None else ""))
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    table.add_column("algorithm", style="bold", no_wrap=True)
    for header in ("events", "sent/worker", "link busy", "exposed", "wall-clock", "util", "vs ddp", "loss vs ddp"):
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        loss = "not measured" if r.measured is None else f"{round(r.measured.excess, 3) + 0.0:+.1%}"
        table.add_row(r.label, str(r.events), _bytes(r.sent_bytes), _seconds(r.comm_seconds),
                      _seconds(r.exposed_seconds), _seconds(r.wall_seconds), f"{r.utilisation:.1%}",
                      f"{baseline.wall_seconds / r.wall_seconds:.3g}x", loss)
    console.print(table)
    console.print(f"[bold]recommended[/bold] {reason}")
    fastest = min(rows, key=lambda r: r.wall_seconds)
    if fastest.wall_seconds < chosen.wall_seconds:
        speedup = chosen.wall_seconds / fastest.wall_seconds
        console.print(f"  fastest predicted: {fastest.label}, {speedup:.1f}x faster, but not measured "
                      f"within {CONVERGED_WITHIN:.0%} of ddp's loss: measure it first")
    console.print(f"[dim]{FOOTER}[/dim]")
    if cluster is not None:
        print_cluster(console, cluster, setup)
    if json_path is not None:
        out = {"setup": asdict(setup), "note": FOOTER, "cluster": None if cluster is None else asdict(cluster),
               "recommendation": {"label": chosen.label, "reason": reason},
               "rows": [{**asdict(r), "wall_seconds": r.wall_seconds, "utilisation": r.utilisation,
                         "converges": r.converges} for r in rows]}
        try:
            json_path.write_text(json.dumps(out, indent=2) + "\n")
        except OSError as err:
            print(f"lowband plan: error: cannot write --json {json_path}: {err.strerror}", file=sys.stderr)
            return 1
        console.print(f"wrote {json_path}")
    return 0


def print_cluster(console: "Console", plan: ClusterPlan, setup: Setup) -> None:
    """The mixed-cluster table: groups, ring order, averaging, work per worker, throughput."""
    from rich import box
    from rich.table import Table

    fp32 = _bytes(4 * setup.params)
    table = Table(title=f"mixed cluster: one fp32 average ({fp32}) and the work to give each worker",
                  title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    table.add_row("groups", "; ".join(f"site {i}: workers {_ranks(g)} (leader {g[0]})"
                                      for i, g in enumerate(plan.groups)))
    table.add_row("ring order", f"{_ranks(plan.ring)}: {_seconds(plan.flat_seconds)} per all-reduce "
                                f"(slowest hop {format_bandwidth(plan.ring_link.bandwidth)}); rank order "
                                f"{_seconds(plan.rank_ring_seconds)} ({format_bandwidth(plan.rank_ring_link.bandwidth)})")
    if len(plan.groups) > 1:
        better = "use it (--hierarchical)" if plan.hierarchical else "the flat ring is faster"
        table.add_row("hierarchical", f"{_seconds(plan.hierarchical_seconds)} per average: {better}")
    table.add_row("inner steps", f"{_runs([str(b) for b in plan.budgets])} (--budget speed; the fastest does H)")
    table.add_row("ddp batch", _runs([f"{s:.1%}" for s in plan.batch_shares]) + " of the global batch each")
    table.add_row("throughput", f"fixed work {plan.throughput_fixed:.2f}, speed-proportional {plan.throughput_speed:.2f} "
                                f"full-speed workers ({plan.throughput_speed / plan.throughput_fixed:.2f}x); fixed "
                                f"work keeps the workers {plan.utilisation_fixed:.0%} busy")
    console.print(table)


def _runs(values: Sequence[str]) -> str:
    """``20,20,20,10`` -> ``20*3,10`` (the ``value*count`` form the flags read)."""
    out: list[str] = []
    for value in values:
        if out and out[-1].partition("*")[0] == value:
            head, _, count = out[-1].partition("*")
            out[-1] = f"{head}*{int(count or 1) + 1}"
        else:
            out.append(value)
    return ",".join(out)


def _ranks(ranks: Sequence[int]) -> str:
    """``0,1,2,3,7`` -> ``0-3,7``."""
    parts: list[list[int]] = []
    for r in ranks:
        if parts and r == parts[-1][-1] + 1:
            parts[-1].append(r)
        else:
            parts.append([r])
    return ",".join(f"{p[0]}-{p[-1]}" if len(p) > 2 else ",".join(map(str, p)) for p in parts)
