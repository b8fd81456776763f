"""Per-rank structured metrics: one JSON object per line, flushed as written (nothing lost)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import TracebackType
from typing import Any


class MetricsWriter:
    """Appends records to ``path`` (JSONL); usable as a context manager.

    ``append=True`` keeps the rows already in the file (a resumed run continues it)."""

    def __init__(self, path: Path, append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a" if append else "w", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


LOGS = ("jsonl", "csv", "tensorboard")  # --log: where metrics go besides each rank's JSONL (always written)
TRACKED = ("loss", "val_loss", "bytes_sent", "bytes_received", "comm_s", "compute_s", "time_s", "lr")


def check_logs(spec: str) -> tuple[str, ...]:
    """``--log csv,tensorboard`` -> the names; one line for an unknown name or a missing package."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in LOGS]
    if unknown:
        raise ValueError(f"--log: unknown {', '.join(unknown)}; choose from: {', '.join(LOGS)} (comma-separated)")
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--log tensorboard needs the tensorboard package: pip install 'lowband[log]'")
    return names


class Trackers:
    """Rank 0's metrics rows, also to ``<algo_dir>/metrics.csv`` and TensorBoard event files under
    ``<run_dir>/tensorboard/<algorithm folder>`` (one run per algorithm, the step as the x axis):
    loss, validation loss, bytes, communication and compute seconds, the clock and the lr."""

    def __init__(self, names: tuple[str, ...], run_dir: Path, folder: str, append: bool = False) -> None:
        self.csv, self.board = None, None
        if "csv" in names:
            path = run_dir / folder / "metrics.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not (append and path.exists())
            self.csv = path.open("w" if fresh else "a", buffering=1)
            if fresh:
                self.csv.write(",".join(("step",) + TRACKED) + "\n")
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(run_dir / "tensorboard" / folder))

    def write(self, row: dict[str, Any]) -> None:
        if self.csv is not None:
            self.csv.write(",".join(str(row.get(k, "")) for k in ("step",) + TRACKED) + "\n")
        if self.board is not None:
            for key in TRACKED:
                if isinstance(row.get(key), (int, float)):
                    self.board.add_scalar(key, row[key], row["step"])

    def close(self) -> None:
        if self.csv is not None:
            self.csv.close()
        if self.board is not None:
            self.board.close()

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
