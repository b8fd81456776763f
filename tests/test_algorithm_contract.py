"""The algorithm contract over every ALGORITHMS entry, on two real ranks (issue 24): a new algorithm is
covered without editing this file.

For each registered algorithm (defaults, with a period of 2 where it has ``inner_steps`` so that
outer steps happen in a short run): training 6 steps straight and training 3, saving
``algo.state_dict()`` (first: it lands averages in flight), the model and the inner optimizer through
``torch.save``/``weights_only`` loading (what a checkpoint does), building fresh objects, loading them
and training 3 more give bit-identical parameters on every rank (unless the algorithm declares
itself timing-dependent, ``deterministic = False``: ddp-backup drops whoever is ready last), and the
same bytes sent.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.algorithms import ALGORITHMS, Algorithm
from lowband.comm import Comm, group
from lowband.train.launch import launch
from tiny import batch, flat, one_step, tiny_gpt

STEPS, CUT = 6, 3


def build(name: str) -> tuple[torch.nn.Module, Algorithm]:
    model = tiny_gpt()
    cls = ALGORITHMS.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    options = cls.Options(**({"inner_steps": 2} if "inner_steps" in fields else {}))
    return model, cls(model, torch.optim.AdamW(model.parameters(), lr=1e-2), Comm(), options)


def train(model: torch.nn.Module, algo: Algorithm, steps: range, rank: int) -> None:
    for step in steps:
        algo.comm.ledger.step = step
        one_step(model, algo, *batch(rank, step))
        if step == STEPS - 1:
            algo.finish()


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@record
def _worker() -> dict[str, Any]:
    rank, _ = group.init_from_env("gloo", timeout_s=120)
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    try:
        for name in ALGORITHMS.names():
            try:
                model, algo = build(name)
                train(model, algo, range(STEPS), rank)
                straight, straight_bytes = flat(model.parameters()), algo.comm.ledger.bytes_sent
                model, algo = build(name)
                train(model, algo, range(CUT), rank)
                saved = roundtrip({"algorithm": algo.state_dict(), "model": model.state_dict(),
                                   "optimizer": algo.optimizer.state_dict(), "ledger": algo.comm.ledger.state_dict()})
                model, algo = build(name)
                algo.load_state_dict(saved["algorithm"])
                model.load_state_dict(saved["model"])
                algo.optimizer.load_state_dict(saved["optimizer"])
                algo.comm.ledger.load_state_dict(saved["ledger"])
                train(model, algo, range(CUT, STEPS), rank)
                out[name] = (torch.equal(straight, flat(model.parameters())), straight_bytes,
                             algo.comm.ledger.bytes_sent)
            except Exception as err:  # one algorithm's failure is reported by name, the others still run
                out[name] = f"{type(err).__name__}: {err}"
                group.barrier()
    finally:
        group.shutdown()
    return out


def test_every_algorithm_resumes_bit_for_bit_on_two_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    results = launch(_worker, 2)
    problems = []
    for name in ALGORITHMS.names():
        for rank, found in results.items():
            if isinstance(found[name], str):
                problems.append(f"{name} rank {rank}: {found[name]}")
                continue
            equal, straight_bytes, resumed_bytes = found[name]
            if not equal and ALGORITHMS.get(name).deterministic:
                problems.append(f"{name} rank {rank}: resumed parameters differ from a straight run")
            if straight_bytes != resumed_bytes or straight_bytes == 0:
                problems.append(f"{name} rank {rank}: bytes sent {straight_bytes} straight, {resumed_bytes} resumed")
    assert not problems, "\n".join(problems)
