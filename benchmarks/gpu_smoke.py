"""GPU smoke run: ddp, ddp + every compressor, diloco and streaming-diloco on CUDA, one table.

What a GPU machine runs first (docs/gpu.md), in a few minutes on one GPU: real training through
``lowband train``'s worker (one worker per GPU, NCCL; one GPU: a world of one, where the
compression pipeline still encodes and decodes every step), a few dozen steps of the small GPT
on Shakespeare each, then a check that every run finished with a finite loss. Also runs ddp and
diloco under bf16 autocast. Prints one table (loss, bytes sent per worker, step time) and writes
``benchmarks/results/gpu_smoke.json``; exits non-zero if any run failed or ended non-finite.

Run: ``python benchmarks/gpu_smoke.py`` (``--device cpu`` for a dry run of the script itself).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lowband.compress import COMPRESSORS
from lowband.report.summary import load_run, summarize
from lowband.train.config import TrainConfig
from lowband.train.launch import launch
from lowband.train.worker import main as worker_main

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_smoke.json"


@dataclass(frozen=True)
class Group:
    """One launch: algorithms x compressors under one precision."""

    name: str
    algos: tuple[str, ...]
    compress: tuple[str, ...] = ("default",)
    precision: str = "fp32"


def groups(compressors: Sequence[str]) -> list[Group]:
    return [
        Group("ddp-compressed", ("ddp",), tuple(compressors)),
        Group("local-updates", ("diloco:inner_steps=10", "streaming-diloco:inner_steps=10,fragments=2")),
        Group("bf16", ("ddp", "diloco:inner_steps=10"), precision="bf16"),
    ]


def run_group(group: Group, args: argparse.Namespace, workers: int) -> list[dict[str, Any]]:
    """Train one group; its rows (label, losses, bytes, step time, ok)."""
    name = f"gpu-smoke-{group.name}"
    cfg = TrainConfig(algos=group.algos, compress=group.compress, data=args.data, workers=workers,
                      steps=args.steps,
                      eval_every=max(1, args.steps // 2), warmup_steps=min(5, args.steps), device=args.device,
                      precision=group.precision, bandwidth=args.bandwidth, latency=args.latency,
                      out=str(args.runs), name=name, progress=False, threads=args.threads)
    launch(worker_main, workers, cfg)
    summary = summarize(load_run(Path(args.runs) / name))
    rows = []
    for row in summary.rows:
        loss = row.final_val_loss if row.final_val_loss is not None else row.final_train_loss
        steps = max(1, row.steps)
        rows.append({"group": group.name, "precision": group.precision, "run": row.name, "final_loss": loss,
                     "bytes_sent": int(row.bytes_sent_per_worker), "step_s": row.wall_clock_s / steps,
                     "ok": loss is not None and math.isfinite(loss)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--workers", type=int, default=None, help="default: one per GPU (1 with --device cpu)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compress", default=";".join(COMPRESSORS.names()), help="';'-separated compressor specs")
    p.add_argument("--only", default=None, help="run only these groups (';'-separated names)")
    p.add_argument("--data", default="shakespeare", help="a dataset name or any local text file (where the "
                   "shakespeare package is not installed)")
    p.add_argument("--bandwidth", default="1gbit")
    p.add_argument("--latency", default="1ms")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device: run it on a GPU machine, or --device cpu for a dry run", file=sys.stderr)
        return 2
    workers = args.workers or (torch.cuda.device_count() if args.device == "cuda" else 1)
    chosen = [g for g in groups([c for c in args.compress.split(";") if c])
              if args.only is None or g.name in args.only.split(";")]
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    started = time.perf_counter()
    for group in chosen:
        print(f"gpu_smoke: {group.name} ({len(group.algos)} algorithms x {len(group.compress)} compressors, "
              f"{group.precision}) on {workers} {args.device} worker(s)", file=sys.stderr, flush=True)
        try:
            rows += run_group(group, args, workers)
        except Exception as err:  # noqa: BLE001 - every failure is reported, then the next group runs
            traceback.print_exc()
            failures.append(f"{group.name}: {type(err).__name__}: {err}")
    failures += [f"{r['group']}/{r['run']}: final loss {r['final_loss']}" for r in rows if not r["ok"]]
    _print(rows)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    result = {"command": " ".join(sys.argv), "device": args.device, "device_name": device_name,
              "torch": torch.__version__, "workers": workers, "steps": args.steps,
              "seconds": round(time.perf_counter() - started, 1), "rows": rows, "failures": failures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s on {device_name})")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'group':<16} {'run':<44} {'prec':<5} {'final loss':>10} {'bytes/worker':>13} {'step s':>8}  ok")
    for r in rows:
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        print(f"{r['group']:<16} {r['run']:<44} {r['precision']:<5} {loss:>10} {r['bytes_sent']:>13,} "
              f"{r['step_s']:>8.3f}  {'yes' if r['ok'] else 'NO'}")


if __name__ == "__main__":
    raise SystemExit(main())
