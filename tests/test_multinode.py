"""Several machines under torchrun's c10d rendezvous, as network namespaces on this host (issue 23).

Two namespaces stand for two machines, each behind its own tc-shaped veth link on a bridge
(:class:`lowband.net.netns.ShapedNetwork`, the same links ``--net netns`` builds). In each,
``lowband train --nnodes 2 --node-rank i --rdzv-endpoint <node 0>:PORT --workers 2`` runs as it
would on a real machine (docs/multinode.md gives these commands): torchrun's launcher API, a
c10d rendezvous hosted by node 0, 2 local workers per node, 4 ranks in all. The test checks that
training equals a one-machine run of 4 workers with the same seed, that the bytes crossed the
shaped links, that rank 0's report covers every rank, and that every socket of both machines
listened on its own link's address and nowhere else. Skipped, with the reason, where network
namespaces are not permitted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowband.net.link import Network
from lowband.net.netns import ShapedNetwork
from test_netns import REASON
from test_sockets import descendants, listening_addresses

pytestmark = pytest.mark.skipif(REASON is not None, reason=f"network namespaces not permitted here: {REASON}")
PORT = 29471
TRAIN = ["--algo", "ddp,diloco", "-H", "2", "--steps", "4", "--eval-every", "2", "--eval-batches", "1",
         "--batch-size", "4", "--bandwidth", "none", "--latency", "none", "--no-progress", "--name", "run"]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
                                                            "LOWBAND_IFACE")},
       "TORCH_CPP_LOG_LEVEL": "ERROR"}  # c10d warns that a namespace has no DNS for peer names


def node_command(node: int, endpoint: str, out: Path) -> list[str]:
    """What one machine runs (docs/multinode.md)."""
    return [sys.executable, "-m", "lowband.cli", "train", "--nnodes", "2", "--node-rank", str(node),
            "--rdzv-endpoint", endpoint, "--workers", "2", "--out", str(out), *TRAIN]


def val_losses(run_dir: Path, rank: int = 0) -> dict[str, list[float]]:
    """Each algorithm's validation losses in ``rank``'s metrics."""
    folders = json.loads((run_dir / "run.json").read_text())["folders"]
    return {algo: [row["val_loss"] for row in map(json.loads, (run_dir / folder / f"rank{rank}.jsonl").open())
                   if "val_loss" in row] for algo, folder in folders.items()}


def sent_per_rank(run_dir: Path, algo: str) -> list[int]:
    """Bytes each rank's ledger says it sent for ``algo`` (the last metrics row)."""
    folder = run_dir / json.loads((run_dir / "run.json").read_text())["folders"][algo]
    return [json.loads(path.read_text().splitlines()[-1])["bytes_sent"]
            for path in sorted(folder.glob("rank*.jsonl"))]


def tx_bytes(namespace: str) -> int:
    """Bytes the namespace's link (lb0) has sent, from the kernel."""
    out = subprocess.run(["ip", "-n", namespace, "-s", "-j", "link", "show", "lb0"], capture_output=True,
                         text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def test_two_machines_train_like_one_and_listen_only_on_their_links(tmp_path: Path) -> None:
    single = subprocess.run([sys.executable, "-m", "lowband.cli", "train", "--workers", "4", "--out",
                             str(tmp_path / "single"), *TRAIN], env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    with ShapedNetwork(Network.parse("200mbit", "0ms", 2)) as spec:
        endpoint = f"{spec.addresses[0]}:{PORT}"
        before = [tx_bytes(ns) for ns in spec.namespaces]
        procs = [subprocess.Popen(["ip", "netns", "exec", ns, *node_command(i, endpoint, tmp_path / f"node{i}")],
                                  env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i, ns in enumerate(spec.namespaces)]
        seen: list[dict[str, set[int]]] = [{}, {}]  # per machine: listening address -> pids
        deadline = time.monotonic() + 240
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for node, proc in enumerate(procs):
                for pid in descendants(proc.pid):
                    try:
                        for address in listening_addresses(pid):
                            seen[node].setdefault(address, set()).add(pid)
                    except OSError:  # the process ended while being read
                        pass
            time.sleep(0.2)
        outputs = []
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            outputs.append(proc.communicate(timeout=30)[0])
        sent = [tx_bytes(ns) - b for ns, b in zip(spec.namespaces, before)]
    for node, proc in enumerate(procs):
        assert proc.returncode == 0, f"node {node}: {outputs[node][-3000:]}"
    assert "on node 0 of 2" in outputs[0] and "4 workers" in outputs[0]  # rank 0's report: the whole world
    run0 = tmp_path / "node0" / "run"
    assert val_losses(run0) == val_losses(tmp_path / "single" / "run")  # same seed, same ranks: same training
    for algo in ("ddp", "diloco"):
        assert len(sent_per_rank(run0, algo)) == 4  # rank 0 collected the other machine's logs
    # a ring over ranks 0,1 | 2,3 crosses each machine's link once per hop of a collective: at least
    # one rank's worth of every algorithm's traffic left each machine through its shaped link
    one_rank = sum(min(sent_per_rank(run0, algo)) for algo in ("ddp", "diloco"))
    assert min(sent) >= one_rank, (sent, one_rank)
    for node, address in enumerate(spec.addresses):
        listeners = {pid for pids in seen[node].values() for pid in pids}  # node 0: its driver (stores) + 2 workers
        assert len(listeners) >= (3 if node == 0 else 2), seen[node]
        outside = [a for a in seen[node] if not a.startswith(f"{address}:")]
        assert not outside, f"machine {node} listened beyond {address}: {outside}"
