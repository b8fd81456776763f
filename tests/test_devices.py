"""``--device``: choosing a worker's device and backend, refusing CUDA where there is none, and the
comm thread's CUDA handling (current device, completion before the clock is read).

No GPU here: the CUDA branches are exercised with ``torch.cuda.is_available``/``device_count``
monkeypatched and CUDA tensors that are fake (``FakeTensorMode``: a device, no storage); no real
CUDA call is made (``set_device`` and ``current_stream`` are recorded stand-ins).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowband.cli import main as cli_main
from lowband.comm import Comm
from lowband.comm import comm as comm_module
from lowband.devices import NO_CUDA, backend_for, check_gpus, resolve_device
from lowband.net import cost
from lowband.train.config import TrainConfig
from lowband.train.flags import config_from_args


def gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Pretend this machine has ``count`` GPUs (0: no CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def fake_cuda(n: int = 4) -> torch.Tensor:
    """A tensor whose device is ``cuda:0``, without CUDA (no storage: only its device is read)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(n, device="cuda")


# -- resolution ---------------------------------------------------------------------------------
def test_cpu_is_the_cpu_and_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, 2)
    assert resolve_device("cpu", 1, 2) == torch.device("cpu")
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for("cuda:1") == "nccl"


def test_auto_takes_one_gpu_per_local_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, 2)
    assert [resolve_device("auto", r, 2) for r in range(2)] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert resolve_device("cuda", 1, 2) == torch.device("cuda", 1)
    # three local workers, two GPUs: every worker of the machine decides alike, for the CPU
    assert {resolve_device("auto", r, 3) for r in range(3)} == {torch.device("cpu")}


def test_auto_without_cuda_is_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, 0)
    assert resolve_device("auto", 0, 4) == torch.device("cpu")


def test_cuda_without_cuda_or_enough_gpus_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match=f"^{NO_CUDA}$"):
        resolve_device("cuda", 0)
    with pytest.raises(ValueError, match=f"^{NO_CUDA}$"):
        check_gpus("cuda", 2)
    gpus(monkeypatch, 2)
    with pytest.raises(ValueError, match=r"local worker 2 has no GPU \(2 visible\): run at most 2 workers"):
        resolve_device("cuda", 2, 3)
    with pytest.raises(ValueError, match="3 workers, 2 GPUs visible; use --workers 2 or --device cpu"):
        check_gpus("cuda", 3)
    check_gpus("cuda", 2)
    check_gpus("auto", 8)  # auto falls back to the CPU rather than failing
    with pytest.raises(ValueError, match="unknown --device 'tpu'; choose one of: auto, cpu, cuda"):
        resolve_device("tpu", 0)


def test_the_worker_takes_local_rank_and_makes_it_current(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowband.train.worker import worker_device

    gpus(monkeypatch, 2)
    made_current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert worker_device(TrainConfig(device="cuda")) == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", 1)]
    assert worker_device(TrainConfig(device="auto", net="netns")) == torch.device("cpu")  # NCCL would bypass tc
    assert worker_device(TrainConfig(device="cpu")) == torch.device("cpu")
    assert made_current == [torch.device("cuda", 1)]


# -- validation: before any worker starts -----------------------------------------------------------
def test_device_flag_defaults_and_bad_values() -> None:
    assert config_from_args([]).device == "auto"
    assert config_from_args(["--device", "cpu"]).device == "cpu"
    with pytest.raises(ValueError, match="^unknown --device 'gpu'; choose one of: auto, cpu, cuda$"):
        TrainConfig(device="gpu")
    with pytest.raises(SystemExit):
        config_from_args(["--device", "gpu"])  # argparse's choices: one line, exit 2


def test_cuda_without_cuda_is_refused_before_any_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import lowband.train.run

    gpus(monkeypatch, 0)
    monkeypatch.setattr(lowband.train.run, "run", lambda cfg: pytest.fail("a worker was started"))
    with pytest.raises(ValueError, match=f"^{NO_CUDA}$"):
        TrainConfig(device="cuda")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--device", "cuda", "--out", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"lowband train: error: {NO_CUDA}\n"  # exactly one line
    assert not list(tmp_path.iterdir())  # nothing written


def test_cuda_is_refused_under_torchrun_too(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from lowband.train.__main__ import main as torchrun_main

    gpus(monkeypatch, 0)
    with pytest.raises(SystemExit) as exit_info:
        torchrun_main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"torchrun ... -m lowband.train: error: {NO_CUDA}\n"


def test_too_few_gpus_for_the_workers_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import lowband.train.run

    gpus(monkeypatch, 2)
    monkeypatch.setattr(lowband.train.run, "run", lambda cfg: pytest.fail("a worker was started"))
    assert cli_main(["train", "--device", "cuda", "--workers", "4", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: --device cuda runs one worker per GPU: 4 workers, 2 GPUs visible; use --workers 2 or --device cpu"


def test_gpus_are_refused_where_not_supported_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, 4)
    with pytest.raises(ValueError, match="^--net netns shapes sockets, which NCCL bypasses"):
        TrainConfig(device="cuda", net="netns")
    with pytest.raises(ValueError, match="^--elastic trains on the CPU in fp32 for now"):
        TrainConfig(device="cuda", elastic=True, algos=("diloco",))


# -- the comm thread ------------------------------------------------------------------------------------
def test_cuda_device_of_an_ops_tensors() -> None:
    cuda, cpu = fake_cuda(), torch.zeros(2)
    assert comm_module._cuda_device(cpu) is None
    assert comm_module._cuda_device([cpu, {"a": cpu}]) is None
    assert comm_module._cuda_device(({}, {1: cuda})) == torch.device("cuda", 0)
    assert comm_module._cuda_device([cpu, cuda]) == torch.device("cuda", 0)


class Recorder:
    """Stand-ins for ``torch.cuda.set_device`` and ``current_stream(...).synchronize``: each call
    with its thread and time, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def event(self, what: str) -> None:
        self.calls.append((what, threading.current_thread().name, comm_module.time.perf_counter()))

    def set_device(self, device: torch.device) -> None:
        self.event(f"set_device {device}")

    def current_stream(self, device: torch.device) -> Any:
        recorder = self

        class Stream:
            def synchronize(self) -> None:
                recorder.event(f"synchronize {device}")

        return Stream()


def submit(comm: Comm, tensor: torch.Tensor, recorder: Recorder) -> None:
    """One synchronous op of ``tensor`` through ``Comm._submit``, its ``run`` recorded."""
    price = lambda link: cost.ring_all_reduce(16, 2, link)  # noqa: E731
    comm._submit("all_reduce", "t", 16, price, lambda: recorder.event("run"), tensor, False)


def test_a_cuda_op_runs_on_its_device_and_completes_before_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    monkeypatch.setattr(torch.cuda, "set_device", recorder.set_device)
    monkeypatch.setattr(torch.cuda, "current_stream", recorder.current_stream)
    comm = Comm()  # a world of one, given a comm thread so that _submit runs its real path
    comm._pool = ThreadPoolExecutor(1, thread_name_prefix="lowband-comm")
    try:
        submit(comm, torch.zeros(4), recorder)
        assert [c[0] for c in recorder.calls] == ["run"]  # the CPU: unchanged, no CUDA call
        recorder.calls.clear()
        submit(comm, fake_cuda(), recorder)
    finally:
        comm.close()
    assert [c[0] for c in recorder.calls] == ["set_device cuda:0", "run", "synchronize cuda:0"]
    assert all(thread.startswith("lowband-comm") for _, thread, _ in recorder.calls)  # per-thread device
    record = comm.ledger.records[-1]
    assert record.end >= recorder.calls[-1][2]  # the op's end is read after the GPU finished
