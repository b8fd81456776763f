"""Start a training run on this machine: the workers of ``cfg``, over the network ``cfg.net`` asks for.

``--net model`` starts ``cfg.workers`` processes through torchrun's launcher API and each
emulates its link in process; ``--net netns`` first builds one network namespace per worker
behind a tc-shaped veth link (:mod:`lowband.net.netns`), starts the same workers inside
them, and removes everything afterwards, whatever happens.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from lowband.net.netns import ShapedNetwork, netns_worker
from lowband.train.config import TrainConfig
from lowband.train.launch import WorkerFailed, launch
from lowband.train.nodes import Nodes
from lowband.train.shutdown import stop_on_signal

LAUNCH_LOG = "launch.log"  # torchelastic's log of a launch, in the run folder


@stop_on_signal()  # SIGTERM/SIGINT: every worker killed at once, then Interrupted (train/shutdown.py)
def run(cfg: TrainConfig, nodes: Nodes | None = None, bind: str = "127.0.0.1") -> dict[int, Any]:
    """Train ``cfg`` on ``cfg.workers`` local processes; returns {rank: worker result} of this machine.

    ``nodes``: the machines of the run (default: this one), every socket on ``bind``
    (:meth:`lowband.train.nodes.Nodes.bind`).

    Raises :class:`lowband.train.launch.WorkerFailed` when a worker fails and
    :class:`lowband.net.netns.NetnsUnavailable` when ``--net netns`` cannot be built here."""
    from lowband.train.worker import main as worker_main

    if cfg.elastic:
        from lowband.train.elastic import run_elastic

        return run_elastic(cfg)  # each worker its own torchrun job; docs/elastic.md
    if cfg.net == "netns":
        with ShapedNetwork(cfg.network(cfg.workers)) as spec:
            return launch(netns_worker, cfg.workers, worker_main, spec, cfg, bind=spec.bridge_ip)
    nodes = nodes or Nodes()
    if not cfg.name and not nodes.multi:  # the run folder known here: the launch's log goes into it
        cfg = dataclasses.replace(cfg, name=time.strftime("%Y%m%d-%H%M%S"))
    log = launch_log(cfg, nodes)
    try:
        return launch(worker_main, cfg.workers, cfg, bind=bind, nodes=nodes, log_file=log)
    except WorkerFailed as err:
        raise WorkerFailed(f"{err} (torchelastic's log: {log})" if log.exists() else str(err)) from None


def launch_log(cfg: TrainConfig, nodes: Nodes) -> Path:
    """Where torchrun's agent logs a failure: ``<out>/<name>/launch.log``; on several machines
    without ``--name`` (rank 0 names the run folder) ``<out>/launch-node<I>-<time>.log``."""
    if cfg.name:
        return Path(cfg.out) / cfg.name / LAUNCH_LOG
    return Path(cfg.out) / f"launch-node{nodes.node_rank}-{time.strftime('%Y%m%d-%H%M%S')}.log"
