"""Checks of ``lowband train``'s inputs that look beyond one flag's value, made in the parent (issue 23).

:class:`~lowband.train.config.TrainConfig` calls them on construction, so a bad input is refused
in one line naming the fix (``lowband train: error: ...``, exit code 2) before any worker starts,
instead of by every worker 5-15 s later with a traceback each. Each stays cheap: nothing here loads
a dataset, a model is built once per process on empty data (0.01 s for the default gpt), and a checkpoint
is read once per process (:func:`check_init_from` caches by file, size and modification time).

* :func:`check_data`: ``--data`` is a registered dataset, or readable UTF-8 text long enough for a block;
* :func:`check_model_data`: the model takes the kind of data given (gpt: text, cnn: images);
* :func:`check_init_from`: the ``--init-from`` checkpoint passes its SHA-256 check, loads, and holds a
  model with this model's layers;
* :func:`worker_warnings`: ``--workers`` far above the CPU cores (a warning, not an error).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from lowband.train.checkpoint import init_state, model_file
from lowband.train.data import DATASETS, Dataset, check_text_path, dataset_kind
from lowband.train.models import MODELS, model_builder
from lowband.train.user import is_spec, load_callable

OVERSUBSCRIBED = 4  # workers per CPU core above which `lowband train` warns


def check_data(data: str) -> None:
    """``--data``: a registered dataset, or a path :func:`~lowband.train.data.text_path` would accept."""
    if data in DATASETS:
        return
    if is_spec(data):
        load_callable(data, "--data")  # importable and callable; what it returns is the workers' to find
        return
    path = Path(data).expanduser()
    if not path.exists():
        raise ValueError(f"data file not found: {data} (or use one of: {', '.join(DATASETS.names())})")
    try:
        check_text_path(path)  # binary, unreadable or too short
    except FileNotFoundError:  # a folder without *.txt (the path exists)
        raise ValueError(f"--data {path} is a folder without *.txt files: give a text file or a folder of "
                         "*.txt files") from None


@functools.lru_cache(maxsize=16)
def _shapes(model: str, data: str, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of ``MODELS.get(model)`` built for an empty dataset of ``data``'s kind and name
    with ``vocab_size`` tokens (or classes); the builder's own one line when the model does not take that
    kind. Built on the CPU (the meta device would import torch._dynamo: 1 s, and a cache folder in TMPDIR)
    with the global RNG put back, once per process: 0.01 s for gpt, 0.1 s for gpt-10m."""
    kind = dataset_kind(data)
    name = data if data in DATASETS else Path(data).name
    empty = torch.zeros(0, dtype=torch.long)  # cpu: the parent's check; shapes only, no worker device
    stub = Dataset(name, kind, empty, empty, vocab_size)
    with torch.random.fork_rng(devices=[]):
        return {k: tuple(v.shape) for k, v in MODELS.get(model)(stub).state_dict().items()}


def check_model_data(model: str, data: str) -> None:
    """The model takes ``data``'s kind (``gpt`` text, ``cnn`` images); raises the builder's one line, which
    names the fix ("try --model cnn"). A user's model or data (``module:factory``) is only imported here."""
    if is_spec(model) or is_spec(data):
        model_builder(model)
        return
    _shapes(model, data, 61)


def check_init_from(init_from: str, model: str, data: str) -> None:
    """``--init-from``: the file (or a folder's last complete checkpoint) passes its SHA-256 check, loads
    as a state dict, and holds ``model``'s layers with their shapes (those that do not depend on the
    vocabulary, which only the workers know); raises one line naming the file and the fix."""
    stat = model_file(init_from).stat()  # no such file, or a folder without a complete checkpoint: one line
    if is_spec(model) or is_spec(data):  # a user's model: its layers are the workers' to compare
        init_state(init_from)
        return
    _check_init_from(init_from, model, data, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _check_init_from(init_from: str, model: str, data: str, size: int, mtime_ns: int) -> None:
    """:func:`check_init_from`, once per (path, model, data, file version) in a process: a sweep builds
    a config per run, and a large checkpoint is read once."""
    file, state = init_state(init_from)
    small, large = _shapes(model, data, 61), _shapes(model, data, 67)  # what depends on the vocabulary differs
    missing, unexpected = sorted(set(small) - set(state)), sorted(set(state) - set(small))
    wrong = [k for k in small if k in state and small[k] == large[k]
             and tuple(getattr(state[k], "shape", ())) != small[k]]
    detail = (f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
              if unexpected else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, this model's {small[wrong[0]]}"
              if wrong else "")
    if detail:
        raise ValueError(f"--init-from {file}: the saved model does not fit --model {model} ({detail}); give the "
                         "same --model and --data it was trained with")


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_warnings(workers: int, cores: int | None = None) -> list[str]:
    """One line when ``workers`` exceeds :data:`OVERSUBSCRIBED` per CPU core: allowed, but every step
    time-shares the cores, so compute times (and the report's time columns) are far from a real cluster."""
    cores = cpu_cores() if cores is None else cores
    if workers <= OVERSUBSCRIBED * cores:
        return []
    return [f"--workers {workers} on {cores} CPU core(s) ({workers / cores:.0f} per core): the workers time-share "
            f"the cores, so training crawls and step times are inflated; use --workers {OVERSUBSCRIBED * cores} "
            "or fewer on this machine"]
