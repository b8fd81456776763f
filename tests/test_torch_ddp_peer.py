"""The torch peers (``lowband.bench.peers.torch_ddp``): PyTorch's DDP, fp16/PowerSGD hooks and
post-local SGD on lowband's task, over the emulated link, in lowband's run-folder format.

Real runs: 2 gloo workers, a few steps of a small batch; each checks the ledger's bytes against
the collective's formula and that ``lowband report``'s loader lists the peer.
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lowband.bench.peers import PEERS, TORCH_LABELS, TORCHFT_LABELS
from lowband.bench.peers.common import EmulatedGroup, EmulatedLink, PeerError
from lowband.bench.peers.torch_ddp import TorchPeerOptions, run_torch
from lowband.net.link import Link
from lowband.report.summary import load_run, summarize
from lowband.train.checkpoint import load_checkpoint, rank_file
from lowband.train.config import TrainConfig
from lowband.train.data import load_dataset
from lowband.train.launch import launch
from lowband.train.loop import build_model
from lowband.train.worker import main as worker_main

FAST = dict(workers=2, steps=4, eval_every=2, eval_batches=1, batch_size=4, bandwidth="1gbit", latency="1ms",
            progress=False, name="run")


def _cfg(tmp_path: Path, **over: object) -> TrainConfig:
    return TrainConfig(**{**FAST, "out": str(tmp_path), **over})


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _shapes(cfg: TrainConfig) -> list[torch.Size]:
    return [p.shape for p in build_model(cfg, load_dataset(cfg.data)).parameters()]


def _numel(cfg: TrainConfig) -> int:
    return sum(s.numel() for s in _shapes(cfg))


def _sent_by(ledger: list[dict], tag: str) -> dict[int, int]:
    """Bytes sent per step under ``tag``."""
    out: dict[int, int] = {}
    for r in ledger:
        if r["tag"] == tag:
            out[r.get("step", 0)] = out.get(r.get("step", 0), 0) + r["sent"]
    return out


def _check_report(run: Path, label: str, steps: int) -> None:
    row = summarize(load_run(run)).row(label)
    assert row.ranks == 2 and row.steps == steps and row.final_val_loss is not None
    sent = [sum(r["sent"] for r in _rows(run / label / f"ledger_rank{rank}.jsonl")) for rank in (0, 1)]
    assert row.bytes_sent_per_worker == sum(sent) / 2


# ----------------------------------------------------------------------------- real runs


def test_torch_ddp_trains_exactly_as_lowband_ddp(tmp_path: Path) -> None:
    """Same gradients summed by the same gloo, halved exactly (DDP divides first, lowband after; both
    by 2, a power of two): bit-identical losses and parameters, the same init and gradient bytes."""
    cfg = _cfg(tmp_path, algos=("ddp",))
    launch(worker_main, 2, TrainConfig(**{**cfg.to_dict(), "checkpoint_every": cfg.steps}))
    run = tmp_path / "run"
    finals = run_torch(cfg, run, TorchPeerOptions("torch-ddp"), keep_params=True)
    for rank in (0, 1):
        ours = _rows(run / "ddp" / f"rank{rank}.jsonl")
        theirs = _rows(run / "torch-ddp" / f"rank{rank}.jsonl")
        assert [r["loss"] for r in theirs] == [r["loss"] for r in ours]
        assert [r.get("val_loss") for r in theirs] == [r.get("val_loss") for r in ours]
        saved = load_checkpoint(rank_file(run / "ddp", cfg.steps, rank))["model"]
        params = finals[rank]["params"]
        assert set(params) == set(saved)
        assert all(torch.equal(torch.from_numpy(params[k]), saved[k]) for k in saved)
        ours_ledger = _rows(run / "ddp" / f"ledger_rank{rank}.jsonl")
        theirs_ledger = _rows(run / "torch-ddp" / f"ledger_rank{rank}.jsonl")
        for tag in ("init", "grads"):
            assert _sent_by(theirs_ledger, tag) == _sent_by(ours_ledger, tag)
        assert {r["tag"] for r in theirs_ledger} == {"init", "grads", "control"}
        control = sum(r["sent"] for r in theirs_ledger if r["tag"] == "control")
        assert control < 2000  # DDP's parameter-shape check and bucket-rebuild indices (rank 0 sends them)
        assert all(r["end"] - r["start"] >= r["modelled"] for r in theirs_ledger)  # the link was emulated
    assert _sent_by(theirs_ledger, "grads") == {s: _numel(cfg) * 4 for s in range(1, cfg.steps + 1)}
    assert list(json.loads((run / "run.json").read_text())["algorithms"]) == ["ddp", "torch-ddp"]
    _check_report(run, "torch-ddp", cfg.steps)


def test_fp16_hook_sends_half_of_ddp(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    run_torch(cfg, run, TorchPeerOptions("torch-fp16"))
    for rank in (0, 1):
        ledger = _rows(run / "torch-fp16" / f"ledger_rank{rank}.jsonl")
        assert _sent_by(ledger, "grads") == {s: _numel(cfg) * 2 for s in range(1, cfg.steps + 1)}
        assert _sent_by(ledger, "init") == ({0: _numel(cfg) * 4} if rank == 0 else {0: 0})
    assert [r["step"] for r in _rows(run / "torch-fp16" / "rank1.jsonl")] == [1, 2, 3, 4]
    _check_report(run, "torch-fp16", cfg.steps)


def test_powersgd_hook_sends_low_rank_factors_in_one_bucket(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    run_torch(cfg, run, TorchPeerOptions("torch-powersgd", rank=2, start_iter=2))
    info = json.loads((run / "run.json").read_text())["algorithms"]["torch-powersgd"]
    assert (info["rank"], info["start_iter"]) == (2, 2) and info["bucket_cap_mb"] * 2**20 > _numel(cfg) * 4
    raw, low_rank = 0, 0  # torch's rule: compress an (n, m) matrix iff (n + m) r * 2 < n m
    for shape in _shapes(cfg):
        n, m = shape[0], shape.numel() // shape[0]
        r = min(n, m, 2)
        if (n + m) * r * 2 < n * m:
            low_rank += (n + m) * r
        else:
            raw += shape.numel()
    for rank in (0, 1):
        ledger = _rows(run / "torch-powersgd" / f"ledger_rank{rank}.jsonl")
        grads = [r for r in ledger if r["tag"] == "grads"]
        assert [r["step"] for r in grads] == [1, 2, 3, 3, 3, 4, 4, 4]  # one bucket: 1 all-reduce, then 3
        assert _sent_by(ledger, "grads") == {1: _numel(cfg) * 4, 2: _numel(cfg) * 4,
                                             3: (raw + low_rank) * 4, 4: (raw + low_rank) * 4}
    assert low_rank * 10 < _numel(cfg)  # the factors are small
    _check_report(run, "torch-powersgd", cfg.steps)


def test_postlocal_averages_parameters_every_period_after_warmup(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, steps=6, eval_every=3)
    run = tmp_path / "run"
    run_torch(cfg, run, TorchPeerOptions("torch-postlocal", start_iter=2, period=2))
    for rank in (0, 1):
        ledger = _rows(run / "torch-postlocal" / f"ledger_rank{rank}.jsonl")
        assert _sent_by(ledger, "grads") == {1: _numel(cfg) * 4, 2: _numel(cfg) * 4}  # DDP during warm-up
        # PeriodicModelAverager: its step counter (0-based) >= warmup and (step - warmup) % period == 0
        assert _sent_by(ledger, "outer") == {3: _numel(cfg) * 4, 5: _numel(cfg) * 4}
    rows = _rows(run / "torch-postlocal" / "rank0.jsonl")
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    _check_report(run, "torch-postlocal", cfg.steps)


# ----------------------------------------------------------------------------- single process


def test_powersgd_with_several_buckets_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match=r"one DDP bucket.*--bucket-cap-mb > 3\.13"):
        TorchPeerOptions("torch-powersgd", bucket_cap_mb=1.0).resolved(cfg, _numel(cfg) * 4)
    assert TorchPeerOptions("torch-powersgd").resolved(cfg, _numel(cfg) * 4).bucket_cap_mb == 5.0
    assert TorchPeerOptions("torch-ddp").resolved(cfg, _numel(cfg) * 4).bucket_cap_mb is None


def test_options_name_the_fix() -> None:
    with pytest.raises(ValueError, match="choose one of: torch-ddp"):
        TorchPeerOptions("torch-adam")
    with pytest.raises(ValueError, match="--rank is an option of torch-powersgd, not torch-fp16"):
        TorchPeerOptions("torch-fp16", rank=2)
    with pytest.raises(ValueError, match="--period is an option of torch-postlocal"):
        TorchPeerOptions("torch-powersgd", period=4)
    with pytest.raises(ValueError, match="start_powerSGD_iter > 1"):
        TorchPeerOptions("torch-powersgd", start_iter=1)
    cfg = TrainConfig(inner_steps=7, warmup_steps=5)
    resolved = TorchPeerOptions("torch-postlocal").resolved(cfg, 1)
    assert (resolved.start_iter, resolved.period) == (5, 7)


def test_registry_lists_every_peer_and_torchft_names_its_install(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(PEERS) == set(TORCH_LABELS) | set(TORCHFT_LABELS)

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(PeerError, match="torchft is not installed; install it with: pip install --no-deps"):
        PEERS.get("torchft-diloco")(_cfg(tmp_path), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_link_completes_off_its_thread_so_callbacks_can_wait_for_the_next_transfer() -> None:
    """powerSGD_hook waits, inside a future's callback, for the all-reduce it just issued."""
    link = EmulatedLink(Link(bandwidth=1e6, latency=0.001), emulate=True, inline_completion=False)

    class Done:
        def wait(self) -> bool:
            return True

    first = link.submit(Done(), [torch.ones(10)], 2)
    chained = first.then(lambda fut: link.submit(Done(), [torch.ones(20)], 2).wait()[0].sum().item())
    started = time.perf_counter()
    assert chained.wait() == 20.0 and time.perf_counter() - started < 10
    link.close()
    assert [r.payload for r in link.ledger.records] == [40, 80]
    assert threading.current_thread() is threading.main_thread()


def test_backend_charges_nothing_alone_and_refuses_what_it_does_not_model() -> None:
    link = EmulatedLink(Link(bandwidth=1e6, latency=0.01), emulate=True, inline_completion=False)
    group = EmulatedGroup(dist.HashStore(), 0, 1, timedelta(seconds=10), link)
    tensor = torch.ones(4)
    group.allreduce([tensor], dist.AllreduceOptions()).wait()  # a group of one: nothing crosses a wire
    assert torch.equal(tensor, torch.ones(4)) and len(link.ledger) == 0
    with pytest.raises(RuntimeError):  # no cost model for it: it must not run uncounted
        group.alltoall_base(torch.empty(4), torch.ones(4), [], [], dist.AllToAllOptions())
    link.close()
