"""``lowband train --log csv,tensorboard``: rank 0's metrics also as CSV and TensorBoard event files,
read back here with TensorBoard's own reader."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lowband import cli
from lowband.train.metrics import check_logs


def test_csv_and_tensorboard_hold_the_jsonl_metrics(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the optional extra lowband[log] is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code = cli.main(["train", "--algo", "ddp", "--workers", "2", "--steps", "4", "--batch-size", "2", "--eval-every", "2",
                     "--eval-batches", "1", "--no-progress", "--out", str(tmp_path), "--name", "t",
                     "--log", "csv,tensorboard"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "t" / "ddp" / "rank0.jsonl").read_text().splitlines()]
    with (tmp_path / "t" / "ddp" / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [float(r["bytes_sent"]) for r in table] == [r["bytes_sent"] for r in rows]
    board = EventAccumulator(str(tmp_path / "t" / "tensorboard" / "ddp"))
    board.Reload()
    assert {"loss", "val_loss", "bytes_sent", "comm_s"} <= set(board.Tags()["scalars"])
    assert [e.step for e in board.Scalars("val_loss")] == [2, 4]
    assert [e.value for e in board.Scalars("bytes_sent")] == pytest.approx([r["bytes_sent"] for r in rows])


def test_unknown_log_is_one_line() -> None:
    with pytest.raises(ValueError, match="--log: unknown wandb; choose from: jsonl, csv, tensorboard"):
        check_logs("csv,wandb")
