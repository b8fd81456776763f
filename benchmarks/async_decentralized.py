"""Beyond one blocking all-reduce: asynchronous, decentralised and compressed-optimizer methods.

Trains the char-GPT on Shakespeare across real worker processes over emulated links, once
per algorithm with the same seed and token budget — data parallel and DiLoCo as the
baselines, then co2 (overlapped outer step), noloco (pairwise averaging, no collective),
gossip (D-PSGD on a ring with one merge at the end), onebit-adam and dist-lion (1-bit
optimizer states / updates) — for every worker count and network asked for (default 4 and
8 workers; 100 Mbit/s + 20 ms and 1 Gbit/s + 5 ms). One run folder per (workers,
network), each with its HTML report; reports final validation loss, bytes sent per
worker, exposed communication, emulated wall-clock and time to a target loss.

Run: ``python benchmarks/async_decentralized.py`` (about 100 minutes on 2 cores; 8 workers
share them), ``--steps 400,200`` (one budget per worker count) or a subset: ``--workers 4
--networks 100mbit/20ms``; ``--quick`` is a smoke test (2 workers, 16 steps, one network). Writes
``benchmarks/results/async_decentralized.json`` (every cell, with the command).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from lowband.report.render import show_report
from lowband.report.summary import load_run, summarize
from lowband.train.config import TrainConfig
from lowband.train.launch import launch
from lowband.train.worker import main as worker_main

ALGOS = ("ddp", "diloco", "co2", "noloco", "gossip", "onebit-adam", "dist-lion")
NETWORKS = ("100mbit/20ms", "1gbit/5ms")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "async_decentralized.json"


def parse_network(text: str) -> tuple[str, str]:
    """``'100mbit/20ms'`` -> ("100mbit", "20ms")."""
    bandwidth, sep, latency = text.partition("/")
    if not sep or not bandwidth or not latency:
        raise SystemExit(f"network must be BANDWIDTH/LATENCY like 100mbit/20ms, got {text!r}")
    return bandwidth, latency


def run_cell(args: argparse.Namespace, workers: int, steps: int, bandwidth: str, latency: str) -> dict[str, Any]:
    """Train every algorithm on one (workers, network) cell; its summary as a dict."""
    name = f"{args.name}-{workers}w-{bandwidth}-{latency}"
    cfg = TrainConfig(
        algos=tuple(a for a in args.algo.split(";") if a), workers=workers, steps=steps,
        eval_every=max(1, steps // 16), warmup_steps=min(20, steps // 10), bandwidth=bandwidth,
        latency=latency, out=args.runs, name=name, inner_steps=8 if args.quick else None,
    )
    print(f"async/decentralised: {len(cfg.variants())} algorithms, {cfg.steps} steps on {workers} workers "
          f"over {bandwidth} / {latency}", file=sys.stderr)
    launch(worker_main, workers, cfg)
    run_dir = Path(args.runs) / name
    show_report(run_dir)
    return summarize(load_run(run_dir)).to_dict()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="4,8", help="comma-separated worker counts")
    p.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated BANDWIDTH/LATENCY")
    p.add_argument("--steps", default="400", help="steps per worker: one value, or one per worker count")
    p.add_argument("--algo", default=";".join(ALGOS), help="';'-separated algorithm specs")
    p.add_argument("--runs", default="runs", help="folder for the run folders")
    p.add_argument("--name", default="bench-async")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="2 workers, 16 steps, one network")
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.networks, args.steps = "2", NETWORKS[0], "16"
    worker_counts = [int(w) for w in args.workers.split(",") if w]
    steps = [int(s) for s in args.steps.split(",") if s]
    if len(steps) == 1:
        steps *= len(worker_counts)
    if len(steps) != len(worker_counts):
        raise SystemExit(f"--steps needs one value or one per worker count ({len(worker_counts)}), got {args.steps!r}")
    networks = [parse_network(n) for n in args.networks.split(",") if n]
    cells = []
    for workers, budget in zip(worker_counts, steps):
        for bandwidth, latency in networks:
            summary = run_cell(args, workers, budget, bandwidth, latency)
            cells.append({"workers": workers, "steps": budget, "bandwidth": bandwidth, "latency": latency,
                          "summary": summary})
            args.out.parent.mkdir(parents=True, exist_ok=True)  # written after every cell: nothing lost
            args.out.write_text(json.dumps({"command": " ".join(sys.argv), "cells": cells}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
