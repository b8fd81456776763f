"""Bad input: what the user sees. Every case is a mistaken ``lowband`` command, run as a subprocess.

Issue 23 ("errors before workers start"): a bad flag, file or spec must be refused by the parent
process before any worker starts, in one line that names the fix, with exit code 2 and no Python
traceback, and must leave nothing behind in the temp folder. This script runs each case of
:data:`CASES` (``python -m lowband.cli ...``) with a fresh private ``TMPDIR`` and ``--out`` folder
and records the exit code, the seconds until exit, the last line of stderr (the message), whether a
traceback appeared and whether anything was left in ``TMPDIR``. ``lowband train`` cases get tiny
settings (:data:`TRAIN_BASE`: 2 steps of ddp on 2 workers) so a case that is *not* refused early
still ends quickly; each subprocess has a timeout (``--timeout``, recorded as such).

Run: ``python benchmarks/bad_inputs.py`` (``--only NAME,...`` for some cases, ``--markdown`` for the
table of docs/robustness.md); writes ``benchmarks/results/bad_inputs.json`` (``--out``). Exits 1
when any case fails the bar (exit code not 2, a traceback, slower than ``--slow-after`` seconds,
files left in ``TMPDIR``), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bad_inputs.json"
TRACEBACK = "Traceback (most recent call last)"
# a case that is not refused still ends quickly: 2 steps of ddp on 2 workers, tiny batches
TRAIN_BASE = ("--algo", "ddp", "--steps", "2", "--workers", "2", "--batch-size", "2", "--eval-every", "1",
              "--eval-batches", "1", "--warmup-steps", "0", "--no-progress", "--out", "{out}")
Setup = Callable[[Path], Any]


# -- inputs the cases refer to ({in}/NAME) --------------------------------------------------------
def _write(name: str, data: bytes) -> Setup:
    """A setup writing ``data`` to ``{in}/name``."""
    return lambda folder: (folder / name).write_bytes(data)


def _folder(name: str) -> Setup:
    return lambda folder: (folder / name).mkdir()


def _spec(text: str) -> Setup:
    """A ``lowband bench`` spec at ``{in}/spec.toml``."""
    return _write("spec.toml", text.encode())


def _checkpoint(folder: Path, flip: bool = False, model: str = "gpt") -> None:
    """A real checkpoint file of ``model`` (the default GPT) at ``{in}/model.pt`` with its SHA-256 digest
    beside it (``model.pt.sha256``), as ``--checkpoint-every`` writes; ``flip``: one byte in the middle
    inverted afterwards."""
    import torch

    from lowband.train.checkpoint import save_checkpoint
    from lowband.train.data import Dataset
    from lowband.train.models import MODELS

    kind = "text" if model.startswith("gpt") else "image"
    stub = Dataset("stub", kind, torch.zeros(0), torch.zeros(0), vocab_size=84 if kind == "text" else 10)
    path = folder / "model.pt"
    save_checkpoint(path, {"model": MODELS.get(model)(stub).state_dict()})
    if flip:
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))


def _random_bytes(size: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


@dataclass(frozen=True)
class Case:
    """One bad command: ``lowband <argv>`` (``{in}``: the inputs folder, ``{out}``: an empty folder)."""

    name: str
    what: str  # the mistake, in words
    argv: tuple[str, ...]
    setup: Setup | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def train(self) -> bool:
        return self.argv[0] == "train"

    def command(self, inputs: Path, out: Path) -> list[str]:
        """The full argv after ``lowband``, tiny training settings first (the case's flags win)."""
        argv = [self.argv[0], *(TRAIN_BASE if self.train else ()), *self.argv[1:]]
        return [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in argv]

    def shown(self) -> str:
        """The command as the table shows it: paths by file name, without the tiny settings."""
        return "lowband " + " ".join(a.replace("{in}/", "").replace("{out}", "OUT") for a in self.argv)


def _train(name: str, what: str, *flags: str, setup: Setup | None = None, **env: str) -> Case:
    return Case(name, what, ("train", *flags), setup, env)


def _plan(name: str, what: str, flag: str, value: str) -> Case:
    """A ``lowband plan`` case: a valid plan (:data:`PLAN`) with ``flag`` set to ``value``."""
    given = {**PLAN, flag: value}
    return Case(name, what, ("plan", *(item for pair in given.items() for item in pair)))


PLAN = {"--params": "1e9", "--workers": "8", "--bandwidth": "1gbit", "--step-time": "1s", "--steps": "100"}
TEXT = b"To be, or not to be, that is the question.\n" * 100  # 4,300 characters: enough for block size 128
CASES: tuple[Case, ...] = (
    # --data
    _train("data-empty", "empty --data file", "--data", "{in}/empty.txt", setup=_write("empty.txt", b"")),
    _train("data-short", "--data too short for one block", "--data", "{in}/short.txt",
           setup=_write("short.txt", b"hello world\n")),
    _train("data-binary", "binary --data file", "--data", "{in}/blob.bin",
           setup=_write("blob.bin", _random_bytes(4096))),
    _train("data-missing", "--data path does not exist", "--data", "{in}/nope.txt"),
    _train("data-typo", "--data name misspelt", "--data", "shakespear"),
    _train("data-folder", "--data folder without *.txt", "--data", "{in}/folder", setup=_folder("folder")),
    # model and data
    _train("gpt-mnist", "--model gpt with image data", "--model", "gpt", "--data", "mnist"),
    _train("cnn-shakespeare", "--model cnn with text data", "--model", "cnn"),
    _train("cnn-textfile", "--model cnn with a text file", "--model", "cnn", "--data", "{in}/good.txt",
           setup=_write("good.txt", TEXT)),
    _train("gpt10m-mnist", "--model gpt-10m with image data", "--model", "gpt-10m", "--data", "mnist"),
    _train("model-unknown", "unknown --model", "--model", "resnet"),
    # --out
    _train("out-file", "--out is a file", "--out", "{in}/file", setup=_write("file", b"x")),
    # numbers
    _train("lr-nan", "--lr nan", "--lr", "nan"),
    _train("lr-inf", "--lr inf", "--lr", "inf"),
    _train("lr-negative", "--lr negative", "--lr=-0.1"),
    _train("steps-0", "--steps 0", "--steps", "0"),
    _train("steps-word", "--steps not a number", "--steps", "two"),
    _train("workers-0", "--workers 0", "--workers", "0"),
    _train("batch-0", "--batch-size 0", "--batch-size", "0"),
    _train("eval-every-0", "--eval-every 0", "--eval-every", "0"),
    _train("checkpoint-negative", "--checkpoint-every negative", "--checkpoint-every=-1"),
    _train("flag-typo", "misspelt flag", "--stpes", "2"),
    # machines (docs/multinode.md)
    _train("nnodes-no-endpoint", "--nnodes 2 without --rdzv-endpoint", "--nnodes", "2"),
    _train("node-rank-range", "--node-rank beyond --nnodes", "--nnodes", "2", "--node-rank", "2",
           "--rdzv-endpoint", "127.0.0.1:29400"),
    _train("endpoint-no-port", "--rdzv-endpoint without a port", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1"),
    _train("endpoint-not-here", "node 0 with another machine's --rdzv-endpoint", "--nnodes", "2",
           "--rdzv-endpoint", "203.0.113.9:29400"),
    _train("iface-unknown", "--iface naming no interface", "--iface", "eth9"),
    _train("nnodes-elastic", "--elastic across machines", "--elastic", "--algo", "diloco", "--nnodes", "2",
           "--rdzv-endpoint", "127.0.0.1:29400"),
    # algorithms, compressors, feedback, aggregation, attacks
    _train("algo-unknown", "unknown --algo", "--algo", "sgdx"),
    _train("algo-option", "unknown algorithm option", "--algo", "diloco:inner=5"),
    _train("compress-unknown", "unknown --compress", "--compress", "zip"),
    _train("compress-option", "unknown compressor option", "--compress", "topk:frac=0.1"),
    _train("compress-value", "compressor option out of range", "--compress", "topk:ratio=2"),
    _train("compress-type", "compressor option not a number", "--compress", "qsgd:bits=many"),
    _train("feedback-unknown", "unknown --feedback", "--feedback", "ef3"),
    _train("aggregate-unknown", "unknown --aggregate", "--aggregate", "mode"),
    _train("aggregate-value", "--aggregate option out of range", "--aggregate", "trimmed-mean:trim=0.9"),
    _train("aggregate-algo", "--aggregate with an algorithm that has none", "--algo", "gossip",
           "--aggregate", "median"),
    _train("attack-rank", "--attack rank beyond --workers", "--attack", "signflip:ranks=5"),
    _train("attack-unknown", "unknown --attack", "--attack", "flip:ranks=0"),
    # the network
    _train("bandwidth-word", "--bandwidth not a rate", "--bandwidth", "fast"),
    _train("bandwidth-negative", "--bandwidth negative", "--bandwidth=-5mbit"),
    _train("latency-unit", "--latency unknown unit", "--latency", "20parsecs"),
    _train("bandwidth-list", "--bandwidth list of the wrong length", "--bandwidth", "1gbit,1gbit,1gbit"),
    _train("sites-word", "--sites not integers", "--sites", "0,x"),
    _train("sites-count", "--sites of the wrong length", "--sites", "0,0,1", "--wan-bandwidth", "10mbit"),
    _train("worker-speed-range", "--worker-speed above 1", "--worker-speed", "2"),
    _train("worker-speed-word", "--worker-speed not numbers", "--worker-speed", "fast,slow"),
    _train("ring-order", "--ring not an order of the workers", "--ring", "0,0"),
    # checkpoints
    _train("resume-nothing", "--resume with nothing to resume", "--resume", "--name", "nothing"),
    _train("resume-no-name", "--resume without --name", "--resume"),
    _train("init-missing", "--init-from path does not exist", "--init-from", "{in}/nope.pt"),
    _train("init-random", "--init-from file of random bytes", "--init-from", "{in}/random.pt",
           setup=_write("random.pt", _random_bytes(2048, seed=1))),
    _train("init-flipped", "--init-from checkpoint with one byte flipped", "--init-from", "{in}/model.pt",
           setup=lambda folder: _checkpoint(folder, flip=True)),
    _train("init-other-model", "--init-from checkpoint of another model", "--init-from", "{in}/model.pt",
           setup=lambda folder: _checkpoint(folder, model="cnn")),
    _train("init-empty-folder", "--init-from folder without a checkpoint", "--init-from", "{in}/folder",
           setup=_folder("folder")),
    # --elastic
    _train("elastic-gpt-mnist", "--elastic with image data for gpt", "--elastic", "--algo", "diloco",
           "--data", "mnist"),
    _train("elastic-short", "--elastic with too-short --data", "--elastic", "--algo", "diloco",
           "--data", "{in}/short.txt", setup=_write("short.txt", b"hello world\n")),
    _train("elastic-ddp", "--elastic with ddp", "--elastic", "--algo", "ddp"),
    _train("min-workers", "--min-workers without --elastic", "--min-workers", "2"),
    # device and precision
    _train("device-cuda", "--device cuda without CUDA", "--device", "cuda", CUDA_VISIBLE_DEVICES=""),
    _train("fp16-ddp", "--precision fp16 with ddp", "--precision", "fp16"),
    # lowband bench
    Case("bench-task-int", "bench spec with task = [1]", ("bench", "{in}/spec.toml", "--out", "{out}"),
         _spec("task = [1]\n")),
    Case("bench-entry-int", "bench spec with entry = [1]", ("bench", "{in}/spec.toml", "--out", "{out}"),
         _spec("entry = [1]\n")),
    Case("bench-network-str", "bench spec with network = ['1gbit']",
         ("bench", "{in}/spec.toml", "--out", "{out}"), _spec("network = ['1gbit']\n")),
    Case("bench-train-int", "bench spec with train = 1", ("bench", "{in}/spec.toml", "--out", "{out}"),
         _spec("train = 1\n")),
    Case("bench-task-mismatch", "bench task cnn on shakespeare", ("bench", "{in}/spec.toml", "--out", "{out}"),
         _spec("[[task]]\nmodel = 'cnn'\ndata = 'shakespeare'\n\n[[network]]\nbandwidth = '1gbit'\n")),
    Case("bench-toml", "bench spec not TOML", ("bench", "{in}/spec.toml", "--out", "{out}"), _spec("task = [\n")),
    Case("bench-missing", "bench spec file missing", ("bench", "{in}/nope.toml", "--out", "{out}")),
    Case("bench-workers", "bench --workers not integers", ("bench", "--workers", "two", "--out", "{out}")),
    Case("bench-networks", "bench --networks without latency", ("bench", "--networks", "1gbit", "--out", "{out}")),
    # report, simulate, plan, the command itself
    Case("report-missing", "report of a folder that does not exist", ("report", "{in}/nope")),
    Case("simulate-missing", "simulate a folder that does not exist", ("simulate", "{in}/nope")),
    _plan("plan-params", "plan --params not a number", "--params", "big"),
    _plan("plan-bandwidth", "plan --bandwidth not a rate", "--bandwidth", "fast"),
    _plan("plan-worker-speed", "plan --worker-speed above 1", "--worker-speed", "2"),
    _plan("plan-steps", "plan --steps 0", "--steps", "0"),
    Case("command-typo", "misspelt command", ("trian",)),
)


# -- running ----------------------------------------------------------------------------------------
def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the case and every process it started (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_case(case: Case, timeout_s: float) -> dict[str, Any]:
    """Run one case in fresh folders; its row (command, exit code, seconds, message, traceback, leftovers)."""
    with tempfile.TemporaryDirectory(prefix=f"bad-{case.name}-") as root:
        inputs, tmp, out = Path(root) / "in", Path(root) / "tmp", Path(root) / "out"
        for folder in (inputs, tmp, out):
            folder.mkdir(mode=0o700)
        if case.setup is not None:
            case.setup(inputs)
        argv = [sys.executable, "-m", "lowband.cli", *case.command(inputs, out)]
        env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1", **case.env}
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            code = None
        seconds = time.monotonic() - started
        text_err = stderr.decode(errors="replace")
        output = stdout.decode(errors="replace") + text_err
        text_err = text_err.replace(f"{inputs}/", "").replace(str(out), "OUT")  # as the table shows commands
        lines = [line.strip() for line in text_err.splitlines() if line.strip()]
        return {"case": case.name, "what": case.what, "command": case.shown(),
                "exit": code, "timed_out": code is None, "seconds": round(seconds, 2),
                "message": lines[-1] if lines else "", "stderr_lines": len(lines),
                "traceback": TRACEBACK in output, "tmp_left": _files_under(tmp), "out_written": _files_under(out)}


def verdict(row: dict[str, Any], slow_after: float) -> list[str]:
    """What is wrong with a case's outcome ([] when it is refused as it should be)."""
    wrong = []
    if row["timed_out"]:
        wrong.append("timed out")
    elif row["exit"] != 2:
        wrong.append(f"exit {row['exit']}")
    if row["traceback"]:
        wrong.append("traceback")
    if row["seconds"] > slow_after:
        wrong.append(f"slow ({row['seconds']:.0f} s)")
    if row["tmp_left"]:
        wrong.append(f"{len(row['tmp_left'])} file(s) left in TMPDIR")
    if not row["message"]:
        wrong.append("no message")
    return wrong


def markdown(rows: Sequence[dict[str, Any]], command: str, date: str) -> str:
    """The table of docs/robustness.md: one row per case."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = [f"Produced by `{command}` on {date} ({len(rows)} cases; `lowband train` cases run with "
           f"`{' '.join(TRAIN_BASE).replace('{out}', 'OUT')}` before the flags shown).", "",
           "| # | bad input | command | exit | s | message |", "|---|---|---|---|---|---|"]
    for i, row in enumerate(rows, 1):
        code = "timeout" if row["timed_out"] else str(row["exit"])
        out.append(f"| {i} | {cell(row['what'])} | `{cell(row['command'])}` | {code} | {row['seconds']:.1f} | "
                   f"{cell(row['message'])} |")
    wrong = [f"{row['command']} ({', '.join(row['wrong'])})" for row in rows if row.get("wrong")]
    tracebacks, left = sum(bool(r.get("traceback")) for r in rows), sum(bool(r.get("tmp_left")) for r in rows)
    slowest = max((r["seconds"] for r in rows), default=0.0)
    usage = sum(r.get("stderr_lines", 1) > 1 for r in rows)  # argparse's syntax errors print its usage first
    out += ["", f"{len(rows) - len(wrong)} of {len(rows)} refused as they should be (exit code 2, the message as the "
                f"last line: {len(rows) - usage} print only that line, {usage} argparse's usage above it); "
                f"{tracebacks} printed a traceback, {left} left files in TMPDIR; slowest {slowest:.1f} s (mostly the "
                "Python and torch imports)." + (f" Not yet: {'; '.join(wrong)}." if wrong else "")]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated case names (default: every case)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a case is killed")
    p.add_argument("--slow-after", type=float, default=15.0,
                   help="a case slower than this many seconds fails the bar (workers started?)")
    p.add_argument("--markdown", action="store_true", help="print the Markdown table for docs/robustness.md")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output")
    args = p.parse_args(argv)
    cases = list(CASES)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {c.name for c in CASES})
        if unknown:
            p.error(f"unknown case(s) {', '.join(unknown)}: see --list")
        cases = [c for c in CASES if c.name in wanted]
    if args.list:
        for case in cases:
            print(f"{case.name:<22} {case.shown()}")
        return 0
    rows, failed = [], 0
    for case in cases:
        row = run_case(case, args.timeout)
        row["wrong"] = verdict(row, args.slow_after)
        failed += bool(row["wrong"])
        rows.append(row)
        if not args.markdown:
            mark = "ok " if not row["wrong"] else "BAD"
            print(f"{mark} {case.name:<22} exit {str(row['exit']):<4} {row['seconds']:6.2f} s  {row['message'][:90]}"
                  + (f"  [{', '.join(row['wrong'])}]" if row["wrong"] else ""), flush=True)
    command = " ".join(["python", "benchmarks/bad_inputs.py", *(sys.argv[1:] if argv is None else argv)])
    date = time.strftime("%Y-%m-%d")
    if args.markdown:
        print(markdown(rows, command, date))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command,
                                    "date": date, "python": platform.python_version(), "cpus": os.cpu_count(),
                                    "cases": len(rows), "failed": failed, "rows": rows}, indent=2) + "\n")
    print(f"{len(rows) - failed}/{len(rows)} cases refused as they should be (exit 2, a message, no traceback, "
          f"fast, nothing left in TMPDIR); wrote {args.out}", file=sys.stderr if args.markdown else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
