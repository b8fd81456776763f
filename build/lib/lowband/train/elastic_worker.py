"""One worker of an elastic run, started by the ``lowband train --elastic`` driver (:mod:`lowband.train.elastic`)
as its own single-process job (``python -m lowband.train.elastic_agent``: torchrun's launcher API on loopback).

Each worker is its own single-process torchrun job (torchrun's agent stops every worker of a
job when one dies, so survivors could not go on inside one job); workers find each other
through the driver's store (``LOWBAND_ELASTIC_STORE=host:port``) and the quorum protocol of
:mod:`lowband.elastic.quorum`. The environment names the worker: ``LOWBAND_REPLICA`` (its id,
the rank it had at the start) and ``LOWBAND_INCARNATION`` (0, then 1, 2 ... when restarted);
``LOWBAND_ELASTIC_CONFIG`` is the run's config (JSON).

The loop is :func:`lowband.train.worker.train_one`'s, with the elastic differences:

* the algorithm's synchronisation goes through its :class:`~lowband.elastic.membership.ElasticSync`
  (``ELASTIC``: DiLoCo's, the overlapped variants' drains, gossip's quorum points);
* a joiner continues at the step (and on the clock) of the worker it got the state from;
* metrics go to ``rank<replica>.jsonl`` (a restarted replica appends to its file) with a
  ``members`` column; joins, departures and redone rounds go to ``events.jsonl``;
* data: every worker samples the whole training split (``iid``) from its own stream,
  seeded by (seed, replica, incarnation); ``--sharding contiguous`` shards by the rank and
  size of the current membership.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.comm import Comm, group
from lowband.elastic.membership import ELASTIC, FaultPlan, LoopState
from lowband.elastic.quorum import QuorumAborted, QuorumClient, TrainingOver
from lowband.train.config import TrainConfig
from lowband.train.data import load_dataset
from lowband.train.metrics import MetricsWriter
from lowband.train.worker import build_algorithm, build_model, evaluate, lr_lambda, step_row


def config_from_json(text: str) -> TrainConfig:
    """The run's :class:`TrainConfig` from its JSON (lists back to tuples)."""
    raw = json.loads(text)
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


@record
def main() -> int:
    cfg = config_from_json(Path(os.environ["LOWBAND_ELASTIC_CONFIG"]).read_text())
    replica, incarnation = int(os.environ["LOWBAND_REPLICA"]), int(os.environ.get("LOWBAND_INCARNATION", "0"))
    torch.set_num_threads(cfg.threads)
    store = group.connect_store(os.environ["LOWBAND_ELASTIC_STORE"])
    try:
        train(cfg, store, replica, incarnation)
    except TrainingOver as err:
        print(f"replica {replica}.{incarnation}: {err}", flush=True)
    except QuorumAborted as err:
        print(f"replica {replica}.{incarnation}: {err}", file=sys.stderr, flush=True)
        return 3
    finally:
        group.shutdown()
    return 0


def train(cfg: TrainConfig, store: Any, replica: int, incarnation: int) -> None:
    """Train ``cfg``'s one algorithm as replica ``replica`` until ``cfg.steps``."""
    variant = cfg.variants()[0]
    data = load_dataset(cfg.data)
    network = cfg.network(cfg.workers)
    algo_dir = Path(cfg.out) / str(cfg.name) / variant.folder
    model = build_model(cfg, data)
    comm = Comm()  # a world of one until the first quorum: ElasticSync re-points it
    algo = build_algorithm(cfg, variant, model, comm)
    if getattr(algo, "aggregator", None) is not None:  # gossip has none
        algo.aggregator.compressor.for_rank(replica)  # seeded compressors draw per worker
    scheduler = torch.optim.lr_scheduler.LambdaLR(algo.optimizer, lr_lambda(cfg))
    generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + replica) * 1009 + incarnation)
    val_batches = data.val_batches(cfg.batch_size, cfg.eval_batches)
    tokens_per_step = cfg.batch_size * (data.block_size if data.kind == "text" else 1)
    token = f"{replica}.{incarnation}"
    loop = LoopState()
    faults = FaultPlan.from_env(replica, incarnation)
    with MetricsWriter(algo_dir / f"rank{replica}.jsonl", append=incarnation > 0) as metrics, \
            MetricsWriter(algo_dir / "events.jsonl", append=True) as events:
        def on_event(event: dict[str, Any]) -> None:
            events.write({"step": loop.step, "time_s": loop.clock, **event})

        sync = ELASTIC.get(variant.algorithm)(QuorumClient(store, token), store, algo, scheduler, network, loop,
                                              faults, cfg.elastic_timeout, on_event)
        sync.join()
        while loop.step < cfg.steps:
            loop.step += 1
            faults.trigger("step", loop.step)
            comm.ledger.step = loop.step
            started, waited, elastic, rounds = time.perf_counter(), comm.wait_seconds, sync.elastic_s, sync.rounds
            rank, size = (comm.rank, comm.world_size) if cfg.sharding != "iid" else (0, 1)
            x, y = data.batch(generator, cfg.batch_size, rank, size, cfg.sharding)
            _, loss = model(x, y)
            loss.backward()
            algo.step()  # at quorum points: the ElasticSync's (a rejoining worker's loop.step may jump)
            algo.zero_grad()
            if loop.step == cfg.steps:
                algo.finish()
            scheduler.step()
            elapsed, comm_s = time.perf_counter() - started, comm.wait_seconds - waited
            loop.clock += elapsed
            row = step_row(loop.step, loss.item(), loop.step * tokens_per_step, comm.ledger, elapsed, comm_s,
                           loop.clock, scheduler.get_last_lr()[0])
            row.update(members=sync.members, elastic_s=sync.elastic_s - elastic)
            if sync.rounds != rounds or loop.step == cfg.steps:  # an outer step (quorum) landed: its fingerprint
                row.update(outer_steps=sync.rounds, params_sha=sync.fingerprint())
            if loop.step % cfg.eval_every == 0 or loop.step == cfg.steps:
                loop.val_loss = row["val_loss"] = evaluate(model, algo, val_batches)
            metrics.write(row)
    comm.close()
    with MetricsWriter(algo_dir / f"ledger_rank{replica}.jsonl", append=incarnation > 0) as ledger_out:
        for rec in comm.ledger.records:
            ledger_out.write(rec.to_dict())


if __name__ == "__main__":
    sys.exit(main())
