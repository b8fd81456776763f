"""Beyond fixed compressors: bytes per step and final validation loss of L-GreCo, sketching,
Dion and one-byte zeroth-order fine-tuning, against uncompressed, PowerSGD and DiLoCo.

The char-GPT on Shakespeare, ``--workers`` workers (default 4) over an emulated
``--bandwidth``/``--latency`` link (default 10 Mbit/s, 20 ms), one seed:

1. **pre-training** from scratch, ``--steps`` steps: ``ddp`` (fp32 all-reduce),
   ``ddp+powersgd:rank=4+ef``, ``ddp+lgreco+ef`` (layer-wise PowerSGD ranks 1-8 under the rank-4
   error budget, re-assigned every 25 steps after 25 steps of warm-up), ``ddp+sketch:ratio=0.01`` (shared-seed Gaussian sketch), ``diloco`` (H=20)
   and ``dion`` (low-rank orthonormalised updates);
2. **fine-tuning** for ``--ft-steps`` steps from one model pre-trained by data parallel for
   ``--pretrain-steps`` steps without an emulated link (a checkpoint, ``--init-from``), at lr
   3e-4, constant, no weight decay: ``zo-onebyte`` (one byte per worker per step) against
   ``ddp``, ``ddp+powersgd:rank=4+ef`` and ``diloco``.

Both phases are ``lowband bench`` sweeps (resumable: a finished run is not repeated), in
``--out`` (default ``runs``): ``extreme-pretrain``, ``extreme-init``, ``extreme-finetune``,
each with its report. Prints one table per phase and writes
``benchmarks/results/extreme.json``.

Run: ``python benchmarks/extreme.py`` (about 25 minutes on 2 cores) or ``--quick``
(2 workers, a few steps: a smoke test of the pipeline, no meaningful numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from lowband.bench.sweep import Entry, SweepSpec, folder_name, run_sweep
from lowband.bench.sweep_report import group_rows, load_groups, summarize_group, write_sweep_report
from lowband.net.units import format_bytes
from lowband.report.summary import load_run
from lowband.train.checkpoint import last_complete_step
from lowband.train.config import TrainConfig
from lowband.train.run import run

PRETRAIN = (Entry("ddp"), Entry("ddp", "powersgd:rank=4", "ef"), Entry("ddp", "lgreco:warmup=25,every=25", "ef"),
            Entry("ddp", "sketch:ratio=0.01"), Entry("diloco"), Entry("dion"))
FINETUNE = (Entry("ddp"), Entry("ddp", "powersgd:rank=4", "ef"), Entry("diloco"), Entry("zo-onebyte"))
FINETUNE_TRAIN = {"lr": 3e-4, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "extreme.json"


def phase(name: str, entries: Sequence[Entry], steps: int, args: argparse.Namespace,
          train: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one sweep (what is not done yet) and return its rows: bytes per step and losses."""
    spec = SweepSpec(name=name, workers=(args.workers,), networks=((args.bandwidth, args.latency),),
                     entries=tuple(entries), seeds=(0,), steps=steps,
                     train=tuple(sorted({"eval_every": max(1, steps // 4), "eval_batches": 4, **train}.items())))
    result = run_sweep(spec, Path(args.out))
    if result.failed:
        for unit, error in result.failed:
            print(f"failed: {unit.entry.label}: {error}", file=sys.stderr)
    write_sweep_report(Path(args.out) / name)
    _, groups = load_groups(Path(args.out) / name)
    rows = []
    for group in groups:
        chosen, per_seed = summarize_group(group, None)
        target = chosen.loss
        summary = per_seed[0]
        for r in group_rows(group, per_seed)[1]:
            s = summary.row(r["entry"])
            unit = Path(args.out) / name / f"{group.key}-s0" / folder_name(r["entry"])
            rows.append({"phase": name, "entry": r["entry"], "bytes_per_step": training_bytes(unit) / max(s.steps, 1),
                         "bytes_sent": s.bytes_sent_per_worker, "final_val_loss": s.final_val_loss,
                         "wall_clock_s": s.wall_clock_s, "comm_s": s.comm_s, "time_to_target_s": s.time_to_target_s,
                         "target_loss": target})
    return rows


def training_bytes(unit: Path) -> float:
    """Bytes sent per worker by the training itself: the ledgers without the initial broadcast."""
    ledgers = sorted(unit.glob("*/ledger_rank*.jsonl"))
    sent = [sum(r["sent"] for r in map(json.loads, path.read_text().splitlines()) if r.get("tag") != "init")
            for path in ledgers]
    return sum(sent) / len(sent) if sent else 0.0


def pretrained(args: argparse.Namespace) -> Path:
    """A data-parallel model trained ``--pretrain-steps`` steps (no emulated link): the fine-tuning start."""
    folder = Path(args.out) / "extreme-init" / "ddp"
    if last_complete_step(folder) != args.pretrain_steps:
        print(f"pre-training the fine-tuning start: ddp, {args.pretrain_steps} steps", file=sys.stderr)
        run(TrainConfig(algos=("ddp",), workers=args.workers, steps=args.pretrain_steps, bandwidth="none",
                        latency="none", checkpoint_every=args.pretrain_steps, eval_every=args.pretrain_steps,
                        out=args.out, name="extreme-init", progress=False))
    return folder


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(("entry", "bytes/step/worker", "sent/worker (with init)", "final val loss", "comm s", "wall-clock s")):
        table.add_column(header, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(r["entry"], format_bytes(r["bytes_per_step"]), format_bytes(r["bytes_sent"]),
                      "-" if r["final_val_loss"] is None else f"{r['final_val_loss']:.3f}", f"{r['comm_s']:.1f}",
                      f"{r['wall_clock_s']:.1f}")
    Console(width=120).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="extreme.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--bandwidth", default="10mbit")
    parser.add_argument("--latency", default="20ms")
    parser.add_argument("--steps", type=int, default=100, help="pre-training steps per worker (default 100)")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="steps of the fine-tuning start (default 200)")
    parser.add_argument("--ft-steps", type=int, default=50, help="fine-tuning steps per worker (default 50)")
    parser.add_argument("--quick", action="store_true", help="2 workers, a few steps (pipeline smoke test)")
    parser.add_argument("--out", default="runs", help="parent folder of the sweeps (default runs)")
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.steps, args.pretrain_steps, args.ft_steps = 2, 6, 4, 4
    pre = phase("extreme-pretrain", PRETRAIN, args.steps, args, {})
    start = pretrained(args)
    fine = phase("extreme-finetune", FINETUNE, args.ft_steps, args, {**FINETUNE_TRAIN, "init_from": str(start)})
    link = f"{args.workers} workers, {args.bandwidth} + {args.latency}"
    print_table(pre, f"pre-training, {args.steps} steps, {link}")
    start_loss = load_run(start.parent).records["ddp"][0][-1].get("val_loss")
    print_table(fine, f"fine-tuning from {start} ({args.pretrain_steps} ddp steps, val loss {start_loss:.3f}), "
                      f"{args.ft_steps} steps, {link}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                     "pretrain": pre, "finetune_start_val_loss": start_loss, "finetune": fine},
                                    indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
