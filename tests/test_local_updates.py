"""Local-update synchronisation: ``localsgd`` (periodic averaging) and ``qsr`` (its period grows as 1/lr^2).

Single process (``Comm()`` without a process group): QSR's periods follow the rule computed
by hand under a LambdaLR cosine schedule, local SGD syncs every H steps, state_dict resumes
bit-identically. On 2 and 4 gloo ranks (one launch each): ranks agree exactly after every
synchronisation and local SGD's result is the mean of the ranks' local parameters.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.algorithms import ALGORITHMS
from lowband.algorithms.diloco import DiLoCo
from lowband.algorithms.localsgd import LocalSGD, LocalSGDOptions
from lowband.algorithms.qsr import QSR, QSROptions
from lowband.comm import Comm
from lowband.comm.group import init_from_env, shutdown
from lowband.registry import parse_spec
from lowband.train.config import TrainConfig, Variant
from lowband.train.launch import launch

BASE_LR = 3e-3


def tiny_model(seed: int = 0) -> nn.Module:
    """One weight above the aggregator's small_numel (5120 elements), the rest bucketed together."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 320), nn.Tanh(), nn.Linear(320, 4))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def cosine(steps: int, warmup: int = 0, min_ratio: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to ``min_ratio`` (the CLI's schedule)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def flat(algo: DiLoCo) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in algo.params]).clone()


def make(cls: type[DiLoCo], options: Any, factor: Callable[[int], float] | None = None, seed: int = 0,
         lr: float = BASE_LR) -> tuple[DiLoCo, torch.optim.lr_scheduler.LambdaLR | None]:
    model = tiny_model(seed)
    algo = cls(model, torch.optim.AdamW(model.parameters(), lr=lr), Comm(), options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(algo.optimizer, factor) if factor else None
    return algo, scheduler


def run(algo: DiLoCo, scheduler: torch.optim.lr_scheduler.LambdaLR | None, steps: range,
        rank: int = 0) -> list[int]:
    """Train over ``steps`` (0-based); returns the 1-based steps after which a synchronisation ran."""
    syncs = []
    for step in steps:
        x, y = batch(rank, step)
        F.mse_loss(algo.model(x), y).backward()
        before = algo.outer_steps
        algo.step()
        algo.zero_grad()
        if scheduler is not None:
            scheduler.step()
        if algo.outer_steps > before:
            syncs.append(step + 1)
    return syncs


def rule_syncs(steps: int, factor: Callable[[int], float], h_base: int, alpha: float,
               warmup: int = 0, total: int = 0, base_lr: float = BASE_LR) -> list[int]:
    """QSR by hand: the round starting after s steps runs at lr_s = base_lr * factor(s) and lasts
    H = max(h_base, floor((alpha / lr_s)^2)) steps (h_base in warm-up; cut to the steps left)."""
    out, s = [], 0
    while True:
        lr = base_lr * factor(s)
        h = h_base if s < warmup else max(h_base, math.floor((alpha / lr) ** 2))
        if total > s:
            h = min(h, total - s)
        s += h
        if s > steps:
            return out
        out.append(s)


# -- single process ----------------------------------------------------------------------------

def test_qsr_periods_follow_the_rule_under_cosine() -> None:
    steps, h_base, alpha = 150, 2, 1.5e-3  # H: 2 at the peak lr, (1.5e-3 / 3e-4)^2 = 25 at the end
    factor = cosine(steps)
    algo, scheduler = make(QSR, QSROptions(h_base=h_base, alpha=alpha), factor)
    got = run(algo, scheduler, range(steps))
    expected = rule_syncs(steps, factor, h_base, alpha)
    assert got == expected
    periods = [b - a for a, b in zip([0] + got, got)]
    assert periods[0] == h_base and max(periods) >= 10 and len(set(periods)) >= 5, periods
    assert periods == sorted(periods), "the lr only decays, so H only grows"


def test_qsr_warmup_and_last_round_cut_to_the_end() -> None:
    steps, warmup = 150, 10  # defaults h_base=4, alpha=1.2e-3: H 4 -> 16 at the end
    factor = cosine(steps, warmup)
    options = QSROptions(warmup_steps=warmup, steps=steps)
    algo, scheduler = make(QSR, options, factor)
    got = run(algo, scheduler, range(steps))
    assert got == rule_syncs(steps, factor, options.h_base, options.alpha, warmup, steps)
    assert got[:3] == [4, 8, 12], "warm-up: h_base although the lr starts at 3e-4"
    assert got[-1] == steps, "the last round ends with training"
    # without warmup_steps the rule applies at the warm-up's tiny lr: (1.2e-3 / 3e-4)^2, 16 but for rounding
    algo, scheduler = make(QSR, QSROptions(steps=steps), factor)
    first = math.floor((options.alpha / (BASE_LR * factor(0))) ** 2)
    assert first in (15, 16) and run(algo, scheduler, range(steps))[0] == first


@pytest.mark.parametrize("lr, alpha, h_base, h", [(5e-3, 0.02, 4, 16), (5e-3, 0.021, 4, 17),  # floor(4.2^2)
                                                   (0.02, 0.02, 4, 4), (5e-3, 0.0, 3, 3)])
def test_qsr_period_at_constant_lr(lr: float, alpha: float, h_base: int, h: int) -> None:
    algo, _ = make(QSR, QSROptions(h_base=h_base, alpha=alpha), lr=lr)
    assert run(algo, None, range(3 * h + 1)) == [h, 2 * h, 3 * h]


def test_qsr_period_is_fixed_for_the_round() -> None:
    algo, _ = make(QSR, QSROptions(h_base=4, alpha=0.02), lr=5e-3)  # H = 16
    assert run(algo, None, range(5)) == []
    algo.optimizer.param_groups[0]["lr"] = 0.02  # the rule now says 4; the round still lasts 16
    assert algo.period() == 16
    assert run(algo, None, range(5, 24)) == [16, 20, 24]


def test_localsgd_syncs_every_h_steps_to_the_local_parameters() -> None:
    algo, _ = make(LocalSGD, LocalSGDOptions(inner_steps=5))
    assert run(algo, None, range(23)) == [5, 10, 15, 20]
    assert type(algo.outer_optimizer) is torch.optim.SGD and not algo.outer_optimizer.state
    # one rank: the average is the local model itself; evaluation uses the last synchronised one
    local = flat(algo)
    with algo.evaluation_parameters():
        synced = flat(algo)
    assert not torch.equal(local, synced)
    run(algo, None, range(23, 25))
    torch.testing.assert_close(flat(algo), torch.cat([g.reshape(-1) for g in algo.global_params]),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["localsgd", "qsr"])
def test_state_dict_resumes_exactly(name: str) -> None:
    """Checkpoint mid-round (model, inner optimizer, scheduler, algorithm), restore, continue: bit-identical."""
    steps, cut = 40, 35  # qsr: the round 33..40 has H 7
    factor = cosine(steps, warmup=4)
    cls, options = {"localsgd": (LocalSGD, LocalSGDOptions(inner_steps=4)),
                    "qsr": (QSR, QSROptions(h_base=2, alpha=1.5e-3, warmup_steps=4, steps=steps))}[name]
    a1, s1 = make(cls, options, factor)
    syncs = run(a1, s1, range(steps))
    a2, s2 = make(cls, options, factor)
    run(a2, s2, range(cut))
    assert a2.local_steps > 0, "the checkpoint must fall mid-round"
    assert s2 is not None
    saved = copy.deepcopy({"model": a2.model.state_dict(), "inner": a2.optimizer.state_dict(),
                           "scheduler": s2.state_dict(), "algo": a2.state_dict()})
    a3, s3 = make(cls, options, factor, seed=7)  # different init: everything must come from the checkpoint
    assert s3 is not None
    a3.model.load_state_dict(saved["model"])
    a3.optimizer.load_state_dict(saved["inner"])
    s3.load_state_dict(saved["scheduler"])
    a3.load_state_dict(saved["algo"])
    resumed = run(a3, s3, range(cut, steps))
    assert resumed == [s for s in syncs if s > cut] and a3.outer_steps == a1.outer_steps == len(syncs)
    assert torch.equal(flat(a1), flat(a3))
    for g1, g3 in zip(a1.global_params, a3.global_params):
        assert torch.equal(g1, g3)


def test_options_validate_and_come_from_specs_and_the_cli() -> None:
    for bad, message in [({"h_base": 0}, "h_base"), ({"alpha": -1.0}, "alpha"), ({"alpha": math.inf}, "alpha"),
                         ({"warmup_steps": -1}, "warmup_steps"), ({"steps": -5}, "steps")]:
        with pytest.raises(ValueError, match=message):
            QSROptions(**bad)
    with pytest.raises(ValueError, match="inner_steps"):
        LocalSGDOptions(inner_steps=0)
    cls, kwargs = parse_spec("qsr:alpha=0.02,h_base=8", ALGORITHMS)
    assert cls is QSR and kwargs == {"alpha": 0.02, "h_base": 8}
    with pytest.raises(ValueError, match="options are"):
        parse_spec("localsgd:outer_lr=0.7", ALGORITHMS)  # plain averaging: no outer optimizer to tune
    cfg = TrainConfig(algos=("localsgd", "qsr:alpha=0.02"), steps=120, warmup_steps=10, inner_steps=7)
    assert cfg.options_for(Variant("localsgd")) == LocalSGDOptions(inner_steps=7)
    assert cfg.options_for(Variant("qsr:alpha=0.02")) == QSROptions(alpha=0.02, warmup_steps=10, steps=120)


# -- multi-process ----------------------------------------------------------------------------

def recorded_run(cls: type[DiLoCo], options: Any, steps: int, factor: Callable[[int], float] | None,
                 rank: int) -> dict[str, Any]:
    """Train on this rank's batches; record the parameters just before and after each synchronisation."""
    algo, scheduler = make(cls, options, factor, seed=rank + 1, lr=DIST_LR)  # per-rank init: broadcast fixes it
    pre: list[torch.Tensor] = []
    post: list[torch.Tensor] = []
    original = algo.synchronise

    def synchronise() -> None:
        pre.append(flat(algo))
        original()
        post.append(flat(algo))

    algo.synchronise = synchronise  # type: ignore[method-assign]
    syncs = run(algo, scheduler, range(steps), rank)
    algo.comm.close()
    return {"syncs": syncs, "pre": pre, "post": post, "bytes": algo.comm.ledger.bytes_sent}


DIST_LR = 1e-2
QSR_STEPS, QSR_OPTIONS = 30, QSROptions(h_base=2, alpha=2.5e-2, steps=30)  # lr 1e-2 -> 1e-3: H 6 .. 30 capped


@record
def local_update_runs(steps: int) -> dict[str, dict[str, Any]]:
    rank, _ = init_from_env()
    torch.set_num_threads(1)  # up to 4 ranks share a small machine
    try:
        return {
            "localsgd": recorded_run(LocalSGD, LocalSGDOptions(inner_steps=3), steps, None, rank),
            "qsr": recorded_run(QSR, QSR_OPTIONS, QSR_STEPS, cosine(QSR_STEPS), rank),
            "topk+ef": recorded_run(LocalSGD, LocalSGDOptions(inner_steps=3, compress="topk:ratio=0.1", feedback="ef"),
                                    steps, None, rank),
        }
    finally:
        shutdown()


# 4 ranks only with -m slow: the comm layer's default tests already run 4 ranks
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ranks_agree_after_each_sync_and_localsgd_averages(world: int) -> None:
    steps = 12
    results = launch(local_update_runs, world, steps)
    hand = rule_syncs(QSR_STEPS, cosine(QSR_STEPS), QSR_OPTIONS.h_base, QSR_OPTIONS.alpha, total=QSR_STEPS,
                      base_lr=DIST_LR)
    expected_syncs = {"localsgd": [3, 6, 9, 12], "qsr": hand, "topk+ef": [3, 6, 9, 12]}
    assert len(set(b - a for a, b in zip([0] + hand, hand))) >= 3, hand  # QSR's period really varies here
    for name, syncs in expected_syncs.items():
        runs = [results[r][name] for r in range(world)]
        for r, res in enumerate(runs):
            assert res["syncs"] == syncs, f"{name} rank {r}: synced after {res['syncs']}, expected {syncs}"
            assert res["bytes"] > 0
        for i, step in enumerate(syncs):
            pre = [res["pre"][i] for res in runs]
            post = [res["post"][i] for res in runs]
            assert not torch.equal(pre[0], pre[1]), f"{name} step {step}: ranks did not train apart"
            for r in range(1, world):
                assert torch.equal(post[0], post[r]), f"{name} step {step}: rank {r} differs from rank 0 after sync"
            if name != "topk+ef":  # uncompressed: exactly parameter averaging
                torch.testing.assert_close(post[0], torch.stack(pre).mean(0), rtol=0, atol=1e-6,
                                           msg=lambda m: f"{name} step {step}: {m}")
