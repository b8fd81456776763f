"""Start a training run on this machine: the workers of ``cfg``, over the network ``cfg.net`` asks for.

``--net model`` starts ``cfg.workers`` processes through torchrun's launcher API and each
emulates its link in process; ``--net netns`` first builds one network namespace per worker
behind a tc-shaped veth link (:mod:`lowband.net.netns`), starts the same workers inside
them, and removes everything afterwards, whatever happens.
"""

from __future__ import annotations

from typing import Any

from lowband.net.netns import ShapedNetwork, netns_worker
from lowband.train.config import TrainConfig
from lowband.train.launch import launch


def run(cfg: TrainConfig) -> dict[int, Any]:
    """Train ``cfg`` on ``cfg.workers`` local processes; returns {rank: worker result}.

    Raises :class:`lowband.train.launch.WorkerFailed` when a worker fails and
    :class:`lowband.net.netns.NetnsUnavailable` when ``--net netns`` cannot be built here."""
    from lowband.train.worker import main as worker_main

    if cfg.elastic:
        from lowband.train.elastic import run_elastic

        return run_elastic(cfg)  # each worker its own torchrun job; docs/elastic.md
    if cfg.net == "netns":
        with ShapedNetwork(cfg.network(cfg.workers)) as spec:
            return launch(netns_worker, cfg.workers, worker_main, spec, cfg, bind=spec.bridge_ip)
    return launch(worker_main, cfg.workers, cfg)
