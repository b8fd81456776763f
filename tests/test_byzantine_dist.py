"""Byzantine workers in real multi-process training: 2 of 8 sending scaled updates, 1 of 4 flipping labels.

Each test trains the tiny GPT with ddp on learnable sequences (``test_robust.sequence_batch``)
from the same seed, once clean and once per aggregation rule under attack, and compares the
held-out loss every rank reaches (ranks must stay identical).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.adversity.poison import poisoner
from lowband.algorithms import ALGORITHMS
from lowband.algorithms.ddp import DDPOptions
from lowband.comm import Comm
from lowband.comm.group import init_from_env, shutdown
from lowband.train.launch import launch
from test_robust import sequence_batch
from tiny import VOCAB, tiny_gpt

SCALED = "scale:ranks=0+5,factor=-10"  # 2 of 8 send -10 x their gradient
SCALED_RUNS = {"clean": {}, "mean": {"attack": SCALED},
               "centered-clip": {"attack": SCALED, "aggregate": "centered-clip:tau=1.0,iters=3"},
               "trimmed-mean": {"attack": SCALED, "aggregate": "trimmed-mean:trim=0.25"}}
FLIPPED = "labelflip:ranks=2"  # 1 of 4 trains on 16 - y
FLIPPED_RUNS = {"clean": {}, "mean": {"attack": FLIPPED},
                "centered-clip": {"attack": FLIPPED, "aggregate": "centered-clip:tau=1.0,iters=3"},
                "median": {"attack": FLIPPED, "aggregate": "median"}}


@record
def attacked_training(runs: dict[str, dict[str, Any]], steps: int) -> dict[str, float]:
    """Per run: the final held-out loss (the same model on every rank)."""
    rank, _ = init_from_env()
    try:
        held_out = [sequence_batch(99, 10_000 + i) for i in range(4)]
        out = {}
        for name, options in runs.items():
            model = tiny_gpt(seed=0)
            comm = Comm()
            opts = DDPOptions(**options)
            poison = poisoner(opts.attack, rank, VOCAB)
            algo = ALGORITHMS.get("ddp")(model, torch.optim.AdamW(model.parameters(), lr=1e-2), comm, opts)
            for step in range(steps):
                comm.ledger.step = step
                x, y = sequence_batch(rank, step)
                model(x, poison(y))[1].backward()
                algo.step()
                algo.zero_grad()
            algo.finish()
            comm.close()
            with torch.no_grad():
                out[name] = sum(float(model(x, y)[1]) for x, y in held_out) / len(held_out)
        return out
    finally:
        shutdown()


def losses(world: int, runs: dict[str, dict[str, Any]], steps: int) -> dict[str, float]:
    results = launch(attacked_training, world, runs, steps)
    for name in runs:
        assert len({results[r][name] for r in range(world)}) == 1, name  # ranks stay identical
    print(world, results[0])
    return results[0]


@pytest.mark.slow  # 8 processes: about 2 minutes on this 2-core machine under load
def test_two_byzantine_of_eight_wreck_the_mean_but_not_centered_clip_or_trimmed_mean() -> None:
    loss = losses(8, SCALED_RUNS, 25)
    # Measured (25 steps): clean 0.775, mean 12.66, centered-clip 0.840, trimmed-mean 0.866.
    assert loss["clean"] < np.log(VOCAB) - 1.5, loss  # the clean run learns
    assert loss["mean"] > loss["clean"] + 5.0, loss
    for name in ["centered-clip", "trimmed-mean"]:
        assert loss[name] < loss["clean"] + 0.25, (name, loss)


@pytest.mark.slow  # about 1 minute on this 2-core machine under load
def test_one_label_flipper_of_four() -> None:
    loss = losses(4, FLIPPED_RUNS, 25)
    # Measured (25 steps): clean 0.819, mean 1.127, centered-clip 0.963, median 0.961.
    assert loss["clean"] < np.log(VOCAB) - 1.5, loss
    assert loss["mean"] > loss["clean"] + 0.2, loss  # the flipper's honest-looking updates degrade the mean
    for name in ["centered-clip", "median"]:
        assert loss[name] < loss["mean"] - 0.1, (name, loss)  # robust rules remove most of the damage
        assert loss[name] < loss["clean"] + 0.25, (name, loss)
