"""lowband.compress.select.parallel: the NumPy paths' threads (issue 26). Every task runs once, whichever
thread claims it; an error comes back to the caller after the others finish; a nested call runs inline."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lowband.compress import select
from lowband.compress.select import CHUNK, chunked, parallel


@pytest.fixture()
def two_threads() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads")
def test_every_task_runs_once_and_the_call_waits_for_all() -> None:
    runs = np.zeros(64, dtype=np.int64)
    seen: set[str] = set()

    def task(j: int) -> None:
        seen.add(threading.current_thread().name)
        np.add(runs[j:j + 1], 1, out=runs[j:j + 1])

    for _ in range(20):  # each call claims anew (a helper that wakes late finds nothing left)
        parallel(len(runs), task, numel=select.PARALLEL_MIN_NUMEL)
    assert runs.tolist() == [20] * 64
    assert threading.current_thread().name in seen  # the caller works too, never only waits


@pytest.mark.usefixtures("two_threads")
def test_below_the_size_floor_all_tasks_run_in_the_calling_thread() -> None:
    names: list[str] = []
    parallel(8, lambda j: names.append(threading.current_thread().name), numel=select.PARALLEL_MIN_NUMEL - 1)
    assert names == [threading.current_thread().name] * 8


@pytest.mark.usefixtures("two_threads")
def test_a_task_error_reaches_the_caller_after_the_other_tasks() -> None:
    done = np.zeros(16, dtype=bool)

    def task(j: int) -> None:
        if j == 3:
            raise ValueError("task 3 failed")
        done[j] = True

    with pytest.raises(ValueError, match="task 3 failed"):
        parallel(len(done), task, numel=select.PARALLEL_MIN_NUMEL)
    assert done.sum() == 15  # the others ran to the end before the error was raised


@pytest.mark.usefixtures("two_threads")
def test_a_nested_call_runs_inline_and_does_not_deadlock() -> None:
    n = 3 * CHUNK + 5
    out = np.zeros((4, n), dtype=np.int64)

    def task(j: int) -> None:  # each task runs a chunked loop of its own, as a compressor's body may
        chunked(n, lambda lo, hi: out[j, lo:hi].__iadd__(1))

    parallel(len(out), task, numel=select.PARALLEL_MIN_NUMEL)
    assert (out == 1).all()


@pytest.mark.usefixtures("two_threads")
def test_chunked_covers_every_element_once() -> None:
    n = select.PARALLEL_MIN_NUMEL + 3 * CHUNK + 11
    hits = np.zeros(n, dtype=np.int8)
    chunked(n, lambda lo, hi: hits[lo:hi].__iadd__(1))
    assert (hits == 1).all()


@pytest.mark.usefixtures("two_threads")
def test_in_order_turns_follow_the_task_order_whichever_thread_runs_a_task() -> None:
    order, turns = select.InOrder(), []

    def task(j: int) -> None:
        with order.turn(j):
            turns.append(j)  # (a serial generator's draw)
        if j % 3 == 0:
            threading.Event().wait(0.002)  # uneven work after the turn

    parallel(40, task, numel=1 << 30)
    assert turns == list(range(40))


@pytest.mark.usefixtures("two_threads")
def test_an_error_in_a_turn_lets_the_later_turns_go_on() -> None:
    order, turns = select.InOrder(), []

    def task(j: int) -> None:
        with order.turn(j):
            if j == 5:
                raise RuntimeError("draw failed")
            turns.append(j)

    with pytest.raises(RuntimeError, match="draw failed"):
        parallel(12, task, numel=1 << 30)
    assert turns == [j for j in range(12) if j != 5]
