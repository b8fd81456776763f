"""On a real GPU: every compressor, the aggregation pipeline, NCCL and gloo with CUDA tensors.

Skipped on machines without CUDA (this repository's CI has none); a GPU machine runs it with
``python -m pytest -q tests/test_cuda.py`` (then ``python benchmarks/gpu_smoke.py``), see docs/gpu.md.
The CPU-only counterpart, over the same registries, is tests/test_device_contract.py.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record as record_errors

import lowband
from lowband.comm.aggregate import Aggregator
from lowband.comm.comm import Comm
from lowband.compress import COMPRESSORS, build
from lowband.feedback import FEEDBACK
from lowband.net.link import Network

# LOWBAND_TEST_DEVICE=cpu runs the same file on the CPU (gloo for NCCL): a dry run of the tests themselves
DEVICE = os.environ.get("LOWBAND_TEST_DEVICE", "cuda")
BACKEND = "nccl" if DEVICE == "cuda" else "gloo"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device: run tests/test_cuda.py on a GPU machine (docs/gpu.md)")


def _on(t: torch.Tensor) -> bool:
    return t.device.type == DEVICE

VARIANTS = ["topk:ratio=0.5", "randomk:unbiased=false", "sketch:kind=gaussian", "qsgd:bits=8", "int8:chunk=100"]
# their noise is drawn on the device: a valid stream, not the CPU's
DEVICE_RANDOM = {"qsgd", "terngrad", "sketch", "dgc"}


def _inputs(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cpu = {"w": torch.randn(256, 128, generator=g), "b": torch.randn(128, generator=g) * 1e-3,
           "v": torch.randn(50_000, generator=g)}
    return {k: v.to(device) for k, v in cpu.items()}


def _exchange(compressor: Any, x: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    ex = compressor.exchange(x, key, 1)
    payload = next(ex)
    assert all(t.device == x.device for t in payload.tensors), "a payload tensor left the input's device"
    try:
        while True:
            payload = ex.send(payload if compressor.summable else [payload])
    except StopIteration as done:
        return done.value


@pytest.mark.parametrize("spec", COMPRESSORS.names() + VARIANTS)
def test_compressor_on_cuda(spec: str) -> None:
    on_gpu, on_cpu = build(spec, COMPRESSORS), build(spec, COMPRESSORS)
    for key, x in _inputs(DEVICE).items():
        mean, own = _exchange(on_gpu, x, key)
        assert _on(mean) and _on(own) and mean.shape == x.shape and torch.isfinite(mean).all()
        if spec.split(":")[0] not in DEVICE_RANDOM:
            want, _ = _exchange(on_cpu, x.cpu(), key)
            torch.testing.assert_close(mean.cpu(), want, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("feedback", FEEDBACK.names())
def test_feedback_on_cuda(feedback: str) -> None:
    agg = Aggregator(Comm(), build("topk:ratio=0.05", COMPRESSORS), build(feedback, FEEDBACK), small_numel=1000)
    tensors = _inputs(DEVICE)
    for _ in range(3):
        agg.mean_(list(tensors.items()))
    for slots in agg.feedback.state.values():
        assert all(_on(t) for t in slots.values())
    agg.close()


def _group_of_one(backend: str) -> None:
    store = dist.FileStore(tempfile.mktemp(prefix="lowband-cuda-"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def test_nccl_group_of_one_through_comm() -> None:
    """A real NCCL group (world size 1) under Comm with an emulated link: the collectives run, take
    CUDA tensors (metadata included), and the ledger charges at least the modelled time."""
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    _group_of_one(BACKEND)
    try:
        comm = Comm(network=Network.parse("100mbit", "5ms", 1))
        assert comm.device.type == DEVICE
        comm._pool = ThreadPoolExecutor(1)  # a world of one normally skips the wire: force it
        x = torch.randn(1_000_000, device=DEVICE)
        comm.all_reduce(x, tag="probe")
        gathered = comm.all_gather(torch.arange(7, device=DEVICE), tag="probe")
        assert _on(gathered[0]) and gathered[0].tolist() == list(range(7))
        record = comm.ledger.records[0]
        assert record.end - record.start >= 0.9 * record.modelled
        for spec in ("topk:ratio=0.01", "qsgd", "threshold:tau=0.5"):
            agg = Aggregator(comm, build(spec, COMPRESSORS), build("ef", FEEDBACK), checksum=True)
            agg.mean_(list(_inputs(DEVICE).items()))
            agg.close()
        comm.close()
    finally:
        dist.destroy_process_group()


@record_errors
def _two_rank_gloo_cuda() -> dict[str, Any]:
    from lowband.comm.group import init_from_env, shutdown

    rank, _ = init_from_env("gloo", timeout_s=60)
    try:
        comm = Comm()
        out: dict[str, Any] = {}
        for spec in ("identity", "topk:ratio=0.05", "qsgd", "threshold:tau=0.5", "powersgd:rank=2"):
            agg = Aggregator(comm, build(spec, COMPRESSORS), build("ef", FEEDBACK), checksum=not
                             build(spec, COMPRESSORS).summable)
            tensors = {k: v * (rank + 1) for k, v in _inputs(DEVICE).items()}
            agg.mean_(list(tensors.items()))
            agg.close()
            out[spec] = [float(t.double().sum()) for t in tensors.values()]
            assert all(_on(t) for t in tensors.values())
        return out
    finally:
        shutdown()


def test_two_rank_gloo_with_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks on one GPU over gloo (NCCL needs one GPU per rank): the all-gather path with its
    sizes, trailer and CRC on CUDA tensors, and the same mean on both ranks."""
    from lowband.train.launch import launch

    paths = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(lowband.__file__)),
             os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))  # the workers import this file
    results = launch(_two_rank_gloo_cuda, 2)
    assert results[0] == results[1]
