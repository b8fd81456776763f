"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest

EVERY_STEPS = 8
"""Steps of :func:`every_algorithm_run` (H = 4: two rounds; evaluations at 4 and 8)."""


@pytest.fixture(scope="session")
def every_algorithm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny real run of every registered algorithm side by side through the CLI: 2 workers, 8 steps,
    H = 4, an evaluation every 4 steps, over an emulated 1 Gbit/s + 1 ms link (so every ledger op has a
    modelled cost). Used by the CLI end-to-end test and by plan-vs-simulate (about 20 s on 2 cores once)."""
    from lowband.algorithms import ALGORITHMS
    from lowband.cli import main as cli_main

    out = tmp_path_factory.mktemp("every")
    assert cli_main(["train", "--out", str(out), "--name", "all", "--no-progress", "--workers", "2",
                     "--steps", str(EVERY_STEPS), "-H", "4", "--eval-every", "4", "--eval-batches", "1",
                     "--batch-size", "4", "--bandwidth", "1gbit", "--latency", "1ms",
                     "--algo", ",".join(ALGORITHMS.names())]) == 0
    return out / "all"
