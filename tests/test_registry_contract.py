"""Contract tests over every registry entry: a new compressor, feedback or algorithm is covered
without editing this file (issue 24).

Compressors (every COMPRESSORS entry, default options): the exchange round trip keeps the input's
shape and dtype and gives every rank the same mean; a summable compressor's payloads sum (the
decode of the summed payload is the sum of the decodes); the same seed gives the same bytes; a
state_dict restored into a fresh instance (through ``torch.save``/``weights_only`` loading, as a
checkpoint) continues bit for bit; the compressor's declared wire bytes (the planner's model) are
the payload bytes it really sends; and, with two real processes, the ledger charges exactly those
bytes. Feedback (every FEEDBACK entry, on top-k): state_dict round trip and determinism. A toy
compressor defined here, in one place, passes the same checks and is planned by ``lowband plan``.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.algorithms.commplan import Setup
from lowband.compress import COMPRESSORS, Compressor, Payload, build
from lowband.compress.base import CompressorOptions
from lowband.feedback import FEEDBACK
from lowband.net.link import Link
from lowband.predict.plan import plan_rows
from lowband.train.launch import launch

KEYS = ("w", "b", "v")


def inputs(seed: int) -> dict[str, torch.Tensor]:
    """A matrix, a small vector and a long vector: the shapes compressors treat differently."""
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 48, generator=g), "b": torch.randn(48, generator=g) * 1e-2,
            "v": torch.randn(5000, generator=g)}


def drive(compressors: list[Compressor], xs: list[torch.Tensor], key: str) -> tuple[list[Any], list[int]]:
    """One tensor per rank through every round in lockstep, the collectives done here: summed payloads
    (summable) or every rank's payload (gathered). Returns each rank's (mean, own) and rank 0's bytes
    per round."""
    n = len(compressors)
    steps = [c.exchange(x, key, n) for c, x in zip(compressors, xs)]
    payloads = [next(s) for s in steps]
    rounds: list[int] = []
    while True:
        rounds.append(payloads[0].nbytes)
        if compressors[0].summable:
            summed = [torch.stack([p.tensors[i] for p in payloads]).sum(0) for i in range(len(payloads[0].tensors))]
            replies: list[Any] = [Payload(summed, p.ctx) for p in payloads]
        else:
            replies = [list(payloads)] * n
        results = []
        for s, reply in zip(steps, replies):
            try:
                results.append(s.send(reply))
            except StopIteration as done:
                results.append(done)
        if all(isinstance(r, StopIteration) for r in results):
            return [r.value for r in results], rounds
        assert not any(isinstance(r, StopIteration) for r in results), "ranks stopped after different rounds"
        payloads = results


def fresh(spec: str, rank: int = 0) -> Compressor:
    c = build(spec, COMPRESSORS)
    c.for_rank(rank)
    return c


# ----------------------------------------------------------------------------- the checks
def check_round_trip(spec: str) -> None:
    for n in (1, 2):
        cs = [fresh(spec, r) for r in range(n)]
        xs = [inputs(r) for r in range(n)]
        for key in KEYS:
            results, _ = drive(cs, [x[key] for x in xs], key)
            for mean, own in results:
                assert mean.shape == own.shape == xs[0][key].shape, (spec, key)
                assert mean.dtype == own.dtype == xs[0][key].dtype, (spec, key)
                assert torch.isfinite(mean).all(), (spec, key)
            assert all(torch.equal(results[0][0], m) for m, _ in results), f"{spec}: ranks disagree on {key}"


def check_summable(spec: str) -> None:
    c0, c1 = fresh(spec, 0), fresh(spec, 1)
    _, rounds = drive([fresh(spec)], [inputs(0)["w"]], "w")
    if not c0.summable or len(rounds) > 1:  # gathered, or one summed payload per round (checked by the round trip)
        return
    x0, x1 = inputs(0)["w"], inputs(1)["w"]
    p0, p1 = c0.encode(x0, "w"), c1.encode(x1, "w")
    summed = Payload([a + b for a, b in zip(p0.tensors, p1.tensors)], p0.ctx)
    torch.testing.assert_close(c0.decode(summed).float(), (c0.decode(p0) + c1.decode(p1)).float(),
                               rtol=1e-2, atol=1e-3, msg=lambda m: f"{spec}: decode(sum) != sum of decodes: {m}")


def check_deterministic(spec: str) -> None:
    runs = []
    for _ in range(2):
        c = fresh(spec)
        runs.append([drive([c], [inputs(step)[k]], k) for step in range(2) for k in KEYS])
    for (a, ra), (b, rb) in zip(*runs):
        assert ra == rb and torch.equal(a[0][0], b[0][0]), f"{spec}: two runs from the same seed differ"


def check_state_dict(spec: str) -> None:
    first = fresh(spec)
    for step in range(3):
        for k in KEYS:
            drive([first], [inputs(step)[k]], k)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = fresh(spec)
    second.load_state_dict(torch.load(buffer, weights_only=True))  # what a checkpoint does
    for k in KEYS:
        (a, _), ra = drive([first], [inputs(3)[k]], k)[0][0], drive([first], [inputs(4)[k]], k)[1]
        (b, _), rb = drive([second], [inputs(3)[k]], k)[0][0], drive([second], [inputs(4)[k]], k)[1]
        assert ra == rb and torch.equal(a, b), f"{spec}: a restored state_dict does not continue bit for bit ({k})"


def check_wire_bytes(spec: str, side: int = 64) -> None:
    """The declared model (``wire_bytes``) against the bytes of a real exchange of ``side x side``
    matrices; a data-dependent size is refused with advice or modelled, never silently wrong."""
    cls, options = type(fresh(spec)), fresh(spec).options
    for matrices in (1, 3):
        try:
            declared = cls.wire_bytes(options, matrices * side * side, side)
        except ValueError as err:
            assert not cls.fixed_size and "plan it as" in str(err), f"{spec}: {err}"
            return
        assert declared and all(b >= 0 for b in declared), (spec, declared)
        if not cls.fixed_size:
            continue
        c = fresh(spec)
        measured = [0.0] * len(declared)
        for i in range(matrices):
            _, rounds = drive([c], [torch.randn(side, side, generator=torch.Generator().manual_seed(i))], f"m{i}")
            assert len(rounds) == len(declared), f"{spec}: declares {len(declared)} rounds, sends {len(rounds)}"
            measured = [m + r for m, r in zip(measured, rounds)]
        assert [round(b) for b in declared] == [round(m) for m in measured], \
            f"{spec}: wire_bytes declares {declared} for {matrices} {side}x{side} matrices, the exchange sent {measured}"


CHECKS = (check_round_trip, check_summable, check_deterministic, check_state_dict, check_wire_bytes)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
@pytest.mark.parametrize("spec", COMPRESSORS.names())
def test_compressor_contract(spec: str, check: Any) -> None:
    check(spec)


# ----------------------------------------------------------------------------- feedback
def feedback_steps(name: str, state: dict[str, Any] | None,
                   steps: range) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Top-k through feedback ``name`` for ``steps`` (world of one); (its state after, the outputs)."""
    fb, comp = build(name, FEEDBACK), fresh("topk:ratio=0.1")
    if state is not None:
        fb.load_state_dict(state)
    outs = []
    for step in steps:
        for k in KEYS:
            x = inputs(step)[k]
            compensated = fb.compensate(k, x)
            (mean, own), = drive([comp], [compensated], k)[0]
            fb.update(k, compensated, own)
            outs.append(fb.finalize(k, mean))
    buffer = io.BytesIO()
    torch.save(fb.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True), outs


@pytest.mark.parametrize("name", FEEDBACK.names())
def test_feedback_contract(name: str) -> None:
    whole = feedback_steps(name, None, range(5))[1]
    assert all(torch.equal(a, b) for a, b in zip(whole, feedback_steps(name, None, range(5))[1])), \
        f"{name}: not deterministic"
    state, head = feedback_steps(name, None, range(3))
    _, tail = feedback_steps(name, state, range(3, 5))
    assert all(torch.equal(a, b) for a, b in zip(whole, head + tail)), \
        f"{name}: a restored state_dict does not continue bit for bit"
    for out, step_key in zip(whole, [(s, k) for s in range(5) for k in KEYS]):
        assert out.shape == inputs(0)[step_key[1]].shape and torch.isfinite(out).all(), (name, step_key)


# ----------------------------------------------------------------------------- the ledger, two processes
@record
def _ledger_worker() -> dict[str, tuple[int, int, list[int]]]:
    from lowband.comm import Comm, group
    from lowband.comm.aggregate import Aggregator

    rank, world = group.init_from_env("gloo", timeout_s=60)
    found = {}
    try:
        for spec in COMPRESSORS.names():
            comm = Comm()
            named = [("w", inputs(rank)["w"])]  # one matrix: the aggregator packs small tensors together
            Aggregator(comm, fresh(spec, rank), build("none", FEEDBACK)).mean_(named)
            charged = [r.payload for r in comm.ledger.records if r.tag == "grads"]
            own = sum(next(fresh(spec, rank).exchange(x, k, world)).nbytes for k, x in named)
            sizes = [r.payload for r in comm.ledger.records if r.tag == "grads.sizes"]
            found[spec] = (charged[0], own, sizes)
    finally:
        group.shutdown()
    return found


def test_the_ledger_charges_exactly_the_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    """First round of a mean of one matrix over 2 real ranks: the ledger's bytes are the payload's, plus
    one validity byte per rank where payloads are gathered.
    A variable-size payload (drawn from the data) is padded to the largest rank's, after an exchange
    of the sizes."""
    import os
    from pathlib import Path

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                   os.environ.get("PYTHONPATH")])))
    results = launch(_ledger_worker, 2)
    for spec in COMPRESSORS.names():
        cls = COMPRESSORS.get(spec)
        for rank, found in results.items():
            charged, own, sizes = found[spec]
            flag = 0 if fresh(spec).summable else 1
            if cls.fixed_size:
                assert charged == own + flag, f"{spec} rank {rank}: ledger {charged} B, payload {own} + {flag} B"
                assert not sizes, f"{spec}: a fixed-size payload needs no size exchange"
            else:
                assert sizes and charged > flag, f"{spec} rank {rank}: ledger {charged} B, sizes {sizes}"


# ----------------------------------------------------------------------------- a new compressor, one file
class ToyOptions(CompressorOptions):
    pass


class Toy(Compressor):
    """A compressor as a user would add it (one class): sends every other element, summable."""

    name = "toy"
    summable = True

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.reshape(-1)
        return Payload([flat[::2].contiguous()], ctx=(x.shape, flat.numel()))

    def decode(self, payload: Payload) -> torch.Tensor:
        shape, numel = payload.ctx
        out = torch.zeros(numel, dtype=payload.tensors[0].dtype, device=payload.tensors[0].device)
        out[::2] = payload.tensors[0]
        return out.view(shape)


def test_a_new_compressor_is_covered_and_planned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(COMPRESSORS._items, "toy", Toy)
    for check in CHECKS:
        check("toy")
    setup = Setup(params=10**8, workers=8, link=Link(1.25e8, 0.01), step_time=0.5, steps=100)
    row, = plan_rows(setup, [("ddp", "toy")])
    assert row.sent_bytes == pytest.approx(plan_rows(setup, [("ddp", "fp16")])[0].sent_bytes, rel=1e-6)
    assert math.isfinite(row.wall_seconds)
