"""The worker: what every rank runs, under torchrun or lowband's own launch.

For each algorithm of the config, in order and from the same seed and token budget:

1. build the model (same initialisation on every rank), AdamW, the lr schedule, a
   :class:`~lowband.comm.Comm` over the emulated network, and the algorithm;
2. for each step: draw this rank's batch, forward, backward, ``algo.step()``; time
   compute and communication apart; append one JSON line to ``<run>/<algo>/rank<r>.jsonl``.
   A worker of ``--worker-speed`` s < 1 sleeps (1/s - 1) x the step's measured compute after
   it and before ``algo.step()`` (so communication is not slowed), counted as compute. An
   algorithm with compute-aware budgets (``--budget speed``) may decline an iteration
   (``wants_compute()``): the rank then draws no batch and calls ``algo.idle()``, and its
   ``tokens`` count only the inner steps it took (docs/heterogeneous.md);
3. every ``eval_every`` steps evaluate the held-out loss of the model all ranks agree on
   (evaluation time is kept out of the training clock);
4. every ``checkpoint_every`` steps (and at the end) save this rank's full state
   (:mod:`lowband.train.checkpoint`); with ``resume`` an algorithm continues from its last
   complete checkpoint, its metrics file cut back to that step;
5. at the end write this rank's ledger (the whole run's, resumed or not), and rank 0 writes the report.

Device and precision (``--device``, ``--precision``; :mod:`lowband.train.precision`): the worker
picks its device before joining the group (CUDA: GPU ``LOCAL_RANK``, made current, and NCCL; the
CPU: gloo); the model, its batches and everything built from them live there. Forward passes run
under autocast; fp16 scales the loss and skips overflowing inner steps (still counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.adversity.poison import poisoner
from lowband.algorithms import ALGORITHMS, Algorithm
from lowband.comm import Comm, Ledger, group
from lowband.comm.ring_probe import choose_ring
from lowband.devices import backend_for, resolve_device
from lowband.net.link import Network
from lowband.train.checkpoint import RunCheckpoint, atomic_write_text, load_model_into, truncate_metrics
from lowband.train.config import TrainConfig, Variant
from lowband.train.data import Batch, Dataset, load_dataset
from lowband.train.metrics import MetricsWriter, Trackers, check_logs
from lowband.train.models import model_builder
from lowband.train.precision import Precision, device_choice
from lowband.train.progress import TrainProgress
from lowband.version import __version__


@record
def main(cfg: TrainConfig) -> str:
    """Entry point of one worker; returns the run folder. Rank 0 writes the report."""
    device = worker_device(cfg)
    rank, world_size = group.init_from_env(backend_for(device))
    torch.set_num_threads(cfg.threads)
    try:
        data = load_dataset(cfg.data)
        network = cfg.network(world_size)
        if cfg.net == "netns":
            if "GLOO_SOCKET_IFNAME" not in os.environ:
                raise ValueError("--net netns is for `lowband train` on one machine (it builds the namespaces "
                                 "and starts the workers in them); under torchrun use --net model")
            network = dataclasses.replace(network, shaped=True)  # the kernel shapes; Comm adds latency
        run_dir = Path(cfg.out) / group.agree(cfg.name or time.strftime("%Y%m%d-%H%M%S"))
        if rank == 0:
            write_run_info(run_dir, cfg, world_size, network, data, device)
        for variant in cfg.variants():
            train_one(cfg, variant, data, network, run_dir, device)
        group.barrier()
        if rank == 0:
            from lowband.report.render import show_report  # matplotlib: rank 0 only

            show_report(run_dir, cfg.target_loss)
        return str(run_dir)
    finally:
        group.shutdown()


def worker_device(cfg: TrainConfig) -> torch.device:
    """This worker's device (torchrun's LOCAL_RANK among LOCAL_WORLD_SIZE), made current if a GPU."""
    device = resolve_device(device_choice(cfg), int(os.environ.get("LOCAL_RANK", "0")),
                            int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group: NCCL and its barriers use the current device
    return device


def build_model(cfg: TrainConfig, data: Dataset) -> nn.Module:
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank and for every algorithm
    model = model_builder(cfg.model)(data)
    if cfg.init_from:  # fine-tuning: start from a saved model
        load_model_into(model, cfg.init_from)
    return model


def lr_lambda(cfg: TrainConfig) -> Any:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (or constant)."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_algorithm(cfg: TrainConfig, variant: Variant, model: nn.Module, comm: Comm) -> Algorithm:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    return ALGORITHMS.get(variant.algorithm)(model, optimizer, comm, cfg.options_for(variant), grad_clip=cfg.grad_clip)


@torch.no_grad()
def evaluate(model: nn.Module, algo: Algorithm, batches: list[Batch], precision: Precision | None = None) -> float:
    model.eval()
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    with algo.evaluation_parameters(), autocast():
        losses = [model(x, y)[1].item() for x, y in batches]  # host sync: the loss to report
    model.train()
    return sum(losses) / len(losses)


def train_one(cfg: TrainConfig, variant: Variant, data: Dataset, network: Network, run_dir: Path,
              device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Train ``variant`` for ``cfg.steps`` steps on ``device``; returns this rank's final numbers."""
    model = build_model(cfg, data).to(device)
    precision = Precision(cfg.precision, device)
    comm = Comm(network=network)
    comm.set_ring(choose_ring(cfg.ring, comm))
    rank, world_size = comm.rank, comm.world_size
    algo = build_algorithm(cfg, variant, model, comm)
    poison = poisoner(getattr(algo.options, "attack", "none"), rank, data.vocab_size)  # labelflip, else identity
    scheduler = torch.optim.lr_scheduler.LambdaLR(algo.optimizer, lr_lambda(cfg))
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    val_batches = [(x.to(device), y.to(device)) for x, y in data.val_batches(cfg.batch_size, cfg.eval_batches)]
    tokens_per_step = cfg.batch_size * (data.block_size if data.kind == "text" else 1)
    slow_down = 1.0 / cfg.speeds(world_size)[rank] - 1.0  # extra seconds per second of compute
    algo_dir = run_dir / variant.folder
    if rank == 0:  # the ring the emulator charged (--ring auto: measured at start-up), for lowband simulate
        algo_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(algo_dir / "ring.json", json.dumps({"ring": list(comm.ring)}))
    checkpoint = RunCheckpoint(algo_dir, model, algo, scheduler, generator)
    resumed = checkpoint.restore() if cfg.resume else None
    start, clock, val_loss = (resumed.step, resumed.clock, resumed.val_loss) if resumed else (0, 0.0, float("nan"))
    shown = math.nan  # the last training loss this rank computed (an idle iteration computes none)
    if resumed:
        truncate_metrics(algo_dir / f"rank{rank}.jsonl", start)  # drop rows written after the checkpoint
    trackers = Trackers(check_logs(cfg.log) if rank == 0 else (), run_dir, variant.folder, resumed is not None)
    with MetricsWriter(algo_dir / f"rank{rank}.jsonl", append=resumed is not None) as metrics, trackers, \
            TrainProgress(variant.label, cfg.steps, cfg.progress and rank == 0) as progress:
        for step in range(start + 1, cfg.steps + 1):
            comm.ledger.step = step  # ledger records carry the step that issued them
            started, waited = time.perf_counter(), comm.wait_seconds
            if not algo.wants_compute():  # DiLoCo's budget="speed" may sit out iterations
                algo.idle()  # past this round's budget: no batch, no compute; syncs at the round's end
                loss = None
            else:
                loss = compute_step(algo, model, data.batch(generator, cfg.batch_size, rank, world_size,
                                                            cfg.sharding), poison, slow_down, precision)
            algo.zero_grad()
            if step == cfg.steps:
                algo.finish()  # land what is in flight: the last row and evaluation see the final model
            scheduler.step()
            settle(device)
            elapsed, comm_s = time.perf_counter() - started, comm.wait_seconds - waited
            clock += elapsed
            shown = shown if loss is None else loss.item()
            worked = algo.step_count if algo.compute_aware else step  # inner steps this rank took
            row = step_row(step, None if loss is None else shown, worked * tokens_per_step, comm.ledger,
                           elapsed, comm_s, clock, scheduler.get_last_lr()[0])
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = row["val_loss"] = evaluate(model, algo, val_batches, precision)
                row.update(algo.metrics())
                row.update(precision.metrics())
                progress.evaluation(step, cfg.steps, shown, val_loss, comm.ledger.bytes_sent, clock)
            metrics.write(row)
            trackers.write(row)
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                checkpoint.save(step, clock, val_loss)  # collective; after the row, as resuming expects
            progress.update(step, shown, comm.ledger.bytes_sent, clock)
    comm.close()
    with MetricsWriter(algo_dir / f"ledger_rank{rank}.jsonl") as ledger_out:
        for rec in comm.ledger.records:
            ledger_out.write(rec.to_dict())
    if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) < world_size:  # ranks on other machines
        collect_logs(algo_dir, rank)
    return {"val_loss": val_loss, "bytes_sent": comm.ledger.bytes_sent, "time_s": clock}


def collect_logs(algo_dir: Path, rank: int) -> None:
    """Several machines: rank 0 receives every rank's metrics and ledger files for the report and
    writes those its folder lacks (on a shared folder, none); every rank keeps its own."""
    for pattern in ("rank{}.jsonl", "ledger_rank{}.jsonl"):
        blobs = group.all_gather_bytes((algo_dir / pattern.format(rank)).read_bytes())
        if rank == 0:
            for other, blob in enumerate(blobs):
                path = algo_dir / pattern.format(other)
                if not path.exists():
                    atomic_write_text(path, blob.decode())


def compute_step(algo: Algorithm, model: nn.Module, batch: Batch, poison: Any, slow_down: float,
                 precision: Precision | None = None) -> torch.Tensor:
    """One inner step on ``batch``: forward (under ``precision``'s autocast), backward, the simulated
    slow-down, ``algo.step()``; returns the loss. The batch is poisoned on the CPU, then moved to
    the model's device. The slow-down sleeps ``slow_down`` x the measured compute before the
    algorithm communicates (zeroth-order: after ``zo_step``, compute = its time minus waits)."""
    x, y = batch
    y = poison(y)
    device = next(model.parameters()).device
    precision = precision if precision is not None else Precision("fp32", device)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    started = time.perf_counter()
    if algo.zeroth_order:  # forward passes only: the algorithm evaluates the closure
        waited = algo.comm.wait_seconds

        def closure() -> torch.Tensor:
            with precision.autocast():
                return model(x, y)[1]

        loss = algo.zo_step(closure)
        slow(slow_down * (time.perf_counter() - started - (algo.comm.wait_seconds - waited)))
        return loss
    with precision.autocast():
        _, loss = model(x, y)
    precision.backward(loss)
    settle(device)
    slow(slow_down * (time.perf_counter() - started))
    algo.record_compute(time.perf_counter() - started)  # compute-aware budgets time the ranks' steps
    precision.step(algo)
    return loss


def settle(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a GPU runs behind the host): the step's clock is read after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: compute seconds and --worker-speed measure finished work


def slow(seconds: float) -> None:
    """``--worker-speed``: a slower device, emulated by sleeping (counted as compute)."""
    if seconds > 0:
        time.sleep(seconds)


def step_row(step: int, loss: float | None, tokens: int, ledger: Ledger, elapsed: float, comm_s: float,
             clock: float, lr: float) -> dict[str, Any]:
    """One JSONL metrics row (the format :mod:`lowband.report.summary` reads); an iteration the
    rank sat out (compute-aware budgets) has no ``loss``."""
    row = {"step": step, "loss": loss, "tokens": tokens, "bytes_sent": ledger.bytes_sent,
           "bytes_received": ledger.bytes_received, "compute_s": elapsed - comm_s, "comm_s": comm_s,
           "time_s": clock, "lr": lr}
    if loss is None:
        del row["loss"]
    return row


def write_run_info(run_dir: Path, cfg: TrainConfig, world_size: int, network: Network, data: Dataset,
                   device: torch.device | None = None) -> None:
    """``run.json``: the config, world size, network, workers' speeds, each algorithm's options and
    the device rank 0 trained on (``cuda:0`` where ``--device auto`` found a GPU)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    params = sum(p.numel() for p in build_model(cfg, data).parameters())
    info = {
        "config": cfg.to_dict(), "world_size": world_size, "network": network.describe(), "params": params,
        "worker_speeds": list(cfg.speeds(world_size)),
        "dataset": {"name": data.name, "kind": data.kind, "vocab_size": data.vocab_size},
        "algorithms": {v.label: vars(cfg.options_for(v)) for v in cfg.variants()},
        "folders": {v.label: v.folder for v in cfg.variants()},
    }
    if device is not None:
        info["device"] = str(device)
    info["environment"] = environment()
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))  # resuming ranks may read it


def environment() -> dict[str, Any]:
    """What a result depends on beyond the config: versions, host, backend, and the git revision of the
    folder the run started in (None outside a repository)."""
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        revision = None
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    return {"lowband": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "host": socket.gethostname(), "backend": backend, "git": revision}
