"""How long does a run take to stop when asked? SIGINT (Ctrl-C) and SIGTERM to ``lowband train``.

For each scenario, ``--repeats`` times: start ``lowband train`` in its own session (as a terminal
starts it), wait for the moment the scenario names, send the signal to the driver, and time until
the driver has exited *and* no process of the run is left (every process of a run carries a marker
in its environment, read from /proc, so workers and elastic jobs are found too):

* ``ctrl-c training``: SIGINT once every rank has written a metrics row (``--workers`` workers);
* ``sigterm start-up``: SIGTERM ``--startup-delay`` seconds after the start (workers still importing);
* ``ctrl-c elastic``: SIGINT to an ``--elastic`` diloco run of 3 workers once they train.

Reported per scenario: median and worst seconds to a clean stop, the exit code (128 + signal
expected) and whether anything was left behind. Linux only (reads /proc).

Run: ``python benchmarks/shutdown.py`` (16 workers, 3 repeats: about 3 minutes on 2 cores) or
``--quick`` (4 workers, 1 repeat). Writes ``benchmarks/results/shutdown.json`` (``--out``). Run it
alone: the start-up it interrupts is CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "shutdown.json"
MARK = "LOWBAND_SHUTDOWN_BENCH"
COMMON = ["--batch-size", "4", "--steps", "5000", "--no-progress", "--bandwidth", "none", "--latency", "none",
          "--eval-every", "1000"]


def _marked(token: str) -> list[int]:
    """Live processes whose environment carries ``MARK=token`` (zombies excluded)."""
    needle, found = f"{MARK}={token}".encode(), []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes() and "Z" not in (environ.parent / "stat").read_text().rsplit(")", 1)[1][:3]:
                found.append(int(environ.parent.name))
        except (OSError, IndexError):
            continue
    return found


def _rows_written(run: Path, workers: int) -> bool:
    logs = list(run.glob("*/rank*.jsonl"))
    return len(logs) >= workers and all(p.stat().st_size > 0 for p in logs)


def one(flags: list[str], sig: signal.Signals, ready: Any, workers: int, timeout: float = 300.0) -> dict[str, Any]:
    """Start a run, wait until ``ready(run_dir, started)``, signal it, time the stop."""
    token = uuid.uuid4().hex
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs"
        env = {**os.environ, MARK: token, "TMPDIR": tmp}
        cmd = [sys.executable, "-m", "lowband", "train", *flags, "--out", str(out), "--name", "s"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        started = time.perf_counter()
        while not ready(out / "s", started) and proc.poll() is None and time.perf_counter() - started < timeout:
            time.sleep(0.05)
        signalled = time.perf_counter()
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        while _marked(token) and time.perf_counter() - signalled < timeout:
            time.sleep(0.02)
        stopped = time.perf_counter() - signalled
        left = _marked(token)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return {"seconds": stopped, "exit": proc.returncode, "left_behind": len(left),
                "signalled_after_s": signalled - started}


def scenarios(workers: int, startup_delay: float) -> dict[str, tuple[list[str], signal.Signals, Any, int]]:
    return {
        "ctrl-c training": (["--algo", "ddp", "--workers", str(workers), *COMMON], signal.SIGINT,
                            lambda run, _: _rows_written(run, workers), workers),
        "sigterm start-up": (["--algo", "ddp", "--workers", str(workers), *COMMON], signal.SIGTERM,
                             lambda _, started: time.perf_counter() - started >= startup_delay, workers),
        "ctrl-c elastic": (["--algo", "diloco", "-H", "5", "--elastic", "--workers", "3", *COMMON], signal.SIGINT,
                           lambda run, _: _rows_written(run, 3), 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--startup-delay", type=float, default=2.0, help="seconds after the start for SIGTERM")
    parser.add_argument("--quick", action="store_true", help="4 workers, 1 repeat")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("shutdown benchmark: Linux only (reads /proc)")
        return 2
    workers, repeats = (4, 1) if args.quick else (args.workers, args.repeats)
    rows = []
    print(f"{'scenario':<18} {'workers':>7} {'median s':>9} {'worst s':>8} {'exit':>5} {'left':>5}")
    for name, (flags, sig, ready, n) in scenarios(workers, args.startup_delay).items():
        runs = [one(flags, sig, ready, n) for _ in range(repeats)]
        seconds = [r["seconds"] for r in runs]
        row = {"scenario": name, "workers": n, "signal": sig.name, "median_s": statistics.median(seconds),
               "worst_s": max(seconds), "exits": sorted({r["exit"] for r in runs}),
               "left_behind": max(r["left_behind"] for r in runs), "runs": runs}
        rows.append(row)
        print(f"{name:<18} {n:>7} {row['median_s']:>9.2f} {row['worst_s']:>8.2f} "
              f"{','.join(map(str, row['exits'])):>5} {row['left_behind']:>5}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "repeats": repeats,
                                    "command": "python benchmarks/shutdown.py" + (" --quick" if args.quick else "")},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
