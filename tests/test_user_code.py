"""``lowband train --model package.module:factory --data package.module:factory`` on a user's module
(docs/api.md): run from the folder that holds it, trained by every algorithm like lowband's own models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

USER_MODULE = '''
import torch
from torch import nn


def classifier(data):  # (module, loss_fn): lowband computes loss_fn(module(x), y)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, data.vocab_size)), nn.functional.cross_entropy


class Bigram(nn.Module):  # forward(x, y) returns the loss alone
    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.table(x).flatten(0, 1), y.flatten())


def bigram(data):
    return Bigram(data.vocab_size)


def labelled():  # ((inputs, labels), (inputs, labels))
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 3, generator=g), torch.randn(600, 8, generator=g)
    y = (x @ w).argmax(1)
    return (x[:500], y[:500]), (x[500:], y[500:])


def tokens():  # (train, val) token ids: a repeating pattern a bigram model learns
    ids = torch.arange(4000) % 7
    return ids[:3500], ids[3500:]


def not_a_model(data):
    return 42
'''
COMMON = ["--workers", "2", "--steps", "20", "--batch-size", "16", "--eval-every", "10", "--eval-batches", "2",
          "--lr", "0.02", "--no-progress", "--name", "run"]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    return tmp_path


def train(folder: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowband.cli", "train", *flags, *COMMON, "--out", str(folder / "runs")],
                          cwd=folder, capture_output=True, text=True, timeout=300)


def val_losses(folder: Path, algo: str) -> list[float]:
    rows = (folder / "runs" / "run" / algo / "rank0.jsonl").read_text().splitlines()
    return [r["val_loss"] for r in map(json.loads, rows) if "val_loss" in r]


@pytest.mark.parametrize("model, data", [("usermod:classifier", "usermod:labelled"), ("usermod:bigram", "usermod:tokens")])
def test_a_user_model_and_data_train(folder: Path, model: str, data: str) -> None:
    done = train(folder, "--model", model, "--data", data, "--algo", "ddp,diloco", "-H", "5")
    assert done.returncode == 0, done.stderr[-2000:]
    for algo in ("ddp", "diloco"):
        losses = val_losses(folder, algo)
        assert len(losses) == 2 and losses[-1] < losses[0], (algo, losses)
    env = json.loads((folder / "runs" / "run" / "run.json").read_text())["environment"]
    assert env["torch"] == __import__("torch").__version__ and env["backend"] == "gloo" and env["python"], env


@pytest.mark.parametrize("flags, message", [
    (["--model", "nosuchmod:build"], "--model nosuchmod:build: cannot import 'nosuchmod' (run lowband train from"),
    (["--model", "usermod:nope", "--data", "usermod:labelled"], "module usermod has no callable 'nope'"),
    (["--data", "usermod:nope"], "--data usermod:nope: module usermod has no callable 'nope'"),
])
def test_a_wrong_user_spec_is_one_line_in_the_parent(folder: Path, flags: list[str], message: str) -> None:
    done = train(folder, *flags)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-1500:]


def test_a_factory_returning_no_model_names_it(folder: Path) -> None:
    done = train(folder, "--model", "usermod:not_a_model", "--data", "usermod:labelled", "--algo", "ddp")
    assert done.returncode == 1
    assert "usermod:not_a_model: the factory returned a int, not a torch module" in done.stderr, done.stderr[-1500:]
