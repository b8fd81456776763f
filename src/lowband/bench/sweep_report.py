"""The report of a ``lowband bench`` sweep folder: one table per network, over seeds.

``write_sweep_report(sweep_dir)`` reads ``sweep.json`` and every finished unit, then writes::

    report.md / report.html   per (task, workers, network): time and bytes to the target loss,
                              final validation loss, exposed communication, compute seconds per
                              step (what differs between runs of the same work is the host's
                              noise), utilisation and speed-up over the baseline (ddp when
                              present), mean ± spread over seeds; the loss plots and the
                              bandwidth vs speed-up curve
    summary.json              the same numbers
    <group>_loss_vs_time.png, <group>_loss_vs_bytes.png, speedup_vs_bandwidth.png

For each group the target loss is the sweep's ``target_loss``, else the baseline's validation loss
at half its steps, the largest over seeds (:mod:`lowband.report.target`); above each table, the
recommendation of :mod:`lowband.report.recommend` from the means over seeds. Spread is the sample standard deviation (seeds >= 2).
Speed-up is the baseline's mean time to target over the entry's (None if either never reached it).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowband.bench.sweep import folder_name as _folder
from lowband.net.units import format_bytes, format_rate, parse_bandwidth
from lowband.report.plots import MANY, _plot_png, line_style
from lowband.report.render import _CSS, _html_table
from lowband.report.recommend import sweep_recommendation
from lowband.report.summary import Run, Summary, _finite, load_run, summarize
from lowband.report.target import Target, automatic, given, halfway

HEADERS = ("entry", "seeds", "time to target", "bytes to target", "final val loss", "exposed comm s",
           "compute s / step", "utilisation", "speed-up vs {base}", "reached")


@dataclass
class Group:
    """One (task, workers, network): per seed, the merged run of every finished entry."""

    key: str
    bandwidth: str
    latency: str
    workers: int
    runs: dict[int, Run] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)


def load_groups(sweep_dir: Path) -> tuple[dict[str, Any], list[Group]]:
    """``sweep.json`` and the finished units, merged per group and seed (entries in spec order)."""
    spec_path = sweep_dir / "sweep.json"
    if not spec_path.is_file():
        raise FileNotFoundError(f"no sweep.json in {sweep_dir}: not a lowband bench folder")
    spec = json.loads(spec_path.read_text())
    labels = [e["label"] for e in spec["entries"]]
    groups: dict[str, Group] = {}
    for cell in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        for unit in (cell / _folder(label) for label in labels):
            if not (unit / "done.json").is_file():
                continue
            run = load_run(unit)
            cfg = run.config
            key = f"{cfg['model']}-{Path(cfg['data']).stem}-w{cfg['workers']}-{cfg['bandwidth']}-{cfg['latency']}"
            group = groups.setdefault(key, Group(key, cfg["bandwidth"], cfg["latency"], int(cfg["workers"])))
            merged = group.runs.get(int(cfg["seed"]))
            if merged is None:
                merged = group.runs[int(cfg["seed"])] = Run(path=cell, meta=dict(run.meta, algorithms={}))
            merged.records.update(run.records)
            merged.link_busy.update(run.link_busy)
            merged.meta["algorithms"].update(run.meta.get("algorithms") or {})
    for group in groups.values():
        present = {label for run in group.runs.values() for label in run.records}
        group.labels = [label for label in labels if label in present]
        for run in group.runs.values():  # spec order: the baseline first
            run.records = {label: run.records[label] for label in group.labels if label in run.records}
    networks = [tuple(n) for n in spec.get("networks", [])]
    order = {net: i for i, net in enumerate(networks)}  # spec order (fast to slow, as written), not by name
    return spec, sorted(groups.values(), key=lambda g: (g.key.rsplit(f"-w{g.workers}-", 1)[0], g.workers,
                                                       order.get((g.bandwidth, g.latency), len(order))))


def summarize_group(group: Group, target: float | None) -> tuple[Target, dict[int, Summary]]:
    """Per seed summaries at one shared target: the given one, or the baseline's val loss at half
    its steps, the largest over seeds (:mod:`lowband.report.target`)."""
    if target is not None:
        chosen = given(target, "the sweep's target_loss")
    else:
        several = len(group.runs) > 1
        base = _baseline(group)
        bests = [(f"{row.name}, seed {seed}" if several else row.name, row.best_val_loss)
                 for seed, run in group.runs.items() for row in summarize(run).rows]
        chosen = automatic(base, [halfway(run.records.get(base, [])) for run in group.runs.values()], dict(bests))
    return chosen, {seed: summarize(run, chosen.loss) for seed, run in sorted(group.runs.items())}


def _baseline(group: Group) -> str:
    """ddp when the group has it, else its first entry."""
    return "ddp" if "ddp" in group.labels else group.labels[0]


def group_rows(group: Group, per_seed: dict[int, Summary]) -> tuple[str, list[dict[str, Any]]]:
    """One dict per entry: means and spreads over seeds, and speed-up over the baseline."""
    base = _baseline(group)
    rows = []
    for label in group.labels:
        found = [s.row(label) for s in per_seed.values() if any(r.name == label for r in s.rows)]
        rows.append({"entry": label, "seeds": len(found), "reached": sum(r.time_to_target_s is not None for r in found),
                     **{k: _stats([getattr(r, k) for r in found]) for k in
                        ("time_to_target_s", "bytes_to_target", "final_val_loss", "comm_s", "wall_clock_s")},
                     "utilisation": _stats([r.compute_s / r.wall_clock_s for r in found if r.wall_clock_s > 0]),
                     "compute_per_step": _stats([r.compute_s / r.steps for r in found if r.steps])})
    by_label = {r["entry"]: r for r in rows}
    for r in rows:
        mine, theirs = r["time_to_target_s"]["mean"], by_label[base]["time_to_target_s"]["mean"]
        r["speedup"] = theirs / mine if mine and theirs else None
    return base, rows


def write_sweep_report(sweep_dir: Path | str) -> Path:
    """Write report.md, report.html, summary.json and the plots; returns report.html's path."""
    sweep_dir = Path(sweep_dir)
    spec, groups = load_groups(sweep_dir)
    if not groups:
        raise FileNotFoundError(f"no finished runs in {sweep_dir} yet (run lowband bench first)")
    md = [f"# lowband bench: {spec['name']}", "", f"{len(spec['entries'])} entries, seeds "
          f"{', '.join(map(str, spec['seeds']))}, {spec['steps']} steps per worker.", ""]
    body, images, data = [], {}, []
    for group in groups:
        chosen, per_seed = summarize_group(group, spec.get("target_loss"))
        target = chosen.loss
        base, rows = group_rows(group, per_seed)
        first = per_seed[min(per_seed)]
        heading = (f"{group.key}: {group.workers} workers, {group.bandwidth} / {group.latency}, target loss "
                   + ("none" if target is None else f"{target:.3f}") + f" ({chosen.origin})")
        cells = [_cells(r) for r in rows]
        headers = [h.format(base=base) for h in HEADERS]
        answer = sweep_recommendation(rows, f"{group.bandwidth} / {group.latency}", target, base)
        notes = [f"- {line}" for line in answer[1:]]
        md += [f"## {heading}", "", f"**{answer[0]}**", "", *notes, *([""] if notes else []),
               _md_table(headers, cells), ""]
        run = group.runs[min(group.runs)]
        for stem, key, label in (("loss_vs_time", "time_s", "wall-clock (s)"), ("loss_vs_bytes", "bytes_sent",
                                                                                 "bytes sent per worker")):
            name = f"{group.key}_{stem}.png"
            images[name] = _plot_png(run, first, key, label)
            md.append(f"![{stem} {group.key}]({name})")
        md.append("")
        body.append(f"<h2>{html.escape(heading)}</h2><p><b>{html.escape(answer[0])}</b></p>"
                    + "".join(f'<p class="note">{html.escape(line)}</p>' for line in answer[1:])
                    + _html_table(headers, cells)
                    + "".join(_img(images[f'{group.key}_{s}.png'], s) for s in ("loss_vs_time", "loss_vs_bytes")))
        data.append({"group": group.key, "bandwidth": group.bandwidth, "latency": group.latency,
                     "workers": group.workers, "target_loss": target, "target_origin": chosen.origin,
                     "recommendation": answer, "baseline": base, "rows": rows})
    curve = _speedup_png(data)
    if curve is not None:
        images["speedup_vs_bandwidth.png"] = curve
        md += ["## Speed-up over the baseline vs bandwidth", "", "![speed-up vs bandwidth](speedup_vs_bandwidth.png)", ""]
        body.append(f"<h2>Speed-up over the baseline vs bandwidth</h2>{_img(curve, 'speed-up vs bandwidth')}")
    failed = _failed(sweep_dir, spec)
    if failed:
        md += ["## Not finished", ""] + [f"- {f}" for f in failed] + [""]
        body.append("<h2>Not finished</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in failed) + "</ul>")
    for name, png in images.items():
        (sweep_dir / name).write_bytes(png)
    (sweep_dir / "report.md").write_text("\n".join(md))
    (sweep_dir / "summary.json").write_text(json.dumps(_finite(data), indent=1) + "\n")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>lowband bench "
            f"{html.escape(spec['name'])}</title><style>{_CSS}</style></head><body><h1>lowband bench: "
            f"{html.escape(spec['name'])}</h1>" + "".join(body) + "</body></html>\n")
    out = sweep_dir / "report.html"
    out.write_text(page)
    return out


# -- helpers ------------------------------------------------------------------------------


def _stats(values: list[float | None]) -> dict[str, float | None]:
    got = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not got:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(got), "sd": statistics.stdev(got) if len(got) > 1 else None}


def _fmt(s: dict[str, float | None], unit: str) -> str:
    if s["mean"] is None:
        return "-"
    one = {"s": lambda v: f"{v:.1f} s", "B": format_bytes, "loss": lambda v: f"{v:.3f}",
           "%": lambda v: f"{v:.0%}", "step": lambda v: f"{v:.2f} s"}[unit]
    return one(s["mean"]) + ("" if s["sd"] is None else f" ± {one(s['sd'])}")


def _cells(r: dict[str, Any]) -> list[str]:
    return [r["entry"], str(r["seeds"]), _fmt(r["time_to_target_s"], "s"), _fmt(r["bytes_to_target"], "B"),
            _fmt(r["final_val_loss"], "loss"), _fmt(r["comm_s"], "s"), _fmt(r["compute_per_step"], "step"),
            _fmt(r["utilisation"], "%"),
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x", f"{r['reached']}/{r['seeds']}"]


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    line = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
                     + [line(r) for r in rows])


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _speedup_png(data: list[dict[str, Any]]) -> bytes | None:
    """Speed-up over the baseline (time to target) against link bandwidth, one line per entry; more
    than ``MANY`` entries: small multiples of at most ``MANY`` lines each (best speed-up first), one
    shared bandwidth axis in human units and the legends beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, list[tuple[float, float]]] = {}
    for g in data:
        bandwidth = parse_bandwidth(g["bandwidth"])
        for r in g["rows"]:
            if bandwidth is not None and r["speedup"] is not None and r["entry"] != g["baseline"]:
                points.setdefault(r["entry"], []).append((bandwidth, r["speedup"]))
    if not any(len(p) > 1 for p in points.values()):
        return None
    order = list(dict.fromkeys(r["entry"] for g in data for r in g["rows"]))  # styled as in the loss plots
    ranked = sorted(points, key=lambda label: -max(y for _, y in points[label]))
    panels = [ranked[i:i + MANY] for i in range(0, len(ranked), MANY)]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False, dpi=110,
                             figsize=(9, 3.6 * len(panels)))
    ticks = sorted({x for pts in points.values() for x, _ in pts})
    for ax, labels in zip(axes[:, 0], panels):
        for label in labels:
            xs, ys = zip(*sorted(points[label]))
            ax.plot(xs, ys, **line_style(order.index(label)), label=label)
        ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [format_rate(t) for t in ticks])
        ax.minorticks_off()
        ax.set_ylabel(f"speed-up over {data[0]['baseline']}", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("link bandwidth per worker")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _failed(sweep_dir: Path, spec: dict[str, Any]) -> list[str]:
    """Units with a folder but no done.json (failed or interrupted)."""
    labels = [e["label"] for e in spec["entries"]]
    return [f"{cell.name}/{_folder(label)} (see its train.log)" for cell in sorted(sweep_dir.iterdir())
            if cell.is_dir() for label in labels
            if (cell / _folder(label)).is_dir() and not (cell / _folder(label) / "done.json").is_file()]


