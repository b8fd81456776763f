"""Issue 23, errors before workers start: the parent's checks (lowband.train.checks), the sweep spec's
shape, and benchmarks/bad_inputs.py (every case refused with exit 2, one line, no traceback)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lowband.bench.sweep import SpecError, SweepSpec
from lowband.cli import main as cli_main
from lowband.train import checks
from lowband.train.checkpoint import digest_file, save_checkpoint
from lowband.train.data import DATASET_KINDS, DATASETS, load_dataset
from lowband.train.flags import config_from_args
from lowband.train.models import MODELS

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "bad_inputs.py"
TEXT = "All the world's a stage, and all the men and women merely players.\n" * 40


def _benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_bad_inputs", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_bad_inputs"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``lowband train ARGV``'s parent check: exit 2 with one line; returns the line."""
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _gpt_checkpoint(path: Path, vocab_size: int = 84, **kw: int) -> None:
    from lowband.train.models.gpt import GPT, GPTConfig

    save_checkpoint(path, {"model": GPT(GPTConfig(vocab_size=vocab_size, **kw)).state_dict()})


# -- --data and --model -------------------------------------------------------------------------
def test_every_registered_dataset_declares_its_kind() -> None:
    """DATASET_KINDS (what the parent knows without loading) agrees with what loading gives."""
    assert set(DATASET_KINDS) == set(DATASETS.names())
    for name in DATASETS.names():
        assert load_dataset(name).kind == DATASET_KINDS[name], name


@pytest.mark.parametrize("model, data, message", [
    ("gpt", "mnist", "model 'gpt' needs a text dataset, got 'mnist' (image); try --model cnn"),
    ("gpt-10m", "mnist", "model 'gpt-10m' needs a text dataset, got 'mnist' (image); try --model cnn"),
    ("cnn", "shakespeare", "model 'cnn' needs an image dataset, got 'shakespeare' (text); try --data mnist"),
    ("cnn", "{text}", "model 'cnn' needs an image dataset, got 'play.txt' (text); try --data mnist"),
])
def test_a_model_and_data_that_do_not_fit_are_refused_in_the_parent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, data: str, message: str) -> None:
    text = tmp_path / "play.txt"
    text.write_text(TEXT)
    line = _refused(["--model", model, "--data", data.format(text=text), "--out", str(tmp_path)], capsys)
    assert line == f"lowband train: error: {message}"


def test_every_model_takes_exactly_one_kind_and_the_check_leaves_the_rng_alone() -> None:
    for model in MODELS.names():
        fits = []
        for data in ("shakespeare", "mnist"):
            try:
                checks.check_model_data(model, data)
                fits.append(data)
            except ValueError as err:
                assert "try --" in str(err)
        assert len(fits) == 1, (model, fits)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    checks._shapes.cache_clear()
    checks.check_model_data("gpt", "shakespeare")  # builds the model once, on the CPU
    assert torch.equal(torch.rand(3), expected)


def test_a_folder_without_text_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    line = _refused(["--data", str(folder), "--out", str(tmp_path)], capsys)
    assert line == (f"lowband train: error: --data {folder} is a folder without *.txt files: give a text file "
                    "or a folder of *.txt files")


# -- --init-from ---------------------------------------------------------------------------------
def test_a_corrupt_init_from_is_refused_in_the_parent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Random bytes, a flipped byte under its digest, another model: one line each before any worker."""
    good, noise, other = tmp_path / "good.pt", tmp_path / "noise.pt", tmp_path / "other.pt"
    _gpt_checkpoint(good)
    noise.write_bytes(os.urandom(2048))
    _gpt_checkpoint(other, n_layer=2)
    common = ["--out", str(tmp_path), "--init-from"]
    assert config_from_args([*common, str(good)]).init_from == str(good)
    line = _refused([*common, str(noise)], capsys)
    assert line.startswith(f"lowband train: error: checkpoint {noise} is corrupt or incomplete: ")
    assert "weights_only" not in line and "give a checkpoint lowband wrote" in line
    line = _refused([*common, str(other)], capsys)
    assert line.startswith(f"lowband train: error: --init-from {other}: the saved model does not fit --model gpt "
                           "(missing blocks.2.")
    assert line.endswith("give the same --model and --data it was trained with")
    line = _refused([*common, str(good), "--model", "cnn", "--data", "mnist"], capsys)
    assert "does not fit --model cnn (missing conv1.bias" in line
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    good.write_bytes(bytes(raw))
    stat = good.stat()
    os.utime(good, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new version: checked anew, not cached
    line = _refused([*common, str(good)], capsys)
    assert line.startswith(f"lowband train: error: checkpoint {good} fails its SHA-256 check")


def test_init_from_with_another_vocabulary_is_left_to_the_workers(tmp_path: Path) -> None:
    """The parent loads no data, so a GPT saved with another vocabulary passes here (the workers refuse it)."""
    path = tmp_path / "v50.pt"
    _gpt_checkpoint(path, vocab_size=50)
    checks.check_init_from(str(path), "gpt", "shakespeare")
    assert digest_file(path).is_file()  # and it was verified against its digest on the way


# -- --workers far above the cores ---------------------------------------------------------------
def test_workers_far_above_the_cores_warn_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert checks.worker_warnings(8, cores=2) == []
    (line,) = checks.worker_warnings(9, cores=2)
    assert line.startswith("--workers 9 on 2 CPU core(s) (4 per core)") and "use --workers 8 or fewer" in line
    assert checks.cpu_cores() >= 1
    monkeypatch.setattr("lowband.train.checks.cpu_cores", lambda: 1)
    monkeypatch.setattr("lowband.train.run.run", lambda cfg, *where: {})  # the warning, not the training
    assert cli_main(["train", "--algo", "ddp", "--workers", "5", "--out", str(tmp_path)]) == 0
    warnings = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning:")]
    assert warnings == [f"warning: {checks.worker_warnings(5, cores=1)[0]}"]


# -- lowband bench, report, simulate -------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ({"task": [1]}, "spec: task = [1] is not written as [[task]] tables of key = value lines"),
    ({"entry": [1]}, "spec: entry = [1] is not written as [[entry]] tables"),
    ({"network": ["1gbit"]}, "spec: network = ['1gbit'] is not written as [[network]] tables"),
    ({"train": 1}, "spec: train = 1 is not written as a [train] table"),
    ({"task": [{"model": "cnn"}], "network": [{"bandwidth": "1gbit"}]},
     "entry 'ddp': model 'cnn' needs an image dataset, got 'shakespeare' (text); try --data mnist"),
])
def test_sweep_specs_of_the_wrong_shape_are_one_line(spec: dict, message: str) -> None:
    with pytest.raises(SpecError) as err:
        SweepSpec.from_dict(spec)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value


def test_bench_prints_brackets_of_a_message_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rich markup no longer eats '[[task]]' out of an error line."""
    spec = tmp_path / "s.toml"
    spec.write_text("task = [1]\n")
    assert cli_main(["bench", str(spec), "--out", str(tmp_path)]) == 2
    assert f"error: {spec}: task = [1] is not written as [[task]] tables" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "simulate"])
def test_report_and_simulate_of_a_missing_folder_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        command: str) -> None:
    assert cli_main([command, str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nope") in err[0] and "give a run folder" in err[0], err


# -- benchmarks/bad_inputs.py --------------------------------------------------------------------
def test_the_case_list_covers_the_issue() -> None:
    bench = _benchmark()
    names = [c.name for c in bench.CASES]
    assert len(names) == len(set(names)) >= 30
    for wanted in ("data-empty", "data-binary", "data-missing", "gpt-mnist", "out-file", "lr-nan", "steps-0",
                   "workers-0", "batch-0", "compress-value", "algo-unknown", "feedback-unknown", "bandwidth-word",
                   "attack-rank", "aggregate-unknown", "resume-nothing", "init-random", "init-flipped",
                   "init-missing", "elastic-gpt-mnist", "bench-task-int", "device-cuda", "fp16-ddp",
                   "sites-word", "worker-speed-range", "eval-every-0"):
        assert wanted in names, wanted
    table = bench.markdown([{"what": "a | b", "command": "lowband x", "exit": 2, "timed_out": False,
                             "seconds": 1.234, "message": "error: c | d"}], "cmd", "2026-01-01")
    assert "| 1 | a \\| b | `lowband x` | 2 | 1.2 | error: c \\| d |" in table


QUICK = "data-folder,gpt-mnist,init-random,init-flipped,elastic-gpt-mnist,bench-task-int,report-missing,command-typo"


def test_bad_inputs_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Eight cases as subprocesses (about 1.5 s each): exit 2, one line, no traceback, nothing left."""
    out = tmp_path / "bad.json"
    assert _benchmark().main(["--only", QUICK, "--out", str(out)]) == 0, capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["cases"] == 8 and data["failed"] == 0
    for row in data["rows"]:
        assert row["exit"] == 2 and not row["traceback"] and not row["tmp_left"] and not row["out_written"], row
        assert row["stderr_lines"] == 1 and row["message"], row


@pytest.mark.slow
def test_bad_inputs_benchmark_every_case(tmp_path: Path) -> None:
    """Every case (about 100 s on 2 cores)."""
    out = tmp_path / "bad.json"
    code = _benchmark().main(["--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert code == 0, [(r["case"], r["wrong"]) for r in rows if r["wrong"]]
    assert all(r["exit"] == 2 and not r["traceback"] for r in rows)
