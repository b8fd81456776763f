"""The worker: what every rank runs, under torchrun or lowband's own launch.

Join the process group, write ``run.json`` (rank 0), then for each algorithm of the config, in
order and from the same seed and token budget, build the model (same initialisation on every
rank), AdamW, the lr schedule, a :class:`~lowband.comm.Comm` over the emulated network and the
algorithm, and run the training loop (:func:`lowband.train.loop.train_one`); at the end rank 0
writes the report.

Device and precision (``--device``, ``--precision``; :mod:`lowband.train.precision`): the worker
picks its device before joining the group (CUDA: GPU ``LOCAL_RANK``, made current, and NCCL; the
CPU: gloo); the model, its batches and everything built from them live there. Forward passes run
under autocast; fp16 scales the loss and skips overflowing inner steps (still counted).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.comm import group
from lowband.devices import backend_for, resolve_device
from lowband.net.link import Network
from lowband.train.checkpoint import atomic_write_text
from lowband.train.config import TrainConfig
from lowband.train.data import Dataset, load_dataset
from lowband.train.loop import build_model, train_one
from lowband.train.precision import device_choice
from lowband.train.progress import status
from lowband.version import __version__


@record
def main(cfg: TrainConfig) -> str:
    """Entry point of one worker; returns the run folder. Rank 0 writes the report."""
    started = float(os.environ.get("LOWBAND_STARTED", time.time()))  # `lowband train` sets it; torchrun: now
    device = worker_device(cfg)
    rank, world_size = group.init_from_env(backend_for(device))
    torch.set_num_threads(cfg.threads)
    status(rank == 0, f"{world_size} workers joined ({backend_for(device)}, {device.type}) "
                      f"{time.time() - started:.1f} s after the start; loading {cfg.data}")
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
        variants = cfg.variants()
        status(rank == 0, f"data ready ({data.name}, {data.kind}); training {len(variants)} algorithm(s), "
                          f"{cfg.steps} steps each")
        for i, variant in enumerate(variants, start=1):
            train_one(cfg, variant, data, network, run_dir, device, position=(i, len(variants)))
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
    defaults = TrainConfig().to_dict()  # what the report shows: only the flags that were changed
    info["changed"] = {k: v for k, v in cfg.to_dict().items() if v != defaults.get(k) and k not in ("name", "out")}
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
