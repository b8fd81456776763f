"""Device contract of every compressor, feedback and the aggregation pipeline (no GPU needed).

On the stand-in accelerator of ``tests/fakecuda.py`` (real values, a separate device, an error
whenever an op mixes device and CPU tensors), for every entry of COMPRESSORS and FEEDBACK (a new
one is covered without editing this file):

* encode/exchange/decode keep every payload tensor and result on the device, and compute the same
  values as on the CPU;
* the whole :class:`~lowband.comm.aggregate.Aggregator` pipeline (guards, trailer, CRC-32, size
  exchange, robust rule, attack) hands the communicator only device tensors, as NCCL requires;
* host syncs happen only where a host decision is unavoidable (:data:`SYNCS_ALLOWED`, printed with -s).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

import fakecuda
from lowband.adversity.attacks import ATTACKS
from lowband.adversity.poison import DataAttack
from lowband.comm.aggregate import Aggregator
from lowband.comm.comm import Comm
from lowband.comm.robust import RULES
from lowband.compress import COMPRESSORS, build, kernels
from lowband.feedback import FEEDBACK

# a few non-default options whose code paths differ (bitmap indices, dense sketches, 8-bit QSGD)
VARIANTS = ["topk:ratio=0.5", "randomk:unbiased=false", "sketch:kind=gaussian", "sketch:kind=sign",
            "qsgd:bits=8", "qsgd:bucket=0", "int8:chunk=100", "powersgd:rank=1"]
SPECS = COMPRESSORS.names() + VARIANTS

# source file -> why the host must wait for the device there (each is one decision per call)
SYNCS_ALLOWED = {
    "comm/guards.py": "whether to send (non-finite input), which senders are valid, CRC-32 on the host",
    "comm/aggregate.py": "which ranks are excluded (non-finite contributions)",
    "comm/wire.py": "which ranks are excluded (checksums agreed); receive sizes of variable-size payloads",
    "compress/indices.py": "a bitmap's count of set bits (nonzero)",
    "compress/select.py": "the positions of a mask (nonzero)",
    "compress/sparse.py": "threshold: how many elements pass (the payload's size)",
    "compress/dgc.py": "how many elements pass the sampled threshold (nonzero)",
}


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 48, generator=g), "b": torch.randn(48, generator=g) * 1e-3,
            "v": torch.randn(5000, generator=g)}


def _check_syncs(mode: fakecuda.FakeAccelerator) -> None:
    print(f"host syncs: {dict(mode.syncs)}; device<->host copies: {dict(mode.transfers)}")
    outside = {where: n for where, n in mode.syncs.items() if where.split(":")[0] not in SYNCS_ALLOWED}
    assert not outside, f"host syncs outside the allowlist (remove them or allow them with a reason): {outside}"


def _exchange(compressor: Any, x: torch.Tensor, key: str) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One tensor through every round at world size 1; (payload tensors of round 1, mean, own)."""
    ex = compressor.exchange(x, key, 1)
    payload = next(ex)
    first = list(payload.tensors)
    try:
        while True:
            payload = ex.send(payload if compressor.summable else [payload])
    except StopIteration as done:
        mean, own = done.value
    return first, mean, own


def _no_cpu_loops() -> None:
    raise AssertionError("a device path asked for the compiled CPU loops (lowband.compress.kernels)")


@pytest.mark.parametrize("spec", SPECS)
def test_compressor_stays_on_device(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _inputs()
    on_cpu, on_device = build(spec, COMPRESSORS), build(spec, COMPRESSORS)
    expected = {(step, k): _exchange(on_cpu, x, k) for step in range(2) for k, x in inputs.items()}
    with fakecuda.fake_accelerator(monkeypatch) as mode:
        monkeypatch.setattr(kernels, "loaded", _no_cpu_loops)
        for step in range(2):
            for key, x in inputs.items():
                payload, mean, own = _exchange(on_device, fakecuda.to_device(x), key)
                for t in [*payload, mean, own]:
                    assert isinstance(t, fakecuda.DeviceTensor), f"{spec}: a result or payload left the device"
                want_payload, want_mean, want_own = expected[step, key]
                torch.testing.assert_close(fakecuda.to_cpu(mean), want_mean, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(fakecuda.to_cpu(own), want_own, rtol=1e-5, atol=1e-6)
                assert [tuple(t.shape) for t in payload] == [tuple(t.shape) for t in want_payload]
    _check_syncs(mode)


class TwinComm(Comm):
    """A Comm of two ranks where the other rank sends exactly what this one does (no process group).

    Every tensor handed to it must be a device tensor: an NCCL group refuses anything else."""

    def __init__(self) -> None:
        super().__init__()
        self.world_size, self.handed = 2, Counter[str]()

    def _on_device(self, t: torch.Tensor, op: str, tag: str) -> None:
        assert isinstance(t, fakecuda.DeviceTensor), f"{op} {tag!r} got a CPU tensor: NCCL refuses it"
        self.handed[op] += 1

    def all_reduce(self, tensor: torch.Tensor, average: bool = False, async_op: bool = False,
                   tag: str = "") -> Any:
        self._on_device(tensor, "all_reduce", tag)
        tensor.mul_(1 if average else 2)
        return tensor

    def all_gather(self, tensor: torch.Tensor, async_op: bool = False, tag: str = "") -> Any:
        self._on_device(tensor, "all_gather", tag)
        return [tensor.clone(), tensor.clone()]


PIPELINES = [(spec, fb, {}) for spec in COMPRESSORS.names() for fb in ("none", "ef")]
PIPELINES += [("topk", fb, {}) for fb in FEEDBACK.names()]
PIPELINES += [("topk", "ef", {"checksum": True}), ("threshold", "none", {"checksum": True})]
PIPELINES += [("qsgd", "none", {"rule": rule}) for rule in RULES.names() if rule != "mean"]
PIPELINES += [("fp16", "none", {"attack": name}) for name in ATTACKS.names()
              if not isinstance(build(name, ATTACKS), DataAttack)]  # data attacks act on labels, not the wire


@pytest.mark.parametrize("spec,feedback,extra", PIPELINES, ids=[f"{s}-{f}-{'-'.join(e) or 'plain'}"
                                                                 for s, f, e in PIPELINES])
def test_aggregator_hands_the_wire_device_tensors(spec: str, feedback: str, extra: dict[str, Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    options: dict[str, Any] = {"checksum": extra.get("checksum", False)}
    if "rule" in extra:
        options["rule"] = build(extra["rule"], RULES)
    if "attack" in extra:
        options["attack"] = build(extra["attack"] + (":ranks=0" if extra["attack"] != "none" else ""), ATTACKS)
    with fakecuda.fake_accelerator(monkeypatch) as mode:
        monkeypatch.setattr(kernels, "loaded", _no_cpu_loops)
        comm = TwinComm()
        agg = Aggregator(comm, build(spec, COMPRESSORS), build(feedback, FEEDBACK), small_numel=100, **options)
        tensors = {k: fakecuda.to_device(x) for k, x in _inputs().items()}
        for _ in range(2):
            agg.mean_(list(tensors.items()))
        agg.close()
        for name, t in tensors.items():
            assert isinstance(t, fakecuda.DeviceTensor) and torch.isfinite(fakecuda.to_cpu(t)).all(), name
        for key, slots in agg.feedback.state.items():
            for slot, t in slots.items():
                assert isinstance(t, fakecuda.DeviceTensor), f"feedback state {key}/{slot} is on the CPU"
    assert sum(comm.handed.values()) > 0
    _check_syncs(mode)


def test_harness_catches_mixing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in device raises where a GPU would: a CPU buffer indexed or combined with device data."""
    with fakecuda.fake_accelerator(monkeypatch) as mode:
        x = fakecuda.to_device(torch.arange(10.0))
        with pytest.raises(fakecuda.DeviceMismatchError):
            x + torch.zeros(10)
        with pytest.raises(fakecuda.DeviceMismatchError):
            torch.zeros(10)[x.long()] = 1.0
        with pytest.raises(fakecuda.DeviceMismatchError):
            torch.rand(3, generator=torch.Generator(), device=x.device)
        assert isinstance(x * torch.tensor(2.0), fakecuda.DeviceTensor)  # 0-dim CPU scalars are fine, as on CUDA
        assert isinstance(torch.zeros(3, device=x.device), fakecuda.DeviceTensor)
        float(x.sum())
    assert sum(mode.syncs.values()) == 1


def test_cuda_tests_dry_run_on_cpu() -> None:
    """tests/test_cuda.py (skipped here: no GPU) passes on the CPU with LOWBAND_TEST_DEVICE=cpu, so the
    file a GPU machine runs is known to work apart from the device itself."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {**os.environ, "LOWBAND_TEST_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_cuda.py")],
                          cwd=here.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]
