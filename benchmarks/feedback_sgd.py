"""Error feedback where its papers measure it: an SGD-with-momentum inner optimizer, every compressor
with none / ef / ef21 / econtrol, on the char-GPT and on the CNN.

The EF literature (Seide et al. 2014; Karimireddy et al., "Error Feedback Fixes SignSGD",
arXiv:1901.09847; Stich et al. 2018; EF21, arXiv:2106.05203; EControl, arXiv:2311.05645) trains
with SGD: the residual a compressor drops is added back to the next gradient, which SGD applies
linearly. lowband's own sweep (docs/compression.md) measured EF with AdamW, where the residual
passes through Adam's per-coordinate normalisation, and EF hurt every compressor but PowerSGD and
threshold. This benchmark measures the pairing the papers use. Per task, one ``lowband train``:

    lowband train --algo ddp --optimizer sgd --momentum 0.9 --lr LR --weight-decay 0
                  --compress "identity;topk:ratio=0.01;sign;powersgd:rank=2;randomk:ratio=0.01;qsgd:bits=4"
                  --feedback "none;ef;ef21;econtrol" --workers 4 --steps STEPS --bandwidth none

(identity runs once: feedback has nothing to correct). Tasks: ``gpt`` on shakespeare (lr 0.1, the
best of 0.03 / 0.05 / 0.1 / 0.3 / 1.0 for uncompressed ddp at 100 steps here: docs/compression.md
names the command) and ``cnn`` on mnist (lr 0.05, not tuned). Reported: final validation loss per compressor and feedback, and per compressor which
feedback is best and by how much against none.

Run: ``python benchmarks/feedback_sgd.py`` (about 40 minutes on 2 cores; ``--steps 20`` for a smoke
run). Writes ``benchmarks/results/feedback_sgd.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "feedback_sgd.json"
COMPRESSORS = ("topk:ratio=0.01", "sign", "powersgd:rank=2", "randomk:ratio=0.01", "qsgd:bits=4")
FEEDBACKS = ("none", "ef", "ef21", "econtrol")
TASKS = {"gpt": {"model": "gpt", "data": "shakespeare", "lr": 0.1, "batch": 16},
         "cnn": {"model": "cnn", "data": "mnist", "lr": 0.05, "batch": 32}}


def train(task: str, args: argparse.Namespace, root: Path) -> dict[str, float]:
    """Final validation loss per run label of one task (``ddp+<compressor>+<feedback>``)."""
    t = TASKS[task]
    argv = [sys.executable, "-m", "lowband", "train", "--algo", "ddp", "--model", t["model"], "--data", t["data"],
            "--optimizer", "sgd", "--momentum", "0.9", "--lr", str(t["lr"]), "--weight-decay", "0",
            "--batch-size", str(t["batch"]), "--compress", ";".join(("identity", *COMPRESSORS)),
            "--feedback", ";".join(FEEDBACKS), "--workers", str(args.workers), "--steps", str(args.steps),
            "--eval-every", str(max(args.steps // 4, 1)), "--bandwidth", "none", "--latency", "none",
            "--no-progress", "--out", str(root), "--name", task]
    print(f"  {task}: {' '.join(argv[3:])}", flush=True)
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lowband train failed ({task}):\n{done.stderr[-2000:]}")
    rows = json.loads((root / task / "summary.json").read_text())["rows"]
    return {r["name"]: float(r["final_val_loss"]) for r in rows}


def table(losses: dict[str, float]) -> list[dict[str, Any]]:
    """One row per compressor: the loss with each feedback and the best feedback's gain over none."""
    rows = []
    for spec in COMPRESSORS:
        got = {fb: next((v for k, v in losses.items() if k.startswith(f"ddp+{spec}") and
                         (k.endswith(f"+{fb}") if fb != "none" else k == f"ddp+{spec}")), None) for fb in FEEDBACKS}
        known = {fb: v for fb, v in got.items() if v is not None}
        best = min(known, key=known.__getitem__) if known else None
        rows.append({"compressor": spec, **got, "best": best,
                     "best_vs_none": None if best is None or got["none"] is None else known[best] - got["none"]})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tasks", default="gpt,cnn", help="comma-separated: gpt, cnn")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lowband-efsgd-") as tmp:
        for task in args.tasks.split(","):
            losses = train(task, args, Path(tmp))
            results[task] = {"fp32": losses.get("ddp"), "rows": table(losses), "all": losses}
    for task, result in results.items():
        print(f"\n{task}: final val loss, ddp + SGD momentum 0.9 (lr {TASKS[task]['lr']}), {args.workers} workers, "
              f"{args.steps} steps; fp32 {result['fp32']:.3f}")
        print(f"{'compressor':<20}" + "".join(f"{fb:>10}" for fb in FEEDBACKS) + f"{'best':>10}")
        for row in result["rows"]:
            cells = "".join("         -" if row[fb] is None else f"{row[fb]:>10.3f}" for fb in FEEDBACKS)
            print(f"{row['compressor']:<20}{cells}{row['best'] or '-':>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workers": args.workers, "steps": args.steps, "tasks": TASKS,
                                    "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
