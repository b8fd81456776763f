"""Where a run's workers live and where its sockets listen: one machine, or several under torchrun's c10d rendezvous.

``lowband train`` starts this machine's workers through torchrun's launcher API
(:mod:`lowband.train.launch`). With ``--nnodes N`` every machine runs the same command with its
own ``--node-rank`` and the same ``--rdzv-endpoint HOST:PORT``; torchrun's c10d rendezvous joins
them into one world of ``N x --workers`` ranks (global ranks in the order of the machines'
addresses, torchrun's rule). Every listening socket of the run is on one interface per machine
(:meth:`Nodes.bind`):

* ``--iface NAME|ADDRESS`` (or ``LOWBAND_IFACE``) when given;
* otherwise loopback for a single machine, and for several the interface that holds the
  rendezvous address (node 0) or the one this machine reaches it through (the others).

Node 0 hosts the rendezvous store on ``HOST:PORT`` (an address of node 0); each node's torchrun
agent and workers bind to :meth:`Nodes.bind`'s address (the workers' shared store, gloo's and
NCCL's sockets via ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``). docs/multinode.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lowband.comm.group import address_towards, iface_address, interface_of

if TYPE_CHECKING:
    from lowband.train.config import TrainConfig

IFACE_ENV = "LOWBAND_IFACE"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Nodes:
    """The machines of a run: how many, which one this is, where they meet, which interface to use."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT of node 0's rendezvous store (--nnodes > 1)
    iface: str | None = None  # an interface name or one of its IPv4 addresses; None: see Nodes.bind

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes}), "
                             f"got {self.node_rank}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT, the address of node 0 that every node "
                             "reaches (the same on every node)")
        if self.nnodes == 1 and self.rdzv_endpoint:
            raise ValueError("--rdzv-endpoint is for runs on several machines: add --nnodes N, or drop it")
        if self.rdzv_endpoint:
            self.endpoint()  # raises on a malformed HOST:PORT

    @property
    def multi(self) -> bool:
        return self.nnodes > 1

    def endpoint(self) -> tuple[str, int]:
        """``(host, port)`` of ``--rdzv-endpoint``; one line on a malformed value."""
        host, sep, port = (self.rdzv_endpoint or "").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--rdzv-endpoint must be HOST:PORT with a port in 1..65535 (e.g. 10.0.0.1:29400), "
                             f"got {self.rdzv_endpoint!r}")
        return host.strip("[]"), int(port)

    def bind(self) -> str:
        """The IPv4 address every socket of this machine's part of the run listens on (module docstring)."""
        iface = self.iface or os.environ.get(IFACE_ENV) or None
        if iface:
            address = resolve_iface(iface)
            if self.multi and self.node_rank == 0 and _ipv4(self.endpoint()[0]) != address:
                raise ValueError(f"--rdzv-endpoint {self.rdzv_endpoint} is not on --iface {iface} ({address}): node 0 "
                                 f"hosts the rendezvous there; give {address}:PORT, or drop --iface")
            return address
        if not self.multi:
            return LOOPBACK
        host, _ = self.endpoint()
        address = _ipv4(host)
        if self.node_rank == 0:
            if interface_of(address) is None:
                raise ValueError(f"--rdzv-endpoint {self.rdzv_endpoint}: {address} is not an address of this "
                                 f"machine, and node 0 hosts the rendezvous: run --node-rank 0 on the machine that "
                                 f"has it, or give one of its addresses")
            return address
        return address_towards(address)


def resolve_iface(iface: str) -> str:
    """``eth1`` or ``10.0.0.5`` -> this machine's IPv4 address on it; one line naming the choices otherwise."""
    address = iface_address(iface)
    if address is not None:
        return address
    names = ", ".join(name for _, name in socket.if_nameindex())
    try:
        ipaddress.IPv4Address(iface)
    except ValueError:
        raise ValueError(f"--iface {iface}: no interface of that name with an IPv4 address here "
                         f"(interfaces: {names}; or set {IFACE_ENV})") from None
    raise ValueError(f"--iface {iface}: not an address of this machine (interfaces: {names})")


def _ipv4(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise ValueError(f"--rdzv-endpoint: cannot resolve host {host!r}: give an IPv4 address of node 0") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``, ``--iface`` (the machines of a run)."""
    group = parser.add_argument_group("machines (docs/multinode.md)")
    group.add_argument("--nnodes", type=int, default=1, help="machines in the run; each runs this command with the "
                       "same flags and its own --node-rank")
    group.add_argument("--node-rank", type=int, default=0, help="this machine's index (0: hosts the rendezvous)")
    group.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                       help="--nnodes > 1: node 0's address and a free port, reachable from every node")
    group.add_argument("--iface", default=None, metavar="NAME|ADDRESS",
                       help=f"interface for every listening socket (default: ${IFACE_ENV}, else loopback on one "
                            "machine, the rendezvous interface on several)")


def check_nodes(cfg: TrainConfig, nodes: Nodes) -> None:
    """Refuse machine flags that the rest of ``cfg`` cannot honour (one line each)."""
    if nodes.multi and cfg.elastic:
        raise ValueError("--elastic runs on one machine (its driver supervises local workers): drop --nnodes")
    if cfg.net == "netns" and (nodes.multi or nodes.iface):
        raise ValueError("--net netns builds its namespaces and bridge on one machine and listens on the bridge: "
                         "drop --nnodes/--iface, or use --net model")
    if cfg.elastic and nodes.iface and resolve_iface(nodes.iface) != LOOPBACK:
        raise ValueError("--elastic listens on loopback only (one machine): drop --iface")


def pop_nodes(values: dict[str, Any]) -> Nodes:
    """Take the machine flags out of parsed ``values`` (argparse's ``vars``) as :class:`Nodes`."""
    return Nodes(**{key: values.pop(key) for key in ("nnodes", "node_rank", "rdzv_endpoint", "iface")})
