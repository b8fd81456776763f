"""Summary numbers and report files from small synthetic run folders with known values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from lowband.report import load_run, print_summary, summarize, write_report
from lowband.report.plots import MANY, _draw, line_style, smooth
from lowband.report.render import format_seconds

STEPS = 20
VAL_STEPS = (5, 10, 15, 20)
# algorithm -> per-step bytes sent and seconds by rank 0/1, comm s/step, val losses
SPEC: dict[str, dict[str, Any]] = {
    "ddp": {"bytes": (1000, 1200), "dt": (1.0, 1.1), "comm": 0.6, "val": (2.5, 2.0, 1.6, 1.5)},
    "diloco": {"bytes": (100, 120), "dt": (0.5, 0.55), "comm": 0.1, "val": (2.6, 2.1, 1.8, 1.7)},
}


def _records(algo: str, rank: int, specs: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    spec = (specs or SPEC)[algo]
    vals = dict(zip(VAL_STEPS, spec["val"]))
    out = []
    for step in range(1, STEPS + 1):
        record = {
            "step": step, "loss": 3.0 - 0.05 * step + 0.01 * rank, "tokens": 100 * step,
            "bytes_sent": spec["bytes"][rank] * step, "bytes_received": spec["bytes"][rank] * step,
            "compute_s": 0.4, "comm_s": spec["comm"], "time_s": spec["dt"][rank] * step,
        }
        if step in vals:
            record["val_loss"] = vals[step]
        out.append(record)
    return out


def make_run(root: Path, config: dict[str, Any] | None = None, spec: dict[str, dict[str, Any]] | None = None) -> Path:
    """runs/<name> with ddp (baseline) and diloco, 2 ranks each, 20 steps."""
    run_dir = root / "demo"
    meta = {
        "config": {"target_loss": None, "steps": STEPS, "workers": 2, "bandwidth": "100mbit",
                   "latency": "20ms", "model": "cnn", "data": "digits", **(config or {})},
        "world_size": 2, "network": "100mbit, 20 ms", "params": 820480,
        "algorithms": {"ddp": {}, "diloco": {"inner_steps": 20}},
    }
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(meta))
    for algo in SPEC:
        (run_dir / algo).mkdir()
        for rank in (0, 1):
            lines = [json.dumps(r) for r in _records(algo, rank, spec)]
            (run_dir / algo / f"rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def test_rows_are_exact(run_dir: Path) -> None:
    summary = summarize(load_run(run_dir))
    assert [r.name for r in summary.rows] == ["ddp", "diloco"]
    ddp, diloco = summary.row("ddp"), summary.row("diloco")
    assert ddp.bytes_sent_per_worker == pytest.approx(22_000)  # mean(20_000, 24_000)
    assert diloco.bytes_sent_per_worker == pytest.approx(2_200)
    assert ddp.wall_clock_s == pytest.approx(22.0)  # max over ranks of final time_s
    assert diloco.wall_clock_s == pytest.approx(11.0)
    assert ddp.compute_s == pytest.approx(8.0) and ddp.comm_s == pytest.approx(12.0)
    assert ddp.comm_fraction == pytest.approx(0.6)
    assert diloco.comm_s == pytest.approx(2.0)
    # last 10 losses of rank r: mean = 3.0 - 0.05 * 15.5 + 0.01 r; mean over ranks
    assert ddp.final_train_loss == pytest.approx(2.23)
    assert ddp.final_val_loss == 1.5 and ddp.best_val_loss == 1.5
    assert diloco.final_val_loss == 1.7
    assert ddp.steps == 20 and ddp.tokens == 4_000 and ddp.ranks == 2


def test_auto_target_and_ratios(run_dir: Path) -> None:
    summary = summarize(load_run(run_dir))
    assert summary.target_auto is True
    assert summary.target_loss == 2.0  # ddp's val loss at step 10 of 20: half the baseline's steps
    assert summary.target_setter == "ddp"
    assert summary.target_origin == "automatic: ddp's val loss at step 10 of 20, half its steps; --target-loss overrides"
    assert summary.baseline == "ddp"
    ddp, diloco = summary.row("ddp"), summary.row("diloco")
    assert ddp.time_to_target_s == pytest.approx(10.0)  # 2.0 at step 10, 1 s/step
    assert ddp.bytes_to_target == pytest.approx(10_000)
    assert diloco.time_to_target_s == pytest.approx(7.5)  # first val <= 2.0 is 1.8 at step 15, 0.5 s/step
    assert diloco.bytes_to_target == pytest.approx(1_500)
    ratio = summary.ratio("diloco")
    assert ratio.bytes_ratio == pytest.approx(10.0)
    assert ratio.wall_clock_speedup == pytest.approx(2.0)
    assert ratio.time_to_target_speedup == pytest.approx(10.0 / 7.5)
    assert ratio.bytes_to_target_ratio == pytest.approx(10_000 / 1_500)
    assert ratio.val_loss_ratio == pytest.approx(1.7 / 1.5)
    assert summary.ratio("ddp").bytes_ratio == pytest.approx(1.0)


def test_a_stalled_method_misses_the_automatic_target_instead_of_setting_it(tmp_path: Path) -> None:
    stalled = {**SPEC, "diloco": {**SPEC["diloco"], "val": (2.6, 2.5, 2.45, 2.4)}}
    summary = summarize(load_run(make_run(tmp_path, spec=stalled)))
    assert summary.target_loss == 2.0 and summary.row("diloco").time_to_target_s is None  # the old rule: 2.4
    console = Console(record=True, width=300)
    print_summary(summary, console)
    assert "half its steps; --target-loss overrides); reached by 1 of 2 methods" in console.export_text()


def test_without_a_halfway_evaluation_the_target_falls_back_to_the_lowest_loss_all_reach(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    for rank in (0, 1):  # ddp's log cut off at step 4, before its first evaluation
        path = run_dir / "ddp" / f"rank{rank}.jsonl"
        path.write_text("\n".join(path.read_text().splitlines()[:4]) + "\n")
    summary = summarize(load_run(run_dir))
    assert summary.target_loss == 1.7 and summary.target_setter == "diloco"  # the only best: diloco's
    assert "the lowest val loss every algorithm reached" in summary.target_origin


def test_target_from_argument_and_config(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, {"target_loss": 2.0}))
    summary = summarize(run)
    assert summary.target_loss == 2.0 and summary.target_auto is False and summary.target_setter is None
    assert summary.row("ddp").time_to_target_s == pytest.approx(10.0)
    assert summary.row("diloco").time_to_target_s == pytest.approx(7.5)  # 1.8 at step 15
    assert summarize(run, target_loss=1.6).row("ddp").time_to_target_s == pytest.approx(15.0)


def test_target_never_reached_is_none(run_dir: Path) -> None:
    summary = summarize(load_run(run_dir), target_loss=1.0)
    assert summary.target_loss == 1.0 and summary.target_auto is False
    for row in summary.rows:
        assert row.time_to_target_s is None and row.bytes_to_target is None
    assert summary.ratio("diloco").time_to_target_speedup is None
    assert summary.ratio("diloco").bytes_ratio == pytest.approx(10.0)


def test_truncated_line_and_missing_rank(run_dir: Path) -> None:
    (run_dir / "ddp" / "rank1.jsonl").unlink()
    log = run_dir / "diloco" / "rank1.jsonl"
    lines = log.read_text().splitlines()[:12]  # crashed after step 12 ...
    log.write_text("\n".join(lines) + '\n{"step": 13, "loss": 2.3, "tok')  # ... mid-write
    run = load_run(run_dir)
    assert [len(r) for r in run.records["ddp"]] == [20, 0]
    assert [len(r) for r in run.records["diloco"]] == [20, 12]
    summary = summarize(run)
    ddp, diloco = summary.row("ddp"), summary.row("diloco")
    assert ddp.ranks == 1 and ddp.bytes_sent_per_worker == pytest.approx(20_000)
    assert ddp.wall_clock_s == pytest.approx(20.0)
    assert diloco.bytes_sent_per_worker == pytest.approx((2_000 + 120 * 12) / 2)
    assert diloco.wall_clock_s == pytest.approx(10.0)  # rank 0 at 20 s beats rank 1 at 6.6 s
    assert diloco.tokens == 2_000 + 1_200
    assert summary.ratio("diloco").bytes_ratio == pytest.approx(20_000 / 1_720)


def test_corrupt_middle_line_is_an_error(run_dir: Path) -> None:
    log = run_dir / "ddp" / "rank0.jsonl"
    lines = log.read_text().splitlines()
    lines[3] = "{not json"
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="rank0.jsonl:4"):
        load_run(run_dir)


def test_missing_files_raise_file_not_found(tmp_path: Path, run_dir: Path) -> None:
    empty = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=r"no run\.json in .*nothing") as info:
        load_run(empty)
    assert "\n" not in str(info.value)
    for algo in SPEC:
        for log in (run_dir / algo).glob("*.jsonl"):
            log.unlink()
    with pytest.raises(FileNotFoundError, match=f"no rank logs in {run_dir}"):
        load_run(run_dir)


def test_print_summary_table(run_dir: Path) -> None:
    console = Console(record=True, width=250)
    print_summary(summarize(load_run(run_dir)), console=console)
    text = console.export_text()
    assert "2 workers" in text and "100mbit, 20 ms" in text and "target loss 2.000 (auto)" in text
    assert "22.00 kB" in text and "2.20 kB" in text
    assert "10.0x fewer bytes" in text and "2.0x faster" in text and "1.3x faster to target" in text
    assert "diloco vs ddp:" in text


def test_write_report(run_dir: Path) -> None:
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "10.0x fewer bytes" in page and "inner_steps" in page
    for stem in ("loss_vs_steps", "loss_vs_bytes", "loss_vs_time"):
        assert (run_dir / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((run_dir / "summary.json").read_text())
    assert {"rows", "ratios", "target_loss", "target_auto", "baseline"} <= set(data)
    assert data["target_loss"] == 2.0 and data["target_auto"] is True
    assert [r["name"] for r in data["rows"]] == ["ddp", "diloco"]
    assert data["rows"][1]["time_to_target_s"] == pytest.approx(7.5)
    assert data["ratios"][1]["bytes_ratio"] == pytest.approx(10.0)
    md = (run_dir / "summary.md").read_text().splitlines()
    assert sum(line.startswith("| ddp |") for line in md) == 1
    assert sum(line.startswith("| diloco |") for line in md) == 1
    assert any(line.startswith("|:---|") for line in md)


def test_write_report_with_diverged_run_keeps_json_strict(run_dir: Path) -> None:
    log = run_dir / "diloco" / "rank0.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    records[-1]["loss"] = float("nan")  # json writes a bare NaN, as a diverged worker would
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    write_report(run_dir, target_loss=1.0)
    data = json.loads((run_dir / "summary.json").read_text(), parse_constant=pytest.fail)
    assert data["rows"][1]["final_train_loss"] is None
    assert data["rows"][0]["final_train_loss"] == pytest.approx(2.23)
    assert data["rows"][0]["time_to_target_s"] is None


def test_helpers() -> None:
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull to 0
    assert format_seconds(12.34) == "12.3 s"
    assert format_seconds(245) == "4m 05s"
    assert format_seconds(3725) == "1h 02m"
    assert format_seconds(None) == "-"


def test_peak_step_bytes_and_overlap_from_the_ledger(run_dir: Path) -> None:
    # diloco's rank 0 ledger: the link carried traffic for 8 s; it blocked 20 x 0.1 = 2 s of them
    ledger = [{"op": "all_reduce", "start": 10.0 * i, "end": 10.0 * i + 4.0} for i in range(2)]
    (run_dir / "diloco" / "ledger_rank0.jsonl").write_text("\n".join(json.dumps(r) for r in ledger) + "\n")
    (run_dir / "diloco" / "ledger_rank1.jsonl").write_text("\n".join(json.dumps(r) for r in ledger) + "\n")
    summary = summarize(load_run(run_dir))
    diloco, ddp = summary.row("diloco"), summary.row("ddp")
    assert diloco.peak_step_bytes == 120  # rank 1 sends 120 bytes a step
    assert diloco.link_busy_s == pytest.approx(8.0)
    assert diloco.overlap_fraction == pytest.approx(0.75)  # 1 - 2 s exposed / 8 s busy
    assert ddp.link_busy_s == 0.0 and ddp.overlap_fraction is None  # no ledger written


def test_thirty_series_keep_distinct_styles() -> None:
    styles = {(line_style(i)["color"], line_style(i)["linestyle"], line_style(i)["marker"]) for i in range(30)}
    assert len(styles) == 30 and line_style(3) == line_style(3)


def test_many_algorithms_plot_validation_curves_only_one_legend_entry_each(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = make_run(tmp_path)
    for n in range(MANY):  # MANY + 2 algorithms in all
        (run_dir / f"copy{n}").mkdir()
        for rank in (0, 1):
            log = f"rank{rank}.jsonl"
            (run_dir / f"copy{n}" / log).write_bytes((run_dir / "ddp" / log).read_bytes())
    meta = json.loads((run_dir / "run.json").read_text())
    meta["algorithms"].update({f"copy{n}": {} for n in range(MANY)})
    (run_dir / "run.json").write_text(json.dumps(meta))
    run = load_run(run_dir)
    few, many = plt.subplots()[1], plt.subplots()[1]
    _draw(many, run, summarize(run), "step", log_x=False)
    _draw(few, load_run(make_run(tmp_path / "few")), summarize(run), "step", log_x=False)
    target = f"target {summarize(run).target_loss:.3f}"
    # at most MANY named: the baseline, then the fastest to the target; the other two thin grey, one entry
    assert many.get_legend_handles_labels()[1] == ["ddp", "diloco", *(f"copy{n}" for n in range(MANY - 2)),
                                                   "2 others", target]
    assert few.get_legend_handles_labels()[1] == ["ddp train (smoothed)", "ddp val", "diloco train (smoothed)",
                                                  "diloco val", target]
    plt.close("all")


def test_consensus_plot_only_when_an_algorithm_logs_consensus_distance(run_dir: Path) -> None:
    write_report(run_dir)
    assert not (run_dir / "consensus.png").exists()
    assert "Consensus distance" not in (run_dir / "report.html").read_text()
    log = run_dir / "diloco" / "rank0.jsonl"  # as gossip logs it: on evaluation steps
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for r in records:
        if "val_loss" in r:
            r["consensus_distance"] = 1.0 / r["step"]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    page = write_report(run_dir).read_text()
    assert (run_dir / "consensus.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("data:image/png;base64,") == 4 and "Consensus distance vs training step" in page
