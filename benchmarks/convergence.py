"""Does compression pay on a slow link? Every compressor, with and without error feedback.

Trains the char-GPT on Shakespeare with data parallel across real worker processes over an
emulated link, once per (compressor, feedback) with the same seed and token budget, and
reports final validation loss, bytes sent per worker, bytes per step and emulated
wall-clock against uncompressed data parallel (the first row). It is ``lowband train``
with a list of ``--compress`` and ``--feedback`` values; the run folder keeps every
rank's metrics and the HTML report.

Run: ``python benchmarks/convergence.py`` (4 workers, 200 steps, 100 Mbit/s + 20 ms: about
half an hour here) or ``--quick`` (2 workers, 20 steps, a few compressors: a smoke test).
Writes ``benchmarks/results/convergence.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from lowband.compress import COMPRESSORS
from lowband.report.render import show_report
from lowband.report.summary import load_run, summarize
from lowband.train.config import TrainConfig
from lowband.train.launch import launch
from lowband.train.worker import main as worker_main

# The recommended setting of each compressor (and of its feedback where it has its own).
RECOMMENDED = {
    "identity": "identity", "fp16": "fp16", "bf16": "bf16", "int8": "int8", "qsgd": "qsgd:bits=4",
    "terngrad": "terngrad", "sign": "sign", "topk": "topk:ratio=0.01", "randomk": "randomk:ratio=0.01",
    "threshold": "threshold:tau=0.001", "dgc": "dgc:ratio=0.01", "powersgd": "powersgd:rank=2",
}
QUICK = ("identity", "fp16", "topk:ratio=0.01", "powersgd:rank=2")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "convergence.json"


def default_compressors() -> list[str]:
    """Every registered compressor, at its recommended setting (unknown ones at defaults)."""
    names = ["identity"] + [n for n in COMPRESSORS.names() if n != "identity"]
    return [RECOMMENDED.get(n, n) for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--bandwidth", default="100mbit")
    p.add_argument("--latency", default="20ms")
    p.add_argument("--compress", default=None, help="';'-separated specs (default: every compressor, recommended settings)")
    p.add_argument("--feedback", default="none;ef", help="';'-separated feedback kinds")
    p.add_argument("--algo", default="ddp", help="ddp, or diloco to compress the outer gradient")
    p.add_argument("--runs", default="runs", help="folder for the run folder")
    p.add_argument("--name", default="bench-convergence")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="2 workers, 20 steps, 4 compressors")
    args = p.parse_args(argv)
    compress = tuple(args.compress.split(";")) if args.compress else (QUICK if args.quick else tuple(default_compressors()))
    cfg = TrainConfig(
        algos=(args.algo,), compress=compress, feedback=tuple(args.feedback.split(";")),
        workers=2 if args.quick else args.workers, steps=20 if args.quick else args.steps,
        eval_every=10 if args.quick else 25, warmup_steps=5 if args.quick else 20,
        bandwidth=args.bandwidth, latency=args.latency, out=args.runs, name=args.name,
    )
    print(f"convergence: {len(cfg.variants())} runs of {cfg.steps} steps on {cfg.workers} workers", file=sys.stderr)
    launch(worker_main, cfg.workers, cfg)
    run_dir = Path(args.runs) / args.name
    show_report(run_dir)
    summary = summarize(load_run(run_dir))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "summary": summary.to_dict()}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
