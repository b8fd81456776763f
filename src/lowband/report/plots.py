"""The plots of a run's report: loss against steps, bytes and wall-clock, and consensus distance.

:func:`render_plots` returns ``{file stem: PNG bytes}``; :mod:`lowband.report.render` writes them
and inlines them in ``report.html``. matplotlib is imported inside the functions (slow to import).
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any, Callable

from lowband.net.units import format_bytes
from lowband.report.summary import Record, Run, Summary

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PLOTS = (  # (file stem, record key for x, axis label)
    ("loss_vs_steps", "step", "training step"),
    ("loss_vs_bytes", "bytes_sent", "bytes sent per worker"),
    ("loss_vs_time", "time_s", "wall-clock (s, evaluation excluded)"),
)
CONSENSUS = ("consensus", "consensus_distance")  # (file stem, record key) of the consensus plot
EMA_BETA = 0.9
"""Smoothing of the plotted train loss (debiased exponential moving average)."""
MANY = 8
"""More series than this: validation curves only, named only for the baseline and the fastest, a wider figure."""
LINESTYLES = ("-", "--", ":")
MARKERS = ("o", "s", "^")


def line_style(i: int) -> dict[str, Any]:
    """The i-th series' matplotlib style: the 10 tab10 colors, then again dashed with squares, then
    dotted with triangles, so up to 30 series stay distinct (and series i looks the same in every plot)."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    turn = (i // len(colors)) % len(LINESTYLES)
    return {"color": colors[i % len(colors)], "linestyle": LINESTYLES[turn], "marker": MARKERS[turn]}


def new_figure(series: int) -> tuple[Any, Any]:
    """``(fig, ax)`` sized for ``series`` lines (wider when the legend goes beside the axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(10, 5.5) if series > MANY else (7.5, 4.5), dpi=110)


def save_png(fig: Any, ax: Any, title_text: str | None, series: int) -> bytes:
    """Title, grid and legend on ``ax`` (beside the axes, never over the data; two columns past 24
    ``series``); ``fig`` as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    if title_text:
        ax.set_title(title_text, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if series <= 24 else 2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def title(summary: Summary) -> str:
    """``'run-x: 4 workers, 100mbit, 20 ms, target loss 2.345 (auto)'``."""
    if summary.target_loss is None:
        target = "no target loss"
    else:
        auto = " (auto)" if summary.target_auto else ""
        target = f"target loss {summary.target_loss:.3f}{auto}"
    return f"{summary.run_name}: {summary.world_size} workers, {summary.network}, {target}"


def smooth(values: list[float], beta: float = EMA_BETA) -> list[float]:
    """Debiased exponential moving average (the first points are not pulled towards 0)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**i))
    return out


def _series(
    records: list[Record], x_key: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    """``(train_x, smoothed train loss, val_x, val loss)`` of one rank's records."""
    train = [r for r in records if isinstance(r.get("loss"), (int, float))]
    val = [r for r in records if isinstance(r.get("val_loss"), (int, float))]
    return ([float(r.get(x_key, 0)) for r in train], smooth([float(r["loss"]) for r in train]),
            [float(r.get(x_key, 0)) for r in val], [float(r["val_loss"]) for r in val])


def shown(summary: Summary, limit: int = MANY) -> list[str]:
    """The algorithms a crowded plot names (at most ``limit``): the baseline, then the fastest to the
    target (then the lowest final loss); the others are drawn thin and grey, unnamed."""
    rest = sorted((r for r in summary.rows if r.name != summary.baseline),
                  key=lambda r: (r.time_to_target_s is None, r.time_to_target_s or 0.0, r.final_val_loss or math.inf))
    return [summary.baseline] + [r.name for r in rest][:limit - 1]


def _draw(ax: Axes, run: Run, summary: Summary, x_key: str, log_x: bool) -> None:
    """Draw every algorithm's rank-0 train loss (thin; only up to ``MANY`` algorithms) and val loss
    (thick, markers). With more than ``MANY``, only :func:`shown`'s are named and colored; the others
    are thin grey validation curves (one legend entry)."""
    with_train = len(run.algorithms) <= MANY
    named = set(run.algorithms) if with_train else set(shown(summary))
    greyed = 0
    for i, algo in enumerate(run.algorithms):
        records = next(r for r in run.records[algo] if r)  # rank 0, or lowest rank that logged
        tx, ty, vx, vy = _series(records, x_key)
        keep: Callable[[float], bool] = (lambda x: x > 0) if log_x else (lambda x: True)
        style = line_style(i)
        train = [(x, y) for x, y in zip(tx, ty) if keep(x)]
        val = [(x, y) for x, y in zip(vx, vy) if keep(x)]
        if train and with_train:
            ax.plot(*zip(*train), color=style["color"], linestyle=style["linestyle"], linewidth=0.8, alpha=0.55,
                    label=f"{algo} train (smoothed)")
        if val and algo not in named:
            greyed += 1
            ax.plot(*zip(*val), color="0.75", linewidth=0.8, zorder=1,
                    label=f"{len(run.algorithms) - len(named)} others" if greyed == 1 else "_nolegend_")
        elif val:
            ax.plot(*zip(*val), **style, linewidth=2.2 if with_train else 1.6, markersize=4,
                    label=f"{algo} val" if with_train else algo)
    if summary.target_loss is not None:
        ax.axhline(summary.target_loss, color="0.3", linestyle="--", linewidth=1,
                   label=f"target {summary.target_loss:.3f}")


def _plot_png(run: Run, summary: Summary, x_key: str, x_label: str) -> bytes:
    """One loss plot as PNG bytes."""
    from matplotlib.ticker import FuncFormatter

    fig, ax = new_figure(len(run.algorithms))
    log_x = x_key == "bytes_sent"
    _draw(ax, run, summary, x_key, log_x)
    if x_key in ("step", "time_s"):
        from lowband.report.membership import mark_membership

        mark_membership(ax, run, x_key)  # elastic runs: joins and departures
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: format_bytes(x)))
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss" if len(run.algorithms) <= MANY else "validation loss")
    return save_png(fig, ax, title(summary), len(run.algorithms))


def _consensus_png(run: Run, summary: Summary) -> bytes | None:
    """Rank 0's consensus distance against step, one line per algorithm that logs it;
    ``None`` when none does."""
    key = CONSENSUS[1]
    series: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for i, algo in enumerate(run.algorithms):
        records = next((r for r in run.records[algo] if r), [])  # rank 0, or lowest rank that logged
        points = [(float(r["step"]), float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            series[i, algo] = points
    if not series:
        return None
    fig, ax = new_figure(len(series))
    for (i, algo), points in series.items():  # the same style per algorithm as the loss plots
        ax.plot(*zip(*points), **line_style(i), linewidth=2.2, markersize=4, label=algo)
    ax.set_xlabel("training step")
    ax.set_ylabel("consensus distance  mean_i ||x_i - x_bar||")
    return save_png(fig, ax, title(summary), len(series))


def render_plots(run: Run, summary: Summary) -> dict[str, bytes]:
    """``{file stem: PNG bytes}`` for the three loss plots (steps, bytes, wall-clock) and,
    when some algorithm logs ``consensus_distance``, the consensus plot."""
    images = {stem: _plot_png(run, summary, key, label) for stem, key, label in PLOTS}
    consensus = _consensus_png(run, summary)
    if consensus is not None:
        images[CONSENSUS[0]] = consensus
    return images
