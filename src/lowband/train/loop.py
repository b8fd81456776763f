"""The training loop: one algorithm, ``cfg.steps`` steps, every rank, fixed or elastic membership.

For each step, on every rank:

1. draw this rank's batch, forward, backward, ``algo.step()`` (the algorithm reaches the other
   ranks at its synchronisation points: :mod:`lowband.algorithms.base`); time compute and
   communication apart. A worker of ``--worker-speed`` s < 1 sleeps (1/s - 1) x the step's
   measured compute after it and before ``algo.step()`` (so communication is not slowed),
   counted as compute. An algorithm with compute-aware budgets (``--budget speed``) may decline
   an iteration (``wants_compute()``): the rank then draws no batch and calls ``algo.idle()``, and
   its ``tokens`` count only the inner steps it took (docs/heterogeneous.md); a zeroth-order
   algorithm is given the forward pass as a closure (``zo_step``);
2. append one JSON line to ``<run>/<algo>/rank<r>.jsonl``;
3. every ``eval_every`` steps evaluate the held-out loss of the model all ranks agree on
   (evaluation time is kept out of the training clock);
4. every ``checkpoint_every`` steps (and at the end) save this rank's full state
   (:mod:`lowband.train.checkpoint`); with ``resume`` it continues from its last complete
   checkpoint, its metrics file cut back to that step;
5. at the end write this rank's ledger (the whole run's, resumed or not).

Who the process is and how it meets the others is its :class:`Role`: by default rank r of a
fixed world (torchrun's); an elastic worker's role (:class:`~lowband.train.elastic_worker.ElasticRole`)
attaches a membership to the algorithm and may move the loop's position (a joiner continues at
the step and clock of the worker it got its state from): the loop reads its position from one
:class:`~lowband.elastic.membership.LoopState` that both share.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lowband.adversity.poison import poisoner
from lowband.algorithms import ALGORITHMS, Algorithm
from lowband.comm import Comm, Ledger, group
from lowband.comm.ring_probe import choose_ring
from lowband.elastic.membership import LoopState
from lowband.net.link import Network
from lowband.train.checkpoint import RunCheckpoint, atomic_write_text, load_model_into, truncate_metrics
from lowband.train.config import TrainConfig, Variant
from lowband.train.data import Batch, Dataset
from lowband.train.metrics import MetricsWriter, Trackers, check_logs
from lowband.train.models import model_builder
from lowband.train.precision import Precision
from lowband.train.progress import TrainProgress


class Role:
    """A rank of a fixed world (torchrun's): its number names its files and seeds its batches.

    Subclasses (an elastic worker) change who the process is (``id``), how it joins
    (:meth:`start`) and what its rows carry (:meth:`extend`)."""

    elastic = False  # True: no checkpoints, no trackers, no collectives beyond the algorithm's

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.id = 0  # set by comm(): the rank whose files this process writes
        self.append = False  # continue the metrics and ledger files of an earlier incarnation

    def comm(self, network: Network) -> Comm:
        """The communicator over ``network``, its ring chosen (``--ring``, measured at start-up)."""
        comm = Comm(network=network)
        comm.set_ring(choose_ring(self.cfg.ring, comm))
        self.id = comm.rank
        return comm

    def seed(self) -> int:
        """This rank's batch stream."""
        return self.cfg.seed * 1_000_003 + self.id

    def prepare(self, algo_dir: Path, comm: Comm) -> None:
        """Before the first step: rank 0 writes the ring the emulator charged, for ``lowband simulate``."""
        if comm.rank == 0:
            algo_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(algo_dir / "ring.json", json.dumps({"ring": list(comm.ring)}))

    @contextlib.contextmanager
    def start(self, algo: Algorithm, scheduler: Any, state: LoopState, algo_dir: Path) -> Iterator[None]:
        """Around the steps: a fixed world has joined already."""
        yield

    def before_step(self, step: int) -> None:
        """At the top of each step (an elastic worker's fault injection)."""

    def extend(self, row: dict[str, Any], last: bool) -> None:
        """Extra columns of a step's metrics row (an elastic worker's members and fingerprints)."""

    def finish(self, algo_dir: Path, comm: Comm) -> None:
        """After the ledger is written: with ranks on other machines, rank 0 collects their logs."""
        if int(os.environ.get("LOCAL_WORLD_SIZE", comm.world_size)) < comm.world_size:
            collect_logs(algo_dir, comm.rank)


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


OPTIMIZERS: dict[str, Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]] = {
    "adamw": lambda model, cfg: torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                                  weight_decay=cfg.weight_decay),
    "sgd": lambda model, cfg: torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                              weight_decay=cfg.weight_decay),
}
"""``--optimizer``: the inner (per-worker) optimizer. AdamW (betas 0.9/0.95, decoupled weight decay) is
the default of every measured run; SGD with heavy-ball momentum (``--momentum``; weight decay coupled,
torch's L2 form) is where the error-feedback papers measure."""


def build_algorithm(cfg: TrainConfig, variant: Variant, model: nn.Module, comm: Comm) -> Algorithm:
    optimizer = OPTIMIZERS[cfg.optimizer](model, cfg)
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
              device: torch.device = torch.device("cpu"), role: Role | None = None,
              position: tuple[int, int] = (1, 1)) -> dict[str, Any]:
    """Train ``variant`` for ``cfg.steps`` steps on ``device`` as ``role`` (default: this rank of a fixed
    world), algorithm ``position[0]`` of ``position[1]`` (for the progress label); returns this rank's
    final numbers."""
    role = role if role is not None else Role(cfg)
    model = build_model(cfg, data).to(device)
    precision = Precision(cfg.precision, device)
    comm = role.comm(network)
    algo = build_algorithm(cfg, variant, model, comm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(algo.optimizer, lr_lambda(cfg))
    algo_dir = run_dir / variant.folder
    role.prepare(algo_dir, comm)
    state = LoopState()
    run = _Steps(cfg, data, algo, scheduler, precision, role, state)
    checkpoint = RunCheckpoint(algo_dir, model, algo, scheduler, run.generator)
    resumed = checkpoint.restore() if cfg.resume else None
    if resumed:
        state.step, state.clock, state.val_loss = resumed.step, resumed.clock, resumed.val_loss
        truncate_metrics(algo_dir / f"rank{role.id}.jsonl", state.step)  # drop rows written after the checkpoint
    append = resumed is not None or role.append
    trackers = Trackers(check_logs(cfg.log) if role.id == 0 else (), run_dir, variant.folder, resumed is not None)
    with MetricsWriter(algo_dir / f"rank{role.id}.jsonl", append=append) as metrics, trackers, \
            TrainProgress(_label(variant, position), cfg.steps, role.id == 0 and not role.elastic,
                          bar=cfg.progress) as progress, \
            role.start(algo, scheduler, state, algo_dir):
        while state.step < cfg.steps:
            row = run.step()
            if "val_loss" in row:
                progress.evaluation(state.step, cfg.steps, run.shown, state.val_loss, comm.ledger.bytes_sent,
                                    state.clock)
            metrics.write(row)
            trackers.write(row)
            if cfg.checkpoint_every and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps):
                checkpoint.save(state.step, state.clock, state.val_loss)  # collective; after the row
            progress.update(state.step, run.shown, comm.ledger.bytes_sent, state.clock)
    comm.close()
    with MetricsWriter(algo_dir / f"ledger_rank{role.id}.jsonl", append=role.append) as ledger_out:
        for rec in comm.ledger.records:
            ledger_out.write(rec.to_dict())
    role.finish(algo_dir, comm)
    return {"val_loss": state.val_loss, "bytes_sent": comm.ledger.bytes_sent, "time_s": state.clock}


def _label(variant: Variant, position: tuple[int, int]) -> str:
    return variant.label if position[1] == 1 else f"{variant.label} [{position[0]}/{position[1]}]"


class _Steps:
    """One step of :func:`train_one` at a time: batch, compute, synchronise, the metrics row."""

    def __init__(self, cfg: TrainConfig, data: Dataset, algo: Algorithm, scheduler: Any, precision: Precision,
                 role: Role, state: LoopState) -> None:
        self.cfg, self.data, self.algo, self.scheduler = cfg, data, algo, scheduler
        self.precision, self.role, self.state = precision, role, state
        self.comm, self.model, device = algo.comm, algo.model, precision.device
        self.poison = poisoner(getattr(algo.options, "attack", "none"), role.id, data.vocab_size)  # labelflip
        self.generator = torch.Generator().manual_seed(role.seed())
        self.val_batches = [(x.to(device), y.to(device)) for x, y in data.val_batches(cfg.batch_size,
                                                                                       cfg.eval_batches)]
        self.tokens_per_step = cfg.batch_size * (data.block_size if data.kind == "text" else 1)
        self.slow_down = 0.0 if role.elastic else 1.0 / cfg.speeds(self.comm.world_size)[role.id] - 1.0
        self.shown = math.nan  # the last training loss this rank computed (an idle iteration computes none)

    def step(self) -> dict[str, Any]:
        """The next step (the role may move the position: a joiner continues at its sender's step)."""
        cfg, algo, comm, state = self.cfg, self.algo, self.comm, self.state
        state.step += 1
        self.role.before_step(state.step)
        comm.ledger.step = state.step  # ledger records carry the step that issued them
        started, waited = time.perf_counter(), comm.wait_seconds
        if not algo.wants_compute():  # DiLoCo's budget="speed" may sit out iterations
            algo.idle()  # past this round's budget: no batch, no compute; syncs at the round's end
            loss = None
        else:
            batch = self.data.batch(self.generator, cfg.batch_size, comm.rank, comm.world_size, cfg.sharding)
            loss = compute_step(algo, self.model, batch, self.poison, self.slow_down, self.precision)
        algo.zero_grad()
        if state.step == cfg.steps:
            algo.finish()  # land what is in flight: the last row and evaluation see the final model
        self.scheduler.step()
        settle(self.precision.device)
        elapsed, comm_s = time.perf_counter() - started, comm.wait_seconds - waited
        state.clock += elapsed
        self.shown = self.shown if loss is None else loss.item()
        worked = algo.step_count if algo.compute_aware else state.step  # inner steps this rank took
        row = step_row(state.step, None if loss is None else self.shown, worked * self.tokens_per_step, comm.ledger,
                       elapsed, comm_s, state.clock, self.scheduler.get_last_lr()[0])
        self.role.extend(row, state.step == cfg.steps)
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            state.val_loss = row["val_loss"] = evaluate(self.model, algo, self.val_batches, self.precision)
            if not self.role.elastic:  # collective monitoring: not over a membership that may change
                row.update(algo.metrics())
            row.update(self.precision.metrics())
        return row


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
