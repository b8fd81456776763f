"""Checkpoint and resume: atomic files, the flags, and a bit-identical resume through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from lowband.cli import main as cli_main
from lowband.train import checkpoint as ckpt
from lowband.train.config import TrainConfig
from lowband.train.flags import config_from_args

WALL_CLOCK = ("compute_s", "comm_s", "time_s")  # the only columns a resumed run may change
LEDGER_TIMES = ("start", "end")


# -- atomic files -----------------------------------------------------------------------------
def _crashing_save(obj: Any, f: Any) -> None:
    """torch.save killed half-way: some bytes reach the file, then the writer dies."""
    f.write(b"PK\x03\x04 half a checkpoint")
    raise RuntimeError("killed mid-write")


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rank0.pt"
    ckpt.save_checkpoint(path, {"step": 3, "w": torch.arange(4.0)})
    monkeypatch.setattr(torch, "save", _crashing_save)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        ckpt.save_checkpoint(path, {"step": 6, "w": torch.zeros(4)})
    monkeypatch.undo()
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.pt", "rank0.pt.sha256"]  # no temp file left


def test_crash_on_first_write_leaves_no_file_under_the_final_name(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "save", _crashing_save)
    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(tmp_path / "rank0.pt", {"step": 3})
    assert list(tmp_path.iterdir()) == []


def test_missing_or_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {missing}"):
        ckpt.load_checkpoint(missing)
    torn = tmp_path / "torn.pt"
    ckpt.save_checkpoint(torn, {"w": torch.ones(1000)})
    torn.write_bytes(torn.read_bytes()[:200])
    with pytest.raises(ValueError) as err:
        ckpt.load_checkpoint(torn)
    assert str(err.value).startswith(f"checkpoint {torn} fails its SHA-256 check: ")
    assert "\n" not in str(err.value)
    ckpt.digest_file(torn).unlink()  # no digest (a file from elsewhere): torch's own check still catches it
    with pytest.raises(ValueError) as err:
        ckpt.load_checkpoint(torn)
    assert str(err.value).startswith(f"checkpoint {torn} is corrupt or incomplete: ")
    assert "\n" not in str(err.value)


def test_flipped_bytes_inside_a_tensor_are_refused(tmp_path: Path) -> None:
    """The silent case: bytes of a tensor's data changed, the zip structure intact, so torch.load would
    succeed with a wrong weight. The digest refuses it, naming the file; required digests must exist."""
    path = tmp_path / "rank0.pt"
    ckpt.save_checkpoint(path, {"w": torch.zeros(4096)})
    data = bytearray(path.read_bytes())
    start = data.index(bytes(256))  # inside the tensor's zeros
    data[start:start + 64] = bytes([0xFF]) * 64
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # torch alone does not notice
    with pytest.raises(ValueError, match="fails its SHA-256 check") as err:
        ckpt.load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    ckpt.digest_file(path).unlink()
    with pytest.raises(ValueError, match="has no digest"):
        ckpt.load_checkpoint(path, require_digest=True)


def test_digest_is_sha256sum_format(tmp_path: Path) -> None:
    import hashlib
    import shutil
    import subprocess

    path = tmp_path / "rank0.pt"
    ckpt.save_checkpoint(path, {"w": torch.arange(10.0)})
    assert ckpt.digest_file(path).read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  rank0.pt\n"
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "-c", "rank0.pt.sha256"], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0 and "rank0.pt: OK" in done.stdout


def test_truncate_metrics_drops_rows_after_the_step_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "rank0.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    ckpt.truncate_metrics(path, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"step": 2')  # torn before the checkpoint step: cut there
    ckpt.truncate_metrics(path, 3)
    assert path.read_text() == '{"step": 1}\n'


# -- flags ------------------------------------------------------------------------------------
def _parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    return err


def test_bad_checkpoint_flags_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _parse_error(capsys, "--checkpoint-every", "-1").endswith(
        "error: --checkpoint-every must be >= 0 (0: no checkpoints), got -1")
    assert _parse_error(capsys, "--resume").endswith("error: --resume needs --name: the run folder to continue")
    run = tmp_path / "old"
    run.mkdir()
    saved = TrainConfig(out=str(tmp_path), name="old", lr=1e-3, seed=1, algos=("ddp",)).to_dict()
    (run / "run.json").write_text(json.dumps({"config": saved}))
    err = _parse_error(capsys, "--out", str(tmp_path), "--name", "old", "--resume", "--algo", "ddp",
                       "--checkpoint-every", "5", "--lr", "2e-3")
    assert err.endswith(f"error: cannot resume {run}: it was trained with different --lr, --seed "
                        "(give the same values, or a new --name)")
    same = config_from_args(["--out", str(tmp_path), "--name", "old", "--resume", "--algo", "ddp", "--lr", "1e-3",
                             "--seed", "1", "--checkpoint-every", "5", "--no-progress"])
    assert same.resume and same.checkpoint_every == 5  # run-control flags may change


# -- resume through the CLI -------------------------------------------------------------------
FLAGS = ("--workers", "2", "--steps", "6", "--checkpoint-every", "3", "-H", "2", "--eval-every", "3",
         "--bandwidth", "none", "--latency", "none", "--eval-batches", "1", "--batch-size", "4",
         "--warmup-steps", "1", "--algo", "ddp,delayed-diloco,streaming-diloco",  # H 2: averages in flight at step 3
         "--compress", "powersgd:rank=2", "--feedback", "ef")  # stateful compressor (Q) and feedback (residuals)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _without(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """ddp, delayed-diloco and streaming-diloco (averages in flight at step 3), PowerSGD with error
    feedback. Run A trains 6 steps with a checkpoint every 3. B is A's folder as a kill during step 6's
    checkpoint leaves it (step 6's files written but not marked complete, metrics rows past step 3),
    resumed with --resume: parameters, losses and bytes from step 4 on equal A's bit for bit. C is A with
    bytes flipped in one rank's last checkpoint: --resume refuses it, naming the rank and the file."""
    assert cli_main(["train", "--out", str(tmp_path), "--name", "a", "--no-progress", *FLAGS]) == 0
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(run_a, run_b)
    folders = json.loads((run_a / "run.json").read_text())["folders"]
    assert sorted(folders) == ["ddp+powersgd:rank=2+ef", "delayed-diloco+powersgd:rank=2+ef",
                              "streaming-diloco+powersgd:rank=2+ef"]
    for folder in folders.values():
        assert ckpt.last_complete_step(run_a / folder) == 6
        (run_b / folder / ckpt.MARKER).write_text(json.dumps({"step": 3}))
        for r in (0, 1):  # rows 1-3 come from before the "kill": a sentinel shows they are kept, not recomputed
            rows = _rows(run_b / folder / f"rank{r}.jsonl")
            rows[0]["sentinel"] = True
            (run_b / folder / f"rank{r}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows) + '{"st')
    assert cli_main(["train", "--out", str(tmp_path), "--name", "b", "--no-progress", "--resume", *FLAGS]) == 0

    for label, folder in folders.items():
        a, b = run_a / folder, run_b / folder
        assert ckpt.last_complete_step(b) == 6
        for r in (0, 1):
            final_a = ckpt.load_checkpoint(ckpt.rank_file(a, 6, r))
            final_b = ckpt.load_checkpoint(ckpt.rank_file(b, 6, r))
            at_3 = ckpt.load_checkpoint(ckpt.rank_file(a, 3, r))
            for name, tensor in final_a["model"].items():
                assert torch.equal(tensor, final_b["model"][name]), (label, r, name)
            assert any(not torch.equal(t, at_3["model"][n]) for n, t in final_a["model"].items())  # it trained
            rows_a, rows_b = _rows(a / f"rank{r}.jsonl"), _rows(b / f"rank{r}.jsonl")
            assert [x["step"] for x in rows_b] == list(range(1, 7)), label
            assert rows_b[0].pop("sentinel") is True, label  # resumed, not retrained from step 1
            # ddp's bytes are counted synchronously; the local-update methods' averages travel in the
            # background, so their mid-run byte counters depend on timing (in any run): compare at the end
            timing = WALL_CLOCK if label.startswith("ddp") else WALL_CLOCK + ("bytes_sent", "bytes_received")
            assert _without(rows_b, timing) == _without(rows_a, timing), label
            assert rows_b[-1]["bytes_sent"] == rows_a[-1]["bytes_sent"] > rows_a[2]["bytes_sent"], label
            ledger_a, ledger_b = _rows(a / f"ledger_rank{r}.jsonl"), _rows(b / f"ledger_rank{r}.jsonl")
            assert _without(ledger_b, LEDGER_TIMES) == _without(ledger_a, LEDGER_TIMES), label
    assert (run_b / "summary.json").is_file()

    # C: A with 64 bytes flipped inside a tensor of one rank's last checkpoint: --resume refuses it
    run_c = tmp_path / "c"
    shutil.copytree(run_a, run_c)
    victim = ckpt.rank_file(run_c / folders["ddp+powersgd:rank=2+ef"], 6, 1)
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    victim.write_bytes(bytes(data))
    capfd.readouterr()
    assert cli_main(["train", "--out", str(tmp_path), "--name", "c", "--no-progress", "--resume", *FLAGS]) != 0
    assert f"worker rank 1 failed: ValueError: checkpoint {victim} fails its SHA-256 check" in capfd.readouterr().err


# -- another world size -----------------------------------------------------------------------
RESHARD = ("--steps", "6", "--checkpoint-every", "3", "-H", "3", "--eval-every", "3", "--bandwidth", "none",
           "--latency", "none", "--eval-batches", "1", "--batch-size", "4", "--warmup-steps", "1",
           "--algo", "diloco,streaming-diloco", "--compress", "powersgd:rank=2", "--feedback", "ef")


@pytest.mark.parametrize("before, after", [(2, 3), pytest.param(3, 2, marks=pytest.mark.slow)])
def test_local_update_methods_resume_at_another_world_size(tmp_path: Path, before: int, after: int) -> None:
    """Saved by `before` workers at step 3 (an outer step), resumed by `after`: the run completes,
    every rank of the new world logs from step 4, and diloco's ranks agree bit for bit after the
    next outer step (step 6) — the global model and outer optimizer were carried over exactly."""
    common = ["train", "--out", str(tmp_path), "--name", "r", "--no-progress", *RESHARD]
    assert cli_main([*common, "--workers", str(before)]) == 0
    run = tmp_path / "r"
    folders = json.loads((run / "run.json").read_text())["folders"]
    for folder in folders.values():
        (run / folder / ckpt.MARKER).write_text(json.dumps({"step": 3, "world_size": before}))
    assert cli_main([*common, "--workers", str(after), "--resume"]) == 0
    for label, folder in folders.items():
        algo_dir = run / folder
        assert json.loads((algo_dir / ckpt.MARKER).read_text())["world_size"] == after
        assert sorted(p.name for p in algo_dir.glob("rank*.jsonl")) == [f"rank{r}.jsonl" for r in range(after)]
        for r in range(after):
            steps = [x["step"] for x in _rows(algo_dir / f"rank{r}.jsonl")]
            assert steps == (list(range(1, 7)) if r < before else [4, 5, 6]), (label, r)
        models = [ckpt.load_checkpoint(ckpt.rank_file(algo_dir, 6, r))["model"] for r in range(after)]
        if label.startswith("diloco"):
            for other in models[1:]:
                assert all(torch.equal(t, other[n]) for n, t in models[0].items()), label
        assert all(torch.isfinite(t).all() for m in models for t in m.values())


def test_other_algorithms_refuse_another_world_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "e"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": TrainConfig(algos=("eager-diloco",), workers=2).to_dict()}))
    err = _parse_error(capsys, "--out", str(tmp_path), "--name", "e", "--resume", "--algo", "eager-diloco",
                       "--workers", "3")
    assert err.endswith(f"error: cannot resume {run}: it was trained with different --workers "
                        "(give the same values, or a new --name)")
