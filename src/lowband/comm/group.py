"""Process-group lifecycle and control-plane agreement (the engine is torch.distributed).

Workers are started by torchrun (or its launcher API, :mod:`lowband.train.launch`), which
sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Control traffic here (agreeing on a
run name, barriers) is not charged to the ledger: it is not training communication.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def init_from_env(backend: str = "gloo", timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns (rank, world_size).

    Without torchrun's variables (a plain ``python`` process) this is a world of one.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return rank(), world_size


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def agree(value: T, src: int = 0) -> T:
    """Every rank gets ``src``'s ``value`` (any picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- elastic runs (lowband.fault.elastic): a store of the driver, a default group per membership --------
def serve_store(host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0) -> dist.TCPStore:
    """A TCPStore server listening on ``host`` only (``port=0``: a free port, read it from
    ``.port``); loopback unless told. TCPStore alone listens on every interface whatever host
    it is given, so the listening socket is bound here and handed over."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        store = dist.TCPStore(host, sock.getsockname()[1], is_master=True, master_listen_fd=sock.fileno(),
                              wait_for_workers=False, use_libuv=True, timeout=timedelta(seconds=timeout_s))
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns (and closes) the listening socket now
    return store


def connect_store(address: str, timeout_s: float = 60.0) -> dist.TCPStore:
    """A client of the store at ``host:port``."""
    host, _, port = address.rpartition(":")
    return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))


def init_from_store(store: dist.Store, prefix: str, rank: int, world_size: int, timeout_s: float,
                    backend: str = "gloo") -> None:
    """(Re)build the default process group over ``store`` under ``prefix``: the previous one,
    if any, is destroyed first (its peers may be dead: gloo's teardown does not wait for them)."""
    shutdown()
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
