"""The run's configuration as a reader wants it: what differs from the defaults, then the rest folded.

From ``run.json``: the run in words (workers, link, steps, each local-update method's period and outer
optimizer), the flags that were changed (``changed``, written by the workers; every flag for a
run folder older than that), each algorithm's options that differ from its own defaults
(``ALGORITHMS``' ``Options``), the versions the run used (``environment``), and the whole
configuration as JSON in a collapsed block (report.html). Pure: it formats, it never prints.
"""

from __future__ import annotations

import dataclasses
import html
import json
from typing import Any

from lowband.algorithms import ALGORITHMS
from lowband.net.units import format_rate, parse_bandwidth, parse_latency


def setting(meta: dict[str, Any], algorithm_options: dict[str, Any]) -> str:
    """The run in words: ``4 workers, 100 Mbit/s + 20 ms, 400 steps of 16 (gpt on shakespeare);
    diloco H=20 (outer sgd Nesterov lr 0.7)``."""
    cfg = meta.get("config") or {}
    words = [f"{meta.get('world_size') or cfg.get('workers', '?')} workers", _link(cfg)]
    if cfg.get("steps"):
        batch = f" of {cfg['batch_size']}" if cfg.get("batch_size") else ""
        task = f" ({cfg['model']} on {cfg['data']})" if cfg.get("model") and cfg.get("data") else ""
        words.append(f"{cfg['steps']} steps{batch}{task}")
    local = [_local(label, opts) for label, opts in algorithm_options.items() if opts.get("inner_steps")]
    return ", ".join(w for w in words if w) + ("; " + "; ".join(local) if local else "")


def _link(cfg: dict[str, Any]) -> str:
    try:
        rate = parse_bandwidth(str(cfg.get("bandwidth", "none")))
        latency = parse_latency(str(cfg.get("latency", "0ms")))
    except ValueError:
        return f"{cfg.get('bandwidth')} / {cfg.get('latency')}"
    return ("no bandwidth limit" if rate is None else format_rate(rate)) + f" + {latency * 1e3:g} ms"


def _local(label: str, opts: dict[str, Any]) -> str:
    """``diloco H=20 (outer sgd Nesterov lr 0.7)`` for a local-update method."""
    outer = [str(opts.get("outer_optimizer") or ""), "Nesterov" if opts.get("nesterov") else "",
             f"lr {opts['outer_lr']:g}" if isinstance(opts.get("outer_lr"), (int, float)) else ""]
    outer_text = " ".join(w for w in outer if w)
    return f"{label} H={opts['inner_steps']}" + (f" (outer {outer_text})" if outer_text else "")


def changed_flags(meta: dict[str, Any]) -> list[str]:
    """``--steps 30``, ``--workers 2``, ...: the flags that differ from ``lowband train``'s defaults."""
    changed = meta.get("changed", meta.get("config") or {})  # an older run folder: every flag it recorded
    return [f"--{k.replace('_', '-')} {_value(v)}" for k, v in changed.items() if k != "algos" and v is not None]


def own_options(label: str, options: dict[str, Any]) -> str:
    """``diloco: inner_steps=10, outer_lr=0.5`` (the options that differ from the algorithm's own defaults)."""
    name = label.partition("+")[0].partition(":")[0]
    try:
        defaults = {f.name: f.default for f in dataclasses.fields(ALGORITHMS.get(name).Options)}
    except (KeyError, ValueError):
        defaults = {}
    differ = [f"{k}={_value(v)}" for k, v in options.items() if defaults.get(k, object()) != v]
    return f"{label}: {', '.join(differ) if differ else 'its defaults'}"


def versions(meta: dict[str, Any]) -> str:
    env = meta.get("environment") or {}
    parts = [f"{k} {env[k]}" for k in ("lowband", "torch", "python") if env.get(k)]
    extra = [f"{k} {env[k]}" for k in ("backend", "host", "git") if env.get(k)]
    return ", ".join(parts + extra) or "not recorded (a run folder older than lowband 0.1)"


def html_block(meta: dict[str, Any], algorithm_options: dict[str, Any]) -> str:
    """The configuration section of report.html."""
    flags = changed_flags(meta)
    title = "changed flags" if "changed" in meta else "flags"
    items = [f"<li><b>setting</b>: {html.escape(setting(meta, algorithm_options))}</li>"]
    items.append(f"<li><b>{title}</b>: <code>{html.escape(' '.join(flags))}</code></li>" if flags
                 else "<li><b>flags</b>: every default</li>")
    items += [f"<li>{html.escape(own_options(label, opts))}</li>" for label, opts in algorithm_options.items()]
    items.append(f"<li><b>versions</b>: {html.escape(versions(meta))}</li>")
    full = html.escape(json.dumps({k: v for k, v in meta.items() if k != "changed"}, indent=2))
    return (f"<ul>{''.join(items)}</ul><details><summary>full configuration (run.json)</summary>"
            f"<pre>{full}</pre></details>")


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)
