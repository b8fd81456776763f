"""Guards: a non-finite contribution is excluded, a corrupted payload is detected and excluded."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.adversity.attacks import ATTACKS
from lowband.comm import Comm
from lowband.comm import guards
from lowband.comm.aggregate import Aggregator
from lowband.comm.group import init_from_env, shutdown
from lowband.comm.robust import RULES
from lowband.compress import COMPRESSORS, build
from lowband.feedback import FEEDBACK
from lowband.train.launch import launch

WORLD, BAD = 4, 2


def contribution(rank: int, call: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 * call + rank)
    return [("w", torch.randn(50, 40, generator=g)), ("b", torch.randn(40, generator=g))]


def exact_mean(ranks: list[int], call: int) -> list[torch.Tensor]:
    return [torch.stack([contribution(r, call)[i][1].double() for r in ranks]).mean(0) for i in range(2)]


def test_seal_and_verify_round_trip_and_detect_a_flipped_byte() -> None:
    payload = torch.arange(37, dtype=torch.uint8)
    sealed = guards.seal(payload, True, checksum=True)
    assert sealed.numel() == 37 + 5
    assert guards.verify(sealed, 37, checksum=True) is None
    flipped = sealed.clone()
    flipped[3] ^= 1
    assert guards.verify(flipped, 37, checksum=True) == "checksum"
    assert guards.verify(guards.seal(payload, False, checksum=False), 37, checksum=False) == "non-finite"


def test_corrupt_next_hits_the_chosen_receivers_once() -> None:
    guards.corrupt_next(1, receivers=[0])
    bufs = [torch.zeros(4, dtype=torch.uint8) for _ in range(3)]
    guards.apply_corruptions(bufs, 4, receiver=0)
    assert [int(b[0]) for b in bufs] == [0, 255, 0]
    again = [torch.zeros(4, dtype=torch.uint8) for _ in range(3)]
    guards.apply_corruptions(again, 4, receiver=0)
    assert all(int(b.sum()) == 0 for b in again)


def test_checksum_on_a_summed_mean_is_refused() -> None:
    with pytest.raises(ValueError, match="checksum needs the all-gather path"):
        Aggregator(Comm(), build("identity", COMPRESSORS), build("none", FEEDBACK), checksum=True)


@record
def guarded(case: str) -> dict[str, object]:
    """Per case: max |result - mean of the valid ranks| (fp64), the result's sum (ranks must agree),
    and the ledger tags of this rank."""
    rank, world = init_from_env()
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    guards.log.addHandler(handler)
    try:
        setups = {
            "nan-summed": ("identity", "mean", False),
            "nan-topk": ("topk:ratio=1.0", "mean", False),
            "nan-median": ("identity", "median", False),
            "corrupt-topk": ("topk:ratio=1.0", "mean", True),
            "corrupt-median": ("identity", "median", True),
            "clean-summed": ("identity", "mean", False),
            # a rank that passes its own guard, then sends NaN (a fault after it, or a Byzantine sender):
            # receivers check what they got
            "attack-median": ("identity", "median", False),
            "attack-topk": ("topk:ratio=1.0", "mean", False),
            "attack-trimmed": ("qsgd:bits=8", "trimmed-mean", False),
        }
        out: dict[str, object] = {}
        for call, (name, (compress, rule, checksum)) in enumerate(setups.items()):
            comm = Comm()
            comm.ledger.step = 7 + call
            attack = build(f"scale:ranks={BAD},factor=nan", ATTACKS) if name.startswith("attack") else None
            agg = Aggregator(comm, build(compress, COMPRESSORS), build("none", FEEDBACK), small_numel=100,
                             rule=build(rule, RULES), checksum=checksum, attack=attack)
            named = contribution(rank, call)
            if name.startswith("nan") and rank == BAD:
                named[0][1][3, 3] = float("nan")
            if name.startswith("corrupt"):
                guards.corrupt_next(BAD, receivers=[0])  # only rank 0 sees it: the agreement must spread it
            agg.mean_(named)
            valid = list(range(world)) if name.startswith("clean") else [r for r in range(world) if r != BAD]
            ref = exact_mean(valid, call) if rule != "median" else [
                torch.stack([contribution(r, call)[i][1].double() for r in valid]).median(0).values for i in range(2)]
            if compress.startswith("qsgd"):  # quantised: within QSGD's error, not exact
                err = 0.0 if all(torch.isfinite(t).all() for _, t in named) else float("inf")
            else:
                err = max(float((t.double() - e).abs().max()) for (_, t), e in zip(named, ref))
            out[name] = (err, float(sum(t.double().sum() for _, t in named)),
                         sorted({rec.tag for rec in comm.ledger.records}))
            agg.close()
            comm.close()
        comm = Comm()  # the mean of a sum cannot exclude a NaN sender: it stops, naming it
        agg = Aggregator(comm, build("identity", COMPRESSORS), build("none", FEEDBACK), small_numel=100,
                         attack=build(f"scale:ranks={BAD},factor=nan", ATTACKS))
        try:
            agg.mean_(contribution(rank, 99))
            out["summed-attack"] = "no error"
        except guards.NonFiniteError as err:
            out["summed-attack"] = str(err)
        agg.close()
        comm.close()
        out["log"] = messages
        return out
    finally:
        shutdown()


def test_nan_and_corrupted_contributions_are_excluded_on_four_ranks() -> None:
    results = launch(guarded, WORLD, "all")
    for name in [n for n in results[0] if n not in ("log", "summed-attack")]:
        errs = [results[r][name][0] for r in range(WORLD)]
        sums = {results[r][name][1] for r in range(WORLD)}
        assert max(errs) < 1e-6, (name, errs)  # mean (or median) of the 3 others, exactly
        assert len(sums) == 1, (name, sums)  # every rank holds the same result
    tags = results[0]
    assert tags["clean-summed"][2] == ["grads"]  # healthy rounds cost nothing extra
    assert tags["nan-summed"][2] == ["grads", "grads.valid"]  # a fault costs one flag all-reduce + a redo
    assert tags["nan-topk"][2] == ["grads"]  # the flag byte travels in the gathered buffer
    assert tags["corrupt-topk"][2] == ["grads", "grads.valid"]  # checksum: the agreement all-reduce
    own = [m for m in results[BAD]["log"] if "w holds 1 non-finite values of 2000" in m]
    assert own[0].startswith(f"rank {BAD} step 7: grads w holds") and len(own) == 3  # nan-summed/topk/median
    others = results[1]["log"]
    assert f"rank 1 step 7: grads excluded rank(s) {BAD} from the round (non-finite)" in others
    assert f"rank 1 step 10: grads excluded rank(s) {BAD} from the round (checksum seen by another rank)" in others
    assert f"rank 0 step 10: grads excluded rank(s) {BAD} from the round (checksum)" in results[0]["log"]
    for step in (13, 14, 15):  # attack-median, attack-topk, attack-trimmed: named by every receiver
        assert (f"rank 1 step {step}: grads excluded rank(s) {BAD} from the round (non-finite values received "
                "from them)") in others, step
    for r in range(WORLD):
        assert results[r]["summed-attack"].startswith(f"grads: rank(s) {BAD} sent non-finite values after their "
                                                      "guard"), results[r]["summed-attack"]
