"""Each paper's headline comparison, in miniature, on lowband's own task (issue 27).

docs/faithfulness.md checks nine algorithms' steps against their papers; this script measures what
each paper claims in its headline comparison (the page's "Headline comparisons" table) on the task
``lowband train`` trains by default: the 0.82M-parameter char-GPT on Shakespeare, 4 worker processes,
no emulated link (``bandwidth="none"``: losses, bytes and synchronisations do not depend on the link).
Each claim becomes a direction and a rough size here, with its rules as data in
``benchmarks/faithfulness_claims.py`` (e.g. eager-diloco: final validation loss within 0.05 of diloco
at the same H; streaming-diloco: within 0.05 of diloco with >= 4x fewer peak bytes per step and
>= 10x fewer bytes than ddp). Per seed, one launch trains every variant the chosen claims need from the
same seed::

    lowband train --algo "ddp;diloco:inner_steps=10;localsgd:inner_steps=4;eager-diloco:inner_steps=10;
                          delayed-diloco:inner_steps=10;co2:inner_steps=10;streaming-diloco:inner_steps=10;
                          noloco:inner_steps=10;qsr;dist-lion;onebit-adam:freeze_step=24;dion"
                  --workers 4 --steps 120 --eval-every 30 --eval-batches 8 --seed S --bandwidth none

The DiLoCo family runs at H = 10 (12 rounds of 120 steps): docs/local-updates.md ("The one-round delay
on short runs") measured that H = 10 halves the overlapped methods' gap on a short run; diloco runs at
the same H as the reference. qsr keeps its defaults (H_base 4) against localsgd at H = 4; onebit-adam
warms up in fp32 for 20% of the steps (the paper: 15-25%). Bytes, peak bytes per step, synchronisations
and op kinds come from the ledgers; losses from rank 0's last evaluation. Every comparison is paired by
seed, mean +- sd over the seeds; a row "matches" when every check of its claim holds within that noise,
else "differs: " and what was measured.

Run: ``python benchmarks/faithfulness.py`` (2 seeds, 12 variants of 120 steps each: about 25 minutes on
2 cores; run it alone). ``--quick``: 2 workers, 16 steps, 1 seed, to check the pipeline (under 90 s).
Writes ``benchmarks/results/faithfulness.json`` (``--out``) and the Markdown table beside it (``.md``),
ready to paste into docs/faithfulness.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from lowband.report.summary import Run, load_run, summarize
from lowband.train.config import TrainConfig, Variant
from lowband.train.launch import launch
from lowband.train.worker import main as worker_main

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when loaded by path (tests)
from faithfulness_claims import BY_NAME, CLAIMS, Measure, judge, settings_for, variants  # noqa: E402

ALGOS = tuple(claim.algorithm for claim in CLAIMS)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "faithfulness.json"
COLUMNS = ("algorithm", "paper claim", "lowband measured", "verdict")
FULL: dict[str, Any] = {"workers": 4, "steps": 120, "inner_steps": 10, "seeds": "0,1", "eval_batches": 8}
QUICK: dict[str, Any] = {"workers": 2, "steps": 16, "inner_steps": 4, "seeds": "0", "eval_batches": 2}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, help=f"default {FULL['workers']} ({QUICK['workers']} with --quick)")
    p.add_argument("--steps", type=int, help=f"default {FULL['steps']} ({QUICK['steps']} with --quick)")
    p.add_argument("--inner-steps", type=int, help=f"H of the DiLoCo family and its diloco reference: default "
                   f"{FULL['inner_steps']} ({QUICK['inner_steps']} with --quick)")
    p.add_argument("--seeds", help=f"comma-separated seeds: default {FULL['seeds']} ({QUICK['seeds']} with --quick)")
    p.add_argument("--algo", default=",".join(ALGOS), help=f"claims to measure, comma-separated: {', '.join(ALGOS)}")
    p.add_argument("--eval-batches", type=int, help=f"held-out batches per evaluation: default {FULL['eval_batches']} "
                   f"({QUICK['eval_batches']} with --quick)")
    p.add_argument("--runs", default="runs", help="folder for the run folders (one per seed)")
    p.add_argument("--name", default="faithfulness")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON; the Markdown table goes beside it (.md)")
    p.add_argument("--quick", action="store_true", help="2 workers, 16 steps, H = 4, seed 0: a pipeline check")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():  # flags given explicitly win
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.algo = [a for a in re.split(r"[,;]", args.algo) if a.strip()]
    unknown = [a for a in args.algo if a not in BY_NAME]
    if unknown or not args.seeds:
        p.error(f"unknown --algo {', '.join(unknown)} (choose from {', '.join(ALGOS)})" if unknown else "give --seeds")
    return args


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every launch shares: lowband's default lr warm-up of 20 steps (a sixth of a shorter run),
    four evaluations, no emulated link."""
    return {"workers": args.workers, "steps": args.steps, "seeds": args.seeds, "warmup_steps": min(20, args.steps // 6),
            "eval_every": max(args.steps // 4, 1), "eval_batches": args.eval_batches, "bandwidth": "none"}


def config(args: argparse.Namespace, specs: dict[str, str], seed: int) -> TrainConfig:
    """One seed's launch: every variant the claims need, from ``seed``."""
    shared = run_settings(args)
    return TrainConfig(algos=tuple(specs.values()), workers=args.workers, steps=args.steps, seed=seed,
                       warmup_steps=shared["warmup_steps"], eval_every=shared["eval_every"],
                       eval_batches=args.eval_batches, bandwidth="none", latency="none", out=args.runs,
                       name=f"{args.name}-s{seed}", progress=False)


def training_ops(path: Path) -> list[dict[str, Any]]:
    """The ledger's records without the initial broadcast (none when the file is missing)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("tag") != "init" and r.get("step")]


def measure(run: Run, label: str, loss: float | None) -> Measure:
    """One variant's numbers: its final validation loss and, from its ledgers, bytes, peak, syncs, ops, bits."""
    folder = run.path / (run.meta.get("folders") or {}).get(label, label)
    params = max(int(run.meta.get("params") or 1), 1)
    ledgers = [training_ops(folder / f"ledger_rank{r}.jsonl") for r, rows in enumerate(run.records[label]) if rows]
    rank0 = ledgers[0] if ledgers else []
    per_step: list[Counter[int]] = [Counter() for _ in ledgers]
    for counts, ops in zip(per_step, ledgers):
        for op in ops:
            counts[op["step"]] += op["sent"]
    syncs = len({op["step"] for op in rank0})
    return Measure(
        loss=float("nan") if loss is None else float(loss),
        bytes=sum(sum(op["sent"] for op in ops) for ops in ledgers) / max(len(ledgers), 1),
        peak=float(max((max(c.values(), default=0) for c in per_step), default=0)),
        syncs=syncs, ops=tuple(sorted({op["op"] for op in rank0})),
        payload_bits=8 * sum(op["payload"] for op in rank0) / params / max(syncs, 1),
        wire_bits=8 * sum(op["sent"] for op in rank0) / params / max(syncs, 1),
    )


def train_seed(args: argparse.Namespace, specs: dict[str, str], seed: int) -> dict[str, Measure]:
    """Train every variant from ``seed`` in one launch; their measures by name."""
    cfg = config(args, specs, seed)
    print(f"seed {seed}: {len(specs)} variants, {cfg.steps} steps on {cfg.workers} workers", file=sys.stderr,
          flush=True)
    launch(worker_main, cfg.workers, cfg)
    run = load_run(Path(cfg.out) / str(cfg.name))
    summary = summarize(run)
    labels = {name: Variant(spec).label for name, spec in specs.items()}
    return {name: measure(run, label, summary.row(label).final_val_loss) for name, label in labels.items()}


def table_rows(args: argparse.Namespace, specs: dict[str, str], measures: dict[int, dict[str, Measure]],
               settings: dict[str, int]) -> list[dict[str, Any]]:
    """One judged row per chosen claim, with the specs it compared."""
    by_name = {name: [measures[seed][name] for seed in args.seeds] for name in specs}
    rows = []
    for name in args.algo:
        row = judge(BY_NAME[name], by_name, settings)
        refs = sorted({c.ref for c in BY_NAME[name].checks if c.ref is not None} | {"ddp"})
        rows.append({**row, "spec": specs[name], "references": {r: specs[r] for r in refs}})
    return rows


def header(args: argparse.Namespace, settings: dict[str, int]) -> str:
    """The settings every row shares, in one line."""
    return (f"char-GPT on Shakespeare, {args.workers} workers, {args.steps} steps, no emulated link, seeds "
            f"{', '.join(map(str, args.seeds))} (mean ± sd over seeds, paired by seed); DiLoCo family at "
            f"H = {settings['h']}, localsgd at H = {settings['h_base']}, onebit-adam freeze_step {settings['freeze']}")


def cells(row: dict[str, Any]) -> tuple[str, str, str, str]:
    return (f"{row['algorithm']} (`{row['spec']}`)", f"{row['paper_claim']}; here: {row['here']}", row["measured"],
            row["verdict"])


def show(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title, title_justify="left", show_lines=True)
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*cells(row))
    Console(width=180).print(table)


def markdown(rows: list[dict[str, Any]], title: str, command: str) -> str:
    lines = [f"Measured with `{command}`: {title}.", "", "| " + " | ".join(COLUMNS) + " |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """NaN (a diverged run's loss) as null: strict JSON."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in values.items()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    settings = settings_for(args.steps, args.inner_steps)
    specs = variants(args.algo, settings)
    measures = {seed: train_seed(args, specs, seed) for seed in args.seeds}
    rows = table_rows(args, specs, measures, settings)
    title = header(args, settings)
    command = "python benchmarks/faithfulness.py " + " ".join(sys.argv[1:] if argv is None else argv)
    show(rows, title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    per_seed = {str(seed): {name: _finite(asdict(m)) for name, m in ms.items()} for seed, ms in measures.items()}
    args.out.write_text(json.dumps({"command": command.strip(), "settings": {**settings, **run_settings(args)},
                                    "variants": specs, "rows": rows, "measures": per_seed}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, title, command.strip()))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
