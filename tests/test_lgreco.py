"""Tests of ``lgreco``: the knapsack against brute force, identical choices on 2 and 4 gloo
ranks (summed and gathered families), fewer bytes than the uniform default, bit-identical
resume across a pending measurement, metrics, and option validation."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.algorithms.base import Algorithm
from lowband.algorithms.ddp import DDP, DDPOptions
from lowband.comm import Comm
from lowband.comm.group import init_from_env, shutdown
from lowband.compress import COMPRESSORS, build
from lowband.compress.knapsack import Candidate, assign, discretise, solve, total
from lowband.compress.lgreco import LGreCo
from lowband.report.render import write_report
from lowband.train.launch import launch
from lowband.train.models.gpt import GPT
from test_report import make_run
from tiny import tiny_gpt, train

# ----------------------------------------------------------------------------- the knapsack


def brute(layers: list[list[Candidate]], fits: Any) -> Optional[int]:
    """The fewest total bytes over every assignment ``fits`` accepts (None if none does)."""
    best = None
    for picked in itertools.product(*(range(len(cs)) for cs in layers)):
        if fits(picked):
            nbytes = total(layers, picked).nbytes
            best = nbytes if best is None else min(best, nbytes)
    return best


def random_case(rng: random.Random) -> tuple[list[list[Candidate]], list[int]]:
    """3-5 layers of 2-4 candidates; more bytes usually means less error, as for real compressors."""
    layers = []
    for _ in range(rng.randint(3, 5)):
        cands = sorted((rng.randint(1, 1000), rng.uniform(0, 10) ** 2) for _ in range(rng.randint(2, 4)))
        layers.append([Candidate(b, e) for b, e in cands])
    return layers, [rng.randrange(len(cs)) for cs in layers]


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_equals_brute_force_and_respects_the_budget(seed: int) -> None:
    rng = random.Random(seed)
    layers, default = random_case(rng)
    budget, levels = total(layers, default).error, rng.choice([7, 50, 1000])
    weights = discretise(layers, budget, levels)
    picked = solve(layers, budget, levels)
    discrete_best = brute(layers, lambda p: sum(weights[l][i] for l, i in enumerate(p)) <= levels)
    if discrete_best is None:
        assert picked is None
    else:  # optimal for the discretised errors, feasible for the true ones
        assert picked is not None and total(layers, picked).nbytes == discrete_best
        assert total(layers, picked).error <= budget * (1 + 1e-12)
    chosen = assign(layers, default, levels)
    got = total(layers, chosen)
    assert got.error <= budget * (1 + 1e-12), "the budget is the default's error: never exceeded"
    assert got.nbytes <= total(layers, default).nbytes
    # sandwich: no feasible assignment is cheaper; rounding up loses at most len(layers) units of budget
    assert got.nbytes >= brute(layers, lambda p: total(layers, p).error <= budget)  # type: ignore[operator]
    slack = budget - len(layers) * budget / levels
    tighter = brute(layers, lambda p: total(layers, p).error <= slack)
    assert tighter is None or got.nbytes <= tighter


def test_knapsack_picks_cheap_layers_and_keeps_ties_at_the_default() -> None:
    # layer 0 loses little by dropping to 10 bytes, layer 1 gains much for 70 more: trade
    layers = [[Candidate(10, 1.0), Candidate(100, 0.9)], [Candidate(10, 2.0), Candidate(30, 1.0), Candidate(100, 0.0)],
              [Candidate(40, 0.0), Candidate(40, 0.0)]]
    assert assign(layers, [1, 1, 1]) == [0, 2, 1], "layer 2's settings cost the same: it keeps the default"
    assert total(layers, [0, 2, 1]) == (150, 1.0) and total(layers, [1, 1, 1]) == (170, 1.9)
    assert assign(layers, [0, 0, 0]) == [0, 0, 0], "nothing cheaper than the cheapest"
    assert solve([[Candidate(1, 1.0)]], 0.0, 10) is None, "zero budget, positive error: infeasible"
    with pytest.raises(ValueError, match="levels must be >= 1"):
        solve(layers, 1.0, 0)


# ----------------------------------------------------------------------------- options


def test_registered_with_family_defaults() -> None:
    c = build("lgreco:family=topk,every=5,warmup=0", COMPRESSORS)
    assert isinstance(c, LGreCo) and not c.summable and c.default == 0.01
    assert c.settings == (0.001, 0.003, 0.01, 0.03)
    p = build("lgreco:choices=8+2+4,default=4", COMPRESSORS)
    assert p.summable and p.settings == (2, 4, 8) and p.options.spec(2) == "powersgd:rank=2"
    assert build("lgreco:family=qsgd", COMPRESSORS).settings == (2, 4, 8)


@pytest.mark.parametrize(("spec", "message"), [
    ("lgreco:family=sign", r"^lgreco:family: unknown lgreco family 'sign'; choose one of: powersgd, qsgd, topk$"),
    ("lgreco:choices=1+x", r"^lgreco:choices must be numbers joined by '\+' \(e\.g\. choices=1\+2\+4\+8\)"),
    ("lgreco:choices=1+2.5", r"^lgreco:choices for powersgd are integers \(rank\)"),
    ("lgreco:choices=2+2+4", r"^lgreco:choices lists a setting twice"),
    ("lgreco:choices=1+2,default=4", r"^lgreco:default=4 is not one of choices 1\+2; add it to choices"),
    ("lgreco:family=qsgd,choices=3+4", r"^lgreco:choices for qsgd set bits: qsgd:bits must be one of 2, 4, 8"),
    ("lgreco:family=topk,choices=0.5+2,default=0.5", r"^lgreco:choices for topk set ratio: ratio must be in"),
    ("lgreco:every=0", r"^lgreco:every must be an integer >= 1, got 0$"),
    ("lgreco:warmup=-1", r"^lgreco:warmup must be an integer >= 0"),
    ("lgreco:levels=0", r"^lgreco:levels must be an integer >= 1"),
    ("lgreco:measure=exact", r"^lgreco:measure must be one of max, raw, got 'exact'$"),
])
def test_option_errors_name_the_fix(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(spec, COMPRESSORS)


# ----------------------------------------------------------------------------- one process


def ddp(comm: Comm, spec: str, seed: int = 0) -> tuple[GPT, DDP]:
    model = tiny_gpt(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, DDP(model, opt, comm, DDPOptions(compress=spec, feedback="ef", small_numel=0))


@pytest.mark.parametrize("spec", ["lgreco:warmup=2,every=3", "lgreco:family=qsgd,warmup=2,every=3",
                                  "lgreco:family=topk,warmup=2,every=3,measure=raw"])
def test_resume_across_a_pending_measurement_is_bit_identical(spec: str) -> None:
    steps = 9  # measured at exchanges 2, 5, 8; decided at 3, 6: stop at 3, with a measurement pending
    model, algo = ddp(Comm(), spec)
    history = train(model, algo, range(steps))
    m2, a2 = ddp(Comm(), spec)
    train(m2, a2, range(3))
    assert a2.aggregator.compressor.pending, "the checkpoint must fall between measuring and deciding"
    saved = copy.deepcopy({"model": m2.state_dict(), "opt": a2.optimizer.state_dict(), "algo": a2.state_dict()})
    m3, a3 = ddp(Comm(), spec, seed=5)
    m3.load_state_dict(saved["model"])
    a3.optimizer.load_state_dict(saved["opt"])
    a3.load_state_dict(saved["algo"])
    assert torch.equal(train(m3, a3, range(3, steps))[-1], history[-1])
    c3, c1 = a3.aggregator.compressor, algo.aggregator.compressor
    assert c3.history == c1.history and len(c1.history) == 2
    assert c1.assignment != {k: c1.default for k in c1.assignment}, "the knapsack moved no layer"


def test_metrics_reach_the_row_and_history_records_every_decision() -> None:
    model, algo = ddp(Comm(), "lgreco:warmup=1,every=2")
    assert algo.metrics() == {}, "nothing before the first decision"
    train(model, algo, range(6))
    row = algo.metrics()
    c = algo.aggregator.compressor
    assert row["lgreco_decisions"] == len(c.history) == 2  # measured at 1, 3, 5; decided at 2, 4
    assert row["lgreco_choices"] == c.assignment and set(row["lgreco_choices"]) == {n for n, _ in algo.named_params}
    assert 0 < row["lgreco_bytes_ratio"] < 1 and 1 <= row["lgreco_mean_setting"] <= 8
    assert [count for count, _ in c.history] == [2, 4]


def test_base_algorithm_metrics_default_is_empty() -> None:
    assert Algorithm(tiny_gpt(0), torch.optim.SGD(tiny_gpt(0).parameters(), lr=0.1), Comm()).metrics() == {}


# ----------------------------------------------------------------------------- 2 and 4 ranks

SPECS = {2: ["lgreco:choices=1+2+4+8,default=4,warmup=2,every=8", "powersgd:rank=4"],
         4: ["lgreco:family=topk,warmup=1,every=3", "lgreco:family=qsgd,warmup=1,every=3,measure=raw",
             "lgreco:warmup=1,every=3,measure=raw"]}
STEPS = {2: 14, 4: 7}


@record
def ranks_run(world: int) -> dict[str, Any]:
    """Per spec: bytes sent, every step's parameters, the assignment history."""
    rank, _ = init_from_env()
    try:
        out: dict[str, Any] = {}
        for spec in SPECS[world]:
            comm = Comm()
            model, algo = ddp(comm, spec, seed=rank + 1)  # the broadcast equalises the init
            start = comm.ledger.bytes_sent  # the initial broadcast is not compression's
            history = train(model, algo, range(STEPS[world]), rank)
            compressor = algo.aggregator.compressor
            out[spec] = {"bytes": comm.ledger.bytes_sent - start, "params": history,
                         "choices": getattr(compressor, "history", None)}
            comm.close()
        return out
    finally:
        shutdown()


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_chooses_alike_and_stays_identical(world: int) -> None:
    results = launch(ranks_run, world, world)
    for spec in SPECS[world]:
        ref = results[0][spec]
        for rank in range(1, world):
            got = results[rank][spec]
            assert got["choices"] == ref["choices"], f"{spec}: rank {rank} chose differently"
            for step, (a, b) in enumerate(zip(got["params"], ref["params"])):
                assert torch.equal(a, b), f"{spec}: rank {rank} differs after step {step + 1}"
        if spec.startswith("lgreco"):
            assert ref["choices"], f"{spec}: no decision was made"
            last = ref["choices"][-1][1]
            assert len(set(last.values())) > 1, f"{spec}: every layer got the same setting"
            assert not torch.equal(ref["params"][-1], ref["params"][0]), "training stopped"
    if world == 2:  # one max-rank measurement, then the knapsack's setting: fewer bytes than uniform rank 4
        lgreco, uniform = (results[0][s]["bytes"] for s in SPECS[2])
        assert lgreco < 0.9 * uniform, f"lgreco sent {lgreco} bytes, uniform rank 4 {uniform}"
        assert math.isfinite(lgreco)


# ----------------------------------------------------------------------------- the report


def test_report_shows_per_layer_choices_when_logged(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    write_report(run_dir)
    assert not (run_dir / "layer_choices.md").exists() and "Per-layer" not in (run_dir / "report.html").read_text()
    log = run_dir / "diloco" / "rank0.jsonl"  # as lgreco logs them: on evaluation steps, through metrics()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    plan = {5: {"a.weight": 4, "b.weight": 4}, 10: {"a.weight": 2, "b.weight": 8}, 15: {"a.weight": 2, "b.weight": 8}}
    for r in records:
        if r["step"] in plan:
            r.update(lgreco_choices=plan[r["step"]], lgreco_bytes_ratio=0.5 + r["step"] / 100)
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    page = write_report(run_dir).read_text()
    assert "Per-layer compression settings over time: diloco" in page
    table = (run_dir / "layer_choices.md").read_text()
    assert "| layer | step 5 | step 10 |" in table, "a column per change, not per logged step"
    assert "| a.weight | 4 | 2 |" in table and "| b.weight | 4 | 8 |" in table
    assert "| bytes vs default | 0.55 | 0.60 |" in table
