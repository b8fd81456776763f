"""Datasets: real offline data, deterministic per-rank batches, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowband.train.data import Dataset, load_dataset
from lowband.train.models import MODELS


@pytest.fixture(scope="module")
def shakespeare():
    return load_dataset("shakespeare")


def test_shakespeare_is_real_text(shakespeare) -> None:
    assert len(shakespeare.train) > 4_000_000 and shakespeare.vocab_size < 128
    text = "".join(shakespeare.itos[i] for i in shakespeare.val[:20_000].tolist())
    assert "the" in text and "\n" in text


def test_batches_are_deterministic_per_rank_and_shifted(shakespeare) -> None:
    def draw(rank: int):
        return shakespeare.batch(torch.Generator().manual_seed(rank), 4, rank, 2)

    (x0, y0), (x0b, _), (x1, _) = draw(0), draw(0), draw(1)
    assert x0.shape == (4, 128) and torch.equal(x0, x0b) and not torch.equal(x0, x1)
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # targets are the next characters


def test_contiguous_sharding_keeps_ranks_apart() -> None:
    positions = torch.arange(10_000)  # token id == position, so a window's first id is its offset
    ds = Dataset("positions", "text", positions, positions[:1000], vocab_size=10_000, block_size=16)
    n = len(positions) - 17
    g = torch.Generator().manual_seed(0)
    for rank in range(4):
        starts = ds.batch(g, 256, rank, 4, "contiguous")[0][:, 0]
        assert starts.min() >= rank * n // 4 and starts.max() < (rank + 1) * n // 4
    iid = ds.batch(g, 256, 0, 4, "iid")[0][:, 0]
    assert iid.max() >= n // 4  # iid: every rank samples the whole split


def test_mnist_is_real_digits() -> None:
    ds = load_dataset("mnist")
    images, labels = ds.train
    assert images.shape[1:] == (1, 28, 28) and len(labels) == 4500 and len(ds.val[1]) == 500
    assert set(labels.tolist()) == set(range(10))
    logits, loss = MODELS.get("cnn")(ds)(*ds.batch(torch.Generator().manual_seed(0), 8))
    assert logits.shape == (8, 10) and 1.5 < loss.item() < 3.5  # about ln(10) at initialisation


def test_local_text_file_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("to be or not to be, that is the question. " * 200)
    ds = load_dataset(str(path))
    assert ds.vocab_size == len(set(path.read_text())) and ds.kind == "text"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.txt")):
        load_dataset(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; choose one of: mnist, shakespeare"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="model 'gpt' needs a text dataset"):
        MODELS.get("gpt")(load_dataset("mnist"))
