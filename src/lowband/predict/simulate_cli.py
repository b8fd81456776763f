"""``lowband simulate``'s glue: read a run folder into traces, build the target, show the result.

The model itself is :mod:`lowband.predict.simulate` (pure); this module reads files
(through :func:`lowband.report.summary.load_run`), resolves defaults from the run (its
worker count, params, network) and renders the measured-vs-projected table and JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from lowband.net.link import Link, Network
from lowband.net.units import format_bandwidth, format_bytes, parse_bandwidth, parse_latency, per_worker
from lowband.predict.schedule import RankLog, Trace, build_trace
from lowband.predict.simulate import Projection, Target, simulate
from lowband.report.summary import Run, _read_jsonl, load_run


def measured_network(run: Run) -> Network | None:
    """The network the run was emulated over (None if ``run.json`` does not say)."""
    cfg, world = run.config, int(run.meta.get("world_size") or 1)
    if "bandwidth" not in cfg:
        return None
    return Network.with_sites(Network.parse(str(cfg["bandwidth"]), str(cfg.get("latency", "0")), world),
                              cfg.get("sites"), cfg.get("wan_bandwidth"), cfg.get("wan_latency"))


def measured_link(run: Run, label: str | None = None) -> Link:
    """The link bounding the run's (or algorithm ``label``'s) ring collectives: the slowest hop of
    the ring it charged (``<folder>/ring.json``, written by the worker; else ``--ring`` or rank
    order); without ``--sites`` that is the bottleneck link. Unlimited if ``run.json`` does not say."""
    network = measured_network(run)
    if network is None:
        return Link()
    ring = str(run.config.get("ring") or "rank")
    order = [int(r) for r in ring.split(",")] if "," in ring else None
    if label is not None:
        saved = run.path / dict(run.meta.get("folders") or {}).get(label, label) / "ring.json"
        if saved.is_file():
            order = json.loads(saved.read_text())["ring"]
    return network.ring_link(order)


def measured_speeds(run: Run) -> tuple[float, ...] | None:
    """Each rank's ``--worker-speed`` in the run (None: all full speed)."""
    text, world = run.config.get("worker_speed"), int(run.meta.get("world_size") or 1)
    if not text:
        return None
    speeds = [float(v) for v in per_worker(str(text))]
    return tuple(speeds * world if len(speeds) == 1 else speeds)


def _neighbours(run: Run, label: str) -> Callable[[int], float] | None:
    """Mean neighbours per worker at n workers, for an algorithm with a gossip ``topology``."""
    topology = ((run.meta.get("algorithms") or {}).get(label) or {}).get("topology")
    if not topology:
        return None
    from lowband.algorithms.gossip import neighbours

    return lambda n: sum(len(peers) for peers in neighbours(topology, n)) / n


def plan_fields(run: Run, label: str, trace: Trace) -> dict[str, Any]:
    """What the algorithm's own CommPlan (lowband.algorithms.commplan) says of its ledger tags: the
    bucket bytes of those it splits (``bucket_mb``), the gradient averages filled during backward and
    those that may take the two-phase path: :class:`Trace`'s ``buckets``, ``backward_tags``, ``two_phase``."""
    from lowband.algorithms import ALGORITHMS
    from lowband.algorithms.commplan import Setup, two_phase_capable, wire

    name = label.partition("+")[0].partition(":")[0]
    if name not in ALGORITHMS:
        return {}
    cls = ALGORITHMS.get(name)
    recorded = (run.meta.get("algorithms") or {}).get(label) or {}
    known = {f.name for f in fields(cls.Options)}
    options = cls.Options(**{k: v for k, v in recorded.items() if k in known})
    setup = Setup(trace.params, trace.ranks, trace.link, 1.0, trace.steps)
    syncs = cls.comm_plan(options, setup)
    capable = hasattr(options, "compress") and two_phase_capable(options)
    finer = 1.0  # bytes of a requantised shard per byte of the first quantisation (option requant)
    if capable and getattr(options, "requant", ""):
        finer = wire(options.requant, trace.params, setup.side).rounds[0] / wire(options.compress, trace.params,
                                                                                 setup.side).rounds[0]
    return {"buckets": {s.label: s.chunk_bytes for s in syncs if math.isfinite(s.chunk_bytes)},
            "backward_tags": frozenset(s.label for s in syncs if s.backward),
            "two_phase": {s.label: finer for s in syncs if capable and s.collective == "all_gather"
                          and not s.label.endswith(".sizes")}}


def load_traces(run: Run, algo: str | None = None) -> dict[str, Trace]:
    """One :class:`Trace` per algorithm of ``run`` (or only ``algo``; ``ValueError`` naming the valid labels)."""
    if algo is not None and algo not in run.algorithms:
        raise ValueError(f"no algorithm {algo!r} in {run.path}: choose one of: {', '.join(run.algorithms)}")
    params = int(run.meta.get("params") or 0)
    if params < 1:
        raise ValueError(f"{run.path}/run.json does not record the model's params: cannot scale payloads")
    folders, speeds = dict(run.meta.get("folders") or {}), measured_speeds(run)
    options = run.meta.get("algorithms") or {}
    hierarchical = [label for label in ([algo] if algo is not None else run.algorithms)
                    if (options.get(label) or {}).get("hierarchical")]
    if hierarchical:
        raise ValueError(f"{', '.join(hierarchical)} averaged hierarchically (--hierarchical): its site and leader "
                         "collectives cannot be projected yet; pick the others with --algo")
    traces: dict[str, Trace] = {}
    for label in [algo] if algo is not None else run.algorithms:
        link = measured_link(run, label)
        folder = run.path / folders.get(label, label)
        logs = []
        for r, rows in enumerate(run.records[label]):
            if not rows:
                continue
            ledger_path = folder / f"ledger_rank{r}.jsonl"
            ledger = _read_jsonl(ledger_path, key="op") if ledger_path.is_file() else []
            logs.append(RankLog(compute_s=tuple(float(x.get("compute_s", 0.0)) for x in rows),
                                comm_s=tuple(float(x.get("comm_s", 0.0)) for x in rows),
                                time_s=float(rows[-1].get("time_s", 0.0)),
                                bytes_sent=float(rows[-1].get("bytes_sent", 0.0)), ledger=tuple(ledger)))
        trace = build_trace(label, params, link, logs, _neighbours(run, label))
        present = [r for r, rows in enumerate(run.records[label]) if rows]
        traces[label] = replace(trace, speeds=None if speeds is None else tuple(speeds[r] for r in present),
                                **plan_fields(run, label, trace))
    return traces


def make_target(run: Run, workers: int | None = None, bandwidth: str | None = None, latency: str | None = None,
                params: float | None = None, compute_scale: float | None = None, seed: int = 0,
                worker_speed: str | None = None, allreduce: str = "auto", overlap_backward: float = 0.0) -> Target:
    """The target: every value not given is the run's own (so no flags at all replays the run)."""
    link = measured_link(run, run.algorithms[0] if run.algorithms else None)
    try:
        speeds = measured_speeds(run) if worker_speed is None else tuple(float(v) for v in per_worker(worker_speed))
    except ValueError:
        raise ValueError(f"--worker-speed takes numbers in (0, 1], comma-separated ('1,1,0.5,0.25'), "
                         f"got {worker_speed!r}") from None
    if worker_speed is not None and run.config.get("budget") == "speed" and speeds != measured_speeds(run):
        raise ValueError("a --budget speed run cannot be projected to other --worker-speed values: its rounds "
                         "are shaped by the speeds it ran with (project a --budget fixed run)")
    return Target(
        workers=int(run.meta.get("world_size") or 1) if workers is None else workers,
        bandwidth=link.bandwidth if bandwidth is None else parse_bandwidth(bandwidth),
        latency=link.latency if latency is None else parse_latency(latency),
        params=int(run.meta.get("params") or 1) if params is None else int(params),
        compute_scale=compute_scale, seed=seed, speeds=speeds, allreduce=allreduce, backward=overlap_backward)


def simulate_run(run_dir: Path | str, algo: str | None = None, **target: Any) -> tuple[Run, Target, list[Projection]]:
    """Load ``run_dir`` and project each algorithm (or ``algo``) to the target (see :func:`make_target`)."""
    run = load_run(run_dir)
    traces = load_traces(run, algo)
    goal = make_target(run, **target)
    return run, goal, [simulate(trace, goal) for trace in traces.values()]


def to_json(run: Run, target: Target, projections: list[Projection]) -> dict[str, Any]:
    """A JSON-ready dict: the run, the target and, per algorithm, measured and projected numbers."""
    rows = []
    for p in projections:
        projected = {k: v for k, v in asdict(p).items() if k not in ("label", "measured")}
        rows.append({"label": p.label, "measured": p.measured,
                     "projected": {**projected, "utilisation": p.utilisation}})
    return {"run": str(run.path), "measured_network": str(run.meta.get("network", "unknown")),
            "target": {**asdict(target), "network": target.link.describe()}, "algorithms": rows}


def write_json(path: Path, run: Run, target: Target, projections: list[Projection]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(run, target, projections), indent=2))


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.2f} h"
    return f"{value:.2f} s" if value < 600 else f"{value / 60:.1f} min"


def print_table(run: Run, target: Target, projections: list[Projection], console: Console | None = None) -> None:
    """Two rows per algorithm, measured and projected."""
    first = projections[0]
    title = (f"{run.name}: measured {first.measured['workers']:g} workers, {run.meta.get('network', '?')}, "
             f"{first.measured['params']:.3g} params -> projected {target.workers} workers, "
             f"{format_bandwidth(target.bandwidth)} / {target.latency * 1e3:g} ms, {target.params:.3g} params, "
             f"compute x{first.compute_scale:.3g}"
             + ("" if target.speeds is None else f", worker speeds {','.join(f'{v:g}' for v in target.speeds)}"))
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(("algorithm", "", "wall-clock", "bytes/worker", "compute", "exposed comm",
                                "utilisation", "stragglers", "link busy")):
        table.add_column(header, justify="left" if i < 2 else "right")
    for p in projections:
        m = p.measured
        table.add_row(p.label, "measured", _seconds(m["wall_clock_s"]), format_bytes(m["bytes_sent_per_worker"]),
                      _seconds(m["compute_s"]), _seconds(m["exposed_comm_s"]), f"{m['utilisation']:.1%}", "", "")
        stragglers = _seconds(p.straggler_wait_s) + ("" if p.replayed else f" (x{p.straggler_factor:.2f})")
        table.add_row("", "replayed" if p.replayed else "projected", _seconds(p.wall_clock_s),
                      format_bytes(p.bytes_sent_per_worker), _seconds(p.compute_s), _seconds(p.exposed_comm_s),
                      f"{p.utilisation:.1%}", stragglers, _seconds(p.link_busy_s), end_section=True)
    (console or Console(width=140)).print(table)
    print(f"{first.steps} steps; compute per step x{first.compute_scale:.3g}, payloads x{first.payload_scale:.3g}; "
          "replayed: the measured per-rank compute (same worker count); stragglers: seconds waiting at blocking "
          f"ops for the last rank (x: expected max of {target.workers} draws of the per-step compute spread)")
