"""benchmarks/faults.py's random plan and LOWBAND_FAULT's incarnation= (kills of restarted workers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lowband.elastic.membership import FaultPlan, parse_faults

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from faults import fault_plan  # noqa: E402


def test_fault_plan_kills_each_replicas_incarnations_in_order() -> None:
    plan = parse_faults(fault_plan(20, 4, 400, 10, seed=0))
    assert len(plan) == 20 and all(f.kind == "kill" and 40 <= f.step <= 360 for f in plan)
    for replica in range(4):
        mine = [f for f in plan if f.replica == replica]
        assert [f.incarnation for f in mine] == list(range(len(mine)))
        assert [f.step for f in mine] == sorted(f.step for f in mine)
    assert fault_plan(20, 4, 400, 10, seed=0) == fault_plan(20, 4, 400, 10, seed=0)


def test_a_kill_applies_to_its_incarnation_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBAND_FAULT", "kill:rank=1,step=5;kill:rank=1,step=9,incarnation=2;corrupt:rank=1")
    assert [(f.kind, f.step) for f in FaultPlan.from_env(1, 0).faults] == [("kill", 5), ("corrupt", 0)]
    assert [(f.kind, f.step) for f in FaultPlan.from_env(1, 1).faults] == [("corrupt", 0)]
    assert [(f.kind, f.step) for f in FaultPlan.from_env(1, 2).faults] == [("kill", 9), ("corrupt", 0)]
