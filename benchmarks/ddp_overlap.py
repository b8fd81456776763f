"""Does ``lowband.ddp_hook`` overlap communication with backward? Step time of torch DDP, its fp16 hook,
and lowband's hook blocking vs overlapped, on one model over one emulated link.

Two worker processes (gloo) train the same char-GPT (``lowband.train.models.gpt``, random tokens:
step time does not depend on the data) with AdamW, DDP with ``--bucket-cap-mb`` (several buckets),
over an emulated ``--bandwidth``/``--latency`` link. Rows:

* ``local``: the model alone, no DDP, no communication (both ranks at once): the compute floor;
* ``torch-ddp``: ``DistributedDataParallel`` with no hook (its bucketed all-reduce);
* ``torch-fp16``: ``register_comm_hook(None, default_hooks.fp16_compress_hook)``;
* ``lowband-identity``/``lowband-fp16``, ``blocking`` and ``overlap``: ``lowband.ddp_hook(...,
  overlap=False|True)``.

The link: torch's rows run DDP on lowband's ``lowband`` c10d backend
(:func:`lowband.bench.peers.common.emulated_world`: real gloo, every collective charged to an
:class:`~lowband.bench.peers.common.EmulatedLink`, as ``lowband.bench.peers.torch_ddp`` does);
lowband's hook sends on a plain gloo group through its own ``Comm(network=...)``. Both charge a
ring all-reduce 2(n-1)(a + S/(nB)), slept out after the real collective, one transfer at a time.
All rows live in one pair of processes and take turns in rounds, so machine noise falls on each
alike. A step is forward + backward + ``optimizer.step()``; per step the slower rank's time
counts. ``blocked`` is what the training thread was accounted as blocked on communication
(lowband: ``state.wait_seconds``, see ``lowband.comm.ddp_hook``; torch: as
``lowband.bench.peers.torch_ddp`` charges it, from DDP's last bucket all-reduce to the end of
``backward()``).

Run: ``python benchmarks/ddp_overlap.py [--quick]``; prints a Markdown table and writes
``benchmarks/results/ddp_overlap.json``. A timing benchmark: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

import lowband
from lowband.bench.peers.common import EmulatedLink, emulated_world
from lowband.comm.ddp_hook import HookState
from lowband.net.link import Network
from lowband.train.launch import launch
from lowband.train.models.gpt import GPT, GPTConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ddp_overlap.json"
TIMEOUT = timedelta(seconds=600)
VOCAB = 65  # Shakespeare's characters
LOWBAND_ROWS = (("lowband-identity", "identity", False), ("lowband-identity", "identity", True),
                ("lowband-fp16", "fp16", False), ("lowband-fp16", "fp16", True))


@dataclass(frozen=True)
class Setup:
    """What every row shares."""

    bandwidth: str = "100mbit"
    latency: str = "5ms"
    n_layer: int = 4
    n_embd: int = 128
    block_size: int = 128
    batch_size: int = 16
    bucket_cap_mb: float = 0.5  # DDP's, in MiB
    steps: int = 20  # timed
    warmup: int = 3  # untimed, first (DDP rebuilds its buckets after step 1)
    rounds: int = 4  # the timed steps of the rows are interleaved in this many rounds
    threads: int = 1  # torch threads per rank


def build_model(setup: Setup) -> GPT:
    torch.manual_seed(0)  # the same initial parameters on every rank and in every row
    return GPT(GPTConfig(VOCAB, setup.block_size, setup.n_layer, max(1, setup.n_embd // 32), setup.n_embd))


class Row:
    """One row's model, optimizer and what it measured; ``step()`` times one training step."""

    def __init__(self, setup: Setup, label: str, module: nn.Module, model: nn.Module, rank: int,
                 blocked: Callable[[Callable[[], None]], float], sent: Callable[[], int]) -> None:
        self.setup, self.label, self.module, self.blocked, self.sent = setup, label, module, blocked, sent
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.generator = torch.Generator().manual_seed(rank)
        self.times: list[float] = []
        self.waits: list[float] = []
        self.bytes, self.buckets = 0, 0
        self.calls: Callable[[], int] = lambda: 0  # lowband's rows: buckets reduced so far

    def step(self, timed: bool) -> None:
        x = torch.randint(0, VOCAB, (self.setup.batch_size, self.setup.block_size), generator=self.generator)
        sent, calls, started = self.sent(), self.calls(), time.perf_counter()
        _, loss = self.module(x, x)
        waited = self.blocked(loss.backward)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            self.times.append(time.perf_counter() - started)
            self.waits.append(waited)
            self.bytes += self.sent() - sent
            self.buckets += self.calls() - calls

    def result(self) -> dict[str, Any]:
        return {"times": self.times, "blocked": self.waits, "bytes_per_step": self.bytes / len(self.times),
                "buckets_per_step": self.buckets / len(self.times)}


def _plain(backward: Callable[[], None]) -> float:
    backward()
    return 0.0


@record
def worker(setup: Setup) -> dict[str, dict[str, Any]]:
    """Every row in one process pair, interleaved in rounds of ``steps / rounds`` steps (machine noise
    then falls on every row alike). torch's rows: DDP on the ``lowband`` default group, charged to an
    emulated link; lowband's: DDP on the same group (no collective of its own per step), the hook's
    ``Comm`` on a plain gloo group with the emulated ``Network``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(setup.threads)
    network = Network.parse(setup.bandwidth, setup.latency, n)
    link = EmulatedLink(network.bottleneck(), network.emulated, tag="grads")

    def torch_blocked(backward: Callable[[], None]) -> float:  # as lowband.bench.peers.torch_ddp charges it
        issued, waited = link.last_submit, link.wait_seconds
        backward()
        exposed = 0.0
        if link.last_submit > issued:  # blocked in DDP's finalize until the last bucket landed
            exposed = max(0.0, time.perf_counter() - link.last_submit - (link.wait_seconds - waited))
        return link.wait_seconds - waited + exposed

    rows: list[Row] = []
    states = []
    try:
        with emulated_world(link, TIMEOUT):
            hook_group = dist.new_group(backend="gloo")  # lowband's traffic: charged by its own Comm
            model = build_model(setup)
            rows.append(Row(setup, "local", model, model, rank, _plain, lambda: 0))
            for label, hook in (("torch-ddp", None), ("torch-fp16", default_hooks.fp16_compress_hook)):
                model = build_model(setup)
                ddp = DistributedDataParallel(model, bucket_cap_mb=setup.bucket_cap_mb)
                if hook is not None:
                    ddp.register_comm_hook(None, hook)
                rows.append(Row(setup, label, ddp, model, rank, torch_blocked, lambda: link.ledger.bytes_sent))
            for label, compressor, overlap in LOWBAND_ROWS:
                model = build_model(setup)
                ddp = DistributedDataParallel(model, bucket_cap_mb=setup.bucket_cap_mb)
                state, hook = lowband.ddp_hook(model, compress=compressor, process_group=hook_group,
                                               network=network, overlap=overlap)
                ddp.register_comm_hook(state, hook)
                states.append(state)
                rows.append(_lowband_row(setup, f"{label} {'overlap' if overlap else 'blocking'}", ddp, model,
                                         rank, state))
            for row in rows:
                for _ in range(setup.warmup):
                    row.step(timed=False)
            per_round = max(1, setup.steps // setup.rounds)
            for start in range(0, setup.steps, per_round):
                for row in rows:
                    for _ in range(min(per_round, setup.steps - start)):
                        row.step(timed=True)
            for state in states:
                state.close()
            dist.barrier()
    finally:
        link.close()
    return {row.label: row.result() for row in rows}


def _lowband_row(setup: Setup, label: str, ddp: nn.Module, model: nn.Module, rank: int,
                 state: HookState) -> Row:
    def blocked(backward: Callable[[], None]) -> float:
        waited = state.wait_seconds
        backward()
        return state.wait_seconds - waited

    row = Row(setup, label, ddp, model, rank, blocked, lambda: state.aggregator.comm.ledger.bytes_sent)
    row.calls = lambda: state.calls
    return row


# -- parent side -----------------------------------------------------------------------------


def combine(per_rank: dict[int, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per label: per step the slower rank's time; median and mean over steps."""
    rows = []
    for label in per_rank[0]:
        ranks = [per_rank[r][label] for r in sorted(per_rank)]
        slowest = [max(t) for t in zip(*(r["times"] for r in ranks))]
        blocked = [statistics.mean(r["blocked"]) for r in ranks]
        rows.append({"row": label, "median_s": statistics.median(slowest), "mean_s": statistics.mean(slowest),
                     "min_s": min(slowest), "blocked_s": max(blocked),
                     "mb_sent_per_step": max(r["bytes_per_step"] for r in ranks) / 1e6,
                     "buckets_per_step": ranks[0].get("buckets_per_step"), "times": slowest})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: step time (median, mean), its excess over ``local``, blocked time, MB sent."""
    floor = next((r["median_s"] for r in rows if r["row"] == "local"), None)
    lines = ["| row | step s (median) | step s (mean) | over local s | blocked s/step (accounted) | MB sent/step |",
             "|:---|---:|---:|---:|---:|---:|"]
    for r in rows:
        over = "-" if floor is None or r["row"] == "local" else f"{r['median_s'] - floor:+.3f}"
        blocked = "-" if r["row"] == "local" else f"{r['blocked_s']:.3f}"
        lines.append(f"| {r['row']} | {r['median_s']:.3f} | {r['mean_s']:.3f} | {over} | {blocked} | "
                     f"{r['mb_sent_per_step']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 2-layer model, 3 timed steps (a smoke run)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20; --quick 3)")
    p.add_argument("--bandwidth", default=Setup.bandwidth, help="emulated link (default 100mbit)")
    p.add_argument("--latency", default=Setup.latency, help="one-hop latency (default 5ms)")
    p.add_argument("--bucket-cap-mb", type=float, default=Setup.bucket_cap_mb, help="DDP's bucket cap, MiB")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output")
    a = p.parse_args(argv)
    if a.bucket_cap_mb <= 0 or (a.steps is not None and a.steps < 1):
        p.error("--bucket-cap-mb must be > 0 and --steps >= 1")
    setup = Setup(a.bandwidth, a.latency, bucket_cap_mb=a.bucket_cap_mb, steps=a.steps or 20)
    if a.quick:
        setup = Setup(a.bandwidth, a.latency, n_layer=2, n_embd=64, block_size=32, batch_size=4,
                      bucket_cap_mb=min(a.bucket_cap_mb, 0.05), steps=a.steps or 3, warmup=2, rounds=1)
    try:
        Network.parse(setup.bandwidth, setup.latency, 2)  # a bad --bandwidth/--latency fails here
    except ValueError as err:
        p.error(str(err))
    params = sum(q.numel() for q in build_model(setup).parameters())
    print(f"ddp overlap: {params / 1e6:.2f}M parameters, 2 ranks, {setup.bandwidth} + {setup.latency}, "
          f"buckets of {setup.bucket_cap_mb} MiB, {setup.steps} timed steps per row", file=sys.stderr)
    started = time.perf_counter()
    rows = combine(launch(worker, 2, setup))
    command = "python benchmarks/ddp_overlap.py" + (" " + " ".join(argv) if argv else "")
    print(table(rows))
    buckets = max(r["buckets_per_step"] for r in rows)
    print(f"\n{command}; {time.strftime('%Y-%m-%d')}; {params:,} parameters, {buckets:.1f} DDP buckets/step; "
          f"{time.perf_counter() - started:.0f} s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "setup": asdict(setup), "params": params,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "backend": "gloo", "device": "cpu"},
        "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
