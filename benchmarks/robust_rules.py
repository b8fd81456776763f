"""Robust aggregation in real training: every rule clean and under every attack of ``--attack``.

For each scenario (clean with seeds 0 and 1, then one Byzantine rank of ``--workers`` under each
attack), one ``lowband train`` runs ddp four times from the same seed, once per rule::

    lowband train --algo "ddp;ddp:aggregate=median;ddp:aggregate=trimmed-mean;ddp:aggregate=centered-clip"
                  --attack ATTACK --workers 4 --steps 150 --bandwidth none

(ddp = the plain mean; trimmed-mean and centered-clip with their defaults: trim 0.25; tau = the
median distance to the centre, 3 iterations). Reported: each rule's final validation loss per
scenario, the clean seed noise (the mean's spread between seeds 0 and 1) and two verdicts per rule:
*clean*: not worse than the mean by more than the seed noise (at least 1%); *attacked*: better than
the mean under the attack, or within the seed noise of the clean mean (an attack the mean survives
leaves nothing to remove).

Run: ``python benchmarks/robust_rules.py`` (about 20 minutes on 2 cores; ``--steps 30`` for a
smoke run). Writes ``benchmarks/results/robust_rules.json`` (``--out``). Run it alone: it times
nothing, but four workers on two cores make it slow beside other jobs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "robust_rules.json"
RULES = {"mean": "ddp", "median": "ddp:aggregate=median", "trimmed-mean": "ddp:aggregate=trimmed-mean",
         "centered-clip": "ddp:aggregate=centered-clip"}
ATTACKS = {"sign flip": "signflip:ranks=0", "x(-10)": "scale:ranks=0,factor=-10",
           "noise std 1": "noise:ranks=0,std=1", "label flip": "labelflip:ranks=0"}


def train(attack: str | None, seed: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    """Final validation loss of each rule in one ``lowband train`` run."""
    name = f"{'clean' if attack is None else attack.split(':')[0]}-s{seed}"
    argv = [sys.executable, "-m", "lowband", "train", "--algo", ";".join(RULES.values()), "--workers",
            str(args.workers), "--steps", str(args.steps), "--eval-every", str(max(args.steps // 3, 1)),
            "--seed", str(seed), "--bandwidth", "none", "--latency", "none", "--no-progress",
            "--out", str(root), "--name", name] + ([] if attack is None else ["--attack", attack])
    print(f"  {name}: {' '.join(argv[3:])}", flush=True)
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lowband train failed ({name}):\n{done.stderr[-2000:]}")
    rows = {r["name"]: r for r in json.loads((root / name / "summary.json").read_text())["rows"]}
    return {rule: float(rows[label]["final_val_loss"]) for rule, label in RULES.items()}


def verdicts(results: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per rule: clean within the seed noise of the mean; under each attack better than the mean."""
    clean0, clean1 = results["clean seed 0"], results["clean seed 1"]
    noise = max(abs(clean0["mean"] - clean1["mean"]), 0.01 * clean0["mean"])
    out: dict[str, dict[str, Any]] = {}
    for rule in RULES:
        if rule == "mean":
            continue
        worst_clean = max(clean0[rule] - clean0["mean"], clean1[rule] - clean1["mean"])
        attacked = {}
        for scenario in ATTACKS:
            got, mean = results[scenario][rule], results[scenario]["mean"]
            attacked[scenario] = got < mean or got <= clean0["mean"] + noise
        out[rule] = {"clean_excess": worst_clean, "clean_ok": worst_clean <= noise, "attacked_ok": attacked}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lowband-robust-") as tmp:
        for seed in (0, 1):
            results[f"clean seed {seed}"] = train(None, seed, args, Path(tmp))
        for scenario, attack in ATTACKS.items():
            results[scenario] = train(attack, 0, args, Path(tmp))
    judged = verdicts(results)
    scenarios = list(results)
    print(f"\nfinal validation loss, ddp, {args.workers} workers, {args.steps} steps, one Byzantine rank (rank 0)")
    print(f"{'rule':<14}" + "".join(f"{s:>15}" for s in scenarios) + f"{'verdict':>12}")
    for rule in RULES:
        cells = "".join(f"{results[s][rule]:>15.3f}" for s in scenarios)
        verdict = "" if rule == "mean" else ("ok" if judged[rule]["clean_ok"] and all(
            judged[rule]["attacked_ok"].values()) else "see json")
        print(f"{rule:<14}{cells}{verdict:>12}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workers": args.workers, "steps": args.steps, "attacks": ATTACKS,
                                    "rules": RULES, "final_val_loss": results, "verdicts": judged}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
