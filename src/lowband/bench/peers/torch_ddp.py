"""PyTorch's own data parallelism on lowband's task, over lowband's emulated link.

Four peers, each run the way its users run it, from ``torch.nn.parallel`` and
``torch.distributed.algorithms`` (torch 2.13):

* ``torch-ddp``: ``DistributedDataParallel(model)``, its built-in bucketed all-reduce;
* ``torch-fp16``: ``register_comm_hook(None, default_hooks.fp16_compress_hook)``;
* ``torch-powersgd``: ``register_comm_hook(PowerSGDState(None, matrix_approximation_rank=R,
  start_powerSGD_iter=S), powerSGD_hook)``, with ``bucket_cap_mb`` large enough for ONE bucket
  (with several buckets on gloo the hook's nested all-reduces, issued from completion callbacks,
  do not keep one order across ranks; see docs/peers.md);
* ``torch-postlocal``: ``post_localSGD_hook`` with ``PostLocalSGDState(None, subgroup, S)`` and
  ``PostLocalSGDOptimizer(AdamW, PeriodicModelAverager(period=H, warmup_steps=S))``: DDP for S
  steps, then local steps, the parameters averaged every H steps. Each worker is its own machine:
  the "intra-node" subgroup is the worker alone (``dist.new_subgroups(group_size=1)``).

The default process group is lowband's ``lowband`` c10d backend
(:func:`~lowband.bench.peers.common.emulated_world`): real gloo underneath, every collective
(DDP's construction broadcast and checks, its bucket all-reduces, the hooks' all-reduces, the
averager's) charged to the emulated link as :class:`lowband.comm.Comm` charges its own: ring
all-reduce 2(n-1)(a + S/(nB)) and 2(n-1)S/n bytes, gloo's broadcast tree, ring all-gather.
Bucket all-reduces stay asynchronous, so DDP's overlap of communication with backward is real.

The task is ``lowband train``'s (model and seed, per-rank batches, AdamW, warm-up + cosine,
gradient clipping, evaluation every ``--eval-every`` steps on the same batches); rows go to
``<run>/<label>/rank<r>.jsonl``, every collective to ``ledger_rank<r>.jsonl``.

Example::

    python -m lowband.bench.peers.torch_ddp --peer torch-powersgd --rank 2 --workers 2 --steps 100 \\
        --out runs --name t --no-progress
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.bench.peers import TORCH_LABELS
from lowband.bench.peers.common import EmulatedLink, PeerError, emulated_world, register_peer, write_ledger
from lowband.train.config import TrainConfig, Variant
from lowband.train.data import Batch, Dataset, load_dataset
from lowband.train.flags import config_from_args
from lowband.train.launch import WorkerFailed, launch
from lowband.train.metrics import MetricsWriter
from lowband.train.loop import build_model, lr_lambda, step_row

TIMEOUT = timedelta(seconds=600)  # generous on a loaded 2-core machine
MIB = 2**20  # DDP's bucket_cap_mb is in MiB


@dataclass(frozen=True)
class TorchPeerOptions:
    """Which torch peer, and its own arguments (None: the default given in :meth:`resolved`)."""

    peer: str = "torch-ddp"
    rank: int | None = None  # torch-powersgd: matrix_approximation_rank (default 2)
    start_iter: int | None = None  # powersgd: start_powerSGD_iter (2); postlocal: start_localSGD_iter (warm-up)
    period: int | None = None  # torch-postlocal: PeriodicModelAverager period H (default: localsgd's H)
    bucket_cap_mb: float | None = None  # DDP's bucket_cap_mb in MiB (None: DDP's own 25 MiB, first bucket 1 MiB)

    def __post_init__(self) -> None:
        if self.peer not in TORCH_LABELS:
            raise ValueError(f"unknown torch peer {self.peer!r}; choose one of: {', '.join(TORCH_LABELS)}")
        owners = {"rank": ("torch-powersgd",), "start_iter": ("torch-powersgd", "torch-postlocal"),
                  "period": ("torch-postlocal",)}
        for name, peers in owners.items():
            if getattr(self, name) is not None and self.peer not in peers:
                raise ValueError(f"--{name.replace('_', '-')} is an option of {' and '.join(peers)}, "
                                 f"not {self.peer}: leave it out")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {self.rank}")
        if self.start_iter is not None and self.start_iter < (2 if self.peer == "torch-powersgd" else 0):
            raise ValueError(f"--start-iter must be >= 2 for torch-powersgd (powerSGD_hook needs "
                             f"start_powerSGD_iter > 1 with error feedback and warm start) and >= 0 for "
                             f"torch-postlocal, got {self.start_iter}")
        if self.period is not None and self.period < 1:
            raise ValueError(f"--period must be >= 1, got {self.period}")
        if self.bucket_cap_mb is not None and not self.bucket_cap_mb > 0:
            raise ValueError(f"--bucket-cap-mb must be > 0, got {self.bucket_cap_mb}")

    def resolved(self, cfg: TrainConfig, model_bytes: int) -> "TorchPeerOptions":
        """Defaults filled in for ``cfg``; torch-powersgd gets one bucket (refused if given fewer MiB)."""
        if self.peer == "torch-powersgd":
            need = model_bytes / MIB
            if self.bucket_cap_mb is not None and self.bucket_cap_mb <= need:
                raise ValueError(f"torch-powersgd runs with one DDP bucket (with several, powerSGD_hook's nested "
                                 f"all-reduces interleave differently on each gloo rank): give --bucket-cap-mb > "
                                 f"{need:.2f} (the model's MiB) or leave it out")
            return replace(self, rank=self.rank or 2, start_iter=2 if self.start_iter is None else self.start_iter,
                           bucket_cap_mb=self.bucket_cap_mb or float(math.ceil(need) + 1))
        if self.peer == "torch-postlocal":
            return replace(self, start_iter=cfg.warmup_steps if self.start_iter is None else self.start_iter,
                           period=self.period or cfg.options_for(Variant("localsgd")).inner_steps)
        return self


# ----------------------------------------------------------------------------- one worker


def build_ddp(cfg: TrainConfig, options: TorchPeerOptions,
              model: nn.Module) -> tuple[nn.parallel.DistributedDataParallel, Any, torch.optim.AdamW]:
    """``(ddp, optimizer to step, the AdamW the schedule drives)`` as the peer's users write them."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    adamw = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=options.bucket_cap_mb)
    if options.peer == "torch-fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif options.peer == "torch-powersgd":
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=options.rank,
                                            start_powerSGD_iter=options.start_iter)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif options.peer == "torch-postlocal":
        subgroup, _ = dist.new_subgroups(group_size=1)  # one worker per machine: the local group is itself
        ddp.register_comm_hook(PostLocalSGDState(None, subgroup, options.start_iter), post_localSGD_hook)
        averager = PeriodicModelAverager(period=options.period, warmup_steps=options.start_iter)
        return ddp, PostLocalSGDOptimizer(optim=adamw, averager=averager), adamw
    return ddp, adamw, adamw


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> float:
    """Mean loss of this rank's model (DDP's ranks agree; post-local SGD's are this rank's own)."""
    model.eval()
    losses = [model(x, y)[1].item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


@record
def worker_main(cfg: TrainConfig, options: TorchPeerOptions, run_dir: str, keep_params: bool) -> dict[str, Any]:
    """One worker: DDP over the emulated default group; rows and ledger in lowband's format."""
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.data)
    network = cfg.network(n)
    link = EmulatedLink(network.bottleneck(), network.emulated, tag="init", inline_completion=False)
    out = Path(run_dir) / options.peer
    try:
        with emulated_world(link, TIMEOUT):
            model = build_model(cfg, data)
            ddp, optimizer, adamw = build_ddp(cfg, options, model)  # DDP's initial broadcast: tag init
            result = _train(cfg, rank, n, data, ddp, optimizer, adamw, link, out)
    finally:
        link.close()
    write_ledger(out / f"ledger_rank{rank}.jsonl", link.ledger)
    result["bytes_sent"] = link.ledger.bytes_sent
    if keep_params:
        result["params"] = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    return result


def _train(cfg: TrainConfig, rank: int, n: int, data: Dataset, ddp: nn.parallel.DistributedDataParallel,
           optimizer: Any, adamw: torch.optim.AdamW, link: EmulatedLink, out: Path) -> dict[str, Any]:
    """lowband's training loop (:func:`lowband.train.loop.train_one`) with DDP doing the averaging.

    ``comm_s`` is the time the training thread is blocked on the link: waits on collectives (the
    averager's, DDP's bucket rebuild) plus, for backward, the time from the last bucket all-reduce
    DDP issued to the end of ``backward()`` (DDP waits there for every bucket still in flight)."""
    model = ddp.module
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lr_lambda(cfg))
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    val_batches = data.val_batches(cfg.batch_size, cfg.eval_batches)
    tokens_per_step = cfg.batch_size * (data.block_size if data.kind == "text" else 1)
    clock, val_loss = 0.0, float("nan")
    with MetricsWriter(out / f"rank{rank}.jsonl") as metrics:
        for step in range(1, cfg.steps + 1):
            link.ledger.step = step
            started, waited = time.perf_counter(), link.wait_seconds
            x, y = data.batch(generator, cfg.batch_size, rank, n, cfg.sharding)
            with link.tagged("grads"):
                _, loss = ddp(x, y)
                issued, waited_before = link.last_submit, link.wait_seconds
                loss.backward()
                exposed = 0.0
                if link.last_submit > issued:  # blocked in DDP's finalize until the last bucket landed
                    exposed = max(0.0, time.perf_counter() - link.last_submit - (link.wait_seconds - waited_before))
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            with link.tagged("outer"):
                optimizer.step()  # post-local SGD: the parameter average every H steps
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            elapsed = time.perf_counter() - started
            comm_s = min(elapsed, link.wait_seconds - waited + exposed)
            clock += elapsed
            row = step_row(step, loss.item(), step * tokens_per_step, link.ledger, elapsed, comm_s, clock,
                           scheduler.get_last_lr()[0])
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = row["val_loss"] = evaluate(model, val_batches)
            metrics.write(row)
            if cfg.progress and rank == 0 and "val_loss" in row:
                print(f"{out.name} step {step}/{cfg.steps}: loss {row['loss']:.3f} val {val_loss:.3f} "
                      f"sent {link.ledger.bytes_sent / 1e6:.1f} MB time {clock:.1f} s", file=sys.stderr, flush=True)
    return {"val_loss": val_loss, "time_s": clock}


# ----------------------------------------------------------------------------- the runner


def check(cfg: TrainConfig, options: TorchPeerOptions) -> TorchPeerOptions:
    """The resolved options, or one line saying what cannot run (before any process starts)."""
    if cfg.net != "model":
        raise ValueError("the torch peers run over the in-process link model: use --net model")
    if cfg.resume or cfg.checkpoint_every or cfg.elastic:
        raise ValueError("the torch peers do not checkpoint, resume or run elastically: leave out "
                         "--checkpoint-every, --resume and --elastic")
    model = build_model(cfg, load_dataset(cfg.data))
    return options.resolved(cfg, sum(p.numel() * p.element_size() for p in model.parameters()))


def run_torch(cfg: TrainConfig, run_dir: Path, options: TorchPeerOptions,
              keep_params: bool = False) -> dict[int, dict[str, Any]]:
    """Train ``options.peer`` on ``cfg.workers`` processes into ``run_dir/<label>`` and list it in
    ``run_dir/run.json``; returns {rank: final numbers} (with ``keep_params``, the final parameters
    as numpy arrays). Raises ``ValueError`` (one line) before starting anything, :class:`WorkerFailed`
    if a worker fails."""
    options = check(cfg, options)
    register_peer(run_dir, cfg, options.peer, {**asdict(options), "peer": f"torch {torch.__version__.split('+')[0]}"})
    (run_dir / options.peer).mkdir(parents=True, exist_ok=True)
    return launch(worker_main, cfg.workers, cfg, options, str(run_dir), keep_params)


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lowband.bench.peers.torch_ddp --peer LABEL [...] [lowband train flags]``."""
    prog = "python -m lowband.bench.peers.torch_ddp"
    parser = argparse.ArgumentParser(
        prog=prog, add_help=False,
        description="Run PyTorch's DDP, fp16/PowerSGD hooks or post-local SGD on lowband's task into a lowband "
                    "run folder; every other flag is a `lowband train` flag.")
    parser.add_argument("--peer", default="torch-ddp", choices=TORCH_LABELS, help="which torch peer")
    parser.add_argument("--rank", type=int, default=None, help="torch-powersgd: matrix_approximation_rank (2)")
    parser.add_argument("--start-iter", type=int, default=None,
                        help="torch-powersgd: start_powerSGD_iter (2); torch-postlocal: start_localSGD_iter and "
                             "the averager's warmup_steps (default --warmup-steps)")
    parser.add_argument("--period", type=int, default=None,
                        help="torch-postlocal: steps between parameter averages (default --inner-steps or 20)")
    parser.add_argument("--bucket-cap-mb", type=float, default=None,
                        help="DDP bucket_cap_mb in MiB (default: DDP's; torch-powersgd: one bucket)")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not print the report")
    ns, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nlowband train flags:")
    cfg = config_from_args(rest, prog=prog)
    run_dir = Path(cfg.out) / (cfg.name or time.strftime("%Y%m%d-%H%M%S"))
    try:
        options = TorchPeerOptions(ns.peer, ns.rank, ns.start_iter, ns.period, ns.bucket_cap_mb)
        run_torch(cfg, run_dir, options)
    except (PeerError, ValueError, WorkerFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if ns.report:
        from lowband.report.render import show_report

        show_report(run_dir, cfg.target_loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
