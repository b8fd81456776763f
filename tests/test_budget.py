"""Compute-aware local work (``budget="speed"``, lowband.algorithms.budget) and ``--worker-speed``.

Pure: speeds -> budgets, smoothing, weightings, options and config errors. On 4 gloo ranks
(one launch) with each rank's step time reported as 1 / speed: the budgets follow the
speeds, slow ranks sit out the rest of the round, everyone synchronises on the same
iteration, the work-weighted (uniform, FedNova-normalised) average equals a float64
reference computed here from the ranks' pre-synchronisation parameters, and a
checkpoint mid-round resumes bit for bit. Through the real worker loop (2 ranks, speeds
1 and 0.25): the slow rank draws one batch per inner step it takes and no more.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.algorithms.budget import SpeedBudget, smooth, speed_budgets
from lowband.algorithms.co2 import CO2Options
from lowband.algorithms.delayed_diloco import DelayedDiLoCoOptions
from lowband.algorithms.diloco import DiLoCo, DiLoCoOptions
from lowband.algorithms.eager_diloco import EagerDiLoCoOptions
from lowband.algorithms.localsgd import LocalSGD, LocalSGDOptions
from lowband.algorithms.streaming_diloco import StreamingDiLoCoOptions
from lowband.comm import Comm
from lowband.comm.group import init_from_env, shutdown
from lowband.train.config import TrainConfig, Variant
from lowband.train.launch import launch

H, STEPS, CUT = 8, 24, 12  # three rounds; the checkpoint falls mid-round 2
SPEEDS = (1.0, 0.5, 0.25, 0.3)  # budgets 8, 4, 2, round(2.4) = 2
EXPECTED = (8, 4, 2, 2)


# -- pure ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, h, budgets", [
    ((1.0, 1.0), 10, (10, 10)),
    ((1.0, 2.0, 4.0, 8.0), 10, (10, 5, 3, 1)),  # 2.5 rounds up, 1.25 down
    ((2.0, 1.0), 10, (5, 10)),  # the fastest need not be rank 0
    ((0.01, 100.0), 10, (10, 1)),  # never below one step
    ((1.0, 4.0), 1, (1, 1)),
    ((math.nan, 2.0), 6, (6, 6)),  # nothing measured counts as fastest: nobody starves
    ((0.0, math.inf), 4, (4, 4)),
    ((), 5, ()),
])
def test_speed_budgets(seconds: tuple[float, ...], h: int, budgets: tuple[int, ...]) -> None:
    assert speed_budgets(seconds, h) == budgets


def test_speed_budgets_refuse_h_below_one() -> None:
    with pytest.raises(ValueError, match="inner_steps"):
        speed_budgets((1.0,), 0)


def test_smoothing_keeps_budgets_from_jittering() -> None:
    assert smooth(None, (1.0, 2.0), 0.5) == (1.0, 2.0)  # the first measurement as it is
    assert smooth((1.0, 2.0), (3.0, math.nan), 0.5) == (2.0, 2.0)  # no new measurement: kept
    assert smooth((math.nan, 2.0), (3.0, 4.0), 0.25) == (3.0, 3.5)
    estimate, seen = (1.0, 2.0), set()  # rank 1 at 2 s/step, noisy by +-20%: H 10 gives 5 +- 1
    for noise in (1.2, 0.8, 1.2, 0.8, 1.2, 0.8):
        estimate = smooth(estimate, (1.0, 2.0 * noise), 0.5)
        seen.add(speed_budgets(estimate, 10)[1])
    assert seen == {5}, seen  # unsmoothed: 4 and 6 alternate


def test_world_of_one_always_takes_h_steps() -> None:
    budget = SpeedBudget(Comm(), inner_steps=4)
    assert budget.budget() == 4 and budget.factor() == 1.0
    budget.record(0.5)
    budget.after_inner_step(1, 4, 0.0)  # the first inner step: an exchange with itself
    assert budget.budgets == (4,) and budget.estimate == (0.5,)
    model = nn.Linear(3, 2)
    algo = DiLoCo(model, torch.optim.AdamW(model.parameters()), Comm(), DiLoCoOptions(inner_steps=3, budget="speed"))
    assert algo.compute_aware and algo.wants_compute()
    with pytest.raises(RuntimeError, match="idle"):
        algo.idle()


def test_state_round_trips_and_is_dropped_at_another_world_size() -> None:
    budget = SpeedBudget(Comm(), inner_steps=4)
    budget.load_state_dict({"budget_estimate": (0.5,), "budgets": (3,), "budget_seconds": 1.5, "budget_steps": 2})
    assert (budget.estimate, budget.budgets, budget.seconds, budget.steps) == ((0.5,), (3,), 1.5, 2)
    assert budget.state_dict() == {"budget_estimate": (0.5,), "budgets": (3,), "budget_seconds": 1.5,
                                   "budget_steps": 2}
    budget.load_state_dict({"budget_estimate": (0.5, 1.0), "budgets": (4, 2)})  # saved by 2 ranks, resumed by 1
    assert budget.estimate is None and budget.budgets is None and budget.budget() == 4


def test_options_validate() -> None:
    for bad, message in [({"budget": "fast"}, "budget must be one of fixed, speed"),
                         ({"weighting": "size"}, "weighting must be one of work, uniform, normalised"),
                         ({"budget_smoothing": 1.0}, "budget_smoothing"),
                         ({"budget": "speed", "aggregate": "median"}, "set weighting='uniform'")]:
        for cls in (DiLoCoOptions, LocalSGDOptions):
            with pytest.raises(ValueError, match=message):
                cls(**bad)
    DiLoCoOptions(budget="speed", aggregate="median", weighting="uniform")
    for cls, name in [(StreamingDiLoCoOptions, "streaming-diloco"), (EagerDiLoCoOptions, "eager-diloco"),
                      (CO2Options, "co2"), (DelayedDiLoCoOptions, "delayed-diloco")]:
        cls(budget="fixed")
        with pytest.raises(ValueError, match=f"{name} does not take budget='speed'"):
            cls(budget="speed")


def test_config_passes_budget_and_refuses_it_where_it_means_nothing() -> None:
    cfg = TrainConfig(algos=("diloco", "localsgd:weighting=uniform"), workers=4, worker_speed="1,1,0.5,0.25",
                      budget="speed", inner_steps=5)
    assert cfg.options_for(Variant("diloco")) == DiLoCoOptions(inner_steps=5, budget="speed")
    assert cfg.options_for(Variant("localsgd:weighting=uniform")).weighting == "uniform"
    assert TrainConfig(algos=("diloco",)).options_for(Variant("diloco")).budget == "fixed"
    with pytest.raises(ValueError, match=r"--budget applies to co2, .*diloco, .*localsgd.*, not ddp, qsr"):
        TrainConfig(algos=("ddp", "qsr", "diloco"), budget="speed")
    with pytest.raises(ValueError, match="delayed-diloco does not take budget='speed'"):
        TrainConfig(algos=("delayed-diloco",), budget="speed")


# -- 4 gloo ranks, step times reported as 1 / speed -----------------------------------------------

def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 320), nn.Tanh(), nn.Linear(320, 4))


def flat(algo: DiLoCo) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in algo.params]).clone()


def make(cls: type[DiLoCo], options: Any, seed: int) -> DiLoCo:
    model = tiny_model(seed)
    return cls(model, torch.optim.AdamW(model.parameters(), lr=1e-2), Comm(), options)


def drive(algo: DiLoCo, steps: range, rank: int, trace: dict[str, Any]) -> None:
    """The worker loop's shape: idle iterations draw no batch; each inner step's compute is
    reported as 1 / speed seconds (so the budgets do not depend on this machine's load)."""
    for _ in steps:
        if not algo.wants_compute():
            algo.idle()
            trace["idle"] += 1
            continue
        g = torch.Generator().manual_seed(1000 * algo.step_count + rank)  # the rank's next batch
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        F.mse_loss(algo.model(x), y).backward()
        algo.record_compute(1.0 / SPEEDS[rank])
        algo.step()
        algo.zero_grad()
        trace["drawn"] += 1


def traced(cls: type[DiLoCo], options: Any, rank: int) -> dict[str, Any]:
    """A full run; the parameters before and after each synchronisation, the work per round."""
    algo = make(cls, options, seed=rank + 1)  # per-rank init: the broadcast fixes it
    trace: dict[str, Any] = {"start": flat(algo), "pre": [], "post": [], "work": [], "sync_at": [],
                             "idle": 0, "drawn": 0}
    original, done = algo.synchronise, [0]

    def synchronise() -> None:
        trace["pre"].append(flat(algo))
        trace["work"].append(algo.step_count - done[0])
        trace["sync_at"].append(trace["idle"] + trace["drawn"] + 1)
        done[0] = algo.step_count
        original()
        trace["post"].append(flat(algo))

    algo.synchronise = synchronise  # type: ignore[method-assign]
    drive(algo, range(STEPS), rank, trace)
    trace["metrics"] = algo.metrics()
    trace["gathers"] = sum(r.tag == "speeds" for r in algo.comm.ledger.records)
    algo.comm.close()
    return trace


def resumed(options: Any, rank: int) -> torch.Tensor:
    """Train to CUT (mid-round), checkpoint, restore into a fresh model, finish the run."""
    first = make(LocalSGD, options, seed=rank + 1)
    trace = {"idle": 0, "drawn": 0}
    drive(first, range(CUT), rank, trace)
    assert 0 < first.local_steps < H
    saved = copy.deepcopy({"model": first.model.state_dict(), "inner": first.optimizer.state_dict(),
                           "algo": first.state_dict()})
    second = make(LocalSGD, options, seed=rank + 11)
    second.model.load_state_dict(saved["model"])
    second.optimizer.load_state_dict(saved["inner"])
    second.load_state_dict(saved["algo"])
    assert second.speed_budget is not None and second.speed_budget.budgets == tuple(EXPECTED)
    drive(second, range(CUT, STEPS), rank, trace)
    first.comm.close()
    second.comm.close()
    return flat(second)


@record
def budget_runs() -> dict[str, Any]:
    rank, _ = init_from_env()
    torch.set_num_threads(1)
    try:
        speed = {"inner_steps": H, "budget": "speed"}
        return {
            "work": traced(LocalSGD, LocalSGDOptions(**speed), rank),
            "uniform": traced(LocalSGD, LocalSGDOptions(**speed, weighting="uniform"), rank),
            "normalised": traced(LocalSGD, LocalSGDOptions(**speed, weighting="normalised"), rank),
            "diloco": traced(DiLoCo, DiLoCoOptions(**speed), rank),
            "fixed": traced(LocalSGD, LocalSGDOptions(inner_steps=H), rank),
            "resumed": resumed(LocalSGDOptions(**speed), rank),
        }
    finally:
        shutdown()


def reference(weighting: str, start: torch.Tensor, pres: list[list[torch.Tensor]], outer: str) -> list[torch.Tensor]:
    """float64, one process: theta_g after each round from the ranks' pre-sync parameters."""
    w = torch.tensor(EXPECTED, dtype=torch.float64)
    theta, buf, out = start.double(), None, []
    for pre in pres:
        deltas = torch.stack([theta - p.double() for p in pre])  # (n, P)
        if weighting == "work":
            delta = (w[:, None] * deltas).sum(0) / w.sum()
        elif weighting == "normalised":
            delta = w.mean() * (deltas / w[:, None]).mean(0)
        else:
            delta = deltas.mean(0)
        if outer == "nesterov":  # DiLoCo's default outer step: SGD lr 0.7, Nesterov momentum 0.9
            buf = delta.clone() if buf is None else 0.9 * buf + delta
            theta = theta - 0.7 * (delta + 0.9 * buf)
        else:
            theta = theta - delta
        out.append(theta)
    return out


@pytest.fixture(scope="module")
def four_ranks() -> dict[int, Any]:
    return launch(budget_runs, 4)


def test_budgets_follow_speeds_and_everyone_syncs_together(four_ranks: dict[int, Any]) -> None:
    for r in range(4):
        run = four_ranks[r]["work"]
        assert run["sync_at"] == [H, 2 * H, 3 * H], f"rank {r} synchronised at {run['sync_at']}"
        assert run["work"] == [EXPECTED[r]] * 3, f"rank {r} took {run['work']} inner steps per round"
        assert run["drawn"] == 3 * EXPECTED[r] and run["idle"] == STEPS - 3 * EXPECTED[r]
        assert run["metrics"]["budget"] == EXPECTED[r]
        assert run["gathers"] == 4, "one exchange at the first inner step, one per synchronisation"
        fixed = four_ranks[r]["fixed"]
        assert fixed["work"] == [H] * 3 and fixed["idle"] == 0 and fixed["gathers"] == 0
        assert "budget" not in fixed["metrics"]


@pytest.mark.parametrize("name, weighting, outer", [("work", "work", "plain"), ("uniform", "uniform", "plain"),
                                                   ("normalised", "normalised", "plain"),
                                                   ("diloco", "work", "nesterov")])
def test_weighted_average_of_unequal_work_matches_float64(four_ranks: dict[int, Any], name: str, weighting: str,
                                                          outer: str) -> None:
    runs = [four_ranks[r][name] for r in range(4)]
    pres = [[run["pre"][i] for run in runs] for i in range(3)]
    expected = reference(weighting, runs[0]["start"], pres, outer)
    for i in range(3):
        for r in range(1, 4):
            assert torch.equal(runs[r]["post"][i], runs[0]["post"][i]), f"{name} round {i}: rank {r} differs"
        torch.testing.assert_close(runs[0]["post"][i].double(), expected[i], rtol=0, atol=2e-6,
                                   msg=lambda m: f"{name} round {i}: {m}")
    if weighting != "uniform":  # the weights matter here: the plain mean is far off
        plain = reference("uniform", runs[0]["start"], pres, outer)
        assert (plain[0] - expected[0]).abs().max() > 1e-3


def test_mid_round_checkpoint_resumes_bit_identically(four_ranks: dict[int, Any]) -> None:
    for r in range(4):
        assert torch.equal(four_ranks[r]["resumed"], four_ranks[r]["work"]["post"][-1]), f"rank {r}"


# -- the real worker loop ---------------------------------------------------------------------------

class Counting:
    """A dataset that counts the training batches drawn from it."""

    def __init__(self, data: Any) -> None:
        self.data, self.drawn = data, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.data, name)

    def batch(self, *args: Any, **kwargs: Any) -> Any:
        self.drawn += 1
        return self.data.batch(*args, **kwargs)


@record
def worker_loop(cfg: TrainConfig, out: str) -> int:
    from lowband.train.data import load_dataset
    from lowband.train.loop import train_one

    _, world_size = init_from_env()
    torch.set_num_threads(1)
    try:
        data = Counting(load_dataset(cfg.data))
        train_one(cfg, Variant("diloco"), data, cfg.network(world_size), Path(out))  # type: ignore[arg-type]
        return data.drawn
    finally:
        shutdown()


def test_worker_loop_draws_batches_only_for_inner_steps_taken(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"  # small and quick to load
    g = torch.Generator().manual_seed(0)
    text.write_text("".join(chr(97 + int(i)) for i in torch.randint(0, 26, (20_000,), generator=g)))
    cfg = TrainConfig(algos=("diloco",), data=str(text), workers=2, worker_speed="1,0.25", budget="speed",
                      inner_steps=4, steps=12, eval_every=4, eval_batches=1, batch_size=4, bandwidth="none",
                      latency="none", progress=False)
    drawn = launch(worker_loop, 2, cfg, str(tmp_path))
    tokens_per_step = 4 * 128  # batch 4, the block of 128 characters
    rows = {r: [json.loads(x) for x in (tmp_path / "diloco" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    assert drawn[0] == 12 and rows[0][-1]["tokens"] == 12 * tokens_per_step
    assert [x["budget"] for x in rows[0] if "val_loss" in x] == [4, 4, 4]
    budgets = [x["budget"] for x in rows[1] if "val_loss" in x]
    assert all(b < 4 for b in budgets[1:]), budgets  # about a quarter of H once measured (4 x 0.25 = 1)
    assert drawn[1] == sum(1 for x in rows[1] if "loss" in x) < 12, drawn
    assert rows[1][-1]["tokens"] == drawn[1] * tokens_per_step
    assert [x["step"] for x in rows[1]] == list(range(1, 13))


@pytest.mark.slow
def test_four_uneven_workers_through_the_cli(tmp_path: Path) -> None:
    """`lowband train --workers 4 --worker-speed 1,1,0.5,0.25 --algo diloco --budget speed`: the
    speeds reach run.json, the slowest worker's budget and tokens fall well below the fastest's."""
    from lowband.cli import main as cli_main

    text = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text("".join(chr(97 + int(i)) for i in torch.randint(0, 26, (20_000,), generator=g)))
    assert cli_main(["train", "--out", str(tmp_path), "--name", "run", "--no-progress", "--data", str(text),
                     "--workers", "4", "--worker-speed", "1,1,0.5,0.25", "--algo", "diloco", "--budget", "speed",
                     "--steps", "20", "--inner-steps", "5", "--eval-every", "5", "--eval-batches", "1",
                     "--batch-size", "4"]) == 0
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["worker_speeds"] == [1.0, 1.0, 0.5, 0.25] and info["algorithms"]["diloco"]["budget"] == "speed"
    rows = {r: [json.loads(x) for x in (run / "diloco" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(4)}
    budgets = {r: [x["budget"] for x in rows[r] if "val_loss" in x] for r in range(4)}
    assert max(budgets[0] + budgets[1]) == 5 and max(budgets[3]) < 5, budgets
    assert rows[3][-1]["tokens"] < rows[2][-1]["tokens"] <= rows[0][-1]["tokens"], budgets
    assert all(math.isfinite(x["val_loss"]) for x in rows[0] if "val_loss" in x)
