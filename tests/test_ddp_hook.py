"""lowband's compressors as torch DDP comm hooks, on gloo with several buckets: overlapped and blocking."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

import lowband
from lowband.comm.ddp_hook import HookState
from lowband.comm.group import init_from_env, shutdown
from lowband.train.launch import launch


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def grads_after_backward(ddp: nn.Module, rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(8, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    nn.functional.cross_entropy(ddp(x), y).backward()
    out = [p.grad.clone() for p in ddp.parameters()]
    ddp.zero_grad()
    return out


@record
def compare_hooks(specs: list[str]) -> dict[str, float]:
    """Max |grad difference| between DDP with lowband's hook and plain DDP, over 3 steps."""
    rank, _ = init_from_env()
    try:
        plain = DistributedDataParallel(model(), bucket_cap_mb=0.005)  # several buckets
        reference = [grads_after_backward(plain, rank) for _ in range(3)]
        out = {}
        for spec in specs:
            compressor, _, feedback = spec.partition("+")
            m = model()
            ddp = DistributedDataParallel(m, bucket_cap_mb=0.005)
            state, hook = lowband.ddp_hook(m, compress=compressor, feedback=feedback or "none")
            ddp.register_comm_hook(state, hook)
            worst = 0.0
            for step in range(3):
                grads = grads_after_backward(ddp, rank)
                for got, want in zip(grads, reference[step]):
                    worst = max(worst, float((got - want).abs().max()))
            out[spec] = worst
            out[spec + " checksum"] = float(sum(g.double().sum() for g in grads))
            out[spec + " keys"] = sorted(state.aggregator.feedback.state)
            out[spec + " buckets per step"] = state.calls / 3
        return out
    finally:
        shutdown()


def test_lowband_hooks_match_plain_ddp_with_several_gloo_buckets() -> None:
    results = launch(compare_hooks, 2, ["identity", "fp16+ef", "bf16", "powersgd:rank=2+ef"])
    # PowerSGD (torch's own hook aborts on gloo with several buckets): lossy, identical on every rank
    assert results[0]["powersgd:rank=2+ef"] > 1e-4
    assert results[0]["powersgd:rank=2+ef checksum"] == results[1]["powersgd:rank=2+ef checksum"]
    for rank, out in results.items():
        assert out["identity"] < 1e-6, rank
        assert out["fp16+ef"] < 1e-3, rank
        assert out["bf16"] < 2e-2, rank
        assert out["identity buckets per step"] > 1  # several DDP buckets (after the rebuild), no abort on gloo
        # feedback state is keyed by parameter name; tensors under 4096 elements share one key
        assert out["fp16+ef keys"][0] == "2.weight" and len(out["fp16+ef keys"]) >= 2
        assert all(k.startswith("small.float32[") for k in out["fp16+ef keys"][1:])  # one key per DDP bucket


# -- overlap: the hook returns a real future, completed on the aggregator's thread -------------------
OVERLAP_SPECS = ["identity", "topk:ratio=0.1+ef", "powersgd:rank=2+ef", "fp16+ef"]


def train_with_hook(spec: str, overlap: bool, rank: int, steps: int = 4) -> dict[str, object]:
    """Final parameters after ``steps`` SGD steps with lowband's hook, and what the futures held."""
    from lowband.net.link import Network

    compressor, _, feedback = spec.partition("+")
    m = model()
    ddp = DistributedDataParallel(m, bucket_cap_mb=0.001)  # one bucket in step 1, then 3 (DDP rebuilds them)
    network = Network.parse("1gbit", "2ms", 2)  # futures cannot be done when the hook returns
    state, hook = lowband.ddp_hook(m, compress=compressor, feedback=feedback or "none", network=network,
                                   overlap=overlap)
    seen: list[tuple[torch.Tensor, torch.futures.Future, bool]] = []

    def spy(hook_state: HookState, bucket: torch.distributed.GradBucket) -> torch.futures.Future:
        future = hook(hook_state, bucket)
        seen.append((bucket.buffer(), future, future.done()))
        return future

    spy.__annotations__ = dict(hook.__annotations__)  # DDP checks them; this file's are strings
    ddp.register_comm_hook(state, spy)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x, y = torch.randn(8, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    out = {"params": [p.detach().clone() for p in m.parameters()],
           "value is buffer": all(f.value() is buf for buf, f, _ in seen),
           "done at return": sum(done for _, _, done in seen), "futures": len(seen),
           "bytes": state.aggregator.comm.ledger.bytes_sent, "wait_s": state.wait_seconds}
    state.close()
    return out


@record
def compare_overlap(specs: list[str]) -> dict[str, object]:
    rank, _ = init_from_env(timeout_s=60)
    try:
        out: dict[str, object] = {}
        start = [p.detach().clone() for p in model().parameters()]
        for spec in specs:
            blocking, overlapped = train_with_hook(spec, False, rank), train_with_hook(spec, True, rank)
            out[spec] = all(torch.equal(a, b) for a, b in zip(blocking["params"], overlapped["params"]))
            out[spec + " trained"] = not all(torch.equal(a, b) for a, b in zip(start, overlapped["params"]))
            out[spec + " checksum"] = float(sum(p.double().sum() for p in overlapped["params"]))
            for mode, result in (("blocking", blocking), ("overlap", overlapped)):
                for key in ("value is buffer", "done at return", "futures", "bytes", "wait_s"):
                    out[f"{spec} {mode} {key}"] = result[key]
        return out
    finally:
        shutdown()


def test_overlapped_hook_is_bit_identical_to_the_blocking_hook() -> None:
    results = launch(compare_overlap, 2, OVERLAP_SPECS)
    for rank, out in results.items():
        for spec in OVERLAP_SPECS:
            assert out[spec] is True, (rank, spec)  # torch.equal on every final parameter
            assert out[spec + " trained"], (rank, spec)
            assert out[spec + " checksum"] == results[0][spec + " checksum"], (rank, spec)  # ranks agree
            assert out[f"{spec} blocking value is buffer"] and out[f"{spec} overlap value is buffer"], (rank, spec)
            futures = out[f"{spec} overlap futures"]
            assert futures == out[f"{spec} blocking futures"] >= 1 + 3 * 3, (rank, spec)  # several buckets per step
            assert out[f"{spec} blocking done at return"] == futures, (rank, spec)
            assert out[f"{spec} overlap done at return"] == 0, (rank, spec)  # a real future, completed later
            assert out[f"{spec} overlap bytes"] == out[f"{spec} blocking bytes"] > 0, (rank, spec)
            assert 0 <= out[f"{spec} overlap wait_s"] and out[f"{spec} blocking wait_s"] > 0, (rank, spec)


@record
def nan_backward(overlap: bool) -> str:
    """The error ``backward()`` raises when every rank's gradients are NaN (bounded: no hang)."""
    import faulthandler

    faulthandler.dump_traceback_later(90, exit=True)  # a hang fails the launch instead of the suite
    rank, _ = init_from_env(timeout_s=60)
    try:
        m = model()
        ddp = DistributedDataParallel(m, bucket_cap_mb=0.005)
        state, hook = lowband.ddp_hook(m, compress="identity", overlap=overlap)
        ddp.register_comm_hook(state, hook)
        x, y = torch.randn(8, 32), torch.randint(0, 10, (8,))
        try:
            (nn.functional.cross_entropy(ddp(x), y) * float("nan")).backward()
            raised = "nothing"
        except Exception as err:  # noqa: BLE001  (the test reads its type)
            raised = type(err).__name__
        state.close()
        return raised
    finally:
        faulthandler.cancel_dump_traceback_later()
        shutdown()


def test_an_error_in_the_aggregation_surfaces_from_backward() -> None:
    for overlap in (True, False):
        results = launch(nan_backward, 2, overlap)
        assert results == {0: "NonFiniteError", 1: "NonFiniteError"}, overlap


@pytest.mark.slow
def test_ddp_overlap_benchmark_quick(tmp_path: Path) -> None:
    """The smoke run of benchmarks/ddp_overlap.py (a script: its workers are spawned from it)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "ddp_overlap.py"
    out = tmp_path / "d.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["local", "torch-ddp", "torch-fp16", "lowband-identity blocking", "lowband-identity overlap",
                          "lowband-fp16 blocking", "lowband-fp16 overlap"]
    assert rows["local"]["mb_sent_per_step"] == 0 and rows["lowband-identity overlap"]["buckets_per_step"] > 1
    assert rows["torch-ddp"]["mb_sent_per_step"] == rows["lowband-identity overlap"]["mb_sent_per_step"] > 0
    assert rows["torch-fp16"]["mb_sent_per_step"] == rows["lowband-fp16 overlap"]["mb_sent_per_step"]
    assert "| lowband-fp16 overlap |" in proc.stdout


def test_pending_mean_calls_back_with_none_or_the_error() -> None:
    """PendingMean.add_done_callback, the bridge the overlapped hook completes its future through."""
    from lowband.comm.aggregate import Aggregator
    from lowband.comm.comm import Comm
    from lowband.compress import COMPRESSORS, build
    from lowband.feedback import FEEDBACK

    agg = Aggregator(Comm(), build("identity", COMPRESSORS), build("none", FEEDBACK))
    seen: list[BaseException | None] = []
    pending = agg.mean_async([("w", torch.ones(3))])
    pending.wait()
    pending.add_done_callback(seen.append)  # already done: called at once, on this thread

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("boom")

    agg._mean = broken  # type: ignore[method-assign]
    failing = agg.mean_async([("w", torch.ones(3))])
    with pytest.raises(ValueError, match="boom"):
        failing.wait()
    failing.add_done_callback(seen.append)
    agg.close()
    assert seen[0] is None and isinstance(seen[1], ValueError) and str(seen[1]) == "boom"
