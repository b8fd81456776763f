"""``--precision``: validation, bf16 autocast on the CPU, fp16's loss scaler and skipped steps that
leave every rank's step counters in line, and a real short bf16 run through the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.algorithms import ALGORITHMS
from lowband.algorithms.diloco import DiLoCoOptions
from lowband.cli import main as cli_main
from lowband.comm import Comm
from lowband.comm.group import init_from_env, shutdown
from lowband.train.config import TrainConfig
from lowband.train.flags import config_from_args
from lowband.train.launch import launch
from lowband.train.precision import Precision, finite_steps_only, fp16_tolerant
from tiny import batch, flat, tiny_gpt

LOCAL_UPDATE = ("diloco", "streaming-diloco", "eager-diloco", "delayed-diloco", "co2", "noloco", "qsr", "localsgd",
                "gossip")


# -- validation -------------------------------------------------------------------------------------
def test_precision_flag_defaults_and_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert config_from_args([]).precision == "fp32"
    assert config_from_args(["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(ValueError, match="^unknown --precision 'fp8'; choose one of: fp32, bf16, fp16$"):
        TrainConfig(precision="fp8")
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(["--precision", "fp8"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_bf16_takes_every_algorithm() -> None:
    TrainConfig(algos=tuple(ALGORITHMS.names()), precision="bf16")


def test_fp16_takes_local_update_algorithms_and_refuses_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    for name in LOCAL_UPDATE:
        assert fp16_tolerant(ALGORITHMS.get(name)), name
        TrainConfig(algos=(name,), precision="fp16")
    refused = sorted(set(ALGORITHMS.names()) - set(LOCAL_UPDATE))
    assert refused == ["ddp", "ddp-backup", "dion", "dist-lion", "onebit-adam", "zo-onebyte"]
    with pytest.raises(ValueError, match=r"only local-update algorithms tolerate .*, not ddp, onebit-adam: "
                                         r"use --precision bf16$"):
        TrainConfig(algos=("ddp", "diloco", "onebit-adam"), precision="fp16")
    with pytest.raises(SystemExit):
        config_from_args(["--precision", "fp16"])  # the default algorithms include ddp
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("not ddp: use --precision bf16\n")


def test_fp16_cannot_resume_yet(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot --resume yet .*use --precision bf16, or a new --name$"):
        TrainConfig(algos=("diloco",), precision="fp16", resume=True, name="run", out=str(tmp_path))


# -- autocast and the loss scaler ------------------------------------------------------------------------
def test_bf16_autocast_is_real_on_the_cpu() -> None:
    layer = torch.nn.Linear(8, 4)
    precision = Precision("bf16", torch.device("cpu"))
    with precision.autocast():
        out = layer(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16
    precision.backward(out.float().square().mean())
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32  # parameters stay fp32
    assert precision.scaler is None and precision.metrics() == {}
    with Precision("fp32", torch.device("cpu")).autocast():
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_a_skipped_step_leaves_the_optimizer_and_its_schedule_wrapper() -> None:
    layer = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # wraps opt.step per instance
    wrapper = opt.step
    before = flat(layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    layer.weight.grad[0, 0] = float("inf")
    with finite_steps_only(opt) as skipped:
        opt.step()
    assert skipped == [1] and torch.equal(flat(layer.parameters()), before) and not opt.state
    assert opt.step is wrapper
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" nor "overridden"
        scheduler.step()
    layer.weight.grad[0, 0] = 1.0
    with finite_steps_only(opt) as skipped:
        opt.step()
    assert skipped == [0] and not torch.equal(flat(layer.parameters()), before)


def fp16_diloco_step(model: torch.nn.Module, algo: object, precision: Precision, rank: int, step: int,
                     overflow: bool) -> None:
    """One training step as the worker takes it, with an overflowing gradient when ``overflow``."""
    x, y = batch(rank, step)
    with precision.autocast():
        loss = model(x, y)[1]
    precision.backward(loss)
    if overflow:
        next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    precision.step(algo)  # type: ignore[arg-type]
    algo.zero_grad()  # type: ignore[attr-defined]


def test_fp16_skips_an_overflowing_inner_step_and_still_counts_it() -> None:
    model = tiny_gpt()
    algo = ALGORITHMS.get("diloco")(model, torch.optim.AdamW(model.parameters(), lr=1e-2), Comm(),
                                    DiLoCoOptions(inner_steps=3), grad_clip=1.0)
    precision = Precision("fp16", torch.device("cpu"))
    fp16_diloco_step(model, algo, precision, 0, 0, overflow=False)
    after_first = flat(model.parameters())
    fp16_diloco_step(model, algo, precision, 0, 1, overflow=True)
    assert torch.equal(flat(model.parameters()), after_first)  # no update applied
    assert (algo.step_count, algo.local_steps, algo.outer_steps) == (2, 2, 0)  # but counted
    assert precision.metrics() == {"loss_scale": 32768.0, "skipped_steps": 1}  # the scale halves
    fp16_diloco_step(model, algo, precision, 0, 2, overflow=False)
    assert (algo.step_count, algo.local_steps, algo.outer_steps) == (3, 0, 1)  # synchronised on time
    assert torch.isfinite(flat(model.parameters())).all()


@record
def fp16_ranks_stay_in_step(steps: int, overflow_at: int) -> dict[str, object]:
    """Rank 1's gradients overflow at ``overflow_at``; DiLoCo H=2 over 2 gloo ranks."""
    rank, _ = init_from_env()
    try:
        model = tiny_gpt(seed=rank + 1)
        comm = Comm()
        algo = ALGORITHMS.get("diloco")(model, torch.optim.AdamW(model.parameters(), lr=1e-2), comm,
                                        DiLoCoOptions(inner_steps=2))
        precision = Precision("fp16", torch.device("cpu"))
        for step in range(steps):
            fp16_diloco_step(model, algo, precision, rank, step, overflow=rank == 1 and step == overflow_at)
        algo.finish()
        comm.close()
        return {"counters": (algo.step_count, algo.outer_steps, algo.local_steps), "skipped": precision.skipped,
                "ops": [(r.op, r.step) for r in comm.ledger.records], "global": flat(algo.global_params)}
    finally:
        shutdown()


def test_a_rank_that_skips_an_inner_step_stays_in_step_with_the_others() -> None:
    results = launch(fp16_ranks_stay_in_step, 2, 4, 1)
    assert [results[r]["skipped"] for r in (0, 1)] == [0, 1]
    assert results[0]["counters"] == results[1]["counters"] == (4, 2, 0)
    assert results[0]["ops"] == results[1]["ops"]  # the same collectives, issued at the same steps
    assert torch.equal(results[0]["global"], results[1]["global"])  # and the same global model


# -- a real run ----------------------------------------------------------------------------------------
def test_a_short_bf16_run_on_the_cpu(tmp_path: Path) -> None:
    code = cli_main(["train", "--out", str(tmp_path), "--name", "run", "--no-progress", "--device", "cpu",
                     "--precision", "bf16", "--algo", "ddp,diloco", "--workers", "2", "--steps", "4", "-H", "2",
                     "--eval-every", "2", "--bandwidth", "none", "--eval-batches", "1", "--batch-size", "4"])
    assert code == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["device"], info["config"]["device"], info["config"]["precision"]) == ("cpu", "cpu", "bf16")
    for algo in ("ddp", "diloco"):
        rows = [json.loads(x) for x in (tmp_path / "run" / algo / "rank1.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert all(0 < r["loss"] < 10 for r in rows) and rows[-1]["val_loss"] < 10


@pytest.mark.slow
def test_a_short_fp16_run_reports_its_loss_scale(tmp_path: Path) -> None:
    code = cli_main(["train", "--out", str(tmp_path), "--name", "run", "--no-progress", "--device", "cpu",
                     "--precision", "fp16", "--algo", "diloco;streaming-diloco:fragments=2", "--workers", "2",
                     "--steps", "6", "-H", "2", "--eval-every", "3", "--bandwidth", "none", "--eval-batches", "1",
                     "--batch-size", "4"])
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "diloco" / "rank0.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [3, 6]
    assert all(r["loss_scale"] > 0 and r["skipped_steps"] >= 0 for r in evaluated)
