"""Real shaped links: every worker in its own network namespace, its link shaped by the kernel.

``lowband train --net netns`` (Linux, root) replaces the in-process bandwidth model of
``--net model`` with real TCP over real, rate-limited virtual links:

1. one network namespace per worker (``lowband-<pid>-<rank>``, ``<pid>`` the driver's), and
   a bridge in the root namespace (``lbbr<pid>``) holding the address ``10.X.Y.1/24`` of a
   /24 that no interface on the machine uses yet;
2. per worker a veth pair: ``lb0`` inside its namespace (address ``10.X.Y.(10 + rank)``),
   the other end enslaved to the bridge, so workers reach each other only through the bridge;
3. each link shaped with ``tc tbf`` to the worker's ``--bandwidth``, in both directions:
   on ``lb0`` (what the worker sends) and on the bridge end (what it receives), so a worker's
   link is a full-duplex NIC of that rate, as in the cost model;
4. each worker process enters its namespace before it joins the process group (``setns``),
   gloo binds to ``lb0`` (``GLOO_SOCKET_IFNAME``) and reaches the launcher's store at the
   bridge address: only addresses of namespaces and links this run created are used;
5. latency: this kernel has no ``netem``, so the per-hop latency of the cost model is added
   in user space by :class:`lowband.comm.Comm` after each real collective (the same α terms
   as ``--net model``), while the bandwidth term is the kernel's, measured, never modelled;
6. cleanup on success, failure, Ctrl-C and SIGTERM: processes left inside the namespaces
   are killed, the namespaces (and with them their veth pairs) and the bridge deleted.
   Leftovers of a run whose driver died (``kill -9``) are swept at the next run's start.

A machine where this cannot work (not root, no ``ip``/``tc``, namespaces not permitted)
gets :class:`NetnsUnavailable` with one line naming the cause and pointing at ``--net model``.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable

from torch.distributed.elastic.multiprocessing.errors import record

from lowband.net.link import Network

log = logging.getLogger(__name__)

IFNAME = "lb0"  # the worker's interface inside its namespace
PREFIX = "lowband-"  # namespace names: lowband-<driver pid>-<rank>
CLONE_NEWNET = 0x40000000
MAX_WORKERS = 240
QUEUE_MS = int(os.environ.get("LOWBAND_TBF_QUEUE_MS", "20"))  # addresses .10 .. .249 of the run's /24
FALLBACK = "use --net model (in-process emulation) instead"


class NetnsUnavailable(RuntimeError):
    """Real shaped links cannot be built on this machine; the message names the cause."""


@dataclass(frozen=True)
class NetnsSpec:
    """What a worker needs to enter its namespace (picklable: it travels to the workers)."""

    namespaces: tuple[str, ...]
    bridge_ip: str
    ifname: str = IFNAME
    addresses: tuple[str, ...] = ()  # each namespace's address on its link, in rank order


def check_supported() -> None:
    """Raise :class:`NetnsUnavailable` unless this process can build namespaces and tc shaping."""
    if not sys.platform.startswith("linux"):
        raise NetnsUnavailable(f"--net netns needs Linux network namespaces (this is {sys.platform}): {FALLBACK}")
    if os.geteuid() != 0:
        raise NetnsUnavailable(f"--net netns needs root (ip netns, veth, tc): run as root, or {FALLBACK}")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(f"--net netns needs {' and '.join(missing)} (Debian: apt install iproute2), "
                               f"or {FALLBACK}")


def tbf_args(bandwidth: float) -> list[str]:
    """``tc tbf`` parameters for ``bandwidth`` bytes/s: the bucket holds 1 ms of traffic (at
    least ten full frames), the queue QUEUE_MS of it."""
    burst = max(10 * 1514, int(bandwidth * 0.001))
    return ["tbf", "rate", f"{int(bandwidth * 8)}bit", "burst", str(burst), "latency", f"{QUEUE_MS}ms"]


class ShapedNetwork:
    """Builds the namespaces, bridge and shaped veth links for ``network``; a context manager.

    Example::

        with ShapedNetwork(Network.parse("100mbit", "20ms", 4)) as spec:
            launch(netns_worker, 4, train_main, spec, cfg, bind=spec.bridge_ip)
    """

    def __init__(self, network: Network, pid: int | None = None) -> None:
        if len(network.links) > MAX_WORKERS:
            raise ValueError(f"--net netns supports up to {MAX_WORKERS} workers, got {len(network.links)}")
        self.network = network
        self.pid = os.getpid() if pid is None else pid
        self.bridge = f"lbbr{self.pid}"
        self.namespaces = tuple(f"{PREFIX}{self.pid}-{r}" for r in range(len(network.links)))
        self._made: list[tuple[str, str]] = []  # ("netns" | "link", name), in creation order
        self._old_sigterm: Any = None

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> NetnsSpec:
        check_supported()
        sweep_stale()
        self._old_sigterm = signal.signal(signal.SIGTERM, _terminate)
        try:
            return self.build()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def build(self) -> NetnsSpec:
        subnet = free_subnet(self.pid)
        hosts = list(subnet.hosts())
        bridge_ip = str(hosts[0])
        self._run("ip", "link", "add", self.bridge, "type", "bridge", made=("link", self.bridge))
        self._run("ip", "addr", "add", f"{bridge_ip}/24", "dev", self.bridge)
        self._run("ip", "link", "set", self.bridge, "up")
        for rank, (ns, link) in enumerate(zip(self.namespaces, self.network.links)):
            host_end = f"lbv{self.pid}.{rank}"
            self._run("ip", "netns", "add", ns, made=("netns", ns))
            self._run("ip", "link", "add", host_end, "type", "veth", "peer", "name", IFNAME, "netns", ns,
                      made=("link", host_end))  # deleted explicitly: a netns's veths go away asynchronously
            self._run("ip", "link", "set", host_end, "master", self.bridge, "up")
            self._run("ip", "-n", ns, "addr", "add", f"{hosts[9 + rank]}/24", "dev", IFNAME)
            self._run("ip", "-n", ns, "link", "set", IFNAME, "up")
            self._run("ip", "-n", ns, "link", "set", "lo", "up")
            if link.bandwidth is not None:
                self._run("tc", "-n", ns, "qdisc", "add", "dev", IFNAME, "root", *tbf_args(link.bandwidth))
                self._run("tc", "qdisc", "add", "dev", host_end, "root", *tbf_args(link.bandwidth))
        log.info("netns: %d namespaces on bridge %s (%s)", len(self.namespaces), self.bridge, subnet)
        return NetnsSpec(self.namespaces, bridge_ip, addresses=tuple(str(h) for h in hosts[9:9 + len(self.namespaces)]))

    def close(self) -> None:
        """Kill what runs inside the namespaces, delete them and the bridge (idempotent)."""
        for kind, name in reversed(self._made):
            if kind == "netns":
                delete_namespace(name)
            else:
                _quiet("ip", "link", "del", name)
        self._made = []
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def _run(self, *cmd: str, made: tuple[str, str] | None = None) -> None:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr or result.stdout).strip().splitlines()
            raise NetnsUnavailable(f"`{' '.join(cmd)}` failed: {reason[-1] if reason else result.returncode}; "
                                   f"{FALLBACK}")
        if made is not None:
            self._made.append(made)


# -- worker side ---------------------------------------------------------------------------


def enter(spec: NetnsSpec, rank: int) -> None:
    """Move this process into rank ``rank``'s namespace and point gloo and the store at its link.

    Must run before the process group is created (sockets opened earlier stay where they are)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{spec.namespaces[rank]}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsUnavailable(f"setns into {spec.namespaces[rank]} failed: {os.strerror(err)}; {FALLBACK}")
    finally:
        os.close(fd)
    os.environ["MASTER_ADDR"] = spec.bridge_ip  # the launcher's store, reached over this link
    os.environ["GLOO_SOCKET_IFNAME"] = spec.ifname
    os.environ["TP_SOCKET_IFNAME"] = spec.ifname


@record
def netns_worker(fn: Callable[..., Any], spec: NetnsSpec, *args: Any) -> Any:
    """Launcher entry point: enter this worker's namespace, then run ``fn(*args)``."""
    enter(spec, int(os.environ.get("LOCAL_RANK", "0")))
    return fn(*args)


# -- housekeeping --------------------------------------------------------------------------


def free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A 10.X.Y.0/24 (X in 200..249) that overlaps no address on this machine."""
    used = [ipaddress.ip_interface(a).network for a in _addresses()]
    for i in range(50 * 256):
        k = (seed + i * 7919) % (50 * 256)
        candidate = ipaddress.ip_network(f"10.{200 + k // 256}.{k % 256}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise NetnsUnavailable(f"no free 10.200-249.x.0/24 subnet for the bridge; {FALLBACK}")


def delete_namespace(name: str) -> None:
    """Kill every process inside namespace ``name``, then delete it (its veth pairs go with it)."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _quiet("ip", "netns", "del", name)


def sweep_stale() -> list[str]:
    """Delete namespaces and bridges of earlier runs whose driver process no longer exists."""
    swept = []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in re.findall(rf"^({PREFIX}(\d+)-\d+)", listing, flags=re.M):
        if not _alive(int(name[1])):
            delete_namespace(name[0])
            swept.append(name[0])
    links = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout
    for bridge, pid in re.findall(r"^\d+: (lbbr(\d+))[:@]", links, flags=re.M):
        if not _alive(int(pid)):
            _quiet("ip", "link", "del", bridge)
            swept.append(bridge)
    if swept:
        log.warning("netns: removed leftovers of runs that died: %s", ", ".join(swept))
    return swept


def _addresses() -> list[str]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    return re.findall(r"inet (\S+)", out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _quiet(*cmd: str) -> None:
    subprocess.run(cmd, capture_output=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM while the namespaces are built: unwind through ShapedNetwork.__exit__ (which removes them)
    as an interruption by that signal (the CLI exits 128 + signum)."""
    stop = KeyboardInterrupt(f"stopped by signal {signum}")
    stop.sigval = signum  # type: ignore[attr-defined]
    raise stop
