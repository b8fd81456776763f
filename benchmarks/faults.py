"""Fault benchmark: a 4-worker elastic DiLoCo run with random kills and rejoins vs a fault-free run.

``python benchmarks/faults.py [--quick] [--kills N] [--seed S] [--algo SPEC]`` runs, with the same flags:

1. a fault-free ``lowband train --algo diloco --elastic`` run (``--algo``: any elastic algorithm,
   e.g. ``streaming-diloco``; results then go to ``faults-<algo>.json``);
2. the same run with ``LOWBAND_FAULT`` holding ``--kills`` SIGKILLs at random (replica, step,
   point), each replica's k-th kill aimed at its k-th incarnation (``incarnation=k``), and
   ``--rejoin-after`` restarting every killed worker (docs/elastic.md);

then prints a table and writes ``benchmarks/results/faults.json``: completed?, final validation
loss of both, training clock of both, time lost per failure (extra training-clock seconds /
kills: detection and recovery, including redone rounds), leaves/joins/redone rounds from
``events.jsonl``, and whether anything was lost (every surviving replica at the last step, all
with the same final global-model fingerprint).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from lowband.train.elastic import run_elastic
from lowband.train.flags import config_from_args

RESULTS = Path(__file__).parent / "results" / "faults.json"
POINTS = ("step", "step", "sync", "commit")  # kills between steps are the common case


def fault_plan(kills: int, workers: int, steps: int, inner: int, seed: int) -> str:
    """``kills`` random kills: replica, step in the middle 80% of the run, point; the k-th kill of a
    replica targets its k-th incarnation (a restarted worker that starts after the step dies at once)."""
    rng = random.Random(seed)
    per_replica: dict[int, int] = {}
    faults = []
    for step in sorted(rng.randint(max(inner, steps // 10), steps - steps // 10) for _ in range(kills)):
        replica = rng.randrange(workers)
        incarnation = per_replica.get(replica, 0)
        per_replica[replica] = incarnation + 1
        faults.append(f"kill:rank={replica},step={step},at={rng.choice(POINTS)},incarnation={incarnation}")
    return ";".join(faults)


def read_run(run_dir: Path, steps: int) -> dict[str, Any]:
    """Final val loss, training clock, events and fingerprints of an elastic run folder."""
    algo_dir = next(p for p in sorted(run_dir.iterdir()) if p.is_dir() and list(p.glob("rank*.jsonl")))
    last: dict[str, dict[str, Any]] = {}
    for f in sorted(algo_dir.glob("rank*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            last[f.stem] = {"row": rows[-1], "sha": next((r["params_sha"] for r in reversed(rows) if "params_sha" in r), None),
                            "val": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None)}
    events = [json.loads(line) for line in (algo_dir / "events.jsonl").read_text().splitlines()
              if line.strip()] if (algo_dir / "events.jsonl").exists() else []
    finished = {k: v for k, v in last.items() if v["row"]["step"] == steps}
    count = {kind: sum(e.get("event") == kind for e in events) for kind in ("leave", "join", "redo")}
    return {"finished_replicas": sorted(finished), "clock_s": max((v["row"]["time_s"] for v in finished.values()), default=None),
            "val_loss": next((v["val"] for v in finished.values()), None),
            "fingerprints": sorted({v["sha"] for v in finished.values()}), **count}


def run(name: str, flags: list[str], out: str, fault: str) -> tuple[dict[str, Any], float, str | None]:
    cfg = config_from_args([*flags, "--name", name, "--out", out])
    os.environ["LOWBAND_FAULT"] = fault
    started, error = time.monotonic(), None
    try:
        run_elastic(cfg, say=lambda line: print(f"  {name}: {line}", flush=True))
    except Exception as err:  # noqa: BLE001  (the table reports it)
        error = f"{type(err).__name__}: {err}"
    finally:
        os.environ.pop("LOWBAND_FAULT", None)
    return read_run(Path(out) / name, cfg.steps), time.monotonic() - started, error


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 kills, 120 steps (instead of 20 kills, 400 steps)")
    p.add_argument("--kills", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/faults")
    p.add_argument("--algo", default="diloco", help="an elastic algorithm spec (docs/elastic.md)")
    a = p.parse_args(argv)
    kills = a.kills if a.kills is not None else (4 if a.quick else 20)
    steps = a.steps if a.steps is not None else (120 if a.quick else 400)
    inner = 10
    flags = ["--algo", a.algo, "--elastic", "--min-workers", "2", "--workers", "4", "--steps", str(steps),
             "-H", str(inner), "--batch-size", "8", "--eval-every", str(steps // 4), "--eval-batches", "4",
             "--no-progress", "--elastic-timeout", "10"]
    plan = fault_plan(kills, 4, steps, inner, a.seed)
    tag = "" if a.algo == "diloco" else "-" + a.algo.partition(":")[0]
    clean, clean_wall, clean_err = run("clean" + tag, flags, a.out, "")
    faulty, faulty_wall, faulty_err = run("faults" + tag, [*flags, "--rejoin-after", "1"], a.out, plan)
    lost = None if clean["clock_s"] is None or faulty["clock_s"] is None else \
        (faulty["clock_s"] - clean["clock_s"]) / max(1, faulty["leave"])
    result = {
        "command": "python benchmarks/faults.py" + (" --quick" if a.quick else "") + (f" --algo {a.algo}" if tag else ""),
        "flags": flags,
        "kills_planned": kills, "fault_plan": plan, "clean": {**clean, "wall_s": clean_wall, "error": clean_err},
        "faults": {**faulty, "wall_s": faulty_wall, "error": faulty_err},
        "completed": faulty_err is None and bool(faulty["finished_replicas"]),
        "time_lost_per_failure_s": lost,
        "nothing_lost": faulty_err is None and len(faulty["fingerprints"]) == 1 and len(faulty["finished_replicas"]) >= 2,
    }
    path = RESULTS.with_name(f"faults{tag}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


def table(r: dict[str, Any]) -> str:
    c, f = r["clean"], r["faults"]

    def num(x: Any, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)
    return "\n".join([
        "| run | completed | final val loss | training clock | job wall-clock | leaves | joins | redone rounds | replicas at the end (same fingerprint) |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|:---|",
        f"| fault-free | {c['error'] is None} | {num(c['val_loss'])} | {num(c['clock_s'], '.1f')} s | {c['wall_s']:.0f} s | "
        f"{c['leave']} | {c['join']} | {c['redo']} | {len(c['finished_replicas'])} ({len(c['fingerprints']) == 1}) |",
        f"| {r['kills_planned']} kills | {r['completed']} | {num(f['val_loss'])} | {num(f['clock_s'], '.1f')} s | "
        f"{f['wall_s']:.0f} s | {f['leave']} | {f['join']} | {f['redo']} | "
        f"{len(f['finished_replicas'])} ({len(f['fingerprints']) == 1}) |",
        "", f"time lost per failure (training clock, detection + recovery + redone rounds): "
        f"{num(r['time_lost_per_failure_s'], '.2f')} s; nothing lost: {r['nothing_lost']}",
    ])


if __name__ == "__main__":
    main(sys.argv[1:])
