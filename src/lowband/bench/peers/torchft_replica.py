"""One torchft replica (one process) of the torchft peer: lowband's training loop under torchft's DiLoCo.

:func:`replica_main` is what :mod:`lowband.bench.peers.torchft_diloco` launches per worker:

1. its own replica group of size 1 (its own TCPStore on 127.0.0.1, replica id ``lowband_<r>``)
   with a ``Manager(pg=<emulated gloo>, use_async_quorum=False, init_sync=False)``; the HTTP
   checkpoint server is replaced by one that refuses (recovery would bypass the emulated link);
2. the model cut into torchft fragments (:func:`model_fragments`, as lowband's
   ``streaming-diloco`` cuts it), an outer optimizer per fragment as lowband's ``diloco`` builds it;
3. lowband's step (:func:`_train`) with torchft's ``DiLoCo`` hooked onto the inner optimizer,
   evaluated on the global (last synchronised) parameters (:func:`global_parameters`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.algorithms.diloco import DiLoCoOptions
from lowband.bench.peers.common import EmulatedLink, LinkWork, PeerError, write_ledger
from lowband.train.config import TrainConfig, Variant
from lowband.train.data import load_dataset
from lowband.train.metrics import MetricsWriter
from lowband.train.loop import build_model, lr_lambda, step_row

TIMEOUT = timedelta(seconds=600)  # collectives, quorum and RPCs: generous on a loaded 2-core machine


@dataclass(frozen=True)
class PeerOptions:
    """What torchft's ``DiLoCo`` is given besides lowband's config (H, outer optimizer)."""

    streaming: bool = False
    fragments: int = 1  # torchft model fragments (Streaming DiLoCo's P)
    tau: int = 0  # fragment_sync_delay: inner steps an allreduce may overlap
    alpha: float = 0.0  # fragment_update_alpha: share of the local fragment kept on arrival
    bucketize: bool = True  # one flat allreduce per fragment (torchft's default is one per tensor)
    quantize: bool = False  # should_quantize: needs triton (and a GPU); refused without it

    @property
    def label(self) -> str:
        return "torchft-streaming" if self.streaming else "torchft-diloco"

    @classmethod
    def for_mode(cls, streaming: bool, fragments: int | None = None, tau: int | None = None,
                 alpha: float | None = None, bucketize: bool = True, quantize: bool = False) -> "PeerOptions":
        """Defaults as lowband's ``streaming-diloco`` (P=4, tau=1, alpha=0.5) or plain DiLoCo (1, 0, 0)."""
        d = (4, 1, 0.5) if streaming else (1, 0, 0.0)
        return cls(streaming, d[0] if fragments is None else fragments, d[1] if tau is None else tau,
                   d[2] if alpha is None else alpha, bucketize, quantize)


@functools.cache
def _torchft_classes() -> tuple[type, type, type, type]:
    """``(EmulatedGloo, TimedManager, NoCheckpoints, DiLoCo)``, defined once torchft is importable."""
    from torchft.checkpointing.transport import CheckpointTransport
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    class EmulatedGloo(ProcessGroupGloo):
        """torchft's reconfigurable gloo group; every allreduce is charged to ``link``."""

        def __init__(self, link: EmulatedLink, timeout: timedelta) -> None:
            super().__init__(timeout=timeout)
            self.link = link

        def allreduce(self, tensors: list[torch.Tensor], opts: object) -> Any:
            work = super().allreduce(tensors, opts)
            return LinkWork(self.link, self.link.submit(work, tensors, self.size()))

    class TimedManager(Manager):
        """Manager whose blocking control-plane calls are timed; healing is refused."""

        blocked_s = 0.0

        def start_quorum(self, *args: Any, **kwargs: Any) -> None:
            started = time.perf_counter()
            super().start_quorum(*args, **kwargs)
            self.blocked_s += time.perf_counter() - started

        def should_commit(self, *args: Any, **kwargs: Any) -> bool:
            started = time.perf_counter()
            try:
                return super().should_commit(*args, **kwargs)
            finally:
                self.blocked_s += time.perf_counter() - started

        def _apply_pending_state_dict(self) -> None:
            raise PeerError("torchft asked to heal this replica from another's checkpoint; this runner does "
                            "not support recovery (checkpoint transfers would bypass the emulated link)")

    class NoCheckpoints(CheckpointTransport):
        """No checkpoint server: replicas start identical (init_sync=False) and never heal here.

        Replaces torchft's default HTTPTransport, which would listen on every interface."""

        def metadata(self) -> str:
            return "lowband: no checkpoint transport"

        def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
            raise PeerError(f"torchft asked to send a checkpoint to replica(s) {dst_ranks}; recovery is not supported")

        def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> Any:
            raise PeerError(f"torchft asked to fetch a checkpoint from replica {src_rank}; recovery is not supported")

    return EmulatedGloo, TimedManager, NoCheckpoints, DiLoCo


# ----------------------------------------------------------------------------- one replica


class _Fragment(nn.Module):
    """Some of a model's parameters (the same tensors), as the module torchft wants per fragment."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


def model_fragments(model: nn.Module, parts: int) -> list[nn.Module]:
    """``[model]``, or ``parts`` runs of contiguous tensors cut as lowband's ``streaming-diloco`` cuts."""
    if parts == 1:
        return [model]
    from lowband.algorithms.streaming_diloco import contiguous_fragments

    params = [p for p in model.parameters() if p.requires_grad]
    return [_Fragment([params[i] for i in run]) for run in contiguous_fragments([p.numel() for p in params], parts)]


@contextlib.contextmanager
def global_parameters(diloco: Any) -> Iterator[None]:
    """The model holds the last synchronised (global) parameters of every fragment."""
    saved = []
    with torch.no_grad():
        for fragment in diloco._fragments:
            for name, p in fragment._model_fragment.named_parameters():
                saved.append((p, p.detach().clone()))
                p.copy_(fragment.original_parameters[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for p, local in saved:
                p.copy_(local)


@torch.no_grad()
def evaluate(model: nn.Module, diloco: Any, batches: list) -> float:
    model.eval()
    with global_parameters(diloco):
        losses = [model(x, y)[1].item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


@record
def replica_main(cfg: TrainConfig, options: PeerOptions, run_dir: str, lighthouse: str) -> dict[str, Any]:
    """One replica group (one process): train with torchft's DiLoCo, write lowband's rows."""
    from torch.distributed import TCPStore

    EmulatedGloo, TimedManager, NoCheckpoints, DiLoCo = _torchft_classes()
    logging.getLogger("torchft.manager").addFilter(lambda r: "flight recorder" not in r.getMessage())  # NCCL only
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ["TORCHFT_LIGHTHOUSE"] = lighthouse
    torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.data)
    network = cfg.network(n)
    link = EmulatedLink(network.bottleneck(), network.emulated)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # this replica group's own
    model = build_model(cfg, data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    manager = TimedManager(
        pg=EmulatedGloo(link, TIMEOUT), min_replica_size=n, use_async_quorum=False, init_sync=False,
        load_state_dict=lambda s: (model.load_state_dict(s["model"]), optimizer.load_state_dict(s["optim"])),
        state_dict=lambda: {"model": model.state_dict(), "optim": optimizer.state_dict()},
        rank=0, world_size=1, store_addr="127.0.0.1", store_port=store.port, lighthouse_addr=lighthouse,
        replica_id=f"lowband_{rank}", hostname="127.0.0.1", checkpoint_transport=NoCheckpoints(),
        timeout=TIMEOUT, quorum_timeout=TIMEOUT, connect_timeout=TIMEOUT)
    try:
        fragments = model_fragments(model, options.fragments)
        outer = [_outer_optimizer(cfg, f.parameters()) for f in fragments]
        diloco = DiLoCo(manager, fragments, optimizer, outer, sync_every=diloco_options(cfg).inner_steps,
                        use_bucketization=options.bucketize, bucket_cap_mb=cfg.bucket_mb * 1e6 / 2**20,
                        should_quantize=options.quantize, fragment_sync_delay=options.tau,
                        fragment_update_alpha=options.alpha)
        manager.start_quorum()  # set-up (joins the lighthouse, forms the gloo group): off the clock, as
        manager.blocked_s = 0.0  # lowband's init_process_group is
        with diloco:
            result = _train(cfg, rank, n, data, model, optimizer, scheduler, diloco, manager, link,
                            Path(run_dir) / options.label)
    finally:
        link.close()
        manager.shutdown(wait=False)
    return result


def diloco_options(cfg: TrainConfig) -> DiLoCoOptions:
    """The outer-loop settings lowband's ``diloco`` would run with under ``cfg`` (same flags, same defaults)."""
    return cfg.options_for(Variant("diloco"))


def _outer_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """lowband's DiLoCo outer optimizer (Nesterov SGD by default, or Adam)."""
    o = diloco_options(cfg)
    if o.outer_optimizer == "adam":
        return torch.optim.Adam(params, lr=o.outer_lr, betas=(o.outer_momentum, 0.999))
    return torch.optim.SGD(params, lr=o.outer_lr, momentum=o.outer_momentum,
                           nesterov=o.nesterov and o.outer_momentum > 0)


def _wait_in_flight(diloco: Any) -> None:
    """Wait for fragment allreduces still in flight (started tau steps before a sync the run
    does not reach). torchft has no call to apply them early; like torchft, they stay unapplied."""
    for fragment in diloco._fragments:
        for work in fragment._allreduce_work:
            work.wait()


def _train(cfg: TrainConfig, rank: int, n: int, data: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: Any, diloco: Any, manager: Any, link: EmulatedLink, out: Path) -> dict[str, Any]:
    """lowband's training loop (:func:`lowband.train.loop.train_one`), the step driven by torchft's hooks."""
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    val_batches = data.val_batches(cfg.batch_size, cfg.eval_batches)
    tokens_per_step = cfg.batch_size * (data.block_size if data.kind == "text" else 1)
    clock, val_loss = 0.0, float("nan")
    with MetricsWriter(out / f"rank{rank}.jsonl") as metrics:
        for step in range(1, cfg.steps + 1):
            started, waited = time.perf_counter(), link.wait_seconds + manager.blocked_s
            x, y = data.batch(generator, cfg.batch_size, rank, n, cfg.sharding)
            _, loss = model(x, y)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()  # torchft's post-step hook: quorum, allreduce, outer step every H/P steps
            optimizer.zero_grad(set_to_none=True)
            if step == cfg.steps:
                _wait_in_flight(diloco)  # the last row counts every byte sent (torchft discards the result)
            scheduler.step()
            elapsed = time.perf_counter() - started
            comm_s = link.wait_seconds + manager.blocked_s - waited
            clock += elapsed
            row = step_row(step, loss.item(), step * tokens_per_step, link.ledger, elapsed, comm_s, clock,
                           scheduler.get_last_lr()[0])
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = row["val_loss"] = evaluate(model, diloco, val_batches)
            metrics.write(row)
            if cfg.progress and rank == 0 and "val_loss" in row:
                print(f"{out.name} step {step}/{cfg.steps}: loss {row['loss']:.3f} val {val_loss:.3f} "
                      f"sent {link.ledger.bytes_sent / 1e6:.1f} MB time {clock:.1f} s", file=sys.stderr, flush=True)
    link.close()  # anything still in flight is charged before the ledger is written
    write_ledger(out / f"ledger_rank{rank}.jsonl", link.ledger)
    return {"val_loss": val_loss, "bytes_sent": link.ledger.bytes_sent, "time_s": clock}
