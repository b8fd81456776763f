"""What a person watching rank 0 sees: a progress bar with loss, bytes sent and train time."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lowband.net.units import format_bytes


class TrainProgress:
    """A rich progress bar on rank 0 (a no-op elsewhere or when disabled).

    On a terminal the bar updates in place; in a log (CI) a line is printed at each
    evaluation instead, so long runs still show progress.
    """

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.console = Console(stderr=True, soft_wrap=True)
        self.enabled = enabled
        self.label = label
        self._progress: Progress | None = None
        if enabled and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("sent {task.fields[sent]}"),
                TextColumn("train time {task.fields[clock]:.1f}s"), TimeElapsedColumn(),
                console=self.console, transient=False,
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
