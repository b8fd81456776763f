"""Slow: every compressor, with its recommended feedback, trains the small GPT on 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowband.cli import main as cli_main

RECOMMENDED = [  # (compressor spec, feedback)
    ("fp16", "none"), ("bf16", "none"), ("int8", "ef"), ("qsgd:bits=4", "none"), ("terngrad", "none"),
    ("sign", "ef"), ("topk:ratio=0.01", "ef"), ("randomk:ratio=0.05,unbiased=false", "ef"), ("threshold:tau=0.001", "ef"),
    ("dgc:ratio=0.01", "dgc"), ("powersgd:rank=2", "ef"), ("topk:ratio=0.01", "ef21"), ("topk:ratio=0.01", "econtrol"),
]


@pytest.mark.slow
@pytest.mark.parametrize("compress, feedback", RECOMMENDED)
def test_compressed_data_parallel_learns(tmp_path: Path, compress: str, feedback: str) -> None:
    code = cli_main(["train", "--algo", "ddp", "--workers", "2", "--steps", "40", "--eval-every", "20",
                     "--warmup-steps", "5", "--bandwidth", "none", "--compress", compress, "--feedback", feedback,
                     "--out", str(tmp_path), "--name", "run", "--no-progress", "--eval-batches", "2"])
    assert code == 0
    folder = json.loads((tmp_path / "run" / "run.json").read_text())["folders"]
    (label, name), = folder.items()
    rows = [json.loads(x) for x in (tmp_path / "run" / name / "rank0.jsonl").read_text().splitlines()]
    start = sum(r["loss"] for r in rows[:3]) / 3
    end = sum(r["loss"] for r in rows[-5:]) / 5
    assert end < start - 0.5, f"{label}: loss {start:.3f} -> {end:.3f}"
