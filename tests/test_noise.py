"""Verdicts a loaded host cannot flip (issue 26): compute per step compared across a run's algorithms,
a one-line warning and a normalised comparison when it differs by more than host noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from lowband.report import load_run, print_summary, summarize, write_report
from lowband.report.noise import SPREAD_LIMIT, speedup

STEPS = 20


def _run(root: Path, compute: dict[str, float], comm: dict[str, float]) -> Path:
    """Two ranks per algorithm; constant compute and comm seconds per step; val 2.0 at step 10, 1.5 at 20."""
    run_dir = root / "noisy"
    run_dir.mkdir(parents=True)
    meta = {"config": {"steps": STEPS}, "world_size": 2, "network": "100mbit, 20 ms",
            "algorithms": {name: {} for name in compute}}
    (run_dir / "run.json").write_text(json.dumps(meta))
    for name in compute:
        (run_dir / name).mkdir()
        for rank in (0, 1):
            rows: list[dict[str, Any]] = []
            for step in range(1, STEPS + 1):
                rows.append({"step": step, "loss": 3.0 - 0.05 * step, "tokens": step, "bytes_sent": step,
                             "compute_s": compute[name], "comm_s": comm[name],
                             "time_s": step * (compute[name] + comm[name])})
                if step in (10, 20):
                    rows[-1]["val_loss"] = 2.0 if step == 10 else 1.5
            (run_dir / name / f"rank{rank}.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    return run_dir


def _console_text(summary: Any) -> str:
    console = Console(record=True, width=200)
    print_summary(summary, console)
    return console.export_text()


def test_a_loaded_algorithm_is_flagged_and_compared_normalised(tmp_path: Path) -> None:
    # diloco measured on a host 5x slower per step: raw, it looks 2.9x slower than ddp
    run_dir = _run(tmp_path, {"ddp": 0.1, "diloco": 0.5}, {"ddp": 0.1, "diloco": 0.02})
    summary = summarize(load_run(run_dir))
    check = summary.compute
    assert check is not None and check.flagged
    assert check.per_step_s == pytest.approx({"ddp": 0.1, "diloco": 0.5}) and check.spread == pytest.approx(5.0)
    # normalised: 0.1 s x 20 steps + own comm: ddp 2 + 2 = 4 s, diloco 2 + 0.4 = 2.4 s
    assert check.normalised_s == pytest.approx({"ddp": 4.0, "diloco": 2.4})
    assert speedup(check, "ddp", "diloco") == pytest.approx(4.0 / 2.4)
    assert speedup(check, "ddp", "diloco", to_target=True) == pytest.approx(4.0 / 2.4)  # target 1.5 at step 20
    text = _console_text(summary)
    assert "diloco vs ddp: " in text and "slower" in text.split("diloco vs ddp: ")[1].splitlines()[0]
    assert "compute per step differs 5.0x between algorithms (diloco 0.5 s, ddp 0.1 s median)" in text
    assert "diloco vs ddp, normalised: 1.7x faster, 1.7x faster to target" in text
    html = write_report(run_dir).read_text()
    assert 'class="warn"' in html and "normalised: 1.7x faster" in html
    assert json.loads((run_dir / "summary.json").read_text())["compute"]["spread"] == pytest.approx(5.0)


def test_algorithms_within_host_noise_print_no_warning(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, {"ddp": 0.1, "diloco": 0.1 * SPREAD_LIMIT * 0.96}, {"ddp": 0.1, "diloco": 0.02})
    summary = summarize(load_run(run_dir))
    assert summary.compute is not None and not summary.compute.flagged
    assert "normalised" not in _console_text(summary) and 'class="warn"' not in write_report(run_dir).read_text()


def _burn(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"])


@pytest.mark.slow
def test_a_busy_neighbour_during_one_algorithm_is_warned_about(tmp_path: Path) -> None:
    """A real run: the same ddp twice; CPU burners start when the second begins (a loaded host)."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "lowband", "train", "--algo", "ddp;ddp:bucket_mb=24", "--workers", "2",
           "--steps", "40", "--batch-size", "8", "--eval-every", "20", "--eval-batches", "2", "--bandwidth", "1gbit",
           "--latency", "1ms", "--no-progress", "--out", str(out), "--name", "busy"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    second = out / "busy" / "ddp-bucket_mb=24" / "rank0.jsonl"
    deadline, burners = time.time() + 300, []
    try:
        while not second.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        burners = [_burn(120) for _ in range(4)]  # 2 workers + 4 burners on this machine's cores
        text, _ = proc.communicate(timeout=300)
    finally:
        for burner in burners:
            burner.kill()
    assert proc.returncode == 0, text[-3000:]
    assert "compute per step differs" in text and "normalised" in text, text[-3000:]
