"""A membership composes with every algorithm through its synchronisation points (issue 24):
``Algorithm.attach`` routes after_step, sync_point and finish through the membership, nothing of the
algorithm is replaced, and a pass-through membership changes no result. One process, a world of one."""

from __future__ import annotations

import inspect

import pytest
import torch

from lowband.algorithms import ALGORITHMS, Algorithm
from tiny import batch, flat, one_step
from test_algorithm_contract import STEPS, build


class PassThrough:
    """A membership that decides nothing: it records each point and runs the algorithm's own."""

    def __init__(self, algo: Algorithm) -> None:
        self.algo, self.calls = algo, []
        algo.attach(self)

    def after_step(self) -> None:
        self.calls.append("after_step")
        self.algo.after_step()

    def synchronise(self) -> None:
        self.calls.append("synchronise")
        self.algo.synchronise()

    def finish(self) -> None:
        self.calls.append("finish")
        self.algo.end_training()


def _run(name: str, attach: bool) -> tuple[torch.Tensor, PassThrough | None, Algorithm]:
    model, algo = build(name)
    membership = PassThrough(algo) if attach else None
    for step in range(STEPS):
        algo.comm.ledger.step = step
        one_step(model, algo, *batch(0, step))
    algo.finish()
    return flat(model.parameters()), membership, algo


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_a_pass_through_membership_sees_every_point_and_changes_nothing(name: str) -> None:
    plain, _, _ = _run(name, attach=False)
    routed, membership, algo = _run(name, attach=True)
    assert torch.equal(plain, routed), name
    assert membership is not None
    assert membership.calls.count("after_step") == STEPS and membership.calls[-1] == "finish", membership.calls
    methods = {n for n, _ in inspect.getmembers(type(algo), inspect.isfunction)}
    assert not methods & set(vars(algo)), f"{name}: an instance attribute shadows a method"


def test_diloco_reaches_the_membership_at_every_outer_step() -> None:
    _, membership, _ = _run("diloco", attach=True)  # inner_steps=2 (build): an outer step every 2 steps
    assert membership is not None and membership.calls.count("synchronise") == STEPS // 2
