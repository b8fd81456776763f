"""Process-group lifecycle and control-plane agreement (the engine is torch.distributed).

Workers are started by torchrun (or its launcher API, :mod:`lowband.train.launch`), which
sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Control traffic here (agreeing on a
run name, barriers) is not charged to the ledger: it is not training communication.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def init_from_env(backend: str = "gloo", timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns (rank, world_size).

    Without torchrun's variables (a plain ``python`` process) this is a world of one.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        os.environ.update(worker_sockets())
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return rank(), world_size


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def agree(value: str, src: int = 0) -> str:
    """Every rank gets ``src``'s string (the run's name).

    Sent as its UTF-8 bytes in two tensor broadcasts (length, then bytes), on the group's device
    (NCCL: the current GPU): nothing received from the network is ever unpickled, unlike
    ``broadcast_object_list``, which would run whatever a peer's pickle says."""
    if not dist.is_initialized():
        return value
    device = group_device()
    raw = value.encode() if dist.get_rank() == src else b""
    size = torch.tensor([len(raw)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src)
    data = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)  # host sync: the buffer's size
    if raw:
        data.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    dist.broadcast(data, src=src)
    try:
        return bytes(data.cpu().tolist()).decode()
    except UnicodeDecodeError:
        raise ValueError(f"rank {src} sent a run name that is not UTF-8") from None


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's ``data``, index = rank (control plane: not charged to a ledger, never unpickled).

    Sizes first, then the bytes padded to the longest, on the group's device."""
    if not dist.is_initialized():
        return [data]
    device, world = group_device(), dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device))
    lengths = [int(n.item()) for n in sizes]  # host sync: the buffers' sizes
    mine = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    if data:
        mine[:len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return [t[:n].cpu().numpy().tobytes() for t, n in zip(gathered, lengths)]


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a group's collectives take tensors on: the current GPU under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def control_store(prefix: str, store: dist.Store | None = None) -> dist.Store:
    """Keys under ``prefix`` in ``store`` (default: the store the process group was built from, torchrun's
    TCPStore): control-plane messages, never charged to a ledger."""
    if store is None:
        store = dist.distributed_c10d._get_default_store()
    return dist.PrefixStore(prefix, store)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- where worker sockets listen ----------------------------------------------------------------
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")  # the interface gloo's and NCCL's sockets use


def interface_of(address: str) -> str | None:
    """The name of the local network interface holding IPv4 ``address`` (``127.0.0.1``: ``lo``), or None
    where it cannot be told (not Linux, no such address)."""
    return next((name for name, held in _ipv4_interfaces() if held == address), None)


def address_of(name: str) -> str | None:
    """The IPv4 address of local interface ``name``, or None (no such interface, or no IPv4 address)."""
    return next((held for iface, held in _ipv4_interfaces() if iface == name), None)


def iface_address(iface: str) -> str | None:
    """The IPv4 address ``iface`` names here: itself if it is one of this machine's addresses, else the
    address of the interface of that name; None when neither."""
    return iface if interface_of(iface) else address_of(iface)


def _ipv4_interfaces() -> list[tuple[str, str]]:
    """``(interface, IPv4 address)`` of every local interface that has one (Linux; empty elsewhere)."""
    try:
        import fcntl
        import struct

        names = [name for _, name in socket.if_nameindex()]
    except (ImportError, OSError, AttributeError):
        return []
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            try:  # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            found.append((name, socket.inet_ntoa(packed[20:24])))
    return found


def pin_sockets(address: str) -> dict[str, str]:
    """The environment that makes gloo's and NCCL's worker sockets use the interface of ``address``
    (they would otherwise bind to whatever the host name resolves to, a LAN address on many
    machines); a variable the user set is kept. Empty where the interface cannot be told."""
    name = interface_of(address)
    return {var: os.environ.get(var, name) for var in IFNAME_VARS} if name else {}


def address_towards(host: str) -> str:
    """This machine's IPv4 address on the route to ``host`` (a connected UDP socket: nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
        except OSError as err:
            raise ValueError(f"no route to {host} ({err.strerror or err}): check the rendezvous address, or name "
                             f"the interface with --iface / LOWBAND_IFACE") from None
        return str(probe.getsockname()[0])


def worker_sockets() -> dict[str, str]:
    """The interface a worker's gloo/NCCL sockets use, as environment (``GLOO_SOCKET_IFNAME``...).

    lowband's launcher sets it for its workers; under a plain ``torchrun`` it is ``LOWBAND_IFACE``
    (a name or an address), else the interface on the route to the store (``MASTER_ADDR``): the one
    the run already meets on, instead of whatever the host name resolves to. Variables the user
    set are kept; nothing where nothing can be told."""
    iface = os.environ.get("LOWBAND_IFACE")
    if iface:
        address = iface_address(iface)
        if address is None:
            raise ValueError(f"LOWBAND_IFACE={iface}: no interface of that name with an IPv4 address, nor an "
                             f"address of this machine")
        return pin_sockets(address)
    master = os.environ.get("MASTER_ADDR")
    if not master or all(var in os.environ for var in IFNAME_VARS):
        return {}
    try:
        return pin_sockets(address_towards(master))
    except ValueError:
        return {}


# -- elastic runs (lowband.elastic.membership): a store of the driver, a default group per membership --------
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
