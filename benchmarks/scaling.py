"""Bytes per worker of a compressed mean as the number of workers grows (issue 26): measured, then projected.

For n = 2, 4, 8, 16 real worker processes (gloo, this machine), each rank averages the same set of
tensors (the char-GPT's parameter shapes, 0.82M floats, seeded per rank) once through
:class:`lowband.comm.aggregate.Aggregator` with

* ``fp32``: identity, a ring all-reduce (the baseline every ratio is taken against);
* ``all-gather``: 4-bit QSGD, every rank's payload all-gathered (the path before issue 26);
* ``two-phase``: 4-bit QSGD through the quantised reduce-scatter + all-gather
  (:mod:`lowband.comm.two_phase`);
* ``requant 8``: the same, its reduced shards requantised at 8 bits (option ``requant=qsgd:bits=8``);

and the ledger's bytes sent by rank 0 are reported, with the relative error of each mean against
the exact fp32 mean. Then the two-phase ops recorded at the largest n are priced by the
simulator's cost functions (:func:`lowband.predict.schedule.op_cost`) at 1,024 and 10,240
workers, beside the all-gather path's and fp32's. Bytes are deterministic (no timing here).

Run: ``python benchmarks/scaling.py`` (about a minute on 2 cores; ``--quick``: n = 2, 4).
Writes ``benchmarks/results/scaling.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.comm import Comm, group
from lowband.comm.aggregate import Aggregator
from lowband.compress import COMPRESSORS, build
from lowband.feedback import FEEDBACK
from lowband.net.link import Link
from lowband.predict.schedule import Op, op_cost
from lowband.train.launch import launch
from lowband.train.models.gpt import GPT, GPTConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scaling.json"
PATHS = {"fp32": ("identity", "auto", ""), "all-gather": ("qsgd:bits=4", "all_gather", ""),
         "two-phase": ("qsgd:bits=4", "two_phase", ""), "requant 8": ("qsgd:bits=4", "two_phase", "qsgd:bits=8")}
PROJECT = (1_024, 10_240)


def shapes() -> list[tuple[int, ...]]:
    """The default char-GPT's parameter shapes (vocab 65, what ``lowband train`` trains)."""
    return [tuple(p.shape) for p in GPT(GPTConfig(vocab_size=65)).parameters()]


def _tensors(rank: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + rank)
    return [(f"p{i}", torch.randn(*s, generator=g) * 1e-3) for i, s in enumerate(shapes())]


@record
def _worker() -> dict[str, Any]:
    rank, n = group.init_from_env("gloo", timeout_s=300)
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    try:
        for name, (spec, collective, requant) in PATHS.items():
            comm = Comm()
            agg = Aggregator(comm, build(spec, COMPRESSORS), build("none", FEEDBACK), collective=collective,
                             requant=build(requant, COMPRESSORS) if requant else None)
            named = _tensors(rank)
            agg.mean_(named)
            out[name] = {"bytes": comm.ledger.bytes_sent, "mean": torch.cat([t.reshape(-1) for _, t in named]),
                         "ops": [r.to_dict() for r in comm.ledger.records]}
            comm.close()
    finally:
        group.shutdown()
    return out


def _exact(n: int) -> torch.Tensor:
    return torch.stack([torch.cat([t.reshape(-1) for _, t in _tensors(r)]) for r in range(n)]).mean(0)


def _project(ops: list[dict[str, Any]], n: int) -> float:
    """Bytes per worker of the recorded ops priced for ``n`` workers by the simulator's cost functions."""
    total = 0.0
    for row in ops:
        op = Op(op=row["op"], tag=row["tag"], payload=int(row["payload"]), sent=float(row["sent"]),
                received=float(row["received"]), step=1, modelled=0.0, overhead=0.0, blocking=True, wait_step=1,
                peers=int(row["peers"]))
        total += op_cost(op, n, Link(), 1.0)[1]
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="2,4,8,16", help="worker counts, comma-separated")
    parser.add_argument("--quick", action="store_true", help="2 and 4 workers only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    counts = [2, 4] if args.quick else [int(w) for w in args.workers.split(",")]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                             os.environ.get("PYTHONPATH")]))
    rows, recorded = [], {}
    print(f"{'workers':>8} {'fp32 MB':>9} {'all-gather MB':>14} {'two-phase MB':>13} {'two-phase/fp32':>15} "
          f"{'err all-gather':>15} {'err two-phase':>14} {'requant 8 MB':>13} {'err requant 8':>14}")
    for n in counts:
        result = launch(_worker, n)[0]
        exact = _exact(n)
        err = {k: (torch.linalg.vector_norm(result[k]["mean"] - exact) / torch.linalg.vector_norm(exact)).item()
               for k in PATHS}
        row = {"workers": n, **{f"{k}_bytes": result[k]["bytes"] for k in PATHS},
               **{f"{k}_error": err[k] for k in PATHS}}
        rows.append(row)
        recorded = {k: result[k]["ops"] for k in PATHS}
        print(f"{n:>8} {row['fp32_bytes'] / 1e6:>9.3f} {row['all-gather_bytes'] / 1e6:>14.3f} "
              f"{row['two-phase_bytes'] / 1e6:>13.3f} {row['two-phase_bytes'] / row['fp32_bytes']:>15.3f} "
              f"{err['all-gather']:>15.4f} {err['two-phase']:>14.4f} {row['requant 8_bytes'] / 1e6:>13.3f} "
              f"{err['requant 8']:>14.4f}")
    projected = [{"workers": n, **{f"{k}_bytes": _project(recorded[k], n) for k in PATHS}} for n in PROJECT]
    print(f"\nprojected from the ops recorded at {counts[-1]} workers (simulator cost functions):")
    for p in projected:
        print(f"{p['workers']:>8} {p['fp32_bytes'] / 1e6:>9.3f} {p['all-gather_bytes'] / 1e6:>14.3f} "
              f"{p['two-phase_bytes'] / 1e6:>13.3f} {p['two-phase_bytes'] / p['fp32_bytes']:>15.3f}")
    ratios = [r["two-phase_bytes"] / r["fp32_bytes"] for r in rows]
    spread = max(ratios) / min(ratios) - 1
    print(f"\ntwo-phase bytes per worker / fp32 all-reduce's, from {counts[0]} to {counts[-1]} workers: "
          f"{min(ratios):.3f}..{max(ratios):.3f} ({spread:.1%} apart; both grow as 2(n-1)/n, the all-gather path "
          f"as n - 1)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"measured": rows, "projected": projected, "ratio_spread": spread, "params": sum(
        torch.Size(s).numel() for s in shapes()), "command": "python benchmarks/scaling.py"}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
