"""torchft's DiLoCo and Streaming DiLoCo on lowband's task, over lowband's emulated link.

torchft (github.com/pytorch/torchft, version 0.2.0) is the fault-tolerance library whose
``torchft.local_sgd.DiLoCo`` implements DiLoCo (arXiv:2311.08105) and, given several model
fragments, Streaming DiLoCo (arXiv:2501.18512). This runner:

1. starts torchft's lighthouse (``torchft_lighthouse --bind 127.0.0.1:PORT``) as a
   subprocess, always terminated at the end;
2. starts ``cfg.workers`` processes through lowband's :func:`~lowband.train.launch.launch`
   (:func:`lowband.bench.peers.torchft_replica.replica_main`); each is its own replica group of size 1 (its own TCPStore on 127.0.0.1, replica id
   ``lowband_<r>``) with a ``Manager(pg=<emulated gloo>, use_async_quorum=False,
   init_sync=False)`` -- every replica builds the same initial model from the seed, so no
   checkpoint is ever sent; the HTTP checkpoint server is replaced by one that refuses
   (recovery would move bytes past the emulated link, so it fails the run with one line);
3. trains exactly what ``lowband train`` trains (``build_model``, AdamW, ``lr_lambda``, the
   per-rank batch generator, gradient clipping, the same validation batches), with torchft's
   ``DiLoCo`` hooked onto the inner optimizer: H = ``--inner-steps``, outer SGD with
   Nesterov momentum (``--outer-lr``/``--outer-momentum``), and for streaming ``fragments``
   contiguous parameter fragments (cut as lowband's ``streaming-diloco`` cuts them),
   ``fragment_sync_delay=tau`` and ``fragment_update_alpha=alpha``;
4. every allreduce torchft issues goes through :class:`EmulatedLink`: the real gloo
   collective, then a sleep until its end + the ring all-reduce time of the alpha-beta model
   (one transfer at a time, as :class:`lowband.comm.Comm` does), and a ledger record with the
   ring's bytes (:func:`lowband.net.cost.ring_all_reduce`);
5. writes ``<run>/<label>/rank<r>.jsonl`` (lowband's per-step rows) and
   ``ledger_rank<r>.jsonl``, and adds ``label`` to ``run.json``.

``comm_s`` is the time the training thread is blocked in torchft's communication: waiting
for allreduces, and its control plane (``start_quorum``: the lighthouse round trip, which
also waits for the slower replica, and ``should_commit``), which runs on real loopback.

Example::

    python -m lowband.bench.peers.torchft_diloco --streaming --workers 2 --steps 60 \\
        --out runs --name t --no-progress
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

from lowband.bench.peers.common import SAME_TASK, EmulatedLink, PeerError, register_peer
from lowband.bench.peers.torchft_replica import PeerOptions, diloco_options, replica_main
from lowband.train.config import TrainConfig
from lowband.train.data import load_dataset
from lowband.train.flags import config_from_args
from lowband.train.launch import WorkerFailed, launch
from lowband.train.loop import build_model

TORCHFT_VERSION = "0.2.0"
INSTALL = (f"pip install --no-deps torchft=={TORCHFT_VERSION} && "
           "pip install opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-http")
__all__ = ["SAME_TASK", "EmulatedLink", "PeerError", "PeerOptions", "register", "run_torchft"]


# ----------------------------------------------------------------------------- the runner


def check_torchft(options: PeerOptions) -> None:
    """Raise :class:`PeerError` (one line) unless torchft 0.2.0 can run these options here."""
    try:
        version = importlib.metadata.version("torchft")
    except importlib.metadata.PackageNotFoundError:
        raise PeerError(f"torchft is not installed; install it with: {INSTALL}") from None
    if version != TORCHFT_VERSION:
        raise PeerError(f"torchft {version} is installed, this runner is written against {TORCHFT_VERSION}: {INSTALL}")
    try:
        import torchft.manager
    except ImportError as err:
        raise PeerError(f"torchft does not import ({err}); install its runtime dependencies: {INSTALL}") from None
    if options.quantize and not torchft.manager.IS_TRITON_AVAILABLE:
        raise PeerError("torchft 0.2.0 quantizes allreduces only with triton (GPU kernels); without it "
                        "should_quantize is silently ignored, so --quantize is refused here")


def check_options(cfg: TrainConfig, options: PeerOptions) -> None:
    """torchft's own constraints, checked before any process starts (same rules, clearer words)."""
    h, p = diloco_options(cfg).inner_steps, options.fragments
    if not options.streaming and (p, options.tau, options.alpha) != (1, 0, 0.0):
        raise ValueError("--fragments, --tau and --alpha are Streaming DiLoCo's: add --streaming")
    if p < 1 or h % p:
        raise ValueError(f"torchft needs fragments ({p}) to divide H = --inner-steps ({h})")
    if not 0 <= options.tau < h // p:
        raise ValueError(f"torchft needs 0 <= tau < H / fragments = {h // p}, got tau={options.tau}")
    if not 0.0 <= options.alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {options.alpha}")
    if p > 1:  # cut as lowband's streaming-diloco cuts: same fragments for both
        from lowband.algorithms.streaming_diloco import contiguous_fragments

        model = build_model(cfg, load_dataset(cfg.data))
        contiguous_fragments([q.numel() for q in model.parameters() if q.requires_grad], p)  # raises if too many


def register(run_dir: Path, cfg: TrainConfig, options: PeerOptions) -> None:
    """Add ``options.label`` to ``run_dir/run.json`` (creating it as ``lowband train`` would)."""
    o = diloco_options(cfg)
    register_peer(run_dir, cfg, options.label, {
        "peer": f"torchft {TORCHFT_VERSION}", "inner_steps": o.inner_steps, "outer_optimizer": o.outer_optimizer,
        "outer_lr": o.outer_lr, "outer_momentum": o.outer_momentum, "nesterov": o.nesterov,
        "bucket_mb": cfg.bucket_mb, **asdict(options)})


def run_torchft(cfg: TrainConfig, run_dir: Path, streaming: bool, fragments: int | None = None,
                tau: int | None = None, alpha: float | None = None, bucketize: bool = True,
                quantize: bool = False) -> None:
    """Train ``cfg.workers`` torchft replicas into ``run_dir/<label>`` (label: ``torchft-diloco`` or
    ``torchft-streaming``) and list them in ``run_dir/run.json``. Raises :class:`PeerError` or
    ``ValueError`` (one line) before starting anything, :class:`WorkerFailed` if a replica fails."""
    options = PeerOptions.for_mode(streaming, fragments, tau, alpha, bucketize, quantize)
    check_torchft(options)
    check_options(cfg, options)
    register(run_dir, cfg, options)
    (run_dir / options.label).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs every quorum at INFO otherwise
    with lighthouse(cfg.workers, run_dir / options.label / "lighthouse.log") as address:
        launch(replica_main, cfg.workers, cfg, options, str(run_dir), address)


@contextlib.contextmanager
def lighthouse(min_replicas: int, log: Path, timeout_s: float = 30.0) -> Iterator[str]:
    """torchft's lighthouse on 127.0.0.1 (a free port), yielding its address; always terminated."""
    exe = Path(sys.executable).with_name("torchft_lighthouse")
    exe_path = str(exe) if exe.exists() else shutil.which("torchft_lighthouse")
    if exe_path is None:
        raise PeerError(f"torchft_lighthouse is not on PATH (it comes with torchft): {INSTALL}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("w") as out:
        proc = subprocess.Popen([exe_path, "--bind", f"127.0.0.1:{port}", "--min_replicas", str(min_replicas)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise PeerError(f"torchft_lighthouse exited with code {proc.returncode}; see {log}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise PeerError(f"torchft_lighthouse did not listen on 127.0.0.1:{port} within {timeout_s:g} s")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lowband.bench.peers.torchft_diloco [--streaming ...] [lowband train flags]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lowband.bench.peers.torchft_diloco", add_help=False,
        description="Run torchft's DiLoCo (or Streaming DiLoCo) on lowband's task into a lowband run folder; "
                    "every other flag is a `lowband train` flag.")
    parser.add_argument("--streaming", action="store_true", help="Streaming DiLoCo (label torchft-streaming)")
    parser.add_argument("--fragments", type=int, default=None, help="streaming fragments P (default 4; 1 without --streaming)")
    parser.add_argument("--tau", type=int, default=None, help="fragment_sync_delay (default 1 streaming, else 0)")
    parser.add_argument("--alpha", type=float, default=None, help="fragment_update_alpha (default 0.5 streaming, else 0)")
    parser.add_argument("--no-bucketize", dest="bucketize", action="store_false",
                        help="torchft's default: one allreduce per parameter tensor")
    parser.add_argument("--quantize", action="store_true", help="should_quantize (needs triton; refused on CPU)")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not print the report")
    ns, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nlowband train flags:")
    cfg = config_from_args(rest, prog="python -m lowband.bench.peers.torchft_diloco")
    run_dir = Path(cfg.out) / (cfg.name or time.strftime("%Y%m%d-%H%M%S"))
    try:
        run_torchft(cfg, run_dir, ns.streaming, ns.fragments, ns.tau, ns.alpha, ns.bucketize, ns.quantize)
    except (PeerError, ValueError, WorkerFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if ns.report:
        from lowband.report.render import show_report

        show_report(run_dir, cfg.target_loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
