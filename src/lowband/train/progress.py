"""What a person watching rank 0 sees: status lines while the run starts, then per algorithm a progress
bar (algorithm i of n, loss, bytes sent, train time, time left) on a terminal, or one plain line per
evaluation in a log or with ``--no-progress``."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from lowband.net.units import format_bytes


class TrainProgress:
    """Rank 0's progress (a no-op elsewhere or when disabled).

    On a terminal, unless ``bar`` is False (``--no-progress``), a bar updates in place (its label
    ``ddp [1/2]``: algorithm i of n; the time left estimated from the steps done); in a log (CI) or
    without the bar, one plain line is printed at each evaluation instead.
    """

    def __init__(self, label: str, total: int, enabled: bool, bar: bool = True) -> None:
        self.console = Console(stderr=True, soft_wrap=True)
        self.enabled = enabled
        self.label = label
        self._progress: Progress | None = None
        if enabled and bar and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("sent {task.fields[sent]}"),
                TextColumn("train time {task.fields[clock]:.1f}s"), TimeElapsedColumn(), TextColumn("left"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._task = self._progress.add_task(label, total=total, loss=float("nan"), sent="0 B", clock=0.0)

    def __enter__(self) -> "TrainProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, step: int, loss: float, bytes_sent: int, clock: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss, sent=format_bytes(bytes_sent), clock=clock)

    def evaluation(self, step: int, total: int, loss: float, val_loss: float, bytes_sent: int, clock: float) -> None:
        if not self.enabled:
            return
        line = (f"{self.label:<8} step {step:>5}/{total}  loss {loss:.3f}  val {val_loss:.3f}  "
                f"sent {format_bytes(bytes_sent):>9}  train time {clock:7.1f}s")
        if self._progress is not None:
            self._progress.console.print(line, highlight=False)
        else:
            self.console.print(line, highlight=False)


def status(enabled: bool, text: str) -> None:
    """One line of start-up status on rank 0 (stderr, where the bar goes)."""
    if enabled:
        Console(stderr=True, soft_wrap=True).print(text, highlight=False, style="dim")
