"""Show and save the result of a run: a rich table, ``summary.json``/``summary.md``, plots
and one self-contained ``report.html``.

``write_report(run_dir)`` writes into ``run_dir``::

    summary.json        rows, ratios against the baseline, target loss
    summary.md          the table as Markdown (for docs and READMEs)
    loss_vs_steps.png   loss against training step
    loss_vs_bytes.png   loss against bytes sent per worker
    loss_vs_time.png    loss against wall-clock seconds
    consensus.png       consensus distance against step (only when an algorithm logs
                        ``consensus_distance``, as gossip does)
    layer_choices.md    per-layer compression settings over time (only when an algorithm
                        logs ``lgreco_choices``, as the lgreco compressor does)
    report.html         all of the above in one page, images inlined as data URIs

matplotlib is imported inside the plotting code only (it is slow to import).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowband.net.units import format_bytes, format_seconds
from lowband.report.describe import html_block
from lowband.report.noise import speedup, warning
from lowband.report.recommend import recommendation
from lowband.report.plots import CONSENSUS, PLOTS, render_plots, title
from lowband.report.summary import AlgorithmSummary, Ratios, Run, Summary, load_run, summarize

if TYPE_CHECKING:
    from rich.console import Console

HEADERS = (
    "algorithm", "final train loss", "final val loss", "bytes sent/worker", "bytes/step", "peak bytes/step",
    "wall-clock", "compute s", "comm s", "overlap", "time to target", "bytes to target", "vs baseline",
)
CONSOLE_HEADERS = (  # HEADERS without "vs baseline", folded to fit 80 columns
    "algo", "train\nloss", "val\nloss", "sent/\nworker", "bytes/\nstep", "peak\nbytes/step", "wall-\nclock",
    "compute\ns", "comm\ns", "over-\nlap", "time to\ntarget", "bytes to\ntarget",
)
CHOICES = ("layer_choices", "lgreco_choices", "lgreco_bytes_ratio")  # (file stem, per-layer dict, bytes ratio)


# ----------------------------------------------------------------------------- formatting


def format_loss(value: float | None) -> str:
    """``2.34567`` -> ``'2.346'``; missing -> ``'-'``."""
    return "-" if value is None else f"{value:.3f}"


def _times(ratio: float) -> str:
    """``31.62`` -> ``'31.6x'``."""
    return f"{ratio:.1f}x"


def _more_or_less(ratio: float | None, better: str, worse: str) -> str | None:
    """``2.0`` -> ``'2.0x fewer bytes'``; 0.5 -> ``'2.0x more bytes'``."""
    if ratio is None:
        return None
    return f"{_times(ratio)} {better}" if ratio >= 1 else f"{_times(1 / ratio)} {worse}"


def ratio_text(ratio: Ratios, row: AlgorithmSummary | None = None) -> str:
    """One line such as ``'31.6x fewer bytes, 2.1x faster, 2.5x faster to target'``."""
    if ratio.name == ratio.baseline:
        return "baseline"
    parts = [
        _more_or_less(ratio.bytes_ratio, "fewer bytes", "more bytes"),
        _more_or_less(ratio.wall_clock_speedup, "faster", "slower"),
        _more_or_less(ratio.time_to_target_speedup, "faster to target", "slower to target"),
    ]
    if ratio.time_to_target_speedup is None and row is not None and row.time_to_target_s is None:
        parts.append("target not reached")
    if ratio.val_loss_ratio is not None:
        parts.append(f"val loss {ratio.val_loss_ratio:.2f}x")
    return ", ".join(p for p in parts if p) or "-"


def table_rows(summary: Summary) -> list[list[str]]:
    """The summary as text cells, one list per algorithm, in :data:`HEADERS` order."""
    rows = []
    for row, ratio in zip(summary.rows, summary.ratios):
        rows.append([
            row.name,
            format_loss(row.final_train_loss),
            format_loss(row.final_val_loss),
            format_bytes(row.bytes_sent_per_worker),
            format_bytes(row.bytes_sent_per_worker / max(row.steps, 1)),
            format_bytes(row.peak_step_bytes),
            format_seconds(row.wall_clock_s),
            f"{row.compute_s:.1f}",
            f"{row.comm_s:.1f}",
            "-" if row.overlap_fraction is None else f"{row.overlap_fraction:.0%}",
            format_seconds(row.time_to_target_s),
            "-" if row.bytes_to_target is None else format_bytes(row.bytes_to_target),
            ratio_text(ratio, row),
        ])
    return rows


# ----------------------------------------------------------------------------- console


def print_summary(summary: Summary, console: Console | None = None) -> None:
    """Print the summary as a rich table (rows = algorithms), then one ratio line per
    algorithm against the baseline (``diloco vs ddp: 31.6x fewer bytes, ...``)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title(summary), title_justify="left", box=box.SIMPLE_HEAD,
                  collapse_padding=True, pad_edge=False)
    table.add_column(CONSOLE_HEADERS[0], style="bold", no_wrap=True)
    for header in CONSOLE_HEADERS[1:]:
        table.add_column(header, justify="right", no_wrap=True)
    for cells in table_rows(summary):
        table.add_row(*cells[:-1])  # the ratio column is printed as lines below
    answer, *more = recommendation(summary)
    console.print(f"[bold]{answer}[/bold]", highlight=False)
    for line in more:
        console.print(f"  {line}", highlight=False)
    console.print(table)
    for row, ratio in zip(summary.rows, summary.ratios):
        if ratio.name != ratio.baseline:
            text = ratio_text(ratio, row)
            console.print(f"  [bold]{ratio.name}[/bold] vs {ratio.baseline}: {text}")
    if summary.target_loss is not None:
        console.print(f"  [dim]{_target_note(summary)}[/dim]", highlight=False)
    for line in noise_lines(summary):
        console.print(f"  [yellow]{line}[/yellow]", highlight=False)


def noise_lines(summary: Summary) -> list[str]:
    """When compute per step differs across the algorithms more than host noise explains: the
    warning, then each algorithm against the baseline normalised to one compute cost per step."""
    check = summary.compute
    if check is None or not check.flagged:
        return []
    lines = [warning(check)]
    for ratio in summary.ratios:
        if ratio.name == ratio.baseline or ratio.name not in check.per_step_s:
            continue
        parts = [_more_or_less(speedup(check, ratio.baseline, ratio.name), "faster", "slower"),
                 _more_or_less(speedup(check, ratio.baseline, ratio.name, to_target=True), "faster to target",
                               "slower to target")]
        lines.append(f"{ratio.name} vs {ratio.baseline}, normalised: {', '.join(p for p in parts if p) or '-'}")
    return lines


# ----------------------------------------------------------------------------- files


def markdown_table(summary: Summary) -> str:
    """The summary as a Markdown document: a title line and a pipe table."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [f"**{title(summary)}**", "", line(list(HEADERS)),
           "|" + "|".join([":---"] + ["---:"] * (len(HEADERS) - 2) + [":---"]) + "|"]
    out += [line(cells) for cells in table_rows(summary)]
    return "\n".join(out) + "\n"


def write_report(run_dir: Path | str, target_loss: float | None = None) -> Path:
    """Load and summarize ``run_dir``, write the summary files, plots and ``report.html``.

    Returns the path of ``report.html``.
    """
    return _write(Path(run_dir), target_loss)[0]


def show_report(run_dir: Path | str, target_loss: float | None = None, console: Console | None = None) -> Path:
    """:func:`write_report`, then print the table and where the report is (what the CLI shows)."""
    html_path, summary = _write(Path(run_dir), target_loss)
    from rich.console import Console

    if console is None:  # a log (CI, a file) gets a wide table instead of truncated cells
        console = Console(soft_wrap=True)
        if not console.is_terminal:
            console = Console(soft_wrap=True, width=160)
    print_summary(summary, console)
    console.print(f"report: {html_path}", highlight=False)
    return html_path


def _write(run_dir: Path, target_loss: float | None) -> tuple[Path, Summary]:
    run = load_run(run_dir)
    summary = summarize(run, target_loss)
    (run_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    (run_dir / "summary.md").write_text(markdown_table(summary))
    images = render_plots(run, summary)
    for stem, png in images.items():
        (run_dir / f"{stem}.png").write_bytes(png)
    choices = choice_tables(run)
    if choices:
        (run_dir / f"{CHOICES[0]}.md").write_text("".join(
            f"### {algo}\n\n{_markdown(headers, rows)}\n" for algo, (headers, rows) in choices.items()))
    out = run_dir / "report.html"
    out.write_text(html_report(summary, images, choices, run.meta))
    return out, summary


def choice_tables(run: Run) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per algorithm whose rank 0 logs ``lgreco_choices``: (headers, rows), one row per layer and
    one column per logged step at which some layer's setting changed; last row: bytes vs default."""
    tables = {}
    for algo in run.algorithms:
        records = next((r for r in run.records[algo] if r), [])  # rank 0, or lowest rank that logged
        points, last = [], None
        for r in records:
            current = r.get(CHOICES[1])
            if isinstance(current, dict) and current != last:
                points.append((r["step"], current, r.get(CHOICES[2])))
                last = current
        if points:
            layers = sorted({k for _, c, _ in points for k in c})
            rows = [[k] + [f"{c[k]:g}" if k in c else "" for _, c, _ in points] for k in layers]
            rows.append(["bytes vs default"] + [f"{b:.2f}" if isinstance(b, (int, float)) else "" for *_, b in points])
            tables[algo] = (["layer"] + [f"step {step}" for step, *_ in points], rows)
    return tables


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    return "".join("| " + " | ".join(cells) + " |\n" for cells in [headers, ["---"] * len(headers), *rows])


# ----------------------------------------------------------------------------- html

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child, td:last-child { text-align: left; }
table.kv td { text-align: left; } code { font-size: .95em; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.note { color: #666; }
.answer { font-size: 1.1em; font-weight: 600; }
.warn { color: #8a5a00; background: #fff6e0; padding: 4px 8px; }
"""


def _html_table(headers: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    """An escaped HTML table."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers) if headers else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f'<table class="{cls}">' + (f"<tr>{head}</tr>" if head else "") + body + "</table>"


def _target_note(summary: Summary) -> str:
    """A sentence saying which target loss time-to-target uses and where it came from."""
    if summary.target_loss is None:
        return "No target loss: no algorithm logged a validation loss."
    reached = sum(row.time_to_target_s is not None for row in summary.rows)
    origin = summary.target_origin or ("automatic" if summary.target_auto else "set by the user")
    return (f"Target loss {summary.target_loss:.4f} ({origin}); reached by {reached} of {len(summary.rows)} "
            f"methods. Baseline: {summary.baseline}.")


def html_report(summary: Summary, images: dict[str, bytes],
                choices: dict[str, tuple[list[str], list[list[str]]]] | None = None,
                meta: dict[str, Any] | None = None) -> str:
    """A self-contained HTML page: inline CSS, plots as base64 PNG data URIs, :func:`choice_tables`
    when given, and the configuration from ``meta`` (run.json: :mod:`lowband.report.describe`)."""
    ratios = "".join(
        f"<li><b>{html.escape(r.name)}</b>: {html.escape(ratio_text(r, row))}</li>"
        for row, r in zip(summary.rows, summary.ratios) if r.name != summary.baseline
    )
    plots = "".join(
        f'<h3>Loss vs {html.escape(label)}</h3><img alt="loss vs {html.escape(label)}" '
        f'src="data:image/png;base64,{base64.b64encode(images[stem]).decode("ascii")}">'
        for stem, _key, label in PLOTS if stem in images
    )
    if CONSENSUS[0] in images:
        plots += ('<h3>Consensus distance vs training step</h3><img alt="consensus distance vs training step" '
                  f'src="data:image/png;base64,{base64.b64encode(images[CONSENSUS[0]]).decode("ascii")}">')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title(summary))}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title(summary))}</h1>"
        + "".join(f'<p class="{"answer" if i == 0 else "note"}">{html.escape(line)}</p>'
                  for i, line in enumerate(recommendation(summary)))
        + f"<h2>Results</h2>{_html_table(list(HEADERS), table_rows(summary))}"
        f'<p class="note">{html.escape(_target_note(summary))}</p>'
        + "".join(f'<p class="warn">{html.escape(line)}</p>' for line in noise_lines(summary))
        + (f"<h2>Against {html.escape(summary.baseline)}</h2><ul>{ratios}</ul>" if ratios else "")
        + f"<h2>Loss curves</h2>{plots}"
        + "".join(f"<h2>Per-layer compression settings over time: {html.escape(algo)}</h2>"
                  f"{_html_table(headers, rows)}" for algo, (headers, rows) in (choices or {}).items())
        + f"<h2>Run configuration</h2>{html_block(meta or {'config': summary.config}, summary.algorithm_options)}"
        "</body></html>\n"
    )

