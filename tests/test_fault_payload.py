"""LOWBAND_FAULT's payload faults: ``nan:rank=R`` and ``corrupt:rank=R,at=wire`` in ordinary (non-elastic) runs.

The parsing and the transforms are checked in-process; one launch of 3 ranks then trains the tiny
GPT with ddp under each fault and aggregation rule, so the receivers' checks meet a sender that
passed its own guard and still put NaN or flipped bytes on the wire.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.adversity import injection
from lowband.adversity.attacks import ATTACKS, NoAttack
from lowband.adversity.injection import Fault, FaultPlan, PayloadFaults, parse_faults, payload_faults
from lowband.algorithms import ALGORITHMS
from lowband.algorithms.ddp import DDPOptions
from lowband.comm import Comm, guards
from lowband.comm.group import init_from_env, shutdown
from lowband.comm.guards import NonFiniteError
from lowband.compress import build
from lowband.train.launch import launch
from tiny import batch, tiny_gpt

WORLD, BAD, STEPS, FROM = 3, 1, 4, 2
NAN = f"nan:rank={BAD},step={FROM}"
CORRUPT = f"corrupt:rank={BAD},at=wire,step={FROM}"
CASES: dict[str, tuple[str, dict[str, Any]]] = {  # name: (LOWBAND_FAULT, DDPOptions)
    "mean": (NAN, {}),  # fp32 all-reduce: a sum cannot be traced, the run stops naming the sender
    "mean-gathered": (NAN, {"compress": "topk:ratio=1.0"}),  # all-gather: receivers trace and exclude
    "median": (NAN, {"aggregate": "median"}),
    "trimmed-mean": (NAN, {"aggregate": "trimmed-mean:trim=0.25"}),
    "centered-clip": (NAN, {"aggregate": "centered-clip:tau=1.0,iters=3"}),
    "corrupt-checksum": (CORRUPT, {"compress": "topk:ratio=1.0", "checksum": True}),
    "corrupt-checksum-median": (CORRUPT, {"aggregate": "median", "checksum": True}),
    "corrupt-unchecked": (CORRUPT, {"aggregate": "median"}),  # decoded as it is, alike on every rank
}
NAN_EXCLUDED = "grads excluded rank(s) 1 from the round (non-finite values received from them)"
CHECKSUM_EXCLUDED = "grads excluded rank(s) 1 from the round (checksum)"


# -- parsing and the transforms, in-process ---------------------------------------------------
def test_payload_faults_parse_and_leave_the_elastic_forms_alone() -> None:
    assert parse_faults(f"{NAN}; {CORRUPT}; corrupt:rank=2; nan:rank=0,at=wire") == (
        Fault("nan", BAD, FROM, "wire"), Fault("corrupt", BAD, FROM, "wire"), Fault("corrupt", 2),
        Fault("nan", 0, 0, "wire"))
    faults = parse_faults("kill:rank=1,step=3,at=sync;corrupt:rank=1;nan:rank=1")
    assert [f.wire for f in faults] == [False, False, True]


@pytest.mark.parametrize("spec", ["nan:rank=1,at=sync", "nan:step=2", "nan:rank=x", "nan:rank=-1",
                                  "nan:rank=1,stpe=2", "nan:rank=1,seconds=3", "corrupt:rank=1,at=wire,incarnation=1",
                                  "kill:rank=1,at=wire", "flip:rank=1", "nan:rank"])
def test_bad_payload_fault_specs_raise_one_line_naming_the_forms(spec: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_faults(f"kill:rank=0,step=9;{spec}")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"bad LOWBAND_FAULT {spec!r}: use "), message
    assert "nan:rank=R[,step=S]" in message and "corrupt:rank=R,at=wire[,step=S]" in message, message


def test_elastic_plans_ignore_payload_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBAND_FAULT", f"{NAN};{CORRUPT};corrupt:rank={BAD};kill:rank={BAD},step=5")
    assert [(f.kind, f.at) for f in FaultPlan.from_env(BAD, 0).faults] == [("corrupt", "step"), ("kill", "step")]
    monkeypatch.setenv("LOWBAND_FAULT", f"corrupt:rank={BAD};kill:rank={BAD},step=5")
    attack = NoAttack()
    assert payload_faults(attack) is attack  # elastic faults only: the aggregator's attack is untouched


def test_nan_from_its_step_on_after_the_attack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBAND_FAULT", NAN)
    fault = payload_faults(build("signflip:ranks=0", ATTACKS))
    assert isinstance(fault, PayloadFaults) and fault.ranks == {0, BAD}
    x = torch.arange(6, dtype=torch.float32)
    assert torch.equal(fault(x, 0, FROM + 5, "k"), -x)  # the configured attack still applies
    assert torch.equal(fault(x, BAD, FROM - 1, "k"), x)  # before its step: honest
    for step in (FROM, FROM + 3):  # from its step on: every value is NaN
        assert fault(x, BAD, step, "k").isnan().all()
    assert torch.equal(fault(x, 2, FROM, "k"), x)


def test_corrupt_flips_a_sealed_byte_so_the_checksum_fails(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LOWBAND_FAULT", CORRUPT)
    fault = payload_faults(NoAttack())
    payload = torch.arange(1, 9, dtype=torch.uint8)
    assert guards.verify(fault.on_wire(guards.seal(payload, True, True), 8, BAD, FROM - 1), 8, True) is None
    assert guards.verify(fault.on_wire(guards.seal(payload, True, True), 8, 0, FROM), 8, True) is None
    assert guards.verify(fault.on_wire(guards.seal(payload, True, True), 8, BAD, FROM), 8, True) == "checksum"
    assert guards.verify(fault.on_wire(guards.seal(payload, True, False), 8, BAD, FROM), 8, False) is None  # unseen
    comm, model = Comm(), torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger=injection.wire_log.name):  # ddp's summed mean: warned
        algo = ALGORITHMS.get("ddp")(model, torch.optim.SGD(model.parameters(), lr=0.1), comm)
    comm.close()
    assert "does nothing on a summed all-reduce" in caplog.text
    assert isinstance(algo.aggregator.attack, PayloadFaults)  # the algorithm hands the faults to its aggregator


# -- 3 ranks, real training -------------------------------------------------------------------
@record
def faulty_training() -> dict[str, dict[str, Any]]:
    """Per case: the error (step, message) if one stopped it, whether the parameters are finite, their
    sum (every rank must agree) and the guard warnings this rank logged."""
    rank, _ = init_from_env()
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: messages.append(rec.getMessage())  # type: ignore[method-assign]
    guards.log.addHandler(handler)
    injection.wire_log.addHandler(handler)
    try:
        out: dict[str, dict[str, Any]] = {}
        for name, (fault, options) in CASES.items():
            os.environ["LOWBAND_FAULT"] = fault  # read when the aggregator is built
            messages.clear()
            model = tiny_gpt(seed=0)
            comm = Comm()
            algo = ALGORITHMS.get("ddp")(model, torch.optim.AdamW(model.parameters(), lr=1e-2), comm,
                                         DDPOptions(**options))
            error = None
            for step in range(STEPS):
                comm.ledger.step = step
                model(*batch(rank, step))[1].backward()
                try:
                    algo.step()
                except NonFiniteError as err:
                    error = (step, str(err))
                    break
                algo.zero_grad()
            algo.finish()
            comm.close()
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            out[name] = {"error": error, "finite": bool(torch.isfinite(flat).all()), "sum": float(flat.double().sum()),
                         "log": list(messages)}
        return out
    finally:
        os.environ.pop("LOWBAND_FAULT", None)
        shutdown()


@pytest.fixture(scope="module")
def runs() -> dict[int, dict[str, dict[str, Any]]]:
    return launch(faulty_training, WORLD)


def excluded_at(log: list[str], rank: int, what: str) -> list[int]:
    """The steps at which ``rank`` logged that it excluded the faulty sender for ``what``."""
    return [step for step in range(STEPS) if f"rank {rank} step {step}: {what}" in log]


def test_a_nan_sender_stops_a_summed_mean_which_names_it(runs: dict[int, dict[str, dict[str, Any]]]) -> None:
    for r in range(WORLD):
        step, message = runs[r]["mean"]["error"]
        assert step == FROM and message.startswith(f"grads: rank(s) {BAD} sent non-finite values after their guard"), \
            (r, step, message)
        assert "use a robust --aggregate" in message
    said = f"rank {BAD} step {FROM}: fault injection: NaN on every payload it sends from now on"
    assert said in runs[BAD]["mean"]["log"]


@pytest.mark.parametrize("case", ["mean-gathered", "median", "trimmed-mean", "centered-clip"])
def test_receivers_name_and_exclude_a_nan_sender_and_training_goes_on(
        runs: dict[int, dict[str, dict[str, Any]]], case: str) -> None:
    for r in range(WORLD):
        result = runs[r][case]
        assert result["error"] is None and result["finite"], (r, case, result)
        assert excluded_at(result["log"], r, NAN_EXCLUDED) == list(range(FROM, STEPS)), (r, case, result["log"])
    assert len({runs[r][case]["sum"] for r in range(WORLD)}) == 1, case  # every rank holds the same model


@pytest.mark.parametrize("case", ["corrupt-checksum", "corrupt-checksum-median"])
def test_checksums_catch_a_corrupted_sender_on_every_rank(runs: dict[int, dict[str, dict[str, Any]]],
                                                          case: str) -> None:
    for r in range(WORLD):  # the sender's own copy is the flipped one too: it excludes itself alike
        result = runs[r][case]
        assert result["error"] is None and result["finite"], (r, case, result)
        assert excluded_at(result["log"], r, CHECKSUM_EXCLUDED) == list(range(FROM, STEPS)), (r, case, result["log"])
    assert len({runs[r][case]["sum"] for r in range(WORLD)}) == 1, case


def test_without_checksums_flipped_bytes_go_unseen_but_alike(runs: dict[int, dict[str, dict[str, Any]]]) -> None:
    for r in range(WORLD):
        result = runs[r]["corrupt-unchecked"]
        assert result["error"] is None and result["finite"], (r, result)
        assert not any("excluded" in m for m in result["log"]), (r, result["log"])
    assert len({runs[r]["corrupt-unchecked"]["sum"] for r in range(WORLD)}) == 1
    assert not math.isnan(runs[0]["corrupt-unchecked"]["sum"])
