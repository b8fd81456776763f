"""Fewer synchronisations: data parallel vs every local-update method, and torchft as the peer.

Trains the char-GPT on Shakespeare across real worker processes over an emulated link
(default 4 workers, 400 steps, 100 Mbit/s + 20 ms: the main job's task), once per
algorithm with the same seed and token budget — ddp, localsgd, qsr, diloco,
streaming-diloco, eager-diloco, delayed-diloco — then, if torchft 0.2.0 is installed
(``make peers``), torchft's DiLoCo and Streaming DiLoCo on the same task and link into the
same run folder. Reports final validation loss, bytes, peak bytes per step, exposed
communication, overlap, wall-clock and time to a target loss (``lowband report``).

Run: ``python benchmarks/local_updates.py`` (about 25 minutes here) or ``--quick``
(2 workers, 40 steps). Writes ``benchmarks/results/local_updates.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Sequence

from lowband.report.render import show_report
from lowband.report.summary import load_run, summarize
from lowband.train.config import TrainConfig
from lowband.train.launch import launch
from lowband.train.worker import main as worker_main

ALGOS = ("ddp", "localsgd", "qsr", "diloco", "streaming-diloco", "eager-diloco", "delayed-diloco")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "local_updates.json"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--bandwidth", default="100mbit")
    p.add_argument("--latency", default="20ms")
    p.add_argument("--algo", default=";".join(ALGOS), help="';'-separated algorithm specs")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip torchft even if installed")
    p.add_argument("--runs", default="runs", help="folder for the run folder")
    p.add_argument("--name", default="bench-local-updates")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="2 workers, 40 steps")
    args = p.parse_args(argv)
    cfg = TrainConfig(
        algos=tuple(a for a in args.algo.split(";") if a), workers=2 if args.quick else args.workers,
        steps=40 if args.quick else args.steps, eval_every=10 if args.quick else 25,
        warmup_steps=5 if args.quick else 20, inner_steps=8 if args.quick else 20,
        bandwidth=args.bandwidth, latency=args.latency, out=args.runs, name=args.name,
    )
    run_dir = Path(args.runs) / args.name
    print(f"local updates: {len(cfg.variants())} algorithms, {cfg.steps} steps on {cfg.workers} workers",
          file=sys.stderr)
    launch(worker_main, cfg.workers, cfg)
    peers = []
    if args.peers and importlib.util.find_spec("torchft") is not None:
        from lowband.bench.peers.torchft_diloco import run_torchft

        for streaming in (False, True):
            run_torchft(cfg, run_dir, streaming=streaming)
            peers.append("torchft-streaming" if streaming else "torchft-diloco")
    elif args.peers:
        print("torchft is not installed (make peers): the peer rows are left out", file=sys.stderr)
    show_report(run_dir)
    summary = summarize(load_run(run_dir))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "peers": peers,
                                    "summary": summary.to_dict()}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
