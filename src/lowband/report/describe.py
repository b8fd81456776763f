"""The run's configuration as a reader wants it: what differs from the defaults, then the rest folded.

From ``run.json``: the flags that were changed (``changed``, written by the workers; every flag for a
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
    items = [f"<li><b>{title}</b>: <code>{html.escape(' '.join(flags))}</code></li>" if flags
             else "<li><b>flags</b>: every default</li>"]
    items += [f"<li>{html.escape(own_options(label, opts))}</li>" for label, opts in algorithm_options.items()]
    items.append(f"<li><b>versions</b>: {html.escape(versions(meta))}</li>")
    full = html.escape(json.dumps({k: v for k, v in meta.items() if k != "changed"}, indent=2))
    return (f"<ul>{''.join(items)}</ul><details><summary>full configuration (run.json)</summary>"
            f"<pre>{full}</pre></details>")


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)
