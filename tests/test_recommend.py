"""The recommendation above the table and in report.html (issue 28): the method first to the target on
this link, the one with the fewest bytes, and the caveats that could change the answer."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lowband.report import load_run, print_summary, summarize, write_report
from lowband.report.recommend import recommendation
from test_noise import _run
from test_report import make_run


def test_the_first_to_the_target_is_recommended_with_its_factor_and_bytes(tmp_path: Path) -> None:
    # equal best losses; diloco 0.1 s compute + 0.02 s comm per step, ddp 0.1 + 0.1: both reach 1.5 at step 20
    summary = summarize(load_run(_run(tmp_path, {"ddp": 0.1, "diloco": 0.1}, {"ddp": 0.1, "diloco": 0.02})))
    lines = recommendation(summary)
    assert lines == ["Recommended on 100mbit, 20 ms: diloco, first to val loss 2.000 (1.2 s, 1.7x sooner than ddp, "
                     "10 B sent per worker to get there)."]  # it also sent the fewest bytes: no second line
    console = Console(record=True, width=200)
    print_summary(summary, console)
    text = console.export_text()
    assert text.index("Recommended on") < text.index("train")  # above the table
    assert "Recommended on 100mbit, 20 ms: diloco" in write_report(tmp_path / "noisy").read_text()


def test_a_method_that_reaches_an_easy_target_first_but_ends_far_worse_is_not_recommended(tmp_path: Path) -> None:
    summary = summarize(load_run(make_run(tmp_path)), target_loss=1.7)  # diloco's best, 13% above ddp's 1.5
    assert recommendation(summary) == [
        "Recommended on 100mbit, 20 ms: ddp, first to val loss 1.700 (15.0 s, 15.00 kB sent per worker to get there).",
        "Not candidates, their best val loss more than 10% above the best: diloco (1.700)."]


def test_caveats_name_what_missed_the_target_close_races_and_a_loaded_host(tmp_path: Path) -> None:
    strict = summarize(load_run(make_run(tmp_path)), target_loss=1.55)  # only ddp gets below 1.55
    assert recommendation(strict) == ["Recommended on 100mbit, 20 ms: ddp, first to val loss 1.550 (20.0 s, 20.00 kB "
                                      "sent per worker to get there).", "Never reached the target: diloco."]
    nobody = summarize(load_run(make_run(tmp_path / "n")), target_loss=1.0)
    assert recommendation(nobody) == ["No recommendation: no method reached val loss 1.000 (train longer, or give "
                                      "--target-loss)."]
    # equal losses; diloco 0.3 s/step of compute (loaded) + 0.02 comm vs ddp 0.1 + 0.1: raw, ddp is first
    loaded = summarize(load_run(_run(tmp_path / "l", {"ddp": 0.1, "diloco": 0.3}, {"ddp": 0.1, "diloco": 0.02})))
    lines = recommendation(loaded)
    assert lines[0].startswith("Recommended on 100mbit, 20 ms: ddp,")
    assert lines[-1] == ("Compute per step differed 3.0x across methods: a loaded host may have decided the timing; "
                         "normalised, diloco is first.")
    close = summarize(load_run(_run(tmp_path / "c", {"ddp": 0.1, "diloco": 0.1}, {"ddp": 0.1, "diloco": 0.09})))
    assert any(line.startswith("Within 10% of diloco's time: ddp;") for line in recommendation(close))


def test_the_configuration_shows_what_changed_and_folds_the_rest(tmp_path: Path) -> None:
    import json

    run_dir = make_run(tmp_path)
    meta = json.loads((run_dir / "run.json").read_text())
    meta.update(changed={"steps": 20, "workers": 2, "progress": False},
                environment={"lowband": "0.1.0", "torch": "2.13.0", "python": "3.11.7", "backend": "gloo"},
                algorithms={"ddp": {"bucket_mb": 25.0}, "diloco": {"inner_steps": 10, "outer_lr": 0.7}})
    (run_dir / "run.json").write_text(json.dumps(meta))
    page = write_report(run_dir).read_text()
    assert "<code>--steps 20 --workers 2 --progress false</code>" in page
    assert ("setting</b>: 2 workers, 100 Mbit/s + 20 ms, 20 steps (cnn on digits); diloco H=10 (outer lr 0.7)"
            in page)  # the run in words
    assert "<li>ddp: its defaults</li>" in page and "<li>diloco: inner_steps=10</li>" in page
    assert "versions</b>: lowband 0.1.0, torch 2.13.0, python 3.11.7, backend gloo" in page
    assert "<details><summary>full configuration (run.json)</summary>" in page
