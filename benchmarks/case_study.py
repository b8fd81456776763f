"""The case study, ``docs/case-study.md``: training a small GPT over a slow WAN.

One command regenerates every number and figure of the page::

    python benchmarks/case_study.py

1. sweep ``case-study``: the char-GPT (0.82M parameters) on Shakespeare, 4 workers, 1 Gbit/s
   + 10 ms, 100 Mbit/s + 20 ms and 10 Mbit/s + 50 ms, seeds 0 and 1, ``--steps`` steps: every
   lowband method (data parallel with each family of compressor, the local-update family, the
   asynchronous and decentralised methods, the compressed optimizers, Dion) against the peers
   (PyTorch DDP and its hooks, post-local SGD, torchft's DiLoCo and Streaming DiLoCo);
2. sweep ``case-study-10m``: the same with ``gpt-10m`` (10.7M parameters), fewer steps and
   the main contenders;
3. the simulator's projection of every method of the 100 Mbit/s run (seed 0) to 1,024
   workers and a 1B-parameter model over 1 Gbit/s + 50 ms links;
4. the page: both sweeps' reports (tables and figures, copied to ``docs/case-study/``) and
   the projection table.

Both sweeps are ``lowband bench`` sweeps under ``--out`` (default ``runs``): resumable, so a
stopped run continues where it stopped when the command is run again. Seed 0 of both sweeps
runs first, then seed 1, so a study stopped half-way already has a complete single-seed page.
The whole study is about 8 hours of compute on 2 cores (most of it the methods that send the
whole model every step over 10 Mbit/s); ``--write-only`` rebuilds the page from what has finished, and
says what has not. ``--quick`` runs a 2-network, 1-seed, few-step version into
``case-study-quick`` (a smoke test; its page goes to the output folder, not to docs/).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

from lowband.bench.simulation import load_traces, make_target
from lowband.bench.summary import load_run
from lowband.bench.sweep import Entry, SweepSpec, run_sweep
from lowband.bench.sweep_report import write_sweep_report
from lowband.net.simulate import simulate
from lowband.net.units import format_bytes

NETWORKS = (("1gbit", "10ms"), ("100mbit", "20ms"), ("10mbit", "50ms"))
POWERSGD = "powersgd:rank=2,start_iter=2"  # as torch-powersgd runs it: rank 2, 2 uncompressed steps
EVERY = (
    Entry("ddp"), Entry("ddp", "fp16"), Entry("ddp", "qsgd:bits=4"), Entry("ddp", "topk:ratio=0.01", "ef"),
    Entry("ddp", POWERSGD, "ef"), Entry("ddp", "lgreco:warmup=20", "ef"), Entry("ddp", "sketch:ratio=0.01"),
    Entry("localsgd"), Entry("qsr"), Entry("diloco"), Entry("streaming-diloco"), Entry("eager-diloco"),
    Entry("delayed-diloco"), Entry("co2"), Entry("noloco"), Entry("gossip"), Entry("onebit-adam"),
    Entry("dist-lion"), Entry("dion"),
    Entry(peer="torch-ddp"), Entry(peer="torch-fp16"), Entry(peer="torch-powersgd"), Entry(peer="torch-postlocal"),
    Entry(peer="torchft-diloco"), Entry(peer="torchft-streaming"),
)
CONTENDERS = (Entry("ddp"), Entry("ddp", POWERSGD, "ef"), Entry("diloco"), Entry("streaming-diloco"),
              Entry("dion"), Entry(peer="torch-powersgd"), Entry(peer="torchft-diloco"))
PROJECTION = {"workers": 1024, "bandwidth": "1gbit", "latency": "50ms", "params": 1e9}
DOCS = Path(__file__).resolve().parent.parent / "docs"


def sweeps(args: argparse.Namespace) -> list[SweepSpec]:
    train = (("eval_batches", 4), ("eval_every", max(1, args.steps // 8)))
    if args.quick:
        return [SweepSpec(name="case-study-quick", workers=(2,), networks=NETWORKS[1:], entries=CONTENDERS[:4],
                          seeds=(0,), steps=args.steps, train=train)]
    small = SweepSpec(name="case-study", workers=(4,), networks=NETWORKS, entries=EVERY, seeds=(0, 1),
                      steps=args.steps, train=train)
    large = SweepSpec(name="case-study-10m", tasks=(("gpt-10m", "shakespeare"),), workers=(4,), networks=NETWORKS,
                      entries=CONTENDERS, seeds=(0, 1), steps=args.large_steps,
                      train=(("eval_batches", 4), ("eval_every", max(1, args.large_steps // 5))))
    return [small, large]


def projection(sweep_dir: Path) -> list[str]:
    """Markdown lines: every method of the 100 Mbit/s seed-0 cell projected to 1,024 workers, 1B params."""
    cells = sorted(sweep_dir.glob("*-100mbit-20ms-s0"))
    if not cells:
        return ["(the 100 Mbit/s cell has not run yet)"]
    lines = [f"| method | projected wall-clock | exposed comm / worker | utilisation | bytes / worker |",
             "|:---|---:|---:|---:|---:|"]
    for unit in sorted(p for p in cells[0].iterdir() if (p / "done.json").is_file()):
        run = load_run(unit)
        target = make_target(run, **PROJECTION)
        for trace in load_traces(run).values():
            p = simulate(trace, target)
            lines.append(f"| {p.label} | {p.wall_clock_s / 3600:.2f} h | {p.exposed_comm_s / 3600:.2f} h | "
                         f"{p.compute_s / p.wall_clock_s:.0%} | {format_bytes(p.bytes_sent_per_worker)} |")
    return lines


def write_page(specs: list[SweepSpec], args: argparse.Namespace) -> Path:
    page_dir = DOCS if not args.quick else Path(args.out)
    figures = page_dir / "case-study"
    figures.mkdir(parents=True, exist_ok=True)
    out = ["# Case study: training a small GPT over a slow WAN", "",
           "Every number and figure on this page is regenerated by one command (hours on 2 cores; resumable):",
           "", "```bash", "python benchmarks/case_study.py", "```", "",
           "4 workers (processes sharing this machine's 2 cores: compute per step is slower than on 4 machines, "
           "which the simulator's projection scales out), each behind its own emulated link "
           "(docs/emulation.md). Time and bytes to target: the first evaluation at or below the target loss "
           "(the lowest loss every method reached in every seed). Mean ± standard deviation over seeds.", ""]
    for spec in specs:
        sweep_dir = Path(args.out) / spec.name
        if not (sweep_dir / "sweep.json").is_file():
            out += [f"## {spec.name}", "", "(not run yet)", ""]
            continue
        try:
            write_sweep_report(sweep_dir)
        except FileNotFoundError as err:
            out += [f"## {spec.name}", "", f"({err})", ""]
            continue
        text = (sweep_dir / "report.md").read_text()
        for png in sweep_dir.glob("*.png"):
            shutil.copy2(png, figures / f"{spec.name}_{png.name}")
        text = re.sub(r"\]\(([^)]+\.png)\)", lambda m: f"](case-study/{spec.name}_{m.group(1)})", text)
        text = text.replace("\n## ", "\n### ").replace("# lowband bench:", f"## {spec.tasks[0][0]}:", 1)
        out += [text, ""]
        if spec is specs[0]:
            out += ["## Projected to 1,024 workers and a 1B-parameter model", "",
                    "`lowband simulate` (docs/simulator.md) on each method's 100 Mbit/s run, seed 0, targeting "
                    "1,024 workers, 1e9 parameters, 1 Gbit/s + 50 ms links, the measured compute per step scaled "
                    "by the parameter count:", "", *projection(sweep_dir), ""]
    page = page_dir / "case-study.md"
    page.write_text("\n".join(out) + "\n")
    return page


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="case_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="steps of the 0.82M-parameter sweep (default 150)")
    parser.add_argument("--large-steps", type=int, default=50, help="steps of the 10.7M-parameter sweep (default 50)")
    parser.add_argument("--out", default="runs")
    parser.add_argument("--write-only", action="store_true", help="rebuild the page from finished runs")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 workers, 2 networks, 1 seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 8)
    specs = sweeps(args)
    failed = 0
    if not args.write_only:
        stages = sorted({spec.seeds[:i + 1] for spec in specs for i in range(len(spec.seeds))}, key=len)
        for seeds in stages:  # seed 0 of every sweep first, then seed 1: a stopped study has a whole page
            for spec in specs:
                if spec.seeds[:len(seeds)] == seeds:
                    failed += len(run_sweep(dataclasses.replace(spec, seeds=seeds), Path(args.out)).failed)
    print(f"wrote {write_page(specs, args)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
