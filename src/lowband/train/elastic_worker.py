"""One worker of an elastic run, started by the ``lowband train --elastic`` driver (:mod:`lowband.train.elastic`)
as its own single-process job (``python -m lowband.train.elastic_agent``: torchrun's launcher API on loopback).

Each worker is its own single-process torchrun job (torchrun's agent stops every worker of a
job when one dies, so survivors could not go on inside one job); workers find each other
through the driver's store (``LOWBAND_ELASTIC_STORE=host:port``) and the quorum protocol of
:mod:`lowband.elastic.quorum`. The environment names the worker: ``LOWBAND_REPLICA`` (its id,
the rank it had at the start) and ``LOWBAND_INCARNATION`` (0, then 1, 2 ... when restarted);
``LOWBAND_ELASTIC_CONFIG`` is the run's config (JSON).

The loop is :func:`lowband.train.loop.train_one`, the one every run uses; this worker's
:class:`ElasticRole` makes the differences:

* the membership that drives the algorithm (``membership_for(algo)``: DiLoCo's rounds, the
  overlapped variants' drains, gossip's quorum points) is attached to it and joins before the
  first step: the algorithm's synchronisation points run the quorum;
* a joiner continues at the step (and on the clock) of the worker it got the state from;
* metrics go to ``rank<replica>.jsonl`` (a restarted replica appends to its file) with a
  ``members`` column; joins, departures and redone rounds go to ``events.jsonl``;
* data: every worker samples the whole training split (``iid``) from its own stream,
  seeded by (seed, replica, incarnation); ``--sharding contiguous`` shards by the rank and
  size of the current membership.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.algorithms import Algorithm
from lowband.comm import Comm, group
from lowband.elastic.membership import ElasticSync, FaultPlan, LoopState, membership_for
from lowband.elastic.quorum import QuorumAborted, QuorumClient, TrainingOver
from lowband.net.link import Network
from lowband.train.config import TrainConfig
from lowband.train.data import load_dataset
from lowband.train.loop import Role, train_one
from lowband.train.metrics import MetricsWriter


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
    network = cfg.network(cfg.workers)
    train_one(cfg, cfg.variants()[0], load_dataset(cfg.data), network, Path(cfg.out) / str(cfg.name),
              role=ElasticRole(cfg, store, network, replica, incarnation))


class ElasticRole(Role):
    """Replica ``replica`` (incarnation ``incarnation``) of an elastic run: its membership is attached
    to the algorithm and joins before the first step (module docstring)."""

    elastic = True

    def __init__(self, cfg: TrainConfig, store: Any, network: Network, replica: int, incarnation: int) -> None:
        super().__init__(cfg)
        self.store, self.network, self.incarnation = store, network, incarnation
        self.id, self.append = replica, incarnation > 0
        self.faults = FaultPlan.from_env(replica, incarnation)
        self.sync: ElasticSync | None = None
        self.rounds, self.elastic_s = 0, 0.0  # at the top of the step in progress

    def comm(self, network: Network) -> Comm:
        return Comm()  # a world of one until the first quorum: the membership re-points it

    def seed(self) -> int:
        return (self.cfg.seed * 1_000_003 + self.id) * 1009 + self.incarnation

    def prepare(self, algo_dir: Path, comm: Comm) -> None:
        """No ring file (the membership's group changes)."""

    @contextlib.contextmanager
    def start(self, algo: Algorithm, scheduler: Any, state: LoopState, algo_dir: Path) -> Iterator[None]:
        """Attach the algorithm's membership (``membership_for``) and join: the start of training, or a
        running job's next outer step (then the state, the step and the clock come from a holder)."""
        if getattr(algo, "aggregator", None) is not None:  # gossip has none
            algo.aggregator.compressor.for_rank(self.id)  # seeded compressors draw per worker
        with MetricsWriter(algo_dir / "events.jsonl", append=True) as events:
            def on_event(event: dict[str, Any]) -> None:
                events.write({"step": state.step, "time_s": state.clock, **event})

            client = QuorumClient(self.store, f"{self.id}.{self.incarnation}")
            self.sync = membership_for(algo)(client, self.store, algo, scheduler, self.network, state, self.faults,
                                             self.cfg.elastic_timeout, on_event)
            self.sync.join()
            yield

    def before_step(self, step: int) -> None:
        assert self.sync is not None
        self.faults.trigger("step", step)
        self.rounds, self.elastic_s = self.sync.rounds, self.sync.elastic_s

    def extend(self, row: dict[str, Any], last: bool) -> None:
        """Members and the seconds of membership work; an outer step's fingerprint where one landed."""
        sync = self.sync
        assert sync is not None
        row.update(members=sync.members, elastic_s=sync.elastic_s - self.elastic_s)
        if sync.rounds != self.rounds or last:
            row.update(outer_steps=sync.rounds, params_sha=sync.fingerprint())

    def finish(self, algo_dir: Path, comm: Comm) -> None:
        """Every replica writes its own files on this machine: nothing to collect."""


if __name__ == "__main__":
    sys.exit(main())
